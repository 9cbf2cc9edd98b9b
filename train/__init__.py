"""Training, LoRA, export, launch and the `longvu` CLI."""

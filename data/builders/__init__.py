"""Dataset builders: one module per source, each writing a JSONL manifest (+ media)."""

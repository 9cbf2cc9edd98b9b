"""Benchmark evaluation: `longvu eval` (one module per benchmark layout and protocol, shared scoring,
the runner) and the lmms-eval model adapter (`train.evaluation.lmms_model`)."""

"""Dataset builders and the sample pipeline for LongVU training."""

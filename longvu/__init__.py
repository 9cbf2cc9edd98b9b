"""LongVU model library: config, model, vision towers, SVA connector, compression, checkpoint I/O."""

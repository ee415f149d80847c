"""Training: model, data, parallelism, loop, checkpoints and logging for MSA decoders."""

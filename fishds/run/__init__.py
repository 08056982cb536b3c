"""The `fishds train` run: preflight, data, training loop, evaluation, checkpoints, outputs."""

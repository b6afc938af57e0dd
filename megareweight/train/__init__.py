"""Training: the loop, engines (plain PyTorch, DeepSpeed), checkpoints, metrics.

Import :func:`megareweight.train.loop.train` for programmatic use; ``python -m megareweight.train``
is the entry point the DeepSpeed launcher runs.
"""

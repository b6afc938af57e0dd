"""megareweight: LLM pretraining with dynamic loss-based sample reweighting (Sow et al., ICLR 2025)
and scale-aware domain mixing (Kang et al., AutoScale).

Packages: ``data`` (corpus, tokenizer, shards, mixture sampler), ``model`` (LLaMA-style decoder),
``reweighting`` (instance weights), ``mixing`` (AutoScale's maths, no training code), ``autoscale``
(the ``mix`` workflow around training runs), ``train`` (loop, engines, checkpoints,
metrics); the loss kernels live in the top-level ``kernels`` package.
"""
__version__ = "0.1.0"

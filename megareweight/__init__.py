"""megareweight: LLM pretraining with dynamic loss-based sample reweighting (Sow et al., ICLR 2025)
and scale-aware domain mixing (Kang et al., AutoScale).

Packages: ``data`` (corpus, tokenizer, shards, mixture sampler), ``model`` (LLaMA-style decoder),
``reweighting`` (instance weights), ``mixing`` (AutoScale's maths, no training code), ``autoscale``
(the ``mix`` workflow around training runs), ``train`` (loop, engines, checkpoints,
metrics) and ``kernels`` (the loss kernels: the repository's top-level ``kernels/`` folder, linked
here so that their import name is ``megareweight.kernels``, never ``kernels``, which is Hugging Face's).
"""
__version__ = "0.1.0"

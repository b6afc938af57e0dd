"""Reweighted linear cross-entropy (LM head + CE + Sow et al. instance weights), one op laid out
like a Liger-Kernel op:

* ``reference.py``      plain autograd ground truth and the shared reweighting helpers;
* ``function.py``       the autograd Function (fast / lean modes), chunk and mode selection;
* ``epilogue.py``       the elementwise half in PyTorch ops or Triton kernels, same interface;
* ``triton_kernels.py`` the Triton kernels (imported only when the Triton epilogue is used);
* ``bench.py``          ``python -m kernels.bench``; the AOT check is ``python -m kernels.aot``.
"""
from kernels.weighted_ce.function import EPILOGUES, MODES, fused_linear_weighted_ce  # noqa: F401

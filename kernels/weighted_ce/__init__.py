"""Reweighted linear cross-entropy (LM head + CE + Sow et al. instance weights): the public API of
the loss kernels, imported as ``megareweight.kernels.weighted_ce``.

Why that name: the files live in the repository's top-level ``kernels/`` folder, but the import
name ``kernels`` belongs to Hugging Face's package (which transformers requires), so this folder has
no ``__init__.py`` and is reached only through ``megareweight/kernels`` (a link to it). One op laid
out like a Liger-Kernel op:

* ``impls.py``          ``loss.impl`` -> function (:func:`get_loss_impl`);
* ``reference.py``      plain autograd ground truth and the shared reweighting helpers;
* ``function.py``       the autograd Function (fast / lean modes), chunk and mode selection;
* ``epilogue.py``       the elementwise half in PyTorch ops or Triton kernels, same interface;
* ``triton_kernels.py`` the Triton kernels (imported only when the Triton epilogue is used);
* ``bench.py``          ``python -m megareweight.kernels.bench``; the AOT check is ``python -m megareweight.kernels.aot``.
"""
import torch as _torch

#: The oldest torch setup.py declares (and `make test-oldest` tests, with Triton 3.6).
MIN_TORCH = (2, 11)
if tuple(int(x) for x in _torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
    raise ImportError(f"megareweight needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {_torch.__version__}")

from megareweight.kernels.weighted_ce.function import EPILOGUES, MODES, fused_linear_weighted_ce
from megareweight.kernels.weighted_ce.impls import LOSS_IMPLS, get_loss_impl, triton_available
from megareweight.kernels.weighted_ce.reference import LossOutput

__all__ = ["EPILOGUES", "LOSS_IMPLS", "LossOutput", "MODES", "fused_linear_weighted_ce", "get_loss_impl",
           "triton_available"]

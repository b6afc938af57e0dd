"""Causal attention that does not cross documents packed into one window (``data.packing: documents``).

Two backends with one meaning, built once per forward and shared by every layer:

* ``sdpa``: a block-diagonal causal boolean mask [B, 1, T, T] (True = may attend) for
  ``scaled_dot_product_attention``. Works everywhere; O(B T^2) bytes (32 MiB at B=8, T=2048).
* ``flex``: a FlexAttention ``BlockMask`` from the document mask ``seg[q] == seg[k] and q >= k``;
  on CUDA ``flex_attention`` is compiled and skips fully-masked blocks (the cost falls with the
  number of documents). ``auto`` picks it on CUDA when ``torch.nn.attention.flex_attention``
  exists, ``sdpa`` otherwise. Uncompiled (CPU) it is a slow reference, used by the tests to check
  that both backends agree.

Rotary positions are *not* restarted per document: RoPE makes a query-key score depend only on
their distance, and the mask keeps every pair inside one document, so a document's outputs do not
depend on where it sits in the window (up to fp32 rounding of the angles; the tests compare each
document run alone with the packed window). Keeping positions global leaves the RoPE tables,
the exported Hugging Face model and the no-mask path untouched.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex")


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def build_document_mask(segment_ids: torch.Tensor, backend: str = "auto") -> Any:
    """The mask for ``segment_ids`` [B, T] (equal ids = same document) in the chosen backend's form."""
    if backend not in BACKENDS:
        raise ValueError(f"document attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "flex" if segment_ids.is_cuda and flex_available() else "sdpa"
    b, t = segment_ids.shape
    if backend == "sdpa":
        causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
        return (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal

    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(batch, head, q, k):
        return (segment_ids[batch, q] == segment_ids[batch, k]) & (q >= k)

    return create_block_mask(document_causal, b, None, t, t, device=segment_ids.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[Any], gqa: bool) -> torch.Tensor:
    """Causal attention of [B, H, T, hd] tensors; ``mask`` from :func:`build_document_mask` or None."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)

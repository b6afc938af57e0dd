"""LLaMA-style decoder: RMSNorm, rotary embeddings, SwiGLU, PyTorch SDPA attention.

``forward`` returns the final hidden states, not logits: the loss (``kernels``) multiplies them with
``output_weight`` tile by tile so that the [N, V] logits never exist at once. ``logits()`` is there
for evaluation and export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megareweight.model.document_attention import attend, build_document_mask


@dataclass(frozen=True)
class ModelArgs:
    """Shapes of the decoder. ``ffn_dim=None`` uses LLaMA's rule (8/3 d, rounded up to 256)."""

    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension d_model/n_heads must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return 256 * math.ceil(int(8 * self.d_model / 3) / 256)


#: Named sizes. ``1.4b`` is the size the reweighting paper trained (d 2048, 24 layers, 16 heads);
#: ``7b`` has LLaMA-2 7B's shapes. ``tiny`` is for tests, ``small`` for CPU demos.
MODEL_SIZES: dict[str, ModelArgs] = {
    "tiny": ModelArgs(d_model=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=512, tie_embeddings=True),
    "small": ModelArgs(d_model=128, n_layers=4, n_heads=4, ffn_dim=384, max_seq_len=1024, tie_embeddings=True),
    "125m": ModelArgs(d_model=768, n_layers=12, n_heads=12, max_seq_len=2048, tie_embeddings=True),
    "1.4b": ModelArgs(d_model=2048, n_layers=24, n_heads=16, max_seq_len=2048),
    "7b": ModelArgs(d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=4096),
}


def model_args(size: str, **overrides) -> ModelArgs:
    """The named size with overrides (e.g. the tokenizer's ``vocab_size``)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model.size: unknown {size!r}; allowed: {', '.join(MODEL_SIZES)}")
    return replace(MODEL_SIZES[size], **{k: v for k, v in overrides.items() if v is not None})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim/2] for rotary embeddings (computed in fp32)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension; x is [B, H, T, hd].

    This is the "rotate_half" convention of Hugging Face's LLaMA, so exported weights need no
    permutation.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.q_proj = nn.Linear(args.d_model, args.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.d_model, args.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.d_model, args.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(args.n_heads * hd, args.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, mask, gqa=a.kv_heads != a.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.d_model, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.d_model, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args)
        self.ffn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.ffn = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder. ``activation_checkpointing`` recomputes each block in backward (large models)."""

    def __init__(self, args: ModelArgs, activation_checkpointing: bool = False):
        super().__init__()
        self.args = args
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.d_model, args.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, D] matrix that maps hidden states to logits."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, p: torch.Tensor) -> None:
        """The init rule for one parameter (also applied shard by shard under ZeRO-3's zero.Init)."""
        std = self.args.init_std
        if p.dim() == 1:
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.normal_(std=std / math.sqrt(2 * self.args.n_layers))
        else:
            p.normal_(std=std)

    #: How documents are kept apart when ``segment_ids`` are given ("auto", "sdpa", "flex").
    document_attention = "auto"

    def forward(self, input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states [B, T, D] after the final norm; with ``segment_ids`` [B, T] attention stays
        inside each document (see :mod:`megareweight.model.document_attention`)."""
        t = input_ids.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len {self.args.max_seq_len}")
        cos, sin = rope_tables(self.args.head_dim, t, self.args.rope_theta, input_ids.device)
        mask = None if segment_ids is None else build_document_mask(segment_ids, self.document_attention)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def logits(self, input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward(input_ids, segment_ids) @ self.output_weight.t()


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once); works on the meta device."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def build_model(args: ModelArgs, device: str | torch.device | None = None, activation_checkpointing: bool = False) -> Transformer:
    """Construct the model; ``device="meta"`` builds shapes only (parameter counts, planning)."""
    with torch.device(device or "cpu"):
        return Transformer(args, activation_checkpointing)

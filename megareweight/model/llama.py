"""LLaMA-style decoder: RMSNorm, rotary embeddings, SwiGLU, PyTorch SDPA attention.

``forward`` returns the final hidden states, not logits: the loss (``megareweight.kernels``) multiplies them with
``output_weight`` tile by tile so that the [N, V] logits never exist at once. That happens inside
:class:`LMHead`'s ``forward`` (see there why). ``logits()`` is there for evaluation and export.

Activation checkpointing (``model.activation_checkpointing``) recomputes, in backward, what a
mode selects: ``full`` every block, ``every_k`` every k-th block (k = ``model.checkpoint_every``),
``attention`` / ``ffn`` only that sub-layer (with its norm) of every block, ``none`` nothing.
Per block and token, eager bf16 training keeps tens of bytes per model dimension (SwiGLU's four
[T, ffn] bf16 tensors alone are 8 x ffn = 22 d bytes at ffn = 2.75 d; the fp32 norm and rotary
intermediates add more). ``every_k`` with k = 2 halves that memory for half the recompute of ``full``;
``attention`` saves least and recomputes least, ``ffn`` is the middle ground.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

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
        # Messages name the config keys (``model.*``): the config loader reuses these checks, so a
        # bad shape in a YAML file is reported at load time with the key to fix.
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model.{key}: must be >= 1, got {value}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads: {self.n_heads} is not divisible by model.n_kv_heads ({self.kv_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model.d_model: the head dimension d_model / n_heads = {self.d_model // self.n_heads} "
                             "must be even for rotary embeddings")

    def describe(self) -> str:
        """One line of shapes for logs (what a ``model.*`` override changed is visible at startup)."""
        heads = f"{self.n_heads} heads" + (f" ({self.kv_heads} kv)" if self.kv_heads != self.n_heads else "")
        return (f"d_model {self.d_model}, {self.n_layers} layers, {heads}, ffn {self.hidden_dim}, "
                f"vocab {self.vocab_size}, max_seq_len {self.max_seq_len}{', tied' if self.tie_embeddings else ''}")

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight``, computed in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@functools.cache
def fused(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile``: its chain of element-wise ops becomes one kernel. Built once
    per function (a cache of compiled code, shared by every module that uses it)."""
    return torch.compile(fn)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # see Transformer.fuse_elementwise_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (fused(rms_norm) if self.fused else rms_norm)(x, self.weight, self.eps)


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
        self.fused = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
        rope = fused(apply_rope) if self.fused else apply_rope
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        out = attend(q, k, v, mask, gqa=a.kv_heads != a.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.d_model, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.d_model, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.d_model, bias=False)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = fused(swiglu) if self.fused else swiglu
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


#: ``model.activation_checkpointing`` values (``true``/``false`` in a YAML mean full/none).
CHECKPOINT_MODES = ("none", "full", "every_k", "attention", "ffn")


def checkpoint_mode(value: bool | str) -> str:
    """Normalise ``true``/``false`` to ``full``/``none``; refuse anything else not in the list."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in CHECKPOINT_MODES:
        raise ValueError(f"model.activation_checkpointing: {value!r} is not allowed; allowed values: "
                         f"{', '.join(CHECKPOINT_MODES)}, true, false")
    return value


class Block(nn.Module):
    """Pre-norm residual block. ``recompute`` (None, "block", "attention", "ffn") names what
    activation checkpointing recomputes in backward; :meth:`Transformer.set_activation_checkpointing`
    sets it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args)
        self.ffn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.ffn = FeedForward(args)
        self.recompute: Optional[str] = None

    @staticmethod
    def _checkpoint(fn: Callable, *args: torch.Tensor) -> torch.Tensor:
        """Non-reentrant checkpointing: composes with torch.compile, and re-runs the sub-modules'
        forward (with ZeRO-3's gather hooks) in backward. It stops recomputing as soon as the
        tensors backward needs exist, which skips the region's last GEMM and, under ZeRO-3, is
        also what keeps the sub-module being differentiated gathered (its recomputed forward stops
        before DeepSpeed's post-forward hook would release its weight; with early stopping off,
        that weight is released under the backward that needs it)."""
        return checkpoint(fn, *args, use_reentrant=False)

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        return self.attn(self.attn_norm(x), cos, sin, mask)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.ffn_norm(x))

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        recompute = self.recompute if self.training else None
        if recompute == "attention":
            x = x + self._checkpoint(self._attention, x, cos, sin, mask)
        else:
            x = x + self._attention(x, cos, sin, mask)
        if recompute == "ffn":
            return x + self._checkpoint(self._feed_forward, x)
        return x + self._feed_forward(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        """``mask``: the document mask of :func:`build_document_mask` (``data.packing: documents``),
        or None for plain causal attention."""
        if self.training and self.recompute == "block":
            return self._checkpoint(self._forward, x, cos, sin, mask)
        return self._forward(x, cos, sin, mask)


class LMHead(nn.Module):
    """The [V, D] output matrix, and the loss that consumes it.

    Why a module whose ``forward`` computes the loss: ZeRO-3 gathers a parameter only while the
    module that owns it runs (forward, and again before its backward) and releases it afterwards;
    the fused loss uses the matrix tile by tile instead of calling ``nn.Linear``. Owning the matrix
    here lets ZeRO-3 fetch, prefetch and release it like any other layer's weight (1 GB in bf16 at
    V = 128k, D = 4096), instead of holding it through the whole forward and backward as an
    external parameter of the root module.

    Untied: owns ``weight`` (state-dict key ``lm_head.weight``, as ``nn.Linear`` had). Tied: the
    matrix is the input embedding's; it belongs to the embedding (one parameter, one state-dict
    key ``embed.weight``) and the DeepSpeed engine registers it as an external parameter of this
    module only.
    """

    def __init__(self, d_model: int, vocab_size: int, tied_embedding: Optional[nn.Embedding] = None):
        super().__init__()
        # In a tuple so that nn.Module does not register the embedding a second time.
        self._tied = (tied_embedding,) if tied_embedding is not None else ()
        if tied_embedding is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    @property
    def matrix(self) -> torch.Tensor:
        """The [V, D] matrix: ``weight``, or the tied embedding's."""
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, *, loss_fn: Callable, **loss_kwargs):
        """``loss_fn(hidden, matrix, labels, **loss_kwargs)`` (a :mod:`megareweight.kernels.weighted_ce` loss)."""
        return loss_fn(hidden, self.matrix, labels, **loss_kwargs)


class Transformer(nn.Module):
    """The decoder. ``activation_checkpointing`` (a mode of :data:`CHECKPOINT_MODES`, or a bool)
    trades recomputation for activation memory; see the module docstring."""

    def __init__(self, args: ModelArgs, activation_checkpointing: bool | str = False, checkpoint_every: int = 2):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = LMHead(args.d_model, args.vocab_size, self.embed if args.tie_embeddings else None)
        self.set_activation_checkpointing(activation_checkpointing, checkpoint_every)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, D] matrix that maps hidden states to logits."""
        return self.lm_head.matrix

    def set_activation_checkpointing(self, mode: bool | str, every: int = 2) -> None:
        """Choose what each block recomputes in backward (``every`` is k of ``every_k``)."""
        mode = checkpoint_mode(mode)
        if every < 1:
            raise ValueError(f"model.checkpoint_every must be >= 1, got {every}")
        self.activation_checkpointing = mode
        for i, block in enumerate(self.layers):
            block.recompute = {"none": None, "full": "block", "attention": "attention", "ffn": "ffn",
                               "every_k": "block" if i % every == 0 else None}[mode]

    def compile_blocks(self) -> None:
        """``torch.compile`` every block in place (state-dict keys unchanged).

        Inductor fuses what eager PyTorch runs as separate memory-bound kernels: RMSNorm (cast,
        square, mean, rsqrt, two multiplies -> one kernel), the rotary embedding (slices, four
        multiplies, concatenation -> one kernel per q/k), SwiGLU's ``silu(g) * u`` and the residual
        adds. At the 1.4b shape with 16k tokens per micro-batch ([16384, 2048] activations, 67 MB
        in bf16), an eager RMSNorm forward reads and writes about 1.2 GB (seven kernels, fp32
        intermediates) where the fused kernel moves 134 MB: ~0.35 ms against ~0.04 ms at
        3.35 TB/s, for each of the 49 norms, forward and backward again. The matmuls and SDPA stay
        cuBLAS/FlashAttention calls. All blocks share one compiled graph (same code, parameters
        are graph inputs), so compile time does not grow with depth.
        """
        for block in self.layers:
            block.compile()

    def fuse_elementwise_ops(self) -> None:
        """Compile only the parameter-free element-wise chains (RMSNorm, RoPE, SwiGLU): the
        fusion of :meth:`compile_blocks` without compiling the blocks (what ZeRO-3 needs).

        Why not whole blocks under ZeRO-3: DeepSpeed's gather/release hooks on every sub-module
        then run inside the compiled block, where they break the graph at each sub-module call
        and guard on the module's id (measured on CPU, torch 2.13 + DeepSpeed 0.19.8: 19 graph
        breaks and a recompile per layer in 4 steps of a 2-layer model). These functions have no
        parameters and no hooks: each compiles once.
        """
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, FeedForward)):
                module.fused = True

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


def build_model(args: ModelArgs, device: str | torch.device | None = None, activation_checkpointing: bool | str = False,
                checkpoint_every: int = 2) -> Transformer:
    """Construct the model; ``device="meta"`` builds shapes only (parameter counts, planning)."""
    with torch.device(device or "cpu"):
        return Transformer(args, activation_checkpointing, checkpoint_every)

"""Training engines: the part of a step that differs between plain PyTorch and DeepSpeed.

The loop (:mod:`megareweight.train.loop`) only talks to this interface: ``forward`` moves a batch
to the device and returns the reweighted loss of one micro-batch, ``backward``,
``clip_gradients`` (clip in place; the pre-clip norm as a device tensor, or None when the engine
clips inside ``step``), ``step(lr, grad_norm)`` (the update; returns the grad norm as a float),
``skip_step`` (discard gradients without touching optimizer state), ``save``/``load``.

Host syncs: nothing here reads a device value on the host. The loop reads the step's metrics and
the norm from ``clip_gradients`` in one copy (:class:`~megareweight.train.step_stats.StepStats`)
and passes the host norm to ``step``, which skips a non-finite update without a second read.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Optional

import torch

from megareweight.config import ExperimentConfig
from megareweight.model import Transformer
from megareweight.train.objective import ReweightedLM


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of ``batch`` on ``device`` (whatever the keys: ``segment_ids`` too).

    ``non_blocking``: from pinned memory (the prefetcher pins on CUDA) the copy is queued on the
    stream and the host moves on; from pageable memory it behaves like a plain copy.
    """
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def apply_compile(model: Transformer, setting: bool | str, hooks_every_module: bool) -> None:
    """``train.compile``: ``blocks``, ``ops``, or true = blocks, except ops when the engine hooks
    every sub-module (ZeRO-3, see :meth:`Transformer.fuse_elementwise_ops`)."""
    if setting is False:
        return
    mode = setting if isinstance(setting, str) else ("ops" if hooks_every_module else "blocks")
    if mode == "blocks":
        model.compile_blocks()
    else:
        model.fuse_elementwise_ops()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms' gains (1-D) get no weight decay, as in LLaMA/GPT training."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # ZeRO-3 shards built under zero.Init are 1-D and empty; ``ds_shape`` is the real shape.
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: ExperimentConfig) -> torch.optim.AdamW:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class PlainEngine:
    """One process (CPU or one GPU), fp32 weights with optional bf16/fp16 autocast."""

    name = "plain"

    def __init__(self, module: ReweightedLM, cfg: ExperimentConfig, device: torch.device):
        apply_compile(module.model, cfg.train.compile, hooks_every_module=False)
        self.module = module.to(device)
        self.cfg = cfg
        self.device = device
        self.rank, self.world_size = 0, 1
        self.optimizer = make_optimizer(self.module, cfg)
        self.grad_accum = cfg.train.gradient_accumulation_steps
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        self._autocast = (
            (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        )
        self._scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
        self._unscaled = False  # unscale_ ran this step (the scaler then needs update())

    def forward(self, batch: dict[str, torch.Tensor], strategy: str, r: float):
        batch = to_device(batch, self.device)
        with self._autocast():
            return self.module(batch["input_ids"], batch["labels"], strategy, r, segment_ids=batch.get("segment_ids"),
                           domain_ids=batch.get("domain_ids"))

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16) and clip in place; the pre-clip global norm, on the device (no sync)."""
        if self._scaler:
            self._scaler.unscale_(self.optimizer)
            self._unscaled = True
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip or float("inf"))

    def step(self, lr: float, grad_norm: Optional[float] = None) -> float:
        """The update, given the host value of :meth:`clip_gradients`' norm (read by the caller
        with its other metrics); a non-finite norm skips it. Returns the norm.

        With fp16 the GradScaler's own inf check reads the device once more (fp16 only)."""
        if grad_norm is None:  # a caller that did not clip first
            grad_norm = float(self.clip_gradients())
        if not math.isfinite(grad_norm):
            self.skip_step()
            return grad_norm
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self._scaler:
            self._scaler.step(self.optimizer)
            self._scaler.update()
            self._unscaled = False
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale (1.0 without fp16)."""
        return float(self._scaler.get_scale()) if self._scaler else 1.0

    def skip_step(self) -> None:
        """Drop the gradients; with fp16, let the scaler lower its scale after an overflow."""
        if self._scaler and self._unscaled:
            self._scaler.update()
            self._unscaled = False
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {"model": self.module.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self._scaler:  # the fp16 loss scale and its growth tracker: part of an exact resume
            state["scaler"] = self._scaler.state_dict()
        torch.save(state, directory / "engine.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location=self.device, weights_only=True)
        self.module.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self._scaler and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])

    def barrier(self) -> None:
        pass

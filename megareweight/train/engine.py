"""Training engines: the part of a step that differs between plain PyTorch and DeepSpeed.

The loop (:mod:`megareweight.train.loop`) only talks to this interface: ``forward`` returns the
reweighted loss of one micro-batch, ``backward``, ``step`` (clip + optimizer, returns the grad
norm), ``skip_step`` (discard gradients without touching optimizer state), ``save``/``load``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from megareweight.config import ExperimentConfig
from megareweight.train.objective import ReweightedLM


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

    def forward(self, batch: dict[str, torch.Tensor], strategy: str, r: float):
        with self._autocast():
            return self.module(batch["input_ids"].to(self.device), batch["labels"].to(self.device), strategy, r)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def step(self, lr: float) -> torch.Tensor:
        """Clip, check the gradients are finite, step. Returns the pre-clip grad norm (device).

        A non-finite norm skips the update. Under fp16 ``scaler.update()`` runs on every step,
        skipped or not: it lowers the scale after an overflow (``unscale_`` recorded the inf/NaN)
        and resets the scaler's per-step "already unscaled" record; skipping it made the next step
        fail with "unscale_() has already been called".
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self._scaler:
            self._scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if torch.isfinite(norm):
            if self._scaler:
                self._scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self._scaler:
            self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale (1.0 without fp16)."""
        return float(self._scaler.get_scale()) if self._scaler else 1.0

    def skip_step(self) -> None:
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

"""The model and its reweighted loss as one module.

Computing the loss inside a module's ``forward`` matters for ZeRO-3: parameters are only gathered
while the module that owns them runs, and the LM-head matrix is consumed by the loss (tile by
tile), not by an ``nn.Linear`` call. So the loss runs in :class:`megareweight.model.llama.LMHead`'s
forward, the module that owns the matrix; ``hidden`` and ``labels`` are passed positionally there
because DeepSpeed's backward hooks only see positional inputs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megareweight.model import Transformer

IGNORE_INDEX = -100


class ReweightedLM(nn.Module):
    """``forward(input_ids, labels, strategy, r)`` -> ``(loss, per_sample_loss, weights)``."""

    def __init__(self, model: Transformer, loss_fn: Callable, delta: float = 1.0, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.delta = delta
        self.group = group

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, strategy: str = "uniform", r: float = 1.0):
        hidden = self.model(input_ids)
        return self.model.lm_head(
            hidden,
            labels,
            loss_fn=self.loss_fn,
            strategy=strategy,
            r=r,
            delta=self.delta,
            ignore_index=IGNORE_INDEX,
            group=self.group,
        )


"""The model and its reweighted loss as one module.

Computing the loss inside a module's ``forward`` matters for ZeRO-3: parameters are only gathered
while the module that owns them runs, and the LM-head matrix is consumed by the loss (tile by
tile), not by an ``nn.Linear`` call. So the loss runs in :class:`megareweight.model.llama.LMHead`'s
forward, the module that owns the matrix; ``hidden`` and ``labels`` are passed positionally there
because DeepSpeed's backward hooks only see positional inputs.

With ``segment_ids`` (``data.packing: documents``) attention stays inside each document. With
``num_segments`` set (``reweight.unit: document``) each document of a window is its own sample of
the fused loss, in training only: a fixed number of samples per window (documents past the cap
share the last one) so every rank all-gathers tensors of one shape; samples without tokens get
weight 0. Evaluation keeps one sample per window, so validation losses mean the same thing
whatever the reweighting unit.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megareweight.data.mixture import IGNORE_INDEX
from megareweight.model import Transformer
from megareweight.reweighting.strategies import PRIOR_STRATEGIES


class ReweightedLM(nn.Module):
    """``forward(input_ids, labels, strategy, r)`` -> ``(loss, per_sample_loss, weights)``."""

    def __init__(self, model: Transformer, loss_fn: Callable, delta: float = 1.0, group: Optional[dist.ProcessGroup] = None,
                 num_segments: Optional[int] = None, domain_weights: Optional[list[float]] = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.delta = delta
        self.group = group
        self.num_segments = num_segments
        if domain_weights is not None:
            # log c_d per domain id (the sampler's order), on the module's device without a copy per
            # step; not persistent: a config value, not a model parameter (checkpoints stay the same)
            self.register_buffer("domain_log_weights", torch.log(torch.tensor(domain_weights, dtype=torch.float32)),
                                 persistent=False)
        else:
            self.domain_log_weights = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, strategy: str = "uniform", r: float = 1.0,
                segment_ids: Optional[torch.Tensor] = None, domain_ids: Optional[torch.Tensor] = None):
        hidden = self.model(input_ids, segment_ids)
        per_document = {}
        if segment_ids is not None and self.num_segments and self.training:
            per_document = {"segment_ids": segment_ids.clamp(max=self.num_segments - 1), "num_segments": self.num_segments}
        if strategy in PRIOR_STRATEGIES:
            per_document["sample_log_prior"] = self._sample_log_prior(domain_ids, "num_segments" in per_document)
        return self.model.lm_head(
            hidden,
            labels,
            loss_fn=self.loss_fn,
            strategy=strategy,
            r=r,
            delta=self.delta,
            ignore_index=IGNORE_INDEX,
            group=self.group,
            **per_document,
        )

    def _sample_log_prior(self, domain_ids: Optional[torch.Tensor], per_document: bool) -> torch.Tensor:
        """log c_d of every loss sample: one per row, or ``num_segments`` per row."""
        if self.domain_log_weights is None or domain_ids is None:
            raise ValueError("reweight.strategy: domain needs reweight.domain_weights and the batch's domain ids")
        prior = self.domain_log_weights[domain_ids.to(self.domain_log_weights.device).long()]
        return prior.repeat_interleave(self.num_segments) if per_document else prior


def per_sample_domains(batch: dict[str, torch.Tensor], num_segments: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Domain of every loss sample, and which samples hold a token (None: all of them).

    One sample per row, or ``num_segments`` per row with per-document samples (row-major, as
    :func:`megareweight.kernels.weighted_ce.reference.sample_index` numbers them).
    """
    if not num_segments or "segment_ids" not in batch:
        return batch["domain_ids"], None
    b = batch["labels"].shape[0]
    seg = batch["segment_ids"].clamp(max=num_segments - 1).long()
    index = (torch.arange(b)[:, None] * num_segments + seg).reshape(-1)
    counts = torch.zeros(b * num_segments).index_add_(0, index, (batch["labels"] != IGNORE_INDEX).reshape(-1).float())
    return batch["domain_ids"].repeat_interleave(num_segments), counts > 0


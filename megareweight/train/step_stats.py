"""One optimizer step's metrics, accumulated over micro-batches and reduced over ranks.

Per-domain sums travel in one float64 tensor so a single all-reduce covers them all:
``[loss sum per domain | valid samples per domain | weight share per domain | non-finite count]``.
Weight statistics (min, max, entropy, ESS) are computed on the global weights, which every rank
holds, and averaged over the step's micro-batches.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from megareweight.reweighting import weight_statistics
from megareweight.train.distributed import all_reduce_sum

WEIGHT_STATS = ("min", "max", "entropy", "ess")


class StepStats:
    def __init__(self, domains: Sequence[str], rank: int, micro_batches: int):
        self.domains = list(domains)
        self.rank = rank
        self.micro_batches = micro_batches
        n = len(self.domains)
        self._sums = torch.zeros(3 * n + 1, dtype=torch.float64)
        self._weights = {k: 0.0 for k in WEIGHT_STATS}

    def add(self, out, domain_ids: torch.Tensor) -> None:
        """Fold in one micro-batch: ``out`` is the loss path's ``(loss, per_sample_loss, weights)``."""
        n = len(self.domains)
        losses = out.per_sample_loss.detach().double().cpu()
        ok = torch.isfinite(losses)
        lo = self.rank * domain_ids.shape[0]
        local_w = out.weights[lo : lo + domain_ids.shape[0]].detach().double().cpu()
        self._sums[:n].index_add_(0, domain_ids, torch.where(ok, losses, torch.zeros_like(losses)))
        self._sums[n : 2 * n].index_add_(0, domain_ids, ok.double())
        self._sums[2 * n : 3 * n].index_add_(0, domain_ids, local_w)
        self._sums[-1] += (~ok).sum()
        # Valid samples are exactly those with a positive weight (a softmax never yields 0).
        stats = weight_statistics(out.weights, out.weights > 0)
        for key in WEIGHT_STATS:
            self._weights[key] += float(stats[key]) / self.micro_batches

    def all_reduce(self, device: torch.device) -> None:
        self._sums = all_reduce_sum(self._sums.to(device)).cpu()

    @property
    def valid_samples(self) -> int:
        n = len(self.domains)
        return int(self._sums[n : 2 * n].sum())

    def row(self) -> dict[str, Any]:
        """Metrics for ``metrics.jsonl``: mean per-sample loss (overall and per domain), weights."""
        n = len(self.domains)
        loss_sum, count, share = self._sums[:n], self._sums[n : 2 * n], self._sums[2 * n : 3 * n]
        valid = float(count.sum())
        row: dict[str, Any] = {
            "loss": float(loss_sum.sum() / valid) if valid else float("nan"),
            "nonfinite_samples": int(self._sums[-1]),
        }
        row.update({f"weight_{k}": v for k, v in self._weights.items()})
        row.update({f"loss/{d}": float(loss_sum[i] / count[i]) for i, d in enumerate(self.domains) if count[i] > 0})
        row.update({f"weight_share/{d}": float(share[i] / self.micro_batches) for i, d in enumerate(self.domains)})
        return row

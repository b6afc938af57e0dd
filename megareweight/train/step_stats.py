"""One optimizer step's metrics, accumulated over micro-batches and reduced over ranks.

Per-domain sums travel in one float64 tensor so a single all-reduce covers them all:
``[loss sum | valid samples | weight share | z-loss sum (each per domain) | non-finite count]``.
Weight statistics (min, max, entropy, ESS) are computed on the global weights, which every rank
holds, and averaged over the step's micro-batches. Everything stays on the loss's device until
:meth:`all_reduce`, which copies the reduced sums, the weight statistics and the engine's gradient
norm to the host in **one** device-to-host read: the step's only host sync (the loop needs these
numbers to decide whether to apply the update). Nothing else in a step reads the device.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from megareweight.reweighting import weight_statistics
from megareweight.train.distributed import all_reduce_sum

WEIGHT_STATS = ("min", "max", "entropy", "ess")


class StepStats:
    def __init__(self, domains: Sequence[str], rank: int, micro_batches: int):
        self.domains = list(domains)
        self.rank = rank
        self.micro_batches = micro_batches
        self._sums: Optional[torch.Tensor] = None  # created on the loss's device by the first add()
        self._weights: Optional[torch.Tensor] = None
        self._host: Optional[torch.Tensor] = None  # sums | weight stats (| grad norm), on the CPU
        self.grad_norm: Optional[float] = None  # the engine's pre-clip norm, when it gave one
        self._has_z = False  # the loss returned a z-loss (loss.z_loss > 0)

    def add(self, out, domain_ids: torch.Tensor, present: Optional[torch.Tensor] = None) -> None:
        """Fold in one micro-batch: ``out`` is the loss path's ``(loss, per_sample_loss, weights)``.

        ``present`` marks the samples that exist (per-document samples: a window has fewer
        documents than sample slots); an absent sample's NaN loss is not counted as non-finite.
        """
        n = len(self.domains)
        device = out.weights.device
        if self._sums is None:
            self._sums = torch.zeros(4 * n + 1, dtype=torch.float64, device=device)
            self._weights = torch.zeros(len(WEIGHT_STATS), dtype=torch.float64, device=device)
        dom = domain_ids.to(device, non_blocking=True)
        losses = out.per_sample_loss.detach().double()
        ok = torch.isfinite(losses)
        lo = self.rank * dom.shape[0]
        local_w = out.weights[lo : lo + dom.shape[0]].detach().double()
        self._sums[:n].index_add_(0, dom, torch.where(ok, losses, torch.zeros_like(losses)))
        self._sums[n : 2 * n].index_add_(0, dom, ok.double())
        self._sums[2 * n : 3 * n].index_add_(0, dom, local_w)
        z = getattr(out, "z_loss", None)
        if z is not None:
            self._has_z = True
            z = z.detach().double()
            self._sums[3 * n : 4 * n].index_add_(0, dom, torch.where(torch.isfinite(z), z, torch.zeros_like(z)))
        self._sums[-1] += (~ok if present is None else ~ok & present.to(device)).sum()
        # Valid samples are exactly those with a positive weight (a softmax never yields 0).
        stats = weight_statistics(out.weights, out.weights > 0)
        self._weights += torch.stack([stats[k].double() for k in WEIGHT_STATS]) / self.micro_batches

    def all_reduce(self, grad_norm: Optional[torch.Tensor] = None) -> None:
        """Sum the per-domain tensor over data-parallel ranks (the weight statistics are global),
        then read it, the weight statistics and ``grad_norm`` (a device scalar) in one copy."""
        all_reduce_sum(self._sums)
        parts = [self._sums, self._weights]
        if grad_norm is not None:
            parts.append(grad_norm.detach().reshape(1).to(self._sums.device, torch.float64))
        self._host = torch.cat(parts).cpu()  # the step's one host sync
        if grad_norm is not None:
            self.grad_norm = float(self._host[-1])

    @property
    def valid_samples(self) -> int:
        n = len(self.domains)
        return int(self._host[n : 2 * n].sum())

    def row(self) -> dict[str, Any]:
        """Metrics for ``metrics.jsonl``: mean per-sample loss (overall and per domain), weights."""
        n = len(self.domains)
        sums, weight_stats = self._host[: 4 * n + 1], self._host[4 * n + 1 : 4 * n + 1 + len(WEIGHT_STATS)]
        loss_sum, count, share, z_sum = sums[:n], sums[n : 2 * n], sums[2 * n : 3 * n], sums[3 * n : 4 * n]
        valid = float(count.sum())
        row: dict[str, Any] = {
            "loss": float(loss_sum.sum() / valid) if valid else float("nan"),
            "nonfinite_samples": int(sums[-1]),
        }
        row.update({f"weight_{k}": float(v) for k, v in zip(WEIGHT_STATS, weight_stats)})
        row.update({f"loss/{d}": float(loss_sum[i] / count[i]) for i, d in enumerate(self.domains) if count[i] > 0})
        row.update({f"weight_share/{d}": float(share[i] / self.micro_batches) for i, d in enumerate(self.domains)})
        if self._has_z:  # the z-loss on its own (``loss`` stays the cross-entropy): mean per sample
            row["z_loss"] = float(z_sum.sum() / valid) if valid else float("nan")
            row.update({f"z_loss/{d}": float(z_sum[i] / count[i]) for i, d in enumerate(self.domains) if count[i] > 0})
        return row

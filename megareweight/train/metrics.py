"""Step and evaluation metrics -> ``metrics.jsonl`` / ``eval.jsonl`` and wandb (rank 0 only).

wandb is offline unless the config says ``online``; ``disabled`` turns it off entirely. The JSONL
files are the source of truth for reports and tests; wandb mirrors them for dashboards.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from megareweight.config import ExperimentConfig


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop rows with ``step > after_step`` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
    path.write_text("".join(r + "\n" for r in rows))


def _histogram(values: Any, bins: int = 32) -> tuple:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr) & (arr > 0)]  # weight 0 marks an excluded sample
    return np.histogram(arr if arr.size else np.zeros(1), bins=bins)


class MetricsLogger:
    """Writes metrics; a no-op on ranks other than 0."""

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.run = None
        if not enabled:
            return
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.eval_path = self.out_dir / "eval.jsonl"
        if resume_step is None:
            for path in (self.metrics_path, self.eval_path):
                path.unlink(missing_ok=True)
        else:
            truncate_jsonl(self.metrics_path, resume_step)
            truncate_jsonl(self.eval_path, resume_step)
        if cfg.wandb.mode != "disabled":
            self.run = self._init_wandb(cfg)

    def _init_wandb(self, cfg: ExperimentConfig):
        import wandb

        wdir = Path(cfg.wandb.dir) if cfg.wandb.dir else self.out_dir
        wdir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or self.out_dir.name,
            dir=str(wdir),
            mode=cfg.wandb.mode,
            config=cfg.to_dict(),
            reinit="finish_previous",
        )

    def _write(self, path: Path, row: dict[str, Any]) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def log_step(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write(self.metrics_path, row)
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_histogram(self, step: int, name: str, values: Any) -> None:
        """A distribution (e.g. this step's instance weights) as a wandb histogram panel."""
        if not self.enabled or self.run is None:
            return
        import wandb

        self.run.log({f"train/{name}": wandb.Histogram(np_histogram=_histogram(values))}, step=step)

    def log_eval(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write(self.eval_path, row)
        if self.run is not None:
            self.run.log({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.run is not None:
            import wandb

            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.run.finish()
            self.run = None
            # finish() can return before the background service has flushed the offline run file;
            # tearing the service down waits for it, so the file is complete when train() returns.
            wandb.teardown()

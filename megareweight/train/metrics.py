"""Step and evaluation metrics -> ``metrics.jsonl`` / ``eval.jsonl`` and wandb (rank 0 only).

wandb is offline unless the config says ``online``; ``disabled`` turns it off entirely. The JSONL
files are the source of truth for reports and tests; wandb mirrors them for dashboards.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from megareweight.config import ConfigError, ExperimentConfig


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a line that is not a JSON row is dropped with a warning.

    The usual culprit is a torn last line (the disk filled up or the job was killed in the middle
    of a write); a resumed run rewrites every row after its checkpoint anyway, so dropping it
    loses nothing, whereas refusing would block ``--resume`` until the file is edited by hand.
    """
    rows = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            where = "its last line" if number == len(lines) else f"line {number}"
            warnings.warn(f"{path}: dropping {where}, which is not a complete JSON row (torn write?)")
    return rows


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop rows with ``step > after_step`` (a resumed run rewrites them) and unreadable lines."""
    if not path.is_file():
        return
    rows = [row for row in read_jsonl(path) if row["step"] <= after_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _histogram(values: Any, bins: int = 32) -> tuple:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr) & (arr > 0)]  # weight 0 marks an excluded sample
    return np.histogram(arr if arr.size else np.zeros(1), bins=bins)


def check_wandb_dir(cfg: ExperimentConfig) -> None:
    """Create ``wandb.dir`` now, before the run starts, or refuse it naming the key.

    Why here: ``wandb.init`` meets a file at that path only after the model is built and the run
    directory taken, and fails with "[Errno 17] File exists" naming neither key nor path.
    """
    if cfg.wandb.mode == "disabled" or not cfg.wandb.dir:
        return
    path = Path(cfg.wandb.dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"wandb.dir: {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"wandb.dir: cannot create the directory {path} ({exc.strerror})") from None


def close_wandb_quietly(exit_code: int = 1) -> None:
    """Finish this process's open wandb run on an error path, printing nothing.

    Why: when training fails because the disk is full (a checkpoint write hit ENOSPC), wandb's own
    log file (``debug.log``) cannot be written either. Left open, the run is finished by wandb's
    exit hook, and every line it logs then prints Python's "--- Logging error ---" with two
    tracebacks, followed by socket errors of its dropped service, after our one-line error. So the
    run is finished here, before the one-line error: wandb's file handler is closed first (what
    it would write may be what failed), its output is discarded, and any error of its own is
    dropped; ``metrics.jsonl`` and the checkpoints are the record of the run, not wandb.
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    log = logging.getLogger("wandb")
    for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(handler)
        with contextlib.suppress(Exception):
            handler.close()
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        with contextlib.suppress(Exception):
            run.finish(exit_code=exit_code)
        with contextlib.suppress(Exception):
            wandb.teardown()


class MetricsLogger:
    """Writes metrics; a no-op on ranks other than 0."""

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, enabled: bool = True, resume_step: Optional[int] = None,
                 wandb_id: Optional[str] = None):
        self.enabled = enabled
        self.wandb_id = wandb_id
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
            # The id comes from the run directory's run.json: a resumed run continues the same
            # wandb run (wandb keeps the first value logged at a step, which an exact resume
            # reproduces anyway).
            id=self.wandb_id,
            resume="allow" if self.wandb_id else None,
            allow_val_change=True,  # a resume may change some config keys (README: Reliability)
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

    def eval_row(self, step: int) -> Optional[dict[str, Any]]:
        """The evaluation row already logged at ``step`` (a resumed, finished run reuses it)."""
        if not self.enabled or not self.eval_path.is_file():
            return None
        return next((row for row in read_jsonl(self.eval_path) if row["step"] == step), None)

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

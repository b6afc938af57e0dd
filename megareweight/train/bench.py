"""One row of the training benchmark from a finished run (the Python half of ``launch/bench_gpu.sh``).

``python -m megareweight.train.bench RUN_DIR --warmup 10 --results-dir launch/results --command CMD``
reads the run's ``metrics.jsonl``, ``summary.json`` and ``config.yaml`` and writes (or replaces)
its row in ``<results-dir>/<device>/train_bench.json`` (``<device>``: the GPU name as
``torch.cuda.get_device_name`` gives it, lower-cased, e.g. ``nvidia-h100-80gb-hbm3``; ``cpu``).

Measured, not estimated: tokens/s is the total tokens of the logged steps after ``--warmup``
divided by their total step time (each logged row gives its interval's tokens and tokens/s, so any
``train.log_interval`` works). The first steps carry compilation, allocator growth and ZeRO-3's
trace recording; they are skipped. MFU uses the run's own FLOPs per token and peak (its
``summary.json``, the numbers the trainer logged with); it is null when the peak was unknown.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

#: A row is replaced, not appended, when a run has the same values for these.
SETUP_KEYS = ("size", "seq_len", "micro_batch_size", "gradient_accumulation_steps", "world_size", "loss_impl",
              "activation_checkpointing", "compile")


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def bench_row(run_dir: str | Path, warmup: int, command: str) -> dict[str, Any]:
    """The benchmark row of a finished run (see the module docstring)."""
    run = Path(run_dir)
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: is {run} a finished training run?")
    rows = _read_json_lines(run / "metrics.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    missing = [k for k in ("device", "world_size", "flops_per_token", "loss_impl", "engine") if k not in summary]
    if missing:
        raise ValueError(f"{run / 'summary.json'} has no {missing[0]!r} (written by an older version?)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    timed = [(prev, row) for prev, row in zip([None, *rows], rows) if row["step"] > warmup and "tokens_per_s" in row]
    if not timed:
        raise ValueError(f"{run / 'metrics.jsonl'}: no logged step after the {warmup} warm-up steps "
                         f"(last step {rows[-1]['step'] if rows else 0}); run more steps or lower --warmup")
    tokens = seconds = 0.0
    for prev, row in timed:
        interval_tokens = row["tokens"] - (prev["tokens"] if prev else 0)
        tokens += interval_tokens
        seconds += interval_tokens / row["tokens_per_s"]
    tokens_per_s = tokens / seconds
    world = int(summary["world_size"])
    tflops = tokens_per_s * summary["flops_per_token"] / world / 1e12
    peak: Optional[float] = summary.get("peak_tflops")
    memory = [row["max_memory_gib"] for _, row in timed if "max_memory_gib" in row]
    model, data, train = cfg["model"], cfg["data"], cfg["train"]
    checkpointing = model["activation_checkpointing"]
    if checkpointing == "every_k":
        checkpointing = f"every_k:{model.get('checkpoint_every') or 2}"
    return {
        "device": summary["device"],
        "size": model["size"],
        "seq_len": data["seq_len"],
        "micro_batch_size": data["micro_batch_size"],
        "gradient_accumulation_steps": train["gradient_accumulation_steps"],
        "world_size": world,
        "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops": _significant(tflops),
        "peak_tflops": peak,
        "mfu": _significant(tflops / peak) if peak else None,
        "max_memory_gib": round(max(memory), 2) if memory else None,
        "loss_impl": summary["loss_impl"],
        "activation_checkpointing": checkpointing,
        "compile": train["compile"],
        "precision": train["precision"],
        "engine": summary["engine"],
        "timed_steps": f"{timed[0][1]['step']}-{timed[-1][1]['step']}",
        "command": command,
    }


def device_slug(device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (a directory name)."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def write_row(results_dir: str | Path, row: dict[str, Any]) -> Path:
    """Add ``row`` to ``<results_dir>/<device>/train_bench.json``, replacing the same setup's row."""
    path = Path(results_dir) / device_slug(row["device"]) / "train_bench.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if any(r.get(k) != row[k] for k in SETUP_KEYS)] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megareweight.train.bench", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a finished `megareweight train` output directory")
    parser.add_argument("--warmup", type=int, default=10, help="logged steps to skip (default 10)")
    parser.add_argument("--results-dir", default="launch/results", help="where <device>/train_bench.json goes")
    parser.add_argument("--command", default="", help="the command that produced the run (recorded in the row)")
    args = parser.parse_args(argv)
    try:
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        row = bench_row(args.run_dir, args.warmup, args.command)
        path = write_row(args.results_dir, row)
    except (OSError, ValueError) as exc:
        print(f"megareweight: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(row))
    print(f"[megareweight] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mix run``: train a plan's runs here one after another, or print their commands for a cluster.

A run whose ``summary.json`` exists for the very config planned is skipped; a started one resumes
from its last checkpoint; one finished with another config is an error (delete it to retrain).
Training in this process uses one rank, so a plan made for more ranks is refused here: its runs
must be launched with that many ranks (``--print-commands --launcher 'deepspeed ...'``).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Callable, Optional

from megareweight.autoscale.files import WorkflowError
from megareweight.autoscale.measure import same_config
from megareweight.autoscale.plan import load_plan
from megareweight.config import load_config


def run_status(plan_dir: str | Path, run: dict[str, Any]) -> str:
    """``"done"`` (summary for this very config), ``"partial"`` (started) or ``"todo"``."""
    root = Path(plan_dir)
    out = root / run["out"]
    if (out / "summary.json").is_file():
        cfg = load_config(root / run["config"])
        if not same_config(out / "config.yaml", cfg):
            raise WorkflowError(f"{out}: finished with a different config than {root / run['config']}; "
                                "delete that run directory to retrain it")
        return "done"
    return "partial" if out.exists() else "todo"


def run_commands(plan_dir: str | Path, launcher: str = "megareweight train", only_pending: bool = True) -> list[str]:
    """One shell command per run (pending ones only by default), for a cluster or by hand."""
    root = Path(plan_dir)
    plan = load_plan(root)
    cmds = []
    for run in plan["runs"]:
        if only_pending and run_status(root, run) == "done":
            continue
        cmds.append(f"{launcher} --config {shlex.quote(str(root / run['config']))} "
                    f"--out {shlex.quote(str(root / run['out']))} --resume")
    return cmds


def run_plan(plan_dir: str | Path, progress: bool = True,
             train_fn: Optional[Callable[..., Any]] = None) -> dict[str, str]:
    """Train every run of the plan in order; finished runs are skipped, partial ones resumed.

    Returns ``{run name: "skipped" | "trained"}``.
    """
    root = Path(plan_dir)
    plan = load_plan(root)
    if plan["world_size"] != 1:
        raise WorkflowError(f"{root}: the plan is for world size {plan['world_size']}, `mix run` trains on one rank; "
                            "launch the runs with `mix run DIR --print-commands --launcher '<your launcher>'`")
    if train_fn is None:
        from megareweight.train.loop import train as train_fn
    result = {}
    for k, run in enumerate(plan["runs"], 1):
        status = run_status(root, run)
        if status == "done":
            if progress:
                print(f"[mix] {k}/{len(plan['runs'])} {run['name']}: finished earlier, skipped")
            result[run["name"]] = "skipped"
            continue
        cfg = load_config(root / run["config"])
        if progress:
            verb = "resuming" if status == "partial" else "training"
            print(f"[mix] {k}/{len(plan['runs'])} {run['name']}: {verb} {run['steps']} steps, {run['tokens']:,} tokens")
        train_fn(cfg, root / run["out"], resume=True, progress=progress)
        result[run["name"]] = "trained"
    return result

"""Atomic checkpoints: write into a temporary directory, rename it, then update ``latest``.

A crash at any moment leaves either the previous complete checkpoint or the new one; a directory
without the ``COMPLETE`` marker (half-written) is never pointed at and is skipped with a warning.
Layout: ``<out>/checkpoints/step_00000100/{engine files, trainer_state.json, COMPLETE}`` and
``<out>/checkpoints/latest`` holding the directory name.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "trainer_state.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path, step: int, state: dict[str, Any], write_engine: Callable[[Path], None], is_writer: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Save trainer ``state`` (JSON) plus whatever ``write_engine(dir)`` writes.

    In a distributed run every rank calls this (DeepSpeed saves shards from all ranks);
    ``is_writer`` marks the one rank that renames and updates ``latest``.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp_{name}"
    if is_writer and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    write_engine(tmp)
    barrier()
    if is_writer:
        _atomic_write_text(tmp / STATE, json.dumps(state))
        (tmp / COMPLETE).touch()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, name)
    barrier()
    return final


def find_latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint, or None. Half-written ones are skipped with a warning."""
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            return candidate
        warnings.warn(f"{pointer} names {candidate.name}, which is incomplete; looking for an older checkpoint")
    for candidate in sorted(root.glob("step_*"), reverse=True):
        if (candidate / COMPLETE).is_file():
            return candidate
        warnings.warn(f"ignoring incomplete checkpoint {candidate}")
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE).read_text())


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

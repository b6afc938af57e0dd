"""Atomic, verifiable checkpoints, and the rules that keep a good one on disk.

Layout of ``<out>/checkpoints/``::

    step_00000100/            engine files, trainer_state.json, tokenizer.model, COMPLETE
    latest                    the newest regular checkpoint's name (for people and tools)
    nonfinite_step_00000305/  the state at a stop caused by repeated non-finite steps
    retired/<time>_after_step_00000100/step_*   checkpoints newer than the one a resume started from

**Writing.** Everything goes into ``.tmp_<name>``; then ``COMPLETE`` is written (a JSON manifest
of every file, its size and its xxh3_128 checksum; written last, so a checkpoint without it is
incomplete), the directory is renamed, and ``latest`` is updated. A crash at any
moment leaves the previous checkpoints and, at most, a temporary directory that nothing reads.
A failed write (disk full, quota) removes its temporary directory and raises
:class:`CheckpointWriteError`; the previous checkpoints are untouched.

**Reading.** :func:`find_latest` returns the newest regular checkpoint that :func:`problem` finds
intact: ``COMPLETE`` present, every file of the size that was written (a truncated ``engine.pt``
or DeepSpeed shard, a missing file), ``trainer_state.json`` valid, and, with ``content=True``,
every file's checksum as written (a flipped bit keeps the size). A damaged one is skipped with a
warning naming the reason, and the previous one is used. Only the checkpoint about to be loaded
(resume, ``eval``, ``export``) is hashed; pruning and listings check sizes only. Hashing costs
0.5-0.8 s per GiB of checkpoint on one CPU core (:mod:`~megareweight.train.checksums`), at save
(by the writing rank, over every rank's files) and at load, plus reading the files from disk:
tens of seconds for a 7B run's ~80 GB of ZeRO shards, against a silent resume of corrupted
weights or optimizer moments. Checkpoints written before checksums load with a warning and are
checked by size only.

**What is never lost.**

* Non-finite parameters are never saved (:func:`parameters_finite`, checked on every rank).
* A stop after ``train.max_nonfinite_steps`` non-finite steps writes ``nonfinite_step_*``: outside
  the ``step_*`` namespace, so ``latest``, ``--resume`` and pruning never see it. A plain
  ``--resume`` goes back to the last regular checkpoint (what a retry with a lower learning rate
  wants; retries can never prune the pre-divergence checkpoints away), and ``--resume-from`` the
  stop checkpoint continues after the bad batches (what bad data wants).
* :func:`prune` keeps the newest ``keep`` intact regular checkpoints and never the one just written.
* A resume from a checkpoint older than the newest moves the newer ones to ``retired/``
  (:func:`retire_newer`) instead of letting the new continuation mix with them: pruning by step
  would otherwise delete the new continuation's checkpoints and keep the abandoned ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from megareweight.json_files import write_text_atomic
from megareweight.train.checksums import ALGORITHM, file_digest

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "trainer_state.json"
REGULAR, NONFINITE = "step", "nonfinite_step"
RETIRED = "retired"
_NAME = re.compile(r"^(step|nonfinite_step)_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used (damaged, missing, not ours); the message names it (exit code 2)."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); the previous ones are intact (exit code 1)."""


def checkpoint_name(step: int, kind: str = REGULAR) -> str:
    return f"{kind}_{step:08d}"


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected step_NNNNNNNN)")
    return int(match.group(2))


def _manifest(directory: Path) -> dict[str, Any]:
    """``COMPLETE``'s content: every file's size and checksum (relative paths, ZeRO shards included)."""
    files = [p for p in sorted(directory.rglob("*")) if p.is_file()]
    return {"files": {str(p.relative_to(directory)): p.stat().st_size for p in files},
            ALGORITHM: {str(p.relative_to(directory)): file_digest(p) for p in files}}


def _describe(exc: BaseException, root: Path) -> str:
    """One line: the OS reason, plus the free space when it may be the cause."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = f"{exc.strerror}: {exc.filename}"
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        free = shutil.disk_usage(root).free / 2**20
        reason += f" ({free:,.0f} MiB free on that file system)"
    except OSError:
        pass
    return reason


def save_checkpoint(
    root: Path,
    step: int,
    state: dict[str, Any],
    write_engine: Callable[[Path], None],
    is_writer: bool = True,
    all_ok: Callable[[bool], bool] = lambda ok: ok,
    kind: str = REGULAR,
    extra_files: Iterable[tuple[str, Path]] = (),
) -> Path:
    """Save trainer ``state`` (JSON), ``extra_files`` and whatever ``write_engine(dir)`` writes.

    In a distributed run every rank calls this (DeepSpeed saves shards from all ranks);
    ``is_writer`` marks the one rank that writes the state, renames and updates ``latest``.
    ``all_ok(ok)`` is a collective AND over ranks (it doubles as the barrier between phases), so a
    failure on any rank makes every rank raise :class:`CheckpointWriteError` instead of hanging.
    Only regular checkpoints move ``latest``.
    """
    root = Path(root)
    name = checkpoint_name(step, kind)
    final, tmp = root / name, root / f".tmp_{name}"
    error: Optional[BaseException] = None

    def phase(action: Callable[[], None], run_here: bool = True) -> None:
        nonlocal error
        if run_here:
            try:
                action()
            except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
                error = exc
        if not all_ok(error is None):
            if is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            where = _describe(error, root) if error is not None else "failed on another rank"
            newest = find_latest(root, warn=False)
            kept = f"the newest intact checkpoint is {newest.name}" if newest else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"writing checkpoint {final} failed: {where}; {kept}")

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def commit() -> None:
        write_text_atomic(tmp / STATE, json.dumps(state), durable=True)
        for filename, source in extra_files:
            shutil.copyfile(source, tmp / filename)
        write_text_atomic(tmp / COMPLETE, json.dumps({"step": step, **_manifest(tmp)}), durable=True)
        old = root / f".old_{name}"
        if final.exists():  # the same step written again (e.g. a second stop at the same step)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if kind == REGULAR:
            write_text_atomic(root / LATEST, name, durable=True)

    phase(prepare, is_writer)
    phase(lambda: write_engine(tmp))
    phase(commit, is_writer)
    return final


_WARNED_UNCHECKED: set[str] = set()
#: Checkpoints whose checksums matched in this process, keyed by every file's (size, mtime): eval
#: and export resolve the same checkpoint twice (weights, tokenizer); the second time is free.
_VERIFIED: set[tuple] = set()


def problem(ckpt: Path, content: bool = False) -> Optional[str]:
    """Why ``ckpt`` cannot be resumed from, or None when it is intact.

    ``content``: also compare every file's checksum with the one written at save time (reads
    every byte; for the checkpoint about to be loaded). A checkpoint written before checksums
    passes on sizes alone, with one warning per checkpoint and process.
    """
    ckpt = Path(ckpt)
    marker = ckpt / COMPLETE
    if not marker.is_file():
        return "incomplete (no COMPLETE marker: its write was interrupted)"
    try:
        text = marker.read_text()
        manifest = json.loads(text) if text.strip() else {}  # empty: written before manifests existed
    except (OSError, ValueError):
        return f"{COMPLETE} is damaged"
    for rel, size in manifest.get("files", {}).items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes but {size} were written (truncated or modified)"
    if content:
        reason = _content_problem(ckpt, manifest)
        if reason is not None:
            return reason
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError):
        return f"{STATE} is missing or not valid JSON"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE} has no step"
    return None


def _content_problem(ckpt: Path, manifest: dict[str, Any]) -> Optional[str]:
    """The first file whose checksum differs from the one ``COMPLETE`` recorded, or None."""
    sums = manifest.get(ALGORITHM)
    if not isinstance(sums, dict):
        if str(ckpt) not in _WARNED_UNCHECKED:
            _WARNED_UNCHECKED.add(str(ckpt))
            warnings.warn(f"{ckpt}: written before checkpoints carried checksums; checked by file sizes only")
        return None
    files = sorted(manifest.get("files", {}))
    key = (str(ckpt.resolve()), *((rel, (ckpt / rel).stat().st_size, (ckpt / rel).stat().st_mtime_ns) for rel in files))
    if key in _VERIFIED:
        return None
    for rel in files:
        expected = sums.get(rel)
        if expected is None:
            return f"{rel} has no checksum in {COMPLETE} ({COMPLETE} was modified)"
        if file_digest(ckpt / rel) != expected:
            return (f"{rel} {ALGORITHM} checksum mismatch (its content changed after it was written: "
                    "disk or copy corruption, or an edit)")
    _VERIFIED.add(key)
    return None


def regular_checkpoints(root: Path) -> list[Path]:
    """``step_*`` directories, oldest first (intact or not)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and _NAME.match(p.name) and p.name.startswith("step_")]
    return sorted(found, key=step_of)


def scan(root: Path, warn: bool = True, content: bool = False) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """(the newest intact regular checkpoint or None, the newer damaged ones with their reasons).

    Newest by step, not by the ``latest`` pointer: a crash between the rename and the pointer
    update leaves the pointer one checkpoint behind. ``content``: verify checksums too (see
    :func:`problem`). The reasons let a caller that finds nothing intact say why in one line.
    """
    damaged: list[tuple[Path, str]] = []
    for candidate in reversed(regular_checkpoints(root)):
        reason = problem(candidate, content)
        if reason is None:
            return candidate, damaged
        damaged.append((candidate, reason))
        if warn:
            warnings.warn(f"skipping damaged checkpoint {candidate}: {reason}; trying the previous one")
    return None, damaged


def find_latest(root: Path, warn: bool = True, content: bool = False) -> Optional[Path]:
    """The newest intact regular checkpoint, or None; damaged ones are skipped with a warning."""
    return scan(root, warn, content)[0]


def none_intact(root: Path, damaged: list[tuple[Path, str]]) -> str:
    """One line for "every checkpoint in ``root`` is damaged", with the newest one's reason."""
    newest, reason = damaged[0]
    others = f" (and {len(damaged) - 1} older one(s) damaged too)" if len(damaged) > 1 else ""
    return f"no intact checkpoint in {root}: {newest.name}: {reason}{others}"


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE).read_text())


def prune(root: Path, keep: int, protect: Optional[Path] = None) -> list[Path]:
    """Delete all but the newest ``keep`` intact regular checkpoints (0 keeps all); returns them.

    ``protect`` (the checkpoint just written) is never deleted, whatever the order on disk.
    Damaged checkpoints are left alone: they were either retired at resume or are being inspected.
    """
    if keep <= 0:
        return []
    intact = [p for p in regular_checkpoints(root) if problem(p) is None]
    doomed = [p for p in intact[:-keep] if protect is None or p.resolve() != Path(protect).resolve()]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def retire_newer(root: Path, step: int) -> Optional[Path]:
    """Move regular checkpoints newer than ``step`` to ``retired/``; returns where (or None).

    Called under the run-directory lock when a resume starts from ``step``: the newer checkpoints
    belong to a continuation that is being abandoned (``--resume-from`` an older step, or a damaged
    newest checkpoint). Moved, not deleted: nothing a user may still want is removed silently.
    """
    newer = [p for p in regular_checkpoints(root) if step_of(p) > step]
    if not newer:
        return None
    dest = Path(root) / RETIRED / f"{time.strftime('%Y%m%d-%H%M%S')}_after_step_{step:08d}"
    dest.mkdir(parents=True, exist_ok=True)
    for path in newer:
        os.replace(path, dest / path.name)
    return dest


def remove_temporaries(root: Path) -> None:
    """Delete half-written ``.tmp_*``/``.old_*`` directories (only while holding the run lock)."""
    if Path(root).is_dir():
        for path in Path(root).iterdir():
            if path.name.startswith((".tmp_", ".old_")):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def parameters_finite(module: torch.nn.Module) -> bool:
    """Whether this rank's parameters are all finite (ZeRO-3: this rank's shards, ``ds_tensor``)."""
    with torch.no_grad():
        for p in module.parameters():
            tensor = getattr(p, "ds_tensor", p)
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                return False
    return True

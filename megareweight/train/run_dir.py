"""A run directory belongs to one run: a lock while training, an identity, no silent mixing.

* **Lock** (``<out>/.lock``): ``fcntl.flock`` held by the writing rank for the whole training. The
  kernel releases it when the process dies however it dies (kill -9, OOM, node reboot on NFS
  after the lease), so there is never a stale lock to delete by hand; the file holds the holder's
  pid, host and start time only to name it in the refusal. A file left non-empty by a process
  that died is reported when the next run takes the lock. Where the file system has no locks
  (some parallel file systems without ``-o flock``), a live pid on this host still refuses and a
  warning says that runs on other hosts cannot be detected.
* **Identity** (``<out>/run.json``): run id, wandb run id and creation time, written when the run
  starts and kept by every resume, so a resumed run continues the same wandb run.
* **Ownership.** A new run (no ``--resume``) into a directory that holds another run's
  checkpoints or metrics refuses unless ``--overwrite`` is given. ``--overwrite`` removes only what
  a run writes (checkpoints, metrics, eval, summary, config, run.json, wandb), never other files,
  and only after the lock is held. The old files are first renamed into one hidden directory and
  then deleted, so a crash half-way never leaves a directory that looks like a run.

Only the writing rank (rank 0) touches the directory; its decision, or its refusal, is broadcast
so every rank raises the same error instead of some ranks waiting in a collective forever.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from megareweight.train.distributed import decided_by_rank0

LOCK = ".lock"
RUN_FILE = "run.json"
#: What a training run writes into its directory (what ``--overwrite`` removes).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "eval.jsonl", "summary.json", "config.yaml", RUN_FILE, "wandb")
#: Outputs whose presence means the directory holds a run worth protecting. run.json and
#: config.yaml alone are not: a run that failed before its first step (a config mistake found
#: late) must not make the corrected retry ask for --overwrite.
RUN_EVIDENCE = ("checkpoints", "metrics.jsonl", "eval.jsonl", "summary.json")


class RunDirectoryError(ValueError):
    """``--out`` cannot be used as asked (busy, another run's, unwritable); exit code 2."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    wandb_id: str
    created: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_run_info() -> RunInfo:
    return RunInfo(run_id=secrets.token_hex(6), wandb_id=secrets.token_hex(6), created=_now())


def read_run_info(out: Path) -> Optional[RunInfo]:
    try:
        raw = json.loads((Path(out) / RUN_FILE).read_text())
        return RunInfo(str(raw["run_id"]), str(raw["wandb_id"]), str(raw.get("created", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_run(out: Path) -> str:
    """What the directory holds, for the refusal message (e.g. "checkpoints up to step 40, metrics.jsonl")."""
    from megareweight.train.checkpoint import find_latest

    parts = []
    latest = find_latest(Path(out) / "checkpoints", warn=False)
    if latest is not None:
        parts.append(f"checkpoints up to {latest.name}")
    parts += [name for name in ("metrics.jsonl", "eval.jsonl", "summary.json") if (Path(out) / name).exists()]
    return ", ".join(parts) or "run files"


def holds_run(out: Path) -> bool:
    out = Path(out)
    for name in RUN_EVIDENCE:
        path = out / name
        if path.is_dir() and any(path.iterdir()):
            return True
        if path.is_file():
            return True
    return False


class RunLock:
    """An exclusive ``flock`` on ``<out>/.lock`` naming its holder; :meth:`release` empties it."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd: Optional[int] = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _describe(holder: dict) -> str:
        return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirectoryError(f"--out {self.path.parent}: cannot create {self.path.name} "
                                    f"({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryError(
                f"--out {self.path.parent} is in use by another training ({self._describe(self._holder())}); "
                "wait for it to finish or choose another --out") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self._check_without_flock(fd)
        previous = self._holder()
        if previous.get("pid") is not None:
            warnings.warn(f"{self.path}: the previous training ({self._describe(previous)}) ended without "
                          "releasing the run directory (killed or crashed); taking it over")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}).encode(), 0)
        self.fd = fd

    def _check_without_flock(self, fd: int) -> None:
        """No file locks on this file system: refuse a live holder on this host, warn otherwise."""
        holder = self._holder()
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder["pid"], 0)
                os.close(fd)
                raise RunDirectoryError(f"--out {self.path.parent} is in use by another training "
                                        f"({self._describe(holder)}); wait for it or choose another --out")
        warnings.warn(f"{self.path}: the file system does not support file locks; a second training started "
                      "on another host into this directory would not be detected")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def _remove_previous_run(out: Path) -> list[str]:
    """``--overwrite``: rename the previous run's outputs into one hidden directory, then delete it."""
    trash = out / f".overwritten-{os.getpid()}-{int(time.time())}"
    moved = []
    for name in RUN_OUTPUTS:
        if (out / name).exists():
            trash.mkdir(exist_ok=True)
            os.replace(out / name, trash / name)
            moved.append(name)
    shutil.rmtree(trash, ignore_errors=True)
    return moved


def _claim_on_writer(out: Path, resume: bool, overwrite: bool) -> tuple[RunLock, RunInfo]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirectoryError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"--out {out}: the directory is not writable")
    lock = RunLock(out)
    lock.acquire()
    try:
        info = read_run_info(out)
        if not resume and holds_run(out):
            if not overwrite:
                raise RunDirectoryError(
                    f"--out {out} already holds a run ({describe_run(out)}); continue it with --resume "
                    "or replace it with --overwrite")
            old = info.run_id if info else "without run.json"
            moved = _remove_previous_run(out)
            warnings.warn(f"--overwrite: removed the previous run ({old}) from {out}: {', '.join(moved)}")
            info = None
        if info is None or not resume:
            info = new_run_info()
            (out / RUN_FILE).write_text(json.dumps(asdict(info), indent=2))
    except OSError as exc:
        lock.release()
        raise RunDirectoryError(f"--out {out}: {exc.strerror}: {exc.filename}") from None
    except BaseException:
        lock.release()
        raise
    return lock, info


@contextlib.contextmanager
def claim(out: str | Path, resume: bool, overwrite: bool, is_writer: bool) -> Iterator[RunInfo]:
    """Hold ``out`` for one training; every rank gets the same :class:`RunInfo` or the same error."""
    out = Path(out)
    held: list[RunLock] = []

    def decide() -> RunInfo:
        lock, info = _claim_on_writer(out, resume, overwrite)
        held.append(lock)
        return info

    info = decided_by_rank0(decide, is_writer)
    try:
        yield info
    finally:
        for lock in held:
            lock.release()

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
* **A checkpoint from elsewhere** (``--resume-from PATH`` outside ``--out``): continuing it in a
  directory that holds another run would append one run's steps to another's metrics and carry
  the other's run id into the new checkpoints, so it refuses, naming both runs, unless
  ``--overwrite`` (which removes the old run as above). It continues the directory's run when
  that run is the checkpoint's own (same run id: a copied run directory) or was started from the
  checkpoint's run before (a retried branch). Into an empty or new ``--out`` it starts a **new
  run** (new run id, new wandb run) whose ``run.json`` records ``resumed_from`` (run id, path,
  step): a branch, not the same run, because the original run may go on in its own directory and
  two directories must never write to one wandb run.

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
from dataclasses import asdict, dataclass, replace
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
    resumed_from: Optional[dict] = None  # a branch: {"run_id", "checkpoint", "step"} it started from


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_run_info(resumed_from: Optional[dict] = None) -> RunInfo:
    return RunInfo(run_id=secrets.token_hex(6), wandb_id=secrets.token_hex(6), created=_now(),
                   resumed_from=resumed_from)


def read_run_info(out: Path) -> Optional[RunInfo]:
    try:
        raw = json.loads((Path(out) / RUN_FILE).read_text())
        origin = raw.get("resumed_from")
        return RunInfo(str(raw["run_id"]), str(raw["wandb_id"]), str(raw.get("created", "")),
                       origin if isinstance(origin, dict) else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class CheckpointOrigin:
    """Whose checkpoint ``--resume-from PATH`` names: its run id (None before run ids), step, run directory."""

    path: Path
    run_id: Optional[str]
    step: int

    @property
    def run_dir(self) -> Path:
        """The run directory holding it (``<run>/checkpoints/...``), else its parent."""
        return next((p.parent for p in self.path.parents if p.name == "checkpoints"), self.path.parent)

    def describe(self) -> str:
        run = f"run {self.run_id}" if self.run_id else "a run without a run id (written by an older version)"
        return f"checkpoint {self.path} is {run} from {self.run_dir}"


def checkpoint_origin(path: Path) -> Optional[CheckpointOrigin]:
    """The origin recorded in a checkpoint's ``trainer_state.json``; None when unreadable (resume
    then refuses the checkpoint itself, with the reason)."""
    from megareweight.train.checkpoint import read_state

    try:
        state = read_state(path)
        run_id = state.get("run_id")
        return CheckpointOrigin(Path(path).resolve(), str(run_id) if run_id else None, int(state["step"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
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


def _write_info(out: Path, info: RunInfo) -> RunInfo:
    (out / RUN_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info


def _overwrite(out: Path, info: Optional[RunInfo]) -> None:
    old = info.run_id if info else "without run.json"
    moved = _remove_previous_run(out)
    warnings.warn(f"--overwrite: removed the previous run ({old}) from {out}: {', '.join(moved)}")


def _claim_for_checkpoint(out: Path, info: Optional[RunInfo], source: Path, overwrite: bool) -> RunInfo:
    """``--resume-from`` a checkpoint outside ``out``: the same run continues, any other refuses
    (or, with ``overwrite``, is removed) and a new run starts from the checkpoint."""
    origin = checkpoint_origin(source)
    if origin is None:  # unreadable: the resume refuses it next, naming the reason; nothing to decide here
        return info or _write_info(out, new_run_info())
    own = info is not None and origin.run_id is not None and origin.run_id in (
        info.run_id, (info.resumed_from or {}).get("run_id"))
    if holds_run(out) and (overwrite or not own):
        if not overwrite:
            here = f"run {info.run_id}" if info else "a run without run.json"
            raise RunDirectoryError(
                f"--out {out} holds {here} ({describe_run(out)}) but --resume-from {origin.describe()}: continuing "
                "it here would mix two runs in one directory; choose a new --out (a new run starting from that "
                "checkpoint), or replace the run in --out with --overwrite")
        _overwrite(out, info)
        own = False
    resumed_from = {"run_id": origin.run_id, "checkpoint": str(origin.path), "step": origin.step}
    if own and info is not None:
        # A retried branch keeps its ids; it now starts from this checkpoint.
        return info if info.run_id == origin.run_id else _write_info(out, replace(info, resumed_from=resumed_from))
    return _write_info(out, new_run_info(resumed_from))


def _claim_on_writer(out: Path, resume: bool, overwrite: bool,
                     source: Optional[Path] = None) -> tuple[RunLock, RunInfo]:
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
        if source is not None:
            info = _claim_for_checkpoint(out, info, source, overwrite)
        elif not resume and holds_run(out):
            if not overwrite:
                raise RunDirectoryError(
                    f"--out {out} already holds a run ({describe_run(out)}); continue it with --resume "
                    "or replace it with --overwrite")
            _overwrite(out, info)
            info = None
        if info is None or (not resume and source is None):
            info = _write_info(out, new_run_info())
    except OSError as exc:
        lock.release()
        raise RunDirectoryError(f"--out {out}: {exc.strerror}: {exc.filename}") from None
    except BaseException:
        lock.release()
        raise
    return lock, info


@contextlib.contextmanager
def claim(out: str | Path, resume: bool, overwrite: bool, is_writer: bool,
          source: Optional[Path] = None) -> Iterator[RunInfo]:
    """Hold ``out`` for one training; every rank gets the same :class:`RunInfo` or the same error.

    ``source``: the checkpoint of a ``--resume-from PATH`` outside ``out`` (see the module's
    "A checkpoint from elsewhere" for the identity the run gets).
    """
    out = Path(out)
    held: list[RunLock] = []

    def decide() -> RunInfo:
        lock, info = _claim_on_writer(out, resume, overwrite, source)
        held.append(lock)
        return info

    info = decided_by_rank0(decide, is_writer)
    try:
        yield info
    finally:
        for lock in held:
            lock.release()

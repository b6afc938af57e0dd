"""Start DeepSpeed-launched training in subprocesses for the multi-process tests, and clean up.

Why a helper: every multi-process test must pick a free port, use the CPU accelerator (gloo),
cache the JIT-compiled shared-memory op under the repository (``.cache/torch_extensions``: the
first build takes ~40 s, later ones are instant), kill the whole process group on failure or
timeout, and remove the ``/dev/shm/deepspeed_allreduce_buffer_*`` files (66 MB per rank) that
DeepSpeed's CPU backend leaves behind. Buffers are named after the master port, so only the
test's own are removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        # The launch/ scripts call ``deepspeed`` from PATH: this interpreter's one.
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", ""))),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    })
    return env


def cleanup_shm(port: int) -> None:
    for path in SHM.glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def run_group(commands: Sequence[Sequence[str]], port: int, timeout: float, log: Path,
              extra_env: Optional[dict[str, str]] = None) -> None:
    """Run ``commands`` concurrently (each its own process group); all must exit 0.

    On timeout or any failure every group is killed; the shm buffers of ``port`` are always removed.
    """
    procs = []
    try:
        with open(log, "w") as handle:
            for cmd in commands:
                procs.append(subprocess.Popen(list(cmd), cwd=REPO, env={**launch_env(), **(extra_env or {})}, stdout=handle,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            for proc in procs:
                proc.wait(timeout=timeout)
        failed = [p.returncode for p in procs if p.returncode != 0]
        if failed:
            raise AssertionError(f"launcher exited with {failed}; log:\n{log.read_text()[-6000:]}")
    except subprocess.TimeoutExpired:
        raise AssertionError(f"launcher timed out after {timeout} s; log:\n{log.read_text()[-6000:]}") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        cleanup_shm(port)


def deepspeed_train(config: Path, ds_json: Path, out: Path, nproc: int, *extra: str, timeout: float = 600,
                    env: Optional[dict[str, str]] = None) -> None:
    """``deepspeed --num_accelerators N --module megareweight.train ...`` on this machine (exit 0 required).

    The default timeout is generous: the first launch in a fresh venv JIT-compiles DeepSpeed's CPU
    ops with g++ (minutes on a loaded 2-core machine); it only has to catch a hang."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(nproc),
           "--master_port", str(port), "--module", "megareweight.train",
           "--config", str(config), "--deepspeed", str(ds_json), "--out", str(out), "--quiet", *extra]
    out.mkdir(parents=True, exist_ok=True)
    run_group([cmd], port, timeout, out.parent / f"{out.name}.log", extra_env=env)


def wait_for_metrics(out: Path, rows: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until ``out/metrics.jsonl`` has ``rows`` rows (or the process ended, or ``timeout``)."""
    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.02)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]

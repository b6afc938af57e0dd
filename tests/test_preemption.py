"""SIGTERM/SIGINT/SIGUSR1: finish the step, write a checkpoint, exit resumable; SLURM requeues."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megareweight.config import load_config
from megareweight.train import checkpoint as ckpt
from megareweight.train.engine import PlainEngine
from megareweight.train.loop import train
from megareweight.train.signals import StoppedBySignal
from tests._launch import REPO, read_metrics, wait_for_metrics
from tests.conftest import tiny_config
from tests.test_reliability import _cli, _write_config


def test_sigterm_writes_a_checkpoint_and_resume_equals_the_uninterrupted_run(prepared_dir, tmp_path):
    config = _write_config(tmp_path / "c.yaml", prepared_dir, train={"max_steps": 30, "checkpoint_interval": 0})
    full = tmp_path / "full"
    train(load_config(config), full, progress=False)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli("train", "--config", str(config), "--out", str(run), "--quiet"), env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_metrics(run, 3, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    latest = ckpt.find_latest(run / "checkpoints")
    step = ckpt.read_state(latest)["step"]
    assert 3 <= step < 30 and [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))
    line = [x for x in err.splitlines() if x.startswith("megareweight: stopped")]
    assert line == [f"megareweight: stopped by SIGTERM after step {step}; checkpoint {latest}; resume with: "
                    f"megareweight train --config {config} --out {run} --resume"], err
    subprocess.run(_cli("train", "--config", str(config), "--out", str(run), "--resume", "--quiet"), check=True,
                   env=env, timeout=300)
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(full)]


def _signalling_factory(signals_at_step: dict[int, list[int]]):
    """A plain engine that sends this process the given signals during the given (1-based) steps."""
    calls = {"n": 0}

    def factory(module, cfg):
        engine = PlainEngine(module, cfg, torch.device("cpu"))
        step = engine.step

        def step_and_signal(*args, **kwargs):
            calls["n"] += 1
            for signum in signals_at_step.get(calls["n"], []):
                os.kill(os.getpid(), signum)
            return step(*args, **kwargs)

        engine.step = step_and_signal
        return engine

    return factory


def test_sigint_finishes_the_step_and_a_second_one_aborts(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, train={"max_steps": 8, "eval_interval": 0})
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(StoppedBySignal) as stopped:
        train(cfg, tmp_path / "run", engine_factory=_signalling_factory({3: [signal.SIGINT]}), progress=False)
    assert stopped.value.exit_code == 130 and stopped.value.step == 3
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000003"
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is previous  # handlers are restored after training
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", resume=True, engine_factory=_signalling_factory({2: [signal.SIGINT] * 2}),
              progress=False)
    assert ckpt.find_latest(tmp_path / "run" / "checkpoints").name == "step_00000003"


STUB_DEEPSPEED = """#!{python}
import signal, sys
# The sbatch script must make the launcher ignore SIGUSR1 (only the trainers handle it).
sys.exit({code} if signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN else 99)
"""


@pytest.mark.parametrize("trainer_exit,requeued", [(138, True), (0, False), (1, False)])
def test_slurm_script_requeues_a_stopped_run(tmp_path, trainer_exit, requeued):
    """``launch/slurm_train.sbatch`` with stand-ins for srun/scontrol/deepspeed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    stubs = {
        "deepspeed": STUB_DEEPSPEED.format(python=sys.executable, code=trainer_exit),
        "srun": "#!/bin/bash\n# drop srun's own options, run the task as node 0\n"
                "while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec \"$@\"\n",
        "scontrol": f"#!/bin/bash\nif [[ $1 == show ]]; then echo node1; else echo \"$@\" >> {log}; fi\n",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node1", "SLURM_GPUS_ON_NODE": "2"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm_train.sbatch"), "c.yaml", "ds.json",
                           str(tmp_path / "out"), "--set", "optim.lr=1e-3"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if requeued else trainer_exit), proc.stderr
    assert (log.read_text().split() if log.exists() else []) == (["requeue", "4242"] if requeued else [])
    assert Path(tmp_path / "out" / "hostfile.4242").read_text() == "node1 slots=2\n"

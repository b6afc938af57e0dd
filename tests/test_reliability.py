"""Faults: non-finite losses, kill -9 during a run and resume, config fuzzing through the CLI."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from megareweight.cli import main
from megareweight.config import ConfigError, config_from_dict
from megareweight.train import checkpoint as ckpt
from megareweight.train.engine import PlainEngine
from megareweight.train.loop import TrainingError, train
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def poisoning_factory(bad_calls: set[int], rows: str = "first"):
    """A plain engine whose loss sees NaN hidden states on the given forward calls (0-based)."""
    calls = {"n": 0}

    def factory(module, cfg):
        inner = module.loss_fn

        def loss_fn(hidden, weight, labels, **kw):
            if module.training and calls["n"] in bad_calls:
                poisoned = hidden.clone()
                if rows == "first":
                    poisoned[0] = float("nan")
                else:
                    poisoned[:] = float("nan")
                hidden = poisoned
            if module.training:
                calls["n"] += 1
            return inner(hidden, weight, labels, **kw)

        module.loss_fn = loss_fn
        return PlainEngine(module, cfg, torch.device("cpu"))

    return factory


def test_nonfinite_sample_is_dropped_and_step_skipped(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, train={"max_steps": 6, "eval_interval": 0},
                      reweight={"strategy": "linupper", "r": 0.5})
    train(cfg, tmp_path / "run", engine_factory=poisoning_factory({2}), progress=False)
    rows = _metrics(tmp_path / "run")
    bad = rows[2]
    assert bad["nonfinite_samples"] == 1
    # the sample is out of the weighting: the other 3 share all the weight, all finite
    assert 0 < bad["weight_min"] <= bad["weight_max"] < 1 and bad["weight_ess"] <= 3.0 + 1e-6
    assert abs(sum(v for k, v in bad.items() if k.startswith("weight_share/")) - 1.0) < 1e-6
    # its gradient was not finite, so the optimizer step was skipped and counted
    assert bad["skipped_steps"] == 1 and rows[-1]["skipped_steps"] == 1
    assert all(r["nonfinite_samples"] == 0 for i, r in enumerate(rows) if i != 2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_repeated_nonfinite_steps_stop_with_a_separate_checkpoint(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, train={"max_steps": 20, "eval_interval": 0, "max_nonfinite_steps": 3})
    with pytest.raises(TrainingError, match="3 consecutive steps had only non-finite losses") as stopped:
        train(cfg, tmp_path / "run", engine_factory=poisoning_factory(set(range(2, 20)), rows="all"), progress=False)
    root = tmp_path / "run" / "checkpoints"
    stop = root / "nonfinite_step_00000005"
    assert f"--resume-from {stop}" in str(stopped.value) and "--resume starts over" in str(stopped.value)
    # The stop checkpoint is outside step_*: neither `latest` nor --resume nor pruning sees it.
    assert ckpt.find_latest(root) is None and not (root / "latest").exists()
    assert ckpt.problem(stop) is None and ckpt.read_state(stop)["step"] == 5
    state = torch.load(stop / "engine.pt", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in state.values())
    result = train(cfg, tmp_path / "run", resume_from=str(stop), progress=False)
    assert result.steps == 20


def _fault_run(prepared_dir, out, monkeypatch, spec, **train_keys):
    """Train with ``MEGAREWEIGHT_FAULT_NAN=spec``; returns (metrics rows, the engine)."""
    monkeypatch.setenv("MEGAREWEIGHT_FAULT_NAN", spec)
    engines = []

    def factory(module, cfg):
        engines.append(PlainEngine(module, cfg, torch.device("cpu")))
        return engines[-1]

    cfg = tiny_config(prepared_dir, train={"max_steps": 6, "eval_interval": 0, **train_keys},
                      reweight={"strategy": "linupper", "r": 0.5})
    train(cfg, out, engine_factory=factory, progress=False)
    return _metrics(out), engines[0]


def test_fault_switch_nan_gradient_skips_and_nan_loss_does_not(prepared_dir, tmp_path, monkeypatch):
    rows, engine = _fault_run(prepared_dir, tmp_path / "run", monkeypatch, "3:0:1,5:0:2:loss")
    assert [r["nonfinite_samples"] for r in rows] == [0, 0, 1, 0, 1, 0]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]  # hidden NaN: skipped; NaN loss only: applied
    assert not math.isfinite(rows[2]["grad_norm"]) and math.isfinite(rows[4]["grad_norm"])
    assert rows[4]["weight_min"] > 0 and rows[4]["weight_ess"] <= 3.0 + 1e-6  # 3 samples share the weight
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_fp16_overflow_skips_the_step_and_lowers_the_loss_scale(prepared_dir, tmp_path, monkeypatch):
    """Before: the step after a non-finite one died with "unscale_() has already been called"."""
    clean, ref = _fault_run(prepared_dir, tmp_path / "clean", monkeypatch, "99:0", precision="fp16")
    rows, engine = _fault_run(prepared_dir, tmp_path / "run", monkeypatch, "3:0", precision="fp16")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1] and [r["skipped_steps"] for r in clean][-1] == 0
    assert engine.loss_scale == ref.loss_scale / 2  # the overflow halved the scale (growth needs 2000 steps)
    assert all(math.isfinite(r["loss"]) for r in rows) and all(torch.isfinite(p).all()
                                                                 for p in engine.module.parameters())


def _write_config(path: Path, prepared: Path, **sections) -> Path:
    raw = {
        "model": {"size": "tiny"},
        "data": {"prepared": str(prepared), "seq_len": 32, "micro_batch_size": 4, "eval_sequences": 4},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "train": {"max_steps": 24, "eval_interval": 0, "checkpoint_interval": 1, "keep_checkpoints": 0},
        "reweight": {"strategy": "linupper", "r": 0.4, "warmup_steps": 2},
        "loss": {"impl": "chunked"},
        "wandb": {"mode": "disabled"},
    }
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megareweight.cli", *args]


@pytest.mark.parametrize("kill_at", ["mid-run", "checkpoint-write"])
def test_kill9_and_resume_equals_uninterrupted(prepared_dir, tmp_path, kill_at):
    config = _write_config(tmp_path / "c.yaml", prepared_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full = tmp_path / "full"
    subprocess.run(_cli("train", "--config", str(config), "--out", str(full), "--quiet"), check=True, env=env,
                   timeout=300)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", "--config", str(config), "--out", str(run), "--quiet"), env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            # a checkpoint every step: 23 chances to catch one half-written (".tmp_step_*")
            if kill_at == "checkpoint-write" and any((run / "checkpoints").glob(".tmp_step_*")):
                break
            if kill_at == "mid-run" and (run / "metrics.jsonl").is_file() and \
                    len((run / "metrics.jsonl").read_text().splitlines()) >= 8:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done_before = ckpt.find_latest(run / "checkpoints")
    assert done_before is None or ckpt.read_state(done_before)["step"] < 24, "the run finished before the kill"
    subprocess.run(_cli("train", "--config", str(config), "--out", str(run), "--resume", "--quiet"), check=True,
                   env=env, timeout=300)
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(full)]
    assert [r["step"] for r in _metrics(run)] == list(range(1, 25))


def test_half_written_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 3, {"step": 3}, lambda d: d.mkdir(parents=True))
    (root / "step_00000006").mkdir()  # no COMPLETE marker: a crash mid-write
    (root / "latest").write_text("step_00000006")
    with pytest.warns(UserWarning, match="incomplete"):
        assert ckpt.find_latest(root).name == "step_00000003"


# --- config fuzzing: always a one-line error naming the key, exit code 2 --------------------------

VALID = {
    "model": {"size": "tiny"},
    "data": {"seq_len": 16, "micro_batch_size": 2, "mixture": "uniform"},
    "optim": {"lr": 0.01, "warmup_steps": 1, "grad_clip": 1.0},
    "train": {"max_steps": 1, "eval_interval": 0},
    "reweight": {"strategy": "linupper", "r": 0.4},
    "wandb": {"mode": "disabled"},
}
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@st.composite
def broken_configs(draw):
    raw = json.loads(json.dumps(VALID))
    kind = draw(st.sampled_from(["wrong_value", "unknown_key", "negative", "mixture", "strategy"]))
    section = draw(st.sampled_from(sorted(raw)))
    if kind == "wrong_value":
        key = draw(st.sampled_from(sorted(raw[section])))
        raw[section][key] = draw(junk)
        try:  # junk that happens to be valid (an int for micro_batch_size) is not a broken config
            config_from_dict(raw)
            assume(False)
        except ConfigError:
            pass
        return raw, f"{section}.{key}"
    if kind == "unknown_key":
        key = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(lambda k: k not in dir(object)))
        if key in ("size", "seq_len", "micro_batch_size", "mixture", "lr", "warmup_steps", "grad_clip", "max_steps",
                   "eval_interval", "strategy", "r", "mode"):
            key += "_x"
        raw[section][key] = 1
        return raw, key
    if kind == "negative":
        key = draw(st.sampled_from(["data.seq_len", "data.micro_batch_size", "optim.lr", "train.max_steps", "reweight.r"]))
        sec, name = key.split(".")
        raw[sec][name] = -draw(st.integers(1, 1000))
        return raw, key
    if kind == "mixture":
        raw["data"]["mixture"] = {"prose": draw(st.floats(0.01, 5.0)), "code": 0.5}
        if abs(sum(raw["data"]["mixture"].values()) - 1) < 1e-6:
            raw["data"]["mixture"]["code"] = 0.7
        return raw, "data.mixture"
    raw["reweight"]["strategy"] = draw(st.text(min_size=1, max_size=8).filter(
        lambda s: s not in ("uniform", "linear", "linupper", "quadratic", "extremes")))
    return raw, "reweight.strategy"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=broken_configs())
def test_fuzzed_configs_give_one_line_errors(case, tmp_path, capsys):
    raw, key = case
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("megareweight: error: ")
    assert key in err[0], (key, err[0])


def test_missing_prepared_data_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**VALID, "data": {"prepared": str(tmp_path / "nope")}}))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "manifest.json: not found (run `megareweight prepare` first)" in capsys.readouterr().err


@pytest.mark.parametrize("variable,value", [("MEGAREWEIGHT_FAULT_NAN", "3"), ("MEGAREWEIGHT_FAULT_NAN", "3:0:x"),
                                            ("MEGAREWEIGHT_FAULT_SIGNAL", "3:0:KILL")])
def test_malformed_fault_switch_is_a_one_line_error(prepared_dir, tmp_path, monkeypatch, capsys, variable, value):
    monkeypatch.setenv(variable, value)
    path = _write_config(tmp_path / "c.yaml", prepared_dir, train={"max_steps": 3})
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{variable}={value!r}: expected STEP:RANK" in err[0], err


def test_native_abort_in_a_rank_prints_every_threads_python_stack():
    """A rank killed by ``std::terminate`` (SIGABRT) in a native library leaves the Python stacks of
    all its threads in the launcher log, and still dies with the signal (the launcher sees -6)."""
    code = ("import os, threading, time\n"
            "from megareweight.train.__main__ import enable_native_crash_tracebacks\n"
            "enable_native_crash_tracebacks()\n"
            "threading.Thread(target=time.sleep, args=(60,), name='prefetch', daemon=True).start()\n"
            "def collective_in_flight():\n"
            "    os.abort()\n"
            "collective_in_flight()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONFAULTHANDLER": ""})
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in proc.stderr
    assert "Current thread 0x" in proc.stderr and "collective_in_flight" in proc.stderr  # the aborting one
    assert "\nThread 0x" in proc.stderr  # and the other threads


def test_a_finished_rank_destroys_its_process_groups_before_interpreter_teardown():
    """``distributed.shutdown`` (called by the training entry on a clean exit) leaves no gloo group
    for interpreter teardown, where one still holding async work can abort the rank; a second call
    and a call without a group are no-ops."""
    code = ("import socket, torch.distributed as dist\n"
            "from megareweight.train import distributed\n"
            "distributed.shutdown()\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
            "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
            "work = dist.all_reduce(__import__('torch').ones(4), async_op=True)\n"
            "assert distributed.control_group() is not None\n"
            "distributed.shutdown()\n"
            "print('initialized after shutdown:', dist.is_initialized())\n"
            "distributed.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "initialized after shutdown: False" in proc.stdout


@pytest.mark.parametrize("groups, code, atexit_ran", [("destroyed", 0, False), ("destroyed", 3, True),
                                                      ("destroyed", 138, True), ("live", 2, True), ("none", 0, True),
                                                      ("none", 2, True)])
def test_a_rank_that_ran_torch_distributed_skips_interpreter_finalisation(groups, code, atexit_ran):
    """``exit_rank`` (what ``python -m megareweight.train`` ends with): a rank that ran
    torch.distributed leaves with ``os._exit`` and its exit code, output flushed, so interpreter
    finalisation (where gloo threads can abort the rank) never runs: a non-daemon thread that is
    still sleeping, which finalisation would wait for, does not hold it. After an error code the
    ``atexit`` handlers run first; after a finished run everything is already closed. A process
    without torch.distributed exits normally."""
    code_text = ("import atexit, socket, sys, threading, time, torch.distributed as dist\n"
                 "from megareweight.train import distributed\n"
                 "from megareweight.train.__main__ import exit_rank\n"
                 "atexit.register(lambda: print(' atexit ran', end=''))\n"
                 f"if {groups!r} != 'none':\n"
                 "    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
                 "    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
                 "    threading.Thread(target=time.sleep, args=(600,)).start()\n"
                 f"if {groups!r} == 'destroyed':\n"
                 "    distributed.shutdown()\n"
                 "print('written before exit', end='')\n"
                 f"exit_rank({code})\n")
    proc = subprocess.run([sys.executable, "-c", code_text], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stdout.startswith("written before exit")
    assert ("atexit ran" in proc.stdout) == atexit_ran


def test_two_deepspeed_trainings_in_one_process_both_run(prepared_dir, tmp_path):
    """``megareweight train --deepspeed`` through the CLI's ``main`` keeps the process groups (a
    caller may train again in the same process; DeepSpeed keeps references to its groups): only
    the launcher entry, whose process exits next, destroys them."""
    from tests._launch import launch_env
    from tests.test_distributed import DS_TINY, write_config

    config = write_config(tmp_path / "c.yaml", prepared_dir, "uniform", accum=1)
    code = ("import sys\n"
            "from megareweight.cli import main\n"
            "from megareweight.train import distributed\n"
            "for i in range(2):\n"
            f"    rc = main(['train', '--config', {str(config)!r}, '--deepspeed', {str(DS_TINY)!r},\n"
            f"               '--out', {str(tmp_path)!r} + f'/run{{i}}', '--quiet'])\n"
            "    print('run', i, 'exit', rc, 'groups destroyed', distributed.was_shut_down(), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=launch_env())
    assert "run 0 exit 0 groups destroyed False" in proc.stdout, proc.stderr[-3000:]
    assert "run 1 exit 0 groups destroyed False" in proc.stdout, proc.stderr[-3000:]
    assert len(_metrics(tmp_path / "run1")) == 4


FULL_DISK_RUN = """
import errno, logging, sys
import megareweight.train.checkpoint as ckpt

class FullDisk:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    flush = write

def checkpoint_write_on_a_full_disk(*args, **kwargs):
    # the disk is full for everyone: wandb's own log file fails from now on too
    for handler in logging.getLogger("wandb").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream = FullDisk()
    raise OSError(errno.ENOSPC, "No space left on device", "checkpoints/step_00000002")

ckpt.save_checkpoint = checkpoint_write_on_a_full_disk
from megareweight.cli import main
sys.exit(main(["train", "--config", sys.argv[1], "--out", sys.argv[2], "--quiet"]))
"""


def test_a_full_disk_under_wandb_offline_ends_in_one_line(prepared_dir, tmp_path):
    """The one-line error was followed by wandb's "--- Logging error ---", tracebacks and socket errors."""
    config = tmp_path / "c.yaml"
    raw = tiny_config(prepared_dir, train={"max_steps": 2, "eval_interval": 0}).to_dict()
    raw["wandb"].update(mode="offline")
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_SILENT")}
    done = subprocess.run([sys.executable, "-c", FULL_DISK_RUN, str(config), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "megareweight: error: [Errno 28] No space left on device: 'checkpoints/step_00000002'"], done.stderr[-3000:]


def test_gpu_check_plan_fits_the_window_and_a_cpu_smoke_run_writes_flat_files(prepared_dir, tmp_path):
    """``launch/gpu_check.sh --plan`` needs no GPU and promises under 8 minutes; the whole script,
    run on the CPU with tiny settings (GPU_CHECK_SMOKE=1), writes at most 8 flat files with every
    stage ok: what a short GPU window brings back."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable}
    plan = subprocess.run([str(root / "launch" / "gpu_check.sh"), "--plan"], capture_output=True, text=True, env=env)
    assert plan.returncode == 0, plan.stderr
    limit = int(plan.stdout.split("total")[1].split("limit")[1].split()[0])
    assert limit <= 480, plan.stdout
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "prepared32k").symlink_to(prepared_dir)
    out = tmp_path / "out"
    run = subprocess.run([str(root / "launch" / "gpu_check.sh"), str(out), str(bundle)], capture_output=True, text=True,
                         env={**env, "GPU_CHECK_SMOKE": "1", "MASTER_PORT": "29617"}, timeout=900)
    files = sorted(p.name for p in out.iterdir())
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-2000:])
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    assert {"gpu_check.json", "gpu_check.log", "kernels_bench.json", "kernels_bench.csv", "train_bench.json"} <= set(files)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] and all(v["status"] == "ok" for v in report["stages"].values()), report["stages"]
    assert report["env"]["torch"] and len(report["train"]) >= 1

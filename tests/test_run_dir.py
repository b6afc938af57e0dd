"""A run directory belongs to one run: lock, refusal of a foreign run, --overwrite, unwritable --out."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml

from megareweight.cli import main
from megareweight.train import checkpoint as ckpt
from megareweight.train.run_dir import RUN_FILE
from tests._launch import REPO, read_metrics


def _config(tmp_path, prepared, name="c.yaml", **train):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({
        "model": {"size": "tiny"}, "loss": {"impl": "chunked"}, "wandb": {"mode": "disabled"},
        "data": {"prepared": str(prepared), "seq_len": 32, "micro_batch_size": 4, "eval_sequences": 4},
        "train": {"max_steps": 2, "eval_interval": 0, **train}}))
    return path


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("megareweight: error")]
    assert len(err) == 1, err
    return err[0]


HOLDER = textwrap.dedent("""
    import sys, time
    from megareweight.train.run_dir import RunLock
    lock = RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(120)
""")


def test_second_trainer_is_refused_and_a_dead_holders_lock_is_taken_over(prepared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = _config(tmp_path, prepared_dir)
        assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 2
        line = _one_line(capsys)
        assert f"is in use by another training (pid {holder.pid} on host {socket.gethostname()}" in line
        assert main(["train", "--config", str(config), "--out", str(out), "--quiet", "--resume"]) == 2
        assert not (out / "metrics.jsonl").exists() and not (out / RUN_FILE).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without cleaning up: the kernel released its lock; the next run takes over.
    with pytest.warns(UserWarning, match=f"pid {holder.pid} .* ended without releasing the run directory"):
        assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    assert (out / ".lock").read_text() == ""  # released at the end of the run


def test_new_run_into_another_runs_directory_refuses_unless_overwrite(prepared_dir, tmp_path, capsys):
    out = tmp_path / "run"
    old = _config(tmp_path, prepared_dir, "old.yaml", checkpoint_interval=1)
    assert main(["train", "--config", str(old), "--out", str(out), "--quiet"]) == 0
    first_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    new = _config(tmp_path, prepared_dir, "new.yaml", max_steps=3, seed=1)
    assert main(["train", "--config", str(new), "--out", str(out), "--quiet"]) == 2
    line = _one_line(capsys)
    assert f"--out {out} already holds a run (checkpoints up to step_00000002, metrics.jsonl" in line
    assert "--resume" in line and "--overwrite" in line
    assert main(["train", "--config", str(new), "--out", str(out), "--quiet", "--overwrite", "--resume"]) == 2
    assert "cannot be combined" in _one_line(capsys)
    (out / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="--overwrite: removed the previous run"):
        assert main(["train", "--config", str(new), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert json.loads((out / RUN_FILE).read_text())["run_id"] != first_id
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert [p.name for p in ckpt.regular_checkpoints(out / "checkpoints")] == ["step_00000003"]
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is removed
    assert not [p for p in out.iterdir() if p.name.startswith(".overwritten")]


def test_unusable_out_is_bad_input(prepared_dir, tmp_path, capsys):
    config = _config(tmp_path, prepared_dir)
    assert main(["train", "--config", str(config), "--out", str(config / "run")]) == 2
    assert f"--out {config / 'run'}: cannot create the directory (Not a directory)" in _one_line(capsys)


def test_resume_from_another_runs_checkpoint_never_mixes_two_runs(prepared_dir, tmp_path, capsys):
    """The audit's case: --out X holds a finished run, --resume-from names run Y's checkpoint."""
    source = tmp_path / "Y"
    y_config = _config(tmp_path, prepared_dir, "y.yaml", max_steps=3, checkpoint_interval=1)
    assert main(["train", "--config", str(y_config), "--out", str(source), "--quiet"]) == 0
    y_id = json.loads((source / RUN_FILE).read_text())["run_id"]
    step2 = source / "checkpoints" / "step_00000002"
    other = tmp_path / "X"
    assert main(["train", "--config", str(_config(tmp_path, prepared_dir, "x.yaml", seed=1)), "--out", str(other),
                 "--quiet"]) == 0
    x_id = json.loads((other / RUN_FILE).read_text())["run_id"]
    x_metrics = (other / "metrics.jsonl").read_text()
    resume_x = ["train", "--config", str(y_config), "--out", str(other), "--quiet", "--resume-from", str(step2)]
    assert main(resume_x) == 2
    line = _one_line(capsys)
    assert f"--out {other} holds run {x_id}" in line and f"is run {y_id} from {source}" in line, line
    assert "--overwrite" in line
    assert (other / "metrics.jsonl").read_text() == x_metrics and json.loads((other / RUN_FILE).read_text())["run_id"] == x_id
    # --overwrite replaces run X: a new run that starts from Y's checkpoint, recorded as such.
    with pytest.warns(UserWarning, match=f"--overwrite: removed the previous run \\({x_id}\\)"):
        assert main([*resume_x, "--overwrite"]) == 0
    info = json.loads((other / RUN_FILE).read_text())
    assert info["run_id"] not in (x_id, y_id)
    assert info["resumed_from"] == {"run_id": y_id, "checkpoint": str(step2.resolve()), "step": 2}
    assert [r["step"] for r in read_metrics(other)] == [3]
    assert read_metrics(other)[0]["loss"] == read_metrics(source)[2]["loss"]  # Y's step 3, exactly
    assert ckpt.read_state(other / "checkpoints" / "step_00000003")["run_id"] == info["run_id"]
    # A new --out: the same new-run identity, no --overwrite needed; a retry of that branch continues it.
    branch = tmp_path / "Z"
    assert main(["train", "--config", str(y_config), "--out", str(branch), "--quiet", "--resume-from", str(step2)]) == 0
    branch_id = json.loads((branch / RUN_FILE).read_text())["run_id"]
    assert main(["train", "--config", str(y_config), "--out", str(branch), "--quiet", "--resume-from",
                 str(source / "checkpoints" / "step_00000001")]) == 0
    assert json.loads((branch / RUN_FILE).read_text())["run_id"] == branch_id
    assert json.loads((branch / RUN_FILE).read_text())["resumed_from"]["step"] == 1
    assert [r["step"] for r in read_metrics(branch)] == [2, 3]
    # The same run (a copied run directory) continues with its own id; --overwrite with --resume-from
    # a checkpoint inside --out would delete that checkpoint: refused.
    copy = tmp_path / "Ycopy"
    shutil.copytree(source, copy)
    with pytest.warns(UserWarning, match="checkpoints newer than step_00000002"):
        assert main(["train", "--config", str(y_config), "--out", str(copy), "--quiet", "--resume-from", str(step2)]) == 0
    assert json.loads((copy / RUN_FILE).read_text())["run_id"] == y_id
    assert [(r["step"], r["loss"]) for r in read_metrics(copy)] == [(r["step"], r["loss"]) for r in read_metrics(source)]
    assert main(["train", "--config", str(y_config), "--out", str(copy), "--quiet", "--resume-from", "2",
                 "--overwrite"]) == 2
    assert "cannot be combined with --resume or with --resume-from a checkpoint inside --out" in _one_line(capsys)

"""--resume continues exactly or refuses; allowed changes take effect; damaged files fall back."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megareweight.cli import main
from megareweight.train import checkpoint as ckpt
from megareweight.train.lr import lr_at
from megareweight.train.loop import TrainingError, train
from megareweight.train.resume import ResumeError
from megareweight.train.wandb_reader import find_run_files, read_history, read_run_id
from tests._launch import read_metrics
from tests.conftest import tiny_config

TRAIN = {"max_steps": 6, "eval_interval": 0, "checkpoint_interval": 2, "keep_checkpoints": 0}


def _cfg(prepared, **sections):
    train_ = {**TRAIN, **sections.pop("train", {})}
    return tiny_config(prepared, train=train_, reweight={"strategy": "linupper", "r": 0.4, "warmup_steps": 2},
                       **sections)


@pytest.fixture(scope="module")
def full_run(prepared_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "full"
    train(_cfg(prepared_dir), out, progress=False)
    return out


def _crashed_copy(full: Path, dest: Path, steps: tuple[int, ...], metric_rows: int) -> Path:
    """``full`` as a run that died after ``metric_rows`` steps with the checkpoints ``steps``."""
    (dest / "checkpoints").mkdir(parents=True)
    for s in steps:
        shutil.copytree(full / "checkpoints" / f"step_{s:08d}", dest / "checkpoints" / f"step_{s:08d}")
    shutil.copy(full / "run.json", dest / "run.json")
    rows = (full / "metrics.jsonl").read_text().splitlines()[:metric_rows]
    (dest / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return dest


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


@pytest.mark.parametrize("damage", ["truncated engine.pt", "invalid trainer_state.json", "missing engine.pt"])
def test_damaged_newest_checkpoint_falls_back_and_torn_metrics_line_is_dropped(prepared_dir, full_run, tmp_path,
                                                                                damage):
    run = _crashed_copy(full_run, tmp_path / "run", (2, 4), metric_rows=5)
    newest = run / "checkpoints" / "step_00000004"
    if damage == "truncated engine.pt":
        data = (newest / "engine.pt").read_bytes()
        (newest / "engine.pt").write_bytes(data[: len(data) // 2])
    elif damage == "invalid trainer_state.json":
        (newest / ckpt.STATE).write_text("{not json")
    else:
        (newest / "engine.pt").unlink()
    with open(run / "metrics.jsonl", "a") as handle:  # the disk filled up in the middle of a row
        handle.write('{"step": 6, "loss": 3.1')
    with pytest.warns(UserWarning) as warned:
        train(_cfg(prepared_dir), run, resume=True, progress=False)
    messages = [str(w.message) for w in warned]
    assert any("skipping damaged checkpoint" in m and "step_00000004" in m for m in messages), messages
    assert any("dropping its last line" in m for m in messages), messages
    assert _losses(run) == _losses(full_run)  # resumed from step 2, exactly
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))
    retired = list((run / "checkpoints" / "retired").glob("*/step_00000004"))
    assert len(retired) == 1  # the damaged checkpoint is kept aside, not overwritten or deleted


def test_resume_refuses_unchangeable_keys_in_one_line(prepared_dir, full_run, tmp_path, capsys):
    run = _crashed_copy(full_run, tmp_path / "run", (2,), metric_rows=3)
    config = tmp_path / "c.yaml"
    config.write_text((full_run / "config.yaml").read_text())
    code = main(["train", "--config", str(config), "--out", str(run), "--resume", "--quiet",
                 "--set", "model.size=small", "--set", "data.seq_len=16", "--set", "train.seed=5",
                 "--set", "optim.lr=0.001", "--set", "data.micro_batch_size=2", "--set", "train.max_steps=1",
                 "--set", "reweight.warmup_steps=0", "--set", "optim.beta2=0.99"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1, err
    for part in ("model.size 'tiny' -> 'small'", "data.seq_len 32 -> 16", "train.seed 0 -> 5",
                 "optim.beta2 0.95 -> 0.99", "train.max_steps 1 is below the checkpoint's step 2"):
        assert part in err[0], (part, err[0])
    assert "optim.lr" not in err[0] and "micro_batch" not in err[0]  # may change: not part of the refusal
    assert _losses(run) == _losses(full_run)[:3]  # nothing was touched


def test_allowed_changes_take_effect(prepared_dir, full_run, tmp_path, capsys):
    """A new lr, max_steps and mixture apply from the resumed step; a domain never trained refuses."""
    run = _crashed_copy(full_run, tmp_path / "run", (2,), metric_rows=2)
    changed = _cfg(prepared_dir, optim={"lr": 0.002, "warmup_steps": 2}, train={"max_steps": 8},
                   data={"mixture": {"code": 0.8, "numbers": 0.0, "prose": 0.2}})
    train(changed, run, resume=True, progress=False)
    said = capsys.readouterr().err
    assert "resuming from step 2" in said and "optim.lr 0.01 -> 0.002" in said and "train.max_steps 6 -> 8" in said
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for row in rows[2:]:
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, 0.002, 2, 8, 0.1))
        assert (row["mixture/code"], row["mixture/numbers"], row["mixture/prose"]) == pytest.approx((0.8, 0.0, 0.2))
    drawn = [k for r in rows[2:] for k in r if k.startswith("loss/")]
    assert "loss/numbers" not in drawn and "loss/code" in drawn  # the sampler really uses the new weights
    assert rows[1]["mixture/numbers"] > 0.1  # before the resume: the old (natural) mixture
    # A mixture cannot add a domain the checkpoint never trained (its position in it is undefined).
    narrow = tmp_path / "narrow"
    train(_cfg(prepared_dir, data={"train_domains": ["code", "prose"]}, train={"max_steps": 3}), narrow,
          progress=False)
    with pytest.raises(ResumeError, match="trained domains: numbers not trained before"):
        train(_cfg(prepared_dir, train={"max_steps": 4}), narrow, resume=True, progress=False)


def test_resume_from_an_older_step_retires_the_newer_checkpoints(prepared_dir, full_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    assert main(["train", "--config", str(run / "config.yaml"), "--out", str(run), "--resume-from", "3"]) == 2
    err = capsys.readouterr().err
    assert "--resume-from 3: no checkpoint" in err and "step_00000002, step_00000004, step_00000006" in err
    with pytest.warns(UserWarning, match="checkpoints newer than step_00000002 belong to the continuation"):
        train(_cfg(prepared_dir, optim={"lr": 0.005, "warmup_steps": 2}), run, resume_from="2", progress=False)
    retired = next((run / "checkpoints" / "retired").iterdir())
    assert sorted(p.name for p in retired.iterdir()) == ["step_00000004", "step_00000006"]
    assert [p.name for p in ckpt.regular_checkpoints(run / "checkpoints")] == \
        ["step_00000002", "step_00000004", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    rows = read_metrics(run)
    assert _losses(run)[:3] == _losses(full_run)[:3] and rows[3]["lr"] != read_metrics(full_run)[3]["lr"]
    assert ckpt.read_state(run / "checkpoints" / "step_00000006")["config"]["optim"]["lr"] == 0.005


def test_resume_of_a_finished_run_logs_nothing_twice(prepared_dir, tmp_path, capsys):
    cfg = _cfg(prepared_dir, train={"max_steps": 3, "checkpoint_interval": 0, "eval_interval": 2})
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    evals = (out / "eval.jsonl").read_text()
    result = train(cfg, out, resume=True, progress=False)
    assert "already finished at step 3" in capsys.readouterr().err
    assert (out / "eval.jsonl").read_text() == evals and result.steps == 3 and set(result.final_eval) == \
        {"code", "numbers", "prose"}
    # Killed after the final checkpoint, before the final evaluation: only the evaluation runs.
    (out / "summary.json").unlink()
    (out / "eval.jsonl").write_text(evals.splitlines()[0] + "\n")
    train(cfg, out, resume=True, progress=False)
    assert (out / "eval.jsonl").read_text() == evals and (out / "summary.json").is_file()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_nan_stop_then_resume_with_lower_lr_keeps_the_predivergence_checkpoints(prepared_dir, tmp_path,
                                                                                 monkeypatch):
    """The issue's scenario: every retry stops again; the checkpoints before the trouble survive."""
    monkeypatch.setenv("MEGAREWEIGHT_FAULT_NAN", "5:0:all,6:0:all")  # steps 5-6: every sample non-finite
    cfg = _cfg(prepared_dir, train={"max_steps": 8, "keep_checkpoints": 1, "max_nonfinite_steps": 2})
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="2 consecutive steps .* --resume restarts from the last regular "
                                            "checkpoint step_00000004"):
        train(cfg, out, progress=False)
    root = out / "checkpoints"
    for attempt, lr in enumerate((0.005, 0.0025)):
        with pytest.raises(TrainingError, match="--resume-from .*nonfinite_step_00000006"):
            train(_cfg(prepared_dir, optim={"lr": lr, "warmup_steps": 2},
                       train={"max_steps": 8, "keep_checkpoints": 1, "max_nonfinite_steps": 2}),
                  out, resume=True, progress=False)
        assert [p.name for p in ckpt.regular_checkpoints(root)] == ["step_00000004"], attempt
        assert ckpt.problem(root / "step_00000004") is None
    stop = root / "nonfinite_step_00000006"
    weights = torch.load(stop / "engine.pt", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values())
    # Bad data rather than divergence: continue after the bad batches from the stop checkpoint.
    monkeypatch.delenv("MEGAREWEIGHT_FAULT_NAN")
    result = train(cfg, out, resume_from=str(stop), progress=False)
    assert result.steps == 8 and read_metrics(out)[-1]["skipped_steps"] == 2


def test_resumed_run_continues_the_same_wandb_run(prepared_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(prepared_dir, train={"max_steps": 3}, wandb={"mode": "offline"}), out, progress=False)
    train(_cfg(prepared_dir, train={"max_steps": 5}, wandb={"mode": "offline"}), out, resume=True, progress=False)
    files = find_run_files(out / "wandb")
    expected = json.loads((out / "run.json").read_text())["wandb_id"]
    assert len(files) == 2 and {read_run_id(f) for f in files} == {expected}
    steps = [row["_step"] for row in read_history(files[-1]) if "train/loss" in row]
    assert steps == [4, 5]

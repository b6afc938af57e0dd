"""Checkpoints: damaged ones are skipped, pruning keeps the newest, failed writes and non-finite
parameters never replace a good checkpoint."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from megareweight.cli import main
from megareweight.train import checkpoint as ckpt
from megareweight.train.engine import PlainEngine
from megareweight.train.loop import TrainingError, train
from tests._launch import read_metrics
from tests.conftest import tiny_config


def _fake(root, step, payload=b"x" * 100):
    return ckpt.save_checkpoint(root, step, {"step": step}, lambda d: (d.mkdir(parents=True),
                                                                        (d / "engine.pt").write_bytes(payload)))


def test_manifest_detects_truncation_missing_files_and_bad_state(tmp_path):
    root = tmp_path / "checkpoints"
    good, bad = _fake(root, 2), _fake(root, 4)
    assert ckpt.problem(bad) is None and (root / "latest").read_text() == "step_00000004"
    (bad / "engine.pt").write_bytes(b"x" * 10)
    assert "engine.pt has 10 bytes but 100 were written" in ckpt.problem(bad)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_00000004: engine.pt has 10 bytes"):
        assert ckpt.find_latest(root) == good
    (bad / "engine.pt").unlink()
    assert ckpt.problem(bad) == "engine.pt is missing"
    bad2 = _fake(root, 6)
    (bad2 / ckpt.STATE).write_text('{"step": 6, "sam')  # same size is not needed: JSON is checked too
    assert "trainer_state.json" in ckpt.problem(bad2)


def test_prune_keeps_the_newest_and_never_the_protected_one(tmp_path):
    root = tmp_path / "checkpoints"
    paths = [_fake(root, s) for s in (2, 4, 6, 8)]
    (paths[3] / "engine.pt").write_bytes(b"")  # newest damaged: not counted, not deleted
    assert ckpt.prune(root, 2) == [paths[0]]
    assert [p.name for p in ckpt.regular_checkpoints(root)] == ["step_00000004", "step_00000006", "step_00000008"]
    # The checkpoint just written is never deleted, even where it is not the newest by step.
    assert ckpt.prune(root, 1, protect=paths[1]) == [] and paths[1].is_dir() and paths[2].is_dir()
    assert ckpt.prune(root, 1) == [paths[1]] and ckpt.prune(root, 0) == []


def test_retire_newer_moves_them_out_of_the_way(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        _fake(root, s)
    dest = ckpt.retire_newer(root, 2)
    assert sorted(p.name for p in dest.iterdir()) == ["step_00000004", "step_00000006"]
    assert [p.name for p in ckpt.regular_checkpoints(root)] == ["step_00000002"]
    assert ckpt.retire_newer(root, 2) is None


def _disk_full_on_save(monkeypatch, fail_on: int):
    """PlainEngine.save writes half a file and then fails with ENOSPC on its ``fail_on``-th call."""
    calls = {"n": 0}
    real = PlainEngine.save

    def save(self, directory):
        calls["n"] += 1
        if calls["n"] == fail_on:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "engine.pt").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "engine.pt"))
        real(self, directory)

    monkeypatch.setattr(PlainEngine, "save", save)


def test_disk_full_during_checkpoint_is_one_line_and_keeps_the_previous(prepared_dir, tmp_path, monkeypatch, capsys):
    _disk_full_on_save(monkeypatch, fail_on=2)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"size": "tiny"}, "loss": {"impl": "chunked"}, "wandb": {"mode": "disabled"},
                                  "data": {"prepared": str(prepared_dir), "seq_len": 32, "micro_batch_size": 4},
                                  "train": {"max_steps": 6, "eval_interval": 0, "checkpoint_interval": 2}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "writing checkpoint" in err[0] and "No space left on device" in err[0], err
    assert "the newest intact checkpoint is step_00000002" in err[0]
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # the partial write is gone
    assert ckpt.find_latest(root).name == "step_00000002" and ckpt.problem(root / "step_00000002") is None
    monkeypatch.undo()  # space freed: the run resumes from the intact checkpoint and finishes
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))


def test_nonfinite_parameters_are_never_saved(prepared_dir, tmp_path):
    calls = {"n": 0}

    def factory(module, cfg):
        engine = PlainEngine(module, cfg, torch.device("cpu"))
        step = engine.step

        def poisoned_step(*args, **kwargs):
            norm = step(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3:  # an update with a finite gradient norm that still left an inf weight
                with torch.no_grad():
                    next(engine.module.parameters())[0, 0] = float("inf")
            return norm

        engine.step = poisoned_step
        return engine

    cfg = tiny_config(prepared_dir, train={"max_steps": 6, "eval_interval": 0, "checkpoint_interval": 2})
    with pytest.raises(TrainingError, match="parameters are not finite after step 4; no checkpoint written"):
        train(cfg, tmp_path / "run", engine_factory=factory, progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.regular_checkpoints(root)] == ["step_00000002"]
    assert (root / "latest").read_text() == "step_00000002"
    weights = torch.load(root / "step_00000002" / "engine.pt", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in weights.values())

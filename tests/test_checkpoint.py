"""Checkpoints: damaged ones are skipped, pruning keeps the newest, failed writes and non-finite
parameters never replace a good checkpoint."""
from __future__ import annotations

import errno
import json
import shutil
import warnings

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


def flip_exponent_bit(path, name: str = "embed.weight") -> None:
    """Set the top exponent bit of the first float32 of ``name`` inside a torch.save file (same size).

    The tensor's bytes are found by content, so the zip layout of torch.save does not matter.
    """
    tensor = torch.load(path, weights_only=True)["model"][name].float().contiguous()
    needle = tensor.flatten()[:8].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + 3] ^= 0x40  # little-endian float32: byte 3 holds the sign and the top exponent bits
    path.write_bytes(bytes(data))


def test_checksums_catch_a_changed_byte_that_keeps_the_size(tmp_path):
    root = tmp_path / "checkpoints"
    good, bad = _fake(root, 2, b"x" * 100), _fake(root, 4, b"x" * 100)
    manifest = json.loads((bad / ckpt.COMPLETE).read_text())
    assert set(manifest["xxh3_128"]) == set(manifest["files"]) == {"engine.pt", ckpt.STATE}
    (bad / "engine.pt").write_bytes(b"x" * 99 + b"y")
    assert ckpt.problem(bad) is None  # sizes alone cannot see it
    assert ckpt.problem(bad, content=True).startswith("engine.pt xxh3_128 checksum mismatch")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_00000004: engine.pt xxh3_128 checksum"):
        assert ckpt.find_latest(root, content=True) == good
    (good / "engine.pt").write_bytes(b"z" * 100)
    latest, damaged = ckpt.scan(root, warn=False, content=True)
    assert latest is None and [p.name for p, _ in damaged] == ["step_00000004", "step_00000002"]
    assert ckpt.none_intact(root, damaged).startswith(
        f"no intact checkpoint in {root}: step_00000004: engine.pt xxh3_128 checksum mismatch")


def test_checkpoints_without_checksums_still_load_with_one_warning(tmp_path):
    old = _fake(tmp_path / "checkpoints", 2)
    manifest = json.loads((old / ckpt.COMPLETE).read_text())
    del manifest["xxh3_128"]  # as written before checksums existed
    (old / ckpt.COMPLETE).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="written before checkpoints carried checksums; checked by file sizes only"):
        assert ckpt.problem(old, content=True) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.problem(old, content=True) is None  # once per checkpoint, not at every look


def test_flipped_bit_in_engine_pt_is_never_resumed_evaluated_or_exported(prepared_dir, corpus_dir, tmp_path, capsys):
    """The audit's case: one exponent bit of engine.pt flipped (same size). --resume falls back to the
    previous checkpoint; eval/export of a run whose only checkpoint is damaged say why in one line."""
    cfg = tiny_config(prepared_dir, train={"max_steps": 4, "eval_interval": 0, "checkpoint_interval": 2})
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    newest = run / "checkpoints" / "step_00000004"
    flip_exponent_bit(newest / "engine.pt")
    assert ckpt.problem(newest) is None  # the size check alone would resume it
    for argv in (["eval", "--checkpoint", str(run), "--data", str(corpus_dir / "code.jsonl")],
                 ["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")],
                 ["eval", "--checkpoint", str(newest), "--data", str(corpus_dir / "code.jsonl")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "step_00000004" in err[0] and "engine.pt xxh3_128 checksum mismatch" in err[0], err
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    # --resume with only the damaged checkpoint refuses instead of starting over at step 0.
    config = tmp_path / "c.yaml"
    config.write_text((full / "config.yaml").read_text())
    assert main(["train", "--config", str(config), "--out", str(run), "--resume", "--quiet",
                 "--set", "train.max_steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume: no intact checkpoint" in err[0] and "engine.pt xxh3_128 checksum" in err[0]
    # With an intact older one, --resume falls back to it (the existing policy for damaged checkpoints).
    shutil.copytree(full / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_00000004: engine.pt xxh3_128"):
        train(cfg, run, resume=True, progress=False)
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(full)]


def test_nonfinite_parameters_in_an_unchecksummed_checkpoint_are_refused(prepared_dir, corpus_dir, tmp_path,
                                                                         capsys):
    cfg = tiny_config(prepared_dir, train={"max_steps": 2, "eval_interval": 0})
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    last = run / "checkpoints" / "step_00000002"
    state = torch.load(last / "engine.pt", weights_only=True)
    state["model"]["norm.weight"][0] = float("inf")
    torch.save(state, last / "engine.pt")
    manifest = json.loads((last / ckpt.COMPLETE).read_text())  # an older checkpoint: sizes only
    del manifest["xxh3_128"]
    manifest["files"]["engine.pt"] = (last / "engine.pt").stat().st_size
    (last / ckpt.COMPLETE).write_text(json.dumps(manifest))
    assert main(["eval", "--checkpoint", str(run), "--data", str(corpus_dir / "code.jsonl")]) == 2
    assert "parameter norm.weight has non-finite values" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="parameters are not finite after loading"):
        train(tiny_config(prepared_dir, train={"max_steps": 3, "eval_interval": 0}), run, resume=True,
              progress=False)


def test_a_modified_tokenizer_copy_is_blamed_on_the_checkpoints_file(prepared_dir, corpus_dir, tmp_path, capsys):
    """Not on "the run's prepared directory", which is intact."""
    run = tmp_path / "run"
    train(tiny_config(prepared_dir, train={"max_steps": 2, "eval_interval": 0}), run, progress=False)
    last = run / "checkpoints" / "step_00000002"
    copy = last / "tokenizer.model"
    copy.write_bytes(copy.read_bytes()[:-1] + bytes([copy.read_bytes()[-1] ^ 1]))
    argv = ["eval", "--checkpoint", str(run), "--data", str(corpus_dir / "code.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "step_00000002: tokenizer.model xxh3_128 checksum mismatch" in err and "prepared" not in err
    manifest = json.loads((last / ckpt.COMPLETE).read_text())  # a checkpoint from before checksums
    del manifest["xxh3_128"]
    (last / ckpt.COMPLETE).write_text(json.dumps(manifest))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint's own copy {copy} is not the tokenizer" in err and "prepared" not in err

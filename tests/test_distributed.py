"""Multi-process ZeRO-3 on CPU (gloo): equivalence with one process, resume, resume on fewer ranks.

The 1-process reference is the plain engine with ``micro_batch_size = 2 * per-rank micro batch``:
the mixture sampler draws the same global micro-batch (rank-major slots) for both, the reweighting
weights are computed over the same global batch, and the data-parallel gradient average of
``sum_i w_i l_i * world_size`` is ``sum_i w_i grad l_i``. So the loss curve, the weights and the
gradient norms must agree to fp32 round-off.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from megareweight.config import ConfigError, load_config
from megareweight.train import checkpoint as ckpt
from tests._launch import REPO, deepspeed_train, read_metrics

DS_TINY = REPO / "ds_configs" / "zero3_cpu_tiny.json"
STEPS = 4
COMPARED = ("loss", "grad_norm", "weight_max", "weight_min", "weight_entropy")


def write_config(path: Path, prepared: Path, strategy: str, accum: int, mbs: int = 2, tied: bool = True,
                 recompute: str = "none", **train) -> Path:
    raw = {
        "model": {"size": "tiny", "tie_embeddings": tied, "activation_checkpointing": recompute},
        "data": {"prepared": str(prepared), "seq_len": 32, "micro_batch_size": mbs, "eval_sequences": 8},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "train": {"max_steps": STEPS, "eval_interval": 0, "gradient_accumulation_steps": accum, **train},
        "loss": {"impl": "chunked"},
        "reweight": {"strategy": strategy, "r": 0.4},
        "wandb": {"mode": "disabled"},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def plain_reference(config: Path, out: Path) -> list[dict]:
    """The same run in this process on the plain engine with the whole global micro-batch."""
    from megareweight.train.loop import train

    cfg = load_config(config, ["data.micro_batch_size=4"])
    train(cfg, out, progress=False)
    return read_metrics(out)


def assert_same_curve(a: list[dict], b: list[dict], rtol: float = 2e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in COMPARED:
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=rtol, atol=1e-6, err_msg=key)
    for ra, rb in zip(a, b):  # per-domain loss and weight share (a domain may be absent in a step)
        keys = sorted(k for k in ra if k.startswith(("weight_share/", "loss/")))
        assert keys == sorted(k for k in rb if k.startswith(("weight_share/", "loss/")))
        np.testing.assert_allclose([ra[k] for k in keys], [rb[k] for k in keys], rtol=rtol, atol=1e-6)


@pytest.fixture(scope="module")
def linupper_run(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2-rank ZeRO-3, LinUpper, 2 accumulation steps, checkpoints every 2 steps, untied LM head
    (the head module owns its matrix; the tied case, where it borrows the embedding, is
    ``test_uniform_two_ranks_equal_one_process``), the first block recomputed in backward
    (ZeRO-3 re-gathers its weights during recomputation)."""
    root = tmp_path_factory.mktemp("ds_linupper")
    config = write_config(root / "c.yaml", prepared_dir, "linupper", accum=2, tied=False, recompute="every_k",
                          checkpoint_interval=2)
    deepspeed_train(config, DS_TINY, root / "run", 2)
    return config, root / "run"


def test_linupper_two_ranks_equal_one_process_with_accumulation(linupper_run, tmp_path: Path) -> None:
    config, out = linupper_run
    ds = read_metrics(out)
    assert len(ds) == STEPS and ds[-1]["loss"] < ds[0]["loss"]
    assert ds[0]["weight_max"] > ds[0]["weight_min"] * 1.01  # LinUpper really reweights
    assert_same_curve(ds, plain_reference(config, tmp_path / "plain"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "deepspeed-zero3" and summary["world_size"] == 2


@pytest.mark.parametrize("ds_name", ["zero3_cpu_tiny.json", "zero2_cpu_tiny.json"])
def test_uniform_two_ranks_equal_one_process(ds_name: str, prepared_dir: Path, tmp_path: Path) -> None:
    """ZeRO-3 also builds the model under ``deepspeed.zero.Init`` (forced for the tiny model): the
    partitioned initialisation must reproduce the plain model's weights exactly."""
    config = write_config(tmp_path / "c.yaml", prepared_dir, "uniform", accum=1)
    raw = json.loads((REPO / "ds_configs" / ds_name).read_text())
    if raw["zero_optimization"]["stage"] == 3:
        raw["megareweight"] = {"zero_init": True}
    ds_json = tmp_path / "zero3_init.json"
    ds_json.write_text(json.dumps(raw))
    deepspeed_train(config, ds_json, tmp_path / "run", 2)
    ds = read_metrics(tmp_path / "run")
    assert all(abs(r["weight_max"] - 1 / 4) < 1e-7 for r in ds)
    assert_same_curve(ds, plain_reference(config, tmp_path / "plain"))


def _truncate_to(run: Path, dest: Path, step: int) -> Path:
    """A copy of ``run`` as if it had stopped right after the checkpoint at ``step``."""
    shutil.copytree(run, dest)
    ckpts = dest / "checkpoints"
    for c in ckpts.glob("step_*"):
        if int(c.name.split("_")[1]) > step:
            shutil.rmtree(c)
    (ckpts / "latest").write_text(f"step_{step:08d}")
    return dest


def test_resume_two_ranks_reproduces_next_losses_exactly(linupper_run, tmp_path: Path) -> None:
    config, out = linupper_run
    resumed = _truncate_to(out, tmp_path / "resumed", 2)
    deepspeed_train(config, DS_TINY, resumed, 2, "--resume")
    full, again = read_metrics(out), read_metrics(resumed)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "weight_max", "weight_entropy"):
        assert [r[key] for r in again] == [r[key] for r in full], key  # bit-exact
    assert again[-1]["epochs/code"] == full[-1]["epochs/code"]


def assert_resumed_on_new_layout(full_run: Path, resumed: Path) -> None:
    """A run resumed at step 2 on another rank count continues the uninterrupted one."""
    def final_state(run: Path) -> dict:
        return json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())

    full, again = read_metrics(full_run), read_metrics(resumed)
    assert final_state(resumed)["sampler"] == final_state(full_run)["sampler"]  # no sample repeated or skipped
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    # Step 3's loss is measured on the restored weights, before any update on the new layout.
    np.testing.assert_allclose(again[2]["loss"], full[2]["loss"], rtol=1e-6)
    # Later steps: the restored optimizer state agrees to ~1e-5 (universal-checkpoint round-off).
    np.testing.assert_allclose([r["loss"] for r in again], [r["loss"] for r in full], rtol=2e-3)


def test_resume_on_one_rank_continues_stream(linupper_run, tmp_path: Path) -> None:
    """2-rank ZeRO-3 checkpoint -> 1 rank (universal checkpoint), same global batch: the data
    stream continues exactly (same per-domain counts, same first loss), training continues."""
    config, out = linupper_run
    resumed = _truncate_to(out, tmp_path / "resumed", 2)
    deepspeed_train(config, DS_TINY, resumed, 1, "--resume", "--set", "data.micro_batch_size=4")
    assert (resumed / "checkpoints" / "step_00000002" / "engine_universal" / "zero").is_dir()
    assert_resumed_on_new_layout(out, resumed)


def test_resume_on_more_ranks_continues_stream(prepared_dir: Path, tmp_path: Path) -> None:
    """1-rank ZeRO-3 checkpoint -> 2 ranks (universal checkpoint), same global batch."""
    config = write_config(tmp_path / "c.yaml", prepared_dir, "linupper", accum=1, mbs=4, checkpoint_interval=2)
    out = tmp_path / "one"
    deepspeed_train(config, DS_TINY, out, 1)
    resumed = _truncate_to(out, tmp_path / "resumed", 2)
    deepspeed_train(config, DS_TINY, resumed, 2, "--resume", "--set", "data.micro_batch_size=2")
    assert_resumed_on_new_layout(out, resumed)


def test_ds_config_auto_is_filled_and_contradictions_are_errors(prepared_dir: Path) -> None:
    from megareweight.train.ds_engine import resolve_ds_config

    from tests.conftest import tiny_config

    cfg = tiny_config(prepared_dir, train={"gradient_accumulation_steps": 3, "precision": "bf16"})
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        ds = resolve_ds_config(json.loads(path.read_text()), cfg, world_size=8)
        assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3, path
        assert ds["train_batch_size"] == 4 * 3 * 8 and ds["bf16"]["enabled"] is True, path
        assert ds["fp16"]["enabled"] is False and ds["gradient_clipping"] == 1.0, path
        assert "megareweight" not in ds and "auto" not in json.dumps(ds), path
    base = json.loads(DS_TINY.read_text())
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 contradicts data.micro_batch_size=4"):
        resolve_ds_config({**base, "train_micro_batch_size_per_gpu": 8}, cfg, 2)
    with pytest.raises(ConfigError, match="train_batch_size=16 contradicts"):
        resolve_ds_config({**base, "train_batch_size": 16}, cfg, 2)
    with pytest.raises(ConfigError, match="bf16.enabled=False contradicts train.precision"):
        resolve_ds_config({**base, "bf16": {"enabled": False}}, cfg, 2)
    with pytest.raises(ConfigError, match="optimizer.params.lr"):
        resolve_ds_config({**base, "optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, cfg, 2)
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config({**base, "scheduler": {"type": "WarmupLR"}}, cfg, 2)
    explicit = resolve_ds_config({**base, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1}, cfg, 2)
    assert explicit["train_batch_size"] == 24
    with pytest.raises(ConfigError, match="'activation_checkpointing' section; .* model.activation_checkpointing"):
        resolve_ds_config({**base, "activation_checkpointing": {"partition_activations": False}}, cfg, 2)


def test_gpu_configs_reduce_and_accumulate_gradients_in_fp32(prepared_dir: Path) -> None:
    """What DeepSpeed's own parser makes of the GPU configs under bf16 (see ds_configs/README.md)."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    from megareweight.train.ds_engine import resolve_ds_config
    from tests.conftest import tiny_config

    cfg = tiny_config(prepared_dir, train={"precision": "bf16"})
    for name in ("zero3_1.4b", "zero3_7b", "zero2_1.4b", "zero2_7b"):
        ds = DeepSpeedConfig(resolve_ds_config(json.loads((REPO / "ds_configs" / f"{name}.json").read_text()), cfg, 1))
        assert ds.bfloat16_config.enabled, name
        assert ds.communication_data_type == torch.float32 and ds.grad_accum_dtype == "fp32", name


def test_export_from_zero3_checkpoint_matches_one_process(linupper_run, tmp_path: Path) -> None:
    """The 2-rank ZeRO-3 checkpoint consolidates, exports to Hugging Face, and gives the logits of
    the same training done in one process."""
    transformers = pytest.importorskip("transformers")
    import torch

    from megareweight.checkpoint_io import load_model
    from megareweight.cli import main

    config, out = linupper_run
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    plain_reference(config, tmp_path / "plain")
    reference, _ = load_model(tmp_path / "plain")
    ids = torch.randint(0, reference.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(hf(ids).logits.numpy(), reference.logits(ids).numpy(), rtol=1e-3, atol=1e-3)


def plain_faulted_reference(config: Path, out: Path, faults: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    monkeypatch.setenv("MEGAREWEIGHT_FAULT_NAN", faults)
    try:
        return plain_reference(config, out)
    finally:
        monkeypatch.delenv("MEGAREWEIGHT_FAULT_NAN")


def test_zero3_skips_nonfinite_gradients_on_every_rank(prepared_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """MEGAREWEIGHT_FAULT_NAN on 2 ZeRO-3 ranks: step 3 one NaN sample on rank 1 (NaN gradients), step 5
    every sample on both ranks, step 6 one NaN loss only on rank 0. The run must equal the one-process
    run with the same faults: the skipped steps were skipped everywhere, the others applied everywhere."""
    config = write_config(tmp_path / "c.yaml", prepared_dir, "linupper", accum=1, max_steps=6)
    deepspeed_train(config, DS_TINY, tmp_path / "run", 2,
                    env={"MEGAREWEIGHT_FAULT_NAN": "3:1:0,5:0:all,5:1:all,6:0:1:loss"})
    ds = read_metrics(tmp_path / "run")
    # Rank r's sample s is sample 2r+s of the one-process micro-batch (rank-major slots).
    plain = plain_faulted_reference(config, tmp_path / "plain", "3:0:2,5:0:all,6:0:1:loss", monkeypatch)
    assert [r["nonfinite_samples"] for r in ds] == [0, 0, 1, 0, 4, 1]
    assert [r["skipped_steps"] for r in ds] == [0, 0, 1, 1, 2, 2]
    assert not np.isfinite(ds[2]["grad_norm"]) and np.isfinite(ds[5]["grad_norm"])
    applied = [i for i in range(6) if i not in (2, 4)]
    for key in ("loss", "weight_max", "weight_min", "weight_entropy", "nonfinite_samples", "skipped_steps"):
        np.testing.assert_allclose([r[key] for r in ds], [r[key] for r in plain], rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose([ds[i]["grad_norm"] for i in applied], [plain[i]["grad_norm"] for i in applied],
                               rtol=2e-5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(np.isfinite(summary[f"loss/{d}"]) for d in ("code", "numbers", "prose"))


def test_per_document_samples_two_ranks_equal_one_process(prepared_dir: Path, tmp_path: Path) -> None:
    """``packing: documents`` + ``unit: document`` under ZeRO-3: the document mask reaches the model
    through the DeepSpeed engine, every rank all-gathers ``micro_batch * max_documents`` samples
    (a fixed shape), and the weights over documents of the global batch match one process."""
    config = write_config(tmp_path / "c.yaml", prepared_dir, "linupper", accum=1)
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(packing="documents", seq_len=64)
    raw["reweight"].update(unit="document", max_documents=6)
    config.write_text(yaml.safe_dump(raw))
    deepspeed_train(config, DS_TINY, tmp_path / "run", 2)
    ds = read_metrics(tmp_path / "run")
    assert ds[-1]["weight_max"] > ds[-1]["weight_min"] * 1.01 and all(r["nonfinite_samples"] == 0 for r in ds)
    # fp32 round-off of other summation orders grows over the steps (seen: 3e-5 in step 4's grad norm)
    assert_same_curve(ds, plain_reference(config, tmp_path / "plain"), rtol=1e-4)


def test_sigusr1_on_one_rank_stops_all_ranks_with_a_checkpoint(prepared_dir: Path, tmp_path: Path) -> None:
    """SLURM's advance warning reaches only rank 1 (during step 4): both ranks agree to stop after
    step 4, write one checkpoint and exit 138; the resumed run equals the uninterrupted one bit for
    bit; a new run into the directory is refused on every rank (no rank hangs)."""
    config = write_config(tmp_path / "c.yaml", prepared_dir, "linupper", accum=1, max_steps=8)
    deepspeed_train(config, DS_TINY, tmp_path / "full", 2)
    out = tmp_path / "run"
    with pytest.raises(AssertionError, match=r"launcher exited with \[138\]"):
        deepspeed_train(config, DS_TINY, out, 2, env={"MEGAREWEIGHT_FAULT_SIGNAL": "4:1:USR1"})
    log = (tmp_path / "run.log").read_text()
    latest = ckpt.find_latest(out / "checkpoints")
    assert latest.name == "step_00000004" and [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (latest / "engine").glob("*optim_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "SIGUSR1 received by rank 1" in log and f"stopped by SIGUSR1 after step 4; checkpoint {latest}" in log
    deepspeed_train(config, DS_TINY, out, 2, "--resume")
    full, again = read_metrics(tmp_path / "full"), read_metrics(out)
    for key in ("step", "loss", "grad_norm", "weight_max", "weight_entropy"):
        assert [r[key] for r in again] == [r[key] for r in full], key
    with pytest.raises(AssertionError, match=r"launcher exited with \[2\]"):
        deepspeed_train(config, DS_TINY, out, 2, timeout=120)
    assert "already holds a run" in (tmp_path / "run.log").read_text()


def test_deepspeed_versions_that_apply_nan_steps_are_refused() -> None:
    from megareweight.train.ds_engine import check_deepspeed_version

    with pytest.raises(ConfigError, match=r"deepspeed 0\.19\.6 is installed; megareweight needs deepspeed>=0\.19\.8"):
        check_deepspeed_version("0.19.6")
    check_deepspeed_version("0.19.8")


def test_zero3_checkpoint_checksums_cover_every_shard(linupper_run, tmp_path: Path, capsys) -> None:
    """Every file of a 2-rank ZeRO-3 checkpoint (each rank's optimizer shard, the model states, the
    RNG files) has a checksum in COMPLETE; one changed byte in rank 1's optimizer shard is named by
    ``export`` (like ``eval`` and ``--resume``) instead of being loaded."""
    from megareweight.cli import main

    _, out = linupper_run
    last = tmp_path / "step"
    shutil.copytree(out / "checkpoints" / f"step_{STEPS:08d}", last)
    manifest = json.loads((last / ckpt.COMPLETE).read_text())
    shards = [rel for rel in manifest["files"] if "optim_states" in rel]
    assert len(shards) == 2 and set(manifest["xxh3_128"]) == set(manifest["files"])
    assert any("rng_rank00001" in rel for rel in manifest["files"])
    shard = last / next(rel for rel in shards if "rank_1_" in rel)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert ckpt.problem(last) is None
    assert main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{shard.relative_to(last)} xxh3_128 checksum mismatch" in err, err

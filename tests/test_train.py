"""Single-process training: loss falls, determinism, exact resume, wandb values, CLI errors."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from megareweight.cli import main
from megareweight.train.loop import train
from megareweight.train.wandb_reader import find_run_file, read_history
from tests.conftest import tiny_config


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_files_are_written(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, train={"max_steps": 40, "eval_interval": 20},
                      reweight={"strategy": "linupper", "r": 0.5, "warmup_steps": 5})
    result = train(cfg, tmp_path / "run", progress=False)
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 40
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert rows[0]["strategy"] == "uniform" and rows[-1]["strategy"] == "linupper"
    assert rows[-1]["weight_max"] > rows[-1]["weight_min"]  # reweighting is active
    assert rows[0]["weight_ess"] == pytest.approx(4.0)  # uniform: ESS = batch size
    for key in ("tokens", "lr", "weight_entropy", "loss/code", "weight_share/prose", "mixture/numbers", "epochs/code"):
        assert key in rows[-1]
    assert rows[-1]["tokens"] == 40 * 4 * 32
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [20, 40]
    assert set(result.final_eval) == {"code", "numbers", "prose"}
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000040"


def test_same_seed_same_curve_and_other_seed_differs(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, reweight={"strategy": "quadratic", "r": 0.4})
    train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    other = tiny_config(prepared_dir, reweight={"strategy": "quadratic", "r": 0.4}, train={"seed": 1})
    train(other, tmp_path / "c", progress=False)
    # Batches built on the main thread (no prefetch) give the same curve as prefetched ones.
    inline = tiny_config(prepared_dir, reweight={"strategy": "quadratic", "r": 0.4}, data={"prefetch": 0})
    train(inline, tmp_path / "d", progress=False)
    la, lb, lc, ld = ([r["loss"] for r in _metrics(tmp_path / x)] for x in "abcd")
    assert la == lb == ld
    assert la != lc


def test_domain_strategy_weights_each_domain_by_its_constant(prepared_dir, tmp_path):
    """strategy=domain with equal constants is uniform, step for step; with unequal ones every
    step's weight share is the uniform run's share (the batch's domain counts, same data order)
    times c_d, renormalised over the micro-batch."""
    def run(name, **reweight):
        cfg = tiny_config(prepared_dir, train={"max_steps": 6, "eval_interval": 0}, reweight=reweight)
        train(cfg, tmp_path / name, progress=False)
        return _metrics(tmp_path / name)

    uniform = run("uniform", strategy="uniform")
    equal = run("equal", strategy="domain", domain_weights={"code": 2.0, "numbers": 2.0, "prose": 2.0})
    assert [r["loss"] for r in equal] == [r["loss"] for r in uniform]
    c = {"code": 4.0, "numbers": 1.0, "prose": 0.5}
    skewed = run("skewed", strategy="domain", domain_weights=c, warmup_steps=2)
    assert [r["strategy"] for r in skewed] == ["uniform"] * 2 + ["domain"] * 4
    assert [r["loss"] for r in skewed[:3]] == [r["loss"] for r in uniform[:3]]  # warm-up, then first domain step
    for u, s in zip(uniform[2:], skewed[2:]):
        norm = sum(c[d] * u[f"weight_share/{d}"] for d in c)
        for d in c:
            assert s[f"weight_share/{d}"] == pytest.approx(c[d] * u[f"weight_share/{d}"] / norm, abs=1e-6)
    assert any(r["weight_ess"] < 4.0 - 1e-3 for r in skewed[2:])


@pytest.mark.parametrize("weights,message", [
    ({"code": 1.0, "numbers": 1.0}, "reweight.domain_weights: no weight for trained domain 'prose'"),
    ({"code": 1.0, "numbers": 1.0, "prose": 1.0, "poetry": 1.0}, "reweight.domain_weights: 'poetry' is not a trained domain"),
])
def test_domain_weights_must_match_the_trained_domains(prepared_dir, tmp_path, capsys, weights, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{prepared: {prepared_dir}}}\nmodel: {{size: tiny}}\n"
                   f"reweight: {{strategy: domain, domain_weights: {json.dumps(weights)}}}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_resume_reproduces_the_uninterrupted_run(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, train={"max_steps": 10, "checkpoint_interval": 4, "eval_interval": 0},
                      reweight={"strategy": "linupper", "r": 0.4, "warmup_steps": 2})
    full = tmp_path / "full"
    train(cfg, full, progress=False)
    # A run that died after step 6: it has the step-4 checkpoint and metrics up to step 6.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000004")
    rows = (full / "metrics.jsonl").read_text().splitlines()[:6]
    (resumed / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    train(cfg, resumed, resume=True, progress=False)
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in _metrics(full)]
    assert [r["step"] for r in _metrics(resumed)] == list(range(1, 11))


def test_throughput_telemetry_and_cumulative_tokens_across_a_batch_change(prepared_dir, tmp_path):
    """tokens/s and TFLOP/s on every logged row (CPU too); MFU only with a known peak; ``tokens``
    counts what was trained, also after resuming with a smaller global batch."""
    from megareweight.model import model_args
    from megareweight.train.throughput import flops_per_token

    run = tmp_path / "run"
    first = tiny_config(prepared_dir, train={"max_steps": 2, "eval_interval": 0, "log_interval": 2})
    train(first, run, progress=False)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [2]  # log_interval 2: one row, covering two steps
    assert rows[0]["tokens_per_s"] > 0 and "mfu" not in rows[0] and "max_memory_gib" not in rows[0]
    fpt = flops_per_token(model_args("tiny", vocab_size=320), 32)
    assert rows[0]["model_tflops"] == pytest.approx(rows[0]["tokens_per_s"] * fpt / 1e12)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["flops_per_token"] == fpt and summary["peak_tflops"] is None

    smaller = tiny_config(prepared_dir, data={"micro_batch_size": 2},
                          train={"max_steps": 4, "eval_interval": 0, "peak_tflops": 0.5})
    result = train(smaller, run, resume=True, progress=False)
    rows = _metrics(run)
    assert [r["tokens"] for r in rows] == [2 * 4 * 32, 2 * 4 * 32 + 2 * 32, 2 * 4 * 32 + 2 * 2 * 32]
    assert result.tokens == rows[-1]["tokens"]
    assert all(r["mfu"] == pytest.approx(r["model_tflops"] / 0.5) for r in rows[1:])
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["tokens"] == rows[-1]["tokens"]


def test_compiled_model_gives_the_same_losses(prepared_dir, tmp_path):
    """``train.compile``: compiled blocks (with activation checkpointing inside) and compiled
    element-wise ops (the ZeRO-3 path) match eager to fp32 round-off (Inductor on CPU)."""
    losses = {}
    for mode in (False, "blocks", "ops"):
        cfg = tiny_config(prepared_dir, train={"max_steps": 2, "eval_interval": 0, "compile": mode},
                          data={"eval_sequences": 4}, model={"activation_checkpointing": "every_k"},
                          reweight={"strategy": "linupper"})
        train(cfg, tmp_path / str(mode), progress=False)
        losses[mode] = [r["loss"] for r in _metrics(tmp_path / str(mode))]
    np.testing.assert_allclose(losses["blocks"], losses[False], rtol=1e-5)
    np.testing.assert_allclose(losses["ops"], losses[False], rtol=1e-5)


def test_wandb_offline_values_read_back(prepared_dir, tmp_path):
    cfg = tiny_config(prepared_dir, wandb={"mode": "offline"},
                      train={"max_steps": 6, "eval_interval": 3, "histogram_interval": 2},
                      reweight={"strategy": "linupper"})
    train(cfg, tmp_path / "run", progress=False)
    history = read_history(find_run_file(tmp_path / "run" / "wandb"))
    logged = {row["_step"]: row for row in history if "train/loss" in row}
    for row in _metrics(tmp_path / "run"):
        assert logged[row["step"]]["train/loss"] == pytest.approx(row["loss"])
        assert logged[row["step"]]["train/weight_max"] == pytest.approx(row["weight_max"])
        assert logged[row["step"]]["train/tokens_per_s"] == pytest.approx(row["tokens_per_s"])
        assert logged[row["step"]]["train/model_tflops"] == pytest.approx(row["model_tflops"])
    evals = [row for row in history if "eval/loss/prose" in row]
    assert [row["_step"] for row in evals] == [3, 6]
    hists = [row for row in history if "train/weight_hist/values" in row]  # nested keys come joined
    assert [row["_step"] for row in hists] == [2, 4, 6]
    assert hists[0]["train/weight_hist/_type"] == "histogram"
    assert sum(hists[0]["train/weight_hist/values"]) == 4  # one count per sample of the batch
    assert "train/mixture/prose" in logged[1] and "train/weight_share/code" in logged[1]


def test_cli_bad_config_is_one_line_exit_2(prepared_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{prepared: {prepared_dir}}}\nreweight: {{strategy: linupr}}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megareweight: error: reweight.strategy: 'linupr' is not allowed")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--set", "reweight.strategy=linupper",
                 "--set", "data.train_domains=[code, web]"]) == 2
    assert "data.train_domains: unknown domain 'web'" in capsys.readouterr().err
    assert main(["prepare", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "p")]) == 2
    assert "corpus directory not found" in capsys.readouterr().err


def test_cli_train_and_verify(prepared_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{size: tiny}}\ndata: {{prepared: {prepared_dir}, seq_len: 16, micro_batch_size: 2}}\n"
                   "train: {max_steps: 3, eval_interval: 0}\nwandb: {mode: disabled}\nloss: {impl: reference}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert len(_metrics(tmp_path / "o")) == 3
    assert main(["verify", str(prepared_dir)]) == 0
    assert "OK" in capsys.readouterr().out


def test_z_loss_is_trained_and_logged_on_its_own(prepared_dir, tmp_path):
    """loss.z_loss: the first step's cross-entropy is the same as without it (same init and
    batch), ``loss`` stays the cross-entropy, and the z-loss is logged overall and per domain."""
    base = tiny_config(prepared_dir, train={"max_steps": 3, "eval_interval": 0})
    with_z = tiny_config(prepared_dir, train={"max_steps": 3, "eval_interval": 0}, loss={"impl": "chunked", "z_loss": 1e-3})
    train(base, tmp_path / "base", progress=False)
    train(with_z, tmp_path / "z", progress=False)
    plain, z = _metrics(tmp_path / "base"), _metrics(tmp_path / "z")
    assert z[0]["loss"] == plain[0]["loss"] and "z_loss" not in plain[0]
    for row in z:
        assert row["z_loss"] > 0 and all(row[f"z_loss/{d}"] > 0 for d in ("code", "numbers", "prose") if f"loss/{d}" in row)
    assert z[-1]["loss"] != plain[-1]["loss"]  # the z-loss gradient changed the update


def test_loss_mode_is_decided_once_and_kept_on_resume(prepared_dir, tmp_path):
    """mode auto is resolved at the start from the budget (loss.fast_memory_gb), stored in the
    checkpoints and the summary, and a resumed run keeps it even if the budget would now differ."""
    run = tmp_path / "run"
    tiny = 1e-9  # a budget of one byte: auto -> lean
    cfg = tiny_config(prepared_dir, train={"max_steps": 4, "checkpoint_interval": 2, "eval_interval": 0},
                      loss={"impl": "chunked", "fast_memory_gb": tiny})
    train(cfg, run, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loss_plan"]["mode"] == "lean" and summary["loss_plan"]["chunk_size"] > 0
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["loss_plan"] == summary["loss_plan"]
    more = tiny_config(prepared_dir, train={"max_steps": 6, "checkpoint_interval": 2, "eval_interval": 0},
                       loss={"impl": "chunked", "fast_memory_gb": tiny})
    more.loss.fast_memory_gb = 0.0  # default budget (1 GiB on CPU) would choose fast
    train(more, run, resume=True, progress=False)
    assert json.loads((run / "summary.json").read_text())["loss_plan"]["mode"] == "lean"
    fresh = tmp_path / "fresh"
    train(more, fresh, progress=False)
    assert json.loads((fresh / "summary.json").read_text())["loss_plan"]["mode"] == "fast"


def test_a_validation_split_shorter_than_a_window_is_refused_before_the_run_starts(prepared_dir, tmp_path, capsys):
    """Its loss would be NaN in eval.jsonl and summary.json (and the averages), read as a result."""
    from megareweight.data.shards import PreparedData
    from megareweight.train.loop import check_validation_splits

    data = PreparedData.open(prepared_dir)
    short = data.stream("valid", "code").num_tokens
    cfg = tiny_config(prepared_dir, data={"seq_len": short}, model={"max_seq_len": short})
    with pytest.raises(ValueError, match=rf"^data.eval_domains: domain 'code' has {short} validation tokens, fewer than "
                                         rf"one window of data.seq_len \+ 1 = {short + 1}; exclude it with "
                                         "data.eval_domains"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory is taken
    longer = [d for d in data.domains if data.stream("valid", d).num_windows(short) == 1]
    assert longer, "the fixture needs a domain with exactly one validation window at this length"
    check_validation_splits(data, longer, short, world_size=1)
    with pytest.raises(ValueError, match=rf"domain '{longer[0]}' has 1 validation window\(s\) of {short + 1} tokens, "
                                         "fewer than the 2 ranks"):
        check_validation_splits(data, longer, short, world_size=2)


def test_wandb_dir_pointing_at_a_file_is_refused_naming_the_key(prepared_dir, tmp_path):
    """wandb.init failed after the model was built with "[Errno 17] File exists", naming no key."""
    from megareweight.config import ConfigError

    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for where, message in ((afile, f"wandb.dir: {afile} is a file, not a directory"),
                           (afile / "sub", f"wandb.dir: cannot create the directory {afile / 'sub'} (Not a directory)")):
        cfg = tiny_config(prepared_dir, wandb={"mode": "offline", "dir": str(where)})
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            train(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_training_with_pytorchs_core_linear_cross_entropy(prepared_dir, tmp_path):
    """loss.impl=torch_core trains through the whole loop (its loss matches the reference's in
    tests/test_kernels.py) and says so in the summary."""
    cfg = tiny_config(prepared_dir, train={"max_steps": 2, "eval_interval": 0}, loss={"impl": "torch_core"},
                      reweight={"strategy": "linupper", "r": 0.4})
    result = train(cfg, tmp_path / "core", progress=False)
    assert result.loss_impl == "torch_core" and len(_metrics(tmp_path / "core")) == 2

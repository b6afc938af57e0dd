"""``megareweight model-info``: exact counts from the meta device, DeepSpeed's ZeRO-3 estimate, FLOPs."""
from __future__ import annotations

import json

import pytest

from megareweight.cli import main
from megareweight.model import build_model, count_parameters, model_args
from megareweight.model_info import model_info


def test_parameter_counts_are_exact() -> None:
    # 7b has LLaMA-2 7B's shapes: its published count is 6,738,415,616.
    assert model_info("7b")["parameters"] == 6_738_415_616
    info = model_info("1.4b")
    d, layers, v, ffn = 2048, 24, 32000, 5632
    by_hand = 2 * v * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d
    assert info["parameters"] == by_hand
    assert info["matmul_parameters"] == by_hand - v * d - (2 * layers + 1) * d
    tiny = build_model(model_args("tiny", vocab_size=320))
    assert model_info("tiny", vocab_size=320, seq_len=32)["parameters"] == count_parameters(tiny)


def test_memory_scales_with_gpus_and_flops_formula() -> None:
    one = model_info("7b", nodes=1, gpus_per_node=8)
    four = model_info("7b", nodes=4, gpus_per_node=8)
    assert four["zero3_model_states_gib_per_gpu"] < one["zero3_model_states_gib_per_gpu"]
    # 18 bytes per parameter over 8 GPUs plus the largest layer in fp32 (DeepSpeed's estimator).
    expected = (18 * one["parameters"] / 8 + 4 * one["largest_layer_parameters"]) / 1024**3
    assert one["zero3_model_states_gib_per_gpu"] == pytest.approx(expected, rel=1e-3)
    assert one["flops_per_token"] == 6 * one["matmul_parameters"] + 12 * 32 * 4096 * 2048


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model-info", "--size", "1.4b", "--nodes", "2", "--gpus-per-node", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["parameters"] == model_info("1.4b")["parameters"] and out["nodes"] == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gpus-per-node"):
        model_info("7b", gpus_per_node=0)
    with pytest.raises(ValueError, match="seq-len"):
        model_info("tiny", seq_len=100_000)


def test_shape_overrides_like_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    """``--d-model`` etc. size a config's ``model.*`` overrides before training (the LM experiment's model)."""
    argv = ["model-info", "--size", "small", "--vocab-size", "4096", "--seq-len", "128", "--gpus-per-node", "1",
            "--d-model", "192", "--n-heads", "6", "--ffn-dim", "512", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["parameters"] == 2_557_632
    assert main(["model-info", "--size", "small", "--d-model", "100", "--n-heads", "3"]) == 2
    assert "model.d_model: 100 is not divisible by model.n_heads (3)" in capsys.readouterr().err

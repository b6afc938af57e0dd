"""FLOPs per token, device peaks, the throughput meter, and the benchmark row (launch/bench_gpu.sh's Python half)."""
from __future__ import annotations

import json

import pytest
import torch

from megareweight.model import model_args
from megareweight.model_info import model_info
from megareweight.train.bench import bench_row, device_slug, main as bench_main, write_row
from megareweight.train.loop import train
from megareweight.train.throughput import ThroughputMeter, flops_per_token, lookup_peak_tflops, peak_tflops
from tests.conftest import tiny_config


def test_flops_per_token_by_hand_and_shared_with_model_info() -> None:
    d, layers, v, ffn, t = 2048, 24, 32000, 5632, 2048
    matmul = v * d + layers * (4 * d * d + 3 * d * ffn)  # untied: the head counts, the lookup does not
    assert flops_per_token(model_args("1.4b", vocab_size=v), t) == 6 * matmul + 12 * layers * d * t
    assert model_info("1.4b", seq_len=t)["flops_per_token"] == 6 * matmul + 12 * layers * d * t
    tied = model_args("125m", vocab_size=v)  # tied: the shared matrix counts once, as the head
    d, layers, ffn = 768, 12, 2048
    assert flops_per_token(tied, t) == 6 * (v * d + layers * (4 * d * d + 3 * d * ffn)) + 12 * layers * d * t


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_table(name: str, peak) -> None:
    assert lookup_peak_tflops(name) == peak


def test_peak_on_cpu_only_when_configured() -> None:
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5


def test_meter_rates_over_the_interval_and_cumulative_tokens() -> None:
    meter = ThroughputMeter(flops_per_token=1_000_000, world_size=2, device=torch.device("cpu"), peak_tflops=0.001,
                            tokens=500)
    meter.add_step(1000, 0.5)
    meter.add_step(1000, 1.5)
    row = meter.row()
    assert row["tokens"] == 2500 and row["tokens_per_s"] == pytest.approx(1000.0)
    assert row["model_tflops"] == pytest.approx(1000 * 1e6 / 2 / 1e12)
    assert row["mfu"] == pytest.approx(row["model_tflops"] / 0.001)
    assert "max_memory_gib" not in row
    meter.add_step(1000, 0.25)  # a new interval
    assert meter.row()["tokens_per_s"] == pytest.approx(4000.0)


def test_bench_row_from_a_cpu_run(prepared_dir, tmp_path, capsys) -> None:
    cfg = tiny_config(prepared_dir, train={"max_steps": 4, "eval_interval": 0, "peak_tflops": 0.01},
                      model={"activation_checkpointing": "every_k", "checkpoint_every": 2})
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    row = bench_row(run, warmup=1, command="megareweight train ...")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(128 / r["tokens_per_s"] for r in metrics[1:])  # 4 x 32 tokens per step
    assert row["tokens_per_s"] == pytest.approx(3 * 128 / seconds, rel=1e-3)
    assert row["mfu"] == pytest.approx(row["model_tflops"] / 0.01, rel=1e-3)
    assert {k: row[k] for k in ("device", "size", "seq_len", "micro_batch_size", "world_size", "loss_impl",
                                "activation_checkpointing", "max_memory_gib", "timed_steps")} == {
        "device": "cpu", "size": "tiny", "seq_len": 32, "micro_batch_size": 4, "world_size": 1,
        "loss_impl": "chunked", "activation_checkpointing": "every_k:2", "max_memory_gib": None,
        "timed_steps": "2-4"}
    path = write_row(tmp_path / "results", row)
    assert path == tmp_path / "results" / "cpu" / "train_bench.json"
    assert bench_main([str(run), "--warmup", "2", "--results-dir", str(tmp_path / "results")]) == 0
    rows = json.loads(path.read_text())
    assert len(rows) == 1 and rows[0]["timed_steps"] == "3-4"  # same setup: replaced, not appended
    assert bench_main([str(run), "--warmup", "4", "--results-dir", str(tmp_path / "results")]) == 2
    assert "no logged step after the 4 warm-up steps" in capsys.readouterr().err
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"

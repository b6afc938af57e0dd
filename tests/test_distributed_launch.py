"""The local two-node demo (two DeepSpeed launchers with --no_ssh --node_rank on loopback) on CPU.

It is the cluster path without a cluster: node-major global ranks, rendezvous over TCP, one
metrics writer. Its loss curve must equal the one-process run with the same global batch.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests._launch import REPO, free_port, read_metrics, run_group
from tests.test_distributed import DS_TINY, STEPS, assert_same_curve, plain_reference, write_config


def test_local_two_node_demo_matches_one_process(prepared_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", prepared_dir, "linupper", accum=1)
    out = tmp_path / "run"
    port = free_port()
    script = REPO / "launch" / "local_two_node_demo.sh"
    run_group([["bash", str(script), str(config), str(DS_TINY), str(out), "--quiet"]], port, 240,
              tmp_path / "demo.log", extra_env={"MASTER_PORT": str(port)})
    ds = read_metrics(out)
    assert [r["step"] for r in ds] == list(range(1, STEPS + 1))  # written once: rank 0 only
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_same_curve(ds, plain_reference(config, tmp_path / "plain"))

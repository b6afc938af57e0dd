"""Issue 22's experiment (experiments/autoscale/scale_test.py): its pure analysis functions on
synthetic inputs (tokens to a target with interpolation, the speed ratio, the verdict rule, the
power calculation, the deterministic subsampling). The runs themselves are hours long; the
script's --smoke mode exercises them end to end."""
from __future__ import annotations

import importlib.util
import json
import lzma
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def st():
    spec = importlib.util.spec_from_file_location("scale_test", ROOT / "experiments" / "autoscale" / "scale_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_test"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("scale_test", None)


def _curve(values, step=100):
    return [{"tokens": step * (k + 1), "objective": v} for k, v in enumerate(values)]


def test_crossing_tokens_interpolates_and_reports_never(st):
    curve = _curve([5.0, 4.0, 3.0])
    assert st.crossing_tokens(curve, "objective", 3.5) == pytest.approx(250.0)
    assert st.crossing_tokens(curve, "objective", 4.0) == pytest.approx(200.0)
    assert st.crossing_tokens(curve, "objective", 6.0) == pytest.approx(100.0)
    assert st.crossing_tokens(curve, "objective", 2.9) is None


def test_speed_ratio_both_directions_and_continuous_at_one(st):
    base = _curve([5.0, 4.0, 3.0])
    faster = _curve([4.5, 3.0, 2.5])          # reaches 3.0 at 200 of 300 tokens
    ratio, how = st.speed_ratio(faster, base, "objective")
    assert ratio == pytest.approx(200 / 300) and how.startswith("arm reached")
    slower = _curve([5.5, 4.5, 3.5])          # base reaches 3.5 at 250: ratio 300 / 250
    ratio, how = st.speed_ratio(slower, base, "objective")
    assert ratio == pytest.approx(300 / 250) and how.startswith("base reached")
    assert st.speed_ratio(base, base, "objective")[0] == pytest.approx(1.0)


def test_ratio_interval_is_geometric(st):
    iv = st.ratio_interval([0.8, 0.9, 1.0])
    assert iv["mean"] == pytest.approx(math.exp(sum(map(math.log, [0.8, 0.9, 1.0])) / 3))
    assert iv["low"] < iv["mean"] < iv["high"]


def test_verdict_rule(st):
    better = {"mean": -0.03, "low": -0.05, "high": -0.01}
    fast = {"mean": 0.7, "low": 0.6, "high": 0.75}
    v = st.verdict(better, fast, predicted_gain=0.016)
    assert "objective lower than uniform" in v and "faster" in v and "at least the paper's" in v
    assert "predicted gain" not in v
    worse = {"mean": 0.02, "low": 0.01, "high": 0.03}
    slow = {"mean": 1.1, "low": 1.05, "high": 1.2}
    v = st.verdict(worse, slow, predicted_gain=0.016)
    assert "higher than uniform (worse)" in v and "slower" in v and "less than the paper's" in v
    assert "predicted gain (1.6 %) is excluded" in v
    unclear = {"mean": -0.01, "low": -0.03, "high": 0.01}
    v = st.verdict(unclear, {"mean": 0.95, "low": 0.85, "high": 1.05}, other="b2_optimum")
    assert v.startswith("no objective difference from b2_optimum shown") and "no speed difference shown" in v
    assert st.verdict({"mean": 0.0, "low": math.nan, "high": math.nan}, fast) == "fewer than 2 seeds: no verdict"


def test_power_and_mde_agree(st):
    mde = st.mde_paired(0.015, 5)
    assert st.power_paired(mde, 0.015, 5) == pytest.approx(0.8, abs=1e-6)
    assert st.power_paired(0.0, 0.015, 5) == pytest.approx(0.05, abs=1e-9)
    assert st.mde_paired(0.015, 10) < mde
    assert st.power_paired(1.0, 0.01, 3) == pytest.approx(1.0)   # far tail: no NaN


def _docs(n):
    return [f"document {k} " + "word " * (10 + (k * 37) % 90) for k in range(n)]


def test_subsampling_is_deterministic_keeps_validation_and_the_fraction(st):
    texts = _docs(400)
    keep = st.subsample_documents(texts, 0.1)
    assert keep == st.subsample_documents(list(texts), 0.1) and keep == sorted(keep)
    from megareweight.data.prepare import in_validation
    val = {i for i, t in enumerate(texts) if in_validation(t, st.VALID_FRACTION)}
    assert val <= set(keep)
    train = [i for i in range(len(texts)) if i not in val]
    kept_train = [i for i in keep if i not in val]
    frac = sum(len(texts[i]) for i in kept_train) / sum(len(texts[i]) for i in train)
    assert 0.1 <= frac < 0.1 + max(len(texts[i]) for i in train) / sum(len(texts[i]) for i in train)
    # the choice depends on the texts, not on their order
    reordered = texts[::-1]
    assert {reordered[i] for i in st.subsample_documents(reordered, 0.1)} == {texts[i] for i in keep}
    assert st.subsample_documents(texts, 1.0) == list(range(len(texts)))
    with pytest.raises(ValueError):
        st.subsample_documents(texts, 0.0)


def test_build_skewed_corpus_same_bytes_twice(st, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in ("big", "small"):
        with lzma.open(corpus / f"{d}.jsonl.xz", "wt", encoding="utf-8") as fh:
            for t in _docs(200):
                fh.write(json.dumps({"text": f"{d}: {t}", "source": "test"}) + "\n")
    a = st.build_skewed_corpus(corpus, tmp_path / "a", domains=["big", "small"], large="big", fraction=0.05)
    b = st.build_skewed_corpus(corpus, tmp_path / "b", domains=["big", "small"], large="big", fraction=0.05)
    assert a["domains"] == b["domains"]
    assert a["domains"]["big"]["kept_documents"] == 200
    assert a["domains"]["small"]["kept_documents"] < 40
    assert (tmp_path / "a" / "small.jsonl").read_bytes() == (tmp_path / "b" / "small.jsonl").read_bytes()


_RUNNER = """
import sys
from pathlib import Path
import scale_test as st
work = Path(sys.argv[1])
jobs = [(work / f"run{k}.yaml", work / "cond" / f"run{k}") for k in range(3)]
runner = st.Runner(work, st.Recorder(work / "report", st.SMOKE, False, True), jobs=1, threads=1)
runner.train("cond", jobs)
"""


def test_sigterm_to_the_runner_stops_its_workers_and_the_rerun_continues(prepared_dir, tmp_path):
    """``kill <runner pid>`` (not the process group): the running run checkpoints, the queued
    runs do not start, no worker outlives the runner, and the same command then finishes all."""
    import os
    import signal
    import subprocess

    from megareweight.config import dump_config
    from megareweight.train import checkpoint as ckpt
    from tests._launch import wait_for_metrics
    from tests.conftest import tiny_config

    for k in range(3):
        dump_config(tiny_config(prepared_dir, train={"max_steps": 60, "eval_interval": 0, "checkpoint_interval": 0,
                                                     "seed": k}), tmp_path / f"run{k}.yaml")
    cmd = [sys.executable, "-c", _RUNNER, str(tmp_path)]
    # the spawned workers unpickle scale_test._train_worker, so the script's folder is on their path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "experiments" / "autoscale")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_metrics(tmp_path / "cond" / "run0", 3, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "stopped by SIGTERM" in out, out
    run0 = tmp_path / "cond" / "run0"
    assert ckpt.find_latest(run0 / "checkpoints") is not None and not (run0 / "summary.json").exists(), out
    assert not (tmp_path / "cond" / "run1" / "metrics.jsonl").exists(), out
    assert not (tmp_path / "cond" / "run2").exists(), out
    assert "run1: stopped before it started" in out, out

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = json.loads((tmp_path / "report" / "results.json").read_text())["conditions"]["cond"]["runs"]
    assert sorted(recorded) == ["run0", "run1", "run2"]
    assert [json.loads(x)["step"] for x in (run0 / "metrics.jsonl").read_text().splitlines()] == list(range(1, 61))

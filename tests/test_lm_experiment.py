"""The LM experiment's analysis (experiments/reweighting/lm.py) and held-out text builder, on
synthetic inputs: the training itself is too long for `make test` (it runs the trainer, which
tests/test_train.py covers)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "reweighting" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lm():
    yield _load("lm")
    sys.modules.pop("lm", None)


def test_tokens_to_target_interpolates_and_reports_never(lm):
    curve = [{"tokens": 100, "x": 5.0}, {"tokens": 200, "x": 4.0}, {"tokens": 300, "x": 3.0}]
    assert lm.tokens_to_target(curve, "x", 3.5) == pytest.approx(250.0)
    assert lm.tokens_to_target(curve, "x", 4.0) == pytest.approx(200.0)
    assert lm.tokens_to_target(curve, "x", 6.0) == pytest.approx(100.0)
    assert lm.tokens_to_target(curve, "x", 2.9) is None


def _run(method: str, seed: int, shift: float) -> dict:
    final = {d: 3.0 + shift + 0.01 * seed for d in lm_domains()}
    curve = [{"tokens": t, "avg_trained": 5.0 - t / 1000 + shift, "avg_heldout": 6.0 - t / 1000 - shift}
             for t in (1000, 2000, 3000)]
    return {"method": method, "seed": seed, "final": final, "curve": curve, "seconds": 1.0, "parameters": 10,
            "tokens": 3000, "tokens_per_second": 1.0}


def lm_domains() -> list[str]:
    return ["books", "code", "legal", "math", "dictionary", "techdocs", "fortunes"]


def test_analysis_pairs_by_seed_and_words_the_verdict(lm):
    runs = {}
    for seed in range(3):
        runs["uniform", seed] = _run("uniform", seed, 0.0)
        runs["linupper_r0.4", seed] = _run("linupper_r0.4", seed, 0.05 + 0.001 * seed)
    res = lm.analyse(runs)
    comp = res["comparisons"]["linupper_r0.4"]
    assert comp["seeds"] == [0, 1, 2] and "linupper_r1.0" not in res["comparisons"]
    row = comp["rows"]["avg trained"]
    assert row["diff"]["mean"] == pytest.approx(0.051) and row["verdict"] == "uniform better"
    # held-out curve is lower by 0.05 at every point: the target is reached 50 tokens earlier
    ttt = comp["tokens_to_target"]
    assert ttt["avg held-out (dictionary, techdocs)"]["per_seed"][0] == pytest.approx(2950 / 3000, rel=1e-3)
    assert ttt["avg trained"]["per_seed"] == [None, None, None] and ttt["avg trained"]["reached"] == 0
    text = lm.markdown(res, runs)
    assert "| **avg trained** | trained |" in text and "not reached" in text


def test_fortune_cookies_split_on_percent_lines():
    heldout = _load("heldout_text")
    assert heldout.cookies("a\n%\nb\nc\n%\n\n%\nd %\n") == ["a", "b\nc", "d %"]
    sys.modules.pop("heldout_text", None)


def test_committed_runs_are_reused_only_with_the_pinned_code_and_steps(lm, tmp_path):
    """A new machine (no work directory) reports runs recorded in the committed results.json and
    does not train them again, but only those trained with CODE_COMMIT and the current steps."""
    def record(commit: str) -> dict:
        return {"final": {d: 3.0 for d in lm_domains()}, "seconds": 5.0, "tokens": 3000,
                "code_versions": [{"time": "t", "commit": commit}], "tokens_per_second_median_step": 7.0,
                "curve": [{"tokens": 3000, "avg_trained": 3.0, "avg_heldout": 3.0}]}

    saved = {"design": {"steps": lm.STEPS, "external_tokens": 250000}, "parameters": 10,
             "runs": {"uniform-seed0": record(lm.CODE_COMMIT), "linupper_r0.4-seed0": record("0" * 40),
                      "unknown_method-seed0": record(lm.CODE_COMMIT)}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    runs = lm.committed_runs(tmp_path)
    assert list(runs) == [("uniform", 0)]
    assert runs["uniform", 0]["tokens_per_second"] == 7.0 and runs["uniform", 0]["parameters"] == 10
    saved["design"]["steps"] = lm.STEPS + 1  # another design: nothing is reused
    (tmp_path / "results.json").write_text(json.dumps(saved))
    assert lm.committed_runs(tmp_path) == {}
    assert lm.committed_runs(tmp_path / "missing") == {}


def test_time_report_does_not_take_a_resumed_runs_last_part_for_its_wall_time(lm):
    one_go = {**_run("uniform", 0, 0.0), "seconds": 1500.0, "step_seconds_total": 1400.0,
              "code_versions": [{"commit": "c"}]}
    resumed = {**_run("uniform", 1, 0.0), "seconds": 600.0, "step_seconds_total": 2900.0,
               "code_versions": [{"commit": "c"}, {"commit": "c"}]}
    text = lm.time_lines({("uniform", 0): one_go, ("uniform", 1): resumed})[0]
    assert "of the 1 run(s) trained in one invocation: median 1500 s, range 1500-1500 s" in text
    assert "of 2 run(s): median 2150 s, range 1400-2900 s" in text


def test_progress_pairs_an_unfinished_run_with_the_finished_uniform_run_of_its_seed(lm, tmp_path):
    def write_run(method: str, finished: bool, shift: float) -> None:
        out = lm.run_dir(tmp_path, method, 0)
        out.mkdir(parents=True)
        steps = (100, 200) if finished else (100,)
        rows = [{"step": s, "tokens": 10 * s, "avg_trained": 4.0 - s / 1000 + shift,
                 "avg_heldout": 5.0 - s / 1000 - shift, **{f"loss/{d}": 3.0 for d in lm_domains()[:-1]}} for s in steps]
        (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if finished:
            (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "step_seconds": 0.5}) + "\n")
            (out / "summary.json").write_text(json.dumps({"seconds": 9.0, "parameters": 10}))
            (out / "external_eval.json").write_text(json.dumps({lm.EXTERNAL: {"loss": 3.0, "tokens": 5}}))

    write_run(lm.BASELINE, True, 0.0)
    write_run("linupper_r0.4", False, 0.02)
    text = lm.progress_note(tmp_path)
    assert "| linupper_r0.4-seed0 | 100 of" in text and "+0.0200 / -0.0200 (step 100)" in text
    assert "uniform-seed0" not in text  # finished: a result, not progress


def _controls_runs(shift: dict[str, float], jitter: float = 0.002) -> dict:
    """Five seeds of every controls method; final losses = 3 + shift + seed noise (alternating sign)."""
    runs = {}
    for method, s in shift.items():
        for seed in range(5):
            runs[method, seed] = _run(method, seed, s + jitter * (-1) ** (seed + len(method)) * (seed % 3))
    return runs


def test_controls_verdicts_follow_the_rules_fixed_before_the_runs(lm):
    """Issue 21's decision rules: C recovering B's gain is 'domain-level'; B beating C is
    'instance-level adds'; the best LinUpper against the best uniform decides the step-size question."""
    exp = lm.CONTROLS
    domain_level = _controls_runs({"uniform": 0.0, "linupper_r0.4": -0.05, "domain_shares": -0.05,
                                   "uniform_lr6e-3": -0.02, "linupper_r0.4_lr1.5e-3": -0.01})
    v = lm.analyse(domain_level, exp)["verdicts"]
    assert v["domain-level or instance-level (held-out)"].startswith("domain-level")
    assert v["step size (held-out)"].startswith("LinUpper survives the learning-rate control")
    instance = _controls_runs({"uniform": 0.0, "linupper_r0.4": -0.05, "domain_shares": -0.01,
                               "uniform_lr6e-3": -0.05, "linupper_r0.4_lr1.5e-3": 0.01})
    v = lm.analyse(instance, exp)["verdicts"]
    assert v["domain-level or instance-level (held-out)"].startswith("instance-level adds")
    assert v["step size (held-out)"].startswith("step size")  # uniform at 6e-3 catches up with LinUpper
    assert lm.best_lr(instance, ("uniform", "uniform_lr6e-3")) == "uniform_lr6e-3"
    partial = {k: r for k, r in instance.items() if k[1] < 3}
    assert set(lm.analyse(partial, exp)["verdicts"].values()) == {"pending"}
    text = lm.markdown(lm.analyse(instance, exp), instance, exp)
    assert "linupper_r0.4 vs domain_shares (B - C)" in text and "## Verdicts" in text


def test_weight_share_summary_averages_post_warmup_steps_and_bins(lm):
    steps = [{"step": i, "weight_ess": 32.0 if i <= lm.WARMUP_STEPS else 20.0,
              "weight_share/math": 0.25 if i <= lm.WARMUP_STEPS else 0.1, "weight_share/books": 0.75 if i <= lm.WARMUP_STEPS else 0.9}
             for i in range(1, 301)]
    summary = lm.weight_share_summary(steps)
    assert summary["weight_share_post_warmup"] == pytest.approx({"books": 0.9, "math": 0.1})
    assert summary["weight_ess_post_warmup"] == pytest.approx(20.0)
    assert len(summary["weight_share_curve"]) == 300 // lm.SHARE_BIN and summary["weight_share_curve"][0]["math"] == 0.25


def test_phase_shares_average_only_the_bins_inside_each_post_warmup_phase(lm):
    """The drift table that bounds a time-varying domain schedule: warm-up bins are left out and a
    bin counts in the phase that holds all of its steps."""
    def curve(math_by_phase):
        rows = []
        for end in range(lm.SHARE_BIN, 1501, lm.SHARE_BIN):
            phase = next((i for i, (lo, hi) in enumerate(lm.SHARE_PHASES) if lo <= end - lm.SHARE_BIN + 1 and end <= hi), None)
            math = 0.25 if phase is None else math_by_phase[phase]
            rows.append({"step": end, "ess": 30.0, **{d: (1 - math) / 3 for d in lm.TRAIN_DOMAINS}, "math": math})
        return rows
    runs = {(lm.SHARES_FROM, 0): {"weight_share_curve": curve([0.10, 0.12, 0.14])},
            (lm.SHARES_FROM, 1): {"weight_share_curve": curve([0.20, 0.12, 0.16])},
            ("uniform", 0): {"weight_share_curve": curve([0.9, 0.9, 0.9])}}
    lines = lm.phase_share_lines(runs)
    table = [line for line in lines if line.startswith("| 1") or line.startswith("| 5")]
    assert [line.split(" | ")[0] for line in table] == ["| 151-500", "| 501-1000", "| 1001-1500"]
    assert [float(line.strip(" |").split(" | ")[-1]) for line in table] == pytest.approx([0.15, 0.12, 0.15])
    assert "2 seed(s)" in lines[0]

"""The AutoScale workflow (`megareweight mix plan/run/fit/extrapolate`) and mixture + reweighting training."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from megareweight.cli import main
from megareweight.config import config_from_dict, dump_config, load_config
from megareweight.mixing import PowerLaw, extrapolate_to, solve_ddo
from megareweight.mixing import workflow as wf
from tests.conftest import tiny_config

DOMAINS = ["prose", "code", "numbers"]


def _base_yaml(prepared_dir: Path, tmp_path: Path, **sections) -> Path:
    path = tmp_path / "base.yaml"
    dump_config(tiny_config(prepared_dir, **sections), path)
    return path


def _manifest_tokens(prepared_dir: Path) -> dict[str, int]:
    m = json.loads((prepared_dir / "manifest.json").read_text())
    return {d: m["domains"][d]["train"]["tokens"] for d in m["domains"]}


# --- plan -----------------------------------------------------------------------------------------

def test_plan_writes_2m_plus_1_configs_with_scaled_token_amounts(prepared_dir, tmp_path):
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "natural"})
    out = tmp_path / "plan"
    assert main(["mix", "plan", "--config", str(base), "--budget", "12.8k", "--factors", "0.2,1,3",
                 "--out", str(out), "--quiet"]) == 0
    plan = wf.load_plan(out)
    domains = plan["domains"]
    assert sorted(domains) == sorted(DOMAINS)
    assert len(plan["runs"]) == 2 * len(domains) + 1
    assert len(list((out / "configs").glob("*.yaml"))) == 2 * len(domains) + 1
    tps = 32 * 4
    avail = _manifest_tokens(prepared_dir)
    natural = {d: avail[d] / sum(avail[x] for x in domains) for d in domains}
    base_counts = {d: natural[d] * 12800 for d in domains}
    assert plan["base_tokens"] == pytest.approx(base_counts)
    names = set()
    for run in plan["runs"]:
        cfg = load_config(out / run["config"])          # every config is valid
        names.add(run["name"])
        expect = {d: base_counts[d] * (run["factor"] if d == run["domain"] else 1.0) for d in domains}
        assert run["planned_tokens"] == pytest.approx(expect)
        total = sum(expect.values())
        assert cfg.train.max_steps == round(total / tps) == run["steps"]
        assert run["tokens"] == cfg.train.max_steps * tps
        assert cfg.data.mixture == pytest.approx({d: expect[d] / total for d in domains})
        assert cfg.data.train_domains == domains
        assert run["domain_tokens"] == pytest.approx({d: cfg.data.mixture[d] * run["tokens"] for d in domains})
    assert names == {"base"} | {f"{d}-x{f}" for d in domains for f in ("0.2", "3")}
    # the same plan again is fine; a different one in the same place is refused without --force
    assert main(["mix", "plan", "--config", str(base), "--budget", "12800", "--out", str(out), "--quiet"]) == 0
    assert main(["mix", "plan", "--config", str(base), "--budget", "25600", "--out", str(out), "--quiet"]) == 2
    assert main(["mix", "plan", "--config", str(base), "--budget", "25600", "--out", str(out), "--quiet", "--force"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--factors", "1,3"], "two factors besides 1"),
    (["--factors", "0.2,x"], "comma-separated numbers"),
    (["--factors", "0,1,3"], "> 0"),
    (["--budget", "-5"], "token count"),
    (["--budget", "lots"], "cannot read"),
    (["--budget", "100"], "less than one step"),
])
def test_plan_bad_inputs_exit_2(prepared_dir, tmp_path, capsys, args, message):
    base = _base_yaml(prepared_dir, tmp_path)
    opts = {"--config": str(base), "--budget": "12800", "--out": str(tmp_path / "p"), args[0]: args[1]}
    assert main(["mix", "plan", *[x for kv in opts.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err


def test_plan_missing_config_and_zero_weight_domain_exit_2(prepared_dir, tmp_path, capsys):
    assert main(["mix", "plan", "--config", str(tmp_path / "nope.yaml"), "--budget", "1k", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": {"prose": 0.5, "code": 0.5, "numbers": 0.0},
                                                     "train_domains": DOMAINS})
    assert main(["mix", "plan", "--config", str(base), "--budget", "12800", "--out", str(tmp_path / "p")]) == 2
    assert "weight 0" in capsys.readouterr().err


# --- fit on synthetic losses ---------------------------------------------------------------------

TRUE_A = {"prose": 0.5, "code": 1.0, "numbers": 0.2}
TRUE_B = {"prose": 0.3, "code": 0.8, "numbers": 0.45}


def _true_relative_loss(x: dict[str, float]) -> float:
    """sum_i (x_i + a_i)^(-b_i) + c with c chosen so the base (all x = 1) has relative loss 1."""
    c = 1.0 - sum((1 + TRUE_A[d]) ** -TRUE_B[d] for d in x)
    return sum((x[d] + TRUE_A[d]) ** -TRUE_B[d] for d in x) + c


def _write_synthetic_evals(plan_dir: Path, base_loss: float = 4.0, relative=_true_relative_loss) -> None:
    plan = wf.load_plan(plan_dir)
    base = next(r for r in plan["runs"] if r["domain"] is None)
    offsets = np.linspace(-0.2, 0.2, len(plan["domains"]))      # per-domain spread, mean 0
    for run in plan["runs"]:
        x = {d: run["domain_tokens"][d] / base["domain_tokens"][d] for d in plan["domains"]}
        mean = base_loss * relative(x)
        row = {"step": run["steps"], "tokens": run["tokens"]}
        row.update({f"loss/{d}": mean + o for d, o in zip(plan["domains"], offsets)})
        row["avg_trained"] = mean
        out = plan_dir / run["out"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.jsonl").write_text(json.dumps({"step": 1, "tokens": 1, "avg_trained": 9.9}) + "\n"
                                        + json.dumps(row) + "\n")


def test_fit_recovers_known_power_laws_and_ddo_optimum(prepared_dir, tmp_path):
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "uniform"})
    out = tmp_path / "plan"
    # 12288 = 3 domains x 4096: every run's total is a whole number of 128-token steps, so only the
    # scaled domain moves (with rounding, the others would move by up to half a step too)
    wf.make_plan(base, 12288, out, factors="0.25,0.5,1,2,4")
    _write_synthetic_evals(out)
    assert main(["mix", "fit", str(out), "--quiet"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    domains = fit["domains"]
    for d in domains:
        assert fit["curves"][d]["a"] == pytest.approx(TRUE_A[d], rel=1e-4, abs=1e-5)
        assert fit["curves"][d]["b"] == pytest.approx(TRUE_B[d], rel=1e-4)
        assert fit["curves"][d]["rmse"] < 1e-8
        assert len(fit["curves"][d]["x"]) == 5
    truth = [PowerLaw(TRUE_A[d], TRUE_B[d], 0.0) for d in domains]
    n = fit["base_tokens"][domains[0]]
    upper = [4.0 * fit["available_tokens"][d] / n for d in domains]
    x_true = solve_ddo(truth, fit["budget_tokens_trained_by_base"] / n, lower=0.01, upper=upper)
    w_true = x_true / x_true.sum()
    assert [fit["weights"][d] for d in domains] == pytest.approx(w_true.tolist(), abs=1e-4)
    assert sum(fit["optimal_tokens"].values()) == pytest.approx(12288)
    assert fit["predicted_objective"]["optimal"] <= fit["predicted_objective"]["base"]
    assert max(fit["weights"].values()) - min(fit["weights"].values()) > 0.05   # not just the uniform base
    weights = yaml.safe_load((out / "weights.yaml").read_text())
    assert weights == pytest.approx(fit["weights"])
    cfg = config_from_dict({"data": {"prepared": str(prepared_dir), "mixture": weights}})  # usable as a mixture
    assert cfg.data.mixture == weights
    assert (out / "fit.png").is_file() and all((out / f"fit_{d}.png").is_file() for d in domains)


def test_fit_three_point_plan_natural_base(prepared_dir, tmp_path):
    """AutoScale's own setting (3 points per domain), non-uniform base: a valid fit at the token budget."""
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "natural"})
    out = tmp_path / "plan"
    wf.make_plan(base, 12800, out)
    _write_synthetic_evals(out)
    fit = wf.fit_plan(out, plots=False)
    assert sum(fit["weights"].values()) == pytest.approx(1.0)
    for d in fit["domains"]:
        assert max(abs(r) for r in fit["curves"][d]["residuals"]) < 1e-6   # 3 points: exact
    tokens = np.array([fit["optimal_x"][d] * fit["base_tokens"][d] for d in fit["domains"]])
    assert tokens.sum() == pytest.approx(fit["budget_tokens_trained_by_base"], rel=1e-9)


def test_solve_ddo_tokens_matches_numerical_optimum():
    from scipy.optimize import minimize

    fits = [PowerLaw(0.3, 0.5, 0), PowerLaw(1.2, 1.1, 0), PowerLaw(-0.1, 0.25, 0), PowerLaw(0.6, 0.7, 0)]
    n = np.array([1000.0, 250.0, 4000.0, 700.0])
    B = float(n.sum())
    lo, hi = np.full(4, 0.01), np.array([10, 10, 0.9, 10])
    x = wf.solve_ddo_tokens(fits, n, B, lower=lo, upper=hi)
    assert float(n @ x) == pytest.approx(B, rel=1e-12)
    assert np.all(x >= lo - 1e-12) and np.all(x <= hi + 1e-12)

    def obj(v):
        return sum((vi + f.a) ** -f.b for vi, f in zip(v, fits))

    ref = minimize(obj, np.ones(4), method="SLSQP", bounds=list(zip(lo, hi)),
                   constraints=[{"type": "eq", "fun": lambda v: n @ v - B}], options={"ftol": 1e-14, "maxiter": 500})
    assert obj(x) <= ref.fun + 1e-9
    assert x == pytest.approx(ref.x, abs=1e-3)
    # equal units: identical to AutoScale's sum(x) = m
    same = wf.solve_ddo_tokens(fits, np.full(4, 500.0), 2000.0)
    assert same == pytest.approx(solve_ddo(fits, 4.0))


def test_fit_errors_exit_2(prepared_dir, tmp_path, capsys):
    base = _base_yaml(prepared_dir, tmp_path)
    out = tmp_path / "plan"
    wf.make_plan(base, 12800, out)
    assert main(["mix", "fit", str(out)]) == 2                       # no runs yet
    assert "not finished" in capsys.readouterr().err
    _write_synthetic_evals(out, relative=lambda x: 1.0 + 0.01 * sum(x.values()))   # more data, higher loss
    assert main(["mix", "fit", str(out), "--no-plots"]) == 2
    assert "not decreasing" in capsys.readouterr().err
    assert main(["mix", "fit", str(out), "--no-plots", "--hold-unfit"]) == 2    # no domain usable at all
    assert "no domain could be fitted" in capsys.readouterr().err
    assert main(["mix", "fit", str(tmp_path / "nowhere")]) == 2
    assert "plan.json" in capsys.readouterr().err


def test_fit_hold_unfit_keeps_flat_domain_at_base_amount(prepared_dir, tmp_path):
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "uniform"})
    out = tmp_path / "plan"
    wf.make_plan(base, 12288, out)

    def numbers_hurts(x):   # more 'numbers' data raises the loss: no decreasing power law fits it
        return _true_relative_loss({**x, "numbers": 1.0}) + 0.01 * (x["numbers"] - 1.0)

    _write_synthetic_evals(out, relative=numbers_hurts)
    with pytest.raises(wf.FitError, match="numbers"):
        wf.fit_plan(out, plots=False)
    fit = wf.fit_plan(out, plots=True, hold_unfit=True)
    assert fit["held_domains"] == ["numbers"] and fit["curves"]["numbers"]["held"]
    assert fit["optimal_x"]["numbers"] == pytest.approx(1.0)
    assert fit["weights"]["numbers"] == pytest.approx(1 / 3)
    assert sum(fit["weights"].values()) == pytest.approx(1.0)
    assert any("held at the base amount" in w for w in fit["warnings"])


# --- run ------------------------------------------------------------------------------------------

def test_mix_run_trains_then_skips_finished_runs(prepared_dir, tmp_path, capsys):
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "uniform", "train_domains": ["prose", "code"],
                                                   "eval_domains": ["prose", "code"], "eval_sequences": 2},
                      train={"eval_interval": 0})
    out = tmp_path / "plan"
    wf.make_plan(base, 256, out, factors="0.5,1,2")                  # 5 runs of 1-3 steps
    assert len(main_print_commands(out, capsys)) == 5
    result = wf.run_plan(out, progress=False)
    assert list(result.values()) == ["trained"] * 5
    plan = wf.load_plan(out)
    for run in plan["runs"]:
        row = wf.final_eval(out / run["out"], run["steps"])
        assert np.isfinite(row["avg_trained"])
    assert main_print_commands(out, capsys) == []

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    # a run saved before a config field existed (the key is missing from its config.yaml) still counts
    saved = out / plan["runs"][0]["out"] / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    del raw["train"]["log_interval"]
    saved.write_text(yaml.safe_dump(raw))
    assert wf.run_plan(out, progress=False, train_fn=no_training) == {r["name"]: "skipped" for r in plan["runs"]}
    raw["optim"]["lr"] = 0.5                                       # a different config is refused
    saved.write_text(yaml.safe_dump(raw))
    with pytest.raises(wf.WorkflowError, match="different config"):
        wf.run_plan(out, progress=False, train_fn=no_training)
    raw["optim"]["lr"] = 0.01
    saved.write_text(yaml.safe_dump(raw))
    assert main(["mix", "run", str(out)]) == 0
    assert "0 run(s) trained, 5 skipped" in capsys.readouterr().out


def main_print_commands(out: Path, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["mix", "run", str(out), "--print-commands", "--launcher", "srun megareweight train"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert all(line.startswith("srun megareweight train --config ") and line.endswith("--resume") for line in lines)
    return lines


def test_mix_run_without_plan_exit_2(tmp_path, capsys):
    assert main(["mix", "run", str(tmp_path)]) == 2
    assert "plan.json" in capsys.readouterr().err


# --- extrapolate ----------------------------------------------------------------------------------

def _fake_fit(path: Path, budget: float, tokens: dict[str, float], available: dict[str, float]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "fit.json").write_text(json.dumps({
        "budget_tokens": budget, "domains": list(tokens), "optimal_tokens": tokens,
        "available_tokens": available, "bounds": {"max_epochs": 4.0}}))
    return path / "fit.json"


def test_extrapolate_cli_end_to_end(tmp_path, capsys):
    n1 = {"a": 300.0, "b": 500.0, "c": 200.0}
    n2 = {"a": 500.0, "b": 1100.0, "c": 400.0}
    avail = {"a": 1e6, "b": 1e6, "c": 1e6}
    f1, f2 = _fake_fit(tmp_path / "s", 1000, n1, avail), _fake_fit(tmp_path / "l", 2000, n2, avail)
    out = tmp_path / "ext"
    assert main(["mix", "extrapolate", "--fit", str(f1), "--fit", str(f2), "--target", "8k", "--out", str(out)]) == 0
    res = json.loads((out / "extrapolation.json").read_text())
    expect = extrapolate_to(list(n1.values()), list(n2.values()), 8000)
    assert [res["tokens"][d] for d in n1] == pytest.approx(expect.tolist())
    weights = yaml.safe_load((out / "weights.yaml").read_text())
    assert weights == pytest.approx({d: v / 8000 for d, v in zip(n1, expect)})
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert res["capped_domains"] == []
    # the directory of a fit works too, and scarce data caps a domain (and says so)
    f2 = _fake_fit(tmp_path / "l2", 2000, n2, {"a": 1e6, "b": 300.0, "c": 1e6})
    capsys.readouterr()
    assert main(["mix", "extrapolate", "--fit", str(f1.parent), "--fit", str(f2), "--target", "8000",
                 "--out", str(out)]) == 0
    res = json.loads((out / "extrapolation.json").read_text())
    assert res["capped_domains"] == ["b"]
    assert res["tokens"]["b"] == pytest.approx(1200.0)                # 300 tokens x 4 epochs
    assert sum(res["tokens"].values()) == pytest.approx(8000)
    assert "capped" in capsys.readouterr().out


def test_extrapolate_bad_inputs_exit_2(tmp_path, capsys):
    n1, n2 = {"a": 300.0, "b": 700.0}, {"a": 500.0, "b": 1500.0}
    f1, f2 = _fake_fit(tmp_path / "s", 1000, n1, {"a": 1e6, "b": 1e6}), _fake_fit(tmp_path / "l", 2000, n2, {"a": 1e6, "b": 1e6})
    base = ["mix", "extrapolate", "--target", "8000", "--out", str(tmp_path / "o")]
    assert main(base + ["--fit", str(f2), "--fit", str(f1)]) == 2
    assert "smaller budget" in capsys.readouterr().err
    assert main(base + ["--fit", str(f1)]) == 2
    assert "exactly twice" in capsys.readouterr().err
    f3 = _fake_fit(tmp_path / "x", 2000, {"a": 1.0, "z": 2.0}, {"a": 1e6, "z": 1e6})
    assert main(base + ["--fit", str(f1), "--fit", str(f3)]) == 2
    assert "different domains" in capsys.readouterr().err
    assert main(base + ["--fit", str(f1), "--fit", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(base + ["--fit", str(f1), "--fit", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# --- mixture + instance reweighting ---------------------------------------------------------------

def test_train_with_fixed_mixture_and_linupper(prepared_dir, tmp_path):
    from megareweight.train.loop import train

    mixture = {"prose": 0.6, "code": 0.3, "numbers": 0.1}
    cfg = tiny_config(prepared_dir, data={"mixture": mixture, "eval_sequences": 2},
                      reweight={"strategy": "linupper", "r": 0.4}, train={"max_steps": 2, "eval_interval": 0})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in rows] == ["linupper", "linupper"]
    assert {d: rows[-1][f"mixture/{d}"] for d in mixture} == pytest.approx(mixture)
    assert all(r["weight_max"] > r["weight_min"] for r in rows)     # instance weights are not uniform
    assert all(np.isfinite(r["loss"]) for r in rows)

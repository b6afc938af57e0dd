"""`mix fit` on fake plans with known ground truth: actual counts, objective, guards, seeds, checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from megareweight.autoscale import WorkflowError, fit_plan, make_plan
from megareweight.autoscale.plan import load_plan
from megareweight.cli import main
from megareweight.config import dump_config, load_config
from megareweight.mixing import blocked_noise_sd, solve_ddo
from tests._autoscale import TRUE_A, TRUE_B, additive_relative, fake_plan_runs, true_laws
from tests.conftest import tiny_config

# 12288 = 3 domains x 4096 tokens: with these factors every run is a whole number of 128-token steps,
# so only the scaled domain moves. 5 points per domain: 3 points often admit two exact curves (the fit
# picks the one with the largest c), so recovering the true parameters needs more.
BUDGET = 12288
FACTORS = "0.25,0.5,1,2,4"


@pytest.fixture
def base_yaml(prepared_dir, tmp_path) -> Path:
    path = tmp_path / "base.yaml"
    dump_config(tiny_config(prepared_dir, data={"mixture": "uniform"}, train={"eval_interval": 0}), path)
    return path


def _plan(base_yaml: Path, tmp_path: Path, name: str = "plan", **kwargs) -> Path:
    out = tmp_path / name
    make_plan(base_yaml, kwargs.pop("budget", BUDGET), out, factors=kwargs.pop("factors", FACTORS), **kwargs)
    return out


def _ddo_truth(fit: dict, a=TRUE_A, b=TRUE_B) -> np.ndarray:
    domains = fit["domains"]
    n = np.array([fit["base_tokens"][d] for d in domains])
    x = solve_ddo(true_laws(domains, a, b), n.sum(), lower=0.25, upper=4.0, costs=n)
    return x * n / (x * n).sum()


def test_fit_recovers_known_curves_and_ddo_optimum(base_yaml, tmp_path):
    plan_dir = _plan(base_yaml, tmp_path)
    fake_plan_runs(plan_dir)
    assert main(["mix", "fit", str(plan_dir), "--quiet"]) == 0
    fit = json.loads((plan_dir / "fit.json").read_text())
    assert fit["objective"]["kind"] == "ppl"
    for d in fit["domains"]:
        c = fit["curves"][d]
        assert c["status"] == "fitted"
        assert c["a"] == pytest.approx(TRUE_A[d], rel=1e-4) and c["b"] == pytest.approx(TRUE_B[d], rel=1e-4)
    assert fit["bounds"]["lower"] == 0.25 and fit["bounds"]["upper"] == 4.0     # the plan's factors
    assert [fit["weights"][d] for d in fit["domains"]] == pytest.approx(_ddo_truth(fit).tolist(), abs=1e-6)
    assert fit["bound_domains"] == {} and fit["held_domains"] == [] and fit["frozen_domains"] == []
    assert fit["predicted_relative_objective"]["optimal"] < 1.0
    assert yaml.safe_load((plan_dir / "weights.yaml").read_text()) == pytest.approx(fit["weights"])
    cfg = load_config(plan_dir / "mixture_config.yaml")                  # ready to train as is
    assert cfg.data.mixture == pytest.approx(fit["weights"])
    assert cfg.train.max_steps * 128 == fit["mixture_config"]["tokens"] == BUDGET
    assert (plan_dir / "fit.png").is_file() and all((plan_dir / f"fit_{d}.png").is_file() for d in fit["domains"])


def test_fit_uses_actual_token_counts_not_planned(base_yaml, tmp_path):
    """The sampler's random draws move x (0.25 planned -> 0.2 drawn); only the actual amounts recover the truth."""
    plan_dir = _plan(base_yaml, tmp_path)
    actual = {0.25: 0.2, 0.5: 0.45, 2.0: 1.8, 4.0: 3.4}
    fake_plan_runs(plan_dir, actual_x=lambda run: actual[run["factor"]])
    fit = fit_plan(plan_dir, plots=False)
    for d in fit["domains"]:
        c = fit["curves"][d]
        assert c["x"] == pytest.approx([0.2, 0.45, 1.0, 1.8, 3.4], abs=1e-3)
        assert c["a"] == pytest.approx(TRUE_A[d], rel=1e-4) and c["b"] == pytest.approx(TRUE_B[d], rel=1e-4)


def test_objective_choice_changes_the_fit_and_is_recorded(base_yaml, tmp_path, capsys):
    plan_dir = _plan(base_yaml, tmp_path)
    fake_plan_runs(plan_dir, objective="ppl")          # the truth holds for perplexity ratios
    ppl = fit_plan(plan_dir, plots=False)
    loss = fit_plan(plan_dir, objective="loss", plots=False)
    assert ppl["objective"]["kind"] == "ppl" and loss["objective"]["kind"] == "loss"
    assert "exp" in ppl["objective"]["description"]
    d = ppl["domains"][0]
    assert ppl["curves"][d]["a"] == pytest.approx(TRUE_A[d], rel=1e-4)
    # log of a perplexity ratio is a loss difference: relative losses are much flatter, a different curve
    assert loss["curves"][d]["relative_objective"][0] - 1 < 0.5 * (ppl["curves"][d]["relative_objective"][0] - 1)
    assert max(abs(ppl["weights"][k] - loss["weights"][k]) for k in ppl["domains"]) > 1e-3
    assert main(["mix", "fit", str(plan_dir), "--objective", "loss", "--no-plots", "--quiet"]) == 0
    assert json.loads((plan_dir / "fit.json").read_text())["objective"]["kind"] == "loss"
    # argparse: exit code 2 with the allowed values, in one line
    assert main(["mix", "fit", str(plan_dir), "--objective", "bpc"]) == 2
    assert "choose from 'ppl', 'loss'" in capsys.readouterr().err
    with pytest.raises(WorkflowError, match="allowed values: ppl, loss"):
        fit_plan(plan_dir, objective="bpc")


def test_optimum_on_a_bound_is_reported(base_yaml, tmp_path, capsys):
    """code gains a lot from data, numbers almost nothing: DDO goes to the bounds and says so.

    (With 3 domains and a uniform base, sum(x) = 3 keeps x below 2.5, so the upper bound is
    narrowed to 2 here; narrowing needs no warning.)
    """
    a = {"prose": 0.5, "code": 0.1, "numbers": 0.5}
    b = {"prose": 0.3, "code": 1.5, "numbers": 0.01}
    plan_dir = _plan(base_yaml, tmp_path)
    fake_plan_runs(plan_dir, additive_relative(a, b))
    capsys.readouterr()
    assert main(["mix", "fit", str(plan_dir), "--no-plots", "--max-x", "2"]) == 0
    printed = capsys.readouterr().out
    fit = json.loads((plan_dir / "fit.json").read_text())
    assert fit["bound_domains"] == {"code": "upper", "numbers": "lower"}
    assert fit["optimal_x"]["code"] == pytest.approx(2.0) and fit["optimal_x"]["numbers"] == pytest.approx(0.25)
    assert fit["optimal_x"]["prose"] == pytest.approx(0.75)
    assert fit["frozen_domains"] == ["code", "numbers"]
    assert fit["curves"]["code"]["bound"] == "upper" and fit["curves"]["prose"]["bound"] is None
    assert "ON ITS UPPER BOUND" in printed and "ON ITS LOWER BOUND" in printed
    assert not any("extend beyond" in w for w in fit["warnings"])
    assert any("'numbers': optimum on its lower bound" in w for w in fit["warnings"])


def test_widening_the_bounds_warns(base_yaml, tmp_path):
    plan_dir = _plan(base_yaml, tmp_path)
    fake_plan_runs(plan_dir)
    fit = fit_plan(plan_dir, min_x=0.01, plots=False)
    assert fit["bounds"]["lower"] == 0.01
    assert any("extend beyond the measured range [0.25, 4]" in w for w in fit["warnings"])
    assert not any("extend beyond" in w for w in fit_plan(plan_dir, min_x=0.5, plots=False)["warnings"])
    with pytest.raises(WorkflowError, match="--min-x"):
        fit_plan(plan_dir, min_x=0.0, plots=False)


@pytest.mark.parametrize("shape, values, reason", [
    ("concave", (1.001, 1.0, 0.95), "concave"),             # falls faster at larger x
    ("rising", (0.99, 1.0, 1.01), "not decreasing"),        # more data, higher loss
    ("flat", (1.0, 1.0, 1.0), "not decreasing"),
    ("steep", (1.17, 1.0, 0.55), "no exact power law"),     # convex, but no (x + a)^-b + c passes through
])
def test_concave_or_non_decreasing_triples_are_held_not_fitted(base_yaml, tmp_path, capsys, shape, values, reason):
    plan_dir = _plan(base_yaml, tmp_path, factors="0.25,1,4")     # AutoScale's 3 points per domain
    good = additive_relative(TRUE_A, TRUE_B)

    def relative(x):                       # 'numbers' gets the bad shape, the others the truth
        if x["numbers"] != 1.0:
            return values[0] if x["numbers"] < 1 else values[2]
        return good(x)

    fake_plan_runs(plan_dir, relative)
    capsys.readouterr()
    assert main(["mix", "fit", str(plan_dir), "--no-plots"]) == 0
    fit = json.loads((plan_dir / "fit.json").read_text())
    c = fit["curves"]["numbers"]
    assert c["status"] == "held" and c["reason"].startswith(reason) and "a" not in c
    assert fit["held_domains"] == ["numbers"] and "numbers" in fit["frozen_domains"]
    assert fit["optimal_x"]["numbers"] == pytest.approx(1.0)
    assert fit["weights"]["numbers"] == pytest.approx(1 / 3)             # kept at its base share
    assert all(fit["curves"][d]["status"] == "fitted" for d in ("prose", "code"))
    assert "HELD at x = 1" in capsys.readouterr().out


def test_every_domain_held_keeps_the_base_mixture(base_yaml, tmp_path):
    plan_dir = _plan(base_yaml, tmp_path)
    fake_plan_runs(plan_dir, lambda x: 1.0 + 0.01 * (sum(x.values()) - 3))   # more data hurts everywhere
    fit = fit_plan(plan_dir, plots=True)                   # plots draw held domains too
    assert fit["held_domains"] == fit["domains"]
    assert fit["weights"] == pytest.approx({d: 1 / 3 for d in fit["domains"]})
    assert any("every domain is held" in w for w in fit["warnings"])


def test_seeds_are_averaged_and_small_effects_are_held(base_yaml, tmp_path):
    """2 seeds: replicas averaged, noise estimated with seeds as blocks; an effect < 2 se is held."""
    a = dict(TRUE_A)
    b = {"prose": 0.3, "code": 0.8, "numbers": 0.002}       # numbers: an effect about the size of the noise
    plan_dir = _plan(base_yaml, tmp_path, seeds=2)
    plan = load_plan(plan_dir)
    assert plan["seeds"] == [0, 1] and len(plan["runs"]) == 2 * 13
    assert {r["name"] for r in plan["runs"] if r["group"] == "base"} == {"base-seed0", "base-seed1"}
    assert load_config(plan_dir / "configs" / "code-x4-seed1.yaml").train.seed == 1
    # (noise draw 3: numbers' means happen to be decreasing and convex, so only the noise guard holds it)
    fake_plan_runs(plan_dir, additive_relative(a, b), noise=0.002, seed=3)
    fit = fit_plan(plan_dir, plots=False)
    # the reported noise is the blocked residual sd of the relative objectives, recomputed here
    runs = fit["runs"]
    table = [[runs[f"{g}-seed{s}"]["relative_objective"] for s in (0, 1)] for g in fit["settings"]]
    sd, dof = blocked_noise_sd(table)
    assert fit["noise"]["sd"] == pytest.approx(sd) and fit["noise"]["dof"] == dof == 12
    assert fit["noise"]["effect_se"] == pytest.approx(sd)                # sd * sqrt(2 / 2)
    # each point is the mean of its replicas
    c = fit["curves"]["code"]
    assert c["relative_objective"][0] == pytest.approx(np.mean(c["replica_relative_objective"][0]))
    assert fit["curves"]["numbers"]["status"] == "held"
    assert "standard errors" in fit["curves"]["numbers"]["reason"]
    assert fit["curves"]["numbers"]["effect_z"] < 2
    assert fit["curves"]["code"]["status"] == "fitted" and fit["curves"]["code"]["effect_z"] > 2
    # --significance 0 turns the guard off
    assert fit_plan(plan_dir, significance=0.0, plots=False)["curves"]["numbers"]["status"] == "fitted"


def test_one_seed_warns_that_noise_is_unknown(base_yaml, tmp_path):
    plan_dir = _plan(base_yaml, tmp_path)
    fake_plan_runs(plan_dir)
    fit = fit_plan(plan_dir, plots=False)
    assert fit["noise"] is None and fit["curves"]["code"]["effect_se"] is None
    assert any("one seed per run" in w for w in fit["warnings"])


def test_runs_trained_otherwise_than_planned_are_refused(base_yaml, tmp_path, capsys):
    plan_dir = _plan(base_yaml, tmp_path)
    plan = load_plan(plan_dir)
    fake_plan_runs(plan_dir)
    run = plan["runs"][1]
    out = plan_dir / run["out"]
    summary = json.loads((out / "summary.json").read_text())

    def rewrite(**changes):
        (out / "summary.json").write_text(json.dumps({**summary, **changes}))

    rewrite(world_size=2)
    assert main(["mix", "fit", str(plan_dir), "--no-plots"]) == 2
    assert "world_size 2" in capsys.readouterr().err
    rewrite(tokens_per_domain={d: 2 * v for d, v in summary["tokens_per_domain"].items()})
    assert main(["mix", "fit", str(plan_dir), "--no-plots"]) == 2
    assert "another world size, batch size or max_steps" in capsys.readouterr().err
    rewrite(tokens_per_domain=None)
    assert main(["mix", "fit", str(plan_dir), "--no-plots"]) == 2
    assert "no tokens_per_domain" in capsys.readouterr().err
    rewrite()
    cfg = load_config(out / "config.yaml")
    cfg.train.max_steps += 1
    dump_config(cfg, out / "config.yaml")
    assert main(["mix", "fit", str(plan_dir), "--no-plots"]) == 2
    assert "different config than planned" in capsys.readouterr().err
    (out / "summary.json").unlink()
    assert main(["mix", "fit", str(plan_dir), "--no-plots"]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_fit_bad_plan_directories_exit_2(base_yaml, tmp_path, capsys):
    assert main(["mix", "fit", str(tmp_path / "nowhere")]) == 2
    assert "plan.json" in capsys.readouterr().err
    plan_dir = _plan(base_yaml, tmp_path)
    raw = json.loads((plan_dir / "plan.json").read_text())
    (plan_dir / "plan.json").write_text(json.dumps({**raw, "version": 1}))
    assert main(["mix", "fit", str(plan_dir)]) == 2
    assert "plan version 1" in capsys.readouterr().err



def test_a_domain_that_drew_no_tokens_is_held(base_yaml, tmp_path):
    """At tiny budgets a scaled-down domain can draw no slot at all (x = 0): held, with the reason."""
    plan_dir = _plan(base_yaml, tmp_path, factors="0.25,1,4")
    fake_plan_runs(plan_dir, actual_x=lambda run: 0.0 if run["domain"] == "code" and run["factor"] < 1 else run["factor"])
    fit = fit_plan(plan_dir, plots=False)
    assert fit["curves"]["code"]["status"] == "held"
    assert "budget is too small" in fit["curves"]["code"]["reason"]

"""The AutoScale workflow around `mix fit`: plan, run (one small real end-to-end), validate, extrapolate, target config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from megareweight import autoscale as mix
from megareweight.autoscale.plan import load_plan
from megareweight.cli import main
from megareweight.config import dump_config, load_config
from megareweight.mixing import extrapolate_to
from tests._autoscale import TRUE_RELATIVE, fake_plan_runs, losses_for, write_run
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

def test_plan_writes_2m_plus_1_configs_per_seed(prepared_dir, tmp_path):
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "natural"}, train={"seed": 7})
    out = tmp_path / "plan"
    assert main(["mix", "plan", "--config", str(base), "--budget", "12.8k", "--factors", "0.2,1,3",
                 "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    plan = load_plan(out)
    domains = plan["domains"]
    assert sorted(domains) == sorted(DOMAINS) and plan["seeds"] == [7, 8]
    assert len(plan["runs"]) == 2 * (2 * len(domains) + 1)
    assert len(list((out / "configs").glob("*.yaml"))) == len(plan["runs"])
    assert load_config(out / "base.yaml").to_dict() == load_config(base).to_dict()     # kept for target configs
    tps = 32 * 4
    avail = _manifest_tokens(prepared_dir)
    natural = {d: avail[d] / sum(avail[x] for x in domains) for d in domains}
    base_counts = {d: natural[d] * 12800 for d in domains}
    assert plan["base_tokens"] == pytest.approx(base_counts)
    for run in plan["runs"]:
        cfg = load_config(out / run["config"])
        expect = {d: base_counts[d] * (run["factor"] if d == run["domain"] else 1.0) for d in domains}
        assert run["planned_tokens"] == pytest.approx(expect)
        assert cfg.train.max_steps == round(sum(expect.values()) / tps) == run["steps"]
        assert run["tokens"] == cfg.train.max_steps * tps
        assert cfg.data.mixture == pytest.approx({d: expect[d] / sum(expect.values()) for d in domains})
        assert cfg.train.seed == run["seed"] and run["name"] == f"{run['group']}-seed{run['seed']}"
    groups = {r["group"] for r in plan["runs"]}
    assert groups == {"base"} | {f"{d}-x{f}" for d in domains for f in ("0.2", "3")}
    # the same plan again is fine; a different one in the same place is refused without --force
    args = ["mix", "plan", "--config", str(base), "--out", str(out), "--quiet", "--seeds", "2"]
    assert main(args + ["--budget", "12800"]) == 0
    assert main(args + ["--budget", "25600"]) == 2
    assert main(args + ["--budget", "25600", "--force"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--factors", "1,3"], "two factors besides 1"),
    (["--factors", "0.2,x"], "comma-separated numbers"),
    (["--factors", "0,1,3"], "> 0"),
    (["--budget", "-5"], "token count"),
    (["--budget", "lots"], "cannot read"),
    (["--budget", "100"], "less than one step"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--world-size", "0"], "--world-size must be an integer >= 1"),
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


# --- run: the one real end-to-end ---------------------------------------------------------------

def test_mix_run_trains_records_actual_tokens_and_fits(prepared_dir, tmp_path, capsys):
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "uniform", "train_domains": ["prose", "code"],
                                                   "eval_domains": ["prose", "code"], "eval_sequences": 2},
                      train={"eval_interval": 0})
    out = tmp_path / "plan"
    mix.make_plan(base, 256, out, factors="0.5,1,2")                 # 5 runs of 1-3 steps
    assert len(_print_commands(out, capsys)) == 5
    assert list(mix.run_plan(out, progress=False).values()) == ["trained"] * 5
    plan = load_plan(out)
    for run in plan["runs"]:                                         # the trainer's sampler accounting
        summary = json.loads((out / run["out"] / "summary.json").read_text())
        assert set(summary["tokens_per_domain"]) == {"prose", "code"}
        assert sum(summary["tokens_per_domain"].values()) == run["tokens"] == summary["tokens"]
        assert all(v % 32 == 0 for v in summary["tokens_per_domain"].values())     # whole windows
    assert _print_commands(out, capsys) == []
    assert main(["mix", "fit", str(out), "--no-plots", "--quiet"]) == 0     # fits or holds: both are fine here
    fit = json.loads((out / "fit.json").read_text())
    base_run = fit["runs"]["base-seed0"]
    assert fit["base_tokens"] == {d: float(v) for d, v in base_run["tokens"].items()}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    # a run saved before a config field existed (the key is missing from its config.yaml) still counts
    saved = out / plan["runs"][0]["out"] / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    del raw["train"]["log_interval"]
    saved.write_text(yaml.safe_dump(raw))
    assert mix.run_plan(out, progress=False, train_fn=no_training) == {r["name"]: "skipped" for r in plan["runs"]}
    raw["optim"]["lr"] = 0.5                                       # a different config is refused
    saved.write_text(yaml.safe_dump(raw))
    with pytest.raises(mix.WorkflowError, match="different config"):
        mix.run_plan(out, progress=False, train_fn=no_training)
    raw["optim"]["lr"] = 0.01
    saved.write_text(yaml.safe_dump(raw))
    assert main(["mix", "run", str(out)]) == 0
    assert "0 run(s) trained, 5 skipped" in capsys.readouterr().out


def _print_commands(out: Path, capsys) -> list[str]:
    capsys.readouterr()
    assert main(["mix", "run", str(out), "--print-commands", "--launcher", "srun megareweight train"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert all(line.startswith("srun megareweight train --config ") and line.endswith("--resume") for line in lines)
    return lines


def test_mix_run_refuses_a_plan_for_more_ranks(prepared_dir, tmp_path, capsys):
    base = _base_yaml(prepared_dir, tmp_path)
    mix.make_plan(base, 12800, tmp_path / "p", world_size=2)
    assert main(["mix", "run", str(tmp_path / "p")]) == 2
    assert "--print-commands" in capsys.readouterr().err
    assert main(["mix", "run", str(tmp_path)]) == 2
    assert "plan.json" in capsys.readouterr().err


# --- validate -------------------------------------------------------------------------------------

def _fitted_plan(prepared_dir: Path, tmp_path: Path, budget: int, name: str, **fake) -> Path:
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "uniform"}, train={"eval_interval": 0})
    out = tmp_path / name
    mix.make_plan(base, budget, out, factors="0.25,0.5,1,2,4")
    fake_plan_runs(out, **fake)
    mix.fit_plan(out, plots=False)
    return out


def test_validate_compares_prediction_with_a_trained_mixture(prepared_dir, tmp_path, capsys):
    plan_dir = _fitted_plan(prepared_dir, tmp_path, 12288, "plan")
    fit = mix.load_fit(plan_dir)
    cfg = load_config(plan_dir / "mixture_config.yaml")
    n = fit["base_tokens"]
    tokens = {d: int(round(fit["optimal_x"][d] * n[d])) for d in DOMAINS}
    truth = TRUE_RELATIVE({d: tokens[d] / n[d] for d in DOMAINS})
    good, bad = tmp_path / "check-good", tmp_path / "check-bad"
    write_run(good, plan_dir / "mixture_config.yaml", losses_for(truth, DOMAINS), tokens, step=cfg.train.max_steps)
    write_run(bad, plan_dir / "mixture_config.yaml", losses_for(truth * 1.05, DOMAINS), tokens)
    bad_cfg = load_config(bad / "config.yaml")
    bad_cfg.train.seed = 5                                     # not a seed of the plan: compared unpaired
    dump_config(bad_cfg, bad / "config.yaml")
    capsys.readouterr()
    assert main(["mix", "validate", str(plan_dir), str(good), "--quiet"]) == 0
    res = json.loads((plan_dir / "validation.json").read_text())
    assert res["runs"][0]["predicted"] == pytest.approx(truth, abs=1e-6)     # the model is exact here
    assert res["runs"][0]["actual"] == pytest.approx(truth, rel=1e-9)
    assert res["mean"]["predicted_gain"] > 0 and res["warnings"] == []
    assert all(abs(s["predicted"] - s["actual"]) < 1e-6 for s in res["plan_settings"])
    assert (plan_dir / "validation.png").is_file()
    assert main(["mix", "validate", str(plan_dir), str(good), str(bad), "--out", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and "check-bad" in printed and "one seed" in printed
    res = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert res["runs"][1]["difference"] == pytest.approx(0.05 * truth, rel=1e-6)
    assert [r["paired_with_base_seed"] for r in res["runs"]] == [True, False] and not res["mean"]["paired"]
    assert main(["mix", "validate", str(plan_dir), str(tmp_path / "missing")]) == 2
    assert "not finished" in capsys.readouterr().err


def test_validate_pairs_runs_with_the_base_replica_of_their_seed(prepared_dir, tmp_path):
    base = _base_yaml(prepared_dir, tmp_path, data={"mixture": "uniform"}, train={"eval_interval": 0})
    plan_dir = tmp_path / "plan"
    mix.make_plan(base, 12288, plan_dir, factors="0.25,1,4", seeds=2)
    fake_plan_runs(plan_dir, noise=0.01, seed=1)
    fit = mix.fit_plan(plan_dir, plots=False)
    n = fit["base_tokens"]
    checks = []
    for seed in (0, 1):                        # each check run scores 0.97 x the base replica of its seed
        out = tmp_path / f"check-{seed}"
        base_score = fit["runs"][f"base-seed{seed}"]["objective"]
        write_run(out, plan_dir / "mixture_config.yaml", losses_for(0.97 * base_score / math.exp(4.0), DOMAINS),
                  {d: int(round(fit["optimal_x"][d] * n[d])) for d in DOMAINS})
        cfg = load_config(out / "config.yaml")
        cfg.train.seed = seed
        dump_config(cfg, out / "config.yaml")
        checks.append(out)
    res = mix.validate_fit(plan_dir, checks, plots=False)
    assert [r["actual"] for r in res["runs"]] == pytest.approx([0.97, 0.97])
    assert res["mean"]["paired"] and res["mean"]["standard_error"] == pytest.approx(fit["noise"]["sd"])


# --- extrapolate ----------------------------------------------------------------------------------

def test_extrapolate_writes_a_config_that_trains_as_is(prepared_dir, tmp_path, capsys):
    # budgets of 12 and 24 steps of 128 tokens, so that the target run is small (32 steps)
    small = _fitted_plan(prepared_dir, tmp_path, 1536, "small")
    large = _fitted_plan(prepared_dir, tmp_path, 3072, "large",
                         relative=lambda x: TRUE_RELATIVE({d: v ** 0.9 for d, v in x.items()}))
    out = tmp_path / "target"
    assert main(["mix", "extrapolate", "--fit", str(small), "--fit", str(large / "fit.json"), "--target", "4096",
                 "--out", str(out)]) == 0
    assert "megareweight train --config" in capsys.readouterr().out
    res = json.loads((out / "extrapolation.json").read_text())
    f1, f2 = mix.load_fit(small), mix.load_fit(large)
    expect = extrapolate_to([f1["optimal_tokens"][d] for d in DOMAINS], [f2["optimal_tokens"][d] for d in DOMAINS], 4096)
    assert [res["tokens"][d] for d in DOMAINS] == pytest.approx(expect.tolist())   # nothing frozen: the rule
    assert res["frozen_domains"] == {}
    cfg = load_config(out / "config.yaml")
    base = load_config(large / "base.yaml").to_dict()
    got = cfg.to_dict()
    assert got["data"].pop("mixture") == pytest.approx(res["weights"])
    assert sorted(got["data"].pop("train_domains")) == sorted(DOMAINS)
    assert got["train"].pop("max_steps") == 32 == res["config"]["steps"]            # 4096 tokens / 128 per step
    for section in (base["data"], base["train"]):
        for key in ("mixture", "train_domains", "max_steps"):
            section.pop(key, None)
    assert got == base                                                              # everything else unchanged
    assert yaml.safe_load((out / "weights.yaml").read_text()) == pytest.approx(res["weights"])
    from megareweight.train.loop import train

    result = train(cfg, tmp_path / "run", progress=False)                           # runs as is
    assert result.steps == 32
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(summary["tokens_per_domain"].values()) == 4096


def _fake_fit(path: Path, budget: float, tokens: dict[str, float], *, held=(), bounds=None,
              available=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    total = sum(tokens.values())
    (path / "fit.json").write_text(json.dumps({
        "version": 2, "budget_tokens": budget, "domains": list(tokens), "optimal_tokens": tokens,
        "weights": {d: v / total for d, v in tokens.items()}, "curves": {}, "plan_dir": None,
        "held_domains": list(held), "bound_domains": bounds or {},
        "frozen_domains": sorted(set(held) | set(bounds or {})), "objective": {"kind": "ppl"},
        "available_tokens": available or {d: 1e9 for d in tokens}, "bounds": {"max_epochs": 4.0}}))
    return path / "fit.json"


def test_extrapolation_freezes_held_and_bound_domains_at_their_share(tmp_path):
    """The old failure: 'books' went from a 0.01 floor to its held base amount, x100 per budget step."""
    n1 = {"books": 10.0, "code": 600.0, "math": 390.0}      # books on its lower bound at the small budget
    n2 = {"books": 667.0, "code": 800.0, "math": 533.0}     # books held at its base amount at the large one
    f1 = json.loads(_fake_fit(tmp_path / "s", 1000, n1, bounds={"books": "lower"}).read_text())
    f2 = json.loads(_fake_fit(tmp_path / "l", 2000, n2, held=["books"]).read_text())
    naive = extrapolate_to(list(n1.values()), list(n2.values()), 8000)
    assert naive[0] / 8000 > 0.75                        # the unguarded rule: books takes over
    res = mix.extrapolate_fits(f1, f2, 8000)
    assert res["weights"]["books"] == pytest.approx(667 / 2000)                     # its share at the larger budget
    assert set(res["frozen_domains"]) == {"books"}
    assert "lower bound at 1,000" in res["frozen_domains"]["books"] and "held at 2,000" in res["frozen_domains"]["books"]
    free = extrapolate_to([600.0, 390.0], [800.0, 533.0], 8000 * (1 - 667 / 2000))
    assert [res["tokens"]["code"], res["tokens"]["math"]] == pytest.approx(free.tolist())
    assert sum(res["tokens"].values()) == pytest.approx(8000)
    # everything frozen: the larger budget's mixture, said plainly
    f2_all = json.loads(_fake_fit(tmp_path / "all", 2000, n2, held=list(n2)).read_text())
    res = mix.extrapolate_fits(f1, f2_all, 8000)
    assert res["weights"] == pytest.approx({d: v / 2000 for d, v in n2.items()})
    assert any("reused unchanged" in w for w in res["warnings"])


def test_extrapolate_caps_scarce_data(tmp_path):
    n1 = {"a": 300.0, "b": 500.0, "c": 200.0}
    n2 = {"a": 500.0, "b": 1100.0, "c": 400.0}
    f1 = _fake_fit(tmp_path / "s", 1000, n1)
    f2 = _fake_fit(tmp_path / "l", 2000, n2, available={"a": 1e6, "b": 300.0, "c": 1e6})
    res = mix.extrapolate_fits(f1, f2, 8000)
    assert res["capped_domains"] == ["b"]
    assert res["tokens"]["b"] == pytest.approx(1200.0)                # 300 tokens x 4 epochs
    assert sum(res["tokens"].values()) == pytest.approx(8000)


def test_extrapolate_bad_inputs_exit_2(tmp_path, capsys):
    n1, n2 = {"a": 300.0, "b": 700.0}, {"a": 500.0, "b": 1500.0}
    f1, f2 = _fake_fit(tmp_path / "s", 1000, n1), _fake_fit(tmp_path / "l", 2000, n2)
    base = ["mix", "extrapolate", "--target", "8000", "--out", str(tmp_path / "o")]
    assert main(base + ["--fit", str(f2), "--fit", str(f1)]) == 2
    assert "smaller budget" in capsys.readouterr().err
    assert main(base + ["--fit", str(f1)]) == 2
    assert "exactly twice" in capsys.readouterr().err
    f3 = _fake_fit(tmp_path / "x", 2000, {"a": 1.0, "z": 2.0})
    assert main(base + ["--fit", str(f1), "--fit", str(f3)]) == 2
    assert "different domains" in capsys.readouterr().err
    assert main(base + ["--fit", str(f1), "--fit", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(base + ["--fit", str(f1), "--fit", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(base + ["--fit", str(f1), "--fit", str(f2)]) == 2                   # no plan, no --config
    assert "pass --config" in capsys.readouterr().err
    old = json.loads(f2.read_text())
    f2.write_text(json.dumps({**old, "version": 1}))
    assert main(base + ["--fit", str(f1), "--fit", str(f2)]) == 2
    assert "run `megareweight mix fit` again" in capsys.readouterr().err


def test_target_config_steps_follow_the_world_size(prepared_dir):
    cfg = tiny_config(prepared_dir)
    one, steps1 = mix.target_config(cfg, {"prose": 1, "code": 3}, 12800)
    two, steps2 = mix.target_config(cfg, {"prose": 1, "code": 3}, 12800, world_size=2)
    assert (steps1, steps2) == (100, 50)
    assert one.data.mixture == {"prose": 0.25, "code": 0.75} and one.data.train_domains == ["prose", "code"]
    assert math.isclose(sum(two.data.mixture.values()), 1.0)


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


def test_extrapolate_errors_quote_the_users_budgets(tmp_path, capsys):
    """The maths' errors quoted internal totals ("free domains ['a', 'b']: target_tokens=500 is below
    the smaller budget sum(n1)=1000"); the messages now speak of --target and the fits' budgets."""
    n1, n2 = {"a": 300.0, "b": 700.0}, {"a": 500.0, "b": 1500.0}
    f1, f2 = _fake_fit(tmp_path / "s", 1000, n1), _fake_fit(tmp_path / "l", 2000, n2)
    scarce = _fake_fit(tmp_path / "scarce", 2000, n2, available={"a": 10, "b": 10})
    m1, m2 = {"books": 100.0, "code": 500.0, "math": 400.0}, {"books": 1500.0, "code": 300.0, "math": 200.0}
    shrinking = (_fake_fit(tmp_path / "s3", 1000, m1), _fake_fit(tmp_path / "l3", 2000, m2, held=["books"]))
    m2b = {"books": 1000.0, "code": 550.0, "math": 450.0}
    squeezed = (_fake_fit(tmp_path / "s4", 1000, m1), _fake_fit(tmp_path / "l4", 2000, m2b, held=["books"]))
    cases = [
        ((f1, f2), "500", "--target 500 tokens is below the smaller fit's budget 1,000 tokens: that is not "
                          "extrapolation; plan and fit a mixture at that budget instead"),
        ((f1, scarce), "8000", "--target 8,000 tokens is more than the data allows: the domains' 20 training tokens "
                               "x max epochs 4 = 80; lower --target or raise --max-epochs"),
        (shrinking, "3000", "the free domains (code, math) get 900 of the smaller fit's 1,000 tokens but 500 of the "
                            "larger fit's 2,000: their optima do not grow, so there is no trend to extrapolate"),
        (squeezed, "1000", "--target 1,000 tokens leaves the free domains (code, math) 500 tokens after the frozen "
                           "domains' shares, fewer than the 900 they get at the smaller fit's budget 1,000; raise --target"),
    ]
    for (small, large), target, message in cases:
        assert main(["mix", "extrapolate", "--fit", str(small), "--fit", str(large), "--target", target,
                     "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"megareweight: error: {message}"]


def test_a_negative_target_is_named_before_the_fits_are_read(tmp_path, capsys):
    assert main(["mix", "extrapolate", "--fit", str(tmp_path / "a.json"), "--fit", str(tmp_path / "b.json"),
                 "--target", "-5", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "megareweight: error: --target: must be a token count >= 1, got '-5'"]

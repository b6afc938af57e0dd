#!/usr/bin/env python
"""AutoScale at CPU scale on the built-in six-domain corpus (issue 5's experiment).

1. DDO (``megareweight mix plan/run/fit``) at two small budgets: 2m+1 = 13 runs each.
2. Extrapolate the two optima to a budget ``--target-mult`` times the larger one (``mix extrapolate``).
3. Train at that budget with uniform, natural, the extrapolated mixture, and the extrapolated
   mixture + LinUpper instance reweighting (one seed each, same initialisation and sampler seed).
4. Write ``results.json``, ``results.md`` (table) and ``curves.png`` / ``fits_*.png`` to ``--out``.

Re-runnable: finished runs (same config) are skipped, so a second call only rebuilds the report.
Usage (from the repository root):

    .venv/bin/python experiments/autoscale/run_experiment.py --work /tmp/autoscale_work \
        --prepared /tmp/prep_full --out experiments/autoscale
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("WANDB_MODE", "disabled")

from megareweight.config import config_from_dict, dump_config
from megareweight.data.shards import PreparedData
from megareweight.mixing import workflow as wf

CORPUS = Path("/work/shared/corpus")
METHODS = ("uniform", "natural", "autoscale", "autoscale+linupper")


def base_config(prepared: str, args: argparse.Namespace) -> dict:
    return {
        "model": {"size": args.model},
        "data": {"prepared": prepared, "mixture": "uniform", "seq_len": 128, "micro_batch_size": 16,
                 "eval_sequences": args.eval_sequences},
        "reweight": {"strategy": "uniform"},
        "loss": {"impl": "auto"},
        "optim": {"lr": args.lr, "warmup_steps": 10, "min_lr_ratio": 0.1},
        "train": {"seed": 0, "max_steps": 100, "eval_interval": 0},
        "wandb": {"mode": "disabled"},
    }


def ensure_prepared(args: argparse.Namespace) -> PreparedData:
    if args.prepared:
        return PreparedData.open(args.prepared)
    out = Path(args.work) / "prepared"
    try:
        return PreparedData.open(out)
    except Exception:
        from megareweight.data.prepare import prepare

        prepare(CORPUS, out, vocab_size=4096, progress=True)
        return PreparedData.open(out)


def train_if_needed(raw: dict, out_dir: Path) -> None:
    from megareweight.train.loop import train

    cfg = config_from_dict(raw)
    if (out_dir / "summary.json").is_file() and (out_dir / "config.yaml").is_file():
        if wf._same_config(out_dir / "config.yaml", cfg):
            print(f"[exp] {out_dir.name}: finished earlier, reusing", flush=True)
            return
    print(f"[exp] training {out_dir.name}: {cfg.train.max_steps} steps", flush=True)
    train(cfg, out_dir, resume=True, progress=False)


def read_curve(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]


def tokens_to_reach(curve: list[dict], level: float, key: str = "avg_trained") -> float | None:
    """First token count at which ``key`` falls to ``level`` (linear interpolation between evals)."""
    prev = None
    for row in curve:
        if row[key] <= level:
            if prev is None:
                return float(row["tokens"])
            t0, y0, t1, y1 = prev["tokens"], prev[key], row["tokens"], row[key]
            return float(t0 + (y0 - level) / (y0 - y1) * (t1 - t0))
        prev = row
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/autoscale_work", help="run directories (large; not committed)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="where the report files go")
    ap.add_argument("--prepared", default=None, help="reuse a prepared directory of the built-in corpus")
    ap.add_argument("--budgets", default="80k,160k", help="the two DDO budgets (tokens)")
    ap.add_argument("--target-mult", type=float, default=4.0, help="target = this x the larger budget")
    ap.add_argument("--factors", default="0.2,1,3")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--final-evals", type=int, default=16, help="evaluations along each final run")
    ap.add_argument("--linupper-r", type=float, default=0.4)
    args = ap.parse_args()

    start = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_prepared(args)
    prepared = str(data.root)
    budgets = [wf.parse_tokens(b) for b in args.budgets.split(",")]
    assert len(budgets) == 2 and budgets[0] < budgets[1], "--budgets: two increasing budgets"
    target = int(round(args.target_mult * budgets[1]))
    base = base_config(prepared, args)
    base_path = work / "base.yaml"
    dump_config(config_from_dict(base), base_path)
    timings: dict[str, float] = {}

    # 1. DDO at the two budgets
    fits = []
    for b in budgets:
        t0 = time.time()
        plan_dir = work / f"ddo_{b}"
        wf.make_plan(base_path, b, plan_dir, factors=args.factors, force=True)
        wf.run_plan(plan_dir, progress=False)
        fit = wf.fit_plan(plan_dir, hold_unfit=True)
        fits.append(fit)
        shutil.copy(plan_dir / "fit.png", out / f"fits_{b}.png")
        timings[f"ddo_{b}"] = time.time() - t0
        print(f"[exp] DDO at {b:,}: weights " + ", ".join(f"{d} {w:.3f}" for d, w in fit["weights"].items()), flush=True)

    # 2. extrapolate
    ext = wf.extrapolate_fits(work / f"ddo_{budgets[0]}" / "fit.json", work / f"ddo_{budgets[1]}" / "fit.json", target)
    wf.write_extrapolation(ext, work / "extrapolated")
    print(f"[exp] extrapolated to {target:,}: " + ", ".join(f"{d} {w:.3f}" for d, w in ext["weights"].items()), flush=True)

    # 3. final runs
    tps = 128 * 16
    steps = int(round(target / tps))
    domains = fits[0]["domains"]
    natural = {d: float(data.manifest["domains"][d]["train"]["tokens"]) for d in domains}
    natural = {d: v / sum(natural.values()) for d, v in natural.items()}
    mixtures = {"uniform": {d: 1 / len(domains) for d in domains}, "natural": natural,
                "autoscale": ext["weights"], "autoscale+linupper": ext["weights"]}
    records = {}
    t0 = time.time()
    for method in METHODS:
        raw = json.loads(json.dumps(base))
        raw["data"]["mixture"] = mixtures[method]
        raw["data"]["train_domains"] = domains
        raw["train"]["max_steps"] = steps
        raw["train"]["eval_interval"] = max(steps // args.final_evals, 1)
        if method.endswith("linupper"):
            raw["reweight"] = {"strategy": "linupper", "r": args.linupper_r, "warmup_steps": max(steps // 10, 1)}
        run_dir = work / "final" / method.replace("+", "_")
        train_if_needed(raw, run_dir)
        curve = read_curve(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        records[method] = {"curve": curve, "final": {d: curve[-1][f"loss/{d}"] for d in domains},
                           "avg": curve[-1]["avg_trained"], "seconds": summary["seconds"],
                           "tokens": curve[-1]["tokens"], "mixture": mixtures[method]}
    timings["final_runs"] = time.time() - t0
    uniform_final = records["uniform"]["avg"]
    for method, rec in records.items():
        rec["tokens_to_uniform_final"] = tokens_to_reach(rec["curve"], uniform_final)

    # 4. report
    total = time.time() - start
    run_seconds = sum(json.loads(f.read_text())["seconds"] for f in work.glob("*/runs/*/summary.json"))
    run_seconds += sum(r["seconds"] for r in records.values())
    n_runs = len(list(work.glob("*/runs/*/summary.json"))) + len(records)
    lines = ["| domain | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for d in domains:
        vals = [records[m]["final"][d] for m in METHODS]
        best = int(np.argmin(vals))
        lines.append(f"| {d} | " + " | ".join(f"**{v:.4f}**" if i == best else f"{v:.4f}" for i, v in enumerate(vals)) + " |")
    vals = [records[m]["avg"] for m in METHODS]
    best = int(np.argmin(vals))
    lines.append("| **average** | " + " | ".join(f"**{v:.4f}**" if i == best else f"{v:.4f}" for i, v in enumerate(vals)) + " |")
    reach = []
    for m in METHODS:
        t = records[m]["tokens_to_uniform_final"]
        reach.append("not reached" if t is None else f"{t:,.0f} ({t / records['uniform']['tokens']:.2f}x)")
    lines.append("| tokens to reach uniform's final average | " + " | ".join(reach) + " |")
    lines.append("| mixture | " + " | ".join(", ".join(f"{d[:4]} {w:.2f}" for d, w in mixtures[m].items()) for m in METHODS) + " |")
    table = "\n".join(lines)
    wtab = ["| domain | DDO weight @ " + f"{budgets[0]:,}" + " | DDO weight @ " + f"{budgets[1]:,}"
            + f" | extrapolated @ {target:,} | natural |", "|---|---|---|---|---|"]
    for d in domains:
        wtab.append(f"| {d} | {fits[0]['weights'][d]:.4f} | {fits[1]['weights'][d]:.4f} | {ext['weights'][d]:.4f} | {natural[d]:.4f} |")
    fit_rows = ["| budget | domain | a | b | c | rmse | relative losses at x |", "|---|---|---|---|---|---|---|"]
    for b, fit in zip(budgets, fits):
        for d in domains:
            c = fit["curves"][d]
            pts = ", ".join(f"{x:.2f}: {y:.4f}" for x, y in zip(c["x"], c["relative_loss"]))
            if c.get("held"):
                fit_rows.append(f"| {b:,} | {d} | - | - | - | - | {pts} (no decrease: held at x = 1) |")
            else:
                fit_rows.append(f"| {b:,} | {d} | {c['a']:.4g} | {c['b']:.4g} | {c['c']:.4g} | {c['rmse']:.2g} | {pts} |")
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU, Python {platform.python_version()}"
    import torch

    md = f"""## Results (written by run_experiment.py)

Machine: {machine}, torch {torch.__version__} ({torch.get_num_threads()} threads); shared with other jobs.
Training time of all {n_runs} runs (sum of their summary.json `seconds`, i.e. what a from-scratch run
costs): {run_seconds:.0f} s. Wall time of the invocation that wrote this file (finished runs are
reused, so a re-run is short): {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).
Model `{args.model}`, seq_len 128, batch 16 (2,048 tokens/step), lr {args.lr}, one seed (0).
DDO budgets {budgets[0]:,} and {budgets[1]:,} tokens (factors {args.factors}, 13 runs each);
target {target:,} tokens = {steps} steps.

### Final validation loss at {target:,} tokens (nats/token, lower is better; best in bold)

{table}

### Mixtures

{chr(10).join(wtab)}

Extrapolation warnings: {'; '.join(ext['warnings']) or 'none'}.
Fit warnings: {'; '.join(fits[0]['warnings'] + fits[1]['warnings']) or 'none'}.

### Fitted curves (relative loss = mean validation loss / base run's)

{chr(10).join(fit_rows)}
"""
    (out / "results.md").write_text(md)
    result = {"command": " ".join(sys.argv), "machine": machine, "wall_seconds": total, "timings": timings,
              "training_seconds_all_runs": run_seconds, "runs": n_runs,
              "budgets": budgets, "target": target, "steps": steps, "args": vars(args),
              "fits": [{k: f[k] for k in ("budget_tokens", "weights", "optimal_tokens", "optimal_x", "curves",
                                          "warnings", "predicted_objective", "runs")} for f in fits],
              "extrapolation": ext,
              "final": {m: {k: v for k, v in r.items()} for m, r in records.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in METHODS:
        c = records[m]["curve"]
        axes[0].plot([r["tokens"] for r in c], [r["avg_trained"] for r in c], marker=".", label=m)
    axes[0].axhline(uniform_final, color="gray", ls=":", label="uniform final")
    axes[0].set_xlabel("training tokens")
    axes[0].set_ylabel("mean validation loss over 6 domains")
    axes[0].set_title(f"final runs at {target:,} tokens")
    lo = min(min(r["avg_trained"] for r in records[m]["curve"]) for m in METHODS)
    axes[0].set_ylim(lo - 0.05, lo + 1.5)
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    x = np.arange(len(domains))
    width = 0.8 / len(METHODS)
    for k, m in enumerate(METHODS):
        axes[1].bar(x + k * width, [records[m]["final"][d] - records["uniform"]["final"][d] for d in domains],
                    width, label=m)
    axes[1].set_xticks(x + 0.4 - width / 2, domains)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_ylabel("final loss minus uniform's")
    axes[1].set_title("per-domain change vs uniform")
    axes[1].grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    print(md)
    print(f"[exp] done in {total:.0f} s; report in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

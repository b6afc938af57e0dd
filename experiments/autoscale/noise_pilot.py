#!/usr/bin/env python
"""Seed noise of the base run under several setups: which one can pass the noise gate?

The first run of ``run_experiment.py`` (tied-embedding ``tiny`` model, 16 x 128-token batches)
failed its noise gate: 4 seeds of the 250k-token base run differed by 28 % in mean perplexity.
This script trains ``--seeds`` seeds of the base run (uniform mixture, the experiment's base
config) for each setup given as ``model:tie:micro_batch:lr:budget`` and appends the relative
standard deviation of the mean perplexity to ``--out`` (JSON). Finished runs are reused.

    PYTHONPATH=$PWD .venv/bin/python experiments/autoscale/noise_pilot.py --work /tmp/as12/pilot \\
        --prepared /tmp/as12/work/prepared tiny:tie:8:0.01:250k tiny:untie:8:0.01:250k
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_experiment import base_raw, run_jobs, summary_of, write_config  # noqa: E402

from megareweight.autoscale import parse_tokens  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("setups", nargs="+", help="model:tie|untie:micro_batch:lr:budget, e.g. tiny:untie:8:0.01:250k")
    ap.add_argument("--work", required=True)
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--eval-sequences", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "noise_pilot.json"))
    args = ap.parse_args()
    work = Path(args.work)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for setup in args.setups:
        model, tie, mbs, lr, budget = setup.split(":")
        tag = f"{model}_{tie}_mbs{mbs}_lr{lr}_{budget}"
        raw = base_raw(Path(args.prepared), model, tie == "tie", int(mbs), float(lr), args.eval_sequences)
        raw["train"]["max_steps"] = round(parse_tokens(budget) / (128 * int(mbs)))
        jobs = []
        for seed in range(args.seeds):
            raw["train"]["seed"] = seed
            jobs.append((write_config(raw, work / tag / f"s{seed}.yaml"), work / tag / f"s{seed}"))
        run_jobs(jobs, 2, 1, work / "train.log")
        runs = [summary_of(o, ["books", "code", "math"]) for _, o in jobs]
        ppl = np.array([r["mean_ppl"] for r in runs])
        results[tag] = {"setup": setup, "steps": raw["train"]["max_steps"], "mean_ppl": ppl.tolist(),
                        "avg_loss": [r["avg_loss"] for r in runs], "sigma_relative": float(ppl.std(ddof=1) / ppl.mean()),
                        "seconds": [r["seconds"] for r in runs]}
        print(f"{tag}: sigma {results[tag]['sigma_relative']:.3f}, mean ppl {np.round(ppl, 1).tolist()}", flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""AutoScale's fair, powered test (issue 22): the paper's measure, the notebook's factors, five
domains, a corpus where mixing matters, and a power calculation fixed before running.

The design and the decision rules are in ``README.md`` ("Issue 22: the powered test"), written
and committed before any run. In short, for each of two corpus conditions:

* ``balanced``: the built-in corpus's books, code, dictionary, legal and math, all of each;
* ``skewed``: the same five domains, dictionary (the generic, encyclopedic one) kept whole, the
  other four cut to ``KEEP_FRACTION`` of their training text (:func:`subsample_domain`; the
  validation documents are all kept, so both conditions score the very same validation text with
  the very same tokenizer);

1. fits at B1 and B2 (``mix plan --factors 1/3,1,3 --seeds K``, ``mix fit --objective ppl``);
2. the precision of the located optimum (:func:`bootstrap_precision`: the fits' seed noise put
   back into their points, refitted, re-solved and re-extrapolated);
3. ``mix extrapolate`` B1, B2 -> the target;
4. four arms at the target, paired seeds: uniform, natural (token-proportional), the B2 optimum
   reused, the AutoScale extrapolation;
5. the report: objective (mean perplexity over the five domains, what DDO minimises), mean loss,
   per-domain loss, the speed ratio (tokens to reach the worse run's final objective,
   :func:`speed_ratio`), each with a 95 % interval, and a verdict per arm (:func:`verdict`).

Resumable and recorded like ``experiments/reweighting/lm.py``: every run trains with the
``megareweight`` of ``CODE_COMMIT`` (a ``git archive`` snapshot under the work directory; the
script re-executes itself on it, so planning, fitting and extrapolating are pinned too); each
finished run is recorded (config, summary, eval curve) in ``issue22/results.json``; on a new
machine the recorded runs are restored from it, never retrained; a lock per run keeps two
invocations from training the same run; ``--commit`` commits the results after every finished run.
``kill <pid>`` (SIGTERM; SIGINT and SIGUSR1 too) stops it resumable: the running runs checkpoint,
the queued ones do not start, and the same command continues.

Commands (repository root):

    .venv/bin/python experiments/autoscale/scale_test.py design          # power and cost (no runs)
    .venv/bin/python experiments/autoscale/scale_test.py run --commit    # the experiment (~2 h measured; designed as 6 h)
    .venv/bin/python experiments/autoscale/scale_test.py report          # rebuild the report
    .venv/bin/python experiments/autoscale/scale_test.py run --smoke --work /tmp/as22_smoke   # minutes
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PINNED_ENV = "AS22_PINNED_CODE"
if not os.environ.get(PINNED_ENV) and str(REPO) not in sys.path:
    sys.path.append(str(REPO))      # tests and `design`: the working tree; `run`: the snapshot (PYTHONPATH)

#: The commit whose ``megareweight`` (and ``kernels``) prepares, plans, trains, fits and extrapolates.
CODE_COMMIT = "977458e92cbd866dea4d1374efc0f704d3799cac"
#: the built-in corpus in the shared folder beside the checkout (``../shared/corpus``, as in the Makefile)
CORPUS = REPO.parent / "shared" / "corpus"
DOMAINS = ["books", "code", "dictionary", "legal", "math"]
LARGE = "dictionary"
KEEP_FRACTION = 0.05
VALID_FRACTION = 0.02          # megareweight prepare's default: the validation documents are kept whole
SUBSAMPLE_KEY = b"as22-keep"   # BLAKE2b personalisation of the keep order (independent of the split hash)
VOCAB = 2048
FACTORS = [1 / 3, 1.0, 3.0]    # the official notebook's scale-up/down (issue 12 used 1/4 and 4)
CONDITIONS = ("balanced", "skewed")
ARMS = ("uniform", "natural", "b2_optimum", "extrapolated")
PAPER_SPEEDUP = 1.28           # "28 % faster": tokens ratio 1 / 1.28 = 0.78
OLD_RESULTS = HERE / "results.json"   # issue 12's record: the noise this design is sized on
DEFAULT_OUT = HERE / "issue22"
DEFAULT_WORK = REPO / "runs" / "autoscale_issue22"


@dataclass(frozen=True)
class Design:
    b1: int = 500_000
    b2: int = 1_000_000
    target: int = 4_000_000
    fit_seeds: int = 2
    final_seeds: int = 5
    final_evals: int = 20
    eval_sequences: int = 128
    micro_batch_size: int = 8
    lr: float = 0.01
    checkpoint_interval: int = 500


#: Fixed before running (README, "Issue 22"). ``design`` prints why these numbers.
DESIGN = Design()
SMOKE = Design(b1=12_288, b2=24_576, target=49_152, fit_seeds=2, final_seeds=2, final_evals=4, eval_sequences=4,
               checkpoint_interval=20)


# --- pure analysis (tested in tests/test_autoscale_scale_test.py) ----------------------------------

def crossing_tokens(curve: Sequence[dict[str, Any]], key: str, level: float) -> Optional[float]:
    """Training tokens at which ``curve[key]`` first falls to ``level`` (linear interpolation between
    evaluations); None when it never does."""
    prev_t, prev_y = None, None
    for row in curve:
        t, y = float(row["tokens"]), float(row[key])
        if y <= level:
            if prev_y is None or prev_y == y:
                return t
            return prev_t + (prev_y - level) / (prev_y - y) * (t - prev_t)
        prev_t, prev_y = t, y
    return None


def speed_ratio(arm: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], key: str) -> tuple[float, str]:
    """Tokens ratio of ``arm`` to ``base`` (< 1: the arm is faster), defined for every pair of runs.

    When the arm ends at or below the base's final value, ratio = the tokens the arm needs to reach
    the base's final value / the base's tokens (the paper's measure). Otherwise the arm never gets
    there, and ratio = the base's tokens / the tokens the base needs to reach the arm's final value
    (> 1). Both read "how many tokens to reach the worse run's final value", so the ratio is
    continuous through 1 and no seed is censored.
    """
    a_final, b_final = float(arm[-1][key]), float(base[-1][key])
    if a_final <= b_final:
        t = crossing_tokens(arm, key, b_final)
        return float(t) / float(base[-1]["tokens"]), "arm reached base's final"
    t = crossing_tokens(base, key, a_final)
    return float(arm[-1]["tokens"]) / float(t), "base reached arm's final"


def power_paired(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test (``n`` pairs, level ``alpha``) for a true mean
    difference ``effect`` with paired standard deviation ``sd`` (noncentral t)."""
    from scipy import stats

    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect / sd * math.sqrt(n)
    upper, lower = float(stats.nct.sf(crit, df, nc)), float(stats.nct.cdf(-crit, df, nc))
    # scipy's far tail of the noncentral t can come back NaN where it is below 1e-15: count it as 0
    upper = 0.0 if math.isnan(upper) and nc < 0 else upper
    lower = 0.0 if math.isnan(lower) and nc > 0 else lower
    return upper + lower


def mde_paired(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true mean difference the paired t-test detects with ``power`` (two-sided ``alpha``)."""
    from scipy.optimize import brentq

    high = sd
    while power_paired(high, sd, n, alpha) < power:     # 2 seeds need ~20 sd; 10 seeds ~1 sd
        high *= 2
    return float(brentq(lambda e: power_paired(e, sd, n, alpha) - power, 1e-12 * sd, high))


def ratio_interval(ratios: Sequence[float]) -> dict[str, Any]:
    """Geometric mean of ratios with the 95 % t-interval of the mean log ratio, back-transformed."""
    from megareweight.stats import mean_ci

    logs = np.log(np.asarray(ratios, dtype=float))
    mean, low, high = mean_ci(logs)
    return {"mean": math.exp(mean), "low": math.exp(low) if math.isfinite(low) else math.nan,
            "high": math.exp(high) if math.isfinite(high) else math.nan, "n": len(ratios),
            "values": [float(r) for r in ratios]}


def verdict(rel_diff: dict[str, Any], speed: dict[str, Any], predicted_gain: Optional[float] = None,
            other: str = "uniform") -> str:
    """The decision rule (fixed before running; README "Issue 22"), for one arm against ``other``.

    ``rel_diff``: the paired relative difference of the objective (arm / other - 1 per seed; mean,
    low, high of its 95 % t-interval). ``speed``: the speed ratio interval (:func:`ratio_interval`).

    * objective: "lower than {other}" if the interval's high end < 0, "higher" if its low end > 0,
      else "no difference shown";
    * speed: "faster" if the ratio interval's high end < 1, "slower" if its low end > 1, else
      "no speed difference shown"; and against the paper's 28 %: "at least the paper's speed-up"
      when high < 1/1.28, "less than the paper's speed-up" when low > 1/1.28;
    * with the B2 fit's predicted gain g (a fraction): "the predicted gain is excluded" when the
      objective interval's low end > -g (the arm does not gain as much as the fit said).
    """
    lo, hi = rel_diff["low"], rel_diff["high"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "fewer than 2 seeds: no verdict"
    parts = []
    if hi < 0:
        parts.append(f"objective lower than {other} (better)")
    elif lo > 0:
        parts.append(f"objective higher than {other} (worse)")
    else:
        parts.append(f"no objective difference from {other} shown")
    s_lo, s_hi = speed["low"], speed["high"]
    paper = 1.0 / PAPER_SPEEDUP
    if s_hi < 1:
        parts.append("faster")
    elif s_lo > 1:
        parts.append("slower")
    else:
        parts.append("no speed difference shown")
    if s_hi < paper:
        parts.append("at least the paper's 28 % speed-up")
    elif s_lo > paper:
        parts.append("less than the paper's 28 % speed-up")
    if predicted_gain is not None and predicted_gain > 0 and lo > -predicted_gain:
        parts.append(f"the B2 fit's predicted gain ({100 * predicted_gain:.1f} %) is excluded")
    return "; ".join(parts)


def subsample_documents(texts: Sequence[str], fraction: float, valid_fraction: float = VALID_FRACTION) -> list[int]:
    """Indices (in input order) of the documents kept when a domain is cut to ``fraction`` of its
    training text (characters).

    Every validation document (megareweight prepare's rule: BLAKE2b of the text below
    ``valid_fraction``) is kept, so the validation split is unchanged. Training documents are kept
    in the order of a keyed BLAKE2b of their text until their characters reach ``fraction`` of the
    training characters (at least one). Deterministic: depends only on the texts.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")

    def is_valid(text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") < int(valid_fraction * 2**64)

    valid = [is_valid(t) for t in texts]
    if fraction >= 1:
        return list(range(len(texts)))
    train = [i for i, v in enumerate(valid) if not v]
    order = sorted(train, key=lambda i: hashlib.blake2b(texts[i].encode("utf-8"), digest_size=8,
                                                       person=SUBSAMPLE_KEY).digest())
    goal = fraction * sum(len(texts[i]) for i in train)
    kept, chars = set(), 0
    for i in order:
        if kept and chars >= goal:
            break
        kept.add(i)
        chars += len(texts[i])
    return [i for i in range(len(texts)) if valid[i] or i in kept]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_skewed_corpus(corpus: Path, out: Path, domains: Sequence[str] = DOMAINS, large: str = LARGE,
                        fraction: float = KEEP_FRACTION) -> dict[str, Any]:
    """The ``skewed`` condition's corpus under ``out``: ``large`` whole, every other domain cut by
    :func:`subsample_documents`. Returns (and writes as ``subsample.json``) what was kept, with the
    SHA-256 of every file written; rebuilding from the same corpus gives the same bytes."""
    manifest_path = out / "subsample.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    record: dict[str, Any] = {"source": str(corpus), "large": large, "keep_fraction": fraction,
                              "valid_fraction": VALID_FRACTION, "domains": {}}
    for d in domains:
        rows = _read_jsonl(corpus / f"{d}.jsonl.xz")
        keep = subsample_documents([r["text"] for r in rows], 1.0 if d == large else fraction)
        path = tmp / f"{d}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i in keep:
                fh.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
        record["domains"][d] = {"documents": len(rows), "kept_documents": len(keep),
                                "characters": sum(len(r["text"]) for r in rows),
                                "kept_characters": sum(len(rows[i]["text"]) for i in keep),
                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (tmp / "subsample.json").write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


# --- the design: power and cost from issue 12's measured noise --------------------------------------

def _old_paired_sd(old: dict[str, Any]) -> dict[str, Any]:
    """Paired sd (by seed) of the relative objective difference arm / uniform - 1 at issue 12's target."""
    rec = old["final"]["records"]
    seeds = sorted(rec["uniform"]["seeds"])
    out: dict[str, Any] = {}
    for arm in ("b2_mixture", "extrapolated"):
        d = [rec[arm]["seeds"][s]["mean_ppl"] / rec["uniform"]["seeds"][s]["mean_ppl"] - 1 for s in seeds]
        r = [speed_ratio(rec[arm]["seeds"][s]["curve"], rec["uniform"]["seeds"][s]["curve"], "mean_ppl")[0]
             for s in seeds]
        out[arm] = {"relative_differences": d, "sd": float(np.std(d, ddof=1)), "mean": float(np.mean(d)),
                    "speed_ratios": r, "log_ratio_sd": float(np.std(np.log(r), ddof=1))}
    k = len(seeds) - 1
    out["pooled_sd"] = float(math.sqrt(np.mean([out[a]["sd"] ** 2 for a in ("b2_mixture", "extrapolated")])))
    out["pooled_log_ratio_sd"] = float(math.sqrt(np.mean([out[a]["log_ratio_sd"] ** 2
                                                           for a in ("b2_mixture", "extrapolated")])))
    out["pooled_dof"] = 2 * k
    out["seeds"] = len(seeds)
    return out


def _plan_tokens(budget: float, m: int, factors: Sequence[float]) -> float:
    """Tokens of one seed of a plan around the uniform mixture: the base and each domain scaled."""
    per = budget / m
    return budget + sum(budget + (f - 1) * per for _ in range(m) for f in factors if f != 1.0)


def _old_cost(old: dict[str, Any]) -> dict[str, Any]:
    """Issue 12's training tokens (+ 1/3 of its evaluation forward tokens) per training second."""
    m = len(old["domains"])
    window = old["args"]["eval_sequences"] * 128 * m
    train = evals = 0.0
    runs = 0
    for key in ("b1", "b2"):
        for r in old["fits"][key]["ppl"]["runs"].values():
            train += sum(r["tokens"].values())
            evals += window
            runs += 1
    g = old["gate"]
    extra = g["base_seeds"] - len(old["fits"]["b1"]["ppl"]["seeds"])
    base_b1 = next(sum(r["tokens"].values()) for r in old["fits"]["b1"]["ppl"]["runs"].values() if r["group"] == "base")
    train += extra * base_b1
    evals += extra * window
    runs += extra
    for r in old["validation_b2"]["runs"]:
        train += sum(r["tokens"].values())
        evals += window
        runs += 1
    for arm in old["final"]["records"].values():
        for rec in arm["seeds"].values():
            train += sum(rec["tokens_per_domain"].values())
            evals += window * len(rec["curve"])
            runs += 1
    weighted = train + evals / 3
    return {"runs": runs, "train_tokens": train, "eval_forward_tokens": evals, "training_seconds": old["training_seconds"],
            "weighted_tokens_per_run_second": weighted / old["training_seconds"]}


def design_cost(design: Design, rate: float, m: int = len(DOMAINS), arms: int = len(ARMS),
                conditions: int = len(CONDITIONS), parallel: int = 2) -> dict[str, Any]:
    """Tokens and wall hours of a design (``parallel`` single-thread runs side by side at ``rate``)."""
    window = design.eval_sequences * 128 * m
    fit_train = design.fit_seeds * (_plan_tokens(design.b1, m, FACTORS) + _plan_tokens(design.b2, m, FACTORS))
    fit_runs = design.fit_seeds * (2 * m + 1) * 2
    final_train = arms * design.final_seeds * design.target
    final_runs = arms * design.final_seeds
    weighted = (fit_train + fit_runs * window / 3 + final_train + final_runs * (design.final_evals + 1) * window / 3)
    weighted *= conditions
    return {"fit_tokens_per_condition": fit_train, "final_tokens_per_condition": final_train,
            "runs": conditions * (fit_runs + final_runs), "weighted_tokens": weighted,
            "hours": weighted / rate / parallel / 3600}


def design_numbers(old_path: Path = OLD_RESULTS, design: Design = DESIGN) -> dict[str, Any]:
    old = json.loads(old_path.read_text())
    noise = _old_paired_sd(old)
    sd = noise["pooled_sd"]
    gain = 1 - old["fits"]["b2"]["ppl"]["predicted_relative_objective"]["optimal"]
    cost = _old_cost(old)
    rate = cost["weighted_tokens_per_run_second"]
    table = []
    for n in range(3, 16):
        d = replace(design, final_seeds=n)
        table.append({"seeds": n, "mde": mde_paired(sd, n), "power_at_predicted_gain": power_paired(gain, sd, n),
                      "hours": design_cost(d, rate)["hours"]})
    n80 = next(r["seeds"] for r in table if r["power_at_predicted_gain"] >= 0.8)
    from scipy import stats

    dof = noise["pooled_dof"]
    return {
        "old_results": str(old_path.relative_to(REPO)) if old_path.is_relative_to(REPO) else str(old_path),
        "paired_noise": noise,
        "paired_sd_upper_95": sd * math.sqrt(dof / stats.chi2.ppf(0.05, dof)),
        "fit_noise": {k: old["fits"][k]["ppl"]["noise"] for k in ("b1", "b2")},
        "predicted_gain_b2": gain,
        "cost_calibration": cost,
        "design": asdict(design),
        "design_cost": design_cost(design, rate),
        "design_mde": mde_paired(sd, design.final_seeds),
        "design_power_at_predicted_gain": power_paired(gain, sd, design.final_seeds),
        "design_speed_mde_ratio": math.exp(-mde_paired(noise["pooled_log_ratio_sd"], design.final_seeds)),
        "seeds_for_80_percent": n80,
        "hours_for_80_percent": next(r["hours"] for r in table if r["seeds"] == n80),
        "table": table,
    }


def cmd_design(args: argparse.Namespace) -> int:
    res = design_numbers(Path(args.old))
    noise = res["paired_noise"]
    print(f"issue 12 at its 4M target, {noise['seeds']} paired seeds, relative objective difference arm/uniform - 1:")
    for arm in ("b2_mixture", "extrapolated"):
        v = noise[arm]
        print(f"  {arm:<13} per seed {', '.join(f'{x:+.4f}' for x in v['relative_differences'])}: sd {v['sd']:.4f}; "
              f"speed ratios {', '.join(f'{x:.3f}' for x in v['speed_ratios'])} (log sd {v['log_ratio_sd']:.4f})")
    print(f"  pooled paired sd {noise['pooled_sd']:.4f} ({noise['pooled_dof']} dof; one-sided 95 % upper bound "
          f"{res['paired_sd_upper_95']:.4f}); pooled log speed-ratio sd {noise['pooled_log_ratio_sd']:.4f}")
    fn = res["fit_noise"]
    print(f"fit seed noise (sd of one run's relative objective): B1 {fn['b1']['sd']:.4f}, B2 {fn['b2']['sd']:.4f}")
    print(f"gain the B2 fit predicted: {100 * res['predicted_gain_b2']:.2f} %")
    c = res["cost_calibration"]
    print(f"cost: issue 12 trained {c['train_tokens']:,.0f} tokens (+ {c['eval_forward_tokens']:,.0f} eval forward "
          f"tokens, counted 1/3) in {c['training_seconds']:,.0f} training seconds over {c['runs']} runs: "
          f"{c['weighted_tokens_per_run_second']:,.0f} tokens per run-second (1 thread, 2 runs side by side)")
    print("seeds per arm | MDE (relative objective, 80 % power, paired t, alpha 0.05) | power at the predicted gain "
          "| hours (2 conditions, 4 arms)")
    for r in res["table"]:
        print(f"  {r['seeds']:>2} | {100 * r['mde']:.2f} % | {r['power_at_predicted_gain']:.2f} | {r['hours']:.1f}")
    d, dc = res["design"], res["design_cost"]
    print(f"80 % power at the predicted gain needs {res['seeds_for_80_percent']} seeds per arm: "
          f"{res['hours_for_80_percent']:.1f} h")
    print(f"chosen design: B1 {d['b1']:,}, B2 {d['b2']:,}, target {d['target']:,}; {d['fit_seeds']} seeds per fit "
          f"setting, {d['final_seeds']} per arm; {dc['runs']} runs, {dc['hours']:.1f} h; MDE {100 * res['design_mde']:.2f} %, "
          f"power at the predicted gain {res['design_power_at_predicted_gain']:.2f}; speed ratio MDE "
          f"x{res['design_speed_mde_ratio']:.3f}")
    if args.write:
        path = Path(args.out) / "design.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


# --- everything below runs on the pinned snapshot ---------------------------------------------------

def code_snapshot(work: Path, commit: str = CODE_COMMIT) -> Path:
    """The pinned code under ``work`` (:func:`experiments/code_snapshot.py <code_snapshot.code_snapshot>`)."""
    import importlib.util

    # loaded from its file under a private name: the project claims no top-level import but megareweight
    spec = importlib.util.spec_from_file_location("_megareweight_code_snapshot", REPO / "experiments" / "code_snapshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.code_snapshot(REPO, work, commit)


def _pin(work: Path) -> None:
    """Re-execute this script with the snapshot first on the import path (once per invocation)."""
    code = code_snapshot(work)
    if os.environ.get(PINNED_ENV) == str(code):
        import megareweight

        if not Path(megareweight.__file__).resolve().is_relative_to(code.resolve()):
            raise SystemExit(f"scale_test.py: megareweight imported from {megareweight.__file__}, not the snapshot {code}")
        return
    env = {**os.environ, PINNED_ENV: str(code), "PYTHONPATH": str(code), "WANDB_MODE": "disabled"}
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU, Python {platform.python_version()}"


#: set in a pool worker once a stop signal reached it: the runs still queued to it are not started
_WORKER_STOPPING = False


def _note_stop(signum: int, _frame: Any) -> None:
    global _WORKER_STOPPING
    _WORKER_STOPPING = True


def _worker_init() -> None:
    """Pool worker start-up. Why: ``ProcessPoolExecutor`` hands each worker a run or two ahead,
    and cancelling in the parent cannot take those back; a worker told to stop (between runs, or
    inside one, where the trainer's own handler checkpoints) must not start them."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, _note_stop)


def _train_worker(config_path: str, out: str, threads: int) -> str:
    """Train (or resume) one run in this worker process. Returns ``"locked"`` if another process
    has it, ``"stopped ..."`` if a signal stopped it (checkpointed, resumable) or came before it
    started, else the wall time."""
    global _WORKER_STOPPING
    if _WORKER_STOPPING:
        return "stopped before it started"
    import torch

    torch.set_num_threads(threads)
    from megareweight.config import load_config
    from megareweight.train.loop import train
    from megareweight.train.signals import StoppedBySignal

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".as22.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "locked"
        start = time.time()
        with open(out_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                train(load_config(config_path), out_dir, resume=True, progress=False)
            except StoppedBySignal as stop:
                _WORKER_STOPPING = True
                return f"stopped: {stop}"
        return f"{time.time() - start:.0f} s"


class Recorder:
    """``results.json``: the design, and every finished run (config, summary, eval curve) so that a new
    machine restores instead of retraining; written after every run, committed with ``--commit``."""

    def __init__(self, out: Path, design: Design, commit: bool, smoke: bool):
        self.out, self.design, self.commit, self.smoke = out, design, commit, smoke
        self.path = out / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if self.data and self.data.get("design") != asdict(design):
            raise SystemExit(f"{self.path} records another design ({self.data.get('design')}); use another --out")
        self.data.setdefault("issue", 22)
        self.data["design"] = asdict(design)
        self.data["code_commit"] = CODE_COMMIT
        self.data.setdefault("conditions", {})

    def cond(self, name: str) -> dict[str, Any]:
        return self.data["conditions"].setdefault(name, {"runs": {}})

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.data["machine"] = machine()
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float) + "\n")
        os.replace(tmp, self.path)

    def git_commit(self, message: str) -> None:
        if not self.commit:
            return
        paths = [str(p.resolve().relative_to(REPO)) for p in (self.path, self.out / "results.md") if p.exists()]
        for attempt in range(5):
            add = subprocess.run(["git", "add", "--", *paths], cwd=REPO, capture_output=True, text=True)
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=REPO,
                                  capture_output=True, text=True)
            if add.returncode == 0 and (done.returncode == 0 or "nothing" in done.stdout + done.stderr):
                return
            time.sleep(2 + 3 * attempt)
        print(f"[as22] warning: could not commit results: {done.stderr.strip()}", flush=True)


def _comparable(raw: dict[str, Any]) -> dict[str, Any]:
    """A config without the machine-specific prepared path (runs are matched across machines)."""
    raw = json.loads(json.dumps(raw))
    raw["data"].pop("prepared", None)
    return raw


class _StopForwarding:
    """The runner's SIGTERM/SIGINT/SIGUSR1 handler while a pool trains. Why: by default the signal
    killed only this process, and its spawned workers, orphaned, went on taking queued runs. Now the
    signal is passed to every worker (its trainer finishes the step and checkpoints; a worker between
    runs starts no other), the runner cancels what is still queued as soon as a run returns, waits
    for the workers and exits resumable. The handler only records and forwards: cancelling takes the
    pool's locks, which the interrupted main thread may hold."""

    def __init__(self) -> None:
        self.signum = 0

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.signum:
            self.signum = signum
            print(f"[as22] {signal.Signals(signum).name} received: the running runs checkpoint, "
                  "the queued ones are cancelled", flush=True)
        import multiprocessing

        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    @contextlib.contextmanager
    def installed(self):
        signums = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        previous = {s: signal.signal(s, self._handle) for s in signums}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class Runner:
    def __init__(self, work: Path, rec: Recorder, jobs: int, threads: int):
        self.work, self.rec, self.jobs, self.threads = work, rec, jobs, threads

    def record_run(self, cond: str, config: Path, out: Path) -> None:
        from megareweight.config import load_config

        key = str(out.relative_to(self.work / cond))
        eval_path = out / "eval.jsonl"
        self.rec.cond(cond)["runs"][key] = {
            "code_commit": CODE_COMMIT,
            "config": _comparable(load_config(out / "config.yaml").to_dict()),
            "summary": json.loads((out / "summary.json").read_text()),
            "eval": [json.loads(x) for x in eval_path.read_text().splitlines() if x.strip()] if eval_path.is_file() else [],
        }

    def restore(self, cond: str, config: Path, out: Path) -> bool:
        """A run recorded in results.json with this config: write its files back instead of training."""
        from megareweight.config import dump_config, load_config

        saved = self.rec.cond(cond)["runs"].get(str(out.relative_to(self.work / cond)))
        cfg = load_config(config)
        if not saved or saved["code_commit"] != CODE_COMMIT or saved["config"] != _comparable(cfg.to_dict()):
            return False
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in saved["eval"]))
        (out / "summary.json").write_text(json.dumps(saved["summary"], indent=1) + "\n")
        return True

    def train(self, cond: str, jobs: list[tuple[Path, Path]]) -> None:
        from megareweight.autoscale.measure import same_config
        from megareweight.config import load_config

        todo = []
        for config, out in dict.fromkeys(jobs):
            if (out / "summary.json").is_file() and same_config(out / "config.yaml", load_config(config)):
                key = str(out.relative_to(self.work / cond))
                if key not in self.rec.cond(cond)["runs"]:
                    self.record_run(cond, config, out)
                continue
            if not (out / "summary.json").is_file() and self.restore(cond, config, out):
                continue
            todo.append((config, out))
        self.rec.save()
        if not todo:
            return
        print(f"[as22] {cond}: training {len(todo)} run(s), {self.jobs} at a time x {self.threads} thread(s)", flush=True)
        import multiprocessing

        stop = _StopForwarding()
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool, stop.installed():
            futures = {pool.submit(_train_worker, str(c), str(o), self.threads): (c, o) for c, o in todo}
            errors = []
            for fut in as_completed(futures):
                if stop.signum:
                    for queued in futures:
                        queued.cancel()     # only those no worker has taken yet
                if fut.cancelled():
                    continue
                config, out = futures[fut]
                name = str(out.relative_to(self.work))
                try:
                    status = fut.result()
                except Exception as exc:  # noqa: BLE001 - reported, the other runs go on
                    errors.append(f"{name}: {type(exc).__name__}: {exc} (see {out / 'train.log'})")
                    print(f"[as22] FAILED {errors[-1]}", flush=True)
                    continue
                if status == "locked":
                    print(f"[as22] {name}: another process is training it; skipped", flush=True)
                    continue
                print(f"[as22] {name}: {status}", flush=True)
                if status.startswith("stopped"):
                    continue
                self.record_run(cond, config, out)
                self.rec.save()
                self.rec.git_commit(f"experiments/autoscale: issue 22 results after {name}")
        if stop.signum:
            raise SystemExit(f"[as22] stopped by {signal.Signals(stop.signum).name}: the runs under way checkpointed, "
                             "the queued ones did not start; run the same command again to continue")
        if errors:
            raise SystemExit("[as22] " + "; ".join(errors))


def base_raw(prepared: Path, design: Design) -> dict[str, Any]:
    """Issue 12's setup, unchanged (its noise is what the power calculation uses)."""
    return {
        "model": {"size": "tiny", "tie_embeddings": False},
        "data": {"prepared": str(prepared), "mixture": "uniform", "train_domains": DOMAINS, "eval_domains": DOMAINS,
                 "seq_len": 128, "micro_batch_size": design.micro_batch_size, "eval_sequences": design.eval_sequences},
        "reweight": {"strategy": "uniform"},
        "loss": {"impl": "auto"},
        "optim": {"lr": design.lr, "warmup_steps": 10, "min_lr_ratio": 0.1},
        "train": {"seed": 0, "max_steps": 100, "eval_interval": 0, "histogram_interval": 0,
                  "checkpoint_interval": design.checkpoint_interval, "keep_checkpoints": 1},
        "wandb": {"mode": "disabled"},
    }


def prepare_condition(work: Path, cond: str, corpus: Path) -> tuple[Path, dict[str, Any]]:
    """Prepared data of a condition (the balanced one's tokenizer for both), and what it holds."""
    from megareweight.data.prepare import prepare
    from megareweight.data.shards import PreparedData, ShardError

    balanced = work / "prepared-balanced"
    out = work / f"prepared-{cond}"
    info: dict[str, Any] = {}
    source = corpus
    if cond == "skewed":
        info["subsample"] = build_skewed_corpus(corpus, work / "corpus-skewed")
        source = work / "corpus-skewed"
    try:
        data = PreparedData.open(out)
    except ShardError:
        if out.exists():
            shutil.rmtree(out)
        print(f"[as22] preparing {source} -> {out}", flush=True)
        tok = None if cond == "balanced" else balanced / "tokenizer.model"
        with contextlib.redirect_stdout(io.StringIO()):
            prepare(source, out, vocab_size=VOCAB, domains=DOMAINS, tokenizer_model=tok, progress=False)
        data = PreparedData.open(out)
    m = data.manifest
    info["tokenizer_sha256"] = m["tokenizer"]["sha256"]
    info["tokens"] = {d: {s: int(m["domains"][d][s]["tokens"]) for s in ("train", "valid")} for d in DOMAINS}
    return out, info


def natural_mixture(info: dict[str, Any]) -> dict[str, float]:
    total = sum(info["tokens"][d]["train"] for d in DOMAINS)
    return {d: info["tokens"][d]["train"] / total for d in DOMAINS}


def fit_summary(fit: dict[str, Any]) -> dict[str, Any]:
    keep = ("budget_tokens", "domains", "base_objective", "seeds", "noise", "bounds", "held_domains", "bound_domains",
            "frozen_domains", "warnings", "optimal_x", "optimal_tokens", "weights", "predicted_relative_objective",
            "base_tokens", "available_tokens", "objective", "significance", "settings")
    out = {k: fit[k] for k in keep}
    out["curves"] = {d: {k: v for k, v in c.items() if k != "residuals"} for d, c in fit["curves"].items()}
    return out


def bootstrap_precision(f1: dict[str, Any], f2: dict[str, Any], target: int, replicates: int = 200,
                        seed: int = 0) -> dict[str, Any]:
    """How precisely the fits locate the optimum: the seed noise put back into each fit's points.

    Each replicate adds N(0, sd / sqrt(K)) (the fit's own seed-noise estimate for a mean of K seeds)
    to every setting's relative objective, the base's included (then divided by it), refits with
    the same guards and bounds, re-solves DDO, and extrapolates the two replicate fits to the
    target. Reported: each weight's mean, sd and 2.5/97.5 percentiles over the replicates, at B1,
    B2 and the target, and how many replicates the extrapolation refused.
    """
    from megareweight.autoscale.extrapolate import extrapolate_fits
    from megareweight.autoscale.fit import _guarded_fit, _solve_bounded
    from megareweight.mixing import PowerLaw

    if f1.get("noise") is None or f2.get("noise") is None:
        return {"skipped": "a fit has no seed-noise estimate (one seed)"}
    rng = np.random.default_rng(seed)

    def replicate(fit: dict[str, Any]) -> dict[str, Any]:
        domains = fit["domains"]
        se = fit["noise"]["sd"] / math.sqrt(len(fit["seeds"]))
        e_base = rng.normal(0.0, se)
        laws, held = [], []
        for d in domains:
            c = fit["curves"][d]
            y = np.asarray(c["relative_objective"], dtype=float) + rng.normal(0.0, se, len(c["x"]))
            y[c["settings"].index("base")] = 1.0 + e_base
            y = y / (1.0 + e_base)
            law, reason, _ = _guarded_fit(list(c["x"]), [float(v) for v in y], fit["noise"], fit["significance"])
            held.append(law is None)
            laws.append(law if law is not None else PowerLaw(0.0, 1.0, 0.0))
        n_bar = np.array([fit["base_tokens"][d] for d in domains])
        upper = np.array([fit["bounds"]["upper_x"][d] for d in domains])
        x_opt, kinds = _solve_bounded(laws, np.array(held), n_bar, fit["bounds"]["lower"], upper,
                                      upper < fit["bounds"]["upper"])
        counts = x_opt * n_bar
        counts *= fit["budget_tokens"] / counts.sum()
        return {**fit, "weights": {d: float(c / counts.sum()) for d, c in zip(domains, counts)},
                "optimal_tokens": {d: float(c) for d, c in zip(domains, counts)},
                "held_domains": [d for d, h in zip(domains, held) if h],
                "bound_domains": {d: k for d, k in zip(domains, kinds) if k is not None}}

    draws: dict[str, list[dict[str, float]]] = {"b1": [], "b2": [], "extrapolated": []}
    refused = 0
    for _ in range(replicates):
        r1, r2 = replicate(f1), replicate(f2)
        draws["b1"].append(r1["weights"])
        draws["b2"].append(r2["weights"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                draws["extrapolated"].append(extrapolate_fits(r1, r2, target)["weights"])
        except Exception:  # noqa: BLE001 - a replicate the workflow refuses is counted, not fatal
            refused += 1
    out: dict[str, Any] = {"replicates": replicates, "extrapolation_refused": refused}
    for key, rows in draws.items():
        if not rows:
            continue
        out[key] = {d: {"mean": float(np.mean([r[d] for r in rows])), "sd": float(np.std([r[d] for r in rows], ddof=1)),
                        "p2.5": float(np.percentile([r[d] for r in rows], 2.5)),
                        "p97.5": float(np.percentile([r[d] for r in rows], 97.5))} for d in f2["domains"]}
    return out


def run_condition(runner: Runner, cond: str, corpus: Path, design: Design) -> None:
    from megareweight import autoscale as mix
    from megareweight.config import config_from_dict, dump_config, load_config

    work = runner.work
    rec = runner.rec.cond(cond)
    prepared, info = prepare_condition(work, cond, corpus)
    if rec.get("data") and {k: rec["data"][k] for k in ("tokenizer_sha256", "tokens")} != \
            {k: info[k] for k in ("tokenizer_sha256", "tokens")}:
        raise SystemExit(f"[as22] {cond}: the prepared data differ from the recorded ones ({rec['data']['tokens']} vs "
                         f"{info['tokens']}); the recorded runs cannot be paired with new ones")
    rec["data"] = info
    rec["natural_mixture"] = natural_mixture(info)
    cdir = work / cond
    base = cdir / "base.yaml"
    cdir.mkdir(parents=True, exist_ok=True)
    dump_config(config_from_dict(base_raw(prepared, design)), base)

    plans = {"b1": cdir / "b1", "b2": cdir / "b2"}
    fits = {}
    for key, budget in (("b1", design.b1), ("b2", design.b2)):
        plan = mix.make_plan(base, budget, plans[key], factors=FACTORS, seeds=design.fit_seeds)
        runner.train(cond, [(plans[key] / r["config"], plans[key] / r["out"]) for r in plan["runs"]])
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            loss_fit = mix.fit_plan(plans[key], objective="loss", plots=False)
            fits[key] = mix.fit_plan(plans[key], objective="ppl", plots=False)
        rec.setdefault("fits", {})[key] = fit_summary(fits[key])
        rec["fits"][key]["loss_objective_weights"] = loss_fit["weights"]
        runner.rec.save()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = mix.extrapolate_fits(plans["b1"], plans["b2"], design.target)
        mix.write_extrapolation(ext, cdir / "target")
    rec["extrapolation"] = {k: ext[k] for k in ("target_tokens", "weights", "tokens", "frozen_domains", "capped_domains",
                                                "warnings", "uncapped_tokens")}
    rec["precision"] = bootstrap_precision(fits["b1"], fits["b2"], design.target)
    runner.rec.save()

    base_cfg = load_config(base)
    mixtures = {"uniform": {d: 1.0 / len(DOMAINS) for d in DOMAINS}, "natural": rec["natural_mixture"],
                "b2_optimum": fits["b2"]["weights"], "extrapolated": ext["weights"]}
    rec["mixtures"] = mixtures
    jobs, dirs, seen = [], {}, {}
    for seed in range(design.final_seeds):
        for arm in ARMS:
            cfg, steps = mix.target_config(base_cfg, mixtures[arm], design.target)
            raw = cfg.to_dict()
            raw["train"].update(seed=seed, eval_interval=max(steps // design.final_evals, 1))
            key = json.dumps(raw, sort_keys=True)
            if key in seen:       # two arms with the very same mixture: one (deterministic) run
                dirs[arm, seed] = seen[key]
                continue
            path = cdir / "final" / f"{arm}-seed{seed}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            dump_config(config_from_dict(raw), path)
            out = cdir / "final" / f"{arm}-seed{seed}"
            jobs.append((path, out))
            dirs[arm, seed] = seen[key] = out
    rec["final_dirs"] = {f"{arm}-seed{seed}": str(out.relative_to(cdir)) for (arm, seed), out in dirs.items()}
    runner.train(cond, jobs)
    runner.rec.save()


# --- analysis of the recorded runs ------------------------------------------------------------------

def _curve(run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in run["eval"]:
        losses = [r[f"loss/{d}"] for d in DOMAINS]
        rows.append({"tokens": r["tokens"], "objective": float(np.mean(np.exp(losses))), "mean_loss": float(np.mean(losses))})
    return rows


def _ci(values: Sequence[float]) -> dict[str, Any]:
    from megareweight.stats import mean_ci

    mean, low, high = mean_ci(values)
    return {"mean": mean, "low": low, "high": high, "n": len(values), "values": [float(v) for v in values]}


def _paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    from megareweight.stats import paired_diff

    pd = paired_diff(a, b)
    return {"mean": pd.mean, "low": pd.low, "high": pd.high, "sd": pd.sd, "n": pd.n}


def analyse_condition(rec: dict[str, Any], design: Design) -> Optional[dict[str, Any]]:
    """Per arm: objective, mean loss, per-domain loss (95 % intervals), paired differences against
    uniform (and the extrapolation against the B2 optimum), speed ratios, verdicts; None before any
    complete seed."""
    dirs = rec.get("final_dirs")
    if not dirs:
        return None
    runs = rec["runs"]
    seeds = [s for s in range(design.final_seeds)
             if all(f"final/{Path(dirs[f'{a}-seed{s}']).name}" in runs for a in ARMS)]
    if not seeds:
        return None

    def run(arm: str, s: int) -> dict[str, Any]:
        return runs[f"final/{Path(dirs[f'{arm}-seed{s}']).name}"]

    def final(arm: str, s: int) -> dict[str, float]:
        summ = run(arm, s)["summary"]
        losses = {d: float(summ[f"loss/{d}"]) for d in DOMAINS}
        return {"objective": float(np.mean(np.exp(list(losses.values())))),
                "mean_loss": float(np.mean(list(losses.values()))), **losses}

    gain = 1 - rec["fits"]["b2"]["predicted_relative_objective"]["optimal"] if "fits" in rec else None
    out: dict[str, Any] = {"seeds": seeds, "arms": {}}
    for arm in ARMS:
        vals = {k: [final(arm, s)[k] for s in seeds] for k in ["objective", "mean_loss", *DOMAINS]}
        entry: dict[str, Any] = {"mixture": rec["mixtures"][arm], **{k: _ci(v) for k, v in vals.items()}}
        for other in (["uniform"] if arm != "uniform" else []) + (["b2_optimum"] if arm == "extrapolated" else []):
            ref = {k: [final(other, s)[k] for s in seeds] for k in vals}
            rel = [a / b - 1 for a, b in zip(vals["objective"], ref["objective"])]
            speeds = [speed_ratio(_curve(run(arm, s)), _curve(run(other, s)), "objective") for s in seeds]
            cmp = {"objective_relative": _ci(rel),
                   "objective": _paired(ref["objective"], vals["objective"]),
                   "mean_loss": _paired(ref["mean_loss"], vals["mean_loss"]),
                   "per_domain": {d: _paired(ref[d], vals[d]) for d in DOMAINS},
                   "speed_ratio": ratio_interval([r for r, _ in speeds]),
                   "speed_how": [h for _, h in speeds]}
            if len(seeds) >= 2:
                sd = float(np.std(rel, ddof=1))
                cmp["realised_mde"] = mde_paired(sd, len(seeds)) if sd > 0 else 0.0
            cmp["verdict"] = verdict(cmp["objective_relative"], cmp["speed_ratio"],
                                     gain if other == "uniform" and arm in ("b2_optimum", "extrapolated") else None,
                                     other)
            if all(dirs[f"{arm}-seed{s}"] == dirs[f"{other}-seed{s}"] for s in seeds):
                cmp["verdict"] = f"the same mixture as {other} (every domain frozen or equal): the same runs, no comparison"
                cmp["identical"] = True
            entry[f"vs_{other}"] = cmp
        out["arms"][arm] = entry
    return out


def _f(iv: dict[str, Any], digits: int = 4, pct: bool = False) -> str:
    k = 100 if pct else 1
    unit = " %" if pct else ""
    if not math.isfinite(iv.get("low", math.nan)):
        return f"{k * iv['mean']:+.{digits}f}{unit} (1 seed)"
    return f"{k * iv['mean']:+.{digits}f} [{k * iv['low']:+.{digits}f}, {k * iv['high']:+.{digits}f}]{unit}"


def markdown(res: dict[str, Any], design: Design, smoke: bool) -> str:
    lines = ["# AutoScale, issue 22: results written by `experiments/autoscale/scale_test.py`", ""]
    if smoke:
        lines += ["**SMOKE RUN: tiny budgets, the numbers below are not results.**", ""]
    lines += [f"Design: {json.dumps(asdict(design))}; code {CODE_COMMIT[:12]}; {res.get('machine', '')}.", ""]
    for cond in CONDITIONS:
        rec = res["conditions"].get(cond)
        if not rec:
            lines += [f"## {cond}: not started", ""]
            continue
        n_runs = len(rec["runs"])
        lines += [f"## {cond} ({n_runs} runs recorded)", ""]
        if "data" in rec:
            lines += ["Training tokens per domain: " + ", ".join(f"{d} {v['train']:,}" for d, v in rec["data"]["tokens"].items())
                      + "; natural mixture: " + ", ".join(f"{d} {w:.3f}" for d, w in rec["natural_mixture"].items()), ""]
        for key in ("b1", "b2"):
            f = rec.get("fits", {}).get(key)
            if not f:
                continue
            noise = f["noise"]
            lines += [f"### Fit at {f['budget_tokens']:,.0f} tokens ({len(f['seeds'])} seeds per setting; seed noise sd "
                      + (f"{noise['sd']:.4f}, effect se {noise['effect_se']:.4f})" if noise else "unknown)"), "",
                      "| domain | x | relative objective | effect (z) | status | x* | weight (ppl) | weight (loss objective) |",
                      "|---|---|---|---|---|---|---|---|"]
            for d in f["domains"]:
                c = f["curves"][d]
                z = "" if c.get("effect_z") is None else f" ({c['effect_z']:.1f})"
                status = c["status"] + (f", {c['bound']} bound" if c.get("bound") else "")
                lines.append(f"| {d} | {', '.join(f'{v:.3f}' for v in c['x'])} | "
                             f"{', '.join(f'{v:.4f}' for v in c['relative_objective'])} | {c['effect']:.4f}{z} | {status} | "
                             f"{f['optimal_x'][d]:.3f} | {f['weights'][d]:.4f} | {f['loss_objective_weights'][d]:.4f} |")
            lines += ["", f"Predicted relative objective at the optimum: {f['predicted_relative_objective']['optimal']:.5f}. "
                      "Notes: " + ("; ".join(f["warnings"]) or "none"), ""]
        if "extrapolation" in rec:
            e = rec["extrapolation"]
            p = rec.get("precision", {})
            lines += [f"### Mixtures at the target ({e['target_tokens']:,} tokens) and how precisely the fits locate them", "",
                      f"Bootstrap of the fits' seed noise ({p.get('replicates', 0)} replicates, "
                      f"{p.get('extrapolation_refused', '-')} refused by the extrapolation): mean [2.5 %, 97.5 %] of each weight.", "",
                      "| domain | uniform | natural | B1 optimum | B2 optimum | extrapolated | B2 (bootstrap) | extrapolated (bootstrap) |",
                      "|---|---|---|---|---|---|---|---|"]
            for d in DOMAINS:
                def boot(k: str) -> str:
                    b = p.get(k, {}).get(d)
                    return f"{b['mean']:.3f} [{b['p2.5']:.3f}, {b['p97.5']:.3f}]" if b else "-"
                lines.append(f"| {d} | {1 / len(DOMAINS):.3f} | {rec['natural_mixture'][d]:.3f} | "
                             f"{rec['fits']['b1']['weights'][d]:.3f} | {rec['fits']['b2']['weights'][d]:.3f} | "
                             f"{e['weights'][d]:.3f}{' (frozen)' if d in e['frozen_domains'] else ''} | {boot('b2')} | "
                             f"{boot('extrapolated')} |")
            lines += ["", "Notes: " + ("; ".join(e["warnings"]) or "none"), ""]
        a = res.get("analysis", {}).get(cond)
        if a:
            lines += [f"### Arms at the target ({len(a['seeds'])} of {design.final_seeds} paired seeds complete)", "",
                      "Objective = mean over the five domains of exp(validation loss) (what DDO minimises). "
                      "Differences: arm minus uniform, paired by seed, mean [95 % t-interval]. Speed ratio: tokens to reach "
                      "the worse run's final objective, arm over uniform (< 1: faster), geometric mean [95 %].", "",
                      "| arm | objective | vs uniform (relative) | mean loss | vs uniform | speed ratio | verdict |",
                      "|---|---|---|---|---|---|---|"]
            for arm in ARMS:
                x = a["arms"][arm]
                v = x.get("vs_uniform")
                s = v["speed_ratio"] if v else None
                speed = "-" if not v else (f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]" if math.isfinite(s["low"])
                                           else f"{s['mean']:.3f}")
                lines.append(f"| {arm} | {x['objective']['mean']:.3f} | {_f(v['objective_relative'], 2, True) if v else '-'} | "
                             f"{x['mean_loss']['mean']:.4f} | {_f(v['mean_loss']) if v else '-'} | {speed} | "
                             f"{v['verdict'] if v else '-'} |")
            ve = a["arms"]["extrapolated"].get("vs_b2_optimum")
            if ve:
                lines += ["", f"Extrapolated vs the B2 optimum reused: objective {_f(ve['objective_relative'], 2, True)}, "
                          f"speed ratio {ve['speed_ratio']['mean']:.3f}; verdict: {ve['verdict']}."]
            lines += ["", "Per domain, arm minus uniform (nats/token):", "",
                      "| arm | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
            for arm in ARMS[1:]:
                v = a["arms"][arm]["vs_uniform"]
                lines.append(f"| {arm} | " + " | ".join(_f(v["per_domain"][d]) for d in DOMAINS) + " |")
            mdes = [f"{arm} {100 * a['arms'][arm]['vs_uniform']['realised_mde']:.2f} %" for arm in ARMS[1:]
                    if "realised_mde" in a["arms"][arm]["vs_uniform"]]
            if mdes:
                lines += ["", "Minimum detectable relative effect at 80 % power with the sd these seeds show: "
                          + ", ".join(mdes) + "."]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_report(rec: Recorder, design: Design) -> None:
    data = rec.data
    data["analysis"] = {c: a for c in CONDITIONS if c in data["conditions"]
                        for a in [analyse_condition(data["conditions"][c], design)] if a}
    rec.save()
    (rec.out / "results.md").write_text(markdown(data, design, rec.smoke))


def cmd_run(args: argparse.Namespace) -> int:
    design = SMOKE if args.smoke else DESIGN
    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else (work / "report" if args.smoke else DEFAULT_OUT)
    if args.smoke and (args.commit or out.is_relative_to(HERE)):
        raise SystemExit("scale_test.py: --smoke writes only into its work directory (no --commit, no --out under "
                         "experiments/): its numbers are not results")
    work.mkdir(parents=True, exist_ok=True)
    _pin(work)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), WANDB_MODE="disabled")
    rec = Recorder(out, design, args.commit, args.smoke)
    rec.data["command"] = "python experiments/autoscale/scale_test.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    runner = Runner(work, rec, args.jobs, args.threads)
    for cond in args.conditions.split(","):
        if cond not in CONDITIONS:
            raise SystemExit(f"--conditions: unknown {cond!r}; allowed: {', '.join(CONDITIONS)}")
        start = time.time()
        run_condition(runner, cond, Path(args.corpus), design)
        rec.cond(cond).setdefault("wall_seconds", {})[time.strftime("%Y-%m-%dT%H:%M:%S")] = time.time() - start
        write_report(rec, design)
        rec.git_commit(f"experiments/autoscale: issue 22 {cond} condition finished")
    print((out / "results.md").read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else DEFAULT_OUT
    rec = Recorder(out, SMOKE if args.smoke else DESIGN, False, args.smoke)
    write_report(rec, SMOKE if args.smoke else DESIGN)
    print((out / "results.md").read_text())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("design", help="power and cost of the design from issue 12's results (no runs)")
    p.add_argument("--old", default=str(OLD_RESULTS))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--write", action="store_true", help="also write OUT/design.json")
    p.set_defaults(func=cmd_design)
    p = sub.add_parser("run", help="train what is not recorded yet (resumable), then report")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="run directories, snapshot, prepared data (not in git)")
    p.add_argument("--out", default=None, help=f"results.json and results.md (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--commit", action="store_true", help="git-commit results.json and results.md after every run")
    p.add_argument("--smoke", action="store_true", help="tiny budgets on a scratch --work: exercises every stage")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="rebuild results.md (and the analysis in results.json) from results.json")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    p.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

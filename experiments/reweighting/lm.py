#!/usr/bin/env python
"""The powered LM experiment: uniform vs LinUpper (r = 0.4 and r = 1.0), 5 paired seeds, held-out text.

Question: does LinUpper instance reweighting (Sow et al., ICLR 2025) change a small LM's loss on
text it was never trained on, and what does it cost in-domain? The demo (1.4 M parameters,
0.5 M tokens, 3 seeds) cannot tell; this experiment is sized to be able to.

Design (fixed before any result was seen; nothing here was tuned on the outcome):

* model: LLaMA-style, ``model.size=small`` with d_model 192, 4 layers, 6 heads (head dim 32),
  SwiGLU width 512, tied embeddings, vocabulary 4096 -> 2,557,632 parameters;
* data: the six built-in domains (``../shared/corpus``), one 4096-piece BPE tokenizer trained on
  them; trained on books, code, legal and math with a uniform mixture; dictionary and techdocs are
  held out (never trained on), like the demo; plus Debian's ``fortunes`` (``heldout_text.py``),
  which neither the tokenizer nor anyone's choices ever saw, scored with each run's tokenizer;
* 1500 steps x 32 sequences x 128 tokens = 6,144,000 training tokens per run (under one epoch of
  every trained domain); AdamW, lr 3e-3, 50 warm-up steps, cosine to 10 %;
* methods: uniform; LinUpper r = 0.4; LinUpper r = 1.0 (delta = 1). Warm-up as in the seed
  paper's trainers: plain mean loss (uniform weights) for the first K = 150 steps (10 %), then
  the target r;
* seeds 0..4: a seed fixes the initialisation AND the data order (sampler seed), shared by the
  three methods, so differences are paired by seed;
* evaluation every 125 steps on 160 fixed validation windows per domain (20,480 tokens), and at the
  end on the first 250,000 tokens of the fortunes text.

Reported (``report``): final loss per domain and averaged (trained, held-out), paired difference
vs uniform with a 95 % t-interval (:mod:`megareweight.stats`), and the tokens-to-target ratio:
the training tokens LinUpper needs to reach uniform's final loss (linear interpolation on its
eval curve) divided by uniform's tokens; "not reached" when it never gets there.

Commands (from the repository root, ``PYTHONPATH=.``):

    python experiments/reweighting/lm.py measure   # tokens/s: 1 run x 2 threads vs 2 runs x 1 thread
    python experiments/reweighting/lm.py run --jobs 2 --threads 1 --commit
    python experiments/reweighting/lm.py report    # results.json, lm_results.md, plots

``run`` is resumable at any point: finished runs are skipped, an interrupted run continues from
its last checkpoint (every 100 steps; the trainer's resume reproduces the uninterrupted curve),
and with ``--commit`` the report is rebuilt and committed after every finished run.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megareweight.stats import mean_ci, mean_ci_bands, paired_diff  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_WORK = REPO / "runs" / "reweighting_lm"
#: the built-in corpus in the shared folder beside the checkout (``../shared/corpus``, as in the Makefile)
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
TRAIN_DOMAINS = ["books", "code", "legal", "math"]
HELDOUT_DOMAINS = ["dictionary", "techdocs"]
EXTERNAL = "fortunes"
SEEDS = 5
STEPS = 1500
WARMUP_STEPS = 150
EXTERNAL_TOKENS = 250_000
LR = 3e-3
#: Where a domain-constant arm takes its per-seed weights: this method's mean ``weight_share`` over
#: the post-warm-up steps of the same seed.
SHARES_FROM = "linupper_r0.4"


@dataclass(frozen=True)
class Experiment:
    """One set of paired runs: its methods (name -> config overrides), the baseline every method
    is compared with, the commit whose code trains all of them, and where its files go.

    Every run trains and evaluates with the ``megareweight`` code of ``code_commit`` (a snapshot
    under ``<work>/code-<commit>``), not with the working tree: an experiment spans sessions while
    the branch moves on (a sampler change alters the data order), and the pairing "same
    initialisation and data order per seed" must hold across all of its runs.
    """

    name: str
    methods: dict[str, dict[str, Any]]
    baseline: str
    code_commit: str
    prefix: str  # results file names: f"{prefix}results.json", f"{prefix}lm_results.md", ...
    runs_dir: str  # under --work
    #: the snapshot, not the working tree, prepares the data (a newer prepare may tokenise differently)
    prepare_with_snapshot: bool

    def lr(self, method: str) -> float:
        return self.methods[method].get("lr", LR)

    def reweight(self, method: str) -> dict[str, Any]:
        return {k: v for k, v in self.methods[method].items() if k != "lr"}

    def file(self, name: str) -> str:
        return f"{self.prefix}{name}"


#: The powered experiment (issue 13): 15 runs from the commit the first runs started from.
MAIN = Experiment(
    name="main",
    methods={"uniform": {"strategy": "uniform"},
             "linupper_r0.4": {"strategy": "linupper", "r": 0.4},
             "linupper_r1.0": {"strategy": "linupper", "r": 1.0}},
    baseline="uniform", code_commit="746fff9d01c727225552b584ecfc5d0ba4d690c2", prefix="", runs_dir="runs",
    prepare_with_snapshot=False)
#: The controls (issue 21), 25 runs from one newer commit (the first with ``reweight.strategy: domain``;
#: its sampler orders data differently from MAIN's, so A and B are trained again and nothing is
#: paired across the two experiments): A uniform, B LinUpper r = 0.4, C domain-constant weights
#: equal to B's mean post-warm-up weight shares of the same seed, D the step-size arms.
CONTROLS = Experiment(
    name="controls",
    methods={"uniform": {"strategy": "uniform"},
             "linupper_r0.4": {"strategy": "linupper", "r": 0.4},
             "domain_shares": {"strategy": "domain"},
             "uniform_lr6e-3": {"strategy": "uniform", "lr": 6e-3},
             "linupper_r0.4_lr1.5e-3": {"strategy": "linupper", "r": 0.4, "lr": 1.5e-3}},
    baseline="uniform", code_commit="852325aa276e8dbf7f9388ecd1bc02a6d0728c16", prefix="controls_",
    runs_dir="controls", prepare_with_snapshot=True)
EXPERIMENTS = {e.name: e for e in (MAIN, CONTROLS)}
# Names the tests and older callers use (the main experiment's).
METHODS, BASELINE, CODE_COMMIT = MAIN.methods, MAIN.baseline, MAIN.code_commit


def run_config(prepared: Path, method: str, seed: int, steps: int = STEPS, exp: Experiment = MAIN,
               domain_weights: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """The training config of one run (see the module docstring for why each value)."""
    reweight = {"delta": 1.0, "warmup_steps": WARMUP_STEPS, "warmup_mode": "uniform", **exp.reweight(method)}
    if reweight["strategy"] == "domain":
        if domain_weights is None:
            raise ValueError(f"{method} seed {seed}: needs the weight shares of {SHARES_FROM} seed {seed}")
        reweight["domain_weights"] = domain_weights
    return {
        "model": {"size": "small", "d_model": 192, "n_layers": 4, "n_heads": 6, "ffn_dim": 512},
        "data": {"prepared": str(prepared), "mixture": "uniform", "train_domains": TRAIN_DOMAINS,
                 "eval_domains": TRAIN_DOMAINS + HELDOUT_DOMAINS, "seq_len": 128, "micro_batch_size": 32,
                 "eval_sequences": 160},
        "reweight": reweight,
        "loss": {"impl": "reference"},  # ~15 % faster than chunked on CPU at V = 4096 (measured)
        "optim": {"lr": exp.lr(method), "warmup_steps": 50, "min_lr_ratio": 0.1},
        "train": {"seed": seed, "max_steps": steps, "eval_interval": 125, "checkpoint_interval": 100,
                  "keep_checkpoints": 1, "histogram_interval": 0},
        "wandb": {"mode": "disabled"},
    }


# --- preparation ------------------------------------------------------------------------------------

def ensure_inputs(work: Path, corpus: Path, exp: Experiment = MAIN) -> tuple[Path, Path]:
    """Prepared six-domain data (vocab 4096) and the fortunes JSONL, built once under ``work``.

    An experiment with ``prepare_with_snapshot`` prepares with its own pinned code (in a
    subprocess), into a directory named after the commit: a new machine rebuilds the same data.
    """
    from megareweight.data.shards import PreparedData, ShardError

    prepared = work / ("prepared-" + exp.code_commit[:12] if exp.prepare_with_snapshot else "prepared")
    try:
        PreparedData.open(prepared)
    except ShardError:
        print(f"[lm] preparing {corpus} -> {prepared} (vocab 4096)", flush=True)
        if exp.prepare_with_snapshot:
            code = code_snapshot(work, exp.code_commit)
            script = ("import sys; from megareweight.data.prepare import prepare; "
                      "prepare(sys.argv[1], sys.argv[2], vocab_size=4096, progress=False)")
            subprocess.run([sys.executable, "-c", script, str(corpus), str(prepared)], check=True, cwd=code,
                           env={**os.environ, "PYTHONPATH": str(code)})
        else:
            from megareweight.data.prepare import prepare

            prepare(corpus, prepared, vocab_size=4096, progress=False)
    external = work / "heldout" / f"{EXTERNAL}.jsonl"
    if not external.is_file():
        sys.path.insert(0, str(HERE))
        from heldout_text import build

        print(f"[lm] building the held-out text {external}", flush=True)
        build(external.parent)
    return prepared, external


# --- running ----------------------------------------------------------------------------------------

def run_dir(work: Path, method: str, seed: int, exp: Experiment = MAIN) -> Path:
    return work / exp.runs_dir / f"{method}-seed{seed}"


def _same_values(asked: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Every key this experiment sets has the same value in the saved config (keys added to the
    config schema later, with their defaults, do not make a finished run look different)."""
    for key, value in asked.items():
        if isinstance(value, dict):
            if not isinstance(saved.get(key), dict) or not _same_values(value, saved[key]):
                return False
        elif saved.get(key) != value:
            return False
    return True


def shares_of(work: Path, out: Path, seed: int, exp: Experiment) -> Optional[dict[str, float]]:
    """Mean post-warm-up ``weight_share/<domain>`` of ``SHARES_FROM`` seed ``seed``: from its run
    directory when finished there, else from the committed results file; None before it finishes."""
    run = load_run(work, SHARES_FROM, seed, exp)
    if run is not None:
        return run["weight_share_post_warmup"]
    saved = committed_runs(out, exp).get((SHARES_FROM, seed))
    return saved["weight_share_post_warmup"] if saved else None


def is_finished(out: Path, cfg: dict[str, Any]) -> bool:
    """Finished = summary.json, the external eval, and the values this experiment asked for."""
    if not ((out / "summary.json").is_file() and (out / "external_eval.json").is_file()):
        return False
    return _same_values(cfg, yaml.safe_load((out / "config.yaml").read_text()))


def code_snapshot(work: Path, commit: str = CODE_COMMIT) -> Path:
    """The pinned code under ``work`` (:func:`experiments/code_snapshot.py <code_snapshot.code_snapshot>`)."""
    import importlib.util

    # loaded from its file under a private name: the project claims no top-level import but megareweight
    spec = importlib.util.spec_from_file_location("_megareweight_code_snapshot", REPO / "experiments" / "code_snapshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.code_snapshot(REPO, work, commit)


def trainer_alive(out: Path) -> bool:
    """True while some process trains or scores into ``out`` (``megareweight.cli ... --out OUT`` or
    ``--checkpoint OUT`` on its command line; Linux /proc). Covers processes that an earlier,
    stopped invocation of this script left running."""
    target = str(out.resolve())
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "megareweight.cli" in args and any(a in ("--out", "--checkpoint") and b == target
                                              for a, b in zip(args, args[1:])):
            return True
    return False


def train_one(work: Path, prepared: Path, external: Path, method: str, seed: int, threads: int,
              steps: int = STEPS, exp: Experiment = MAIN, domain_weights: Optional[dict[str, float]] = None) -> Optional[str]:
    """Train (or resume) one run in a subprocess with ``threads`` torch threads, then score the
    external text. Returns an error line or None.

    A lock file in the run directory (``flock``, inherited by the trainer subprocess, released
    when every holder exits) keeps two invocations of ``run`` from training the same run at once.
    """
    out = run_dir(work, method, seed, exp)
    cfg = run_config(prepared, method, seed, steps, exp, domain_weights)
    if is_finished(out, cfg):
        return None
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lm.lock", "w")  # not .lock: that is the trainer's own run-directory lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        print(f"[lm] {method} seed {seed}: another process is training it; skipped", flush=True)
        return None
    try:
        while trainer_alive(out):  # left running by a stopped invocation: let it finish, then resume
            time.sleep(10)
        return _train_locked(out, cfg, external, method, seed, threads, lock.fileno(),
                             code_snapshot(work, exp.code_commit), exp.code_commit)
    finally:
        lock.close()


def _train_locked(out: Path, cfg: dict[str, Any], external: Path, method: str, seed: int, threads: int,
                  lock_fd: int, code: Path, commit: str = CODE_COMMIT) -> Optional[str]:
    cfg_path = out / "requested_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with open(out / "code_versions.jsonl", "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit}) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(code), "WANDB_MODE": "disabled"}
    log = open(out / "train.log", "a")
    start = time.time()
    trained = (out / "summary.json").is_file() and _same_values(cfg, yaml.safe_load((out / "config.yaml").read_text()))
    if not trained:  # summary.json is written when training ends; then only scoring is left
        print(f"[lm] {method} seed {seed}: training ({threads} thread(s)) -> {out}", flush=True)
        train = subprocess.run([sys.executable, "-m", "megareweight.cli", "train", "--config", str(cfg_path),
                                "--out", str(out), "--resume", "--quiet"], env=env, cwd=code, stdout=log,
                               stderr=log, pass_fds=(lock_fd,))
        if train.returncode != 0:
            return f"{method} seed {seed}: train exited {train.returncode}, see {out / 'train.log'}"
    score = subprocess.run([sys.executable, "-m", "megareweight.cli", "eval", "--checkpoint", str(out),
                            "--data", str(external), "--max-tokens", str(EXTERNAL_TOKENS), "--batch-size", "32",
                            "--json-out", str(out / "external_eval.json.tmp"), "--json", "--quiet"],
                           env=env, cwd=code, stdout=log, stderr=log, pass_fds=(lock_fd,))
    if score.returncode != 0:
        return f"{method} seed {seed}: eval exited {score.returncode}, see {out / 'train.log'}"
    os.replace(out / "external_eval.json.tmp", out / "external_eval.json")
    print(f"[lm] {method} seed {seed}: done in {time.time() - start:.0f} s", flush=True)
    return None


def git_commit(paths: list[Path], message: str) -> None:
    """Commit only ``paths`` (other staged work is left alone); retried while another git runs."""
    rel = [str(p.resolve().relative_to(REPO)) for p in paths if p.exists()]
    for attempt in range(5):
        add = subprocess.run(["git", "add", "--", *rel], cwd=REPO, capture_output=True, text=True)
        commit = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=REPO,
                                capture_output=True, text=True)
        if add.returncode == 0 and (commit.returncode == 0 or "nothing" in commit.stdout + commit.stderr):
            return
        time.sleep(2 + 3 * attempt)
    print(f"[lm] warning: could not commit results: {commit.stderr.strip()}", flush=True)


def run_order(work: Path, seeds: int, first: list[str], exp: Experiment = MAIN) -> list[tuple[str, int]]:
    """The queue: runs already started (they have a checkpoint) first, then the ``first`` methods
    for every seed, then the others; seed-major within each group, so that partial results stay
    paired. Within a seed, ``SHARES_FROM`` comes first and a domain-constant arm after the
    baseline, so that two workers rarely wait for the shares they need."""
    unknown = sorted(set(first) - set(exp.methods))
    if unknown:
        raise SystemExit(f"lm.py: --first: unknown method(s) {', '.join(unknown)}; allowed: {', '.join(exp.methods)}")
    if exp is MAIN:
        order = list(exp.methods)
    else:
        order = sorted(exp.methods, key=lambda m: (m != SHARES_FROM, m != exp.baseline, list(exp.methods).index(m)))
    queue = [(m, s) for s in range(seeds) for m in order]

    def key(item: tuple[str, int]) -> tuple[int, int]:
        started = (run_dir(work, *item, exp) / "checkpoints" / "latest").exists()
        return (0 if started else 1 if item[0] in first else 2, queue.index(item))

    return sorted(queue, key=key)


def needs_shares(exp: Experiment, method: str) -> bool:
    return exp.reweight(method)["strategy"] == "domain"


def cmd_run(args: argparse.Namespace) -> int:
    exp = EXPERIMENTS[args.experiment]
    work, out = Path(args.work).resolve(), Path(args.out)
    prepared, external = ensure_inputs(work, Path(args.corpus), exp)
    done = committed_runs(out, exp)
    queue = [item for item in run_order(work, args.seeds, args.first.split(",") if args.first else [], exp)
             if item not in done or (run_dir(work, *item, exp) / "checkpoints" / "latest").exists()]
    errors: list[str] = []
    failed: set[tuple[str, int]] = set()

    def job(item: tuple[str, int]) -> None:
        method, seed = item
        weights = None
        if needs_shares(exp, method):
            # the shares of the same seed's SHARES_FROM run; it is queued earlier, so wait for it
            while (weights := shares_of(work, out, seed, exp)) is None:
                if (SHARES_FROM, seed) in failed or (SHARES_FROM, seed) not in queue:
                    failed.add(item)
                    errors.append(f"{method} seed {seed}: {SHARES_FROM} seed {seed} did not finish; no weights")
                    return
                time.sleep(30)
            print(f"[lm] {method} seed {seed}: domain weights {json.dumps({k: round(v, 4) for k, v in weights.items()})}",
                  flush=True)
        err = train_one(work, prepared, external, method, seed, args.threads, args.steps, exp, weights)
        if err:
            failed.add(item)
            errors.append(err)
            print(f"[lm] error: {err}", flush=True)
            return
        if args.commit:
            written = write_report(work, out, exp)
            git_commit(written, f"experiments/reweighting: LM {exp.name} results after {method} seed {seed}")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(job, queue))
    write_report(work, out, exp)
    for err in errors:
        print(f"[lm] error: {err}", file=sys.stderr)
    return 1 if errors else 0


def cmd_measure(args: argparse.Namespace) -> int:
    """Tokens/s of this experiment's model: 1 run with 2 threads vs 2 concurrent runs with 1 thread."""
    work = Path(args.work).resolve()
    prepared, _ = ensure_inputs(work, Path(args.corpus))
    results = []
    for jobs, threads in ((1, 2), (2, 1)):
        procs, outs = [], []
        load_before = os.getloadavg()
        start = time.time()
        for j in range(jobs):
            out = work / "measure" / f"jobs{jobs}-threads{threads}-{j}"
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            cfg = run_config(prepared, "linupper_r0.4", seed=j, steps=args.steps)
            cfg["train"].update(eval_interval=0, checkpoint_interval=0)
            cfg["reweight"]["warmup_steps"] = 0
            (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code_snapshot(work)),
                   "WANDB_MODE": "disabled"}
            procs.append(subprocess.Popen([sys.executable, "-m", "megareweight.cli", "train", "--config",
                                           str(out / "cfg.yaml"), "--out", str(out), "--quiet"], env=env,
                                          cwd=env["PYTHONPATH"]))
            outs.append(out)
        for p in procs:
            p.wait()
        wall = time.time() - start
        tok_per_step = 32 * 128
        medians = []
        for out in outs:
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
            medians.append(float(np.median([r["step_seconds"] for r in rows[3:]])))
        total = sum(tok_per_step / m for m in medians)
        results.append({"jobs": jobs, "threads_per_job": threads, "median_step_seconds": medians,
                        "tokens_per_second_total": total, "wall_seconds": wall,
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()})
        print(f"[lm] {jobs} run(s) x {threads} thread(s): {total:,.0f} tokens/s in total "
              f"(median step {', '.join(f'{m:.2f}' for m in medians)} s; load {load_before[0]:.1f})", flush=True)
    path = Path(args.out) / "lm_throughput.json"
    path.write_text(json.dumps({"machine": machine(), "steps": args.steps, "results": results}, indent=2) + "\n")
    print(f"[lm] wrote {path}")
    return 0


# --- analysis ---------------------------------------------------------------------------------------

def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU ({platform.processor() or platform.platform()})"


SHARE_BIN = 50  # steps per point of the weight-share curves


def weight_share_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Weight shares per domain and effective sample size: the mean over the post-warm-up steps
    (what a domain-constant arm copies) and a curve of means over ``SHARE_BIN``-step bins."""
    keys = sorted(k for k in steps[0] if k.startswith("weight_share/"))
    post = [r for r in steps if r["step"] > WARMUP_STEPS]
    if not keys or not post or "weight_ess" not in steps[0]:
        return {}
    bins = []
    for start in range(0, len(steps), SHARE_BIN):
        chunk = steps[start:start + SHARE_BIN]
        bins.append({"step": chunk[-1]["step"], "ess": float(np.mean([r["weight_ess"] for r in chunk])),
                     **{k.split("/", 1)[1]: float(np.mean([r[k] for r in chunk])) for k in keys}})
    return {"weight_share_post_warmup": {k.split("/", 1)[1]: float(np.mean([r[k] for r in post])) for k in keys},
            "weight_ess_post_warmup": float(np.mean([r["weight_ess"] for r in post])),
            "weight_share_curve": bins}


def load_run(work: Path, method: str, seed: int, exp: Experiment = MAIN) -> Optional[dict[str, Any]]:
    out = run_dir(work, method, seed, exp)
    if not ((out / "summary.json").is_file() and (out / "external_eval.json").is_file()):
        return None
    curve = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((out / "summary.json").read_text())
    external = json.loads((out / "external_eval.json").read_text())
    final = {k.split("/", 1)[1]: v for k, v in curve[-1].items() if k.startswith("loss/")}
    final[EXTERNAL] = external[EXTERNAL]["loss"]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    versions_file = out / "code_versions.jsonl"
    versions = [json.loads(x) for x in versions_file.read_text().splitlines() if x.strip()] if versions_file.is_file() else []
    tokens_per_step = steps[0]["tokens"] / steps[0]["step"]
    # ``summary.json``'s seconds are the wall time of the last invocation only: a resumed run
    # would look faster than it was. The sum of the step times counts every step once.
    return {"method": method, "seed": seed, "final": final, "curve": curve, "seconds": summary["seconds"],
            "step_seconds_total": float(sum(r["step_seconds"] for r in steps)),
            "tokens_per_second": tokens_per_step / float(np.median([r["step_seconds"] for r in steps])),
            "code_versions": versions,
            "parameters": summary["parameters"], "tokens": curve[-1]["tokens"],
            "external_tokens": external[EXTERNAL]["tokens"], **weight_share_summary(steps)}


def committed_runs(out: Path, exp: Experiment = MAIN) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished runs recorded in the committed ``results.json`` that were trained with
    ``CODE_COMMIT`` and the current number of steps, in :func:`load_run`'s format.

    Why: the experiment spans sessions, and the work directory (checkpoints, logs) is not in git;
    on a new machine or after the work directory is lost, these runs are reported as they are and
    not trained again, so only the missing ones cost compute.
    """
    path = out / exp.file("results.json")
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("design", {}).get("steps") != STEPS:
        return {}
    runs = {}
    for name, rec in saved.get("runs", {}).items():
        method, _, seed = name.rpartition("-seed")
        versions = rec.get("code_versions") or []
        if method not in exp.methods or not seed.isdigit() or not versions:
            continue
        if any(v.get("commit") != exp.code_commit for v in versions):
            continue
        runs[method, int(seed)] = {"method": method, "seed": int(seed), "final": rec["final"], "curve": rec["curve"],
                                   "seconds": rec["seconds"], "step_seconds_total": rec.get("step_seconds_total"),
                                   "tokens_per_second": rec["tokens_per_second_median_step"],
                                   "code_versions": versions, "parameters": saved["parameters"],
                                   "tokens": rec["tokens"], "external_tokens": saved["design"].get("external_tokens"),
                                   **{k: rec[k] for k in SHARE_KEYS if k in rec}}
    return runs


SHARE_KEYS = ("weight_share_post_warmup", "weight_ess_post_warmup", "weight_share_curve")


def aggregate(final: dict[str, float], kind: str) -> float:
    names = {"trained": TRAIN_DOMAINS, "heldout_builtin": HELDOUT_DOMAINS,
             "heldout_all": HELDOUT_DOMAINS + [EXTERNAL]}[kind]
    return float(np.mean([final[n] for n in names]))


ROWS = [(d, "trained") for d in TRAIN_DOMAINS] + [(d, "held out") for d in HELDOUT_DOMAINS] + [
    (EXTERNAL, "held out (external)"), ("avg trained", "trained"), ("avg held-out (dictionary, techdocs)", "held out"),
    ("avg held-out (all three)", "held out")]
AGG_KEYS = {"avg trained": "trained", "avg held-out (dictionary, techdocs)": "heldout_builtin",
            "avg held-out (all three)": "heldout_all"}


def value(run: dict[str, Any], row: str) -> float:
    return aggregate(run["final"], AGG_KEYS[row]) if row in AGG_KEYS else run["final"][row]


def tokens_to_target(curve: list[dict[str, Any]], key: str, target: float) -> Optional[float]:
    """Training tokens at which ``curve[key]`` first reaches ``target`` (linear interpolation
    between eval points); None when it never does."""
    prev_t, prev_y = 0.0, None
    for row in curve:
        t, y = float(row["tokens"]), float(row[key])
        if y <= target:
            if prev_y is None or prev_y == y:
                return t
            return prev_t + (prev_y - target) / (prev_y - y) * (t - prev_t)
        prev_t, prev_y = t, y
    return None


def curve_value(row: dict[str, Any], kind: str) -> float:
    return float(row["avg_trained"] if kind == "trained" else row["avg_heldout"])


HELDOUT_ROW, TRAINED_ROW = "avg held-out (all three)", "avg trained"


def comparison_pairs(exp: Experiment, runs: dict[tuple[str, int], dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(label, a, b) of every comparison ``b - a`` the report makes. The main experiment compares
    each method with uniform; the controls answer issue 21's questions, including each method at
    the better of its two learning rates (chosen by mean final held-out loss over the seeds)."""
    if exp is MAIN:
        return [(m, exp.baseline, m) for m in exp.methods if m != exp.baseline]
    pairs = [("linupper_r0.4 vs uniform (B - A)", "uniform", "linupper_r0.4"),
             ("domain_shares vs uniform (C - A)", "uniform", "domain_shares"),
             ("linupper_r0.4 vs domain_shares (B - C)", "domain_shares", "linupper_r0.4"),
             ("uniform lr 6e-3 vs 3e-3", "uniform", "uniform_lr6e-3"),
             ("linupper_r0.4 lr 1.5e-3 vs 3e-3", "linupper_r0.4", "linupper_r0.4_lr1.5e-3")]
    best_u, best_l = best_lr(runs, ("uniform", "uniform_lr6e-3")), best_lr(runs, ("linupper_r0.4", "linupper_r0.4_lr1.5e-3"))
    if best_u and best_l:
        pairs.append((f"best LinUpper ({best_l}) vs best uniform ({best_u})", best_u, best_l))
    return pairs


def best_lr(runs: dict[tuple[str, int], dict[str, Any]], methods: tuple[str, ...]) -> Optional[str]:
    """The method (one learning rate each) with the lowest mean final held-out loss, among those
    with every seed finished; None until all of them are."""
    means = {}
    for m in methods:
        finals = [value(r, HELDOUT_ROW) for (mm, _), r in runs.items() if mm == m]
        if len(finals) < SEEDS:
            return None
        means[m] = float(np.mean(finals))
    return min(means, key=means.get)


def compare(runs: dict[tuple[str, int], dict[str, Any]], a: str, b: str) -> Optional[dict[str, Any]]:
    """Paired differences ``b - a`` per row (95 % t-interval) and b's tokens-to-target ratio on a's
    final loss, over the seeds both finished."""
    paired = sorted({s for (m, s) in runs if m == a} & {s for (m, s) in runs if m == b})
    if not paired:
        return None
    rows = {}
    for row, kind in ROWS:
        base = [value(runs[a, s], row) for s in paired]
        other = [value(runs[b, s], row) for s in paired]
        diff = paired_diff(base, other)
        rows[row] = {"kind": kind, a: base, b: other, "diff": diff.to_dict(), "verdict": diff.verdict(a=a, b=b)}
    ttt = {}
    for kind, label in (("trained", "avg trained"), ("heldout", "avg held-out (dictionary, techdocs)")):
        ratios = []
        for s in paired:
            base_curve, curve = runs[a, s]["curve"], runs[b, s]["curve"]
            target = curve_value(base_curve[-1], kind)
            reached = tokens_to_target(curve, "avg_trained" if kind == "trained" else "avg_heldout", target)
            ratios.append(None if reached is None else reached / float(base_curve[-1]["tokens"]))
        done = [r for r in ratios if r is not None]
        m, lo, hi = mean_ci(done) if done else (float("nan"),) * 3
        ttt[label] = {"per_seed": ratios, "reached": len(done), "mean": m, "low": lo, "high": hi}
    return {"a": a, "b": b, "seeds": paired, "rows": rows, "tokens_to_target": ttt}


def analyse(runs: dict[tuple[str, int], dict[str, Any]], exp: Experiment = MAIN) -> dict[str, Any]:
    seeds = sorted({s for (m, s) in runs if m == exp.baseline})
    comparisons = {}
    for label, a, b in comparison_pairs(exp, runs):
        comp = compare(runs, a, b)
        if comp is not None:
            comparisons[label] = comp
    result = {"seeds_complete": seeds, "comparisons": comparisons}
    if exp is not MAIN:
        result["verdicts"] = verdicts(comparisons)
    return result


def _excludes_zero(d: dict[str, float]) -> bool:
    return d["low"] > 0 or d["high"] < 0


def _ci(d: dict[str, float]) -> str:
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def verdicts(comparisons: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Issue 21's questions, each by the rule written in the experiment README before the runs:

    * domain-level? "domain-level" when C recovers B's held-out gain (B - C includes 0 and
      C - A excludes 0 on the held-out side); "instance-level adds X [CI]" when B - C excludes 0
      with B lower; else "inconclusive";
    * step size? "LinUpper survives the learning-rate control: X [CI]" when the best LinUpper
      (of lr 1.5e-3 and 3e-3) beats the best uniform (of 3e-3 and 6e-3); "step size" when uniform
      at 6e-3 beats uniform at 3e-3 and the best LinUpper - best uniform includes 0; else
      "inconclusive".
    Only with all 5 seeds of the arms involved; before that, "pending".
    """
    def held(label: str) -> Optional[dict[str, float]]:
        comp = comparisons.get(label)
        if comp is None or len(comp["seeds"]) < SEEDS:
            return None
        return comp["rows"][HELDOUT_ROW]["diff"]

    out = {}
    b_a, c_a, b_c = (held(k) for k in ("linupper_r0.4 vs uniform (B - A)", "domain_shares vs uniform (C - A)",
                                       "linupper_r0.4 vs domain_shares (B - C)"))
    if b_a is None or c_a is None or b_c is None:
        out["domain-level or instance-level (held-out)"] = "pending"
    elif not _excludes_zero(b_c) and c_a["high"] < 0:
        out["domain-level or instance-level (held-out)"] = (f"domain-level: C - A {_ci(c_a)}, B - C {_ci(b_c)} "
                                                           f"(B - A {_ci(b_a)})")
    elif b_c["high"] < 0:
        out["domain-level or instance-level (held-out)"] = f"instance-level adds {_ci(b_c)} beyond the domain shift"
    else:
        out["domain-level or instance-level (held-out)"] = f"inconclusive: B - C {_ci(b_c)}, C - A {_ci(c_a)}"
    u_lr = held("uniform lr 6e-3 vs 3e-3")
    best = next((k for k in comparisons if k.startswith("best LinUpper")), None)
    best_d = held(best) if best else None
    if u_lr is None or best_d is None:
        out["step size (held-out)"] = "pending"
    elif best_d["high"] < 0:
        out["step size (held-out)"] = f"LinUpper survives the learning-rate control: {best} {_ci(best_d)}"
    elif u_lr["high"] < 0 and not _excludes_zero(best_d):
        out["step size (held-out)"] = f"step size: uniform 6e-3 - 3e-3 {_ci(u_lr)}; {best} {_ci(best_d)}"
    else:
        out["step size (held-out)"] = f"inconclusive: {best} {_ci(best_d)}, uniform 6e-3 - 3e-3 {_ci(u_lr)}"
    return out


def comparison_table(label: str, comp: dict[str, Any]) -> list[str]:
    a, b, n = comp["a"], comp["b"], len(comp["seeds"])
    lines = [f"### {label} ({n} paired seed(s): {', '.join(map(str, comp['seeds']))})", "",
             "Final loss (nats/token; mean over seeds) and the paired difference "
             f"{b} - {a} with its 95 % t-interval (negative = {b} lower = better):", "",
             f"| domain | kind | {a} | {b} | difference [95 % CI] | verdict |", "|---|---|---|---|---|---|"]
    for row, kind in ROWS:
        r = comp["rows"][row]
        d = r["diff"]
        ci = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if n > 1 else f"{d['mean']:+.4f}"
        name = f"**{row}**" if row in AGG_KEYS else row
        lines.append(f"| {name} | {kind} | {np.mean(r[a]):.4f} | {np.mean(r[b]):.4f} | {ci} | {r['verdict']} |")
    lines += ["", f"Tokens-to-target ratio (tokens {b} needs to reach {a}'s final loss / {a}'s "
              "tokens; < 1 = faster; from the eval curves, linear interpolation):", ""]
    for tlabel, t in comp["tokens_to_target"].items():
        per = ", ".join("not reached" if r is None else f"{r:.3f}" for r in t["per_seed"])
        summary = (f"mean {t['mean']:.3f} [{t['low']:.3f}, {t['high']:.3f}]" if t["reached"] > 1
                   else "no interval")
        lines.append(f"- {tlabel}: {summary} over the {t['reached']} seed(s) that reached it; per seed: {per}")
    return lines + [""]


def markdown(analysis: dict[str, Any], runs: dict[tuple[str, int], dict[str, Any]], exp: Experiment = MAIN) -> str:
    lines = []
    if analysis.get("verdicts"):
        lines += ["## Verdicts (rules fixed in README.md before the runs)", ""]
        lines += [f"- **{q}**: {v}" for q, v in analysis["verdicts"].items()] + [""]
        lines += share_lines(runs, exp)
    for label, comp in analysis["comparisons"].items():
        lines += comparison_table(label if exp is not MAIN else f"{label} vs uniform", comp)
    lines += time_lines(runs)
    return "\n".join(lines) + "\n"


def share_lines(runs: dict[tuple[str, int], dict[str, Any]], exp: Experiment) -> list[str]:
    """Mean post-warm-up weight share per trained domain and effective sample size (of 32), per
    method: what LinUpper does to the domains, and how closely the domain-constant arm copies it."""
    methods = [m for m in exp.methods if any(mm == m and "weight_share_post_warmup" in r for (mm, _), r in runs.items())]
    if not methods:
        return []
    lines = ["## Weight shares after the warm-up (mean over steps 151-1500, then over seeds)", "",
             "| method | seeds | " + " | ".join(TRAIN_DOMAINS) + " | effective sample size (of 32) |",
             "|---|---|" + "---|" * len(TRAIN_DOMAINS) + "---|"]
    for m in methods:
        recs = [r for (mm, _), r in sorted(runs.items()) if mm == m and "weight_share_post_warmup" in r]
        shares = [np.mean([r["weight_share_post_warmup"][d] for r in recs]) for d in TRAIN_DOMAINS]
        ess = np.mean([r["weight_ess_post_warmup"] for r in recs])
        lines.append(f"| {m} | {len(recs)} | " + " | ".join(f"{x:.3f}" for x in shares) + f" | {ess:.1f} |")
    per_seed = [(s, r["weight_share_post_warmup"]) for (m, s), r in sorted(runs.items())
                if m == SHARES_FROM and "weight_share_post_warmup" in r]
    if per_seed:
        lines += ["", f"Domain weights of `domain_shares` per seed (= {SHARES_FROM}'s mean shares of that seed):", ""]
        lines += [f"- seed {s}: " + ", ".join(f"{d} {w[d]:.4f}" for d in TRAIN_DOMAINS) for s, w in per_seed]
    return lines + [""] + phase_share_lines(runs)


#: training phases after the warm-up (aligned with ``SHARE_BIN``) for the drift of the shares
SHARE_PHASES = ((WARMUP_STEPS + 1, 500), (501, 1000), (1001, 1500))


def phase_share_lines(runs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """``SHARES_FROM``'s shares per training phase (mean over seeds): the domain-constant arm holds
    their overall mean fixed, so how far they drift bounds what a time-varying *domain* schedule
    could add that the constant arm lacks (a rival explanation the constant arm does not cover)."""
    curves = [r["weight_share_curve"] for (m, _), r in sorted(runs.items())
              if m == SHARES_FROM and r.get("weight_share_curve")]
    if not curves:
        return []
    lines = [f"{SHARES_FROM}'s shares by training phase ({SHARE_BIN}-step bins, mean over its {len(curves)} seed(s)):", "",
             "| steps | " + " | ".join(TRAIN_DOMAINS) + " |", "|---|" + "---|" * len(TRAIN_DOMAINS)]
    for lo, hi in SHARE_PHASES:
        rows = [row for c in curves for row in c if lo <= row["step"] - SHARE_BIN + 1 and row["step"] <= hi]
        lines.append(f"| {lo}-{hi} | " + " | ".join(f"{np.mean([row[d] for row in rows]):.3f}" for d in TRAIN_DOMAINS) + " |")
    return lines + [""]


def time_lines(runs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """How long the runs took: wall time for runs trained in one invocation (a resumed run's
    ``summary.json`` only covers its last part), and the summed step time for every run."""
    if not runs:
        return []
    single = [r["seconds"] for r in runs.values() if len(r.get("code_versions") or []) <= 1]
    summed = [r["step_seconds_total"] for r in runs.values() if r.get("step_seconds_total") is not None]
    speed = [r["tokens_per_second"] for r in runs.values()]
    lines = [f"Training time per run ({machine()}, shared with other jobs):"]
    if single:
        lines.append(f"wall time incl. evaluation of the {len(single)} run(s) trained in one invocation: "
                     f"median {np.median(single):.0f} s, range {min(single):.0f}-{max(single):.0f} s;")
    if summed:
        lines.append(f"sum of step times (evaluation excluded, resumed runs counted in full) of {len(summed)} run(s): "
                     f"median {np.median(summed):.0f} s, range {min(summed):.0f}-{max(summed):.0f} s;")
    lines.append(f"training speed (median step) {min(speed):,.0f}-{max(speed):,.0f} tokens/s per run.")
    return [" ".join(lines)]


PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"]


def plot(runs: dict[tuple[str, int], dict[str, Any]], analysis: dict[str, Any], out: Path,
         exp: Experiment = MAIN) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(exp.methods, PALETTE))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (key, title) in zip(axes, (("avg_trained", "trained domains (avg of 4)"),
                                       ("avg_heldout", "held-out dictionary + techdocs (avg)"))):
        for method in exp.methods:
            curves = [runs[m, s]["curve"] for (m, s) in sorted(runs) if m == method]
            if not curves:
                continue
            tokens = np.array([row["tokens"] for row in curves[0]]) / 1e6
            ys = np.array([[row[key] for row in c] for c in curves])
            mean, lo, hi = mean_ci_bands(ys)
            ax.plot(tokens, mean, color=colors[method], label=f"{method} ({len(curves)} seeds)")
            ax.fill_between(tokens, lo, hi, color=colors[method], alpha=0.2)
        ax.set_title(f"validation loss: {title}")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("loss (nats/token), mean ± 95 % CI")
        ax.set_ylim(top=min(ax.get_ylim()[1], 6.5))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    curves_png = out / exp.file("lm_curves.png")
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)

    comps = analysis["comparisons"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ROWS) + 1.5 + 0.2 * len(comps)))
    labels = [row for row, _ in ROWS]
    for i, (name, comp) in enumerate(comps.items()):
        offs = (i - (len(comps) - 1) / 2) * min(0.25, 0.8 / max(len(comps), 1))
        color = PALETTE[i % len(PALETTE)]
        for j, row in enumerate(labels):
            d = comp["rows"][row]["diff"]
            y = len(labels) - 1 - j + offs
            ax.plot([d["low"], d["high"]], [y, y], color=color, lw=2)
            ax.plot(d["mean"], y, "o", color=color, label=name if j == 0 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels[::-1])
    ax.set_xlabel("final loss difference b - a (nats/token), paired by seed, 95 % t-interval")
    ax.set_title("paired differences (left of 0: the first-named method lower = better)" if exp is not MAIN
                 else "LinUpper - uniform (left of 0: LinUpper better)")
    ax.grid(alpha=0.3, axis="x")
    # below the axes: inside, the legend hid the lowest rows' intervals
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.3 / len(labels)), ncol=2)
    fig.tight_layout()
    diffs_png = out / exp.file("lm_differences.png")
    fig.savefig(diffs_png, dpi=110)
    plt.close(fig)
    paths = [curves_png, diffs_png]
    shares_png = plot_shares(runs, out, exp)
    return paths + ([shares_png] if shares_png else [])


def plot_shares(runs: dict[tuple[str, int], dict[str, Any]], out: Path, exp: Experiment) -> Optional[Path]:
    """Per-domain weight share over training (mean over seeds, 50-step bins) of every reweighted
    method, beside the effective sample size: where LinUpper's weight goes, and how closely the
    domain-constant arm follows it."""
    if exp is MAIN:
        return None
    methods = [m for m in ("linupper_r0.4", "domain_shares", "linupper_r0.4_lr1.5e-3")
               if any(mm == m and r.get("weight_share_curve") for (mm, _), r in runs.items())]
    if not methods:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(4.6 * (len(methods) + 1), 3.8), squeeze=False)
    styles = dict(zip(TRAIN_DOMAINS, PALETTE))
    for ax, m in zip(axes[0], methods):
        curves = [r["weight_share_curve"] for (mm, _), r in sorted(runs.items()) if mm == m and r.get("weight_share_curve")]
        steps = [row["step"] for row in curves[0]]
        for d in TRAIN_DOMAINS:
            ax.plot(steps, np.mean([[row[d] for row in c] for c in curves], axis=0), color=styles[d], label=d)
        ax.axhline(1 / len(TRAIN_DOMAINS), color="black", lw=0.6, ls=":")
        ax.axvline(WARMUP_STEPS, color="gray", lw=0.6, ls="--")
        ax.set_title(f"{m}: weight share ({len(curves)} seeds)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    for i, m in enumerate(methods):
        curves = [r["weight_share_curve"] for (mm, _), r in sorted(runs.items()) if mm == m and r.get("weight_share_curve")]
        ax.plot([row["step"] for row in curves[0]], np.mean([[row["ess"] for row in c] for c in curves], axis=0),
                color=PALETTE[i], label=m)
    ax.set_title("effective sample size 1 / sum w^2 (of 32)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / exp.file("lm_weight_shares.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress_note(work: Path, exp: Experiment = MAIN) -> str:
    """Unfinished runs: how far each got and, where a baseline run of the same seed reached the
    same eval step, the paired difference there. Labelled as progress, not a result: one seed
    mid-training says nothing with confidence, and the learning-rate schedule has not ended."""
    lines, rows, curves = [], {}, {}
    for seed in range(SEEDS):
        for method in exp.methods:
            path = run_dir(work, method, seed, exp) / "eval.jsonl"
            if path.is_file():
                curves[method, seed] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                if curves[method, seed] and load_run(work, method, seed, exp) is None:
                    rows[method, seed] = curves[method, seed]
    if not rows:
        return ""
    lines += ["## Runs in progress (not a result)", "",
              "| run | last eval step | tokens | avg trained | avg held-out (dictionary, techdocs) | "
              f"minus {exp.baseline} (same seed) at the last step both reached: trained / held-out |",
              "|---|---|---|---|---|---|"]
    for (method, seed), curve in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        last = curve[-1]
        base = {r["step"]: r for r in curves.get((exp.baseline, seed), [])}  # finished or not
        common = [r for r in curve if r["step"] in base]
        vs = "-"
        if common and method != exp.baseline:
            mine, ref = common[-1], base[common[-1]["step"]]
            vs = (f"{mine['avg_trained'] - ref['avg_trained']:+.4f} / {mine['avg_heldout'] - ref['avg_heldout']:+.4f} "
                  f"(step {mine['step']})")
        lines.append(f"| {method}-seed{seed} | {last['step']} of {STEPS} | {last['tokens']:,} | "
                     f"{last['avg_trained']:.4f} | {last['avg_heldout']:.4f} | {vs} |")
    return "\n".join(lines) + "\n"


def write_report(work: Path, out: Path, exp: Experiment = MAIN) -> list[Path]:
    """Rebuild the results file, the markdown report and the plots from whatever runs are finished."""
    runs = committed_runs(out, exp)  # runs finished in earlier sessions, possibly on another machine
    for seed in range(SEEDS):
        for method in exp.methods:
            run = load_run(work, method, seed, exp)
            if run is not None:
                runs[method, seed] = run
    out.mkdir(parents=True, exist_ok=True)
    progress = progress_note(work, exp)
    planned = SEEDS * len(exp.methods)
    title = "LM experiment results" if exp is MAIN else "LM experiment, controls (issue 21)"
    command = (f"python experiments/reweighting/lm.py{'' if exp is MAIN else ' --experiment ' + exp.name} run "
               f"--jobs 2 --threads 1 && python experiments/reweighting/lm.py"
               f"{'' if exp is MAIN else ' --experiment ' + exp.name} report")
    report = out / exp.file("lm_results.md")
    if not any(m == exp.baseline for m, _ in runs):
        if not progress:
            return []
        report.write_text(f"# {title} (generated by `experiments/reweighting/lm.py report`)\n\n"
                          f"0 of {planned} runs finished: no result yet.\n\n{progress}")
        return [report]
    analysis = analyse(runs, exp)
    ext_manifest = work / "heldout" / f"{EXTERNAL}.manifest.json"
    design = {"train_domains": TRAIN_DOMAINS, "heldout_domains": HELDOUT_DOMAINS, "external": EXTERNAL,
              "steps": STEPS, "warmup_steps_K": WARMUP_STEPS, "seeds_planned": SEEDS, "methods": exp.methods,
              "config_uniform_seed0": run_config(work / "prepared", exp.baseline, 0, exp=exp),
              "external_tokens": EXTERNAL_TOKENS}
    if exp is not MAIN:
        design.update(code_commit=exp.code_commit, shares_from=SHARES_FROM)
    results = {
        "machine": machine(),
        "command": command,
        "design": design,
        "external_text": json.loads(ext_manifest.read_text()) if ext_manifest.is_file() else None,
        "parameters": next(iter(runs.values()))["parameters"],
        "runs": {f"{m}-seed{s}": {"final": r["final"], "seconds": r["seconds"],
                                  "step_seconds_total": r.get("step_seconds_total"), "tokens": r["tokens"],
                                  "code_versions": r["code_versions"],
                                  "tokens_per_second_median_step": r["tokens_per_second"],
                                  "curve": [{k: v for k, v in row.items() if k.startswith(("tokens", "avg", "loss/"))}
                                            for row in r["curve"]],
                                  **{k: r[k] for k in SHARE_KEYS if k in r and exp is not MAIN}}
                 for (m, s), r in sorted(runs.items())},
        **analysis,
    }
    paths = [out / exp.file("results.json"), report]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    header = (f"# {title} (generated by `experiments/reweighting/lm.py report`)\n\n"
              f"{len(runs)} of {planned} runs finished; model {results['parameters']:,} parameters, "
              f"{next(iter(runs.values()))['tokens']:,} training tokens per run; {machine()}. Command: `{command}`.\n\n")
    paths[1].write_text(header + markdown(analysis, runs, exp) + ("\n" + progress if progress else ""))
    paths += plot(runs, analysis, out, exp)
    return paths


def cmd_report(args: argparse.Namespace) -> int:
    exp = EXPERIMENTS[args.experiment]
    paths = write_report(Path(args.work), Path(args.out), exp)
    if not paths:
        print("[lm] no run has started yet; nothing to report", file=sys.stderr)
        return 1
    print((Path(args.out) / exp.file("lm_results.md")).read_text())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="runs, prepared data and held-out text (not in git)")
    ap.add_argument("--out", default=str(HERE), help="where results.json, lm_results.md and plots go")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="the six-domain corpus")
    ap.add_argument("--experiment", choices=sorted(EXPERIMENTS), default=MAIN.name,
                    help="main: uniform vs LinUpper r = 0.4 / 1.0 (15 runs); controls: issue 21's arms (25 runs)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="train every (method, seed) not finished yet, then report")
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--commit", action="store_true", help="git-commit the report after every finished run")
    p.add_argument("--steps", type=int, default=STEPS, help="steps per run (smoke tests only; results use the default)")
    p.add_argument("--first", default="", metavar="M1,M2",
                   help=f"train these methods for every seed before the others (of {', '.join(METHODS)})")
    p = sub.add_parser("measure", help="tokens/s of the experiment's model for the two thread layouts")
    p.add_argument("--steps", type=int, default=30)
    sub.add_parser("report", help="results.json, lm_results.md and plots from the finished runs")
    args = ap.parse_args()
    if getattr(args, "seeds", SEEDS) > SEEDS or getattr(args, "seeds", 1) < 1:
        ap.error(f"--seeds must be in [1, {SEEDS}]")
    return {"run": cmd_run, "measure": cmd_measure, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""Launch the same 2-rank ZeRO-3 CPU run many times and count the runs that fail, by cause.

Why: a rank can die *after* training finished (SIGABRT in interpreter teardown, "terminate called
without an active exception"): before the fix, 4 of 168 launches on an idle 2-core machine; one test run
cannot show such a rate, or that a fix removed it. This is the run of
``tests/test_distributed.py::test_uniform_two_ranks_equal_one_process[zero3_cpu_tiny.json]``
(tiny model, 4 steps, ``deepspeed.zero.Init``) without the test's one-process reference, so each
launch takes ~10 s. Run it on an otherwise idle machine: load slows the ranks and hides the race.

    python experiments/stability/repeat_two_rank_run.py --runs 200 --out runs/stability

writes ``<out>/repeat.json`` (commit, machine, runs, failures with their exit codes and whether the
log shows the teardown abort) and keeps the log of every failed run.

``--refusal`` measures the error path instead: every launch goes into a directory that already
holds a finished run, so both ranks must refuse with exit 2; a launch that exits otherwise (the
same teardown abort showed as -11 in one ``make test-latest`` run) is a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests._launch import deepspeed_train  # noqa: E402
from tests.conftest import make_corpus  # noqa: E402
from tests.test_distributed import DS_TINY, write_config  # noqa: E402

TEARDOWN_ABORT = "terminate called without an active exception"


def setup(work: Path) -> tuple[Path, Path]:
    """The tiny corpus, prepared data, config and ZeRO-3 JSON of the test, built once in ``work``."""
    from megareweight.data.prepare import prepare

    prepared = work / "prepared"
    if not (prepared / "manifest.json").is_file():
        prepare(make_corpus(work / "corpus"), prepared, vocab_size=320, valid_fraction=0.1, progress=False)
    config = write_config(work / "c.yaml", prepared, "uniform", accum=1)
    raw = json.loads(DS_TINY.read_text())
    raw["megareweight"] = {"zero_init": True}
    ds_json = work / "zero3_init.json"
    ds_json.write_text(json.dumps(raw))
    return config, ds_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="how many launches")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "stability", help="work and result directory")
    parser.add_argument("--refusal", action="store_true",
                        help="launch into a directory that already holds a finished run (no --resume): every rank "
                             "must refuse with exit 2; counts the launches that exit otherwise (the error path)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    args.out.mkdir(parents=True, exist_ok=True)
    config, ds_json = setup(args.out)
    failures, start = [], time.time()
    run = args.out / "run"
    if args.refusal:
        shutil.rmtree(run, ignore_errors=True)
        deepspeed_train(config, ds_json, run, 2)   # the finished run every launch below must refuse to touch
    for i in range(args.runs):
        if not args.refusal:
            shutil.rmtree(run, ignore_errors=True)
        try:
            deepspeed_train(config, ds_json, run, 2)
            if args.refusal:
                raise AssertionError("launcher exited with [0]: the run was not refused")
            print(f"run {i + 1}: ok", flush=True)
        except AssertionError as err:  # the launcher exited non-zero or timed out; err holds the log tail
            if args.refusal and str(err).startswith("launcher exited with [2]") and "already holds a run" in str(err):
                print(f"run {i + 1}: refused, exit 2 (ok)", flush=True)
                continue
            log = args.out / f"failed_{i + 1}.log"
            log.write_text(str(err))
            failures.append({"run": i + 1, "teardown_abort": TEARDOWN_ABORT in str(err),
                             "finished_training": (run / "summary.json").is_file(), "log": log.name})
            print(f"run {i + 1}: FAILED ({'teardown abort' if failures[-1]['teardown_abort'] else 'other'})", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    result = {"mode": "refusal (expect exit 2)" if args.refusal else "finished run (expect exit 0)",
              "command": " ".join(["python", "experiments/stability/repeat_two_rank_run.py", *sys.argv[1:]]),
              "commit": commit + (" + uncommitted changes" if dirty else ""),
              "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, {platform.platform()}",
              "runs": args.runs, "failed": len(failures), "failures": failures,
              "seconds": round(time.time() - start, 1)}
    (args.out / "repeat.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(failures)} of {args.runs} runs failed ({sum(f['teardown_abort'] for f in failures)} teardown aborts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m megareweight.train`` — the entry point the DeepSpeed launcher runs on every rank.

``deepspeed --num_accelerators 2 --module megareweight.train --config C.yaml --deepspeed
ds_configs/zero3_cpu_tiny.json --out DIR`` and ``megareweight train ...`` share this code.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run (under a launcher: the arguments to give it)."""
    parts = ["--config", args.config]
    if args.deepspeed:
        parts += ["--deepspeed", args.deepspeed]
    parts += ["--out", args.out]
    for override in args.overrides:
        parts += ["--set", override]
    parts.append("--resume")
    if args.deepspeed or args.local_rank is not None:
        return f"the same launcher command (e.g. deepspeed ... --module megareweight.train) with {shlex.join(parts)}"
    return shlex.join(["megareweight", "train", *parts])


def run_training(args: argparse.Namespace) -> int:
    from megareweight.cli import UsageError
    from megareweight.config import load_config
    from megareweight.train.loop import train
    from megareweight.train.signals import StoppedBySignal

    if args.overwrite and (args.resume or args.resume_from):
        raise UsageError("--overwrite starts a new run; it cannot be combined with --resume/--resume-from")
    cfg = load_config(args.config, args.overrides)
    factory = None
    if args.deepspeed:
        from megareweight.train.ds_engine import deepspeed_engine_factory

        factory = deepspeed_engine_factory(args.deepspeed)
    try:
        result = train(cfg, args.out, resume=args.resume, engine_factory=factory, progress=not args.quiet,
                       resume_from=args.resume_from, overwrite=args.overwrite)
    except StoppedBySignal as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megareweight: {stop}; resume with: {resume_command(args)}", file=sys.stderr, flush=True)
        return stop.exit_code
    if not args.quiet and result.is_main:
        final = ", ".join(f"{d} {v:.4f}" for d, v in result.final_eval.items())
        print(f"[megareweight] done: {result.steps} steps, {result.tokens:,} tokens, {result.seconds:.1f} s; "
              f"validation loss: {final}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megareweight.cli import add_train_arguments, main as cli_main

    parser = argparse.ArgumentParser(prog="python -m megareweight.train")
    add_train_arguments(parser)
    parser.parse_known_args(argv)  # validate early: --help and missing arguments
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

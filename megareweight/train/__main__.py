"""``python -m megareweight.train`` — the entry point the DeepSpeed launcher runs on every rank.

``deepspeed --num_accelerators 2 --module megareweight.train --config C.yaml --deepspeed
ds_configs/zero3_cpu_tiny.json --out DIR`` and ``megareweight train ...`` share this code: the
top-level CLI takes :func:`add_train_arguments` and :func:`run_training` from here, and this module
imports only :mod:`megareweight.cli_errors` (exit codes), never :mod:`megareweight.cli`, so there
is no import circle.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megareweight.cli_errors import run_command


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``megareweight train`` (shared with ``python -m megareweight.train``)."""
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("--out", required=True, help="output directory (metrics, checkpoints, wandb)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set optim.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--deepspeed", metavar="JSON", default=None, help="DeepSpeed config; runs under DeepSpeed")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--quiet", action="store_true", help="no progress bars or banners")


def run_training(args: argparse.Namespace) -> int:
    from megareweight.config import load_config
    from megareweight.train.loop import train

    cfg = load_config(args.config, args.overrides)
    factory = None
    if args.deepspeed:
        from megareweight.train.ds_engine import deepspeed_engine_factory

        factory = deepspeed_engine_factory(args.deepspeed)
    result = train(cfg, args.out, resume=args.resume, engine_factory=factory, progress=not args.quiet)
    if not args.quiet and result.is_main:
        final = ", ".join(f"{d} {v:.4f}" for d, v in result.final_eval.items())
        print(f"[megareweight] done: {result.steps} steps, {result.tokens:,} tokens, {result.seconds:.1f} s; "
              f"validation loss: {final}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megareweight.train")
    add_train_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(run_training, args)


if __name__ == "__main__":
    sys.exit(main())

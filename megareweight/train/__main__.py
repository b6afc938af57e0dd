"""``python -m megareweight.train`` — the entry point the DeepSpeed launcher runs on every rank.

``deepspeed --num_accelerators 2 --module megareweight.train --config C.yaml --deepspeed
ds_configs/zero3_cpu_tiny.json --out DIR`` and ``megareweight train ...`` share this code: the
top-level CLI takes :func:`add_train_arguments` and :func:`run_training` from here, and this module
imports only :mod:`megareweight.cli_errors` (exit codes), never :mod:`megareweight.cli`, so there
is no import circle.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import shlex
import sys
from typing import NoReturn, Optional, Sequence

from megareweight.cli_errors import OneLineParser, UsageError, parse_and_run


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``megareweight train`` (shared with ``python -m megareweight.train``)."""
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("--out", required=True, help="output directory (metrics, checkpoints, wandb)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set optim.lr=1e-3")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint (starts fresh when there is none)")
    p.add_argument("--resume-from", metavar="STEP|PATH", default=None,
                   help="continue from this checkpoint (a step of --out's checkpoints, or a checkpoint directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out holds another run (whose checkpoints, metrics and wandb "
                        "files are removed); also with --resume-from a checkpoint of another directory")
    p.add_argument("--deepspeed", metavar="JSON", default=None, help="DeepSpeed config; runs under DeepSpeed")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--quiet", action="store_true", help="no progress bars or banners")


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


def enable_native_crash_tracebacks() -> None:
    """Print every thread's Python stack when this rank dies in native code (SIGSEGV, SIGABRT, ...).

    A rank killed by a C++ ``std::terminate`` in a communication library otherwise leaves one line
    ("terminate called ...") in the launcher log; with the stacks the log says which collective or
    thread it was in. The handler re-raises the signal, so the exit status is unchanged.
    """
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor (embedded use)
        pass


def run_training(args: argparse.Namespace, shutdown_groups: bool = False) -> int:
    """Train as ``args`` say; the exit code.

    ``shutdown_groups``: destroy the process groups when every rank ended together (a finished
    run, an agreed stop on a signal). Only for a process that exits next (the launcher entry,
    :func:`main`): in a process that goes on, DeepSpeed keeps references to the destroyed groups
    and a second DeepSpeed run there fails.
    """
    from megareweight.config import load_config
    from megareweight.train import distributed
    from megareweight.train.loop import train
    from megareweight.train.signals import StoppedBySignal

    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts a new run; it cannot be combined with --resume")
    enable_native_crash_tracebacks()
    cfg = load_config(args.config, args.overrides)
    factory = None
    if args.deepspeed:
        from megareweight.train.ds_engine import deepspeed_engine_factory

        factory = deepspeed_engine_factory(args.deepspeed)
    try:
        result = train(cfg, args.out, resume=args.resume, engine_factory=factory, progress=not args.quiet,
                       resume_from=args.resume_from, overwrite=args.overwrite)
    except StoppedBySignal as stop:
        if shutdown_groups:
            distributed.shutdown()  # every rank agreed to stop at the same step
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megareweight: {stop}; resume with: {resume_command(args)}", file=sys.stderr, flush=True)
        return stop.exit_code
    if shutdown_groups:
        distributed.shutdown()
    if not args.quiet and result.is_main:
        final = ", ".join(f"{d} {v:.4f}" for d, v in result.final_eval.items())
        print(f"[megareweight] done: {result.steps} steps, {result.tokens:,} tokens, {result.seconds:.1f} s; "
              f"validation loss: {final}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The launcher entry: one rank's whole process, which exits when this returns."""
    parser = OneLineParser(prog="python -m megareweight.train")
    add_train_arguments(parser)
    return parse_and_run(parser, sys.argv[1:] if argv is None else argv,
                         lambda args: run_training(args, shutdown_groups=True))


def exit_rank(code: int) -> NoReturn:
    """End this rank's process; after a distributed run, without interpreter finalisation.

    Why: destroying the process groups (:func:`megareweight.train.distributed.shutdown`) is not
    enough. DeepSpeed keeps references to its groups, so their gloo worker threads live on into
    interpreter finalisation; a worker that drops the last reference to a tensor of a finished
    asynchronous collective then needs the GIL, the finalising interpreter ends that thread, and the
    forced unwind through a ``noexcept`` frame aborts the rank ("terminate called without an active
    exception", exit -6) after everything was written: about 1 in 40 launches of a 2-rank ZeRO-3
    CPU run, still 1 in 171 with the groups destroyed (``experiments/stability/
    repeat_two_rank_run.py``). A finished run has written and closed everything (checkpoint,
    metrics, summary, wandb torn down), so the rank flushes its streams and leaves with
    ``os._exit``. The other exits of a rank that ran torch.distributed (an agreed stop on a signal,
    a refusal such as "--out already holds a run", an error) hit the same abort, which turned a
    clean exit 2 or 138 into -11 or -6 and hid the real code from the launcher and SLURM; they
    first run the ``atexit`` handlers (what normal teardown would finish: wandb's, logging's) and
    collect garbage (closing unreferenced files), then leave the same way. A process that never
    ran torch.distributed exits normally.
    """
    import atexit
    import gc

    from megareweight.train import distributed

    if distributed.was_shut_down() or distributed.is_distributed():
        if code != 0 or not distributed.was_shut_down():  # anything but a finished run
            atexit._run_exitfuncs()  # noqa: SLF001 - private, but in every CPython 3; os._exit skips them
            gc.collect()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_rank(main())

"""Exit codes and the one-line error handling shared by every command-line entry point.

``megareweight`` (:mod:`megareweight.cli`), ``python -m megareweight.train`` (the module the
DeepSpeed launcher runs) and the ``mix`` subcommands (:mod:`megareweight.autoscale.cli`) all raise
:class:`UsageError` for bad input and run their command through :func:`run_command`. Keeping both
here, in a module that imports nothing of the package, is what lets the top-level CLI register the
subcommands without any subcommand module importing :mod:`megareweight.cli` back.

Exit codes (documented in the README):
  0  success
  1  the job failed while running (e.g. repeated non-finite losses; a checkpoint was written)
  2  bad input: configuration, command-line arguments, missing or corrupt files
130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def bad_input_types() -> tuple[type, ...]:
    """Exception types that mean "fix your input" (exit 2) rather than "the job failed" (exit 1).

    Every ``ValueError`` counts as bad input: the package's own errors (config, corpus, shards,
    mixing) subclass it. Imported lazily so that ``--help`` stays fast.
    """
    from megareweight.config import ConfigError
    from megareweight.data.corpus import CorpusError
    from megareweight.data.shards import ShardError

    return (UsageError, ConfigError, CorpusError, ShardError, FileNotFoundError, ValueError)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``func(args)``; turn an exception into one line on stderr and the matching exit code.

    ``MEGAREWEIGHT_DEBUG=1`` re-raises instead, to see the traceback.
    """
    if getattr(args, "quiet", False):
        os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return func(args)
    except KeyboardInterrupt:
        print("megareweight: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, no traceback
        if os.environ.get("MEGAREWEIGHT_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"megareweight: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(exc, bad_input_types()) else EXIT_FAILED

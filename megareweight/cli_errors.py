"""Exit codes and the one-line error handling shared by every command-line entry point.

``megareweight`` (:mod:`megareweight.cli`), ``python -m megareweight.train`` (the module the
DeepSpeed launcher runs) and the ``mix`` subcommands (:mod:`megareweight.autoscale.cli`) all raise
:class:`UsageError` for bad input and run their command through :func:`run_command`. Keeping both
here, in a module that imports nothing of the package, is what lets the top-level CLI register the
subcommands without any subcommand module importing :mod:`megareweight.cli` back.

Exit codes (documented in the README):
  0  success
  1  the job failed while running (repeated non-finite steps, a checkpoint write that failed, ...)
  2  bad input: configuration, command-line arguments, missing, corrupt or unwritable files, a busy
     or foreign run directory, a resume the checkpoint cannot continue
128+N  training stopped by signal N after writing a checkpoint (130 SIGINT, 143 SIGTERM, 138 SIGUSR1);
     the message gives the command that resumes it. A second Ctrl-C aborts at once (130, no checkpoint).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but its errors are one line like every other error (usage stays in ``--help``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"megareweight: error: {self.prog}: {message} (see --help)\n")

    def parse_known_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                         namespace: Optional[argparse.Namespace] = None) -> tuple[argparse.Namespace, list[str]]:
        return super().parse_known_args(self._attach_dash_values(sys.argv[1:] if args is None else list(args)),
                                        namespace)

    def _attach_dash_values(self, args: list[str]) -> list[str]:
        """``--shard -1/4`` -> ``--shard=-1/4``, so that the option's own check names the value.

        Why: argparse takes a value that starts with ``-`` (and is not a plain negative number)
        for an option, and reports "expected one argument" without the value. A following word
        that is, or may abbreviate, one of this parser's options is left alone (``--out --quiet``
        stays a missing value), and so is everything after ``--``.
        """
        out: list[str] = []
        i = 0
        while i < len(args):
            word = args[i]
            if word == "--":
                return out + args[i:]
            action = self._option_string_actions.get(word)
            takes_one = action is not None and action.nargs is None
            if takes_one and i + 1 < len(args) and args[i + 1].startswith("-") and args[i + 1] != "--":
                value = args[i + 1]
                name = value.split("=", 1)[0]
                if not any(option.startswith(name) for option in self._option_string_actions):
                    out.append(f"{word}={value}")
                    i += 2
                    continue
            out.append(word)
            i += 1
        return out


def parse_and_run(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                  func: Optional[Callable[[argparse.Namespace], int]] = None) -> int:
    """Parse ``argv`` and run ``func`` (default: the subcommand's ``args.func``) via :func:`run_command`.

    ``--help`` returns 0 and a bad argument 2 (its one line already printed) instead of raising
    ``SystemExit``, so that tests and callers get an exit code like from every other error.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run_command(func or args.func, args)


def bad_input_types() -> tuple[type, ...]:
    """Exception types that mean "fix your input" (exit 2) rather than "the job failed" (exit 1).

    Every ``ValueError`` counts as bad input: the package's own errors (config, corpus, shards,
    mixing) subclass it. Imported lazily so that ``--help`` stays fast.
    """
    from megareweight.config import ConfigError
    from megareweight.data.corpus import CorpusError
    from megareweight.data.shards import ShardError

    # PermissionError & co.: a path the user gave cannot be used (an unwritable --out, --json-out).
    return (UsageError, ConfigError, CorpusError, ShardError, FileNotFoundError, ValueError, PermissionError,
            IsADirectoryError, NotADirectoryError, FileExistsError)


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

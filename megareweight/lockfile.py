"""The install lock (``constraints.txt``): write it from a venv, or say how a venv differs from it.

    python -m megareweight.lockfile freeze --out constraints.txt   # `make lock`
    python -m megareweight.lockfile diff constraints.txt           # `make test-latest` ends with it

Why a constraints file and not a requirements list: ``pip install -c constraints.txt -e .`` installs
exactly what ``setup.py`` asks for, each package at the locked version, and leaves packages the lock
does not name free (a CUDA build of torch pulls ``nvidia-*`` wheels that a CPU lock never saw).
Local version labels are dropped (``torch==2.13.0``, not ``2.13.0+cpu``): ``==2.13.0`` matches the
CPU and the CUDA builds of that release alike.
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

#: Never locked: the project itself (installed from the checkout).
SELF = "megareweight"


def canonical(name: str) -> str:
    """PEP 503 name: ``Foo_bar.baz`` and ``foo-bar-baz`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Every distribution in this environment except the project: canonical name -> public version."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) != SELF:
            found[canonical(name)] = dist.version.split("+", 1)[0]
    return dict(sorted(found.items()))


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints file (comments and blank lines skipped)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected name==version, got {line!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def render(pins: dict[str, str]) -> str:
    header = [
        "# Locked versions: every package the CPU test suite passed with (transitive ones included).",
        f"# Written by `make lock` (python -m megareweight.lockfile freeze) on {date.today().isoformat()},",
        f"# Python {platform.python_version()}, {platform.system()} {platform.machine()}.",
        "# Used as pip constraints by `make install`; setup.py keeps the ranges a user's own environment may satisfy.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in pins.items()]) + "\n"


def differences(lock: dict[str, str], env: dict[str, str]) -> list[str]:
    """One line per package whose version differs, that only the lock has, or only the env has."""
    lines = []
    for name in sorted(set(lock) | set(env)):
        old, new = lock.get(name), env.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"  + {name}=={new} (not in the lock)")
        elif new is None:
            lines.append(f"  - {name}=={old} (locked, not installed here)")
        else:
            lines.append(f"  ~ {name}: locked {old}, installed {new}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megareweight.lockfile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    freeze = sub.add_parser("freeze", help="write this environment's versions as a constraints file")
    freeze.add_argument("--out", type=Path, required=True)
    diff = sub.add_parser("diff", help="list the packages whose installed version differs from the lock")
    diff.add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "freeze":
        args.out.write_text(render(installed()))
        print(f"wrote {args.out} ({len(installed())} packages)")
        return 0
    try:
        lock = read_lock(args.lock)
    except (OSError, ValueError) as exc:
        print(f"megareweight.lockfile: error: {exc}", file=sys.stderr)
        return 2
    lines = differences(lock, installed())
    print(f"{len(lines)} package(s) differ from {args.lock}" + (":" if lines else ""))
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

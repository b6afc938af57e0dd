"""``megareweight prepare``: corpus directory -> tokenizer + per-domain train/valid token shards.

The validation split is chosen per *document*: documents are ordered by a hash of their text and
taken in that order until they hold ``valid_fraction`` of the domain's bytes (at least one
document, and never all of them). No document is split between train and valid, the choice does
not depend on file order, and domains made of a few long documents (books) still get a split.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from megareweight.data.corpus import list_domains, iter_documents
from megareweight.data.shards import FORMAT_VERSION, MANIFEST, ShardWriter, dtype_for_vocab, sha256_file
from megareweight.data.tokenizer import Tokenizer, balanced_sample, train_tokenizer

ENCODE_BATCH = 512


def validation_documents(path: Path, fraction: float) -> set[int]:
    """Indices (in file order, empty documents skipped) of the documents held out for validation."""
    keyed = []
    for index, text in enumerate(t for t in iter_documents(path) if t):
        data = text.encode("utf-8")
        keyed.append((hashlib.blake2b(data, digest_size=8).digest(), index, len(data)))
    if len(keyed) < 2:
        raise ValueError(f"{path}: {len(keyed)} non-empty document(s); a train/valid split needs at least 2")
    keyed.sort()
    target = fraction * sum(size for _, _, size in keyed)
    chosen: set[int] = set()
    held = 0
    for _, index, size in keyed[:-1]:
        if chosen and held >= target:
            break
        chosen.add(index)
        held += size
    return chosen


def prepare(
    corpus_dir: str | Path,
    out_dir: str | Path,
    vocab_size: int = 4096,
    valid_fraction: float = 0.02,
    tokenizer_sample_mb: float = 2.0,
    domains: Sequence[str] | None = None,
    tokenizer_model: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) a tokenizer, tokenize every domain, write shards and ``manifest.json``.

    ``tokenizer_model`` reuses an existing SentencePiece model instead of training one (e.g. to
    tokenize held-out data with a training run's vocabulary).
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    files = list_domains(corpus_dir)
    if domains:
        missing = sorted(set(domains) - set(files))
        if missing:
            raise ValueError(f"domains not in {corpus_dir}: {', '.join(missing)}; available: {', '.join(files)}")
        files = {d: files[d] for d in domains}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    tok_path = out / "tokenizer.model"
    if tokenizer_model is not None:
        if Path(tokenizer_model).resolve() != tok_path.resolve():
            shutil.copyfile(tokenizer_model, tok_path)
        tokenizer = Tokenizer(tok_path)
    else:
        sample = balanced_sample(files, int(tokenizer_sample_mb * 2**20), seed)
        tokenizer = train_tokenizer(sample, tok_path, vocab_size, seed=seed)
    dtype = dtype_for_vocab(tokenizer.vocab_size)

    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.str,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {"file": tok_path.name, "sha256": sha256_file(tok_path)},
        "corpus": str(Path(corpus_dir).resolve()),
        "valid_fraction": valid_fraction,
        "domains": {},
    }
    for domain, path in files.items():
        writers = {split: ShardWriter(out / split / f"{domain}.bin", dtype, tokenizer.eos_id) for split in ("train", "valid")}
        pending: dict[str, list[str]] = {"train": [], "valid": []}
        bar = tqdm(desc=f"tokenize {domain}", unit="doc", disable=not progress, leave=False)

        def flush(split: str) -> None:
            if pending[split]:
                writers[split].add(tokenizer.encode(pending[split]))
                bar.update(len(pending[split]))
                pending[split] = []

        held_out = validation_documents(path, valid_fraction)
        for index, text in enumerate(t for t in iter_documents(path) if t):
            split = "valid" if index in held_out else "train"
            pending[split].append(text)
            if len(pending[split]) >= ENCODE_BATCH:
                flush(split)
        for split in pending:
            flush(split)
        bar.close()
        entry = {split: writers[split].close() for split in writers}
        manifest["domains"][domain] = entry
        if progress:
            print(f"  {domain:<12} train {entry['train']['tokens']:>10,} tokens  valid {entry['valid']['tokens']:>9,} tokens")
    manifest["seconds"] = round(time.time() - start, 2)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest

"""A prepared directory's ``manifest.json`` is checked, not trusted.

``manifest.json`` is a text file anyone can edit, and what it says decides what is trained: the
domain token totals give the natural mixture, ``vocab_size`` the embedding's size, the paths which
files are read. So everything the manifest states that can be derived from the files themselves is
derived and compared, at every open (``train``, ``verify``, ``mix``, the demo):

* **keys** (:func:`structure_problem`): every key the readers need is present with the right
  type; a missing one is one line naming ``manifest.json`` and the key (``domains.code.train.tokens``),
  never a bare ``KeyError``;
* **paths** (:func:`path_problem`): the tokenizer and every shard (domain names included) resolve
  inside the prepared directory, so an edited ``../../other/train/x.bin`` cannot make a training
  read another user's files on a shared cluster;
* **derived values** (:func:`derived_problems`): the tokenizer file exists (checkpoints carry a copy
  of it) and has the recorded SHA-256; vocabulary size, end-of-document id and token dtype equal
  what the tokenizer file gives; every shard's and every domain's token and document counts equal
  what the ``.idx`` files hold (their first and last offsets).

Cost: one tokenizer load and SHA-256 (a few MB at most) plus two 8-byte reads per shard; no token
is read. The full scan of the token files (ids, EOS, SHA-256 of every shard) stays
``megareweight verify``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from megareweight.data.shards import MANIFEST, SPLITS, ShardError, dtype_for_vocab, sha256_file

_KINDS = {
    "count": "a non-negative integer",
    "positive": "a positive integer",
    "text": "a non-empty string",
    "mapping": "a non-empty mapping",
    "list": "a non-empty list",
}


def _ok(value: Any, kind: str) -> bool:
    if kind in ("count", "positive"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= (kind == "positive")
    if kind == "text":
        return isinstance(value, str) and value != ""
    if kind == "mapping":
        return isinstance(value, dict) and bool(value)
    return isinstance(value, list) and bool(value)


def _field(entry: Any, key: str, kind: str, where: str) -> Any:
    """``entry[key]`` when present and of ``kind``; else a :class:`ShardError` naming the key."""
    name = f"{where}.{key}" if where else key
    if not isinstance(entry, dict) or key not in entry:
        raise ShardError(f"missing key {name!r}")
    if not _ok(entry[key], kind):
        raise ShardError(f"key {name!r} must be {_KINDS[kind]}, got {str(entry[key])[:60]!r}")
    return entry[key]


def structure_problem(manifest: Any) -> Optional[str]:
    """The first missing or mistyped key (format-2 shape; format 1 is upgraded to it first), or None."""
    try:
        if not isinstance(manifest, dict):
            raise ShardError("not a JSON object")
        _field(manifest, "vocab_size", "positive", "")
        _field(manifest, "dtype", "text", "")
        tokenizer = _field(manifest, "tokenizer", "mapping", "")
        _field(tokenizer, "file", "text", "tokenizer")
        _field(tokenizer, "sha256", "text", "tokenizer")
        for domain, splits in _field(manifest, "domains", "mapping", "").items():
            for split in SPLITS:
                where = f"domains.{domain}.{split}"
                entry = _field(splits, split, "mapping", f"domains.{domain}")
                _field(entry, "tokens", "count", where)
                _field(entry, "documents", "count", where)
                for i, shard in enumerate(_field(entry, "shards", "list", where)):
                    for key in ("bin", "bin_sha256", "idx_sha256"):
                        _field(shard, key, "text", f"{where}.shards[{i}]")
                    for key in ("tokens", "documents"):
                        _field(shard, key, "count", f"{where}.shards[{i}]")
    except ShardError as exc:
        return str(exc)
    return None


def path_problem(data: "PreparedData") -> Optional[str]:  # noqa: F821
    """The first file the manifest names outside the prepared directory (after resolving ``..`` and
    symbolic links), or None."""
    root = data.root.resolve()
    named = [("tokenizer.file", data.tokenizer_path)]
    named += [(f"domains.{domain}.{split}.shards[{i}].bin", data.shard_path(split, shard, domain))
              for domain in data.domains for split in SPLITS
              for i, shard in enumerate(data.manifest["domains"][domain][split]["shards"])]
    for key, path in named:
        if not path.resolve().is_relative_to(root):
            return f"{key} names {path}, outside the prepared directory {data.root}; every file must lie inside it"
    return None


def _index_counts(idx_path: Path) -> tuple[int, int]:
    """(tokens, documents) an ``.idx`` file describes: its last offset and its length - 1."""
    if not idx_path.is_file():
        raise ShardError(f"{idx_path}: file missing")
    size = idx_path.stat().st_size
    if size % 8 or size < 16:
        raise ShardError(f"{idx_path}: size {size} bytes is not a whole int64 offset table")
    with open(idx_path, "rb") as handle:
        handle.seek(size - 8)
        last = int(np.frombuffer(handle.read(8), dtype="<i8")[0])
    return last, size // 8 - 1


def derived_problems(data: "PreparedData") -> list[str]:  # noqa: F821
    """Every difference between what the manifest states and what its files give; each names the file
    or ``manifest.json`` and the key."""
    from megareweight.data.tokenizer import load_tokenizer

    manifest, where = data.manifest, data.root / MANIFEST
    problems: list[str] = []
    tok = data.tokenizer_path
    if not tok.is_file():
        problems.append(f"{tok}: tokenizer file missing (named by {where}'s tokenizer.file; checkpoints carry a "
                        "copy of it for eval and export); restore it or re-run prepare")
    elif sha256_file(tok) != manifest["tokenizer"]["sha256"]:
        problems.append(f"{tok}: SHA-256 differs from {where}'s tokenizer.sha256 (replaced after prepare?)")
    else:
        try:
            tokenizer = load_tokenizer(tok, eos_token=manifest["tokenizer"].get("eos_token"))
        except Exception as exc:  # noqa: BLE001 - any reader failure is "not a usable tokenizer"
            problems.append(f"{tok}: cannot be loaded as a tokenizer ({str(exc).strip()[:120]})")
        else:
            derived = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                       "dtype": dtype_for_vocab(tokenizer.vocab_size).str}
            for key, value in derived.items():
                stated = manifest.get(key, value) if key == "eos_id" else manifest[key]
                if key == "dtype" and isinstance(stated, str):
                    try:
                        stated = np.dtype(stated).str
                    except TypeError:
                        pass
                if stated != value:
                    problems.append(f"{where}: {key} is {stated!r} but the tokenizer {tok.name} gives {value!r}")
    for domain in data.domains:
        for split in SPLITS:
            entry = manifest["domains"][domain][split]
            key = f"domains.{domain}.{split}"
            tokens = documents = 0
            try:
                for i, shard in enumerate(entry["shards"]):
                    idx = data.shard_path(split, shard, domain).with_suffix(".idx")
                    n_tokens, n_docs = _index_counts(idx)
                    if (shard["tokens"], shard["documents"]) != (n_tokens, n_docs):
                        problems.append(f"{where}: {key}.shards[{i}] states {shard['tokens']} tokens / "
                                        f"{shard['documents']} documents, {idx.name} holds {n_tokens} / {n_docs}")
                    tokens, documents = tokens + n_tokens, documents + n_docs
            except ShardError as exc:
                problems.append(str(exc))
                continue
            if (entry["tokens"], entry["documents"]) != (tokens, documents):
                problems.append(f"{where}: {key} states {entry['tokens']} tokens / {entry['documents']} documents, "
                                f"its shards' index files hold {tokens} / {documents}")
    return problems

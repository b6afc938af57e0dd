"""Per-domain token shards: ``<split>/<domain>.bin`` + ``.idx`` + one ``manifest.json``.

* ``.bin``: the domain's documents' tokens back to back, each document followed by EOS, as
  little-endian uint16 (vocab <= 65536) or uint32.
* ``.idx``: int64 document offsets into ``.bin``, ``n_docs + 1`` entries starting at 0.
* ``manifest.json``: vocab size, dtype, tokenizer, and per shard token/document counts and the
  SHA-256 of both files.

Shards are read with ``numpy.memmap``, so a multi-GB domain costs no memory until touched. Cheap
structural checks (sizes, offsets, counts against the manifest) run at every open; the full
checksum and token-range scan run on request (:func:`verify_prepared`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")


class ShardError(ValueError):
    """A shard is missing, truncated or inconsistent; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends documents to one ``.bin``/``.idx`` pair; ``close()`` returns the manifest entry."""

    def __init__(self, bin_path: Path, dtype: np.dtype, eos_id: int):
        self.bin_path = Path(bin_path)
        self.idx_path = self.bin_path.with_suffix(".idx")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.eos_id = eos_id
        self._bin = open(self.bin_path, "wb")
        self._offsets = [0]

    def add(self, documents: Iterable[Sequence[int]]) -> None:
        arrays = []
        for tokens in documents:
            arr = np.empty(len(tokens) + 1, dtype=self.dtype)
            arr[:-1] = tokens
            arr[-1] = self.eos_id
            arrays.append(arr)
            self._offsets.append(self._offsets[-1] + arr.size)
        if arrays:
            self._bin.write(np.concatenate(arrays).tobytes())

    def close(self) -> dict[str, Any]:
        self._bin.close()
        np.asarray(self._offsets, dtype="<i8").tofile(self.idx_path)
        return {
            "bin": self.bin_path.name,
            "tokens": int(self._offsets[-1]),
            "documents": len(self._offsets) - 1,
            "bin_sha256": sha256_file(self.bin_path),
            "idx_sha256": sha256_file(self.idx_path),
        }


@dataclass
class TokenShard:
    """A memory-mapped shard. ``tokens`` is a read-only 1-D array over the ``.bin`` file."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @classmethod
    def open(cls, bin_path: str | Path, dtype: np.dtype, expected: dict[str, Any] | None = None) -> "TokenShard":
        """Map a shard and check its structure; ``expected`` is its manifest entry."""
        bin_path = Path(bin_path)
        idx_path = bin_path.with_suffix(".idx")
        for path in (bin_path, idx_path):
            if not path.is_file():
                raise ShardError(f"{path}: file missing")
        nbytes = bin_path.stat().st_size
        if nbytes % dtype.itemsize:
            raise ShardError(f"{bin_path}: size {nbytes} bytes is not a multiple of {dtype.itemsize} ({dtype}): truncated?")
        n_tokens = nbytes // dtype.itemsize
        if idx_path.stat().st_size % 8 or idx_path.stat().st_size < 16:
            raise ShardError(f"{idx_path}: size {idx_path.stat().st_size} bytes is not a whole int64 offset table")
        offsets = np.fromfile(idx_path, dtype="<i8")
        if offsets[0] != 0 or offsets[-1] != n_tokens:
            raise ShardError(
                f"{idx_path}: offsets run from {offsets[0]} to {offsets[-1]} but {bin_path.name} holds {n_tokens} tokens"
            )
        if np.any(np.diff(offsets) <= 0):
            raise ShardError(f"{idx_path}: document offsets are not strictly increasing")
        if expected is not None:
            if expected.get("tokens") != n_tokens or expected.get("documents") != offsets.size - 1:
                raise ShardError(
                    f"{bin_path}: {n_tokens} tokens / {offsets.size - 1} documents on disk, manifest says "
                    f"{expected.get('tokens')} / {expected.get('documents')}"
                )
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        return cls(bin_path, tokens, offsets)


@dataclass
class PreparedData:
    """A prepared directory: manifest + shards per split and domain (opened lazily and checked)."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> "PreparedData":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ShardError(f"{path}: not found (run `megareweight prepare` first)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ShardError(f"{path}: not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise ShardError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}")
        return cls(root, manifest)

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["file"]

    def shard(self, split: str, domain: str) -> TokenShard:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if domain not in self.manifest["domains"]:
            raise ShardError(f"{self.root}: no domain {domain!r}; available: {', '.join(self.domains)}")
        entry = self.manifest["domains"][domain][split]
        return TokenShard.open(self.root / split / entry["bin"], self.dtype, entry)

    def shards(self, split: str, domains: Sequence[str] | None = None) -> dict[str, TokenShard]:
        return {d: self.shard(split, d) for d in (domains or self.domains)}


def verify_prepared(root: str | Path, progress: bool = False) -> list[str]:
    """Full check of a prepared directory: structure, SHA-256 of every file, token ids < vocab.

    Returns a list of problems (empty when everything is intact); each names the file.
    """
    from tqdm import tqdm

    data = PreparedData.open(root)
    problems: list[str] = []
    pairs = [(d, s) for d in data.domains for s in SPLITS]
    for domain, split in tqdm(pairs, desc="verify", unit="shard", disable=not progress, leave=False):
        entry = data.manifest["domains"][domain][split]
        bin_path = data.root / split / entry["bin"]
        try:
            shard = TokenShard.open(bin_path, data.dtype, entry)
        except ShardError as exc:
            problems.append(str(exc))
            continue
        for path, key in ((bin_path, "bin_sha256"), (bin_path.with_suffix(".idx"), "idx_sha256")):
            if sha256_file(path) != entry[key]:
                problems.append(f"{path}: SHA-256 differs from the manifest (corrupted or modified)")
        if shard.num_tokens and int(shard.tokens.max()) >= data.vocab_size:
            problems.append(f"{bin_path}: token id {int(shard.tokens.max())} >= vocab size {data.vocab_size}")
    tok = data.tokenizer_path
    if not tok.is_file():
        problems.append(f"{tok}: tokenizer model missing")
    elif sha256_file(tok) != data.manifest["tokenizer"]["sha256"]:
        problems.append(f"{tok}: SHA-256 differs from the manifest")
    return problems

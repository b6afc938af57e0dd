"""Token shards: ``<split>/<domain>/<part>.bin`` + ``.idx``, listed in one ``manifest.json``.

* ``.bin``: documents' tokens back to back, each document followed by the end-of-document id, as
  little-endian uint16 (vocab <= 65536) or uint32.
* ``.idx``: int64 document offsets into ``.bin``, ``n_docs + 1`` entries starting at 0.
* ``manifest.json`` (format 2): vocab size, dtype, end-of-document id, tokenizer (file, kind,
  SHA-256), and per domain and split the totals (tokens, documents, largest token id) and the list
  of shards, each with its counts, its largest token id and the SHA-256 of both files. A domain's
  shards are read in manifest order as one stream (:class:`TokenStream`).

Opening is O(1) per shard and reads no token and no offset table: both files are memory-mapped
and only their sizes, the first and last offset, the manifest's counts and the manifest's largest
token id (against the vocabulary) are checked, so ids >= vocab fail at open naming the file rather
than as an index error mid-run. Before that, :meth:`PreparedData.open` checks the manifest
against its files (:mod:`~megareweight.data.manifest_check`: keys, paths inside the directory,
vocabulary and counts derived from the tokenizer and the ``.idx`` files). The full scan (offsets
strictly increasing, EOS after every document, every token id, SHA-256 of every file, no stray
shard files) is :func:`verify_prepared` (``megareweight verify``).

Format 1 (one ``<split>/<domain>.bin`` per domain, no largest token id) is still read; its shards
are range-checked only by ``megareweight verify``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
SPLITS = ("train", "valid")
SCAN_CHUNK = 1 << 24  # elements per chunk of verify's full scans (bounded memory)


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
    """Appends tokenized documents to one ``.bin``/``.idx`` pair, hashing as it writes.

    ``close()`` returns the shard's manifest entry, or None (and removes both files) when no
    document was written: an empty shard is never listed.
    """

    def __init__(self, bin_path: Path, dtype: np.dtype):
        self.bin_path = Path(bin_path)
        self.idx_path = self.bin_path.with_suffix(".idx")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._bin = open(self.bin_path, "wb")
        self._idx = open(self.idx_path, "wb")
        self._bin_sha, self._idx_sha = hashlib.sha256(), hashlib.sha256()
        self.tokens = 0
        self.documents = 0
        self.max_token_id = -1
        self._write(self._idx, self._idx_sha, np.zeros(1, dtype="<i8"))

    @staticmethod
    def _write(handle, digest, array: np.ndarray) -> None:
        data = array.tobytes()
        handle.write(data)
        digest.update(data)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, max_token_id: int) -> None:
        """Append documents: ``tokens`` back to back (each ending with EOS), ``lengths`` per document."""
        if lengths.size == 0:
            return
        self._write(self._bin, self._bin_sha, np.ascontiguousarray(tokens, dtype=self.dtype))
        self._write(self._idx, self._idx_sha, (self.tokens + np.cumsum(lengths, dtype=np.int64)).astype("<i8"))
        self.tokens += int(lengths.sum())
        self.documents += int(lengths.size)
        self.max_token_id = max(self.max_token_id, int(max_token_id))

    def close(self) -> Optional[dict[str, Any]]:
        self._bin.close()
        self._idx.close()
        if self.documents == 0:
            self.bin_path.unlink()
            self.idx_path.unlink()
            return None
        return {
            "bin": self.bin_path.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "max_token_id": self.max_token_id,
            "bin_sha256": self._bin_sha.hexdigest(),
            "idx_sha256": self._idx_sha.hexdigest(),
        }


@dataclass
class TokenShard:
    """A memory-mapped shard. ``tokens`` and ``offsets`` are read-only arrays over the files."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    max_token_id: Optional[int] = None  # from the manifest (None for format 1)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @classmethod
    def open(cls, bin_path: str | Path, dtype: np.dtype, expected: dict[str, Any] | None = None,
             vocab_size: Optional[int] = None) -> "TokenShard":
        """Map a shard and run the O(1) checks; ``expected`` is its manifest entry."""
        bin_path = Path(bin_path)
        idx_path = bin_path.with_suffix(".idx")
        for path in (bin_path, idx_path):
            if not path.is_file():
                raise ShardError(f"{path}: file missing")
        nbytes = bin_path.stat().st_size
        if nbytes % dtype.itemsize:
            raise ShardError(f"{bin_path}: size {nbytes} bytes is not a multiple of {dtype.itemsize} ({dtype}): truncated?")
        n_tokens = nbytes // dtype.itemsize
        idx_bytes = idx_path.stat().st_size
        if idx_bytes % 8 or idx_bytes < 16:
            raise ShardError(f"{idx_path}: size {idx_bytes} bytes is not a whole int64 offset table")
        offsets = np.memmap(idx_path, dtype="<i8", mode="r")
        if offsets[0] != 0 or offsets[-1] != n_tokens:
            raise ShardError(
                f"{idx_path}: offsets run from {offsets[0]} to {offsets[-1]} but {bin_path.name} holds {n_tokens} tokens"
            )
        max_id = None
        if expected is not None:
            if expected.get("tokens") != n_tokens or expected.get("documents") != offsets.size - 1:
                raise ShardError(
                    f"{bin_path}: {n_tokens} tokens / {offsets.size - 1} documents on disk, manifest says "
                    f"{expected.get('tokens')} / {expected.get('documents')}"
                )
            max_id = expected.get("max_token_id")
        if max_id is not None and vocab_size is not None and max_id >= vocab_size:
            raise ShardError(f"{bin_path}: holds token ids up to {max_id} but the vocabulary has {vocab_size} "
                             f"(ids 0..{vocab_size - 1}): written with another tokenizer? re-run prepare")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        return cls(bin_path, tokens, offsets, max_id)

    def segment_ids(self, start: int, length: int) -> np.ndarray:
        """Document number (0 = the one containing ``start``) of tokens ``[start, start+length)``.

        Boundaries come from the ``.idx`` offsets, not from EOS positions: a Hugging Face
        tokenizer may emit the EOS id inside a document that contains its text literally.
        Cost: two binary searches in the memory-mapped offsets plus the boundaries in the window.
        """
        first = int(np.searchsorted(self.offsets, start, side="right"))
        last = int(np.searchsorted(self.offsets, start + length, side="left"))
        seg = np.zeros(length, dtype=np.int64)
        if last > first:
            seg[np.asarray(self.offsets[first:last]) - start] = 1
        return np.cumsum(seg)


@dataclass
class TokenStream:
    """One domain's split: its shards, read in order as one stream of documents.

    Windows never straddle two shards (each shard is cut on its own), so a window is always one
    contiguous memory-mapped slice.
    """

    name: str
    shards: list[TokenShard]
    vocab_size: Optional[int] = None
    _cum_windows: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, shard: "TokenShard | TokenStream", name: str = "") -> "TokenStream":
        return shard if isinstance(shard, TokenStream) else cls(name or shard.path.stem, [shard])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s.num_documents for s in self.shards)

    def num_windows(self, seq_len: int) -> int:
        cum = self._cumulative(seq_len)
        return int(cum[-1]) if cum.size else 0

    def _cumulative(self, seq_len: int) -> np.ndarray:
        cum = self._cum_windows.get(seq_len)
        if cum is None:
            counts = [max((s.num_tokens - 1) // seq_len, 0) for s in self.shards]
            cum = self._cum_windows[seq_len] = np.cumsum(np.asarray(counts, dtype=np.int64))
        return cum

    def locate(self, windows: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Global window numbers -> (shard index, first token in that shard)."""
        cum = self._cumulative(seq_len)
        windows = np.asarray(windows, dtype=np.int64)
        shard = np.searchsorted(cum, windows, side="right")
        before = np.where(shard > 0, cum[np.maximum(shard - 1, 0)], 0)
        return shard, (windows - before) * seq_len

    def read(self, shard: int, start: int, length: int) -> np.ndarray:
        """``length`` tokens from ``start`` of shard ``shard`` as int64, range-checked against the vocab.

        The check costs one max over the window; it turns a corrupted shard into an error naming
        the file instead of an embedding index error deep inside the model.
        """
        tokens = np.asarray(self.shards[shard].tokens[start : start + length], dtype=np.int64)
        if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
            at = start + int(np.argmax(tokens >= self.vocab_size))
            raise ShardError(f"{self.shards[shard].path}: token id {int(tokens.max())} at position {at} is >= the "
                             f"vocabulary size {self.vocab_size} (corrupted? run megareweight verify)")
        return tokens


def _upgrade_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (one shard per domain and split) in format 2's shape; no largest token id.

    Missing keys stay missing (``None``) for :func:`~megareweight.data.manifest_check.structure_problem`
    to name; a shape that is not even nested mappings is left alone for the same reason.
    """
    domains = manifest.get("domains")
    if not isinstance(domains, dict) or not all(isinstance(s, dict) and all(isinstance(e, dict) for e in s.values())
                                                for s in domains.values()):
        return manifest
    for domain, splits in domains.items():
        for split, entry in splits.items():
            splits[split] = {"tokens": entry.get("tokens"), "documents": entry.get("documents"), "max_token_id": None,
                             "shards": [dict(entry, max_token_id=None)]}
    return manifest


@dataclass
class PreparedData:
    """A prepared directory: manifest + shards per split and domain (opened lazily and checked)."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path, check: bool = True) -> "PreparedData":
        """Read and check ``manifest.json`` (:mod:`~megareweight.data.manifest_check`): keys and paths
        always; with ``check`` (every reader but ``verify``, which lists them all) the first value
        that differs from what the tokenizer and index files give is a :class:`ShardError`."""
        from megareweight.data import manifest_check

        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ShardError(f"{path}: not found (run `megareweight prepare` first)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ShardError(f"{path}: not valid JSON ({exc})") from None
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt not in READABLE_FORMATS:
            raise ShardError(f"{path}: format {fmt!r}; this version reads formats "
                             f"{', '.join(map(str, READABLE_FORMATS))} (re-run `megareweight prepare`)")
        data = cls(root, _upgrade_v1(manifest) if fmt == 1 else manifest)
        for problem in (manifest_check.structure_problem(data.manifest), manifest_check.path_problem(data)):
            if problem is not None:
                raise ShardError(f"{path}: {problem}")
        if check:
            problems = manifest_check.derived_problems(data)
            if problems:
                more = f" (and {len(problems) - 1} more; `megareweight verify {root}` lists all)" if len(problems) > 1 else ""
                raise ShardError(f"{problems[0]}{more}")
        return data

    @property
    def format(self) -> int:
        return int(self.manifest["format"])

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

    def load_tokenizer(self, threads: int = 0):
        from megareweight.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path, eos_token=self.manifest["tokenizer"].get("eos_token"), threads=threads)

    def shard_path(self, split: str, shard_entry: dict[str, Any], domain: str) -> Path:
        base = self.root / split
        return base / shard_entry["bin"] if self.format == 1 else base / domain / shard_entry["bin"]

    def stream(self, split: str, domain: str) -> TokenStream:
        """The domain's split as one stream; every shard is mapped and checked (O(1) each)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if domain not in self.manifest["domains"]:
            raise ShardError(f"{self.root}: no domain {domain!r}; available: {', '.join(self.domains)}")
        entry = self.manifest["domains"][domain][split]
        shards = [TokenShard.open(self.shard_path(split, s, domain), self.dtype, s, self.vocab_size)
                  for s in entry["shards"]]
        return TokenStream(domain, shards, self.vocab_size)

    def streams(self, split: str, domains: Sequence[str] | None = None) -> dict[str, TokenStream]:
        return {d: self.stream(split, d) for d in (domains or self.domains)}

    # Names of earlier versions (a domain used to be one shard).
    shard = stream
    shards = streams


def tokenizer_spec(prepared: str | Path) -> tuple[Path, Optional[str]]:
    """(tokenizer file, end-of-document token) of a prepared directory, from its manifest.

    Falls back to ``tokenizer.model`` (what format 1 always wrote) when the manifest is unreadable.
    """
    root = Path(prepared)
    try:
        entry = json.loads((root / MANIFEST).read_text())["tokenizer"]
        return root / entry["file"], entry.get("eos_token")
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return root / "tokenizer.model", None


def _scan_shard(shard: TokenShard, eos_id: Optional[int]) -> tuple[int, list[str]]:
    """Full scan in bounded memory: largest token id, offsets increasing, EOS ending every document."""
    problems: list[str] = []
    idx_path = shard.path.with_suffix(".idx")
    offsets = shard.offsets
    for lo in range(0, offsets.size - 1, SCAN_CHUNK):
        chunk = np.asarray(offsets[lo : lo + SCAN_CHUNK + 1])
        if np.any(np.diff(chunk) <= 0) or chunk[-1] > shard.num_tokens:
            problems.append(f"{idx_path}: document offsets are not strictly increasing")
            return -1, problems
        if eos_id is not None and shard.num_tokens and np.any(shard.tokens[chunk[1:] - 1] != eos_id):
            problems.append(f"{shard.path}: a document does not end with the end-of-document id {eos_id}")
    largest = -1
    for lo in range(0, shard.num_tokens, SCAN_CHUNK):
        largest = max(largest, int(np.asarray(shard.tokens[lo : lo + SCAN_CHUNK]).max()))
    return largest, problems


def verify_prepared(root: str | Path, progress: bool = False) -> list[str]:
    """Full check of a prepared directory (every shard of every domain and split).

    The manifest's keys, paths and derived values (:mod:`~megareweight.data.manifest_check`: the
    tokenizer, vocabulary, counts), then per shard: structure, strictly increasing offsets, EOS after every document, token ids < vocab and equal
    to the manifest's largest id, SHA-256 of every file, and no shard file on disk that the
    manifest does not list (a leftover of an earlier preparation). Returns a list of problems
    (empty when everything is intact); each names the file.
    """
    from tqdm import tqdm

    from megareweight.data.manifest_check import derived_problems

    data = PreparedData.open(root, check=False)
    problems: list[str] = derived_problems(data)
    eos_id = data.manifest.get("eos_id")
    listed: set[Path] = set()
    items = [(d, s, e) for d in data.domains for s in SPLITS for e in data.manifest["domains"][d][s]["shards"]]
    for domain, split, entry in tqdm(items, desc="verify", unit="shard", disable=not progress, leave=False):
        bin_path = data.shard_path(split, entry, domain)
        listed.update((bin_path, bin_path.with_suffix(".idx")))
        try:
            shard = TokenShard.open(bin_path, data.dtype, entry)  # the id range is scanned below
        except ShardError as exc:
            problems.append(str(exc))
            continue
        largest, found = _scan_shard(shard, eos_id)
        problems += found
        if largest >= data.vocab_size:
            problems.append(f"{bin_path}: token id {largest} >= vocab size {data.vocab_size}")
        recorded = entry.get("max_token_id")
        if recorded is not None and largest >= 0 and largest != recorded:
            problems.append(f"{bin_path}: largest token id is {largest}, the manifest says {recorded}")
        for path, key in ((bin_path, "bin_sha256"), (bin_path.with_suffix(".idx"), "idx_sha256")):
            if sha256_file(path) != entry[key]:
                problems.append(f"{path}: SHA-256 differs from the manifest (corrupted or modified)")
    for split in SPLITS:
        for path in sorted((data.root / split).rglob("*")) if (data.root / split).is_dir() else []:
            if path.suffix in (".bin", ".idx") and path not in listed:
                problems.append(f"{path}: not listed in the manifest (left over from an earlier preparation?)")
    return problems

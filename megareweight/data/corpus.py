"""Reading a corpus: domains made of JSON Lines or Parquet files, in the layouts pretraining data uses.

A **domain** is a sorted list of files read as one stream of documents. Three ways to name one:

* ``DIR/<domain>.<ext>``: one file per domain (the built-in corpus);
* ``DIR/<domain>/``: a directory per domain, every corpus file below it (recursively), as Dolma,
  RedPajama and FineWeb ship many shards per source;
* ``NAME=GLOB`` (``megareweight prepare --domain web='/data/fineweb/**/*.parquet'``): any glob,
  ``**`` included.

File kinds, by name: ``.jsonl`` (also ``.json.gz`` etc., Dolma's name for JSON Lines), compressed
with ``.gz``, ``.xz`` or ``.zst``, one JSON object with a string ``"text"`` per line; ``.parquet``
with a string column ``text``. ``.zst`` needs the ``zstandard`` package and ``.parquet`` needs
``pyarrow``; a missing one is a :class:`CorpusError` naming the file and the package.

Reading is split in two so that preparation can parallelise the expensive half: the main process
only decompresses and cuts files into :class:`RawBatch` es (raw JSON lines, or Parquet strings) and
worker processes parse them (:func:`decode_batch`) and tokenize. :func:`iter_documents` chains both
for everything else. Building the built-in corpus from packages lives in
:mod:`megareweight.data.corpus_build`.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Sequence, Union

JSONL_SUFFIXES = (
    ".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst",
    ".json.gz", ".json.xz", ".json.zst",  # Dolma names its JSON Lines shards *.json.gz
)
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
#: A raw batch holds about this many bytes of input (lines) or rows (Parquet): large enough that
#: handing it to a worker costs little, small enough that workers stay evenly loaded.
BATCH_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024

PathLike = Union[str, Path]


class CorpusError(ValueError):
    """A corpus file or directory is missing or malformed (the message names the file)."""


def corpus_suffix(path: PathLike) -> str | None:
    """The supported suffix ``path`` ends with (longest match), or None."""
    name = Path(path).name
    matches = [s for s in SUFFIXES if name.endswith(s)]
    return max(matches, key=len) if matches else None


def _check_domain_name(name: str, where: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise CorpusError(f"{where}: {name!r} is not a usable domain name (non-empty, no '/', not starting with '.')")
    return name


def _files_below(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and corpus_suffix(p) and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def list_domains(corpus_dir: PathLike) -> dict[str, list[Path]]:
    """Map domain -> sorted files for every ``<domain>.<ext>`` file and ``<domain>/`` directory."""
    root = Path(corpus_dir)
    if not root.is_dir():
        raise CorpusError(f"corpus directory not found: {root}")
    found: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            files = _files_below(path)
            if not files:
                continue
            domain = path.name
        else:
            suffix = corpus_suffix(path)
            if suffix is None:
                continue
            domain, files = path.name[: -len(suffix)], [path]
        _check_domain_name(domain, str(path))
        if domain in found:
            raise CorpusError(f"domain {domain!r} appears twice in {root}: {found[domain][0].name} and {path.name}")
        found[domain] = files
    if not found:
        raise CorpusError(f"no <domain>.jsonl[.gz|.xz|.zst] / <domain>.parquet files or <domain>/ directories in {root}")
    return found


def parse_domain_spec(spec: str) -> tuple[str, list[Path]]:
    """``NAME=GLOB`` -> (name, sorted matching corpus files); ``**`` matches any depth."""
    if "=" not in spec:
        raise CorpusError(f"--domain {spec!r}: expected NAME=GLOB, e.g. web='/data/fineweb/**/*.parquet'")
    name, pattern = spec.split("=", 1)
    _check_domain_name(name.strip(), f"--domain {spec!r}")
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise CorpusError(f"--domain {spec!r}: no file matches {pattern}")
    unsupported = [p for p in matches if corpus_suffix(p) is None]
    if unsupported:
        raise CorpusError(f"--domain {spec!r}: {unsupported[0]} is not a corpus file; allowed: {', '.join(SUFFIXES)}")
    return name.strip(), matches


def resolve_domains(corpus_dir: PathLike | None, specs: Sequence[str] = (),
                    only: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Domains of ``corpus_dir`` plus ``NAME=GLOB`` specs, optionally restricted to ``only``."""
    if corpus_dir is None and not specs:
        raise CorpusError("no corpus given: pass --corpus DIR and/or --domain NAME=GLOB")
    files: dict[str, list[Path]] = dict(list_domains(corpus_dir)) if corpus_dir is not None else {}
    for spec in specs:
        name, matches = parse_domain_spec(spec)
        if name in files:
            raise CorpusError(f"--domain {spec!r}: domain {name!r} is already defined")
        files[name] = matches
    if only:
        missing = [d for d in only if d not in files]
        if missing:
            raise CorpusError(f"domains not in the corpus: {', '.join(missing)}; available: {', '.join(files)}")
        files = {d: files[d] for d in only}
    return files


# --- reading --------------------------------------------------------------------------------------

@dataclass
class RawBatch:
    """Undecoded documents of one file: JSON lines (bytes) or Parquet ``text`` values (str/None).

    ``first`` is the 1-based line (JSON Lines) or row (Parquet) of ``items[0]``, for error messages.
    """

    path: str
    first: int
    items: list


def _missing(package: str, path: Path, pin: str) -> CorpusError:
    return CorpusError(f"{path}: reading this file needs the '{package}' package (pip install '{pin}')")


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise _missing("zstandard", path, "zstandard>=0.22,<1") from None
        return io.BufferedReader(_ZstdReader(open(path, "rb"), zstandard.ZstdDecompressor()), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """A ``.zst`` file decompressed frame after frame, that raises :class:`EOFError` when the file
    ends inside a frame, with the words gzip and lzma use for a truncated file.

    Why not ``ZstdDecompressor.stream_reader``: it returns what it could decode and stops, so a
    truncated file read as fewer documents, or none ("no document in the split"), without a word.
    """

    def __init__(self, raw: IO[bytes], dctx: Any):
        self._raw, self._dctx = raw, dctx
        self._frame: Any = None  # the decompressor of the frame being read; None between frames
        self._pending = b""  # input after the end of the last frame (the start of the next one)
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            data, self._pending = (self._pending or self._raw.read(1 << 20)), b""
            if not data:
                if self._frame is not None:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            self._out, self._pos = self._frame.decompress(data), 0
            if self._frame.eof:
                self._pending, self._frame = self._frame.unused_data, None
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _jsonl_batches(path: Path, batch_bytes: int) -> Iterator[RawBatch]:
    with _open_binary(path) as handle:
        items: list[bytes] = []
        first, size = 1, 0
        for lineno, line in enumerate(handle, 1):
            items.append(line)
            size += len(line)
            if size >= batch_bytes:
                yield RawBatch(str(path), first, items)
                items, first, size = [], lineno + 1, 0
        if items:
            yield RawBatch(str(path), first, items)


def _parquet_batches(path: Path, rows: int) -> Iterator[RawBatch]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", path, "pyarrow>=15,<27") from None
    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from None
    field = handle.schema_arrow.field("text") if "text" in handle.schema_arrow.names else None
    if field is None:
        raise CorpusError(f"{path}: no 'text' column; columns: {', '.join(handle.schema_arrow.names)}")
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise CorpusError(f"{path}: column 'text' has type {field.type}, expected a string column")
    first = 1
    try:
        for batch in handle.iter_batches(batch_size=rows, columns=["text"]):
            items = batch.column(0).to_pylist()
            yield RawBatch(str(path), first, items)
            first += len(items)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from None


def iter_raw_batches(path: PathLike, batch_bytes: Optional[int] = None) -> Iterator[RawBatch]:
    """Cut one corpus file into raw batches (decompression happens here, parsing does not)."""
    path = Path(path)
    batch_bytes = batch_bytes or BATCH_BYTES
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    suffix = corpus_suffix(path)
    if suffix is None:
        raise CorpusError(f"{path}: not a corpus file; allowed: {', '.join(SUFFIXES)}")
    if suffix in PARQUET_SUFFIXES:
        yield from _parquet_batches(path, PARQUET_BATCH_ROWS)
        return
    try:
        yield from _jsonl_batches(path, batch_bytes)
    except _read_errors() as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from None


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged compressed file raises while being read."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def decode_batch(batch: RawBatch) -> list[str]:
    """The documents' texts, in order (blank JSON lines skipped); a bad record names file and line."""
    texts: list[str] = []
    for offset, item in enumerate(batch.items):
        where = f"{batch.path}:{batch.first + offset}"
        if isinstance(item, bytes):
            if not item.strip():
                continue
            try:
                text = json.loads(item)["text"]
            except (ValueError, KeyError, TypeError) as exc:  # ValueError: JSON and UTF-8 errors
                raise CorpusError(f"{where}: not a JSON object with a 'text' field ({exc})") from None
        else:
            text = item
            where = f"{batch.path}: row {batch.first + offset}"
        if not isinstance(text, str):
            raise CorpusError(f"{where}: 'text' is {type(text).__name__}, expected a string")
        if not text.isascii():  # a JSON escape like \ud800 without its pair: no tokenizer takes it
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise CorpusError(f"{where}: 'text' is not valid Unicode: a lone surrogate {text[exc.start]!r} at "
                                  f"character {exc.start} (a \\uD800-\\uDFFF escape without its pair)") from None
        texts.append(text)
    return texts


def iter_documents(paths: PathLike | Sequence[PathLike]) -> Iterator[str]:
    """Yield the ``text`` of every document of one file or of a domain's files, in order."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for batch in iter_raw_batches(path):
            yield from decode_batch(batch)


def domain_files_as_lists(files: Mapping[str, PathLike | Sequence[PathLike]]) -> dict[str, list[Path]]:
    """Accept ``{domain: path}`` (the old single-file form) as well as ``{domain: [paths]}``."""
    return {d: [Path(p)] if isinstance(p, (str, Path)) else [Path(x) for x in p] for d, p in files.items()}

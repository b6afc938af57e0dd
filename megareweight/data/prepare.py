"""``megareweight prepare``: corpus -> tokenizer + per-domain train/valid token shards + manifest.

Three steps, which one call runs in sequence or a cluster runs as separate jobs::

    megareweight prepare --corpus C --out P --init            # 1. tokenizer + the file list (once)
    megareweight prepare --out P --shard I/K --workers N      # 2. K jobs, e.g. a SLURM array
    megareweight prepare --out P --merge                      # 3. manifest.json from the K parts
    megareweight prepare --corpus C --out P --workers N       # all three in one process

1. **init** trains the SentencePiece tokenizer once (or copies ``--tokenizer``) and writes
   ``prepare_plan.json``: tokenizer, dtype, validation fraction and every domain's sorted file
   list. Later jobs read only the plan, so all of them see the same files even if a glob would
   match different ones later.
2. **shard I/K** tokenizes files ``i`` with ``i % K == I`` of every domain (the unit of work across
   jobs is the input file: no job reads another's files; pretraining corpora come as many files
   per source) into ``<split>/<domain>/<I>-of-<K>.bin/.idx`` and then writes
   ``parts/<I>-of-<K>.json``; the part file is written last, so its presence means the part is
   complete, and a re-run of the same job (a requeue) replaces its own files. Inside a job,
   ``--workers N`` processes parse and tokenize batches of documents while the main process only
   decompresses and writes; results are written in input order, so the output is byte-identical
   for any N. Every file is read once.
3. **merge** checks that all K parts are there and agree with the plan, then writes the manifest.

Validation split, per document: a document is held out iff the first 8 bytes of the BLAKE2b hash
of its UTF-8 text, read as a fraction of 2**64, are below ``valid_fraction``. The choice depends
only on the text (not on file order, sharding, workers, seed or tokenizer), exact duplicates land
in the same split, and it needs no second pass. So that a domain of a few long documents (books)
still gets both splits, a job whose part of a domain would leave one split empty moves the last
document of the other split there (deterministic; only for parts with >= 2 documents).

A prepared directory is written only into an empty (or new) directory; ``overwrite=True``
(``--overwrite``) first removes what an earlier preparation wrote there (manifest, plan,
tokenizer, ``train/``, ``valid/``, ``parts/``), so no stale shard survives; other files are left.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from megareweight.data.corpus import PathLike, RawBatch, decode_batch, iter_raw_batches, resolve_domains
from megareweight.data.shards import FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, dtype_for_vocab, sha256_file
from megareweight.data.tokenizer import Tokenizer, balanced_sample, load_tokenizer, tokenizer_kind, train_tokenizer
from megareweight.json_files import read_json_file, write_json_atomic

PLAN = "prepare_plan.json"
PARTS = "parts"
#: What a preparation writes into its directory (and all that ``--overwrite`` removes).
OWNED = (MANIFEST, PLAN, "tokenizer.model", "tokenizer.json", "train", "valid", PARTS)


class PrepareError(ValueError):
    """Bad input to ``prepare`` (exit code 2): a used output directory, a missing plan or part."""


def usable_cpus() -> int:
    """CPUs this process may run on (a batch job's allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def check_workers(workers: int) -> None:
    """``--workers`` must be in [1, 2 x usable CPUs]: checked before any work (tokenizer, --out).

    Why the cap: each worker is a single-threaded, CPU-bound tokenizing process holding its own
    tokenizer, so workers beyond the CPUs add memory and processes but no speed (the output is
    the same for any count). Twice the CPUs leaves room for workers that wait on the main
    process's reading and decompression; ``--workers 999`` is a typo, not 1000 processes.
    """
    cap = 2 * usable_cpus()
    if not 1 <= workers <= cap:
        raise PrepareError(f"--workers must be in [1, {cap}] (2 x the {cap // 2} usable CPUs: more workers than "
                           f"that add no speed), got {workers}")


def part_name(index: int, count: int) -> str:
    return f"{index:05d}-of-{count:05d}"


def parse_shard_spec(text: str) -> tuple[int, int]:
    """``"I/K"`` -> (I, K) with 0 <= I < K."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise PrepareError(f"--shard {text!r}: expected I/K, e.g. 3/64 (job 3 of 64, counted from 0)") from None
    if not 0 <= index < count:
        raise PrepareError(f"--shard {text!r}: need 0 <= I < K")
    return index, count


def in_validation(text: str, fraction: float) -> bool:
    """The per-document split rule (see the module docstring)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < int(fraction * 2**64)


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    return read_json_file(path, PrepareError, f"not found ({hint})")


# --- step 1: init ---------------------------------------------------------------------------------

def _claim_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrepareError(f"{out} is not empty (an earlier preparation?); pass --overwrite to replace it")
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def init_preparation(
    out_dir: PathLike,
    corpus_dir: PathLike | None = None,
    domain_specs: Sequence[str] = (),
    domains: Sequence[str] | None = None,
    vocab_size: int = 4096,
    valid_fraction: float = 0.02,
    tokenizer_sample_mb: float = 2.0,
    tokenizer_model: PathLike | None = None,
    eos_token: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Step 1: claim ``out_dir``, train or copy the tokenizer, write the plan (returned)."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    files = resolve_domains(corpus_dir, domain_specs, domains)
    out = Path(out_dir)
    given = None
    if tokenizer_model is not None:
        load_tokenizer(tokenizer_model, eos_token=eos_token)  # fail on a bad file before touching out/
        given = (Path(tokenizer_model).read_bytes(), tokenizer_kind(tokenizer_model))  # it may live in out/
    _claim_output(out, overwrite)
    if given is not None:
        tok_path = out / ("tokenizer.json" if given[1] == "huggingface" else "tokenizer.model")
        tok_path.write_bytes(given[0])
        tokenizer = load_tokenizer(tok_path, eos_token=eos_token)
    else:
        sample = balanced_sample(files, int(tokenizer_sample_mb * 2**20), seed)
        tokenizer = train_tokenizer(sample, out / "tokenizer.model", vocab_size, seed=seed)
    plan = {
        "format": FORMAT_VERSION,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype_for_vocab(tokenizer.vocab_size).str,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {"file": tokenizer.path.name, "kind": tokenizer.kind, "eos_token": tokenizer.eos_token,
                      "sha256": sha256_file(tokenizer.path)},
        "corpus": str(Path(corpus_dir).resolve()) if corpus_dir is not None else None,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "domains": {d: [str(p.resolve()) for p in paths] for d, paths in files.items()},
    }
    write_json_atomic(out / PLAN, plan)
    return plan


# --- step 2: one part -------------------------------------------------------------------------------

@dataclass
class EncodedBatch:
    """One raw batch, tokenized and split: per split, tokens back to back (EOS after each) and lengths."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    max_token_id: dict[str, int]


class Encoder:
    """Parses, splits and tokenizes raw batches (in a worker process, or in-process for 1 worker)."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype, valid_fraction: float):
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        self.valid_fraction = valid_fraction

    def __call__(self, batch: RawBatch) -> EncodedBatch:
        texts = [t for t in decode_batch(batch) if t]  # empty documents are skipped
        split_of = ["valid" if in_validation(t, self.valid_fraction) else "train" for t in texts]
        ids = self.tokenizer.encode(texts) if texts else []
        eos = self.tokenizer.eos_id
        tokens, lengths, largest = {}, {}, {}
        for split in SPLITS:
            docs = [d for d, s in zip(ids, split_of) if s == split]
            lens = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
            flat = np.fromiter((t for d in docs for t in (*d, eos)), dtype=np.int64, count=int(lens.sum()))
            largest[split] = int(flat.max()) if flat.size else -1
            if flat.size and (flat.min() < 0 or largest[split] > np.iinfo(self.dtype).max):
                raise ValueError(f"{batch.path}: the tokenizer produced id {largest[split]}, outside {self.dtype}")
            tokens[split], lengths[split] = flat.astype(self.dtype), lens
        return EncodedBatch(tokens, lengths, largest)


_WORKER_ENCODER: Optional[Encoder] = None  # one per worker process, set by the pool initializer


def _init_worker(tokenizer_path: str, eos_token: str, dtype: str, valid_fraction: float) -> None:
    global _WORKER_ENCODER
    tokenizer = load_tokenizer(tokenizer_path, eos_token=eos_token, threads=1)
    _WORKER_ENCODER = Encoder(tokenizer, np.dtype(dtype), valid_fraction)


def _encode_in_worker(batch: RawBatch) -> EncodedBatch:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER(batch)


def _ordered_map(pool, fn: Callable, items: Iterable, in_flight: int) -> Iterator:
    """``pool.imap`` with back-pressure: at most ``in_flight`` tasks queued, results in input order.

    (``Pool.imap`` consumes its input as fast as it can, which would read a whole terabyte file
    into the task queue while the workers fall behind.)
    """
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _PartWriter:
    """The train and valid shards of one domain in one part, with the split fallback rule.

    Each split's most recent document is held back (not yet written) so that, if the other split
    ends up empty, it can move there at ``close()`` without rewriting anything.
    """

    def __init__(self, out: Path, domain: str, name: str, dtype: np.dtype):
        self.writers = {s: ShardWriter(out / s / domain / f"{name}.bin", dtype) for s in SPLITS}
        self.held: dict[str, Optional[tuple[np.ndarray, int]]] = {s: None for s in SPLITS}

    def add(self, enc: EncodedBatch) -> None:
        for split in SPLITS:
            lengths = enc.lengths[split]
            if lengths.size == 0:
                continue
            tokens = enc.tokens[split]
            if self.held[split] is not None:
                held_tokens, held_max = self.held[split]
                self.writers[split].add(held_tokens, np.array([held_tokens.size]), held_max)
            cut = tokens.size - int(lengths[-1])
            if lengths.size > 1:
                self.writers[split].add(tokens[:cut], lengths[:-1], int(tokens[:cut].max()))
            last = tokens[cut:]
            self.held[split] = (last, int(last.max()))

    def close(self) -> dict[str, Optional[dict[str, Any]]]:
        counts = {s: self.writers[s].documents + (self.held[s] is not None) for s in SPLITS}
        for split, other in (("valid", "train"), ("train", "valid")):
            if counts[split] == 0 and counts[other] >= 2:
                self.held[split], self.held[other] = self.held[other], None
                counts[split], counts[other] = 1, counts[other] - 1
        for split in SPLITS:
            if self.held[split] is not None:
                held_tokens, held_max = self.held[split]
                self.writers[split].add(held_tokens, np.array([held_tokens.size]), held_max)
        return {s: self.writers[s].close() for s in SPLITS}


def _remove_part_files(out: Path, plan: dict[str, Any], name: str) -> None:
    (out / PARTS / f"{name}.json").unlink(missing_ok=True)
    for split in SPLITS:
        for domain in plan["domains"]:
            for suffix in (".bin", ".idx"):
                (out / split / domain / f"{name}{suffix}").unlink(missing_ok=True)


def read_plan(out: Path) -> dict[str, Any]:
    plan = _read_json(out / PLAN, "run `megareweight prepare --init` (or a full prepare) first")
    tok = out / plan["tokenizer"]["file"]
    if not tok.is_file() or sha256_file(tok) != plan["tokenizer"]["sha256"]:
        raise PrepareError(f"{tok}: missing or changed since `prepare --init` wrote {out / PLAN}")
    return plan


@contextlib.contextmanager
def _encoder_map(out: Path, plan: dict[str, Any], workers: int) -> Iterator[Callable[[Iterable[RawBatch]], Iterator[EncodedBatch]]]:
    """A function mapping raw batches to encoded ones, in order: in-process for one worker, else
    over a pool of ``workers`` single-threaded processes (fork where available)."""
    args = (str(out / plan["tokenizer"]["file"]), plan["tokenizer"]["eos_token"], plan["dtype"], plan["valid_fraction"])
    if workers == 1:
        encoder = Encoder(load_tokenizer(args[0], eos_token=args[1], threads=1), np.dtype(args[2]), args[3])
        yield lambda batches: map(encoder, batches)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=args)
    try:
        yield lambda batches: _ordered_map(pool, _encode_in_worker, batches, in_flight=2 * workers)
    finally:
        pool.terminate()
        pool.join()


def prepare_part(out_dir: PathLike, index: int = 0, count: int = 1, workers: int = 1,
                 progress: bool = True) -> dict[str, Any]:
    """Step 2: tokenize this job's files of every domain; returns (and writes) the part record."""
    check_workers(workers)
    out = Path(out_dir)
    plan = read_plan(out)
    if not 0 <= index < count:
        raise PrepareError(f"part {index} of {count}: need 0 <= index < count")
    name = part_name(index, count)
    _remove_part_files(out, plan, name)
    dtype = np.dtype(plan["dtype"])
    record: dict[str, Any] = {"part": index, "of": count, "plan_sha256": sha256_file(out / PLAN), "domains": {}}
    start, total = time.time(), 0
    with _encoder_map(out, plan, workers) as encode:
        for domain, paths in plan["domains"].items():
            mine = [p for i, p in enumerate(paths) if i % count == index]
            writer = _PartWriter(out, domain, name, dtype)
            bar = tqdm(desc=f"tokenize {domain}", unit="tok", unit_scale=True, disable=not progress, leave=False)
            for enc in encode(b for path in mine for b in iter_raw_batches(path)):
                writer.add(enc)
                bar.update(sum(int(enc.lengths[s].sum()) for s in SPLITS))
            bar.close()
            entries = writer.close()
            record["domains"][domain] = {"files": len(mine), **entries}
            total += sum(e["tokens"] for e in entries.values() if e)
    seconds = time.time() - start
    (out / PARTS).mkdir(exist_ok=True)
    write_json_atomic(out / PARTS / f"{name}.json", record)
    if progress:
        print(f"  part {name}: {total:,} tokens in {seconds:.1f} s ({total / max(seconds, 1e-9) / 1e6:.2f} M tokens/s, "
              f"{workers} worker{'s' if workers > 1 else ''})")
    record["seconds"], record["tokens"] = seconds, total
    return record


# --- step 3: merge ----------------------------------------------------------------------------------

def merge_parts(out_dir: PathLike, progress: bool = True) -> dict[str, Any]:
    """Step 3: check the parts against the plan and each other, write ``manifest.json``."""
    out = Path(out_dir)
    plan = read_plan(out)
    plan_sha = sha256_file(out / PLAN)
    files = sorted((out / PARTS).glob("*.json")) if (out / PARTS).is_dir() else []
    if not files:
        raise PrepareError(f"{out / PARTS}: no finished part (run `megareweight prepare --out {out} --shard I/K`)")
    parts = [_read_json(f, "") for f in files]
    counts = sorted({p["of"] for p in parts})
    if len(counts) > 1:
        raise PrepareError(f"{out / PARTS}: parts of different --shard counts ({', '.join(map(str, counts))}); "
                           "remove the stale ones")
    count = counts[0]
    missing = sorted(set(range(count)) - {p["part"] for p in parts})
    if missing:
        raise PrepareError(f"{out / PARTS}: {len(missing)} of {count} parts not finished, e.g. --shard {missing[0]}/{count}")
    stale = [f.name for f, p in zip(files, parts) if p["plan_sha256"] != plan_sha]
    if stale:
        raise PrepareError(f"{out / PARTS / stale[0]}: written for another {PLAN}; re-run that --shard job")
    parts.sort(key=lambda p: p["part"])
    manifest: dict[str, Any] = {k: plan[k] for k in ("format", "vocab_size", "dtype", "eos_id", "tokenizer",
                                                      "corpus", "valid_fraction")}
    manifest["domains"] = {}
    for domain in plan["domains"]:
        manifest["domains"][domain] = {}
        for split in SPLITS:
            shards = [p["domains"][domain][split] for p in parts if p["domains"][domain][split]]
            if not shards:
                raise PrepareError(f"domain {domain!r}: no document in the {split} split "
                                   f"({sum(p['domains'][domain]['files'] for p in parts)} file(s)); a split needs at "
                                   "least 2 non-empty documents")
            manifest["domains"][domain][split] = {
                "tokens": sum(s["tokens"] for s in shards),
                "documents": sum(s["documents"] for s in shards),
                "max_token_id": max(s["max_token_id"] for s in shards),
                "shards": shards,
            }
        if progress:
            entry = manifest["domains"][domain]
            print(f"  {domain:<12} train {entry['train']['tokens']:>12,} tokens  valid {entry['valid']['tokens']:>11,} "
                  f"tokens  {len(entry['train']['shards'])} shard(s)")
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def prepare(
    corpus_dir: PathLike | None,
    out_dir: PathLike,
    vocab_size: int = 4096,
    valid_fraction: float = 0.02,
    tokenizer_sample_mb: float = 2.0,
    domains: Sequence[str] | None = None,
    tokenizer_model: PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
    overwrite: bool = False,
    domain_specs: Sequence[str] = (),
    eos_token: Optional[str] = None,
) -> dict[str, Any]:
    """All three steps in one process: init, the single part 0 of 1, merge. Returns the manifest.

    ``tokenizer_model`` reuses an existing tokenizer (SentencePiece ``.model`` or Hugging Face
    ``tokenizer.json``) instead of training one.
    """
    check_workers(workers)  # before the tokenizer is trained and --out is taken
    init_preparation(out_dir, corpus_dir, domain_specs, domains, vocab_size, valid_fraction, tokenizer_sample_mb,
                     tokenizer_model, eos_token, seed, overwrite)
    prepare_part(out_dir, 0, 1, workers=workers, progress=progress)
    return merge_parts(out_dir, progress=progress)

"""Data-path benchmark: sampler tokens/s, sampler memory at 1e12 tokens, preparation tokens/s.

    python -m megareweight.data.bench --out experiments/data/bench_cpu.json [--prepare-corpus DIR]

1. **Sampler throughput** (tokens/s per process): three domains of two memory-mapped shards each
   (random token ids, documents of geometric length, mean 1000 tokens, written in the real shard
   format), ``micro_batch_size`` 8 at seq 2048 on rank 3 of 8, for ``packing`` concat and
   documents. The files were just written, so this is the warm-page-cache rate: what the sampler
   and numpy cost, not the disk.
2. **Memory at pretraining scale**: the issue's three domains of 2e12, 5e11 and 1e9 tokens as
   *sparse* files (no disk used; reading a hole returns zeros) opened by ``TokenShard.open``, the
   same memory-mapped path as training, so the permutation and plan path is measured as it runs.
   Reported: Python/numpy allocations (``tracemalloc`` peak) and the growth of anonymous resident
   memory (``RssAnon``: what the process itself allocated; pages of the mapped files are
   file-backed and excluded) over opening, building the sampler and 1000 batches; next to it, the
   bytes a materialised permutation (8 per window) would need.
3. **Preparation** (optional, ``--prepare-corpus``): ``prepare`` tokens/s with 1 and 2 worker
   processes on a corpus (tokenizer trained once, not timed), ``--repeats`` interleaved runs each,
   with the CPU seconds of the main process (decompression, writing) and of the workers (parsing,
   hashing, tokenizing): on a shared machine tokens/s depends on the background load, the CPU
   split shows what bounds the speed-up (Amdahl: the main process's share).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from megareweight.data.mixture import MixtureSampler
from megareweight.data.shards import ShardWriter, TokenShard, TokenStream

SEQ_LEN = 2048
MICRO_BATCH = 8
VOCAB = 32000


def _rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux); -1 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _write_random_shard(path: Path, tokens: int, rng: np.random.Generator) -> TokenShard:
    lengths = rng.geometric(1 / 1000, size=tokens // 500)
    lengths = lengths[np.cumsum(lengths) <= tokens]
    lengths[-1] += tokens - int(lengths.sum())
    ids = rng.integers(2, VOCAB, size=tokens, dtype=np.int64)
    ids[np.cumsum(lengths) - 1] = 1  # EOS ends every document
    writer = ShardWriter(path, np.dtype("<u2"))
    writer.add(ids, lengths, int(ids.max()))
    entry = writer.close()
    return TokenShard.open(path, np.dtype("<u2"), entry, vocab_size=VOCAB)


def sampler_throughput(work: Path, tokens_per_shard: int, batches: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    streams = {d: TokenStream(d, [_write_random_shard(work / f"{d}-{i}.bin", tokens_per_shard, rng) for i in range(2)],
                              VOCAB) for d in ("a", "b", "c")}
    result: dict[str, Any] = {"shards": 6, "tokens_per_shard": tokens_per_shard, "seq_len": SEQ_LEN,
                              "micro_batch_size": MICRO_BATCH, "rank": 3, "world_size": 8, "batches": batches}
    for packing in ("concat", "documents"):
        sampler = MixtureSampler(streams, [0.5, 0.3, 0.2], SEQ_LEN, MICRO_BATCH, rank=3, world_size=8, seed=0,
                                 packing=packing)
        for _ in range(20):
            sampler.next_batch()
        start = time.perf_counter()
        for _ in range(batches):
            sampler.next_batch()
        seconds = time.perf_counter() - start
        result[packing] = {"tokens_per_s": round(batches * MICRO_BATCH * SEQ_LEN / seconds),
                           "ms_per_batch": round(1000 * seconds / batches, 3)}
    return result


def sampler_memory(work: Path, batches: int) -> dict[str, Any]:
    sizes = {"web": 2 * 10**12, "code": 5 * 10**11, "math": 10**9}
    anon0 = _rss_anon_bytes()
    tracemalloc.start()
    start = time.perf_counter()
    streams = {}
    for name, tokens in sizes.items():
        bin_path = work / f"{name}.bin"
        with open(bin_path, "wb") as handle:
            handle.truncate(tokens * 2)  # sparse: no block is allocated
        np.array([0, tokens], dtype="<i8").tofile(bin_path.with_suffix(".idx"))
        streams[name] = TokenStream(name, [TokenShard.open(bin_path, np.dtype("<u2"), vocab_size=VOCAB)], VOCAB)
    sampler = MixtureSampler(streams, [0.6, 0.3, 0.1], SEQ_LEN, MICRO_BATCH, rank=3, world_size=8, seed=0)
    sampler.next_batch()
    first_batch = time.perf_counter() - start
    for _ in range(batches - 1):
        sampler.next_batch()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    windows = int(sampler.windows.sum())
    return {
        "tokens": sizes, "windows": windows, "batches": batches,
        "open_and_first_batch_s": round(first_batch, 4),
        "tracemalloc_peak_bytes": peak,
        "rss_anon_growth_bytes": _rss_anon_bytes() - anon0 if anon0 >= 0 else None,
        "materialised_permutation_bytes": 8 * windows,
    }


def prepare_throughput(corpus: Path, work: Path, repeats: int) -> dict[str, Any]:
    from megareweight.data.prepare import init_preparation, prepare_part

    base = work / "tok"
    init_preparation(base, corpus, vocab_size=4096)
    tok = base / "tokenizer.model"
    runs: dict[str, list[dict[str, float]]] = {}
    tokens = 0
    for _ in range(repeats):
        for workers in (1, 2):  # interleaved, so both see the same background load
            out = work / f"w{workers}"
            init_preparation(out, corpus, tokenizer_model=tok, overwrite=True)
            main0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            record = prepare_part(out, workers=workers, progress=False)
            main1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            tokens = record["tokens"]
            runs.setdefault(str(workers), []).append({
                "tokens_per_s": tokens / record["seconds"],
                "main_cpu_s": _cpu(main1) - _cpu(main0),
                "worker_cpu_s": _cpu(kids1) - _cpu(kids0),
            })
    return {"corpus": str(corpus), "tokens": tokens, "repeats": repeats, "workers": {
        w: {"tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in rs)),
            "tokens_per_s_runs": [round(r["tokens_per_s"]) for r in rs],
            "main_cpu_s_median": round(statistics.median(r["main_cpu_s"] for r in rs), 2),
            "worker_cpu_s_median": round(statistics.median(r["worker_cpu_s"] for r in rs), 2)}
        for w, rs in runs.items()}}


def _cpu(usage: "resource.struct_rusage") -> float:
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--tokens-per-shard", type=int, default=25_000_000)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--prepare-corpus", default=None, help="also time `prepare` with 1 and 2 workers on this corpus")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="mr-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        }
        (work / "sparse").mkdir(exist_ok=True)
        result["sampler_memory"] = sampler_memory(work / "sparse", args.batches)  # first: a clean baseline
        result["sampler_throughput"] = sampler_throughput(work, args.tokens_per_shard, args.batches)
        if args.prepare_corpus:
            result["prepare"] = prepare_throughput(Path(args.prepare_corpus), work / "prepare", args.repeats)
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

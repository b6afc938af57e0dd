"""What one short GPU window on an air-gapped node needs, prepared where PyPI is reachable.

    python -m megareweight.gpu_bundle --out .gpu_bundle --corpus ../shared/corpus     # `make gpu-bundle`

Why: a cluster node (and the project's lent GPU machine) often has no package index at all, but a
preinstalled CUDA PyTorch, Triton and transformers (NGC containers bring their own). The GPU check
(``launch/gpu_check.sh``) must not replace that torch; it installs only what is missing, offline,
from the wheels written here, and benchmarks on data prepared here. Writes:

* ``OUT/wheels/``: CPython 3.12 manylinux x86-64 wheels, each at the version ``constraints.txt``
  locks, without dependencies (the node's own numpy, torch, ... stay): DeepSpeed (built here as a
  pure-Python wheel: PyPI has only its source; its CPU/GPU ops are JIT-compiled on the node) and
  its missing requirements (hjson, pydantic and its parts), Liger-Kernel and Cut Cross-Entropy
  (benchmark peers). ``WHEELS`` lists them; a package the node already has is not carried.
* ``OUT/prepared32k/``: a corpus prepared with a 32,000-piece tokenizer (the vocabulary the 125m and
  1.4b configs are meant for; the default 4096 would make "1.4b" a different model). The tokenizer
  is trained on the whole corpus; the shards hold a sample of ``--sample-mb`` MB of text per domain
  (a throughput benchmark repeats data; its content does not change the speed).
* ``OUT/bundle.json``: what is inside, with versions and sizes.

The bundle must fit the device tool's 64 MiB per call together with the repository: checked.
"""
from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from megareweight.lockfile import canonical, read_lock

REPO = Path(__file__).resolve().parents[1]
#: Packages a preinstalled CUDA PyTorch image was seen to lack (KINDS.md of the lent machines):
#: DeepSpeed, its requirements hjson and pydantic (with pydantic-core, annotated-types,
#: typing-inspection), and the two benchmark peers.
WHEELS = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "liger-kernel", "cut-cross-entropy")
#: Built from source here (no wheel on PyPI).
BUILD_FROM_SOURCE = {"deepspeed"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
VOCAB = 32000
MAX_BUNDLE_MIB = 48  # of the device tool's 64 MiB per call; the repository needs the rest


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def fetch_wheels(out: Path, pins: dict[str, str]) -> dict[str, str]:
    """One wheel per package in ``WHEELS`` at its locked version, for CPython 3.12 on x86-64."""
    out.mkdir(parents=True, exist_ok=True)
    versions = {}
    for name in WHEELS:
        version = pins.get(canonical(name))
        if version is None:
            raise SystemExit(f"gpu_bundle: {name} is not in constraints.txt; run `make lock` with the bench extras")
        spec = f"{name}=={version}"
        if name in BUILD_FROM_SOURCE:
            # Pure Python (DS_BUILD_OPS=0 is DeepSpeed's default); this venv's torch satisfies its setup.py.
            pip("wheel", "-q", "--no-deps", "--no-build-isolation", "--no-binary", name, "-w", str(out), spec)
        else:
            platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
            pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                "--implementation", "cp", *platform_args, "-d", str(out), spec)
        versions[name] = version
    return versions


def corpus_sample(corpus: Path, out: Path, sample_mb: float) -> None:
    """The first ``sample_mb`` MB of documents of every ``<domain>.jsonl.xz`` in ``corpus``."""
    out.mkdir(parents=True, exist_ok=True)
    limit = int(sample_mb * 1e6)
    files = sorted(corpus.glob("*.jsonl.xz"))
    if not files:
        raise SystemExit(f"gpu_bundle: no *.jsonl.xz domain files in {corpus}")
    for path in files:
        kept = 0
        with lzma.open(path, "rt", encoding="utf-8") as src, open(out / path.name.removesuffix(".xz"), "w") as dst:
            for line in src:
                if kept >= limit:
                    break
                dst.write(line)
                kept += len(line.encode())


def prepare_corpus(corpus: Path, out: Path, sample_mb: float) -> None:
    """Tokenizer (``VOCAB`` pieces) from the whole corpus, shards from a sample of it."""
    from megareweight.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full"
        prepare(corpus, full, vocab_size=VOCAB, tokenizer_sample_mb=64.0, progress=False, workers=2)
        sample = Path(tmp) / "sample"
        corpus_sample(corpus, sample, sample_mb)
        if out.exists():
            shutil.rmtree(out)
        prepare(sample, out, tokenizer_model=full / "tokenizer.model", progress=False)


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megareweight.gpu_bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu_bundle")
    parser.add_argument("--corpus", type=Path, required=True, help="the six-domain corpus (<domain>.jsonl.xz)")
    parser.add_argument("--sample-mb", type=float, default=2.0, help="text per domain in the prepared shards")
    args = parser.parse_args(argv)
    pins = read_lock(REPO / "constraints.txt")
    wheels = args.out / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    versions = fetch_wheels(wheels, pins)
    prepare_corpus(args.corpus, args.out / "prepared32k", args.sample_mb)
    total = size_mib(args.out)
    record = {"wheels": sorted(p.name for p in wheels.glob("*.whl")), "versions": versions, "vocab_size": VOCAB,
              "sample_mb_per_domain": args.sample_mb, "size_mib": round(total, 1),
              "command": "python -m megareweight.gpu_bundle " + " ".join(argv if argv is not None else sys.argv[1:])}
    (args.out / "bundle.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"gpu_bundle: {args.out} ({total:.1f} MiB): {len(record['wheels'])} wheels, prepared32k")
    if total > MAX_BUNDLE_MIB:
        print(f"gpu_bundle: error: {total:.1f} MiB > {MAX_BUNDLE_MIB} MiB; lower --sample-mb", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Packaging for megareweight: the library + CLI (`megareweight`), the loss kernels included.

One import name, `megareweight`. The loss kernels live in the repository's top-level `kernels/`
folder (the design's layout) but are imported as `megareweight.kernels` through the link
`megareweight/kernels -> ../kernels`: the name `kernels` belongs to Hugging Face's package, which
transformers requires, and two packages with one import name shadow each other. `kernels/` has no
`__init__.py`, so from the repository root `import kernels` still finds Hugging Face's.

torch is a range (>= 2.11, the oldest tested), not a pin: a user's or a container's CUDA torch
must stay. Without any torch, pip takes the newest CUDA build (several GB); the project's own CPU
venv (`make install`) installs `torch==2.13.0` first, and constraints.txt locks it there.
"""
import sys

from setuptools import find_namespace_packages, setup

LINUX = sys.platform.startswith("linux")

install_requires = [
    # A range, never a pin: a user's (or a container's) CUDA torch must not be replaced. 2.11 is
    # the oldest tested (`make test-oldest`: the kernel tests with torch 2.11 + Triton 3.6); the
    # project's own CPU venv pins 2.13.0 through constraints.txt. Older: a clear error at import.
    "torch>=2.11,<3",
    "numpy>=1.26,<3",
    "sentencepiece>=0.2,<0.3",
    "tokenizers>=0.15,<1",  # Hugging Face tokenizer.json (prepare --tokenizer)
    "zstandard>=0.22,<1",  # *.jsonl.zst corpora
    "pyarrow>=15,<27",  # *.parquet corpora
    "pyyaml>=6,<7",
    "tqdm>=4.66,<5",
    "xxhash>=3,<5",  # checkpoint checksums (xxh3_128)
    "wandb>=0.19,<0.40",
    "matplotlib>=3.8,<4",
    "scipy>=1.11,<2",
    # 0.19.8: every ZeRO optimizer skips a step whose gradient norm is not finite (earlier ZeRO-3 only in fp16)
    "deepspeed>=0.19.8,<0.20",
]
if LINUX:
    install_requires.append("triton>=3.6,<3.10")  # 3.6: what torch 2.11 ships with (`make test-oldest`)

setup(
    name="megareweight",
    version="0.1.0",
    description="LLM pretraining with dynamic loss-based sample reweighting and scale-aware domain mixing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Namespace finder: `megareweight.kernels` (the linked folder) has no __init__.py by design.
    packages=find_namespace_packages(include=["megareweight", "megareweight.*"],
                                     exclude=["*.__pycache__", "megareweight.kernels.results*"]),
    package_data={"megareweight": ["configs/*.yaml"]},
    install_requires=install_requires,
    extras_require={
        "dev": ["pytest>=8,<9", "hypothesis>=6.100,<7", "pytest-timeout>=2.3,<3"],
        # liger < 0.8.2 scales every row of a reduction="none" backward by grad_output[0].
        "bench": ["liger-kernel>=0.8.2,<0.9", "cut-cross-entropy>=25.1,<26"],
        "hf": ["transformers>=4.44,<6", "safetensors>=0.4,<1"],
    },
    entry_points={"console_scripts": ["megareweight=megareweight.cli:main"]},
)

"""Shared fixtures: a small multi-domain corpus built in the test session (no ../shared needed)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: needs PyPI/Debian downloads (MEGAREWEIGHT_NETWORK_TESTS=1)")
    config.addinivalue_line("markers", "shared: uses ../shared/corpus when present (skipped otherwise)")


def _words(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_corpus(root: Path, docs_per_domain: int = 40, seed: int = 0) -> Path:
    """Three synthetic domains with distinct statistics (prose, code, numbers), as JSONL."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    prose_vocab = "the a of and to in is was he she it that for on with as his her they at by".split()
    prose_vocab += "river mountain winter letter garden window silver morning evening story".split()
    domains = {
        "prose": lambda: ". ".join(_words(rng, prose_vocab, rng.randint(5, 15)).capitalize() for _ in range(rng.randint(5, 20))),
        "code": lambda: "\n".join(
            f"def f{rng.randint(0, 99)}(x, y):\n    if x > {rng.randint(0, 9)}:\n\treturn x * y + {rng.randint(0, 9)}\n    return  y"
            for _ in range(rng.randint(2, 8))
        ),
        "numbers": lambda: " ".join(f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1998)};" for _ in range(rng.randint(5, 30))),
    }
    for name, make in domains.items():
        with open(root / f"{name}.jsonl", "w") as handle:
            for _ in range(docs_per_domain):
                handle.write(json.dumps({"text": make(), "source": "synthetic"}) + "\n")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def prepared_dir(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megareweight.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(corpus_dir, out, vocab_size=320, valid_fraction=0.1, progress=False)
    return out


def tiny_config(prepared: Path, **sections) -> "ExperimentConfig":  # noqa: F821
    """A tiny-model config for fast training tests; ``sections`` override per section."""
    from megareweight.config import config_from_dict

    raw = {
        "model": {"size": "tiny"},
        "data": {"prepared": str(prepared), "seq_len": 32, "micro_batch_size": 4, "eval_sequences": 8},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "train": {"max_steps": 10, "eval_interval": 5},
        "loss": {"impl": "chunked"},
        "wandb": {"mode": "disabled"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)

"""SentencePiece BPE tokenizer trained on a balanced sample of every domain.

Settings chosen for exact round trips of code and prose: identity normalisation, no collapsing of
whitespace, whitespace-only pieces allowed (indentation), newline and tab as their own symbols,
byte fallback for anything unseen (so no ``<unk>`` ever), digits split one by one.
"""
from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import sentencepiece as spm

from megareweight.data.corpus import iter_documents

UNK_ID = 0
EOS_ID = 1


class Tokenizer:
    """Thin wrapper over a SentencePiece model: batch encode/decode and the ids we rely on."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def balanced_sample(
    domain_files: Mapping[str, Path], bytes_per_domain: int, seed: int = 0
) -> list[str]:
    """Up to ``bytes_per_domain`` of text from each domain, so no domain dominates the vocabulary."""
    rng = random.Random(seed)
    sample: list[str] = []
    for domain in sorted(domain_files):
        docs = list(iter_documents(domain_files[domain]))
        rng.shuffle(docs)
        taken = 0
        for doc in docs:
            if taken >= bytes_per_domain:
                break
            sample.append(doc)
            taken += len(doc.encode("utf-8"))
    return sample


def _training_lines(docs: Iterable[str], max_len: int) -> Iterator[str]:
    # SentencePiece trains on "sentences"; lines of a document are a good unit for code and prose.
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                yield line[:max_len]


def train_tokenizer(
    docs: Sequence[str], out_path: str | Path, vocab_size: int, num_threads: int = 2, seed: int = 0
) -> Tokenizer:
    """Train a BPE model on ``docs`` and write it to ``out_path`` (a ``.model`` file)."""
    spm.set_random_generator_seed(seed + 1)  # sentencepiece treats 0 as "unseeded"
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte-fallback pieces + specials), got {vocab_size}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    max_len = 8192
    try:
        _train_sentencepiece(docs, proto, vocab_size, num_threads, max_len)
    except RuntimeError as exc:
        match = re.search(r"set it to a value <= (\d+)", str(exc))
        if match:
            raise ValueError(
                f"vocab_size {vocab_size} is too large for this corpus: its sample supports at most "
                f"{match.group(1)} pieces; lower --vocab-size"
            ) from None
        raise
    out_path.write_bytes(proto.getvalue())
    return Tokenizer(out_path)


def _train_sentencepiece(docs: Sequence[str], proto: io.BytesIO, vocab_size: int, num_threads: int, max_len: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(docs, max_len),
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=["\n", "\t"],
        character_coverage=0.9995,
        unk_id=UNK_ID,
        eos_id=EOS_ID,
        bos_id=-1,
        pad_id=-1,
        num_threads=num_threads,
        max_sentence_length=max_len * 4,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        minloglevel=2,
    )

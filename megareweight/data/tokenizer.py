"""Tokenizers: one small protocol over SentencePiece models and Hugging Face ``tokenizer.json`` files.

Everything that tokenizes (``prepare``, ``eval``, the tokenizer copied by ``export``) goes through
:func:`load_tokenizer` and the :class:`Tokenizer` protocol, so a run can use the tokenizer a user
already has (LLaMA-3, GPT-NeoX, Mistral ... ship ``tokenizer.json``) as well as one trained here.

Documents are encoded *without* special tokens (no BOS; a Hugging Face post-processor that would add
one is bypassed) and each is followed by the tokenizer's end-of-document id when written to shards.

Training (SentencePiece BPE on a balanced sample of every domain) uses settings chosen for exact
round trips of code and prose: identity normalisation, no collapsing of whitespace, whitespace-only
pieces allowed (indentation), newline and tab as their own symbols, byte fallback for anything
unseen (so no ``<unk>`` ever), digits split one by one.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

from megareweight.data.corpus import PathLike, domain_files_as_lists, iter_documents

UNK_ID = 0
EOS_ID = 1
#: End-of-document tokens of common Hugging Face tokenizers, tried in this order when neither
#: ``--eos-token`` nor a ``tokenizer_config.json`` beside the file names one.
HF_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|end|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data path needs from a tokenizer."""

    path: Path
    kind: str  # "sentencepiece" | "huggingface"

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def eos_token(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def special_tokens(self) -> dict[str, Optional[tuple[str, int]]]: ...


class SentencePieceTokenizer:
    """A SentencePiece ``.model``. ``threads`` = 0 lets SentencePiece use every core."""

    kind = "sentencepiece"

    def __init__(self, model_path: PathLike, threads: int = 0):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{self.path}: not a SentencePiece model ({str(exc).splitlines()[0]})") from None
        self.threads = threads
        if self._sp.eos_id() < 0:
            raise ValueError(f"{self.path}: the SentencePiece model has no end-of-sentence piece (eos_id = -1)")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def eos_token(self) -> str:
        return self._sp.id_to_piece(self.eos_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self.threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def special_tokens(self) -> dict[str, Optional[tuple[str, int]]]:
        """``{"bos", "eos", "pad"}`` -> (piece, id), or None where the model defines none (id -1).

        What an export must declare (``config.json``): ``eos`` is the end-of-document token every
        document of the shards ends with; a model trained here has no BOS or padding piece.
        """
        ids = {"bos": self._sp.bos_id(), "eos": self.eos_id, "pad": self._sp.pad_id()}
        return {name: (self._sp.id_to_piece(i), i) if i >= 0 else None for name, i in ids.items()}


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package).

    The end-of-document token: ``eos_token`` if given, else ``eos_token`` of a
    ``tokenizer_config.json`` in the same directory, else the first of :data:`HF_EOS_CANDIDATES`
    in the vocabulary. ``vocab_size`` counts added tokens and covers the largest id.
    """

    kind = "huggingface"

    def __init__(self, path: PathLike, eos_token: Optional[str] = None, threads: int = 0):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise ValueError(f"{self.path}: not a Hugging Face tokenizer.json ({str(exc).splitlines()[0]})") from None
        self.threads = threads
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        token = eos_token or self._configured_eos() or next((c for c in HF_EOS_CANDIDATES if c in vocab), None)
        if token is None:
            raise ValueError(f"{self.path}: cannot tell which token ends a document (none of "
                             f"{', '.join(HF_EOS_CANDIDATES)} is in the vocabulary); pass --eos-token")
        if token not in vocab:
            raise ValueError(f"{self.path}: end-of-document token {token!r} is not in the vocabulary")
        self._eos_token, self._eos_id = token, int(vocab[token])

    def _configured_eos(self) -> Optional[str]:
        return self._configured("eos_token")

    def _configured(self, key: str) -> Optional[str]:
        """``key`` (e.g. ``eos_token``) of a ``tokenizer_config.json`` beside the file, if any."""
        config = self.path.with_name("tokenizer_config.json")
        if not config.is_file():
            return None
        try:
            value = json.loads(config.read_text()).get(key)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return None
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._eos_token

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self.threads == 1:
            # The Rust thread pool reads this variable; one thread per worker process is what
            # `prepare --workers N` promises (and what keeps fork-based workers safe).
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_tokens(self) -> dict[str, Optional[tuple[str, int]]]:
        """``{"bos", "eos", "pad"}`` -> (token, id), or None where unknown.

        ``eos`` is the end-of-document token the shards were written with. A ``tokenizer.json``
        does not say which token is BOS or padding; ``bos_token``/``pad_token`` of a
        ``tokenizer_config.json`` beside it do (only when the token is in the vocabulary).
        """
        vocab = self._tok.get_vocab(with_added_tokens=True)
        found: dict[str, Optional[tuple[str, int]]] = {"eos": (self._eos_token, self._eos_id)}
        for name in ("bos", "pad"):
            token = self._configured(f"{name}_token")
            found[name] = (token, int(vocab[token])) if token in vocab else None
        return found


def tokenizer_kind(path: PathLike) -> str:
    """``huggingface`` for ``*.json``, ``sentencepiece`` otherwise (``.model``)."""
    return "huggingface" if str(path).endswith(".json") else "sentencepiece"


def load_tokenizer(path: PathLike, eos_token: Optional[str] = None, threads: int = 0) -> Tokenizer:
    """The tokenizer stored at ``path``: a SentencePiece ``.model`` or a Hugging Face ``.json``."""
    if tokenizer_kind(path) == "huggingface":
        return HuggingFaceTokenizer(path, eos_token=eos_token, threads=threads)
    if eos_token is not None:
        tok = SentencePieceTokenizer(path, threads=threads)
        if eos_token != tok.eos_token:
            raise ValueError(f"--eos-token {eos_token!r}: a SentencePiece model's end token is fixed ({tok.eos_token!r})")
        return tok
    return SentencePieceTokenizer(path, threads=threads)


# --- training -------------------------------------------------------------------------------------

def balanced_sample(
    domain_files: Mapping[str, PathLike | Sequence[PathLike]], bytes_per_domain: int, seed: int = 0, scan_factor: int = 8
) -> list[str]:
    """Up to ``bytes_per_domain`` of text from each domain, so no domain dominates the vocabulary.

    Reads at most ``scan_factor * bytes_per_domain`` of each domain (its files in a seeded random
    order), shuffles what it read and keeps the first ``bytes_per_domain``: a terabyte domain costs
    no more than a small one. A single-file domain smaller than the scan limit gives exactly the
    sample of earlier versions (all documents shuffled with the same generator).
    """
    rng = random.Random(seed)
    sample: list[str] = []
    for domain, files in sorted(domain_files_as_lists(domain_files).items()):
        files = list(files)
        rng.shuffle(files)
        docs: list[str] = []
        scanned = 0
        for doc in iter_documents(files):
            docs.append(doc)
            scanned += len(doc)
            if scanned >= scan_factor * bytes_per_domain:
                break
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
    docs: Sequence[str], out_path: PathLike, vocab_size: int, num_threads: int = 2, seed: int = 0
) -> SentencePieceTokenizer:
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
        # SentencePiece's own advice ("decrease character_coverage with --character_coverage")
        # names an option megareweight does not have; the floor depends on the corpus (how many
        # characters cover 99.95 % of it), so it is known only once SentencePiece has counted them.
        match = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if match:
            raise ValueError(
                f"vocab_size {vocab_size} is too small for this corpus: it needs at least {match.group(1)} pieces "
                "(256 byte-fallback pieces, the special pieces and the characters that cover 99.95 % of its "
                f"sample); raise --vocab-size to >= {match.group(1)}"
            ) from None
        raise
    out_path.write_bytes(proto.getvalue())
    return SentencePieceTokenizer(out_path)


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

"""``megareweight eval``: per-domain loss and perplexity of a checkpoint on any JSONL text.

``--data`` is one ``<domain>.jsonl[.xz|.gz]`` file or a directory of them (the corpus format), so
held-out text a user brings is scored the same way as the built-in domains: documents are
tokenized with the run's tokenizer, joined with EOS, cut into non-overlapping windows of the
training sequence length, and every token is scored once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from megareweight.checkpoint_io import load_model, run_tokenizer
from megareweight.data.corpus import SUFFIXES, iter_documents, list_domains
from megareweight.data.tokenizer import Tokenizer


def _data_files(data: Path) -> dict[str, Path]:
    if data.is_dir():
        return list_domains(data)
    for suffix in SUFFIXES:
        if data.name.endswith(suffix) and data.is_file():
            return {data.name[: -len(suffix)]: data}
    raise FileNotFoundError(f"--data {data}: not a <domain>.jsonl[.xz|.gz] file or a directory of them")


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    n = (tokens.size - 1) // seq_len
    if n <= 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    starts = np.arange(n) * seq_len
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    tokenizer: Optional[str | Path] = None,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    max_tokens: int = 1_000_000,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """{domain: {"loss", "perplexity", "tokens"}} plus an ``"average"`` row over domains."""
    model, state = load_model(checkpoint)
    tokenizer = run_tokenizer(checkpoint, state, tokenizer)
    tok = Tokenizer(tokenizer)
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} pieces, the model {model.args.vocab_size}")
    seq_len = seq_len or int(state["config"]["data"]["seq_len"])
    results: dict[str, dict[str, float]] = {}
    for domain, path in _data_files(Path(data)).items():
        ids: list[int] = []
        for text in iter_documents(path):
            ids.extend(tok.encode([text])[0] + [tok.eos_id])
            if len(ids) > max_tokens:
                break
        windows = _windows(np.asarray(ids[: max_tokens + 1]), seq_len)
        if len(windows) == 0:
            raise ValueError(f"{path}: {len(ids)} tokens, fewer than one window of {seq_len + 1}; nothing to score")
        total, count = 0.0, 0
        for i in tqdm(range(0, len(windows), batch_size), desc=f"eval {domain}", disable=not progress, leave=False):
            batch = torch.from_numpy(windows[i : i + batch_size])
            logits = model.logits(batch[:, :-1]).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
        mean = total / count
        results[domain] = {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
    losses = [r["loss"] for r in results.values()]
    results["average"] = {"loss": float(np.mean(losses)), "perplexity": float(np.exp(np.mean(losses))),
                          "tokens": sum(r["tokens"] for r in results.values())}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'domain':<16} {'loss':>8} {'ppl':>10} {'tokens':>10}"]
    for domain, r in results.items():
        lines.append(f"{domain:<16} {r['loss']:>8.4f} {r['perplexity']:>10.2f} {int(r['tokens']):>10,}")
    return "\n".join(lines)

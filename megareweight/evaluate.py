"""``megareweight eval``: per-domain loss and perplexity of a checkpoint on any JSONL text.

``--data`` is one corpus file (``<domain>.jsonl[.gz|.xz|.zst]`` or ``<domain>.parquet``) or a corpus
directory (see :mod:`megareweight.data.corpus`), so
held-out text a user brings is scored the same way as the built-in domains: documents are
tokenized with the run's tokenizer, joined with EOS, cut into non-overlapping windows of the
training sequence length, and every token is scored once. A run trained with
``data.packing: documents`` is scored the same way it was trained: attention stays inside each
document and the label that would cross into the next document is not scored.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from megareweight.checkpoint_io import load_model, resolve_checkpoint, run_tokenizer
from megareweight.data.corpus import SUFFIXES, corpus_suffix, iter_documents, list_domains
from megareweight.data.mixture import IGNORE_INDEX, validation_batches
from megareweight.data.shards import TokenShard
from megareweight.data.tokenizer import load_tokenizer


def _data_files(data: Path) -> dict[str, list[Path]]:
    if data.is_dir():
        return list_domains(data)
    suffix = corpus_suffix(data)
    if suffix and data.is_file():
        return {data.name[: -len(suffix)]: [data]}
    raise FileNotFoundError(f"--data {data}: not a corpus file ({', '.join(SUFFIXES)}) or a directory of them")


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
    """{domain: {"loss", "perplexity", "tokens"}}, an ``"average"`` row over domains and a
    ``"checkpoint"`` entry {"path", "step"}: which checkpoint was scored (a run directory's newest
    intact one, which is not the newest when that one is damaged and skipped with a warning)."""
    ckpt = resolve_checkpoint(checkpoint)
    model, state = load_model(ckpt)
    tokenizer, eos_token = run_tokenizer(ckpt, state, tokenizer)
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    if tok.vocab_size != model.args.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} pieces, the model {model.args.vocab_size}")
    seq_len = seq_len or int(state["config"]["data"]["seq_len"])
    packing = state["config"]["data"].get("packing", "concat")
    results: dict[str, dict[str, float]] = {}
    scored = {"path": str(ckpt), "step": int(state["step"])}
    for domain, path in _data_files(Path(data)).items():
        ids: list[int] = []
        ends = [0]
        for text in iter_documents(path):
            ids.extend(tok.encode([text])[0] + [tok.eos_id])
            ends.append(len(ids))
            if len(ids) > max_tokens:
                break
        tokens = np.asarray(ids[: max_tokens + 1], dtype=np.int64)
        stream = TokenShard(Path(domain), tokens, np.minimum(np.asarray(ends), tokens.size))  # in memory
        n = (tokens.size - 1) // seq_len
        if n <= 0:  # refused: a loss over no tokens would be NaN, printed as if it were a result
            capped = f" (--max-tokens {max_tokens})" if len(ids) > tokens.size else ""
            raise ValueError(f"{path[0] if len(path) == 1 else domain}: {tokens.size} tokens{capped}, fewer than one "
                             f"window of {seq_len + 1} (--seq-len + 1); nothing to score")
        total, count = 0.0, 0
        batches = validation_batches(stream, seq_len, batch_size, n, packing=packing)  # every window, in order
        for batch in tqdm(batches, total=math.ceil(n / batch_size), desc=f"eval {domain}", disable=not progress, leave=False):
            logits = model.logits(batch["input_ids"], batch.get("segment_ids")).float()
            labels = batch["labels"].reshape(-1)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum", ignore_index=IGNORE_INDEX)
            total += float(loss)
            count += int((labels != IGNORE_INDEX).sum())
        if count == 0:  # packing: documents and only one-token (empty) documents: every label is masked
            raise ValueError(f"{path[0] if len(path) == 1 else domain}: no token to score in {n} window(s): "
                             "its documents are empty (the run packs by document, so no label crosses into the next)")
        mean = total / count
        results[domain] = {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
    losses = [r["loss"] for r in results.values()]
    results["average"] = {"loss": float(np.mean(losses)), "perplexity": float(np.exp(np.mean(losses))),
                          "tokens": sum(r["tokens"] for r in results.values())}
    results["checkpoint"] = scored  # type: ignore[assignment]
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = []
    if "checkpoint" in results:
        lines.append(f"checkpoint {results['checkpoint']['path']} (step {results['checkpoint']['step']})")
    lines.append(f"{'domain':<16} {'loss':>8} {'ppl':>10} {'tokens':>10}")
    for domain, r in results.items():
        if domain == "checkpoint":
            continue
        lines.append(f"{domain:<16} {r['loss']:>8.4f} {r['perplexity']:>10.2f} {int(r['tokens']):>10,}")
    return "\n".join(lines)

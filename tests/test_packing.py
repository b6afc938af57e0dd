"""Document-aware packing: segment ids from the offsets, labels at boundaries, attention that does not
cross documents (against each document run alone), per-document samples and weights in the loss."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from megareweight.kernels.weighted_ce import get_loss_impl
from megareweight.kernels.weighted_ce.reference import linear_weighted_ce as reference_ce
from megareweight.config import ConfigError
from megareweight.evaluate import evaluate_checkpoint
from megareweight.data.mixture import IGNORE_INDEX, MixtureSampler, validation_batches, window_batch
from megareweight.data.shards import PreparedData, ShardWriter, TokenShard
from megareweight.model import build_model, model_args
from megareweight.train.engine import PlainEngine
from megareweight.train.loop import train
from megareweight.train.objective import ReweightedLM, per_sample_domains
from tests.conftest import tiny_config

EOS = 1


def _shard(tmp_path, docs: list[list[int]]) -> TokenShard:
    writer = ShardWriter(tmp_path / "s.bin", np.dtype("<u2"))
    flat = np.array([t for d in docs for t in d + [EOS]])
    writer.add(flat, np.array([len(d) + 1 for d in docs]), int(flat.max()))
    entry = writer.close()
    return TokenShard.open(tmp_path / "s.bin", np.dtype("<u2"), entry, vocab_size=100)


def test_segment_ids_come_from_the_offsets_and_boundary_labels_are_ignored(tmp_path):
    shard = _shard(tmp_path, [[5, 6], [7], [8, 9, 10, 11], [12], [EOS, 13]])  # EOS inside a document
    assert shard.segment_ids(1, 6).tolist() == [0, 0, 1, 1, 2, 2]
    batch = window_batch([np.asarray(shard.tokens[1:7], dtype=np.int64)], [shard.segment_ids(1, 6)])
    assert batch["input_ids"].tolist() == [[6, EOS, 7, EOS, 8]]
    assert batch["labels"].tolist() == [[EOS, IGNORE_INDEX, EOS, IGNORE_INDEX, 9]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1, 2]]
    offsets = np.asarray(shard.offsets)
    for start in range(shard.num_tokens):
        for length in range(1, shard.num_tokens - start + 1):
            doc = np.searchsorted(offsets, np.arange(start, start + length), side="right") - 1
            assert shard.segment_ids(start, length).tolist() == (doc - doc[0]).tolist()


def test_sampler_packs_documents(prepared_dir):
    streams = PreparedData.open(prepared_dir).streams("train")
    concat = MixtureSampler(streams, [1, 1, 1], 64, 8, seed=3).next_batch()
    docs = MixtureSampler(streams, [1, 1, 1], 64, 8, seed=3, packing="documents").next_batch()
    assert torch.equal(concat["input_ids"], docs["input_ids"])  # same windows, same order
    seg = docs["segment_ids"]
    assert seg.shape == (8, 64) and torch.all(seg[:, 0] == 0) and torch.all(seg.diff(dim=1) >= 0)
    assert int(seg.max()) >= 1  # the corpus' documents are shorter than 64 tokens now and then
    ignored = docs["labels"] == IGNORE_INDEX
    assert torch.equal(torch.where(ignored, concat["labels"], docs["labels"]), concat["labels"])
    # a label is ignored exactly when its input is the EOS that ends a document
    assert torch.all(docs["input_ids"][ignored] == EOS)
    assert torch.equal(ignored[:, :-1], seg.diff(dim=1) != 0)
    valid = next(validation_batches(PreparedData.open(prepared_dir).stream("valid", "prose"), 64, 4, 8,
                                    packing="documents"))
    assert set(valid) == {"input_ids", "labels", "segment_ids"}


def _packed_window(rng, lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(rng.integers(2, vocab, size=sum(lengths)))
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return ids, seg


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_attention_matches_each_document_run_alone(backend, kv_heads):
    torch.manual_seed(0)
    model = build_model(model_args("tiny", vocab_size=320, n_kv_heads=kv_heads)).eval()
    model.document_attention = backend
    rng = np.random.default_rng(0)
    rows = [_packed_window(rng, lengths, 320) for lengths in ([5, 9, 1, 17], [32])]
    ids, seg = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it is unfused on CPU
        packed = model(ids, seg)
        for b in range(2):
            for s in seg[b].unique().tolist():
                cols = (seg[b] == s).nonzero().flatten()
                alone = model(ids[b : b + 1, cols])[0]
                torch.testing.assert_close(packed[b, cols], alone, atol=2e-5, rtol=1e-4)
        unmasked = model(ids)
    assert not torch.allclose(unmasked[0, 5:14], packed[0, 5:14], atol=1e-3)  # the mask matters
    torch.testing.assert_close(unmasked[1], packed[1], atol=2e-5, rtol=1e-4)  # one document: no change


def _labels(ids: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = 7
    labels[:, :-1][seg.diff(dim=1) != 0] = IGNORE_INDEX
    return labels


def test_per_document_losses_and_weights():
    torch.manual_seed(0)
    b, t, d, v, segments = 2, 12, 8, 30, 4
    hidden = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    seg = torch.tensor([[0] * 3 + [1] * 4 + [2] * 5, [0] * 12])
    ids = torch.randint(0, v, (b, t))
    labels = _labels(ids, seg)
    out = reference_ce(hidden, weight, labels, strategy="linupper", r=0.5, segment_ids=seg, num_segments=segments)
    assert out.per_sample_loss.shape == (b * segments,) and out.weights.shape == (b * segments,)
    token_ce = torch.nn.functional.cross_entropy((hidden @ weight.t()).reshape(-1, v), labels.reshape(-1),
                                                 reduction="none", ignore_index=IGNORE_INDEX).reshape(b, t)
    for row in range(b):
        for s in range(segments):
            keep = (seg[row] == s) & (labels[row] != IGNORE_INDEX)
            got = out.per_sample_loss[row * segments + s]
            if keep.any():
                torch.testing.assert_close(got, token_ce[row][keep].mean().float().to(got.dtype))
                assert out.weights[row * segments + s] > 0
            else:
                assert torch.isnan(got) and out.weights[row * segments + s] == 0  # no tokens: no weight
    assert float(out.weights.sum()) == pytest.approx(1.0)
    assert int((out.weights > 0).sum()) == 4  # three documents + one
    # the chunked (CPU training) path agrees, gradients included
    out.loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    _, chunked_ce = get_loss_impl("chunked", "cpu")
    other = chunked_ce(hidden, weight, labels, strategy="linupper", r=0.5, segment_ids=seg, num_segments=segments)
    other.loss.backward()
    torch.testing.assert_close(other.loss, out.loss)
    torch.testing.assert_close(other.weights, out.weights)
    torch.testing.assert_close((hidden.grad, weight.grad), grads, rtol=1e-5, atol=1e-6)  # fp32 CE inside


def test_reweighted_lm_uses_documents_as_samples_in_training_only():
    torch.manual_seed(0)
    model = build_model(model_args("tiny", vocab_size=64))
    ids = torch.randint(2, 64, (2, 16))
    seg = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, [0] * 16])
    labels = _labels(ids, seg)
    module = ReweightedLM(model, reference_ce, num_segments=3)
    out = module(ids, labels, "linupper", 1.0, segment_ids=seg)
    assert out.per_sample_loss.shape == (6,)
    assert torch.isfinite(out.per_sample_loss[[0, 1, 2, 3]]).all()  # documents 2 and 3 share sample 2
    assert torch.isnan(out.per_sample_loss[[4, 5]]).all()
    batch = {"labels": labels, "segment_ids": seg, "domain_ids": torch.tensor([5, 7])}
    domains, present = per_sample_domains(batch, 3)
    assert domains.tolist() == [5, 5, 5, 7, 7, 7] and present.tolist() == [True, True, True, True, False, False]
    module.eval()  # evaluation: one sample per window whatever the reweighting unit
    assert module(ids, labels, "uniform", 1.0, segment_ids=seg).per_sample_loss.shape == (2,)


def test_training_with_document_packing_and_document_samples(prepared_dir, corpus_dir, tmp_path):
    shapes = []

    def factory(module, cfg):
        inner = module.loss_fn

        def loss_fn(hidden, weight, labels, **kw):
            out = inner(hidden, weight, labels, **kw)
            if module.training:
                shapes.append((kw.get("num_segments"), tuple(out.weights.shape)))
            return out

        module.loss_fn = loss_fn
        return PlainEngine(module, cfg, torch.device("cpu"))

    cfg = tiny_config(prepared_dir, data={"packing": "documents", "seq_len": 64},
                      reweight={"unit": "document", "max_documents": 6, "strategy": "linupper", "r": 0.5},
                      train={"max_steps": 4, "eval_interval": 2, "histogram_interval": 2})
    train(cfg, tmp_path / "run", engine_factory=factory, progress=False)
    assert shapes == [(6, (4 * 6,))] * 4  # a fixed number of samples per window: same shape on every rank
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["nonfinite_samples"] == 0 for r in rows)
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for e in evals for k, v in e.items() if k.startswith("loss/"))
    # `megareweight eval` scores such a run with the document mask: boundary labels are not scored
    scored = evaluate_checkpoint(tmp_path / "run", corpus_dir / "prose.jsonl", max_tokens=64 * 64, progress=False)
    assert np.isfinite(scored["prose"]["loss"]) and 64 * 64 - 40 <= scored["prose"]["tokens"] < 64 * 64


def test_packing_options_are_validated(prepared_dir):
    with pytest.raises(ConfigError, match="reweight.unit: 'document' needs data.packing: documents"):
        tiny_config(prepared_dir, reweight={"unit": "document"})
    with pytest.raises(ConfigError, match="data.packing: 'docs' is not allowed; allowed values: concat, documents"):
        tiny_config(prepared_dir, data={"packing": "docs"})
    with pytest.raises(ConfigError, match="reweight.max_documents: must be >= 1"):
        tiny_config(prepared_dir, data={"packing": "documents"}, reweight={"unit": "document", "max_documents": 0})

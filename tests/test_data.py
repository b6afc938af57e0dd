"""Corpus reading, tokenizer round trip, token shards and their checks, the mixture sampler."""
from __future__ import annotations

import gzip
import json
import lzma
import re
import shutil

import numpy as np
import pytest
import torch

from megareweight.data.corpus import CorpusError, iter_documents, list_domains
from megareweight.data.mixture import MixtureSampler, validation_batches
from megareweight.data.shards import PreparedData, ShardError, verify_prepared
from megareweight.data.tokenizer import load_tokenizer


# --- corpus ---------------------------------------------------------------------------------------

def test_corpus_formats(tmp_path):
    rows = [json.dumps({"text": f"doc {i}", "source": "t"}) + "\n" for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(rows))
    with lzma.open(tmp_path / "b.jsonl.xz", "wt") as f:
        f.write("".join(rows))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(rows))
    (tmp_path / "notes.txt").write_text("ignored")
    domains = list_domains(tmp_path)
    assert list(domains) == ["a", "b", "c"]
    assert [list(iter_documents(p)) for p in domains.values()] == [["doc 0", "doc 1", "doc 2"]] * 3
    assert domains["b"] == [tmp_path / "b.jsonl.xz"]  # a domain is a list of files


def test_corpus_errors_name_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not a JSON object with a 'text' field"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl.xz").write_bytes(b"not xz data")
    with pytest.raises(CorpusError, match=r"cannot read .*broken\.jsonl\.xz"):
        list(iter_documents(tmp_path / "broken.jsonl.xz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no <domain>.jsonl"):
        list_domains(tmp_path / "empty")
    with pytest.raises(CorpusError, match="corpus directory not found"):
        list_domains(tmp_path / "nowhere")


# --- tokenizer and prepare ------------------------------------------------------------------------

def test_tokenizer_round_trip_is_exact(prepared_dir, corpus_dir):
    tok = load_tokenizer(prepared_dir / "tokenizer.model")
    samples = list(iter_documents(corpus_dir / "code.jsonl"))[:5] + [
        "def f(x):\n    if x:\n\t\treturn  x  # two spaces\n\n\n    return None   ",
        "unseen characters: ü é 漢字 🙂 and\r\nwindows line ends",
    ]
    for text in samples:
        assert tok.decode(tok.encode([text])[0]) == text


def test_prepare_manifest_and_shards(prepared_dir):
    data = PreparedData.open(prepared_dir)
    assert data.domains == ["code", "numbers", "prose"]
    assert data.vocab_size == 320 and data.dtype == np.dtype("<u2")
    for domain in data.domains:
        for split in ("train", "valid"):
            (shard,) = data.stream(split, domain).shards  # one job: one shard per domain and split
            assert isinstance(shard.tokens, np.memmap) and isinstance(shard.offsets, np.memmap)
            assert shard.num_documents >= 1
            eos = data.manifest["eos_id"]
            # every document ends with EOS
            assert np.all(shard.tokens[shard.offsets[1:] - 1] == eos)
    assert verify_prepared(prepared_dir) == []


def test_validation_split_is_by_document(prepared_dir, corpus_dir):
    data = PreparedData.open(prepared_dir)
    tok = data.load_tokenizer()
    (valid,) = data.stream("valid", "prose").shards
    (train,) = data.stream("train", "prose").shards
    docs = list(iter_documents(corpus_dir / "prose.jsonl"))
    assert valid.num_documents + train.num_documents == len(docs)
    first_valid = tok.decode(valid.tokens[valid.offsets[0] : valid.offsets[1] - 1].tolist())
    assert first_valid in docs


@pytest.fixture()
def prepared_copy(prepared_dir, tmp_path):
    dst = tmp_path / "prep"
    shutil.copytree(prepared_dir, dst)
    return dst


def test_truncated_bin_is_named(prepared_copy):
    path = prepared_copy / "train" / "code" / "00000-of-00001.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ShardError, match=r"code/00000-of-00001\.bin: size .* is not a multiple of 2"):
        PreparedData.open(prepared_copy).stream("train", "code")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ShardError, match=r"code/00000-of-00001\.idx: offsets run from 0 to .* but 00000-of-00001\.bin holds"):
        PreparedData.open(prepared_copy).stream("train", "code")


def test_index_mismatch_and_flipped_bytes(prepared_copy):
    idx = prepared_copy / "valid" / "prose" / "00000-of-00001.idx"
    offsets = np.fromfile(idx, dtype="<i8")
    offsets[1], offsets[2] = offsets[2], offsets[1]
    offsets.tofile(idx)
    # Opening stays O(1) (first and last offset only); the full monotonicity scan is verify's.
    PreparedData.open(prepared_copy).stream("valid", "prose")
    assert any(p.endswith("prose/00000-of-00001.idx: document offsets are not strictly increasing")
               for p in verify_prepared(prepared_copy))
    binary = prepared_copy / "train" / "numbers" / "00000-of-00001.bin"
    raw = bytearray(binary.read_bytes())
    raw[10] ^= 0xFF
    binary.write_bytes(bytes(raw))
    problems = verify_prepared(prepared_copy)
    assert any("numbers/00000-of-00001.bin: SHA-256 differs" in p for p in problems)
    assert any("numbers/00000-of-00001.bin: token id" in p and ">= vocab size 320" in p for p in problems)


def test_missing_manifest(tmp_path):
    with pytest.raises(ShardError, match="manifest.json: not found"):
        PreparedData.open(tmp_path)


def _edit_manifest(prepared, edit) -> None:
    path = prepared / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_totals_and_vocabulary_are_derived_not_trusted(prepared_copy):
    """An edited domain total would change the natural mixture; an inflated vocab_size the embedding."""
    original = (prepared_copy / "manifest.json").read_text()
    true_total = json.loads(original)["domains"]["code"]["train"]["tokens"]
    _edit_manifest(prepared_copy, lambda m: m["domains"]["code"]["train"].update(tokens=true_total * 10))
    with pytest.raises(ShardError, match=rf"manifest.json: domains.code.train states {true_total * 10} tokens .*, "
                                         rf"its shards' index files hold {true_total} /"):
        PreparedData.open(prepared_copy)
    assert any("domains.code.train states" in p for p in verify_prepared(prepared_copy))
    (prepared_copy / "manifest.json").write_text(original)
    _edit_manifest(prepared_copy, lambda m: m.update(vocab_size=100_000))
    with pytest.raises(ShardError, match=r"manifest.json: vocab_size is 100000 but the tokenizer tokenizer.model "
                                         r"gives 320$"):
        PreparedData.open(prepared_copy)
    (prepared_copy / "manifest.json").write_text(original)
    _edit_manifest(prepared_copy, lambda m: m["domains"]["prose"]["valid"]["shards"][0].update(documents=1))
    with pytest.raises(ShardError, match=r"domains.prose.valid.shards\[0\] states .* / 1 documents, "
                                         r"00000-of-00001.idx holds"):
        PreparedData.open(prepared_copy)


def test_manifest_paths_must_stay_inside_the_prepared_directory(prepared_copy, tmp_path, capsys):
    from megareweight.cli import main

    secret = tmp_path / "other" / "train"
    secret.mkdir(parents=True)
    for suffix in (".bin", ".idx"):
        shutil.copy(prepared_copy / "train" / "code" / f"00000-of-00001{suffix}", secret / f"x{suffix}")
    original = (prepared_copy / "manifest.json").read_text()
    edits = {"domains.code.train.shards[0].bin": lambda m: m["domains"]["code"]["train"]["shards"][0].update(
                 bin="../../../other/train/x.bin"),
             "tokenizer.file": lambda m: m["tokenizer"].update(file="../other/train/x.bin")}
    for key, edit in edits.items():
        (prepared_copy / "manifest.json").write_text(original)
        _edit_manifest(prepared_copy, edit)
        with pytest.raises(ShardError, match=rf"manifest.json: {re.escape(key)} names .* outside the prepared "
                                             "directory"):
            PreparedData.open(prepared_copy)
        assert main(["verify", str(prepared_copy), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "outside the prepared directory" in err[0], err


def test_missing_manifest_key_is_one_line_naming_it(prepared_copy, capsys):
    from megareweight.cli import main

    original = (prepared_copy / "manifest.json").read_text()
    for key, edit in {"domains.code.train.tokens": lambda m: m["domains"]["code"]["train"].pop("tokens"),
                      "vocab_size": lambda m: m.pop("vocab_size"),
                      "domains.numbers.valid.shards[0].idx_sha256":
                          lambda m: m["domains"]["numbers"]["valid"]["shards"][0].pop("idx_sha256")}.items():
        (prepared_copy / "manifest.json").write_text(original)
        _edit_manifest(prepared_copy, edit)
        assert main(["verify", str(prepared_copy), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"megareweight: error: {prepared_copy / 'manifest.json'}: missing key {key!r}"], err


def test_missing_tokenizer_is_an_error_at_train_start(prepared_copy, tmp_path):
    """Checkpoints promise a copy of the tokenizer; a run without it must not start."""
    from megareweight.train.loop import train
    from tests.conftest import tiny_config

    (prepared_copy / "tokenizer.model").unlink()
    with pytest.raises(ShardError, match=r"tokenizer.model: tokenizer file missing"):
        train(tiny_config(prepared_copy, train={"max_steps": 2, "eval_interval": 0}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- mixture sampler ------------------------------------------------------------------------------

def _shards(prepared_dir):
    return PreparedData.open(prepared_dir).streams("train")


def _take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_shapes_and_domains(prepared_dir):
    s = MixtureSampler(_shards(prepared_dir), {"code": 1.0, "prose": 0.0, "numbers": 0.0}, 16, 4, seed=1)
    b = s.next_batch()
    assert b["input_ids"].shape == (4, 16) and b["labels"].shape == (4, 16)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    assert b["domain_ids"].tolist() == [0, 0, 0, 0]  # code is domain 0


def test_sampler_deterministic_for_seed(prepared_dir):
    a = _take(MixtureSampler(_shards(prepared_dir), [1, 1, 1], 16, 4, seed=3), 5)
    b = _take(MixtureSampler(_shards(prepared_dir), [1, 1, 1], 16, 4, seed=3), 5)
    c = _take(MixtureSampler(_shards(prepared_dir), [1, 1, 1], 16, 4, seed=4), 5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_ranks_are_disjoint_and_cover_the_global_batch(prepared_dir):
    shards = _shards(prepared_dir)
    single = _take(MixtureSampler(shards, [1, 2, 1], 16, 6, seed=0), 4)
    ranks = [_take(MixtureSampler(shards, [1, 2, 1], 16, 2, rank=r, world_size=3, seed=0), 4) for r in range(3)]
    for step in range(4):
        joined = torch.cat([ranks[r][step]["input_ids"] for r in range(3)])
        assert torch.equal(joined, single[step]["input_ids"])
        doms = torch.cat([ranks[r][step]["domain_ids"] for r in range(3)])
        assert torch.equal(doms, single[step]["domain_ids"])
    # no window is served twice within an epoch across ranks
    keys = {tuple(row.tolist()) for r in ranks for b in r for row in b["input_ids"]}
    assert len(keys) == 4 * 6


def test_exact_resume(prepared_dir):
    shards = _shards(prepared_dir)
    s = MixtureSampler(shards, [1, 1, 1], 16, 4, seed=7)
    _take(s, 3)
    state = json.loads(json.dumps(s.state_dict()))  # survives JSON
    expected = _take(s, 4)
    t = MixtureSampler(shards, [1, 1, 1], 16, 4, seed=7)
    t.load_state_dict(state)
    got = _take(t, 4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(expected, got))


def test_resume_on_other_world_size_continues_without_repeats(prepared_dir):
    shards = _shards(prepared_dir)
    s = MixtureSampler(shards, [1, 1, 1], 16, 4, seed=0)
    seen = [tuple(r.tolist()) for b in _take(s, 3) for r in b["input_ids"]]
    state = s.state_dict()
    for rank in range(2):
        t = MixtureSampler(shards, [1, 1, 1], 16, 2, rank=rank, world_size=2, seed=0)
        t.load_state_dict(state)
        seen += [tuple(r.tolist()) for b in _take(t, 3) for r in b["input_ids"]]
    assert len(seen) == len(set(seen)) == 24


def test_set_weights_changes_mixture_deterministically(prepared_dir):
    shards = _shards(prepared_dir)
    s = MixtureSampler(shards, [1, 0, 0], 16, 8, seed=0)
    assert set(s.next_batch()["domain_ids"].tolist()) == {0}
    s.set_weights({"code": 0.0, "numbers": 0.0, "prose": 1.0})
    assert set(s.next_batch()["domain_ids"].tolist()) == {2}
    state = s.state_dict()
    assert state["weights"]["prose"] == 1.0
    t = MixtureSampler(shards, [1, 0, 0], 16, 8, seed=0)
    t.load_state_dict(state)
    assert torch.equal(t.next_batch()["input_ids"], s.next_batch()["input_ids"])


def test_epochs_and_tokens_reported(prepared_dir):
    shards = _shards(prepared_dir)
    s = MixtureSampler(shards, [0, 1, 0], 16, 8, seed=0)  # "numbers": random digits, no repeated windows
    n = int(s.windows[1])
    steps = n // 8 + 2
    windows = [tuple(r.tolist()) for b in _take(s, steps) for r in b["input_ids"]]
    assert s.tokens_consumed()["numbers"] == steps * 8 * 16
    assert s.epochs()["numbers"] == pytest.approx(steps * 8 / n)
    assert len(set(windows[:n])) == n  # the first epoch visits every window once
    assert set(windows[n:]) <= set(windows[:n])  # then the second epoch repeats them


def test_sampler_errors(prepared_dir):
    shards = _shards(prepared_dir)
    with pytest.raises(ValueError, match="unknown domains"):
        MixtureSampler(shards, {"web": 1.0}, 16, 4)
    with pytest.raises(ValueError, match="sum to 0"):
        MixtureSampler(shards, [0, 0, 0], 16, 4)
    with pytest.raises(ValueError, match="rank 2 outside world of size 2"):
        MixtureSampler(shards, [1, 1, 1], 16, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        MixtureSampler(shards, [1, 1, 1], 10**7, 4)


def test_validation_batches_equal_across_ranks(prepared_dir):
    shard = PreparedData.open(prepared_dir).stream("valid", "prose")
    per_rank = [list(validation_batches(shard, 8, 2, 7, rank=r, world_size=2)) for r in range(2)]
    assert [b["input_ids"].shape for b in per_rank[0]] == [b["input_ids"].shape for b in per_rank[1]]
    assert sum(b["input_ids"].shape[0] for r in per_rank for b in r) == 6


def test_public_names():
    import megareweight.data as data

    assert data.MixtureSampler is MixtureSampler and data.PreparedData is PreparedData

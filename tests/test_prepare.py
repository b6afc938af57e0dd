"""Preparation at scale: many files per domain, worker processes, init/shard/merge jobs, --overwrite,
the validation split rule, token ids checked at open, and reading format-1 directories."""
from __future__ import annotations

import gzip
import json
import lzma
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import megareweight.data.corpus as corpus_module
from megareweight.cli import main
from megareweight.data.corpus import iter_documents
from megareweight.data.mixture import MixtureSampler
from megareweight.data.prepare import PrepareError, in_validation, init_preparation, merge_parts, prepare, prepare_part
from megareweight.data.shards import PreparedData, ShardError, verify_prepared


def write_jsonl(path: Path, docs: list[str]) -> None:
    """JSON Lines in the compression the name asks for (.gz, .xz, .zst or none)."""
    data = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".xz"):
        data = lzma.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def write_parquet(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)


@pytest.fixture(scope="module")
def multi_corpus(corpus_dir, tmp_path_factory) -> Path:
    """The test corpus spread over several files and formats per domain (directory layout)."""
    root = tmp_path_factory.mktemp("multi")
    prose = list(iter_documents(corpus_dir / "prose.jsonl"))
    code = list(iter_documents(corpus_dir / "code.jsonl"))
    write_jsonl(root / "prose" / "a.jsonl", prose[:15])
    write_jsonl(root / "prose" / "sub" / "b.jsonl.gz", prose[15:30])
    write_parquet(root / "prose" / "c.parquet", prose[30:])
    write_jsonl(root / "code" / "part-0.jsonl.zst", code[:20])
    write_jsonl(root / "code" / "part-1.json.gz", code[20:])
    shutil.copy(corpus_dir / "numbers.jsonl", root / "numbers.jsonl")
    return root


@pytest.fixture()
def small_batches(monkeypatch):
    """Many raw batches per file, so that several are in flight across workers."""
    monkeypatch.setattr(corpus_module, "BATCH_BYTES", 2000)
    monkeypatch.setattr(corpus_module, "PARQUET_BATCH_ROWS", 3)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _documents(data: PreparedData, domain: str, split: str) -> list[tuple[int, ...]]:
    docs = []
    for shard in data.stream(split, domain).shards:
        docs += [tuple(shard.tokens[a:b].tolist()) for a, b in zip(shard.offsets[:-1], shard.offsets[1:])]
    return docs


def test_workers_output_is_byte_identical(multi_corpus, prepared_dir, tmp_path, small_batches):
    tok = prepared_dir / "tokenizer.model"
    one = prepare(multi_corpus, tmp_path / "w1", tokenizer_model=tok, valid_fraction=0.1, workers=1, progress=False)
    prepare(multi_corpus, tmp_path / "w2", tokenizer_model=tok, valid_fraction=0.1, workers=2, progress=False)
    assert _tree(tmp_path / "w1") == _tree(tmp_path / "w2")
    assert verify_prepared(tmp_path / "w1") == []
    assert one["domains"]["prose"]["train"]["documents"] + one["domains"]["prose"]["valid"]["documents"] == 40


def test_sharded_jobs_merge_into_multi_shard_domains(multi_corpus, prepared_dir, tmp_path, small_batches):
    tok = prepared_dir / "tokenizer.model"
    single = tmp_path / "single"
    prepare(multi_corpus, single, tokenizer_model=tok, valid_fraction=0.1, progress=False)
    out = tmp_path / "sharded"
    init_preparation(out, multi_corpus, tokenizer_model=tok, valid_fraction=0.1)
    prepare_part(out, 1, 2, progress=False)
    with pytest.raises(PrepareError, match=r"1 of 2 parts not finished, e\.g\. --shard 0/2"):
        merge_parts(out, progress=False)
    prepare_part(out, 0, 2, workers=2, progress=False)
    manifest = merge_parts(out, progress=False)
    assert [s["bin"] for s in manifest["domains"]["prose"]["train"]["shards"]] == ["00000-of-00002.bin", "00001-of-00002.bin"]
    assert len(manifest["domains"]["numbers"]["train"]["shards"]) == 1  # one file: job 1 had nothing to do
    assert verify_prepared(out) == []
    a, b = PreparedData.open(single), PreparedData.open(out)
    for domain in ("prose", "code", "numbers"):
        # the same documents in the same splits, only laid out in other files
        for split in ("train", "valid"):
            assert sorted(_documents(a, domain, split)) == sorted(_documents(b, domain, split)), (domain, split)
    # the sampler reads a multi-shard domain as one stream: one epoch visits every window once
    stream = b.stream("train", "prose")
    n = stream.num_windows(16)
    assert n == sum((s.num_tokens - 1) // 16 for s in stream.shards)
    sampler = MixtureSampler({"prose": stream}, [1.0], 16, n, seed=0)
    batch = sampler.next_batch()
    expected = sorted(tuple(s.tokens[k * 16 : k * 16 + 16].tolist()) for s in stream.shards
                      for k in range((s.num_tokens - 1) // 16))
    assert sorted(tuple(r) for r in batch["input_ids"].tolist()) == expected


def test_validation_split_is_a_per_document_rule(multi_corpus, prepared_dir, tmp_path):
    data = PreparedData.open(prepare(multi_corpus, tmp_path / "p", tokenizer_model=prepared_dir / "tokenizer.model",
                                     valid_fraction=0.3, progress=False) and tmp_path / "p")
    tok = data.load_tokenizer()
    docs = list(iter_documents(sorted((multi_corpus / "code").rglob("*.*"))))
    held = {d for d in docs if in_validation(d, 0.3)}
    assert 0 < len(held) < len(docs)
    valid = {tok.decode(list(d[:-1])) for d in _documents(data, "code", "valid")}
    assert valid == held  # depends on the text only (not on files, order, workers or jobs)


def test_a_split_left_empty_gets_the_last_document_of_the_other(tmp_path, prepared_dir):
    docs = [f"document number {i} " * 5 for i in range(6)]
    assert not any(in_validation(d, 1e-9) for d in docs)
    write_jsonl(tmp_path / "c" / "tiny.jsonl", docs)
    manifest = prepare(tmp_path / "c", tmp_path / "p", tokenizer_model=prepared_dir / "tokenizer.model",
                       valid_fraction=1e-9, progress=False)
    assert manifest["domains"]["tiny"]["valid"]["documents"] == 1
    tok = PreparedData.open(tmp_path / "p").load_tokenizer()
    (valid,) = _documents(PreparedData.open(tmp_path / "p"), "tiny", "valid")
    assert tok.decode(list(valid[:-1])) == docs[-1]
    write_jsonl(tmp_path / "one" / "alone.jsonl", docs[:1])
    with pytest.raises(PrepareError, match="domain 'alone': no document in the (train|valid) split"):
        prepare(tmp_path / "one", tmp_path / "q", tokenizer_model=prepared_dir / "tokenizer.model", progress=False)


def test_prepare_refuses_a_used_directory_and_overwrite_leaves_no_stale_shard(corpus_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "p"
    tok = str(prepared_dir / "tokenizer.model")
    assert main(["prepare", "--corpus", str(corpus_dir), "--out", str(out), "--tokenizer", tok, "--quiet"]) == 0
    assert main(["prepare", "--corpus", str(corpus_dir), "--out", str(out), "--tokenizer", tok, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megareweight: error: {out} is not empty (an earlier preparation?); pass --overwrite to replace it"]
    assert (out / "train" / "code" / "00000-of-00001.bin").is_file()
    # Re-prepare with one domain only: the other domains' shards must not survive.
    (out / "train" / "code" / "00003-of-00004.bin").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")  # not written by prepare: kept
    assert main(["prepare", "--corpus", str(corpus_dir), "--out", str(out), "--tokenizer", tok, "--domains", "prose",
                 "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["prose"]
    assert (out / "notes.txt").read_text() == "mine"
    assert verify_prepared(out) == []
    (out / "train" / "prose" / "00001-of-00002.bin").write_bytes(b"stale")
    assert any("00001-of-00002.bin: not listed in the manifest" in p for p in verify_prepared(out))


def test_token_ids_beyond_the_vocabulary_fail_at_open(prepared_dir, tmp_path, capsys):
    out = tmp_path / "p"
    shutil.copytree(prepared_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    largest = manifest["domains"]["code"]["train"]["shards"][0]["max_token_id"]
    assert 0 < largest < manifest["vocab_size"]
    # As if the shards came from a larger tokenizer (vocab_size itself is checked against the tokenizer file).
    manifest["domains"]["code"]["train"]["shards"][0]["max_token_id"] = manifest["vocab_size"] + 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train/code/00000-of-00001\.bin: holds token ids up to \d+ but the vocabulary has"):
        PreparedData.open(out).stream("train", "code")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{size: tiny}}\ndata: {{prepared: {out}, seq_len: 16, micro_batch_size: 2}}\n"
                   "train: {max_steps: 2, eval_interval: 0}\nwandb: {mode: disabled}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "00000-of-00001.bin: holds token ids up to" in capsys.readouterr().err


def test_a_corrupted_token_is_caught_when_read(prepared_dir, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(prepared_dir, out)
    path = out / "train" / "numbers" / "00000-of-00001.bin"
    tokens = np.fromfile(path, dtype="<u2")
    tokens[:] = 60000  # every window is corrupt; the manifest still says the ids were fine
    tokens.tofile(path)
    sampler = MixtureSampler(PreparedData.open(out).streams("train"), {"numbers": 1.0}, 16, 2)
    with pytest.raises(ShardError, match=r"numbers/00000-of-00001\.bin: token id 60000 at position \d+ is >= the vocabulary size 320"):
        sampler.next_batch()


def test_format_1_directories_are_still_read(prepared_dir, tmp_path):
    """Format 1: <split>/<domain>.bin + .idx, one manifest entry per domain and split."""
    old = tmp_path / "v1"
    new = PreparedData.open(prepared_dir)
    manifest = {k: new.manifest[k] for k in ("vocab_size", "dtype", "eos_id", "corpus", "valid_fraction")}
    manifest.update(format=1, tokenizer={"file": "tokenizer.model", "sha256": new.manifest["tokenizer"]["sha256"]},
                    domains={})
    shutil.copy(prepared_dir / "tokenizer.model", old / "tokenizer.model") if old.mkdir() is None else None
    for domain in new.domains:
        manifest["domains"][domain] = {}
        for split in ("train", "valid"):
            (entry,) = new.manifest["domains"][domain][split]["shards"]
            (old / split).mkdir(exist_ok=True)
            for suffix in (".bin", ".idx"):
                shutil.copy(prepared_dir / split / domain / f"00000-of-00001{suffix}", old / split / f"{domain}{suffix}")
            manifest["domains"][domain][split] = {k: v for k, v in entry.items() if k != "max_token_id"} | {"bin": f"{domain}.bin"}
    (old / "manifest.json").write_text(json.dumps(manifest))
    data = PreparedData.open(old)
    a = MixtureSampler(data.streams("train"), [1, 1, 1], 16, 4, seed=2).next_batch()
    b = MixtureSampler(new.streams("train"), [1, 1, 1], 16, 4, seed=2).next_batch()
    assert np.array_equal(a["input_ids"], b["input_ids"])
    assert verify_prepared(old) == []
    manifest["format"] = 9
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"format 9; this version reads formats 1, 2"):
        PreparedData.open(old)


def test_cli_init_shard_merge(multi_corpus, prepared_dir, tmp_path, capsys):
    out = str(tmp_path / "p")
    tok = str(prepared_dir / "tokenizer.model")
    assert main(["prepare", "--corpus", str(multi_corpus), "--out", out, "--tokenizer", tok, "--init", "--quiet"]) == 0
    assert main(["prepare", "--out", out, "--merge", "--quiet"]) == 2
    assert "no finished part" in capsys.readouterr().err
    assert main(["prepare", "--out", out, "--shard", "2/2", "--quiet"]) == 2
    assert "--shard '2/2': need 0 <= I < K" in capsys.readouterr().err
    assert main(["prepare", "--out", out, "--shard", "0/1", "--corpus", str(multi_corpus), "--quiet"]) == 2
    assert "drop --corpus" in capsys.readouterr().err
    assert main(["prepare", "--out", out, "--shard", "0/1", "--workers", "2", "--quiet"]) == 0
    assert main(["prepare", "--out", out, "--merge", "--quiet"]) == 0
    assert main(["verify", out, "--quiet"]) == 0
    assert main(["prepare", "--out", str(tmp_path / "none"), "--shard", "0/1", "--quiet"]) == 2
    assert "prepare_plan.json: not found" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "999"])
def test_bad_workers_are_refused_before_the_tokenizer_or_out(corpus_dir, tmp_path, monkeypatch, capsys, workers):
    """--workers 999 forked 1000 processes; --workers 0 was refused only after the tokenizer was trained."""
    import megareweight.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "usable_cpus", lambda: 2)
    out = tmp_path / "p"
    assert main(["prepare", "--corpus", str(corpus_dir), "--out", str(out), "--vocab-size", "320",
                 "--workers", workers, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megareweight: error: --workers must be in [1, 4] (2 x the 2 usable CPUs: more workers than that "
                   f"add no speed), got {workers}"]
    assert not out.exists()
    assert main(["prepare", "--out", str(tmp_path / "none"), "--shard", "0/1", "--workers", workers, "--quiet"]) == 2
    assert "--workers must be in [1, 4]" in capsys.readouterr().err


def test_a_vocabulary_smaller_than_the_corpus_needs_names_the_floor(corpus_dir, tmp_path, capsys):
    """SentencePiece's own message suggested a --character_coverage option megareweight does not have (exit 1)."""
    assert main(["prepare", "--corpus", str(corpus_dir), "--out", str(tmp_path / "p"), "--vocab-size", "300",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "character_coverage" not in err[0], err
    assert re.fullmatch(r"megareweight: error: vocab_size 300 is too small for this corpus: it needs at least (\d+) "
                        r"pieces \(256 byte-fallback pieces, .*\); raise --vocab-size to >= \1", err[0]), err


def test_a_negative_looking_value_reaches_its_options_check(tmp_path, capsys):
    """argparse read '-1/4' as an option and said only "expected one argument"."""
    assert main(["prepare", "--out", str(tmp_path / "p"), "--shard", "-1/4", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["megareweight: error: --shard '-1/4': need 0 <= I < K"]
    assert main(["prepare", "--out", "--quiet"]) == 2  # a real option after --out is still a missing value
    assert "argument --out: expected one argument" in capsys.readouterr().err

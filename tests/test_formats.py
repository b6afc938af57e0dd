"""Input formats (JSON Lines plain/gz/xz/zst, Parquet), domain layouts and globs, Hugging Face tokenizer.json."""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from megareweight.data.corpus import CorpusError, iter_documents, list_domains, resolve_domains
from megareweight.data.prepare import prepare
from megareweight.data.shards import PreparedData, verify_prepared
from megareweight.data.tokenizer import HuggingFaceTokenizer, load_tokenizer
from megareweight.cli import main
from megareweight.evaluate import evaluate_checkpoint
from megareweight.train.loop import train
from tests.conftest import tiny_config
from tests.test_prepare import write_jsonl, write_parquet

DOCS = ["plain text", "two\nlines\tand a tab", "unicode: ü 漢字 🙂", "", "  indented code:\n    return x  "]
NON_EMPTY = [d for d in DOCS if d]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.xz", "d.jsonl.zst", "d.json.zst", "d.json.gz",
                                  "d.parquet"])
def test_every_format_reads_the_same_documents(tmp_path, name):
    path = tmp_path / name
    (write_parquet if name.endswith(".parquet") else write_jsonl)(path, DOCS)
    assert list(iter_documents(path)) == DOCS
    assert list_domains(tmp_path) == {"d": [path]}


def test_domain_directories_and_globs(tmp_path):
    write_jsonl(tmp_path / "c" / "web" / "2024" / "a.jsonl.zst", DOCS[:2])
    write_parquet(tmp_path / "c" / "web" / "b.parquet", DOCS[2:])
    (tmp_path / "c" / "web" / "README.md").write_text("not data")
    write_jsonl(tmp_path / "c" / "books.jsonl", DOCS)
    write_jsonl(tmp_path / "elsewhere" / "x" / "p1.jsonl.gz", DOCS[:1])
    write_jsonl(tmp_path / "elsewhere" / "y" / "p2.jsonl.gz", DOCS[1:2])
    domains = resolve_domains(tmp_path / "c", [f"extra={tmp_path}/elsewhere/**/*.jsonl.gz"])
    assert list(domains) == ["books", "web", "extra"]
    assert [p.name for p in domains["web"]] == ["a.jsonl.zst", "b.parquet"]  # sorted paths, recursive
    assert list(iter_documents(domains["web"])) == DOCS
    assert [p.name for p in domains["extra"]] == ["p1.jsonl.gz", "p2.jsonl.gz"]
    assert list(resolve_domains(tmp_path / "c", only=["web"])) == ["web"]
    with pytest.raises(CorpusError, match="no file matches"):
        resolve_domains(None, [f"x={tmp_path}/nothing/*.jsonl"])
    with pytest.raises(CorpusError, match=r"README\.md is not a corpus file; allowed: \.jsonl"):
        resolve_domains(None, [f"x={tmp_path}/c/web/*"])
    with pytest.raises(CorpusError, match="domain 'books' is already defined"):
        resolve_domains(tmp_path / "c", [f"books={tmp_path}/elsewhere/**/*.gz"])
    with pytest.raises(CorpusError, match="expected NAME=GLOB"):
        resolve_domains(None, ["no-equals-sign"])
    with pytest.raises(CorpusError, match="domains not in the corpus: nope"):
        resolve_domains(tmp_path / "c", only=["nope"])


def test_parquet_and_zstd_errors_name_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(CorpusError, match=r"nocol\.parquet: no 'text' column; columns: content"):
        list(iter_documents(tmp_path / "nocol.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(CorpusError, match=r"ints\.parquet: column 'text' has type int64"):
        list(iter_documents(tmp_path / "ints.parquet"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(CorpusError, match=r"null\.parquet: row 2: 'text' is NoneType"):
        list(iter_documents(tmp_path / "null.parquet"))
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(CorpusError, match=r"cannot read .*bad\.jsonl\.zst"):
        list(iter_documents(tmp_path / "bad.jsonl.zst"))
    write_jsonl(tmp_path / "ok.jsonl.zst", ["x", "y"])
    (tmp_path / "ok.jsonl.zst").write_bytes((tmp_path / "ok.jsonl.zst").read_bytes() + b'{"txt": 1}\n')
    with pytest.raises(CorpusError):
        list(iter_documents(tmp_path / "ok.jsonl.zst"))


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.jsonl.xz", "d.jsonl.zst"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_compressed_file_is_an_error_naming_it(tmp_path, name, keep):
    """A cut .zst read as fewer documents or none ("no document in the split") without a word."""
    path = tmp_path / name
    write_jsonl(path, [f"document {i} " * 20 for i in range(500)])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorpusError, match=rf"^cannot read {re.escape(str(path))}: Compressed file ended before the "
                                          "end-of-stream marker was reached$"):
        list(iter_documents(path))


def test_zstd_files_of_several_frames_are_read_whole(tmp_path):
    import zstandard

    path = tmp_path / "d.jsonl.zst"
    write_jsonl(path, DOCS)
    frames = path.read_bytes()
    with open(path, "ab") as handle, zstandard.ZstdCompressor().stream_writer(handle, closefd=False) as writer:
        writer.write(b'{"text": "streamed, no content size"}\n')
    path.write_bytes(path.read_bytes() + frames)
    assert list(iter_documents(path)) == DOCS + ["streamed, no content size"] + DOCS


def test_a_lone_surrogate_names_file_and_line(tmp_path):
    """json.loads accepts a lone \\ud800 escape; the tokenizer then failed naming neither file nor line."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:2: 'text' is not valid Unicode: a lone surrogate "
                                          r"'\\ud800' at character 4"):
        list(iter_documents(path))


@pytest.mark.parametrize("package,name,pin", [("zstandard", "d.jsonl.zst", "zstandard>=0.22,<1"),
                                              ("pyarrow", "d.parquet", "pyarrow>=15,<27")])
def test_a_missing_package_is_named(tmp_path, monkeypatch, package, name, pin):
    path = tmp_path / name
    (write_parquet if name.endswith(".parquet") else write_jsonl)(path, DOCS)
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(CorpusError, match=rf"{name}: reading this file needs the '{package}' package \(pip install '{pin}'\)"):
        list(iter_documents(path))


# --- Hugging Face tokenizer.json ------------------------------------------------------------------

def train_hf_tokenizer(path, docs, special=("<|endoftext|>",), add_bos=True):
    """A small byte-level BPE, saved as tokenizer.json; optionally with a BOS-adding post-processor
    (like LLaMA-3's), which document encoding must bypass."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    if add_bos and special:
        tok.post_processor = processors.TemplateProcessing(single=f"{special[0]} $A",
                                                           special_tokens=[(special[0], tok.token_to_id(special[0]))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_huggingface_tokenizer_json_end_to_end(corpus_dir, tmp_path):
    docs = list(iter_documents(corpus_dir / "code.jsonl")) + list(iter_documents(corpus_dir / "prose.jsonl"))
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", docs)
    tok = load_tokenizer(path)
    assert isinstance(tok, HuggingFaceTokenizer) and tok.eos_token == "<|endoftext|>"
    for text in docs[:3] + ["def f(x):\n\treturn  x  ", "ü 漢字 🙂"]:
        ids = tok.encode([text])[0]
        assert tok.eos_id not in ids  # no BOS from the post-processor
        assert tok.decode(ids) == text
    manifest = prepare(corpus_dir, tmp_path / "p", tokenizer_model=path, valid_fraction=0.1, progress=False)
    assert manifest["tokenizer"]["kind"] == "huggingface" and manifest["tokenizer"]["file"] == "tokenizer.json"
    assert manifest["eos_id"] == tok.eos_id and manifest["vocab_size"] == tok.vocab_size
    data = PreparedData.open(tmp_path / "p")
    (shard,) = data.stream("train", "code").shards
    assert np.all(shard.tokens[shard.offsets[1:] - 1] == tok.eos_id)
    first = shard.tokens[: shard.offsets[1] - 1].tolist()
    assert data.load_tokenizer().decode(first) in docs
    assert verify_prepared(tmp_path / "p") == []
    # the run's tokenizer.json serves eval and is what export copies
    train(tiny_config(tmp_path / "p", train={"max_steps": 2, "eval_interval": 0}), tmp_path / "run", progress=False)
    scored = evaluate_checkpoint(tmp_path / "run", corpus_dir / "code.jsonl", progress=False)["code"]
    assert scored["tokens"] > 0 and np.isfinite(scored["loss"])
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == path.read_bytes()


def test_huggingface_end_token_choice(corpus_dir, prepared_dir, tmp_path):
    docs = list(iter_documents(corpus_dir / "prose.jsonl"))
    plain = train_hf_tokenizer(tmp_path / "a" / "tokenizer.json", docs, special=("<pad>",), add_bos=False)
    with pytest.raises(ValueError, match=r"cannot tell which token ends a document .* pass --eos-token"):
        load_tokenizer(plain)
    assert load_tokenizer(plain, eos_token="<pad>").eos_id == 0
    with pytest.raises(ValueError, match=r"end-of-document token '<nope>' is not in the vocabulary"):
        load_tokenizer(plain, eos_token="<nope>")
    two = train_hf_tokenizer(tmp_path / "b" / "tokenizer.json", docs, special=("</s>", "<|eot|>"), add_bos=False)
    assert load_tokenizer(two).eos_token == "</s>"
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|eot|>"}}))
    assert load_tokenizer(two).eos_token == "<|eot|>"  # the config beside the file wins
    with pytest.raises(ValueError, match="a SentencePiece model's end token is fixed"):
        load_tokenizer(prepared_dir / "tokenizer.model", eos_token="<|eot|>")


def test_export_declares_the_runs_special_tokens_and_leaves_no_stale_tokenizer(corpus_dir, prepared_dir, tmp_path):
    """A tokenizer.json whose end token is not id 1 (here '</s>' is id 3, id 1 is '<unk>'): config.json
    and tokenizer_config.json name the run's tokens; a later SentencePiece export into the same
    directory removes the stale tokenizer.json (AutoTokenizer would load it) but no foreign file."""
    docs = list(iter_documents(corpus_dir / "code.jsonl"))
    path = train_hf_tokenizer(tmp_path / "tok" / "tokenizer.json", docs, special=("<pad>", "<unk>", "<s>", "</s>"),
                              add_bos=False)
    prepare(corpus_dir, tmp_path / "p", tokenizer_model=path, valid_fraction=0.1, progress=False)
    hf = tmp_path / "hf"
    for prepared, run in ((tmp_path / "p", "json_run"), (prepared_dir, "sp_run")):
        train(tiny_config(prepared, train={"max_steps": 1, "eval_interval": 0}), tmp_path / run, progress=False)
    assert main(["export", "--checkpoint", str(tmp_path / "json_run"), "--out", str(hf), "--quiet"]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (3, None, None)
    assert json.loads((hf / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    (hf / "README.md").write_text("mine")
    assert main(["export", "--checkpoint", str(tmp_path / "sp_run"), "--out", str(hf), "--quiet"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "tokenizer.model", "tokenizer_config.json"]
    sp = load_tokenizer(prepared_dir / "tokenizer.model")
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == sp.eos_id

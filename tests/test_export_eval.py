"""Hugging Face export (logits equal ours) and the eval command."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from megareweight.checkpoint_io import load_model
from megareweight.cli import main
from megareweight.train.loop import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained_run(prepared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(prepared_dir, train={"max_steps": 4, "eval_interval": 0},
                      model={"tie_embeddings": False}), out, progress=False)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_export_matches_transformers_logits(prepared_dir, trained_run, tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    run = trained_run
    if tied:
        run = tmp_path / "tied"
        train(tiny_config(prepared_dir, train={"max_steps": 2, "eval_interval": 0}), run, progress=False)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    ours, _ = load_model(run)
    ids = torch.randint(0, ours.args.vocab_size, (2, 17))
    with torch.no_grad():
        expected = ours.logits(ids)
        got = hf(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert (tmp_path / "hf" / "tokenizer.model").is_file()


def test_eval_command_on_jsonl(trained_run, corpus_dir, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(corpus_dir), "--json-out", str(out_json),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" not in table and "ppl" in table and "prose" in table
    results = json.loads(out_json.read_text())
    assert set(results) == {"code", "numbers", "prose", "average", "checkpoint"}
    assert results.pop("checkpoint") == {"path": str(trained_run / "checkpoints" / "step_00000004"), "step": 4}
    for row in results.values():
        assert row["perplexity"] == pytest.approx(torch.tensor(row["loss"]).exp().item(), rel=1e-6)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(corpus_dir / "code.jsonl"), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {"code", "average", "checkpoint"}


def test_eval_says_which_checkpoint_it_scored_also_after_skipping_a_damaged_one(prepared_dir, corpus_dir, tmp_path,
                                                                                  capsys):
    run = tmp_path / "run"
    train(tiny_config(prepared_dir, train={"max_steps": 4, "checkpoint_interval": 2, "eval_interval": 0}), run,
          progress=False)
    code = str(corpus_dir / "code.jsonl")
    assert main(["eval", "--checkpoint", str(run), "--data", code, "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"checkpoint {run / 'checkpoints' / 'step_00000004'} (step 4)"
    weights = run / "checkpoints" / "step_00000004" / "engine.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: only the checksum sees it
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step_00000004"):
        assert main(["eval", "--checkpoint", str(run), "--data", code, "--json", "--quiet"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"]
    assert scored == {"path": str(run / "checkpoints" / "step_00000002"), "step": 2}


def test_eval_and_export_errors(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]) == 2


def test_relative_prepared_path_still_found_from_another_directory(prepared_dir, corpus_dir, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.chdir(prepared_dir.parent)
    cfg = tiny_config(prepared_dir.name, train={"max_steps": 2, "eval_interval": 0})
    train(cfg, tmp_path / "run", progress=False)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus_dir / "code.jsonl"), "--json",
                 "--quiet"]) == 0
    assert "code" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_and_export_refuse_a_tokenizer_the_checkpoint_was_not_trained_with(prepared_dir, corpus_dir, tmp_path,
                                                                                 capsys):
    from megareweight.data.prepare import prepare
    from tests.conftest import make_corpus

    other = tmp_path / "other"  # same vocabulary size, other text: another tokenizer
    prepare(make_corpus(tmp_path / "other_corpus", seed=7), other, vocab_size=320, valid_fraction=0.1, progress=False)
    prep = tmp_path / "prep"
    shutil.copytree(prepared_dir, prep)
    run = tmp_path / "run"
    train(tiny_config(prep, train={"max_steps": 2, "eval_interval": 0}), run, progress=False)
    code = str(corpus_dir / "code.jsonl")
    assert main(["eval", "--checkpoint", str(run), "--data", code, "--json", "--quiet"]) == 0
    before = capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run), "--data", code, "--tokenizer", str(other / "tokenizer.model")]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    # The prepared directory is re-prepared: the checkpoint's own copy of its tokenizer is used.
    shutil.copyfile(other / "tokenizer.model", prep / "tokenizer.model")
    assert main(["eval", "--checkpoint", str(run), "--data", code, "--json", "--quiet"]) == 0
    assert capsys.readouterr().out == before
    # A checkpoint without its own copy (older format): the changed prepared tokenizer is refused.
    latest = run / "checkpoints" / "step_00000002"
    (latest / "tokenizer.model").unlink()
    manifest = json.loads((latest / "COMPLETE").read_text())
    del manifest["files"]["tokenizer.model"]
    (latest / "COMPLETE").write_text(json.dumps(manifest))
    for argv in (["eval", "--checkpoint", str(run), "--data", code], ["export", "--checkpoint", str(run), "--out",
                                                                       str(tmp_path / "hf")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the run's prepared directory now holds" in err[0], err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--max-tokens", "-5"], "argument --max-tokens: must be >= 1, got -5"),
    (["--seq-len", "x"], "argument --seq-len: expected an integer >= 1, got 'x'"),
    (["--json-out", "/proc/nope/x.json"], "--json-out /proc/nope/x.json: cannot write"),
])
def test_eval_bad_arguments_are_one_line(trained_run, corpus_dir, argv, message, capsys):
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(corpus_dir / "code.jsonl"), "--quiet",
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megareweight: error: ") and message in err[0], err


def test_eval_on_an_empty_file_is_one_line(trained_run, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(tmp_path / "empty.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megareweight: error: {tmp_path / 'empty.jsonl'}: 0 tokens, fewer than one window of 33 "
                   "(--seq-len + 1); nothing to score"]


def test_eval_capped_by_max_tokens_below_a_window_says_so(trained_run, corpus_dir, capsys):
    """The file holds plenty of tokens: the message must blame --max-tokens, not claim the file is short."""
    code = corpus_dir / "code.jsonl"
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(code), "--max-tokens", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megareweight: error: {code}: 4 tokens (--max-tokens 3), fewer than one window of 33 "
                   "(--seq-len + 1); nothing to score"]


def test_eval_of_empty_documents_in_a_packed_by_document_run_is_one_line(prepared_dir, tmp_path, capsys):
    """Every label is masked (each one-token document ends where the next begins): no loss to report."""
    run = tmp_path / "run"
    train(tiny_config(prepared_dir, data={"packing": "documents"}, train={"max_steps": 1, "eval_interval": 0}), run,
          progress=False)
    empty = tmp_path / "blank.jsonl"
    empty.write_text('{"text": ""}\n' * 100)
    assert main(["eval", "--checkpoint", str(run), "--data", str(empty), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megareweight: error: {empty}: no token to score in 3 window(s): its documents are empty (the "
                   "run packs by document, so no label crosses into the next)"]

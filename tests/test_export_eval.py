"""Hugging Face export (logits equal ours) and the eval command."""
from __future__ import annotations

import json

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
    assert set(results) == {"code", "numbers", "prose", "average"}
    for row in results.values():
        assert row["perplexity"] == pytest.approx(torch.tensor(row["loss"]).exp().item(), rel=1e-6)
    assert main(["eval", "--checkpoint", str(trained_run), "--data", str(corpus_dir / "code.jsonl"), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {"code", "average"}


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

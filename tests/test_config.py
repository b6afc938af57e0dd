"""Typed config: defaults, overrides, and one-line errors that name the key."""
from __future__ import annotations

import pytest

from megareweight.config import ConfigError, config_from_dict, load_config


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg.reweight.strategy == "uniform" and cfg.loss.impl == "auto"
    assert cfg.loss.mode == "auto" and cfg.loss.chunk_size == 0


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {size: tiny}\noptim: {lr: 0.001}\n")
    cfg = load_config(path, ["optim.lr=2e-3", "reweight.strategy=linupper", "data.mixture={a: 0.5, b: 0.5}"])
    assert cfg.model.size == "tiny" and cfg.optim.lr == 2e-3 and cfg.reweight.strategy == "linupper"
    assert cfg.data.mixture == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"optim": {"lrr": 1}}, r"unknown key optim\.lrr; allowed keys in optim: lr, "),
        ({"modle": {}}, r"unknown key modle; allowed keys: model, data"),
        ({"model": {"size": "huge"}}, r"model\.size: 'huge' is not allowed; allowed values: tiny, small, 125m, 1\.4b, 7b"),
        ({"loss": {"impl": "cuda"}}, r"loss\.impl: 'cuda' is not allowed; allowed values: auto, fused, chunked, reference"),
        ({"loss": {"mode": "quick"}}, r"loss\.mode: 'quick' is not allowed; allowed values: auto, fast, lean"),
        ({"loss": {"chunk_size": -8}}, r"loss\.chunk_size: must be >= 0 \(0: automatic\)"),
        ({"reweight": {"strategy": "linup"}}, r"reweight\.strategy: 'linup' is not allowed; allowed values: uniform, linear"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number, got str 'fast'"),
        ({"optim": {"lr": -1}}, r"optim\.lr: must be > 0"),
        ({"data": {"seq_len": 0}}, r"data\.seq_len: must be >= 1"),
        ({"data": {"micro_batch_size": 2.5}}, r"data\.micro_batch_size: expected an integer"),
        ({"data": {"mixture": {"a": 0.7, "b": 0.7}}}, r"data\.mixture: weights must sum to 1, they sum to 1\.4"),
        ({"data": {"mixture": {"a": -0.5, "b": 1.5}}}, r"data\.mixture\.a: weight must be >= 0"),
        ({"data": {"mixture": "balanced"}}, r"data\.mixture: 'balanced' is not allowed; allowed values: natural, uniform"),
        ({"train": {"max_steps": True}}, r"train\.max_steps: expected an integer, got bool"),
        ({"reweight": {"r": 0}}, r"reweight\.r: must be > 0"),
        ({"wandb": {"mode": "cloud"}}, r"wandb\.mode: 'cloud' is not allowed; allowed values: offline, online, disabled"),
        ({"optim": 3}, r"optim: expected a mapping"),
    ],
)
def test_errors_name_the_key(raw, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        config_from_dict(raw)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["optim.lr"])


def test_shipped_configs_are_valid():
    from importlib import resources

    files = [p for p in resources.files("megareweight.configs").iterdir() if p.name.endswith(".yaml")]
    assert len(files) >= 5
    for path in files:
        load_config(str(path))

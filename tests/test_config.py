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
        ({"model": {"d_model": 100, "n_heads": 3}}, r"model\.d_model: 100 is not divisible by model\.n_heads \(3\)"),
        ({"model": {"n_heads": 4, "n_kv_heads": 3}}, r"model\.n_heads: 4 is not divisible by model\.n_kv_heads \(3\)"),
        ({"model": {"d_model": 100, "n_heads": 4}}, r"model\.d_model: the head dimension d_model / n_heads = 25 must be even"),
        ({"model": {"n_layers": 0}}, r"model\.n_layers: must be >= 1, got 0"),
        ({"model": {"ffn_dim": -4}}, r"model\.ffn_dim: must be >= 1, got -4"),
        ({"model": {"d_model": 19.5}}, r"model\.d_model: expected int or null, got float 19\.5"),
        ({"model": {"max_seq_len": 64}}, r"data\.seq_len: 128 exceeds model\.max_seq_len 64 \(size small\)"),
        ({"model": {"size": "tiny"}, "data": {"seq_len": 1024}}, r"data\.seq_len: 1024 exceeds model\.max_seq_len 512"),
        ({"data": {"train_domains": []}}, r"data\.train_domains: an empty list; omit the key"),
        ({"data": {"eval_domains": []}}, r"data\.eval_domains: an empty list"),
        ({"reweight": {"strategy": "linupper", "warmup_steps": 20}, "train": {"max_steps": 20}},
         r"reweight\.warmup_steps: 20 >= train\.max_steps 20, so reweight\.strategy 'linupper' would never switch on"),
        ({"model": {"activation_checkpointing": "sometimes"}},
         r"model\.activation_checkpointing: 'sometimes' is not allowed; allowed values: none, full, every_k, attention, ffn, true, false"),
        ({"model": {"checkpoint_every": 3}}, r"model\.checkpoint_every: only used with model\.activation_checkpointing: every_k"),
        ({"model": {"activation_checkpointing": "every_k", "checkpoint_every": 0}}, r"model\.checkpoint_every: must be >= 1"),
        ({"train": {"compile": "fast"}}, r"train\.compile: 'fast' is not allowed; allowed values: true, false, blocks, ops"),
        ({"train": {"peak_tflops": 0}}, r"train\.peak_tflops: must be > 0"),
        ({"data": {"prefetch": -1}}, r"data\.prefetch: must be >= 0"),
        ({"reweight": {"strategy": "domain"}}, r"reweight\.domain_weights: reweight\.strategy: domain needs a mapping"),
        ({"reweight": {"strategy": "domain", "domain_weights": {"a": 0}}}, r"reweight\.domain_weights\.a: weight must be > 0, got 0"),
        ({"reweight": {"strategy": "linupper", "domain_weights": {"a": 1}}},
         r"reweight\.domain_weights: only used with reweight\.strategy: domain \(it is 'linupper'\)"),
        ({"reweight": {"strategy": "domain", "domain_weights": {"a": "x"}}}, r"reweight\.domain_weights\.a: expected a number"),
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


def test_model_shape_overrides_replace_the_named_size():
    """``model.*`` shapes override the named size; unset keys keep its values; the trainer builds
    its ModelArgs through the same function (model_args_for), so what loads is what trains."""
    from megareweight.config import model_args_for
    from megareweight.model import MODEL_SIZES, build_model, count_parameters

    cfg = config_from_dict({"model": {"size": "small", "d_model": 192, "n_heads": 6, "ffn_dim": 512, "max_seq_len": 256}})
    args = model_args_for(cfg, vocab_size=4096)
    small = MODEL_SIZES["small"]
    assert (args.d_model, args.n_heads, args.hidden_dim, args.max_seq_len) == (192, 6, 512, 256)
    assert (args.n_layers, args.tie_embeddings, args.vocab_size) == (small.n_layers, small.tie_embeddings, 4096)
    assert count_parameters(build_model(args, device="meta")) == 2_557_632  # the LM experiment's model
    assert "d_model 192, 4 layers, 6 heads, ffn 512" in args.describe()
    gqa = model_args_for(config_from_dict({"model": {"n_kv_heads": 2, "tie_embeddings": False}}), vocab_size=10)
    assert gqa.kv_heads == 2 and not gqa.tie_embeddings
    assert model_args_for(config_from_dict({}), vocab_size=10) == MODEL_SIZES["small"].__class__(
        **{**MODEL_SIZES["small"].__dict__, "vocab_size": 10})


def test_uniform_with_a_long_warmup_is_fine():
    assert config_from_dict({"reweight": {"warmup_steps": 50}, "train": {"max_steps": 20}}).train.max_steps == 20


def test_checkpointing_and_compile_values():
    """``true``/``false`` keep working for activation checkpointing (full/none); the model and the
    config agree on the modes."""
    from megareweight.config import CHECKPOINT_MODES
    from megareweight.model.llama import CHECKPOINT_MODES as MODEL_MODES

    assert CHECKPOINT_MODES == MODEL_MODES
    assert config_from_dict({"model": {"activation_checkpointing": True}}).model.activation_checkpointing == "full"
    assert config_from_dict({"model": {"activation_checkpointing": False}}).model.activation_checkpointing == "none"
    every = config_from_dict({"model": {"activation_checkpointing": "every_k", "checkpoint_every": 3}}).model
    assert (every.activation_checkpointing, every.checkpoint_every) == ("every_k", 3)
    assert config_from_dict({"train": {"compile": "ops"}}).train.compile == "ops"
    assert config_from_dict({"train": {"compile": True}}).train.compile is True


@pytest.mark.parametrize("raw, pattern", [
    # each value passed "> 0" and then broke the float32 reweighting maths
    ({"reweight": {"r": 1e-320}}, r"reweight\.r: must be in \[1\.18e-38, 3\.4e\+38\] \(the weights softmax\(f/r\) are "
                                  r"float32: r must be a normal float32 .*\), got 1e-320"),
    ({"reweight": {"warmup_r": 1e-40}}, r"reweight\.warmup_r: must be in \[1\.18e-38, "),
    ({"reweight": {"r": 1e39}}, r"reweight\.r: must be in \[1\.18e-38, 3\.4e\+38\]"),
    ({"reweight": {"delta": 1e300}}, r"reweight\.delta: must be in \[1\.08e-19, 1\.84e\+19\] \(delta squared must be "
                                     r"a finite float32\), got 1e\+300"),
    ({"reweight": {"delta": 1e-20}}, r"reweight\.delta: must be in \[1\.08e-19, "),
    ({"reweight": {"delta": 1e19, "r": 1e-20}}, r"reweight\.r: must be in \[2\.94e-20, .*got 1e-20"),  # delta/r overflows
    ({"data": {"packing": "documents", "seq_len": 32}, "reweight": {"unit": "document", "max_documents": 100000000}},
     r"reweight\.max_documents: must be <= data\.seq_len 32 \(a window cannot hold more documents\), got 100000000"),
    ({"train": {"seed": 2**70}}, r"train\.seed: must be in \[0, 2\*\*64 - 1\] \(a 64-bit seed\), got 1180591620717411303424"),
])
def test_values_the_float32_maths_or_the_machine_cannot_take(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw)


def test_the_bounds_admit_their_limits():
    """The largest seed, the smallest temperature, a max_documents of exactly seq_len are accepted."""
    cfg = config_from_dict({"train": {"seed": 2**64 - 1}, "reweight": {"r": 1.2e-38}})
    assert cfg.train.seed == 2**64 - 1
    config_from_dict({"reweight": {"delta": 1.8e19, "r": 1e-19}})
    config_from_dict({"data": {"packing": "documents", "seq_len": 32}, "reweight": {"unit": "document", "max_documents": 32}})
    config_from_dict({"reweight": {"max_documents": 10**8}})  # unit: sequence ignores it


def test_a_binary_config_file_is_named(tmp_path):
    """It raised a bare UnicodeDecodeError ("'utf-8' codec can't decode byte ...") naming no file."""
    path = tmp_path / "engine.pt"
    path.write_bytes(b"PK\x03\x04\xd1\x00\xff binary")
    with pytest.raises(ConfigError, match=rf"^{path}: not a YAML text file \(byte 0xd1 at offset 4 is not UTF-8\)$"):
        load_config(path)

"""Typed experiment configuration: YAML file + ``--set section.key=value`` overrides.

Every field is declared in a dataclass with its type; loading checks types, choices and ranges
and raises :class:`ConfigError` with a one-line message naming the key (``optim.lr``) and, for
choices, the allowed values. Unknown keys are errors too: a typo must never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megareweight.model.llama import ModelArgs, model_args
from megareweight.reweighting.strategies import STRATEGIES

#: Placeholder vocabulary for load-time shape checks; the prepared data's tokenizer sets the real one.
_VALIDATION_VOCAB = 2


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` is a one-line message naming the key."""


#: float32 limits: the reweighting maths (normalised losses, scores, softmax weights) runs in float32.
F32_TINY = 1.1754943508222875e-38  # smallest normal float32 (devices may flush smaller values to 0)
F32_MAX = 3.4028234663852886e38
#: reweight.delta's range: the quadratic strategy computes x*x and delta*delta (|x| <= delta), so
#: delta squared must be a normal, finite float32: sqrt(F32_TINY) <= delta <= sqrt(F32_MAX).
DELTA_RANGE = (math.sqrt(F32_TINY), math.sqrt(F32_MAX))
#: train.seed is an unsigned 64-bit integer for torch.manual_seed (and the sampler's 64-bit keys).
MAX_SEED = 2**64 - 1


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); learning rates are written
    that way all the time, so also resolve plain scientific notation as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


ModelSize = Literal["tiny", "small", "125m", "1.4b", "7b"]
LossImpl = Literal["auto", "fused", "chunked", "reference", "torch_core"]
LossMode = Literal["auto", "fast", "lean"]
WandbMode = Literal["offline", "online", "disabled"]
WarmupMode = Literal["uniform", "temperature"]
Precision = Literal["fp32", "bf16", "fp16"]
Packing = Literal["concat", "documents"]
ReweightUnit = Literal["sequence", "document"]


#: model.activation_checkpointing values besides true/false (megareweight.model.llama.CHECKPOINT_MODES)
CHECKPOINT_MODES = ("none", "full", "every_k", "attention", "ffn")
COMPILE_MODES = ("blocks", "ops")


@dataclass
class ModelConfig:
    """A named size, optionally with some shapes overridden.

    Why overrides rather than more named sizes: experiments must pick a model that fits their
    compute budget (e.g. a 3 M-parameter model for a CPU study); a size per experiment would grow
    the list without end. ``None`` keeps the named size's value; the result is checked at load
    time (:func:`model_args_for`), with errors naming the ``model.*`` key.
    """

    size: ModelSize = "small"
    tie_embeddings: Optional[bool] = None  # None: the named size's default
    # What backward recomputes (see megareweight.model.llama); true/false mean full/none.
    activation_checkpointing: Union[bool, str] = "none"
    checkpoint_every: Optional[int] = None  # k of every_k (default 2); only with every_k
    d_model: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None  # None: the named size's (multi-head attention if it has none)
    ffn_dim: Optional[int] = None  # None: the named size's (LLaMA's 8/3 d rule if it has none)
    max_seq_len: Optional[int] = None

    def shape_overrides(self) -> dict[str, Any]:
        """The keys set in this config that replace the named size's values."""
        keys = ("tie_embeddings", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class DataConfig:
    prepared: str = ""  # directory written by `megareweight prepare`
    mixture: Union[str, dict[str, float]] = "natural"  # "natural" | "uniform" | {domain: weight}
    train_domains: Optional[list[str]] = None  # None: every domain in the mixture/manifest
    eval_domains: Optional[list[str]] = None  # None: every domain in the manifest (held-out ones too)
    seq_len: int = 128
    micro_batch_size: int = 16
    eval_sequences: int = 64  # validation windows per domain
    prefetch: int = 2  # micro-batches built ahead in a background thread (0: on the main thread)
    packing: Packing = "concat"  # documents: attention and labels never cross a document boundary


@dataclass
class ReweightConfig:
    strategy: str = "uniform"
    r: float = 1.0
    delta: float = 1.0
    warmup_steps: int = 0
    warmup_mode: WarmupMode = "uniform"
    warmup_r: float = 100.0
    unit: ReweightUnit = "sequence"  # document: each document of a window is its own sample (needs packing: documents)
    max_documents: int = 64  # unit=document: samples per window; further documents share the last one
    # strategy=domain: a constant loss weight per trained domain, {domain: weight > 0}; normalised over
    # each global micro-batch like every strategy (the loss-side counterpart of data.mixture)
    domain_weights: Optional[dict[str, float]] = None


@dataclass
class LossConfig:
    impl: LossImpl = "auto"
    mode: LossMode = "auto"  # fast: 6NDV, stores the N x V gradient; lean: 8NDV, O(chunk x V); auto: fast if it fits
    chunk_size: int = 0  # tokens per logit block; 0: from V and the device
    z_loss: float = 0.0  # PaLM/OLMo z-loss coefficient: z_loss * lse^2 per token (1e-4 is usual; 0: off)
    fast_memory_gb: float = 0.0  # mode auto: fast when its stored gradient fits this; 0: 10 % of the GPU (1 GiB on CPU)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 200
    gradient_accumulation_steps: int = 1
    precision: Precision = "fp32"
    eval_interval: int = 50
    log_interval: int = 1
    checkpoint_interval: int = 0  # 0: only at the end
    max_nonfinite_steps: int = 5  # consecutive all-non-finite steps before the run stops
    histogram_interval: int = 50  # log the weight distribution to wandb every N steps (0: never)
    keep_checkpoints: int = 3  # newest complete checkpoints kept on disk (0: all)
    # torch.compile: blocks (every transformer block), ops (RMSNorm/RoPE/SwiGLU only), or true:
    # blocks, except ops under ZeRO-3 (see megareweight.model.llama.Transformer.fuse_elementwise_ops)
    compile: Union[bool, str] = False
    peak_tflops: Optional[float] = None  # per-device dense peak for MFU (None: known GPUs only)


@dataclass
class WandbConfig:
    mode: WandbMode = "offline"
    project: str = "megareweight"
    name: Optional[str] = None
    entity: Optional[str] = None
    dir: Optional[str] = None  # default: the run's output directory


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- generic typed loading ----------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is Union:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        # Optional[mapping or list] given one: the inner error names the inner key (a.b.c)
        if isinstance(value, (dict, list)) and len(options) == 1 and typing.get_origin(options[0]) in (dict, list):
            return _coerce(value, options[0], key)
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key)
        else:
            kwargs[name] = _coerce(raw[name], tp, key)
    return cls(**kwargs)


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def model_args_for(cfg: ExperimentConfig, vocab_size: int) -> ModelArgs:
    """The model shapes of ``cfg``: the named ``model.size`` with the ``model.*`` overrides.

    The one place that turns a config into :class:`ModelArgs` (the trainer and the load-time
    validation both call it). Raises :class:`ConfigError` naming the key: positive values,
    ``model.d_model`` divisible by ``model.n_heads``, ``model.n_heads`` by ``model.n_kv_heads``,
    an even head dimension (rotary embeddings), and ``data.seq_len <= model.max_seq_len``.
    """
    try:
        args = model_args(cfg.model.size, vocab_size=vocab_size, **cfg.model.shape_overrides())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.data.seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len {args.max_seq_len} "
                          f"(size {cfg.model.size}); lower data.seq_len or raise model.max_seq_len")
    return args


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Range and cross-field checks that types alone cannot express."""
    d, o, t, rw, m = cfg.data, cfg.optim, cfg.train, cfg.reweight, cfg.model
    if isinstance(m.activation_checkpointing, bool):
        m.activation_checkpointing = "full" if m.activation_checkpointing else "none"
    _require(m.activation_checkpointing in CHECKPOINT_MODES, "model.activation_checkpointing",
             f"{m.activation_checkpointing!r} is not allowed; allowed values: {', '.join(CHECKPOINT_MODES)}, true, false")
    _require(isinstance(t.compile, bool) or t.compile in COMPILE_MODES, "train.compile",
             f"{t.compile!r} is not allowed; allowed values: true, false, {', '.join(COMPILE_MODES)}")
    if m.checkpoint_every is not None:
        _require(m.activation_checkpointing == "every_k", "model.checkpoint_every",
                 f"only used with model.activation_checkpointing: every_k (it is {m.activation_checkpointing!r})")
        _require(m.checkpoint_every >= 1, "model.checkpoint_every", f"must be >= 1, got {m.checkpoint_every}")
    _require(d.prefetch >= 0, "data.prefetch", f"must be >= 0 (0 disables), got {d.prefetch}")
    _require(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", f"must be > 0, got {t.peak_tflops}")
    model_args_for(cfg, vocab_size=_VALIDATION_VOCAB)  # shapes do not depend on the vocabulary
    _require(d.seq_len >= 1, "data.seq_len", f"must be >= 1, got {d.seq_len}")
    _require(d.micro_batch_size >= 1, "data.micro_batch_size", f"must be >= 1, got {d.micro_batch_size}")
    _require(d.eval_sequences >= 1, "data.eval_sequences", f"must be >= 1, got {d.eval_sequences}")
    if isinstance(d.mixture, str):
        _require(d.mixture in ("natural", "uniform"), "data.mixture",
                 f"{d.mixture!r} is not allowed; allowed values: natural, uniform, or a mapping domain: weight")
    else:
        _require(len(d.mixture) > 0, "data.mixture", "an empty mapping; give domain: weight pairs")
        for dom, w in d.mixture.items():
            _require(w >= 0, f"data.mixture.{dom}", f"weight must be >= 0, got {w}")
        total = sum(d.mixture.values())
        _require(abs(total - 1.0) < 1e-6, "data.mixture", f"weights must sum to 1, they sum to {total:.6g}")
    for key, names in (("data.train_domains", d.train_domains), ("data.eval_domains", d.eval_domains)):
        _require(names != [], key, "an empty list; omit the key (null) to use every domain")
    _require(rw.strategy in STRATEGIES, "reweight.strategy",
             f"{rw.strategy!r} is not allowed; allowed values: {', '.join(STRATEGIES)}")
    for key, value in (("r", rw.r), ("delta", rw.delta), ("warmup_r", rw.warmup_r)):
        _require(value > 0, f"reweight.{key}", f"must be > 0, got {value}")
    _check_float32_reweighting(rw)
    _require(rw.warmup_steps >= 0, "reweight.warmup_steps", f"must be >= 0, got {rw.warmup_steps}")
    _require(rw.unit == "sequence" or d.packing == "documents", "reweight.unit",
             "'document' needs data.packing: documents (windows must know where documents start)")
    _require(rw.max_documents >= 1, "reweight.max_documents", f"must be >= 1, got {rw.max_documents}")
    # A window's seq_len input tokens cannot hold more than seq_len documents (each has >= 1 token);
    # a larger value only makes the per-sample tensors (windows x max_documents) and the step slower.
    _require(rw.unit != "document" or rw.max_documents <= d.seq_len, "reweight.max_documents",
             f"must be <= data.seq_len {d.seq_len} (a window cannot hold more documents), got {rw.max_documents}")
    if rw.strategy == "domain":
        _require(bool(rw.domain_weights), "reweight.domain_weights",
                 "reweight.strategy: domain needs a mapping domain: weight (one per trained domain)")
        for dom, w in rw.domain_weights.items():
            _require(w > 0, f"reweight.domain_weights.{dom}", f"weight must be > 0, got {w}")
    else:
        _require(rw.domain_weights is None, "reweight.domain_weights",
                 f"only used with reweight.strategy: domain (it is {rw.strategy!r})")
    _require(cfg.loss.chunk_size >= 0, "loss.chunk_size", f"must be >= 0 (0: automatic), got {cfg.loss.chunk_size}")
    _require(cfg.loss.z_loss >= 0, "loss.z_loss", f"must be >= 0 (0 disables it), got {cfg.loss.z_loss}")
    _require(cfg.loss.fast_memory_gb >= 0, "loss.fast_memory_gb", f"must be >= 0 (0: the default budget), got {cfg.loss.fast_memory_gb}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
    _require(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    _require(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    _require(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    _require(t.eval_interval >= 0, "train.eval_interval", f"must be >= 0 (0 disables), got {t.eval_interval}")
    _require(t.log_interval >= 1, "train.log_interval", f"must be >= 1, got {t.log_interval}")
    _require(t.checkpoint_interval >= 0, "train.checkpoint_interval", f"must be >= 0, got {t.checkpoint_interval}")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    _require(0 <= t.seed <= MAX_SEED, "train.seed", f"must be in [0, 2**64 - 1] (a 64-bit seed), got {t.seed}")
    _require(t.histogram_interval >= 0, "train.histogram_interval", f"must be >= 0, got {t.histogram_interval}")
    _require(t.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0, got {t.keep_checkpoints}")
    # A strategy whose warm-up covers the whole run is never applied: the run would be uniform while
    # its config (and every report built from it) says otherwise. Certainly a mistake, so an error.
    _require(rw.strategy == "uniform" or rw.warmup_steps < t.max_steps, "reweight.warmup_steps",
             f"{rw.warmup_steps} >= train.max_steps {t.max_steps}, so reweight.strategy {rw.strategy!r} would never "
             "switch on; lower reweight.warmup_steps or set reweight.strategy: uniform")
    return cfg


def _check_float32_reweighting(rw: ReweightConfig) -> None:
    """Bounds that keep the float32 reweighting maths finite (each value passes ``> 0``, then breaks it).

    * ``delta`` in :data:`DELTA_RANGE` (why: see there); 1e300 is inf in float32 and the
      normalised losses become NaN.
    * ``r`` and ``warmup_r``: the weights are ``softmax(f / r)`` with every strategy's score
      ``f <= max(delta, 1)``. ``r`` must be a normal float32 (1e-320 becomes 0: weights -inf and a
      zero gradient on every step, reported as no skipped step) and ``max(delta, 1) / r`` finite
      (an overflowing score gives inf - inf = NaN weights); at most float32's largest number.
    """
    low, high = DELTA_RANGE
    _require(low <= rw.delta <= high, "reweight.delta",
             f"must be in [{low:.3g}, {high:.3g}] (delta squared must be a finite float32), got {rw.delta!r}")
    smallest = max(F32_TINY, max(rw.delta, 1.0) / F32_MAX)
    for key, value in (("r", rw.r), ("warmup_r", rw.warmup_r)):
        _require(smallest <= value <= F32_MAX, f"reweight.{key}",
                 f"must be in [{smallest:.3g}, {F32_MAX:.3g}] (the weights softmax(f/r) are float32: r must be a "
                 f"normal float32 and the scores f/r <= max(delta, 1)/r finite), got {value!r}")


def config_from_dict(raw: dict[str, Any] | None) -> ExperimentConfig:
    return validate(_build(ExperimentConfig, raw or {}, ""))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, value = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. optim.lr=1e-3)")
    try:
        parsed = yaml_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml_load(path.read_text()) or {}
        except UnicodeDecodeError as exc:  # a binary file (a checkpoint, a .pt) passed as --config
            raise ConfigError(f"{path}: not a YAML text file (byte {exc.object[exc.start]:#04x} at offset "
                              f"{exc.start} is not UTF-8)") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

"""DeepSpeed engine (ZeRO-2/3) behind the same interface as :class:`~megareweight.train.engine.PlainEngine`.

Why a wrapper and not DeepSpeed in the loop: the loop stays engine-agnostic (one code path for one
process and for a cluster), and everything DeepSpeed-specific lives here:

* **Config resolution.** The DeepSpeed JSON may say ``"auto"`` for batch sizes, gradient
  accumulation, clipping, precision and optimizer hyper-parameters; they are filled from the YAML
  experiment config. An explicit JSON value that disagrees with the YAML is a :class:`ConfigError`
  naming both keys: two sources of truth must never silently disagree.
* **Reweighting across ranks.** The loss of rank ``k`` is ``sum_{i in slice k} w_i l_i * W`` with
  the weights computed over the all-gathered global micro-batch (DESIGN.md; Sow et al.). DeepSpeed
  averages gradients over the ``W`` data-parallel ranks, giving ``sum_i w_i grad l_i``.
  ``engine.backward`` divides by ``gradient_accumulation_steps`` itself (``scale_wrt_gas``), so
  this wrapper does not (PlainEngine does it by hand): the step's gradient is the mean over the
  global micro-batches, each of whose weights sum to 1.
* **ZeRO-3 and the LM head.** The loss runs inside :class:`~megareweight.model.llama.LMHead`'s
  forward, the module that owns the untied ``lm_head.weight``, so ZeRO-3 gathers (and prefetches)
  the matrix for that module's forward and again before its backward, and releases it in between,
  like any layer's weight. A tied matrix belongs to the embedding; it is registered as an external
  parameter of the head module only, so it is gathered there too and not held for the whole step.
* **fp32 gradient reduction** is a matter of the JSON (``communication_data_type``,
  ``data_types.grad_accum_dtype``): see ``ds_configs/README.md``.
* **Activation checkpointing** is the YAML's (``model.activation_checkpointing``); an
  ``activation_checkpointing`` section in the JSON is refused: it configures
  ``deepspeed.checkpointing``, which the model does not use, and it used to switch recomputation
  on behind the YAML's back.
* **Host syncs.** ``forward`` copies the batch with ``non_blocking``; our code reads nothing from
  the device per micro-batch. DeepSpeed's ``step`` reads its overflow flag and gradient norm on
  the host (its own syncs, once per step); the loop's one read (the step's metrics) happens
  before it, so a step has two host syncs under DeepSpeed against one on the plain engine.
* **Large models** are constructed under ``deepspeed.zero.Init`` (each rank only ever holds its
  shard); the custom initialisation is then applied one gathered parameter at a time.
* **Non-finite gradients.** DeepSpeed's optimizers (ZeRO-1/2/3, bf16, fp16) compute the reduced
  global gradient norm before the update and skip the update when it is not finite, in every
  precision, from deepspeed 0.19.8 on; before that ZeRO-3 checked only in fp16 and applied NaN
  steps. :func:`check_deepspeed_version` refuses older versions at start-up (``setup.py`` pins
  the same range), and :meth:`DeepSpeedEngine.step` stops the run if a step is ever reported
  applied with a non-finite norm, so a corrupted model is never trained on or saved.
* **Checkpoints.** ``save`` writes DeepSpeed's sharded checkpoint (tag ``engine``), per-rank RNG
  states and ``engine_meta.json``. ``load`` on the same number of ranks restores everything
  exactly; on a different number it converts the checkpoint to DeepSpeed's *universal* format
  (optimizer state preserved) and loads that.

Extra JSON keys of ours live under the top-level ``"megareweight"`` section and are removed before
DeepSpeed sees the config: ``zero_init`` (``"auto"``: by model size, or true/false).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megareweight.config import ConfigError, ExperimentConfig
from megareweight.model import ModelArgs, Transformer, build_model, count_parameters
from megareweight.train.engine import apply_compile, make_optimizer, to_device
from megareweight.train.objective import ReweightedLM

AUTO = "auto"
#: The oldest DeepSpeed whose every optimizer skips a step with a non-finite gradient norm.
MIN_DEEPSPEED = "0.19.8"
#: Build under ``zero.Init`` from this many parameters when ``zero_init`` is "auto" (the 1.4b and
#: 7b sizes; a 125m model fits on every GPU before partitioning).
ZERO_INIT_MIN_PARAMETERS = 500_000_000
ENGINE_TAG = "engine"
META = "engine_meta.json"


# --- configuration ---------------------------------------------------------------------------------

def _fill(ds: dict[str, Any], path: str, value: Any, yaml_key: str) -> None:
    """Set ``ds[path]`` to ``value`` if it is "auto" or absent; raise if it contradicts the YAML."""
    *parents, leaf = path.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, AUTO)
    if current == AUTO:
        node[leaf] = value
        return
    same = (abs(float(current) - float(value)) <= 1e-12 * max(1.0, abs(float(value)))
            if isinstance(value, float) and isinstance(current, (int, float)) and not isinstance(current, bool)
            else current == value)
    if not same:
        raise ConfigError(f"DeepSpeed config {path}={current!r} contradicts {yaml_key}={value!r} "
                          f"(write \"auto\" in the JSON to take the YAML value)")


def resolve_ds_config(raw: dict[str, Any], cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """A DeepSpeed config with every "auto" filled from ``cfg`` and checked for contradictions.

    The ``megareweight`` section (ours) is removed. A ``scheduler`` section is refused: the loop
    owns the learning-rate schedule (``optim.*``) and sets the rate before every step.
    """
    ds = json.loads(json.dumps(raw))  # deep copy
    ds.pop("megareweight", None)
    if "scheduler" in ds:
        raise ConfigError("DeepSpeed config: remove the 'scheduler' section; the learning-rate schedule comes "
                          "from optim.lr / optim.warmup_steps / optim.min_lr_ratio")
    if "activation_checkpointing" in ds:
        raise ConfigError("DeepSpeed config: remove the 'activation_checkpointing' section; activation checkpointing "
                          "is set by model.activation_checkpointing (none, full, every_k, attention, ffn)")
    mbs, gas = cfg.data.micro_batch_size, cfg.train.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", mbs, "data.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", gas, "train.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", mbs * gas * world_size,
          f"data.micro_batch_size * train.gradient_accumulation_steps * world_size ({mbs}*{gas}*{world_size})")
    _fill(ds, "gradient_clipping", float(cfg.optim.grad_clip), "optim.grad_clip")
    _fill(ds, "bf16.enabled", cfg.train.precision == "bf16", f"train.precision ({cfg.train.precision})")
    _fill(ds, "fp16.enabled", cfg.train.precision == "fp16", f"train.precision ({cfg.train.precision})")
    if "optimizer" in ds:
        o = cfg.optim
        params = ds["optimizer"].setdefault("params", {})
        for key, value, name in (("lr", o.lr, "optim.lr"), ("betas", [o.beta1, o.beta2], "optim.beta1/beta2"),
                                 ("eps", o.eps, "optim.eps"), ("weight_decay", o.weight_decay, "optim.weight_decay")):
            current = params.get(key, AUTO)
            if current == AUTO:
                params[key] = value
            elif (list(map(float, current)) if key == "betas" else float(current)) != value:
                raise ConfigError(f"DeepSpeed config optimizer.params.{key}={current!r} contradicts {name}={value!r}")
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config zero_optimization.stage: {stage} is not one of 0, 1, 2, 3")
    return ds


# --- distributed set-up ----------------------------------------------------------------------------

def check_deepspeed_version(version: Optional[str] = None) -> None:
    """Refuse a DeepSpeed that may apply steps with non-finite gradients (see the module docstring)."""
    from packaging.version import Version

    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if Version(version) < Version(MIN_DEEPSPEED):
        raise ConfigError(f"deepspeed {version} is installed; megareweight needs deepspeed>={MIN_DEEPSPEED} "
                          "(older ZeRO-3 applies optimizer steps with NaN gradients outside fp16)")


def init_distributed() -> None:
    """Initialise the process group once (gloo on CPU, NCCL on CUDA; DeepSpeed picks)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # Started without a launcher (``megareweight train --deepspeed ...``): a world of one.
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if not dist.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else None
        deepspeed.init_distributed(dist_backend=backend)


def _local_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc.set_device(local_rank)
    return torch.device(acc.device_name(local_rank))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def init_partitioned_parameters(model: Transformer) -> None:
    """Apply :meth:`Transformer.init_parameter` to a model built under ``zero.Init``.

    ``reset_parameters`` ran on empty shards there and did nothing. Each parameter is gathered
    alone (peak memory: one matrix), initialised on rank 0 and re-partitioned (broadcast).
    """
    import deepspeed

    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if dist.get_rank() == 0:
                model.init_parameter(name, p)


# --- the engine ------------------------------------------------------------------------------------

class DeepSpeedEngine:
    """``PlainEngine``'s interface over ``deepspeed.initialize``; see the module docstring."""

    def __init__(self, module: ReweightedLM, cfg: ExperimentConfig, ds_config: dict[str, Any]):
        import deepspeed

        init_distributed()
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = _local_device()
        self.ds_config = ds_config
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.name = f"deepspeed-zero{self.stage}"
        model = module.model
        if self.stage == 3 and model.args.tie_embeddings:
            deepspeed.zero.register_external_parameter(model.lm_head, model.embed.weight)
        apply_compile(model, cfg.train.compile, hooks_every_module=self.stage == 3)
        optimizer = None if "optimizer" in ds_config else make_optimizer(module, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=None if optimizer else module.parameters(),
            config=ds_config)
        self.module = module
        self.grad_accum = cfg.train.gradient_accumulation_steps

    # -- step ----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], strategy: str, r: float):
        batch = to_device(batch, self.device)
        return self.engine(batch["input_ids"], batch["labels"], strategy, r, segment_ids=batch.get("segment_ids"),
                           domain_ids=batch.get("domain_ids"))

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate (DeepSpeed scales by 1/gas). Between boundaries DeepSpeed's ``step`` only
        advances its micro-step counter; the boundary step is :meth:`step`."""
        self.engine.backward(loss)
        if self.stage == 3:
            _trim_module_stack(self.engine.module)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def clip_gradients(self) -> None:
        """DeepSpeed clips inside :meth:`step` (after its reduce-scatter): nothing to do here."""
        return None

    def step(self, lr: float, grad_norm: Optional[float] = None) -> float:
        """Set the rate, clip + step (DeepSpeed's clip equals torch's ``clip_grad_norm_``:
        scale by ``clip / (norm + 1e-6)`` when above). Returns the pre-clip global grad norm; inf
        when DeepSpeed found non-finite gradients and skipped the update. ``grad_norm`` is unused
        (DeepSpeed computes the norm itself)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        if not getattr(self.engine, "_step_applied", True):
            return float("inf")
        norm = self.engine.get_global_grad_norm()  # already read on the host by DeepSpeed's step
        if norm is None:  # zero_optimization.compute_grad_norm=false: nothing to report or check
            return float("nan")
        norm = float(norm)
        if not math.isfinite(norm):
            raise RuntimeError(f"DeepSpeed applied an optimizer step with gradient norm {norm}: the parameters "
                               "may be corrupt; stopped without writing a checkpoint (resume from the last one)")
        return norm

    def skip_step(self) -> None:
        """Discard this step's gradients without an optimizer update (keeps the micro-step count)."""
        self.engine.optimizer.zero_grad()
        self.engine.micro_steps += 1

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def barrier(self) -> None:
        dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """All ranks: DeepSpeed shards + this rank's RNG states; rank 0: world-size metadata."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)
        torch.save(_rng_state(), directory / f"rng_rank{self.rank:05d}.pt")
        if self.rank == 0:
            (directory / META).write_text(json.dumps({"world_size": self.world_size, "stage": self.stage}))

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        if meta["world_size"] == self.world_size:
            self.engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_lr_scheduler_states=False)
            rng = directory / f"rng_rank{self.rank:05d}.pt"
            _set_rng_state(torch.load(rng, weights_only=False))
            return
        self._load_universal(directory, meta["world_size"])

    def _load_universal(self, directory: Path, saved_world: int) -> None:
        """Resume on a different number of ranks via DeepSpeed's universal checkpoint.

        Rank 0 converts ``<ckpt>/engine`` to ``<ckpt>/engine_universal`` once (kept for later
        resumes); every rank then loads its new partition of weights and optimizer state. RNG
        states are per rank and do not carry over (training draws no random numbers from them).
        """
        universal = directory / f"{ENGINE_TAG}_universal"
        if self.rank == 0 and not (universal / "zero").is_dir():
            _convert_to_universal(directory / ENGINE_TAG, universal)
        dist.barrier()
        if self.rank == 0:
            warnings.warn(f"resuming a {saved_world}-rank checkpoint on {self.world_size} ranks "
                          f"through the universal checkpoint {universal}")
        # DeepSpeed's ZeRO-3 universal loader copies the first param group's hyper-parameters
        # to every group, which would give the norm gains weight decay: keep ours.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        self.engine._config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(directory), tag=universal.name, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        for group, saved in zip(self.engine.optimizer.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "lr"})


def _trim_module_stack(root: torch.nn.Module) -> None:
    """Drop what activation recomputation left on ZeRO-3's forward-module stack.

    DeepSpeed 0.19.8 pushes a module on ``FWD_MODULE_STACK`` in its pre-forward hook and pops it
    in the post-forward hook. Recomputation (non-reentrant checkpointing) stops inside the
    sub-module being differentiated, so its post-forward hook never runs: a few entries per
    checkpointed block and micro-batch, for the whole run. After a backward no forward is in
    flight, so everything above the root module is stale.
    """
    from deepspeed.runtime.zero import parameter_offload

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if stack and stack[0] is root:
        del stack[1:]


def _convert_to_universal(source: Path, target: Path) -> None:
    """``python -m deepspeed.checkpoint.ds_to_universal`` in-process (one conversion per checkpoint)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    ds_to_universal(args)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# --- factory ---------------------------------------------------------------------------------------

class DeepSpeedEngineFactory:
    """``(module, cfg) -> DeepSpeedEngine``; also decides how the model is constructed.

    The loop builds the model inside :meth:`model_init` so that large models never exist whole on
    any rank (``deepspeed.zero.Init``).
    """

    def __init__(self, json_path: str | os.PathLike):
        path = Path(json_path)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config not found: {path}")
        try:
            self.raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        self.path = path
        ours = self.raw.get("megareweight", {})
        self.zero_init_setting = ours.get("zero_init", AUTO)
        if self.zero_init_setting not in (AUTO, True, False):
            raise ConfigError(f"{path}: megareweight.zero_init must be \"auto\", true or false")
        self.stage = int(self.raw.get("zero_optimization", {}).get("stage", 0))
        self.built_under_zero_init = False
        check_deepspeed_version()

    def init_distributed(self) -> None:
        """Create the process group before the run directory is claimed (the claim is collective)."""
        init_distributed()

    def use_zero_init(self, args: ModelArgs) -> bool:
        if self.stage != 3:
            return False
        if self.zero_init_setting != AUTO:
            return bool(self.zero_init_setting)
        return count_parameters(build_model(args, device="meta")) >= ZERO_INIT_MIN_PARAMETERS

    @contextlib.contextmanager
    def model_init(self, cfg: ExperimentConfig, args: ModelArgs) -> Iterator[None]:
        """Context for ``build_model``: ``zero.Init`` for large models under ZeRO-3."""
        init_distributed()
        if not self.use_zero_init(args):
            yield
            return
        import deepspeed

        ds = resolve_ds_config(self.raw, cfg, dist.get_world_size())
        self.built_under_zero_init = True
        with deepspeed.zero.Init(config_dict_or_path=ds):  # dtype follows the config's bf16/fp16
            yield

    def __call__(self, module: ReweightedLM, cfg: ExperimentConfig) -> DeepSpeedEngine:
        init_distributed()
        ds = resolve_ds_config(self.raw, cfg, dist.get_world_size())
        if self.built_under_zero_init:
            init_partitioned_parameters(module.model)
        return DeepSpeedEngine(module, cfg, ds)


def deepspeed_engine_factory(json_path: str | os.PathLike) -> DeepSpeedEngineFactory:
    """Entry point used by ``megareweight train --deepspeed JSON``."""
    return DeepSpeedEngineFactory(json_path)

"""The training loop, top to bottom: data -> model -> reweighted loss -> step -> metrics.

One loop serves every engine (plain PyTorch here, DeepSpeed in :mod:`megareweight.train.ds_engine`);
only rank 0 writes files. A step is ``gradient_accumulation_steps`` global micro-batches; the
reweighting weights are computed per global micro-batch (each sums to 1) and the engine averages
the micro-batch gradients.

Host syncs: batches come prefetched and pinned (:mod:`megareweight.data.prefetch`) and are
copied without blocking; the micro-batch loop reads nothing from the device. A step's one read
is ``stats.all_reduce(...)`` (metrics + gradient norm in one copy), which the loop needs before
the update to skip a step without valid samples or with a non-finite gradient. (Also: the weight
histogram every ``train.histogram_interval`` steps, and evaluation.) Throughput telemetry is
:mod:`megareweight.train.throughput`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from megareweight.config import ExperimentConfig, dump_config, model_args_for
from megareweight.data.mixture import MixtureSampler, validation_batches
from megareweight.data.prefetch import PrefetchLoader
from megareweight.data.shards import PreparedData
from megareweight.model import build_model
from megareweight.reweighting import ReweightSchedule
from megareweight.train import checkpoint as ckpt
from megareweight.train import distributed, faults, run_dir
from megareweight.train import resume as resume_policy
from megareweight.train.distributed import all_reduce_sum, broadcast_object
from megareweight.train.step_stats import StepStats
from megareweight.train.lr import lr_at
from megareweight.train.metrics import MetricsLogger, check_wandb_dir, close_wandb_quietly
from megareweight.train.objective import ReweightedLM, per_sample_domains
from megareweight.train.signals import StoppedBySignal, StopRequests
from megareweight.train.throughput import ThroughputMeter, device_name, flops_per_token, peak_tflops


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); a checkpoint was written."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    seconds: float
    loss_impl: str
    final_eval: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    is_main: bool = True


@dataclass(frozen=True)
class DomainPlan:
    """Which domains are trained (with what weight) and which are evaluated."""

    train: list[str]
    weights: dict[str, float]
    eval: list[str]

    @property
    def heldout(self) -> list[str]:
        return [d for d in self.eval if d not in self.train]


def plan_domains(cfg: ExperimentConfig, data: PreparedData) -> DomainPlan:
    """Resolve ``data.mixture``/``train_domains``/``eval_domains`` against the prepared manifest."""
    available = data.domains
    d = cfg.data

    def check(names: list[str], key: str) -> None:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"{key}: unknown domain {unknown[0]!r}; available: {', '.join(available)}")

    if isinstance(d.mixture, dict):
        check(list(d.mixture), "data.mixture")
        train = d.train_domains or [k for k, w in d.mixture.items() if w > 0]
        weights = {k: float(d.mixture.get(k, 0.0)) for k in train}
    else:
        train = d.train_domains or available
        check(train, "data.train_domains")
        if d.mixture == "uniform":
            weights = {k: 1.0 for k in train}
        else:
            weights = {k: float(data.manifest["domains"][k]["train"]["tokens"]) for k in train}
    check(train, "data.train_domains")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("data.mixture: the trained domains all have weight 0")
    weights = {k: w / total for k, w in weights.items()}
    eval_domains = d.eval_domains or available
    check(eval_domains, "data.eval_domains")
    return DomainPlan(train=list(train), weights=weights, eval=list(eval_domains))


def decide_loss_plan(cfg: ExperimentConfig, args, device: torch.device,
                     point: Optional[resume_policy.ResumePoint]) -> dict[str, Any]:
    """``loss.mode``/``loss.chunk_size`` made concrete once per run: from the config, the per-call
    shape and the memory budget (never the momentary free memory), or, on resume, what the run
    decided at its start (so fast/lean and the GEMM shapes, hence the bits, do not change)."""
    from megareweight.kernels.weighted_ce.function import plan_for_run

    saved = (point.state.get("loss_plan") if point is not None else None) or {}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    budget = int(cfg.loss.fast_memory_gb * 2**30) or None
    mode, chunk = plan_for_run(cfg.data.micro_batch_size * cfg.data.seq_len, args.d_model, args.vocab_size, dtype,
                               device, cfg.loss.mode, cfg.loss.chunk_size or None, budget)
    if cfg.loss.mode == "auto" and saved.get("mode"):
        mode = saved["mode"]
    if not cfg.loss.chunk_size and saved.get("chunk_size"):
        chunk = int(saved["chunk_size"])
    return {"mode": mode, "chunk_size": chunk, "z_loss": cfg.loss.z_loss}


def check_validation_splits(data: PreparedData, domains: list[str], seq_len: int, world_size: int) -> None:
    """Refuse (before anything is written) an evaluated domain whose validation split holds no window.

    Why an error rather than a warning: such a domain's loss has no value (its mean over zero
    windows is NaN), and a NaN written into eval.jsonl/summary.json (and the averages over domains)
    reads like a result. A window is ``seq_len + 1`` tokens within one shard, and every rank must
    score at least one (the windows are split evenly over the ranks).
    """
    need = seq_len + 1
    for domain in domains:
        stream = data.stream("valid", domain)
        windows = stream.num_windows(seq_len)
        if windows >= max(world_size, 1):
            continue
        fix = "exclude it with data.eval_domains, lower data.seq_len, or prepare with a larger --valid-fraction"
        if windows == 0:
            largest = max((s.num_tokens for s in stream.shards), default=0)
            where = f" (largest shard {largest})" if len(stream.shards) > 1 else ""
            raise ValueError(f"data.eval_domains: domain {domain!r} has {stream.num_tokens} validation tokens{where}, "
                             f"fewer than one window of data.seq_len + 1 = {need}; {fix}")
        raise ValueError(f"data.eval_domains: domain {domain!r} has {windows} validation window(s) of {need} tokens, "
                         f"fewer than the {world_size} ranks (each must score one); {fix}")


def loss_domain_weights(cfg: ExperimentConfig, plan: DomainPlan) -> Optional[list[float]]:
    """``reweight.domain_weights`` in the sampler's domain order (None unless strategy: domain);
    every trained domain needs a weight and every key must be a trained domain."""
    given = cfg.reweight.domain_weights
    if cfg.reweight.strategy != "domain" or given is None:
        return None
    unknown = [k for k in given if k not in plan.train]
    if unknown:
        raise ValueError(f"reweight.domain_weights: {unknown[0]!r} is not a trained domain; trained: {', '.join(plan.train)}")
    missing = [k for k in plan.train if k not in given]
    if missing:
        raise ValueError(f"reweight.domain_weights: no weight for trained domain {missing[0]!r}; "
                         f"give one for each of: {', '.join(plan.train)}")
    return [float(given[k]) for k in plan.train]


@torch.no_grad()
def evaluate(engine, data: PreparedData, domains: list[str], cfg: ExperimentConfig) -> dict[str, float]:
    """Mean token loss of each domain's fixed validation windows (reduced over ranks)."""
    engine.train(False)
    result = {}
    for domain in domains:
        stream = data.stream("valid", domain)
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # summed on the device: no sync per batch
        for batch in validation_batches(stream, cfg.data.seq_len, cfg.data.micro_batch_size, cfg.data.eval_sequences,
                                        engine.rank, engine.world_size, cfg.data.packing):
            out = engine.forward(batch, "uniform", 1.0)
            losses = out.per_sample_loss.double()
            ok = torch.isfinite(losses)
            total += torch.stack([torch.where(ok, losses, 0.0).sum(), ok.sum().double()])
        total = all_reduce_sum(total).cpu()
        result[domain] = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    engine.train(True)
    return result


def _eval_row(step: int, tokens: int, losses: dict[str, float], plan: DomainPlan) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step, "tokens": tokens}
    row.update({f"loss/{d}": v for d, v in losses.items()})
    trained = [losses[d] for d in plan.train if d in losses]
    heldout = [losses[d] for d in plan.heldout if d in losses]
    if trained:
        row["avg_trained"] = float(np.mean(trained))
    if heldout:
        row["avg_heldout"] = float(np.mean(heldout))
    return row


def _speed_postfix(row: dict[str, Any]) -> dict[str, str]:
    """Throughput for the progress bar: tokens/s, and MFU when the device's peak is known."""
    speed = {"tok/s": f"{row['tokens_per_s']:,.0f}"} if "tokens_per_s" in row else {}
    if "mfu" in row:
        speed["mfu"] = f"{100 * row['mfu']:.1f}%"
    return speed


def _parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters, also when ZeRO-3 holds them as empty shards (``ds_numel``)."""
    seen = {id(p): getattr(p, "ds_numel", p.numel()) for p in model.parameters()}
    return sum(seen.values())


def default_engine_factory(module: ReweightedLM, cfg: ExperimentConfig):
    from megareweight.train.engine import PlainEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return PlainEngine(module, cfg, device)


def _finished_result(out: Path, point: resume_policy.ResumePoint, is_main: bool) -> Optional[TrainResult]:
    """A resumed run that already finished: say so, log nothing again."""
    summary = distributed.decided_by_rank0(lambda: resume_policy.finished_summary(out, point.step), is_main)
    if summary is None:
        return None
    if is_main:
        resume_policy.say(f"the run in {out} already finished at step {point.step} (train.max_steps); "
                          "nothing to do. Raise train.max_steps to train further.")
    final = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("loss/")}
    return TrainResult(out, point.step, int(summary.get("tokens", 0)), float(summary.get("seconds", 0.0)),
                       str(summary.get("loss_impl", "")), final, int(summary.get("skipped_steps", 0)), is_main)


def train(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    resume: bool = False,
    engine_factory: Optional[Callable[[ReweightedLM, ExperimentConfig], Any]] = None,
    progress: bool = True,
    resume_from: Optional[str] = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train according to ``cfg``, writing everything under ``out_dir``.

    ``resume``: continue the newest intact checkpoint in ``out_dir`` (start fresh when there is
    none); ``resume_from`` (a step or a checkpoint directory) picks one and implies ``resume``;
    ``overwrite``: replace another run's files in ``out_dir`` (with ``resume_from``, only for a
    checkpoint outside ``out_dir``: another run's, which never continues in a directory holding a
    different run; see :mod:`~megareweight.train.run_dir`). The directory is locked while
    training (:mod:`~megareweight.train.run_dir`); a changed config is checked against the
    checkpoint's (:mod:`~megareweight.train.resume`). SIGTERM/SIGINT/SIGUSR1 end the run after the
    current step with a checkpoint and :class:`~megareweight.train.signals.StoppedBySignal`.
    """
    factory = engine_factory or default_engine_factory
    if hasattr(factory, "init_distributed"):  # the claim below is collective
        factory.init_distributed()
    resume = resume or resume_from is not None
    is_writer = distributed.rank() == 0
    out = Path(out_dir)
    resume_policy.check_overwrite(out, resume, resume_from, overwrite)
    data = PreparedData.open(cfg.data.prepared)
    plan = plan_domains(cfg, data)
    check_validation_splits(data, plan.eval, cfg.data.seq_len, distributed.world_size())
    distributed.decided_by_rank0(lambda: check_wandb_dir(cfg), is_writer)  # only rank 0 writes to it
    source = resume_policy.foreign_checkpoint(out, resume_from)
    with run_dir.claim(out, resume, overwrite, is_writer, source) as run, StopRequests() as stop:
        point = resume_policy.locate(cfg, out, resume_from, data.manifest, plan.train, is_writer) if resume else None
        if point is not None:
            if point.step == cfg.train.max_steps:
                finished = _finished_result(out, point, is_writer)
                if finished is not None:
                    return finished
            plan = DomainPlan(point.domains, point.train_weights(plan.weights), plan.eval)
        try:
            return _train(cfg, out, factory, progress, data, plan, run, point, stop)
        except BaseException as exc:  # the caller prints one line: wandb must not add tracebacks after it
            close_wandb_quietly(getattr(exc, "exit_code", 1))
            raise


def _train(cfg: ExperimentConfig, out: Path, factory: Callable[[ReweightedLM, ExperimentConfig], Any], progress: bool,
           data: PreparedData, plan: DomainPlan, run: run_dir.RunInfo,
           point: Optional[resume_policy.ResumePoint], stop: StopRequests) -> TrainResult:
    from megareweight.kernels.weighted_ce import get_loss_impl

    start_time = time.time()
    schedule = ReweightSchedule(**{f.name: getattr(cfg.reweight, f.name) for f in dataclasses.fields(ReweightSchedule)})

    torch.manual_seed(cfg.train.seed)
    args = model_args_for(cfg, data.vocab_size)
    # An engine may construct the model its own way (DeepSpeed: zero.Init shards large models).
    model_init = getattr(factory, "model_init", None)
    with model_init(cfg, args) if model_init else contextlib.nullcontext():
        model = build_model(args, activation_checkpointing=cfg.model.activation_checkpointing,
                            checkpoint_every=cfg.model.checkpoint_every or 2)
    n_params = _parameter_count(model)
    device_hint = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_plan = decide_loss_plan(cfg, args, device_hint, point)
    loss_name, loss_fn = get_loss_impl(cfg.loss.impl, device_hint, mode=loss_plan["mode"],
                                       chunk_size=loss_plan["chunk_size"], z_loss=cfg.loss.z_loss)
    num_segments = cfg.reweight.max_documents if cfg.reweight.unit == "document" else None
    injector = faults.from_env(distributed.rank())
    engine = factory(ReweightedLM(model, injector.wrap(loss_fn) if injector else loss_fn, cfg.reweight.delta,
                                  num_segments=num_segments, domain_weights=loss_domain_weights(cfg, plan)), cfg)
    is_main = engine.rank == 0

    sampler = PrefetchLoader(
        MixtureSampler(data.streams("train", plan.train), plan.weights, cfg.data.seq_len, cfg.data.micro_batch_size,
                       engine.rank, engine.world_size, cfg.train.seed, cfg.data.packing),
        cfg.data.prefetch, pin_memory=engine.device.type == "cuda", device=engine.device)
    accum = cfg.train.gradient_accumulation_steps
    tokens_per_step = sampler.global_batch_size * cfg.data.seq_len * accum
    meter = ThroughputMeter(flops_per_token(args, cfg.data.seq_len), engine.world_size, engine.device,
                            peak_tflops(engine.device, cfg.train.peak_tflops))

    start_step, streak, skipped = 0, 0, 0
    ckpt_root = out / "checkpoints"
    if point is not None:
        resume_policy.check_engine(point, engine.name)
        try:
            engine.load(point.path)
        except Exception as exc:  # a damaged file the size check could not see (flipped bytes)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ckpt.CheckpointError(f"{point.path}: cannot be loaded ({reason}); resume from an older "
                                       "checkpoint with --resume-from STEP") from exc
        if not distributed.all_true(ckpt.parameters_finite(engine.module)):  # e.g. older, unchecksummed files
            raise ckpt.CheckpointError(f"{point.path}: its parameters are not finite after loading; resume from "
                                       "an older checkpoint with --resume-from STEP")
        state = point.state
        sampler.load_state_dict(state["sampler"])
        if point.mixture_changed(cfg):
            sampler.set_weights(plan.weights)  # the new data.mixture takes effect from this step
        start_step, streak, skipped = state["step"], state["nonfinite_streak"], state["skipped_steps"]
        meter.tokens = state.get("tokens", start_step * tokens_per_step)  # older checkpoints lack it
        if point.path.name.startswith(ckpt.NONFINITE):
            streak = 0  # continuing past the bad batches is a deliberate new attempt
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if is_main:
        dump_config(cfg, out / "config.yaml")
    logger = MetricsLogger(out, cfg, enabled=is_main, resume_step=start_step if point is not None else None,
                           wandb_id=run.wandb_id)
    if is_main and progress:
        print(f"[megareweight] model {cfg.model.size} ({args.describe()}): {n_params:,} parameters; loss impl: {loss_name} "
              f"(mode {loss_plan['mode']}, chunk {loss_plan['chunk_size']} tokens{', z-loss ' + str(cfg.loss.z_loss) if cfg.loss.z_loss else ''}); "
              f"engine: {engine.name} x{engine.world_size}; train domains {plan.train}; held out {plan.heldout}")

    def save(step_done: int, kind: str = ckpt.REGULAR) -> Optional[Path]:
        """Write a checkpoint unless a parameter is not finite (then None, or an error for a regular one)."""
        if not distributed.all_true(ckpt.parameters_finite(engine.module)):
            if kind == ckpt.REGULAR:
                newest = ckpt.find_latest(ckpt_root, warn=False)
                raise TrainingError(f"parameters are not finite after step {step_done}; no checkpoint written "
                                    f"(the newest intact one is {newest or 'none'}). Lower optim.lr or check the data.")
            return None
        state = {"step": step_done, "model_args": dataclasses.asdict(args), "prepared_dir": str(data.root.resolve()),
                 "sampler": sampler.state_dict(), "tokens": meter.tokens, "loss_plan": loss_plan,
                 "nonfinite_streak": streak,
                 "skipped_steps": skipped, "torch_rng": torch.get_rng_state().tolist(), "config": cfg.to_dict(),
                 "engine": engine.name, "world_size": engine.world_size, "run_id": run.run_id,
                 "tokenizer_sha256": data.manifest.get("tokenizer", {}).get("sha256"),
                 "tokenizer_file": data.tokenizer_path.name,
                 "tokenizer_eos_token": data.manifest.get("tokenizer", {}).get("eos_token"),
                 "data_fingerprint": resume_policy.data_fingerprint(data.manifest, sampler.domains)}
        extra = [(data.tokenizer_path.name, data.tokenizer_path)]  # present: PreparedData.open checked it
        path = ckpt.save_checkpoint(ckpt_root, step_done, state, engine.save, is_writer=is_main,
                                    all_ok=distributed.all_true, kind=kind, extra_files=extra)
        if is_main and kind == ckpt.REGULAR:
            ckpt.prune(ckpt_root, cfg.train.keep_checkpoints, protect=path)
        return path

    bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", disable=not (is_main and progress),
               dynamic_ncols=True)
    last_eval: dict[str, float] = {}
    speed: dict[str, str] = {}
    engine.train(True)
    for step in range(start_step, cfg.train.max_steps):
        t0 = time.time()
        if injector:
            injector.begin_step(step + 1)
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
        strategy, r = schedule.at(step)
        stats = StepStats(plan.train, engine.rank, accum)
        for _ in range(accum):
            batch = sampler.next_batch()
            out_ = engine.forward(batch, strategy, r)
            engine.backward(out_.loss)
            stats.add(out_, *per_sample_domains(batch, num_segments))
        stats.all_reduce(grad_norm=engine.clip_gradients())  # the step's one host sync
        if stats.valid_samples == 0:
            engine.skip_step()
            streak += 1
            skipped += 1
            grad_norm = float("nan")
        else:
            grad_norm = engine.step(lr, stats.grad_norm)
            if math.isfinite(grad_norm):
                streak = 0
            else:
                streak += 1
                skipped += 1
        if streak >= cfg.train.max_nonfinite_steps:
            stop_checkpoint = save(step + 1, ckpt.NONFINITE)
            message = resume_policy.nonfinite_stop_message(streak, step + 1, stop_checkpoint, ckpt_root)
            sampler.close()
            raise TrainingError(message)
        step_done = step + 1
        step_seconds = time.time() - t0
        meter.add_step(tokens_per_step, step_seconds)
        row: dict[str, Any] = {
            "step": step_done,
            "tokens": meter.tokens,
            **stats.row(),
            "lr": lr,
            "grad_norm": grad_norm,
            "strategy": strategy,
            "r": r,
            "skipped_steps": skipped,
            "step_seconds": step_seconds,
        }
        row.update({f"mixture/{d}": float(w) for d, w in zip(sampler.domains, sampler.weights)})
        row.update({f"epochs/{d}": e for d, e in sampler.epochs().items()})
        if step_done % cfg.train.log_interval == 0 or step_done == cfg.train.max_steps:
            row.update(meter.row())
            logger.log_step(row)
            speed = _speed_postfix(row)
        if cfg.train.histogram_interval and step_done % cfg.train.histogram_interval == 0:
            weights = out_.weights.detach().float().cpu()
            logger.log_histogram(step_done, "weight_hist", (weights[weights > 0] if num_segments else weights).numpy())
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", **speed)
        if cfg.train.eval_interval and (step_done % cfg.train.eval_interval == 0) and step_done != cfg.train.max_steps:
            last_eval = evaluate(engine, data, plan.eval, cfg)
            logger.log_eval(_eval_row(step_done, row["tokens"], last_eval, plan))
        saved = None
        if cfg.train.checkpoint_interval and step_done % cfg.train.checkpoint_interval == 0 and step_done != cfg.train.max_steps:
            saved = save(step_done)
        signum = stop.agreed()
        if signum:
            bar.close()
            saved = saved or save(step_done)
            sampler.close()
            raise StoppedBySignal(signum, step_done, saved)
    bar.close()
    sampler.close()
    total_steps = cfg.train.max_steps
    if start_step < total_steps:
        save(total_steps)  # before the final evaluation: a kill during it loses no training
    eval_row = broadcast_object(logger.eval_row(total_steps) if start_step == total_steps and is_main else None)
    if eval_row is None:
        last_eval = evaluate(engine, data, plan.eval, cfg)
        eval_row = _eval_row(total_steps, meter.tokens, last_eval, plan)
        logger.log_eval(eval_row)
    else:  # resumed after the final checkpoint: the final evaluation is already logged
        last_eval = {k.split("/", 1)[1]: v for k, v in eval_row.items() if k.startswith("loss/")}
    seconds = time.time() - start_time
    # tokens_per_domain: what the sampler actually drew (domains are drawn per slot at random, so
    # it differs from mixture x tokens); AutoScale's fit (megareweight.autoscale) reads it.
    logger.finish({**eval_row, "seconds": seconds, "loss_impl": loss_name, "loss_plan": loss_plan, "parameters": n_params,
                   "skipped_steps": skipped, "engine": engine.name, "world_size": engine.world_size,
                   "device": device_name(engine.device), "flops_per_token": meter.flops_per_token,
                   "peak_tflops": meter.peak_tflops, "tokens_per_domain": sampler.tokens_consumed()})
    return TrainResult(out, total_steps, meter.tokens, seconds, loss_name, last_eval, skipped, is_main)

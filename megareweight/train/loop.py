"""The training loop, top to bottom: data -> model -> reweighted loss -> step -> metrics.

One loop serves every engine (plain PyTorch here, DeepSpeed in :mod:`megareweight.train.ds_engine`);
only rank 0 writes files. A step is ``gradient_accumulation_steps`` global micro-batches; the
reweighting weights are computed per global micro-batch (each sums to 1) and the engine averages
the micro-batch gradients.
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

from megareweight.config import ExperimentConfig, dump_config
from megareweight.data.mixture import MixtureSampler, validation_batches
from megareweight.data.shards import PreparedData
from megareweight.model import build_model, model_args
from megareweight.reweighting import ReweightSchedule
from megareweight.train import checkpoint as ckpt
from megareweight.train.distributed import all_reduce_sum
from megareweight.train.step_stats import StepStats
from megareweight.train.lr import lr_at
from megareweight.train.metrics import MetricsLogger
from megareweight.train.objective import ReweightedLM


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


@torch.no_grad()
def evaluate(engine, data: PreparedData, domains: list[str], cfg: ExperimentConfig) -> dict[str, float]:
    """Mean token loss of each domain's fixed validation windows (reduced over ranks)."""
    engine.train(False)
    result = {}
    for domain in domains:
        shard = data.shard("valid", domain)
        total = torch.zeros(2, dtype=torch.float64)
        for tokens in validation_batches(shard, cfg.data.seq_len, cfg.data.micro_batch_size, cfg.data.eval_sequences,
                                         engine.rank, engine.world_size):
            out = engine.forward({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}, "uniform", 1.0)
            losses = out.per_sample_loss.double().cpu()
            ok = torch.isfinite(losses)
            total += torch.stack([losses[ok].sum(), ok.sum().double()])
        total = all_reduce_sum(total.to(engine.device)).cpu()
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


def _parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters, also when ZeRO-3 holds them as empty shards (``ds_numel``)."""
    seen = {id(p): getattr(p, "ds_numel", p.numel()) for p in model.parameters()}
    return sum(seen.values())


def default_engine_factory(module: ReweightedLM, cfg: ExperimentConfig):
    from megareweight.train.engine import PlainEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return PlainEngine(module, cfg, device)


def train(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    resume: bool = False,
    engine_factory: Optional[Callable[[ReweightedLM, ExperimentConfig], Any]] = None,
    progress: bool = True,
) -> TrainResult:
    """Train according to ``cfg``, writing everything under ``out_dir``."""
    from kernels import get_loss_impl

    out = Path(out_dir)
    start_time = time.time()
    data = PreparedData.open(cfg.data.prepared)
    plan = plan_domains(cfg, data)
    schedule = ReweightSchedule(**dataclasses.asdict(cfg.reweight))

    torch.manual_seed(cfg.train.seed)
    args = model_args(cfg.model.size, vocab_size=data.vocab_size, tie_embeddings=cfg.model.tie_embeddings)
    if cfg.data.seq_len > args.max_seq_len:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds the {cfg.model.size} model's max_seq_len {args.max_seq_len}")
    factory = engine_factory or default_engine_factory
    # An engine may construct the model its own way (DeepSpeed: zero.Init shards large models).
    model_init = getattr(factory, "model_init", None)
    with model_init(cfg, args) if model_init else contextlib.nullcontext():
        model = build_model(args, activation_checkpointing=cfg.model.activation_checkpointing)
    n_params = _parameter_count(model)
    device_hint = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_name, loss_fn = get_loss_impl(cfg.loss.impl, device_hint, mode=cfg.loss.mode, chunk_size=cfg.loss.chunk_size)
    engine = factory(ReweightedLM(model, loss_fn, cfg.reweight.delta), cfg)
    is_main = engine.rank == 0

    sampler = MixtureSampler(data.shards("train", plan.train), plan.weights, cfg.data.seq_len,
                             cfg.data.micro_batch_size, engine.rank, engine.world_size, cfg.train.seed)
    accum = cfg.train.gradient_accumulation_steps
    tokens_per_step = sampler.global_batch_size * cfg.data.seq_len * accum

    start_step, streak, skipped = 0, 0, 0
    ckpt_root = out / "checkpoints"
    if resume:
        latest = ckpt.find_latest(ckpt_root)
        if latest is not None:
            engine.load(latest)
            state = ckpt.read_state(latest)
            sampler.load_state_dict(state["sampler"])
            start_step, streak, skipped = state["step"], state["nonfinite_streak"], state["skipped_steps"]
            torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    logger = MetricsLogger(out, cfg, enabled=is_main, resume_step=start_step if resume else None)
    if is_main and progress:
        print(f"[megareweight] model {cfg.model.size}: {n_params:,} parameters; loss impl: {loss_name}; "
              f"engine: {engine.name} x{engine.world_size}; train domains {plan.train}; held out {plan.heldout}")

    def save(step_done: int) -> None:
        state = {"step": step_done, "model_args": dataclasses.asdict(args), "prepared_dir": str(data.root.resolve()),
                 "sampler": sampler.state_dict(),
                 "nonfinite_streak": streak,
                 "skipped_steps": skipped, "torch_rng": torch.get_rng_state().tolist(), "config": cfg.to_dict()}
        ckpt.save_checkpoint(ckpt_root, step_done, state, engine.save, is_writer=is_main, barrier=engine.barrier)
        if is_main:
            ckpt.prune(ckpt_root, cfg.train.keep_checkpoints)

    bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", disable=not (is_main and progress),
               dynamic_ncols=True)
    last_eval: dict[str, float] = {}
    engine.train(True)
    for step in range(start_step, cfg.train.max_steps):
        t0 = time.time()
        lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
        strategy, r = schedule.at(step)
        stats = StepStats(plan.train, engine.rank, accum)
        for _ in range(accum):
            batch = sampler.next_batch()
            out_ = engine.forward(batch, strategy, r)
            engine.backward(out_.loss)
            stats.add(out_, batch["domain_ids"])
        stats.all_reduce()
        if stats.valid_samples == 0:
            engine.skip_step()
            streak += 1
            skipped += 1
            grad_norm = float("nan")
        else:
            grad_norm = float(engine.step(lr))
            if math.isfinite(grad_norm):
                streak = 0
            else:
                streak += 1
                skipped += 1
        if streak >= cfg.train.max_nonfinite_steps:
            save(step + 1)
            raise TrainingError(
                f"{streak} consecutive steps had only non-finite losses or gradients (last at step {step}); "
                f"stopped, checkpoint saved in {ckpt_root}. Lower optim.lr or check the data."
            )
        step_done = step + 1
        row: dict[str, Any] = {
            "step": step_done,
            "tokens": step_done * tokens_per_step,
            **stats.row(),
            "lr": lr,
            "grad_norm": grad_norm,
            "strategy": strategy,
            "r": r,
            "skipped_steps": skipped,
            "step_seconds": time.time() - t0,
        }
        row.update({f"mixture/{d}": float(w) for d, w in zip(sampler.domains, sampler.weights)})
        row.update({f"epochs/{d}": e for d, e in sampler.epochs().items()})
        if step_done % cfg.train.log_interval == 0 or step_done == cfg.train.max_steps:
            logger.log_step(row)
        if cfg.train.histogram_interval and step_done % cfg.train.histogram_interval == 0:
            logger.log_histogram(step_done, "weight_hist", out_.weights.detach().float().cpu().numpy())
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}")
        if cfg.train.eval_interval and (step_done % cfg.train.eval_interval == 0) and step_done != cfg.train.max_steps:
            last_eval = evaluate(engine, data, plan.eval, cfg)
            logger.log_eval(_eval_row(step_done, row["tokens"], last_eval, plan))
        if cfg.train.checkpoint_interval and step_done % cfg.train.checkpoint_interval == 0 and step_done != cfg.train.max_steps:
            save(step_done)
    bar.close()
    total_steps = cfg.train.max_steps
    last_eval = evaluate(engine, data, plan.eval, cfg)
    eval_row = _eval_row(total_steps, total_steps * tokens_per_step, last_eval, plan)
    logger.log_eval(eval_row)
    save(total_steps)
    seconds = time.time() - start_time
    # tokens_per_domain: what the sampler actually drew (domains are drawn per slot at random, so
    # it differs from mixture x tokens); AutoScale's fit (megareweight.autoscale) reads it.
    logger.finish({**eval_row, "seconds": seconds, "loss_impl": loss_name, "parameters": n_params,
                   "skipped_steps": skipped, "engine": engine.name, "world_size": engine.world_size,
                   "tokens_per_domain": sampler.tokens_consumed()})
    return TrainResult(out, total_steps, total_steps * tokens_per_step, seconds, loss_name, last_eval, skipped, is_main)

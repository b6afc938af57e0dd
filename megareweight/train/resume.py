"""Resume policy: which checkpoint, and whether the current config may continue it.

``--resume`` either continues exactly or refuses, in one line naming every key that differs and
cannot change. Keys that may change are listed in :data:`MAY_CHANGE` (and the README) and all take
effect: the learning-rate schedule is computed from the config at every step, intervals and
limits are read by the loop, the sampler adopts a new ``data.mixture`` (``set_weights``), the
reweighting schedule and the loss implementation are rebuilt from the config, and a new wandb
section applies to the same wandb run. Everything else refuses, including keys this module does
not know (a key added later is safe until someone decides it may change):

* shapes and numerics: ``model.size``, ``model.tie_embeddings``, ``data.seq_len``,
  ``train.precision``, ``optim.beta1/beta2/eps`` and ``optim.weight_decay`` (the optimizer's
  saved hyper-parameters would silently win over the config);
* the data stream: ``train.seed``, the prepared data (compared by content, so a moved directory
  is fine: tokenizer SHA-256 and the trained domains' shard checksums), and the set of trained
  domains (a new mixture may re-weight them, also to 0, but not add one: the sampler's position in
  a domain it never had is undefined);

The batch may change (``data.micro_batch_size``, ``train.gradient_accumulation_steps``, the number
of ranks through DeepSpeed's universal checkpoint): the sampler's counters are global, so the
stream continues without repeats or gaps, and ``tokens`` counts what was trained. The change of
the global batch is printed with the others.
* the engine (plain vs DeepSpeed, ZeRO stage): different checkpoint formats;
* ``train.max_steps`` below the checkpoint's step.
"""
from __future__ import annotations

import fnmatch
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megareweight.config import ExperimentConfig
from megareweight.train import checkpoint as ckpt
from megareweight.train.distributed import decided_by_rank0, world_size

#: Config keys a resume may change (fnmatch patterns over ``section.key``).
MAY_CHANGE = (
    "optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.grad_clip",
    "train.max_steps", "train.eval_interval", "train.log_interval", "train.checkpoint_interval",
    "train.histogram_interval", "train.keep_checkpoints", "train.max_nonfinite_steps",
    "data.mixture", "data.train_domains", "data.eval_domains", "data.eval_sequences",
    "data.prepared",  # checked below: same content
    "data.micro_batch_size", "train.gradient_accumulation_steps", "data.prefetch",
    "model.activation_checkpointing", "model.checkpoint_every", "train.compile", "train.peak_tflops",
    "reweight.*", "loss.*", "wandb.*",
)


class ResumeError(ValueError):
    """The checkpoint cannot be continued with this config or these arguments (exit code 2)."""


def may_change(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_CHANGE)


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (values such as a mixture stay whole)."""
    return {f"{section}.{key}": value for section, keys in config.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def _hashes(entry: Any) -> list[str]:
    """Every ``*sha256`` value under a manifest entry (one file or a list of files per domain)."""
    if isinstance(entry, dict):
        return sorted(h for key, value in entry.items()
                      for h in ([value] if key.endswith("sha256") and isinstance(value, str) else _hashes(value)))
    if isinstance(entry, list):
        return sorted(h for item in entry for h in _hashes(item))
    return []


def data_fingerprint(manifest: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """What identifies the training data: the tokenizer and the trained domains' shard checksums.

    Only checksums, not the whole manifest entry: metadata added to the manifest later (counts,
    token-id ranges) must not make an unchanged corpus look different.
    """
    return {"tokenizer_sha256": manifest.get("tokenizer", {}).get("sha256"),
            "vocab_size": manifest.get("vocab_size"),
            "train": {d: _hashes(manifest["domains"][d]["train"]) for d in domains if d in manifest.get("domains", {})}}


@dataclass
class ResumePoint:
    """A checked checkpoint to continue: its path, trainer state and what changed."""

    path: Path
    state: dict[str, Any]
    changes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def domains(self) -> list[str]:
        """The trained domains, in the sampler's order (the order its random plan depends on)."""
        return list(self.state["sampler"]["consumed"])

    def train_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """The config's mixture over the checkpoint's domains (0 for a domain it leaves out)."""
        return {d: float(weights.get(d, 0.0)) for d in self.domains}

    def mixture_changed(self, cfg: ExperimentConfig) -> bool:
        saved = self.state["config"]["data"]
        return saved.get("mixture") != cfg.data.mixture or saved.get("train_domains") != cfg.data.train_domains


def select_checkpoint(root: Path, resume_from: Optional[str]) -> Optional[Path]:
    """``--resume``: the newest intact checkpoint (None: start fresh). ``--resume-from STEP|PATH``: that one.

    Checksums are verified (the checkpoint is about to be loaded). ``--resume`` where every
    checkpoint is damaged refuses, naming the newest one's reason: starting at step 0 would
    silently begin the run again over its own metrics.
    """
    if resume_from is None:
        latest, damaged = ckpt.scan(root, content=True)
        if latest is None and damaged:
            raise ckpt.CheckpointError(f"--resume: {ckpt.none_intact(root, damaged)}; nothing to continue "
                                       "(start a new run with --overwrite, or repair the checkpoint)")
        return latest
    text = str(resume_from)
    path = root / ckpt.checkpoint_name(int(text)) if text.isdigit() else Path(text)
    if not path.is_dir():
        steps = [p.name for p in ckpt.regular_checkpoints(root)]
        raise ResumeError(f"--resume-from {text}: no checkpoint {path}; available in {root}: "
                          f"{', '.join(steps) or 'none'}")
    reason = ckpt.problem(path, content=True)
    if reason is not None:
        raise ResumeError(f"--resume-from {text}: checkpoint {path} is unusable: {reason}")
    return path


def foreign_checkpoint(out: Path, resume_from: Optional[str]) -> Optional[Path]:
    """The checkpoint ``--resume-from PATH`` names when it lies outside ``out`` (None for a step, or
    a path inside ``out``): another directory's run, whose identity :func:`run_dir.claim` checks."""
    if resume_from is None or str(resume_from).isdigit():
        return None
    path = Path(resume_from).resolve()
    return None if path.is_relative_to(Path(out).resolve()) else path


def check_overwrite(out: Path, resume: bool, resume_from: Optional[str], overwrite: bool) -> None:
    """``--overwrite`` with a resume only makes sense for a checkpoint outside ``out`` (it would
    delete the very checkpoint to continue otherwise)."""
    if overwrite and resume and foreign_checkpoint(out, resume_from) is None:
        raise ResumeError("--overwrite starts a new run; it cannot be combined with --resume or with --resume-from "
                          "a checkpoint inside --out (only with --resume-from a checkpoint of another directory)")


def check(path: Path, cfg: ExperimentConfig, world_size: int, manifest: dict[str, Any],
          train_domains: list[str]) -> ResumePoint:
    """Compare ``cfg`` with the checkpoint's; raise :class:`ResumeError` naming every refused key."""
    state = ckpt.read_state(path)
    # A key the checkpoint's config lacks was added to the config later: the checkpoint ran with
    # its default. A key the current config lacks was removed: nothing can honour it, so it is ignored.
    now = flatten(cfg.to_dict())
    saved = {**flatten(ExperimentConfig().to_dict()), **flatten(state.get("config", {}))}
    refused, allowed = [], []
    for key in sorted(now):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        line = f"{key} {old!r} -> {new!r}"
        (allowed if may_change(key) else refused).append(line)
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        allowed.append(f"world size {saved_world} -> {world_size}")
    if saved_world is not None:
        before = saved["data.micro_batch_size"] * saved_world * saved["train.gradient_accumulation_steps"]
        after = cfg.data.micro_batch_size * world_size * cfg.train.gradient_accumulation_steps
        if before != after:
            allowed.append(f"global batch {before} -> {after} sequences per step")
    if "data_fingerprint" in state:
        domains = list(state["sampler"]["consumed"])
        if data_fingerprint(manifest, domains) != state["data_fingerprint"]:
            refused.append(f"data.prepared {cfg.data.prepared!r}: tokenizer or training shards differ from the "
                           "checkpoint's (re-prepared or another corpus)")
    added = [d for d in train_domains if d not in state["sampler"]["consumed"]]
    if added:
        refused.append(f"trained domains: {', '.join(added)} not trained before (the checkpoint has "
                       f"{', '.join(state['sampler']['consumed'])})")
    if cfg.train.max_steps < state["step"]:
        refused.append(f"train.max_steps {cfg.train.max_steps} is below the checkpoint's step {state['step']}")
    if refused:
        raise ResumeError(f"cannot resume {path} with this config: {'; '.join(refused)} "
                          "(the README lists the keys that may change on resume)")
    return ResumePoint(path, state, allowed)


def check_engine(point: ResumePoint, engine_name: str) -> None:
    saved = point.state.get("engine")
    if saved is not None and saved != engine_name:
        raise ResumeError(f"cannot resume {point.path}: it was written by the {saved} engine, this run uses "
                          f"{engine_name} (checkpoint formats differ)")


def finished_summary(out: Path, step: int) -> Optional[dict[str, Any]]:
    """The summary of a run that finished at ``step`` (its final evaluation logged), or None."""
    try:
        summary = json.loads((Path(out) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("step") == step else None


def say(message: str) -> None:
    print(f"[megareweight] {message}", file=sys.stderr, flush=True)


def locate(cfg: ExperimentConfig, out: Path, resume_from: Optional[str], manifest: dict[str, Any],
           train_domains: list[str], is_writer: bool) -> Optional[ResumePoint]:
    """Pick and check the checkpoint to continue (None: start fresh); the same answer on every rank.

    Rank 0 decides, under the run-directory lock: it removes half-written temporaries, picks the
    checkpoint, checks the config, retires newer checkpoints of an abandoned continuation and
    prints the step it continues from. A refusal is raised on every rank.
    """
    def decide() -> Optional[ResumePoint]:
        root = Path(out) / "checkpoints"
        ckpt.remove_temporaries(root)
        path = select_checkpoint(root, resume_from)
        if path is None:
            say(f"--resume: no checkpoint in {root}; starting at step 0")
            return None
        point = check(path, cfg, world_size(), manifest, train_domains)
        # Also for a checkpoint from elsewhere: run_dir.claim let it in only for this run (or an emptied
        # directory), so newer checkpoints here belong to a continuation being replaced.
        retired = ckpt.retire_newer(root, point.step)
        if retired is not None:
            warnings.warn(f"checkpoints newer than {path.name} belong to the continuation being replaced; "
                          f"moved to {retired}")
        changes = f"; changed: {'; '.join(point.changes)}" if point.changes else ""
        say(f"resuming from step {point.step} ({path}){changes}")
        return point

    return decided_by_rank0(decide, is_writer)


def nonfinite_stop_message(streak: int, step: int, saved: Optional[Path], root: Path) -> str:
    """One line: what stopped, what was saved where, and the two ways to continue."""
    last = ckpt.find_latest(root, warn=False)
    kept = (f"the state at the stop (finite parameters, data position after those batches) is in {saved}: "
            f"continue past the bad batches with --resume-from {saved}; " if saved else
            "the parameters are not finite, so no checkpoint was written; ")
    back = (f"--resume restarts from the last regular checkpoint {last.name}" if last else
            "--resume starts over (no regular checkpoint yet)")
    return (f"{streak} consecutive steps had only non-finite losses or gradients (last at step {step}); stopped. "
            f"{kept}{back}. Lower optim.lr or check the data.")

"""Load a trained model back from a run's checkpoint, whichever engine wrote it.

* plain engine: ``engine.pt`` holds the model state dict;
* DeepSpeed (any ZeRO stage): the sharded checkpoint is consolidated to fp32 with DeepSpeed's own
  ``get_fp32_state_dict_from_zero_checkpoint`` (no GPU, no launcher needed).

``trainer_state.json`` beside it records the model's shapes (``model_args``), so a checkpoint can be
used without the prepared data it was trained on, and the tokenizer's SHA-256; the checkpoint also
carries a copy of the tokenizer. :func:`run_tokenizer` uses that copy, and refuses a tokenizer
whose SHA-256 differs from the recorded one: re-preparing the data directory (a new tokenizer with
the same vocabulary size) must never make eval or export silently use the wrong one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megareweight.data.shards import sha256_file, tokenizer_spec
from megareweight.model import ModelArgs, Transformer, build_model
from megareweight.train.checkpoint import STATE, CheckpointError, none_intact, problem, scan

ENGINE_FILE = "engine.pt"
DEEPSPEED_TAG = "engine"


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a ``checkpoints/`` directory or a run directory.

    Checksums are verified (the files are about to be loaded). Where checkpoints exist but none is
    intact, the error gives the newest one's reason rather than "no checkpoint".
    """
    path = Path(path)
    if (path / STATE).is_file():
        reason = problem(path, content=True)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {reason}")
        return path
    for root in (path, path / "checkpoints"):
        latest, damaged = scan(root, content=True)
        if latest is not None:
            return latest
        if damaged:
            raise CheckpointError(none_intact(root, damaged))
    raise FileNotFoundError(f"no complete checkpoint in {path} (expected {STATE} or a checkpoints/ directory)")


def prepared_dir(state: dict) -> Path:
    """The run's prepared-data directory (absolute since it was recorded; older states: as configured)."""
    return Path(state.get("prepared_dir") or state.get("config", {}).get("data", {}).get("prepared", ""))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """(model in eval mode with fp32 weights, trainer state) from a checkpoint."""
    ckpt = resolve_checkpoint(path)
    state = json.loads((ckpt / STATE).read_text())
    if "model_args" not in state:
        raise ValueError(f"{ckpt / STATE}: no model_args (checkpoint written by an older version)")
    args = ModelArgs(**state["model_args"])
    model = build_model(args)
    if (ckpt / ENGINE_FILE).is_file():
        weights = torch.load(ckpt / ENGINE_FILE, map_location="cpu", weights_only=True)["model"]
    elif (ckpt / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_TAG)
        weights = {k.removeprefix("model."): v for k, v in full.items()}
    else:
        raise FileNotFoundError(f"{ckpt}: neither {ENGINE_FILE} nor a DeepSpeed '{DEEPSPEED_TAG}' directory")
    if args.tie_embeddings:
        weights.pop("lm_head.weight", None)
    bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:  # a checkpoint written before checksums, or damaged before they were computed
        raise CheckpointError(f"{ckpt}: parameter {bad[0]} has non-finite values"
                              f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; use an older checkpoint")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), state


def run_tokenizer(checkpoint: str | Path, state: dict,
                  explicit: Optional[str | Path] = None) -> tuple[Path, Optional[str]]:
    """(tokenizer file, end-of-document token) to use with a checkpoint: ``explicit``, else the
    checkpoint's own copy, else the one of the run's prepared directory.

    Checked against the SHA-256 the checkpoint recorded (when it recorded one); a mismatch is a
    :class:`CheckpointError` naming the file.
    """
    ckpt = resolve_checkpoint(checkpoint)
    own = ckpt / state.get("tokenizer_file", "tokenizer.model")
    if explicit:
        path, eos_token = Path(explicit), None
    elif own.is_file():
        path, eos_token = own, state.get("tokenizer_eos_token")
    else:
        path, eos_token = tokenizer_spec(prepared_dir(state))
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found" + ("" if explicit else "; pass --tokenizer"))
    expected = state.get("tokenizer_sha256")
    if expected and sha256_file(path) != expected:
        if not explicit and path == own:
            raise CheckpointError(f"the checkpoint's own copy {path} is not the tokenizer {ckpt} was trained with "
                                  "(SHA-256 differs: modified after the checkpoint was written); pass the original "
                                  "with --tokenizer")
        how = "--tokenizer" if explicit else "the run's prepared directory now holds"
        raise CheckpointError(f"{how} {path} is not the tokenizer {ckpt} was trained with (SHA-256 differs: "
                              "re-prepared or another tokenizer); pass the original with --tokenizer")
    return path, eos_token

"""File names, JSON/YAML helpers and the error type of the AutoScale workflow.

Every stage reads and writes plain files in one directory per budget (the *plan directory*), so
each stage can run on another machine or day:

    plan.json            the runs, their seeds and expected token counts      (mix plan)
    base.yaml            the base config as given (target configs start from it)
    configs/<run>.yaml   one train config per run
    runs/<run>/          what `megareweight train` writes (summary.json has tokens_per_domain)
    fit.json             fits, noise, guards, the DDO mixture                 (mix fit)
    weights.yaml         that mixture as {domain: weight}
    mixture_config.yaml  the base config with that mixture, ready to train    (for mix validate)
    validation.json      predicted vs actual for trained runs of the mixture  (mix validate)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from megareweight.json_files import read_json_file, write_json_atomic
from megareweight.mixing.errors import MixingError

PLAN_FILE = "plan.json"
BASE_CONFIG_FILE = "base.yaml"
FIT_FILE = "fit.json"
WEIGHTS_FILE = "weights.yaml"
MIXTURE_CONFIG_FILE = "mixture_config.yaml"
TARGET_CONFIG_FILE = "config.yaml"
EXTRAPOLATION_FILE = "extrapolation.json"
VALIDATION_FILE = "validation.json"


class WorkflowError(MixingError):
    """A plan directory, run output or fit file is missing, unfinished or inconsistent (exit 2)."""


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_tokens(text: str | float | int, what: str = "tokens") -> int:
    """``"200k"``, ``"1.5M"``, ``"2e6"`` or ``300000`` -> a positive integer token count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().replace("_", "").replace(",", "")
        scale = 1.0
        if s and s[-1] in _SUFFIXES:
            scale, s = _SUFFIXES[s[-1]], s[:-1]
        try:
            value = float(s) * scale
        except ValueError:
            raise WorkflowError(f"{what}: cannot read {text!r} as a token count (e.g. 200000, 200k, 1.5M)") from None
    if not math.isfinite(value) or value < 1:
        raise WorkflowError(f"{what}: must be a token count >= 1, got {text!r}")
    return int(round(value))


def read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_file(path, WorkflowError, f"{what} not found")


def write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj)


def write_weights_yaml(path: Path, weights: dict[str, float], header: str = "") -> None:
    """``{domain: weight}`` as YAML (full precision, so the weights sum to 1 as the config requires)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    text = yaml.safe_dump({d: float(w) for d, w in weights.items()}, sort_keys=False)
    path.write_text("\n".join(lines) + ("\n" if lines else "") + text)

"""``mix extrapolate``: the mixture at a larger budget from two fits, and a train config for it.

With the DDO optima ``N(1)``, ``N(2)`` of two fits (smaller budget first), AutoScale's rule
``N_i(t) = N_i(1) (N_i(2)/N_i(1))^(t-1)`` is solved for the ``t`` that gives the target total
(:func:`~megareweight.mixing.extrapolate_partial`). The rule reads a trend into two *interior*
optima; a domain that was held (no usable fit) or whose optimum sat on a bound at either budget
has none, so it is *frozen*: it keeps its share of the larger budget's mixture and the free
domains follow the rule among themselves. (The alternative, refusing, would leave the user with
nothing; the frozen domains and why are listed in ``extrapolation.json`` and printed.) The counts
are then capped by availability (``max_epochs`` passes over each domain's training tokens).

Outputs in ``--out``: ``extrapolation.json``, ``weights.yaml`` and ``config.yaml``, the plan's base
config training that mixture for the target's number of tokens (:mod:`.target`), which
``megareweight train --config`` runs as is.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megareweight.autoscale.files import (
    BASE_CONFIG_FILE,
    EXTRAPOLATION_FILE,
    TARGET_CONFIG_FILE,
    WEIGHTS_FILE,
    WorkflowError,
    parse_tokens,
    write_json,
    write_weights_yaml,
)
from megareweight.autoscale.fit import load_fit
from megareweight.autoscale.target import write_target_config
from megareweight.config import load_config
from megareweight.mixing import DEFAULT_MAX_EPOCHS, InfeasibleError, MixingError, MixingWarning, extrapolate_partial


def _frozen_reasons(fit: dict[str, Any]) -> dict[str, str]:
    budget = f"{fit['budget_tokens']:,.0f} tokens"
    out = {d: f"held at {budget}" for d in fit.get("held_domains", [])}
    out.update({d: f"on its {kind} bound at {budget}" for d, kind in fit.get("bound_domains", {}).items()})
    return out


def _check_free_domains(domains: list[str], frozen: dict[str, str], n1: np.ndarray, n2: np.ndarray,
                        shares: np.ndarray, target: int, b1: float, b2: float) -> None:
    """Refuse, in terms of the user's budgets, what :func:`extrapolate_partial` would refuse in its own.

    The rule runs over the free domains only, on their part of each budget; its errors would
    quote those internal totals ("sum(n1)=900") instead of ``--target`` and the fits' budgets.
    """
    free = np.array([d not in frozen for d in domains])
    if not free.any():
        return
    names = ", ".join(d for d, f in zip(domains, free) if f)
    s1, s2 = float(n1[free].sum()), float(n2[free].sum())
    if s2 <= s1:
        raise WorkflowError(f"the free domains ({names}) get {s1:,.0f} of the smaller fit's {b1:,.0f} tokens but "
                            f"{s2:,.0f} of the larger fit's {b2:,.0f}: their optima do not grow, so there is no trend "
                            "to extrapolate")
    room = target * (1.0 - float(np.nansum(shares)))
    if room < s1 * (1 - 1e-12):
        raise WorkflowError(f"--target {target:,} tokens leaves the free domains ({names}) {room:,.0f} tokens after "
                            f"the frozen domains' shares, fewer than the {s1:,.0f} they get at the smaller fit's budget "
                            f"{b1:,.0f}; raise --target")


def extrapolate_fits(small: dict[str, Any] | str | Path, large: dict[str, Any] | str | Path, target_tokens: int | str,
                     *, max_epochs: Optional[float] = None,
                     available: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Predict the mixture at ``target_tokens`` from two fits (smaller budget first).

    Capping uses each domain's available training tokens (from the larger fit unless ``available``
    is given) and ``max_epochs`` (default: the larger fit's, else 4).
    """
    target = parse_tokens(target_tokens, "--target")  # first: a bad argument is named before any file is read
    f1 = small if isinstance(small, dict) else load_fit(small)
    f2 = large if isinstance(large, dict) else load_fit(large)
    if sorted(f1["domains"]) != sorted(f2["domains"]):     # the order may differ: matched by name
        raise WorkflowError(f"the two fits have different domains: {f1['domains']} vs {f2['domains']}")
    domains = list(f2["domains"])
    b1, b2 = float(f1["budget_tokens"]), float(f2["budget_tokens"])
    if b1 >= b2:
        raise WorkflowError(f"the first --fit must be the smaller budget: got {b1:,.0f} then {b2:,.0f} tokens")
    if f1.get("objective", {}).get("kind") != f2.get("objective", {}).get("kind"):
        raise WorkflowError(f"the two fits used different objectives ({f1.get('objective', {}).get('kind')} vs "
                            f"{f2.get('objective', {}).get('kind')}); fit both with the same --objective")
    if target < b1:
        raise WorkflowError(f"--target {target:,} tokens is below the smaller fit's budget {b1:,.0f} tokens: that is "
                            "not extrapolation; plan and fit a mixture at that budget instead")
    notes: list[str] = []
    if target < b2:
        notes.append(f"target {target:,} tokens is below the larger fitted budget {b2:,.0f}: this interpolates")
    reasons: dict[str, list[str]] = {}
    for f in (f1, f2):
        for d, why in _frozen_reasons(f).items():
            reasons.setdefault(d, []).append(why)
    frozen = {d: "; ".join(v) for d, v in reasons.items()}
    shares = np.array([f2["weights"][d] if d in frozen else np.nan for d in domains])
    if frozen:
        notes.append("frozen at their share of the larger budget's mixture (AutoScale's rule needs interior optima): "
                     + ", ".join(f"{d} ({why})" for d, why in frozen.items()))
    if len(frozen) == len(domains):
        notes.append("every domain is frozen: the larger budget's mixture is reused unchanged")
    n1 = np.array([f1["optimal_tokens"][d] for d in domains], dtype=float)
    n2 = np.array([f2["optimal_tokens"][d] for d in domains], dtype=float)
    if max_epochs is None:
        max_epochs = float(f2.get("bounds", {}).get("max_epochs", DEFAULT_MAX_EPOCHS))
    avail = available if available is not None else f2.get("available_tokens")
    avail_vec = None if avail is None else np.array([float(avail[d]) for d in domains])
    _check_free_domains(domains, frozen, n1, n2, shares, target, b1, b2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MixingWarning)
        try:
            uncapped = extrapolate_partial(n1, n2, target, shares, names=domains)
            counts = extrapolate_partial(n1, n2, target, shares, available=avail_vec, max_epochs=max_epochs,
                                         names=domains)
        except InfeasibleError:  # the maths' message counts tokens of its own; say it in the user's terms
            total = float(avail_vec.sum()) if avail_vec is not None else float("nan")
            raise WorkflowError(f"--target {target:,} tokens is more than the data allows: the domains' {total:,.0f} "
                                f"training tokens x max epochs {max_epochs:g} = {total * max_epochs:,.0f}; lower "
                                "--target or raise --max-epochs") from None
        except MixingError as exc:
            raise WorkflowError(f"cannot extrapolate the fits at {b1:,.0f} and {b2:,.0f} tokens to --target "
                                f"{target:,} tokens: {exc}") from None
    notes += [str(w.message) for w in caught if issubclass(w.category, MixingWarning)]
    weights = counts / counts.sum()
    capped = [d for d, u, c in zip(domains, uncapped, counts) if c < u * (1 - 1e-9)]
    return {
        "version": 2,
        "method": "AutoScale extrapolation N_i(t) = N_i(1) (N_i(2)/N_i(1))^(t-1) over the free domains, t solved "
                  "for the target total; frozen domains keep their share at the larger budget; capped at "
                  "available * max_epochs",
        "target_tokens": target,
        "domains": domains,
        "fits": [{"path": f.get("_path"), "plan_dir": f.get("plan_dir"), "budget_tokens": f["budget_tokens"],
                  "optimal_tokens": f["optimal_tokens"], "weights": f["weights"]} for f in (f1, f2)],
        "world_size": int(f2.get("world_size", 1)),
        "frozen_domains": frozen,
        "max_epochs": max_epochs,
        "available_tokens": None if avail_vec is None else {d: float(v) for d, v in zip(domains, avail_vec)},
        "uncapped_tokens": {d: float(v) for d, v in zip(domains, uncapped)},
        "tokens": {d: float(v) for d, v in zip(domains, counts)},
        "weights": {d: float(v) for d, v in zip(domains, weights)},
        "capped_domains": capped,
        "warnings": notes,
    }


def write_extrapolation(result: dict[str, Any], out_dir: str | Path,
                        base_config: str | Path | None = None) -> dict[str, Path]:
    """Write ``extrapolation.json``, ``weights.yaml`` and the train ``config.yaml`` into ``out_dir``.

    ``base_config`` defaults to the larger fit's plan's ``base.yaml``.
    """
    out = Path(out_dir)
    if base_config is None:
        plan_dir = result["fits"][1].get("plan_dir")
        base_config = Path(plan_dir) / BASE_CONFIG_FILE if plan_dir else None
        if base_config is None or not Path(base_config).is_file():
            raise WorkflowError(f"{base_config}: the larger fit's base config is gone; pass --config BASE.yaml")
    base = load_config(base_config)
    out.mkdir(parents=True, exist_ok=True)
    budgets = ", ".join(f"{f['budget_tokens']:,.0f}" for f in result["fits"])
    result["config"] = write_target_config(
        out / TARGET_CONFIG_FILE, base, result["weights"], result["target_tokens"], result["world_size"],
        header=f"AutoScale extrapolated mixture at {result['target_tokens']:,} tokens (from fits at {budgets});\n"
               f"the base config {base_config} with data.mixture, data.train_domains and train.max_steps replaced")
    result["config"]["base_config"] = str(base_config)
    write_json(out / EXTRAPOLATION_FILE, result)
    write_weights_yaml(out / WEIGHTS_FILE, result["weights"],
                       f"AutoScale extrapolated mixture at {result['target_tokens']:,} tokens (from fits at {budgets})\n"
                       f"the full train config is {TARGET_CONFIG_FILE} beside this file")
    return {"json": out / EXTRAPOLATION_FILE, "weights": out / WEIGHTS_FILE, "config": out / TARGET_CONFIG_FILE}

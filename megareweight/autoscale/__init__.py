"""The AutoScale workflow around training runs: plan -> run -> fit -> validate -> extrapolate.

One module per stage, each reading and writing plain files in a plan directory (see
:mod:`.files`), so that stages can run on different machines or days:

* :mod:`.plan`: the 2m+1 perturbed-mixture runs at a budget, replicated over seeds;
* :mod:`.run`: train them here (resumable) or print their launch commands;
* :mod:`.measure`: read a finished run (actual per-domain tokens, final losses) and check it
  against the plan (config, world size, token total);
* :mod:`.fit`: replicas averaged, seed noise, guards (held and bound domains), power laws, DDO;
* :mod:`.validate`: the fitted prediction against trained runs it has not seen;
* :mod:`.extrapolate`: two fits -> the mixture at a target budget, frozen domains kept at their share;
* :mod:`.target`: a complete train config for a mixture and a token budget;
* :mod:`.plots`, :mod:`.cli` (``megareweight mix``).

The maths (power laws, DDO, extrapolation rule, noise) is :mod:`megareweight.mixing`, which
imports no training code; this package is where training (config, prepared data, the loop) and
the maths meet.
"""
from __future__ import annotations

from megareweight.autoscale.extrapolate import extrapolate_fits, write_extrapolation
from megareweight.autoscale.files import WorkflowError, parse_tokens
from megareweight.autoscale.fit import fit_plan, load_fit
from megareweight.autoscale.measure import RunMeasurement, measure_run
from megareweight.autoscale.plan import load_plan, make_plan, parse_factors
from megareweight.autoscale.run import run_commands, run_plan, run_status
from megareweight.autoscale.target import target_config, write_target_config
from megareweight.autoscale.validate import predict_relative, validate_fit

__all__ = [
    "make_plan", "load_plan", "parse_factors", "parse_tokens",
    "run_plan", "run_commands", "run_status",
    "measure_run", "RunMeasurement",
    "fit_plan", "load_fit",
    "validate_fit", "predict_relative",
    "extrapolate_fits", "write_extrapolation",
    "target_config", "write_target_config",
    "WorkflowError",
]

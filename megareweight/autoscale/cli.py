"""``megareweight mix ...``: the AutoScale workflow on the command line.

    megareweight mix plan --config BASE.yaml --budget 250k --factors 0.25,1,4 --seeds 2 --out DIR
    megareweight mix run DIR                      # train the runs (finished ones are skipped)
    megareweight mix run DIR --print-commands     # or list them for a cluster launcher
    megareweight mix fit DIR [--objective ppl]    # -> fit.json, weights.yaml, mixture_config.yaml, fit*.png
    megareweight train --config DIR/mixture_config.yaml --out DIR/check
    megareweight mix validate DIR DIR/check       # predicted vs actual -> validation.json, validation.png
    megareweight mix extrapolate --fit SMALL --fit LARGE --target 2M --out TARGET   # -> TARGET/config.yaml
    megareweight train --config TARGET/config.yaml --out runs/final

:func:`register` adds ``mix`` to the top-level parser of :mod:`megareweight.cli`; this module
imports only :mod:`megareweight.cli_errors` from outside the workflow, never the top-level CLI.
Bad input exits with code 2 (:func:`megareweight.cli_errors.run_command`).
"""
from __future__ import annotations

import argparse
import warnings

from megareweight.cli_errors import UsageError
from megareweight.mixing import DEFAULT_MAX_EPOCHS, DEFAULT_OBJECTIVE, OBJECTIVES


def _cmd_plan(args: argparse.Namespace) -> int:
    from megareweight.autoscale.plan import make_plan

    plan = make_plan(args.config, args.budget, args.out, factors=args.factors, overrides=args.overrides,
                     world_size=args.world_size, seeds=args.seeds, force=args.force)
    if not args.quiet:
        print(f"[mix] {len(plan['runs'])} runs for {len(plan['domains'])} domains at {plan['budget_tokens']:,} tokens "
              f"(factors {', '.join(f'{f:g}' for f in plan['factors'])}; seeds {plan['seeds']}) -> {args.out}/configs")
        for r in plan["runs"]:
            print(f"  {r['name']:<28} {r['steps']:>7} steps  {r['tokens']:>12,} tokens")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from megareweight.autoscale.run import run_commands, run_plan

    if args.print_commands:
        for cmd in run_commands(args.dir, launcher=args.launcher, only_pending=not args.all):
            print(cmd)
        return 0
    result = run_plan(args.dir, progress=not args.quiet)
    if not args.quiet:
        trained = sum(v == "trained" for v in result.values())
        print(f"[mix] {trained} run(s) trained, {len(result) - trained} skipped (already finished)")
    return 0


def _describe(fit: dict, d: str) -> str:
    c = fit["curves"][d]
    if c["status"] == "held":
        return f"HELD at x = 1: {c['reason']}"
    text = f"fit (x{c['a']:+.3g})^-{c['b']:.3g} + {c['c']:.3g}"
    if c.get("effect_z") is not None:
        text += f", effect {c['effect']:.3g} = {c['effect_z']:.1f} se"
    if c.get("bound"):
        text += f"; ON ITS {c['bound'].upper()} BOUND"
    return text


def _cmd_fit(args: argparse.Namespace) -> int:
    from megareweight.autoscale.fit import fit_plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded in fit.json and printed below
        fit = fit_plan(args.dir, objective=args.objective, min_x=args.min_x, max_x=args.max_x,
                       max_epochs=args.max_epochs, significance=args.significance, plots=not args.no_plots)
    if not args.quiet:
        for note in fit["warnings"]:
            print(f"[mix] warning: {note}")
        noise = fit["noise"]
        print(f"[mix] objective: {fit['objective']['description']}; "
              + (f"seed noise sd {noise['sd']:.3g} per run ({noise['dof']} dof), effect se {noise['effect_se']:.3g}"
                 if noise else "one seed: no noise estimate"))
        print(f"[mix] DDO mixture at {fit['budget_tokens']:,.0f} tokens, bounds x in [{fit['bounds']['lower']:g}, "
              f"{fit['bounds']['upper']:g}] (predicted relative objective 1 -> "
              f"{fit['predicted_relative_objective']['optimal']:.4f}):")
        for d in fit["domains"]:
            print(f"  {d:<14} weight {fit['weights'][d]:.4f}  x* {fit['optimal_x'][d]:7.3f}   {_describe(fit, d)}")
        print(f"[mix] wrote {args.dir}/fit.json, weights.yaml, mixture_config.yaml"
              + ("" if args.no_plots else ", fit*.png"))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from megareweight.autoscale.validate import validate_fit

    result = validate_fit(args.dir, args.runs, out_dir=args.out, plots=not args.no_plots)
    if not args.quiet:
        for note in result["warnings"]:
            print(f"[mix] warning: {note}")
        kind = result["objective"]["kind"]
        print(f"  {'run':<40} {'predicted':>10} {'actual':>10} {'actual-pred':>12}   ({kind} / base run's)")
        for r in result["runs"]:
            print(f"  {r['run'][-40:]:<40} {r['predicted']:10.4f} {r['actual']:10.4f} {r['difference']:+12.4f}")
        m = result["mean"]
        print(f"  {'mean':<40} {m['predicted']:10.4f} {m['actual']:10.4f} {m['difference']:+12.4f}")
        print(f"[mix] {result['verdict']}")
    return 0


def _cmd_extrapolate(args: argparse.Namespace) -> int:
    from megareweight.autoscale.extrapolate import extrapolate_fits, write_extrapolation

    if len(args.fit) != 2:
        raise UsageError(f"--fit must be given exactly twice (smaller budget first), got {len(args.fit)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded in the JSON and printed below
        result = extrapolate_fits(args.fit[0], args.fit[1], args.target, max_epochs=args.max_epochs)
    paths = write_extrapolation(result, args.out, base_config=args.config)
    if not args.quiet:
        for note in result["warnings"]:
            print(f"[mix] warning: {note}")
        print(f"[mix] predicted mixture at {result['target_tokens']:,} tokens:")
        for d in result["domains"]:
            flags = [f for f, on in (("capped", d in result["capped_domains"]),
                                     ("frozen", d in result["frozen_domains"])) if on]
            print(f"  {d:<14} weight {result['weights'][d]:.4f}  tokens {result['tokens'][d]:14,.0f}"
                  + (f"  ({', '.join(flags)})" if flags else ""))
        print(f"[mix] wrote {paths['json']}, {paths['weights']}, {paths['config']} "
              f"({result['config']['steps']} steps); train with: megareweight train --config {paths['config']} --out RUN_DIR")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mix`` with actions plan / run / fit / validate / extrapolate to the top-level subparsers."""
    mix = subparsers.add_parser("mix", help="AutoScale domain mixing: plan, run, fit, validate, extrapolate",
                                description="AutoScale domain mixing: plan the 2m+1 perturbed runs (x seeds), train "
                                            "them, fit per-domain power laws + DDO, check the prediction, "
                                            "extrapolate to a larger budget as a ready-to-train config")
    sub = mix.add_subparsers(dest="mix_command", required=True, metavar="ACTION")

    p = sub.add_parser("plan", help="write the 2m+1 run configs (x seeds) for one budget")
    p.set_defaults(func=_cmd_plan)
    p.add_argument("--config", required=True, help="base config: its mixture and trained domains are the base")
    p.add_argument("--budget", required=True, help="base run's training tokens, e.g. 200000, 200k, 1.5M")
    p.add_argument("--factors", default="0.2,1,3", help="scale factors of one domain's tokens (default 0.2,1,3)")
    p.add_argument("--seeds", type=int, default=1,
                   help="replicas of every run (train.seed, train.seed+1, ...); 2 or more give the fit a noise estimate")
    p.add_argument("--out", required=True, help="plan directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a base config value (repeatable)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks the runs will use (tokens per step)")
    p.add_argument("--force", action="store_true", help="overwrite a different plan in --out")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("run", help="train the planned runs in order (resumable), or print their commands")
    p.set_defaults(func=_cmd_run)
    p.add_argument("dir", help="plan directory")
    p.add_argument("--print-commands", action="store_true", help="print one launch command per pending run instead")
    p.add_argument("--launcher", default="megareweight train",
                   help="command prefix for --print-commands, e.g. 'deepspeed --num_gpus 8 --module megareweight.train'")
    p.add_argument("--all", action="store_true", help="with --print-commands: include finished runs")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("fit", help="fit per-domain power laws (guarded), solve DDO, write fit.json, weights, config")
    p.set_defaults(func=_cmd_fit)
    p.add_argument("dir", help="plan directory with finished runs")
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                   help="ppl: mean exp(loss) over the trained domains / the base run's (AutoScale's notebook, default); "
                        "loss: mean loss / the base run's")
    p.add_argument("--min-x", type=float, default=None,
                   help="DDO lower bound on a domain's amount, as a multiple of the base run's (default: the smallest "
                        "factor; lower values extrapolate the curves and warn)")
    p.add_argument("--max-x", type=float, default=None,
                   help="DDO upper bound (default: the largest factor; higher values extrapolate and warn)")
    p.add_argument("--max-epochs", type=float, default=DEFAULT_MAX_EPOCHS,
                   help=f"upper bound: at most this many passes over a domain's data (default {DEFAULT_MAX_EPOCHS:g})")
    p.add_argument("--significance", type=float, default=2.0,
                   help="hold a domain whose effect is below this many standard errors (default 2; 0 disables)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("validate", help="compare the fit's prediction with trained runs (e.g. of mixture_config.yaml)")
    p.set_defaults(func=_cmd_validate)
    p.add_argument("dir", help="plan directory with fit.json")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run(s), e.g. of DIR/mixture_config.yaml")
    p.add_argument("--out", default=None, help="where validation.json/png go (default: the plan directory)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("extrapolate", help="predict the mixture at a larger budget from two fits; write a train config")
    p.set_defaults(func=_cmd_extrapolate)
    p.add_argument("--fit", action="append", default=[], required=True, metavar="FIT_JSON",
                   help="fit.json (or its plan directory); give twice, smaller budget first")
    p.add_argument("--target", required=True, help="target budget in tokens, e.g. 2M")
    p.add_argument("--out", required=True, help="directory for config.yaml, weights.yaml and extrapolation.json")
    p.add_argument("--config", default=None,
                   help="base config of the target run (default: the larger fit's plan's base.yaml)")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="cap on passes over each domain's data (default: the fit's, else 4)")
    p.add_argument("--quiet", action="store_true")
    return mix

"""``megareweight mix ...``: the AutoScale workflow on the command line.

    megareweight mix plan --config BASE.yaml --budget 200k --factors 0.2,1,3 --out DIR
    megareweight mix run DIR                      # train the 2m+1 runs (finished ones are skipped)
    megareweight mix run DIR --print-commands     # or list them for a cluster launcher
    megareweight mix fit DIR                      # -> DIR/fit.json, DIR/weights.yaml, DIR/fit*.png
    megareweight mix extrapolate --fit SMALL/fit.json --fit LARGE/fit.json --target 2M --out DIR

See :mod:`megareweight.mixing.workflow` for what each step computes. Bad input (missing files,
unfinished runs, unusable fits) exits with code 2 through :func:`megareweight.cli.main`.
"""
from __future__ import annotations

import argparse
import warnings

from megareweight.mixing.extrapolate import DEFAULT_MAX_EPOCHS


def _cmd_plan(args: argparse.Namespace) -> int:
    from megareweight.mixing.workflow import make_plan

    plan = make_plan(args.config, args.budget, args.out, factors=args.factors, overrides=args.overrides,
                     world_size=args.world_size, force=args.force)
    if not args.quiet:
        print(f"[mix] {len(plan['runs'])} runs for {len(plan['domains'])} domains at {plan['budget_tokens']:,} tokens "
              f"(factors {', '.join(f'{f:g}' for f in plan['factors'])}) -> {args.out}/configs")
        for r in plan["runs"]:
            print(f"  {r['name']:<24} {r['steps']:>7} steps  {r['tokens']:>12,} tokens")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from megareweight.mixing.workflow import run_commands, run_plan

    if args.print_commands:
        for cmd in run_commands(args.dir, launcher=args.launcher, only_pending=not args.all):
            print(cmd)
        return 0
    result = run_plan(args.dir, progress=not args.quiet)
    if not args.quiet:
        trained = sum(v == "trained" for v in result.values())
        print(f"[mix] {trained} run(s) trained, {len(result) - trained} skipped (already finished)")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from megareweight.mixing.workflow import fit_plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded in fit.json and printed below
        fit = fit_plan(args.dir, min_x=args.min_x, max_epochs=args.max_epochs, plots=not args.no_plots,
                       hold_unfit=args.hold_unfit)
    if not args.quiet:
        for note in fit["warnings"]:
            print(f"[mix] warning: {note}")
        print(f"[mix] DDO mixture at {fit['budget_tokens']:,.0f} tokens (predicted relative loss terms "
              f"{fit['predicted_objective']['base']:.4f} at the base -> {fit['predicted_objective']['optimal']:.4f}):")
        for d in fit["domains"]:
            c = fit["curves"][d]
            curve = "held at the base amount (no usable fit)" if c.get("held") else \
                f"fit (x{c['a']:+.3g})^-{c['b']:.3g} + {c['c']:.3g}"
            print(f"  {d:<14} weight {fit['weights'][d]:.4f}  x* {fit['optimal_x'][d]:7.3f}   {curve}")
        print(f"[mix] wrote {args.dir}/fit.json, {args.dir}/weights.yaml" + ("" if args.no_plots else f", {args.dir}/fit*.png"))
    return 0


def _cmd_extrapolate(args: argparse.Namespace) -> int:
    from megareweight.cli import UsageError
    from megareweight.mixing.workflow import extrapolate_fits, write_extrapolation

    if len(args.fit) != 2:
        raise UsageError(f"--fit must be given exactly twice (smaller budget first), got {len(args.fit)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recorded in the JSON and printed below
        result = extrapolate_fits(args.fit[0], args.fit[1], args.target, max_epochs=args.max_epochs)
    json_path, yaml_path = write_extrapolation(result, args.out)
    if not args.quiet:
        for note in result["warnings"]:
            print(f"[mix] warning: {note}")
        print(f"[mix] predicted mixture at {result['target_tokens']:,} tokens:")
        for d in result["domains"]:
            print(f"  {d:<14} weight {result['weights'][d]:.4f}  tokens {result['tokens'][d]:14,.0f}"
                  + ("  (capped)" if d in result["capped_domains"] else ""))
        print(f"[mix] wrote {json_path}, {yaml_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mix`` with actions plan / run / fit / extrapolate to the top-level subparsers."""
    mix = subparsers.add_parser("mix", help="AutoScale domain mixing: plan, run, fit, extrapolate",
                                description="AutoScale domain mixing: plan the 2m+1 perturbed runs, train them, "
                                            "fit per-domain power laws + DDO, extrapolate to larger budgets")
    sub = mix.add_subparsers(dest="mix_command", required=True, metavar="ACTION")

    p = sub.add_parser("plan", help="write the 2m+1 run configs for one budget")
    p.set_defaults(func=_cmd_plan)
    p.add_argument("--config", required=True, help="base config: its mixture and trained domains are the base")
    p.add_argument("--budget", required=True, help="base run's training tokens, e.g. 200000, 200k, 1.5M")
    p.add_argument("--factors", default="0.2,1,3", help="scale factors of one domain's tokens (default 0.2,1,3)")
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

    p = sub.add_parser("fit", help="fit per-domain power laws, solve DDO, write fit.json + weights.yaml + plots")
    p.set_defaults(func=_cmd_fit)
    p.add_argument("dir", help="plan directory with finished runs")
    p.add_argument("--min-x", type=float, default=0.01,
                   help="lower bound on each domain's amount, as a multiple of the base run's (default 0.01)")
    p.add_argument("--max-epochs", type=float, default=DEFAULT_MAX_EPOCHS,
                   help=f"upper bound: at most this many passes over a domain's data (default {DEFAULT_MAX_EPOCHS:g})")
    p.add_argument("--hold-unfit", action="store_true",
                   help="keep domains whose runs show no loss decrease at their base amount instead of failing")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("extrapolate", help="predict the mixture at a larger budget from two fits")
    p.set_defaults(func=_cmd_extrapolate)
    p.add_argument("--fit", action="append", default=[], required=True, metavar="FIT_JSON",
                   help="fit.json (or its directory); give twice, smaller budget first")
    p.add_argument("--target", required=True, help="target budget in tokens, e.g. 2M")
    p.add_argument("--out", required=True, help="directory for weights.yaml and extrapolation.json")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="cap on passes over each domain's data (default: the fit's, else 4)")
    p.add_argument("--quiet", action="store_true")
    return mix

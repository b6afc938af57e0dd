"""The command line's help texts: plain text in a terminal, no markup from docstrings."""
from __future__ import annotations

import argparse
import re

import pytest

from megareweight.cli import build_parser, main
from megareweight.train.__main__ import add_train_arguments


def _parsers(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_no_help_text_shows_rst_markup():
    """The top-level description showed ``megareweight`` (RST literals from the module docstring)."""
    launcher = argparse.ArgumentParser(prog="python -m megareweight.train")
    add_train_arguments(launcher)
    parsers = [*_parsers(build_parser(), "megareweight"), ("python -m megareweight.train", launcher)]
    assert len(parsers) > 15
    for name, parser in parsers:
        text = parser.format_help()
        assert not re.search(r"``|:(mod|class|func|meth|data|attr):`", text), (name, text)


def test_eval_help_names_every_input_it_reads(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in (".zst", ".parquet", "tokenizer.json", "SentencePiece", "step"):
        assert word in text, word
    assert main(["eval", "--help"]) == 0

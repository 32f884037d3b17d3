"""Shared command-line pieces of mla-gen's CLIs (generator, mla_gen.bench, mla_gen.cost): a parser
whose errors are one line and exit 2, and argument types that say what they expected."""
from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """Bad command-line input: the CLI prints one line naming the argument and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus two lines on an error; this raises UsageError with the message."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value

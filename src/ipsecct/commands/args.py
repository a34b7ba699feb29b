"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(kind: type[int] | type[float], *, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a positive number of ``kind``, at most ``high`` if given."""

    def convert(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError("must be positive")
        if v == math.inf:  # "inf" parses as a float: an OverflowError traceback later
            raise argparse.ArgumentTypeError("must be finite")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}")
        return v

    return convert

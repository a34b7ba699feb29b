"""Structured logging: one line per event, ``event=NAME key=value ...``.

Values are quoted when they contain spaces. Callers never pass key material; the
:class:`SecurityAssociation` repr hides keys anyway.
"""

from __future__ import annotations

import logging
import sys


def _fmt(v: object) -> str:
    s = str(v)
    if not s or any(c in s for c in ' \t"='):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def event(logger: logging.Logger, name: str, *args: int, **fields: object) -> None:
    """Log event ``name``; an optional positional argument is the level (default INFO)."""
    level = args[0] if args else logging.INFO
    if logger.isEnabledFor(level):
        parts = [f"event={name}"] + [f"{k}={_fmt(v)}" for k, v in fields.items()]
        logger.log(level, " ".join(parts))


def setup(level: str = "info", *, stream: object = None) -> None:
    root = logging.getLogger("ipsecct")
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not any(getattr(h, "_ipsecct", False) for h in root.handlers):
        h = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        h._ipsecct = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False

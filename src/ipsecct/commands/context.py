"""`ipsecct context` (placeholder until implemented)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("context", help="(not yet implemented)")
    p.set_defaults(handler=lambda args: 2)

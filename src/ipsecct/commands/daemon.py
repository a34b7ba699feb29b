"""``ipsecct gateway run`` and ``ipsecct node run``: the long-running processes."""

from __future__ import annotations

import argparse
from typing import Any


def _run(role: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from ..gateway import service

        return service.run(args.config, role)

    return handler


def register(sub: Any) -> None:
    for role, what in (("gateway", "a security gateway"), ("node", "a mobile node")):
        p = sub.add_parser(role, help=f"run {what}")
        s = p.add_subparsers(dest="action", metavar="ACTION")
        s.required = True
        r = s.add_parser("run", help=f"run {what} until SIGTERM")
        r.add_argument("--config", "-c", required=True, help="TOML configuration file")
        r.set_defaults(handler=_run(role))

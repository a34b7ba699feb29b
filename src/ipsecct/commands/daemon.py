"""``ipsecct gateway run`` and ``ipsecct node run``: the long-running processes."""

from __future__ import annotations

import argparse
from typing import Any

from ..gateway.log import LOG_LEVELS


def _run(role: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from ..gateway import service

        level = args.log_level
        if level is None and (args.daemon_verbose or args.verbose):
            level = "debug"
        return service.run(args.config, role, fresh_state=args.fresh_state, log_level=level)

    return handler


def register(sub: Any) -> None:
    for role, what in (("gateway", "a security gateway"), ("node", "a mobile node")):
        p = sub.add_parser(role, help=f"run {what}")
        s = p.add_subparsers(dest="action", metavar="ACTION")
        s.required = True
        r = s.add_parser("run", help=f"run {what} until SIGTERM")
        r.add_argument("--config", "-c", required=True, help="TOML configuration file")
        r.add_argument(
            "--fresh-state",
            action="store_true",
            help="start with a new durable state (the old one is kept aside); refused while"
            " any AEAD tunnel still has keys the old state knows: re-key first",
        )
        r.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            help="log level, overriding [log] level in the configuration",
        )
        r.add_argument(
            "-v",
            "--verbose",
            dest="daemon_verbose",
            action="count",
            default=0,
            help="log at debug level (same as --log-level debug)",
        )
        r.set_defaults(handler=_run(role))

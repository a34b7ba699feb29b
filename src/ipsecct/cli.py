"""The ``ipsecct`` command. Each group of subcommands lives in :mod:`ipsecct.commands`.

Exit statuses (README, "Exit statuses"): 0 success; 1 the operation ran but failed (a transfer
not committed, packets not decrypted, a benchmark that could not finish); 2 usage, a
configuration or input error, or a request the gateway refused. Errors print one line on
stderr, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import IpsecctError

if TYPE_CHECKING:
    import argparse

# Only what the interpreter has already loaded is imported above: argparse, logging and the
# command modules are imported inside main(), where Ctrl-C is one line and status 130 (it was
# a KeyboardInterrupt traceback and status -2 in the first half second of every command).

# Modules under ipsecct.commands; each defines register(subparsers).
COMMAND_MODULES = (
    "daemon",
    "sa",
    "transfer",
    "demo",
    "context",
    "pcap",
    "bench",
    "pki",
    "cluster",
    "failover",
)

Handler = Callable[["argparse.Namespace"], int]


def build_parser() -> argparse.ArgumentParser:
    import argparse
    import importlib

    class Parser(argparse.ArgumentParser):
        """An argument the command does not know is told by that command's parser, with its
        usage (argparse told it at the top level: ``usage: ipsecct [-h] [--version] [-v]
        COMMAND ...``, nothing of the command's options). Subcommands' parsers are of the
        parent's class, so the innermost one that is left with them says it."""

        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            ns, extra = super().parse_known_args(args, namespace)
            if extra and self.prog != "ipsecct":
                self.error(f"unrecognized arguments: {' '.join(extra)}")
            return ns, extra

    parser = Parser(
        prog="ipsecct",
        description="IPsec context transfer: gateways that move live SAs between each other.",
    )
    parser.add_argument("--version", action="version", version=f"ipsecct {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f"ipsecct.commands.{name}")
        mod.register(sub)
    return parser


# Control characters as escapes: a file name, a TOML key or a peer's text in an error made it
# two lines (or moved the terminal); an error is one line.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES |= {c: f"\\u{c:04x}" for c in (  # C1, separators, bidi (as gateway/log.py)
    *range(0x80, 0xA0), 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
    *range(0x2066, 0x206A))}  # fmt: skip


def _one_line(text: str) -> str:
    return text.translate(_ESCAPES)


# Commands whose request changes a running daemon: the daemon carries a request it got out
# whether or not this process waits for the answer.
_CHANGES = {("transfer", None), ("rebalance", None), ("failover", None), ("pmtu", "set"),
            ("sa", "add"), ("sa", "delete"), ("sa", "discard"), ("pools", "release")}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    running: list[tuple[str, str | None]] = []
    try:
        return _main(argv, running)
    except KeyboardInterrupt:
        hint = ""
        if running and running[0] in _CHANGES:
            hint = " (if the daemon got the request it carries it out: see ipsecct status)"
        print(f"ipsecct: interrupted{hint}", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None, running: list[tuple[str, str | None]]) -> int:
    import logging
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    command = getattr(args, "command", None) or ""
    action = getattr(args, "action", None) if command in ("sa", "pmtu") else None
    if command == "pools" and getattr(args, "release", None) is not None:
        action = "release"
    running.append((command, action))
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, like other command-line tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except IpsecctError as exc:
        print(_one_line(f"ipsecct: error: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        what = exc.strerror or str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "")
        print(_one_line(f"ipsecct: error: {what or type(exc).__name__}{where}"), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

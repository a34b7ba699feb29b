"""``ipsecct transfer`` and ``ipsecct rebalance``: move SAs of a running gateway to a peer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UsageError
from ..gateway.control import parse_transfer_id, request
from ..gateway.limits import TRANSFER_TIMEOUT_LIMIT
from .args import number
from .sa import add_dst_proto, add_target


def _print(rec: dict[str, Any], as_json: bool) -> int:
    if as_json:
        json.dump(rec, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(
            f"transfer {rec['id']} to {rec['peer']} ({rec['mode']}): {rec['outcome']},"
            f" {_figures(rec)}" + (f" ({rec['detail']})" if rec.get("detail") else "")
        )
    return 0 if rec["outcome"] in ("committed", "prepared") else 1


def _figures(rec: dict[str, Any]) -> str:
    """The tunnels and times of a record, only those measured. A prepared transfer's ``ms``
    runs from its preparation (the operator's wait until the commit included); it is ready
    with nothing accepted yet; its COMMIT goes at once on a commit asked for once it is
    ready (``commit_ms`` only when the commit waited for the preparation)."""
    if rec["outcome"] == "prepared":
        return f"{rec['tunnels']} tunnel(s) ready in {rec['ms']:.3f} ms"
    text = f"{rec['accepted']}/{rec['tunnels']} tunnel(s) in {rec['ms']:.3f} ms"
    if rec.get("mode") != "prepared":
        return text
    text += " from the preparation"
    if "commit_ms" in rec:
        return text + f", {rec['commit_ms']:.3f} ms from the commit (asked before it was ready)"
    if rec["outcome"] in ("committed", "partial"):
        return text + ", COMMIT sent at once"
    return text


def cmd_transfer(args: argparse.Namespace) -> int:
    from .sa import socket_path

    ident = args.commit if args.commit is not None else args.cancel
    if ident is not None:
        # A prepared transfer's trigger (or its rollback): by the id --prepare printed.
        if (args.spi is not None or args.to is not None or args.prepare
                or args.dst is not None or args.proto is not None):  # fmt: skip
            raise UsageError("--commit/--cancel ID take no SA, --dst, --proto, --to or --prepare")
        tid = parse_transfer_id(ident)  # (what the socket takes: 0x optional)
        rec = request(
            socket_path(args),
            "transfer.commit" if args.commit is not None else "transfer.cancel",
            {"id": f"{tid:016x}"},
            timeout=args.timeout + GRACE,
        )
        return _print(rec, args.json)
    if args.spi is None or args.to is None:
        raise UsageError("say what to move and where: SA --to PEER")
    body: dict[str, Any] = {
        "spi": args.spi, "to": args.to, "mode": args.mode, "timeout": args.timeout
    }
    if args.dst is not None:
        body["dst"] = args.dst
    if args.proto is not None:
        body["proto"] = args.proto
    if args.prepare:
        if args.mode != "predictive":
            raise UsageError("--prepare is for predictive transfers only")
        body["prepare"] = True
    rec = request(socket_path(args), "transfer", body, timeout=args.timeout + GRACE)
    return _print(rec, args.json)


def cmd_rebalance(args: argparse.Namespace) -> int:
    from .sa import socket_path

    rec = request(
        socket_path(args),
        "rebalance",
        {"to": args.to, "count": args.count, "timeout": args.timeout},
        timeout=args.timeout + GRACE,
    )
    return _print(rec, args.json)


# The gateway answers within --timeout (it rolls back what has no outcome by then); beyond
# that, what it may spend first waiting for an IKE exchange in flight (QUIESCE_TIME, 10 s)
# and answering. A gateway that does not answer even then is itself stuck: one line.
GRACE = 15.0


def _timeout(p: argparse.ArgumentParser, default: float) -> None:
    p.add_argument(
        "--timeout",
        type=number(float, high=TRANSFER_TIMEOUT_LIMIT),
        default=default,
        metavar="SECONDS",
        help=f"give up after this long ({default:g}): a transfer the target has not answered"
        " by then is rolled back and the tunnels stay here (exit status 1)",
    )


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "transfer",
        help="move the tunnel of an SA, or an IKE SA with its CHILD SAs, to a peer gateway"
        " (context transfer)",
    )
    p.add_argument(
        "spi",
        metavar="SA",
        nargs="?",
        help="what to move: the SPI of either SA of a tunnel (0x... for hex), or with IKEv2"
        " an IKE SPI (16 hex digits) or a connection's name with one IKE SA (the IKE SA and"
        " all its CHILD SAs move together)",
    )
    add_dst_proto(p)
    p.add_argument("--to", metavar="PEER", help="peer gateway name ([[peers]] in the config)")
    p.add_argument(
        "--mode",
        choices=["predictive", "reactive"],
        default="predictive",
        help="predictive: push the contexts (PCTD); reactive: the peer pulls (CT-Req)",
    )
    p.add_argument(
        "--prepare",
        action="store_true",
        help="prepare the transfer ahead of the handover (make-before-break: the tunnels"
        " go on here) and print its id; only the COMMIT is left for --commit ID",
    )
    one = p.add_mutually_exclusive_group()
    one.add_argument("--commit", metavar="ID", help="commit a prepared transfer (the handover)")
    one.add_argument("--cancel", metavar="ID", help="roll a prepared transfer back")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    _timeout(p, 60.0)
    add_target(p)
    p.set_defaults(handler=cmd_transfer)
    r: argparse.ArgumentParser = sub.add_parser(
        "rebalance", help="move N tunnels to a peer gateway in one batched exchange"
    )
    r.add_argument("--to", required=True, metavar="PEER",
                   help="peer gateway name ([[peers]] in the config)")  # fmt: skip
    r.add_argument("--count", type=number(int), required=True, metavar="N",
                   help="how many tunnels to move")
    r.add_argument("--json", action="store_true", help="print the record as JSON")
    _timeout(r, 300.0)
    add_target(r)
    r.set_defaults(handler=cmd_rebalance)

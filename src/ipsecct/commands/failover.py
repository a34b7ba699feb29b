"""``ipsecct failover alone``: the active of a pair whose standby is down for good runs alone."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..gateway.control import request
from .sa import add_target


def cmd_alone(args: argparse.Namespace) -> int:
    from .sa import socket_path

    st = request(
        socket_path(args),
        "failover.alone",
        {"standby_is_down": args.standby_is_down, "standby_destroyed": args.standby_destroyed},
        30,
    )
    if args.json:
        json.dump(st, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{st['role']}, epoch {st['epoch']}: runs alone; {st['peer']} becomes the standby "
          "when it comes back")  # fmt: skip
    d = st.get("standby_destroyed")
    if args.standby_destroyed and isinstance(d, dict):
        print(f"asserted by you: {d['asserted']}; the ceilings its replicas set are lifted "
              f"({d['ceilings_lifted']} tunnel(s)): if it ever runs again with that state, "
              "both may send the same (SPI, sequence number) pairs")  # fmt: skip
    elif st.get("ceilinged_tunnels"):
        print(f"{st['ceilinged_tunnels']} tunnel(s) {st['peer']} holds replicas of keep their "
              f"ceilings ({st.get('at_ceiling', 0)} at theirs) until it is the standby again; "
              "if it is destroyed for good, add --standby-destroyed")  # fmt: skip
    return 0


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "failover", help="a fail-over pair: operator commands"
    )
    ss = p.add_subparsers(dest="failover_command", metavar="SUBCOMMAND")
    ss.required = True
    a: argparse.ArgumentParser = ss.add_parser(
        "alone",
        help="the standby is down for good: the active stops waiting for its lease and runs "
        "alone (refused while the lease is valid)",
    )
    a.add_argument(
        "--standby-is-down",
        action="store_true",
        help="you have stopped the standby's process (a standby alive behind a partition "
        "would take over too and reuse sequence numbers)",
    )
    a.add_argument(
        "--standby-destroyed",
        action="store_true",
        help="with --standby-is-down: the standby can never run again with the state it had "
        "(its machine destroyed or its state directory wiped); lifts the ceilings its "
        "replicas keep (also once the active runs alone). False, a standby coming back with "
        "its old replicas could send sequence numbers this gateway sent",
    )
    a.add_argument("--json", action="store_true", help="print JSON")
    add_target(a)
    a.set_defaults(handler=cmd_alone)

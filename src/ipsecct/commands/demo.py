"""``ipsecct demo``: the one-command tour (see :mod:`ipsecct.demo.tour`)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from ..errors import IpsecctError
from .args import number

# How long before the handover the default (predictive) handover prepares its transfer
# (``--prepare-ahead``), at most half of the stream.
PREPARE_AHEAD = 1.0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import tour as demo
    from ..gateway import gcpolicy

    gcpolicy.POLICY.enabled = True  # the demo's process holds the MN (its gateways their own)
    mode = "failover" if args.failover else args.handover
    if args.rate > 20000:
        raise IpsecctError("--rate above 20000 packets/s is more than one Python process sends")
    if args.rate * args.seconds < 1:  # (it exited 1 with a summary of 0 packets, no reason)
        raise IpsecctError(f"--rate {args.rate} for --seconds {args.seconds:g} is no packet "
                           "at all: the stream needs at least one")  # fmt: skip
    keying = args.keying or ("manual" if args.failover else "ike")
    prepare_ahead = args.prepare_ahead
    if args.reactive:
        if prepare_ahead is not None:
            raise IpsecctError("--reactive prepares nothing ahead: not with --prepared or"
                               " --prepare-ahead")  # fmt: skip
        prepare_ahead = 0.0
    elif prepare_ahead is None:
        # A mobile node's handover is usually predicted (RFC 4067's predictive context
        # transfer): prepared ahead, committed at the handover. A fail-over is not.
        predicted = mode in ("direct", "indirect")
        prepare_ahead = min(PREPARE_AHEAD, args.seconds / 2) if predicted else 0.0

    async def main() -> dict[str, Any]:
        # SIGTERM ends the demo as Ctrl-C does: its gateways' processes are stopped on the
        # way out (SIGKILL reaches them from the kernel if this process dies otherwise).
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await demo.run(args.rate, args.seconds, handover=mode, keying=keying,
                              ike_timeout=args.ike_timeout, as_json=args.json,
                              start_timeout=args.start_timeout,
                              prepare_ahead=prepare_ahead)  # fmt: skip

    try:
        s = asyncio.run(main())
    except asyncio.CancelledError:
        return 128 + signal.SIGTERM
    if not s["packets"]["sent"]:
        print("ipsecct: error: the demo's stream sent no packet", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run a mobile node, two gateways and a host on loopback, with a stream"
    )
    p.add_argument("--rate", type=number(int), default=1000, help="packets/s each way (1000)")
    p.add_argument("--seconds", type=number(float, high=3600), default=5.0,
                   help="stream length (5, at most 3600)")
    p.add_argument(
        "--handover",
        choices=["direct", "indirect", "none"],
        default="direct",
        help="move the MN's SAs from sg1 to sg2 half-way: direct (the MN is told, default),"
        " indirect (a virtual gateway address moves) or none (the plain tunnel)",
    )
    p.add_argument("--failover", action="store_true", help="kill sg1 half-way instead")
    p.add_argument(
        "--prepare-ahead",
        type=number(float, high=1800),
        default=None,
        metavar="SECONDS",
        help="prepare the handover's transfer this long before it (transfer --prepare) and"
        " commit it at the handover (transfer --commit): transfer_ms runs from the commit"
        f" (predictive, the default: {PREPARE_AHEAD:g} s, at most half of --seconds)",
    )
    p.add_argument(
        "--prepared",
        dest="prepare_ahead",
        action="store_const",
        const=PREPARE_AHEAD,
        help=f"the same as --prepare-ahead {PREPARE_AHEAD:g} (the default)",
    )
    p.add_argument(
        "--reactive",
        action="store_true",
        help="nothing prepared ahead: the whole transfer (ipsecct transfer) at the handover",
    )
    p.add_argument(
        "--keying",
        choices=["ike", "manual"],
        default=None,
        help="ike: the MN's agent sets up the tunnel with IKEv2 and a PSK made for the run,"
        " and the IKE SA moves at the handover, or is taken over by the standby (default);"
        " manual: SAs keyed by hand (the default with --failover)",
    )
    p.add_argument(
        "--ike-timeout",
        type=number(float),
        default=10.0,
        help="seconds to wait for each IKE step: set-up, move, liveness check (10)",
    )
    p.add_argument(
        "--start-timeout",
        type=number(float),
        default=30.0,
        help="seconds to wait for each gateway's process to answer on its control socket (30)",
    )
    p.add_argument("--json", action="store_true", help="print only the summary as JSON")
    p.set_defaults(handler=cmd_demo)

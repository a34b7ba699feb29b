"""``ipsecct demo``: the one-command tour. Builds the topology (:mod:`ipsecct.demo.topology`),
starts context transfer, runs the stream and, half-way, the handover or fail-over
(:mod:`ipsecct.demo.handover`), then prints the summary."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from ..errors import IpsecctError
from ..gateway import gcpolicy
from . import handover as ho
from .topology import HOST_INNER, MN_INNER, Demo, build, print_summary, stop, stream, summary

# What ``--handover`` / ``--failover`` run half-way through the stream.
HALFWAY: dict[str, Callable[[Demo, str], Awaitable[None]]] = {
    "direct": ho.handover,
    "indirect": ho.handover,
    "failover": ho.failover,
}


async def run(
    rate: int,
    seconds: float,
    *,
    handover: str = "direct",
    as_json: bool = False,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    if handover != "none" and handover not in HALFWAY:
        raise IpsecctError(f"handover mode {handover!r} is not available")
    step = HALFWAY.get(handover)
    with tempfile.TemporaryDirectory(prefix="ipsecct-demo-") as tmp:
        identity = handover if handover in ("direct", "indirect") else "direct"
        demo = await build(Path(tmp), identity=identity, failover=handover == "failover")
        try:
            await ho.setup(demo)
            gcpolicy.POLICY.settle()  # as a gateway does after start-up (when the policy is on)

            async def half() -> None:
                assert step is not None
                await step(demo, handover)

            if not as_json:
                out.write(
                    f"ipsecct demo: MN {MN_INNER} <-> host {HOST_INNER}"
                    " through sg1/sg2 on loopback,"
                    f" {rate} packets/s each way for {seconds:g} s, handover: {handover}\n"
                )
            await stream(
                demo, rate, seconds, out=None if as_json else out, at_half=half if step else None
            )
        finally:
            await stop(demo)
        s = summary(demo)
    if as_json:
        out.write(json.dumps(s) + "\n")
    else:
        print_summary(s, out)
    return s

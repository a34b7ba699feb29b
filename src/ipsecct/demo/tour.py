"""``ipsecct demo``: the one-command tour. Builds the topology (:mod:`ipsecct.demo.topology`:
each gateway an ``ipsecct gateway run`` process of its own, :mod:`ipsecct.demo.processes`;
the MN, the host and the stream in this process), waits for context transfer, sets up the
tunnel with IKEv2 (:mod:`ipsecct.demo.ike`; or keyed by hand), runs the stream and, half-way,
the handover or fail-over (:mod:`ipsecct.demo.handover`), then prints the summary."""

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
from . import ike as ike_mod
from .processes import START_TIMEOUT
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
    keying: str = "ike",
    ike_timeout: float = 10.0,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    start_timeout: float = START_TIMEOUT,
    prepare_ahead: float = 0.0,
) -> dict[str, Any]:
    if handover != "none" and handover not in HALFWAY:
        raise IpsecctError(f"handover mode {handover!r} is not available")
    if prepare_ahead and handover not in ("direct", "indirect"):
        raise IpsecctError("only a handover (direct or indirect) can be prepared ahead")
    if not 0 <= prepare_ahead <= seconds / 2:
        raise IpsecctError("the preparation must start after the stream: --prepare-ahead at"
                           " most half of --seconds")  # fmt: skip
    if keying not in ("ike", "manual"):
        raise IpsecctError(f"keying {keying!r} is not available (ike or manual)")
    step = HALFWAY.get(handover)
    ike_info: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="ipsecct-demo-") as tmp:
        identity = handover if handover in ("direct", "indirect") else "direct"
        # Each gateway is ``ipsecct gateway run`` in a process of its own, as deployed.
        demo = await build(Path(tmp), identity=identity, failover=handover == "failover",
                           keying=keying, processes=True, start_timeout=start_timeout)  # fmt: skip
        demo.prepare_ahead = prepare_ahead
        try:
            await ho.setup(demo)
            gcpolicy.POLICY.settle()  # as a gateway does after start-up (when the policy is on)

            async def half() -> None:
                assert step is not None
                await step(demo, handover)
                if ike_info is not None:
                    await ike_mod.after_handover(demo, ike_info, "sg1", "sg2", ike_timeout,
                                                 None if as_json else out,
                                                 failover=handover == "failover")  # fmt: skip

            if not as_json:
                out.write(
                    f"ipsecct demo: MN {MN_INNER} <-> host {HOST_INNER}"
                    " through sg1/sg2 on loopback,"
                    f" {rate} packets/s each way for {seconds:g} s, handover: {handover}"
                    + (f" (predictive: prepared {prepare_ahead:g} s ahead)" if prepare_ahead
                       else " (reactive)" if handover in ("direct", "indirect") else "")
                    + (", keying: IKEv2\n" if keying == "ike" else "\n")
                )
                out.flush()  # a pipe's reader sees it now, not with the first status line
            if keying == "ike":
                ike_info = await ike_mod.establish(demo, ike_timeout, None if as_json else out)
                if handover == "failover":
                    await ike_mod.replicated(demo, "sg2", ike_timeout)
            await stream(
                demo, rate, seconds, out=None if as_json else out, at_half=half if step else None,
                before_half=(lambda: ho.prepare(demo)) if prepare_ahead else None,
                paced_apart=True,  # the stream's own process: see demo/sender.py
            )
            if ike_info is not None:
                await ike_mod.finish(demo, ike_info)  # read from the gateways while they run
        finally:
            await stop(demo)
        s = summary(demo)
        if ike_info is not None:
            s["ike"] = ike_info
    if as_json:
        out.write(json.dumps(s) + "\n")
    else:
        print_summary(s, out)
        if ike_info is not None:
            ike_mod.print_summary(ike_info, out)
    return s

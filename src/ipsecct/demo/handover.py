"""The demo's handover and fail-over (registered into :mod:`ipsecct.demo.tour`'s plugin tables).

Every gateway of the demo runs a real :class:`~ipsecct.gateway.handover.TransferService`
(TLS 1.3 with
mutual certificate authentication between the gateways, on loopback) and the mobile node runs
the :class:`~ipsecct.gateway.handover.MobileAgent`. Half-way through the stream the operator's
``ipsecct transfer`` is issued on sg1 (predictive, make-before-break); with ``--failover`` sg1
is killed instead and its standby takes over.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..ct.transfer import Record
from ..gateway.handover import MobileAgent, TransferService, parse_config
from . import tour as demo_mod


async def setup(demo: demo_mod.Demo, mode: str) -> None:
    services: dict[str, TransferService] = {}
    for name, g in demo.gateways.items():
        tcfg = parse_config(g.node.cfg)
        assert tcfg is not None
        ts = TransferService(g.node, tcfg)
        await ts.start()
        services[name] = ts
    demo.extra["transfer"] = services
    demo.extra["agent"] = MobileAgent(demo.mn.node)
    cleanups = demo.extra.setdefault("cleanups", [])
    cleanups.extend(ts.stop for ts in services.values())
    # Open the inter-gateway connections now: a handover reuses them (no TLS handshake).
    for ts in services.values():
        await ts.channels.connect_all()


async def handover(demo: demo_mod.Demo, mode: str) -> None:
    src, dst = "sg1", "sg2"
    services: dict[str, TransferService] = demo.extra["transfer"]
    loop = asyncio.get_running_loop()
    activated: asyncio.Future[Record] = loop.create_future()

    def on_target(rec: Record) -> None:
        if rec.role == "target" and rec.outcome == "committed" and not activated.done():
            # The access network now routes the MN's traffic to the new gateway (and, for
            # indirect identity, the virtual address moves with it).
            demo.host_route(dst)
            activated.set_result(rec)

    services[dst].listeners.append(on_target)
    tunnel = services[src].node.engine.tunnels()[0]
    t0 = time.monotonic()
    await services[src].transfer([tunnel.outbound.spi], dst)
    rec = await asyncio.wait_for(activated, 5)
    entry: dict[str, Any] = {
        "from": src,
        "to": dst,
        "mode": mode,
        "transfer_ms": round((rec.ended - t0) * 1000, 3),
        "gap_ms": None,
        "lost": None,
    }
    demo.handovers.append(entry)


async def failover(demo: demo_mod.Demo, mode: str) -> None:
    """Kill sg1 (its sockets and channels close, no goodbye); sg2, its standby, notices the
    silence after the detection time and takes over with the replicated contexts."""
    services: dict[str, TransferService] = demo.extra["transfer"]
    loop = asyncio.get_running_loop()
    took_over: asyncio.Future[Record] = loop.create_future()

    def on_takeover(rec: Record) -> None:
        if rec.role == "standby" and not took_over.done():
            demo.host_route("sg2")
            took_over.set_result(rec)

    services["sg2"].listeners.append(on_takeover)
    t0 = time.monotonic()
    await services["sg1"].stop()
    await demo.gateways["sg1"].node.stop()
    rec = await asyncio.wait_for(took_over, 10)
    demo.handovers.append(
        {
            "from": "sg1",
            "to": "sg2",
            "mode": "failover",
            "transfer_ms": round((rec.ended - t0) * 1000, 3),
            "gap_ms": None,
            "lost": None,
        }
    )


demo_mod.SETUP_PLUGINS.append(setup)
demo_mod.HANDOVER_PLUGINS["failover"] = failover
demo_mod.HANDOVER_PLUGINS["direct"] = handover
demo_mod.HANDOVER_PLUGINS["indirect"] = handover

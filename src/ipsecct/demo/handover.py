"""The demo's handover and fail-over, run half-way through the stream.

Every gateway of the demo runs real context transfer (its service's
:class:`~ipsecct.gateway.transfer_service.TransferService`: TLS 1.3 with mutual certificate
authentication between the gateways, on loopback) and the mobile node runs the
:class:`~ipsecct.gateway.mobile_agent.MobileAgent`. Half-way through the stream the operator's
``ipsecct transfer`` is issued on sg1 (predictive, make-before-break); with ``--failover`` sg1
is killed instead and its standby takes over.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..ct.transfer import Record
from ..errors import DemoError
from ..gateway.transfer_service import TransferService
from .topology import Demo


def transfer_service(demo: Demo, gateway: str) -> TransferService:
    ts = demo.services[gateway].transfer
    assert ts is not None, f"{gateway} runs no context transfer"
    return ts


async def setup(demo: Demo) -> None:
    """Start context transfer on every gateway and open the inter-gateway connections now:
    a handover reuses them (no TLS handshake)."""
    for svc in reversed(demo.services.values()):  # a standby listens before its active calls
        await svc.start_context_transfer()
    for svc in demo.services.values():
        assert svc.peers is not None
        await svc.peers.connect_all()


async def handover(demo: Demo, mode: str) -> None:
    src, dst = "sg1", "sg2"
    loop = asyncio.get_running_loop()
    activated: asyncio.Future[Record] = loop.create_future()
    cpu: list[float] = []

    def on_target(rec: Record) -> None:
        if rec.role == "target" and rec.outcome == "committed" and not activated.done():
            cpu.append(time.thread_time())  # on the loop's thread, as the target activates
            # The access network now routes the MN's traffic to the new gateway (and, for
            # indirect identity, the virtual address moves with it).
            demo.host_route(dst)
            activated.set_result(rec)

    transfer_service(demo, dst).listeners.append(on_target)
    source = transfer_service(demo, src)
    tunnel = source.node.engine.tunnels()[0]
    demo.watch_gaps()
    c0 = time.thread_time()
    t0 = time.monotonic()
    done = await source.transfer([tunnel.outbound.spi], dst)
    if done.outcome != "committed":
        raise DemoError(
            f"the handover {src} -> {dst} did not commit: {done.outcome}"
            + (f" ({done.detail})" if done.detail else "")
        )
    rec = await asyncio.wait_for(activated, 5)
    demo.handover_times.append((t0, rec.ended))
    entry: dict[str, Any] = {
        "from": src,
        "to": dst,
        "mode": mode,
        "transfer_ms": round((rec.ended - t0) * 1000, 3),
        "gap_ms": None,
        "lost": None,
        # The event loop's CPU time over transfer_ms (the MN's, both gateways' and the
        # stream's applications' work; not the forwarding and state-writer threads): on a
        # busy machine, what the handover waited for is transfer_ms minus this.
        "transfer_cpu_ms": round((cpu[0] - c0) * 1000, 3),
    }
    demo.handovers.append(entry)


async def failover(demo: Demo, mode: str) -> None:
    """Kill sg1 (its sockets and channels close, no goodbye); sg2, its standby, notices the
    silence after the detection time and takes over with the replicated contexts."""
    loop = asyncio.get_running_loop()
    took_over: asyncio.Future[Record] = loop.create_future()

    def on_takeover(rec: Record) -> None:
        if rec.role == "standby" and not took_over.done():
            demo.host_route("sg2")
            took_over.set_result(rec)

    transfer_service(demo, "sg2").listeners.append(on_takeover)
    demo.watch_gaps()
    t0 = time.monotonic()
    await demo.services["sg1"].stop_context_transfer()
    await demo.gateways["sg1"].node.stop()
    rec = await asyncio.wait_for(took_over, 10)
    demo.handover_times.append((t0, rec.ended))
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

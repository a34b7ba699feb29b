"""The in-process handover demo for tests: run it, its transfer services, its stream, and a
TLS client with a chosen certificate."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ipsecct.demo import handover as demo_handover
from ipsecct.demo import topology as demo
from ipsecct.gateway import tlschannel
from ipsecct.gateway.peers import PeerChannels
from ipsecct.gateway.transfer_service import TransferService

Main = Callable[[demo.Demo], Awaitable[None]]


def run_demo(
    tmp: Path,
    body: Main,
    *,
    identity: str = "direct",
    transfer: dict[str, Any] | None = None,
    before_setup: Callable[[demo.Demo], None] | None = None,
) -> None:
    # The draft's CT_MAX_TRANSFER_TIME (200 ms, the demo's default) bounds a whole exchange:
    # on a loaded 2-core machine one process that is three gateways, a stream and the durable
    # writes of both ends missed it (the 500-tunnel rebalance timed out twice in three runs).
    # These tests are about what a transfer does, not its timer: a test of the timer says so.
    transfer = {"max_transfer_ms": 10000, **(transfer or {})}

    async def main() -> None:
        d = await demo.build(tmp, identity=identity, transfer=transfer)
        try:
            if before_setup is not None:
                before_setup(d)
            await demo_handover.setup(d)
            await body(d)
        finally:
            await asyncio.wait_for(demo.stop(d), 20)

    asyncio.run(main())


def services(d: demo.Demo) -> dict[str, TransferService]:
    return {g: demo_handover.transfer_service(d, g) for g in d.gateways}


def record_lost(chans: PeerChannels) -> list[str]:
    """The peers ``chans`` reports lost from now on (in order), reported as before too."""
    lost: list[str] = []
    on_lost = chans.on_lost

    def record(peer: str) -> None:
        lost.append(peer)
        on_lost(peer)

    chans.on_lost = record
    return lost


async def flow(d: demo.Demo, seconds: float = 0.6, rate: int = 200) -> tuple[int, int]:
    """Run the demo's stream; return (sent, received) over both directions."""
    d.host_app.received.clear()
    d.mn_app.received.clear()
    await demo.stream(d, rate, seconds, out=None)
    return d.sent[0] + d.sent[1], len(d.host_app.received) + len(d.mn_app.received)


async def connect_as(tmp: Path, d: demo.Demo, to: str, cert_dir: Path, name: str) -> Any:
    ctx = tlschannel.client_context(
        cert_dir / f"{name}.pem", cert_dir / f"{name}.key", cert_dir / "ca.pem"
    )
    listen = services(d)[to].tcfg.listen
    return await tlschannel.connect(
        str(listen.host), listen.port, ctx, server_hostname=to, timeout=2
    )


def diagnose(d: demo.Demo) -> str:
    """What a failed stream assertion needs to say where packets went: every node's drop
    counters (all reasons, not only the summary's four) and packet counts, each gateway's
    transfer counters and transfers, and the first sequence numbers missing each way."""
    lines = []
    for n in d.all_nodes():
        st = n.engine.stats
        lines.append(f"{n.name}: in {st.in_packets} out {st.out_packets} drops {dict(st.drops)}")
    for g in d.gateways:
        ts = d.services[g].transfer
        if ts is not None:
            lines.append(f"{g} transfer counters {dict(ts.core.counters)}")
            lines.append(f"{g} transfers {[str(r) for r in ts.core.records]}")
    up = sorted(set(range(1, d.sent[0] + 1)) - d.host_app.received)
    down = sorted(set(range(1, d.sent[1] + 1)) - d.mn_app.received)
    lines.append(f"missing mn->host ({len(up)}): {up[:60]}")
    lines.append(f"missing host->mn ({len(down)}): {down[:60]}")
    return "\n".join(lines)

"""The gateways' TLS channels to their peers are open before any transfer needs them, and are
opened again when lost: a handover holds its tunnels while its messages travel, and a TCP and
TLS handshake on that path cost 8-16 ms in ``bench ikev2`` (benchmarks/README.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ipsecct.demo import topology as demo
from tests.helpers.handover import services
from tests.helpers.waiting import eventually


def _open(d: demo.Demo, a: str, b: str) -> bool:
    c = services(d)[a].channels.conns.get(b)
    return c is not None and not c.closed


def test_channels_open_at_start_and_again_after_a_loss(tmp_path: Path) -> None:
    async def main() -> None:
        d = await demo.build(tmp_path, identity="indirect")
        try:
            # Only what `gateway run` does: start the transfer service; nobody connects.
            for svc in d.services.values():
                await svc.start_context_transfer()
            await eventually(
                lambda: _open(d, "sg1", "sg2") and _open(d, "sg2", "sg1"),
                "both gateways to hold an open channel to the other",
                timeout=30,
            )
            chans = services(d)["sg1"].channels
            assert not chans._opening  # no handshake left half done
            lost = chans.conns["sg2"]
            await lost.close()
            await eventually(
                lambda: _open(d, "sg1", "sg2") and chans.conns["sg2"] is not lost,
                "sg1's channel to sg2 to be opened again",
                timeout=30,
            )
            # The channel carries a transfer at once.
            spi = d.gateways["sg1"].node.engine.tunnels()[0].outbound.spi
            rec = await services(d)["sg1"].transfer([spi], "sg2", timeout=30)
            assert rec.outcome == "committed", rec
        finally:
            await asyncio.wait_for(demo.stop(d), 20)

    asyncio.run(main())


def test_concurrent_callers_share_one_handshake(tmp_path: Path) -> None:
    async def main() -> None:
        d = await demo.build(tmp_path, identity="indirect")
        try:
            await d.services["sg2"].start_context_transfer()  # sg2 listens; sg1 not started
            chans = services(d)["sg1"].channels
            chans.load_credentials()
            a, b = await asyncio.gather(chans.connection("sg2"), chans.connection("sg2"))
            assert a is b and not a.closed and chans.conns["sg2"] is a
            assert not chans._opening
        finally:
            await asyncio.wait_for(demo.stop(d), 20)

    asyncio.run(main())

"""The gateways' TLS channels to their peers are open before any transfer needs them, and are
opened again when lost: a handover holds its tunnels while its messages travel, and a TCP and
TLS handshake on that path cost 8-16 ms in ``bench ikev2`` (benchmarks/README.md)."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import multiprocessing
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ipsecct.ct import cxtp
from ipsecct.demo import topology as demo
from ipsecct.gateway import tlschannel
from tests.helpers.handover import record_lost, services
from tests.helpers.waiting import eventually


def _open(d: demo.Demo, a: str, b: str) -> bool:
    c = services(d)[a].channels.conns.get(b)
    return c is not None and not c.closed


async def start_channels(d: demo.Demo) -> None:
    """Only what `gateway run` does: start the transfer services (nobody connects); until
    both gateways hold an open channel to the other."""
    for svc in d.services.values():
        await svc.start_context_transfer()
    await eventually(
        lambda: _open(d, "sg1", "sg2") and _open(d, "sg2", "sg1"),
        "both gateways to hold an open channel to the other",
        timeout=30,
    )


def test_channels_open_at_start_and_again_after_a_loss(tmp_path: Path) -> None:
    async def main() -> None:
        d = await demo.build(tmp_path, identity="indirect")
        try:
            await start_channels(d)
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


def _in_own_network_namespace(body: Callable[[], str]) -> str:
    """Run ``body`` in a forked child moved to a network namespace of its own (root only):
    what it does to the network (a black hole) touches nothing else. Returns its answer."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def run() -> None:
        answer = "child failed"
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            answer = body()
        except BaseException as exc:  # the answer says what broke
            answer = f"{type(exc).__name__}: {exc}"
        child.send(answer)
        os._exit(0)

    p = ctx.Process(target=run)
    p.start()
    child.close()
    try:
        if not parent.poll(120):
            raise AssertionError("the child in its own namespace gave no answer in 120 s")
        return str(parent.recv())
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


CLONE_NEWNET = 0x40000000


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
def test_a_channel_to_a_peer_gone_silent_is_dropped(tmp_path: Path) -> None:
    """The path to the peer black-holes (a partition, the peer's machine lost power: no FIN,
    no RST) while a message waits to be acknowledged: the channel is dropped and the peer lost
    within tlschannel.USER_TIMEOUT, so the next message opens a new channel (the peer's, once
    it is back). Before, the channel stayed "open" for the kernel's ~15 minutes of
    retransmissions and every message to the peer went into it."""

    def body() -> str:
        tlschannel.USER_TIMEOUT = 1.0  # the child's copy of the module

        async def main() -> str:
            d = await demo.build(tmp_path, identity="indirect")
            try:
                await start_channels(d)
                chans = services(d)["sg1"].channels
                silent = chans.conns["sg2"]
                lost = record_lost(chans)
                ports = ", ".join(str(s.tcfg.listen.port) for s in services(d).values())
                rules = (
                    "add table inet hole\n"
                    "add chain inet hole in { type filter hook input priority 0; }\n"
                    f"add rule inet hole in tcp sport {{ {ports} }} drop\n"
                    f"add rule inet hole in tcp dport {{ {ports} }} drop\n"
                )
                subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
                tag = cxtp.TransferTag(1, 0).encode()
                chans.send("sg2", cxtp.CTC(ipaddress.ip_address("10.9.9.9"), (tag,)))
                await eventually(
                    lambda: "sg2" in lost and silent.closed,
                    "the silent channel to be dropped and sg2 lost",
                    timeout=10,
                )
                return "ok"
            finally:
                for c in services(d)["sg1"].channels.all_conns | services(d)[
                    "sg2"
                ].channels.all_conns:
                    c.abort()  # nothing of theirs gets through any more
                await asyncio.wait_for(demo.stop(d), 20)

        return asyncio.run(main())

    assert _in_own_network_namespace(body) == "ok"

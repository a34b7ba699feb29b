"""The gateways' TLS channels to their peers are open before any transfer needs them, and are
opened again when lost: a handover holds its tunnels while its messages travel, and a TCP and
TLS handshake on that path cost 8-16 ms in ``bench ikev2`` (benchmarks/README.md)."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
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


def test_a_cancelled_caller_of_a_shared_connect_cancels_only_itself(tmp_path: Path) -> None:
    """Two callers wait on one connect attempt to sg2 (real TLS on loopback); the one that
    started it is cancelled mid-handshake (a caller with a time-out, a transfer given up).
    On main the attempt ran in that caller's task: its cancellation cancelled the shared
    future, and the other caller got CancelledError though nobody cancelled it. Now the
    attempt is the pool's: the other connects, and the cancelled one alone is cancelled."""

    async def main() -> None:
        d = await demo.build(tmp_path, identity="indirect")
        try:
            await d.services["sg2"].start_context_transfer()  # sg2 listens; sg1 not started
            chans = services(d)["sg1"].channels
            chans.load_credentials()
            first = asyncio.create_task(chans.connection("sg2"))
            await asyncio.sleep(0)  # (the first began the attempt: its TCP connect waits)
            assert "sg2" in chans._opening
            second = asyncio.create_task(chans.connection("sg2"))
            await asyncio.sleep(0)  # (the second waits on the attempt now)
            assert "sg2" in chans._opening and not chans._channel_open("sg2")
            first.cancel()
            done, _ = await asyncio.wait({first, second}, timeout=30)
            assert first in done and first.cancelled()
            assert second in done and not second.cancelled(), "the other waiter was cancelled"
            c = second.result()
            assert not c.closed and chans.conns["sg2"] is c
            assert not chans._opening
            assert "sg2" not in chans.last_error and chans.failed_opens.get("sg2", 0) == 0
            # the channel works: a third caller gets the same one at once
            assert await asyncio.wait_for(chans.connection("sg2"), 5) is c
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


def _peer_conns(d: demo.Demo, g: str, peer: str) -> list[tlschannel.CxtpConnection]:
    """Every channel ``g`` holds with ``peer``, whichever side opened it."""
    ch = services(d)[g].channels
    return [c for c in ch.all_conns if (p := ch.peer_of(c)) is not None and p.name == peer]


def test_a_peer_whose_path_drops_does_not_hold_up_the_channels_to_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three gateways, each a peer of the other two. sg3 dies and nftables drops what goes to
    its port (a dead host: no RST), so sg1's and sg2's attempts to reach it hang until their
    handshake time-out (10 x max_transfer_ms: 50 s here). Then the channel between sg1 and sg2
    is lost. On main each gateway opened its peers' channels one at a time: neither opened
    that channel again, nor told a watched peer's state (``peer-channel``), before its
    attempt on sg3 timed out. Now each peer has its own upkeep: the channel is open again at
    once while sg3's attempts still hang, sg3's state is told on its own period, and stop ends
    the hanging attempts without a trace (no task left pending, nothing logged)."""
    table = f"keepconn_{os.getpid()}"

    async def main() -> None:
        d = await demo.build(tmp_path, gateways=("sg1", "sg2", "sg3"), identity="indirect")
        try:
            for svc in d.services.values():
                await svc.start_context_transfer()
            pairs = [(a, b) for a in ("sg1", "sg2", "sg3") for b in ("sg1", "sg2", "sg3")
                     if a != b]  # fmt: skip
            await eventually(lambda: all(_open(d, a, b) for a, b in pairs),
                             "a channel between every two gateways", timeout=30)  # fmt: skip
            chans = {g: services(d)[g].channels for g in ("sg1", "sg2")}
            chans["sg1"].answer_within["sg3"] = 60.0  # watched: its changes are logged
            port = services(d)["sg3"].channels.tcfg.listen.port
            sg3 = demo.ADDRESS["sg3"]
            rules = (f"table inet {table} {{\n chain c {{\n type filter hook input priority 0;"
                     f"\n ip daddr {sg3} tcp dport {port} drop\n"
                     f" ip saddr {sg3} tcp sport {port} drop\n }}\n}}\n")  # fmt: skip
            subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
            await d.services["sg3"].stop_context_transfer()
            for g in ("sg1", "sg2"):
                for c in _peer_conns(d, g, "sg3"):
                    c.abort()  # (sg3's FIN on its own port's channels was dropped)
            await eventually(lambda: all("sg3" in chans[g]._opening for g in chans),
                             "sg1 and sg2 to be trying sg3 (a hanging connect)")  # fmt: skip
            lost = {g: _peer_conns(d, g, "sg2" if g == "sg1" else "sg1") for g in chans}
            assert lost["sg1"] and lost["sg2"]
            for c in lost["sg1"] + lost["sg2"]:
                c.abort()
            # On main: not before sg3's attempts time out (50 s).
            await eventually(
                lambda: _open(d, "sg1", "sg2") and _open(d, "sg2", "sg1")
                and chans["sg1"].conns["sg2"] not in lost["sg1"]
                and chans["sg2"].conns["sg1"] not in lost["sg2"],
                "the channel between sg1 and sg2 to be open again",
                timeout=3,
            )  # fmt: skip
            assert all("sg3" in chans[g]._opening for g in chans)  # still hanging
            await eventually(lambda: any("event=peer-channel" in r.getMessage()
                                         and "peer=sg3" in r.getMessage()
                                         and 'state="not connected"' in r.getMessage()
                                         and "no answer yet" in r.getMessage()
                                         for r in caplog.records),
                             "sg1 to log sg3 not connected", timeout=3)  # fmt: skip
            # The channel carries a transfer at once.
            spi = d.gateways["sg1"].node.engine.tunnels()[0].outbound.spi
            rec = await services(d)["sg1"].transfer([spi], "sg2", timeout=30)
            assert rec.outcome == "committed", rec
        finally:
            await asyncio.wait_for(demo.stop(d), 20)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, left

    try:
        with caplog.at_level(logging.INFO):
            asyncio.run(main())
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)
    bad = [r.getMessage() for r in caplog.records
           if r.levelno >= logging.ERROR or r.name == "asyncio"]  # fmt: skip
    assert not bad, bad

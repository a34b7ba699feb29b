"""Issue 8 §2 and §5 against running gateways: a trusted but compromised peer over real TLS
(the demo's gateways in one process, certificates from a fresh test CA), and forged CTARs
against ``examples/transfer`` as processes. Each test is the attack from the issue; before the
fix each of them succeeded (or, for the CTAR flood, cost the peer one CT-Req per datagram).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from pathlib import Path
from typing import cast

import pytest

from ipsecct.bench.transfer import make_tunnel
from ipsecct.ct import cxtp
from ipsecct.ct.transfer import decision_cdb, forward_cdb
from ipsecct.demo import handover as demo_handover
from ipsecct.demo import topology as demo
from ipsecct.gateway import config
from ipsecct.gateway.balancer import Balancer
from ipsecct.gateway.config import BalanceConfig
from ipsecct.gateway.control import prometheus_text
from ipsecct.ipsec.engine import TunnelState
from ipsecct.ipsec.ippacket import build_udp
from tests.helpers.handover import connect_as, flow, record_lost, run_demo, services
from tests.helpers.transfer import sel
from tests.helpers.transfer_policy import rogue_cdbs
from tests.helpers.transfer_processes import Setup


async def until(pred: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.02)


def mn_addr() -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(demo.ADDRESS["mn"])


def test_catch_all_pctd_over_tls_is_refused(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        sg1 = d.gateways["sg1"].node
        spd_before, sad_before = list(sg1.engine.spd), len(sg1.engine.sad)
        core = services(d)["sg1"].core
        conn = await connect_as(tmp_path, d, "sg1", tmp_path / "pki", "sg2")
        tid = 0x5EED
        tag = cxtp.TransferTag(tid, 0, last=True).encode()
        cdbs = rogue_cdbs(sel("0.0.0.0/0", "0.0.0.0/0"))
        await conn.send(cxtp.PCTD(mn_addr(), 0, b"k" * 20, (tag, *cdbs)))
        # ... and commits it at once, whatever sg1 answered.
        commit = (cxtp.TransferTag(tid, 1).encode(), decision_cdb(1))
        await conn.send(cxtp.CTD(mn_addr(), 0, commit))
        await until(lambda: core.counters["policy_refused"] == 1, "the PCTD is refused")
        await asyncio.sleep(0.2)
        await conn.close()
        assert list(sg1.engine.spd) == spd_before and len(sg1.engine.sad) == sad_before
        # The MN's traffic still flows both ways through sg1, nothing to the attacker.
        sent, got = await flow(d)
        assert got == sent

    run_demo(tmp_path, body)


def test_forward_injection_over_tls_is_refused(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        mn = d.mn.node.engine.stats
        core = services(d)["sg1"].core
        before = mn.in_packets
        conn = await connect_as(tmp_path, d, "sg1", tmp_path / "pki", "sg2")
        packet = build_udp(
            ipaddress.ip_address("10.2.0.1"),
            ipaddress.ip_address(demo.MN_INNER),
            7000,
            7000,
            b"the attacker's own plaintext",
        )
        tag = cxtp.TransferTag(0, 0).encode()
        for _ in range(5):
            await conn.send(
                cxtp.CTD(ipaddress.ip_address("0.0.0.0"), 0, (tag, forward_cdb(packet, False)))
            )
        await until(lambda: core.counters["forward_refused"] == 5, "the FORWARDs are refused")
        await asyncio.sleep(0.3)
        await conn.close()
        assert mn.in_packets == before  # nothing reached the MN through its tunnel

    run_demo(tmp_path, body)


def test_balance_goes_on_while_a_peer_sends_garbage(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        sg1 = d.services["sg1"]
        assert sg1.transfer is not None
        core = services(d)["sg1"].core
        conn = await connect_as(tmp_path, d, "sg1", tmp_path / "pki", "sg2")
        # 3,000 transfers that never finish (no LAST flag), each with a context of sorts.
        tiny = (0x8001).to_bytes(2, "big") + bytes([1, 0, 0, 0, 0, 0])
        for tid in range(1, 3001):
            tag = cxtp.TransferTag(tid, 0, last=False).encode()
            await conn.send(cxtp.PCTD(mn_addr(), 0, b"k" * 20, (tag, tiny)))
        await until(
            lambda: core.counters["over_limit"] >= 2990, f"held to its limit: {core.counters}"
        )
        assert core.in_progress() <= 4
        eng = d.gateways["sg1"].node.engine
        for i in range(60):
            make_tunnel(eng, i, demo.ADDRESS["sg1"], demo.ADDRESS["mn"])
        sg1.balancer = Balancer(sg1.node, BalanceConfig(20, "sg2", 50, 0.1), sg1.transfer)
        await sg1.balancer.start()

        def active() -> int:
            return sum(1 for t in eng.tunnels() if t.state is TunnelState.ACTIVE)

        try:
            await until(lambda: active() <= 20, "balancing moved the excess", timeout=20)
        finally:
            await sg1.balancer.stop()
            await conn.close()

    run_demo(tmp_path, body)


def test_forged_ctar_flood_costs_the_peer_little(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    try:
        for n in ("sg1", "sg2"):
            setup.start(n)
        sg2_outer = ("127.0.3.2", setup.port[34500])
        mn, sg1 = ipaddress.ip_address("127.0.3.10"), ipaddress.ip_address("127.0.3.1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.7", 0))
            for i in range(7000):
                msg = cxtp.CTAR(mn, sg1, i, os.urandom(4))
                s.sendto(b"\0\0\0\0" + cxtp.encode(msg), sg2_outer)
                if i % 200 == 199:
                    time.sleep(0.01)  # (so that the kernel drops few of them)
        st2 = setup.wait(
            "sg2",
            lambda st: st["transfers"]["ctar_limited"] > 3000,
            "sg2 counted the CTARs it did not pass on",
        )
        time.sleep(1.0)
        refused_at_sg1 = setup.status("sg1")["transfers"]["refused"]
        # Each CT-Req that did reach sg1 was refused there (a forged token) before any work.
        assert 0 < refused_at_sg1 <= 60, refused_at_sg1
        assert setup.status("sg1")["transfers"]["in_progress"] == 0
        log = (setup.dir / "sg2.log").read_text()
        assert log.count("event=ctar-refused") <= 40, st2
    finally:
        setup.stop()


def test_world_readable_tls_key_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for f in ("sg1.pem", "sg1.key", "ca.pem"):
        (tmp_path / f).write_text("x")
    os.chmod(tmp_path / "sg1.key", 0o644)
    data = {
        "name": "sg1",
        "outer": {"address": "127.0.1.1"},
        "inner": {"kind": "udp", "listen": "127.0.1.1:5000", "peer": "127.0.1.2:5000"},
        "transfer": {
            "listen": "127.0.1.1:5091",
            "cert": "sg1.pem",
            "key": "sg1.key",
            "ca": "ca.pem",
        },
    }
    with caplog.at_level(logging.WARNING, logger="ipsecct.gateway.config"):
        config.from_dict(data, str(tmp_path / "sg1.toml"))
    lines = [r.getMessage() for r in caplog.records if "readable-by-others" in r.getMessage()]
    assert len(lines) == 1 and "TLS-private-key" in lines[0] and "mode=644" in lines[0]
    caplog.clear()
    os.chmod(tmp_path / "sg1.key", 0o600)
    with caplog.at_level(logging.WARNING, logger="ipsecct.gateway.config"):
        config.from_dict(data, str(tmp_path / "sg1.toml"))
    assert not [r for r in caplog.records if "readable-by-others" in r.getMessage()]


def test_a_peer_reconnecting_in_a_loop_rolls_nothing_back(tmp_path: Path) -> None:
    """A peer (or a flaky path) that opens extra channels and drops them, over and over, while
    the channel that carries our messages stays up: none of those losses is a loss of the
    peer. Before the fix each one was: every transfer in flight to it was rolled back ("peer
    lost") and fail-over replication sent the standby everything again (a resync per TLS
    handshake)."""

    async def body(d: demo.Demo) -> None:
        chans = services(d)["sg1"].channels
        await until(lambda: chans.connected("sg2"), "sg1's channel to sg2 is open")
        current = chans.conns["sg2"]

        def reading(address: str) -> bool:
            return any(c.peer_address == address for c in chans.all_conns)

        lost = record_lost(chans)
        for _ in range(5):
            conn = await connect_as(tmp_path, d, "sg1", tmp_path / "pki", "sg2")
            host, port = conn.writer.get_extra_info("sockname")[:2]
            at = f"{host}:{port}"
            await until(lambda a=at: reading(a), "sg1 reads the extra channel")
            await conn.close()
            await until(lambda a=at: not reading(a), "sg1 saw it closed")
        assert lost == [] and chans.conns["sg2"] is current and not current.closed
        # The channel that stayed up still carries a transfer.
        spi = d.gateways["sg1"].node.engine.tunnels()[0].outbound.spi
        rec = await services(d)["sg1"].transfer([spi], "sg2", timeout=30)
        assert rec.outcome == "committed", rec
        # Its own loss still is one.
        await current.close()
        await until(lambda: lost == ["sg2"], "the loss of the channel in use is reported")

    run_demo(tmp_path, body)


def test_a_peer_that_reads_nothing_gets_its_channel_dropped_not_our_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that keeps its channel open and stops reading it (or a path that black-holes
    it): what we send it waits in its queue and write buffer, at most SEND_BUFFER_LIMIT
    octets, then the channel is dropped and the peer is lost (its transfers roll back).
    Before, the queue grew without bound: 40 MB sent, 40 MB held."""
    from ipsecct.gateway import peers

    monkeypatch.setattr(peers, "SEND_BUFFER_LIMIT", 4 << 20)

    async def body(d: demo.Demo) -> None:
        chans = services(d)["sg1"].channels
        other = services(d)["sg2"].channels
        await until(lambda: chans.connected("sg2"), "sg1's channel to sg2 is open")
        stuck = chans.conns["sg2"]
        # sg2 stops reading every channel it has with sg1.
        for c in list(other.all_conns):
            cast(asyncio.Transport, c.writer.transport).pause_reading()
        lost: list[str] = []
        on_lost = chans.on_lost
        chans.on_lost = lambda peer: (lost.append(peer), on_lost(peer))  # type: ignore[func-returns-value, assignment]
        cdb = bytes([0x00, 0x63, 0xFF, 0]) + bytes(0xFF * 8 - 4)
        msg = cxtp.CTD(mn_addr(), 0, (cdb,) * 31)  # 63 KB
        held = 0
        for _ in range(640):  # 40 MB
            chans.send("sg2", msg)
            buffered = chans.queued.get("sg2", 0)
            if not stuck.closed:
                buffered += stuck.writer.transport.get_write_buffer_size()
            held = max(held, buffered)
            await asyncio.sleep(0)
        assert held <= (4 << 20) + (2 << 20), held
        await until(lambda: "sg2" in lost, "the stuck channel is reported lost")
        assert stuck.closed and chans.conns.get("sg2") is not stuck

    run_demo(tmp_path, body)


def test_a_certificate_of_our_ca_for_a_gateway_that_is_not_a_peer_is_refused(
    tmp_path: Path,
) -> None:
    """A gateway with a valid certificate of the same CA, for a name no ``[[peers]]`` entry
    has: its channel is closed before anything it sent is read (counted as refused), and its
    PCTD and COMMIT change nothing (already held)."""
    import datetime as dt

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from ipsecct.errors import ChannelError
    from ipsecct.tools import pki

    async def body(d: demo.Demo) -> None:
        pkidir = tmp_path / "pki"
        ca_key = load_pem_private_key((pkidir / "ca.key").read_bytes(), password=None)
        ca = pki.Issued(pki.load_certificate(pkidir / "ca.pem"), ca_key)  # type: ignore[arg-type]
        sg9 = pki.make_gateway(ca, "sg9", dt.datetime.now(dt.UTC))
        (pkidir / "sg9.pem").write_bytes(pki.cert_pem(sg9.cert))
        (pkidir / "sg9.key").write_bytes(pki.key_pem(sg9.key))
        svc = services(d)["sg1"]
        sg1 = d.gateways["sg1"].node
        spd_before, sad_before = list(sg1.engine.spd), len(sg1.engine.sad)
        refused = svc.channels.refused
        counters = dict(svc.core.counters)
        conn = await connect_as(tmp_path, d, "sg1", pkidir, "sg9")
        assert conn.peer.name == "sg1"  # the handshake itself succeeds: the CA is ours
        tid = 0x5E9
        tag = cxtp.TransferTag(tid, 0, last=True).encode()
        cdbs = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.0/28"))
        commit = (cxtp.TransferTag(tid, 1).encode(), decision_cdb(1))
        with pytest.raises(ChannelError):  # closed by sg1 (the writes may still go out)
            await conn.send(cxtp.PCTD(mn_addr(), 0, b"k" * 20, (tag, *cdbs)))
            await conn.send(cxtp.CTD(mn_addr(), 0, commit))
            await conn.recv(timeout=10)
        await conn.close()
        assert svc.channels.refused == refused + 1
        assert dict(svc.core.counters) == counters  # nothing it sent was read
        assert list(sg1.engine.spd) == spd_before and len(sg1.engine.sad) == sad_before

    run_demo(tmp_path, body)


def test_a_third_peers_query_commit_and_cancel_over_tls_change_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three gateways over real TLS: sg1 moves the MN's tunnel to sg2, whose CTDRs are lost
    (sg2 holds the transfer installed, waiting for the COMMIT). A client with sg3's
    certificate (a configured peer of sg2) sends sg2 a decision query, a COMMIT and a CTC
    under that transfer's id. Before, the query was taken for the COMMIT: sg2 served the
    tunnel while sg1, timed out, rolled back and served it too (two senders under one key).
    Now each is dropped, counted per kind and logged once; sg1 rolls back and serves the
    MN alone."""

    async def main() -> None:
        d = await demo.build(
            tmp_path, gateways=("sg1", "sg2", "sg3"), transfer={"max_transfer_ms": 1500}
        )
        try:
            await demo_handover.setup(d)
            s1, s2 = services(d)["sg1"], services(d)["sg2"]
            send = s2.channels.send

            def lossy(peer: str, msg: cxtp.Message) -> None:
                if not (peer == "sg1" and isinstance(msg, cxtp.CTDR)):
                    send(peer, msg)

            s2.channels.send = lossy  # type: ignore[method-assign]
            spi = d.gateways["sg1"].node.engine.tunnels()[0].outbound.spi
            task = asyncio.create_task(s1.transfer([spi], "sg2", timeout=30))
            await until(lambda: any(i.state.value == "pending"
                                    for i in s2.core.incoming.values()),
                        "sg2 holds the transfer installed")  # fmt: skip
            ((_, tid),) = s2.core.incoming.keys()
            conn = await connect_as(tmp_path, d, "sg2", tmp_path / "pki", "sg3")
            tag = cxtp.TransferTag(tid, 0).encode()
            await conn.send(cxtp.DQ(mn_addr(), cxtp.Answer.QUERY, (tag,)))
            await conn.send(cxtp.CTD(mn_addr(), 0, (tag, decision_cdb(1))))
            await conn.send(cxtp.CTC(mn_addr(), (tag,)))
            c = s2.core.counters
            await until(lambda: (c["foreign_query"], c["foreign_commit"], c["foreign_cancel"])
                        == (1, 1, 1), "each is counted")  # fmt: skip
            held = d.gateways["sg2"].node.engine.tunnels()
            assert held and all(t.state is TunnelState.HELD for t in held)
            rec = await task
            assert rec.outcome == "timeout", rec
            await conn.close()
            await until(lambda: not d.gateways["sg2"].node.engine.tunnels(),
                        "sg1's CTC discarded sg2's install")  # fmt: skip
            sent, got = await flow(d)
            assert got == sent
            status = d.gateways["sg2"].node.status()
            assert status["transfers"]["foreign_query"] == 1
            metrics = prometheus_text(status)
            assert 'ipsecct_cxtp_foreign_total{node="sg2",kind="query"} 1' in metrics
        finally:
            await asyncio.wait_for(demo.stop(d), 20)

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "cxtp-not-its-transfer" in r.getMessage()]
    assert len(lines) == 3 and all("peer=sg3" in m and "transfer_of=sg1" in m for m in lines)
    assert any("kind=query" in m and "pair" in m for m in lines)

"""Context transfer between running gateways, in one process: real UDP sockets for ESP, real
TLS 1.3 with mutual certificate authentication between the gateways (a fresh test CA from
:func:`ipsecct.tools.pki.init_pki`), the demo's topology (a mobile node, sg1, sg2, an end host and a
constant-rate UDP stream both ways). Then the ``ipsecct demo --handover`` command itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import load_pem_x509_certificate

from ipsecct.ct import cxtp
from ipsecct.ct.transfer import FPT_DECISION, FPT_FINAL, Record, parse_forward
from ipsecct.demo import handover as demo_handover
from ipsecct.demo import topology as demo
from ipsecct.errors import ChannelError, ControlError, DemoError, TransferError
from ipsecct.gateway.mobile_agent import MobileAgent
from ipsecct.gateway.transfer_service import forwarded_packet
from ipsecct.ipsec.engine import TunnelState
from ipsecct.ipsec.sad import Direction, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, SPDEntry
from ipsecct.tools import pki
from tests.helpers.handover import (
    connect_as,
    diagnose,
    flow,
    run_demo,
    services,
)
from tests.helpers.transfer import sel
from tests.helpers.waiting import eventually


def mn_tunnel_spi(d: demo.Demo) -> int:
    return d.gateways["sg1"].node.engine.tunnels()[0].outbound.spi


def state_at(d: demo.Demo, gw: str, spi: int) -> TunnelState | None:
    for t in d.gateways[gw].node.engine.tunnels():
        if t.outbound.spi == spi:
            return t.state
    return None


def route_on_commit(d: demo.Demo, target: str) -> asyncio.Future[Record]:
    """Like the demo: once the target commits, the access network routes to it."""
    fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()

    def on(rec: Record) -> None:
        if rec.role == "target" and rec.outcome == "committed" and not fut.done():
            d.host_route(target)
            fut.set_result(rec)

    services(d)[target].listeners.append(on)
    return fut


# -- successful handovers ---------------------------------------------------------------------
@pytest.mark.parametrize("identity", ["direct", "indirect"])
def test_predictive_handover_while_streaming(tmp_path: Path, identity: str) -> None:
    async def body(d: demo.Demo) -> None:
        spi = mn_tunnel_spi(d)
        committed = route_on_commit(d, "sg2")
        recs: list[Record] = []
        t0: list[float] = []

        async def half() -> None:
            t0.append(time.monotonic())
            recs.append(await services(d)["sg1"].transfer([spi], "sg2"))

        await demo.stream(d, 300, 1.0, out=None, at_half=half)
        (rec,) = recs
        # transfer.wait (what ``ipsecct demo`` times its handover from): the target's record
        # that ended after the trigger, with its times and the loop's CPU time when it ended;
        # none before the trigger's time if asked for a later one; bad arguments refused.
        sg2 = services(d)["sg2"]
        got = await sg2.control_wait({"role": "target", "since": t0[0], "timeout": 0})
        assert got["outcome"] == "committed" and t0[0] <= got["started"] <= got["ended"]
        assert got["id"] == f"{rec.transfer_id:016x}" and isinstance(got["cpu_s"], float)
        with pytest.raises(TransferError, match=r"no target record within 0\.05 s"):
            await sg2.control_wait({"role": "target", "since": got["ended"] + 1, "timeout": 0.05})
        for bad in ({"role": "x"}, {"role": "target", "timeout": 61}, {"role": "target",
                                                                       "since": "now"}):
            with pytest.raises(ControlError):
                await sg2.control_wait(bad)
        assert rec.outcome == "committed" and rec.role == "source" and rec.accepted == 1
        assert (await committed).outcome == "committed"
        assert state_at(d, "sg2", spi) is TunnelState.ACTIVE
        assert state_at(d, "sg1", spi) is None  # moved away (forwarding only)
        s = demo.summary(d)
        # Make-before-break: nothing of the stream lost, nothing dropped as a replay or ICV.
        assert s["packets"]["lost"] == 0, f"{s}\n{diagnose(d)}"
        assert s["packets"]["duplicated"] == 0, s
        assert s["drops"]["replay"] == 0 and s["drops"]["icv"] == 0, s
        mn_out = d.mn.node.engine.tunnels()[0].outbound
        agent: MobileAgent = d.agent
        if identity == "direct":
            assert mn_out.dst == ipaddress.ip_address(demo.ADDRESS["sg2"])
            assert len(agent.applied) == 1
        else:
            assert mn_out.dst == ipaddress.ip_address(demo.VIRTUAL)
            assert agent.applied == []
        # sg1 and sg2 report the transfer in their status.
        st1 = d.gateways["sg1"].node.status()
        assert st1["transfers"]["recent"][-1]["outcome"] == "committed"
        assert st1["peers"][0]["name"] == "sg2" and st1["peers"][0]["connected"]

    run_demo(tmp_path, body, identity=identity)


def test_a_prepared_transfers_final_and_commit_leave_in_one_write(tmp_path: Path) -> None:
    """transfer --prepare, then the commit: the FINAL and the COMMIT the source sends on the
    trigger go to the target's TLS channel in one write (one record, one send: before, two
    back to back), and the target takes both (the tunnel is active there, committed)."""

    async def body(d: demo.Demo) -> None:
        spi = mn_tunnel_spi(d)
        s1 = services(d)["sg1"]
        committed = route_on_commit(d, "sg2")
        ready = await s1.transfer([spi], "sg2", prepare=True)
        conn = s1.channels.conns["sg2"]
        writes: list[bytes] = []
        write = conn.writer.write

        def counted(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            write(data)

        conn.writer.write = counted  # type: ignore[method-assign]
        rec = await s1.commit(ready.transfer_id)
        assert rec.outcome == "committed"
        await asyncio.wait_for(committed, 5)
        assert state_at(d, "sg2", spi) is TunnelState.ACTIVE
        msgs = cxtp.StreamDecoder().feed(writes[0])
        kinds = [cxtp.cdb_fpt(m.cdbs[1]) for m in msgs if isinstance(m, cxtp.CTD)]
        assert kinds == [FPT_FINAL, FPT_DECISION], kinds
        assert len(msgs) == 2

    run_demo(tmp_path, body)


@pytest.mark.parametrize("prepared", [True, False])
def test_the_packets_forwarded_behind_a_commit_leave_before_its_aftermath(
    tmp_path: Path, prepared: bool
) -> None:
    """Issue 11 (drainfirst): at the target, the MN's packets the source forwarded behind its
    COMMIT in the same read leave in the activation's turn, before the activation's
    aftermath: the "taken over" rows and the finished record (its log line, its listeners,
    the control replies waiting for it), which used to come first. sg2's channel holds the
    COMMIT and what follows it until a forwarded packet of the MN's has come (the MN goes on
    sending to sg1 until sg2's signal, which the activation sends), then hands them over in
    one callback, as one read is handed over (sg1 forwards the MN's ESP over the channel
    here, as to a peer it cannot relay to). Prepared (what ``ipsecct demo`` runs), the
    COMMIT activates the tunnel at once and the packets come behind it; not prepared, it
    waits for the "pending" row and the packets are held until then. Either way they leave
    before the aftermath. Nothing of the stream is lost."""

    async def body(d: demo.Demo) -> None:
        spi = mn_tunnel_spi(d)
        committed = route_on_commit(d, "sg2")
        s2 = services(d)["sg2"]
        svc2 = d.services["sg2"]
        # the MN's ESP forwarded over the channel (a peer without outer_port), not relayed
        # to sg2's outer port by sg1's thread (ipsec/relay.py)
        d.services["sg1"].node.engine.relay_to.clear()
        order: list[str] = []
        held: list[tuple[str, cxtp.Message]] = []
        deliver = s2.channels.on_message

        def one_read(peer: str, msg: cxtp.Message) -> None:
            decision = (isinstance(msg, cxtp.CTD) and len(msg.cdbs) == 2
                        and cxtp.cdb_fpt(msg.cdbs[1]) == FPT_DECISION)  # fmt: skip
            if not held and not decision:
                deliver(peer, msg)
                return
            held.append((peer, msg))
            if (forwarded_packet(msg) and isinstance(msg, cxtp.CTD)
                    and parse_forward(msg.cdbs[1])[1]):  # (the MN's ESP)  # fmt: skip
                s2.channels.on_message = deliver
                order.append("read")
                for p, m in held:
                    deliver(p, m)
                order.append("read ends")

        s2.channels.on_message = one_read
        to_inner = svc2.node.to_inner

        def inner(packet: bytes) -> None:
            order.append("inner")
            to_inner(packet)

        svc2.node.to_inner = inner  # type: ignore[method-assign]
        arrived = svc2.state.arrived

        def rows(*args: Any, **kw: Any) -> Any:
            order.append("taken over rows")
            return arrived(*args, **kw)

        svc2.state.arrived = rows  # type: ignore[method-assign]
        s2.listeners.append(lambda rec: order.append(f"{rec.role} {rec.outcome}"))

        s1 = services(d)["sg1"]
        ready = await s1.transfer([spi], "sg2", prepare=True) if prepared else None

        async def half() -> None:
            if ready is not None:
                await s1.commit(ready.transfer_id)
            else:
                await s1.transfer([spi], "sg2")

        await demo.stream(d, 300, 1.0, out=None, at_half=half)
        await asyncio.wait_for(committed, 5)
        assert order[0] == "read", order
        first = order.index("inner")
        assert first < order.index("taken over rows"), order
        assert first < order.index("target committed"), order
        assert order.index("read ends") < order.index("taken over rows"), order
        assert order.index("read ends") < order.index("target committed"), order
        assert state_at(d, "sg2", spi) is TunnelState.ACTIVE
        s = demo.summary(d)
        assert s["packets"]["lost"] == 0, f"{s}\n{diagnose(d)}"
        assert s["drops"]["replay"] == 0 and s["drops"]["icv"] == 0, s

    run_demo(tmp_path, body)


def test_reactive_transfer_command(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        spi = mn_tunnel_spi(d)
        committed = route_on_commit(d, "sg2")
        rec = await services(d)["sg1"].transfer([spi], "sg2", mode="reactive")
        assert rec.outcome == "committed" and rec.mode == "reactive"
        await asyncio.wait_for(committed, 5)
        assert state_at(d, "sg2", spi) is TunnelState.ACTIVE
        sent, got = await flow(d)
        assert got == sent

    run_demo(tmp_path, body)


def test_mobile_node_ctar(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        spi = mn_tunnel_spi(d)
        committed = route_on_commit(d, "sg2")
        agent: MobileAgent = d.agent
        sg2 = d.gateways["sg2"]
        agent.ctar(
            (demo.ADDRESS["sg2"], sg2.outer_port), ipaddress.ip_address(demo.ADDRESS["sg1"]), 42
        )
        rec = await asyncio.wait_for(committed, 5)
        assert rec.mode == "reactive"
        assert state_at(d, "sg2", spi) is TunnelState.ACTIVE
        # The same CTAR again (a replay) moves nothing back and installs nothing.
        before = len(services(d)["sg1"].core.records)
        # Refused (and counted) by sg2, which has seen that sequence number, or by sg1, which
        # has too and no longer has the tunnel: either way exactly once, and nothing moves.
        cores = [services(d)[g].core for g in ("sg1", "sg2")]

        def refusals() -> int:
            return sum(c.counters["replayed"] + c.counters["refused"] for c in cores)

        seen = refusals()
        agent.ctar(
            (demo.ADDRESS["sg2"], sg2.outer_port), ipaddress.ip_address(demo.ADDRESS["sg1"]), 42
        )
        await eventually(lambda: refusals() > seen, "the replayed CTAR to be refused")
        assert refusals() == seen + 1
        assert state_at(d, "sg2", spi) is TunnelState.ACTIVE
        assert list(services(d)["sg1"].core.records)[before:] == []  # nothing moved back
        sent, got = await flow(d)
        assert got == sent

    run_demo(tmp_path, body)


# -- refusals and failures ------------------------------------------------------------------
def foreign_pki(tmp: Path, names: list[str]) -> Path:
    other = tmp / "other-ca"
    pki.init_pki(other, names, dt.datetime.now(dt.UTC))
    return other


def test_peer_with_certificate_from_another_ca_gets_no_transfer(tmp_path: Path) -> None:
    other = foreign_pki(tmp_path, ["sg2"])

    def swap(d: demo.Demo) -> None:
        # sg2 presents a certificate with the right name, but from another CA.
        for ext in ("pem", "key"):
            shutil.copy(other / f"sg2.{ext}", tmp_path / "pki" / f"sg2.{ext}")

    async def body(d: demo.Demo) -> None:
        spi = mn_tunnel_spi(d)
        rec = await services(d)["sg1"].transfer([spi], "sg2")
        assert rec.outcome != "committed"
        assert state_at(d, "sg1", spi) is TunnelState.ACTIVE
        assert state_at(d, "sg2", spi) is None
        assert len(d.gateways["sg2"].node.engine.sad) == 0
        sent, got = await flow(d)
        assert got == sent

    run_demo(tmp_path, body, before_setup=swap)


def test_a_peer_from_another_ca_is_named_in_status_with_why(tmp_path: Path) -> None:
    """The peer's certificate from another CA: ``status`` said only "peer sg2 ...: not
    connected" (and a fail-over pair "standby sg2 has never acknowledged (is it running with
    [failover] role = "standby"?)"); the reason was one log line per 10 s. Now the peer's
    entry has ``last_error`` and the line says it."""
    from ipsecct.commands.sa import _print_transfer_status

    other = foreign_pki(tmp_path, ["sg2"])

    def swap(d: demo.Demo) -> None:
        for ext in ("pem", "key"):
            shutil.copy(other / f"sg2.{ext}", tmp_path / "pki" / f"sg2.{ext}")

    async def body(d: demo.Demo) -> None:
        rec = await services(d)["sg1"].transfer([mn_tunnel_spi(d)], "sg2")
        assert rec.outcome != "committed"
        st = d.gateways["sg1"].node.status()
        (p,) = [p for p in st["peers"] if p["name"] == "sg2"]
        assert p["connected"] is False
        assert "CERTIFICATE_VERIFY_FAILED" in p["last_error"], p
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _print_transfer_status(st)
        (line,) = [x for x in buf.getvalue().splitlines() if x.startswith("  peer sg2 ")]
        assert "not connected" in line and "CERTIFICATE_VERIFY_FAILED" in line, line

    run_demo(tmp_path, body, before_setup=swap)


def test_client_from_another_ca_is_refused(tmp_path: Path) -> None:
    other = foreign_pki(tmp_path, ["sg2"])

    async def body(d: demo.Demo) -> None:
        with pytest.raises(ChannelError):
            conn = await connect_as(tmp_path, d, "sg1", other, "sg2")
            # TLS 1.3: the server may refuse the client certificate after the handshake.
            await conn.send(cxtp.CTC(ipaddress.ip_address("10.0.0.1"), ()))
            await conn.recv(timeout=2)
        assert len(d.gateways["sg1"].node.engine.tunnels()) == 1

    run_demo(tmp_path, body)


def test_client_from_another_ca_is_counted(tmp_path: Path) -> None:
    other = foreign_pki(tmp_path, ["sg2"])

    async def body(d: demo.Demo) -> None:
        with pytest.raises(ChannelError):
            conn = await connect_as(tmp_path, d, "sg1", other, "sg2")
            await conn.send(cxtp.CTC(ipaddress.ip_address("10.0.0.1"), ()))
            await conn.recv(timeout=2)
        await eventually(
            lambda: d.gateways["sg1"].node.status()["transfers"]["refused_connections"] == 1,
            "the refused connection to be counted",
        )

    run_demo(tmp_path, body)


def test_trusted_certificate_with_unknown_name_is_refused_and_counted(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        # Same CA, but a gateway sg1 has no [[peers]] entry for.
        pki_dir = tmp_path / "pki"
        ca_cert = load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        issued = pki.make_gateway(pki.Issued(ca_cert, ca_key), "sg9", dt.datetime.now(dt.UTC))
        (pki_dir / "sg9.pem").write_bytes(pki.cert_pem(issued.cert))
        (pki_dir / "sg9.key").write_bytes(pki.key_pem(issued.key))
        conn = await connect_as(tmp_path, d, "sg1", pki_dir, "sg9")
        await conn.send(cxtp.CTC(ipaddress.ip_address("10.0.0.1"), ()))
        with pytest.raises(ChannelError):
            await conn.recv(timeout=2)
        await conn.close()
        status = d.gateways["sg1"].node.status()
        assert status["transfers"]["refused_connections"] == 1
        assert len(d.gateways["sg1"].node.engine.tunnels()) == 1

    run_demo(tmp_path, body)


MALFORMED = [
    pytest.param(b"\x20", id="truncated-header"),
    pytest.param(b"\xff\xff\x00\x10" + bytes(12), id="bad-version"),
    pytest.param(bytes([0x24, 0x80, 0x00, 0x40]) + bytes(10), id="truncated-body"),
    pytest.param(bytes([0x25, 0x80, 0x00, 0x08]) + bytes(4), id="ctdr-no-tag"),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_trusted_peer_sending_malformed_cxtp(tmp_path: Path, raw: bytes) -> None:
    async def body(d: demo.Demo) -> None:
        sg1 = d.gateways["sg1"].node
        sad_before = len(sg1.engine.sad)
        peers = d.services["sg1"].peers
        assert peers is not None
        conn = await connect_as(tmp_path, d, "sg1", tmp_path / "pki", "sg2")
        host, port = conn.writer.get_extra_info("sockname")[:2]

        def reading() -> bool:  # sg1's end of this very connection is open
            return any(c.peer_address == f"{host}:{port}" for c in peers.all_conns)

        await eventually(reading, "sg1 to read from the connection")
        await conn.send_raw(raw)
        await conn.close()
        await eventually(lambda: not reading(), "sg1 to close its end")
        assert len(sg1.engine.sad) == sad_before
        assert sg1.engine.tunnels()
        assert all(t.state is TunnelState.ACTIVE for t in sg1.engine.tunnels())
        # The gateway goes on: traffic flows and a transfer to sg2 still works.
        sent, got = await flow(d, 0.4)
        assert got == sent
        rec = await services(d)["sg1"].transfer([mn_tunnel_spi(d)], "sg2")
        assert rec.outcome == "committed"

    run_demo(tmp_path, body)


def test_trusted_peer_sending_malformed_contexts(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        sg2 = d.gateways["sg2"].node
        conn = await connect_as(tmp_path, d, "sg2", tmp_path / "pki", "sg1")
        mn = ipaddress.ip_address(demo.ADDRESS["mn"])
        bad_cdb = (0x8001).to_bytes(2, "big") + bytes([3, 0]) + os.urandom(20)
        tag = cxtp.TransferTag(12345, 0).encode()
        await conn.send(cxtp.PCTD(mn, 0, b"k" * 20, (tag, bad_cdb)))
        await eventually(
            lambda: any(r.transfer_id == 12345 for r in services(d)["sg2"].core.records),
            "sg2 to refuse the transfer",
        )
        await conn.close()
        assert len(sg2.engine.sad) == 0
        recs = [r for r in services(d)["sg2"].core.records if r.transfer_id == 12345]
        assert recs and recs[-1].outcome == "refused"
        # sg2 still takes a real transfer.
        rec = await services(d)["sg1"].transfer([mn_tunnel_spi(d)], "sg2")
        assert rec.outcome == "committed"

    run_demo(tmp_path, body)


def test_target_killed_mid_transfer(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        spi = mn_tunnel_spi(d)
        sg2 = services(d)["sg2"]
        # sg2 hangs: it reads the PCTD but never answers ...
        sg2.channels.on_message = lambda peer, msg: None
        task = asyncio.create_task(services(d)["sg1"].transfer([spi], "sg2", timeout=15))
        core1 = services(d)["sg1"].core
        await eventually(lambda: core1.outgoing, "sg1 to start the transfer")
        # Make-before-break: sg1 goes on sending, below the transfer's cap.
        (t1,) = (t for t in d.gateways["sg1"].node.engine.tunnels() if t.outbound.spi == spi)
        assert t1.state is TunnelState.ACTIVE and t1.transfer_cap < 1 << 64
        # ... then it dies (its context transfer, channels included, and its node stop).
        await d.services["sg2"].stop_context_transfer()
        await d.gateways["sg2"].node.stop()
        rec = await asyncio.wait_for(task, 15)
        assert rec.outcome in ("peer lost", "timeout")
        # The cap is lifted once "staying" is on stable storage (a journal write that may
        # settle after the record is returned): until then sg1 sends below it, no further.
        await eventually(lambda: t1.transfer_cap == 1 << 64, "sg1 to lift the transfer's cap")
        assert state_at(d, "sg1", spi) is TunnelState.ACTIVE
        sent, got = await flow(d)
        assert got == sent

    # A long CT_MAX_TRANSFER_TIME, so that it is the dead peer, not the timer, that ends it.
    run_demo(tmp_path, body, transfer={"max_transfer_ms": 10000})


def add_tunnels(d: demo.Demo, n: int) -> None:
    """n more tunnels at sg1, for MNs at 127.0.2.x (nobody listens there)."""
    eng = d.gateways["sg1"].node.engine
    sg = ipaddress.ip_address(demo.ADDRESS["sg1"])
    for i in range(n):
        mn = ipaddress.ip_address(f"127.0.{2 + i // 250}.{1 + i % 250}")
        inner = f"10.{100 + i // 250}.{i % 250}.1/32"
        s = sel("10.2.0.0/24", inner)
        common: dict[str, Any] = {
            "enc_key": os.urandom(20),
            "selectors": s,
            "esn": True,
            "replay_window": 1024,
            "encap": UdpEncap(4500, 4500),
        }
        out = SecurityAssociation(0x30000000 + i, Direction.OUTBOUND, sg, mn, **common)
        common["enc_key"] = os.urandom(20)
        inn = SecurityAssociation(0x40000000 + i, Direction.INBOUND, mn, sg, **common)
        eng.add_tunnel(SPDEntry(s, Action.PROTECT, name=f"bulk{i}", static=False), out, inn)


def test_rebalance_500_tunnels_while_streaming(tmp_path: Path) -> None:
    async def body(d: demo.Demo) -> None:
        add_tunnels(d, 499)
        sg1, sg2 = d.gateways["sg1"].node, d.gateways["sg2"].node
        assert len(sg1.engine.tunnels()) == 500
        route_on_commit(d, "sg2")
        recs: list[Record] = []

        async def half() -> None:
            recs.append(await services(d)["sg1"].rebalance("sg2", 500, timeout=30))

        await demo.stream(d, 100, 1.0, out=None, at_half=half)
        (rec,) = recs
        # One transfer (one exchange) carried all 500.
        assert rec.outcome == "committed" and rec.tunnels == 500 and rec.accepted == 500
        targets = [r for r in services(d)["sg2"].core.records if r.role == "target"]
        assert len(targets) == 1 and targets[0].accepted == 500
        assert len(sg2.engine.tunnels()) == 500
        assert all(t.state is TunnelState.ACTIVE for t in sg2.engine.tunnels())
        assert sg1.engine.tunnels() == []
        assert len(sg2.engine.sad) == 1000
        s = demo.summary(d)
        assert s["packets"]["lost"] == 0, f"{s}\n{diagnose(d)}"
        assert s["drops"]["replay"] == 0 and s["drops"]["icv"] == 0, s

    run_demo(tmp_path, body)


# -- the demo command ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["direct", "indirect"])
def test_demo_handover_json(mode: str) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipsecct",
            "demo",
            "--handover",
            mode,
            "--json",
            "--seconds",
            "2",
            "--rate",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    s = json.loads(line)
    (h,) = s["handovers"]
    assert list(h) == [  # (predictive by default: prepared ahead, the handover its commit)
        "from", "to", "mode", "transfer_ms", "gap_ms", "lost", "transfer_cpu_ms",
        "context_transfer", "prepared", "prepare_ms", "prepared_ahead_s", "commit_sent_ms",
        "gap_at_ms", "handover_gap_ms", "baseline_gap_ms", "prepare_gap_ms",
        "app_gap_ms", "app_gap_at_ms", "app_handover_gap_ms", "app_baseline_gap_ms",
        "app_prepare_gap_ms", "sender_late_ms",
    ]
    assert (h["from"], h["to"], h["mode"]) == ("sg1", "sg2", mode)
    assert h["context_transfer"] == "predictive" and h["prepared"] is True, h
    assert isinstance(h["transfer_ms"], float) and h["transfer_ms"] > 0
    assert isinstance(h["gap_ms"], float)
    # Make-before-break: nothing lost, nothing duplicated, no replay/ICV drop (measured 0 in
    # every run on the development machine, with loopback UDP under load).
    assert h["lost"] == 0, s
    assert s["packets"]["lost"] == 0 and s["packets"]["duplicated"] == 0, s
    assert s["drops"]["replay"] == 0 and s["drops"]["icv"] == 0, s


def test_stream_counts_the_packets_a_stalled_process_still_has_queued(tmp_path: Path) -> None:
    """The stream's end waits for its last packets: a process the machine did not run for half
    a second while they were on their way (a loaded machine) still has them queued in its
    sockets, a loop iteration or two per hop away; they are not lost. (A fixed 0.3 s wait
    counted them lost: the stall used it up.) The stall is simulated: the last packet the
    host sends leaves 20 ms late, and 10 ms after it was due the process sleeps 0.5 s."""

    async def body(d: demo.Demo) -> None:
        loop = asyncio.get_running_loop()
        transport = d.host_app.transport
        assert transport is not None
        send = transport.sendto
        rate, seconds = 200, 0.3
        total = int(rate * seconds)
        count = 0

        def sendto(data: bytes, addr: Any = None) -> None:
            nonlocal count
            count += 1
            if count < total:
                send(data, addr)
                return
            loop.call_later(0.01, time.sleep, 0.5)  # the whole process stalls
            loop.call_later(0.02, send, data, addr)

        transport.sendto = sendto  # type: ignore[method-assign, assignment]
        sent, got = await flow(d, seconds, rate)
        assert count == total
        assert got == sent

    run_demo(tmp_path, body)


def test_a_demo_handover_that_does_not_commit_says_so(tmp_path: Path) -> None:
    """The demo's handover that rolls back (here sg2 never answers within the draft's 200 ms)
    ends the demo with one line that says so, not a bare "timed out" 5 s later."""

    async def body(d: demo.Demo) -> None:
        services(d)["sg2"].channels.on_message = lambda peer, msg: None
        with pytest.raises(DemoError, match="sg1 -> sg2 did not commit: timeout"):
            await demo_handover.handover(d, "direct")
        assert state_at(d, "sg1", mn_tunnel_spi(d)) is TunnelState.ACTIVE

    run_demo(tmp_path, body, transfer={"max_transfer_ms": 200})

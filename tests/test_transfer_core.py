"""The sans-I/O context-transfer core (:class:`ipsecct.ct.transfer.TransferCore`) between two and
three real :class:`~ipsecct.ipsec.engine.Engine` s.
Every CXTP message goes through ``cxtp.encode`` and
``cxtp.decode``; the test owns the clock and the network (it delivers, drops and reorders).

What must always hold (issue 4): one sender per outbound SA (no (SPI, sequence number) pair is
ever emitted twice, whatever the interleaving), the inbound window moves exactly, nothing is
lost on refusal, timeout or a dead target, and every conflict policy works.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.ct import context, cxtp
from ipsecct.ct.transfer import (
    ConflictPolicy,
    Identity,
    Inject,
    Settings,
    decision_cdb,
    forward_cdb,
    token_key,
)
from ipsecct.errors import IpsecctError, TransferError
from ipsecct.ipsec import signalling
from ipsecct.ipsec.algorithms import EncAlg
from ipsecct.ipsec.engine import Signal, ToInner, Tunnel, TunnelState
from ipsecct.ipsec.esp import Drop
from tests.helpers.data_path import DATA_PATHS, data_path
from tests.helpers.journal_recorder import early_world, sent_on, settle_at, to_b
from tests.helpers.transfer import (
    MN_ADDR,
    SG_ADDR,
    SPI_DOWN,
    SPI_UP,
    World,
    collide,
    ip,
    stream_seq,
    udp_packet,
)

MN = ip(MN_ADDR)


def state(t: Tunnel) -> TunnelState:
    """A tunnel's state, read through a call (mypy would narrow the attribute)."""
    return t.state


def active(world: World) -> list[str]:
    """The gateways where the MN's tunnel is ACTIVE."""
    return [
        g.name
        for g in world.gw.values()
        for t in g.engine.tunnels()
        if t.outbound.spi == SPI_DOWN and t.state is TunnelState.ACTIVE
    ]


def holding(world: World) -> list[str]:
    """The gateways that still hold the MN's SAs (active, held or pending)."""
    return [
        g.name for g in world.gw.values() for t in g.engine.tunnels() if t.outbound.spi == SPI_DOWN
    ]


def no_duplicates(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [k for k, n in Counter(pairs).items() if n > 1]


def run_predictive(w: World, src: str = "sg1", dst: str = "sg2") -> None:
    """PCTD -> CTDR -> COMMIT, one message at a time."""
    w.transfer(src, dst)
    w.deliver(src, dst)
    w.deliver(dst, src)
    w.deliver(src, dst)


# -- predictive success and exact state --------------------------------------------------------
def test_predictive_target_active_only_after_commit() -> None:
    w = World()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    w.transfer()
    assert state(w.tunnel) is TunnelState.HELD
    assert isinstance(w.peek("sg1", "sg2"), cxtp.PCTD)
    w.deliver("sg1", "sg2")
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.HELD  # installed pending, not active
    assert isinstance(w.peek("sg2", "sg1"), cxtp.CTDR)
    assert w.peek("sg2", "sg1").all_ok  # type: ignore[union-attr]
    # Still nothing may be sent by the target between its CTDR and the COMMIT.
    w.host_send("sg2", 1)
    assert sg2.wire == []
    w.deliver("sg2", "sg1")
    assert state(w.tunnel) is TunnelState.MOVED
    assert sg1.finished[-1].outcome == "committed"
    assert state(t2) is TunnelState.HELD
    w.deliver("sg1", "sg2")
    assert state(t2) is TunnelState.ACTIVE
    assert sg2.finished[-1].outcome == "committed"
    assert active(w) == ["sg2"]
    # The packet the target held is sent after the commit.
    assert len(sg2.wire) >= 1


def test_exact_outbound_sequence_number() -> None:
    w = World()
    for i in range(7):
        w.host_send("sg1", i)
    assert w.sg_out.seq == 7
    run_predictive(w)
    (t2,) = w.gw["sg2"].engine.tunnels()
    # The snapshot carries the exact counter; the SG_UPDATE signal is the first packet after.
    sg2 = w.gw["sg2"]
    assert sg2.wire[0] == (SPI_DOWN, 8)
    assert t2.outbound.seq == 8
    w.host_send("sg2", 100)
    assert sg2.wire[-1] == (SPI_DOWN, 9)
    res = w.flush_to_mn()
    assert isinstance(res[-1], ToInner) and stream_seq(res[-1].packet) == 100
    assert not w.mn.dropped


def test_exact_outbound_sequence_number_indirect() -> None:
    # No signal with indirect SG identity: the very next packet uses seq + 1.
    s = Settings(identity=Identity.INDIRECT)
    w = World(settings={"sg2": s})
    for i in range(5):
        w.host_send("sg1", i)
    run_predictive(w)
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert t2.outbound.seq == 5
    w.host_send("sg2", 1)
    assert w.gw["sg2"].wire == [(SPI_DOWN, 6)]


def test_the_target_opens_in_c_from_its_activation_and_no_spi_seq_is_sent_twice() -> None:
    """At the COMMIT the target hands its new tunnel's inbound SA to the native path (C), as
    it does once the Python path has opened a first packet: the MN's first packets sent to
    it are then opened by the forwarding thread, not queued behind the event loop's work
    right after the activation (the IKE SA's import, the packets forwarded behind the
    COMMIT). Nothing changes for sending (the outbound SA goes to C with its first flow,
    as before), and the packets still arrive once, in the inbound window the FINAL gave."""
    with data_path("native"):
        w = World()
        for i in range(3):
            assert w.mn_send(i) is not None
            w.host_send("sg1", i)
        run_predictive(w)
        sg2 = w.gw["sg2"]
        (t2,) = sg2.engine.tunnels()
        assert t2.state is TunnelState.ACTIVE and t2.inbound is not None
        c = t2.inbound.native
        assert c is not None and c.active  # before any packet reached sg2
        out = t2.outbound.native
        assert out is None or not out.active
        w.flush_to_mn()  # the MN follows the signal
        data = w.mn_send(3)
        assert data is not None
        assert [stream_seq(p) for p in sg2.delivered] == [3]
        w.route_mn(data)  # the same packet again: C's window (from the FINAL) drops it
        assert [stream_seq(p) for p in sg2.delivered] == [3]
        assert sg2.dropped == [Drop.REPLAY]
        for i in range(4, 8):  # sg2 sends, from C after its first flow
            w.host_send("sg2", i)
        sent = w.gw["sg1"].wire + sg2.wire
        assert len(sent) == len(set(sent)) and len(sg2.wire) >= 4  # no (SPI, seq) twice


def test_exact_inbound_window() -> None:
    w = World(window=64)
    sent = [w.mn.send(udp_packet(i, up=True)) for i in range(40)]
    # The source accepts 1..30 except 10 and 20 (lost so far, still inside the window).
    for i, p in enumerate(sent[:30]):
        if i not in (9, 19):
            assert p is not None
            w.gw["sg1"].from_mn(p)
    assert len(w.gw["sg1"].delivered) == 28
    run_predictive(w)
    sg2 = w.gw["sg2"]
    before = len(sg2.dropped)
    for i, p in enumerate(sent[:30]):  # everything the source already accepted: all refused
        if i not in (9, 19):
            assert p is not None
            sg2.from_mn(p)
    assert sg2.delivered == []
    assert sg2.dropped[before:] == [Drop.REPLAY] * 28
    for i in (9, 19, 30, 35):  # fresh ones, in or ahead of the window: all accepted
        p = sent[i]
        assert p is not None
        sg2.from_mn(p)
    assert sorted(stream_seq(p) for p in sg2.delivered) == [9, 19, 30, 35]


# -- the nonce-reuse property ------------------------------------------------------------------
OPS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(["sg1", "sg2"])),
    st.tuples(st.just("mn"), st.just("")),
    st.tuples(st.just("start"), st.just("")),
    st.tuples(st.just("deliver"), st.sampled_from(["sg1>sg2", "sg2>sg1"])),
    st.tuples(st.just("drop"), st.sampled_from(["sg1>sg2", "sg2>sg1"])),
    st.tuples(st.just("tick"), st.sampled_from(["0.05", "0.3", "2.5", "16"])),
    st.tuples(st.just("lost"), st.sampled_from(["sg1", "sg2"])),
    st.tuples(st.just("flush"), st.just("")),
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(OPS, min_size=1, max_size=60), identity=st.sampled_from(list(Identity)))
def test_no_sequence_number_is_ever_used_twice(
    ops: list[tuple[str, str]], identity: Identity
) -> None:
    s = {g: Settings(identity=identity) for g in ("sg1", "sg2")}
    w = World(settings=s)
    for n, (op, arg) in enumerate(ops, 1):
        if op == "send":
            w.host_send(arg, n)
        elif op == "mn":
            w.mn_send(n)
        elif op == "start":
            for g in w.gw.values():
                ts = [t for t in g.engine.tunnels() if t.state is TunnelState.ACTIVE]
                if ts:
                    other = "sg2" if g.name == "sg1" else "sg1"
                    g.run(g.core.start(ts, other, w.now)[1])
                    break
        elif op in ("deliver", "drop"):
            a, b = arg.split(">")
            if w.pending(a, b):
                (w.deliver if op == "deliver" else w.drop)(a, b)
        elif op == "tick":
            w.now += float(arg)
            for g in w.gw.values():
                g.tick()
        elif op == "lost":
            g = w.gw[arg]
            g.run(g.core.peer_lost("sg2" if arg == "sg1" else "sg1", w.now))
        elif op == "flush":
            w.flush_to_mn()
        assert len(active(w)) <= 1, "the outbound SA is active at two gateways"
    w.deliver_all()
    assert len(active(w)) <= 1
    wire = [(spi, seq) for g in w.gw.values() for spi, seq in g.wire]
    assert no_duplicates(wire) == []
    w.flush_to_mn()
    # The MN's view: nothing decrypted twice, no ICV failure (no forged or mixed-up packet).
    assert Drop.ICV not in w.mn.dropped
    seqs = [stream_seq(p) for p in w.mn.delivered]
    assert len(seqs) == len(set(seqs))
    # The gateways' view of the MN's stream: each packet accepted at most once in all.
    up = [stream_seq(p) for g in w.gw.values() for p in g.delivered]
    assert len(up) == len(set(up))


# -- rollback ------------------------------------------------------------------------------------
def assert_rolled_back(w: World, outcome: str) -> None:
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    assert state(w.tunnel) is TunnelState.ACTIVE
    assert sg1.finished and sg1.finished[-1].outcome == outcome
    assert sg2.engine.tunnels() == []
    assert len(sg2.engine.sad) == 0
    assert active(w) == ["sg1"]


def hold_some(w: World) -> None:
    """Traffic both ways while the tunnel is held at the source."""
    for i in range(3):
        w.host_send("sg1", 500 + i)
        w.mn_send(600 + i)


def check_reinjected(w: World) -> None:
    sg1 = w.gw["sg1"]
    assert sg1.injected == 6
    assert sorted(stream_seq(p) for p in sg1.delivered) == [600, 601, 602]
    res = w.flush_to_mn()
    assert sorted(stream_seq(r.packet) for r in res if isinstance(r, ToInner)) == [500, 501, 502]


@pytest.mark.parametrize("path", DATA_PATHS)
def test_no_sequence_number_is_ever_used_twice_on_each_data_path(path: str) -> None:
    """The property above on the native data path (C seals the established flows and must
    be frozen before each snapshot) and on the pure-Python one."""
    with data_path(path):
        test_no_sequence_number_is_ever_used_twice()


def test_rollback_on_unsupported_algorithm() -> None:
    s = Settings(supported_enc=frozenset(EncAlg) - {EncAlg.AES_GCM_16})
    w = World(settings={"sg2": s})
    w.transfer()
    hold_some(w)
    assert w.gw["sg1"].wire == []  # held: nothing sent
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR) and not ctdr.all_ok
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.UNSUPPORTED_ALGORITHM]
    assert w.gw["sg2"].engine.tunnels() == []
    w.deliver("sg2", "sg1")
    assert_rolled_back(w, "refused")
    assert "unsupported algorithm" in w.gw["sg1"].finished[-1].detail
    check_reinjected(w)


def test_rollback_on_timeout() -> None:
    w = World(settings={"sg1": Settings(max_transfer_time=0.2)})
    w.transfer()
    hold_some(w)
    w.deliver("sg1", "sg2")  # the target installs it pending ...
    assert w.gw["sg2"].engine.tunnels()
    w.drop("sg2", "sg1")  # ... but its CTDR never arrives
    w.now += 0.1
    w.gw["sg1"].tick()
    assert state(w.tunnel) is TunnelState.HELD
    w.now += 0.15
    w.gw["sg1"].tick()
    assert state(w.tunnel) is TunnelState.ACTIVE
    assert w.gw["sg1"].finished[-1].outcome == "timeout"
    check_reinjected(w)
    # The source's CTC makes the target discard what it had pending.
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
    w.deliver("sg1", "sg2")
    assert_rolled_back(w, "timeout")
    assert w.gw["sg2"].finished[-1].outcome == "cancelled"


def test_rollback_on_peer_lost() -> None:
    w = World()
    w.transfer()
    hold_some(w)
    w.drop("sg1", "sg2")
    w.gw["sg1"].run(w.gw["sg1"].core.peer_lost("sg2", w.now))
    assert_rolled_back(w, "peer lost")
    check_reinjected(w)
    # The source carries on: new traffic flows at once with the next sequence numbers.
    w.host_send("sg1", 9)
    assert w.gw["sg1"].wire[-1] == (SPI_DOWN, 4)


def test_target_discards_pending_on_ctc() -> None:
    w = World()
    w.transfer()
    w.deliver("sg1", "sg2")
    assert w.gw["sg2"].engine.tunnels()
    w.drop("sg2", "sg1")  # CTDR lost; the operator gives up: the source cancels
    w.gw["sg1"].run(w.gw["sg1"].core.peer_lost("sg2", w.now))
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
    w.deliver("sg1", "sg2")
    assert w.gw["sg2"].engine.tunnels() == []
    assert len(w.gw["sg2"].engine.sad) == 0
    assert w.gw["sg2"].core.in_progress() == 0


def test_target_gives_up_without_decision() -> None:
    w = World(settings={"sg2": Settings(retry=1.0, retry_max=5.0)})
    w.transfer()
    w.deliver("sg1", "sg2")
    w.drop("sg2", "sg1")  # the source never answers; the target re-sends, then gives up
    for _ in range(6):
        w.now += 1.0
        w.gw["sg2"].tick()
    assert w.pending("sg2", "sg1") >= 3  # re-sent CTDRs
    assert w.gw["sg2"].engine.tunnels() == []
    assert w.gw["sg2"].finished[-1].outcome == "cancelled"


def test_resent_ctdr_gets_the_decision_again() -> None:
    w = World()
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.drop("sg2", "sg1")
    # The source sees the CTDR once (through a copy), commits; the COMMIT is lost.
    w.post("sg2", "sg1", cxtp.encode(ctdr))
    w.deliver("sg2", "sg1")
    commit = w.drop("sg1", "sg2")
    assert isinstance(commit, cxtp.CTD)
    # A re-sent CTDR gets the same decision again.
    w.post("sg2", "sg1", cxtp.encode(ctdr))
    w.deliver("sg2", "sg1")
    again = w.peek("sg1", "sg2")
    assert isinstance(again, cxtp.CTD)
    assert cxtp.cdb_fpt(again.cdbs[1]) == cxtp.cdb_fpt(commit.cdbs[1])
    assert again.cdbs[1] == commit.cdbs[1]


def test_resent_ctdr_after_abort_gets_ctc() -> None:
    w = World(settings={"sg1": Settings(max_transfer_time=0.2)})
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.drop("sg2", "sg1")
    w.now += 1
    w.gw["sg1"].tick()  # timeout: rolled back
    w.drop("sg1", "sg2")  # and its CTC is lost
    w.post("sg2", "sg1", cxtp.encode(ctdr))
    w.deliver("sg2", "sg1")  # the late CTDR must not commit anything
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
    assert state(w.tunnel) is TunnelState.ACTIVE


def test_lost_commit_is_recovered_by_the_retry() -> None:
    w = World(settings={"sg2": Settings(retry=1.0, retry_max=5.0)})
    w.transfer()
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")  # the source commits (its tunnel is MOVED, its SAs gone) ...
    assert state(w.tunnel) is TunnelState.MOVED
    w.drop("sg1", "sg2")  # ... and the COMMIT is lost with the connection
    for _ in range(6):
        w.now += 1.0
        w.gw["sg2"].tick()  # the target re-sends its CTDR ...
        w.deliver_all()  # ... and the source answers with its decision
    # The SA must not be lost: the target activated it.
    assert holding(w) == ["sg2"]
    assert active(w) == ["sg2"]


# -- candidates ----------------------------------------------------------------------------
def test_next_candidate_after_unsupported_algorithm() -> None:
    s2 = Settings(supported_enc=frozenset({EncAlg.CHACHA20_POLY1305}))
    w = World(("sg1", "sg2", "sg3"), settings={"sg2": s2})
    for i in range(3):
        w.host_send("sg1", i)
    w.transfer("sg1", "sg2", candidates=["sg3"])
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")  # refused: unsupported -> CTC to sg2, PCTD to sg3
    assert state(w.tunnel) is TunnelState.HELD
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
    assert isinstance(w.peek("sg1", "sg3"), cxtp.PCTD)
    w.deliver_all()
    assert state(w.tunnel) is TunnelState.MOVED
    rec = w.gw["sg1"].finished[-1]
    assert rec.outcome == "committed" and rec.peer == "sg3"
    assert "sg2: unsupported algorithm" in rec.detail
    assert active(w) == ["sg3"]
    assert w.gw["sg2"].engine.tunnels() == []
    (t3,) = w.gw["sg3"].engine.tunnels()
    assert t3.outbound.seq == 4  # 3 + the SG_UPDATE signal


# -- conflicts -------------------------------------------------------------------------------
def test_conflict_deny() -> None:
    w = World(settings={"sg2": Settings(conflict=ConflictPolicy.DENY)})
    other = collide(w, "sg2", SPI_UP)
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.SPI_COLLISION]
    w.deliver("sg2", "sg1")
    assert state(w.tunnel) is TunnelState.ACTIVE
    assert w.gw["sg1"].finished[-1].outcome == "refused"
    assert [t.name for t in w.gw["sg2"].engine.tunnels()] == ["other"]
    assert w.gw["sg2"].engine.sad.lookup(ip(SG_ADDR["sg2"]), other.protocol, SPI_UP) is other


def test_a_transfer_whose_outbound_spi_another_tunnel_at_the_target_has_is_refused() -> None:
    """The outbound SPI is the client's choice: another client of the target may have chosen
    it (by chance, or copied from the ESP it saw). The target's SAD tells the two apart by
    destination, but its fail-over replicas, etcd keys and cluster grouping do not, and one
    of the two would be lost at its next take-over. The target refuses the tunnel
    (SPI_COLLISION, counted); it stays at the source, sending; the target's own is kept."""
    from ipsecct.ipsec.sad import Direction

    w = World()
    other = collide(w, "sg2", SPI_DOWN, direction=Direction.OUTBOUND, peer="192.0.2.99")
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.SPI_COLLISION]
    w.deliver_all()
    assert state(w.tunnel) is TunnelState.ACTIVE
    assert w.gw["sg1"].finished[-1].outcome == "refused"
    assert [t.name for t in w.gw["sg2"].engine.tunnels()] == ["other"]
    assert w.gw["sg2"].engine.outbound_spi_holder(SPI_DOWN) is other
    assert w.gw["sg2"].engine.stats.outbound_spi_refused == 1


def test_conflict_renegotiate() -> None:
    w = World(settings={"sg2": Settings(conflict=ConflictPolicy.RENEGOTIATE)})
    other = collide(w, "sg2", SPI_UP)
    early = [w.mn.send(udp_packet(i, up=True)) for i in range(3)]
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.ACCEPTED_RENEGOTIATE]
    w.deliver_all()
    (t2,) = [t for t in w.gw["sg2"].engine.tunnels() if t.name == "mn1"]
    assert state(t2) is TunnelState.ACTIVE
    assert t2.outbound.rekey_requested and t2.inbound is not None and t2.inbound.rekey_requested
    # The colliding SA still owns the SPI ...
    assert w.gw["sg2"].engine.sad.lookup(ip(SG_ADDR["sg2"]), other.protocol, SPI_UP) is other
    # ... and the MN's packets under that SPI still decrypt, through the shadow.
    w.flush_to_mn()  # SG_UPDATE: the MN now sends to sg2
    assert w.mn.out_sa.dst == ip(SG_ADDR["sg2"])
    for p in early:
        assert p is not None
        w.gw["sg2"].from_mn(p)
    w.mn_send(50)
    assert sorted(stream_seq(p) for p in w.gw["sg2"].delivered) == [0, 1, 2, 50]


def test_conflict_reassign() -> None:
    w = World(settings={"sg2": Settings(conflict=ConflictPolicy.REASSIGN)})
    collide(w, "sg2", SPI_UP)
    in_flight = [w.mn.send(udp_packet(i, up=True)) for i in range(3)]
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.ACCEPTED_SPI_REASSIGNED]
    w.deliver_all()
    (t2,) = [t for t in w.gw["sg2"].engine.tunnels() if t.name == "mn1"]
    assert t2.inbound is not None
    new = t2.inbound.spi
    assert new != SPI_UP and new >= 256
    # The commit sends the MN, inside the SA, SG_UPDATE and SPI_REASSIGN.
    res = w.flush_to_mn()
    sigs = [r for r in res if isinstance(r, Signal)]
    assert len(sigs) == 1
    items = signalling.decode(sigs[0].payload)
    assert signalling.SpiReassign(50, SPI_UP, new) in items
    assert w.mn.applied and f"outbound SPI now 0x{new:08x}" in w.mn.applied[0]
    assert w.mn.out_sa.spi == new
    assert w.mn.out_sa.dst == ip(SG_ADDR["sg2"])
    # New packets use the new SPI; packets with the old one, still in flight, decrypt too.
    p = w.mn_send(77)
    assert p is not None and int.from_bytes(p[:4], "big") == new
    for q in in_flight:
        assert q is not None
        w.gw["sg2"].from_mn(q)
    assert sorted(stream_seq(p) for p in w.gw["sg2"].delivered) == [0, 1, 2, 77]


def test_reassign_sa_result_names_old_and_new_spi() -> None:
    w = World(settings={"sg2": Settings(conflict=ConflictPolicy.REASSIGN)})
    collide(w, "sg2", SPI_UP)
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    results = [cxtp.SaResult.decode(c) for c in ctdr.ext[1:]]
    (t2,) = [t for t in w.gw["sg2"].engine.tunnels() if t.name == "mn1"]
    assert t2.inbound is not None
    (moved,) = [
        r
        for r in results
        if r.status == cxtp.Status.ACCEPTED_SPI_REASSIGNED
        and r.protocol == 50
        and r.dst == t2.inbound.dst
    ]
    assert (moved.spi, moved.new_spi) == (SPI_UP, t2.inbound.spi)


def test_reassign_signal_replay_is_dropped() -> None:
    w = World(settings={"sg2": Settings(conflict=ConflictPolicy.REASSIGN)})
    collide(w, "sg2", SPI_UP)
    run_predictive(w)
    (signal_pkt,) = w.gw["sg2"].to_mn
    w.flush_to_mn()
    assert len(w.mn.applied) == 1
    assert w.mn.receive(signal_pkt) is Drop.REPLAY
    assert len(w.mn.applied) == 1


# -- concurrency, replay, authorisation, malformed input ----------------------------------------
def test_an_inbound_spi_equal_to_another_tunnels_outbound_spi_does_not_mix_their_results() -> None:
    """Outbound SPIs are the MNs' choice and inbound ones ours, so in a bulk transfer one
    tunnel's outbound SPI may equal another's inbound SPI (about one 20,000-tunnel transfer in
    ten). The target refuses the second tunnel (an algorithm it lacks) and takes the first and
    a third; before, the source read the refusal of the second's inbound SA as the first's
    outcome and kept the first tunnel, which the target activated at the COMMIT: both sent
    under its key. The source now reads each SA_RESULT by (protocol, SPI, destination)."""
    from ipsecct.ipsec.spd import Action, SPDEntry
    from tests.helpers.transfer import tunnel_sas

    w = World(settings={"sg2": Settings(supported_enc=frozenset({EncAlg.AES_GCM_16}))})
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]

    def add(name: str, out: int, inb: int, n: int, enc: EncAlg) -> Tunnel:
        (o, i, s), _ = tunnel_sas(
            "sg1", spi_down=out, spi_up=inb, mn_inner=f"10.1.0.{n}", mn_addr=f"192.0.2.{n}",
            name=name, enc=enc,
        )  # fmt: skip
        return sg1.engine.add_tunnel(SPDEntry(s, Action.PROTECT, name=name, static=False), o, i)

    b = add("b", 0x200, 0x300, 20, EncAlg.AES_GCM_16)
    a = add("a", 0x100, 0x200, 11, EncAlg.CHACHA20_POLY1305)  # its inbound SPI is b's outbound
    _, out = sg1.core.start([b, a, w.tunnel], "sg2", w.now)
    sg1.run(out)
    w.deliver_all()
    at2 = {t.name: t.state for t in sg2.engine.tunnels()}
    assert at2 == {"b": TunnelState.ACTIVE, "mn1": TunnelState.ACTIVE}
    assert (state(a), state(b), state(w.tunnel)) == (
        TunnelState.ACTIVE, TunnelState.MOVED, TunnelState.MOVED,
    )  # fmt: skip
    rec = sg1.finished[-1]
    assert (rec.outcome, rec.accepted) == ("partial", 2)
    # the record lists what moved (an IKE SA follows only if all its CHILD SAs did)
    assert set(rec.spis) == {sa.spi for t in (b, w.tunnel) for sa in t.sas()}


def test_second_start_of_the_same_tunnel_is_busy() -> None:
    w = World(("sg1", "sg2", "sg3"))
    w.transfer("sg1", "sg2")
    with pytest.raises(TransferError, match="busy"):
        w.transfer("sg1", "sg3")
    w.deliver_all()
    assert active(w) == ["sg2"]
    assert w.gw["sg3"].engine.tunnels() == []


def token(w: World, seq: int) -> bytes:
    return cxtp.compute_token(token_key(w.tunnel), MN, seq)


def detail_of(msg: cxtp.Message) -> str | None:
    for c in cxtp.message_cdbs(msg):
        if cxtp.cdb_fpt(c) == cxtp.FPT_DETAIL:
            return cxtp.Detail.decode(c).text
    return None


def test_reactive_ct_req() -> None:
    w = World()
    for i in range(4):
        w.host_send("sg1", i)
    sg2 = w.gw["sg2"]
    sg2.run(sg2.core.request("sg1", MN, token(w, 7), 7, w.now)[1])
    assert isinstance(w.peek("sg2", "sg1"), cxtp.CTReq)
    w.deliver("sg2", "sg1")
    assert state(w.tunnel) is TunnelState.HELD
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTD)
    w.deliver_all()
    assert active(w) == ["sg2"]
    assert w.gw["sg1"].finished[-1].mode == "reactive"
    assert sg2.finished[-1].outcome == "committed"
    assert sg2.engine.tunnels()[0].outbound.seq == 5


def test_two_targets_pulling_one_gets_busy() -> None:
    w = World(("sg1", "sg2", "sg3"))
    for g, seq in (("sg2", 10), ("sg3", 11)):
        gw = w.gw[g]
        gw.run(gw.core.request("sg1", MN, token(w, seq), seq, w.now)[1])
    w.deliver("sg2", "sg1")
    w.deliver("sg3", "sg1")
    to3 = w.peek("sg1", "sg3")
    assert isinstance(to3, cxtp.CTD)
    assert detail_of(to3) == "busy"
    w.deliver_all()
    assert active(w) == ["sg2"]
    assert w.gw["sg3"].engine.tunnels() == []


def test_ct_req_bad_token_and_replayed_sequence() -> None:
    w = World()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    bad = bytes(b ^ 0xFF for b in token(w, 5))
    sg2.run(sg2.core.request("sg1", MN, bad, 5, w.now)[1])
    w.deliver("sg2", "sg1")
    assert detail_of(w.peek("sg1", "sg2")) == "unauthorised"
    assert state(w.tunnel) is TunnelState.ACTIVE
    w.deliver_all()
    # A good token is accepted once ...
    sg2.run(sg2.core.request("sg1", MN, token(w, 6), 6, w.now)[1])
    w.deliver_all()
    assert active(w) == ["sg2"]
    # ... and replayed (same sequence number) it is refused, even by a fresh source state.
    w2 = World()
    w2.gw["sg1"].core.ctar_seq[MN] = 6
    t = cxtp.compute_token(token_key(w2.tunnel), MN, 6)
    g2 = w2.gw["sg2"]
    g2.run(g2.core.request("sg1", MN, t, 6, w2.now)[1])
    w2.deliver("sg2", "sg1")
    assert detail_of(w2.peek("sg1", "sg2")) == "unauthorised"
    assert w2.gw["sg1"].core.counters["replayed"] == 1
    assert w2.tunnel.state is TunnelState.ACTIVE
    assert sg1.core.counters["refused"] >= 1


def test_ct_req_from_a_peer_that_may_not_request() -> None:
    w = World()
    w.gw["sg2"].may_request = False
    sg2 = w.gw["sg2"]
    sg2.run(sg2.core.request("sg1", MN, token(w, 1), 1, w.now)[1])
    w.deliver("sg2", "sg1")
    assert detail_of(w.peek("sg1", "sg2")) == "unauthorised"
    w.deliver_all()
    assert state(w.tunnel) is TunnelState.ACTIVE
    assert sg2.engine.tunnels() == []


def test_same_pctd_twice_is_ignored() -> None:
    w = World()
    w.transfer()
    raw = w.links[("sg1", "sg2")][0]
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")
    assert active(w) == ["sg2"]
    sg2 = w.gw["sg2"]
    sad_before = len(sg2.engine.sad)
    w.post("sg1", "sg2", raw)  # delivered again (a replay)
    w.deliver("sg1", "sg2")
    assert w.pending("sg2", "sg1") == 0  # no answer at all
    assert sg2.core.counters["replayed"] == 1
    assert len(sg2.engine.sad) == sad_before
    assert active(w) == ["sg2"]


def test_unauthorised_peer_installs_nothing() -> None:
    w = World()
    w.gw["sg1"].may_send = False
    w.transfer()
    w.deliver("sg1", "sg2")
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR) and not ctdr.all_ok
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.UNAUTHORISED]
    assert len(w.gw["sg2"].engine.sad) == 0
    assert w.gw["sg2"].core.counters["refused"] == 1
    w.deliver("sg2", "sg1")
    assert_rolled_back(w, "refused")


def test_unauthorised_refusal_is_reported_at_the_source() -> None:
    w = World()
    w.gw["sg1"].may_send = False
    run_predictive(w)
    assert "unauthorised" in w.gw["sg1"].finished[-1].detail


def test_forwarded_packets_from_unauthorised_peer_are_refused() -> None:
    w = World()
    pkt = udp_packet(1, up=False)
    msg = cxtp.CTD(ip("0.0.0.0"), 0, (cxtp.TransferTag(0, 0).encode(), forward_cdb(pkt, False)))
    outs = w.gw["sg1"].core.receive("sg2", msg, w.now, may_send=False, may_request=False)
    assert not any(isinstance(o, Inject) for o in outs)


def pctd_with(cdbs: list[bytes], tid: int = 77) -> cxtp.PCTD:
    return cxtp.PCTD(MN, 0, b"k" * 20, (cxtp.TransferTag(tid, 0).encode(), *cdbs))


def garbage_ipsec_cdb() -> bytes:
    return (0x8001).to_bytes(2, "big") + bytes([3, 0]) + bytes(range(20))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda w: [garbage_ipsec_cdb()], id="garbage-cdb"),
        pytest.param(
            lambda w: [context.encode(w.sg_out, w.now), garbage_ipsec_cdb()], id="second-bad"
        ),
        pytest.param(lambda w: [cxtp.Detail("hello").encode()], id="wrong-fpt"),
        pytest.param(lambda w: [context.encode(w.sg_out, w.now)[:-8]], id="truncated"),
    ],
)
def test_malformed_cdbs_install_nothing(make) -> None:  # type: ignore[no-untyped-def]
    w = World()
    sg2 = w.gw["sg2"]
    sg2.run(sg2.core.receive("sg1", pctd_with(make(w)), w.now))
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR) and not ctdr.all_ok
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.MALFORMED]
    assert len(sg2.engine.sad) == 0 and sg2.engine.tunnels() == []
    assert sg2.core.in_progress() == 0
    # Reported here as a refused transfer, with why (it was recorded, never announced).
    (rec,) = sg2.finished
    assert (rec.role, rec.peer, rec.outcome) == ("target", "sg1", "refused") and rec.detail
    assert list(sg2.core.records) == [rec]


def test_inbound_only_contexts_are_malformed() -> None:
    w = World()
    sg2 = w.gw["sg2"]
    outs = sg2.core.receive("sg1", pctd_with([context.encode(w.sg_in, w.now)]), w.now)
    sg2.run(outs)
    ctdr = w.peek("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    assert [e.status for e in ctdr.statuses] == [cxtp.Status.MALFORMED]
    assert sg2.core.in_progress() == 0


def test_malformed_sa_result_never_commits() -> None:
    w = World(settings={"sg1": Settings(max_transfer_time=0.2)})
    tid = w.transfer()
    w.drop("sg1", "sg2")
    bad = (cxtp.FPT_SA_RESULT).to_bytes(2, "big") + bytes([2, 0]) + bytes([0, 99, 0, 0])
    ctdr = cxtp.CTDR(MN, True, (), (cxtp.TransferTag(tid, 0).encode(), bad))
    with contextlib.suppress(IpsecctError):  # a typed error is fine: nothing may commit
        w.gw["sg1"].run(w.gw["sg1"].core.receive("sg2", ctdr, w.now))
    assert state(w.tunnel) is not TunnelState.MOVED
    w.now += 1
    w.gw["sg1"].tick()
    assert state(w.tunnel) is TunnelState.ACTIVE


# -- forwarding after the cut-over, PMTU, identity --------------------------------------------
def test_packets_reaching_the_source_after_cut_over_are_forwarded() -> None:
    w = World(settings={"sg1": Settings(forward_time=2.0)})
    run_predictive(w)
    # The MN has not applied SG_UPDATE yet: its packets still reach sg1; so do the host's.
    for i in range(3):
        w.mn_send(i)  # routed to sg1 (the MN's SA still names it)
        w.host_send("sg1", 100 + i)
    assert w.gw["sg1"].wire == []
    assert w.gw["sg1"].core.counters["forwarded"] == 6
    w.deliver_all()
    sg2 = w.gw["sg2"]
    assert sorted(stream_seq(p) for p in sg2.delivered) == [0, 1, 2]
    res = w.flush_to_mn()
    assert sorted(stream_seq(r.packet) for r in res if isinstance(r, ToInner)) == [100, 101, 102]
    # After forward_time the source forgets the tunnel.
    w.now += 2.5
    w.gw["sg1"].tick()
    w.host_send("sg1", 200)
    assert w.gw["sg1"].dropped[-1] in (Drop.NO_SA, Drop.POLICY)
    assert w.gw["sg1"].engine.tunnels() == []


def test_held_packets_are_forwarded_on_commit() -> None:
    w = World()
    w.transfer()
    for i in range(3):
        w.mn_send(i)
        w.host_send("sg1", 100 + i)
    w.deliver_all()
    assert sorted(stream_seq(p) for p in w.gw["sg2"].delivered) == [0, 1, 2]
    assert w.gw["sg1"].delivered == []
    res = w.flush_to_mn()
    assert sorted(stream_seq(r.packet) for r in res if isinstance(r, ToInner)) == [100, 101, 102]
    assert not w.mn.dropped


def test_target_path_mtu_replaces_transferred_one() -> None:
    w = World(settings={"sg2": Settings(path_mtu=600)})
    assert w.sg_out.path_mtu == 1500
    run_predictive(w)
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert t2.outbound.path_mtu == 600
    assert t2.inbound is not None and t2.inbound.path_mtu == 600
    # An inner packet that no longer fits (DF set) gets an ICMP "fragmentation needed".
    big = bytearray(udp_packet(1, up=False, size=1000))
    big[6] |= 0x40
    from ipsecct.ipsec import ippacket

    big[10:12] = b"\0\0"
    big[10:12] = ippacket.checksum(bytes(big[:20])).to_bytes(2, "big")
    sg2 = w.gw["sg2"]
    sg2.from_inner(bytes(big))
    icmp = sg2.delivered[-1]
    assert icmp[9] == 1 and icmp[20] == 3 and icmp[21] == 4  # ICMP type 3 code 4
    assert int.from_bytes(icmp[26:28], "big") < 600
    # Smaller packets still go through.
    w.host_send("sg2", 2)
    assert sg2.wire[-1][0] == SPI_DOWN


def test_direct_identity_moves_the_mn() -> None:
    w = World()
    run_predictive(w)
    w.flush_to_mn()
    assert w.mn.applied == [[f"gateway now {SG_ADDR['sg2']}:4500"]]
    assert w.mn.out_sa.dst == ip(SG_ADDR["sg2"])
    w.mn_send(1)
    assert [stream_seq(p) for p in w.gw["sg2"].delivered] == [1]


def test_indirect_identity_sends_no_signal() -> None:
    s = Settings(identity=Identity.INDIRECT)
    w = World(settings={"sg2": s})
    run_predictive(w)
    assert w.gw["sg2"].to_mn == []
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert t2.outbound.src == ip(SG_ADDR["sg1"])  # the (virtual) address moves; SAs unchanged


def test_records_have_outcomes() -> None:
    w = World()
    run_predictive(w)
    d = w.gw["sg1"].finished[-1].as_dict()
    assert d["outcome"] == "committed" and d["role"] == "source" and d["peer"] == "sg2"
    assert d["tunnels"] == 1 and d["accepted"] == 1
    assert len(d["id"]) == 16


def test_ping_pong_transfer() -> None:
    w = World()
    for i in range(3):
        w.host_send("sg1", i)
    run_predictive(w)
    w.flush_to_mn()
    w.host_send("sg2", 10)
    # Back to sg1 while sg1 still forwards for the old tunnel.
    run_predictive(w, "sg2", "sg1")
    assert active(w) == ["sg1"]
    w.flush_to_mn()
    assert w.mn.out_sa.dst == ip(SG_ADDR["sg1"])
    w.host_send("sg1", 11)
    w.mn_send(12)
    res = w.flush_to_mn()
    assert [stream_seq(r.packet) for r in res if isinstance(r, ToInner)] == [11]
    assert [stream_seq(p) for p in w.gw["sg1"].delivered] == [12]
    assert no_duplicates([(s, q) for _, s, q in w.all_wire()]) == []


def test_token_key_agrees_when_both_spis_are_equal() -> None:
    from tests.helpers.transfer import tunnel_sas

    (g_out, g_in, _), (m_out, m_in, _) = tunnel_sas("sg1", spi_up=0x5005, spi_down=0x5005)
    assert token_key([g_out, g_in]) == token_key([m_out, m_in])


def test_engine_signal_is_authenticated() -> None:
    """A forged signal (wrong key) is dropped by the MN: ICV."""
    w = World()
    run_predictive(w)
    (pkt,) = w.gw["sg2"].to_mn
    forged = bytearray(pkt)
    forged[-1] ^= 1
    assert w.mn.receive(bytes(forged)) is Drop.ICV
    assert w.mn.applied == []
    assert w.mn.receive(pkt) is not Drop.ICV
    assert len(w.mn.applied) == 1


def test_transfer_states_change_only_as_the_table_says() -> None:
    from types import SimpleNamespace

    from ipsecct.ct.transfer import TRANSITIONS, IncomingState, OutgoingState, _move
    from ipsecct.errors import TransferStateError

    og = SimpleNamespace(tid=7, state=OutgoingState.SENT)
    _move(og, OutgoingState.COMMITTED)  # type: ignore[arg-type]
    assert og.state is OutgoingState.COMMITTED
    with pytest.raises(TransferStateError, match="committed -> aborted"):
        _move(og, OutgoingState.ABORTED)  # type: ignore[arg-type]
    inc = SimpleNamespace(tid=8, state=IncomingState.ACTIVE)
    with pytest.raises(TransferStateError, match="active -> pending"):
        _move(inc, IncomingState.PENDING)  # type: ignore[arg-type]
    # nothing leaves a final state; everything but the first is reachable
    finals = {OutgoingState.COMMITTED, OutgoingState.ABORTED, IncomingState.ACTIVE,
              IncomingState.CANCELLED}  # fmt: skip
    assert not {a for a, _ in TRANSITIONS} & finals
    assert {b for _, b in TRANSITIONS} == set(OutgoingState) - {OutgoingState.SENT} | set(
        IncomingState
    ) - {IncomingState.RECEIVING}


def test_decisions_and_results_out_of_order_or_for_nothing_change_nothing() -> None:
    """A hostile or confused peer on either side (already held): a COMMIT for a transfer never
    sent, the same COMMIT twice, a CTC after it, a CTDR that refuses after the source
    committed, and one that names SAs of no tunnel of the transfer. The tunnel is active at
    exactly one gateway each time, and no (SPI, sequence number) goes out twice."""
    w = World()
    tid = w.transfer()
    mn = w.tunnel.outbound.dst
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    # The source: a COMMIT for a transfer id that was never sent installs nothing.
    never = cxtp.CTD(mn, 0, (cxtp.TransferTag(tid ^ 0x5A5A, 1).encode(), decision_cdb(1)))
    sg2.run(sg2.core.receive("sg1", never, w.now))
    assert sg2.engine.tunnels() == []
    w.deliver("sg1", "sg2")  # the contexts
    ctdr = w.drop("sg2", "sg1")
    assert isinstance(ctdr, cxtp.CTDR)
    # The target: a CTDR (not the last) with a result for an SA of no tunnel of the transfer.
    stray = cxtp.SaResult(cxtp.Status.INTERNAL_ERROR, 50, 0xDEAD, 0xDEAD, mn).encode()
    first = cxtp.CTDR(mn, True, (), (cxtp.TransferTag(tid, 0).encode(), stray))
    sg1.run(sg1.core.receive("sg2", first, w.now))
    w.post("sg2", "sg1", cxtp.encode(ctdr))
    w.deliver("sg2", "sg1")  # committed (the stray result named nothing of ours)
    assert state(w.tunnel) is TunnelState.MOVED
    commit = w.drop("sg1", "sg2")
    for _ in range(2):  # the COMMIT twice, then a CTC: activated once, and kept
        w.post("sg1", "sg2", cxtp.encode(commit))
        w.deliver("sg1", "sg2")
    cancel = cxtp.CTC(mn, (cxtp.TransferTag(tid, 0).encode(),))
    sg2.run(sg2.core.receive("sg1", cancel, w.now))
    assert active(w) == ["sg2"]
    assert [r.outcome for r in sg2.finished] == ["committed"]
    # The target says "refused" after the commit: the source repeats its decision and does
    # not take the tunnel back.
    refusal = cxtp.CTDR(
        mn,
        False,
        (cxtp.StatusEntry(context.FPT_IPSEC_SA, cxtp.Status.INTERNAL_ERROR),),
        (cxtp.TransferTag(tid, 0, last=True).encode(),),
    )
    sg1.run(sg1.core.receive("sg2", refusal, w.now))
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTD)
    w.deliver_all()
    assert active(w) == ["sg2"]
    for i in range(5):
        w.host_send("sg1", 700 + i)
        w.host_send("sg2", 800 + i)
    wire = [(spi, seq) for g in w.gw.values() for spi, seq in g.wire]
    assert no_duplicates(wire) == []


# -- commit what you accept (Settings.commit_early; docs/cxtp.md, docs/state.md) ----------------
# The source sends its COMMIT as soon as its "leaving" rows are durable, before the CTDR; the
# CTDR (or, if it is lost, the decision query's answer) then only names the tunnels the target
# refused, which come back to the source ("owned" again durable before they send).
def commit_early_and_lose_the_ctdr(w: World, j1: Any, a: Tunnel, b: Tunnel) -> None:
    """sg1 moves ``a`` and ``b`` to sg2 with its early COMMIT ("leaving" durable first), sg2
    receives everything (contexts, FINAL, COMMIT), and its CTDR is lost with the channel."""
    sg1 = w.gw["sg1"]
    sg1.run(sg1.core.start([a, b], "sg2", w.now)[1])
    settle_at(w, "sg1", j1)
    while w.pending("sg1", "sg2"):
        w.deliver("sg1", "sg2")
    w.drop("sg2", "sg1")


def test_early_commit_leaves_before_the_ctdr_and_the_refused_tunnel_comes_back() -> None:
    w, j1, j2, a, b = early_world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    _, out = sg1.core.start([a, b], "sg2", w.now)
    sg1.run(out)
    assert j1.calls == [("leaving", 0)]
    assert w.pending("sg1", "sg2") == 1  # the PCTD, no COMMIT before "leaving" is durable
    w.host_send("sg1", 1)  # make-before-break: sg1 sends below the cap meanwhile
    assert settle_at(w, "sg1", j1) == ["leaving"]
    # FINAL and COMMIT go at once, before any CTDR; every tunnel has moved (forwarders)
    assert w.pending("sg1", "sg2") == 3 and w.pending("sg2", "sg1") == 0
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.MOVED)
    assert sg1.finished == []  # not decided yet: the answer says which went
    w.deliver_all()  # PCTD (a installed, b refused, CTDR), FINAL, COMMIT; CTDR at sg1
    (t2,) = sg2.engine.tunnels()
    assert t2.outbound.spi == a.outbound.spi
    assert t2.state is TunnelState.HELD  # the COMMIT came first: it waits for "pending"
    # b came back, held until "owned" again is durable; a stays moved
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.HELD)
    assert [c for c, _ in j1.calls] == ["leaving", "given", "kept"]
    rec = sg1.finished[-1]
    assert (rec.outcome, rec.accepted) == ("partial", 1)
    assert set(rec.spis) == {sa.spi for sa in a.sas()}  # what moved, for the IKE SA
    sg1.from_inner(to_b(7))
    assert sent_on(w, 0x500) == []  # held: nothing on b until "kept" is durable
    settle_at(w, "sg1", j1)
    assert state(b) is TunnelState.ACTIVE and len(sent_on(w, 0x500)) == 1
    settle_at(w, "sg2", j2)
    assert t2.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed
    w.host_send("sg2", 2)
    assert no_duplicates([(s, q) for _, s, q in w.all_wire()]) == []
    assert all(g == "sg1" for g, _ in sent_on(w, 0x500))
    # the moved tunnel forwards for forward_time after the answer, then goes
    assert sg1.engine.moved_tunnels() == [a]
    w.now += sg1.core.settings.forward_time + 1
    sg1.tick()
    assert sg1.engine.moved_tunnels() == []


def test_early_commit_refused_entirely_takes_everything_back() -> None:
    w, j1, _j2, a, b = early_world(mbb=False)
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    collide(w, "sg2", SPI_UP)  # the target's policy refuses a too (deny)
    sg2.core.settings.conflict = ConflictPolicy.DENY
    sg1.run(sg1.core.start([a, b], "sg2", w.now)[1])
    settle_at(w, "sg1", j1)
    w.deliver_all()
    assert [t.name for t in sg2.engine.tunnels()] == ["other"]  # nothing installed
    assert (state(a), state(b)) == (TunnelState.HELD, TunnelState.HELD)
    assert sg1.finished[-1].outcome == "refused"
    settle_at(w, "sg1", j1)
    assert (state(a), state(b)) == (TunnelState.ACTIVE, TunnelState.ACTIVE)
    w.host_send("sg1", 3)
    assert [g for g, _ in sent_on(w, SPI_DOWN)] == ["sg1"]


def test_a_ctdr_before_leaving_is_durable_commits_what_it_accepted_as_before() -> None:
    w, j1, j2, a, b = early_world()
    sg1 = w.gw["sg1"]
    sg1.run(sg1.core.start([a, b], "sg2", w.now)[1])
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")  # the CTDR first: b refused, rolled back at once (kept)
    assert w.pending("sg1", "sg2") == 0
    settle_at(w, "sg1", j1)  # "leaving" (and "kept") durable: the COMMIT for a alone
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.ACTIVE)
    w.deliver_all()
    settle_at(w, "sg2", j2)
    assert [t.state for t in w.gw["sg2"].engine.tunnels()] == [TunnelState.ACTIVE]


def test_channel_lost_after_the_early_commit_asks_and_takes_back_only_the_refused() -> None:
    """The COMMIT went out, then the channel broke before the CTDR: the source cannot know
    which tunnels the target activated. They stay moved (never sent on) and it asks; the
    target's "taken" names what it refused, and only that comes back."""
    w, j1, j2, a, b = early_world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    commit_early_and_lose_the_ctdr(w, j1, a, b)
    settle_at(w, "sg2", j2)
    sg1.run(sg1.core.peer_lost("sg2", w.now))
    q = w.peek("sg1", "sg2")
    assert isinstance(q, cxtp.DQ) and q.answer == cxtp.Answer.QUERY
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.MOVED)
    assert sg1.core.tunnel_roles()[b][0] == "unresolved"
    for n in range(10):  # only its tail (4 numbers the FINAL named as the source's) goes out
        sg1.from_inner(to_b(n))
        w.host_send("sg1", n)
    assert len(sent_on(w, 0x500)) == 4
    assert len([x for x in sent_on(w, SPI_DOWN) if x[0] == "sg1"]) == 4
    w.now += 5.0  # asked again while unanswered
    sg1.tick()
    w.deliver("sg1", "sg2")
    ans = w.peek("sg2", "sg1")
    assert isinstance(ans, cxtp.DQ) and ans.answer == cxtp.Answer.TAKEN
    w.deliver_all()
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.HELD)
    assert sg1.finished[-1].outcome == "partial"
    settle_at(w, "sg1", j1)
    assert state(b) is TunnelState.ACTIVE
    assert [t.state for t in sg2.engine.tunnels()] == [TunnelState.ACTIVE]
    w.host_send("sg2", 2)
    sg1.from_inner(to_b(3))
    assert no_duplicates([(s, q) for _, s, q in w.all_wire()]) == []
    assert {g for g, _ in sent_on(w, SPI_DOWN)} <= {"sg2", "sg1"}
    assert all(g == "sg1" for g, _ in sent_on(w, 0x500))


def test_no_ctdr_in_time_after_the_early_commit_asks_on_the_same_channel() -> None:
    """The CTDR does not come within the transfer time (the target is slow): the tunnels are
    not rolled back (the COMMIT is out) but asked about; a late CTDR decides as well."""
    w, j1, _j2, a, b = early_world()
    sg1 = w.gw["sg1"]
    sg1.run(sg1.core.start([a, b], "sg2", w.now)[1])
    settle_at(w, "sg1", j1)
    w.now += 1.0
    sg1.tick()
    assert isinstance(w.peek("sg1", "sg2"), cxtp.PCTD)
    assert isinstance(cxtp.decode(w.links[("sg1", "sg2")][-1]), cxtp.DQ)
    assert sg1.finished == [] and (state(a), state(b)) == (TunnelState.MOVED, TunnelState.MOVED)
    for _ in range(3):
        w.deliver("sg1", "sg2")  # PCTD, FINAL, COMMIT (the DQ stays behind)
    w.deliver("sg2", "sg1")  # the late CTDR: it decides
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.HELD)
    assert sg1.finished[-1].outcome == "partial"
    w.deliver_all()  # the query and its answer change nothing more
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.HELD)
    assert len(sg1.finished) == 1


def test_a_target_that_never_got_the_contexts_answers_not_taken_and_everything_comes_back() -> None:
    w, j1, _j2, a, b = early_world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    sg1.run(sg1.core.start([a, b], "sg2", w.now)[1])
    settle_at(w, "sg1", j1)
    lost = [w.drop("sg1", "sg2") for _ in range(3)]  # PCTD, FINAL, COMMIT: gone
    sg1.run(sg1.core.peer_lost("sg2", w.now))
    w.deliver_all()
    assert sg2.engine.tunnels() == []
    assert (state(a), state(b)) == (TunnelState.HELD, TunnelState.HELD)
    assert sg1.finished[-1].outcome == "refused"
    settle_at(w, "sg1", j1)
    assert (state(a), state(b)) == (TunnelState.ACTIVE, TunnelState.ACTIVE)
    # the late messages of the dead channel install nothing now
    for m in lost:
        w.post("sg1", "sg2", cxtp.encode(m))
    w.deliver_all()
    assert sg2.engine.tunnels() == [] and sg2.core.counters["refused"] >= 1
    w.host_send("sg1", 9)
    assert no_duplicates([(s, q) for _, s, q in w.all_wire()]) == []


def test_a_restarted_target_answers_taken_without_a_list_and_nothing_comes_back() -> None:
    """A target that lost its memory of the transfer answers from its record of the
    arrival, without saying what it refused: the refused tunnel is lost at the source too
    (re-keyed later), never resumed on a guess."""
    from ipsecct.ct.transfer import TransferCore
    from tests.helpers.journal_recorder import Recorder

    w, j1, j2, a, b = early_world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    commit_early_and_lose_the_ctdr(w, j1, a, b)
    settle_at(w, "sg2", j2)
    j2b = Recorder(w)
    j2b.arrivals = set(j2.arrivals)
    sg2.core = TransferCore(sg2.engine, sg2.core.endpoint, sg2.core.settings, journal=j2b)
    sg1.run(sg1.core.peer_lost("sg2", w.now))
    w.deliver_all()
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.MOVED)
    assert sg1.finished[-1].outcome == "committed"
    assert [c for c, _ in j1.calls][-1] == "given"


def test_a_ctc_or_an_abandon_after_the_early_commit_rolls_nothing_back() -> None:
    w, j1, _j2, a, b = early_world()
    sg1 = w.gw["sg1"]
    tid, out = sg1.core.start([a, b], "sg2", w.now)
    sg1.run(out)
    settle_at(w, "sg1", j1)
    tag = cxtp.TransferTag(tid, 0).encode()
    w.post("sg2", "sg1", cxtp.encode(cxtp.CTC(MN, (tag,))))
    w.deliver("sg2", "sg1")
    assert sg1.core.abandon(tid, w.now, "operator") == []
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.MOVED)
    w.deliver_all()
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.HELD)


def test_a_target_that_gave_up_before_the_late_commit_activates_nothing() -> None:
    """The COMMIT reaches a target that already discarded the pending transfer (its
    decision time passed): it activates nothing; the source, told "accepted" by the CTDR,
    records the tunnel away: nobody sends on it (liveness lost, never a number twice)."""
    w, j1, j2, a, b = early_world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    sg1.run(sg1.core.start([a, b], "sg2", w.now)[1])
    w.deliver("sg1", "sg2")
    settle_at(w, "sg2", j2)
    w.now += 60.0
    sg2.tick()
    assert sg2.engine.tunnels() == []
    w.now -= 60.0
    settle_at(w, "sg1", j1)
    w.deliver_all()
    assert sg2.engine.tunnels() == []
    for n in range(10):  # sg1 sends its tail (4) and nothing more
        w.host_send("sg1", n)
    assert len(sent_on(w, SPI_DOWN)) == 4
    assert state(a) is TunnelState.MOVED and sg1.finished[-1].outcome == "partial"


def one_sender(w: World, refuse_b: bool) -> None:
    for spi in (SPI_DOWN, 0x500):
        live = [
            g.name for g in w.gw.values() for t in g.engine.tunnels()
            if t.outbound.spi == spi and t.state is TunnelState.ACTIVE
        ]  # fmt: skip
        assert len(live) <= 1, f"SPI {spi:#x} active at {live}"
    if refuse_b:
        assert not [t for t in w.gw["sg2"].engine.tunnels() if t.outbound.spi == 0x500]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.sampled_from(
            [
                ("start", ""), ("send", "sg1"), ("send", "sg2"), ("sendb", ""), ("mn", ""),
                ("deliver", "sg1>sg2"), ("deliver", "sg1>sg2"), ("deliver", "sg1>sg2"),
                ("deliver", "sg2>sg1"), ("drop", "sg1>sg2"), ("drop", "sg2>sg1"),
                ("drop", "sg2>sg1"), ("settle", "sg1"), ("settle", "sg1"), ("settle", "sg2"),
                ("tick", "0.3"), ("tick", "3"), ("lost", "sg1"), ("lost", "sg1"), ("flush", ""),
            ]
        ),
        min_size=1,
        max_size=50,
    ),
    mbb=st.booleans(),
    refuse_b=st.booleans(),
)
def test_early_commit_never_sends_a_number_twice(
    ops: list[tuple[str, str]], mbb: bool, refuse_b: bool
) -> None:
    """Random deliveries, drops, lost channels, time-outs and write completions around an
    early COMMIT with one tunnel the target may refuse: no (SPI, sequence number) pair twice
    on the wire, never an outbound SA active at two gateways, and a refused tunnel never
    active at the target."""
    w, j1, j2, a, b = early_world(mbb=mbb, refuse_b=refuse_b)
    started = False
    ops = [("start", ""), *ops]
    for n, (op, arg) in enumerate(ops, 1):
        if op == "start" and not started:
            started = True
            w.gw["sg1"].run(w.gw["sg1"].core.start([a, b], "sg2", w.now)[1])
        elif op == "send":
            w.host_send(arg, n)
        elif op == "sendb":
            for g in w.gw.values():
                g.from_inner(to_b(n))
        elif op == "mn":
            w.mn_send(n)
        elif op in ("deliver", "drop"):
            x, y = arg.split(">")
            if w.pending(x, y):
                (w.deliver if op == "deliver" else w.drop)(x, y)
        elif op == "settle":
            settle_at(w, arg, j1 if arg == "sg1" else j2)
        elif op == "tick":
            w.now += float(arg)
            for g in w.gw.values():
                g.tick()
        elif op == "lost":
            w.gw["sg1"].run(w.gw["sg1"].core.peer_lost("sg2", w.now))
        elif op == "flush":
            w.flush_to_mn()
        one_sender(w, refuse_b)
    for _ in range(5):
        w.deliver_all()
        settle_at(w, "sg1", j1)
        settle_at(w, "sg2", j2)
        w.now += 3.0
        for g in w.gw.values():
            g.tick()
        one_sender(w, refuse_b)
    for n in range(20):
        w.host_send("sg1", 9000 + n)
        w.host_send("sg2", 9100 + n)
        for g in w.gw.values():
            g.from_inner(to_b(9200 + n))
    wire = [(s, q) for _, s, q in w.all_wire()]
    assert no_duplicates(wire) == []
    if refuse_b:
        assert all(g == "sg1" for g, _ in sent_on(w, 0x500))


def test_a_query_that_reaches_a_target_waiting_for_its_pending_write_names_the_refused() -> None:
    """The COMMIT came but "pending" is not durable yet when the lost CTDR's query arrives:
    the answer is "taken" with the refused SA (the refused tunnel comes back), and the
    target activates the accepted one once its write lands."""
    w, j1, j2, a, b = early_world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    commit_early_and_lose_the_ctdr(w, j1, a, b)
    sg1.run(sg1.core.peer_lost("sg2", w.now))
    w.deliver_all()
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.HELD
    assert (state(a), state(b)) == (TunnelState.MOVED, TunnelState.HELD)
    settle_at(w, "sg2", j2)
    settle_at(w, "sg1", j1)
    assert (t2.state, state(b)) == (TunnelState.ACTIVE, TunnelState.ACTIVE)



def test_decided_incoming_transfers_leave_the_deadline_walk_and_are_forgotten_at_give_up() -> None:
    """The deadline and settle walks see only open incoming transfers (receiving, pending);
    a decided one (active, refused, cancelled) is still forgotten at its give_up, the timer
    woken for it (here a discarded one: known for 60 s, long after the rest is forgotten)."""
    from ipsecct.ct.transfer import OPEN_INCOMING

    w = World(settings={"sg2": Settings(retry=1.0, retry_max=5.0)})
    core = w.gw["sg2"].core

    def open_ones() -> dict[tuple[str, int], object]:
        return {k: i for k, i in core.incoming.items() if i.state in OPEN_INCOMING}

    run_predictive(w)  # one active
    assert len(core.incoming) == 1 and core._open_incoming == open_ones() == {}
    run_predictive(w, "sg2", "sg1")
    w.transfer()
    w.deliver("sg1", "sg2")
    w.drop("sg2", "sg1")  # no decision comes: the target discards it after retry_max
    assert len(core._open_incoming) == 1 and core._open_incoming == open_ones()
    last = core.incoming[next(reversed(core.incoming))]
    # Woken only when next_deadline says (as the node's one timer is).
    while core.incoming:
        due = core.next_deadline()
        assert due is not None, "a decided transfer would never be forgotten"
        w.now = max(w.now, due)
        w.gw["sg2"].tick()
        assert core._open_incoming == open_ones()
    assert last.state.value == "cancelled" and w.now == last.give_up

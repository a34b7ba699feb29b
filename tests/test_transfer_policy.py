"""Issue 8 §2 and §3 in the sans-I/O core: a trusted but compromised peer (``allow = ["send"]``)
and an outsider who saw an SPI on the wire, against :class:`~ipsecct.ct.transfer.TransferCore`
and :class:`~ipsecct.ipsec.engine.Engine`. Each test is the attack from the issue; before the
fix, each of them succeeded.

The victim is sg1 (it serves the MN, 10.1.0.2, for the network 10.2.0.0/24); sg2 is the peer
that may send contexts and turns against it.
"""

from __future__ import annotations

import math
import os

import pytest

from ipsecct.ct import cxtp
from ipsecct.ct.transfer import Settings, forward_cdb
from ipsecct.ipsec.engine import Held, Tunnel, TunnelState
from ipsecct.ipsec.ippacket import IPAddress, build_udp
from ipsecct.ipsec.spd import Action
from tests.helpers.transfer import (
    HOST,
    MN_ADDR,
    MN_INNER,
    SG_ADDR,
    SPI_DOWN,
    SPI_UP,
    World,
    ip,
    sel,
    stream_seq,
    udp_packet,
)
from tests.helpers.transfer_policy import (
    ACCEPT,
    DISCARDED,
    MN,
    ctdr_ok,
    rogue_cdbs,
    send_pctd,
    victim_world,
)


def commit(w: World, tid: int) -> None:
    tag = cxtp.TransferTag(tid, 1).encode()
    dec = (0x8005).to_bytes(2, "big") + bytes([1, 0, 1, 0, 0, 0])
    w.post("sg2", "sg1", cxtp.encode(cxtp.CTD(MN, 0, (tag, dec))))
    w.deliver("sg2", "sg1")


def host_to(w: World, dst: str) -> None:
    w.gw["sg1"].from_inner(build_udp(ip(HOST), ip(dst), 7000, 5000, b"secret"))


def spis_sent(w: World) -> list[int]:
    return [spi for spi, _ in w.gw["sg1"].wire]


# -- §2: a PCTD that would take over traffic ----------------------------------------------
def test_catch_all_selectors_from_a_peer_are_refused() -> None:
    w = victim_world()
    spd_before = list(w.gw["sg1"].engine.spd)
    send_pctd(w, rogue_cdbs(sel("0.0.0.0/0", "0.0.0.0/0")))
    assert not ctdr_ok(w)
    commit(w, 0x5EED)  # the attacker commits anyway
    assert list(w.gw["sg1"].engine.spd) == spd_before
    assert len(w.gw["sg1"].engine.sad) == 2
    # The MN's traffic still goes to the MN, and the DISCARDed address stays discarded.
    host_to(w, MN_INNER)
    host_to(w, DISCARDED)
    assert spis_sent(w) == [SPI_DOWN]
    assert w.gw["sg1"].core.counters["policy_refused"] == 1


def test_selectors_outside_what_the_operator_accepts_are_refused() -> None:
    w = victim_world()
    send_pctd(w, rogue_cdbs(sel("10.2.0.0/24", "172.16.0.1/32")))  # remote outside 10.1/16
    assert not ctdr_ok(w)
    send_pctd(w, rogue_cdbs(sel("10.3.0.0/24", "10.1.0.7/32")), tid=2)  # local outside
    assert not ctdr_ok(w)
    assert len(w.gw["sg1"].engine.sad) == 2
    # Each refusal is reported here too (transfer-refused), not only to the source.
    assert [(r.transfer_id, r.role, r.outcome, r.detail) for r in w.gw["sg1"].finished] == [
        (0x5EED, "target", "refused", "unauthorised"),
        (2, "target", "refused", "unauthorised"),
    ]


def test_selectors_overlapping_another_tunnel_are_refused() -> None:
    w = victim_world()
    # Inside what sg1 accepts, but it is the MN's traffic (10.1.0.2 is inside 10.1.0.0/28).
    send_pctd(w, rogue_cdbs(sel("10.2.0.0/24", "10.1.0.0/28")))
    assert not ctdr_ok(w)
    commit(w, 0x5EED)
    host_to(w, MN_INNER)
    assert spis_sent(w) == [SPI_DOWN]


def test_tunnels_of_one_mn_in_one_transfer_may_overlap_each_other_only() -> None:
    """The CHILD SAs of one IKE SA may overlap each other (a UDP-only CHILD SA beside one for
    all traffic): in one transfer, tunnels to the same MN may overlap as they did at the
    source. A tunnel to another MN overlapping them, or one overlapping a tunnel already here,
    is still refused."""
    w = victim_world()
    wide = sel("10.2.0.0/24", "10.1.0.64/28")
    udp = sel("10.2.0.0/24", "10.1.0.66/32")
    send_pctd(w, rogue_cdbs(wide) + rogue_cdbs(udp, spi_out=0x6660003, spi_in=0x6660004))
    assert ctdr_ok(w)
    assert len(w.gw["sg1"].engine.sad) == 6
    # the same, but the second tunnel goes to another MN: refused
    w = victim_world()
    send_pctd(w, rogue_cdbs(wide) + rogue_cdbs(udp, spi_out=0x6660003, spi_in=0x6660004,
                                               mn="192.0.2.67"))  # fmt: skip
    msg = w.drop("sg1", "sg2")
    assert isinstance(msg, cxtp.CTDR) and not msg.all_ok
    assert len(w.gw["sg1"].engine.sad) == 4
    assert w.gw["sg1"].core.counters["policy_refused"] == 1
    # the same MN as a tunnel already here (sg1's own to 192.0.2.66 from the first): refused
    send_pctd(w, rogue_cdbs(udp, spi_out=0x6660005, spi_in=0x6660006), tid=2)
    assert not ctdr_ok(w)
    assert w.gw["sg1"].core.counters["policy_refused"] == 2


def test_accepted_tunnel_stays_behind_the_operators_entries() -> None:
    w = victim_world()
    # A legitimate, non-overlapping tunnel for another MN: accepted ...
    send_pctd(w, rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32")))
    assert ctdr_ok(w)
    commit(w, 0x5EED)
    eng = w.gw["sg1"].engine
    entries = list(eng.spd)
    assert entries[-1].name == "rogue"
    assert [e.action for e in entries[:1]] == [Action.DISCARD]
    # ... and it carries its own traffic only; the DISCARD entry still wins for its address.
    w.gw["sg1"].wire.clear()  # (the signal that told its MN about sg1)
    w.gw["sg1"].from_inner(build_udp(ip(HOST), ip("10.1.0.66"), 7000, 5000, b"x"))
    assert spis_sent(w) == [0x6660001]
    w.gw["sg1"].from_inner(build_udp(ip(DISCARDED), ip("10.1.0.66"), 7000, 5000, b"x"))
    assert spis_sent(w) == [0x6660001]
    assert eng.stats.drops["policy"] == 1


def test_inbound_sa_selectors_are_checked_too() -> None:
    w = victim_world()
    cdbs = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32"))
    wide = rogue_cdbs(sel("0.0.0.0/0", "0.0.0.0/0"))
    send_pctd(w, [cdbs[0], wide[1]])  # a fine outbound SA, a catch-all inbound one
    assert not ctdr_ok(w)
    assert len(w.gw["sg1"].engine.sad) == 2


def test_many_tunnels_are_checked_against_each_other() -> None:
    w = victim_world()
    # (two MNs: one MN's tunnels of one transfer may overlap each other, see above)
    a = rogue_cdbs(sel("10.2.0.0/24", "10.1.1.1/32"), spi_out=0x100, spi_in=0x101)
    b = rogue_cdbs(sel("10.2.0.0/24", "10.1.1.0/24"), spi_out=0x200, spi_in=0x201, mn="192.0.2.67")
    send_pctd(w, a + b)
    msg = w.drop("sg1", "sg2")
    assert isinstance(msg, cxtp.CTDR) and not msg.all_ok
    results = {cxtp.SaResult.decode(c).spi: cxtp.SaResult.decode(c).status for c in msg.ext[1:]}
    assert results[0x100] == cxtp.Status.SUCCESS
    assert results[0x200] == cxtp.Status.UNAUTHORISED


# -- §2: FORWARD ----------------------------------------------------------------------------
def forward(w: World, packet: bytes, inbound: bool, src: str = "sg2", dst: str = "sg1") -> None:
    tag = cxtp.TransferTag(0, 0).encode()
    w.post(src, dst, cxtp.encode(cxtp.CTD(ip("0.0.0.0"), 0, (tag, forward_cdb(packet, inbound)))))
    w.deliver(src, dst)


def test_forward_into_another_mns_tunnel_is_refused() -> None:
    w = victim_world()
    forward(w, build_udp(ip(HOST), ip(MN_INNER), 7000, 5000, b"attacker's text"), False)
    assert w.gw["sg1"].wire == []
    w.flush_to_mn()
    assert w.mn.delivered == []
    assert w.gw["sg1"].core.counters["forward_refused"] == 1


def test_forward_of_esp_for_a_tunnel_not_moved_by_that_peer_is_refused() -> None:
    w = victim_world()
    data = w.mn.send(udp_packet(1, up=True))
    assert data is not None
    forward(w, data, True)  # a copy of the MN's packet, "forwarded" by sg2
    assert w.gw["sg1"].delivered == []
    assert w.gw["sg1"].core.counters["forward_refused"] == 1
    w.route_mn(data)  # the real one still arrives (the replay window did not move)
    assert [stream_seq(p) for p in w.gw["sg1"].delivered] == [1]


def test_forward_only_for_a_tunnel_moved_between_these_two_within_the_window() -> None:
    w = World(("sg1", "sg2", "sg3"))
    w.transfer("sg1", "sg2")
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")  # COMMIT: the tunnel lives at sg2 now
    sg2 = w.gw["sg2"]
    sg2.wire.clear()  # (the signal that told the MN about sg2)
    # From sg1 (who moved it) the MN's traffic is taken ...
    forward(w, udp_packet(1, up=False), False, "sg1", "sg2")
    assert len(sg2.wire) == 1
    # ... from sg3 it is not, nor traffic that is not the tunnel's ...
    forward(w, udp_packet(2, up=False), False, "sg3", "sg2")
    forward(w, build_udp(ip(HOST), ip("10.1.0.77"), 7000, 5000, b"x"), False, "sg1", "sg2")
    assert len(sg2.wire) == 1
    # ... and after the forward window, not from sg1 either.
    w.now += Settings().forward_time + 0.01
    sg2.tick()
    forward(w, udp_packet(3, up=False), False, "sg1", "sg2")
    assert len(sg2.wire) == 1
    assert sg2.core.counters["forward_refused"] == 3


def test_arrived_tunnels_leave_the_forward_table_when_due_or_when_they_move_on() -> None:
    """The table of arrived tunnels (FORWARDs taken for them) is walked only once an entry may
    be due, and each leaves it at the first housekeeping after its end; one that moves on
    leaves it as it moves, not at the next walk."""
    w = World(("sg1", "sg2", "sg3"))
    w.transfer("sg1", "sg2")
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")  # COMMIT: active at sg2, which takes sg1's FORWARDs for a while
    core = w.gw["sg2"].core
    (t,) = core.arrived
    until = core.arrived[t][1]
    assert core._arrived_due == until
    w.now = until - 0.01
    core.handle_timer(w.now)
    assert t in core.arrived and core._arrived_due == until
    w.now = until - 0.01 + 0.5  # the next housekeeping (twice a second), past its end
    core.handle_timer(w.now)
    assert not core.arrived and core._arrived_due == math.inf
    # Again, and this time it moves on to sg3 within its window: out of the table at once.
    w.now += 10
    for src, dst in (("sg2", "sg1"), ("sg1", "sg2")):
        w.transfer(src, dst)
        w.deliver(src, dst)
        w.deliver(dst, src)
        w.deliver(src, dst)
    (t,) = core.arrived
    w.transfer("sg2", "sg3")
    w.deliver("sg2", "sg3")
    assert t in core.arrived
    w.deliver("sg3", "sg2")  # the CTDR: sg2 moves it and sends the COMMIT
    assert t.state is TunnelState.MOVED and t not in core.arrived


def test_forward_for_the_successor_of_a_moved_tunnel_within_the_window() -> None:
    """A tunnel that arrived from sg1 is replaced at sg2 by a successor with the same policy
    (an IKEv2 CHILD SA the MN rekeyed right after the handover): what sg1 still forwards for
    that traffic goes out on the successor, within the window, from sg1 only."""
    w = World(("sg1", "sg2", "sg3"))
    w.transfer("sg1", "sg2")
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")  # COMMIT
    sg2 = w.gw["sg2"]
    sg2.wire.clear()
    (moved,) = sg2.engine.tunnels()
    sg2.engine.remove_tunnel(moved)
    sg2.engine.add_tunnel(moved.entry, moved.outbound, moved.inbound)  # its successor
    forward(w, udp_packet(1, up=False), False, "sg1", "sg2")
    assert len(sg2.wire) == 1
    forward(w, udp_packet(2, up=False), False, "sg3", "sg2")
    forward(w, build_udp(ip(HOST), ip("10.1.0.77"), 7000, 5000, b"x"), False, "sg1", "sg2")
    forward(w, udp_packet(3, up=True), True, "sg1", "sg2")  # ESP: only for the arrived SA
    assert len(sg2.wire) == 1
    w.now += Settings().forward_time + 0.01
    sg2.tick()
    forward(w, udp_packet(4, up=False), False, "sg1", "sg2")
    assert len(sg2.wire) == 1
    assert sg2.core.counters["forward_refused"] == 4


def test_forward_of_esp_for_a_moved_tunnel_gone_since() -> None:
    """The tunnel that arrived from sg1 was deleted at sg2 since (the MN rekeyed and deleted
    it), its inbound SA kept a moment as a shadow: ESP that sg1 still forwards under its SPI is
    taken from sg1, not from another peer."""
    w = World(("sg1", "sg2", "sg3"))
    w.transfer("sg1", "sg2")
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")  # COMMIT
    sg2 = w.gw["sg2"]
    (moved,) = sg2.engine.tunnels()
    assert moved.inbound is not None
    sg2.engine.remove_tunnel(moved)
    sg2.engine.add_shadow(moved.inbound)
    data = w.mn.send(udp_packet(1, up=True))
    assert data is not None
    forward(w, data, True, "sg3", "sg2")
    forward(w, data, True, "sg1", "sg2")
    assert [stream_seq(p) for p in sg2.delivered] == [1]
    assert sg2.core.counters["forward_refused"] == 1


# -- §2: unfinished transfers, limits ----------------------------------------------------------
def test_pctds_without_last_are_bounded_and_expire() -> None:
    w = victim_world()
    core = w.gw["sg1"].core
    cdbs = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32"))
    for tid in range(1, 3001):
        send_pctd(w, cdbs, tid, last=False)
    assert core.in_progress() == Settings().max_incoming_per_peer
    assert core.counters["over_limit"] == 3000 - Settings().max_incoming_per_peer
    # Every refusal was answered BUSY; nothing was installed, nothing waits for sg1's own
    # transfers (what [transfer] balance waits for).
    assert w.pending("sg1", "sg2") == 3000 - Settings().max_incoming_per_peer
    assert core.outgoing_in_progress() == 0
    assert len(core.seen) == Settings().max_incoming_per_peer
    w.now += Settings().retry_max + 0.01
    w.gw["sg1"].tick()
    assert core.in_progress() == 0
    assert core.counters["expired"] == Settings().max_incoming_per_peer
    assert all(not inc.cdbs for inc in core.incoming.values())
    # Then the peer gets room again, and sg1 can still hand its MN over.
    send_pctd(w, cdbs, 9999)
    assert core.in_progress() == 1
    w.links.clear()
    w.transfer("sg1", "sg2")
    assert core.outgoing_in_progress() == 1


def test_too_many_contexts_in_one_message_are_refused() -> None:
    w = victim_world()
    tiny = (0x8001).to_bytes(2, "big") + bytes([1, 0, 0, 0, 0, 0])
    send_pctd(w, [tiny] * (Settings().max_contexts_per_message + 1), last=False)
    msg = w.drop("sg1", "sg2")
    assert isinstance(msg, cxtp.CTDR) and msg.statuses[0].status == cxtp.Status.BUSY
    assert w.gw["sg1"].core.in_progress() == 0


def test_too_many_contexts_in_one_transfer_are_refused() -> None:
    w = World(settings={"sg1": Settings(max_contexts_per_transfer=10)})
    one = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32"))[0]
    send_pctd(w, [one] * 6, 7, last=False)
    assert w.gw["sg1"].core.in_progress() == 1
    tag = cxtp.TransferTag(7, 1, last=True).encode()
    w.post("sg2", "sg1", cxtp.encode(cxtp.PCTD(MN, 0, b"k" * 20, (tag, *[one] * 6))))
    w.deliver("sg2", "sg1")
    assert w.gw["sg1"].core.in_progress() == 0
    assert len(w.gw["sg1"].engine.sad) == 2


# -- §3: the held queue --------------------------------------------------------------------
def held_world(**kw: int) -> World:
    w = World(settings={"sg1": Settings(**kw)})  # type: ignore[arg-type]
    w.transfer()  # sg1 holds the MN's tunnel; the PCTD waits on the link
    return w


def test_forgeries_for_a_held_tunnel_are_not_kept() -> None:
    w = held_world()
    sg1 = w.gw["sg1"]
    forged = SPI_UP.to_bytes(4, "big") + (5).to_bytes(4, "big") + os.urandom(60_000)
    for _ in range(200):
        sg1.from_mn(forged)
    og = next(iter(sg1.core.outgoing.values()))
    assert og.held == [] and og.held_bytes == 0
    assert sg1.engine.stats.drops["icv"] == 200
    # The real MN's packets are still kept, and the replay window has not moved.
    w.mn_send(1)
    w.mn_send(2)
    assert len(og.held) == 2
    assert sg1.engine.tunnels()[0].inbound.window.top == 0  # type: ignore[union-attr]


def test_replayed_packet_for_a_held_tunnel_is_not_kept() -> None:
    w = World(settings={"sg1": Settings()})
    data = w.mn_send(1)
    assert data is not None
    w.transfer()
    w.route_mn(data)
    og = next(iter(w.gw["sg1"].core.outgoing.values()))
    assert og.held == []
    assert w.gw["sg1"].engine.stats.drops["replay"] == 1


def test_a_held_packet_replayed_is_kept_once() -> None:
    """An authentic packet of a held tunnel, captured and replayed (sent again to the source,
    or relayed by it to the target) is newer than the replay window, which a held packet does
    not move: each copy passed the ICV and the window and was kept, so 49 copies of one
    packet filled the tunnel's held_per_tunnel (50) and the MN's next packets were refused.
    A copy of a packet held (its SPI and sequence number) is dropped, counted."""
    w = held_world(held_per_tunnel=50)
    sg1 = w.gw["sg1"]
    data = w.mn_send(1)
    assert data is not None
    for _ in range(100):
        sg1.from_mn(data)
    for i in range(2, 12):
        w.mn_send(i)
    core = sg1.core
    og = next(iter(core.outgoing.values()))
    assert len(og.held) == 11 and core.counters["held_refused"] == 0, core.counters
    assert core.counters["held_duplicate"] == 100
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")
    while w.pending("sg1", "sg2"):
        w.deliver("sg1", "sg2")  # the held packets, forwarded to sg2
    assert sorted(stream_seq(p) for p in w.gw["sg2"].delivered) == list(range(1, 12))


def test_held_queue_is_bounded_per_tunnel_in_packets() -> None:
    w = held_world(held_per_tunnel=5)
    for i in range(1, 9):
        w.host_send("sg1", i)
    core = w.gw["sg1"].core
    og = next(iter(core.outgoing.values()))
    assert len(og.held) == 5
    assert core.counters["held_refused"] == 3


def test_held_queue_is_bounded_per_tunnel_in_octets() -> None:
    w = held_world(held_bytes_per_tunnel=3000)
    for i in range(1, 9):
        w.gw["sg1"].from_inner(udp_packet(i, up=False, size=1000))
    core = w.gw["sg1"].core
    og = next(iter(core.outgoing.values()))
    assert len(og.held) == 2 and og.held_bytes <= 3000
    assert core.counters["held_refused"] == 6
    assert all(isinstance(h, Held) for h in og.held)


def test_held_packets_of_the_real_mn_survive_a_flood_of_forgeries() -> None:
    w = held_world(held_per_tunnel=50)
    sg1 = w.gw["sg1"]
    for i in range(20_000):
        forged = SPI_UP.to_bytes(4, "big") + (i + 1).to_bytes(4, "big") + os.urandom(40)
        sg1.from_mn(forged)
    for i in range(1, 11):
        w.mn_send(i)
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")
    while w.pending("sg1", "sg2"):
        w.deliver("sg1", "sg2")  # the held packets, forwarded to sg2
    assert sorted(stream_seq(p) for p in w.gw["sg2"].delivered) == list(range(1, 11))
    assert w.gw["sg2"].engine.tunnels()[0].state is TunnelState.ACTIVE


def test_overlap_index_agrees_with_pairwise_overlaps() -> None:
    from ipsecct.ipsec.spd import OverlapIndex

    idx = OverlapIndex()
    sels = [sel("10.2.0.0/24", f"10.1.{i // 250}.{i % 250}/32") for i in range(600)]
    sels.append(sel("10.9.0.0/24", "0.0.0.0/0"))
    for i, s in enumerate(sels):
        idx.add(s, i)
    for q in (
        sel("10.2.0.0/24", "10.1.0.5/32"),
        sel("10.2.0.0/24", "10.1.1.0/24"),
        sel("10.9.0.1/32", "10.1.0.0/16"),
        sel("10.3.0.0/24", "10.1.0.0/16"),
        sel("0.0.0.0/0", "0.0.0.0/0"),
    ):
        assert sorted(idx.overlapping(q)) == [i for i, s in enumerate(sels) if s.overlaps(q)]  # type: ignore[type-var]


def test_a_tunnel_coming_back_replaces_its_forwarder() -> None:
    w = World(settings={"sg1": ACCEPT, "sg2": ACCEPT})
    for src, dst in (("sg1", "sg2"), ("sg2", "sg1")):
        w.transfer(src, dst)
        w.deliver(src, dst)
        w.deliver(dst, src)
        w.deliver(src, dst)
    eng = w.gw["sg1"].engine
    assert [t.state for t in eng.tunnels()] == [TunnelState.ACTIVE]
    assert eng.moved_tunnels() == []
    w.gw["sg1"].wire.clear()
    w.host_send("sg1", 1)
    assert [spi for spi, _ in w.gw["sg1"].wire] == [SPI_DOWN]


# -- §5: forged CTARs ----------------------------------------------------------------------
def ctar(mn: str = MN_ADDR, seq: int = 1) -> cxtp.CTAR:
    return cxtp.CTAR(ip(mn), ip(SG_ADDR["sg1"]), seq, os.urandom(4))


def test_forged_ctars_from_one_source_are_rate_limited() -> None:
    w = World()
    core = w.gw["sg2"].core
    sent = 0
    for i in range(7000):
        why, out = core.ctar("sg1", ctar(seq=i), ("192.0.2.66", 4500), w.now + i * 1e-4)
        sent += len(out)
        assert (why is None) == bool(out)
    # 0.7 s of them: the burst, then CT_REQUEST_RATE a second (before: one CT-Req each).
    assert sent <= cxtp.CT_REQUEST_RATE * 1.7 + 1
    assert core.counters["ctar_limited"] >= 7000 - sent - 1


def test_forged_ctars_from_many_sources_are_capped_per_peer() -> None:
    w = World()
    core = w.gw["sg2"].core
    sent = 0
    for i in range(7000):
        mn = f"198.51.{i // 250}.{i % 250 + 1}"
        _, out = core.ctar("sg1", ctar(mn, i), (f"203.0.{i // 250}.{i % 250}", 4500), w.now)
        sent += len(out)
    assert sent <= 20 * cxtp.CT_REQUEST_RATE
    assert len(core._ctar_source) <= 4096 and len(core._ctar_mn) <= 4096


def test_ctar_replayed_or_for_a_tunnel_already_here_sends_nothing() -> None:
    w = World()
    core = w.gw["sg2"].core
    assert core.ctar("sg1", ctar(seq=5), "a", w.now)[1]
    assert core.ctar("sg1", ctar(seq=5), "b", w.now + 1) == ("sequence number already used", [])
    core1 = w.gw["sg1"].core  # sg1 serves the MN: a CTAR there asks for nothing
    assert core1.ctar("sg2", ctar(seq=6), "c", w.now)[0] == "the MN's tunnel is already here"


def test_source_checks_the_token_before_any_work_and_limits_a_flooding_peer() -> None:
    w = World()
    sg1 = w.gw["sg1"]
    for i in range(500):
        tag = cxtp.TransferTag(1000 + i, 0).encode()
        msg = cxtp.CTReq(MN, i, os.urandom(4), (tag,))
        w.post("sg2", "sg1", cxtp.encode(msg))
        w.deliver("sg2", "sg1")
    # Nothing held, nothing sent but refusals, and only as many as the per-peer rate allows.
    assert sg1.engine.tunnels()[0].state is TunnelState.ACTIVE
    assert sg1.core.outgoing == {}
    answers = w.pending("sg1", "sg2")
    assert answers <= 20 * cxtp.CT_REQUEST_RATE
    assert sg1.core.counters["ctar_limited"] == 500 - answers


def test_a_ct_req_cannot_take_the_transfer_id_of_a_transfer_of_ours() -> None:
    """In reactive mode the requesting peer chooses the transfer id. sg2, a target of sg1's
    predictive transfer of the MN (so it knows its id), pulls another MN whose keys it
    knows (a tunnel it handed over earlier) under that same id, or under the id of its own
    earlier CT-Req: before, the new transfer replaced the running one in sg1's table, and
    the MN's tunnel stayed held for ever (no time-out, no record, its CTDR answered for the
    other). Now the request is refused (busy) and each transfer ends on its own."""
    from ipsecct.ct.transfer import token_key
    from tests.helpers.transfer import collide

    def pull(w: World, mn: IPAddress, tunnel: Tunnel, tid: int) -> None:
        tok = cxtp.compute_token(token_key(tunnel), mn, 1)
        msg = cxtp.CTReq(mn, 1, tok, (cxtp.TransferTag(tid, 0).encode(),))
        w.post("sg2", "sg1", cxtp.encode(msg))
        w.deliver("sg2", "sg1")

    for first in ("predictive", "reactive"):
        w = World()
        sg1 = w.gw["sg1"]
        collide(w, "sg1", 0x4444, peer="192.0.2.99")
        other = next(t for t in sg1.engine.tunnels() if t.name == "other")
        if first == "predictive":
            tid = w.transfer()
            w.drop("sg1", "sg2")  # sg2 reads the id and never answers
        else:
            tid = 0x7AB1E
            pull(w, MN, w.tunnel, tid)
            w.drop("sg1", "sg2")
        assert w.tunnel.state is TunnelState.HELD
        pull(w, ip("192.0.2.99"), other, tid)
        answer = w.drop("sg1", "sg2")
        assert isinstance(answer, cxtp.CTD)
        assert [cxtp.Detail.decode(c).text for c in answer.cdbs[1:]] == ["busy"]
        assert other.state is TunnelState.ACTIVE
        assert [t.name for t in sg1.core.outgoing[tid].tunnels] == ["mn1"]
        w.now += 1
        sg1.tick()  # the MN's transfer times out and its tunnel is sent on again here
        assert w.tunnel.state is TunnelState.ACTIVE and sg1.core.outgoing == {}  # type: ignore[comparison-overlap]  # moved on since narrowed
        assert [(r.transfer_id, r.outcome) for r in sg1.finished] == [(tid, "timeout")]


# -- UNIT: tunnels that go with an IKE SA, all or none ---------------------------------------
def test_a_unit_the_target_cannot_take_is_refused_whole_before_the_commit() -> None:
    """The CHILD SAs of an IKE SA come with a UNIT CDB naming them: a target without a check
    for that kind, or whose check refuses (no such connection), refuses all of them, and a
    tunnel of the same transfer outside the unit is still taken."""
    from ipsecct.ct.transfer import UNIT_IKEV2, unit_cdb

    child_a = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32"))
    child_b = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.67/32"), spi_out=0x6660003, spi_in=0x6660004)
    other = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.68/32"), spi_out=0x6660005, spi_in=0x6660006)
    unit = unit_cdb(UNIT_IKEV2, [0x6660001, 0x6660003], b"conn")
    for check in (None, lambda peer, payload, tid, spis: "no connection 'conn' here"):
        w = victim_world()
        core = w.gw["sg1"].core
        if check is not None:
            core.unit_checks[UNIT_IKEV2] = check
        send_pctd(w, child_a + child_b + other + [unit])
        msg = w.drop("sg1", "sg2")
        assert isinstance(msg, cxtp.CTDR) and not msg.all_ok
        res = {cxtp.SaResult.decode(c).spi: cxtp.SaResult.decode(c).status for c in msg.ext[1:]}
        assert res[0x6660001] == res[0x6660003] == cxtp.Status.UNAUTHORISED
        assert res[0x6660005] == cxtp.Status.SUCCESS
        assert {sa.spi for sa in core.engine.sad} == {SPI_UP, SPI_DOWN, 0x6660005, 0x6660006}
        assert core.counters["unit_refused"] == 1
    # a check that accepts: all three are taken
    w = victim_world()
    seen: list[tuple[str, bytes]] = []
    core = w.gw["sg1"].core
    core.unit_checks[UNIT_IKEV2] = lambda peer, p, tid, spis: seen.append((peer, p)) or None  # type: ignore[func-returns-value]
    send_pctd(w, child_a + child_b + other + [unit])
    assert ctdr_ok(w) and seen == [("sg2", b"conn")]
    assert len(w.gw["sg1"].engine.sad) == 8


def test_a_unit_that_names_no_tunnel_of_its_transfer_is_not_checked() -> None:
    """A UNIT is about CHILD SAs of its own transfer (the source names the ones that go). A
    hostile peer adds UNITs whose SPIs name none of them: each was checked, and the IKE
    check reserved the virtual IPs it named until the transfer ended (a prepared one: up
    to prepare_timeout), so one transfer of one tunnel could hold a whole pool from new
    clients, again and again. Such a unit is refused unchecked now (``unit_refused``);
    the transfer's own tunnels are taken."""
    from ipsecct.ct.transfer import UNIT_IKEV2, unit_cdb

    child = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32"))
    units = [unit_cdb(UNIT_IKEV2, [0x7770000 + i], b"squat%d" % i) for i in range(50)]
    w = victim_world()
    core = w.gw["sg1"].core
    seen: list[bytes] = []
    core.unit_checks[UNIT_IKEV2] = lambda peer, p, tid, spis: seen.append(p) or None  # type: ignore[func-returns-value]
    send_pctd(w, child + units + [unit_cdb(UNIT_IKEV2, [0x6660001], b"real")])
    assert ctdr_ok(w) and seen == [b"real"]
    assert core.counters["unit_refused"] == 50
    assert 0x6660001 in {sa.spi for sa in core.engine.sad}


def test_a_unit_in_pieces_is_refused_whole_when_one_piece_is() -> None:
    """An IKE SA whose policy items do not fit one UNIT CDB sends several, each naming the
    same CHILD SAs (ikev2.context.unit_payloads): the target checks each, and one refused
    piece refuses all of the unit's tunnels; all accepted, all are taken."""
    from ipsecct.ct.transfer import UNIT_IKEV2, unit_cdb

    child_a = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32"))
    child_b = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.67/32"), spi_out=0x6660003, spi_in=0x6660004)
    units = [unit_cdb(UNIT_IKEV2, [0x6660001, 0x6660003], p) for p in (b"one", b"two")]
    for bad, ok in ((b"two", False), (b"none", True)):
        w = victim_world()
        core = w.gw["sg1"].core
        seen: list[bytes] = []
        core.unit_checks[UNIT_IKEV2] = lambda peer, p, tid, spis, bad=bad, seen=seen: (  # type: ignore[misc]
            seen.append(p) or ("outside local_ts" if p == bad else None)
        )
        send_pctd(w, child_a + child_b + units)
        msg = w.drop("sg1", "sg2")
        assert isinstance(msg, cxtp.CTDR) and msg.all_ok is ok and seen == [b"one", b"two"]
        if not ok:
            res = {cxtp.SaResult.decode(c).spi: cxtp.SaResult.decode(c).status
                   for c in msg.ext[1:]}  # fmt: skip
            assert res[0x6660001] == res[0x6660003] == cxtp.Status.UNAUTHORISED
            assert core.counters["unit_refused"] == 1
        else:
            assert len(core.engine.sad) == 6


def test_a_unit_is_installed_all_or_none() -> None:
    """One CHILD SA of the unit is refused by the target's policy (its selectors overlap a
    tunnel already here): the other one, accepted and installed held, is removed and refused
    too, so the source keeps the IKE SA with both."""
    from ipsecct.ct.transfer import UNIT_IKEV2, unit_cdb

    w = victim_world()
    core = w.gw["sg1"].core
    core.unit_checks[UNIT_IKEV2] = lambda peer, payload, tid, spis: None
    fine = rogue_cdbs(sel("10.2.0.0/24", "10.1.0.66/32"))
    bad = rogue_cdbs(sel("10.2.0.0/24", f"{MN_INNER}/32"), spi_out=0x6660003, spi_in=0x6660004)
    send_pctd(w, fine + bad + [unit_cdb(UNIT_IKEV2, [0x6660001, 0x6660003], b"")])
    msg = w.drop("sg1", "sg2")
    assert isinstance(msg, cxtp.CTDR) and not msg.all_ok
    res = {cxtp.SaResult.decode(c).spi: cxtp.SaResult.decode(c).status for c in msg.ext[1:]}
    assert res[0x6660001] == res[0x6660003] == cxtp.Status.UNAUTHORISED
    assert {sa.spi for sa in core.engine.sad} == {SPI_UP, SPI_DOWN}
    assert [t.outbound.spi for t in core.engine.tunnels()] == [SPI_DOWN]
    commit(w, 0x5EED)  # nothing to activate
    host_to(w, "10.1.0.66")
    assert spis_sent(w) == []


def test_unit_cdb_round_trip_and_malformed() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    from ipsecct.ct.transfer import parse_unit, unit_cdb
    from ipsecct.errors import CxtpError

    cdb = unit_cdb(1, [0x100, 0xFFFFFFFF], b"payload")
    assert len(cdb) % 8 == 0 and parse_unit(cdb) == (1, [0x100, 0xFFFFFFFF], b"payload")
    for bad in (cdb[:6], cdb[:4] + b"\x01\x00\x00\x00" + cdb[8:], cdb + bytes(8),
                cdb[:-1] + b"\x01"):  # fmt: skip
        with pytest.raises(CxtpError):
            parse_unit(bad)
    with pytest.raises(CxtpError):
        unit_cdb(1, [], b"")

    @given(st.binary(max_size=64))
    def fuzz(data: bytes) -> None:
        try:
            _kind, spis, payload = parse_unit(data)
        except CxtpError:
            return
        assert spis and len(payload) <= len(data)

    fuzz()

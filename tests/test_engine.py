"""The sans-I/O engine (SPD + SAD + counters) with real SAs: every verdict and every drop reason."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from ipsecct.errors import SAError
from ipsecct.ipsec import ippacket, processing
from ipsecct.ipsec.engine import Bypass, Engine, ToInner, ToPeer
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import IPAddress, build_udp
from ipsecct.ipsec.sad import Lifetime, SAEvent, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, AddressRange, Selectors, SPDEntry
from tests.helpers.sas import sa_pair

MN = "10.1.0.2"
HOST = "10.2.0.1"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def sel(local: str, remote: str) -> Selectors:
    return Selectors((AddressRange.parse(local),), (AddressRange.parse(remote),))


def udp(src: str = MN, dst: str = HOST, size: int = 100, *, df: bool = False) -> bytes:
    pkt = bytearray(
        build_udp(
            ip(src), ip(dst), 5000, 7000, bytes(range(256)) * (size // 256) + bytes(size % 256)
        )
    )
    if df and pkt[0] >> 4 == 4:
        pkt[6] |= 0x40
        struct.pack_into("!H", pkt, 10, 0)
        struct.pack_into("!H", pkt, 10, ippacket.checksum(pkt[:20]))
    return bytes(pkt)


class Pair:
    """Two engines joined by one tunnel, as the MN and its gateway hold it (outer addresses
    192.0.2.1 = MN, 192.0.2.2 = SG)."""

    def __init__(
        self,
        *,
        local: str = "10.1.0.2/32",
        remote: str = "10.2.0.0/24",
        src: str = "192.0.2.1",
        dst: str = "192.0.2.2",
        encap: bool = True,
        hard: Lifetime | None = None,
        soft: Lifetime | None = None,
    ) -> None:
        up_out, up_in = sa_pair(spi=0x1001, src=src, dst=dst)
        down_out, down_in = sa_pair(spi=0x2002, src=dst, dst=src)
        s_mn, s_sg = sel(local, remote), sel(remote, local)
        for sa, s in ((up_out, s_mn), (down_in, s_mn), (down_out, s_sg), (up_in, s_sg)):
            sa.selectors = s
            if encap:
                sa.encap = UdpEncap()
            if hard is not None:
                sa.hard = hard
                sa._limits_unset = False
            if soft is not None:
                sa.soft = soft
                sa._limits_unset = False
        self.mn = Engine(ip(src))
        self.sg = Engine(ip(dst))
        self.mn.add_tunnel(SPDEntry(s_mn, Action.PROTECT, static=False), up_out, down_in)
        self.sg.add_tunnel(SPDEntry(s_sg, Action.PROTECT, static=False), down_out, up_in)
        self.up_out, self.up_in, self.down_out, self.down_in = up_out, up_in, down_out, down_in

    def up(self, pkt: bytes, now: float = 0.0) -> ToPeer:
        res = self.mn.outbound(pkt, now)
        assert isinstance(res, ToPeer), res
        return res


def test_protect_both_ways_delivers_the_same_packet() -> None:
    p = Pair()
    pkt = udp()
    res = p.up(pkt)
    assert res.sa is p.up_out
    assert struct.unpack_from("!L", res.data)[0] == 0x1001
    back = p.sg.inbound(res.data, ip("192.0.2.2"), 0.0)
    assert back == ToInner(pkt)
    reply = udp(HOST, MN, 33)
    res2 = p.sg.outbound(reply, 0.0)
    assert isinstance(res2, ToPeer)
    assert p.mn.inbound(res2.data, ip("192.0.2.1"), 0.0) == ToInner(reply)
    assert p.mn.stats.out_packets == 1 and p.mn.stats.in_packets == 1
    assert p.sg.stats.out_bytes == len(reply) and p.sg.stats.in_bytes == len(pkt)
    assert sum(p.mn.stats.drops.values()) == 0


def test_ipv6_tunnel_over_ipv6() -> None:
    p = Pair(
        local="2001:db8:1::2/128", remote="2001:db8:2::/64", src="2001:db8::1", dst="2001:db8::2"
    )
    pkt = udp("2001:db8:1::2", "2001:db8:2::1", 200)
    res = p.up(pkt)
    assert p.sg.inbound(res.data, ip("2001:db8::2"), 0.0) == ToInner(pkt)


def test_bypass_and_discard_policies_and_first_match_wins() -> None:
    p = Pair()
    p.mn.add_policy(SPDEntry(sel("10.1.0.2/32", "10.2.0.7/32"), Action.BYPASS), index=0)
    p.mn.add_policy(SPDEntry(sel("10.1.0.2/32", "10.2.0.9/32"), Action.DISCARD), index=0)
    to7 = udp(MN, "10.2.0.7")
    assert p.mn.outbound(to7, 0.0) == Bypass(to7)
    assert p.mn.outbound(udp(MN, "10.2.0.9"), 0.0) is Drop.POLICY
    assert p.mn.stats.drops["policy"] == 1
    assert isinstance(p.mn.outbound(udp(MN, "10.2.0.8"), 0.0), ToPeer)
    assert p.mn.stats.out_packets == 1


def test_order_before_moves_the_later_policy_and_the_packets_follow() -> None:
    """Engine.order_before (the IKE adapter's rekeyed-SA order) by SPD.index_of: ``then``
    moves to just after ``first`` and the engine's flow cache follows the new order."""
    p = Pair()
    to7 = udp(MN, "10.2.0.7")
    assert isinstance(p.mn.outbound(to7, 0.0), ToPeer)  # (cached now)
    discard = SPDEntry(sel("10.1.0.2/32", "10.2.0.7/32"), Action.DISCARD)
    bypass = SPDEntry(sel("10.1.0.2/32", "10.2.0.7/32"), Action.BYPASS)
    p.mn.add_policy(discard)  # behind the tunnel's policy: not used
    p.mn.add_policy(bypass, index=0)
    assert p.mn.outbound(to7, 0.0) == Bypass(to7)
    assert p.mn.order_before(discard, bypass)
    assert list(p.mn.spd)[-2:] == [discard, bypass]
    assert p.mn.spd.index_of(discard) == len(p.mn.spd) - 2
    assert isinstance(p.mn.outbound(to7, 0.0), ToPeer)  # the tunnel's policy first again
    assert not p.mn.order_before(discard, bypass)  # already in that order
    p.mn.spd.remove(discard)
    assert not p.mn.order_before(discard, bypass)  # not in the SPD


def test_no_matching_policy_is_a_policy_drop() -> None:
    p = Pair()
    assert p.mn.outbound(udp("10.9.9.9", HOST), 0.0) is Drop.POLICY
    assert p.mn.outbound(udp(MN, "10.3.0.1"), 0.0) is Drop.POLICY
    assert p.mn.stats.drops["policy"] == 2
    assert p.mn.stats.out_packets == 0


def test_protect_policy_without_sa_is_no_sa() -> None:
    p = Pair()
    p.mn.spd.add(SPDEntry(sel("10.1.0.2/32", "10.4.0.0/16"), Action.PROTECT), index=0)
    assert p.mn.outbound(udp(MN, "10.4.0.1"), 0.0) is Drop.NO_SA
    assert p.mn.stats.drops["no_sa"] == 1
    assert isinstance(p.mn.outbound(udp(), 0.0), ToPeer)


def test_malformed_inner_packet_is_counted() -> None:
    p = Pair()
    for junk in (b"", b"\x45", b"\x70" + bytes(40), b"\x45" + bytes(30)):
        assert p.mn.outbound(junk, 0.0) is Drop.MALFORMED
    assert p.sg.inbound(b"\x00\x00\x10", ip("192.0.2.2"), 0.0) is Drop.MALFORMED
    assert p.mn.stats.drops["malformed"] == 4
    assert p.sg.stats.drops["malformed"] == 1


def _mtu_of_icmp(icmp: bytes) -> tuple[int, int, int, bytes]:
    """(type, code, mtu, quoted) of an ICMPv4/ICMPv6 error."""
    hdr = ippacket.parse(icmp)
    body = icmp[hdr.header_len :]
    if hdr.version == 4:
        t, c, _, _, mtu = struct.unpack_from("!BBHHH", body)
        return t, c, mtu, body[8:]
    t, c, _, mtu = struct.unpack_from("!BBHI", body)
    return t, c, mtu, body[8:]


def test_pmtu_frag_needed_ipv4_with_df() -> None:
    p = Pair()
    p.up_out.path_mtu = 600
    big = udp(size=800, df=True)
    res = p.mn.outbound(big, 0.0)
    assert isinstance(res, ToInner)
    hdr = ippacket.parse(res.packet)
    assert hdr.protocol == 1 and hdr.dst == ip(MN)
    assert ippacket.checksum(res.packet[:20]) == 0
    assert ippacket.checksum(res.packet[20:]) == 0
    t, c, mtu, quoted = _mtu_of_icmp(res.packet)
    assert (t, c) == (3, 4)
    # quotes the original IP header and the first 8 octets of its payload (RFC 792)
    assert quoted == big[:28]
    # the advertised MTU is what fits: a packet of exactly that size goes through,
    # one of a few octets more does not
    assert 500 < mtu < 600
    assert isinstance(p.mn.outbound(udp(size=mtu - 28, df=True), 0.0), ToPeer)
    assert isinstance(p.mn.outbound(udp(size=mtu - 28 + 4, df=True), 0.0), ToInner)
    assert p.mn.stats.icmp_sent == 2
    assert p.mn.stats.drops["mtu"] == 2


def test_pmtu_without_df_is_sent_anyway() -> None:
    p = Pair()
    p.up_out.path_mtu = 600
    assert isinstance(p.mn.outbound(udp(size=800), 0.0), ToPeer)
    assert p.mn.stats.icmp_sent == 0


def test_pmtu_ipv6_packet_too_big() -> None:
    p = Pair(
        local="2001:db8:1::2/128", remote="2001:db8:2::/64", src="2001:db8::1", dst="2001:db8::2"
    )
    p.up_out.path_mtu = 1300
    big = udp("2001:db8:1::2", "2001:db8:2::1", 1300)
    res = p.mn.outbound(big, 0.0)
    assert isinstance(res, ToInner)
    hdr = ippacket.parse(res.packet)
    assert hdr.protocol == 58 and hdr.dst == ip("2001:db8:1::2")
    t, c, mtu, quoted = _mtu_of_icmp(res.packet)
    assert (t, c) == (2, 0)
    assert mtu == 1280  # never below the IPv6 minimum link MTU
    assert big.startswith(quoted) and len(quoted) >= 1000
    assert len(res.packet) <= 1280


def test_set_path_mtu_at_run_time() -> None:
    p = Pair()
    pkt = udp(size=1000, df=True)
    assert isinstance(p.mn.outbound(pkt, 0.0), ToPeer)
    assert p.mn.set_path_mtu(0x1001, 700) == 1  # only the outbound SA of the MN has it
    assert isinstance(p.mn.outbound(pkt, 1.0), ToInner)
    assert p.mn.set_path_mtu(0x1001, 1500, expires=None) == 1
    assert isinstance(p.mn.outbound(pkt, 2.0), ToPeer)
    assert p.mn.set_path_mtu(0x9999, 700) == 0
    with pytest.raises(SAError):
        p.mn.set_path_mtu(0x1001, 67)


def test_pmtu_aging_reverts_to_default() -> None:
    p = Pair()
    p.mn.set_path_mtu(0x1001, 700, expires=10.0)
    pkt = udp(size=1000, df=True)
    assert isinstance(p.mn.outbound(pkt, 5.0), ToInner)
    assert isinstance(p.mn.outbound(pkt, 10.0), ToPeer)
    assert p.up_out.path_mtu == 1500


def test_inbound_no_sa_replay_icv_counted() -> None:
    p = Pair()
    res = p.up(udp())
    data = bytes(res.data)
    sg_addr = ip("192.0.2.2")
    # unknown SPI
    assert p.sg.inbound(b"\x00\x00\x77\x77" + data[4:], sg_addr, 0.0) is Drop.NO_SA
    # an outbound SA's SPI is not an inbound SA
    out_spi = struct.pack("!L", 0x2002)
    assert p.sg.inbound(out_spi + data[4:], sg_addr, 0.0) is Drop.NO_SA
    # tampered
    bad = bytearray(data)
    bad[-3] ^= 0x80
    assert p.sg.inbound(bad, sg_addr, 0.0) is Drop.ICV
    assert isinstance(p.sg.inbound(data, sg_addr, 0.0), ToInner)
    assert p.sg.inbound(data, sg_addr, 0.0) is Drop.REPLAY
    drops = p.sg.stats.as_dict()["drops"]
    assert isinstance(drops, dict)
    assert (drops["no_sa"], drops["icv"], drops["replay"]) == (2, 1, 1)
    assert p.sg.stats.in_packets == 1


def test_inbound_by_spi_alone_when_destination_unknown() -> None:
    p = Pair()
    res = p.up(udp())
    assert isinstance(p.sg.inbound(res.data, None, 0.0), ToInner)
    res = p.up(udp())
    # an address the SA is not for: found by SPI alone (NAT), as RFC 4301 allows for unicast
    assert isinstance(p.sg.inbound(res.data, ip("198.51.100.1"), 0.0), ToInner)


def test_inbound_inner_addresses_outside_selectors_is_policy() -> None:
    p = Pair()
    # The MN's outbound SA is made to carry a packet its peer's inbound SA does not cover:
    # encrypt it directly, bypassing the MN's SPD.
    spoofed = udp("10.1.0.66", HOST)
    wire = processing.tunnel_encapsulate(p.up_out, spoofed, 0.0)
    assert not isinstance(wire, Drop)
    assert p.sg.inbound(wire, ip("192.0.2.2"), 0.0) is Drop.POLICY
    wire = processing.tunnel_encapsulate(p.up_out, udp(MN, "10.3.0.1"), 0.0)
    assert not isinstance(wire, Drop)
    assert p.sg.inbound(wire, ip("192.0.2.2"), 0.0) is Drop.POLICY
    assert p.sg.stats.drops["policy"] == 2
    assert p.sg.stats.in_packets == 0


def test_hard_lifetime_by_packets_kills_the_sa_and_events_are_drained() -> None:
    p = Pair(soft=Lifetime(packets=2), hard=Lifetime(packets=3))
    for _ in range(3):
        res = p.up(udp())
        assert isinstance(p.sg.inbound(res.data, ip("192.0.2.2"), 0.0), ToInner)
    assert p.mn.outbound(udp(), 0.0) is Drop.LIFETIME
    assert p.mn.stats.drops["lifetime"] == 1
    ev = p.mn.drain_events()
    assert [(e.sa.spi, e.event) for e in ev] == [
        (0x1001, SAEvent.SOFT_EXPIRED),
        (0x1001, SAEvent.HARD_EXPIRED),
    ]
    assert p.mn.drain_events() == []
    sg_ev = [(e.sa.spi, e.event) for e in p.sg.drain_events()]
    assert sg_ev == [(0x1001, SAEvent.SOFT_EXPIRED), (0x1001, SAEvent.HARD_EXPIRED)]
    # the inbound SA is dead too: a fourth packet (made by a fresh sender) is a lifetime drop
    fresh = SecurityAssociation(
        0x1001,
        p.up_out.direction,
        p.up_out.src,
        p.up_out.dst,
        enc_key=p.up_out.enc_key,
        seq=3,
    )
    wire = processing.tunnel_encapsulate(fresh, udp(), 0.0)
    assert not isinstance(wire, Drop)
    assert p.sg.inbound(wire, ip("192.0.2.2"), 0.0) is Drop.LIFETIME
    assert p.sg.stats.drops["lifetime"] == 1


def test_hard_lifetime_by_time_fires_on_tick() -> None:
    p = Pair(hard=Lifetime(seconds=30))
    p.up(udp(), now=1.0)
    p.mn.handle_timer(10.0)
    assert p.mn.drain_events() == []
    p.mn.handle_timer(31.0)
    assert {(e.sa.spi, e.event) for e in p.mn.drain_events()} == {
        (0x1001, SAEvent.HARD_EXPIRED),
        (0x2002, SAEvent.HARD_EXPIRED),
    }
    assert p.mn.outbound(udp(), 31.0) is Drop.LIFETIME


def test_timer_sweep_fires_lifetimes_ages_pmtu_and_collects_events_of_each_sa() -> None:
    """The once-a-second sweep tests each SA's state inline (not three calls per SA): it
    must still do what sa.poll(), sa.effective_mtu() and collecting its events do, for
    every SA whatever its neighbours have."""
    eng = Engine(ip("192.0.2.1"), default_mtu=1400)
    plain, _ = sa_pair(spi=0x3001)
    _, inn = sa_pair(spi=0x3004)
    timed, _ = sa_pair(spi=0x3002)
    timed.soft, timed.hard = Lifetime(seconds=10), Lifetime(seconds=20)
    timed._limits_unset = False  # (as __post_init__ sets it for limits given there)
    aged, _ = sa_pair(spi=0x3003)
    soon, _ = sa_pair(spi=0x3005)
    aged.path_mtu, aged.pmtu_expires = 1280, 5.0
    soon.path_mtu, soon.pmtu_expires = 1300, 50.0
    plain.events.append(SAEvent.SEQ_RESERVE)  # queued by the data path since the last drain
    for sa in (plain, inn, timed, aged, soon):
        eng.sad.add(sa)
    eng.handle_timer(15.0)
    assert [(e.sa.spi, e.event) for e in eng.drain_events()] == [
        (0x3001, SAEvent.SEQ_RESERVE),
        (0x3002, SAEvent.SOFT_EXPIRED),
    ]
    assert (aged.path_mtu, aged.pmtu_expires) == (1400, None)  # type: ignore[comparison-overlap]  # aged out: the default (handle_timer changed it)
    assert (soon.path_mtu, soon.pmtu_expires) == (1300, 50.0)  # not yet
    assert not plain.events and timed.soft_fired and not timed.dead
    eng.handle_timer(16.0)
    assert eng.drain_events() == []  # each event once
    eng.handle_timer(21.0)
    assert [(e.sa.spi, e.event) for e in eng.drain_events()] == [(0x3002, SAEvent.HARD_EXPIRED)]
    assert timed.dead and not plain.dead and not inn.dead
    eng.handle_timer(51.0)
    assert (soon.path_mtu, soon.pmtu_expires) == (1400, None)


def test_remove_tunnel_removes_policy_and_both_sas() -> None:
    p = Pair()
    (tunnel,) = p.mn.tunnels()
    assert {sa.spi for sa in tunnel.sas()} == {0x1001, 0x2002}
    p.mn.remove_tunnel(tunnel)
    assert len(p.mn.sad) == 0 and len(p.mn.spd) == 0
    assert p.mn.outbound(udp(), 0.0) is Drop.POLICY


def test_add_tunnel_refuses_bad_pairs() -> None:
    e = Engine(ip("192.0.2.1"))
    out, _ = sa_pair(spi=0x1000)
    _, inn = sa_pair(spi=0x2000, src="192.0.2.2", dst="192.0.2.1")
    with pytest.raises(SAError):
        e.add_tunnel(SPDEntry(sel(MN, HOST), Action.BYPASS), out, inn)
    with pytest.raises(SAError):
        e.add_tunnel(SPDEntry(sel(MN, HOST), Action.PROTECT), inn, out)
    e.add_tunnel(SPDEntry(sel(MN, HOST), Action.PROTECT), out, inn)
    out2, _ = sa_pair(spi=0x3000)
    _, inn2 = sa_pair(spi=0x2000, src="192.0.2.2", dst="192.0.2.1")
    with pytest.raises(SAError):  # same SPI and destination: collision, nothing half-added
        e.add_tunnel(SPDEntry(sel(MN, HOST), Action.PROTECT), out2, inn2)
    assert len(e.sad) == 2 and len(e.spd) == 1

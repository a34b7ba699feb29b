"""AH (RFC 4302): interoperability with Scapy both ways, mutable fields, replay, ESN, drops."""

from __future__ import annotations

import ipaddress
import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, IPOption_Router_Alert, IPOption_RR
from scapy.layers.inet6 import HBHOptUnknown, IPv6, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.ipsec import AH as ScapyAH
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.packet import Raw

from ipsecct.ipsec import ah
from ipsecct.ipsec.algorithms import INTEG, EncAlg, IntegAlg
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import checksum, parse
from ipsecct.ipsec.processing import outer_header
from ipsecct.ipsec.sad import DfPolicy, Direction, Mode, Protocol, SAEvent, SecurityAssociation
from ipsecct.ipsec.spd import Selectors

ALGS = [
    (IntegAlg.HMAC_SHA2_256_128, "SHA2-256-128"),
    (IntegAlg.HMAC_SHA2_384_192, "SHA2-384-192"),
    (IntegAlg.HMAC_SHA2_512_256, "SHA2-512-256"),
    (IntegAlg.HMAC_SHA1_96, "HMAC-SHA1-96"),
]
SPI = 0x2345
OUTER = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}
INNER = {4: ("10.0.0.1", "10.0.1.1"), 6: ("fd00::1", "fd00:1::1")}


def ah_pair(
    integ: IntegAlg = IntegAlg.HMAC_SHA2_256_128,
    *,
    version: int = 4,
    mode: Mode = Mode.TUNNEL,
    esn: bool = False,
    window: int = 64,
    key: bytes | None = None,
    selectors: Selectors | None = None,
    **kw: object,
) -> tuple[SecurityAssociation, SecurityAssociation]:
    k = key if key is not None else os.urandom(INTEG[integ].key_length)
    src, dst = (ipaddress.ip_address(a) for a in OUTER[version])
    common: dict[str, object] = dict(
        protocol=Protocol.AH,
        mode=mode,
        enc=EncAlg.NULL,
        enc_key=b"",
        integ=integ,
        integ_key=k,
        esn=esn,
        replay_window=window,
        **kw,
    )
    out = SecurityAssociation(SPI, Direction.OUTBOUND, src, dst, **common)  # type: ignore[arg-type]
    inn = SecurityAssociation(
        SPI,
        Direction.INBOUND,
        src,
        dst,
        selectors=selectors,
        **common,  # type: ignore[arg-type]
    )
    return out, inn


def scapy_inner(version: int, size: int = 40) -> IP | IPv6:
    s, d = INNER[version]
    ipcls = IP if version == 4 else IPv6
    data = bytes(i % 256 for i in range(size))
    return ipcls(src=s, dst=d) / UDP(sport=1234, dport=5678) / Raw(data)


def scapy_transport(version: int, size: int = 40) -> IP | IPv6:
    s, d = OUTER[version]
    ipcls = IP if version == 4 else IPv6
    return ipcls(src=s, dst=d) / UDP(sport=1234, dport=5678) / Raw(os.urandom(size))


def scapy_sa(alg: str, key: bytes, version: int, mode: Mode, **kw: object) -> Any:
    """Scapy's SecurityAssociation (untyped: returned as Any)."""
    tunnel = None
    if mode is Mode.TUNNEL:
        s, d = OUTER[version]
        tunnel = IP(src=s, dst=d) if version == 4 else IPv6(src=s, dst=d)
    sa: Any = ScapySA
    return sa(ScapyAH, spi=SPI, auth_algo=alg, auth_key=key, tunnel_header=tunnel, **kw)


def parse_scapy(wire: bytes) -> IP | IPv6:
    return IP(wire) if wire[0] >> 4 == 4 else IPv6(wire)


# -- interoperability ------------------------------------------------------------------------
@pytest.mark.parametrize(("integ", "alg"), ALGS)
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("inner_version", [4, 6])
def test_tunnel_interop_both_ways(
    integ: IntegAlg, alg: str, version: int, inner_version: int
) -> None:
    out, inn = ah_pair(integ, version=version)
    ssa = scapy_sa(alg, out.integ_key, version, Mode.TUNNEL)
    for size in (0, 1, 100, 1400):
        inner = bytes(scapy_inner(inner_version, size))
        # ipsecct -> Scapy
        wire = ah.protect(out, inner, 0.0)
        assert isinstance(wire, bytes)
        assert len(wire) == len(inner) + ah.overhead(out)
        assert bytes(ssa.decrypt(parse_scapy(wire))) == inner
        # Scapy -> ipsecct
        swire = bytes(ssa.encrypt(parse_scapy(inner)))
        assert ah.unprotect(inn, swire, 0.0) == inner


@pytest.mark.parametrize(("integ", "alg"), ALGS)
@pytest.mark.parametrize("version", [4, 6])
def test_transport_interop_both_ways(integ: IntegAlg, alg: str, version: int) -> None:
    out, inn = ah_pair(integ, version=version, mode=Mode.TRANSPORT)
    ssa = scapy_sa(alg, out.integ_key, version, Mode.TRANSPORT)
    for size in (0, 33, 1000):
        pkt = bytes(scapy_transport(version, size))
        wire = ah.protect(out, pkt, 0.0)
        assert isinstance(wire, bytes)
        assert parse(wire).protocol == 51
        assert bytes(ssa.decrypt(parse_scapy(wire))) == pkt
        swire = bytes(ssa.encrypt(parse_scapy(pkt)))
        assert ah.unprotect(inn, swire, 0.0) == pkt
        # what we send is byte-for-byte what Scapy sends (same seq, padding, header, ICV)
        assert wire == swire


def test_header_lengths_and_padding() -> None:
    # IPv4: 32-bit alignment, never any padding with these ICVs
    assert ah.header_length(IntegAlg.HMAC_SHA1_96, 4) == 24
    assert ah.header_length(IntegAlg.HMAC_SHA2_256_128, 4) == 28
    assert ah.header_length(IntegAlg.HMAC_SHA2_384_192, 4) == 36
    assert ah.header_length(IntegAlg.HMAC_SHA2_512_256, 4) == 44
    # IPv6: 64-bit alignment
    assert ah.header_length(IntegAlg.HMAC_SHA1_96, 6) == 24
    assert ah.header_length(IntegAlg.HMAC_SHA2_256_128, 6) == 32
    assert ah.header_length(IntegAlg.HMAC_SHA2_384_192, 6) == 40
    assert ah.header_length(IntegAlg.HMAC_SHA2_512_256, 6) == 48
    out, _ = ah_pair(IntegAlg.HMAC_SHA2_256_128, version=6)
    wire = ah.protect(out, bytes(scapy_inner(6)), 0.0)
    assert isinstance(wire, bytes)
    assert wire[6] == 51
    assert wire[41] == 32 // 4 - 2  # payload length field
    assert wire[40 + 12 + 16 : 40 + 32] == bytes(4)  # padding after the ICV


# -- mutable fields --------------------------------------------------------------------------
def _reset_v4_checksum(b: bytearray) -> None:
    ihl = (b[0] & 0x0F) * 4
    b[10:12] = b"\0\0"
    struct.pack_into("!H", b, 10, checksum(b[:ihl]))


@pytest.mark.parametrize("mode", [Mode.TUNNEL, Mode.TRANSPORT])
def test_ipv4_mutable_fields_changed_in_transit_still_verify(mode: Mode) -> None:
    out, inn = ah_pair(version=4, mode=mode)
    pkt = bytes(scapy_inner(4)) if mode is Mode.TUNNEL else bytes(scapy_transport(4))
    wire = ah.protect(out, pkt, 0.0)
    assert isinstance(wire, bytes)
    b = bytearray(wire)
    b[8] -= 3  # TTL decremented by three routers
    b[1] = 0xB9  # DSCP re-marked, ECN CE
    b[6] |= 0x40  # DF set on the way
    _reset_v4_checksum(b)
    res = ah.unprotect(inn, bytes(b), 0.0)
    assert isinstance(res, bytes)
    if mode is Mode.TRANSPORT:
        assert res[8] == pkt[8] - 3  # the received TTL is what the rebuilt packet carries
        assert res[9] == 17
        assert checksum(res[:20]) == 0
        assert res[20:] == pkt[20:]
    else:
        assert res == pkt


@pytest.mark.parametrize("field", ["src", "dst", "proto", "ident", "payload", "seq", "spi_nh"])
def test_ipv4_immutable_field_change_is_icv_drop(field: str) -> None:
    out, inn = ah_pair(version=4, mode=Mode.TRANSPORT)
    wire = ah.protect(out, bytes(scapy_transport(4)), 0.0)
    assert isinstance(wire, bytes)
    b = bytearray(wire)
    offsets = {"src": 12, "dst": 19, "ident": 5, "payload": len(b) - 1, "seq": 20 + 11,
               "spi_nh": 20 + 0}
    if field == "proto":
        b[9] = 50
        _reset_v4_checksum(b)
        assert ah.unprotect(inn, bytes(b), 0.0) is Drop.MALFORMED  # not AH any more
        return
    b[offsets[field]] ^= 0x02
    _reset_v4_checksum(b)
    assert ah.unprotect(inn, bytes(b), 0.0) is Drop.ICV
    assert inn.window.top == 0
    assert ah.unprotect(inn, wire, 0.0) != Drop.ICV


@pytest.mark.parametrize(("integ", "alg"), ALGS[:2])
def test_ipv4_options_mutable_zeroed_immutable_covered(integ: IntegAlg, alg: str) -> None:
    """Record Route (mutable, zeroed) may change; Router Alert (immutable) may not. Scapy
    agrees on which is which."""
    out, inn = ah_pair(integ, version=4, mode=Mode.TRANSPORT)
    ssa = scapy_sa(alg, out.integ_key, 4, Mode.TRANSPORT, seq_num=50)
    s, d = OUTER[4]
    pkt = bytes(
        IP(src=s, dst=d, options=[IPOption_Router_Alert(), IPOption_RR(routers=["0.0.0.0"] * 2)])
        / UDP(sport=1, dport=2)
        / Raw(b"options")
    )
    ihl = (pkt[0] & 0x0F) * 4
    assert ihl > 20
    wire = ah.protect(out, pkt, 0.0)
    assert isinstance(wire, bytes)
    assert bytes(ssa.decrypt(IP(wire))) == pkt
    assert ah.unprotect(inn, bytes(ssa.encrypt(IP(pkt))), 0.0) == pkt
    # Record route filled in by a router: still verifies
    rr = pkt.index(bytes([7]), 20)
    b = bytearray(wire)
    b[rr + 2] += 4  # pointer
    b[rr + 3 : rr + 7] = bytes([198, 51, 100, 1])
    _reset_v4_checksum(b)
    res = ah.unprotect(inn, bytes(b), 0.0)
    assert isinstance(res, bytes)
    assert res[rr + 3 : rr + 7] == bytes([198, 51, 100, 1])
    # Router Alert value changed: ICV fails
    ra = pkt.index(bytes([148, 4]), 20)
    b = bytearray(ah.protect(out, pkt, 0.0))  # type: ignore[arg-type]
    b[ra + 3] ^= 1
    _reset_v4_checksum(b)
    assert ah.unprotect(inn, bytes(b), 0.0) is Drop.ICV


def test_ipv4_malformed_options_dropped_without_burning_sequence_numbers() -> None:
    out, _ = ah_pair(version=4, mode=Mode.TRANSPORT)
    pkt = bytearray(bytes(scapy_transport(4)))
    # an option with length 40 in a 4-octet options area
    bad = bytearray(pkt[:20]) + bytes([7, 40, 4, 0]) + pkt[20:]
    bad[0] = 0x46
    struct.pack_into("!H", bad, 2, len(bad))
    _reset_v4_checksum(bad)
    assert ah.protect(out, bytes(bad), 0.0) is Drop.MALFORMED
    assert out.seq == 0


@pytest.mark.parametrize("mode", [Mode.TUNNEL, Mode.TRANSPORT])
def test_ipv6_mutable_fields_changed_in_transit_still_verify(mode: Mode) -> None:
    out, inn = ah_pair(version=6, mode=mode)
    pkt = bytes(scapy_inner(6)) if mode is Mode.TUNNEL else bytes(scapy_transport(6))
    wire = ah.protect(out, pkt, 0.0)
    assert isinstance(wire, bytes)
    b = bytearray(wire)
    b[7] -= 5  # hop limit
    b[0] |= 0x0B  # traffic class high nibble
    b[1] = 0xA5  # traffic class low nibble + flow label
    b[3] = 0x77
    res = ah.unprotect(inn, bytes(b), 0.0)
    assert isinstance(res, bytes)
    if mode is Mode.TUNNEL:
        assert res == pkt
    else:
        assert res[40:] == pkt[40:]
        assert res[7] == pkt[7] - 5
    b = bytearray(ah.protect(out, pkt, 0.0))  # type: ignore[arg-type]
    b[8] ^= 0x80  # the source address is not mutable
    assert ah.unprotect(inn, bytes(b), 0.0) is Drop.ICV


def test_ipv6_hop_by_hop_before_ah_interop() -> None:
    """Transport mode with a Hop-by-Hop header: AH goes after it; an option with the "may
    change" bit is zeroed for the ICV, one without it is covered. Scapy agrees."""
    out, inn = ah_pair(version=6, mode=Mode.TRANSPORT)
    ssa = scapy_sa("SHA2-256-128", out.integ_key, 6, Mode.TRANSPORT, seq_num=50)
    s, d = OUTER[6]
    pkt = bytes(
        IPv6(src=s, dst=d)
        / IPv6ExtHdrHopByHop(
            options=[HBHOptUnknown(otype=0x3E, optdata=b"MUT!"), HBHOptUnknown(otype=0x1E,
                                                                               optdata=b"IMM")]
        )
        / UDP(sport=7, dport=9)
        / Raw(b"hbh")
    )
    wire = ah.protect(out, pkt, 0.0)
    assert isinstance(wire, bytes)
    assert wire[6] == 0 and wire[40] == 51  # fixed -> HBH -> AH
    assert bytes(ssa.decrypt(IPv6(wire))) == pkt
    assert ah.unprotect(inn, bytes(ssa.encrypt(IPv6(pkt))), 0.0) == pkt
    mut = wire.index(b"MUT!")
    b = bytearray(wire)
    b[mut : mut + 4] = b"CHG!"
    res = ah.unprotect(inn, bytes(b), 0.0)
    assert isinstance(res, bytes) and b"CHG!" in res
    imm = wire.index(b"IMM")
    b = bytearray(ah.protect(out, pkt, 0.0))  # type: ignore[arg-type]
    b[imm] ^= 1
    assert ah.unprotect(inn, bytes(b), 0.0) is Drop.ICV


# -- sequence numbers, replay, ESN -----------------------------------------------------------
@pytest.mark.parametrize("version", [4, 6])
def test_replay_and_window(version: int) -> None:
    out, inn = ah_pair(version=version, window=64)
    inner = bytes(scapy_inner(4))
    wires = [ah.protect(out, inner, 0.0) for _ in range(100)]
    assert all(isinstance(w, bytes) for w in wires)
    assert [struct.unpack_from("!L", w, (20 if version == 4 else 40) + 8)[0]  # type: ignore[arg-type]
            for w in wires[:3]] == [1, 2, 3]
    assert ah.unprotect(inn, wires[99], 0.0) == inner  # type: ignore[arg-type]
    assert ah.unprotect(inn, wires[99], 0.0) is Drop.REPLAY  # type: ignore[arg-type]
    assert ah.unprotect(inn, wires[10], 0.0) is Drop.REPLAY  # type: ignore[arg-type]  # too old
    assert ah.unprotect(inn, wires[50], 0.0) == inner  # type: ignore[arg-type]
    assert ah.unprotect(inn, wires[50], 0.0) is Drop.REPLAY  # type: ignore[arg-type]


def test_forged_packet_does_not_move_window() -> None:
    out, inn = ah_pair()
    wire = ah.protect(out, bytes(scapy_inner(4)), 0.0)
    assert isinstance(wire, bytes)
    b = bytearray(wire)
    struct.pack_into("!L", b, 20 + 8, 1000)  # a forged high sequence number
    assert ah.unprotect(inn, bytes(b), 0.0) is Drop.ICV
    assert inn.window.top == 0
    assert isinstance(ah.unprotect(inn, wire, 0.0), bytes)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("mode", [Mode.TUNNEL, Mode.TRANSPORT])
def test_esn_round_trip_across_2_32(version: int, mode: Mode) -> None:
    start = (1 << 32) - 3
    out, inn = ah_pair(version=version, mode=mode, esn=True, seq=start)
    inn.window.restore(start, b"\x01" + bytes(7))
    pkt = bytes(scapy_inner(version)) if mode is Mode.TUNNEL else bytes(scapy_transport(version))
    seen = []
    for _ in range(6):
        wire = ah.protect(out, pkt, 0.0)
        assert isinstance(wire, bytes)
        seen.append(out.seq)
        res = ah.unprotect(inn, wire, 0.0)
        assert isinstance(res, bytes)
        assert res == pkt if mode is Mode.TUNNEL else res[40 if version == 6 else 20 :] == pkt[
            40 if version == 6 else 20 :
        ]
    assert seen[0] == (1 << 32) - 2 and seen[-1] == (1 << 32) + 3
    assert inn.window.top == (1 << 32) + 3
    # the high bits really are in the ICV: a receiver that infers the wrong ones rejects it
    out2, wrong = ah_pair(version=version, mode=mode, esn=True, seq=(1 << 33), key=out.integ_key)
    w = ah.protect(out2, pkt, 0.0)
    assert isinstance(w, bytes)
    assert ah.unprotect(wrong, w, 0.0) is Drop.ICV  # receiver infers high bits 0, not 2


@pytest.mark.parametrize("version", [4, 6])
def test_esn_interop_with_scapy(version: int) -> None:
    """Scapy takes the high-order 32 bits by hand (``esn_en``/``esn``)."""
    hi = 1
    out, inn = ah_pair(IntegAlg.HMAC_SHA2_512_256, version=version, esn=True, seq=(hi << 32) + 9)
    inn.window.restore((hi << 32) + 9, b"\x01" + bytes(7))
    ssa = scapy_sa("SHA2-512-256", out.integ_key, version, Mode.TUNNEL, esn_en=True, esn=hi)
    inner = bytes(scapy_inner(4))
    wire = ah.protect(out, inner, 0.0)
    assert isinstance(wire, bytes)
    assert bytes(ssa.decrypt(parse_scapy(wire))) == inner
    swire = bytes(ssa.encrypt(IP(inner), seq_num=11))
    assert ah.unprotect(inn, swire, 0.0) == inner
    assert inn.window.top == (hi << 32) + 11
    # without the high bits Scapy's ICV differs
    plain = scapy_sa("SHA2-512-256", out.integ_key, version, Mode.TUNNEL)
    assert ah.unprotect(inn, bytes(plain.encrypt(IP(inner), seq_num=12)), 0.0) is Drop.ICV


def test_sequence_exhaustion_32_bit() -> None:
    out, _ = ah_pair(seq=0xFFFFFFFE)
    inner = bytes(scapy_inner(4))
    assert isinstance(ah.protect(out, inner, 0.0), bytes)
    assert ah.protect(out, inner, 0.0) is Drop.SEQ_EXHAUSTED
    assert ah.protect(out, inner, 0.0) is Drop.SEQ_EXHAUSTED
    assert out.events.count(SAEvent.SEQ_EXHAUSTED) == 1
    assert out.rekey_requested


def test_sequence_rollover_when_overflow_permitted() -> None:
    out, _ = ah_pair(seq=0xFFFFFFFF, overflow_permitted=True)
    wire = ah.protect(out, bytes(scapy_inner(4)), 0.0)
    assert isinstance(wire, bytes)
    assert struct.unpack_from("!L", wire, 28)[0] == 1


# -- lifetimes and accounting ----------------------------------------------------------------
def test_lifetimes_and_accounting() -> None:
    from ipsecct.ipsec.sad import Lifetime

    out, inn = ah_pair(soft=Lifetime(packets=2), hard=Lifetime(packets=3, seconds=100.0))
    inner = bytes(scapy_inner(4, 60))
    for i in range(3):
        w = ah.protect(out, inner, float(i))
        assert isinstance(w, bytes)
        assert ah.unprotect(inn, w, float(i)) == inner
    assert out.counters.packets == 3 and out.counters.bytes == 3 * len(inner)
    assert inn.counters.packets == 3 and inn.counters.bytes == 3 * len(inner)
    assert out.events == [SAEvent.SOFT_EXPIRED, SAEvent.HARD_EXPIRED]
    assert ah.protect(out, inner, 3.0) is Drop.LIFETIME
    # time-based hard lifetime, inbound
    out2, inn2 = ah_pair(hard=Lifetime(seconds=10.0))
    w = ah.protect(out2, inner, 0.0)
    assert isinstance(w, bytes)
    assert ah.unprotect(inn2, w, 10.0) is Drop.LIFETIME


# -- inbound checks --------------------------------------------------------------------------
def test_wrong_spi_is_no_sa() -> None:
    out, _ = ah_pair()
    wire = ah.protect(out, bytes(scapy_inner(4)), 0.0)
    other = SecurityAssociation(
        SPI + 1, Direction.INBOUND, out.src, out.dst, protocol=Protocol.AH,
        enc=EncAlg.NULL, integ=out.integ, integ_key=out.integ_key,
    )
    assert isinstance(wire, bytes)
    assert ah.unprotect(other, wire, 0.0) is Drop.NO_SA


def test_tunnel_selectors_enforced() -> None:
    sel = Selectors.between("10.0.1.0/24", "10.0.0.0/24", protocol=17)
    out, inn = ah_pair(selectors=sel)
    ok = bytes(scapy_inner(4))
    w = ah.protect(out, ok, 0.0)
    assert isinstance(w, bytes)
    assert ah.unprotect(inn, w, 0.0) == ok
    bad = bytes(IP(src="10.9.9.9", dst="10.0.1.1") / UDP() / Raw(b"x"))
    w = ah.protect(out, bad, 0.0)
    assert isinstance(w, bytes)
    assert ah.unprotect(inn, w, 0.0) is Drop.POLICY


def test_transport_sa_in_tunnel_sa_out_policy() -> None:
    """A verified tunnel-mode packet whose next header is not IP is a policy drop."""
    key = os.urandom(32)
    tout, _ = ah_pair(mode=Mode.TRANSPORT, key=key)
    _, tin = ah_pair(mode=Mode.TUNNEL, key=key)
    w = ah.protect(tout, bytes(scapy_transport(4)), 0.0)
    assert isinstance(w, bytes)
    assert ah.unprotect(tin, w, 0.0) is Drop.POLICY


def test_fragments_refused() -> None:
    out, inn = ah_pair(mode=Mode.TRANSPORT)
    pkt = bytearray(bytes(scapy_transport(4)))
    pkt[6] |= 0x20  # MF
    _reset_v4_checksum(pkt)
    assert ah.protect(out, bytes(pkt), 0.0) is Drop.MALFORMED
    wire = bytearray(ah.protect(out, bytes(scapy_transport(4)), 0.0))  # type: ignore[arg-type]
    wire[7] = 1  # fragment offset
    _reset_v4_checksum(wire)
    assert ah.unprotect(inn, bytes(wire), 0.0) is Drop.MALFORMED


def test_bad_ah_length_is_malformed() -> None:
    out, inn = ah_pair(version=6)
    wire = bytearray(ah.protect(out, bytes(scapy_inner(6)), 0.0))  # type: ignore[arg-type]
    wire[41] = 1  # AH 12 octets: shorter than the ICV
    assert ah.unprotect(inn, bytes(wire), 0.0) is Drop.MALFORMED
    wire[41] = 5  # 28 octets: not a multiple of 8 for IPv6
    assert ah.unprotect(inn, bytes(wire), 0.0) is Drop.MALFORMED
    wire[41] = 255
    assert ah.unprotect(inn, bytes(wire), 0.0) is Drop.MALFORMED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([4, 6]))
def test_random_bytes_never_raise(data: bytes, version: int) -> None:
    _, inn = ah_pair(version=version, mode=Mode.TRANSPORT)
    prefix = bytes(scapy_transport(version, 0))[: 20 if version == 4 else 40]
    for pkt in (data, prefix + data):
        res = ah.unprotect(inn, pkt, 0.0)
        assert isinstance(res, Drop)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_packets_never_raise(data: st.DataObject) -> None:
    version = data.draw(st.sampled_from([4, 6]))
    mode = data.draw(st.sampled_from([Mode.TUNNEL, Mode.TRANSPORT]))
    out, inn = ah_pair(version=version, mode=mode, key=bytes(32))
    wire = bytearray(ah.protect(out, bytes(scapy_transport(version, 20)), 0.0))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    res = ah.unprotect(inn, bytes(wire[:cut]), 0.0)
    assert isinstance(res, bytes | Drop)
    # random packets offered for protection never raise either
    assert isinstance(ah.protect(out, bytes(wire[:cut]), 0.0), bytes | Drop)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("df_policy", list(DfPolicy))
@pytest.mark.parametrize("copy_dscp", [True, False])
def test_outer_header_follows_processing_rules(
    version: int, df_policy: DfPolicy, copy_dscp: bool
) -> None:
    """AH's tunnel header is what processing.outer_header makes for ESP: DSCP copied or not,
    ECN copied, DF copied, cleared or set."""
    out, _ = ah_pair(version=version, df=df_policy, copy_dscp=copy_dscp)
    for tos, df in ((0xB9, True), (0x02, False), (0x00, True)):
        inner = bytearray(bytes(scapy_inner(4)))
        inner[1] = tos
        inner[6] = 0x40 if df else 0
        _reset_v4_checksum(inner)
        wire = ah.protect(out, bytes(inner), 0.0)
        assert isinstance(wire, bytes)
        hlen = 20 if version == 4 else 40
        want = outer_header(out, parse(bytes(inner)), len(wire) - hlen, 51)
        assert wire[:hlen] == want
        got_tos = wire[1] if version == 4 else ((wire[0] & 0x0F) << 4) | (wire[1] >> 4)
        assert got_tos == (tos if copy_dscp else tos & 0x03)


@pytest.mark.parametrize(("proto", "body"), [(4, b"garbage"), (41, bytes(scapy_inner(4)))])
def test_tunnel_inner_malformed_or_wrong_family(proto: int, body: bytes) -> None:
    """An authentic packet whose inner packet is not an IP packet of the family its next
    header names is a malformed drop, after the ICV verified (the window moved)."""
    key = os.urandom(32)
    tout, _ = ah_pair(mode=Mode.TRANSPORT, key=key)
    _, tin = ah_pair(mode=Mode.TUNNEL, key=key)
    s, d = OUTER[4]
    w = ah.protect(tout, bytes(IP(src=s, dst=d, proto=proto) / Raw(body)), 0.0)
    assert isinstance(w, bytes)
    assert ah.unprotect(tin, w, 0.0) is Drop.MALFORMED
    assert tin.window.top == 1


def test_ipv6_routing_header_segments_left_zero_only() -> None:
    """A Routing header before AH is covered as received when Segments Left is 0; with
    segments left the sender would have to predict it, which is not done: dropped."""
    out, inn = ah_pair(version=6, mode=Mode.TRANSPORT)
    ssa = scapy_sa("SHA2-256-128", out.integ_key, 6, Mode.TRANSPORT, seq_num=50)
    s, d = OUTER[6]
    rh = IPv6ExtHdrRouting(addresses=[], segleft=0)
    done = bytes(IPv6(src=s, dst=d) / rh / UDP() / Raw(b"r"))
    wire = ah.protect(out, done, 0.0)
    assert isinstance(wire, bytes) and wire[6] == 43 and wire[40] == 51
    assert bytes(ssa.decrypt(IPv6(wire))) == done
    assert ah.unprotect(inn, bytes(ssa.encrypt(IPv6(done))), 0.0) == done
    routed = bytes(
        IPv6(src=s, dst=d) / IPv6ExtHdrRouting(addresses=["2001:db8::99"], segleft=1) / UDP()
    )
    assert ah.protect(out, routed, 0.0) is Drop.MALFORMED
    assert ah.unprotect(inn, bytes(ssa.encrypt(IPv6(routed))), 0.0) is Drop.MALFORMED

"""In-SA signals from a gateway to the mobile node (:mod:`ipsecct.ipsec.signalling`): the TLV codec
(round trip, fuzzed decoder) and the MN side's :func:`~ipsecct.ipsec.signalling.apply`, which must
change the MN's SAD all at once or not at all."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.errors import SignalError
from ipsecct.ipsec import signalling
from ipsecct.ipsec.engine import Engine
from ipsecct.ipsec.sad import Protocol, SecurityAssociation, UdpEncap
from ipsecct.ipsec.signalling import SgUpdate, SpiReassign
from ipsecct.ipsec.spd import Action, SPDEntry
from tests.helpers.transfer import MN_ADDR, SG_ADDR, SPI_DOWN, SPI_UP, ip, tunnel_sas

V4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
V6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ITEMS = st.one_of(
    st.builds(
        SgUpdate,
        st.one_of(V4, V6).filter(  # (an address a gateway can be at: decode refuses others)
            lambda a: not (a.is_unspecified or a.is_multicast or a == ip("255.255.255.255"))
        ),
        st.integers(1, 65535),
    ),
    st.builds(
        SpiReassign,
        st.sampled_from([50, 51]),
        st.integers(0, 2**32 - 1),
        st.integers(256, 2**32 - 1),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ITEMS, min_size=1, max_size=6))
def test_round_trip(items: list[signalling.SignalItem]) -> None:
    data = signalling.encode(items)
    assert signalling.decode(data) == items
    assert signalling.encode(signalling.decode(data)) == data


def test_wire_format() -> None:
    data = signalling.encode([SgUpdate(ip("192.0.2.2"), 4500), SpiReassign(50, 0x1001, 0xABCD)])
    assert data.hex() == (
        "010c0000"
        "04001194"
        "c0000202"  # SG_UPDATE: type 1, len 12, v4, port 4500, address
        "02100000"
        "32000000"
        "00001001"
        "0000abcd"  # SPI_REASSIGN: ESP, old, new
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decode_fuzz_raises_only_signal_error(data: bytes) -> None:
    try:
        items = signalling.decode(data)
    except SignalError:
        return
    assert signalling.encode(items) == data  # anything accepted is canonical


@settings(max_examples=200, deadline=None)
@given(st.lists(ITEMS, min_size=1, max_size=3), st.integers(0, 200), st.integers(0, 255))
def test_decode_mutated_raises_only_signal_error(
    items: list[signalling.SignalItem], pos: int, xor: int
) -> None:
    data = bytearray(signalling.encode(items))
    data[pos % len(data)] ^= xor
    try:
        out = signalling.decode(bytes(data))
    except SignalError:
        return
    assert signalling.encode(out) == bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x0c\x00",  # truncated header
        b"\x01\x0c\x00\x01" + bytes(8),  # reserved bits
        b"\x01\x03\x00\x00",  # length below the header
        b"\x01\x10\x00\x00" + bytes(8),  # length past the end
        b"\x09\x04\x00\x00",  # unknown type
        b"\x01\x0c\x00\x00\x06\x00\x11\x94" + bytes(4),  # family 6 with a v4 address
        b"\x02\x10\x00\x00\x11" + bytes(11),  # SPI_REASSIGN with protocol 17
        b"\x02\x10\x00\x00\x32\x00\x00\x00" + bytes(4) + (5).to_bytes(4, "big"),  # new SPI 5
        # SG_UPDATE naming no gateway: port 0, 0.0.0.0, multicast, broadcast, ::, ff02::1
        signalling.encode([SgUpdate(ip("192.0.2.2"), 0)]),
        signalling.encode([SgUpdate(ip("0.0.0.0"), 4500)]),
        signalling.encode([SgUpdate(ip("224.0.0.1"), 4500)]),
        signalling.encode([SgUpdate(ip("255.255.255.255"), 4500)]),
        signalling.encode([SgUpdate(ip("::"), 4500)]),
        signalling.encode([SgUpdate(ip("ff02::1"), 4500)]),
    ],
)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(SignalError):
        signalling.decode(data)


# -- apply() at the MN ---------------------------------------------------------------------
def mn_engine() -> tuple[Engine, SecurityAssociation, SecurityAssociation]:
    _, (mn_out, mn_in, s_mn) = tunnel_sas("sg1")
    eng = Engine(ip(MN_ADDR))
    eng.add_tunnel(SPDEntry(s_mn, Action.PROTECT, static=False), mn_out, mn_in)
    return eng, mn_out, mn_in


def snapshot(eng: Engine) -> list[tuple[object, ...]]:
    return sorted(
        ((str(sa.dst), sa.spi, str(sa.src), sa.encap, sa.direction.value) for sa in eng.sad),
        key=str,
    )


def test_apply_sg_update_and_reassign() -> None:
    eng, mn_out, mn_in = mn_engine()
    items: list[signalling.SignalItem] = [
        SgUpdate(ip(SG_ADDR["sg2"]), 4501),
        SpiReassign(50, SPI_UP, 0x9999),
    ]
    changes = signalling.apply(eng, mn_in, items)
    assert changes == [f"gateway now {SG_ADDR['sg2']}:4501", "outbound SPI now 0x00009999"]
    assert mn_out.dst == ip(SG_ADDR["sg2"]) and mn_out.spi == 0x9999
    assert mn_out.encap == UdpEncap(4500, 4501)
    assert eng.sad.lookup(ip(SG_ADDR["sg2"]), Protocol.ESP, 0x9999) is mn_out
    assert eng.sad.lookup(ip(SG_ADDR["sg1"]), Protocol.ESP, SPI_UP) is None
    assert mn_in.src == ip(SG_ADDR["sg2"])
    # The SPD entry follows the outbound SPI.
    (t,) = eng.tunnels()
    assert t.entry.sa_ids == [0x9999]


@pytest.mark.parametrize(
    "items",
    [
        # The second item names an SPI the tunnel does not send with.
        [SgUpdate(ipaddress.ip_address("192.0.2.2"), 4500), SpiReassign(50, 0xDEAD, 0x9999)],
        # The second item changes the address family.
        [SpiReassign(50, SPI_UP, 0x9999), SgUpdate(ipaddress.ip_address("2001:db8::2"), 4500)],
        # The second item names the wrong protocol.
        [SgUpdate(ipaddress.ip_address("192.0.2.2"), 4500), SpiReassign(51, SPI_UP, 0x9999)],
    ],
)
def test_apply_is_atomic(items: list[signalling.SignalItem]) -> None:
    eng, _mn_out, mn_in = mn_engine()
    before = snapshot(eng)
    with pytest.raises(SignalError):
        signalling.apply(eng, mn_in, items)
    assert snapshot(eng) == before


def test_apply_refuses_outbound_or_foreign_sa() -> None:
    eng, mn_out, _ = mn_engine()
    with pytest.raises(SignalError):
        signalling.apply(eng, mn_out, [SgUpdate(ip("192.0.2.2"), 1)])
    (_, other, _), _ = tunnel_sas("sg2", spi_up=0x4444)
    with pytest.raises(SignalError):
        signalling.apply(eng, other, [SgUpdate(ip("192.0.2.2"), 1)])


def test_apply_collision_at_the_mn_is_a_signal_error() -> None:
    eng, mn_out, mn_in = mn_engine()
    # The MN also has a tunnel to sg2, sending with SPI_UP (sg2 picked the same SPI).
    _, (o2, i2, s2) = tunnel_sas("sg2", spi_down=0x3003, local="10.3.0.0/24")
    eng.add_tunnel(SPDEntry(s2, Action.PROTECT, static=False), o2, i2)
    before = snapshot(eng)
    with pytest.raises(SignalError):
        signalling.apply(eng, mn_in, [SgUpdate(ip(SG_ADDR["sg2"]), 4500)])
    assert snapshot(eng) == before
    assert mn_out.spi == SPI_UP


def test_spi_down_unchanged_by_reassign() -> None:
    # SPI_REASSIGN concerns the MN's outbound SA only; its inbound SA keeps its SPI.
    eng, _, mn_in = mn_engine()
    signalling.apply(eng, mn_in, [SpiReassign(50, SPI_UP, 0x7777)])
    assert mn_in.spi == SPI_DOWN

"""ESP round trips through ipsecct's own encapsulate/decapsulate for every transform."""

from __future__ import annotations

import pytest

from ipsecct.ipsec import esp, processing
from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import build_udp, parse
from tests.helpers.sas import ESP_TRANSFORMS, sa_pair

TRANSFORMS = ESP_TRANSFORMS


def inner_packet(n: int = 100) -> bytes:
    import ipaddress

    return build_udp(
        ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.1.1"), 1000, 2000, bytes(n)
    )


@pytest.mark.parametrize(("enc", "integ", "klen"), TRANSFORMS)
@pytest.mark.parametrize("esn", [False, True])
def test_tunnel_round_trip(enc: EncAlg, integ: IntegAlg, klen: int, esn: bool) -> None:
    out, inn = sa_pair(enc, integ, enc_key_len=klen, esn=esn)
    for size in (0, 1, 63, 1400):
        pkt = inner_packet(size)
        wire = processing.tunnel_encapsulate(out, pkt, 0.0)
        assert not isinstance(wire, Drop)
        assert processing.tunnel_decapsulate(inn, wire, 0.0) == pkt
        # the same packet again is a replay
        assert processing.tunnel_decapsulate(inn, wire, 0.0) is Drop.REPLAY


@pytest.mark.parametrize(("enc", "integ", "klen"), TRANSFORMS)
def test_tampered_packet_is_icv_drop_and_does_not_move_window(
    enc: EncAlg, integ: IntegAlg, klen: int
) -> None:
    out, inn = sa_pair(enc, integ, enc_key_len=klen)
    wire = processing.tunnel_encapsulate(out, inner_packet(), 0.0)
    assert not isinstance(wire, Drop)
    bad = bytearray(wire)
    bad[-1] ^= 1
    assert processing.tunnel_decapsulate(inn, bad, 0.0) is Drop.ICV
    assert inn.window.top == 0
    assert processing.tunnel_decapsulate(inn, wire, 0.0) == inner_packet()


def test_transport_mode_round_trip() -> None:
    from ipsecct.ipsec.sad import Mode

    out, inn = sa_pair(mode=Mode.TRANSPORT)
    pkt = inner_packet(50)
    wire = processing.transport_encapsulate(out, pkt, 0.0)
    assert not isinstance(wire, Drop)
    assert parse(wire).protocol == 50
    assert processing.transport_decapsulate(inn, wire, 0.0) == pkt


def test_dummy_packet_dropped() -> None:
    out, inn = sa_pair()
    wire = esp.encapsulate(out, esp.NH_NONE, b"", 0.0)
    assert not isinstance(wire, Drop)
    assert esp.decapsulate(inn, wire, 0.0) is Drop.DUMMY


def test_tfc_padding_stripped() -> None:
    out, inn = sa_pair()
    pkt = inner_packet(10)
    wire = esp.encapsulate(out, 4, pkt, 0.0, tfc_pad=200)
    assert not isinstance(wire, Drop)
    assert processing.tunnel_decapsulate(inn, wire, 0.0) == pkt

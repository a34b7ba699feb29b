"""Interoperability with an independent ESP implementation: Scapy's SecurityAssociation.

Both directions (ipsecct encrypts and Scapy decrypts; Scapy encrypts and ipsecct decrypts), for
every transform both implement (AES-GCM only with the 16-octet ICV: Scapy's 8 and 12 are
broken), tunnel mode (IPv4 and IPv6, inner and outer, all four mixes) and transport mode, with
and without ESN. Scapy takes ESN's high-order 32 bits by hand (``esn_en``, ``esn``).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

import pytest

scapy_ipsec = pytest.importorskip("scapy.layers.ipsec")
from scapy.layers.inet import IP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402

from ipsecct.ipsec import ippacket, processing  # noqa: E402
from ipsecct.ipsec.algorithms import ENC, INTEG, EncAlg, IntegAlg  # noqa: E402
from ipsecct.ipsec.esp import Drop  # noqa: E402
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation  # noqa: E402


@dataclass(frozen=True)
class Suite:
    name: str
    enc: EncAlg
    key_len: int
    integ: IntegAlg
    scapy_crypt: str
    scapy_auth: str | None


SUITES = [
    Suite("aes-gcm-128", EncAlg.AES_GCM_16, 20, IntegAlg.NONE, "AES-GCM", None),
    Suite("aes-gcm-256", EncAlg.AES_GCM_16, 36, IntegAlg.NONE, "AES-GCM", None),
    Suite("chacha20-poly1305", EncAlg.CHACHA20_POLY1305, 36, IntegAlg.NONE,
          "CHACHA20-POLY1305", None),
    Suite("aes-cbc-sha256", EncAlg.AES_CBC, 16, IntegAlg.HMAC_SHA2_256_128, "AES-CBC",
          "SHA2-256-128"),
    Suite("aes-cbc-sha384", EncAlg.AES_CBC, 24, IntegAlg.HMAC_SHA2_384_192, "AES-CBC",
          "SHA2-384-192"),
    Suite("aes-cbc-sha512", EncAlg.AES_CBC, 32, IntegAlg.HMAC_SHA2_512_256, "AES-CBC",
          "SHA2-512-256"),
    Suite("null-sha256", EncAlg.NULL, 0, IntegAlg.HMAC_SHA2_256_128, "NULL", "SHA2-256-128"),
]
assert all(s.key_len in ENC[s.enc].key_lengths for s in SUITES)

ADDRS = {
    4: ("192.0.2.1", "192.0.2.2", "10.0.0.1", "10.0.1.1"),
    6: ("2001:db8::1", "2001:db8::2", "fd00::1", "fd00:1::1"),
}
# (mode, outer family, inner family): transport has only one family
LAYOUTS = [
    (Mode.TUNNEL, 4, 4), (Mode.TUNNEL, 4, 6), (Mode.TUNNEL, 6, 4), (Mode.TUNNEL, 6, 6),
    (Mode.TRANSPORT, 4, 4), (Mode.TRANSPORT, 6, 6),
]
ESN_HIGH = 5  # with ESN the sequence numbers start just above 5 << 32
SPI = 0x4242


def _layout_id(layout: tuple[Mode, int, int]) -> str:
    mode, outer, inner = layout
    return f"{mode.value}-v{outer}" if mode is Mode.TRANSPORT else f"{mode.value}-v{inner}in{outer}"


def _inner(family: int, size: int = 100) -> bytes:
    _, _, src, dst = ADDRS[family]
    return ippacket.build_udp(
        ipaddress.ip_address(src), ipaddress.ip_address(dst), 4000, 5000, os.urandom(size)
    )


class Peers:
    """An ipsecct SA pair and a Scapy SA, all with the same keys and sequence numbers."""

    def __init__(self, suite: Suite, mode: Mode, outer: int, inner: int, esn: bool) -> None:
        self.mode = mode
        self.outer = outer
        self.inner = inner
        src, dst, isrc, idst = ADDRS[outer]
        if mode is Mode.TRANSPORT:
            src, dst = isrc, idst  # the packet's own addresses
        self.ek = os.urandom(suite.key_len)
        self.ik = os.urandom(INTEG[suite.integ].key_length)
        start = (ESN_HIGH << 32) + 10 if esn else 0

        def sa(direction: Direction) -> SecurityAssociation:
            return SecurityAssociation(
                SPI, direction, ipaddress.ip_address(src), ipaddress.ip_address(dst),
                mode=mode, enc=suite.enc, enc_key=self.ek, integ=suite.integ,
                integ_key=self.ik, esn=esn, seq=start if direction is Direction.OUTBOUND else 0,
            )

        self.out = sa(Direction.OUTBOUND)
        self.inn = sa(Direction.INBOUND)
        if esn:  # the receiver has already seen packets up to `start`
            self.inn.window.restore(start, b"\x01" + bytes(7))
        ip_cls = IP if outer == 4 else IPv6
        self.scapy = scapy_ipsec.SecurityAssociation(
            scapy_ipsec.ESP, spi=SPI, seq_num=(start + 1) & 0xFFFFFFFF,
            crypt_algo=suite.scapy_crypt, crypt_key=self.ek or None,
            auth_algo=suite.scapy_auth, auth_key=self.ik or None,
            tunnel_header=ip_cls(src=src, dst=dst) if mode is Mode.TUNNEL else None,
            esn_en=esn, esn=ESN_HIGH if esn else 0,
        )

    def scapy_packet(self, data: bytes) -> Any:
        return (IP if data[0] >> 4 == 4 else IPv6)(data)

    def ipsecct_encrypt(self, pkt: bytes) -> bytes:
        """The whole IP packet ipsecct would send."""
        if self.mode is Mode.TRANSPORT:
            wire = processing.transport_encapsulate(self.out, pkt, 0.0)
            assert not isinstance(wire, Drop), wire
            return bytes(wire)
        esp_bytes = processing.tunnel_encapsulate(self.out, pkt, 0.0)
        assert not isinstance(esp_bytes, Drop), esp_bytes
        outer = processing.outer_header(self.out, ippacket.parse(pkt), len(esp_bytes))
        return outer + bytes(esp_bytes)

    def ipsecct_decrypt(self, wire: bytes) -> bytes | Drop:
        if self.mode is Mode.TRANSPORT:
            return processing.transport_decapsulate(self.inn, wire, 0.0)
        hdr = ippacket.parse(wire)
        assert hdr.protocol == 50
        return processing.tunnel_decapsulate(self.inn, wire[hdr.header_len : hdr.total_len], 0.0)


@pytest.mark.parametrize("esn", [False, True], ids=["seq32", "esn"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_ipsecct_to_scapy(suite: Suite, layout: tuple[Mode, int, int], esn: bool) -> None:
    mode, outer, inner = layout
    p = Peers(suite, mode, outer, inner, esn)
    for size in (0, 1, 100, 1300):
        pkt = _inner(inner, size)
        wire = p.ipsecct_encrypt(pkt)
        got = p.scapy.decrypt(p.scapy_packet(wire))
        assert bytes(got) == pkt
    # Scapy rejects a packet whose ICV does not verify
    bad = bytearray(p.ipsecct_encrypt(_inner(inner)))
    bad[-1] ^= 1
    with pytest.raises(scapy_ipsec.IPSecIntegrityError):
        p.scapy.decrypt(p.scapy_packet(bytes(bad)))


@pytest.mark.parametrize("esn", [False, True], ids=["seq32", "esn"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_scapy_to_ipsecct(suite: Suite, layout: tuple[Mode, int, int], esn: bool) -> None:
    mode, outer, inner = layout
    p = Peers(suite, mode, outer, inner, esn)
    first = p.inn.window.top
    for i, size in enumerate((0, 1, 100, 1300)):
        pkt = _inner(inner, size)
        wire = bytes(p.scapy.encrypt(p.scapy_packet(pkt)))
        assert p.ipsecct_decrypt(wire) == pkt
        assert p.inn.window.top == first + i + 1  # the full (ESN: 64-bit) sequence number
    # a replayed Scapy packet is refused, a tampered one fails the ICV
    assert p.ipsecct_decrypt(wire) is Drop.REPLAY
    bad = bytearray(bytes(p.scapy.encrypt(p.scapy_packet(_inner(inner)))))
    bad[-1] ^= 1
    assert p.ipsecct_decrypt(bytes(bad)) is Drop.ICV

"""RFC 3948 UDP encapsulation: classification of port-4500 payloads and packet building."""

from __future__ import annotations

import ipaddress
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP as ScapyESP

from ipsecct.errors import PacketError
from ipsecct.ipsec import processing, udpencap
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import build_udp, checksum, parse, udp_payload
from ipsecct.ipsec.sad import SecurityAssociation
from ipsecct.ipsec.udpencap import KEEPALIVE, Classified, Kind, classify, frame_esp, frame_ike
from tests.helpers.sas import sa_pair

IKE_HDR = bytes(range(1, 29))  # 28 octets standing for an IKE header (SPIs, version, ...)


def test_keepalive() -> None:
    assert KEEPALIVE == b"\xff"
    c = classify(KEEPALIVE)
    assert c.kind is Kind.KEEPALIVE and c.data == b"" and c.spi is None
    assert classify(b"\xfe").kind is Kind.MALFORMED
    assert classify(b"\x00").kind is Kind.MALFORMED


def test_ike_marker_stripped() -> None:
    msg = IKE_HDR + b"payloads"
    framed = frame_ike(msg)
    assert framed == b"\0\0\0\0" + msg
    c = classify(framed)
    assert c == Classified(Kind.IKE, msg)
    assert c.spi is None
    # marker followed by less than an IKE header
    short = classify(b"\0\0\0\0" + IKE_HDR[:27])
    assert short.kind is Kind.MALFORMED and "IKE" in short.reason
    assert classify(b"\0\0\0\0").kind is Kind.MALFORMED


def test_esp_passes_through() -> None:
    esp = struct.pack("!LL", 0x11223344, 7) + b"ciphertext"
    assert frame_esp(esp) == esp
    c = classify(frame_esp(esp))
    assert c.kind is Kind.ESP and c.data == esp and c.spi == 0x11223344
    # a payload whose SPI has any non-zero octet is ESP, not IKE
    assert classify(b"\0\0\0\x01" + bytes(20)).kind is Kind.ESP
    assert classify(b"\x01\0\0\0" + bytes(4)).kind is Kind.ESP
    short = classify(b"\x01\x02\x03\x04\x05")
    assert short.kind is Kind.MALFORMED and "ESP" in short.reason


@pytest.mark.parametrize("n", [0, 2, 3])
def test_tiny_payloads_malformed(n: int) -> None:
    c = classify(b"\xff" * n)
    assert c.kind is Kind.MALFORMED and c.reason


def test_classify_accepts_memoryview_and_bytearray() -> None:
    esp = struct.pack("!LL", 0x1000, 1) + bytes(40)
    assert classify(memoryview(esp)).data == esp
    assert classify(bytearray(frame_ike(IKE_HDR))).data == IKE_HDR
    assert isinstance(classify(memoryview(esp)).data, bytes)


@settings(max_examples=200)
@given(st.binary(max_size=80))
def test_random_bytes_classify_without_raising(data: bytes) -> None:
    c = classify(data)
    assert isinstance(c, Classified)
    if c.kind is Kind.ESP:
        assert c.data == data and data[:4] != bytes(4) and len(data) >= 8
    elif c.kind is Kind.IKE:
        assert frame_ike(c.data) == data and len(c.data) >= 28
    elif c.kind is Kind.KEEPALIVE:
        assert data == KEEPALIVE
    else:
        assert c.data == b"" and c.reason


@settings(max_examples=200)
@given(st.binary(min_size=28, max_size=200))
def test_ike_framing_round_trip(msg: bytes) -> None:
    assert classify(frame_ike(msg)) == Classified(Kind.IKE, msg)


@settings(max_examples=200)
@given(st.integers(1, 0xFFFFFFFF), st.binary(min_size=4, max_size=100))
def test_esp_framing_round_trip(spi: int, rest: bytes) -> None:
    esp = struct.pack("!L", spi) + rest
    c = classify(frame_esp(esp))
    assert c.kind is Kind.ESP and c.data == esp and c.spi == spi


# -- whole packets ---------------------------------------------------------------------------
def _esp_packet() -> tuple[bytes, bytes]:
    out, _ = sa_pair()
    return _esp_with(out)


def _esp_with(out: SecurityAssociation) -> tuple[bytes, bytes]:
    inner = build_udp(
        ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.1.1"), 1, 2, b"hello"
    )
    esp = processing.tunnel_encapsulate(out, inner, 0.0)
    assert not isinstance(esp, Drop)
    return bytes(esp), inner


def test_received_esp_in_udp_decrypts() -> None:
    out, inn = sa_pair()
    esp, inner = _esp_with(out)
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    pkt = udpencap.ip_udp_esp(a, b, 4500, 4500, esp)
    c = classify(udp_payload(pkt, parse(pkt))[2])
    assert c.kind is Kind.ESP and c.spi == inn.spi
    assert processing.tunnel_decapsulate(inn, c.data, 0.0) == inner


def test_ip_udp_esp_ipv4_zero_checksum() -> None:
    esp, _ = _esp_packet()
    src, dst = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("198.51.100.7")
    pkt = udpencap.ip_udp_esp(src, dst, 4500, 4500, esp)
    hdr = parse(pkt)
    assert (hdr.version, hdr.protocol, hdr.src, hdr.dst) == (4, 17, src, dst)
    assert checksum(pkt[:20]) == 0  # the IP header checksum is right
    sport, dport, data = udp_payload(pkt, hdr)
    assert (sport, dport, data) == (4500, 4500, esp)
    assert pkt[26:28] == b"\0\0"
    s = IP(pkt)
    assert s[UDP].chksum == 0 and s[UDP].len == 8 + len(esp)
    assert s.haslayer(ScapyESP) and s[ScapyESP].spi == 0x1000
    # with the checksum computed, Scapy agrees with its value
    pkt2 = udpencap.ip_udp_esp(src, dst, 4500, 4500, esp, udp_checksum=True)
    s2 = IP(pkt2)
    got = s2[UDP].chksum
    del s2[UDP].chksum
    assert got != 0 and IP(bytes(s2))[UDP].chksum == got
    assert pkt2[:26] == pkt[:26] and pkt2[28:] == pkt[28:]


def test_ip_udp_esp_ipv6_checksum_always_computed() -> None:
    esp, _ = _esp_packet()
    src, dst = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")
    pkt = udpencap.ip_udp_esp(src, dst, 40000, 4500, esp)
    s = IPv6(pkt)
    got = s[UDP].chksum
    assert got != 0
    del s[UDP].chksum
    assert IPv6(bytes(s))[UDP].chksum == got
    assert (s[UDP].sport, s[UDP].dport) == (40000, 4500)
    assert classify(udp_payload(pkt, parse(pkt))[2]).data == esp


def test_ip_udp_esp_mixed_families_raise_typed_error() -> None:
    with pytest.raises(PacketError):
        udpencap.ip_udp_esp(
            ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("::1"), 4500, 4500, b"x" * 8
        )


def _pcap(path: Path, packets: list[bytes]) -> None:
    """A pcap with link type 101 (raw IP)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, p in enumerate(packets):
            f.write(struct.pack("<IIII", i, 0, len(p), len(p)))
            f.write(p)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_dissects_esp_in_udp_and_keepalive(tmp_path: Path) -> None:
    esp, _ = _esp_packet()
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    packets = [
        udpencap.ip_udp_esp(a, b, 4500, 4500, esp),
        build_udp(a, b, 4500, 4500, KEEPALIVE),
        build_udp(a, b, 4500, 4500, frame_ike(IKE_HDR)),
    ]
    f = tmp_path / "natt.pcap"
    _pcap(f, packets)
    res = subprocess.run(
        ["tshark", "-r", str(f), "-T", "fields", "-e", "frame.protocols", "-e", "esp.spi",
         "-e", "udp.checksum"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3
    protos, spi, csum = lines[0].split("\t")
    assert protos.endswith("esp") and int(spi, 0) == 0x1000 and int(csum, 0) == 0
    assert "esp" not in lines[1].split("\t")[0]  # the keep-alive is not ESP
    assert "esp" not in lines[2].split("\t")[0] and "isakmp" in lines[2].split("\t")[0]

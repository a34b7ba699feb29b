"""pcap files and ``ipsecct pcap decrypt``.

The reader and writer are checked against hand-made files (both byte orders, micro- and
nanosecond magic), against Scapy's reader and writer, and with random and mutated bytes. The
decrypt command runs as a subprocess on captures that Scapy's own ESP implementation encrypted
(every transform both implement, tunnel and transport, raw ESP and UDP 4500, IPv4 and IPv6,
every supported link type) and on ESN captures made by ipsecct's core across the 2^32 boundary.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.packet import Packet, Raw
from scapy.utils import rdpcap, wrpcap

from ipsecct.errors import PcapError
from ipsecct.ipsec import esp, processing
from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import build_udp
from ipsecct.tools.keyfile import format_line
from ipsecct.tools.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    MAGIC_MICRO,
    MAGIC_NANO,
    PcapReader,
    PcapWriter,
    ip_packet,
    read_pcap,
)
from ipsecct.tools.pcapdecrypt import Decryptor, Outcome, esn_candidates
from tests.helpers.sas import sa_pair

# Explicit addresses everywhere: otherwise Scapy looks up routes and MAC addresses (slowly).
ETH: dict[str, Any] = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
ARP_: dict[str, Any] = {"hwsrc": "02:00:00:00:00:01", "psrc": "192.0.2.1", "pdst": "192.0.2.2"}

# ---------------------------------------------------------------------------------------------
# pcap reader and writer


def make_pcap(
    records: list[tuple[int, int, bytes, int]],
    *,
    order: str = "<",
    magic: int = MAGIC_MICRO,
    linktype: int = LINKTYPE_RAW,
    snaplen: int = 65535,
) -> bytes:
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for sec, frac, data, orig in records:
        out += struct.pack(order + "IIII", sec, frac, len(data), orig) + data
    return out


RECORDS = [(1, 2, b"\x45" + bytes(19), 20), (3, 999_999, b"\x60" + bytes(50), 1500), (5, 0, b"", 0)]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("magic", [MAGIC_MICRO, MAGIC_NANO])
def test_read_both_byte_orders_and_resolutions(order: str, magic: int) -> None:
    hdr, recs = read_pcap(make_pcap(RECORDS, order=order, magic=magic, linktype=LINKTYPE_ETHERNET))
    assert hdr.linktype == LINKTYPE_ETHERNET
    assert hdr.big_endian == (order == ">")
    assert hdr.nanosecond == (magic == MAGIC_NANO)
    assert hdr.snaplen == 65535
    assert [(r.number, r.ts_sec, r.ts_frac, r.data, r.orig_len) for r in recs] == [
        (i + 1, *rec) for i, rec in enumerate(RECORDS)
    ]
    assert [r.truncated for r in recs] == [False, True, False]


def test_nanosecond_fraction_above_a_million_is_fine() -> None:
    _, recs = read_pcap(make_pcap([(1, 999_999_999, b"", 0)], magic=MAGIC_NANO))
    assert recs[0].ts_frac == 999_999_999
    with pytest.raises(PcapError, match="record 1: timestamp"):
        read_pcap(make_pcap([(1, 1_000_000, b"", 0)], magic=MAGIC_MICRO))


@pytest.mark.parametrize("nano", [False, True])
def test_writer_round_trip(nano: bool) -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf, LINKTYPE_IPV6, nanosecond=nano)
    w.write(b"\x60" + bytes(39), 10, 123_456)
    w.write(bytearray(b"abc"), 11, 0, orig_len=1000)
    hdr, recs = read_pcap(buf.getvalue())
    assert hdr.linktype == LINKTYPE_IPV6 and hdr.nanosecond == nano
    assert [(r.ts_sec, r.ts_frac, r.data, r.orig_len) for r in recs] == [
        (10, 123_456, b"\x60" + bytes(39), 40),
        (11, 0, b"abc", 1000),
    ]
    with pytest.raises(PcapError):
        w.write(b"", 0, 1_000_000_000)


def test_scapy_reads_our_file_and_we_read_scapys(tmp_path: Path) -> None:
    ip = IP(src="192.0.2.8", dst="192.0.2.9")
    pkts = [Ether(**ETH) / ip / UDP() / Raw(b"x" * n) for n in (0, 10, 1400)]
    for i, p in enumerate(pkts):
        p.time = 1700000000 + i + 0.25
    wrpcap(str(tmp_path / "s.pcap"), pkts)
    hdr, recs = read_pcap((tmp_path / "s.pcap").read_bytes())
    assert hdr.linktype == LINKTYPE_ETHERNET
    assert [r.data for r in recs] == [bytes(p) for p in pkts]
    assert [(r.ts_sec, r.ts_frac) for r in recs] == [(1700000000 + i, 250000) for i in range(3)]

    with open(tmp_path / "o.pcap", "wb") as f:
        w = PcapWriter(f, LINKTYPE_ETHERNET)
        for r in recs:
            w.write(r.data, r.ts_sec, r.ts_frac)
    back = rdpcap(str(tmp_path / "o.pcap"))
    assert [bytes(p) for p in back] == [bytes(p) for p in pkts]
    assert [float(p.time) for p in back] == [1700000000 + i + 0.25 for i in range(3)]


GOOD = make_pcap(RECORDS)

BAD_FILES: list[tuple[bytes, str]] = [
    (b"", "empty"),
    (b"\xd4\xc3", "shorter than"),
    (b"\xd4\xc3\xb2\xa1" + bytes(10), "truncated pcap file header"),
    (b"GARBAGE!" * 10, "unknown magic"),
    (b"\x0a\x0d\x0d\x0a" + bytes(40), "pcapng"),
    (GOOD[:4] + struct.pack("<H", 1) + GOOD[6:], "version"),
    (make_pcap([], linktype=105), "unsupported link type 105"),
    (make_pcap([], linktype=LINKTYPE_RAW | 0x00010000), "reserved bits"),
    (GOOD[:-1], "record 3: file ends inside the record header"),
    (GOOD[: 24 + 16 + 10], "record 1: file ends inside the packet data"),
    (make_pcap([(0, 0, b"ab", 1)]), "record 1: captured length 2 exceeds original"),
    (GOOD + struct.pack("<IIII", 0, 0, 262145, 262145), "record 4: captured length 262145"),
    (GOOD + struct.pack("<IIII", 0, 0, 0xFFFFFFFF, 0xFFFFFFFF), "exceeds the maximum"),
]


@pytest.mark.parametrize(("data", "match"), BAD_FILES)
def test_malformed_files(data: bytes, match: str) -> None:
    with pytest.raises(PcapError, match=match):
        read_pcap(data)


def test_fcs_bit_strips_the_ethernet_fcs() -> None:
    frame = bytes(Ether(**ETH) / IP(src="192.0.2.8", dst="192.0.2.1")) + b"\xde\xad\xbe\xef"
    lt = LINKTYPE_ETHERNET | 0x04000000 | (2 << 28)  # F bit, FCS of 2 x 16 bits
    hdr, recs = read_pcap(make_pcap([(0, 0, frame, len(frame))], linktype=lt))
    assert hdr.linktype == LINKTYPE_ETHERNET and hdr.fcs_len == 4
    ip = ip_packet(hdr.linktype, recs[0].data, hdr.fcs_len)
    assert ip is not None and bytes(ip) == bytes(IP(src="192.0.2.8", dst="192.0.2.1"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    with contextlib.suppress(PcapError):
        read_pcap(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_file(data: st.DataObject) -> None:
    raw = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        hdr, recs = read_pcap(bytes(raw[:cut]))
    except PcapError:
        return
    for r in recs:
        assert len(r.data) <= r.orig_len
        ip_packet(hdr.linktype, r.data)


V4 = IP(src="192.0.2.1", dst="192.0.2.2") / UDP() / Raw(b"four")
V6 = IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP() / Raw(b"six")


@pytest.mark.parametrize(
    ("linktype", "frame", "want"),
    [
        (LINKTYPE_ETHERNET, Ether(**ETH) / V4, V4),
        (LINKTYPE_ETHERNET, Ether(**ETH) / Dot1Q(vlan=5) / Dot1Q(vlan=7) / V6, V6),
        (LINKTYPE_ETHERNET, Ether(**ETH) / ARP(**ARP_), None),
        (LINKTYPE_RAW, V4, V4),
        (LINKTYPE_RAW, V6, V6),
        (LINKTYPE_IPV4, V4, V4),
        (LINKTYPE_IPV4, V6, None),
        (LINKTYPE_IPV6, V6, V6),
        (LINKTYPE_LINUX_SLL, CookedLinux(proto=0x0800) / V4, V4),
        (LINKTYPE_LINUX_SLL, CookedLinux(proto=0x0806) / ARP(**ARP_), None),
        (LINKTYPE_LINUX_SLL2, CookedLinuxV2(proto=0x86DD) / V6, V6),
    ],
)
def test_ip_packet_by_link_type(linktype: int, frame: Packet, want: Packet | None) -> None:
    got = ip_packet(linktype, bytes(frame))
    if want is None:
        assert got is None
    else:
        assert got is not None and bytes(got) == bytes(want)


@pytest.mark.parametrize(
    "linktype",
    [LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_IPV4],
)
def test_short_frames_are_not_ip(linktype: int) -> None:
    for n in range(0, 21):
        got = ip_packet(linktype, b"\x45" * n)
        assert got is None or linktype in (LINKTYPE_RAW, LINKTYPE_IPV4)


# ---------------------------------------------------------------------------------------------
# pcap decrypt: captures from Scapy's ESP


@dataclass(frozen=True)
class Transform:
    name: str
    crypt: str
    klen: int
    auth: str
    alen: int
    ws_enc: str
    ws_auth: str


TRANSFORMS = [
    Transform("gcm128", "AES-GCM", 20, "NULL", 0, "AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    Transform("gcm256", "AES-GCM", 36, "NULL", 0, "AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    Transform(
        "chacha", "CHACHA20-POLY1305", 36, "NULL", 0, "CHACHA20-POLY1305 [RFC7634]", "NULL"
    ),
    Transform(
        "cbc-sha256", "AES-CBC", 16, "SHA2-256-128", 32, "AES-CBC [RFC3602]",
        "HMAC-SHA-256-128 [RFC4868]",
    ),
    Transform(
        "cbc-sha384", "AES-CBC", 24, "SHA2-384-192", 48, "AES-CBC [RFC3602]",
        "HMAC-SHA-384-192 [RFC4868]",
    ),
    Transform(
        "cbc-sha512", "AES-CBC", 32, "SHA2-512-256", 64, "AES-CBC [RFC3602]",
        "HMAC-SHA-512-256 [RFC4868]",
    ),
    Transform(
        "null-sha256", "NULL", 0, "SHA2-256-128", 32, "NULL", "HMAC-SHA-256-128 [RFC4868]"
    ),
]

OUTER = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}


def q(*fields: str) -> str:
    return ",".join(f'"{f}"' for f in fields)


def key_line(
    t: Transform, ek: bytes, ak: bytes, version: int, src: str, dst: str, spi: str
) -> str:
    return q(
        f"IPv{version}", src, dst, spi, t.ws_enc, "0x" + ek.hex() if ek else "", t.ws_auth,
        "0x" + ak.hex() if ak else "",
    )


def inner_packet(i: int, version: int) -> Packet:
    body = Raw(bytes([i]) * (7 + 37 * i))
    if version == 4:
        p = IP(src="10.0.0.1", dst="10.0.1.1", id=i) / UDP(sport=1000 + i, dport=2000) / body
        return IP(bytes(p))
    p6 = IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1000 + i, dport=2000) / body
    return IPv6(bytes(p6))


@dataclass
class Capture:
    packets: list[Packet]  # IP packets as on the wire, ESP and not
    expected: list[bytes]  # what the decrypt must write, in order
    keys: list[str]
    noise: list[Packet]  # the packets of ``packets`` that are not ESP


def scapy_capture(mode: str, version: int, per_sa: int = 2) -> Capture:
    """ESP from Scapy for every transform, raw and in UDP 4500, with some non-ESP noise."""
    src, dst = OUTER[version]
    outer_cls = IP if version == 4 else IPv6
    packets: list[Packet] = []
    expected: list[bytes] = []
    keys: list[str] = []
    n = 0
    for ti, t in enumerate(TRANSFORMS):
        for udp in (False, True):
            spi = 0x10000 + 2 * ti + udp
            ek, ak = os.urandom(t.klen), os.urandom(t.alen)
            sa = ScapySA(  # type: ignore[no-untyped-call]  # (Scapy leaves it unannotated)
                ESP, spi=spi, crypt_algo=t.crypt, crypt_key=ek or None, auth_algo=t.auth,
                auth_key=ak or None,
                tunnel_header=outer_cls(src=src, dst=dst) if mode == "tunnel" else None,
                nat_t_header=UDP(sport=4500, dport=4500) if udp else None,
            )
            # raw ESP lines name the addresses and SPI; UDP lines use wildcards for addresses
            if udp:
                keys.append(key_line(t, ek, ak, version, "*", "*", f"0x{spi:08x}"))
            else:
                keys.append(key_line(t, ek, ak, version, src, dst, f"0x{spi:08x}"))
            for _ in range(per_sa):
                n += 1
                if mode == "tunnel":
                    # the inner version alternates so both 4-in-6 and 6-in-4 occur
                    orig = inner_packet(n, 4 if n % 2 else 6)
                else:
                    orig = outer_cls(bytes(outer_cls(src=src, dst=dst) / inner_packet(n, 4)[UDP]))
                packets.append(sa.encrypt(orig))  # type: ignore[no-untyped-call]
                expected.append(bytes(orig))
    # noise that must be skipped: IKE behind the non-ESP marker, a keep-alive, plain traffic
    noise: list[Packet] = [
        outer_cls(src=src, dst=dst) / UDP(sport=4500, dport=4500) / Raw(bytes(4) + b"IKE"),
        outer_cls(src=src, dst=dst) / UDP(sport=4500, dport=4500) / Raw(b"\xff"),
        outer_cls(src=src, dst=dst) / UDP(sport=53, dport=53) / Raw(b"dns"),
    ]
    if version == 4:
        noise.append(IP(src=src, dst=dst) / ICMP())
    for i, p in enumerate(noise):
        packets.insert(2 * i + 1, p)
    return Capture(packets, expected, keys, noise)


def frame(linktype: int, pkt: Packet, vlan: bool = False) -> Packet:
    ethertype = 0x0800 if pkt.version == 4 else 0x86DD
    if linktype == LINKTYPE_ETHERNET:
        return Ether(**ETH) / Dot1Q(vlan=3) / pkt if vlan else Ether(**ETH) / pkt
    if linktype == LINKTYPE_LINUX_SLL:
        return CookedLinux(pkttype=0, proto=ethertype) / pkt
    if linktype == LINKTYPE_LINUX_SLL2:
        return CookedLinuxV2(pkttype=4, proto=ethertype) / pkt
    return pkt


def write_capture(
    path: Path, linktype: int, packets: list[Packet], *, nano: bool = False
) -> list[Packet]:
    frames = [frame(linktype, p, vlan=bool(i % 2)) for i, p in enumerate(packets)]
    if linktype == LINKTYPE_ETHERNET:
        frames.insert(2, Ether(**ETH) / ARP(**ARP_))
    for i, f in enumerate(frames):
        f.time = 1700000000 + i + 0.5
    wrpcap(str(path), frames, linktype=linktype, nano=nano)
    assert read_pcap(path.read_bytes())[0].linktype == linktype
    return frames


def run_decrypt(
    tmp_path: Path, keys: list[str] | str, pcap: Path, out_name: str = "out.pcap"
) -> tuple[int, str, Path]:
    kf = tmp_path / "keys.txt"
    kf.write_text(keys if isinstance(keys, str) else "# test keys\n" + "\n".join(keys) + "\n")
    kf.chmod(0o600)  # (as the README writes it: else a warning)
    out = tmp_path / out_name
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecct", "pcap", "decrypt", "--keys", str(kf), str(pcap),
         str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stderr, out


def out_packets(path: Path) -> list[bytes]:
    hdr, recs = read_pcap(path.read_bytes())
    assert hdr.linktype == LINKTYPE_RAW
    return [r.data for r in recs]


@pytest.mark.parametrize(
    ("mode", "version", "linktype"),
    [
        ("tunnel", 4, LINKTYPE_ETHERNET),
        ("tunnel", 6, LINKTYPE_LINUX_SLL),
        ("transport", 4, LINKTYPE_RAW),
        ("transport", 6, LINKTYPE_LINUX_SLL2),
        ("tunnel", 4, LINKTYPE_IPV4),
        ("transport", 6, LINKTYPE_IPV6),
        ("transport", 4, LINKTYPE_ETHERNET),
        ("tunnel", 6, LINKTYPE_RAW),
    ],
)
def test_decrypt_scapy_capture(tmp_path: Path, mode: str, version: int, linktype: int) -> None:
    cap = scapy_capture(mode, version)
    write_capture(tmp_path / "in.pcap", linktype, cap.packets)
    rc, err, out = run_decrypt(tmp_path, cap.keys, tmp_path / "in.pcap")
    assert (rc, err) == (0, "")
    assert out_packets(out) == cap.expected
    # Scapy reads the output too, and sees the packets it encrypted
    back = rdpcap(str(out))
    assert [bytes(p) for p in back] == cap.expected


def test_dash_reads_the_capture_from_stdin_and_writes_the_packets_to_stdout(
    tmp_path: Path,
) -> None:
    """``pcap decrypt --keys K - -`` (as tcpdump, tshark and editcap read '-') wrote a file
    named '-' in the current directory and read a file of that name: now stdin and stdout,
    the same octets as through files (``tcpdump -w - | ipsecct pcap decrypt ... - - |
    tshark -r -``)."""
    cap = scapy_capture("tunnel", 4)
    write_capture(tmp_path / "in.pcap", LINKTYPE_ETHERNET, cap.packets)
    rc, err, out = run_decrypt(tmp_path, cap.keys, tmp_path / "in.pcap")
    assert (rc, err) == (0, "")
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecct", "pcap", "decrypt", "--keys", str(tmp_path / "keys.txt"),
         "-", "-"],
        input=(tmp_path / "in.pcap").read_bytes(), capture_output=True, timeout=120,
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr
    assert proc.stdout == out.read_bytes()
    assert not (tmp_path / "-").exists()


def test_timestamps_and_nanosecond_resolution_are_kept(tmp_path: Path) -> None:
    cap = scapy_capture("tunnel", 4, per_sa=1)
    frames = write_capture(tmp_path / "in.pcap", LINKTYPE_RAW, cap.packets, nano=True)
    rc, _, out = run_decrypt(tmp_path, cap.keys, tmp_path / "in.pcap")
    assert rc == 0
    hdr, recs = read_pcap(out.read_bytes())
    assert hdr.nanosecond
    esp_times = [
        (int(f.time), 500_000_000)
        for f, p in zip(frames, cap.packets, strict=True)
        if not any(p is n for n in cap.noise)
    ]
    assert len(esp_times) == len(cap.expected)
    assert [(r.ts_sec, r.ts_frac) for r in recs] == esp_times


def test_big_endian_input(tmp_path: Path) -> None:
    cap = scapy_capture("transport", 4, per_sa=1)
    recs = [(i, 7, bytes(p), len(bytes(p))) for i, p in enumerate(cap.packets)]
    (tmp_path / "be.pcap").write_bytes(make_pcap(recs, order=">", linktype=LINKTYPE_RAW))
    rc, _, out = run_decrypt(tmp_path, cap.keys, tmp_path / "be.pcap")
    assert rc == 0
    assert out_packets(out) == cap.expected


def test_wrong_key_and_missing_key_fail_per_packet(tmp_path: Path) -> None:
    cap = scapy_capture("tunnel", 4, per_sa=1)
    write_capture(tmp_path / "in.pcap", LINKTYPE_RAW, cap.packets)
    keys = list(cap.keys)
    # line 2 of the file is keys[0]: give it a wrong key of the right length
    f = keys[0].split('","')
    f[5] = "0x" + os.urandom(20).hex()
    keys[0] = '","'.join(f)
    del keys[3]  # no key for the fourth SA
    rc, err, out = run_decrypt(tmp_path, keys, tmp_path / "in.pcap")
    assert rc == 1
    lines = err.splitlines()
    # ESP packets 1 and 4 of the capture: frames 1 and 7 (IKE, keep-alive, DNS between them)
    assert lines[0].startswith("ipsecct: packet 1: ICV check failed")
    assert "SPI 0x00010000 192.0.2.1 -> 192.0.2.2 seq 1, key line 2" in lines[0]
    assert lines[1].startswith("ipsecct: packet 7: no key for SPI 0x00010003")
    assert "(UDP 4500)" in lines[1]
    assert lines[2] == f"ipsecct: 2 of {len(cap.expected)} ESP packets not decrypted;" \
        f" {len(cap.expected) - 2} written to {out}"
    assert len(lines) == 3
    assert out_packets(out) == cap.expected[1:3] + cap.expected[4:]


def test_wildcard_line_and_first_verifying_key_wins(tmp_path: Path) -> None:
    cap = scapy_capture("tunnel", 6, per_sa=1)
    write_capture(tmp_path / "in.pcap", LINKTYPE_RAW, cap.packets)
    decoy = q("IPv6", "*", "*", "*", "AES-GCM with 16 octet ICV [RFC4106]",
              "0x" + os.urandom(20).hex(), "NULL", "")
    rc, err, out = run_decrypt(tmp_path, [decoy, *cap.keys], tmp_path / "in.pcap")
    assert (rc, err) == (0, "")
    assert out_packets(out) == cap.expected
    # only the decoy: every packet fails, naming the line
    rc, err, _ = run_decrypt(tmp_path, [decoy], tmp_path / "in.pcap")
    assert rc == 1
    assert err.count("key line 2") == len(cap.expected)


def test_duplicates_are_decrypted_and_noted(tmp_path: Path) -> None:
    cap = scapy_capture("tunnel", 4, per_sa=1)
    pkts = [*cap.packets, cap.packets[0], cap.packets[0]]
    write_capture(tmp_path / "in.pcap", LINKTYPE_RAW, pkts)
    rc, err, out = run_decrypt(tmp_path, cap.keys, tmp_path / "in.pcap")
    assert rc == 0
    assert out_packets(out) == cap.expected + [cap.expected[0]] * 2
    assert err.startswith("ipsecct: note: 2 decrypted packet(s) repeat a sequence number")
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# pcap decrypt: ESN captures from ipsecct's own core


def core_capture(
    tmp_path: Path, seq: int, count: int, *, enc: EncAlg = EncAlg.AES_GCM_16,
    integ: IntegAlg = IntegAlg.NONE, klen: int = 20,
) -> tuple[Any, list[bytes], list[int]]:
    out, _ = sa_pair(enc, integ, enc_key_len=klen, esn=True, spi=0x4242)
    out.seq = seq
    key = format_line(out)
    inners: list[bytes] = []
    seqs: list[int] = []
    with open(tmp_path / "esn.pcap", "wb") as f:
        w = PcapWriter(f, LINKTYPE_RAW)
        for i in range(count):
            inner = build_udp(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.1.1"),
                              1000, 2000, bytes([i]) * (i + 1))
            wire = processing.tunnel_encapsulate(out, inner, 0.0)
            assert not isinstance(wire, Drop)
            w.write(processing.outer_header(out, None, len(wire)) + bytes(wire), i, 0)
            inners.append(inner)
            seqs.append(out.seq)
    return key, inners, seqs


@pytest.mark.parametrize(
    ("enc", "integ", "klen"),
    [(EncAlg.AES_GCM_16, IntegAlg.NONE, 20),
     (EncAlg.CHACHA20_POLY1305, IntegAlg.NONE, 36),
     (EncAlg.AES_CBC, IntegAlg.HMAC_SHA2_256_128, 16)],
)
def test_esn_across_the_2_32_boundary(
    tmp_path: Path, enc: EncAlg, integ: IntegAlg, klen: int
) -> None:
    key, inners, seqs = core_capture(tmp_path, 2**32 - 3, 6, enc=enc, integ=integ, klen=klen)
    assert seqs[0] < 2**32 <= seqs[-1]
    plain = key.rsplit(",", 1)[0] + ',"ESN"'  # default: highest received 0
    rc, err, out = run_decrypt(tmp_path, [plain], tmp_path / "esn.pcap")
    assert (rc, err) == (0, "")
    assert out_packets(out) == inners
    # without the ESN field the high bits are not authenticated in: every packet fails, the
    # one whose low half is 0 before any key is tried
    rc, err, _ = run_decrypt(tmp_path, [key.rsplit(",", 1)[0]], tmp_path / "esn.pcap")
    assert rc == 1 and err.count("ICV check failed") == 5
    assert err.count("sequence number 0 is never sent") == 1


def test_esn_start_value_matters_far_from_zero(tmp_path: Path) -> None:
    start = (5 << 32) + 10
    key, inners, _ = core_capture(tmp_path, start, 3)
    assert key.endswith(f'"ESN:0x{start:016x}"')
    rc, err, out = run_decrypt(tmp_path, [key], tmp_path / "esn.pcap")
    assert (rc, err) == (0, "")
    assert out_packets(out) == inners
    plain = key.rsplit(",", 1)[0] + ',"ESN"'
    rc, err, out = run_decrypt(tmp_path, [plain], tmp_path / "esn.pcap")
    assert rc == 1 and err.count("ICV check failed") == 3
    assert out_packets(out) == []


def test_esn_reordered_around_the_boundary() -> None:
    out, _ = sa_pair(esn=True, spi=0x4343)
    out.seq = 2**32 - 3
    kl_text = format_line(out)
    wires = []
    for i in range(6):
        inner = build_udp(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.1.1"),
                          1, 2, bytes([i]))
        wire = processing.tunnel_encapsulate(out, inner, 0.0)
        assert not isinstance(wire, Drop)
        wires.append((inner, processing.outer_header(out, None, len(wire)) + bytes(wire)))
    from ipsecct.tools.keyfile import parse_line

    kl = parse_line(kl_text)
    assert kl is not None
    dec = Decryptor([kl])
    # after 2^32 has been seen, a late packet from below the boundary still decrypts
    for i in (0, 4, 1, 5, 2, 3, 3):
        res = dec.process(wires[i][1])
        assert res.outcome is Outcome.DECRYPTED, res.reason
        assert res.packet == wires[i][0]
    assert res.duplicate


def test_esn_candidates() -> None:
    assert esn_candidates(5, 0) == [5, 2**32 + 5]
    top = 2**32 + 3
    assert esn_candidates(0xFFFFFFF0, top) == [0xFFFFFFF0, 2**32 + 0xFFFFFFF0, 2**33 + 0xFFFFFFF0]
    assert esn_candidates(7, top)[0] == 2**32 + 7
    assert esn_candidates(1, 2**64 - 1) == [2**64 - 2**32 + 1, 2**64 - 2**33 + 1]


# ---------------------------------------------------------------------------------------------
# pcap decrypt: odd packets, in-process


GCM_KEY = bytes(range(20))


def gcm_setup(mode: str = "tunnel") -> tuple[Any, Decryptor]:
    from ipsecct.ipsec.sad import Mode
    from ipsecct.tools.keyfile import parse_line

    out, _ = sa_pair(mode=Mode.TUNNEL if mode == "tunnel" else Mode.TRANSPORT, spi=0x5000)
    kl = parse_line(format_line(out))
    assert kl is not None
    return out, Decryptor([kl])


def test_dummy_packet_is_not_written_and_not_failed() -> None:
    out, dec = gcm_setup()
    wire = esp.encapsulate(out, esp.NH_NONE, b"", 0.0)
    assert not isinstance(wire, Drop)
    res = dec.process(processing.outer_header(out, None, len(wire)) + bytes(wire))
    assert res.outcome is Outcome.DUMMY


def test_tfc_padding_is_stripped() -> None:
    out, dec = gcm_setup()
    inner = build_udp(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.1.1"),
                      1, 2, b"tfc")
    wire = esp.encapsulate(out, 4, inner, 0.0, tfc_pad=300)
    assert not isinstance(wire, Drop)
    res = dec.process(processing.outer_header(out, None, len(wire)) + bytes(wire))
    assert res.outcome is Outcome.DECRYPTED and res.packet == inner


def test_transport_with_ipv6_extension_header() -> None:
    ek = os.urandom(20)
    sa = ScapySA(ESP, spi=0x6000, crypt_algo="AES-GCM", crypt_key=ek, auth_algo="NULL")  # type: ignore[no-untyped-call]
    orig = IPv6(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrDestOpt()
                      / UDP(sport=5, dport=6) / Raw(b"ext")))
    enc = sa.encrypt(orig)  # type: ignore[no-untyped-call]
    from ipsecct.tools.keyfile import parse_line

    kl = parse_line(q("IPv6", "2001:db8::1", "2001:db8::2", "0x00006000",
                      "AES-GCM with 16 octet ICV [RFC4106]", "0x" + ek.hex(), "NULL", ""))
    assert kl is not None
    res = Decryptor([kl]).process(bytes(enc))
    assert res.outcome is Outcome.DECRYPTED, res.reason
    assert res.packet == bytes(orig)


def test_truncated_fragmented_and_short_esp_are_reported() -> None:
    out, dec = gcm_setup()
    inner = build_udp(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.1.1"),
                      1, 2, bytes(100))
    wire = processing.tunnel_encapsulate(out, inner, 0.0)
    assert not isinstance(wire, Drop)
    pkt = processing.outer_header(out, None, len(wire)) + bytes(wire)
    res = dec.process(pkt[:60])
    assert res.outcome is Outcome.FAILED and "truncated by the capture" in res.reason
    frag = bytearray(pkt)
    frag[6] |= 0x20  # more fragments
    res = dec.process(bytes(frag))
    assert res.outcome is Outcome.FAILED and "fragment" in res.reason
    short = processing.outer_header(out, None, 4) + b"\x00\x00\x50\x00"
    res = dec.process(short)
    assert res.outcome is Outcome.FAILED and "shorter than" in res.reason
    # trailing link-layer padding after the IP packet is ignored
    res = dec.process(pkt + bytes(20))
    assert res.outcome is Outcome.DECRYPTED and res.packet == inner


def test_bad_udp_length_and_keepalive() -> None:
    _, dec = gcm_setup()
    ka = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=4500, dport=4500) / Raw(b"\xff"))
    assert dec.process(ka).outcome is Outcome.NOT_ESP
    bad = bytearray(bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=4500, dport=4500)
                          / Raw(bytes(range(1, 40)))))
    struct.pack_into("!H", bad, 24, 200)
    res = dec.process(bytes(bad))
    assert res.outcome is Outcome.FAILED and "bad UDP length" in res.reason


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_random_ip_packets_never_raise(data: bytes) -> None:
    _, dec = gcm_setup()
    for prefix in (b"\x45", b"\x60", b""):
        res = dec.process(prefix + data)
        assert res.outcome in (Outcome.NOT_ESP, Outcome.FAILED)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_esp_packets_never_raise(data: st.DataObject) -> None:
    out, dec = gcm_setup()
    inner = build_udp(ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.1.1"),
                      1, 2, b"abc")
    wire = processing.tunnel_encapsulate(out, inner, 0.0)
    assert not isinstance(wire, Drop)
    pkt = bytearray(processing.outer_header(out, None, len(wire)) + bytes(wire))
    i = data.draw(st.integers(0, len(pkt) - 1))
    pkt[i] ^= data.draw(st.integers(1, 255))
    res = dec.process(bytes(pkt))
    # only the TOS, ID, flags, TTL and checksum fields are outside what the ICV covers
    if res.outcome is Outcome.DECRYPTED:
        assert i in (1, 4, 5, 6, 8, 10, 11) and res.packet == inner


# ---------------------------------------------------------------------------------------------
# pcap decrypt: unusable input


def test_unusable_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    cap = scapy_capture("tunnel", 4, per_sa=1)
    write_capture(tmp_path / "in.pcap", LINKTYPE_RAW, cap.packets)
    good = (tmp_path / "in.pcap").read_bytes()
    (tmp_path / "trunc.pcap").write_bytes(good[:-5])
    (tmp_path / "garbage.pcap").write_bytes(os.urandom(200))
    (tmp_path / "empty.pcap").write_bytes(b"")
    cases: list[tuple[list[str] | str, str, str]] = [
        (cap.keys, "trunc.pcap", "file ends inside the packet data"),
        (cap.keys, "garbage.pcap", "not a pcap file"),
        (cap.keys, "empty.pcap", "empty file"),
        (cap.keys, "missing.pcap", "No such file"),
        ("", "in.pcap", "no SA line"),
        ("\n" + cap.keys[0][:-2] + "\n", "in.pcap", "line 2: expected a double-quoted field"),
        (cap.keys[0].replace("AES-GCM", "AES-XYZ"), "in.pcap", "unsupported encryption"),
    ]
    for keys, name, match in cases:
        rc, err, _ = run_decrypt(tmp_path, keys, tmp_path / name)
        assert rc == 2, (name, err)
        assert len(err.splitlines()) == 1, err
        assert err.startswith("ipsecct: error:") and match in err, err
        for kl in cap.keys:
            for field in kl.split('","')[5:]:
                if len(field) > 10:
                    assert field.strip('"').removeprefix("0x") not in err


def test_same_input_and_output_is_refused(tmp_path: Path) -> None:
    cap = scapy_capture("tunnel", 4, per_sa=1)
    write_capture(tmp_path / "in.pcap", LINKTYPE_RAW, cap.packets)
    before = (tmp_path / "in.pcap").read_bytes()
    rc, err, _ = run_decrypt(tmp_path, cap.keys, tmp_path / "in.pcap", out_name="in.pcap")
    assert rc == 2 and "same file" in err
    assert (tmp_path / "in.pcap").read_bytes() == before


def test_no_esp_at_all_is_success_with_a_note(tmp_path: Path) -> None:
    write_capture(tmp_path / "in.pcap", LINKTYPE_ETHERNET, [V4, V6])
    rc, err, out = run_decrypt(tmp_path, scapy_capture("tunnel", 4, per_sa=0).keys,
                               tmp_path / "in.pcap")
    assert rc == 0 and "no ESP packets" in err
    assert out_packets(out) == []


def test_reader_is_lazy(tmp_path: Path) -> None:
    # a bad record after good ones: the good ones come out first, then the error
    data = make_pcap(RECORDS) + b"\x01\x02"
    reader = PcapReader(io.BytesIO(data))
    got = []
    with pytest.raises(PcapError, match="record 4"):
        for r in reader:
            got.append(r.number)
    assert got == [1, 2, 3]


# -- encryption-only ESP (AES-CBC with NULL authentication) ---------------------------------


def test_encryption_only_esp_decrypts_with_a_warning(tmp_path: Path) -> None:
    """RFC 3602's test cases are AES-CBC ESP without integrity; Wireshark reads such key lines
    and so does pcap decrypt: the packets decrypt (unauthenticated), with a warning."""
    src, dst = OUTER[4]
    ek = os.urandom(16)
    sa = ScapySA(  # type: ignore[no-untyped-call]
        ESP, spi=0x4321, crypt_algo="AES-CBC", crypt_key=ek, auth_algo="NULL",
        tunnel_header=IP(src=src, dst=dst),
    )  # fmt: skip
    origs = [inner_packet(i, 4 if i % 2 else 6) for i in range(1, 5)]
    pcap = tmp_path / "in.pcap"
    write_capture(pcap, LINKTYPE_RAW, [sa.encrypt(o) for o in origs])  # type: ignore[no-untyped-call]
    line = q("IPv4", src, dst, "0x00004321", "AES-CBC [RFC3602]", "0x" + ek.hex(), "NULL", "")
    rc, err, out = run_decrypt(tmp_path, [line], pcap)
    assert rc == 0, err
    assert out_packets(out) == [bytes(o) for o in origs]
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "line 2: encryption-only ESP" in warnings[0], err
    assert ek.hex() not in err


def test_encryption_only_sa_never_carries_traffic() -> None:
    """The gateway still refuses encryption-only ESP (RFC 8221 §3): an SA for it can be made
    only for decrypting a capture, and then no SAD takes it and it seals nothing."""
    from ipsecct.errors import AlgorithmError, SAError
    from ipsecct.ipsec.sad import SAD, Direction, SecurityAssociation

    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    common: dict[str, Any] = {"enc": EncAlg.AES_CBC, "enc_key": bytes(16), "integ": IntegAlg.NONE}
    with pytest.raises(AlgorithmError, match="encryption-only ESP is refused"):
        SecurityAssociation(0x1000, Direction.INBOUND, a, b, **common)
    sa = SecurityAssociation(0x1000, Direction.INBOUND, a, b, decrypt_only=True, **common)
    with pytest.raises(SAError, match="decrypt-only"):
        SAD().add(sa)
    with pytest.raises(AlgorithmError, match="never sends"):
        sa.transform.seal(bytes(8), 1, bytes(16), False)


def test_a_key_file_others_can_read_is_warned_about_never_echoed(tmp_path: Path) -> None:
    """The esp_sa file holds every SA's keys: readable by its group or others, pcap decrypt
    says so (one warning line, the mode, what to do), as the gateway does for its key files,
    and still decrypts; the keys never appear in what it prints."""
    cap = scapy_capture("tunnel", 4)
    write_capture(tmp_path / "in.pcap", LINKTYPE_ETHERNET, cap.packets)
    rc, err, out = run_decrypt(tmp_path, cap.keys, tmp_path / "in.pcap")
    assert (rc, err) == (0, "")
    kf = tmp_path / "keys.txt"
    kf.chmod(0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecct", "pcap", "decrypt", "--keys", str(kf),
         str(tmp_path / "in.pcap"), str(tmp_path / "again.pcap")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "can be read by its group or others (mode 644): chmod 600 it" in line, line
    assert (tmp_path / "again.pcap").read_bytes() == out.read_bytes()
    secrets = [f.strip('"')[2:] for k in cap.keys for f in k.split(",")
               if f.strip('"').startswith("0x") and len(f.strip('"')) > 16]  # fmt: skip
    assert secrets and not any(s in proc.stderr for s in secrets)

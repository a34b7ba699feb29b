"""tshark (Wireshark 4.0, an independent ESP implementation) decrypts and verifies what
ipsecct's core sends, for every transform both know: AES-GCM-16 with 128 and 256-bit keys,
AES-CBC with HMAC-SHA-256-128 / 384-192 / 512-256 and HMAC-SHA-1-96, NULL with HMAC. Keys reach
tshark as ``esp_sa`` lines written by :func:`ipsecct.tools.keyfile.format_line`, the capture is
written by :class:`ipsecct.tools.pcap.PcapWriter`.

tshark 4.0 lacks ChaCha20-Poly1305 and ESN (see ../shared/notes/platform.md); those are checked
against Scapy and ipsecct's own ``pcap decrypt`` in test_pcap.py.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipsecct.ipsec import processing
from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import build_udp
from ipsecct.ipsec.sad import Mode, SecurityAssociation, UdpEncap
from ipsecct.tools.keyfile import format_line
from ipsecct.tools.pcap import LINKTYPE_ETHERNET, LINKTYPE_RAW, PcapWriter
from tests.helpers.sas import sa_pair

TSHARK = shutil.which("tshark") or "/usr/bin/tshark"

pytestmark = pytest.mark.skipif(
    not Path(TSHARK).exists(), reason="tshark is not installed (Debian package tshark)"
)

TRANSFORMS = [
    ("gcm128", EncAlg.AES_GCM_16, IntegAlg.NONE, 20),
    ("gcm256", EncAlg.AES_GCM_16, IntegAlg.NONE, 36),
    ("cbc-sha256", EncAlg.AES_CBC, IntegAlg.HMAC_SHA2_256_128, 16),
    ("cbc-sha384", EncAlg.AES_CBC, IntegAlg.HMAC_SHA2_384_192, 24),
    ("cbc-sha512", EncAlg.AES_CBC, IntegAlg.HMAC_SHA2_512_256, 32),
    ("cbc-sha1", EncAlg.AES_CBC, IntegAlg.HMAC_SHA1_96, 16),
    ("ctr128-sha256", EncAlg.AES_CTR, IntegAlg.HMAC_SHA2_256_128, 20),  # RFC 3686: key | nonce
    ("ctr256-sha384", EncAlg.AES_CTR, IntegAlg.HMAC_SHA2_384_192, 36),
    ("null-sha256", EncAlg.NULL, IntegAlg.HMAC_SHA2_256_128, 0),
    ("null-sha512", EncAlg.NULL, IntegAlg.HMAC_SHA2_512_256, 0),
]
PER_SA = 3
OUTER = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8:0:1::2")}
INNER = {4: ("10.0.0.1", "10.0.1.1"), 6: ("fd00::1", "fd00:0:0:1::1")}
FIELDS = ["frame.number", "esp.spi", "esp.sequence", "esp.icv_good", "esp.icv_bad",
          "ip.src", "ipv6.src", "data.data"]


@dataclass
class Sent:
    frame: int
    spi: int
    seq: int
    payload: bytes
    inner_src: str


def ipsec_udp(src: str, dst: str, payload: bytes) -> bytes:
    # Ports with no dissector, so tshark shows the payload as data.data.
    return build_udp(ipaddress.ip_address(src), ipaddress.ip_address(dst), 40000, 40001, payload)


def wire_packet(sa: SecurityAssociation, inner: bytes) -> bytes:
    """The whole outer IP packet ipsecct sends for ``inner`` on outbound SA ``sa``."""
    if sa.mode is Mode.TUNNEL:
        esp_pkt = processing.tunnel_encapsulate(sa, inner, 0.0)
        assert not isinstance(esp_pkt, Drop)
        body = bytes(esp_pkt)
        if sa.encap is None:
            return processing.outer_header(sa, None, len(body)) + body
    else:
        ip = processing.transport_encapsulate(sa, inner, 0.0)
        assert not isinstance(ip, Drop)
        if sa.encap is None:
            return bytes(ip)
        body = ip[20 if sa.src.version == 4 else 40 :]
    # ESP in UDP (RFC 3948)
    return build_udp(sa.src, sa.dst, sa.encap.sport, sa.encap.dport, body)


def make_capture(
    path: Path, version: int, mode: Mode, udp: bool, linktype: int
) -> tuple[list[str], list[Sent]]:
    src, dst = OUTER[version]
    keys: list[str] = []
    sent: list[Sent] = []
    frame = 0
    with open(path, "wb") as f:
        w = PcapWriter(f, linktype)
        for ti, (_name, enc, integ, klen) in enumerate(TRANSFORMS):
            spi = 0x20000 + ti
            out, _ = sa_pair(enc, integ, enc_key_len=klen, spi=spi, src=src, dst=dst, mode=mode)
            if udp:
                out.encap = UdpEncap()
            keys.append(format_line(out))
            for k in range(PER_SA):
                # tunnel mode: the inner version alternates (4-in-6 and 6-in-4 occur)
                iv = (4 if (ti + k) % 2 else 6) if mode is Mode.TUNNEL else version
                isrc, idst = INNER[iv] if mode is Mode.TUNNEL else (src, dst)
                payload = f"ipsecct {ti}/{k} ".encode() * (1 + 13 * k)
                pkt = wire_packet(out, ipsec_udp(isrc, idst, payload))
                if linktype == LINKTYPE_ETHERNET:
                    etype = b"\x08\x00" if version == 4 else b"\x86\xdd"
                    pkt = bytes.fromhex("020000000002020000000001") + etype + pkt
                frame += 1
                w.write(pkt, 1700000000 + frame, 0)
                sent.append(Sent(frame, spi, out.seq, payload, isrc))
    return keys, sent


def tshark(path: Path, keys: list[str], *extra: str) -> list[dict[str, str]]:
    args = [TSHARK, "-n", "-r", str(path),
            "-o", "esp.enable_encryption_decode:TRUE",
            "-o", "esp.enable_authentication_check:TRUE"]
    for k in keys:
        args += ["-o", f"uat:esp_sa:{k}"]
    args += ["-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for fld in FIELDS:
        args += ["-e", fld]
    args += extra
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stderr.splitlines():  # nothing but the warning about running as root
        assert "dangerous" in line or not line.strip(), proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        rows.append(dict(zip(FIELDS, line.split("\t"), strict=True)))
    return rows


CASES = [
    (4, Mode.TUNNEL, False, LINKTYPE_RAW),
    (6, Mode.TUNNEL, False, LINKTYPE_ETHERNET),
    (4, Mode.TUNNEL, True, LINKTYPE_ETHERNET),
    (6, Mode.TUNNEL, True, LINKTYPE_RAW),
    (4, Mode.TRANSPORT, False, LINKTYPE_RAW),
    (6, Mode.TRANSPORT, False, LINKTYPE_RAW),
    (4, Mode.TRANSPORT, True, LINKTYPE_RAW),
    (6, Mode.TRANSPORT, True, LINKTYPE_ETHERNET),
]


@pytest.mark.parametrize(("version", "mode", "udp", "linktype"), CASES)
def test_tshark_decrypts_and_verifies_ipsecct_output(
    tmp_path: Path, version: int, mode: Mode, udp: bool, linktype: int
) -> None:
    cap = tmp_path / "esp.pcap"
    keys, sent = make_capture(cap, version, mode, udp, linktype)
    rows = tshark(cap, keys)
    assert len(rows) == len(sent) == len(TRANSFORMS) * PER_SA
    for row, s in zip(rows, sent, strict=True):
        assert int(row["frame.number"]) == s.frame
        assert int(row["esp.spi"], 16) == s.spi
        assert int(row["esp.sequence"]) == s.seq
        assert row["esp.icv_good"] == "1" and row["esp.icv_bad"] in ("", "0"), row
        # the decrypted payload, and the inner header's source address, are ours
        assert row["data.data"] == s.payload.hex(), row
        addrs = (row["ip.src"] + "," + row["ipv6.src"]).split(",")
        assert s.inner_src in addrs, row


def test_tshark_sees_tampering_and_wrong_keys(tmp_path: Path) -> None:
    """The checks above can fail: a flipped octet is reported bad, a wrong key decrypts
    nothing."""
    cap = tmp_path / "esp.pcap"
    keys, sent = make_capture(cap, 4, Mode.TUNNEL, False, LINKTYPE_RAW)
    data = bytearray(cap.read_bytes())
    data[-1] ^= 0x01  # the last octet of the last packet: its ICV
    bad = tmp_path / "tampered.pcap"
    bad.write_bytes(bytes(data))
    rows = tshark(bad, keys)
    assert [r["esp.icv_good"] for r in rows[:-1]] == ["1"] * (len(sent) - 1)
    assert rows[-1]["esp.icv_good"] in ("", "0") and rows[-1]["esp.icv_bad"] == "1"

    # the first key's octets all flipped: its packets neither verify nor decrypt
    fields = keys[0].split('","')
    key_hex = fields[5].removeprefix("0x")
    fields[5] = "0x" + bytes(b ^ 0xFF for b in bytes.fromhex(key_hex)).hex()
    rows = tshark(cap, ['","'.join(fields), *keys[1:]])
    for row in rows[:PER_SA]:
        assert row["esp.icv_good"] != "1" and row["data.data"] != sent[0].payload.hex()
    assert all(r["esp.icv_good"] == "1" for r in rows[PER_SA:])


def test_tshark_reads_pcap_decrypt_output(tmp_path: Path) -> None:
    """ipsecct's own decrypt of the same capture: tshark reads the raw-IP output file and
    finds the same payloads it decrypted itself."""
    cap = tmp_path / "esp.pcap"
    keys, sent = make_capture(cap, 6, Mode.TUNNEL, True, LINKTYPE_ETHERNET)
    kf = tmp_path / "keys"
    kf.write_text("\n".join(keys) + "\n")
    kf.chmod(0o600)
    out = tmp_path / "plain.pcap"
    proc = subprocess.run(
        [sys.executable, "-m", "ipsecct", "pcap", "decrypt", "--keys", str(kf), str(cap),
         str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    rows = tshark(out, [])
    assert [r["data.data"] for r in rows] == [s.payload.hex() for s in sent]
    assert all(r["esp.spi"] == "" for r in rows)  # no ESP left

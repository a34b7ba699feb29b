"""Interoperability with an independent IPsec implementation: strongSwan 5.9.8 (root).

Two charon daemons in two network namespaces negotiate a CHILD_SA (IKEv2, PSK) and carry ping
in ESP in UDP 4500 (kernel-libipsec, user-space ESP over TUN); see :mod:`tests.helpers.strongswan`.

1. ``ipsecct pcap decrypt`` decrypts a capture of strongSwan's ESP with the keys charon logs
   (``chd = 4``), written as Wireshark ``esp_sa`` lines: AES-GCM-16 with 128- and 256-bit keys,
   AES-CBC with HMAC-SHA-256-128.
2. A context transfer from strongSwan to ipsecct: strongSwan B is killed (SIGKILL: no DELETE,
   so A keeps the SA) and ``ipsecct node run`` takes over in B's namespace with B's SPIs, keys,
   next outbound sequence number and replay window (read from charon's log and from the wire),
   installed with ``ipsecct sa add`` (a feature context in JSON). strongSwan A, unchanged, keeps
   talking to what it still believes is B.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Packet
from scapy.utils import rdpcap

from tests.helpers import strongswan
from tests.helpers.daemon import Daemon
from tests.helpers.netns import Namespaces, wait_until
from tests.helpers.strongswan import (
    A,
    B,
    ChildSA,
    needs_strongswan,
    ping,
    sa_packet_counts,
    start_pair,
)

PINGS = 5
WINDOW = 64


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Where configurations, logs, captures and sockets go: ``tmp_path`` unless its path is
    too long for the Unix sockets in it."""
    if len(str(tmp_path)) <= 80:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="ict-ss-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", *args], capture_output=True, text=True, timeout=timeout
    )


def esp_in_udp(pkt: Packet) -> tuple[str, str, bytes] | None:
    """(src, dst, ESP bytes) of a captured ESP-in-UDP packet; None for anything else (IKE
    behind the non-ESP marker, NAT keep-alives)."""
    if IP not in pkt or UDP not in pkt:
        return None
    udp = pkt[UDP]
    if 4500 not in (udp.sport, udp.dport):
        return None
    payload = bytes(udp.payload)
    if len(payload) < 8 or payload[:4] == b"\0\0\0\0":
        return None
    return pkt[IP].src, pkt[IP].dst, payload


def ike_packets(path: Path) -> int:
    """IKE messages in UDP 4500 (behind the four-zero-octet non-ESP marker)."""
    n = 0
    for p in rdpcap(str(path)):
        if UDP in p and p[UDP].dport == 4500 and bytes(p[UDP].payload)[:4] == b"\0\0\0\0":
            n += 1
    return n


def esp_packets(path: Path) -> list[tuple[str, str, bytes]]:
    return [e for e in (esp_in_udp(p) for p in rdpcap(str(path))) if e is not None]


def wait_for_esp(path: Path, count: int) -> None:
    """Wait until the capture file holds ``count`` ESP packets. tcpdump stops at SIGINT without
    reading what is still in its kernel ring, so a capture stopped the moment the traffic ends
    can miss the last packet (CI saw 9 of 10 once under load)."""

    def enough() -> bool:
        try:
            return len(esp_packets(path)) >= count
        except Exception:  # a record half written: look again
            return False

    wait_until(enough, f"{count} ESP packets in {path.name}", timeout=20)


def seqs(esp: list[tuple[str, str, bytes]], spi: int) -> list[int]:
    """ESP sequence numbers (in the clear in the header) of the packets with this SPI."""
    return [int.from_bytes(b[4:8], "big") for _, _, b in esp if int.from_bytes(b[:4], "big") == spi]


def check_mirror(ca: ChildSA, cb: ChildSA) -> None:
    """What A logged and what B logged describe the same two SAs."""
    assert ca.initiator and not cb.initiator
    assert ca.outbound == cb.inbound and ca.inbound == cb.outbound
    assert (ca.outbound.src, ca.outbound.dst) == (A.outer, B.outer)
    assert ca.outbound.spi != ca.inbound.spi
    assert not ca.esn  # strongSwan proposes no ESN unless asked


# -- the log parser (no root needed) ------------------------------------------------------

RESPONDER_LOG = """\
16:00:38.699 12[IKE] 10.200.0.1 is initiating an IKE_SA
16:00:38.703 15[CFG] selected proposal: ESP:AES_CBC_128/HMAC_SHA2_256_128/NO_EXT_SEQ
16:00:38.703 15[CHD]   using AES_CBC for encryption
16:00:38.703 15[CHD]   using HMAC_SHA2_256_128 for integrity
16:00:38.703 15[CHD] encryption initiator key => 16 bytes @ 0x7fdb34003660
16:00:38.703 07[CHD] seed => 2 bytes @ 0x7fdb34003000
16:00:38.703 15[CHD]    0: 00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F  ................
16:00:38.703 07[CHD]    0: EE EE                                            ..
16:00:38.703 15[CHD] encryption responder key => 16 bytes @ 0x7fdb34004af0
16:00:38.703 15[CHD]    0: 10 11 12 13 14 15 16 17 18 19 1A 1B 1C 1D 1E 1F  ................
16:00:38.703 15[CHD] integrity initiator key => 32 bytes @ 0x7fdb340028b0
16:00:38.703 15[CHD]    0: 20 21 22 23 24 25 26 27 28 29 2A 2B 2C 2D 2E 2F   !"#$%&'()*+,-./
16:00:38.703 15[CHD]   16: 30 31 32 33 34 35 36 37 38 39 3A 3B 3C 3D 3E 3F  0123456789:;<=>?
16:00:38.703 15[CHD] integrity responder key => 32 bytes @ 0x7fdb34001020
16:00:38.703 15[CHD]    0: 40 41 42 43 44 45 46 47 48 49 4A 4B 4C 4D 4E 4F  @ABCDEFGHIJKLMNO
16:00:38.703 15[CHD]   16: 50 51 52 53 54 55 56 57 58 59 5A 5B 5C 5D 5E 5F  PQRSTUVWXYZ[\\]^_
16:00:38.703 15[CHD] adding inbound ESP SA
16:00:38.703 15[CHD]   SPI 0xc36e5e65, src 10.200.0.1 dst 10.200.0.2
16:00:38.703 15[CHD] adding outbound ESP SA
16:00:38.703 15[CHD]   SPI 0x45f5d036, src 10.200.0.2 dst 10.200.0.1
"""


def test_parse_child_sa_of_a_responder() -> None:
    """Another thread's hex dump in between does not mix in; the responder receives with the
    initiator's keys and sends with its own."""
    c = strongswan.parse_child_sa(RESPONDER_LOG)
    assert not c.initiator and not c.esn
    assert (c.inbound.spi, c.inbound.src, c.inbound.dst) == (0xC36E5E65, B.remote_outer, B.outer)
    assert (c.outbound.spi, c.outbound.src, c.outbound.dst) == (0x45F5D036, B.outer, A.outer)
    assert c.inbound.enc_key == bytes(range(16)) and c.outbound.enc_key == bytes(range(16, 32))
    assert c.inbound.integ_key == bytes(range(32, 64))
    assert c.outbound.integ_key == bytes(range(64, 96))
    assert c.outbound.esp_sa_line() == (
        '"IPv4","10.200.0.2","10.200.0.1","0x45f5d036","AES-CBC [RFC3602]",'
        '"0x101112131415161718191a1b1c1d1e1f","HMAC-SHA-256-128 [RFC4868]",'
        f'"0x{bytes(range(64, 96)).hex()}"'
    )
    assert bytes(range(16)).hex() not in repr(c)  # keys stay out of reprs
    with pytest.raises(AssertionError, match="no CHILD_SA"):
        strongswan.parse_child_sa("16:00:38.703 15[CHD]   using AES_CBC for encryption\n")


# -- 1. ipsecct decrypts strongSwan's ESP ----------------------------------------------------


@pytest.mark.root
@needs_strongswan
@pytest.mark.parametrize(
    ("proposal", "enc", "integ", "enc_key_len"),
    [
        ("aes128gcm16", "AES_GCM_16", None, 16 + 4),  # key || salt
        ("aes256gcm16", "AES_GCM_16", None, 32 + 4),
        ("aes128-sha256", "AES_CBC", "HMAC_SHA2_256_128", 16),
    ],
)
def test_pcap_decrypt_reads_strongswan_esp(
    workdir: Path, proposal: str, enc: str, integ: str | None, enc_key_len: int
) -> None:
    cap_path = workdir / "esp.pcap"
    with (
        Namespaces("a", "b") as ns,
        start_pair(ns, workdir, proposal, capture=("a", cap_path)) as pair,
    ):
        assert pair.capture is not None
        try:
            received = ping(ns, "a", B.inner, PINGS)
            if received == PINGS:
                wait_for_esp(cap_path, 2 * PINGS)
        finally:
            pair.capture.stop()
        assert received == PINGS, pair.a.logtail() + pair.b.logtail()
        ca, cb = pair.a.child_sa(), pair.b.child_sa()
    check_mirror(ca, cb)
    assert (ca.outbound.enc, ca.outbound.integ) == (enc, integ), ca.proposal
    assert len(ca.outbound.enc_key) == enc_key_len
    assert len(ca.outbound.integ_key) == (32 if integ else 0)

    # What is on the wire: PINGS requests from A and PINGS replies from B, sequence numbers
    # 1, 2, ... on each SA.
    esp = esp_packets(cap_path)
    assert len(esp) == 2 * PINGS
    assert ike_packets(cap_path) >= 2  # IKE_AUTH in UDP 4500 too, which decrypt must skip
    assert seqs(esp, ca.outbound.spi) == list(range(1, PINGS + 1))
    assert seqs(esp, ca.inbound.spi) == list(range(1, PINGS + 1))

    keys = workdir / "esp.keys"
    keys.touch(mode=0o600)  # (as the README writes it: else a warning)
    keys.write_text(
        "# CHILD_SA keys from charon's log (chd = 4)\n"
        + ca.outbound.esp_sa_line()
        + "\n"
        + ca.inbound.esp_sa_line()
        + "\n"
    )
    out = workdir / "inner.pcap"
    r = cli("pcap", "decrypt", "--keys", str(keys), str(cap_path), str(out))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr

    inner = [IP(bytes(p)) for p in rdpcap(str(out))]
    assert len(inner) == len(esp)  # every ESP packet decrypted, nothing else written
    for p in inner:
        assert ICMP in p, p.summary()
    requests = [p for p in inner if p[ICMP].type == 8]
    replies = [p for p in inner if p[ICMP].type == 0]
    assert len(requests) == len(replies) == PINGS
    assert all((p.src, p.dst) == (A.inner, B.inner) for p in requests)
    assert all((p.src, p.dst) == (B.inner, A.inner) for p in replies)
    # each reply answers a request: same identifier, sequence number and payload
    assert sorted((p[ICMP].id, p[ICMP].seq, bytes(p[ICMP].payload)) for p in requests) == sorted(
        (p[ICMP].id, p[ICMP].seq, bytes(p[ICMP].payload)) for p in replies
    )
    assert sorted(p[ICMP].seq for p in requests) == list(range(1, PINGS + 1))

    # A key file with one wrong key: those packets fail, exit status 1, not a traceback.
    bad = bytearray(ca.inbound.enc_key)
    bad[0] ^= 1
    wrong = strongswan.EspSA(
        ca.inbound.spi, ca.inbound.src, ca.inbound.dst, ca.inbound.enc, bytes(bad),
        ca.inbound.integ, ca.inbound.integ_key,
    )  # fmt: skip
    keys.write_text(ca.outbound.esp_sa_line() + "\n" + wrong.esp_sa_line() + "\n")
    r = cli("pcap", "decrypt", "--keys", str(keys), str(cap_path), str(out))
    assert r.returncode == 1, r.stderr
    assert f"{PINGS} of {2 * PINGS} ESP packets not decrypted" in r.stderr
    assert len(rdpcap(str(out))) == PINGS


# -- 2. strongSwan accepts ipsecct's ESP after a transfer from strongSwan ---------------------


def sa_contexts(cb: ChildSA, last_sent: int, last_received: int) -> list[dict[str, Any]]:
    """B's CHILD_SA as two ipsecct feature contexts (JSON form): ``seq`` is the last sequence
    number B sent, the replay window has everything up to ``last_received``."""
    common: dict[str, Any] = {
        "protocol": "esp",
        "mode": "tunnel",
        "enc": strongswan.ENC_NAMES[cb.outbound.enc][1],
        "esn": False,
        "replay_window": WINDOW,
        "udp_encap": {"sport": 4500, "dport": 4500},
        "selectors": {"local": [f"{B.inner}/32"], "remote": [f"{A.inner}/32"]},
    }
    if cb.outbound.integ:
        common["integ"] = strongswan.INTEG_NAMES[cb.outbound.integ][1]
    out = dict(
        common,
        spi=f"0x{cb.outbound.spi:08x}",
        direction="out",
        src=cb.outbound.src,
        dst=cb.outbound.dst,
        enc_key=cb.outbound.enc_key.hex(),
        seq=last_sent,
        name="from-strongswan out",
    )
    inn = dict(
        common,
        spi=f"0x{cb.inbound.spi:08x}",
        direction="in",
        src=cb.inbound.src,
        dst=cb.inbound.dst,
        enc_key=cb.inbound.enc_key.hex(),
        name="from-strongswan in",
    )
    if cb.outbound.integ:
        out["integ_key"] = cb.outbound.integ_key.hex()
        inn["integ_key"] = cb.inbound.integ_key.hex()
    if last_received:
        bits = (1 << min(last_received, WINDOW)) - 1  # bit i: top - i was received
        inn["replay"] = {"top": last_received, "bitmap": bits.to_bytes(WINDOW // 8, "little").hex()}
    return [out, inn]


def node_config(sock: str) -> str:
    return "\n".join(
        [
            'name = "b-ipsecct"',
            "[outer]",
            f'address = "{B.outer}"',
            "port = 4500",
            "[inner]",
            'kind = "tun"',
            'name = "ipsecct0"',
            f'addresses = ["{B.inner}/32"]',
            "mtu = 1400",
            f'routes = ["{A.inner}/32"]',
            "[control]",
            f'socket = "{sock}"',
            "[log]",
            'level = "debug"',
            "",
        ]
    )


def status(sock: str) -> dict[str, Any]:
    r = cli("status", "--json", "-s", sock)
    assert r.returncode == 0, r.stderr
    res: dict[str, Any] = json.loads(r.stdout)
    return res


@contextlib.contextmanager
def running(d: Daemon) -> Iterator[Daemon]:
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.mark.root
@needs_strongswan
@pytest.mark.parametrize(
    ("proposal", "carry_seq"),
    [
        ("aes128gcm16", True),
        ("aes128-sha256", True),
        # Negative control: the outbound sequence number is not transferred, ipsecct starts
        # again at 1, and strongSwan drops every packet as a replay. (AES-CBC, whose IVs are
        # random, so that repeating sequence numbers repeats no AES-GCM nonce even here.)
        ("aes128-sha256", False),
    ],
)
def test_strongswan_accepts_ipsecct_after_transfer_from_strongswan(
    workdir: Path, proposal: str, carry_seq: bool
) -> None:
    before = workdir / "before.pcap"
    with (
        Namespaces("a", "b") as ns,
        start_pair(ns, workdir, proposal, capture=("b", before)) as pair,
    ):
        # strongSwan A <-> strongSwan B
        assert pair.capture is not None
        try:
            assert ping(ns, "a", B.inner, PINGS) == PINGS, pair.a.logtail() + pair.b.logtail()
            wait_for_esp(before, 2 * PINGS)
            ca, cb = pair.a.child_sa(), pair.b.child_sa()
            check_mirror(ca, cb)
            b_counts = sa_packet_counts(pair.b.list_sas())
            pair.b.kill()  # no DELETE: A keeps the CHILD_SA
        finally:
            pair.capture.stop()

        # B's exact state, from the wire: the last sequence number it sent and what it got
        esp = esp_packets(before)
        sent, got = seqs(esp, cb.outbound.spi), seqs(esp, cb.inbound.spi)
        assert sent == got == list(range(1, PINGS + 1))
        # ... and as charon counted it
        assert b_counts == {cb.outbound.spi: len(sent), cb.inbound.spi: len(got)}

        # ipsecct takes over in B's namespace: same outer address and port, B's inner address
        ns.run("b", "ip", "addr", "del", f"{B.inner}/32", "dev", "lo")
        sock = str(workdir / "b.sock")
        cfg = workdir / "b.toml"
        cfg.write_text(node_config(sock))
        node = Daemon("node", cfg, sock, workdir / "b-ipsecct.gateway.log", prefix=ns.cmd("b"))
        with running(node):
            ctx = workdir / "b-sa.json"
            fd = os.open(ctx, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds keys
            with os.fdopen(fd, "w") as f:
                json.dump(sa_contexts(cb, sent[-1] if carry_seq else 0, got[-1]), f)
            r = cli("sa", "add", str(ctx), "-s", sock, "--json")
            assert r.returncode == 0, r.stderr
            added = json.loads(r.stdout)
            secrets = [
                k.hex() for sa in (cb.inbound, cb.outbound) for k in (sa.enc_key, sa.integ_key) if k
            ]
            assert not any(k in r.stdout.lower() for k in secrets)  # keys are never echoed
            assert {a["spi"] for a in added} == {
                f"0x{cb.outbound.spi:08x}",
                f"0x{cb.inbound.spi:08x}",
            }, added

            # strongSwan A, untouched, pings what it still believes is strongSwan B
            received = ping(ns, "a", B.inner, PINGS)
            st = status(sock)
            c = st["counters"]
            # ipsecct accepted A's requests (the next sequence numbers after B's window) and
            # answered each of them
            assert (c["in_packets"], c["out_packets"]) == (PINGS, PINGS), (c, node.logtext())
            assert not any(c["drops"].values()), c["drops"]
            a_counts = sa_packet_counts(pair.a.list_sas())
            if not carry_seq:
                assert received == 0
                log = pair.a.log()
                for n in range(1, PINGS + 1):  # libipsec's replay check refused each reply
                    assert f"SPI {cb.outbound.spi:08x} [seq {n}]" in log
                assert log.count("ESP sequence number verification failed") == PINGS
                assert a_counts == {ca.outbound.spi: 2 * PINGS, ca.inbound.spi: PINGS}
                return
            assert received == PINGS, (st, node.logtext(), pair.a.logtail())
            # A accepted ipsecct's packets as the next ones on the same SA
            assert a_counts == {ca.outbound.spi: 2 * PINGS, ca.inbound.spi: 2 * PINGS}
            assert "verification failed" not in pair.a.log()
            log = (workdir / "b-ipsecct.gateway.log").read_text(errors="replace").lower()
            assert "sa-added" in log and not any(k in log for k in secrets)

            # ipsecct also took B's replay window: a packet A sent to B before the transfer,
            # played again, is dropped as a replay
            old = next(b for _, _, b in esp if int.from_bytes(b[:4], "big") == cb.inbound.spi)
            ns.run(
                "a",
                sys.executable,
                "-c",
                "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                " s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 4500))",
                old.hex(),
                B.outer,
            )
            wait_until(lambda: status(sock)["counters"]["drops"]["replay"] == 1, "replay drop")
            c = status(sock)["counters"]
            assert c["in_packets"] == PINGS
            assert {k: v for k, v in c["drops"].items() if v} == {"replay": 1}

"""A real mobile node and a real gateway (``ipsecct node run`` / ``ipsecct gateway run``
subprocesses) on loopback, unprivileged: the inner sides are virtual links (IP packets in UDP),
the outer side ESP in UDP. Traffic both ways, the control socket commands, PMTU signalling,
rejection counters, metrics, SIGTERM and restart.

Between the MN and the SG sits a small UDP relay in this process: it forwards the MN's ESP to
the SG and keeps a copy, which is the "capture" that ``ipsecct pcap decrypt`` decrypts with
the keys ``ipsecct sa export --wireshark`` printed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ipsecct.ipsec import ippacket
from ipsecct.ipsec.ippacket import build_udp
from tests.helpers.daemon import (
    HOST,
    KEY_UP,
    MN_INNER,
    RECV_TIMEOUT,
    ROOT,
    SPI_DOWN,
    SPI_UP,
    Daemon,
    copy_keys,
    free_tcp_port,
    free_udp_port,
    ipsecct,
    node_toml,
    ok,
)
from tests.helpers.data_path import without_extensions
from tests.helpers.waiting import until


class Relay:
    """Forwards UDP datagrams to ``target`` and keeps a copy of each (a capture)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append(data)
            with contextlib.suppress(OSError):
                self.sock.sendto(data, self.target)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def app_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", port))
    s.settimeout(RECV_TIMEOUT)
    return s


@dataclass
class Topo:
    dir: Path
    mn: Daemon
    sg: Daemon
    relay: Relay
    mn_app: socket.socket  # the MN's application, at the end of the MN's virtual link
    host: socket.socket  # the end host behind the SG, at the end of the SG's virtual link
    mn_link: tuple[str, int]
    sg_link: tuple[str, int]
    sg_outer: tuple[str, int]
    metrics_port: int
    extra: list[Any] = field(default_factory=list)

    def up(self, pkt: bytes) -> None:
        self.mn_app.sendto(pkt, self.mn_link)

    def down(self, pkt: bytes) -> None:
        self.host.sendto(pkt, self.sg_link)


def sock_dir() -> Path:
    """A short directory for Unix sockets (their path is limited to 107 octets)."""
    return Path(tempfile.mkdtemp(prefix="ipsecct-t-", dir="/tmp"))


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topo]:
    sdir = sock_dir()
    copy_keys(tmp_path, "mn-sg1.keys", "sg1-mn.keys")
    mn_outer, mn_link, mn_app_port = free_udp_port(), free_udp_port(), free_udp_port()
    sg_outer, sg_link, host_port = free_udp_port(), free_udp_port(), free_udp_port()
    metrics = free_tcp_port()
    relay = Relay(("127.0.0.1", sg_outer))
    common = {"enc": "aes-gcm-16", "esn": True, "replay_window": 1024}
    (tmp_path / "mn.toml").write_text(
        node_toml(
            "mn",
            mn_outer,
            mn_link,
            mn_app_port,
            str(sdir / "mn.sock"),
            [
                {
                    "name": "mn-sg1",
                    "local_ts": f"{MN_INNER}/32",
                    "remote_ts": "10.2.0.0/24",
                    "peer": f"127.0.0.1:{relay.port}",
                    "spi_out": SPI_UP,
                    "spi_in": SPI_DOWN,
                    "keys": "mn-sg1.keys",
                    **common,
                }
            ],
        )
    )
    (tmp_path / "sg.toml").write_text(
        node_toml(
            "sg1",
            sg_outer,
            sg_link,
            host_port,
            str(sdir / "sg.sock"),
            [
                {
                    "name": "sg1-mn",
                    "local_ts": "10.2.0.0/24",
                    "remote_ts": f"{MN_INNER}/32",
                    "peer": f"127.0.0.1:{mn_outer}",
                    "spi_out": SPI_DOWN,
                    "spi_in": SPI_UP,
                    "keys": "sg1-mn.keys",
                    **common,
                }
            ],
            metrics=metrics,
        )
    )
    mn = Daemon("node", tmp_path / "mn.toml", str(sdir / "mn.sock"), tmp_path / "mn.log")
    sg = Daemon("gateway", tmp_path / "sg.toml", str(sdir / "sg.sock"), tmp_path / "sg.log")
    mn_app, host = app_socket(mn_app_port), app_socket(host_port)
    t = Topo(
        tmp_path,
        mn,
        sg,
        relay,
        mn_app,
        host,
        ("127.0.0.1", mn_link),
        ("127.0.0.1", sg_link),
        ("127.0.0.1", sg_outer),
        metrics,
    )
    try:
        sg.start()
        mn.start()
        yield t
    finally:
        for d in (mn, sg):
            d.cleanup()
        relay.close()
        mn_app.close()
        host.close()
        shutil.rmtree(sdir, ignore_errors=True)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def packet(i: int, src: str = MN_INNER, dst: str = HOST, size: int = 64) -> bytes:
    body = struct.pack("!I", i) + bytes(max(0, size - 4))
    return build_udp(ip(src), ip(dst), 5000 + i % 7, 7000, body)


def with_df(pkt: bytes) -> bytes:
    b = bytearray(pkt)
    b[6] |= 0x40
    struct.pack_into("!H", b, 10, 0)
    struct.pack_into("!H", b, 10, ippacket.checksum(b[:20]))
    return bytes(b)


def recv_all(s: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        out.append(s.recv(65535))
    return out


def wait_for(pred: Any, what: str, timeout: float = 10.0) -> None:
    until(pred, what, timeout)


# -- tests ------------------------------------------------------------------------------------


def test_traffic_both_ways_and_counters(topo: Topo) -> None:
    n = 50
    sent_up = [packet(i, size=64 + 20 * i) for i in range(n)]
    for p in sent_up:
        topo.up(p)
    got_up = recv_all(topo.host, n)
    assert sorted(got_up) == sorted(sent_up)  # the very same IP packets come out at the host
    sent_down = [packet(i, HOST, MN_INNER, 100) for i in range(n)]
    for p in sent_down:
        topo.down(p)
    assert sorted(recv_all(topo.mn_app, n)) == sorted(sent_down)

    mn, sg = topo.mn.counters(), topo.sg.counters()
    assert mn["out_packets"] == n and mn["in_packets"] == n
    assert sg["in_packets"] == n and sg["out_packets"] == n
    assert sg["in_bytes"] == sum(len(p) for p in sent_up)
    assert mn["in_bytes"] == sum(len(p) for p in sent_down)
    assert not any(mn["drops"].values()) and not any(sg["drops"].values())
    st = topo.sg.status()
    assert st["name"] == "sg1" and st["role"] == "gateway" and st["sas"] == 2
    assert topo.mn.status()["role"] == "node"
    # the ESP really went through the relay, encrypted
    esp = [d for d in topo.relay.seen if d[:4] == struct.pack("!L", SPI_UP)]
    assert len(esp) == n
    assert all(struct.pack("!I", 7) + bytes(60) not in d for d in esp)

    sas = json.loads(ok("sa", "list", "--json", "-s", topo.sg.sock))
    by_dir = {s["direction"]: s for s in sas}
    assert by_dir["in"]["spi"] == f"0x{SPI_UP:08x}" and by_dir["in"]["packets"] == n
    assert by_dir["out"]["spi"] == f"0x{SPI_DOWN:08x}" and by_dir["out"]["seq"] == n
    assert by_dir["in"]["replay_top"] == n
    assert by_dir["in"]["enc"] == "aes-gcm-16" and by_dir["in"]["esn"] is True
    for s in sas:
        text = json.dumps(s)
        assert KEY_UP.hex() not in text  # never a key in sa list
    table = ok("sa", "list", "-s", topo.sg.sock)
    assert f"0x{SPI_UP:08x}" in table and "sg1-mn" in table
    shown = json.loads(ok("sa", "show", hex(SPI_UP), "--json", "-s", topo.sg.sock))
    assert [s["spi"] for s in shown] == [f"0x{SPI_UP:08x}"]
    human = ok("status", "-s", topo.sg.sock)
    assert "sg1 (gateway)" in human and f"in {n} packets" in human


@pytest.fixture
def no_extensions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The daemons started after it import a copy of the package without its C extensions."""
    return without_extensions(tmp_path / "pkg", monkeypatch)


def test_a_gateway_runs_and_says_so_without_the_c_extensions(
    no_extensions: Path, topo: Topo
) -> None:
    """Installed without a compiler (no .so file at all, IPSECCT_PURE_PYTHON unset), a gateway
    and a node start, carry traffic both ways on the Python data path, and status says so."""
    assert topo.sg.status()["data_path"] == topo.mn.status()["data_path"] == "python"
    n = 20
    sent_up = [packet(i, size=64 + 20 * i) for i in range(n)]
    for p in sent_up:
        topo.up(p)
    assert sorted(recv_all(topo.host, n)) == sorted(sent_up)
    sent_down = [packet(i, HOST, MN_INNER, 100) for i in range(n)]
    for p in sent_down:
        topo.down(p)
    assert sorted(recv_all(topo.mn_app, n)) == sorted(sent_down)
    sg = topo.sg.counters()
    assert sg["in_packets"] == n and sg["out_packets"] == n and not any(sg["drops"].values())
    assert '"data_path": "python"' in ok("status", "--json", "-s", topo.sg.sock)


def test_rejections_are_counted(topo: Topo) -> None:
    from ipsecct.ipsec import processing
    from ipsecct.ipsec.sad import Direction, SecurityAssociation

    # matches no policy at the MN: dropped there
    topo.up(packet(1, "10.9.9.9", HOST))
    topo.up(packet(2, MN_INNER, "10.3.0.1"))
    wait_for(lambda: topo.mn.counters()["drops"]["policy"] == 2, "MN policy drops")
    # ESP forged with the example keys, sent straight to the SG's outer port
    forger = SecurityAssociation(
        SPI_UP,
        Direction.OUTBOUND,
        ip("127.0.0.1"),
        ip("127.0.0.1"),
        enc_key=KEY_UP,
        esn=True,
        seq=1000,
    )
    good = processing.tunnel_encapsulate(forger, packet(3), 0.0)
    spoof = processing.tunnel_encapsulate(forger, packet(4, "10.1.0.66", HOST), 0.0)
    assert isinstance(good, bytearray) and isinstance(spoof, bytearray)
    bad = bytearray(good)
    bad[-1] ^= 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(bytes(bad), topo.sg_outer)  # ICV
        s.sendto(bytes(good), topo.sg_outer)  # accepted
        s.sendto(bytes(good), topo.sg_outer)  # replay
        s.sendto(b"\x00\x00\x99\x99" + bytes(good[4:]), topo.sg_outer)  # no SA
        s.sendto(bytes(spoof), topo.sg_outer)  # inner source outside the SA's selectors
        s.sendto(b"\x00\x00\x00\x00garbage", topo.sg_outer)  # non-ESP marker, nobody takes it
        s.sendto(b"\xff", topo.sg_outer)  # NAT keep-alive: ignored, not counted
    assert topo.host.recv(65535) == packet(3)

    def drops() -> dict[str, int]:
        return topo.sg.counters()["drops"]  # type: ignore[no-any-return]

    wait_for(lambda: drops()["malformed"] == 1, "SG drops")
    d = drops()
    assert (d["icv"], d["replay"], d["no_sa"], d["policy"]) == (1, 1, 1, 1), d
    # the daemons are still fine
    topo.up(packet(5))
    assert topo.host.recv(65535) == packet(5)


def test_export_wireshark_keys_decrypt_the_capture(topo: Topo) -> None:
    pytest.importorskip("ipsecct.tools.pcapdecrypt")
    from ipsecct.tools.keyfile import parse_keyfile
    from ipsecct.tools.pcap import LINKTYPE_RAW, PcapWriter

    sent = [packet(i, size=200) for i in range(5)]
    for p in sent:
        topo.up(p)
    recv_all(topo.host, len(sent))
    out = ok("sa", "export", "--wireshark", "-s", topo.mn.sock)
    lines = out.splitlines()
    assert len(lines) == 2
    parsed = parse_keyfile(out)
    up = [k for k in parsed if k.spi == SPI_UP]
    assert len(up) == 1 and up[0].enc_key == KEY_UP and up[0].esn
    assert all(line.startswith('"IPv4","127.0.0.1","127.0.0.1",') for line in lines)
    assert "AES-GCM with 16 octet ICV [RFC4106]" in lines[0]
    # export needs the format named
    r = ipsecct("sa", "export", "-s", topo.mn.sock)
    assert r.returncode == 2 and "--wireshark" in r.stderr

    keys = topo.dir / "exported.keys"
    keys.write_text(out)
    cap = topo.dir / "esp.pcap"
    with open(cap, "wb") as f:
        w = PcapWriter(f, LINKTYPE_RAW)
        for d in topo.relay.seen:
            udp = struct.pack("!HHHH", 4500, 4500, 8 + len(d), 0) + d
            w.write(ippacket.build_ip(ip("127.0.0.1"), ip("127.0.0.1"), 17, len(udp)) + udp)
    dec = topo.dir / "dec.pcap"
    r = ipsecct("pcap", "decrypt", "--keys", str(keys), str(cap), str(dec))
    assert r.returncode == 0, r.stderr
    from ipsecct.tools.pcap import PcapReader

    with open(dec, "rb") as f:
        got = [bytes(rec.data) for rec in PcapReader(f)]
    assert got == sent


def test_pmtu_set_at_run_time_sends_icmp_back(topo: Topo) -> None:
    big = with_df(packet(1, size=1000))
    topo.up(big)
    assert topo.host.recv(65535) == big
    r = ok("pmtu", "set", hex(SPI_UP), "600", "-s", topo.mn.sock)
    assert "600" in r
    (shown,) = json.loads(ok("sa", "show", hex(SPI_UP), "--json", "-s", topo.mn.sock))
    assert shown["path_mtu"] == 600
    topo.up(big)
    icmp = topo.mn_app.recv(65535)
    hdr = ippacket.parse(icmp)
    assert hdr.protocol == 1 and hdr.dst == ip(MN_INNER)
    typ, code, _, _, mtu = struct.unpack_from("!BBHHH", icmp, 20)
    assert (typ, code) == (3, 4)
    assert 500 < mtu < 600
    assert icmp[28:] == big[:28]  # the original header and 8 octets of its payload
    small = with_df(packet(2, size=mtu - 28))
    topo.up(small)
    assert topo.host.recv(65535) == small
    c = topo.mn.counters()
    assert c["icmp_sent"] == 1 and c["drops"]["mtu"] == 1
    # a packet without DF is still sent (the outer packet may be fragmented)
    topo.up(packet(3, size=1000))
    assert topo.host.recv(65535) == packet(3, size=1000)
    # errors: unknown SPI, MTU out of range
    r2 = ipsecct("pmtu", "set", "0x1234", "600", "-s", topo.mn.sock)
    assert r2.returncode == 2 and "no SA" in r2.stderr
    r3 = ipsecct("pmtu", "set", hex(SPI_UP), "20", "-s", topo.mn.sock)
    assert r3.returncode == 2 and "68" in r3.stderr
    # from a script on the socket: true was "path MTU True out of range", 1e300 "must be a
    # number"
    from ipsecct.errors import ControlError
    from ipsecct.gateway.control import request

    for bad in (True, 1e300, 600.0, "600"):
        with pytest.raises(ControlError, match=r"^mtu must be a whole number of octets$"):
            request(topo.mn.sock, "pmtu.set", {"spi": hex(SPI_UP), "mtu": bad})


def test_pmtu_set_of_an_spi_that_names_sas_of_two_tunnels_is_named_with_dst(topo: Topo) -> None:
    """A peer chooses the SPI of our outbound SA (any 32 bits, another tunnel's inbound SPI
    among them). ``pmtu set SPI`` changed every SA with that SPI; now, as ``sa show`` and
    ``sa delete``, it refuses one that names SAs of more than one tunnel (one line, exit
    status 2, naming each SA's destination, nothing changed), and ``--dst ADDR`` names the
    one meant: only that one changes."""
    from ipsecct.ct import context
    from ipsecct.ipsec.sad import Direction, SecurityAssociation

    def mtus() -> dict[tuple[str, str], int]:
        sas = json.loads(ok("sa", "list", "--json", "-s", topo.mn.sock))
        return {(s["direction"], s["dst"]): s["path_mtu"] for s in sas
                if s["spi"] == f"0x{SPI_UP:08x}"}  # fmt: skip

    ((way, out_dst),) = mtus()  # the MN's outbound SA, the peer's choice of SPI
    assert way == "out" and out_dst != "127.0.0.2"
    # (its own key: KEY_UP is the MN's outbound key, refused for an inbound SA here)
    sa = SecurityAssociation(SPI_UP, Direction.INBOUND, ip("127.0.0.1"), ip("127.0.0.2"),
                             enc_key=bytes(16) + b"\x00\x00\x00\x0b", esn=True,
                             replay_window=1024)  # fmt: skip
    f = topo.dir / "other.json"
    f.write_text(json.dumps(context.to_json(sa, 0.0)))
    ok("sa", "add", str(f), "-s", topo.mn.sock)  # another tunnel's inbound SA, our choice
    before = mtus()
    assert len(before) == 2 and 600 not in before.values(), before
    r = ipsecct("pmtu", "set", hex(SPI_UP), "600", "-s", topo.mn.sock)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r
    assert f"0x{SPI_UP:08x} names 2 SAs here" in r.stderr, r.stderr
    assert f"to {out_dst}" in r.stderr and "to 127.0.0.2" in r.stderr, r.stderr
    assert "--dst" in r.stderr and "Traceback" not in r.stderr
    assert mtus() == before  # nothing changed
    r = ipsecct("pmtu", "set", hex(SPI_UP), "600", "--dst", "127.0.0.9", "-s", topo.mn.sock)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "127.0.0.9" in r.stderr, r
    assert mtus() == before
    assert "path MTU of 1 SA(s) set to 600" in ok(
        "pmtu", "set", hex(SPI_UP), "600", "--dst", out_dst, "-s", topo.mn.sock)
    assert mtus() == {**before, ("out", out_dst): 600}


def test_metrics_endpoint(topo: Topo) -> None:
    for i in range(3):
        topo.up(packet(i))
    recv_all(topo.host, 3)
    with urllib.request.urlopen(f"http://127.0.0.1:{topo.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    assert "# TYPE ipsecct_packets_total counter" in text
    assert 'ipsecct_packets_total{node="sg1",direction="in"} 3' in text
    assert 'ipsecct_drops_total{node="sg1",reason="replay"} 0' in text
    assert 'ipsecct_sas{node="sg1"} 2' in text


def test_sigterm_exits_cleanly_and_restart_works(topo: Topo) -> None:
    topo.up(packet(1))
    assert topo.host.recv(65535) == packet(1)
    assert os.path.exists(topo.sg.sock)
    assert topo.sg.terminate() == 0
    assert not os.path.exists(topo.sg.sock)
    assert "event=shutdown" in topo.sg.logtext()
    r = ipsecct("status", "-s", topo.sg.sock)
    assert r.returncode == 2 and "daemon running" in r.stderr
    topo.sg.start()  # same configuration
    c = topo.sg.counters()
    assert c["in_packets"] == 0
    # the MN goes on with its sequence numbers; the restarted SG's window starts afresh
    for i in range(2, 5):
        topo.up(packet(i))
    assert sorted(recv_all(topo.host, 3)) == sorted(packet(i) for i in range(2, 5))
    topo.down(packet(9, HOST, MN_INNER))
    # the restarted SG starts its outbound sequence at 1 again, which the MN's window
    # (which never saw these numbers) accepts
    assert topo.mn_app.recv(65535) == packet(9, HOST, MN_INNER)
    assert topo.mn.terminate() == 0
    assert not os.path.exists(topo.mn.sock)


def test_sa_delete_and_add(topo: Topo) -> None:
    from ipsecct.ct import context
    from ipsecct.ipsec.sad import Direction, SecurityAssociation

    res = json.loads(ok("sa", "delete", hex(SPI_UP), "--json", "-s", topo.sg.sock))
    assert res == [f"0x{SPI_UP:08x}"]
    sas = json.loads(ok("sa", "list", "--json", "-s", topo.sg.sock))
    assert sas == []  # the tunnel went with its inbound SA: both SAs gone
    # no SAs: one line, as swanctl users expect, not a table header with no rows
    assert ok("sa", "list", "-s", topo.sg.sock) == "no SAs\n"
    topo.up(packet(1))
    wait_for(lambda: topo.sg.counters()["drops"]["no_sa"] == 1, "no_sa drop after delete")
    # put the inbound SA back from a context file
    sa = SecurityAssociation(
        SPI_UP,
        Direction.INBOUND,
        ip("127.0.0.1"),
        ip("127.0.0.1"),
        enc_key=KEY_UP,
        esn=True,
        replay_window=1024,
    )
    f = topo.dir / "sa.json"
    f.write_text(json.dumps(context.to_json(sa, 0.0)))
    added = json.loads(ok("sa", "add", str(f), "--json", "-s", topo.sg.sock))
    assert added[0]["spi"] == f"0x{SPI_UP:08x}"
    topo.up(packet(2))
    assert topo.host.recv(65535) == packet(2)
    r = ipsecct("sa", "delete", "0x4242", "-s", topo.sg.sock)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_an_spi_that_names_sas_to_two_destinations_is_named_with_dst(topo: Topo) -> None:
    """An SPI may name SAs of two tunnels: a peer chooses the SPI of our outbound SA (any 32
    bits, another tunnel's among them), the SAD tells them apart by destination. ``sa delete
    SPI`` deleted every SA with that SPI, and ``sa show SPI`` showed them all as if one: now
    both refuse, one line and exit status 2, naming each SA's destination, nothing deleted;
    ``--dst ADDR`` names one, and only that one goes."""
    from ipsecct.ct import context
    from ipsecct.ipsec.sad import Direction, SecurityAssociation

    sa = SecurityAssociation(SPI_UP, Direction.INBOUND, ip("127.0.0.1"), ip("127.0.0.2"),
                             enc_key=KEY_UP, esn=True, replay_window=1024)  # fmt: skip
    f = topo.dir / "other.json"
    f.write_text(json.dumps(context.to_json(sa, 0.0)))
    ok("sa", "add", str(f), "-s", topo.sg.sock)  # (warns: 127.0.0.2 is not the gateway's)
    for action in ("show", "delete"):
        r = ipsecct("sa", action, hex(SPI_UP), "-s", topo.sg.sock)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r
        assert f"0x{SPI_UP:08x} names 2 SAs here" in r.stderr, r.stderr
        assert "to 127.0.0.1" in r.stderr and "to 127.0.0.2" in r.stderr, r.stderr
        assert "--dst" in r.stderr and "Traceback" not in r.stderr
    sas = json.loads(ok("sa", "list", "--json", "-s", topo.sg.sock))
    assert sorted(s["dst"] for s in sas if s["spi"] == f"0x{SPI_UP:08x}") == [
        "127.0.0.1", "127.0.0.2"]  # nothing deleted
    (shown,) = json.loads(ok("sa", "show", hex(SPI_UP), "--dst", "127.0.0.2", "--json",
                             "-s", topo.sg.sock))  # fmt: skip
    assert shown["dst"] == "127.0.0.2"
    r = ipsecct("sa", "delete", hex(SPI_UP), "--dst", "127.0.0.9", "-s", topo.sg.sock)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "127.0.0.9" in r.stderr, r
    r = ipsecct("sa", "show", hex(SPI_UP), "--dst", "not-an-address", "-s", topo.sg.sock)
    assert r.returncode == 2 and r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr, r
    assert json.loads(ok("sa", "delete", hex(SPI_UP), "--dst", "127.0.0.2", "--json",
                         "-s", topo.sg.sock)) == [f"0x{SPI_UP:08x}"]  # fmt: skip
    sas = json.loads(ok("sa", "list", "--json", "-s", topo.sg.sock))
    assert [s["dst"] for s in sas if s["spi"] == f"0x{SPI_UP:08x}"] == ["127.0.0.1"]
    topo.up(packet(1))  # the tunnel's own inbound SA is still there
    assert topo.host.recv(65535) == packet(1)
    # one SA left with that SPI: named by it alone again
    (shown,) = json.loads(ok("sa", "show", hex(SPI_UP), "--json", "-s", topo.sg.sock))
    assert shown["dst"] == "127.0.0.1"


def test_an_esp_and_an_ah_sa_with_one_spi_and_destination_are_named_with_proto(
        topo: Topo) -> None:  # fmt: skip
    """The SAD's key is (destination, protocol, SPI): an ESP and an AH SA may have one SPI
    and one destination, which ``--dst`` could not tell apart (``sa delete SPI --dst``
    deleted both). Now ``--proto esp|ah`` names one for ``sa show``, ``sa delete`` and
    ``pmtu set``; without it they refuse (one line, exit status 2, naming each SA and
    --proto), nothing deleted or changed."""
    from ipsecct.ct import context
    from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
    from ipsecct.ipsec.sad import Direction, Protocol, SecurityAssociation

    ah = SecurityAssociation(SPI_UP, Direction.INBOUND, ip("127.0.0.1"), ip("127.0.0.1"),
                             protocol=Protocol.AH, enc=EncAlg.NULL,
                             integ=IntegAlg.HMAC_SHA2_256_128, integ_key=bytes(range(32)),
                             esn=True, replay_window=1024)  # fmt: skip
    f = topo.dir / "ah.json"
    f.write_text(json.dumps(context.to_json(ah, 0.0)))
    ok("sa", "add", str(f), "-s", topo.sg.sock)

    def ours() -> dict[str, tuple[str, int]]:
        sas = json.loads(ok("sa", "list", "--json", "-s", topo.sg.sock))
        return {s["protocol"]: (s["dst"], s["path_mtu"]) for s in sas
                if s["spi"] == f"0x{SPI_UP:08x}"}  # fmt: skip

    before = ours()
    assert before == {"ESP": ("127.0.0.1", 1500), "AH": ("127.0.0.1", 1500)}, before
    for args in (("sa", "show", hex(SPI_UP)), ("sa", "delete", hex(SPI_UP), "--dst", "127.0.0.1"),
                 ("pmtu", "set", hex(SPI_UP), "600", "--dst", "127.0.0.1")):  # fmt: skip
        r = ipsecct(*args, "-s", topo.sg.sock)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (args, r)
        assert f"0x{SPI_UP:08x} names 2 SAs here" in r.stderr, r.stderr
        assert "ESP in to 127.0.0.1" in r.stderr and "AH in to 127.0.0.1" in r.stderr, r.stderr
        assert "--proto esp|ah" in r.stderr and "Traceback" not in r.stderr
    assert ours() == before  # nothing deleted or changed
    (shown,) = json.loads(ok("sa", "show", hex(SPI_UP), "--dst", "127.0.0.1", "--proto", "ah",
                             "--json", "-s", topo.sg.sock))  # fmt: skip
    assert shown["protocol"] == "AH"
    assert "of 1 SA(s) set to 600" in ok("pmtu", "set", hex(SPI_UP), "600", "--proto", "ah",
                                          "-s", topo.sg.sock)  # fmt: skip
    assert ours() == {**before, "AH": ("127.0.0.1", 600)}
    assert json.loads(ok("sa", "delete", hex(SPI_UP), "--dst", "127.0.0.1", "--proto", "ah",
                         "--json", "-s", topo.sg.sock)) == [f"0x{SPI_UP:08x}"]  # fmt: skip
    assert ours() == {"ESP": before["ESP"]}
    topo.up(packet(1))  # the tunnel's ESP SA is still there
    assert topo.host.recv(65535) == packet(1)
    r = ipsecct("sa", "show", hex(SPI_UP), "--proto", "ah", "-s", topo.sg.sock)
    assert r.returncode == 2 and "no AH SA with SPI" in r.stderr and r.stderr.count("\n") == 1


def test_sa_add_of_a_list_says_which_were_added_when_one_is_refused(topo: Topo) -> None:
    """``sa add`` of a list stopped at the first SA the gateway refused with only its error:
    the SAs added before it were installed but not shown, and exit status 2 said nothing was
    done. An empty list printed nothing and exited 0. Now: the added ones are listed, the
    refusal says which SA of how many, exit status 1 (done in part); an empty list is 2."""
    from ipsecct.ct import context
    from ipsecct.ipsec.sad import Direction, SecurityAssociation

    sa = SecurityAssociation(0x4343, Direction.INBOUND, ip("127.0.0.1"), ip("127.0.0.1"),
                             enc_key=KEY_UP, esn=True, replay_window=1024)  # fmt: skip
    one = context.to_json(sa, 0.0)
    f = topo.dir / "two.json"
    f.write_text(json.dumps([one, one]))  # the second is the same SPI: refused
    r = ipsecct("sa", "add", str(f), "--json", "-s", topo.sg.sock)
    assert r.returncode == 1, r
    assert [a["spi"] for a in json.loads(r.stdout)] == ["0x00004343"]
    assert r.stderr.count("\n") == 1 and "SA 2 of 2" in r.stderr and "1 added" in r.stderr, r
    assert "0x00004343" in ok("sa", "show", "0x4343", "-s", topo.sg.sock)
    f.write_text("[]")
    r = ipsecct("sa", "add", str(f), "-s", topo.sg.sock)
    assert r.returncode == 2 and r.stdout == "" and "no SA" in r.stderr, r


def test_sa_add_of_an_outbound_spi_another_tunnel_has_is_refused_in_one_line(topo: Topo) -> None:
    """An outbound SA whose SPI the gateway's tunnel to its client has already, towards
    another destination: the SAD would tell them apart, but fail-over replicas, etcd keys and
    cluster grouping know a tunnel by its outbound SPI alone, and one of the two would be
    lost at a take-over. Refused (exit 2, one line); the tunnel in place keeps its SPI."""
    from ipsecct.ct import context
    from ipsecct.ipsec.sad import Direction, SecurityAssociation
    from ipsecct.ipsec.spd import AddressRange, Selectors

    sel = Selectors((AddressRange.parse("10.77.0.0/24"),), (AddressRange.parse("10.78.0.1"),))
    sa = SecurityAssociation(SPI_DOWN, Direction.OUTBOUND, ip("127.0.0.1"), ip("127.0.0.9"),
                             enc_key=bytes(16) + b"\x00\x00\x00\x09", esn=True,
                             selectors=sel)  # fmt: skip
    f = topo.dir / "copy.json"
    f.write_text(json.dumps(context.to_json(sa, 0.0)))
    r = ipsecct("sa", "add", str(f), "-s", topo.sg.sock)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and f"outbound SPI 0x{SPI_DOWN:08x} is already in" in r.stderr
    assert topo.sg.counters()["outbound_spi_refused"] == 1
    outs = [s for s in json.loads(ok("sa", "list", "--json", "-s", topo.sg.sock))
            if s["spi"] == f"0x{SPI_DOWN:08x}"]  # fmt: skip
    assert [s["dst"] for s in outs] == ["127.0.0.1"], outs


def test_no_seq_sent_twice_sa_add_of_a_key_an_sa_here_has_is_refused_in_one_line(
    topo: Topo,
) -> None:
    """INVARIANT. ``sa add`` of an outbound SA under the gateway's inbound AES-GCM key (the
    peer's side of a key file), or of an inbound SA under its outbound key, was installed:
    the gateway and its peer would both send sequence numbers 1, 2, ... under one key and
    salt, every nonce twice. So was an outbound SA under the key of an outbound SA here (a
    key file given twice): the gateway would send them twice itself. Config load refuses or
    keeps such tunnels from sending; ``sa add`` now refuses them, in one line naming the
    other SA and never the key (nor in the log); nothing is installed. Another key is still
    added. (An inbound SA under an inbound SA's key is still added: one peer's SA to two of
    our addresses.)"""
    from ipsecct.ct import context
    from ipsecct.ipsec.sad import Direction, SecurityAssociation
    from ipsecct.ipsec.spd import AddressRange, Selectors

    sel = Selectors((AddressRange.parse("10.77.0.0/24"),), (AddressRange.parse("10.78.0.1"),))
    down = bytes.fromhex("22222222222222222222222222222222feed0002")  # sg1-mn.keys out_enc
    cases = [
        (SecurityAssociation(0x5151, Direction.OUTBOUND, ip("127.0.0.1"), ip("127.0.0.9"),
                             enc_key=KEY_UP, esn=True, selectors=sel), SPI_UP, "inbound"),
        (SecurityAssociation(0x5252, Direction.INBOUND, ip("127.0.0.9"), ip("127.0.0.1"),
                             enc_key=down, esn=True), SPI_DOWN, "outbound"),
        (SecurityAssociation(0x5353, Direction.OUTBOUND, ip("127.0.0.1"), ip("127.0.0.9"),
                             enc_key=down, esn=True, selectors=sel), SPI_DOWN, "outbound"),
    ]  # fmt: skip
    f = topo.dir / "both-ways.json"
    for sa, other, way in cases:
        f.write_text(json.dumps(context.to_json(sa, 0.0)))
        r = ipsecct("sa", "add", str(f), "-s", topo.sg.sock)
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r
        assert r.stderr.count("\n") == 1, r
        assert f"AEAD key is the key of {way} SA 0x{other:08x}" in r.stderr, r
        assert f"0x{sa.spi:08x}" not in ok("sa", "list", "-s", topo.sg.sock)  # not installed
        for shown in (r.stderr, topo.sg.logtext()):
            for k in (sa.enc_key.hex(), sa.enc_key.hex().upper(), sa.enc_key[:16].hex()):
                assert k not in shown
    until(lambda: topo.sg.logtext().count("event=sa-add-refused") == 3, "the refusals logged")
    # another key, the same SPI: added
    sa = SecurityAssociation(0x5151, Direction.OUTBOUND, ip("127.0.0.1"), ip("127.0.0.9"),
                             enc_key=bytes(16) + b"\x00\x00\x00\x07", esn=True,
                             selectors=sel)  # fmt: skip
    f.write_text(json.dumps(context.to_json(sa, 0.0)))
    assert "0x00005151" in ok("sa", "add", str(f), "-s", topo.sg.sock)


def test_sa_add_of_an_inbound_sa_to_an_address_not_ours_warns_in_one_line(topo: Topo) -> None:
    """``sa add`` of examples/contexts/esp-aes-gcm-esn-tunnel.json (an inbound SA to
    203.0.113.1) installed it on a gateway at 127.0.0.1 without a word. It is still added
    (the kernel takes any daddr; the engine finds an inbound SA by its SPI alone, as after a
    take-over), but one warning line names the address and the gateway's, and the daemon
    logs it; an SA to the gateway's own address says nothing."""
    example = ROOT / "examples" / "contexts" / "esp-aes-gcm-esn-tunnel.json"
    ctx = json.loads(example.read_text())
    assert ctx["direction"] == "in" and ctx["dst"] == "203.0.113.1"
    r = ipsecct("sa", "add", str(example), "--json", "-s", topo.sg.sock)
    assert r.returncode == 0, r
    (added,) = json.loads(r.stdout)
    assert added["spi"] == "0xc0ffee01" and "203.0.113.1" in added["warning"]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipsecct: warning: SA 0xc0ffee01: "), r
    assert "destination 203.0.113.1 is none of this gateway's addresses (127.0.0.1)" in lines[0]
    assert "0xc0ffee01" in ok("sa", "show", "0xc0ffee01", "-s", topo.sg.sock)  # added
    until(lambda: "event=sa-added-dst-not-ours" in topo.sg.logtext(), "the warning logged")
    assert "dst=203.0.113.1" in topo.sg.logtext()
    # the same SA to this gateway's outer address: no warning
    f = topo.dir / "ours.json"
    f.write_text(json.dumps({**ctx, "spi": "0xc0ffee02", "dst": "127.0.0.1"}))
    r = ipsecct("sa", "add", str(f), "-s", topo.sg.sock)
    assert r.returncode == 0 and r.stderr == "", r
    assert "0xc0ffee02" in r.stdout


def test_spis_in_decimal_and_hex(topo: Topo) -> None:
    """Every command that takes an SPI takes it in decimal and in 0x... hex (either case);
    text of decimal digits that names no SA is answered with how it was read, since
    swanctl prints SPIs in hex without 0x; a negative or over-32-bit SPI sent straight to
    the control socket is refused by name, not looked up as "0x-0000001"."""
    from ipsecct.gateway.control import request

    for text in (str(SPI_UP), hex(SPI_UP), hex(SPI_UP).upper().replace("0X", "0x"), "0X10000001",
                 f"{SPI_UP:08x}_i"):  # (as swanctl --list-sas prints it)
        (shown,) = json.loads(ok("sa", "show", text, "--json", "-s", topo.sg.sock))
        assert shown["spi"] == f"0x{SPI_UP:08x}", text
    assert "set to 700" in ok("pmtu", "set", str(SPI_UP), "700", "-s", topo.mn.sock)
    (shown,) = json.loads(ok("sa", "show", hex(SPI_UP), "--json", "-s", topo.mn.sock))
    assert shown["path_mtu"] == 700
    # "10000001" copied from swanctl's "10000001_i" is decimal 10000001 = 0x00989681
    r = ipsecct("sa", "show", "10000001", "-s", topo.sg.sock)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "0x00989681" in r.stderr and "for hex write 0x10000001" in r.stderr
    r = ipsecct("pmtu", "set", "10000001", "700", "-s", topo.mn.sock)
    assert r.returncode == 2 and "for hex write 0x10000001" in r.stderr
    for bad in ("-1", str(2**40), "0x1ffffffff", "c0ffee01", "00010", "0o17", "1_000"):
        r = ipsecct("sa", "delete", bad, "-s", topo.sg.sock)
        assert r.returncode == 2 and r.stderr.count("\n") <= 2 and "bad SPI" in r.stderr, bad
        assert "Traceback" not in r.stderr
    for bad_arg in (-1, 2**40, "-1", "0x1ffffffff", True, None, "x"):
        for cmd in ("sa.show", "sa.delete", "pmtu.set"):
            with pytest.raises(Exception, match="bad SPI") as exc:
                request(topo.sg.sock, cmd, {"spi": bad_arg, "mtu": 1280})
            assert "0x-" not in str(exc.value)
    # nothing was deleted on the way, and decimal deletes
    assert json.loads(ok("sa", "delete", str(SPI_UP), "--json", "-s", topo.sg.sock)) == [
        f"0x{SPI_UP:08x}"
    ]
    assert json.loads(ok("sa", "list", "--json", "-s", topo.sg.sock)) == []


def test_sa_list_on_a_node_without_ike_logs_no_refusal(topo: Topo) -> None:
    """``sa list`` asks for IKE SAs too; a node without [connections] answers that it runs no
    IKEv2 instead of logging a refused request (a warning) each time an operator looks."""
    for _ in range(2):
        assert f"0x{SPI_UP:08x}" in ok("sa", "list", "-s", topo.sg.sock)
    r = ipsecct("sa", "list", "--ike", "-s", topo.sg.sock)
    assert r.returncode == 2 and "runs no IKEv2" in r.stderr
    assert "control-request-refused" not in topo.sg.logtext()


# -- ipsecct bench gateway --------------------------------------------------------------------


def _check_bench_json(stdout: str) -> None:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    obj = json.loads(lines[0])
    assert list(obj) == ["results"]
    seen = set()
    for r in obj["results"]:
        assert list(r) == ["impl", "size", "pps"]
        assert r["impl"] in ("ipsecct", "plain-relay")
        assert r["size"] in (64, 1400)
        # a 0.1 s round on a loaded machine may forward nothing for one case (0.0)
        assert isinstance(r["pps"], float) and math.isfinite(r["pps"]) and r["pps"] >= 0.0
        seen.add((r["impl"], r["size"]))
    assert seen == {(i, s) for i in ("ipsecct", "plain-relay") for s in (64, 1400)}
    assert sum(r["pps"] for r in obj["results"]) > 0  # something was measured


def test_bench_gateway_json_schema() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct.bench.gateway", "--json", "--time", "0.1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    _check_bench_json(r.stdout)


def test_bench_gateway_subcommand() -> None:
    from ipsecct.commands.bench import BENCHES

    assert BENCHES["gateway"] == "ipsecct.bench.gateway"
    r = ipsecct(
        "bench", "gateway", "--json", "--time", "0.1", "--rounds", "1", "--size", "64", timeout=180
    )
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert {(x["impl"], x["size"]) for x in obj["results"]} == {
        ("ipsecct", 64),
        ("plain-relay", 64),
    }
    bad = ipsecct("bench", "gateway", "--time", "0")
    assert bad.returncode == 2 and "positive" in bad.stderr


@pytest.mark.parametrize(
    ("key", "proto"),
    [("outer.address, outer.port", socket.SOCK_DGRAM), ("inner.listen", socket.SOCK_DGRAM),
     ("ike.port", socket.SOCK_DGRAM), ("control.metrics", socket.SOCK_STREAM),
     ("transfer.listen", socket.SOCK_STREAM)],
)  # fmt: skip
def test_gateway_run_with_a_listening_address_taken_names_its_key(
    tmp_path: Path, key: str, proto: int
) -> None:
    """A gateway whose metrics or CXTP port was taken said ``error while attempting to bind on
    address ('127.0.0.1', 9471): address already in use`` (asyncio's, a Python tuple), and
    whose outer, inner or IKE port was taken ``Address already in use: UDP 127.0.0.1:N``: with
    ``[ike] port`` the outer port of another gateway, which one? Now one line, status 2,
    naming the address and the configuration key, as for UDP and TCP alike."""
    import datetime as dt

    from ipsecct.tools import pki

    pki.init_pki(tmp_path / "pki", ["sg1"], dt.datetime.now(dt.UTC))
    ports = {"outer.address, outer.port": free_udp_port(), "inner.listen": free_udp_port(),
             "ike.port": free_udp_port(), "control.metrics": free_tcp_port(),
             "transfer.listen": free_tcp_port()}  # fmt: skip
    text = node_toml("sg1", ports["outer.address, outer.port"], ports["inner.listen"],
                     free_udp_port(), str(tmp_path / "sg1.sock"), [],
                     metrics=ports["control.metrics"])  # fmt: skip
    (tmp_path / "psk").write_text("0x" + "ab" * 32 + "\n")
    os.chmod(tmp_path / "psk", 0o600)
    text += f"""[ike]
port = {ports["ike.port"]}
[connections.rw]
local_addrs = ["127.0.0.1"]
remote_addrs = ["%any"]
local.auth = "psk"
local.id = "gw.example"
remote.auth = "psk"
remote.id = "%any"
children.net.local_ts = ["10.2.0.0/24"]
children.net.remote_ts = ["10.1.0.0/16"]
[secrets.ike-rw]
id = ["gw.example"]
file = "psk"
[transfer]
listen = "127.0.0.1:{ports["transfer.listen"]}"
cert = "pki/sg1.pem"
key = "pki/sg1.key"
ca = "pki/ca.pem"
[state]
dir = "state"
"""
    conf = tmp_path / "sg1.toml"
    conf.write_text(text)
    with socket.socket(socket.AF_INET, proto) as taken:
        taken.bind(("127.0.0.1", ports[key]))
        if proto == socket.SOCK_STREAM:
            taken.listen()
        r = ipsecct("gateway", "run", "-c", str(conf), timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.endswith(f"ipsecct: error: Address already in use: "
                             f"{'UDP' if proto == socket.SOCK_DGRAM else 'TCP'} "
                             f"127.0.0.1:{ports[key]} ({key})\n"), r.stderr  # fmt: skip
    assert "Traceback" not in r.stderr
    # nor is its control socket left behind (bound before IKE, metrics and CXTP: status
    # then said "Connection refused (is the daemon running?)" at a socket of nobody's)
    assert not (tmp_path / "sg1.sock").exists()


def test_a_port_in_use_is_named() -> None:
    """A gateway whose outer or inner UDP address was taken said only "ipsecct: error:
    Address already in use": the operator could not tell which of its addresses. The CLI
    prints an OSError's file name after its reason."""
    import errno

    from ipsecct.gateway.node import UdpEndpoint

    for host in ("127.0.0.1", "::1"):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                           socket.SOCK_DGRAM) as taken:  # fmt: skip
            taken.bind((host, 0))
            port = taken.getsockname()[1]
            with pytest.raises(OSError) as ei:
                UdpEndpoint.bind((host, port), lambda data, addr: None)
        assert ei.value.errno == errno.EADDRINUSE
        assert ei.value.filename == (f"UDP [{host}]:{port}" if ":" in host else
                                     f"UDP {host}:{port}")  # fmt: skip

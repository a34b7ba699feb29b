"""A mobile node, a security gateway and an end host in three network namespaces (root).

    MN ns                          SG ns                               host ns
    ipsecct0 (TUN) 10.1.0.2/32     ipsecct0 (TUN) -> 10.1.0.2/32
    out0 192.168.10.2/24 <-veth-> out0 192.168.10.1/24
                                   in0 10.2.0.254/24      <-veth->   eth0 10.2.0.1/24

``ipsecct node run`` in the MN namespace and ``ipsecct gateway run`` in the SG namespace carry
the MN's traffic to 10.2.0.0/24 in ESP in UDP port 4500 over the outer veth; the SG forwards it
to the host. ``ping`` and a UDP stream go from the MN's inner address to the host, a capture on
the SG's outer veth is decrypted by tshark with the lines ``ipsecct sa export --wireshark``
printed, and by ``ipsecct pcap decrypt``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon
from tests.helpers.netns import Namespaces, have_root, leftover_namespaces, stop_process, wait_until
from tests.helpers.strongswan import ping

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

MN_OUTER, SG_OUTER = "192.168.10.2", "192.168.10.1"
MN_INNER, HOST = "10.1.0.2", "10.2.0.1"
SPI_UP, SPI_DOWN = 0x0A000001, 0x0B000001
STREAM = 100


def toml_tunnel(**kv: object) -> str:
    return "[[tunnel]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items())


def write_keys(path: Path, in_key: bytes, out_key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'in_enc = "{in_key.hex()}"\nout_enc = "{out_key.hex()}"\n')


@dataclass
class World:
    ns: Namespaces
    dir: Path
    mn: Daemon
    sg: Daemon


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    if shutil.which("ip") is None:
        pytest.fail("iproute2 (ip) is not installed")
    sdir = Path(tempfile.mkdtemp(prefix="ipsecct-n-", dir="/tmp"))
    k_up, k_down = os.urandom(20), os.urandom(20)
    write_keys(tmp_path / "mn.keys", in_key=k_down, out_key=k_up)
    write_keys(tmp_path / "sg.keys", in_key=k_up, out_key=k_down)
    common = {"enc": "aes-gcm-16", "esn": False, "replay_window": 256}
    (tmp_path / "mn.toml").write_text(
        f"""name = "mn"
[outer]
address = "{MN_OUTER}"
port = 4500
[inner]
kind = "tun"
name = "ipsecct0"
addresses = ["{MN_INNER}/32"]
mtu = 1400
routes = ["10.2.0.0/24"]
[control]
socket = "{sdir / "mn.sock"}"
[log]
level = "debug"
"""
        + toml_tunnel(
            name="mn-sg",
            local_ts=f"{MN_INNER}/32",
            remote_ts="10.2.0.0/24",
            peer=f"{SG_OUTER}:4500",
            spi_out=SPI_UP,
            spi_in=SPI_DOWN,
            keys="mn.keys",
            **common,
        )
    )
    (tmp_path / "sg.toml").write_text(
        f"""name = "sg"
[outer]
address = "{SG_OUTER}"
port = 4500
[inner]
kind = "tun"
name = "ipsecct0"
addresses = []
mtu = 1400
routes = ["{MN_INNER}/32"]
[control]
socket = "{sdir / "sg.sock"}"
[log]
level = "debug"
"""
        + toml_tunnel(
            name="sg-mn",
            local_ts="10.2.0.0/24",
            remote_ts=f"{MN_INNER}/32",
            peer=f"{MN_OUTER}:4500",
            spi_out=SPI_DOWN,
            spi_in=SPI_UP,
            keys="sg.keys",
            **common,
        )
    )
    with Namespaces("mn", "sg", "host") as ns:
        ns.veth("mn", "out0", f"{MN_OUTER}/24", "sg", "out0", f"{SG_OUTER}/24")
        ns.veth("sg", "in0", "10.2.0.254/24", "host", "eth0", f"{HOST}/24")
        ns.route("host", "default", "via", "10.2.0.254")
        ns.sysctl("sg", "net.ipv4.ip_forward=1")
        mn = Daemon(
            "node",
            tmp_path / "mn.toml",
            str(sdir / "mn.sock"),
            tmp_path / "mn.log",
            prefix=ns.cmd("mn"),
        )
        sg = Daemon(
            "gateway",
            tmp_path / "sg.toml",
            str(sdir / "sg.sock"),
            tmp_path / "sg.log",
            prefix=ns.cmd("sg"),
        )
        try:
            sg.start()
            mn.start()
            yield World(ns, tmp_path, mn, sg)
        finally:
            for d in (mn, sg):
                d.cleanup()
            shutil.rmtree(sdir, ignore_errors=True)


def ipsecct(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000))
s.settimeout(15)
print("ready", flush=True)
got = set()
try:
    while len(got) < int(sys.argv[1]):
        data, addr = s.recvfrom(2048)
        if addr[0] == sys.argv[2]:
            got.add(int.from_bytes(data[:4], "big"))
except TimeoutError:
    pass
print(len(got), flush=True)
"""

SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for i in range(int(sys.argv[3])):
    s.sendto(i.to_bytes(4, "big") + bytes(200), (sys.argv[2], 9000))
    time.sleep(0.002)
"""


def test_ping_udp_stream_and_tshark_decrypts_the_capture(world: World) -> None:
    ns, d = world.ns, world.dir
    assert shutil.which("tcpdump") and shutil.which("tshark"), "tcpdump and tshark are needed"
    # the TUN devices exist, are up, and have the configured address and routes
    link = ns.run("mn", "ip", "-o", "addr", "show", "dev", "ipsecct0").stdout
    assert f"{MN_INNER}/32" in link
    assert "10.2.0.0/24 dev ipsecct0" in ns.run("mn", "ip", "route").stdout
    assert f"{MN_INNER} dev ipsecct0" in ns.run("sg", "ip", "route").stdout

    cap = d / "outer.pcap"
    err = open(d / "tcpdump.err", "w")  # noqa: SIM115 -- closed below
    dump = ns.popen(
        "sg",
        "tcpdump",
        "-n",
        "-U",
        "--immediate-mode",
        "-Z",
        "root",
        "-i",
        "out0",
        "-w",
        str(cap),
        "udp port 4500",
        stderr=err,
    )
    wait_until(lambda: "listening on" in (d / "tcpdump.err").read_text(), "tcpdump to listen")

    # every reply waited for (iputils' ping -c 3 -W 5 could count a late one as lost)
    assert ping(ns, "mn", HOST, 3, src=MN_INNER) == 3, (world.mn.logtext(), world.sg.logtext())

    rx = ns.popen(
        "host", sys.executable, "-c", RECEIVER, str(STREAM), MN_INNER, stdout=subprocess.PIPE
    )
    assert rx.stdout is not None
    assert rx.stdout.readline().strip() == b"ready"
    ns.run("mn", sys.executable, "-c", SENDER, MN_INNER, HOST, str(STREAM), timeout=60)
    out, _ = rx.communicate(timeout=30)
    assert int(out.split()[-1]) == STREAM

    stop_process(dump, signal.SIGINT)
    err.close()

    mn_c = world.mn.counters()
    sg_c = world.sg.counters()
    assert mn_c["out_packets"] == 3 + STREAM and mn_c["in_packets"] == 3
    assert sg_c["in_packets"] == 3 + STREAM and sg_c["out_packets"] == 3
    assert not any(sg_c["drops"].values()), sg_c

    lines = ipsecct("sa", "export", "--wireshark", "-s", world.sg.sock).splitlines()
    assert len(lines) == 2
    opts = ["-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE"]
    for line in lines:
        opts += ["-o", f"uat:esp_sa:{line}"]
    r = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(cap),
            *opts,
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "esp.spi",
            "-e",
            "esp.icv_good",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "icmp.type",
            "-e",
            "udp.dstport",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 6 + STREAM, r.stdout[:2000]
    spis = {int(row[0], 16) for row in rows}
    assert spis == {SPI_UP, SPI_DOWN}
    assert all(row[1] in ("1", "True") for row in rows), rows[:5]
    # ip.src/ip.dst list the outer and the inner header: the inner ones are the MN and the host
    echo = [row for row in rows if row[4] == "8"]
    reply = [row for row in rows if row[4] == "0"]
    assert len(echo) == 3 and len(reply) == 3
    assert all(row[2].split(",")[-1] == MN_INNER and row[3].split(",")[-1] == HOST for row in echo)
    assert all(row[2].split(",")[-1] == HOST for row in reply)
    assert sum(1 for row in rows if "9000" in row[5].split(",")) == STREAM

    # ipsecct's own decrypter agrees
    keys = d / "sa.keys"
    keys.write_text("\n".join(lines) + "\n")
    dec = d / "inner.pcap"
    pr = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipsecct",
            "pcap",
            "decrypt",
            "--keys",
            str(keys),
            str(cap),
            str(dec),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pr.returncode == 0, pr.stderr
    t = subprocess.run(
        ["tshark", "-n", "-r", str(dec), "-T", "fields", "-e", "ip.src"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    srcs = t.stdout.split()
    assert srcs.count(MN_INNER) == 3 + STREAM and srcs.count(HOST) == 3


def test_sigterm_removes_tun_and_socket(world: World) -> None:
    assert world.mn.terminate() == 0
    assert not os.path.exists(world.mn.sock)
    r = world.ns.run("mn", "ip", "link", "show", "ipsecct0", check=False)
    assert r.returncode != 0  # a non-persistent TUN device goes with its process
    world.mn.start()  # restart with the same configuration: the device comes back
    assert "ipsecct0" in world.ns.run("mn", "ip", "link", "show", "ipsecct0").stdout
    ping = world.ns.run(
        "mn", "ping", "-c", "1", "-W", "5", "-I", MN_INNER, HOST, check=False, timeout=30
    )
    # the restarted MN starts its sequence numbers at 1 again; the SG's window never saw this
    # SA's packets in this test, so the ping goes through
    assert ping.returncode == 0, ping.stdout


def test_namespaces_are_cleaned_up_even_on_error() -> None:
    if not have_root():
        pytest.skip("needs root")
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Namespaces("a", "b") as ns:
        names = list(ns.names.values())
        ns.veth("a", "v0", "192.168.77.1/24", "b", "v0", "192.168.77.2/24")
        p = ns.popen("a", "sleep", "60")
        assert ns.run("a", "ping", "-c", "1", "-W", "5", "192.168.77.2").returncode == 0
        raise RuntimeError("boom")
    assert p.poll() is not None
    assert leftover_namespaces(names) == []
    other = Namespaces("a")
    assert other.names["a"] != names[0]  # unique per instance

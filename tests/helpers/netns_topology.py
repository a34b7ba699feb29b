"""A handover topology in network namespaces (root): a mobile node, two security gateways and
an end host, joined by two Linux bridges, with real ``ipsecct`` processes and TUN devices.

::

    MN ns                       "br" ns                      SG1 ns / SG2 ns          HOST ns
    ipsecct0 (TUN) 10.1.0.2/32
    acc0 192.168.20.10/24 ---- bridge "acc" ---- acc0 192.168.20.1/24 (SG1)
                                              \\-- acc0 192.168.20.2/24 (SG2)
                                                  [VIP 192.168.20.100 on the owner's acc0]
                               bridge "core" ---- core0 10.2.0.251/24 (SG1)
                                              \\-- core0 10.2.0.252/24 (SG2)
                                              \\-- eth0 10.2.0.1/24 ---------------- (HOST)

The access bridge puts the MN and both gateways on one L2 segment, so ARP and the move of the
virtual gateway address (indirect SG identity, with its gratuitous ARP) really happen. Each
gateway's inner side is a TUN device with a route to the MN's inner address; the gateways
forward (``ip_forward=1``) between it and the core bridge, where the host is, but not what
arrives on the access side (a security gateway routes no cleartext from the access network;
``access_forwarding=True`` turns that on). The host routes the MN's inner prefix via the
gateway that serves the MN: after a transfer the test moves that route
(:meth:`HandoverWorld.route_host_via`), the routing update a real access network makes when a
mobile node's gateway changes (what still reaches the old gateway meanwhile is
forwarded to the new one for ``forward_ms``).

The gateways talk CXTP over TLS 1.3 on the core link, with certificates from
``ipsecct pki init``. All names carry the run's random suffix
(:class:`tests.helpers.netns.Namespaces`); deleting the namespaces removes every device,
bridge and address, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.control import ask
from tests.helpers.daemon import Daemon
from tests.helpers.netns import Namespaces, stop_process, wait_until
from tests.helpers.strongswan import Pinger, PingResult

MN_OUTER = "192.168.20.10"
SG_OUTER = {"sg1": "192.168.20.1", "sg2": "192.168.20.2"}
VIP = "192.168.20.100"
SG_CORE = {"sg1": "10.2.0.251", "sg2": "10.2.0.252"}
MN_INNER = "10.1.0.2"
MN_PREFIX = "10.1.0.0/24"
HOST = "10.2.0.1"
HOST_NET = "10.2.0.0/24"
SPI_UP = 0x0A000001  # MN -> gateway (the gateways' inbound SA)
SPI_DOWN = 0x0B000001  # gateway -> MN
XFER_PORT = 5091
ACCESS_IF = "acc0"
CORE_IF = "core0"
FORWARD_MS = 5000  # longer than the host's route update takes, even on a slow machine


def _toml_value(v: object) -> str:
    return json.dumps(v)


def _section(header: str, kv: dict[str, object]) -> str:
    return header + "\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in kv.items())


def write_keys(path: Path, in_key: bytes, out_key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'in_enc = "{in_key.hex()}"\nout_enc = "{out_key.hex()}"\n')


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", *args], capture_output=True, text=True, timeout=timeout
    )


def cli_json(*args: str) -> Any:
    r = cli(*args, "--json")
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return json.loads(r.stdout)


@dataclass
class HandoverWorld:
    """The namespaces, the three daemons and the files of one run."""

    ns: Namespaces
    dir: Path
    sockdir: Path
    identity: str  # "direct" or "indirect"
    access_forwarding: bool = False  # the gateways IP-forward what arrives on the access side
    daemons: dict[str, Daemon] = field(default_factory=dict)

    # -- building ------------------------------------------------------------------------
    def build_links(self) -> None:
        ns = self.ns
        for br in ("acc", "core"):
            ns.run("br", "ip", "link", "add", br, "type", "bridge", "forward_delay", "0")
            ns.run("br", "ip", "link", "set", br, "up")

        def port(role: str, dev: str, addr: str, br: str) -> None:
            peer = f"{role}-{br}"
            ns.veth(role, dev, addr, "br", peer, None)
            ns.run("br", "ip", "link", "set", peer, "master", br)

        port("mn", ACCESS_IF, f"{MN_OUTER}/24", "acc")
        for g in ("sg1", "sg2"):
            port(g, ACCESS_IF, f"{SG_OUTER[g]}/24", "acc")
            port(g, CORE_IF, f"{SG_CORE[g]}/24", "core")
            ns.sysctl(g, "net.ipv4.ip_forward=1")  # between the TUN device and the core
            if not self.access_forwarding:
                # A security gateway routes no cleartext arriving from the access network:
                # what reaches it there is ESP for itself or nothing.
                ns.sysctl(g, f"net.ipv4.conf.{ACCESS_IF}.forwarding=0")
        port("host", "eth0", f"{HOST}/24", "core")
        self.route_host_via("sg1")

    def write_configs(self) -> None:
        d = self.dir
        r = cli("pki", "init", "--dir", str(d / "pki"), "--gateways", "sg1,sg2")
        assert r.returncode == 0, r.stderr
        k_up, k_down = os.urandom(20), os.urandom(20)  # AES-GCM-16: 16-octet key + salt
        write_keys(d / "mn.keys", in_key=k_down, out_key=k_up)
        write_keys(d / "sg1.keys", in_key=k_up, out_key=k_down)
        common: dict[str, object] = {"enc": "aes-gcm-16", "esn": True, "replay_window": 1024}
        gw_peer = VIP if self.identity == "indirect" else SG_OUTER["sg1"]
        (d / "mn.toml").write_text(
            _section('name = "mn"\n[outer]', {"address": MN_OUTER, "port": 4500})
            + _section(
                "[inner]",
                {
                    "kind": "tun",
                    "name": "ipsecct0",
                    "addresses": [f"{MN_INNER}/32"],
                    "mtu": 1400,
                    "routes": [HOST_NET],
                },
            )
            + _section("[control]", {"socket": self.sock("mn")})
            + _section("[log]", {"level": "debug"})
            + _section(
                "[[tunnel]]",
                {
                    "name": "mn-home",
                    "local_ts": f"{MN_INNER}/32",
                    "remote_ts": HOST_NET,
                    "peer": f"{gw_peer}:4500",
                    "spi_out": SPI_UP,
                    "spi_in": SPI_DOWN,
                    "keys": "mn.keys",
                    **common,
                },
            )
        )
        for g, other in (("sg1", "sg2"), ("sg2", "sg1")):
            outer: dict[str, object] = {"address": SG_OUTER[g], "port": 4500}
            if self.identity == "indirect":
                outer |= {
                    "virtual": VIP,
                    "virtual_interface": ACCESS_IF,
                    "virtual_owner": g == "sg1",
                }
            text = (
                _section(f'name = "{g}"\n[outer]', outer)
                + _section(
                    "[inner]",
                    {
                        "kind": "tun",
                        "name": "ipsecct0",
                        "addresses": [],
                        "mtu": 1400,
                        "routes": [f"{MN_INNER}/32"],
                    },
                )
                + _section("[control]", {"socket": self.sock(g)})
                + _section("[log]", {"level": "debug"})
                + _section(
                    "[transfer]",
                    {
                        "listen": f"{SG_CORE[g]}:{XFER_PORT}",
                        "cert": f"pki/{g}.pem",
                        "key": f"pki/{g}.key",
                        "ca": "pki/ca.pem",
                        "conflict": "reassign",
                        "identity": self.identity,
                        # (a transfer here waits for both ends' durable writes: 1 s was
                        # tight on a loaded machine; under the control socket's 5 s wait)
                        "max_transfer_ms": 4000,
                        "forward_ms": FORWARD_MS,
                        # what a peer may hand over (sg2 has no tunnel to take it from)
                        "accept_local_ts": HOST_NET,
                        "accept_remote_ts": f"{MN_INNER}/32",
                    },
                )
                + _section(
                    "[[peers]]",
                    {
                        "name": other,
                        "address": f"{SG_CORE[other]}:{XFER_PORT}",
                        "outer": SG_OUTER[other],
                        "allow": ["send", "request"],
                    },
                )
            )
            if g == "sg1":  # sg1 serves the MN first; sg2 starts with no tunnel at all
                text += _section(
                    "[[tunnel]]",
                    {
                        "name": "mn1",
                        "local_ts": HOST_NET,
                        "remote_ts": f"{MN_INNER}/32",
                        "peer": f"{MN_OUTER}:4500",
                        "spi_in": SPI_UP,
                        "spi_out": SPI_DOWN,
                        "keys": "sg1.keys",
                        **common,
                    },
                )
            (d / f"{g}.toml").write_text(text)

    def start(self) -> None:
        for name in ("sg1", "sg2", "mn"):
            d = Daemon(
                "node" if name == "mn" else "gateway",
                self.dir / f"{name}.toml",
                self.sock(name),
                self.dir / f"{name}.log",
                prefix=self.ns.cmd(name),
            )
            self.daemons[name] = d
            d.start()
        # Neighbours on both links learn each other before the traffic starts, as in any
        # network that has been up for a while (each ping also teaches the other side).
        for g in ("sg1", "sg2"):
            self.ns.run("host", "ping", "-c1", "-W2", SG_CORE[g])
            self.ns.run("mn", "ping", "-c1", "-W2", SG_OUTER[g])

    def stop(self) -> None:
        for d in self.daemons.values():
            d.cleanup()

    # -- operating -----------------------------------------------------------------------
    def sock(self, name: str) -> str:
        return str(self.sockdir / f"{name}.sock")

    def log(self, name: str) -> str:
        return self.daemons[name].logtext()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)}" for n in self.daemons)

    def status(self, name: str) -> dict[str, Any]:
        """``ipsecct status --json``, asked from this process (helpers/control)."""
        out: dict[str, Any] = ask(self.sock(name), "status")
        return out

    def sa_list(self, name: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = ask(self.sock(name), "sa.list")
        return out

    def transfer(self, to: str = "sg2", src: str = "sg1") -> dict[str, Any]:
        r = cli("transfer", f"0x{SPI_DOWN:08x}", "--to", to, "--json", "-s", self.sock(src))
        assert r.returncode == 0, (r.stdout, r.stderr, self.logs())
        rec: dict[str, Any] = json.loads(r.stdout)
        return rec

    def route_host_via(self, gw: str) -> None:
        """The access network's routing update: the MN's prefix is now behind ``gw``."""
        self.ns.route("host", MN_PREFIX, "via", SG_CORE[gw])

    def mac(self, role: str, dev: str = ACCESS_IF) -> str:
        out = self.ns.run(role, "cat", f"/sys/class/net/{dev}/address").stdout
        return out.strip().lower()

    def addresses(self, role: str, dev: str = ACCESS_IF) -> list[str]:
        out = self.ns.run(role, "ip", "-o", "-4", "addr", "show", "dev", dev).stdout
        return re.findall(r"inet (\S+)", out)

    def capture(self, role: str, name: str, bpf: str, dev: str = ACCESS_IF) -> Capture:
        """Start tcpdump on ``dev`` in ``role``'s namespace; it is listening on return."""
        pcap, err_path = self.dir / f"{name}.pcap", self.dir / f"{name}.err"
        with open(err_path, "w") as err:
            p = self.ns.popen(
                role,
                "tcpdump",
                "-n",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                dev,
                "-w",
                str(pcap),
                bpf,
                stderr=err,
            )
        wait_until(lambda: "listening on" in err_path.read_text(), "tcpdump to listen")
        return Capture(p, pcap)

    def neigh_mac(self, role: str, address: str, dev: str = ACCESS_IF) -> str | None:
        out = self.ns.run(role, "ip", "neigh", "show", address, "dev", dev).stdout
        m = re.search(r"lladdr ([0-9a-f:]{17})", out)
        return m.group(1).lower() if m else None


@dataclass
class Capture:
    proc: subprocess.Popen[bytes]
    pcap: Path

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)

    def esp_repeats(self) -> tuple[int, list[tuple[str, str]]]:
        """The ESP packets captured and the (SPI, sequence number) pairs among them that
        appear more than once (tshark decodes ESP in UDP 4500 after the non-ESP marker test,
        so IKE on that port is not counted)."""
        pairs = Counter((spi, seq) for spi, seq in self.fields("esp.spi", "esp.sequence")
                        if spi and seq)  # fmt: skip
        return sum(pairs.values()), [p for p, n in pairs.items() if n > 1]

    def fields(self, *names: str) -> list[list[str]]:
        """The capture's packets as rows of tshark fields."""
        args = ["tshark", "-n", "-r", str(self.pcap), "-T", "fields", "-E", "separator=|"]
        for n in names:
            args += ["-e", n]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line.split("|") for line in r.stdout.splitlines() if line.strip()]


# -- traffic ---------------------------------------------------------------------------------
# The host echoes every datagram of the stream back to its sender and, when the stream's
# sender says "end", prints what it saw: distinct sequence numbers and duplicates.
ECHO = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(60)
print("ready", flush=True)
seen, dups = set(), 0
while True:
    try:
        data, addr = s.recvfrom(4096)
    except TimeoutError:
        break
    if data == b"end":
        break
    seq = int.from_bytes(data[:4], "big")
    if seq in seen:
        dups += 1
    seen.add(seq)
    s.sendto(data, addr)
print(json.dumps({"received": len(seen), "duplicates": dups}), flush=True)
"""

# The MN sends numbered datagrams at RATE per second (paced against the clock) and counts the
# echoes. It goes on until the file MARKER exists (the test creates it once the handover is
# done), then sends AFTER more and stops (at most LIMIT in all). It prints a JSON summary: how
# many it sent, how many came back, duplicates, the longest run of sequence numbers that did
# not come back, and the longest pause between echoes (ms).
STREAM = r"""
import json, os, socket, sys, threading, time
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate, marker, after, limit = float(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.settimeout(0.2)
got, dups, times = set(), 0, []
done = threading.Event()
def rx():
    global dups
    while not done.is_set():
        try:
            data = s.recv(4096)
        except TimeoutError:
            continue
        seq = int.from_bytes(data[:4], "big")
        if seq in got:
            dups += 1
        got.add(seq)
        times.append(time.monotonic())
t = threading.Thread(target=rx)
t.start()
start = time.monotonic()
count, stop_at = 0, limit
while count < stop_at:
    delay = start + count / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    s.sendto(count.to_bytes(4, "big") + bytes(96), (dst, port))
    count += 1
    if stop_at == limit and os.path.exists(marker):
        stop_at = min(limit, count + after)
deadline = time.monotonic() + 3
while len(got) < count and time.monotonic() < deadline:
    time.sleep(0.05)
done.set()
t.join()
s.sendto(b"end", (dst, port))
missing = sorted(set(range(count)) - got)
run = best = 0
prev = None
for m in missing:
    run = run + 1 if prev is not None and m == prev + 1 else 1
    best = max(best, run)
    prev = m
gaps = [b - a for a, b in zip(times, times[1:])]
print(json.dumps({"sent": count, "echoed": len(got), "duplicates": dups,
                  "missing": missing[:50], "longest_missing_run": best,
                  "marker_seen": stop_at < limit,
                  "max_gap_ms": round(max(gaps, default=0) * 1000, 1)}), flush=True)
"""


@dataclass
class Traffic:
    """A ping and an echoed UDP stream from the MN's inner address to the host, running until
    :meth:`finish` (the stream sends ``after`` more datagrams after that)."""

    world: HandoverWorld
    ping: Pinger
    echo: subprocess.Popen[bytes]
    stream: subprocess.Popen[bytes]
    marker: Path

    @classmethod
    def start(
        cls,
        world: HandoverWorld,
        *,
        udp_rate: float,
        after: int,
        limit: int,
        ping_interval: float,
    ) -> Traffic:
        ns = world.ns
        marker = world.dir / "handover-done"
        echo = ns.popen("host", sys.executable, "-c", ECHO, "9000", stdout=subprocess.PIPE)
        assert echo.stdout is not None
        assert echo.stdout.readline().strip() == b"ready"
        stream = ns.popen(
            "mn",
            sys.executable,
            "-c",
            STREAM,
            MN_INNER,
            HOST,
            "9000",
            str(udp_rate),
            str(marker),
            str(after),
            str(limit),
            stdout=subprocess.PIPE,
        )
        ping = Pinger(ns, "mn", HOST, gap=ping_interval, src=MN_INNER)
        return cls(world, ping, echo, stream, marker)

    def finish(self, timeout: float = 60) -> tuple[dict[str, Any], dict[str, Any], PingResult]:
        """Let the stream send its last datagrams and end, then stop the ping (every reply
        waited for). Returns (MN's stream summary, host's summary, ping)."""
        self.marker.touch()
        out, _ = self.stream.communicate(timeout=timeout)
        mn = json.loads(out.decode().strip().splitlines()[-1])
        out, _ = self.echo.communicate(timeout=timeout)
        host = json.loads(out.decode().strip().splitlines()[-1])
        return mn, host, self.ping.stop()

    def stop(self) -> None:
        self.ping.kill()
        for p in (self.stream, self.echo):
            stop_process(p)


@contextlib.contextmanager
def handover_world(
    tmp: Path, identity: str, *, access_forwarding: bool = False
) -> Iterator[HandoverWorld]:
    """The whole topology with its daemons running; everything is removed on exit, also when
    building or the test fails (the namespaces, with their devices, and the daemons)."""
    if shutil.which("ip") is None or shutil.which("ping") is None:
        raise AssertionError("iproute2 (ip) and ping are needed")
    sockdir = Path(tempfile.mkdtemp(prefix="ipsecct-h-", dir="/tmp"))
    try:
        with Namespaces("mn", "sg1", "sg2", "host", "br") as ns:
            world = HandoverWorld(ns, tmp, sockdir, identity, access_forwarding)
            try:
                world.build_links()
                world.write_configs()
                world.start()
                yield world
            finally:
                world.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)

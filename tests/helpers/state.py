"""Gateways as real processes for the durable-state tests: many AEAD tunnels to one mobile-node
address that is a capture socket of the test's own (every ESP datagram any gateway sends to the
MN lands there, with its (SPI, sequence number) read off the wire), an end host that sends
traffic into the gateways' inner links, and kill -9 at the moments the test chooses."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ipsecct.errors import ControlError
from ipsecct.ipsec.ippacket import build_udp
from tests.helpers.control import answers, ask, socket_of
from tests.helpers.deployment import cli
from tests.helpers.ports import free_port
from tests.helpers.processes import stop_all

MARK = b"\0\0\0\0capture-sync "  # a non-ESP marker (RFC 3948): never counted as ESP


def remote(i: int) -> str:
    return f"10.1.{i // 200}.{i % 200 + 1}"


class Capture:
    """The MN's outer UDP socket: records (SPI, sequence number, sender) of every datagram.

    A datagram's time is when this thread read it, which on a loaded machine can be well after
    it was sent: :meth:`sync` before taking a time that separates "before" from "after"."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[int, int, int, float]] = []  # spi, seq, sender port, time
        self._marks = 0  # markers sent by sync()
        self._marked = 0  # the last marker read
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if data.startswith(MARK):
                self._marked = int(data[len(MARK):])
            elif len(data) >= 8 and data[:4] != b"\0\0\0\0":
                spi, seq = struct.unpack_from("!II", data)
                self.seen.append((spi, seq, addr[1], time.monotonic()))

    def sync(self, timeout: float = 30.0) -> None:
        """Return once every datagram that reached the socket before this call has been read
        into ``seen``: a marker of our own is sent to the socket and awaited (one socket's
        queue is read in order)."""
        self._marks += 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(MARK + str(self._marks).encode(), ("127.0.0.1", self.port))
        deadline = time.monotonic() + timeout
        while self._marked < self._marks:
            if time.monotonic() > deadline:
                raise AssertionError(f"the capture did not read its marker within {timeout} s")
            time.sleep(0.005)

    def duplicates(self) -> list[tuple[int, int]]:
        c = Counter((spi, seq) for spi, seq, _, _ in self.seen)
        return [k for k, n in c.items() if n > 1]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class Traffic:
    """The end host behind the gateways: sends packets to every tunnel's MN, round robin,
    into each gateway's inner link (only the gateway that serves a tunnel encrypts them)."""

    def __init__(self, tunnels: int, inner_ports: list[int], pps: int = 3000) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.pkts = [
            build_udp(
                ipaddress.ip_address("10.2.0.1"), ipaddress.ip_address(remote(i)), 7000, 7000,
                b"x" * 32,
            )
            for i in range(tunnels)
        ]
        self.inner_ports = inner_ports
        self.pps = pps
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        burst = 50
        while not self._stop:
            t0 = time.monotonic()
            for _ in range(burst):
                pkt = self.pkts[i % len(self.pkts)]
                i += 1
                for port in self.inner_ports:
                    with contextlib.suppress(OSError):
                        self.sock.sendto(pkt, ("127.0.0.1", port))
            time.sleep(max(0.0, burst / self.pps - (time.monotonic() - t0)))

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class Gateways:
    """Gateways named sg1, sg2, ... in ``d``, each with ``[state] dir = d/state-NAME``."""

    def __init__(self, d: Path, capture_port: int, *, tunnels: int, block: int = 64) -> None:
        self.dir = d
        self.capture_port = capture_port
        self.tunnels = tunnels
        self.block = block
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, dict[str, int]] = {}
        (d / "keys").mkdir(exist_ok=True)
        for i in range(tunnels):
            k = d / "keys" / f"t{i}.keys"
            k.write_text(f'in_enc = "{os.urandom(20).hex()}"\nout_enc = "{os.urandom(20).hex()}"\n')
            os.chmod(k, 0o600)
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the inner peer
        self.sink.bind(("127.0.0.1", 0))
        self.pki = False

    def rekey(self, i: int) -> None:
        k = self.dir / "keys" / f"t{i}.keys"
        k.write_text(f'in_enc = "{os.urandom(20).hex()}"\nout_enc = "{os.urandom(20).hex()}"\n')

    def write(
        self, name: str, *, with_tunnels: bool = True, peers: list[str] = (),  # type: ignore[assignment]
        extra: str = "", max_transfer_ms: int = 2000, transfer_extra: str = "",
        pairs: dict[str, str] | None = None,
    ) -> str:
        for n in (name, *peers):
            if n not in self.ports:
                self.ports[n] = {
                    "outer": free_port(socket.SOCK_DGRAM),
                    "inner": free_port(socket.SOCK_DGRAM),
                    "cxtp": free_port(socket.SOCK_STREAM),
                }
        p = self.ports[name]
        text = f"""name = "{name}"
[outer]
address = "127.0.0.1"
port = {p["outer"]}
[inner]
kind = "udp"
listen = "127.0.0.1:{p["inner"]}"
peer = "127.0.0.1:{self.sink.getsockname()[1]}"
[control]
socket = "{self.dir}/{name}.sock"
[state]
dir = "state-{name}"
seq_block = {self.block}
{extra}
"""
        if peers:
            if not self.pki:
                r = cli("pki", "init", "--dir", str(self.dir / "pki"), "--gateways",
                        "sg1,sg2,sg3")
                assert r.returncode == 0, r.stderr
                self.pki = True
            text += f"""[transfer]
listen = "127.0.0.1:{p["cxtp"]}"
cert = "pki/{name}.pem"
key = "pki/{name}.key"
ca = "pki/ca.pem"
identity = "direct"
max_transfer_ms = {max_transfer_ms}
retry_ms = 500
retry_max_ms = 20000
accept_local_ts = "10.2.0.0/24"
accept_remote_ts = "10.1.0.0/16"
{transfer_extra}
"""
            for peer in peers:
                q = self.ports[peer]
                text += f"""[[peers]]
name = "{peer}"
address = "127.0.0.1:{q["cxtp"]}"
allow = ["send", "request"]
"""
                if pairs and peer in pairs:  # a fail-over pair among the peers
                    text += f'pair = "{pairs[peer]}"\n'
        if with_tunnels:
            for i in range(self.tunnels):
                text += f"""[[tunnel]]
name = "t{i}"
local_ts = "10.2.0.0/24"
remote_ts = "{remote(i)}/32"
peer = "127.0.0.1:{self.capture_port}"
enc = "aes-gcm-16"
spi_in = {0x10000000 + i}
spi_out = {0x20000000 + i}
keys = "keys/t{i}.keys"
"""
        path = self.dir / f"{name}.toml"
        path.write_text(text)
        return str(path)

    def config(self, name: str) -> str:
        return str(self.dir / f"{name}.toml")

    def run(self, name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``ipsecct gateway run`` that is expected to exit (a refusal)."""
        return cli("gateway", "run", "-c", self.config(name), *args, timeout=timeout)

    def start(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "ipsecct", "gateway", "run", "-c", self.config(name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited: {self.log(name)}")
            if answers(socket_of(self.config(name))):
                return
            time.sleep(0.05)
        raise AssertionError(f"{name} did not start: {self.log(name)}")

    def kill(self, name: str) -> None:
        p = self.procs.pop(name)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")[-4000:]

    def status(self, name: str) -> dict[str, Any]:
        """``ipsecct status --json -c CONFIG``, asked from this process (helpers/control)."""
        sock = socket_of(self.config(name))
        try:
            out: dict[str, Any] = ask(sock, "status")
        except ControlError:  # once more: a gateway busy restarting on a loaded machine
            out = ask(sock, "status")
        return out

    def active_spis(self, name: str) -> set[int]:
        sas = ask(socket_of(self.config(name)), "sa.list")
        return {int(s["spi"], 16) for s in sas if s["direction"] == "out"}

    def stop(self) -> None:
        stop_all(self.procs.values())
        self.procs.clear()
        self.sink.close()


@contextlib.contextmanager
def capturing(d: Path, tunnels: int, block: int = 64) -> Iterator[Gateways]:
    """:class:`Gateways` in ``d`` whose ESP to the mobile nodes lands in a :class:`Capture` of
    their own, kept as ``capture``; afterwards the gateways stopped and the capture closed (a
    test module's ``gws`` fixture)."""
    cap = Capture()
    g = Gateways(d, cap.port, tunnels=tunnels, block=block)
    g.capture = cap  # type: ignore[attr-defined]
    try:
        yield g
    finally:
        g.stop()
        cap.close()

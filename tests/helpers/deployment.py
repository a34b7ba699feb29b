"""An ``examples/`` set-up of ipsecct processes (gateways and a mobile node) run by a test.

The example's files are copied to a temporary directory, its ports replaced by free ones and
its control sockets moved into that directory, certificates made with ``ipsecct pki init``,
and the two applications (the end host and the MN's application) bound to UDP sockets of their
own. Shared by the transfer and fail-over process tests.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipsecct.ipsec.ippacket import build_udp, parse, udp_payload
from tests.helpers.control import answers, ask, socket_of
from tests.helpers.ports import free_port
from tests.helpers.processes import stop_all

MN_INNER, HOST_INNER = "10.1.0.2", "10.2.0.1"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", *args], capture_output=True, text=True, timeout=timeout
    )


def udp_socket(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    s.settimeout(0.2)
    return s


class ExampleDeployment:
    def __init__(
        self,
        d: Path,
        example: Path,
        *,
        udp_ports: tuple[int, ...],
        tcp_ports: tuple[int, ...],
        ctl_prefix: str,
        host: tuple[str, int],
        mn_app: tuple[str, int],
        edit: Callable[[str], str] = lambda text: text,
    ) -> None:
        self.dir = d
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # (not the example's pki/ nor its state/, which a local run of the example leaves)
        shutil.copytree(
            example, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("pki", "state")
        )
        for k in (d / "keys").iterdir():
            os.chmod(k, 0o600)
        self.port = {p: free_port(socket.SOCK_DGRAM) for p in udp_ports}
        for p in tcp_ports:
            self.port[p] = free_port(socket.SOCK_STREAM)
        pat = re.compile(r"\b(" + "|".join(str(p) for p in self.port) + r")\b")
        for name in ("sg1", "sg2", "mn"):
            f = d / f"{name}.toml"
            text = pat.sub(lambda m: str(self.port[int(m.group(1))]), f.read_text())
            f.write_text(edit(text.replace(ctl_prefix, str(d / "ctl-"))))
        r = cli("pki", "init", "--dir", str(d / "pki"), "--gateways", "sg1,sg2")
        assert r.returncode == 0, r.stderr
        self.host = udp_socket(host[0], self.port[host[1]])
        self.mn_app = udp_socket(mn_app[0], self.port[mn_app[1]])

    def config(self, name: str) -> str:
        return str(self.dir / f"{name}.toml")

    def set(self, name: str, key: str, value: str) -> None:
        f = self.dir / f"{name}.toml"
        f.write_text(re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", f.read_text()))

    def start(self, name: str) -> None:
        role = "node" if name == "mn" else "gateway"
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "ipsecct", role, "run", "--config", self.config(name)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30  # a Python process starting on a loaded machine
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited: {self.log(name)}")
            if answers(socket_of(self.config(name))):
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} did not start: {self.log(name)}")

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]

    def status(self, name: str) -> dict[str, Any]:
        """``ipsecct status --json --config CONFIG``, asked from this process."""
        out: dict[str, Any] = ask(socket_of(self.config(name)), "status")
        return out

    def sas(self, name: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = ask(socket_of(self.config(name)), "sa.list")
        return out

    def wait(self, name: str, pred: Any, what: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(name)
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {st}\n{self.log(name)}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_all(self.procs.values())
        self.host.close()
        self.mn_app.close()

    def exchange(
        self, n: int, tag: int, up: bool, to: tuple[str, int], wait: float = 10.0
    ) -> int:
        """Send n packets one way through the tunnel, MN to host (``up``) or back, into the
        inner link at ``to``; return how many arrived (no retries) within ``wait`` seconds
        (they cross two processes a loaded machine may not run for a while; a test that
        expects none to arrive waits less)."""
        src, dst = (MN_INNER, HOST_INNER) if up else (HOST_INNER, MN_INNER)
        sender, receiver = (self.mn_app, self.host) if up else (self.host, self.mn_app)
        for i in range(n):
            body = bytes([tag]) + i.to_bytes(4, "big") + bytes(27)
            pkt = build_udp(ipaddress.ip_address(src), ipaddress.ip_address(dst), 7000, 7000, body)
            sender.sendto(pkt, to)
        got: set[int] = set()
        deadline = time.monotonic() + wait
        while len(got) < n and time.monotonic() < deadline:
            try:
                data = receiver.recv(65535)
            except TimeoutError:
                continue
            _, _, payload = udp_payload(data, parse(data))
            if payload[0] == tag:
                got.add(int.from_bytes(payload[1:5], "big"))
        return len(got)

"""Context transfer between real processes: ``examples/transfer`` (two ``ipsecct gateway run``
and one ``ipsecct node run``, certificates from ``ipsecct pki init``), driven with the
``ipsecct transfer`` and ``ipsecct status`` commands. The target is stopped (SIGSTOP) and then
killed (SIGKILL) in the middle of a transfer: the source must roll back and carry on.

Ports and socket paths of the example are replaced by free ones in a temporary directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipsecct.ippacket import build_udp, parse, udp_payload

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "transfer"
PORTS = (14500, 15000, 15001, 24500, 25000, 25091, 34500, 35000, 35091, 45001)
ADDR = {"mn": "127.0.3.10", "sg1": "127.0.3.1", "sg2": "127.0.3.2", "host": "127.0.3.20"}
SPI = "0x20000001"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", *args], capture_output=True, text=True, timeout=timeout
    )


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Setup:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        shutil.copytree(EXAMPLE, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("pki"))
        for k in (d / "keys").iterdir():
            os.chmod(k, 0o600)
        self.port = {p: free_port(socket.SOCK_DGRAM) for p in PORTS}
        for p in (25091, 35091):
            self.port[p] = free_port(socket.SOCK_STREAM)
        pat = re.compile(r"\b(" + "|".join(str(p) for p in PORTS) + r")\b")
        for name in ("sg1", "sg2", "mn"):
            f = d / f"{name}.toml"
            text = pat.sub(lambda m: str(self.port[int(m.group(1))]), f.read_text())
            text = text.replace("/tmp/ipsecct-xfer-", str(d / "ctl-"))
            text = text.replace('level = "info"', 'level = "debug"')
            f.write_text(text)
        r = cli("pki", "init", "--dir", str(d / "pki"), "--gateways", "sg1,sg2")
        assert r.returncode == 0, r.stderr
        self.host = self.udp(ADDR["host"], self.port[45001])
        self.mn_app = self.udp(ADDR["mn"], self.port[15001])

    @staticmethod
    def udp(host: str, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, port))
        s.settimeout(0.2)
        return s

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
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited: {self.log(name)}")
            if cli("status", "--config", self.config(name), timeout=10).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} did not start: {self.log(name)}")

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]

    def status(self, name: str) -> dict[str, Any]:
        r = cli("status", "--json", "--config", self.config(name))
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.host.close()
        self.mn_app.close()

    # -- traffic through the tunnel ---------------------------------------------------
    def _exchange(self, n: int, tag: int, up: bool, via: str) -> int:
        """Send n packets one way (no retries); return how many arrived."""
        src, dst = ("10.1.0.2", "10.2.0.1") if up else ("10.2.0.1", "10.1.0.2")
        sender = self.mn_app if up else self.host
        receiver = self.host if up else self.mn_app
        to = (ADDR["mn"], self.port[15000]) if up else (ADDR[via], self.port[inner_port(via)])
        want: set[int] = set()
        for i in range(n):
            body = bytes([tag]) + i.to_bytes(4, "big") + bytes(27)
            pkt = build_udp(ipaddress.ip_address(src), ipaddress.ip_address(dst), 7000, 7000, body)
            sender.sendto(pkt, to)
            want.add(i)
        got: set[int] = set()
        deadline = time.monotonic() + 3
        while got != want and time.monotonic() < deadline:
            try:
                data = receiver.recv(65535)
            except TimeoutError:
                continue
            _, _, payload = udp_payload(data, parse(data))
            if payload[0] == tag:
                got.add(int.from_bytes(payload[1:5], "big"))
        return len(got)

    def traffic_ok(self, via: str, tag: int, n: int = 20) -> None:
        assert self._exchange(n, tag, True, via) == n, self.log(via)
        assert self._exchange(n, tag + 1, False, via) == n, self.log(via)


def inner_port(gw: str) -> int:
    return 25000 if gw == "sg1" else 35000


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_transfer_between_processes(setup: Setup) -> None:
    for n in ("sg1", "sg2", "mn"):
        setup.start(n)
    setup.traffic_ok("sg1", 10)
    st2 = setup.status("sg2")
    assert st2["sas"] == 0
    assert st2["peers"][0]["name"] == "sg1"

    r = cli("transfer", SPI, "--to", "sg2", "--json", "--config", setup.config("sg1"))
    assert r.returncode == 0, (r.stdout, r.stderr, setup.log("sg1"))
    rec = json.loads(r.stdout)
    assert rec["outcome"] == "committed" and rec["accepted"] == 1 and rec["peer"] == "sg2"

    st1, st2 = setup.status("sg1"), setup.status("sg2")
    assert st1["sas"] == 0  # moved away: only a forwarding policy is left for a while
    assert st2["sas"] == 2
    (t1,) = [t for t in st1["transfers"]["recent"] if t["role"] == "source"]
    (t2,) = [t for t in st2["transfers"]["recent"] if t["role"] == "target"]
    assert t1["outcome"] == t2["outcome"] == "committed"
    assert t1["id"] == t2["id"]
    # The MN was told (inside the SA) to send to sg2; the host's side now goes through sg2.
    setup.traffic_ok("sg2", 20)
    mn = setup.status("mn")
    assert mn["counters"]["drops"]["replay"] == 0 and mn["counters"]["drops"]["icv"] == 0
    assert setup.status("sg2")["counters"]["drops"]["replay"] == 0

    # An unknown peer: one line on stderr, exit status 2.
    r = cli("transfer", SPI, "--to", "sg9", "--config", setup.config("sg2"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "sg9" in r.stderr


def test_target_stopped_then_killed_mid_transfer(setup: Setup) -> None:
    # A long CT_MAX_TRANSFER_TIME, so that the transfer is still waiting when the target dies.
    setup.set("sg1", "max_transfer_ms", "4000")
    for n in ("sg1", "sg2", "mn"):
        setup.start(n)
    setup.traffic_ok("sg1", 30)
    os.kill(setup.procs["sg2"].pid, signal.SIGSTOP)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ipsecct",
            "transfer",
            SPI,
            "--to",
            "sg2",
            "--json",
            "--config",
            setup.config("sg1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait until sg1 is in the middle of it (the tunnel held, the transfer in progress).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if setup.status("sg1")["transfers"]["in_progress"] == 1:
            break
        time.sleep(0.05)
    assert setup.status("sg1")["transfers"]["in_progress"] == 1
    os.kill(setup.procs["sg2"].pid, signal.SIGKILL)
    setup.procs["sg2"].wait(10)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1, (out, err)  # not committed
    rec = json.loads(out)
    assert rec["outcome"] in ("peer lost", "timeout"), rec
    st1 = setup.status("sg1")
    assert st1["sas"] == 2
    assert st1["transfers"]["in_progress"] == 0
    assert st1["transfers"]["recent"][-1]["outcome"] == rec["outcome"]
    # sg1 carries on with the same SAs: no replay, no ICV failure at either end.
    setup.traffic_ok("sg1", 40)
    assert setup.status("mn")["counters"]["drops"]["replay"] == 0
    assert setup.status("sg1")["counters"]["drops"]["replay"] == 0

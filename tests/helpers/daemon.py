"""Running ``ipsecct gateway run`` / ``ipsecct node run`` as subprocesses on loopback (the
:class:`Daemon`), their configuration files, and the ``ipsecct`` command line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipsecct.errors import ControlError
from ipsecct.gateway.control import request
from tests.helpers.ports import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = ROOT / "examples" / "gateway"
MN_INNER = "10.1.0.2"
HOST = "10.2.0.1"
SPI_UP = 0x10000001  # MN -> SG
SPI_DOWN = 0x20000001  # SG -> MN
KEY_UP = bytes.fromhex("11111111111111111111111111111111feed0001")  # examples/gateway/keys
START_TIMEOUT = 30.0  # a Python daemon starting on a loaded 2-core machine
RECV_TIMEOUT = 5.0


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def free_tcp_port() -> int:
    return free_port(socket.SOCK_STREAM)


def ipsecct(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipsecct", *args], capture_output=True, text=True, timeout=timeout
    )


def ok(*args: str) -> str:
    r = ipsecct(*args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def copy_keys(dst: Path, *names: str) -> None:
    """The example key files, mode 0600 (a git checkout cannot keep that mode)."""
    for n in names:
        shutil.copy(EXAMPLES / "keys" / n, dst / n)
        os.chmod(dst / n, 0o600)


def node_toml(
    name: str,
    outer_port: int,
    listen: int,
    peer: int,
    sock: str,
    tunnels: list[dict[str, Any]],
    *,
    metrics: int | None = None,
) -> str:
    lines = [
        f'name = "{name}"',
        "[outer]",
        'address = "127.0.0.1"',
        f"port = {outer_port}",
        "[inner]",
        'kind = "udp"',
        f'listen = "127.0.0.1:{listen}"',
        f'peer = "127.0.0.1:{peer}"',
        "[control]",
        f'socket = "{sock}"',
    ]
    if metrics is not None:
        lines.append(f'metrics = "127.0.0.1:{metrics}"')
    lines += ["[log]", 'level = "debug"']
    for t in tunnels:
        lines.append("[[tunnel]]")
        for k, v in t.items():
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


@dataclass
class Daemon:
    role: str
    config: Path
    sock: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    prefix: list[str] = field(default_factory=list)  # e.g. ip netns exec NS
    args: list[str] = field(default_factory=list)  # more options for "ROLE run"

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "ipsecct",
                    self.role,
                    "run",
                    "--config",
                    str(self.config),
                    *self.args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=logf,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.role} exited {self.proc.returncode}: {self.logtext()}")
            if os.path.exists(self.sock):
                with contextlib.suppress(ControlError):
                    request(self.sock, "status", timeout=2)
                    return
            time.sleep(0.05)
        raise AssertionError(f"{self.role} did not come up: {self.logtext()}")

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def terminate(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"{self.role} ignored signal {sig}: {self.logtext()}") from None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def status(self) -> dict[str, Any]:
        return request(self.sock, "status")  # type: ignore[no-any-return]

    def counters(self) -> dict[str, Any]:
        return self.status()["counters"]  # type: ignore[no-any-return]

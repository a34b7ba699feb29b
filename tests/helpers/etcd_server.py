"""Real etcd members on loopback for tests (Debian's etcd-server): start them on free ports in a
temporary directory, wait until they answer, stop them (and remove their data) afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.helpers.ports import free_port
from tests.helpers.processes import stop_all

_HEALTH = """import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=1) as r:
    sys.exit(0 if json.loads(r.read()).get("health") == "true" else 1)
"""


def _free_port() -> int:
    return free_port(socket.SOCK_STREAM)


class EtcdCluster:
    """``n`` etcd members forming one cluster; ``endpoints`` are their client URLs."""

    def __init__(
        self,
        d: Path,
        n: int = 1,
        *,
        also_on: str | None = None,
        host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> None:
        """``also_on``: a second loopback address every member also serves clients on (so
        that a firewall rule can cut one client's path only). ``host``: the address the
        members serve clients on, and ``prefix`` what runs them (``ip netns exec NS``: in a
        network namespace, where ``host`` is one of its addresses)."""
        self.host = host
        self.prefix = list(prefix or [])
        etcd = shutil.which("etcd")
        assert etcd, "etcd is missing: run scripts/install (Debian package etcd-server)"
        self.etcd = etcd
        self.dir = d
        self.names = [f"e{i}" for i in range(n)]
        self.client = {m: _free_port() for m in self.names}
        self.peer = {m: _free_port() for m in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.also_on = also_on

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.host}:{self.client[m]}" for m in self.names]

    def __enter__(self) -> EtcdCluster:
        initial = ",".join(f"{m}=http://127.0.0.1:{self.peer[m]}" for m in self.names)
        try:
            for m in self.names:
                log = open(self.dir / f"etcd-{m}.log", "wb")
                self.procs[m] = subprocess.Popen(
                    [
                        *self.prefix,
                        self.etcd,
                        "--name", m,
                        "--data-dir", str(self.dir / f"etcd-{m}"),
                        "--listen-client-urls", self._listen(m),
                        "--advertise-client-urls", f"http://{self.host}:{self.client[m]}",
                        "--listen-peer-urls", f"http://127.0.0.1:{self.peer[m]}",
                        "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[m]}",
                        "--initial-cluster", initial,
                        "--initial-cluster-state", "new",
                        "--heartbeat-interval", "50",
                        "--election-timeout", "500",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                log.close()
            for m in self.names:
                self.wait_healthy(m)
        except BaseException:
            self.stop()
            raise
        return self

    def _listen(self, m: str) -> str:
        urls = [f"http://{self.host}:{self.client[m]}"]
        if self.also_on:
            urls.append(f"http://{self.also_on}:{self.client[m]}")
        return ",".join(urls)

    def wait_healthy(self, m: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[m].poll() is not None:
                raise AssertionError(f"etcd {m} exited: {self.log(m)}")
            try:
                if self.prefix:  # not reachable from here: ask from its namespace
                    r = subprocess.run(
                        [*self.prefix, "python3", "-c", _HEALTH, f"http://{self.host}:"
                         f"{self.client[m]}/health"],
                        capture_output=True, timeout=10,
                    )  # fmt: skip
                    if r.returncode == 0:
                        return
                else:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.client[m]}/health", timeout=1
                    ) as r:
                        if json.loads(r.read()).get("health") == "true":
                            return
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        raise AssertionError(f"etcd {m} not healthy: {self.log(m)}")

    def log(self, m: str) -> str:
        return (self.dir / f"etcd-{m}.log").read_text(errors="replace")[-2000:]

    def kill(self, m: str) -> None:
        p = self.procs[m]
        if p.poll() is None:
            p.kill()
            p.wait(10)

    def pause(self, m: str) -> None:
        os.kill(self.procs[m].pid, signal.SIGSTOP)

    def resume(self, m: str) -> None:
        os.kill(self.procs[m].pid, signal.SIGCONT)

    def stop(self) -> None:
        stop_all(self.procs.values())
        for m in self.names:
            shutil.rmtree(self.dir / f"etcd-{m}", ignore_errors=True)

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

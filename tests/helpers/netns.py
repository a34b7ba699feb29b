"""Network namespaces for tests (root only): create them with unique names, join them with veth
pairs, run commands and processes inside them, and always clean everything up.

    with Namespaces("mn", "sg", "host") as ns:
        ns.veth("mn", "out0", "192.168.10.2/24", "sg", "out0", "192.168.10.1/24")
        ns.run("mn", "ping", "-c1", "192.168.10.1")
        p = ns.popen("sg", "tcpdump", "-i", "out0", "-w", "x.pcap")

Names carry a random suffix (``ict-<6 hex>-<role>``), so parallel runs never collide; veth
devices are created directly inside their namespaces, so their names only need to be unique
there. On exit every process started with :meth:`Namespaces.popen` is terminated (then killed)
and every namespace is deleted, which also removes its veth ends and TUN devices, whatever
happened in between.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

from tests.helpers.waiting import until

IP = "ip"


def have_root() -> bool:
    return os.geteuid() == 0


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class Namespaces:
    """A set of network namespaces, one per role, deleted on exit."""

    def __init__(self, *roles: str) -> None:
        self.uid = secrets.token_hex(3)
        self.names = {r: f"ict-{self.uid}-{r}" for r in roles}
        self.procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    def __enter__(self) -> Namespaces:
        try:
            for name in self.names.values():
                sh(IP, "netns", "add", name)
                self._created.append(name)
                sh(IP, "-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)
        self.procs.clear()
        for name in reversed(self._created):
            with contextlib.suppress(Exception):
                sh(IP, "netns", "del", name, check=False)
        self._created.clear()

    # -- building ------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        return self.names[role]

    def veth(
        self, a: str, a_if: str, a_addr: str | None, b: str, b_if: str, b_addr: str | None
    ) -> None:
        """A veth pair from namespace ``a`` (device ``a_if``) to ``b`` (``b_if``), both up,
        with the given addresses (prefix notation, or None)."""
        sh(
            IP,
            "-n",
            self.ns(a),
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            self.ns(b),
        )
        for role, dev, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            if addr:
                sh(IP, "-n", self.ns(role), "addr", "add", addr, "dev", dev)
            sh(IP, "-n", self.ns(role), "link", "set", dev, "up")

    def route(self, role: str, *spec: str) -> None:
        sh(IP, "-n", self.ns(role), "route", "replace", *spec)

    def sysctl(self, role: str, setting: str) -> None:
        self.run(role, "sysctl", "-q", "-w", setting)

    # -- running -------------------------------------------------------------------------
    def cmd(self, role: str, *cmd: str) -> list[str]:
        return [IP, "netns", "exec", self.ns(role), *cmd]

    def run(
        self, role: str, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(role, *cmd), check=check, timeout=timeout)

    def popen(
        self,
        role: str,
        *cmd: str,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[Any]:
        """Start ``cmd`` in the namespace (``ip netns exec`` execs it: the pid is the
        command's); it is stopped on cleanup if still running."""
        p = subprocess.Popen(self.cmd(role, *cmd), stdout=stdout, stderr=stderr)
        self.procs.append(p)
        return p


def stop_process(p: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Stop ``p`` with ``sig``, then SIGKILL after ``timeout``; returns its exit status."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    return int(p.returncode)


wait_until = until  # the one polling wait (tests.helpers.waiting)


def leftover_namespaces(names: Sequence[str]) -> list[str]:
    """Which of ``names`` still exist (for tests of the cleanup itself)."""
    out = sh(IP, "netns", "list").stdout
    present = {line.split()[0] for line in out.splitlines() if line.strip()}
    return [n for n in names if n in present]

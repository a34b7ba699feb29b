"""The demo's gateways as processes of their own: each is ``python -m ipsecct gateway run
--config FILE``, the command an operator runs, with the configuration the demo builds written
as TOML into the run's directory.

A gateway is started (all of them at once), waited for on its control socket (a bounded wait:
a gateway that exits or does not answer in time is a :class:`~ipsecct.errors.DemoError` of one
line with the end of its log) and stopped on every way out of the demo: SIGTERM, then SIGKILL
after a bound. Each child also gets SIGKILL from the kernel when the demo's process dies
without stopping it (``PR_SET_PDEATHSIG``), and runs in a session of its own so that a
Ctrl-C at the terminal reaches the demo only, which then stops its gateways itself: no
gateway outlives its demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ControlError, DemoError
from ..gateway.control import request_async

START_TIMEOUT = 30.0  # seconds for a gateway to answer on its control socket
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
POLL = 0.02  # seconds between looks at a starting gateway
PR_SET_PDEATHSIG = 1

try:  # looked up once, here: the child calls it between fork and exec
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the demo stops its gateways itself
    _prctl = None


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL when the demo's process dies; and if it already
    died (between fork and here), exit at once."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float | str):
        return json.dumps(v)  # a JSON string or number is a TOML one (ASCII escapes)
    if isinstance(v, list | tuple) and all(not isinstance(x, dict) for x in v):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """The TOML text of a configuration dictionary: values, tables (``[a.b]``) and arrays of
    tables (``[[a]]``, of flat tables) -- what the demo's configurations hold."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in data.items():
        name = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, dict):
            tables.append((name, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((name, v))
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for name, t in tables:
        text += f"\n[{name}]\n" + to_toml(t, name)
    for name, items in arrays:
        for item in items:
            if any(isinstance(x, dict) for x in item.values()):
                raise TypeError(f"{name}: nested tables in an array of tables")
            text += f"\n[[{name}]]\n" + to_toml(item, name)
    return text


class GatewayProcess:
    """One ``ipsecct gateway run`` of the demo: its configuration file, control socket, log."""

    def __init__(self, name: str, workdir: Path, data: dict[str, Any]) -> None:
        self.name = name
        self.config = workdir / f"{name}.toml"
        self.socket = str(workdir / f"{name}.sock")
        self.log = workdir / f"{name}.log"
        data = {**data, "control": {"socket": self.socket}}
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(to_toml(data))
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # by the demo, on purpose (--failover)

    def start(self) -> None:
        parent = os.getpid()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ipsecct", "gateway", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: _die_with_parent(parent),
            )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def tail(self, lines: int = 3) -> str:
        """The end of the gateway's log, on one line."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "no log"
        last = [x.strip() for x in text.strip().splitlines() if x.strip()][-lines:]
        return " | ".join(last) or "empty log"

    async def wait_up(self, timeout: float) -> None:
        """Until the gateway answers ``status`` on its control socket; a gateway that exits
        first or does not answer within ``timeout`` seconds is a DemoError."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise DemoError(
                    f"gateway {self.name} exited with status {rc} before it answered on its"
                    f" control socket (its log: {self.tail()})"
                )
            if os.path.exists(self.socket):
                with contextlib.suppress(ControlError):
                    await request_async(self.socket, "status", timeout=2)
                    return
            if time.monotonic() >= deadline:
                raise DemoError(
                    f"gateway {self.name} did not answer on its control socket within"
                    f" {timeout:g} s (its log: {self.tail()})"
                )
            await asyncio.sleep(POLL)

    async def request(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 10.0) -> Any:  # fmt: skip
        return await request_async(self.socket, cmd, args, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL now (the fail-over: no goodbye, no clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed = True
            self.proc.kill()
            self.proc.wait()


def stop_all(procs: list[GatewayProcess], grace: float = STOP_GRACE) -> None:
    """SIGTERM to every gateway still running, SIGKILL to those still running ``grace``
    seconds later; returns once all have been reaped."""
    running = [p.proc for p in procs if p.proc is not None and p.proc.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


async def wait_all(procs: list[GatewayProcess], timeout: float = START_TIMEOUT) -> None:
    """Wait for every started gateway at once (their start-ups overlap)."""
    tasks = [asyncio.ensure_future(p.wait_up(timeout)) for p in procs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

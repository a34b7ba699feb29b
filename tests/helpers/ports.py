"""Ports for the processes a test starts, chosen below the kernel's ephemeral range.

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 by default): between the moment the test closes
its probe socket and the moment the process binds the port, an outgoing connection of anybody
on the machine may be given it ("address in use"). A port below that range is never given to
an outgoing connection, so once probed free it stays free unless somebody binds it by name.
Ports are not handed out twice in one test run, and the pytest workers of one run
(``scripts/test`` runs two, pytest-xdist) take ports from separate slices of the range, so
that two test files running at once never probe the same port free before either binds it.
"""

from __future__ import annotations

import os
import random
import re
import socket

LOW, HIGH = 20000, 32767  # below the default ephemeral range
_given: set[int] = set()


def _slice() -> tuple[int, int]:
    """This pytest worker's part of LOW-HIGH (``PYTEST_XDIST_WORKER`` is ``gw0``, ``gw1``,
    ...; ``PYTEST_XDIST_WORKER_COUNT`` their number), or all of it without workers."""
    m = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if m is None or count <= 1:
        return LOW, HIGH
    size = (HIGH - LOW + 1) // count
    lo = LOW + int(m.group(1)) % count * size
    return lo, lo + size - 1


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port that ``host`` can bind now for ``kind`` (and for the other of TCP and UDP), not
    handed out before in this run."""
    low, high = _slice()
    for _ in range(1000):
        port = random.randint(low, high)
        if port in _given:
            continue
        try:
            for k in (kind, socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, k) as s:
                    s.bind((host, port))
        except OSError:
            continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")

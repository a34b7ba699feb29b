"""Ports for the processes a test starts, chosen below the kernel's ephemeral range.

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 by default): between the moment the test closes
its probe socket and the moment the process binds the port, an outgoing connection of anybody
on the machine may be given it ("address in use"). A port below that range is never given to
an outgoing connection, so once probed free it stays free unless somebody binds it by name.
Ports are not handed out twice in one test run.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32767  # below the default ephemeral range
_given: set[int] = set()


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port that ``host`` can bind now for ``kind`` (and for the other of TCP and UDP), not
    handed out before in this run."""
    for _ in range(1000):
        port = random.randint(LOW, HIGH)
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
    raise RuntimeError(f"no free port in {LOW}-{HIGH}")

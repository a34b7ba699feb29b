"""Asking a running daemon (``ipsecct gateway run`` / ``node run``) on its control socket from
the test's own process: what ``ipsecct status --json`` or ``ipsecct sa list --json`` prints,
without starting the command line.

A command-line process costs about 0.4 s of CPU (Python and ipsecct's imports) before it
asks anything, and the process tests poll their daemons' status in loops: on the 2-core CI
machine those processes competed with the daemons under test for the CPU and made every wait
coarser. The command line's own output is tested where a test is about it
(``tests/test_cli.py``, ``tests/test_control.py``, and the tests that read its text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ipsecct.errors import ControlError
from ipsecct.gateway import config
from ipsecct.gateway.control import request


def socket_of(conf: str | Path) -> str:
    """The control socket a configuration names (as ``-c CONFIG`` finds it)."""
    return config.control_socket_of(str(conf))


def ask(sock: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """The result of control request ``cmd`` (raises ControlError), as the command line's
    ``--json`` prints it: the daemon's JSON, decoded."""
    return request(sock, cmd, args, timeout)


def answers(sock: str, timeout: float = 10.0) -> bool:
    """Does the daemon on ``sock`` answer ``status`` (what a start waits for)?"""
    try:
        ask(sock, "status", timeout=timeout)
    except (ControlError, OSError, json.JSONDecodeError):
        return False
    return True

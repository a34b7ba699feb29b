"""Stopping the processes a test started."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable


def stop_all(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """SIGTERM every process still running (a SIGSTOPped one is continued first: it cannot
    act on SIGTERM), wait up to ``timeout`` seconds for each, SIGKILL what is left."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

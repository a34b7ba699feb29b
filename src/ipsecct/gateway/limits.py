"""Limits that keep a listener alive when someone floods it: connections per source and in
total, and the process's file-descriptor limit.

Every listening socket of a gateway (CXTP over TLS, metrics) admits a connection only while the
source has fewer than ``per_source`` open and the listener fewer than ``total``; the rest are
closed as soon as they are accepted, and counted. With the file-descriptor limit raised (or at
least checked) at start, the connections a listener can hold never use up the descriptors that
sockets, TUN devices and real peers need.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
from dataclasses import dataclass, field

log = logging.getLogger("ipsecct.gateway.limits")

# The longest an operator's transfer or rebalance may be given to finish (``--timeout``, s).
TRANSFER_TIMEOUT_LIMIT = 3600.0


@dataclass
class ConnectionLimits:
    """Open connections per source address and in total, for one listener."""

    per_source: int = 8
    total: int = 128
    open: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    # Sources admitted whatever the total (still at most per_source each): the configured
    # peers' hosts. Without them, anyone with a few dozen addresses (the handshake comes
    # after admission, so no certificate is needed) kept the listener full by reconnecting
    # each time a handshake timed out, and peers could never open their channel again.
    reserved: frozenset[str] = frozenset()

    @property
    def count(self) -> int:
        return sum(self.open.values())

    def admit(self, source: str) -> bool:
        """Take a place for a connection from ``source``; False (and counted) if none."""
        n = self.open.get(source, 0)
        if n >= self.per_source or (source not in self.reserved and self.count >= self.total):
            self.refused += 1
            return False
        self.open[source] = n + 1
        return True

    def release(self, source: str) -> None:
        n = self.open.get(source, 0) - 1
        if n > 0:
            self.open[source] = n
        else:
            self.open.pop(source, None)


def source_of(peername: object) -> str:
    """The address part of a socket's peer name (the port does not make another source)."""
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return "?"


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) afterwards.

    Warns when even the hard limit is below ``needed`` (what the listeners may hold open plus
    room for the gateway's own sockets and files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        log.warning(
            "event=nofile-limit-low soft=%d hard=%d needed=%d"
            " (raise the hard limit, e.g. LimitNOFILE= in the systemd unit)",
            soft,
            hard,
            needed,
        )
    return soft, hard


PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def no_core_dumps() -> bool:
    """Keep the process's key material (SA keys, pre-shared keys, private keys) out of core
    files: RLIMIT_CORE 0, and not dumpable (no core even where a core_pattern pipe such as
    systemd-coredump ignores the limit; nor can other processes of the same user ptrace it
    or read its memory or environment, where ``keys_env`` keys live). ``IPSECCT_DUMPABLE=1``
    leaves both as they were, to debug a crash. Returns whether it applied them."""
    if os.environ.get("IPSECCT_DUMPABLE") == "1":
        return False
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return True

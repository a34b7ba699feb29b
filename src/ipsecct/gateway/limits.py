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

from ..ipsec.ratelimit import RateLimiter

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


@dataclass
class HandshakeRate:
    """TLS handshakes a listener starts per second, per source address and in all (token
    buckets): each costs the gateway an ECDHE and a certificate chain check before it knows
    who connects, so a source that connects in a loop (an attacker, or a broken peer) would
    otherwise cost a handshake per connection, as fast as it can open them. A connection over
    the rate is closed on arrival, before its handshake, and counted (``limited``).

    The configured peers' hosts (``reserved``) have buckets of their own, outside the total
    and larger than anyone else's, so that a flood from elsewhere never locks a real peer out
    and a peer reconnecting after a fault (a few handshakes a second at most: the channel
    pool opens one at a time per peer, retrying after 0.5 s and more) is never refused."""

    per_source: float = 2.0  # handshakes a second from one address
    per_source_burst: float = 8.0
    total: float = 20.0  # ... from all addresses but the peers' hosts
    total_burst: float = 40.0
    reserved_rate: float = 8.0  # ... from one of the peers' hosts
    reserved_burst: float = 32.0
    reserved: frozenset[str] = frozenset()
    max_sources: int = 4096  # the per-address table's bound (ipsec.ratelimit prunes past it)
    limited: int = 0
    _sources: RateLimiter | None = field(default=None, repr=False)
    _peers: RateLimiter | None = field(default=None, repr=False)
    _all: RateLimiter | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._sources = RateLimiter(self.per_source, self.per_source_burst,
                                    max_keys=self.max_sources)  # fmt: skip
        self._peers = RateLimiter(self.reserved_rate, self.reserved_burst,
                                  max_keys=max(1, len(self.reserved)))  # fmt: skip
        self._all = RateLimiter(self.total, self.total_burst, max_keys=1)

    def allow(self, source: str, now: float) -> bool:
        """May a handshake from ``source`` start at ``now`` (seconds, any monotonic clock)?"""
        assert self._sources is not None and self._peers is not None and self._all is not None
        if source in self.reserved:
            ok = self._peers.allow(source, now)
        else:
            # The address's own bucket first: one flooding source spends only its own
            # tokens, not everyone's.
            ok = self._sources.allow(source, now) and self._all.allow(None, now)
        if not ok:
            self.limited += 1
        return ok


def bind_error(exc: OSError, proto: str, host: str, port: int, key: str = "") -> OSError:
    """A listener's bind that failed, as one line naming the address and the configuration
    key it came from (``Address already in use: TCP 127.0.0.1:9451 (control.metrics)``):
    asyncio's own said "error while attempting to bind on address ('127.0.0.1', 9451)", and
    neither said which of a gateway's several addresses (outer, inner link, IKE, metrics,
    CXTP) to change."""
    what = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    shown = f"[{host}]" if ":" in host else host
    return OSError(exc.errno, what, f"{proto} {shown}:{port}" + (f" ({key})" if key else ""))


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

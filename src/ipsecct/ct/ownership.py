"""Ownership of tunnels in a cluster on etcd (sans-I/O): the keys, the member's own lease as a
fence, and who takes a dead member's tunnels.

Keys (under ``/ipsecct/<cluster>/``; etcd holds ownership, membership and allocation only,
never keys or contexts):

* ``members/<name>``: the member's channel address, attached to the member's etcd lease;
* ``owners/<outbound SPI, 8 hex digits>``: the member that may send on that tunnel, attached
  to the *owner's* lease, so that it disappears exactly when the owner's lease ends. Taking a
  tunnel over is a transaction "create ``owners/<spi>`` only if it does not exist", which
  succeeds only once the previous owner's lease is gone (or it released the tunnel);
* ``spi-blocks/<i>``: the member that allocates inbound SPIs from block ``i``
  (:mod:`ipsecct.ipsec.spi`); a claim outlives its member's lease, since that member's SAs
  live on at the survivors.

The member's right to send is its etcd lease, seen from its own clock. etcd's leader revokes
a lease no earlier than TTL (on the leader's clock) after it processed the last keep-alive,
which is after the member sent it; a new leader only extends leases. With clock rates within
``1 -/+ rho``: the lease cannot end before ``TTL / (1 + rho)`` real seconds after the
keep-alive left. The member stops once its own clock says ``fence`` has passed since it sent
the keep-alive, which is at most ``fence / (1 - rho)`` real seconds, so with

    fence = TTL * (1 - rho) / (1 + rho) - guard

it has stopped, by at least ``guard``, before etcd can let anyone else create its owner keys.
A member cut off from etcd therefore stops sending before anyone can take over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from .lease import LeaseTiming

PREFIX = "/ipsecct"


def fence_timing(ttl_s: float, drift_ppm: float, guard_ms: float) -> LeaseTiming:
    """The local lease a member may use for an etcd lease of ``ttl_s`` seconds."""
    rho = drift_ppm / 1e6
    guard = guard_ms / 1000
    lease = ttl_s * (1 - rho) / (1 + rho) - guard
    if lease <= 0:
        raise ValueError("the etcd lease is too short for the guard and the drift bound")
    # ``wait`` stands for etcd's side: the lease ends no earlier than the TTL after the
    # keep-alive (on the leader's clock), which is what LeaseTiming's check expresses.
    return LeaseTiming(lease, ttl_s, rho, guard)


def keys(cluster: str) -> dict[str, str]:
    base = f"{PREFIX}/{cluster}/"
    return {
        "members": base + "members/",
        "owners": base + "owners/",
        "blocks": base + "spi-blocks/",
    }


def owner_key(cluster: str, spi: int) -> str:
    return f"{keys(cluster)['owners']}{spi:08x}"


def spi_of_owner_key(key: str) -> int | None:
    tail = key.rsplit("/", 1)[-1]
    try:
        v = int(tail, 16)
    except ValueError:
        return None
    return v if len(tail) == 8 and 0 <= v <= 0xFFFFFFFF else None


def _weight(member: str, spi: int) -> bytes:
    return hashlib.sha256(f"{member}\0{spi:08x}".encode()).digest()


def successor(spi: int, members: Iterable[str]) -> str | None:
    """Rendezvous (highest random weight) hashing: the member that takes tunnel ``spi`` when
    its owner is gone. Every member computes the same answer from the same member list, and a
    dead member's tunnels spread evenly over the survivors (not onto one fixed standby)."""
    best: tuple[bytes, str] | None = None
    for m in members:
        w = (_weight(m, spi), m)
        if best is None or w > best:
            best = w
    return None if best is None else best[1]


def plan(orphans: Iterable[int], survivors: Iterable[str]) -> dict[str, list[int]]:
    """Which survivor takes which orphaned tunnel (by outbound SPI)."""
    members = sorted(set(survivors))
    out: dict[str, list[int]] = {m: [] for m in members}
    for spi in orphans:
        m = successor(spi, members)
        if m is not None:
            out[m].append(spi)
    return out

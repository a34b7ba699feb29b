"""Leases: a gateway's right to send on its SAs, bounded in time (sans-I/O).

RFC 6027 §3.7: two members of a cluster must never send on one SA at the same time. A gateway
that merely *believes* its peer is dead cannot know it: a partition looks exactly like a crash.
So the right to send is a lease that the other side grants and that runs out by itself:

* the **holder** (the active gateway) numbers its heartbeats and notes the time it *sent*
  each one; when a grant for heartbeat ``n`` comes back, its lease runs until
  ``sent(n) + lease`` on its own clock, and it sends nothing after that (its engine holds);
* the **grantor** (the standby, or etcd in the cluster mode) notes the time it *received*
  each heartbeat it grants; it takes over only when ``wait`` has passed on its own clock since
  the last grant, and grants nothing once it has decided to take over.

Why ``wait`` is enough. Let ``rho`` bound the clock-rate error of both clocks: a clock
advances by between ``(1 - rho)`` and ``(1 + rho)`` seconds per real second (clocks may also
be offset arbitrarily; only rates matter, as each side compares only its own readings).
Heartbeat ``n`` is sent at real time ``t_s`` and received (and granted) at ``t_r >= t_s``.
The holder stops once its clock has advanced ``lease`` from ``t_s``, which takes at most
``lease / (1 - rho)`` real seconds: it is silent from real time ``t_s + lease / (1 - rho)`` on.
The grantor waits until its clock has advanced ``wait`` from ``t_r``, which takes at least
``wait / (1 + rho)`` real seconds. Hence with

    wait >= lease * (1 + rho) / (1 - rho) + guard

the take-over happens at real time ``>= t_r + lease / (1 - rho) + guard / (1 + rho)``, after
the holder surely stopped (``t_r >= t_s``). ``guard`` covers what happens after the holder's
check: a packet encrypted under a valid lease may still be on its way into the kernel, or
sit in its queues, for a few milliseconds (the gateway's own send queue is checked again:
ESP waiting there past the end is dropped, see docs/cluster.md). A later grant only moves
both ends later; a grant lost on its way back only makes the holder stop earlier. Message
delay and loss therefore cost availability, never safety; a clock running faster or slower
than ``rho`` allows is the one assumption.

Operators set the detection time (``dead_ms``); :func:`timing` derives the lease from it so
that ``wait == dead_ms``: the standby takes over ``dead_ms`` after the last heartbeat it
granted, the active stops ``lease`` after sending it, with
``lease = (dead_ms - guard) * (1 - rho) / (1 + rho)``.

The lease bounds *when* the holder sends. *What* it sends is bounded too (see
:mod:`ipsecct.ct.failover`): a tunnel's sequence numbers may run at most ``seq_margin`` past
the last value the grantor has acknowledged holding, the value it would restart from plus the
margin. So even at a packet rate that spends the margin within one lease, no sequence number
is ever sent twice.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

DEFAULT_DRIFT_PPM = 1000.0  # 0.1 %: twice the most NTP ever slews a Linux clock (500 ppm)
DEFAULT_GUARD_MS = 50.0


@dataclass(frozen=True)
class LeaseTiming:
    """``lease``: how long a grant lets the holder send (from the heartbeat's sending);
    ``wait``: how long the grantor waits after its last grant before it may take over;
    ``rho``: the clock-rate bound both assume; ``guard``: send-queue allowance. Seconds."""

    lease: float
    wait: float
    rho: float
    guard: float

    def __post_init__(self) -> None:
        if not 0 <= self.rho < 1:
            raise ValueError("the clock-rate bound must be in [0, 1)")
        if self.lease <= 0 or self.guard < 0:
            raise ValueError("lease must be positive and guard not negative")
        if self.wait < self.lease * (1 + self.rho) / (1 - self.rho) + self.guard - 1e-9:
            raise ValueError("wait is shorter than lease * (1 + rho) / (1 - rho) + guard")


def timing(
    dead_ms: float, drift_ppm: float = DEFAULT_DRIFT_PPM, guard_ms: float = DEFAULT_GUARD_MS
) -> LeaseTiming:
    """The lease that lets the grantor take over exactly ``dead_ms`` after its last grant."""
    rho = drift_ppm / 1e6
    if not 0 <= rho < 1:
        raise ValueError("drift must be below 1,000,000 ppm")
    if dead_ms <= guard_ms:
        raise ValueError("dead_ms must be longer than the guard")
    lease = (dead_ms - guard_ms) / 1000 * (1 - rho) / (1 + rho)
    return LeaseTiming(lease, dead_ms / 1000, rho, guard_ms / 1000)


class LeaseEvent(enum.Enum):
    LOST = "lease-lost"  # the holder's lease ran out: it stopped sending
    REGAINED = "lease-regained"  # a grant came back: it sends again
    GRANTED = "lease-granted"  # first grant of a holder: it may send
    SUPERSEDED = "lease-superseded"  # the grantor took over: this holder never sends again


class Lease:
    """The holder's side: when may it send?"""

    MAX_OUTSTANDING = 4096  # heartbeats awaiting a grant (older ones are forgotten)

    def __init__(self, t: LeaseTiming) -> None:
        self.timing = t
        self.expiry = -math.inf  # nothing granted yet: a new holder starts fenced
        self._sent: deque[tuple[int, float]] = deque()  # (heartbeat number, local send time)
        self._was_valid = False
        self.ever_granted = False
        self.losses = 0
        self.grants = 0
        self.lost_at: float | None = None

    def sent(self, n: int, now: float) -> None:
        """Heartbeat ``n`` (increasing) leaves now."""
        self._sent.append((n, now))
        while len(self._sent) > self.MAX_OUTSTANDING:
            self._sent.popleft()

    def granted(self, n: int, now: float) -> list[LeaseEvent]:
        """The grantor granted heartbeat ``n`` (and so every one before it)."""
        sent_at: float | None = None
        while self._sent and self._sent[0][0] <= n:
            sent_at = self._sent.popleft()[1]
        if sent_at is None:
            return []  # unknown or already superseded: nothing to extend
        self.grants += 1
        self.expiry = max(self.expiry, sent_at + self.timing.lease)
        return self.poll(now)

    def valid(self, now: float) -> bool:
        return now < self.expiry

    def remaining(self, now: float) -> float:
        return max(0.0, self.expiry - now)

    def ended_ago(self, now: float) -> float | None:
        """How long ago the lease ended (the holder stopped sending at that instant), None
        while it is valid or when none was granted (or it was revoked)."""
        if self.valid(now) or not math.isfinite(self.expiry):
            return None
        return now - self.expiry

    def poll(self, now: float) -> list[LeaseEvent]:
        """Report a change of validity since the last poll (for logs and counters)."""
        v = self.valid(now)
        if v == self._was_valid:
            return []
        self._was_valid = v
        if v:
            first = not self.ever_granted
            self.ever_granted = True
            self.lost_at = None
            return [LeaseEvent.GRANTED if first else LeaseEvent.REGAINED]
        self.losses += 1
        self.lost_at = self.expiry
        return [LeaseEvent.LOST]

    def slept(self, seconds: float) -> None:
        """The holder's clock stood still for ``seconds`` of real time (its machine was
        suspended: ``CLOCK_MONOTONIC`` does not count a suspend, the grantor's clock and etcd's
        do): every time noted on it (the expiry, the sending of heartbeats awaiting a grant) is
        that much later than it would be had the clock run, so the lease ends that much sooner
        on it. The proof above assumes a clock rate within ``rho``; a suspend is a rate of 0."""
        if seconds <= 0:
            return
        self.expiry -= seconds
        self._sent = deque((n, t - seconds) for n, t in self._sent)
        if self.lost_at is not None:
            self.lost_at -= seconds

    def revoke(self) -> None:
        """Give the lease up (the peer took over): never valid again."""
        self.expiry = -math.inf
        self._sent.clear()


class Grant:
    """The grantor's side: may it take over yet?"""

    def __init__(self, t: LeaseTiming) -> None:
        self.timing = t
        self.last: float | None = None  # local receive time of the last granted heartbeat
        self.closed = False  # decided to take over: grants nothing more

    def grant(self, now: float) -> bool:
        """Grant the heartbeat received now; False once closed."""
        if self.closed:
            return False
        self.last = now if self.last is None else max(self.last, now)
        return True

    def expired(self, now: float) -> bool:
        """Has every lease granted surely run out (or was none ever granted)?"""
        return self.last is None or now >= self.last + self.timing.wait

    def close(self) -> None:
        self.closed = True

    def deadline(self) -> float | None:
        return None if self.last is None else self.last + self.timing.wait

"""When a connection starts again by itself, with back-off (sans-I/O: no clock, no loop).

What asks for a new IKE SA or CHILD SA without the operator: ``start_action = start``
after a failed try, ``dpd_action = restart`` (the peer is dead), ``close_action = start``
(the peer deleted the IKE SA, or one CHILD SA alone). Each *key* (a connection's name for
its IKE SA, ``connection/child`` for a CHILD SA asked for again in the IKE SA that is up)
has its own back-off: the first restart after a quiet spell goes at once when the caller
says so (``dpd_action``/``close_action``: a failed-over peer is back fast), the next after
``FIRST`` s, each delay doubling to ``MAX`` s, each shortened at random by up to
``JITTER`` of it (gateways that lost one peer do not come back in step). A peer that is
dead, refuses, or deletes what we make is asked at most once a minute in the end, never
in a loop.

The back-off starts over once what it restarted stayed up ``STABLE`` s (an IKE SA that
establishes and is deleted at once does not reset it: else a peer that accepts and
deletes would be asked again at once, for ever). ``keyingtries`` (tries of a connection
that fail to establish) is the adapter's: it resets when an IKE SA establishes.

The adapter asks :meth:`Restarts.next_deadline` for its one timer and calls
:meth:`Restarts.due` when it fires.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

FIRST = 1.0  # seconds before the second try
MAX = 60.0  # the longest delay
JITTER = 0.25  # each delay is shortened by up to this fraction of it, at random
STABLE = 60.0  # seconds up after which the back-off starts over


@dataclass
class Due:
    """A restart waiting for its time."""

    key: str
    at: float
    attempt: int  # 1 for the first since the back-off (re)started
    what: object = field(default=None, compare=False)  # the adapter's (what to start)


class Restarts:
    """The back-off of each key and the restarts waiting."""

    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        self.rand = rand
        self._next: dict[str, float] = {}  # the next delay (no entry: the back-off is new)
        self._attempts: dict[str, int] = {}
        self._up_at: dict[str, float] = {}
        self.waiting: dict[str, Due] = {}

    def schedule(self, key: str, now: float, what: object = None, *,
                 at_once: bool = False) -> Due:  # fmt: skip
        """The next restart of ``key``: when it goes (``at_once``: the first since the
        back-off started over goes now). Replaces one already waiting."""
        up = self._up_at.pop(key, None)
        if up is not None and now - up >= STABLE:
            self._next.pop(key, None)
            self._attempts.pop(key, None)
        delay = self._next.get(key)
        if delay is None:
            wait = 0.0 if at_once else FIRST * (1.0 - JITTER * self.rand())
            self._next[key] = FIRST if at_once else min(MAX, 2 * FIRST)
        else:
            wait = delay * (1.0 - JITTER * self.rand())
            self._next[key] = min(MAX, 2 * delay)
        n = self._attempts.get(key, 0) + 1
        self._attempts[key] = n
        d = self.waiting[key] = Due(key, now + wait, n, what)
        return d

    def up(self, key: str, now: float) -> None:
        """What ``key`` starts is up (an IKE SA established, a CHILD SA installed): the
        back-off starts over if it stays up ``STABLE`` s (seen at the next restart)."""
        if key in self._next:
            self._up_at[key] = now

    def cancel(self, key: str) -> None:
        """No more restarts of ``key`` (given up): its back-off is forgotten."""
        self.waiting.pop(key, None)
        self._next.pop(key, None)
        self._attempts.pop(key, None)
        self._up_at.pop(key, None)

    def clear(self) -> None:
        self.waiting.clear()

    def next_deadline(self) -> float | None:
        return min((d.at for d in self.waiting.values()), default=None)

    def due(self, now: float) -> list[Due]:
        """The restarts whose time came (no longer waiting), the earliest first."""
        out = sorted((d for d in self.waiting.values() if d.at <= now), key=lambda d: d.at)
        for d in out:
            del self.waiting[d.key]
        return out

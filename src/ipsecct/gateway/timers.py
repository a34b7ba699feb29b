"""One timer per node: the sans-I/O cores say when they next need the clock
(``next_deadline()``), the scheduler arms a single ``loop.call_at`` for the earliest of them and
calls ``handle_timer(now)`` on each one that is due.

The cores registered by a gateway: the engine (SA lifetimes, PMTU aging), the transfer core
(retries, time-outs, housekeeping), the fail-over replicator or standby, the balancer and the
virtual-address mover. Deadlines are in the node's clock (:attr:`Node.clock`, injected), not
the event loop's.

Supervision: a core whose ``handle_timer`` raises is logged (one line, ``timer-failed``) and
asked again a second later; the other cores and the node go on. Asyncio tasks started by the
adapters are watched by :func:`supervise`: an exception out of one is logged, never lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .log import event

log = logging.getLogger("ipsecct.gateway.timers")

Clock = Callable[[], float]
RETRY_AFTER_FAILURE = 1.0  # seconds before a core whose timer raised is asked again


@dataclass
class _Client:
    name: str
    next_deadline: Callable[[], float | None]
    handle_timer: Callable[[float], None]
    failed_until: float = 0.0


class Scheduler:
    """The node's one timer."""

    def __init__(self, clock: Clock, node: str = "") -> None:
        self.clock = clock
        self.node = node
        self._clients: dict[str, _Client] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None
        self.failures = 0
        self.fired = 0

    def add(
        self,
        name: str,
        next_deadline: Callable[[], float | None],
        handle_timer: Callable[[float], None],
    ) -> None:
        self._clients[name] = _Client(name, next_deadline, handle_timer)
        self.poke()

    def remove(self, name: str) -> None:
        self._clients.pop(name, None)
        self.poke()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.poke()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._armed_for = None
        self._loop = None

    def _deadline(self, c: _Client) -> float | None:
        d = c.next_deadline()
        if d is not None and c.failed_until:
            d = max(d, c.failed_until)
        return d

    def next_deadline(self) -> float | None:
        # What _deadline does, inline: this runs after every message a transfer core takes
        # (TransferService.run), and most deadlines have not moved.
        best: float | None = None
        for c in self._clients.values():
            d = c.next_deadline()
            if d is None:
                continue
            if c.failed_until and d < c.failed_until:
                d = c.failed_until
            if best is None or d < best:
                best = d
        return best

    def poke(self) -> None:
        """Re-arm for the earliest deadline (call after anything that may have moved one)."""
        if self._loop is None:
            return
        d = self.next_deadline()
        if d is not None and self._handle is not None and d == self._armed_for:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._armed_for = None
        if d is None:
            return
        delay = max(0.0, d - self.clock())
        self._handle = self._loop.call_at(self._loop.time() + delay, self._fire)
        self._armed_for = d

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = None
        self.fired += 1
        now = self.clock()
        for c in list(self._clients.values()):
            d = self._deadline(c)
            if d is None or d > now:
                continue
            try:
                c.handle_timer(now)
                c.failed_until = 0.0
            except Exception as exc:  # a bug in one core must not stop the others' timers
                self.failures += 1
                c.failed_until = now + RETRY_AFTER_FAILURE
                event(
                    log,
                    "timer-failed",
                    logging.ERROR,
                    node=self.node,
                    timer=c.name,
                    error=f"{type(exc).__name__}: {exc}",
                )
        self.poke()


def supervise(
    coro: Coroutine[Any, Any, Any], what: str, node: str = ""
) -> asyncio.Task[Any]:
    """Start ``coro`` as a task whose failure is logged (one line, ``task-failed``), never
    silently lost. Cancellation is not a failure."""
    task = asyncio.create_task(coro)

    def done(t: asyncio.Task[Any]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            event(
                log,
                "task-failed",
                logging.ERROR,
                node=node,
                task=what,
                error=f"{type(exc).__name__}: {exc}",
            )

    task.add_done_callback(done)
    return task

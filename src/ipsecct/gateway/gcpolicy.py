"""The garbage-collector policy of a gateway process.

A gateway holds many long-lived objects (per tunnel: the SAs, their counters and replay windows,
the policy entry, the selectors; about 14 tracked objects per SA), and CPython's cyclic
collector walks all of them in every full collection. A full collection starts whenever the
objects that survived into the oldest generation grew by a quarter, so a bulk transfer that
installs 5,000 tunnels into a gateway that holds 10,000 pays for one or two walks of the whole
heap in the middle of the transfer (measured: 837 ms of a 2.4 s transfer of 10,000 SAs).

The policy, process-wide (the collector is):

- after start-up, :meth:`GcPolicy.settle` collects once and *freezes* what is left
  (:func:`gc.freeze`): the long-lived state leaves the generations the collector walks;
- a batch of protocol work (one CXTP message handled by the transfer core, which may decode and
  install up to 1,024 contexts) runs with the collector paused (:meth:`GcPolicy.batch`); if it
  left many new tracked objects (``freeze_after`` or more: a bulk install), they are frozen at
  once, which costs nothing (a list splice), instead of being walked as they age;
- :meth:`GcPolicy.maintain`, called from a gateway's timer while no transfer is in progress,
  sweeps: unfreezes, collects everything and freezes again when the frozen set grew by a quarter
  since the last sweep (CPython's own rule, deferred to a quiet moment) or ``sweep_interval``
  has passed.

Nothing leaks: a frozen object is still freed by reference counting as soon as nothing refers
to it (the engine's tunnels and SAs form no reference cycles: ``tests/test_gcpolicy.py``), and
a frozen object that became part of cyclic garbage is reclaimed by the next sweep. The sweep
costs what CPython's full collection costs; it is moved out of the transfers, not removed.

Only the asyncio adapters use this; the sans-I/O cores know nothing of it.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from types import TracebackType


class GcPolicy:
    """When the cyclic collector runs in a gateway process."""

    def __init__(
        self,
        *,
        freeze_after: int = 4096,
        sweep_growth: float = 0.25,
        sweep_interval: float = 1800.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.freeze_after = freeze_after
        self.sweep_growth = sweep_growth
        self.sweep_interval = sweep_interval
        self.clock = clock
        self._depth = 0
        self._paused = False  # the outermost batch paused the collector (it enables it again)
        self._swept_size = 0  # frozen objects right after the last sweep or settle
        self._frozen_since = 0  # objects frozen by batches since then (gc.get_freeze_count()
        # walks the whole frozen list: too slow to ask on every tick)
        self._swept_at = clock()
        self._last_batch = 0.0
        self.sweeps = 0
        self.sweep_seconds = 0.0  # time spent in sweeps (reported by the bench)

    def settle(self) -> None:
        """Collect everything once and freeze what is left (after start-up, or after state was
        built outside a batch)."""
        if not self.enabled:
            return
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._swept_size = gc.get_freeze_count()
        self._frozen_since = 0
        self._swept_at = self.clock()

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Run a piece of protocol work with the collector paused; freeze what it left if that
        was a bulk install. Nested batches count once; a batch entered while the collector is
        off (for instance by the embedding program) changes nothing. (A plain object's
        ``__enter__`` and ``__exit__``, not a generator's context manager: one is entered for
        every CXTP message a gateway takes.)"""
        return self

    def __enter__(self) -> None:
        if not self.enabled or self._depth or not gc.isenabled():
            self._depth += 1
            return
        self._depth = 1
        self._paused = True
        gc.disable()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._depth != 1 or not self._paused:
            self._depth -= 1
            return
        self._depth = 0
        self._paused = False
        young = gc.get_count()[0]  # tracked objects made (net) since the last collection
        if young >= self.freeze_after:
            gc.freeze()
            self._frozen_since += young
        self._last_batch = self.clock()
        gc.enable()

    def maintain(self, busy: bool) -> bool:
        """The periodic check (from each gateway's timer, at least every few seconds): sweep
        the frozen set when it is due, no gateway of the process said ``busy`` (a transfer in
        progress) and no batch ran for a second. True if it swept."""
        if not self.enabled or self._depth or not gc.isenabled():
            return False
        now = self.clock()
        if busy:  # the collector is process-wide: one busy gateway holds back every sweep
            self._last_batch = now
            return False
        if now - self._last_batch < 1.0:  # any protocol work in the last second
            return False
        grown = self._frozen_since > self.sweep_growth * max(self._swept_size, 10000)
        if not grown and now - self._swept_at < self.sweep_interval:
            return False
        t0 = time.perf_counter()
        self.settle()
        self.sweep_seconds += time.perf_counter() - t0
        self.sweeps += 1
        return True


POLICY = GcPolicy(enabled=False)
"""The policy of this process (the collector is process-wide; every gateway of a process,
such as the demo's, shares it). Off until a program that is a gateway process turns it on
(``ipsecct gateway run``, ``ipsecct demo``, the benchmarks): a library user or a test run
keeps CPython's default behaviour."""

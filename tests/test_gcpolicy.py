"""The gateway's garbage-collector policy (ipsecct.gateway.gcpolicy): it freezes bulk installs
and sweeps later, and nothing it freezes can leak."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from ipsecct.bench.transfer import make_tunnel
from ipsecct.ct import context
from ipsecct.gateway.gcpolicy import GcPolicy
from ipsecct.ipsec.engine import Engine


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    was = gc.isenabled()
    yield
    gc.unfreeze()
    if was:
        gc.enable()


class Node:
    """A weak-referenceable object that can sit in a cycle."""

    def __init__(self) -> None:
        self.other: object = None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_removed_tunnels_are_freed_by_reference_counting() -> None:
    """Frozen objects are never walked by the collector, so what the engine drops must not
    need it: tunnels and SAs (made locally or decoded from a transferred context, having
    sealed a packet) hold no reference cycles."""
    gc.collect()
    gc.disable()
    e = Engine()
    for i in range(4):
        make_tunnel(e, i, "127.0.1.1", "127.0.1.10")
    t0 = e.tunnels()[0]
    now = time.monotonic()
    out, inn = (context.decode(context.encode(sa, now), now) for sa in t0.sas())
    e.remove_tunnel(t0)
    e.add_tunnel(t0.entry, out, inn)
    for sa in e.sad:
        sa.transform.seal_payload(sa.spi, 1, b"x", 59, 0, sa.esn)
    refs = [weakref.ref(x) for t in e.tunnels() for x in (t, *t.sas())]
    refs += [weakref.ref(x) for x in t0.sas()]
    del t0, out, inn, sa
    for t in e.tunnels():
        e.remove_tunnel(t)
    del t
    assert len(e.sad) == 0
    assert all(r() is None for r in refs)
    del e
    assert gc.collect() == 0  # nothing was left for the collector


def test_a_bulk_batch_is_frozen_and_the_collector_resumes() -> None:
    p = GcPolicy(freeze_after=1000)
    p.settle()
    frozen = gc.get_freeze_count()
    with p.batch():
        assert not gc.isenabled()
        with p.batch():  # nested: still one batch
            kept = [[i] for i in range(5000)]
        assert not gc.isenabled()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + 5000
    with p.batch():  # a small batch is left to the collector
        small = [[i] for i in range(10)]
    assert gc.get_count()[0] < 1000
    assert gc.get_freeze_count() < frozen + 5000 + 10
    del kept, small


def test_a_disabled_policy_changes_nothing() -> None:
    p = GcPolicy(enabled=False, freeze_after=10)
    gc.collect()
    with p.batch():
        assert gc.isenabled()
        kept = [[i] for i in range(100)]
    p.settle()
    assert gc.get_freeze_count() == 0
    assert not p.maintain(busy=False)
    del kept


def test_frozen_cyclic_garbage_is_reclaimed_by_the_sweep() -> None:
    clock = Clock()
    p = GcPolicy(freeze_after=100, clock=clock)
    p.settle()
    with p.batch():
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle
        ballast = [[i] for i in range(200)]
    ref = weakref.ref(a)
    del a, b, ballast
    gc.collect()
    assert ref() is not None  # frozen: the collector does not see it
    clock.t += 2
    assert not p.maintain(busy=False)  # the frozen set did not grow enough, and not due yet
    clock.t += p.sweep_interval
    assert not p.maintain(busy=True)  # never while a transfer is in progress
    assert not p.maintain(busy=False)  # ... in any gateway of the process, for a second
    assert ref() is not None
    clock.t += 1.5
    assert p.maintain(busy=False)
    assert ref() is None
    assert p.sweeps == 1


def test_growth_makes_the_sweep_due_a_second_after_the_last_batch() -> None:
    clock = Clock()
    p = GcPolicy(freeze_after=100, clock=clock)
    p.settle()
    with p.batch():
        kept = [[i] for i in range(max(20000, gc.get_freeze_count() // 2))]
    assert not p.maintain(busy=False)  # the batch was just now
    clock.t += 1.5
    assert p.maintain(busy=False)
    del kept

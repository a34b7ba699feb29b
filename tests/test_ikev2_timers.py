"""The IKE engine's timers (ikev2.engine): each IKE SA's next deadline kept in a heap, so that
next_deadline() and tick() do not walk every IKE SA. Held to the walk they replace: two
worlds of engines driven by the same random operations (establish, rekeys of either side
and their collisions, liveness checks, lost datagrams and retransmissions, peers declared
dead, deletes, volume limits, quiet IKE SAs, an IKE SA exported and imported again, an RFC
6311 take-over, time passing at each deadline or in jumps), one with the heap, one walking
every IKE SA as before (``_timers_by_scan``): after every step the heap's next deadline is
the walk's, and the outputs of both worlds (datagrams' headers and lengths, events) are the
same, step by step."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.ikev2.engine import (
    TIMER_AUDIT,
    IkeEngine,
    Send,
)
from ipsecct.ikev2.ikesa import IkeSA, IkeState
from tests.helpers.ike_timer_world import KINDS, Op, World, connect_world, reference_deadline
from tests.helpers.ikev2_engines import conn, connect, mn_conn, pair

op_strategy = st.tuples(st.sampled_from(KINDS), st.integers(0, 15), st.integers(0, 3))


def _run(ops: list[Op], seed: int) -> tuple[World, World]:
    heap, scan = World(seed, False), World(seed, True)
    for w in (heap, scan):
        connect_world(w)
    for i, op in enumerate(ops):
        for w in (heap, scan):
            w.step(op)
        heap.sizes.append(len(heap.resp.by_spi))
        for eng in heap.engines():
            assert eng.next_deadline() == reference_deadline(eng), (i, op)
        assert heap.deadlines() == scan.deadlines(), (i, op)
        assert heap.trace == scan.trace, (i, op)
        assert heap.now == scan.now
    for eng in heap.engines():
        assert eng.stats["deadline-missed"] == 0
    assert heap.trace == scan.trace
    return heap, scan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_strategy, min_size=1, max_size=40), st.integers(0, 1000))
def test_the_heap_keeps_the_deadlines_and_ticks_of_a_walk_of_every_ike_sa(
    ops: list[Op], seed: int
) -> None:
    """Random operations on two worlds of engines; after each, the heap's next_deadline() is
    the walk's, and tick() did what the walk did (a deadline the heap let slip would be a
    rekey, retransmission or liveness check late or never sent)."""
    _run(ops, seed)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_long_random_run_keeps_the_heap_and_the_walk_alike(seed: int) -> None:
    """400 random operations over 6-16 simulated minutes, several IKE SAs of each side alive
    at once (rekeys of both sides and their collisions, dead peers and their
    replacements)."""
    rng = random.Random(seed)
    ops = [(rng.choice(KINDS), rng.randrange(16), rng.randrange(4)) for _ in range(400)]
    ops = [("initiate", 0, 0)] * 4 + ops
    heap, _ = _run(ops, seed)
    kinds = {t[1][0] for t in heap.trace}
    # the run did what it is for (not a run in which nothing happened)
    assert {"send", "IkeUp", "ChildUp", "IkeRekeyed", "IkeDown", "ChildDown"} <= kinds
    assert sum(e.stats["retransmitted"] for e in heap.engines()) > 0
    assert sum(e.stats["ike-sa-imported"] for e in heap.engines()) > 0
    assert sum(e.stats["rekey-collision"] for e in heap.engines()) > 0
    assert max(heap.sizes) >= 3  # the gateway held several IKE SAs at once


def established(n: int, dpd: float = 30.0) -> tuple[IkeEngine, list[IkeSA]]:
    """A gateway engine with ``n`` IKE SAs of as many MNs, each established at t = i."""
    resp = IkeEngine([conn(dpd=dpd)])
    for i in range(n):
        w = pair(mn_conn(local_id=f"mn{i}.test"), conn(dpd=dpd))
        w.resp = resp
        connect(w, float(i))
    return resp, resp.ike_sas()


def test_a_tick_looks_at_the_due_ike_sas_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 40 IKE SAs whose liveness checks fall due one a second, a tick at one's deadline
    visits that one IKE SA only, and the next_deadline() after it computes the deadline of
    that one (a walk computed 40 each time)."""
    resp, sas = established(40)
    assert resp.next_deadline() == 30.0 == sas[0].last_heard + 30.0
    assert resp.tick(0.5) == []  # (the first tick audits: every IKE SA once)
    seen: list[IkeSA] = []
    real = IkeEngine._deadline_of

    def counted(ike: IkeSA) -> float | None:
        seen.append(ike)
        return real(ike)

    monkeypatch.setattr(IkeEngine, "_deadline_of", staticmethod(counted))
    out = resp.tick(30.0)
    assert [o.dst for o in out if isinstance(o, Send)] == [sas[0].remote] and len(out) == 1
    assert sas[0].pending is not None and sas[0].pending.kind == "liveness"
    assert resp.next_deadline() == 31.0  # the second IKE SA's check (the first's: at 32)
    assert seen == [sas[0]]
    seen.clear()
    assert resp.next_deadline() == 31.0 and seen == []
    out = resp.tick(31.0)
    assert [o.dst for o in out if isinstance(o, Send)] == [sas[1].remote]
    assert resp.next_deadline() == 32.0 and seen == [sas[1]]


def test_what_the_adapter_sets_on_an_ike_sa_moves_its_deadline() -> None:
    """The adapter sets ``quiet`` around a transfer, straight on the IKE SA: a quiet IKE
    SA has no deadline, and one no longer quiet has its own again at once."""
    resp, (ike,) = established(1, dpd=10.0)
    assert resp.next_deadline() == ike.last_heard + 10.0
    ike.quiet = True
    assert resp.next_deadline() is None
    ike.quiet = False
    assert resp.next_deadline() == ike.last_heard + 10.0
    ike.rekey_at = 3.0
    assert resp.next_deadline() == 3.0


def test_an_unmarked_change_is_found_by_the_audit(caplog: pytest.LogCaptureFixture) -> None:
    """A CHILD SA's rekey time changed in place, not by the engine and not marked: the heap
    cannot see it (the walk would), until the audit (every TIMER_AUDIT s, at a tick) finds
    it: counted, logged, corrected, and the rekey goes."""
    resp, (ike,) = established(1, dpd=0.0)
    assert resp.next_deadline() is None
    resp.tick(1.0)  # (the first tick audits)
    child = ike.children[0]
    child.rekey_at = 5.0  # in place: nothing marks it
    assert resp.next_deadline() is None and reference_deadline(resp) == 5.0
    assert resp.tick(10.0) == []  # no audit due yet
    with caplog.at_level(logging.WARNING, logger="ipsecct.ikev2"):
        out = resp.tick(1.0 + TIMER_AUDIT)
    assert resp.stats["deadline-missed"] == 1
    assert any("ike-deadline-missed" in r.getMessage() for r in caplog.records)
    assert [type(o) for o in out] == [Send] and ike.pending is not None
    assert ike.pending.kind == "rekey-child"
    assert resp.next_deadline() == reference_deadline(resp) == ike.pending.deadline


def test_the_heap_stays_bounded_as_deadlines_move() -> None:
    """Each liveness check of the MN moves the gateway's deadline for its IKE SA 0.05 s
    later (a new heap entry; the old one stale, 30 s ahead): 400 of them leave a heap of a
    few entries, not 400, and the heap's deadline stays the walk's."""
    w = pair(mn_conn(), conn(dpd=30.0))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    now = 0.0
    for _ in range(400):
        now += 0.05
        w.deliver(w.ini.liveness(ike_i, now), "i", now)
        assert ike_r.last_heard == now
        assert w.resp.next_deadline() == reference_deadline(w.resp) == now + 30.0
        assert len(w.resp._timer_heap) <= 2 * len(w.resp.by_spi) + 64 + 1
    assert w.resp.stats["liveness-answered"] == 400


def test_a_copy_of_an_ike_sa_put_in_under_its_own_spi_has_its_own_deadline() -> None:
    """A copy of an IKE SA in the table carries that one's heap entry number; put in under
    its own SPI it gets an entry of its own (benchmarks/ike_timers.py makes its IKE SAs so)."""
    import copy

    resp, (ike,) = established(1, dpd=10.0)
    assert resp.next_deadline() == ike.last_heard + 10.0
    twin = copy.copy(ike)
    twin.spi_r = bytes(7) + b"\1"
    resp.by_spi[twin.our_spi] = twin
    assert resp.next_deadline() == ike.last_heard + 10.0 == reference_deadline(resp)
    out = resp.tick(ike.last_heard + 10.0)
    assert len([o for o in out if isinstance(o, Send)]) == 2  # a liveness check each
    assert twin.pending is not None and ike.pending is not None
    assert resp.next_deadline() == reference_deadline(resp) == ike.pending.deadline


def test_the_timer_benchmark_runs() -> None:
    """benchmarks/ike_timers.py on 60 IKE SAs: each tick at an IKE SA's deadline sends that
    one's liveness check and the next deadline is the next IKE SA's (its own asserts)."""
    from benchmarks.ike_timers import measure

    r = measure(60, 20)
    assert set(r) == {"next_deadline_us", "tick_one_due_us", "next_deadline_after_tick_us"}


def test_timers_long_overdue_at_a_wake_send_one_request_and_give_up_on_nothing() -> None:
    """A gateway that did not run for a long while (SIGSTOP, a loaded machine; its cluster
    lease still held) ticks at its wake with every deadline long past: a request of its own
    left unanswered before the stop is retransmitted once (the retransmissions are counted,
    not timed: the peer is not declared dead for the time it was not asked), nothing else
    starts while it is pending, and once the peer answers the IKE SA goes on."""
    w = pair(mn_conn(dpd=10), conn(dpd=10, child_rekey=60.0))
    connect(w)
    (ike,) = w.resp.ike_sas()
    w.deliver(w.resp.tick(10.0), "r", 10.0, drop=True)  # a liveness check, then the stop
    assert ike.pending is not None and w.resp.stats["retransmitted"] == 0
    mid = ike.my_next_mid
    woke = 10.0 + 1000.0  # every retransmission, the DPD and the CHILD SA's rekey long due
    outs = w.resp.tick(woke)
    assert [type(o) for o in outs] == [Send], outs
    assert w.resp.stats["retransmitted"] == 1 and w.resp.stats["peer-dead"] == 0
    assert ike.my_next_mid == mid  # the same request again, under its own message ID
    assert w.resp.tick(woke) == []  # one at a time: nothing more at once
    w.deliver(outs, "r", woke)
    assert ike.pending is None and ike.state is IkeState.ESTABLISHED
    assert w.resp.stats["liveness-ok"] == 1 and w.ini.stats["bad-message-id"] == 0

"""The IKE engine's indexes (ikev2.engine._IkeTable, _HalfOpenTable): what IKE_SA_INIT and
IKE_AUTH ask of every IKE SA (how many from this host, which of this connection and identity,
which one's crossed rekey made this one) without a walk of all of them. Held to the walk they
replace: random operations (those of test_ikev2_timers: establish, rekeys and their
collisions, deletes, exports and imports, fail-over syncs, quiet IKE SAs, time passing; and
here also IKE_SA_INITs of other hosts, an IKE SA's peer address or identity set from outside,
a copy of one put in) and after each one every index is what a walk of the tables gives.

The audit of the deadlines goes over the IKE SAs a slice a tick, never all in one turn."""

from __future__ import annotations

import copy
import ipaddress
import logging
import random
from collections import Counter

import pytest
from benchmarks.ike_timers import engine as timer_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.errors import IkeContextError
from ipsecct.ikev2.engine import TIMER_AUDIT, TIMER_AUDIT_SLICE, IkeEngine, Output, Send
from ipsecct.ikev2.ikesa import Address, IkeSA, IkeState
from tests.helpers.ike_timer_world import KINDS, Op, World, connect_world
from tests.helpers.ikev2_engines import I500, R500, Wire, conn, connect, crossed, mn_conn, pair

HOSTS = [ipaddress.ip_address(h)
         for h in ("192.0.2.10", "192.0.2.77", "198.51.100.9", "2001:db8::5")]
EXTRA = ("float", "rename", "init_from", "copy", "collide_with", "uncollide")


def walk_check(eng: IkeEngine) -> None:
    """Every index of ``eng`` is what a walk of its tables gives (the old code's walks)."""
    t = eng.by_spi
    entries = list(t.values())
    assert t._per_host == dict(Counter(i.remote.host for i in entries))
    for h in HOSTS:
        assert t.from_host(h) == sum(1 for i in entries if i.remote.host == h)
    idents = {(i.conn.name, i.peer_id) for i in entries}
    assert set(t._by_identity) == idents
    for name, pid in idents | {("c", "nobody")}:
        assert t.of_identity(name, pid) == [
            i for i in entries if i.peer_id == pid and i.conn.name == name]
    targets = {i.collided[0] for i in entries if i.collided is not None}
    assert set(t._collided_in) == targets
    for x in [*entries, *targets]:
        assert t.collided_parent(x) is next(
            (o for o in entries if o.collided is not None and o.collided[0] is x), None)
    assert set(t._filed) == set(entries)
    ho = eng.half_open
    assert ho._per_host == Counter(h for (_s, h) in ho)
    for h in HOSTS:
        assert ho.from_host(h) == sum(1 for (_s, x) in ho if x == h)
    assert {i: sorted(ks) for i, ks in ho._keys_of.items()} == {
        i: sorted(k for k, v in ho.items() if v is i) for i in set(ho.values())}


class IndexWorld(World):
    """test_ikev2_timers' two engines, with the operations that move an index by hand."""

    def step(self, op: Op) -> None:
        kind, a, b = op
        if kind not in EXTRA:
            try:
                super().step(op)
            except IkeContextError as exc:  # (a "rename" the importing policy refuses)
                self.trace.append(("", ("refused", str(exc))))
            return
        eng = self.ini if b % 2 else self.resp
        sas = eng.ike_sas()
        ike = sas[a % len(sas)] if sas else None
        if kind == "init_from":  # an MN elsewhere starts an IKE SA: half-open at the gateway
            mn = IkeEngine([mn_conn()])
            (s,) = mn.initiate(mn.connections[0], I500, R500, self.now)
            assert isinstance(s, Send)
            self.resp.receive(s.data, Address(HOSTS[a % len(HOSTS)], 500 + b), R500, self.now)
        elif ike is None:
            return
        elif kind == "float":  # NAT floating, MOBIKE, a transfer: set from anywhere
            ike.remote = Address(HOSTS[a % len(HOSTS)], 4500)
        elif kind == "rename":
            ike.peer_id = ("", "mn0.test", "mn1.test", "x")[a % 4]
        elif kind == "copy":  # (as benchmarks/ike_timers.py makes its IKE SAs)
            twin = copy.copy(ike)
            twin.children, twin.pending = [], None
            twin.queued_deletes, twin.children_wanted = [], []  # (not the original's lists)
            twin.spi_r = bytes([0xEE, a, b]) + bytes(5)
            twin.we_initiated = False
            eng.by_spi[twin.our_spi] = twin
        elif kind == "collide_with":  # (what the engine sets when a rekey crosses ours)
            ike.collided = (sas[b % len(sas)], b"", b"")
        elif kind == "uncollide":
            ike.collided = None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KINDS + EXTRA), st.integers(0, 15),
                          st.integers(0, 3)), min_size=1, max_size=40),
       st.integers(0, 1000))  # fmt: skip
def test_the_indexes_are_the_walks_after_every_operation(ops: list[Op], seed: int) -> None:
    w = IndexWorld(seed, False)
    connect_world(w)
    for eng in w.engines():
        walk_check(eng)
    for op in ops:
        w.step(op)
        for eng in w.engines():
            walk_check(eng)


@pytest.mark.parametrize("seed", range(8))
def test_crossed_ike_rekeys_find_the_ike_sa_whose_rekey_goes_on(seed: int) -> None:
    """§2.8.2 (test_ikev2's test_simultaneous_ike_rekey) with the indexes checked after each
    message: the side whose rekey lost deletes the IKE SA its request made, and the other
    finds, by the index, the IKE SA whose rekey goes on (the CHILD SA moves to it)."""
    w = pair(mn_conn(dpd=10), conn())
    connect(w)
    rnd = random.Random(seed)
    w.ini.random = w.resp.random = lambda n: rnd.randbytes(n)
    checked = Wire.deliver

    def deliver(self: Wire, outs: list[Output], side: str, now: float = 0.0, *,
                drop: bool = False) -> None:  # fmt: skip
        walk_check(self.ini)
        walk_check(self.resp)
        checked(self, outs, side, now, drop=drop)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Wire, "deliver", deliver)
        crossed(w, w.ini.rekey_ike(w.ini.ike_sas()[0], 10.0),
                w.resp.rekey_ike(w.resp.ike_sas()[0], 10.0), 10.0)  # fmt: skip
        for t in (70.0, 71.0):
            w.deliver(w.ini.tick(t), "i", t)
            w.deliver(w.resp.tick(t), "r", t)
    for eng in (w.ini, w.resp):
        walk_check(eng)
        (ike,) = eng.ike_sas()
        assert ike.state is IkeState.ESTABLISHED and len(ike.children) == 1
        assert ike.collided is None and not eng.by_spi._collided_in


def test_an_ike_sa_leaving_the_table_leaves_its_indexes_by_every_path() -> None:
    """del, pop, a newer IKE SA under its SPI, clear: none keeps it filed, and what is set
    on it afterwards files nothing."""
    w = IndexWorld(1, False)
    connect_world(w)
    resp = w.resp
    (ike,) = resp.ike_sas()
    for take in ("del", "pop", "replace", "clear"):
        twin = copy.copy(ike)
        twin.spi_r = b"\xee" * 8
        resp.by_spi[twin.our_spi] = twin
        assert resp.by_spi.from_host(ike.remote.host) == 2
        if take == "del":
            del resp.by_spi[twin.our_spi]
        elif take == "pop":
            assert resp.by_spi.pop(twin.our_spi) is twin
            assert resp.by_spi.pop(twin.our_spi, None) is None
        elif take == "replace":
            other = copy.copy(ike)
            other.spi_r = twin.spi_r
            resp.by_spi[twin.our_spi] = other
            del resp.by_spi[twin.our_spi]
        else:
            resp.by_spi.clear()
            resp.by_spi[ike.our_spi] = ike
        twin.remote = Address(HOSTS[3], 4500)
        twin.peer_id = "elsewhere"
        walk_check(resp)
        assert resp.by_spi.from_host(HOSTS[3]) == 0
        assert resp.by_spi.of_identity("c", ike.peer_id) == [ike]
    with pytest.raises(TypeError):
        resp.by_spi.update({})


def test_a_flood_of_ike_sa_init_counts_each_source_without_a_walk() -> None:
    """IKE_SA_INITs from two hosts: each is held to its own MAX_HALF_OPEN_PER_SOURCE (20),
    counted by the index, and the count follows the entries out (IKE_AUTH never came)."""
    resp = IkeEngine([conn()])
    for k in range(60):
        mn = IkeEngine([mn_conn()])
        (s,) = mn.initiate(mn.connections[0], I500, R500, 0.0)
        assert isinstance(s, Send)
        resp.receive(s.data, Address(HOSTS[k % 2], 500), R500, 0.0)
        walk_check(resp)
    assert resp.half_open.from_host(HOSTS[0]) == resp.half_open.from_host(HOSTS[1]) == 20
    assert resp.by_spi.from_host(HOSTS[0]) == 20
    assert resp.stats["half-open-limit"] == 20
    resp.tick(31.0)
    walk_check(resp)
    assert resp.half_open.from_host(HOSTS[0]) == resp.by_spi.from_host(HOSTS[0]) == 0


def test_the_audit_goes_a_slice_a_tick(caplog: pytest.LogCaptureFixture) -> None:
    """600 IKE SAs: the audit's pass visits at most TIMER_AUDIT_SLICE of them a tick, asks
    for the next tick at once while under way, and still finds an unmarked change in the
    last slice (counted, logged, corrected); then the next pass is TIMER_AUDIT away."""
    n = 600
    resp, sas = timer_engine(n)
    start = 20.0 - TIMER_AUDIT  # (the second pass at 20 s: before the first DPD, at 30 s)
    assert resp.tick(start) == []  # (the first pass, over the unchanged table)
    for _ in range(n // TIMER_AUDIT_SLICE + 1):
        resp.tick(start)
    assert not resp._audit_spis and resp.next_deadline() == 30.0
    last = sas[-1]
    last.children[0].rekey_at = 20.0  # in place: nothing marks it
    now = 20.0
    assert resp.next_deadline() == 30.0
    ticks = 0
    with caplog.at_level(logging.WARNING, logger="ipsecct.ikev2"):
        while True:
            before = resp._audit_pos
            out = resp.tick(now)
            ticks += 1
            assert resp._audit_pos - before <= TIMER_AUDIT_SLICE
            if not resp._audit_spis:
                break
            assert resp.next_deadline() == now  # the rest of the pass: at once
            assert resp.stats["deadline-missed"] == 0 and not out
    assert ticks == -(-n // TIMER_AUDIT_SLICE)
    assert resp.stats["deadline-missed"] == 1
    assert any("ike-deadline-missed" in r.getMessage() for r in caplog.records)
    assert [type(o) for o in out] == [Send] and last.pending is not None
    assert last.pending.kind == "rekey-child"
    assert resp.next_deadline() == last.pending.deadline  # (its retransmission)
    assert resp._timer_audit_at == now + TIMER_AUDIT


def test_an_ike_sa_has_no_dict() -> None:
    """IkeSA has slots: an attribute nobody declared is an error, not a silent new field
    (mypy does not tell: IkeSA's __setattr__ lets it take any name), and 10,000 IKE SAs do
    not carry a dict each."""
    w = IndexWorld(2, False)
    connect_world(w)
    ike: IkeSA = w.resp.ike_sas()[0]
    assert not hasattr(ike, "__dict__")
    with pytest.raises(AttributeError):
        ike.no_such_field = 1
    assert ike.state is IkeState.ESTABLISHED


def test_the_walk_benchmark_runs() -> None:
    """benchmarks/ike_walks.py on 300 IKE SAs (its own asserts: every IKE_SA_INIT answered,
    every identity admitted, each audit pass ending TIMER_AUDIT before the next)."""
    from benchmarks.ike_walks import measure

    r = measure(300, 5)
    assert r["audit_ticks"] == 2 and r["sa_init_us"] > 0

"""A transfer away from the active of a fail-over pair, and the standby (sans-I/O).

sg1 is the active (a real Replicator, with the lease), sg2 its standby (a real Standby), sg3
a third gateway that sg1 transfers its tunnel to; ESP between real engines, CXTP through the
wire form (``tests/helpers/transfer.py``). The defect: sg1 committed the transfer to sg3
and died before its next sync told sg2 that the tunnel had left; sg2 took it over at its
replica + ``seq_margin`` while sg3 sent on from sg1's last number: once sg3 had sent about
``seq_margin`` packets the two sent the same (SPI, sequence number) pairs (docs/cluster.md,
"a tunnel transferred away").
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.ct import cxtp, failover
from ipsecct.ct.journal import GRANT
from ipsecct.ct.transfer import Identity, LeavingMark, Settings
from ipsecct.errors import CxtpError
from ipsecct.ipsec.engine import TunnelState
from ipsecct.ipsec.ippacket import Endpoint
from tests.helpers.transfer import PORT, SG_ADDR, World, ip

MARGIN = 64


def fo_cfg(role: str) -> failover.FailoverConfig:
    return failover.FailoverConfig(
        role,
        "sg2" if role == "active" else "sg1",
        sync_packets=16,
        heartbeat_ms=50.0,
        dead_ms=300.0,
        seq_margin=MARGIN,
        tick_ms=10.0,
    )


class Pair:
    """The world with sg1's Replicator and sg2's Standby; sync messages wait in ``down``
    (sg1 -> sg2) and ``up`` until the test delivers them. ``gate``: sg1's transfer core
    waits for sg2 as the gateway wires it (FailoverDriver); False: the code before."""

    def __init__(self, *, gate: bool = True, mbb: bool = False, paired: bool = True) -> None:
        # sg3 knows sg1 and sg2 as a fail-over pair ([[peers]] pair): sg2 may ask about
        # sg1's transfers
        pairs = {"sg1": frozenset({"sg2"}), "sg2": frozenset({"sg1"})} if paired else {}
        s = Settings(make_before_break=mbb, pairs=pairs)
        self.w = w = World(("sg1", "sg2", "sg3"), settings={g: s for g in ("sg1", "sg2", "sg3")})
        self.g1, self.g2, self.g3 = w.gw["sg1"], w.gw["sg2"], w.gw["sg3"]
        self.r = failover.Replicator(self.g1.engine, fo_cfg("active"), session=7)
        self.sb = failover.Standby(
            self.g2.engine, fo_cfg("standby"), Endpoint(ip(SG_ADDR["sg2"]), PORT), Identity.DIRECT
        )
        self.down: list[cxtp.CTD] = []
        self.up: list[cxtp.CTD] = []
        self.dead = False
        if gate:
            core = self.g1.core
            self.r.leaving_of = core.leaving.get
            core.standby_gate = self.r.told
            self.r.on_told = lambda: self.g1.run(core.settled(w.now))

    def poll(self) -> None:
        if not self.dead:
            for m in self.r.handle_timer(self.w.now):
                d = cxtp.decode(cxtp.encode(m))
                assert isinstance(d, cxtp.CTD)
                self.down.append(d)

    def deliver(self) -> None:
        down, self.down = self.down, []
        for m in down:
            self.up += self.sb.receive(m, self.w.now)
        up, self.up = self.up, []
        if not self.dead:
            for m in up:
                self.r.receive(cxtp.decode(cxtp.encode(m)), self.w.now)

    def sync(self) -> None:
        self.w.now += 0.011
        self.poll()
        self.deliver()

    def die(self) -> None:
        """sg1 dies: nothing more from it, nothing to it."""
        self.dead = True
        self.down.clear()
        for k in [k for k in self.w.links if "sg1" in k]:
            self.w.links[k].clear()

    def take_over(self) -> None:
        """sg2 takes over once the dead time and every lease granted have passed, and asks
        about the tunnels marked leaving, as FailoverDriver does."""
        self.w.now += 1.0
        assert self.sb.dead(self.w.now)
        self.sb.take_over(self.w.now)
        for mark, tunnels in self.sb.leaving_taken:
            asked = [(mark.tid, mark.peer, tunnels)]
            signals = self.sb.leaving_signals
            self.g2.run(self.g2.core.recall_unresolved(asked, self.w.now, None, signals))

    def deliver_between(self, a: str, b: str) -> None:
        """Every message between gateways ``a`` and ``b`` (not the sync channel)."""
        while self.w.pending(a, b) or self.w.pending(b, a):
            if self.w.pending(a, b):
                self.w.deliver(a, b)
            if self.w.pending(b, a):
                self.w.deliver(b, a)

    def both_send(self, n: int = 3 * MARGIN) -> None:
        for i in range(n):
            for g in ("sg2", "sg3"):
                self.w.host_send(g, i)

    def pairs_twice(self) -> list[tuple[int, int]]:
        seen: dict[tuple[int, int], str] = {}
        twice = []
        for g, spi, seq in self.w.all_wire():
            if (spi, seq) in seen and seen[(spi, seq)] != g:
                twice.append((spi, seq))
            seen.setdefault((spi, seq), g)
        return twice


def started(gate: bool = True, **kw: Any) -> Pair:
    """sg1 serves the tunnel, replicated to sg2 and acknowledged; some traffic, synced."""
    p = Pair(gate=gate, **kw)
    p.sync()
    for i in range(40):
        p.w.host_send("sg1", i)
    p.sync()
    assert p.g1.wire and not p.g1.refused_hold
    return p


def test_the_defect_a_commit_before_the_standby_knew_makes_it_reuse_the_targets_numbers() -> None:
    """Without the gate (the code before): sg1 commits to sg3 and dies before its next sync;
    sg2 takes the tunnel over from its replica and sends beside sg3: pairs twice. With the
    gate the COMMIT never left (sg2 had not acknowledged the mark): sg3 holds the tunnel,
    sg2 serves it alone; no pair twice."""
    for gate in (False, True):
        p = started(gate)
        p.w.transfer("sg1", "sg3")
        p.deliver_between("sg1", "sg3")
        t3 = p.g3.engine.tunnels()[0]
        assert (t3.state is TunnelState.ACTIVE) is not gate  # committed only without gate
        p.die()
        p.take_over()
        p.both_send()
        assert p.g2.wire and (bool(p.g3.wire) is not gate)
        assert bool(p.pairs_twice()) is not gate, gate


def test_a_standby_that_takes_over_a_tunnel_committed_away_asks_and_stays_away() -> None:
    """The mark reached sg2 and was acknowledged, the COMMIT left, sg3 sends; sg1 dies before
    the removal reaches sg2. sg2 takes the tunnel over held, asks sg3 ("taken") and drops
    it: sg3 alone sends on it."""
    p = started()
    p.w.transfer("sg1", "sg3")
    p.deliver_between("sg1", "sg3")  # the CTDR came back: the COMMIT waits for sg2
    assert p.g3.engine.tunnels()[0].state is TunnelState.HELD and not p.g1.finished
    p.sync()  # the mark goes; the acknowledgement lets the COMMIT go
    assert p.sb.marks and p.g1.finished and p.g1.finished[-1].outcome == "committed"
    p.deliver_between("sg1", "sg3")
    assert p.g3.engine.tunnels()[0].state is TunnelState.ACTIVE
    p.die()
    p.take_over()
    assert p.g2.engine.tunnels()[0].state is TunnelState.HELD
    p.w.host_send("sg2", 0)
    assert not p.g2.wire  # held: never sent on before the answer
    p.deliver_between("sg2", "sg3")
    assert not p.g2.engine.tunnels() and p.g2.finished[-1].detail == "taken by sg3"
    p.both_send()
    assert p.g3.wire and not p.g2.wire and not p.pairs_twice()


def test_a_standby_asking_a_target_that_waits_for_the_commit_makes_it_the_commit() -> None:
    """sg1 dies after sg2 acknowledged the mark, before the CTDR came back: sg3 holds the
    tunnel installed, waiting. sg2's query is its COMMIT: sg3 serves the tunnel."""
    p = started()
    p.w.transfer("sg1", "sg3")
    p.sync()
    p.w.deliver("sg1", "sg3")  # the contexts; the CTDR is lost with sg1
    p.die()
    p.take_over()
    p.deliver_between("sg2", "sg3")
    assert p.g3.engine.tunnels()[0].state is TunnelState.ACTIVE
    assert not p.g2.engine.tunnels()
    p.both_send()
    assert p.g3.wire and not p.g2.wire and not p.pairs_twice()


def test_invariant_a_standby_whose_pair_the_target_does_not_know_never_makes_two_senders() -> None:
    """As above, but sg3 does not know sg1 and sg2 as a fail-over pair ([[peers]] pair):
    sg2's query about sg1's pending transfer is another peer's (it could as well come from
    a hostile peer while sg1 lives and rolls back): not taken for the COMMIT, counted, not
    answered; both hold the tunnel. Once sg3 gave the transfer up (no decision) and forgot
    it, the query is answered "taken" (it was installed there: the safe answer) and sg2
    drops the tunnel: lost, never sent twice."""
    p = started(paired=False)
    p.w.transfer("sg1", "sg3")
    p.sync()
    p.w.deliver("sg1", "sg3")
    p.die()
    p.take_over()
    p.deliver_between("sg2", "sg3")
    assert p.g3.engine.tunnels()[0].state is TunnelState.HELD
    assert p.g3.core.counters["foreign_query"] >= 1
    assert p.g2.engine.tunnels()[0].state is TunnelState.HELD
    for _ in range(200):
        if not p.g2.engine.tunnels():
            break
        p.w.now += 0.5
        p.g3.tick()
        p.g2.tick()
        p.deliver_between("sg2", "sg3")
    assert not p.g2.engine.tunnels() and not p.g3.engine.tunnels()
    p.both_send()
    assert not p.g2.wire and not p.g3.wire and not p.pairs_twice()


def test_a_standby_told_not_taken_resumes_past_the_margin_and_the_grant() -> None:
    """sg1 dies while its contexts are still on their way (sg3 never installed them): sg2
    asks, hears "not taken" and resumes past the transferred number + the grant (what sg3
    could have sent under a COMMIT's grant); late contexts from sg1 are refused."""
    p = started(mbb=True)
    p.w.transfer("sg1", "sg3")
    p.sync()
    (mark,) = p.sb.marks.values()
    assert mark.peer == "sg3" and mark.at > p.w.tunnel.outbound.seq  # the cap
    p.die()
    p.take_over()
    p.deliver_between("sg2", "sg3")
    assert p.g2.finished[-1].detail == "not taken by sg3: kept"
    (t2,) = p.g2.engine.tunnels()
    assert t2.state is TunnelState.ACTIVE
    # resumed: the MN is told the new address (SG_UPDATE in the SA), past the grant
    assert p.g2.wire == [(t2.outbound.spi, (mark.at + GRANT + 1) & 0xFFFFFFFF)]
    p.w.flush_to_mn()
    assert p.w.mn.applied and str(p.w.mn.out_sa.dst) == SG_ADDR["sg2"]
    p.w.host_send("sg2", 0)
    assert p.g2.wire[-1][1] == (mark.at + GRANT + 2) & 0xFFFFFFFF
    assert not p.g3.engine.tunnels()


def test_a_rolled_back_transfer_sends_again_only_once_the_standby_dropped_the_mark() -> None:
    """The transfer is abandoned; sg1 takes the tunnel back, but sends on it only once sg2
    acknowledged it unmarked (else sg2, taking over, could ask sg3 and be answered by a
    COMMIT taken from its query while sg1 sends). Then sg1 dies: sg2 takes it over as any
    tunnel."""
    p = started()
    tid = p.w.transfer("sg1", "sg3")
    p.sync()
    assert p.sb.marks
    p.g1.run(p.g1.core.abandon(tid, p.w.now, "the operator stopped waiting"))
    assert p.g1.finished[-1].outcome == "timeout"
    t1 = p.w.tunnel
    assert t1.state is TunnelState.HELD and p.g1.core.reverting
    n = len(p.g1.wire)
    p.w.host_send("sg1", 100)
    assert len(p.g1.wire) == n  # held until sg2 has it unmarked
    p.sync()
    assert not p.sb.marks and not p.g1.core.reverting and t1.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed
    assert len(p.g1.wire) == n + 1  # the held packet went
    p.sync()  # (held, it was dropped from the replicas; active again, it is sent again)
    assert list(p.sb.replica) == [p.w.tunnel.outbound.spi]
    p.die()
    p.take_over()
    assert p.g2.engine.tunnels()[0].state is TunnelState.ACTIVE
    p.w.host_send("sg2", 0)
    assert p.g2.wire and not p.pairs_twice()


def test_nobody_to_ask_the_tunnel_stays_held() -> None:
    """The mark names a gateway sg2 cannot reach (not among its peers): it stays held and
    is never sent on (the driver tells the operator; sa discard gives it up)."""
    p = started()
    p.w.transfer("sg1", "sg3")
    p.sync()
    p.die()
    p.w.now += 1.0
    p.sb.take_over(p.w.now)
    ((mark, tunnels),) = p.sb.leaving_taken
    assert mark.peer == "sg3" and tunnels[0].state is TunnelState.HELD
    for i in range(5):
        p.w.host_send("sg2", i)
    assert not p.g2.wire


def test_leaving_mark_cdb_round_trip() -> None:
    m = LeavingMark(0x0123456789ABCDEF, "sg3", 1 << 40)
    cdb = failover.leaving_cdb(0x2001, m, 3)
    assert failover.parse_leaving(cdb) == (0x2001, m)
    assert failover.parse_sync_kind(cdb)[0] == failover.SYNC_LEAVING
    assert failover.parse_leaving(failover.leaving_cdb(0x2001, None, 3)) == (0x2001, None)
    assert failover.parse_leaving(failover.sync_cdb([], 1)) is None


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_parse_leaving_fuzz(data: bytes) -> None:
    """parse_leaving reads bytes from the network: a CxtpError, None, or an SPI and a mark
    (or none), nothing else."""
    head = failover.leaving_cdb(1, LeavingMark(1, "x", 2), 1)[:4]
    for cdb in (head + data, head + bytes((failover.SYNC_LEAVING,)) + data):
        try:
            got = failover.parse_leaving(cdb)
        except CxtpError:
            continue
        if got is not None:
            spi, mark = got
            assert 0 <= spi <= 0xFFFFFFFF
            assert mark is None or (
                mark.peer and 0 <= mark.tid < 1 << 64 and 0 <= mark.at < 1 << 64
            )


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, 200), flip=st.integers(0, 255))
def test_a_standby_takes_a_damaged_marked_sync_whole_or_not_at_all(cut: int, flip: int) -> None:
    """A sync message with contexts and a mark, damaged (a CDB's octet changed): the
    standby raises CxtpError (the driver logs sync-malformed) or applies it, nothing else."""
    p = started(mbb=True)  # (the tunnel sends on while it is being transferred)
    p.w.transfer("sg1", "sg3")
    for i in range(20):
        p.w.host_send("sg1", i)  # sync_packets: its contexts go with the mark
    p.w.now += 0.011
    (m,) = p.r.handle_timer(p.w.now)
    assert isinstance(m, cxtp.CTD)
    cdbs = list(m.cdbs)
    i = 1 + cut % (len(cdbs) - 1)
    b = bytearray(cdbs[i])
    b[4 + cut % max(1, len(b) - 4)] ^= flip or 1
    cdbs[i] = bytes(b)
    sb = failover.Standby(
        p.g2.engine, fo_cfg("standby"), Endpoint(ip(SG_ADDR["sg2"]), PORT), Identity.DIRECT
    )
    try:
        sb.receive(cxtp.CTD(m.mn_prev, 0, tuple(cdbs)), p.w.now)
    except CxtpError:
        return
    assert all(isinstance(v, LeavingMark) for v in sb.marks.values())
    assert all(isinstance(v, list) for v in sb.replica.values())


def test_an_ike_sa_whose_child_sas_all_leave_is_not_taken_over() -> None:
    """An IKE SA moves with its CHILD SAs: if every CHILD SA the standby holds of it is
    marked leaving, the standby does not take it over (the target may run it; one IKE SA
    run by two gateways uses its message IDs twice). Another IKE SA is taken as before."""
    p = started()
    spi = p.w.tunnel.outbound.spi
    p.w.transfer("sg1", "sg3")
    p.sync()
    p.sb.extra = {b"moving": [b"a"], b"staying": [b"b"]}
    p.sb.extra_tunnels = lambda cdbs: [spi] if cdbs == [b"a"] else [0x7777]
    p.die()
    p.w.now += 1.0
    p.sb.take_over(p.w.now)
    assert list(p.sb.extra) == [b"staying"]


def test_contexts_late_behind_a_standbys_query_are_refused() -> None:
    """commit_early: sg1's contexts and COMMIT are still on their way to sg3 when sg2 (sg1
    died) asks about the transfer sg3 has not heard of: "not taken", and the late messages
    of that transfer are refused, from sg1 too (else the COMMIT would activate the tunnel at
    sg3 beside sg2, which resumed)."""
    p = started()
    p.g1.core.settings.commit_early = True
    p.w.transfer("sg1", "sg3")
    p.sync()  # the mark is acknowledged: the COMMIT goes at once, behind the contexts
    late = list(p.w.links[("sg1", "sg3")])
    assert len(late) >= 2
    p.die()
    p.take_over()
    p.deliver_between("sg2", "sg3")
    assert p.g2.finished[-1].detail == "not taken by sg3: kept"
    p.w.links[("sg1", "sg3")].extend(late)
    while p.w.pending("sg1", "sg3"):
        p.w.deliver("sg1", "sg3")
    assert not p.g3.engine.tunnels()
    p.both_send()
    assert p.g2.wire and not p.g3.wire and not p.pairs_twice()


def test_the_durable_state_records_a_marked_take_over_leaving_and_unresolved(
    tmp_path: Path,
) -> None:
    """With a real store: a standby's take-over of a marked tunnel is recorded "leaving" to
    the target by the transfer (ceiling at least its counter, already past the margin and
    the grant), listed unresolved (asked about, in status, given up by sa discard); "not
    taken" resumes it past that ceiling; and a restart before the answer finds the row
    "leaving": it asks again rather than resume."""
    from ipsecct.ct.journal import Owner
    from ipsecct.gateway import state as state_mod

    p = started()
    p.w.transfer("sg1", "sg3")
    p.sync()
    p.die()
    p.w.now += 1.0
    store, lock = state_mod.open_store(tmp_path / "s", "sg2", [], fresh=False)
    node = SimpleNamespace(name="sg2", extensions={}, on_reserve=None)
    st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
    p.sb.journal = st
    p.sb.take_over(p.w.now)
    ((mark, (t,)),) = p.sb.leaving_taken
    row = store.load()[store.fingerprint(t.outbound)]
    assert (row.owner, row.transfer, row.gateway) == (Owner.LEAVING, mark.tid, "sg3")
    assert row.ceiling >= t.outbound.seq >= mark.at + GRANT
    assert st.unresolved_transfers() == {(mark.tid, "sg3"): [t.outbound]}
    st.not_asked(mark.tid, "sg3", "peer 'sg3' is not among [[peers]]")
    assert list(st.unasked.values()) == ["peer 'sg3' is not among [[peers]]"]
    seq = t.outbound.seq
    assert st.resumed([t], "sg3").done  # "not taken"
    assert not st.unresolved_transfers()
    after = store.load()[store.fingerprint(t.outbound)]
    assert after.owner is Owner.OWNED and after.ceiling > row.ceiling and t.outbound.seq >= seq
    store.close()


def test_the_driver_asks_a_target_among_its_peers_and_tells_of_one_that_is_not() -> None:
    """FailoverDriver after a take-over: each mark's target is asked (the decision query,
    with the transfer's age since the mark first came); a target not among [[peers]] is
    not asked, and the durable state tells the operator (transfer-outcome-unknowable,
    status, sa discard)."""
    from ipsecct.gateway.failover_driver import FailoverDriver

    asked: list[Any] = []
    unasked: list[Any] = []
    core = SimpleNamespace(
        recall_unresolved=lambda tr, now, ages, sig: asked.append((tr, ages, sig)) or [],  # type: ignore[func-returns-value]
    )
    me = SimpleNamespace(
        transfer=SimpleNamespace(
            core=core, tcfg=SimpleNamespace(peers={"sg3": None}), run=lambda outs: None
        ),
        journal=SimpleNamespace(not_asked=lambda *a: unasked.append(a)),
        node=SimpleNamespace(name="sg2"),
        cfg=SimpleNamespace(peer="sg1"),
    )
    t1, t2 = object(), object()
    sb = SimpleNamespace(
        leaving_taken=[
            (LeavingMark(1, "sg3", 5), [t1]),
            (LeavingMark(2, "sg9", 5), [t2]),
        ],
        mark_seen={1: 10.0, 2: 11.0},
        leaving_signals={t1: b"sg-update"},
    )
    FailoverDriver._ask_about_leaving(me, sb, 12.5)  # type: ignore[arg-type]
    assert asked == [([(1, "sg3", [t1])], {1: 2.5}, {t1: b"sg-update"})]
    assert unasked == [(2, "sg9", "peer 'sg9' is not among [[peers]]")]
    assert sb.leaving_taken == []


def test_a_move_to_another_candidate_waits_for_the_standby_to_hold_the_new_target() -> None:
    """The transfer moves on to another candidate (same transfer id, new target): the
    COMMIT to it waits for the standby to hold the mark naming the new target; the old
    mark's acknowledgement does not do (the standby would ask the gateway that refused)."""
    p = started()
    t = p.w.tunnel
    core = p.g1.core
    tid = p.w.transfer("sg1", "sg3")
    p.sync()
    assert p.sb.marks[t.outbound.spi].peer == "sg3"
    core.leaving[t] = LeavingMark(tid, "sg2", core.leaving[t].at)  # moved on
    w = p.r.told([t], tid)
    assert not w.settled
    p.r._acknowledged()  # the old mark's acknowledgement again: not enough
    assert not w.settled
    p.sync()
    assert w.done and p.sb.marks[t.outbound.spi].peer == "sg2"


def test_an_ack_beyond_what_was_sent_is_ignored_and_the_real_ones_settle_the_commit() -> None:
    """sg2 (buggy or hostile: authenticated, yet untrusted) acknowledges message 2**31,
    never sent. On main it froze the replicator's highest acknowledged number past any real
    ACK: the next transfer's COMMIT waited for good for the standby's acknowledgement of its
    mark (the transfer timed out), and the forged ACK granted the lease for messages in
    flight sg2 had not applied. Now it is ignored and counted (``acks_ahead``): the lease as
    it was, and the real ACKs that follow settle the COMMIT (guards THE invariant: the
    COMMIT still waits for sg2 to hold the mark)."""
    p = started()
    r = p.r
    p.w.now += 0.06  # (a heartbeat is due)
    p.poll()  # a message in flight, not yet applied by sg2
    assert r.lease is not None and p.down
    expiry = r.lease.expiry
    forged = cxtp.CTD(p.down[0].mn_prev, 0, cdbs=(
        cxtp.TransferTag(r.session, 1 << 31).encode(),
        failover.sync_cdb([], r.epoch, kind=failover.SYNC_ACK),
    ))  # fmt: skip
    assert r.receive(cxtp.decode(cxtp.encode(forged)), p.w.now) == []
    assert r.acks_ahead == 1 and r.lease.expiry == expiry
    p.deliver()
    p.w.transfer("sg1", "sg3")
    p.deliver_between("sg1", "sg3")  # the CTDR came back: the COMMIT waits for sg2
    assert not p.g1.finished
    p.sync()  # the mark goes; sg2's real acknowledgement lets the COMMIT go
    assert p.sb.marks and p.g1.finished and p.g1.finished[-1].outcome == "committed"
    p.deliver_between("sg1", "sg3")
    assert p.g3.engine.tunnels()[0].state is TunnelState.ACTIVE

"""Prepared transfers (sans-I/O; docs/cxtp.md, "Prepared transfers"): everything up to the
COMMIT ahead of the handover (contexts, CTDR, "leaving" durable), the source going on under
its make-before-break cap; on the trigger only the FINAL and the COMMIT leave. Time-outs at
both ends, a target of an older ipsecct, the cap, a lost channel, a restarted source, and
the invariant: no (SPI, sequence number) pair is ever sent twice."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.ct import cxtp, transfer
from ipsecct.ct.journal import Write
from ipsecct.ct.transfer import (
    FPT_DECISION,
    FPT_FINAL,
    FPT_PREPARE,
    PREPARE_GUARD,
    ConflictPolicy,
    Prepared,
    Settings,
    TransferCore,
)
from ipsecct.errors import TransferError
from ipsecct.ipsec.engine import TunnelState
from ipsecct.ipsec.spd import Action, SPDEntry
from tests.helpers.transfer import World, collide, tunnel_sas

MARGIN = 1000


def world(margin: int = MARGIN, *, target: Settings | None = None, **kw: object) -> World:
    s = {g: Settings(make_before_break=True, mbb_margin=margin, **kw) for g in ("sg1", "sg2")}  # type: ignore[arg-type]
    if target is not None:
        s["sg2"] = target
    return World(settings=s)


def unique(w: World) -> None:
    pairs = [(spi, seq) for _, spi, seq in w.all_wire()]
    assert len(pairs) == len(set(pairs)), "an (SPI, sequence number) pair was sent twice"


def prepare(w: World) -> int:
    """Start a prepared transfer sg1 -> sg2 and deliver until it is prepared."""
    outs: list[object] = []
    core = w.gw["sg1"].core
    tid, first = core.start([w.tunnel], "sg2", w.now, prepare=True)
    w.gw["sg1"].run(first)
    w.deliver("sg1", "sg2")  # PCTD: installed held, CTDR back
    w.deliver("sg1", "sg2")  # PREPARE: the target waits, and says how long
    msg = w.peek("sg2", "sg1")
    assert isinstance(msg, cxtp.CTDR)
    received = core.receive("sg2", w.drop("sg2", "sg1"), w.now)
    outs += received
    w.gw["sg1"].run(received)
    assert any(isinstance(o, Prepared) for o in outs)
    w.deliver("sg2", "sg1")  # the PREPARE answer
    return tid


def kinds(w: World, src: str, dst: str) -> list[int]:
    """The FPT of the second CDB of each message waiting on a link."""
    out = []
    for data in w.links.get((src, dst), ()):
        m = cxtp.decode(data)
        assert isinstance(m, cxtp.CTD | cxtp.PCTD)
        out.append(cxtp.cdb_fpt(m.cdbs[1]))
    return out


def test_a_prepared_transfer_sends_only_final_and_commit_on_the_trigger() -> None:
    w = world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid = prepare(w)
    assert sg1.core.prepared(tid)
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.HELD
    # Prepared: the source goes on both ways, below its cap; the target sends nothing.
    for i in range(5):
        w.host_send("sg1", i)
        w.mn_send(i)
        w.host_send("sg2", i)
    assert w.tunnel.state is TunnelState.ACTIVE and len(sg1.delivered) == 5
    assert sg2.wire == [] and w.pending("sg1", "sg2") == 0
    # Time passes (within prepare_timeout): the CTDRs the target re-sends change nothing.
    for _ in range(5):
        w.now += 2.0
        sg1.tick()
        sg2.tick()
    while w.pending("sg2", "sg1"):
        w.deliver("sg2", "sg1")
    assert sg1.core.prepared(tid) and w.pending("sg1", "sg2") == 0
    # The trigger: FINAL and COMMIT, at once.
    sg1.run(sg1.core.commit(tid, w.now))
    assert kinds(w, "sg1", "sg2") == [FPT_FINAL, FPT_DECISION]
    assert w.tunnel.state is TunnelState.MOVED  # type: ignore[comparison-overlap]  # moved on since narrowed
    assert sg1.finished[-1].outcome == "committed" and sg1.finished[-1].mode == "prepared"
    assert "commit_ms" not in sg1.finished[-1].as_dict()  # ready: sent at once, not timed
    w.deliver_all()
    assert t2.state is TunnelState.ACTIVE and sg2.finished[-1].outcome == "committed"
    for i in range(5, 10):
        w.host_send("sg2", i)
    assert t2.outbound.seq > 5  # went on right after the source's last number (FINAL)
    unique(w)


def test_the_target_waits_longer_than_the_source_and_says_so() -> None:
    w = world(prepare_timeout=20.0)
    tid = prepare(w)
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    og = sg1.core.outgoing[tid]
    (inc,) = sg2.core.incoming.values()
    assert inc.prepared and og.prepare_wait == 20.0
    assert og.deadline == og.record.started + 20.0 - PREPARE_GUARD
    assert inc.give_up >= og.deadline + PREPARE_GUARD
    # Past the source's deadline: rolled back (CTC), the target discards; never committed.
    w.now = og.deadline
    sg1.tick()
    assert sg1.finished[-1].outcome == "timeout" and w.tunnel.transfer_cap == 1 << 64
    w.deliver_all()
    assert sg2.engine.tunnels() == [] and sg2.finished[-1].outcome == "cancelled"
    with pytest.raises(TransferError, match="rolled back"):
        sg1.core.commit(tid, w.now)
    for i in range(3):
        w.host_send("sg1", i)
    unique(w)


def test_the_target_grants_no_more_than_its_own_prepare_timeout() -> None:
    w = world(prepare_timeout=60.0, target=Settings(make_before_break=True, prepare_timeout=5.0))
    tid = prepare(w)
    og = w.gw["sg1"].core.outgoing[tid]
    assert og.prepare_wait == 5.0 and og.deadline == og.record.started + 4.0


def test_an_older_target_keeps_its_own_wait_and_the_source_commits_within_it() -> None:
    """A target of an older ipsecct ignores the PREPARE (it installed the contexts before
    it came) and waits its retry_max for the COMMIT: without the answer the source assumes
    that wait, and rolls back before it ends."""
    w = world(prepare_timeout=60.0, retry_max=15.0)
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid, outs = sg1.core.start([w.tunnel], "sg2", w.now, prepare=True)
    sg1.run(outs)
    w.deliver("sg1", "sg2")
    assert kinds(w, "sg1", "sg2") == [FPT_PREPARE]
    w.drop("sg1", "sg2")  # (an older target: nothing changes, nothing answers)
    w.deliver("sg2", "sg1")  # CTDR: prepared
    og = sg1.core.outgoing[tid]
    assert sg1.core.prepared(tid) and og.deadline == og.record.started + 15.0 - PREPARE_GUARD
    (inc,) = sg2.core.incoming.values()
    assert not inc.prepared and inc.give_up > og.deadline
    # Committed within the older target's wait: it activates as ever.
    w.now = og.deadline - 0.5
    sg2.tick()
    sg1.run(sg1.core.commit(tid, w.now))
    w.deliver_all()
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.ACTIVE and w.tunnel.state is TunnelState.MOVED
    w.host_send("sg2", 1)
    unique(w)


def test_reaching_the_cap_while_prepared_rolls_back() -> None:
    w = world(margin=3)
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    prepare(w)
    for i in range(5):
        w.host_send("sg1", i)  # 3 sent under the cap, 2 held past it
    assert [s for _, s in sg1.wire] == [1, 2, 3]
    sg1.tick()
    assert sg1.finished[-1].outcome == "cancelled" and "cap" in sg1.finished[-1].detail
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
    assert [s for _, s in sg1.wire] == [1, 2, 3, 4, 5]  # the held two, past the cap now
    w.deliver_all()
    assert sg2.engine.tunnels() == []
    unique(w)


def test_a_tunnel_fenced_below_its_cap_while_prepared_stays_prepared() -> None:
    """Fenced for another reason (its durable reservation not there yet, a fail-over lease):
    its packets are not kept for a commit that may be far off (they go where any fenced
    tunnel's go), and the transfer stays prepared."""
    w = world()
    sg1 = w.gw["sg1"]
    tid = prepare(w)
    w.tunnel.seq_ceiling = w.tunnel.outbound.seq + 1
    w.host_send("sg1", 1)
    w.host_send("sg1", 2)  # past the fence, below the cap
    assert sg1.refused_hold == 1 and len(sg1.wire) == 1
    sg1.tick()
    assert sg1.core.prepared(tid)


def test_cancel_and_commit_errors() -> None:
    w = world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    with pytest.raises(TransferError, match="no prepared transfer"):
        sg1.core.commit(0x1234, w.now)
    tid = prepare(w)
    with pytest.raises(TransferError, match="busy"):
        sg1.core.start([w.tunnel], "sg2", w.now, prepare=True)  # prepared twice
    sg1.run(sg1.core.cancel(tid, w.now))
    assert sg1.finished[-1].outcome == "cancelled" and w.tunnel.transfer_cap == 1 << 64
    w.deliver_all()
    assert sg2.engine.tunnels() == [] and sg2.finished[-1].outcome == "cancelled"
    for call in (sg1.core.commit, sg1.core.cancel):
        with pytest.raises(TransferError, match="rolled back"):
            call(tid, w.now)
    tid2 = prepare(w)
    sg1.run(sg1.core.commit(tid2, w.now))
    for call in (sg1.core.commit, sg1.core.cancel):
        with pytest.raises(TransferError, match="committed already"):
            call(tid2, w.now)
    # Not a prepared one, or no make-before-break: refused.
    w2 = World()
    with pytest.raises(TransferError, match="make-before-break"):
        w2.gw["sg1"].core.start([w2.tunnel], "sg2", w2.now, prepare=True)
    assert w2.tunnel.state is TunnelState.ACTIVE and w2.pending("sg1", "sg2") == 0


def test_commit_asked_while_preparing_commits_once_ready() -> None:
    w = world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid, outs = sg1.core.start([w.tunnel], "sg2", w.now, prepare=True)
    sg1.run(outs)
    assert sg1.core.commit(tid, w.now) == []
    with pytest.raises(TransferError, match="already"):
        sg1.core.commit(tid, w.now)
    w.deliver_all()
    assert sg1.finished[-1].outcome == "committed"
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.ACTIVE


@pytest.mark.parametrize("how", ["peer lost", "ctc", "ike request"])
def test_a_prepared_transfer_rolls_back_on_a_lost_channel_a_ctc_or_an_ike_request(how: str) -> None:
    w = world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid = prepare(w)
    if how == "peer lost":
        sg1.run(sg1.core.peer_lost("sg2", w.now))
    elif how == "ctc":
        ctc = cxtp.CTC(w.mn_out.src, (cxtp.TransferTag(tid, 9).encode(),))
        sg1.run(sg1.core.receive("sg2", ctc, w.now))
    else:
        sg1.run(sg1.core.cancel_prepared({w.sg_in.spi}, w.now, "an IKE request"))
    assert sg1.finished[-1].outcome in ("peer lost", "cancelled")
    assert w.tunnel.state is TunnelState.ACTIVE and w.tunnel.transfer_cap == 1 << 64
    w.now += 100.0
    sg2.tick()  # the target gives up on its own, at the latest
    assert sg2.engine.tunnels() == []
    w.host_send("sg1", 1)
    unique(w)


@pytest.mark.parametrize("asker", ["sg1", "sg3"])
def test_a_restarted_source_asking_gets_its_prepared_tunnels_back(asker: str) -> None:
    """The source restarted while prepared (its "leaving" row durable), or its fail-over
    standby (sg3) took the tunnels over marked leaving: its decision query is not taken for
    a COMMIT (none was sent): "not taken", the target discards. (sg2 knows sg1 and sg3 as a
    fail-over pair: another peer's query would be dropped, tests/test_peer_binding.py.)"""
    w = world(pairs={"sg3": frozenset({"sg1"})})
    sg2 = w.gw["sg2"]
    tid = prepare(w)
    q = cxtp.DQ(w.mn_out.src, cxtp.Answer.QUERY, (cxtp.TransferTag(tid, 0).encode(),))
    out = sg2.core.receive(asker, q, w.now)
    sg2.run(out)
    answer = w.drop("sg2", asker)
    assert isinstance(answer, cxtp.DQ) and answer.answer == cxtp.Answer.NOT_TAKEN
    assert sg2.engine.tunnels() == []
    # The source's late COMMIT (its dead connection) activates nothing.
    sg2.run(sg2.core.receive("sg1", cxtp.CTD(w.mn_out.src, 0, (
        cxtp.TransferTag(tid, 7).encode(), *_commit())), w.now))  # fmt: skip
    assert sg2.engine.tunnels() == []


def _commit() -> tuple[bytes]:
    from ipsecct.ct.transfer import DECISION_COMMIT, decision_cdb

    return (decision_cdb(DECISION_COMMIT),)


class Gate:
    """A fail-over standby's acknowledgement, settled by the test."""

    def __init__(self) -> None:
        self.writes: list[tuple[int | None, Write]] = []

    def __call__(self, tunnels: object, tid: int | None) -> Write:
        w = Write()
        self.writes.append((tid, w))
        return w


def test_the_standbys_leaving_mark_comes_before_the_prepared_state() -> None:
    w = world()
    sg1 = w.gw["sg1"]
    gate = Gate()
    sg1.core.standby_gate = gate
    tid, outs = sg1.core.start([w.tunnel], "sg2", w.now, prepare=True)
    sg1.run(outs)
    w.deliver_all()
    assert not sg1.core.prepared(tid) and gate.writes[0][0] == tid
    gate.writes[0][1].succeed()
    out = sg1.core.settled(w.now)
    assert any(isinstance(o, Prepared) for o in out) and sg1.core.prepared(tid)


# Weighted so that every ending comes up (over 300 random runs: committed about 60, rolled
# back by the cancel, a lost channel, the CTDR's time-out, the cap and the prepared
# deadline, the rest undecided).
STEPS = ["host1"] * 4 + ["host2", "mn", "mn"] + ["d12"] * 4 + ["d21"] * 4 + [
    "tick", "tick", "long", "commit", "commit", "cancel", "lost"]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    margin=st.integers(2, 12),
    tail=st.integers(0, 4),
    steps=st.lists(st.sampled_from(STEPS), max_size=50),
)
def test_prepared_transfer_no_sequence_number_reuse_whatever_the_order(
    margin: int, tail: int, steps: list[str]
) -> None:
    """A prepared transfer with traffic at both gateways, messages delivered one at a time
    either way, time passing (up to and past the deadlines), the commit and the cancel
    called at any moment (errors allowed), the channel lost: no (SPI, sequence number) pair
    is sent twice, and no packet the MN sent is delivered twice."""
    w = world(margin=margin, mbb_tail=tail, prepare_timeout=6.0)
    core: TransferCore = w.gw["sg1"].core
    w.host_send("sg1", 0)
    tid, outs = core.start([w.tunnel], "sg2", w.now, prepare=True)
    w.gw["sg1"].run(outs)
    n = 1
    for step in steps:
        if step == "host1":
            w.host_send("sg1", n)
        elif step == "host2":
            w.host_send("sg2", n)
        elif step == "mn":
            w.mn_send(n)
        elif step == "d12" and w.pending("sg1", "sg2"):
            w.deliver("sg1", "sg2")
        elif step == "d21" and w.pending("sg2", "sg1"):
            w.deliver("sg2", "sg1")
        elif step in ("tick", "long"):
            w.now += 0.05 if step == "tick" else 4.0
            for g in w.gw.values():
                g.tick()
        elif step in ("commit", "cancel"):
            with contextlib.suppress(TransferError):
                w.gw["sg1"].run(getattr(core, step)(tid, w.now))
        elif step == "lost":
            w.links.clear()
            w.gw["sg1"].run(core.peer_lost("sg2", w.now))
        n += 1
    w.deliver_all()
    for _ in range(3):
        w.now += 10.0
        for g in w.gw.values():
            g.tick()
        w.deliver_all()
    for i in range(3):
        w.host_send("sg1", n + i)
        w.host_send("sg2", n + i)
    unique(w)
    delivered = w.gw["sg1"].delivered + w.gw["sg2"].delivered
    assert len(delivered) == len(set(delivered)), "an inbound packet was accepted twice"
    senders = {g.name for g in w.gw.values() for t in g.engine.tunnels()
               if t.state is TunnelState.ACTIVE}  # fmt: skip
    assert len(senders) <= 1


def test_the_gateways_prepare_timeout_setting() -> None:
    from ipsecct.errors import ConfigError
    from ipsecct.gateway import config as config_mod
    from tests.helpers.config_files import transfer_config


    def timeout(extra: dict[str, object]) -> float:
        cfg = config_mod.from_dict(transfer_config(extra), "sg1.toml")
        assert cfg.transfer is not None
        return cfg.transfer.settings.prepare_timeout

    assert timeout({}) == 30.0 and timeout({"prepare_timeout": 5}) == 5.0
    for bad in (1, 301, "30", True, float("nan")):
        with pytest.raises(ConfigError, match=r"sg1\.toml: transfer\.prepare_timeout"):
            timeout({"prepare_timeout": bad})


def test_a_source_cannot_keep_its_prepared_transfer_at_the_target_past_one_wait() -> None:
    """A hostile (authenticated) source re-sending PREPARE under fresh sequence numbers
    does not push the target's wait on: the first PREPARE's wait bounds it, and the
    target discards the held tunnels when it ends."""
    w = world(prepare_timeout=10.0)
    tid = prepare(w)
    sg2 = w.gw["sg2"]
    (inc,) = sg2.core.incoming.values()
    limit = inc.give_up
    for seq in range(100, 110):
        w.now += 5.0
        sg2.tick()
        again = cxtp.CTD(w.mn_out.src, 0, (cxtp.TransferTag(tid, seq).encode(),
                                           transfer.prepare_cdb(300)))  # fmt: skip
        sg2.run(sg2.core.receive("sg1", again, w.now))
    # discarded at the first tick past the first wait (then known as cancelled a while)
    assert sg2.engine.tunnels() == [] and sg2.finished[-1].outcome == "cancelled"
    assert limit <= sg2.finished[-1].ended < limit + 5.0


def test_a_tunnel_removed_here_while_prepared_is_not_committed() -> None:
    """Its CHILD SA deleted while the transfer is prepared (the client came back with
    INITIAL_CONTACT, the IKE SA replaced, or ``sa delete``): the commit rolls the transfer
    back, saying why, instead of activating at the target a tunnel the source no longer
    has (it was: an orphan CHILD SA there, its client's address routed into it)."""
    w = world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid = prepare(w)
    sg1.engine.remove_tunnel(w.tunnel)
    sg1.run(sg1.core.commit(tid, w.now))
    rec = sg1.finished[-1]
    assert rec.outcome == "failed" and "removed here" in rec.detail, rec
    assert sg1.core.counters["commit_refused"] == 1
    assert [type(cxtp.decode(d)) for d in w.links[("sg1", "sg2")]] == [cxtp.CTC]
    w.deliver_all()
    assert sg2.engine.tunnels() == [] and sg2.finished[-1].outcome == "cancelled"
    unique(w)


def test_a_commit_asked_while_preparing_is_not_sent_past_the_deadline() -> None:
    """``transfer --commit`` came while the transfer was still being prepared, and it got
    ready only past its deadline (the CTDR slow to come back, a slow standby or disk): it
    is rolled back, as a commit asked for then would be. It committed: the target, which
    had stopped waiting, ignored the COMMIT, and the source recorded the tunnel away:
    served by nobody."""
    w = world(prepare_timeout=5.0)
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid, outs = sg1.core.start([w.tunnel], "sg2", w.now, prepare=True)
    sg1.run(outs)
    assert sg1.core.commit(tid, w.now) == []  # asked for while it is being prepared
    w.deliver("sg1", "sg2")  # PCTD: installed held, CTDR back
    w.deliver("sg1", "sg2")  # PREPARE: the target waits, and says how long
    w.now += 20.0
    sg2.tick()  # the target stops waiting (no decision from the source)
    assert sg2.engine.tunnels() == []
    w.deliver_all()  # the CTDR and the PREPARE answer reach the source only now
    assert sg1.finished[-1].outcome == "timeout", sg1.finished[-1]
    assert w.tunnel.state is TunnelState.ACTIVE and w.tunnel.transfer_cap == 1 << 64
    w.host_send("sg1", 1)
    unique(w)


def test_a_prepare_answer_after_the_cap_was_reached_does_not_keep_the_tunnel_held() -> None:
    """The cap reached while prepared rolls back at the next tick; the target's PREPARE
    answer arriving in between (or again: a hostile target repeating it) set the deadline
    back to the preparation's, and the tunnel's packets were held past its cap, sent by
    nobody, until then."""
    w = world(margin=3)
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid, outs = sg1.core.start([w.tunnel], "sg2", w.now, prepare=True)
    sg1.run(outs)
    w.deliver("sg1", "sg2")  # PCTD: installed held, CTDR back
    w.deliver("sg1", "sg2")  # PREPARE: the answer queued behind the CTDR
    w.deliver("sg2", "sg1")  # the CTDR: prepared
    assert sg1.core.prepared(tid)
    for i in range(5):
        w.host_send("sg1", i)  # 3 sent under the cap, 2 held past it
    w.deliver_all()  # the PREPARE answer
    sg1.tick()
    assert sg1.finished[-1].outcome == "cancelled" and "cap" in sg1.finished[-1].detail
    assert [s for _, s in sg1.wire] == [1, 2, 3, 4, 5]
    w.deliver_all()
    assert sg2.engine.tunnels() == []
    unique(w)


def test_a_tunnel_the_target_refused_while_preparing_is_no_longer_busy() -> None:
    """A prepared transfer of two tunnels, one refused by the target (an SPI collision
    under ``deny``): the refused one is back here at once, sending freely, and may be
    transferred elsewhere; it stayed counted as being transferred (its cap kept with the
    prepared transfer) until that ended, refused as busy."""
    s = {g: Settings(make_before_break=True, mbb_margin=MARGIN) for g in ("sg1", "sg2", "sg3")}
    s["sg2"] = Settings(make_before_break=True, mbb_margin=MARGIN, conflict=ConflictPolicy.DENY)
    w = World(("sg1", "sg2", "sg3"), settings=s)
    sg1 = w.gw["sg1"]
    (o, i, sl), _ = tunnel_sas("sg1", spi_up=0x3001, spi_down=0x3002, local="10.2.1.0/24",
                               mn_inner="10.1.0.9", name="mn2")  # fmt: skip
    t2 = sg1.engine.add_tunnel(SPDEntry(sl, Action.PROTECT, name="mn2", static=False), o, i)
    collide(w, "sg2", 0x3001)
    tid, outs = sg1.core.start([w.tunnel, t2], "sg2", w.now, prepare=True)
    sg1.run(outs)
    w.deliver_all()
    assert sg1.core.prepared(tid) and t2.transfer_cap == 1 << 64
    assert "1 refused" in sg1.core.outgoing[tid].record.detail
    tid3, outs3 = sg1.core.start([t2], "sg3", w.now)  # not busy
    sg1.run(outs3)
    w.deliver_all()
    assert sg1.finished[-1].transfer_id == tid3 and sg1.finished[-1].outcome == "committed"
    assert sg1.core.prepared(tid)
    sg1.run(sg1.core.commit(tid, w.now))
    w.deliver_all()
    assert sg1.finished[-1].transfer_id == tid and sg1.finished[-1].outcome == "partial"
    unique(w)


def test_what_one_peer_has_the_target_remember_is_bounded() -> None:
    """A peer sending PREPAREs (or COMMITs, CTCs) under fresh tags of transfers that do not
    exist had each remembered for replay protection for 2 x retry_max: memory grew with
    its rate. Past ``max_seen_per_peer`` its messages are dropped and counted; another
    peer's transfer goes on, and the flooding peer's once its entries expire."""
    s = {g: Settings(make_before_break=True, mbb_margin=MARGIN, max_seen_per_peer=100)
         for g in ("sg1", "sg2", "sg3")}  # fmt: skip
    w = World(("sg1", "sg2", "sg3"), settings=s)
    sg2 = w.gw["sg2"]
    for i in range(150):
        flood = cxtp.CTD(w.mn_out.src, 0, (cxtp.TransferTag(0x5000 + i, 1).encode(),
                                           transfer.prepare_cdb(30)))  # fmt: skip
        sg2.run(sg2.core.receive("sg3", flood, w.now))
    assert len(sg2.core.seen) == 100 and sg2.core.counters["over_limit"] == 50
    prepare(w)  # sg1's is not affected
    assert sg2.engine.tunnels()
    w.now += 2 * s["sg2"].retry_max + 1
    sg2.tick()
    assert all(p != "sg3" for p, _, _ in sg2.core.seen)
    sg2.run(sg2.core.receive("sg3", flood, w.now))
    assert sg2.core.counters["over_limit"] == 50


@pytest.mark.parametrize(("extra", "seen"), [
    ({}, 65536), ({"max_seen_per_peer": 100}, 100), ({"max_seen_per_peer": 1}, 1),
    ({"max_seen_per_peer": 1 << 20}, 1 << 20),
])  # fmt: skip
def test_the_gateways_max_seen_per_peer_setting(extra: dict[str, object], seen: int) -> None:
    """The bound above had no configuration key (only the library's Settings): it is
    ``[transfer] max_seen_per_peer``, beside the other per-peer limits, a whole number >= 1."""
    from ipsecct.gateway import config as config_mod
    from tests.helpers.config_files import transfer_config

    cfg = config_mod.from_dict(transfer_config(extra), "sg1.toml")
    assert cfg.transfer is not None and cfg.transfer.settings.max_seen_per_peer == seen


@pytest.mark.parametrize("bad", [0, -1, 1.5, "100", True, float("nan")])
def test_a_bad_max_seen_per_peer_is_refused_by_name(bad: object) -> None:
    from ipsecct.errors import ConfigError
    from ipsecct.gateway import config as config_mod
    from tests.helpers.config_files import transfer_config

    with pytest.raises(ConfigError, match=r"^sg1\.toml: transfer\.max_seen_per_peer: must be a "
                       "whole number >= 1$"):  # fmt: skip
        config_mod.from_dict(transfer_config({"max_seen_per_peer": bad}), "sg1.toml")


def test_the_command_line_prints_only_the_figures_a_prepared_transfer_measured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``transfer --prepare`` prints the tunnels made ready (none is accepted before the
    COMMIT) and the time it took; ``--commit`` of a ready one the time from the preparation
    and that the COMMIT went at once (it printed "0.000 ms from the commit", a figure
    nothing measured); a commit asked before it was ready, its wait from the commit."""
    from ipsecct.commands.transfer import _print

    def line(rec: dict[str, object]) -> str:
        _print(rec, as_json=False)
        return capsys.readouterr().out.strip()

    w = world()
    sg1 = w.gw["sg1"]
    prepare(w)
    rec = sg1.core.outgoing[next(iter(sg1.core.outgoing))].record
    said = line({**rec.as_dict(), "outcome": "prepared", "ms": 12.5})  # (as the service)
    assert said.endswith("(prepared): prepared, 1 tunnel(s) ready in 12.500 ms"), said
    w.now += 3.0  # the operator's wait
    sg1.run(sg1.core.commit(rec.transfer_id, w.now))
    said = line(sg1.finished[-1].as_dict())
    assert said.endswith(
        "(prepared): committed, 1/1 tunnel(s) in 3000.000 ms from the preparation,"
        " COMMIT sent at once"
    ), said
    assert "from the commit" not in said
    # asked before it was ready: it waited 0.25 s for the CTDR
    w = world()
    sg1 = w.gw["sg1"]
    tid, first = sg1.core.start([w.tunnel], "sg2", w.now, prepare=True)
    sg1.run(first)
    sg1.run(sg1.core.commit(tid, w.now))
    w.now += 0.25
    w.deliver_all()
    said = line(sg1.finished[-1].as_dict())
    assert said.endswith(
        "(prepared): committed, 1/1 tunnel(s) in 250.000 ms from the preparation,"
        " 250.000 ms from the commit (asked before it was ready)"
    ), said


def test_a_tunnel_deleted_at_the_target_while_prepared_stays_with_the_source() -> None:
    """``sa delete`` at the target of a tunnel a prepared transfer installed there (pending):
    the target cancels the transfer and tells the source (CTC), which rolls back and keeps
    serving it; the operator's later commit is refused, and a COMMIT that comes anyway (the
    source's, crossing the CTC) activates nothing there (counted)."""
    w = world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid = prepare(w)
    (t2,) = sg2.engine.tunnels()
    taken = sg2.core.withdraw(t2, w.now, "sa delete")
    assert taken is not None and "stay with sg1" in taken[0]
    sg2.run(taken[1])
    assert sg2.engine.tunnels() == [] and sg2.finished[-1].outcome == "cancelled"
    assert isinstance(w.peek("sg2", "sg1"), cxtp.CTC)
    w.deliver("sg2", "sg1")
    assert sg1.finished[-1].outcome == "cancelled"
    assert w.tunnel.state is TunnelState.ACTIVE and w.tunnel.transfer_cap == 1 << 64
    with pytest.raises(TransferError):
        sg1.core.commit(tid, w.now)
    sg2.run(sg2.core.receive("sg1", cxtp.CTD(w.mn_out.src, 0, (
        cxtp.TransferTag(tid, 7).encode(), *_commit())), w.now))  # fmt: skip
    assert sg2.engine.tunnels() == [] and sg2.core.counters["commit_after_cancel"] == 1
    assert sg2.core.withdraw(t2, w.now, "again") is None
    w.host_send("sg1", 1)
    w.host_send("sg2", 2)
    assert sg2.wire == []
    unique(w)


def test_a_tunnel_deleted_at_the_target_as_the_reactive_commit_crosses_is_served_by_none() -> None:
    """The reactive case: the CTDR already left when the tunnel is deleted at the target; the
    source commits on it and the CTC comes too late. Nobody sends on it (the invariant), and
    the target counts the COMMIT it did not act on."""
    w = World()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    w.transfer()
    w.deliver("sg1", "sg2")  # installed pending, CTDR on its way back
    (t2,) = sg2.engine.tunnels()
    taken = sg2.core.withdraw(t2, w.now, "sa delete")
    assert taken is not None and taken[1]
    sg2.run(taken[1])
    w.deliver_all()
    assert sg1.finished[-1].outcome == "committed"  # (it committed before the CTC came)
    assert sg2.engine.tunnels() == [] and sg2.core.counters["commit_after_cancel"] == 1
    assert sg1.core.counters["cancelled_after_commit"] == 1
    w.host_send("sg1", 1)
    w.host_send("sg2", 2)
    assert sg2.wire == []
    unique(w)


def test_a_commit_repeated_after_the_channel_lost_it_brings_its_final_states_again() -> None:
    """The FINAL and the COMMIT (one write) lost with the channel: the target asks again
    (its CTDR) and the source repeats its decision. The repeated COMMIT came alone, so the
    target activated with the preparation's inbound window and took again, as new, the
    packets the source had accepted since (5 replays accepted); the FINAL comes with it now."""
    w = world()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    tid = prepare(w)
    sent = [w.mn_send(i) for i in range(1, 6)]  # accepted at the source, after the snapshot
    assert len(sg1.delivered) == 5
    sg1.run(sg1.core.commit(tid, w.now))
    assert kinds(w, "sg1", "sg2") == [FPT_FINAL, FPT_DECISION]
    while w.pending("sg1", "sg2"):
        w.drop("sg1", "sg2")
    sg1.run(sg1.core.peer_lost("sg2", w.now))
    while not w.pending("sg2", "sg1"):  # the target's CTDR, re-sent
        w.now += 0.5
        sg2.tick()
    w.deliver("sg2", "sg1")
    assert kinds(w, "sg1", "sg2") == [FPT_FINAL, FPT_DECISION]
    w.deliver_all()
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.ACTIVE
    for data in sent:
        assert data is not None
        sg2.from_mn(data)
    assert sg2.delivered == [] and len(sg2.dropped) == 5
    w.host_send("sg2", 1)
    unique(w)

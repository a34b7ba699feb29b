"""Make-before-break transfers (sans-I/O): the source goes on sending and receiving on its
tunnels while the transfer runs, never sends a number above its cap, the target starts past
the cap, and the source's final anti-replay state reaches the target before the COMMIT.

Every test checks the invariant on what the gateways emitted: no (SPI, sequence number) pair
twice, whatever the order of events (docs/cxtp.md, "Make-before-break")."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.ct import cxtp
from ipsecct.ct.journal import Write
from ipsecct.ct.transfer import (
    FPT_FINAL,
    Settings,
    TransferCore,
    final_cdb,
    frame,
    parse_final,
)
from ipsecct.errors import CxtpError, SAError, TransferError
from ipsecct.ipsec.engine import TunnelState
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.replay import ReplayWindow
from tests.helpers.transfer import World, udp_packet

# what C does (the forwarding thread, C's ceilings and tail): the Python path has no C side
native_only = pytest.mark.skipif(
    os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"),
    reason="IPSECCT_PURE_PYTHON forces the Python path",
)

CAP_MARGIN = 1000


def mbb_world(margin: int = CAP_MARGIN, **kw: object) -> World:
    s = {g: Settings(make_before_break=True, mbb_margin=margin, **kw) for g in ("sg1", "sg2")}  # type: ignore[arg-type]
    return World(settings=s)


def unique(w: World) -> None:
    pairs = [(spi, seq) for _, spi, seq in w.all_wire()]
    assert len(pairs) == len(set(pairs)), "an (SPI, sequence number) pair was sent twice"


def out_seqs(w: World, gw: str) -> list[int]:
    spi = w.sg_out.spi
    return [seq for s, seq in w.gw[gw].wire if s == spi]


def test_the_source_sends_and_receives_until_the_commit_the_target_starts_past_the_cap() -> None:
    w = mbb_world()
    for i in range(5):
        w.host_send("sg1", i)
        w.mn_send(i)
    start_seq = w.tunnel.outbound.seq
    w.transfer()
    t = w.tunnel
    assert t.state is TunnelState.ACTIVE and t.transfer_cap == start_seq + CAP_MARGIN
    pctd = w.peek("sg1", "sg2")
    assert isinstance(pctd, cxtp.PCTD)
    # While the contexts travel and the target answers, the stream goes on at sg1, both ways.
    late: list[bytes] = []
    for i in range(5, 10):
        w.host_send("sg1", i)
        data = w.mn_send(i)
        assert data is not None
        late.append(data)
    w.deliver("sg1", "sg2")  # PCTD: installed held at sg2, CTDR back
    for i in range(10, 15):
        w.host_send("sg1", i)
        data = w.mn_send(i)
        assert data is not None
        late.append(data)
    sg1 = w.gw["sg1"]
    assert len(sg1.delivered) == 15 and len(out_seqs(w, "sg1")) == 15
    assert not sg1.core.outgoing[next(iter(sg1.core.outgoing))].held
    w.deliver("sg2", "sg1")  # CTDR: final replay state, then the COMMIT
    final_msg = w.peek("sg1", "sg2")
    assert isinstance(final_msg, cxtp.CTD) and cxtp.cdb_fpt(final_msg.cdbs[1]) == FPT_FINAL
    assert t.state is TunnelState.MOVED  # type: ignore[comparison-overlap]  # moved on since narrowed
    w.deliver_all()
    sg2 = w.gw["sg2"]
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.ACTIVE
    # The source never reached its cap; the target goes on right after the source's last
    # number (its final state said which), so the MN sees one run of numbers.
    w.host_send("sg2", 100)
    assert max(out_seqs(w, "sg1")) < t.transfer_cap
    assert min(out_seqs(w, "sg2")) == max(out_seqs(w, "sg1")) + 1
    # What sg1 accepted after its snapshot is not accepted at sg2 again.
    for data in late:
        sg2.from_mn(data)
    assert sg2.dropped.count(Drop.REPLAY) == len(late)
    assert len(sg2.delivered) == 0
    # ... while the MN's next packets are (direct identity: it follows sg2's signal first).
    w.flush_to_mn()
    w.mn_send(200)
    assert len(sg2.delivered) == 1
    unique(w)


def test_packets_past_the_cap_are_held_and_sent_by_the_target() -> None:
    w = mbb_world(margin=3)
    w.transfer()
    cap = w.tunnel.transfer_cap
    for i in range(6):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1") == [1, 2, 3] and cap == 3  # then held: a gap, never a repeat
    og = next(iter(w.gw["sg1"].core.outgoing.values()))
    assert len(og.held) == 3
    w.deliver_all()
    w.flush_to_mn()
    assert out_seqs(w, "sg2") == [4, 5, 6, 7]  # the SG_UPDATE signal first, then the 3 held
    assert len(w.mn.delivered) == 6
    unique(w)


def test_the_cap_holds_on_the_native_path_too() -> None:
    """A flow the native path carries when the transfer starts: its exact number comes back
    from C for the cap, and C stops at the cap (the packet past it goes up, and is held)."""
    w = mbb_world(margin=50)
    eng = w.gw["sg1"].engine
    for i in range(20):
        w.host_send("sg1", i)
    if eng.native is not None:
        assert eng._offloaded, "the flow should be in the native path"
    w.transfer()
    assert w.tunnel.transfer_cap == 70
    for i in range(20, 120):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1") == list(range(1, 71))
    og = next(iter(w.gw["sg1"].core.outgoing.values()))
    assert len(og.held) == 50
    w.deliver_all()
    assert min(out_seqs(w, "sg2")) == 71
    unique(w)


@native_only
def test_the_native_path_keeps_carrying_the_flow_below_the_cap() -> None:
    """The transfer's start does not freeze the outbound SA in C (its packets would go
    through the event loop until it pushed it again: the pause at every ``transfer
    --prepare``, benchmarks/README.md, prepgap): C keeps it, told the cap at once, sends
    the numbers below it itself and hands up the first one past it (held); nothing twice."""
    w = mbb_world(margin=50)
    eng = w.gw["sg1"].engine
    assert eng.native is not None, "the native data path is not built"
    for i in range(20):
        w.host_send("sg1", i)
    out = w.tunnel.outbound
    assert out.native is not None and out.native.active
    w.transfer()
    assert w.tunnel.transfer_cap == 70
    assert out.native is not None and out.native.active, "the transfer froze the SA in C"
    for i in range(20, 120):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1") == list(range(1, 71))
    og = next(iter(w.gw["sg1"].core.outgoing.values()))
    assert len(og.held) == 50
    w.deliver_all()
    assert min(out_seqs(w, "sg2")) == 71
    unique(w)


@native_only
def test_a_packet_on_the_python_path_never_takes_the_number_past_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A packet C cannot carry (a first fragment) takes the Python path while C carries the
    tunnel's flow below the cap. Should the forwarding thread take the GIL between the
    Python path's check of the number and the number it takes, C may send the cap's number
    meanwhile: the Python path freezes C before it reads the number, so the packet is held,
    never numbered cap + 1 (which the target sends when it starts past the cap, and a
    standby past a fencing ceiling). On main it was sent as cap + 1."""
    from ipsecct.ipsec.sad import SecurityAssociation

    w = mbb_world(margin=3)
    sg1 = w.gw["sg1"]
    assert sg1.engine.native is not None, "the native data path is not built"
    for i in range(5):
        w.host_send("sg1", i)
    w.transfer()
    cap = w.tunnel.transfer_cap
    assert cap == 8 and w.tunnel.outbound.native.active
    w.host_send("sg1", 5)
    w.host_send("sg1", 6)  # C: 6, 7; the cap's number left
    real = SecurityAssociation.effective_mtu
    queued: list[bytes] = []

    def thread_runs_first(self: SecurityAssociation, now: float, default: int) -> int:
        if not queued:  # the forwarding thread's batch, between the check and the number
            _thread_batch(sg1, sg1.engine.native, 7, now, queued)
        return real(self, now, default)

    monkeypatch.setattr(SecurityAssociation, "effective_mtu", thread_runs_first)
    sg1.from_inner(_first_fragment(8))
    assert queued
    monkeypatch.setattr(SecurityAssociation, "effective_mtu", real)
    if queued[0]:
        sg1.from_inner(queued[0])
    assert out_seqs(w, "sg1") == list(range(1, cap + 1))
    og = next(iter(sg1.core.outgoing.values()))
    assert len(og.held) == 1
    w.deliver_all()
    assert min(out_seqs(w, "sg2")) == cap + 1
    unique(w)


@native_only
def test_packets_c_sends_between_the_read_and_the_new_ceiling_raise_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forwarding thread can take the GIL between two Python calls (CPython hands it over
    at any bytecode once another thread waited its switch interval): between reading C's
    number and telling C the cap, C may send on under its old ceiling, here more than the
    margin. The cap then follows what C sent, so that the target starts past every number
    the source used: nothing twice (a nonce reused under AES-GCM otherwise)."""
    from ipsecct.ipsec import native as native_mod

    w = mbb_world(margin=2)
    eng = w.gw["sg1"].engine
    assert eng.native is not None, "the native data path is not built"
    for i in range(10):
        w.host_send("sg1", i)
    out = w.tunnel.outbound
    assert out.native is not None and out.native.active
    real_push = native_mod.push
    raced: list[bool] = []

    def push_after_the_thread_ran(*args: Any, **kw: Any) -> Any:
        if not raced:  # the forwarding thread's batch, under the old ceiling
            raced.append(True)
            for i in range(10, 15):
                w.host_send("sg1", i)
        return real_push(*args, **kw)

    monkeypatch.setattr(native_mod, "push", push_after_the_thread_ran)  # (the engine's)
    w.transfer()
    assert raced
    assert out_seqs(w, "sg1") == list(range(1, 16))  # C sent 11..15 past the read (10) + 2
    assert w.tunnel.transfer_cap == 15
    for i in range(15, 30):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1") == list(range(1, 16))  # nothing more: held at the cap
    w.deliver_all()
    assert min(out_seqs(w, "sg2")) == 16
    unique(w)


@pytest.mark.parametrize("how", ["timeout", "refused", "peer lost"])
def test_a_transfer_that_does_not_commit_leaves_one_sender_and_loses_nothing(how: str) -> None:
    w = mbb_world(margin=2)
    if how == "refused":
        w.gw["sg1"].may_send = False  # sg2 refuses what sg1 sends
    w.transfer()
    for i in range(4):
        w.host_send("sg1", i)  # 2 sent, 2 held at the cap
    sg1 = w.gw["sg1"]
    if how == "timeout":
        w.drop("sg1", "sg2")
        w.now += 5
        sg1.tick()
    elif how == "refused":
        w.deliver_all()
    else:
        w.drop("sg1", "sg2")
        sg1.run(sg1.core.peer_lost("sg2", w.now))
    assert not sg1.core.outgoing and w.tunnel.state is TunnelState.ACTIVE
    assert w.tunnel.transfer_cap == 1 << 64
    assert out_seqs(w, "sg1") == [1, 2, 3, 4]  # the held ones went out once uncapped
    w.host_send("sg1", 10)
    assert out_seqs(w, "sg1")[-1] == 5
    w.deliver_all()
    assert all(not g.engine.tunnels() for g in [w.gw["sg2"]])
    assert out_seqs(w, "sg2") == []
    w.flush_to_mn()
    assert len(w.mn.delivered) == 5
    unique(w)


def test_a_tunnel_being_transferred_cannot_be_transferred_again() -> None:
    w = mbb_world()
    w.transfer()
    with pytest.raises(TransferError, match="being transferred"):
        w.transfer()


def test_without_room_below_the_counters_limit_the_tunnel_is_held() -> None:
    w = mbb_world(margin=1000)
    w.tunnel.outbound.seq = w.tunnel.outbound.seq_limit - 10
    w.transfer()
    assert w.tunnel.state is TunnelState.HELD and w.tunnel.transfer_cap == 1 << 64


# -- a hostile or buggy source ------------------------------------------------------------------
def _thread_batch(sg1: Any, native: Any, seq: int, now: float, queued: list[bytes]) -> None:
    """What the forwarding thread's C call does with host packet ``seq`` when it takes the
    GIL in the middle of the Python path: sealed and sent by C (``queued`` gets b""), or
    handed up to the event loop, handled after the packet under way (``queued`` gets it)."""
    p = udp_packet(seq, up=False)
    r = native.seal_flow(p, now)
    if r is None:
        queued.append(p)
    else:
        sg1.emit(bytes(r[1]))
        queued.append(b"")


def _first_fragment(seq: int) -> bytes:
    """Host packet ``seq`` as a first fragment (more fragments set): not a flow C carries,
    so it takes the Python path."""
    from ipsecct.ipsec.ippacket import checksum

    frag = bytearray(udp_packet(seq, up=False))
    frag[6] |= 0x20
    frag[10:12] = b"\0\0"
    frag[10:12] = checksum(bytes(frag[:20])).to_bytes(2, "big")
    return bytes(frag)


def _pending(w: World) -> tuple[int, bytes]:
    """A transfer installed at sg2 and waiting for its decision; the CTDR left unread."""
    tid = w.transfer()
    w.deliver("sg1", "sg2")
    w.drop("sg2", "sg1")
    return tid, cxtp.TransferTag(tid, 50).encode()


def test_final_states_for_no_pending_transfer_are_refused() -> None:
    w = mbb_world()
    sg2 = w.gw["sg2"]
    tag = cxtp.TransferTag(12345, 1).encode()
    bitmap = bytes(16)
    cdb = final_cdb(w.sg_out.spi, w.sg_in.spi, 5, 1000, bitmap)
    msg = cxtp.CTD(w.sg_out.dst, 0, (tag, cdb))
    sg2.run(sg2.core.receive("sg1", msg, w.now))
    assert sg2.core.counters["refused"] == 1


def test_malformed_or_foreign_final_states_change_nothing() -> None:
    w = mbb_world()
    for i in range(3):
        w.mn_send(i)
    _, tag = _pending(w)
    sg2 = w.gw["sg2"]
    (t2,) = sg2.engine.tunnels()
    assert t2.inbound is not None
    before = t2.inbound.window.snapshot()
    out_spi, in_spi = w.sg_out.spi, w.sg_in.spi
    size = t2.inbound.replay_window // 8
    good_bits = b"\x01" + bytes(size - 1)
    seq = t2.outbound.seq
    bad = [
        final_cdb(out_spi + 1, in_spi, 1, 50, good_bits),  # not an SA of this transfer
        final_cdb(out_spi, in_spi, 1, 50, good_bits[:-4]),  # short bitmap
        final_cdb(out_spi, in_spi, 1, 50, bytes(size)),  # top not marked
        frame(FPT_FINAL, struct.pack("!IIQQ", out_spi, in_spi, 1, 50) + good_bits + b"\1" * 4),
        frame(FPT_FINAL, b"\0\0\0\1"),  # too short
    ]
    msg = cxtp.CTD(w.sg_out.dst, 0, (tag, *bad))
    sg2.run(sg2.core.receive("sg1", msg, w.now))
    assert sg2.core.counters["malformed"] == len(bad)
    assert t2.inbound.window.snapshot() == before
    assert t2.outbound.seq == seq  # the cap stays: nothing was taken from them


def test_a_stale_or_repeated_final_state_never_unmarks_a_number() -> None:
    w = mbb_world()
    for i in range(3):
        w.mn_send(i)
    _, tag = _pending(w)
    sg2 = w.gw["sg2"]
    (t2,) = sg2.engine.tunnels()
    assert t2.inbound is not None
    size = t2.inbound.replay_window // 8
    top, _ = t2.inbound.window.snapshot()
    higher = final_cdb(w.sg_out.spi, w.sg_in.spi, 7, top + 5, b"\x01" + bytes(size - 1))
    lower = final_cdb(w.sg_out.spi, w.sg_in.spi, 7, 1, b"\x01" + bytes(size - 1))
    for cdb in (higher, higher, lower):
        sg2.run(sg2.core.receive("sg1", cxtp.CTD(w.sg_out.dst, 0, (tag, cdb)), w.now))
    win = t2.inbound.window
    assert win.top == top + 5
    assert not any(win.check(s) for s in (1, 2, 3, top + 5))
    assert win.check(top + 4) and win.check(top + 6)


def test_parse_replay_checks_the_padding() -> None:
    cdb = final_cdb(1, 2, 9, 3, b"\x01\0\0\0\0\0\0\0")
    assert parse_final(cdb, 64) == (1, 2, 9, 3, b"\x01" + bytes(7))
    with pytest.raises(CxtpError):
        parse_final(cdb, 128)
    body = struct.pack("!IIQQ", 1, 2, 9, 3) + b"\x01" + bytes(7) + b"\0\0\0\1"
    with pytest.raises(CxtpError):
        parse_final(frame(FPT_FINAL, body), 64)
    # no inbound state: no bitmap
    assert parse_final(final_cdb(1, 0, 9, 0, b""), 0) == (1, 0, 9, 0, b"")
    with pytest.raises(CxtpError):
        parse_final(frame(FPT_FINAL, b"\0" * 20), 0)


@pytest.mark.parametrize("source", ["remembers", "restarted"])
def test_without_a_final_state_the_target_starts_past_the_cap(source: str) -> None:
    """A COMMIT answered again (the target missed the first): from memory it comes with the
    FINAL sent first, and the target goes on right after the source's last number; a source
    restarted since (``recall_commits``) has no final state to send: the target starts past
    the cap, which the source never crossed."""
    w = mbb_world()
    for i in range(3):
        w.host_send("sg1", i)
    tid = w.transfer()
    cap = w.tunnel.transfer_cap
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")  # the final state and the COMMIT are lost on the way
    while w.pending("sg1", "sg2"):
        w.drop("sg1", "sg2")
    if source == "restarted":
        sg1 = w.gw["sg1"]
        sg1.core = TransferCore(sg1.engine, sg1.core.endpoint, sg1.core.settings)
        sg1.core.recall_commits([tid], w.now)
    w.now += 3.0
    w.gw["sg2"].tick()  # sg2 asks again (its CTDR re-sent), sg1 answers
    w.deliver_all()
    w.host_send("sg2", 10)
    assert out_seqs(w, "sg1") == [1, 2, 3]
    assert min(out_seqs(w, "sg2")) == (4 if source == "remembers" else cap + 1)
    unique(w)


# -- the merge itself -----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([32, 64, 128, 1024]),
    first=st.lists(st.integers(1, 3000), max_size=60),
    later=st.lists(st.integers(1, 3000), max_size=60),
    here=st.lists(st.integers(1, 3000), max_size=20),
)
def test_merge_keeps_every_number_either_side_accepted(
    size: int, first: list[int], later: list[int], here: list[int]
) -> None:
    """The source accepts ``first``, snapshots, accepts ``later``; the target restores the
    snapshot and (a buggy peer) accepts ``here``; after the merge of the source's final
    state, nothing the source or the target accepted is accepted again, and whatever the
    merged window accepts, one of the two windows alone would have accepted."""
    src = ReplayWindow(size, esn=True)
    for s in first:
        src.check_and_update(s)
    snap = src.snapshot()
    for s in later:
        src.check_and_update(s)
    dst = ReplayWindow(size, esn=True)
    if snap[0]:
        dst.restore(*snap)
    for s in here:
        dst.check_and_update(s)
    alone = dst.copy()
    final = src.snapshot()
    if final[0] == 0:
        return
    dst.merge(*final)
    for s in range(1, 3100):
        if dst.check(s):
            assert src.check(s) and alone.check(s), s
    assert dst.top == max(src.top, alone.top)
    again = dst.copy()
    dst.merge(*final)  # idempotent
    assert dst.snapshot() == again.snapshot()


def _merge_by_number(w: ReplayWindow, top: int, bitmap: bytes) -> None:
    """The reference merge: every number the other state marks, checked and marked one by
    one in whichever window has the higher top (what ReplayWindow.merge did before it
    merged whole bitmaps)."""
    other = ReplayWindow(w.size, esn=w.esn)
    other.restore(top, bitmap)
    high, low = (other, w) if other.top > w.top else (w, other)
    ltop, lbits = low.snapshot()
    bits = int.from_bytes(lbits, "little")
    while bits:
        lowest = bits & -bits
        seq = ltop - (lowest.bit_length() - 1)
        if high.check(seq):
            high.update(seq)
        bits ^= lowest
    if high is not w:
        w.restore(*high.snapshot())


@settings(max_examples=400, deadline=None)
@given(
    size=st.sampled_from([32, 64, 96, 128, 1024]),
    base=st.sampled_from([0, 1000, (1 << 32) - 50, (1 << 40)]),
    mine=st.lists(st.integers(1, 2500), max_size=80),
    theirs=st.lists(st.integers(1, 2500), max_size=80),
)
def test_merge_of_whole_bitmaps_equals_the_merge_number_by_number(
    size: int, base: int, mine: list[int], theirs: list[int]
) -> None:
    """Differential: the word-wise merge leaves exactly the state the number-by-number
    reference leaves, whichever top is higher, across 32-bit boundaries (ESN), with windows
    far apart or overlapping."""
    a = ReplayWindow(size, esn=True)
    b = ReplayWindow(size, esn=True)
    for s in mine:
        a.check_and_update(base + s)
    for s in theirs:
        b.check_and_update(base + s)
    final = b.snapshot()
    if final[0] == 0:
        return
    ref = a.copy()
    _merge_by_number(ref, *final)
    a.merge(*final)
    assert a.snapshot() == ref.snapshot()
    assert a.top == ref.top


def test_merge_refuses_a_malformed_state_and_changes_nothing() -> None:
    w = ReplayWindow(64)
    w.check_and_update(10)
    before = w.snapshot()
    with pytest.raises(SAError):
        w.merge(20, bytes(8))  # its top is not marked
    with pytest.raises(SAError):
        w.merge(20, bytes(4))  # another size
    assert w.snapshot() == before


# -- with durable state: a rollback after "given away" was submitted ------------------------------
class SlowJournal:
    """Every write waits until the test settles it; ``fail`` names the kind that fails."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.writes: list[tuple[str, Write]] = []

    def _submit(self, what: str) -> Write:
        w = Write()
        self.writes.append((what, w))
        return w

    def settle(self) -> None:
        for what, w in self.writes:
            if what == self.fail:
                w.fail("disk full")
            else:
                w.succeed()
        self.writes = []

    def leaving(self, tunnels: object, peer: str, transfer_id: int) -> Write:
        return self._submit("given")

    def left(self, tunnels: object, peer: str, transfer_id: int) -> Write:
        return self._submit("away")

    def staying(self, tunnels: object, peer: str) -> Write:
        return self._submit("kept")


@pytest.mark.parametrize("fail", ["", "kept"])
def test_a_rollback_after_given_away_keeps_the_cap_until_owned_again(fail: str) -> None:
    """"Given away" is on its way to the disk when the transfer times out: it may land, and a
    source restarted then would answer COMMIT, so the tunnel goes on sending, but below its
    cap, until "owned" again is durable; then past it. If that write fails, the tunnel goes
    out of service (nobody could tell after a restart whether it sent past the cap)."""
    w = mbb_world(margin=3)
    j = SlowJournal(fail)
    sg1 = w.gw["sg1"]
    sg1.core.journal = j  # type: ignore[assignment]
    w.transfer()
    cap = w.tunnel.transfer_cap
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")  # "given away" submitted; the disk is slow
    w.now += 10.0
    sg1.tick()
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
    for i in range(5):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1") == [1, 2, 3] and w.tunnel.transfer_cap == cap
    assert [what for what, _ in j.writes] == ["given", "kept"]
    j.settle()  # both land ("kept" perhaps fails)
    sg1.run(sg1.core.settled(w.now))
    if fail:
        assert sg1.engine.tunnels() == [] and sg1.core.counters["unrecorded"] == 1
        assert out_seqs(w, "sg1") == [1, 2, 3]
    else:
        assert w.tunnel.transfer_cap == 1 << 64
        assert out_seqs(w, "sg1") == [1, 2, 3, 4, 5]  # the held two, sent now
    unique(w)


# -- the tail: numbers the source keeps after its COMMIT ------------------------------------------
def test_the_source_sends_its_tail_itself_then_forwards_and_the_target_starts_past_it() -> None:
    w = mbb_world(mbb_tail=4)
    for i in range(3):
        w.host_send("sg1", i)
    w.transfer()
    w.deliver("sg1", "sg2")  # PCTD
    w.deliver("sg2", "sg1")  # CTDR: FINAL + COMMIT out, the tunnel moved
    t = w.tunnel
    assert t.state is TunnelState.MOVED and t.tail_end == 3 + 4
    final_msg = w.peek("sg1", "sg2")
    assert isinstance(final_msg, cxtp.CTD)
    assert parse_final(final_msg.cdbs[1], 128)[2] == 7  # the FINAL names the tail's end
    sg1 = w.gw["sg1"]
    forwarded = sg1.core.counters["forwarded"]
    # What still reaches sg1 from the host goes out from sg1 on the tail: no hop to sg2 ...
    for i in range(3, 7):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1") == [1, 2, 3, 4, 5, 6, 7]
    assert sg1.core.counters["forwarded"] == forwarded
    # ... and once it is used up, is forwarded; sg2 sends it past the tail.
    w.host_send("sg1", 7)
    assert sg1.core.counters["forwarded"] == forwarded + 1
    w.deliver_all()
    w.host_send("sg2", 8)
    assert out_seqs(w, "sg2") == [8, 9, 10]  # SG_UPDATE signal, the forwarded packet, then 8
    w.flush_to_mn()
    assert len(w.mn.delivered) == 9  # every packet, once
    unique(w)


def test_the_tail_never_passes_the_cap() -> None:
    w = mbb_world(margin=5, mbb_tail=100)
    w.transfer()
    for i in range(3):
        w.host_send("sg1", i)
    w.deliver_all()
    assert w.tunnel.tail_end == w.tunnel.transfer_cap == 5
    for i in range(3, 10):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1") == [1, 2, 3, 4, 5]
    w.deliver_all()
    assert min(out_seqs(w, "sg2")) == 6
    unique(w)


def test_a_commit_repeated_from_memory_starts_the_target_past_the_tail() -> None:
    """The FINAL repeated with the COMMIT names the end of the source's tail: the target
    starts right after it (it started past the cap, the FINAL lost)."""
    w = mbb_world(margin=50, mbb_tail=10)
    w.transfer()
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    while w.pending("sg1", "sg2"):
        w.drop("sg1", "sg2")  # the FINAL and the COMMIT are lost
    for i in range(20):
        w.host_send("sg1", i)  # the tail (10), then forwards, which are lost too
    w.now += 3.0
    w.gw["sg2"].tick()
    w.deliver_all()
    w.host_send("sg2", 99)
    assert max(out_seqs(w, "sg1")) == 10 and min(out_seqs(w, "sg2")) == 11
    unique(w)


# -- the tail on the native path (C sends it: no trip through the event loop) ----------------------
def _tail_in_c(w: World, tail: int, sent: int = 5) -> tuple[int, Any]:
    """``sent`` host packets through sg1 (the flow in C), then the transfer up to sg1's
    COMMIT: the tunnel moved, its tail in C. Returns (sg1's last number before the tail,
    the outbound SA's C object)."""
    eng = w.gw["sg1"].engine
    assert eng.native is not None, "the native data path is not built"
    for i in range(sent):
        w.host_send("sg1", i)
    w.transfer()
    w.deliver("sg1", "sg2")  # PCTD
    w.deliver("sg2", "sg1")  # CTDR: FINAL + COMMIT out, the tunnel moved
    t = w.tunnel
    out = t.outbound
    assert t.state is TunnelState.MOVED and t.tail_end == sent + tail
    c = out.native
    assert c is not None and c.active, "the tail should be in C"
    assert c.ceiling == t.tail_end
    return sent, c


@native_only
@pytest.mark.parametrize("tail", [1, 4, 16])
def test_c_sends_exactly_the_tail_and_the_target_starts_right_after_it(
    tail: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """THE invariant on the native path: after its COMMIT, sg1's C sends the host's packets
    on the tail's numbers, exactly ``tail`` of them (last+1 .. tail_end) with no trip through
    the Python path; the next packet goes up, is forwarded, and sg2 sends it on tail_end + 1
    onwards. A C ceiling one too high would send tail_end + 1 from sg1 too: twice."""
    from ipsecct.ipsec.engine import Engine

    w = mbb_world(mbb_tail=tail)
    sg1 = w.gw["sg1"]
    last, c = _tail_in_c(w, tail)
    slow: list[int] = []
    real = Engine._outbound_py

    def counted(self: Engine, packet: bytes, now: float) -> Any:
        slow.append(1)
        return real(self, packet, now)

    monkeypatch.setattr(Engine, "_outbound_py", counted)
    forwarded = sg1.core.counters["forwarded"]
    for i in range(100, 100 + tail):
        w.host_send("sg1", i)
    assert slow == [], "a tail packet went through the Python path"
    end = w.tunnel.tail_end
    assert out_seqs(w, "sg1")[last:] == list(range(last + 1, end + 1))
    assert w.tunnel.outbound.seq == end  # Python's view, exact (read through C)
    assert w.tunnel.outbound.counters.packets == last + tail
    for i in range(200, 203):
        w.host_send("sg1", i)  # past the tail: up to Python, forwarded
    assert len(out_seqs(w, "sg1")) == last + tail
    assert sg1.core.counters["forwarded"] == forwarded + 3
    assert w.tunnel.outbound.native is None and not c.keyed  # used up: C let go of the keys
    w.deliver_all()
    w.host_send("sg2", 300)
    assert min(out_seqs(w, "sg2")) == end + 1
    w.flush_to_mn()
    assert len(w.mn.delivered) == last + tail + 3 + 1  # every packet once
    unique(w)


@native_only
def test_a_tail_packet_on_the_python_path_is_never_numbered_past_the_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A packet C cannot carry (a first fragment: no flow key) takes the Python path while C
    sends the tail. Should the forwarding thread take the GIL between the Python path's
    check of the number and the number it takes, C may send the tail's last number
    meanwhile: the Python path freezes C before it reads the number, so the packet is
    forwarded, never numbered tail_end + 1 (the target's first)."""
    from ipsecct.ipsec.engine import Engine

    w = mbb_world(mbb_tail=4)
    sg1 = w.gw["sg1"]
    last, _ = _tail_in_c(w, 4)
    for i in range(3):
        w.host_send("sg1", 100 + i)  # C: last+1 .. last+3; one number of the tail left
    real = Engine.fenced
    queued: list[bytes] = []

    def thread_runs_first(self: Engine, tunnel: Any, now: float) -> bool:
        if not queued:  # the forwarding thread's batch, between the check and the number
            _thread_batch(sg1, self.native, 103, now, queued)
        return real(self, tunnel, now)

    monkeypatch.setattr(Engine, "fenced", thread_runs_first)
    forwarded = sg1.core.counters["forwarded"]
    sg1.from_inner(_first_fragment(104))
    assert queued
    monkeypatch.setattr(Engine, "fenced", real)
    if queued[0]:
        sg1.from_inner(queued[0])
    assert out_seqs(w, "sg1")[last:] == [last + 1, last + 2, last + 3, last + 4]
    assert sg1.core.counters["forwarded"] == forwarded + 1
    w.deliver_all()
    w.host_send("sg2", 300)
    assert min(out_seqs(w, "sg2")) == w.tunnel.tail_end + 1
    unique(w)


@native_only
@pytest.mark.parametrize("fence", ["lease", "ceiling"])
def test_fencing_stops_c_in_the_middle_of_the_tail(fence: str) -> None:
    """Fencing (the lease's end, a lower fencing ceiling) reaches a tail C is sending at
    once: C sends nothing past it, the packets go up and are forwarded."""
    w = mbb_world(mbb_tail=8)
    sg1 = w.gw["sg1"]
    eng = sg1.engine
    last, c = _tail_in_c(w, 8)
    w.host_send("sg1", 100)
    assert out_seqs(w, "sg1")[last:] == [last + 1]
    if fence == "lease":
        eng.send_until = w.now
        allowed = [last + 1]
    else:
        w.tunnel.seq_ceiling = last + 3  # (the highest it may send)
        allowed = [last + 1, last + 2, last + 3]
    assert not c.active
    forwarded = sg1.core.counters["forwarded"]
    for i in range(101, 106):
        w.host_send("sg1", i)
    assert out_seqs(w, "sg1")[last:] == allowed
    assert sg1.core.counters["forwarded"] == forwarded + 5 - (len(allowed) - 1)
    w.deliver_all()
    w.host_send("sg2", 300)
    assert min(out_seqs(w, "sg2")) == w.tunnel.tail_end + 1
    unique(w)


@native_only
def test_a_tunnel_taken_back_in_the_middle_of_its_tail_goes_on_from_c_exact_number() -> None:
    """Commit what you accept: sg1's COMMIT leaves before the answer, both tunnels move and
    C sends their tails; sg2 refuses ``b``, which comes back to sg1 (held: C frozen, its
    exact number back in Python) and goes on from the number after the last C sent, never
    one twice."""
    from tests.helpers.journal_recorder import early_world, sent_on, settle_at, to_b

    w, j1, _, a, b = early_world()
    sg1 = w.gw["sg1"]
    eng = sg1.engine
    assert eng.native is not None, "the native data path is not built"
    settle_at(w, "sg1", j1)  # (no journal rows yet: nothing to settle but the first block)
    for i in range(5):
        w.host_send("sg1", i)
        sg1.from_inner(to_b(i))
    assert a.outbound.native is not None and a.outbound.native.active
    assert b.outbound.native is not None and b.outbound.native.active
    sg1.run(sg1.core.start([a, b], "sg2", w.now)[1])
    settle_at(w, "sg1", j1)  # "leaving" durable: FINAL and COMMIT go, both moved
    assert a.state is TunnelState.MOVED and b.state is TunnelState.MOVED
    assert (a.tail_end, b.tail_end) == (5 + 4, 5 + 4)
    cb = b.outbound.native
    assert cb is not None and cb.active and a.outbound.native.active
    for i in range(5, 7):
        sg1.from_inner(to_b(i))  # C: b's 6 and 7
    assert [s for _, s in sent_on(w, 0x500)] == list(range(1, 8))
    w.deliver_all()  # sg2 installs a, refuses b; CTDR: b back (held), a away
    assert b.state is TunnelState.HELD and b.tail_end == 0  # type: ignore[comparison-overlap]  # moved on since narrowed
    assert not cb.active and b.outbound.seq == 7  # frozen in C, Python's number exact
    settle_at(w, "sg1", j1)  # "kept" durable: b active again
    assert b.state is TunnelState.ACTIVE
    for i in range(7, 20):
        sg1.from_inner(to_b(i))
    assert [s for _, s in sent_on(w, 0x500)] == list(range(1, 21))
    unique(w)


@native_only
def test_c_is_told_the_end_of_the_forwarding_time_once_the_answer_sets_it() -> None:
    """Commit what you accept: until the answer, a moved tunnel forwards with no end, and C
    sends its tail with none; the CTDR sets the end, which C is told at once: past it C
    sends nothing (the packet goes up and is dropped, as the Python path drops it)."""
    from tests.helpers.journal_recorder import early_world, settle_at

    w, j1, _, a, _ = early_world(refuse_b=False)
    sg1 = w.gw["sg1"]
    for i in range(5):
        w.host_send("sg1", i)
    sg1.run(sg1.core.start([a], "sg2", w.now)[1])
    settle_at(w, "sg1", j1)
    assert a.state is TunnelState.MOVED and a.forward_until == math.inf
    c = a.outbound.native
    assert c is not None and c.active and c.ceiling == a.tail_end == 9
    w.host_send("sg1", 5)
    w.deliver_all()  # the CTDR: accepted, the forwarding time ends
    assert a.forward_until < math.inf and c.active
    w.now = a.forward_until
    w.host_send("sg1", 6)
    assert out_seqs(w, "sg1") == [1, 2, 3, 4, 5, 6]
    assert sg1.dropped == [Drop.NO_SA]
    unique(w)


@settings(max_examples=150, deadline=None)
@given(
    tail=st.integers(0, 8),
    margin=st.integers(1, 12),
    steps=st.lists(
        st.sampled_from(["host1", "host2", "mn", "deliver12", "deliver21", "tick"]),
        max_size=60,
    ),
)
def test_no_pair_is_sent_twice_across_a_handover_whatever_the_order(
    tail: int, margin: int, steps: list[str]
) -> None:
    """Traffic at both gateways in any order around a make-before-break transfer with a tail
    (messages delivered one at a time either way, time passing, the target's traffic sent as
    soon as it has the tunnel): no (SPI, sequence number) pair is ever sent twice, and no
    packet the MN sent is delivered twice."""
    w = mbb_world(margin=margin, mbb_tail=tail)
    w.host_send("sg1", 0)
    w.transfer()
    n = 1
    for step in steps:
        if step == "host1":
            w.host_send("sg1", n)
        elif step == "host2":
            w.host_send("sg2", n)  # dropped (no SA) until sg2 has the tunnel
        elif step == "mn":
            w.mn_send(n)
        elif step == "deliver12" and w.pending("sg1", "sg2"):
            w.deliver("sg1", "sg2")
        elif step == "deliver21" and w.pending("sg2", "sg1"):
            w.deliver("sg2", "sg1")
        elif step == "tick":
            w.now += 0.5
            for g in w.gw.values():
                g.tick()
        n += 1
    w.deliver_all()
    for i in range(3):
        w.host_send("sg1", n + i)
        w.host_send("sg2", n + i)
    unique(w)
    delivered = w.gw["sg1"].delivered + w.gw["sg2"].delivered
    assert len(delivered) == len(set(delivered)), "an inbound packet was accepted twice"


def test_the_gateways_tail_setting() -> None:
    from ipsecct.errors import ConfigError
    from ipsecct.gateway import config as config_mod
    from tests.helpers.config_files import transfer_config


    def tail(extra: dict[str, object]) -> int:
        cfg = config_mod.from_dict(transfer_config(extra), "sg1.toml")
        assert cfg.transfer is not None
        return cfg.transfer.settings.mbb_tail

    assert tail({}) == config_mod.MBB_TAIL == 16
    assert tail({"mbb_tail": 0}) == 0 and tail({"mbb_tail": 40}) == 40
    for bad in (-1, "16", True, 1 << 17):
        with pytest.raises(ConfigError, match=r"sg1\.toml: transfer\.mbb_tail"):
            tail({"mbb_tail": bad})

    def grant(extra: dict[str, object]) -> bool:  # (docs/state.md, "the grant")
        cfg = config_mod.from_dict(transfer_config(extra), "sg1.toml")
        assert cfg.transfer is not None
        return cfg.transfer.settings.grant

    assert grant({}) is False and grant({"grant": True}) is True
    with pytest.raises(ConfigError, match=r"sg1\.toml: transfer\.grant"):
        grant({"grant": "no"})


# -- a stale context from a gateway that once held the tunnel (docs/security.md) -------------------
def _durable(w: World, tmp: object) -> dict[str, object]:
    """Each gateway of ``w`` with its real durable state (writes made synchronously: no
    event loop), as ``gateway run`` has."""
    from pathlib import Path
    from types import SimpleNamespace

    from ipsecct.gateway import state as state_mod

    states: dict[str, object] = {}
    for name, g in w.gw.items():
        store, lock = state_mod.open_store(Path(str(tmp)) / name, name, [], fresh=False)
        node = SimpleNamespace(name=name, extensions={}, on_reserve=None)
        st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
        g.core.journal = st
        states[name] = st
    return states


@pytest.mark.parametrize("final", [True, False])
def test_a_stale_context_from_a_former_holder_never_makes_us_repeat_a_number(
    tmp_path: object, final: bool
) -> None:
    """sg1 hands the tunnel to sg2, sg2 sends on it and hands it on to sg3. Then sg1 sends
    sg2 its old context of the tunnel again (from memory, a replay of its old messages under
    a new transfer id, a bug): sg2 holds nothing of it any more, so it installs it. Its
    durable state raised the outbound number past sg2's own recorded ceiling, but the FINAL
    of sg1's old make-before-break transfer then set it back to sg1's old last number, and
    sg2 sent again the numbers it had sent (AES-GCM nonces reused). A tunnel that arrives
    resumes past what this gateway may have sent under its keys, whatever its source says."""
    w = World(("sg1", "sg2", "sg3"), settings={
        g: Settings(make_before_break=True, mbb_margin=CAP_MARGIN, mbb_tail=4)
        for g in ("sg1", "sg2", "sg3")})  # fmt: skip
    states = _durable(w, tmp_path)
    try:
        for i in range(5):
            w.host_send("sg1", i)
        sent: list[bytes] = []
        post = w.post

        def recording(src: str, dst: str, data: bytes) -> None:
            if (src, dst) == ("sg1", "sg2"):
                sent.append(data)
            post(src, dst, data)

        w.post = recording  # type: ignore[method-assign]
        w.transfer("sg1", "sg2")
        w.deliver_all()
        w.post = post  # type: ignore[method-assign]
        for i in range(200):
            w.host_send("sg2", i)
        mine = out_seqs(w, "sg2")
        assert len(mine) == 201  # (the SG_UPDATE signal first)
        (t2,) = w.gw["sg2"].engine.tunnels()
        _, outs = w.gw["sg2"].core.start([t2], "sg3", w.now)
        w.gw["sg2"].run(outs)
        w.deliver_all()
        w.now += w.gw["sg2"].core.settings.forward_time + 1.0
        for g in w.gw.values():
            g.tick()  # sg2's forwarder to sg3 is gone
        assert w.gw["sg2"].engine.tunnels() == []
        # sg1's old messages again, under a new transfer id: PCTD, FINAL (make-before-break),
        # COMMIT; without the FINAL only the PCTD and the COMMIT.
        stale = [cxtp.decode(d) for d in sent]
        finals = 0
        for m in stale:
            assert isinstance(m, cxtp.PCTD | cxtp.CTD)
            if cxtp.cdb_fpt(m.cdbs[1]) == FPT_FINAL:
                finals += 1
                if not final:
                    continue
            tag = cxtp.TransferTag.decode(m.cdbs[0])
            stale_tag = cxtp.TransferTag(0x5747_4C45, tag.seq, last=tag.last).encode()
            w.post("sg1", "sg2", cxtp.encode(replace(m, cdbs=(stale_tag, *m.cdbs[1:]))))
        assert finals == 1
        while w.pending("sg1", "sg2"):
            w.deliver("sg1", "sg2")
        w.links.clear()  # (the CTDRs to sg1, which knows nothing of that transfer)
        (t2,) = w.gw["sg2"].engine.tunnels()
        assert t2.state is TunnelState.ACTIVE  # installed: sg2 cannot tell it is stale
        before = set(mine)
        for i in range(50):
            w.host_send("sg2", 1000 + i)
        again = out_seqs(w, "sg2")[len(mine):]
        assert len(again) >= 50
        assert not before & set(again), "sg2 sent a number again under the same key"
        assert min(again) > max(mine)
        assert w.gw["sg2"].core.counters["stale_final"] == int(final)
    finally:
        for st in states.values():
            st.store.close()  # type: ignore[attr-defined]

"""A bulk transfer's target installs its tunnels in batches (one engine call for the tunnels
that need nothing special): it must decide and install exactly what installing them one by
one decides and installs, whatever SPIs and selectors a peer sends (taken SPIs, duplicates
within the transfer, overlaps with tunnels already here or earlier in the transfer, forwarders
coming back), under each conflict policy."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.ct import context, cxtp
from ipsecct.ct.transfer import (
    FPT_FINAL,
    ConflictPolicy,
    Identity,
    Send,
    Settings,
    TransferCore,
)
from ipsecct.ipsec.algorithms import EncAlg
from ipsecct.ipsec.engine import Engine, Tunnel, TunnelState
from ipsecct.ipsec.ippacket import Endpoint, IPAddress
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, AddressRange, Selectors, SPDEntry

ip = ipaddress.ip_address
SG, MN, PEER = ip("192.0.2.1"), ip("192.0.2.66"), "sg2"
KEY = bytes(range(20))
REMOTES = ["10.64.0.1/32", "10.64.0.2/32", "10.64.0.3/32", "10.64.0.0/30", "10.64.1.0/24"]


def _sa(
    spi: int, d: Direction, sel: Selectors, name: str, mn: IPAddress = MN,
    window: int = 64,
) -> SecurityAssociation:
    src, dst = (SG, mn) if d is Direction.OUTBOUND else (mn, SG)
    return SecurityAssociation(
        spi, d, src, dst, enc=EncAlg.AES_GCM_16, enc_key=KEY, mode=Mode.TUNNEL, esn=True,
        replay_window=window, encap=UdpEncap(4500, 4500), selectors=sel, name=name,
    )  # fmt: skip


def _tunnels(
    eng: Engine, n: int, out_base: int, in_base: int, window: int = 64
) -> list[Tunnel]:
    """``n`` tunnels t0.. in ``eng``, one MN address each (10.64.0.0 + i), with outbound SPIs
    from ``out_base`` and inbound ones from ``in_base``."""
    tunnels = []
    for i in range(n):
        sel = Selectors.between("10.2.0.0/16", str(ip("10.64.0.0") + i))
        tunnels.append(
            eng.add_tunnel(
                SPDEntry(sel, Action.PROTECT, name=f"t{i}", static=False),
                _sa(out_base + i, Direction.OUTBOUND, sel, f"t{i}"),
                _sa(in_base + i, Direction.INBOUND, sel, f"t{i}", window=window),
            )
        )
    return tunnels


def _target(conflict: ConflictPolicy, existing: list[tuple[int, int, str]]) -> TransferCore:
    """A target gateway with some tunnels of its own (and one forwarder to the peer, which a
    transferred tunnel with its selectors replaces)."""
    eng = Engine()
    for i, (spi_out, spi_in, remote) in enumerate(existing):
        sel = Selectors.between("10.2.0.0/16", remote)
        t = eng.add_tunnel(
            SPDEntry(sel, Action.PROTECT, name=f"own{i}", static=False),
            _sa(spi_out, Direction.OUTBOUND, sel, f"own{i}"),
            _sa(spi_in, Direction.INBOUND, sel, f"own{i}"),
        )
        if i == 0:  # moved to the peer earlier: a forwarder
            eng.hold(t)
            eng.move_tunnel(t, PEER, 1e9)
    s = Settings(
        conflict=conflict,
        identity=Identity.DIRECT,
        accept_local=(AddressRange.parse("10.2.0.0/16"),),
        accept_remote=(AddressRange.parse("10.64.0.0/20"),),
        max_incoming_per_peer=1000,
    )
    rng = random.Random(7)
    return TransferCore(eng, Endpoint(SG, 4500), s, rng=rng.getrandbits)


def _outcome(core: TransferCore, out: Sequence[object], n: int) -> list[int]:
    """The status of each of ``n`` tunnels (outbound SA) from the CTDRs answering them."""
    ctdrs = [o.msg for o in out if isinstance(o, Send) and isinstance(o.msg, cxtp.CTDR)]
    assert ctdrs
    if ctdrs[0].all_ok:
        return [cxtp.Status.SUCCESS] * n
    results = [cxtp.SaResult.decode(c) for m in ctdrs for c in m.ext[1:]]
    outbound = [r for r in results if r.dst != SG]
    assert len(outbound) == n
    return [r.status for r in outbound]


def _state(core: TransferCore) -> tuple[object, ...]:
    eng = core.engine
    return (
        sorted((str(sa.dst), sa.spi, sa.direction.value) for sa in eng.sad),
        [(str(e.selectors.remote[0]), e.name) for e in eng.spd],
        [(t.name, t.state.value, t.outbound.spi, t.inbound.spi if t.inbound else None)
         for t in eng.tunnels()],
        sorted(len(v) for v in core.incoming[(PEER, 1)].signals.values())
        if (PEER, 1) in core.incoming else [],
    )  # fmt: skip


TUNNEL = st.tuples(
    st.sampled_from([0x100, 0x101, 0x200, 0x300]),  # outbound SPI
    st.sampled_from([0x100, 0x101, 0x201, 0x301, 0x500]),  # inbound SPI
    st.sampled_from(REMOTES),
)


@settings(max_examples=60, deadline=None)
@given(
    conflict=st.sampled_from(list(ConflictPolicy)),
    tunnels=st.lists(TUNNEL, min_size=1, max_size=10),
    existing=st.lists(TUNNEL, max_size=3, unique_by=(lambda t: t[0], lambda t: t[1])),
)
def test_batched_install_decides_as_one_by_one(
    conflict: ConflictPolicy,
    tunnels: list[tuple[int, int, str]],
    existing: list[tuple[int, int, str]],
) -> None:
    # The target's own tunnels must not overlap each other (the engine would not care, the
    # transfer core would): keep the first of each remote.
    by_remote: dict[str, tuple[int, int, str]] = {}
    for t in existing:
        by_remote.setdefault(t[2], t)
    existing = list(by_remote.values())
    cdbs = []
    for i, (spi_out, spi_in, remote) in enumerate(tunnels):
        sel = Selectors.between("10.2.0.0/16", remote)
        # Each tunnel to an MN of its own (the first to the MN of the target's own tunnels):
        # one MN's tunnels in one transfer may overlap each other, which one transfer per
        # tunnel would refuse (test_transfer_policy.py).
        mn = ip(f"192.0.2.{66 + i}")
        assert isinstance(mn, ipaddress.IPv4Address)
        cdbs += [
            context.encode(_sa(spi_out, Direction.OUTBOUND, sel, f"t{i}", mn), 1000.0),
            context.encode(_sa(spi_in, Direction.INBOUND, sel, f"t{i}", mn), 1000.0),
        ]
    now = 1000.0
    # Batched: the whole transfer in one PCTD.
    bulk = _target(conflict, existing)
    tag = cxtp.TransferTag(1, 0, last=True).encode()
    out = bulk.receive(PEER, cxtp.PCTD(MN, 0, b"k" * 20, (tag, *cdbs)), now)
    got = _outcome(bulk, out, len(tunnels))
    # One by one: a transfer per tunnel, each installed before the next is decided.
    ref = _target(conflict, existing)
    want = []
    for i in range(len(tunnels)):
        tag = cxtp.TransferTag(100 + i, 0, last=True).encode()
        o = ref.receive(PEER, cxtp.PCTD(MN, 0, b"k" * 20, (tag, *cdbs[2 * i : 2 * i + 2])), now)
        want += _outcome(ref, o, 1)
    assert got == want
    b, r = _state(bulk), _state(ref)
    assert b[:3] == r[:3]
    assert all(t.state is not TunnelState.ACTIVE for t in bulk.incoming[(PEER, 1)].tunnels)


def test_engine_add_tunnels_refuses_taken_spis_and_clears_flows_once() -> None:
    eng = Engine()
    sel = [Selectors.between("10.2.0.0/16", f"10.64.0.{i}") for i in range(4)]
    own = eng.add_tunnel(
        SPDEntry(sel[0], Action.PROTECT, name="own", static=False),
        _sa(0x100, Direction.OUTBOUND, sel[0], "own"),
        _sa(0x101, Direction.INBOUND, sel[0], "own"),
    )
    eng._flows[b"k"] = own
    items = [
        (SPDEntry(sel[1], Action.PROTECT, name="a", static=False),
         _sa(0x200, Direction.OUTBOUND, sel[1], "a"), _sa(0x201, Direction.INBOUND, sel[1], "a")),
        # its inbound SPI is taken by the engine's own tunnel
        (SPDEntry(sel[2], Action.PROTECT, name="b", static=False),
         _sa(0x300, Direction.OUTBOUND, sel[2], "b"), _sa(0x101, Direction.INBOUND, sel[2], "b")),
        # its outbound SPI is taken by "a", earlier in the same call
        (SPDEntry(sel[3], Action.PROTECT, name="c", static=False),
         _sa(0x200, Direction.OUTBOUND, sel[3], "c"), _sa(0x401, Direction.INBOUND, sel[3], "c")),
    ]  # fmt: skip
    got = eng.add_tunnels(items, held=True)
    assert [t is not None for t in got] == [True, False, False]
    t = got[0]
    assert t is not None and t.state is TunnelState.HELD
    assert eng.tunnel_of(items[0][1]) is t and eng.tunnel_by_spi(0x201) is t
    assert [e.name for e in eng.spd] == ["own", "a"]
    assert sorted(sa.spi for sa in eng.sad) == [0x100, 0x101, 0x200, 0x201]
    assert not eng._flows
    eng.remove_tunnels([t, own])
    assert not list(eng.spd) and not list(eng.sad)


@pytest.mark.parametrize("n", [3, 2000])
def test_expiring_forwarders_leave_the_others(n: int) -> None:
    """Forwarders of a bulk transfer expire together: one pass over the SPD, every other
    policy kept in order."""
    eng = Engine()
    tunnels = _tunnels(eng, n, 0x1000, 0x100000)
    moved = tunnels[::2]
    for t in moved:
        eng.hold(t)
    eng.move_tunnels(moved, PEER, 10.0)
    assert eng.expire_moved(9.0) == []
    assert eng.expire_moved(10.0) == moved
    assert [e.name for e in eng.spd] == [t.name for t in tunnels[1::2]]
    assert eng.inbound_tunnel(0x100000) is None and eng.inbound_tunnel(0x100001) is tunnels[1]


def test_expire_moved_walks_only_when_one_may_be_due_and_misses_none() -> None:
    """expire_moved() skips its walk over every tunnel until the earliest forwarding time
    of the moved tunnels: moves at different times, one made after a walk with an earlier
    end than what was left, each tunnel removed exactly when its own time is over."""
    eng = Engine(ip("192.0.2.1"))
    tunnels = _tunnels(eng, 6, 0x1000, 0x100000)
    t0, t1, t2, t3, t4, t5 = tunnels
    assert eng.expire_moved(0.0) == []  # nothing moved: no walk, nothing to remove
    eng.move_tunnels([t0, t1], PEER, 20.0)
    eng.move_tunnel(t2, PEER, 30.0)
    assert eng.expire_moved(19.9) == []
    assert eng.expire_moved(20.0) == [t0, t1]
    eng.move_tunnels([t3], PEER, 25.0)  # after the walk, earlier than t2's end
    assert eng.expire_moved(24.0) == []
    assert eng.expire_moved(25.0) == [t3]
    assert eng.expire_moved(29.0) == []
    eng.move_tunnel(t4, PEER, 29.5)
    assert eng.expire_moved(29.5) == [t4]
    assert eng.expire_moved(31.0) == [t2]
    assert eng.expire_moved(1e9) == []
    assert [t.name for t in eng.tunnels()] == ["t5"] and eng.moved_tunnels() == []
    assert t5.state is TunnelState.ACTIVE


def test_held_packets_find_their_transfer_among_thousands_of_tunnels() -> None:
    """A held packet's transfer is found by set membership (a bulk transfer holds thousands
    of tunnels); the set follows the transfer's list as tunnels are installed and as the list
    is replaced."""
    from ipsecct.ct.journal import Write
    from ipsecct.ct.transfer import _has, _Reverting
    from ipsecct.ipsec.engine import Held

    core = _target(ConflictPolicy.REASSIGN, [])
    core.settings.max_contexts_per_message = 4000
    cdbs = []
    for i in range(1500):
        sel = Selectors.between("10.2.0.0/16", str(ip("10.64.0.0") + i))
        cdbs += [
            context.encode(_sa(0x10000 + i, Direction.OUTBOUND, sel, f"t{i}"), 1000.0),
            context.encode(_sa(0x20000 + i, Direction.INBOUND, sel, f"t{i}"), 1000.0),
        ]
    tag = cxtp.TransferTag(1, 0, last=True).encode()
    core.receive(PEER, cxtp.PCTD(MN, 0, b"k" * 20, (tag, *cdbs)), 1000.0)
    inc = core.incoming[(PEER, 1)]
    assert len(inc.tunnels) == 1500
    last = inc.tunnels[-1]
    assert core.hold(Held(last, b"x" * 60, False))
    assert inc.held and inc.held[-1].tunnel is last
    other = Engine().add_tunnel(
        SPDEntry(Selectors.between("10.3.0.0/16", "10.9.0.1"), Action.PROTECT, static=False),
        _sa(0x999, Direction.OUTBOUND, Selectors.between("10.3.0.0/16", "10.9.0.1"), "o"),
        None,
    )
    assert not core.hold(Held(other, b"x" * 60, False))  # not in any transfer here
    # The list grows (an install appends) or is replaced: membership follows.
    assert not _has(inc, other)
    inc.tunnels.append(other)
    assert _has(inc, other)
    rv = _Reverting(2, [last], Write())
    assert _has(rv, last) and not _has(rv, other)
    rv.tunnels = [other]
    assert _has(rv, other) and not _has(rv, last)


def test_a_rolled_back_bulk_transfer_reactivates_all_and_gives_back_what_it_held() -> None:
    from ipsecct.ct.transfer import Inject
    from ipsecct.ipsec.engine import Held

    eng = Engine()
    tunnels = _tunnels(eng, 2000, 0x10000, 0x20000)
    src = TransferCore(eng, Endpoint(SG, 4500), Settings())
    src.start(tunnels, PEER, 1000.0)
    assert all(t.state is TunnelState.HELD for t in tunnels)
    packets = [(tunnels[i], bytes([i % 256]) * 40) for i in (5, 1999, 5, 700)]
    for t, p in packets:
        assert src.hold(Held(t, p, False))
    out = src.peer_lost(PEER, 1000.1)
    assert all(t.state is TunnelState.ACTIVE for t in tunnels)
    assert [o.packet for o in out if isinstance(o, Inject)] == [p for _, p in packets]


def test_a_bulk_make_before_break_commit_sends_every_final_state() -> None:
    """The FINAL states of a bulk make-before-break transfer go in messages that fit the
    CXTP length (a thousand a message, whatever their size: with 1024-bit windows 409 fit,
    the message could not be encoded and no final state went, the target activating every
    tunnel with the snapshot's window)."""
    s = Settings(make_before_break=True, mbb_margin=1000)
    eng = Engine()
    tunnels = _tunnels(eng, 900, 0x10000, 0x20000, window=1024)
    src = TransferCore(eng, Endpoint(SG, 4500), s)
    dst = TransferCore(Engine(), Endpoint(ip("192.0.2.2"), 4500), s)

    def shuttle(out: Sequence[object], to: TransferCore, frm: str) -> list[object]:
        got: list[object] = []
        for o in out:
            if isinstance(o, Send):
                cxtp.encode(o.msg)  # (every message fits)
                got += to.receive(frm, o.msg, 1000.0)
        return got

    _, out = src.start(tunnels, PEER, 1000.0)
    back = shuttle(out, dst, "sg1")
    for t in tunnels:  # accepted at the source after the snapshot
        assert cast(SecurityAssociation, t.inbound).window.check_and_update(7)
    commit = shuttle(back, src, PEER)
    finals = [o for o in commit if isinstance(o, Send) and cxtp.cdb_fpt(
        o.msg.cdbs[1]) == FPT_FINAL]  # type: ignore[union-attr]  # fmt: skip
    assert sum(len(o.msg.cdbs) - 1 for o in finals) == 900  # type: ignore[union-attr, misc]
    shuttle(commit, dst, "sg1")
    moved = dst.engine.tunnels()
    assert len(moved) == 900 and all(t.state is TunnelState.ACTIVE for t in moved)
    assert all(not cast(SecurityAssociation, t.inbound).window.check(7)
               for t in moved)  # merged: 7 is taken

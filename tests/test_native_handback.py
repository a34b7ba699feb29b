"""The seam where an SA goes back to the native data path (C) while packets queued for it in
Python during a transfer (held) are not opened or sent yet.

A transfer's target activates its tunnel, hands the inbound SA to C (``offload_inbound``)
and only then has its held packets injected; a source that rolls back activates the tunnel
and injects what it held, the first packet handed back to C by the Python path. In a gateway
the forwarding thread may take the GIL at any moment in between and open or seal packets of
that SA in C. These tests drive that seam deterministically: a stand-in for the thread (the
same C calls its batches make, ``open_spi`` / ``seal_flow``, what C does not finish queued
for the event loop as the thread queues it) runs right after the activation, right after the
hand-over to C and after every injected packet, and the tests require that no packet is
delivered twice, no (SPI, sequence number) is sent twice, the replay window ends up as the
union of what both paths accepted, and the counters count each packet once.

Why nothing can go wrong there (the tests keep it so): an SA's replay window, sequence
number and counters are never copied to C and kept in Python as well, they are *moved*
(``native.push`` loads them into an inactive C object and makes it active; every Python
reader or writer of an active SA takes them back first, ``native.reclaim``). Held packets
were only authenticated (``esp.authenticate`` leaves the window alone), and an injected
packet goes through ``Engine.inbound`` / ``outbound`` like any other: to C first if C owns the
SA, else to the Python path, which owns it then. So the queue is opened against the one
window there is, in whatever order the thread's packets came: a queued packet C's window
moved past is a replay drop (as any packet older than the window), one inside it is
accepted once.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from ipsecct.ipsec import esp
from ipsecct.ipsec.engine import Tunnel, TunnelState
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.sad import SecurityAssociation
from tests.helpers.data_path import data_path
from tests.helpers.transfer import Gw, World, stream_seq, udp_packet

pytestmark = pytest.mark.skipif(
    os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"),
    reason="IPSECCT_PURE_PYTHON forces the Python path",
)

_DROPS = tuple(Drop)


class Thread:
    """The forwarding thread of ``gw``, stepped by the test: what its batches do in C with
    the packets given to it (``esp`` from the MN, ``inner`` from the host), one packet a step,
    and what C does not finish (an SA C does not own now, a new flow) queued for the event
    loop (``drain``), as the thread queues it."""

    def __init__(self, gw: Gw, esp: list[bytes], inner: list[bytes]) -> None:
        self.gw = gw
        self.todo: list[tuple[bool, bytes]] = [(True, d) for d in esp] + [
            (False, p) for p in inner
        ]
        self.up: list[tuple[bool, bytes]] = []
        self.opened = 0  # delivered by C in a batch (counted in the table, not the engine)
        self.sealed = 0
        self.drops: Counter[str] = Counter()
        self.steps = 0

    def step(self, n: int = 1) -> None:
        nt = self.gw.engine.native
        now = self.gw.world.now
        for _ in range(n):
            if not self.todo:
                return
            self.steps += 1
            inbound, data = self.todo.pop(0)
            if inbound:
                r = nt.open_spi(data, now)
                if r is None:
                    self.up.append((True, data))
                elif type(r[1]) is bytes:
                    self.opened += 1
                    self.gw.delivered.append(r[1])
                else:
                    assert type(r[1]) is int
                    self.drops[_DROPS[r[1]].value] += 1
            else:
                r = nt.seal_flow(data, now)
                if r is None:
                    self.up.append((False, data))
                else:
                    self.sealed += 1
                    self.gw.emit(bytes(r[1]))

    def drain(self) -> None:
        """The event loop takes what the thread handed up (the Python path, or C by now)."""
        up, self.up = self.up, []
        for inbound, data in up:
            if inbound:
                self.gw.from_mn(data)
            else:
                self.gw.from_inner(data)

    def finish(self) -> None:
        while self.todo or self.up:
            self.step(len(self.todo))
            self.drain()


def _interleave(
    gw: Gw, thread: Thread, monkeypatch: pytest.MonkeyPatch, at: str, first: int = 2
) -> None:
    """Let ``thread`` run ``first`` steps right after ``gw.engine.<at>`` (the activation, or
    the hand-over to C) and a step after every packet the transfer core injects or the event
    loop hands to the engine: where the real thread may take the GIL."""
    eng = gw.engine
    orig_at: Callable[[Tunnel], None] = getattr(eng, at)

    def after_at(t: Tunnel) -> None:
        orig_at(t)
        thread.step(first)

    monkeypatch.setattr(eng, at, after_at)
    orig_mn, orig_inner = gw.from_mn, gw.from_inner

    def from_mn(data: bytes) -> None:
        orig_mn(data)
        thread.step()

    def from_inner(packet: bytes) -> None:
        orig_inner(packet)
        thread.step()

    monkeypatch.setattr(gw, "from_mn", from_mn)
    monkeypatch.setattr(gw, "from_inner", from_inner)


def _spy(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Count the packets the Python path seals or opens, by id of the SA."""
    calls: Counter[int] = Counter()
    enc, dec = esp.encapsulate, esp.decapsulate

    def encapsulate(sa: SecurityAssociation, *a: Any, **kw: Any) -> Any:
        calls[id(sa)] += 1
        return enc(sa, *a, **kw)

    def decapsulate(sa: SecurityAssociation, *a: Any) -> Any:
        calls[id(sa)] += 1
        return dec(sa, *a)

    monkeypatch.setattr(esp, "encapsulate", encapsulate)
    monkeypatch.setattr(esp, "decapsulate", decapsulate)
    return calls


def _accepted(sa: SecurityAssociation, seqs: list[int]) -> list[int]:
    """Those of ``seqs`` the inbound SA's replay window marks as seen (or left behind)."""
    w = sa.window
    return [s for s in seqs if s <= w.top and not w.check(s)]


def _check_wire(w: World) -> list[tuple[int, int]]:
    wire = [(spi, seq) for g in w.gw.values() for spi, seq in g.wire]
    assert [k for k, n in Counter(wire).items() if n > 1] == [], "an (SPI, seq) sent twice"
    return wire


@pytest.mark.parametrize("burst", [3, 150], ids=["within-window", "past-the-window"])
def test_the_target_hands_the_sa_to_c_before_its_held_packets_are_opened(
    burst: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the COMMIT the target hands the inbound SA to C, then the held packets are
    injected; the thread opens newer packets (and a copy of a held one) in C in between.
    Within the window every packet is delivered once; when C's window has moved more than a
    window past the held ones they are replay drops, never delivered. The window is the
    union, the counters count each packet once, and what the target sends at the seam (the
    held host packets, the signal, the thread's seals) never repeats a number."""
    with data_path("native"):
        w = World(window=64)
        sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
        for i in range(3):
            assert w.mn_send(i) is not None  # ESP 1..3 at sg1, in C after the first
            w.host_send("sg1", i)
        assert w.sg_in.native is not None and w.sg_in.native.active
        old = w.mn.send(udp_packet(3, up=True))  # ESP 4, opened at sg1 in C ...
        assert old is not None
        sg1.from_mn(old)
        w.transfer()
        w.deliver("sg1", "sg2")  # installed held at sg2
        w.deliver("sg2", "sg1")  # sg1 moves; its FINAL and COMMIT wait on the link
        (t2,) = sg2.engine.tunnels()
        assert t2.state is TunnelState.HELD and t2.inbound is not None
        # The MN reaches sg2 before the COMMIT: authenticated and held there (ESP 5..7; a
        # copy of 6 from the wire is not held again, held_duplicate; ESP 4 again is refused),
        # with the host's packets for it.
        queued = [w.mn.send(udp_packet(10 + i, up=True)) for i in range(3)]
        assert all(d is not None for d in queued)
        held_esp = [d for d in queued if d is not None]
        for d in [*held_esp, held_esp[1], old]:  # (... and refused here: not held)
            sg2.from_mn(d)
        for i in range(3):
            w.host_send("sg2", 50 + i)
        assert sg2.delivered == [] and sg2.wire == []
        # What the thread gets meanwhile: newer ESP (8..), copies of ESP 5 (held) and 4 (opened
        # at sg1 before the transfer), host packets.
        newer = [w.mn.send(udp_packet(100 + i, up=True)) for i in range(burst)]
        thread = Thread(
            sg2,
            [d for d in newer if d is not None] + [held_esp[0], old],
            [udp_packet(60 + i, up=False) for i in range(3)],
        )
        # past the window: the thread's whole burst comes before the queue is opened
        _interleave(sg2, thread, monkeypatch, "offload_inbound", 2 if burst < 64 else burst)
        py = _spy(monkeypatch)
        w.deliver_all()  # the FINAL and the COMMIT: activation, hand-over, injection
        assert thread.steps >= 2  # the thread ran between the hand-over and the queue
        assert t2.state is TunnelState.ACTIVE and t2.inbound.native.active  # type: ignore[comparison-overlap]  # moved on since narrowed
        thread.finish()
        # Inbound: each packet delivered once (the MN's stream numbers), the rest replays.
        got = Counter(stream_seq(p) for p in sg2.delivered)
        assert [s for s, n in got.items() if n > 1] == [], "a packet delivered twice"
        fresh = list(range(100, 100 + burst))
        want = fresh + ([10, 11, 12] if burst < 64 else [])
        assert sorted(got) == sorted(want)
        # the copy of 4 at the hold and from the thread; within the window the copy of 5 that
        # came after the thread's; past it, all of 5..7 and that copy (the copy of 6 was
        # dropped at the hold, a copy of one held)
        replays = 3 if burst < 64 else 6
        assert sg2.engine.stats.drops["replay"] + thread.drops["replay"] == replays
        assert sg2.core.counters["held_duplicate"] == 1
        assert sum(thread.drops.values()) == thread.drops["replay"]
        assert not sg1.delivered[4:]  # (sg1 opened 1..4 only)
        # Every packet sg2 opened was opened in C (handed over before the queue); it sent
        # the signal and its first host packet on the Python path, the rest in C.
        sa = t2.inbound
        assert py[id(sa)] == 0 and py[id(t2.outbound)] == 2
        # The window is the union of what the FINAL brought and what was accepted here.
        top = 7 + burst
        assert sa.window.top == top
        opened_here = list(range(8, top + 1)) + ([5, 6, 7] if burst < 64 else [])
        assert sorted(_accepted(sa, list(range(max(1, top - 63), top + 1)))) == list(
            range(max(1, top - 63), top + 1)
        )
        # Counters: what sg1 counted (carried by the context) plus each packet opened here.
        assert sa.counters.packets == 4 + len(opened_here) == 4 + len(sg2.delivered)
        sg2.engine.fold_native_stats()
        assert sg2.engine.stats.in_packets + thread.opened == len(sg2.delivered)
        # Outbound: no number twice, none skipped, the last one in C read exactly.
        wire = _check_wire(w)
        mine = sorted(seq for spi, seq in sg2.wire if spi == t2.outbound.spi)
        assert mine == list(range(mine[0], mine[0] + len(mine))) and mine[-1] == t2.outbound.seq
        w.flush_to_mn()
        host = Counter(stream_seq(p) for p in w.mn.delivered)
        assert sorted(host) == [0, 1, 2, 50, 51, 52, 60, 61, 62]
        assert max(host.values()) == 1 and Drop.ICV not in w.mn.dropped
        assert len(wire) == len(set(wire))


def test_the_source_hands_the_sa_back_to_c_while_its_held_packets_are_injected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rolled-back source: the tunnel is active again, its SAs still frozen in C; the first
    injected packet of each direction goes through the Python path, which hands the SA
    back to C, and the rest of the queue through C, with the thread opening and sealing in
    C between any two of them (what it gets before the hand-back goes up, to the event loop).
    No (SPI, seq) twice, the numbers contiguous, each packet delivered once, the window the
    union, the counters exact."""
    with data_path("native"):
        w = World(window=64)
        sg1 = w.gw["sg1"]
        esp_in = []
        for i in range(3):
            d = w.mn_send(i)
            assert d is not None
            esp_in.append(d)
            w.host_send("sg1", i)
        old = esp_in[1]
        t = w.tunnel
        assert w.sg_in.native is not None and w.sg_in.native.active
        assert w.sg_out.native is not None and w.sg_out.native.active
        w.transfer()
        assert t.state is TunnelState.HELD and not w.sg_in.native.active
        assert not w.sg_out.native.active and w.sg_out.seq == 3
        held_esp = []
        for i in range(4):
            d = w.mn.send(udp_packet(10 + i, up=True))
            assert d is not None
            held_esp.append(d)
            sg1.from_mn(d)
            w.host_send("sg1", 50 + i)
        sg1.from_mn(held_esp[2])  # a copy from the wire, authentic: not held again
        assert sg1.core.counters["held_duplicate"] == 1
        assert sg1.wire[3:] == [] and len(sg1.delivered) == 3
        newer = [w.mn.send(udp_packet(100 + i, up=True)) for i in range(6)]
        # (and copies of held ESP 4 and 7, and of ESP 2, opened before the transfer in C)
        thread = Thread(
            sg1,
            [d for d in newer if d is not None] + [held_esp[0], held_esp[3], old],
            [udp_packet(60 + i, up=False) for i in range(6)],
        )
        _interleave(sg1, thread, monkeypatch, "activate")
        py = _spy(monkeypatch)
        w.drop("sg1", "sg2")
        sg1.run(sg1.core.peer_lost("sg2", w.now))  # rolled back: activate, inject
        assert t.state is TunnelState.ACTIVE and sg1.injected == 8  # type: ignore[comparison-overlap]  # moved on since narrowed
        assert thread.up  # what came before the hand-back went up to the event loop
        thread.finish()
        assert w.sg_in.native.active and w.sg_out.native.active  # back in C
        got = Counter(stream_seq(p) for p in sg1.delivered)
        assert [s for s, n in got.items() if n > 1] == [], "a packet delivered twice"
        assert sorted(got) == [0, 1, 2, 10, 11, 12, 13, *range(100, 106)]
        assert sg1.engine.stats.drops["replay"] + thread.drops["replay"] == 3
        # the Python path handed each SA back to C with the first packet it took after the
        # activation: C did the rest
        assert py[id(w.sg_in)] == 1 and py[id(w.sg_out)] == 1
        sa = w.sg_in
        assert sa.window.top == 13 and _accepted(sa, list(range(1, 14))) == list(range(1, 14))
        assert sa.counters.packets == 13
        sg1.engine.fold_native_stats()
        assert sg1.engine.stats.in_packets + thread.opened == 13
        # Outbound: 3 before, 4 held, 6 from the thread: 1..13 once each, in C at the end.
        wire = _check_wire(w)
        assert sorted(seq for _, seq in wire) == list(range(1, 14))
        assert w.sg_out.seq == 13 and w.sg_out.counters.packets == 13
        assert thread.sealed > 0  # some sealed by C between the injected ones
        w.flush_to_mn()
        host = Counter(stream_seq(p) for p in w.mn.delivered)
        assert sorted(host) == [0, 1, 2, 50, 51, 52, 53, *range(60, 66)]
        assert max(host.values()) == 1 and not w.mn.dropped

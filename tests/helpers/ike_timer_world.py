"""Two worlds of IKE engines driven by the same random operations, one with the timer heap
and one walking every IKE SA as before (``World``, ``connect_world``, ``KINDS``), for
tests/test_ikev2_timers and tests/test_ikev2_indexes."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

from ipsecct.errors import IkeContextError, IkeProtocolError
from ipsecct.ikev2.engine import (
    HALF_OPEN_TIMEOUT,
    IkeEngine,
    Output,
    Send,
)
from ipsecct.ikev2.ikesa import ChildSA, IkeSA, IkeState
from tests.helpers.ikev2_engines import I500, R500, conn, mn_conn

Op = tuple[str, int, int]
KINDS = ("run", "jump", "initiate", "delete", "rekey_ike", "rekey_child", "liveness",
         "create_child", "delete_child", "volume", "drop", "hold", "release", "collide", "quiet",
         "move", "forget", "mid_sync")  # fmt: skip
JUMPS = (0.3, 1.0, 2.0, 3.9, 5.0, 9.5, 16.0, 31.0, 61.0, 130.0)


def reference_deadline(eng: IkeEngine) -> float | None:
    """next_deadline() as it was: the half-open and connecting tables and a walk of every
    IKE SA (engine._next_deadline_scan)."""
    ds = [ike.created + HALF_OPEN_TIMEOUT for ike in eng.half_open.values()]
    ds += [c.deadline for c in eng.connecting.values()]
    d = eng._next_deadline_scan()
    if d is not None:
        ds.append(d)
    return min(ds) if ds else None


def _norm(o: Output) -> tuple[Any, ...]:
    """An output as both worlds give it alike (their key exchanges differ, so the datagrams'
    bytes do; their headers, lengths and everything else do not)."""
    if isinstance(o, Send):
        return ("send", str(o.src), str(o.dst), o.data[:28].hex(), len(o.data))
    fields: list[object] = [type(o).__name__]
    for v in vars(o).values():
        if isinstance(v, IkeSA):
            fields.append((v.spi_i.hex(), v.spi_r.hex(), v.state.value))
        elif isinstance(v, ChildSA):
            fields.append((v.spi_in, v.spi_out))
        elif v is None or isinstance(v, (str, int, tuple)):
            fields.append(v)
        else:
            fields.append(type(v).__name__)
    return tuple(fields)


class World:
    """An MN's engine and a gateway's, with seeded randomness (the same in both worlds),
    the wire between them, and a trace of every output."""

    def __init__(self, seed: int, scan: bool) -> None:
        ri, rr = random.Random(seed * 2), random.Random(seed * 2 + 1)
        # three identities (an INITIAL_CONTACT replaces the IKE SAs of its own only): the
        # gateway holds several IKE SAs, and both sides rekey both kinds of SA
        mns = [mn_conn(local_id=f"mn{k}.test", dpd=7.0, rekey=45.0, child_rekey=33.0)
               for k in range(3)]  # fmt: skip
        self.ini = IkeEngine(mns, random=ri.randbytes)
        self.resp = IkeEngine([conn(dpd=10.0, rekey=70.0, child_rekey=25.0)],
                              random=rr.randbytes)  # fmt: skip
        for e in (self.ini, self.resp):
            e._timers_by_scan = scan
        self.now = 0.0
        self.drop = 0  # the next this many datagrams are lost
        self.hold = 0  # ... or held back, until a "release" (exchanges that cross)
        self.held: list[tuple[str, Send]] = []
        self.sizes: list[int] = []  # the gateway's IKE SAs after each step
        self.trace: list[tuple[Any, ...]] = []

    def engines(self) -> tuple[IkeEngine, IkeEngine]:
        return self.ini, self.resp

    def deliver(self, outs: list[Output], side: str) -> None:
        pending = [(side, o) for o in outs]
        while pending:
            frm, o = pending.pop(0)
            self.trace.append((frm, _norm(o)))
            if not isinstance(o, Send):
                continue
            if self.drop:
                self.drop -= 1
                continue
            if self.hold:
                self.hold -= 1
                self.held.append((frm, o))
                continue
            eng, to = (self.resp, "r") if frm == "i" else (self.ini, "i")
            pending += [(to, x) for x in eng.receive(o.data, o.src, o.dst, self.now)]

    def tick(self) -> None:
        self.deliver(self.ini.tick(self.now), "i")
        self.deliver(self.resp.tick(self.now), "r")

    def deadlines(self) -> tuple[float | None, float | None]:
        return self.ini.next_deadline(), self.resp.next_deadline()

    def call(self, side: str, f: Callable[[], list[Output]]) -> None:
        try:
            self.deliver(f(), side)
        except (IkeProtocolError, IkeContextError) as exc:
            self.trace.append((side, ("refused", str(exc))))

    def step(self, op: Op) -> None:
        kind, a, b = op
        side = "i" if b % 2 else "r"
        eng = self.ini if side == "i" else self.resp
        live = [s for s in eng.ike_sas() if s.state is not IkeState.DEAD]
        ike = live[a % len(live)] if live else None
        now = self.now
        if kind == "run":  # time passes to ``now + dt``, the engines ticked at each deadline
            until = now + JUMPS[a % len(JUMPS)]
            for _ in range(200):
                ds = [d for d in self.deadlines() if d is not None]
                if not ds or min(ds) > until:
                    break
                self.now = max(self.now, min(ds))
                self.tick()
            self.now = until
            self.tick()
        elif kind == "jump":  # the timer fires late: one tick after a jump
            self.now += JUMPS[a % len(JUMPS)]
            self.tick()
        elif kind == "initiate":
            if len(self.ini.ike_sas()) < 8:
                c = self.ini.connections[a % 3]
                self.call("i", lambda: self.ini.initiate(c, I500, R500, now))
        elif kind == "drop":
            self.drop = a % 4
        elif kind == "hold":
            self.hold = a % 4
        elif kind == "release":  # in the order sent, or the other way round
            back, self.held = self.held, []
            for frm, o in back if b % 2 else back[::-1]:
                eng, to = (self.resp, "r") if frm == "i" else (self.ini, "i")
                self.deliver(eng.receive(o.data, o.src, o.dst, now), to)
        elif ike is None:
            return
        elif kind == "delete":
            self.call(side, lambda: eng.delete(ike, now))
        elif kind == "rekey_ike":
            self.call(side, lambda: eng.rekey_ike(ike, now))
        elif kind == "liveness":
            self.call(side, lambda: eng.liveness(ike, now))
        elif kind == "create_child":
            cc = ike.conn.children[0]
            self.call(side, lambda: eng.create_child(ike, cc, now))
        elif kind in ("rekey_child", "delete_child", "volume") and ike.children:
            child = ike.children[a % len(ike.children)]
            if kind == "rekey_child":
                self.call(side, lambda: eng.rekey_child(ike, child, now))
            elif kind == "delete_child":
                self.call(side, lambda: eng.delete_child(ike, child, now))
            else:
                self.call(side, lambda: eng.volume_limit(ike, child, bool(b & 2), now))
        elif kind == "collide":  # both sides rekey one IKE SA or CHILD SA at once (§2.8)
            other = self.resp if eng is self.ini else self.ini
            peer = other.by_spi.get(ike.spi_r if ike.we_initiated else ike.spi_i)
            if peer is None or not ike.children or not peer.children:
                return
            self.hold = 2
            for e, x, sd in ((eng, ike, side), (other, peer, "r" if side == "i" else "i")):
                if b & 2:
                    self.call(sd, functools.partial(e.rekey_ike, x, now))
                else:
                    self.call(sd, functools.partial(e.rekey_child, x, x.children[0], now))
            self.step(("release", 0, a))
        elif kind == "quiet":  # as the adapter does around a transfer, by hand
            ike.quiet = not ike.quiet
            kept = None if ike.quiet else eng.take_held(ike)
            if kept is not None:  # processed here: the transfer did not commit
                datagrams, src, dst = kept
                for data in datagrams:
                    self.call(side, functools.partial(eng.receive, data, src, dst, now))
        elif kind == "move":  # exported and taken back (a transfer there and back again)
            try:
                cdbs = eng.export_ike(ike, now)
            except IkeContextError as exc:
                self.trace.append((side, ("refused", str(exc))))
                return
            moved = eng.import_ike(cdbs, now)
            self.trace.append((side, ("moved", moved.our_spi.hex())))
        elif kind == "forget":  # taken over elsewhere: the peer finds it dead
            eng.forget(ike)
        elif kind == "mid_sync":  # a take-over from a replica
            self.call(side, lambda: eng.start_mid_sync(ike, now))


def connect_world(w: World) -> None:
    w.deliver(w.ini.initiate(w.ini.connections[0], I500, R500, w.now), "i")

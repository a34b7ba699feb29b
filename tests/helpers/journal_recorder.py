"""A journal of the transfer core that records what is submitted and leaves each write
unsettled until the test settles it, as a disk would (``Recorder``), and the sans-I/O
transfer world with one on each gateway (``journaled_world``, ``settle``), for
tests/test_state and tests/test_transfer_core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ipsecct.ct.journal import Write
from ipsecct.ipsec.engine import Tunnel
from ipsecct.ipsec.sad import SecurityAssociation


class Recorder:
    """A Journal that records what is submitted (with how many messages were on the links
    then) and leaves each write unsettled until the test settles it, as a disk would.
    ``fail``: the kind whose writes fail on the disk; ``refuse``: the kind refused at once."""

    def __init__(self, world: object, fail: str = "", refuse: str = "") -> None:
        self.world = world
        self.fail = fail
        self.refuse = refuse
        self.calls: list[tuple[str, int]] = []
        self.writes: list[tuple[str, Write, list[SecurityAssociation]]] = []
        self.arrivals: set[int] = set()
        self.discards: dict[int, str] = {}
        self.leaving_to: list[str] = []

    def _submit(self, what: str, then: list[SecurityAssociation] | None = None) -> Write:
        from ipsecct.ct.journal import Write
        from ipsecct.errors import JournalError

        links = self.world.links  # type: ignore[attr-defined]
        self.calls.append((what, sum(len(q) for q in links.values())))
        if what == self.refuse:
            raise JournalError("disk full")
        w = Write()
        self.writes.append((what, w, then or []))
        return w

    def settle(self) -> list[str]:
        """Every write submitted so far reaches the disk (or fails): what a real journal does
        on success (grant the first block) included. Returns their kinds."""
        from ipsecct.ipsec.sequence import Reservations

        kinds = []
        for what, w, sas in self.writes:
            if what == self.fail:
                w.fail("disk full")
                continue
            for sa in sas:  # what a real journal does: the first block, once durable
                r = Reservations(64)
                r.granted(sa, r.request(sa))
            w.succeed()
            kinds.append(what)
        self.writes = []
        return kinds

    def taken_over(
        self,
        tunnels: Sequence[Tunnel],
        peer: str,
        *,
        pending: bool,
        leaving: tuple[str, int] | None = None,
    ) -> None:
        raise AssertionError("the transfer core submits; taken_over is the fail-over's")

    def arriving(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        from ipsecct.ipsec.sequence import Reservations

        for t in tunnels:  # enrolled: nothing may be sent before the write is done
            Reservations.enrol(t.outbound, 0)
        self.arrivals.add(transfer_id)
        return self._submit("pending", [t.outbound for t in tunnels])

    def prior_ceiling(self, sa: SecurityAssociation) -> int:
        return 0

    def arrived(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        return self._submit("taken")

    def may_have_arrived(self, transfer_id: int, peer: str, age: float | None) -> bool:
        self.asked_age = age
        return transfer_id in self.arrivals

    def leaving(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        self.leaving_to.append(peer)
        return self._submit("leaving")

    def left(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        return self._submit("given")

    def staying(self, tunnels: Sequence[Tunnel], peer: str) -> Write:
        return self._submit("kept")

    def resumed(self, tunnels: Sequence[Tunnel], peer: str) -> Write:
        return self._submit("resumed", [t.outbound for t in tunnels])

    def cancelled(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int = 0) -> Write:
        if transfer_id:
            self.discards[transfer_id] = peer
        return self._submit("cancelled")

    def discarded(self, transfer_id: int) -> str | None:
        return self.discards.get(transfer_id)


def journaled_world() -> tuple[Any, Recorder, Recorder]:
    """The sans-I/O transfer world (sg1 the source, sg2 the target) with a journal on each
    gateway whose writes settle when the test says so."""
    from tests.helpers.transfer import World

    w = World()
    j1, j2 = Recorder(w), Recorder(w)
    w.gw["sg1"].core.journal = j1
    w.gw["sg2"].core.journal = j2
    return w, j1, j2


def settle(w: object, name: str, j: Recorder) -> list[str]:
    """``j``'s writes land; gateway ``name``'s core is told (as the adapter does)."""
    kinds = j.settle()
    gw = w.gw[name]  # type: ignore[attr-defined]
    gw.run(gw.core.settled(w.now))  # type: ignore[attr-defined]
    return kinds

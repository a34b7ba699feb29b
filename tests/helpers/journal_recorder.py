"""A journal of the transfer core that records what is submitted and leaves each write
unsettled until the test settles it, as a disk would (``Recorder``), and the sans-I/O
transfer world with one on each gateway (``journaled_world``, ``settle``), for
tests/test_state and tests/test_transfer_core; the early COMMIT's world of two tunnels
(``early_world``), for tests/test_transfer_core and tests/test_make_before_break."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ipsecct.ct.journal import Write
from ipsecct.ct.transfer import Settings
from ipsecct.ipsec.algorithms import EncAlg
from ipsecct.ipsec.engine import Tunnel
from ipsecct.ipsec.sad import SecurityAssociation
from tests.helpers.transfer import HOST, World, ip


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


# -- commit what you accept (Settings.commit_early) --------------------------------------------


def early_world(
    *, mbb: bool = True, refuse_b: bool = True
) -> tuple[World, Any, Any, Tunnel, Tunnel]:
    """sg1 with the MN's tunnel and a second one ``b`` (ChaCha20, which sg2 refuses when
    ``refuse_b``), a journal on each gateway whose writes settle when the test says."""
    from ipsecct.ipsec.spd import Action, SPDEntry
    from tests.helpers.transfer import tunnel_sas

    s1 = Settings(commit_early=True, make_before_break=mbb, mbb_tail=4 if mbb else 0)
    encs = {EncAlg.AES_GCM_16} | (set() if refuse_b else {EncAlg.CHACHA20_POLY1305})
    w = World(settings={"sg1": s1, "sg2": Settings(supported_enc=frozenset(encs))})
    sg1 = w.gw["sg1"]
    (o, i, s), _ = tunnel_sas(
        "sg1", spi_down=0x500, spi_up=0x600, mn_inner="10.1.0.5", mn_addr="192.0.2.5",
        name="b", enc=EncAlg.CHACHA20_POLY1305,
    )  # fmt: skip
    b = sg1.engine.add_tunnel(SPDEntry(s, Action.PROTECT, name="b", static=False), o, i)
    j1, j2 = Recorder(w), Recorder(w)
    sg1.core.journal = j1
    w.gw["sg2"].core.journal = j2
    return w, j1, j2, w.tunnel, b


MN_INNER_B = "10.1.0.5"


def to_b(n: int) -> bytes:
    """An inner packet for tunnel b (to its MN's inner address)."""
    from ipsecct.ipsec import ippacket

    body = n.to_bytes(4, "big") + bytes(56)
    return ippacket.build_udp(ip(HOST), ip(MN_INNER_B), 5000, 7000, body)


def settle_at(w: World, name: str, j: Any) -> list[str]:
    return settle(w, name, j)


def sent_on(w: World, spi: int) -> list[tuple[str, int]]:
    return [(g, seq) for g, s, seq in w.all_wire() if s == spi]

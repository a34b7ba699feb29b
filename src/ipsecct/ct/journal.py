"""Who sends on a tunnel, across transfers, fail-overs and restarts (sans-I/O).

A gateway's configuration says which tunnels it serves when it first starts; what happened
since (a tunnel given away by a transfer or a rebalance, taken over from a peer or a failed
active, deleted by the operator) and how far each outbound counter went is *state*, which the
adapter (:mod:`ipsecct.gateway.state`) keeps on stable storage. This module is the pure part:
the record kept per outbound SA, the :class:`Journal` the transfer and fail-over cores call
before they change who sends, and :func:`merge`, which decides on start what of the
configuration may run.

An outbound SA is known by a keyed fingerprint of its keys (never the keys): sequence numbers
must be unique per key, whatever SPI or name the SA has.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..ipsec.engine import Tunnel
from ..ipsec.sad import SecurityAssociation

# The grant (docs/state.md, "the grant"): a source's "leaving" row reserves this many numbers
# past each outbound SA's transferred number, and a target's "pending" row as many; a COMMIT
# that says so lets the target send up to the transferred number + the grant before its own
# "pending" row is durable. A journal that makes these reservations says so with a true
# ``reserves_grant`` attribute (one without it is never granted nor granted to).
GRANT = 1 << 16


def transferred_at(t: Tunnel) -> int:
    """The number tunnel ``t`` is being transferred at: its cap with make-before-break, else
    its counter (what its context carries, and what a grant and a LEAVING mark count from)."""
    sa = t.outbound
    return t.transfer_cap if t.transfer_cap < sa.seq_limit else sa.seq


def grant_ceiling(sa: SecurityAssociation, transferred: int) -> int:
    """The highest number the grant lets a target send on ``sa`` transferred at
    ``transferred`` (never past the counter's limit)."""
    return min(transferred + GRANT, sa.seq_limit)


class Owner(enum.Enum):
    OWNED = "owned"  # this gateway sends on it
    AWAY = "away"  # given away (transfer, rebalance): another gateway sends on it
    PENDING = "pending"  # received by a transfer not committed when last recorded
    # being given away by a transfer (``gateway``, ``transfer``) whose outcome this gateway
    # may not know: after a restart it asks that gateway before it sends again
    LEAVING = "leaving"
    DELETED = "deleted"  # removed by the operator (``sa delete``)


@dataclass
class SAState:
    """What is kept per outbound SA: its highest reserved sequence number and its owner."""

    fingerprint: str
    name: str
    spi: int
    peer: str
    aead: bool
    ceiling: int
    owner: Owner
    detail: str = ""
    changed: float = 0.0  # wall-clock time of the last change of owner
    # AWAY, LEAVING: the transfer that gave it away (its COMMIT can be repeated); PENDING,
    # OWNED after a transfer: the one it came by
    transfer: int = 0
    gateway: str = ""  # LEAVING, AWAY by transfer: the gateway it went to


class Write:
    """One journal write under way (sans-I/O): ``done`` once it is on stable storage,
    ``failed`` if it could not be made durable (then it may or may not have reached the
    disk: whoever relied on it must assume either). The adapter settles it and then tells
    the core (:meth:`~ipsecct.ct.transfer.TransferCore.settled`)."""

    __slots__ = ("done", "error", "failed")

    def __init__(self) -> None:
        self.done = False
        self.failed = False
        self.error = ""

    @property
    def settled(self) -> bool:
        return self.done or self.failed

    def succeed(self) -> None:
        self.done = True

    def fail(self, error: str) -> None:
        self.failed = True
        self.error = error

    @classmethod
    def durable(cls) -> Write:
        """A write that needs no waiting (nothing to record)."""
        w = cls()
        w.done = True
        return w


class Journal(Protocol):
    """Makes ownership changes durable.

    The transfer core *submits* its changes and goes on: each call returns a :class:`Write`
    at once, and the core waits for it only where the change must be on stable storage
    before something happens (see docs/state.md, "what is written when"). Writes are made
    durable in the order they were submitted (several may share one transaction).
    :meth:`taken_over` is the synchronous form (fail-over): it returns once the change is
    on stable storage, or raises :class:`JournalError`."""

    def taken_over(
        self,
        tunnels: Sequence[Tunnel],
        peer: str,
        *,
        pending: bool,
        leaving: tuple[str, int] | None = None,
    ) -> None:
        """``tunnels`` arrive from ``peer``: record them (``pending`` until the transfer is
        committed) and reserve their first block past the sequence number they came with.
        ``leaving`` (gateway, transfer id): a fail-over take-over of tunnels the failed
        active was transferring to that gateway: record them leaving to it by that transfer
        instead (installed held, not under reservations; their ceiling at least their
        counter), so that this gateway asks that gateway before it sends on them, after a
        restart too."""

    def arriving(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        """Target: ``tunnels`` are installed held (transfer ``transfer_id`` pending): record
        them pending and reserve their first block past the sequence number they came with,
        and record that this transfer arrived (:meth:`may_have_arrived`). Their outbound SAs may
        send nothing until this write is done (their ceiling is raised only then); the core
        activates them only once it is done, or, with a COMMIT that grants it, earlier, up
        to :func:`grant_ceiling` of the number they came with: a journal with
        ``reserves_grant`` reserves at least that far in these rows."""

    def prior_ceiling(self, sa: SecurityAssociation) -> int:
        """Target: the highest sequence number this gateway may have sent under the keys of
        ``sa`` (an outbound SA submitted to :meth:`arriving`) before it arrived: the ceiling
        recorded for those keys then, 0 if none was. A tunnel that held here once, left,
        and comes back (or is sent again, stale, by a gateway that held it before) resumes
        past it, whatever its source's final state says (docs/security.md)."""

    def arrived(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        """Target: the transfer committed: ``tunnels`` are owned here. Not waited for (a
        crash before it lands leaves them pending: kept away after a restart)."""

    def may_have_arrived(self, transfer_id: int, peer: str, age: float | None) -> bool:
        """Target: may transfer ``transfer_id`` from ``peer`` have been recorded arriving
        here (submitted :meth:`arriving`, durable or on its way)? Then its tunnels may have
        been sent on here, whatever became of them since. ``age``: how long ago the source
        started it, by the source's clock (None: unknown). True also when the record may have
        been pruned (the transfer may be older than the newest arrival pruned from ``peer``):
        docs/state.md, "how long an arrival is remembered". False for one recorded
        discarded (:meth:`discarded`)."""

    def discarded(self, transfer_id: int) -> str | None:
        """Target: if transfer ``transfer_id`` was recorded discarded here before its COMMIT
        (:meth:`cancelled` with its id), and not installed here again since, the peer it
        came from; else None. Its tunnels were never activated here: a decision query about
        it (from that peer or its fail-over pair) is answered "not taken", for as long as
        its arrival is kept, after a restart too."""

    def leaving(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        """Source: ``tunnels`` are being given to ``peer`` by transfer ``transfer_id``:
        record them leaving (a source restarted with such rows asks ``peer`` before it sends
        on them again). Submitted when the transfer starts (and again, naming the new peer,
        when it moves on to another candidate); the COMMIT waits for it. A journal with
        ``reserves_grant`` records each row's ceiling at least at :func:`grant_ceiling` of
        the number the tunnel is transferred at (its ``transfer_cap`` with make-before-break,
        else its counter), so that a source that resumes after a restart ("not taken")
        resumes past anything the target may have sent under the grant."""

    def left(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        """Source: the COMMIT of ``transfer_id`` was sent: ``tunnels`` are away. Not waited
        for (a crash before it lands leaves them leaving: resolved by asking ``peer``)."""

    def staying(self, tunnels: Sequence[Tunnel], peer: str) -> Write:
        """Source: a transfer recorded by :meth:`leaving` did not commit these tunnels:
        owned here again. They send again only once this write is done."""

    def resumed(self, tunnels: Sequence[Tunnel], peer: str) -> Write:
        """Source, after a restart: ``peer`` answered that it did not take these tunnels
        (recorded leaving, installed held, not under reservations): owned here again, their
        first block reserved past their stored ceiling. They send only once it is done."""

    def cancelled(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int = 0) -> Write:
        """A pending arrival from ``peer`` was cancelled: the tunnels stay with the peer.
        ``transfer_id`` (not 0): the transfer was discarded before its COMMIT (never
        activated here, its tunnels removed, a later COMMIT refused): record its arrival
        discarded in the same transaction as these rows (:meth:`discarded`)."""


@dataclass(frozen=True)
class Configured:
    """A configured tunnel as :func:`merge` sees it."""

    name: str
    fingerprint: str
    aead: bool


@dataclass
class Plan:
    """What may run of the configuration, given the state."""

    start: dict[str, int] = field(default_factory=dict)  # name -> stored ceiling (0: new)
    away: dict[str, SAState] = field(default_factory=dict)  # name -> why it stays away
    refused: dict[str, str] = field(default_factory=dict)  # name -> reason
    not_restored: list[SAState] = field(default_factory=list)  # owned/pending, not configured
    # name -> its LEAVING row: the outcome of the transfer that was moving it is unknown
    unresolved: dict[str, SAState] = field(default_factory=dict)


def merge(
    configured: Iterable[Configured],
    stored: dict[str, SAState],
) -> Plan:
    """Merge the configuration with the stored state.

    A tunnel recorded as given away, deleted or pending stays away; one recorded leaving is
    unresolved (installed held until the gateway it was going to answers); one recorded as
    owned resumes after its stored ceiling; one never seen starts as configured. Two tunnels with
    the same keys are both refused: their sequence numbers would share one nonce space."""
    plan = Plan()
    conf = list(configured)
    seen: dict[str, str] = {}
    for c in conf:
        if c.fingerprint in seen:
            why = f"same outbound keys as tunnel {seen[c.fingerprint]}"
            plan.refused[c.name] = why
            plan.refused.setdefault(seen[c.fingerprint], f"same outbound keys as tunnel {c.name}")
        else:
            seen[c.fingerprint] = c.name
    for c in conf:
        if c.name in plan.refused:
            continue
        row = stored.get(c.fingerprint)
        if row is not None and row.owner is Owner.LEAVING:
            plan.unresolved[c.name] = row
        elif row is not None and row.owner is not Owner.OWNED:
            plan.away[c.name] = row
        else:
            plan.start[c.name] = row.ceiling if row is not None else 0
    # Pending too: this gateway stopped between a transfer's install and its activation (or
    # cancel), perhaps after its source sent the COMMIT: served by nobody then.
    plan.not_restored = [
        r for fp, r in stored.items()
        if r.owner in (Owner.OWNED, Owner.PENDING) and fp not in seen
    ]
    return plan

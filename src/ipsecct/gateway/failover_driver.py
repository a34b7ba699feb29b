"""Fail-over for one running gateway: drives :class:`~ipsecct.ct.failover.Replicator` (the
active side sends its syncs to the standby over the peer channel) or
:class:`~ipsecct.ct.failover.Standby` (keeps what arrives; takes over when the active falls
silent). Configuration: ``[failover]`` (see :mod:`ipsecct.ct.failover`)."""

from __future__ import annotations

import logging
from typing import Any

from ..ct import cxtp
from ..ct.failover import FailoverConfig, Replicator, Standby, reply_kind
from ..ct.transfer import FPT_SYNC, Identity, Record
from ..errors import CxtpError
from ..ipsec.engine import Tunnel
from ..ipsec.esp import Drop
from ..ipsec.sad import SecurityAssociation
from . import gcpolicy
from .fencing import PairFencing, state_path
from .ike import IkeService
from .log import event
from .node import Node
from .peers import PeerChannels
from .transfer_service import TransferService

log = logging.getLogger("ipsecct.ct.failover")

PREPARE_PER_TICK = 8  # replicas decoded ahead per tick (~125 us per SA)


def is_sync(msg: cxtp.Message) -> bool:
    """A fail-over sync (a CTD whose first CDB after the TRANSFER tag is a SYNC CDB)."""
    return (
        isinstance(msg, cxtp.CTD) and len(msg.cdbs) >= 2 and cxtp.cdb_fpt(msg.cdbs[1]) == FPT_SYNC
    )


class FailoverDriver:
    """The active's replication or the standby's watch, on one timer (``tick_ms``)."""

    def __init__(
        self,
        node: Node,
        cfg: FailoverConfig,
        channels: PeerChannels,
        transfer: TransferService,
        identity: Identity,
    ) -> None:
        self.node = node
        self.cfg = cfg
        self.channels = channels
        self.transfer = transfer
        self.replicator: Replicator | None = None
        self.standby: Standby | None = None
        if cfg.role == "active":
            self.replicator = Replicator(node.engine, cfg)
        else:
            self.standby = Standby(
                node.engine, cfg, node.cfg.outer, identity
            )
        self.fencing: PairFencing | None = None
        if cfg.fencing:
            self.fencing = PairFencing(
                node,
                cfg,
                state_path(cfg, node.cfg.path, node.name, node.cfg.state_dir),
                self.replicator,
                self.standby,
            )
            transfer.hold_hooks.append(self.fencing.hold)
        self._next_prepare = 0.0
        self.ike: IkeService | None = None
        node.extensions["failover"] = self.status

    def attach_ike(self, ike: IkeService) -> None:
        """IKE SAs too: the active replicates their contexts beside the tunnels; the standby
        takes them over with the tunnels; a stopping active leaves them to its standby."""
        self.ike = ike
        if self.replicator is not None:
            self.replicator.extra = ike
            if self.fencing is not None:
                ike.fenced = self.fenced
                self.fencing.on_superseded.append(ike.forget_all)
        ike.replicated = self.replicating

    def fenced(self, now: float) -> bool:
        """May this (active) gateway not send now: its lease is not valid, or the standby
        took over?"""
        r = self.replicator
        return r is not None and (r.superseded_by is not None
                                  or now >= self.node.engine.send_until)  # fmt: skip

    def replicating(self) -> bool:
        """Does a standby hold (and will take over) this gateway's state?"""
        r = self.replicator
        if r is None or r.superseded_by is not None:
            return False
        return r.acks > 0 if self.cfg.fencing else r.messages > 0

    @property
    def peer(self) -> str:
        return self.cfg.peer

    async def start(self) -> None:
        self.node.timers.add("failover", self._next_deadline, self._on_timer)

    async def stop(self) -> None:
        self.node.timers.remove("failover")

    def _next_deadline(self) -> float | None:
        if self.replicator is not None:
            return self.replicator.next_deadline()
        sb = self.standby
        if sb is None or sb.took_over is not None:
            return None
        d = sb.next_deadline()
        if sb.unprepared:  # decode what changed ahead of a take-over, a few every tick_ms
            d = self._next_prepare if d is None else min(d, self._next_prepare)
        return d

    def _on_timer(self, now: float) -> None:
        if self.replicator is not None:
            for m in self.replicator.handle_timer(now):
                self.channels.send(self.cfg.peer, m)
            if self.fencing is not None:
                self.fencing.tick(now)  # the lease, by the passing of time
        elif self.standby is not None and self.standby.dead(now):
            self.take_over(now)
        elif (
            self.standby is not None
            and self.standby.took_over is None
            and self.standby.unprepared
            and now >= self._next_prepare
        ):
            self.standby.prepare(PREPARE_PER_TICK)  # about 2 ms of decoding
            self._next_prepare = now + self.cfg.tick_ms / 1000

    def receive(self, peer: str, msg: cxtp.CTD) -> None:
        """A sync message from ``peer``: the standby takes state from its active (and answers
        ACK, or TAKEN once it took over); the active takes the standby's answers."""
        if peer != self.cfg.peer:
            self.transfer.refuse()
            return
        now = self.node.clock()
        try:
            if reply_kind(msg) is not None:
                if self.replicator is None or self.fencing is None:
                    self.transfer.refuse()
                    return
                self.fencing.on_reply(msg, now)
                return
            if self.standby is None:
                self.transfer.refuse()
                return
            for r in self.standby.receive(msg, now):
                self.channels.send(peer, r)
            self.node.timers.poke()  # the dead-time deadline has moved (or now exists)
        except CxtpError as exc:
            event(log, "sync-malformed", logging.WARNING, node=self.node.name, error=str(exc))

    def peer_lost(self, peer: str) -> None:
        if self.replicator is not None and peer == self.cfg.peer:
            self.replicator.resync()  # the standby may have missed syncs: send it everything

    def take_over(self, now: float) -> Record:
        """Take over now (the timer does it when the active falls silent)."""
        assert self.standby is not None
        if self.fencing is not None:
            self.fencing.before_take_over()  # on disk before anything is sent
        with gcpolicy.POLICY.batch():  # a bulk install: no walk of the heap in the middle
            return self._took_over(self.standby.take_over(now), now)

    def _took_over(
        self,
        taken: tuple[list[Tunnel], list[tuple[SecurityAssociation, bytes]], Record],
        now: float,
    ) -> Record:
        _tunnels, signals, rec = taken
        for sa, payload in signals:
            res = self.node.engine.signal(sa, payload, now)
            if not isinstance(res, Drop):
                self.node.send_esp(res.sa, res.data)
        sb = self.standby
        if sb is not None and sb.extra:
            extra, sb.extra = sb.extra, {}
            if self.ike is not None:
                n = self.ike.take_over(list(extra.values()), now, self.cfg.seq_margin)
                rec.detail += f"{'; ' if rec.detail else ''}{n} IKE SA(s)"
        # From now on this gateway is the active one; it replicates to nobody until an
        # operator configures a new standby. The Standby stays, to answer the old active
        # with TAKEN.
        self.transfer.report(rec)
        return rec

    def status(self) -> dict[str, Any]:
        now = self.node.clock()
        lease = {} if self.fencing is None else {"lease": self.fencing.status(now)}
        if self.replicator is not None:
            superseded = self.replicator.superseded_by is not None
            return {
                "role": "superseded" if superseded else "active",
                "peer": self.cfg.peer,
                "messages": self.replicator.messages,
                "contexts": self.replicator.contexts,
                "ike_contexts": self.replicator.extras,
                "unreplicable": self.replicator.unreplicable,
                **lease,
            }
        if self.standby is not None and self.standby.took_over is None:
            heard = self.standby.last_heard
            return {
                "role": "standby",
                "peer": self.cfg.peer,
                "replicated_tunnels": len(self.standby.replica),
                "replicated_ike_sas": len(self.standby.extra),
                "last_heard_ms_ago": None if heard is None else round((now - heard) * 1000),
                **lease,
            }
        return {"role": "took over", "peer": self.cfg.peer, **lease}

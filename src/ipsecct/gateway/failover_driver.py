"""Fail-over for one running gateway: drives :class:`~ipsecct.ct.failover.Replicator` (the
active side sends its syncs to the standby over the peer channel) or
:class:`~ipsecct.ct.failover.Standby` (keeps what arrives; takes over when the active falls
silent). Configuration: ``[failover]`` (see :mod:`ipsecct.ct.failover`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..ct import cxtp
from ..ct.failover import FailoverConfig, Replicator, Standby
from ..ct.transfer import FPT_SYNC, Identity, Record
from ..ct.transfer import Endpoint as TEndpoint
from ..ipsec.esp import Drop
from .log import event
from .node import Node
from .peers import PeerChannels
from .transfer_service import TransferService

log = logging.getLogger("ipsecct.ct.failover")


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
                node.engine, cfg, TEndpoint(node.cfg.outer.host, node.cfg.outer.port), identity
            )
        self._task: asyncio.Task[None] | None = None
        node.extensions["failover"] = self.status

    @property
    def peer(self) -> str:
        return self.cfg.peer

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def receive(self, peer: str, msg: cxtp.CTD) -> None:
        """A sync message from ``peer``: only the standby takes them, only from its active."""
        if self.standby is None or peer != self.cfg.peer:
            self.transfer.refuse()
            return
        try:
            self.standby.receive(msg, self.node.clock())
        except cxtp.CxtpError as exc:
            event(log, "sync-malformed", logging.WARNING, node=self.node.name, error=str(exc))

    def peer_lost(self, peer: str) -> None:
        if self.replicator is not None and peer == self.cfg.peer:
            self.replicator.resync()  # the standby may have missed syncs: send it everything

    async def _loop(self) -> None:
        period = self.cfg.tick_ms / 1000
        while True:
            await asyncio.sleep(period)
            now = self.node.clock()
            if self.replicator is not None:
                for m in self.replicator.poll(now):
                    self.channels.send(self.cfg.peer, m)
            elif self.standby is not None and self.standby.dead(now):
                self.take_over(now)

    def take_over(self, now: float) -> Record:
        assert self.standby is not None
        _tunnels, signals, rec = self.standby.take_over(now)
        for sa, payload in signals:
            res = self.node.engine.signal(sa, payload, now)
            if not isinstance(res, Drop):
                self.node.send_esp(res.sa, res.data)
        # From now on this gateway is the active one; it replicates to nobody until an
        # operator configures a new standby.
        self.standby = None
        self.transfer.report(rec)
        return rec

    def status(self) -> dict[str, Any]:
        if self.replicator is not None:
            return {
                "role": "active",
                "peer": self.cfg.peer,
                "messages": self.replicator.messages,
                "contexts": self.replicator.contexts,
                "unreplicable": self.replicator.unreplicable,
            }
        if self.standby is not None:
            now = self.node.clock()
            heard = self.standby.last_heard
            return {
                "role": "standby",
                "peer": self.cfg.peer,
                "replicated_tunnels": len(self.standby.replica),
                "last_heard_ms_ago": None if heard is None else round((now - heard) * 1000),
            }
        return {"role": "took over", "peer": self.cfg.peer}

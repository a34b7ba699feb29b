"""Load balancing by the gateway itself (``[transfer.balance]``): above a threshold of active
tunnels, the excess moves to a peer in one batched transfer, checked every ``interval_ms`` on
the node's timer."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..errors import IpsecctError
from ..ipsec.engine import TunnelState
from ..ipsec.sad import Direction
from .config import BalanceConfig
from .log import event
from .node import Node
from .timers import supervise
from .transfer_service import TransferService

log = logging.getLogger("ipsecct.ct.transfer")


class Balancer:
    def __init__(self, node: Node, cfg: BalanceConfig, transfer: TransferService) -> None:
        self.node = node
        self.cfg = cfg
        self.transfer = transfer
        self._next = 0.0
        self._task: asyncio.Task[None] | None = None  # the round's transfer, while it runs

    async def start(self) -> None:
        self._next = self.node.clock() + self.cfg.interval
        self.node.timers.add("balance", self.next_deadline, self.handle_timer)

    async def stop(self) -> None:
        # A cancellation that lands just as a transfer finishes can be swallowed on the way
        # (asyncio.wait_for returns the result instead): the task is cancelled again until
        # it is done, so stopping never hangs.
        self.node.timers.remove("balance")
        task = self._task
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError):
            task.result()

    def next_deadline(self) -> float | None:
        return self._next

    def handle_timer(self, now: float) -> None:
        self._next = now + self.cfg.interval
        if self._task is not None and not self._task.done():
            return  # the last round's transfer is still going
        b = self.cfg
        active = [t for t in self.node.engine.tunnels() if t.state is TunnelState.ACTIVE]
        excess = min(len(active) - b.above, b.batch)
        # Only this gateway's own transfers make it wait: a peer's unfinished ones (which a
        # peer could keep coming) never stall balancing.
        if excess <= 0 or self.transfer.core.outgoing_in_progress():
            return
        event(
            log,
            "rebalance-start",
            node=self.node.name,
            to=b.to,
            tunnels=excess,
            active=len(active),
            above=b.above,
        )
        spis = [t.outbound.spi for t in active[:excess]]
        self._task = supervise(self._move(spis, max(5.0, excess * 0.01)), "balance", self.node.name)

    async def _move(self, spis: list[int], timeout: float) -> None:
        try:
            await self.transfer.transfer(spis, self.cfg.to, timeout=timeout,
                                         direction=Direction.OUTBOUND)  # fmt: skip
        except IpsecctError as exc:
            event(log, "rebalance-failed", logging.WARNING, node=self.node.name, error=str(exc))

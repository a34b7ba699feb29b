"""Load balancing by the gateway itself (``[transfer.balance]``): above a threshold of active
tunnels, the excess moves to a peer in one batched transfer, checked every ``interval_ms``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..errors import IpsecctError
from ..ipsec.engine import TunnelState
from .config import BalanceConfig
from .log import event
from .node import Node
from .transfer_service import TransferService

log = logging.getLogger("ipsecct.ct.transfer")


class Balancer:
    def __init__(self, node: Node, cfg: BalanceConfig, transfer: TransferService) -> None:
        self.node = node
        self.cfg = cfg
        self.transfer = transfer
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        # A cancellation that lands just as a transfer finishes can be swallowed on the way
        # (asyncio.wait_for returns the result instead): the loop also checks a flag, and the
        # task is cancelled again until it is done, so stopping never hangs.
        self._stopping = True
        task = self._task
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        with contextlib.suppress(asyncio.CancelledError):
            task.result()

    async def _loop(self) -> None:
        b = self.cfg
        while not self._stopping:
            await asyncio.sleep(b.interval)
            active = [t for t in self.node.engine.tunnels() if t.state is TunnelState.ACTIVE]
            excess = min(len(active) - b.above, b.batch)
            # Only this gateway's own transfers make it wait: a peer's unfinished ones (which
            # a peer could keep coming) never stall balancing.
            if excess <= 0 or self.transfer.core.outgoing_in_progress():
                continue
            event(
                log,
                "rebalance-start",
                node=self.node.name,
                to=b.to,
                tunnels=excess,
                active=len(active),
                above=b.above,
            )
            try:
                await self.transfer.transfer(
                    [t.outbound.spi for t in active[:excess]], b.to, timeout=max(5.0, excess * 0.01)
                )
            except IpsecctError as exc:
                event(log, "rebalance-failed", logging.WARNING, node=self.node.name, error=str(exc))

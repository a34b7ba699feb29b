"""The mobile node's side of context transfer: applies its gateway's in-SA signals (a new
gateway address after a handover) and can ask a gateway to pull its contexts (a CTAR)."""

from __future__ import annotations

import logging
from typing import Any

from ..ct import cxtp
from ..ct.transfer import token_key
from ..errors import SignalError, TransferError
from ..ipsec import signalling
from ..ipsec.engine import Signal
from ..ipsec.ippacket import IPAddress
from .log import RateLimited
from .node import Node

log = logging.getLogger("ipsecct.ct.transfer")

APPLIED_MAX = 64  # the changes kept (the last ones): a gateway may signal without end


class MobileAgent:
    """The MN's side: applies signals from its gateway and can send a CTAR (reactive)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.applied: list[tuple[float, list[str]]] = []
        self.rejected = 0
        self.applied_total = 0
        self._quiet = RateLimited()  # a line a signal, from a gateway that floods: bounded
        node.on_signal = self._on_signal

    def _on_signal(self, sig: Signal, addr: tuple[Any, ...]) -> None:
        try:
            items = signalling.decode(sig.payload)
            changes = signalling.apply(self.node.engine, sig.sa, items)
        except SignalError as exc:
            self.rejected += 1
            self._quiet.event(log, "signal-rejected", logging.WARNING, node=self.node.name,
                              error=str(exc))  # fmt: skip
            return
        self.applied.append((self.node.clock(), changes))
        del self.applied[:-APPLIED_MAX]
        self.applied_total += 1
        self._quiet.event(
            log,
            "gateway-changed",
            logging.INFO,
            node=self.node.name,
            spi=f"0x{sig.sa.spi:08x}",
            changes="; ".join(changes),
        )

    def ctar(self, target: tuple[str, int], router: IPAddress, seq: int) -> None:
        """Ask the gateway at ``target`` to fetch our contexts from ``router`` (RFC 4067 CTAR,
        sent on the outer UDP port behind the non-ESP marker)."""
        tunnels = self.node.engine.tunnels()
        if not tunnels:
            raise TransferError("no tunnel to hand over")
        t = tunnels[0]
        mn = t.inbound.dst if t.inbound is not None else t.outbound.src
        token = cxtp.compute_token(token_key(t), mn, seq)
        msg = cxtp.CTAR(mn, router, seq, token)
        self.node.send_outer(b"\0\0\0\0" + cxtp.encode(msg), target)

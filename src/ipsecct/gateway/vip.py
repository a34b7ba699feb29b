"""Moving a virtual gateway address between gateways (indirect SG identity, draft §7.1).

Thin adapter: the gateway that becomes responsible for the SAs adds the address to its
interface (iproute2) and announces it with a gratuitous ARP (built here, sent on an AF_PACKET
socket), so that neighbours on the link update their ARP caches at once; the gateway that
lets go removes it. IPv6 neighbours learn through their own neighbour discovery (an unsolicited
NA is left for later). Needs root (CAP_NET_ADMIN, CAP_NET_RAW).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

from ..ct.transfer import Record
from ..errors import TunError, VipError
from ..ipsec.engine import TunnelState
from ..ipsec.ippacket import IPAddress
from .log import event
from .node import Node
from .tun import ip

log = logging.getLogger("ipsecct.ct.transfer")

ETH_P_ARP = 0x0806


def interface_mac(interface: str) -> bytes:
    try:
        with open(f"/sys/class/net/{interface}/address") as f:
            return bytes.fromhex(f.read().strip().replace(":", ""))
    except (OSError, ValueError) as exc:
        raise VipError(f"cannot read the MAC address of {interface}: {exc}") from None


def garp_frame(mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request: who-has ADDRESS tell ADDRESS, to the broadcast address."""
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + address.packed + b"\0" * 6
    arp += address.packed
    return eth + arp


def send_garp(interface: str, address: IPAddress, count: int = 2) -> None:
    if not isinstance(address, ipaddress.IPv4Address):
        return
    frame = garp_frame(interface_mac(interface), address)
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind((interface, 0))
            for _ in range(count):
                s.send(frame)
    except OSError as exc:
        raise VipError(f"cannot send a gratuitous ARP on {interface}: {exc.strerror}") from None


def claim(address: IPAddress, interface: str) -> None:
    prefix = 32 if address.version == 4 else 128
    try:
        ip("addr", "replace", f"{address}/{prefix}", "dev", interface)
    except TunError as exc:
        raise VipError(str(exc)) from None
    send_garp(interface, address)


def release(address: IPAddress, interface: str) -> None:
    prefix = 32 if address.version == 4 else 128
    try:
        ip("addr", "del", f"{address}/{prefix}", "dev", interface)
    except TunError as exc:
        if "Cannot assign" not in str(exc) and "not found" not in str(exc):
            raise VipError(str(exc)) from None


class VipMover:
    """Indirect identity on a real link: the virtual address follows the SAs.

    The new owner claims it (address + gratuitous ARP) as it activates; the old one lets go
    only after ``forward_time``, so that what neighbours still send it meanwhile is received
    and forwarded, not lost. ``ip`` runs off the event loop. Fed every finished transfer or
    take-over (:meth:`on_record`)."""

    def __init__(
        self, node: Node, address: IPAddress, interface: str, forward_time: float
    ) -> None:
        self.node = node
        self.address = address
        self.interface = interface
        self.forward_time = forward_time
        self._release_at: float | None = None  # when to let go (on the node's timer)
        node.timers.add("vip", lambda: self._release_at, self._on_timer)

    def stop(self) -> None:
        self._release_at = None

    def _in_use(self) -> bool:
        return any(
            t.state is TunnelState.ACTIVE and t.outbound.src == self.address
            for t in self.node.engine.tunnels()
        )

    def on_record(self, rec: Record) -> None:
        if rec.role in ("target", "standby") and rec.outcome in ("committed", "took over"):
            self.stop()
            self._job(claim, "virtual-address-claimed")
        elif (
            rec.role == "source"
            and rec.outcome in ("committed", "partial")
            and not self._in_use()
            and self._release_at is None
        ):
            self._release_at = self.node.clock() + self.forward_time
            self.node.timers.poke()

    def _on_timer(self, now: float) -> None:
        self._release_at = None
        if not self._in_use():
            self._job(release, "virtual-address-released")

    def _job(self, fn: Callable[[IPAddress, str], None], what: str) -> None:
        address, interface = self.address, self.interface

        def done(fut: asyncio.Future[None]) -> None:
            exc = fut.exception()
            if exc is None:
                event(log, what, node=self.node.name, address=address)
            else:
                event(
                    log,
                    "virtual-address-failed",
                    logging.ERROR,
                    node=self.node.name,
                    error=str(exc),
                )

        fut = asyncio.get_running_loop().run_in_executor(None, fn, address, interface)
        fut.add_done_callback(done)

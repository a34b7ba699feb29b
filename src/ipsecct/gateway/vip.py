"""Moving a virtual gateway address between gateways (indirect SG identity, draft §7.1).

Thin adapter: the gateway that becomes responsible for the SAs adds the address to its
interface (one rtnetlink request, RTM_NEWADDR, answered by the kernel at once: no ``ip``
process is started, which would stall the gateway for several milliseconds right when the
moved traffic arrives) and announces it with a gratuitous ARP (built here, sent on an AF_PACKET
socket), so that neighbours on the link update their ARP caches at once; the gateway that
lets go removes it. IPv6 neighbours learn through their own neighbour discovery (an unsolicited
NA is left for later). Needs root (CAP_NET_ADMIN, CAP_NET_RAW).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable

from ..ct.transfer import Record
from ..errors import VipError
from ..ipsec.engine import TunnelState
from ..ipsec.ippacket import IPAddress
from .log import event
from .node import Node

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


def garp_socket(interface: str) -> socket.socket:
    """A packet socket on ``interface`` for sending gratuitous ARPs (protocol 0: it receives
    nothing). Keep it open: closing a packet socket waits for an RCU grace period (10-30 ms
    measured), which a gateway cannot spend while it takes over traffic."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.bind((interface, 0))
    except OSError:
        s.close()
        raise
    return s


def send_garp(
    interface: str, address: IPAddress, count: int = 2, sock: socket.socket | None = None
) -> None:
    """Announce ``address`` on ``interface``, on ``sock`` (a :func:`garp_socket`) if given,
    else on a socket opened for the purpose."""
    if not isinstance(address, ipaddress.IPv4Address):
        return
    frame = garp_frame(interface_mac(interface), address)
    try:
        with contextlib.nullcontext(sock) if sock is not None else garp_socket(interface) as s:
            for _ in range(count):
                s.send(frame)
    except OSError as exc:
        raise VipError(f"cannot send a gratuitous ARP on {interface}: {exc.strerror}") from None


RTM_NEWADDR, RTM_DELADDR = 20, 21
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
NETLINK_TIMEOUT = 2.0  # seconds: the kernel answers an address change at once


def _rtattr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + b"\0" * (-n % 4)


def address_request(kind: int, address: IPAddress, index: int, seq: int) -> bytes:
    """An rtnetlink RTM_NEWADDR (add or replace) or RTM_DELADDR message for ``address`` as a
    host address (/32, /128) on the interface with index ``index``, asking for an ack."""
    fam = socket.AF_INET if address.version == 4 else socket.AF_INET6
    flags = NLM_F_REQUEST | NLM_F_ACK
    if kind == RTM_NEWADDR:
        flags |= NLM_F_CREATE | NLM_F_REPLACE
    body = struct.pack("=BBBBI", fam, address.max_prefixlen, 0, 0, index)
    body += _rtattr(IFA_LOCAL, address.packed) + _rtattr(IFA_ADDRESS, address.packed)
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def parse_ack(data: bytes, seq: int) -> int:
    """The errno of the kernel's answer to request ``seq`` (0: done); ValueError if
    ``data`` holds no such answer."""
    off = 0
    while off + 16 <= len(data):
        n, kind, _flags, s, _pid = struct.unpack_from("=IHHII", data, off)
        if n < 16 or off + n > len(data):
            break
        if kind == NLMSG_ERROR and s == seq and n >= 20:
            err: int = -struct.unpack_from("=i", data, off + 16)[0]
            return err
        off += (n + 3) & ~3
    raise ValueError("no answer to the request")


def _address_change(kind: int, address: IPAddress, interface: str) -> int:
    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        raise VipError(f"no interface {interface!r}") from None
    seq = int.from_bytes(os.urandom(4), "big") or 1
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
            s.settimeout(NETLINK_TIMEOUT)
            s.bind((0, 0))
            s.send(address_request(kind, address, index, seq))
            while True:
                try:
                    return parse_ack(s.recv(65536), seq)
                except ValueError:
                    continue  # not our answer (nothing else is asked on this socket)
    except OSError as exc:
        raise VipError(f"cannot change the address {address} on {interface}: {exc}") from None


def claim(address: IPAddress, interface: str, sock: socket.socket | None = None) -> None:
    """Add ``address`` to ``interface`` (or keep it) and announce it (on ``sock``, see
    :func:`send_garp`)."""
    err = _address_change(RTM_NEWADDR, address, interface)
    if err:
        raise VipError(f"cannot add {address} to {interface}: {os.strerror(err)}")
    send_garp(interface, address, sock=sock)


def release(address: IPAddress, interface: str) -> None:
    """Remove ``address`` from ``interface``; an address already gone is not an error."""
    err = _address_change(RTM_DELADDR, address, interface)
    if err and err not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
        raise VipError(f"cannot remove {address} from {interface}: {os.strerror(err)}")


class VipMover:
    """Indirect identity on a real link: the virtual address follows the SAs.

    The new owner claims it (address + gratuitous ARP) as it activates; the old one lets go
    only after ``forward_time``, so that what neighbours still send it meanwhile is received
    and forwarded, not lost. Both are one rtnetlink request, made by a worker thread started
    with the mover (no process; the event loop never waits: the kernel takes the rtnl lock
    for an address change, which other work on the machine may hold for milliseconds, while
    the new owner has moved traffic to carry); ``owned`` becomes true, and ``on_claimed``
    are called, on the loop once the address is added. Fed every finished transfer or
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
        self._sock: socket.socket | None = None  # the gratuitous ARPs' socket, kept open
        # (without it, an error is reported when it is needed, by a socket opened then)
        with contextlib.suppress(OSError):
            self._sock = garp_socket(interface)
        # Whether the address is ours now (the kernel sends from it only then: a socket bound
        # to it with IP_FREEBIND receives before, but cannot send), and who waits for it.
        self.owned = node.cfg.virtual_owner
        self.on_claimed: list[Callable[[], None]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ipsecct-vip")
        self._pool.submit(lambda: None)  # its thread exists from now, not from the handover

    def stop(self) -> None:
        self._release_at = None

    def close(self) -> None:
        self.stop()
        self._pool.shutdown(wait=True)  # (a request in progress ends within NETLINK_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _in_use(self) -> bool:
        return any(
            t.state is TunnelState.ACTIVE and t.outbound.src == self.address
            for t in self.node.engine.tunnels()
        )

    def on_record(self, rec: Record) -> None:
        if rec.role in ("target", "standby") and rec.outcome in ("committed", "took over"):
            self.stop()
            self._job(lambda a, i: claim(a, i, self._sock), "virtual-address-claimed",
                      self._claimed)  # fmt: skip
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
            self.owned = False
            self._job(release, "virtual-address-released")

    def _claimed(self) -> None:
        self.owned = True
        for cb in list(self.on_claimed):
            cb()

    def _job(
        self,
        fn: Callable[[IPAddress, str], None],
        what: str,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Run ``fn`` on the worker; log the outcome and, if it worked, call ``then`` on the
        event loop."""
        address, interface, name = self.address, self.interface, self.node.name
        loop = asyncio.get_running_loop()

        def done(fut: concurrent.futures.Future[None]) -> None:
            exc = fut.exception()
            if exc is None:
                event(log, what, node=name, address=address)
                if then is not None:
                    then()
            else:
                event(log, "virtual-address-failed", logging.ERROR, node=name, error=str(exc))

        try:
            fut = self._pool.submit(fn, address, interface)
        except RuntimeError:  # closed: the gateway is stopping
            return

        def back(f: concurrent.futures.Future[None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(done, f)

        fut.add_done_callback(back)

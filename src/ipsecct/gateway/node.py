"""The asyncio adapter around :class:`~ipsecct.ipsec.engine.Engine`: a gateway or mobile-node
process.

It owns the sockets and devices and holds no IPsec logic: the outer side is ESP in UDP
(RFC 3948, port 4500 by default) and, as root, raw ESP (IP protocol 50); the inner side is a TUN
device or a *virtual link* (IP packets carried in UDP datagrams on loopback, so that everything
runs unprivileged on one machine). A timer drives SA lifetimes. The control socket and metrics
are in :mod:`ipsecct.gateway.control`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..ipsec import native as native_mod
from ..ipsec.engine import Bypass, Engine, Forward, Held, Relay, Result, Signal, ToInner, ToPeer
from ..ipsec.esp import Drop
from ..ipsec.ippacket import PROTO_ESP, Endpoint
from ..ipsec.sad import SAEvent, SecurityAssociation
from ..ipsec.transforms import warm_library
from . import sched
from .config import NodeConfig
from .limits import bind_error
from .log import event
from .timers import Scheduler

log = logging.getLogger("ipsecct.gateway.node")

Clock = Callable[[], float]
OuterHook = Callable[[bytes, tuple[Any, ...]], bool]
_SOCKET_BUFFER = 1 << 22  # octets, per UDP socket and direction
_BATCH = 64  # datagrams per readiness event
# The native forwarding thread's queue to the event loop (items: packets for the Python path)
_MAX_PENDING = 4096
_THREAD_STOP_TIMEOUT = 10.0  # seconds


def _coalesce_us() -> int:
    """How long the forwarding thread lets a batch gather when traffic is busy (microseconds,
    IPSECCT_NATIVE_COALESCE_US, default 50; 0: never). See docs/native-data-path.md."""
    try:
        v = int(os.environ.get("IPSECCT_NATIVE_COALESCE_US", "50"))
    except ValueError:
        return 50
    return min(max(v, 0), 1000)


def _name_thread(name: str) -> None:
    """The calling thread's name as ``ps -L``, ``top -H`` and ``perf`` show it (15 octets)."""
    path = f"/proc/self/task/{threading.get_native_id()}/comm"
    with contextlib.suppress(OSError, ValueError), open(path, "wb") as f:
        f.write(name.encode("utf-8", "replace")[:15])


def _thread_wanted() -> bool:
    """The native data path runs in a thread of its own unless IPSECCT_NATIVE_THREAD=0."""
    return os.environ.get("IPSECCT_NATIVE_THREAD", "1") not in ("0", "")


_TEXTS: dict[int, tuple[Any, str]] = {}


def _text(addr: Any) -> str:
    """``str(addr)``, kept per address object (``ipaddress`` formats it in Python; a bulk
    transfer's first packets go to thousands of SAs that share a few address objects)."""
    hit = _TEXTS.get(id(addr))
    if hit is not None and hit[0] is addr:
        return hit[1]
    if len(_TEXTS) >= 4096:
        _TEXTS.clear()
    text = str(addr)
    _TEXTS[id(addr)] = (addr, text)  # (holds the object: its id stays its own)
    return text


class UdpEndpoint:
    """A UDP socket on the event loop that reads in batches.

    asyncio's datagram transport wakes the loop once per datagram; here one readiness event
    drains up to ``batch`` datagrams, which is what lets a Python gateway keep up with a plain
    relay. Sends go straight to the socket; only when the kernel buffer is full are they
    queued until it drains (bounded: beyond ``max_queue`` a datagram is dropped, as a full
    interface queue would). A datagram queued as ``fenced`` (ESP) leaves only if ``gate``
    allows it when its turn comes (the node's fail-over fence): ESP sealed under a lease that
    ran out while it waited here is dropped, never sent late.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_data: Callable[[bytes, tuple[Any, ...]], None],
        *,
        batch: int = 64,
        max_queue: int = 4096,
    ) -> None:
        self.sock = sock
        self.on_data = on_data
        self.batch = batch
        self.max_queue = max_queue
        self.queue: collections.deque[tuple[bytes, tuple[Any, ...], bool]] = collections.deque()
        self.dropped = 0
        self.gate: Callable[[], bool] | None = None  # may a fenced datagram leave now?
        self.loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)
        self._writing = False
        self.closed = False

    @classmethod
    def bind(
        cls,
        addr: tuple[str, int],
        on_data: Callable[[bytes, tuple[Any, ...]], None],
        *,
        freebind: bool = False,
        key: str = "",
    ) -> UdpEndpoint:
        fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        # Room for the bursts between two readiness events (the kernel caps it at
        # net.core.rmem_max / wmem_max); the default 208 KiB holds about 90 full-size packets.
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        try:
            if freebind:
                s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
            s.bind(addr)
        except OSError as exc:
            s.close()
            # which address and which key: the operator has several (outer, inner link, IKE)
            raise bind_error(exc, "UDP", addr[0], addr[1], key) from None
        return cls(s, on_data)

    def _readable(self) -> None:
        recv = self.sock.recvfrom
        for _ in range(self.batch):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                continue
            self.on_data(data, addr)

    def sendto(
        self, data: bytes | bytearray, addr: tuple[Any, ...], *, fenced: bool = False
    ) -> None:
        """Send now, or queue while the kernel has no room. ``fenced``: ESP, which leaves
        the queue only if ``gate`` allows (the caller checked it for now)."""
        if self.queue:
            self._enqueue(data, addr, fenced)
            return
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._enqueue(data, addr, fenced)
        except OSError:
            self.dropped += 1

    def _enqueue(self, data: bytes | bytearray, addr: tuple[Any, ...], fenced: bool) -> None:
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            return
        self.queue.append((bytes(data), addr, fenced))
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        gate = self.gate
        while self.queue:
            data, addr, fenced = self.queue[0]
            if fenced and gate is not None and not gate():
                self.queue.popleft()  # its lease ran out while it waited: never sent late
                continue
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped += 1
            self.queue.popleft()
        self.loop.remove_writer(self.sock.fileno())
        self._writing = False

    def set_reader(self, callback: Callable[[], None]) -> None:
        """Read with ``callback`` instead (the native data path's batch call)."""
        self.loop.remove_reader(self.sock.fileno())
        self.loop.add_reader(self.sock.fileno(), callback)

    def getsockname(self) -> tuple[Any, ...]:
        return tuple(self.sock.getsockname())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()


class Node:
    """One gateway or mobile node: engine + outer socket + inner link + timers."""

    def __init__(
        self, cfg: NodeConfig, *, role: str = "gateway", clock: Clock = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.role = role
        self.clock = clock
        self.engine = Engine(cfg.outer.host)
        self.started = clock()
        # The node's one timer: the engine's, and those of the cores the services add.
        self.timers = Scheduler(clock, cfg.name)
        self.timers.add("engine", self.engine.next_deadline, self._engine_timer)
        self.outer_transport: UdpEndpoint | None = None
        self.virtual_transport: UdpEndpoint | None = None
        # (address, port, sockaddr) per SA: the sockaddr tuple made once, not per packet
        self._dest: dict[int, tuple[Any, int, tuple[str, int]]] = {}
        self.inner_transport: UdpEndpoint | None = None
        self._raw: socket.socket | None = None
        self._tun_fd: int | None = None
        self.tun_name: str | None = None  # the inner TUN device, once open
        self._native_inner: tuple[int, bool, tuple[bytes, int] | None] = (-1, False, None)
        # the native forwarding thread: (thread, wake eventfd, stop eventfd)
        self._native_thread: tuple[threading.Thread, int, int] | None = None
        self._native_tid: int | None = None  # the forwarding thread's id (Linux), once it runs
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        # Hooks for the context-transfer layer: messages on the outer port that are not ESP
        # (returning True when consumed), and inbound ESP for an SA this node no longer has.
        self.outer_hooks: list[OuterHook] = []
        # The transfer layer takes held packets, forwards moved traffic and reads signals.
        self.on_held: Callable[[Held], None] | None = None
        self.on_forward: Callable[[Forward], None] | None = None
        self.on_signal: Callable[[Signal, tuple[Any, ...]], None] | None = None
        # The durable state (gateway/state.py) takes the SAs that need their next block of
        # sequence numbers reserved.
        self.on_reserve: Callable[[SecurityAssociation], None] | None = None
        # Those that act on an SA's soft or hard lifetime (IKE: rekey_bytes, life_packets...)
        self.on_lifetime: list[Callable[[SecurityAssociation, SAEvent], None]] = []
        self.inner_peer: Endpoint | None = cfg.inner.peer
        self.extensions: dict[str, Any] = {}
        for p in cfg.policies:
            self.engine.add_policy(p)
        for t in cfg.tunnels:
            t.outbound.created = t.inbound.created = self.started
            self.engine.add_tunnel(t.policy, t.outbound, t.inbound)

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # The crypto libraries' one-time costs (about 2 ms of CPU) now, not on the first
        # packet or signal this node seals, which at a transfer's target is in the handover
        warm_library()
        if self.engine.native is not None:
            native_mod.warm()
        fam = socket.AF_INET if self.cfg.outer.host.version == 4 else socket.AF_INET6
        self.outer_transport = UdpEndpoint.bind(self.cfg.outer.sockaddr, self._on_outer,
                                                key="outer.address, outer.port")
        self.outer_transport.gate = self._esp_may_leave
        if self.cfg.raw_esp:
            self._open_raw(loop, fam)
        if self.cfg.virtual is not None and self.cfg.virtual_interface is not None:
            # Listen on the virtual address too (IP_FREEBIND: before this node owns it).
            self.virtual_transport = UdpEndpoint.bind(
                (str(self.cfg.virtual), self.cfg.outer.port), self._on_outer, freebind=True,
                key="outer.virtual, outer.port",
            )
            if self.cfg.virtual_owner:
                from . import vip

                vip.claim(self.cfg.virtual, self.cfg.virtual_interface)
                event(log, "virtual-address-claimed", node=self.name, address=self.cfg.virtual)
        inner = self.cfg.inner
        if inner.kind == "udp":
            assert inner.listen is not None
            self.inner_transport = UdpEndpoint.bind(inner.listen.sockaddr, self._on_inner_udp,
                                                    key="inner.listen")
        else:
            from . import tun

            fd, name = tun.open_tun(inner.tun_name)
            self._tun_fd = fd
            self.tun_name = name
            tun.configure(name, inner.tun_addresses, inner.tun_mtu, inner.routes)
            loop.add_reader(fd, self._on_tun_readable)
        self._start_native(loop)
        self.timers.start()
        # No "started" line here: the service logs it once its control, metrics, IKE and
        # transfer sockets are bound too (an operator reads "started" as "serving").

    # -- the native data path (ipsecct.ipsec.native) ------------------------------------
    def _start_native(self, loop: asyncio.AbstractEventLoop) -> None:
        """With the native data path, one C call per readiness event reads a batch, seals or
        opens the packets of SAs the C table carries, and writes them; the rest comes back
        here and takes the Python path exactly as before."""
        if self.engine.native is None:
            return
        if self._tun_fd is not None:
            self._native_inner = (self._tun_fd, True, None)
        elif self.inner_transport is not None and self.inner_peer is not None:
            peer = self.inner_peer
            self._native_inner = (
                self.inner_transport.sock.fileno(),
                False,
                (peer.host.packed, peer.port),
            )
        else:
            return
        if _thread_wanted() and self.clock is time.monotonic:
            self._start_native_thread(loop)
            event(log, "native-data-path", node=self.name, thread=True)
            return
        self._native_readers(loop)
        event(log, "native-data-path", node=self.name, thread=False)

    def _native_readers(self, loop: asyncio.AbstractEventLoop) -> None:
        """One C call per readiness event of the event loop (the native path without its
        thread: IPSECCT_NATIVE_THREAD=0, a clock other than the monotonic one, or after the
        thread failed)."""
        fd, is_tun, _ = self._native_inner
        if is_tun:
            loop.remove_reader(fd)
            loop.add_reader(fd, self._native_inner_readable)
        elif self.inner_transport is not None:
            self.inner_transport.set_reader(self._native_inner_readable)
        for ep in (self.outer_transport, self.virtual_transport):
            if ep is not None:
                ep.set_reader(functools.partial(self._native_outer_readable, ep))

    def _start_native_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """The established-SA forwarding loop in a thread of its own (``_esp.Table.run``): it
        sleeps in epoll on the outer sockets and the inner side and handles each batch in C,
        without the GIL, under the data path's own lock, which a freeze takes too, so a
        freeze lands between two batches. What C does not handle comes back through a
        bounded queue and an eventfd this loop watches (:meth:`_native_drain`)."""
        fd, is_tun, dest = self._native_inner
        outer = [
            ep.sock.fileno()
            for ep in (self.outer_transport, self.virtual_transport)
            if ep is not None
        ]
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        table = self.engine.native

        def body() -> None:
            _name_thread(f"esp-{self.name}")
            wanted = self.cfg.thread_priority
            refused = sched.apply(wanted)
            if refused is not None:  # (runs on as the process is scheduled: never a failure)
                event(log, "native-thread-priority-refused", logging.WARNING, node=self.name,
                      wanted=str(wanted), error=refused, running=sched.current(0),
                      hint="needs root or CAP_SYS_NICE")  # fmt: skip
            elif wanted != sched.NORMAL:
                event(log, "native-thread-priority", node=self.name, priority=str(wanted))
            self._native_tid = threading.get_native_id()  # (status reads it from now on)
            try:
                table.run(outer, fd, is_tun, dest, wake, stop, _MAX_PENDING, _coalesce_us())
            except BaseException as exc:  # reported to the loop, never lost
                with contextlib.suppress(RuntimeError):  # the loop is closed: stopping anyway
                    loop.call_soon_threadsafe(self._native_thread_failed, exc)

        # nobody else reads these descriptors while the thread runs
        loop.remove_reader(fd)
        for ep in (self.outer_transport, self.virtual_transport):
            if ep is not None:
                loop.remove_reader(ep.sock.fileno())
        thread = threading.Thread(target=body, name=f"ipsecct-esp-{self.name}", daemon=True)
        self._native_thread = (thread, wake, stop)
        loop.add_reader(wake, self._native_drain)
        thread.start()

    def _native_drain(self) -> None:
        """What the forwarding thread handed up, in order: the Python path, signals, and
        sends the kernel had no room for; then its counters."""
        nt = self._native_thread
        if nt is None:
            return
        self._native_items(self.engine.native.drain(nt[1]))

    def drain_native(self) -> None:
        """What the forwarding thread has handed up so far, now rather than at the wake
        eventfd's turn (the transfer service, once a COMMIT activated tunnels: the packets
        that waited for them go in that turn)."""
        self._native_drain()

    def _native_items(self, items: list[tuple[Any, ...]]) -> None:
        for item in items:
            kind = item[0]
            if kind == 0:  # an inner packet not for the C table
                self.from_inner(item[1])
            elif kind == 1:  # a datagram from the outer side not for the C table
                self._on_outer(item[1], item[2])
            elif kind == 2:  # ESP the outer socket had no room for: queue it
                if self.outer_transport is not None and self._esp_may_leave():
                    self.outer_transport.sendto(item[1], item[2], fenced=True)
            elif kind == 3:  # a signal (ESP next header 253) for the transfer layer
                self.act(Signal(item[1], item[2]), item[3])
            elif self.inner_transport is not None:  # the inner socket had no room
                self.inner_transport.sendto(item[1], item[2])
        self.engine.fold_native_stats()

    def _native_thread_failed(self, exc: BaseException) -> None:
        """The forwarding thread ended with an error: the event loop reads the sockets
        again (one C call per readiness event), nothing waits on the thread."""
        nt = self._native_thread
        if nt is None or self._stopping.is_set():
            return
        _thread, wake, stop = nt
        self._native_thread = None
        loop = asyncio.get_running_loop()
        loop.remove_reader(wake)
        items = self.engine.native.drain(wake)
        os.close(wake)
        os.close(stop)
        event(log, "native-thread-failed", logging.ERROR, node=self.name, error=repr(exc))
        self._native_readers(loop)
        self._native_items(items)

    def _stop_native_thread(self) -> None:
        nt = self._native_thread
        if nt is None:
            return
        thread, wake, stop = nt
        self._native_thread = None
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().remove_reader(wake)
        os.eventfd_write(stop, 1)
        thread.join(_THREAD_STOP_TIMEOUT)
        if thread.is_alive():
            event(log, "native-thread-stuck", logging.ERROR, node=self.name)
            return  # its descriptors stay open: it may still be in epoll on them
        os.close(wake)
        os.close(stop)
        self.engine.fold_native_stats()

    def _batch_now(self) -> float:
        """The ``now`` of a native batch call: NaN on the monotonic clock, which makes each
        batch read the clock itself after its packets (a deadline such as the lease's end is
        then checked against a time no earlier than the packets' arrival); the node's clock
        otherwise (tests drive it)."""
        return math.nan if self.clock is time.monotonic else self.clock()

    def _native_outer_readable(self, ep: UdpEndpoint) -> None:
        fd, is_tun, dest = self._native_inner
        up, _ = self.engine.native.from_outer(
            ep.sock.fileno(), fd, is_tun, dest, _BATCH, self._batch_now()
        )
        for item in up:
            kind = item[0]
            if kind == 1:  # not for the C table: the Python path
                self._on_outer(item[1], item[2])
            elif kind == 3:  # a signal (ESP next header 253) for the transfer layer
                self.act(Signal(item[1], item[2]), item[3])
            elif kind == 2:  # relayed ESP the outer socket had no room for: queue it
                if self.outer_transport is not None and self._esp_may_leave():
                    self.outer_transport.sendto(item[1], item[2], fenced=True)
            elif self.inner_transport is not None:  # the inner socket had no room
                self.inner_transport.sendto(item[1], item[2])
        self.engine.fold_native_stats()

    def _native_inner_readable(self) -> None:
        fd, is_tun, _ = self._native_inner
        out = self.outer_transport
        assert out is not None
        up, _ = self.engine.native.from_inner(
            fd, is_tun, out.sock.fileno(), _BATCH, self._batch_now()
        )
        for item in up:
            if item[0] == 0:  # not for the C table: the Python path
                self.from_inner(item[1])
            elif self._esp_may_leave():  # the outer socket had no room: queue it
                out.sendto(item[1], item[2], fenced=True)
        self.engine.fold_native_stats()

    def _open_raw(self, loop: asyncio.AbstractEventLoop, fam: int) -> None:
        s = socket.socket(fam, socket.SOCK_RAW, PROTO_ESP)
        s.setblocking(False)
        s.bind((str(self.cfg.outer.host), 0))
        self._raw = s
        loop.add_reader(s.fileno(), self._on_raw_readable)

    async def stop(self) -> None:
        """Drain and close: stop reading, let queued sends go, close everything."""
        self._stopping.set()
        self.timers.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        loop = asyncio.get_running_loop()
        self._stop_native_thread()
        if self._tun_fd is not None:
            loop.remove_reader(self._tun_fd)
            os.close(self._tun_fd)
            self._tun_fd = None
        if self._raw is not None:
            loop.remove_reader(self._raw.fileno())
            self._raw.close()
            self._raw = None
        await asyncio.sleep(0.01)  # let the sockets flush what they queued
        for tr in (self.inner_transport, self.outer_transport, self.virtual_transport):
            if tr is not None:
                tr.close()
        event(
            log,
            "stopped",
            node=self.name,
            **{k: v for k, v in self.engine.stats.as_dict().items() if k != "drops"},
        )

    def _engine_timer(self, now: float) -> None:
        self.engine.handle_timer(now)
        self._log_events()

    def _log_events(self) -> None:
        for ev in self.engine.drain_events():
            if ev.event is SAEvent.SEQ_RESERVE:
                if self.on_reserve is not None:
                    self.on_reserve(ev.sa)
                continue
            if ev.event in (SAEvent.SOFT_EXPIRED, SAEvent.HARD_EXPIRED):
                for hook in self.on_lifetime:
                    hook(ev.sa, ev.event)
            event(
                log,
                "sa-" + ev.event.value,
                node=self.name,
                spi=f"0x{ev.sa.spi:08x}",
                direction=ev.sa.direction.value,
            )

    # -- inner side ----------------------------------------------------------------------
    def _on_inner_udp(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.from_inner(data)

    def _on_tun_readable(self) -> None:
        assert self._tun_fd is not None
        for _ in range(64):
            try:
                data = os.read(self._tun_fd, 65535)
            except BlockingIOError:
                return
            except OSError as exc:
                event(log, "tun-error", logging.WARNING, node=self.name, error=exc.strerror)
                return
            self.from_inner(data)

    def from_inner(self, packet: bytes) -> None:
        """A packet from the inner side: protect and send it (or answer/drop it)."""
        self.act(self.engine.outbound(packet, self.clock()), None)

    def act(self, res: Result, addr: tuple[Any, ...] | None) -> None:
        """Carry out what the engine decided."""
        if isinstance(res, ToPeer):
            self.send_esp(res.sa, res.data)
        elif isinstance(res, ToInner):
            self.to_inner(res.packet)
        elif isinstance(res, Held):
            if self.on_held is not None:
                self.on_held(res)
            else:
                self.engine.stats.drops[Drop.POLICY.value] += 1
        elif isinstance(res, Relay):
            # a moved tunnel's inbound ESP, unchanged, to its new gateway (ipsec/relay.py)
            self.send_outer(res.packet, res.addr)
        elif isinstance(res, Forward):
            if self.on_forward is not None:
                self.on_forward(res)
            else:
                self.engine.stats.drops[Drop.NO_SA.value] += 1
        elif isinstance(res, Signal):
            if self.on_signal is not None:
                self.on_signal(res, addr or ())
        elif isinstance(res, Bypass):
            self.engine.stats.drops[Drop.POLICY.value] += 1  # no clear outer path here
        if self.engine.events:
            self._log_events()

    def to_inner(self, packet: bytes) -> None:
        if self._tun_fd is not None:
            try:
                os.write(self._tun_fd, packet)
            except OSError as exc:
                event(log, "tun-error", logging.WARNING, node=self.name, error=exc.strerror)
        elif self.inner_transport is not None and self.inner_peer is not None:
            self.inner_transport.sendto(packet, self.inner_peer.sockaddr)

    # -- outer side ----------------------------------------------------------------------
    def send_esp(self, sa: SecurityAssociation, data: bytes | bytearray) -> None:
        if sa.encap is not None:
            if self.outer_transport is not None:
                dest = self._dest.get(id(sa))
                if dest is None or dest[0] is not sa.dst or dest[1] != sa.encap.dport:
                    dest = (sa.dst, sa.encap.dport, (_text(sa.dst), sa.encap.dport))
                    self._dest[id(sa)] = dest
                self.outer_transport.sendto(data, dest[2], fenced=True)
        elif self._raw is not None:
            try:
                self._raw.sendto(data, (str(sa.dst), 0))
            except OSError as exc:
                event(log, "raw-send-error", logging.WARNING, node=self.name, error=exc.strerror)

    def _esp_may_leave(self) -> bool:
        """May ESP sealed a while ago leave now (from the send queue, or handed up by the
        forwarding thread when the kernel had no room)? Not at or after the fail-over fence
        (``Engine.send_until``, the lease's end): such ESP was sealed under a lease that has
        run out since, and is dropped (counted ``fenced``) rather than sent late, when the
        standby may already send on the tunnel."""
        if self.clock() < self.engine.send_until:
            return True
        self.engine.stats.drops[Drop.FENCED.value] += 1
        return False

    def send_outer(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.outer_transport is not None:
            self.outer_transport.sendto(data, addr)

    def _on_outer(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # RFC 3948: a lone 0xFF is a NAT keep-alive, four zero octets mark a non-ESP message
        # (IKE, or ipsecct's own signalling), anything else is ESP starting with its SPI.
        if len(data) >= 8 and data[:4] != b"\0\0\0\0":
            self.from_outer(data, addr)
            return
        if data == b"\xff":
            return
        if data[:4] == b"\0\0\0\0":
            for hook in self.outer_hooks:
                if hook(data[4:], addr):
                    return
        self.engine.stats.drops[Drop.MALFORMED.value] += 1

    def _on_raw_readable(self) -> None:
        assert self._raw is not None
        for _ in range(64):
            try:
                data, addr = self._raw.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError:
                return
            if self.cfg.outer.host.version == 4:
                ihl = (data[0] & 0x0F) * 4 if data else 0
                data = data[ihl:]
            self.from_outer(data, addr)

    def from_outer(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.act(self.engine.inbound(data, self.cfg.local_address, self.clock()), addr)

    # -- information ---------------------------------------------------------------------
    def _native_thread_status(self) -> dict[str, Any] | None:
        tid = self._native_tid
        if self._native_thread is None or tid is None:
            return None
        try:
            priority = sched.current(tid)
        except OSError:  # (it ended meanwhile)
            return None
        return {"tid": tid, "priority": priority, "wanted": str(self.cfg.thread_priority)}

    def status(self) -> dict[str, Any]:
        now = self.clock()
        self.engine.fold_native_stats()
        return {
            "name": self.name,
            "role": self.role,
            "uptime_s": round(now - self.started, 3),
            "outer": str(self.cfg.outer),
            "sas": len(self.engine.sad),
            "policies": len(self.engine.spd),
            "data_path": (
                "python"
                if self.engine.native is None
                else "native-thread"
                if self._native_thread is not None
                else "native"
            ),
            # the forwarding thread's id and its scheduling as the kernel has it now
            # ([native] thread_priority's words; "wanted": the configuration's)
            "native_thread": self._native_thread_status(),
            "native_queue_drops": (
                0 if self.engine.native is None else self.engine.native.up_dropped
            ),
            # by class: each has its share of the queue (punted ESP, IKE, inner packets), so
            # a flood of one never crowds out the others, nor signals and own sends ("own")
            "native_queue_drops_by": (
                {} if self.engine.native is None else dict(self.engine.native.up_dropped_by)
            ),
            "counters": self.engine.stats.as_dict(),
            **{k: v() for k, v in self.extensions.items() if callable(v)},
        }

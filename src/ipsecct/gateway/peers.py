"""The pool of TLS channels to peer gateways (CXTP over TLS 1.3, mutual certificates).

One persistent connection per peer, reused by every transfer and by fail-over replication;
incoming connections are checked against ``[[peers]]`` (the certificate names the peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..ct import cxtp
from ..errors import ChannelError, ChannelTimeout, CxtpError, IpsecctError, TransferError
from . import tlschannel
from .config import PeerConfig, TransferConfig
from .limits import ConnectionLimits, HandshakeRate, bind_error
from .log import RateLimited, event
from .timers import supervise

log = logging.getLogger("ipsecct.ct.transfer")

KEEP_CONNECTED_CHECK = 1.0  # seconds between checks that every peer's channel is open
KEEP_CONNECTED_MAX = 30.0  # longest wait before trying an unreachable peer again
# Octets waiting to go to one peer (queued, and in the connection's write buffer): a peer
# that stops reading (or a path that black-holes) gets its channel dropped past this, and
# what waited with it (lost messages: the protocol's retries and time-outs cover them).
# A 20,000-tunnel rebalance or fail-over resync is a few MB.
SEND_BUFFER_LIMIT = 32 << 20
SEND_STALL = 30.0  # seconds a write to a peer may wait for room before its channel is dropped


def _ignore_message(peer: str, msg: cxtp.Message) -> None:
    pass


def _ignore_lost(peer: str) -> None:
    pass


class PeerChannels:
    """One reused TLS connection per peer; messages in go to ``on_message``, a lost connection
    to ``on_lost`` (both set by whoever owns the pool: the gateway's service)."""

    def __init__(
        self,
        tcfg: TransferConfig,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tcfg = tcfg
        self.name = name
        self.clock = clock
        self.on_message: Callable[[str, cxtp.Message], None] = _ignore_message
        self.on_lost: Callable[[str], None] = _ignore_lost
        # A channel to a peer became the one used to send to it (opened by either side),
        # called soon after (from the loop, never inside the open).
        self.on_open: Callable[[str], None] = _ignore_lost
        # Loaded by load_credentials() (the service does it before it binds anything).
        self.server_ctx: ssl.SSLContext | None = None
        self.client_ctx: ssl.SSLContext | None = None
        self.conns: dict[str, tlschannel.CxtpConnection] = {}  # the one used to send
        self.all_conns: set[tlschannel.CxtpConnection] = set()
        self.queues: dict[str, asyncio.Queue[bytes]] = {}  # encoded messages
        self.queued: dict[str, int] = {}  # their octets, per peer
        self.writers: dict[str, asyncio.Task[None]] = {}
        self.readers: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        # Connections being opened, one per peer: whoever needs one meanwhile waits for it.
        self._opening: dict[str, asyncio.Task[tlschannel.CxtpConnection]] = {}
        self._keepers: list[asyncio.Task[None]] = []  # start()'s: one per peer, one telling
        self._wake: dict[str, asyncio.Event] = {}  # a peer's upkeep, woken by its loss
        self._tried: set[str] = set()  # peers whose upkeep ended its first attempt
        self.refused = 0
        self._quiet_until: dict[str, float] = {}
        # why the last attempt to open a channel to each peer failed (status: a peer not
        # connected says why, e.g. its certificate from another CA); gone once one opens
        self.last_error: dict[str, str] = {}
        # Connections open on the listener per source address and in total, handshakes
        # included: anyone who reaches the port can open them, without a certificate.
        # A configured peer's host is always admitted (up to the per-source bound).
        hosts = {h for p in tcfg.peers.values() for h in (p.address.host, p.outer) if h}
        self.limits = ConnectionLimits(reserved=frozenset(
            s for h in hosts  # an IPv4 peer as a listener on "::" sees it
            for s in ((str(h), f"::ffff:{h}") if h.version == 4 else (str(h),))
        ))  # fmt: skip
        # TLS handshakes started per second, per source and in all (the peers' hosts have
        # their own, larger buckets): a source connecting in a loop costs a handshake each.
        self.rate = HandshakeRate(reserved=self.limits.reserved)
        self._quiet = RateLimited()
        # What each peer answers. A channel open at the TCP level says nothing of a path
        # that drops everything silently (its kernel retries for USER_TIMEOUT, 15 s, before
        # it gives up): status said "connected" meanwhile. When a message from the peer last
        # arrived, when its current channel opened, and, for a peer that must answer at
        # least that often while its channel is open (the fail-over peer: heartbeats and
        # their ACKs within dead_ms, set by the driver), that bound in seconds.
        self.heard: dict[str, float] = {}
        self.opened: dict[str, float] = {}
        self.answer_within: dict[str, float] = {}
        self.failed_opens: dict[str, int] = {}  # attempts to open a channel that failed
        # Messages dropped because their channel's TCP connection had failed (a reset)
        # before TLS told (send_many), and the channels already told of (once each).
        self.lost_writes: dict[str, int] = {}
        self._write_told: weakref.WeakSet[tlschannel.CxtpConnection] = weakref.WeakSet()
        # reconnect()'s, and the attempts to connect that connection() shares (stop() ends them)
        self._attempts: set[asyncio.Task[Any]] = set()
        self._told: dict[str, str] = {}  # the channel state last logged, per watched peer

    def load_credentials(self) -> None:
        """Read the certificate, key and CA (a problem is a one-line error naming the file)."""
        tcfg = self.tcfg
        self.server_ctx = tlschannel.server_context(tcfg.cert, tcfg.key, tcfg.ca)
        self.client_ctx = tlschannel.client_context(tcfg.cert, tcfg.key, tcfg.ca)
        # The gateway starts (a clock may be wrong, a new certificate on its way) and says so
        now = dt.datetime.now(dt.UTC)
        for why in tlschannel.not_valid_at([tcfg.cert, tcfg.ca], now):
            event(log, "tls-certificate-not-valid-now", logging.WARNING, problem=why)

    async def start(self) -> None:
        if self.server_ctx is None:
            self.load_credentials()
        assert self.server_ctx is not None
        host, port = str(self.tcfg.listen.host), self.tcfg.listen.port
        try:
            self.server = await tlschannel.serve(
                self._accepted,
                host,
                port,
                self.server_ctx,
                timeout=3600,
                on_refused=self._refused_handshake,
                limits=self.limits,
                rate=self.rate,
            )
        except OSError as exc:
            raise bind_error(exc, "TCP", host, port, "transfer.listen") from None
        # One upkeep task per peer (a peer whose connect hangs holds up no other's) and one
        # that tells the watched peers' channel states on its own period.
        self._keepers = [supervise(self._keep(p), f"connect to {p}", self.name)
                         for p in self.tcfg.peers]  # fmt: skip
        self._keepers.append(supervise(self._tell_every_check(), "tell channels", self.name))

    def _channel_open(self, peer: str) -> bool:
        c = self.conns.get(peer)
        return c is not None and not c.closed

    async def _keep(self, peer: str) -> None:
        """Open the channel to ``peer`` at start and again whenever it is lost, so that a
        transfer never waits for a TCP and TLS handshake (8-16 ms measured in ``bench
        ikev2``) while its tunnels are held. A peer that is not up is tried again after
        0.5 s, doubling to 30 s; a channel the peer opened to us serves as well.

        A task per peer: an attempt that hangs (a path that drops, a dead host: until the
        handshake time-out, 10 x max_transfer_ms) holds up no other peer's channel. One
        attempt at a time per peer (:meth:`connection` shares it with other callers), and
        at most one per KEEP_CONNECTED_CHECK after one that opened (a peer that accepts and
        closes at once costs a handshake a second); a lost channel wakes it at once."""
        loop = asyncio.get_running_loop()
        wake = self._wake[peer] = asyncio.Event()
        backoff = 0.0
        next_try = 0.0
        while True:
            wake.clear()  # (before looking: a loss from now on wakes the wait below)
            started = loop.time()
            if not self._channel_open(peer) and started >= next_try:
                try:
                    await self.connection(peer)
                except (IpsecctError, OSError):
                    backoff = min(KEEP_CONNECTED_MAX, max(0.5, backoff * 2))
                    next_try = loop.time() + backoff
                else:
                    backoff = 0.0
                    next_try = started + KEEP_CONNECTED_CHECK
            if peer not in self._tried:  # told at once, then on the period
                self._tried.add(peer)
                self._tell_states()
            if self._channel_open(peer):
                wait = KEEP_CONNECTED_CHECK  # (or until its loss wakes it)
            else:
                wait = max(0.0, next_try - loop.time())
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wake.wait()

    def _wake_keeper(self, peer: str) -> None:
        """``peer``'s channel was lost: its upkeep tries again now (or once its pause ends)."""
        w = self._wake.get(peer)
        if w is not None:
            w.set()

    async def _tell_every_check(self) -> None:
        while True:
            await asyncio.sleep(KEEP_CONNECTED_CHECK)
            self._tell_states()

    def channel_state(self, peer: str, now: float | None = None) -> tuple[str, float | None]:
        """("connected", None); ("unanswered", seconds since anything came from ``peer``
        or its channel opened) for a peer with an ``answer_within`` bound that it passed
        while its channel is open (a path dropping everything: the channel stays open at the
        TCP level for up to USER_TIMEOUT); or ("not connected", None)."""
        if not self.connected(peer):
            return "not connected", None
        bound = self.answer_within.get(peer)
        if bound is None:
            return "connected", None
        t = self.clock() if now is None else now
        silent = t - max(self.heard.get(peer, -math.inf), self.opened.get(peer, -math.inf))
        return ("unanswered", silent) if silent > bound else ("connected", None)

    def _tell_states(self) -> None:
        """One line per change of a watched peer's channel state (checked every
        KEEP_CONNECTED_CHECK; status says it as it is at any time). A peer whose upkeep
        has not ended its first attempt is not told yet (a start said "not connected", then
        "connected", of every peer reached a moment later)."""
        for peer, bound in self.answer_within.items():
            if peer not in self._tried:
                continue
            state, silent = self.channel_state(peer)
            if state == self._told.get(peer, "connected"):
                continue
            self._told[peer] = state
            more: dict[str, object] = {}
            if state == "unanswered" and silent is not None:
                more = {"silent_ms": f"{silent * 1000:.0f}", "detail": f"the channel is "
                        f"open but nothing came back within {bound * 1000:.0f} ms (a path "
                        "that drops it, or a peer that does not run)"}  # fmt: skip
            elif state == "not connected":
                why = self.last_error.get(peer, "")
                if not why and peer in self._opening:
                    why = ("no answer yet to the attempt to connect (a path that drops, or a "
                           "host that is down)")  # fmt: skip
                more = {"error": why}
            level = logging.INFO if state == "connected" else logging.WARNING
            event(log, "peer-channel", level, node=self.name, peer=peer, state=state, **more)

    def reconnect(self, peer: str) -> None:
        """Try to open the channel to ``peer`` now, in the background, unless one is open or
        being opened (a failure is kept in ``last_error`` and counted in ``failed_opens``;
        nothing else is told). The caller bounds how often (the fail-over driver backs off)."""
        if self.connected(peer) or peer in self._opening or peer not in self.tcfg.peers:
            return
        task = asyncio.get_running_loop().create_task(self._attempt(peer))
        self._attempts.add(task)
        task.add_done_callback(self._attempt_done)

    async def _attempt(self, peer: str) -> None:
        with contextlib.suppress(IpsecctError, OSError):
            await self.connection(peer)

    async def stop(self) -> None:
        tasks = [*self._keepers, *self._attempts]
        for t in tasks:
            t.cancel()
        # (an attempt that hangs on a peer's connect ends here, cancelled, nothing logged)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keepers = []
        if self.server is not None:
            self.server.close()
        for w in self.writers.values():
            w.cancel()
        for w in self.writers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w
        # Closing the connections ends their reader tasks; cancel only what does not end.
        # All at once: a peer whose path drops our close_notify holds up no other's close.
        await asyncio.gather(*(self._end(c) for c in list(self.all_conns)))
        self.conns.clear()
        if self.readers:
            _, pending = await asyncio.wait(list(self.readers), timeout=1.0)
            for t in pending:
                t.cancel()

    @staticmethod
    async def _end(c: tlschannel.CxtpConnection) -> None:
        """Close ``c``, and drop it if its peer has not closed its side within 0.5 s (a path
        that drops): its reader then ends by itself. Cancelled instead, the reader of a
        channel the peer opened (asyncio's task for the listener's connection) made asyncio
        log "Exception in callback ... CancelledError" with three tracebacks (Python 3.11)."""
        c.timeout = 0.5  # do not wait long for the peer's close_notify
        await c.close()
        c.abort()  # (nothing left to drop after a clean close)

    def _refused_handshake(self, address: str, reason: str) -> None:
        self.refused += 1  # tlschannel logs it (rate-limited); here it is only counted

    def peer_of(self, conn: tlschannel.CxtpConnection) -> PeerConfig | None:
        for p in self.tcfg.peers.values():
            if conn.peer.matches(p.name):
                return p
        return None

    async def _accepted(self, conn: tlschannel.CxtpConnection) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.readers.add(task)
            task.add_done_callback(self.readers.discard)
        peer = self.peer_of(conn)
        if peer is None:
            self.refused += 1
            self._quiet.event(
                log,
                "peer-refused",
                logging.WARNING,
                key=conn.peer_address.rsplit(":", 1)[0],
                node=self.name,
                certificate=conn.peer.name,
                address=conn.peer_address,
            )
            return
        if peer.name not in self.conns or self.conns[peer.name].closed:
            self.conns[peer.name] = conn
            self.opened[peer.name] = self.clock()
            # (one is open: an earlier attempt's failure no longer says why it is not, and
            # a "not connected" line while the next attempt hangs told that stale reason)
            self.last_error.pop(peer.name, None)
            asyncio.get_running_loop().call_soon(self.on_open, peer.name)
        await self._read(peer.name, conn)

    def delivery_due(self) -> bool:
        """Is what a read from a peer decoded waiting for its delivery on the loop?"""
        return any(c.delivery_due for c in self.all_conns)

    async def _read(self, peer: str, conn: tlschannel.CxtpConnection) -> None:
        self.all_conns.add(conn)
        try:
            # What each read decoded is handled by one callback queued on the loop (no task
            # woken, no timer armed per message); this waits until the channel ends.
            await conn.deliver(lambda msg: self._got(peer, msg))
        except CxtpError as exc:
            event(log, "peer-malformed", logging.WARNING, node=self.name, peer=peer, error=str(exc))
        except ChannelError:
            pass
        finally:
            # Only the loss of the channel our messages to the peer go on is the peer's
            # loss: another one (the peer's extra channel, a duplicate from both sides
            # connecting at once) ending loses nothing we sent. Reporting each rolled back
            # every transfer in flight to the peer and resent the whole fail-over state, once
            # per TLS handshake of a peer that reconnected in a loop.
            current = self.conns.get(peer) is conn
            if current:
                del self.conns[peer]
            self.all_conns.discard(conn)
            await conn.close()
            if current:
                self._wake_keeper(peer)
                self.on_lost(peer)

    def _got(self, peer: str, msg: cxtp.Message) -> None:
        self.heard[peer] = self.clock()  # (the peer answers: channel_state)
        self.on_message(peer, msg)

    async def connection(self, peer: str) -> tlschannel.CxtpConnection:
        """The open channel to ``peer``, or one opened now. One attempt at a time per peer,
        shared by every caller meanwhile; it is the pool's task, not a caller's: a caller
        cancelled (its own time-out, a transfer given up) stops waiting, and the others and
        the attempt go on (in the first caller's task, its cancellation cancelled every
        waiter). Only :meth:`stop` cancels the attempt: a waiter not itself cancelled then
        gets ChannelError."""
        c = self.conns.get(peer)
        if c is not None and not c.closed:
            return c
        opening = self._opening.get(peer)
        if opening is None:
            opening = asyncio.get_running_loop().create_task(self._open_shared(peer))
            self._opening[peer] = opening
            self._attempts.add(opening)
            opening.add_done_callback(self._attempt_done)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if opening.cancelled() and (me is None or not me.cancelling()):
                raise ChannelError(f"the attempt to connect to {peer} was stopped") from None
            raise

    def _attempt_done(self, task: asyncio.Task[Any]) -> None:
        self._attempts.discard(task)
        if not task.cancelled():
            task.exception()  # (retrieved: every waiter may have been cancelled meanwhile)

    async def _open_shared(self, peer: str) -> tlschannel.CxtpConnection:
        try:
            c = await self._open(peer)
        except Exception as exc:
            self.last_error[peer] = str(exc)[:300] or type(exc).__name__
            self.failed_opens[peer] = self.failed_opens.get(peer, 0) + 1
            raise
        else:
            self.last_error.pop(peer, None)
            return c
        finally:
            self._opening.pop(peer, None)

    async def _open(self, peer: str) -> tlschannel.CxtpConnection:
        spec = self.tcfg.peers.get(peer)
        if spec is None:
            raise TransferError(f"unknown peer {peer!r}")
        if self.client_ctx is None:
            raise TransferError("the peer channels are not started")
        c = await tlschannel.connect(
            str(spec.address.host),
            spec.address.port,
            self.client_ctx,
            server_hostname=peer,
            timeout=30,
            handshake_timeout=self.tcfg.settings.max_transfer_time * 10,
        )
        if not c.peer.matches(peer):
            await c.close()
            raise TransferError(f"{spec.address} is not {peer}")
        self.conns[peer] = c
        self.opened[peer] = self.clock()
        asyncio.get_running_loop().call_soon(self.on_open, peer)
        task = supervise(self._read(peer, c), f"read from {peer}", self.name)
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)
        return c

    def room(self, peer: str) -> int:
        """Octets that may be handed to :meth:`send` for ``peer`` now, keeping well within
        SEND_BUFFER_LIMIT: half of it, less what waits (queued, in the write buffer; may be
        negative). A bulk sender (fail-over replication, whose whole state after a lost
        channel may exceed the bound) sends no more than this at a time and the rest as the
        channel drains: sent at once, over the bound, it had the channel dropped, and the
        peer's loss made it send the whole state again, for ever."""
        waiting = self.queued.get(peer, 0)
        c = self.conns.get(peer)
        if c is not None and not c.closed:
            waiting += c.writer.transport.get_write_buffer_size()
        return SEND_BUFFER_LIMIT // 2 - waiting

    def connected(self, peer: str) -> bool:
        """Is a channel with ``peer`` open (either side's), its TCP connection not failed?"""
        c = self.conns.get(peer)
        return c is not None and not c.failed

    def send(self, peer: str, msg: cxtp.Message) -> None:
        self.send_many(peer, [msg])

    def send_many(self, peer: str, msgs: list[cxtp.Message]) -> None:
        """Send ``msgs`` to ``peer`` in their order, in one write (one TLS record: a
        transfer's FINAL and COMMIT, say)."""
        parts = []
        for msg in msgs:
            try:
                parts.append(cxtp.encode(msg))
            except CxtpError as exc:  # a bug: never let it stop the caller's loop
                event(
                    log,
                    "message-unencodable",
                    logging.ERROR,
                    node=self.name,
                    peer=peer,
                    error=str(exc),
                )
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        # Fast path: an open connection with nothing queued ahead: write now (the transport
        # buffers; the writer task drains when the buffer grows), no task switch on the way.
        c = self.conns.get(peer)
        q = self.queues.get(peer)
        if c is not None and not c.closed and c.failed:
            # Its TCP connection failed (a reset) and TLS has not told yet: what is written
            # now is lost (its reader reports the loss, whose handlers send again what
            # matters), and asyncio logged a line for each write past the fifth.
            self._write_failed(peer, c)
            return
        if c is not None and not c.closed and (q is None or q.empty()):
            w = self.writers.get(peer)
            if w is None or w.done():
                c.writer.write(data)
                if c.failed:  # (this very write found it reset)
                    self._write_failed(peer, c)
                    return
                if c.writer.transport.get_write_buffer_size() > 1 << 20:
                    what = f"write to {peer}"
                    self.writers[peer] = supervise(self._drain(peer, c), what, self.name)
                return
        waiting = self.queued.get(peer, 0)
        if c is not None and not c.closed:
            waiting += c.writer.transport.get_write_buffer_size()
        if waiting + len(data) > SEND_BUFFER_LIMIT:
            # Before: the queue grew without bound while the peer read nothing (the write
            # waited up to an hour on a channel the peer had opened).
            self._stuck(peer, c, f"{waiting} octets wait for it to read")
            return
        if q is None:
            q = self.queues[peer] = asyncio.Queue()
        q.put_nowait(data)
        self.queued[peer] = self.queued.get(peer, 0) + len(data)
        w = self.writers.get(peer)
        if w is None or w.done():
            self.writers[peer] = supervise(self._writer(peer, q), f"write to {peer}", self.name)

    def _write_failed(self, peer: str, conn: tlschannel.CxtpConnection) -> None:
        """A write to ``peer`` found its channel's TCP connection failed: one line per
        channel (``peer-write-failed``), every message after it dropped and counted
        (``lost_writes``) until its reader reports the loss (``on_lost``)."""
        self.lost_writes[peer] = self.lost_writes.get(peer, 0) + 1
        if conn in self._write_told:
            return
        self._write_told.add(conn)
        event(log, "peer-write-failed", logging.WARNING, node=self.name, peer=peer,
              address=conn.peer_address, detail="the channel's TCP connection failed "
              "(reset or closed): nothing more is written to it; its loss is reported "
              "and a new channel opened")  # fmt: skip

    def _stuck(self, peer: str, conn: tlschannel.CxtpConnection | None, why: str) -> None:
        """``peer`` takes nothing from its channel: drop the channel and what waits for it,
        and report the peer lost; the next message opens a new channel."""
        self._drop_waiting(peer, "peer-stuck", why)
        if conn is not None:
            # Reported here, not by its reader: a new channel may be open before the reader
            # wakes, and the reader reports only the loss of the channel in use.
            if self.conns.get(peer) is conn:
                del self.conns[peer]
                self._wake_keeper(peer)
            if not conn.closed:
                conn.abort()
        # Soon, not now: send() may be in the middle of a transfer core's outputs, and the
        # loss makes the core roll back.
        asyncio.get_running_loop().call_soon(self.on_lost, peer)

    def _drop_waiting(self, peer: str, what: str, why: str) -> None:
        """Log ``what`` (a WARNING, at most one line per 10 s per peer) and drop every message
        waiting to go to ``peer``."""
        now = self.clock()
        if now >= self._quiet_until.get(peer, 0.0):
            self._quiet_until[peer] = now + 10.0
            event(log, what, logging.WARNING, node=self.name, peer=peer, error=why)
        q = self.queues.get(peer)
        while q is not None and not q.empty():
            q.get_nowait()
        self.queued[peer] = 0

    async def _drain(self, peer: str, conn: tlschannel.CxtpConnection) -> None:
        try:
            async with asyncio.timeout(SEND_STALL):
                await conn.writer.drain()
        except TimeoutError:
            self._stuck(peer, conn, f"no room to write for {SEND_STALL:g} s")
        except (ConnectionError, OSError):
            self.on_lost(peer)

    async def _writer(self, peer: str, q: asyncio.Queue[bytes]) -> None:
        while True:
            data = await q.get()
            batch = [data]
            while not q.empty() and len(batch) < 256:
                batch.append(q.get_nowait())
            self.queued[peer] = max(0, self.queued.get(peer, 0) - sum(map(len, batch)))
            conn: tlschannel.CxtpConnection | None = None
            try:
                conn = await self.connection(peer)
                await conn.send_raw(b"".join(batch), timeout=SEND_STALL)
            except ChannelTimeout:
                self._stuck(peer, conn, f"no room to write for {SEND_STALL:g} s")
            except (IpsecctError, OSError) as exc:
                self._drop_waiting(peer, "peer-unreachable", str(exc))
                self.on_lost(peer)

    async def connect_all(self) -> None:
        """Try to open the channel to every peer, all at once (one that does not answer
        holds up no other); what fails is kept in ``last_error``."""
        await asyncio.gather(*(self._attempt(p) for p in self.tcfg.peers))

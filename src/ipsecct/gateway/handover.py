"""The asyncio side of context transfer: TLS channels to peer gateways, timers, control
commands, the mobile node's agent, and the demo's handover plugins.

All protocol decisions are in :class:`~ipsecct.ct.transfer.TransferCore`; this module moves its
messages over persistent, mutually authenticated TLS 1.3 connections (one per peer, reused),
checks what each peer may do, and applies the core's outputs to the node.

Configuration (gateway TOML)::

    [transfer]
    listen = "127.0.0.1:5091"          # CXTP over TLS (RFC 4067's port; no SCTP here)
    cert = "pki/sg1.pem"                 # this gateway's certificate and key, and the CA
    key = "pki/sg1.key"
    ca = "pki/ca.pem"
    conflict = "reassign"                # SPI collisions: deny | renegotiate | reassign
    identity = "direct"                  # direct | indirect (draft §7.1)
    max_transfer_ms = 200                # CT_MAX_TRANSFER_TIME
    forward_ms = 2000                    # CT_MAX_HANDOVER_TIME: forwarding after cut-over
    retry_ms = 2000                      # CT_REQUEST_RETRY
    retry_max_ms = 15000                 # CT_RETRY_MAX
    path_mtu = 1400                      # replaces the transferred PMTU (optional)
    algorithms = ["aes-gcm-16", ...]     # what this gateway accepts (default: all)
    candidates = ["sg3"]                 # next gateways to try on "unsupported algorithm"

    [[peers]]
    name = "sg2"                         # must match the peer certificate's name
    address = "127.0.0.1:5092"           # its [transfer] listen address
    outer = "127.0.1.2"                  # its outer address (CTARs name routers by it)
    allow = ["send", "request"]          # may send us contexts / may request ours
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ct import cxtp, failover
from ..ct.transfer import (
    FPT_SYNC,
    ConflictPolicy,
    Finished,
    Identity,
    Inject,
    Output,
    Record,
    Send,
    Settings,
    TransferCore,
    TransferError,
    Transmit,
    token_key,
)
from ..ct.transfer import Endpoint as TEndpoint
from ..errors import ConfigError, IpsecctError
from ..ipsec import signalling
from ..ipsec.algorithms import ENC_NAMES, INTEG_NAMES, enc_from_name
from ..ipsec.engine import Forward, Held, Signal, TunnelState
from ..ipsec.esp import Drop
from ..ipsec.spd import IPAddress
from . import tlschannel
from .config import Endpoint, NodeConfig, parse_endpoint
from .log import event
from .node import Node

log = logging.getLogger("ipsecct.ct.transfer")


@dataclass(frozen=True)
class PeerSpec:
    name: str
    address: Endpoint
    outer: IPAddress | None
    allow: frozenset[str]


@dataclass
class TransferConfig:
    listen: Endpoint
    cert: str
    key: str
    ca: str
    settings: Settings
    peers: dict[str, PeerSpec]
    candidates: list[str] = field(default_factory=list)
    balance: Balance | None = None


@dataclass(frozen=True)
class Balance:
    """Load balancing by the gateway itself: above ``above`` active tunnels, move the excess
    (at most ``batch`` a round, every ``interval`` seconds) to ``to`` in one exchange."""

    above: int
    to: str
    batch: int = 1000
    interval: float = 1.0


def parse_config(cfg: NodeConfig) -> TransferConfig | None:
    t = cfg.extra.get("transfer")
    if t is None:
        return None
    path = cfg.path

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {msg}")

    if not isinstance(t, dict):
        raise err("transfer", "must be a table")
    allowed = {
        "listen",
        "cert",
        "key",
        "ca",
        "conflict",
        "identity",
        "max_transfer_ms",
        "forward_ms",
        "retry_ms",
        "retry_max_ms",
        "path_mtu",
        "algorithms",
        "candidates",
        "max_held",
        "balance",
    }
    for k in t:
        if k not in allowed:
            raise err(
                f"transfer.{k}", f"unknown key (expected one of: {', '.join(sorted(allowed))})"
            )
    base = Path(path).parent

    def file(k: str) -> str:
        v = t.get(k)
        if not isinstance(v, str):
            raise err(f"transfer.{k}", "missing (a file path)")
        p = Path(v) if Path(v).is_absolute() else base / v
        if not p.is_file():
            raise err(f"transfer.{k}", f"no such file {p}")
        return str(p)

    try:
        listen = parse_endpoint(str(t.get("listen", "")), 5091)
    except ValueError as exc:
        raise err("transfer.listen", f"bad address: {exc}") from None
    s = Settings()
    try:
        s.conflict = ConflictPolicy(t.get("conflict", "reassign"))
    except ValueError:
        raise err("transfer.conflict", "must be deny, renegotiate or reassign") from None
    try:
        s.identity = Identity(t.get("identity", "direct"))
    except ValueError:
        raise err("transfer.identity", "must be direct or indirect") from None
    for key, attr in (
        ("max_transfer_ms", "max_transfer_time"),
        ("forward_ms", "forward_time"),
        ("retry_ms", "retry"),
        ("retry_max_ms", "retry_max"),
    ):
        if key in t:
            v = t[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise err(f"transfer.{key}", "must be a positive number of milliseconds")
            setattr(s, attr, float(v) / 1000)
    if "path_mtu" in t:
        v = t["path_mtu"]
        if not isinstance(v, int) or not 576 <= v <= 65535:
            raise err("transfer.path_mtu", "must be 576-65535")
        s.path_mtu = v
    if "max_held" in t:
        v = t["max_held"]
        if not isinstance(v, int) or v < 0:
            raise err("transfer.max_held", "must be a number >= 0")
        s.max_held = v
    if "algorithms" in t:
        algs = t["algorithms"]
        if not isinstance(algs, list) or not all(isinstance(a, str) for a in algs):
            raise err("transfer.algorithms", "must be a list of algorithm names")
        enc, integ = set(), set()
        for a in algs:
            if a.lower() in ENC_NAMES:
                enc.add(enc_from_name(a))
            elif a.lower() in INTEG_NAMES:
                integ.add(INTEG_NAMES[a.lower()])
            else:
                raise err("transfer.algorithms", f"unknown algorithm {a!r}")
        s.supported_enc = frozenset(enc)
        s.supported_integ = frozenset(integ | {INTEG_NAMES["none"]})
    peers: dict[str, PeerSpec] = {}
    plist = cfg.extra.get("peers", [])
    if not isinstance(plist, list):
        raise err("peers", "must be an array of tables ([[peers]])")
    for i, p in enumerate(plist):
        where = f"peers[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise err(where, "needs a name")
        for k in p:
            if k not in ("name", "address", "outer", "allow"):
                raise err(f"{where}.{k}", "unknown key (expected name, address, outer, allow)")
        try:
            addr = parse_endpoint(str(p.get("address", "")), 5091)
            outer = ipaddress.ip_address(p["outer"]) if "outer" in p else None
        except ValueError as exc:
            raise err(where, f"bad address: {exc}") from None
        allow = p.get("allow", ["send", "request"])
        if not isinstance(allow, list) or not set(allow) <= {"send", "request"}:
            raise err(f"{where}.allow", 'must be a list of "send" and "request"')
        peers[p["name"]] = PeerSpec(p["name"], addr, outer, frozenset(allow))
    cands = t.get("candidates", [])
    if not isinstance(cands, list) or any(c not in peers for c in cands):
        raise err("transfer.candidates", "must list names of [[peers]]")
    balance = None
    if "balance" in t:
        b = t["balance"]
        keys = {"above", "to", "batch", "interval_ms"}
        if not isinstance(b, dict) or not set(b) <= keys or "above" not in b or "to" not in b:
            raise err("transfer.balance", "must be a table with above and to (batch, interval_ms)")
        if b["to"] not in peers:
            raise err("transfer.balance.to", "must name one of the [[peers]]")
        for k in ("above", "batch", "interval_ms"):
            if k in b and (isinstance(b[k], bool) or not isinstance(b[k], int) or b[k] <= 0):
                raise err(f"transfer.balance.{k}", "must be a positive whole number")
        balance = Balance(
            b["above"], b["to"], b.get("batch", 1000), b.get("interval_ms", 1000) / 1000
        )
    return TransferConfig(
        listen, file("cert"), file("key"), file("ca"), s, peers, list(cands), balance
    )


class Channels:
    """One reused TLS connection per peer; messages in go to ``on_message``."""

    def __init__(
        self,
        tcfg: TransferConfig,
        name: str,
        on_message: Callable[[str, cxtp.Message], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.tcfg = tcfg
        self.name = name
        self.on_message = on_message
        self.on_lost = on_lost
        self.server_ctx = tlschannel.server_context(tcfg.cert, tcfg.key, tcfg.ca)
        self.client_ctx = tlschannel.client_context(tcfg.cert, tcfg.key, tcfg.ca)
        self.conns: dict[str, tlschannel.CxtpConnection] = {}  # the one used to send
        self.all_conns: set[tlschannel.CxtpConnection] = set()
        self.queues: dict[str, asyncio.Queue[cxtp.Message]] = {}
        self.writers: dict[str, asyncio.Task[None]] = {}
        self.readers: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.refused = 0
        self._quiet_until: dict[str, float] = {}

    async def start(self) -> None:
        self.server = await tlschannel.serve(
            self._accepted,
            str(self.tcfg.listen.host),
            self.tcfg.listen.port,
            self.server_ctx,
            timeout=3600,
            on_refused=self._refused_handshake,
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers.values():
            w.cancel()
        for w in self.writers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w
        # Closing the connections ends their reader tasks; cancel only what does not end.
        for c in list(self.all_conns):
            c.timeout = 0.5  # do not wait long for the peer's close_notify
            await c.close()
        self.conns.clear()
        if self.readers:
            _, pending = await asyncio.wait(list(self.readers), timeout=1.0)
            for t in pending:
                t.cancel()

    def _refused_handshake(self, address: str, reason: str) -> None:
        self.refused += 1
        event(log, "peer-refused", logging.WARNING, node=self.name, address=address, reason=reason)

    def peer_of(self, conn: tlschannel.CxtpConnection) -> PeerSpec | None:
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
            event(
                log,
                "peer-refused",
                logging.WARNING,
                node=self.name,
                certificate=conn.peer.name,
                address=conn.peer_address,
            )
            return
        if peer.name not in self.conns or self.conns[peer.name].closed:
            self.conns[peer.name] = conn
        await self._read(peer.name, conn)

    async def _read(self, peer: str, conn: tlschannel.CxtpConnection) -> None:
        self.all_conns.add(conn)
        try:
            while True:
                try:
                    msg = await conn.recv(timeout=3600)
                except tlschannel.ChannelTimeout:
                    continue
                self.on_message(peer, msg)
        except cxtp.CxtpError as exc:
            event(log, "peer-malformed", logging.WARNING, node=self.name, peer=peer, error=str(exc))
        except tlschannel.ChannelError:
            pass
        finally:
            if self.conns.get(peer) is conn:
                del self.conns[peer]
            self.all_conns.discard(conn)
            await conn.close()
            self.on_lost(peer)

    async def connection(self, peer: str) -> tlschannel.CxtpConnection:
        c = self.conns.get(peer)
        if c is not None and not c.closed:
            return c
        spec = self.tcfg.peers.get(peer)
        if spec is None:
            raise TransferError(f"unknown peer {peer!r}")
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
        task = asyncio.create_task(self._read(peer, c))
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)
        return c

    def send(self, peer: str, msg: cxtp.Message) -> None:
        # Fast path: an open connection with nothing queued ahead: write now (the transport
        # buffers; the writer task drains when the buffer grows), no task switch on the way.
        c = self.conns.get(peer)
        q = self.queues.get(peer)
        if c is not None and not c.closed and (q is None or q.empty()):
            w = self.writers.get(peer)
            if w is None or w.done():
                try:
                    data = cxtp.encode(msg)
                except cxtp.CxtpError as exc:  # a bug: never let it stop the caller's loop
                    event(
                        log,
                        "message-unencodable",
                        logging.ERROR,
                        node=self.name,
                        peer=peer,
                        error=str(exc),
                    )
                    return
                c.writer.write(data)
                if c.writer.transport.get_write_buffer_size() > 1 << 20:
                    self.writers[peer] = asyncio.create_task(self._drain(peer, c))
                return
        q = self.queues.get(peer)
        if q is None:
            q = self.queues[peer] = asyncio.Queue()
        q.put_nowait(msg)
        w = self.writers.get(peer)
        if w is None or w.done():
            self.writers[peer] = asyncio.create_task(self._writer(peer, q))

    async def _drain(self, peer: str, conn: tlschannel.CxtpConnection) -> None:
        try:
            async with asyncio.timeout(30):
                await conn.writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            self.on_lost(peer)

    async def _writer(self, peer: str, q: asyncio.Queue[cxtp.Message]) -> None:
        while True:
            msg = await q.get()
            batch = [msg]
            while not q.empty() and len(batch) < 256:
                batch.append(q.get_nowait())
            try:
                conn = await self.connection(peer)
                await conn.send_many(list(batch))
            except (IpsecctError, OSError) as exc:
                now = time.monotonic()
                if now >= self._quiet_until.get(peer, 0.0):  # at most one line per 10 s
                    self._quiet_until[peer] = now + 10.0
                    event(
                        log,
                        "peer-unreachable",
                        logging.WARNING,
                        node=self.name,
                        peer=peer,
                        error=str(exc),
                    )
                while not q.empty():
                    q.get_nowait()
                self.on_lost(peer)

    async def connect_all(self) -> None:
        for p in self.tcfg.peers:
            with contextlib.suppress(IpsecctError, OSError):
                await self.connection(p)


class TransferService:
    """Context transfer for one running gateway."""

    def __init__(self, node: Node, tcfg: TransferConfig) -> None:
        self.node = node
        self.tcfg = tcfg
        self.core = TransferCore(
            node.engine, TEndpoint(node.cfg.outer.host, node.cfg.outer.port), tcfg.settings
        )
        self.channels = Channels(tcfg, node.name, self._on_message, self._on_lost)
        self.waiters: dict[int, asyncio.Future[Record]] = {}
        self.listeners: list[Callable[[Record], None]] = []
        self._wake = asyncio.Event()
        self._release_timer: asyncio.TimerHandle | None = None
        self._timer: asyncio.Task[None] | None = None
        node.on_held = self._on_held
        node.on_forward = self._on_forward
        node.outer_hooks.append(self._on_outer_message)
        node.extensions["peers"] = self._peers_status
        node.extensions["transfers"] = self._transfers_status
        self.failover = failover.parse_config(node.cfg.extra, node.cfg.path, set(tcfg.peers))
        self.replicator: failover.Replicator | None = None
        self.standby: failover.Standby | None = None
        self._failover_task: asyncio.Task[None] | None = None
        self._balance_task: asyncio.Task[None] | None = None
        if self.failover is not None:
            if self.failover.role == "active":
                self.replicator = failover.Replicator(node.engine, self.failover)
            else:
                self.standby = failover.Standby(
                    node.engine,
                    self.failover,
                    TEndpoint(node.cfg.outer.host, node.cfg.outer.port),
                    tcfg.settings.identity,
                )
            node.extensions["failover"] = self._failover_status

    async def start(self) -> None:
        await self.channels.start()
        self._timer = asyncio.create_task(self._timers())
        if self.failover is not None:
            self._failover_task = asyncio.create_task(self._failover_loop())
        if self.tcfg.balance is not None:
            self._balance_task = asyncio.create_task(self._balance_loop(self.tcfg.balance))
        event(
            log,
            "transfer-listening",
            node=self.node.name,
            listen=self.tcfg.listen,
            peers=",".join(self.tcfg.peers),
        )

    async def stop(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._balance_task is not None:
            self._balance_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._balance_task
        if self._failover_task is not None:
            self._failover_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._failover_task
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        await self.channels.stop()

    # -- plumbing ------------------------------------------------------------------------
    def run(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Send):
                self.channels.send(o.peer, o.msg)
            elif isinstance(o, Inject):
                if o.inbound:
                    self.node.from_outer(o.packet, ())
                else:
                    self.node.from_inner(o.packet)
            elif isinstance(o, Transmit):
                self.node.send_esp(o.sa, o.data)
            elif isinstance(o, Finished):
                self._finished(o.record)
        self._wake.set()

    def _virtual_in_use(self) -> bool:
        v = self.node.cfg.virtual
        return any(
            t.state is TunnelState.ACTIVE and t.outbound.src == v
            for t in self.node.engine.tunnels()
        )

    def _move_virtual_address(self, rec: Record) -> None:
        """Indirect identity on a real link: the virtual address follows the SAs.

        The new owner claims it (address + gratuitous ARP) as it activates; the old one lets go
        only after ``forward_ms``, so that what neighbours still send it meanwhile is received
        and forwarded, not lost. ``ip`` runs off the event loop."""
        cfg = self.node.cfg
        if cfg.virtual is None or cfg.virtual_interface is None:
            return
        from . import vip

        loop = asyncio.get_running_loop()
        if rec.role in ("target", "standby") and rec.outcome in ("committed", "took over"):
            if self._release_timer is not None:
                self._release_timer.cancel()
                self._release_timer = None
            self._vip_job(vip.claim, "virtual-address-claimed")
        elif (
            rec.role == "source"
            and rec.outcome in ("committed", "partial")
            and not self._virtual_in_use()
            and self._release_timer is None
        ):
            self._release_timer = loop.call_later(
                self.tcfg.settings.forward_time, self._release_virtual_address
            )

    def _release_virtual_address(self) -> None:
        from . import vip

        self._release_timer = None
        if not self._virtual_in_use():
            self._vip_job(vip.release, "virtual-address-released")

    def _vip_job(self, fn: Callable[[IPAddress, str], None], what: str) -> None:
        cfg = self.node.cfg
        assert cfg.virtual is not None and cfg.virtual_interface is not None
        address, interface = cfg.virtual, cfg.virtual_interface

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

    def _finished(self, rec: Record) -> None:
        self._move_virtual_address(rec)
        event(
            log,
            "transfer-" + rec.outcome.replace(" ", "-"),
            node=self.node.name,
            role=rec.role,
            peer=rec.peer,
            id=f"{rec.transfer_id:016x}",
            tunnels=rec.tunnels,
            accepted=rec.accepted,
            ms=f"{(rec.ended - rec.started) * 1000:.3f}",
            detail=rec.detail,
        )
        fut = self.waiters.pop(rec.transfer_id, None)
        if fut is not None and not fut.done():
            fut.set_result(rec)
        for cb in self.listeners:
            cb(rec)

    def _on_message(self, peer: str, msg: cxtp.Message) -> None:
        spec = self.tcfg.peers[peer]
        now = self.node.clock()
        if isinstance(msg, cxtp.CTAR):
            self.run(self._ctar(msg, now, via=peer))
            return
        if (
            isinstance(msg, cxtp.CTD)
            and len(msg.cdbs) >= 2
            and cxtp.cdb_fpt(msg.cdbs[1]) == FPT_SYNC
        ):
            if self.standby is None or self.failover is None or peer != self.failover.peer:
                self.core.counters["refused"] += 1
                return
            try:
                self.standby.receive(msg, now)
            except cxtp.CxtpError as exc:
                event(log, "sync-malformed", logging.WARNING, node=self.node.name, error=str(exc))
            return
        self.run(
            self.core.receive(
                peer, msg, now, may_send="send" in spec.allow, may_request="request" in spec.allow
            )
        )

    def _on_lost(self, peer: str) -> None:
        if self.replicator is not None and self.failover is not None and peer == self.failover.peer:
            self.replicator.resync()  # the standby may have missed syncs: send it everything
        self.run(self.core.peer_lost(peer, self.node.clock()))

    def _on_held(self, held: Held) -> None:
        if not self.core.hold(held):
            self.node.engine.stats.drops["policy"] += 1

    def _on_forward(self, fwd: Forward) -> None:
        self.run(self.core.forward(fwd.peer, fwd.packet, fwd.inbound))

    async def _timers(self) -> None:
        while True:
            d = self.core.next_deadline()
            now = self.node.clock()
            wait = 0.05 if d is None else max(0.0, min(0.05, d - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self.run(self.core.tick(self.node.clock()))
            self._wake.clear()

    # -- load balancing by the gateway itself -----------------------------------------
    async def _balance_loop(self, b: Balance) -> None:
        while True:
            await asyncio.sleep(b.interval)
            active = [t for t in self.node.engine.tunnels() if t.state is TunnelState.ACTIVE]
            excess = min(len(active) - b.above, b.batch)
            if excess <= 0 or self.core.in_progress():
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
                await self.transfer(
                    [t.outbound.spi for t in active[:excess]], b.to, timeout=max(5.0, excess * 0.01)
                )
            except IpsecctError as exc:
                event(log, "rebalance-failed", logging.WARNING, node=self.node.name, error=str(exc))

    # -- fail-over ---------------------------------------------------------------------
    async def _failover_loop(self) -> None:
        assert self.failover is not None
        period = self.failover.tick_ms / 1000
        while True:
            await asyncio.sleep(period)
            now = self.node.clock()
            if self.replicator is not None:
                for m in self.replicator.poll(now):
                    self.channels.send(self.failover.peer, m)
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
        self.core.records.append(rec)
        self._finished(rec)
        return rec

    def _failover_status(self) -> dict[str, Any]:
        assert self.failover is not None
        if self.replicator is not None:
            return {
                "role": "active",
                "peer": self.failover.peer,
                "messages": self.replicator.messages,
                "contexts": self.replicator.contexts,
                "unreplicable": self.replicator.unreplicable,
            }
        if self.standby is not None:
            now = self.node.clock()
            heard = self.standby.last_heard
            return {
                "role": "standby",
                "peer": self.failover.peer,
                "replicated_tunnels": len(self.standby.replica),
                "last_heard_ms_ago": None if heard is None else round((now - heard) * 1000),
            }
        return {"role": "took over", "peer": self.failover.peer}

    # -- reactive mode: CTAR ----------------------------------------------------------
    def _on_outer_message(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """A non-ESP message on the outer UDP port: an MN's CTAR (RFC 4067) for us."""
        try:
            msg = cxtp.decode(data)
        except cxtp.CxtpError:
            return False
        if not isinstance(msg, cxtp.CTAR):
            return False
        self.run(self._ctar(msg, self.node.clock(), via=None))
        return True

    def _ctar(self, msg: cxtp.CTAR, now: float, via: str | None) -> list[Output]:
        """An MN (or, for ``transfer --mode reactive``, the source on its behalf) asks us to
        fetch its contexts from the router named in the CTAR: send that router a CT-Req."""
        peer = via
        if peer is None:
            for p in self.tcfg.peers.values():
                if p.outer == msg.router or (p.outer is None and p.address.host == msg.router):
                    peer = p.name
                    break
        if peer is None or "send" not in self.tcfg.peers[peer].allow:
            event(
                log,
                "ctar-refused",
                logging.WARNING,
                node=self.node.name,
                router=msg.router,
                reason="router is not a peer that may send contexts",
            )
            return []
        _tid, out = self.core.request(peer, msg.mn_prev, msg.token, msg.seq, now)
        return out

    # -- operator commands ----------------------------------------------------------
    async def transfer(
        self, spis: list[int], to: str, *, mode: str = "predictive", timeout: float = 5.0
    ) -> Record:
        if to not in self.tcfg.peers:
            raise TransferError(f"unknown peer {to!r} (known: {', '.join(self.tcfg.peers)})")
        tunnels = []
        seen: set[int] = set()
        for spi in spis:
            t = self.node.engine.tunnel_by_spi(spi)
            if t is None or t.state is TunnelState.MOVED:
                raise TransferError(f"no tunnel with SPI 0x{spi:08x} here")
            if id(t) not in seen:
                seen.add(id(t))
                tunnels.append(t)
        now = self.node.clock()
        if mode == "reactive":
            # Ask the target to pull, exactly as an MN's CTAR would (with a valid token).
            t = tunnels[0]
            seq = int(time.time() * 1000) & 0xFFFFFFFF
            mn = t.outbound.dst
            token = cxtp.compute_token(token_key(t), mn, seq)
            fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()

            def watch(rec: Record) -> None:
                if rec.role == "source" and set(rec.spis) & set(spis) and not fut.done():
                    fut.set_result(rec)

            self.listeners.append(watch)
            try:
                self.channels.send(to, cxtp.CTAR(mn, self.node.cfg.outer.host, seq, token))
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise TransferError(
                    f"{to} did not pull the contexts within {timeout:g} s"
                ) from None
            finally:
                self.listeners.remove(watch)
        if mode != "predictive":
            raise TransferError("mode must be predictive or reactive")
        tid, out = self.core.start(
            tunnels, to, now, candidates=[c for c in self.tcfg.candidates if c != to]
        )
        fut2: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self.waiters[tid] = fut2
        self.run(out)
        try:
            return await asyncio.wait_for(fut2, timeout)
        except TimeoutError:
            raise TransferError("transfer did not finish in time") from None

    async def rebalance(self, to: str, count: int, timeout: float = 60.0) -> Record:
        spis = [
            t.outbound.spi for t in self.node.engine.tunnels() if t.state is TunnelState.ACTIVE
        ][:count]
        if not spis:
            raise TransferError("no tunnels to move")
        return await self.transfer(spis, to, timeout=timeout)

    def _peers_status(self) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "address": str(p.address),
                "allow": sorted(p.allow),
                "connected": p.name in self.channels.conns,
            }
            for p in self.tcfg.peers.values()
        ]

    def _transfers_status(self) -> dict[str, Any]:
        recent = list(self.core.records)[-20:]
        return {
            "in_progress": self.core.in_progress(),
            "recent": [r.as_dict() for r in recent],
            **self.core.counters,
            "refused_connections": self.channels.refused,
        }


class MobileAgent:
    """The MN's side: applies signals from its gateway and can send a CTAR (reactive)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.applied: list[tuple[float, list[str]]] = []
        self.rejected = 0
        node.on_signal = self._on_signal

    def _on_signal(self, sig: Signal, addr: tuple[Any, ...]) -> None:
        try:
            items = signalling.decode(sig.payload)
            changes = signalling.apply(self.node.engine, sig.sa, items)
        except signalling.SignalError as exc:
            self.rejected += 1
            event(log, "signal-rejected", logging.WARNING, node=self.node.name, error=str(exc))
            return
        self.applied.append((self.node.clock(), changes))
        event(
            log,
            "gateway-changed",
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


# -- attaching to a running service --------------------------------------------------------
def attach(service: Any) -> Any:
    from .control import ControlError

    node: Node = service.node
    if node.role == "node":
        service.agent = MobileAgent(node)
        return None
    tcfg = parse_config(service.cfg)
    if tcfg is None:
        return None
    ts = TransferService(node, tcfg)
    service.transfer = ts
    service.cleanups.append(ts.stop)

    async def do_transfer(args: dict[str, Any]) -> Any:
        spi = args.get("spi")
        to = args.get("to")
        if not isinstance(to, str):
            raise ControlError("say where to: --to PEER")
        try:
            spi_i = int(spi, 0) if isinstance(spi, str) else int(spi)  # type: ignore[arg-type]
            rec = await ts.transfer([spi_i], to, mode=str(args.get("mode", "predictive")))
        except (TypeError, ValueError):
            raise ControlError(f"bad SPI {spi!r}") from None
        return rec.as_dict()

    async def do_rebalance(args: dict[str, Any]) -> Any:
        to, count = args.get("to"), args.get("count")
        if not isinstance(to, str) or not isinstance(count, int) or count <= 0:
            raise ControlError("rebalance needs --to PEER and --count N > 0")
        return (await ts.rebalance(to, count)).as_dict()

    if service.control is not None:
        service.control.register("transfer", do_transfer)
        service.control.register("rebalance", do_rebalance)
    return ts.start()

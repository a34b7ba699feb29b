"""Context transfer for one running gateway: the asyncio side of
:class:`~ipsecct.ct.transfer.TransferCore` (transfer, rebalance, reactive CTAR).

All protocol decisions are in the core; this adapter feeds it the CXTP messages that arrive on
the peer channels (:mod:`ipsecct.gateway.peers`), the packets the engine holds or forwards, the
CTARs that arrive on the outer UDP port, and timer ticks, and carries out what the core asks
(send a message, inject a packet, transmit a signal, report a finished transfer).

Configuration: ``[transfer]`` and ``[[peers]]`` (see :mod:`ipsecct.gateway.config` and the
README).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..ct import cxtp
from ..ct.transfer import (
    FPT_FORWARD,
    After,
    Aftermath,
    Finished,
    Inject,
    Output,
    Prepared,
    Record,
    Send,
    TransferCore,
    Transmit,
    token_key,
)
from ..errors import ControlError, CxtpError, TransferError
from ..ipsec import relay
from ..ipsec.engine import Forward, Held, Tunnel, TunnelState
from ..ipsec.ippacket import IPAddress
from ..ipsec.sad import Direction, Protocol
from . import gcpolicy
from .config import TransferConfig
from .control import parse_proto, parse_spi, parse_transfer_id, spi_hint, spi_number
from .limits import TRANSFER_TIMEOUT_LIMIT
from .log import RateLimited, event
from .node import Node
from .peers import PeerChannels

log = logging.getLogger("ipsecct.ct.transfer")

CPU_STAMPS = 64  # finished records whose CPU stamp transfer.wait can still give
WAIT_LIMIT = 60.0  # seconds a transfer.wait may hold its control connection

UNCAPPED = 1 << 64  # a tunnel's transfer_cap when no transfer caps it (engine.Tunnel)
GC_CHECK_INTERVAL = 1.0  # seconds between the collector policy's checks (gcpolicy.maintain)
# Loop turns an activation's aftermath waits, at most, for a read from a peer whose delivery
# is queued (the packets forwarded behind the COMMIT): TransferService._aftermath_turn.
AFTERMATH_TURNS = 2


def set_up_relays(node: Node, tcfg: TransferConfig) -> list[str]:
    """Where a moved tunnel's MN's ESP is relayed (ipsec/relay.py): each peer with ``outer``
    and ``outer_port``, all relays together at most ``relay_max_rate`` a second. The peers
    without (their outer port is not guessed: 4500 is only a default, and a wrong guess
    would lose the MN's ESP after the cut where the channel delivers it) are named in one
    WARNING line, and returned: their tunnels' ESP after the cut goes over the TLS channel,
    behind the COMMIT, from the event loop."""
    for p in tcfg.peers.values():
        if p.outer is not None and p.outer_port is not None:
            node.engine.relay_to[p.name] = (p.outer, p.outer_port)
    rate = tcfg.relay_max_rate  # all relays together
    node.engine.relay_cap_limits = (rate, relay.cap_burst(rate))
    without = sorted(n for n in tcfg.peers if n not in node.engine.relay_to)
    if without:
        event(log, "peers-not-relayed", logging.WARNING, node=node.name,
              peers=",".join(without),
              hint="set outer and outer_port in their [[peers]] entries to relay the MN's ESP"
                   " after a transfer's cut (else it goes over the TLS channel)")  # fmt: skip
    return without


class TransferService:
    """Context transfer for one running gateway."""

    def __init__(self, node: Node, tcfg: TransferConfig, channels: PeerChannels) -> None:
        self.node = node
        self.tcfg = tcfg
        self.channels = channels
        self.core = TransferCore(
            node.engine, node.cfg.outer, tcfg.settings
        )
        self.waiters: dict[int, asyncio.Future[Record]] = {}
        # Prepared transfers (``transfer --prepare``) waiting to be ready.
        self.prepare_waiters: dict[int, asyncio.Future[Record]] = {}
        # Called with every finished transfer or take-over (the virtual-address mover, the
        # demo, tests).
        self.listeners: list[Callable[[Record], None]] = []
        # Called with the SPIs of every transfer this gateway starts as its source (the IKE
        # service quietens their IKE SAs until the transfer ends).
        self.starting: list[Callable[[set[int]], None]] = []
        # What ``ipsecct transfer NAME`` moves: the inbound SPIs of the CHILD SAs of the IKE SA
        # a connection name, an IKE SPI or a CHILD SPI names (the IKE service), None if none.
        self.unit_of: Callable[[str], list[int] | None] | None = None
        # The same for a tunnel an SPI with --dst or --proto names (the IKE service): the
        # inbound SPIs of its IKE SA's CHILD SAs when a CHILD SA holds it, else None.
        self.unit_of_tunnel: Callable[[Tunnel], list[int] | None] | None = None
        # The outbound SPIs of the other CHILD SAs of a CHILD SA's IKE SA (the IKE service):
        # a rebalance moves whole IKE SAs.
        self.siblings_of: Callable[[int], list[int]] | None = None
        # Waits until the IKE SAs of the tunnels about to move have no exchange of ours in
        # flight (the IKE service), and says which tunnels to move then (a rekey that
        # completed meanwhile replaced some CHILD SAs).
        self.quiesce: Callable[[list[Tunnel]], Awaitable[list[Tunnel]]] | None = None
        self.core.on_start = self._started
        self.core.on_unresolved = self._unresolved
        self.core.on_foreign = self._foreign
        self._next_gc = 0.0
        node.on_held = self._on_held
        # Others that hold packets (fail-over fencing): each says whether it kept one.
        self.hold_hooks: list[Callable[[Held], bool]] = []
        # After a restart: (transfer id, peer, tunnels) recorded leaving, whose outcome this
        # gateway does not know: the peer is asked once the service starts.
        self.unresolved: list[tuple[int, str, list[Tunnel]]] = []
        self.unresolved_ages: dict[int, float] = {}  # their age (AGE in the query)
        node.on_forward = self._on_forward
        set_up_relays(node, tcfg)
        node.outer_hooks.append(self._on_outer_message)
        node.extensions["peers"] = self._peers_status
        node.extensions["transfers"] = self._transfers_status
        self._quiet = RateLimited()
        self._cpu_at: dict[int, tuple[Record, float]] = {}
        # The aftermath of the activations of this loop turn (ct.transfer.Aftermath: the
        # "taken over" rows, the finished records), carried out once the packets waiting for
        # their tunnels have left, and before any other input reaches the core
        # (flush_aftermath).
        self._aftermath: list[Output] = []
        self._aftermath_due = False

    async def start(self) -> None:
        self.node.timers.add("transfer", self.core.next_deadline, self._on_timer)
        self._next_gc = self.node.clock() + GC_CHECK_INTERVAL
        self.node.timers.add("gc", lambda: self._next_gc, self._on_gc_timer)
        if self.unresolved:
            recall, self.unresolved = self.unresolved, []
            self.run(
                self.core.recall_unresolved(recall, self.node.clock(), self.unresolved_ages)
            )

    async def stop(self) -> None:
        self.flush_aftermath()
        self.node.timers.remove("transfer")
        self.node.timers.remove("gc")

    def _on_gc_timer(self, now: float) -> None:
        """The collector's sweep, when due and no transfer is in progress (gcpolicy)."""
        self._next_gc = now + GC_CHECK_INTERVAL
        gcpolicy.POLICY.maintain(busy=self.core.in_progress() > 0)

    def _on_timer(self, now: float) -> None:
        self.flush_aftermath()
        self.run(self.core.handle_timer(now))

    def _started(self, spis: set[int]) -> None:
        for cb in list(self.starting):
            cb(spis)

    # -- plumbing ------------------------------------------------------------------------
    def run(self, outputs: list[Output]) -> None:
        batch: list[cxtp.Message] = []
        activated = False
        for i, o in enumerate(outputs):
            if isinstance(o, Send):
                # Messages that follow each other to one peer go in one write (a FINAL and
                # its COMMIT: one TLS record): sent with the last of them.
                batch.append(o.msg)
                nxt = outputs[i + 1] if i + 1 < len(outputs) else None
                if isinstance(nxt, Send) and nxt.peer == o.peer:
                    continue
                if len(batch) == 1:
                    self.channels.send(o.peer, o.msg)
                else:
                    self.channels.send_many(o.peer, batch)
                batch = []
            elif isinstance(o, Inject):
                if o.inbound:
                    self.node.from_outer(o.packet, ())
                else:
                    self.node.from_inner(o.packet)
            elif isinstance(o, Transmit):
                self.node.send_esp(o.sa, o.data)
            elif isinstance(o, Finished):
                self.finished(o.record)
                fut = self.prepare_waiters.pop(o.record.transfer_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(o.record)  # (it failed before it was ready)
            elif isinstance(o, Prepared):
                self._prepared(o.record)
            elif isinstance(o, After):
                o.run()
            elif isinstance(o, Aftermath):
                self._aftermath += o.outputs
                activated = True
        if activated:
            self._activated()
        self.node.timers.poke()  # a new exchange, a retry or a time-out may have moved

    # -- the target's activation: the waiting packets first, then the aftermath ----------
    def _activated(self) -> None:
        """A COMMIT activated tunnels here (their inbound SAs in C, their signals out, their
        held packets in): what the forwarding thread handed up so far goes now (the MN's
        packets that reached this gateway before C had the inbound SA, waiting in the
        thread's queue for the eventfd's turn), and the aftermath waits for the end of the
        next loop turn: the FORWARDs behind the COMMIT in the same read come next in this
        delivery, those read in the next turn have theirs queued before the aftermath's
        turn (call_later(0) runs after that turn's I/O callbacks) and, once delivered, go
        first too (_aftermath_turn)."""
        self.node.drain_native()
        if self._aftermath_due or not self._aftermath:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (no loop: nothing can come in between)
            self.flush_aftermath()
            return
        self._aftermath_due = True
        loop.call_later(0, self._aftermath_turn, 0)

    def _aftermath_turn(self, turns: int) -> None:
        if not self._aftermath_due:
            return  # carried out already (an input came first)
        if turns < AFTERMATH_TURNS and self.channels.delivery_due():
            # a read from a peer waits for its delivery (queued before us): after it
            asyncio.get_running_loop().call_soon(self._aftermath_turn, turns + 1)
            return
        self.flush_aftermath()

    def flush_aftermath(self) -> None:
        """Carry out the activations' aftermath now, if any waits (before any input other
        than packets reaches the core, and before any other journal write: the gateway calls
        it first for each)."""
        self._aftermath_due = False
        if self._aftermath:
            out, self._aftermath = self._aftermath, []
            self.run(out)

    def on_settled(self) -> None:
        """Journal writes (gateway/state.py) were settled: what waited for them goes on."""
        self.flush_aftermath()
        self.run(self.core.settled(self.node.clock()))

    def _unresolved(self, tid: int, peer: str, tunnels: int, why: str) -> None:
        """The COMMIT went out before the answer (commit what you accept) and the answer
        was lost: the operator is told that these tunnels are served by nobody here until
        the peer answers the decision query."""
        event(
            log, "transfer-outcome-unknown", logging.WARNING, node=self.node.name, peer=peer,
            id=f"{tid:016x}", tunnels=tunnels, why=why,
            effect="not sent on here until the peer answers (asked every retry)",
        )  # fmt: skip

    def _prepared(self, rec: Record) -> None:
        """A prepared transfer is ready: only its COMMIT is left (``transfer --commit``)."""
        event(
            log, "transfer-prepared", node=self.node.name, peer=rec.peer,
            id=f"{rec.transfer_id:016x}", tunnels=rec.tunnels, accepted=rec.accepted,
            ms=f"{(self.node.clock() - rec.started) * 1000:.3f}",
        )  # fmt: skip
        fut = self.prepare_waiters.pop(rec.transfer_id, None)
        if fut is not None and not fut.done():
            fut.set_result(rec)

    def ike_request_held(self, spis: set[int]) -> None:
        """The MN's IKE request is held on a quiet IKE SA whose CHILD SAs (``spis``) are in
        a prepared transfer: the request must be answered (its retransmissions would
        otherwise come every few seconds for up to prepare_timeout), so the preparation is
        rolled back and the request processed here (docs/ikev2.md)."""
        self.flush_aftermath()
        self.run(self.core.cancel_prepared(
            spis, self.node.clock(), "the MN's IKE request must be answered here"))  # fmt: skip

    def _foreign(self, peer: str, kind: str, tid: int, whose: str) -> None:
        """A message about a transfer that is not this peer's (or a FORWARD for no tunnel
        it moved here just now): dropped by the core and counted; one line, rate-limited
        per peer and kind (a hostile peer cannot flood the log with them)."""
        extra: dict[str, Any] = {}
        if kind == "query" and whose:
            extra["hint"] = (f"if {peer} is the fail-over pair of {whose}, say so:"
                             f" pair = {whose!r} in its [[peers]] entry")  # fmt: skip
        self._quiet.event(
            log, "cxtp-not-its-transfer", logging.WARNING, key=f"{peer}/{kind}",
            node=self.node.name, peer=peer, kind=kind, id=f"{tid:016x}",
            transfer_of=whose or "-", effect="dropped", **extra,
        )  # fmt: skip

    def report(self, rec: Record) -> None:
        """A record from outside the core (a fail-over take-over): listed and announced like
        a transfer's."""
        self.flush_aftermath()
        self.core.records.append(rec)
        self.finished(rec)

    def finished(self, rec: Record) -> None:
        fields: dict[str, Any] = {
            "node": self.node.name,
            "role": rec.role,
            "peer": rec.peer,
            "id": f"{rec.transfer_id:016x}",
            "tunnels": rec.tunnels,
            "accepted": rec.accepted,
            "ms": f"{(rec.ended - rec.started) * 1000:.3f}",
            "detail": rec.detail,
        }
        name = "transfer-" + rec.outcome.replace(" ", "-")
        if rec.role == "target" and rec.outcome == "refused":
            # What a peer sends us that we refuse costs it a message each: rate-limited per
            # peer (suppressed=N on the next line), as the other lines a peer can cause.
            self._quiet.event(log, name, logging.INFO, key=rec.peer, **fields)
        else:
            event(log, name, **fields)
        # The event loop's CPU time when the record finished (``transfer.wait``: what a
        # handover cost this gateway, against a ``clock`` read before it started).
        self._cpu_at[id(rec)] = (rec, time.thread_time())
        while len(self._cpu_at) > CPU_STAMPS:
            del self._cpu_at[next(iter(self._cpu_at))]
        # (only a transfer of ours has a waiter: a peer's transfer towards us that it gave
        # the same id, refused here, must not answer our own transfer command)
        fut = self.waiters.pop(rec.transfer_id, None) if rec.role == "source" else None
        if fut is not None and not fut.done():
            fut.set_result(rec)
        for cb in list(self.listeners):
            cb(rec)

    def receive(self, peer: str, msg: cxtp.Message) -> None:
        """A CXTP message from a peer gateway (fail-over syncs are not for us)."""
        spec = self.tcfg.peers[peer]
        now = self.node.clock()
        if not forwarded_packet(msg):  # (a forwarded packet may come before the aftermath)
            self.flush_aftermath()
        if isinstance(msg, cxtp.CTAR):
            self.run(self._ctar(msg, now, via=peer, source=f"peer {peer}"))
            return
        # One message may decode and install up to 1,024 contexts: the collector waits, and
        # a bulk install's new objects are frozen (see gcpolicy).
        with gcpolicy.POLICY.batch():
            out = self.core.receive(
                peer, msg, now, may_send="send" in spec.allow, may_request="request" in spec.allow
            )
        self.run(out)

    def refuse(self) -> None:
        """A message this gateway does not take from that peer (counted)."""
        self.core.counters["refused"] += 1

    def peer_lost(self, peer: str) -> None:
        self.flush_aftermath()
        self.run(self.core.peer_lost(peer, self.node.clock()))

    def _on_held(self, held: Held) -> None:
        if self.core.hold(held):
            return
        if any(hook(held) for hook in self.hold_hooks):  # e.g. fail-over fencing
            return
        self.node.engine.stats.drops["policy"] += 1

    def _on_forward(self, fwd: Forward) -> None:
        self.run(self.core.forward(fwd.peer, fwd.packet, fwd.inbound))

    # -- reactive mode: CTAR ----------------------------------------------------------
    def _on_outer_message(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """A non-ESP message on the outer UDP port: an MN's CTAR (RFC 4067) for us."""
        try:
            msg = cxtp.decode(data)
        except CxtpError:
            return False
        if not isinstance(msg, cxtp.CTAR):
            return False
        self.flush_aftermath()
        source = str(addr[0]) if addr else "?"
        self.run(self._ctar(msg, self.node.clock(), via=None, source=source))
        return True

    def _ctar(self, msg: cxtp.CTAR, now: float, via: str | None, source: str) -> list[Output]:
        """An MN (or, for ``transfer --mode reactive``, the source on its behalf) asks us to
        fetch its contexts from the router named in the CTAR: send that router a CT-Req,
        within the core's limits (CT_REQUEST_RATE per source and MN, per peer). Refusals are
        counted; their log lines are rate-limited (forged CTARs cost little and come in
        floods)."""
        peer = via
        if peer is None:
            for p in self.tcfg.peers.values():
                if p.outer == msg.router or (p.outer is None and p.address.host == msg.router):
                    peer = p.name
                    break
        why: str | None
        out: list[Output] = []
        if peer is None or "send" not in self.tcfg.peers[peer].allow:
            self.core.counters["refused"] += 1
            why = "router is not a peer that may send contexts"
        else:
            why, out = self.core.ctar(peer, msg, source, now)
        if why is not None:
            self._quiet.event(
                log,
                "ctar-refused",
                logging.WARNING,
                key=why,
                node=self.node.name,
                source=source,
                router=msg.router,
                reason=why,
            )
        return out

    def _tunnel_named(self, spi: int, direction: Direction | None, dst: IPAddress | None,
                      proto: Protocol | None = None) -> Tunnel | None:  # fmt: skip
        """The one tunnel not MOVED here with an SA of ``spi`` (of ``direction``, to
        ``dst``, of ``proto``, when given); None if none; TransferError naming each SA if
        more than one (a tunnel's two SAs with one SPI are one tunnel named)."""
        eng = self.node.engine
        named: dict[int, Tunnel] = {}
        sas = []
        for sa in eng.find_sa(spi):
            if ((direction is not None and sa.direction is not direction)
                    or (dst is not None and sa.dst != dst)
                    or (proto is not None and sa.protocol is not proto)):  # fmt: skip
                continue
            t = eng.tunnel_of(sa)
            if t is None or t.state is TunnelState.MOVED:
                continue
            named[id(t)] = t
            sas.append(sa)
        if len(named) > 1:
            each = ", ".join(f"{sa.protocol.name} {sa.direction.value} to {sa.dst}"
                             f" ({sa.name or 'no name'})" for sa in sas)  # fmt: skip
            raise TransferError(f"SPI 0x{spi:08x} names {len(sas)} SAs of {len(named)} tunnels"
                                f" here ({each}): a peer chooses our outbound SAs' SPIs, and"
                                " may choose another's; name one by its destination as well"
                                " (--dst ADDR; and --proto esp|ah, for an ESP and an AH SA to"
                                " one destination; see ipsecct sa list)")  # fmt: skip
        return next(iter(named.values()), None)

    # -- operator commands ----------------------------------------------------------
    async def transfer(
        self,
        spis: list[int],
        to: str,
        *,
        mode: str = "predictive",
        timeout: float = 5.0,
        limit: float | None = None,
        prepare: bool = False,
        direction: Direction | None = None,
        dst: IPAddress | None = None,
        proto: Protocol | None = None,
    ) -> Record:
        """Move the tunnels of ``spis`` to ``to`` and return the transfer's record. Without
        ``limit`` the wait is the protocol's own deadlines (at least ``timeout``); with it
        (the operator's ``--timeout``) a transfer still waiting for the target then is rolled
        back (outcome "timeout"), and one past its COMMIT is a TransferError (it ends by
        itself; status shows it). ``spis`` are of SAs of ``direction`` (either, if None),
        to ``dst`` and of ``proto`` (any, if None): an SPI that names SAs of more than one
        tunnel then (a peer chooses our outbound SAs' SPIs, another tunnel's among them) is
        a TransferError naming them, nothing moved."""
        if to not in self.tcfg.peers:
            raise TransferError(f"unknown peer {to!r} (known: {', '.join(self.tcfg.peers)})")
        if prepare and mode != "predictive":  # (a reactive one would move them at once)
            raise TransferError("--prepare is for predictive transfers only")
        tunnels = []
        seen: set[int] = set()
        for spi in spis:
            t = self._tunnel_named(spi, direction, dst, proto)
            if t is None:
                raise TransferError(f"no {proto.name + ' ' if proto else ''}tunnel with SPI"
                                    f" 0x{spi:08x}" + (f" to {dst}" if dst is not None else "")
                                    + " here")  # fmt: skip
            if id(t) not in seen:
                seen.add(id(t))
                tunnels.append(t)
        now = self.node.clock()
        if mode == "reactive":
            # Ask the target to pull, exactly as an MN's CTAR would (with a valid token).
            t = tunnels[0]
            mn = t.outbound.dst
            seq = self.core.next_ctar_seq(mn)
            token = cxtp.compute_token(token_key(t), mn, seq)
            fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()

            def watch(rec: Record) -> None:
                if rec.role == "source" and set(rec.spis) & set(spis) and not fut.done():
                    fut.set_result(rec)

            self.listeners.append(watch)
            wait_r = timeout if limit is None else limit
            try:
                self.channels.send(to, cxtp.CTAR(mn, self.node.cfg.outer.host, seq, token))
                return await asyncio.wait_for(fut, wait_r)
            except TimeoutError:
                raise TransferError(
                    f"{to} did not pull the contexts within {wait_r:g} s"
                ) from None
            finally:
                self.listeners.remove(watch)
        if mode != "predictive":
            raise TransferError("mode must be predictive or reactive")
        if self.quiesce is not None:
            tunnels = await self.quiesce(tunnels)
            now = self.node.clock()
        self.flush_aftermath()
        with gcpolicy.POLICY.batch():  # encodes every context of the transfer
            tid, out = self.core.start(
                tunnels, to, now, candidates=[c for c in self.tcfg.candidates if c != to],
                prepare=prepare,
            )
        fut2: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self.waiters[tid] = fut2
        if prepare:
            # Answered once it is ready (the record, outcome "in progress") or failed.
            ready: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
            self.prepare_waiters[tid] = ready
            self.run(out)
            wait_p = self.core.settings.max_transfer_time * max(1, len(out)) + 1.0
            wait_p = max(timeout, wait_p) if limit is None else limit
            try:
                return await asyncio.wait_for(asyncio.shield(ready), wait_p)
            except TimeoutError:
                if self.core.prepared(tid):
                    return self.core.outgoing[tid].record
                self.flush_aftermath()
                with contextlib.suppress(TransferError):
                    self.run(self.core.cancel(tid, self.node.clock(),
                                              f"not prepared within {wait_p:g} s"))  # fmt: skip
                if fut2.done():
                    return fut2.result()
                raise TransferError(
                    f"transfer {tid:016x} was not prepared in {wait_p:g} s"
                ) from None
            finally:
                self.prepare_waiters.pop(tid, None)
        self.run(out)
        # The core ends every transfer by its own deadlines (CT_MAX_TRANSFER_TIME per
        # message, then each other candidate in turn): wait for that, not less, so that
        # the answer is the outcome and not "still running" (a short wait said "did not
        # finish" for a transfer that then committed).
        own = (self.core.settings.max_transfer_time * max(1, len(out)) + 1.0) * (
            1 + len(self.tcfg.candidates)
        )
        wait = max(timeout, own) if limit is None else limit
        try:
            return await asyncio.wait_for(asyncio.shield(fut2), wait)
        except TimeoutError:
            if limit is not None:
                self.flush_aftermath()
                self.run(self.core.abandon(tid, self.node.clock(),
                                           f"no outcome within --timeout {limit:g} s"))  # fmt: skip
                if fut2.done():  # rolled back: the tunnels are served here again
                    return fut2.result()
            raise TransferError(
                f"transfer {tid:016x} has no outcome after {wait:g} s; it goes on"
                " (ipsecct status shows it)"
            ) from None

    async def commit(self, tid: int, timeout: float = 5.0) -> Record:
        """``transfer --commit ID``: send a prepared transfer's FINAL and COMMIT now (or as
        soon as it is ready); the transfer's record once it has an outcome."""
        fut = self.waiters.get(tid)
        ours = fut is None  # (else the transfer command's, or an earlier commit's, waiter)
        if fut is None:
            fut = self.waiters[tid] = asyncio.get_running_loop().create_future()
        self.flush_aftermath()
        try:
            self.run(self.core.commit(tid, self.node.clock()))
        except TransferError:
            if ours and self.waiters.get(tid) is fut:
                del self.waiters[tid]
            raise
        wait = max(timeout, self.core.settings.max_transfer_time + 1.0)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait)
        except TimeoutError:
            raise TransferError(
                f"transfer {tid:016x} has no outcome after {wait:g} s; it goes on"
                " (ipsecct status shows it)"
            ) from None

    def cancel(self, tid: int) -> Record:
        """``transfer --cancel ID``: roll a prepared transfer back (its tunnels stay here)."""
        self.flush_aftermath()
        out = self.core.cancel(tid, self.node.clock())
        rec = next(o.record for o in out if isinstance(o, Finished))
        self.run(out)
        return rec

    async def rebalance(
        self, to: str, count: int, timeout: float = 60.0, limit: float | None = None
    ) -> Record:
        # (not one sending below a transfer's cap: a prepared transfer's, active until its
        # commit, made the whole rebalance fail as busy)
        spis = [
            t.outbound.spi for t in self.node.engine.tunnels()
            if t.state is TunnelState.ACTIVE and t.transfer_cap == UNCAPPED
        ][:count]  # fmt: skip
        if not spis:
            raise TransferError("no tunnels to move")
        if self.siblings_of is not None:
            # Whole IKE SAs: the other CHILD SAs of a chosen one's IKE SA go too (a few more
            # than ``count`` when the last IKE SA's CHILD SAs straddle it).
            chosen = set(spis)
            for spi in list(spis):
                for s in self.siblings_of(spi):
                    t = self.node.engine.tunnel_by_spi(s)
                    if (s not in chosen and t is not None and t.state is TunnelState.ACTIVE
                            and t.transfer_cap == UNCAPPED):  # fmt: skip
                        chosen.add(s)
                        spis.append(s)
        return await self.transfer(spis, to, timeout=timeout, limit=limit,
                                   direction=Direction.OUTBOUND)  # fmt: skip

    # -- control socket ---------------------------------------------------------------
    async def control_transfer(self, args: dict[str, Any]) -> Any:
        """``ipsecct transfer``: move one tunnel (by SPI) to a peer."""
        spi = args.get("spi")
        to = args.get("to")
        if not isinstance(to, str):
            raise ControlError("say where to: --to PEER")
        dst = _dst(args)
        proto = parse_proto(args.get("proto"))
        spis: list[int] | None = None
        direction: Direction | None = None
        if self.unit_of is not None and isinstance(spi, str) and dst is None and proto is None:
            try:
                spis = self.unit_of(spi)
            except ValueError as exc:
                raise ControlError(str(exc)) from None
            direction = Direction.INBOUND  # (the unit's CHILD SAs' inbound SPIs, ours)
        if spis is None:
            if isinstance(spi, str) and spi_number(spi) is None:
                raise ControlError(f"no IKE SA, connection or SPI {spi!r} here (an SPI is a"
                                   " number: decimal, or 0x... for hex)")  # fmt: skip
            one = parse_spi(spi)  # a number, 32 bits
            try:
                t = self._tunnel_named(one, None, dst, proto)
            except TransferError as exc:
                raise ControlError(str(exc)) from None
            if t is None:
                raise ControlError(f"no {proto.name + ' ' if proto else ''}tunnel with SPI"
                                   f" 0x{one:08x}"
                                   + (f" to {dst}" if dst is not None else "")
                                   + f" here{spi_hint(spi)}")  # fmt: skip
            unit = self.unit_of_tunnel(t) if self.unit_of_tunnel is not None else None
            if unit is not None:
                # An IKE-keyed CHILD SA named with --dst or --proto (its SPI is another
                # tunnel's too) moves as it does named alone: with its IKE SA and the IKE
                # SA's other CHILD SAs, by their inbound SPIs (ours, never ambiguous). It
                # moved alone: its IKE SA stayed here with the others (ike-sa-stays), the
                # peer's rekeys and DELETEs of it answered by a gateway that no longer had it.
                spis, direction, dst, proto = unit, Direction.INBOUND, None, None
            else:
                spis, direction = [one], None
        prepare = args.get("prepare", False)
        if not isinstance(prepare, bool):
            raise ControlError("prepare must be true or false")
        rec = await self.transfer(
            spis, to, mode=str(args.get("mode", "predictive")), limit=_limit(args),
            prepare=prepare, direction=direction, dst=dst, proto=proto,
        )
        if prepare and rec.outcome == "in progress":
            return {**rec.as_dict(), "outcome": "prepared",
                    "ms": round((self.node.clock() - rec.started) * 1000, 3)}  # fmt: skip
        return rec.as_dict()

    async def control_commit(self, args: dict[str, Any]) -> Any:
        """``transfer.commit``: commit the prepared transfer ``id`` (16 hex digits)."""
        return (await self.commit(_transfer_id(args))).as_dict()

    async def control_cancel(self, args: dict[str, Any]) -> Any:
        """``transfer.cancel``: roll the prepared transfer ``id`` back."""
        return self.cancel(_transfer_id(args)).as_dict()

    async def control_rebalance(self, args: dict[str, Any]) -> Any:
        """``ipsecct rebalance``: move COUNT active tunnels to a peer in one exchange."""
        to, count = args.get("to"), args.get("count")
        if (not isinstance(to, str) or not isinstance(count, int) or isinstance(count, bool)
                or count <= 0):  # fmt: skip
            raise ControlError("rebalance needs --to PEER and --count N > 0")
        # Bounded by what one transfer may carry (a target with the same limit refuses more,
        # after it was all sent) and by the tunnels that can move: a count past them (a typo,
        # 10**100 from a script) moved everything there was without a word.
        most = self.core.settings.max_contexts_per_transfer // 2
        if count > most:
            raise ControlError(f"--count: one transfer carries at most {most} tunnels "
                               "([transfer] max_contexts_per_transfer = "
                               f"{self.core.settings.max_contexts_per_transfer} contexts, 2 a "
                               "tunnel); move more in several rebalances")  # fmt: skip
        movable = sum(1 for t in self.node.engine.tunnels()
                      if t.state is TunnelState.ACTIVE and t.transfer_cap == UNCAPPED)  # fmt: skip
        if movable == 0:
            raise ControlError("no tunnels to move")
        if count > movable:
            raise ControlError(f"--count: more than the {movable} tunnel(s) here that can "
                               "move now (active, in no prepared transfer): see ipsecct sa "
                               "list")  # fmt: skip
        return (await self.rebalance(to, count, limit=_limit(args))).as_dict()

    async def control_wait(self, args: dict[str, Any]) -> Any:
        """``transfer.wait``: the first finished record of ``role`` (source, target or
        standby) that ended at or after ``since`` (this machine's monotonic clock, which
        every process shares), waiting up to ``timeout`` seconds (at most 60) for it. The
        answer is the record as ``ipsecct status`` lists it, with its ``started`` and
        ``ended`` times and the event loop's CPU time when it ended (``cpu_s``). The demo
        times its handover from it."""
        role, since, timeout = args.get("role"), args.get("since", 0.0), args.get("timeout", 0.0)
        if role not in ("source", "target", "standby"):
            raise ControlError("role must be source, target or standby")
        if not isinstance(since, int | float) or not isinstance(timeout, int | float):
            raise ControlError("since and timeout must be numbers (seconds)")
        if not 0 <= timeout <= WAIT_LIMIT:
            raise ControlError(f"timeout must be 0 .. {WAIT_LIMIT:g} s")

        def wanted(rec: Record) -> bool:
            return rec.role == role and rec.outcome != "in progress" and rec.ended >= since

        found = next((r for r in self.core.records if wanted(r)), None)
        if found is None:
            fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()

            def watch(rec: Record) -> None:
                if wanted(rec) and not fut.done():
                    fut.set_result(rec)

            self.listeners.append(watch)
            try:
                found = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise TransferError(
                    f"no {role} record within {timeout:g} s"
                ) from None
            finally:
                self.listeners.remove(watch)
        stamp = self._cpu_at.get(id(found))
        return {
            **found.as_dict(),
            "started": found.started,
            "ended": found.ended,
            "cpu_s": stamp[1] if stamp is not None and stamp[0] is found else None,
        }

    def _peers_status(self) -> list[dict[str, Any]]:
        out = []
        for p in self.tcfg.peers.values():
            state, silent = self.channels.channel_state(p.name)
            out.append({
                "name": p.name,
                "address": str(p.address),
                "allow": sorted(p.allow),
                # open and, for a peer that must answer (the fail-over peer), answering:
                # heard from within its bound (dead_ms); "channel" says which of
                # connected, unanswered (open, but nothing came back) or not connected
                "connected": state == "connected",
                "channel": state,
                "unanswered_ms": None if silent is None else round(silent * 1000),
                # why the last attempt to connect to it failed (None since one
                # succeeded), and how many attempts failed
                "last_error": self.channels.last_error.get(p.name),
                "failed_opens": self.channels.failed_opens.get(p.name, 0),
            })  # fmt: skip
        return out

    def _transfers_status(self) -> dict[str, Any]:
        recent = list(self.core.records)[-20:]
        return {
            "in_progress": self.core.in_progress(),
            # prepared transfers waiting for transfer --commit ID (or --cancel ID)
            "prepared": [f"{tid:016x}" for tid in self.core.prepared_ids()],
            "recent": [r.as_dict() for r in recent],
            **self.core.counters,
            "refused_connections": self.channels.refused,
            "handshakes_rate_limited": self.channels.rate.limited,
            "open_connections": self.channels.limits.count,
        }


def _transfer_id(args: dict[str, Any]) -> int:
    """A control request's transfer ``id``: 16 hex digits, as ``ipsecct status`` shows it."""
    return parse_transfer_id(args.get("id"))


def _dst(args: dict[str, Any]) -> IPAddress | None:
    """A control request's ``dst`` (an IPv4 or IPv6 address, as text), or None."""
    dst = args.get("dst")
    if dst is None:
        return None
    if isinstance(dst, str):
        try:
            return ipaddress.ip_address(dst)
        except ValueError:
            pass
    raise ControlError(f"bad destination {dst!r} (an IPv4 or IPv6 address)")


def _limit(args: dict[str, Any]) -> float | None:
    """A control request's ``timeout`` (seconds, 0 < t <= TRANSFER_TIMEOUT_LIMIT), or None."""
    t = args.get("timeout")
    if t is None:
        return None
    top = TRANSFER_TIMEOUT_LIMIT
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= top:
        raise ControlError(f"timeout must be a number of seconds from 0 to {top:g}")
    return float(t)


def forwarded_packet(msg: cxtp.Message) -> bool:
    """A packet the peer forwarded after a cut-over (a FORWARD CDB behind its tag)."""
    try:
        return (isinstance(msg, cxtp.CTD) and len(msg.cdbs) == 2
                and cxtp.cdb_fpt(msg.cdbs[1]) == FPT_FORWARD)  # fmt: skip
    except CxtpError:
        return False

"""The IKEv2 adapter of a gateway: UDP 500, and UDP 4500 with the non-ESP marker (RFC 3948
§2.2) on the node's outer socket, one timer, and the CHILD SAs the
:class:`~ipsecct.ikev2.engine.IkeEngine` negotiates installed into the node's SAD/SPD the
same way manually keyed tunnels are. All IKE logic is in :mod:`ipsecct.ikev2`.

Configured by ``[connections.NAME]`` and ``[secrets.ike-NAME]`` (see
:mod:`ipsecct.ikev2.config`); secrets come from a file (warned about when others may read
it) or an environment variable, never from the configuration itself.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..ct.failover import MAX_EXTRA_CDBS
from ..ct.transfer import UNIT_IKEV2, unit_cdb
from ..errors import IkeContextError, IkeProtocolError, IpsecctError, TransferError, TunError
from ..ikev2 import context as ike_context
from ..ikev2.config import ChildConfig, Connection
from ..ikev2.engine import (
    ChildDown,
    ChildUp,
    ConnectFailed,
    DeleteAnswered,
    IkeDown,
    IkeEngine,
    IkeRekeyed,
    IkeUp,
    Output,
    PeerMoved,
    ReplayCounterSynced,
    Send,
)
from ..ikev2.ikesa import Address, ChildSA, IkeSA, IkeState
from ..ikev2.message import TrafficSelector
from ..ikev2.restart import Restarts
from ..ipsec.engine import TunnelState
from ..ipsec.ippacket import IPAddress as IPAddr
from ..ipsec.ratelimit import RateLimiter
from ..ipsec.sad import Direction, SAEvent, UdpEncap
from ..ipsec.spd import Selectors
from .log import event
from .node import Node, UdpEndpoint

log = logging.getLogger("ipsecct.gateway.ike")

IKE_PORT = 500
INBOUND_GRACE = 2.0  # seconds a rekeyed, deleted CHILD SA still takes what was on its way
# ... and at most how long one we rekeyed does, until the peer answers its DELETE (the DELETE's
# last retransmission goes 30 s after it; the peer is declared dead 16 s later)
DELETE_WAIT = 32.0
# after a transfer to us: how long (s) IKE messages for an IKE SA we do not have yet are kept
# for it (its context follows the commit over the TLS channel), and how many at most
EARLY_IKE_TIME = 1.0
# How long the virtual IPs of a transfer's IKE SA stay reserved after its COMMIT for its
# context to come (it follows the COMMIT on the same channel; the source's export may wait
# up to 5 s for an exchange of its own to finish)
RESERVE_AFTER_COMMIT = 10.0
# ... and after that, while a tunnel of its units is still installed here (the moved CHILD
# SAs carry traffic of those addresses without their IKE SA), looked at this often (s)
RESERVE_RECHECK = 5.0
# A peer may hold at most this many reserved virtual IPs here per tunnel of its transfers
# that its admitted units name: an IKE SA holds at most one per family, and a unit names
# at least one of its transfer's tunnels
RESERVED_PER_TUNNEL = 2
EARLY_IKE_MAX = 64
# ... and from one source address at most (a request with its retransmissions or its RFC 7383
# fragments, a few clients behind one NAT): one source cannot fill the queue and keep out the
# requests of the clients that were moved (IkeService._keep_early)
EARLY_IKE_PER_SOURCE = 16
# Only messages for an IKE SA that an admitted UNIT announced (its SPI, item 16) are kept:
# anyone may send junk with made-up SPIs from as many (spoofed) addresses as the queue holds,
# and each such source holding one message left no room a real client's could take. An
# announced SPI is waited for this long (s) after its unit's check, at most MOVED_MAX per peer.
EARLY_ANNOUNCED_TIME = 60.0
BORN_WITH_MAX = 65536  # CHILD SAs whose siblings at birth are remembered
# a transfer waits at most this long (s) for an IKE exchange of ours in flight on its IKE SA,
# looking every QUIESCE_POLL s
QUIESCE_TIME = 10.0
QUIESCE_POLL = 0.02
# what waits for the virtual address to be claimed (messages, seconds)
VIP_WAIT_MAX = 64
# leases in one ``ipsecct pools --leases`` answer, all pools together: by default, at most
# (``--limit``), and identity characters at most (an identity is up to 64 Ki characters, and
# one in JSON up to 12 octets a character: the answer stays within the client's 64 MiB)
POOL_LEASES_LISTED = 1000
POOL_LEASES_MAX = 65536
POOL_LEASES_TEXT = 4 << 20
VIP_WAIT_TIME = 2.0
# after a handover: IKE requests that still reach the old gateway are forwarded to the new one
# (for the transfer's forward_ms), at most FORWARD_RATE a second per source address (burst
# FORWARD_BURST); at most MOVED_MAX IKE SAs remembered as moved
FORWARD_RATE = 5.0
FORWARD_BURST = 10.0
MOVED_MAX = 65536
MARKER = b"\0\0\0\0"
# a mobile node (outer.address unspecified): how often (s) it looks up its source address
# toward each peer it initiated to (a move is announced with MOBIKE within this)
PATH_CHECK = 1.0
IKE_SPI_LEN = 8  # octets of an IKE SPI (RFC 7296 §3.1)


TRAP_GAP = 2.0  # seconds: at most one IKE SA started by a connection's trap in this time


def _label(ike: IkeSA, child: ChildSA) -> str:
    """A CHILD SA's name in the SA table and the logs: CONNECTION/CHILD#UNIQUE-ID, the id
    ``sa list`` shows beside it (``swanctl --list-sas``'s ``net: #4``)."""
    return f"{ike.conn.name}/{child.name}#{child.uid}"


@dataclass
class _Reserved:
    """The virtual IPs reserved here for the IKE SAs of one transfer towards us."""

    held: dict[tuple[str, IPAddr], None] = field(default_factory=dict)  # (pool, address)
    spis: set[int] = field(default_factory=set)  # the tunnels its admitted units name
    until: float | None = None  # committed: looked at again then
    # what each admitted unit reserved ((payload, SPIs) -> addresses), until unit_kept
    units: dict[tuple[bytes, tuple[int, ...]], list[tuple[str, IPAddr]]] = field(
        default_factory=dict)  # fmt: skip
    # ... and which unit (its SPIs: the pieces of one name the same) announced each address
    unit_of: dict[tuple[str, IPAddr], tuple[int, ...]] = field(default_factory=dict)


def _ts_take(ts: list[TrafficSelector], addr: IPAddr, proto: int, port: int) -> bool:
    """Does one of ``ts`` take a packet's ``addr``, IP protocol and ``port`` (of one side)?"""
    for t in ts:
        if t.start.version != addr.version or not t.start <= addr <= t.end:  # type: ignore[operator]
            continue
        if t.ip_protocol not in (0, proto):
            continue
        if (t.start_port, t.end_port) != (0, 65535) and not t.start_port <= port <= t.end_port:
            continue
        return True
    return False


class IkeService:
    """Runs the IKEv2 engine of one node."""

    def __init__(self, node: Node, connections: list[Connection]) -> None:
        self.node = node
        self.engine = IkeEngine(
            connections,
            spi_in_use=lambda spi: bool(node.engine.find_sa(spi)),
            outbound_spi_taken=lambda spi: node.engine.outbound_spi_holder(spi) is not None,
            natt_port=node.cfg.outer.port,
            cookie_threshold=node.cfg.cookie_threshold,
            rsa_pss=node.cfg.rsa_pss,
            max_packet=node.cfg.ike_max_packet,
            fragment_size=node.cfg.ike_fragment_size,
            wall_offset=time.time() - node.clock(),
            pools=node.cfg.pools,
        )
        blk = node.cfg.cluster.block() if node.cfg.cluster is not None else None
        if blk is not None:  # cluster-unique inbound SPIs, as for transferred tunnels
            self.engine.spi_range = (blk.first, blk.last)
        self.sock500: UdpEndpoint | None = None
        # restarts waiting (start_action = start retries, dpd_action = restart,
        # close_action = start), with their back-off: in the node's one timer (ikev2/restart)
        self._restarts = Restarts()
        # keyingtries: attempts that failed since the connection was last up; and the
        # connections a dpd_action/close_action restarted (retried like start_action = start)
        self._tries: dict[str, int] = {}
        self._restarting: set[str] = set()
        self._stopping = False
        # set by the service when context transfer runs: (peer, CDBs, the peer's address)
        self.send_context: Callable[[str, list[bytes], Any], None] | None = None
        # told the inbound CHILD SPIs of an IKE SA on which the peer's request is held
        # (quiet during a transfer): the transfer service rolls a prepared transfer back
        self.request_held: list[Callable[[set[int]], None]] = []
        # set by the service: is a tunnel installed by a transfer whose COMMIT has not come
        # (an IKE SA's context follows the COMMIT: one before it is not taken)
        self.awaiting_commit: Callable[[Any], bool] = lambda t: False
        # set by the service: where a peer's transfer towards us is ("open", "committed",
        # "ended": ct.transfer.TransferCore.incoming_state)
        self.incoming_state: Callable[[str, int], str] = lambda peer, tid: "ended"
        # set by the service: what a tunnel in a transfer is doing there (None: in none), as
        # ``sa list`` says it (ct.transfer.TransferCore.tunnel_roles): ("leaving", "to ...")
        self.transfer_role: Callable[[Any], tuple[str, str] | None] = lambda t: None
        # virtual IPs reserved for the IKE SAs of a transfer towards us (check_unit), by
        # (peer, transfer id); and per peer, how many it holds and over how many tunnels
        self._reserved: dict[tuple[str, int], _Reserved] = {}
        self._reserved_of: dict[str, tuple[int, int]] = {}
        # the earliest time a committed transfer's reservation is looked at again (None:
        # none is; an open transfer's ends with it, on_transfer)
        self._reserved_due: float | None = None
        # IKE SAs (spi_i, spi_r) whose UNIT, sent by a transfer still running (source),
        # announced the peer's chain serials (item 15): its COMMIT waits on the context
        # still carrying them (commit_check)
        self._serials_announced: set[tuple[bytes, bytes]] = set()
        self.engine.on_request_held = self._request_held
        self.engine.esp_heard = self._esp_heard
        # tunnel -> (IKE SA, CHILD SA) whose ESP SAs it holds (child_of), built by one walk
        # of every IKE SA and kept while the node's tunnels do not change (a CHILD SA gets a
        # tunnel as it is installed); a hit is checked before it is trusted
        self._children: dict[int, tuple[IkeSA, ChildSA]] = {}  # (by id(): any handle)
        self._children_at = -1  # the node engine's tunnel_changes it was built at
        # direct SG identity ([transfer] identity = "direct"): an IKE SA taken over from a
        # peer gateway is moved to this gateway's own address (IkeEngine.announce_move)
        self.direct = False
        # IKE messages that came, just after a transfer to us, for an IKE SA not here yet
        self._early_until = 0.0
        self._early_since = 0.0  # when that transfer committed
        # (when, message, source, destination, the peer gateway that forwarded it or None)
        self._early: list[tuple[float, bytes, Address, Address, str | None]] = []
        # the IKE SAs (our SPI) admitted units announced, per peer: SPI -> until when
        self._coming: dict[str, dict[bytes, float]] = {}
        # called with every event the engine reports (not Send): IKE SAs up and down,
        # failed initiations, ... (the demo watches them)
        self.listeners: list[Callable[[Output], None]] = []
        # IKE's own port ([ike] port; 0: none, IKE only on the outer NAT-T port)
        self.ike_port = node.cfg.ike_port
        # fail-over (pair mode): True while a standby holds replicas of our IKE SAs, so that a
        # stop leaves them to it instead of deleting them (set by the service)
        self.replicated: Callable[[], bool] | None = None
        # ... and while this gateway may not send (its lease lost, or the standby took over)
        # it neither answers nor starts IKE exchanges: the standby may be running them
        self.fenced: Callable[[float], bool] | None = None
        self._changes = 0  # engine calls so far: the replication looks only after one
        # inbound halves of deleted CHILD SAs still taking what is on its way (by SPI), and
        # the timer that ends each
        self._shadows: dict[int, tuple[Any, asyncio.TimerHandle]] = {}
        self.feed = IkeFeed(self)  # the pair mode's replication (etcd mode: one per peer)
        self.feeds: list[IkeFeed] = [self.feed]
        # CHILD SAs' siblings when they were made (outbound SPI -> the other CHILD SAs'
        # outbound SPIs then): a rekeyed CHILD SA joins its predecessor's cluster group even
        # when the predecessor is gone by the time the new one is recorded
        self._born_with: dict[int, list[int]] = {}
        self._index: dict[int, IkeSA] = {}  # outbound SPI -> IKE SA, as of _index_at
        self._index_at = -1
        # Forwarding after a handover: IKE SAs that left (our SPI -> (peer, until)) and that
        # arrived (the same), how long the window is (the transfer's forward_ms), and how a
        # forwarding CDB goes to a peer gateway (set by the service).
        self.forward_time = 2.0
        self.forward_ike: Callable[[str, bytes, Any], None] | None = None
        self._moved: dict[bytes, tuple[str, float]] = {}
        self._arrived: dict[bytes, tuple[str, float]] = {}
        self._forward_limit = RateLimiter(FORWARD_RATE, FORWARD_BURST, max_keys=1024)
        # indirect identity: whether the virtual address is ours yet (set by the service).
        # What we send from it before the claim is done (an answer to a request that came
        # with the IKE SA's context, just after a transfer to us) waits for the claim.
        self.vip_owned: Callable[[], bool] | None = None
        self._vip_wait: list[tuple[float, Send]] = []
        # Replicas a holder could not take over, checked as they arrive: at the active,
        # (holder, our IKE SPI) -> (why, since); at the holder, the reason last logged per key.
        self.replicas_refused: dict[tuple[str, bytes], tuple[str, float]] = {}
        self._refusing: dict[bytes, str] = {}
        # At a replica holder: the replicas admitted, by (connection, identity) and by key,
        # to bound the identity's IKE SAs a take-over would bring (arrival_refusal); which
        # keys are still held the driver says (``replica_held``; None: all).
        self._replica_ids: dict[tuple[str, str], dict[bytes, None]] = {}
        self._replica_id_of: dict[bytes, tuple[str, str]] = {}
        self.replica_held: Callable[[bytes], bool] | None = None
        host = node.cfg.local_address
        self.local_host = host
        # a mobile node: its outer socket listens on every address and its address toward a
        # peer is the one its routes pick, looked up every PATH_CHECK s (_check_paths)
        self.mobile = host.is_unspecified
        self._path_check_at = 0.0
        self._no_route: set[int] = set()  # IKE SAs (uid) without a route, logged once
        node.outer_hooks.append(self._on_4500)
        node.on_lifetime.append(self._on_lifetime)
        # (a trap armed later, by a dpd_action or close_action = trap, also goes here)
        node.extensions["ike"] = self.status
        # start_action = trap: (connection, child) whose selectors start an IKE SA when an
        # outbound packet matches no policy, and when each last did (at most one a TRAP_GAP)
        self._traps = [(c, ch) for c in connections for ch in c.children
                       if ch.start_action == "trap"]  # fmt: skip
        self._trapped: dict[str, float] = {}
        if self._traps:
            node.engine.on_policy_miss = self._acquire

    async def start(self) -> None:
        # on a virtual (indirect identity) address this gateway may not hold yet: IP_FREEBIND
        if self.ike_port:
            self.sock500 = UdpEndpoint.bind((str(self.local_host), self.ike_port), self._on_500,
                                            freebind=self.node.cfg.virtual is not None,
                                            key="ike.port")  # fmt: skip
        self.node.timers.add("ike", self._next_deadline, self._on_timer)
        ports = [p for p in (self.ike_port, self.node.cfg.outer.port) if p]
        event(log, "ike-listening", node=self.node.name, ports=",".join(map(str, ports)),
              connections=len(self.engine.connections))  # fmt: skip
        # one IKE SA a connection, with its first start_action = start child in IKE_AUTH;
        # the others are asked for in it once it is up (_start_others), as strongSwan does
        for conn in self.engine.connections:
            first = next((c for c in conn.children if c.start_action == "start"), None)
            if first is not None:
                self.initiate(conn, first)

    def reload(self, connections: list[Connection], added: set[str], removed: set[str]) -> None:
        """The connections of a configuration read again (SIGHUP), as charon's ``swanctl
        --load-all``: new IKE SAs (and, at a trap or a restart, their first CHILD SA) use
        ``connections``; an IKE SA up keeps the connection it was made with (its proposals,
        identities, timings) until it ends, also when that connection was removed. Nothing
        here can fail (the service checked the configuration first): the reload is whole.
        A removed connection's restarts are given up, its traps disarmed; an added one with
        a ``start_action = start`` child is started, as at start."""
        by_name = {c.name: c for c in connections}
        self.engine.connections = connections
        traps = [(c, ch) for c in connections for ch in c.children if ch.start_action == "trap"]
        for conn, child in self._traps:  # armed by a dpd_action/close_action = trap: kept
            new = by_name.get(conn.name)
            armed = None if new is None else next(
                (ch for ch in new.children if ch.name == child.name), None)
            if new is not None and armed is not None and (new, armed) not in traps:
                traps.append((new, armed))
        self._traps = traps
        if traps:
            self.node.engine.on_policy_miss = self._acquire
        for key, d in list(self._restarts.waiting.items()):
            where, cc = cast(tuple[Connection | IkeSA, ChildConfig | None], d.what)
            if not isinstance(where, Connection):
                continue  # a CHILD SA asked for again in its IKE SA: that IKE SA's connection
            renewed = by_name.get(where.name)
            if renewed is None:
                self._restarts.cancel(key)
                continue
            d.what = (renewed, None if cc is None else next(
                (ch for ch in renewed.children if ch.name == cc.name), None))
        for name in removed:
            self._restarting.discard(name)
            self._tries.pop(name, None)
            self._trapped.pop(name, None)
        if self._stopping:
            return
        for conn in connections:
            if conn.name in added:
                first = next((c for c in conn.children if c.start_action == "start"), None)
                if first is not None:
                    self.initiate(conn, first)

    def _acquire(self, src: IPAddr, dst: IPAddr, proto: int, sport: int, dport: int) -> None:
        """An outbound packet matched no policy (it is dropped, as the kernel's trap policy
        drops it while strongSwan acquires): if a ``start_action = trap`` child's selectors
        take it (our side's local_ts the source, remote_ts the destination), start its IKE
        SA, unless one of that connection is being set up, or one was started less than
        TRAP_GAP ago (a flood of unprotected packets starts one exchange a gap); when one
        is up without a CHILD SA of that child, ask for one in it."""
        if self._stopping:
            return
        now = self.node.clock()
        for conn, child in self._traps:
            if not (_ts_take(child.local_ts, src, proto, sport)
                    and _ts_take(child.remote_ts, dst, proto, dport)):  # fmt: skip
                continue
            if now < self._trapped.get(conn.name, -TRAP_GAP) + TRAP_GAP:
                return
            # (looked at once a gap at most: a flood of such packets on a gateway with many
            # IKE SAs does not walk them per packet)
            self._trapped[conn.name] = now
            # (not a half-open one the peer started: anyone can send an IKE_SA_INIT from
            # the peer's address, and one every 30 s kept the trap from starting ours)
            up = [i for i in self.engine.ike_sas() if i.conn.name == conn.name
                  and i.state is not IkeState.DEAD
                  and not (i.state is IkeState.HALF_OPEN and not i.we_initiated)]  # fmt: skip
            if up:
                # the connection's IKE SA is up without a CHILD SA of this child (the peer
                # deleted it, or it is a second child): a new one in that IKE SA (none
                # while the IKE SAs are being rekeyed away or deleted)
                ike = next((i for i in up if i.state is IkeState.ESTABLISHED), up[0])
                if ike.state is IkeState.ESTABLISHED and not ike.has_or_asks(child):
                    self.engine.stats["trap-acquired"] += 1
                    event(log, "ike-trap", node=self.node.name, conn=conn.name,
                          child=child.name, src=src, dst=dst, ike_sa="up")  # fmt: skip
                    self._act(self.engine.create_child(ike, child, now))
                return
            if any(c.conn.name == conn.name for c in self.engine.connecting.values()):
                return
            self.engine.stats["trap-acquired"] += 1
            event(log, "ike-trap", node=self.node.name, conn=conn.name, child=child.name,
                  src=src, dst=dst)  # fmt: skip
            self.initiate(conn, child)
            return

    def initiate(self, conn: Connection, child: ChildConfig | None = None) -> None:
        """Connect to the connection's (single) remote address and ``remote_port``, from its
        ``local_port`` (the IKE port or the outer NAT-T port), as ``start_action = start``
        does; retried with back-off (ikev2/restart.py: 1 s doubling to 60 s, with jitter)
        while it fails."""
        remote = Address(conn.remote_addrs[0].network_address, conn.remote_port)
        local = self._local(conn.local_port)
        if self.mobile:
            host = source_address(remote)
            if host is None:
                event(log, "ike-no-route", logging.WARNING, node=self.node.name,
                      conn=conn.name, peer=remote)  # fmt: skip
                self._retry_later(conn, why="no route")
                return
            local = Address(host, conn.local_port)
        self._act(self.engine.initiate(conn, local, remote, self.node.clock(), child))

    def _retry_later(self, conn: Connection, child: ChildConfig | None = None, *,
                     at_once: bool = False, why: str = "") -> None:  # fmt: skip
        """Start the connection again after its back-off (``at_once``: the first since it
        was last up a while goes now), unless it gave up (``keyingtries``)."""
        if self._stopping or not (any(c.start_action == "start" for c in conn.children)
                                  or conn.name in self._restarting):  # fmt: skip
            return
        tries = self._tries.get(conn.name, 0)
        if conn.keyingtries and tries >= conn.keyingtries:
            # swanctl.conf's keyingtries: so many attempts, then no more (0 or not set:
            # until it works); the next start is the operator's (or a trap's)
            self._restarting.discard(conn.name)
            self._tries.pop(conn.name, None)
            self._restarts.cancel(conn.name)
            event(log, "ike-connect-gave-up", logging.WARNING, node=self.node.name,
                  conn=conn.name, tries=tries)  # fmt: skip
            return
        self._schedule(conn.name, (conn, child), at_once, why, conn=conn.name)

    def _schedule(self, key: str, what: tuple[Any, ChildConfig | None], at_once: bool,
                  why: str, **fields: Any) -> None:  # fmt: skip
        now = self.node.clock()
        d = self._restarts.schedule(key, now, what, at_once=at_once)
        event(log, "ike-retry", node=self.node.name, **fields, attempt=d.attempt,
              delay_s=round(d.at - now, 3), why=why or "-")  # fmt: skip
        if d.at <= now:
            self._run_restarts(now)
        else:
            self.node.timers.poke()

    def _run_restarts(self, now: float) -> None:
        """The restarts whose time came: a new IKE SA of a connection (none if one is up or
        being set up meanwhile: a trap's, say), or a CHILD SA asked for again in its IKE SA
        (none if that IKE SA is no longer up, or has one of that child again)."""
        for d in self._restarts.due(now):
            if self._stopping:
                return
            where, cc = cast(tuple[Connection | IkeSA, ChildConfig | None], d.what)
            if isinstance(where, Connection):
                if any(c.conn.name == where.name for c in self.engine.connecting.values()) or any(
                        i.conn.name == where.name and i.state is IkeState.ESTABLISHED
                        for i in self.engine.ike_sas()):  # fmt: skip
                    continue
                self.initiate(where, cc)
            elif (where.state is IkeState.ESTABLISHED and cc is not None
                    and not any(c.config is cc for c in where.children)):  # fmt: skip
                self._act(self.engine.create_child(where, cc, now))

    async def stop(self) -> None:
        self._stopping = True
        self._restarts.clear()
        now = self.node.clock()
        if self.replicated is not None and self.replicated():
            # A standby holds our IKE SAs and takes them over when we fall silent: a DELETE
            # would end the sessions it is about to continue.
            event(log, "ike-sas-left-to-standby", node=self.node.name,
                  ike_sas=len(self.engine.ike_sas()))  # fmt: skip
        else:
            for ike in self.engine.ike_sas():
                self._act(self.engine.delete(ike, now))
        await asyncio.sleep(0.05)  # let the DELETEs go out
        # their leases end with the process (or live on with the IKE SAs at the standby): an
        # online lease left in the durable state would be away after the restart
        left = self.replicated is not None and self.replicated()
        for ike in self.engine.ike_sas():
            self.engine.end_leases(ike, away=left)
        self.node.timers.remove("ike")
        if self.sock500 is not None:
            self.sock500.close()

    def _after_down(self, ike: IkeSA, reason: str) -> None:
        """dpd_action (the peer is dead) or close_action (it deleted the IKE SA) of the
        connection's children: restart the connection now, or arm a trap for the child
        (the next packet its selectors take starts an IKE SA), or nothing (clear)."""
        conn = ike.conn
        if self._stopping:
            return
        # (whose connection it is: who sent the first IKE_SA_INIT, not who made this IKE SA,
        # which is the gateway once it has rekeyed it)
        todo = conn.after_down(reason, ike.mobike_initiator)
        if todo is None:
            return
        act, child = todo
        explicit = child.dpd_action is not None or reason == "deleted by peer"
        if act == "restart" and not explicit:
            # (start_action = start, no dpd_action: after the back-off's first delay)
            self._retry_later(conn, why=reason)
        elif act == "restart":
            event(log, "ike-restart", node=self.node.name, conn=conn.name, child=child.name,
                  reason=reason)  # fmt: skip
            self._restarting.add(conn.name)
            self._retry_later(conn, child, at_once=True, why=reason)
        elif (conn, child) not in self._traps:
            event(log, "ike-trap-armed", node=self.node.name, conn=conn.name,
                  child=child.name, reason=reason)  # fmt: skip
            self._traps.append((conn, child))
            self.node.engine.on_policy_miss = self._acquire

    def _on_lifetime(self, sa: Any, ev: SAEvent) -> None:
        """A CHILD SA's ESP SA reached its rekey_bytes/packets (soft) or life_bytes/packets
        (hard): the engine rekeys or closes the CHILD SA. Its tunnel, then its CHILD SA,
        from the indexes (the engine's SA -> tunnel, child_of), not a walk of every IKE SA
        for each SA that reached its limit (O(IKE SAs) each, as rekey_before_ceiling was)."""
        t = self.node.engine.tunnel_of(sa)
        found = self.child_of(t) if t is not None else None
        if found is not None:
            hard = ev is SAEvent.HARD_EXPIRED
            self._act(self.engine.volume_limit(*found, hard, self.node.clock()))

    def rekey_before_ceiling(self, tunnel: object, now: float) -> bool:
        """``tunnel`` nears a ceiling nothing will lift soon (the fail-over driver: the
        replicas of a standby the operator let this gateway run without): if it is a CHILD
        SA of ours, it is rekeyed now, as a rekey that falls due by time (retried by the
        engine until it succeeds). A new CHILD SA has new keys, which no replica holds: no
        ceiling bounds it. Returns whether it is one."""
        found = self.child_of(tunnel)
        if found is None:
            return False
        child = found[1]
        if not child.rekeyed and (child.rekey_at is None or child.rekey_at > now):
            child.rekey_at = now
            self._act(self.engine.tick(now))
        return True

    # -- I/O ----------------------------------------------------------------------------
    def _local(self, port: int) -> Address:
        return Address(self.local_host, port)

    def _peer(self, addr: tuple[Any, ...]) -> Address | None:
        try:
            return Address(ipaddress.ip_address(addr[0]), int(addr[1]))
        except (ValueError, IndexError, TypeError):
            return None

    def _is_fenced(self, now: float) -> bool:
        if self.fenced is not None and self.fenced(now):
            self.engine.stats["fenced"] += 1
            return True
        return False

    def _dst(self, data: bytes, src: Address, port: int) -> Address:
        """Our address a message from ``src`` came to: the node's, or, on a mobile node
        (whose socket listens on every address), its IKE SA's (only local_moved changes
        it), else the one its routes pick toward ``src``."""
        if not self.mobile:
            return self._local(port)
        ike = self.engine.by_spi.get(self._our_spi(data)) if len(data) >= 28 else None
        if ike is not None and ike.local.port == port:
            return ike.local
        host = source_address(src)
        return Address(host if host is not None else self.local_host, port)

    def _on_500(self, data: bytes, addr: tuple[Any, ...]) -> None:
        src = self._peer(addr)
        if src is not None and not self._is_fenced(self.node.clock()):
            self._receive(data, src, self._dst(data, src, self.ike_port))

    def _on_4500(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        # the node removed the marker; IKE's header has version 2.x at octet 17
        if len(data) < 28 or data[17] >> 4 != 2:
            return False
        src = self._peer(addr)
        if src is not None and not self._is_fenced(self.node.clock()):
            self._receive(data, src, self._dst(data, src, self.node.cfg.outer.port))
        return True

    def _receive(self, data: bytes, src: Address, dst: Address) -> None:
        now = self.node.clock()
        if (now < self._early_until and self._not_here_yet(data)
                and not self._left_since_commit(data) and self._announced(data, now)):  # fmt: skip
            # A transfer to us just committed: the peer's request may be here (the virtual
            # address moved, or a retransmission) before the IKE SA's context: kept for it
            self._keep_early(now, data, src, dst, None)
            return
        if self._moved and self._forwarded(data, src, dst, now):
            return
        touched = self.engine.touched
        outputs = self.engine.receive(data, src, dst, now)
        # a message dropped before it reached any IKE SA (junk, a cookie asked for) moved no
        # deadline: no scan of every IKE SA for it (with 10,000 IKE SAs one took 8 ms, and
        # anyone may send such datagrams from any address)
        self._act(outputs, changed=self.engine.touched != touched
                  or any(not isinstance(o, Send) for o in outputs))  # fmt: skip

    def _keep_early(self, now: float, data: bytes, src: Address, dst: Address,
                    via: str | None) -> None:  # fmt: skip
        """Keep an IKE message that came for an IKE SA whose context is still on its way
        (``early-kept``), at most EARLY_IKE_PER_SOURCE from one source address and
        EARLY_IKE_MAX in all (those older than EARLY_IKE_TIME go first: never replayed).
        When the queue is full, a source that holds at least two fewer than the one holding
        the most takes the oldest place of that one: a source (or a few) flooding the queue
        leaves room to every other. Each message not kept, or pushed out, is counted
        (``early-dropped``). (The forwarded ones count under the client's address they
        name, as they are replayed from it.)"""
        early = [e for e in self._early if now - e[0] < EARLY_IKE_TIME]
        held: dict[IPAddr, int] = {}
        for e in early:
            held[e[2].host] = held.get(e[2].host, 0) + 1
        mine = held.get(src.host, 0)
        if mine >= EARLY_IKE_PER_SOURCE:
            self.engine.stats["early-dropped"] += 1
            self._early = early
            return
        if len(early) >= EARLY_IKE_MAX:
            top = max(held, key=held.__getitem__)
            if held[top] < mine + 2:
                self.engine.stats["early-dropped"] += 1
                self._early = early
                return
            early.pop(next(i for i, e in enumerate(early) if e[2].host == top))
            self.engine.stats["early-dropped"] += 1
        early.append((now, data, src, dst, via))
        self._early = early
        self.engine.stats["early-kept"] += 1

    def _announced(self, data: bytes, now: float) -> bool:
        """Is the IKE SA a message (not here yet) is for one an admitted UNIT announced,
        within EARLY_ANNOUNCED_TIME? If not, it is not kept early (counted
        ``early-unannounced``): its context is not on its way."""
        key = self._our_spi(data)
        for coming in self._coming.values():
            until = coming.get(key)
            if until is not None and now < until:
                return True
        self.engine.stats["early-unannounced"] += 1
        return False

    def _announce(self, peer: str, payload: bytes) -> None:
        """An admitted UNIT payload of ``peer``: the IKE SA it announces is on its way."""
        spi = ike_context.unit_spi(payload)
        if spi is None:
            return
        now = self.node.clock()
        coming = self._coming.setdefault(peer, {})
        coming.pop(spi, None)
        coming[spi] = now + EARLY_ANNOUNCED_TIME
        # (in the order they expire: the first ones, when past, or over the bound, go)
        while len(coming) > MOVED_MAX or next(iter(coming.values())) <= now:
            del coming[next(iter(coming))]

    def _left_since_commit(self, data: bytes) -> bool:
        """A message for an IKE SA this gateway handed over after the last transfer to it
        committed: that transfer does not bring it back (one that did would commit later and
        open a window of its own), so the message is forwarded to the gateway that has it,
        not kept here for a context that never comes (the client's DELETE of its old IKE SA
        after a rekey answered by the new gateway, say: kept, it went unanswered until the
        client retransmitted it 4 s later). An IKE SA that left before that commit may be
        the one coming back (moved there and back again): kept, as before."""
        moved = self._moved.get(self._our_spi(data))
        return moved is not None and moved[1] - self.forward_time >= self._early_since

    @staticmethod
    def _our_spi(data: bytes) -> bytes:
        return data[8:16] if data[19] & 0x08 else data[0:8]  # the I(nitiator) flag

    def _forwarded(self, data: bytes, src: Address, dst: Address, now: float) -> bool:
        """A request for an IKE SA that a handover moved away in the last ``forward_time``:
        sent on to the gateway that holds it (it answers, from its own address, as it does
        ESP), instead of dropped here and retransmitted by the client seconds later. Rate
        limited per source address. False when the message is not such a request."""
        if len(data) < 28 or data[18] == 34 or data[19] & 0x20 or self.forward_ike is None:
            return False  # IKE_SA_INIT or a response: nothing to forward
        key = self._our_spi(data)
        moved = self._moved.get(key)
        if moved is None or key in self.engine.by_spi:
            return False
        peer, until = moved
        if now >= until:
            del self._moved[key]
            return False
        if len(data) > ike_context.MAX_FORWARD:
            self.engine.stats["forward-too-long"] += 1
            return False
        if not self._forward_limit.allow(src.host, now):
            self.engine.stats["forward-rate-limited"] += 1
            return True
        self.forward_ike(peer, ike_context.encode_forward(data, src, dst), src.host)
        self.engine.stats["forwarded"] += 1
        return True

    def receive_forwarded(self, peer: str, cdb: bytes) -> None:
        """An IKE request a peer gateway got for an IKE SA it handed over to us: processed as
        if it had come here, only from the gateway that handed that IKE SA over, within the
        forward window, from the IKE SA's own peer address (a forward never moves it)."""
        now = self.node.clock()
        try:
            data, src, dst = ike_context.decode_forward(cdb)
        except IkeContextError:
            self.engine.stats["forward-malformed"] += 1
            return
        if len(data) < 28 or self._is_fenced(now):
            self.engine.stats["forward-refused"] += 1
            return
        key = self._our_spi(data)
        ike = self.engine.by_spi.get(key)
        arrived = self._arrived.get(key)
        if (ike is None and now < self._early_until
                and self._announced(data, now)):  # its context still on its way: kept
            self._keep_early(now, data, src, dst, peer)
            return
        if (ike is None or arrived is None or arrived[0] != peer or now >= arrived[1]
                or src != ike.remote):  # fmt: skip
            self.engine.stats["forward-refused"] += 1
            return
        self.engine.stats["forward-received"] += 1
        self._act(self.engine.receive(data, src, ike.local, now))

    def _forwarded_by_its_peer(self, data: bytes, src: Address, via: str) -> bool:
        """Was an IKE message forwarded by ``via`` (kept early) for an IKE SA that ``via``
        handed over to us, from that IKE SA's own peer address?"""
        key = self._our_spi(data)
        ike = self.engine.by_spi.get(key)
        arrived = self._arrived.get(key)
        return ike is not None and arrived is not None and arrived[0] == via and src == ike.remote

    def _not_here_yet(self, data: bytes) -> bool:
        """An IKE message (not IKE_SA_INIT) whose SPI we chose is not one of our IKE SAs."""
        if len(data) < 28 or data[18] == 34:
            return False
        return self._our_spi(data) not in self.engine.by_spi

    def _send(self, s: Send) -> None:
        # Every IKE datagram leaves here: none while this gateway may not send (its lease
        # lost, or its standby took over), whatever path made it (a held request processed
        # after an aborted transfer, a start or trap initiation, a timer): the standby may be
        # running these exchanges (counted "fenced"; the engine retransmits once allowed).
        if self._is_fenced(self.node.clock()):
            return
        if (s.src.host == self.node.cfg.virtual and self.vip_owned is not None
                and not self.vip_owned()):  # fmt: skip
            now = self.node.clock()
            self._vip_wait = [(t, w) for t, w in self._vip_wait if now - t < VIP_WAIT_TIME]
            if len(self._vip_wait) < VIP_WAIT_MAX:
                self._vip_wait.append((now, s))
                self.engine.stats["vip-wait"] += 1
            else:
                self.engine.stats["vip-wait-dropped"] += 1
            return
        dst = (str(s.dst.host), s.dst.port)
        if self.sock500 is not None and s.src.port == self.ike_port:
            self.sock500.sendto(s.data, dst)
        elif self.node.virtual_transport is not None and s.src.host == self.node.cfg.virtual:
            self.node.virtual_transport.sendto(MARKER + s.data, dst)  # from the virtual address
        else:
            self.node.send_outer(MARKER + s.data, dst)

    def vip_claimed(self) -> None:
        """The virtual address is ours now: what waited for it goes out."""
        now = self.node.clock()
        waiting, self._vip_wait = self._vip_wait, []
        for t, s in waiting:
            if now - t < VIP_WAIT_TIME:
                self._send(s)
            else:
                self.engine.stats["vip-wait-dropped"] += 1

    def _next_deadline(self) -> float | None:
        d = self.engine.next_deadline()
        if self._reserved_due is not None:  # (an open transfer's: at its end, on_transfer)
            d = self._reserved_due if d is None else min(d, self._reserved_due)
        r = self._restarts.next_deadline()
        if r is not None:
            d = r if d is None else min(d, r)
        if self.mobile and any(ike.mobike_initiator and ike.state is IkeState.ESTABLISHED
                               for ike in self.engine.ike_sas()):  # fmt: skip
            d = self._path_check_at if d is None else min(d, self._path_check_at)
        if d is not None and self.fenced is not None:
            now = self.node.clock()
            if self.fenced(now):
                return max(d, now + 0.1)  # look again later: nothing is sent meanwhile
        return d

    def _on_timer(self, now: float) -> None:
        if self.fenced is not None and self.fenced(now):
            return
        if self.mobile and now >= self._path_check_at:
            self._path_check_at = now + PATH_CHECK
            self._check_paths(now)
        self._act(self.engine.tick(now))
        self._run_restarts(now)
        if self._reserved_due is not None and now >= self._reserved_due:
            self._prune_reserved(now)  # (sets the next one: never one past)

    def _check_paths(self, now: float) -> None:
        """A mobile node: the source address its routes pick toward the peer of each IKE SA
        it initiated; when it is no longer the IKE SA's, the engine moves the IKE SA and its
        CHILD SAs there and tells the peer (MOBIKE UPDATE_SA_ADDRESSES). No route (between
        two networks): nothing is sent, logged once, looked at again."""
        for ike in self.engine.ike_sas():
            if not ike.mobike_initiator or ike.state is not IkeState.ESTABLISHED:
                continue
            host = source_address(ike.remote)
            if host is None:
                if ike.uid not in self._no_route:
                    self._no_route.add(ike.uid)
                    event(log, "ike-no-route", logging.WARNING, node=self.node.name,
                          conn=ike.conn.name, peer=ike.remote,
                          detail="no address to reach the peer from: waiting for one")
                continue
            self._no_route.discard(ike.uid)
            if host != ike.local.host:
                event(log, "ike-local-address-changed", node=self.node.name,
                      conn=ike.conn.name, peer=ike.remote, old=ike.local.host, new=host,
                      mobike=ike.mobike)  # fmt: skip
                self._act(self.engine.local_moved(ike, Address(host, ike.local.port), now))

    # -- what the engine decided ------------------------------------------------------------
    def _act(self, outputs: list[Output], changed: bool = True) -> None:
        """Carry out what the engine decided; ``changed``: the engine call may have changed
        an IKE SA (False: it only answered, a cookie, a retransmission, or dropped)."""
        if changed:
            self._changes += 1
        for o in outputs:
            try:
                self._one(o)
            except IpsecctError as exc:  # e.g. an SPI clash in the SAD: log, keep running
                event(log, "ike-install-failed", logging.WARNING, node=self.node.name,
                      error=str(exc))  # fmt: skip
        if changed:
            self.node.timers.poke()  # the engine's next deadline may have moved

    def _encap(self, ike: IkeSA) -> UdpEncap | None:
        if ike.encap or not self.node.cfg.raw_esp:
            peer = ike.child_remote
            port = peer.port if peer.port != IKE_PORT else 4500
            return UdpEncap(self.node.cfg.outer.port, port)
        return None

    def _position(self, o: ChildUp) -> int:
        """Where a new CHILD SA's policy goes: first (it takes the traffic from now on), except
        when the peer rekeyed: then right after the SA it replaces, which carries the traffic
        until the peer, having installed the new SA, deletes it (strongSwan as responder
        waits for the DELETE the same way)."""
        old = o.replaces.handle if o.replaces is not None else None
        if old is not None:
            i = self.node.engine.spd.index_of(old.entry)  # type: ignore[attr-defined]
            if i is not None:
                return i + 1
        return 0

    def _shadow(self, inbound: Any, wait: float) -> None:
        """``inbound`` (a shadow in the engine) goes ``wait`` seconds from now."""
        old = self._shadows.pop(inbound.spi, None)
        if old is not None:
            old[1].cancel()
            if old[0] is not inbound:  # (an SPI is one SA's at a time: not kept for ever)
                self.node.engine.remove_shadows(old[0])
        handle = asyncio.get_running_loop().call_later(wait, self._unshadow, inbound)
        self._shadows[inbound.spi] = (inbound, handle)

    def _unshadow(self, inbound: Any) -> None:
        cur = self._shadows.get(inbound.spi)
        if cur is not None and cur[0] is inbound:
            del self._shadows[inbound.spi]
        self.node.engine.remove_shadows(inbound)

    def _one(self, o: Output) -> None:
        eng = self.node.engine
        if isinstance(o, Send):
            self._send(o)
            return
        for listener in self.listeners:
            listener(o)
        if isinstance(o, ConnectFailed):
            event(log, "ike-connect-failed", logging.WARNING, node=self.node.name,
                  conn=o.conn.name, reason=o.reason)  # fmt: skip
            self._tries[o.conn.name] = self._tries.get(o.conn.name, 0) + 1
            self._retry_later(o.conn, why=o.reason)
        elif isinstance(o, ChildUp):
            ike, child = o.ike, o.child
            label = _label(ike, child)
            enc = self._encap(ike)
            here = ike.local.host if self.mobile else self.local_host
            local = Address(here, enc.sport if enc else 0)
            remote = Address(ike.child_remote.host, enc.dport if enc else 0)
            entry, out, inn = child.sas(local, remote, enc is not None, label)
            out.created = inn.created = self.node.clock()
            self._born_with[child.spi_out] = [c.spi_out for c in ike.children if c is not child]
            while len(self._born_with) > BORN_WITH_MAX:
                del self._born_with[next(iter(self._born_with))]
            child.handle = eng.add_tunnel(entry, out, inn, index=self._position(o))
            self._restarts.up(f"{ike.conn.name}/{child.config.name}", self.node.clock())
            event(log, "child-sa-installed", node=self.node.name, child=label,
                  spi_in=f"0x{child.spi_in:08x}", spi_out=f"0x{child.spi_out:08x}",
                  encap=enc is not None)  # fmt: skip
        elif isinstance(o, ChildDown):
            t = o.child.handle
            self._born_with.pop(o.child.spi_out, None)
            if t is not None:
                eng.remove_tunnel(t)  # type: ignore[arg-type]
                o.child.handle = None
                inbound = t.inbound  # type: ignore[attr-defined]
                if (o.child.rekeyed and o.reason in ("deleted by peer", "rekeyed")
                        and inbound is not None):  # fmt: skip
                    # The peer deleted the SA it rekeyed, or we delete the one we rekeyed:
                    # what the peer sent on it just before may still be on its way (by the
                    # old gateway after a handover): our inbound half takes it for a moment
                    # longer (replay-checked, never sent on). A peer that answered our rekey
                    # goes on sending on the old SA until our DELETE reaches it (strongSwan
                    # does): then until that DELETE is answered (DeleteAnswered), however
                    # many times it is sent; after DELETE_WAIT the IKE SA is dead anyway.
                    eng.add_shadow(inbound)
                    by_us = o.reason == "rekeyed"
                    self._shadow(inbound, DELETE_WAIT if by_us else INBOUND_GRACE)
            event(log, "child-sa-removed", node=self.node.name, child=_label(o.ike, o.child),
                  spi_in=f"0x{o.child.spi_in:08x}", reason=o.reason)  # fmt: skip
            if (o.reason == "deleted by peer" and not o.child.rekeyed
                    and o.child.config.close_action != "none"
                    and o.ike.state is IkeState.ESTABLISHED and not self._stopping):  # fmt: skip
                # the peer closed a CHILD SA and kept the IKE SA: close_action = start asks
                # for a new one in it (at once the first time, then with back-off: a peer
                # that deletes each is not asked in a loop); trap arms a trap whose packet
                # does (_acquire)
                cc = o.child.config
                event(log, "ike-close-action", node=self.node.name, conn=o.ike.conn.name,
                      child=o.child.name, action=cc.close_action)  # fmt: skip
                if cc.close_action == "start":
                    self._schedule(f"{o.ike.conn.name}/{cc.name}", (o.ike, cc), True,
                                   o.reason, conn=o.ike.conn.name, child=cc.name)  # fmt: skip
                elif (o.ike.conn, cc) not in self._traps:
                    self._traps.append((o.ike.conn, cc))
                    self.node.engine.on_policy_miss = self._acquire
        elif isinstance(o, PeerMoved):
            # the peer moved, or (a mobile node) we did: the CHILD SAs' outer addresses
            # follow the IKE SA's (the SAs themselves, their keys and counters, stay), or
            # the address verified before a MOBIKE update still being checked
            enc = self._encap(o.ike)
            ours = o.ike.local.host if self.mobile else None
            theirs = o.ike.child_remote.host
            for c in o.ike.children:
                t = c.handle
                if t is None:
                    continue
                for sa in t.sas():  # type: ignore[attr-defined]
                    sa.encap = enc
                    if sa is t.outbound:  # type: ignore[attr-defined]
                        eng.rekey_sa(sa, dst=theirs, src=ours)
                    else:
                        eng.rekey_sa(sa, src=theirs, dst=ours)
            was = o.was
            if (was is not None and was.host == o.ike.remote.host and was.port == IKE_PORT
                    and o.ike.remote.port != IKE_PORT):  # fmt: skip
                # every client that UDP-encapsulates moves from 500 to the NAT-T port in its
                # IKE_AUTH (RFC 7296 §2.23): "ike-peer-moved" there read as a roaming client
                event(log, "ike-nat-t-float", logging.DEBUG, node=self.node.name,
                      peer=o.ike.remote, was=was, local=o.ike.local)  # fmt: skip
            else:
                event(log, "ike-peer-moved", node=self.node.name, peer=o.ike.remote,
                      was=was or "", local=o.ike.local)  # fmt: skip
        elif isinstance(o, DeleteAnswered):
            for spi in o.spis:  # the peer has it: what it sent on them is on its way, at most
                if spi in self._shadows:
                    self._shadow(self._shadows[spi][0], INBOUND_GRACE)
        elif isinstance(o, ReplayCounterSynced):
            # RFC 6311: the peer's new member asks us to move our outbound counters forward
            # (the engine checked the delta against our policy; forward only here)
            for c in o.ike.children:
                t = c.handle
                if t is not None:
                    out_sa = t.outbound  # type: ignore[attr-defined]
                    old = out_sa.seq
                    new = out_sa.advance_seq(o.delta)
                    event(log, "ike-replay-counter-advanced", node=self.node.name,
                          spi_out=f"0x{out_sa.spi:08x}", seq_from=old, seq_to=new)  # fmt: skip
        elif isinstance(o, IkeUp):
            self._restarts.up(o.ike.conn.name, self.node.clock())
            self._tries.pop(o.ike.conn.name, None)
            self._restarting.discard(o.ike.conn.name)
            event(log, "ike-sa-up", node=self.node.name, conn=o.ike.conn.name,
                  peer=o.ike.remote, id=o.ike.peer_id)  # fmt: skip
            if o.ike.vips_given and o.ike.vips:
                self._vips_up(o.ike)
            if o.ike.we_initiated and not self._stopping:
                self._start_others(o.ike, o.auth_child)
        elif isinstance(o, IkeRekeyed):
            event(log, "ike-sa-rekeyed", node=self.node.name, conn=o.new.conn.name,
                  peer=o.new.remote, spi_i=o.new.spi_i.hex(), spi_r=o.new.spi_r.hex())  # fmt: skip
        elif isinstance(o, IkeDown):
            event(log, "ike-sa-down", node=self.node.name, conn=o.ike.conn.name,
                  peer=o.ike.remote, reason=o.reason)  # fmt: skip
            if o.ike.vips_given and o.ike.vips:
                self._vips_down(o.ike)
            self._after_down(o.ike, o.reason)

    def _start_others(self, ike: IkeSA, first: ChildConfig | None) -> None:
        """An IKE SA we initiated is up (at start, a retry, a dpd_action/close_action
        restart, a trap's): ask in it, by CREATE_CHILD_SA one after the other, for each
        other ``start_action = start`` child of its connection that it has no CHILD SA of
        and that is not asked for yet. Not the one its IKE_AUTH asked for (``first``), taken
        or refused: a child the peer refuses is logged once (child-create-failed) and not
        asked for again in this IKE SA. A rekeyed IKE SA keeps its children (no IkeUp)."""
        now = self.node.clock()
        for cc in ike.conn.children:
            if cc.start_action != "start" or cc is first or ike.has_or_asks(cc):
                continue
            self.engine.stats["child-start-asked"] += 1
            event(log, "ike-child-start", node=self.node.name, conn=ike.conn.name,
                  child=cc.name)  # fmt: skip
            self._act(self.engine.create_child(ike, cc, now))

    # -- virtual IPs the peer gave us (a mobile node's vips = ["0.0.0.0"]) ---------------------
    def _vips_up(self, ike: IkeSA) -> None:
        """Put the addresses the peer gave us on the inner TUN device and make them the
        source of the configured inner routes of their family (as strongSwan's routes in
        table 220 carry ``src``), so that what the host sends into the tunnel comes from
        the address the CHILD SA's local selector is. A node without a TUN (inner UDP)
        only shows them (``sa list``)."""
        from . import tun

        addrs = [a for _, a in ike.vips]
        name = self.node.tun_name
        event(log, "ike-vip-installed", node=self.node.name, conn=ike.conn.name,
              vips=",".join(map(str, addrs)), device=name or "-")  # fmt: skip
        if name is None:
            return
        try:
            for a in addrs:
                tun.ip("addr", "replace", f"{a}/{a.max_prefixlen}", "dev", name)
                for r in self.node.cfg.inner.routes:
                    if ipaddress.ip_network(r, strict=False).version == a.version:
                        tun.ip("route", "replace", r, "dev", name, "src", str(a))
        except (TunError, ValueError) as exc:
            event(log, "ike-vip-install-failed", logging.WARNING, node=self.node.name,
                  error=str(exc))  # fmt: skip

    def _vips_down(self, gone: IkeSA) -> None:
        """The IKE SA the peer gave these addresses to ended (an IKE rekey hands them to
        the new one, which ends later): off the TUN device, unless another IKE SA of ours
        holds one (the peer gave it again before the old one was gone)."""
        from . import tun

        held = {a for ike in self.engine.ike_sas() if ike is not gone and ike.vips_given
                and ike.state is not IkeState.DEAD for _, a in ike.vips}  # fmt: skip
        addrs = [a for _, a in gone.vips if a not in held]
        name = self.node.tun_name
        event(log, "ike-vip-removed", node=self.node.name, conn=gone.conn.name,
              vips=",".join(map(str, addrs)) or "-")  # fmt: skip
        if not addrs or name is None:
            return
        try:
            for a in addrs:
                tun.ip("addr", "del", f"{a}/{a.max_prefixlen}", "dev", name)
            for r in self.node.cfg.inner.routes:  # as configured again
                tun.ip("route", "replace", r, "dev", name)
        except (TunError, ValueError) as exc:
            event(log, "ike-vip-remove-failed", logging.WARNING, node=self.node.name,
                  error=str(exc))  # fmt: skip

    # -- moving IKE SAs with their CHILD SAs (context transfer) ------------------------------
    async def quiesce(self, tunnels: list[Any]) -> list[Any]:
        """Before a transfer of ``tunnels`` starts here (source): if an exchange this gateway
        started is in flight on the IKE SA of one of their CHILD SAs (a rekey, a liveness
        check, a DELETE), the IKE SA starts nothing new and the transfer waits until it is
        done (at most QUIESCE_TIME; then TransferError, and nothing moved). Its outcome
        may have changed the CHILD SAs: returns the tunnels to move now, those still here
        and the successors of any rekeyed meanwhile. Without such an exchange, at once."""
        spis = {sa.spi for t in tunnels for sa in t.sas()}
        outs = {c.spi_out for ike in self.engine.ike_sas() for c in ike.children
                if c.spi_in in spis or c.spi_out in spis}  # fmt: skip
        first = set(outs)

        def involved(known: list[IkeSA]) -> list[IkeSA]:
            # the IKE SAs known so far (a CHILD rekey replaces their CHILD SAs) and any that
            # holds one of those CHILD SAs (an IKE rekey moves them to a new IKE SA)
            out = [ike for ike in known if ike.state is not IkeState.DEAD]
            out += [ike for ike in self.engine.ike_sas() if ike.state is not IkeState.DEAD
                    and ike not in out and any(c.spi_out in outs for c in ike.children)]
            return out  # fmt: skip

        def busy(ikes: list[IkeSA]) -> bool:
            return any(i.pending is not None or i.queued_deletes for i in ikes)

        ikes = involved([])
        if not busy(ikes):
            return tunnels
        self.engine.stats["transfer-waited"] += 1
        event(log, "ike-transfer-waits", node=self.node.name, ike_sas=len(ikes),
              exchanges=",".join(i.pending.kind for i in ikes if i.pending))  # fmt: skip
        deadline = self.node.clock() + QUIESCE_TIME
        while True:
            for ike in ikes:
                ike.quiet = True
                outs.update(c.spi_out for c in ike.children)  # a rekey's successor too
            if not busy(ikes):
                break
            if self.node.clock() >= deadline:
                for ike in ikes:
                    self._unquiet(ike)
                self.node.timers.poke()
                raise TransferError("an IKE exchange of this gateway on the IKE SA is still "
                                    "in flight: try again")  # fmt: skip
            await asyncio.sleep(QUIESCE_POLL)
            ikes = involved(ikes)
        for ike in ikes:
            # (quiet again from the transfer's start, which follows at once; a request of
            # the peer held meanwhile goes with the IKE SA)
            ike.quiet = False
        eng = self.node.engine
        now: list[Any] = [t for t in tunnels
                           if eng.tunnel_by_spi(t.outbound.spi, Direction.OUTBOUND) is t]
        for ike in ikes:
            for c in ike.children:
                t = c.handle
                if c.spi_out not in first and t is not None and t not in now:
                    now.append(t)
        if not now:
            raise TransferError("the tunnels went while an IKE exchange finished: try again")
        return now

    def transfer_started(self, spis: set[int]) -> None:
        """A transfer of tunnels with these SPIs starts here (source): the IKE SAs of their
        CHILD SAs start no exchange until it ends (ikesa.IkeSA.quiet); an exchange already
        in flight finishes (the export waits for it)."""
        for ike in self.engine.ike_sas():
            if any(c.spi_in in spis for c in ike.children):
                ike.quiet = True

    def leases_leaving(self, tunnels: Sequence[Any]) -> None:
        """A transfer of ``tunnels`` is about to be recorded "leaving" (the durable state
        calls this first, so that it writes these before those rows, which the COMMIT waits
        for): the leases of their IKE SAs are "leaving" in the durable state (a crash from
        now on may leave the IKE SA at the target: away after the restart)."""
        for t in tunnels:
            ike = self.ike_holding(t)
            if ike is not None:
                self._note_leases(ike, "leaving")

    def _note_leases(self, ike: IkeSA, state: str = "online") -> None:
        """The leases ``ike`` holds here (not the addresses given to us) are told to the
        durable state as ``state`` (Pool.note; "online": it stays here after its transfer)."""
        if not ike.vips_given:
            for name, a in ike.vips:
                pool = self.engine.pools.get(name)
                if pool is not None:
                    pool.note(a, state)

    def _request_held(self, ike: IkeSA) -> None:
        """A request of the peer is held on quiet ``ike``: told to the hooks after this
        turn (the engine is inside its receive)."""
        if self.request_held:
            spis = {c.spi_in for c in ike.children}
            for cb in list(self.request_held):
                asyncio.get_running_loop().call_soon(cb, spis)

    def on_transfer(self, rec: Any) -> None:
        """A finished transfer (ct.transfer.Record): when this gateway handed over every CHILD
        SA of an IKE SA, the IKE SA follows them (its context CDBs to the same peer); if it
        did not commit, the IKE SAs it quietened start their exchanges again."""
        if rec.role == "target" and self._reserved:
            self._prune_reserved(self.node.clock())  # (a reservation of that transfer)
            self.node.timers.poke()  # (committed: looked at again RESERVE_AFTER_COMMIT on)
        if rec.role == "source" and self._serials_announced:
            ended = set(rec.spis)
            for ike in self.engine.ike_sas():
                if any(c.spi_in in ended for c in ike.children):
                    self._serials_announced.discard((ike.spi_i, ike.spi_r))
        if rec.role == "target" and rec.outcome == "committed":
            self._early_since = self.node.clock()
            self._early_until = self._early_since + EARLY_IKE_TIME
            return
        if rec.role == "source" and rec.outcome not in ("committed", "partial"):
            back = set(rec.spis)
            for ike in self.engine.ike_sas():
                if any(c.spi_in in back for c in ike.children):
                    self._note_leases(ike)
                    if ike.quiet:
                        self._unquiet(ike)
            self.node.timers.poke()
            return
        if rec.role != "source" or self.send_context is None:
            return
        moved = set(rec.spis)
        for ike in self.engine.ike_sas():
            spis = {c.spi_in for c in ike.children}
            if not spis or not spis <= moved:
                if spis & moved:
                    event(log, "ike-sa-stays", logging.WARNING, node=self.node.name,
                          conn=ike.conn.name, reason="not all its CHILD SAs moved")  # fmt: skip
                    self._note_leases(ike)
                if ike.quiet:
                    self._unquiet(ike)  # it stays here: its exchanges go on
                    self.node.timers.poke()
                continue
            # After what is waiting on the event loop now (the packets that reached us while
            # the transfer committed, forwarded to the target in this turn): the channel is
            # ordered, and the target's import of the IKE SA (a millisecond or so) should not
            # hold those up there. The IKE SA stays quiet meanwhile, as while the transfer
            # ran: a request that would change it is held and follows the context.
            asyncio.get_running_loop().call_later(0, self._export, ike, rec.peer, 0)

    def unit_cdbs(self, tunnels: list[Any]) -> list[bytes]:
        """The UNIT CDBs of a transfer of ``tunnels`` (source): one per IKE SA whose CHILD SAs
        go, with the SPIs of those that go and what the target needs to take the IKE SA, so
        that a target that could not (no such connection) refuses them all before the
        commit instead of taking the CHILD SAs and dropping their IKE SA after it."""
        going = {t.outbound.spi for t in tunnels}
        now = self.node.clock()
        out = []
        for ike in self.engine.ike_sas():
            children = [c for c in ike.children if c.spi_out in going]
            if children:  # one UNIT CDB, or several when its policy items need them
                spis = [c.spi_out for c in children]
                payloads = ike_context.unit_payloads(ike, children, now)
                out += [unit_cdb(UNIT_IKEV2, spis, p) for p in payloads]
                key = (ike.spi_i, ike.spi_r)
                if ike_context.announces_serials(ike, now, payloads):
                    self._serials_announced.add(key)
                else:
                    self._serials_announced.discard(key)
        return out

    def _following(self, tunnels: list[Any]) -> list[IkeSA]:
        """The IKE SAs that follow a transfer of ``tunnels`` (on_transfer): all their CHILD
        SAs go. (By the CHILD SAs' index: a handover's check does not walk every IKE SA.)"""
        spis = {sa.spi for t in tunnels for sa in t.sas()}
        out: list[IkeSA] = []
        seen: set[int] = set()
        for t in tunnels:
            ike = self.ike_holding(t)
            if ike is None or id(ike) in seen:
                continue
            seen.add(id(ike))
            mine = {c.spi_in for c in ike.children}
            if mine and mine <= spis:
                out.append(ike)
        return out

    def commit_check(self, tunnels: list[Any]) -> str | None:
        """Asked by the transfer core at a transfer's start and just before its COMMIT goes
        out (source): can each IKE SA that will follow these tunnels be exported? Its
        context is encoded (and dropped) now, under the quiet IKE SA, so that the export
        after the COMMIT cannot fail for the same reason and split the unit (CHILD SAs at
        the target, their IKE SA here). None if so, else why not (the transfer is refused
        or rolled back; logged ``ike-sa-cannot-move``). An exchange of ours in flight is
        no reason: the export waits for it. Nor may the context carry less than the
        transfer's UNIT announced: one that no longer has room for the peer's chain serials
        the UNIT carried (item 15; it grew since) would be refused after the COMMIT by a
        target under remote.revocation = strict, which admitted the UNIT. Nor one whose
        UNIT has no room for the peer's identity (a long one, many CHILD SAs): the target
        could check it (remote.id, keys, CA, revocation, unique) only at the import."""
        now = self.node.clock()
        for ike in self._following(tunnels):
            err = None
            try:
                ike_context.encode(ike, now)
                if ((ike.spi_i, ike.spi_r) in self._serials_announced
                        and not ike_context.carries_serials(ike, now)):  # fmt: skip
                    err = ("its context no longer has room for the peer's chain serials"
                           " its UNIT announced")  # fmt: skip
                elif not ike_context.unit_announces(ike, ike.children):
                    err = (f"its peer identity ({len(ike.peer_id.encode())} octets) is too"
                           " long for its UNIT: the target could check it only after the"
                           " commit")  # fmt: skip
            except Exception as exc:  # anything: after the COMMIT it would split the unit
                # (an unexpected exception's text is not logged: it may quote a value)
                err = str(exc) if isinstance(exc, IkeContextError) else type(exc).__name__
            if err is not None:
                self.engine.stats["ike-sa-cannot-move"] += 1
                event(log, "ike-sa-cannot-move", logging.WARNING, node=self.node.name,
                      conn=ike.conn.name, peer=ike.remote, spi_i=ike.spi_i.hex(),
                      spi_r=ike.spi_r.hex(), error=err,
                      effect="its transfer does not commit; it stays here with its CHILD SAs"
                      )  # fmt: skip
                return (f"ike-sa-cannot-move: the IKE SA {ike.spi_i.hex()}/{ike.spi_r.hex()}"
                        f" of {ike.conn.name!r} cannot be exported ({err})")  # fmt: skip
        return None

    def check_unit(self, peer: str, payload: bytes, tid: int | None = None,
                   spis: Sequence[int] = ()) -> str | None:  # fmt: skip
        """Can this gateway take the IKE SA a peer's transfer announces (target)? None if so,
        else why not (logged). Admitted in transfer ``tid`` (naming its tunnels ``spis``):
        its virtual IPs are reserved here until the transfer ends without it, or refuses
        the unit's tunnels after all (unit_kept), or its context comes after the COMMIT
        (RESERVE_AFTER_COMMIT, or as long as one of those tunnels is still here), so that
        no new client leases them meanwhile. A peer holds at most RESERVED_PER_TUNNEL
        reserved addresses per tunnel its units name."""
        self._prune_reserved(self.node.clock())
        why = ike_context.unit_refusal(payload, self.engine.connections)
        owner = None if tid is None else f"{peer}/{tid:016x}"
        kept = None if tid is None else self._reserved.get((peer, tid))
        if why is None and kept is not None and kept.until is not None:
            # (ids are random: only a peer that means it reuses one) its units' addresses
            # would be kept with the committed transfer's, its unit_kept give those back
            self.engine.stats["vip-reserve-refused"] += 1
            why = (f"{peer} reused transfer id {tid:016x}, whose committed transfer's"
                   " virtual IPs are still reserved here")  # fmt: skip
        if why is None:  # its virtual IPs: from our pool of that name, not leased here
            try:
                name, vips = ike_context.unit_vips(payload)
            except IkeContextError as exc:
                why = str(exc)
            else:
                conn = next(c for c in self.engine.connections if c.name == name)
                peer_id = ike_context.unit_identity(payload)
                why = self.engine.vip_refusal(conn, False, vips, owner=owner)
                if why is None and peer_id is not None:  # unique, the per-identity bound
                    why = self.engine.arrival_refusal(conn, peer_id)
                if why is None and owner is not None and tid is not None and vips:
                    why = self._reserve(peer, tid, owner, vips, peer_id, payload, spis)
        if why is None:
            self._announce(peer, payload)
        if why is not None:
            if why.startswith(ike_context.UNCHECKED_REVOCATION):
                self.engine.stats["revocation-unchecked-refused"] += 1
            if why == ike_context.UNIDENTIFIED:
                self.engine.stats["unit-unidentified-refused"] += 1
            event(log, "ike-sa-refused", logging.WARNING, node=self.node.name, peer=peer,
                  error=why, when="before the transfer")  # fmt: skip
        return why

    def check_unit_whole(self, peer: str, spis: list[int], payloads: list[bytes],
                         sels: Mapping[int, list[Selectors]]) -> str | None:  # fmt: skip
        """The UNIT payloads of one IKE SA's unit (naming ``spis``), each admitted by
        :meth:`check_unit`: do they announce (and so had checked before the COMMIT) the
        peer's identity? A unit in pieces none of which carries it (a hostile or broken
        source) would commit with the identity, ``unique`` and the per-identity bound
        unchecked (counted ``unit-unidentified-refused``). And do the tunnels the transfer
        brings for them (``sels``) carry only traffic the CHILD configurations the unit names
        admit? The selectors it announces are the source's word, not what is installed
        (counted ``unit-tunnels-refused``). None if so, else why not (logged)."""
        why = ike_context.unit_whole_refusal(payloads)
        if why is not None:
            self.engine.stats["unit-unidentified-refused"] += 1
        else:
            why = ike_context.unit_tunnels_refusal(payloads, spis, sels,
                                                   self.engine.connections)  # fmt: skip
            if why is not None:
                self.engine.stats["unit-tunnels-refused"] += 1
        if why is not None:
            event(log, "ike-sa-refused", logging.WARNING, node=self.node.name, peer=peer,
                  error=why, when="before the transfer")  # fmt: skip
        return why

    def _tally(self, peer: str, addrs: int, tunnels: int) -> None:
        a, t = self._reserved_of.get(peer, (0, 0))
        a, t = a + addrs, t + tunnels
        if a or t:
            self._reserved_of[peer] = (a, t)
        else:
            self._reserved_of.pop(peer, None)

    def _reserve(self, peer: str, tid: int, owner: str, vips: list[tuple[str, IPAddr]],
                 peer_id: str | None, payload: bytes, spis: Sequence[int]
                 ) -> str | None:  # fmt: skip
        """Reserve ``vips`` for transfer ``tid`` of ``peer``; why not (the peer's bound)."""
        r = self._reserved.get((peer, tid)) or _Reserved()
        unit = tuple(spis)
        taken = next((v for v in vips if r.unit_of.get(v, unit) != unit), None)
        if taken is not None:
            # a source leases an address to one IKE SA (the pieces of one unit name the
            # same tunnels): admitted, both units' CHILD SAs would carry it here
            self.engine.stats["vip-reserve-refused"] += 1
            return (f"virtual IP {taken[1]} of pool {taken[0]!r} is announced by another IKE"
                    f" SA of this transfer")  # fmt: skip
        new = [v for v in dict.fromkeys(vips) if v not in r.held]
        more = {s for s in spis if s not in r.spis}
        have, tunnels = self._reserved_of.get(peer, (0, 0))
        bound = RESERVED_PER_TUNNEL * (tunnels + len(more))
        if have + len(new) > bound:
            self.engine.stats["vip-reserve-refused"] += 1
            return (f"{peer} would hold {have + len(new)} reserved virtual IPs here, over"
                    f" {bound} ({RESERVED_PER_TUNNEL} per tunnel its transfers' units name)")
        for name, a in vips:
            self.engine.pools[name].reserve(a, peer_id, owner)  # (vip_refusal: it exists)
        for name, a in new:
            r.held[(name, a)] = None
            self.engine.stats["vip-reserved"] += 1
            event(log, "ike-vip-reserved", node=self.node.name, peer=peer,
                  id=f"{tid:016x}", pool=name, vip=a)  # fmt: skip
        r.spis |= more
        r.units.setdefault((payload, unit), []).extend(vips)
        for v in vips:
            r.unit_of.setdefault(v, unit)
        self._reserved[(peer, tid)] = r
        self._tally(peer, len(new), len(more))
        self.node.timers.poke()
        return None

    def unit_kept(self, peer: str, tid: int, kept: list[tuple[list[int], bytes]]) -> None:
        """The transfer core decided transfer ``tid``'s tunnels: of the units check_unit
        admitted, only ``kept`` (SPIs, payload) keep all theirs. The addresses that only
        the others reserved are given back now (a refused unit holds nothing)."""
        r = self._reserved.get((peer, tid))
        if r is None:
            return
        keep: dict[tuple[str, IPAddr], None] = {}
        spis: set[int] = set()
        for unit_spis, payload in kept:
            for v in r.units.get((payload, tuple(unit_spis)), ()):
                keep[v] = None
            spis.update(unit_spis)
        r.units.clear()
        r.unit_of.clear()
        gone = [v for v in r.held if v not in keep]
        self._tally(peer, 0, len(spis & r.spis) - len(r.spis))
        r.spis &= spis
        self._release(peer, tid, r, gone, "its unit was refused after its check")
        if not r.held:
            self._tally(peer, 0, -len(r.spis))
            del self._reserved[(peer, tid)]

    def _release(self, peer: str, tid: int, r: _Reserved, vips: list[tuple[str, IPAddr]],
                 reason: str) -> None:  # fmt: skip
        owner = f"{peer}/{tid:016x}"
        for name, a in vips:
            del r.held[(name, a)]
            pool = self.engine.pools.get(name)
            if pool is not None and pool.reserved.get(a, ("", ""))[1] == owner:
                pool.unreserve(a, owner)
                self.engine.stats["vip-unreserved"] += 1
                event(log, "ike-vip-unreserved", node=self.node.name, peer=peer,
                      id=f"{tid:016x}", pool=name, vip=a, reason=reason)  # fmt: skip
        self._tally(peer, -len(vips), 0)

    def _unit_alive(self, peer: str, r: _Reserved) -> bool:
        """Is a tunnel the reservation's units name still here, as ``peer`` handed it over?"""
        eng = self.node.engine
        for spi in r.spis:
            for sa in eng.find_sa(spi):
                t = eng.tunnel_of(sa)
                if (t is not None and t.outbound is sa and t.came_from == peer
                        and t.state is not TunnelState.MOVED and eng.has_tunnel(t)):  # fmt: skip
                    return True
        return False

    def _prune_reserved(self, now: float) -> None:
        """Reservations of transfers that ended without their IKE SA are given back: the
        transfer was refused, cancelled or failed, or it committed and the IKE SA's context
        did not come within RESERVE_AFTER_COMMIT and none of the tunnels its units name is
        still here (its import takes the addresses)."""
        for key, r in list(self._reserved.items()):
            state = self.incoming_state(*key)
            if state == "open":
                continue
            if state == "committed" and r.until is None:
                r.until = now + RESERVE_AFTER_COMMIT
                continue
            if r.until is not None and now < r.until:
                continue
            reason = "its transfer ended"
            if r.until is not None:  # committed: looked at once per RESERVE_RECHECK only
                owner = f"{key[0]}/{key[1]:016x}"
                if not any(self.engine.pools[n].reserved.get(a, ("", ""))[1] == owner
                           for n, a in r.held if n in self.engine.pools):  # fmt: skip
                    reason = "its IKE SA came"  # (its import took them: nothing given back)
                elif self._unit_alive(key[0], r):
                    r.until = now + RESERVE_RECHECK  # its CHILD SAs still use the addresses
                    continue
                else:
                    reason = "its IKE SA did not come after the COMMIT"
            del self._reserved[key]
            self._tally(key[0], 0, -len(r.spis))
            self._release(key[0], key[1], r, list(r.held), reason)
        self._reserved_due = min((r.until for r in self._reserved.values()
                                  if r.until is not None), default=None)  # fmt: skip

    def _unquiet(self, ike: IkeSA) -> None:
        """The IKE SA stays here after all: its exchanges go on, and the peer's request kept
        while it was quiet (engine: IkeSA.held) is processed now."""
        ike.quiet = False
        held = self.engine.take_held(ike)
        if held is not None:
            self.engine.stats["held-processed"] += 1
            datagrams, src, dst = held
            for data in datagrams:  # one, or its fragments in order
                self._act(self.engine.receive(data, src, dst, self.node.clock()))

    def _export(self, ike: IkeSA, peer: str, attempt: int) -> None:
        """The IKE SA follows its CHILD SAs, whose transfer to ``peer`` committed: its
        context goes there. What could make this fail was checked before the COMMIT
        (commit_check); whatever still does is caught here (_export_failed)."""
        sent: list[bool] = []  # (the context went out)
        try:
            self._export_once(ike, peer, attempt, sent)
        except Exception as exc:  # the COMMIT is out: never left to the event loop
            self._export_failed(ike, peer, type(exc).__name__, sent=bool(sent))

    def _export_once(self, ike: IkeSA, peer: str, attempt: int, sent: list[bool]) -> None:
        assert self.send_context is not None
        try:
            cdbs = self.engine.export_ike(ike, self.node.clock())
        except IkeContextError as exc:  # an exchange in flight: once it is done
            if attempt < 20 and ike.pending is not None:
                asyncio.get_running_loop().call_later(0.25, self._export, ike, peer, attempt + 1)
            else:
                self._export_failed(ike, peer, str(exc), sent=False)
            return
        for c in ike.children:
            c.handle = None  # the tunnels moved with the transfer
        self._changes += 1  # gone from here: the replication reports it
        _remember(self._moved, ike.our_spi, (peer, self.node.clock() + self.forward_time))
        self.send_context(peer, cdbs, ike.remote.host)
        sent.append(True)
        held = self.engine.take_held(ike)
        if held is not None:
            # the peer's request that reached us while the transfer ran (a CHILD or IKE
            # rekey, a DELETE) goes to the new gateway right behind the context, on the same
            # ordered channel, and is answered there as a forwarded request is
            # (a fragmented one as its fragments, one forwarding CDB each, in order: the new
            # gateway reassembles them as if they had come to it)
            datagrams, src, dst = held
            fwd = self.forward_ike
            if fwd is not None and all(len(d) <= ike_context.MAX_FORWARD for d in datagrams):
                for data in datagrams:
                    fwd(peer, ike_context.encode_forward(data, src, dst), src.host)
                self.engine.stats["held-forwarded"] += 1
            else:  # the peer sends it again (to the new gateway, or here: forwarded)
                self.engine.stats["held-dropped"] += 1
        event(log, "ike-sa-sent", node=self.node.name, conn=ike.conn.name, peer=peer,
              spi_i=ike.spi_i.hex(), spi_r=ike.spi_r.hex(), children=len(ike.children))  # fmt: skip

    def _export_failed(self, ike: IkeSA, peer: str, why: str, *, sent: bool) -> None:
        """The IKE SA could not follow its CHILD SAs, whose transfer to ``peer`` committed
        (docs/ikev2.md, "An IKE SA that cannot follow"). Counted (``ike-export-failed``)
        and logged with the IKE SA named. Still ours: deleted here (a DELETE to the peer,
        which drops it and its CHILD SAs and starts over), never kept running beside CHILD
        SAs it no longer has, never sent later. Exported already: left alone (the target
        may run it: nothing more is sent under its keys here)."""
        self.engine.stats["ike-export-failed"] += 1
        ours = ike.state is not IkeState.DEAD and self.engine.by_spi.get(ike.our_spi) is ike
        if sent:
            effect = "its context went to the target; what followed it did not"
        elif not ours:
            effect = "gone from here, not sent: the peer starts over once its DPD fails"
        else:
            effect = "deleted here (DELETE to the peer): the peer starts over"
        event(log, "ike-sa-export-failed", logging.ERROR, node=self.node.name,
              conn=ike.conn.name, peer=ike.remote, to=peer, spi_i=ike.spi_i.hex(),
              spi_r=ike.spi_r.hex(), children=len(ike.children), error=why,
              effect=effect)  # fmt: skip
        if not ours:
            return
        for c in ike.children:
            c.handle = None  # their tunnels are the target's now: not touched here
        self.engine.take_held(ike)  # (a request that would change it: it goes)
        ike.quiet = False
        try:
            self._act(self.engine.delete(ike, self.node.clock()))
        except Exception as exc:  # it cannot even say goodbye: dropped without a word
            self.engine.forget(ike)
            event(log, "ike-sa-forgotten", logging.ERROR, node=self.node.name,
                  conn=ike.conn.name, spi_i=ike.spi_i.hex(), spi_r=ike.spi_r.hex(),
                  error=type(exc).__name__)  # fmt: skip
        self._changes += 1
        self.node.timers.poke()

    def receive_context(self, peer: str, cdbs: list[bytes]) -> None:
        """An IKE SA a peer gateway handed over: take it and its CHILD SAs' tunnels (which
        arrived before it, by the ordinary transfer). Or an IKE request it forwarded."""
        if len(cdbs) == 1 and ike_context.is_forward(cdbs[0]):
            self.receive_forwarded(peer, cdbs[0])
            return
        now = self.node.clock()
        tunnels = self.node.engine

        def admit(ike: IkeSA) -> str | None:
            # Its CHILD SAs' tunnels must be ones this very peer handed over (they came
            # before it, by the transfer): a CHILD SA naming the inbound SPI of a tunnel
            # made here, or handed over by another gateway, would give that peer, which
            # made up the IKE SA's keys, the tunnel's rekeys, deletes and address updates.
            for c in ike.children:
                t = tunnels.tunnel_by_spi(c.spi_in, Direction.INBOUND)
                if t is not None and t.came_from != peer:
                    return (f"CHILD SA 0x{c.spi_in:08x} names a tunnel {peer} did not hand"
                            " over")  # fmt: skip
                if t is not None and self.awaiting_commit(t):
                    # The source sends it after its COMMIT, on the same ordered channel:
                    # before it, the transfer may yet be cancelled and the IKE SA stay
                    # there too (one IKE SA run by two gateways)
                    return (f"CHILD SA 0x{c.spi_in:08x} names a tunnel whose transfer has"
                            " no COMMIT yet")  # fmt: skip
            # An IKE SA follows its CHILD SAs (on_transfer: never one without): one none of
            # whose tunnels this peer handed over came without a transfer. Taken, it would
            # replace the identity's IKE SA here (unique) and hold the addresses it names.
            if not any(tunnels.tunnel_by_spi(c.spi_in, Direction.INBOUND) is not None
                       for c in ike.children):
                return f"none of its CHILD SAs names a tunnel {peer} handed over"
            # An address reserved for a transfer admits the IKE SA of its identity from the
            # peer whose transfer it is: taken by another's, it would refuse that IKE SA
            # after its COMMIT (its CHILD SAs here without it)
            for name, a in [] if ike.vips_given else ike.vips:
                pool = self.engine.pools.get(name)
                held = pool.reserved.get(a) if pool is not None else None
                if held is not None and held[1].rpartition("/")[0] != peer:
                    return f"virtual IP {a} of pool {name!r} is reserved here for another peer"
            return None

        try:
            ike = self.engine.import_ike(cdbs, now, admit=admit)
        except IkeContextError as exc:
            self.engine.stats["ike-context-refused"] += 1
            event(log, "ike-sa-refused", logging.WARNING, node=self.node.name, peer=peer,
                  error=str(exc))  # fmt: skip
            return
        self._attach(ike)
        coming = self._coming.get(peer)
        if coming is not None and coming.pop(ike.our_spi, None) is not None and not coming:
            del self._coming[peer]
        self._act(self.engine.arrived(ike, now))  # unique = replace: older ones here go
        self._changes += 1  # new here: replicated
        # what still reaches the old gateway for it may come here for forward_time
        _remember(self._arrived, ike.our_spi, (peer, now + self.forward_time))
        event(log, "ike-sa-received", node=self.node.name, conn=ike.conn.name, peer=peer,
              spi_i=ike.spi_i.hex(), spi_r=ike.spi_r.hex(), children=len(ike.children),
              tunnels=sum(c.handle is not None for c in ike.children))  # fmt: skip
        # our own NAT-T port when the IKE SA was on the old gateway's (the gateways' outer
        # ports need not be the same number; the demo's are not)
        port = ike.local.port if ike.local.port == self.ike_port else self.node.cfg.outer.port
        here = Address(self.local_host, port)
        if self.direct and here != ike.local:
            # the peer learns our address from an INFORMATIONAL sent from it (MOBIKE, or a
            # faked NAT-D float); its CHILD SAs' ESP already goes out from here (the transfer
            # made them ours) and what it still sends to the old gateway is forwarded
            self._act(self.engine.announce_move(ike, here, now))
        early, self._early = self._early, []
        for t, data, src, dst, via in early:  # what came for it before it
            if now - t >= EARLY_IKE_TIME:
                continue
            if self._not_here_yet(data):  # another IKE SA's, still on its way
                self._early.append((t, data, src, dst, via))
            elif via is not None and not self._forwarded_by_its_peer(data, src, via):
                # forwarded by a gateway that did not hand that IKE SA over (or not from
                # its own peer's address): as receive_forwarded refuses it
                self.engine.stats["forward-refused"] += 1
            else:
                self.engine.stats["early-replayed"] += 1
                self._act(self.engine.receive(data, src, dst, now))
        self.node.timers.poke()  # the engine's next deadline may have moved

    def _attach(self, ike: IkeSA) -> None:
        """An imported IKE SA's CHILD SAs get the tunnels the transfer or the take-over
        installed. When its peer's address awaits our return-routability check (its context
        says so), the CHILD SAs made before the check's answer send where those tunnels do
        (the last verified address, which the context does not carry), as at the gateway
        that checked first."""
        self._children_at = -1  # (tunnels installed before: child_of's index again)
        for c in ike.children:
            h = self.node.engine.tunnel_by_spi(c.spi_in, Direction.INBOUND)
            c.handle = h
            if h is not None:
                # Named with this gateway's unique id of the CHILD SA, as the ones made here
                # (swanctl's: one id, the same in sa list, sa show and the logs); the name
                # that came with the tunnel carries the id its source gave it.
                h.entry.name = h.outbound.name = _label(ike, c)
                if h.inbound is not None:
                    h.inbound.name = h.entry.name
        t = next((c.handle for c in ike.children if c.handle is not None), None)
        if t is not None and ike_context.address_unverified(ike) and ike.esp_remote is None:
            out_sa = t.outbound  # type: ignore[attr-defined]
            port = out_sa.encap.dport if out_sa.encap is not None else ike.remote.port
            ike.esp_remote = Address(out_sa.dst, port)
        self._order_rekeyed(ike)

    def _order_rekeyed(self, ike: IkeSA) -> None:
        """An imported CHILD SA the peer rekeyed and has yet to delete carries our traffic
        until it does, as it did at the old gateway (:meth:`_position`): its policy goes
        before its successor's, whatever order the tunnels arrived in (a transfer appends
        them, a take-over puts each first)."""
        pairs = [(c.handle.entry, c.successor.handle.entry)  # type: ignore[attr-defined]
                 for c in ike.children if c.successor is not None
                 and c.handle is not None and c.successor.handle is not None]  # fmt: skip
        for _ in range(len(pairs)):  # a chain (rekeyed twice) settles in as many passes
            if not any([self.node.engine.order_before(a, b) for a, b in pairs if a is not b]):
                break

    def liveness(self, ike: IkeSA) -> None:
        """Send a liveness check (an empty INFORMATIONAL) on ``ike`` now."""
        self._act(self.engine.liveness(ike, self.node.clock()))
    # -- fail-over: IKE SAs replicated to the standby (pair mode) or to the members that would
    # take their CHILD SAs (etcd mode), and taken over there ----------------------------------
    def poll_extra(self, now: float, full: bool, budget: int | None = None
                   ) -> tuple[list[tuple[bytes, list[bytes]]], list[bytes]]:  # fmt: skip
        """The pair mode's replication: see :meth:`IkeFeed.poll_extra`."""
        return self.feed.poll_extra(now, full, budget)

    def new_feed(
        self,
        select: Callable[[IkeSA], bool],
        token: Callable[[], object],
        key: Callable[[IkeSA], bytes] | None = None,
    ) -> IkeFeed:
        """A replication of the IKE SAs ``select`` picks (etcd mode: one per peer member);
        ``token`` changes whenever the selection may have (the member list, groups);
        ``key``: each IKE SA's key in the replica (by default our SPI; it starts with it)."""
        f = IkeFeed(self, select, token, key)
        self.feeds.append(f)
        return f

    def changed(self) -> int:
        """A number that moves whenever an IKE SA may have changed (every engine call)."""
        return self._changes

    def ike_holding(self, tunnel: Any) -> IkeSA | None:
        """The IKE SA whose CHILD SA holds ``tunnel`` (child_of); for a tunnel no CHILD SA
        holds yet, the one whose CHILD SA has its outbound SPI and no other tunnel. Not by
        that SPI first: it is the peer's choice, and two peers may choose one value (by
        chance, or one copying the other's from the ESP headers we send it)."""
        hit = self.child_of(tunnel)
        if hit is not None:
            return hit[0]
        spi = tunnel.outbound.spi
        ike = self.ike_of(spi)
        if ike is not None and any(c.spi_out == spi and c.handle in (None, tunnel)
                                   for c in ike.children):  # fmt: skip
            return ike
        return None

    def ike_of(self, spi_out: int) -> IkeSA | None:
        """The IKE SA a CHILD SA belongs to, by the CHILD SA's outbound SPI (the peer's
        choice: two IKE SAs' CHILD SAs may have one; :meth:`ike_holding` for a tunnel)."""
        if self._index_at != self._changes:
            self._index = {c.spi_out: ike for ike in self.engine.ike_sas() for c in ike.children}
            self._index_at = self._changes
        return self._index.get(spi_out)

    def siblings(self, spi_out: int) -> list[int]:
        """The outbound SPIs of the other CHILD SAs of this CHILD SA's IKE SA (now, and when
        it was made): they belong in one cluster group, so that a take-over moves them and
        their IKE SA as one unit."""
        out = list(self._born_with.get(spi_out, ()))
        ike = self.ike_of(spi_out)
        if ike is not None:
            out += [c.spi_out for c in ike.children if c.spi_out != spi_out]
        return out

    def transfer_unit(self, what: str) -> list[int] | None:
        """The inbound SPIs of the CHILD SAs that move together when an operator names
        ``what`` (``ipsecct transfer``), read as :meth:`_named` reads it: one IKE SA, all its
        CHILD SAs (an IKE SA moves with its CHILD SAs, as one unit). None: ``what`` names no
        IKE SA here (a manually keyed tunnel's SPI, or nothing). ValueError: it names more
        than one (a connection with two, or a CHILD SPI two IKE SAs have), or one with no
        CHILD SA."""
        found = self._named(what)
        if not found:
            return None
        if len(found) > 1:
            if any(c.name == what for c in self.engine.connections):
                raise ValueError(f"connection {what!r} has {len(found)} IKE SAs here: name one"
                                 " by its IKE SPI")  # fmt: skip
            # (a CHILD SA's outbound SPI is the peer's choice: two peers may pick one value)
            raise ValueError(f"SPI {what!r} is a CHILD SA's of {len(found)} IKE SAs here: name"
                             " one by its IKE SPI (see ipsecct sa list --ike)")  # fmt: skip
        (ike,) = found
        if not ike.children:
            raise ValueError(f"IKE SA of {ike.conn.name!r} has no CHILD SA to move")
        return [c.spi_in for c in ike.children]

    def tunnel_unit(self, tunnel: Any) -> list[int] | None:
        """The inbound SPIs of the CHILD SAs that move with ``tunnel`` (``ipsecct transfer
        SPI --dst ADDR``: the tunnel already named): those of the IKE SA whose CHILD SA holds
        it, all of them; None for a tunnel no CHILD SA holds (manually keyed)."""
        ike = self.ike_holding(tunnel)
        if ike is None or not ike.children:
            return None
        return [c.spi_in for c in ike.children]

    def forget_all(self, detail: str = "the standby took them over") -> None:
        """Another gateway took over our IKE SAs (the standby, or etcd ended our lease): drop
        them all without a DELETE (the fencing removed their tunnels)."""
        n = len(self.engine.ike_sas())
        for ike in self.engine.ike_sas():
            self.engine.forget(ike)
            for c in ike.children:
                c.handle = None
        self._changes += 1
        for f in self.feeds:
            f.reset()
        event(log, "ike-sas-forgotten", logging.WARNING, node=self.node.name, ike_sas=n,
              detail=detail)  # fmt: skip

    def take_over(self, contexts: list[list[bytes]], now: float, esp_delta: int) -> int:
        """The standby took over: install the replicated IKE SAs (their CHILD SAs' tunnels
        were installed just before, from the tunnel replicas) and resynchronise message IDs
        with each peer (RFC 6311 where the peer announced it). Returns how many it took."""
        taken = 0
        for cdbs in contexts:
            try:
                ike = self.engine.import_ike(cdbs, now)
            except IkeContextError as exc:
                self.engine.stats["ike-context-refused"] += 1
                event(log, "ike-sa-refused", logging.WARNING, node=self.node.name,
                      peer="replica", error=str(exc))  # fmt: skip
                continue
            taken += 1
            self._changes += 1
            self._attach(ike)
            self._act(self.engine.arrived(ike, now))
            event(log, "ike-sa-taken-over", node=self.node.name, conn=ike.conn.name,
                  peer=ike.remote, spi_i=ike.spi_i.hex(), spi_r=ike.spi_r.hex(),
                  children=len(ike.children),
                  tunnels=sum(c.handle is not None for c in ike.children),
                  mid_sync="rfc6311" if ike.mid_sync else "none")  # fmt: skip
            here = None
            if self.direct:  # direct SG identity: the peer is told our own address
                port = (ike.local.port if ike.local.port == self.ike_port
                        else self.node.cfg.outer.port)  # fmt: skip
                here = Address(self.local_host, port)
            self._act(self.engine.start_mid_sync(ike, now, esp_delta=esp_delta, local=here))
        return taken

    def check_replica(self, key: bytes, cdbs: list[bytes]) -> str | None:
        """At a replica holder (a standby, or an etcd member): could this gateway take over
        the IKE SA a replica holds, with its connections as they are? Checked when it
        arrives (``ikev2.context.replica_refusal``); a refusal is logged here once per IKE SA
        and reason, and the active is told (the fail-over protocol's SYNC_REFUSED)."""
        def vips(ike: IkeSA) -> str | None:  # from our pools, in their addrs (the
            # leases are taken at the take-over, when the peer's IKE SA is ours)
            why = self.engine.vip_refusal(ike.conn, ike.vips_given, ike.vips,
                                          leased=False)  # fmt: skip
            return why if why is not None else self._identity_refusal(key, ike)

        why = ike_context.replica_refusal(cdbs, self.engine.connections, self.node.clock(),
                                          vips)  # fmt: skip
        if why is not None:
            self._replica_forget(key)
        if why is None:
            if self._refusing.pop(key, None) is not None:
                event(log, "ike-replica-accepted", node=self.node.name,
                      spi=replica_spi(key).hex())  # fmt: skip
            return None
        self.engine.stats["replica-refused"] += 1
        if why.startswith(ike_context.UNCHECKED_REVOCATION):
            self.engine.stats["revocation-unchecked-refused"] += 1
        if self._refusing.get(key) != why:
            self._refusing.pop(key, None)
            self._refusing[key] = why
            while len(self._refusing) > MOVED_MAX:
                del self._refusing[next(iter(self._refusing))]
            event(log, "ike-replica-refused", logging.WARNING, node=self.node.name,
                  spi=replica_spi(key).hex(), error=why,
                  detail="this gateway could not take this IKE SA over (its connections "
                  "do not admit it): not kept; the active is told")  # fmt: skip
        return why

    def _identity_refusal(self, key: bytes, ike: IkeSA) -> str | None:
        """A replica's identity as an arriving IKE SA's (``unique = keep`` against the IKE
        SAs made here; MAX_IKE_SAS_PER_IDENTITY counting the identity's other replicas
        held here too): a take-over brings them all at once, and took them whatever those
        said (``unique-late``). None, and the replica is counted, if admitted."""
        ident = (ike.conn.name, ike.peer_id)
        keys = self._replica_ids.get(ident, {})
        held = self.replica_held
        for k in [k for k in keys if k == key or (held is not None and not held(k))]:
            self._replica_forget(k)
        why = self.engine.arrival_refusal(ike.conn, ike.peer_id,
                                          len(self._replica_ids.get(ident, ())))  # fmt: skip
        if why is None:
            self._replica_forget(key)
            self._replica_ids.setdefault(ident, {})[key] = None
            self._replica_id_of[key] = ident
            if len(self._replica_id_of) > 2 * MOVED_MAX and held is not None:
                for k in [k for k in self._replica_id_of if not held(k) and k != key]:
                    self._replica_forget(k)
        return why

    def _replica_forget(self, key: bytes) -> None:
        ident = self._replica_id_of.pop(key, None)
        if ident is not None:
            keys = self._replica_ids[ident]
            del keys[key]
            if not keys:
                del self._replica_ids[ident]

    @staticmethod
    def replica_tunnels(cdbs: list[bytes]) -> list[int]:
        """The outbound SPIs of the CHILD SAs an IKE SA replica holds (none if unreadable)."""
        try:
            return [o for _, o in ike_context.child_spis(cdbs)]
        except IkeContextError:
            return []

    def units_not_taken(self, units: list[tuple[bytes, str, list[int]]], peer: str) -> None:
        """A take-over left out the CHILD SAs of IKE SAs whose replicas this gateway refused
        (``units``: key, why, their tunnels' outbound SPIs): the IKE SA and its CHILD SAs are
        one unit, taken whole or not at all. The client starts over (a new IKE SA)."""
        for key, why, outs in units:
            self.engine.stats["unit-not-taken"] += 1
            self.engine.stats["unit-tunnels-not-taken"] += len(outs)
            event(log, "ike-unit-not-taken", logging.WARNING, node=self.node.name, peer=peer,
                  spi=replica_spi(key).hex(), tunnels=len(outs), error=why,
                  detail="this gateway refused this IKE SA's replica, so neither it nor its "
                  "CHILD SAs' tunnels were taken over: the client loses them and starts "
                  "over with a new IKE SA")  # fmt: skip

    def replica_refused(self, holder: str, key: bytes, why: str) -> None:
        """At the active: ``holder`` (the standby, or an etcd member) refused our IKE SA
        ``key``'s replica (``why``; "": it takes it now). A fail-over to it would lose the
        IKE SA: the operator is told now (log ``ike-replica-refused``, once per IKE SA,
        holder and reason; ``ipsecct status``: ``ike.replicas_refused``)."""
        ike = self.engine.by_spi.get(key)
        k = (holder, key)
        if not why:
            if self.replicas_refused.pop(k, None) is not None:
                event(log, "ike-replica-accepted", node=self.node.name, standby=holder,
                      spi=replica_spi(key).hex(),
                      conn=ike.conn.name if ike is not None else "")  # fmt: skip
            return
        if ike is None or ike.state is IkeState.DEAD:
            return  # gone meanwhile: nothing to tell
        old = self.replicas_refused.get(k)
        if old is not None and old[0] == why:
            return
        self.engine.stats["replica-refused-by-standby"] += 1
        self.replicas_refused.pop(k, None)
        self.replicas_refused[k] = (why, self.node.clock())
        while len(self.replicas_refused) > MOVED_MAX:
            del self.replicas_refused[next(iter(self.replicas_refused))]
        event(log, "ike-replica-refused", logging.WARNING, node=self.node.name,
              standby=holder, conn=ike.conn.name, peer=ike.remote, id=ike.peer_id,
              spi_i=ike.spi_i.hex(), spi_r=ike.spi_r.hex(), error=why,
              detail=f"{holder} could not take this IKE SA over: if this gateway fails, "
              f"{holder} takes neither it nor its CHILD SAs (one unit), and the client starts "
              "over with a new IKE SA (check that gateway's [connections])")  # fmt: skip

    def replicas_resync(self, holder: str) -> None:
        """Everything goes to ``holder`` again (it may have restarted with other
        connections): its refusals are forgotten until it repeats them."""
        for k in [k for k in self.replicas_refused if k[0] == holder]:
            del self.replicas_refused[k]

    def refused_replicas(self) -> list[dict[str, Any]]:
        """The refusals of IKE SAs still here (those gone are forgotten)."""
        out = []
        for (holder, key), (why, since) in list(self.replicas_refused.items()):
            ike = self.engine.by_spi.get(replica_spi(key))
            if ike is None or ike.state is IkeState.DEAD:
                del self.replicas_refused[(holder, key)]
                continue
            out.append({"standby": holder, "conn": ike.conn.name, "peer": str(ike.remote),
                        "id": ike.peer_id, "spi_i": ike.spi_i.hex(), "spi_r": ike.spi_r.hex(),
                        "reason": why,
                        "since_s": round(self.node.clock() - since, 1)})  # fmt: skip
        return out

    # -- control ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        ikes = self.engine.ike_sas()
        return {"ike_sas": len(ikes), "half_open": len(self.engine.half_open),
                # CHILD SAs of ours given up for now, asked for again after a back-off
                "children_not_established": sum(len(i.children_later) for i in ikes),
                "counters": dict(self.engine.stats),
                "pools": [p.status() for p in self.engine.pools.values()],
                "replicas_refused": self.refused_replicas()}  # fmt: skip

    def pools(self, leases: bool = False,
              limit: int | None = None) -> list[dict[str, object]]:  # fmt: skip
        """``ipsecct pools``: each pool's counts and, with ``leases``, its leases (address,
        online/offline/away, identity), by address, pool after pool: at most ``limit`` in
        the answer and at most POOL_LEASES_TEXT identity characters (a lease past either is
        not listed); per pool ``leases_total`` (all of its leases), ``leases_left_off``
        (those not listed) and ``truncated`` (some were not). ``limit`` None:
        POOL_LEASES_LISTED."""
        out: list[dict[str, object]] = []
        left = max(0, POOL_LEASES_LISTED if limit is None else limit)
        text = POOL_LEASES_TEXT
        for p in self.engine.pools.values():
            row = p.status()
            if leases:
                total = len(p.online) + len(p.offline) + len(p.away)
                listed = []
                # (the first ``left`` by address, without sorting all of them on the loop)
                for a, st, who in heapq.nsmallest(left, p.leases_unsorted(),
                                                  key=lambda r: int(r[0])):  # fmt: skip
                    if len(who) > text:
                        left = text = 0
                        break
                    text -= len(who)
                    listed.append({"address": str(a), "state": st, "identity": who})
                left -= len(listed)
                row["leases"] = listed
                row["leases_total"] = total
                row["leases_left_off"] = total - len(listed)
                row["truncated"] = total > len(listed)
            out.append(row)
        return out

    def give_back(self, text: str) -> dict[str, object]:
        """``ipsecct pools --release ADDR``: an away address (its IKE SA went to another
        gateway) is offline again here, on the operator's word that the IKE SA has ended
        there. Raises ValueError (not an address, or not away in any pool)."""
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"bad address {text!r}") from None
        pools = [p for p in self.engine.pools.values() if p.contains(addr)]
        if not pools:
            raise ValueError(f"{addr} is in no pool here")
        why = ""
        for p in pools:
            who = p.away.get(addr)
            w = p.give_back(addr)
            if w is None:
                event(log, "ike-vip-given-back", logging.WARNING, node=self.node.name,
                      pool=p.name, vip=addr, id=who,
                      detail="away, released by the operator: leased again here")  # fmt: skip
                return {"pool": p.name, "address": str(addr), "state": "offline",
                        "identity": who}  # fmt: skip
            why = w
        raise ValueError(why)

    @staticmethod
    def _esp_heard(ike: IkeSA) -> bool:
        """Whether the peer's ESP reached one of ``ike``'s CHILD SAs since the last look
        (the engine asks when a liveness check falls due: as charon, no check while the
        peer's traffic comes in). Read from each inbound SA's packet count (C's exact one
        on the native path), authenticated packets only; a CHILD SA's first look only
        records it (no evidence yet: the check goes as before)."""
        heard = False
        for c in ike.children:
            sa = getattr(c.handle, "inbound", None)
            if sa is None:
                continue
            n = sa.counters.packets
            if c.esp_in_seen is not None and n != c.esp_in_seen:
                heard = True
            c.esp_in_seen = n
        return heard

    def child_of(self, tunnel: object) -> tuple[IkeSA, ChildSA] | None:
        """The IKE SA and CHILD SA whose ESP SAs ``tunnel`` holds (None: not IKE-keyed).

        From an index built by one walk of every IKE SA and used while the node's tunnels
        do not change (``Engine.tunnel_changes``): a CHILD SA's tunnel is installed (or
        removed) when it gets (or loses) one. The fail-over driver asks this for each
        tunnel nearing a kept ceiling (``rekey_before_ceiling``): a walk each was O(IKE SAs)
        per tunnel, 10,000 x 10,000 when every tunnel got there at once. A hit is trusted
        only while its CHILD SA still holds the tunnel and its IKE SA is still the
        engine's (a handle dropped without a tunnel change, as a transfer does): else the
        index is built again."""
        changes = self.node.engine.tunnel_changes
        if changes != self._children_at:
            self._index_children(changes)
        hit = self._children.get(id(tunnel))
        if hit is None or self._current(hit, tunnel):
            return hit
        self._index_children(changes)
        hit = self._children.get(id(tunnel))
        return hit if hit is not None and hit[1].handle is tunnel else None

    def _current(self, hit: tuple[IkeSA, ChildSA], tunnel: object) -> bool:
        ike, child = hit
        return (
            child.handle is tunnel
            and self.engine.by_spi.get(ike.our_spi) is ike
            and any(c is child for c in ike.children)
        )

    def _index_children(self, changes: int) -> None:
        index: dict[int, tuple[IkeSA, ChildSA]] = {}
        for ike in self.engine.ike_sas():
            for child in ike.children:
                if child.handle is not None:
                    index.setdefault(id(child.handle), (ike, child))  # (the walk's first)
        self._children, self._children_at = index, changes

    def delete_child(self, ike: IkeSA, child: ChildSA) -> None:
        """The operator deletes a CHILD SA (``ipsecct sa delete``, as ``swanctl --terminate
        --child``): its DELETE goes to the peer and its SAs leave at once (ChildDown).
        Removing the SAs alone left the engine's CHILD SA listed as installed and the peer
        sending into it, unanswered, until its next rekey or liveness check."""
        if ike.quiet:
            raise IkeProtocolError("its IKE SA is being transferred: try again")
        if ike.state is not IkeState.ESTABLISHED:
            raise IkeProtocolError(f"its IKE SA is {ike.state.value}: try again")
        self._act(self.engine.delete_child(ike, child, self.node.clock()))
        event(log, "child-sa-deleted-by-operator", node=self.node.name,
              child=_label(ike, child), spi_in=f"0x{child.spi_in:08x}")  # fmt: skip

    def rekey(self, ike: IkeSA, child: ChildSA | None) -> None:
        """The operator rekeys a CHILD SA, or the IKE SA when ``child`` is None (``ipsecct sa
        rekey``, as ``swanctl --rekey --child/--ike``): the CREATE_CHILD_SA request goes to
        the peer now; the new SA replaces the old one when answered (a collision with the
        peer's own rekey is resolved as RFC 7296 §2.8 says). Raises IkeProtocolError, saying
        why, when it cannot go now: an exchange of ours in flight (window of one), the IKE SA
        not established, being transferred, the gateway fenced, or the CHILD SA rekeyed
        already (its successor is the one to rekey)."""
        now = self.node.clock()
        why = self.terminate_refusal(ike, now)
        if why is not None:
            raise IkeProtocolError(why.replace("not deleted", "not rekeyed")
                                   .replace("(delete the successor", "(rekey the successor"))
        if ike.state is not IkeState.ESTABLISHED:
            raise IkeProtocolError(f"its IKE SA is {ike.state.value}: try again")
        p = ike.pending
        if p is not None and p.kind != "liveness":
            raise IkeProtocolError(f"an exchange of ours is in flight ({p.kind}): try again")
        if p is not None:  # a liveness check gives way, as for sa delete
            ike.pending = None
        if child is not None:
            if child not in ike.children:
                raise IkeProtocolError("its IKE SA no longer has it: see ipsecct sa list --ike")
            if child.rekeyed:
                raise IkeProtocolError("it was rekeyed already: rekey its successor (see"
                                       " ipsecct sa list --ike)")  # fmt: skip
            outs = self.engine.rekey_child(ike, child, now)
        else:
            outs = self.engine.rekey_ike(ike, now)
        if ike.pending is None:
            self._act(outs)
            raise IkeProtocolError("no request could be sent (no inbound SPI or message ID"
                                   " left)")  # fmt: skip
        self._act(outs)
        event(log, "ike-rekey-by-operator" if child is None else "child-rekey-by-operator",
              node=self.node.name, conn=ike.conn.name, uid=ike.uid,
              child="-" if child is None else _label(ike, child),
              spi_in="-" if child is None else f"0x{child.spi_in:08x}")  # fmt: skip

    def find(self, what: str | None = None, uid: int | None = None) -> list[IkeSA]:
        """The IKE SAs an operator names (``ipsecct sa delete --ike``): by ``uid`` (the #N of
        ``sa list``, swanctl's ``--ike-id``), or by ``what``: a connection (each of its IKE
        SAs, as ``swanctl --terminate --ike NAME``), an IKE SPI (16 hex digits, initiator's
        or responder's, as ``sa list`` prints them, ``_i``/``_r`` allowed) or a CHILD SA's
        SPI (its IKE SA). A connection names its established IKE SAs only, as ``ipsecct
        transfer`` does: not a half-open one (anyone's IKE_SA_INIT), one a rekey replaced
        (its successor holds its CHILD SAs now) or one being deleted already. Raises
        ValueError, saying why, when nothing is named."""
        if uid is not None:
            found = [ike for ike in self.engine.ike_sas()
                     if ike.uid == uid and ike.state is not IkeState.DEAD]  # fmt: skip
            if not found:
                raise ValueError(f"no IKE SA #{uid} here (see ipsecct sa list --ike)")
            return found
        assert what is not None
        named = self._named(what)
        if named is not None and not named and any(c.name == what
                                                   for c in self.engine.connections):
            raise ValueError(f"connection {what!r} has no IKE SA here")
        if not named:
            raise ValueError(f"no IKE SA, connection or SPI {what!r} here (an IKE SPI is 16"
                             " hex digits, a CHILD SA's a number: decimal, or 0x... for hex;"
                             " see ipsecct sa list --ike)")  # fmt: skip
        if len(named) > 1 and not any(c.name == what for c in self.engine.connections):
            # (a peer chooses its side's SPIs, any value: another's, seen on the wire)
            raise ValueError(f"SPI {what!r} names {len(named)} IKE SAs here (#"
                             + ", #".join(str(i.uid) for i in named) + "): a peer chose"
                             " another's SPI as its own; name one by its number (--ike-id)"
                             " or by an SPI only it has (see ipsecct sa list --ike)")
        return named

    def child_named(self, spi: int) -> tuple[IkeSA, ChildSA]:
        """The CHILD SA (and its IKE SA) an operator names by either of its SPIs (``ipsecct
        sa rekey SPI``, as ``swanctl --rekey --child``). Raises ValueError, saying why, when
        none has it or more than one IKE SA's do: a CHILD SA's outbound SPI is its peer's
        choice, and may be another CHILD SA's inbound one, which that peer saw on the
        wire."""
        found = [(ike, c) for ike in self.engine.ike_sas() for c in ike.children
                 if spi in (c.spi_in, c.spi_out) and ike.state is not IkeState.DEAD]
        if not found:
            raise ValueError(f"no IKE-keyed CHILD SA with SPI 0x{spi:08x} here (see ipsecct"
                             " sa list --ike)")  # fmt: skip
        if len(found) > 1:
            raise ValueError(f"SPI 0x{spi:08x} names {len(found)} CHILD SAs here (of IKE SAs"
                             " #" + ", #".join(str(ike.uid) for ike, _ in found) + "): a"
                             " peer chose another's SPI as its own; name the CHILD SA by its"
                             " other SPI (see ipsecct sa list --ike)")  # fmt: skip
        return found[0]

    def _named(self, what: str) -> list[IkeSA] | None:
        """The IKE SAs ``what`` names, for ``ipsecct sa delete --ike`` and ``ipsecct
        transfer`` alike: a connection (its established IKE SAs: not a half-open one, which
        is anyone's IKE_SA_INIT, nor one a rekey replaced or being deleted), an IKE SPI (16
        hex digits, initiator's or responder's; 0x and swanctl's _i/_r allowed) or a CHILD
        SA's SPI, either direction (its IKE SA). Never a DEAD one. None: ``what`` is none of
        these forms."""
        sas = [ike for ike in self.engine.ike_sas() if ike.state is not IkeState.DEAD]
        if any(c.name == what for c in self.engine.connections):
            return [ike for ike in sas if ike.conn.name == what
                    and ike.state is IkeState.ESTABLISHED]  # fmt: skip
        text = what.lower().removeprefix("0x").removesuffix("_i").removesuffix("_r")
        if len(text) == 2 * IKE_SPI_LEN:
            return [ike for ike in sas if text in (ike.spi_i.hex(), ike.spi_r.hex())]
        try:
            spi = int(what, 0)
        except ValueError:
            return None
        return [ike for ike in sas
                if any(spi in (c.spi_in, c.spi_out) for c in ike.children)]  # fmt: skip

    def terminate_refusal(self, ike: IkeSA, now: float) -> str | None:
        """Why the operator may not delete ``ike`` now (None: it may). An IKE SA in a
        transfer (in its UNIT) is not deleted under it: the transfer would move, or have
        moved, CHILD SAs the peer had been told are gone. A fenced gateway sends nothing: a
        DELETE that could not go out would leave the peer sending into removed SAs, and
        the gateway holding them may be continuing the IKE SA."""
        name = f"IKE SA {ike.conn.name} #{ike.uid}"
        if ike.state is IkeState.DELETING:
            return f"{name} is being deleted already (its DELETE sent, waiting for the answer)"
        if ike.state is IkeState.REKEYED:
            return (f"{name} was rekeyed: its CHILD SAs are its successor's now, and it goes"
                    " once its DELETE is answered (delete the successor, see ipsecct sa list"
                    " --ike)")  # fmt: skip
        for c in ike.children:
            t = c.handle
            role = self.transfer_role(t) if t is not None else None
            if role is not None:
                return (f"{name} is being transferred ({role[0]}: {role[1]}): not deleted;"
                        " try again once the transfer has ended (ipsecct status)")  # fmt: skip
            if t is not None and t.state is not TunnelState.ACTIVE:  # type: ignore[attr-defined]
                return (f"{name} is being transferred (its CHILD SA 0x{c.spi_in:08x} is"
                        f" {t.state.value}): not deleted; try again once the transfer has"  # type: ignore[attr-defined]
                        " ended (ipsecct status)")  # fmt: skip
        if ike.quiet:
            return (f"{name} is being transferred (it waits for its CHILD SAs' transfer):"
                    " not deleted; try again once the transfer has ended (ipsecct status)")
        if self.fenced is not None and self.fenced(now):
            return (f"{name}: this gateway may not send now (its lease lost, or its standby"
                    " took over): not deleted")  # fmt: skip
        return None

    async def terminate(self, ikes: list[IkeSA], wait: float) -> list[dict[str, object]]:
        """The operator deletes IKE SAs (``ipsecct sa delete --ike``, as ``swanctl
        --terminate --ike``): see :meth:`terminate_one`; then waits up to ``wait`` seconds
        for the peers' answers. What ``sa delete --ike --json`` shows of each, ``answered``
        saying whether its peer answered the DELETE meanwhile."""
        rows = [self.terminate_one(ike) for ike in ikes]
        await self.ended(ikes, wait)
        for row, ike in zip(rows, ikes, strict=True):
            row["answered"] = bool(row["delete_sent"]) and ike.state is IkeState.DEAD
        return rows

    def terminate_one(self, ike: IkeSA) -> dict[str, object]:
        """The operator deletes an IKE SA: its CHILD SAs' tunnels are removed at once
        (ChildDown: nothing is sent on them again), the DELETE goes to the peer (a half-open
        IKE SA is dropped without one), and nothing restarts it (its connection's actions
        after a close are for a peer's DELETE or a dead peer). The caller asked
        :meth:`terminate_refusal`."""
        children = [f"0x{c.spi_in:08x}" for c in ike.children]
        sent = ike.state is IkeState.ESTABLISHED
        self._act(self.engine.delete(ike, self.node.clock(), "deleted by the operator"))
        event(log, "ike-sa-deleted-by-operator", node=self.node.name, conn=ike.conn.name,
              uid=ike.uid, peer=ike.remote, spi_i=ike.spi_i.hex(), spi_r=ike.spi_r.hex(),
              children=len(children), delete_sent=sent)  # fmt: skip
        return {"name": ike.conn.name, "uid": ike.uid, "spi_i": ike.spi_i.hex(),
                "spi_r": ike.spi_r.hex(), "remote": str(ike.remote), "remote_id": ike.peer_id,
                "children": children, "delete_sent": sent}  # fmt: skip

    async def ended(self, ikes: list[IkeSA], timeout: float) -> None:
        """Until each of ``ikes`` has ended (its DELETE answered, or given up) or
        ``timeout`` seconds have passed."""
        if all(ike.state is IkeState.DEAD for ike in ikes):
            return
        done = asyncio.get_running_loop().create_future()

        def watch(o: Output) -> None:
            if (isinstance(o, IkeDown) and all(ike.state is IkeState.DEAD for ike in ikes)
                    and not done.done()):  # fmt: skip
                done.set_result(None)

        self.listeners.append(watch)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            pass
        finally:
            self.listeners.remove(watch)

    def list(self) -> list[dict[str, object]]:
        now = self.node.clock()
        res = []
        for ike in self.engine.ike_sas():
            s = ike.summary(now, self.engine.ends_at(ike))
            rows = cast("list[dict[str, object]]", s["children"])
            for child, row in zip(ike.children, rows, strict=True):
                t = child.handle
                if t is not None:  # installed: ESP in UDP as its SAs are, not as the IKE SA is
                    row["encap"] = any(sa.encap is not None
                                       for sa in t.sas())  # type: ignore[attr-defined]
            res.append(s)
        return res


class IkeFeed:
    """The IKE SA contexts one replica holder gets (an :class:`~ipsecct.ct.failover.ExtraSource`):
    each established IKE SA ``select`` picks, with its CHILD SAs, sent when new or changed,
    and reported gone when it is gone or no longer picked."""

    def __init__(
        self,
        service: IkeService,
        select: Callable[[IkeSA], bool] | None = None,
        token: Callable[[], object] | None = None,
        key: Callable[[IkeSA], bytes] | None = None,
    ) -> None:
        self.service = service
        self.select = select
        self.token = token
        self.key = key
        self._seen: object = None
        self._fp: dict[bytes, tuple[object, ...]] = {}

    def reset(self) -> None:
        self._fp.clear()
        self._seen = None

    def poll_extra(self, now: float, full: bool, budget: int | None = None
                   ) -> tuple[list[tuple[bytes, list[bytes]]], list[bytes]]:  # fmt: skip
        """The IKE SA contexts (with their CHILD SAs) new or changed since the last call, and
        the IKE SAs gone (keyed by our SPI): what the fail-over Replicator sends beside the
        tunnels. An IKE SA changes when its message IDs move (every exchange), its CHILD SAs
        are rekeyed, it is rekeyed (a new SA, the old one gone), its peer moves, or a DELETE
        of ours or a check of the peer's address is answered (no message ID moves then).
        ``budget``: about how many octets of contexts to return; the IKE SAs left out come
        at a later call (after a ``full`` one, as new: the standby dropped what it held)."""
        seen = (self.service.changed(), self.token() if self.token is not None else None)
        if not full and seen == self._seen:
            return [], []
        self._seen = seen
        upserts: list[tuple[bytes, list[bytes]]] = []
        live: set[bytes] = set()
        used = 0
        left = False
        for ike in self.service.engine.ike_sas():
            if ike.state is not IkeState.ESTABLISHED:
                continue
            if self.select is not None and not self.select(ike):
                continue
            key = self.key(ike) if self.key is not None else ike.our_spi
            live.add(key)
            fp = (ike.uid, ike.my_next_mid, ike.peer_next_mid, ike.local, ike.remote,
                  ike.nat_local, ike.nat_remote, ike.rekey_at,
                  tuple(c.uid for c in ike.children),
                  # (these end with an answer, which moves no message ID)
                  tuple(ike_context.deletes_owed(ike)),
                  ike_context.address_unverified(ike))  # fmt: skip
            if not full and self._fp.get(key) == fp:
                continue
            if budget is not None and used >= budget:
                left = True  # the next call looks again
                if full:
                    self._fp.pop(key, None)  # the standby drops it with the FULL: new then
                continue
            try:
                cdbs = ike_context.encode(ike, now)
            except IkeContextError:
                cdbs = []
            if not cdbs or len(cdbs) > MAX_EXTRA_CDBS:
                self.service.engine.stats["ike-unreplicable"] += 1
                continue
            self._fp[key] = fp
            upserts.append((key, cdbs))
            used += sum(map(len, cdbs))
        if left:
            self._seen = None
        gone = [k for k in self._fp if k not in live]
        for k in gone:
            del self._fp[k]
        return upserts, [] if full else gone


def replica_spi(key: bytes) -> bytes:
    """Our SPI of the IKE SA a replica's key names (the key starts with it: the etcd mode
    adds the group a CHILD-less IKE SA is kept in)."""
    return key[:IKE_SPI_LEN]


def _remember(table: dict[bytes, tuple[str, float]], key: bytes, value: tuple[str, float]) -> None:
    """Bounded: the oldest entries go first (they are the first to expire)."""
    table.pop(key, None)
    table[key] = value
    while len(table) > MOVED_MAX:
        del table[next(iter(table))]


def source_address(remote: Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The source address the routes pick toward ``remote`` (a UDP socket connected to it
    and asked its name: no datagram is sent), or None when there is no route."""
    fam = socket.AF_INET6 if remote.host.version == 6 else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((str(remote.host), remote.port or IKE_PORT))
            return ipaddress.ip_address(s.getsockname()[0])
    except (OSError, ValueError):
        return None

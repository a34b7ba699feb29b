"""etcd mode (``[cluster] etcd = [...]``): this gateway's membership, its lease as a fence,
its owner keys and its SPI block, kept in etcd (decisions in :mod:`ipsecct.ct.ownership`).

One timer: every ``ttl_s / 4`` the driver renews the member lease (a keep-alive), and on
success moves the engine's fence (``Engine.send_until``) to ``sent + fence`` where ``fence``
is the etcd TTL shortened for clock drift and a guard: if etcd cannot be reached, the engine
stops sending by itself before etcd can expire the lease and let another member create this
gateway's owner keys. A tunnel whose owner key this gateway does not hold (another member
owns it, or an earlier life of this gateway still does) is fenced by its sequence ceiling
until the key is ours.

Replication stays gateway to gateway over the mutually authenticated [transfer] channel (keys
never go into etcd): every member replicates its tunnels to every [[peers]] entry with the
fail-over Replicator, whose ACKs only raise sequence ceilings here (each tunnel may run at
most ``seq_margin`` past the lowest value any peer holds); every member keeps what its peers
replicate. When a peer's member key disappears (its lease ended), its tunnels are spread over
the survivors by groups: the owner keys of the groups it held are gone with its lease, and the
groups are planned by rendezvous hashing (:func:`ipsecct.ct.ownership.plan`); each survivor
creates the owner keys of its share of groups in one etcd transaction (which succeeds only
while nobody owns them, i.e. after the dead member's lease is gone) and installs those groups'
tunnels from its replicas, sequence numbers advanced by the margin. A share nobody took within
a grace period goes to whichever survivor holds a replica and asks first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..ct import cxtp, ownership
from ..ct.failover import FailoverConfig, Replicator, Standby, reply_kind
from ..ct.lease import Lease, LeaseEvent
from ..ct.transfer import Identity, Record, Settings, take_over_accept
from ..errors import CxtpError, EtcdError, IkeContextError
from ..ikev2 import context as ike_context
from ..ikev2.ikesa import IkeSA
from ..ipsec import spi as spimod
from ..ipsec.engine import Held, Tunnel, TunnelState
from ..ipsec.esp import Drop
from . import gcpolicy
from .config import ClusterConfig
from .etcd import EtcdClient
from .failover_driver import (
    PREPARE_PER_TICK,
    suspended_s,
    tell_ack_ahead,
    tell_trouble,
    tell_tunnel_refused,
    trouble,
)
from .ike import IKE_SPI_LEN, IkeService, replica_spi
from .log import RateLimited, event
from .node import Node
from .peers import PeerChannels
from .timers import supervise
from .transfer_service import TransferService

log = logging.getLogger("ipsecct.gateway.cluster")

UNFENCED = 1 << 64
WAITING_MAX = 4096  # packets kept for tunnels waiting for their owner key
SCAN_PERIOD = 0.1  # seconds between looks at the member list (when holding replicas)
HANDOVER_WAIT = 1.0  # seconds a transfer's target waits for the source's key hand-over
HANDOVER_RETRY = 0.02  # seconds between its looks
# A tunnel transferred here that left before its key was handed over (an IKE peer rekeyed
# and deleted the moved CHILD SA within milliseconds): its key, should it land in one of our
# groups, is deleted; looked for every LEFT_RETRY for LEFT_WAIT, at most LEFT_MAX of them.
LEFT_WAIT = 5.0
LEFT_RETRY = 0.1
LEFT_MAX = 1024
# Leases of our peers' lives remembered (to find whose groups an orphan's were): each
# restart of a peer is a new one; a member key that keeps changing leases cannot grow it.
LEASE_NAMES_PER_PEER = 64
ORPHAN_CHECK = 5.0  # seconds between looks for groups nobody took over
# a restarted member waits at most this many ttl_s, after its previous life's member key
# went, for the survivors to take that life's groups over before it joins
PREVIOUS_LIFE_WAIT_TTLS = 3
ORPHAN_AFTER = 4.0  # a group without an owner this long: no live member holds a replica
KEY_GONE = "member key is gone"  # (_own_key_lost: the one loss we mend, _member_key_lost)
# A suspend shorter than this is not counted (suspended_s()'s two clock readings differ by
# microseconds without one); the lease's guard covers it.
SLEPT_NOISE = 0.001


@dataclass(frozen=True)
class _Takes:
    """ClusterDriver._takes: the replicas held from gone peers, and those with the tunnels
    such peers committed here; called with a group's tunnels: whether _scan adopts it."""

    held: set[int]
    copies: set[int]

    def __call__(self, spis: Iterable[int]) -> bool:
        spis = list(spis)
        return any(s in self.held for s in spis) or all(s in self.copies for s in spis)


class ClusterDriver:
    def __init__(
        self,
        node: Node,
        cfg: ClusterConfig,
        *,
        address: str = "",
        settings: Settings | None = None,
    ) -> None:
        self.node = node
        self.settings = settings  # the transfer settings: reassigned SPIs from our block
        self.cfg = cfg
        self.address = address
        self.keys = ownership.keys(cfg.name)
        self.timing = ownership.fence_timing(cfg.ttl_s, cfg.drift_ppm, cfg.guard_ms)
        self.client = EtcdClient(list(cfg.etcd), timeout=max(0.2, min(1.0, cfg.ttl_s / 4)))
        self.lease = Lease(self.timing)
        self.lease_id = 0
        # (lease, when its member key was first seen gone) of a member of our name seen
        # before we joined: our previous life, whose tunnels go to the survivors first
        # (or named by the keys of our tunnels: _past_lives)
        self._previous: tuple[frozenset[int], float | None] | None = None
        # The machine's time suspended (CLOCK_BOOTTIME - CLOCK_MONOTONIC, injectable) as of
        # the times the lease notes (its expiry, its heartbeats' sending): a suspend since is
        # real time the node's clock (and the C thread's) did not count (_fence_check).
        self.suspended: Callable[[], float] = suspended_s
        self._slept_base = self.suspended()
        self.suspends = 0  # suspends counted (status)
        self.losses_before = 0  # lease losses of this gateway's lives before this one
        self._lives = 0  # times this process joined
        # Lives ended, by why (_lease_gone: lease-expired, member-key-lost), the last's line
        self.life_ends: dict[str, int] = {}
        self.last_life_end = ""
        # (create, mod) revisions of our member key as first read in this life: any other
        # is a key someone else wrote (_member_key_lost)
        self._own_rev: tuple[int, int] | None = None
        # What we own: groups (owner keys under our lease) and our tunnels' groups.
        self.own = ownership.Ownership(cfg.name, node.name, cfg.groups)
        self.block: spimod.SpiBlock | None = cfg.block()
        self.lost_for_good = 0
        self._n = 0
        self._task: asyncio.Task[None] | None = None
        self._repl_task: asyncio.Task[None] | None = None
        self.last_error = ""
        # Replication to and from the other members (attach()).
        self.channels: PeerChannels | None = None
        self.transfer: TransferService | None = None
        self.replicators: dict[str, Replicator] = {}
        self.standbys: dict[str, Standby] = {}
        self.margin = 16384
        self.tick = 0.01
        self.dead_since: dict[str, float] = {}
        self._lease_names: dict[int, str] = {}  # member lease -> member, as last seen
        # Live members (name -> lease) as last read; None before the first reading. Each
        # tunnel is replicated to the peers that would take its group (``replicas`` of
        # them, ranked by the group's rank): group -> those peers, for the members as last
        # read.
        self._live: dict[str, int] | None = None
        self._members: set[str] | None = None  # every member key's name, as last read
        self._targets: dict[str, frozenset[str]] = {}
        self.one_taker = False  # attach(): indirect identity
        self.grace = 1.0
        self.taken = 0
        self.withdrawn = 0  # transfers towards us withdrawn at a take-over (_withdraw)
        self.keyless_dropped = 0  # dead peers' keyless replicas never taken (_scan)
        self.takeovers: list[dict[str, Any]] = []
        self._next_keepalive = 0.0
        # Groups without an owner key, since when (as this member saw them), and those
        # reported orphaned for good (nobody took them within ORPHAN_AFTER): group -> tunnels.
        self._orphan_since: dict[str, float] = {}
        self.orphaned: dict[str, int] = {}
        # Every tunnel key's group as last read (_scan, _check_orphans: every ORPHAN_CHECK at
        # most): the IKE check of a CHILD SA's outbound SPI asks it (_spi_elsewhere)
        self._tunnel_view: dict[int, str] = {}
        self.floors_dropped = 0  # tunnels' floors dropped with a peer's lease
        # Peers whose member key is gone while their lease lives (_keyless_alive): name ->
        # that lease; and how many times one was seen so
        self._keyless: dict[str, int] = {}
        self.keyless_peers = 0
        self.keys_restored = 0  # our own member key written back (_member_key_lost)
        self.malformed = 0  # keys under our prefix no member wrote as they are (_malformed)
        self._next_orphan_check = 0.0
        self._quiet = RateLimited(burst=2, interval=10.0)  # etcd errors repeat every round
        node.engine.send_until = -math.inf  # nothing is sent before we are a member
        node.engine.fence_new_tunnels = True  # nor on a new tunnel before we own it
        node.engine.on_new_tunnel = self._new_tunnel  # which we record at once
        self._own_now = False
        self._wake = asyncio.Event()
        self._not_owner: set[int] = set()  # fenced because another member owns them: told
        # Tunnels here whose key names another member's group, since when: a transfer's
        # target looks again every HANDOVER_RETRY for HANDOVER_WAIT (keeping their packets)
        # before it takes them for someone else's.
        self._unowned_since: dict[int, float] = {}
        # Tunnels a transfer committed here in this life (until we own them), SPI -> their
        # source: the newest state of them, should their source die before it hands their
        # keys over (_scan adopts their groups then, as it does a dead peer's replicas';
        # _adopted keeps them only while their keys name a group of a peer's lease, the
        # source's). Emptied when our lease ends (_lease_gone).
        self._transferred_in: dict[int, str] = {}
        self._left_unowned: dict[int, float] = {}  # SPI -> since when (LEFT_WAIT)
        # Outbound packets of tunnels we do not own yet (a transfer just committed here),
        # kept until we do: bounded.
        self._waiting: collections.deque[Held] = collections.deque()
        self._handovers: set[asyncio.Task[None]] = set()
        # IKE SAs (attach_ike): replicated with their CHILD SAs' tunnels to the peers that
        # would take them, kept in the CHILD SAs' group, taken over with them
        self.ike: IkeService | None = None
        self._layout = 0  # moves whenever which peer gets which tunnel may have changed
        self.ike_taken = 0
        self.ike_split = 0  # IKE SAs whose CHILD SAs we took only in part (not taken)
        for t in node.engine.tunnels():
            t.seq_ceiling = t.outbound.seq  # nor on a tunnel before we own it
        node.extensions["cluster"] = self.status

    def attach(
        self,
        channels: PeerChannels,
        transfer: TransferService,
        identity: Identity,
        peers: list[str],
        fcfg: FailoverConfig | None = None,
    ) -> None:
        """Replicate to (and keep replicas of) these peers, over ``channels``."""
        self.channels = channels
        self.transfer = transfer
        # Indirect SG identity: the members share one virtual address, which only one can
        # hold, so a dead member's groups all go to one survivor (and are replicated first to
        # the peer that would take them all), never split: a second survivor claiming the
        # address for its share would take it from the first and its clients.
        self.one_taker = identity is Identity.INDIRECT
        transfer.listeners.append(self._on_record)
        ep = self.node.cfg.outer
        for p in peers:
            c = replace(fcfg, peer=p) if fcfg is not None else FailoverConfig("active", p)
            self.margin = c.seq_margin
            self.tick = c.tick_ms / 1000
            self.replicators[p] = Replicator(
                self.node.engine, c, peer_lease=False, on_floor=self._ceiling
            )
            self.replicators[p].select = functools.partial(self._replicate_to, p)
            self.replicators[p].on_tunnel_refused = functools.partial(
                tell_tunnel_refused, self.node.name, p
            )
            # (_replicate_to's answers move only with these: the poll walks when they do)
            self.replicators[p].select_changes = self._selection_changes
            self.standbys[p] = Standby(
                self.node.engine,
                replace(c, role="standby"),
                ep,
                identity,
                peer_lease=False,
                member_lease=self.lease_id,
                accept=take_over_accept(self.settings),  # [transfer] accept_*_ts
            )

    def attach_ike(self, ike: IkeService) -> None:
        """IKE SAs too: each goes, with its CHILD SAs, to the peers that would take their
        group; the CHILD SAs of one IKE SA are kept in one group (so that a take-over moves
        them and the IKE SA as one unit); a member takes an IKE SA over with the tunnels of
        all its CHILD SAs. IKE stops with the fence: another member may be running it."""
        self.ike = ike
        for p, rep in self.replicators.items():
            rep.extra = ike.new_feed(functools.partial(self._replicate_ike_to, p),
                                     lambda: self._layout, self._ike_key)  # fmt: skip
            rep.on_extra_refused = functools.partial(ike.replica_refused, p)
            rep.on_extra_resync = functools.partial(ike.replicas_resync, p)
        for sb in self.standbys.values():  # replicas checked as they arrive
            sb.check_extra = self._check_ike_replica
            sb.extra_tunnels = ike.replica_tunnels
        standbys = self.standbys
        ike.replica_held = lambda key: any(key in sb.extra for sb in standbys.values())
        ike.fenced = self._ike_fenced
        ike.replicated = self._ike_replicated
        if self.block is not None:
            ike.engine.spi_range = (self.block.first, self.block.last)
        here = ike.engine.outbound_spi_taken  # (another tunnel here has it)
        ike.engine.outbound_spi_taken = lambda spi: here(spi) or self._spi_elsewhere(spi)

    def _spi_elsewhere(self, spi: int) -> bool:
        """Does another member's tunnel have this outbound SPI, as etcd's keys were last
        read (a key in a group that is not ours: another member's, or one nobody owns yet,
        which a survivor may take over)? A client of ours chose it as a client of that
        member did (any 32 bits of the client's choice): the CHILD SA is refused as for
        another tunnel here (the IKE check). Made, its tunnel could never be recorded (the
        key exists: fenced for good, cluster-not-owner), and a take-over of that group met
        two tunnels of one SPI here."""
        g = self._tunnel_view.get(spi)
        return g is not None and g not in self.own.groups

    def _ike_fenced(self, now: float) -> bool:
        """No IKE while our lease is not valid: etcd may end it and another member take our
        IKE SAs over (IKE message IDs used by one gateway at a time, as sequence numbers)."""
        self._fence_check()
        return now >= self.node.engine.send_until

    def _ike_replicated(self) -> bool:
        """Do peers hold replicas of ours (then a stop leaves our IKE SAs to them)?"""
        return any(r.acks > 0 for r in self.replicators.values())

    def _replicate_ike_to(self, peer: str, ike: IkeSA) -> bool:
        """An IKE SA goes where its CHILD SAs' tunnels go (one group: the same peers); one
        without a CHILD SA where its own group goes (:meth:`_ike_group`)."""
        for c in ike.children:
            t = c.handle
            if isinstance(t, Tunnel):
                return self._replicate_to(peer, t)
        if ike.children:
            return False  # its CHILD SAs' tunnels are not here (yet): nothing to follow
        g = self._ike_group(ike)
        return g is not None and self._group_goes_to(peer, g)

    def _ike_group(self, ike: IkeSA) -> str | None:
        """The group an IKE SA without a CHILD SA is kept in (its client deleted its last
        CHILD SA, or never asked for one): one of our home groups, by its SPI; None before we
        joined. Its replicas name it (:meth:`_ike_key`), and the member that adopts the group
        when we die takes the IKE SA over (as it takes a group's tunnels and their IKE SAs)."""
        if not self.own.home:
            return None
        return self.own.home_of(int.from_bytes(ike.our_spi, "big"))

    def _ike_key(self, ike: IkeSA) -> bytes:
        """An IKE SA's key in its replicas: our SPI, followed for one without a CHILD SA by
        its group (a CHILD SA new in it changes the key: the old one is reported gone)."""
        g = None if ike.children else self._ike_group(ike)
        return ike.our_spi if g is None else ike.our_spi + g.encode()

    @staticmethod
    def _key_group(key: bytes) -> str | None:
        """The group a CHILD-less IKE SA's replica key names (None: the key has none, or it is
        not a group's name)."""
        tail = key[IKE_SPI_LEN:]
        if not tail:
            return None
        text = tail.decode("ascii", errors="replace")
        lease, k = ownership.lease_of_group(text), text.partition("-")[2]
        if not lease or not k.isdecimal() or len(k) > 3:
            return None
        g = ownership.home_group(lease, int(k))
        return g if g == text else None  # exactly as home_group writes it

    def _check_ike_replica(self, key: bytes, cdbs: list[bytes]) -> str | None:
        """A peer's IKE SA replica as it arrives: a key with a group must name one, and
        this gateway's connections must admit the IKE SA (``IkeService.check_replica``)."""
        if len(key) != IKE_SPI_LEN and self._key_group(key) is None:
            return "the replica's key names no group"
        assert self.ike is not None
        return self.ike.check_replica(key, cdbs)

    def _sibling_group(self, spi: int) -> str | None:
        """A group of ours holding a sibling of this tunnel (another CHILD SA of its IKE SA),
        where the tunnel belongs too."""
        if self.ike is None:
            return None
        for s in self.ike.siblings(spi):
            g = self.own.placed.get(s)
            if g is not None and g in self.own.groups:
                return g
        return None

    def _anchors(self, spis: list[int]) -> dict[int, int]:
        """For a transfer: the SPI whose bucket picks each moved tunnel's group at the
        target, the same for every CHILD SA of one IKE SA (their lowest outbound SPI)."""
        out: dict[int, int] = {}
        if self.ike is None:
            return out
        for s in spis:
            ike = self.ike.ike_of(s)
            if ike is not None and ike.children:
                out[s] = min(c.spi_out for c in ike.children)
        return out

    def receive(self, peer: str, msg: cxtp.CTD) -> bool:
        """A sync message from a peer member; False when it is not one."""
        rep, sb = self.replicators.get(peer), self.standbys.get(peer)
        if rep is None or sb is None or self.channels is None:
            return False
        self._fence_check()  # (an ACK raises ceilings: never before a suspend is counted)
        now = self.node.clock()
        try:
            if reply_kind(msg) is not None:
                ahead = rep.acks_ahead
                rep.receive(msg, now)
                tell_ack_ahead(self.node.name, peer, rep, ahead)
            else:
                had, before = bool(sb.replica), trouble(sb)
                for r in sb.receive(msg, now):
                    self.channels.send(peer, r)
                if trouble(sb) != before:
                    tell_trouble(self.node.name, peer, sb, before)
                if sb.replica and not had:
                    # The operator's "what is this gateway now": e.g. restarted after a
                    # failure, it holds the survivors' replicas (and owns nothing yet).
                    event(
                        log,
                        "cluster-standby",
                        node=self.node.name,
                        peer=peer,
                        tunnels=len(sb.replica),
                        detail=f"this gateway holds replicas of {peer}'s tunnels and takes "
                        f"them over if {peer}'s lease ends",
                    )
        except CxtpError as exc:
            event(log, "sync-malformed", logging.WARNING, node=self.node.name, error=str(exc))
        return True

    def peer_lost(self, peer: str) -> None:
        rep = self.replicators.get(peer)
        if rep is not None:
            rep.resync()

    def _on_record(self, rec: Record) -> None:
        """A transfer finished: the source hands the owner keys of what moved to the target
        (one transaction each: "still ours" -> the target's, under the target's lease); the
        target records its new tunnels at once."""
        self._layout += 1
        if rec.role == "source" and rec.outcome in ("committed", "partial"):
            spis = [s for s in rec.spis if self.own.owns(s)]
            anchors = self._anchors(spis)  # now: the IKE SA leaves right after this
            task = asyncio.get_running_loop().create_task(self._hand_over(spis, rec.peer, anchors))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)
        elif rec.role == "target" and rec.outcome == "committed":
            if self.lease_id:  # (between two lives: no life to be the newest in)
                self._transferred_in.update(dict.fromkeys(rec.spis, rec.peer))
            self._own_now = True
            self._wake.set()

    def _new_tunnel(self, t: Tunnel | None) -> None:
        """A tunnel new here (an IKEv2 CHILD SA, ``sa add``, a transfer, a take-over): record
        it now rather than at the next round (up to ``ttl_s / 4`` away)."""
        self._own_now = True
        self._wake.set()

    async def _hand_over(
        self, spis: list[int], peer: str, anchors: dict[int, int] | None = None
    ) -> None:
        try:
            kv = await self.client.get(self.keys["members"] + peer)
            _, lease, groups = ownership.parse_member(kv.value) if kv else ("", 0, 0)
            moved = 0
            if lease:
                for txn in self.own.hand_over(spis, lease, groups, anchors):
                    if await self.client.txn(txn):
                        self.own.handed_over(txn)
                        moved += len(txn.success)
            event(
                log,
                "cluster-handed-over",
                node=self.node.name,
                peer=peer,
                tunnels=moved,
                asked=len(spis),
            )
        except EtcdError as exc:
            # The next round releases what is still ours; the target waits for it.
            event(
                log,
                "cluster-etcd-error",
                logging.WARNING,
                node=self.node.name,
                error=f"handing over to {peer}: {exc}",
            )

    def _ceiling(self, t: Tunnel) -> None:
        """A tunnel may send only while we own it, and at most ``margin`` past the lowest
        value any peer may hold for it (any of them may be the one to take it over). A
        ceiling rises only here: a suspend is counted in the fence first (_fence_check)."""
        self._fence_check()
        if not self.own.owns(t.outbound.spi):
            t.seq_ceiling = t.outbound.seq
            return
        floors = [r.floor[t] for r in self.replicators.values() if t in r.floor]
        t.seq_ceiling = min(floors) + self.margin if floors else UNFENCED

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        # (supervised: a failure out of either is logged, task-failed, not lost)
        self._task = supervise(self._loop(), "cluster", self.node.name)
        if self.replicators:
            self._repl_task = supervise(self._replicate(), "cluster replication", self.node.name)

    async def stop(self) -> None:
        for task in (self._task, self._repl_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task  # (a failure was logged when it happened)
        self.node.engine.send_until = -math.inf
        if self.lease_id:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(self.lease_id)  # hand our tunnels over at once

    async def _previous_life(self) -> None:
        """Before joining: no member key of our name may exist (another gateway with our
        name, or our previous life, killed, whose lease has not ended), and the tunnels of
        our previous life (seen here under that key) go to the survivors first. Joined at
        once, our first (empty) sync replaced their replicas before they adopted our old
        groups (or they never saw us gone): the tunnels were lost. Raises EtcdError (logged,
        in status, tried again) while we wait; waits at most PREVIOUS_LIFE_WAIT_TTLS * ttl_s
        after the old key went (groups nobody holds a replica of are never adopted)."""
        kv = await self.client.get(self.own.member_key())
        if kv is not None:
            addr, other, _ = ownership.parse_member(kv.value)
            if other:
                self._previous = (frozenset({other}), None)
            raise EtcdError(
                f"not joining: a member named {self.node.name} exists already (lease "
                f"{other:x}, address {addr!r}): another gateway with this name, or this "
                f"gateway's previous life, whose lease ends within ttl_s; it joins once "
                f"that lease is gone"
            )
        if self._previous is None:
            past = await self._past_lives() if not self._lives else frozenset()
            if not past:
                return
            self._previous = (past, None)
        prev, gone = self._previous
        now = self.node.clock()
        if gone is None:
            self._previous = (prev, now)
            gone = now
        heads = tuple(f"{p:016x}-" for p in prev)
        groups = {v.decode(errors="replace") for _, v in
                  await self.client.get_prefix_values(self.keys["tunnels"])}  # fmt: skip
        mine = {g for g in groups if g.startswith(heads)}
        owned = {k[len(self.keys["groups"]):]: v for k, v in
                 await self.client.get_prefix_values(self.keys["groups"])}  # fmt: skip
        # (an owner key of our name: our previous life's still, under its lease, which ends
        # by itself: its member key was deleted before it died, see _past_lives)
        me = self.node.name.encode()
        waiting = {g for g in mine if owned.get(g, me) == me}
        limit = PREVIOUS_LIFE_WAIT_TTLS * self.cfg.ttl_s
        if waiting and now - gone < limit:
            raise EtcdError(
                f"not joining yet: {len(waiting)} group(s) of this gateway's previous life "
                f"(lease {', '.join(f'{p:x}' for p in sorted(prev))}) have no owner yet; the "
                f"members holding their replicas take them over first (at most "
                f"{limit - (now - gone):.1f} s more)"
            )
        self._previous = None

    async def _past_lives(self) -> frozenset[int]:
        """Leases of ended lives whose groups our tunnels' keys name (read before this
        process first joins; a life ended since removed its own tunnels): a gateway
        restarted after its lease ended, before the survivors took its groups over, found
        no member key of its name and joined at once; the survivors then read it
        alive (under its new lease) and took nothing: its previous life's tunnels were
        silent for good, its groups owned by nobody. The tunnels it has at start (configured,
        restored from its durable state) name those groups: a group without an owner key,
        created under a lease no member key holds. (It may also be a dead peer's, whose
        tunnel was transferred here: its survivors take it over first too.)"""
        spis = {t.outbound.spi for t in self.node.engine.tunnels()}
        if not spis:
            return frozenset()
        groups, tunnels = await read_ownership(self.client, self.keys)
        live = {
            ownership.parse_member(kv.value)[1]
            for kv in await self.client.get_prefix(self.keys["members"])
        }
        out = set()
        for spi in spis:
            g = tunnels.get(spi)
            lease = ownership.lease_of_group(g) if g is not None else 0
            # Owned in our name though no member key of it exists (we have not joined): our
            # previous life, killed after its member key was deleted (an operator's etcdctl
            # del). Its lease lives on for up to ttl_s, and its peers wait for its end before
            # they take its groups (_keyless_alive); joined at once, we read alive to them.
            ours = g is not None and groups.get(g) == self.node.name
            if g is not None and (g not in groups or ours) and lease and lease not in live:
                out.add(lease)
        return frozenset(out)

    async def _register(self) -> None:
        await self._previous_life()
        lid, ttl = await self.client.grant(self.cfg.ttl_s)
        if ttl < self.cfg.ttl_s:
            self._short_lease("granted", ttl)
            with contextlib.suppress(EtcdError):
                await self.client.revoke(lid)
            raise EtcdError(f"etcd granted a lease of {ttl} s, shorter than ttl_s")
        # Replicas sent for this lease are kept from now on: peers send them as soon as they
        # read our member key, which the join below writes. Set after the join (past one more
        # etcd round trip), a peer's first messages were ignored, never acknowledged nor sent
        # again: a quiet tunnel was never replicated here.
        for sb in self.standbys.values():
            sb.forget(lid)
        if not await self.client.txn(self.own.join(lid, self.address)):
            with contextlib.suppress(EtcdError):
                await self.client.revoke(lid)
            await self._previous_life()  # (a member key of our name written meanwhile)
            raise EtcdError("joining: the new lease's groups exist already")
        self.own.joined()
        self._lives += 1
        self._layout += 1  # CHILD-less IKE SAs have a group now (replicated from now on)
        # Only now are we a member: replication starts (see _replicate) and our tunnels
        # may be owned. A peer that received replicas of ours before our member key existed
        # would take us for dead and take our tunnels.
        if self.block is None:
            self.block = await self._claim_block()
        self.lease_id = lid
        if self.settings is not None:
            self.settings.spi_block = self.block
        if self.ike is not None:  # CHILD SAs' inbound SPIs from our block too
            self.ike.engine.spi_range = (self.block.first, self.block.last)
        event(
            log,
            "cluster-joined",
            node=self.node.name,
            cluster=self.cfg.name,
            lease=f"{lid:x}",
            ttl_s=ttl,
            spi_block=self.block,
        )

    async def _claim_block(self) -> spimod.SpiBlock:
        """Our block of the SPI space: the one we claimed before, else the first free one."""
        n = self.cfg.spi_blocks
        claims: dict[str, str] = {}
        for kv in await self.client.get_prefix(self.keys["blocks"]):
            claims[kv.key.rsplit("/", 1)[-1]] = kv.value.decode(errors="replace")
            if not kv.value or "\ufffd" in claims[kv.key.rsplit("/", 1)[-1]]:
                self._malformed(kv.key, "an SPI block claim that names no member")
        for i in range(n):
            if claims.get(str(i)) == self.node.name:
                return spimod.block(i, n)
        for i in range(n):
            if str(i) not in claims and await self.client.create(
                self.keys["blocks"] + str(i), self.node.name
            ):
                return spimod.block(i, n)
        raise EtcdError(f"no free SPI block among {n} (spi_blocks)")

    async def _loop(self) -> None:
        period = self.cfg.ttl_s / 4
        while True:
            self._wake.clear()
            self._fence_check()  # first, whatever woke us after a suspend
            try:
                if not self.lease_id:
                    await self._register()
                if self.node.clock() >= self._next_keepalive:
                    self._next_keepalive = self.node.clock() + period
                    await self._renew()
                    if self.lease_id and self.lease.valid(self.node.clock()):
                        lost = await self._own_groups_lost()
                        if lost:
                            await self._member_key_lost(lost)
                    await self._own_tunnels()
                elif self._own_now and self.lease.valid(self.node.clock()):
                    self._own_now = False
                    await self._own_tunnels()
                if self.lease_id and self.lease.valid(self.node.clock()):
                    await self._scan()
                    if self.node.clock() >= self._next_orphan_check:
                        self._next_orphan_check = self.node.clock() + ORPHAN_CHECK
                        await self._check_orphans()
                self.last_error = ""
            except EtcdError as exc:
                self._quiet.event(
                    log,
                    "cluster-etcd-error",
                    logging.WARNING,
                    node=self.node.name,
                    error=str(exc),
                )
                self.last_error = str(exc)
                self._next_keepalive = 0.0  # try again at once
            self._events(self.lease.poll(self.node.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SCAN_PERIOD if self.standbys else period)

    async def _replicate(self) -> None:
        assert self.channels is not None
        while True:
            await asyncio.sleep(self.tick)
            self._fence_check()
            now = self.node.clock()
            if self.lease_id:  # a member: peers see our member key before our replicas
                for p, rp in self.replicators.items():
                    if rp.target_lease is None:
                        continue  # not a member (as last read): nothing it could keep
                    for m in rp.poll(now, self.channels.room(p)):  # (in pieces: failover)
                        self.channels.send(p, m)
            budget = PREPARE_PER_TICK
            for sb in self.standbys.values():
                budget -= sb.prepare(budget)

    def _selection_changes(self) -> tuple[int, int]:
        """What :meth:`_replicate_to` depends on besides the tunnel itself (its SPI, its
        siblings, which come and go with tunnels): the member list (``_layout``) and what
        this member holds and where its tunnels are placed (``Ownership.changes``)."""
        return self._layout, self.own.changes

    def _replicate_to(self, peer: str, t: Tunnel) -> bool:
        """Whether tunnel ``t`` goes to ``peer``: the ``replicas`` live peers ranked highest
        for its group, which are those that take it if this member dies (every peer when
        ``replicas`` is 0, or before the first reading of the member list)."""
        g = self.own.placed.get(t.outbound.spi)
        if g is None:
            if not self.own.home:
                return self._live is None or self.cfg.replicas == 0 or peer in self._live
            g = self._sibling_group(t.outbound.spi) or self.own.home_of(t.outbound.spi)
        return self._group_goes_to(peer, g)

    def _group_goes_to(self, peer: str, g: str) -> bool:
        """Whether what is kept in group ``g`` goes to ``peer`` (see :meth:`_replicate_to`)."""
        live = self._live
        if live is None or self.cfg.replicas == 0:
            return True
        if peer not in live:
            return False
        targets = self._targets.get(g)
        if targets is None:
            peers = [m for m in live if m in self.replicators and m != self.node.name]
            rank = ownership.ONE_RANK if self.one_taker else ownership.group_rank(g)
            targets = frozenset(ownership.successors(rank, peers, self.cfg.replicas))
            self._targets[g] = targets
        return peer in targets

    def _members_seen(self, now: dict[str, int]) -> None:
        """The member list (name -> lease) as just read: who replicates what changes with it.
        A peer that no longer gets a tunnel is told to drop it, and the tunnel's floor there
        holds until it acknowledged that (``Replicator.select``)."""
        if self._live is None or set(self._live) != set(now):
            self._targets.clear()
            self._layout += 1
        before = self._live or {}
        for p, rep in self.replicators.items():
            old, new = before.get(p), now.get(p)
            if old and new != old and rep.floor:
                # p's member key is gone or names a new lease: whatever p holds (or is on
                # its way to it) was sent for the old lease, which p can never use again.
                freed = rep.forget_floors()
                self.floors_dropped += len(freed)
                event(
                    log,
                    "cluster-floors-dropped",
                    node=self.node.name,
                    peer=p,
                    tunnels=len(freed),
                    detail=f"{p}'s lease is gone: its replicas can never be used, so they no "
                    "longer bound these tunnels' sequence numbers",
                )
            rep.target_lease = new
        self._live = now

    async def _scan(self) -> None:
        """Read the member list; take this member's share of the groups of peers whose
        member key is gone. First: is our own member key still the one we wrote?"""
        mkvs = await self.client.get_prefix(self.keys["members"])
        mine = [kv for kv in mkvs if kv.key == self.own.member_key()]
        lost = self._own_key_lost(mine[0] if mine else None)
        if lost:
            await self._member_key_lost(lost)
            return
        members = {kv.key[len(self.keys["members"]) :] for kv in mkvs}
        seen: dict[str, int] = {}
        for kv in mkvs:
            name = kv.key[len(self.keys["members"]) :]
            lease = ownership.parse_member(kv.value)[1]
            if lease and lease == kv.lease:
                if name in self.standbys:  # (only our peers' groups are ever looked up)
                    self._lease_names[lease] = name
                seen[name] = kv.lease
                continue
            # Not what a member writes (its value names the lease the key is attached to):
            # a buggy or hostile writer's, or a corrupted etcd's. Nobody to replicate to;
            # but a member seen before keeps its lease here: its floors stay (it may still
            # take our tunnels over from its replicas), its tunnels are not taken.
            self._malformed(kv.key, "a member key that names no lease or not its own")
            if self._live is not None and name in self._live:
                seen[name] = self._live[name]
        while len(self._lease_names) > LEASE_NAMES_PER_PEER * len(self.standbys):
            del self._lease_names[next(iter(self._lease_names))]  # a peer's oldest lives
        members |= await self._keyless_alive(seen)
        self._members = members
        self._members_seen(seen)
        # A transfer's source whose member key is gone before it handed us the keys of what
        # it committed here is a dead peer too: our copies of those tunnels are the newest
        # (it stopped sending on them at its COMMIT), and their groups are adopted like those
        # of the peer's replicas. Counting replicas only, such a group whose tunnels' replicas
        # were all dropped (the source removed the moved tunnel from its replicas at the
        # commit) was never adopted: reported orphaned, the tunnel lost (never sent on).
        sources = {p for p in self._transferred_in.values() if p not in members}
        if not sources and not any(sb.replica or sb.extra for sb in self.standbys.values()):
            return
        dead = [
            p
            for p, sb in self.standbys.items()
            if (sb.replica or sb.extra or p in sources) and p not in members
        ]
        if not dead:
            self.dead_since.clear()
            return
        groups, tunnels = await read_ownership(self.client, self.keys, self._malformed)
        self._tunnel_view = tunnels
        ours = await self._adopted_unanswered(groups)
        if ours:
            await self._took_groups(ours, tunnels, dead)
        for p in dead:
            sb = self.standbys[p]
            for spi in [s for s in sb.replica if tunnels.get(s, "") in groups]:
                del sb.replica[spi]  # someone owns it now: this replica must never be used
            self._prune_ike(sb.extra, lambda outs, sb=sb: not any(o in sb.replica for o in outs),
                            lambda key, g: g in groups)  # fmt: skip
        now = self.node.clock()
        first = min(self.dead_since.setdefault(p, now) for p in dead)
        graced = now - first >= self.grace
        live = members | {self.node.name}
        takes = self._takes(lambda p: p in dead)
        held = takes.held
        orphans = {g: spis for g, spis in ownership.orphans(groups, tunnels).items() if takes(spis)}
        for g in self._ike_orphans(dead, groups):  # groups holding only CHILD-less IKE SAs
            orphans.setdefault(g, [])
        if orphans:
            gids = sorted(orphans)
            share = (
                gids
                if graced
                else ownership.plan_groups(gids, live, one=self.one_taker)[self.node.name]
            )
            await self._adopt(share, tunnels, dead)
        # Tunnels a dead peer had but never recorded (it never owned them, so never sent on
        # them): whoever records them first. Not once any of the peer's groups has an owner
        # again: that owner may have taken such a tunnel over, sent on it and deleted it (its
        # key gone: it reads as never recorded), and our replica's numbers are what it sent.
        # Those replicas are dropped (a tunnel the peer never recorded is lost with it then:
        # liveness, never a number twice).
        claimed = {self._lease_names.get(ownership.lease_of_group(g)) for g in groups}
        keyless = [(p, s) for p in dead if p in claimed
                   for s in self.standbys[p].replica if s not in tunnels]  # fmt: skip
        for p, s in keyless:
            del self.standbys[p].replica[s]
        if keyless:
            self.keyless_dropped += len(keyless)
            event(log, "cluster-keyless-dropped", logging.WARNING, node=self.node.name,
                  tunnels=len(keyless), detail="replicas of a dead member's tunnels without a "
                  "key, whose groups another member owns now (it may have sent on them and "
                  "deleted them): never taken over from here")  # fmt: skip
        held -= {s for _, s in keyless}
        loose = sorted(s for s in held if s not in tunnels)
        if loose:
            share_t = (
                loose if graced else ownership.plan(loose, live, one=self.one_taker)[self.node.name]
            )
            won: list[int] = []
            for i in range(0, len(share_t), ownership.MAX_TXN_OPS - 1):
                batch = share_t[i : i + ownership.MAX_TXN_OPS - 1]
                if await self.client.txn(self.own.place(batch)):
                    self.own.placed_ok(batch)
                    won += batch
            with gcpolicy.POLICY.batch():
                self._install(won, dead)

    async def _keyless_alive(self, seen: dict[str, int]) -> set[str]:
        """Peers read live before whose member key is gone now (or names another lease)
        while the lease we read them under lives: an operator's ``etcdctl del``, a restore
        of etcd, a bug elsewhere. Such a peer is not dead: its owner keys live with its
        lease (nobody may take its groups), it may still send on its tunnels and write its
        key back (_member_key_lost), and take our tunnels over from the replicas it holds.
        Taken for gone, our replicas of its tunnels were dropped (its groups owned), so that
        its tunnels were orphaned when it died later, and our floors there were dropped,
        though its replicas stayed usable under that lease. Each is kept in ``seen`` under
        the lease it had until etcd says that lease is gone (one lookup per such peer and
        round). Returns their names."""
        kept: set[str] = set()
        for name, lease in (self._live or {}).items():
            if name not in self.standbys or seen.get(name) == lease:
                continue
            left = (await _time_to_live(self.client, lease))[1]
            if left is not None and left < 0:  # etcd has no such lease: it ended
                continue
            seen[name] = lease  # (an answer that is not a number: alive, in doubt)
            kept.add(name)
            if self._keyless.get(name) != lease:
                self.keyless_peers += 1
                event(log, "cluster-member-key-missing", logging.WARNING, node=self.node.name,
                      peer=name, lease=f"{lease:x}", detail=f"{name}'s member key is gone or "
                      "names another lease while its lease lives (an operator's etcdctl del, "
                      "a restore of etcd): not taken for gone; its replicas, its floors and "
                      "its groups stay as they are until etcd ends that lease")  # fmt: skip
        self._keyless = {n: seen[n] for n in kept}
        return kept

    def _own_key_lost(self, kv: Any) -> str:
        """What is wrong with our member key as just read ("" if nothing): gone, under
        another lease, or written since this life first read it (deleted and written again,
        by an operator or a restore of etcd: even with our lease, not ours)."""
        if kv is None:
            return KEY_GONE
        lease = ownership.parse_member(kv.value)[1]
        if kv.lease != self.lease_id or lease != self.lease_id:
            return f"member key names another lease ({kv.lease:x}, its value {lease:x})"
        rev = (kv.create_revision, kv.mod_revision)
        if self._own_rev is None:
            self._own_rev = rev
        elif rev != self._own_rev:
            return f"member key was written again (revision {rev[1]}, not {self._own_rev[1]})"
        return ""

    async def _own_groups_lost(self) -> str:
        """Is every owner key we believe ours still under our lease? ("" if so: one
        transaction of compares per 128 groups, every ``ttl_s / 4``.) One deleted (an
        operator's etcdctl, a restore of etcd from a snapshot taken before we adopted it)
        makes its group ownerless: we would send on its tunnels while anyone may create
        its owner key (the take-over's compare is "absent")."""
        gs = sorted(self.own.groups)
        for i in range(0, len(gs), ownership.MAX_TXN_OPS):
            batch = gs[i : i + ownership.MAX_TXN_OPS]
            cmp = tuple(ownership.Compare(self.own.group_key(g), "LEASE", self.lease_id)
                        for g in batch)  # fmt: skip
            if await self.client.txn(ownership.Txn(cmp, ())):
                continue
            for g in batch:
                kv = await self.client.get(self.own.group_key(g))
                if kv is None or kv.lease != self.lease_id:
                    return f"owner key of group {g} " + (
                        "is gone" if kv is None else f"names another lease ({kv.lease:x})"
                    )
        return ""

    async def _member_key_lost(self, why: str) -> None:
        """Our member key (or the owner key of a group we hold) is gone or not ours, while
        we believe our lease lives. Gone (an operator's ``etcdctl del``, a restore of etcd):
        the lease and its owner keys are as they were, and peers that read the key gone
        do not take us for gone while etcd says the lease lives (_keyless_alive): we write
        it back under that lease, only while absent (_key_restored), and go on. Not ours
        (under another lease, or written again since we first read it: another gateway of
        our name, a restore), or an owner key of ours gone (anyone may create it: a take-over
        compares "absent"): our take-overs and new tunnels' records fail (they compare the
        member key under our lease), the peers read another member there or, for the group,
        may adopt it. So this life ends as when etcd expires the lease (_lease_gone: fenced,
        our tunnels removed, the replicas we hold forgotten, IKE SAs forgotten), then the
        lease itself is revoked (after ``guard_ms``, for packets still in a socket queue: our
        owner keys go and the survivors may adopt our groups from their replicas, above our
        ceilings), and we join again under a new lease once those groups have an owner
        (_previous_life)."""
        lease = self.lease_id
        if await self.client.keepalive(lease) <= 0:
            self._lease_gone()  # (etcd ended the lease: its keys went with it)
            return
        if why == KEY_GONE:
            rev = await self.client.txn_at(self.own.reassert(self.address))
            if rev:
                self._key_restored(rev)
            # else written meanwhile, not by us: the next round reads it (_own_key_lost)
            return
        self._lease_gone(key_lost=why)
        await asyncio.sleep(self.cfg.guard_ms / 1000)
        with contextlib.suppress(EtcdError):
            await self.client.revoke(lease)
        # our old groups go to the survivors first, as after a restart (_previous_life)
        self._previous = (frozenset({lease}), self.node.clock())

    def _key_restored(self, rev: int) -> None:
        """Our member key was deleted while our lease lived, and we wrote it back (under
        that lease, only while absent). Nothing else changed: the lease, its owner keys and
        our groups are as they were, so nobody could take a group of ours meanwhile, and
        the peers that read the key gone asked etcd about the lease, found it alive and
        kept our replicas and their floors here (_keyless_alive): what we hold still bounds
        their tunnels, and our own tunnels go on. The key is ours as written at ``rev``
        (any other write of it since is someone else's, as after joining)."""
        self._own_rev = (rev, rev)
        self.keys_restored += 1
        event(log, "cluster-member-key-restored", logging.WARNING, node=self.node.name,
              lease=f"{self.lease_id:x}", detail="this gateway's member key was deleted while "
              "its lease lived (an operator's etcdctl del, a restore of etcd, a bug "
              "elsewhere): written back under the same lease; its peers do not take it for "
              "gone while the lease lives. Stop a member (SIGTERM) to make it leave")  # fmt: skip

    def _takes(self, dead: Callable[[str], bool]) -> _Takes:
        """Which orphaned groups _scan adopts, the peers ``dead`` says are gone: a group is
        ours to take if we hold a replica in it from such a peer, or a copy of its every
        tunnel (some committed here by such a peer): not one whose other tunnels' replicas
        another member holds (it takes the group, and would lose them were it ours). The
        one rule for _scan and _check_orphans (which reports what it does not take)."""
        held = {s for p, sb in self.standbys.items() if dead(p) for s in sb.replica}
        return _Takes(held, held | {s for s, p in self._transferred_in.items() if dead(p)})

    async def _check_orphans(self) -> None:
        """Groups whose owner died and that nobody took over: a member holding a replica of
        any of their tunnels from a dead peer (_scan's) takes such a group within ``grace``,
        so one still without an owner ``ORPHAN_AFTER`` later is served by no live member.
        Its tunnels' keys died with their owner (they never go to etcd); nothing sends on
        them, and nothing may: a member restarting with some of them configured cannot know
        whether someone owned the group and sent past its durable ceiling since. The
        operator is told, also of such a group whose tunnels we hold replicas of from a
        peer that is a member again (under a new lease: _scan never read it dead, a
        transfer's target stopped past its lease and woken while we were stopped too):
        never taken over from those (they may be older than what the peer's past life or a
        copy restored from disk sent), but reported, not left silent."""
        groups, tunnels = await read_ownership(self.client, self.keys, self._malformed)
        self._tunnel_view = tunnels
        now = self.node.clock()
        orph = ownership.orphans(groups, tunnels)
        for g in [g for g in self._orphan_since if g not in orph]:
            del self._orphan_since[g]
        for g in orph:
            self._orphan_since.setdefault(g, now)
        members = self._members

        def gone(p: str) -> bool:  # (a peer whose groups _scan takes; all before a reading)
            return members is None or p not in members

        mine = {s for sb in self.standbys.values() for s in sb.replica}
        takes = self._takes(gone)
        lasting = {
            g: spis
            for g, spis in orph.items()
            if now - self._orphan_since[g] >= ORPHAN_AFTER and not takes(spis)
        }
        new = {g: spis for g, spis in lasting.items() if g not in self.orphaned}
        self.orphaned = {g: len(spis) for g, spis in lasting.items()}
        held = {g: spis for g, spis in new.items() if any(s in mine for s in spis)}
        bare = {g: spis for g, spis in new.items() if g not in held}
        for orphans, why in (
            (bare, " (no live member holds a replica: their keys died with their owner)"),
            (held, ", of which this member holds replicas from a peer that is a member again "
             "(under a new lease): not taken over from them (a replica may be older than "
             "what was sent since: a number twice)"),
        ):  # fmt: skip
            if orphans:
                event(
                    log,
                    "cluster-orphaned",
                    logging.WARNING,
                    node=self.node.name,
                    groups=len(orphans),
                    tunnels=sum(len(v) for v in orphans.values()),
                    detail="groups of tunnels without an owner that no member took over"
                    f"{why}: nothing sends on them, and nothing may; re-key them (an IKE peer "
                    "does by itself; manual SAs need new keys); ipsecct cluster status counts "
                    "them",
                )

    async def _adopt(self, gids: list[str], tunnels: dict[int, str], dead: list[str]) -> None:
        """Create the owner keys of these orphaned groups (one transaction, or one per group
        if someone was faster for some) and install their tunnels from our replicas. With
        one taker (indirect identity) a member that was not the fastest takes none of them:
        another holds some, and the clients must not be split between two holders of the
        virtual address."""
        got: list[str] = []
        for i in range(0, len(gids), ownership.MAX_TXN_OPS - 1):
            batch = gids[i : i + ownership.MAX_TXN_OPS - 1]
            if await self.client.txn(self.own.adopt(batch)):
                got += batch
            elif self.one_taker:
                break
            else:
                for g in batch:
                    if await self.client.txn(self.own.adopt([g])):
                        got.append(g)
        if got:
            # What the groups hold, read again now that they are ours (nobody else can change
            # their tunnels' keys from here on). The reading the plan came from may be older
            # than a life of these groups in between: adopted by another member, a tunnel's
            # key deleted or moved by it, its lease ended (our "absent" compares hold again).
            # Taken from that reading, a tunnel whose key was gone was believed ours, which
            # whoever recorded it since believes too (tests/test_ownership_groups.py's
            # property, with a member stopped between its reading and its take-over).
            tunnels = (await read_ownership(self.client, self.keys, self._malformed))[1]
        await self._took_groups(got, tunnels, dead)

    async def _adopted_unanswered(self, groups: dict[str, str]) -> list[str]:
        """Groups whose owner key etcd holds under our lease though we do not know them
        ours: a take-over's transaction that etcd committed but whose answer was lost (a
        timeout, the connection cut). Nobody else can take them; taken for someone else's,
        our replicas of their tunnels were dropped and the tunnels lost, silently."""
        maybe = {g for g, who in groups.items() if who == self.node.name} - self.own.groups
        if not maybe or not self.lease_id:
            return []
        n = len(self.keys["groups"])
        got = sorted(
            kv.key[n:]
            for kv in await self.client.get_prefix(self.keys["groups"])
            if kv.key[n:] in maybe and kv.lease == self.lease_id
        )
        if got:
            event(log, "cluster-adopt-answer-lost", logging.WARNING, node=self.node.name,
                  groups=len(got), detail="etcd committed our take-over of these groups but "
                  "its answer was lost: taking them over now")  # fmt: skip
        return got

    async def _took_groups(self, got: list[str], tunnels: dict[int, str], dead: list[str]) -> None:
        """The owner keys of these groups are ours: install their tunnels from our replicas,
        delete the keys of those we have no copy of."""
        if not got:
            return
        self._layout += 1
        with gcpolicy.POLICY.batch():  # a bulk install: no walk of the heap in the middle
            lost = self._adopted(got, tunnels, dead)
        self._take_childless(dead)
        for spi in lost:  # in a group we own now, but nobody replicated it to us: gone
            txn = self.own.release(spi)
            if txn is not None and await self.client.txn(txn):
                self.own.released(spi)
        if lost:
            event(
                log,
                "cluster-tunnels-lost",
                logging.WARNING,
                node=self.node.name,
                tunnels=len(lost),
                detail="in a group taken over, but no replica here: their keys were deleted",
            )

    def _adopted(self, got: list[str], tunnels: dict[int, str], dead: list[str]) -> list[int]:
        """We own these groups now: install their tunnels. Returns those we have no copy of."""
        spis = self.own.adopted(got, tunnels)
        # A tunnel a transfer committed here in this life, whose source died before it handed
        # over the key, is ours now as it is: its source stopped at the commit, so this copy
        # is the newest. Any other copy here (restored from our durable state after a
        # restart: someone may have sent on it since) is older than what the group's owner
        # sent, and is replaced by a replica or dropped, never sent on. A tunnel a transfer
        # from the group's owner holds here pending (its COMMIT not come) is not left to the
        # transfer: the owner's lease is gone, so it can never commit as the owner, and were
        # the transfer cancelled (the owner running again, or its prepared wait over) the
        # pending copy went, the replica was dropped (the group has an owner) and the tunnel
        # was lost for good. The transfer is withdrawn and the replica installed (above
        # anything the owner sent; the pending copy may be older than a rollback there).
        # Not once the key left the source's group, for a group of ours of a life that
        # ended: anyone may have adopted that group since, taken the tunnel over from a
        # replica we sent, sent on it and died (a target stopped before its COMMIT past its
        # lease, woken: sg1 took it over, then sg1's lease ended and we adopted the group
        # back: this copy sent the COMMIT's numbers again, under what sg1 had sent). Only a
        # key in a group a peer's lease created (the source's, as last read) is kept as is.
        wanted = set(spis)
        newest = {
            s
            for s in wanted & self._transferred_in.keys()
            if self._lease_names.get(ownership.lease_of_group(tunnels.get(s, "")), self.node.name)
            != self.node.name
        }
        here, busy, pending = [], set(), []
        for t in self.node.engine.tunnels():
            if t.outbound.spi not in wanted:
                continue
            if t.state is not TunnelState.ACTIVE:
                if self.transfer is not None and self.transfer.core.awaiting_commit(t):
                    pending.append(t)  # towards us, from the group's dead owner: below
                else:
                    busy.add(t.outbound.spi)  # in a transfer: the transfer decides
            elif t.outbound.spi in newest:
                here.append(t)
            else:
                self.node.engine.remove_tunnel(t)
        for t in pending:
            self._withdraw(t)
        for t in here:
            for sb in self.standbys.values():
                sb.replica.pop(t.outbound.spi, None)
        self._owned(here)  # (no longer waiting for a key, nor told not ours: ours now)
        have = {t.outbound.spi for t in here} | busy
        return self._install([s for s in spis if s not in have], dead, creators=got)

    def _withdraw(self, t: Tunnel) -> None:
        """Cancel the transfer towards us that holds ``t`` pending (its source, whose group
        we adopted, told with a CTC: a COMMIT of it arriving later activates nothing)."""
        assert self.transfer is not None
        self.transfer.flush_aftermath()  # (an input to the core: after what is left of one)
        taken = self.transfer.core.withdraw(t, self.node.clock(), "its owner's lease ended")
        if taken is None:
            return  # (withdrawn with another tunnel of its transfer)
        self.transfer.run(taken[1])
        self.withdrawn += 1
        event(log, "cluster-transfer-withdrawn", logging.WARNING, node=self.node.name,
              spi=f"0x{spi_hex(t)}", detail="a transfer towards us held it pending when its "
              "owner's lease ended: the transfer is cancelled, the tunnel taken over from "
              "its replica")  # fmt: skip

    def _install(
        self, spis: list[int], dead: list[str], creators: list[str] | None = None
    ) -> list[int]:
        """Install these tunnels (ours now) from the dead peers' replicas: the replica from
        the member that created the tunnel's group first. Returns those without a replica."""
        order = list(dead)
        for g in creators or []:
            name = self._lease_names.get(ownership.lease_of_group(g))
            if name in order:
                order.remove(name)
                order.insert(0, name)
        todo = set(spis)
        now = self.node.clock()
        for p in order:
            sb = self.standbys[p]
            mine = [s for s in spis if s in todo and s in sb.replica]
            if not mine:
                continue
            todo -= set(mine)
            tunnels, signals, rec = sb.take_over(now, mine)
            for other in order:  # a second copy elsewhere is stale: never use it
                for s in mine:
                    self.standbys[other].replica.pop(s, None)
            if sb.not_taken and self.ike is not None:  # CHILD SAs of IKE SAs we refused
                self.ike.units_not_taken(sb.not_taken, p)
                todo.update(o for _, _, outs in sb.not_taken for o in outs)
            self._took(p, tunnels, signals, rec, len(mine))
        return sorted(todo)

    def _took(
        self,
        peer: str,
        tunnels: list[Tunnel],
        signals: list[tuple[Any, bytes]],
        rec: Record,
        asked: int,
    ) -> None:
        now = self.node.clock()
        for t in tunnels:
            self._ceiling(t)
        for sa, payload in signals:
            res = self.node.engine.signal(sa, payload, now)
            if not isinstance(res, Drop):
                self.node.send_esp(res.sa, res.data)
        self.taken += len(tunnels)
        n_ike = self._take_ike(peer, now)
        if n_ike:
            rec.detail = (rec.detail + "; " if rec.detail else "") + f"{n_ike} IKE SA(s)"
        rec.peer = peer
        rec.detail = (rec.detail + "; " if rec.detail else "") + "etcd mode"
        self.takeovers.append({"from": peer, "tunnels": len(tunnels), "at": round(now, 3)})
        del self.takeovers[:-20]
        if self.transfer is not None:
            self.transfer.report(rec)
        event(
            log,
            "cluster-took-over",
            logging.WARNING,
            node=self.node.name,
            peer=peer,
            tunnels=len(tunnels),
            asked=asked,
            detail=f"{peer}'s lease ended: this gateway took over its groups' tunnels "
            f"(from their replicas, sequence numbers advanced by the margin)",
        )

    def _take_ike(self, peer: str, now: float) -> int:
        """Take over the IKE SAs of ``peer``'s replica whose CHILD SAs' tunnels are all ours
        now (installed just before), and drop every other copy of them. An IKE SA whose
        CHILD SAs we own only in part stays (counted, logged): another member may hold the
        rest, and two gateways must never run one IKE SA."""
        if self.ike is None:
            return 0
        sb = self.standbys[peer]
        here = {t.outbound.spi for t in self.node.engine.tunnels()}
        take: list[list[bytes]] = []
        taken: set[int] = set()
        spis: set[bytes] = set()
        for key, cdbs in list(sb.extra.items()):
            g = self._key_group(key)
            if g is not None:  # without a CHILD SA: it goes with its group, if we hold it
                if g in self.own.groups and self._group_of_peer(g, peer):
                    del sb.extra[key]
                    take.append(cdbs)
                    spis.add(replica_spi(key))
                continue
            try:
                outs = [o for _, o in ike_context.child_spis(cdbs)]
            except IkeContextError:
                del sb.extra[key]
                continue
            mine = [o for o in outs if o in here and self.own.owns(o)]
            if not mine:
                continue
            del sb.extra[key]
            if len(mine) < len(outs):
                self.ike_split += 1
                event(log, "cluster-ike-sa-split", logging.WARNING, node=self.node.name,
                      peer=peer, children=len(outs), here=len(mine),
                      detail="only some of its CHILD SAs were taken here: the IKE SA was"
                      " not taken over (its client will re-establish it)")  # fmt: skip
                continue
            take.append(cdbs)
            taken.update(outs)
            spis.add(replica_spi(key))
        for other in self.standbys.values():  # any other copy is stale: never use it
            self._prune_ike(other.extra, lambda outs: any(o in taken for o in outs), spis=spis)
        if not take:
            return 0
        n = self.ike.take_over(take, now, self.margin)
        self.ike_taken += n
        return n

    def _ike_refused(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.ike is not None:
            for r in self.ike.refused_replicas():
                out[r["standby"]] = out.get(r["standby"], 0) + 1
        return out

    def _group_of_peer(self, g: str, peer: str) -> bool:
        """Is ``g`` one of ``peer``'s home groups (by its lease, as last seen)? A CHILD-less
        IKE SA's replica names one of its sender's."""
        return self._lease_names.get(ownership.lease_of_group(g)) == peer

    def _ike_orphans(self, dead: list[str], groups: dict[str, str]) -> set[str]:
        """Groups without an owner that dead peers keep CHILD-less IKE SAs in (replicated
        here): orphaned as a group with tunnels is, though no tunnel key names them."""
        out: set[str] = set()
        for p in dead:
            for key in self.standbys[p].extra:
                g = self._key_group(key)
                if g is not None and g not in groups and self._group_of_peer(g, p):
                    out.add(g)
        return out

    def _take_childless(self, dead: list[str]) -> None:
        """After adopting groups: take over the dead peers' CHILD-less IKE SAs kept in them
        (those with CHILD SAs came with their tunnels)."""
        now = self.node.clock()
        for p in dead:
            n = self._take_ike(p, now)
            if n:
                self.takeovers.append({"from": p, "tunnels": 0, "ike_sas": n,
                                       "at": round(now, 3)})  # fmt: skip
                del self.takeovers[:-20]
                event(log, "cluster-took-over", logging.WARNING, node=self.node.name,
                      peer=p, tunnels=0, ike_sas=n,
                      detail=f"{p}'s lease ended: this gateway took over its IKE SAs "
                      f"without CHILD SAs")  # fmt: skip

    def _prune_ike(
        self,
        extra: dict[bytes, list[bytes]],
        drop: Any,
        drop_group: Any = None,
        spis: set[bytes] | None = None,
    ) -> None:
        """Drop the IKE SA replicas in ``extra`` that ``drop`` picks by their CHILD SAs'
        outbound SPIs (one without CHILD SAs and without a group always), those without a
        CHILD SA that ``drop_group`` picks by key and group, and those of these IKE SPIs."""
        for key, cdbs in list(extra.items()):
            if spis is not None and replica_spi(key) in spis:
                del extra[key]
                continue
            g = self._key_group(key)
            if g is not None:
                if drop_group is not None and drop_group(key, g):
                    del extra[key]
                continue
            try:
                outs = [o for _, o in ike_context.child_spis(cdbs)]
            except IkeContextError:
                outs = []
            if not outs or drop(outs):
                del extra[key]

    async def _renew(self) -> None:
        self._n += 1
        n = self._n
        self.lease.sent(n, self.node.clock())
        ttl = await self.client.keepalive(self.lease_id)
        self._fence_check()  # (suspended while waiting: the heartbeat left earlier than noted)
        now = self.node.clock()
        if ttl <= 0:
            self._lease_gone()
            return
        if ttl < self.cfg.ttl_s:
            self._short_lease("renewed", ttl)
            return  # the fence is not moved on: it may lapse
        self._events(self.lease.granted(n, now))
        self.node.engine.send_until = self.lease.expiry

    def _lease_gone(self, key_lost: str = "") -> None:
        """etcd expired our lease: our owner keys are gone and others may hold our tunnels
        now. Remove them for good and join again, empty. ``key_lost``: our member key (or a
        group's owner key) is gone or not ours while the lease lives
        (:meth:`_member_key_lost`, which then ends the lease itself): the same end of this
        life, told as that."""
        # A loss not yet noticed (the member did not run past its fence: a SIGSTOP) is
        # counted and told now, with the lease that had it: status's losses are over lives.
        self._events(self.lease.poll(self.node.clock()))
        self.lease.revoke()
        self.node.engine.send_until = -math.inf
        owned = self.own.lease_gone()
        gone = [t for t in self.node.engine.tunnels() if t.outbound.spi in owned]
        for t in gone:
            self.node.engine.remove_tunnel(t)
        self.lost_for_good += len(gone)
        # What we hold for others was sent under the lease that is gone: the owners stop
        # counting on it (they see our member key gone) and may send past its floors, so it
        # must never be used; what they sent us before noticing is refused (another lease).
        for sb in self.standbys.values():
            sb.forget(0)
        self._layout += 1
        if self.ike is not None:  # others may run them now: never a message more from here
            self.ike.forget_all("etcd ended this gateway's lease: its IKE SAs may have moved")
        why = (
            "lease-expired" if not key_lost
            else "member-key-lost" if key_lost.startswith("member") else "owner-key-lost"
        )  # fmt: skip
        self.life_ends[why] = self.life_ends.get(why, 0) + 1
        self.last_life_end = (
            f"this gateway's {key_lost} while its lease lived: it ended that "
            f"lease (its tunnels removed here, {len(gone)}) and joins again"
            if key_lost
            else f"etcd expired this gateway's lease (its tunnels removed here, {len(gone)})"
        )
        event(
            log,
            "cluster-" + why,
            logging.ERROR,
            node=self.node.name,
            tunnels=len(gone),
            detail=(
                f"this gateway's {key_lost} (an operator's etcdctl, a restore of etcd)"
                + (": not the key it wrote (its peers read another member there)"
                   if why == "member-key-lost" else ": anyone may take that group over")
                + ". It stopped sending, removed its tunnels, ends its lease (its groups go to "
                "the members holding their replicas) and joins again without them"
                if key_lost
                else "etcd expired this gateway's lease: its tunnels may have moved; they were"
                " removed here, and the gateway joins again without them"
            ),
        )
        self.lease_id = 0
        self._own_rev = None
        self.losses_before += self.lease.losses
        self.lease = Lease(self.timing)
        # A copy a transfer committed here is the newest only while nobody else may have
        # owned its group: the keys handed to our groups are gone with them (_adopted).
        self._transferred_in.clear()

    def _fence_check(self) -> None:
        """Count a suspend of this machine in the fence. The node's clock (CLOCK_MONOTONIC,
        the C forwarding thread's too) stands still while the machine is suspended, while
        etcd's runs on: woken after a suspend past the lease, the fence looked valid for the
        rest of it, though etcd may have expired the lease and a peer taken our tunnels over
        meanwhile. Below the ceilings that is harmless (the taker starts above them); but the
        member list read then (a taker whose lease changed since: its floors dropped) or an
        ACK raises them. So every path that may raise a ceiling or send from Python runs
        this first: the lease ends ``suspended`` sooner on our clock, and the engine's fence
        (with it C's: lowering it reclaims what C holds) moves back with it."""
        slept = self.suspended() - self._slept_base
        if slept < SLEPT_NOISE:
            return
        self._slept_base += slept
        if not math.isfinite(self.lease.expiry):
            self.lease.slept(slept)  # (heartbeats awaiting a grant)
            return
        self.suspends += 1
        self.lease.slept(slept)
        now = self.node.clock()
        if self.node.engine.send_until > self.lease.expiry:
            self.node.engine.send_until = self.lease.expiry
        valid = self.lease.valid(now)
        event(
            log,
            "cluster-resumed",
            logging.WARNING,
            node=self.node.name,
            suspended_s=f"{slept:.1f}",
            detail=f"this machine was suspended for {slept:.1f} s, which its clock did not "
            "count: the lease ends that much sooner"
            + (
                ""
                if valid
                else "; etcd may have expired it meanwhile (and a peer taken our tunnels): "
                "not sending until etcd renews it"
            ),
        )
        if not valid:
            self._next_keepalive = 0.0  # ask etcd now
            self._wake.set()
        self._events(self.lease.poll(now))

    async def _own_tunnels(self) -> None:
        """Record our tunnels that have no key yet (at start, and tunnels new here) in our
        home groups, in batches; learn the groups of those that have one (handed to us by a
        transfer's source?); release the keys of tunnels that left (moved to another member
        by a transfer, or deleted)."""
        if not self.own.home:
            # Not a member (etcd just ended our lease: _lease_gone, and we join again at the
            # next round): no home group to record a tunnel in. A tunnel here that we did not
            # own (a transfer's, configured and owned elsewhere) once stopped the loop here
            # for good (IndexError: the member never joined again).
            return
        here = {
            t.outbound.spi
            for t in self.node.engine.tunnels()
            if t.state in (TunnelState.ACTIVE, TunnelState.HELD)
        }
        # Before a rekeyed CHILD SA's predecessor is released below: the group of each new
        # tunnel's siblings (the other CHILD SAs of its IKE SA), where it goes too.
        hints: dict[int, str] = {}
        if self.ike is not None:
            for t in self.node.engine.tunnels():
                spi = t.outbound.spi
                if t.state is TunnelState.ACTIVE and spi not in self.own.placed:
                    g = self._sibling_group(spi)
                    if g is not None:
                        hints[spi] = g
        for spi in sorted(self.own.owned() - here):
            txn = self.own.release(spi)
            if txn is not None:
                await self.client.txn(txn)
            self.own.released(spi)
        todo = [
            t
            for t in self.node.engine.tunnels()
            if t.state is TunnelState.ACTIVE and not self.own.owns(t.outbound.spi)
        ]
        if hints:
            todo = await self._place_with_siblings(todo, hints)
        per = ownership.MAX_TXN_OPS - 1
        now = self.node.clock()
        retry = False
        known: dict[int, str] | None = None  # tunnel -> group, read once when needed
        for i in range(0, len(todo), per):
            batch = todo[i : i + per]
            spis = [t.outbound.spi for t in batch]
            if await self.client.txn(self.own.place(spis)):
                self.own.placed_ok(spis)
                won = batch
            else:
                # Some have a key already: which group each is in (one read), then record
                # the others.
                found: dict[int, str] = {}
                if len(batch) <= 8:
                    for spi in spis:
                        kv = await self.client.get(self.own.tunnel_key(spi))
                        if kv is not None:
                            found[spi] = kv.value.decode(errors="replace")
                else:
                    if known is None:
                        known = (await read_ownership(self.client, self.keys, self._malformed))[1]
                    found = known
                free = [s for s in spis if s not in found]
                won = []
                if free:
                    if await self.client.txn(self.own.place(free)):
                        self.own.placed_ok(free)
                        mine = set(free)
                        won = [t for t in batch if t.outbound.spi in mine]
                    else:
                        retry = True  # someone recorded one meanwhile: look again
                for t in batch:
                    spi = t.outbound.spi
                    if spi not in found:
                        continue
                    self.own.learn(spi, found[spi])
                    if self.own.owns(spi):
                        won.append(t)
                    elif now - self._unowned_since.setdefault(spi, now) < HANDOVER_WAIT:
                        retry = True  # a transfer's source may not have handed it over yet
                    else:
                        self._fence(t)
            if won:
                self._layout += 1
            self._owned(won)
        if retry:  # look again soon, not at the next round (up to ttl_s / 4 away)
            asyncio.get_running_loop().call_later(HANDOVER_RETRY, self._new_tunnel, None)
        for spi in [s for s in self._unowned_since if s not in here]:
            del self._unowned_since[spi]
        if self._transferred_in:
            inbound = {t.inbound.spi for t in self.node.engine.tunnels() if t.inbound}
            for spi in self._transferred_in.keys() - here - inbound:
                self._left_unowned[spi] = now
            while len(self._left_unowned) > LEFT_MAX:
                del self._left_unowned[next(iter(self._left_unowned))]
            kept = here | inbound
            self._transferred_in = {s: p for s, p in self._transferred_in.items() if s in kept}
        if self._left_unowned:
            await self._release_left(here)

    async def _release_left(self, here: set[int]) -> None:
        """Delete the keys of tunnels that were transferred here and left before their
        source handed the key over, once it lands in one of our groups (else the key stayed
        there for good, and the group was reported orphaned after we died)."""
        now = self.node.clock()
        for spi, since in list(self._left_unowned.items()):
            if spi in here or now - since > LEFT_WAIT:
                del self._left_unowned[spi]
                continue
            kv = await self.client.get(self.own.tunnel_key(spi))
            g = kv.value.decode(errors="replace") if kv is not None else None
            if g is None or g not in self.own.groups:
                continue  # not handed over yet (or an inbound SPI: no key)
            self.own.learn(spi, g)
            txn = self.own.release(spi)
            if txn is not None and await self.client.txn(txn):
                self.own.released(spi)
            del self._left_unowned[spi]
        if self._left_unowned:
            asyncio.get_running_loop().call_later(LEFT_RETRY, self._new_tunnel, None)

    async def _place_with_siblings(self, todo: list[Tunnel], hints: dict[int, str]) -> list[Tunnel]:
        """Record the tunnels that have siblings in a group of ours into that group; returns
        the others (and any whose transaction failed: a key exists, or the group is no longer
        ours), for the ordinary way."""
        rest: list[Tunnel] = []
        by_group: dict[str, list[Tunnel]] = {}
        for t in todo:
            g = hints.get(t.outbound.spi)
            if g is not None and g in self.own.groups:
                by_group.setdefault(g, []).append(t)
            else:
                rest.append(t)
        per = ownership.MAX_TXN_OPS - 2
        for g, ts in by_group.items():
            for i in range(0, len(ts), per):
                batch = ts[i : i + per]
                spis = [t.outbound.spi for t in batch]
                if not await self.client.txn(self.own.place_into(spis, g)):
                    rest += batch
                    continue
                self.own.placed_into(spis, g)
                self._layout += 1
                self._owned(batch)
        return rest

    def _short_lease(self, how: str, ttl: int) -> None:
        """etcd answered a lease shorter than ``ttl_s``, which it never grants: our fence,
        derived from ``ttl_s``, could outlast the lease (another member taking our tunnels
        while we send). Not believed: no fence from it."""
        self._quiet.event(log, "cluster-etcd-short-lease", logging.ERROR, node=self.node.name,
                          ttl_s=ttl, expected_s=self.cfg.ttl_s,
                          detail=f"etcd {how} a lease shorter than ttl_s: not sending on it "
                          "(a corrupted etcd, or not etcd at the endpoint?)")  # fmt: skip

    def _malformed(self, key: str, what: str) -> None:
        """A key under our prefix that no member of ours wrote as it is (taken as nothing, or
        as what keeps every floor): counted, and told (rate-limited: each scan sees it)."""
        self.malformed += 1
        self._quiet.event(log, "cluster-etcd-malformed", logging.WARNING, key=key,
                          node=self.node.name, etcd_key=key, detail=what)  # fmt: skip

    def _fence(self, t: Tunnel) -> None:
        n = len(self._waiting)
        self._waiting = collections.deque(h for h in self._waiting if h.tunnel is not t)
        self.node.engine.stats.drops["fenced"] += n - len(self._waiting)
        told = t.outbound.spi in self._not_owner
        self._not_owner.add(t.outbound.spi)
        if t.seq_ceiling != t.outbound.seq or not told:
            t.seq_ceiling = t.outbound.seq
            event(
                log,
                "cluster-not-owner",
                logging.WARNING,
                node=self.node.name,
                spi=f"0x{spi_hex(t)}",
                detail="another member holds its owner key: not sent",
            )

    def _events(self, events: list[LeaseEvent]) -> None:
        for ev in events:
            level = logging.WARNING if ev is LeaseEvent.LOST else logging.INFO
            detail = (
                "etcd did not renew the lease in time: this gateway stopped sending"
                if ev is LeaseEvent.LOST
                else ""
            )
            event(log, "cluster-" + ev.value, level, node=self.node.name, detail=detail)

    def hold(self, held: Held) -> bool:
        """An outbound packet the fence stopped. A tunnel waiting for its owner key keeps it
        (bounded) until we own the key; otherwise (the lease ran out: the tunnel may move)
        it is dropped and counted as ``fenced``."""
        self._fence_check()
        now = self.node.clock()
        if held.inbound or not self.node.engine.fenced(held.tunnel, now):
            return False
        t = held.tunnel
        if (
            not self.own.owns(t.outbound.spi)
            and self.lease.valid(now)
            and len(self._waiting) < WAITING_MAX
        ):
            self._waiting.append(held)
            return True
        self.node.engine.stats.drops["fenced"] += 1
        return True

    def _owned(self, tunnels: list[Tunnel]) -> None:
        """These tunnels' owner keys now name a group of ours: no longer waiting for one,
        bounded by their replicas' ceilings, and what waited for them is sent."""
        for t in tunnels:
            self._not_owner.discard(t.outbound.spi)
            self._unowned_since.pop(t.outbound.spi, None)
            self._transferred_in.pop(t.outbound.spi, None)
            self._ceiling(t)
        self._now_owned(tunnels)

    def _now_owned(self, tunnels: list[Tunnel]) -> None:
        """Send what waited for these tunnels' owner keys: the commit's signals, the packets."""
        now = self.node.clock()
        if self.transfer is not None:
            self.transfer.flush_aftermath()  # (inputs to the core: after what is left of one)
            for t in tunnels:
                self.transfer.run(self.transfer.core.resend(t, now))
        mine = set(tunnels)
        keep: collections.deque[Held] = collections.deque()
        for h in self._waiting:
            if h.tunnel in mine:
                self.node.from_inner(h.packet)
            else:
                keep.append(h)
        self._waiting = keep

    # -- information -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self._fence_check()
        now = self.node.clock()
        # The loop notices a lapsed lease only between etcd calls (which may wait for a
        # timeout): report it now, so that "lost" always comes with its loss counted.
        self._events(self.lease.poll(now))
        tunnels = [t for t in self.node.engine.tunnels() if t.state is TunnelState.ACTIVE]
        return {
            "mode": "etcd",
            "cluster": self.cfg.name,
            "member": self.node.name,
            # a member under an etcd lease now (false before its first join, and between a
            # lease etcd expired and the next join)
            "joined": bool(self.lease_id),
            "lease": {
                "state": "held" if self.lease.valid(now) else "lost",
                "id": f"{self.lease_id:x}",
                "ttl_s": self.cfg.ttl_s,
                "fence_ms": round(self.timing.lease * 1000, 3),
                "remaining_ms": round(self.lease.remaining(now) * 1000),
                # when the fence stopped it (None while held): its end, not a tick's notice
                "ended_ms_ago": (
                    None if (ago := self.lease.ended_ago(now)) is None else round(ago * 1000, 1)
                ),
                # times a lease of this gateway ran out or ended, over all its lives
                "losses": self.losses_before + self.lease.losses,
                "suspends": self.suspends,  # suspends of the machine counted in the fence
            },
            "spi_block": str(self.block) if self.block is not None else None,
            "groups": len(self.own.groups),
            "owned_tunnels": sum(1 for t in tunnels if self.own.owns(t.outbound.spi)),
            "unowned_tunnels": sum(1 for t in tunnels if not self.own.owns(t.outbound.spi)),
            "removed_on_expiry": self.lost_for_good,
            # this gateway's lives ended (lease-expired: by etcd; member-key-lost,
            # owner-key-lost: its member key or a group's owner key deleted or written over,
            # so it ended the lease itself), and the last's why
            "lives_ended": dict(self.life_ends),
            "last_life_end": self.last_life_end,
            # our member key deleted while our lease lived, written back (same lease)
            "member_key_restored": self.keys_restored,
            # peers whose member key is gone while their lease lives: not taken for gone
            "keyless_peers": {p: f"{lease:x}" for p, lease in self._keyless.items()},
            "etcd_error": self.last_error,
            "replicas": {p: len(sb.replica) for p, sb in self.standbys.items()},
            # replicas below an earlier one's sequence number (a buggy peer; see Standby.high)
            "replicas_seq_backwards": {
                p: sb.seq_backwards for p, sb in self.standbys.items() if sb.seq_backwards
            },
            # new tunnels' replicas not kept (the peer sent more than max_replicas)
            "replicas_refused": {
                p: sb.replicas_refused for p, sb in self.standbys.items() if sb.replicas_refused
            },
            # the members whose tunnels this gateway would take over (with how many)
            "standby_of": {p: len(sb.replica) for p, sb in self.standbys.items() if sb.replica},
            "orphaned": {
                "groups": len(self.orphaned),
                "tunnels": sum(self.orphaned.values()),
                # tunnels here (configured, restored) in such groups: fenced for good
                "here": sum(
                    1 for t in tunnels if self.own.placed.get(t.outbound.spi, "") in self.orphaned
                ),
            },
            "floors_dropped": self.floors_dropped,
            # keys under the cluster's prefix that make no sense (a buggy or hostile writer)
            "malformed": self.malformed,
            # peers whose acknowledgements bound some tunnel's sequence ceiling (and how many)
            "floors": {p: len(r.floor) for p, r in self.replicators.items() if r.floor},
            "taken_over": self.taken,
            # transfers from a dead member that held its tunnels pending here: cancelled,
            # the tunnels taken over from their replicas
            "transfers_withdrawn": self.withdrawn,
            # replicas of dead members' tunnels without a key, their groups owned again: a
            # new owner may have sent on them and deleted them, so never taken from here
            "keyless_dropped": self.keyless_dropped,
            # replicas not taken over: outside [transfer] accept_local_ts / accept_remote_ts
            "outside_accept": sum(sb.policy_refused for sb in self.standbys.values()),
            # ... nor overlapping a tunnel of this member's own (it would take its traffic)
            "overlapping_own": sum(sb.overlap_refused for sb in self.standbys.values()),
            "ike_taken_over": self.ike_taken,
            "ike_split": self.ike_split,
            "replicated_ike_sas": {p: len(sb.extra) for p, sb in self.standbys.items()},
            # of which without a CHILD SA (kept in a group of their own, taken with it)
            "replicated_ike_sas_without_child": {
                p: sum(len(k) > IKE_SPI_LEN for k in sb.extra) for p, sb in self.standbys.items()
            },
            # our IKE SAs a peer member refused as replicas (ike.replicas_refused: which, why)
            "ike_refused": self._ike_refused(),
            # our tunnels a peer member would not take over (its bound, its accept_*_ts)
            "tunnels_refused": {
                p: len(r.tunnels_refused) for p, r in self.replicators.items() if r.tunnels_refused
            },
            "takeovers": list(self.takeovers),
        }


LEASE_LOOKUPS = 1024  # leases ``cluster status`` asks etcd about, at most (one call each)


async def _time_to_live(client: EtcdClient, lease: int) -> tuple[int | None, int | None]:
    """(granted TTL, seconds left) of ``lease``, as etcd answers; None for what it does not
    answer as a number (left is -1 for a lease that is gone, as etcd says)."""
    ans = await client.call("/v3/lease/timetolive", {"ID": str(lease)})

    def num(v: Any) -> int | None:
        return int(v) if isinstance(v, int | str) and str(v).lstrip("-").isdigit() else None

    return num(ans.get("grantedTTL")), num(ans.get("TTL"))


def spi_hex(t: Tunnel) -> str:
    return f"{t.outbound.spi:08x}"


async def read_ownership(
    client: EtcdClient,
    keys: dict[str, str],
    malformed: Callable[[str, str], None] | None = None,
) -> tuple[dict[str, str], dict[int, str]]:
    """The owner of every group, and the group of every tunnel, as etcd has them. A key
    under tunnels/ that is not one a member writes names no tunnel (told to ``malformed``)."""
    groups = {
        key[len(keys["groups"]) :]: value.decode(errors="replace")
        for key, value in await client.get_prefix_values(keys["groups"])
    }
    tunnels: dict[int, str] = {}
    for key, value in await client.get_prefix_values(keys["tunnels"]):
        spi = ownership.spi_of_key(key)
        if spi is not None and key == keys["tunnels"] + f"{spi:08x}":
            tunnels[spi] = value.decode(errors="replace")
        elif malformed is not None:
            malformed(key, "a tunnel key that is not tunnels/<8 lower-case hex digits>: ignored")
    return groups, tunnels


async def cluster_status(cfg: ClusterConfig) -> dict[str, Any]:
    """What etcd says about the cluster: members (with their lease's granted TTL and time
    left), owners (of each tunnel: the owner of its group) and tunnel and group counts per
    member, SPI blocks. For ``ipsecct cluster status``.

    One range read of the member keys, and a lease lookup only for a key a member wrote (its
    value names the lease it is attached to), once per lease, at most ``LEASE_LOOKUPS``:
    any etcd writer may put thousands of keys under ``members/`` (one lookup each made the
    command take minutes); those are counted (``malformed_members``), not listed."""
    client = EtcdClient(list(cfg.etcd), timeout=2.0)
    keys = ownership.keys(cfg.name)
    members: dict[str, dict[str, Any]] = {}
    malformed = 0
    ttls: dict[int, tuple[int | None, int | None]] = {}  # lease -> (granted, left)
    for kv in await client.get_prefix(keys["members"]):
        name = kv.key[len(keys["members"]) :]
        address, lease, _ = ownership.parse_member(kv.value)
        if not lease or lease != kv.lease:
            malformed += 1  # not what a member writes: no lease to ask about
            continue
        if lease not in ttls:
            ttls[lease] = (
                await _time_to_live(client, lease) if len(ttls) < LEASE_LOOKUPS else (None, None)
            )
        granted, left = ttls[lease]
        members[name] = {
            "address": address,
            "lease": f"{kv.lease:x}",
            "ttl_s": granted,  # the TTL etcd granted (the member's ttl_s)
            "left_s": left,  # what is left of it now (None: not looked up)
            "groups": 0,
            "tunnels": 0,
        }
    groups, tunnels = await read_ownership(client, keys)
    for who in groups.values():
        if who in members:
            members[who]["groups"] += 1
    owners: dict[str, str] = {}
    orphaned = 0
    for spi, holder in sorted(ownership.owners(groups, tunnels).items()):
        if holder is not None and holder in members:
            who = holder
            owners[f"0x{spi:08x}"] = who
            members[who]["tunnels"] += 1
        else:
            orphaned += 1
    blocks = {
        kv.key.rsplit("/", 1)[-1]: kv.value.decode(errors="replace")
        for kv in await client.get_prefix(keys["blocks"])
    }
    return {
        "cluster": cfg.name,
        "etcd": list(cfg.etcd),
        "members": members,
        "owners": owners,
        "tunnel_groups": {f"0x{spi:08x}": g for spi, g in sorted(tunnels.items())},
        "owners_without_member": orphaned,
        # keys under members/ that no member wrote (no lease, or not their own): not listed
        "malformed_members": malformed,
        "spi_blocks": {
            i: {"member": m, "range": str(spimod.block(int(i), cfg.spi_blocks))}
            for i, m in sorted(blocks.items(), key=lambda x: int(x[0]) if x[0].isdigit() else -1)
            if i.isdigit() and int(i) < cfg.spi_blocks
        },
    }

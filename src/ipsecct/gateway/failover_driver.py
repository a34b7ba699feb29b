"""Fail-over for one running gateway: drives :class:`~ipsecct.ct.failover.Replicator` (the
active side sends its syncs to the standby over the peer channel) or
:class:`~ipsecct.ct.failover.Standby` (keeps what arrives; takes over when the active falls
silent). Configuration: ``[failover]`` (see :mod:`ipsecct.ct.failover`).

The roles change at run time (issue 9: a pair re-forms by itself). The configured role is
only the first one:

* an active told TAKEN (its standby took over) gives its tunnels up and becomes the standby
  of the taker, in the taker's epoch; it records that on disk, and asks the taker to
  replicate to it (JOIN, repeated every ``heartbeat_ms`` until the first sync arrives);
* a gateway that took over runs alone (no lease: nobody else holds a replica) until a JOIN
  arrives; then it becomes the active of its epoch: a new Replicator, fenced until the new
  standby's first acknowledgement (as any new active), and under its lease from then on;
* on restart, the state file decides: the standby of X comes back as the standby of X (its
  tunnels stay away), a gateway that took over comes back as the active of its epoch (fenced
  until a standby acknowledges it, superseded if the peer took over meanwhile);
* an active answers a sync of an earlier epoch with TAKEN, as the taker did.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..ct import cxtp
from ..ct.failover import (
    SYNC_ACK,
    SYNC_FULL,
    SYNC_HEARTBEAT,
    SYNC_JOIN,
    SYNC_REFUSED,
    SYNC_TAKEN,
    SYNC_TUNNEL_REFUSED,
    FailoverConfig,
    Replicator,
    Standby,
    join_held,
    join_message,
    last_epoch_next,
    last_epoch_text,
    sync_header,
    taken_reply,
)
from ..ct.journal import Write
from ..ct.transfer import FPT_SYNC, Identity, Record, take_over_accept
from ..errors import ControlError, CxtpError, IpsecctError
from ..ipsec.engine import Tunnel
from ..ipsec.esp import Drop
from ..ipsec.sad import SecurityAssociation
from . import gcpolicy
from .fencing import PairFencing, PairState, load_state, save_state, state_path
from .ike import IkeService
from .log import RateLimited, event
from .node import Node
from .peers import PeerChannels
from .transfer_service import TransferService

if TYPE_CHECKING:
    from .state import DurableState

log = logging.getLogger("ipsecct.ct.failover")

UNFENCED = 1 << 64
# tunnels the standby refused, listed in the active's status at most (all are counted)
TUNNELS_REFUSED_LISTED = 32
PREPARE_PER_TICK = 8  # replicas decoded ahead per tick (~125 us per SA)
# A standby that finds its dead time passed this long ago (and at least dead_ms ago) was not
# running (SIGSTOP, a suspended machine): its peer may have been told meanwhile that it is
# down (`failover alone`) and send alone. It asks the peer (JOIN) for RESUME_GRACE seconds
# (at least twice dead_ms) before it takes over: a peer that answers makes it that peer's
# standby. It looks at every timer call and before every sync message it applies (whichever
# the event loop runs first after the pause), counting the time the machine was suspended.
RESUMED_LATE = 1.0
RESUME_GRACE = 3.0
# A gateway running alone in the epoch it went alone into (``failover alone``) JOINs its
# peer whenever a channel with it opens, and again while one is open, every heartbeat_ms
# doubling to TIE_JOIN_MAX seconds: the peer may have taken over into that same epoch (a
# standby stopped unseen, or cut off through its grace) and, running alone too, sends it
# nothing; the JOIN makes that taker replicate to it, which ends the tie (_alone_yields).
TIE_JOIN_MAX = 10.0
# An active without a channel to its standby sends nothing (what it sent would be lost) and
# asks the channel pool to open one at once, then every heartbeat_ms doubling to
# RECONNECT_MAX seconds. Before, every poll's messages went to a connection attempt of their
# own whose failure reported the channel lost: a whole state made due again each time, about
# 45 a second (resyncs), and as many TLS connection attempts.
RECONNECT_MAX = 2.0


def alone_after(dead_ms: float) -> float:
    """How long after its lease ended an active may be told to run alone (seconds): a
    standby stopped since (it acknowledged nothing since the lease's last grant, sent at
    most ``lease`` before that end) then finds its dead time at least max(RESUMED_LATE,
    dead_ms) past when it runs again, and asks before it takes over, as long as it applied
    its last message at most ``lease`` after the sending of the last one whose grant came
    back (the lease ends ``lease`` after that sending; docs/cluster.md)."""
    dead_s = dead_ms / 1000
    return max(RESUMED_LATE, dead_s) + dead_s


def suspended_s() -> float:
    """How long this machine has been suspended since it booted: CLOCK_BOOTTIME counts a
    suspend, CLOCK_MONOTONIC (``time.monotonic``, the node's clock, and the C forwarding
    thread's) does not. Grows only across a suspend (microseconds of noise between the two
    readings otherwise)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()


def is_sync(msg: cxtp.Message) -> bool:
    """A fail-over sync (a CTD whose first CDB after the TRANSFER tag is a SYNC CDB)."""
    return (
        isinstance(msg, cxtp.CTD) and len(msg.cdbs) >= 2 and cxtp.cdb_fpt(msg.cdbs[1]) == FPT_SYNC
    )


class FailoverDriver:
    """The active's replication or the standby's watch, on one timer (``tick_ms``)."""

    # An active without a channel to its standby: when to ask for one next, and the interval
    # now (heartbeat_ms doubling to RECONNECT_MAX; None: heartbeat_ms, reset once connected)
    _reconnect_at = 0.0
    _reconnect_every: float | None = None
    reconnects = 0  # such requests

    def __init__(
        self,
        node: Node,
        cfg: FailoverConfig,
        channels: PeerChannels,
        transfer: TransferService,
        identity: Identity,
    ) -> None:
        self.node = node
        self.cfg = cfg
        self.channels = channels
        if cfg.fencing:
            # Heartbeats one way, their ACKs the other: a peer heard from less often than
            # dead_ms is "unanswered" in status, though its channel is open (a path that
            # drops everything keeps a TCP channel open for USER_TIMEOUT).
            channels.answer_within[cfg.peer] = cfg.dead_ms / 1000
        self.transfer = transfer
        self.identity = identity
        self.replicator: Replicator | None = None
        self.standby: Standby | None = None
        self.journal: DurableState | None = None  # records who sends (the service sets it)
        path = (
            state_path(cfg, node.cfg.path, node.name, node.cfg.state_dir)
            if cfg.fencing
            else None
        )
        self.ike: IkeService | None = None  # attach_ike()
        self.state: PairState = load_state(path)
        role = self.state.role or cfg.role
        # A standby asks its peer to replicate to it (JOIN) until it hears from it: a peer
        # that took over (or was told to run alone) has no other way to learn of it.
        self.joining = False
        self._next_join = 0.0
        self.joins = 0  # JOINs sent
        self.reformed = 0  # times this gateway became the other's standby or got one
        self._given_up: list[Tunnel] = []
        self._stopping = False
        if role == "active":
            self.replicator = Replicator(node.engine, cfg)
            self.replicator.epoch = self.state.epoch
            self.replicator.alone = self.state.alone
            self._watch_transfers(self.replicator)
        else:
            self.standby = self._new_standby(self.state.epoch)
            self.joining = True
            if self.state.role == "standby":
                # It became the standby of its peer before it stopped: the peer sends on its
                # tunnels now. Nothing configured here may send; they go before any socket
                # opens, and are recorded as away once the state runs (start()).
                node.engine.send_until = -math.inf
                self._given_up = list(node.engine.tunnels())
                for t in self._given_up:
                    node.engine.remove_tunnel(t)
                self.joining = True
                event(
                    log,
                    "failover-standby",
                    logging.WARNING,
                    node=node.name,
                    peer=cfg.peer,
                    epoch=self.state.epoch,
                    removed=len(self._given_up),
                    detail=f"this gateway is the standby of {cfg.peer} (it took over from "
                    f"this gateway before the restart{'; the state file was damaged' if self.state.damaged else ''}): "  # noqa: E501
                    f"it sends on none of {cfg.peer}'s tunnels and asks {cfg.peer} to "
                    "replicate to it",
                )
        self.fencing: PairFencing | None = None
        if cfg.fencing:
            self.fencing = PairFencing(node, cfg, path, self.replicator, self.standby)
            self.fencing.on_superseded.append(self._become_standby)
            transfer.hold_hooks.append(self.fencing.hold)
            if self.replicator is not None and self.state.role == "active":
                event(
                    log,
                    "failover-state",
                    logging.WARNING,
                    node=node.name,
                    epoch=self.state.epoch,
                    detail="this gateway took over before it restarted: it is the active of "
                    "its epoch again, fenced until a standby acknowledges it (superseded if "
                    f"{cfg.peer} took over meanwhile)",
                )
        if cfg.fencing:
            # A transfer away waits for the standby to hold its tunnels marked leaving
            # before its COMMIT (docs/cluster.md, "a tunnel transferred away").
            transfer.core.standby_gate = self._standby_gate
        self._next_prepare = 0.0
        # Tunnels that keep the ceilings of a standby this gateway was told to run without
        # (go_alone), until that standby is ours again; and how often one came back acking
        # an earlier epoch (stopped unseen: _stale_standby).
        self._ceilinged: list[Tunnel] = []
        self.stale_standby = 0
        # The epoch this gateway went alone into (go_alone; from the state file after a
        # restart): its replicators of that epoch yield to a take-over in it (Replicator.alone)
        self._alone_epoch: int | None = self.state.epoch if self.state.alone else None
        # Running alone in that epoch: when to JOIN the peer next, at what interval now
        # (TIE_JOIN_MAX), and how many such JOINs went.
        self._tie_next = 0.0
        self._tie_every = cfg.heartbeat_ms / 1000
        self.tie_joins = 0
        # The operator's stronger word (``failover alone --standby-destroyed``): the standby
        # can never run again with the state it had, so the kept ceilings go. What was
        # asserted, when, in which epoch, how many it lifted (status ``standby_destroyed``),
        # and how often that peer came back holding replicas of an earlier epoch all the
        # same (the assertion was false: an ERROR each time, and a whole state again).
        self.destroyed: dict[str, Any] | None = None
        self.destroyed_returned = 0
        # Of those, the CHILD SAs (IKEv2) rekeyed as they near their ceilings (half the
        # margin left): a new SA has new keys and no ceiling, so they keep running alone.
        self._rekey_asked: set[Tunnel] = set()
        self.ceiling_rekeys = 0
        # A take-over refused because it would begin LAST_EPOCH (last_epoch_next): the
        # active's last_heard of the silence refused (one ERROR line and no busy timer per
        # silence), and how many silences were.
        self._refused_silence: float | None = None
        self.takeovers_refused = 0
        self._next_ceiling_check = 0.0
        # (since, until): the standby woke up past its dead time and asks the peer first;
        # the epoch it was in then (the peer that ran alone answers in a later one)
        self._resume_hold: tuple[float, float] | None = None
        self._hold_epoch = 0
        self.resumed = 0  # such wake-ups
        # The machine's time suspended (CLOCK_BOOTTIME - CLOCK_MONOTONIC, injectable), as of
        # the last sync the standby applied: a suspend since is silence the node's clock
        # does not see.
        self.suspended: Callable[[], float] = suspended_s
        self._suspended_heard = self.suspended()
        # When to look again at a dead time this standby found passed only late (it was not
        # running on time, see _on_timer), since when it does so, and how often it did.
        self._look_again: float | None = None
        self._looking_since: float | None = None
        self.looked_again = 0
        node.extensions["failover"] = self.status

    def _new_standby(self, epoch: int) -> Standby:
        sb = Standby(self.node.engine, self.cfg, self.node.cfg.outer, self.identity)
        sb.epoch = epoch
        sb.accept = take_over_accept(self.transfer.core.settings)  # [transfer] accept_*_ts
        sb.journal = self.journal
        if self.ike is not None:  # IKE SA replicas are checked as they arrive
            sb.check_extra = self.ike.check_replica
            sb.extra_tunnels = self.ike.replica_tunnels
        return sb

    def attach_ike(self, ike: IkeService) -> None:
        """IKE SAs too: the active replicates their contexts beside the tunnels; the standby
        takes them over with the tunnels; a stopping active leaves them to its standby."""
        self.ike = ike
        if self.replicator is not None:
            self.replicator.extra = ike
            self._watch_refusals(self.replicator)
        if self.standby is not None:
            self.standby.check_extra = ike.check_replica
            self.standby.extra_tunnels = ike.replica_tunnels
        if self.fencing is not None:
            ike.fenced = self.fenced
            self.fencing.on_superseded.insert(0, lambda _epoch: ike.forget_all())
        ike.replicated = self.replicating
        ike.replica_held = self._replica_held

    def _replica_held(self, key: bytes) -> bool:
        """Does our standby (the one there is now) hold the IKE SA replica ``key``?"""
        return self.standby is not None and key in self.standby.extra

    def _watch_refusals(self, r: Replicator) -> None:
        """The standby's refusals of our IKE SAs' replicas reach the IKE service."""
        if self.ike is not None:
            r.on_extra_refused = functools.partial(self.ike.replica_refused, self.cfg.peer)
            r.on_extra_resync = functools.partial(self.ike.replicas_resync, self.cfg.peer)

    def _watch_transfers(self, r: Replicator) -> None:
        """``r`` replicates the marks of the tunnels being transferred away, and tells the
        transfer core when the standby acknowledged what a transfer waits for."""
        r.leaving_of = self.transfer.core.leaving.get
        r.marks = self.transfer.core.leaving  # (an idle poll visits only what may change)
        r.on_told = self.transfer.on_settled
        r.on_tunnel_refused = functools.partial(tell_tunnel_refused, self.node.name,
                                                self.cfg.peer)  # fmt: skip

    def _standby_gate(self, tunnels: list[Tunnel], tid: int | None) -> Write:
        """TransferCore.standby_gate: a Write done once the standby holds ``tunnels``
        marked leaving by ``tid`` (None: unmarked), or not at all. Done at once when no
        standby holds replicas of this gateway (a standby itself, or running alone)."""
        r = self.replicator
        if r is None or not self.cfg.fencing:
            return Write.durable()
        w = r.told(tunnels, tid)
        if not w.settled:
            self.node.timers.poke()  # the next poll (due now) sends the change
        return w

    def fenced(self, now: float) -> bool:
        """May this (active) gateway not send now: its lease is not valid, or the standby
        took over?"""
        r = self.replicator
        return r is not None and (r.superseded_by is not None
                                  or now >= self.node.engine.send_until)  # fmt: skip

    def replicating(self) -> bool:
        """Does a standby hold (and will take over) this gateway's state?"""
        r = self.replicator
        if r is None or r.superseded_by is not None:
            return False
        return r.acks > 0 if self.cfg.fencing else r.messages > 0

    @property
    def peer(self) -> str:
        return self.cfg.peer

    async def start(self) -> None:
        if self.standby is not None:
            self.standby.journal = self.journal
        self._record_given_up()
        self.node.timers.add("failover", self._next_deadline, self._on_timer)

    def _record_given_up(self) -> None:
        """Record the tunnels the peer took over as away (not waited for by anything: this
        gateway removed them already and, as a standby, never installs them again)."""
        given, self._given_up = self._given_up, []
        if not given or self.journal is None:
            return
        try:
            self.journal.given_up(given, self.cfg.peer)
        except IpsecctError as exc:
            event(log, "failover-state-not-written", logging.ERROR, node=self.node.name,
                  error=str(exc))  # fmt: skip

    def stopping(self) -> None:
        """The gateway is being stopped: it asks nobody to replicate to it any more. A JOIN
        makes the taker fence itself until this gateway's first acknowledgement, which a
        gateway on its way out would never send."""
        self._stopping = True
        self.joining = False

    async def stop(self) -> None:
        self.stopping()
        self.node.timers.remove("failover")

    def _next_deadline(self) -> float | None:
        if self.replicator is not None:
            return self.replicator.next_deadline()
        sb = self.standby
        if sb is None:
            return None
        if sb.took_over is not None:  # alone: CHILD SAs near their kept ceilings, if any
            d = self._next_ceiling_check if self._ceilinged and self.ike is not None else None
            if self._alone_in_own_epoch(sb):  # (and the JOINs that end a tie)
                d = self._tie_next if d is None else min(d, self._tie_next)
            return d
        d = sb.next_deadline()
        if d is not None and last_epoch_next(sb.epoch) and self._refused_silence == sb.last_heard:
            d = None  # (this silence's take-over was refused: nothing to do at its end)
        if d is not None and self._resume_hold is not None:
            d = max(d, self._resume_hold[1])  # (the dead time has passed: not a busy loop)
        if d is not None and self._look_again is not None:
            d = max(d, self._look_again)
        if sb.unprepared:  # decode what changed ahead of a take-over, a few every tick_ms
            d = self._next_prepare if d is None else min(d, self._next_prepare)
        if self.joining:
            d = self._next_join if d is None else min(d, self._next_join)
        return d

    def _on_timer(self, now: float) -> None:
        if self.replicator is not None:
            if not self.channels.connected(self.cfg.peer):
                self.replicator.idle(now)  # (the lease runs out meanwhile, as it would)
                if now >= self._reconnect_at:
                    every = self._reconnect_every or self.cfg.heartbeat_ms / 1000
                    self.channels.reconnect(self.cfg.peer)
                    self.reconnects += 1
                    self._reconnect_at = now + every
                    self._reconnect_every = min(RECONNECT_MAX, 2 * every)
            else:
                self._reconnect_at, self._reconnect_every = 0.0, None
                # No more at a time than the channel has room for: a whole state larger
                # than its send bound goes in pieces (Replicator.poll), never over it.
                room = self.channels.room(self.cfg.peer)
                for m in self.replicator.handle_timer(now, room):
                    self.channels.send(self.cfg.peer, m)
            if self.fencing is not None:
                self.fencing.tick(now)  # the lease, by the passing of time
            return
        sb = self.standby
        if sb is None:
            return
        if sb.took_over is not None:
            if self._ceilinged and self.ike is not None and now >= self._next_ceiling_check:
                self._rekey_near_ceiling(now)
            if self._alone_in_own_epoch(sb) and now >= self._tie_next:
                self._tie_join(sb, now)
            return
        self._check_paused(sb, now)
        hold = self._resume_hold
        if hold is not None and (
            sb.epoch > self._hold_epoch or (now >= hold[1] and not sb.dead(now))
        ):
            # The peer answered in a later epoch (it ran alone and replicates to us now), or
            # it was heard within dead_ms at the end of the grace (at least dead_ms after the
            # pause: not only what waited in the channel): its standby, as before. What is
            # read early in the grace does not end it: the active sent that while this
            # standby was stopped, before it may have been told to run alone.
            self._resume_hold = hold = None
            self.joining = False
        since = self._looking_since
        if since is not None and sb.last_heard is not None and sb.last_heard > since:
            # heard from the active since it began to look again: that silence is over, and
            # a later one gets a look-again (and its dead_ms of them) of its own
            self._look_again = self._looking_since = None
        if sb.dead(now):
            deadline = sb.next_deadline()
            dead_s = self.cfg.dead_ms / 1000
            # Before the time to look again nothing is decided: the timer also fires for the
            # replicas to decode and the JOINs (tick_ms), and such a call, moments after the
            # late one, found the look due "on time" and took over without a read between.
            looking = self._look_again is not None and now < self._look_again
            if (hold is None or now >= hold[1]) and not looking:
                # Take over only on a silence seen while this process ran on time. A timer
                # that fires late (a loaded machine did not run this process) finds the
                # active's messages of meanwhile unread in the channel: the event loop runs
                # a due timer before the reader task that takes what the socket had, and
                # before the socket is even polled after a stop. The standby took over from
                # a live active on a silence of its own. It looks again one heartbeat later,
                # the loop reading meanwhile (a message read moves the dead time), and again
                # while late, for at most dead_ms (a standby never run on time still takes
                # over: with the resume check and its grace, docs/cluster.md gives the bound).
                due = self._look_again or (hold[1] if hold is not None else deadline or now)
                slack = self.cfg.heartbeat_ms / 1000
                since = self._looking_since
                if now - due > slack and (since is None or now - since < dead_s):
                    self._look_again = now + slack
                    self._looking_since = now if since is None else since
                    self.looked_again += 1
                    if since is None:
                        event(
                            log,
                            "failover-look-again",
                            node=self.node.name,
                            peer=self.cfg.peer,
                            late_ms=f"{(now - due) * 1000:.0f}",
                            detail=f"the dead time passed while this standby was not running "
                            f"on time: it reads its channel and looks again before it takes "
                            f"over (for at most {self.cfg.dead_ms:.0f} ms)",
                        )
                    return
                self._look_again = self._looking_since = None
                self._resume_hold = None
                self.take_over(now)
                return
        else:
            self._look_again = self._looking_since = None
        if self.joining and sb.took_over is None:
            if sb.last_heard is not None and self._resume_hold is None:
                self.joining = False  # the active replicates to us
            elif now >= self._next_join:
                self._join(sb, now)
        if sb.took_over is None and sb.unprepared and now >= self._next_prepare:
            sb.prepare(PREPARE_PER_TICK)  # about 2 ms of decoding
            self._next_prepare = now + self.cfg.tick_ms / 1000

    def _rekey_near_ceiling(self, now: float) -> None:
        """Running alone with the ceilings of a standby that may only be stopped unseen
        (go_alone): the CHILD SAs among those tunnels are rekeyed once half their margin is
        used, before they stall. The old SA keeps its ceiling until it is deleted (nothing
        is sent on it past where a take-over from its replica resumes); the new one has keys
        no replica holds. Tunnels keyed by hand stall at theirs, as before. Every sync_ms."""
        self._next_ceiling_check = now + self.cfg.sync_ms / 1000
        ike = self.ike
        if ike is None:
            return
        engine, half = self.node.engine, self.cfg.seq_margin // 2
        kept = [t for t in self._ceilinged if engine.has_tunnel(t)]
        self._ceilinged = kept  # (a rekeyed CHILD SA's old tunnel goes once deleted)
        self._rekey_asked &= set(kept)
        asked = 0
        for t in kept:
            if t in self._rekey_asked or t.seq_ceiling - t.outbound.seq > half:
                continue
            self._rekey_asked.add(t)  # (asked once: the IKE engine retries until it is done)
            if ike.rekey_before_ceiling(t, now):
                asked += 1
        if asked:
            self.ceiling_rekeys += asked
            event(
                log,
                "failover-ceiling-rekey",
                node=self.node.name,
                peer=self.cfg.peer,
                child_sas=asked,
                detail=f"CHILD SAs {self.cfg.peer} holds replicas of near the ceilings kept "
                "for them while this gateway runs alone: rekeyed (new keys, no ceiling)",
            )

    def _join(self, sb: Standby, now: float) -> None:
        """Ask the peer to replicate to this standby (JOIN), and again a heartbeat later."""
        # only over an open channel (the channel pool keeps trying to open one): a peer that
        # is down is not worth a warning every heartbeat
        if self.channels.connected(self.cfg.peer):
            # (with what it holds: an active that is replicating to it sends nothing again)
            held = (sb.seen_session or 0, sb.seen_seq) if sb.seen_session is not None else (0, 0)
            self.channels.send(self.cfg.peer, join_message(sb.epoch, *held))
            self.joins += 1
        self._next_join = now + self.cfg.heartbeat_ms / 1000

    def _alone_in_own_epoch(self, sb: Standby) -> bool:
        """Does this gateway run alone in the epoch it went alone into (``failover alone``),
        not in one it took over into? Then the peer may have taken over into it too."""
        return (
            sb.took_over is not None
            and sb.epoch == self._alone_epoch
            and self.fencing is not None
            and not self._stopping
        )

    def _tie_join(self, sb: Standby, now: float, *, reset: bool = False) -> None:
        """Running alone in the epoch it went alone into, this gateway JOINs its peer (as
        its standby in that epoch, holding nothing of it) over an open channel: at once when
        one opens (``reset``), then every heartbeat_ms doubling to TIE_JOIN_MAX while one is
        open. A peer that took over into the same epoch (docs/cluster.md, "two take-overs
        in one epoch") runs alone as well and sends nothing, and the JOINs of its grace may
        be lost for good (its channel reset while it was cut off): without this the tie
        lasted until one of the two restarted. The JOIN makes that taker the active of the
        epoch, replicating to this gateway (fenced until acknowledged), and its first sync
        makes this gateway yield (:meth:`_alone_yields`) before it acknowledges anything. A
        peer that is a standby (the usual case: restarted, or back from a pause) ignores
        it; it JOINs on its own."""
        if reset:
            self._tie_every = self.cfg.heartbeat_ms / 1000
        if self.channels.connected(self.cfg.peer):
            self.channels.send(self.cfg.peer, join_message(sb.epoch))
            self.joins += 1
            self.tie_joins += 1
            self._tie_next = now + self._tie_every
            self._tie_every = min(TIE_JOIN_MAX, 2 * self._tie_every)
        else:  # (the channel's opening sends one at once: peer_open)
            self._tie_next = now + self._tie_every

    def _check_paused(self, sb: Standby, now: float) -> None:
        """Was this standby not running (stopped, or its machine suspended) until at least
        max(RESUMED_LATE, dead_ms) past its dead time? Then the peer may run alone now, told
        so by the operator, and a take-over would send beside it: ask it first (JOIN, at
        once), and take over only if nothing answers within the grace. Called by every
        timer call and before every sync applied, whichever comes first after the pause:
        the first one sees it. A suspend counts as not running (the node's clock stops
        during one, so its timers are not late)."""
        if self._resume_hold is not None:
            return
        deadline = sb.next_deadline()
        if deadline is None:
            return
        asleep = max(0.0, self.suspended() - self._suspended_heard)
        late = now + asleep - deadline
        dead_s = self.cfg.dead_ms / 1000
        if late < max(RESUMED_LATE, dead_s):
            return
        hold = self._resume_hold = (now, now + max(RESUME_GRACE, 2 * dead_s))
        self._hold_epoch = sb.epoch
        self.resumed += 1
        self.joining = True
        suspended = f", {asleep:.1f} s of it suspended" if asleep >= 0.05 else ""
        event(
            log,
            "failover-resumed",
            logging.WARNING,
            node=self.node.name,
            peer=self.cfg.peer,
            late_s=f"{late:.1f}",
            suspended_s=f"{asleep:.1f}",
            detail=f"this standby was not running {late:.1f} s past its dead time "
            f"(stopped or suspended{suspended}): it asks {self.cfg.peer} to replicate to it "
            f"and takes over only if nothing is heard within {hold[1] - now:.1f} s",
        )
        self._join(sb, now)  # before anything read after the pause is applied

    def receive(self, peer: str, msg: cxtp.CTD) -> None:
        """A sync message from ``peer``: the standby takes state from its active (and answers
        ACK, or TAKEN once it took over); the active takes the standby's answers (and answers
        an earlier epoch's active with TAKEN); a gateway that took over takes a JOIN (its
        peer is now its standby)."""
        if peer != self.cfg.peer:
            self.transfer.refuse()
            return
        now = self.node.clock()
        header = sync_header(msg)
        if header is None:
            event(log, "sync-malformed", logging.WARNING, node=self.node.name,
                  error="a SYNC CDB that does not parse")  # fmt: skip
            return
        kind, epoch = header
        try:
            if kind == SYNC_JOIN:
                self._on_join(msg, epoch, now)
                return
            r = self.replicator
            if (r is not None and r.alone and r.superseded_by is None and epoch == r.epoch
                    and kind in (SYNC_HEARTBEAT, SYNC_FULL) and self.fencing is not None
                    and not self._stopping):  # fmt: skip
                # The active of the epoch this gateway went alone into: the peer took over
                # into it, and each JOINed the other (this one's JOIN and its grace's
                # crossed): both fenced actives of one epoch, each refusing the other's
                # syncs. The take-over wins, as at its TAKEN (Replicator.alone).
                self._alone_yields(epoch)
                r = None
            if kind in (SYNC_REFUSED, SYNC_TUNNEL_REFUSED):  # an IKE SA, a tunnel of ours
                if r is not None:
                    r.receive(msg, now)
                return
            if kind in (SYNC_ACK, SYNC_TAKEN):
                if r is None and kind == SYNC_ACK and self._stale_standby(epoch, now):
                    return
                if r is None or self.fencing is None:
                    self.transfer.refuse()
                    return
                ahead = r.acks_ahead
                self.fencing.on_reply(msg, now)
                tell_ack_ahead(self.node.name, peer, r, ahead)
                return
            if r is not None:
                if r.superseded_by is None and epoch < r.epoch and self.fencing is not None:
                    # The peer still thinks itself the active of an earlier epoch (it
                    # restarted from before our take-over): it must give up, as to the taker.
                    self.channels.send(peer, taken_reply(msg, r.epoch))
                else:
                    self.transfer.refuse()
                return
            if self.standby is None:
                self.transfer.refuse()
                return
            sb = self.standby
            if (sb.took_over is not None and epoch == sb.epoch == self._alone_epoch
                    and kind in (SYNC_HEARTBEAT, SYNC_FULL) and self.fencing is not None
                    and not self._stopping):  # fmt: skip
                self._alone_yields(epoch)
            # Paused past the dead time? Seen before this message moves the dead time: it
            # waited in the channel while this standby was stopped, and proves the active
            # was alive then, not now (the timer may run after it: callback order decides
            # nothing).
            self._check_paused(self.standby, now)
            before = trouble(self.standby)
            for reply in self.standby.receive(msg, now):
                self.channels.send(peer, reply)
            if self.standby.last_heard == now:
                self._suspended_heard = self.suspended()
            if trouble(self.standby) != before:
                tell_trouble(self.node.name, peer, self.standby, before)
            self.node.timers.poke()  # the dead-time deadline has moved (or now exists)
        except CxtpError as exc:  # (a peer repeating one every heartbeat: rate-limited)
            _TROUBLE.event(log, "sync-malformed", logging.WARNING, key=peer,
                           node=self.node.name, peer=peer, error=str(exc))  # fmt: skip

    def _on_join(self, msg: cxtp.CTD, epoch: int, now: float) -> None:
        """The peer is (now) this gateway's standby, in ``epoch``."""
        r = self.replicator
        if r is not None:
            # A standby that holds nothing of ours (restarted, new) gets everything again,
            # once: its repeats (every heartbeat_ms through a paused standby's grace) are
            # answered by that one (Replicator.join), and one that holds our stream needs none
            if r.superseded_by is None and epoch <= r.epoch and r.join(*join_held(msg), now):
                self.node.timers.poke()
            return
        sb = self.standby
        if sb is None or sb.took_over is None or epoch > sb.epoch or self.fencing is None:
            return  # a standby itself, or the peer knows a later epoch: nothing to do
        held = join_held(msg)
        if held[0] != 0 and epoch < sb.epoch:
            self._destroyed_returned(f"a JOIN of epoch {epoch} holding replicas")
        self._become_active(now)

    def _stale_standby(self, epoch: int, now: float) -> bool:
        """An acknowledgement of an earlier epoch reached this gateway, which took over or
        was told to run alone: its peer is a standby that holds replicas of that epoch (it
        was stopped, unseen by its clocks, and now applies what waited in its channel). Left
        alone it would take this gateway's silence for a crash and take over from them:
        treated as its JOIN (it becomes our standby in our epoch; we are fenced until it
        acknowledges it). Returns whether it was."""
        sb = self.standby
        if sb is None or sb.took_over is None or epoch >= sb.epoch or self.fencing is None:
            return False
        if self._stopping:
            return True  # (going away: nobody to replicate from; the ACK means nothing)
        self.stale_standby += 1
        self._destroyed_returned(f"an acknowledgement of epoch {epoch}")
        event(
            log,
            "failover-stale-standby",
            logging.WARNING,
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=sb.epoch,
            acked_epoch=epoch,
            detail=f"{self.cfg.peer} acknowledged a message of epoch {epoch}: it holds "
            f"replicas from before epoch {sb.epoch} (stopped, and its clocks did not show "
            f"it); replicating to it in epoch {sb.epoch} so that it never takes over from "
            "them (packets held until it acknowledges)",
        )
        self._become_active(now)
        return True

    def _alone_yields(self, epoch: int) -> None:
        """This gateway went alone into ``epoch`` (go_alone) and runs alone; the peer syncs
        to it as the active of that same epoch: it took over into it from its replicas of
        the epoch before (a standby stopped unseen, its acknowledgements lost) and restarted
        since, or this gateway's JOIN (:meth:`_tie_join`) made it replicate. The take-over
        wins that tie (:attr:`Replicator.alone`: it resumed above the ceilings kept here
        for its replicas): this gateway gives its tunnels up and becomes the peer's
        standby, as its replicator would at the peer's TAKEN. Else the peer,
        answered TAKEN of its own epoch, would stay fenced beside this one for good. The
        same when this gateway had made a replicator of that epoch already (the peer's JOIN
        of its grace arrived, as this one's JOIN reached the peer: both fenced actives of
        one epoch): that replicator is superseded, and the peer's sync then applied to the
        new standby is what it acknowledges first."""
        assert self.fencing is not None
        self._ceilinged = []
        r = self.replicator
        if r is not None:  # (an alone replicator, fenced until acknowledged: it yields too)
            r.supersede(epoch)
        self.fencing.give_up(
            epoch, f" in epoch {epoch}, which this gateway had gone alone into (failover alone)"
        )

    def _destroyed_returned(self, what: str) -> None:
        """The peer the operator said was destroyed (``--standby-destroyed``) shows it holds
        replicas of an earlier epoch: it was not (a VM paused or restored from a snapshot).
        Its old-epoch state is never taken as ours: it becomes our standby only through a
        whole state of our epoch (a new Replicator's first message is FULL, and its session
        is new, so no JOIN is taken as holding our stream), and we are fenced until it
        acknowledges that. What the lifted ceilings let this gateway send meanwhile may be
        above where a take-over from its old replicas resumes: said as an ERROR."""
        if self.destroyed is None:
            return
        self.destroyed_returned += 1
        event(
            log,
            "failover-destroyed-standby-returned",
            logging.ERROR,
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=self.destroyed["epoch"],
            detail=f"{self.cfg.peer} was said to be destroyed (failover alone "
            f"--standby-destroyed), yet it sent {what}: it still runs with its old state. "
            f"Its replicas are refused: it gets this gateway's whole state before it may "
            f"take anything over. Had it taken over from them, it and this gateway may "
            f"have sent the same (SPI, sequence number) pairs: check {self.cfg.peer}'s log "
            "for a take-over and rekey those tunnels",
        )

    def _become_active(self, now: float) -> None:
        """This gateway took over and runs alone; its peer asks to be its standby: replicate
        to it, and from now on send only under the lease its acknowledgements grant."""
        sb = self.standby
        assert sb is not None and self.fencing is not None
        r = Replicator(self.node.engine, self.cfg)  # fences the engine until the first ACK
        r.epoch = sb.epoch
        r.alone = self._alone_epoch == sb.epoch
        r.extra = self.ike
        self._watch_refusals(r)
        self._watch_transfers(r)
        self.replicator, self.standby = r, None
        self.fencing.replicator, self.fencing.standby = r, None
        self._ceilinged = []  # (r keeps them until its standby's first acknowledgement)
        self.reformed += 1
        event(
            log,
            "failover-paired",
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=r.epoch,
            tunnels=sum(1 for _ in self.node.engine.tunnels()),
            detail=f"{self.cfg.peer} is now the standby of this gateway: replicating to it; "
            "this gateway sends under the lease it grants (packets held until its first "
            "acknowledgement)",
        )
        self.node.timers.poke()

    def go_alone(self, now: float, *, destroyed: bool = False) -> dict[str, Any]:
        """The operator says the standby is down (``ipsecct failover alone``): run alone, as a
        gateway that took over does, in a new epoch. Refused while the lease is valid (the
        standby acknowledged within the lease: it is alive). Safe only if the standby cannot
        take over: its process is stopped, or restarted since it last heard from us (a
        standby's replicas live in its memory only); ipsecct cannot tell that from a
        partition, which is why it needs the operator. Refused too until the lease ended
        :func:`alone_after` ago: a standby that is only stopped (SIGSTOP, suspended) must
        count itself paused when it runs again, and ask this gateway before it takes over
        (``_check_paused``); after a shorter stop it would take its silence for a crash.

        ``destroyed`` (``--standby-destroyed``): the operator says more, that the standby can
        never run again with the state it had (its machine destroyed, its state directory
        wiped): no replica of it can be taken over, so the ceilings its replicas set are
        lifted too (:meth:`lift_ceilings`). Also accepted once this gateway runs alone."""
        r, fencing = self.replicator, self.fencing
        sb0 = self.standby
        if (destroyed and r is None and fencing is not None and sb0 is not None
                and sb0.took_over is not None):  # fmt: skip
            return self.lift_ceilings(now, sb0.epoch)
        if r is None or r.superseded_by is not None or fencing is None:
            raise ControlError(
                "only the active gateway of a pair with fencing can be told to run alone "
                f"(this one is {self.status()['role']})"
            )
        if r.lease is not None and r.lease.valid(now):
            raise ControlError(
                f"the lease is valid: {self.cfg.peer} acknowledged within the last "
                f"{r.lease.timing.lease * 1000:.0f} ms, so it is alive; not running alone"
            )
        ago = r.lease.ended_ago(now) if r.lease is not None else None
        settle = alone_after(self.cfg.dead_ms)
        if ago is not None and ago < settle:
            raise ControlError(
                f"the lease ended only {ago * 1000:.0f} ms ago: a standby that is only "
                f"stopped (SIGSTOP, suspended) since then would not count itself paused, "
                f"and would take over beside this gateway when it runs again; try again in "
                f"{(settle - ago) * 1000:.0f} ms"
            )
        if last_epoch_next(r.epoch):
            raise ControlError(last_epoch_text(r.epoch, self.cfg.peer))
        epoch = r.epoch + 1
        try:
            save_state(fencing.path, epoch, True, alone=True)  # before anything is sent
        except OSError as exc:
            raise ControlError(f"the epoch file could not be written: {exc}") from exc
        if r.lease is not None:
            r.lease.revoke()
        # Nobody holds replicas of this gateway now: transfers waiting for the standby's
        # acknowledgement of their marks go on.
        r.release_waits()
        self._alone_epoch = epoch
        sb = self._new_standby(epoch)
        sb.took_over = now
        if sb.grant is not None:
            sb.grant.close()
        self.replicator, self.standby = None, sb
        fencing.replicator, fencing.standby = None, sb
        self.joining = False
        self.reformed += 1
        tunnels = list(self.node.engine.tunnels())
        # The standby may be stopped, not gone, and unseen: a VM its hypervisor paused sees
        # no gap on either clock when it runs again (the resume check cannot see it), takes
        # this gateway's silence (alone, it sends the standby nothing) for a crash, and takes
        # over from the replicas it holds, at their numbers + seq_margin. The tunnels it may
        # hold keep their ceilings (floor + seq_margin, at most where it would resume) until
        # it is the standby of the new epoch again (a JOIN, or an acknowledgement of the old
        # one: _stale_standby); the others are unbounded. At most seq_margin packets past
        # the floor each meanwhile, then they stall: THE invariant over liveness.
        kept = [t for t in tunnels if t in r.floor]
        for t in tunnels:
            if t not in r.floor:
                t.seq_ceiling = UNFENCED
        self._ceilinged = kept
        self._rekey_asked = set()
        self._next_ceiling_check = now
        self._tie_every = self.cfg.heartbeat_ms / 1000  # (JOINs the peer: _tie_join)
        self._tie_next = now + self._tie_every
        if not destroyed:
            self.destroyed = None  # (said of an earlier standby: this one only is down)
        self.node.engine.send_until = math.inf
        held = len(fencing.held)
        fencing.release()
        self.node.timers.poke()  # (the CHILD SAs near their kept ceilings: a check now)
        event(
            log,
            "failover-alone",
            logging.WARNING,
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=epoch,
            tunnels=len(tunnels),
            released=held,
            ceilinged=0 if destroyed else len(kept),
            detail=f"the operator said {self.cfg.peer} is down: this gateway runs alone and "
            f"sends again; when {self.cfg.peer} comes back it becomes the standby"
            + (f". {len(kept)} tunnel(s) {self.cfg.peer} holds replicas of keep their "
               f"ceilings (at most {self.cfg.seq_margin} packets past what it holds, then "
               f"they stall) until it is the standby again: a standby stopped unseen (a "
               f"paused VM whose clocks show no gap) would take them over from there; "
               f"restart {self.cfg.peer} to lift them (destroyed for good: ipsecct failover "
               f"alone --standby-is-down --standby-destroyed)" if kept and not destroyed
               else ""),
        )
        if destroyed:
            return self.lift_ceilings(now, epoch)
        return self.status()

    def lift_ceilings(self, now: float, epoch: int) -> dict[str, Any]:
        """The operator says the standby was destroyed (``failover alone --standby-is-down
        --standby-destroyed``): it can never run again with the replicas it held, so nothing
        can take over from them, and the ceilings go_alone kept for it (floor + seq_margin:
        where a take-over from them would resume) are lifted. A replacement standby (empty
        state) or this one restarted holds nothing and gets our whole state when it JOINs
        (and sets the ceilings again from its acknowledgements); one that comes back with
        its old replicas after all is refused them (_destroyed_returned). Said loudly: one
        WARNING event, and ``standby_destroyed`` in status."""
        kept = [t for t in self._ceilinged if self.node.engine.has_tunnel(t)]
        stalled = sum(1 for t in kept if t.outbound.seq >= t.seq_ceiling)
        for t in kept:
            t.seq_ceiling = UNFENCED
        self._ceilinged = []
        self.destroyed = {
            "by": "the operator: ipsecct failover alone --standby-is-down --standby-destroyed",
            "asserted": f"{self.cfg.peer} can never run again with the state it had (its "
            "machine destroyed or its state directory wiped)",
            "epoch": epoch,
            "lifted": len(kept) + (self.destroyed["lifted"] if self.destroyed else 0),
            "at": now,
        }
        self.node.timers.poke()
        event(
            log,
            "failover-standby-destroyed",
            logging.WARNING,
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=epoch,
            lifted=len(kept),
            stalled=stalled,
            detail=f"the operator says {self.cfg.peer} is destroyed: it can never run again "
            f"with the state it had. The ceilings its replicas set are lifted on "
            f"{len(kept)} tunnel(s) ({stalled} stalled at theirs): they send without bound "
            f"now. If {self.cfg.peer} comes back with its old replicas after all (a paused "
            f"VM, a snapshot), it and this gateway may send the same (SPI, sequence number) "
            f"pairs; a replacement {self.cfg.peer} with an empty state directory pairs again "
            "by itself",
        )
        return self.status()

    def _become_standby(self, epoch: int) -> None:
        """The standby took over from this (active) gateway, which gave its tunnels up
        (PairFencing): become the taker's standby, in its epoch, and ask it to replicate."""
        self.replicator = None
        sb = self._new_standby(epoch)
        self.standby = sb
        if self.fencing is not None:
            self._given_up = self.fencing.given_up
            self.fencing.given_up = []
            self.fencing.replicator, self.fencing.standby = None, sb
        self._record_given_up()
        self.joining = not self._stopping
        self._next_join = 0.0
        self.reformed += 1
        event(
            log,
            "failover-standby",
            logging.WARNING,
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=epoch,
            detail=f"this gateway is now the standby of {self.cfg.peer}: it sends on none of "
            f"its tunnels, asks {self.cfg.peer} to replicate to it, and takes over if "
            f"{self.cfg.peer} falls silent",
        )
        self.node.timers.poke()

    def peer_open(self, peer: str) -> None:
        """A channel with the peer (re)opened. A standby JOINs at once, whatever it heard:
        it may have been stopped unseen by its clocks (a paused VM) while the peer ran alone
        in a later epoch, and that peer sends it nothing unless asked; the JOIN makes it
        replicate to this standby (which then holds its present state) before this
        standby's dead time can take its silence for a crash. An active that still
        replicates to it sends nothing again for it (the JOIN says what it holds)."""
        sb = self.standby
        if peer != self.cfg.peer or sb is None or self._stopping:
            return
        if sb.took_over is None:
            self._join(sb, self.node.clock())
        elif self._alone_in_own_epoch(sb):
            # The peer may have taken over into the epoch this gateway went alone into,
            # its JOINs lost with the channel that just went: ask it (_tie_join).
            self._tie_join(sb, self.node.clock(), reset=True)
            self.node.timers.poke()

    def peer_lost(self, peer: str) -> None:
        if self.replicator is not None and peer == self.cfg.peer:
            self.replicator.resync()  # the standby may have missed syncs: send it everything

    def take_over(self, now: float) -> Record | None:
        """Take over now (the timer does it when the active falls silent). None: refused,
        it would begin LAST_EPOCH (one ERROR line per silence, status says so): nothing is
        written, installed or sent, the tunnels stop with the active."""
        assert self.standby is not None
        if last_epoch_next(self.standby.epoch):
            if self._refused_silence != self.standby.last_heard:
                self._refused_silence = self.standby.last_heard
                self.takeovers_refused += 1
                event(log, "failover-epoch-exhausted", logging.ERROR, node=self.node.name,
                      peer=self.cfg.peer, epoch=self.standby.epoch,
                      detail=f"{self.cfg.peer} was silent for dead_ms: take-over refused. "
                      + last_epoch_text(self.standby.epoch, self.cfg.peer))  # fmt: skip
            return None
        if self.fencing is not None:
            self.fencing.before_take_over()  # on disk before anything is sent
        # Alone from now on: nobody else holds a replica (an engine that was an active's
        # before it became the standby is still fenced by that old lease).
        self.node.engine.send_until = math.inf
        self.joining = False
        heard = self.standby.last_heard
        with gcpolicy.POLICY.batch():  # a bulk install: no walk of the heap in the middle
            rec = self._took_over(self.standby.take_over(now), now)
        # One line an operator watching WARNING sees (the record's transfer-took-over is
        # INFO, role=standby, and names no epoch).
        event(
            log,
            "failover-took-over",
            logging.WARNING,
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=self.standby.epoch,
            tunnels=rec.accepted,
            silent_ms="" if heard is None else f"{(now - heard) * 1000:.0f}",
            detail=f"{self.cfg.peer} was silent for dead_ms ({self.cfg.dead_ms:.0f} ms): this "
            f"gateway took its tunnels over and runs alone; {self.cfg.peer} becomes its "
            f"standby when it comes back"
            + (f" ({rec.detail})" if rec.detail else ""),
        )
        return rec

    def _took_over(
        self,
        taken: tuple[list[Tunnel], list[tuple[SecurityAssociation, bytes]], Record],
        now: float,
    ) -> Record:
        _tunnels, signals, rec = taken
        for sa, payload in signals:
            res = self.node.engine.signal(sa, payload, now)
            if not isinstance(res, Drop):
                self.node.send_esp(res.sa, res.data)
        sb = self.standby
        if sb is not None and sb.leaving_taken:
            self._ask_about_leaving(sb, now)
        if sb is not None and sb.not_taken and self.ike is not None:
            self.ike.units_not_taken(sb.not_taken, self.cfg.peer)
        if sb is not None and sb.extra:
            extra, sb.extra = sb.extra, {}
            if self.ike is not None:
                n = self.ike.take_over(list(extra.values()), now, self.cfg.seq_margin)
                rec.detail += f"{'; ' if rec.detail else ''}{n} IKE SA(s)"
        # From now on this gateway is the active one; it replicates to nobody until an
        # operator configures a new standby. The Standby stays, to answer the old active
        # with TAKEN.
        self.transfer.report(rec)
        return rec

    def _ask_about_leaving(self, sb: Standby, now: float) -> None:
        """Tunnels the active was transferring away when it died, taken over held: their
        target is asked whether it took them (the decision query, as a restarted source
        asks); nobody to ask (not among [[peers]]): held, and the operator told."""
        taken, sb.leaving_taken = sb.leaving_taken, []
        core = self.transfer.core
        for mark, tunnels in taken:
            event(
                log, "failover-leaving-held", logging.WARNING, node=self.node.name,
                peer=self.cfg.peer, target=mark.peer, id=f"{mark.tid:016x}",
                tunnels=len(tunnels),
                detail=f"{self.cfg.peer} was transferring these to {mark.peer}: held, never "
                f"sent on here until {mark.peer} answers that it did not take them",
            )  # fmt: skip
            if mark.peer in self.transfer.tcfg.peers:
                age = {mark.tid: max(0.0, now - sb.mark_seen.get(mark.tid, now))}
                self.transfer.run(
                    core.recall_unresolved(
                        [(mark.tid, mark.peer, tunnels)], now, age, sb.leaving_signals
                    )
                )
            elif self.journal is not None:
                self.journal.not_asked(
                    mark.tid, mark.peer, f"peer {mark.peer!r} is not among [[peers]]"
                )

    def status(self) -> dict[str, Any]:
        now = self.node.clock()
        lease = {} if self.fencing is None else {"lease": self.fencing.status(now)}
        state, silent = self.channels.channel_state(self.cfg.peer, now)
        common = {
            "peer": self.cfg.peer,
            "reformed": self.reformed,
            # connected (answering within dead_ms, with fencing), unanswered (open, nothing
            # came back for channel_silent_ms) or not connected
            "channel": state,
            "channel_silent_ms": None if silent is None else round(silent * 1000),
        }
        epoch_now = (self.replicator.epoch if self.replicator is not None
                     else self.standby.epoch if self.standby is not None else None)  # fmt: skip
        # no take-over (nor `failover alone`) can follow this epoch: last_epoch_next
        last = epoch_now is not None and last_epoch_next(epoch_now)
        common["takeover_refused"] = last
        if last and self.takeovers_refused:
            common["takeovers_refused"] = self.takeovers_refused
        last_detail = last_epoch_text(epoch_now, self.cfg.peer) if last and epoch_now else ""
        if self.replicator is not None:
            superseded = self.replicator.superseded_by is not None
            r_lease = self.replicator.lease
            # The lease the standby's acknowledgements grant ran out (it fell silent, or
            # the channel to it is gone): acknowledged once is not acknowledged now.
            lost = r_lease is not None and r_lease.ever_granted and not r_lease.valid(now)
            active: dict[str, Any] = {}
            if lost and not superseded:
                ago = r_lease.ended_ago(now) if r_lease is not None else None
                since = "" if ago is None else f" {ago * 1000:.0f} ms ago"
                active["detail"] = (
                    f"lease lost{since}: {self.cfg.peer} has not acknowledged within the"
                    " lease; this gateway sends nothing on its tunnels (packets held, past"
                    " a bound dropped) until"
                    f" {self.cfg.peer} acknowledges again, or `ipsecct failover alone"
                    " --standby-is-down` once its process is stopped"
                )
            if last_detail and not superseded:
                active["detail"] = "; ".join(x for x in (active.get("detail"), last_detail) if x)
            return {
                "role": "superseded" if superseded else "active",
                **common,
                "epoch": self.replicator.epoch,
                "standby": self.cfg.peer,
                # acknowledging now (within the lease), not "once"
                "standby_acknowledged": self.replicator.acks > 0 and not lost,
                # whether this gateway may send on its tunnels now (the fence)
                "sending": not self.fenced(now),
                **active,
                "messages": self.replicator.messages,
                "contexts": self.replicator.contexts,
                "ike_contexts": self.replicator.extras,
                # IKE SAs the standby could not take over (ike.replicas_refused: which, why)
                "ike_refused": len(self.ike.refused_replicas()) if self.ike is not None else 0,
                # tunnels the standby would not take over (its max_replicas, its accept_*_ts):
                # how many, and the first TUNNELS_REFUSED_LISTED (outbound SPI, why)
                "tunnels_refused": len(self.replicator.tunnels_refused),
                "tunnels_refused_list": [
                    {"spi": f"0x{spi:08x}", "reason": why}
                    for spi, why in itertools.islice(
                        self.replicator.tunnels_refused.items(), TUNNELS_REFUSED_LISTED)
                ],
                "unreplicable": self.replicator.unreplicable,
                # ACKs of message numbers never sent (ignored: failover-ack-ahead)
                "acks_ahead": self.replicator.acks_ahead,
                # whole states sent again (the channel lost), and tunnels left for the next
                # poll at the last one (no room in the channel: a large state goes in pieces)
                "resyncs": self.replicator.resyncs,
                # requests to open the channel to the standby while it had none (backing
                # off to RECONNECT_MAX)
                "reconnects": self.reconnects,
                # JOINs from the standby in this epoch, those that made a resync (a standby
                # that holds nothing of ours), and repeats answered by one (Replicator.join)
                "joins_received": self.replicator.joins,
                "join_resyncs": self.replicator.join_resyncs,
                "joins_coalesced": self.replicator.joins_coalesced,
                "deferred": self.replicator.deferred,
                # polls that walked every tunnel because a touched list was full (some SA
                # counted unlisted: docs/cluster.md, "the idle poll")
                "touched_overflows": self.replicator.overflows,
                **self._destroyed_status(now),
                **lease,
            }
        if self.standby is not None and self.standby.took_over is None:
            heard = self.standby.last_heard
            return {
                "role": "standby",
                **common,
                **({"detail": last_detail} if last_detail else {}),
                "epoch": self.standby.epoch,
                "standby_of": self.cfg.peer,
                "joining": self.joining,
                "joins_sent": self.joins,
                # woke up past its dead time and asked the peer before taking over
                "resumed": self.resumed,
                # found its dead time passed only late (not run on time): looked again a
                # heartbeat later, having read its channel, before taking over
                "looked_again": self.looked_again,
                "replicated_tunnels": len(self.standby.replica),
                # of them, marked leaving: the active is transferring them away (a take-over
                # holds them and asks their target, docs/cluster.md)
                "replicated_leaving": sum(1 for s in self.standby.marks
                                          if s in self.standby.replica),
                "replicated_ike_sas": len(self.standby.extra),
                # IKE SA replicas this gateway could not take over (not kept; the active
                # was told)
                "refused_ike_sas": len(self.standby.refused),
                # replicas with a lower sequence number than an earlier one (a buggy active;
                # a take-over resumes past the highest)
                "seq_backwards": self.standby.seq_backwards,
                # new tunnels' replicas not kept: it holds max_replicas already (a flood)
                "replicas_refused": self.standby.replicas_refused,
                "last_heard_ms_ago": None if heard is None else round((now - heard) * 1000),
                **lease,
            }
        kept = [t for t in self._ceilinged
                if self.node.engine.has_tunnel(t) and t.seq_ceiling < UNFENCED]  # fmt: skip
        ceilinged = len(kept)
        at_ceiling = sum(1 for t in kept if t.outbound.seq >= t.seq_ceiling)
        return {
            "role": "took over",
            **common,
            "epoch": self.standby.epoch if self.standby is not None else None,
            "alone": True,
            # as a standby: how often it woke up paused, and looked again, before it took over
            # (a take-over of a live active under load shows here)
            "resumed": self.resumed,
            "looked_again": self.looked_again,
            # replicas not taken over: outside [transfer] accept_local_ts / accept_remote_ts
            "outside_accept": self.standby.policy_refused if self.standby is not None else 0,
            # ... nor overlapping a tunnel of this gateway's own (it would take its traffic)
            "overlapping_own": self.standby.overlap_refused if self.standby is not None else 0,
            "detail": f"runs alone: no standby holds its tunnels until {self.cfg.peer} comes "
            "back (it then becomes the standby by itself)"
            + (f"; {ceilinged} tunnel(s) keep the ceilings {self.cfg.peer}'s replicas set "
               f"({at_ceiling} at theirs: they stall there) until it is the standby again"
               " (restart it): it may only be stopped unseen; if it is destroyed, `ipsecct"
               " failover alone --standby-is-down --standby-destroyed` lifts them"
               if ceilinged else "")
            + (f"; the ceilings {self.cfg.peer}'s replicas set were lifted on the operator's"
               f" word that {self.cfg.peer} was destroyed" if self.destroyed else ""),
            # tunnels bounded by the replicas of the standby told down (go_alone), and of
            # them those that reached their ceiling; acknowledgements of an earlier epoch
            # taken as a JOIN (a standby stopped unseen came back)
            "ceilinged_tunnels": ceilinged,
            "at_ceiling": at_ceiling,
            # of them, CHILD SAs (IKEv2) rekeyed before they stall
            "ceiling_rekeys": self.ceiling_rekeys,
            "stale_standby": self.stale_standby,
            # JOINs sent to the peer while running alone in the epoch this gateway went
            # alone into (the peer may have taken over into it: _tie_join)
            "tie_joins": self.tie_joins,
            **self._destroyed_status(now),
            **lease,
        }

    def _destroyed_status(self, now: float) -> dict[str, Any]:
        """What the operator asserted with ``--standby-destroyed`` (none: {})."""
        d = self.destroyed
        if d is None:
            return {}
        return {
            "standby_destroyed": {
                "by": d["by"],
                "asserted": d["asserted"],
                "epoch": d["epoch"],
                "ceilings_lifted": d["lifted"],
                "ms_ago": round((now - d["at"]) * 1000),
                # the peer came back with replicas of an earlier epoch all the same
                "returned_with_old_state": self.destroyed_returned,
            }
        }


_TROUBLE = RateLimited(burst=2, interval=10.0)


def trouble(sb: Standby) -> tuple[int, int]:
    """What a standby counts of a peer's bad replicas (compared around ``receive``)."""
    return sb.seq_backwards, sb.replicas_refused


def tell_tunnel_refused(node: str, peer: str, spi: int, why: str) -> None:
    """``peer`` (our standby, or a member holding replicas of ours) would not take over our
    tunnel ``spi`` (``why``; "": it would now): a fail-over would lose it. Told
    (rate-limited per peer), listed in status (``tunnels_refused``); this gateway forwards
    on it as before."""
    if why:
        _TROUBLE.event(log, "failover-replica-refused", logging.WARNING,
                       key=f"{peer}/tunnel", node=node, standby=peer, spi=f"0x{spi:08x}",
                       error=why, detail="it would not take this tunnel over: a fail-over"
                       " loses it (it is still served here)")  # fmt: skip


def tell_ack_ahead(node: str, peer: str, r: Replicator, before: int) -> None:
    """``peer`` acknowledged a message number ``r`` never sent (ignored by
    :meth:`Replicator.receive`): told once per replicator, counted in status (``acks_ahead``)."""
    if before == 0 and r.acks_ahead:
        event(log, "failover-ack-ahead", logging.WARNING, node=node, peer=peer,
              sent=r.seq, detail="an acknowledgement of a message never sent: ignored (no "
              "lease, no ceiling, no transfer's wait taken from it; counted in acks_ahead, "
              "told once)")  # fmt: skip


def tell_trouble(node: str, peer: str, sb: Standby, before: tuple[int, int]) -> None:
    """A peer replicated tunnels at lower sequence numbers than before (a bug there, or
    hostile: this standby resumes past the highest anyway), or more tunnels than a standby
    keeps: the operator is told (rate-limited per peer)."""
    back, refused = sb.seq_backwards - before[0], sb.replicas_refused - before[1]
    if back:
        _TROUBLE.event(log, "sync-seq-backwards", logging.WARNING, key=peer, node=node,
                       peer=peer, tunnels=back, detail="replicas going backwards: a take-over "
                       "resumes past the highest number replicated")  # fmt: skip
    if refused:
        _TROUBLE.event(log, "sync-replicas-refused", logging.WARNING, key=peer, node=node,
                       peer=peer, tunnels=refused, detail=f"this gateway keeps at most "
                       f"{sb.max_replicas} tunnel replicas of a peer: these are not kept, "
                       "and a take-over would lose them")  # fmt: skip

"""Fail-over between an active gateway and its standby (the draft's fail-over case).

The active gateway replicates the context of its tunnels to the standby incrementally, over the
same TLS channel as context transfer: a tunnel's contexts are sent when it is new, after
``sync_packets`` packets on it, or ``sync_ms`` after it last changed, like Linux's XFRM aevents
(replay-thresh / etimer), and at the next check when its SAs' addresses or SPI changed (a peer
that moved, which no traffic may show: ``Replicator.sa_moved``). Every message doubles as a
heartbeat, and an empty one goes out every ``heartbeat_ms``. The standby keeps the latest
contexts (as bytes: nothing is installed) and takes over when it has heard nothing for
``dead_ms``. Beside the tunnels, an :class:`ExtraSource` (the gateway's IKE service) adds
contexts of its own, opaque CDBs under a key (an IKE SA with its CHILD SAs), sent when they
change and reported when gone; the standby keeps the latest of each (``Standby.extra``) and
hands them over with the tunnels it installs.

On take-over every outbound sequence number is advanced by ``seq_margin``: the active may have
sent packets after its last sync, and reusing a sequence number would reuse an AES-GCM or
ChaCha20 nonce. The sync rule bounds what was not replicated to ``sync_packets`` packets per SA
plus what is sent while a sync is in flight (the check runs every ``tick_ms``; with fencing, a
tunnel idle until then is looked at within ``sync_ms`` of its first packet, and its ceiling
bounds what it sends meanwhile: docs/cluster.md, "the idle poll"); the default
margin, 16384, is 16 times the default ``sync_packets`` (1024), the value OpenBSD's pfsync adds
after a switch. RFC 6311 suggests 2^30, which is safe for any sync interval but burns a quarter
of a 32-bit sequence space per fail-over; RFC 6027 §3.4 suggests syncing every 10,000 packets
and skipping that much. Inbound windows are restored as last replicated: they may lag, so a
packet the active accepted after its last sync could be accepted once more (RFC 6027 §3.4:
the price of never dropping fresh traffic).

Configuration (gateway TOML)::

    [failover]
    role = "active"        # or "standby"
    peer = "sg2"           # a [[peers]] entry; the channel is the [transfer] one
    sync_packets = 1024
    sync_ms = 100
    heartbeat_ms = 100
    dead_ms = 500          # detection time: the standby takes over after this much silence
    seq_margin = 16384
    drift_ppm = 1000       # clock-rate bound for the lease (ipsecct.ct.lease)
    guard_ms = 50

Fencing (issue 9). The active sends only under a lease that the standby renews by
acknowledging its messages (an ACK SYNC per message): the lease runs ``lease`` from the sending
of the acknowledged message, with ``lease = (dead_ms - guard_ms) * (1 - rho) / (1 + rho)``
(:mod:`ipsecct.ct.lease` gives the reasoning), and the standby takes over only once
``dead_ms`` has passed since the last message it acknowledged. When the lease runs out the
active's engine holds every outbound packet; a late acknowledgement gives it back. And a
tunnel may send at most ``seq_margin`` sequence numbers past the lowest value the standby may
hold for it (the last acknowledged replication, else the first one sent): the standby restarts
above that value plus the margin, so no sequence number is sent twice even when the margin is
spent within one lease.

Transfers away (docs/cluster.md, "a tunnel transferred away"). A tunnel the active is
transferring to another gateway is replicated marked leaving (SYNC_LEAVING: the target, the
transfer id, the number it is transferred at); the transfer's COMMIT waits for the standby
to acknowledge the mark (:meth:`Replicator.told`, the transfer core's ``standby_gate``). A
standby that takes a marked tunnel over holds it and asks the target (the decision query)
instead of sending beside it (:attr:`Standby.leaving_taken`).

Epochs. Both start in epoch 1; a take-over starts the next epoch. The standby that took over
answers the old active's messages with TAKEN (its epoch): the old active gives up its lease
for good and removes its tunnels (the taker owns them). The taker then runs alone: it needs no
lease, since nobody else holds a replica, until the old active, now its standby, asks it to
replicate (JOIN); it then becomes the active of its epoch, under the lease that standby grants
(the roles change in :mod:`ipsecct.gateway.failover_driver`, docs/cluster.md). An active the
operator lets run alone starts the next epoch too; a standby that takes over from the same
epoch all the same (stopped unseen) makes the same number, and the take-over wins that tie
(:attr:`Replicator.alone`, docs/cluster.md "two take-overs in one epoch").
"""

from __future__ import annotations

import ipaddress
import math
import secrets
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

from ..errors import ContextError, CxtpError, EpochExhaustedError, IpsecctError
from ..ipsec import native, signalling
from ..ipsec.engine import Engine, Tunnel, TunnelState, take_touched
from ..ipsec.ippacket import Endpoint
from ..ipsec.sad import Direction, Protocol, SecurityAssociation
from ..ipsec.spd import Action, OverlapIndex, RangeSet, SPDEntry
from . import context, cxtp
from .journal import Journal, Write, grant_ceiling
from .lease import Grant, Lease, LeaseEvent, LeaseTiming, timing
from .transfer import (
    FPT_SYNC,
    Identity,
    LeavingMark,
    Record,
    frame,
    take_over_pair,
    unframe,
)

SYNC_HEARTBEAT = 1  # removals, then contexts to merge into what the standby holds
SYNC_FULL = 2  # the whole state follows (this poll's messages): replace what the standby holds
SYNC_ACK = 3  # standby -> active: the message numbered in the TRANSFER tag was applied
SYNC_TAKEN = 4  # standby that took over -> old active: give up (epoch of the take-over)
# Inside a HEARTBEAT/FULL message: an extra context (an IKE SA with its CHILD SAs: opaque CDBs
# the gateway's IKE service makes and takes) under a key; the count is of the CDBs that follow
# (0: the context is gone). Its fixed part is a SYNC CDB's, the key follows.
SYNC_EXTRA = 5
# A gateway that became the standby of the peer that took over from it (or restarted as one)
# -> that peer: "replicate to me; I am your standby in this epoch" (issue 9: a pair re-forms).
SYNC_JOIN = 6
# standby -> active: an extra context this standby could not take over (its key and why; an
# empty reason: one refused before is now taken), checked when it arrives (issue 10: a
# standby without the IKE SA's connection, or whose policy does not admit it), so that the
# active's operator learns it before a take-over rather than after.
SYNC_REFUSED = 7
# Inside a HEARTBEAT/FULL message, after the contexts: the tunnel with this outbound SPI is
# being transferred away (its target gateway, the transfer's id and the number it is
# transferred at), or, with no target, no longer is. Sent when that changes, without the
# tunnel's contexts. A standby that takes over a tunnel so marked does not send on it: it
# asks the target (the decision query), as a restarted source asks, and the active's COMMIT
# waits until the standby has acknowledged the mark.
SYNC_LEAVING = 8
# standby -> active: the tunnel replica with this outbound SPI (the key, 4 octets) would not be
# taken over, and why (a standby that keeps max_replicas already; selectors outside its
# [transfer] accept_*_ts); an empty reason: it would be now. Sent when that changes. The
# active still forwards on that tunnel (it is the only sender; the standby never sends on
# a tunnel it did not keep), and its operator is told that a fail-over would lose it.
SYNC_TUNNEL_REFUSED = 9
_SYNC_KINDS = (
    SYNC_HEARTBEAT, SYNC_FULL, SYNC_ACK, SYNC_TAKEN, SYNC_JOIN, SYNC_REFUSED, SYNC_LEAVING,
    SYNC_TUNNEL_REFUSED,
)
# refusals of tunnel replicas in one reply at most (each a CDB of up to about 220 octets)
MAX_TUNNEL_VERDICTS = 256
# Tunnels a replicator keeps as touched until its next poll (one that does not poll, an etcd
# member's replicator to a peer that is not a member, would otherwise gather every tunnel):
# beyond it, it forgets them and walks every tunnel at its next poll.
_TOUCHED_KEPT = 1 << 17
MAX_PEER_NAME = 255  # octets of a LEAVING mark's target gateway name
MAX_REFUSAL_TEXT = 200  # octets of a refusal's reason
MAX_REFUSED_KEYS = 4096  # a standby remembers this many refused keys (to say when they pass)
MAX_EXTRA_KEY = 64
MAX_EXTRA_CDBS = 64
# A standby (an etcd member: per peer) keeps at most this many extra contexts; one more is
# refused (SYNC_REFUSED), as one its connections do not admit: the active's operator is told.
MAX_EXTRAS = 65536
# ... and at most this many tunnel replicas: one more (a new outbound SPI) is not kept, and
# counted (``Standby.replicas_refused``); a take-over then lacks that tunnel (lost, never sent
# on twice). A peer's flood of replicas cannot grow a standby without bound.
MAX_REPLICAS = 1 << 18
_SYNC = struct.Struct("!BxHI")  # kind, number of removed SPIs, epoch
# transfer id, transferred number, outbound SPI, length of the name (0: the mark is cleared)
_LEAVING = struct.Struct("!QQIB")
FIRST_EPOCH = 1
# A JOIN-made resync (the whole state again) at most this often (seconds): a standby JOINing
# under a new session each time (hostile, restarting in a loop) made one per JOIN.
JOIN_RESYNC_GAP = 1.0
LAST_EPOCH = 0xFFFFFFFF  # (32 bits on the wire: a standby never takes it, see Standby.receive)


def last_epoch_next(epoch: int) -> bool:
    """Would a take-over (or ``failover alone``) from ``epoch`` begin LAST_EPOCH? Then none
    may follow it: a standby refuses syncs in LAST_EPOCH, the old active refuses a TAKEN in
    it, and the epoch file cannot hold it (read back as damage: a standby of epoch 2 that
    acknowledged the old active, which sent again from numbers the taker had used)."""
    return epoch + 1 >= LAST_EPOCH


def last_epoch_text(epoch: int, peer: str) -> str:
    """What an operator reads when :func:`last_epoch_next` holds (log line and status)."""
    return (f"epoch {epoch} is the last but one the wire's 32 bits carry: no take-over can "
            f"follow it (it would begin epoch {LAST_EPOCH}, which no gateway takes), nor "
            f"`failover alone`: if {peer} or this gateway stops, its tunnels stop with it "
            "(no (SPI, sequence number) is sent twice: that wins over the fail-over). New "
            "SAs for every tunnel, then both gateways started without their epoch files, "
            "begin the epochs again")  # fmt: skip


@dataclass
class FailoverConfig:
    role: str
    peer: str
    sync_packets: int = 1024
    sync_ms: float = 100.0
    heartbeat_ms: float = 100.0
    dead_ms: float = 500.0
    seq_margin: int = 16384
    tick_ms: float = 10.0
    drift_ppm: float = 1000.0
    guard_ms: float = 50.0
    fencing: bool = True  # tests of replication alone turn the lease off
    state: str | None = None  # the epoch file (gateway.fencing); default beside the config

    def lease_timing(self) -> LeaseTiming:
        return timing(self.dead_ms, self.drift_ppm, self.guard_ms)


def sync_cdb(
    removed: list[int],
    epoch: int,
    *,
    full: bool = False,
    kind: int | None = None,
    lease: int | None = None,
) -> bytes:
    """``lease`` (the etcd mode): the receiving member's etcd lease as the sender last read
    it, after the removed SPIs; the receiver keeps the message only under that lease."""
    k = kind if kind is not None else SYNC_FULL if full else SYNC_HEARTBEAT
    return frame(
        FPT_SYNC,
        _SYNC.pack(k, len(removed), epoch & 0xFFFFFFFF)
        + b"".join(struct.pack("!I", s) for s in removed)
        + (struct.pack("!Q", lease & 0xFFFFFFFFFFFFFFFF) if lease is not None else b""),
    )


def sync_lease(cdb: bytes) -> int | None:
    """The receiver's lease a SYNC CDB was sent for (None: not said)."""
    p = unframe(cdb)
    if len(p) < _SYNC.size:
        return None
    n = _SYNC.unpack_from(p)[1]
    off = _SYNC.size + 4 * n
    return int(struct.unpack_from("!Q", p, off)[0]) if len(p) >= off + 8 else None


def extra_cdb(key: bytes, count: int, epoch: int) -> bytes:
    """The SYNC CDB that announces an extra context (``count`` CDBs follow; 0: removed)."""
    if not key or len(key) > MAX_EXTRA_KEY or count > MAX_EXTRA_CDBS:
        raise CxtpError("extra context key or size out of range")
    return frame(FPT_SYNC, _SYNC.pack(SYNC_EXTRA, count, epoch & 0xFFFFFFFF)
                 + bytes((len(key),)) + key)  # fmt: skip


def parse_extra(cdb: bytes) -> tuple[bytes, int] | None:
    """(key, count) of a SYNC_EXTRA CDB, None for any other CDB."""
    if cxtp.cdb_fpt(cdb) != FPT_SYNC:
        return None
    p = unframe(cdb)
    if len(p) < _SYNC.size or p[0] != SYNC_EXTRA:
        return None
    _kind, count, _epoch = _SYNC.unpack_from(p)
    n = p[_SYNC.size] if len(p) > _SYNC.size else 0
    key = p[_SYNC.size + 1 : _SYNC.size + 1 + n]
    if not key or len(key) != n or n > MAX_EXTRA_KEY or count > MAX_EXTRA_CDBS:
        raise CxtpError("extra context CDB malformed")
    return key, count


def leaving_cdb(spi: int, mark: LeavingMark | None, epoch: int) -> bytes:
    """The SYNC CDB that marks the tunnel with outbound SPI ``spi`` as leaving (``mark``),
    or clears its mark (None)."""
    name = mark.peer.encode() if mark is not None else b""
    if (mark is not None and not name) or len(name) > MAX_PEER_NAME:
        raise CxtpError("a leaving mark's gateway name is empty or too long")
    tid, at = (mark.tid, mark.at) if mark is not None else (0, 0)
    return frame(
        FPT_SYNC,
        _SYNC.pack(SYNC_LEAVING, 0, epoch & 0xFFFFFFFF)
        + _LEAVING.pack(tid & (1 << 64) - 1, at & (1 << 64) - 1, spi & 0xFFFFFFFF, len(name))
        + name,
    )


def parse_leaving(cdb: bytes) -> tuple[int, LeavingMark | None] | None:
    """(outbound SPI, mark; None: cleared) of a SYNC_LEAVING CDB, None for any other CDB."""
    if cxtp.cdb_fpt(cdb) != FPT_SYNC:
        return None
    p = unframe(cdb)
    if len(p) < _SYNC.size or p[0] != SYNC_LEAVING:
        return None
    off = _SYNC.size + _LEAVING.size
    if len(p) < off:
        raise CxtpError("leaving mark CDB too short")
    tid, at, spi, n = _LEAVING.unpack_from(p, _SYNC.size)
    if not n:
        return spi, None
    name = p[off : off + n]
    if len(name) != n:
        raise CxtpError("leaving mark CDB malformed")
    try:
        peer = name.decode()
    except UnicodeDecodeError:
        raise CxtpError("leaving mark CDB: the gateway name is not UTF-8") from None
    return spi, LeavingMark(tid, peer, at)


def refused_cdb(key: bytes, why: str, epoch: int, kind: int = SYNC_REFUSED) -> bytes:
    """The SYNC CDB that says the extra context ``key`` was refused, and why ("": no more);
    with ``kind`` SYNC_TUNNEL_REFUSED, the tunnel replica whose outbound SPI is ``key``."""
    if not key or len(key) > MAX_EXTRA_KEY:
        raise CxtpError("extra context key out of range")
    text = why.encode()[:MAX_REFUSAL_TEXT]
    return frame(FPT_SYNC, _SYNC.pack(kind, 0, epoch & 0xFFFFFFFF)
                 + bytes((len(key),)) + key + text)  # fmt: skip


def parse_refused(cdb: bytes, kind: int = SYNC_REFUSED) -> tuple[bytes, str]:
    """(key, reason) of a SYNC_REFUSED (or ``kind``) CDB (an empty reason: taken now)."""
    p = unframe(cdb)
    if len(p) <= _SYNC.size or p[0] != kind:
        raise CxtpError("not a refusal CDB")
    n = p[_SYNC.size]
    key = p[_SYNC.size + 1 : _SYNC.size + 1 + n]
    if not key or len(key) != n or n > MAX_EXTRA_KEY:
        raise CxtpError("refusal CDB malformed")
    # the CDB's zero padding follows the text
    text = p[_SYNC.size + 1 + n :].rstrip(b"\0")[:MAX_REFUSAL_TEXT]
    return key, text.decode(errors="replace")


class ExtraSource(TypingProtocol):
    """What the active replicates beside its tunnels (the IKE service: IKE SA contexts)."""

    def poll_extra(self, now: float, full: bool, budget: int | None = None
                   ) -> tuple[list[tuple[bytes, list[bytes]]], list[bytes]]:  # fmt: skip
        """(contexts new or changed since the last call, keys of those gone); with ``full``
        every context (the standby replaces what it holds). ``budget``: about how many
        octets of contexts to return (None: no bound); those left out are returned by a
        later call (after a ``full`` one too, as new), never lost."""
        ...


def parse_sync_kind(cdb: bytes) -> tuple[int, int, list[int]]:
    """(kind, epoch, removed outbound SPIs) of a SYNC CDB."""
    p = unframe(cdb)
    if len(p) < _SYNC.size:
        raise CxtpError("SYNC CDB too short")
    kind, n, epoch = _SYNC.unpack_from(p)
    if kind not in _SYNC_KINDS or _SYNC.size + 4 * n > len(p):
        raise CxtpError("SYNC CDB malformed")
    removed = [struct.unpack_from("!I", p, _SYNC.size + 4 * i)[0] for i in range(n)]
    return kind, epoch, removed


def reply_kind(msg: cxtp.Message) -> int | None:
    """SYNC_ACK, SYNC_TAKEN or SYNC_REFUSED for a standby's reply, None for anything else."""
    cdbs = cxtp.message_cdbs(msg)
    if len(cdbs) < 2 or cxtp.cdb_fpt(cdbs[1]) != FPT_SYNC:
        return None
    try:
        kind = parse_sync_kind(cdbs[1])[0]
    except CxtpError:
        return None
    return kind if kind in (SYNC_ACK, SYNC_TAKEN, SYNC_REFUSED, SYNC_TUNNEL_REFUSED) else None


def join_message(epoch: int, session: int = 0, seq: int = 0) -> cxtp.CTD:
    """JOIN: the sender is (now) the standby of the receiver, in ``epoch``. Its TRANSFER tag
    says what it holds: the active's replication ``session`` whose messages it applied, up to
    message ``seq`` (0, 0: nothing; a sender from before this said nothing either), which
    lets the active tell a standby that holds its stream from one that needs everything
    again (:meth:`Replicator.join`)."""
    return cxtp.CTD(
        _ANY,
        0,
        cdbs=(
            cxtp.TransferTag(session & (1 << 64) - 1, seq & 0xFFFFFFFF).encode(),
            sync_cdb([], epoch, kind=SYNC_JOIN),
        ),
    )


def join_held(msg: cxtp.Message) -> tuple[int, int]:
    """(session, message number) a JOIN says its sender holds ((0, 0): nothing)."""
    tag = cxtp.transfer_tag(msg)
    return (0, 0) if tag is None else (tag.transfer_id, tag.seq)


def sync_header(msg: cxtp.Message) -> tuple[int, int] | None:
    """(kind, epoch) of a sync message, None for anything else or a malformed one."""
    cdbs = cxtp.message_cdbs(msg)
    if len(cdbs) < 2 or cxtp.cdb_fpt(cdbs[1]) != FPT_SYNC:
        return None
    try:
        kind, epoch, _ = parse_sync_kind(cdbs[1])
    except CxtpError:
        return None
    return kind, epoch


def taken_reply(msg: cxtp.CTD, epoch: int) -> cxtp.CTD:
    """TAKEN in answer to a sync message: "I own your tunnels since ``epoch``"."""
    tag = cxtp.transfer_tag(msg)
    if tag is None:
        raise CxtpError("sync message without a TRANSFER tag")
    return cxtp.CTD(
        msg.mn_prev,
        0,
        cdbs=(
            cxtp.TransferTag(tag.transfer_id, tag.seq).encode(),
            sync_cdb([], epoch, kind=SYNC_TAKEN),
        ),
    )


def parse_sync(cdb: bytes) -> list[int]:
    """The outbound SPIs a SYNC CDB reports removed."""
    return parse_sync_full(cdb)[1]


def parse_sync_full(cdb: bytes) -> tuple[bool, list[int]]:
    kind, _epoch, removed = parse_sync_kind(cdb)
    if kind not in (SYNC_HEARTBEAT, SYNC_FULL):
        raise CxtpError("SYNC CDB is a reply, not state")
    return kind == SYNC_FULL, removed


@dataclass
class _Synced:
    packets: int
    changed_at: float | None  # when traffic was first seen after the last sync
    seen: int = -1  # the counter at the last visit (-1: none since the last sync)


@dataclass
class _Told:
    """The mark the standby holds for a tunnel that was marked leaving (None: none, or it
    holds nothing of the tunnel), as of message ``seq``."""

    mark: LeavingMark | None
    seq: int


@dataclass
class _Wait:
    """A :class:`Write` done once the standby acknowledged, for every tunnel of ``pending``,
    a state that is ``want`` (a transfer id: marked leaving by it, with the mark the
    tunnel has now; None: unmarked, or absent)."""

    write: Write
    pending: set[Tunnel]
    want: int | None


class Replicator:
    """Active side: decides what to send to the standby (sans-I/O)."""

    def __init__(
        self,
        engine: Engine,
        cfg: FailoverConfig,
        session: int | None = None,
        *,
        peer_lease: bool = True,
        on_floor: Callable[[Tunnel], None] | None = None,
        extra: ExtraSource | None = None,
    ) -> None:
        """``peer_lease``: the standby's ACKs also grant the right to send (pair mode); in
        the etcd mode the lease is etcd's and the ACKs only raise the ceilings. ``on_floor``:
        called when a tunnel's floor changes, instead of setting its ceiling (a member
        replicating to several peers takes the lowest floor of all)."""
        self.engine = engine
        self.cfg = cfg
        self.session = session if session is not None else secrets.randbits(64)
        self.seq = 0
        # Keyed by the Tunnel itself (eq=False: identity), which keeps a removed tunnel alive
        # until its removal is reported: an id() could be handed to a new tunnel meanwhile.
        self.synced: dict[Tunnel, _Synced] = {}
        engine.move_watchers.add(self)  # (sa_moved)
        self.spi_of: dict[Tunnel, int] = {}
        self._full = True  # the next poll sends the whole state (first one, or after a loss)
        self.last_sent = -1e9
        self.messages = 0
        self.contexts = 0
        self.unreplicable = 0  # tunnels whose contexts cannot be encoded (counted, skipped)
        self.deferred = 0  # tunnels due at the last poll left for the next (over the budget)
        self.resyncs = 0  # whole states sent again (the channel to the standby was lost)
        # JOINs from the standby in this epoch (a paused one repeats its JOIN every
        # heartbeat_ms through its grace), those that made a resync, and those answered by
        # one made or due already (join()).
        self.joins = 0
        self.join_resyncs = 0
        self.joins_coalesced = 0
        self._join_answered: int | None = None  # the held session a resync answered
        self._join_quiet_until = -math.inf  # no JOIN-made resync before then
        self._join_pending = False  # a JOIN in the gap: answered once it is over (poll)
        self.epoch = FIRST_EPOCH
        # Fencing: the lease, and per tunnel the lowest outbound sequence number the standby
        # may hold (first replicated, then raised by acknowledgements) and, per message
        # number, the (tunnel, sequence number) pairs it carried.
        self.lease: Lease | None = (
            Lease(cfg.lease_timing()) if cfg.fencing and peer_lease else None
        )
        self.on_floor = on_floor
        self.extra = extra  # IKE SA contexts, replicated when they change
        self.extras = 0  # extra contexts sent
        # The standby could not take this extra context over (key, why; "": it can now).
        self.on_extra_refused: Callable[[bytes, str], None] | None = None
        # Every extra context goes again (a FULL sync): what the standby refused before is
        # unknown until it answers (it may have restarted with another configuration).
        self.on_extra_resync: Callable[[], None] | None = None
        self.extras_refused = 0  # refusals received
        # Tunnels the standby would not take over (outbound SPI -> why; bounded), each
        # change told to ``on_tunnel_refused`` (why "": it would now). Nothing else changes:
        # the active forwards on them as before.
        self.tunnels_refused: dict[int, str] = {}
        self.on_tunnel_refused: Callable[[int, str], None] | None = None
        self.floor: dict[Tunnel, int] = {}
        self._carried: dict[int, list[tuple[Tunnel, int]]] = {}
        self.superseded_by: int | None = None  # epoch of a standby's take-over
        # This epoch began by ``failover alone`` (the driver's go_alone), not by a take-over
        # from replicas. The peer may have taken over from its replicas of the epoch before
        # all the same (a standby stopped unseen, its acknowledgements lost): both in the
        # same epoch number. The take-over wins that tie: it resumed above the ceilings this
        # gateway kept for those replicas while alone, so its numbers are above all this
        # one sent; a TAKEN of this very epoch supersedes this replicator. (The other way
        # round, the alone one's first acknowledgement would raise the ceilings it kept
        # into what the taker sent.)
        self.alone = False
        self.acks = 0
        self.acks_ahead = 0  # ACKs of a message number never sent: ignored (receive)
        self._next_check = 0.0  # the first check sends the whole state at once
        # Which tunnels go to this standby (the etcd mode replicates each tunnel to the
        # members that would take it); None: all. A tunnel that stays here but leaves the
        # selection keeps its floor until the standby acknowledges its removal: message
        # number -> those tunnels.
        self.select: Callable[[Tunnel], bool] | None = None
        # What ``select``'s answers depend on, compared at every poll (the etcd mode: the
        # member list's layout and the groups' placement): while it has not changed since
        # the last walk of every tunnel, a poll visits only the tunnels that may need
        # something, as without a selection. None (with a selection): every poll walks.
        self.select_changes: Callable[[], object] | None = None
        self._walked_select: object = None
        self._leaving: dict[int, list[Tunnel]] = {}
        # The etcd mode: the standby member's lease as last read from etcd, sent with every
        # message; its replicas are good only under that lease (forget_floors()).
        self.target_lease: int | None = None
        # Transfers away (docs/cluster.md, "a tunnel transferred away"): the mark of each
        # tunnel being transferred (None: none), asked at every poll; a change goes as a
        # LEAVING CDB (the contexts are not sent again for it). ``_marked``: the marks sent
        # last; ``_told``: for tunnels marked since the last FULL, their mark at the
        # standby as of which message; ``_acked``: the highest message number acknowledged.
        self.leaving_of: Callable[[Tunnel], LeavingMark | None] | None = None
        self._marked: dict[Tunnel, LeavingMark] = {}
        self._told: dict[Tunnel, _Told] = {}
        self._acked = -1
        self._waits: list[_Wait] = []
        # Called when a Write of told() settled (the transfer core goes on with what waited).
        self.on_told: Callable[[], None] | None = None
        # The idle poll (docs/cluster.md, "the idle poll"): ``marks``, the mapping
        # ``leaving_of`` reads (every tunnel marked now), lets a poll visit only the tunnels
        # that may need something while the engine's tunnels did not change
        # (``Engine.tunnel_changes``): ``_hot`` (traffic not yet replicated, or replicated
        # at their last visit), the marked ones (here or at the standby), and ``_touched``,
        # the tunnels whose SAs counted a packet since the last poll (the engine tells,
        # ``tunnels_touched``; when it cannot, ``touches_lost``, the poll walks every
        # tunnel). With an extension that cannot list them (built before the list), once
        # any SA of the process counted a packet (``native.activity()``), a slice of
        # ``_sweep`` per poll until every tunnel was visited once, at a rate of all of them
        # per ``sync_ms`` (a tunnel idle until now is seen within that). Otherwise (a FULL,
        # the tunnels changed, no fencing, a selection that changed or without
        # ``select_changes``, a ``leaving_of`` without ``marks``) it walks every tunnel.
        self.marks: Mapping[Tunnel, LeavingMark] | None = None
        self._hot: set[Tunnel] = set()
        self._sweep: list[Tunnel] = []
        self._cursor = 0
        self._owed = 0  # tunnels of _sweep still to visit (traffic seen somewhere)
        self._activity: int | None = None  # native.activity() at the last poll
        self._walked = -1  # Engine.tunnel_changes at the last walk of every tunnel
        self._last_poll: float | None = None
        self._walked_all = False  # the last poll walked every tunnel
        # More packets counted in the process since the last poll than the tunnels visited
        # account for, by ``sync_packets`` or more: a burst on a tunnel the sweep has not
        # reached yet; the next poll walks every tunnel (found within two ticks, not
        # ``sync_ms``: what it sends meanwhile stays under its ceiling either way).
        self._burst = False
        self._touched: set[Tunnel] = set()
        self._lost = False  # some SA counted a packet unlisted since the last poll
        self.overflows = 0  # polls that walked every tunnel for that
        engine.touch_watchers.add(self)  # (tunnels_touched, touches_lost)
        self.walks = 0  # polls that walked every tunnel
        self.visited = 0  # tunnels the last poll looked at
        if self.lease is not None:
            engine.send_until = self.lease.expiry

    # -- fencing -------------------------------------------------------------------------
    def _ceiling(self, t: Tunnel) -> None:
        if self.on_floor is not None:
            self.on_floor(t)
        elif self.acks:
            t.seq_ceiling = self.floor[t] + self.cfg.seq_margin
        else:
            # Before the standby's first acknowledgement a floor only says what it will hold
            # once it applies our first message. A standby of an earlier epoch (stopped
            # unseen while this gateway ran alone, which kept its ceilings for it: the
            # driver's go_alone) may hold less and take over from there; nothing is sent
            # meanwhile (no lease), but a ceiling raised now would outlive this replicator if
            # the operator let it run alone again. So never raised before then.
            t.seq_ceiling = min(t.seq_ceiling, self.floor[t] + self.cfg.seq_margin)

    def _fence(self) -> None:
        if self.lease is not None:
            self.engine.send_until = self.lease.expiry

    def forget_floors(self) -> list[Tunnel]:
        """The etcd mode: the standby member's lease is gone (its member key was deleted, or
        names a new lease): it can never use what it holds under the old one (a take-over
        needs that lease; it discards its replicas when it learns the lease is gone, and
        refuses messages sent for another lease). Its floors stop bounding the ceilings;
        the next poll sends everything again (for its new lease). Returns the tunnels whose
        floor went."""
        gone = list(self.floor)
        self.floor.clear()
        self._carried.clear()
        self._leaving.clear()
        self._full = True
        for t in gone:
            self._ceiling(t)
        return gone

    def receive(self, msg: cxtp.Message, now: float) -> list[LeaseEvent]:
        """A reply from the standby: ACK (renews the lease, raises ceilings) or TAKEN."""
        tag = cxtp.transfer_tag(msg)
        cdbs = cxtp.message_cdbs(msg)
        if tag is None or len(cdbs) < 2 or cxtp.cdb_fpt(cdbs[1]) != FPT_SYNC:
            raise CxtpError("sync reply without a TRANSFER tag and a SYNC CDB")
        kind, epoch, _ = parse_sync_kind(cdbs[1])
        if kind == SYNC_REFUSED:
            if tag.transfer_id == self.session and epoch == self.epoch and (
                self.superseded_by is None
            ):
                for cdb in cdbs[1:]:
                    key, why = parse_refused(cdb)
                    self.extras_refused += bool(why)
                    if self.on_extra_refused is not None:
                        self.on_extra_refused(key, why)
            return []
        if kind == SYNC_TUNNEL_REFUSED:
            if tag.transfer_id == self.session and epoch == self.epoch and (
                self.superseded_by is None
            ):
                for cdb in cdbs[1:]:
                    key, why = parse_refused(cdb, SYNC_TUNNEL_REFUSED)
                    if len(key) != 4:
                        raise CxtpError("tunnel refusal CDB malformed")
                    self._tunnel_refused(int.from_bytes(key, "big"), why)
            return []
        if kind == SYNC_TAKEN:
            if epoch >= LAST_EPOCH:
                # Giving up to it made this gateway the standby of an epoch in which the
                # standby refuses every sync (Standby.receive) and that load_state takes
                # for damage: its JOIN made the taker an active whose syncs are never
                # acknowledged, fenced for good. Refused as that sync is: this gateway
                # stays fenced by its lease as it was (a TAKEN renews nothing), the taker
                # runs alone.
                raise CxtpError(f"a TAKEN in epoch {epoch}, the last the wire carries: no "
                                "take-over begins it")  # fmt: skip
            later = epoch > self.epoch or (epoch == self.epoch and self.alone)
            if not later or self.superseded_by is not None:
                return []
            return self.supersede(epoch)
        if kind != SYNC_ACK:
            raise CxtpError("not a sync reply")
        if tag.transfer_id != self.session or epoch != self.epoch:
            return []  # for an earlier session of ours: it says nothing about this one
        if self.superseded_by is not None:
            return []
        if tag.seq >= self.seq:
            # A message never sent (a buggy or hostile standby; authenticated, yet
            # untrusted). Taken, it granted the lease for every message in flight, applied
            # or not, dropped the floors of tunnels whose removal it had not applied (their
            # ceilings rose), forgot every carried number, and froze ``_acked`` past what any
            # real ACK reaches: no transfer's wait settled again. Ignored and counted: the
            # channel stays, so replication (and the real ACKs that follow) stay live; a
            # dropped channel would resync the whole state at each such ACK.
            self.acks_ahead += 1
            return []
        self.acks += 1
        if self.acks == 1 and self.on_floor is None:
            # The standby holds our state now: the ceilings kept low until then (_ceiling)
            # follow the floors, even where no later replication raises a floor (a tunnel
            # stalled at its ceiling is replicated again at the same number).
            for t in self.floor:
                self._ceiling(t)
        for t, seq in self._carried.pop(tag.seq, []):
            if t in self.floor and seq > self.floor[t]:
                self.floor[t] = seq
                self._ceiling(t)
        for k in [k for k in self._leaving if k <= tag.seq]:
            for t in self._leaving.pop(k):
                if t in self.floor and t not in self.synced:  # not replicated again since
                    del self.floor[t]
                    self._ceiling(t)
        for k in [k for k in self._carried if k < tag.seq - 4096]:
            del self._carried[k]  # never acknowledged (connection lost): forget
        if tag.seq > self._acked:
            self._acked = tag.seq
            if self._told:
                self._acknowledged()
        if self.lease is None:
            return []
        events = self.lease.granted(tag.seq, now)
        self._fence()
        return events

    def supersede(self, epoch: int) -> list[LeaseEvent]:
        """The peer took over in ``epoch`` (its TAKEN; or, for a replicator of an epoch
        begun alone, its sync of this very epoch: the driver's ``_alone_yields``): give the
        lease up for good, send nothing more, fail what waits for the standby."""
        if self.superseded_by is not None:
            return []
        self.superseded_by = epoch
        if self.lease is not None:
            self.lease.revoke()
        self.engine.send_until = -math.inf
        self._fail_waits(f"the standby took over (epoch {epoch})")
        return [LeaseEvent.SUPERSEDED]

    def _tunnel_refused(self, spi: int, why: str) -> None:
        if not why:
            if self.tunnels_refused.pop(spi, None) is None:
                return
        else:
            if self.tunnels_refused.get(spi) == why:
                return
            self.tunnels_refused.pop(spi, None)
            self.tunnels_refused[spi] = why
            while len(self.tunnels_refused) > MAX_REFUSED_KEYS:
                del self.tunnels_refused[next(iter(self.tunnels_refused))]
        if self.on_tunnel_refused is not None:
            self.on_tunnel_refused(spi, why)

    # -- transfers away: the standby learns of them before the COMMIT ------------------------
    def told(self, tunnels: Iterable[Tunnel], tid: int | None) -> Write:
        """A Write done once the standby has acknowledged that it holds each of ``tunnels``
        with its mark as ``leaving_of`` says it now (a mark of transfer ``tid``: the same
        target too, after a move to another candidate), or not at all; with ``tid`` None,
        unmarked (or not at all). ``leaving_of`` must already say so: the next poll (made
        due now) sends the change. Failed if the standby takes over first; never settled
        otherwise (the transfer's own deadline decides then)."""
        w = Write()
        if self.superseded_by is not None:
            w.fail(f"the standby took over (epoch {self.superseded_by})")
            return w
        wait = _Wait(w, set(tunnels), tid)
        self._settle_wait(wait)
        if not w.settled:
            self._waits.append(wait)
            self._next_check = 0.0  # the next tick polls
        return w

    def _settle_wait(self, wait: _Wait) -> bool:
        told, acked = self._told, self._acked
        leaving_of = self.leaving_of
        done = []
        for t in wait.pending:
            st = told.get(t)
            if st is None:
                # Never marked since the standby last started afresh: it holds it unmarked
                # (or not at all): what a rollback waits for, never what a COMMIT does.
                ok = wait.want is None
            elif st.seq > acked:
                ok = False
            elif wait.want is None:
                ok = st.mark is None
            else:
                now = leaving_of(t) if leaving_of is not None else None
                ok = st.mark is not None and st.mark.tid == wait.want and st.mark == now
            if ok:
                done.append(t)
        wait.pending.difference_update(done)
        if not wait.pending:
            wait.write.succeed()
            return True
        return False

    def _acknowledged(self) -> None:
        settled = [w for w in self._waits if self._settle_wait(w)]
        for w in settled:
            self._waits.remove(w)
        # What the standby holds unmarked (or not at all) needs no more tracking.
        for t in [t for t, st in self._told.items()
                  if st.seq <= self._acked and st.mark is None
                  and t not in self._marked]:  # fmt: skip
            del self._told[t]
        if settled and self.on_told is not None:
            self.on_told()

    def release_waits(self) -> None:
        """No standby can take over what this gateway replicated (the operator said it is
        down: ``failover alone``): everything waiting for its acknowledgement goes on."""
        waits, self._waits = self._waits, []
        for w in waits:
            w.write.succeed()
        if waits and self.on_told is not None:
            self.on_told()

    def _fail_waits(self, why: str) -> None:
        waits, self._waits = self._waits, []
        for w in waits:
            w.write.fail(why)
        if waits and self.on_told is not None:
            self.on_told()

    def tick(self, now: float) -> list[LeaseEvent]:
        """Lease changes by the passing of time (loss); the engine enforces it by itself."""
        if self.lease is None or self.superseded_by is not None:
            return []
        return self.lease.poll(now)

    def resync(self) -> None:
        """The standby may have missed messages (the channel broke, it restarted): the next
        poll sends the whole state again, marked FULL so that the standby replaces (not merges)
        what it holds, which also carries any removal it missed. Counted (``resyncs``) once
        per whole state made due: a resync due already is not another one."""
        if not self._full:
            self.resyncs += 1
        self._full = True
        self._join_answered = None  # a JOIN after a lost channel is answered afresh

    def idle(self, now: float) -> None:
        """No poll now (no channel to the standby: what it sent would be lost), the next
        check in ``tick_ms``. Whatever is due stays due: the whole state a lost channel
        made due (:meth:`resync`) goes once the channel is back, not into the void at
        every tick."""
        self._next_check = now + self.cfg.tick_ms / 1000

    def join(self, session: int, seq: int, now: float | None = None) -> bool:
        """A JOIN of this epoch from the standby, which holds this replicator's messages up
        to ``seq`` of ``session`` (:func:`join_held`; 0: nothing of any). Returns whether it
        made a resync (a whole state again, as :meth:`resync`).

        A standby that holds this replicator's own session is on its stream: what follows
        its last applied message is in its channel, in order, and a lost channel resyncs
        anyway (``peer_lost``): nothing to send again. Any other (a new standby, one that
        restarted, one from before JOINs said what they hold) gets one resync, which also
        answers every repeat of that JOIN (a standby that woke up paused sends one every
        heartbeat_ms through its grace, about 30: each made a whole state again, a storm
        with many tunnels) until the channel is lost. Counted: ``joins``,
        ``join_resyncs``, ``joins_coalesced``. With ``now``: at most one such resync per
        :data:`JOIN_RESYNC_GAP`; a JOIN within it is answered by the poll after it (a standby
        JOINing under a fresh session each time made one per JOIN)."""
        self.joins += 1
        if session == self.session or self._join_answered == session or (
            self.superseded_by is not None
        ):
            self.joins_coalesced += 1
            return False
        self._join_answered = session
        if self._full:  # a whole state is due already: it answers this JOIN
            self.joins_coalesced += 1
            return False
        if now is not None:
            if now < self._join_quiet_until:
                self._join_pending = True
                self.joins_coalesced += 1
                return False
            self._join_quiet_until = now + JOIN_RESYNC_GAP
        self._full = True
        self.resyncs += 1
        self.join_resyncs += 1
        return True

    def next_deadline(self) -> float | None:
        """The next check (every ``tick_ms``): new tunnels, ``sync_packets`` packets or
        ``sync_ms`` since a change, a removal, or a heartbeat due."""
        return self._next_check

    def handle_timer(self, now: float, budget: int | None = None) -> list[cxtp.Message]:
        """What to send the standby now (:meth:`poll`), and the next check in ``tick_ms``."""
        self._next_check = now + self.cfg.tick_ms / 1000
        return self.poll(now, budget)

    def sa_moved(self, t: Tunnel) -> None:
        """The engine changed the SPI or addresses of ``t``'s SAs (its peer moved: MOBIKE, a
        NAT's new mapping; an SPI reassigned): it goes again at the next poll, traffic or
        not, as if it had changed long enough ago. Before, only traffic made a tunnel go
        again: an idle one's replica kept the old address, and a take-over sent ESP to where
        the peer had been. Nothing is looked at per poll for it: the idle poll visits it as a
        hot tunnel (traffic not yet replicated)."""
        st = self.synced.get(t)
        if st is not None:
            st.packets, st.changed_at = -1, -math.inf
            self._hot.add(t)

    def tunnels_touched(self, tunnels: set[Tunnel]) -> None:
        """These tunnels' SAs counted packets (the engine's ``take_touched``): the next poll
        visits them. Kept until then (bounded: beyond it, as if lost)."""
        touched = self._touched
        touched |= tunnels
        if len(touched) > _TOUCHED_KEPT:
            touched.clear()
            self._lost = True

    def touches_lost(self) -> None:
        """Some SA counted a packet without being listed: the next poll walks every tunnel."""
        self._lost = True

    def _counter(self, t: Tunnel) -> int:
        return sum(sa.counters.packets for sa in t.sas())

    def _candidates(
        self, now: float, moved: bool, touched: set[Tunnel] | None
    ) -> list[Tunnel] | None:
        """The tunnels a poll must look at when it need not walk them all (see ``marks``),
        or None: walk them all. Each is in the engine and replicable (active, or held and
        marked); otherwise something changed that only a walk of all finds (a removal).
        ``moved``: an SA of the process counted a packet since the last poll; ``touched``:
        the tunnels whose SAs did (None: unknown, the sweep finds them)."""
        eng = self.engine
        last = self._last_poll
        leaving_of = self.leaving_of
        if (
            last is None
            or self._burst
            or not self.cfg.fencing  # no ceiling: the sync rule alone bounds what is missed
            or (
                self.select is not None
                and (self.select_changes is None or self.select_changes() != self._walked_select)
            )
            or (leaving_of is not None and self.marks is None)
            or eng.tunnel_changes != self._walked
        ):
            return None
        cands = set(self._hot)
        if self.marks:
            cands.update(self.marks)
        cands.update(self._marked)
        sweep = self._sweep
        n = len(sweep)
        if touched is not None:
            moved_state = TunnelState.MOVED  # (sends its tail, replicated by no one)
            cands.update(t for t in touched if t.state is not moved_state)
        elif moved:
            self._owed = n  # a packet somewhere: every tunnel is visited once from here
        if self._owed:
            k = min(self._owed, math.ceil(n * max(0.0, now - last) * 1000 / self.cfg.sync_ms))
            self._owed -= k
            i = self._cursor
            cands.update(sweep[i : i + k])
            if i + k > n:
                cands.update(sweep[: i + k - n])
            self._cursor = (i + k) % n
        active, held = TunnelState.ACTIVE, TunnelState.HELD
        for t in cands:
            if not eng.has_tunnel(t):
                return None
            st = t.state
            if st is not active and (
                st is not held or leaving_of is None or leaving_of(t) is None
            ):
                return None
        return list(cands)

    def poll(self, now: float, budget: int | None = None) -> list[cxtp.Message]:
        """The sync messages due now. ``budget``: about how many octets of contexts may go
        (the room left in the channel to the standby; None: no bound). What does not fit
        goes at a later poll: a tunnel or an extra context left out stays due (after a FULL
        it is due as new), so a whole state larger than the channel's send bound goes in
        pieces, each within it, instead of the channel being dropped under it and the
        state sent again, for ever (docs/cxtp.md, "fail-over replication"). At least the
        first SYNC CDB goes (removals, the FULL mark, the heartbeat); a budget of one
        octet or more lets at least one context go."""
        if self._join_pending and now >= self._join_quiet_until:
            self._join_pending = False  # a JOIN of the last gap: answered now
            self._join_quiet_until = now + JOIN_RESYNC_GAP
            if not self._full:
                self._full = True
                self.resyncs += 1
                self.join_resyncs += 1
        full = self._full
        due: list[Tunnel] = []
        live: set[Tunnel] = set()
        staying: set[Tunnel] = set()  # here, but not for this standby
        select = self.select
        leaving_of = self.leaving_of
        marked = self._marked
        told = self._told
        if full:
            marked.clear()  # the FULL drops every mark; those still due go again below
            for k in told:
                told[k] = _Told(None, self.seq)
        marks: dict[Tunnel, LeavingMark] = {}
        mark_due: list[Tunnel] = []
        act = native.activity()  # (before the walk: a packet during it moves it again)
        before = self._activity
        moved, self._activity = act != before, act
        take_touched()  # (likewise: a packet after it is listed for the next poll)
        touched: set[Tunnel] | None = self._touched
        self._touched = set()
        lost, self._lost = self._lost, False
        if not native.TRACKS_TOUCHED:
            touched, lost = None, False  # the sweep finds them (activity() only)
        elif lost:
            self.overflows += 1  # some SA counted unlisted: only a walk finds it
        cands = None if full or lost else self._candidates(now, moved, touched)
        self._last_poll = now
        # A change is seen when it happened (since the last poll) on a tunnel visited at
        # every poll (hot, or all walked last time); elsewhere it may be up to a sweep
        # (``sync_ms``) old: due at once, as it would have been by now.
        seen_hot, seen_all = self._hot, self._walked_all
        self._walked_all = cands is None
        if cands is None:
            tunnels = self.engine.tunnels()
            hot: set[Tunnel] = set()
            self._hot = hot
            self._owed = 0
            self._walked = self.engine.tunnel_changes
            if self.select_changes is not None:
                self._walked_select = self.select_changes()
            self.walks += 1
        else:
            tunnels = cands
            hot = self._hot
        self.visited = len(tunnels)
        explained = 0  # packets counted on the tunnels visited since their last visit
        for t in tunnels:
            mark = leaving_of(t) if leaving_of is not None else None
            if t.state is not TunnelState.ACTIVE and (
                mark is None or t.state is not TunnelState.HELD
            ):
                continue  # (a tunnel held by a transfer goes on, marked)
            if select is not None and not select(t):
                staying.add(t)
                continue
            live.add(t)
            if mark is not None:
                marks[t] = mark
            if mark != marked.get(t):
                mark_due.append(t)
            c = self._counter(t)
            st = self.synced.get(t)
            if st is not None:
                if st.seen >= 0:
                    explained += c - st.seen
                st.seen = c
            if st is None or full:
                due.append(t)  # (one left over or not replicable is visited again: hot)
                continue
            if c == st.packets:
                hot.discard(t)
            else:
                if st.changed_at is None:
                    st.changed_at = (
                        now
                        if seen_all or t in seen_hot or (touched is not None and t in touched)
                        else now - self.cfg.sync_ms / 1000
                    )
                hot.add(t)  # (after the test above: ``seen_hot`` may be this very set)
                if (
                    c - st.packets >= self.cfg.sync_packets
                    or (now - st.changed_at) * 1000 >= self.cfg.sync_ms
                    # half-way to its ceiling: sync now, or the tunnel will stall
                    or t.seq_ceiling - t.outbound.seq <= self.cfg.seq_margin // 2
                ):
                    due.append(t)
        self._burst = (
            cands is not None
            and touched is None
            and before is not None
            and act - before - explained >= self.cfg.sync_packets
        )
        if cands is None:
            self._sweep = list(live)  # (those not live now are found by a change)
            if self._cursor >= len(self._sweep):
                self._cursor = 0
        if self.superseded_by is not None:
            return []  # the standby took over: nothing more to replicate
        if full and self.on_extra_resync is not None:
            self.on_extra_resync()
        if full:  # (the standby tells its refusals again as it checks the replicas)
            self.tunnels_refused.clear()
        # (without a walk of every tunnel none is gone: the engine's tunnels did not change
        # and every one visited is live)
        gone = [k for k in self.synced if k not in live] if cands is None else []
        removed = [self.spi_of.pop(k) for k in gone]
        for spi in removed if self.tunnels_refused else []:
            self.tunnels_refused.pop(spi, None)  # (the standby forgets it as it goes too)
        for k in gone:
            del self.synced[k]
            marked.pop(k, None)
            if k in told:
                told[k] = _Told(None, self.seq)  # the first message removes it
        leaving: list[Tunnel] = []
        gone_set = set(gone)
        for k in [k for k in self.floor if k not in live] if cands is None else []:
            if k not in staying:
                del self.floor[k]  # gone from here: it sends nothing more
            elif k in gone_set:
                leaving.append(k)  # its floor holds until the standby acknowledges this
            # else its removal is on its way (``_leaving``)
        pairs: list[list[bytes]] = []
        carried: list[tuple[Tunnel, int] | None] = []
        used = 0
        deferred: list[Tunnel] = []
        for t in due:
            if budget is not None and used >= budget:
                deferred.append(t)  # due at a later poll (below: as new after a FULL)
                hot.add(t)
                continue
            try:
                pair = [context.encode(sa, now) for sa in t.sas()]
            except ContextError:
                self.unreplicable += 1  # e.g. a replay window too large for a CDB
                hot.add(t)
                continue
            used += sum(map(len, pair))
            pairs.append(pair)
            seq = t.outbound.seq
            carried.append((t, seq))
            if self.cfg.fencing and t not in self.floor:
                # From now on the standby may hold this tunnel, at this number or later.
                self.floor[t] = seq
                self._ceiling(t)
            c = self._counter(t)
            self.synced[t] = _Synced(c, None, c)
            self.spi_of[t] = t.outbound.spi
        if full:
            # The FULL mark makes the standby drop what it holds: what is left out goes
            # later as new (no removal is owed for it), its floor kept meanwhile.
            for t in deferred:
                self.synced.pop(t, None)
                self.spi_of.pop(t, None)
        self.deferred = len(deferred)
        upserts: list[tuple[bytes, list[bytes]]] = []
        extra_gone: list[bytes] = []
        if self.extra is None:
            pass
        elif budget is None:
            upserts, extra_gone = self.extra.poll_extra(now, full)
        else:
            upserts, extra_gone = self.extra.poll_extra(now, full, max(0, budget - used))
        # Marks that changed (after the contexts: a new tunnel's replica arrives first).
        mark_cdbs: list[tuple[Tunnel, bytes]] = []
        for t in mark_due:
            try:
                mark_cdbs.append((t, leaving_cdb(t.outbound.spi, marks.get(t), self.epoch)))
            except CxtpError:
                self.unreplicable += 1  # a gateway name too long (configuration checks it)
        if (
            not full
            and not pairs
            and not removed
            and not upserts
            and not extra_gone
            and not mark_cdbs
            and (now - self.last_sent) * 1000 < self.cfg.heartbeat_ms
        ):
            return []
        self._full = False
        self.contexts += sum(len(p) for p in pairs)
        self.extras += len(upserts)
        # an extra context travels as its SYNC_EXTRA CDB and its own CDBs, never split
        for key, cdbs in upserts:
            pairs.append([extra_cdb(key, len(cdbs), self.epoch), *cdbs])
            carried.append(None)
        for key in extra_gone:
            pairs.append([extra_cdb(key, 0, self.epoch)])
            carried.append(None)
        self.last_sent = now
        template = cxtp.CTD(due[0].outbound.dst if due else _ANY, 0)
        # Every message starts with a SYNC CDB (removals and the FULL mark in the first), so
        # the standby tells each from a transfer, and a tunnel's pair never straddles two.
        budget = cxtp.MAX_MESSAGE_LEN - 1024  # room for the header and the TRANSFER CDB
        lease = self.target_lease
        groups: list[list[bytes]] = [[sync_cdb(removed, self.epoch, full=full, lease=lease)]]
        gcarried: list[list[tuple[Tunnel, int]]] = [[]]
        size = len(groups[0][0])
        for pair, tc in zip(pairs, carried, strict=True):
            psize = sum(len(x) for x in pair)
            if size + psize > budget:
                groups.append([sync_cdb([], self.epoch, lease=lease)])
                gcarried.append([])
                size = len(groups[-1][0])
            groups[-1].extend(pair)
            if tc is not None:
                gcarried[-1].append(tc)
            size += psize
        for t, cdb in mark_cdbs:
            if size + len(cdb) > budget:
                groups.append([sync_cdb([], self.epoch, lease=lease)])
                gcarried.append([])
                size = len(groups[-1][0])
            groups[-1].append(cdb)
            size += len(cdb)
            mark = marks.get(t)
            if mark is not None:
                marked[t] = mark
            else:
                marked.pop(t, None)
            told[t] = _Told(mark, self.seq + len(groups) - 1)
        msgs: list[cxtp.Message] = []
        for g, gc in zip(groups, gcarried, strict=True):
            part = cxtp.batch_cdbs(template, g, self.session, first_seq=self.seq + len(msgs))
            if len(part) != 1:  # cannot happen within the budget; a split would misattribute
                raise CxtpError("a sync group did not fit one message")
            if self.cfg.fencing:
                self._carried[self.seq + len(msgs)] = gc
                while len(self._carried) > 4096:  # acknowledgements stopped coming: forget
                    del self._carried[next(iter(self._carried))]
            msgs += part
        if self.lease is not None:
            for i in range(len(msgs)):
                self.lease.sent(self.seq + i, now)
        if leaving:
            self._leaving.setdefault(self.seq, []).extend(leaving)  # the first carries them
        self.seq += len(msgs)
        self.messages += len(msgs)
        return msgs


_ANY = ipaddress.ip_address("0.0.0.0")


@dataclass
class Standby:
    """Standby side: keeps the replicated contexts; takes over when the active falls silent."""

    engine: Engine
    cfg: FailoverConfig
    endpoint: Endpoint
    identity: Identity
    replica: dict[int, list[bytes]] = field(default_factory=dict)  # outbound SPI -> CDBs
    extra: dict[bytes, list[bytes]] = field(default_factory=dict)  # IKE SA contexts, by key
    last_heard: float | None = None
    took_over: float | None = None
    seen_session: int | None = None
    seen_seq: int = 0  # the number of the last sync message applied (of seen_session)
    epoch: int = FIRST_EPOCH
    grant: Grant | None = None
    acks: int = 0
    peer_lease: bool = True  # False in the etcd mode: ACKs raise ceilings, grant nothing
    # The etcd mode: this member's current lease (0: none): a message sent for another
    # lease (an earlier life of this member) is neither applied nor acknowledged.
    member_lease: int | None = None
    # Replicas decoded ahead of a take-over (prepare()): outbound SPI -> (the CDBs they were
    # decoded from, the SAs), and the SPIs received since, with when.
    _ready: dict[int, tuple[list[bytes], list[SecurityAssociation]]] = field(
        default_factory=dict, repr=False
    )
    _dirty: deque[int] = field(default_factory=deque, repr=False)
    _arrived: dict[int, float] = field(default_factory=dict, repr=False)  # SPIs in _dirty
    # Records the take-over (and reserves past the margin) before the tunnels send.
    journal: Journal | None = None
    # Could this gateway take over an extra context (key, CDBs)? None: yes; else why not. A
    # refused one is not kept; the active is told (SYNC_REFUSED), and told again when a
    # later version of it passes (``refused``: the keys refused last, bounded).
    check_extra: Callable[[bytes, list[bytes]], str | None] | None = None
    refused: dict[bytes, str] = field(default_factory=dict)
    max_extra: int = MAX_EXTRAS
    # The outbound SPIs of the tunnels an extra context owns (an IKE SA: its CHILD SAs).
    # The tunnels of a refused one are not taken over: an IKE SA and its CHILD SAs are one
    # unit, and CHILD SAs without their IKE SA would be tunnels nobody rekeys or deletes,
    # whose selectors shadow the SAs the client makes when it starts over.
    extra_tunnels: Callable[[list[bytes]], list[int]] | None = None
    refused_tunnels: dict[bytes, frozenset[int]] = field(default_factory=dict)
    # What the last take-over left out that way: (key, why, outbound SPIs).
    not_taken: list[tuple[bytes, str, list[int]]] = field(default_factory=list)
    # Tunnels the active marked leaving (outbound SPI -> mark: a transfer away was under
    # way; a mark may come before the tunnel's contexts). A take-over installs them held,
    # sends nothing on them, and lists them in
    # ``leaving_taken`` (mark, tunnels): the gateway asks each mark's target (the decision
    # query) whether it took them.
    marks: dict[int, LeavingMark] = field(default_factory=dict)
    leaving_taken: list[tuple[LeavingMark, list[Tunnel]]] = field(default_factory=list)
    # The SG_UPDATE payload of each of those (direct identity), sent if it resumes here.
    leaving_signals: dict[Tunnel, bytes] = field(default_factory=dict)
    # When each marked transfer was first heard of (by id): the decision query says how
    # old the transfer is at least (AGE), as a restarted source's does.
    mark_seen: dict[int, float] = field(default_factory=dict)
    # The highest outbound sequence number any replica of each tunnel carried (outbound SPI
    # -> number): an active sends what it sent last, which only grows; a replica going
    # backwards (a buggy or hostile active) must not lower where a take-over resumes, as
    # the active may have sent up to the higher one + the margin. Counted.
    high: dict[int, int] = field(default_factory=dict, repr=False)
    seq_backwards: int = 0
    max_replicas: int = MAX_REPLICAS
    replicas_refused: int = 0
    # What this gateway's operator lets peers hand over (local, remote ranges: [transfer]
    # accept_local_ts / accept_remote_ts, as a transfer's target checks them); None: no
    # limit. A take-over installs no tunnel outside it (a peer's replica claiming other
    # traffic, installed first in the SPD, would take it); counted.
    accept: tuple[RangeSet, RangeSet] | None = None
    policy_refused: int = 0
    # Replicas a take-over did not install because their selectors overlap a tunnel of
    # this gateway's own (a mutual pair: each the other's standby): installed first in the
    # SPD, the replica would take that tunnel's traffic. Counted; a transfer's target
    # refuses such a tunnel alike.
    overlap_refused: int = 0
    # What this standby last told the active of each tunnel replica it would not take over
    # (outbound SPI -> why: SYNC_TUNNEL_REFUSED, sent when it changes), and what it has yet
    # to tell (sent with its next reply).
    tunnel_refusing: dict[int, str] = field(default_factory=dict)
    _tunnel_verdicts: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.cfg.fencing and self.peer_lease and self.grant is None:
            self.grant = Grant(self.cfg.lease_timing())

    def _reply(self, msg: cxtp.CTD, tag: cxtp.TransferTag, kind: int) -> cxtp.CTD:
        if kind == SYNC_TAKEN:
            return taken_reply(msg, self.epoch)
        return cxtp.CTD(
            msg.mn_prev,
            0,
            cdbs=(
                cxtp.TransferTag(tag.transfer_id, tag.seq).encode(),
                sync_cdb([], self.epoch, kind=kind),
            ),
        )

    def receive(self, msg: cxtp.CTD, now: float) -> list[cxtp.CTD]:
        """Apply a sync message; returns the replies for the active: an ACK that grants it
        its lease, or TAKEN once this standby has taken over (nothing is applied then)."""
        tag = cxtp.transfer_tag(msg)
        if tag is None or len(msg.cdbs) < 2:
            raise CxtpError("sync message without a TRANSFER tag")
        cdbs = list(msg.cdbs[1:])
        epoch = self.epoch
        full, removed = False, list[int]()
        if self.member_lease is not None and not (cdbs and cxtp.cdb_fpt(cdbs[0]) == FPT_SYNC):
            return []
        if cdbs and cxtp.cdb_fpt(cdbs[0]) == FPT_SYNC:
            kind, epoch, removed = parse_sync_kind(cdbs[0])
            if kind not in (SYNC_HEARTBEAT, SYNC_FULL):
                raise CxtpError("a sync reply or JOIN sent to the standby")
            if epoch >= LAST_EPOCH:
                # A take-over from it would begin epoch 2**32: sent as 0 (an earlier epoch:
                # the old active ignored our TAKEN), refused by load_state at the next start.
                raise CxtpError(f"a sync in epoch {epoch}, the last the wire carries: no "
                                "take-over could follow it")  # fmt: skip
            if self.member_lease is not None and sync_lease(cdbs[0]) != self.member_lease:
                return []  # for an earlier life of this member (or none): never kept
            full = kind == SYNC_FULL
            cdbs = cdbs[1:]
        # Contexts come as (outbound, inbound) pairs; remember the latest of each tunnel. Extra
        # contexts come as a SYNC_EXTRA CDB and the CDBs it counts.
        pairs: list[tuple[int, list[bytes]]] = []
        extras: list[tuple[bytes, list[bytes] | None]] = []
        leaves: list[tuple[int, LeavingMark | None]] = []
        i = 0
        while i < len(cdbs):
            lv = parse_leaving(cdbs[i])
            if lv is not None:
                leaves.append(lv)
                i += 1
                continue
            ex = parse_extra(cdbs[i])
            if ex is not None:
                key, count = ex
                if i + 1 + count > len(cdbs):
                    raise CxtpError("an extra context runs past its message")
                extras.append((key, list(cdbs[i + 1 : i + 1 + count]) if count else None))
                i += 1 + count
                continue
            out = cdbs[i]
            pair = [out]
            spi, inbound = _peek(out)
            if inbound:
                raise CxtpError("a replicated tunnel must start with its outbound SA")
            if i + 1 < len(cdbs) and cxtp.cdb_fpt(cdbs[i + 1]) != FPT_SYNC and (
                _peek(cdbs[i + 1])[1]
            ):
                pair.append(cdbs[i + 1])
                i += 2
            else:
                i += 1
            pairs.append((spi, pair))
        if self.took_over is not None or epoch < self.epoch:
            # We own these tunnels now: tell the old active, apply nothing.
            return [self._reply(msg, tag, SYNC_TAKEN)]
        if self.grant is not None and self.grant.closed:
            return []  # deciding to take over: no more grants, no more state
        if leaves:
            # Marks may come before their tunnels, so they cannot be bounded by the replicas;
            # nor may one be dropped (its tunnel would be taken over while its transfer's
            # target sends on it): past ``max_replicas`` the whole message is refused, not
            # acknowledged (the active's transfer waits for that, and times out).
            kept = {} if full else self.marks
            new = {spi for spi, mark in leaves if mark is not None and spi not in kept}
            gone = {spi for spi, mark in leaves if mark is None and spi in kept}
            if len(kept) - len(gone) + len(new) > self.max_replicas:
                raise CxtpError(f"more than {self.max_replicas} tunnels marked leaving")
        self.last_heard = now
        self.seen_session = tag.transfer_id
        self.seen_seq = tag.seq
        self.epoch = epoch
        if full:  # (``high`` stays: a whole state again is no reason to go backwards)
            self.replica.clear()
            self._ready.clear()
            self.extra.clear()
            self.marks.clear()
            self.refused_tunnels.clear()  # those still refused are in this message
            self.tunnel_refusing.clear()  # (told again as the replicas are checked again)
            self._tunnel_verdicts.clear()
        verdicts: list[tuple[bytes, str]] = []
        for key, value in extras:  # removals first: they make room (max_extra)
            if value is None:
                self.extra.pop(key, None)
                self.refused.pop(key, None)
                self.refused_tunnels.pop(key, None)
        for key, value in extras:
            if value is None:
                continue
            why = self.check_extra(key, value) if self.check_extra is not None else None
            if not why and key not in self.extra and len(self.extra) >= self.max_extra:
                why = f"this gateway keeps at most {self.max_extra} IKE SA replicas of a peer"
            if why:
                self.extra.pop(key, None)  # an older version is no better at a take-over
                self.refused.pop(key, None)
                self.refused[key] = why
                while len(self.refused) > MAX_REFUSED_KEYS:
                    del self.refused[next(iter(self.refused))]
                if self.extra_tunnels is not None:
                    self.refused_tunnels.pop(key, None)
                    self.refused_tunnels[key] = frozenset(self.extra_tunnels(value))
                    while len(self.refused_tunnels) > MAX_REFUSED_KEYS:
                        del self.refused_tunnels[next(iter(self.refused_tunnels))]
                verdicts.append((key, why))
                continue
            if self.refused.pop(key, None) is not None:
                verdicts.append((key, ""))
            self.refused_tunnels.pop(key, None)
            self.extra[key] = value
        for spi in removed:
            self.replica.pop(spi, None)
            self.high.pop(spi, None)
            self._ready.pop(spi, None)
            self.marks.pop(spi, None)
            self.tunnel_refusing.pop(spi, None)  # (the active forgets it as the tunnel goes)
            self._tunnel_verdicts.pop(spi, None)
        for spi, pair in pairs:
            if spi not in self.replica and len(self.replica) >= self.max_replicas:
                self.replicas_refused += 1
                self._tunnel_verdict(
                    spi, f"this gateway keeps at most {self.max_replicas} tunnel replicas of a peer"
                )
                continue
            self.replica[spi] = pair
            if spi not in self._arrived:  # (once each: a busy tunnel replaced every sync
                self._dirty.append(spi)  # ahead of prepare() grew the queue without bound)
            self._arrived[spi] = now
            seq = context.peek_seq(pair[0])
            if seq < self.high.get(spi, 0):
                self.seq_backwards += 1
            else:
                self.high[spi] = seq
        if full or len(self.high) > 2 * len(self.replica) + 64:  # (or dropped by the caller)
            self.high = {s: self.high[s] for s in self.replica if s in self.high}
        for spi, mark in leaves:
            if mark is not None:
                self.marks[spi] = mark
                self.mark_seen.setdefault(mark.tid, now)
            else:
                self.marks.pop(spi, None)
        if len(self.mark_seen) > 2 * len(self.marks) + 64:
            live = {m.tid for m in self.marks.values()}
            self.mark_seen = {k: v for k, v in self.mark_seen.items() if k in live}
        replies = [self._refusals(msg, tag, verdicts)] if verdicts else []
        if self._tunnel_verdicts:
            replies.append(self._tunnel_refusals(msg, tag))
        if not self.cfg.fencing:
            return replies
        if self.grant is not None and not self.grant.grant(now):
            return replies
        self.acks += 1
        return [self._reply(msg, tag, SYNC_ACK), *replies]

    def _refusals(
        self, msg: cxtp.CTD, tag: cxtp.TransferTag, verdicts: list[tuple[bytes, str]]
    ) -> cxtp.CTD:
        return cxtp.CTD(
            msg.mn_prev,
            0,
            cdbs=(
                cxtp.TransferTag(tag.transfer_id, tag.seq).encode(),
                *(refused_cdb(key, why, self.epoch) for key, why in verdicts),
            ),
        )

    def _tunnel_refusals(self, msg: cxtp.CTD, tag: cxtp.TransferTag) -> cxtp.CTD:
        """The next MAX_TUNNEL_VERDICTS changes of what this standby would not take over."""
        cdbs = []
        for spi in list(self._tunnel_verdicts)[:MAX_TUNNEL_VERDICTS]:
            why = self._tunnel_verdicts.pop(spi)
            cdbs.append(refused_cdb(spi.to_bytes(4, "big"), why, self.epoch, SYNC_TUNNEL_REFUSED))
        return cxtp.CTD(
            msg.mn_prev, 0, cdbs=(cxtp.TransferTag(tag.transfer_id, tag.seq).encode(), *cdbs)
        )

    def _tunnel_verdict(self, spi: int, why: str) -> None:
        """Would this standby take over the tunnel replica ``spi`` (``why`` "": yes)? A change
        from what it last told the active is told with its next reply."""
        if self.tunnel_refusing.get(spi, "") == why:
            return
        if why:
            self.tunnel_refusing.pop(spi, None)
            self.tunnel_refusing[spi] = why
            while len(self.tunnel_refusing) > MAX_REFUSED_KEYS:
                del self.tunnel_refusing[next(iter(self.tunnel_refusing))]
        else:
            del self.tunnel_refusing[spi]
        self._tunnel_verdicts.pop(spi, None)
        self._tunnel_verdicts[spi] = why
        while len(self._tunnel_verdicts) > MAX_REFUSED_KEYS:
            del self._tunnel_verdicts[next(iter(self._tunnel_verdicts))]

    def _outside(self, sas: list[SecurityAssociation]) -> bool:
        """Are an SA pair's selectors outside what this gateway accepts (``accept``)?"""
        return self.accept is not None and any(
            sa.selectors is not None and not sa.selectors.within(*self.accept) for sa in sas
        )

    def forget(self, member_lease: int) -> None:
        """The etcd mode: this member's lease is gone (or new): drop every replica held
        under the old one; keep only what is sent for ``member_lease`` from now on."""
        self.replica.clear()
        self.high.clear()
        self._ready.clear()
        self._dirty.clear()
        self._arrived.clear()
        self.extra.clear()
        self.marks.clear()
        self.refused.clear()
        self.refused_tunnels.clear()
        self.tunnel_refusing.clear()
        self._tunnel_verdicts.clear()
        self.last_heard = None
        self.member_lease = member_lease

    def prepare(self, max_pairs: int) -> int:
        """Decode up to ``max_pairs`` replicas that changed since they were last decoded (as
        of when they arrived), so that a take-over only installs them. Returns how many."""
        done = 0
        while self._dirty and done < max_pairs:
            spi = self._dirty.popleft()
            at = self._arrived.pop(spi)
            pair = self.replica.get(spi)
            ready = self._ready.get(spi)
            if pair is None or (ready is not None and ready[0] is pair):
                continue
            try:
                sas = [context.decode(c, at) for c in pair]
                if sas and sas[0].protocol is Protocol.ESP:
                    sas[0].transform.warm()  # the take-over's SG_UPDATE needs it at once
                self._ready[spi] = (pair, sas)
            except ContextError:
                self._ready.pop(spi, None)  # take_over counts it as unusable
                self._tunnel_verdict(spi, "its replica does not decode")
            else:  # the active is told now what a take-over would leave out
                self._tunnel_verdict(
                    spi,
                    "outside what this gateway accepts ([transfer] accept_local_ts /"
                    " accept_remote_ts)" if self._outside(sas) else "",
                )
            done += 1
        return done

    @property
    def prepared(self) -> int:
        return sum(1 for spi, (pair, _) in self._ready.items() if self.replica.get(spi) is pair)

    @property
    def unprepared(self) -> bool:
        """Replicas changed since they were last decoded (:meth:`prepare` has work)."""
        return bool(self._dirty)

    def next_deadline(self) -> float | None:
        """When the active will have been silent for ``dead_ms`` and every lease granted will
        have run out (None before the first sync and after the take-over)."""
        if self.took_over is not None or self.last_heard is None:
            return None
        d = self.last_heard + self.cfg.dead_ms / 1000
        g = self.grant.deadline() if self.grant is not None else None
        return d if g is None else max(d, g)

    def handle_timer(
        self, now: float
    ) -> tuple[list[Tunnel], list[tuple[SecurityAssociation, bytes]], Record] | None:
        """Take over if the active has been silent for ``dead_ms`` (see :meth:`take_over`)."""
        return self.take_over(now) if self.dead(now) else None

    def dead(self, now: float) -> bool:
        """Has the active been silent for ``dead_ms``, and has every lease this standby
        granted surely run out? Then it may take over."""
        deadline = self.next_deadline()  # the same arithmetic: a timer set for it finds it
        return (
            deadline is not None
            and now >= deadline
            and (self.grant is None or self.grant.expired(now))
        )

    def take_over(
        self, now: float, spis: Iterable[int] | None = None
    ) -> tuple[list[Tunnel], list[tuple[SecurityAssociation, bytes]], Record]:
        """Install every replicated tunnel (or those with these outbound SPIs: the etcd
        mode's share), outbound counters advanced by the margin.

        Returns the tunnels, the signals to send the MNs (direct identity) and a record.
        EpochExhaustedError (nothing changed) when the take-over would begin LAST_EPOCH."""
        if spis is None and last_epoch_next(self.epoch):
            raise EpochExhaustedError(last_epoch_text(self.epoch, self.cfg.peer))
        if self.grant is not None:
            if not self.grant.expired(now):
                raise IpsecctError("the active's lease may still run: not taking over")
            self.grant.close()
        if spis is not None:
            share = {s: self.replica[s] for s in spis if s in self.replica}
            for s in share:
                del self.replica[s]
            return self._install(self._whole_units(share), now)
        self.took_over = now
        self.epoch += 1
        replica, self.replica = self.replica, {}
        self._leaving_extras(replica)
        return self._install(self._whole_units(replica), now)

    def _leaving_extras(self, replica: dict[int, list[bytes]]) -> None:
        """Extra contexts (IKE SAs) whose every replicated tunnel (CHILD SA) was marked
        leaving moved with them (a transfer moves an IKE SA with all its CHILD SAs): not
        taken over. The target may run them; two gateways running one IKE SA would use its
        message IDs twice. (Their CHILD SAs are held and asked about as any marked tunnel;
        if the target did not take them they resume here without their IKE SA, and the
        client starts over with a new one.)"""
        if not self.marks or self.extra_tunnels is None:
            return
        for key in list(self.extra):
            outs = [o for o in self.extra_tunnels(self.extra[key]) if o in replica]
            if outs and all(o in self.marks for o in outs):
                del self.extra[key]

    def _whole_units(self, replica: dict[int, list[bytes]]) -> dict[int, list[bytes]]:
        """``replica`` without the tunnels of refused extra contexts (IKE SAs this standby
        could not take: their CHILD SAs are not taken either), noted in ``not_taken``."""
        self.not_taken = []
        for key, outs in self.refused_tunnels.items():
            left = sorted(o for o in outs if o in replica)
            for o in left:
                del replica[o]
            if left:
                self.not_taken.append((key, self.refused.get(key, ""), left))
        return replica

    def _own_index(self) -> OverlapIndex | None:
        """The selectors of this gateway's own tunnels (None: it has none), which a replica
        taken over must not overlap; not those it moved to the peer (forwarders of tunnels
        the peer replicated back: taking them over replaces them)."""
        index: OverlapIndex | None = None
        for e in self.engine.spd:
            t = self.engine.tunnel_of_entry(e)
            if t is None or (t.state is TunnelState.MOVED and t.forward_to == self.cfg.peer):
                continue
            index = index or OverlapIndex()
            index.add(e.selectors, t)
        return index

    def _install(
        self, replica: dict[int, list[bytes]], now: float
    ) -> tuple[list[Tunnel], list[tuple[SecurityAssociation, bytes]], Record]:
        rec = Record(
            self.seen_session or 0, "standby", self.cfg.peer, "failover", self.last_heard or now
        )
        tunnels: list[Tunnel] = []
        signals: list[tuple[SecurityAssociation, bytes]] = []
        failed = outside = overlapping = 0
        own = self._own_index()
        leaving: dict[LeavingMark, list[Tunnel]] = {}
        self.leaving_taken = []
        self.leaving_signals = {}
        for spi, pair in replica.items():
            ready = self._ready.pop(spi, None)
            try:
                sas = (
                    ready[1]
                    if ready is not None and ready[0] is pair
                    else [context.decode(c, now) for c in pair]
                )
            except ContextError:
                failed += 1
                continue
            out_sa = sas[0]
            in_sa = sas[1] if len(sas) > 1 else None
            if out_sa.direction is not Direction.OUTBOUND or out_sa.selectors is None:
                failed += 1
                continue
            if self._outside(sas):
                outside += 1
                continue
            if own is not None and any(
                own.overlapping(sl) for sl in (out_sa.selectors, in_sa and in_sa.selectors) if sl
            ):
                overlapping += 1
                continue
            high = max(out_sa.seq, self.high.pop(spi, 0))  # (never a replica's lower one)
            out_sa.seq = min(high + self.cfg.seq_margin, out_sa.seq_limit)
            mark = self.marks.get(spi)
            if mark is not None:
                # Being transferred away when the active died: its target may have it (and
                # may have sent up to the transferred number + the grant before its own
                # record). Held, never sent on, until the target says it did not take it;
                # then it resumes past both the margin and the grant.
                out_sa.seq = max(out_sa.seq, grant_ceiling(out_sa, mark.at))
            take_over_pair(out_sa, in_sa, self.endpoint, self.identity)
            entry = SPDEntry(out_sa.selectors, Action.PROTECT, name=out_sa.name, static=False)
            try:
                t = self.engine.add_tunnel(entry, out_sa, in_sa, index=0)
            except IpsecctError:
                failed += 1
                continue
            payload = (
                signalling.encode([signalling.SgUpdate(self.endpoint.host, self.endpoint.port)])
                if self.identity is Identity.DIRECT
                else None
            )
            if mark is not None:
                self.engine.hold(t)
                leaving.setdefault(mark, []).append(t)
                if payload is not None:  # sent only if it resumes here ("not taken")
                    self.leaving_signals[t] = payload
                continue
            tunnels.append(t)
            if payload is not None:
                signals.append((out_sa, payload))
        rec.tunnels = len(replica)
        rec.outcome = "took over"
        if tunnels and self.journal is not None:
            # Nothing is sent before this returns: the tunnels were installed just now, on
            # this thread. If the take-over cannot be recorded, none of them may send.
            try:
                self.journal.taken_over(tunnels, self.cfg.peer, pending=False)
            except IpsecctError as exc:
                for t in tunnels:
                    self.engine.remove_tunnel(t)
                for ts in leaving.values():
                    for t in ts:
                        self.engine.remove_tunnel(t)
                failed += len(tunnels) + sum(map(len, leaving.values()))
                tunnels, signals, leaving = [], [], {}
                rec.outcome = "refused"
                rec.detail = f"take-over not recorded: {exc}; "
        for mark, ts in leaving.items():
            if self.journal is not None:
                # Recorded leaving to the mark's target (not owned): if this gateway restarts
                # before the target answers, it asks again rather than resume them.
                try:
                    self.journal.taken_over(
                        ts, self.cfg.peer, pending=False, leaving=(mark.peer, mark.tid)
                    )
                except IpsecctError as exc:
                    for t in ts:
                        self.engine.remove_tunnel(t)
                    failed += len(ts)
                    rec.detail += f"{len(ts)} leaving tunnel(s) not recorded: {exc}; "
                    continue
            self.leaving_taken.append((mark, ts))
        rec.accepted = len(tunnels)
        rec.ended = now
        self.policy_refused += outside
        self.overlap_refused += overlapping
        rec.detail += f"{outside} tunnel(s) outside what this gateway accepts; " if outside else ""
        rec.detail += (
            f"{overlapping} tunnel(s) overlapping this gateway's own; " if overlapping else ""
        )
        rec.detail += f"{failed} context(s) unusable" if failed else ""
        rec.spis = [sa.spi for t in tunnels for sa in t.sas()]
        return tunnels, signals, rec


def _peek(cdb: bytes) -> tuple[int, bool]:
    """(SPI, inbound?) from the fixed part of a feature-context CDB (docs/context-format.md:
    header, optional presence vector, then version, protocol, flags(16), SPI(32))."""
    off = 8 if len(cdb) > 3 and cdb[3] & 0x80 else 4
    if len(cdb) < off + 8 or cxtp.cdb_fpt(cdb) != context.FPT_IPSEC_SA:
        raise CxtpError("not a feature-context CDB")
    _, _, flags, spi = struct.unpack_from("!BBHI", cdb, off)
    return int(spi), bool(flags & context.F_INBOUND)

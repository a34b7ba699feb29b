"""Context transfer between gateways (the draft, over CXTP RFC 4067): the sans-I/O protocol.

One transfer moves a set of tunnels (a policy and its SA pair each) from a *source* gateway to a
*target*. :class:`TransferCore` runs both roles; the adapter
(:mod:`ipsecct.gateway.transfer_service`) feeds it
CXTP messages, held packets and timer ticks, and carries out the outputs. Three messages make a
transfer, so that an SA is never active in two places and never lost:

1. source: holds the tunnels (the single-sender rule: from here on it neither sends nor accepts
   on them; packets that arrive are held), snapshots them (exact outbound sequence number and
   inbound replay window) and sends **PCTD** (predictive) or **CTD** (reactive, answering a
   **CT-Req**) carrying a TRANSFER tag and one feature-context CDB per SA.
2. target: checks the peer may send contexts, checks each tunnel (algorithms it supports, SPI
   collisions under its conflict policy), installs the accepted ones *held* (pending), answers
   **CTDR** with a status per tunnel (and SA_RESULT CDBs, e.g. a reassigned SPI).
3. source: for the accepted tunnels, sends the COMMIT decision, turns them into forwarders
   (traffic that still reaches it goes to the target over the protected channel for
   ``forward_time``) and forwards what it held; the rest it reactivates. On the COMMIT the
   target activates its tunnels, replays what it held, and (direct SG identity) tells the MN
   its new address inside the SA.

No CTDR within ``max_transfer_time``, a refusal, or a lost connection: the source rolls back
(reactivates the tunnels, processes the packets it held) and sends CTC. The target keeps a
pending transfer until it hears COMMIT or CTC; it re-sends its CTDR every ``retry`` seconds,
which asks the source for its decision again, and gives up after ``retry_max``. Because the
target never sends on a pending tunnel and the source never sends on a committed one, no
(key, sequence number) pair is ever used twice.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
import math
import secrets
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import (
    ContextError,
    CxtpError,
    JournalError,
    PacketError,
    SAError,
    TransferError,
    TransferStateError,
)
from ..ipsec import ippacket, signalling
from ..ipsec.algorithms import EncAlg, IntegAlg
from ..ipsec.engine import Engine, Held, ToPeer, Tunnel, TunnelState
from ..ipsec.ippacket import Endpoint, IPAddress
from ..ipsec.ratelimit import RateLimiter
from ..ipsec.sad import Direction, SecurityAssociation, UdpEncap
from ..ipsec.spd import Action, AddressRange, OverlapIndex, RangeSet, Selectors, SPDEntry
from ..ipsec.spi import SpiBlock
from . import context, cxtp
from .journal import GRANT, Journal, Write, grant_ceiling, transferred_at

FPT_DECISION = 0x8005  # COMMIT (1) or ABORT (2) of a transfer
FPT_FORWARD = 0x8006  # a packet forwarded after the cut-over
FPT_SYNC = 0x8007  # fail-over replication: heartbeat and state (see failover.py)
FPT_FINAL = 0x8008  # make-before-break: a tunnel's final state at the source (FINAL)
FPT_UNIT = 0x8009  # tunnels that move with a context of another kind (an IKE SA): UNIT
FPT_AGE = 0x800A  # decision query: how long ago the source started the transfer (AGE)
FPT_PREPARE = 0x800B  # a prepared transfer: how long the target waits for its COMMIT (PREPARE)
UNIT_IKEV2 = 1  # a UNIT's kind: the CHILD SAs of one IKE SA (its context follows the COMMIT)
DECISION_COMMIT = 1
MAX_FORWARD_PACKET = cxtp.MAX_CDB_LEN - 8
# What a FINAL message holds besides its FINAL CDBs: the header (the MN's address) and the
# TRANSFER CDB, with room to spare.
FINAL_MESSAGE_OVERHEAD = 256
MAX_NOT_TAKEN_PER_PEER = 1024  # transfers answered "not taken" remembered per peer
PREPARE_MIN, PREPARE_MAX = 2.0, 300.0  # bounds of a prepared transfer's wait (seconds)
# A prepared source commits no later than this before the wait it assumes at the target
# ends (measured from its own start, before the target's): the COMMIT's way there.
PREPARE_GUARD = 1.0


class ConflictPolicy(enum.Enum):
    """What a target does when a transferred inbound SA's SPI is taken (draft §8)."""

    DENY = "deny"
    RENEGOTIATE = "renegotiate"
    REASSIGN = "reassign"


class Identity(enum.Enum):
    """How the MN learns who serves it (draft §7.1)."""

    DIRECT = "direct"  # the MN is told the new gateway's address
    INDIRECT = "indirect"  # a virtual gateway address moves with the SAs


@dataclass
class Settings:
    conflict: ConflictPolicy = ConflictPolicy.REASSIGN
    identity: Identity = Identity.DIRECT
    max_transfer_time: float = cxtp.CT_MAX_TRANSFER_TIME_MS / 1000
    retry: float = cxtp.CT_REQUEST_RETRY_MS / 1000
    retry_max: float = cxtp.CT_RETRY_MAX_MS / 1000
    forward_time: float = cxtp.CT_MAX_HANDOVER_TIME_MS / 1000
    supported_enc: frozenset[EncAlg] = frozenset(EncAlg)
    supported_integ: frozenset[IntegAlg] = frozenset(IntegAlg)
    path_mtu: int | None = None  # this gateway's path MTU for installed SAs (None: keep)
    max_held: int = 20000  # packets held per transfer before new ones are dropped
    max_held_bytes: int = 32 << 20  # ... and octets held per transfer
    held_per_tunnel: int = 1024  # packets held per tunnel
    held_bytes_per_tunnel: int = 2 << 20  # octets held per tunnel
    # What the operator lets a peer hand over: a transferred tunnel's local and remote
    # selectors must lie inside these ranges. None: no restriction (the gateway's
    # configuration always sets them; see ipsecct.gateway's [transfer] accept_local_ts).
    accept_local: tuple[AddressRange, ...] | None = None
    accept_remote: tuple[AddressRange, ...] | None = None
    # Set by the operator ([transfer] accept_local_ts / accept_remote_ts), not defaulted from
    # this gateway's own tunnels: a fail-over take-over is held to them too (take_over_accept).
    accept_configured: bool = False
    max_incoming_per_peer: int = 4  # transfers from one peer being received or pending
    max_contexts_per_message: int = 1024  # CDBs in one PCTD/CTD
    max_contexts_per_transfer: int = 40000  # CDBs in one transfer (two per tunnel)
    max_transfer_octets: int = 16 << 20  # octets of CDBs buffered for one transfer
    # Messages of one peer remembered for replay protection (2 x retry_max each): past it
    # the peer's messages are dropped (counted over_limit), so that a peer sending fresh
    # tags (PREPAREs, COMMITs, CTCs of transfers that do not exist) cannot grow it unbounded.
    max_seen_per_peer: int = 65536
    # Cluster-unique SPIs (ipsecct.ipsec.spi): a reassigned inbound SPI comes from this block.
    spi_block: SpiBlock | None = None
    # Make-before-break (docs/cxtp.md): the source goes on sending and receiving on its
    # tunnels while the transfer runs, sending no outbound number above its number at the
    # start + ``mbb_margin`` (the target starts past that), and hands over its final
    # anti-replay state with the COMMIT. False: the tunnels are held from the start.
    make_before_break: bool = False
    mbb_margin: int = 1 << 16
    # ... and after its COMMIT keeps the next ``mbb_tail`` numbers (at most up to the cap)
    # for what still reaches it from the inner side: it sends those to the MN itself rather
    # than forwarding them to the target, and its FINAL announces the last of them as its
    # last number, so the target starts past them. 0: everything is forwarded.
    mbb_tail: int = 0
    # "Commit what you accept" (docs/cxtp.md): the source sends its COMMIT as soon as its
    # "leaving" rows are durable, without waiting for the CTDR, which then only names the
    # tunnels the target refused (never activated there): the source takes those back.
    # False: the COMMIT follows the CTDR and names what it accepted.
    commit_early: bool = False
    # The grant (docs/state.md): the COMMIT that follows the CTDR lets the target send up to
    # each tunnel's transferred number + journal.GRANT before its own "pending" row is
    # durable (its "leaving" rows reserved that far). Only with a journal that reserves it
    # (``reserves_grant``). False (the default, as the gateway's): the target activates once
    # its "pending" row is durable.
    grant: bool = False
    # Prepared transfers (docs/cxtp.md, "Prepared transfers"): how long a source keeps a
    # transfer prepared (everything done but the COMMIT) waiting for its commit call, and
    # the longest a target waits for such a transfer's COMMIT (PREPARE_MIN .. PREPARE_MAX).
    prepare_timeout: float = 30.0
    # Fail-over pairs among the peers (``[[peers]] pair``): per peer, the peers whose
    # transfers it may ask about with a decision query (the standby of a source that died
    # while transferring asks in its place: docs/cluster.md). Any other peer is answered
    # only about its own transfers (docs/security.md, "messages bound to their peer").
    pairs: Mapping[str, frozenset[str]] = field(default_factory=dict)


# Messages about a transfer that is another peer's, dropped and counted per kind
# (``foreign_<kind>`` in the counters): see TransferCore._foreign.
FOREIGN_KINDS = ("commit", "final", "cancel", "ctdr", "query", "answer", "data", "prepare")


# -- outputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    peer: str
    msg: cxtp.Message


@dataclass(frozen=True)
class Inject:
    """Hand a held packet back to the engine (after a rollback, or on the target's commit)."""

    packet: bytes
    inbound: bool


@dataclass(frozen=True)
class Transmit:
    """Send an ESP packet (a signal to the MN) on an SA."""

    sa: SecurityAssociation
    data: bytes | bytearray


@dataclass
class Record:
    """One finished (or failed) transfer, for ``ipsecct status`` and the demo."""

    transfer_id: int
    role: str  # "source" or "target"
    peer: str
    mode: str
    started: float
    ended: float = 0.0
    outcome: str = "in progress"
    tunnels: int = 0
    accepted: int = 0
    detail: str = ""
    spis: list[int] = field(default_factory=list)
    # A prepared transfer whose commit was asked for before it was ready: when (0: not so).
    # Its COMMIT waited for the preparation; one asked for once ready goes at once, in the
    # same step: nothing to time at this end.
    committing: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        extra = {}
        if self.committing and self.ended:
            # (a prepared transfer's "ms" runs from its preparation; this from its trigger)
            extra["commit_ms"] = round(max(0.0, self.ended - self.committing) * 1000, 3)
        return {
            "id": f"{self.transfer_id:016x}",
            "role": self.role,
            "peer": self.peer,
            "mode": self.mode,
            "outcome": self.outcome,
            "tunnels": self.tunnels,
            "accepted": self.accepted,
            "ms": round((self.ended - self.started) * 1000, 3),
            "detail": self.detail,
            **extra,
        }


@dataclass(frozen=True)
class Finished:
    record: Record


@dataclass(frozen=True)
class Prepared:
    """A prepared transfer is ready: only its COMMIT is left (:meth:`TransferCore.commit`)."""

    record: Record


@dataclass(frozen=True)
class After:
    """Work of the core's that nothing before it waits for, done once the outputs before it
    have been carried out (in order, in the same turn, before any other input reaches the
    core): the source's "leaving" record after its contexts and its "given away" record
    after its FINAL and COMMIT, so that building their rows does not delay them. An adapter
    that drops it loses only that work: a "given away" never submitted leaves the tunnels
    "leaving", which a restarted source resolves by asking the peer, as after a crash before
    the write lands; a "leaving" never submitted leaves the COMMIT waiting for it until the
    transfer times out and rolls back."""

    run: Callable[[], None]


@dataclass(frozen=True)
class Aftermath:
    """What the target does once a COMMIT has activated its tunnels, after the outputs that
    put them in service (their MN's signal, the packets held for them): the "taken over"
    write and the finished record. Neither is needed before a packet is sealed or opened on
    the tunnels (the "pending" row and the first block, which the invariant needs, were
    durable before the activation, or the COMMIT's grant covers the numbers up to them), so
    an adapter may carry ``outputs`` out later than the outputs around it: after the
    forwarded packets that reach it meanwhile (FORWARD messages, whose handling only
    injects packets) and the engine's own packets, so that those leave in the activation's
    turn, but before any other input reaches the core and before any other journal write
    (its order on disk is the order of the outputs). Carried out in order, at once, by an
    adapter that does not defer it."""

    outputs: tuple[Send | Inject | Transmit | Finished | Prepared | After, ...]


Output = Send | Inject | Transmit | Finished | Prepared | After | Aftermath


_ENCAPS: dict[tuple[int, int], UdpEncap] = {}


# At most this many tunnels of one transfer have their inbound SA handed to the native path
# as the target activates them (Engine.offload_inbound); more wait for their first packets.
OFFLOAD_AT_ACTIVATION = 16


def _encap(sport: int, dport: int) -> UdpEncap:
    """The (immutable) UdpEncap of these ports, shared: a bulk transfer re-addresses thousands
    of SAs, most of them to the same few ports."""
    e = _ENCAPS.get((sport, dport))
    if e is None:
        if len(_ENCAPS) >= 4096:
            _ENCAPS.clear()
        e = _ENCAPS[(sport, dport)] = UdpEncap(sport, dport)
    return e


def take_over_pair(
    out_sa: SecurityAssociation,
    in_sa: SecurityAssociation | None,
    endpoint: Endpoint,
    identity: Identity,
    *,
    path_mtu: int | None = None,
) -> None:
    """Make an SA pair that another gateway used this gateway's own, before it is installed:
    the one function a transfer's target and a fail-over's standby both use.

    Direct identity (draft §7.1): the MN is told our address, so the outbound SA is sent from
    it and the inbound SA is addressed to it, and the UDP encapsulation's local port (source
    port out, destination port in) becomes ours. Indirect identity: the virtual address moves
    with the SAs, nothing changes. ``path_mtu`` replaces the transferred path MTU (this
    gateway's path is not the old one's)."""
    if identity is Identity.DIRECT:
        out_sa.src = endpoint.host
        if out_sa.encap is not None:
            out_sa.encap = _encap(endpoint.port, out_sa.encap.dport)
        if in_sa is not None:
            in_sa.dst = endpoint.host
            if in_sa.encap is not None:
                in_sa.encap = _encap(in_sa.encap.sport, endpoint.port)
    if path_mtu is not None:
        for sa in (out_sa, in_sa):
            if sa is not None:
                sa.path_mtu = path_mtu
                sa.pmtu_expires = None


def token_key(tunnel_or_sas: Tunnel | Iterable[SecurityAssociation]) -> bytes:
    """The key an MN and its gateway share for RFC 4067's authorization token, derived from the
    keys of the MN's SA pair (both ends hold them): HKDF-SHA256 over the keys of the SA from MN
    to gateway, then of the SA from gateway to MN."""
    sas = tunnel_or_sas.sas() if isinstance(tunnel_or_sas, Tunnel) else list(tunnel_or_sas)
    # Order: the SA whose SPI the gateway chose (gateway inbound = MN outbound) first, which
    # both sides can tell apart by comparing SPIs (lower first) without knowing roles.
    material = b"".join(
        sa.enc_key + sa.integ_key
        for sa in sorted(sas, key=lambda s: (s.spi, s.enc_key + s.integ_key))
    )
    return HKDF(hashes.SHA256(), 20, None, b"ipsecct ctar token").derive(material)


def frame(fpt: int, payload: bytes) -> bytes:
    total = 4 + len(payload)
    total += -total % 8
    if total > cxtp.MAX_CDB_LEN:
        raise CxtpError("CDB too long")
    return struct.pack("!HBB", fpt, total // 8, 0) + payload + bytes(total - 4 - len(payload))


def unframe(cdb: bytes) -> bytes:
    return cdb[4:]


def forward_cdb(packet: bytes, inbound: bool) -> bytes:
    return frame(FPT_FORWARD, struct.pack("!BxH", 1 if inbound else 0, len(packet)) + packet)


def parse_forward(cdb: bytes) -> tuple[bytes, bool]:
    p = unframe(cdb)
    if len(p) < 4:
        raise CxtpError("FORWARD CDB too short")
    inbound, n = struct.unpack_from("!BxH", p)
    if inbound not in (0, 1) or 4 + n > len(p) or any(p[4 + n :]):
        raise CxtpError("FORWARD CDB malformed")
    return bytes(p[4 : 4 + n]), bool(inbound)


def unit_cdb(kind: int, out_spis: list[int], payload: bytes) -> bytes:
    """A UNIT CDB (in a PCTD or the CTD of a pull, after the SA contexts): ``Kind (8) |
    Count (8) | PayloadLen (16) | Out SPI (32) x Count | payload``. The tunnels whose
    outbound SPIs (as transferred) it lists go with a context of ``kind`` that the target
    must be able to take too (``payload`` says what it needs: for an IKE SA, its connection
    and CHILD configurations by name): all of them, or none."""
    if not 0 < len(out_spis) < 256 or len(payload) > 0xFFFF:
        raise CxtpError("UNIT CDB: 1 to 255 tunnels")
    body = struct.pack("!BBH", kind, len(out_spis), len(payload))
    return frame(FPT_UNIT, body + struct.pack(f"!{len(out_spis)}I", *out_spis) + payload)


def parse_unit(cdb: bytes) -> tuple[int, list[int], bytes]:
    """(kind, outbound SPIs, payload) of a UNIT CDB; CxtpError when it is malformed."""
    p = unframe(cdb)
    if len(p) < 4:
        raise CxtpError("UNIT CDB too short")
    kind, n, plen = struct.unpack_from("!BBH", p)
    end = 4 + 4 * n + plen
    if n == 0 or end > len(p) or len(p) - end >= 8 or any(p[end:]):
        raise CxtpError("UNIT CDB malformed")
    return kind, list(struct.unpack_from(f"!{n}I", p, 4)), bytes(p[4 + 4 * n : end])


GRANT_LOG2 = GRANT.bit_length() - 1


def decision_cdb(decision: int, *, grant: bool = False) -> bytes:
    """DECISION: ``Decision (8) | Grant (8) | Reserved (16)``. Grant: 0, or the base-2
    logarithm of the numbers past each tunnel's transferred number that the source reserved
    for the target (docs/cxtp.md; a target of an older ipsecct ignores the octet)."""
    return frame(FPT_DECISION, bytes([decision, GRANT_LOG2 if grant else 0, 0, 0]))


def parse_grant(cdb: bytes) -> int:
    """The grant a DECISION CDB carries (0: none), at most this gateway's GRANT (the most its
    own "pending" rows reserve); malformed or out of range: none."""
    try:
        body = unframe(cdb)
    except CxtpError:
        return 0
    if len(body) != 4 or body[0] != DECISION_COMMIT or not 1 <= body[1] <= 63:
        return 0
    return min(1 << body[1], GRANT)


def age_cdb(seconds: float) -> bytes:
    """AGE (in a decision query): ``Seconds (32)``, how long ago the asking source recorded
    the transfer's tunnels leaving, by its own clock, rounded up (saturating)."""
    return frame(FPT_AGE, struct.pack("!I", min(0xFFFFFFFF, max(0, math.ceil(seconds)))))


def parse_age(ext: Iterable[bytes]) -> float | None:
    """The AGE of a decision query's extension CDBs (after its TRANSFER CDB); None when it
    has none, or one that is malformed (then the target assumes the worst)."""
    for c in ext:
        if cxtp.cdb_fpt(c) == FPT_AGE:
            try:
                p = unframe(c)
            except CxtpError:
                return None
            if len(p) != 4:
                return None
            return float(struct.unpack("!I", p)[0])
    return None


def prepare_cdb(seconds: int) -> bytes:
    """PREPARE: ``Seconds (32)``. From the source (after its contexts): the transfer is
    prepared ahead, the COMMIT may come up to that long after; from the target (its answer):
    how long it will wait for that COMMIT, from when the PREPARE reached it."""
    return frame(FPT_PREPARE, struct.pack("!I", min(0xFFFFFFFF, max(0, seconds))))


def parse_prepare(cdb: bytes) -> float:
    """The seconds of a PREPARE CDB; CxtpError when it is malformed."""
    p = unframe(cdb)
    if len(p) != 4:
        raise CxtpError("PREPARE CDB malformed")
    return float(struct.unpack("!I", p)[0])


def final_cdb(out_spi: int, in_spi: int, out_seq: int, top: int, bitmap: bytes) -> bytes:
    """A tunnel's final state at the source (make-before-break): ``Out SPI (32) | In SPI
    (32, 0: no inbound SA) | Out Seq (64): the last number it sent | Top (64, 0: no replay
    state) | bitmap`` (the inbound SA's window, empty when Top is 0), SPIs as transferred."""
    return frame(FPT_FINAL, struct.pack("!IIQQ", out_spi, in_spi, out_seq, top) + bitmap)


def parse_final(cdb: bytes, size: int) -> tuple[int, int, int, int, bytes]:
    """(out SPI, in SPI, out seq, top, bitmap) of a FINAL CDB whose inbound window has
    ``size`` bits; the padding must be zero. CxtpError when it is malformed."""
    p = unframe(cdb)
    if len(p) < 24:
        raise CxtpError("FINAL CDB too short")
    out_spi, in_spi, out_seq, top = struct.unpack_from("!IIQQ", p)
    n = size // 8 if top else 0
    if len(p) < 24 + n or any(p[24 + n :]) or len(p) - 24 - n >= 8:
        raise CxtpError("FINAL CDB malformed")
    return out_spi, in_spi, out_seq, top, bytes(p[24 : 24 + n])


# -- state ---------------------------------------------------------------------------------
# SA_RESULT CDBs (32 octets at most) a decision query's answer carries at most.
MAX_REFUSED_IN_ANSWER = 1500


@dataclass(frozen=True)
class LeavingMark:
    """A tunnel being transferred away: to ``peer`` by transfer ``tid``, at number ``at``
    (its cap with make-before-break, else its counter when the transfer started). A
    fail-over standby holds its replica so marked before the COMMIT leaves
    (:attr:`TransferCore.standby_gate`, docs/cluster.md)."""

    tid: int
    peer: str
    at: int


class OutgoingState(enum.Enum):
    """A transfer this gateway started (source)."""

    SENT = "sent"  # contexts sent, tunnels held, waiting for the CTDR
    # commit_early: COMMIT sent for every tunnel (they moved), waiting for the CTDR to learn
    # which the target refused (those come back here)
    AWAITING = "awaiting"
    # a prepared transfer: CTDR in, "leaving" durable, the standby told; only the COMMIT is
    # left, sent when the operator commits (the tunnels send below their caps meanwhile)
    PREPARED = "prepared"
    COMMITTED = "committed"  # COMMIT sent: the tunnels live at the target now
    ABORTED = "aborted"  # rolled back (refused, timed out, peer lost, cancelled)


class IncomingState(enum.Enum):
    """A transfer towards this gateway (target)."""

    RECEIVING = "receiving"  # contexts arriving
    PENDING = "pending"  # installed held, CTDR sent, waiting for COMMIT or CTC
    ACTIVE = "active"  # committed: the tunnels carry traffic here
    CANCELLED = "cancelled"  # refused, cancelled, expired (remembered for a while)


# A target's policy for one install: the accepted (local, remote) ranges (None: no limit)
# and what was decided so far per Selectors object.
_Accept = tuple[tuple[RangeSet, RangeSet] | None, dict[int, bool]]


def take_over_accept(s: Settings | None) -> tuple[RangeSet, RangeSet] | None:
    """What a fail-over take-over installs tunnels inside: the ranges the operator set for
    transfers ([transfer] accept_local_ts / accept_remote_ts); None (no limit) when they are
    only defaulted from this gateway's own tunnels: a standby with none, or a cluster member
    whose tunnels are not its peers', takes every replica over as before."""
    return accept_ranges(s) if s is not None and s.accept_configured else None


def accept_ranges(s: Settings) -> tuple[RangeSet, RangeSet] | None:
    """The local and remote ranges the operator lets peers hand over (None: no limit): what
    a transfer's target, and a fail-over standby's take-over, install tunnels inside."""
    if s.accept_local is None and s.accept_remote is None:
        return None
    return RangeSet(s.accept_local or ()), RangeSet(s.accept_remote or ())

OPEN_INCOMING = (IncomingState.RECEIVING, IncomingState.PENDING)  # not decided yet

# The only changes of a transfer's state, made by _move.
TRANSITIONS: frozenset[tuple[enum.Enum, enum.Enum]] = frozenset(
    {
        (OutgoingState.SENT, OutgoingState.COMMITTED),
        (OutgoingState.SENT, OutgoingState.ABORTED),
        (OutgoingState.SENT, OutgoingState.AWAITING),
        (OutgoingState.SENT, OutgoingState.PREPARED),
        (OutgoingState.PREPARED, OutgoingState.COMMITTED),
        (OutgoingState.PREPARED, OutgoingState.ABORTED),
        (OutgoingState.AWAITING, OutgoingState.COMMITTED),
        (IncomingState.RECEIVING, IncomingState.PENDING),
        (IncomingState.RECEIVING, IncomingState.CANCELLED),
        (IncomingState.PENDING, IncomingState.ACTIVE),
        (IncomingState.PENDING, IncomingState.CANCELLED),
    }
)


def _move(x: _Outgoing | _Incoming, to: OutgoingState | IncomingState) -> None:
    """The one place a transfer's state changes, checked against TRANSITIONS (a change
    outside it is a bug: TransferStateError)."""
    if (x.state, to) not in TRANSITIONS:
        raise TransferStateError(
            f"transfer {x.tid:016x}: {x.state.value} -> {to.value} is not allowed"
        )
    x.state = to


# The tunnels of a transfer as a set, for finding a held packet's transfer without walking
# every transfer's list: (the list it was made from, its length then, the set). A transfer's
# ``tunnels`` list is only ever replaced or appended to, so that pair says when it is stale.
_Members = tuple[list[Tunnel], int, set[Tunnel]]


def _cancelled(inc: _Incoming) -> bool:
    return inc.state is IncomingState.CANCELLED


def _has(owner: _Outgoing | _Incoming | _Reverting, tunnel: Tunnel) -> bool:
    tunnels = owner.tunnels
    m = owner.members
    if m is None or m[0] is not tunnels or m[1] != len(tunnels):
        m = owner.members = (tunnels, len(tunnels), set(tunnels))
    return tunnel in m[2]


@dataclass
class _Outgoing:
    tid: int
    peer: str
    tunnels: list[Tunnel]
    mn: IPAddress
    deadline: float
    record: Record
    candidates: list[str]
    held: list[Held] = field(default_factory=list)
    held_bytes: int = 0
    held_per_tunnel: dict[Tunnel, tuple[int, int]] = field(default_factory=dict)
    # the held ESP of each tunnel by its first 8 octets (SPI, sequence number): _keep
    held_esp: set[tuple[Tunnel, bytes]] = field(default_factory=set, repr=False)
    seq: int = 0
    state: OutgoingState = OutgoingState.SENT
    # Status per outbound SA of the transfer, over the CTDRs, by its SAD triple (protocol,
    # SPI, destination): an SPI alone may also be another tunnel's inbound SA's (outbound
    # SPIs are the MNs' choice, inbound ones ours), whose SA_RESULT must not stand for it.
    results: dict[tuple[int, int, IPAddress], int] = field(default_factory=dict)
    # "Given away", submitted when the CTDR accepted ``away_tunnels``; the COMMIT waits for
    # it (the target's "pending" is being written meanwhile).
    away: Write | None = None
    away_tunnels: list[Tunnel] = field(default_factory=list)
    # The CTDR's answer, while the COMMIT waits for ``away`` (None: no answer yet).
    answer: tuple[list[Tunnel], list[Tunnel], int] | None = None
    # Make-before-break: each tunnel's cap (it sends no number above it; the target starts
    # past it). Empty: the tunnels are held.
    caps: dict[Tunnel, int] = field(default_factory=dict)
    members: _Members | None = field(default=None, repr=False, compare=False)
    out_keys: set[tuple[int, int, IPAddress]] | None = field(default=None, repr=False)
    # The fail-over standby acknowledged that it holds the tunnels marked leaving by this
    # transfer (to this peer), or not at all: the COMMIT waits for it as for ``away``.
    standby: Write | None = None
    # A prepared transfer (start(prepare=True)): how long the target waits for the COMMIT
    # (the PREPARE answer's; until it comes, what an older target waits: retry_max), whether
    # the operator committed already (it commits once ready), and the tunnels refused by
    # the CTDR (rolled back when it came).
    prepare: bool = False
    prepare_wait: float = 0.0
    commit_asked: bool = False
    refused_early: int = 0


@dataclass
class _Reverting:
    """Tunnels of a transfer that did not commit, recorded "given away" already: held until
    "owned" again is on stable storage (``write``), then active here again."""

    tid: int
    tunnels: list[Tunnel]
    write: Write
    held: list[Held] = field(default_factory=list)
    # The fail-over standby acknowledged that it holds them unmarked (no longer leaving)
    # or not at all: until then it could ask the target about them after a take-over, and
    # the target could take them (docs/cluster.md).
    standby: Write | None = None
    held_bytes: int = 0
    held_per_tunnel: dict[Tunnel, tuple[int, int]] = field(default_factory=dict)
    # the held ESP of each tunnel by its first 8 octets (SPI, sequence number): _keep
    held_esp: set[tuple[Tunnel, bytes]] = field(default_factory=set, repr=False)
    members: _Members | None = field(default=None, repr=False, compare=False)
    # In-SA signals (payloads) to send once active again: a fail-over standby's tunnels
    # resumed after "not taken" tell their MN the new address then.
    signals: dict[Tunnel, bytes] = field(default_factory=dict, repr=False)


@dataclass
class _Unresolved:
    """After a restart: tunnels recorded "leaving" by transfer ``tid`` to ``peer``, whose
    outcome this gateway does not know. Held (never sent on) until ``peer`` answers the
    decision query sent every ``retry``: taken (they go away) or not taken ("owned" again,
    durable, then active)."""

    tid: int
    peer: str
    tunnels: list[Tunnel]
    mn: IPAddress
    since: float
    next_query: float = 0.0
    queries: int = 0
    # how long before ``since`` the tunnels were recorded leaving (None: unknown)
    age: float | None = None
    # Not a restart: a transfer whose COMMIT went out before its CTDR came (commit_early),
    # then the peer was lost or did not answer in time. Its tunnels are moved (forwarders),
    # never sent on here until the peer's answer says which it refused.
    og: _Outgoing | None = None
    members: set[Tunnel] = field(default_factory=set, repr=False, compare=False)
    # In-SA signals for the tunnels that resume here ("not taken"): see _Reverting.
    signals: dict[Tunnel, bytes] = field(default_factory=dict, repr=False)


class _NotTaken:
    """Transfers answered "not taken" (target), remembered per asker (at most ``per_peer``
    each, the oldest forgotten first: a peer that floods queries evicts only its own) until
    their time: each refuses the late data messages of its id from the peers it names
    (``None``: from any peer)."""

    def __init__(self, per_peer: int) -> None:
        self.per_peer = per_peer
        self.by_asker: dict[str, dict[int, tuple[float, frozenset[str] | None]]] = {}
        self.askers: dict[int, set[str]] = {}  # who asked about each id

    def __len__(self) -> int:
        return sum(len(m) for m in self.by_asker.values())

    def __bool__(self) -> bool:
        return bool(self.by_asker)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        return key[1] in self.by_asker.get(key[0], {})

    def add(self, asker: str, tid: int, until: float, scope: frozenset[str] | None) -> None:
        mine = self.by_asker.setdefault(asker, {})
        mine.pop(tid, None)  # (asked again: the newest)
        while len(mine) >= self.per_peer:
            self._drop(asker, next(iter(mine)))
        mine[tid] = (until, scope)
        self.askers.setdefault(tid, set()).add(asker)

    def refuses(self, peer: str, tid: int) -> bool:
        """Whether a data message of transfer ``tid`` from ``peer`` is refused."""
        for asker in self.askers.get(tid, ()):
            scope = self.by_asker[asker][tid][1]
            if scope is None or peer in scope:
                return True
        return False

    def expire(self, now: float) -> None:
        for asker, mine in list(self.by_asker.items()):
            for tid, (until, _) in list(mine.items()):
                if now >= until:
                    self._drop(asker, tid)

    def _drop(self, asker: str, tid: int) -> None:
        mine = self.by_asker[asker]
        del mine[tid]
        if not mine:
            del self.by_asker[asker]
        left = self.askers[tid]
        left.discard(asker)
        if not left:
            del self.askers[tid]


class _Ids:
    """A bounded set of transfers, (peer, transfer id) (the oldest forgotten first), with
    the peers of each id (ids are the source's choice: two peers may name the same one)."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self.order: deque[tuple[str, int]] = deque()
        self.peers: dict[int, list[str]] = {}

    def remember(self, key: tuple[str, int]) -> None:
        peer, tid = key
        if peer in self.peers.get(tid, ()):
            return
        if len(self.order) >= self.limit:
            old_peer, old_tid = self.order.popleft()
            left = self.peers[old_tid]
            left.remove(old_peer)
            if not left:
                del self.peers[old_tid]
        self.order.append(key)
        self.peers.setdefault(tid, []).append(peer)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        return key[0] in self.peers.get(key[1], ())

    def peers_of(self, tid: int) -> list[str]:
        """The peers transfer ``tid`` arrived from."""
        return list(self.peers.get(tid, ()))


@dataclass
class _Incoming:
    tid: int
    peer: str
    mn: IPAddress
    record: Record
    cdbs: list[bytes] = field(default_factory=list)
    tunnels: list[Tunnel] = field(default_factory=list)
    signals: dict[int, list[signalling.SignalItem]] = field(default_factory=dict)
    held: list[Held] = field(default_factory=list)
    held_bytes: int = 0
    held_per_tunnel: dict[Tunnel, tuple[int, int]] = field(default_factory=dict)
    # the held ESP of each tunnel by its first 8 octets (SPI, sequence number): _keep
    held_esp: set[tuple[Tunnel, bytes]] = field(default_factory=set, repr=False)
    ctdrs: list[cxtp.CTDR] = field(default_factory=list)
    next_retry: float = 0.0
    give_up: float = 0.0
    state: IncomingState = IncomingState.RECEIVING
    seq: int = 0
    octets: int = 0  # of the CDBs received so far
    # "Pending" and the first block, submitted at install: the tunnels are activated only
    # once it is done. ``committing``: the COMMIT came and waits for it.
    recorded: Write | None = None
    committing: bool = False
    # The grant: each outbound SA's transferred number (by id), and whether the COMMIT
    # activated the tunnels under the grant before ``recorded`` was done ("taken over" is
    # submitted once it is; if it fails they are taken out of service).
    transferred: dict[int, int] = field(default_factory=dict)
    granted: bool = False
    # SA pairs by (outbound SPI, inbound SPI or 0) as transferred: where the source's final
    # states (make-before-break) go.
    pairs: dict[
        tuple[int, int], tuple[SecurityAssociation, SecurityAssociation | None]
    ] = field(default_factory=dict)
    members: _Members | None = field(default=None, repr=False, compare=False)
    # The SPD entries this transfer installed, by id(), with the outer address of their peer
    # (the MN): tunnels of one MN in one transfer (the CHILD SAs of one IKE SA) may overlap
    # each other as they did at the source; nothing else may.
    own: dict[int, tuple[SPDEntry, IPAddress]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # The source prepared it (PREPARE): it waits for the COMMIT until ``give_up``.
    prepared: bool = False


def _arrived(tunnels: list[Tunnel], inc: _Incoming) -> Callable[[Journal], Write]:
    """The "taken over" write of ``tunnels`` of ``inc``, for :meth:`TransferCore._journal_write`."""
    return lambda j: j.arrived(tunnels, inc.peer, inc.tid)


def _overlaps(inc: _Incoming, found: list[object], mn: IPAddress) -> bool:
    """Does any of ``found`` (tunnels here, or entries of the install so far) stand for a
    tunnel that a transferred one to ``mn`` must not overlap? Only this transfer's own tunnels
    to the same MN may be overlapped."""
    for item in found:
        entry = item.entry if isinstance(item, Tunnel) else item
        mine = inc.own.get(id(entry))
        if mine is None or mine[0] is not entry or mine[1] != mn:
            return True
    return False


# One transferred tunnel's outcome at the target: (outbound SA, inbound SA, status, the
# inbound SPI it was reassigned to, the inbound SPI as transferred).
_Outcome = tuple[SecurityAssociation, SecurityAssociation | None, int, int | None, int]


def _sa_key(sa: SecurityAssociation) -> tuple[int, int, int, int]:
    """An SA's SAD key (outer destination, protocol, SPI) as integers: hashed without the
    address's Python-level hash."""
    dst: Any = sa.dst  # (version and int() of an address are Python-level calls: see spd)
    return (dst._version, dst._ip, int(sa.protocol), sa.spi)


@dataclass
class _Batch:
    """Tunnels of one install that passed every check and wait to be added together (one
    engine call, :meth:`TransferCore._flush`). ``keys``: their SAs' (destination, protocol,
    SPI), which later tunnels of the install must not take either; ``failed``: id() of the
    outbound SAs the engine refused after all."""

    items: list[tuple[SPDEntry, SecurityAssociation, SecurityAssociation | None]] = field(
        default_factory=list
    )
    signals: list[list[signalling.SignalItem]] = field(default_factory=list)
    keys: set[tuple[int, int, int, int]] = field(default_factory=set)  # see _sa_key
    out_spis: set[int] = field(default_factory=set)  # their outbound SAs' SPIs
    failed: set[int] = field(default_factory=set)
    # The signals of a tunnel that needs only the new address (direct identity): one list
    # shared by all of them (never changed once made).
    sg_only: list[signalling.SignalItem] | None = None


class TransferCore:
    """Both roles of context transfer for one gateway, over its :class:`Engine`."""

    def __init__(
        self,
        engine: Engine,
        endpoint: Endpoint,
        settings: Settings | None = None,
        *,
        rng: Callable[[int], int] = secrets.randbits,
        on_install: Callable[[Tunnel], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.engine = engine
        # Makes ownership changes durable before they take effect (gateway/state.py), off
        # the critical path where that is safe: the source submits "given away" when the
        # CTDR accepts the tunnels and sends the COMMIT once it is durable; the target submits
        # "pending" (with a reservation past the transferred sequence number) when it installs
        # them, answers at once, and activates them once it is durable; "owned" at the commit is
        # not waited for. After a call to the journal the adapter calls settled() when
        # writes are done. None: nothing is recorded (in-process tests).
        self.journal = journal
        self.reverting: list[_Reverting] = []  # tunnels waiting to be owned here again
        # Source, after a restart: transfers recorded "leaving" whose outcome is unknown.
        self.unresolved: dict[int, _Unresolved] = {}
        # Target: transfers whose tunnels were installed here (in memory; the journal keeps
        # them across restarts), and transfers answered "not taken", per asker, whose late
        # data messages are refused for a while.
        self._arrivals = _Ids()
        self.not_taken = _NotTaken(MAX_NOT_TAKEN_PER_PEER)
        # Target: transfers activated under a COMMIT's grant, their "pending" row not yet
        # settled (see _grant).
        self._granted: list[_Incoming] = []
        # Source: the FINAL messages (make-before-break) sent ahead of each decided COMMIT,
        # repeated with it when the target asks again (the first pair lost with the channel:
        # without them the target's inbound window missed what we accepted after the
        # preparation's snapshot, and took those packets again). Kept as long as ``decided``.
        self._finals: dict[int, list[cxtp.CTD]] = {}
        self._unawaited: list[Write] = []  # "owned" and "cancelled" writes, for the counters
        self.endpoint = endpoint
        self.settings = settings or Settings()
        self.rng = rng
        self.on_install = on_install
        self.outgoing: dict[int, _Outgoing] = {}
        self.incoming: dict[tuple[str, int], _Incoming] = {}
        # The incoming transfers still open (receiving or pending), a subset of ``incoming``:
        # the decided ones stay known there for up to a minute (60 s after a discard), and
        # the deadline and settle walks, made after every message, would walk them all (one
        # per handover of the last minute). ``_closed_due``: no decided one is to be
        # forgotten before it (a lower bound; exact again after each timer's walk).
        self._open_incoming: dict[tuple[str, int], _Incoming] = {}
        self._closed_due = math.inf
        self._incoming_peers: dict[int, list[str]] = {}  # the peers of each id in incoming
        self.decided: dict[int, tuple[int, float]] = {}  # tid -> (decision, until)
        # ... and the peer each was decided with (none after a restart: recall_commits):
        # a CTDR about it from another peer is not answered with our decision.
        self.decided_peer: dict[int, str] = {}
        self.records: deque[Record] = deque(maxlen=1000)
        self.seen: dict[tuple[str, int, int], float] = {}  # replay protection
        self._seen_of: dict[str, int] = {}  # entries of ``seen`` per peer (bounded)
        self.ctar_seq: dict[IPAddress, int] = {}  # highest CTAR/CT-Req sequence per MN
        self.counters = {
            "refused": 0,
            "replayed": 0,
            "malformed": 0,
            "forwarded": 0,
            "held_refused": 0,  # packets of held tunnels over the queue bounds
            "held_duplicate": 0,  # ESP of held tunnels already held (replays): dropped
            "forward_refused": 0,  # FORWARDs for no tunnel this peer moved here just now
            "policy_refused": 0,  # transferred tunnels outside this gateway's policy
            "unit_refused": 0,  # units (an IKE SA with its CHILD SAs) this gateway cannot take
            "over_limit": 0,  # transfers or contexts beyond a peer's limits
            "expired": 0,  # incoming transfers that never finished
            "ctar_limited": 0,  # CTARs and CT-Reqs over their rate
            "unrecorded": 0,  # commits whose "taken over" could not be written
            # transfers refused at their start, or rolled back before their COMMIT, because
            # what follows the COMMIT could not (commit_check: an IKE SA that cannot move)
            "commit_refused": 0,
            "granted": 0,  # transfers activated under a COMMIT's grant, before "pending"
            "unresolved_dropped": 0,  # packets of tunnels whose transfer's outcome is unknown
            "queries_answered": 0,  # decision queries this gateway answered (target)
            # tunnels refused after an early COMMIT whose SPI was taken here meanwhile
            "not_taken_back": 0,
            # FINALs naming a last number at or below what this gateway may have sent under
            # those keys itself: the tunnel resumed past its own ceiling instead
            "stale_final": 0,
            "queries_limited": 0,  # decision queries over their rate (per peer)
            # COMMITs for a transfer given up here (sa delete, no decision in time): what
            # the source committed is served by nobody until re-keyed
            "commit_after_cancel": 0,
            # the target's CTC for a transfer we had committed (source): the same crossing
            "cancelled_after_commit": 0,
            # messages about another peer's transfer, per kind (_foreign)
            **{f"foreign_{k}": 0 for k in FOREIGN_KINDS},
        }
        # Reactive mode: CTARs per source and per MN (RFC 4067 §2.5 CT_REQUEST_RATE), CT-Reqs
        # per peer (both directions), (MN, sequence) pairs already requested.
        rate = cxtp.CT_REQUEST_RATE
        self._ctar_source = RateLimiter(rate, rate)
        self._ctar_mn = RateLimiter(rate, rate)
        self._ctreq_peer = RateLimiter(10 * rate, 20 * rate)
        self._query_peer = RateLimiter(10 * rate, 20 * rate)  # decision queries per peer
        # Told (peer, kind, transfer id, whose) of every message dropped as another
        # peer's (the adapter logs it, rate-limited).
        self.on_foreign: Callable[[str, str, int, str], None] | None = None
        self._ctar_seen: dict[tuple[IPAddress, int], float] = {}
        # Tunnels that arrived from a peer: FORWARDs from that peer are taken for them until
        # the time given (this gateway's forward_time after the commit).
        self.arrived: dict[Tunnel, tuple[str, float]] = {}
        self._arrived_due = math.inf  # at or before the earliest end in ``arrived``
        # Signals a fenced tunnel could not send at its commit (a cluster member that does
        # not own it yet): sent by resend() once it may.
        self.unsent_signals: dict[Tunnel, list[signalling.SignalItem]] = {}
        # Told the SPIs of every transfer this gateway starts as source, once its tunnels
        # are held or capped (the IKE adapter quietens their IKE SAs).
        self.on_start: Callable[[set[int]], None] | None = None
        # Source: UNIT CDBs for the tunnels of a transfer (the IKE adapter: one per IKE SA
        # whose CHILD SAs go), sent after their contexts. Target: per UNIT kind, why this
        # gateway cannot take such a unit from a peer (None: it can); a kind without a check
        # here is refused. A unit's tunnels are installed all or none. The check is given
        # (peer, payload, transfer id, the unit's SPIs that are tunnels of the transfer):
        # what it admits it may hold for the transfer until incoming_state says it ended
        # (the IKE adapter reserves the IKE SA's virtual IPs), or until ``unit_kept`` of
        # its kind, told (peer, transfer id, [(SPIs, payload)] of the admitted units whose
        # tunnels were all installed) once the transfer's tunnels are decided, leaves it
        # out: a unit refused after its check (selectors, SPI clash, all or none) holds
        # nothing from then on.
        self.unit_cdbs: Callable[[list[Tunnel]], list[bytes]] | None = None
        self.unit_checks: dict[int, Callable[[str, bytes, int, list[int]], str | None]] = {}
        self.unit_kept: dict[int, Callable[[str, int, list[tuple[list[int], bytes]]], None]] = {}
        # ... and, per kind, why the payloads of one unit (the UNIT CDBs naming the same
        # tunnels, each admitted by its check) do not make a whole one (None: they do), asked
        # with (peer, the unit's SPIs, payloads, outbound SPI -> the selectors of the
        # transfer's SAs as they would be installed): the IKE adapter refuses a unit none of
        # whose pieces carries the peer's identity (each piece checked alone would let it
        # through unchecked), or whose tunnels carry traffic its CHILD SAs' configurations
        # do not admit.
        self.unit_whole: dict[
            int, Callable[[str, list[int], list[bytes], Mapping[int, list[Selectors]]], str | None]
        ] = {}
        # Source: asked with a transfer's tunnels at its start and again just before its
        # COMMIT goes out (the IKE adapter: can each IKE SA that follows them be exported?
        # after the COMMIT it must not fail). A reason refuses the start (TransferError) or
        # rolls the transfer back instead of committing (outcome "failed"); None: go on.
        self.commit_check: Callable[[list[Tunnel]], str | None] | None = None
        # Told (transfer id, peer, tunnels, why) when a transfer whose COMMIT went out before
        # its answer (commit_early) lost that answer: its tunnels are sent on by nobody here
        # until the peer answers the decision query (the gateway logs it for the operator).
        self.on_unresolved: Callable[[int, str, int, str], None] | None = None
        # Fail-over pair: given the tunnels of a transfer away and its id, a Write done once
        # the standby acknowledged that it holds them marked leaving by it (``leaving``), or
        # with no id, unmarked (or, either way, not at all). The COMMIT waits for the first;
        # tunnels of a transfer that did not commit send again only after the second (they
        # may send below a make-before-break cap meanwhile). None: no standby (nothing waits).
        self.standby_gate: Callable[[list[Tunnel], int | None], Write] | None = None
        # The tunnels being transferred away now, with their marks (the standby's replicas
        # of them carry these: Replicator.leaving_of).
        self.leaving: dict[Tunnel, LeavingMark] = {}
        self._next_housekeeping = 0.0

    # -- source side -----------------------------------------------------------------
    def start(
        self,
        tunnels: list[Tunnel],
        peer: str,
        now: float,
        *,
        mode: str = "predictive",
        candidates: Iterable[str] = (),
        reply_to: tuple[int, int] | None = None,
        prepare: bool = False,
    ) -> tuple[int, list[Output]]:
        """Begin moving ``tunnels`` to ``peer``. Raises TransferError if one is busy.

        ``prepare``: a prepared transfer (docs/cxtp.md, "Prepared transfers"): everything
        up to the COMMIT now (contexts, the target's CTDR, "leaving" durable, the standby's
        mark), the tunnels sending below their caps meanwhile; the COMMIT only on
        :meth:`commit` (a :class:`Prepared` output says when it is ready), a rollback on
        :meth:`cancel` or once ``prepare_timeout`` (or the target's shorter wait) passes.
        Needs make-before-break (the tunnels must go on carrying traffic meanwhile)."""
        if not tunnels:
            raise TransferError("nothing to transfer")
        if prepare and reply_to is not None:
            raise TransferError("a reactive transfer cannot be prepared")
        busy = self._capped()
        for t in tunnels:
            if t.state is not TunnelState.ACTIVE or t in busy:
                state = "being transferred" if t in busy else t.state.value
                raise TransferError(f"tunnel {t.name or hex(t.outbound.spi)} is {state}: busy")
        why = self._commit_refusal(tunnels, starting=True)
        if why is not None:  # nothing held, capped or sent yet
            raise TransferError(f"not started: {why}")
        if reply_to is None:
            tid = self.rng(64)
            while self._tid_in_use(tid):
                tid = self.rng(64)
        else:
            # Reactive: the requesting peer chose the id. One that names a transfer of ours
            # still running or remembered (the id of a PCTD we sent that peer, or of its own
            # earlier CT-Req) would replace it here: its tunnels would stay held, with no
            # time-out to roll them back and its CTDR answered for the other.
            tid = reply_to[0]
            if self._tid_in_use(tid):
                raise TransferError(f"transfer id {tid:016x} is in use: busy")
        rec = Record(
            tid,
            "source",
            peer,
            "prepared" if prepare else mode,
            now,
            tunnels=len(tunnels),
            spis=[sa.spi for t in tunnels for sa in t.sas()],
        )
        margin = self.settings.mbb_margin
        # Make-before-break when every tunnel has room for the margin below its counter's
        # limit (else the tunnels are held, as without it).
        mbb = self.settings.make_before_break and all(
            t.outbound.seq + margin < t.outbound.seq_limit for t in tunnels
        )
        if prepare and not mbb:
            raise TransferError(
                "a prepared transfer needs make-before-break ([transfer] make_before_break)"
                " and room for mbb_margin below each tunnel's counter limit"
            )
        caps: dict[Tunnel, int] = {}
        for t in tunnels:
            if mbb:
                caps[t] = self.engine.cap_sending(t, margin)
            else:
                self.engine.hold(t)
        og = _Outgoing(
            tid,
            peer,
            tunnels,
            tunnels[0].outbound.dst,
            now + self.settings.max_transfer_time,
            rec,
            # (a prepared transfer does not move on to other candidates: the operator
            # named its target, ahead of time)
            [] if prepare else list(candidates),
            caps=caps,
            prepare=prepare,
            # Until the target's PREPARE answer: what an older target waits (CT_RETRY_MAX).
            prepare_wait=min(self.settings.prepare_timeout, self.settings.retry_max),
        )
        try:
            out = self._send_contexts(og, now, reactive=reply_to is not None)
            if prepare:
                # After the contexts: a target of an older ipsecct, which has installed them
                # by then, ignores it (and waits its own retry_max for the COMMIT).
                tag = cxtp.TransferTag(tid, og.seq).encode()
                og.seq += 1
                out.append(Send(peer, cxtp.CTD(og.mn, 0, (tag, prepare_cdb(
                    math.ceil(self.settings.prepare_timeout))))))  # fmt: skip
        except (ContextError, CxtpError) as exc:
            # Nothing was sent: the tunnels stay here, active, as if nothing had happened.
            for t in tunnels:
                if mbb:
                    self.engine.uncap(t)
                else:
                    self.engine.activate(t)
            raise TransferError(f"cannot encode the contexts: {exc}") from None
        self.outgoing[tid] = og
        if self.journal is not None:
            # "Leaving" (to this peer, by this transfer) is written while the contexts
            # travel; the COMMIT waits for it (docs/state.md): a source restarted with it
            # asks the peer what became of the transfer before it sends on them again.
            og.away_tunnels = list(tunnels)
            if self.settings.commit_early:
                og.away = self._journal_write(lambda j: j.leaving(tunnels, peer, tid))
            else:
                # Its rows (an HMAC per SA untracked here, the leases) are built once the
                # contexts are handed on, not before them: the write starts no later (its
                # thread is woken after this turn either way), the contexts leave
                # 0.05-0.2 ms sooner. Until then the COMMIT waits for a placeholder that
                # nothing settles: nothing but the contexts leaves before the rows are
                # submitted (the After runs in this turn, before any other input), and
                # an adapter that dropped the After would roll back at the time-out, never
                # commit. (commit_early sends its COMMIT from here once "leaving" is
                # durable, which a journal may say at once: submitted now, as before.)
                og.away = Write()
                out.append(After(lambda: self._leaving(og, tunnels, peer, tid)))
        self._mark_leaving(og)
        if self.on_start is not None:
            self.on_start(set(rec.spis))
        # CT_MAX_TRANSFER_TIME bounds one exchange; a batched (bulk) transfer gets it once per
        # message it takes, so thousands of tunnels are not cut off by a per-message budget.
        sends = sum(1 for o in out if isinstance(o, Send))  # (not the After)
        og.deadline = now + self.settings.max_transfer_time * max(1, sends - prepare)
        if self._may_commit_all(og):
            out += self._commit_all(og, now)
        return tid, out

    def _leaving(self, og: _Outgoing, tunnels: list[Tunnel], peer: str, tid: int) -> None:
        """Submit ``og``'s "leaving" rows (start's After), in place of its placeholder,
        unless the transfer already moved on (it cannot within the turn: kept for safety;
        a rollback's "owned" again then stands alone, as it may)."""
        if self.outgoing.get(tid) is og and og.state is OutgoingState.SENT and og.peer == peer:
            og.away = self._journal_write(lambda j: j.leaving(tunnels, peer, tid))

    def _commit_refusal(self, tunnels: list[Tunnel], *, starting: bool = False) -> str | None:
        """Why a transfer of ``tunnels`` must not start, or send its COMMIT for them now
        (``commit_check``), or None: what follows the COMMIT (an IKE SA's context) must
        not be able to fail then. Nor a tunnel removed here since the transfer started (its
        CHILD SA deleted: a prepared transfer's minutes): the target would activate it."""
        gone = None if starting else next(
            (t for t in tunnels if not self.engine.has_tunnel(t)), None)  # fmt: skip
        if gone is not None:
            self.counters["commit_refused"] += 1
            return (f"tunnel 0x{gone.outbound.spi:08x} was removed here while it was being"
                    " transferred")  # fmt: skip
        if self.commit_check is None or not tunnels:
            return None
        why = self.commit_check(tunnels)
        if why is not None:
            self.counters["commit_refused"] += 1
        return why

    def _mark_leaving(self, og: _Outgoing) -> None:
        """A fail-over standby is told that ``og``'s tunnels are leaving (to its peer, by
        it), while the contexts travel; the COMMIT waits for its acknowledgement."""
        if self.standby_gate is None:
            return
        for t in og.tunnels:
            self.leaving[t] = LeavingMark(og.tid, og.peer, transferred_at(t))
        og.away_tunnels = list(og.tunnels)
        og.standby = self.standby_gate(list(og.tunnels), og.tid)

    def _unmark(self, tunnels: Iterable[Tunnel]) -> None:
        for t in tunnels:
            self.leaving.pop(t, None)

    def _standby_unmarked(self, tunnels: list[Tunnel]) -> Write | None:
        """The Write a tunnel taken back here waits for before it sends again: the standby
        holds it unmarked (None: no standby)."""
        self._unmark(tunnels)
        return self.standby_gate(tunnels, None) if self.standby_gate is not None else None

    def _tid_in_use(self, tid: int) -> bool:
        """Does ``tid`` name a transfer this gateway started (running, deciding, being
        rolled back, unresolved after a restart, or decided and still remembered)?"""
        return (
            tid in self.outgoing
            or tid in self.decided
            or tid in self.unresolved
            or any(rv.tid == tid for rv in self.reverting)
        )

    def _send_contexts(self, og: _Outgoing, now: float, *, reactive: bool) -> list[Output]:
        cdbs: list[bytes] = []
        for t in og.tunnels:
            # Make-before-break: the target's first number follows the cap, below which the
            # source goes on sending until the COMMIT.
            cdbs.append(context.encode(t.outbound, now, seq=og.caps.get(t)))
            if t.inbound is not None:
                cdbs.append(context.encode(t.inbound, now))
        if self.unit_cdbs is not None:
            cdbs += self.unit_cdbs(og.tunnels)
        template: cxtp.CTD | cxtp.PCTD = (
            cxtp.CTD(og.mn, 0) if reactive else cxtp.PCTD(og.mn, 0, token_key(og.tunnels[0]))
        )
        msgs = cxtp.batch_cdbs(template, cdbs, og.tid, first_seq=og.seq)
        og.seq += len(msgs)
        return [Send(og.peer, m) for m in msgs]

    def _capped(self) -> set[Tunnel]:
        """Tunnels that send below a transfer's cap here (make-before-break): active, but
        being transferred (or waiting to be owned here again)."""
        busy = {t for og in self.outgoing.values() for t in og.caps}
        for rv in self.reverting:
            busy.update(t for t in rv.tunnels if t.transfer_cap != 1 << 64)
        return busy

    def hold(self, held: Held) -> bool:
        """Keep a packet of a held tunnel; False when over a bound (the caller drops it).

        Bounds: per tunnel in packets and octets, per transfer in packets and octets. Inbound
        ESP reaches here only after its ICV verified (the engine checks), so forgeries take
        no room; what is refused is counted (``held_refused``)."""
        # (A bulk transfer holds thousands of tunnels: membership by set, not list.)
        for og in self.outgoing.values():
            if og.state is OutgoingState.SENT and _has(og, held.tunnel):
                return self._keep(og, held)
            if og.state is OutgoingState.PREPARED and _has(og, held.tunnel):
                cap = og.caps.get(held.tunnel)
                if cap is None or held.tunnel.outbound.seq < cap:
                    # Fenced otherwise (a lease, a reservation not yet durable): as any
                    # tunnel of this gateway, not kept for a commit that may be far off.
                    return False
                # Its cap reached while prepared: rolled back at the next tick (not
                # committed unasked: the MN may not be where the target is yet).
                og.deadline = 0.0
                return self._keep(og, held)
        for inc in self._open_incoming.values():
            if _has(inc, held.tunnel):
                return self._keep(inc, held)
        for rv in self.reverting:
            if _has(rv, held.tunnel):
                return self._keep(rv, held)
        for u in self.unresolved.values():
            if held.tunnel in u.members:
                # Not kept: the answer may take long (or never come). Dropped, counted.
                self.counters["unresolved_dropped"] += 1
                return True
        return False  # not ours (fail-over fencing may hold it)

    def _keep(self, owner: _Outgoing | _Incoming | _Reverting, held: Held) -> bool:
        s = self.settings
        n = len(held.packet)
        # A copy of ESP held already (its SPI and sequence number): authentic (the engine
        # checked the ICV) and newer than the replay window, which held packets do not move,
        # so every copy of a replayed packet passed; kept, they filled the tunnel's room.
        # The MN sends each number once: a second one is a replay or the network's copy.
        esp = (held.tunnel, bytes(held.packet[:8])) if held.inbound else None
        if esp is not None and esp in owner.held_esp:
            self.counters["held_duplicate"] += 1
            return True
        packets, octets = owner.held_per_tunnel.get(held.tunnel, (0, 0))
        if (
            len(owner.held) >= s.max_held
            or owner.held_bytes + n > s.max_held_bytes
            or packets >= s.held_per_tunnel
            or octets + n > s.held_bytes_per_tunnel
        ):
            self.counters["held_refused"] += 1
            return False
        owner.held.append(held)
        owner.held_bytes += n
        owner.held_per_tunnel[held.tunnel] = (packets + 1, octets + n)
        if esp is not None:
            owner.held_esp.add(esp)
        return True

    @staticmethod
    def _release_held(owner: _Outgoing | _Incoming | _Reverting, keep: list[Held]) -> None:
        owner.held = keep
        owner.held_bytes = sum(len(h.packet) for h in keep)
        per: dict[Tunnel, tuple[int, int]] = {}
        for h in keep:
            p, o = per.get(h.tunnel, (0, 0))
            per[h.tunnel] = (p + 1, o + len(h.packet))
        owner.held_per_tunnel = per
        owner.held_esp = {(h.tunnel, bytes(h.packet[:8])) for h in keep if h.inbound}

    def _rollback(
        self,
        og: _Outgoing,
        now: float,
        outcome: str,
        detail: str,
        tunnels: list[Tunnel] | None = None,
    ) -> list[Output]:
        out: list[Output] = []
        back = og.tunnels if tunnels is None else tunnels
        # "Given away" submitted for some (it may be on disk, with this transfer's id, which
        # a restarted source would answer COMMIT for): those send again only once "owned"
        # is durable again. Until then they stay held, with what they held.
        # (Sets for the membership tests: a bulk transfer rolls back thousands of tunnels
        # with up to max_held packets.)
        away = set(og.away_tunnels)
        revert = [t for t in back if t in away]
        back_set, revert_set = set(back), set(revert)
        keep = [h for h in og.held if h.tunnel not in back_set]
        mine = [h for h in og.held if h.tunnel in back_set and h.tunnel not in revert_set]
        theirs = [h for h in og.held if h.tunnel in revert_set]
        self._release_held(og, keep)
        for t in back:
            if t in revert_set:
                continue  # held, or capped (make-before-break), until "owned" is durable
            if t.state is TunnelState.HELD:
                self.engine.activate(t)
            elif t in og.caps:
                self.engine.uncap(t)
        out += [Inject(h.packet, h.inbound) for h in mine]
        self._unmark(back)
        if revert:
            w = (
                self._journal_write(lambda j: j.staying(revert, og.peer))
                if self.journal is not None
                else Write.durable()
            )
            rv = _Reverting(og.tid, revert, w, standby=self._standby_unmarked(revert))
            self._release_held(rv, theirs)
            self.reverting.append(rv)
            out += self._settle_reverting(now)
        if tunnels is None:
            _move(og, OutgoingState.ABORTED)
            self.decided[og.tid] = (2, now + self.settings.retry_max)
            self.decided_peer[og.tid] = og.peer
            self.outgoing.pop(og.tid, None)
            og.record.outcome, og.record.detail, og.record.ended = outcome, detail, now
            self.records.append(og.record)
            out.append(Send(og.peer, cxtp.CTC(og.mn, (self._tag(og),))))
            out.append(Finished(og.record))
        return out

    def _tag(self, og: _Outgoing | _Incoming) -> bytes:
        tag = cxtp.TransferTag(og.tid, og.seq).encode()
        og.seq += 1
        return tag

    def _on_ctdr(
        self, peer: str, msg: cxtp.CTDR, tag: cxtp.TransferTag, now: float
    ) -> list[Output]:
        og = self.outgoing.get(tag.transfer_id)
        if og is None:
            u = self.unresolved.get(tag.transfer_id)
            if u is not None and u.og is not None and u.peer == peer:
                og = u.og  # the late answer to a COMMIT sent before it: it decides
        if og is None or og.peer != peer:
            u = self.unresolved.get(tag.transfer_id)
            if u is not None:
                # A target still waiting for the COMMIT of a transfer whose outcome this
                # restarted source does not know: ask it now (it takes the query for the
                # COMMIT), rather than cancel or wait for the next query.
                if u.peer == peer:
                    return self._query(u, now)
                return self._foreign(peer, "ctdr", tag.transfer_id, u.peer)
            # An answer about a transfer of ours with another peer (running, or decided:
            # our decision is that peer's to hear, not this one's).
            whose = og.peer if og is not None else self.decided_peer.get(tag.transfer_id)
            if whose is not None and whose != peer:
                return self._foreign(peer, "ctdr", tag.transfer_id, whose)
            # A CTDR re-sent by a target that missed our decision: repeat it.
            dec = self.decided.get(tag.transfer_id)
            if dec is None:
                return [
                    Send(
                        peer,
                        cxtp.CTC(msg.mn_prev, (cxtp.TransferTag(tag.transfer_id, 0).encode(),)),
                    )
                ]
            d = dec[0]
            ttag = cxtp.TransferTag(tag.transfer_id, 0).encode()
            if d == DECISION_COMMIT:
                finals = [Send(peer, m) for m in self._finals.get(tag.transfer_id, ())]
                return [*finals, Send(peer, cxtp.CTD(msg.mn_prev, 0, (ttag, decision_cdb(d))))]
            return [Send(peer, cxtp.CTC(msg.mn_prev, (ttag,)))]
        if og.state is OutgoingState.PREPARED:
            return []  # a CTDR re-sent while the transfer waits for its commit call
        outbound = og.out_keys
        if outbound is None:
            outbound = og.out_keys = {
                (int(t.outbound.protocol), t.outbound.spi, t.outbound.dst) for t in og.tunnels
            }
        for c in msg.ext[1:]:
            if cxtp.cdb_fpt(c) == cxtp.FPT_SA_RESULT:
                r = cxtp.SaResult.decode(c)
                key = (r.protocol, r.spi, r.dst)
                if key in outbound:  # (an inbound SA's result, or one for no SA of ours)
                    og.results[key] = r.status
        if not tag.last:
            return []
        if msg.all_ok:
            default: int = cxtp.Status.SUCCESS
        elif msg.statuses:
            default = msg.statuses[0].status
        else:
            default = cxtp.Status.INTERNAL_ERROR
        status_by_sa, og.results = og.results, {}
        accepted: list[Tunnel] = []
        refused: list[Tunnel] = []
        worst = 0
        for t in og.tunnels:
            o = t.outbound
            st = status_by_sa.get((int(o.protocol), o.spi, o.dst), default)
            if cxtp.is_success(st):
                accepted.append(t)
            else:
                refused.append(t)
                worst = worst or st
        out: list[Output] = []
        if og.state is OutgoingState.AWAITING:
            return self._resolve(og, accepted, refused, worst, now)
        if not accepted:
            # Nothing taken: try the next candidate for unsupported algorithms, else roll back.
            if worst == cxtp.Status.UNSUPPORTED_ALGORITHM and og.candidates:
                nxt = og.candidates.pop(0)
                out += [Send(og.peer, cxtp.CTC(og.mn, (self._tag(og),)))]
                og.record.detail += f"{og.peer}: unsupported algorithm; "
                og.peer = nxt
                og.record.peer = nxt
                if self.journal is not None:
                    # "Leaving" names the new peer before the COMMIT may go to it: a source
                    # restarted after that COMMIT must ask this peer, not the one that
                    # refused (which would say "not taken").
                    og.away = self._journal_write(lambda j: j.leaving(og.tunnels, nxt, og.tid))
                self._mark_leaving(og)  # the standby holds them leaving to the new peer
                more = self._send_contexts(og, now, reactive=False)
                og.deadline = now + self.settings.max_transfer_time * max(1, len(more))
                return out + more
            name = _status_name(worst)
            return self._rollback(og, now, "refused", f"{og.record.detail}{peer}: {name}")
        # Commit what was accepted; reactivate the rest here. "Leaving" (submitted at the
        # start, normally durable by now) is on stable storage before the COMMIT goes out:
        # after a crash, this gateway never sends on them again before the target says it
        # did not take them (docs/state.md).
        og.answer = (accepted, refused, worst)
        return out + self._commit_when_recorded(og, now)

    def _commit_when_recorded(self, og: _Outgoing, now: float) -> list[Output]:
        """Send the COMMIT for the CTDR's answer if "given away" is durable; roll back if it
        could not be made so; else wait (settled() comes back here)."""
        assert og.answer is not None
        if og.away is not None and not og.away.done:
            if og.away.failed:
                return self._rollback(og, now, "failed", f"not committed: {og.away.error}")
            return []
        if og.standby is not None and not og.standby.done:
            # The fail-over standby must hold them marked leaving before the target may
            # send: else, taking over, it would send on them beside the target.
            if og.standby.failed:
                return self._rollback(og, now, "failed", f"not committed: {og.standby.error}")
            return []
        if og.prepare and og.state is OutgoingState.SENT:
            return self._prepared(og, now)
        accepted, refused, worst = og.answer
        why = self._commit_refusal(accepted)
        if why is not None:  # all of it back here, the COMMIT never sent
            return self._rollback(og, now, "failed", f"not committed: {why}")
        peer = og.peer
        out: list[Output] = []
        if refused:
            out += self._rollback(og, now, "partial", "", refused)
        og.tunnels = accepted
        _move(og, OutgoingState.COMMITTED)
        self.decided[og.tid] = (DECISION_COMMIT, now + self.settings.retry_max)
        self.decided_peer[og.tid] = og.peer
        self.outgoing.pop(og.tid, None)
        # From here on nothing is sent or accepted here on them (make-before-break: they
        # sent and received until this moment): their final anti-replay states (exact, the
        # native path hands them back as they move) go to the target ahead of the COMMIT.
        self.engine.move_tunnels(accepted, peer, now + self.settings.forward_time, tails=True)
        self._unmark(accepted)  # moved: the standby is told to drop them
        for t in accepted:  # (one that arrived here lately: its forward window ends now)
            self.arrived.pop(t, None)
        # The grant: "leaving" (durable: waited for above) reserved past what the target
        # may send before its own record is; after this COMMIT nothing takes a tunnel back
        # here but a restart's "not taken", which resumes past that reservation.
        out += self._final_and_commit(og, accepted, grant=self._grants())
        # "Given away", not waited for: a crash before it lands leaves them "leaving",
        # which a restarted source resolves by asking the target. Its rows (an HMAC per
        # SA) are made once the FINAL and COMMIT are out: 0.1-0.2 ms of a handover's
        # commit on the demo's loaded machine (benchmarks/README.md, "tenth session").
        tid = og.tid
        out.append(After(lambda: self._given_away(accepted, peer, tid)))
        for h in og.held:
            out += self.forward(peer, h.packet, h.inbound, og)
        self._release_held(og, [])
        og.record.outcome = "committed" if not (refused or og.refused_early) else "partial"
        og.record.accepted = len(accepted)
        og.record.ended = now
        if og.refused_early:
            og.record.spis = [sa.spi for t in accepted for sa in t.sas()]
        if refused:
            og.record.detail += f"{len(refused)} refused: {_status_name(worst)}"
            # What moved only: the IKE SA follows its CHILD SAs only if all of them did (a
            # refused unit's IKE SA stays here with them), and the etcd mode hands over
            # the owner keys of what moved.
            og.record.spis = [sa.spi for t in accepted for sa in t.sas()]
        self.records.append(og.record)
        out.append(Finished(og.record))
        return out

    # -- prepared transfers (docs/cxtp.md, "Prepared transfers") -----------------------------
    def _prepared(self, og: _Outgoing, now: float) -> list[Output]:
        """A prepared transfer is ready: CTDR in, "leaving" durable, the standby's mark
        acknowledged. What the target refused comes back now (as at a COMMIT); the rest
        waits, sending below its caps, for :meth:`commit` (at once if it was asked for)."""
        assert og.answer is not None
        accepted, refused, worst = og.answer
        out: list[Output] = []
        if refused:
            out += self._rollback(og, now, "partial", "", refused)
            for t in refused:  # back here: no longer this transfer's (busy, its cap)
                og.caps.pop(t, None)
            og.refused_early = len(refused)
            og.record.detail += f"{len(refused)} refused: {_status_name(worst)}; "
            og.tunnels = accepted
            og.answer = (accepted, [], worst)
        _move(og, OutgoingState.PREPARED)
        og.deadline = self._prepare_deadline(og)
        if og.commit_asked and now < og.deadline:  # (past it: as a commit asked for then)
            return out + self._commit_when_recorded(og, now)
        if now >= og.deadline or any(t.outbound.seq >= c for t, c in og.caps.items()):
            return out + self._unprepare(og, now)
        out.append(Prepared(og.record))
        return out

    def _prepare_deadline(self, og: _Outgoing) -> float:
        """When a prepared transfer is rolled back rather than committed: its wait at the
        target (measured there from later than our start) less the COMMIT's way there."""
        wait = min(self.settings.prepare_timeout, og.prepare_wait)
        return og.record.started + wait - PREPARE_GUARD

    def _unprepare(self, og: _Outgoing, now: float) -> list[Output]:
        """A prepared transfer's time ran out, or one of its tunnels reached its cap (its
        packets are held past it): rolled back, never committed unasked."""
        if any(t.outbound.seq >= c for t, c in og.caps.items()):
            return self._rollback(og, now, "cancelled", "a tunnel reached its cap"
                                  " (mbb_margin) while prepared")  # fmt: skip
        return self._rollback(og, now, "timeout", "prepared, not committed within"
                              f" {og.deadline - og.record.started:.0f} s")  # fmt: skip

    def prepared_ids(self) -> list[int]:
        """The prepared transfers waiting for their commit call (``ipsecct status``)."""
        return [t for t, og in self.outgoing.items() if og.state is OutgoingState.PREPARED]

    def prepared(self, tid: int) -> bool:
        """Is ``tid`` a prepared transfer waiting for its commit call?"""
        og = self.outgoing.get(tid)
        return og is not None and og.state is OutgoingState.PREPARED

    def _prepared_of(self, tid: int, what: str) -> _Outgoing:
        og = self.outgoing.get(tid)
        if og is not None and og.prepare:
            return og
        dec = self.decided.get(tid)
        if dec is not None and dec[0] == DECISION_COMMIT:
            raise TransferError(f"transfer {tid:016x} is committed already: cannot {what} it")
        if dec is not None:
            raise TransferError(f"transfer {tid:016x} was rolled back (ipsecct status says why):"
                                f" cannot {what} it")  # fmt: skip
        if og is not None:
            raise TransferError(f"transfer {tid:016x} is not a prepared one")
        raise TransferError(f"no prepared transfer {tid:016x} here")

    def commit(self, tid: int, now: float) -> list[Output]:
        """The handover's trigger for prepared transfer ``tid``: its FINAL and COMMIT go at
        once (nothing written, no round trip); asked while it is still being prepared, it
        commits as soon as it is ready. Past its deadline it is rolled back instead (the
        target may have stopped waiting). The outcome is the transfer's Finished record.
        TransferError for an unknown id, one committed or rolled back, a second commit."""
        og = self._prepared_of(tid, "commit")
        if og.commit_asked:
            raise TransferError(f"transfer {tid:016x}: commit asked for already")
        og.commit_asked = True
        if og.state is not OutgoingState.PREPARED:
            og.record.committing = now  # (commit_ms: the wait for the preparation)
            return []  # (committed by _prepared once ready)
        if now >= og.deadline:
            return self._unprepare(og, now)
        return self._commit_when_recorded(og, now)

    def cancel(self, tid: int, now: float, why: str = "cancelled by the operator") -> list[Output]:
        """Roll prepared transfer ``tid`` back (CTC to the target): its tunnels stay here.
        TransferError for an unknown id or one committed or rolled back already."""
        og = self._prepared_of(tid, "cancel")
        if og.state not in (OutgoingState.SENT, OutgoingState.PREPARED):
            raise TransferError(f"transfer {tid:016x} is committed already: cannot cancel it")
        return self._rollback(og, now, "cancelled", why)

    def cancel_prepared(self, spis: set[int], now: float, why: str) -> list[Output]:
        """Roll back the prepared transfers (not yet committed) that carry any of ``spis``
        (an IKE request of the MN that must be answered here: docs/ikev2.md)."""
        out: list[Output] = []
        for og in list(self.outgoing.values()):
            if (
                og.prepare
                and og.state in (OutgoingState.SENT, OutgoingState.PREPARED)
                and not og.commit_asked
                and any(sa.spi in spis for t in og.tunnels for sa in t.sas())
            ):
                out += self._rollback(og, now, "cancelled", why)
        return out

    def _on_prepare(
        self, peer: str, msg: cxtp.CTD, tag: cxtp.TransferTag, now: float
    ) -> list[Output]:
        """A PREPARE CDB. At the target, after a prepared transfer's contexts: wait for its
        COMMIT up to the seconds asked (at most our own prepare_timeout) rather than
        retry_max, and say how long. At the source: that answer."""
        seconds = parse_prepare(msg.cdbs[1])
        og = self.outgoing.get(tag.transfer_id)
        if og is not None and og.peer == peer:
            if og.prepare:
                og.prepare_wait = seconds
                # (deadline 0: a tunnel reached its cap, rolled back at the next tick: hold)
                if og.state is OutgoingState.PREPARED and og.deadline:
                    og.deadline = self._prepare_deadline(og)
            return []
        inc = self.incoming.get((peer, tag.transfer_id))
        if inc is None:
            whose = og.peer if og is not None else self._whose_incoming(peer, tag.transfer_id)
            if whose is not None:  # another peer's transfer: not this one's to prolong
                return self._foreign(peer, "prepare", tag.transfer_id, whose)
        if inc is None or inc.state is not IncomingState.PENDING or inc.committing or (
            inc.prepared  # one PREPARE a transfer: another would push the wait on for ever
        ):
            self.counters["refused"] += 1
            return []
        s = self.settings
        wait = min(seconds, s.prepare_timeout)
        inc.prepared = True
        inc.give_up = max(inc.give_up, now + wait)
        ack = (self._tag(inc), prepare_cdb(math.floor(wait)))
        return [Send(peer, cxtp.CTD(inc.mn, 0, ack))]

    # -- commit what you accept (Settings.commit_early; docs/cxtp.md, docs/state.md) -------
    def _may_commit_all(self, og: _Outgoing) -> bool:
        """May ``og`` send its COMMIT now, before the CTDR? Only once "leaving" is durable
        (none to wait for without a journal), before any answer, and not when it may move on
        to another candidate (that needs the answer: an unsupported algorithm)."""
        return (
            self.settings.commit_early
            and not og.prepare
            and og.state is OutgoingState.SENT
            and og.answer is None
            and not og.candidates
            and (og.away is None or og.away.done)
            and (og.standby is None or og.standby.done)
        )

    def _commit_all(self, og: _Outgoing, now: float) -> list[Output]:
        """The COMMIT for every tunnel of ``og``, before the target's answer: the target
        activates those it accepted (it installed only those), and its CTDR will name the
        ones it refused, which come back here (:meth:`_resolve`). From here on nothing is
        sent or accepted here on any of them (they are forwarders, kept until the answer:
        a refused one is taken back from them), whatever happens: only the target's word
        (CTDR or decision query) gives one back."""
        why = self._commit_refusal(og.tunnels)
        if why is not None:
            return self._rollback(og, now, "failed", f"not committed: {why}")
        _move(og, OutgoingState.AWAITING)
        peer = og.peer
        tunnels = og.tunnels
        self.engine.move_tunnels(tunnels, peer, math.inf, tails=True)
        self._unmark(tunnels)  # moved: the standby is told to drop them
        for t in tunnels:  # (as in _commit_when_recorded)
            self.arrived.pop(t, None)
        out: list[Output] = []
        out += self._final_and_commit(og, tunnels)
        for h in og.held:
            out += self.forward(peer, h.packet, h.inbound, og)
        self._release_held(og, [])
        og.deadline = max(og.deadline, now + self.settings.max_transfer_time)
        return out

    def _resolve(
        self,
        og: _Outgoing,
        accepted: list[Tunnel],
        refused: list[Tunnel],
        worst: int,
        now: float,
        why: str = "",
    ) -> list[Output]:
        """The answer to a COMMIT sent before it (a CTDR, or a decision query's answer):
        ``accepted`` are away for good, ``refused`` come back here ("owned" again durable
        before they send, as after a rollback)."""
        _move(og, OutgoingState.COMMITTED)
        self.outgoing.pop(og.tid, None)
        self.unresolved.pop(og.tid, None)
        self.decided[og.tid] = (DECISION_COMMIT, now + self.settings.retry_max)
        self.decided_peer[og.tid] = og.peer
        out: list[Output] = []
        self.engine.forward_until(accepted, now + self.settings.forward_time)
        if accepted:
            self._given_away(accepted, og.peer, og.tid)
        if refused:
            out += self._take_back(og, refused, now)
        rec = og.record
        rec.accepted = len(accepted)
        rec.ended = now
        if not accepted:
            rec.outcome = "refused"
            rec.detail += why or f"{og.peer}: {_status_name(worst)}"
        else:
            rec.outcome = "committed" if not refused else "partial"
            # (what moved: the IKE SA follows its CHILD SAs only if all of them did)
            rec.spis = [sa.spi for t in accepted for sa in t.sas()]
            if refused:
                rec.detail += why or f"{len(refused)} refused: {_status_name(worst)}"
            elif why:
                rec.detail += why
        self.records.append(rec)
        out.append(Finished(rec))
        return out

    def _take_back(self, og: _Outgoing, tunnels: list[Tunnel], now: float) -> list[Output]:
        """Tunnels the target refused after the COMMIT went out: held here again, then
        active once "owned" again is durable (their "leaving" row may be on disk). One
        whose SPI was taken here meanwhile cannot come back: it is removed and recorded
        away (lost until re-keyed, never sent twice)."""
        back: list[Tunnel] = []
        lost: list[Tunnel] = []
        for t in tunnels:
            if t.state is TunnelState.MOVED and not self.engine.take_back(t):
                lost.append(t)
            else:
                back.append(t)
        if lost:
            self.counters["not_taken_back"] += len(lost)
            for t in lost:
                self.engine.remove_tunnel(t)
            self._given_away(lost, og.peer, og.tid)
        if not back:
            return []
        if self.journal is None and self.standby_gate is None:
            for t in back:
                if t.state is TunnelState.HELD:
                    self.engine.activate(t)
                self.engine.uncap(t)
            return []
        w = (
            self._journal_write(lambda j: j.staying(back, og.peer))
            if self.journal is not None
            else Write.durable()
        )
        self.reverting.append(_Reverting(og.tid, back, w, standby=self._standby_unmarked(back)))
        return self._settle_reverting(now)

    def _unresolve(self, og: _Outgoing, now: float, why: str) -> list[Output]:
        """The COMMIT went out before the answer, and the answer did not come (the peer
        was lost, or the deadline passed): which tunnels the target activated is unknown.
        They stay moved (never sent on here) and the peer is asked (decision query) until
        it answers; the answer decides per tunnel."""
        self.outgoing.pop(og.tid, None)
        u = _Unresolved(
            og.tid, og.peer, list(og.tunnels), og.mn, now, members=set(og.tunnels),
            age=max(0.0, now - og.record.started), og=og,
        )
        self.unresolved[og.tid] = u
        if self.on_unresolved is not None:
            self.on_unresolved(og.tid, og.peer, len(og.tunnels), why)
        return self._query(u, now)

    def _grants(self) -> bool:
        """Does this source's COMMIT grant (Settings.grant): only with a journal whose
        "leaving" rows reserved it."""
        return self.settings.grant and bool(getattr(self.journal, "reserves_grant", False))

    def _final_and_commit(
        self, og: _Outgoing, tunnels: list[Tunnel], *, grant: bool = False
    ) -> list[Output]:
        """The COMMIT of ``og`` for ``tunnels``, behind their final states (FINAL CDBs, a
        thousand a message) when the transfer made before it broke (caps). ``grant``: the
        COMMIT says the target may send before its own record is durable (not with
        ``commit_early``, whose tunnels may come back on a live "not taken" answer)."""
        out: list[Output] = []
        if og.caps:
            windows = self._final_states(tunnels)
            finals = self._finals[og.tid] = []
            # A thousand a message at most, and no more than fits one (a FINAL CDB of a
            # 1024-bit window is 160 octets: a thousand of them could not be encoded).
            room = cxtp.MAX_MESSAGE_LEN - FINAL_MESSAGE_OVERHEAD
            i = 0
            while i < len(windows):
                j, size = i, 0
                while j < len(windows) and j - i < 1000 and size + len(windows[j]) <= room:
                    size += len(windows[j])
                    j += 1
                finals.append(cxtp.CTD(og.mn, 0, (self._tag(og), *windows[i:j])))
                out.append(Send(og.peer, finals[-1]))
                i = j
        # The tails are set (or none is): C sends each one's numbers, the rest leave C.
        self.engine.send_tails(tunnels)
        commit = (self._tag(og), decision_cdb(DECISION_COMMIT, grant=grant))
        out.append(Send(og.peer, cxtp.CTD(og.mn, 0, commit)))
        return out

    def _given_away(self, tunnels: list[Tunnel], peer: str, tid: int) -> None:
        """Record ``tunnels`` given to ``peer`` by transfer ``tid`` ("away"), not waited
        for (nothing without a journal)."""
        if self.journal is not None:
            self._unawaited_write(self._journal_write(lambda j: j.left(tunnels, peer, tid)))

    def _final_states(self, tunnels: list[Tunnel]) -> list[bytes]:
        """Each tunnel's last outbound number and inbound window, exact (the tunnels have
        just left the native path). The last number includes the tail this source keeps
        (``mbb_tail``, never past the cap): it sends those numbers itself from now on
        (Tunnel.tail_end), and the target starts after them."""
        out = []
        tail = self.settings.mbb_tail
        for t in tunnels:
            sa = t.inbound
            top, bitmap = sa.window.snapshot() if sa is not None else (0, b"")
            if not top or 28 + len(bitmap) > cxtp.MAX_CDB_LEN:
                top, bitmap = 0, b""  # (a window that big could not have been transferred)
            in_spi = sa.spi if sa is not None else 0
            last = t.outbound.seq
            if tail > 0:
                last = min(last + tail, t.transfer_cap, t.outbound.seq_limit - 1)
                t.tail_end = max(last, t.outbound.seq)
                last = t.tail_end
            out.append(final_cdb(t.outbound.spi, in_spi, last, top, bitmap))
        return out

    def _resumed(self, tunnels: list[Tunnel], peer: str) -> Write:
        """"Owned" again after a "not taken" answer (no journal: nothing to wait for)."""
        if self.journal is None:
            return Write.durable()
        return self._journal_write(lambda j: j.resumed(tunnels, peer))

    def _journal_write(self, submit: Callable[[Journal], Write]) -> Write:
        """Submit a change to the journal; a journal that refuses at once gives a failed
        Write (the same as a write that failed on the disk)."""
        assert self.journal is not None
        try:
            return submit(self.journal)
        except JournalError as exc:
            w = Write()
            w.fail(str(exc))
            return w

    def _settle_reverting(self, now: float) -> list[Output]:
        """Tunnels of transfers that did not commit, "owned" again on stable storage: active
        here again, with the packets they held. If that could not be written they stay out
        of service (recorded given away, perhaps: after a restart nobody would know
        whether they had sent past the transferred number)."""
        out: list[Output] = []
        for rv in [
            r for r in self.reverting
            if r.write.settled and (r.standby is None or r.standby.settled or r.write.failed)
        ]:  # fmt: skip
            self.reverting.remove(rv)
            if rv.write.done and (rv.standby is None or rv.standby.done):
                for t in rv.tunnels:
                    if t.state is TunnelState.HELD:
                        self.engine.activate(t)
                    self.engine.uncap(t)
                    payload = rv.signals.get(t)
                    if payload is not None:
                        res = self.engine.signal(t.outbound, payload, now)
                        if isinstance(res, ToPeer):
                            out.append(Transmit(res.sa, res.data))
                out += [Inject(h.packet, h.inbound) for h in rv.held]
            else:
                self.counters["unrecorded"] += len(rv.tunnels)
                for t in rv.tunnels:
                    self.engine.remove_tunnel(t)
            self._release_held(rv, [])
        return out

    def _unawaited_write(self, w: Write) -> None:
        if w.failed:
            self.counters["unrecorded"] += 1
        elif not w.done:
            self._unawaited.append(w)

    def settled(self, now: float) -> list[Output]:
        """Journal writes were settled (done or failed): go on with what waited for them
        (a COMMIT to send, tunnels to activate or to take back)."""
        out: list[Output] = []
        for og in list(self.outgoing.values()):
            if og.state is OutgoingState.SENT and og.answer is not None and (
                og.away is None or og.away.settled
            ) and (og.standby is None or og.standby.settled):
                out += self._commit_when_recorded(og, now)
            elif self._may_commit_all(og):
                out += self._commit_all(og, now)
        for inc in list(self._open_incoming.values()):
            if inc.committing and inc.state is IncomingState.PENDING and (
                inc.recorded is None or inc.recorded.settled
            ):
                out += self._activate(inc, now)
            elif inc.state is IncomingState.PENDING and inc.recorded is not None and (
                inc.recorded.failed
            ):
                out += self._unrecorded(inc, now)
        if self._granted:
            self._settle_granted()
        out += self._settle_reverting(now)
        for w in [w for w in self._unawaited if w.settled]:
            self._unawaited.remove(w)
            if w.failed:
                self.counters["unrecorded"] += 1
        return out

    def recall_commits(self, transfer_ids: Iterable[int], now: float) -> None:
        """After a restart: transfers this gateway committed (recorded their tunnels as given
        away) before it died, perhaps before the COMMIT left. A target still waiting asks
        again (its CTDR is re-sent every ``retry``) and gets the COMMIT, instead of a CTC that
        would leave the tunnels with nobody."""
        for tid in transfer_ids:
            self.decided.setdefault(tid, (DECISION_COMMIT, now + self.settings.retry_max))

    # -- the decision query (docs/state.md) ----------------------------------------------
    def recall_unresolved(
        self,
        transfers: Iterable[tuple[int, str, list[Tunnel]]],
        now: float,
        ages: Mapping[int, float] | None = None,
        signals: Mapping[Tunnel, bytes] | None = None,
    ) -> list[Output]:
        """After a restart: tunnels recorded "leaving" by (transfer id, peer) before this
        gateway died, whose outcome it does not know. They are held (never sent on: their
        packets are dropped and counted) and ``peer`` is asked, now and every ``retry``
        until it answers: "taken" (they go away) or "not taken" (owned here again once that
        is durable, then active). ``ages``: per transfer, how long ago (seconds, wall
        clock) its tunnels were recorded leaving: each query says how old the transfer is
        (AGE), so that a target that pruned old arrivals answers "taken" when unsure. Needs a
        journal (or, for a fail-over take-over of tunnels marked leaving, none: "not taken"
        then needs no write). ``signals``: in-SA signals to send on tunnels that resume
        (a fail-over standby's SG_UPDATE: the MN learns the new address)."""
        out: list[Output] = []
        for tid, peer, tunnels in transfers:
            if not tunnels or tid in self.unresolved:
                continue
            for t in tunnels:
                if t.state is not TunnelState.HELD:
                    self.engine.hold(t)
            u = _Unresolved(
                tid, peer, list(tunnels), tunnels[0].outbound.dst, now, members=set(tunnels),
                age=None if ages is None else ages.get(tid),
                signals={t: signals[t] for t in tunnels if t in signals} if signals else {},
            )
            self.unresolved[tid] = u
            out += self._query(u, now)
        return out

    def tunnel_roles(self) -> dict[Tunnel, tuple[str, str]]:
        """What each tunnel in a transfer is doing, for ``sa list``: ("leaving", "to PEER,
        held" or "..., sending up to N"), ("arriving", "from PEER, ..."), ("unresolved",
        ...) or ("held", "kept, ...": a rolled-back transfer writing "owned" again)."""
        out: dict[Tunnel, tuple[str, str]] = {}
        for og in self.outgoing.values():
            for t in og.tunnels:
                cap = og.caps.get(t)
                how = "held" if cap is None else f"sending up to {cap}"
                if og.state is OutgoingState.AWAITING:
                    how = "COMMIT sent, waiting for the answer"
                elif og.state is OutgoingState.PREPARED:
                    how = f"prepared, {how}, waiting for its commit"
                out[t] = ("leaving", f"transfer {og.tid:016x} to {og.peer}, {how}")
        for inc in self.incoming.values():
            if inc.state in (IncomingState.RECEIVING, IncomingState.PENDING):
                for t in inc.tunnels:
                    out[t] = (
                        "arriving",
                        f"transfer {inc.tid:016x} from {inc.peer}, held until its COMMIT",
                    )
        for rv in self.reverting:
            for t in rv.tunnels:
                out[t] = ("held", f"transfer {rv.tid:016x} not taken: kept, owned again"
                          " being recorded")  # fmt: skip
        for u in self.unresolved.values():
            how = "held" if u.og is None else "COMMIT sent, answer lost"
            for t in u.tunnels:
                out[t] = ("unresolved", f"transfer {u.tid:016x} to {u.peer}: outcome unknown,"
                          f" {how}, asked {u.queries} time(s)")  # fmt: skip
        return out

    def forget_unresolved(self, tunnel: Tunnel) -> bool:
        """The operator discarded ``tunnel`` (recorded away or deleted, out of the engine):
        no longer asked about; an answer that comes later changes nothing for it. False if
        it was not unresolved here."""
        for tid, u in list(self.unresolved.items()):
            if tunnel in u.members:
                u.members.discard(tunnel)
                u.tunnels = [t for t in u.tunnels if t is not tunnel]
                if not u.tunnels:
                    del self.unresolved[tid]
                return True
        return False

    def _query(self, u: _Unresolved, now: float) -> list[Output]:
        u.next_query = now + self.settings.retry
        u.queries += 1
        tag = cxtp.TransferTag(u.tid, 0).encode()
        ext: tuple[bytes, ...] = (tag,)
        if u.age is not None:
            ext += (age_cdb(u.age + (now - u.since)),)
        return [Send(u.peer, cxtp.DQ(u.mn, cxtp.Answer.QUERY, ext))]

    def _on_answer(
        self, peer: str, msg: cxtp.DQ, tag: cxtp.TransferTag, now: float
    ) -> list[Output]:
        """Source: the answer to a decision query."""
        u = self.unresolved.get(tag.transfer_id)
        if u is None:
            return []  # not asked (or answered already): nothing changes
        if u.peer != peer:
            return self._foreign(peer, "answer", u.tid, u.peer)  # asked another peer
        # Per tunnel: a "taken" answer may name SAs the target refused (never activated
        # there, and never will be: the transfer is decided), as its CTDR did.
        refused_keys: set[tuple[int, int, IPAddress]] = set()
        if msg.answer == cxtp.Answer.TAKEN:
            for c in msg.ext[1:]:
                if cxtp.cdb_fpt(c) == cxtp.FPT_SA_RESULT:
                    r = cxtp.SaResult.decode(c)
                    if not cxtp.is_success(r.status):
                        refused_keys.add((r.protocol, r.spi, r.dst))

        def refused_here(t: Tunnel) -> bool:
            o = t.outbound
            return msg.answer != cxtp.Answer.TAKEN or (
                (int(o.protocol), o.spi, o.dst) in refused_keys
            )

        if u.og is not None:
            # Our COMMIT went out before its answer (commit_early): resolved as a CTDR
            # would have resolved it.
            refused = [t for t in u.tunnels if refused_here(t)]
            accepted = [t for t in u.tunnels if not refused_here(t)]
            if msg.answer != cxtp.Answer.TAKEN:
                why = f"not taken by {peer}: kept"
            else:
                why = f"taken by {peer}" + (f", {len(refused)} refused: kept" if refused else "")
            return self._resolve(u.og, accepted, refused, 0, now, why)
        del self.unresolved[u.tid]
        back = [t for t in u.tunnels if msg.answer == cxtp.Answer.TAKEN and refused_here(t)]
        if back:
            # Taken, but these refused: as "not taken" for them.
            kept = set(back)
            u.tunnels = [t for t in u.tunnels if t not in kept]
            w0 = self._resumed(back, peer)
            self.reverting.append(_Reverting(u.tid, back, w0, signals=u.signals))
        rec = Record(u.tid, "source", peer, "query", u.since, now, "resolved", len(u.tunnels))
        rec.spis = [sa.spi for t in u.tunnels for sa in t.sas()]
        out: list[Output] = []
        if msg.answer == cxtp.Answer.TAKEN:
            # The target has them (or may have sent on them): away for good.
            self._given_away(u.tunnels, peer, u.tid)
            for t in u.tunnels:
                self.engine.remove_tunnel(t)
            rec.accepted = len(u.tunnels)
            rec.detail = f"taken by {peer}" + (f", {len(back)} refused: kept" if back else "")
            out += self._settle_reverting(now)
        else:
            # Not taken, and refused there from now on: ours again once "owned" (with a
            # first block past the stored ceiling) is durable, held until then.
            w = self._resumed(u.tunnels, peer)
            self.reverting.append(_Reverting(u.tid, list(u.tunnels), w, signals=u.signals))
            rec.detail = f"not taken by {peer}: kept"
            out += self._settle_reverting(now)
        self.records.append(rec)
        out.append(Finished(rec))
        return out

    def _on_query(
        self, peer: str, msg: cxtp.DQ, tag: cxtp.TransferTag, now: float
    ) -> list[Output]:
        """Target: ``peer`` restarted and asks whether this gateway took transfer
        ``tag.transfer_id``. "Not taken" only when this gateway never sent on its tunnels
        and never will: the asking source then sends on them again.

        Only the transfer's source, or a peer of its fail-over pair (``Settings.pairs``),
        is answered about a transfer this gateway knows: another peer's query would commit
        it (pending), cancel it (receiving) or refuse its late messages, and the source,
        alive, could roll back and send beside us. Such a query is counted
        (``foreign_query``) and not acted on; about a transfer from another peer that was
        installed here it is answered "taken" (what this gateway did, whoever asks: it
        changes nothing here, and the asker, if it holds the tunnels, stops sending)."""
        tid = tag.transfer_id
        if not self._query_peer.allow(peer, now):
            self.counters["queries_limited"] += 1
            return []  # not even an answer: the peer floods us (a source asks again)
        pairs = self.settings.pairs.get(peer, frozenset())
        inc = self.incoming.get((peer, tid))
        if inc is None:
            # Asked by another peer than the source: the fail-over standby of a source that
            # died while transferring (it took the tunnels over held, marked leaving, and
            # asks for it: docs/cluster.md). The answer is the same as to the source.
            others = [self.incoming[(p, tid)] for p in self._incoming_peers.get(tid, ())
                      if p != peer]  # fmt: skip
            inc = next((i for i in others if i.peer in pairs), None)
            if inc is None and others:
                taken = others[0].state is IncomingState.ACTIVE
                return self._foreign_query(peer, msg, tid, others[0].peer, taken)
            if inc is None:
                came = self._arrivals.peers_of(tid)
                if came and peer not in came and not pairs.intersection(came):
                    return self._foreign_query(peer, msg, tid, came[0], True)
        source = inc.peer if inc is not None else peer
        out: list[Output] = []
        if inc is not None and inc.state is IncomingState.ACTIVE:
            taken = True
        elif (
            inc is not None
            and inc.state is IncomingState.PENDING
            and inc.prepared
            and not inc.committing
        ):
            # Prepared, never committed: the source (restarted) or its standby asks. It
            # sent no COMMIT that reached us (a late one from its dead connection finds
            # the transfer cancelled), so the tunnels stay with it: "not taken".
            out += self._discard(inc, now, "the source asked before its commit")
            taken = False
        elif inc is not None and inc.state is IncomingState.PENDING:
            # Installed, waiting for the COMMIT: the asking source sends nothing on them
            # (its "leaving" row is durable; or its standby holds them marked leaving and
            # the source is gone), so the query is its COMMIT.
            out += self._on_commit(source, tag, now)
            # (its "pending" write failed: discarded at the COMMIT, never activated)
            taken = not _cancelled(inc)
        elif inc is not None and inc.state is IncomingState.RECEIVING:
            out += self._cancel_incoming(inc, now, "cancelled", "the source asked, restarted")
            taken = False
        elif inc is not None:
            taken = False  # cancelled or refused: never activated here
        elif (
            self.journal is not None
            and (by := self.journal.discarded(tid)) is not None
            and len(self._arrivals.peers_of(tid)) <= 1
        ):
            # Forgotten (or this gateway restarted), recorded discarded before its COMMIT:
            # never activated here, and a late COMMIT finds nothing to activate. Answered
            # to its source or the source's pair only (as while it is known in memory).
            if by != peer and by not in pairs:
                return self._foreign_query(peer, msg, tid, by, False)
            source = by
            taken = False
        else:
            # Forgotten (or this gateway restarted): taken if it ever installed them, or if
            # its record of that may have been pruned (the AGE the source says is too old).
            taken = (peer, tid) in self._arrivals or any(
                (p, tid) in self._arrivals for p in pairs
            ) or (
                self.journal is not None
                and self.journal.may_have_arrived(tid, peer, parse_age(msg.ext[1:]))
            )
        if not taken:
            # Remembered per asker, bounded (a peer that floods queries evicts only its own
            # entries). The late data messages of the transfer are refused from the asker
            # and the source (when the standby asked, and this gateway knows the transfer).
            # A transfer not known here at all: from the asker and its fail-over pair (the
            # asker may be the standby of a source whose contexts, and COMMIT with
            # commit_early, are still on their way), and from every peer when the asker has
            # no pair here (it may be the standby of a source this gateway was not told of:
            # the invariant first; docs/cxtp.md). Another peer's transfer under the same id
            # is not refused for a query of a peer paired elsewhere.
            scope: frozenset[str] | None = frozenset({peer, source})
            if inc is None:
                scope = (pairs | {peer}) if pairs else None
            until = now + max(4 * self.settings.retry_max, 60.0)
            self.not_taken.add(peer, tid, until, scope)
        self.counters["queries_answered"] += 1
        answer = cxtp.Answer.TAKEN if taken else cxtp.Answer.NOT_TAKEN
        ttag = cxtp.TransferTag(tid, 0).encode()
        refused: list[bytes] = []
        if taken and inc is not None and inc.state is not IncomingState.CANCELLED:
            # Which of them were refused (never activated here), as the CTDR said: a source
            # that sent its COMMIT before the CTDR and lost it takes those back. Omitted if
            # too many for one message (the source then loses them: safe).
            for m in inc.ctdrs:
                for c in m.ext[1:]:
                    if (
                        cxtp.cdb_fpt(c) == cxtp.FPT_SA_RESULT
                        and not cxtp.is_success(cxtp.SaResult.decode(c).status)
                    ):
                        refused.append(c)
            if len(refused) > MAX_REFUSED_IN_ANSWER:
                refused = []
        return [*out, Send(peer, cxtp.DQ(msg.mn_prev, answer, (ttag, *refused)))]

    def _foreign_query(
        self, peer: str, msg: cxtp.DQ, tid: int, whose: str, taken: bool
    ) -> list[Output]:
        """A decision query from ``peer`` about ``whose``'s transfer ``tid`` (``peer`` is
        not of its fail-over pair): nothing changes here. Answered only "taken" when its
        tunnels were installed here (and may have been sent on): the safe answer for any
        asker; else not answered (the legitimate asker, a standby whose pair is not
        configured here, asks again and gets "taken" once the transfer is decided)."""
        self._foreign(peer, "query", tid, whose)
        if not taken:
            return []
        self.counters["queries_answered"] += 1
        ttag = cxtp.TransferTag(tid, 0).encode()
        return [Send(peer, cxtp.DQ(msg.mn_prev, cxtp.Answer.TAKEN, (ttag,)))]

    def forward(
        self, peer: str, packet: bytes, inbound: bool, og: _Outgoing | None = None
    ) -> list[Output]:
        """Wrap a packet that reached us after the cut-over for the new gateway."""
        if len(packet) > MAX_FORWARD_PACKET:
            return []
        self.counters["forwarded"] += 1
        tid = og.tid if og is not None else 0
        seq = 0
        if og is not None:
            seq = og.seq
            og.seq += 1
        tag = cxtp.TransferTag(tid, seq).encode()
        mn = ipaddress.ip_address("0.0.0.0") if og is None else og.mn
        return [Send(peer, cxtp.CTD(mn, 0, (tag, forward_cdb(packet, inbound))))]

    # -- target side -----------------------------------------------------------------
    def receive(
        self,
        peer: str,
        msg: cxtp.Message,
        now: float,
        *,
        may_send: bool = True,
        may_request: bool = True,
    ) -> list[Output]:
        """A CXTP message from an authenticated peer. A malformed one is counted and dropped;
        nothing that arrives raises out of here."""
        try:
            return self._receive(peer, msg, now, may_send, may_request)
        except (CxtpError, ContextError):
            self.counters["malformed"] += 1
            return []

    def _receive(
        self, peer: str, msg: cxtp.Message, now: float, may_send: bool, may_request: bool
    ) -> list[Output]:
        try:
            tag = cxtp.transfer_tag(msg)
        except CxtpError:
            self.counters["malformed"] += 1
            return []
        if isinstance(msg, cxtp.CTReq):
            return self._on_ctreq(peer, msg, tag, now, may_request)
        if tag is None:
            self.counters["malformed"] += 1
            return []
        forwarded = (
            isinstance(msg, cxtp.CTD)
            and len(msg.cdbs) == 2
            and cxtp.cdb_fpt(msg.cdbs[1]) == FPT_FORWARD
        )
        key = (peer, tag.transfer_id, tag.seq)
        # Decisions (COMMIT, CTC), final replay states and CTDRs are idempotent and may
        # legitimately come again (a re-sent CTDR asks for the decision again): only data
        # messages are deduplicated.
        decision = isinstance(msg, cxtp.PCTD | cxtp.CTD) and (
            self._is_decision(msg) or self._is_final(msg)
        )
        if (
            key in self.seen
            and not forwarded
            and not decision
            and not isinstance(msg, cxtp.CTDR | cxtp.CTC | cxtp.DQ)
        ):
            self.counters["replayed"] += 1
            return []
        if forwarded:
            assert isinstance(msg, cxtp.CTD)
            if not may_send:  # only a peer that may hand us SAs may hand us their traffic
                self.counters["refused"] += 1
                return []
            pkt, inbound = parse_forward(msg.cdbs[1])
            if not self._forward_allowed(peer, pkt, inbound, now):
                self.counters["forward_refused"] += 1
                if self.on_foreign is not None:
                    self.on_foreign(peer, "forward", tag.transfer_id, "")
                return []
            return [Inject(pkt, inbound)]
        if isinstance(msg, cxtp.DQ):
            # (Not remembered as seen: it names the transfer, not one of its messages.)
            if msg.answer == cxtp.Answer.QUERY:
                return self._on_query(peer, msg, tag, now)
            return self._on_answer(peer, msg, tag, now)
        if key not in self.seen:
            n = self._seen_of.get(peer, 0)
            if n >= self.settings.max_seen_per_peer:
                self.counters["over_limit"] += 1
                return []
            self._seen_of[peer] = n + 1
        self.seen[key] = now + self.settings.retry_max * 2
        if isinstance(msg, cxtp.PCTD | cxtp.CTD) and self._is_decision(msg):
            return self._on_commit(peer, tag, now, parse_grant(msg.cdbs[1]))
        if isinstance(msg, cxtp.CTD) and self._is_final(msg):
            return self._on_final(peer, tag, msg.cdbs[1:])
        if isinstance(msg, cxtp.CTD) and len(msg.cdbs) == 2 and (
            cxtp.cdb_fpt(msg.cdbs[1]) == FPT_PREPARE
        ):
            return self._on_prepare(peer, msg, tag, now)
        if isinstance(msg, cxtp.CTD) and all(
            cxtp.cdb_fpt(c) == cxtp.FPT_DETAIL for c in msg.cdbs[1:]
        ):
            # The answer to our CT-Req was a refusal (unknown MN, bad token, busy, ...).
            detail = " ".join(cxtp.Detail.decode(c).text for c in msg.cdbs[1:]) or "refused"
            rec = Record(tag.transfer_id, "target", peer, "reactive", now, now, "refused")
            rec.detail = detail
            self.records.append(rec)
            return [Finished(rec)]
        if isinstance(msg, cxtp.PCTD | cxtp.CTD):
            if not may_send:
                self.counters["refused"] += 1
                return [
                    Send(
                        peer,
                        cxtp.CTDR(
                            msg.mn_prev,
                            False,
                            (cxtp.StatusEntry(context.FPT_IPSEC_SA, cxtp.Status.UNAUTHORISED),),
                            (cxtp.TransferTag(tag.transfer_id, 0, last=True).encode(),),
                        ),
                    )
                ]
            return self._on_data(peer, msg, tag, now)
        if isinstance(msg, cxtp.CTDR):
            return self._on_ctdr(peer, msg, tag, now)
        if isinstance(msg, cxtp.CTC):
            return self._on_cancel(peer, tag, now)
        self.counters["malformed"] += 1
        return []

    def _forward_allowed(self, peer: str, packet: bytes, inbound: bool, now: float) -> bool:
        """A FORWARD is taken only for a tunnel that ``peer`` itself moved here, within this
        gateway's forward window after the commit, and only a packet that belongs to that
        tunnel: ESP under its inbound SPI, or an inner packet its policy (and no other entry
        ahead of it) selects. Anything else would let a peer inject into others' tunnels."""
        if inbound:
            if len(packet) < 8:
                return False
            spi = int.from_bytes(packet[0:4], "big")
            tunnel = self.engine.inbound_tunnel(spi)
            if tunnel is None:
                # The tunnel that arrived has gone since (an IKEv2 CHILD SA the MN rekeyed with
                # us right after a handover with direct identity, and then deleted): ESP under
                # its SPI is still taken, for what the engine kept of it (the adapter keeps a
                # peer-deleted inbound SA a moment for packets on their way).
                return any(
                    p == peer and now < until and t.inbound is not None and t.inbound.spi == spi
                    for t, (p, until) in self.arrived.items()
                )
        else:
            tunnel = self.engine.policy_tunnel(packet)
        if tunnel is None:
            return False
        came = self.arrived.get(tunnel)
        if came is not None:
            return came[0] == peer and now < came[1]
        if tunnel.state is TunnelState.HELD:
            # The COMMIT came but its activation waits for the durable "pending" record: what
            # the source forwards meanwhile is held with the tunnel's other packets (the
            # engine checks inbound ESP's ICV first) and injected when it activates.
            return any(
                inc.peer == peer and inc.committing and inc.state is IncomingState.PENDING
                and _has(inc, tunnel)
                for inc in self.incoming.values()
            )  # fmt: skip
        if inbound or tunnel.state is not TunnelState.ACTIVE:
            return False
        # The tunnel that arrived may have been replaced here since, its traffic now carried by
        # a successor (as above, while the access network still routed the MN's traffic to the
        # old gateway): an inner packet the arrived tunnel's own policy selects is still taken.
        try:
            hdr = ippacket.parse(packet)
        except PacketError:
            return False
        sport, dport = hdr.ports(packet)
        return any(
            p == peer and now < until
            and t.entry.selectors.matches(hdr.src, hdr.dst, hdr.protocol, sport, dport)
            for t, (p, until) in self.arrived.items()
        )

    @staticmethod
    def _is_decision(msg: cxtp.PCTD | cxtp.CTD) -> bool:
        return len(msg.cdbs) == 2 and cxtp.cdb_fpt(msg.cdbs[1]) == FPT_DECISION

    @staticmethod
    def _is_final(msg: cxtp.PCTD | cxtp.CTD) -> bool:
        return (
            isinstance(msg, cxtp.CTD)
            and len(msg.cdbs) >= 2
            and all(cxtp.cdb_fpt(c) == FPT_FINAL for c in msg.cdbs[1:])
        )

    def _on_final(self, peer: str, tag: cxtp.TransferTag, cdbs: Iterable[bytes]) -> list[Output]:
        """The source's final states (make-before-break), just before its COMMIT, into the
        pending tunnels (which send and accept nothing before they are activated):

        - the inbound window is merged, so that nothing the source accepted after its
          snapshot is accepted here again (a merge never unmarks a number: a repeated or
          stale state changes nothing);
        - the outbound SA goes on right after the last number the source sent instead of
          past its cap: the MN then sees one run of numbers, as without make-before-break,
          and its replay window still takes the source's last packets if they arrive after
          our first ones. The source stopped at that number for good (it sends this only
          when it has recorded the tunnel given away and stopped), and its word on it is
          what the transferred number always was. But never back to or below a number this
          gateway may have sent under those keys itself (the journal's ``prior_ceiling``:
          it held the tunnel before, and this is a stale context of it or the tunnel coming
          back): a FINAL from a gateway that held the tunnel before us set our counter back
          to its old number, and we sent our own numbers again (counted ``stale_final``).

        Only for a pending transfer from that peer; a malformed CDB is counted and left out
        (the tunnel keeps the snapshot's window and the cap: docs/security.md)."""
        inc = self.incoming.get((peer, tag.transfer_id))
        if inc is None and (whose := self._whose_incoming(peer, tag.transfer_id)) is not None:
            return self._foreign(peer, "final", tag.transfer_id, whose)
        if inc is None or inc.state is not IncomingState.PENDING:
            self.counters["refused"] += 1
            return []
        for c in cdbs:
            try:
                body = unframe(c)
                if len(body) < 8:
                    raise CxtpError("FINAL CDB too short")
                out_spi, in_spi = struct.unpack_from("!II", body)
                pair = inc.pairs.get((out_spi, in_spi))
                if pair is None:
                    raise CxtpError("FINAL CDB for an SA not in this transfer")
                out_sa, in_sa = pair
                size = in_sa.replay_window if in_sa is not None else 0
                _, _, out_seq, top, bitmap = parse_final(c, size)
                if top and in_sa is not None:
                    in_sa.window.merge(top, bitmap)
                if out_seq < out_sa.seq_limit:
                    # Never back to a number this gateway may have sent under these keys
                    # itself (it held the tunnel before: a stale context of it, or one
                    # that comes back): past its own recorded ceiling then.
                    floor = self.journal.prior_ceiling(out_sa) if self.journal else 0
                    if out_seq < floor:
                        self.counters["stale_final"] += 1
                    out_sa.seq = max(out_seq, floor)
            except (CxtpError, SAError):
                self.counters["malformed"] += 1
        return []

    def _on_data(
        self, peer: str, msg: cxtp.PCTD | cxtp.CTD, tag: cxtp.TransferTag, now: float
    ) -> list[Output]:
        k = (peer, tag.transfer_id)
        s = self.settings
        inc = self.incoming.get(k)
        if inc is None and self.not_taken.refuses(peer, tag.transfer_id):
            # This transfer was answered "not taken" (its source restarted and asked): a
            # late message of it from the dead connection must not install it now.
            self.counters["refused"] += 1
            return []
        if inc is None and (whose := self._whose_incoming(peer, tag.transfer_id)) is not None:
            # The id of another peer's transfer towards us (ids are the source's choice):
            # refused, so that a query, a COMMIT or the durable state never takes one for
            # the other.
            self._unsee((peer, tag.transfer_id, tag.seq))
            self._foreign(peer, "data", tag.transfer_id, whose)
            return [self._refusal(peer, msg.mn_prev, tag.transfer_id, cxtp.Status.BUSY)]
        if inc is None:
            busy = sum(
                1
                for i in self._open_incoming.values()
                if i.peer == peer
            )
            if busy >= s.max_incoming_per_peer:
                # Refused before anything is kept: not even the message's replay record.
                self.counters["over_limit"] += 1
                self._unsee((peer, tag.transfer_id, tag.seq))
                return [self._refusal(peer, msg.mn_prev, tag.transfer_id, cxtp.Status.BUSY)]
            mode = "predictive" if isinstance(msg, cxtp.PCTD) else "reactive"
            inc = _Incoming(
                tag.transfer_id,
                peer,
                msg.mn_prev,
                Record(tag.transfer_id, "target", peer, mode, now),
            )
            # An unfinished transfer expires: whatever a peer sends, it cannot keep contexts
            # (or a place among its in-progress transfers) here for longer than this.
            inc.give_up = now + s.retry_max
            self.incoming[k] = inc
            self._open_incoming[k] = inc
            self._incoming_peers.setdefault(tag.transfer_id, []).append(peer)
        elif inc.state is not IncomingState.RECEIVING:
            return []
        cdbs = msg.cdbs[1:]
        octets = sum(len(c) for c in cdbs)
        if (
            len(cdbs) > s.max_contexts_per_message
            or len(inc.cdbs) + len(cdbs) > s.max_contexts_per_transfer
            or inc.octets + octets > s.max_transfer_octets
        ):
            self.counters["over_limit"] += 1
            out = self._cancel_incoming(inc, now, "refused", "too many contexts")
            return [*out, self._refusal(peer, msg.mn_prev, tag.transfer_id, cxtp.Status.BUSY)]
        inc.cdbs.extend(cdbs)
        inc.octets += octets
        if not tag.last:
            return []
        return self._install(inc, now)

    def _unsee(self, key: tuple[str, int, int]) -> None:
        if self.seen.pop(key, None) is not None:
            n = self._seen_of[key[0]] - 1
            if n:
                self._seen_of[key[0]] = n
            else:
                del self._seen_of[key[0]]

    def _refusal(self, peer: str, mn: IPAddress, tid: int, status: int) -> Send:
        return Send(
            peer,
            cxtp.CTDR(
                mn,
                False,
                (cxtp.StatusEntry(context.FPT_IPSEC_SA, status),),
                (cxtp.TransferTag(tid, 0, last=True).encode(),),
            ),
        )

    def _closed(self, inc: _Incoming) -> None:
        """``inc`` was decided (active or cancelled) and its ``give_up`` set: it leaves the
        open ones, and is forgotten at ``give_up`` by the timer's walk (handle_timer)."""
        self._open_incoming.pop((inc.peer, inc.tid), None)
        self._closed_due = min(self._closed_due, inc.give_up)

    def _cancel_incoming(self, inc: _Incoming, now: float, outcome: str, why: str) -> list[Output]:
        """Give up an incoming transfer that is still being received: free what it holds.
        It stays known (cancelled, without its contexts) for a while so that its late
        messages are recognised and dropped rather than starting it again."""
        inc.cdbs = []
        inc.octets = 0
        _move(inc, IncomingState.CANCELLED)
        inc.give_up = now + self.settings.retry_max
        self._closed(inc)
        inc.record.outcome, inc.record.detail, inc.record.ended = outcome, why, now
        self.records.append(inc.record)
        return [Finished(inc.record)]

    def _check_supported(self, sa: SecurityAssociation) -> bool:
        s = self.settings
        return sa.enc in s.supported_enc and sa.integ in s.supported_integ

    def _install(self, inc: _Incoming, now: float) -> list[Output]:
        """Decide on each transferred tunnel; install the accepted ones held (pending)."""
        sas: list[SecurityAssociation] = []
        statuses: list[int] = []
        results: list[bytes] = []
        units: list[tuple[int, list[int], bytes]] = []
        try:
            for c in inc.cdbs:
                if cxtp.cdb_fpt(c) == FPT_UNIT:
                    units.append(parse_unit(c))
                else:
                    sas.append(context.decode(c, now))
            pairs = _pair_up(sas)
        except (ContextError, CxtpError) as exc:
            _move(inc, IncomingState.CANCELLED)
            inc.cdbs, inc.octets = [], 0
            inc.give_up = now + self.settings.retry_max
            self._closed(inc)
            inc.record.outcome, inc.record.detail, inc.record.ended = "refused", str(exc), now
            self.records.append(inc.record)
            # Announced like every other refusal (transfer-refused on the target: it logged
            # nothing, though the source saw the refusal).
            out: list[Output] = [
                Send(inc.peer, m) for m in self._ctdr(inc, False, [cxtp.Status.MALFORMED], [])
            ]
            return [*out, Finished(inc.record)]
        inc.cdbs, inc.octets = [], 0
        inc.record.tunnels = len(pairs)
        outcomes: list[_Outcome] = []
        indexes = self._overlap_index(inc.peer)
        accepted: _Accept = (accept_ranges(self.settings), {})
        unit_refused, admitted = self._check_units(
            inc.peer,
            inc.tid,
            units,
            {
                out_sa.spi: [sa.selectors for sa in (out_sa, in_sa) if sa and sa.selectors]
                for out_sa, in_sa in pairs
            },
        )
        batch = _Batch()
        for out_sa, in_sa in pairs:
            old_in = in_sa.spi if in_sa is not None else 0
            inc.pairs[(out_sa.spi, old_in)] = (out_sa, in_sa)
            if out_sa.spi in unit_refused:
                outcomes.append((out_sa, in_sa, cxtp.Status.UNAUTHORISED, None, old_in))
                continue
            status, new_spi = self._install_one(
                inc, out_sa, in_sa, now, indexes, accepted, batch
            )
            outcomes.append((out_sa, in_sa, status, new_spi, old_in))
        self._flush(inc, batch)
        if batch.failed:  # refused by the engine after all (not expected: checked above)
            outcomes = [
                (o, i, cxtp.Status.SPI_COLLISION if id(o) in batch.failed else st, spi, old)
                for o, i, st, spi, old in outcomes
            ]
        if units:
            outcomes = self._all_or_none(inc, units, outcomes)
        for t in inc.tunnels:
            t.came_from = inc.peer  # (the IKE SA of a unit may follow the COMMIT and name it)
        if inc.tunnels:
            self._arrivals.remember((inc.peer, inc.tid))
        if inc.tunnels and self.journal is not None:
            # Recorded pending and reserved past the transferred sequence number while the
            # CTDR travels: the tunnels are activated (and their SAs may send) only once that
            # is durable, or under the COMMIT's grant. A journal that refuses at once
            # refuses the tunnels.
            inc.transferred = {id(t.outbound): t.outbound.seq for t in inc.tunnels}
            try:
                inc.recorded = self.journal.arriving(inc.tunnels, inc.peer, inc.tid)
            except JournalError:
                for t in inc.tunnels:
                    self.engine.remove_tunnel(t)
                inc.tunnels = []
                inc.signals.clear()
                outcomes = [
                    (o, i, cxtp.Status.INTERNAL_ERROR, None, old) for o, i, _, _, old in outcomes
                ]
        if admitted:
            self._units_kept(inc, admitted, outcomes)
        ok = all(o[2] == cxtp.Status.SUCCESS for o in outcomes)
        for out_sa, in_sa, status, new_spi, old_in in outcomes:
            statuses.append(status)
            if ok:
                continue  # S bit set: every SA not listed was installed as it came
            results.append(
                cxtp.SaResult(
                    status, int(out_sa.protocol), out_sa.spi, out_sa.spi, out_sa.dst
                ).encode()
            )
            if in_sa is not None:
                results.append(
                    cxtp.SaResult(
                        status,
                        int(in_sa.protocol),
                        old_in,
                        new_spi if new_spi is not None else old_in,
                        in_sa.dst,
                    ).encode()
                )
        inc.record.accepted = sum(cxtp.is_success(st) for st in statuses)
        _move(inc, IncomingState.PENDING if inc.tunnels else IncomingState.CANCELLED)
        inc.ctdrs = self._ctdr(inc, ok, statuses, results)
        inc.next_retry = now + self.settings.retry
        inc.give_up = now + self.settings.retry_max
        if not inc.tunnels:
            self._closed(inc)
            inc.record.outcome, inc.record.ended = "refused", now
            inc.record.detail = ", ".join(sorted({_status_name(st) for st in statuses}))
            self.records.append(inc.record)
            # Every tunnel refused (policy, overlap, SPI, unit, journal): the CTDR says so to
            # the source, and the operator here is told as of any other refused transfer.
            return [*(Send(inc.peer, m) for m in inc.ctdrs), Finished(inc.record)]
        return [Send(inc.peer, m) for m in inc.ctdrs]

    def _ctdr(
        self, inc: _Incoming, ok: bool, statuses: list[int], results: list[bytes]
    ) -> list[cxtp.CTDR]:
        """The reply, in as many CTDRs as the SA_RESULTs need (64 KiB each at most).

        The status entries name each distinct status once (RFC 4067 lists failed FPTs; all
        our contexts share one FPT), the most frequent failure first. With the S bit set
        every SA was installed as it came and none is listed; otherwise every SA has an
        SA_RESULT, except when nothing could be decoded: then the first status applies to all.
        """
        distinct = sorted(
            set(statuses) - {cxtp.Status.SUCCESS}, key=lambda st: -statuses.count(st)
        ) or [cxtp.Status.SUCCESS]
        entries = tuple(cxtp.StatusEntry(context.FPT_IPSEC_SA, st) for st in distinct)
        per_msg = 1500
        chunks = [results[i : i + per_msg] for i in range(0, len(results), per_msg)] or [[]]
        msgs = []
        for i, chunk in enumerate(chunks):
            tag = cxtp.TransferTag(inc.tid, inc.seq, last=i == len(chunks) - 1).encode()
            inc.seq += 1
            msgs.append(cxtp.CTDR(inc.mn, ok, entries, (tag, *chunk)))
        return msgs

    def _check_units(
        self,
        peer: str,
        tid: int,
        units: list[tuple[int, list[int], bytes]],
        present: Mapping[int, list[Selectors]],
    ) -> tuple[set[int], list[tuple[int, list[int], bytes]]]:
        """The outbound SPIs of the units this gateway cannot take (no check for their kind,
        or the check says why not: an IKE SA of a connection it does not have), and the
        units admitted (kind, their SPIs among ``present``, payload). A unit that names none
        of the transfer's tunnels (``present``) is refused unchecked: a source names the
        CHILD SAs that go, and the IKE check reserves the virtual IPs of a unit until the
        transfer ends (a peer's made-up units held a pool from new clients). The payloads
        admitted for the same tunnels (one unit's pieces) are then asked about together
        (``unit_whole``: an IKE unit none of whose pieces names the peer is refused)."""
        refused: set[int] = set()
        admitted: list[tuple[int, list[int], bytes]] = []
        whole: dict[tuple[int, tuple[int, ...]], list[bytes]] = {}
        for kind, spis, payload in units:
            mine = [spi for spi in spis if spi in present]
            if not mine:
                self.counters["unit_refused"] += 1
                continue
            check = self.unit_checks.get(kind)
            why = (
                f"no unit of kind {kind} here"
                if check is None
                else check(peer, payload, tid, mine)
            )
            if why is not None:
                self.counters["unit_refused"] += 1
                refused.update(spis)
            else:
                admitted.append((kind, mine, payload))
                if self.unit_whole.get(kind) is not None:
                    whole.setdefault((kind, tuple(spis)), []).append(payload)
        for (kind, spis_), payloads in whole.items():
            if refused.intersection(spis_):
                continue
            if self.unit_whole[kind](peer, list(spis_), payloads, present) is not None:
                self.counters["unit_refused"] += 1
                refused.update(spis_)  # (unit_kept gives back what its checks held)
        return refused, admitted

    def _units_kept(
        self,
        inc: _Incoming,
        admitted: list[tuple[int, list[int], bytes]],
        outcomes: list[_Outcome],
    ) -> None:
        """Tell each kind's ``unit_kept`` which of its admitted units kept all their tunnels
        (the others were refused after their check: what the check holds for them, the IKE
        adapter's reserved virtual IPs, is given back now rather than at the transfer's
        end)."""
        status = {o[0].spi: o[2] for o in outcomes}
        kept: dict[int, list[tuple[list[int], bytes]]] = {}
        for kind, spis, payload in admitted:
            units = kept.setdefault(kind, [])
            if all(cxtp.is_success(status.get(spi, cxtp.Status.UNAUTHORISED)) for spi in spis):
                units.append((spis, payload))
        for kind, units in kept.items():
            hook = self.unit_kept.get(kind)
            if hook is not None:
                hook(inc.peer, inc.tid, units)

    def _all_or_none(
        self,
        inc: _Incoming,
        units: list[tuple[int, list[int], bytes]],
        outcomes: list[_Outcome],
    ) -> list[_Outcome]:
        """A unit's tunnels are installed all or none: if one of them was refused, the others
        (installed held, nothing sent or accepted on them yet) are removed and refused too
        (UNAUTHORISED), so that the source keeps the whole unit (an IKE SA with all its CHILD
        SAs) rather than splitting it."""
        status = {o[0].spi: o[2] for o in outcomes}
        undo: set[int] = set()
        for _, spis, _ in units:
            present = [spi for spi in spis if spi in status]
            if any(not cxtp.is_success(status[spi]) for spi in present):
                undo.update(spi for spi in present if cxtp.is_success(status[spi]))
        if not undo:
            return outcomes
        for t in [t for t in inc.tunnels if t.outbound.spi in undo]:
            self.engine.remove_tunnel(t)
            inc.tunnels.remove(t)
            inc.signals.pop(id(t), None)
        return [
            (o, i, cxtp.Status.UNAUTHORISED if o.spi in undo else st, None if o.spi in undo
             else spi, old)
            for o, i, st, spi, old in outcomes
        ]  # fmt: skip

    def _overlap_index(self, peer: str) -> tuple[OverlapIndex, OverlapIndex]:
        """The selectors of every tunnel here, to refuse transferred ones that overlap them,
        and apart from them the tunnels this gateway moved to ``peer`` and still forwards
        for: those may come back (and are then replaced)."""
        index, returning = OverlapIndex(), OverlapIndex()
        for e in self.engine.spd:
            t = self.engine.tunnel_of_entry(e)
            if t is None:
                continue
            if t.state is TunnelState.MOVED and t.forward_to == peer:
                returning.add(e.selectors, t)
            else:
                index.add(e.selectors, t)
        return index, returning

    @staticmethod
    def _policy_allows(sel: Selectors, policy: _Accept) -> bool:
        """Are ``sel`` inside what the operator allows for transferred tunnels (``policy``:
        the accepted local and remote ranges, None for no limit)? Memoized per Selectors
        object (the decoder shares one object among the SAs whose selectors are encoded
        alike, e.g. both SAs of a tunnel); the caller keeps the objects alive meanwhile."""
        accept, allowed = policy
        ok = allowed.get(id(sel))
        if ok is None:
            ok = accept is None or sel.within(*accept)
            allowed[id(sel)] = ok
        return ok

    def _install_one(
        self,
        inc: _Incoming,
        out_sa: SecurityAssociation,
        in_sa: SecurityAssociation | None,
        now: float,
        indexes: tuple[OverlapIndex, OverlapIndex],
        accepted: _Accept,
        batch: _Batch,
    ) -> tuple[int, int | None]:
        """Check one transferred tunnel and install it held, or say why not. A tunnel that
        needs nothing special joins ``batch`` (added with the others in one engine call); one
        whose inbound SPI is taken, or that replaces a forwarder, is installed at once, after
        the batch so far (so every check sees what was installed before it)."""
        index, returning = indexes
        if not self._check_supported(out_sa) or (
            in_sa is not None and not self._check_supported(in_sa)
        ):
            return cxtp.Status.UNSUPPORTED_ALGORITHM, None
        out_sel = out_sa.selectors
        in_sel = in_sa.selectors if in_sa is not None else out_sel
        if out_sel is None or in_sel is None:
            return cxtp.Status.MALFORMED, None
        # Both SAs' selectors, once each (usually one object for both).
        sels = [out_sel] if in_sel is out_sel else [out_sel, in_sel]
        # This gateway's policy, not the peer's, decides what traffic a tunnel may carry:
        # inside what the operator allows for transferred tunnels, and nobody else's.
        # (Loops, not all() and any() over generators: asked for every transferred tunnel.)
        for sl in sels:
            if not self._policy_allows(sl, accepted):
                self.counters["policy_refused"] += 1
                return cxtp.Status.UNAUTHORISED, None
        for sl in sels:
            if _overlaps(inc, index.overlapping(sl), out_sa.dst):
                self.counters["policy_refused"] += 1
                return cxtp.Status.UNAUTHORISED, None
        sad = self.engine.sad
        out_key = _sa_key(out_sa)
        if out_key in batch.keys or sad.in_use(out_sa.dst, out_sa.protocol, out_sa.spi):
            return cxtp.Status.BUSY, None  # we hold this SA already
        if (
            out_sa.spi in batch.out_spis or sad.outbound_with_spi(out_sa.spi) is not None
        ) and not any(returning.overlapping(sl) for sl in sels):
            # Another tunnel here (or before it in this install) sends with this SPI, to
            # another client (the SPI is the client's choice): fail-over replicas, etcd keys
            # and cluster grouping know a tunnel by it, one of the two would be lost at a
            # take-over. (A forwarder of this very tunnel coming back goes first, below.)
            self.engine.stats.outbound_spi_refused += 1
            return cxtp.Status.SPI_COLLISION, None
        direct = self.settings.identity is Identity.DIRECT
        take_over_pair(
            out_sa, in_sa, self.endpoint, self.settings.identity, path_mtu=self.settings.path_mtu
        )
        in_key = _sa_key(in_sa) if in_sa is not None else None
        if (
            in_sa is None
            or (
                in_key != out_key
                and in_key not in batch.keys
                and not sad.in_use(in_sa.dst, in_sa.protocol, in_sa.spi)
            )
        ) and not any(returning.overlapping(sl) for sl in sels):
            # The common case: no conflict, nothing to replace. Checked against the engine
            # and the batch; added with the batch.
            entry = SPDEntry(out_sel, Action.PROTECT, name=out_sa.name, static=False)
            batch.items.append((entry, out_sa, in_sa))
            batch.keys.add(out_key)
            batch.out_spis.add(out_sa.spi)
            if in_key is not None:
                batch.keys.add(in_key)
            for sl in sels:
                index.add(sl, entry)  # stands for its tunnel: later tunnels must not overlap
            inc.own[id(entry)] = (entry, out_sa.dst)  # ... unless they go to the same MN
            if direct:
                if batch.sg_only is None:
                    batch.sg_only = [signalling.SgUpdate(self.endpoint.host, self.endpoint.port)]
                batch.signals.append(batch.sg_only)
            else:
                batch.signals.append([])
            return cxtp.Status.SUCCESS, None
        self._flush(inc, batch)  # what came before is in the engine before this one
        status: int = cxtp.Status.SUCCESS
        new_spi: int | None = None
        shadow_old = False
        signals: list[signalling.SignalItem] = []
        if in_sa is not None and self.engine.sad.in_use(in_sa.dst, in_sa.protocol, in_sa.spi):
            policy = self.settings.conflict
            if policy is ConflictPolicy.DENY:
                return cxtp.Status.SPI_COLLISION, None
            if policy is ConflictPolicy.RENEGOTIATE:
                status = cxtp.Status.ACCEPTED_RENEGOTIATE
                in_sa.rekey_requested = True
                out_sa.rekey_requested = True
            else:
                status = cxtp.Status.ACCEPTED_SPI_REASSIGNED
                old = in_sa.spi
                blk = self.settings.spi_block
                cands = (
                    blk.candidates(lambda n: self.rng(32) % n)
                    if blk is not None
                    else iter(lambda: self.rng(32), -1)
                )
                try:  # a bounded search: a full block refuses, it never spins
                    new_spi = self.engine.sad.free_spi(
                        in_sa.dst, in_sa.protocol, itertools.islice(cands, 4096)
                    )
                except SAError:
                    return cxtp.Status.SPI_COLLISION, None
                in_sa.spi = new_spi
                shadow_old = True
                signals.append(signalling.SpiReassign(int(in_sa.protocol), old, new_spi))
        entry = SPDEntry(out_sel, Action.PROTECT, name=out_sa.name, static=False)
        # A tunnel coming back to us while we still forward its traffic to that peer: the
        # forwarder goes, the tunnel takes its place.
        for sl in sels:
            for t in returning.overlapping(sl):
                assert isinstance(t, Tunnel)
                if t.state is TunnelState.MOVED:
                    self.engine.remove_tunnel(t)
        try:
            # Appended: the operator's own entries (DISCARD, BYPASS, the configured tunnels)
            # stay ahead of anything a peer hands over.
            if status == cxtp.Status.ACCEPTED_RENEGOTIATE and in_sa is not None:
                # Its SPI is taken here: it is reachable only as a shadow, tried when the
                # SPI's owner does not verify a packet.
                tunnel = self.engine.add_tunnel(entry, out_sa, None, own_outbound_spi=True)
                self.engine.attach_shadow_inbound(tunnel, in_sa)
            else:
                # (an outbound SPI another tunnel here has, to another destination, is
                # refused too: Engine.outbound_spi_holder)
                tunnel = self.engine.add_tunnel(entry, out_sa, in_sa, own_outbound_spi=True)
        except SAError:
            return cxtp.Status.SPI_COLLISION, None
        for sl in sels:
            index.add(sl, tunnel)
        inc.own[id(entry)] = (entry, out_sa.dst)
        if shadow_old and in_sa is not None and signals:
            item = signals[0]
            assert isinstance(item, signalling.SpiReassign)
            self.engine.add_shadow(in_sa, item.old_spi)  # until the MN has switched
        self.engine.hold(tunnel)
        if direct:
            signals.insert(0, signalling.SgUpdate(self.endpoint.host, self.endpoint.port))
        inc.tunnels.append(tunnel)
        if signals:
            inc.signals[id(tunnel)] = signals
        return status, new_spi

    def _flush(self, inc: _Incoming, batch: _Batch) -> None:
        """Add the batch's tunnels in one engine call, held, in the order they came."""
        if not batch.items:
            return
        # (an outbound SPI another tunnel has was refused before it joined: batch.out_spis)
        tunnels = self.engine.add_tunnels(batch.items, held=True)
        for (_, out_sa, _), tunnel, signals in zip(
            batch.items, tunnels, batch.signals, strict=True
        ):
            if tunnel is None:
                batch.failed.add(id(out_sa))
                continue
            inc.tunnels.append(tunnel)
            if signals:
                inc.signals[id(tunnel)] = signals
        batch.items, batch.signals, batch.keys, batch.out_spis = [], [], set(), set()

    def _on_commit(
        self, peer: str, tag: cxtp.TransferTag, now: float, grant: int = 0
    ) -> list[Output]:
        inc = self.incoming.get((peer, tag.transfer_id))
        if inc is None:
            whose = self._whose_incoming(peer, tag.transfer_id)
            return [] if whose is None else self._foreign(peer, "commit", tag.transfer_id, whose)
        if inc.state is not IncomingState.PENDING or inc.committing:
            if inc.state is IncomingState.CANCELLED:
                # Given up here (sa delete, no decision in time) while the source committed:
                # its tunnels are served by nobody until they are re-keyed. Counted.
                self.counters["commit_after_cancel"] += 1
            return []
        inc.committing = True
        if inc.recorded is not None and not inc.recorded.settled:
            if grant and self._grant(inc, grant):
                return self._activate(inc, now)
            return []  # activated by settled() once "pending" and the first block are durable
        return self._activate(inc, now)

    def withdraw(self, tunnel: Tunnel, now: float, why: str) -> tuple[str, list[Output]] | None:
        """``tunnel`` is to go from here (``sa delete``) while a transfer towards us holds
        it installed, not active. Before its COMMIT came, the whole transfer is cancelled and
        its source told (a CTC: a source still waiting for our answer or its commit rolls
        back and keeps serving them; a COMMIT already on its way finds the transfer
        cancelled and activates nothing, counted ``commit_after_cancel``). After the COMMIT
        (activation waiting for our record), the tunnel is ours: it is left out of the
        activation. Returns (what was done, outputs), or None if no transfer holds it."""
        for inc in self._open_incoming.values():
            if not _has(inc, tunnel):
                continue
            if inc.committing:
                inc.tunnels = [t for t in inc.tunnels if t is not tunnel]
                return f"committed here by transfer {inc.tid:016x}, not yet active", []
            ctc = cxtp.CTC(inc.mn, (self._tag(inc),))
            n = len(inc.tunnels)
            out: list[Output] = [Send(inc.peer, ctc)]
            out += self._discard(inc, now, f"cancelled here: {why}")
            return (
                f"was arriving by transfer {inc.tid:016x} from {inc.peer} (not committed):"
                f" the transfer is cancelled, its {n} tunnel(s) stay with {inc.peer}"
            ), out
        return None

    def awaiting_commit(self, tunnel: Tunnel) -> bool:
        """Was ``tunnel`` installed here by a transfer whose COMMIT has not come (it may
        still be cancelled, the tunnel staying with its source)? What follows a COMMIT (an
        IKE SA's context) is not taken for it before."""
        return any(
            not inc.committing and _has(inc, tunnel) for inc in self._open_incoming.values()
        )

    def incoming_state(self, peer: str, tid: int) -> str:
        """Where ``peer``'s transfer ``tid`` towards us is: "open" (not decided: it may yet
        be cancelled, or its COMMIT come), "committed" (activated), or "ended" (refused,
        cancelled, failed, or not known here)."""
        inc = self.incoming.get((peer, tid))
        if inc is None:
            return "ended"
        if inc.state in OPEN_INCOMING:
            return "open"
        return "committed" if inc.state is IncomingState.ACTIVE else "ended"

    def _whose_incoming(self, peer: str, tid: int) -> str | None:
        """The peer (not ``peer``) whose transfer ``tid`` towards us is known here, if any
        (ids are the source's choice: another peer may name one; a few entries per peer)."""
        return next((p for p in self._incoming_peers.get(tid, ()) if p != peer), None)

    def _foreign(self, peer: str, kind: str, tid: int, whose: str) -> list[Output]:
        """A message of ``kind`` from ``peer`` about transfer ``tid``, which is ``whose``'s
        (another peer's): not acted on (acting on it would commit, cancel, query or feed
        another gateway's transfer, docs/security.md). Counted per kind; the adapter is
        told (one log line, rate-limited)."""
        self.counters[f"foreign_{kind}"] += 1
        if self.on_foreign is not None:
            self.on_foreign(peer, kind, tid, whose)
        return []

    def _grant(self, inc: _Incoming, grant: int) -> bool:
        """The COMMIT grants ``grant`` numbers past each tunnel's transferred number (the
        source's durable "leaving" rows reserved them; docs/state.md, "the grant"): let the
        tunnels send up to there before their "pending" row is durable (which reserves at
        least as far: our journal's ``reserves_grant``). Only if every tunnel has room
        above its counter (set by FINAL, never below a number sent here before); else they
        wait for the row, as without a grant."""
        if not getattr(self.journal, "reserves_grant", False):
            return False
        tops = []
        for t in inc.tunnels:
            sa = t.outbound
            at = inc.transferred.get(id(sa))
            if at is None:
                return False
            top = min(grant_ceiling(sa, at), at + grant)
            if top <= sa.seq:
                return False
            tops.append((sa, top))
        for sa, top in tops:
            # No block is asked for before the row is durable (the row's own request is
            # pending); the journal raises the ceiling to the row's once it is.
            sa.seq_ceiling = max(sa.seq_ceiling, top)
        inc.granted = True
        self._granted.append(inc)
        self.counters["granted"] += 1
        return True

    def _settle_granted(self) -> None:
        """Tunnels activated under a grant whose "pending" row is now settled: "taken over"
        is submitted (after it, in order); if the row could not be written they are taken
        out of service: they may not send past the grant, and after a restart this gateway
        would not know it took them (the source, asking, would resume past the grant)."""
        for inc in [i for i in self._granted if i.recorded is None or i.recorded.settled]:
            self._granted.remove(inc)
            if inc.recorded is not None and inc.recorded.failed:
                self.counters["unrecorded"] += len(inc.tunnels)
                for t in inc.tunnels:
                    if t in self.arrived:
                        self.engine.remove_tunnel(t)
                        del self.arrived[t]
                continue
            tunnels = [t for t in inc.tunnels if t in self.arrived]
            if tunnels and self.journal is not None:
                self._unawaited_write(self._journal_write(_arrived(tunnels, inc)))

    def _activate(self, inc: _Incoming, now: float) -> list[Output]:
        """The COMMIT came and the tunnels' pending record is settled: activate them (or, if
        it could not be written, drop them: their SAs have no durable block to send in)."""
        peer = inc.peer
        if inc.recorded is not None and inc.recorded.failed:
            # Never activated (a grant activates at the COMMIT, before the write settles,
            # and is not this path): recorded discarded, so that a decision query is
            # answered "not taken" after this transfer is forgotten here too (docs/state.md)
            self.counters["unrecorded"] += len(inc.tunnels)
            why = f"state not written: {inc.recorded.error}"
            failed = self._discard(inc, now, why, unsent=True)
            inc.record.outcome = "failed"
            return failed
        _move(inc, IncomingState.ACTIVE)
        self._closed(inc)
        # "Owned": their first block is durable already (pending): activating is safe
        # without waiting for it; a crash before it lands leaves them pending (kept away).
        owned = list(inc.tunnels) if self.journal is not None and not inc.granted else []
        out: list[Output] = []
        until = now + self.settings.forward_time
        # A bulk install shares one signal list among its tunnels (the new address only):
        # encoded once per list, not once per tunnel.
        encoded: dict[int, bytes] = {}
        self._arrived_due = min(self._arrived_due, until)
        # A handover's few tunnels open their MN's packets in the native path from now on
        # (a bulk move's thousands go there with their first packets: not all on this path)
        offload = len(inc.tunnels) <= OFFLOAD_AT_ACTIVATION
        for t in inc.tunnels:
            self.engine.activate(t)
            if offload:
                self.engine.offload_inbound(t)
            self.arrived[t] = (peer, until)
            items = inc.signals.get(id(t))
            if items:
                data = encoded.get(id(items))
                if data is None:
                    data = encoded[id(items)] = signalling.encode(items)
                res = self.engine.signal(t.outbound, data, now)
                if isinstance(res, ToPeer):
                    out.append(Transmit(res.sa, res.data))
                elif self.engine.fenced(t, now) and len(self.unsent_signals) < 65536:
                    self.unsent_signals[t] = list(items)
            if self.on_install is not None:
                self.on_install(t)
        # The held packets are opened after the inbound SA went to C (offload_inbound above),
        # and the forwarding thread may open newer ones in C before them: that is safe. The
        # window was moved to C, not copied (native.push; Python takes it back before it
        # touches the SA), the held packets were only authenticated (the window untouched),
        # and each is injected through Engine.inbound, which tries C first: one window takes
        # them all, in any order (one C moved more than a window past is a replay drop).
        # tests/test_native_handback.py drives that seam.
        out += [Inject(h.packet, h.inbound) for h in inc.held]
        self._release_held(inc, [])
        inc.record.outcome, inc.record.ended = "committed", now
        inc.record.spis = [sa.spi for t in inc.tunnels for sa in t.sas()]
        self.records.append(inc.record)
        # The rest is the activation's aftermath, which the packets waiting for the tunnels
        # (held above, forwarded behind the COMMIT, sent straight here by the MN) need not
        # wait for: the "taken over" rows (an HMAC per SA; not waited for: docs/state.md)
        # and the finished record (its log line, the listeners, the control replies).
        after: list[Send | Inject | Transmit | Finished | Prepared | After] = []
        if owned:
            tid = inc.tid
            after.append(After(lambda: self._unawaited_write(
                self._journal_write(lambda j: j.arrived(owned, peer, tid)))))  # fmt: skip
        after.append(Finished(inc.record))
        out.append(Aftermath(tuple(after)))
        return out

    def resend(self, t: Tunnel, now: float) -> list[Output]:
        """The signals ``t`` could not send at its commit, now that it may send."""
        items = self.unsent_signals.pop(t, None)
        if not items or t.state is not TunnelState.ACTIVE:
            return []
        res = self.engine.signal(t.outbound, signalling.encode(items), now)
        return [Transmit(res.sa, res.data)] if isinstance(res, ToPeer) else []

    def _on_cancel(self, peer: str, tag: cxtp.TransferTag, now: float) -> list[Output]:
        tid = tag.transfer_id
        inc = self.incoming.get((peer, tid))
        if inc is not None and inc.state in OPEN_INCOMING and not inc.committing:
            return self._discard(inc, now, "cancelled by source")
        og = self.outgoing.get(tid)
        if og is not None and og.peer == peer and og.state in (
            OutgoingState.SENT, OutgoingState.PREPARED
        ):
            return self._rollback(og, now, "cancelled", f"{peer} cancelled")
        dec = self.decided.get(tid)
        if (inc is None and og is None and dec is not None and dec[0] == DECISION_COMMIT
                and self.decided_peer.get(tid) == peer):  # fmt: skip
            # The target gave up the transfer (sa delete there) as our COMMIT crossed its
            # CTC: it never activated, we no longer send: nobody serves those tunnels until
            # they are re-keyed. Counted (the target counts commit_after_cancel).
            self.counters["cancelled_after_commit"] += 1
            return []
        if inc is None:
            # Another peer's transfer (towards us, or ours to another peer): not this
            # peer's to cancel.
            whose = og.peer if og is not None and og.peer != peer else None
            whose = whose or self._whose_incoming(peer, tid)
            if whose is not None:
                return self._foreign(peer, "cancel", tid, whose)
        return []

    def _unrecorded(self, inc: _Incoming, now: float) -> list[Output]:
        """The "pending" write of a transfer towards us failed before its COMMIT came: it
        could never activate (no durable first block), so it is cancelled now as by
        :meth:`withdraw`: the source told (a CTC: one that has not committed rolls back and
        keeps serving its tunnels; a COMMIT already on its way finds the transfer cancelled,
        ``commit_after_cancel``) and the transfer recorded discarded ("not taken")."""
        self.counters["unrecorded"] += len(inc.tunnels)
        why = f"state not written: {inc.recorded.error if inc.recorded else ''}"
        out: list[Output] = [Send(inc.peer, cxtp.CTC(inc.mn, (self._tag(inc),)))]
        out += self._discard(inc, now, why)
        inc.record.outcome = "failed"
        return out

    def _discard(
        self, inc: _Incoming, now: float, why: str, *, journal: bool = True, unsent: bool = False
    ) -> list[Output]:
        if self.journal is not None and inc.tunnels and journal:
            tunnels = list(inc.tunnels)
            # Never activated (not committing, or ``unsent``: committing, but its "pending"
            # write failed, so it never sent): recorded discarded with the rows, so that a
            # decision query is answered "not taken" after a restart of this gateway too.
            # Not when the id came from another peer too (one record per id: "taken").
            sole = self._arrivals.peers_of(inc.tid) in ([], [inc.peer])
            tid = inc.tid if sole and (unsent or not inc.committing) else 0
            self._unawaited_write(
                self._journal_write(lambda j: j.cancelled(tunnels, inc.peer, tid))
            )
        for t in inc.tunnels:
            self.engine.remove_tunnel(t)
        inc.tunnels = []
        _move(inc, IncomingState.CANCELLED)
        # Known as cancelled (never activated) for as long as a "not taken" is remembered:
        # the source restarted after we gave up on its COMMIT is answered "not taken" and
        # serves its tunnels again. (Forgotten at once, the query found only the record of
        # the arrival and was answered "taken": the tunnels were served by nobody.)
        inc.give_up = now + max(4 * self.settings.retry_max, 60.0)
        self._closed(inc)
        inc.record.outcome, inc.record.detail, inc.record.ended = "cancelled", why, now
        self.records.append(inc.record)
        return [Finished(inc.record)]

    # -- reactive: CT-Req ------------------------------------------------------------
    def request(
        self, peer: str, mn: IPAddress, token: bytes, seq: int, now: float
    ) -> tuple[int, list[Output]]:
        """Target side: ask ``peer`` for the contexts of the MN at ``mn`` (reactive mode)."""
        tid = self.rng(64)
        tag = cxtp.TransferTag(tid, 0).encode()
        return tid, [Send(peer, cxtp.CTReq(mn, seq, token, (tag,)))]

    def ctar(
        self, peer: str, msg: cxtp.CTAR, source: object, now: float
    ) -> tuple[str | None, list[Output]]:
        """Target side: an MN's CTAR (RFC 4067), from ``source`` (its address as seen on the
        wire), asks us to fetch its contexts from ``peer``. Returns (why it was refused, or
        None; the CT-Req to send).

        The token cannot be checked here: its key is shared by the MN and the router that
        holds its SAs, which checks it (:meth:`_on_ctreq`) before doing anything. So this
        side bounds what forged CTARs can cost: CT_REQUEST_RATE per source and per MN
        (RFC 4067 §2.5), a cap on CT-Reqs per peer, one CT-Req per (MN, sequence number),
        and none for an MN whose tunnel is already here."""
        if not self._ctar_source.allow(source, now) or not self._ctar_mn.allow(msg.mn_prev, now):
            self.counters["ctar_limited"] += 1
            return "over CT_REQUEST_RATE", []
        key = (msg.mn_prev, msg.seq)
        if key in self._ctar_seen:
            self.counters["replayed"] += 1
            return "sequence number already used", []
        if any(
            t.outbound.dst == msg.mn_prev and t.state is not TunnelState.MOVED
            for t in self.engine.tunnels()
        ):
            self.counters["refused"] += 1
            return "the MN's tunnel is already here", []
        if not self._ctreq_peer.allow(peer, now):
            self.counters["ctar_limited"] += 1
            return f"too many requests to {peer}", []
        self._ctar_seen[key] = now + self.settings.retry_max
        _tid, out = self.request(peer, msg.mn_prev, msg.token, msg.seq, now)
        return None, out

    def _on_ctreq(
        self,
        peer: str,
        msg: cxtp.CTReq,
        tag: cxtp.TransferTag | None,
        now: float,
        may_request: bool,
    ) -> list[Output]:
        tid = tag.transfer_id if tag is not None else self.rng(64)

        def refuse(status: int) -> list[Output]:
            self.counters["refused"] += 1
            ttag = cxtp.TransferTag(tid, 0).encode()
            return [
                Send(
                    peer,
                    cxtp.CTD(msg.mn_prev, 0, (ttag, cxtp.Detail(_status_name(status)).encode())),
                )
            ]

        if not may_request:
            return refuse(cxtp.Status.UNAUTHORISED)
        if not self._ctreq_peer.allow(peer, now):
            self.counters["ctar_limited"] += 1
            return []  # not even an answer: the peer is flooding us
        tunnels = [t for t in self.engine.tunnels() if t.outbound.dst == msg.mn_prev]
        if not tunnels:
            return refuse(cxtp.Status.UNKNOWN_CONTEXT)
        # RFC 4067: the token proves the MN asked; a (sequence, MN) pair is used once.
        if not cxtp.verify_token(token_key(tunnels[0]), msg.mn_prev, msg.seq, (), msg.token):
            return refuse(cxtp.Status.UNAUTHORISED)
        if msg.seq <= self.ctar_seq.get(msg.mn_prev, -1):
            self.counters["replayed"] += 1
            return refuse(cxtp.Status.UNAUTHORISED)
        self.ctar_seq[msg.mn_prev] = msg.seq
        try:
            _, out = self.start(tunnels, peer, now, mode="reactive", reply_to=(tid, 0))
        except TransferError:
            return refuse(cxtp.Status.BUSY)
        return out

    def next_ctar_seq(self, mn: IPAddress) -> int:
        """A sequence number for a CTAR sent on ``mn``'s behalf to make a peer pull its
        contexts from us (``transfer --mode reactive``): one above the highest this gateway
        has taken for that MN, so a counter, not a clock (a clock stepping back or wrapping
        would make the CT-Req look replayed). It is this gateway that checks it when the
        CT-Req comes back."""
        return (self.ctar_seq.get(mn, 0) + 1) & 0xFFFFFFFF

    # -- timers ----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is next due (None: nothing waits for the clock)."""
        # (A running minimum, no list: this runs after every message the core takes.)
        d = math.inf
        for og in self.outgoing.values():
            if og.deadline < d:
                d = og.deadline
        for u in self.unresolved.values():
            if u.next_query < d:
                d = u.next_query
        for inc in self._open_incoming.values():
            if inc.committing:
                continue  # waits for its write, not for the clock
            if inc.give_up < d:
                d = inc.give_up
            if inc.state is IncomingState.PENDING and inc.next_retry < d:
                d = inc.next_retry
        if self._closed_due < d:
            d = self._closed_due  # the decided ones: forgotten at their give_up
        if self._next_housekeeping < d and (
            self.decided
            or self.seen
            or self._ctar_seen
            or self.arrived
            or self.not_taken
            or self.engine.any_moved()
        ):
            d = self._next_housekeeping
        return None if d == math.inf else d

    def handle_timer(self, now: float) -> list[Output]:
        """Time-outs, CTDR re-sends, and the expiry of what is remembered for a while."""
        out: list[Output] = []
        for og in list(self.outgoing.values()):
            if og.state is OutgoingState.AWAITING and now >= og.deadline:
                out += self._unresolve(og, now, "no answer in time")
                continue
            if og.state is OutgoingState.PREPARED and now >= og.deadline:
                out += self._unprepare(og, now)
                continue
            if og.state is OutgoingState.SENT and now >= og.deadline:
                out += self._rollback(
                    og,
                    now,
                    "timeout",
                    f"no answer from {og.peer} within "
                    f"{self.settings.max_transfer_time * 1000:.0f} ms",
                )
        for u in list(self.unresolved.values()):
            if now >= u.next_query:
                out += self._query(u, now)
        self._closed_due = math.inf  # exact again below (and lowered by what closes now)
        for k, inc in list(self.incoming.items()):
            if inc.state is IncomingState.RECEIVING and now >= inc.give_up:
                self.counters["expired"] += 1
                out += self._cancel_incoming(inc, now, "expired", "never finished")
                continue
            if inc.state is IncomingState.PENDING and not inc.committing:
                if now >= inc.give_up:
                    out += self._discard(inc, now, "no decision from the source")
                elif now >= inc.next_retry and inc.ctdrs:
                    inc.next_retry = now + self.settings.retry
                    out += [Send(inc.peer, m) for m in inc.ctdrs]
            if inc.state in (IncomingState.ACTIVE, IncomingState.CANCELLED):
                if now < inc.give_up:
                    self._closed_due = min(self._closed_due, inc.give_up)
                    continue
                del self.incoming[k]
                left = self._incoming_peers.get(k[1], [])
                if k[0] in left:
                    left.remove(k[0])
                if not left:
                    self._incoming_peers.pop(k[1], None)
        if now >= self._next_housekeeping:
            # Expiring old records walks whole tables: twice a second is plenty, and keeps
            # the work per message small while thousands of packets are being forwarded.
            self._next_housekeeping = now + 0.5
            for tid, (_, until) in list(self.decided.items()):
                if now >= until:
                    del self.decided[tid]
                    self._finals.pop(tid, None)
                    self.decided_peer.pop(tid, None)
            for key, until in list(self.seen.items()):
                if now >= until:
                    self._unsee(key)
            for k2, until in list(self._ctar_seen.items()):
                if now >= until:
                    del self._ctar_seen[k2]
            self.not_taken.expire(now)
            if now >= self._arrived_due:
                # Walked only once an entry may be due (a bulk transfer's thousands stay for
                # the forward time, and were walked twice a second); a tunnel that moved on
                # meanwhile left it when it moved (_commit_when_recorded).
                due = math.inf
                for t, (_, until) in list(self.arrived.items()):
                    if now >= until or t.state is TunnelState.MOVED:
                        del self.arrived[t]
                    elif until < due:
                        due = until
                self._arrived_due = due
            self.engine.expire_moved(now)
        return out

    def abandon(self, tid: int, now: float, detail: str) -> list[Output]:
        """The operator stopped waiting for transfer ``tid`` (``ipsecct transfer --timeout``):
        roll it back exactly as its own time-out would, if it still waits for the target's
        answer. [] when it is decided or past the COMMIT (it ends by itself)."""
        og = self.outgoing.get(tid)
        if og is None or og.state is not OutgoingState.SENT:
            return []
        return self._rollback(og, now, "timeout", detail)

    def peer_lost(self, peer: str, now: float) -> list[Output]:
        """The connection to ``peer`` broke: roll back what we were sending it."""
        out: list[Output] = []
        for og in list(self.outgoing.values()):
            if og.peer == peer and og.state in (OutgoingState.SENT, OutgoingState.PREPARED):
                out += self._rollback(og, now, "peer lost", f"connection to {peer} lost")
            elif og.peer == peer and og.state is OutgoingState.AWAITING:
                out += self._unresolve(og, now, "connection lost")
        return out

    def outgoing_in_progress(self) -> int:
        """Transfers this gateway started that are not decided yet (what load balancing waits
        for; a peer's transfers towards us never stall it)."""
        return len(self.outgoing)

    def in_progress(self) -> int:
        return (
            len(self.outgoing)
            + sum(1 for u in self.unresolved.values() if u.og is not None)
            + len(self.reverting)
            + len(self._open_incoming)
        )


def _pair_up(
    sas: list[SecurityAssociation],
) -> list[tuple[SecurityAssociation, SecurityAssociation | None]]:
    """Group decoded SAs into (outbound, inbound) pairs: each outbound SA is followed by the
    inbound SA of its tunnel (the order the source writes them in)."""
    out: list[tuple[SecurityAssociation, SecurityAssociation | None]] = []
    i = 0
    while i < len(sas):
        sa = sas[i]
        if sa.direction is not Direction.OUTBOUND:
            raise ContextError("transferred contexts must start each tunnel with its outbound SA")
        nxt = sas[i + 1] if i + 1 < len(sas) else None
        if nxt is not None and nxt.direction is Direction.INBOUND:
            out.append((sa, nxt))
            i += 2
        else:
            out.append((sa, None))
            i += 1
    return out


def _status_name(status: int) -> str:
    try:
        return cxtp.Status(status).name.lower().replace("_", " ")
    except ValueError:
        return f"status {status}"

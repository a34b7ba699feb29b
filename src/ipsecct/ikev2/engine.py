"""The IKEv2 engine of a gateway or mobile node (RFC 7296), sans I/O: datagrams and ``now``
in; datagrams to send, events and the next deadline out.

As initiator (:meth:`IkeEngine.initiate`) it runs IKE_SA_INIT (following INVALID_KE_PAYLOAD
and COOKIE) and IKE_AUTH for a connection's first CHILD SA, floating to port 4500 when a NAT
is detected or faked. As responder it answers IKE_SA_INIT and IKE_AUTH (pre-shared keys) and
creates the first CHILD SA with narrowed traffic selectors (§2.9); it detects NATs (§2.23) and
can fake one so that ESP is always UDP-encapsulated (strongSwan's ``encap = yes``). In both
roles it keeps the message-ID window of one request and answers a retransmitted request with
the cached response (§2.1, §2.2); answers and sends INFORMATIONAL requests (liveness checks,
DELETE of CHILD and IKE SAs), retransmitting with back-off; and runs CREATE_CHILD_SA: CHILD
and IKE SA rekeys (with PFS when configured) started by either side, with the collision rules
of §2.8.1 and §2.8.2, and extra CHILD SAs asked by the peer.

Everything received is untrusted: malformed messages, wrong SPIs, bad ICVs, unexpected
message IDs are counted in :attr:`IkeEngine.stats` and dropped, never raised.
"""

from __future__ import annotations

import datetime as dt
import heapq
import hmac as _hmac
import ipaddress
import itertools
import logging
import math
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from cryptography.hazmat.primitives import hashes

from ..errors import AuthError, IkeContextError, IkeParseError, IkeProtocolError
from ..ipsec.ratelimit import RateLimiter
from .auth import (
    CERT_X509_SIGNATURE,
    SUPPORTED_HASHES,
    RevocationUnknown,
    cert_names,
    certreq,
    chain_serials,
    fingerprint,
    id_matches_cert,
    parse_cert,
    sign,
    validated_chain,
    verify,
)
from .config import ChildConfig, Connection, peer_id_text, says_what_it_is
from .ikesa import IKE_PORT, Address, ChildSA, IkeSA, IkeState, IPAddr, Pending
from .keys import KeyExchange, child_keys, hmac_digest, ike_keys, psk_auth, signed_octets
from .message import (
    IKE_HEADER_LEN,
    AuthMethod,
    AuthPayload,
    CertPayload,
    CertReqPayload,
    CfgAttr,
    CfgType,
    CPPayload,
    DeletePayload,
    ExchangeType,
    Flag,
    Header,
    IDPayload,
    IdType,
    KEPayload,
    NoncePayload,
    Notify,
    NotifyPayload,
    Payload,
    PayloadType,
    Proposal,
    ProtocolId,
    SAPayload,
    SKFPayload,
    SKPayload,
    TrafficSelector,
    TSPayload,
    decode,
    decode_header,
    decode_payloads,
    encode_payloads,
    encode_plain,
    find,
    first_type,
    notifies,
)
from .mid_sync import MidSync, ReplayCounterSync, sync_request
from .pool import Pool
from .proposal import AEAD, Chooser, Offer, Suite, choose, describe_all
from .ts import host, narrow, representable, within

log = logging.getLogger("ipsecct.ikev2")
_WIDER = "wider traffic selectors"  # a CREATE_CHILD_SA answer that widened ours (§2.9)


_T = TypeVar("_T")
_K = TypeVar("_K")


def _net(host: IPAddr) -> tuple[int, int]:
    """The network a half-open IKE SA's source counts against: its /24 (IPv4, also when
    IPv4-mapped) or /64 (IPv6), the blocks one attacker most easily has many addresses of."""
    if isinstance(host, ipaddress.IPv6Address):
        if host.ipv4_mapped is None:
            return (6, int(host) >> 64)
        host = host.ipv4_mapped
    return (4, int(host) >> 8)

# Waits after a request and each retransmission (the last one again after the fourth): the
# request goes again 2, 6, 14 and 30 s after it was sent, and the peer is declared dead at 46 s
RETRANSMIT = (2.0, 4.0, 8.0, 16.0)
# A retransmitted request is answered again at most once per this many seconds per IKE SA
# (to its address; as much again to any other): a peer retransmits after seconds (above,
# charon 4 s), but a captured request, or the first fragment of one, replayed from anywhere
# is authentic and brought back the whole (fragmented) response each time.
RETRANSMIT_ANSWER_GAP = 0.1
HALF_OPEN_TIMEOUT = 30.0
# A retransmitted IKE_SA_INIT gets the response again (RFC 7296 §2.1) at most this many times
# per half-open IKE SA, and at most INIT_ANSWERS_PER_SOURCE times a second per source
# address over all its half-open IKE SAs; the rest are counted (init-retransmit-unanswered),
# not answered. The response (KE, nonce, NAT-D; with a CERTREQ, 20 octets per CA) is as large
# as the request or larger, and a request can be replayed from any spoofed source: it was
# answered every time, an amplifier towards the address written in. An initiator
# retransmits a few times within HALF_OPEN_TIMEOUT (charon 3 times in 30 s: at 4, 11, 24 s)
INIT_ANSWERS = 3
INIT_ANSWERS_PER_SOURCE = 10
MAX_HALF_OPEN = 1000
COOKIE_THRESHOLD = 100  # half-open IKE SAs before IKE_SA_INIT needs a cookie (§2.6)
COOKIE_SECRET_LIFETIME = 120.0
MAX_HALF_OPEN_PER_SOURCE = 20
MAX_IKE_SAS_PER_SOURCE = 200
# IKE SAs one authenticated identity may hold in one connection (an IKE_AUTH without
# INITIAL_CONTACT past it is refused): a peer has many source addresses
MAX_IKE_SAS_PER_IDENTITY = 64
REKEYED_GRACE = 60.0  # how long an IKE or CHILD SA the peer rekeyed waits for its DELETE
# ... and the peer's IKE SA that lost a crossed IKE rekey to ours (§2.8.2: the peer deletes
# it), as strongSwan waits for the peer's redundant one (HALF_OPEN_IKE_SA_TIMEOUT): charon,
# whose request was unanswered when our DELETE of the old IKE SA came, drops its own without
# a DELETE ("peer did not notice IKE_SA rekey collision"), and ours listed it 60 s
REDUNDANT_GRACE = 30.0
MAX_CHILD_SAS = 16  # per IKE SA (rekeying needs room for two of each for a while)
SPI_TRIES = 256  # random picks of a free inbound CHILD SPI before the range counts as full
# CHILD SAs of ours whose outbound SPI (the responder's choice) another tunnel here sends
# with: deleted at once, and asked for again at most this many times in a row per IKE SA
SPI_TAKEN_RETRIES = 3
# ... after which the CHILD SA (a new one: IKE_AUTH's or CREATE_CHILD_SA's; a rekey's old SA
# serves on) is asked for again CHILD_RETRY s later, the wait doubling with each such round
# given up in a row per IKE SA, to CHILD_RETRY_MAX: at most SPI_TAKEN_RETRIES + 1 requests
# a round, so a peer that keeps choosing taken SPIs costs a few exchanges per CHILD_RETRY_MAX
CHILD_RETRY = 30.0
CHILD_RETRY_MAX = 600.0
MAX_CERTS = 5  # CERT payloads looked at: the peer's certificate and its chain
MAX_FRAGMENTS = 32  # RFC 7383: fragments of one message we reassemble at most
# The largest IKE message taken, as a datagram or reassembled from RFC 7383 fragments
# (strongSwan's charon.max_packet, same default; RFC 7296 §2 asks for 1280 at least; [ike]
# max_packet). A half-open IKE SA keeps its IKE_SA_INIT request (for AUTH) and a fragment
# set: with 64 KiB messages a flood that answered cookies held 180 KiB per half-open IKE SA
MAX_PACKET = 10000
FRAGMENT_SIZE = 1200  # largest IKE message (without IP/UDP) before we fragment
# [ike] fragment_size (strongSwan's charon.fragment_size): the largest IP datagram of one of
# our IKE messages or fragments instead; the IKE octets are what is left after the IP (20 or
# 40) and UDP (8) headers and, on the NAT-T port, the non-ESP marker (4)
FRAGMENT_SIZE_MIN = 576
# RFC 6311 after a take-over: our next request ID leaps this far past the replicated one (the
# old member may have sent requests after its last replication; the peer drops a sync whose
# ID is below what it expects, and takes a higher one as it is)
MID_SYNC_LEAP = 64
# without RFC 6311: how far ahead of the replicated ID the peer's first request may be
RESYNC_AHEAD = 16
# RFC 6311 IPSEC_REPLAY_COUNTER_SYNC from the peer: the largest delta we apply to our outbound
# ESP sequence numbers (RFC 6311 §4.2 names 2^30 as a delta safe for any sync interval; a
# larger one would only burn our sequence space: refused, the sync answered all the same)
MAX_REPLAY_DELTA = 1 << 30
# RFC 6311 message IDs from the peer (in its sync request, or its answer to ours) above this
# are refused: they would leave no ID for our next requests (a 33-bit one cannot be sent)
MAX_SYNCED_MID = 0xFFFFFFFF - (1 << 16)
# RFC 7296 §2.2: message IDs are 32 bits, and an IKE SA whose IDs run out "MUST be closed or
# rekeyed". Once ours or the peer's reach this (above MAX_SYNCED_MID: a sync alone never
# does) the IKE SA is rekeyed, the new one starting at 0, and retried every REKEY_RETRY s if
# the peer refuses; an IKE SA that uses the last ID all the same is closed
MID_REKEY_AT = 0xFFFF0000
MAX_MID = 0xFFFFFFFF
REKEY_RETRY = 30.0
# configuration attributes of a peer's CFG_REQUEST that are looked at (the codec refuses a CP
# payload of more than message.MAX_CP_ATTRIBUTES)
MAX_CP_READ = 16
# The timers: each IKE SA's next deadline is kept in a heap (IkeEngine._arm), so that
# next_deadline() and tick() do not walk every IKE SA (8 ms at 10,000 of them). tick() visits
# the IKE SAs whose entry is due within TIMER_SLACK of ``now`` (what it does for each is
# decided by the same tests as before: the slack only covers ``now - a >= b`` and
# ``now >= a + b`` rounding apart), and every TIMER_AUDIT seconds it computes every IKE SA's
# deadline again: one that differs from its entry (a change nothing marked) is counted
# (``deadline-missed``), logged and corrected. That pass goes TIMER_AUDIT_SLICE IKE SAs a
# tick (next_deadline() asks for the next tick at once meanwhile): at 10,000 IKE SAs it took
# 13-16 ms of one loop turn in one go, now 40 turns of 0.6 ms at most (benchmarks/README.md)
TIMER_SLACK = 1e-6
TIMER_AUDIT = 60.0
TIMER_AUDIT_SLICE = 256


# -- outputs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes
    src: Address
    dst: Address


@dataclass(frozen=True)
class IkeUp:
    ike: IkeSA
    # the child our IKE_AUTH asked for (we initiated; None: none, or we answered): the
    # adapter asks for the connection's other start_action = start children in the IKE SA
    auth_child: ChildConfig | None = None


@dataclass(frozen=True)
class IkeDown:
    ike: IkeSA
    reason: str


@dataclass(frozen=True)
class ChildUp:
    ike: IkeSA
    child: ChildSA
    # the peer rekeyed this CHILD SA and ``child`` replaces it: the peer installs ``child``
    # only when it reads our answer, so ours keeps sending on the old one until the peer
    # deletes it (no packet sent on an SA the peer does not have yet)
    replaces: ChildSA | None = None


@dataclass(frozen=True)
class ChildDown:
    ike: IkeSA
    child: ChildSA
    reason: str


@dataclass(frozen=True)
class PeerMoved:
    """The peer's address or port changed (NAT mapping, float to 4500): update its SAs.
    ``was``: the peer's address before, where it is known (a float or NAT mapping)."""

    ike: IkeSA
    was: Address | None = None


@dataclass(frozen=True)
class ConnectFailed:
    """An initiation that never got an IKE SA (no answer, refused, bad answer)."""

    conn: Connection
    reason: str


@dataclass(frozen=True)
class IkeRekeyed:
    """The IKE SA was rekeyed: ``new`` took over the CHILD SAs of ``old``."""

    old: IkeSA
    new: IkeSA


@dataclass(frozen=True)
class ReplayCounterSynced:
    """RFC 6311: the peer's member that took over ``ike`` asked us to advance the outbound
    ESP sequence numbers of its CHILD SAs by ``delta`` (validated: announced by us, within
    MAX_REPLAY_DELTA). The adapter moves each one forward only, never past its limit."""

    ike: IkeSA
    delta: int


@dataclass(frozen=True)
class DeleteAnswered:
    """The peer answered our DELETE of these CHILD SAs (our inbound SPIs): it has read it.
    A peer that answered our rekey of one of them sends on it until then (strongSwan does):
    the adapter keeps its inbound half until this comes (:class:`ChildDown` removed the SA)."""

    ike: IkeSA
    spis: tuple[int, ...]


Output = (Send | IkeUp | IkeDown | ChildUp | ChildDown | PeerMoved | ConnectFailed | IkeRekeyed
          | ReplayCounterSynced | DeleteAnswered)  # fmt: skip


@dataclass(eq=False)
class Connecting:
    """Our IKE_SA_INIT request, before its answer makes an IKE SA."""

    conn: Connection
    child: ChildConfig | None
    spi_i: bytes
    local: Address
    remote: Address
    kx: KeyExchange
    nonce: bytes = field(repr=False)
    created: float
    cookie: bytes = b""
    request: bytes = field(default=b"", repr=False)
    tries: int = 1
    deadline: float = 0.0
    attempts: int = 0  # INVALID_KE / COOKIE restarts


def _natd(spi_i: bytes, spi_r: bytes, a: Address) -> bytes:
    h = hashes.Hash(hashes.SHA1())
    h.update(spi_i + spi_r + a.host.packed + struct.pack("!H", a.port))
    return h.finalize()


class _HostCounted(dict[_K, IkeSA]):
    """A table of IKE SAs with how many of its entries have their peer at each host
    (:meth:`from_host`: the count a walk would give, without one) and the indexes of its
    subclass, which keeps them in ``__setitem__`` and ``__delitem__``: every other way out
    of the table goes through ``del`` (pop) and none in but one entry at a time."""

    _one_at_a_time = ""  # (what setdefault and update say)

    def __init__(self) -> None:
        super().__init__()
        self._per_host: dict[object, int] = {}

    @overload
    def pop(self, key: _K, /) -> IkeSA: ...
    @overload
    def pop(self, key: _K, default: IkeSA, /) -> IkeSA: ...
    @overload
    def pop(self, key: _K, default: _T, /) -> IkeSA | _T: ...
    def pop(self, key: _K, *default: object) -> object:
        ike = self.get(key)
        if ike is None:
            return super().pop(key, *default)  # (the default, or KeyError)
        del self[key]
        return ike

    def setdefault(self, *args: Any, **kwargs: Any) -> IkeSA:
        raise TypeError(self._one_at_a_time)

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(self._one_at_a_time)

    def from_host(self, host: object) -> int:
        """How many entries of the table have their peer at ``host`` (a walk's count)."""
        return self._per_host.get(host, 0)

    def _uncount(self, host: object, n: int) -> None:
        left = self._per_host[host] - n
        if left:
            self._per_host[host] = left
        else:
            del self._per_host[host]


class _IkeTable(_HostCounted[bytes]):
    """The engine's IKE SAs by our SPI (``by_spi``): one put in is watched by the engine's
    deadline heap (``timer_watch``, ikesa.TIMER_FIELDS) and takes its place in the order
    of the table (one put in under an SPI already in it takes that one's, as a dict does).

    It is also filed in the indexes that spare a message a walk of every IKE SA (1.4 ms at
    10,000 of them, for each IKE_SA_INIT of a flood): how many of the table's entries have
    a peer at each host (:meth:`from_host`), the IKE SAs of each connection name and
    identity (:meth:`of_identity`), and the IKE SA whose crossed rekey (``collided``) made
    one (:meth:`collided_parent`). Whatever sets one of ikesa.INDEX_FIELDS on an IKE SA in the
    table files it again (``index_watch``); one taken out by any path leaves them."""

    _one_at_a_time = "by_spi: put IKE SAs in one at a time"

    def __init__(self, dirty: set[IkeSA]) -> None:
        super().__init__()
        self._dirty = dirty
        self._order = itertools.count(1)
        # each IKE SA in the table: [entries it has (SPIs it is under), its peer's host,
        # (connection name, identity), the IKE SA its ``collided`` names]
        self._filed: dict[IkeSA, list[Any]] = {}
        self._by_identity: dict[tuple[str, str], dict[IkeSA, None]] = {}
        self._collided_in: dict[IkeSA, dict[IkeSA, None]] = {}
        self._refile_one = self._refile  # (one bound method for all, not one an IKE SA)

    # -- the table ------------------------------------------------------------------------
    def __setitem__(self, spi: bytes, ike: IkeSA) -> None:
        old = self.get(spi)
        ike.timer_order = next(self._order) if old is None else old.timer_order
        ike.timer_watch = self._dirty
        if old is not ike:  # (no entry of its own yet: a copy of one has that one's number)
            ike.timer_at, ike.timer_seq = None, 0
        super().__setitem__(spi, ike)
        if old is not ike:
            if old is not None:
                self._unfile(old)
            self._file(ike)
        self._dirty.add(ike)

    def __delitem__(self, spi: bytes) -> None:
        ike = self[spi]
        super().__delitem__(spi)
        self._unfile(ike)

    def popitem(self) -> tuple[bytes, IkeSA]:
        spi, ike = super().popitem()
        self._unfile(ike)
        return spi, ike

    def clear(self) -> None:
        super().clear()
        self._filed.clear()
        self._per_host.clear()
        self._by_identity.clear()
        self._collided_in.clear()

    # -- the indexes ----------------------------------------------------------------------
    def of_identity(self, conn_name: str, peer_id: str) -> list[IkeSA]:
        """The IKE SAs of the table with connection ``conn_name`` and identity ``peer_id``,
        in the table's order (as a walk of it finds them)."""
        group = self._by_identity.get((conn_name, peer_id))
        return sorted(group, key=_table_order) if group else []

    def collided_parent(self, ike: IkeSA) -> IkeSA | None:
        """The first IKE SA of the table (in its order) whose ``collided`` names ``ike``."""
        group = self._collided_in.get(ike)
        return min(group, key=_table_order) if group else None

    def _file(self, ike: IkeSA) -> None:
        f = self._filed.get(ike)
        if f is not None:  # (under a second SPI: one more entry of its host)
            f[0] += 1
            self._per_host[f[1]] += 1
            return
        host, ident = ike.remote.host, (ike.conn.name, ike.peer_id)
        target = ike.collided[0] if ike.collided is not None else None
        self._filed[ike] = [1, host, ident, target]
        self._per_host[host] = self._per_host.get(host, 0) + 1
        self._by_identity.setdefault(ident, {})[ike] = None
        if target is not None:
            self._collided_in.setdefault(target, {})[ike] = None
        ike.index_watch = self._refile_one

    def _unfile(self, ike: IkeSA) -> None:
        f = self._filed.get(ike)
        if f is None:
            return
        n, host, ident, target = f
        self._uncount(host, 1)
        if n > 1:
            f[0] = n - 1
            return
        del self._filed[ike]
        _leave(self._by_identity, ident, ike)
        if target is not None:
            _leave(self._collided_in, target, ike)

    def _refile(self, ike: IkeSA) -> None:
        """One of ikesa.INDEX_FIELDS was set on ``ike`` (by anyone): its place in each index
        follows (nothing when it is not in the table: a copy of one, one taken out)."""
        f = self._filed.get(ike)
        if f is None:
            return
        n, host, ident, target = f
        new_host, new_ident = ike.remote.host, (ike.conn.name, ike.peer_id)
        new_target = ike.collided[0] if ike.collided is not None else None
        if new_host != host:
            self._uncount(host, n)
            self._per_host[new_host] = self._per_host.get(new_host, 0) + n
            f[1] = new_host
        if new_ident != ident:
            _leave(self._by_identity, ident, ike)
            self._by_identity.setdefault(new_ident, {})[ike] = None
            f[2] = new_ident
        if new_target is not target:
            if target is not None:
                _leave(self._collided_in, target, ike)
            if new_target is not None:
                self._collided_in.setdefault(new_target, {})[ike] = None
            f[3] = new_target


def _table_order(ike: IkeSA) -> int:
    return ike.timer_order


def _leave(index: dict[_K, dict[IkeSA, None]], key: _K, ike: IkeSA) -> None:
    group = index[key]
    del group[ike]
    if not group:
        del index[key]


class _HalfOpenTable(_HostCounted[tuple[bytes, object]]):
    """The half-open IKE SAs of peers by (their SPIi, their host), with how many each host
    has (:meth:`from_host`: the per-source limit, for each IKE_SA_INIT, without a walk of up
    to MAX_HALF_OPEN entries) and the entries of each IKE SA (:meth:`drop`)."""

    _one_at_a_time = "half_open: put entries in one at a time"

    def __init__(self) -> None:
        super().__init__()
        self._keys_of: dict[IkeSA, list[tuple[bytes, object]]] = {}

    def __setitem__(self, key: tuple[bytes, object], ike: IkeSA) -> None:
        if key in self:
            del self[key]
        super().__setitem__(key, ike)
        self._per_host[key[1]] = self._per_host.get(key[1], 0) + 1
        self._keys_of.setdefault(ike, []).append(key)

    def __delitem__(self, key: tuple[bytes, object]) -> None:
        ike = self[key]
        super().__delitem__(key)
        self._uncount(key[1], 1)
        keys = self._keys_of[ike]
        keys.remove(key)
        if not keys:
            del self._keys_of[ike]

    def popitem(self) -> tuple[tuple[bytes, object], IkeSA]:
        raise TypeError("half_open: take entries out by their key")

    def clear(self) -> None:
        super().clear()
        self._per_host.clear()
        self._keys_of.clear()

    def drop(self, ike: IkeSA) -> None:
        """Every entry of ``ike`` taken out."""
        for key in list(self._keys_of.get(ike, ())):
            del self[key]


class IkeEngine:
    """All IKE SAs of one gateway or mobile node, in both roles."""

    def __init__(
        self,
        connections: list[Connection],
        *,
        random: Callable[[int], bytes] = os.urandom,
        spi_in_use: Callable[[int], bool] | None = None,
        outbound_spi_taken: Callable[[int], bool] | None = None,
        natt_port: int = 4500,
        cookie_threshold: int = COOKIE_THRESHOLD,
        spi_range: tuple[int, int] = (0x100, 0xFFFFFFFF),
        wall_offset: float = 0.0,
        rsa_pss: bool = False,
        pools: dict[str, Pool] | None = None,
        max_packet: int = MAX_PACKET,
        fragment_size: int | None = None,
    ) -> None:
        self.connections = connections
        # refusals of what a peer proposed (no proposal, selectors), logged a few a second
        # in all: IKE_SA_INIT is unauthenticated, its source address anyone's to write
        self._refusal_log = RateLimiter(1.0, 5.0)
        # ike-auth-failed lines, per source network (_net: an IPv6 attacker has a /64): anyone
        # who completes an IKE_SA_INIT may fail IKE_AUTH as often as it likes (every failure
        # is counted, auth-failed)
        self._auth_log = RateLimiter(1.0, 5.0)
        self.max_packet = max_packet  # larger IKE messages are dropped (``too-long``)
        # the largest IP datagram of an IKE message or fragment we send (None: FRAGMENT_SIZE
        # octets of IKE, whatever the headers)
        if fragment_size is not None and fragment_size < FRAGMENT_SIZE_MIN:
            raise ValueError(f"fragment_size {fragment_size} is below {FRAGMENT_SIZE_MIN}")
        self.fragment_size = fragment_size
        # [pools.NAME]: the virtual IPs a connection's ``pools`` lease to peers (RFC 7296
        # §3.15; ikev2.pool)
        self.pools: dict[str, Pool] = pools or {}
        self.rsa_pss = rsa_pss  # RSA keys sign RFC 7427 AUTH with RSASSA-PSS
        self.natt_port = natt_port
        self.connecting: dict[bytes, Connecting] = {}  # our SPIi -> IKE_SA_INIT in flight
        self.random = random
        self.spi_in_use = spi_in_use or (lambda spi: False)
        # is a peer's inbound CHILD SPI (our outbound SPI to it) another tunnel's outbound SPI
        # here already? (by chance, or copied from the ESP we send another client): refused
        self.outbound_spi_taken = outbound_spi_taken or (lambda spi: False)
        # the IKE SAs whose deadline changed or may have (their heap entry is looked at
        # again at the next next_deadline() or tick()): each one put in by_spi, each one a
        # public method or a received message is for, each one whose TIMER_FIELDS are set
        self._timer_dirty: set[IkeSA] = set()
        self._timer_heap: list[tuple[float, int, bytes]] = []  # (deadline, seq, our SPI)
        self._timer_seqs = itertools.count(1)
        self._timer_audit_at = 0.0  # the next slice of the audit (a pass begins: its first)
        self._audit_spis: list[bytes] = []  # the pass under way: the SPIs it visits
        self._audit_pos = 0  # ... and how many it has
        # tests only: tick() and next_deadline() walk every IKE SA, as before the heap
        self._timers_by_scan = False
        self.by_spi = _IkeTable(self._timer_dirty)  # our SPI -> IKE SA
        self.half_open = _HalfOpenTable()  # (SPIi, peer host) -> IKE SA
        # answers to retransmitted IKE_SA_INITs per source in the second that ends at
        # _init_window_end (_init_answer_allowed)
        self._init_answered: dict[IPAddr, int] = {}
        self._init_window_end = -math.inf
        self.stats: Counter[str] = Counter()
        # Moves when a received message got past the checks that leave every IKE SA and
        # deadline as it was (unknown SPIs, malformed, unauthenticated, an old message ID, a
        # cookie asked for, a limit): only then may next_deadline() have changed. An adapter
        # asks that (a walk of the half-open table, up to MAX_HALF_OPEN) only then, not for
        # each junk datagram
        self.touched = 0
        self._child_spis: set[int] = set()
        # inbound CHILD SPIs come from this range (a cluster member's block, ipsec.spi)
        self.spi_range = spi_range
        # ``now`` + this = seconds since the epoch (certificate validity); set by the adapter
        self.wall_offset = wall_offset
        # §2.6: answer IKE_SA_INIT with a COOKIE once this many IKE SAs are half-open
        self.cookie_threshold = cookie_threshold
        self._cookie_cur: tuple[int, bytes] = (0, random(32))
        self._cookie_prev = self._cookie_cur
        self._cookie_next = 0.0
        # Told each IKE SA on which a new request of the peer is held (quiet: its CHILD SAs
        # are being transferred); the adapter may end a prepared transfer so that the
        # request is answered rather than retransmitted (docs/ikev2.md).
        self.on_request_held: Callable[[IkeSA], None] | None = None
        # Asked when an IKE SA's liveness check falls due (nothing from the peer over IKE for
        # dpd_delay): whether the peer's ESP has reached one of its CHILD SAs since the
        # previous ask (the adapter reads the inbound SAs' counters). If so no check is sent:
        # the peer is alive (RFC 7296 §2.4; charon's send_dpd looks at the inbound use time of
        # the IKE SA and its CHILD SAs), and the next look is dpd_delay later. None: a check
        # every dpd_delay without a word over IKE, whatever ESP came.
        self.esp_heard: Callable[[IkeSA], bool] | None = None

    # -- public interface ---------------------------------------------------------------
    def ike_sas(self) -> list[IkeSA]:
        return list(self.by_spi.values())

    @staticmethod
    def ends_at(ike: IkeSA) -> float | None:
        """When ``ike`` ends by itself unless something happens first (swanctl --list-sas's
        "expires in"): a peer's half-open IKE SA HALF_OPEN_TIMEOUT after its IKE_SA_INIT,
        one rekeyed when its DELETE is given up waiting for (REKEYED_GRACE, or sooner when it
        lost a crossed rekey). None for an established one: it has no hard lifetime here (it
        is rekeyed, never reauthenticated) and ends when a DELETE or the peer's death ends it."""
        if ike.state is IkeState.HALF_OPEN and not ike.we_initiated:
            return ike.created + HALF_OPEN_TIMEOUT
        if ike.state is IkeState.REKEYED:
            grace = ike.last_heard + REKEYED_GRACE
            return grace if ike.redundant_until is None else min(grace, ike.redundant_until)
        return None

    def receive(self, data: bytes, src: Address, dst: Address, now: float) -> list[Output]:
        """One IKE message (non-ESP marker removed) from ``src`` to our ``dst``."""
        out: list[Output] = []
        if len(data) > self.max_packet:
            self.stats["too-long"] += 1
            log.debug("event=ike-drop reason=too-long octets=%d src=%s", len(data), src)
            return out
        try:
            self._receive(data, src, dst, now, out)
        except IkeParseError as exc:
            self.stats["malformed"] += 1
            log.debug("event=ike-drop reason=%s src=%s", exc, src)
        except IkeProtocolError as exc:
            self.stats["refused"] += 1
            log.debug("event=ike-refused reason=%s src=%s", exc, src)
        return out

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        for key, ike in list(self.half_open.items()):
            if now - ike.created >= HALF_OPEN_TIMEOUT:
                del self.half_open[key]
                self.by_spi.pop(ike.our_spi, None)
                ike.state = IkeState.DEAD
                self.stats["half-open-expired"] += 1
        for c in list(self.connecting.values()):
            if now >= c.deadline:
                if c.tries > len(RETRANSMIT):
                    del self.connecting[c.spi_i]
                    self.stats["connect-timeout"] += 1
                    out.append(ConnectFailed(c.conn, "no answer to IKE_SA_INIT"))
                    continue
                c.tries += 1
                c.deadline = now + RETRANSMIT[min(c.tries - 1, len(RETRANSMIT) - 1)]
                self.stats["retransmitted"] += 1
                out.append(Send(c.request, c.local, c.remote))
        if self._timers_by_scan:
            for ike in list(self.by_spi.values()):
                self._tick_one(ike, now, out)
            return out
        for ike in self._due(now):
            self._tick_one(ike, now, out)
            self._timer_dirty.add(ike)  # (its entry was taken off the heap: a new one)
        return out

    def _tick_one(self, ike: IkeSA, now: float, out: list[Output]) -> None:
        """What falls due for one IKE SA at ``now``: nothing unless its deadline
        (:meth:`_deadline_of`) is ``now`` or earlier."""
        if ike.state is IkeState.HALF_OPEN and not ike.we_initiated:
            return
        if ike.state is IkeState.REKEYED:
            if now - ike.last_heard >= REKEYED_GRACE or (  # the peer never deleted it
                ike.redundant_until is not None and now >= ike.redundant_until
            ):
                self._kill(ike, "rekeyed", out)
                return
            if ike.pending is None:
                return
            # a request of ours still in flight on it (our rekey that the peer's crossed,
            # §2.8.2, or the DELETE after ours won) is sent again until answered, as on any
            # IKE SA: the exchanges in flight on the old IKE SA complete. It was not, and a
            # crossed rekey whose first request or answer was lost never completed here
        p = ike.pending
        if p is not None:
            if now >= p.deadline:
                if p.tries > len(RETRANSMIT) and ike.state is IkeState.REKEYED:
                    # our request on an IKE SA already replaced (the DELETE after our
                    # rekey, or our rekey that the peer's crossed): its successor holds the
                    # CHILD SAs and its own liveness says whether the peer is alive; this
                    # one goes as rekeyed (no IkeDown, no dpd_action). It counted peer-dead.
                    self.stats["rekeyed-unanswered"] += 1
                    log.info("event=ike-rekeyed-unanswered conn=%s peer=%s exchange=%s",
                             ike.conn.name, ike.remote, p.kind)  # fmt: skip
                    self._kill(ike, "rekeyed", out)
                    return
                if p.tries > len(RETRANSMIT):
                    self.stats["peer-dead"] += 1
                    log.info("event=ike-peer-dead conn=%s peer=%s", ike.conn.name,
                             ike.remote)  # fmt: skip
                    if p.kind == "auth":
                        out.append(ConnectFailed(ike.conn, "no answer to IKE_AUTH"))
                    # any request of ours unanswered says the peer is dead (what
                    # dpd_action acts on), not only a liveness check: a rekey too; our
                    # DELETE of the IKE SA and IKE_AUTH end as they did
                    dead = p.kind not in ("delete", "auth")
                    self._kill(ike, "peer-dead" if dead else "deleted", out)
                    return
                p.tries += 1
                p.deadline = now + RETRANSMIT[min(p.tries - 1, len(RETRANSMIT) - 1)]
                self.stats["retransmitted"] += 1
                if ike.probe_ahead > 0 and p.kind == "liveness":
                    # after a take-over without RFC 6311: perhaps the old member sent
                    # requests after its last replication. The check goes again under
                    # every ID tried so far (the first may just have been lost) and the
                    # next one; the peer processes the one it expects, drops the others
                    ike.probe_ahead -= 1
                    self.stats["message-id-probed"] += 1
                    mid = max([p.message_id, *p.alt]) + 1
                    hdr = Header(ike.spi_i, ike.spi_r, 0, p.exchange,
                                 Flag.INITIATOR if ike.we_initiated else 0, mid, 0)
                    p.alt[mid] = self._seal(ike, hdr, p.payloads)
                    ike.my_next_mid = mid + 1
                out += [Send(m, ike.local, ike.remote) for m in p.messages]
                out += [Send(m, ike.local, ike.remote) for ms in p.alt.values() for m in ms]
        elif ike.state is not IkeState.ESTABLISHED or ike.quiet:
            return
        elif ike.rr_due:  # (an IKE SA taken over while its peer's address was unverified)
            self._rr_check(ike, now, out)
        elif ike.queued_deletes:  # (... or while DELETEs of ours were unanswered)
            self._delete_queued(ike, now, out)
        elif ike.children_wanted:
            self._create_child_request(ike, ike.children_wanted.pop(0), now, out)
        elif (i := next((i for i, (_, at, _) in enumerate(ike.children_later) if now >= at),
                        None)) is not None:  # fmt: skip
            cc, _, why = ike.children_later.pop(i)
            self.stats["child-retried"] += 1
            log.info("event=child-sa-retry conn=%s child=%s peer=%s round=%d after=%s",
                     ike.conn.name, cc.name, ike.remote, ike.child_rounds + 1,
                     _quote(why))  # fmt: skip
            self._create_child_request(ike, cc, now, out)
        elif stale := [c for c in ike.children if c.rekeyed_at is not None
                       and now - c.rekeyed_at >= REKEYED_GRACE]:  # fmt: skip
            # the peer rekeyed them and never deleted them: we do (their keys would live
            # on for ever, and our traffic stays on the old SA until it is deleted)
            self.stats["rekeyed-child-deleted"] += len(stale)
            log.info("event=child-rekeyed-not-deleted conn=%s peer=%s spi_in=%s",
                     ike.conn.name, ike.remote,
                     ",".join(f"{c.spi_in:08x}" for c in stale))  # fmt: skip
            self._delete_children(ike, stale, now, out)
        elif (ike.rekey_at is not None and now >= ike.rekey_at) or _mid_rekey_now(ike):
            if _mids_low(ike):
                self.stats["ike-rekey-message-ids"] += 1
            self._rekey_ike_request(ike, now, out)
        elif (due := self._child_due(ike, now)) is not None:
            self._rekey_child_request(ike, due, now, out)
        elif (ike.conn.dpd_delay
              and now - max(ike.last_heard, ike.esp_at) >= ike.conn.dpd_delay):  # fmt: skip
            if ike.probe_ahead == 0 and self.esp_heard is not None and self.esp_heard(ike):
                ike.esp_at = now  # (its ESP says it is alive: looked at again dpd_delay later)
                self.stats["liveness-esp"] += 1
            else:
                self._request(ike, "liveness", [], now, out)

    def next_deadline(self) -> float | None:
        ds: list[float] = [ike.created + HALF_OPEN_TIMEOUT for ike in self.half_open.values()]
        ds += [c.deadline for c in self.connecting.values()]
        if self._timers_by_scan:
            d = self._next_deadline_scan()
            if d is not None:
                ds.append(d)
            return min(ds) if ds else None
        self._timer_refresh()
        if self._audit_spis:  # (an audit under way: its next slice, at once)
            ds.append(self._timer_audit_at)
        heap, by_spi = self._timer_heap, self.by_spi
        while heap:
            d, seq, spi = heap[0]
            ike = by_spi.get(spi)
            if ike is not None and ike.timer_seq == seq:
                ds.append(d)
                break
            heapq.heappop(heap)  # (stale: the IKE SA's deadline moved, or it is gone)
        return min(ds) if ds else None

    def _next_deadline_scan(self) -> float | None:
        """The earliest deadline of the IKE SAs by a walk of every one: what the heap gives
        without it (the reference the tests hold it to, and :meth:`_timer_audit`'s)."""
        ds = [d for ike in self.by_spi.values() if (d := self._deadline_of(ike)) is not None]
        return min(ds) if ds else None

    @staticmethod
    def _deadline_of(ike: IkeSA) -> float | None:
        """When :meth:`_tick_one` next has something to do for ``ike`` (None: never, until
        something changes it). A half-open IKE SA of a peer's is timed by ``half_open``."""
        if ike.state is IkeState.HALF_OPEN and not ike.we_initiated:
            return None
        if ike.state is IkeState.REKEYED:
            grace = ike.last_heard + REKEYED_GRACE
            if ike.redundant_until is not None:
                grace = min(grace, ike.redundant_until)
            return grace if ike.pending is None else min(grace, ike.pending.deadline)
        if ike.pending is not None:
            return ike.pending.deadline
        if ike.state is not IkeState.ESTABLISHED or ike.quiet:
            return None
        ds: list[float] = []
        if ike.rr_due or ike.queued_deletes or ike.children_wanted:
            ds.append(ike.last_heard)  # at once
        ds += [at for _, at, _ in ike.children_later]
        if ike.conn.dpd_delay:
            ds.append(max(ike.last_heard, ike.esp_at) + ike.conn.dpd_delay)
        if ike.rekey_at is not None:
            ds.append(ike.rekey_at)
        if _mid_rekey_now(ike):
            ds.append(ike.last_heard)  # rekeyed at once (§2.2)
        ds += [c.rekey_at for c in ike.children if c.rekey_at is not None and not c.rekeyed]
        ds += [c.rekeyed_at + REKEYED_GRACE for c in ike.children if c.rekeyed_at is not None]
        return min(ds) if ds else None

    # -- the deadline heap -----------------------------------------------------------------
    def _touch(self, ike: IkeSA) -> None:
        """``ike``'s deadline may change (a public method or a received message is for it):
        looked at again at the next next_deadline() or tick()."""
        self._timer_dirty.add(ike)

    def _timer_refresh(self) -> None:
        """A heap entry for each IKE SA marked since the last look whose deadline moved."""
        dirty, by_spi = self._timer_dirty, self.by_spi
        if not dirty:
            return
        for ike in dirty:
            if by_spi.get(ike.our_spi) is ike:  # (one gone: its entry is stale by its SPI)
                self._arm(ike)
        # (cleared, not popped one by one: a set keeps the table it once grew to, 10,000
        # IKE SAs put in at a start, and its pop() looks along it, 11 us a call at that size)
        dirty.clear()

    def _arm(self, ike: IkeSA) -> None:
        d = self._deadline_of(ike)
        if ike.timer_seq and ike.timer_at == d:
            return  # its entry stands
        if d is None:
            ike.timer_at, ike.timer_seq = None, 0  # (its entry, if any, is now stale)
            return
        seq = next(self._timer_seqs)
        ike.timer_at, ike.timer_seq = d, seq
        heap = self._timer_heap
        heapq.heappush(heap, (d, seq, ike.our_spi))
        if len(heap) > 2 * len(self.by_spi) + 64:  # mostly stale entries: only the live
            heap[:] = [(i.timer_at, i.timer_seq, spi) for spi, i in self.by_spi.items()
                       if i.timer_seq and i.timer_at is not None]  # fmt: skip
            heapq.heapify(heap)

    def _due(self, now: float) -> list[IkeSA]:
        """The IKE SAs whose deadline is ``now`` (within TIMER_SLACK) or past, in the order
        of ``by_spi`` (as the walk of every IKE SA visited them), their entries taken off."""
        self._timer_refresh()
        if now >= self._timer_audit_at:
            self._timer_audit(now)
        heap, by_spi = self._timer_heap, self.by_spi
        due: list[IkeSA] = []
        limit = now + TIMER_SLACK
        while heap and heap[0][0] <= limit:
            _, seq, spi = heapq.heappop(heap)
            ike = by_spi.get(spi)
            if ike is not None and ike.timer_seq == seq:
                ike.timer_at, ike.timer_seq = None, 0
                due.append(ike)
        due.sort(key=lambda i: i.timer_order)
        return due

    def _timer_audit(self, now: float) -> None:
        """The next TIMER_AUDIT_SLICE IKE SAs of the audit's pass (one begins every
        TIMER_AUDIT s, over the IKE SAs the table has then; about 1 us an IKE SA) have their
        deadline computed again: one that is not its entry's was changed by something that
        did not mark it. It is corrected (a deadline later than the entry's only cost a
        visit; an earlier one would have been late), counted and logged. The rest of the
        pass goes at the next tick (due at once, :meth:`next_deadline`), never all in one
        loop turn."""
        spis, by_spi = self._audit_spis, self.by_spi
        if not spis:
            spis = self._audit_spis = list(by_spi)
            self._audit_pos = 0
        end = self._audit_pos + TIMER_AUDIT_SLICE
        missed = [ike for spi in spis[self._audit_pos:end] if (ike := by_spi.get(spi))
                  is not None and self._deadline_of(ike) != (
                      ike.timer_at if ike.timer_seq else None)]  # fmt: skip
        if end >= len(spis):
            self._audit_spis, self._audit_pos = [], 0
            self._timer_audit_at = now + TIMER_AUDIT
        else:
            self._audit_pos, self._timer_audit_at = end, now
        if not missed:
            return
        self.stats["deadline-missed"] += len(missed)
        log.warning("event=ike-deadline-missed ike_sas=%d conn=%s reason=%s", len(missed),
                    missed[0].conn.name, _quote("a deadline changed unmarked: corrected"))
        for ike in missed:
            self._arm(ike)

    def delete(self, ike: IkeSA, now: float, reason: str = "") -> list[Output]:
        """Send a DELETE for the IKE SA (and so all its CHILD SAs).

        ``reason`` (the operator's ``ipsecct sa delete --ike``): its CHILD SAs go at once
        (ChildDown before the DELETE is sent: nothing is sent on them from now on, as the
        peer removes its half on receipt, §1.4.1), and the IKE SA's end is told with it
        (IkeDown, once the DELETE is answered or given up). Without: they stay until then
        (the gateway stopping)."""
        self._touch(ike)
        out: list[Output] = []
        if reason:
            ike.close_reason = reason
            for c in ike.children:
                self._child_spis.discard(c.spi_in)
                out.append(ChildDown(ike, c, reason))
            ike.children = []
        if ike.state is not IkeState.ESTABLISHED:
            self._kill(ike, reason or "deleted", out)
            return out
        if ike.pending is not None:  # window of one: the delete replaces the pending check
            self._drop_pending(ike)
        self._request(ike, "delete", [DeletePayload(ProtocolId.IKE)], now, out)
        if ike.pending is not None:  # (none: closed, no message ID was left for it)
            ike.state = IkeState.DELETING
        return out

    # -- moving an IKE SA to another gateway (its context, ikev2.context) ------------------
    def export_ike(self, ike: IkeSA, now: float) -> list[bytes]:
        """The IKE SA's context CDBs; the IKE SA is then forgotten here without a DELETE (it
        lives on at the gateway that imports it). An exchange we started must be finished
        first (a liveness check is simply dropped); a request of the peer answered here is
        answered there too (the cached response travels)."""
        self._touch(ike)
        from . import context

        p = ike.pending
        if p is not None and p.kind != "liveness":
            raise IkeContextError(f"a {p.kind} exchange is in flight: try again")
        cdbs = context.encode(ike, now)
        ike.pending = None
        if self.by_spi.get(ike.our_spi) is ike:
            del self.by_spi[ike.our_spi]
        for c in ike.children:
            self._child_spis.discard(c.spi_in)
        ike.state = IkeState.DEAD
        self._release_vips(ike, away=True)  # the context carries them (item 32)
        self.stats["ike-sa-exported"] += 1
        return cdbs

    def import_ike(self, cdbs: list[bytes], now: float, local: Address | None = None,
                   admit: Callable[[IkeSA], str | None] | None = None) -> IkeSA:  # fmt: skip
        """Take over an IKE SA (and its CHILD SAs) from its context CDBs: from now on this
        engine answers and rekeys it. Raises IkeContextError when the context is malformed,
        names a connection this gateway does not have or whose policy does not admit the SA
        as negotiated (:func:`~ipsecct.ikev2.context.policy_refusal`), ``admit`` (the
        caller's check) says why not, or its SPIs are in use here."""
        from . import context

        ike = context.decode(cdbs, self.connections, now, local)
        why = context.policy_refusal(ike)
        if why is None and admit is not None:
            why = admit(ike)
        if why is not None:
            if why.startswith(context.UNCHECKED_REVOCATION):
                self.stats["revocation-unchecked-refused"] += 1
            raise IkeContextError(why)
        if ike.our_spi in self.by_spi:
            raise IkeContextError("the IKE SA's SPI is in use here")
        spis = [c.spi_in for c in ike.children]
        if len(set(spis)) != len(spis) or any(s in self._child_spis for s in spis):
            raise IkeContextError("a CHILD SA's SPI is in use here")
        why = self.vip_refusal(ike.conn, ike.vips_given, ike.vips, identity=ike.peer_id)
        if why is not None:
            raise IkeContextError(why)
        for name, a in ike.vips if not ike.vips_given else []:
            self.pools[name].arrive(a, ike.peer_id)
        self.by_spi[ike.our_spi] = ike
        self._child_spis.update(spis)
        self.stats["ike-sa-imported"] += 1
        # what the old gateway had not finished: DELETEs of CHILD SAs the peer has not
        # answered, a check of the peer's new address (both go from here, :meth:`tick`, or
        # after the message-ID sync of a fail-over)
        self.stats["imported-deletes-owed"] += len(ike.queued_deletes)
        self.stats["imported-address-unverified"] += ike.rr_due
        log.info("event=ike-sa-imported conn=%s peer=%s id=%s children=%d deletes_owed=%d "
                 "address_unverified=%s", ike.conn.name, ike.remote, ike.peer_id,
                 len(ike.children), len(ike.queued_deletes), ike.rr_due)  # fmt: skip
        return ike

    def vip_refusal(self, conn: Connection, we_initiated: bool,
                    vips: list[tuple[str, IPAddr]], leased: bool = True,
                    identity: str | None = None, owner: str | None = None
                    ) -> str | None:  # fmt: skip
        """Why the virtual IPs an IKE SA (of ``identity``) from another gateway holds cannot
        come here (None: they can): as responder, each must be from a pool of that name
        that the connection here names (``pools``), in its ``addrs``, and neither leased
        here to an IKE SA already nor reserved for another transfer than ``owner`` (the
        transfer asking; None: the import of an IKE SA, admitted by a reservation for its
        identity) (``leased``: checked); as initiator (what the peer gave us), any one per
        family."""
        if we_initiated:
            fams = [a.version for name, a in vips]
            if any(vips_name for vips_name, _ in vips) or len(set(fams)) != len(fams):
                return "bad virtual IPs of an initiator"
            return None
        seen: set[IPAddr] = set()
        for name, a in vips:
            pool = self.pools.get(name)
            if pool is None or name not in conn.pools:
                return f"virtual IP {a} of pool {name!r}: no such pool for {conn.name!r} here"
            why = pool.refusal(a, identity, owner) if leased else (
                None if pool.contains(a) else f"virtual IP {a} is not in pool {name!r} here")
            if why is not None:
                return why
            if a in seen:
                return f"virtual IP {a} twice"
            seen.add(a)
        return None

    def _same_identity(self, conn_name: str, peer_id: str, ike: IkeSA | None = None
                       ) -> list[IkeSA]:  # fmt: skip
        """The live IKE SAs of identity ``peer_id`` with connection ``conn_name`` here
        (other than ``ike``)."""
        return [o for o in self.by_spi.of_identity(conn_name, peer_id)
                if o is not ike and o.state is not IkeState.DEAD]  # fmt: skip

    def arrival_refusal(self, conn: Connection, peer_id: str, coming: int = 0) -> str | None:
        """Why an IKE SA of identity ``peer_id`` for ``conn`` arriving from another gateway
        would not be admitted here (None: it would), as an arriving IKE_AUTH would not:
        ``unique = keep`` and the identity has an established IKE SA with the connection
        here, or it has MAX_IKE_SAS_PER_IDENTITY of them (not counting those ``unique =
        replace`` would replace; with ``coming``, those that would come with it: a
        standby's replicas of the identity, but for ``unique = replace``, where each
        replaces the older). Asked by a transfer's target before the COMMIT (the transfer
        is refused; the IKE SA stays at the source), and by a replica holder as a replica
        arrives (not kept; the active is told)."""
        have = self._same_identity(conn.name, peer_id)
        up = sum(1 for o in have if o.state is IkeState.ESTABLISHED)
        if conn.unique == "keep" and up:
            return f"unique = keep: identity {peer_id!r} has an IKE SA of {conn.name!r} here"
        n = len(have) - up if conn.unique == "replace" else len(have) + coming
        if n >= MAX_IKE_SAS_PER_IDENTITY:
            return f"too many IKE SAs of identity {peer_id!r} with {conn.name!r} here"
        return None

    def arrived(self, ike: IkeSA, now: float) -> list[Output]:
        """``unique`` for an IKE SA just imported (the COMMIT of its CHILD SAs is out, or a
        take-over: it can no longer be refused without losing it). ``replace``: the
        identity's older established IKE SAs here are replaced, as at IKE_AUTH (never the
        arrived one). ``keep``, or the identity over MAX_IKE_SAS_PER_IDENTITY, which
        :meth:`arrival_refusal` refused before the COMMIT: one came here in between; both
        are kept, told (``ike-sa-unique-late``, counted ``unique-late``)."""
        self._touch(ike)
        out: list[Output] = []
        have = self._same_identity(ike.conn.name, ike.peer_id, ike)
        older = [o for o in have if o.state is IkeState.ESTABLISHED and o.created <= ike.created]
        if ike.conn.unique == "replace":
            self._replace(older, now, out)
            have = [o for o in have if o not in older]
        kept = ike.conn.unique == "keep" and any(o.state is IkeState.ESTABLISHED for o in have)
        if kept or len(have) >= MAX_IKE_SAS_PER_IDENTITY:
            self.stats["unique-late"] += 1
            log.warning("event=ike-sa-unique-late conn=%s peer=%s id=%s others=%d reason=%s",
                        ike.conn.name, ike.remote, _quote(ike.peer_id), len(have),
                        _quote("arrived after its COMMIT: kept beside the identity's others"))
        return out

    def end_leases(self, ike: IkeSA, away: bool = False) -> None:
        """The gateway stops: the virtual IPs ``ike`` holds go offline (it ends with the
        process), or away (``away``: a standby or cluster member continues it)."""
        self._touch(ike)
        self._release_vips(ike, away=away)

    def forget(self, ike: IkeSA) -> None:
        """Drop an IKE SA without a word to the peer: another gateway took it over (the
        standby of a fail-over pair). Its CHILD SAs' tunnels are the caller's to remove."""
        self._touch(ike)
        if self.by_spi.get(ike.our_spi) is ike:
            del self.by_spi[ike.our_spi]
        for c in ike.children:
            self._child_spis.discard(c.spi_in)
        ike.state = IkeState.DEAD
        self._drop_pending(ike)
        self._release_vips(ike, away=True)  # the gateway that took it holds them
        self.stats["ike-sa-forgotten"] += 1

    def delete_child(self, ike: IkeSA, child: ChildSA, now: float) -> list[Output]:
        """Send a DELETE for one CHILD SA; it is removed at once (§1.4.1: we stop using it,
        the peer answers with its half)."""
        self._touch(ike)
        out: list[Output] = []
        if ike.state is not IkeState.ESTABLISHED or child not in ike.children:
            return out
        if ike.pending is not None and ike.pending.kind == "liveness":
            ike.pending = None
        if ike.pending is not None:
            raise IkeProtocolError("an exchange is in progress: try again")
        ike.children.remove(child)
        self._child_spis.discard(child.spi_in)
        out.append(ChildDown(ike, child, "deleted"))
        self._request(ike, "delete-child", [DeletePayload(
            ProtocolId.ESP, (child.spi_in.to_bytes(4, "big"),))], now, out)  # fmt: skip
        return out

    def volume_limit(self, ike: IkeSA, child: ChildSA, hard: bool,
                     now: float) -> list[Output]:  # fmt: skip
        """One of the CHILD SA's ESP SAs reached its rekey_bytes/rekey_packets (``hard``
        False: the SAD's soft lifetime): it is rekeyed now, by the same path as a rekey
        that falls due by time (a collision with the peer's is resolved as for those); or
        its life_time, life_bytes or life_packets (the SAD's hard lifetime: the SA takes and
        sends no more packets; counted as ``child-expired-volume`` whichever it was): it is
        removed now and its DELETE sent, queued behind an exchange in flight."""
        self._touch(ike)
        out: list[Output] = []
        if child not in ike.children:
            return out
        if not hard:
            if not child.rekeyed and (child.rekey_at is None or child.rekey_at > now):
                self.stats["child-rekey-volume"] += 1
                child.rekey_at = now
            return self.tick(now)
        self.stats["child-expired-volume"] += 1
        log.info("event=child-sa-expired conn=%s peer=%s spi_in=%08x reason=%s", ike.conn.name,
                 ike.remote, child.spi_in,
                 _quote("life_time, life_bytes or life_packets reached"))  # fmt: skip
        ike.children.remove(child)
        self._child_spis.discard(child.spi_in)
        out.append(ChildDown(ike, child, "expired"))
        ike.queued_deletes.append(child.spi_in.to_bytes(4, "big"))
        return out + self.tick(now)

    def liveness(self, ike: IkeSA, now: float) -> list[Output]:
        """Send a liveness check (an empty INFORMATIONAL request) now."""
        self._touch(ike)
        out: list[Output] = []
        if ike.state is IkeState.ESTABLISHED and ike.pending is None and not ike.quiet:
            self._request(ike, "liveness", [], now, out)
        return out

    # -- receiving ----------------------------------------------------------------------
    def _receive(self, data: bytes, src: Address, dst: Address, now: float,
                 out: list[Output]) -> None:  # fmt: skip
        if (len(data) > 18 and data[18] == ExchangeType.IKE_SA_INIT
                and self._source_at_limit(data, src)):  # fmt: skip
            return
        try:
            hdr, payloads = decode(data)
        except IkeProtocolError as exc:
            h = decode_header(data)
            if (exc.notify == Notify.UNSUPPORTED_CRITICAL_PAYLOAD and h.from_initiator
                    and h.exchange == ExchangeType.IKE_SA_INIT and not h.is_response
                    and h.spi_r == bytes(8) and h.message_id == 0):  # fmt: skip
                # §2.5: answered (in the clear, as INVALID_SYNTAX is), nothing kept
                self.stats["unsupported-critical"] += 1
                self._plain_reply(h, bytes(8), [NotifyPayload(exc.notify, data=exc.data)],
                                  src, dst, out)  # fmt: skip
                return
            raise
        if hdr.exchange == ExchangeType.IKE_SA_INIT:
            if hdr.is_response:
                self._sa_init_response(data, hdr, payloads, src, dst, now, out)
                return
            self._sa_init(data, hdr, payloads, src, dst, now, out)
            return
        # the SPI we chose: the responder's when the sender is the original initiator
        ours, theirs = (hdr.spi_r, hdr.spi_i) if hdr.from_initiator else (hdr.spi_i, hdr.spi_r)
        ike = self.by_spi.get(ours)
        if (ike is None or ike.state is IkeState.DEAD or ike.we_initiated == hdr.from_initiator
                or (ike.spi_r if ike.we_initiated else ike.spi_i) != theirs):  # fmt: skip
            self.stats["unknown-spi"] += 1
            return
        self._touch(ike)  # (whatever the message does to it, its lists and CHILD SAs too)
        if hdr.is_response:
            self.touched += 1
            self._response(ike, data, hdr, payloads, src, now, out)
            return
        if (hdr.message_id == 0 and hdr.exchange == ExchangeType.INFORMATIONAL and ike.mid_sync
                and ike.state is IkeState.ESTABLISHED and len(payloads) == 1
                and isinstance(payloads[0], SKPayload)):  # fmt: skip
            self.touched += 1
            if self._mid_sync_request(ike, data, hdr, payloads, src, now, out):
                return
        if ike.pending is not None and ike.pending.kind == "mid-sync":
            # Our RFC 6311 sync is unanswered: a request of the peer's that crossed it is
            # left unanswered. The peer re-queues its exchange in flight as it takes the
            # sync and sends it again (under the ID the sync settles); an answer to the
            # first one comes to it after the sync, to no exchange it has in flight, and
            # strongSwan 5.9.8 then deletes the IKE SA ("received INFORMATIONAL response,
            # but expected EXCHANGE_TYPE_UNDEFINED": its liveness check sent as the standby
            # took over, a fail-over test's client lost its tunnel under load).
            self.stats["request-during-mid-sync"] += 1
            return
        if hdr.message_id == ike.peer_next_mid - 1 and ike.last_response:
            # authenticate before answering again; a fragmented request: on its first fragment
            if self._authentic_retransmit(ike, data, payloads):
                # where the peer is; with MOBIKE where it came from (it moves nothing there,
                # RFC 4555 §3.8): strongSwan repeats a path test from its new address every
                # 2.5 s and closes the IKE SA after 10 tries when no answer comes back there
                frm, to = ((dst, src) if ike.mobike and not ike.mobike_initiator
                           else (ike.local, ike.remote))  # fmt: skip
                # At most one answer per RETRANSMIT_ANSWER_GAP to where the peer is, and as
                # many to elsewhere (a replay flood from forged sources then neither
                # amplifies nor keeps the peer's own retransmission unanswered)
                home = to == ike.remote
                last = ike.answered_home if home else ike.answered_away
                if 0.0 <= now - last < RETRANSMIT_ANSWER_GAP:
                    self.stats["retransmit-rate-limited"] += 1
                    return
                if home:
                    ike.answered_home = now
                else:
                    ike.answered_away = now
                self.stats["retransmit-answered"] += 1
                out += [Send(m, frm, to) for m in ike.last_response]
            return
        ahead = 0 < hdr.message_id - ike.peer_next_mid <= ike.resync_ahead
        if hdr.message_id != ike.peer_next_mid and not ahead:
            self.stats["bad-message-id"] += 1
            return
        try:
            opened = self._open(ike, data, hdr, payloads)
        except IkeProtocolError as exc:
            if exc.notify != Notify.UNSUPPORTED_CRITICAL_PAYLOAD:
                raise
            self._unsupported_critical(ike, hdr, exc, src, dst, now, out)
            return
        if opened is None:
            return  # more fragments to come
        self.touched += 1
        inner = opened
        # the whole message as it came: its fragments (just completed by _open), or itself
        fragmented = len(payloads) == 1 and isinstance(payloads[0], SKFPayload)
        datagrams = ike.fragment_set if fragmented and ike.fragment_set else [data]
        ike.fragment_set = []
        if ike.quiet and ike.state is IkeState.ESTABLISHED and _changes_state(hdr, inner):
            self._hold(ike, datagrams, hdr, src, dst)
            return
        if ahead:  # after a take-over without RFC 6311: the old member answered requests
            self.stats["message-id-resynced"] += 1  # after its last replication
            log.info("event=ike-message-id-resynced conn=%s peer=%s expected=%d got=%d",
                     ike.conn.name, ike.remote, ike.peer_next_mid, hdr.message_id)  # fmt: skip
            ike.last_response = []
        ike.resync_ahead = 0
        answer_to: tuple[Address, Address] | None = None
        responder = ike.mobike and not ike.mobike_initiator and src != ike.remote
        update = (hdr.exchange == ExchangeType.INFORMATIONAL
                  and Notify.UPDATE_SA_ADDRESSES in notifies(inner))  # fmt: skip
        # a peer behind a NAT whose mapping changed: the same address, another port. RFC 4555
        # §3.8 has the peer find it by the NAT-D of its liveness checks and send an update,
        # but strongSwan 5.9.8 compares them only with those of its previous check (ike_sa.c
        # has_mapping_changed): a mapping that changed before its first one (or with no
        # dpd_delay) is never announced. Such a request moves the IKE SA as an update does,
        # with the same check before the CHILD SAs follow (a path test comes from another
        # address of the peer, not from another port of the NAT's)
        rebound = ike.nat_remote and src.host == ike.remote.host and not update
        if responder and (update or rebound):
            # RFC 4555 §3.5, §5.2: the IKE SA answers from and to the new address at once,
            # its CHILD SAs follow once the address answers a check of our own (rr_due)
            self.stats["rr-check-due"] += 1
            if rebound:
                self.stats["mobike-nat-rebound"] += 1
                log.info("event=ike-nat-mapping-changed conn=%s peer=%s new=%s",
                         ike.conn.name, ike.remote, src)  # fmt: skip
            if ike.esp_remote is None:
                ike.esp_remote = ike.remote
            ike.remote, ike.local, ike.rr_due = src, dst, True
        elif responder:
            # RFC 4555 §3.8: with MOBIKE, a request without UPDATE_SA_ADDRESSES changes no
            # address (the peer may be testing a path: strongSwan's first request after it
            # moved is an empty INFORMATIONAL from the new address, its update comes next).
            # It is answered where it came from (RFC 7296 §2.11), and nothing moves
            self.stats["mobike-path-tested"] += 1
            log.info("event=ike-request-from-elsewhere conn=%s peer=%s from=%s", ike.conn.name,
                     ike.remote, src)  # fmt: skip
            answer_to = (dst, src)
        elif not (ike.mobike and ike.mobike_initiator and ike.remote.port != 500
                  and src == Address(ike.remote.host, 500)):  # fmt: skip
            # (a MOBIKE initiator that floated to NAT-T after a move stays there when the
            # peer's request still goes to the NAT's port-500 mapping: it sends the update
            # that tells it the new one next)
            self._float(ike, src, dst, out)
        ike.last_heard = now
        if (hdr.exchange == ExchangeType.IKE_AUTH and ike.state is IkeState.HALF_OPEN
                and not ike.we_initiated):  # fmt: skip
            reply = self._ike_auth(ike, inner, now, out)
            ike.init_request = ike.init_response = b""  # (see IkeSA.init_request)
        elif ike.state is IkeState.HALF_OPEN:
            self.stats["bad-exchange"] += 1
            return
        elif hdr.exchange == ExchangeType.INFORMATIONAL:
            reply = self._informational(ike, inner, out, answer_to or (ike.local, ike.remote))
        elif hdr.exchange == ExchangeType.CREATE_CHILD_SA:
            reply = self._create_child(ike, inner, now, out)
        else:
            self.stats["bad-exchange"] += 1
            reply = [NotifyPayload(Notify.INVALID_SYNTAX)]
        self._answer(ike, hdr, reply, out, answer_to)
        if ike.rr_due and ike.pending is None and ike.state is IkeState.ESTABLISHED:
            self._rr_check(ike, now, out)
        if _dead(ike):
            self._kill(ike, "deleted by peer" if ike.peer_id else "authentication failed", out)
        elif ike.peer_next_mid > MAX_MID:
            # the peer used its last message ID (refusing our rekeys all the way from
            # MID_REKEY_AT): it can send no request, and no 32-bit field holds what we expect
            # next (an IKE SA context, a replica). §2.2: closed
            self.stats["message-id-exhausted"] += 1
            log.warning("event=ike-message-ids-exhausted conn=%s peer=%s side=peer",
                        ike.conn.name, ike.remote)  # fmt: skip
            out += self.delete(ike, now)

    def _open(self, ike: IkeSA, data: bytes, hdr: Header,
              payloads: list[Payload]) -> list[Payload] | None:  # fmt: skip
        """The payloads inside the Encrypted payload; for an Encrypted Fragment (RFC 7383),
        None until the last fragment of the message is in."""
        if len(payloads) == 1 and isinstance(payloads[0], SKFPayload):
            skf = payloads[0]
            if skf.number != 1 and skf.first != 0:
                raise IkeParseError("only the first fragment names the first payload")
            if not ike.fragmentation or skf.total > MAX_FRAGMENTS:
                self.stats["fragment-refused"] += 1
                raise IkeProtocolError("unexpected or too many IKE fragments")
            plain = ike.inbound.open(data, SKPayload(skf.first, skf.body, skf.offset))
            f = ike.fragments
            if f is None or f[0] != hdr.message_id or f[1] != skf.total:
                f = ike.fragments = (hdr.message_id, skf.total, 0, {})
                ike.fragment_data = {}
            if skf.number == 1:
                f = ike.fragments = (f[0], f[1], skf.first, f[3])
            f[3][skf.number] = plain
            if sum(map(len, f[3].values())) > self.max_packet:  # no IKE message we take is
                ike.fragments = None  # bigger: the sender (perhaps anyone, on a half-open
                ike.fragment_data = {}  # SA) only wants our memory
                self.stats["fragment-refused"] += 1
                raise IkeProtocolError("IKE fragments add up to more than max_packet")
            ike.fragment_data[skf.number] = data
            if len(f[3]) < f[1]:
                return None
            ike.fragments = None
            raw, ike.fragment_data = ike.fragment_data, {}
            ike.fragment_set = [raw[i] for i in range(1, f[1] + 1)]
            self.stats["fragmented-received"] += 1
            return decode_payloads(b"".join(f[3][i] for i in range(1, f[1] + 1)), f[2])
        if len(payloads) != 1 or not isinstance(payloads[-1], SKPayload):
            raise IkeParseError("a protected exchange without a single Encrypted payload")
        sk = payloads[-1]
        plain = ike.inbound.open(data, sk)
        return decode_payloads(plain, sk.first)

    def _unsupported_critical(self, ike: IkeSA, req: Header, exc: IkeProtocolError,
                              src: Address, dst: Address, now: float,
                              out: list[Output]) -> None:  # fmt: skip
        """The peer's request (authenticated) holds a payload we do not know with its
        critical bit set: RFC 7296 §2.5 rejects the message, and its answer says so
        (UNSUPPORTED_CRITICAL_PAYLOAD, the payload's type as its data). Nothing in it is
        acted on and nothing moves (the answer goes where it came from, as a MOBIKE path
        test's); only the message ID is used up, as by a liveness check. Unanswered, the
        peer retransmitted it and then closed the IKE SA and its CHILD SAs. An IKE_AUTH so
        refused creates no IKE SA (§2.21.2): the half-open one is dropped."""
        ike.fragment_set = []
        if ike.state is IkeState.HALF_OPEN and (
                req.exchange != ExchangeType.IKE_AUTH or ike.we_initiated):  # fmt: skip
            self.stats["bad-exchange"] += 1
            return
        self.touched += 1
        self.stats["unsupported-critical"] += 1
        if self._refusal_log.allow("critical", now):
            log.warning("event=ike-unsupported-critical-payload conn=%s peer=%s exchange=%d"
                        " payload=%d", ike.conn.name, src, req.exchange,
                        exc.data[0] if exc.data else 0)  # fmt: skip
        ike.resync_ahead = 0
        via = (dst, src) if src != ike.remote or dst != ike.local else None
        self._answer(ike, req, [NotifyPayload(exc.notify, data=exc.data)], out, via)
        if ike.state is IkeState.HALF_OPEN:
            ike.init_request = ike.init_response = b""
            self._kill(ike, "unsupported critical payload", out)

    def _hold(self, ike: IkeSA, datagrams: list[bytes], hdr: Header,
              src: Address, dst: Address) -> None:  # fmt: skip
        """A request that would change a quiet IKE SA (its CHILD SAs are being transferred):
        kept unanswered for the gateway that ends up with the IKE SA (:meth:`take_held`), so
        that the CHILD SAs the transfer moves are the IKE SA's CHILD SAs. A fragmented one
        (RFC 7383) is kept whole: every fragment's datagram, in order (at most MAX_FRAGMENTS,
        each authenticated; one request per IKE SA, its window being one)."""
        if ike.held is None or ike.held[0] != hdr.message_id:
            self.stats["request-held"] += 1
            if len(datagrams) > 1:
                self.stats["request-held-fragmented"] += 1
            log.info("event=ike-request-held conn=%s peer=%s exchange=%d mid=%d fragments=%d",
                     ike.conn.name, ike.remote, hdr.exchange, hdr.message_id,
                     len(datagrams) if len(datagrams) > 1 else 0)  # fmt: skip
        new = ike.held is None or ike.held[0] != hdr.message_id
        ike.held = (hdr.message_id, datagrams, src, dst)
        if new and self.on_request_held is not None:
            self.on_request_held(ike)

    def take_held(self, ike: IkeSA) -> tuple[list[bytes], Address, Address] | None:
        """The peer's request kept while the IKE SA was quiet (none: None), now given to the
        caller: its datagrams (one, or its RFC 7383 fragments in order) to be sent on with the
        IKE SA's context, or passed to :meth:`receive` here, one by one, once the IKE SA is no
        longer quiet."""
        self._touch(ike)
        held, ike.held = ike.held, None
        if held is None or held[0] != ike.peer_next_mid:
            return None  # (answered meanwhile: a stale copy)
        return held[1], held[2], held[3]

    def _authentic_retransmit(self, ike: IkeSA, data: bytes, payloads: list[Payload]) -> bool:
        p = payloads[0] if len(payloads) == 1 else None
        if isinstance(p, SKFPayload):
            if p.number != 1:
                return False
            ike.inbound.open(data, SKPayload(p.first, p.body, p.offset))
            return True
        if not isinstance(p, SKPayload):
            raise IkeParseError("a protected exchange without a single Encrypted payload")
        ike.inbound.open(data, p)
        return True

    def _float(self, ike: IkeSA, src: Address, dst: Address, out: list[Output]) -> None:
        if src != ike.remote or dst != ike.local:
            was, ike.remote, ike.local = ike.remote, src, dst
            out.append(PeerMoved(ike, was))

    def _answer(self, ike: IkeSA, req: Header, payloads: list[Payload], out: list[Output],
                via: tuple[Address, Address] | None = None) -> None:  # fmt: skip
        """Answer the peer's request, from and to the IKE SA's addresses, or ``via`` (from,
        to: where a request that moved nothing came from)."""
        hdr = Header(ike.spi_i, ike.spi_r, 0, req.exchange,
                     Flag.RESPONSE | (0 if not ike.we_initiated else Flag.INITIATOR),
                     req.message_id, 0)  # fmt: skip
        msgs = self._seal(ike, hdr, payloads)
        ike.last_response = msgs
        ike.peer_next_mid = req.message_id + 1
        frm, to = via if via is not None else (ike.local, ike.remote)
        out += [Send(m, frm, to) for m in msgs]

    def _ike_octets(self, ike: IkeSA) -> int:
        """The largest IKE message (or fragment) we send to this peer whole: FRAGMENT_SIZE,
        or what ``fragment_size`` (an IP datagram) leaves of it on this IKE SA's path."""
        if self.fragment_size is None:
            return FRAGMENT_SIZE
        ip = 20 if ike.remote.host.version == 4 else 40
        marker = 4 if IKE_PORT not in (ike.local.port, ike.remote.port) else 0
        return self.fragment_size - ip - 8 - marker

    def _seal(self, ike: IkeSA, hdr: Header, payloads: list[Payload]) -> list[bytes]:
        """One message, or RFC 7383 fragments when it is too big and both sides can."""
        msg = ike.outbound.seal(hdr, payloads)
        limit = self._ike_octets(ike)
        if (not ike.fragmentation or len(msg) <= limit
                or ike.conn.fragmentation in ("accept", "no")):  # fmt: skip
            return [msg]  # (accept: announced, and the peer's are taken; ours go whole)
        plain = encode_payloads(payloads)
        chunk = limit - IKE_HEADER_LEN - 8 - ike.outbound.overhead()
        parts = [plain[i : i + chunk] for i in range(0, len(plain), chunk)]
        self.stats["fragmented-sent"] += 1
        return [
            ike.outbound.seal(hdr, [], inner_first=first_type(payloads) if i == 0 else 0,
                              plain=part, prefix=struct.pack("!HH", i + 1, len(parts)),
                              payload_type=PayloadType.SKF)
            for i, part in enumerate(parts)
        ]  # fmt: skip

    # -- IKE_SA_INIT ----------------------------------------------------------------------
    def _plain_reply(self, hdr: Header, spi_r: bytes, payloads: list[Payload], src: Address,
                     dst: Address, out: list[Output]) -> None:  # fmt: skip
        h = Header(hdr.spi_i, spi_r, 0, hdr.exchange, Flag.RESPONSE, hdr.message_id, 0)
        out.append(Send(encode_plain(h, payloads), dst, src))

    def _sa_init(self, data: bytes, hdr: Header, payloads: list[Payload], src: Address,
                 dst: Address, now: float, out: list[Output]) -> None:  # fmt: skip
        if hdr.spi_r != bytes(8) or hdr.message_id != 0 or not hdr.from_initiator:
            self.stats["bad-init"] += 1
            return
        key = (hdr.spi_i, src.host)
        old = self.half_open.get(key)
        if old is not None:
            if old.init_request != data:
                self.stats["bad-init"] += 1
            elif self._init_answer_allowed(old, src.host, now):
                self.stats["retransmit-answered"] += 1
                out.append(Send(old.init_response, dst, src))
            else:
                self.stats["init-retransmit-unanswered"] += 1
            return
        sa = find(payloads, SAPayload)
        ke = find(payloads, KEPayload)
        ni = find(payloads, NoncePayload)
        if sa is None or ke is None or ni is None:
            self.stats["bad-init"] += 1
            self._plain_reply(hdr, bytes(8), [NotifyPayload(Notify.INVALID_SYNTAX)], src, dst, out)
            return
        if len(self.half_open) >= self.cookie_threshold:  # under load: §2.6 cookies
            first = payloads[0]
            offered = (first.data if isinstance(first, NotifyPayload)
                       and first.type == Notify.COOKIE else b"")  # fmt: skip
            if not self._cookie_ok(offered, ni.data, src, hdr.spi_i, now):
                self.stats["cookie-sent"] += 1
                self._plain_reply(hdr, bytes(8), [NotifyPayload(
                    Notify.COOKIE, data=self._cookie(ni.data, src, hdr.spi_i, now))], src, dst,
                    out)  # fmt: skip
                return
            self.stats["cookie-accepted"] += 1
        cands = [c for c in self.connections if c.accepts(dst.host, src.host)]
        chosen = None
        # (anyone's SA payload, up to 255 proposals: each read once, and matched once against
        # each distinct configured proposal, however many connections offer it)
        chooser = Chooser(sa.proposals, ke_group=ke.group)
        for c in cands:
            chosen = chooser.choose(c.proposals)
            if chosen is not None:
                conn = c
                break
        if chosen is None:
            self.stats["no-proposal-chosen"] += 1
            if self._refusal_log.allow("ike", now):
                # as charon's "received proposals: ... configured proposals: ..."; without
                # it the operator saw only a counter while the client said NO_PROPOSAL_CHOSEN
                log.warning(
                    "event=ike-no-proposal-chosen peer=%s received=%s configured=%s",
                    src, describe_all(sa.proposals),
                    "; ".join(f"{c.name}: {describe_all(c.proposals)}" for c in cands)
                    or "(no connection takes this address)")  # fmt: skip
            self._plain_reply(hdr, bytes(8), [NotifyPayload(Notify.NO_PROPOSAL_CHOSEN)], src,
                              dst, out)  # fmt: skip
            return
        proposal, suite = chosen
        assert suite.dh is not None
        if ke.group != suite.dh:
            self.stats["invalid-ke"] += 1
            self._plain_reply(hdr, bytes(8), [NotifyPayload(
                Notify.INVALID_KE_PAYLOAD, data=struct.pack("!H", suite.dh))], src, dst, out)
            return
        # (the per-source limits were looked at before the datagram was read: _source_at_limit)
        if len(self.half_open) >= MAX_HALF_OPEN and not self._evict_half_open(src):
            self.stats["half-open-limit"] += 1
            return
        kx = KeyExchange(suite.dh)
        shared = kx.shared(ke.data)
        spi_r = self.random(8)
        while spi_r == bytes(8) or spi_r in self.by_spi:
            spi_r = self.random(8)
        nr = self.random(32)
        n = notifies(payloads)
        nat_local = nat_remote = False
        resp: list[Payload] = [
            SAPayload((suite.proposal(proposal.num, b""),)),
            KEPayload(suite.dh, kx.public),
            NoncePayload(nr),
        ]
        if Notify.NAT_DETECTION_SOURCE_IP in n and Notify.NAT_DETECTION_DESTINATION_IP in n:
            srcs = [p.data for p in payloads if isinstance(p, NotifyPayload)
                    and p.type == Notify.NAT_DETECTION_SOURCE_IP]  # fmt: skip
            nat_remote = _natd(hdr.spi_i, bytes(8), src) not in srcs
            nat_local = n[Notify.NAT_DETECTION_DESTINATION_IP].data != _natd(
                hdr.spi_i, bytes(8), dst)
            my_src = self.random(20) if conn.encap else _natd(hdr.spi_i, spi_r, dst)
            if conn.encap:
                nat_local = True
            resp += [
                NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, data=my_src),
                NotifyPayload(Notify.NAT_DETECTION_DESTINATION_IP,
                              data=_natd(hdr.spi_i, spi_r, src)),
            ]  # fmt: skip
        # fragmentation = no: not announced (a peer then sends no fragments)
        fragmentation = Notify.IKEV2_FRAGMENTATION_SUPPORTED in n and any(
            c.fragmentation != "no" for c in cands)
        if fragmentation:
            resp.append(NotifyPayload(Notify.IKEV2_FRAGMENTATION_SUPPORTED))
        peer_hashes: tuple[int, ...] = ()
        if Notify.SIGNATURE_HASH_ALGORITHMS in n:
            d = n[Notify.SIGNATURE_HASH_ALGORITHMS].data
            peer_hashes = tuple(struct.unpack(f"!{len(d) // 2}H", d[: len(d) // 2 * 2]))
            if any("pubkey" in (c.local_auth, c.remote_auth) for c in cands):
                resp.append(NotifyPayload(Notify.SIGNATURE_HASH_ALGORITHMS,
                                          data=struct.pack("!3H", *SUPPORTED_HASHES)))
        cas = [ca for c in cands if c.remote_auth == "pubkey" and c.send_certreq
               for ca in c.cacerts]  # fmt: skip
        if cas:
            resp.append(CertReqPayload(CERT_X509_SIGNATURE, certreq(cas)))
        reply_hdr = Header(hdr.spi_i, spi_r, 0, hdr.exchange, Flag.RESPONSE, 0, 0)
        response = encode_plain(reply_hdr, resp)
        keys = ike_keys(suite, shared, ni.data, nr, hdr.spi_i, spi_r)
        ike = IkeSA(
            hdr.spi_i, spi_r, False, conn, cands, suite, dst, src, now, keys, ni.data, nr,
            data, response, nat_local, nat_remote,
        )  # fmt: skip
        ike.last_heard = now
        ike.fragmentation = fragmentation
        ike.certreq_seen = any(isinstance(p, CertReqPayload) for p in payloads)
        ike.peer_hashes = peer_hashes
        self.by_spi[spi_r] = ike
        self.half_open[key] = ike
        self.touched += 1
        self.stats["ike-sa-init"] += 1
        out.append(Send(response, dst, src))

    def _source_at_limit(self, data: bytes, src: Address) -> bool:
        """Is ``data`` a new IKE_SA_INIT request from a source that holds its
        MAX_HALF_OPEN_PER_SOURCE half-open or MAX_IKE_SAS_PER_SOURCE IKE SAs already? Then
        it is dropped (counted) on its header alone, before its payloads are read and its
        proposals matched (an SA payload of 255 proposals from anyone: a millisecond). They
        were looked at only after that, so a source at its limit had all of it done for
        every INIT it sent and dropped after. A retransmission of one of its half-open IKE
        SAs' IKE_SA_INIT is not new: it goes on (to its answer or its count)."""
        hdr = decode_header(data)
        if hdr.is_response or hdr.spi_r != bytes(8) or (hdr.spi_i, src.host) in self.half_open:
            return False
        if self.half_open.from_host(src.host) >= MAX_HALF_OPEN_PER_SOURCE:
            self.stats["half-open-limit"] += 1
            return True
        if self.by_spi.from_host(src.host) >= MAX_IKE_SAS_PER_SOURCE:
            self.stats["ike-sa-limit"] += 1
            return True
        return False

    def _init_answer_allowed(self, ike: IkeSA, host: IPAddr, now: float) -> bool:
        """May a retransmission of ``ike``'s IKE_SA_INIT from ``host`` get the response
        again? At most INIT_ANSWERS times per half-open IKE SA and INIT_ANSWERS_PER_SOURCE a
        second per source (a table of the sources answered within the second, emptied as
        the second ends: at most one entry per half-open IKE SA)."""
        if ike.init_answers >= INIT_ANSWERS:
            return False
        if now >= self._init_window_end or now < self._init_window_end - 1.0:
            self._init_answered.clear()
            self._init_window_end = now + 1.0
        n = self._init_answered.get(host, 0)
        if n >= INIT_ANSWERS_PER_SOURCE:
            return False
        self._init_answered[host] = n + 1
        ike.init_answers += 1
        return True

    def _evict_half_open(self, src: Address) -> bool:
        """The half-open table is full: make room for an IKE_SA_INIT from ``src`` by dropping
        the oldest half-open IKE SA of the network (/24, /64) that holds the most, if that is
        not ``src``'s own. Past the cookie threshold every entry's source answered a cookie,
        so a flood fills the table only from addresses the attacker really has: 50 of them,
        20 each, left no room at all, and a legitimate client was dropped (RFC 8019 §4:
        keep room for other sources). Now the flood evicts its own entries, and a client from
        anywhere else still gets its IKE SA."""
        per_net = Counter(_net(ike.remote.host) for ike in self.half_open.values())
        mine = per_net.get(_net(src.host), 0)
        net, most = per_net.most_common(1)[0]
        if most <= mine:
            return False
        victim = min((ike for ike in self.half_open.values() if _net(ike.remote.host) == net),
                     key=lambda ike: ike.created)  # fmt: skip
        self.half_open.pop((victim.spi_i, victim.remote.host), None)
        self.by_spi.pop(victim.our_spi, None)
        victim.state = IkeState.DEAD
        self.stats["half-open-evicted"] += 1
        return True

    def _wall(self, now: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(now + self.wall_offset, dt.UTC)

    def _cookie_secrets(self, now: float) -> list[tuple[int, bytes]]:
        """(version, secret): the current secret and the one before it (§2.6: a cookie made
        just before a change still works)."""
        if now >= self._cookie_next:
            self._cookie_prev = self._cookie_cur
            self._cookie_cur = ((self._cookie_cur[0] + 1) % 256, self.random(32))
            self._cookie_next = now + COOKIE_SECRET_LIFETIME
        return [self._cookie_cur, self._cookie_prev]

    def _cookie(self, ni: bytes, src: Address, spi_i: bytes, now: float,
                secret: tuple[int, bytes] | None = None) -> bytes:  # fmt: skip
        """Cookie = VersionIDofSecret | Hash(Ni | IPi | SPIi | <secret>) (§2.6)."""
        version, key = secret or self._cookie_secrets(now)[0]
        mac = hmac_digest("sha256", key, ni + src.host.packed + spi_i)
        return bytes((version,)) + mac[:16]

    def _cookie_ok(self, cookie: bytes, ni: bytes, src: Address, spi_i: bytes,
                   now: float) -> bool:  # fmt: skip
        if len(cookie) != 17:
            return False
        return any(
            s[0] == cookie[0] and _hmac.compare_digest(cookie, self._cookie(ni, src, spi_i, now, s))
            for s in self._cookie_secrets(now)
        )

    # -- IKE_AUTH -------------------------------------------------------------------------
    def _revocation_unknown(self, conn: Connection, ike: IkeSA, why: str) -> None:
        """remote.revocation refused a certificate whose status no current list tells: the
        operator is told which and why (a CRL to load or renew), apart from other failures."""
        self.stats["auth-revocation-unknown"] += 1
        log.warning("event=ike-auth-revocation-unknown conn=%s peer=%s reason=%s", conn.name,
                    ike.remote, _quote(why))  # fmt: skip

    def _ike_auth(self, ike: IkeSA, inner: list[Payload], now: float,
                  out: list[Output]) -> list[Payload]:  # fmt: skip
        self.half_open.pop((ike.spi_i, ike.remote.host), None)
        self.half_open.drop(ike)
        idi = next((p for p in inner if isinstance(p, IDPayload) and p.initiator), None)
        idr = next((p for p in inner if isinstance(p, IDPayload) and not p.initiator), None)
        auth = find(inner, AuthPayload)
        if idi is None or auth is None:
            self.stats["auth-failed"] += 1
            ike.state = IkeState.DEAD
            return [NotifyPayload(Notify.AUTHENTICATION_FAILED)]
        prf_alg = ike.suite.prf
        assert prf_alg is not None
        octets = signed_octets(ike.init_request, ike.nonce_r, prf_alg, ike.keys.sk_pi, idi.body)
        psk = auth.method == AuthMethod.SHARED_KEY
        cert = None
        why = "no connection for this identity and method"
        if not psk:
            # the peer's certificate (then its chain) in CERT payloads (§3.6)
            ders = [p.data for p in inner
                    if isinstance(p, CertPayload) and p.encoding == CERT_X509_SIGNATURE]
            try:
                certs = [parse_cert(d) for d in ders[:MAX_CERTS]]
            except AuthError as exc:
                certs, why = [], str(exc)
            cert = certs[0] if certs else None
        if not (cert is not None and idi.id_type == IdType.DER_ASN1_DN) and not (
                says_what_it_is(idi)):  # fmt: skip
            # its text (peer_id) would be another identity's: that one's unique, leases, ...
            self.stats["auth-failed"] += 1
            self.stats["auth-id-ambiguous"] += 1
            if self._auth_log.allow(_net(ike.remote.host), now):
                log.warning("event=ike-auth-failed peer=%s id=%s type=%d reason=%s",
                            ike.remote, _quote(_id_for_log(idi)), idi.id_type,
                            _quote("the identity's text names one of another ID type"))  # fmt: skip
            ike.state = IkeState.DEAD
            return [NotifyPayload(Notify.AUTHENTICATION_FAILED)]
        # every connection whose remote.id names the peer is tried, those naming it exactly
        # before those with a wildcard (*.example.org), then %any (config order within
        # each), as charon ranks them: a connection's PSK or CAs prove only that connection
        # (the first match alone was tried: with an %any connection written first, the peer
        # of a connection naming it was refused)
        matching = [c for c in sorted(ike.candidates,
                                      key=lambda c: (c.remote_id.any, c.remote_id.wildcard))
                    if c.remote_auth == ("psk" if psk else "pubkey")
                    and c.remote_id.matches(idi, cert)
                    and (idr is None or c.local_id is None or c.local_id.matches(idr)
                         or (c.credentials is not None
                             and idr.data == c.credentials.certs[0].subject.public_bytes()))
                    and choose(c.proposals, (ike.suite.proposal(1, b""),)) is not None]
        conn = None
        ok = False
        anchor = None
        key: bytes | None = None  # the pre-shared key of the IKE SA (ours, with local.auth psk)
        unknown = psk and bool(matching)  # no secret names the peer for any of them
        for c in matching:  # fmt: skip
            key = c.psk_for(_my_id(c, ike), idi) if "psk" in (c.local_auth,
                                                              c.remote_auth) else None
            if key is None and "psk" in (c.local_auth, c.remote_auth):
                why = "no pre-shared key for this identity"
                continue
            if psk:
                assert key is not None
                unknown = False
                ok = _hmac.compare_digest(auth.data, psk_auth(prf_alg, key, octets))
                why = "pre-shared key does not match"
            elif cert is not None:
                try:
                    chain, anchor = validated_chain(cert, certs[1:], c.cacerts,
                                                    self._wall(now),
                                                    c.crls() if c.crls else [],
                                                    c.revocation)  # fmt: skip
                    if not id_matches_cert(idi, cert):
                        raise AuthError("the identity is not in the certificate")
                    verify(cert, auth.method, auth.data, octets)
                    ok = True
                except RevocationUnknown as exc:
                    why = str(exc)
                    self._revocation_unknown(c, ike, why)
                except AuthError as exc:
                    why = str(exc)
            else:
                why = "no certificate"
            if ok:
                conn = c
                break
        if conn is None or not ok:
            self.stats["auth-failed"] += 1
            if unknown:
                self.stats["auth-psk-unknown"] += 1
            if self._auth_log.allow(_net(ike.remote.host), now):
                log.warning("event=ike-auth-failed peer=%s id=%s reason=%s", ike.remote,
                            _id_for_log(idi), _quote(_cut(why, MAX_LOGGED_REASON)))  # fmt: skip
            ike.state = IkeState.DEAD
            return [NotifyPayload(Notify.AUTHENTICATION_FAILED)]
        # (a name or e-mail address in lower case: one text, unique and leases for every
        # spelling of one identity, as charon compares them)
        peer_id = cert.subject.rfc4514_string() if (
            cert is not None and idi.id_type == IdType.DER_ASN1_DN) else peer_id_text(idi)
        # unique (swanctl.conf): the IKE SAs this identity already has with the connection
        same = self.by_spi.of_identity(conn.name, peer_id)
        dups = [o for o in same if o is not ike and o.state is IkeState.ESTABLISHED]
        if conn.unique == "keep" and dups:
            self.stats["unique-kept"] += 1
            log.info("event=ike-auth-refused conn=%s peer=%s id=%s reason=%s", conn.name,
                     ike.remote, _quote(peer_id),
                     _quote("unique = keep: the identity has an IKE SA"))  # fmt: skip
            ike.state = IkeState.DEAD
            return [NotifyPayload(Notify.AUTHENTICATION_FAILED)]
        replaces = Notify.INITIAL_CONTACT in notifies(inner) and conn.unique in ("no", "replace")
        if not replaces and sum(  # (unique = never: INITIAL_CONTACT replaces nothing)
                1 for o in same if o is not ike and o.state is not IkeState.DEAD
        ) >= MAX_IKE_SAS_PER_IDENTITY:  # fmt: skip
            self.stats["identity-limit"] += 1
            log.info("event=ike-auth-refused conn=%s peer=%s id=%s reason=%s", conn.name,
                     ike.remote, peer_id, _quote("too many IKE SAs for this identity"))
            ike.state = IkeState.DEAD
            return [NotifyPayload(Notify.AUTHENTICATION_FAILED)]
        ike.conn = conn
        ike.peer_id = peer_id
        if cert is not None and anchor is not None:
            ike.peer_names, ike.peer_ca = cert_names(cert), fingerprint(anchor)
            ike.peer_serials = chain_serials(chain, anchor)
        ike.rekey_at = self._rekey_time(now, conn.rekey_time)
        creds = conn.credentials
        if conn.local_auth == "pubkey" and creds is not None:
            our_id = (conn.local_id.payload(False) if conn.local_id is not None
                      and not conn.local_id.is_dn else creds.subject_id(False))
            if idr is not None and id_matches_cert(idr, creds.certs[0]):
                our_id = IDPayload(False, idr.id_type, idr.data)  # the name it asked for
        else:
            our_id = (conn.local_id.payload(False) if conn.local_id is not None
                      else IDPayload(False, 1 if ike.local.host.version == 4 else 5,
                                     ike.local.host.packed))  # fmt: skip
        octets = signed_octets(ike.init_response, ike.nonce_i, prf_alg, ike.keys.sk_pr,
                               our_id.body)  # fmt: skip
        reply: list[Payload] = [our_id]
        ike.certreq_seen |= any(isinstance(p, CertReqPayload) for p in inner)
        if conn.local_auth == "pubkey" and creds is not None:
            if _send_cert(conn, ike):
                reply += [CertPayload(CERT_X509_SIGNATURE, d) for d in creds.der()]
            method, data = sign(creds.key, octets, ike.peer_hashes, pss=self.rsa_pss)
            reply.append(AuthPayload(method, data))
        else:
            assert key is not None  # (a connection without one was not taken above)
            reply.append(AuthPayload(AuthMethod.SHARED_KEY, psk_auth(prf_alg, key, octets)))
        ike.state = IkeState.ESTABLISHED
        n = notifies(inner)
        if Notify.MOBIKE_SUPPORTED in n and conn.mobike:  # RFC 4555 §3.2
            ike.mobike = True
            reply.append(NotifyPayload(Notify.MOBIKE_SUPPORTED))
        if Notify.IKEV2_MESSAGE_ID_SYNC_SUPPORTED in n:  # RFC 6311 (strongSwan announces it)
            ike.mid_sync = True
            reply.append(NotifyPayload(Notify.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))
        if Notify.IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED in n:
            ike.replay_sync = True
            reply.append(NotifyPayload(Notify.IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED))
        if Notify.INITIAL_CONTACT in n:
            ike.initial_contact = True
        if Notify.INITIAL_CONTACT in n and conn.unique in ("no", "replace"):
            # (unique = never: INITIAL_CONTACT replaces nothing; keep: refused above). By
            # name: an IKE SA made before a reload (SIGHUP) holds the connection as it was.
            for other in self.by_spi.of_identity(conn.name, ike.peer_id):
                if (other is not ike and other.conn.name == conn.name
                        and other.state is not IkeState.HALF_OPEN):  # fmt: skip
                    self.stats["initial-contact-replaced"] += 1
                    self._kill(other, "replaced (INITIAL_CONTACT)", out)
        elif conn.unique == "replace":
            self._replace(dups, now, out)
        self.stats["ike-sa-established"] += 1
        log.info("event=ike-sa-established conn=%s peer=%s id=%s proposal=%s mobike=%s",
                 conn.name, ike.remote, ike.peer_id, ike.suite.name(),
                 "yes" if ike.mobike else "no")  # fmt: skip
        out.append(IkeUp(ike))
        cp = next((p for p in inner if isinstance(p, CPPayload)), None)
        if conn.pools:
            answer = self._lease(ike, cp) if cp is not None and (
                cp.cfg_type == CfgType.CFG_REQUEST) else None  # fmt: skip
            if not isinstance(answer, CPPayload):
                # the IKE SA stays up without a CHILD SA, as with strongSwan: no address
                # left (RFC 7296 §3.15.4), or none asked for where the connection leases
                # them (a CHILD SA would otherwise get the whole remote_ts, the pool's range)
                failure = (Notify.INTERNAL_ADDRESS_FAILURE if answer == "exhausted"
                           else Notify.FAILED_CP_REQUIRED)  # fmt: skip
                if failure == Notify.FAILED_CP_REQUIRED:
                    self.stats["vip-not-requested"] += 1
                    log.info("event=ike-vip-failed conn=%s peer=%s id=%s reason=%s",
                             conn.name, ike.remote, ike.peer_id,
                             _quote("the peer asked for no virtual IP"))  # fmt: skip
                reply.append(NotifyPayload(failure))
                return reply
            reply.append(answer)
        reply += self._first_child(ike, inner, now, out)
        return reply

    def _replace(self, dups: list[IkeSA], now: float, out: list[Output]) -> None:
        """unique = replace: the identity's older IKE SAs ``dups`` are deleted (with a DELETE,
        as strongSwan does); their CHILD SAs leave the data path now, so that the new ones
        take its traffic. (Each DELETE goes under that IKE SA's own keys; nothing is sent
        under the new one's.)"""
        for other in dups:
            self.stats["unique-replaced"] += 1
            log.info("event=ike-sa-replaced conn=%s peer=%s id=%s reason=%s", other.conn.name,
                     other.remote, _quote(other.peer_id), _quote("unique = replace"))  # fmt: skip
            for gone in other.children:
                self._child_spis.discard(gone.spi_in)
                out.append(ChildDown(other, gone, "replaced (unique = replace)"))
            other.children = []
            # (its virtual IP goes offline now: the identity's new IKE SA, leased after
            # this, gets it back, as after INITIAL_CONTACT)
            self._release_vips(other)
            out += self.delete(other, now)

    def _lease(self, ike: IkeSA, cp: CPPayload) -> CPPayload | str:
        """A peer's CFG_REQUEST in IKE_AUTH (RFC 7296 §2.19, §3.15): an address of each
        family it asks (INTERNAL_IP4/IP6_ADDRESS, empty or naming the one it would like)
        from the first of the connection's pools of that family that has one (the same
        identity gets its earlier lease back), and the DNS servers of those pools when it
        asks for them. Unknown attributes are ignored, so is a known one of a wrong length
        (counted ``cp-bad-attribute``); at most MAX_CP_READ are read. The CFG_REPLY;
        "exhausted" when it asked for an address and got none, "none" when it asked for
        no address."""
        want: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}
        dns: set[int] = set()
        sizes: dict[int, tuple[int, int]] = {
            CfgAttr.INTERNAL_IP4_ADDRESS: (0, 4), CfgAttr.INTERNAL_IP6_ADDRESS: (0, 17),
            CfgAttr.INTERNAL_IP4_DNS: (0, 4), CfgAttr.INTERNAL_IP6_DNS: (0, 16)}
        for atype, value in cp.attributes[:MAX_CP_READ]:
            if atype not in sizes:
                continue
            if len(value) not in sizes[atype]:
                self.stats["cp-bad-attribute"] += 1
                continue
            if atype in (CfgAttr.INTERNAL_IP4_ADDRESS, CfgAttr.INTERNAL_IP6_ADDRESS):
                fam = 4 if atype == CfgAttr.INTERNAL_IP4_ADDRESS else 6
                a = ipaddress.ip_address(value[:16]) if value else None
                want.setdefault(fam, None if a is None or a.is_unspecified else a)
            else:
                dns.add(4 if atype == CfgAttr.INTERNAL_IP4_DNS else 6)
        attrs: list[tuple[int, bytes]] = []
        for fam, pref in want.items():
            for name in ike.conn.pools:
                pool = self.pools.get(name)
                if pool is None or pool.version != fam:
                    continue
                got = pool.acquire(ike.peer_id, pref)
                if got is None:
                    continue
                ike.vips.append((name, got))
                attrs.append((CfgAttr.INTERNAL_IP4_ADDRESS, got.packed) if fam == 4 else
                             (CfgAttr.INTERNAL_IP6_ADDRESS, got.packed + b"\x80"))
                for d in pool.dns:
                    if d.version in dns:
                        attrs.append((CfgAttr.INTERNAL_IP4_DNS if d.version == 4
                                      else CfgAttr.INTERNAL_IP6_DNS, d.packed))  # fmt: skip
                break
        if not want:
            return "none"
        if not ike.vips:
            self.stats["vip-pool-exhausted"] += 1
            log.warning("event=ike-vip-failed conn=%s peer=%s id=%s reason=%s", ike.conn.name,
                        ike.remote, ike.peer_id, _quote("no address left in the pools"))
            return "exhausted"
        for name, a in ike.vips:
            self.stats["vip-leased"] += 1
            log.info("event=ike-vip-leased conn=%s id=%s pool=%s vip=%s", ike.conn.name,
                     ike.peer_id, name, a)  # fmt: skip
        return CPPayload(CfgType.CFG_REPLY, tuple(attrs))

    def _release_vips(self, ike: IkeSA, away: bool = False) -> None:
        """The IKE SA ends here (``away``: it moved to another gateway): its leases go
        offline (or away, ikev2.pool)."""
        if ike.vips_given:  # given to us: nothing to release (the adapter reads them at
            return  # the IkeDown that follows, to take them off the TUN device)
        for name, a in ike.vips:
            pool = self.pools.get(name)
            if pool is not None:
                if away:
                    pool.send_away(a)
                else:
                    pool.release(a)
                    log.info("event=ike-vip-released conn=%s id=%s pool=%s vip=%s",
                             ike.conn.name, ike.peer_id, name, a)  # fmt: skip
        ike.vips = []

    def _first_child(self, ike: IkeSA, inner: list[Payload], now: float,
                     out: list[Output]) -> list[Payload]:  # fmt: skip
        sa = find(inner, SAPayload)
        tsi = next((p for p in inner if isinstance(p, TSPayload) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, TSPayload) and not p.initiator), None)
        if sa is None or tsi is None or tsr is None:
            return []  # an IKE SA without a CHILD SA (RFC 7296 §1.2 allows none)
        return self._child_for_peer(ike, sa, tsi, tsr, ike.nonce_i, ike.nonce_r, None, now, out,
                                    in_auth=True)  # fmt: skip

    def _child_for_peer(self, ike: IkeSA, sa: SAPayload, tsi: TSPayload, tsr: TSPayload,
                        ni: bytes, nr: bytes, ke: KEPayload | None, now: float,
                        out: list[Output], rekeyed: ChildSA | None = None,
                        in_auth: bool = False) -> list[Payload]:
        """A CHILD SA the peer asks for (in IKE_AUTH, or CREATE_CHILD_SA with its nonce
        ``ni`` and ours ``nr``): narrowed selectors, chosen proposal, keys; the reply
        payloads (without the nonce and KE, which the caller adds)."""  # fmt: skip
        configs = [rekeyed.config] if rekeyed is not None else ike.conn.children
        # a peer we leased virtual IPs to: its side of every CHILD SA is its address (§2.19)
        vips = [host(a) for _, a in ike.vips] if not ike.vips_given else []
        if not vips and ike.conn.pools and not ike.vips_given:
            # (an IKE SA of a connection that leases addresses but holds none: a context
            # from a gateway without pools) its CHILD SAs would take the pool's whole range
            self.stats["ts-unacceptable"] += 1
            return [NotifyPayload(Notify.TS_UNACCEPTABLE)]
        for cc in configs:
            theirs = narrow(tsi.selectors, cc.remote_ts)
            if vips:
                theirs = narrow(tuple(theirs), vips)
            local, remote = representable(narrow(tsr.selectors, cc.local_ts), theirs)
            if remote and local:
                break
        else:
            self.stats["ts-unacceptable"] += 1
            if self._refusal_log.allow("ts", now):
                log.warning("event=child-ts-unacceptable conn=%s peer=%s id=%s received=%s"
                            " === %s configured=%s", ike.conn.name, ike.remote,
                            ike.peer_id, ",".join(map(str, tsi.selectors[:8])),
                            ",".join(map(str, tsr.selectors[:8])),
                            "; ".join(f"{c.name}: {','.join(map(str, c.remote_ts))} === "
                                      f"{','.join(map(str, c.local_ts))}"
                                      for c in configs))  # fmt: skip
            return [NotifyPayload(Notify.TS_UNACCEPTABLE)]
        # IKE_AUTH's CHILD SA takes its keys from the IKE SA's exchange: no DH of its own
        chosen = choose(cc.esp_proposals, sa.proposals, ignore_dh=in_auth,
                        ke_group=ke.group if ke else None)  # fmt: skip
        if chosen is None:
            self.stats["child-no-proposal"] += 1
            if self._refusal_log.allow("child", now):
                log.warning("event=child-no-proposal-chosen conn=%s child=%s peer=%s id=%s "
                            "received=%s configured=%s", ike.conn.name, cc.name, ike.remote,
                            ike.peer_id, describe_all(sa.proposals),
                            describe_all(cc.esp_proposals))  # fmt: skip
            return [NotifyPayload(Notify.NO_PROPOSAL_CHOSEN)]
        proposal, suite = chosen
        if len(proposal.spi) != 4 or int.from_bytes(proposal.spi, "big") < 256:
            self.stats["child-bad-spi"] += 1
            return [NotifyPayload(Notify.INVALID_SYNTAX)]
        if self.outbound_spi_taken(int.from_bytes(proposal.spi, "big")):
            # Another tunnel here sends with this SPI (towards another client): fail-over
            # replicas, etcd keys and cluster grouping know a tunnel by it, and one of the two
            # would be lost at a take-over. The first holder keeps it; this CHILD SA is
            # refused, the IKE SA stays (RFC 7296 §1.2: NO_PROPOSAL_CHOSEN is one of the
            # IKE_AUTH errors that do not prevent the IKE SA; charon logs "no CHILD_SA
            # built"). In CREATE_CHILD_SA, TEMPORARY_FAILURE: charon tries again later, with a
            # new SPI (a new CHILD SA, or its rekey task's next attempt).
            self.stats["child-spi-taken"] += 1
            if self._refusal_log.allow("spi", now):
                log.warning("event=child-spi-taken conn=%s child=%s peer=%s id=%s spi=%s "
                            "count=%d", ike.conn.name, cc.name, ike.remote, ike.peer_id,
                            proposal.spi.hex(), self.stats["child-spi-taken"])  # fmt: skip
            return [NotifyPayload(Notify.NO_PROPOSAL_CHOSEN if in_auth
                                  else Notify.TEMPORARY_FAILURE)]  # fmt: skip
        extra: list[Payload] = []
        shared = b""
        if suite.dh is not None:  # PFS (CREATE_CHILD_SA only)
            if ke is None or ke.group != suite.dh:
                self.stats["invalid-ke"] += 1
                return [NotifyPayload(Notify.INVALID_KE_PAYLOAD,
                                      data=struct.pack("!H", suite.dh))]  # fmt: skip
            kx = KeyExchange(suite.dh)
            shared = kx.shared(ke.data)
            extra.append(KEPayload(suite.dh, kx.public))
        spi_in = self._new_child_spi()
        if spi_in is None:
            return [NotifyPayload(Notify.NO_ADDITIONAL_SAS)]
        prf_alg = ike.suite.prf
        assert prf_alg is not None
        keys = child_keys(prf_alg, ike.keys.sk_d, suite, ni, nr, shared)
        child = ChildSA(cc, suite, spi_in, int.from_bytes(proposal.spi, "big"), keys, False,
                        local, remote, now)  # fmt: skip
        child.rekey_at = self._rekey_time(now, cc.rekey_time)
        ike.children.append(child)
        if rekeyed is not None:
            rekeyed.rekeyed = True
            rekeyed.rekeyed_at = now
            rekeyed.successor = child
            p = ike.pending
            if p is not None and p.kind == "rekey-child" and p.old_child is rekeyed:
                rekeyed.collided = (child, ni, nr)  # both sides rekey it: §2.8.1
                self.stats["rekey-collision"] += 1
        self.stats["child-sa-rekeyed" if rekeyed else "child-sa-established"] += 1
        log.info("event=child-sa-%s conn=%s child=%s spi_in=%08x spi_out=%08x "
                 "proposal=%s local_ts=%s remote_ts=%s",
                 "rekeyed" if rekeyed else "established", ike.conn.name, cc.name, spi_in,
                 child.spi_out, suite.name(), ",".join(map(str, local)),
                 ",".join(map(str, remote)))  # fmt: skip
        out.append(ChildUp(ike, child, rekeyed))
        return [
            SAPayload((suite.proposal(proposal.num, spi_in.to_bytes(4, "big")),)),
            *extra,
            TSPayload(True, tuple(remote)),
            TSPayload(False, tuple(local)),
        ]

    # -- CREATE_CHILD_SA (§1.3) -------------------------------------------------------------
    def _create_child(self, ike: IkeSA, inner: list[Payload], now: float,
                      out: list[Output]) -> list[Payload]:  # fmt: skip
        sa = find(inner, SAPayload)
        ni = find(inner, NoncePayload)
        ke = find(inner, KEPayload)
        if sa is None or ni is None:
            self.stats["bad-create-child"] += 1
            return [NotifyPayload(Notify.INVALID_SYNTAX)]
        if ike.state is not IkeState.ESTABLISHED:
            return [NotifyPayload(Notify.TEMPORARY_FAILURE)]
        if sa.proposals and sa.proposals[0].protocol == ProtocolId.IKE:
            return self._rekey_ike(ike, sa, ni, ke, now, out)
        tsi = next((p for p in inner if isinstance(p, TSPayload) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, TSPayload) and not p.initiator), None)
        if tsi is None or tsr is None:
            self.stats["bad-create-child"] += 1
            return [NotifyPayload(Notify.INVALID_SYNTAX)]
        n = notifies(inner)
        rekeyed = None
        if Notify.REKEY_SA in n:
            spi = int.from_bytes(n[Notify.REKEY_SA].spi, "big")
            rekeyed = next((c for c in ike.children if spi in (c.spi_out, c.spi_in)), None)
            if rekeyed is None:
                self.stats["rekey-unknown-child"] += 1
                return [NotifyPayload(Notify.CHILD_SA_NOT_FOUND, ProtocolId.ESP,
                                      n[Notify.REKEY_SA].spi)]  # fmt: skip
            if rekeyed.rekeyed:  # it has a successor already; its DELETE is due, not a rekey
                self.stats["rekey-refused"] += 1
                return [NotifyPayload(Notify.TEMPORARY_FAILURE)]
        # a rekey needs room for the old SA until the peer deletes it: twice the limit in all
        # (a peer rekeying each successor in turn and deleting nothing stops there)
        if len(ike.children) >= (2 * MAX_CHILD_SAS if rekeyed else MAX_CHILD_SAS):
            self.stats["child-limit"] += 1
            return [NotifyPayload(Notify.NO_ADDITIONAL_SAS)]
        nr = self.random(32)
        reply = self._child_for_peer(ike, sa, tsi, tsr, ni.data, nr, ke, now, out, rekeyed)
        if reply and isinstance(reply[0], SAPayload):
            reply.insert(1, NoncePayload(nr))
        return reply

    def _rekey_ike(self, ike: IkeSA, sa: SAPayload, ni: NoncePayload, ke: KEPayload | None,
                   now: float, out: list[Output]) -> list[Payload]:  # fmt: skip
        """The peer rekeys the IKE SA (§1.3.2, §2.18): a new IKE SA with new SPIs and keys
        from the old SK_d takes over the CHILD SAs; the peer then deletes the old one."""
        if ke is None:
            return [NotifyPayload(Notify.INVALID_SYNTAX)]
        p = ike.pending
        if p is not None and p.kind in ("rekey-child", "create-child"):
            # our CHILD rekey (or our new CHILD SA: the same) crosses the peer's IKE rekey
            # (strongSwan answers the same): its answer would make the successor in the old
            # IKE SA, whose CHILD SAs had moved, and the old CHILD SA stayed in the new one.
            # The peer's side then had both, ours one of each: an SA pair that only one side
            # had, and after the peer deleted the old one (it had a successor) no CHILD SA
            # left here. Ours first; theirs again
            self.stats["ike-rekey-refused-child-rekey"] += 1
            return [NotifyPayload(Notify.TEMPORARY_FAILURE)]
        prev = ike.replaced
        if prev is not None and prev.state is IkeState.REKEYED and self.by_spi.get(
                prev.our_spi) is prev:  # fmt: skip
            # the IKE SA this one replaced still waits for the peer's DELETE: a peer that
            # rekeys on and never deletes made an IKE SA per request, each kept for 60 s
            self.stats["ike-rekey-refused"] += 1
            return [NotifyPayload(Notify.TEMPORARY_FAILURE)]
        ike.replaced = None
        chosen = choose(ike.conn.proposals, sa.proposals, ke_group=ke.group)
        if chosen is None:
            self.stats["ike-rekey-no-proposal"] += 1
            return [NotifyPayload(Notify.NO_PROPOSAL_CHOSEN)]
        proposal, suite = chosen
        if len(proposal.spi) != 8 or proposal.spi == bytes(8):
            return [NotifyPayload(Notify.INVALID_SYNTAX)]
        assert suite.dh is not None
        if ke.group != suite.dh:
            return [NotifyPayload(Notify.INVALID_KE_PAYLOAD, data=struct.pack("!H", suite.dh))]
        kx = KeyExchange(suite.dh)
        shared = kx.shared(ke.data)
        spi_r = self.random(8)
        while spi_r == bytes(8) or spi_r in self.by_spi:
            spi_r = self.random(8)
        nr = self.random(32)
        keys = ike_keys(suite, shared, ni.data, nr, proposal.spi, spi_r,
                        old_sk_d=ike.keys.sk_d, old_prf=ike.suite.prf)  # fmt: skip
        new = IkeSA(proposal.spi, spi_r, False, ike.conn, ike.candidates, suite, ike.local,
                    ike.remote, now, keys, ni.data, nr, b"", b"", ike.nat_local,
                    ike.nat_remote, IkeState.ESTABLISHED, ike.peer_id)  # fmt: skip
        new.peer_next_mid = 0
        new.last_heard = now
        new.rekey_at = self._rekey_time(now, ike.conn.rekey_time)
        _inherit(new, ike)
        new.children, ike.children = ike.children, []
        new.replaced = ike
        p = ike.pending
        if p is not None and p.kind == "rekey-ike":  # both sides rekey it: §2.8.2
            ike.collided = (new, ni.data, nr)
            self.stats["rekey-collision"] += 1
        ike.state = IkeState.REKEYED
        self.by_spi[spi_r] = new
        self.stats["ike-sa-rekeyed"] += 1
        log.info("event=ike-sa-rekeyed conn=%s peer=%s old=%s_i/%s_r new=%s_i/%s_r proposal=%s",
                 ike.conn.name, ike.remote, ike.spi_i.hex(), ike.spi_r.hex(),
                 new.spi_i.hex(), new.spi_r.hex(), suite.name())  # fmt: skip
        out.append(IkeRekeyed(ike, new))
        return [
            SAPayload((suite.proposal(proposal.num, spi_r),)),
            NoncePayload(nr),
            KEPayload(suite.dh, kx.public),
        ]

    def _new_child_spi(self) -> int | None:
        """A free inbound CHILD SPI from our range (a cluster member's block), or None when
        SPI_TRIES random picks found none: the range is full, or nearly (this looped for ever
        then, and the gateway hung, when peers' CHILD SAs had filled its block)."""
        first, last = self.spi_range
        for _ in range(SPI_TRIES):
            spi = first + int.from_bytes(self.random(4), "big") % (last - first + 1)
            if spi >= 256 and spi not in self._child_spis and not self.spi_in_use(spi):
                self._child_spis.add(spi)
                return spi
        self.stats["spi-exhausted"] += 1
        n = self.stats["spi-exhausted"]
        if n & (n - 1) == 0:  # 1, 2, 4, 8...: a flood of refusals is not a flood of lines
            log.warning("event=child-spi-exhausted range=%08x-%08x in_use=%d count=%d",
                        first, last, len(self._child_spis), n)  # fmt: skip
        return None

    # -- INFORMATIONAL ----------------------------------------------------------------------
    def _informational(self, ike: IkeSA, inner: list[Payload], out: list[Output],
                       path: tuple[Address, Address]) -> list[Payload]:  # fmt: skip
        """The peer's INFORMATIONAL request; ``path``: (ours, the peer's) addresses it came
        on, where the answer goes."""
        reply: list[Payload] = []
        deletes = [p for p in inner if isinstance(p, DeletePayload)]
        if not inner:
            self.stats["liveness-answered"] += 1
        if ike.mobike:
            reply += self._mobike_answer(ike, inner, path)
        for d in deletes:
            if d.protocol == ProtocolId.IKE:
                parent = self.by_spi.collided_parent(ike)
                if parent is not None:
                    # §2.8.2: the peer lost a rekey collision and deletes the IKE SA its
                    # request made here; our own rekey, still in flight, takes the CHILD SAs
                    parent.children += ike.children
                    ike.children = []
                    parent.vips, ike.vips = parent.vips + ike.vips, []  # (as the CHILD SAs)
                    parent.collided = None
                    self.stats["rekey-collision-won"] += 1  # (its answer to ours, later, is not)
                    ike.peer_id = ""
                elif ike.state is IkeState.REKEYED:
                    ike.peer_id = ""  # replaced, not gone: no IkeDown
                    p = ike.pending
                    if ike.collided is not None and p is not None and p.kind == "rekey-ike":
                        # §2.8.2: the peer's rekey crossed ours and it deletes the old IKE
                        # SA before its answer to ours got here: it won (only the winner
                        # deletes the old one), and our request is forgotten (§2.25.2). The
                        # redundant IKE SA our request made there cannot be deleted from
                        # here (its SPI and keys are in the answer we never got): the peer
                        # drops it after a while (strongSwan: 30 s)
                        ike.collided = None
                        self.stats["rekey-collision-lost"] += 1
                        log.info("event=ike-rekey-collision-lost conn=%s peer=%s detail=%s",
                                 ike.conn.name, ike.remote, _quote(
                                     "the peer deleted the old IKE SA before answering our"
                                     " rekey: its new IKE SA is kept, ours is forgotten"))
                else:
                    self.stats["ike-deleted-by-peer"] += 1
                ike.state = IkeState.DEAD
                return []
            if d.protocol != ProtocolId.ESP:
                continue
            ours = []
            for spi in d.spis:
                if len(spi) != 4:
                    continue
                v = int.from_bytes(spi, "big")
                for c in list(ike.children):
                    if c.spi_out == v:
                        ike.children.remove(c)
                        self._child_spis.discard(c.spi_in)
                        ours.append(c.spi_in.to_bytes(4, "big"))
                        self.stats["child-deleted-by-peer"] += 1
                        out.append(ChildDown(ike, c, "deleted by peer"))
                        self._rekey_withdrawn(ike, c)
            if ours:
                reply.append(DeletePayload(ProtocolId.ESP, tuple(ours)))
        return reply

    def _rekey_withdrawn(self, ike: IkeSA, gone: ChildSA) -> None:
        """The peer deleted the CHILD SA its rekey of another made, not the other: the SA it
        replaced is an ordinary one again (it carries the traffic, as it did; it may be
        rekeyed, by either side; it is not deleted after REKEYED_GRACE). A gateway that took
        the IKE SA over while its own rekey was in flight does this: it deletes the SA the
        lost exchange may have made here (it does not have it) and rekeys the old one again.
        Before, the old one, taken for rekeyed, refused that rekey and was deleted by us 60 s
        later, leaving a CHILD SA the gateway did not have."""
        for c in ike.children:
            if c.successor is gone and c.rekeyed_at is not None:
                c.rekeyed, c.rekeyed_at, c.successor = False, None, None
                self.stats["child-rekey-withdrawn"] += 1
                log.info("event=child-rekey-withdrawn conn=%s peer=%s spi_in=%08x",
                         ike.conn.name, ike.remote, c.spi_in)  # fmt: skip

    def _mobike_answer(self, ike: IkeSA, inner: list[Payload],
                       path: tuple[Address, Address]) -> list[Payload]:  # fmt: skip
        """RFC 4555 in an INFORMATIONAL request of a MOBIKE peer that came on ``path`` (ours,
        the peer's address): its UPDATE_SA_ADDRESSES (the IKE SA's addresses already follow
        it) is answered with the NAT-D notifies of the new path (§3.5; a faked source hash
        with ``encap``, as in IKE_SA_INIT), and so is any request that carries NAT-D notifies
        (§3.8: the responder MUST; a strongSwan client behind a NAT sends them in its
        liveness checks and finds a changed NAT mapping by the destination hash, which it
        then announces with an update: with MOBIKE the gateway follows no request's address
        of itself). Its COOKIE2 is echoed (§3.7: else the peer closes the IKE SA). Its
        address list (ADDITIONAL_*_ADDRESS, NO_ADDITIONAL_ADDRESSES) is not used: an update
        moves the IKE SA to the address it came from."""
        n = notifies(inner)
        out: list[Payload] = []
        if Notify.UPDATE_SA_ADDRESSES in n:
            self.stats["mobike-update-answered"] += 1
            log.info("event=ike-mobike-update conn=%s peer=%s", ike.conn.name, ike.remote)
        natd = Notify.NAT_DETECTION_SOURCE_IP in n and Notify.NAT_DETECTION_DESTINATION_IP in n
        if Notify.UPDATE_SA_ADDRESSES in n or natd:
            ours, theirs = path
            src = self.random(20) if ike.conn.encap else _natd(ike.spi_i, ike.spi_r, ours)
            out += [NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, data=src),
                    NotifyPayload(Notify.NAT_DETECTION_DESTINATION_IP,
                                  data=_natd(ike.spi_i, ike.spi_r, theirs))]  # fmt: skip
        cookie2 = n.get(Notify.COOKIE2)
        if cookie2 is not None and 8 <= len(cookie2.data) <= 64:
            out.append(NotifyPayload(Notify.COOKIE2, data=cookie2.data))
        return out

    # -- direct SG identity: the peer follows this gateway (RFC 4555 §3.6, RFC 7296 §2.23) ---
    def announce_move(self, ike: IkeSA, local: Address, now: float) -> list[Output]:
        """This gateway took ``ike`` over from another at a different address (a handover
        with direct SG identity): from now on it is ``local``, and the peer is told so with an
        INFORMATIONAL request from ``local`` under the moved IKE SA. With MOBIKE it carries
        NO_ADDITIONAL_ADDRESSES, the responder's new address list (RFC 4555 §3.6): a MOBIKE
        initiator receiving it from a new address moves the IKE SA there (strongSwan does at
        once, and then rekeys or updates its CHILD SAs). Without MOBIKE it is an empty request:
        RFC 7296 §2.23 lets a peer follow the address of an authenticated request when the
        other side is behind a NAT, which a faked NAT-D at IKE_SA_INIT (``encap``) made the
        peer believe. Without either, the peer cannot be moved: the request is still sent
        (nothing is lost by it) and ``stats["address-update-unheeded"]`` counts it. The answer
        or its absence is handled as for a liveness check (46 s: the peer is dead)."""
        self._touch(ike)
        out: list[Output] = []
        if ike.state is not IkeState.ESTABLISHED:
            return out
        if ike.pending is not None and ike.pending.kind != "liveness":
            raise IkeProtocolError(f"a {ike.pending.kind} exchange is in flight")
        ike.pending = None
        old, ike.local = ike.local, local
        payloads: list[Payload] = []
        if ike.mobike:
            payloads.append(NotifyPayload(Notify.NO_ADDITIONAL_ADDRESSES))
        elif not ike.nat_local:
            self.stats["address-update-unheeded"] += 1
            log.warning("event=ike-address-update-unheeded conn=%s peer=%s reason=%s",
                        ike.conn.name, ike.remote,
                        _quote("the peer has no MOBIKE and sees no NAT here (encap = false)"))
        log.info("event=ike-address-update conn=%s peer=%s old=%s new=%s how=%s",
                 ike.conn.name, ike.remote, old, local,
                 "mobike" if ike.mobike else "nat-float")  # fmt: skip
        self._request(ike, "address-update", payloads, now, out)
        return out

    # -- MOBIKE as initiator: our own address changed (RFC 4555 §3.5) ------------------------
    def local_moved(self, ike: IkeSA, local: Address, now: float) -> list[Output]:
        """Our address for the path to the peer is now ``local`` (a mobile node moved to
        another network; the adapter found it in its routes). The IKE SA and its CHILD SAs
        leave from ``local`` at once (:class:`PeerMoved`: the adapter updates the CHILD SAs'
        outer addresses), and the peer is told, as the original initiator of a MOBIKE IKE SA
        does, with an INFORMATIONAL request from ``local`` holding UPDATE_SA_ADDRESSES,
        NO_ADDITIONAL_ADDRESSES (we announce no other address), the NAT-D notifies of the new
        path and a fresh COOKIE2 (the answer must echo it). With an exchange of ours in flight
        (window of one) that request is sent again from ``local`` at once and the update
        follows its answer (strongSwan answers a new request only where its IKE SA points,
        but a retransmission where it came from). Without
        MOBIKE the peer follows us only if it believes we are behind a NAT (RFC 7296 §2.23,
        ``encap``): a liveness check from ``local`` is all we can send
        (``address-update-unheeded`` counts the hopeless case). Only the IKE SA's original
        initiator announces its moves (the responder's are announce_move's)."""
        self._touch(ike)
        out: list[Output] = []
        if (ike.state is not IkeState.ESTABLISHED or not ike.mobike_initiator
                or local == ike.local):  # fmt: skip
            return out
        old, ike.local = ike.local, local
        self.stats["local-moved"] += 1
        log.info("event=ike-local-moved conn=%s peer=%s old=%s new=%s mobike=%s",
                 ike.conn.name, ike.remote, old, local,
                 "yes" if ike.mobike else "no")  # fmt: skip
        out.append(PeerMoved(ike))
        p = ike.pending
        if p is not None:
            # sent from an address that is gone: again from the new one, now (not counted as
            # a retry: its back-off goes on as it was)
            out += [Send(m, ike.local, ike.remote) for m in p.messages]
            if ike.mobike:
                # an update in flight announced an older address: another follows its answer
                ike.update_due = True
            return out
        if ike.mobike:
            self._mobike_update(ike, now, out)
            return out
        if not ike.nat_local:
            self.stats["address-update-unheeded"] += 1
            log.warning("event=ike-address-update-unheeded conn=%s peer=%s reason=%s",
                        ike.conn.name, ike.remote,
                        _quote("the peer has no MOBIKE and sees no NAT here (encap = false)"))
        self._request(ike, "liveness", [], now, out)
        return out

    def _mobike_update(self, ike: IkeSA, now: float, out: list[Output]) -> None:
        """UPDATE_SA_ADDRESSES from ``ike.local`` (RFC 4555 §3.5)."""
        ike.update_due = False
        cookie2 = self.random(16)
        src = self.random(20) if ike.conn.encap else _natd(ike.spi_i, ike.spi_r, ike.local)
        payloads: list[Payload] = [
            NotifyPayload(Notify.UPDATE_SA_ADDRESSES),
            NotifyPayload(Notify.COOKIE2, data=cookie2),
            NotifyPayload(Notify.NO_ADDITIONAL_ADDRESSES),
            NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, data=src),
            NotifyPayload(Notify.NAT_DETECTION_DESTINATION_IP,
                          data=_natd(ike.spi_i, ike.spi_r, ike.remote)),
        ]  # fmt: skip
        self._request(ike, "mobike-update", payloads, now, out)
        if ike.pending is not None and ike.pending.kind == "mobike-update":
            ike.pending.cookie2, ike.pending.moved_to = cookie2, ike.local
            log.info("event=ike-mobike-update-sent conn=%s peer=%s local=%s", ike.conn.name,
                     ike.remote, ike.local)  # fmt: skip

    def _mobike_update_response(self, ike: IkeSA, p: Pending, inner: list[Payload],
                                src: Address, now: float,
                                out: list[Output]) -> None:  # fmt: skip
        """The peer's answer to our UPDATE_SA_ADDRESSES (authenticated, its message ID ours).
        UNACCEPTABLE_ADDRESSES: the peer keeps its IKE SA where it was; we keep ours (there is
        no other address to offer; our next move is announced again, and a peer that cannot
        reach us any more ends it by its liveness checks). A COOKIE2 that is not
        ours, or none: the answer is not to this update (RFC 4555 §3.5), and the IKE SA is
        closed, as strongSwan does. Otherwise the NAT-D notifies give the NAT state of the new
        path (a NAT found from port 500 floats to 4500, RFC 7296 §2.23); without them the
        old state stays, so that ESP that was in UDP stays in UDP."""
        n = notifies(inner)
        if Notify.UNACCEPTABLE_ADDRESSES in n:
            self.stats["mobike-update-refused"] += 1
            log.warning("event=ike-mobike-update-refused conn=%s peer=%s local=%s reason=%s",
                        ike.conn.name, ike.remote, p.moved_to,
                        _quote("the peer answered UNACCEPTABLE_ADDRESSES"))  # fmt: skip
            return
        got = n.get(Notify.COOKIE2)
        if got is None or not _hmac.compare_digest(got.data, p.cookie2):
            self.stats["mobike-cookie2-mismatch"] += 1
            log.warning("event=ike-mobike-update-failed conn=%s peer=%s reason=%s",
                        ike.conn.name, ike.remote,
                        _quote("COOKIE2 missing or not ours: closing the IKE SA"))  # fmt: skip
            ike.update_due = False
            out += self.delete(ike, now)
            ike.close_reason = "mobike-failed"
            return
        srcs = [q.data for q in inner if isinstance(q, NotifyPayload)
                and q.type == Notify.NAT_DETECTION_SOURCE_IP]  # fmt: skip
        dst = n.get(Notify.NAT_DETECTION_DESTINATION_IP)
        if not srcs or dst is None:
            self.stats["mobike-natd-missing"] += 1
            log.warning("event=ike-mobike-natd-missing conn=%s peer=%s detail=%s",
                        ike.conn.name, ike.remote,
                        _quote("no NAT-D in the answer: the NAT state stays as it was"))
        else:
            before = (ike.nat_local, ike.nat_remote, ike.local, ike.remote)
            ike.nat_remote = _natd(ike.spi_i, ike.spi_r, src) not in srcs
            ike.nat_local = ike.conn.encap or dst.data != _natd(ike.spi_i, ike.spi_r, ike.local)
            if (ike.nat_local or ike.nat_remote) and ike.remote.port == 500:
                ike.local = Address(ike.local.host, self.natt_port if ike.local.port == 500
                                    else ike.local.port)  # fmt: skip
                ike.remote = Address(ike.remote.host, 4500)
                # the peer learns our NAT-T port only from a request sent from it, and a
                # MOBIKE peer (strongSwan) moves only for an update: another one, from there
                ike.update_due = True
            if (ike.nat_local, ike.nat_remote, ike.local, ike.remote) != before:
                out.append(PeerMoved(ike))
        self.stats["mobike-update-done"] += 1
        log.info("event=ike-mobike-updated conn=%s peer=%s local=%s nat_local=%s nat_remote=%s",
                 ike.conn.name, ike.remote, ike.local, ike.nat_local,
                 ike.nat_remote)  # fmt: skip
        if p.moved_to is not None and p.moved_to != ike.local:
            ike.update_due = True  # we moved again while it was in flight (or floated)

    # -- MOBIKE as responder: the return-routability check (RFC 4555 §5.2, §3.5) -----------
    def _rr_check(self, ike: IkeSA, now: float, out: list[Output]) -> None:
        """The peer's UPDATE_SA_ADDRESSES moved the IKE SA to a new address: before our CHILD
        SAs send there, a liveness check with a fresh COOKIE2 goes to it. An authenticated
        peer could otherwise point our ESP at a third party (§5.2, "flooding"). strongSwan
        5.9.8, as responder, moves at once; the check costs one round trip of our ESP to the
        moved peer."""
        ike.rr_due = False
        cookie2 = self.random(16)
        self._request(ike, "rr-check", [NotifyPayload(Notify.COOKIE2, data=cookie2)], now, out)
        if ike.pending is not None and ike.pending.kind == "rr-check":
            ike.pending.cookie2, ike.pending.moved_to = cookie2, ike.remote
            log.info("event=ike-rr-check-sent conn=%s peer=%s esp_peer=%s", ike.conn.name,
                     ike.remote, ike.child_remote)  # fmt: skip

    def _rr_check_response(self, ike: IkeSA, p: Pending, inner: list[Payload],
                           out: list[Output]) -> None:  # fmt: skip
        """The new address answered our check (the answer is authenticated and came to us):
        with our COOKIE2, the CHILD SAs follow the IKE SA there (:class:`PeerMoved`); without
        it, or after the peer moved again meanwhile (another check follows), they stay."""
        got = notifies(inner).get(Notify.COOKIE2)
        if got is None or not _hmac.compare_digest(got.data, p.cookie2):
            self.stats["rr-check-failed"] += 1
            log.warning("event=ike-rr-check-failed conn=%s peer=%s reason=%s", ike.conn.name,
                        ike.remote, _quote("no COOKIE2 of ours in the answer: the CHILD SAs "
                                           "stay where they were"))  # fmt: skip
            return
        if p.moved_to != ike.remote:
            return
        self.stats["rr-check-verified"] += 1
        ike.esp_remote = None
        log.info("event=ike-peer-address-verified conn=%s peer=%s", ike.conn.name, ike.remote)
        out.append(PeerMoved(ike))

    # -- initiator ----------------------------------------------------------------------------
    def initiate(self, conn: Connection, local: Address, remote: Address, now: float,
                 child: ChildConfig | None = None) -> list[Output]:  # fmt: skip
        """Start an IKE SA (and ``child``, by default the connection's first) to ``remote``
        (port 500: the exchange floats to 4500 when a NAT is found or faked)."""
        out: list[Output] = []
        spi_i = self.random(8)
        while spi_i == bytes(8) or spi_i in self.by_spi or spi_i in self.connecting:
            spi_i = self.random(8)
        offer = conn.proposals[0]
        c = Connecting(conn, child or (conn.children[0] if conn.children else None), spi_i,
                       local, remote, KeyExchange(offer.dh[0]), self.random(32), now)  # fmt: skip
        self.connecting[spi_i] = c
        self._send_init(c, now, out)
        return out

    def _send_init(self, c: Connecting, now: float, out: list[Output]) -> None:
        props = tuple(Proposal(i + 1, ProtocolId.IKE, b"", o.transforms())
                      for i, o in enumerate(c.conn.proposals))  # fmt: skip
        payloads: list[Payload] = []
        if c.cookie:
            payloads.append(NotifyPayload(Notify.COOKIE, data=c.cookie))
        src_hash = self.random(20) if c.conn.encap else _natd(c.spi_i, bytes(8), c.local)
        payloads += [
            SAPayload(props),
            KEPayload(c.kx.group, c.kx.public),
            NoncePayload(c.nonce),
            NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, data=src_hash),
            NotifyPayload(Notify.NAT_DETECTION_DESTINATION_IP,
                          data=_natd(c.spi_i, bytes(8), c.remote)),
        ]  # fmt: skip
        if c.conn.fragmentation != "no":
            payloads.append(NotifyPayload(Notify.IKEV2_FRAGMENTATION_SUPPORTED))
        if "pubkey" in (c.conn.local_auth, c.conn.remote_auth):
            payloads.append(NotifyPayload(Notify.SIGNATURE_HASH_ALGORITHMS,
                                          data=struct.pack("!3H", *SUPPORTED_HASHES)))
        hdr = Header(c.spi_i, bytes(8), 0, ExchangeType.IKE_SA_INIT, Flag.INITIATOR, 0, 0)
        c.request = encode_plain(hdr, payloads)
        c.tries = 1
        c.deadline = now + RETRANSMIT[0]
        self.stats["ike-sa-init-sent"] += 1
        out.append(Send(c.request, c.local, c.remote))

    def _sa_init_response(self, data: bytes, hdr: Header, payloads: list[Payload],
                          src: Address, dst: Address, now: float,
                          out: list[Output]) -> None:  # fmt: skip
        c = self.connecting.get(hdr.spi_i)
        if c is None or hdr.from_initiator or hdr.message_id != 0 or src.host != c.remote.host:
            self.stats["unexpected-response"] += 1
            return
        self.touched += 1
        n = notifies(payloads)
        if Notify.COOKIE in n and c.attempts < 3:
            c.attempts += 1
            c.cookie = n[Notify.COOKIE].data
            self._send_init(c, now, out)
            return
        if Notify.INVALID_KE_PAYLOAD in n and c.attempts < 3:
            d = n[Notify.INVALID_KE_PAYLOAD].data
            group = struct.unpack("!H", d)[0] if len(d) == 2 else 0
            if any(group in o.dh for o in c.conn.proposals):
                c.attempts += 1
                c.kx = KeyExchange(group)
                self._send_init(c, now, out)
                return
        errors = [t for t in n if t < 16384]
        sa = find(payloads, SAPayload)
        ke = find(payloads, KEPayload)
        nr = find(payloads, NoncePayload)
        del self.connecting[c.spi_i]
        if errors or sa is None or ke is None or nr is None or hdr.spi_r == bytes(8):
            why = (f"refused: {_notify_name(errors[0])}" if errors
                   else "bad IKE_SA_INIT response")  # fmt: skip
            self.stats["connect-refused"] += 1
            out.append(ConnectFailed(c.conn, why))
            return
        chosen = (choose(c.conn.proposals, sa.proposals, ke_group=ke.group)
                  if len(sa.proposals) == 1 else None)  # fmt: skip
        if chosen is None or chosen[1].dh != c.kx.group or ke.group != c.kx.group:
            self.stats["connect-refused"] += 1
            out.append(ConnectFailed(c.conn, "the responder chose a proposal we did not offer"))
            return
        suite = chosen[1]
        try:
            shared = c.kx.shared(ke.data)
        except IkeProtocolError as exc:
            out.append(ConnectFailed(c.conn, str(exc)))
            return
        keys = ike_keys(suite, shared, c.nonce, nr.data, c.spi_i, hdr.spi_r)
        ike = IkeSA(c.spi_i, hdr.spi_r, True, c.conn, [c.conn], suite, c.local, c.remote, now,
                    keys, c.nonce, nr.data, c.request, data)  # fmt: skip
        ike.peer_next_mid = 0
        ike.my_next_mid = 1
        ike.last_heard = now
        ike.fragmentation = (Notify.IKEV2_FRAGMENTATION_SUPPORTED in n
                             and c.conn.fragmentation != "no")  # fmt: skip
        ike.certreq_seen = any(isinstance(p, CertReqPayload) for p in payloads)
        if Notify.SIGNATURE_HASH_ALGORITHMS in n:
            d = n[Notify.SIGNATURE_HASH_ALGORITHMS].data
            ike.peer_hashes = tuple(struct.unpack(f"!{len(d) // 2}H", d[: len(d) // 2 * 2]))
        if Notify.NAT_DETECTION_SOURCE_IP in n and Notify.NAT_DETECTION_DESTINATION_IP in n:
            srcs = [p.data for p in payloads if isinstance(p, NotifyPayload)
                    and p.type == Notify.NAT_DETECTION_SOURCE_IP]  # fmt: skip
            ike.nat_remote = _natd(c.spi_i, hdr.spi_r, src) not in srcs
            ike.nat_local = c.conn.encap or n[Notify.NAT_DETECTION_DESTINATION_IP].data != (
                _natd(c.spi_i, hdr.spi_r, dst))
            if ike.nat_local or ike.nat_remote:  # §2.23: float to port 4500
                # (an exchange that started on NAT-T ports stays on them)
                ike.local = Address(c.local.host,
                                    self.natt_port if c.local.port == 500 else c.local.port)
                ike.remote = Address(src.host, 4500 if src.port == 500 else src.port)
        self.by_spi[c.spi_i] = ike
        self._auth_request(ike, c.child, now, out)

    def _auth_request(self, ike: IkeSA, child: ChildConfig | None, now: float,
                      out: list[Output]) -> None:  # fmt: skip
        conn = ike.conn
        prf_alg = ike.suite.prf
        assert prf_alg is not None
        creds = conn.credentials if conn.local_auth == "pubkey" else None
        if creds is not None and (conn.local_id is None or conn.local_id.is_dn):
            idi = creds.subject_id(True)
        else:
            idi = (conn.local_id.payload(True) if conn.local_id is not None
                   else IDPayload(True, 1 if ike.local.host.version == 4 else 5,
                                  ike.local.host.packed))  # fmt: skip
        key = None
        if creds is None:  # our AUTH with the pre-shared key of (local.id, remote.id)
            key = conn.psk_for(idi, None if conn.remote_id.any or conn.remote_id.is_dn
                               else conn.remote_id.payload(False))  # fmt: skip
            if key is None:
                why = "no pre-shared key for local.id and remote.id"
                self.stats["auth-psk-unknown"] += 1
                log.warning("event=ike-auth-failed conn=%s peer=%s reason=%s", conn.name,
                            ike.remote, _quote(why))  # fmt: skip
                out.append(ConnectFailed(conn, why))
                self._kill(ike, why, out)
                return
        octets = signed_octets(ike.init_request, ike.nonce_r, prf_alg, ike.keys.sk_pi, idi.body)
        payloads: list[Payload] = [idi]
        if creds is not None and _send_cert(conn, ike):
            payloads += [CertPayload(CERT_X509_SIGNATURE, d) for d in creds.der()]
        if conn.unique != "never":  # (swanctl.conf: never sends no INITIAL_CONTACT)
            payloads.append(NotifyPayload(Notify.INITIAL_CONTACT))
        if conn.mobike:
            payloads.append(NotifyPayload(Notify.MOBIKE_SUPPORTED))
        payloads.append(NotifyPayload(Notify.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))  # RFC 6311
        payloads.append(NotifyPayload(Notify.IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED))
        if conn.remote_auth == "pubkey" and conn.cacerts and conn.send_certreq:
            payloads.append(CertReqPayload(CERT_X509_SIGNATURE, certreq(conn.cacerts)))
        if not (conn.remote_id.any or conn.remote_id.is_dn or conn.remote_id.wildcard):
            # (charon sends no IDr for a remote.id with a wildcard: a pattern names no one)
            payloads.append(conn.remote_id.payload(False))
        if creds is not None:
            method, data = sign(creds.key, octets, ike.peer_hashes, pss=self.rsa_pss)
            payloads.append(AuthPayload(method, data))
        else:
            assert key is not None
            payloads.append(AuthPayload(AuthMethod.SHARED_KEY,
                                        psk_auth(prf_alg, key, octets)))  # fmt: skip
        if conn.vips:  # vips = ["0.0.0.0", "::"]: an address of each family, any (§2.19)
            payloads.append(CPPayload(CfgType.CFG_REQUEST, tuple(
                (CfgAttr.INTERNAL_IP4_ADDRESS if v.version == 4
                 else CfgAttr.INTERNAL_IP6_ADDRESS, b"") for v in conn.vips)))  # fmt: skip
        spi = self._new_child_spi() if child is not None else None
        if child is not None and spi is not None:  # (None: an IKE SA without a CHILD SA)
            ike.auth_child = (child, spi)
            sb = spi.to_bytes(4, "big")
            props = tuple(Proposal(i + 1, ProtocolId.ESP, sb, o.transforms())
                          for i, o in enumerate(child.esp_proposals))  # fmt: skip
            payloads += [SAPayload(props), TSPayload(True, tuple(child.local_ts)),
                         TSPayload(False, tuple(child.remote_ts))]  # fmt: skip
        self._request(ike, "auth", payloads, now, out, ExchangeType.IKE_AUTH)

    def _auth_response(self, ike: IkeSA, inner: list[Payload], now: float,
                       out: list[Output]) -> None:  # fmt: skip
        conn = ike.conn
        prf_alg = ike.suite.prf
        assert prf_alg is not None
        n = notifies(inner)
        idr = next((p for p in inner if isinstance(p, IDPayload) and not p.initiator), None)
        auth = find(inner, AuthPayload)
        ok = False
        cert = None
        why = "responder not authenticated"
        if idr is not None and auth is not None:
            octets = signed_octets(ike.init_response, ike.nonce_i, prf_alg, ike.keys.sk_pr,
                                   idr.body)  # fmt: skip
            if conn.remote_auth == "psk" and auth.method == AuthMethod.SHARED_KEY:
                # the key of (our ID, the responder's), as the responder chose it
                key = (conn.psk_for(_my_id(conn, ike, True), idr) if conn.remote_id.matches(idr)
                       else None)  # fmt: skip
                ok = key is not None and _hmac.compare_digest(
                    auth.data, psk_auth(prf_alg, key, octets))
                if key is None and conn.remote_id.matches(idr):
                    why = "no pre-shared key for the responder's identity"
            elif conn.remote_auth == "pubkey" and auth.method != AuthMethod.SHARED_KEY:
                try:
                    certs = [parse_cert(p.data) for p in inner if isinstance(p, CertPayload)
                             and p.encoding == CERT_X509_SIGNATURE][:MAX_CERTS]  # fmt: skip
                    if not certs:
                        raise AuthError("no certificate")
                    cert = certs[0]
                    chain, anchor = validated_chain(cert, certs[1:], conn.cacerts,
                                                    self._wall(now),
                                                    conn.crls() if conn.crls else [],
                                                    conn.revocation)  # fmt: skip
                    if not id_matches_cert(idr, cert) or not conn.remote_id.matches(idr, cert):
                        raise AuthError("the identity is not the certificate's or not wanted")
                    verify(cert, auth.method, auth.data, octets)
                    ok = True
                    ike.peer_names, ike.peer_ca = cert_names(cert), fingerprint(anchor)
                    ike.peer_serials = chain_serials(chain, anchor)
                except RevocationUnknown as exc:
                    why = str(exc)
                    self._revocation_unknown(conn, ike, why)
                except AuthError as exc:
                    why = str(exc)
        if not ok:
            errs = [t for t in n if t < 16384]
            why = f"refused: {_notify_name(errs[0])}" if errs else why
            self.stats["auth-failed"] += 1
            self._release_auth_spi(ike)
            out.append(ConnectFailed(conn, why))
            self._kill(ike, why, out)
            return
        assert idr is not None
        if not (cert is not None and idr.id_type == IdType.DER_ASN1_DN) and not (
                says_what_it_is(idr)):  # fmt: skip
            # as the responder refuses such an IDi (_ike_auth): peer_id would be another's
            why = "the responder's identity text names one of another ID type"
            self.stats["auth-failed"] += 1
            self.stats["auth-id-ambiguous"] += 1
            self._release_auth_spi(ike)
            out.append(ConnectFailed(conn, why))
            self._kill(ike, why, out)
            return
        ike.peer_id = cert.subject.rfc4514_string() if (
            cert is not None and idr.id_type == IdType.DER_ASN1_DN) else peer_id_text(idr)
        ike.rekey_at = self._rekey_time(now, conn.rekey_time)
        ike.state = IkeState.ESTABLISHED
        ike.mobike = conn.mobike and Notify.MOBIKE_SUPPORTED in n
        ike.mid_sync = Notify.IKEV2_MESSAGE_ID_SYNC_SUPPORTED in n
        ike.replay_sync = Notify.IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED in n
        cp = next((p for p in inner if isinstance(p, CPPayload)), None)
        if conn.vips and cp is not None and cp.cfg_type == CfgType.CFG_REPLY:
            ike.vips = _given_vips(conn, cp)
        self.stats["ike-sa-established"] += 1
        log.info("event=ike-sa-established conn=%s peer=%s id=%s proposal=%s role=initiator "
                 "vips=%s", conn.name, ike.remote, ike.peer_id, ike.suite.name(),
                 ",".join(str(a) for _, a in ike.vips) or "-")  # fmt: skip
        if conn.vips and not ike.vips:
            self.stats["vip-not-given"] += 1
            log.warning("event=ike-vip-failed conn=%s peer=%s reason=%s", conn.name,
                        ike.remote, _quote("the peer gave no virtual IP"))  # fmt: skip
        out.append(IkeUp(ike, ike.auth_child[0] if ike.auth_child is not None else None))
        if ike.auth_child is None:
            return
        cc, spi_in = ike.auth_child
        ike.auth_child = None
        sa = find(inner, SAPayload)
        tsi = next((p for p in inner if isinstance(p, TSPayload) and p.initiator), None)
        tsr = next((p for p in inner if isinstance(p, TSPayload) and not p.initiator), None)
        chosen = (choose(cc.esp_proposals, sa.proposals, ignore_dh=True)
                  if sa is not None and len(sa.proposals) == 1 else None)  # fmt: skip
        local = narrow(tsi.selectors, cc.local_ts) if tsi else []
        remote = narrow(tsr.selectors, cc.remote_ts) if tsr else []
        spi_ok = chosen is not None and len(chosen[0].spi) == 4 and (
            int.from_bytes(chosen[0].spi, "big") >= 256)
        if (chosen is None or not spi_ok or tsi is None or tsr is None
                or local != list(tsi.selectors) or remote != list(tsr.selectors)):  # fmt: skip
            self._child_spis.discard(spi_in)
            errs = [t for t in n if t < 16384]
            self.stats["child-failed"] += 1
            log.info("event=child-sa-failed conn=%s child=%s reason=%s", conn.name, cc.name,
                     _notify_name(errs[0]) if errs else "bad answer")  # fmt: skip
            return
        assert chosen is not None
        proposal, suite = chosen
        taken = self._our_child_spi_taken(ike, cc, spi_in, proposal.spi, now, out)
        if taken is not None:
            if taken:
                ike.children_wanted.append(cc)  # (a CREATE_CHILD_SA once DELETE is answered)
            else:
                self._child_later(ike, cc, now)
            return
        keys = child_keys(prf_alg, ike.keys.sk_d, suite, ike.nonce_i, ike.nonce_r)
        child = ChildSA(cc, suite, spi_in, int.from_bytes(proposal.spi, "big"), keys, True,
                        local, remote, now)  # fmt: skip
        child.rekey_at = self._rekey_time(now, cc.rekey_time)
        ike.children.append(child)
        self.stats["child-sa-established"] += 1
        out.append(ChildUp(ike, child))

    def _release_auth_spi(self, ike: IkeSA) -> None:
        if ike.auth_child is not None:
            self._child_spis.discard(ike.auth_child[1])
            ike.auth_child = None

    # -- our rekeys (§1.3.2, §1.3.3, collisions §2.8.1/§2.8.2) --------------------------------
    def _rekey_time(self, now: float, period: float | None) -> float | None:
        """When to rekey: ``period`` less up to 10 % at random (so that two peers with the same
        settings rarely collide)."""
        if not period:
            return None
        jitter = int.from_bytes(self.random(2), "big") / 65535 * 0.1 * period
        return now + period - jitter

    def _child_due(self, ike: IkeSA, now: float) -> ChildSA | None:
        for c in ike.children:
            if c.rekey_at is not None and now >= c.rekey_at and not c.rekeyed:
                return c
        return None

    def rekey_child(self, ike: IkeSA, child: ChildSA, now: float) -> list[Output]:
        """Rekey a CHILD SA now (CREATE_CHILD_SA with REKEY_SA)."""
        self._touch(ike)
        out: list[Output] = []
        if ike.state is IkeState.ESTABLISHED and ike.pending is None and child in ike.children:
            self._rekey_child_request(ike, child, now, out)
        return out

    def rekey_ike(self, ike: IkeSA, now: float) -> list[Output]:
        """Rekey the IKE SA now."""
        self._touch(ike)
        out: list[Output] = []
        if ike.state is IkeState.ESTABLISHED and ike.pending is None:
            self._rekey_ike_request(ike, now, out)
        return out

    def _rekey_child_request(self, ike: IkeSA, child: ChildSA, now: float,
                             out: list[Output]) -> None:  # fmt: skip
        cc = child.config
        spi = self._new_child_spi()
        if spi is None:
            if child.rekey_at is not None:  # tried again later
                child.rekey_at = now + REKEY_RETRY
            return
        rekey = NotifyPayload(Notify.REKEY_SA, ProtocolId.ESP, child.spi_in.to_bytes(4, "big"))
        if self._child_request(ike, "rekey-child", [rekey], cc.esp_proposals, child.local_ts,
                               child.remote_ts, spi, now, out):  # fmt: skip
            assert ike.pending is not None
            ike.pending.old_child = child

    def create_child(self, ike: IkeSA, cc: ChildConfig, now: float) -> list[Output]:
        """Ask the peer for a new CHILD SA of ``cc`` in the IKE SA (CREATE_CHILD_SA without
        REKEY_SA, §1.3.1): what close_action = start does when the peer deleted one, or a
        trap of a child the IKE SA has none of. Sent at once, or after the exchange of ours
        in flight (window of one); not while it waits its back-off (``children_later``: a
        trap's packets would otherwise ask again at once)."""
        self._touch(ike)
        if ike.state is IkeState.ESTABLISHED and cc in ike.conn.children and not any(
                c is cc for c in ike.children_wanted) and not any(
                c is cc for c, _, _ in ike.children_later):  # fmt: skip
            ike.children_wanted.append(cc)
        return self.tick(now)

    def _create_child_request(self, ike: IkeSA, cc: ChildConfig, now: float,
                              out: list[Output]) -> None:  # fmt: skip
        spi = self._new_child_spi()
        if spi is None:
            log.info("event=child-create-failed conn=%s child=%s reason=%s", ike.conn.name,
                     cc.name, _quote("no inbound SPI left"))  # fmt: skip
            return
        if self._child_request(ike, "create-child", [], cc.esp_proposals, cc.local_ts,
                               cc.remote_ts, spi, now, out):  # fmt: skip
            assert ike.pending is not None
            ike.pending.new_child = cc
            self.stats["child-create-sent"] += 1

    def _child_request(self, ike: IkeSA, kind: str, first: list[Payload], offers: list[Offer],
                       local_ts: list[TrafficSelector], remote_ts: list[TrafficSelector],
                       spi: int, now: float, out: list[Output]) -> bool:  # fmt: skip
        """Send our CREATE_CHILD_SA request for a CHILD SA (a new one, or with ``first`` =
        REKEY_SA a rekey): ``offers`` under our inbound ``spi``, a nonce, a KE payload when
        they ask for PFS, our selectors; its nonce, key exchange and SPI kept in the pending
        request. False (the SPI given back) when the IKE SA had no message ID left."""
        sb = spi.to_bytes(4, "big")
        props = tuple(Proposal(i + 1, ProtocolId.ESP, sb, o.transforms())
                      for i, o in enumerate(offers))  # fmt: skip
        nonce = self.random(32)
        payloads: list[Payload] = [*first, SAPayload(props), NoncePayload(nonce)]
        kx = None
        groups = [g for o in offers for g in o.dh]
        if groups:  # PFS
            kx = KeyExchange(groups[0])
            payloads.append(KEPayload(kx.group, kx.public))
        payloads += [TSPayload(True, tuple(local_ts)), TSPayload(False, tuple(remote_ts))]
        self._request(ike, kind, payloads, now, out, ExchangeType.CREATE_CHILD_SA)
        if ike.pending is None:  # closed: no message ID was left
            self._child_spis.discard(spi)
            return False
        ike.pending.nonce, ike.pending.kx, ike.pending.spi = nonce, kx, sb
        return True

    def _child_answer(
        self, p: Pending, inner: list[Payload], offers: list[Offer],
        local_ts: list[TrafficSelector], remote_ts: list[TrafficSelector],
    ) -> tuple[tuple[Proposal, Suite], NoncePayload, TSPayload, TSPayload, bytes] | str:
        """The peer's answer to our CREATE_CHILD_SA (a new CHILD SA or a rekey): (the chosen
        proposal and suite, its nonce, TSi, TSr, the PFS shared secret), or why it is not
        one: ``_WIDER`` when its selectors are wider than ``local_ts``/``remote_ts`` (the
        responder narrows what we proposed, §2.9, never widens it; the peer has made the SA
        then), the name of the error it notified, or "bad answer"."""
        n = notifies(inner)
        sa = find(inner, SAPayload)
        nr = find(inner, NoncePayload)
        ke = find(inner, KEPayload)
        tsi = next((x for x in inner if isinstance(x, TSPayload) and x.initiator), None)
        tsr = next((x for x in inner if isinstance(x, TSPayload) and not x.initiator), None)
        chosen = (choose(offers, sa.proposals, ke_group=ke.group if ke else None)
                  if sa is not None and len(sa.proposals) == 1 else None)  # fmt: skip
        shared = b""
        ok = chosen is not None and nr is not None and tsi is not None and tsr is not None
        if ok and chosen is not None and chosen[1].dh is not None:
            kx = p.kx
            ok = isinstance(kx, KeyExchange) and ke is not None and ke.group == kx.group
            if ok:
                assert isinstance(kx, KeyExchange) and ke is not None
                try:
                    shared = kx.shared(ke.data)
                except IkeProtocolError:
                    ok = False
        if ok and chosen is not None and (len(chosen[0].spi) != 4
                                          or int.from_bytes(chosen[0].spi, "big") < 256):
            ok = False  # fmt: skip
        if ok and chosen is not None and nr is not None and tsi is not None and tsr is not None:
            if not (within(tsi.selectors, local_ts) and within(tsr.selectors, remote_ts)):
                return _WIDER
            return chosen, nr, tsi, tsr, shared
        errs = [t for t in n if t < 16384]
        return _notify_name(errs[0]) if errs else "bad answer"

    def _create_child_response(self, ike: IkeSA, p: Pending, inner: list[Payload],
                               now: float, out: list[Output]) -> None:  # fmt: skip
        cc = p.new_child
        assert cc is not None
        spi_in = int.from_bytes(p.spi, "big")
        a = self._child_answer(p, inner, cc.esp_proposals, cc.local_ts, cc.remote_ts)
        if isinstance(a, str):
            self.stats["child-create-failed"] += 1
            log.info("event=child-create-failed conn=%s child=%s reason=%s", ike.conn.name,
                     cc.name, _quote(a))  # fmt: skip
            self._child_spis.discard(spi_in)
            if a == _WIDER:  # the peer made the SA: it is deleted there (our SPI names it)
                self._request(ike, "delete-child", [DeletePayload(ProtocolId.ESP, (p.spi,))],
                              now, out)  # fmt: skip
            return
        prf_alg = ike.suite.prf
        assert prf_alg is not None
        chosen, nr, tsi, tsr, shared = a
        taken = self._our_child_spi_taken(ike, cc, spi_in, chosen[0].spi, now, out)
        if taken is not None:
            if taken and not any(w is cc for w in ike.children_wanted):
                ike.children_wanted.append(cc)  # (asked again once the DELETE is answered)
            elif not taken:
                self._child_later(ike, cc, now)
            return
        keys = child_keys(prf_alg, ike.keys.sk_d, chosen[1], p.nonce, nr.data, shared)
        child = ChildSA(cc, chosen[1], spi_in, int.from_bytes(chosen[0].spi, "big"), keys,
                        True, list(tsi.selectors), list(tsr.selectors), now)  # fmt: skip
        child.rekey_at = self._rekey_time(now, cc.rekey_time)
        ike.children.append(child)
        self.stats["child-sa-created"] += 1
        log.info("event=child-sa-created conn=%s child=%s spi_in=%08x", ike.conn.name,
                 cc.name, spi_in)  # fmt: skip
        out.append(ChildUp(ike, child))

    def _rekey_child_response(self, ike: IkeSA, p: Pending, inner: list[Payload], now: float,
                              out: list[Output]) -> None:  # fmt: skip
        old = p.old_child
        assert old is not None
        spi_in = int.from_bytes(p.spi, "big")
        # the responder narrows what we proposed (§2.9), never widens it: a successor with
        # wider selectors than the SA it replaces would take other peers' traffic (its policy
        # goes first) and let this peer send from and to addresses it was never given
        a = self._child_answer(p, inner, old.config.esp_proposals, old.local_ts, old.remote_ts)
        if isinstance(a, str):
            self.stats["rekey-failed"] += 1
            log.info("event=child-rekey-failed conn=%s child=%s reason=%s", ike.conn.name,
                     old.name, a)  # fmt: skip
            self._child_spis.discard(spi_in)
            if a == _WIDER:  # the peer made the SA: it is deleted there (our SPI names it)
                self.stats["child-rekey-ts-refused"] += 1
                self._request(ike, "delete-child", [DeletePayload(ProtocolId.ESP, (p.spi,))],
                              now, out)  # fmt: skip
            if old in ike.children and not old.rekeyed:
                old.rekey_at = now + 30.0  # try again later
            return
        prf_alg = ike.suite.prf
        assert prf_alg is not None
        chosen, nr, tsi, tsr, shared = a
        taken = self._our_child_spi_taken(ike, old.config, spi_in, chosen[0].spi, now, out)
        if taken is not None:
            old.collided = None  # (ours is gone: the peer's, if it crossed, decides alone)
            if old in ike.children and not old.rekeyed:
                # rekeyed again once the DELETE is answered; after SPI_TAKEN_RETRIES in a
                # row, later, as after any failed rekey
                old.rekey_at = now if taken else now + 30.0
            return
        keys = child_keys(prf_alg, ike.keys.sk_d, chosen[1], p.nonce, nr.data, shared)
        child = ChildSA(old.config, chosen[1], spi_in, int.from_bytes(chosen[0].spi, "big"),
                        keys, True, list(tsi.selectors), list(tsr.selectors), now)  # fmt: skip
        child.rekey_at = self._rekey_time(now, old.config.rekey_time)
        ike.children.append(child)
        self.stats["child-sa-rekeyed"] += 1
        out.append(ChildUp(ike, child))
        # §2.8.1: when the peer rekeyed the same SA meanwhile, the exchange with the lowest
        # nonce made the redundant SA; whoever started that exchange deletes what it made.
        if old.collided is not None:
            _theirs, ni2, nr2 = old.collided
            old.collided = None
            if min(p.nonce, nr.data) < min(ni2, nr2):
                self.stats["rekey-collision-lost"] += 1
                self._delete_children(ike, [child], now, out)  # ours is redundant
                return
            self.stats["rekey-collision-won"] += 1
        old.rekeyed = True
        if old in ike.children:
            self._delete_children(ike, [old], now, out)

    def _our_child_spi_taken(self, ike: IkeSA, cc: ChildConfig, spi_in: int, spi: bytes,
                             now: float, out: list[Output]) -> bool | None:  # fmt: skip
        """A CHILD SA we asked for (IKE_AUTH, CREATE_CHILD_SA, a rekey) whose outbound SPI,
        ``spi``, the responder's choice, another tunnel here already sends with (by chance,
        or a peer copying the ESP we send another): as for a peer's CHILD SA (the responder
        path: fail-over replicas, etcd keys and cluster grouping know a tunnel by its
        outbound SPI, and one of the two would be lost at a take-over), it is not made here.
        The peer has made it: an INFORMATIONAL DELETE of it goes at once (our inbound SPI
        names it, §1.4.1). True: the caller asks again (a new CHILD SA: a new SPI of the
        peer's choosing), which it does at most SPI_TAKEN_RETRIES times in a row per IKE
        SA; False: not now (a new CHILD SA waits its back-off, :meth:`_child_later`; a
        rekey's old SA serves on and is rekeyed later). One line each time (rate-limited),
        counted. None when the SPI is free. Nothing is ever sent on such a CHILD SA: no
        sequence number is used."""
        if not self.outbound_spi_taken(int.from_bytes(spi, "big")):
            ike.spi_taken_retries = ike.child_rounds = 0
            return None
        ike.spi_taken_retries += 1
        again = ike.spi_taken_retries <= SPI_TAKEN_RETRIES
        self.stats["child-spi-taken"] += 1
        self.stats["child-spi-taken-retried" if again else "child-spi-taken-gave-up"] += 1
        if self._refusal_log.allow("spi", now):
            log.warning("event=child-spi-taken conn=%s child=%s peer=%s id=%s spi=%s "
                        "role=initiator effect=%s count=%d", ike.conn.name, cc.name,
                        ike.remote, ike.peer_id, spi.hex(),
                        _quote(f"deleted, asked again ({ike.spi_taken_retries} of"
                               f" {SPI_TAKEN_RETRIES})" if again else
                               f"deleted, given up for now ({SPI_TAKEN_RETRIES} in a row)"),
                        self.stats["child-spi-taken"])  # fmt: skip
        self._child_spis.discard(spi_in)
        self._request(ike, "delete-child",
                      [DeletePayload(ProtocolId.ESP, (spi_in.to_bytes(4, "big"),))], now, out)
        if not again:
            ike.spi_taken_retries = 0  # (a later request, by close_action or a trap, may)
        return again

    def _child_later(self, ike: IkeSA, cc: ChildConfig, now: float) -> None:
        """A new CHILD SA of ours given up after SPI_TAKEN_RETRIES taken SPIs in a row: not
        established (``ipsecct sa list --ike`` says so, and why), asked for again after a
        back-off (CHILD_RETRY doubling per round given up in a row, to CHILD_RETRY_MAX).
        Before, it was not asked for again until close_action or a trap: the tunnel stayed
        down without a word once the line was rate-limited away."""
        if ike.has_or_asks(cc):
            return
        ike.child_rounds += 1
        wait = min(CHILD_RETRY_MAX, CHILD_RETRY * 2 ** min(ike.child_rounds - 1, 16))
        why = f"peer chose outbound SPIs in use here {SPI_TAKEN_RETRIES + 1} times in a row"
        ike.children_later.append((cc, now + wait, why))
        self.stats["child-retry-later"] += 1
        log.warning("event=child-sa-not-established conn=%s child=%s peer=%s id=%s reason=%s "
                    "retry_in_s=%d round=%d", ike.conn.name, cc.name, ike.remote, ike.peer_id,
                    _quote(why), wait, ike.child_rounds)  # fmt: skip

    def _delete_children(self, ike: IkeSA, children: list[ChildSA], now: float,
                         out: list[Output]) -> None:  # fmt: skip
        for c in children:
            if c in ike.children:
                ike.children.remove(c)
                self._child_spis.discard(c.spi_in)
                out.append(ChildDown(ike, c, "rekeyed"))
        spis = tuple(c.spi_in.to_bytes(4, "big") for c in children)
        if ike.pending is None:
            self._request(ike, "delete-child", [DeletePayload(ProtocolId.ESP, spis)], now, out)
        else:
            ike.queued_deletes += list(spis)

    def _rekey_ike_request(self, ike: IkeSA, now: float, out: list[Output]) -> None:
        spi = self.random(8)
        while spi == bytes(8) or spi in self.by_spi:
            spi = self.random(8)
        props = tuple(Proposal(i + 1, ProtocolId.IKE, spi, o.transforms())
                      for i, o in enumerate(ike.conn.proposals))  # fmt: skip
        kx = KeyExchange(ike.suite.dh or ike.conn.proposals[0].dh[0])
        nonce = self.random(32)
        self._request(ike, "rekey-ike", [SAPayload(props), NoncePayload(nonce),
                                         KEPayload(kx.group, kx.public)], now, out,
                      ExchangeType.CREATE_CHILD_SA)  # fmt: skip
        if ike.pending is None:  # closed: no message ID was left
            return
        ike.pending.nonce, ike.pending.kx, ike.pending.spi = nonce, kx, spi

    def _rekey_ike_response(self, ike: IkeSA, p: Pending, inner: list[Payload], now: float,
                            out: list[Output]) -> None:  # fmt: skip
        sa = find(inner, SAPayload)
        nr = find(inner, NoncePayload)
        ke = find(inner, KEPayload)
        kx = p.kx
        chosen = (choose(ike.conn.proposals, sa.proposals, ke_group=ke.group if ke else None)
                  if sa is not None and len(sa.proposals) == 1 else None)  # fmt: skip
        shared = None
        if (chosen is not None and nr is not None and ke is not None
                and isinstance(kx, KeyExchange) and ke.group == kx.group
                and chosen[1].dh == kx.group and len(chosen[0].spi) == 8
                and chosen[0].spi != bytes(8)):  # fmt: skip
            try:
                shared = kx.shared(ke.data)
            except IkeProtocolError:
                shared = None
        if shared is None or chosen is None or nr is None:
            n = notifies(inner)
            errs = [t for t in n if t < 16384]
            self.stats["rekey-failed"] += 1
            log.info("event=ike-rekey-failed conn=%s reason=%s", ike.conn.name,
                     _notify_name(errs[0]) if errs else "bad answer")  # fmt: skip
            ike.rekey_at = now + REKEY_RETRY
            return
        suite = chosen[1]
        keys = ike_keys(suite, shared, p.nonce, nr.data, p.spi, chosen[0].spi,
                        old_sk_d=ike.keys.sk_d, old_prf=ike.suite.prf)  # fmt: skip
        new = IkeSA(p.spi, chosen[0].spi, True, ike.conn, ike.candidates, suite, ike.local,
                    ike.remote, now, keys, p.nonce, nr.data, b"", b"", ike.nat_local,
                    ike.nat_remote, IkeState.ESTABLISHED, ike.peer_id)  # fmt: skip
        new.peer_next_mid = 0
        new.last_heard = now
        new.rekey_at = self._rekey_time(now, ike.conn.rekey_time)
        _inherit(new, ike)
        if ike.collided is not None:
            theirs, ni2, nr2 = ike.collided
            ike.collided = None
            if min(p.nonce, nr.data) < min(ni2, nr2):
                # ours is redundant: the peer deletes the old one; we delete ours at once
                self.stats["rekey-collision-lost"] += 1
                hdr = Header(new.spi_i, new.spi_r, 0, ExchangeType.INFORMATIONAL,
                             Flag.INITIATOR, 0, 0)  # fmt: skip
                out.append(Send(new.outbound.seal(hdr, [DeletePayload(ProtocolId.IKE)]),
                                new.local, new.remote))  # fmt: skip
                return
            # theirs is redundant: the CHILD SAs went to it; take them to ours
            self.stats["rekey-collision-won"] += 1
            new.children, theirs.children = theirs.children + ike.children, []
            new.vips, theirs.vips = theirs.vips + new.vips, []  # (_inherit moved them there)
            ike.children = []
            theirs.state = IkeState.REKEYED
            theirs.redundant_until = now + REDUNDANT_GRACE
        else:
            new.children, ike.children = ike.children, []
        self.by_spi[p.spi] = new
        self.stats["ike-sa-rekeyed"] += 1
        log.info("event=ike-sa-rekeyed conn=%s peer=%s new=%s_i/%s_r role=initiator",
                 ike.conn.name, ike.remote, new.spi_i.hex(), new.spi_r.hex())  # fmt: skip
        out.append(IkeRekeyed(ike, new))
        ike.state = IkeState.REKEYED
        self._request(ike, "delete-rekeyed", [DeletePayload(ProtocolId.IKE)], now, out)

    # -- RFC 6311: message-ID synchronisation after a fail-over -----------------------------
    def start_mid_sync(self, ike: IkeSA, now: float, leap: int = MID_SYNC_LEAP,
                       esp_delta: int = 0,
                       local: Address | None = None) -> list[Output]:  # fmt: skip
        """After taking over ``ike`` from a replica: send the RFC 6311 INFORMATIONAL (message
        ID 0) that tells the peer our next request ID (the replicated one plus ``leap``) and
        the next one we expect (the replicated one), with IPSEC_REPLAY_COUNTER_SYNC
        (``esp_delta``) when the peer announced it. Without RFC 6311 the replicated IDs are
        kept, and the peer's next request may be up to RESYNC_AHEAD IDs ahead of them.

        ``local``: this gateway's own address when it is not the IKE SA's (direct SG
        identity: the old gateway was elsewhere). The sync (or the probe) goes from it, and
        once the message IDs agree the peer is told to move here (:meth:`announce_move`)."""
        self._touch(ike)
        out: list[Output] = []
        if ike.state is not IkeState.ESTABLISHED:
            return out
        if local is not None and local != ike.local:
            ike.local = local
            ike.move_after_sync = True
        # strongSwan (5.9.8) encrypts with an AEAD cipher under a sequential IV made of the
        # message ID, used at most once as a request's and once as a response's: once it has
        # answered one of our requests it cannot encrypt its answer to a sync (ID 0 again),
        # and destroys the IKE SA. Then, as with peers without RFC 6311, we keep the
        # replicated IDs, accept the peer's next request a little ahead, and probe ours.
        # (a request in flight when the IKE SA left its old gateway counts: the context gives
        # its ID as our next, but the peer may have answered it, ID 0 included)
        aead_used = ike.suite.encr in AEAD and (ike.my_next_mid > 0 or ike.inflight_at_export)
        if not ike.mid_sync or aead_used:
            ike.resync_ahead = ike.probe_ahead = RESYNC_AHEAD
            self.stats["mid-sync-aead-skipped" if ike.mid_sync else "mid-sync-unsupported"] += 1
            log.info("event=ike-mid-resync conn=%s peer=%s how=%s send=%d recv=%d",
                     ike.conn.name, ike.remote, "probe" if ike.mid_sync else "no-rfc6311",
                     ike.my_next_mid, ike.peer_next_mid)  # fmt: skip
            if ike.pending is None:  # find our message ID now rather than at the next check
                self._request(ike, "liveness", [], now, out)
            return out
        nonce = self.random(4)
        m1 = (ike.my_next_mid + leap) & 0xFFFFFFFF
        p1 = ike.peer_next_mid
        payloads: list[Payload] = [MidSync(nonce, m1, p1).payload()]
        if ike.replay_sync and esp_delta:
            payloads.append(ReplayCounterSync(esp_delta).payload())
        flags = Flag.INITIATOR if ike.we_initiated else 0
        hdr = Header(ike.spi_i, ike.spi_r, 0, ExchangeType.INFORMATIONAL, flags, 0, 0)
        msgs = self._seal(ike, hdr, payloads)
        ike.pending = Pending("mid-sync", 0, msgs, now, 1, now + RETRANSMIT[0],
                              payloads=payloads, mid_sync=(nonce, m1, p1))  # fmt: skip
        self.stats["mid-sync-sent"] += 1
        log.info("event=ike-mid-sync-sent conn=%s peer=%s send=%d recv=%d", ike.conn.name,
                 ike.remote, m1, p1)  # fmt: skip
        out += [Send(m, ike.local, ike.remote) for m in msgs]
        return out

    def _mid_sync_response(self, ike: IkeSA, p: Pending, inner: list[Payload]) -> None:
        assert p.mid_sync is not None
        nonce, m1, p1 = p.mid_sync
        n = notifies(inner)
        got = None
        if Notify.IKEV2_MESSAGE_ID_SYNC in n:
            try:
                got = MidSync.parse(n[Notify.IKEV2_MESSAGE_ID_SYNC])
            except IkeParseError:
                got = None
        # P2 >= P1, M2 >= M1 (RFC 6311 §5.1): anything else is not an answer to our request
        if (got is None or got.nonce != nonce or got.send < p1 or got.recv < m1
                or max(got.send, got.recv) > MAX_SYNCED_MID):  # fmt: skip
            self.stats["mid-sync-failed"] += 1
            log.warning("event=ike-mid-sync-failed conn=%s peer=%s", ike.conn.name, ike.remote)
            ike.my_next_mid = max(ike.my_next_mid, m1)
            return
        if got.send != ike.peer_next_mid:
            ike.last_response = []  # the peer's next request is a new one
        ike.peer_next_mid = got.send
        ike.my_next_mid = got.recv
        self.stats["mid-sync-done"] += 1
        log.info("event=ike-mid-sync-done conn=%s peer=%s send=%d recv=%d", ike.conn.name,
                 ike.remote, ike.my_next_mid, ike.peer_next_mid)  # fmt: skip

    def _mid_sync_request(self, ike: IkeSA, data: bytes, hdr: Header, payloads: list[Payload],
                          src: Address, now: float, out: list[Output]) -> bool:  # fmt: skip
        """The peer's member that took over asks us to synchronise message IDs (we are the
        IKE SA's peer, as strongSwan is). False when the message is not such a request (the
        normal path then decides)."""
        if hdr.is_response:
            return False
        inner = self._open(ike, data, hdr, payloads)
        assert inner is not None
        got = sync_request(inner)
        if got is None:
            return False
        mid, replay = got
        ike.last_heard = now
        if mid.send < ike.peer_next_mid:  # RFC 6311 §5.1: below what we expect: stale
            self.stats["mid-sync-stale"] += 1
            return True
        if max(mid.send, mid.recv) > MAX_SYNCED_MID:  # we could send no request after it
            self.stats["mid-sync-refused"] += 1
            log.warning("event=ike-mid-sync-refused conn=%s peer=%s send=%d recv=%d",
                        ike.conn.name, ike.remote, mid.recv, mid.send)  # fmt: skip
            return True
        if replay is not None and mid.nonce != ike.sync_nonce:  # not for a retransmission
            self._replay_counter_sync(ike, replay.delta, out)
        ike.sync_nonce = mid.nonce
        m2 = max(mid.send, ike.peer_next_mid)
        p2 = max(mid.recv, ike.my_next_mid)
        if m2 != ike.peer_next_mid:
            ike.last_response = []
        ike.peer_next_mid = m2
        ike.my_next_mid = p2
        self.stats["mid-sync-answered"] += 1
        log.info("event=ike-mid-sync-answered conn=%s peer=%s send=%d recv=%d", ike.conn.name,
                 ike.remote, p2, m2)  # fmt: skip
        rhdr = Header(ike.spi_i, ike.spi_r, 0, ExchangeType.INFORMATIONAL,
                      Flag.RESPONSE | (Flag.INITIATOR if ike.we_initiated else 0), 0, 0)
        # to where the request came from (RFC 7296 §2.11): the member that took over may be
        # at another address (direct SG identity), which it tells us next (MOBIKE)
        out += [Send(m, ike.local, src)
                for m in self._seal(ike, rhdr, [MidSync(mid.nonce, p2, m2).payload()])]
        p = ike.pending
        if p is not None:  # our request in flight went to the old member: again, under P2
            self._reissue(ike, p, p2)
            p.tries, p.deadline = 1, now + RETRANSMIT[0]
            out += [Send(m, ike.local, ike.remote) for m in p.messages]
        return True

    def _replay_counter_sync(self, ike: IkeSA, delta: int, out: list[Output]) -> None:
        """IPSEC_REPLAY_COUNTER_SYNC in an authenticated, fresh sync request: checked against
        our policy before the adapter advances our outbound sequence numbers (forward only)."""
        if not ike.replay_sync:  # we never announced it: a peer may not ask
            self.stats["replay-sync-unannounced"] += 1
            log.warning("event=ike-replay-sync-refused conn=%s peer=%s delta=%d reason=%s",
                        ike.conn.name, ike.remote, delta, "not-announced")  # fmt: skip
            return
        if delta == 0:
            return
        if delta > MAX_REPLAY_DELTA:
            self.stats["replay-sync-refused"] += 1
            log.warning("event=ike-replay-sync-refused conn=%s peer=%s delta=%d reason=%s",
                        ike.conn.name, ike.remote, delta, "delta-too-large")  # fmt: skip
            return
        self.stats["replay-sync-applied"] += 1
        log.info("event=ike-replay-sync conn=%s peer=%s delta=%d children=%d", ike.conn.name,
                 ike.remote, delta, len(ike.children))  # fmt: skip
        out.append(ReplayCounterSynced(ike, delta))

    def _reissue(self, ike: IkeSA, p: Pending, mid: int) -> None:
        """Our pending request, sealed again under message ID ``mid``."""
        flags = Flag.INITIATOR if ike.we_initiated else 0
        p.message_id = mid
        ike.my_next_mid = mid + 1
        p.messages = self._seal(ike, Header(ike.spi_i, ike.spi_r, 0, p.exchange, flags, mid, 0),
                                p.payloads)  # fmt: skip

    # -- our requests -----------------------------------------------------------------------
    def _request(self, ike: IkeSA, kind: str, payloads: list[Payload], now: float,
                 out: list[Output],
                 exchange: int = ExchangeType.INFORMATIONAL) -> None:  # fmt: skip
        mid = ike.my_next_mid
        if mid > MAX_MID:  # no ID left for a request (§2.2: the rekey never came through)
            self.stats["message-id-exhausted"] += 1
            log.warning("event=ike-message-ids-exhausted conn=%s peer=%s side=ours",
                        ike.conn.name, ike.remote)  # fmt: skip
            self._kill(ike, "message IDs exhausted", out)
            return
        ike.my_next_mid += 1
        flags = Flag.INITIATOR if ike.we_initiated else 0
        hdr = Header(ike.spi_i, ike.spi_r, 0, exchange, flags, mid, 0)
        msgs = self._seal(ike, hdr, payloads)
        ike.pending = Pending(kind, mid, msgs, now, 1, now + RETRANSMIT[0],
                              payloads=list(payloads), exchange=exchange)  # fmt: skip
        self.stats[f"{kind}-sent"] += 1
        out += [Send(m, ike.local, ike.remote) for m in msgs]

    def _response(self, ike: IkeSA, data: bytes, hdr: Header, payloads: list[Payload],
                  src: Address, now: float, out: list[Output]) -> None:  # fmt: skip
        p = ike.pending
        if hdr.message_id in ike.probe_late and hdr.from_initiator != ike.we_initiated:
            # the peer processed a later probe of the same liveness check too
            if self._open(ike, data, hdr, payloads) is not None:
                ike.probe_late.discard(hdr.message_id)
                ike.my_next_mid = max(ike.my_next_mid, hdr.message_id + 1)
                self.stats["message-id-probe-late"] += 1
            return
        if (p is None or (hdr.message_id != p.message_id and hdr.message_id not in p.alt)
                or hdr.from_initiator == ike.we_initiated):  # fmt: skip
            self.stats["unexpected-response"] += 1
            return
        opened = self._open(ike, data, hdr, payloads)
        if opened is None:
            return
        inner = opened
        ike.pending = None
        ike.last_heard = now
        if p.alt:  # a probe answered: the peer expects the ID after this one
            ike.my_next_mid = hdr.message_id + 1
            ike.probe_late = {m for m in [p.message_id, *p.alt] if m > hdr.message_id}
        ike.probe_ahead = 0  # our message IDs agree with the peer's
        self.stats[f"{p.kind}-ok"] += 1  # our request answered
        if p.kind == "delete":
            self._kill(ike, ike.close_reason or "deleted", out)
        elif p.kind == "auth":
            self._float(ike, src, ike.local, out)
            self._auth_response(ike, inner, now, out)
            ike.init_request = ike.init_response = b""  # (see IkeSA.init_request)
        elif p.kind == "rekey-child":
            self._rekey_child_response(ike, p, inner, now, out)
        elif p.kind == "create-child":
            self._create_child_response(ike, p, inner, now, out)
        elif p.kind == "rekey-ike":
            self._rekey_ike_response(ike, p, inner, now, out)
        elif p.kind == "delete-rekeyed":
            self._kill(ike, "rekeyed", out)
        elif p.kind == "delete-child":
            out.append(DeleteAnswered(ike, tuple(
                int.from_bytes(spi, "big") for d in p.payloads if isinstance(d, DeletePayload)
                for spi in d.spis)))  # fmt: skip
        elif p.kind == "address-update":
            self.stats["address-update-answered"] += 1
            log.info("event=ike-address-updated conn=%s peer=%s local=%s", ike.conn.name,
                     ike.remote, ike.local)  # fmt: skip
        elif p.kind == "mid-sync":
            self._mid_sync_response(ike, p, inner)
        elif p.kind == "mobike-update":
            self._mobike_update_response(ike, p, inner, src, now, out)
        elif p.kind == "rr-check":
            self._rr_check_response(ike, p, inner, out)
        if ike.pending is None and ike.update_due and ike.state is IkeState.ESTABLISHED:
            self._mobike_update(ike, now, out)
        if ike.pending is None and ike.rr_due and ike.state is IkeState.ESTABLISHED:
            self._rr_check(ike, now, out)
        if ike.pending is None and ike.move_after_sync and ike.state is IkeState.ESTABLISHED:
            ike.move_after_sync = False  # taken over at our own address: the peer follows
            out += self.announce_move(ike, ike.local, now)
        if ike.pending is None and ike.queued_deletes and ike.state is IkeState.ESTABLISHED:
            self._delete_queued(ike, now, out)

    def _delete_queued(self, ike: IkeSA, now: float, out: list[Output]) -> None:
        """The DELETE of the CHILD SAs queued behind an exchange of ours (window of one), or
        owed by the gateway this IKE SA came from (its context's item 30: sent again here,
        after the message IDs are synchronised when it was a fail-over)."""
        spis, ike.queued_deletes = tuple(ike.queued_deletes), []
        self._request(ike, "delete-child", [DeletePayload(ProtocolId.ESP, spis)], now, out)

    def _drop_pending(self, ike: IkeSA) -> None:
        """Forget our request in flight; the inbound SPI a CHILD rekey had taken for its
        successor is free again (it stayed taken for good when an IKE SA died or was deleted
        during a CHILD rekey: one SPI of the range lost each time)."""
        p, ike.pending = ike.pending, None
        if p is not None and p.kind in ("rekey-child", "create-child") and p.spi:
            self._child_spis.discard(int.from_bytes(p.spi, "big"))

    def _kill(self, ike: IkeSA, reason: str, out: list[Output]) -> None:
        if self.by_spi.get(ike.our_spi) is ike:
            del self.by_spi[ike.our_spi]
        self.half_open.drop(ike)
        was_up = ike.peer_id != "" and ike.state is not IkeState.REKEYED
        ike.state = IkeState.DEAD
        self._drop_pending(ike)
        for c in ike.children:
            self._child_spis.discard(c.spi_in)
            out.append(ChildDown(ike, c, reason))
        ike.children = []
        self._release_vips(ike)
        if was_up:
            log.info("event=ike-sa-down conn=%s peer=%s reason=%s", ike.conn.name, ike.remote,
                     reason)  # fmt: skip
            out.append(IkeDown(ike, reason))


def _given_vips(conn: Connection, cp: CPPayload) -> list[tuple[str, IPAddr]]:
    """The addresses a responder's CFG_REPLY gives us: one of each family we asked for (the
    first; an unspecified, multicast or loopback one is not taken), at most MAX_CP_READ
    attributes read."""
    out: list[tuple[str, IPAddr]] = []
    asked = {v.version for v in conn.vips}
    for atype, value in cp.attributes[:MAX_CP_READ]:
        if atype == CfgAttr.INTERNAL_IP4_ADDRESS and len(value) == 4:
            a: IPAddr = ipaddress.IPv4Address(value)
        elif atype == CfgAttr.INTERNAL_IP6_ADDRESS and len(value) == 17:
            a = ipaddress.IPv6Address(value[:16])
        else:
            continue
        if (a.version in asked and not any(x.version == a.version for _, x in out)
                and not (a.is_unspecified or a.is_multicast or a.is_loopback)):  # fmt: skip
            out.append(("", a))
    return out


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


MAX_LOGGED_ID = 256  # characters of a peer's claimed identity in a log line
MAX_LOGGED_REASON = 512  # ... and of a reason quoting what it sent (a certificate's subject)


def _cut(text: str, limit: int, size: int | None = None) -> str:
    """``text`` for a log line: at most ``limit`` characters, then how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({size if size is not None else len(text)} " + (
        "octets)" if size is not None else "characters)")


def _id_for_log(idi: IDPayload) -> str:
    """An identity a peer claims, not yet proven, for a log line (IDPayload.text: printable),
    cut after MAX_LOGGED_ID characters (an IDi is up to max_packet octets)."""
    return _cut(idi.text(), MAX_LOGGED_ID, len(idi.data))


def _my_id(conn: Connection, ike: IkeSA, initiator: bool = False) -> IDPayload | None:
    """Our identity in ``conn`` as a pre-shared key's ids are matched against it: local.id,
    or without one our address (None: a DN, which no pre-shared key names)."""
    if conn.local_id is None:
        return IDPayload(initiator, 1 if ike.local.host.version == 4 else 5,
                         ike.local.host.packed)  # fmt: skip
    return None if conn.local_id.is_dn else conn.local_id.payload(initiator)


def _send_cert(conn: Connection, ike: IkeSA) -> bool:
    """swanctl.conf's send_cert: our CERT payloads always, never, or (ifasked, the default)
    when the peer sent a CERTREQ."""
    return conn.send_cert == "always" or (conn.send_cert == "ifasked" and ike.certreq_seen)


def _notify_name(t: int) -> str:
    try:
        return Notify(t).name
    except ValueError:
        return str(t)


def _changes_state(hdr: Header, inner: list[Payload]) -> bool:
    """A request that makes, rekeys or deletes SAs or moves the IKE SA: CREATE_CHILD_SA, an
    INFORMATIONAL with payloads. An empty INFORMATIONAL (a liveness check) moves only the
    message IDs, which the IKE SA's context carries, and is answered even while quiet."""
    if hdr.exchange == ExchangeType.CREATE_CHILD_SA:
        return True
    return hdr.exchange == ExchangeType.INFORMATIONAL and bool(inner)


def _dead(ike: IkeSA) -> bool:
    return ike.state is IkeState.DEAD


def _inherit(new: IkeSA, old: IkeSA) -> None:
    """What an IKE SA's rekey (§2.18) keeps: the extensions both sides announced in
    IKE_SA_INIT and IKE_AUTH, which have no exchange of their own in the new IKE SA. MOBIKE and
    fragmentation were lost: after the IKE SA's first rekey a MOBIKE peer's address update got
    no COOKIE2 back (strongSwan then closes the IKE SA), a handover with direct SG identity
    could no longer move it, and its fragments were refused."""
    new.mid_sync, new.replay_sync = old.mid_sync, old.replay_sync
    new.mobike, new.fragmentation = old.mobike, old.fragmentation
    new.peer_hashes = old.peer_hashes
    # how the peer authenticated, as a gateway that took the IKE SA over was told (a rekey
    # there dropped it: the next move's target no longer knew)
    new.peer_auth, new.peer_names, new.peer_ca = old.peer_auth, old.peer_names, old.peer_ca
    new.peer_serials = old.peer_serials
    new.orig_initiator = old.mobike_initiator  # RFC 4555's roles stay as they were
    new.vips, old.vips = old.vips, []  # the leases go with the new IKE SA (not released)
    if old.esp_remote is not None:  # a return-routability check was due or in flight: the
        new.esp_remote, new.rr_due = old.esp_remote, True  # new IKE SA makes its own


def _mids_low(ike: IkeSA) -> bool:
    """Are the IKE SA's message IDs, ours or the peer's, near the end of 32 bits (§2.2)?"""
    return max(ike.my_next_mid, ike.peer_next_mid) >= MID_REKEY_AT


def _mid_rekey_now(ike: IkeSA) -> bool:
    """Is the IKE SA rekeyed at once for its message IDs: they are near the end and its
    regular rekey (or the retry after a refusal) is not due within REKEY_RETRY of the last
    exchange? One rule for tick() and next_deadline(): tick() measured from now and the
    deadline from the last exchange, and a deadline in the past that tick() did nothing
    about made the timer spin until the regular rekey."""
    return _mids_low(ike) and (
        ike.rekey_at is None or ike.rekey_at > ike.last_heard + REKEY_RETRY
    )


def strip_marker(data: bytes) -> bytes | None:
    """An IKE message on port 4500 starts with four zero octets (RFC 3948 §2.2); returns it
    without them, or None when ``data`` is not one."""
    if len(data) >= 4 + IKE_HEADER_LEN and data[:4] == b"\0\0\0\0" and data[21] >> 4 == 2:
        return data[4:]
    return None

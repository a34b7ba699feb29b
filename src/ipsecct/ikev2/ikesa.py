"""IKE SAs and CHILD SAs as the IKEv2 engine keeps them (RFC 7296 §2), and the CHILD SA's
entries for the SAD and SPD (the same :class:`~ipsecct.ipsec.sad.SecurityAssociation` objects
that manual keying makes)."""

from __future__ import annotations

import enum
import ipaddress
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from ..ipsec.algorithms import EncAlg, IntegAlg
from ..ipsec.sad import Direction, Lifetime, SecurityAssociation, UdpEncap
from ..ipsec.spd import Action, SPDEntry
from .config import ChildConfig, Connection
from .keys import ChildKeys, IkeKeys
from .message import Payload, TrafficSelector
from .proposal import Suite
from .protection import Protection
from .ts import to_selectors

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
_ids = itertools.count(1)

NAT_T_PORT = 4500
IKE_PORT = 500


def _until(when: float | None, now: float) -> int | None:
    """Whole seconds from ``now`` until ``when`` (0 when due; None: no such deadline), as
    swanctl --list-sas shows "rekeying in 3402s"."""
    if when is None or when != when:  # (not NaN: a deadline is a clock reading or None)
        return None
    return max(0, int(when - now + 0.5)) if when - now < 1e12 else None


@dataclass(frozen=True)
class Address:
    host: IPAddr
    port: int

    def __str__(self) -> str:
        h = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{h}:{self.port}"


class IkeState(enum.Enum):
    HALF_OPEN = "half-open"  # IKE_SA_INIT answered, IKE_AUTH not yet
    ESTABLISHED = "established"
    DELETING = "deleting"  # our DELETE is on its way
    REKEYED = "rekeyed"  # replaced by a new IKE SA: waits for its DELETE
    DEAD = "dead"


@dataclass(eq=False)
class ChildSA:
    """One CHILD SA: the ESP SA pair with its negotiated suite, keys and selectors."""

    config: ChildConfig
    suite: Suite
    spi_in: int  # ours: the peer sends with it
    spi_out: int  # the peer's
    keys: ChildKeys = field(repr=False)
    we_initiated: bool
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    created: float
    uid: int = field(default_factory=lambda: next(_ids))
    handle: object = field(default=None, repr=False)  # the adapter's (the engine tunnel)
    rekey_at: float | None = None  # when we rekey it (None: never, the peer does)
    # a rekey of this SA by the peer that crossed ours (§2.8.1): (new CHILD SA, its nonces)
    collided: tuple[ChildSA, bytes, bytes] | None = field(default=None, repr=False)
    rekeyed: bool = False  # replaced by a new CHILD SA: its DELETE is due
    # when the peer's rekey replaced it (we answered): the peer deletes it next, and if it has
    # not after REKEYED_GRACE, we do (its keys would live on, and our traffic stay on it)
    rekeyed_at: float | None = None
    # the CHILD SA the peer's rekey of this one made (until the peer deletes this one, ours
    # goes out here: the peer installs the successor when it reads our answer)
    successor: ChildSA | None = field(default=None, repr=False)
    # the adapter's: its inbound ESP SA's packet count at the last liveness look (None: never
    # looked; IkeEngine.esp_heard)
    esp_in_seen: int | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def sas(self, local: Address, remote: Address, encap: bool,
            label: str) -> tuple[SPDEntry, SecurityAssociation, SecurityAssociation]:  # fmt: skip
        """The policy and the (outbound, inbound) SAs to install, as manual keying makes
        them. ``encap``: ESP in UDP between ``local`` and ``remote``'s ports (RFC 3948)."""
        k = self.keys
        if self.we_initiated:
            out_e, out_i, in_e, in_i = k.enc_i, k.integ_i, k.enc_r, k.integ_r
        else:
            out_e, out_i, in_e, in_i = k.enc_r, k.integ_r, k.enc_i, k.integ_i
        sel = to_selectors(self.local_ts, self.remote_ts, label)
        cc = self.config
        # life_time, and the volume limits (0: none): life_* closes, rekey_* rekeys
        hard = Lifetime(seconds=cc.life_time or None, bytes=cc.life_bytes or None,
                        packets=cc.life_packets or None)  # fmt: skip
        soft = Lifetime(bytes=cc.rekey_bytes or None, packets=cc.rekey_packets or None)
        common = dict(
            enc=EncAlg(self.suite.encr),
            integ=IntegAlg(self.suite.integ or 0),
            esn=self.suite.esn,
            encap=UdpEncap(local.port, remote.port) if encap else None,
            selectors=sel,
            name=label,
            hard=hard,
            soft=soft,
            replay_window=cc.replay_window,
        )
        out = SecurityAssociation(self.spi_out, Direction.OUTBOUND, local.host, remote.host,
                                  enc_key=out_e, integ_key=out_i, **common)  # type: ignore[arg-type]
        inn = SecurityAssociation(self.spi_in, Direction.INBOUND, remote.host, local.host,
                                  enc_key=in_e, integ_key=in_i, **common)  # type: ignore[arg-type]
        return SPDEntry(sel, Action.PROTECT, name=label, static=False), out, inn


@dataclass
class Pending:
    """A request we sent and wait the answer for."""

    # "liveness" | "delete" | "delete-child" | "auth" | "rekey-child" | "rekey-ike"
    # | "address-update" | "mobike-update" | "rr-check" | "create-child"
    kind: str
    message_id: int
    messages: list[bytes] = field(repr=False)  # the request (its fragments, RFC 7383)
    sent: float
    tries: int = 1
    deadline: float = 0.0
    # a rekey in flight: the SA it replaces, our nonce, DH and new SPI
    old_child: ChildSA | None = None
    nonce: bytes = field(default=b"", repr=False)
    kx: object = field(default=None, repr=False)
    spi: bytes = b""
    # what was sealed, so that an RFC 6311 resync can send it again under a new message ID
    payloads: list[Payload] = field(default_factory=list, repr=False)
    exchange: int = 37  # INFORMATIONAL
    mid_sync: tuple[bytes, int, int] | None = None  # our RFC 6311 request: nonce, M1, P1
    # a liveness check probing message IDs after a take-over: the same request under more IDs
    alt: dict[int, list[bytes]] = field(default_factory=dict, repr=False)
    # our UPDATE_SA_ADDRESSES (RFC 4555 §3.5): the COOKIE2 the answer must echo, and the
    # address the update announced
    cookie2: bytes = field(default=b"", repr=False)
    moved_to: Address | None = None
    # our CREATE_CHILD_SA for a new CHILD SA (not a rekey): its configuration
    new_child: ChildConfig | None = field(default=None, repr=False)


# What the engine's deadline of an IKE SA (IkeEngine._deadline_of) is read from: setting one
# of these on an IKE SA the engine holds marks it for a fresh look by the engine's deadline
# heap (its ``timer_watch``), whoever sets it (the engine, the adapter making it quiet, a
# test). Changes inside its lists and its CHILD SAs are marked by the engine, which makes them
# only on the IKE SA it was called for or ticks (IkeEngine._touch).
TIMER_FIELDS = frozenset({
    "state", "we_initiated", "conn", "last_heard", "esp_at", "pending", "quiet", "rr_due",
    "queued_deletes", "children_wanted", "children_later", "rekey_at", "my_next_mid",
    "peer_next_mid", "children", "created", "redundant_until",
})
# What the engine's indexes of the IKE SAs it holds are read from (IkeEngine.by_spi, an
# _IkeTable: the IKE SAs per peer host, per connection name and identity, and the IKE SA whose
# crossed rekey made one): setting one of these on an IKE SA the engine holds files it again
# at once (its ``index_watch``), whoever sets it (NAT floating, MOBIKE, IKE_AUTH, a test)
INDEX_FIELDS = frozenset({"remote", "peer_id", "conn", "collided"})
_WATCHED = TIMER_FIELDS | INDEX_FIELDS


# slots: 1.1 KB less per IKE SA than a __dict__ (benchmarks/README.md), and a name nobody
# declared is an AttributeError, not a new field (mypy does not tell: __setattr__ below)
@dataclass(eq=False, slots=True)
class IkeSA:
    spi_i: bytes
    spi_r: bytes
    we_initiated: bool
    conn: Connection
    candidates: list[Connection]
    suite: Suite
    local: Address
    remote: Address
    created: float
    keys: IkeKeys = field(repr=False)
    nonce_i: bytes = field(repr=False)
    nonce_r: bytes = field(repr=False)
    # the IKE_SA_INIT request and response (up to [ike] max_packet each): signed by the AUTH
    # payloads of IKE_AUTH (RFC 7296 §2.15), and nothing else reads them (a rekey's IKE SA,
    # an IKE SA context and a replica have none), so the engine empties both once IKE_AUTH
    # is done, either way, in both roles; until then the responder also answers a
    # retransmitted IKE_SA_INIT with the response
    init_request: bytes = field(repr=False)
    init_response: bytes = field(repr=False)
    nat_local: bool = False  # we are (or pretend to be) behind a NAT
    nat_remote: bool = False
    state: IkeState = IkeState.HALF_OPEN
    peer_id: str = ""
    # how the peer authenticated ("psk" | "pubkey") when the IKE SA came from another gateway
    # (its context says; "" in a context of an older version); "": as ``conn.remote_auth``,
    # which an IKE SA negotiated here always matches
    peer_auth: str = ""
    # a peer that authenticated with a certificate: the names it proves besides its subject
    # DN (auth.cert_names: "dns:...", "email:...", "ip:...") and the SHA-256 of the CA of
    # ours that its chain led to; what a gateway that takes the IKE SA over checks its own
    # remote.id and remote.cacerts against (the certificate does not travel). () and b"":
    # not known (a PSK peer, or a context of an older version)
    peer_names: tuple[str, ...] = ()
    peer_ca: bytes = b""
    # and the serial of each certificate of its chain (leaf first) with the SHA-256 of the
    # certificate that issued it: what a gateway that takes the IKE SA over checks against
    # its own remote.crls (auth.chain_serials); (): not known (a PSK peer, an older context)
    peer_serials: tuple[tuple[bytes, int], ...] = ()
    peer_next_mid: int = 1  # the next request ID we expect from the peer
    # the answer to request peer_next_mid-1 (several messages when fragmented, RFC 7383)
    last_response: list[bytes] = field(default_factory=list, repr=False)
    # when a retransmission of that request was last answered to the IKE SA's address, and
    # to another one (MOBIKE: where it came from): at most one answer each per
    # engine.RETRANSMIT_ANSWER_GAP, so a captured request replayed is no amplifier. Local:
    # not in the IKE SA's context (a taker starts afresh)
    answered_home: float = float("-inf")
    # a peer's half-open IKE SA: how often a retransmitted IKE_SA_INIT got init_response again
    # (engine.INIT_ANSWERS at most)
    init_answers: int = 0
    answered_away: float = float("-inf")
    my_next_mid: int = 0  # the ID of our next request
    pending: Pending | None = None
    last_heard: float = 0.0
    # when a liveness check fell due and the peer's ESP had come in meanwhile (no check was
    # sent: IkeEngine.esp_heard); the next is due dpd_delay after the later of this and
    # last_heard. Local: not in the IKE SA's context
    esp_at: float = 0.0
    children: list[ChildSA] = field(default_factory=list)
    initial_contact: bool = False
    uid: int = field(default_factory=lambda: next(_ids))
    extensions: set[str] = field(default_factory=set)
    auth_child: tuple[ChildConfig, int] | None = None  # initiator: CHILD asked in IKE_AUTH
    rekey_at: float | None = None  # when we rekey the IKE SA (None: never)
    # Its CHILD SAs are being transferred to another gateway: start no exchange (rekeys and
    # liveness checks wait; the peer's requests are answered), so that its message IDs are
    # never used here and at the target both. Cleared if the transfer does not commit.
    quiet: bool = False
    # A request of the peer that would change the IKE SA or its CHILD SAs (CREATE_CHILD_SA,
    # an INFORMATIONAL with payloads: a DELETE, MOBIKE) that reached it while quiet: neither
    # processed nor answered here, but handed with the IKE SA to the gateway that takes it
    # (or processed here if the transfer does not commit). Message ID, the datagrams (one, or
    # every RFC 7383 fragment in order), from, to.
    held: tuple[int, list[bytes], Address, Address] | None = field(default=None, repr=False)
    queued_deletes: list[bytes] = field(default_factory=list)  # CHILD SPIs to delete next
    peer_hashes: tuple[int, ...] = ()  # RFC 7427 SIGNATURE_HASH_ALGORITHMS of the peer
    fragmentation: bool = False  # RFC 7383 negotiated
    # the peer sent a CERTREQ in IKE_SA_INIT or IKE_AUTH (send_cert = ifasked: our CERT goes
    # only then); set and read before the IKE SA is established, never moved with it
    certreq_seen: bool = False
    # CHILD SAs to create in this IKE SA once no exchange of ours is in flight (close_action,
    # a trap of a child the IKE SA has none of); not in its context: a taker does not owe them
    children_wanted: list[ChildConfig] = field(default_factory=list, repr=False)
    # CHILD SAs of ours in a row whose outbound SPI another tunnel here had (deleted, asked
    # again: IkeEngine._our_child_spi_taken); not in its context
    spi_taken_retries: int = 0
    # CHILD SAs of ours given up after SPI_TAKEN_RETRIES such answers in a row: asked for
    # again at a time of their own (IkeEngine: CHILD_RETRY, doubling to CHILD_RETRY_MAX per
    # round given up in a row, ``child_rounds``), with why they are not established (what
    # ``ipsecct sa list --ike`` shows); not in its context, as children_wanted
    children_later: list[tuple[ChildConfig, float, str]] = field(default_factory=list,
                                                                 repr=False)
    child_rounds: int = 0
    mobike: bool = False  # RFC 4555 negotiated (both sent MOBIKE_SUPPORTED in IKE_AUTH)
    # fragments of the request being received: message ID, total, first payload, parts
    fragments: tuple[int, int, int, dict[int, bytes]] | None = field(default=None, repr=False)
    # ... their datagrams as they came (fragment number -> datagram), and, once the last one
    # is in, all of them in order (what a quiet IKE SA holds: the whole set)
    fragment_data: dict[int, bytes] = field(default_factory=dict, repr=False)
    fragment_set: list[bytes] = field(default_factory=list, repr=False)
    # a rekey of this IKE SA by the peer that crossed ours (§2.8.2): (new IKE SA, nonces)
    collided: tuple[IkeSA, bytes, bytes] | None = field(default=None, repr=False)
    # the peer's IKE SA that lost such a collision to ours (rekeyed: the peer deletes it):
    # gone by this time if the peer never does (IkeEngine: REDUNDANT_GRACE)
    redundant_until: float | None = field(default=None, repr=False)
    # RFC 6311: the peer announced IKEV2_MESSAGE_ID_SYNC_SUPPORTED (and we answered it), and
    # IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED
    mid_sync: bool = False
    replay_sync: bool = False
    # after a take-over from a replica, without RFC 6311: accept the peer's next authenticated
    # request up to this many message IDs ahead of the replicated one (0: exact IDs only)
    resync_ahead: int = 0
    # ... and send our requests under the next message ID when one is not answered, this many
    # times at most (the peer drops a request whose ID is not the one it expects, silently)
    probe_ahead: int = 0
    probe_late: set[int] = field(default_factory=set)  # later probes still unanswered
    # taken over at another address (direct SG identity): tell the peer once the message IDs
    # agree (announce_move after the sync or the first answered probe)
    move_after_sync: bool = False
    # MOBIKE initiator (RFC 4555 §3.5): our own address changed while another exchange of
    # ours was in flight; UPDATE_SA_ADDRESSES goes once it is done (window of one)
    update_due: bool = False
    # why we are closing it (our DELETE in flight), for the IkeDown that follows its answer
    close_reason: str = ""
    # MOBIKE responder: the peer's UPDATE_SA_ADDRESSES moved the IKE SA, and its CHILD SAs
    # follow once the new address answers our COOKIE2 check (RFC 4555 §5.2)
    rr_due: bool = False
    # ... and until then, the address its CHILD SAs still send to (the last one verified):
    # a CHILD SA made meanwhile (the peer's rekey of one, right after its update, as
    # strongSwan does) sends there too. None: where the IKE SA is
    esp_remote: Address | None = None
    # RFC 4555's "original initiator" (who sends UPDATE_SA_ADDRESSES) when a rekey by the
    # peer made it differ from who initiated this IKE SA (§2.18); None: as ``we_initiated``
    orig_initiator: bool | None = None
    sync_nonce: bytes = b""  # the last RFC 6311 sync request's nonce (a retransmission's too)
    # came from another gateway with a request of ours in flight, under the ID its context
    # gives as our next: the peer may have answered that ID (item 31 of the context)
    inflight_at_export: bool = False
    # made by the peer's rekey of this IKE SA: until the peer deletes it (or REKEYED_GRACE
    # ends it), this one is not rekeyed again (a chain of undeleted IKE SAs has no end)
    replaced: IkeSA | None = field(default=None, repr=False)
    # virtual IPs (RFC 7296 §3.15): as responder, those leased to the peer, with the name of
    # the pool each came from; as initiator, those the peer gave us (pool name "")
    vips: list[tuple[str, IPAddr]] = field(default_factory=list)
    # The engine's bookkeeping for its timers (IkeEngine: a heap of deadlines): the set of
    # IKE SAs whose deadline it computes again at its next look (None: in no engine), the
    # deadline of this IKE SA's entry in the heap and the entry's number (0: none), and the
    # place of the IKE SA in the engine's table (tick() visits the due ones in that order)
    timer_watch: set[IkeSA] | None = field(default=None, init=False, repr=False)
    timer_at: float | None = field(default=None, init=False, repr=False)
    timer_seq: int = field(default=0, init=False, repr=False)
    timer_order: int = field(default=0, init=False, repr=False)
    # ... and for its indexes: what files this IKE SA again when an INDEX_FIELDS one is set
    # (None: in no engine; the engine's own check tells whether it holds this one)
    index_watch: Callable[[IkeSA], None] | None = field(default=None, init=False, repr=False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in _WATCHED:
            # (getattr: a slot not yet set while __init__ or copy.copy fills the others)
            if name in TIMER_FIELDS:
                watch = getattr(self, "timer_watch", None)
                if watch is not None:
                    watch.add(self)
            if name in INDEX_FIELDS:
                refile = getattr(self, "index_watch", None)
                if refile is not None:
                    refile(self)

    @property
    def child_remote(self) -> Address:
        """Where the CHILD SAs send: the IKE SA's peer, or while a MOBIKE update of the peer
        waits for its return-routability check, the address verified before it."""
        return self.remote if self.esp_remote is None else self.esp_remote

    @property
    def mobike_initiator(self) -> bool:
        """Are we the original initiator of the first IKE SA of this chain of rekeys (the
        side that announces its moves with UPDATE_SA_ADDRESSES, RFC 4555 §3.5)? strongSwan
        keeps this role across rekeys, whoever rekeyed."""
        return self.we_initiated if self.orig_initiator is None else self.orig_initiator

    @property
    def vips_given(self) -> bool:
        """Are ``vips`` addresses the peer gave us (we sent the first IKE_AUTH, with its
        CFG_REQUEST), not leases of our pools? An IKE rekey by the peer makes it the new
        IKE SA's initiator (``we_initiated``), but the leases stay whose they were."""
        return self.mobike_initiator

    @property
    def our_spi(self) -> bytes:
        return self.spi_i if self.we_initiated else self.spi_r

    @property
    def inbound(self) -> Protection:
        k = self.keys
        if self.we_initiated:
            return Protection(self.suite, k.sk_er, k.sk_ar)
        return Protection(self.suite, k.sk_ei, k.sk_ai)

    @property
    def outbound(self) -> Protection:
        k = self.keys
        if self.we_initiated:
            return Protection(self.suite, k.sk_ei, k.sk_ai)
        return Protection(self.suite, k.sk_er, k.sk_ar)

    @property
    def encap(self) -> bool:
        """ESP in UDP: a NAT was detected (or faked), or IKE moved to port 4500."""
        return self.nat_local or self.nat_remote or self.remote.port != IKE_PORT

    def has_or_asks(self, cc: ChildConfig) -> bool:
        """Does this IKE SA hold a CHILD SA of ``cc``, or ask for one (queued, or its
        CREATE_CHILD_SA in flight)? (A trap or a start_action = start child asks for one only
        when not.)"""
        return (any(c.config is cc for c in self.children)
                or any(w is cc for w in self.children_wanted)
                or any(w is cc for w, _, _ in self.children_later)
                or (self.pending is not None and self.pending.new_child is cc))  # fmt: skip

    def describe(self) -> str:
        return f"{self.conn.name}[{self.uid}] {self.local} <-> {self.remote}"

    def local_id_text(self) -> str:
        """Our identity as the peer sees it: local.id as sent (``@gw.example``: gw.example),
        else our certificate's subject DN (local.auth = pubkey) or our address."""
        conn = self.conn
        lid = conn.local_id
        if lid is not None and not lid.any:
            return lid.text if lid.is_dn else lid.payload(False).text()
        creds = conn.credentials
        if conn.local_auth == "pubkey" and creds is not None and creds.certs:
            return creds.certs[0].subject.rfc4514_string()
        return str(self.local.host)

    def summary(self, now: float, ends_at: float | None = None) -> dict[str, object]:
        """What ``ipsecct sa list`` shows (never keys). ``ends_at``: when the IKE SA ends
        unless something happens first (the engine's: IkeEngine.ends_at)."""
        return {
            "name": self.conn.name,
            "uid": self.uid,
            "state": self.state.value,
            "role": "initiator" if self.we_initiated else "responder",
            "spi_i": self.spi_i.hex(),
            "spi_r": self.spi_r.hex(),
            "local": str(self.local),
            "remote": str(self.remote),
            "local_id": self.local_id_text(),
            "remote_id": self.peer_id,
            "proposal": self.suite.name(),
            "algorithms": self.suite.listing(),  # swanctl --list-sas's spelling
            "nat": {"local": self.nat_local, "remote": self.nat_remote},
            "mobike": self.mobike,
            # swanctl --list-sas: "remote ... virtual IP" / "local ... virtual IP"
            ("local_vips" if self.vips_given else "remote_vips"): [
                str(a) for _, a in self.vips
            ],
            "established_s": round(now - self.created, 1),
            # swanctl --list-sas: "rekeying in ..." (None: we do not rekey it, the peer may)
            "rekey_in_s": _until(self.rekey_at, now),
            # swanctl --list-sas: "reauth in ..." (None: reauth_time is not supported, the IKE
            # SA is rekeyed) and "expires in ..." (a half-open or rekeyed IKE SA's end)
            "reauth_in_s": None,
            "expires_in_s": _until(ends_at, now),
            # ESP and IKE in UDP on port 4500 (RFC 3948; a NAT found, faked, or floated)
            "encap": self.encap,
            "message_ids": {"next_request": self.my_next_mid, "next_expected": self.peer_next_mid},
            "children": [
                {
                    "name": c.name,
                    "uid": c.uid,
                    "spi_in": f"{c.spi_in:08x}",
                    "spi_out": f"{c.spi_out:08x}",
                    "proposal": c.suite.name(),
                    "algorithms": c.suite.listing(),
                    "local_ts": [str(t) for t in c.local_ts],
                    "remote_ts": [str(t) for t in c.remote_ts],
                    "installed_s": round(now - c.created, 1),
                    "installed": c.handle is not None,
                    # ESP in UDP (RFC 3948): swanctl's TUNNEL-in-UDP
                    "encap": self.encap,
                    "rekey_in_s": _until(c.rekey_at, now),
                    # children.*.life_time: its ESP SAs' hard lifetime (None: none)
                    "expires_in_s": _until(
                        c.created + c.config.life_time if c.config.life_time else None, now),
                }
                for c in self.children
            ],
            # CHILD SAs of ours not established, and when they are asked for again
            "children_not_established": [
                {"name": cc.name, "reason": why, "retry_in_s": _until(at, now)}
                for cc, at, why in self.children_later
            ],
        }

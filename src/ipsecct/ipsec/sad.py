"""The Security Association Database (RFC 4301 §4.4.2) and its entries.

A :class:`SecurityAssociation` holds every field the draft's §8 lists, the lookup fields
(outer destination, protocol, SPI) and the treatment fields (sequence number and its overflow
flag, anti-replay window, algorithms and keys, IV state, lifetimes, mode, path MTU), plus what
RFC 4301 §4.4.2.1 adds (ESN, tunnel header addresses, DSCP and DF handling, PMTU aging) and
the runtime counters. Key material is kept out of ``repr``.

The SAD indexes SAs by (outer destination address, protocol, SPI): the domain in which SPIs
collide (RFC 4301 §4.1, draft §8).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import AlgorithmError, SAError, SPICollisionError
from .algorithms import ENC, EncAlg, IntegAlg, check_integ_key
from .ippacket import IPAddress
from .replay import ReplayWindow
from .spd import Selectors
from .transforms import EspTransform, make_transform

MAX_SEQ_32 = 0xFFFFFFFF
MAX_SEQ_64 = 0xFFFFFFFFFFFFFFFF


class Protocol(enum.IntEnum):
    ESP = 50
    AH = 51


class Mode(enum.Enum):
    TUNNEL = "tunnel"
    TRANSPORT = "transport"


class Direction(enum.Enum):
    INBOUND = "in"
    OUTBOUND = "out"


class DfPolicy(enum.Enum):
    """RFC 4301 §8.1: what the outer header's DF bit is in tunnel mode."""

    COPY = "copy"
    CLEAR = "clear"
    SET = "set"


class IVMode(enum.Enum):
    """How the SA makes IVs (the draft's "IV mode"): from the sequence number or at random."""

    SEQUENCE = "sequence"
    RANDOM = "random"
    NONE = "none"


@dataclass(frozen=True)
class Lifetime:
    """A limit by time (seconds since the SA was added), bytes or packets; None: no limit."""

    seconds: float | None = None
    bytes: int | None = None
    packets: int | None = None

    def exceeded(self, age: float, nbytes: int, npackets: int) -> bool:
        return (
            (self.seconds is not None and age >= self.seconds)
            or (self.bytes is not None and nbytes >= self.bytes)
            or (self.packets is not None and npackets >= self.packets)
        )

    @property
    def unlimited(self) -> bool:
        return self.seconds is None and self.bytes is None and self.packets is None


@dataclass(frozen=True)
class UdpEncap:
    """RFC 3948 UDP encapsulation ports (4500 both ways by default)."""

    sport: int = 4500
    dport: int = 4500


@dataclass(slots=True)
class Counters:
    packets: int = 0
    bytes: int = 0


# Every packet counted on any SA by the Python path (the native path counts its own:
# ipsecct.ipsec.native.activity()): fail-over replication skips its sweep of idle tunnels
# while neither moved (ct/failover.py, Replicator._candidates).
PACKETS = [0]
# And which SAs (the Python path's touched set; the native path keeps its own list:
# ipsecct.ipsec.native.take_touched()): every SA that counted a packet since the set was
# last taken, so that replication visits only their tunnels. Bounded: an SA that finds it
# full sets TOUCHED_OVERFLOW instead (the taker then walks every tunnel).
TOUCHED: set[SecurityAssociation] = set()
TOUCHED_MAX = 16384
TOUCHED_OVERFLOW = [False]


class SAEvent(enum.Enum):
    SOFT_EXPIRED = "soft-expired"
    HARD_EXPIRED = "hard-expired"
    SEQ_EXHAUSTED = "seq-exhausted"  # the outbound counter hit its limit: rekey
    SEQ_NEAR_LIMIT = "seq-near-limit"  # past 7/8 of the counter: rekey soon
    SEQ_RESERVE = "seq-reserve"  # past the low-water mark: make the next block durable


@dataclass(eq=False, slots=True, weakref_slot=True)
class SecurityAssociation:
    """One SAD entry. ``seq`` is the last outbound sequence number sent (outbound SAs); the
    replay window holds the inbound state.

    Durable reservations (:mod:`ipsecct.ipsec.sequence`) bound the outbound counter with two
    plain integers that every data path (this one, a native one) must honour:

    - ``seq_ceiling``: the highest sequence number that may be sent, because a reservation up
      to it is on stable storage. A packet that would need a number above it is not sent (it is
      dropped and counted as ``seq_unreserved``), so that a crash and restart never send a
      number twice. ``MAX_SEQ_64`` (the default) means no reservation is in force.
    - ``seq_low_water``: from this number on, ask for the next block (once: the
      ``seq_reserve_pending`` flag is set and a ``SEQ_RESERVE`` event is queued); always at or
      below ``seq_ceiling``.

    (The fail-over fence, :attr:`ipsecct.ipsec.engine.Tunnel.seq_ceiling`, is another bound,
    kept per tunnel by the engine; a packet is sent only below both.)
    """

    # The SA's object in the native data path (ipsecct.ipsec.native), made on first use.
    # First, so that it is set before ``seq`` and ``counters``, which read it.
    native: Any = field(init=False, repr=False, compare=False, default=None)
    spi: int
    direction: Direction
    src: IPAddress  # outer (tunnel header) source
    dst: IPAddress  # outer destination: with protocol and SPI, the lookup key
    protocol: Protocol = Protocol.ESP
    mode: Mode = Mode.TUNNEL
    enc: EncAlg = EncAlg.AES_GCM_16
    enc_key: bytes = field(default=b"", repr=False)
    integ: IntegAlg = IntegAlg.NONE
    integ_key: bytes = field(default=b"", repr=False)
    esn: bool = False
    replay_window: int = 64
    seq: int = 0
    seq_ceiling: int = MAX_SEQ_64
    seq_low_water: int = MAX_SEQ_64
    seq_reserve_pending: bool = False
    overflow_permitted: bool = False  # the draft's "sequence number overflow flag"
    soft: Lifetime = field(default_factory=Lifetime)
    hard: Lifetime = field(default_factory=Lifetime)
    path_mtu: int = 1500
    pmtu_expires: float | None = None  # PMTU aging: when the learnt PMTU reverts
    df: DfPolicy = DfPolicy.COPY
    copy_dscp: bool = True  # bypass DSCP: copy the inner DSCP to the outer header
    encap: UdpEncap | None = None
    selectors: Selectors | None = None
    name: str = ""
    created: float = 0.0
    counters: Counters = field(default_factory=Counters)
    soft_fired: bool = False
    dead: bool = False
    rekey_requested: bool = False
    # Only for decrypting a capture offline (pcap decrypt): allows encryption-only ESP (AES-CBC
    # with no integrity). The SAD refuses such an SA; no configuration or context sets it.
    decrypt_only: bool = False
    events: list[SAEvent] = field(default_factory=list, repr=False)
    _limits_unset: bool = field(init=False, repr=False, default=True)
    _window: ReplayWindow = field(init=False, repr=False)
    _transform: EspTransform | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        # (A context decoded in C, ipsecct.ct._cdb.decode, is made without this: its reader
        # checks what is checked here and fills the slots, the transform's and the window's
        # too. tests/test_context_fast.py compares its SAs with the ones made here.)
        if not 256 <= self.spi <= 0xFFFFFFFF:
            raise SAError(f"SPI {self.spi} is reserved (1-255) or out of range")
        src, dst = self.src, self.dst
        if type(src) is not type(dst) and src.version != dst.version:
            raise SAError("SA source and destination mix IPv4 and IPv6")
        if not 68 <= self.path_mtu <= 65535:
            raise SAError(f"path MTU {self.path_mtu} out of range 68-65535")
        limit = MAX_SEQ_64 if self.esn else MAX_SEQ_32
        if not 0 <= self.seq <= limit:
            raise SAError("sequence number out of range")
        if self.protocol is Protocol.ESP:
            # make_transform checks the algorithms and key lengths (check_esp_combination)
            self._transform = make_transform(
                self.enc,
                self.enc_key,
                self.integ,
                self.integ_key,
                encryption_only_ok=self.decrypt_only,
            )
        else:
            if self.enc is not EncAlg.NULL or self.enc_key:
                raise AlgorithmError("an AH SA has no encryption algorithm (use enc = null)")
            if self.integ is IntegAlg.NONE:
                raise AlgorithmError("an AH SA needs an integrity algorithm")
            check_integ_key(self.integ, len(self.integ_key))
        self._window = ReplayWindow(self.replay_window, esn=self.esn)
        self._limits_unset = self.soft.unlimited and self.hard.unlimited

    # -- derived --------------------------------------------------------------------------
    @property
    def transform(self) -> EspTransform:
        assert self._transform is not None, "AH SAs have no ESP transform"
        return self._transform

    @property
    def window(self) -> ReplayWindow:
        c = self.native
        if c is not None and c.active and self.direction is Direction.INBOUND:
            # the native path owns it: copy its exact state
            top, blocks = c.window()
            self._window.top = top
            self._window._blocks = blocks
        return self._window

    @property
    def key(self) -> tuple[IPAddress, Protocol, int]:
        return (self.dst, self.protocol, self.spi)

    @property
    def aead(self) -> bool:
        return self.protocol is Protocol.ESP and ENC[self.enc].aead

    @property
    def seq_iv(self) -> bool:
        """The IV is the sequence number (AES-GCM, ChaCha20-Poly1305, AES-CTR): a number sent
        twice under the key repeats a nonce, a keystream."""
        return self.protocol is Protocol.ESP and ENC[self.enc].seq_iv

    @property
    def iv_mode(self) -> IVMode:
        if self.protocol is Protocol.AH or self.enc is EncAlg.NULL:
            return IVMode.NONE
        return IVMode.SEQUENCE if self.seq_iv else IVMode.RANDOM

    @property
    def seq_limit(self) -> int:
        return MAX_SEQ_64 if self.esn else MAX_SEQ_32

    # -- outbound sequence numbers ---------------------------------------------------------
    def next_seq(self) -> int | None:
        """Allocate the next outbound sequence number, or None when the counter is exhausted.

        The counter never wraps for the transforms whose IV is the sequence number, whatever
        the overflow flag says: a wrapped counter repeats IVs, which breaks AES-GCM,
        ChaCha20-Poly1305 and AES-CTR outright. For the other transforms a set overflow flag
        lets the 32-bit counter roll over (RFC 4301 §4.4.2.1).
        """
        seq = self.seq
        if seq >= self.seq_limit:
            if self.overflow_permitted and not self.seq_iv and not self.esn:
                self.seq = 1
                return 1
            return None
        if seq >= self.seq_ceiling:
            return None  # not durably reserved yet: see seq_unavailable()
        seq += 1
        self.seq = seq
        if seq == self._near_limit:
            self.events.append(SAEvent.SEQ_NEAR_LIMIT)
        if seq >= self.seq_low_water and not self.seq_reserve_pending:
            self.seq_reserve_pending = True
            self.events.append(SAEvent.SEQ_RESERVE)
        return seq

    def seq_unavailable(self) -> bool:
        """After :meth:`next_seq` returned None: True when the counter is exhausted (a rekey
        is requested), False when only the reservation ceiling stops it (the next block is
        requested; the packet waits for no one and is dropped by the caller)."""
        if self.seq < self.seq_limit and self.seq >= self.seq_ceiling:
            if not self.seq_reserve_pending:
                self.seq_reserve_pending = True
                self.events.append(SAEvent.SEQ_RESERVE)
            return False
        if not self.rekey_requested:
            self.rekey_requested = True
            self.events.append(SAEvent.SEQ_EXHAUSTED)
        return True

    @property
    def _near_limit(self) -> int:
        return self.seq_limit - (self.seq_limit >> 3)

    def advance_seq(self, delta: int) -> int:
        """Move the outbound counter ``delta`` forward (never backwards, never past the
        limit), as a peer's RFC 6311 replay-counter sync asks; the events a packet-by-packet
        advance would have queued are queued (near the limit: rekey; past the reservation:
        the next block). Returns the new value."""
        old = self.seq
        new = min(old + max(delta, 0), self.seq_limit)
        if new <= old:
            return old
        self.seq = new
        if old < self._near_limit <= new:
            self.events.append(SAEvent.SEQ_NEAR_LIMIT)
        if new >= self.seq_low_water and not self.seq_reserve_pending:
            self.seq_reserve_pending = True
            self.events.append(SAEvent.SEQ_RESERVE)
        return new

    # -- lifetimes -------------------------------------------------------------------------
    def account(self, nbytes: int, now: float) -> None:
        """Count one packet; queue the lifetime events it triggers (each fires once) on
        ``self.events`` for the caller to drain."""
        c = self.counters
        c.packets += 1
        PACKETS[0] += 1
        if len(TOUCHED) < TOUCHED_MAX:
            TOUCHED.add(self)
        elif self not in TOUCHED:
            TOUCHED_OVERFLOW[0] = True
        c.bytes += nbytes
        if not self._limits_unset:
            self._check_limits(now)

    def _check_limits(self, now: float) -> None:
        c = self.counters
        age = now - self.created
        if not self.soft_fired and self.soft.exceeded(age, c.bytes, c.packets):
            self.soft_fired = True
            self.events.append(SAEvent.SOFT_EXPIRED)
        if not self.dead and self.hard.exceeded(age, c.bytes, c.packets):
            self.dead = True
            self.events.append(SAEvent.HARD_EXPIRED)

    def poll(self, now: float) -> None:
        """Fire time-based lifetime events without a packet (call from a timer)."""
        if not self._limits_unset:
            self._check_limits(now)

    def expired(self, now: float) -> bool:
        """Is the SA past its hard lifetime (checked before using it)?"""
        if self.dead:
            return True
        if self.hard.seconds is not None and now - self.created >= self.hard.seconds:
            self.dead = True
            self.events.append(SAEvent.HARD_EXPIRED)
        return self.dead

    def effective_mtu(self, now: float, default: int = 1500) -> int:
        if self.pmtu_expires is not None and now >= self.pmtu_expires:
            self.path_mtu = default
            self.pmtu_expires = None
        return self.path_mtu

    def describe(self) -> str:
        return (
            f"SA 0x{self.spi:08x} {self.direction.value} {self.protocol.name} {self.mode.value} "
            f"{self.src} -> {self.dst}"
        )


# The slot descriptors of SecurityAssociation's fields, kept before install_read_through()
# puts properties in front of ``seq`` and ``counters``: what they read and write, and what
# context's C decoder (ipsecct.ct._cdb) fills a decoded SA's slots with.
SLOTS: dict[str, Any] = {
    k: v for k, v in vars(SecurityAssociation).items() if isinstance(v, types.MemberDescriptorType)
}


def install_read_through(native: Any = None) -> None:
    """While the native data path owns an SA (``sa.native.active``), its C object holds the
    exact outbound sequence number and counters: ``seq`` and ``counters`` read them there, so
    that nothing (``sa show``, a context snapshot, fail-over replication) can see an older
    sequence number than the one last sent. A ``seq`` written meanwhile goes to both.

    Installed by :mod:`ipsecct.ipsec.native` when the extension is there (the pure-Python
    path keeps plain attributes, which its per-packet code reads faster). ``native``: the
    extension, whose ``read_through`` makes the same two descriptors in C (a bulk transfer
    reads ``seq`` about a dozen times per SA, each a Python call through a property); the
    properties below are what they do (and what runs without one)."""
    if not isinstance(vars(SecurityAssociation)["seq"], types.MemberDescriptorType):
        return
    make = getattr(native, "read_through", None)
    for name, prop in zip(("seq", "counters"), read_through_properties(), strict=True):
        made = prop if make is None else make(name, SLOTS[name], SLOTS["native"])
        setattr(SecurityAssociation, name, made)


def read_through_properties() -> tuple[property, property]:
    """``seq`` and ``counters`` read through the native path, as Python properties (the
    reference of the extension's descriptors: tests/test_native.py holds them alike)."""
    seq_slot = SLOTS["seq"]  # the dataclass's slot descriptors
    counters_slot = SLOTS["counters"]
    read_seq = seq_slot.__get__

    def get_seq(self: SecurityAssociation) -> int:
        c = self.native
        if c is not None and c.active:
            return int(c.seq)
        seq: int = read_seq(self, SecurityAssociation)
        return seq

    def set_seq(self: SecurityAssociation, value: int) -> None:
        c = self.native
        if c is not None and c.active:
            c.seq = value
        seq_slot.__set__(self, value)

    def get_counters(self: SecurityAssociation) -> Counters:
        cnt: Counters = counters_slot.__get__(self, SecurityAssociation)
        c = self.native
        if c is not None and c.active:
            cnt.packets = c.packets
            cnt.bytes = c.bytes
        return cnt

    def set_counters(self: SecurityAssociation, value: Counters) -> None:
        c = self.native
        if c is not None and c.active:
            c.packets = value.packets
            c.bytes = value.bytes
        counters_slot.__set__(self, value)

    return property(get_seq, set_seq), property(get_counters, set_counters)


_V4 = ipaddress.IPv4Address
_ESP, _AH, _OUT = Protocol.ESP, Protocol.AH, Direction.OUTBOUND


class SAD:
    """SAs indexed by (outer destination, protocol, SPI).

    An IPv4 destination is keyed by its integer (``_ip``, a plain attribute), not by the
    address object: ``IPv4Address.__hash__`` runs in Python (``hash(hex(int(self)))``), about
    2,000 instructions a key, and a bulk transfer adds, looks up and removes thousands. An
    integer never equals an IPv6 address, which stays the key of an IPv6 destination (with its
    scope), so keys of the two families cannot meet."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[int | IPAddress, Protocol, int], SecurityAssociation] = {}
        self._by_spi: dict[tuple[Protocol, int], list[SecurityAssociation]] = {}
        # The SAs of each encryption key whose IV is the sequence number, by a keyed hash of
        # the key (never the key): built on the first users_of_key() (sa add) and kept in
        # step with every add and remove from then on, so bulk adds stay linear.
        self._by_fp: dict[bytes, list[SecurityAssociation]] | None = None
        self._fp_of: dict[int, bytes] = {}  # id(SA) -> its key's hash (one hash per SA)
        self._fp_key = b""

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[SecurityAssociation]:
        return iter(list(self._by_key.values()))

    # Each key is hashed once per call: an address's hash is computed in Python (about a
    # microsecond for the key), and a bulk transfer adds and removes thousands of SAs.
    def add(self, sa: SecurityAssociation) -> None:
        if sa.decrypt_only:
            raise SAError("a decrypt-only SA (for captures) cannot carry traffic")
        by_key = self._by_key
        n = len(by_key)
        dst = sa.dst
        key = (dst._ip if type(dst) is _V4 else dst, sa.protocol, sa.spi)  # type: ignore[attr-defined]
        if by_key.setdefault(key, sa) is not sa or len(by_key) == n:
            raise SPICollisionError(
                f"SPI 0x{sa.spi:08x} is already in use for {sa.protocol.name} to {sa.dst}"
            )
        self._by_spi.setdefault((sa.protocol, sa.spi), []).append(sa)
        if self._by_fp is not None and sa.seq_iv:
            fp = self._fp_of[id(sa)] = self._fingerprint(sa)
            self._by_fp.setdefault(fp, []).append(sa)

    def remove(self, sa: SecurityAssociation) -> None:
        if not self.discard(sa):
            raise SAError(f"{sa.describe()} is not in the SAD")

    def discard(self, sa: SecurityAssociation) -> bool:
        """Remove this very SA if it is in the SAD (not another under its key): whether it
        was."""
        dst = sa.dst
        key = (dst._ip if type(dst) is _V4 else dst, sa.protocol, sa.spi)  # type: ignore[attr-defined]
        cur = self._by_key.pop(key, None)
        if cur is not sa:
            if cur is not None:
                self._by_key[key] = cur  # another SA under that key: it stays
            return False
        skey = (sa.protocol, sa.spi)
        lst = self._by_spi[skey]
        lst.remove(sa)
        if not lst:
            del self._by_spi[skey]
        if self._by_fp is not None:
            fp = self._fp_of.pop(id(sa), None)
            if fp is not None:
                users = self._by_fp[fp]
                for i, o in enumerate(users):
                    if o is sa:  # (by identity)
                        del users[i]
                        break
                if not users:
                    del self._by_fp[fp]
        return True

    def _fingerprint(self, sa: SecurityAssociation) -> bytes:
        return hashlib.blake2b(sa.enc_key, key=self._fp_key, digest_size=16).digest()

    def users_of_key(self, sa: SecurityAssociation) -> list[SecurityAssociation]:
        """The SAs here (``sa`` itself left out) under ``sa``'s encryption key, when its IV
        is the sequence number (AES-GCM, ChaCha20-Poly1305, AES-CTR; ``sa.seq_iv``): an
        outbound and an inbound SA under one such key have this gateway and its peer both
        sending sequence numbers 1, 2, ... under it, each nonce twice. Empty for other
        ciphers. The index (a keyed hash of each key, the hash key random per process) is
        built on the first call, then kept with every add and remove."""
        if not sa.seq_iv:
            return []
        if self._by_fp is None:
            self._fp_key = os.urandom(32)
            by_fp: dict[bytes, list[SecurityAssociation]] = {}
            for other in self._by_key.values():
                if other.seq_iv:
                    fp = self._fp_of[id(other)] = self._fingerprint(other)
                    by_fp.setdefault(fp, []).append(other)
            self._by_fp = by_fp
        return [o for o in self._by_fp.get(self._fingerprint(sa), []) if o is not sa]

    def lookup(self, dst: IPAddress, protocol: Protocol, spi: int) -> SecurityAssociation | None:
        ip = dst._ip if type(dst) is _V4 else dst  # type: ignore[attr-defined]
        return self._by_key.get((ip, protocol, spi))

    def lookup_spi(self, protocol: Protocol, spi: int) -> SecurityAssociation | None:
        """Lookup by SPI alone, allowed for unicast SAs (RFC 4301 §4.1); used behind NAT."""
        lst = self._by_spi.get((protocol, spi))
        if lst and len(lst) == 1:
            return lst[0]
        return None

    def by_spi(self, spi: int) -> list[SecurityAssociation]:
        """Every SA with this SPI, ESP and AH."""
        return self._by_spi.get((Protocol.ESP, spi), []) + self._by_spi.get((Protocol.AH, spi), [])

    def outbound_with_spi(self, spi: int) -> SecurityAssociation | None:
        """An outbound SA with this SPI (ESP or AH), to any destination (asked for every
        tunnel a transfer installs: no list made)."""
        get = self._by_spi.get
        for lst in (get((_ESP, spi)), get((_AH, spi))):
            if lst:
                for sa in lst:
                    if sa.direction is _OUT:
                        return sa
        return None

    def in_use(self, dst: IPAddress, protocol: Protocol, spi: int) -> bool:
        ip = dst._ip if type(dst) is _V4 else dst  # type: ignore[attr-defined]
        return (ip, protocol, spi) in self._by_key

    def free_spi(self, dst: IPAddress, protocol: Protocol, candidates: Iterator[int]) -> int:
        """The first candidate SPI not in use for (dst, protocol)."""
        for spi in candidates:
            if 256 <= spi <= 0xFFFFFFFF and not self.in_use(dst, protocol, spi):
                return spi
        raise SAError("no free SPI among the candidates")

"""The IPsec feature context (draft §8) of one SA as a CXTP Context Data Block (RFC 4067 §2.4).

A CDB is ``FPT(16) | Length(8) | P(1) | Rsvd(7) | [Presence Vector(32)] | Data | padding``:
Length counts 8-octet units including the 4-octet header, so a CDB is at most 2040 octets, and
the block is zero-padded to a multiple of 8 octets. The data starts with a format version octet
and a fixed part (protocol, flags, SPI, outer addresses); every other field is optional and
present only when its bit in the presence vector is set. A clear bit means the field's default
(no selectors, no lifetime limit, path MTU 1500, ...), so fields that do not apply to the SA are
omitted as the draft allows. The layout is documented in ``docs/context-format.md``.

Decoding is for untrusted input. It is bounded (one CDB is at most 2040 octets), strict (every
reserved bit, padding octet and unknown value is an error) and canonical: a value equal to its
default may not be sent as present, so any bytes that decode re-encode to exactly the same bytes.
Two decoders accept exactly the same bytes: a fast one-pass reader that checks the canonical form
field by field as it reads (:func:`decode`), and the reference (:func:`decode_reference`), which
re-encodes what it parsed and compares; a differential test holds them together. Every malformed
input raises :class:`~ipsecct.errors.ContextError`; no message contains key material.

Times travel as durations, never as clock readings: the SA's age, the lifetimes' time limits and
the time left until a learnt PMTU expires, in milliseconds. The target rebuilds
``created = now - age`` with its own ``now``. The JSON form (:func:`to_json`, :func:`from_json`)
holds the same fields with readable names; it is what ``ipsecct context`` reads and prints.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import struct
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, TypeVar

from ..errors import AlgorithmError, ContextError, SAError
from ..ipsec.algorithms import (
    ENC,
    ENC_NAMES,
    INTEG,
    INTEG_NAMES,
    EncAlg,
    IntegAlg,
    enc_from_number,
    enc_name,
    integ_from_number,
    integ_name,
)
from ..ipsec.ippacket import IPAddress
from ..ipsec.replay import ReplayWindow
from ..ipsec.sad import (
    MAX_SEQ_64,
    Counters,
    DfPolicy,
    Direction,
    Lifetime,
    Mode,
    Protocol,
    SecurityAssociation,
    UdpEncap,
)
from ..ipsec.sad import SLOTS as SA_SLOTS
from ..ipsec.spd import PROTO_ANY, AddressRange, PortRange, Selectors
from ..ipsec.transforms import AeadTransform, make_transform

# Not assigned by IANA: the "Context Transfer Profile Type" registry (Expert Review) holds only
# 0x00 (reserved) and 0x01. 0x8001 sits far above the values IANA hands out in sequence, so it
# cannot collide with a future assignment soon, and the high bit marks it as a local choice.
FPT_IPSEC_SA = 0x8001
VERSION = 1

CDB_UNIT = 8
CDB_MAX = 255 * CDB_UNIT  # the 8-bit Length field counts 8-octet units: 2040 octets
HEADER_LEN = 4
PV_LEN = 4
MAX_DURATION_MS = (1 << 42) - 1  # about 139 years: keeps every duration exact as a float
MAX_U64 = (1 << 64) - 1
MAX_TEXT = 255  # octets of UTF-8 in a name, octets in a security label
MAX_RANGES = 255  # address ranges per selector list
DEFAULT_WINDOW = 64
DEFAULT_PMTU = 1500

_A = TypeVar("_A", EncAlg, IntegAlg)
_T = TypeVar("_T")


class Bit(enum.IntEnum):
    """Presence-vector bits. Bit 0 is the most significant bit of the 32-bit vector (IETF bit
    numbering); present fields follow the fixed part in increasing bit order."""

    ESP_ENC = 0  # ESP encryption transform and key (required on ESP, forbidden on AH)
    ESP_INTEG = 1  # ESP integrity transform and key (absent: none, an AEAD transform)
    AH_INTEG = 2  # AH integrity transform and key (required on AH, forbidden on ESP)
    SEQ = 3  # outbound sequence number (outbound SAs only; absent: 0)
    WINDOW = 4  # anti-replay window size (absent: 64)
    REPLAY = 5  # anti-replay state: top and bitmap (inbound SAs only; absent: nothing received)
    AGE = 6  # milliseconds since the SA was created (absent: 0)
    BYTES = 7  # octets processed (absent: 0)
    PACKETS = 8  # packets processed (absent: 0)
    SOFT_TIME = 9  # soft lifetime in milliseconds (absent: no limit)
    SOFT_BYTES = 10
    SOFT_PACKETS = 11
    HARD_TIME = 12
    HARD_BYTES = 13
    HARD_PACKETS = 14
    PMTU = 15  # path MTU (absent: 1500)
    PMTU_EXPIRY = 16  # milliseconds until the learnt PMTU reverts (absent: it does not)
    UDP_ENCAP = 17  # RFC 3948 source and destination ports (absent: no UDP encapsulation)
    SELECTORS = 18  # local and remote address ranges (absent: no selectors)
    SEL_PROTOCOL = 19  # next-layer protocol (absent: ANY)
    SEL_LOCAL_PORTS = 20  # (absent: ANY)
    SEL_REMOTE_PORTS = 21  # (absent: ANY)
    SEL_NAME = 22  # (absent: no Name)
    SEL_LABEL = 23  # security label (absent: none)
    SA_NAME = 24  # the SA's own name (absent: "")


KNOWN_BITS = 0
for _b in Bit:
    KNOWN_BITS |= 1 << (31 - _b)
SELECTOR_PARTS = (
    Bit.SEL_PROTOCOL,
    Bit.SEL_LOCAL_PORTS,
    Bit.SEL_REMOTE_PORTS,
    Bit.SEL_NAME,
    Bit.SEL_LABEL,
)

# Flags (16 bits, bit 0 most significant).
F_INBOUND = 1 << 15
F_IPV6 = 1 << 14
F_TRANSPORT = 1 << 13
F_ESN = 1 << 12
F_OVERFLOW = 1 << 11
F_NO_DSCP_COPY = 1 << 10
F_DF_SHIFT = 8  # bits 6-7: 0 copy, 1 clear, 2 set
F_DF_MASK = 3 << F_DF_SHIFT
F_SOFT_FIRED = 1 << 7
F_DEAD = 1 << 6
F_REKEY = 1 << 5
F_RESERVED = 0x1F
DF_CODES = {DfPolicy.COPY: 0, DfPolicy.CLEAR: 1, DfPolicy.SET: 2}
DF_BY_CODE = {v: k for k, v in DF_CODES.items()}


def _mask(bit: Bit) -> int:
    return _MASKS[bit]


_MASKS = tuple(1 << (31 - b) for b in range(32))


# -- the fields of one context, independent of any clock --------------------------------------
@dataclass
class _Limits:
    time_ms: int | None = None
    bytes: int | None = None
    packets: int | None = None


@dataclass
class _Fields:
    protocol: Protocol
    direction: Direction
    spi: int
    src: IPAddress
    dst: IPAddress
    mode: Mode = Mode.TUNNEL
    esn: bool = False
    overflow: bool = False
    copy_dscp: bool = True
    df: DfPolicy = DfPolicy.COPY
    soft_fired: bool = False
    dead: bool = False
    rekey: bool = False
    enc: tuple[EncAlg, bytes] | None = None
    esp_integ: tuple[IntegAlg, bytes] | None = None
    ah_integ: tuple[IntegAlg, bytes] | None = None
    seq: int = 0
    window: int = DEFAULT_WINDOW
    replay: tuple[int, bytes] | None = None
    age_ms: int = 0
    count_bytes: int = 0
    count_packets: int = 0
    soft: _Limits = field(default_factory=_Limits)
    hard: _Limits = field(default_factory=_Limits)
    pmtu: int = DEFAULT_PMTU
    pmtu_expiry_ms: int | None = None
    encap: tuple[int, int] | None = None
    local: tuple[AddressRange, ...] | None = None
    remote: tuple[AddressRange, ...] = ()
    sel_protocol: int = PROTO_ANY
    local_ports: PortRange = field(default_factory=PortRange)
    remote_ports: PortRange = field(default_factory=PortRange)
    sel_name: str | None = None
    sel_label: bytes | None = None
    name: str = ""

    def __repr__(self) -> str:  # keys stay out of reprs
        return f"_Fields(spi=0x{self.spi:08x}, {self.direction.value}, {self.protocol.name})"


@contextmanager
def _as_context_error(what: str) -> Iterator[None]:
    """Turn the errors SA construction raises into ContextError (messages hold no keys)."""
    try:
        yield
    except (SAError, AlgorithmError) as exc:
        raise ContextError(f"{what}: {exc}") from None


def _check(f: _Fields) -> None:
    """Consistency rules shared by the CDB and the JSON form (the SA checks the rest)."""
    if f.src.version != f.dst.version:
        raise ContextError("outer source and destination mix IPv4 and IPv6")
    if f.protocol is Protocol.ESP:
        if f.enc is None:
            raise ContextError("an ESP SA needs its encryption transform")
        if f.ah_integ is not None:
            raise ContextError("an ESP SA carries no AH integrity transform")
    else:
        if f.enc is not None or f.esp_integ is not None:
            raise ContextError("an AH SA carries no ESP transforms")
        if f.ah_integ is None:
            raise ContextError("an AH SA needs its integrity transform")
    if f.direction is Direction.INBOUND and f.seq:
        raise ContextError("an inbound SA carries no outbound sequence number")
    if f.direction is Direction.OUTBOUND and f.replay is not None:
        raise ContextError("an outbound SA carries no anti-replay state")
    for name, value in (
        ("age", f.age_ms),
        ("soft time limit", f.soft.time_ms),
        ("hard time limit", f.hard.time_ms),
        ("PMTU expiry", f.pmtu_expiry_ms),
    ):
        if value is not None and not 0 <= value <= MAX_DURATION_MS:
            raise ContextError(f"{name} out of range 0-{MAX_DURATION_MS} ms")
    for name, value in (
        ("seq", f.seq),
        ("counters.bytes", f.count_bytes),
        ("counters.packets", f.count_packets),
        ("soft.bytes", f.soft.bytes),
        ("soft.packets", f.soft.packets),
        ("hard.bytes", f.hard.bytes),
        ("hard.packets", f.hard.packets),
    ):
        if value is not None and not 0 <= value <= MAX_U64:
            raise ContextError(f"{name} out of range 0-{MAX_U64}")
    if not 0 <= f.window <= 0xFFFFFFFF:
        raise ContextError("replay window size out of range")
    if f.replay is not None and f.replay[0] == 0:
        raise ContextError("anti-replay state with top 0 (nothing received) must be omitted")
    if f.encap is not None and not all(1 <= p <= 65535 for p in f.encap):
        raise ContextError("UDP encapsulation ports must be 1-65535")
    if f.local is None:
        if (
            f.sel_protocol != PROTO_ANY
            or not f.local_ports.is_any
            or not f.remote_ports.is_any
            or f.sel_name is not None
            or f.sel_label is not None
        ):
            raise ContextError("selector fields without selector addresses")
    else:
        for side, ranges in (("local", f.local), ("remote", f.remote)):
            if not 1 <= len(ranges) <= MAX_RANGES:
                raise ContextError(f"selectors need 1-{MAX_RANGES} {side} address ranges")
    for name, text in (("selector name", f.sel_name), ("SA name", f.name or None)):
        if text is None:
            continue
        try:
            n = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ContextError(f"{name} is not valid Unicode text") from None
        if not 1 <= n <= MAX_TEXT:
            raise ContextError(f"{name} must be 1-{MAX_TEXT} octets of UTF-8")
    if f.sel_label is not None and not 1 <= len(f.sel_label) <= MAX_TEXT:
        raise ContextError(f"security label must be 1-{MAX_TEXT} octets")


# -- SA <-> fields ----------------------------------------------------------------------------
def _duration_ms(seconds: float, what: str) -> int:
    if not math.isfinite(seconds) or seconds < 0:
        raise ContextError(f"{what} must be a finite, non-negative number of seconds")
    if seconds > MAX_DURATION_MS / 1000 or round(seconds * 1000) > MAX_DURATION_MS:
        raise ContextError(f"{what} is longer than {MAX_DURATION_MS} ms")  # (not overflowing)
    return round(seconds * 1000)


def _limits_from(lt: Lifetime, what: str) -> _Limits:
    return _Limits(
        None if lt.seconds is None else _duration_ms(lt.seconds, f"{what} time limit"),
        lt.bytes,
        lt.packets,
    )


def _fields_from_sa(sa: SecurityAssociation, now: float, seq: int | None = None) -> _Fields:
    esp = sa.protocol is Protocol.ESP
    inbound = sa.direction is Direction.INBOUND
    replay: tuple[int, bytes] | None = None
    if inbound:
        top, bitmap = sa.window.snapshot()
        replay = (top, bitmap) if top else None
    age = now - sa.created
    if not math.isfinite(age) or age < 0:
        raise ContextError("the SA was created after 'now': cannot compute its age")
    expiry: int | None = None
    if sa.pmtu_expires is not None:
        left = sa.pmtu_expires - now
        if math.isnan(left):
            raise ContextError("PMTU expiry is not a number")
        expiry = _duration_ms(max(0.0, left), "PMTU expiry")
    sel = sa.selectors
    f = _Fields(
        protocol=sa.protocol,
        direction=sa.direction,
        spi=sa.spi,
        src=sa.src,
        dst=sa.dst,
        mode=sa.mode,
        esn=sa.esn,
        overflow=sa.overflow_permitted,
        copy_dscp=sa.copy_dscp,
        df=sa.df,
        soft_fired=sa.soft_fired,
        dead=sa.dead,
        rekey=sa.rekey_requested,
        enc=(sa.enc, sa.enc_key) if esp else None,
        esp_integ=(sa.integ, sa.integ_key) if esp and sa.integ is not IntegAlg.NONE else None,
        ah_integ=None if esp else (sa.integ, sa.integ_key),
        seq=0 if inbound else (sa.seq if seq is None else seq),
        window=sa.replay_window,
        replay=replay,
        age_ms=_duration_ms(age, "age"),
        count_bytes=sa.counters.bytes,
        count_packets=sa.counters.packets,
        soft=_limits_from(sa.soft, "soft"),
        hard=_limits_from(sa.hard, "hard"),
        pmtu=sa.path_mtu,
        pmtu_expiry_ms=expiry,
        encap=None if sa.encap is None else (sa.encap.sport, sa.encap.dport),
        name=sa.name,
    )
    if sel is not None:
        f.local, f.remote = sel.local, sel.remote
        f.sel_protocol = sel.protocol
        f.local_ports, f.remote_ports = sel.local_ports, sel.remote_ports
        f.sel_name, f.sel_label = sel.name, sel.label
    _check(f)
    return f


def _sa_from_fields(f: _Fields, now: float) -> SecurityAssociation:
    _check(f)

    def lifetime(lim: _Limits) -> Lifetime:
        secs = None if lim.time_ms is None else lim.time_ms / 1000
        return Lifetime(secs, lim.bytes, lim.packets)

    if f.protocol is Protocol.ESP:
        assert f.enc is not None
        enc, enc_key = f.enc
        integ, integ_key = f.esp_integ or (IntegAlg.NONE, b"")
    else:
        assert f.ah_integ is not None
        enc, enc_key = EncAlg.NULL, b""
        integ, integ_key = f.ah_integ
    with _as_context_error("invalid SA"):
        selectors = None
        if f.local is not None:
            selectors = Selectors(
                f.local,
                f.remote,
                f.sel_protocol,
                f.local_ports,
                f.remote_ports,
                f.sel_name,
                f.sel_label,
            )
        sa = SecurityAssociation(
            f.spi,
            f.direction,
            f.src,
            f.dst,
            protocol=f.protocol,
            mode=f.mode,
            enc=enc,
            enc_key=enc_key,
            integ=integ,
            integ_key=integ_key,
            esn=f.esn,
            replay_window=f.window,
            seq=f.seq,
            overflow_permitted=f.overflow,
            soft=lifetime(f.soft),
            hard=lifetime(f.hard),
            path_mtu=f.pmtu,
            pmtu_expires=None if f.pmtu_expiry_ms is None else now + f.pmtu_expiry_ms / 1000,
            df=f.df,
            copy_dscp=f.copy_dscp,
            encap=None if f.encap is None else UdpEncap(*f.encap),
            selectors=selectors,
            name=f.name,
            created=now - f.age_ms / 1000,
            counters=Counters(f.count_packets, f.count_bytes),
            soft_fired=f.soft_fired,
            dead=f.dead,
            rekey_requested=f.rekey,
        )
        if f.replay is not None:
            sa.window.restore(*f.replay)
    return sa


# -- fields -> bytes ----------------------------------------------------------------------------
def _addr(a: IPAddress) -> bytes:
    return a.packed


def _text(s: str) -> bytes:
    b = s.encode("utf-8")
    return bytes([len(b)]) + b


def _serialize(f: _Fields) -> bytes:
    """The canonical CDB of ``f``: a field is present exactly when it is not its default."""
    pv = 0
    out = bytearray()

    def put(bit: Bit, data: bytes) -> None:
        nonlocal pv
        pv |= _mask(bit)
        out.extend(data)

    def alg(number: int, key: bytes) -> bytes:
        return struct.pack("!HB", number, len(key)) + key

    if f.enc is not None:
        put(Bit.ESP_ENC, alg(f.enc[0], f.enc[1]))
    if f.esp_integ is not None:
        put(Bit.ESP_INTEG, alg(f.esp_integ[0], f.esp_integ[1]))
    if f.ah_integ is not None:
        put(Bit.AH_INTEG, alg(f.ah_integ[0], f.ah_integ[1]))
    if f.seq:
        put(Bit.SEQ, struct.pack("!Q", f.seq))
    if f.window != DEFAULT_WINDOW:
        put(Bit.WINDOW, struct.pack("!I", f.window))
    if f.replay is not None:
        put(Bit.REPLAY, struct.pack("!Q", f.replay[0]) + f.replay[1])
    for bit, value in (
        (Bit.AGE, f.age_ms),
        (Bit.BYTES, f.count_bytes),
        (Bit.PACKETS, f.count_packets),
    ):
        if value:
            put(bit, struct.pack("!Q", value))
    for bit, opt in (
        (Bit.SOFT_TIME, f.soft.time_ms),
        (Bit.SOFT_BYTES, f.soft.bytes),
        (Bit.SOFT_PACKETS, f.soft.packets),
        (Bit.HARD_TIME, f.hard.time_ms),
        (Bit.HARD_BYTES, f.hard.bytes),
        (Bit.HARD_PACKETS, f.hard.packets),
    ):
        if opt is not None:
            put(bit, struct.pack("!Q", opt))
    if f.pmtu != DEFAULT_PMTU:
        put(Bit.PMTU, struct.pack("!H", f.pmtu))
    if f.pmtu_expiry_ms is not None:
        put(Bit.PMTU_EXPIRY, struct.pack("!Q", f.pmtu_expiry_ms))
    if f.encap is not None:
        put(Bit.UDP_ENCAP, struct.pack("!HH", *f.encap))
    if f.local is not None:
        sel = bytearray([len(f.local), len(f.remote)])
        for r in (*f.local, *f.remote):
            sel.append(r.version)
            sel += _addr(r.first) + _addr(r.last)
        put(Bit.SELECTORS, bytes(sel))
    if f.sel_protocol != PROTO_ANY:
        put(Bit.SEL_PROTOCOL, bytes([f.sel_protocol]))
    for bit, ports in (
        (Bit.SEL_LOCAL_PORTS, f.local_ports),
        (Bit.SEL_REMOTE_PORTS, f.remote_ports),
    ):
        if not ports.is_any:
            put(bit, struct.pack("!HH", ports.first, ports.last))
    if f.sel_name is not None:
        put(Bit.SEL_NAME, _text(f.sel_name))
    if f.sel_label is not None:
        put(Bit.SEL_LABEL, bytes([len(f.sel_label)]) + f.sel_label)
    if f.name:
        put(Bit.SA_NAME, _text(f.name))

    flags = (
        (F_INBOUND if f.direction is Direction.INBOUND else 0)
        | (F_IPV6 if f.dst.version == 6 else 0)
        | (F_TRANSPORT if f.mode is Mode.TRANSPORT else 0)
        | (F_ESN if f.esn else 0)
        | (F_OVERFLOW if f.overflow else 0)
        | (0 if f.copy_dscp else F_NO_DSCP_COPY)
        | (DF_CODES[f.df] << F_DF_SHIFT)
        | (F_SOFT_FIRED if f.soft_fired else 0)
        | (F_DEAD if f.dead else 0)
        | (F_REKEY if f.rekey else 0)
    )
    fixed = struct.pack("!BBHI", VERSION, f.protocol, flags, f.spi) + _addr(f.src) + _addr(f.dst)
    body = (struct.pack("!I", pv) if pv else b"") + fixed + bytes(out)
    total = -(-(HEADER_LEN + len(body)) // CDB_UNIT) * CDB_UNIT
    if total > CDB_MAX:
        raise ContextError(
            f"the context needs {total} octets, more than one CDB holds ({CDB_MAX});"
            " use a smaller replay window or fewer selectors"
        )
    header = struct.pack("!HBB", FPT_IPSEC_SA, total // CDB_UNIT, 0x80 if pv else 0)
    return (header + body).ljust(total, b"\0")


# -- bytes -> fields ----------------------------------------------------------------------------
class _Reader:
    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise ContextError(
                f"truncated CDB: {what} needs {n} octets, {self.end - self.pos} left"
            )
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def addr(self, version: int, what: str) -> IPAddress:
        if version == 4:
            return ipaddress.IPv4Address(self.take(4, what))
        return ipaddress.IPv6Address(self.take(16, what))

    def text(self, what: str) -> str:
        n = self.u8(f"{what} length")
        if n == 0:
            raise ContextError(f"{what} is present but empty")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise ContextError(f"{what} is not valid UTF-8") from None


def _check_header(data: bytes) -> tuple[int, int]:
    """(FPT, total length in octets) of the CDB at the start of ``data``."""
    if len(data) < HEADER_LEN:
        raise ContextError(f"truncated CDB: {len(data)} octets, the header alone needs 4")
    fpt, units = struct.unpack_from("!HB", data)
    if units == 0:
        raise ContextError("bad CDB length 0 (it counts 8-octet units including the header)")
    if units * CDB_UNIT > len(data):
        raise ContextError(
            f"truncated CDB: its length says {units * CDB_UNIT} octets, {len(data)} present"
        )
    return fpt, units * CDB_UNIT


def _algorithm(r: _Reader, what: str, lookup: Callable[[int], _A]) -> tuple[_A, bytes]:
    number = r.u16(f"{what} transform")
    klen = r.u8(f"{what} key length")
    with _as_context_error(what):
        alg = lookup(number)
    return alg, r.take(klen, f"{what} key")


def _ports(r: _Reader, what: str) -> PortRange:
    first, last = r.u16(what), r.u16(what)
    with _as_context_error(what):
        ports = PortRange(first, last)
    if ports.is_any:
        raise ContextError(f"{what} 0-65535 (ANY) must be omitted, not sent")
    return ports


def _parse(data: bytes) -> _Fields:
    fpt, total = _check_header(data)
    if fpt != FPT_IPSEC_SA:
        raise ContextError(f"unknown FPT 0x{fpt:04x} (an IPsec SA context is 0x{FPT_IPSEC_SA:04x})")
    if total != len(data):
        raise ContextError(f"{len(data) - total} trailing octets after the CDB")
    pflags = data[3]
    if pflags & 0x7F:
        raise ContextError("reserved bits in the CDB header are not zero")
    r = _Reader(data, HEADER_LEN, total)
    pv = r.u32("presence vector") if pflags & 0x80 else 0
    if pflags & 0x80 and pv == 0:
        raise ContextError("P flag set but the presence vector is empty")
    if pv & ~KNOWN_BITS:
        raise ContextError(f"unknown presence-vector bits 0x{pv & ~KNOWN_BITS:08x}")

    def has(bit: Bit, _masks: tuple[int, ...] = _MASKS) -> bool:
        return bool(pv & _masks[bit])

    version = r.u8("format version")
    if version != VERSION:
        raise ContextError(f"unknown context format version {version} (this is version 1)")
    proto = r.u8("protocol")
    if proto not in (Protocol.ESP, Protocol.AH):
        raise ContextError(f"unknown IPsec protocol {proto} (ESP is 50, AH 51)")
    flags = r.u16("flags")
    if flags & F_RESERVED:
        raise ContextError("reserved flag bits are not zero")
    df_code = (flags & F_DF_MASK) >> F_DF_SHIFT
    if df_code not in DF_BY_CODE:
        raise ContextError(f"unknown DF policy code {df_code}")
    spi = r.u32("SPI")
    family = 6 if flags & F_IPV6 else 4
    f = _Fields(
        protocol=Protocol(proto),
        direction=Direction.INBOUND if flags & F_INBOUND else Direction.OUTBOUND,
        spi=spi,
        src=r.addr(family, "outer source address"),
        dst=r.addr(family, "outer destination address"),
        mode=Mode.TRANSPORT if flags & F_TRANSPORT else Mode.TUNNEL,
        esn=bool(flags & F_ESN),
        overflow=bool(flags & F_OVERFLOW),
        copy_dscp=not flags & F_NO_DSCP_COPY,
        df=DF_BY_CODE[df_code],
        soft_fired=bool(flags & F_SOFT_FIRED),
        dead=bool(flags & F_DEAD),
        rekey=bool(flags & F_REKEY),
    )
    esp = f.protocol is Protocol.ESP
    if has(Bit.ESP_ENC) != esp:
        raise ContextError(
            "an ESP SA needs its encryption transform"
            if esp
            else "an AH SA carries no ESP encryption transform"
        )
    if has(Bit.ESP_INTEG) and not esp:
        raise ContextError("an AH SA carries no ESP integrity transform")
    if has(Bit.AH_INTEG) == esp:
        raise ContextError(
            "an ESP SA carries no AH integrity transform"
            if esp
            else "an AH SA needs its integrity transform"
        )
    if has(Bit.ESP_ENC):
        f.enc = _algorithm(r, "ESP encryption", enc_from_number)
    if has(Bit.ESP_INTEG):
        f.esp_integ = _algorithm(r, "ESP integrity", integ_from_number)
        if f.esp_integ[0] is IntegAlg.NONE:
            raise ContextError("ESP integrity 'none' must be omitted, not sent")
    if has(Bit.AH_INTEG):
        f.ah_integ = _algorithm(r, "AH integrity", integ_from_number)
    if has(Bit.SEQ):
        if f.direction is Direction.INBOUND:
            raise ContextError("an inbound SA carries no outbound sequence number")
        f.seq = r.u64("sequence number")
        if f.seq == 0:
            raise ContextError("sequence number 0 must be omitted, not sent")
    if has(Bit.WINDOW):
        f.window = r.u32("replay window size")
        if f.window == DEFAULT_WINDOW:
            raise ContextError("replay window size 64 (the default) must be omitted, not sent")
        if f.window % 32 or f.window > CDB_MAX * 8:
            raise ContextError(f"replay window size {f.window} is not a multiple of 32 that fits")
    if has(Bit.REPLAY):
        if f.direction is Direction.OUTBOUND:
            raise ContextError("an outbound SA carries no anti-replay state")
        top = r.u64("replay window top")
        if top == 0:
            raise ContextError("anti-replay state with top 0 (nothing received) must be omitted")
        f.replay = (top, r.take(f.window // 8, "replay bitmap"))

    def nonzero(bit: Bit, what: str) -> int:
        if not has(bit):
            return 0
        v = r.u64(what)
        if v == 0:
            raise ContextError(f"{what} 0 must be omitted, not sent")
        return v

    f.age_ms = nonzero(Bit.AGE, "age")
    f.count_bytes = nonzero(Bit.BYTES, "byte counter")
    f.count_packets = nonzero(Bit.PACKETS, "packet counter")

    def opt64(bit: Bit, what: str) -> int | None:
        return r.u64(what) if has(bit) else None

    f.soft = _Limits(
        opt64(Bit.SOFT_TIME, "soft time limit"),
        opt64(Bit.SOFT_BYTES, "soft byte limit"),
        opt64(Bit.SOFT_PACKETS, "soft packet limit"),
    )
    f.hard = _Limits(
        opt64(Bit.HARD_TIME, "hard time limit"),
        opt64(Bit.HARD_BYTES, "hard byte limit"),
        opt64(Bit.HARD_PACKETS, "hard packet limit"),
    )
    if has(Bit.PMTU):
        f.pmtu = r.u16("path MTU")
        if f.pmtu == DEFAULT_PMTU:
            raise ContextError("path MTU 1500 (the default) must be omitted, not sent")
    f.pmtu_expiry_ms = opt64(Bit.PMTU_EXPIRY, "PMTU expiry")
    if has(Bit.UDP_ENCAP):
        f.encap = (r.u16("UDP source port"), r.u16("UDP destination port"))
    if has(Bit.SELECTORS):
        nlocal, nremote = r.u8("local range count"), r.u8("remote range count")
        if nlocal == 0 or nremote == 0:
            raise ContextError("selectors need at least one local and one remote address range")
        ranges = []
        with _as_context_error("selector"):
            for _ in range(nlocal + nremote):
                fam = r.u8("selector address family")
                if fam not in (4, 6):
                    raise ContextError(f"unknown selector address family {fam} (4 or 6)")
                first = r.addr(fam, "selector address")
                last = r.addr(fam, "selector address")
                ranges.append(AddressRange(first, last))
        f.local, f.remote = tuple(ranges[:nlocal]), tuple(ranges[nlocal:])
    elif pv & sum(_mask(b) for b in SELECTOR_PARTS):
        raise ContextError("selector fields without selector addresses")
    if has(Bit.SEL_PROTOCOL):
        f.sel_protocol = r.u8("selector protocol")
        if f.sel_protocol == PROTO_ANY:
            raise ContextError("selector protocol ANY (0) must be omitted, not sent")
    if has(Bit.SEL_LOCAL_PORTS):
        f.local_ports = _ports(r, "local port range")
    if has(Bit.SEL_REMOTE_PORTS):
        f.remote_ports = _ports(r, "remote port range")
    if has(Bit.SEL_NAME):
        f.sel_name = r.text("selector name")
    if has(Bit.SEL_LABEL):
        n = r.u8("security label length")
        if n == 0:
            raise ContextError("security label is present but empty")
        f.sel_label = r.take(n, "security label")
    if has(Bit.SA_NAME):
        f.name = r.text("SA name")
    padding = data[r.pos : total]
    if len(padding) >= CDB_UNIT:
        raise ContextError(f"CDB length leaves {len(padding)} octets after the data (max 7)")
    if any(padding):
        raise ContextError("non-zero padding after the CDB data")
    _check(f)
    if _serialize(f) != data:  # the last guard of canonical form; the checks above should hold
        raise ContextError("non-canonical CDB encoding")
    return f


# -- the fast reader ----------------------------------------------------------------------------
# The transfer path decodes thousands of contexts a second, so decoding has two
# implementations that accept exactly the same bytes (a differential test holds them to it):
#
# - the reference, ``_parse`` + ``_sa_from_fields``: every field read through a checking
#   reader that raises a ContextError naming the field, the fields re-encoded and compared with
#   the input, an SA built from the checked fields;
# - ``_read``, used by :func:`decode`: one pass over the bytes with plain unpacks and
#   comparisons, the canonical form checked field by field as it reads (a value equal to its
#   default sent as present, an unknown number, a reserved bit, a short field or non-zero
#   padding: each is one comparison) instead of re-encoding, shared immutable parts (addresses,
#   selectors, lifetimes, encapsulation ports) and the SA built in one call. On anything wrong it
#   returns None without saying why, and :func:`decode` asks the reference, which names the
#   fault. A correct context never needs the reference.
_HEAD4 = struct.Struct("!HBBIBBHI4s4s")  # CDB header, presence vector, fixed part (IPv4)
_HEAD6 = struct.Struct("!HBBIBBHI16s16s")
_ALG = struct.Struct("!HB")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_TWO16 = struct.Struct("!HH")
_RANGE4 = struct.Struct("!BII")  # an IPv4 range of a selector field: version, first, last
_M_ESP_ENC, _M_ESP_INTEG, _M_AH_INTEG = (
    _MASKS[b] for b in (Bit.ESP_ENC, Bit.ESP_INTEG, Bit.AH_INTEG)
)
_M_SEQ, _M_WINDOW, _M_REPLAY = (_MASKS[b] for b in (Bit.SEQ, Bit.WINDOW, Bit.REPLAY))
_M_AGE, _M_BYTES, _M_PACKETS = (_MASKS[b] for b in (Bit.AGE, Bit.BYTES, Bit.PACKETS))
_M_SOFT = tuple(_MASKS[b] for b in (Bit.SOFT_TIME, Bit.SOFT_BYTES, Bit.SOFT_PACKETS))
_M_HARD = tuple(_MASKS[b] for b in (Bit.HARD_TIME, Bit.HARD_BYTES, Bit.HARD_PACKETS))
_M_LIMITS = sum(_M_SOFT) + sum(_M_HARD)
_M_PMTU, _M_PMTU_EXPIRY, _M_UDP_ENCAP = (
    _MASKS[b] for b in (Bit.PMTU, Bit.PMTU_EXPIRY, Bit.UDP_ENCAP)
)
_M_SELECTORS, _M_SEL_PROTOCOL = _MASKS[Bit.SELECTORS], _MASKS[Bit.SEL_PROTOCOL]
_M_SEL_LOCAL_PORTS, _M_SEL_REMOTE_PORTS = _MASKS[Bit.SEL_LOCAL_PORTS], _MASKS[Bit.SEL_REMOTE_PORTS]
_M_SEL_NAME, _M_SEL_LABEL, _M_SA_NAME = (
    _MASKS[b] for b in (Bit.SEL_NAME, Bit.SEL_LABEL, Bit.SA_NAME)
)
_M_SEL_PARTS = sum(_MASKS[b] for b in SELECTOR_PARTS)
_MAX_WINDOW_BITS = CDB_MAX * 8
_ZEROS = bytes(CDB_UNIT)
_ENC_BY_NUMBER = {int(a): a for a in EncAlg}
_INTEG_BY_NUMBER = {int(a): a for a in IntegAlg if a is not IntegAlg.NONE}
_MODES = (Mode.TUNNEL, Mode.TRANSPORT)
_DIRECTIONS = (Direction.OUTBOUND, Direction.INBOUND)
_DF = (DfPolicy.COPY, DfPolicy.CLEAR, DfPolicy.SET, None)
_NO_LIMIT = Lifetime()
_ANY_PORTS = PortRange()
_CACHE_MAX = 4096  # entries per cache of shared immutable parts; a full cache starts over
_addresses: dict[bytes, IPAddress] = {}
_selectors: dict[tuple[int, bytes], Selectors] = {}
_lifetimes: dict[tuple[int | None, int | None, int | None], Lifetime] = {}
_encaps: dict[int, UdpEncap] = {}
_ranges: dict[bytes, AddressRange] = {}


def _address(raw: bytes) -> IPAddress:
    a = _addresses.get(raw)
    if a is None:
        if len(_addresses) >= _CACHE_MAX:
            _addresses.clear()
        a = _addresses[raw] = (
            ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)
        )
    return a


def _lifetime(time_ms: int | None, nbytes: int | None, packets: int | None) -> Lifetime:
    key = (time_ms, nbytes, packets)
    lt = _lifetimes.get(key)
    if lt is None:
        if len(_lifetimes) >= _CACHE_MAX:
            _lifetimes.clear()
        lt = _lifetimes[key] = Lifetime(
            None if time_ms is None else time_ms / 1000, nbytes, packets
        )
    return lt


def _build_selectors(bits: int, raw: bytes) -> Selectors | None:
    """The Selectors of a selector field (``raw``, laid out as ``bits`` say, its layout
    already checked by the reader), or None if a range is reversed; kept for the SAs that
    carry the same octets."""
    nlocal, nremote = raw[0], raw[1]
    pos = 2
    ranges = []
    for _ in range(nlocal + nremote):
        alen = 4 if raw[pos] == 4 else 16
        end = pos + 1 + 2 * alen
        pair = raw[pos + 1 : end]  # first and last, as the cache's key
        rng = _ranges.get(pair) if len(pair) == 2 * alen else None
        if rng is None:  # (immutable: shared by the selectors that carry the same range)
            first_raw, last_raw = pair[:alen], pair[alen:]
            if len(last_raw) != alen or first_raw > last_raw:
                return None
            if len(_ranges) >= _CACHE_MAX:
                _ranges.clear()
            rng = _ranges[pair] = AddressRange(_address(first_raw), _address(last_raw))
        ranges.append(rng)
        pos = end
    if bits == _M_SELECTORS:  # addresses only (the usual): no optional part follows
        sel_proto, name, label = PROTO_ANY, None, None
        local_ports = remote_ports = _ANY_PORTS
    else:
        sel_proto = PROTO_ANY
        if bits & _M_SEL_PROTOCOL:
            sel_proto = raw[pos]
            pos += 1
        ports = []
        for m in (_M_SEL_LOCAL_PORTS, _M_SEL_REMOTE_PORTS):
            if bits & m:
                ports.append(PortRange(*_TWO16.unpack_from(raw, pos)))
                pos += 4
            else:
                ports.append(_ANY_PORTS)
        local_ports, remote_ports = ports
        texts: list[bytes | None] = []
        for m in (_M_SEL_NAME, _M_SEL_LABEL):
            if bits & m:
                tlen = raw[pos]
                texts.append(raw[pos + 1 : pos + 1 + tlen])
                pos += 1 + tlen
            else:
                texts.append(None)
        name_raw, label = texts
        name = None if name_raw is None else name_raw.decode("utf-8")
    selectors = Selectors(
        tuple(ranges[:nlocal]), tuple(ranges[nlocal:]), sel_proto, local_ports, remote_ports,
        name, label,
    )  # fmt: skip
    if len(_selectors) >= _CACHE_MAX:
        _selectors.clear()
    _selectors[(bits, raw)] = selectors
    return selectors


def _check_new_sa_order() -> Callable[..., SecurityAssociation]:
    """SecurityAssociation's constructor, called with its fields in order (positional: a
    bulk decode builds thousands; keywords cost a microsecond more each). Checked here, at
    import, against the dataclass's own field order."""
    names = [f.name for f in dataclass_fields(SecurityAssociation) if f.init]
    expected = [
        "spi", "direction", "src", "dst", "protocol", "mode", "enc", "enc_key", "integ",
        "integ_key", "esn", "replay_window", "seq", "seq_ceiling", "seq_low_water",
        "seq_reserve_pending", "overflow_permitted", "soft", "hard", "path_mtu",
        "pmtu_expires", "df", "copy_dscp", "encap", "selectors", "name", "created",
        "counters", "soft_fired", "dead", "rekey_requested",
    ]  # fmt: skip
    if names[: len(expected)] != expected:
        raise ImportError("SecurityAssociation's fields changed: update context._new_sa")
    return SecurityAssociation


_new_sa = _check_new_sa_order()


def _read_python(data: bytes, now: float) -> SecurityAssociation | None:
    """The SA in one CDB, or None if the CDB is not exactly what :func:`encode` makes."""
    try:
        n = len(data)
        if n % CDB_UNIT or data[2] * CDB_UNIT != n or data[3] != 0x80:
            return None
        flags = data[10] << 8 | data[11]
        if flags & F_IPV6:
            fpt, _, _, pv, version, proto, flags, spi, rs, rd = _HEAD6.unpack_from(data)
            pos = 48
        else:
            fpt, _, _, pv, version, proto, flags, spi, rs, rd = _HEAD4.unpack_from(data)
            pos = 24
        if (
            fpt != FPT_IPSEC_SA
            or pv & ~KNOWN_BITS
            or version != VERSION
            or flags & F_RESERVED
            or spi < 256
        ):
            return None
        df = _DF[(flags & F_DF_MASK) >> F_DF_SHIFT]
        if df is None:
            return None
        inbound = bool(flags & F_INBOUND)
        esn = bool(flags & F_ESN)
        # transforms and keys
        integ, integ_key = IntegAlg.NONE, b""
        if proto == 50:
            if pv & (_M_AH_INTEG | _M_ESP_ENC) != _M_ESP_ENC:
                return None
            number, klen = _ALG.unpack_from(data, pos)
            enc = _ENC_BY_NUMBER.get(number)
            if enc is None:
                return None
            info = ENC[enc]
            if klen not in info.key_lengths:
                return None
            enc_key = data[pos + 3 : pos + 3 + klen]
            pos += 3 + klen
            if pv & _M_ESP_INTEG:
                number, klen = _ALG.unpack_from(data, pos)
                ialg = _INTEG_BY_NUMBER.get(number)
                if ialg is None or info.aead or klen != INTEG[ialg].key_length:
                    return None
                integ, integ_key = ialg, data[pos + 3 : pos + 3 + klen]
                pos += 3 + klen
            elif not info.aead:
                return None
            protocol = Protocol.ESP
        elif proto == 51:
            if pv & (_M_AH_INTEG | _M_ESP_ENC | _M_ESP_INTEG) != _M_AH_INTEG:
                return None
            number, klen = _ALG.unpack_from(data, pos)
            ialg = _INTEG_BY_NUMBER.get(number)
            if ialg is None or klen != INTEG[ialg].key_length:
                return None
            enc, enc_key = EncAlg.NULL, b""
            integ, integ_key = ialg, data[pos + 3 : pos + 3 + klen]
            pos += 3 + klen
            protocol = Protocol.AH
        else:
            return None
        # sequence number and anti-replay
        seq = 0
        if pv & _M_SEQ:
            (seq,) = _U64.unpack_from(data, pos)
            pos += 8
            if inbound or seq == 0 or (not esn and seq > 0xFFFFFFFF):
                return None
        window = DEFAULT_WINDOW
        if pv & _M_WINDOW:
            (window,) = _U32.unpack_from(data, pos)
            pos += 4
            if window == DEFAULT_WINDOW or window % 32 or window > _MAX_WINDOW_BITS:
                return None
        replay = None
        if pv & _M_REPLAY:
            (top,) = _U64.unpack_from(data, pos)
            end = pos + 8 + window // 8
            if not inbound or top == 0 or end > n:
                return None
            replay = (top, data[pos + 8 : end])
            pos = end
        # age and counters: present only when not zero
        age_ms = count_bytes = count_packets = 0
        if pv & _M_AGE:
            (age_ms,) = _U64.unpack_from(data, pos)
            pos += 8
            if not 0 < age_ms <= MAX_DURATION_MS:
                return None
        if pv & _M_BYTES:
            (count_bytes,) = _U64.unpack_from(data, pos)
            pos += 8
            if count_bytes == 0:
                return None
        if pv & _M_PACKETS:
            (count_packets,) = _U64.unpack_from(data, pos)
            pos += 8
            if count_packets == 0:
                return None
        # lifetimes
        soft = hard = _NO_LIMIT
        if pv & _M_LIMITS:
            lim: list[int | None] = []
            for m in (*_M_SOFT, *_M_HARD):
                if pv & m:
                    lim.append(_U64.unpack_from(data, pos)[0])
                    pos += 8
                else:
                    lim.append(None)
            st, sb, sp, ht, hb, hp = lim
            if (st is not None and st > MAX_DURATION_MS) or (
                ht is not None and ht > MAX_DURATION_MS
            ):
                return None
            soft, hard = _lifetime(st, sb, sp), _lifetime(ht, hb, hp)
        # path MTU and encapsulation
        pmtu = DEFAULT_PMTU
        if pv & _M_PMTU:
            (pmtu,) = _U16.unpack_from(data, pos)
            pos += 2
            if pmtu == DEFAULT_PMTU or pmtu < 68:
                return None
        pmtu_expires = None
        if pv & _M_PMTU_EXPIRY:
            (expiry,) = _U64.unpack_from(data, pos)
            pos += 8
            if expiry > MAX_DURATION_MS:
                return None
            pmtu_expires = now + expiry / 1000
        encap = None
        if pv & _M_UDP_ENCAP:
            ports = data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]
            pos += 4
            encap = _encaps.get(ports)
            if encap is None:
                sport, dport = ports >> 16, ports & 0xFFFF
                if not sport or not dport:
                    return None
                if len(_encaps) >= _CACHE_MAX:
                    _encaps.clear()
                encap = _encaps[ports] = UdpEncap(sport, dport)
        # selectors: parsed once per distinct encoding, shared by the SAs that carry it
        selectors = None
        if pv & _M_SELECTORS:
            start = pos
            nranges = data[pos] + data[pos + 1]
            if not data[pos] or not data[pos + 1]:
                return None
            pos += 2
            for _ in range(nranges):
                fam = data[pos]
                alen = 4 if fam == 4 else 16 if fam == 6 else 0
                if not alen:
                    return None
                pos += 1 + 2 * alen
            if pv & _M_SEL_PROTOCOL:
                if data[pos] == PROTO_ANY:
                    return None
                pos += 1
            for m in (_M_SEL_LOCAL_PORTS, _M_SEL_REMOTE_PORTS):
                if pv & m:
                    first, last = _TWO16.unpack_from(data, pos)
                    pos += 4
                    if first > last or (first == 0 and last == 65535):
                        return None
            for m in (_M_SEL_NAME, _M_SEL_LABEL):
                if pv & m:
                    tlen = data[pos]
                    if tlen == 0:
                        return None
                    pos += 1 + tlen
            if pos > n:
                return None
            bits, raw = pv & _M_SEL_PARTS, data[start:pos]
            selectors = _selectors.get((bits, raw)) or _build_selectors(bits, raw)
            if selectors is None:
                return None
        elif pv & _M_SEL_PARTS:
            return None
        name = ""
        if pv & _M_SA_NAME:
            tlen = data[pos]
            if tlen == 0:
                return None
            name = data[pos + 1 : pos + 1 + tlen].decode("utf-8")
            pos += 1 + tlen
        # what is left is padding: fewer than 8 octets, all zero
        if not 0 <= n - pos < CDB_UNIT or data[pos:] != _ZEROS[: n - pos]:
            return None
        sa = _new_sa(
            spi, _DIRECTIONS[inbound], _address(rs), _address(rd), protocol,
            _MODES[bool(flags & F_TRANSPORT)], enc, enc_key, integ, integ_key, esn, window, seq,
            MAX_SEQ_64, MAX_SEQ_64, False, bool(flags & F_OVERFLOW), soft, hard, pmtu,
            pmtu_expires, df, not flags & F_NO_DSCP_COPY, encap, selectors, name,
            now - age_ms / 1000, Counters(count_packets, count_bytes),
            bool(flags & F_SOFT_FIRED), bool(flags & F_DEAD), bool(flags & F_REKEY),
        )  # fmt: skip
        if replay is not None:
            sa.window.restore(*replay)
        return sa
    except (IndexError, struct.error, ValueError, SAError, AlgorithmError):
        return None


def _read_native(data: bytes, now: float) -> SecurityAssociation | None:
    """:func:`_read_python` in C (``ipsecct.ct._cdb.decode``): the layout, the canonical form
    and the algorithm tables checked, and the SA, its replay window and its AEAD transform
    made there, without their constructors; the shared parts come from this module's caches
    and helpers (:func:`_setup_native`). Same verdicts, same SAs (tests/test_context_fast.py)."""
    assert _cdb is not None
    sa: SecurityAssociation | None = _cdb.decode(data, now)
    return sa


def _encap_of(ports: int) -> UdpEncap:
    """The encapsulation ports of a CDB (``sport << 16 | dport``, neither 0), kept."""
    if len(_encaps) >= _CACHE_MAX:
        _encaps.clear()
    encap = _encaps[ports] = UdpEncap(ports >> 16, ports & 0xFFFF)
    return encap


def _setup_native(cdb: Any) -> None:
    """Give the C module what its writer and decoder take from Python: the types whose
    objects its decoder makes (their slots), the enumerations, the algorithm tables, and the
    caches of shared parts with the helpers that fill them on a miss."""
    missing = set(cdb.SA_FIELDS) ^ {f.name for f in dataclass_fields(SecurityAssociation)}
    if missing:
        raise ImportError(
            f"SecurityAssociation's fields and ct/_cdb.c's decode() differ: {sorted(missing)}"
        )
    aead = {}
    for alg, info in ENC.items():
        if info.aead:  # what AeadTransform.__init__ sets (made once here to read it)
            t = AeadTransform(alg, bytes(info.key_lengths[0]))
            aead[alg] = (t.block, t.iv_len, t.icv_len)
    cdb.setup(Mode.TRANSPORT)
    cdb.setup_decoder(
        {
            "sa_type": SecurityAssociation,
            "sa_slots": SA_SLOTS,
            "window_type": ReplayWindow,
            "aead_type": AeadTransform,
            "counters_type": Counters,
            "directions": _DIRECTIONS,
            "modes": _MODES,
            "df": _DF[:3],
            "esp": Protocol.ESP,
            "ah": Protocol.AH,
            "integ_none": IntegAlg.NONE,
            "enc_null": EncAlg.NULL,
            "max_seq": MAX_SEQ_64,
            "enc_table": {
                int(alg): (alg, info.key_lengths, info.aead, *aead.get(alg, (0, 0, 0)))
                for alg, info in ENC.items()
            },
            "integ_table": {int(a): (a, INTEG[a].key_length) for a in _INTEG_BY_NUMBER.values()},
            "addresses": _addresses,
            "address": _address,
            "selectors": _selectors,
            "build_selectors": _build_selectors,
            "encaps": _encaps,
            "encap": _encap_of,
            "lifetime": _lifetime,
            "no_limit": _NO_LIMIT,
            "make_transform": make_transform,
            "refusals": (ValueError, SAError, AlgorithmError),
        }
    )


_cdb: Any
try:
    if os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"):
        raise ImportError("IPSECCT_PURE_PYTHON is set")
    from . import _cdb  # type: ignore[attr-defined,no-redef]
except ImportError:  # not built (no C compiler): the Python reader does it all
    _cdb = None
else:
    _setup_native(_cdb)

NATIVE_READER = _cdb is not None
_read = _read_native if NATIVE_READER else _read_python
"""The one-pass reader :func:`decode` uses: in C where built, else in Python."""


# -- the fast writer ----------------------------------------------------------------------------
# Like decoding, encoding has a reference (``_fields_from_sa`` + ``_serialize``, each rule in
# one place) and a one-pass writer for the transfer path, held to identical output by a
# differential test. The writer covers every SA; on a value it would have to refuse (an
# out-of-range duration, a name too long, a context too big) it returns None and the
# reference raises the error that names it.
_FIXED4 = struct.Struct("!HBBIBBHI4s4s")
_FIXED6 = struct.Struct("!HBBIBBHI16s16s")
_ALG_KEY = struct.Struct("!HB")
_SELECTOR_BITS = _M_SELECTORS | _M_SEL_PARTS
_sel_cdb: dict[int, tuple[weakref.ref[Selectors], int, bytes]] = {}


def _selectors_field(sel: Selectors) -> tuple[int, bytes] | None:
    """(presence bits, octets) of the selector fields, cached per Selectors object."""
    hit = _sel_cdb.get(id(sel))
    if hit is not None and hit[0]() is sel:
        return hit[1], hit[2]
    local, remote = sel.local, sel.remote
    if not (1 <= len(local) <= MAX_RANGES and 1 <= len(remote) <= MAX_RANGES):
        return None
    out = bytearray((len(local), len(remote)))
    for r in (*local, *remote):
        first, last = r.first, r.last
        if type(first) is ipaddress.IPv4Address and type(last) is ipaddress.IPv4Address:
            # (version, packed, packed; ``_ip`` is what int() returns, without its Python call)
            out += _RANGE4.pack(4, first._ip, last._ip)  # type: ignore[attr-defined]
        else:
            out.append(r.version)
            out += first.packed + last.packed
    bits = _M_SELECTORS
    if sel.protocol != PROTO_ANY:
        bits |= _M_SEL_PROTOCOL
        out.append(sel.protocol)
    for m, ports in (
        (_M_SEL_LOCAL_PORTS, sel.local_ports),
        (_M_SEL_REMOTE_PORTS, sel.remote_ports),
    ):
        if ports.first != 0 or ports.last != 65535:  # (not PortRange.is_any, a property)
            bits |= m
            out += _TWO16.pack(ports.first, ports.last)
    if sel.name is not None:
        raw = _text_octets(sel.name)
        if raw is None:
            return None
        bits |= _M_SEL_NAME
        out += raw
    if sel.label is not None:
        if not 1 <= len(sel.label) <= MAX_TEXT:
            return None
        bits |= _M_SEL_LABEL
        out.append(len(sel.label))
        out += sel.label
    if len(_sel_cdb) >= _CACHE_MAX:
        _sel_cdb.clear()
    _sel_cdb[id(sel)] = (weakref.ref(sel), bits, bytes(out))
    return bits, bytes(out)


_names: dict[str, bytes] = {}


def _name_octets(name: str) -> bytes | None:
    """The name field's octets for ``name`` (None: it cannot be carried), kept per name: both
    SAs of a tunnel usually share their name."""
    raw = _names.get(name)
    if raw is None:
        raw = _text_octets(name)
        if raw is None:
            return None
        if len(_names) >= _CACHE_MAX:
            _names.clear()
        _names[name] = raw
    return raw


_DF_FLAGS = {id(df): code << F_DF_SHIFT for df, code in DF_CODES.items()}  # members: singletons


def _octets(a: IPAddress) -> tuple[int, bytes]:
    """(IP version, packed octets) of an address (``ipaddress`` computes both in Python, in
    properties: from its integer here, as ``packed`` does)."""
    t = type(a)
    if t is ipaddress.IPv4Address:  # (``_ip``: what int() returns, without its Python call)
        return 4, a._ip.to_bytes(4, "big")  # type: ignore[union-attr]
    if t is ipaddress.IPv6Address:
        return 6, a._ip.to_bytes(16, "big")  # type: ignore[union-attr]
    return a.version, a.packed


def _text_octets(text: str) -> bytes | None:
    """Length octet and UTF-8 of a 1-255 octet text; None if it cannot be sent."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    if not 1 <= len(raw) <= MAX_TEXT:
        return None
    return bytes([len(raw)]) + raw


def _ms(seconds: float | None) -> int | None:
    """Whole milliseconds of a duration as the CDB carries it; -1 if it cannot be carried."""
    if seconds is None:
        return None
    if not 0 <= seconds <= MAX_DURATION_MS / 1000:  # also refuses NaN (and 1e308: inf ms)
        return -1
    ms = round(seconds * 1000)
    return ms if ms <= MAX_DURATION_MS else -1


def _write_python(sa: SecurityAssociation, now: float, seq: int | None = None) -> bytes | None:
    """The CDB of ``sa`` exactly as the reference writes it, or None where it would refuse."""
    out_seq = sa.seq if seq is None else seq
    pv = 0
    parts: list[bytes] = []
    inbound = sa.direction is Direction.INBOUND
    if sa.protocol is Protocol.ESP:
        pv = _M_ESP_ENC
        parts.append(_ALG_KEY.pack(sa.enc, len(sa.enc_key)) + sa.enc_key)
        if sa.integ is not IntegAlg.NONE:
            pv |= _M_ESP_INTEG
            parts.append(_ALG_KEY.pack(sa.integ, len(sa.integ_key)) + sa.integ_key)
    else:
        pv = _M_AH_INTEG
        parts.append(_ALG_KEY.pack(sa.integ, len(sa.integ_key)) + sa.integ_key)
    if not inbound and out_seq:
        if not 0 < out_seq <= MAX_U64:
            return None
        pv |= _M_SEQ
        parts.append(_U64.pack(out_seq))
    window = sa.replay_window
    if window != DEFAULT_WINDOW:
        if not 0 <= window <= 0xFFFFFFFF:
            return None
        pv |= _M_WINDOW
        parts.append(_U32.pack(window))
    if inbound:
        top, bitmap = sa.window.snapshot()
        if top:
            pv |= _M_REPLAY
            parts.append(_U64.pack(top) + bitmap)
    age = _ms(now - sa.created)
    if age is None or age < 0:
        return None
    if age:
        pv |= _M_AGE
        parts.append(_U64.pack(age))
    c = sa.counters
    for m, value in ((_M_BYTES, c.bytes), (_M_PACKETS, c.packets)):
        if value:
            if not 0 < value <= MAX_U64:
                return None
            pv |= m
            parts.append(_U64.pack(value))
    for masks, lt in ((_M_SOFT, sa.soft), (_M_HARD, sa.hard)):
        if lt is not _NO_LIMIT and (
            lt.seconds is not None or lt.bytes is not None or lt.packets is not None
        ):
            ms = _ms(lt.seconds)
            for m, limit in zip(masks, (ms, lt.bytes, lt.packets), strict=True):
                if limit is not None:
                    if not 0 <= limit <= MAX_U64:
                        return None
                    pv |= m
                    parts.append(_U64.pack(limit))
    if sa.path_mtu != DEFAULT_PMTU:
        pv |= _M_PMTU
        parts.append(_U16.pack(sa.path_mtu))
    if sa.pmtu_expires is not None:
        left = sa.pmtu_expires - now
        expiry = _ms(left if left > 0 else 0.0) if not math.isnan(left) else -1
        if expiry is None or expiry < 0:
            return None
        pv |= _M_PMTU_EXPIRY
        parts.append(_U64.pack(expiry))
    encap = sa.encap
    if encap is not None:
        if not (1 <= encap.sport <= 65535 and 1 <= encap.dport <= 65535):
            return None
        pv |= _M_UDP_ENCAP
        parts.append(_TWO16.pack(encap.sport, encap.dport))
    if sa.selectors is not None:
        sel = _selectors_field(sa.selectors)
        if sel is None:
            return None
        pv |= sel[0]
        parts.append(sel[1])
    if sa.name:
        raw = _name_octets(sa.name)
        if raw is None:
            return None
        pv |= _M_SA_NAME
        parts.append(raw)
    src, dst = _octets(sa.src), _octets(sa.dst)
    if src[0] != dst[0]:
        return None
    df = _DF_FLAGS.get(id(sa.df))
    if df is None:
        return None
    flags = (
        (F_INBOUND if inbound else 0)
        | (F_IPV6 if dst[0] == 6 else 0)
        | (F_TRANSPORT if sa.mode is Mode.TRANSPORT else 0)
        | (F_ESN if sa.esn else 0)
        | (F_OVERFLOW if sa.overflow_permitted else 0)
        | (0 if sa.copy_dscp else F_NO_DSCP_COPY)
        | df
        | (F_SOFT_FIRED if sa.soft_fired else 0)
        | (F_DEAD if sa.dead else 0)
        | (F_REKEY if sa.rekey_requested else 0)
    )
    body = b"".join(parts)
    fixed = _FIXED6 if flags & F_IPV6 else _FIXED4
    used = fixed.size + len(body)
    total = -(-used // CDB_UNIT) * CDB_UNIT
    if total > CDB_MAX:
        return None
    head = fixed.pack(
        FPT_IPSEC_SA, total // CDB_UNIT, 0x80, pv, VERSION, sa.protocol, flags, sa.spi,
        src[1], dst[1],
    )  # fmt: skip
    return head + body + _ZEROS[: total - used]


def _write_native(sa: SecurityAssociation, now: float, seq: int | None = None) -> bytes | None:
    """:func:`_write_python` with the fields read, checked and laid out in C
    (``ipsecct.ct._cdb.write``); what needs Python's objects is done here: the outbound number
    (read through the native data path), the replay snapshot, the selector field and name
    (kept per object), the address octets and the DF code. Same bytes, same refusals
    (tests/test_context_fast.py)."""
    assert _cdb is not None
    inbound = sa.direction is Direction.INBOUND
    top, bitmap = sa.window.snapshot() if inbound else (0, b"")
    sel_bits, sel_raw = 0, b""
    if sa.selectors is not None:
        field = _selectors_field(sa.selectors)
        if field is None:
            return None
        sel_bits, sel_raw = field
    name_raw = b""
    if sa.name:
        raw = _name_octets(sa.name)
        if raw is None:
            return None
        name_raw = raw
    sv, src = _octets(sa.src)
    dv, dst = _octets(sa.dst)
    df = _DF_FLAGS.get(id(sa.df))
    if sv != dv or df is None:
        return None
    cdb: bytes | None = _cdb.write(
        sa, now, sa.seq if seq is None else seq, inbound, top, bitmap, sel_bits, sel_raw,
        name_raw, src, dst, dv == 6, df,
    )  # fmt: skip
    return cdb


_write = _write_native if NATIVE_READER else _write_python
"""The one-pass writer :func:`encode` uses: in C where built, else in Python."""


# -- public API ---------------------------------------------------------------------------------
def encode(sa: SecurityAssociation, now: float, *, seq: int | None = None) -> bytes:
    """One CDB holding ``sa``'s feature context, its selectors and its replay state.
    ``seq``: the outbound sequence number to send instead of the SA's own (a make-before-
    break transfer hands over the number its source stops below)."""
    cdb = _write(sa, now, seq)
    return cdb if cdb is not None else encode_reference(sa, now, seq=seq)


def encode_reference(sa: SecurityAssociation, now: float, *, seq: int | None = None) -> bytes:
    """:func:`encode` by the reference path (the fields checked, then serialized): the
    specification of the fast writer, which must write exactly the same bytes."""
    return _serialize(_fields_from_sa(sa, now, seq))


_PEEK_HEAD = struct.Struct("!3xBI2xH")  # the P octet, the presence vector, the flags


def peek_seq(data: bytes) -> int:
    """The outbound sequence number in a CDB as :func:`encode` writes it, read without
    decoding the rest (0: none, or not such a CDB; the CDB itself is checked when decoded):
    for a standby comparing the replicas of one SA as they arrive."""
    try:
        p, pv, flags = _PEEK_HEAD.unpack_from(data)
        if p != 0x80 or not pv & _M_SEQ:
            return 0
        pos = 48 if flags & F_IPV6 else 24
        if pv & _M_ESP_ENC:
            pos += 3 + data[pos + 2]
        if pv & _M_ESP_INTEG:
            pos += 3 + data[pos + 2]
        if pv & _M_AH_INTEG:
            pos += 3 + data[pos + 2]
        return int(_U64.unpack_from(data, pos)[0])
    except (IndexError, struct.error):
        return 0


def decode(data: bytes, now: float) -> SecurityAssociation:
    """The SA in exactly one CDB; ContextError for anything malformed or non-canonical."""
    data = bytes(data)
    sa = _read(data, now)
    # The fast reader says only "no"; the reference names the fault (and would return the SA
    # if the fast reader ever refused a correct context, which the differential test forbids).
    return sa if sa is not None else decode_reference(data, now)


def decode_reference(data: bytes, now: float) -> SecurityAssociation:
    """:func:`decode` by the reference decoder: every field read and checked on its own, then
    the whole re-encoded and compared with ``data``. Slower; the specification of the fast
    reader, which must accept and reject exactly the same bytes."""
    return _sa_from_fields(_parse(bytes(data)), now)


def split_cdbs(data: bytes) -> list[tuple[int, bytes]]:
    """Split a concatenation of CDBs (as CXTP messages carry) into (FPT, whole CDB) pairs."""
    data = bytes(data)
    out = []
    pos = 0
    while pos < len(data):
        fpt, total = _check_header(data[pos:])
        out.append((fpt, data[pos : pos + total]))
        pos += total
    return out


def decode_many(data: bytes, now: float) -> list[SecurityAssociation]:
    """Every SA in a concatenation of IPsec SA CDBs (any other FPT is an error)."""
    return [decode(cdb, now) for _fpt, cdb in split_cdbs(data)]


# -- JSON form ----------------------------------------------------------------------------------
def _seconds(ms: int) -> int | float:
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def _limits_json(lim: _Limits) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if lim.time_ms is not None:
        out["seconds"] = _seconds(lim.time_ms)
    if lim.bytes is not None:
        out["bytes"] = lim.bytes
    if lim.packets is not None:
        out["packets"] = lim.packets
    return out


def _json_from_fields(f: _Fields) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "spi": f"0x{f.spi:08x}",
        "direction": f.direction.value,
        "protocol": f.protocol.name.lower(),
        "mode": f.mode.value,
        "src": str(f.src),
        "dst": str(f.dst),
    }
    if f.enc is not None:
        obj["enc"] = enc_name(f.enc[0])
        obj["enc_key"] = f.enc[1].hex()
    integ = f.esp_integ or f.ah_integ
    if integ is not None:
        obj["integ"] = integ_name(integ[0])
        obj["integ_key"] = integ[1].hex()
    obj["esn"] = f.esn
    obj["replay_window"] = f.window
    if f.direction is Direction.OUTBOUND:
        obj["seq"] = f.seq
    if f.replay is not None:
        obj["replay"] = {"top": f.replay[0], "bitmap": f.replay[1].hex()}
    if f.overflow:
        obj["overflow_permitted"] = True
    obj["age"] = _seconds(f.age_ms)
    if f.count_bytes or f.count_packets:
        obj["counters"] = {"bytes": f.count_bytes, "packets": f.count_packets}
    for key, lim in (("soft", f.soft), ("hard", f.hard)):
        j = _limits_json(lim)
        if j:
            obj[key] = j
    if f.pmtu != DEFAULT_PMTU:
        obj["path_mtu"] = f.pmtu
    if f.pmtu_expiry_ms is not None:
        obj["pmtu_expires_in"] = _seconds(f.pmtu_expiry_ms)
    if f.df is not DfPolicy.COPY:
        obj["df"] = f.df.value
    if not f.copy_dscp:
        obj["copy_dscp"] = False
    if f.encap is not None:
        obj["udp_encap"] = {"sport": f.encap[0], "dport": f.encap[1]}
    if f.local is not None:
        sel: dict[str, Any] = {
            "local": [str(x) for x in f.local],
            "remote": [str(x) for x in f.remote],
        }
        if f.sel_protocol != PROTO_ANY:
            sel["protocol"] = f.sel_protocol
        if not f.local_ports.is_any:
            sel["local_ports"] = str(f.local_ports)
        if not f.remote_ports.is_any:
            sel["remote_ports"] = str(f.remote_ports)
        if f.sel_name is not None:
            sel["name"] = f.sel_name
        if f.sel_label is not None:
            sel["label"] = f.sel_label.hex()
        obj["selectors"] = sel
    if f.name:
        obj["name"] = f.name
    for key, flag in (("soft_fired", f.soft_fired), ("dead", f.dead), ("rekey_requested", f.rekey)):
        if flag:
            obj[key] = True
    return obj


def to_json(sa: SecurityAssociation, now: float) -> dict[str, Any]:
    """The JSON form of ``sa``'s context: the same fields as the CDB, readable names, times in
    seconds with millisecond precision, keys as hex. Fields at their default are left out."""
    return _json_from_fields(_fields_from_sa(sa, now))


_TOP_KEYS = {
    "spi", "direction", "protocol", "mode", "src", "dst", "enc", "enc_key", "integ",
    "integ_key", "esn", "replay_window", "seq", "replay", "overflow_permitted", "age",
    "counters", "soft", "hard", "path_mtu", "pmtu_expires_in", "df", "copy_dscp", "udp_encap",
    "selectors", "name", "soft_fired", "dead", "rekey_requested",
}  # fmt: skip


class _Obj:
    """Typed, field-naming access to one JSON object."""

    def __init__(self, obj: object, where: str, keys: set[str]) -> None:
        if not isinstance(obj, dict):
            raise ContextError(f"{where or 'the context'} must be a JSON object")
        self.obj: dict[str, object] = obj
        self.where = where
        unknown = sorted(str(k) for k in obj if k not in keys)
        if unknown:
            raise ContextError(f"unknown field {self.name(unknown[0])!r}")

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, what: str) -> ContextError:
        return ContextError(f"field {self.name(key)!r}: {what}")

    def get(self, key: str) -> object:
        return self.obj.get(key)

    def required(self, key: str) -> object:
        if key not in self.obj:
            raise ContextError(f"missing field {self.name(key)!r}")
        return self.obj[key]

    def string(self, key: str, default: str | None = None) -> str:
        v = self.obj.get(key, default) if default is not None else self.required(key)
        if not isinstance(v, str):
            raise self.fail(key, "must be a string")
        return v

    def choice(self, key: str, choices: dict[str, _T], default: str | None = None) -> _T:
        v = self.string(key, default).lower()
        if v not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}")
        return choices[v]

    def boolean(self, key: str, default: bool) -> bool:
        v = self.obj.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, "must be true or false")
        return v

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        v = self.obj.get(key, default) if default is not None else self.required(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, "must be an integer")
        if not lo <= v <= hi:
            raise self.fail(key, f"must be {lo}-{hi}")
        return v

    def opt_integer(self, key: str, lo: int, hi: int) -> int | None:
        return None if key not in self.obj else self.integer(key, lo, hi)

    def duration(self, key: str) -> int | None:
        if key not in self.obj:
            return None
        v = self.obj[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(key, "must be a number of seconds")
        if not math.isfinite(v) or v < 0:
            raise self.fail(key, "must be a finite, non-negative number of seconds")
        # (compared before it is multiplied: 1e308 s made 1000 times that infinite, and
        # round() raised OverflowError, a traceback from context encode and sa add)
        if v > MAX_DURATION_MS / 1000 or round(v * 1000) > MAX_DURATION_MS:
            raise self.fail(key, f"must be at most {MAX_DURATION_MS / 1000:.0f} seconds")
        return round(v * 1000)

    def hexbytes(self, key: str, *, required: bool = True) -> bytes:
        v = self.required(key) if required else self.obj.get(key, "")
        if (
            not isinstance(v, str)
            or not all(c in "0123456789abcdefABCDEF" for c in v)
            or len(v) % 2
        ):
            raise self.fail(key, "must be a string of hex digits (two per octet)")
        return bytes.fromhex(v)

    def address(self, key: str) -> IPAddress:
        v = self.string(key)
        try:
            a = ipaddress.ip_address(v)
        except ValueError:
            raise self.fail(key, "is not an IPv4 or IPv6 address") from None
        if isinstance(a, ipaddress.IPv6Address) and a.scope_id:
            raise self.fail(key, "must not carry an IPv6 scope (zone) id")
        return a

    def sub(self, key: str, keys: set[str]) -> _Obj | None:
        if key not in self.obj:
            return None
        return _Obj(self.obj[key], self.name(key), keys)


def _limits_from_json(o: _Obj | None) -> _Limits:
    if o is None:
        return _Limits()
    return _Limits(
        o.duration("seconds"),
        o.opt_integer("bytes", 0, MAX_U64),
        o.opt_integer("packets", 0, MAX_U64),
    )


def _ranges_from_json(o: _Obj, key: str) -> tuple[AddressRange, ...]:
    v = o.required(key)
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_RANGES:
        raise o.fail(key, f"must be a list of 1-{MAX_RANGES} addresses, prefixes or ranges")
    out = []
    for item in v:
        if not isinstance(item, str):
            raise o.fail(key, "must hold strings such as 10.0.0.0/24 or 10.0.0.1-10.0.0.9")
        try:
            r = AddressRange.parse(item)
        except SAError as exc:
            raise o.fail(key, str(exc)) from None
        if "%" in item:
            raise o.fail(key, "must not carry an IPv6 scope (zone) id")
        out.append(r)
    return tuple(out)


def _ports_from_json(o: _Obj, key: str) -> PortRange:
    v = o.get(key)
    if v is None:
        return PortRange()
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise o.fail(key, 'must be "any", a port such as "80" or a range such as "1000-2000"')
    try:
        return PortRange.parse(v)
    except SAError as exc:
        raise o.fail(key, str(exc)) from None


def _fields_from_json(obj: object) -> _Fields:
    o = _Obj(obj, "", _TOP_KEYS)
    spi_v = o.required("spi")
    if isinstance(spi_v, str):
        if not re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}|[0-9]{1,10}", spi_v):
            raise o.fail("spi", "must be an integer or a hex string such as 0x00001000")
        spi = int(spi_v, 0) if spi_v[:2].lower() == "0x" else int(spi_v)
    else:
        spi = o.integer("spi", 0, 0xFFFFFFFF)
    if not 256 <= spi <= 0xFFFFFFFF:
        raise o.fail("spi", "must be 256-4294967295 (1-255 are reserved)")
    protocol = o.choice("protocol", {"esp": Protocol.ESP, "ah": Protocol.AH}, "esp")
    f = _Fields(
        protocol=protocol,
        direction=o.choice("direction", {"in": Direction.INBOUND, "out": Direction.OUTBOUND}),
        spi=spi,
        src=o.address("src"),
        dst=o.address("dst"),
        mode=o.choice("mode", {m.value: m for m in Mode}, "tunnel"),
        esn=o.boolean("esn", False),
        overflow=o.boolean("overflow_permitted", False),
        copy_dscp=o.boolean("copy_dscp", True),
        df=o.choice("df", {d.value: d for d in DfPolicy}, "copy"),
        soft_fired=o.boolean("soft_fired", False),
        dead=o.boolean("dead", False),
        rekey=o.boolean("rekey_requested", False),
    )
    if f.src.version != f.dst.version:
        raise ContextError("fields 'src' and 'dst' mix IPv4 and IPv6")
    integ = None
    if "integ" in o.obj or "integ_key" in o.obj:
        alg = o.choice("integ", INTEG_NAMES, "none")
        integ = (alg, o.hexbytes("integ_key", required=alg is not IntegAlg.NONE))
    if protocol is Protocol.ESP:
        enc = o.choice("enc", ENC_NAMES)
        f.enc = (enc, o.hexbytes("enc_key", required=enc is not EncAlg.NULL))
        if integ is not None and integ[0] is not IntegAlg.NONE:
            f.esp_integ = integ
        elif integ is not None and integ[1]:
            raise o.fail("integ_key", "must be empty when integ is none")
    else:
        for key in ("enc", "enc_key"):
            if key in o.obj:
                raise o.fail(key, "does not apply to an AH SA")
        if integ is None:
            raise ContextError("missing field 'integ' (an AH SA needs an integrity algorithm)")
        f.ah_integ = integ
    f.window = o.integer("replay_window", 0, 0xFFFFFFFF, DEFAULT_WINDOW)
    if "seq" in o.obj:
        f.seq = o.integer("seq", 0, MAX_U64)
        if f.seq and f.direction is Direction.INBOUND:
            raise o.fail("seq", "does not apply to an inbound SA")
    rep = o.sub("replay", {"top", "bitmap"})
    if rep is not None:
        if f.direction is Direction.OUTBOUND:
            raise o.fail("replay", "does not apply to an outbound SA")
        top = rep.integer("top", 0, MAX_U64)
        bitmap = rep.hexbytes("bitmap", required=False)
        if top == 0 and any(bitmap):
            raise rep.fail("bitmap", "must be all zero when top is 0")
        if top:
            if len(bitmap) != f.window // 8:
                raise rep.fail(
                    "bitmap", f"must be {f.window // 8} octets for a window of {f.window}"
                )
            f.replay = (top, bitmap)
    age = o.duration("age")
    f.age_ms = 0 if age is None else age
    cnt = o.sub("counters", {"bytes", "packets"})
    if cnt is not None:
        f.count_bytes = cnt.integer("bytes", 0, MAX_U64, 0)
        f.count_packets = cnt.integer("packets", 0, MAX_U64, 0)
    f.soft = _limits_from_json(o.sub("soft", {"seconds", "bytes", "packets"}))
    f.hard = _limits_from_json(o.sub("hard", {"seconds", "bytes", "packets"}))
    f.pmtu = o.integer("path_mtu", 68, 65535, DEFAULT_PMTU)
    f.pmtu_expiry_ms = o.duration("pmtu_expires_in")
    enc_o = o.sub("udp_encap", {"sport", "dport"})
    if enc_o is not None:
        f.encap = (enc_o.integer("sport", 1, 65535, 4500), enc_o.integer("dport", 1, 65535, 4500))
    sel = o.sub(
        "selectors",
        {"local", "remote", "protocol", "local_ports", "remote_ports", "name", "label"},
    )
    if sel is not None:
        f.local = _ranges_from_json(sel, "local")
        f.remote = _ranges_from_json(sel, "remote")
        p = sel.get("protocol")
        if isinstance(p, str) and p.lower() == "any":
            f.sel_protocol = PROTO_ANY
        else:
            f.sel_protocol = sel.integer("protocol", 0, 255, PROTO_ANY)
        f.local_ports = _ports_from_json(sel, "local_ports")
        f.remote_ports = _ports_from_json(sel, "remote_ports")
        if "name" in sel.obj:
            f.sel_name = sel.string("name")
        if "label" in sel.obj:
            f.sel_label = sel.hexbytes("label")
    if "name" in o.obj:
        f.name = o.string("name")
        if not f.name:
            raise o.fail("name", "must not be empty (leave it out instead)")
    return f


def from_json(obj: object, now: float) -> SecurityAssociation:
    """The SA described by a JSON form (as :func:`to_json` makes), validated field by field."""
    return _sa_from_fields(_fields_from_json(obj), now)

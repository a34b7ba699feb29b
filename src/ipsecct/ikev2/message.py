"""IKEv2 messages and payloads (RFC 7296 §3): a strict codec.

:func:`decode_header` and :func:`decode_payloads` turn octets into typed payload objects;
:meth:`Message.encode` and :func:`encode_payloads` do the reverse. Everything that does not
follow RFC 7296's layout (lengths that disagree, truncated payloads, a critical payload we do
not know, counts that do not match) raises :class:`IkeParseError`, never anything else. The
encrypted payloads (SK, SKF) are decoded here as opaque octets; :mod:`ipsecct.ikev2.protection`
opens them and feeds the plaintext back to :func:`decode_payloads`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import IkeParseError, IkeProtocolError
from ..ipsec.spd import one_prefix

IKE_HEADER_LEN = 28
VERSION = 0x20  # major 2, minor 0
MAX_MESSAGE = 65535
# a Configuration payload with more attributes than this is malformed (strongSwan asks for a
# handful: an address per family, DNS servers, ...)
MAX_CP_ATTRIBUTES = 64
_P = TypeVar("_P")


class ExchangeType(enum.IntEnum):
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37


class PayloadType(enum.IntEnum):
    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53


class Flag(enum.IntFlag):
    INITIATOR = 0x08
    VERSION = 0x10
    RESPONSE = 0x20


class ProtocolId(enum.IntEnum):
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(enum.IntEnum):
    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4
    ESN = 5


class IdType(enum.IntEnum):
    IPV4_ADDR = 1
    FQDN = 2
    RFC822_ADDR = 3
    IPV6_ADDR = 5
    DER_ASN1_DN = 9
    DER_ASN1_GN = 10
    KEY_ID = 11


class AuthMethod(enum.IntEnum):
    RSA_SIG = 1
    SHARED_KEY = 2
    DSS = 3
    ECDSA_256 = 9
    ECDSA_384 = 10
    ECDSA_521 = 11
    DIGITAL_SIGNATURE = 14


class Notify(enum.IntEnum):
    # errors (< 16384)
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    UNACCEPTABLE_ADDRESSES = 40  # RFC 4555
    UNEXPECTED_NAT_DETECTED = 41
    CHILD_SA_NOT_FOUND = 44
    # status
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396  # RFC 4555
    ADDITIONAL_IP4_ADDRESS = 16397
    ADDITIONAL_IP6_ADDRESS = 16398
    NO_ADDITIONAL_ADDRESSES = 16399
    UPDATE_SA_ADDRESSES = 16400
    COOKIE2 = 16401
    NO_NATS_ALLOWED = 16402
    REDIRECT_SUPPORTED = 16406
    EAP_ONLY_AUTHENTICATION = 16417
    IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420  # RFC 6311
    IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED = 16421
    IKEV2_MESSAGE_ID_SYNC = 16422
    IPSEC_REPLAY_COUNTER_SYNC = 16423
    IKEV2_FRAGMENTATION_SUPPORTED = 16430
    SIGNATURE_HASH_ALGORITHMS = 16431


class CfgType(enum.IntEnum):
    """The CFG Type of a Configuration payload (RFC 7296 §3.15)."""

    CFG_REQUEST = 1
    CFG_REPLY = 2
    CFG_SET = 3
    CFG_ACK = 4


class CfgAttr(enum.IntEnum):
    """Configuration attributes (RFC 7296 §3.15.1) this gateway reads or sends."""

    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10


class TsType(enum.IntEnum):
    IPV4_ADDR_RANGE = 7
    IPV6_ADDR_RANGE = 8


# -- payloads -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    type: int
    id: int
    key_length: int | None = None  # the Key Length attribute (14), in bits


@dataclass(frozen=True)
class Proposal:
    num: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]


@dataclass(frozen=True)
class SAPayload:
    proposals: tuple[Proposal, ...]


@dataclass(frozen=True)
class KEPayload:
    group: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class NoncePayload:
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class IDPayload:
    initiator: bool
    id_type: int
    data: bytes

    @property
    def body(self) -> bytes:
        """The payload after its generic header (what RFC 7296 §2.15 calls RestOfIDPayload)."""
        return bytes((self.id_type, 0, 0, 0)) + self.data

    def text(self) -> str:
        """The identity as strongSwan would print it (a KEY_ID as swanctl.conf writes it:
        ``@#`` and its octets in hex)."""
        try:
            if self.id_type == IdType.IPV4_ADDR and len(self.data) == 4:
                return str(ipaddress.IPv4Address(self.data))
            if self.id_type == IdType.IPV6_ADDR and len(self.data) == 16:
                return str(ipaddress.IPv6Address(self.data))
            if self.id_type == IdType.KEY_ID and self.data:
                return "@#" + self.data.hex()
            if self.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
                text = self.data.decode("ascii")
                if text.isprintable():  # no newline or escape sequence into a log or a
                    return text  # terminal: any peer can send any identity
        except (UnicodeDecodeError, ValueError):
            pass
        return "0x" + self.data.hex()


@dataclass(frozen=True)
class AuthPayload:
    method: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class CertPayload:
    encoding: int
    data: bytes


@dataclass(frozen=True)
class CertReqPayload:
    encoding: int
    data: bytes


@dataclass(frozen=True)
class NotifyPayload:
    type: int
    protocol: int = 0
    spi: bytes = b""
    data: bytes = b""


@dataclass(frozen=True)
class DeletePayload:
    protocol: int
    spis: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class VendorPayload:
    data: bytes


@dataclass(frozen=True)
class TrafficSelector:
    ts_type: int
    ip_protocol: int
    start_port: int
    end_port: int
    start: ipaddress.IPv4Address | ipaddress.IPv6Address
    end: ipaddress.IPv4Address | ipaddress.IPv6Address

    def __str__(self) -> str:
        """As swanctl prints it where the range is one prefix (``10.0.0.0/24``, a host
        ``10.201.1.1/32``), else ``first-last``; ``[protocol]`` and ``:ports`` after it when
        not any."""
        proto = "" if self.ip_protocol == 0 else f"[{self.ip_protocol}]"
        ports = "" if (self.start_port, self.end_port) == (0, 65535) else (
            f":{self.start_port}-{self.end_port}"
        )
        net = one_prefix(self.start, self.end)
        where = str(net) if net is not None else f"{self.start}-{self.end}"
        return f"{where}{proto}{ports}"


@dataclass(frozen=True)
class TSPayload:
    initiator: bool
    selectors: tuple[TrafficSelector, ...]


@dataclass(frozen=True)
class CPPayload:
    """A Configuration payload: its CFG Type and (attribute type, value) pairs, in order
    (the R bit cleared; an attribute of any type and length is kept, the engine reads those
    it knows)."""

    cfg_type: int
    attributes: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class EAPPayload:
    data: bytes


@dataclass(frozen=True)
class SKPayload:
    """The Encrypted payload, still sealed: ``first`` is the type of the first inner payload,
    ``offset`` where its body (IV onwards) starts in the message."""

    first: int
    body: bytes = field(repr=False)
    offset: int = 0


@dataclass(frozen=True)
class SKFPayload:
    """An Encrypted Fragment payload (RFC 7383 §2.5), still sealed."""

    first: int
    number: int
    total: int
    body: bytes = field(repr=False)
    offset: int = 0


Payload = (
    SAPayload
    | KEPayload
    | NoncePayload
    | IDPayload
    | AuthPayload
    | CertPayload
    | CertReqPayload
    | NotifyPayload
    | DeletePayload
    | VendorPayload
    | TSPayload
    | CPPayload
    | EAPPayload
    | SKPayload
    | SKFPayload
)


@dataclass(frozen=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & Flag.RESPONSE)

    @property
    def from_initiator(self) -> bool:
        return bool(self.flags & Flag.INITIATOR)

    def encode(self) -> bytes:
        return _HDR.pack(
            self.spi_i,
            self.spi_r,
            self.next_payload,
            VERSION,
            self.exchange,
            self.flags,
            self.message_id,
            self.length,
        )


_HDR = struct.Struct("!8s8sBBBBLL")
_GEN = struct.Struct("!BBH")


def decode_header(data: bytes) -> Header:
    """The IKE header of a whole datagram (the non-ESP marker already stripped)."""
    if len(data) < IKE_HEADER_LEN:
        raise IkeParseError(f"message of {len(data)} octets is shorter than the IKE header")
    spi_i, spi_r, nxt, version, exch, flags, mid, length = _HDR.unpack_from(data)
    if version >> 4 != 2:
        raise IkeParseError(f"IKE major version {version >> 4} is not 2")
    if length != len(data):
        raise IkeParseError(f"header says {length} octets, the datagram has {len(data)}")
    if spi_i == bytes(8):
        raise IkeParseError("initiator SPI is zero")
    return Header(spi_i, spi_r, nxt, exch, flags, mid, length)


# -- decoding -----------------------------------------------------------------------------


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise IkeParseError(f"{what} payload is truncated ({len(body)} octets, needs {n})")


_new = object.__new__


def _made_transform(ttype: int, tid: int, key_length: int | None) -> Transform:
    """``Transform(ttype, tid, key_length)``, the same object (equal, same hash and repr),
    without the frozen dataclass's ``__init__`` (an ``object.__setattr__`` per field: 2.5
    times the time). An SA payload from anyone at IKE_SA_INIT makes hundreds of them."""
    t = _new(Transform)
    d = t.__dict__
    d["type"] = ttype
    d["id"] = tid
    d["key_length"] = key_length
    return t


def _made_proposal(num: int, protocol: int, spi: bytes,
                   transforms: tuple[Transform, ...]) -> Proposal:  # fmt: skip
    """``Proposal(num, protocol, spi, transforms)``, made as :func:`_made_transform`."""
    p = _new(Proposal)
    d = p.__dict__
    d["num"] = num
    d["protocol"] = protocol
    d["spi"] = spi
    d["transforms"] = transforms
    return p


def _transform(data: bytes) -> Transform:
    ttype, _res, tid = _GEN.unpack_from(data)
    if len(data) == 4:  # (no attributes: all but an encryption's Key Length)
        return _made_transform(ttype, tid, None)
    attrs = data[4:]
    key_length = None
    while attrs:
        if len(attrs) < 4:
            raise IkeParseError("transform attribute is truncated")
        atype, aval = struct.unpack_from("!HH", attrs)
        if atype & 0x8000:
            if atype & 0x7FFF == 14:
                key_length = aval
            attrs = attrs[4:]
        else:
            if len(attrs) < 4 + aval:
                raise IkeParseError("transform attribute is truncated")
            if atype == 14:
                raise IkeParseError("Key Length attribute must be in TV form")
            attrs = attrs[4 + aval :]
    return _made_transform(ttype, tid, key_length)


_PROP = struct.Struct("!BBHBBBB")


def _sa(body: bytes) -> SAPayload:
    """An SA payload, read by offsets (no copies of what is left), each distinct transform
    made once per payload: it comes from anyone at IKE_SA_INIT, up to 255 proposals of up to
    255 transforms, and what reading it costs grows with the datagram alone (the same checks,
    the same exceptions as a transform at a time)."""
    props: list[Proposal] = []
    made: dict[bytes, Transform] = {}  # a transform's octets after last/more and length
    end = len(body)
    pos = 0
    while True:
        if end - pos < 8:
            raise IkeParseError("proposal substructure is truncated")
        last, _r, plen, num, proto, spisize, ntrans = _PROP.unpack_from(body, pos)
        if last not in (0, 2):
            raise IkeParseError(f"proposal substructure with last/more {last}")
        if plen < 8 + spisize or plen > end - pos:
            raise IkeParseError("proposal length does not fit")
        pend = pos + plen
        t = pos + 8 + spisize
        spi = body[pos + 8 : t]
        trs: list[Transform] = []
        for i in range(ntrans):
            if pend - t < 8:
                raise IkeParseError("transform substructure is truncated")
            tlast, _r2, tlen = _GEN.unpack_from(body, t)
            if tlen < 8 or tlen > pend - t:
                raise IkeParseError("transform length does not fit")
            if (tlast == 0) != (i == ntrans - 1) or tlast not in (0, 3):
                raise IkeParseError("transform last/more field disagrees with the count")
            key = body[t + 4 : t + tlen]
            tr = made.get(key)
            if tr is None:
                tr = made[key] = _transform(key)
            trs.append(tr)
            t += tlen
        if t != pend:
            raise IkeParseError("octets after the last transform of a proposal")
        props.append(_made_proposal(num, proto, spi, tuple(trs)))
        pos = pend
        if last == 0:
            break
    if pos != end:
        raise IkeParseError("octets after the last proposal")
    return SAPayload(tuple(props))


def _ts(body: bytes, initiator: bool) -> TSPayload:
    _need(body, 4, "TS")
    n = body[0]
    rest = body[4:]
    out: list[TrafficSelector] = []
    for _ in range(n):
        if len(rest) < 8:
            raise IkeParseError("traffic selector is truncated")
        ttype, proto, tlen, sp, ep = struct.unpack_from("!BBHHH", rest)
        alen = {TsType.IPV4_ADDR_RANGE: 4, TsType.IPV6_ADDR_RANGE: 16}.get(ttype)
        if alen is None:
            raise IkeParseError(f"traffic selector type {ttype} is not supported")
        if tlen != 8 + 2 * alen or tlen > len(rest):
            raise IkeParseError("traffic selector length does not fit its type")
        a, b = rest[8 : 8 + alen], rest[8 + alen : 8 + 2 * alen]
        mk = ipaddress.IPv4Address if alen == 4 else ipaddress.IPv6Address
        out.append(TrafficSelector(ttype, proto, sp, ep, mk(a), mk(b)))
        rest = rest[tlen:]
    if rest:
        raise IkeParseError("octets after the last traffic selector")
    if not out:
        raise IkeParseError("TS payload without selectors")
    return TSPayload(initiator, tuple(out))


def _cp(body: bytes) -> CPPayload:
    _need(body, 4, "CP")
    rest = body[4:]
    attrs: list[tuple[int, bytes]] = []
    while rest:
        if len(rest) < 4:
            raise IkeParseError("configuration attribute is truncated")
        atype, alen = struct.unpack_from("!HH", rest)
        if len(rest) < 4 + alen:
            raise IkeParseError("configuration attribute is truncated")
        if len(attrs) >= MAX_CP_ATTRIBUTES:
            raise IkeParseError(f"more than {MAX_CP_ATTRIBUTES} configuration attributes")
        attrs.append((atype & 0x7FFF, rest[4 : 4 + alen]))
        rest = rest[4 + alen :]
    return CPPayload(body[0], tuple(attrs))


def _payload(ptype: int, body: bytes, offset: int, nxt: int) -> Payload | None:
    if ptype == PayloadType.SA:
        return _sa(body)
    if ptype == PayloadType.KE:
        _need(body, 4, "KE")
        return KEPayload(struct.unpack_from("!H", body)[0], body[4:])
    if ptype == PayloadType.NONCE:
        if not 16 <= len(body) <= 256:
            raise IkeParseError(f"nonce of {len(body)} octets (16-256 allowed)")
        return NoncePayload(body)
    if ptype in (PayloadType.IDI, PayloadType.IDR):
        _need(body, 4, "ID")
        return IDPayload(ptype == PayloadType.IDI, body[0], body[4:])
    if ptype == PayloadType.AUTH:
        _need(body, 4, "AUTH")
        return AuthPayload(body[0], body[4:])
    if ptype == PayloadType.CERT:
        _need(body, 1, "CERT")
        return CertPayload(body[0], body[1:])
    if ptype == PayloadType.CERTREQ:
        _need(body, 1, "CERTREQ")
        return CertReqPayload(body[0], body[1:])
    if ptype == PayloadType.NOTIFY:
        _need(body, 4, "Notify")
        proto, spisize, ntype = struct.unpack_from("!BBH", body)
        _need(body, 4 + spisize, "Notify")
        return NotifyPayload(ntype, proto, body[4 : 4 + spisize], body[4 + spisize :])
    if ptype == PayloadType.DELETE:
        _need(body, 4, "Delete")
        proto, spisize, n = struct.unpack_from("!BBH", body)
        if len(body) != 4 + spisize * n:
            raise IkeParseError("Delete payload length disagrees with its SPI count")
        if proto == ProtocolId.IKE and (spisize, n) != (0, 0):
            raise IkeParseError("Delete of an IKE SA carries no SPIs")
        spis = tuple(body[4 + i * spisize : 4 + (i + 1) * spisize] for i in range(n))
        return DeletePayload(proto, spis)
    if ptype == PayloadType.VENDOR:
        return VendorPayload(body)
    if ptype in (PayloadType.TSI, PayloadType.TSR):
        return _ts(body, ptype == PayloadType.TSI)
    if ptype == PayloadType.CP:
        return _cp(body)
    if ptype == PayloadType.EAP:
        return EAPPayload(body)
    if ptype == PayloadType.SK:
        return SKPayload(nxt, body, offset)
    if ptype == PayloadType.SKF:
        _need(body, 4, "SKF")
        num, total = struct.unpack_from("!HH", body)
        if not 1 <= num <= total:
            raise IkeParseError(f"fragment {num} of {total}")
        return SKFPayload(nxt, num, total, body[4:], offset + 4)
    return None


def decode_payloads(data: bytes, first: int, base: int = 0) -> list[Payload]:
    """The chain of payloads in ``data`` starting with type ``first``. An unknown payload is
    skipped unless its critical bit is set (RFC 7296 §2.5). An SK or SKF payload must be last
    and its next-payload field names the first inner payload. ``base`` is where ``data`` starts
    in the message (for the encrypted payload's offset)."""
    out: list[Payload] = []
    nxt = first
    pos = 0
    count = 0
    while nxt != PayloadType.NONE:
        count += 1
        if count > 256:
            raise IkeParseError("more than 256 payloads")
        if len(data) - pos < 4:
            raise IkeParseError(f"payload {nxt} header is truncated")
        following, crit, plen = _GEN.unpack_from(data, pos)
        if plen < 4 or pos + plen > len(data):
            raise IkeParseError(f"payload {nxt} length {plen} does not fit")
        body = data[pos + 4 : pos + plen]
        p = _payload(nxt, body, base + pos + 4, following)
        if p is None:
            if crit & 0x80:
                raise IkeProtocolError(  # (§3.10.1: the data is the payload's type)
                    f"unknown critical payload {nxt}", Notify.UNSUPPORTED_CRITICAL_PAYLOAD,
                    bytes((nxt,)),
                )
        else:
            out.append(p)
        pos += plen
        if isinstance(p, SKPayload | SKFPayload):
            if pos != len(data):
                raise IkeParseError("the encrypted payload is not the last one")
            return out
        nxt = following
    if pos != len(data):
        raise IkeParseError(f"{len(data) - pos} octets after the last payload")
    return out


def decode(data: bytes) -> tuple[Header, list[Payload]]:
    hdr = decode_header(data)
    return hdr, decode_payloads(data[IKE_HEADER_LEN:], hdr.next_payload, IKE_HEADER_LEN)


# -- encoding -----------------------------------------------------------------------------


def _enc_transform(t: Transform, last: bool) -> bytes:
    attrs = b"" if t.key_length is None else struct.pack("!HH", 0x800E, t.key_length)
    return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), t.type, 0, t.id) + attrs


def _enc_proposal(p: Proposal, last: bool) -> bytes:
    trs = b"".join(
        _enc_transform(t, i == len(p.transforms) - 1) for i, t in enumerate(p.transforms)
    )
    return (
        struct.pack(
            "!BBHBBBB",
            0 if last else 2,
            0,
            8 + len(p.spi) + len(trs),
            p.num,
            p.protocol,
            len(p.spi),
            len(p.transforms),
        )
        + p.spi
        + trs
    )


def _enc_ts(ts: TrafficSelector) -> bytes:
    a, b = ts.start.packed, ts.end.packed
    return struct.pack("!BBHHH", ts.ts_type, ts.ip_protocol, 8 + 2 * len(a), ts.start_port,
                       ts.end_port) + a + b  # fmt: skip


def payload_type(p: Payload) -> int:
    if isinstance(p, IDPayload):
        return PayloadType.IDI if p.initiator else PayloadType.IDR
    if isinstance(p, TSPayload):
        return PayloadType.TSI if p.initiator else PayloadType.TSR
    return _TYPES[type(p)]


_TYPES: dict[type, int] = {
    SAPayload: PayloadType.SA,
    KEPayload: PayloadType.KE,
    NoncePayload: PayloadType.NONCE,
    AuthPayload: PayloadType.AUTH,
    CertPayload: PayloadType.CERT,
    CertReqPayload: PayloadType.CERTREQ,
    NotifyPayload: PayloadType.NOTIFY,
    DeletePayload: PayloadType.DELETE,
    VendorPayload: PayloadType.VENDOR,
    CPPayload: PayloadType.CP,
    EAPPayload: PayloadType.EAP,
    SKPayload: PayloadType.SK,
    SKFPayload: PayloadType.SKF,
}


def payload_body(p: Payload) -> bytes:
    if isinstance(p, SAPayload):
        n = len(p.proposals)
        return b"".join(_enc_proposal(x, i == n - 1) for i, x in enumerate(p.proposals))
    if isinstance(p, KEPayload):
        return struct.pack("!HH", p.group, 0) + p.data
    if isinstance(p, NoncePayload | VendorPayload | EAPPayload):
        return p.data
    if isinstance(p, IDPayload):
        return p.body
    if isinstance(p, AuthPayload):
        return bytes((p.method, 0, 0, 0)) + p.data
    if isinstance(p, CertPayload | CertReqPayload):
        return bytes((p.encoding,)) + p.data
    if isinstance(p, NotifyPayload):
        return struct.pack("!BBH", p.protocol, len(p.spi), p.type) + p.spi + p.data
    if isinstance(p, DeletePayload):
        size = len(p.spis[0]) if p.spis else 0
        return struct.pack("!BBH", p.protocol, size, len(p.spis)) + b"".join(p.spis)
    if isinstance(p, TSPayload):
        return bytes((len(p.selectors), 0, 0, 0)) + b"".join(_enc_ts(t) for t in p.selectors)
    if isinstance(p, CPPayload):
        attrs = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in p.attributes)
        return bytes((p.cfg_type, 0, 0, 0)) + attrs
    if isinstance(p, SKPayload):
        return p.body
    if isinstance(p, SKFPayload):
        return struct.pack("!HH", p.number, p.total) + p.body
    raise TypeError(type(p))


def encode_payloads(payloads: list[Payload], last_next: int = PayloadType.NONE) -> bytes:
    """The chain of payloads (without the encrypted payload's special case)."""
    parts = []
    for i, p in enumerate(payloads):
        nxt = payload_type(payloads[i + 1]) if i + 1 < len(payloads) else last_next
        body = payload_body(p)
        if len(body) + 4 > 0xFFFF:
            raise IkeParseError("payload longer than 65535 octets")
        parts.append(_GEN.pack(nxt, 0, 4 + len(body)) + body)
    return b"".join(parts)


def first_type(payloads: list[Payload]) -> int:
    return payload_type(payloads[0]) if payloads else PayloadType.NONE


def encode_plain(hdr: Header, payloads: list[Payload]) -> bytes:
    """A whole unencrypted message (IKE_SA_INIT); the header's length and next payload are
    filled in."""
    body = encode_payloads(payloads)
    h = Header(hdr.spi_i, hdr.spi_r, first_type(payloads), hdr.exchange, hdr.flags,
               hdr.message_id, IKE_HEADER_LEN + len(body))  # fmt: skip
    return h.encode() + body


def find(payloads: list[Payload], cls: type[_P]) -> _P | None:
    for p in payloads:
        if isinstance(p, cls):
            return p
    return None


def notifies(payloads: list[Payload]) -> dict[int, NotifyPayload]:
    out: dict[int, NotifyPayload] = {}
    for p in payloads:
        if isinstance(p, NotifyPayload):
            out.setdefault(p.type, p)
    return out


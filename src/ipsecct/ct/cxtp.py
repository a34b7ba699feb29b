"""CXTP messages (RFC 4067) and ipsecct's extension Context Data Blocks, sans-I/O.

Every message starts with the common header (32 bits, big-endian)::

    bits 0-2 Vers (= 1) | 3-7 Type | 8 V | 9 A/S | 10-15 reserved (0) | 16-31 Length (octets)

then the mobile node's previous IP address (4 octets if V = 1, 16 if V = 0), then a body that
depends on the type. Context Data Blocks (CDBs, RFC 4067 §2.4) are carried as opaque bytes
framed by their own header ``FPT(16) | Length(8, 8-octet units, header included) | P | Rsvd(7)``.

:func:`encode` and :func:`decode` are exact inverses: :func:`decode` accepts only what
:func:`encode` can produce (reserved bits zero, lengths consistent, no trailing bytes) and raises
:class:`CxtpError` for anything else. :class:`StreamDecoder` cuts a byte stream (TCP or TLS) into
messages, which delimit themselves by their Length field. See ``docs/cxtp.md`` for the wire
formats, the extension CDBs and the decisions taken where RFC 4067 is inconsistent.

Key material (the PCTD key, the CDBs) is kept out of ``repr`` and out of every error message.
"""

from __future__ import annotations

import enum
import hmac as _stdlib_hmac
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac

from ..errors import CxtpError
from ..ipsec.ippacket import IPAddress

VERSION = 1
HEADER_LEN = 4
MAX_MESSAGE_LEN = 0xFFFF  # the 16-bit Length field
CDB_HEADER_LEN = 4
MAX_CDB_LEN = 0xFF * 8  # the 8-bit Length field counts 8-octet units
TOKEN_LEN = 4
ALG_HMAC_SHA1 = 1  # the only token algorithm IANA registers (RFC 4065)
MAX_KEY_LEN = 64  # PCTD key length we accept (the HMAC-SHA1 block size)

# Timers (RFC 4067 §3 and §5), in milliseconds. RFC 4067 spells them both CXTP_* and CT_*;
# we use the CT_* spelling. CT_MAX_HANDOVER_TIME is used but never defined by the RFC: we define
# it as how long a source keeps forwarding and keeps a transferred SA after the cut-over.
CT_MAX_TRANSFER_TIME_MS = 200
CT_REQUEST_RETRY_MS = 2_000
CT_RETRY_MAX_MS = 15_000
CT_REQUEST_RATE = 10  # CTARs per second a router accepts from one MN
CT_MAX_HANDOVER_TIME_MS = 2_000

# Feature Profile Types. 0x8001 is the IPsec SA context (ipsecct.ct.context); ours follow it.
FPT_IPSEC_SA = 0x8001
FPT_TRANSFER = 0x8002  # transfer identifier and message sequence number
FPT_SA_RESULT = 0x8003  # outcome for one SA, including an SPI reassignment
FPT_DETAIL = 0x8004  # short human-readable status detail
EXT_FPT_MIN = 0x8002  # extension CDBs: 0x8002..0x80FF; never used in status entries
EXT_FPT_MAX = 0x80FF


class MsgType(enum.IntEnum):
    CTAR = 1  # Context Transfer Activate Request (MN -> nAR)
    CTAA = 2  # Context Transfer Activate Acknowledge (nAR -> MN)
    CTD = 3  # Context Transfer Data (pAR -> nAR)
    PCTD = 4  # Predictive Context Transfer Data (pAR -> nAR)
    CTDR = 5  # Context Transfer Data Reply (nAR -> pAR)
    CTC = 6  # Context Transfer Cancel (nAR -> pAR)
    CT_REQ = 7  # Context Transfer Request (nAR -> pAR)
    DQ = 8  # Decision Query and its answer (ours: a restarted source <-> the target)


class Answer(enum.IntEnum):
    """A :class:`DQ`'s Answer field."""

    QUERY = 0  # source -> target: did you take this transfer?
    TAKEN = 1  # target -> source: yes (or it may have sent on its tunnels): never resume
    NOT_TAKEN = 2  # target -> source: no, and it never will: the source may resume


class Status(enum.IntEnum):
    """Status codes of CTAA/CTDR entries and of SA_RESULT CDBs (ours; see docs/cxtp.md)."""

    SUCCESS = 0
    UNSUPPORTED_ALGORITHM = 1
    SPI_COLLISION = 2  # the target's policy is "deny"
    UNAUTHORISED = 3
    MALFORMED = 4
    BUSY = 5  # the SA is being transferred by someone else, or the target is overloaded
    ACCEPTED_RENEGOTIATE = 6  # installed despite an SPI collision, marked for rekey
    ACCEPTED_SPI_REASSIGNED = 7  # installed under a new inbound SPI (see SA_RESULT)
    UNKNOWN_CONTEXT = 8  # CT-Req for a context the source does not hold
    INTERNAL_ERROR = 9


SUCCESS_STATUSES = frozenset(
    {Status.SUCCESS, Status.ACCEPTED_RENEGOTIATE, Status.ACCEPTED_SPI_REASSIGNED}
)


def is_success(status: int) -> bool:
    """True if a status means the context was installed at the target."""
    return status in SUCCESS_STATUSES


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class StatusEntry:
    """One ``FPT(16) | Status(8) | Reserved(8)`` entry of a CTAA or CTDR."""

    fpt: int
    status: int


@dataclass(frozen=True, slots=True)
class CTAR:
    """MN -> nAR: activate the context transferred from (or to be fetched from) ``router``."""

    mn_prev: IPAddress
    router: IPAddress  # the other router's address (pAR when sent to nAR)
    seq: int
    token: bytes
    requested: tuple[bytes, ...] = ()
    ack_requested: bool = False


@dataclass(frozen=True, slots=True)
class CTAA:
    """nAR -> MN: acknowledge; ``statuses`` lists the FPTs that failed."""

    mn_prev: IPAddress
    statuses: tuple[StatusEntry, ...] = ()
    ext: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class CTD:
    """pAR -> nAR: context data (reactive, or the second half of a predictive transfer)."""

    mn_prev: IPAddress
    elapsed_ms: int
    cdbs: tuple[bytes, ...] = field(default=(), repr=False)
    ack_requested: bool = False


@dataclass(frozen=True, slots=True)
class PCTD:
    """pAR -> nAR: predictive context data with the MN's authorization key."""

    mn_prev: IPAddress
    elapsed_ms: int
    key: bytes = field(repr=False)
    cdbs: tuple[bytes, ...] = field(default=(), repr=False)
    ack_requested: bool = False
    algorithm: int = ALG_HMAC_SHA1


@dataclass(frozen=True, slots=True)
class CTDR:
    """nAR -> pAR: reply to CTD/PCTD; ``all_ok`` is the S bit."""

    mn_prev: IPAddress
    all_ok: bool
    statuses: tuple[StatusEntry, ...] = ()
    ext: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class CTC:
    """nAR -> pAR: cancel a context transfer (``ext`` names it with a TRANSFER CDB)."""

    mn_prev: IPAddress
    ext: tuple[bytes, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class CTReq:
    """nAR -> pAR: request the MN's contexts (reactive mode)."""

    mn_prev: IPAddress
    seq: int
    token: bytes
    requested: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class DQ:
    """Decision query (ours, docs/cxtp.md): a source restarted with a transfer whose outcome
    it does not know asks the target (``answer`` QUERY), which answers TAKEN or NOT_TAKEN;
    ``ext`` names the transfer with a TRANSFER CDB (extension CDBs only)."""

    mn_prev: IPAddress
    answer: int = Answer.QUERY
    ext: tuple[bytes, ...] = field(default=(), repr=False)


Message = CTAR | CTAA | CTD | PCTD | CTDR | CTC | CTReq | DQ

_TYPE_OF: dict[type, MsgType] = {
    CTAR: MsgType.CTAR,
    CTAA: MsgType.CTAA,
    CTD: MsgType.CTD,
    PCTD: MsgType.PCTD,
    CTDR: MsgType.CTDR,
    CTC: MsgType.CTC,
    CTReq: MsgType.CT_REQ,
    DQ: MsgType.DQ,
}


def message_type(msg: Message) -> MsgType:
    return _TYPE_OF[type(msg)]


# --------------------------------------------------------------------------------------------
# CDB framing


def cdb_fpt(cdb: bytes) -> int:
    """The Feature Profile Type of one framed CDB."""
    if len(cdb) < CDB_HEADER_LEN:
        raise CxtpError("CDB shorter than its header")
    return cdb[0] << 8 | cdb[1]  # (no slice and call: asked for every CDB of a bulk transfer)


def split_cdb_stream(data: bytes | memoryview) -> list[bytes]:
    """Cut concatenated CDBs into single framed CDBs, each checked only for its framing."""
    out: list[bytes] = []
    mv = memoryview(data)
    pos = 0
    end = len(mv)
    while pos < end:
        if end - pos < CDB_HEADER_LEN:
            raise CxtpError(f"truncated CDB header at offset {pos}")
        units = mv[pos + 2]
        if units == 0:
            raise CxtpError(f"CDB at offset {pos} has length 0")
        n = units * 8
        if pos + n > end:
            raise CxtpError(f"CDB at offset {pos} runs past the end ({n} octets declared)")
        out.append(bytes(mv[pos : pos + n]))
        pos += n
    return out


_OCTETS = (bytes, bytearray)  # (a tuple: ``bytes | bytearray`` makes a union at every call)


def _check_cdb(cdb: bytes, what: str) -> None:
    if not isinstance(cdb, _OCTETS):
        raise CxtpError(f"{what} must be bytes")
    n = len(cdb)  # (a multiple of 8 if its units say so)
    if n < 8 or n > MAX_CDB_LEN or cdb[2] * 8 != n:
        raise CxtpError(f"{what} is not one framed CDB")


_ANSWERS = frozenset(int(a) for a in Answer)


def _is_ext(fpt: int) -> bool:
    return EXT_FPT_MIN <= fpt <= EXT_FPT_MAX


# --------------------------------------------------------------------------------------------
# Encoding


def _addr_bytes(addr: IPAddress, v4: bool, what: str) -> bytes:
    if not isinstance(addr, IPAddress):
        raise CxtpError(f"{what} is not an IP address")
    if (addr.version == 4) != v4:
        raise CxtpError(f"{what} is not of the same address family as the MN's address")
    return addr.packed


def _u32(value: int, what: str) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise CxtpError(f"{what} out of range")
    return value.to_bytes(4, "big")


def _token(token: bytes) -> bytes:
    if not isinstance(token, bytes | bytearray) or len(token) != TOKEN_LEN:
        raise CxtpError("the authorization token must be 4 octets")
    return bytes(token)


def _statuses(entries: Iterable[StatusEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        if not 0 <= e.fpt <= 0xFFFF or _is_ext(e.fpt):
            raise CxtpError("status entry FPT out of range or in the extension range")
        if not 0 <= e.status <= 0xFF:
            raise CxtpError("status out of range")
        out += struct.pack("!HBB", e.fpt, e.status, 0)
    return bytes(out)


def _cdbs(cdbs: Sequence[bytes], what: str, *, ext_only: bool = False) -> bytes:
    out = bytearray()
    for c in cdbs:
        _check_cdb(c, what)
        if ext_only and not _is_ext(cdb_fpt(c)):
            raise CxtpError(f"{what} must be extension CDBs (FPT 0x{EXT_FPT_MIN:04x}-)")
        out += c
    return bytes(out)


def _body(msg: Message, v4: bool) -> tuple[bytes, bool]:
    """The body after the MN's address, and the A/S flag."""
    if isinstance(msg, CTAR):
        body = (
            _addr_bytes(msg.router, v4, "router address")
            + _u32(msg.seq, "sequence number")
            + _token(msg.token)
            + _cdbs(msg.requested, "requested CDB")
        )
        return body, msg.ack_requested
    if isinstance(msg, CTAA):
        return _cdbs(msg.ext, "extension CDB", ext_only=True) + _statuses(msg.statuses), False
    if isinstance(msg, CTD):
        return _u32(msg.elapsed_ms, "elapsed time") + _cdbs(msg.cdbs, "CDB"), msg.ack_requested
    if isinstance(msg, PCTD):
        key = msg.key
        if not isinstance(key, bytes | bytearray) or not 1 <= len(key) <= MAX_KEY_LEN:
            raise CxtpError(f"the PCTD key must be 1 to {MAX_KEY_LEN} octets")
        if msg.algorithm != ALG_HMAC_SHA1:
            raise CxtpError("unsupported token algorithm")
        pad = -len(key) % 4
        body = (
            _u32(msg.elapsed_ms, "elapsed time")
            + struct.pack("!HH", msg.algorithm, len(key))
            + bytes(key)
            + b"\x00" * pad
            + _cdbs(msg.cdbs, "CDB")
        )
        return body, msg.ack_requested
    if isinstance(msg, CTDR):
        return _cdbs(msg.ext, "extension CDB", ext_only=True) + _statuses(msg.statuses), msg.all_ok
    if isinstance(msg, CTC):
        return _cdbs(msg.ext, "extension CDB", ext_only=True), False
    if isinstance(msg, DQ):
        if not isinstance(msg.answer, int) or msg.answer not in _ANSWERS:
            raise CxtpError("decision query answer out of range")
        body = struct.pack("!B3x", msg.answer) + _cdbs(msg.ext, "extension CDB", ext_only=True)
        return body, False
    if isinstance(msg, CTReq):
        body = (
            _u32(msg.seq, "sequence number")
            + _token(msg.token)
            + _cdbs(msg.requested, "requested CDB")
        )
        return body, False
    raise CxtpError(f"not a CXTP message: {type(msg).__name__}")


def encode(msg: Message) -> bytes:
    """The wire form of one message. Raises :class:`CxtpError` if it does not fit."""
    mtype = _TYPE_OF.get(type(msg))
    if mtype is None:
        raise CxtpError(f"not a CXTP message: {type(msg).__name__}")
    prev = msg.mn_prev
    if not isinstance(prev, IPAddress):
        raise CxtpError("the MN's previous address is not an IP address")
    packed = prev.packed  # (once: ``packed`` and ``version`` are Python-level calls)
    v4 = len(packed) == 4
    body, flag = _body(msg, v4)
    length = HEADER_LEN + len(packed) + len(body)
    if length > MAX_MESSAGE_LEN:
        raise CxtpError(f"message of {length} octets exceeds {MAX_MESSAGE_LEN}")
    first = (VERSION << 13) | (int(mtype) << 8) | (int(v4) << 7) | (int(flag) << 6)
    return struct.pack("!HH", first, length) + packed + body


# --------------------------------------------------------------------------------------------
# Decoding


def peek_header(data: bytes | memoryview) -> tuple[MsgType, int]:
    """Check a message's first 4 octets; return its type and declared length."""
    if len(data) < HEADER_LEN:
        raise CxtpError("truncated CXTP header")
    first, length = struct.unpack_from("!HH", data, 0)
    version = first >> 13
    if version != VERSION:
        raise CxtpError(f"unsupported CXTP version {version}")
    mtype = _MSG_TYPES.get((first >> 8) & 0x1F)  # (MsgType(n) is two Python-level calls)
    if mtype is None:
        raise CxtpError(f"unknown CXTP message type {(first >> 8) & 0x1F}")
    if first & 0x3F:
        raise CxtpError("reserved header bits are not zero")
    flag = bool(first & 0x40)
    if flag and mtype not in (MsgType.CTAR, MsgType.CTD, MsgType.PCTD, MsgType.CTDR):
        raise CxtpError(f"A/S bit set on a {mtype.name}")
    addr_len = 4 if first & 0x80 else 16
    if length < _min_len(mtype, addr_len):
        raise CxtpError(f"{mtype.name} length {length} is too short")
    return mtype, length


_MSG_TYPES = {int(t): t for t in MsgType}
# Octets each type has after the header and its address (a CTAR: one more address, then 8)
_FIXED = {
    MsgType.CTAR: 8,
    MsgType.CTAA: 0,
    MsgType.CTD: 4,
    MsgType.PCTD: 8 + 4,  # elapsed, algorithm, key length, at least one padded key word
    MsgType.CTDR: 0,
    MsgType.CTC: 0,
    MsgType.CT_REQ: 8,
    MsgType.DQ: 4,  # Answer, Reserved
}


def _min_len(mtype: MsgType, addr_len: int) -> int:
    fixed = _FIXED[mtype] + (addr_len if mtype is MsgType.CTAR else 0)
    return HEADER_LEN + addr_len + fixed


def _split_ext_statuses(body: memoryview) -> tuple[tuple[bytes, ...], tuple[StatusEntry, ...]]:
    ext: list[bytes] = []
    pos = 0
    end = len(body)
    while end - pos >= 4 and _is_ext(int.from_bytes(body[pos : pos + 2], "big")):
        units = body[pos + 2]
        if units == 0 or pos + units * 8 > end:
            raise CxtpError("truncated or empty extension CDB")
        ext.append(bytes(body[pos : pos + units * 8]))
        pos += units * 8
    if (end - pos) % 4:
        raise CxtpError("status list is not a whole number of entries")
    entries: list[StatusEntry] = []
    for off in range(pos, end, 4):
        fpt, status, rsvd = struct.unpack_from("!HBB", body, off)
        if rsvd:
            raise CxtpError("reserved octet of a status entry is not zero")
        if _is_ext(fpt):
            raise CxtpError("status entry with an extension FPT")
        entries.append(StatusEntry(fpt, status))
    return tuple(ext), tuple(entries)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse exactly one message. Raises :class:`CxtpError` on anything malformed."""
    mv = memoryview(bytes(data)) if not isinstance(data, bytes) else memoryview(data)
    mtype, length = peek_header(mv)
    if length != len(mv):
        if length > len(mv):
            raise CxtpError(f"truncated {mtype.name}: {len(mv)} of {length} octets")
        raise CxtpError(f"{len(mv) - length} trailing octets after a {mtype.name}")
    first = mv[0] << 8 | mv[1]
    v4 = bool(first & 0x80)
    flag = bool(first & 0x40)
    alen = 4 if v4 else 16

    def addr(off: int) -> IPAddress:
        raw = bytes(mv[off : off + alen])
        return ipaddress.IPv4Address(raw) if v4 else ipaddress.IPv6Address(raw)

    prev = addr(HEADER_LEN)
    pos = HEADER_LEN + alen
    body = mv[pos:]
    if mtype is MsgType.CTAR:
        router = addr(pos)
        seq, token = struct.unpack_from("!I4s", mv, pos + alen)
        req = tuple(split_cdb_stream(mv[pos + alen + 8 :]))
        return CTAR(prev, router, seq, token, req, flag)
    if mtype is MsgType.CTAA:
        ext, entries = _split_ext_statuses(body)
        return CTAA(prev, entries, ext)
    if mtype is MsgType.CTD:
        (elapsed,) = struct.unpack_from("!I", mv, pos)
        return CTD(prev, elapsed, tuple(split_cdb_stream(mv[pos + 4 :])), flag)
    if mtype is MsgType.PCTD:
        elapsed, alg, klen = struct.unpack_from("!IHH", mv, pos)
        if alg != ALG_HMAC_SHA1:
            raise CxtpError(f"unsupported token algorithm {alg}")
        if not 1 <= klen <= MAX_KEY_LEN:
            raise CxtpError(f"PCTD key length {klen} out of range")
        kstart = pos + 8
        kend = kstart + klen + (-klen % 4)
        if kend > length:
            raise CxtpError("truncated PCTD key")
        key = bytes(mv[kstart : kstart + klen])
        if any(mv[kstart + klen : kend]):
            raise CxtpError("PCTD key padding is not zero")
        return PCTD(prev, elapsed, key, tuple(split_cdb_stream(mv[kend:])), flag, alg)
    if mtype is MsgType.CTDR:
        ext, entries = _split_ext_statuses(body)
        return CTDR(prev, flag, entries, ext)
    if mtype is MsgType.CTC:
        cdbs = split_cdb_stream(body)
        if not all(_is_ext(cdb_fpt(c)) for c in cdbs):
            raise CxtpError("CTC carries a non-extension CDB")
        return CTC(prev, tuple(cdbs))
    if mtype is MsgType.DQ:
        answer = mv[pos]
        if answer not in _ANSWERS:
            raise CxtpError(f"unknown decision query answer {answer}")
        if any(mv[pos + 1 : pos + 4]):
            raise CxtpError("reserved octets of a decision query are not zero")
        cdbs = split_cdb_stream(mv[pos + 4 :])
        if not all(_is_ext(cdb_fpt(c)) for c in cdbs):
            raise CxtpError("decision query carries a non-extension CDB")
        return DQ(prev, Answer(answer), tuple(cdbs))
    # CT-Req
    seq, token = struct.unpack_from("!I4s", mv, pos)
    return CTReq(prev, seq, token, tuple(split_cdb_stream(mv[pos + 8 :])))


# --------------------------------------------------------------------------------------------
# The MN authorization token (RFC 4067 §2.5.1)


def _token_input(prev: IPAddress, seq: int, cdbs: Sequence[bytes]) -> bytes:
    return prev.packed + _u32(seq, "sequence number") + b"".join(cdbs)


def compute_token(key: bytes, prev: IPAddress, seq: int, cdbs: Sequence[bytes] = ()) -> bytes:
    """First 32 bits of HMAC-SHA1(key, previous address | sequence number | CDBs)."""
    if not key:
        raise CxtpError("empty token key")
    h = _hmac.HMAC(bytes(key), hashes.SHA1())
    h.update(_token_input(prev, seq, cdbs))
    return h.finalize()[:TOKEN_LEN]


def verify_token(
    key: bytes, prev: IPAddress, seq: int, cdbs: Sequence[bytes], token: bytes
) -> bool:
    """Constant-time check of a CTAR's or CT-Req's token."""
    expected = compute_token(key, prev, seq, cdbs)
    return _stdlib_hmac.compare_digest(expected, bytes(token))


def verify_message_token(key: bytes, msg: CTAR | CTReq) -> bool:
    return verify_token(key, msg.mn_prev, msg.seq, msg.requested, msg.token)


# --------------------------------------------------------------------------------------------
# Stream framing over TCP/TLS


class StreamDecoder:
    """Cut a byte stream into CXTP messages using each message's Length field.

    Feed it bytes as they arrive; it returns the complete messages. A header is checked as soon
    as its 4 octets arrive, so garbage is refused without waiting for the declared length. After
    an error the stream has lost its framing: every later :meth:`feed` raises again.
    """

    def __init__(self, max_message: int = MAX_MESSAGE_LEN) -> None:
        if not HEADER_LEN <= max_message <= MAX_MESSAGE_LEN:
            raise CxtpError(f"max_message must be {HEADER_LEN} to {MAX_MESSAGE_LEN}")
        self.max_message = max_message
        self._buf = bytearray()
        self._failed: str | None = None

    @property
    def pending(self) -> int:
        """Octets received that do not yet make a whole message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._failed is not None:
            raise CxtpError(f"stream already failed: {self._failed}")
        self._buf += data
        out: list[Message] = []
        pos = 0
        buf = self._buf
        try:
            while len(buf) - pos >= HEADER_LEN:
                _, length = peek_header(memoryview(buf)[pos : pos + HEADER_LEN])
                if length > self.max_message:
                    raise CxtpError(f"message of {length} octets exceeds {self.max_message}")
                if len(buf) - pos < length:
                    break
                out.append(decode(bytes(buf[pos : pos + length])))
                pos += length
        except CxtpError as exc:
            self._failed = str(exc)
            self._buf = bytearray()
            raise
        del buf[:pos]
        return out

    def at_boundary(self) -> bool:
        """True if the stream could end here cleanly (no partial message)."""
        return not self._buf and self._failed is None


# --------------------------------------------------------------------------------------------
# Extension CDBs (see docs/cxtp.md)


def _frame(fpt: int, payload: bytes) -> bytes:
    total = CDB_HEADER_LEN + len(payload)
    total += -total % 8
    if total > MAX_CDB_LEN:
        raise CxtpError("CDB too long")
    return (
        struct.pack("!HBB", fpt, total // 8, 0)
        + payload
        + b"\x00" * (total - CDB_HEADER_LEN - len(payload))
    )


def _unframe(cdb: bytes, fpt: int, name: str) -> bytes:
    _check_cdb(cdb, f"{name} CDB")
    if cdb_fpt(cdb) != fpt:
        raise CxtpError(f"not a {name} CDB")
    if cdb[3] != 0:
        raise CxtpError(f"{name} CDB has P or reserved bits set")
    return cdb[CDB_HEADER_LEN:]


TRANSFER_FLAG_LAST = 0x80


@dataclass(frozen=True, slots=True)
class TransferTag:
    """FPT 0x8002, first CDB of every inter-gateway message of one transfer.

    ``transfer_id`` is a random 64-bit nonce the initiator picks; ``seq`` numbers the messages
    each side sends within the transfer from 0; ``last`` marks the final data message of a
    batched transfer. A receiver refuses a (peer, transfer_id, seq) it has already seen.
    """

    transfer_id: int
    seq: int
    last: bool = True

    def encode(self) -> bytes:
        if not 0 <= self.transfer_id < 1 << 64:
            raise CxtpError("transfer id out of range")
        payload = (
            self.transfer_id.to_bytes(8, "big")
            + _u32(self.seq, "transfer sequence number")
            + bytes([TRANSFER_FLAG_LAST if self.last else 0, 0, 0, 0])
        )
        return _frame(FPT_TRANSFER, payload)

    @classmethod
    def decode(cls, cdb: bytes) -> TransferTag:
        p = _unframe(cdb, FPT_TRANSFER, "TRANSFER")
        if len(p) != 20:
            raise CxtpError("TRANSFER CDB has the wrong length")
        tid, seq, flags = struct.unpack_from("!QIB", p, 0)
        if flags & ~TRANSFER_FLAG_LAST or any(p[13:]):
            raise CxtpError("TRANSFER CDB has reserved bits set")
        return cls(tid, seq, bool(flags & TRANSFER_FLAG_LAST))


@dataclass(frozen=True, slots=True)
class SaResult:
    """FPT 0x8003: the outcome for one SA, named by (dst, protocol, spi).

    ``new_spi`` differs from ``spi`` only when the target gave the inbound SA a new SPI
    (status ACCEPTED_SPI_REASSIGNED); otherwise it equals ``spi``.
    """

    status: int
    protocol: int
    spi: int
    new_spi: int
    dst: IPAddress

    def encode(self) -> bytes:
        if not 0 <= self.status <= 0xFF or self.protocol not in (50, 51):
            raise CxtpError("SA_RESULT status or protocol out of range")
        if not isinstance(self.dst, IPAddress):
            raise CxtpError("SA_RESULT destination is not an IP address")
        v4 = self.dst.version == 4
        payload = (
            bytes([self.status, self.protocol, 0x80 if v4 else 0, 0])
            + _u32(self.spi, "SPI")
            + _u32(self.new_spi, "new SPI")
            + self.dst.packed
        )
        return _frame(FPT_SA_RESULT, payload)

    @classmethod
    def decode(cls, cdb: bytes) -> SaResult:
        p = _unframe(cdb, FPT_SA_RESULT, "SA_RESULT")
        if len(p) < 12:
            raise CxtpError("SA_RESULT CDB too short")
        status, proto, flags, rsvd, spi, new_spi = struct.unpack_from("!BBBBII", p, 0)
        if flags & 0x7F or rsvd:
            raise CxtpError("SA_RESULT CDB has reserved bits set")
        if proto not in (50, 51):
            raise CxtpError(f"SA_RESULT protocol {proto} is neither ESP nor AH")
        alen = 4 if flags & 0x80 else 16
        expect = 12 + alen
        if len(p) != expect + (-(expect + CDB_HEADER_LEN) % 8) or any(p[expect:]):
            raise CxtpError("SA_RESULT CDB has the wrong length or padding")
        raw = p[12:expect]
        dst: IPAddress = ipaddress.IPv4Address(raw) if alen == 4 else ipaddress.IPv6Address(raw)
        return cls(status, proto, spi, new_spi, dst)


MAX_DETAIL_LEN = 200


@dataclass(frozen=True, slots=True)
class Detail:
    """FPT 0x8004: printable UTF-8 text (at most 200 octets) explaining the CDB before it."""

    text: str

    def encode(self) -> bytes:
        raw = self.text.encode("utf-8")
        if len(raw) > MAX_DETAIL_LEN or not self.text.isprintable():
            raise CxtpError(f"detail text must be printable and at most {MAX_DETAIL_LEN} octets")
        return _frame(FPT_DETAIL, bytes([len(raw)]) + raw)

    @classmethod
    def decode(cls, cdb: bytes) -> Detail:
        p = _unframe(cdb, FPT_DETAIL, "DETAIL")
        n = p[0] if p else 0
        if n > MAX_DETAIL_LEN or 1 + n > len(p):
            raise CxtpError("DETAIL CDB text length out of range")
        if len(p) != 1 + n + (-(1 + n + CDB_HEADER_LEN) % 8) or any(p[1 + n :]):
            raise CxtpError("DETAIL CDB has the wrong length or padding")
        try:
            text = p[1 : 1 + n].decode("utf-8")
        except UnicodeDecodeError:
            raise CxtpError("DETAIL text is not UTF-8") from None
        if not text.isprintable():
            raise CxtpError("DETAIL text is not printable")
        return cls(text)


def message_cdbs(msg: Message) -> tuple[bytes, ...]:
    """The CDBs a message carries, whatever its type."""
    if isinstance(msg, CTAR | CTReq):
        return msg.requested
    if isinstance(msg, CTD | PCTD):
        return msg.cdbs
    if isinstance(msg, CTAA | CTDR | CTC | DQ):
        return msg.ext
    return ()


def transfer_tag(msg: Message) -> TransferTag | None:
    """The TRANSFER CDB if it is the message's first CDB, else None."""
    cdbs = message_cdbs(msg)
    if not cdbs or cdb_fpt(cdbs[0]) != FPT_TRANSFER:
        return None
    return TransferTag.decode(cdbs[0])


# --------------------------------------------------------------------------------------------
# Bulk transfers: more CDBs than one 64 KiB message holds


def batch_cdbs(
    template: CTD | PCTD,
    cdbs: Sequence[bytes],
    transfer_id: int,
    *,
    first_seq: int = 0,
    max_len: int = MAX_MESSAGE_LEN,
) -> list[CTD | PCTD]:
    """Split ``cdbs`` over as many copies of ``template`` as needed, each under ``max_len``.

    Each message starts with a TRANSFER CDB (``transfer_id``, consecutive sequence numbers from
    ``first_seq``, LAST on the final one); the template's own CDBs are replaced. An empty
    ``cdbs`` still gives one message.
    """
    overhead = len(encode(replace(template, cdbs=()))) + len(TransferTag(transfer_id, 0).encode())
    room = max_len - overhead
    groups: list[list[bytes]] = [[]]
    used = 0
    for c in cdbs:
        _check_cdb(c, "CDB")
        if len(c) > room:
            raise CxtpError(f"max_len {max_len} leaves no room for a {len(c)}-octet CDB")
        if used + len(c) > room:
            groups.append([])
            used = 0
        groups[-1].append(c)
        used += len(c)
    out: list[CTD | PCTD] = []
    for i, g in enumerate(groups):
        tag = TransferTag(transfer_id, first_seq + i, last=i == len(groups) - 1)
        out.append(replace(template, cdbs=(tag.encode(), *g)))
    return out

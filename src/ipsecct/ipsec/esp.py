"""ESP packet framing (RFC 4303): ``SPI | Sequence Number | IV | ciphertext | ICV`` where the
plaintext is ``payload | padding | pad length | next header``.

These functions work on one SA and never raise on bad input: they return a :class:`Drop`
reason, which the caller counts. Padding is the RFC's 1, 2, 3, ... and is checked on input;
next header 59 marks a dummy packet (RFC 4303 §2.6), dropped after it verified; TFC padding
(RFC 4303 §2.7) is left for the caller to strip using the inner packet's own length.

They are the SA's data path and read its hot fields (``_transform``, ``_window``,
``_limits_unset``) directly: every property or method call saved here is measurable against
the cost of the AEAD call itself (``ipsecct bench codec``).
"""

from __future__ import annotations

import enum
import struct

from .native import reclaim
from .sad import MAX_SEQ_32, MAX_SEQ_64, SecurityAssociation
from .sad import PACKETS as _PACKETS
from .sad import TOUCHED as _TOUCHED
from .sad import TOUCHED_MAX as _TOUCHED_MAX
from .sad import TOUCHED_OVERFLOW as _TOUCHED_OVERFLOW
from .transforms import PAD, EspTransform, IntegrityFailure

NH_NONE = 59
_HDR = struct.Struct("!LL")
_SEQ = struct.Struct("!L")
_PAD = PAD
# _PAD_CHECK[n]: the n padding octets followed by the pad length octet itself.
_PAD_CHECK = tuple(_PAD[:n] + bytes((n,)) for n in range(256))
# SecurityAssociation.next_seq() raises SEQ_NEAR_LIMIT at limit - limit // 8.
_NEAR_32 = MAX_SEQ_32 - (MAX_SEQ_32 >> 3)
_NEAR_64 = MAX_SEQ_64 - (MAX_SEQ_64 >> 3)


class Drop(enum.Enum):
    """Why the data path rejected a packet; every rejected packet is counted by one of these."""

    NO_SA = "no_sa"
    REPLAY = "replay"
    ICV = "icv"
    PADDING = "padding"
    POLICY = "policy"
    LIFETIME = "lifetime"
    MALFORMED = "malformed"
    SEQ_EXHAUSTED = "seq_exhausted"
    DUMMY = "dummy"
    MTU = "mtu"
    FENCED = "fenced"  # this gateway's lease on the SA ran out (fail-over fencing)
    # (New reasons go last: the native path's drop codes are indices in this order.)
    SEQ_UNRESERVED = "seq_unreserved"  # above the durable ceiling: waiting for a reservation


def spi_seq(packet: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(SPI, low 32 bits of the sequence number) of an ESP or AH-less packet, or None."""
    if len(packet) < 8:
        return None
    spi, seq = _HDR.unpack_from(packet)
    return spi, seq


def overhead(sa: SecurityAssociation, payload_len: int) -> int:
    """Octets ESP adds to a payload of ``payload_len`` (header, IV, padding, trailer, ICV)."""
    t = sa.transform
    padded = payload_len + 2
    padded += (-padded) % t.block
    return 8 + t.iv_len + padded - payload_len + t.icv_len


def encapsulate(
    sa: SecurityAssociation,
    next_header: int,
    payload: bytes | bytearray | memoryview,
    now: float,
    *,
    tfc_pad: int = 0,
) -> bytearray | Drop:
    """Protect ``payload`` on outbound SA ``sa``; returns the ESP packet (SPI .. ICV)."""
    c = sa.native
    if c is not None and c.active:  # the native path owns its state: take it back first
        reclaim(sa)
    if sa.dead or (sa.hard.seconds is not None and sa.expired(now)):
        return Drop.LIFETIME
    # Fast path of SecurityAssociation.next_seq(): far below the limit and the near-limit mark
    # it only increments the counter; below the reservation's low-water mark (and ceiling) it
    # needs no durable reservation either. Anything else goes through next_seq() itself.
    seq = sa.seq + 1
    if (
        seq < (_NEAR_64 if sa.esn else _NEAR_32)
        and seq < sa.seq_low_water
        and seq <= sa.seq_ceiling
    ):
        sa.seq = seq
    else:
        nxt = sa.next_seq()
        if nxt is None:
            return Drop.SEQ_EXHAUSTED if sa.seq_unavailable() else Drop.SEQ_UNRESERVED
        seq = nxt
    t = sa._transform
    if t is None:  # an AH SA
        return Drop.POLICY
    n = len(payload)
    out = t.seal_payload(sa.spi, seq, payload, next_header, tfc_pad, sa.esn)
    if sa._limits_unset:  # what sa.account() does when there are no lifetime limits
        c = sa.counters
        c.packets += 1
        _PACKETS[0] += 1
        if len(_TOUCHED) < _TOUCHED_MAX:
            _TOUCHED.add(sa)
        elif sa not in _TOUCHED:
            _TOUCHED_OVERFLOW[0] = True
        c.bytes += n
    else:
        sa.account(n, now)
    return out


def _too_old_or_icv(
    t: EspTransform, packet: bytes | bytearray | memoryview, seq: int, top: int, esn: bool
) -> Drop:
    """Why a packet whose ICV failed under ``seq`` is dropped. With ESN, low-order bits left
    of the replay window are read as the next 2^32 subspace (RFC 4303 A2.2), so a packet the
    peer really sent but that arrives after more than a window of newer ones fails its ICV:
    if it is authentic under the subspace of the window's top it is too old (a replay drop,
    as it would be without ESN), not corrupted or forged. The second check is made only in
    that case (a failure whose number was taken as the next subspace)."""
    if esn and seq >> 32 > top >> 32:
        try:
            t.open_payload(packet, seq - (1 << 32), True)
        except IntegrityFailure:
            return Drop.ICV
        return Drop.REPLAY
    return Drop.ICV


def authenticate(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> Drop | None:
    """Would ``packet`` pass :func:`decapsulate` on ``sa`` right now? None if yes, else why not.

    The ICV is verified and the replay window consulted, but nothing changes: not the window,
    not the counters. A gateway uses it before it keeps a packet of a tunnel that is being
    transferred, so that only what the real peer sent takes room in the held queue.
    """
    if len(packet) < 8:
        return Drop.MALFORMED
    if sa.dead or (sa.hard.seconds is not None and sa.expired(now)):
        return Drop.LIFETIME
    t = sa._transform
    if t is None:
        return Drop.POLICY
    window = sa._window
    seq = _SEQ.unpack_from(packet, 4)[0]
    if window.esn:
        seq = window.infer(seq)
        if seq > MAX_SEQ_64:
            return Drop.ICV
    if seq <= window.top and not window.check(seq):
        return Drop.REPLAY
    try:
        t.open_payload(packet, seq, sa.esn)
    except IntegrityFailure:
        return _too_old_or_icv(t, packet, seq, window.top, window.esn)
    return None


def decapsulate(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> tuple[int, bytes] | Drop:
    """Verify and decrypt ``packet`` (SPI .. ICV) on inbound SA ``sa``.

    Returns (next header, payload with padding removed; TFC padding, if any, still there).
    The replay window is checked before and updated only after the ICV verified.
    """
    c = sa.native
    if c is not None and c.active:  # the native path owns its state: take it back first
        reclaim(sa)
    if len(packet) < 8:
        return Drop.MALFORMED
    if sa.dead or (sa.hard.seconds is not None and sa.expired(now)):
        return Drop.LIFETIME
    t = sa._transform
    if t is None:  # an AH SA
        return Drop.POLICY
    window = sa._window
    seq = _SEQ.unpack_from(packet, 4)[0]
    if window.esn:
        seq = window.infer(seq)
        if seq > MAX_SEQ_64:
            # Inferred past the last 64-bit number, which no sender can have sent: with any
            # high-order bits that exist, this packet's ICV would not verify.
            return Drop.ICV
    # window.check() is True for anything above the top (seq > top >= 0 is never 0): skip the
    # call for in-order packets
    if seq <= window.top and not window.check(seq):
        return Drop.REPLAY
    try:
        pt = t.open_payload(packet, seq, sa.esn)
    except IntegrityFailure:
        return _too_old_or_icv(t, packet, seq, window.top, window.esn)
    window.update(seq)
    n = len(pt)
    if n < 2:
        return Drop.PADDING
    padlen = pt[-2]
    # pt[n - 2 - padlen : n - 1] must be 1, 2, ..., padlen, padlen (and fit in pt)
    if not pt.endswith(_PAD_CHECK[padlen], 0, n - 1):
        return Drop.PADDING
    end = n - 2 - padlen
    if sa._limits_unset:  # what sa.account() does when there are no lifetime limits
        c = sa.counters
        c.packets += 1
        _PACKETS[0] += 1
        if len(_TOUCHED) < _TOUCHED_MAX:
            _TOUCHED.add(sa)
        elif sa not in _TOUCHED:
            _TOUCHED_OVERFLOW[0] = True
        c.bytes += end
    else:
        sa.account(end, now)
    if pt[-1] == NH_NONE:
        return Drop.DUMMY
    return pt[-1], pt[:end]

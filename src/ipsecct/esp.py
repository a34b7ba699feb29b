"""ESP packet framing (RFC 4303): ``SPI | Sequence Number | IV | ciphertext | ICV`` where the
plaintext is ``payload | padding | pad length | next header``.

These functions work on one SA and never raise on bad input: they return a :class:`Drop`
reason, which the caller counts. Padding is the RFC's 1, 2, 3, ... and is checked on input;
next header 59 marks a dummy packet (RFC 4303 §2.6), dropped after it verified; TFC padding
(RFC 4303 §2.7) is left for the caller to strip using the inner packet's own length.
"""

from __future__ import annotations

import enum
import struct

from .sad import SecurityAssociation
from .transforms import IntegrityFailure

NH_NONE = 59
_HDR = struct.Struct("!LL")
_PAD = bytes(range(1, 256))


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
    if sa.dead or sa.expired(now):
        return Drop.LIFETIME
    seq = sa.next_seq()
    if seq is None:
        if not sa.rekey_requested:
            from .sad import SAEvent

            sa.rekey_requested = True
            sa.events.append(SAEvent.SEQ_EXHAUSTED)
        return Drop.SEQ_EXHAUSTED
    t = sa.transform
    n = len(payload) + tfc_pad
    padlen = (-(n + 2)) % t.block
    pt = bytearray(payload)
    if tfc_pad:
        pt += bytes(tfc_pad)
    pt += _PAD[:padlen]
    pt.append(padlen)
    pt.append(next_header)
    out = t.seal(_HDR.pack(sa.spi, seq & 0xFFFFFFFF), seq, pt, sa.esn)
    sa.account(len(payload), now)
    return out


def decapsulate(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> tuple[int, bytes] | Drop:
    """Verify and decrypt ``packet`` (SPI .. ICV) on inbound SA ``sa``.

    Returns (next header, payload with padding removed; TFC padding, if any, still there).
    The replay window is checked before and updated only after the ICV verified.
    """
    if len(packet) < 8:
        return Drop.MALFORMED
    if sa.dead or sa.expired(now):
        return Drop.LIFETIME
    seq_low = _HDR.unpack_from(packet)[1]
    window = sa.window
    seq = window.infer(seq_low)
    if not window.check(seq):
        return Drop.REPLAY
    mv = packet if isinstance(packet, memoryview) else memoryview(packet)
    try:
        pt = sa.transform.open(mv, seq, sa.esn)
    except IntegrityFailure:
        return Drop.ICV
    window.update(seq)
    if len(pt) < 2:
        return Drop.PADDING
    padlen = pt[-2]
    nh = pt[-1]
    end = len(pt) - 2 - padlen
    if end < 0 or pt[end:-2] != _PAD[:padlen]:
        return Drop.PADDING
    sa.account(end, now)
    if nh == NH_NONE:
        return Drop.DUMMY
    return nh, pt[:end]

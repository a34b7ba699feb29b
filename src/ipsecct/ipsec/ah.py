"""The IP Authentication Header (RFC 4302), tunnel and transport mode, IPv4 and IPv6.

An AH header is ``Next Header | Payload Length | Reserved | SPI | Sequence Number | ICV``;
Payload Length is the header's length in 32-bit words minus 2. The ICV is an HMAC
(HMAC-SHA2-256-128, -384-192, -512-256 of RFC 4868 or HMAC-SHA1-96 of RFC 2404) computed over

* the IP header with its mutable fields zeroed (RFC 4302 §3.3.3.1): IPv4 TOS, flags, fragment
  offset, TTL and header checksum; IPv4 options other than those Appendix A lists as immutable
  (End of List, No Operation, Security, Extended Security, Commercial Security, Router Alert,
  Sender Directed Multi-Destination Delivery) are zeroed whole, type and length included; IPv6
  traffic class, flow label and hop limit;
* IPv6 extension headers before AH: Hop-by-Hop and Destination Options headers with the data
  of every option whose "may change en route" bit (0x20 of the option type) is set zeroed;
* the AH header with its ICV field zeroed (the alignment padding after the ICV included as
  sent: the padding is part of the "ICV" field for the length, not for the zeroing, like
  Linux and Scapy);
* the payload, and with ESN the high-order 32 bits of the sequence number appended implicitly
  after it (RFC 4302 §2.5.1, §3.3.3.2.2).

The header is padded to a multiple of 32 bits (IPv4) or 64 bits (IPv6) (RFC 4302 §3.3.3.2.1):
of the algorithms here only IPv6 with a 16, 24 or 32-octet ICV needs 4 octets of padding.

Limits, documented rather than guessed at:

* An IPv6 Routing header before AH is accepted only with Segments Left 0 (inbound: the packet
  has reached its final destination, the header is covered as received; outbound transport: a
  sender would have to predict the header's final form, which is not done: such a packet is
  dropped as malformed). IPv4 source-route options are zeroed as Appendix A says, but the
  destination address is covered as found (not predicted).
* A fragment (IPv4 MF or offset set, an IPv6 Fragment header before AH) is never protected or
  verified: AH applies to whole datagrams (RFC 4302 §3.4.1).
* Outbound transport mode puts AH after the IPv6 Hop-by-Hop header, a Routing header and the
  Destination Options header that precedes a Routing header (Linux's and Scapy's placement).
  Extension headers after AH are payload and covered as they are.

Like :mod:`ipsecct.ipsec.esp`, nothing here raises on a bad packet: a
:class:`~ipsecct.ipsec.esp.Drop` is
returned. The replay window is checked before the ICV and updated only after it verified.
"""

from __future__ import annotations

import hmac
import struct
import weakref
from typing import NamedTuple, Protocol

from ..errors import PacketError
from . import ippacket
from .algorithms import INTEG, IntegAlg
from .esp import Drop
from .ippacket import PROTO_AH, PROTO_IPIP, PROTO_IPV6
from .processing import inner_allowed
from .sad import DfPolicy, Mode, SecurityAssociation
from .transforms import make_integrity

AH_FIXED_LEN = 12  # next header, payload length, reserved, SPI, sequence number
_AH = struct.Struct("!BBHLL")
_L = struct.Struct("!L")
_H = struct.Struct("!H")

# RFC 4302 Appendix A1: the IPv4 options (whole type octets) included in the ICV as they are.
IMMUTABLE_IPV4_OPTIONS = frozenset({0, 1, 130, 133, 134, 148, 149})

NH_HOP_BY_HOP = 0
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_DEST_OPTS = 60
_OPTION_HEADERS = (NH_HOP_BY_HOP, NH_DEST_OPTS)


def icv_length(integ: IntegAlg) -> int:
    """Octets of ICV the integrity algorithm produces (no padding)."""
    return INTEG[integ].icv_len


def header_length(integ: IntegAlg, ip_version: int) -> int:
    """Octets of the whole AH header: fixed part, ICV and padding to 32 bits (IPv4) or 64 bits
    (IPv6)."""
    n = AH_FIXED_LEN + icv_length(integ)
    align = 8 if ip_version == 6 else 4
    return n + (-n) % align


def overhead(sa: SecurityAssociation) -> int:
    """Octets AH adds to a packet on ``sa`` (tunnel mode adds the outer IP header too)."""
    v = sa.dst.version
    n = header_length(sa.integ, v)
    if sa.mode is Mode.TUNNEL:
        n += 20 if v == 4 else 40
    return n


# -- a light header reader (no address objects: this is the per-packet path) ------------------
class _Peek(NamedTuple):
    version: int
    header_len: int  # IPv4 header with options; IPv6 fixed header (40)
    total_len: int
    protocol: int  # IPv4 protocol / IPv6 fixed header's next header
    tos: int  # IPv4 TOS / IPv6 traffic class
    df: bool  # IPv4 DF (IPv6: False; never fragmented en route)
    fragment: bool  # IPv4: MF set or a fragment offset


def _peek(packet: bytes | bytearray | memoryview) -> _Peek | None:
    """The fields AH needs of an IP header, with :func:`ippacket.parse`'s length checks; None
    when malformed or truncated."""
    n = len(packet)
    if n < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        if ihl < 20 or total < ihl or total > n:
            return None
        flags = packet[6]
        return _Peek(4, ihl, total, packet[9], packet[1], bool(flags & 0x40),
                     bool(flags & 0x3F or packet[7]))
    if version == 6 and n >= 40:
        total = 40 + ((packet[4] << 8) | packet[5])
        if total > n:
            return None
        tclass = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
        return _Peek(6, 40, total, packet[6], tclass, False, False)
    return None


def _outer(sa: SecurityAssociation, inner: _Peek, payload_len: int) -> bytes:
    """The tunnel-mode outer header, with exactly the DSCP/ECN and DF rules of
    :func:`ipsecct.ipsec.processing.outer_header` (a test holds the two to the same bytes)."""
    tos = inner.tos if sa.copy_dscp else inner.tos & 0x03
    df = inner.df if sa.df is DfPolicy.COPY else sa.df is DfPolicy.SET
    return ippacket.build_ip(sa.src, sa.dst, PROTO_AH, payload_len, tos=tos, df=df)


# -- mutable fields ---------------------------------------------------------------------------
def _zero_ipv4(head: bytearray, ihl: int) -> bool:
    """Zero an IPv4 header's mutable fields and options in place; False if the options are
    malformed."""
    head[1] = 0  # TOS (DSCP and ECN)
    head[6] = head[7] = 0  # flags and fragment offset
    head[8] = 0  # TTL
    head[10] = head[11] = 0  # header checksum
    off = 20
    while off < ihl:
        kind = head[off]
        if kind == 0:  # End of Option List: the rest is padding, covered as is
            break
        if kind == 1:
            off += 1
            continue
        if off + 1 >= ihl:
            return False
        length = head[off + 1]
        if length < 2 or off + length > ihl:
            return False
        if kind not in IMMUTABLE_IPV4_OPTIONS:
            head[off : off + length] = bytes(length)
        off += length
    return True


def _zero_ipv6(head: bytearray) -> None:
    head[0] &= 0xF0  # keep the version, zero the traffic class's high nibble
    head[1] = head[2] = head[3] = 0  # rest of the traffic class and the flow label
    head[7] = 0  # hop limit


def _zero_options(head: bytearray, start: int, end: int) -> bool:
    """Zero the data of the options that may change en route in a Hop-by-Hop or Destination
    Options header occupying ``head[start:end]``; False if the options are malformed."""
    off = start + 2
    while off < end:
        kind = head[off]
        if kind == 0:  # Pad1
            off += 1
            continue
        if off + 1 >= end:
            return False
        length = head[off + 1]
        if off + 2 + length > end:
            return False
        if kind & 0x20:
            head[off + 2 : off + 2 + length] = bytes(length)
        off += 2 + length
    return True


def _zero_ipv6_chain(head: bytearray, stop: int) -> bool:
    """Zero the IPv6 fixed header's mutable fields and the mutable option data of the
    extension headers between it and offset ``stop`` (where AH starts)."""
    _zero_ipv6(head)
    nh = head[6]
    off = 40
    while off < stop:
        length = (head[off + 1] + 1) * 8
        if nh in _OPTION_HEADERS and not _zero_options(head, off, off + length):
            return False
        nh = head[off]
        off += length
    return True


def _ipv6_chain(
    packet: bytes | bytearray | memoryview, total: int, *, outbound: bool
) -> tuple[int, int, int] | None:
    """Walk the IPv6 extension headers AH goes after.

    Returns (offset where AH is or goes, offset of the octet naming the header there, that
    header's protocol number), or None when the chain is malformed or holds something AH
    cannot be applied to (a fragment, a Routing header with segments left). Inbound, the walk
    stops at the first header that is not Hop-by-Hop, Routing or Destination Options; outbound
    (transport mode), it also stops at a Destination Options header that follows a Routing
    header, since that one is end-to-end.
    """
    nh_pos = 6
    nh = packet[6]
    off = 40
    routed = False
    while nh in (NH_HOP_BY_HOP, NH_ROUTING, NH_DEST_OPTS):
        if nh == NH_HOP_BY_HOP and off != 40:
            return None  # Hop-by-Hop must come first (RFC 8200 §4.1)
        if outbound and nh == NH_DEST_OPTS and routed:
            break
        if off + 8 > total:
            return None
        length = (packet[off + 1] + 1) * 8
        if off + length > total:
            return None
        if nh == NH_ROUTING:
            if packet[off + 3] != 0:
                return None
            routed = True
        nh_pos = off
        nh = packet[off]
        off += length
    if nh == NH_FRAGMENT:
        return None
    return off, nh_pos, nh


class _Mac(Protocol):
    def mac(self, *parts: bytes | bytearray | memoryview) -> bytes: ...


# One keyed HMAC object per SA, never one per packet; keyed by the SA object itself (SAs compare
# by identity) and dropped with it. The algorithm and key are part of the value so that an SA
# whose key is replaced never uses a stale object.
_MACS: weakref.WeakKeyDictionary[SecurityAssociation, tuple[IntegAlg, bytes, _Mac]] = (
    weakref.WeakKeyDictionary()
)


def _integrity(sa: SecurityAssociation) -> _Mac:
    cached = _MACS.get(sa)
    if cached is not None and cached[0] is sa.integ and cached[1] == sa.integ_key:
        return cached[2]
    obj: _Mac = make_integrity(sa.integ, sa.integ_key)
    _MACS[sa] = (sa.integ, sa.integ_key, obj)
    return obj


def _mac(
    sa: SecurityAssociation, head: bytearray, payload: memoryview | bytes, seq: int
) -> bytes:
    integ = _integrity(sa)
    if sa.esn:
        return integ.mac(head, payload, _L.pack(seq >> 32))
    return integ.mac(head, payload)


def _zeroed_head(
    packet: bytes | bytearray | memoryview, version: int, ip_len: int, ah_len: int, icv_len: int
) -> bytearray | None:
    """A copy of everything up to the end of AH with the mutable fields and the ICV zeroed."""
    head = bytearray(packet[: ip_len + ah_len])
    if version == 4:
        if not _zero_ipv4(head, ip_len):
            return None
    elif not _zero_ipv6_chain(head, ip_len):
        return None
    icv = ip_len + AH_FIXED_LEN
    head[icv : icv + icv_len] = bytes(icv_len)
    return head


def _fix_length(head: bytearray, version: int, total: int) -> None:
    """Set the IP header's length field for a packet of ``total`` octets (IPv4: and its
    checksum)."""
    if version == 4:
        _H.pack_into(head, 2, total)
        head[10] = head[11] = 0
        _H.pack_into(head, 10, ippacket.checksum(head[: (head[0] & 0x0F) * 4]))
    else:
        _H.pack_into(head, 4, total - 40)


# -- outbound ---------------------------------------------------------------------------------
def protect(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> bytes | Drop:
    """Protect an IP packet on outbound AH SA ``sa``.

    Tunnel mode: ``packet`` is the inner IP packet; returns the outer packet (outer header from
    the SA's tunnel addresses, DSCP and DF as
    :func:`ipsecct.ipsec.processing.outer_header` decides).
    Transport mode: returns ``packet`` with AH inserted after its IP header (and, IPv6, after
    the extension headers that go before AH).
    """
    if sa.dead or sa.expired(now):
        return Drop.LIFETIME
    hdr = _peek(packet)
    if hdr is None:
        return Drop.MALFORMED
    total = hdr.total_len
    if sa.mode is Mode.TUNNEL:
        next_header = PROTO_IPIP if hdr.version == 4 else PROTO_IPV6
        version: int = sa.dst.version
        payload: bytes | memoryview = bytes(packet[:total])
        ah_len = header_length(sa.integ, version)
        head = bytearray(_outer(sa, hdr, ah_len + total))
        ip_len = len(head)
        nh_pos = 9 if version == 4 else 6
    else:
        version = hdr.version
        if version == 4:
            if hdr.fragment:  # MF or a fragment offset
                return Drop.MALFORMED
            ip_len = hdr.header_len
            nh_pos = 9
            next_header = hdr.protocol
        else:
            chain = _ipv6_chain(packet, total, outbound=True)
            if chain is None:
                return Drop.MALFORMED
            ip_len, nh_pos, next_header = chain
        ah_len = header_length(sa.integ, version)
        payload = memoryview(bytes(packet[ip_len:total]))
        head = bytearray(packet[:ip_len])
        head[nh_pos] = PROTO_AH
        _fix_length(head, version, ip_len + ah_len + len(payload))
    zeroed = _zeroed_head(head, version, ip_len, 0, 0)
    if zeroed is None:  # malformed IPv4 options or IPv6 option headers
        return Drop.MALFORMED
    seq = sa.next_seq()
    if seq is None:
        return Drop.SEQ_EXHAUSTED if sa.seq_unavailable() else Drop.SEQ_UNRESERVED
    ah = _AH.pack(next_header, ah_len // 4 - 2, 0, sa.spi, seq & 0xFFFFFFFF) + bytes(
        ah_len - AH_FIXED_LEN
    )
    head += ah
    zeroed += ah
    icv = _mac(sa, zeroed, payload, seq)
    start = ip_len + AH_FIXED_LEN
    head[start : start + len(icv)] = icv
    sa.account(len(payload), now)
    return bytes(head) + bytes(payload)


# -- inbound ----------------------------------------------------------------------------------
def unprotect(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> bytes | Drop:
    """Verify a whole IP packet carrying AH on inbound SA ``sa``.

    Tunnel mode returns the inner IP packet (checked against the SA's selectors); transport
    mode returns the original packet rebuilt without AH (mutable fields as received).
    """
    hdr = _peek(packet)
    if hdr is None:
        return Drop.MALFORMED
    total = hdr.total_len
    version = hdr.version
    if version == 4:
        if hdr.fragment or hdr.protocol != PROTO_AH:
            return Drop.MALFORMED
        ip_len = hdr.header_len
        nh_pos = 9
    else:
        chain = _ipv6_chain(packet, total, outbound=False)
        if chain is None or chain[2] != PROTO_AH:
            return Drop.MALFORMED
        ip_len, nh_pos, _ = chain
    if ip_len + AH_FIXED_LEN > total:
        return Drop.MALFORMED
    next_header, plen, _reserved, spi, seq_low = _AH.unpack_from(packet, ip_len)
    ah_len = (plen + 2) * 4
    icv_len = icv_length(sa.integ)
    if (
        ah_len < AH_FIXED_LEN + icv_len
        or ip_len + ah_len > total
        or (version == 6 and ah_len % 8)
    ):
        return Drop.MALFORMED
    if spi != sa.spi:
        return Drop.NO_SA
    if sa.dead or sa.expired(now):
        return Drop.LIFETIME
    window = sa.window
    seq = window.infer(seq_low)
    if not window.check(seq):
        return Drop.REPLAY
    zeroed = _zeroed_head(packet, version, ip_len, ah_len, icv_len)
    if zeroed is None:
        return Drop.MALFORMED
    mv = memoryview(packet)
    payload = mv[ip_len + ah_len : total]
    want = _mac(sa, zeroed, payload, seq)
    start = ip_len + AH_FIXED_LEN
    if not hmac.compare_digest(want, bytes(mv[start : start + icv_len])):
        return Drop.ICV
    window.update(seq)
    sa.account(len(payload), now)
    if sa.mode is Mode.TUNNEL:
        return _inner(sa, next_header, bytes(payload))
    head = bytearray(packet[:ip_len])
    head[nh_pos] = next_header
    _fix_length(head, version, ip_len + len(payload))
    return bytes(head) + bytes(payload)


def _inner(sa: SecurityAssociation, next_header: int, inner: bytes) -> bytes | Drop:
    if next_header not in (PROTO_IPIP, PROTO_IPV6):
        return Drop.POLICY
    peek = _peek(inner)
    if peek is None or (peek.version == 4) != (next_header == PROTO_IPIP):
        return Drop.MALFORMED
    if peek.total_len < len(inner):
        inner = inner[: peek.total_len]
    if sa.selectors is not None:
        try:
            hdr = ippacket.parse(inner)
        except PacketError:  # pragma: no cover - _peek made the same checks
            return Drop.MALFORMED
        if not inner_allowed(sa, hdr, inner):
            return Drop.POLICY
    return inner

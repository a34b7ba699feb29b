"""IPsec processing of whole IP packets with ESP (RFC 4301 §5, RFC 4303 §3).

Tunnel mode wraps the whole inner packet (next header 4 or 41); transport mode puts ESP between
the IP header and its payload. Inbound, the inner packet is checked against the SA's selectors
(RFC 4301 §5.2 step 4) and TFC padding is stripped using the inner packet's own length.

Like :mod:`ipsecct.ipsec.esp`, nothing here raises on a bad packet: a
:class:`~ipsecct.ipsec.esp.Drop` is
returned instead.
"""

from __future__ import annotations

import struct

from ..errors import PacketError
from . import esp, ippacket
from .esp import Drop
from .ippacket import PROTO_ESP, PROTO_IPIP, PROTO_IPV6, IPHeader
from .sad import DfPolicy, Mode, SecurityAssociation


def outer_header(
    sa: SecurityAssociation, inner: IPHeader | None, payload_len: int, protocol: int = PROTO_ESP
) -> bytes:
    """The outer IP header for a tunnel-mode packet: the SA's tunnel addresses, the inner DSCP
    copied when the SA says so (ECN per RFC 6040 normal mode: copied), DF per the SA's policy."""
    tos = 0
    df = False
    if inner is not None:
        tos = inner.tos if sa.copy_dscp else inner.tos & 0x03
        df = inner.df if sa.df is DfPolicy.COPY else sa.df is DfPolicy.SET
    elif sa.df is DfPolicy.SET:
        df = True
    return ippacket.build_ip(sa.src, sa.dst, protocol, payload_len, tos=tos, df=df)


def tunnel_encapsulate(
    sa: SecurityAssociation, inner: bytes | bytearray | memoryview, now: float
) -> bytearray | Drop:
    """ESP packet (SPI .. ICV) carrying the inner IP packet."""
    if not inner:
        return Drop.MALFORMED
    v = inner[0] >> 4
    if v == 4:
        nh = PROTO_IPIP
    elif v == 6:
        nh = PROTO_IPV6
    else:
        return Drop.MALFORMED
    return esp.encapsulate(sa, nh, inner, now)


def tunnel_decapsulate(
    sa: SecurityAssociation,
    packet: bytes | bytearray | memoryview,
    now: float,
    *,
    check_selectors: bool = True,
) -> bytes | Drop:
    """The inner IP packet of an ESP packet (SPI .. ICV), TFC padding removed."""
    res = esp.decapsulate(sa, packet, now)
    if isinstance(res, Drop):
        return res
    return inner_packet(sa, res[0], res[1], check_selectors=check_selectors)


def inner_packet(
    sa: SecurityAssociation, nh: int, payload: bytes, *, check_selectors: bool = True
) -> bytes | Drop:
    """Check a decrypted tunnel-mode payload: an IP packet of the family ``nh`` says, within
    the SA's selectors (RFC 4301 §5.2 step 4); returns it with TFC padding removed.

    The data path's hot spot: the header is read straight from the bytes, addresses as
    integers, without building address objects."""
    n = len(payload)
    if nh == PROTO_IPIP:
        if n < 20 or payload[0] >> 4 != 4:
            return Drop.MALFORMED
        hlen = (payload[0] & 0x0F) * 4
        total = (payload[2] << 8) | payload[3]
        if hlen < 20 or total < hlen or total > n:
            return Drop.MALFORMED
        version = 4
        proto = payload[9]
        fragment = bool(((payload[6] & 0x1F) << 8) | payload[7])
        src_b, dst_b = payload[12:16], payload[16:20]
    elif nh == PROTO_IPV6:
        if n < 40 or payload[0] >> 4 != 6:
            return Drop.MALFORMED
        hlen = 40
        total = 40 + ((payload[4] << 8) | payload[5])
        if total > n:
            return Drop.MALFORMED
        version = 6
        proto = payload[6]
        fragment = False
        src_b, dst_b = payload[8:24], payload[24:40]
    else:
        return Drop.POLICY
    if total < n:
        payload = payload[:total]
    sel = sa.selectors
    if check_selectors and sel is not None:
        sport: int | None = None
        dport: int | None = None
        if not fragment and total >= hlen + 4:
            if proto in (1, 58):  # ICMP type and code do not swap sides
                sport, dport = payload[hlen], payload[hlen + 1]
            elif proto in (6, 17, 132):
                sport = (payload[hlen + 2] << 8) | payload[hlen + 3]  # local: destination port
                dport = (payload[hlen] << 8) | payload[hlen + 1]
        if not sel.matches_int(
            version,
            int.from_bytes(dst_b, "big"),
            int.from_bytes(src_b, "big"),
            proto,
            sport,
            dport,
        ):
            return Drop.POLICY
    return payload


def inner_allowed(sa: SecurityAssociation, hdr: IPHeader, packet: bytes | memoryview) -> bool:
    """Does a decapsulated packet fall under the (inbound) SA's selectors?"""
    sel = sa.selectors
    if sel is None:
        return True
    sport, dport = hdr.ports(packet)
    if hdr.protocol in (1, 58):  # ICMP type/code do not swap sides
        return sel.matches(hdr.dst, hdr.src, hdr.protocol, sport, dport)
    return sel.matches(hdr.dst, hdr.src, hdr.protocol, dport, sport)


def transport_encapsulate(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> bytes | Drop:
    """A whole IP packet with ESP inserted after its IP header (IPv4 options kept; IPv6
    extension headers are not looked into: ESP follows the fixed header)."""
    try:
        hdr = ippacket.parse(packet)
    except PacketError:
        return Drop.MALFORMED
    body = memoryview(packet)[hdr.header_len : hdr.total_len]
    res = esp.encapsulate(sa, hdr.protocol, body, now)
    if isinstance(res, Drop):
        return res
    head = bytearray(packet[: hdr.header_len])
    _rewrite_header(head, hdr, PROTO_ESP, len(res))
    return bytes(head) + bytes(res)


def transport_decapsulate(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> bytes | Drop:
    """The original IP packet rebuilt from a transport-mode ESP packet (whole IP packet in)."""
    try:
        hdr = ippacket.parse(packet)
    except PacketError:
        return Drop.MALFORMED
    if hdr.protocol != PROTO_ESP:
        return Drop.MALFORMED
    res = esp.decapsulate(sa, memoryview(packet)[hdr.header_len : hdr.total_len], now)
    if isinstance(res, Drop):
        return res
    nh, payload = res
    head = bytearray(packet[: hdr.header_len])
    _rewrite_header(head, hdr, nh, len(payload))
    return bytes(head) + payload


def _rewrite_header(head: bytearray, hdr: IPHeader, protocol: int, payload_len: int) -> None:
    if hdr.version == 4:
        head[9] = protocol
        struct.pack_into("!H", head, 2, hdr.header_len + payload_len)
        struct.pack_into("!H", head, 10, 0)
        struct.pack_into("!H", head, 10, ippacket.checksum(head))
    else:
        head[6] = protocol
        struct.pack_into("!H", head, 4, payload_len)


def encapsulate(
    sa: SecurityAssociation, packet: bytes | bytearray | memoryview, now: float
) -> bytes | bytearray | Drop:
    """Outbound by the SA's mode: tunnel returns the ESP packet, transport the IP packet."""
    if sa.mode is Mode.TUNNEL:
        return tunnel_encapsulate(sa, packet, now)
    return transport_encapsulate(sa, packet, now)

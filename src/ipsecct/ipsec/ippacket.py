"""Just enough IPv4 and IPv6 to process IPsec packets: parse and build headers, the Internet
checksum, and the ICMP errors a gateway sends (RFC 792 "fragmentation needed", RFC 4443
"packet too big")."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ..errors import PacketError

# The one IP address type of the package.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Endpoint:
    """An IP address and a port: a socket address (``host:port``, ``[v6]:port``)."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        h = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{h}:{self.port}"

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (str(self.host), self.port)

PROTO_ICMP = 1
PROTO_IPIP = 4
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_IPV6 = 41
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_NONE = 59

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_PORTS = struct.Struct("!HH")


@dataclass(frozen=True)
class IPHeader:
    version: int
    header_len: int  # octets of the IP header (IPv4 options included; IPv6: the fixed 40)
    total_len: int
    protocol: int  # IPv4 protocol / IPv6 next header
    src: IPAddress
    dst: IPAddress
    tos: int  # IPv4 TOS / IPv6 traffic class (DSCP << 2 | ECN)
    ttl: int
    df: bool
    flow: int = 0
    fragment: bool = False  # a non-initial fragment: no ports visible

    def ports(self, packet: bytes | memoryview) -> tuple[int | None, int | None]:
        """(source, destination) ports; ICMP: (type, code); None when not visible."""
        off = self.header_len
        if self.fragment:
            return None, None
        if self.protocol in (PROTO_TCP, PROTO_UDP, 132) and len(packet) >= off + 4:
            s, d = _PORTS.unpack_from(packet, off)
            return s, d
        if self.protocol in (PROTO_ICMP, PROTO_ICMPV6) and len(packet) >= off + 2:
            return int(packet[off]), int(packet[off + 1])
        return None, None


def parse(packet: bytes | bytearray | memoryview) -> IPHeader:
    """Parse an IP header; raises PacketError when malformed or truncated."""
    if len(packet) < 1:
        raise PacketError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise PacketError("truncated IPv4 header")
        vihl, tos, total, _ident, frag, ttl, proto, _csum, src, dst = _V4.unpack_from(packet)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or total < ihl or total > len(packet):
            raise PacketError("bad IPv4 header or total length")
        return IPHeader(
            4,
            ihl,
            total,
            proto,
            ipaddress.IPv4Address(src),
            ipaddress.IPv4Address(dst),
            tos,
            ttl,
            bool(frag & 0x4000),
            0,
            bool(frag & 0x1FFF),
        )
    if version == 6:
        if len(packet) < 40:
            raise PacketError("truncated IPv6 header")
        vtf, plen, nh, hlim, src, dst = _V6.unpack_from(packet)
        if 40 + plen > len(packet):
            raise PacketError("bad IPv6 payload length")
        return IPHeader(
            6,
            40,
            40 + plen,
            nh,
            ipaddress.IPv6Address(src),
            ipaddress.IPv6Address(dst),
            (vtf >> 20) & 0xFF,
            hlim,
            True,
            vtf & 0xFFFFF,
        )
    raise PacketError(f"IP version {version}")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_ipv4(
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    protocol: int,
    payload_len: int,
    *,
    tos: int = 0,
    ttl: int = 64,
    df: bool = False,
    ident: int = 0,
) -> bytes:
    hdr = bytearray(
        _V4.pack(
            0x45,
            tos,
            20 + payload_len,
            ident,
            0x4000 if df else 0,
            ttl,
            protocol,
            0,
            src.packed,
            dst.packed,
        )
    )
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return bytes(hdr)


def build_ipv6(
    src: ipaddress.IPv6Address,
    dst: ipaddress.IPv6Address,
    next_header: int,
    payload_len: int,
    *,
    tclass: int = 0,
    hop_limit: int = 64,
    flow: int = 0,
) -> bytes:
    return _V6.pack(
        (6 << 28) | (tclass << 20) | flow,
        payload_len,
        next_header,
        hop_limit,
        src.packed,
        dst.packed,
    )


def build_ip(
    src: IPAddress,
    dst: IPAddress,
    protocol: int,
    payload_len: int,
    *,
    tos: int = 0,
    ttl: int = 64,
    df: bool = False,
) -> bytes:
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return build_ipv4(src, dst, protocol, payload_len, tos=tos, ttl=ttl, df=df)
    if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
        return build_ipv6(src, dst, protocol, payload_len, tclass=tos, hop_limit=ttl)
    raise PacketError("source and destination mix IPv4 and IPv6")


def _pseudo_header(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!IxxxB", length, proto)


def build_udp(
    src: IPAddress, dst: IPAddress, sport: int, dport: int, data: bytes, *, ttl: int = 64
) -> bytes:
    """A whole IP packet holding one UDP datagram, with a correct checksum."""
    length = 8 + len(data)
    udp = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + data)
    c = checksum(_pseudo_header(src, dst, PROTO_UDP, length) + udp) or 0xFFFF
    struct.pack_into("!H", udp, 6, c)
    return build_ip(src, dst, PROTO_UDP, length, ttl=ttl) + bytes(udp)


def udp_payload(packet: bytes | memoryview, hdr: IPHeader) -> tuple[int, int, bytes]:
    """(sport, dport, data) of an IP packet holding UDP; raises PacketError otherwise."""
    if hdr.protocol != PROTO_UDP or hdr.fragment:
        raise PacketError("not a UDP packet")
    off = hdr.header_len
    if hdr.total_len < off + 8:
        raise PacketError("truncated UDP header")
    sport, dport, length = struct.unpack_from("!HHH", packet, off)
    if length < 8 or off + length > hdr.total_len:
        raise PacketError("bad UDP length")
    return sport, dport, bytes(packet[off + 8 : off + length])


def icmp_too_big(original: bytes | memoryview, hdr: IPHeader, mtu: int, sender: IPAddress) -> bytes:
    """The ICMP error telling ``hdr.src`` that ``original`` does not fit a link of ``mtu``:
    IPv4 type 3 code 4 (RFC 1191), IPv6 type 2 "packet too big" (RFC 4443)."""
    if hdr.version == 4:
        quoted = bytes(original[: hdr.header_len + 8])
        body = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted)
        struct.pack_into("!H", body, 2, checksum(body))
        assert isinstance(sender, ipaddress.IPv4Address) and isinstance(
            hdr.src, ipaddress.IPv4Address
        )
        return build_ipv4(sender, hdr.src, PROTO_ICMP, len(body)) + bytes(body)
    quoted = bytes(original[: 1280 - 48])
    body = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu) + quoted)
    c = checksum(_pseudo_header(sender, hdr.src, PROTO_ICMPV6, len(body)) + body)
    struct.pack_into("!H", body, 2, c)
    assert isinstance(sender, ipaddress.IPv6Address) and isinstance(hdr.src, ipaddress.IPv6Address)
    return build_ipv6(sender, hdr.src, PROTO_ICMPV6, len(body)) + bytes(body)

"""UDP encapsulation of ESP for NAT traversal (RFC 3948).

On UDP port 4500 three things share the port, told apart by their first octets (RFC 3948 §2):

* a **NAT keep-alive**: a one-octet payload, 0xFF (§2.3), which the receiver ignores;
* an **IKE message** after the 4-octet **non-ESP marker** (four zero octets, §2.2), which can
  never be an ESP packet because SPI 0 is reserved;
* an **ESP packet**, whose first four octets are its (non-zero) SPI, sent as it is (§2.1).

:func:`classify` sorts a received UDP payload into one of these, or MALFORMED, without raising:
it is fed untrusted bytes straight from the network. The minimum lengths it checks are
structural: an ESP packet needs its SPI and sequence number (8 octets), an IKE message its
28-octet header (RFC 7296 §3.1). Everything else (is the SPI known, does the ICV verify) is the
ESP and IKE layers' business.

:func:`ip_udp_esp` builds the whole IP + UDP packet (for a pcap or a raw socket). For IPv4 the
UDP checksum is sent as zero, as RFC 3948 §2.1 says it SHOULD be (ESP has its own integrity, and
the checksum would have to be fixed up by every NAT on the way); ``udp_checksum=True`` computes
it instead, which receivers must accept too. For IPv6 the checksum is always computed: a zero
UDP checksum is not allowed over IPv6 (RFC 8200 §8.1) outside the RFC 6935 tunnel exception.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import ippacket
from .ippacket import IPAddress

NAT_T_PORT = 4500
KEEPALIVE = b"\xff"
NON_ESP_MARKER = b"\x00\x00\x00\x00"
ESP_MIN_LEN = 8  # SPI + sequence number
IKE_HEADER_LEN = 28  # RFC 7296 §3.1


class Kind(enum.Enum):
    KEEPALIVE = "keepalive"
    IKE = "ike"
    ESP = "esp"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class Classified:
    """What a UDP 4500 payload holds. ``data`` is the ESP packet (SPI .. ICV) for ESP, the IKE
    message without the non-ESP marker for IKE, and empty otherwise; ``reason`` says why a
    payload is MALFORMED."""

    kind: Kind
    data: bytes = b""
    reason: str = ""

    @property
    def spi(self) -> int | None:
        """The ESP packet's SPI (None unless ESP)."""
        if self.kind is not Kind.ESP:
            return None
        return int.from_bytes(self.data[:4], "big")


_KEEPALIVE = Classified(Kind.KEEPALIVE)


def classify(payload: bytes | bytearray | memoryview) -> Classified:
    """Sort a UDP payload received on port 4500 (RFC 3948 §3). Never raises."""
    n = len(payload)
    if n == 1:
        if payload[0] == 0xFF:
            return _KEEPALIVE
        return Classified(Kind.MALFORMED, reason="one-octet payload that is not a keep-alive")
    if n < 4:
        return Classified(Kind.MALFORMED, reason=f"{n}-octet payload")
    if bytes(payload[:4]) == NON_ESP_MARKER:
        if n < 4 + IKE_HEADER_LEN:
            return Classified(
                Kind.MALFORMED, reason=f"IKE message of {n - 4} octets, shorter than its header"
            )
        return Classified(Kind.IKE, bytes(payload[4:]))
    if n < ESP_MIN_LEN:
        return Classified(Kind.MALFORMED, reason=f"ESP packet of {n} octets, shorter than 8")
    return Classified(Kind.ESP, bytes(payload))


def frame_esp(esp: bytes | bytearray | memoryview) -> bytes:
    """The UDP payload carrying an ESP packet: the packet itself (RFC 3948 §2.1)."""
    return bytes(esp)


def frame_ike(message: bytes | bytearray | memoryview) -> bytes:
    """The UDP payload carrying an IKE message on port 4500: the non-ESP marker, then the
    message (RFC 3948 §2.2)."""
    return NON_ESP_MARKER + bytes(message)


def ip_udp_esp(
    src: IPAddress,
    dst: IPAddress,
    sport: int,
    dport: int,
    esp: bytes | bytearray | memoryview,
    *,
    udp_checksum: bool = False,
    ttl: int = 64,
) -> bytes:
    """A whole IP packet: IP header, UDP header, ESP packet.

    IPv4: the UDP checksum is zero unless ``udp_checksum`` (RFC 3948 §2.1 "SHOULD be
    transmitted as a zero value"). IPv6: always computed (mandatory). Raises PacketError when
    the addresses mix IPv4 and IPv6.
    """
    pkt = ippacket.build_udp(src, dst, sport, dport, frame_esp(esp), ttl=ttl)
    if src.version == 4 and not udp_checksum:
        b = bytearray(pkt)
        b[26:28] = b"\x00\x00"  # 20-octet IPv4 header (build_ipv4 adds no options) + 6
        return bytes(b)
    return pkt

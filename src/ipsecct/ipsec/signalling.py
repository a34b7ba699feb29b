"""Signals from a gateway to the mobile node, carried inside the IPsec SA itself (draft §7.1
and §8): ESP packets with next header 253 (RFC 3692's experimental value).

Being ESP, a signal is authenticated with the transferred SA's keys and replay-protected by its
sequence number and the MN's anti-replay window: nobody without the keys can forge one and a
recorded one cannot be replayed. The payload is a list of TLVs::

    Type(8) | Length(8, octets of the whole TLV) | Reserved(16) | body

    1 SG_UPDATE     family(8: 4 or 6) | reserved(8) | port(16) | address(32 or 128)
                    "your gateway is now at address:port": the MN updates its SAD (direct
                    SG communication).
    2 SPI_REASSIGN  protocol(8) | reserved(24) | old SPI(32) | new SPI(32)
                    "send with SPI new where you used old": the inbound SA at the new gateway
                    got a new SPI because the old one was taken there.

:func:`apply` is the MN agent's side: it changes the MN's outbound SA in one step.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ..errors import SAError, SignalError
from .engine import Engine
from .ippacket import IPAddress
from .sad import Direction, SecurityAssociation, UdpEncap

T_SG_UPDATE = 1
T_SPI_REASSIGN = 2
_HDR = struct.Struct("!BBH")


@dataclass(frozen=True)
class SgUpdate:
    address: IPAddress
    port: int


@dataclass(frozen=True)
class SpiReassign:
    protocol: int
    old_spi: int
    new_spi: int


SignalItem = SgUpdate | SpiReassign


def encode(items: list[SignalItem]) -> bytes:
    out = bytearray()
    for it in items:
        if isinstance(it, SgUpdate):
            body = struct.pack("!BBH", it.address.version, 0, it.port) + it.address.packed
            t = T_SG_UPDATE
        else:
            body = struct.pack("!BxxxII", it.protocol, it.old_spi, it.new_spi)
            t = T_SPI_REASSIGN
        out += _HDR.pack(t, 4 + len(body), 0) + body
    return bytes(out)


def decode(data: bytes) -> list[SignalItem]:
    items: list[SignalItem] = []
    pos = 0
    if not data:
        raise SignalError("empty signal")
    while pos < len(data):
        if len(data) - pos < 4:
            raise SignalError("truncated signal TLV header")
        t, length, rsvd = _HDR.unpack_from(data, pos)
        if rsvd or length < 4 or pos + length > len(data):
            raise SignalError("bad signal TLV length or reserved bits")
        body = data[pos + 4 : pos + length]
        if t == T_SG_UPDATE:
            if len(body) not in (8, 20):
                raise SignalError("SG_UPDATE has the wrong length")
            fam, r, port = struct.unpack_from("!BBH", body)
            raw = body[4:]
            if r or (fam, len(raw)) not in ((4, 4), (6, 16)):
                raise SignalError("SG_UPDATE family does not match its address")
            addr: IPAddress = (
                ipaddress.IPv4Address(raw) if fam == 4 else ipaddress.IPv6Address(raw)
            )
            if port == 0 or addr.is_unspecified or addr.is_multicast or (
                addr == ipaddress.IPv4Address("255.255.255.255")
            ):
                # No gateway answers from there: the node sent its ESP into nothing (the
                # unspecified address is its own host; port 0 fails every sendto).
                raise SignalError("SG_UPDATE names no gateway's address (port 0, unspecified, "
                                  "multicast or broadcast)")  # fmt: skip
            items.append(SgUpdate(addr, port))
        elif t == T_SPI_REASSIGN:
            if len(body) != 12 or any(body[1:4]):
                raise SignalError("SPI_REASSIGN has the wrong length or reserved bits")
            proto, old, new = struct.unpack("!BxxxII", body)
            if proto not in (50, 51) or not 256 <= new <= 0xFFFFFFFF:
                raise SignalError("SPI_REASSIGN protocol or SPI out of range")
            items.append(SpiReassign(proto, old, new))
        else:
            raise SignalError(f"unknown signal type {t}")
        pos += length
    return items


def apply(engine: Engine, via: SecurityAssociation, items: list[SignalItem]) -> list[str]:
    """Apply signals received on inbound SA ``via`` to the paired outbound SA (MN side).

    Returns a description of each change. Raises SignalError when the signal does not fit
    the SA it came on, leaving the SAD unchanged.
    """
    tunnel = engine.tunnel_of(via)
    if tunnel is None or via.direction is not Direction.INBOUND:
        raise SignalError("signal arrived on an SA that belongs to no tunnel")
    out_sa = tunnel.outbound
    new_dst: IPAddress | None = None
    new_port: int | None = None
    new_spi: int | None = None
    for it in items:
        if isinstance(it, SgUpdate):
            if it.address.version != out_sa.dst.version:
                raise SignalError("SG_UPDATE changes the address family")
            new_dst, new_port = it.address, it.port
        else:
            if it.protocol != int(out_sa.protocol) or it.old_spi != out_sa.spi:
                raise SignalError("SPI_REASSIGN names an SPI this tunnel does not send with")
            new_spi = it.new_spi
    changes = []
    try:
        engine.rekey_sa(out_sa, spi=new_spi, dst=new_dst)
    except SAError as exc:
        raise SignalError(str(exc)) from None
    if new_dst is not None:
        via.src = new_dst
        changes.append(f"gateway now {new_dst}:{new_port}")
        if out_sa.encap is not None and new_port is not None:
            out_sa.encap = UdpEncap(out_sa.encap.sport, new_port)
    if new_spi is not None:
        changes.append(f"outbound SPI now 0x{new_spi:08x}")
    return changes

"""Moving a virtual gateway address between gateways (indirect SG identity, draft §7.1).

Thin adapter: the gateway that becomes responsible for the SAs adds the address to its
interface (iproute2) and announces it with a gratuitous ARP (built here, sent on an AF_PACKET
socket), so that neighbours on the link update their ARP caches at once; the gateway that
lets go removes it. IPv6 neighbours learn through their own neighbour discovery (an unsolicited
NA is left for later). Needs root (CAP_NET_ADMIN, CAP_NET_RAW).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from ..errors import IpsecctError
from ..ipsec.spd import IPAddress
from .tun import TunError, ip

ETH_P_ARP = 0x0806


class VipError(IpsecctError):
    """The virtual address could not be claimed or released."""


def interface_mac(interface: str) -> bytes:
    try:
        with open(f"/sys/class/net/{interface}/address") as f:
            return bytes.fromhex(f.read().strip().replace(":", ""))
    except (OSError, ValueError) as exc:
        raise VipError(f"cannot read the MAC address of {interface}: {exc}") from None


def garp_frame(mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request: who-has ADDRESS tell ADDRESS, to the broadcast address."""
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + address.packed + b"\0" * 6
    arp += address.packed
    return eth + arp


def send_garp(interface: str, address: IPAddress, count: int = 2) -> None:
    if not isinstance(address, ipaddress.IPv4Address):
        return
    frame = garp_frame(interface_mac(interface), address)
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind((interface, 0))
            for _ in range(count):
                s.send(frame)
    except OSError as exc:
        raise VipError(f"cannot send a gratuitous ARP on {interface}: {exc.strerror}") from None


def claim(address: IPAddress, interface: str) -> None:
    prefix = 32 if address.version == 4 else 128
    try:
        ip("addr", "replace", f"{address}/{prefix}", "dev", interface)
    except TunError as exc:
        raise VipError(str(exc)) from None
    send_garp(interface, address)


def release(address: IPAddress, interface: str) -> None:
    prefix = 32 if address.version == 4 else 128
    try:
        ip("addr", "del", f"{address}/{prefix}", "dev", interface)
    except TunError as exc:
        if "Cannot assign" not in str(exc) and "not found" not in str(exc):
            raise VipError(str(exc)) from None

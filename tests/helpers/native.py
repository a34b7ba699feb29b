"""Two engines joined by one tunnel on one data path (native or Python), and inner packets,
shared by the native data-path tests."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from ipsecct.ipsec.engine import Engine
from ipsecct.ipsec.ippacket import build_udp
from ipsecct.ipsec.sad import Direction, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, AddressRange, Selectors, SPDEntry

S_OUTER = {4: "192.0.2.1", 6: "2001:db8::1"}
R_OUTER = {4: "192.0.2.2", 6: "2001:db8::2"}
S_INNER = {4: "10.1.0.2", 6: "fd01::2"}
R_INNER = {4: "10.2.0.1", 6: "fd02::1"}
OTHER = {4: "10.9.0.1", 6: "fd09::1"}  # outside every selector
SPI_UP = 0x1001
SPI_DOWN = 0x2002


def _ip(t: str) -> Any:
    return ipaddress.ip_address(t)


class Side:
    """Two engines (sender S, receiver R) joined by one tunnel, on one data path."""

    def __init__(self, cfg: dict[str, Any], use_native: bool) -> None:
        enc, key, esn, window, outer, ports, soft, hard = (
            cfg["enc"],
            cfg["key"],
            cfg["esn"],
            cfg["window"],
            cfg["outer"],
            cfg["ports"],
            cfg["soft"],
            cfg["hard"],
        )
        a, b = _ip(S_OUTER[outer]), _ip(R_OUTER[outer])
        s_sel = Selectors(
            (AddressRange.parse("10.1.0.0/24"), AddressRange.parse("fd01::/64")),
            (AddressRange.parse("10.2.0.0/24"), AddressRange.parse("fd02::/64")),
            remote_ports=ports,
        )
        r_sel = Selectors(s_sel.remote, s_sel.local, local_ports=ports)

        def sa(spi: int, d: Direction, src: Any, dst: Any, k: bytes) -> SecurityAssociation:
            s = SecurityAssociation(
                spi, d, src, dst, enc=enc, enc_key=k, esn=esn, replay_window=window,
                encap=UdpEncap(), soft=soft, hard=hard, created=0.0,
            )
            return s

        self.up_out = sa(SPI_UP, Direction.OUTBOUND, a, b, key)
        self.up_in = sa(SPI_UP, Direction.INBOUND, a, b, key)
        self.down_out = sa(SPI_DOWN, Direction.OUTBOUND, b, a, key[::-1])
        self.down_in = sa(SPI_DOWN, Direction.INBOUND, b, a, key[::-1])
        self.up_in.selectors = r_sel
        self.down_in.selectors = s_sel
        self.s = Engine(a, native=use_native)
        self.r = Engine(b, native=use_native)
        self.s.add_tunnel(SPDEntry(s_sel, Action.PROTECT, static=False), self.up_out, self.down_in)
        self.r.add_tunnel(SPDEntry(r_sel, Action.PROTECT, static=False), self.down_out, self.up_in)

    def state(self) -> Any:
        return (
            self.s.stats.as_dict(),
            self.r.stats.as_dict(),
            [
                (sa.seq, sa.counters.packets, sa.counters.bytes, sa.window.snapshot(),
                 sa.soft_fired, sa.dead)
                for sa in (self.up_out, self.up_in, self.down_out, self.down_in)
            ],
            [(e.sa.spi, e.event) for e in self.s.drain_events() + self.r.drain_events()],
        )


def _inner(version: int, proto: int, size: int, dport: int, src: str, dst: str) -> bytes:
    pkt = bytearray(build_udp(_ip(src), _ip(dst), 5000, dport, bytes(size % 251) * 1))
    pkt += bytes(range(256)) * (size // 256)
    if version == 4:
        pkt[2:4] = struct.pack("!H", len(pkt))
        pkt[9] = proto
    else:
        pkt[4:6] = struct.pack("!H", len(pkt) - 40)
        pkt[6] = proto
    return bytes(pkt)

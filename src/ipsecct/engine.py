"""The IPsec engine of a gateway or mobile node: SPD and SAD together, packets in, actions out.

It is sans-I/O: the adapter (:mod:`ipsecct.daemon`) hands it packets from the inner side
(``outbound``) and ESP packets from the outer side (``inbound``) with the current time, and gets
back what to do: send ESP to a peer, deliver a packet to the inner side, send an ICMP error back,
or drop (counted by reason). Nothing here raises on a bad packet.

Perspective: selectors are seen from this node, "local" being the traffic on its inner side.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import esp, ippacket, processing
from .errors import PacketError, SAError
from .esp import Drop
from .ippacket import IPAddress
from .sad import SAD, Direction, Mode, Protocol, SAEvent, SecurityAssociation
from .spd import SPD, Action, SPDEntry


@dataclass(frozen=True)
class ToPeer:
    """Send ``data`` (an ESP packet, SPI .. ICV) to the SA's peer."""

    sa: SecurityAssociation
    data: bytes | bytearray


@dataclass(frozen=True)
class ToInner:
    """Deliver ``packet`` (a whole IP packet) on the inner side."""

    packet: bytes


@dataclass(frozen=True)
class Bypass:
    """Forward ``packet`` unprotected (an SPD BYPASS entry matched)."""

    packet: bytes


Result = ToPeer | ToInner | Bypass | Drop


@dataclass
class Stats:
    """Counters an operator reads with ``ipsecct status``."""

    out_packets: int = 0
    out_bytes: int = 0
    in_packets: int = 0
    in_bytes: int = 0
    icmp_sent: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "out_packets": self.out_packets,
            "out_bytes": self.out_bytes,
            "in_packets": self.in_packets,
            "in_bytes": self.in_bytes,
            "icmp_sent": self.icmp_sent,
            "drops": {d.value: self.drops.get(d.value, 0) for d in Drop},
        }


@dataclass(frozen=True)
class EngineEvent:
    sa: SecurityAssociation
    event: SAEvent


class Engine:
    """SPD + SAD + counters for one node."""

    def __init__(self, address: IPAddress | None = None, *, default_mtu: int = 1500) -> None:
        self.spd = SPD()
        self.sad = SAD()
        self.stats = Stats()
        self.address = address  # this node's outer address (source of ICMP errors)
        self.default_mtu = default_mtu
        self._outbound: dict[int, SecurityAssociation] = {}  # id(SPDEntry) -> outbound SA
        self._entry_of: dict[int, SPDEntry] = {}
        self.events: list[EngineEvent] = []
        # SAs held back from sending (during a context transfer): the single-sender rule.
        self.frozen: set[int] = set()

    # -- configuration -----------------------------------------------------------------
    def add_policy(self, entry: SPDEntry, *, index: int | None = None) -> None:
        self.spd.add(entry, index=index)

    def add_tunnel(
        self,
        entry: SPDEntry,
        outbound: SecurityAssociation,
        inbound: SecurityAssociation | None,
        *,
        index: int | None = None,
    ) -> None:
        """A PROTECT policy with its outbound SA (and the inbound SA of the pair)."""
        if entry.action is not Action.PROTECT:
            raise SAError("a tunnel's policy must PROTECT")
        if outbound.direction is not Direction.OUTBOUND:
            raise SAError("the tunnel's first SA must be outbound")
        if inbound is not None:
            if inbound.direction is not Direction.INBOUND:
                raise SAError("the tunnel's second SA must be inbound")
            self.sad.add(inbound)
        try:
            self.sad.add(outbound)
        except SAError:
            if inbound is not None:
                self.sad.remove(inbound)
            raise
        entry.sa_ids = [outbound.spi]
        self.spd.add(entry, index=index)
        self._outbound[id(entry)] = outbound
        self._entry_of[id(outbound)] = entry

    def remove_tunnel(self, entry: SPDEntry) -> list[SecurityAssociation]:
        """Remove a PROTECT policy, its outbound SA and inbound SAs with the same selectors."""
        removed = []
        out = self._outbound.pop(id(entry), None)
        if out is not None:
            self._entry_of.pop(id(out), None)
            self.sad.remove(out)
            removed.append(out)
        for sa in list(self.sad):
            if sa.direction is Direction.INBOUND and sa.selectors == entry.selectors:
                self.sad.remove(sa)
                removed.append(sa)
        self.spd.remove(entry)
        return removed

    def replace_outbound(self, entry: SPDEntry, sa: SecurityAssociation) -> None:
        old = self._outbound.get(id(entry))
        if old is not None:
            self.sad.remove(old)
            self._entry_of.pop(id(old), None)
        self.sad.add(sa)
        self._outbound[id(entry)] = sa
        self._entry_of[id(sa)] = entry
        entry.sa_ids = [sa.spi]

    def outbound_sa(self, entry: SPDEntry) -> SecurityAssociation | None:
        return self._outbound.get(id(entry))

    def entry_of(self, sa: SecurityAssociation) -> SPDEntry | None:
        return self._entry_of.get(id(sa))

    def tunnels(self) -> Iterable[tuple[SPDEntry, SecurityAssociation]]:
        for e in self.spd:
            sa = self._outbound.get(id(e))
            if sa is not None:
                yield e, sa

    def find_sa(self, spi: int) -> list[SecurityAssociation]:
        return [sa for sa in self.sad if sa.spi == spi]

    # -- data path ---------------------------------------------------------------------
    def _drop(self, reason: Drop) -> Drop:
        self.stats.drops[reason.value] += 1
        return reason

    def outbound(self, packet: bytes, now: float) -> Result:
        """A packet from the inner side: protect it, bypass it or drop it."""
        try:
            hdr = ippacket.parse(packet)
        except PacketError:
            return self._drop(Drop.MALFORMED)
        sport, dport = hdr.ports(packet)
        entry = self.spd.lookup(hdr.src, hdr.dst, hdr.protocol, sport, dport)
        if entry is None or entry.action is Action.DISCARD:
            return self._drop(Drop.POLICY)
        if entry.action is Action.BYPASS:
            return Bypass(packet)
        sa = self._outbound.get(id(entry))
        if sa is None:
            return self._drop(Drop.NO_SA)
        if sa.spi in self.frozen:
            return self._drop(Drop.POLICY)
        if hdr.total_len < len(packet):
            packet = packet[: hdr.total_len]
        mtu = sa.effective_mtu(now, self.default_mtu)
        res: bytes | bytearray | Drop
        if sa.mode is Mode.TUNNEL:
            needed = (
                len(packet) + esp.overhead(sa, len(packet)) + (20 if sa.dst.version == 4 else 40)
            )
            if sa.encap is not None:
                needed += 8
            if needed > mtu and (hdr.df or hdr.version == 6):
                return self._too_big(packet, hdr, sa, mtu - (needed - len(packet)))
            res = processing.tunnel_encapsulate(sa, packet, now)
        else:
            res = processing.transport_encapsulate(sa, packet, now)
        self._collect(sa)
        if isinstance(res, Drop):
            return self._drop(res)
        self.stats.out_packets += 1
        self.stats.out_bytes += len(packet)
        return ToPeer(sa, res)

    def _too_big(
        self, packet: bytes, hdr: ippacket.IPHeader, sa: SecurityAssociation, inner_mtu: int
    ) -> Result:
        self.stats.drops[Drop.MTU.value] += 1
        floor = 68 if hdr.version == 4 else 1280
        sender = self._icmp_source(hdr)
        if sender is None:
            return Drop.MTU
        self.stats.icmp_sent += 1
        return ToInner(ippacket.icmp_too_big(packet, hdr, max(inner_mtu, floor), sender))

    def _icmp_source(self, hdr: ippacket.IPHeader) -> IPAddress | None:
        # The gateway answers from an address of the inner packet's family: its destination
        # stands in for the router on the path, as a tunnel interface would.
        return hdr.dst

    def inbound(
        self,
        data: bytes | bytearray | memoryview,
        dst: IPAddress | None,
        now: float,
        protocol: Protocol = Protocol.ESP,
    ) -> Result:
        """An ESP packet (SPI .. ICV) from the outer side, sent to ``dst``."""
        if len(data) < 8:
            return self._drop(Drop.MALFORMED)
        spi = int.from_bytes(data[0:4], "big")
        sa = self.sad.lookup(dst, protocol, spi) if dst is not None else None
        if sa is None:
            sa = self.sad.lookup_spi(protocol, spi)
        if sa is None or sa.direction is not Direction.INBOUND:
            return self._drop(Drop.NO_SA)
        if sa.mode is Mode.TUNNEL:
            res = processing.tunnel_decapsulate(sa, data, now)
        else:
            return self._drop(Drop.POLICY)  # transport mode needs the outer header: raw path
        self._collect(sa)
        if isinstance(res, Drop):
            return self._drop(res)
        self.stats.in_packets += 1
        self.stats.in_bytes += len(res)
        return ToInner(res)

    def _collect(self, sa: SecurityAssociation) -> None:
        if sa.events:
            for ev in sa.events:
                self.events.append(EngineEvent(sa, ev))
            sa.events.clear()

    def tick(self, now: float) -> None:
        """Timer: fire time-based lifetime events and expire dead SAs' PMTU state."""
        for sa in self.sad:
            sa.poll(now)
            sa.effective_mtu(now, self.default_mtu)
            self._collect(sa)

    def drain_events(self) -> list[EngineEvent]:
        ev, self.events = self.events, []
        return ev

    def set_path_mtu(self, spi: int, mtu: int, *, expires: float | None = None) -> int:
        """Change the path MTU of the SAs with this SPI; returns how many changed."""
        if not 68 <= mtu <= 65535:
            raise SAError(f"path MTU {mtu} out of range 68-65535")
        n = 0
        for sa in self.find_sa(spi):
            sa.path_mtu = mtu
            sa.pmtu_expires = expires
            n += 1
        return n


def parse_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise SAError(f"bad IP address {text!r}") from None

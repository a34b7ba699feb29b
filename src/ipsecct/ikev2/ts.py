"""Traffic selectors (RFC 7296 §3.13) and the responder's narrowing (§2.9)."""

from __future__ import annotations

import dataclasses
import ipaddress

from ..errors import IpsecctError
from ..ipsec.spd import AddressRange, PortRange, Selectors
from .message import TrafficSelector, TsType

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def from_text(text: str) -> TrafficSelector:
    """``10.0.0.0/24``, ``10.0.0.1-10.0.0.9``, ``0.0.0.0/0`` or ``dynamic``-free strongSwan
    forms with an optional ``[proto/port]`` suffix: ``10.1.0.0/16[udp/53]``."""
    t = text.strip()
    proto, ports = 0, (0, 65535)
    if t.endswith("]") and "[" in t:
        t, spec = t[:-1].split("[", 1)
        p, _, port = spec.partition("/")
        names = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "any": 0, "": 0}
        try:
            proto = names[p.lower()] if p.lower() in names else int(p)
            if port and port.lower() not in ("any", "%any"):
                a, _, b = port.partition("-")
                ports = (int(a), int(b or a))
        except ValueError:
            raise IpsecctError(f"bad traffic selector {text!r}") from None
        if not (0 <= proto <= 255 and 0 <= ports[0] <= ports[1] <= 65535):
            raise IpsecctError(f"bad traffic selector {text!r}")
    if t.lower() in ("dynamic", "%dynamic"):  # swanctl.conf's default for local_ts
        raise IpsecctError(f"traffic selector {text!r}: swanctl's 'dynamic' (the IKE address or "
                           "the virtual IP) is not read here: write the address or subnet "
                           "(a client asking for a virtual IP: 0.0.0.0/0 and vips)")  # fmt: skip
    try:
        r = AddressRange.parse(t)
    except IpsecctError:
        raise IpsecctError(f"bad traffic selector {text!r}") from None
    ttype = TsType.IPV4_ADDR_RANGE if r.version == 4 else TsType.IPV6_ADDR_RANGE
    return TrafficSelector(ttype, proto, ports[0], ports[1], r.first, r.last)


def host(addr: IPAddr) -> TrafficSelector:
    ttype = TsType.IPV4_ADDR_RANGE if addr.version == 4 else TsType.IPV6_ADDR_RANGE
    return TrafficSelector(ttype, 0, 0, 65535, addr, addr)


def intersect(a: TrafficSelector, b: TrafficSelector) -> TrafficSelector | None:
    if a.ts_type != b.ts_type:
        return None
    if a.ip_protocol and b.ip_protocol and a.ip_protocol != b.ip_protocol:
        return None
    proto = a.ip_protocol or b.ip_protocol
    sp, ep = max(a.start_port, b.start_port), min(a.end_port, b.end_port)
    if sp > ep:
        return None
    if a.start.version != b.start.version:
        return None
    start = max(int(a.start), int(b.start))
    end = min(int(a.end), int(b.end))
    if start > end:
        return None
    cls = type(a.start)
    return TrafficSelector(a.ts_type, proto, sp, ep, cls(start), cls(end))


def narrow(proposed: tuple[TrafficSelector, ...],
           configured: list[TrafficSelector]) -> list[TrafficSelector]:  # fmt: skip
    """The part of what the peer proposed that our configuration allows (§2.9), in the peer's
    order, duplicates removed (by hash: a list searched for each one took 0.4 s of CPU for a
    TS payload's 255 selectors against 10 configured ones, 4 s against 32, and any
    authenticated peer may send such a CREATE_CHILD_SA again and again)."""
    out: dict[TrafficSelector, None] = {}
    for p in proposed:
        for c in configured:
            x = intersect(p, c)
            if x is not None:
                out[x] = None
    return list(out)


def within(answer: tuple[TrafficSelector, ...], ours: list[TrafficSelector]) -> bool:
    """Is every selector of a responder's ``answer`` inside one of the selectors we proposed
    (a narrowing, §2.9, never a widening)?"""
    return all(any(intersect(a, o) == a for o in ours) for a in answer)


def representable(local: list[TrafficSelector], remote: list[TrafficSelector],
                   ) -> tuple[list[TrafficSelector], list[TrafficSelector]]:  # fmt: skip
    """The part of a CHILD SA's selectors that one SPD entry (address ranges on each side, one
    protocol, one port range on each side) holds exactly: the protocol of the first selector
    that names one (selectors of any protocol take it, those of another are left out), and on
    each side the ports of its first selector (those with other ports are left out). Never
    more than given: selectors that disagree made the entry any protocol and any port, wider
    than the configuration (``local_ts = ["10.1.0.0/16[tcp/80]"]`` gave every port). A
    responder narrows to this (§2.9 lets it), so the peer is told what is installed. A side
    left empty (tcp on one side, udp on the other) makes no CHILD SA (TS_UNACCEPTABLE)."""
    if not local or not remote:
        return local, remote
    proto = next((t.ip_protocol for t in local + remote if t.ip_protocol), 0)

    def side(ts: list[TrafficSelector]) -> list[TrafficSelector]:
        same = [dataclasses.replace(t, ip_protocol=proto) for t in ts
                if t.ip_protocol in (0, proto)]  # fmt: skip
        if not same:  # only other protocols on this side: no packet fits both sides
            return []
        ports = (same[0].start_port, same[0].end_port)
        return list(dict.fromkeys(t for t in same if (t.start_port, t.end_port) == ports))

    return side(local), side(remote)


def to_selectors(local: list[TrafficSelector], remote: list[TrafficSelector],
                 name: str) -> Selectors:  # fmt: skip
    """The SPD selectors of a CHILD SA: its address ranges, protocol and ports, within
    :func:`representable` (selectors that one entry cannot hold are left out, never widened
    to any protocol or port)."""
    local, remote = representable(local, remote)
    proto = local[0].ip_protocol if local else 0

    def ports(ts: list[TrafficSelector]) -> PortRange:
        return PortRange(ts[0].start_port, ts[0].end_port) if ts and proto else PortRange()

    return Selectors(
        tuple(AddressRange(t.start, t.end) for t in local),
        tuple(AddressRange(t.start, t.end) for t in remote),
        proto,
        ports(local),
        ports(remote),
        name=name,
    )

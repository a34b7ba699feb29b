"""A sans-I/O world for context-transfer tests: a mobile node and gateways, each an
:class:`~ipsecct.ipsec.engine.Engine`, the gateways with a
:class:`~ipsecct.ct.transfer.TransferCore`.

Nothing here has sockets or a clock: the test owns ``now``. CXTP messages between gateways go
through ``cxtp.encode``/``cxtp.decode`` (the wire form) and wait in per-link queues until the
test delivers, drops or reorders them. ESP packets a gateway emits are recorded as
``(gateway, SPI, sequence number)`` so that tests can check that no (key, nonce) pair is ever used
twice, and the mobile node's traffic can be routed to whichever gateway its SAs point at.
"""

from __future__ import annotations

import ipaddress
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ipsecct.ct import cxtp
from ipsecct.ct.transfer import (
    After,
    Aftermath,
    Finished,
    Inject,
    Output,
    Record,
    Send,
    Settings,
    TransferCore,
    Transmit,
)
from ipsecct.errors import SignalError
from ipsecct.ipsec import signalling
from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.engine import (
    Bypass,
    Engine,
    Forward,
    Held,
    Result,
    Signal,
    ToInner,
    ToPeer,
)
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import Endpoint, IPAddress, build_udp
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, AddressRange, Selectors, SPDEntry

MN_INNER = "10.1.0.2"
HOST = "10.2.0.1"
MN_ADDR = "192.0.2.10"
SG_ADDR = {"sg1": "192.0.2.1", "sg2": "192.0.2.2", "sg3": "192.0.2.3"}
SPI_UP = 0x1001  # MN -> gateway (the gateway's inbound SA)
SPI_DOWN = 0x2002  # gateway -> MN (the gateway's outbound SA)
PORT = 4500


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def sel(local: str, remote: str) -> Selectors:
    return Selectors((AddressRange.parse(local),), (AddressRange.parse(remote),))


def udp_packet(seq: int, *, up: bool, size: int = 60) -> bytes:
    """An inner UDP packet of the stream: MN -> host (``up``) or host -> MN."""
    src, dst = (MN_INNER, HOST) if up else (HOST, MN_INNER)
    body = seq.to_bytes(4, "big") + bytes(max(0, size - 4))
    return build_udp(ip(src), ip(dst), 5000, 7000, body)


def stream_seq(packet: bytes) -> int:
    """The stream sequence number of an inner packet made by :func:`udp_packet`."""
    return int.from_bytes(packet[28:32], "big")


def esp_seq(data: bytes | bytearray) -> tuple[int, int]:
    """(SPI, low 32 bits of the sequence number) of an ESP packet (SPI .. ICV)."""
    return int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")


def tunnel_sas(
    sg: str,
    *,
    enc: EncAlg = EncAlg.AES_GCM_16,
    integ: IntegAlg = IntegAlg.NONE,
    spi_up: int = SPI_UP,
    spi_down: int = SPI_DOWN,
    local: str = "10.2.0.0/24",
    mn_inner: str = MN_INNER,
    mn_addr: str = MN_ADDR,
    window: int = 128,
    esn: bool = True,
    name: str = "mn1",
) -> tuple[
    tuple[SecurityAssociation, SecurityAssociation, Selectors],
    tuple[SecurityAssociation, SecurityAssociation, Selectors],
]:
    """The two halves of one MN <-> gateway tunnel: (gateway out, gateway in, gateway
    selectors) and (MN out, MN in, MN selectors), sharing keys."""
    from ipsecct.ipsec.algorithms import ENC, INTEG

    k_up = os.urandom(ENC[enc].key_lengths[0])
    k_down = os.urandom(ENC[enc].key_lengths[0])
    i_up = os.urandom(INTEG[integ].key_length)
    i_down = os.urandom(INTEG[integ].key_length)
    g, m = ip(SG_ADDR[sg]), ip(mn_addr)
    s_sg, s_mn = sel(local, f"{mn_inner}/32"), sel(f"{mn_inner}/32", local)

    def sa(
        spi: int, d: Direction, src: IPAddress, dst: IPAddress, ek: bytes, ik: bytes, s: Selectors
    ) -> SecurityAssociation:
        return SecurityAssociation(
            spi,
            d,
            src,
            dst,
            enc=enc,
            enc_key=ek,
            integ=integ,
            integ_key=ik,
            mode=Mode.TUNNEL,
            esn=esn,
            replay_window=window,
            encap=UdpEncap(PORT, PORT),
            selectors=s,
            name=name,
        )

    sg_out = sa(spi_down, Direction.OUTBOUND, g, m, k_down, i_down, s_sg)
    sg_in = sa(spi_up, Direction.INBOUND, m, g, k_up, i_up, s_sg)
    mn_out = sa(spi_up, Direction.OUTBOUND, m, g, k_up, i_up, s_mn)
    mn_in = sa(spi_down, Direction.INBOUND, g, m, k_down, i_down, s_mn)
    return (sg_out, sg_in, s_sg), (mn_out, mn_in, s_mn)


@dataclass
class Gw:
    """One gateway: engine + transfer core + what came out of them."""

    name: str
    engine: Engine
    core: TransferCore
    world: World
    wire: list[tuple[int, int]] = field(default_factory=list)  # (SPI, seq) of ESP sent
    to_mn: list[bytes] = field(default_factory=list)  # ESP packets for the MN
    delivered: list[bytes] = field(default_factory=list)  # inner packets decrypted here
    finished: list[Record] = field(default_factory=list)
    injected: int = 0
    dropped: list[Drop] = field(default_factory=list)
    refused_hold: int = 0
    may_send: bool = True
    may_request: bool = True

    @property
    def address(self) -> IPAddress:
        return ip(SG_ADDR[self.name])

    def run(self, outs: list[Output]) -> None:
        for o in outs:
            if isinstance(o, Send):
                self.world.post(self.name, o.peer, cxtp.encode(o.msg))
            elif isinstance(o, Inject):
                self.injected += 1
                if o.inbound:
                    self.from_mn(o.packet)
                else:
                    self.from_inner(o.packet)
            elif isinstance(o, Transmit):
                self.emit(bytes(o.data))
            elif isinstance(o, Finished):
                self.finished.append(o.record)
            elif isinstance(o, After):
                o.run()
            elif isinstance(o, Aftermath):
                self.run(list(o.outputs))

    def emit(self, data: bytes) -> None:
        self.wire.append(esp_seq(data))
        self.to_mn.append(data)

    def act(self, res: Result) -> None:
        if isinstance(res, ToPeer):
            self.emit(bytes(res.data))
        elif isinstance(res, ToInner):
            self.delivered.append(res.packet)
        elif isinstance(res, Held):
            if not self.core.hold(res):
                self.refused_hold += 1
        elif isinstance(res, Forward):
            self.run(self.core.forward(res.peer, res.packet, res.inbound))
        elif isinstance(res, Drop):
            self.dropped.append(res)
        elif isinstance(res, Signal | Bypass):
            pass

    def from_inner(self, packet: bytes) -> None:
        self.act(self.engine.outbound(packet, self.world.now))

    def from_mn(self, data: bytes) -> None:
        self.act(self.engine.inbound(data, self.address, self.world.now))

    def tick(self) -> None:
        self.run(self.core.handle_timer(self.world.now))


@dataclass
class Mn:
    engine: Engine
    world: World
    wire: list[tuple[int, int]] = field(default_factory=list)
    delivered: list[bytes] = field(default_factory=list)
    applied: list[list[str]] = field(default_factory=list)
    signal_errors: list[str] = field(default_factory=list)
    dropped: list[Drop] = field(default_factory=list)

    @property
    def out_sa(self) -> SecurityAssociation:
        return self.engine.tunnels()[0].outbound

    def send(self, packet: bytes) -> bytes | None:
        """Protect an inner packet; return the ESP packet (also routed by the world)."""
        res = self.engine.outbound(packet, self.world.now)
        if not isinstance(res, ToPeer):
            return None
        data = bytes(res.data)
        self.wire.append(esp_seq(data))
        return data

    def receive(self, data: bytes) -> Result:
        res = self.engine.inbound(data, ip(MN_ADDR), self.world.now)
        if isinstance(res, ToInner):
            self.delivered.append(res.packet)
        elif isinstance(res, Signal):
            try:
                items = signalling.decode(res.payload)
                self.applied.append(signalling.apply(self.engine, res.sa, items))
            except SignalError as exc:
                self.signal_errors.append(str(exc))
        elif isinstance(res, Drop):
            self.dropped.append(res)
        return res


class World:
    """An MN with one tunnel at ``sg1`` and gateways ``sg1``..; CXTP links between gateways."""

    def __init__(
        self,
        gateways: tuple[str, ...] = ("sg1", "sg2"),
        settings: dict[str, Settings] | None = None,
        *,
        enc: EncAlg = EncAlg.AES_GCM_16,
        integ: IntegAlg = IntegAlg.NONE,
        window: int = 128,
        rng: Callable[[int], int] | None = None,
    ) -> None:
        self.now = 1000.0
        self.links: dict[tuple[str, str], deque[bytes]] = {}
        self.gw: dict[str, Gw] = {}
        for g in gateways:
            eng = Engine(ip(SG_ADDR[g]))
            s = (settings or {}).get(g) or Settings()
            kw = {} if rng is None else {"rng": rng}
            core = TransferCore(eng, Endpoint(ip(SG_ADDR[g]), PORT), s, **kw)  # type: ignore[arg-type]
            self.gw[g] = Gw(g, eng, core, self)
        (sg_out, sg_in, s_sg), (mn_out, mn_in, s_mn) = tunnel_sas(
            "sg1", enc=enc, integ=integ, window=window
        )
        self.sg_out, self.sg_in, self.mn_out, self.mn_in = sg_out, sg_in, mn_out, mn_in
        self.tunnel = self.gw["sg1"].engine.add_tunnel(
            SPDEntry(s_sg, Action.PROTECT, name="mn1", static=False), sg_out, sg_in
        )
        mn_eng = Engine(ip(MN_ADDR))
        mn_eng.add_tunnel(
            SPDEntry(s_mn, Action.PROTECT, name="mn-home", static=False), mn_out, mn_in
        )
        self.mn = Mn(mn_eng, self)

    # -- the inter-gateway channel --------------------------------------------------------
    def post(self, src: str, dst: str, data: bytes) -> None:
        self.links.setdefault((src, dst), deque()).append(data)

    def pending(self, src: str, dst: str) -> int:
        return len(self.links.get((src, dst), ()))

    def peek(self, src: str, dst: str) -> cxtp.Message:
        return cxtp.decode(self.links[(src, dst)][0])

    def drop(self, src: str, dst: str) -> cxtp.Message:
        return cxtp.decode(self.links[(src, dst)].popleft())

    def deliver(self, src: str, dst: str) -> cxtp.Message:
        """Deliver the oldest message on the link ``src`` -> ``dst``; return it."""
        msg = cxtp.decode(self.links[(src, dst)].popleft())
        g = self.gw[dst]
        spec = self.gw[src]
        g.run(
            g.core.receive(src, msg, self.now, may_send=spec.may_send, may_request=spec.may_request)
        )
        return msg

    def deliver_all(self, limit: int = 1000) -> int:
        """Deliver messages, oldest link first, until every link is empty."""
        n = 0
        while n < limit:
            busy = [k for k, q in self.links.items() if q]
            if not busy:
                return n
            self.deliver(*busy[0])
            n += 1
        raise AssertionError("messages keep flowing")

    # -- traffic -----------------------------------------------------------------------
    def route_mn(self, data: bytes, dst: IPAddress | None = None) -> None:
        """An ESP packet from the MN reaches the gateway its outbound SA names."""
        to = dst if dst is not None else self.mn.out_sa.dst
        for g in self.gw.values():
            if g.address == to:
                g.from_mn(data)
                return
        raise AssertionError(f"no gateway at {to}")

    def mn_send(self, seq: int) -> bytes | None:
        data = self.mn.send(udp_packet(seq, up=True))
        if data is not None:
            self.route_mn(data)
        return data

    def host_send(self, gw: str, seq: int) -> None:
        self.gw[gw].from_inner(udp_packet(seq, up=False))

    def flush_to_mn(self) -> list[Result]:
        """Hand every ESP packet the gateways emitted to the MN, in emission order per
        gateway."""
        out = []
        for g in self.gw.values():
            pkts, g.to_mn = g.to_mn, []
            out += [self.mn.receive(p) for p in pkts]
        return out

    def all_wire(self) -> list[tuple[str, int, int]]:
        return [(g.name, spi, seq) for g in self.gw.values() for spi, seq in g.wire]

    def transfer(self, src: str = "sg1", dst: str = "sg2", **kw: object) -> int:
        """Start a predictive transfer of the tunnel from ``src`` to ``dst``."""
        tid, outs = self.gw[src].core.start(
            [self.gw[src].engine.tunnels()[0]],
            dst,
            self.now,
            **kw,  # type: ignore[arg-type]
        )
        self.gw[src].run(outs)
        return tid


def collide(
    world: World,
    gw: str,
    spi: int,
    *,
    direction: Direction = Direction.INBOUND,
    peer: str = "192.0.2.99",
) -> SecurityAssociation:
    """Install at ``gw`` another tunnel whose SA has ``spi`` in the same collision domain as
    the transferred inbound SA (its destination is the gateway's own address)."""
    g = world.gw[gw]
    (o, i, s), _ = tunnel_sas(
        gw,
        spi_up=spi if direction is Direction.INBOUND else 0x7001,
        spi_down=spi if direction is Direction.OUTBOUND else 0x7002,
        local="10.9.0.0/24",
        mn_inner="10.8.0.1",
        mn_addr=peer,
        name="other",
    )
    g.engine.add_tunnel(SPDEntry(s, Action.PROTECT, name="other", static=False), o, i)
    return i if direction is Direction.INBOUND else o

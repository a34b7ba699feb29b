"""The demo's topology: a mobile node, two gateways and an end host in one process on loopback.

Everything is real but local: each node is a :class:`~ipsecct.gateway.node.Node` with its own UDP
sockets (ESP in UDP on the outer side, a virtual link on the inner side), configured through
the same TOML schema a user writes (built here as a dictionary, keys in 0600 files in a
temporary directory). A constant-rate UDP stream runs both ways between the mobile node's
application and the end host while a line per second reports progress.

Each gateway is a :class:`~ipsecct.gateway.service.Service` (its node, and context transfer
started by :mod:`ipsecct.demo.handover`); :mod:`ipsecct.demo.tour` runs the whole thing.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import os
import socket
import struct
import time
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from ..errors import IpsecctError, PacketError
from ..gateway import config as config_mod
from ..gateway.mobile_agent import MobileAgent
from ..gateway.node import Node, UdpEndpoint
from ..gateway.service import Service
from ..ipsec.ippacket import parse, udp_payload
from .processes import GatewayProcess, stop_all, wait_all
from .sender import HOST_INNER as HOST_INNER  # the demo's addresses, for its users
from .sender import MN_INNER as MN_INNER
from .sender import PAYLOAD as _PAYLOAD
from .sender import SenderProcess, packet

# Ports handed out lately, per (type, address): the kernel may give the same free port to two
# bind(0) calls in a row (the socket is closed before the next pick), and a demo picks a
# dozen before it binds any; two nodes given one port failed with "address in use" (once in
# a CI-like run of the suite).
_HANDED_OUT: collections.deque[tuple[int, str, int]] = collections.deque(maxlen=4096)


def _free_port(kind: int, host: str) -> int:
    for _ in range(64):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (kind, host, port) not in _HANDED_OUT:
            _HANDED_OUT.append((kind, host, port))
            return port
    raise OSError(f"no new free port on {host}")


def free_udp_port(host: str = "127.0.0.1") -> int:
    return _free_port(socket.SOCK_DGRAM, host)


def free_tcp_port(host: str = "127.0.0.1") -> int:
    return _free_port(socket.SOCK_STREAM, host)


MAX_WATCHED = 1 << 20  # arrival times kept per receiver and clock for the handover gaps (8 MiB)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python names it from 3.12 on
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


class _Arrivals:
    """One clock's record of a receiver's new packets: the longest pause over the whole
    stream and, while a handover is watched, every arrival time (bounded)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.max_gap = 0.0
        self.max_gap_end = 0.0  # when the longest pause ended (monotonic)
        # Arrival times (monotonic) of new packets while a handover is watched, in order;
        # bounded, so that a long run at a high rate does not grow without limit.
        self.times = array("d")
        self.watching = False

    def add(self, now: float) -> None:
        if self.last is not None:
            gap = now - self.last
            if gap > self.max_gap:
                self.max_gap = gap
                self.max_gap_end = now
        # the kernel's stamps of one socket are in order; a packet read later but stamped
        # earlier (none seen) would only shorten a pause, never make one
        self.last = now if self.last is None else max(now, self.last)
        if self.watching and len(self.times) < MAX_WATCHED:
            self.times.append(now)

    def watch(self) -> None:
        """Record arrivals from now on (the one just before included) for :meth:`longest_gap`."""
        if not self.watching and self.last is not None:
            self.times.append(self.last)
        self.watching = True

    def stream_gap(self, end: float) -> tuple[float, float]:
        """(length, start) of the longest pause this receiver felt over the whole stream,
        from its first arrival until ``end`` (when the last packet was sent: a stream that
        stopped arriving before its end has a pause that no arrival closes)."""
        gap, start = self.max_gap, self.max_gap_end - self.max_gap
        if self.last is not None and end - self.last > gap:
            gap, start = end - self.last, self.last
        return gap, start

    def longest_gap(self, lo: float, hi: float) -> float:
        """The longest pause between arrivals from ``lo`` to ``hi``, the pauses that span
        either end included."""
        t = self.times
        i = max(0, bisect.bisect_left(t, lo) - 1)
        j = bisect.bisect_right(t, hi) + 1
        seg = t[i:j]
        return max((b - a for a, b in itertools.pairwise(seg)), default=0.0)



def realtime_offset_ns(tries: int = 3) -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC now, in ns, read between two monotonic readings:
    of ``tries`` such brackets the tightest (a process preempted between its two clock reads,
    as on a loaded machine, made the offset, and so every kernel arrival time of that batch,
    off by the whole preemption: 13 ms in a CI run)."""
    best: tuple[int, int] | None = None
    for _ in range(tries):
        a = time.monotonic_ns()
        r = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, r - (a + b) // 2)
        if b - a < 20_000:  # (20 us: tight enough)
            break
    assert best is not None
    return best[1]

class _App:
    """An application endpoint at the end of a virtual link: receives and counts the stream
    (``ipsecct demo`` sends it from a process of its own, :mod:`ipsecct.demo.sender`; the
    tests' in-process demos from :func:`stream`'s loop).

    Each new packet's arrival is recorded on two clocks: :attr:`net`, when the kernel
    received it (``SO_TIMESTAMPNS``, the time a capture on the link shows, converted to
    ``time.monotonic``), what the demo's gap figures are; and :attr:`read`, when this
    process's event loop got round to reading it (the ``app_*`` figures), which also counts
    every pause of the demo's own process, its handover work included, although no packet
    was late on the wire. Without kernel stamps (not Linux) both are the read time.

    Its socket is a :class:`~ipsecct.gateway.node.UdpEndpoint`, as a node's are (see
    :meth:`open`): 4 MiB of receive buffer and up to 64 datagrams read per wake-up of the
    loop. asyncio's own datagram transport reads one per wake-up, with the kernel's default
    buffer (208 KiB, some 270 of the stream's datagrams): after a stall of the demo's process
    on a loaded machine the backlog drained one loop iteration per packet, and a stall of
    about 0.3 s overflowed it (packets "lost" that no gateway dropped)."""

    def __init__(self, name: str, direction: int) -> None:
        self.name = name
        self.direction = direction  # 0: MN -> host, 1: host -> MN (the direction it *sends*)
        self.transport: UdpEndpoint | None = None
        self.received: set[int] = set()
        self.duplicates = 0
        self.net = _Arrivals()  # kernel receive times
        self.read = _Arrivals()  # when the demo's loop read them
        self.clock: Callable[[], float] = time.monotonic

    def open(self, port: int) -> None:
        """Bind the application's socket on 127.0.0.1:``port`` (in a running loop), with the
        kernel's receive time on every datagram."""
        self.transport = UdpEndpoint.bind(("127.0.0.1", port), self.datagram_received)
        with contextlib.suppress(OSError):
            self.transport.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.transport.set_reader(self._readable)

    def _readable(self) -> None:
        assert self.transport is not None
        recv = self.transport.sock.recvmsg
        # the kernel stamps with the real-time clock: to monotonic, per batch (a step of the
        # wall clock between two batches moves no arrival)
        offset = realtime_offset_ns()
        for _ in range(self.transport.batch):
            try:
                data, ancillary, _flags, addr = recv(65535, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                continue
            at = None
            for level, kind, value in ancillary:
                ours = level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS
                if ours and len(value) >= _TIMESPEC.size:
                    sec, ns = _TIMESPEC.unpack_from(value)
                    at = (sec * 1_000_000_000 + ns - offset) / 1e9
            self.datagram_received(data, addr, at)

    def datagram_received(
        self, data: bytes, addr: tuple[Any, ...], at: float | None = None
    ) -> None:
        """A datagram read now, which the kernel received at ``at`` (monotonic; None: now)."""
        try:
            hdr = parse(data)
            _, _, body = udp_payload(data, hdr)
            d, seq, _ = _PAYLOAD.unpack_from(body)
        except (PacketError, struct.error):
            return
        if d == self.direction:
            return
        if seq in self.received:
            self.duplicates += 1
            return
        self.received.add(seq)
        now = self.clock()
        self.read.add(now)
        self.net.add(now if at is None else at)

    def watch(self) -> None:
        """Record arrivals from now on (the one just before included) on both clocks."""
        self.net.watch()
        self.read.watch()


@dataclass
class DemoNode:
    name: str
    service: Service
    outer_port: int
    inner_port: int

    @property
    def node(self) -> Node:
        return self.service.node


@dataclass
class Demo:
    """The running topology; plugins (handover, fail-over) reach everything from here."""

    workdir: Path
    mn: DemoNode
    gateways: dict[str, DemoNode]
    host_app: _App
    mn_app: _App
    host_port: int
    mn_app_port: int
    serving: str = "sg1"
    handovers: list[dict[str, Any]] = field(default_factory=list)
    # per handover: (trigger, target active), monotonic; its gap_ms is measured around them
    handover_times: list[tuple[float, float]] = field(default_factory=list)
    # the longest pause of the stream before any handover work (set by watch_gaps: at the
    # preparation's start, or at the handover's when nothing is prepared)
    baseline_gaps: list[float | None] = field(default_factory=list)
    app_baseline_gaps: list[float | None] = field(default_factory=list)  # the same, as read
    started: float = 0.0
    ended: float = 0.0  # when the stream's last packet was sent (monotonic)
    sent: list[int] = field(default_factory=lambda: [0, 0])
    identity: str = "direct"
    keying: str = "manual"  # or "ike": the MN's agent initiates IKEv2 to sg1 (demo/ike.py)
    relay: _Relay | None = None  # the access network of indirect identity
    host_peer: tuple[str, int] = ("127.0.0.1", 0)  # where the host's packets go (a gateway)
    # Each gateway's (outer, inner) ports, whether it runs here or in a process of its own.
    gw_ports: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The gateways run as processes of their own (``ipsecct demo``; :attr:`gateways` is then
    # empty): each one's process, and its drop counters as last read over its control socket.
    procs: dict[str, GatewayProcess] = field(default_factory=dict)
    remote_drops: dict[str, dict[str, int]] = field(default_factory=dict)
    remote_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ``--prepared``: the transfer prepared ahead of the handover (its task; the handover
    # commits it), and how long before the handover it starts (seconds; 0: not prepared).
    prepare_ahead: float = 0.0
    prepared: asyncio.Task[tuple[str, float]] | None = None
    prepare_started: float | None = None  # when the preparation was started (monotonic)
    # The stream's sender as a process of its own (``ipsecct demo``; None: the stream's loop
    # sends), and its longest lateness against its schedule (seconds; None: not measured).
    sender: SenderProcess | None = None
    sender_late: float | None = None
    # How the stream's carriers were scheduled (read back once the stream starts): the
    # sender's policy and each node's forwarding thread's ([native] thread_priority's words)
    scheduling: dict[str, str] = field(default_factory=dict)

    def watch_gaps(self) -> None:
        """Something the stream's floor must not include starts (a preparation, a
        handover): the receivers record arrivals from now on so that its gap can be measured,
        and the longest pause so far is kept as the run's baseline (once: before any
        handover work, the same path's noise floor in this run; ``None`` when fewer than two
        packets had arrived either way, as when a preparation starts with the stream)."""
        if not self.baseline_gaps:
            apps = (self.host_app, self.mn_app)
            if all(len(a.received) >= 2 for a in apps):
                self.baseline_gaps.append(max(a.net.max_gap for a in apps))
                self.app_baseline_gaps.append(max(a.read.max_gap for a in apps))
            else:
                self.baseline_gaps.append(None)
                self.app_baseline_gaps.append(None)
        self.host_app.watch()
        self.mn_app.watch()

    def start_preparing(self, now: float) -> None:
        """The preparation of a predictive handover starts (the baseline ended no later:
        the preparation is handover work, its pause is counted in gap_ms and
        prepare_gap_ms, not in the floor); arrivals are recorded from now on."""
        self.prepare_started = now
        self.watch_gaps()

    def host_route(self, gw: str) -> None:
        """The access network's route towards the MN now goes through gateway ``gw``."""
        self.serving = gw
        outer, inner = self.gw_ports[gw]
        self.host_peer = ("127.0.0.1", inner)
        if self.sender is not None:
            self.sender.peer(inner)
        if self.relay is not None:
            self.relay.owner = (ADDRESS[gw], outer)

    @property
    def services(self) -> dict[str, Service]:
        """Each gateway's service (context transfer, fail-over)."""
        return {name: g.service for name, g in self.gateways.items()}

    @property
    def agent(self) -> MobileAgent:
        """The mobile node's agent (applies its gateway's signals)."""
        assert self.mn.service.agent is not None
        return self.mn.service.agent

    def all_nodes(self) -> list[Node]:
        return [self.mn.node] + [g.node for g in self.gateways.values()]


def _keys_file(d: Path, name: str, in_key: bytes, out_key: bytes) -> str:
    p = d / f"{name}.keys"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'in_enc = "{in_key.hex()}"\nout_enc = "{out_key.hex()}"\n')
    return str(p)


IKE_PROPOSAL = "aes128gcm16-prfsha256-x25519"  # IKE SA: AES-GCM-128, PRF SHA-256, X25519
ESP_PROPOSAL = "aes128gcm16-esn"  # CHILD SA: AES-GCM-128 with extended sequence numbers
MN_ID, SG_ID = "mn.demo.ipsecct", "sg.demo.ipsecct"


def _psk_file(d: Path) -> str:
    """A pre-shared key made for this run (256 random bits), in a 0600 file of the run's
    directory: never on a command line, never logged."""
    p = d / "ike.psk"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("0x" + os.urandom(32).hex() + "\n")
    return str(p)


def _ike_sections(
    psk: str, local_id: str, remote_id: str, conn: str, conn_d: dict[str, Any]
) -> dict[str, Any]:
    """The ``[ike]``, ``[connections.NAME]`` and ``[secrets.ike-NAME]`` tables of one demo
    node: IKE on its outer (NAT-T) port only, so nothing needs a privileged port."""
    return {
        "ike": {"port": 0},
        "connections": {
            conn: {
                "version": 2,
                "proposals": [IKE_PROPOSAL],
                "local": {"auth": "psk", "id": local_id},
                "remote": {"auth": "psk", "id": remote_id},
                **conn_d,
            }
        },
        "secrets": {f"ike-{conn}": {"id": [local_id, remote_id], "file": psk}},
    }


# The demo's forwarding threads (every node's: the MN's here, the gateways' in their
# processes): real-time, as the kernel's ESP runs above every process. With them at the
# ordinary policy the 1 ms stream paused 1 ms longer at the median (benchmarks/README.md,
# "[native] thread_priority"); where the kernel refuses it (no CAP_SYS_NICE) each logs a
# warning and runs at the ordinary policy. The stream's sender runs above them.
THREAD_PRIORITY = "fifo:1"


def node_data(
    name: str,
    address: str,
    outer_port: int,
    inner_port: int,
    inner_peer: int,
    tunnels: list[dict[str, Any]],
    sections: dict[str, Any] | None = None,
    *,
    virtual: str | None = None,
) -> dict[str, Any]:
    """A demo node's configuration as the TOML schema's dictionary."""
    data: dict[str, Any] = {
        "native": {"thread_priority": THREAD_PRIORITY},
        "name": name,
        "outer": {
            "address": address,
            "port": outer_port,
            **({"virtual": virtual} if virtual else {}),
        },
        "inner": {
            "kind": "udp",
            "listen": f"127.0.0.1:{inner_port}",
            "peer": f"127.0.0.1:{inner_peer}",
        },
        "tunnel": tunnels,
    }
    data.update(sections or {})
    return data


# Each node has its own loopback address (all of 127/8 is local on Linux), so a handover really
# changes the address the mobile node talks to.
ADDRESS = {"mn": "127.0.1.10", "sg1": "127.0.1.1", "sg2": "127.0.1.2", "sg3": "127.0.1.3"}
VIRTUAL = "127.0.1.100"  # the virtual gateway address of indirect SG identity


class _Relay(asyncio.DatagramProtocol):
    """Emulates the access network for indirect SG identity: datagrams sent to the virtual
    gateway address reach whichever gateway owns it now (a route or ARP change in a real
    network; in network namespaces the address itself moves).

    With ``client`` set (IKEv2 keying) it relays both ways, like a NAT in front of the MN:
    what comes from the client goes to the owner, everything else to the client, so that
    the MN talks to one address and port (the virtual one) whichever gateway answers, as it
    does in a real network."""

    def __init__(self, client: tuple[str, int] | None = None) -> None:
        self.owner: tuple[str, int] | None = None
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is None:
            return
        if self.client is not None and tuple(addr[:2]) != self.client:
            self.transport.sendto(data, self.client)
        elif self.owner is not None:
            self.transport.sendto(data, self.owner)


async def build(
    workdir: Path,
    *,
    enc: str = "aes-gcm-16",
    window: int = 1024,
    gateways: tuple[str, ...] = ("sg1", "sg2"),
    identity: str = "direct",
    transfer: dict[str, Any] | None = None,
    failover: bool = False,
    keying: str = "manual",
    processes: bool = False,
    start_timeout: float = 30.0,
) -> Demo:
    """Start the MN, the gateways and the two applications; the MN's SAs are on sg1. Each
    gateway also runs context transfer (TLS with certificates from a fresh test CA).

    ``keying = "manual"``: the SAs are configured on the MN and sg1 (``[[tunnel]]`` with keys
    in 0600 files). ``"ike"``: no tunnel is configured; the MN's agent has an IKEv2
    connection to sg1 (``start_action = start``, PSK made for the run) and every gateway a
    responder connection of the same name (what a handover moves the IKE SA to); the IKE
    SA is started by :func:`ipsecct.demo.ike.establish`.

    ``processes``: each gateway is ``ipsecct gateway run`` in a process of its own
    (:mod:`ipsecct.demo.processes`; started at once, waited for up to ``start_timeout``
    seconds each, on its control socket); this process keeps the MN, the host and the relay.
    Without it (the tests, ``ipsecct bench transfer``) everything runs here."""
    ike = keying == "ike"
    from ..tools import pki

    ports = {n: (free_udp_port(ADDRESS[n]), free_udp_port()) for n in ("mn", *gateways)}
    ct_ports = {g: free_tcp_port(ADDRESS[g]) for g in gateways}
    host_port, mn_app_port = free_udp_port(), free_udp_port()
    k_up, k_down = os.urandom(20), os.urandom(20)  # AES-GCM-128 key + salt, each direction
    spi_up, spi_down = 0x10000001, 0x20000001  # MN -> SG, SG -> MN
    mn_keys = _keys_file(workdir, "mn", in_key=k_down, out_key=k_up)
    sg_keys = _keys_file(workdir, "sg1", in_key=k_up, out_key=k_down)
    import datetime as dt

    pki.init_pki(workdir / "pki", list(gateways), dt.datetime.now(dt.UTC))
    indirect = identity == "indirect"
    relay: _Relay | None = None
    loop = asyncio.get_running_loop()
    if indirect:
        relay = _Relay((ADDRESS["mn"], ports["mn"][0]) if ike else None)
        vport = free_udp_port(VIRTUAL)
        await loop.create_datagram_endpoint(lambda: relay, local_addr=(VIRTUAL, vport))
        sg_contact = f"{VIRTUAL}:{vport}"
    else:
        sg_contact = f"{ADDRESS['sg1']}:{ports['sg1'][0]}"
    common = {"enc": enc, "esn": True, "replay_window": window, "mode": "tunnel"}
    psk = _psk_file(workdir) if ike else ""
    mn_sections: dict[str, Any] = {}
    if ike:
        host, _, port = sg_contact.rpartition(":")
        mn_sections = _ike_sections(psk, MN_ID, SG_ID, "home", {
            "local_addrs": [ADDRESS["mn"]], "remote_addrs": [host],
            "local_port": ports["mn"][0], "remote_port": int(port),
            "children": {"home": {
                "local_ts": [f"{MN_INNER}/32"], "remote_ts": ["10.2.0.0/24"],
                "esp_proposals": [ESP_PROPOSAL], "start_action": "start",
                "replay_window": window}},
        })  # fmt: skip
    mn_data = node_data(
        "mn",
        ADDRESS["mn"],
        *ports["mn"],
        mn_app_port,
        [] if ike else [
            {
                "name": "mn-home",
                "local_ts": f"{MN_INNER}/32",
                "remote_ts": "10.2.0.0/24",
                "peer": sg_contact,
                "spi_in": spi_down,
                "spi_out": spi_up,
                "keys": mn_keys,
                **common,
            }
        ],
        mn_sections,
    )
    mn_cfg = config_mod.from_dict(mn_data, "<demo mn>")
    # Each run's durable state lives and dies with its work directory: a demo never resumes
    # an earlier run's counters or ownership, and demos run side by side do not share it.
    mn_cfg.state_dir = str(workdir / "state" / "mn")
    mn = DemoNode("mn", Service(mn_cfg, role="node"), *ports["mn"])
    gws: dict[str, DemoNode] = {}
    procs: dict[str, GatewayProcess] = {}
    for g in gateways:
        tunnels: list[dict[str, Any]] = []
        if g == "sg1" and not ike:
            tunnels.append(
                {
                    "name": "mn1",
                    "local_ts": "10.2.0.0/24",
                    "remote_ts": f"{MN_INNER}/32",
                    "peer": f"{ADDRESS['mn']}:{ports['mn'][0]}",
                    "spi_in": spi_up,
                    "spi_out": spi_down,
                    "keys": sg_keys,
                    **common,
                }
            )
        sections: dict[str, Any] = {
            "transfer": {
                "listen": f"{ADDRESS[g]}:{ct_ports[g]}",
                "cert": str(workdir / "pki" / f"{g}.pem"),
                "key": str(workdir / "pki" / f"{g}.key"),
                "ca": str(workdir / "pki" / "ca.pem"),
                "identity": identity if identity in ("direct", "indirect") else "direct",
                # What a peer may hand over: tunnels between the host's side and the MNs'
                # (sg2 starts without a tunnel to take the defaults from).
                "accept_local_ts": "10.2.0.0/16",
                "accept_remote_ts": "10.0.0.0/8",
                # The draft's CT_MAX_TRANSFER_TIME (200 ms) bounds an exchange between gateways
                # on machines of their own; here three gateways, the MN and the stream share
                # one process, and both ends' durable writes one disk: on a loaded machine a
                # handover missed it and rolled back (the demo then failed "timed out"). The
                # handover's time is measured and reported whatever the bound.
                "max_transfer_ms": 5000,
                **(transfer or {}),
            },
            "peers": [
                {"name": p, "address": f"{ADDRESS[p]}:{ct_ports[p]}", "outer": ADDRESS[p],
                 "outer_port": ports[p][0]}  # (the MN's ESP still at g relayed there)
                for p in gateways
                if p != g
            ],
        }
        if ike:  # every gateway answers the MN's connection (and so can take its IKE SA)
            sections.update(_ike_sections(psk, SG_ID, MN_ID, "home", {
                "remote_addrs": ["%any"],
                "children": {"home": {
                    "local_ts": ["10.2.0.0/24"], "remote_ts": [f"{MN_INNER}/32"],
                    # as the manual tunnels': after a handover sg2 opens the packets sg1
                    # forwarded behind those the MN sent it meanwhile (a stalled MN switches
                    # late: 100+ packets at 1000 a second), which a window of 64 refused
                    "esp_proposals": [ESP_PROPOSAL], "replay_window": window}},
            }))  # fmt: skip
        if failover and g in ("sg1", "sg2"):
            sections["failover"] = {
                "role": "active" if g == "sg1" else "standby",
                "peer": "sg2" if g == "sg1" else "sg1",
            }
        data = node_data(
            g,
            ADDRESS[g],
            *ports[g],
            host_port,
            tunnels,
            sections,
            virtual=VIRTUAL if indirect else None,
        )
        if processes:
            data["state"] = {"dir": str(workdir / "state" / g)}
            procs[g] = GatewayProcess(g, workdir, data)
            continue
        cfg = config_mod.from_dict(data, f"<demo {g}>")
        cfg.state_dir = str(workdir / "state" / g)
        gws[g] = DemoNode(g, Service(cfg), *ports[g])
    starting: asyncio.Future[None] | None = None
    host_app, mn_app = _App("host", 1), _App("mn-app", 0)
    try:
        # The gateways' processes first (forked before this process starts any thread; they
        # start while this one does its part), then the MN and the applications here.
        for p in procs.values():
            p.start()
        starting = asyncio.ensure_future(wait_all(list(procs.values()), start_timeout))
        host_app.open(host_port)
        mn_app.open(mn_app_port)
        for n in [mn, *gws.values()]:
            # Its durable state's writers (reservations, ownership changes), as a gateway run
            # starts them: without them every write would be made synchronously, on the loop.
            await n.service.state.start()
            await n.node.start()
        await starting
    except BaseException:
        if starting is not None:
            starting.cancel()
        stop_all(list(procs.values()))
        for n in [mn, *gws.values()]:
            with contextlib.suppress(Exception):
                await n.node.stop()
                await n.service.state.stop()
        for app in (host_app, mn_app):
            if app.transport is not None:
                app.transport.close()
        raise
    demo = Demo(workdir, mn, gws, host_app, mn_app, host_port, mn_app_port)
    demo.gw_ports = {g: ports[g] for g in gateways}
    demo.procs = procs
    demo.relay = relay
    demo.identity = identity
    demo.keying = keying
    demo.host_route("sg1")
    return demo


async def stop(demo: Demo) -> None:
    for svc in [demo.mn.service, *demo.services.values()]:  # the MN's DELETE goes first
        if svc.ike is not None:
            await svc.ike.stop()
    stop_all(list(demo.procs.values()))  # SIGTERM, as an operator's service manager does
    for svc in demo.services.values():
        await svc.stop_context_transfer()
    for n in demo.all_nodes():
        if not n._stopping.is_set():
            await n.stop()
    for dn in [demo.mn, *demo.gateways.values()]:
        await dn.service.state.stop()
    for app in (demo.host_app, demo.mn_app):
        if app.transport is not None:
            app.transport.close()


async def stream(
    demo: Demo,
    rate: int,
    seconds: float,
    *,
    out: TextIO | None,
    at_half: Callable[[], Coroutine[Any, Any, None]] | None = None,
    before_half: Callable[[], Coroutine[Any, Any, Any]] | None = None,
    paced_apart: bool = False,
) -> None:
    """Send ``rate`` packets/s each way for ``seconds``, a status line per second on ``out``.

    ``paced_apart`` (``ipsecct demo``): a process of its own sends the stream, each packet at
    its absolute deadline (:mod:`ipsecct.demo.sender`), as a user's application with its own
    timer does; this loop, which also runs the MN, the receivers and the handover's control
    work, only starts the handover and reports. Otherwise (the tests' in-process demos) this
    loop sends, whenever it runs: a busy or unscheduled loop sends late, and the receivers
    count that as a pause of the stream."""
    total = int(rate * seconds)
    sender: SenderProcess | None = None
    assert demo.mn_app.transport is not None and demo.host_app.transport is not None
    if paced_apart:
        sender = await SenderProcess.start(
            demo.mn_app.transport.sock, demo.host_app.transport.sock, rate, total,
            demo.mn.inner_port, demo.host_peer[1], demo.workdir / "sender.log",
        )  # fmt: skip
        demo.sender = sender
        demo.scheduling = {"sender": sender.policy, **await _thread_priorities(demo)}
    try:
        await _stream(demo, rate, seconds, total, out, at_half, before_half, sender)
    finally:
        demo.sender = None
        if sender is not None:
            sender.close()


async def _thread_priorities(demo: Demo) -> dict[str, str]:
    """Each node's forwarding thread's scheduling as its status says (none: no thread)."""
    out: dict[str, str] = {}
    sts = [(n.name, n.node.status()) for n in [demo.mn, *demo.gateways.values()]]
    for name, p in demo.procs.items():
        with contextlib.suppress(IpsecctError):
            sts.append((name, await p.request("status", timeout=5)))
    for name, st in sts:
        nt = st.get("native_thread")
        out[name] = nt["priority"] if isinstance(nt, dict) else "no thread"
    return out


async def _stream(
    demo: Demo,
    rate: int,
    seconds: float,
    total: int,
    out: TextIO | None,
    at_half: Callable[[], Coroutine[Any, Any, None]] | None,
    before_half: Callable[[], Coroutine[Any, Any, Any]] | None,
    sender: SenderProcess | None,
) -> None:
    loop = asyncio.get_running_loop()
    assert demo.mn_app.transport is not None and demo.host_app.transport is not None
    start = loop.time()
    if sender is not None:
        start += 0.02  # the "go" line's way to the sender, were this process descheduled
        sender.go(start)
    demo.started = start
    half_task: asyncio.Task[None] | None = None
    refresh: asyncio.Task[None] | None = None
    next_report = 1.0
    sent = 0
    late = 0.0
    mn_link = ("127.0.0.1", demo.mn.inner_port)
    # The baseline (the stream's floor) ends BASELINE_LEAD before the half-way handover, or
    # at the preparation if that starts earlier, in every mode: one window for all, so that
    # a reactive run's baseline is as long as a predictive one's (a longer window has a
    # higher longest pause) and holds no handover work.
    baseline_end = seconds / 2 - max(demo.prepare_ahead, min(BASELINE_LEAD, seconds / 2))
    prepare_at = seconds / 2 - demo.prepare_ahead
    while True:
        if sender is None:
            if sent >= total:
                break
            # Evenly paced: each packet when it is due (the loop wakes about once a
            # millisecond), so that the receivers' longest gap is not bursts of the sender.
            due = min(total, int((loop.time() - start) * rate) + 1)
            while sent < due:
                late = max(late, loop.time() - (start + sent / rate))
                sent += 1
                demo.mn_app.transport.sendto(packet(0, sent), mn_link)
                demo.host_app.transport.sendto(packet(1, sent), demo.host_peer)
        elif sender.done.done():
            break
        else:
            # for the live lines: what its schedule has sent by now (it reports its count
            # every 0.1 s, and a line must not show more received than sent); exact at its end
            due = int((loop.time() - start) * rate) + 1
            sent = max(sender.sent, min(total, due))
        demo.sent = [sent, sent]
        elapsed = loop.time() - start
        if at_half is not None and not demo.baseline_gaps and elapsed >= baseline_end:
            demo.watch_gaps()
        if before_half is not None and demo.prepared is None and elapsed >= prepare_at:
            demo.start_preparing(time.monotonic())
            demo.prepared = asyncio.create_task(before_half())
        if at_half is not None and half_task is None and elapsed >= seconds / 2:
            half_task = asyncio.create_task(at_half())
        if out is not None and elapsed >= next_report:
            _report(demo, elapsed, out)
            next_report += 1.0
            if demo.procs and (refresh is None or refresh.done()):
                refresh = asyncio.create_task(read_status(demo))  # for the next line
        if sender is None:
            await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
            continue
        # Only the next step to take wakes this loop (or the sender's end, or 0.1 s).
        steps = [0.1 + elapsed]
        if at_half is not None and not demo.baseline_gaps:
            steps.append(baseline_end)
        if before_half is not None and demo.prepared is None:
            steps.append(prepare_at)
        if at_half is not None and half_task is None:
            steps.append(seconds / 2)
        if out is not None:
            steps.append(next_report)
        await asyncio.wait([sender.done], timeout=max(0.0, start + min(steps) - loop.time()))
    if sender is not None:
        sent, demo.ended, late, _unsent = await sender.finish(timeout=10.0)
        demo.sent = [sent, sent]
    else:
        demo.ended = loop.time()
    demo.sender_late = late
    if half_task is not None:
        await half_task
    await _last_packets(demo, sent)
    if refresh is not None:
        await refresh
    await read_status(demo)
    if out is not None:
        _report(demo, loop.time() - start, out)


async def _last_packets(demo: Demo, sent: int, quiet: float = 0.3, limit: float = 5.0) -> None:
    """Let the last packets of a stream of ``sent`` each way arrive: until all have, or none
    has for ``quiet`` seconds (what a handover lost), at most ``limit`` seconds. Quiet counts
    polls of the running loop too (one every 10 ms), not only time: a process the machine
    did not run for a while has received nothing meanwhile, and its packets are still
    queued in its sockets, a loop iteration or two per hop away."""
    loop = asyncio.get_running_loop()
    step = 0.01

    def arrived() -> int:
        return len(demo.mn_app.received) + len(demo.host_app.received)

    start = last_change = loop.time()
    seen, polls = arrived(), 0
    while seen < 2 * sent and loop.time() - start < limit:
        await asyncio.sleep(step)
        n = arrived()
        if n != seen:
            seen, polls, last_change = n, 0, loop.time()
            continue
        polls += 1
        if polls * step >= quiet and loop.time() - last_change >= quiet:
            return


def _drops(demo: Demo) -> dict[str, int]:
    out: dict[str, int] = {"replay": 0, "icv": 0, "no_sa": 0, "policy": 0}
    for n in demo.all_nodes():
        for k in out:
            out[k] += n.engine.stats.drops.get(k, 0)
    for drops in demo.remote_drops.values():
        for k in out:
            out[k] += drops.get(k, 0)
    return out


async def read_status(demo: Demo) -> None:
    """``status`` of the gateways that run as processes, over their control sockets, into
    :attr:`Demo.remote_status` and :attr:`Demo.remote_drops` (a gateway that is gone keeps
    what was read last)."""
    for name, p in demo.procs.items():
        if p.killed:
            continue
        with contextlib.suppress(IpsecctError):
            st = await p.request("status", timeout=5)
            demo.remote_status[name] = st
            demo.remote_drops[name] = {str(k): int(v) for k, v in st["counters"]["drops"].items()}


def _report(demo: Demo, elapsed: float, out: TextIO) -> None:
    up, down = len(demo.host_app.received), len(demo.mn_app.received)
    d = _drops(demo)
    dtxt = " ".join(f"{k}={v}" for k, v in d.items())
    out.write(
        f"t={elapsed:4.1f}s  mn->host {up:6d}/{demo.sent[0]:<6d}"
        f" host->mn {down:6d}/{demo.sent[1]:<6d}"
        f" drops {dtxt}  via {demo.serving}\n"
    )
    out.flush()


def _net(app: _App) -> _Arrivals:
    return app.net


def _read(app: _App) -> _Arrivals:
    return app.read


BASELINE_LEAD = 1.0  # seconds before the half-way handover that the baseline ends (at least)
SETTLE = 0.05  # seconds after a handover's target is active that still count as its window


def summary(demo: Demo) -> dict[str, Any]:
    sent = demo.sent[0] + demo.sent[1]
    received = len(demo.host_app.received) + len(demo.mn_app.received)
    # The longest pause a user felt: either direction, over the whole stream (until its last
    # packet was sent), whatever caused it. A window around the handover would hide what
    # the handover causes later (the MN switching late, forwarding ending, packets dropped
    # until a reservation is written) and what the machine does elsewhere in the run: the
    # window's own figure is kept apart (handover_gap_ms), with where the longest pause was.
    #
    # Every figure on two clocks: the kernel's receive times (``gap_ms`` and the others, what
    # a capture on the link shows: the pauses the network made) and this process's reading
    # (``app_gap_ms`` and the others: those plus every pause of the demo's own process).
    end = demo.ended or time.monotonic()
    apps = (demo.host_app, demo.mn_app)
    for i, h in enumerate(demo.handovers):
        # One handover a run: its losses and its longest pause are the stream's.
        h["lost"] = sent - received
        for prefix, clock in (("", _net), ("app_", _read)):
            gap, gap_start = max(clock(a).stream_gap(end) for a in apps)
            h[f"{prefix}gap_ms"] = round(1000 * gap, 3)
            if i >= len(demo.handover_times):
                continue
            lo, hi = demo.handover_times[i]
            hi += SETTLE
            window = max(clock(a).longest_gap(lo, hi) for a in apps)
            h[f"{prefix}gap_at_ms"] = round(1000 * (gap_start - lo), 3)  # from the trigger
            h[f"{prefix}handover_gap_ms"] = round(1000 * window, 3)
            baselines = demo.app_baseline_gaps if prefix else demo.baseline_gaps
            if baselines:
                b = baselines[0]
                h[f"{prefix}baseline_gap_ms"] = None if b is None else round(1000 * b, 3)
            if h.get("prepared") and demo.prepare_started is not None:
                # the preparation's own pause: from its start to the trigger (the commit)
                p0 = demo.prepare_started
                prep = max(clock(a).longest_gap(p0, lo) for a in apps)
                h[f"{prefix}prepare_gap_ms"] = round(1000 * prep, 3)
        if demo.sender_late is not None:
            # how late the stream's sender was against its schedule at worst: every receive
            # pause includes it (a few ms when the demo's loop sends, about 0.1 when apart)
            h["sender_late_ms"] = round(1000 * demo.sender_late, 3)
    return {
        "packets": {
            "sent": sent,
            "received": received,
            "lost": sent - received,
            "duplicated": demo.host_app.duplicates + demo.mn_app.duplicates,
        },
        "drops": _drops(demo),
        "handovers": demo.handovers,
        **({"scheduling": demo.scheduling} if demo.scheduling else {}),
    }


def print_summary(s: dict[str, Any], out: TextIO) -> None:
    p = s["packets"]
    out.write("\nsummary\n")
    rows = [
        ("packets sent", p["sent"]),
        ("packets received", p["received"]),
        ("packets lost", p["lost"]),
        ("packets duplicated", p["duplicated"]),
    ] + [(f"drops: {k}", v) for k, v in s["drops"].items()]
    for k, v in rows:
        out.write(f"  {k:<22} {v:>8}\n")
    if s.get("scheduling"):
        out.write("  scheduling             " + ", ".join(
            f"{k} {v}" for k, v in s["scheduling"].items()) + "\n")  # fmt: skip
    for h in s["handovers"]:
        out.write(
            f"  handover {h['from']} -> {h['to']} ({h['mode']}"
            + (f", {h['context_transfer']}" if "context_transfer" in h else "")
            + (f", prepared {h['prepared_ahead_s']:g} s ahead" if h.get("prepared") else "")
            + f"): transfer {h['transfer_ms']:.2f} ms"
            + (" from the commit" if h.get("prepared") else "")
            + (f" (event loop CPU {h['transfer_cpu_ms']:.2f} ms)," if "transfer_cpu_ms" in h
               else ",")
            + f" longest gap {h['gap_ms']:.1f} ms"
            + (f" ({h['gap_at_ms']:+.0f} ms from the trigger;"
               f" {h['handover_gap_ms']:.1f} ms around the handover)" if "gap_at_ms" in h else "")
            + (f" (before it: {h['baseline_gap_ms']:.1f} ms)" if h.get("baseline_gap_ms")
               is not None else "")
            + (f" (while preparing: {h['prepare_gap_ms']:.1f} ms)" if "prepare_gap_ms" in h
               else "")
            + (f" (as this process read them: {h['app_gap_ms']:.1f} ms)" if "app_gap_ms" in h
               else "")
            + f", lost {h['lost']}"
            + (" (sg2 took over before the kill: sg1, not run for the detection time, fell"
               " silent first and is its standby now)" if h.get("taken_over_before_kill")
               else "")
            + "\n"
        )

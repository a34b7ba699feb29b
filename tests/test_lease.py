"""Fencing of a fail-over pair by leases (issue 9): sans-I/O.

1. The lease arithmetic (:mod:`ipsecct.ct.lease`): unit tests, and a hypothesis property over
   clock rates within the bound that the holder is silent before the grantor may take over.
2. The engine's fence: outbound packets held once the lease runs out or a tunnel reaches its
   sequence ceiling; signals refused.
3. A simulation of a real pair (two engines, the Replicator and the Standby, ordered channels
   with delays, partitions that break the connection, crashes, clocks drifting within the
   bound) driven by hypothesis: no (SPI, sequence number) pair is ever sent twice, and once
   the network heals and crashed gateways are back, every tunnel has exactly one gateway that
   may send on it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.ct import cxtp, failover, lease
from ipsecct.ct.transfer import Identity
from ipsecct.errors import CxtpError, IpsecctError
from ipsecct.ipsec import native as native_mod
from ipsecct.ipsec.engine import Engine, Held, ToPeer, Tunnel, TunnelState
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import Endpoint
from ipsecct.ipsec.spd import Action, SPDEntry
from tests.helpers.data_path import native_only
from tests.helpers.transfer import PORT, SG_ADDR, esp_seq, ip, tunnel_sas, udp_packet

# -- 1. the arithmetic -----------------------------------------------------------------------


def test_timing_from_dead_ms() -> None:
    t = lease.timing(500, drift_ppm=1000, guard_ms=50)
    assert t.wait == 0.5
    assert t.lease == pytest.approx(0.45 * 0.999 / 1.001)
    assert t.lease * (1 + t.rho) / (1 - t.rho) + t.guard == pytest.approx(t.wait)
    with pytest.raises(ValueError):
        lease.timing(40, guard_ms=50)
    with pytest.raises(ValueError):
        lease.LeaseTiming(lease=1.0, wait=1.0, rho=0.01, guard=0.0)  # wait too short


def test_lease_runs_from_the_sending_of_the_granted_heartbeat() -> None:
    t = lease.timing(300, drift_ppm=0, guard_ms=100)  # lease 0.2 s
    h = lease.Lease(t)
    assert not h.valid(0.0)  # a new holder starts fenced
    h.sent(0, 10.0)
    h.sent(1, 10.1)
    assert h.granted(0, 10.15) == [lease.LeaseEvent.GRANTED]
    assert h.valid(10.199) and not h.valid(10.2)
    assert h.granted(0, 10.16) == []  # already superseded: extends nothing
    assert h.poll(10.25) == [lease.LeaseEvent.LOST]
    assert h.granted(1, 10.26) == [lease.LeaseEvent.REGAINED]  # a late grant still counts
    assert h.valid(10.299) and not h.valid(10.3)
    assert h.granted(7, 10.27) == []  # never sent: ignored
    h.revoke()
    assert not h.valid(10.28) and h.losses == 1


def test_grant_waits_and_closes() -> None:
    t = lease.timing(300, drift_ppm=0, guard_ms=100)
    g = lease.Grant(t)
    assert g.expired(0.0)  # nothing granted: nothing to wait for
    assert g.grant(5.0)
    assert not g.expired(5.299) and g.expired(5.3)
    g.close()
    assert not g.grant(6.0) and g.deadline() == pytest.approx(5.3)


@settings(max_examples=300, deadline=None)
@given(
    dead_ms=st.floats(60, 5000),
    drift_ppm=st.floats(0, 200_000),
    rate_h=st.floats(-1, 1),
    rate_g=st.floats(-1, 1),
    off_h=st.floats(-1e6, 1e6),
    off_g=st.floats(-1e6, 1e6),
    t_send=st.floats(0, 100),
    delay=st.floats(0, 10),
)
def test_property_holder_silent_before_take_over(
    dead_ms: float,
    drift_ppm: float,
    rate_h: float,
    rate_g: float,
    off_h: float,
    off_g: float,
    t_send: float,
    delay: float,
) -> None:
    """Real time t; each clock reads off + rate * t with rate within 1 -/+ rho. The holder's
    last instant of validity comes before the grantor's first instant of take-over, by at
    least the guard, whatever the offsets and the message delay."""
    t = lease.timing(dead_ms, drift_ppm, guard_ms=min(50.0, dead_ms / 2))
    rh, rg = 1 + rate_h * t.rho, 1 + rate_g * t.rho
    h, g = lease.Lease(t), lease.Grant(t)
    h.sent(0, off_h + rh * t_send)
    t_recv = t_send + delay
    g.grant(off_g + rg * t_recv)
    h.granted(0, off_h + rh * t_recv)
    # In real time: the holder stops when its clock reaches the expiry; the grantor may take
    # over when its clock reaches its deadline.
    stop_real = (h.expiry - off_h) / rh
    deadline = g.deadline()
    assert deadline is not None
    takeover_real = (deadline - off_g) / rg
    assert takeover_real - stop_real >= t.guard / (1 + t.rho) - 1e-6 * max(1.0, abs(off_g))


# -- 2. the engine's fence -------------------------------------------------------------------


def add_tunnel(engine: Engine, i: int, sg: str = "sg1") -> Tunnel:
    (o, n, s), _ = tunnel_sas(
        sg,
        spi_up=0x1000 + i,
        spi_down=0x2000 + i,
        mn_inner=f"10.1.0.{i + 1}",
        name=f"t{i}",
    )
    return engine.add_tunnel(SPDEntry(s, Action.PROTECT, name=f"t{i}", static=False), o, n)


def packet(i: int, n: int = 0) -> bytes:
    """A packet from the inner side for tunnel ``i`` (towards 10.1.0.i+1)."""
    p = bytearray(udp_packet(n, up=False))
    p[16:20] = ip(f"10.1.0.{i + 1}").packed
    # Fix the IPv4 header checksum after the destination change.
    p[10:12] = b"\0\0"
    s = sum(int.from_bytes(p[k : k + 2], "big") for k in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    p[10:12] = (~s & 0xFFFF).to_bytes(2, "big")
    return bytes(p)


def test_engine_holds_outside_the_lease_and_at_the_ceiling() -> None:
    eng = Engine(ip(SG_ADDR["sg1"]))
    t = add_tunnel(eng, 0)
    assert isinstance(eng.outbound(packet(0), 1.0), ToPeer)  # no fence by default
    eng.send_until = 2.0
    assert isinstance(eng.outbound(packet(0), 1.9), ToPeer)  # the flow cache path
    held = eng.outbound(packet(0), 2.0)
    assert isinstance(held, Held) and held.tunnel is t and not held.inbound
    assert eng.signal(t.outbound, b"x", 2.0) is Drop.FENCED
    eng.send_until = math.inf
    t.seq_ceiling = t.outbound.seq + 1
    assert isinstance(eng.outbound(packet(0), 3.0), ToPeer)
    assert isinstance(eng.outbound(packet(0), 3.0), Held)
    assert eng.signal(t.outbound, b"x", 3.0) is Drop.FENCED
    assert t.outbound.seq == t.seq_ceiling  # nothing beyond it was used
    assert eng.stats.drops["fenced"] == 2


@pytest.mark.parametrize(
    "native", [False, pytest.param(True, marks=native_only)], ids=["python", "native"]
)
def test_the_active_stops_at_the_lease_end_itself_not_at_the_next_tick(native: bool) -> None:
    """The lease's end is an absolute deadline the engine holds (``Engine.send_until``, set
    when a grant arrives) and checks on every packet, in Python and in C (the SA's deadline
    in the native table): the active stops at that instant. Nothing here runs the driver's
    timer (``Replicator.tick``), which only notices the loss afterwards and logs
    ``lease-lost``: the engine has no loss recorded and has stopped all the same."""
    if native and not native_mod.AVAILABLE:
        pytest.skip("the native data path is not built")
    a = Engine(ip(SG_ADDR["sg1"]), native=native)
    b = Engine(ip(SG_ADDR["sg2"]), native=native)
    t = add_tunnel(a, 0)
    cfg_a = failover.FailoverConfig("active", "sg2", dead_ms=300, guard_ms=50)
    cfg_b = failover.FailoverConfig("standby", "sg1", dead_ms=300, guard_ms=50)
    rep = failover.Replicator(a, cfg_a, session=7)
    sb = failover.Standby(b, cfg_b, Endpoint(ip(SG_ADDR["sg2"]), PORT), Identity.DIRECT)

    def exchange(sent: float, acked: float) -> None:
        msgs = rep.poll(sent)
        assert msgs
        for m in msgs:
            for r in sb.receive(m, sent):  # type: ignore[arg-type]
                rep.receive(r, acked)

    exchange(10.0, 10.01)
    end = a.send_until
    assert end == pytest.approx(10.0 + cfg_a.lease_timing().lease)
    for k in range(3):
        assert isinstance(a.outbound(packet(0, k), 10.1), ToPeer)
    c = t.outbound.native
    if native:
        assert c is not None and c.active  # C carries the flow, with the lease's end
        assert a.native.seal_flow(packet(0), math.nextafter(end, -math.inf)) is not None
        assert a.native.seal_flow(packet(0), end) is None  # C hands it up at the end itself
    before = math.nextafter(end, -math.inf)
    assert isinstance(a.outbound(packet(0), before), ToPeer)
    last = t.outbound.seq
    for now in (end, end + 1e-9, end + 0.03):
        held = a.outbound(packet(0), now)
        assert isinstance(held, Held) and held.tunnel is t
        assert a.signal(t.outbound, b"x", now) is Drop.FENCED
    assert t.outbound.seq == last  # not one number used at or after the end
    assert rep.lease is not None and rep.lease.losses == 0  # no tick noticed anything
    # A grant for a message sent before the end and acknowledged after it extends the lease
    # from that message's sending; C still holds the old end, hands the next packet up, and
    # the Python path sends it and gives C the new end.
    exchange(10.2, end + 0.05)
    assert a.send_until == pytest.approx(10.2 + cfg_a.lease_timing().lease)
    assert isinstance(a.outbound(packet(0), end + 0.06), ToPeer)
    if native:
        assert c is not None and c.active
        assert a.native.seal_flow(packet(0), end + 0.07) is not None  # C again, new end
        assert a.native.seal_flow(packet(0), a.send_until) is None
    assert isinstance(a.outbound(packet(0), a.send_until), Held)
    assert rep.lease.losses == 0


def test_replicator_fences_until_acknowledged_and_sets_ceilings() -> None:
    a, b = Engine(ip(SG_ADDR["sg1"])), Engine(ip(SG_ADDR["sg2"]))
    t = add_tunnel(a, 0)
    cfg_a = failover.FailoverConfig("active", "sg2", dead_ms=300, seq_margin=10, guard_ms=50)
    cfg_b = failover.FailoverConfig("standby", "sg1", dead_ms=300, seq_margin=10, guard_ms=50)
    rep = failover.Replicator(a, cfg_a, session=7)
    sb = failover.Standby(b, cfg_b, Endpoint(ip(SG_ADDR["sg2"]), PORT), Identity.DIRECT)
    assert isinstance(a.outbound(packet(0), 0.0), Held)  # fenced from the start
    msgs = rep.poll(0.0)
    assert t.seq_ceiling == 10  # replicated at 0: the standby would restart above 10
    replies = sb.receive(msgs[0], 0.01)  # type: ignore[arg-type]
    assert [failover.reply_kind(r) for r in replies] == [failover.SYNC_ACK]
    assert rep.receive(replies[0], 0.02) == [lease.LeaseEvent.GRANTED]
    seqs = []
    for _ in range(12):
        r = a.outbound(packet(0), 0.05)
        if isinstance(r, ToPeer):
            seqs.append(esp_seq(r.data)[1])
    assert seqs == list(range(1, 11))  # stopped at the ceiling
    for m in rep.poll(0.06):  # the tunnel changed: synced at 10, ceiling 20 once acked
        for reply in sb.receive(m, 0.07):  # type: ignore[arg-type]
            rep.receive(reply, 0.08)
    assert t.seq_ceiling == 20
    # The lease: 0.25 * 0.999 / 1.001 from the sending at 0.06.
    assert a.send_until == pytest.approx(0.06 + 0.25 * 0.999 / 1.001)
    assert rep.tick(0.4) == [lease.LeaseEvent.LOST]
    assert isinstance(a.outbound(packet(0), 0.4), Held)
    # The standby takes over 300 ms after its last grant (0.07), not before.
    assert not sb.dead(0.369)
    with pytest.raises(IpsecctError):
        sb.take_over(0.3)
    assert sb.dead(0.37)
    (nt,), _signals, _rec = sb.take_over(0.37)
    assert nt.outbound.seq == 20  # replicated 10 + margin: above all the active could send
    # The old active comes back: TAKEN; it never sends again.
    late = rep.poll(0.5)
    (taken,) = sb.receive(late[0], 0.5)  # type: ignore[arg-type]
    assert failover.reply_kind(taken) == failover.SYNC_TAKEN
    assert rep.receive(taken, 0.5) == [lease.LeaseEvent.SUPERSEDED]
    assert rep.superseded_by == 2 and a.send_until == -math.inf and rep.poll(0.6) == []


def test_standby_answers_a_stale_epoch_with_taken_and_never_acks_after_deciding() -> None:
    a, b = Engine(ip(SG_ADDR["sg1"])), Engine(ip(SG_ADDR["sg2"]))
    add_tunnel(a, 0)
    c = failover.FailoverConfig("standby", "sg1", dead_ms=300)
    sb = failover.Standby(b, c, Endpoint(ip(SG_ADDR["sg2"]), PORT), Identity.DIRECT)
    rep = failover.Replicator(a, failover.FailoverConfig("active", "sg2", dead_ms=300), session=1)
    assert len(sb.receive(rep.poll(0.0)[0], 0.0)) == 1  # type: ignore[arg-type]
    assert sb.grant is not None
    sb.grant.close()  # as take_over does first
    assert sb.receive(rep.poll(1.0)[0], 1.0) == []  # type: ignore[arg-type]


def test_sync_reply_fuzz_is_refused_cleanly() -> None:
    a = Engine(ip(SG_ADDR["sg1"]))
    rep = failover.Replicator(a, failover.FailoverConfig("active", "sg2"), session=1)
    for junk in (b"", b"\x00" * 3, b"\x05\x00\x00\x00\x00\x00\x00\x01"):
        bad = cxtp.CTD(
            ip("0.0.0.0"),
            0,
            cdbs=(cxtp.TransferTag(1, 0).encode(), failover.sync_cdb([], 1)[:4] + junk),
        )
        with pytest.raises(CxtpError):
            rep.receive(bad, 0.0)


# -- 3. the simulation -----------------------------------------------------------------------

DT = 0.005  # real seconds per step
DEAD_MS, HEARTBEAT_MS, GUARD_MS = 200.0, 20.0, 20.0
RHO_PPM = 50_000.0  # 5 %: far more than any real clock, to exercise the bound
MARGIN = 48
TUNNELS = 3


@dataclass
class SimNode:
    name: str
    rate: float
    offset: float
    engine: Engine
    replicator: failover.Replicator | None = None
    standby: failover.Standby | None = None
    alive: bool = True
    solo: bool = False  # took over: owns what it took, needs no lease

    def now(self, real: float) -> float:
        return self.offset + self.rate * real


@dataclass
class Sim:
    rng: random.Random
    margin: int = MARGIN
    real: float = 0.0
    nodes: dict[str, SimNode] = field(default_factory=dict)
    # In flight on the one connection: (arrival real time, order, src, dst, message bytes)
    flight: list[tuple[float, int, str, str, bytes]] = field(default_factory=list)
    last_arrival: dict[tuple[str, str], float] = field(default_factory=dict)
    connected: bool = True
    partitioned: bool = False
    max_delay: float = 0.01
    sent: dict[tuple[int, int], str] = field(default_factory=dict)  # (SPI, seq) -> sender
    reused: list[tuple[int, int, str, str]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def cfg(self, role: str, peer: str) -> failover.FailoverConfig:
        return failover.FailoverConfig(
            role,
            peer,
            sync_packets=8,
            sync_ms=30.0,
            heartbeat_ms=HEARTBEAT_MS,
            dead_ms=DEAD_MS,
            seq_margin=self.margin,
            tick_ms=DT * 1000,
            drift_ppm=RHO_PPM,
            guard_ms=GUARD_MS,
        )

    def setup(self, rate_a: float, rate_b: float) -> None:
        ea, eb = Engine(ip(SG_ADDR["sg1"])), Engine(ip(SG_ADDR["sg2"]))
        for i in range(TUNNELS):
            add_tunnel(ea, i)
        self.nodes["sg1"] = SimNode("sg1", rate_a, 1000.0, ea)
        self.nodes["sg2"] = SimNode("sg2", rate_b, -50.0, eb)
        self.nodes["sg1"].replicator = failover.Replicator(ea, self.cfg("active", "sg2"))
        self.nodes["sg2"].standby = self.new_standby(self.nodes["sg2"])

    def new_standby(self, n: SimNode) -> failover.Standby:
        peer = "sg2" if n.name == "sg1" else "sg1"
        return failover.Standby(
            n.engine,
            self.cfg("standby", peer),
            Endpoint(ip(SG_ADDR[n.name]), PORT),
            Identity.DIRECT,
        )

    def post(self, src: str, dst: str, msg: cxtp.Message) -> None:
        if not self.connected:
            return
        # One TLS connection: in order per direction, each message delayed at random.
        t = max(
            self.real + self.rng.uniform(0, self.max_delay), self.last_arrival.get((src, dst), 0)
        )
        self.last_arrival[(src, dst)] = t
        heapq.heappush(self.flight, (t, next(self.counter), src, dst, cxtp.encode(msg)))

    def break_connection(self) -> None:
        """A partition or a crash: what is in flight is lost; both ends see the loss."""
        self.flight.clear()
        self.last_arrival.clear()
        self.connected = False
        for n in self.nodes.values():
            if n.alive and n.replicator is not None:
                n.replicator.resync()

    def crash(self, name: str) -> None:
        n = self.nodes[name]
        n.alive = False
        self.break_connection()

    def restart(self, name: str) -> None:
        """Back as a standby without SAs or replica (they died with it), but with what the
        driver keeps on disk: the epoch, and whether it had taken over."""
        n = self.nodes[name]
        old = n.standby
        n.alive = True
        n.engine = Engine(ip(SG_ADDR[name]))
        n.replicator = None
        n.solo = False
        n.standby = self.new_standby(n)
        if old is not None:
            n.standby.epoch, n.standby.took_over = old.epoch, old.took_over

    def step(self, traffic: int) -> None:
        self.real += DT
        if (
            not self.connected
            and not self.partitioned
            and all(n.alive for n in self.nodes.values())
        ):
            self.connected = True  # reconnected
        while self.flight and self.flight[0][0] <= self.real:
            _, _, src, dst, data = heapq.heappop(self.flight)
            self.deliver(src, dst, cxtp.decode(data))
        for n in self.nodes.values():
            if not n.alive:
                continue
            now = n.now(self.real)
            peer = "sg2" if n.name == "sg1" else "sg1"
            if n.replicator is not None:
                for m in n.replicator.poll(now):
                    self.post(n.name, peer, m)
                n.replicator.tick(now)
            if n.standby is not None and n.standby.dead(now):
                _tunnels, signals, _rec = n.standby.take_over(now)
                n.solo = True
                for sa, payload in signals:
                    res = n.engine.signal(sa, payload, now)
                    if isinstance(res, ToPeer):
                        self.record(n.name, res.data)
            for t in list(n.engine.tunnels()):
                if t.state is not TunnelState.ACTIVE:
                    continue
                i = t.outbound.spi - 0x2000
                for k in range(self.rng.randint(0, traffic)):
                    r = n.engine.outbound(packet(i, k), now)
                    if isinstance(r, ToPeer):
                        self.record(n.name, r.data)

    def deliver(self, src: str, dst: str, msg: cxtp.Message) -> None:
        n = self.nodes[dst]
        if not n.alive:
            return
        now = n.now(self.real)
        if failover.reply_kind(msg) is not None:
            if n.replicator is None:
                return
            events = n.replicator.receive(msg, now)
            if lease.LeaseEvent.SUPERSEDED in events:
                # The driver's part: the taker owns them now; drop ours.
                for t in list(n.engine.tunnels()):
                    n.engine.remove_tunnel(t)
            return
        if n.standby is not None:
            assert isinstance(msg, cxtp.CTD)
            for r in n.standby.receive(msg, now):
                self.post(dst, src, r)

    def record(self, sender: str, data: bytes | bytearray) -> None:
        key = esp_seq(data)
        prev = self.sent.get(key)
        if prev is not None:
            self.reused.append((*key, prev, sender))
        self.sent[key] = sender

    def owners(self) -> dict[int, list[str]]:
        """SPI -> the gateways that may send on it now (tunnel active and not fenced by
        time)."""
        out: dict[int, list[str]] = {}
        for n in self.nodes.values():
            if not n.alive:
                continue
            now = n.now(self.real)
            for t in n.engine.tunnels():
                if t.state is TunnelState.ACTIVE and now < n.engine.send_until:
                    out.setdefault(t.outbound.spi, []).append(n.name)
        return out


phase = st.tuples(
    st.integers(1, 80),  # steps
    st.sampled_from(["ok", "ok", "partition", "crash-sg1", "crash-sg2"]),
    st.floats(0, 0.3),  # max message delay (s): beyond the lease at times
    st.integers(0, 12),  # packets per tunnel per step, at most
)


@settings(
    max_examples=int(os.environ.get("IPSECCT_SIM_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    phases=st.lists(phase, min_size=1, max_size=8),
    rate_a=st.floats(-1, 1),
    rate_b=st.floats(-1, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_partitions_never_reuse_a_nonce(
    phases: list[tuple[int, str, float, int]], rate_a: float, rate_b: float, seed: int
) -> None:
    """Random phases of normal running, partitions (the connection cut while both stay up,
    at any moment, syncs and acknowledgements in flight lost), and one crash (the gateway
    comes back empty after the run); message delays up to 300 ms (beyond the lease);
    clock rates anywhere within the 5 % bound; traffic fast enough to spend the sequence
    margin within one lease. Then: no (SPI, seq) pair was ever sent twice, and after healing
    every tunnel has exactly one gateway that may send on it."""
    rho = RHO_PPM / 1e6
    sim = Sim(random.Random(seed))
    sim.setup(1 + rate_a * rho, 1 + rate_b * rho)
    for _ in range(10):  # the tunnels are replicated once (a crash before loses them)
        sim.step(1)
    crashed: str | None = None
    state_lost = False  # the one gateway holding the tunnels' state crashed
    for steps, kind, delay, traffic in phases:
        sim.max_delay = delay
        if kind == "partition" and not sim.partitioned:
            sim.partitioned = True
            sim.break_connection()
        elif kind.startswith("crash") and crashed is None:
            crashed = kind.split("-")[1]
            state_lost = sim.nodes[crashed].solo
            sim.crash(crashed)
        elif kind == "ok":
            sim.partitioned = False
        for _ in range(steps):
            sim.step(traffic)
        assert not sim.reused, sim.reused[:5]
    # Heal: the network comes back, a crashed gateway restarts (empty), time passes.
    sim.partitioned = False
    sim.max_delay = 0.01
    if crashed is not None:
        sim.restart(crashed)
    for _ in range(int(3 * DEAD_MS / 1000 / DT)):
        sim.step(2)
    assert not sim.reused, sim.reused[:5]
    owners = sim.owners()
    assert all(len(v) == 1 for v in owners.values()), owners
    if not state_lost:  # else the tunnels are gone: availability lost, never a nonce
        assert set(owners) == {0x2000 + i for i in range(TUNNELS)}, owners


def test_simulation_restarted_taker_does_not_hand_the_lease_back() -> None:
    """The standby takes over during a partition, then crashes and restarts before the old
    active heard of it: it remembers its epoch (kept on disk), answers TAKEN, and the old
    active, although its lease could be renewed by a fresh standby, never sends again."""
    sim = Sim(random.Random(2))
    sim.setup(1.0, 1.0)
    for _ in range(20):
        sim.step(4)
    sim.partitioned = True
    sim.break_connection()
    for _ in range(int(1.5 * DEAD_MS / 1000 / DT)):
        sim.step(4)
    assert sim.nodes["sg2"].solo
    sim.crash("sg2")
    sim.restart("sg2")
    sim.partitioned = False
    for _ in range(int(2 * DEAD_MS / 1000 / DT)):
        sim.step(4)
    assert not sim.reused
    a = sim.nodes["sg1"]
    assert a.replicator is not None and a.replicator.superseded_by == 2
    assert sim.owners() == {}  # the taker's SAs died with it: nobody sends, nobody reuses


def test_simulation_exercises_the_worst_moment() -> None:
    """One hand-picked run: the partition falls right after the active's sync left and
    before its acknowledgement came back, with traffic spending the margin within the lease:
    the active stops at its ceiling, then at its lease; the standby takes over above."""
    rho = RHO_PPM / 1e6
    sim = Sim(random.Random(1))
    sim.setup(1 - rho, 1 + rho)  # the active's clock slow, the standby's fast: worst case
    sim.max_delay = 0.004
    for _ in range(40):
        sim.step(3)
    assert sim.owners() == {0x2000 + i: ["sg1"] for i in range(TUNNELS)}
    # Cut with syncs and acknowledgements in flight.
    sim.max_delay = 0.05
    for _ in range(2):
        sim.step(12)
    assert sim.flight
    sim.partitioned = True
    sim.break_connection()
    held_before = sim.nodes["sg1"].engine.stats.out_packets
    for _ in range(int(2 * DEAD_MS / 1000 / DT)):
        sim.step(12)
    a, b = sim.nodes["sg1"], sim.nodes["sg2"]
    assert not a.engine.send_until > a.now(sim.real)  # the isolated active stopped
    assert b.solo and b.standby is not None and b.standby.took_over is not None
    assert a.engine.stats.out_packets > held_before
    sim.partitioned = False
    for _ in range(int(DEAD_MS / 1000 / DT)):
        sim.step(3)
    assert not sim.reused
    assert a.replicator is not None and a.replicator.superseded_by == 2
    assert sim.owners() == {0x2000 + i: ["sg2"] for i in range(TUNNELS)}


def test_simulation_the_ceiling_alone_keeps_the_numbers_apart_if_the_lease_fails() -> None:
    """What the standby's margin rests on: not the lease. An active whose time fence fails
    altogether (its lease taken away after the first grant and ``send_until`` left open: a
    frozen clock, a packet sent late, a bug) goes on sending through a partition while the
    standby takes over; both send on the same SAs at once, and still no (SPI, sequence
    number) pair is sent twice: the active stops at its ceilings (the lowest value the
    standby may hold, plus the margin), the taker starts above them. The lease keeps the two
    from sending *at the same time*; the ceilings keep the nonces apart."""
    sim = Sim(random.Random(3))
    sim.setup(1.0, 1.0)
    for _ in range(20):
        sim.step(4)
    a, b = sim.nodes["sg1"], sim.nodes["sg2"]
    assert a.replicator is not None and a.replicator.acks > 0
    a.replicator.lease = None  # the time fence fails: ACKs still raise the floors
    a.engine.send_until = math.inf
    sim.partitioned = True
    sim.break_connection()
    while not b.solo:  # slow traffic: the active has numbers left when the standby takes over
        sim.step(1)
    taken_at = a.engine.stats.out_packets
    for _ in range(20):
        sim.step(12)
    assert a.engine.stats.out_packets > taken_at  # both sent, at the same time
    assert not sim.reused, sim.reused[:5]
    both = {key for key, who in sim.sent.items() if who == "sg2"}
    assert both
    ceilings = {t.outbound.spi: t.seq_ceiling for t in a.engine.tunnels()}
    assert all(t.outbound.seq == ceilings[t.outbound.spi] for t in a.engine.tunnels())
    assert all(seq > ceilings[spi] for spi, seq in both)


# -- 4. take-over speed: replicas decoded ahead ------------------------------------------------


def test_prepared_replicas_are_used_only_while_current() -> None:
    a, b = Engine(ip(SG_ADDR["sg1"])), Engine(ip(SG_ADDR["sg2"]))
    t0, t1 = add_tunnel(a, 0), add_tunnel(a, 1)
    rep = failover.Replicator(a, failover.FailoverConfig("active", "sg2", fencing=False))
    sb = failover.Standby(
        b,
        failover.FailoverConfig("standby", "sg1", fencing=False, seq_margin=100),
        Endpoint(ip(SG_ADDR["sg2"]), PORT),
        Identity.DIRECT,
    )
    for m in rep.poll(0.0):
        sb.receive(m, 0.0)  # type: ignore[arg-type]
    assert sb.prepare(1) == 1 and sb.prepared == 1
    assert sb.prepare(10) == 1 and sb.prepared == 2
    # Tunnel 1 changes: its prepared SAs are stale and must not be used.
    t1.outbound.seq = 50
    rep.resync()
    for m in rep.poll(1.0):
        sb.receive(m, 1.0)  # type: ignore[arg-type]
    assert sb.prepared == 0  # FULL replaced everything
    assert sb.prepare(1) == 1
    tunnels, _signals, _rec = sb.take_over(2.0)
    seqs = sorted(t.outbound.seq for t in tunnels)
    assert seqs == [t0.outbound.seq + 100, 50 + 100]
    assert sb.prepare(10) == 0  # nothing left


def test_bench_failover_json_schema() -> None:
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", "bench", "failover", "--json", "--tunnels", "40"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [x["mode"] for x in doc["results"]] == ["pair", "etcd"]
    for x in doc["results"]:
        assert {"mode", "tunnels", "takeover_ms", "lost", "replay_drops", "reused_nonces"} <= set(x)
        assert x["tunnels"] == 40 and x["takeover_ms"] > 0
        assert x["lost"] == 0 and x["replay_drops"] == 0 and x["reused_nonces"] == 0


def test_prometheus_text_has_the_lease() -> None:
    from ipsecct.gateway.control import prometheus_text

    base: dict[str, object] = {
        "name": "sg1",
        "counters": {
            "out_packets": 0,
            "in_packets": 0,
            "out_bytes": 0,
            "in_bytes": 0,
            "drops": {"fenced": 3},
        },
        "sas": 2,
        "uptime_s": 1.0,
    }
    pair = prometheus_text(
        {
            **base,
            "failover": {"lease": {"state": "lost", "epoch": 1, "losses": 2, "remaining_ms": 0}},
        }
    )
    assert 'ipsecct_failover_lease_valid{node="sg1",state="lost"} 0' in pair
    assert 'ipsecct_failover_lease_losses_total{node="sg1"} 2' in pair
    assert 'ipsecct_drops_total{node="sg1",reason="fenced"} 3' in pair
    etcd = prometheus_text(
        {
            **base,
            "cluster": {
                "lease": {"state": "held", "losses": 0},
                "owned_tunnels": 5,
                "groups": 32,
                "taken_over": 4,
                "orphaned": {"groups": 2, "tunnels": 7, "here": 0},
            },
        }
    )
    assert 'ipsecct_cluster_lease_valid{node="sg1"} 1' in etcd
    assert 'ipsecct_cluster_owned_tunnels{node="sg1"} 5' in etcd
    assert 'ipsecct_cluster_groups{node="sg1"} 32' in etcd
    assert 'ipsecct_cluster_taken_over_total{node="sg1"} 4' in etcd
    assert 'ipsecct_cluster_orphaned_tunnels{node="sg1"} 7' in etcd
    assert 'ipsecct_cluster_orphaned_groups{node="sg1"} 2' in etcd

"""The etcd mode against what a buggy or hostile member (or a corrupted etcd) writes under the
cluster's prefix, and against what a hostile peer member replicates (issue: untrusted input in
clusters and fail-over). A real etcd, a real driver (``gateway/cluster_driver.py``) in this
process: whatever the values, the driver never dies with a traceback, still joins and owns its
tunnel, and tells the operator (``event=cluster-etcd-malformed``, ``status()["malformed"]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from ipsecct.ct import cxtp, failover, ownership
from ipsecct.ct.transfer import Identity
from ipsecct.errors import CxtpError
from ipsecct.gateway.cluster_driver import ClusterDriver
from ipsecct.gateway.config import ClusterConfig, from_dict
from ipsecct.gateway.etcd import EtcdClient
from ipsecct.gateway.node import Node
from ipsecct.ipsec import spi as spimod
from ipsecct.ipsec.engine import Engine, Tunnel
from ipsecct.ipsec.ippacket import Endpoint
from ipsecct.ipsec.spd import Action, SPDEntry
from tests.helpers.cluster_standins import Transfer
from tests.helpers.config_files import failover_sg1
from tests.helpers.etcd_server import EtcdCluster
from tests.helpers.transfer import SG_ADDR, ip, tunnel_sas, udp_packet
from tests.helpers.waiting import eventually

# What a hostile member (or a corrupted etcd) leaves under /ipsecct/default/: member keys that
# JSON accepts but that make no sense (Infinity is valid for Python's json), and an SPI block
# claimed with bytes that are not UTF-8.
HOSTILE = {
    "members/inf": b'{"address": "x", "lease": Infinity, "groups": 8}',
    "members/big": b'{"address": "x", "lease": "%d", "groups": 8}' % (1 << 80),
    "members/float": b'{"address": "x", "lease": 1.5, "groups": 8}',
    "members/junk": b"\xff\xfe{",
    "spi-blocks/0": b"\xff\xfe",
}


@pytest.mark.parametrize("value", [*(v for k, v in HOSTILE.items() if "members" in k),
                                   b"[" * 100000, b'{"lease": "\xd9\xa5"}', b'{"lease": -5}',
                                   b'{"lease": "-5"}', b'{"lease": "9223372036854775808"}'])
def test_a_member_value_that_makes_no_sense_names_no_lease(value: bytes) -> None:
    assert ownership.parse_member(value)[1] == 0  # (Infinity: OverflowError before)


def test_a_member_value_as_members_write_it() -> None:
    info = ownership.member_info("10.0.0.1:4500", (1 << 63) - 1, 8)
    assert ownership.parse_member(info.encode()) == ("10.0.0.1:4500", (1 << 63) - 1, 8)


def test_hostile_member_keys_neither_stop_nor_fool_the_driver(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Such keys, present before the member joins: it joins (into another SPI block), owns its
    tunnel, its loop lives on through many scans of the member list, and the operator is
    told of each malformed key. (Before: a lease of Infinity raised OverflowError in
    parse_member and a non-UTF-8 block claim UnicodeDecodeError in _claim_block, both out of
    the driver's loop: it stopped for good, silently, and the gateway never joined again.)"""
    from ipsecct.gateway.cluster_driver import ClusterDriver
    from ipsecct.gateway.config import load
    from ipsecct.gateway.node import Node

    cfg_path = failover_sg1(tmp_path)

    async def run(endpoints: list[str]) -> None:
        c = EtcdClient(endpoints, timeout=5.0)
        base = ownership.keys("default")["members"].rsplit("members/", 1)[0]
        for k, v in HOSTILE.items():
            await c.put(base + k, v)
        node = Node(load(cfg_path))
        [t] = node.engine.tunnels()
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=4, groups=4))
        drv.transfer = None
        await drv.start()
        try:
            task = drv._task
            assert task is not None

            def alive() -> bool:
                if task.done():
                    raise AssertionError(f"the driver's loop died: {task.exception()!r}")
                return True

            await eventually(lambda: alive() and drv.own.owns(t.outbound.spi), "owning")
            assert drv.block != spimod.block(0, drv.cfg.spi_blocks)  # the junk's claim
            # (each look at the member list counts the four bad member keys: three looks)
            await eventually(lambda: alive() and drv.malformed >= 1 + 3 * 4, "three scans")
            st = drv.status()
            assert st["malformed"] >= 13 and st["lease"]["state"] == "held", st
            assert drv.own.owns(t.outbound.spi) and t.seq_ceiling > t.outbound.seq
        finally:
            await drv.stop()

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
    lines = [r.getMessage() for r in caplog.records]
    assert any("event=cluster-etcd-malformed" in m and "members/inf" in m for m in lines), lines


def test_a_peers_member_key_overwritten_with_junk_keeps_its_floors(tmp_path: Path) -> None:
    """Guards the invariant. sg1 replicates its tunnel to sg2 (a member: its key under its
    lease); the tunnel's sequence numbers are bounded by what sg2 holds (its floor). A buggy
    or hostile writer then overwrites sg2's member key with junk, without a lease. sg2's lease
    lives on, and with it the replica sg2 could take the tunnel over from: the floor must stay
    (before: the key's lease read as 0, taken for "sg2's lease is gone", the floor was dropped
    and sg1 could send past what sg2 would restart from). The operator is told."""
    from ipsecct.ct.transfer import Identity
    from ipsecct.gateway.cluster_driver import ClusterDriver
    from ipsecct.gateway.config import load
    from ipsecct.gateway.node import Node
    from tests.helpers.cluster_standins import Channels

    cfg_path = failover_sg1(tmp_path)

    async def run(endpoints: list[str]) -> None:
        c = EtcdClient(endpoints, timeout=5.0)
        lid, _ = await c.grant(60)  # sg2, alive throughout
        key = ownership.keys("default")["members"] + "sg2"
        await c.put(key, ownership.member_info("127.0.0.1:1", lid, 8), lease=lid)
        node = Node(load(cfg_path))
        [t] = node.engine.tunnels()
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=4, groups=4))
        ch = Channels()
        drv.attach(ch, Transfer(), Identity.DIRECT, ["sg2"])  # type: ignore[arg-type]
        drv.transfer = None
        rep = drv.replicators["sg2"]
        await drv.start()
        try:
            await eventually(
                lambda: drv.own.owns(t.outbound.spi) and t in rep.floor and ch.sent,
                "the tunnel owned, replicated to sg2 and bounded by its floor",
            )
            assert rep.target_lease == lid
            ceiling = t.seq_ceiling
            assert ceiling == rep.floor[t] + drv.margin
            await c.put(key, b"\xffjunk")  # no lease: etcd detaches sg2's from the key
            n = drv.malformed
            await eventually(lambda: drv.malformed >= n + 2, "two looks at the member list")
            assert drv.floors_dropped == 0 and t in rep.floor, drv.status()
            assert t.seq_ceiling == ceiling and rep.target_lease == lid
            # sg2 writes its key again (as it is): nothing changed for sg1
            await c.put(key, ownership.member_info("127.0.0.1:1", lid, 8), lease=lid)
            n = drv.client.calls
            await eventually(lambda: drv.client.calls >= n + 4, "more rounds")
            assert drv.floors_dropped == 0 and t.seq_ceiling == ceiling
            # sg2's lease ends for real: now the floor goes (sg2 can never use its replica)
            await c.revoke(lid)
            await eventually(lambda: drv.floors_dropped == 1, "the floor dropped")
            assert t not in rep.floor
        finally:
            await drv.stop()

    with EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))


# -- replicas from a buggy or hostile active (the sans-I/O standby, ct/failover.py) ----------


def _pair() -> tuple[Tunnel, failover.Replicator, failover.Standby]:
    """An active engine with one tunnel and its Replicator; a Standby on another engine."""
    act = Engine(ip(SG_ADDR["sg1"]))
    (o, n, s), _ = tunnel_sas("sg1", spi_up=0x1001, spi_down=0x2001, name="t1")
    t = act.add_tunnel(SPDEntry(s, Action.PROTECT, name="t1", static=False), o, n)
    c = failover.FailoverConfig("active", "sg2", seq_margin=1000, fencing=False, sync_packets=1)
    rep = failover.Replicator(act, c, session=9)
    sb = failover.Standby(Engine(ip(SG_ADDR["sg2"])), replace(c, role="standby", peer="sg1"),
                          Endpoint(ip(SG_ADDR["sg2"]), 4600), Identity.DIRECT)  # fmt: skip
    return t, rep, sb


def _wire(msgs: list[cxtp.Message]) -> list[cxtp.CTD]:
    out = [cxtp.decode(cxtp.encode(m)) for m in msgs]
    assert all(isinstance(m, cxtp.CTD) for m in out)
    return cast(list[cxtp.CTD], out)


def test_a_replica_going_backwards_never_lowers_the_take_over() -> None:
    """Guards the invariant. The active replicates its tunnel at 5000 packets sent, then (a
    bug, or hostile) sends the state of 3000 again. What it sent up to 5000 + the margin is
    bounded by the first: the standby takes over past it (before: from 3000 + margin, and
    the numbers 4001-6000 went out twice under one key). The standby counts it."""
    t, rep, sb = _pair()
    t.outbound.seq = 3000
    old = _wire(rep.poll(0.0))
    for m in old:
        sb.receive(m, 0.0)
    t.outbound.seq = 4999
    res = rep.engine.outbound(udp_packet(0, up=False), 0.5)  # packet 5000
    assert type(res).__name__ == "ToPeer" and t.outbound.seq == 5000, res
    for m in _wire(rep.poll(1.0)):
        sb.receive(m, 1.0)
    for m in old:  # the older state again
        sb.receive(m, 2.0)
    assert sb.seq_backwards == 1
    [taken], _, _ = sb.take_over(3.0)
    assert taken.outbound.seq >= 5000 + 1000, taken.outbound.seq


def test_a_replica_at_the_last_sequence_number_sends_nothing_after_a_take_over() -> None:
    """Already fine: a replica at 2**64 - 1 (ESN) is taken over at its limit: the tunnel
    sends nothing (no number left), it does not wrap to 0."""
    t, rep, sb = _pair()
    t.outbound.seq = (1 << 64) - 1
    for m in _wire(rep.poll(0.0)):
        sb.receive(m, 0.0)
    [taken], _, _ = sb.take_over(1.0)
    assert taken.outbound.seq == (1 << 64) - 1 == taken.outbound.seq_limit
    res = sb.engine.outbound(udp_packet(0, up=False), 1.0)
    assert type(res).__name__ != "ToPeer", res


def test_a_flood_of_replicas_is_bounded_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that replicates more tunnels than a standby keeps (``max_replicas``; here 3 of
    its 5): the others are not kept, and counted; what is kept still follows the peer, a
    removal makes room; the driver tells the operator. A tunnel replicated over and over
    before the standby decoded it ahead (``prepare``) is queued once, not once per message
    (before: one entry per message, without bound under a busy peer)."""
    from ipsecct.gateway.failover_driver import tell_trouble, trouble

    act = Engine(ip(SG_ADDR["sg1"]))
    ts = []
    for i in range(5):
        (o, n, s), _ = tunnel_sas("sg1", spi_up=0x1001 + i, spi_down=0x2001 + i,
                                  mn_inner=f"10.1.0.{i + 2}", name=f"t{i}")  # fmt: skip
        ts.append(act.add_tunnel(SPDEntry(s, Action.PROTECT, name=f"t{i}", static=False), o, n))
    c = failover.FailoverConfig("active", "sg2", seq_margin=1000, fencing=False, sync_packets=1)
    rep = failover.Replicator(act, c, session=9)
    sb = failover.Standby(Engine(ip(SG_ADDR["sg2"])), replace(c, role="standby", peer="sg1"),
                          Endpoint(ip(SG_ADDR["sg2"]), 4600), Identity.DIRECT,
                          max_replicas=3)  # fmt: skip
    before = trouble(sb)
    for m in _wire(rep.poll(0.0)):
        sb.receive(m, 0.0)
    assert len(sb.replica) == 3 and sb.replicas_refused == 2
    with caplog.at_level(logging.WARNING, logger="ipsecct"):
        tell_trouble("sg2", "sg1", sb, before)
    assert any("event=sync-replicas-refused" in r.getMessage() for r in caplog.records)
    t = ts[0]  # (to 10.1.0.2: udp_packet's)
    kept = t.outbound.spi
    assert kept in sb.replica
    for k in range(200):  # the kept tunnel busy: replicated at every poll
        act.outbound(udp_packet(k, up=False), 1.0 + k / 100)
        for m in _wire(rep.poll(1.0 + k / 100)):
            sb.receive(m, 1.0 + k / 100)
    assert failover_seq(sb.replica[kept][0]) == t.outbound.seq == 200
    assert len(sb._dirty) <= 3, len(sb._dirty)  # queued once each
    act.remove_tunnel(t)
    for m in _wire(rep.poll(5.0)):
        sb.receive(m, 5.0)
    assert kept not in sb.replica and len(sb.replica) == 2
    (o, n, s), _ = tunnel_sas("sg1", spi_up=0x1100, spi_down=0x2100, name="new")
    act.add_tunnel(SPDEntry(s, Action.PROTECT, name="new", static=False), o, n)
    for m in _wire(rep.poll(6.0)):
        sb.receive(m, 6.0)
    assert 0x2100 in sb.replica and sb.replicas_refused == 2  # the room was taken


def _member_node(tmp_path: Path, n: str, port: int, i: int) -> Node:
    """Member ``n`` of a cluster test on loopback: its outer port ``port + i``, its inner
    one ``port + 10 + i``, the inner peer at ``port + 20``; sg1 with six tunnels t0..t5
    (inbound SPIs 0x1000 + k, outbound 0x2000 + k, MNs 10.1.0.2..7)."""
    cfg = from_dict({"name": n, "outer": {"address": "127.0.0.1", "port": port + i},
                     "inner": {"kind": "udp", "listen": f"127.0.0.1:{port + 10 + i}",
                               "peer": f"127.0.0.1:{port + 20}"}},
                    str(tmp_path / f"{n}.toml"))  # fmt: skip
    node = Node(cfg)
    if n == "sg1":
        for k in range(6):
            (o, inb, s), _ = tunnel_sas("sg1", spi_up=0x1000 + k, spi_down=0x2000 + k,
                                        mn_inner=f"10.1.0.{k + 2}", name=f"t{k}")
            node.engine.add_tunnel(SPDEntry(s, Action.PROTECT, name=f"t{k}", static=False),
                                   o, inb)  # fmt: skip
    return node


def failover_seq(cdb: bytes) -> int:
    from ipsecct.ct import context

    return context.decode(cdb, 0.0).seq


# -- etcd slow or unavailable during a take-over ------------------------------------------------


@pytest.mark.parametrize("how", ["lost", "paused"])
def test_a_take_over_whose_answer_etcd_lost_is_completed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """sg1 and sg2 on a real etcd, sg2 holding replicas of sg1's six tunnels. sg1 stops; sg2
    creates the owner keys of sg1's groups, and etcd commits that, but the answer never
    reaches sg2 (``lost``: a timeout after the commit, made here). The groups are sg2's now
    (under its lease): nobody else can take them. sg2 must find them its own at its next
    look and install their tunnels from its replicas (before: it took the groups for someone
    else's, dropped its replicas, and the tunnels were gone, silently). ``paused``: etcd is
    stopped (SIGSTOP) as sg2 sends that transaction, and resumed 1.5 s later (past sg2's
    timeout: the operator is told): whether etcd applied it or not, sg2 ends owning the six
    tunnels, and took none while etcd was away."""
    from ipsecct.ct.ownership import Txn
    from ipsecct.errors import EtcdError
    from ipsecct.gateway.cluster_driver import ClusterDriver

    names = ("sg1", "sg2")

    class LosingClient(EtcdClient):
        """etcd applies the first take-over transaction; its answer is lost."""

        armed = False
        lost = 0
        paused_taken = -1
        taken: Callable[[], int] = staticmethod(lambda: -1)

        async def txn(self, t: Txn) -> bool:
            adopt = any(c.target == "CREATE" and "/groups/" in c.key for c in t.compare)
            if how == "paused" and self.armed and adopt and not self.lost:
                self.lost += 1
                e.pause("e0")
                asyncio.get_running_loop().call_later(1.5, e.resume, "e0")
                self.paused_taken = self.taken()
            ok = await super().txn(t)
            if how == "lost" and self.armed and adopt and ok and not self.lost:
                self.lost += 1
                raise EtcdError("etcd unreachable (127.0.0.1: TimeoutError)")
            return ok

    async def run(endpoints: list[str]) -> None:
        drivers: dict[str, ClusterDriver] = {}
        alive = set(names)

        for i, n in enumerate(names):
            node = _member_node(tmp_path, n, 45100, i)
            drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=2, groups=4))
            if n == "sg2":
                drv.client = LosingClient(list(endpoints), timeout=drv.client.timeout)
            drv.attach(_Wire(n, alive, drivers), Transfer(), Identity.DIRECT,  # type: ignore[arg-type]
                       [p for p in names if p != n])
            drv.transfer = None
            drivers[n] = drv
        for drv in drivers.values():
            await drv.start()
        sg2 = drivers["sg2"]
        client = cast(LosingClient, sg2.client)
        client.taken = lambda: sg2.taken

        def owned(n: str) -> int:
            d = drivers[n]
            return len(d.own.owned() & {t.outbound.spi for t in d.node.engine.tunnels()})

        try:
            await eventually(lambda: owned("sg1") == 6, "sg1 to own its six tunnels", 20)
            await eventually(lambda: len(sg2.standbys["sg1"].replica) == 6, "the replicas", 20)
            client.armed = True
            alive.discard("sg1")
            await drivers["sg1"].stop()  # (its lease revoked: its groups' owner keys go)
            await eventually(lambda: client.lost == 1, "the take-over's lost answer", 20)
            await eventually(lambda: owned("sg2") == 6, "sg2 to own sg1's tunnels", 20)
            assert sg2.taken == 6
            assert how == "lost" or client.paused_taken == 0
        finally:
            for drv in drivers.values():
                await drv.stop()

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
    lines = [r.getMessage() for r in caplog.records]
    if how == "lost":
        assert any("event=cluster-adopt-answer-lost" in m for m in lines), lines
    else:  # etcd did not answer: sg2 said so
        assert any("event=cluster-etcd-error node=sg2" in m for m in lines), lines


# -- what answers at an etcd endpoint (a corrupted etcd, or not etcd at all) ------------------

BAD_ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}",  # ValueError before
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}",  # ValueError
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",  # cut short: IncompleteReadError
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n{}",  # a line past the reader's limit
    b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n" + b"[" * 20000,  # RecursionError
    b"HTTP/1.1 200 OK\r\n\r\n" + b"[" * 20000,  # the same, read to the end
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\xff\xfe",  # not UTF-8
]


@pytest.mark.parametrize("answer", BAD_ANSWERS, ids=range(len(BAD_ANSWERS)))
def test_a_malformed_answer_at_an_etcd_endpoint_is_an_etcd_error(answer: bytes) -> None:
    """Whatever answers at an etcd endpoint: an EtcdError (the driver's loop goes on and
    tries again), never another exception out of the client (which ended the loop)."""
    from ipsecct.errors import EtcdError

    async def run() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read(4096)
            w.write(answer)
            await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(EtcdError):
                await EtcdClient([f"http://127.0.0.1:{port}"], timeout=5.0).grant(5)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(run())


def test_a_take_over_installs_only_tunnels_inside_what_the_standby_accepts() -> None:
    """A hostile or misconfigured active replicates a tunnel whose selectors lie outside what
    the standby's operator lets peers hand over ([transfer] accept_local_ts / accept_remote_ts,
    as a transfer's target checks them): a take-over does not install it (before: installed
    first in the SPD, whatever traffic it claimed); the others are, and it is counted."""
    from ipsecct.ipsec.spd import AddressRange, RangeSet

    act = Engine(ip(SG_ADDR["sg1"]))
    for i, local in enumerate(("10.2.0.0/24", "0.0.0.0/0")):
        (o, n, s), _ = tunnel_sas("sg1", spi_up=0x1001 + i, spi_down=0x2001 + i, local=local,
                                  mn_inner=f"10.1.0.{i + 2}", name=f"t{i}")  # fmt: skip
        act.add_tunnel(SPDEntry(s, Action.PROTECT, name=f"t{i}", static=False), o, n)
    c = failover.FailoverConfig("active", "sg2", seq_margin=1000, fencing=False)
    rep = failover.Replicator(act, c, session=9)
    sb = failover.Standby(Engine(ip(SG_ADDR["sg2"])), replace(c, role="standby", peer="sg1"),
                          Endpoint(ip(SG_ADDR["sg2"]), 4600), Identity.DIRECT)  # fmt: skip
    sb.accept = (RangeSet([AddressRange.parse("10.2.0.0/24")]),
                 RangeSet([AddressRange.parse("10.1.0.0/16")]))  # fmt: skip
    for m in _wire(rep.poll(0.0)):
        sb.receive(m, 0.0)
    assert len(sb.replica) == 2  # kept: the check is the take-over's (as the transfer's)
    tunnels, _, rec = sb.take_over(1.0)
    assert [t.outbound.spi for t in tunnels] == [0x2001]
    assert [t.outbound.spi for t in sb.engine.tunnels()] == [0x2001]
    assert sb.policy_refused == 1 and "outside" in rec.detail, rec.detail


@pytest.mark.parametrize("why", ["outside", "bound"])
def test_a_tunnel_the_standby_would_not_take_over_is_told_to_the_active_which_still_serves_it(
    why: str,
) -> None:
    """Guards the invariant. A tunnel replica the standby would not take over (its selectors
    outside the standby's accept ranges; or one more than its max_replicas) was still
    acknowledged and nothing told the active: its operator believed the tunnel protected.
    Now the standby tells it (SYNC_TUNNEL_REFUSED, once per change, beside its ACK): the
    active lists it (``tunnels_refused``) and hears it (``on_tunnel_refused``), forgets it
    when the tunnel goes, and keeps forwarding on it; the ACK raises its ceiling as before,
    which is safe: the standby never sends on a tunnel it would not take over. After the
    take-over, no (SPI, sequence number) pair of the active's was sent twice."""
    from ipsecct.ipsec.engine import ToPeer
    from ipsecct.ipsec.spd import AddressRange, RangeSet
    from tests.helpers.transfer import esp_seq

    act = Engine(ip(SG_ADDR["sg1"]))
    local = "0.0.0.0/0" if why == "outside" else "10.2.0.0/24"
    for i, loc in enumerate(("10.2.0.0/24", local)):
        (o, n, s), _ = tunnel_sas("sg1", spi_up=0x1001 + i, spi_down=0x2001 + i, local=loc,
                                  mn_inner=f"10.1.0.{i + 2}", name=f"t{i}")  # fmt: skip
        act.add_tunnel(SPDEntry(s, Action.PROTECT, name=f"t{i}", static=False), o, n)
    c = failover.FailoverConfig("active", "sg2", seq_margin=100, fencing=True)
    rep = failover.Replicator(act, c, session=9)
    heard: list[tuple[int, str]] = []
    rep.on_tunnel_refused = lambda spi, why_: heard.append((spi, why_))
    sb = failover.Standby(Engine(ip(SG_ADDR["sg2"])), replace(c, role="standby", peer="sg1"),
                          Endpoint(ip(SG_ADDR["sg2"]), 4600), Identity.DIRECT)  # fmt: skip
    sb.accept = (RangeSet([AddressRange.parse("10.2.0.0/24")]),
                 RangeSet([AddressRange.parse("10.1.0.0/16")]))  # fmt: skip
    if why == "bound":
        sb.max_replicas = 1
    wire_out: list[tuple[int, int]] = []

    def sync(now: float) -> None:
        for m in _wire(rep.poll(now)):
            for r in _wire(list[cxtp.Message](sb.receive(m, now))):
                assert failover.reply_kind(r) in (failover.SYNC_ACK,
                                                  failover.SYNC_TUNNEL_REFUSED)  # fmt: skip
                rep.receive(r, now)
        sb.prepare(100)

    def send(n: int, now: float) -> None:  # host -> both MNs through the active
        for _ in range(n):
            for i in range(2):
                pkt = udp_packet(0, up=False)
                pkt = pkt[:16] + ip(f"10.1.0.{i + 2}").packed + pkt[20:]
                res = act.outbound(pkt, now)
                if isinstance(res, ToPeer):
                    wire_out.append(esp_seq(res.data))

    t = 0.0
    for _ in range(4):  # (a sync each heartbeat_ms)
        sync(t)
        send(5, t)
        t += 0.1
    reason = ("outside what this gateway accepts" if why == "outside"
              else "this gateway keeps at most 1 tunnel replicas")  # fmt: skip
    assert list(rep.tunnels_refused) == [0x2002] and reason in rep.tunnels_refused[0x2002]
    assert [s_ for s_, _ in heard] == [0x2002]  # told once, not at every sync
    # the active still serves it: both tunnels sent all 20 packets
    assert sorted({spi for spi, _ in wire_out}) == [0x2001, 0x2002] and len(wire_out) == 40
    (tunnel,) = sb.take_over(t + 10.0)[0]
    assert tunnel.outbound.spi == 0x2001
    for _ in range(5):
        res = sb.engine.outbound(udp_packet(0, up=False)[:16] + ip("10.1.0.2").packed
                                 + udp_packet(0, up=False)[20:], t + 10.0)  # fmt: skip
        assert isinstance(res, ToPeer)
        wire_out.append(esp_seq(res.data))
    assert len(wire_out) == len(set(wire_out)), "an (SPI, sequence number) pair was sent twice"
    # a tunnel gone at the active is forgotten there
    act.remove_tunnel(next(x for x in act.tunnels() if x.outbound.spi == 0x2002))
    rep.poll(t + 11.0)
    assert rep.tunnels_refused == {}


def test_a_take_over_is_held_to_the_accepted_ranges_only_when_the_operator_set_them() -> None:
    """[transfer] accept_local_ts / accept_remote_ts set: a take-over is held to them (the
    standby's ``accept``); only defaulted from the gateway's own tunnels (a standby has none,
    and a cluster member's are not its peers'), not: every replica is taken as before."""
    from ipsecct.ct.transfer import take_over_accept
    from ipsecct.gateway.config import from_dict
    from tests.helpers.config_files import transfer_config

    set_ = from_dict(transfer_config({"accept_local_ts": "10.2.0.0/24",
                                      "accept_remote_ts": "10.1.0.0/16"}), "sg1.toml")  # fmt: skip
    assert set_.transfer is not None
    ranges = take_over_accept(set_.transfer.settings)
    assert ranges is not None
    (_, _, s), _ = tunnel_sas("sg1", local="10.2.0.0/24")
    assert s.within(*ranges)
    (_, _, s), _ = tunnel_sas("sg1", local="0.0.0.0/0")
    assert not s.within(*ranges)
    default = from_dict(transfer_config({}), "sg1.toml")
    assert default.transfer is not None and take_over_accept(default.transfer.settings) is None


def test_thousands_of_member_keys_grow_nothing_but_the_scan(tmp_path: Path) -> None:
    """A hostile writer registers 400 members, each under a lease of its own, then 400
    more: the driver remembers the lives (leases) of its [[peers]] only, so nothing it keeps
    grows with them (before: every lease ever seen, for good); it goes on owning its tunnel."""
    from ipsecct.gateway.cluster_driver import ClusterDriver
    from ipsecct.gateway.config import load
    from ipsecct.gateway.node import Node

    cfg_path = failover_sg1(tmp_path)

    async def run(endpoints: list[str]) -> None:
        c = EtcdClient(endpoints, timeout=5.0)
        node = Node(load(cfg_path))
        [t] = node.engine.tunnels()
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=4, groups=4))
        drv.transfer = None
        await drv.start()
        try:
            await eventually(lambda: drv.own.owns(t.outbound.spi), "owning")
            async def wave(w: int) -> None:
                for i in range(400):
                    lid, _ = await c.grant(60)
                    key = ownership.keys("default")["members"] + f"x{w}-{i}"
                    await c.put(key, ownership.member_info("127.0.0.1:1", lid, 8), lease=lid)
                n, want = drv.client.calls + 6, 400 * (w + 1) + 1
                await eventually(lambda: drv.client.calls > n, "two more rounds", 20)
                await eventually(lambda: len(drv._live or {}) >= want, "all seen")

            await wave(0)
            await wave(1)
            assert drv._lease_names == {} and drv.own.owns(t.outbound.spi)
            assert drv.lease.valid(node.clock())
        finally:
            await drv.stop()

    with EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))


def test_a_failure_out_of_the_drivers_loop_is_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever escapes the etcd loop (a bug: the checks above make input no reason) ends it,
    and with it the keep-alives: the engine stops at its fence, and the operator is told why
    (event=task-failed task=cluster), not left with a lease lost for no reason."""
    from ipsecct.gateway.cluster_driver import ClusterDriver
    from ipsecct.gateway.config import load
    from ipsecct.gateway.node import Node

    cfg_path = failover_sg1(tmp_path)

    async def run(endpoints: list[str]) -> None:
        node = Node(load(cfg_path))
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=4, groups=4))
        drv.transfer = None

        async def broken() -> None:
            raise RuntimeError("a bug")

        drv._own_tunnels = broken  # type: ignore[method-assign]
        await drv.start()
        try:
            task = drv._task
            assert task is not None
            await eventually(task.done, "the loop to end")
        finally:
            await drv.stop()

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
    lines = [r.getMessage() for r in caplog.records]
    assert any("event=task-failed" in m and "RuntimeError: a bug" in m for m in lines), lines


def test_a_replica_for_an_spi_the_standby_has_itself_is_not_taken() -> None:
    """Already fine: the active replicates a tunnel whose SPIs are those of a tunnel the
    standby has itself (a bug, or hostile): the take-over leaves the standby's own tunnel as
    it is (its sequence number too) and counts the replica unusable."""
    t, rep, sb = _pair()
    (o, n, s), _ = tunnel_sas("sg2", spi_up=0x1001, spi_down=0x2001, mn_inner="10.1.0.9",
                              name="own")  # fmt: skip
    own = sb.engine.add_tunnel(SPDEntry(s, Action.PROTECT, name="own", static=False), o, n)
    own.outbound.seq = 77
    for m in _wire(rep.poll(0.0)):
        sb.receive(m, 0.0)
    assert t.outbound.spi in sb.replica
    tunnels, _, rec = sb.take_over(1.0)
    assert tunnels == [] and "1 context(s) unusable" in rec.detail
    assert [(x, x.outbound.seq) for x in sb.engine.tunnels()] == [(own, 77)]


def test_a_flood_of_leaving_marks_is_bounded_too() -> None:
    """A peer marks tunnels leaving (a transfer away under way) for SPIs it never replicates,
    by the thousand (before: every mark kept, for good). A mark may come before its tunnel,
    and none may be dropped (its tunnel would be taken over while the transfer's target sends
    on it): past ``max_replicas`` the whole message is refused (CxtpError, no ACK: the
    driver logs sync-malformed) and nothing of it applied."""
    from ipsecct.ct.transfer import LeavingMark

    _, _, sb = _pair()
    sb.max_replicas = 3
    any_ = ipaddress.ip_address("0.0.0.0")

    def msg(seq: int, *cdbs: bytes) -> cxtp.CTD:
        m = cxtp.CTD(any_, 0, cdbs=(cxtp.TransferTag(9, seq).encode(), failover.sync_cdb([], 1),
                                    *cdbs))  # fmt: skip
        return _wire([m])[0]

    marks = [failover.leaving_cdb(0x5000 + i, LeavingMark(7, "sg3", 100), 1) for i in range(10)]
    with pytest.raises(CxtpError, match="marked leaving"):
        sb.receive(msg(1, *marks), 0.0)
    assert sb.marks == {} and sb.last_heard is None  # nothing applied
    sb.receive(msg(2, *marks[:3]), 0.1)
    assert set(sb.marks) == {0x5000, 0x5001, 0x5002}
    with pytest.raises(CxtpError):
        sb.receive(msg(3, marks[5]), 0.2)
    # clearing one makes room
    sb.receive(msg(4, failover.leaving_cdb(0x5000, None, 1), marks[5]), 0.3)
    assert set(sb.marks) == {0x5001, 0x5002, 0x5005}


@pytest.mark.parametrize("where", ["grant", "keepalive"])
def test_etcd_saying_a_shorter_lease_than_asked_never_extends_the_fence(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """Guards the invariant. The fence (how long this member may send after a keep-alive)
    is derived from ``ttl_s``; etcd never grants less than asked, so an answer that says
    the lease lives shorter (a corrupted etcd, or something else at the endpoint) means the
    fence may outlast the lease and another member take the tunnels while this one sends.
    Such an answer must not let the member send: it does not join on such a grant, and
    such a keep-alive does not extend its fence (before: the TTL answered was only logged)."""
    from ipsecct.gateway.cluster_driver import ClusterDriver
    from ipsecct.gateway.config import load
    from ipsecct.gateway.node import Node

    class ShortClient(EtcdClient):
        short = False

        async def grant(self, ttl: int) -> tuple[int, int]:
            lid, got = await super().grant(ttl)
            return (lid, 1) if where == "grant" else (lid, got)

        async def keepalive(self, lease: int) -> int:
            got = await super().keepalive(lease)
            return 1 if self.short and got > 0 else got

    cfg_path = failover_sg1(tmp_path)

    async def run(endpoints: list[str]) -> None:
        node = Node(load(cfg_path))
        [t] = node.engine.tunnels()
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=4, groups=4))
        client = ShortClient(list(endpoints), timeout=drv.client.timeout)
        drv.client = client
        drv.transfer = None
        await drv.start()
        try:
            if where == "grant":
                await eventually(lambda: drv.client.calls >= 6, "a few attempts")
                assert drv.lease_id == 0 and not drv.lease.valid(node.clock())
                assert node.engine.send_until == -math.inf
                return
            await eventually(lambda: drv.own.owns(t.outbound.spi), "owning")
            client.short = True
            until = node.engine.send_until
            await eventually(lambda: not drv.lease.valid(node.clock()), "the fence to lapse")
            assert node.engine.send_until == until  # never moved on by a short answer
        finally:
            await drv.stop()

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
    lines = [r.getMessage() for r in caplog.records]
    assert any("event=cluster-etcd-short-lease" in m for m in lines), lines


def test_cluster_status_shows_what_etcd_holds_without_its_control_characters(
    tmp_path: Path,
) -> None:
    """``ipsecct cluster status`` (the CLI, a process) prints member names and addresses that
    any etcd writer chooses: a name with a terminal escape and an address with a newline are
    shown escaped, one line per member (before: printed raw, moving the operator's terminal
    and forging a line); with the hostile keys above, still an answer, exit 0."""
    from tests.helpers.deployment import cli

    async def run(endpoints: list[str]) -> None:
        c = EtcdClient(endpoints, timeout=5.0)
        base = ownership.keys("default")["members"].rsplit("members/", 1)[0]
        for k, v in HOSTILE.items():
            await c.put(base + k, v)
        lid, _ = await c.grant(60)
        await c.put(base + "members/evil\x1b[2J", ownership.member_info("x\nsg9 fake", lid, 8),
                    lease=lid)  # fmt: skip

    with EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"[cluster]\netcd = {json.dumps(e.endpoints)}\n")
        r = cli("cluster", "status", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\nsg9 fake" not in r.stdout, r.stdout
    assert "evil\\x1b[2J" in r.stdout and "x\\nsg9 fake" in r.stdout, r.stdout


def test_cluster_status_asks_etcd_about_real_members_leases_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ipsecct cluster status`` with 600 junk keys under members/ (no lease, or a value
    naming another lease: anyone may write them) and two members (one each, as members write
    them): one range read of the member keys and one lease lookup per real member's lease
    (before: a lookup per key, 602 calls: minutes with thousands of keys); the junk is
    counted, not listed; each member shows the TTL etcd granted (``ttl_s``) and what is left
    of it (``left_s``: before, ``ttl_s`` was the time left)."""
    from ipsecct.gateway import etcd as etcdmod
    from ipsecct.gateway.cluster_driver import cluster_status
    from tests.helpers.deployment import cli

    calls: list[str] = []
    real_call = etcdmod.EtcdClient.call

    async def counted(self: EtcdClient, path: str, body: dict[str, object]) -> dict[str, object]:
        calls.append(path)
        return await real_call(self, path, body)

    async def run(endpoints: list[str]) -> dict[str, object]:
        c = EtcdClient(endpoints, timeout=5.0)
        members = ownership.keys("default")["members"]
        other, _ = await c.grant(30)
        for i in range(0, 600, 100):
            await c.txn(ownership.Txn((), tuple(
                ownership.Put(f"{members}junk{k:04d}",
                              ownership.member_info("x", other, 8) if k % 2 else "junk")
                for k in range(i, i + 100))))  # fmt: skip
        for name, ttl in (("sg1", 30), ("sg2", 40)):
            lid, _ = await c.grant(ttl)
            await c.put(members + name, ownership.member_info(f"{name}:1", lid, 8), lease=lid)
        monkeypatch.setattr(etcdmod.EtcdClient, "call", counted)
        try:
            return await cluster_status(ClusterConfig(etcd=tuple(endpoints)))
        finally:
            monkeypatch.undo()

    with EtcdCluster(tmp_path) as e:
        st = asyncio.run(run(e.endpoints))
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"[cluster]\netcd = {json.dumps(e.endpoints)}\n")
        r = cli("cluster", "status", "--config", str(cfg))
    assert calls.count("/v3/lease/timetolive") == 2, calls.count("/v3/lease/timetolive")
    members = cast(dict[str, dict[str, object]], st["members"])
    assert set(members) == {"sg1", "sg2"} and st["malformed_members"] == 600, st
    assert members["sg1"]["ttl_s"] == 30 and members["sg2"]["ttl_s"] == 40, members
    left = cast(int, members["sg2"]["left_s"])
    assert 0 < left <= 40, members
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()[1].split()
    assert head[:4] == ["member", "lease", "ttl_s", "left_s"], r.stdout
    assert "600 key(s) under members/ that no member wrote" in r.stdout, r.stdout
    assert "junk0001" not in r.stdout, r.stdout


class _Wire:
    """The peers' TLS channels between cluster drivers in one event loop, delivered in order
    through the wire form, and only while both ends are ``alive``."""

    def __init__(self, me: str, alive: set[str], drivers: dict[str, ClusterDriver]) -> None:
        self.me, self.alive, self.drivers = me, alive, drivers

    def send(self, peer: str, msg: cxtp.Message) -> None:
        m = cast(cxtp.CTD, cxtp.decode(cxtp.encode(msg)))
        alive, me = self.alive, self.me
        if me in alive and peer in alive:
            asyncio.get_running_loop().call_soon(
                lambda: peer in alive and self.drivers[peer].receive(me, m)
            )

    def room(self, peer: str) -> int:
        return 1 << 30


@contextlib.asynccontextmanager
async def _sg1_gone_sg3_halted(
    tmp_path: Path, endpoints: list[str], port: int
) -> AsyncIterator[tuple[ClusterDriver, ClusterDriver, EtcdClient]]:
    """sg1, sg2 and sg3 on a real etcd (their peers' channels delivered in order through the
    wire form; UDP ports from ``port``); sg2 and sg3 hold replicas of sg1's six tunnels.
    sg3 does not run for a while (its tasks halted: a SIGSTOP, a loaded machine; its lease,
    30 s, outlives the halt); sg1 stops (its lease revoked: its groups' owner keys go) and
    sg2 takes its six tunnels over. Yields sg2, sg3 and an etcd client; stops every driver
    on the way out."""

    names = ("sg1", "sg2", "sg3")
    drivers: dict[str, ClusterDriver] = {}
    alive = set(names)

    for i, n in enumerate(names):
        node = _member_node(tmp_path, n, port, i)
        ttl = 30 if n == "sg3" else 2  # (sg3's lease outlives its halt)
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=ttl, groups=4))
        drv.attach(_Wire(n, alive, drivers), Transfer(), Identity.DIRECT,  # type: ignore[arg-type]
                       [p for p in names if p != n])
        drv.transfer = None
        drivers[n] = drv
    for drv in drivers.values():
        await drv.start()
    sg2, sg3 = drivers["sg2"], drivers["sg3"]
    try:
        await eventually(lambda: len(drivers["sg1"].own.owned() & _here(drivers["sg1"]))
                         == 6, "sg1 to own its six tunnels", 20)  # fmt: skip
        await eventually(lambda: len(sg2.standbys["sg1"].replica) == 6
                         and len(sg3.standbys["sg1"].replica) == 6,
                         "the replicas", 20)  # fmt: skip
        for task in (sg3._task, sg3._repl_task):  # sg3 stops running
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        alive.discard("sg1")
        await drivers["sg1"].stop()  # (its lease revoked: its groups' owner keys go)
        await eventually(lambda: len(sg2.own.owned() & _here(sg2)) == 6,
                         "sg2 to take sg1's six tunnels over", 20)  # fmt: skip
        yield sg2, sg3, EtcdClient(list(endpoints), timeout=5.0)
    finally:
        for drv in drivers.values():
            await drv.stop()


def _here(d: ClusterDriver) -> set[int]:
    return {t.outbound.spi for t in d.node.engine.tunnels()}


def test_no_seq_sent_twice_a_tunnel_deleted_after_its_take_over_is_not_taken_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the invariant. sg1, sg2 and sg3 on a real etcd; sg2 and sg3 hold replicas of
    sg1's six tunnels. sg3 does not run for a while (its tasks halted: a SIGSTOP, a loaded
    machine; its lease long enough to survive it). Meanwhile sg1 dies, sg2 takes its groups
    over, sends on one of the tunnels and deletes it (an IKE DELETE, a rekey: its key goes).
    sg3 runs again and reads a dead member's tunnel without a key, which it took for one
    sg1 never recorded (never sent on) and recorded from its replica: it sent the numbers
    sg2 had sent (from the same replica plus the margin). A dead member's keyless tunnels
    are not taken once any of its groups has an owner again: that owner may have sent on
    them and deleted their keys."""
    async def run(endpoints: list[str]) -> None:
        async with _sg1_gone_sg3_halted(tmp_path, endpoints, 45200) as (sg2, sg3, c):
            [t] = [t for t in sg2.node.engine.tunnels() if t.outbound.spi == 0x2000]
            sent = t.outbound.seq  # sg2 sends on it (from the replica plus the margin) ...
            t.outbound.seq += 10
            sg2.node.engine.remove_tunnel(t)  # ... and deletes it
            sg2._new_tunnel(None)
            key = ownership.keys("default")["tunnels"] + "00002000"
            for _ in range(200):
                if await c.get(key) is None:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("sg2 never released the deleted tunnel's key")
            await sg3.start()  # sg3 runs again
            await eventually(lambda: sg3.lease.valid(sg3.node.clock()) and sg3.dead_since,
                             "sg3 to look at the dead sg1", 20)  # fmt: skip
            await asyncio.sleep(sg3.grace + 1.0)  # past the grace: whoever asks first
            mine = [t for t in sg3.node.engine.tunnels() if t.outbound.spi == 0x2000]
            assert not mine, (
                f"sg3 took the deleted tunnel over at {mine[0].outbound.seq} (sg2 sent "
                f"{sent}..{sent + 9})"
            )
            assert 0x2000 not in sg3.standbys["sg1"].replica  # never to be used
            assert sg3.status()["keyless_dropped"] == 1

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
    lines = [r.getMessage() for r in caplog.records]
    assert any("event=cluster-keyless-dropped node=sg3" in m for m in lines), lines


def test_no_seq_sent_twice_a_member_restarted_after_its_lease_ended_leaves_its_groups_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the invariant. sg1 owns six tunnels, replicated to sg2. sg2 does not run for a
    while (its tasks halted; its lease, 30 s, outlives the halt); sg1 is killed (its tasks
    gone, its lease not revoked) and etcd ends its lease: its member key and owner keys go.
    sg1 restarts with its six tunnels (configured, or restored from its durable state)
    before sg2 ran again: no member key of its name, so it joined at once, under a new lease;
    sg2, running again, read sg1 alive and took nothing: the six tunnels were silent for
    good, their groups owned by nobody. Now the restarted sg1 finds its previous life in its
    tunnels' keys (groups without an owner, of a lease no member holds) and joins only once
    sg2 took them over (from its replicas, above anything the old sg1 sent); it sends on none
    of them."""

    port = 45260
    drivers: dict[str, ClusterDriver] = {}
    alive = {"sg1", "sg2"}
    spis = {0x2000 + k for k in range(6)}

    def member(n: str, ttl: int) -> ClusterDriver:
        i = 0 if n == "sg1" else 1
        # (sg1's tunnels, each life: configured, or from its durable state)
        node = _member_node(tmp_path, n, port, i)
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=ttl, groups=4))
        drv.attach(_Wire(n, alive, drivers), Transfer(), Identity.DIRECT,  # type: ignore[arg-type]
                   [p for p in ("sg1", "sg2") if p != n])
        drv.transfer = None
        drivers[n] = drv
        return drv

    async def halt(drv: ClusterDriver) -> None:
        for task in (drv._task, drv._repl_task):
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run() -> None:
        c = EtcdClient(list(endpoints), timeout=5.0)
        sg1, sg2 = member("sg1", 2), member("sg2", 30)
        await sg1.start()
        await sg2.start()
        try:
            await eventually(lambda: sg1.own.owned() & _here(sg1) == spis
                             and set(sg2.standbys["sg1"].replica) == spis,
                             "sg1 owns its six tunnels, sg2 holds their replicas", 20)  # fmt: skip
            old = sg1.lease_id
            await halt(sg2)  # sg2 does not run for a while
            await halt(sg1)  # sg1 is killed: its lease ends by itself
            alive.discard("sg1")
            key1 = ownership.keys("default")["members"] + "sg1"
            for _ in range(300):
                if await c.get(key1) is None:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("etcd did not end sg1's lease")
            alive.add("sg1")
            sg1b = member("sg1", 2)  # sg1 restarted, sg2 still not running
            await sg1b.start()
            await eventually(lambda: sg1b.lease_id or "previous life" in sg1b.last_error,
                             "the restarted sg1 joins, or says why not yet")  # fmt: skip
            await sg2.start()  # sg2 runs again
            await eventually(lambda: sg2.own.owned() & _here(sg2) == spis,
                             f"sg2 to take sg1's previous life's tunnels over: {sg2.status()}",
                             20)  # fmt: skip
            await eventually(lambda: sg1b.lease_id not in (0, old), "sg1 joins again", 20)
            assert not sg1b.own.owned() & spis, sg1b.status()
            assert all(sg1b.node.engine.fenced(t, sg1b.node.clock())
                       for t in sg1b.node.engine.tunnels()), sg1b.status()  # fmt: skip
        finally:
            for drv in drivers.values():
                await drv.stop()
            await sg1.stop()

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        endpoints = e.endpoints
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records]
    assert any("node=sg1" in m and "not joining yet" in m and "previous life" in m
               for m in lines), lines  # fmt: skip


async def _halt(drv: ClusterDriver) -> None:
    """``drv`` stops running (its tasks cancelled, its lease neither renewed nor revoked): a
    SIGSTOP, or a kill -9 if it never runs again."""
    for task in (drv._task, drv._repl_task):
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("how", ["holder-lives", "owner-lives", "owner-killed",
                                 "owner-killed-restarted"])
def test_no_seq_sent_twice_a_member_key_deleted_while_its_lease_lives_is_not_a_death(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Guards the invariant. sg1 owns six tunnels, replicated to sg2, on a real etcd. An
    operator deletes a member key (``etcdctl del``) while its lease lives; the member does
    not run meanwhile (halted: a SIGSTOP, a loaded machine), so the other reads it gone.
    Its lease and owner keys live: it is not dead, and nobody may take its groups.
    ``holder-lives``: sg2's key. sg1 dropped its floors there (its tunnels then ran past
    what sg2 holds, and sg2's key written back would let sg2 take them over below that),
    and sg2 ended its life. Now sg1 keeps its floors while sg2's lease lives, and sg2,
    running again, writes its key back under the same lease (one line) and keeps its
    replicas. ``owner-lives``: sg1's key. sg2 dropped its replicas (sg1's groups are owned);
    now it keeps them, and sg1 writes its key back and goes on owning its tunnels.
    ``owner-killed``, the worst moment: sg1 never runs again (kill -9) once its key is
    deleted. sg2 had dropped its replicas, so when etcd ended sg1's lease nobody took the
    six tunnels over (orphaned). Now sg2 keeps them until the lease ends, then takes the six
    over, each above the ceiling sg1 was held to (everything sg1 may have sent).
    ``owner-killed-restarted``: sg1 restarted at once with its six tunnels (configured, or
    from its durable state). No member key of its name, so it joined at once; sg2 then read
    it alive (under its new lease) when the old one ended and took nothing: the six were
    orphaned. Now it finds its previous life in its tunnels' keys (groups owned in its name,
    though no member key names that lease) and joins only once sg2 took them over."""
    port = 45320
    names = ("sg1", "sg2")
    spis = {0x2000 + k for k in range(6)}

    async def run(endpoints: list[str]) -> None:
        drivers: dict[str, ClusterDriver] = {}
        alive = set(names)
        victim_name = "sg2" if how == "holder-lives" else "sg1"
        for i, n in enumerate(names):
            node = _member_node(tmp_path, n, port, i)
            # (a victim that runs again: its lease outlives its halt on a loaded machine)
            ttl = 10 if n == victim_name and how.endswith("lives") else 2
            drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=ttl, groups=4))
            drv.attach(_Wire(n, alive, drivers), Transfer(), Identity.DIRECT,  # type: ignore[arg-type]
                       [p for p in names if p != n])
            drv.transfer = None
            drivers[n] = drv
        for drv in drivers.values():
            await drv.start()
        sg1, sg2 = drivers["sg1"], drivers["sg2"]
        c = EtcdClient(list(endpoints), timeout=5.0)
        again: list[ClusterDriver] = []
        try:
            await eventually(lambda: sg1.own.owned() & _here(sg1) == spis
                             and set(sg2.standbys["sg1"].replica) == spis
                             and all(t in r.floor for r in sg1.replicators.values()
                                     for t in sg1.node.engine.tunnels()),
                             "sg1 owns its six tunnels, sg2 holds their replicas", 20)  # fmt: skip
            for t in sg1.node.engine.tunnels():  # sg1 sends on them, up to its ceilings
                t.outbound.seq += 100
                assert t.seq_ceiling < 1 << 64
            victim = drivers[victim_name]
            other = sg1 if victim is sg2 else sg2
            lease = victim.lease_id
            key = ownership.keys("default")["members"] + victim.node.name
            await _halt(victim)
            if how.startswith("owner-killed"):
                alive.discard("sg1")
                ceilings = {t.outbound.spi: t.seq_ceiling for t in sg1.node.engine.tunnels()}
            await c.delete(key)
            if how == "owner-killed-restarted":  # sg1 restarted at once, with its tunnels
                node = _member_node(tmp_path, "sg1", port, 0)
                sg1b = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=2,
                                                         groups=4))  # fmt: skip
                sg1b.attach(_Wire("sg1", alive, drivers), Transfer(), Identity.DIRECT,  # type: ignore[arg-type]
                            ["sg2"])
                sg1b.transfer = None
                again.append(sg1b)
                drivers["sg1"] = sg1b
                alive.add("sg1")
                await sg1b.start()
            # the other member reads the key gone: a few rounds of its loop (its etcd calls)
            calls = other.client.calls
            await eventually(lambda: other.client.calls >= calls + 12, "the other's rounds")
            if how.endswith("lives"):  # (killed: the lease may have ended by now)
                assert set(sg2.standbys["sg1"].replica) == spis, sg2.status()
            assert sg1.floors_dropped == 0, sg1.status()
            if how == "owner-killed-restarted":
                await eventually(lambda: sg2.own.owned() & _here(sg2) == spis,
                                 f"sg2 to take sg1's six tunnels over: {sg2.status()}",
                                 20)  # fmt: skip
                for t in sg2.node.engine.tunnels():
                    assert t.outbound.seq >= ceilings[t.outbound.spi], (t, ceilings)
                await eventually(lambda: sg1b.lease_id not in (0, lease), "sg1 joins again", 20)
                assert not sg1b.own.owned() & spis, sg1b.status()
                assert all(sg1b.node.engine.fenced(t, sg1b.node.clock())
                           for t in sg1b.node.engine.tunnels()), sg1b.status()  # fmt: skip
                return
            if how == "owner-killed":
                await eventually(lambda: sg2.own.owned() & _here(sg2) == spis,
                                 f"sg2 to take sg1's six tunnels over: {sg2.status()}",
                                 20)  # fmt: skip
                for t in sg2.node.engine.tunnels():
                    assert t.outbound.seq >= ceilings[t.outbound.spi], (t, ceilings)
                assert await c.keepalive(lease) <= 0
                return
            await victim.start()  # running again
            await eventually(lambda: victim.status()["member_key_restored"] == 1,
                             f"{victim.node.name} to write its key back: {victim.status()}",
                             10)  # fmt: skip
            kv = await c.get(key)
            assert kv is not None and kv.lease == lease == victim.lease_id
            calls = other.client.calls
            await eventually(lambda: other.client.calls >= calls + 12, "the other's rounds")
            assert victim.life_ends == {}, victim.status()
            assert sg1.own.owned() & _here(sg1) == spis, sg1.status()
            assert set(sg2.standbys["sg1"].replica) == spis, sg2.status()
            assert sg1.floors_dropped == 0, sg1.status()
            assert other.status()["keyless_peers"] == {}, other.status()
        finally:
            for drv in [*drivers.values(), sg1]:
                await drv.stop()

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
    lines = [r.getMessage() for r in caplog.records]
    victim = "sg2" if how == "holder-lives" else "sg1"
    if how == "owner-killed-restarted":
        assert any("node=sg1" in m and "not joining yet" in m and "previous life" in m
                   for m in lines), lines  # fmt: skip
    assert not any("event=cluster-floors-dropped" in m for m in lines), lines
    assert not any("event=cluster-member-key-lost" in m for m in lines), lines
    missing = [m for m in lines if "event=cluster-member-key-missing" in m]
    assert missing and all(f"peer={victim}" in m for m in missing), lines
    restored = [m for m in lines if "event=cluster-member-key-restored" in m]
    assert len(restored) == (not how.startswith("owner-killed")), lines
    assert all(f"node={victim}" in m for m in restored), lines


# -- tunnel keys that are not what a member writes (tunnels/<8 lower-case hex digits>) ----------

@pytest.mark.parametrize("tail", ["0x002000", "+0002000", "000_2000", " 0002000", "0000200A",
                                  "-0000000", "00002000/x"])  # fmt: skip
def test_a_tunnel_key_that_is_no_member_s_spelling_names_no_spi(tail: str) -> None:
    assert ownership.spi_of_key("/ipsecct/default/tunnels/" + tail) is None
    assert ownership.spi_of_key("/ipsecct/default/tunnels/0000200a") == 0x200A
    lease = "00000000" + tail  # (a group's head: its creator's lease, 16 hex digits)
    assert ownership.lease_of_group(lease + "-1") == 0
    assert ownership.lease_of_group("000000000000200a-1") == 0x200A


def test_no_seq_sent_twice_an_alias_of_a_tunnel_key_takes_nothing_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the invariant. sg1, sg2 and sg3 on a real etcd; sg2 and sg3 hold replicas of
    sg1's six tunnels. sg3 does not run for a while; sg1 dies and sg2 takes its groups over
    (it sends on them). A hostile writer (or a corrupted etcd) adds tunnels/0x002000, naming
    a group nobody owns: int(tail, 16) read it as the SPI 0x2000, and as etcd lists it after
    tunnels/00002000 its group replaced the true one. sg3, running again, saw a dead member's
    tunnel in an orphaned group, created that group's owner key and took 0x2000 over from its
    replica: two senders of one SA, from replicas of one tunnel (numbers twice). The alias is
    no tunnel key: ignored, and told."""
    async def run(endpoints: list[str]) -> None:
        async with _sg1_gone_sg3_halted(tmp_path, endpoints, 45230) as (sg2, sg3, c):
            tunnels = ownership.keys("default")["tunnels"]
            await c.put(tunnels + "0x002000", "fake-0")  # the alias, in a group of nobody
            await sg3.start()  # sg3 runs again
            await eventually(lambda: sg3.lease.valid(sg3.node.clock()) and sg3.dead_since,
                             "sg3 to look at the dead sg1", 20)  # fmt: skip
            await asyncio.sleep(sg3.grace + 1.0)  # past the grace: whoever asks first
            mine = [t for t in sg3.node.engine.tunnels() if t.outbound.spi == 0x2000]
            assert not mine, f"sg3 took 0x2000 over at {mine[0].outbound.seq}: sg2 sends on it"
            assert 0x2000 in sg2.own.owned() & _here(sg2)
            assert sg3.malformed > 0
            assert await c.get(ownership.keys("default")["groups"] + "fake-0") is None

    with caplog.at_level(logging.INFO, logger="ipsecct"), EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))
    lines = [r.getMessage() for r in caplog.records]
    assert any("event=cluster-etcd-malformed" in m and "0x002000" in m for m in lines), lines


def test_a_sync_at_the_last_epoch_is_refused_so_a_take_over_never_wraps_to_epoch_0() -> None:
    """An active (hostile, or a state file edited) replicating in epoch 2**32 - 1, the last
    the wire carries: the standby took that epoch, and its take-over began epoch 2**32, sent
    as 0 (so its TAKEN, epoch 0, told the old active nothing: an earlier epoch) and written
    to its epoch file as a number load_state refuses (damaged at the next start). Refused:
    a CxtpError, nothing applied, the standby's epoch and replicas as they were."""
    t, rep, sb = _pair()
    for m in _wire(rep.poll(0.0)):
        sb.receive(m, 0.0)
    assert t.outbound.spi in sb.replica and sb.epoch == failover.FIRST_EPOCH
    rep.epoch = 0xFFFFFFFF
    t.outbound.seq = 777
    msgs = _wire(rep.poll(5.0))
    assert msgs
    with pytest.raises(CxtpError, match="epoch"):
        for m in msgs:
            sb.receive(m, 5.0)
    assert sb.epoch == failover.FIRST_EPOCH
    sb.take_over(10.0)  # (the replica kept from epoch 1)
    assert sb.epoch == failover.FIRST_EPOCH + 1


def test_a_flood_of_joins_under_fresh_sessions_resends_the_whole_state_once_a_second() -> None:
    """A standby (hostile, or restarting in a loop) JOINs under a new session each time:
    each JOIN made the active send its whole state again at the next poll (a JOIN of a few
    octets, a FULL of every tunnel: with thousands, the active's CPU and the channel went to
    that). A JOIN-made resync at most once per JOIN_RESYNC_GAP; a JOIN in between is answered
    by the next one, once the gap is over (none is lost), and counted coalesced."""
    _, rep, _ = _pair()
    rep.poll(0.0)
    fulls = 0
    now = 0.0
    for k in range(200):  # a JOIN every 10 ms, for 2 s
        now = k * 0.01
        rep.join(1000 + k, 0, now)
        for m in _wire(rep.poll(now)):
            fulls += failover.parse_sync_full(m.cdbs[1])[0]
    gap = failover.JOIN_RESYNC_GAP
    assert 1 <= fulls <= 2 / gap + 1, fulls
    assert rep.joins == 200 and rep.joins_coalesced >= 200 - fulls
    rep.join(5000, 0, now)  # the last one, in a gap: answered once the gap is over
    later = _wire(rep.poll(now + gap + 0.01))
    assert any(failover.parse_sync_full(m.cdbs[1])[0] for m in later)

"""A member (etcd mode) that was not running past its lease: stopped (SIGSTOP: its clock ran
on) or its machine suspended (CLOCK_MONOTONIC, the node's clock and the C forwarding thread's,
stood still while etcd's ran). etcd expired its lease meanwhile and a peer may have taken its
tunnels over. When it runs again it must send nothing past the ceilings the taker starts above
before it learns that the lease is gone (docs/cluster.md, "A paused or suspended member").

A real etcd, a real driver (``gateway/cluster_driver.py``) in this process; only the clocks are
injected (the node's clock, and the machine's time suspended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import pytest

from ipsecct.ct import ownership
from ipsecct.ct.lease import Lease, timing
from ipsecct.ct.transfer import Identity
from ipsecct.gateway.cluster_driver import ClusterDriver
from ipsecct.gateway.config import ClusterConfig, load
from ipsecct.gateway.etcd import EtcdClient
from ipsecct.gateway.node import Node
from tests.helpers.cluster_standins import Channels, Transfer
from tests.helpers.config_files import failover_sg1
from tests.helpers.etcd_server import EtcdCluster
from tests.helpers.waiting import eventually


class Clocks:
    """The node's clock (monotonic, frozen while "not running") and the machine's time
    suspended (``suspended_s``)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.frozen: float | None = None
        self.slept = 0.0
        self._stopped_at = 0.0

    def clock(self) -> float:
        return self.frozen if self.frozen is not None else time.monotonic() - self.offset

    def suspended(self) -> float:
        return self.slept

    def stop(self) -> None:
        self.frozen = self.clock()
        self._stopped_at = time.monotonic()

    def resume(self, suspended: bool) -> None:
        assert self.frozen is not None
        if suspended:  # the clock stood still: it goes on from where it stopped
            self.offset = time.monotonic() - self.frozen
            self.slept += time.monotonic() - self._stopped_at
        self.frozen = None


async def _halt(drv: ClusterDriver) -> None:
    """The process stops running (its tasks, not its etcd lease: nothing is revoked)."""
    for task in (drv._task, drv._repl_task):
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("first", ["loop", "ike"])
@pytest.mark.parametrize("suspended", [False, True], ids=["sigstop", "suspend"])
def test_no_seq_sent_twice_a_member_not_running_past_its_lease_sends_nothing_past_its_ceiling(
    tmp_path: Path, suspended: bool, first: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the invariant. sg1 owns its tunnel, replicated to sg2 (a member): its ceiling is
    sg2's floor + the margin, and the tunnel has reached it. sg1 stops running just after a
    keep-alive; etcd expires its lease; sg2, which would take the tunnel over from its
    replica (above that ceiling) and send, restarts meanwhile (a new lease). sg1 runs again:
    whatever its loop does first (the member list is read before the next keep-alive is
    due), the tunnel must stay fenced until sg1 learns from etcd that its lease is gone
    (it then removes the tunnel). After a SIGSTOP its clock says the lease ended. After a
    suspend its clock says the lease runs on: before the suspend was counted, the member list
    showed sg2's new lease, sg2's floor was dropped, the ceiling went and the tunnel could
    send past it (numbers sg2 had used) for up to ttl_s / 4. ``first="ike"``: what runs first
    after the wake is IKE (a timer long overdue, a datagram in the socket), which may send
    only while the lease is valid: it must find the lease over (else it would answer or send
    requests under message IDs sg2, which took the IKE SAs over, may have used)."""
    cfg_path = failover_sg1(tmp_path)

    async def run(endpoints: list[str]) -> None:
        c = EtcdClient(endpoints, timeout=5.0)
        lid, _ = await c.grant(60)  # sg2
        key2 = ownership.keys("default")["members"] + "sg2"
        await c.put(key2, ownership.member_info("127.0.0.1:1", lid, 8), lease=lid)
        clocks = Clocks()
        node = Node(load(cfg_path), clock=clocks.clock)
        [t] = node.engine.tunnels()
        drv = ClusterDriver(node, ClusterConfig(etcd=tuple(endpoints), ttl_s=2, groups=4))
        drv.suspended = clocks.suspended
        drv.attach(Channels(), Transfer(), Identity.DIRECT, ["sg2"])  # type: ignore[arg-type]
        drv.transfer = None
        rep = drv.replicators["sg2"]
        await drv.start()
        try:
            await eventually(
                lambda: drv.own.owns(t.outbound.spi) and t in rep.floor,
                "the tunnel owned and bounded by sg2's floor",
            )
            ceiling = rep.floor[t] + drv.margin
            assert t.seq_ceiling == ceiling
            t.outbound.seq = ceiling  # it sent up to its ceiling: the next one is sg2's
            assert node.engine.fenced(t, clocks.clock())
            await _halt(drv)
            await drv._renew()  # the last keep-alive before the stop
            assert drv.lease.valid(clocks.clock())
            clocks.stop()
            drv._next_keepalive = clocks.clock() + drv.cfg.ttl_s / 4
            key1 = ownership.keys("default")["members"] + "sg1"
            for _ in range(200):  # etcd expires sg1's lease (TTL 2 s)
                if await c.get(key1) is None:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("etcd did not expire sg1's lease")
            # sg2 took the tunnel over (from its replica, past the ceiling) and restarted
            await c.revoke(lid)
            lid2, _ = await c.grant(60)
            await c.put(key2, ownership.member_info("127.0.0.1:1", lid2, 8), lease=lid2)
            clocks.resume(suspended)
            if suspended:  # the fence looks valid for the rest of the lease
                assert node.engine.send_until > clocks.clock()
            if first == "ike":  # (IkeService asks this before every timer, datagram, send)
                assert drv._ike_fenced(clocks.clock()), drv.status()
                assert not node.engine.send_until > clocks.clock()
            await drv.start()
            deadline = time.monotonic() + 15
            while drv.lost_for_good == 0:
                assert time.monotonic() < deadline, "sg1 never learned its lease was gone"
                if t in set(node.engine.tunnels()):
                    assert node.engine.fenced(t, clocks.clock()), (
                        f"the tunnel may send past its old ceiling {ceiling} "
                        f"(now {t.send_limit}) under a lease etcd expired: {drv.status()}"
                    )
                await asyncio.sleep(0.005)
            assert t not in set(node.engine.tunnels())
            st = drv.status()["lease"]
            assert st["suspends"] == (1 if suspended else 0), st
            # the loss is counted though the lease that had it is gone (it read 0 after a
            # SIGSTOP: the next life's lease counted from 0)
            assert st["losses"] == 1, st
            resumed = [r for r in caplog.records if "cluster-resumed" in r.getMessage()]
            assert len(resumed) == (1 if suspended else 0)
        finally:
            await drv.stop()

    caplog.set_level(logging.INFO)
    with EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))


def test_a_suspend_ends_the_lease_that_much_sooner() -> None:
    """The holder's side (sans-I/O): a suspend of ``s`` seconds (its clock stood still) ends
    its lease ``s`` sooner on its clock, and a grant for a heartbeat sent before the suspend
    counts from that heartbeat's real sending."""
    lease = Lease(timing(2000))  # lease about 1.95 s
    lease.sent(1, 100.0)
    lease.granted(1, 100.01)
    assert lease.valid(101.0)
    lease.slept(0.5)
    assert lease.valid(101.0) and not lease.valid(101.0 + lease.timing.lease - 0.5)
    lease.slept(5.0)  # past its end: lost at once
    assert not lease.valid(101.0) and lease.poll(101.0)
    lease.sent(2, 101.0)  # a heartbeat, then a suspend of 3 s before its grant
    lease.slept(3.0)
    lease.granted(2, 101.1)
    assert lease.expiry == pytest.approx(101.0 - 3.0 + lease.timing.lease)
    assert not lease.valid(101.1)

"""One timer per node (gateway/timers.py): the cores' next_deadline()/handle_timer(now), one
loop.call_at for the earliest, supervision of a core whose timer raises; and the cores' own
deadlines (engine, transfer core, replicator, standby), with the clock as an argument."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from ipsecct.ct import failover
from ipsecct.ct.transfer import Identity, TransferCore
from ipsecct.demo import handover as demo_handover
from ipsecct.demo import topology as demo
from ipsecct.gateway.timers import RETRY_AFTER_FAILURE, Scheduler, supervise
from ipsecct.ipsec.engine import Engine
from ipsecct.ipsec.ippacket import Endpoint
from tests.helpers.transfer import SG_ADDR, ip
from tests.helpers.waiting import eventually


class Core:
    """A sans-I/O core with a deadline it moves when handled (or not, when broken)."""

    def __init__(self, clock: FakeClock, at: float | None, every: float, broken: bool = False):
        self.clock = clock
        self.at = at
        self.every = every
        self.broken = broken
        self.calls: list[float] = []

    def next_deadline(self) -> float | None:
        return self.at

    def handle_timer(self, now: float) -> None:
        self.calls.append(now)
        if self.broken:
            raise ValueError("a bug in this core")
        self.at = now + self.every


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def run_until(cond: object, clock: FakeClock, step: float = 0.01) -> None:
    """Advance the fake clock and let the loop run until ``cond()``; the scheduler's call_at
    uses the loop's time, so the fake clock only says what ``now`` the cores are given."""
    async with asyncio.timeout(10):
        while not cond():  # type: ignore[operator]
            clock.t += step
            await asyncio.sleep(step)


def test_one_handle_for_the_earliest_deadline_and_each_core_when_due() -> None:
    async def main() -> None:
        clock = FakeClock()
        s = Scheduler(clock, "n1")
        fast = Core(clock, clock.t + 0.05, 0.05)
        slow = Core(clock, clock.t + 0.3, 10.0)
        idle = Core(clock, None, 1.0)
        s.add("fast", fast.next_deadline, fast.handle_timer)
        s.add("slow", slow.next_deadline, slow.handle_timer)
        s.add("idle", idle.next_deadline, idle.handle_timer)
        assert s._handle is None  # nothing armed before the loop runs it
        s.start()
        assert s._handle is not None and s._armed_for == fast.at
        await run_until(lambda: len(slow.calls) == 1, clock)
        # each core is called only once its deadline has come, and with the clock's now
        assert all(t >= 1000.05 for t in fast.calls) and slow.calls[0] >= 1000.3
        assert len(fast.calls) >= 2 and idle.calls == []
        assert s._armed_for == min(fast.at, slow.at)
        s.remove("fast")
        assert s._armed_for == slow.at
        s.stop()
        assert s._handle is None

    asyncio.run(main())


def test_a_core_that_raises_is_logged_and_retried_later_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[Core, Core, Scheduler]:
        clock = FakeClock()
        s = Scheduler(clock, "n1")
        bad = Core(clock, clock.t + 0.01, 0.01, broken=True)
        good = Core(clock, clock.t + 0.01, 0.02)
        s.add("bad", bad.next_deadline, bad.handle_timer)
        s.add("good", good.next_deadline, good.handle_timer)
        s.start()
        await run_until(lambda: len(bad.calls) >= 2, clock, step=0.05)
        s.stop()
        return bad, good, s

    with caplog.at_level(logging.ERROR, logger="ipsecct.gateway.timers"):
        bad, good, s = asyncio.run(main())
    # retried, but not before RETRY_AFTER_FAILURE (no busy loop on a stuck deadline)
    assert bad.calls[1] - bad.calls[0] >= RETRY_AFTER_FAILURE
    assert len(good.calls) > len(bad.calls)
    assert s.failures == len(bad.calls)
    lines = [r.getMessage() for r in caplog.records if "timer-failed" in r.getMessage()]
    assert len(lines) == s.failures and "timer=bad" in lines[0] and "ValueError" in lines[0]


def test_a_failed_task_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise RuntimeError("lost connection state")

    async def main() -> None:
        t = supervise(boom(), "read from sg2", "sg1")
        with pytest.raises(RuntimeError):
            await t

    with caplog.at_level(logging.ERROR, logger="ipsecct.gateway.timers"):
        asyncio.run(main())
    (line,) = [r.getMessage() for r in caplog.records]
    assert "task-failed" in line and "read from sg2" in line and "lost connection" in line


# -- the cores' deadlines, sans-I/O ---------------------------------------------------------


def test_engine_deadline() -> None:
    from tests.helpers.sas import sa_pair

    eng = Engine(ip(SG_ADDR["sg1"]))
    assert eng.next_deadline() is None  # no SA: nothing to time
    out, _ = sa_pair()
    eng.sad.add(out)
    assert eng.next_deadline() == 0.0  # due at once
    eng.handle_timer(50.0)
    assert eng.next_deadline() == 50.0 + Engine.TIMER_INTERVAL


def test_replicator_and_standby_deadlines() -> None:
    cfg = failover.FailoverConfig("active", "sg2", tick_ms=10.0, dead_ms=300.0)
    rep = failover.Replicator(Engine(ip(SG_ADDR["sg1"])), cfg, session=1)
    assert rep.next_deadline() == 0.0
    msgs = rep.handle_timer(5.0)
    assert len(msgs) == 1  # the first check sends the (empty) full state
    assert rep.next_deadline() == pytest.approx(5.01)
    sb = failover.Standby(
        Engine(ip(SG_ADDR["sg2"])),
        failover.FailoverConfig("standby", "sg1", dead_ms=300.0, heartbeat_ms=100.0),
        Endpoint(ip(SG_ADDR["sg2"]), 4500),
        Identity.DIRECT,
    )
    assert sb.next_deadline() is None  # never heard from the active: nothing to wait for
    sb.receive(msgs[0], 5.0)  # type: ignore[arg-type]
    assert sb.next_deadline() == pytest.approx(5.3)
    assert sb.handle_timer(5.29) is None
    taken = sb.handle_timer(5.3)
    assert taken is not None and taken[2].outcome == "took over"
    assert sb.next_deadline() is None


def test_transfer_core_idle_has_no_deadline_and_ctar_seq_is_a_counter() -> None:
    eng = Engine(ip(SG_ADDR["sg1"]))
    core = TransferCore(eng, Endpoint(ip(SG_ADDR["sg1"]), 4500))
    assert core.next_deadline() is None
    mn = ip("10.1.0.2")
    assert core.next_ctar_seq(mn) == 1
    core.ctar_seq[mn] = 41
    assert core.next_ctar_seq(mn) == 42
    core.ctar_seq[mn] = 0xFFFFFFFE
    assert core.next_ctar_seq(mn) == 0xFFFFFFFF


# -- a node: one timer, no polling -----------------------------------------------------------


def test_standby_gateway_wakes_for_deadlines_not_to_poll(tmp_path: Path) -> None:
    """sg2 is a fail-over standby with transfer configured: its timer fires for the engine
    (once a second) and the standby's dead-time, not every few milliseconds as the polling
    loops did (a 50 ms transfer poll and a 10 ms fail-over poll)."""

    async def main() -> tuple[set[str], int, float]:
        d = await demo.build(tmp_path, failover=True)
        try:
            await demo_handover.setup(d)
            sg2 = d.services["sg2"].node
            driver = d.services["sg2"].failover
            assert driver is not None and driver.standby is not None
            async with asyncio.timeout(10):
                while driver.standby.last_heard is None:
                    await asyncio.sleep(0.01)
            before = sg2.timers.fired
            t0 = time.monotonic()
            await asyncio.sleep(1.0)
            return set(sg2.timers._clients), sg2.timers.fired - before, time.monotonic() - t0
        finally:
            await asyncio.wait_for(demo.stop(d), 20)

    clients, fired, elapsed = asyncio.run(main())
    assert clients == {"engine", "transfer", "gc", "failover"}
    # at most: the engine and the collector policy once a second each, the dead-time check
    # every dead_ms (500 ms) as the heartbeats push it on, twice that for a slow machine
    assert fired <= 2 * (2 * elapsed / 1.0 + elapsed / 0.5) + 2, fired


def test_standby_takes_over_when_the_channel_goes_silent_without_closing(tmp_path: Path) -> None:
    """A partition: the TLS connection stays open, nothing arrives any more. The standby's
    timer (armed by the syncs it received, not by a lost connection) fires the take-over."""

    async def main() -> float | None:
        d = await demo.build(tmp_path, failover=True)
        try:
            await demo_handover.setup(d)
            driver = d.services["sg2"].failover
            assert driver is not None and driver.standby is not None
            sb = driver.standby
            await eventually(lambda: sb.replica, "the tunnel replicated")
            for g in ("sg1", "sg2"):  # both ways, the channel drops everything
                peers = d.services[g].peers
                assert peers is not None
                peers.send = lambda peer, msg: None  # type: ignore[method-assign]
            await eventually(lambda: sb.took_over is not None, "the take-over", 10)
            return sb.took_over
        finally:
            await asyncio.wait_for(demo.stop(d), 20)

    assert asyncio.run(main()) is not None

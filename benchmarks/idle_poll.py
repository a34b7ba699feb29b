"""What fail-over replication costs an active whose tunnels are idle (eighth session, replpoll).

1. ``poll``: one ``Replicator.poll`` over N idle tunnels (the engine of ``ipsecct bench
   failover``: AES-GCM-16, ESN, native data path when built), after the whole state was
   sent and acknowledged: CPU per poll (``time.thread_time``, the mean of ``--polls``);
   ``--busy K``: K of them carry a packet before every poll (the Python path; ``--via
   engine``: through ``Engine.outbound``, the native path when built), ``--warm``: their
   SAs are on the native path.
2. ``gateway``: the in-process demo pair (``ipsecct.demo.topology``, real TLS between sg1
   and sg2, one event loop) with N more tunnels at the active sg1, once the standby holds
   them all: the loop thread's CPU per second over ``--seconds`` (the standby's side of the
   heartbeats included, it runs on the same loop), and the latency of ``status`` asked on a
   control socket of sg1's (the client on the same loop: the answer waits for whatever the
   loop is busy with), ``--probes`` times, spread over the same seconds, and the CPU of each
   replication poll in the loop (``poll_ms_*``; the loop's CPU per poll: all it did divided
   by the polls it made, which a starved process still shows); ``--busy K``: K
   of those tunnels carry a packet every 10 ms (through ``Engine.outbound``: the native
   path when built), on the same loop.

    .venv/bin/python benchmarks/idle_poll.py --tunnels 10000 [--mode poll|gateway|both]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ipsecct.bench.failover import _cfg, _packet, build
from ipsecct.ct import cxtp, failover
from ipsecct.ct.transfer import Identity
from ipsecct.ipsec import processing
from ipsecct.ipsec.ippacket import build_udp


def poll_cost(
    n: int, polls: int, warm: bool, busy: int = 0, via: str = "python"
) -> dict[str, Any]:
    from ipsecct.ipsec.engine import Engine
    from ipsecct.ipsec.ippacket import Endpoint

    gw, _peer = build(n)
    rep = failover.Replicator(gw, _cfg("active", "sg2"))
    sb = failover.Standby(
        Engine(ipaddress.ip_address("127.0.5.2")),
        _cfg("standby", "sg1"),
        Endpoint(ipaddress.ip_address("127.0.5.2"), 4500),
        Identity.DIRECT,
    )
    now = 1000.0
    if warm:  # their SAs on the native path (when built), as after their first packets
        from ipsecct.ipsec import native

        for t in gw.tunnels():
            for sa in t.sas():
                native.push(sa, seq_ceiling=t.send_limit)
    for m in rep.poll(now):
        d = cxtp.decode(cxtp.encode(m))
        assert isinstance(d, cxtp.CTD)
        for r in sb.receive(d, now):
            rep.receive(cxtp.decode(cxtp.encode(r)), now)
    times = []
    sent = 0
    tunnels = gw.tunnels()[:busy]
    for _ in range(polls):
        now += 0.01
        for i, t in enumerate(tunnels):  # one packet each, not timed
            if via == "engine":
                gw.outbound(_packet(i), now)
            else:
                processing.tunnel_encapsulate(t.outbound, _packet(i), now)
        t0 = time.thread_time()
        msgs = rep.poll(now)
        times.append(time.thread_time() - t0)
        sent += len(msgs)
    return {
        "tunnels": n,
        "busy": busy,
        "polls": polls,
        "poll_ms_mean": round(statistics.mean(times) * 1000, 3),
        "poll_ms_median": round(statistics.median(times) * 1000, 3),
        "messages": sent,
        "via": via,
        "native": any(sa.native is not None and sa.native.active
                      for t in gw.tunnels()[:1] for sa in t.sas()),
    }


async def _gateway(
    n: int, seconds: float, probes: int, workdir: Path, busy: int = 0
) -> dict[str, Any]:
    from ipsecct.bench.transfer import make_tunnel
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway.control import ControlServer, request_async

    d = await demo.build(workdir, failover=True)
    server = None
    traffic: asyncio.Task[None] | None = None
    try:
        eng = d.gateways["sg1"].node.engine
        for i in range(n):
            make_tunnel(eng, i, demo.ADDRESS["sg1"], demo.ADDRESS["mn"])
        services = d.services
        await demo_handover.setup(d)  # (the standby listens before its active calls)
        active, driver = services["sg1"].failover, services["sg2"].failover
        assert active is not None and driver is not None
        rep, sb = active.replicator, driver.standby
        assert rep is not None and sb is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while len(sb.replica) < n + 1 or rep.acks == 0:
            if loop.time() > deadline:
                raise RuntimeError("the standby did not get the whole state")
            await asyncio.sleep(0.05)
        # settle: the first FULL and its acknowledgements are behind us
        settle = loop.time() + 1.0
        while loop.time() < settle:
            await asyncio.sleep(0.05)
        path = str(workdir / "sg1.ctl")
        server = ControlServer(path)
        server.register("status", services["sg1"]._status)
        await server.start()
        node = d.gateways["sg1"].node
        pkts = [
            bytes(build_udp(ipaddress.ip_address("10.2.0.1"),
                            ipaddress.ip_address("10.64.0.0") + i, 7000, 7000, b"x" * 32))
            for i in range(busy)
        ]  # fmt: skip

        async def send() -> None:  # a packet on each busy tunnel every 10 ms
            while True:
                now = node.clock()
                for p in pkts:
                    eng.outbound(p, now)
                await asyncio.sleep(0.01)

        if busy:
            traffic = asyncio.ensure_future(send())
            await asyncio.sleep(1.0)  # their first packets replicated, as in steady state
        polls0 = rep.messages
        # The replication polls themselves: their CPU each (what the loop spends on them,
        # whatever share of a core the process gets: at a high load average the loop's CPU
        # per second is bounded by that share, not by what it would use)
        poll_cpu: list[float] = []
        inner_poll = rep.poll

        def timed_poll(now: float, budget: int | None = None) -> list[cxtp.Message]:
            t0 = time.thread_time()
            try:
                return inner_poll(now, budget)
            finally:
                poll_cpu.append(time.thread_time() - t0)

        rep.poll = timed_poll  # type: ignore[method-assign]
        cpu0, wall0 = time.thread_time(), loop.time()
        lat: list[float] = []
        gap = seconds / probes
        for _ in range(probes):
            t0 = loop.time()
            await request_async(path, "status")
            lat.append(loop.time() - t0)
            rest = gap - (loop.time() - t0)
            if rest > 0:
                await asyncio.sleep(rest)
        cpu, wall = time.thread_time() - cpu0, loop.time() - wall0
        own = []
        for _ in range(5):  # the handler's own CPU (not waiting for the loop)
            t0 = time.thread_time()
            await services["sg1"]._status({})
            own.append(time.thread_time() - t0)
        return {
            "tunnels": n,
            "busy": busy,
            "seconds": round(wall, 2),
            "loop_cpu_per_s": round(cpu / wall, 3),
            "sync_messages_per_s": round((rep.messages - polls0) / wall, 1),
            "polls": len(poll_cpu),
            "poll_ms_mean": round(statistics.mean(poll_cpu) * 1000, 3) if poll_cpu else None,
            "poll_ms_median": round(statistics.median(poll_cpu) * 1000, 3) if poll_cpu else None,
            "loop_cpu_ms_per_poll": round(cpu / max(1, len(poll_cpu)) * 1000, 3),
            "status_ms_median": round(statistics.median(lat) * 1000, 2),
            "status_ms_max": round(max(lat) * 1000, 2),
            "probes": probes,
            "status_handler_ms": round(statistics.median(own) * 1000, 2),
        }
    finally:
        if traffic is not None:
            traffic.cancel()
        if server is not None:
            await server.stop()
        await asyncio.wait_for(demo.stop(d), 60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tunnels", type=int, default=10_000)
    ap.add_argument("--polls", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--probes", type=int, default=40)
    ap.add_argument("--busy", type=int, default=0, help="tunnels with a packet every poll")
    ap.add_argument("--warm", action="store_true", help="one packet per tunnel first")
    ap.add_argument("--via", choices=("python", "engine"), default="python",
                    help="poll mode: how the busy tunnels' packets go")  # fmt: skip
    ap.add_argument("--mode", choices=("poll", "gateway", "both"), default="both")
    a = ap.parse_args()
    out: dict[str, Any] = {}
    if a.mode in ("poll", "both"):
        out["poll"] = poll_cost(a.tunnels, a.polls, a.warm, a.busy, a.via)
    if a.mode in ("gateway", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            out["gateway"] = asyncio.run(
                _gateway(a.tunnels, a.seconds, a.probes, Path(tmp), a.busy)
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""The demo's handover and fail-over, run half-way through the stream.

Every gateway of the demo runs real context transfer (its service's
:class:`~ipsecct.gateway.transfer_service.TransferService`: TLS 1.3 with mutual certificate
authentication between the gateways, on loopback) and the mobile node runs the
:class:`~ipsecct.gateway.mobile_agent.MobileAgent`. Half-way through the stream the operator's
``ipsecct transfer`` is issued on sg1 (make-before-break): by default prepared a second
ahead (``transfer --prepare``) and committed at the handover (``transfer --commit``), RFC
4067's predictive context transfer; with ``--reactive`` the whole transfer at the handover.
With ``--failover`` sg1 is killed instead and its standby takes over.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..ct.transfer import Record
from ..errors import ControlError, DemoError
from ..gateway.transfer_service import TransferService
from .processes import GatewayProcess
from .topology import Demo


def transfer_service(demo: Demo, gateway: str) -> TransferService:
    ts = demo.services[gateway].transfer
    assert ts is not None, f"{gateway} runs no context transfer"
    return ts


async def setup(demo: Demo, timeout: float = 15.0) -> None:
    """Start context transfer on every gateway and open the inter-gateway connections now:
    a handover reuses them (no TLS handshake). Gateways in processes of their own started
    theirs and connect by themselves: wait until each has its peers connected."""
    if demo.procs:
        await _peers_connected(demo, timeout)
        return
    for svc in reversed(demo.services.values()):  # a standby listens before its active calls
        await svc.start_context_transfer()
    for svc in demo.services.values():
        assert svc.peers is not None
        await svc.peers.connect_all()


async def _peers_connected(demo: Demo, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting: list[str] = list(demo.procs)
    while True:
        waiting = []
        for name, p in demo.procs.items():
            st = await _ask(p, "status")
            if not all(peer["connected"] for peer in st["peers"]):
                waiting.append(name)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise DemoError(
                f"gateway(s) {', '.join(waiting)} did not connect to their peers within"
                f" {timeout:g} s (their logs: "
                + "; ".join(f"{n}: {demo.procs[n].tail()}" for n in waiting)
                + ")"
            )
        await asyncio.sleep(0.05)


async def _ask(p: GatewayProcess, cmd: str, args: dict[str, Any] | None = None,
               timeout: float = 10.0) -> Any:  # fmt: skip
    """A control request to a gateway of the demo; what fails is a DemoError (one line)."""
    try:
        return await p.request(cmd, args, timeout=timeout)
    except ControlError as exc:
        raise DemoError(f"gateway {p.name}: {cmd}: {exc}") from None


async def handover(demo: Demo, mode: str) -> None:
    if demo.procs:
        await _handover_processes(demo, mode)
        return
    src, dst = "sg1", "sg2"
    loop = asyncio.get_running_loop()
    activated: asyncio.Future[Record] = loop.create_future()
    cpu: list[float] = []

    def on_target(rec: Record) -> None:
        if rec.role == "target" and rec.outcome == "committed" and not activated.done():
            cpu.append(time.thread_time())  # on the loop's thread, as the target activates
            # The access network now routes the MN's traffic to the new gateway (and, for
            # indirect identity, the virtual address moves with it).
            demo.host_route(dst)
            activated.set_result(rec)

    transfer_service(demo, dst).listeners.append(on_target)
    source = transfer_service(demo, src)
    tunnel = source.node.engine.tunnels()[0]
    demo.watch_gaps()
    c0 = time.thread_time()
    t0 = time.monotonic()
    done = await source.transfer([tunnel.outbound.spi], dst)
    if done.outcome != "committed":
        raise DemoError(
            f"the handover {src} -> {dst} did not commit: {done.outcome}"
            + (f" ({done.detail})" if done.detail else "")
        )
    rec = await asyncio.wait_for(activated, 5)
    demo.handover_times.append((t0, rec.ended))
    entry: dict[str, Any] = {
        "from": src,
        "to": dst,
        "mode": mode,
        "transfer_ms": round((rec.ended - t0) * 1000, 3),
        "gap_ms": None,
        "lost": None,
        # The event loop's CPU time over transfer_ms (the MN's, both gateways' and the
        # stream's applications' work; not the forwarding and state-writer threads): on a
        # busy machine, what the handover waited for is transfer_ms minus this.
        "transfer_cpu_ms": round((cpu[0] - c0) * 1000, 3),
        "context_transfer": "reactive",  # (nothing prepared ahead)
    }
    demo.handovers.append(entry)


async def _tunnel_spi(p: GatewayProcess) -> Any:
    sas = await _ask(p, "sa.list")
    # (Every SA's summary says what its tunnel is doing: one installed here, not one being
    # moved or held.)
    spi = next((x["spi"] for x in sas
                if x["direction"] == "out" and x.get("state", "installed") == "installed"),
               None)  # fmt: skip
    if spi is None:
        raise DemoError(f"{p.name} has no tunnel to hand over")
    return spi


async def prepare(demo: Demo) -> tuple[str, float]:
    """``--prepared``: ``ipsecct transfer SPI --to sg2 --prepare`` on sg1, ahead of the
    handover (the tunnel goes on at sg1 meanwhile: make-before-break): its id and how long
    the preparation took (ms)."""
    if not demo.procs:
        raise DemoError("a prepared handover needs the gateways' processes")
    s = demo.procs["sg1"]
    spi = await _tunnel_spi(s)
    t0 = time.monotonic()
    done = await _ask(s, "transfer", {"spi": spi, "to": "sg2", "mode": "predictive",
                                      "prepare": True}, timeout=60)  # fmt: skip
    if done["outcome"] != "prepared":
        raise DemoError(
            f"the transfer sg1 -> sg2 was not prepared: {done['outcome']}"
            + (f" ({done['detail']})" if done.get("detail") else "")
        )
    return str(done["id"]), round((time.monotonic() - t0) * 1000, 3)


async def _handover_processes(demo: Demo, mode: str) -> None:
    """The handover as an operator makes it: ``ipsecct transfer SPI --to sg2`` on sg1's
    control socket. Its time runs from the request to the target's activation, as sg2's
    own transfer record gives it (``transfer.wait``; ``time.monotonic`` is one clock for
    every process of the machine); once it is active the access network routes the MN's
    traffic to sg2."""
    src, dst = "sg1", "sg2"
    s, d = demo.procs[src], demo.procs[dst]
    prepared: tuple[str, float] | None = None
    if demo.prepared is not None:
        # Prepared ahead (--prepared): the trigger is the commit of that transfer, and the
        # handover's time runs from it.
        prepared = await demo.prepared
        request: tuple[str, dict[str, Any]] = ("transfer.commit", {"id": prepared[0]})
    else:
        spi = await _tunnel_spi(s)
        request = ("transfer", {"spi": spi, "to": dst, "mode": "predictive"})
    since = time.monotonic()

    async def activated() -> Any:
        rec = await _ask(d, "transfer.wait", {"role": "target", "since": since, "timeout": 30},
                         timeout=35)  # fmt: skip
        demo.host_route(dst)  # the access network's route follows at once
        return rec

    # The wait is sent first: sg2 takes it in (a connection, a request) before the two
    # clock round trips end, not on its loop during the transfer.
    target = asyncio.ensure_future(activated())
    try:
        c_src, c_dst = await _ask(s, "clock"), await _ask(d, "clock")
        demo.watch_gaps()
        t0 = time.monotonic()
        done = await _ask(s, *request, timeout=60)
        if done["outcome"] != "committed":
            raise DemoError(
                f"the handover {src} -> {dst} did not commit: {done['outcome']}"
                + (f" ({done['detail']})" if done.get("detail") else "")
            )
        rec = await target
    finally:
        target.cancel()
    own = await _ask(s, "transfer.wait", {"role": "source", "since": t0, "timeout": 5})
    demo.handover_times.append((t0, float(rec["ended"])))
    cpu = None
    if rec.get("cpu_s") is not None and own.get("cpu_s") is not None:
        cpu = (rec["cpu_s"] - c_dst["cpu_s"]) + (own["cpu_s"] - c_src["cpu_s"])
    entry: dict[str, Any] = {
        "from": src,
        "to": dst,
        "mode": mode,
        "transfer_ms": round((float(rec["ended"]) - t0) * 1000, 3),
        "gap_ms": None,
        "lost": None,
        # The gateways' event-loop CPU time, each from just before the request until its
        # own record ended (the target's at its activation, the source's at the commit's
        # acknowledgement): the work the handover took; not the forwarding and
        # state-writer threads, nor the MN's and the stream's in this process.
        "transfer_cpu_ms": None if cpu is None else round(cpu * 1000, 3),
        # RFC 4067's terms: predictive, prepared ahead and committed at the handover (the
        # default); reactive, the whole transfer at the handover (--reactive)
        "context_transfer": "reactive" if prepared is None else "predictive",
    }
    if prepared is not None:
        # transfer_ms (and the CPU time) run from the commit; the preparation apart
        entry["prepared"] = True
        entry["prepare_ms"] = prepared[1]
        entry["prepared_ahead_s"] = demo.prepare_ahead
        # of transfer_ms: until sg1 sent the FINAL and COMMIT (the control request and the
        # commit call), the rest being their way to sg2 and its activation
        entry["commit_sent_ms"] = round((float(own["ended"]) - t0) * 1000, 3)
    demo.handovers.append(entry)


async def _failover_processes(demo: Demo) -> None:
    """SIGKILL to sg1's process (no goodbye, nothing flushed); sg2, its standby, notices
    the silence after the detection time and takes over with the replicated contexts, as
    its take-over record says.

    sg2 may have taken over already: a loaded machine that did not run sg1 for the detection
    time made it as silent as a dead one. sg1, run again, finds itself superseded, sends
    nothing more and becomes sg2's standby (docs/cluster.md). That is the run's fail-over: the
    entry says so (``taken_over_before_kill``) and is timed from the take-over's start, and
    sg1 is not killed (sg2 would lose its standby, and with it the lease it sends under).
    Waiting for a take-over after the kill waited 30 s for one that never came."""
    from .topology import read_status

    d = demo.procs["sg2"]
    await read_status(demo)  # sg1's last counters (it will not answer again)
    demo.watch_gaps()
    early = (await _ask(d, "status")).get("failover", {}).get("role") != "standby"
    t0 = time.monotonic()
    # sg2's first take-over in this run (its gateways are the run's own), also one before t0
    waiter = asyncio.ensure_future(
        _ask(d, "transfer.wait", {"role": "standby", "since": 0.0, "timeout": 30}, timeout=35)
    )
    try:
        if not early:
            demo.procs["sg1"].kill()
        rec = await waiter
    finally:
        waiter.cancel()
    demo.host_route("sg2")
    started, ended = float(rec["started"]), float(rec["ended"])
    trigger = min(t0, started)  # (the kill, or a take-over under way or done before it)
    demo.handover_times.append((trigger, ended))
    demo.handovers.append(
        {
            "from": "sg1",
            "to": "sg2",
            "mode": "failover",
            "transfer_ms": round((ended - trigger) * 1000, 3),
            "gap_ms": None,
            "lost": None,
            "taken_over_before_kill": early,
        }
    )


async def failover(demo: Demo, mode: str) -> None:
    """Kill sg1 (its sockets and channels close, no goodbye); sg2, its standby, notices the
    silence after the detection time and takes over with the replicated contexts."""
    if demo.procs:
        await _failover_processes(demo)
        return
    loop = asyncio.get_running_loop()
    took_over: asyncio.Future[Record] = loop.create_future()

    def on_takeover(rec: Record) -> None:
        if rec.role == "standby" and not took_over.done():
            demo.host_route("sg2")
            took_over.set_result(rec)

    transfer_service(demo, "sg2").listeners.append(on_takeover)
    demo.watch_gaps()
    t0 = time.monotonic()
    await demo.services["sg1"].stop_context_transfer()
    await demo.gateways["sg1"].node.stop()
    rec = await asyncio.wait_for(took_over, 10)
    demo.handover_times.append((t0, rec.ended))
    demo.handovers.append(
        {
            "from": "sg1",
            "to": "sg2",
            "mode": "failover",
            "transfer_ms": round((rec.ended - t0) * 1000, 3),
            "gap_ms": None,
            "lost": None,
        }
    )

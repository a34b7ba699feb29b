"""Two ways of running the same handover, compared in one run under traffic (issue 11).

The demo's topology (the MN, two gateways, TLS 1.3 on loopback, durable state in the run's
work directory) carries the demo's stream (``--rate`` packets/s each way; 0: none, as in
``bench transfer``) while one tunnel moves back and forth between the gateways. Rounds
alternate (there and back each) between variant A and variant B, so both see the same load
on a shared machine:

- ``--compare wakeup``: A wakes the state's writer thread at every ownership write as it is
  submitted (before: the target's CTDR and the mobile node's signal left after it); B is
  the gateway as it runs (only the writes waited for next wake it at once, the others after
  the loop's current callback).
- ``--compare settle``: A hands a write's outcome from the writer's thread back to the loop
  through ``run_in_executor``'s future (before: settled by a first callback, whose
  done-callback then ran one loop iteration later); B as the gateway runs (one callback).
- ``--compare merge``: A merges the source's final inbound window into the target's number
  by number (before), B merges whole bitmaps (as the gateway runs); the stream keeps the
  1024-packet windows full.
- ``--compare gil``: A runs with CPython's default GIL switch interval (5 ms), B with
  ``--interval``.

Printed (JSON): for each variant, the median handover time (trigger to target active), the
median loop-thread CPU time per handover, and the median longest pause of the stream around
each handover (from the trigger until 50 ms after the target is active).

    .venv/bin/python benchmarks/handover_ab.py [--compare wakeup|settle|merge|gil] [--pairs 10] \
        [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _variant(compare: str, b: bool, interval: float, default: float) -> None:
    from ipsecct.gateway.state import DurableState

    if compare == "gil":
        sys.setswitchinterval(interval if b else default)
    elif compare == "merge":
        from ipsecct.ipsec.replay import ReplayWindow

        ReplayWindow.merge = _MERGE if b else _merge_by_number  # type: ignore[method-assign,assignment]
    elif compare == "settle":
        DurableState._wake_writer = _WAKE if b else _chained  # type: ignore[method-assign]
    else:
        DurableState._submit = _SUBMIT if b else _urgent  # type: ignore[method-assign]


def _urgent(self: Any, rows: Any, then: Any = None, *, urgent: bool = True, **kw: Any) -> Any:
    """Every write wakes the writer as it is submitted (variant A of ``wakeup``)."""
    return _SUBMIT(self, rows, then, urgent=True, **kw)


def _chained(self: Any) -> None:
    """The write's outcome through run_in_executor's future (variant A of ``settle``)."""
    job = self._loop.run_in_executor(self._writer, self._write_batch, [])
    job.add_done_callback(lambda f: self._written(f.result()))


def _merge_by_number(w: Any, top: int, bitmap: bytes) -> None:
    """The merge before whole bitmaps (variant A of ``merge``): each number the other state
    marks, checked and marked one by one in the window with the higher top."""
    other = type(w)(w.size, esn=w.esn)
    other.restore(top, bitmap)
    high, low = (other, w) if other.top > w.top else (w, other)
    ltop, lbits = low.snapshot()
    bits = int.from_bytes(lbits, "little")
    while bits:
        lowest = bits & -bits
        seq = ltop - (lowest.bit_length() - 1)
        if high.check(seq):
            high.update(seq)
        bits ^= lowest
    if high is not w:
        w.restore(*high.snapshot())


_SUBMIT: Any = None
_WAKE: Any = None
_MERGE: Any = None


async def _run(compare: str, pairs: int, interval: float, rate: int) -> dict[str, Any]:
    global _SUBMIT, _WAKE, _MERGE
    from ipsecct.ct.transfer import Record
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway.state import DurableState

    default = sys.getswitchinterval()
    _SUBMIT = DurableState._submit
    _WAKE = DurableState._wake_writer
    from ipsecct.ipsec.replay import ReplayWindow

    _MERGE = ReplayWindow.merge
    with tempfile.TemporaryDirectory(prefix="ipsecct-bench-") as tmp:
        dm = await demo.build(Path(tmp), keying="manual")
        try:
            await demo_handover.setup(dm)
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            loop = asyncio.get_running_loop()
            # Long enough for every round; cancelled once they are done.
            streaming = None
            if rate:
                streaming = asyncio.create_task(demo.stream(dm, rate, 3600.0, out=None))
            await asyncio.sleep(0.5)

            failed: list[str] = []

            async def move(src: str, dst: str) -> tuple[float, float, float] | None:
                fut: asyncio.Future[Record] = loop.create_future()

                def cb(rec: Record) -> None:
                    if rec.role == "target" and rec.outcome == "committed" and not fut.done():
                        dm.host_route(dst)
                        fut.set_result(rec)

                ts[dst].listeners.append(cb)
                try:
                    spi = ts[src].node.engine.tunnels()[0].outbound.spi
                    dm.watch_gaps()
                    c0 = time.thread_time()
                    t0 = time.monotonic()
                    srec = await ts[src].transfer([spi], dst, timeout=120)
                    if srec.outcome != "committed":  # e.g. timed out on a loaded machine
                        failed.append(f"{srec.outcome}: {srec.detail}")
                        await asyncio.sleep(0.5)
                        return None
                    rec = await asyncio.wait_for(fut, 120)
                    cpu = time.thread_time() - c0
                    await asyncio.sleep(0.3)  # the MN follows; the window closes
                    hi = rec.ended + demo.SETTLE
                    gap = max(a.net.longest_gap(t0, hi) for a in (dm.host_app, dm.mn_app))
                    return (rec.ended - t0) * 1000, cpu * 1000, gap * 1000
                finally:
                    ts[dst].listeners.remove(cb)

            res: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
            for i in range(2 * pairs):
                which = "B" if i % 2 else "A"
                _variant(compare, which == "B", interval, default)
                for _ in range(2):
                    src = next(g for g, t in ts.items() if t.node.engine.tunnels())
                    dst = "sg2" if src == "sg1" else "sg1"
                    if (r := await move(src, dst)) is not None:
                        res[which].append(r)
            if streaming is not None:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
        finally:
            _variant(compare, True, default, default)
            await demo.stop(dm)
    out: dict[str, Any] = {"compare": compare, "rate": rate}
    if compare == "gil":
        out.update({"A_interval_s": default, "B_interval_s": interval})
    for k, v in res.items():
        out[f"{k}_handover_ms"] = round(statistics.median(x[0] for x in v), 3)
        out[f"{k}_loop_cpu_ms"] = round(statistics.median(x[1] for x in v), 3)
        out[f"{k}_gap_ms"] = round(statistics.median(x[2] for x in v), 3) if rate else None
    out["handovers"] = sum(len(v) for v in res.values())
    out["failed"] = len(failed)
    out["load"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--compare", choices=("wakeup", "settle", "merge", "gil"), default="wakeup")
    ap.add_argument("--pairs", type=int, default=10, help="pairs of rounds (10)")
    ap.add_argument("--interval", type=float, default=0.0005, help="switch interval, s")
    ap.add_argument("--rate", type=int, default=1000, help="stream packets/s each way (1000)")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(_run(args.compare, args.pairs, args.interval, args.rate))))


if __name__ == "__main__":
    main()

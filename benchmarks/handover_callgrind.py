"""Instructions of one single-tunnel reactive handover (``bench transfer``'s ``handover_ms``
case), counted by callgrind: both gateways and the writers' threads, one process.

The demo's topology as ``ipsecct bench transfer`` builds it; ``--handovers`` handovers back
and forth, the first ``--warm`` not counted; collection is switched on right before each
counted trigger and off when the target reports its activation (the handover's own work,
not the sleep between them). Under valgrind everything runs 50-100x slower, so time-outs are
stretched and the time-driven work (the engine's sweep, expiry of moved tunnels, the
collector's sweep) is left out, as ``benchmarks/bulk_callgrind.py`` does:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        .venv/bin/python benchmarks/handover_callgrind.py [--handovers 24] [--warm 4]

It prints the instructions per handover, all threads and the event loop's (main) thread.
What still fires by the clock is inflated as much: the transfer core's housekeeping (every
0.5 s) and the collector's timer fire about 4 times a handover under valgrind, about once in
40 handovers in real time (about 0.5 M instructions a handover of the count, the same in
both trees of an A/B; benchmarks/README.md, "handcpu, eleventh session").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
from pathlib import Path


def _callgrind(*args: str) -> str:
    return subprocess.run(
        ["callgrind_control", *args, str(os.getpid())], capture_output=True, text=True, check=True
    ).stdout


def _instructions() -> tuple[int, int]:
    """Instructions collected so far: all threads, and the main thread's (the event loop's;
    callgrind_control -e prints one line per thread, "Th N  count", the main thread 1)."""
    total, main, seen = 0, 0, False
    for line in _callgrind("-e").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "Th":
            n = int(parts[2].replace(",", ""))
            total += n
            main += n if parts[1] == "1" else 0
            seen = True
    if not seen:
        raise SystemExit("cannot read callgrind's counts: run under valgrind --tool=callgrind")
    return total, main


async def main(handovers: int, warm: int) -> None:
    from ipsecct.bench.transfer import handover
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway import gcpolicy
    from ipsecct.ipsec.engine import Engine

    Engine.TIMER_INTERVAL = 1e9
    Engine.expire_moved = lambda self, now: []  # type: ignore[method-assign]
    gcpolicy.GcPolicy.maintain = lambda self, busy: False  # type: ignore[method-assign]
    counted = [0, 0]
    with tempfile.TemporaryDirectory(prefix="ipsecct-handover-cg-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm, 600.0)
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            for s in ts.values():
                st = s.core.settings
                st.max_transfer_time = st.retry = st.retry_max = st.forward_time = 600.0
            gcpolicy.POLICY.settle()
            marks: list[tuple[int, int]] = []

            def off() -> None:
                if marks:
                    marks.append(_instructions())
                    _callgrind("-i", "off")

            for i in range(handovers):
                src, dst = ("sg1", "sg2") if i % 2 == 0 else ("sg2", "sg1")
                spi = ts[src].node.engine.tunnels()[0].outbound.spi
                marks.clear()
                if i >= warm:
                    _callgrind("-i", "on")
                    marks.append(_instructions())
                await handover(ts, src, dst, [spi], off)
                if i >= warm:
                    counted[0] += marks[1][0] - marks[0][0]
                    counted[1] += marks[1][1] - marks[0][1]
                await asyncio.sleep(0.05)
        finally:
            await demo.stop(dm)
    n = handovers - warm
    print(
        f"instructions per handover: {counted[0] / n:,.0f}, of which the event loop's thread"
        f" {counted[1] / n:,.0f} ({n} handovers)"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--handovers", type=int, default=24)
    ap.add_argument("--warm", type=int, default=4)
    a = ap.parse_args()
    asyncio.run(main(a.handovers, a.warm))

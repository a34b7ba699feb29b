"""The event loop's CPU time (``time.thread_time`` of the loop's thread: both gateways run in
it) per single-tunnel reactive handover, from the trigger until the target reports its
activation, as ``ipsecct bench transfer`` runs it (the demo's topology in one process, TLS
1.3 on loopback, durable state in a temporary directory); ``--handovers`` back and forth,
the first 4 left out; median and mean in microseconds. Load inflates CPU time far less than
wall time; run it in two trees (``PYTHONPATH=TREE/src``), alternated, to compare them:

    .venv/bin/python benchmarks/handover_cpu.py [--handovers 204]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path


def _stamp(into: list[float]) -> None:
    into.append(time.thread_time())


async def main(handovers: int) -> dict[str, float]:
    from ipsecct.bench.transfer import handover
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway import gcpolicy

    cpu: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ipsecct-handover-cpu-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm)
            gcpolicy.POLICY.settle()
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            for i in range(handovers):
                src, dst = ("sg1", "sg2") if i % 2 == 0 else ("sg2", "sg1")
                spi = ts[src].node.engine.tunnels()[0].outbound.spi
                end: list[float] = []
                t0 = time.thread_time()
                await handover(ts, src, dst, [spi], functools.partial(_stamp, end))
                if i >= 4:
                    cpu.append((end[0] - t0) * 1e6)
                await asyncio.sleep(0.005)
        finally:
            await demo.stop(dm)
    return {
        "handover_cpu_us_median": round(statistics.median(cpu), 1),
        "handover_cpu_us_mean": round(statistics.fmean(cpu), 1),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handovers", type=int, default=204)
    print(json.dumps(asyncio.run(main(ap.parse_args().handovers))))

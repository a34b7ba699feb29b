"""The grant (docs/state.md, "the grant") and lazy writes (``DurableState.lazy_delay``) against
the handover without them, in one run: the demo's topology (two gateways in one process,
TLS 1.3 on loopback, durable state in a temporary directory), ``--handovers`` single-tunnel
handovers back and forth as ``ipsecct bench transfer`` does, the shape switched on both
gateways before each pair of handovers, in turn: ``pending`` (no grant, "given away" and
"taken over" woken after the current callback: the handover before this session),
``grant`` (the grant only) and ``grant_lazy`` (both: the gateway's defaults). Per shape: the
median time from the operator's trigger to the target's activation (what ``bench
transfer``'s handover_ms is the median of), its 90th percentile, and how many handovers the
target activated under the grant.

    .venv/bin/python benchmarks/grant.py [--handovers 90]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any


async def main(handovers: int) -> dict[str, Any]:
    from ipsecct.bench.transfer import handover
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway import gcpolicy
    from ipsecct.gateway.state import LAZY_WRITE_DELAY, DurableState

    arms = ("pending", "grant", "grant_lazy")
    times: dict[str, list[float]] = {a: [] for a in arms}
    granted = {a: 0 for a in arms}
    with tempfile.TemporaryDirectory(prefix="ipsecct-grant-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm)
            gcpolicy.POLICY.settle()
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            for i in range(handovers + 2):
                # on and off in turn; each shape moves both ways (4 handovers a cycle)
                arm = arms[(i // 2) % len(arms)]
                for g in dm.gateways:
                    ts[g].core.settings.grant = arm != "pending"
                    st = ts[g].core.journal
                    assert isinstance(st, DurableState)
                    st.lazy_delay = LAZY_WRITE_DELAY if arm == "grant_lazy" else 0.0
                src, dst = ("sg1", "sg2") if i % 2 == 0 else ("sg2", "sg1")
                spi = ts[src].node.engine.tunnels()[0].outbound.spi
                before = ts[dst].core.counters["granted"]
                _, elapsed = await handover(ts, src, dst, [spi])
                if i >= 2:  # the first two warm the code up
                    times[arm].append(elapsed * 1000)
                    granted[arm] += ts[dst].core.counters["granted"] - before
                await asyncio.sleep(0.005)
        finally:
            await demo.stop(dm)
    return {
        a: {
            "handover_ms": round(statistics.median(times[a]), 3),
            "p90_ms": round(sorted(times[a])[int(0.9 * (len(times[a]) - 1))], 3),
            "granted": granted[a],
            "handovers": len(times[a]),
        }
        for a in arms
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handovers", type=int, default=90)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.handovers))))

"""How long a handover's COMMIT waits for the disk, now that the source writes "leaving"
when the transfer starts (the decision query, docs/state.md), against how long a synced
ownership write takes in the same run (what the COMMIT waited for before: "given away",
submitted when the CTDR came back).

The demo's topology (two gateways in one process, TLS 1.3 on loopback, durable state in a
temporary directory), ``--handovers`` single-tunnel handovers back and forth, as ``ipsecct
bench transfer`` does. For each handover, at the source: the time from the CTDR's arrival to
the COMMIT being sent, not counting the COMMIT's own work (``commit_wait_ms``: 0 when
"leaving" was durable before the CTDR came back), and the time from submitting "leaving"
to its write being settled (``write_ms``).
Printed (JSON): medians and 90th percentiles of both, and how many COMMITs waited at all.

    .venv/bin/python benchmarks/commit_wait.py [--handovers 41]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


async def main(handovers: int) -> dict[str, Any]:
    from ipsecct.ct import transfer as tr
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway.state import DurableState

    ctdr_at: dict[int, float] = {}
    waits: list[float] = []
    submitted: list[tuple[float, Any]] = []  # (when, Write) of "leaving"
    writes: list[float] = []
    orig_commit = tr.TransferCore._commit_when_recorded
    orig_leaving = DurableState.leaving

    def commit_when_recorded(self: Any, og: Any, now: float) -> Any:
        # First call: the CTDR is in. The COMMIT leaves in this call unless the write is
        # not durable yet; then in the call made once it is (settled()).
        first = og.tid not in ctdr_at
        t = ctdr_at.setdefault(og.tid, time.perf_counter())
        out = orig_commit(self, og, now)
        if og.state is tr.OutgoingState.COMMITTED:
            ctdr_at.pop(og.tid)
            waits.append(0.0 if first else (time.perf_counter() - t) * 1000)
        return out

    def leaving(self: Any, tunnels: Any, peer: str, tid: int) -> Any:
        w = orig_leaving(self, tunnels, peer, tid)
        submitted.append((time.perf_counter(), w))
        return w

    def stamp() -> None:
        for item in [s for s in submitted if s[1].settled]:
            submitted.remove(item)
            writes.append((time.perf_counter() - item[0]) * 1000)

    tr.TransferCore._commit_when_recorded = commit_when_recorded  # type: ignore[method-assign]
    DurableState.leaving = leaving  # type: ignore[method-assign, assignment]
    with tempfile.TemporaryDirectory(prefix="ipsecct-commit-wait-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm)
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            for g in dm.gateways:
                st = ts[g].core.journal
                assert isinstance(st, DurableState)
                st.settled_hooks.insert(0, stamp)
            for i in range(handovers):
                src, dst = ("sg1", "sg2") if i % 2 == 0 else ("sg2", "sg1")
                spi = ts[src].node.engine.tunnels()[0].outbound.spi
                rec = await ts[src].transfer([spi], dst, timeout=120)
                if rec.outcome != "committed":
                    raise SystemExit(f"transfer {rec.outcome}: {rec.detail}")
                for _ in range(2000):  # the target activates once its "pending" landed
                    if all(t.state.value == "active" for t in ts[dst].node.engine.tunnels()):
                        break
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.005)
        finally:
            await demo.stop(dm)
    return {
        "handovers": len(waits),
        "commit_wait_ms": {"median": round(statistics.median(waits), 3),
                           "p90": round(_p90(waits), 3)},
        "commits_that_waited": sum(1 for w in waits if w > 0),
        "write_ms": {"median": round(statistics.median(writes), 3),
                     "p90": round(_p90(writes), 3)},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handovers", type=int, default=41)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.handovers))))

"""Commit what you accept (``[transfer] commit_early``, docs/cxtp.md) against the COMMIT
after the CTDR, in one run: the demo's topology (two gateways in one process, TLS 1.3 on
loopback, durable state in a temporary directory), ``--handovers`` single-tunnel handovers
back and forth as ``ipsecct bench transfer`` does, the setting switched on both gateways
before each handover, so that every shape sees the same machine: ``after_ctdr`` (the COMMIT
after the CTDR), ``commit_early`` and ``commit_early_urgent`` (the target's "pending" write
woken at once, ``DurableState.pending_urgent``), in turn; with 3 arms and 2 directions each
arm moves both ways.

Per handover, ms from the operator's trigger: when the source sent its COMMIT
(``commit_sent``), when the target's "pending" write was settled (``pending_settled``),
when the COMMIT reached the target (``commit_at_target``) and when the target activated
the tunnel (``handover``: what ``bench transfer``'s handover_ms is the median of). Printed
(JSON): the median of each per shape, and in how many handovers of each shape activation
waited for "pending" (it settled after the COMMIT came).

    .venv/bin/python benchmarks/commit_early.py [--handovers 42]
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


async def main(handovers: int) -> dict[str, Any]:
    from ipsecct.bench.transfer import handover
    from ipsecct.ct import transfer as tr
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway.state import DurableState

    stamps: dict[str, float] = {}
    pending: list[Any] = []  # the Write of "pending" in this handover
    orig_all = tr.TransferCore._commit_all
    orig_when = tr.TransferCore._commit_when_recorded
    orig_on_commit = tr.TransferCore._on_commit
    orig_arriving = DurableState.arriving

    def commit_all(self: Any, og: Any, now: float) -> Any:
        out = orig_all(self, og, now)
        stamps.setdefault("commit_sent", time.perf_counter())
        return out

    def commit_when(self: Any, og: Any, now: float) -> Any:
        out = orig_when(self, og, now)
        if og.state is tr.OutgoingState.COMMITTED:
            stamps.setdefault("commit_sent", time.perf_counter())
        return out

    def on_commit(self: Any, peer: str, tag: Any, now: float, *rest: Any) -> Any:
        stamps.setdefault("commit_at_target", time.perf_counter())
        return orig_on_commit(self, peer, tag, now, *rest)  # (rest: the COMMIT's grant)

    def arriving(self: Any, tunnels: Any, peer: str, tid: int) -> Any:
        w = orig_arriving(self, tunnels, peer, tid)
        pending.append(w)
        return w

    def stamp() -> None:
        if pending and pending[0].settled:
            pending.clear()
            stamps.setdefault("pending_settled", time.perf_counter())

    tr.TransferCore._commit_all = commit_all  # type: ignore[method-assign]
    tr.TransferCore._commit_when_recorded = commit_when  # type: ignore[method-assign]
    tr.TransferCore._on_commit = on_commit  # type: ignore[method-assign, assignment]
    DurableState.arriving = arriving  # type: ignore[method-assign, assignment]
    arms = ("after_ctdr", "commit_early", "commit_early_urgent")
    rows: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="ipsecct-commit-early-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm)
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            for g in dm.gateways:
                st = ts[g].core.journal
                assert isinstance(st, DurableState)
                st.settled_hooks.insert(0, stamp)
            for i in range(handovers):
                # each arm in turn, both ways (6 handovers a cycle)
                arm = arms[i % 3]
                for g in dm.gateways:
                    ts[g].core.settings.commit_early = arm != "after_ctdr"
                    st = ts[g].core.journal
                    assert isinstance(st, DurableState)
                    st.pending_urgent = arm == "commit_early_urgent"
                src, dst = ("sg1", "sg2") if i % 2 == 0 else ("sg2", "sg1")
                spi = ts[src].node.engine.tunnels()[0].outbound.spi
                stamps.clear()
                pending.clear()
                t0 = time.perf_counter()
                await handover(ts, src, dst, [spi], lambda: stamps.setdefault(  # type: ignore[arg-type]
                    "activated", time.perf_counter()))  # fmt: skip
                await asyncio.sleep(0.005)
                row = {k: (v - t0) * 1000 for k, v in stamps.items()}
                row["handover"] = row.pop("activated")
                rows[arm].append(row)
        finally:
            await demo.stop(dm)

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    out: dict[str, Any] = {}
    for name in arms:
        rs = rows[name]
        keys = ("commit_sent", "commit_at_target", "pending_settled", "handover")
        out[name] = {k: med([r[k] for r in rs if k in r]) for k in keys}
        out[name]["waited_for_pending"] = sum(
            1 for r in rs if r.get("pending_settled", 0) > r.get("commit_at_target", 0)
        )
        out[name]["handovers"] = len(rs)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handovers", type=int, default=42)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.handovers))))

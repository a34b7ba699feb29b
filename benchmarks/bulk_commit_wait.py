"""How long a bulk transfer's COMMIT waits for "leaving" to be durable, and how long that
write takes, in ``ipsecct bench transfer``'s bulk move (two demo gateways in one process, TLS
1.3 on loopback, durable state in a temporary directory, the gateway GC policy on).

Per run, for the bulk move: ``write_ms``, the time from submitting "leaving" (at the
transfer's start) to its write being settled on the loop; ``commit_wait_ms``, the time from
the CTDR's arrival at the source to the COMMIT being sent, not counting the COMMIT's own work
(0 when "leaving" was durable before the CTDR came back); ``put_ms``, how long the writer's
thread spent in the one ``StateStore.put`` that wrote "leaving" (the first put of the bulk
move's rows: the SQLite transaction and its sync, and the waits for the GIL between its
statements, while the loop encodes and installs); the bulk rate (SAs/s) of the run.
Printed (JSON): each run's figures and their medians. The same script measures an older
checkout (``PYTHONPATH=OLD/src``).

    .venv/bin/python benchmarks/bulk_commit_wait.py [--sas 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any


def main(sas: int, runs: int) -> dict[str, Any]:
    from ipsecct.bench import transfer as bench
    from ipsecct.ct import transfer as tr
    from ipsecct.gateway import gcpolicy
    from ipsecct.gateway.state import DurableState, StateStore

    gcpolicy.POLICY.enabled = True
    ctdr_at: dict[int, float] = {}
    waits: list[float] = []
    leaving_at: dict[int, float] = {}  # id(Write) -> when submitted
    writes: list[float] = []
    orig_commit = tr.TransferCore._commit_when_recorded
    orig_leaving = DurableState.leaving
    orig_written = DurableState._settle
    orig_put = StateStore.put
    puts: list[tuple[int, float]] = []  # (rows, ms) of each put

    def put(self: Any, rows: Any, *a: Any, **k: Any) -> Any:
        rows = list(rows)
        t = time.perf_counter()
        try:
            return orig_put(self, rows, *a, **k)
        finally:
            puts.append((len(rows), (time.perf_counter() - t) * 1000))

    def commit_when_recorded(self: Any, og: Any, now: float) -> Any:
        first = og.tid not in ctdr_at
        t = ctdr_at.setdefault(og.tid, time.perf_counter())
        out = orig_commit(self, og, now)
        if og.state is tr.OutgoingState.COMMITTED:
            ctdr_at.pop(og.tid)
            waits.append(0.0 if first else (time.perf_counter() - t) * 1000)
        return out

    def leaving(self: Any, tunnels: Any, peer: str, tid: int) -> Any:
        t = time.perf_counter()
        w = orig_leaving(self, tunnels, peer, tid)
        leaving_at[id(w)] = t
        return w

    def settle(self: Any, batch: Any, error: Any, **kw: Any) -> Any:
        for item in batch:
            t = leaving_at.pop(id(item.write), None)
            if t is not None:
                writes.append((time.perf_counter() - t) * 1000)
        return orig_written(self, batch, error, **kw)

    tr.TransferCore._commit_when_recorded = commit_when_recorded  # type: ignore[method-assign]
    DurableState.leaving = leaving  # type: ignore[method-assign, assignment]
    DurableState._settle = settle  # type: ignore[method-assign]
    StateStore.put = put  # type: ignore[method-assign]
    out: dict[str, list[float]] = {
        "commit_wait_ms": [], "write_ms": [], "put_ms": [], "bulk_sas_per_s": []
    }
    for _ in range(runs):
        waits.clear()
        writes.clear()
        puts.clear()
        _, _, rate = asyncio.run(bench._transfers(1, sas))
        # The last transfer of the run is the bulk move (the first, one handover).
        out["commit_wait_ms"].append(round(waits[-1], 1))
        out["write_ms"].append(round(writes[-1], 1))
        out["put_ms"].append(round(next(ms for n, ms in puts if n >= sas // 2), 1))
        out["bulk_sas_per_s"].append(round(rate))
    return {
        "sas": sas,
        **out,
        "median": {k: statistics.median(v) for k, v in out.items()},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sas", type=int, default=10000, help="SAs in the bulk move (10000)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(main(args.sas, args.runs)))

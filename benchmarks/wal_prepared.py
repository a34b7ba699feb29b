"""A synced one-row ownership write with the write-ahead log prepared at start
(``StateStore.prepare_wal``, as a gateway opens its state) and without (the log grows with
each commit, as it did), with ``--processes`` processes committing at the same moment (two:
the demo's gateways share one disk, and a handover's ``leaving`` and ``pending`` writes meet).

Rounds alternate between the two variants, each round a fresh store per process in a
temporary directory under ``--dir`` (the file system under test), ``--writes`` writes each;
a barrier starts each write in all processes at once. Printed (JSON): per variant, the median
of each round's per-process median write time, in ms, and every round's figures.

    .venv/bin/python benchmarks/wal_prepared.py [--rounds 4] [--writes 40] [--processes 2] \
        [--dir /work/tmp]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any


def _worker(prepared: bool, writes: int, where: str, barrier: Barrier, out: Any) -> None:
    from ipsecct.ct.journal import Owner, SAState
    from ipsecct.gateway import state as state_mod

    d = Path(tempfile.mkdtemp(prefix="ipsecct-wal-", dir=where))
    try:
        store, lock = state_mod.open_store(d / "s", "gw", [], fresh=False)
        if prepared:
            store.prepare_wal()
        times = []
        for i in range(writes):
            row = SAState("f" * 32, "t", 0x1000, "192.0.2.2", True, 1000 + i, Owner.LEAVING)
            barrier.wait()
            t0 = time.perf_counter()
            store.put([row])
            times.append(time.perf_counter() - t0)
        store.close()
        os.close(lock)
        out.put(statistics.median(times) * 1000)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _round(prepared: bool, writes: int, processes: int, where: str) -> list[float]:
    barrier = mp.Barrier(processes)
    out: Any = mp.Queue()
    procs = [
        mp.Process(target=_worker, args=(prepared, writes, where, barrier, out))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [round(out.get(), 3) for _ in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--writes", type=int, default=40)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    rounds: dict[str, list[list[float]]] = {"growing": [], "prepared": []}
    for _ in range(a.rounds):
        for name in rounds:
            rounds[name].append(_round(name == "prepared", a.writes, a.processes, a.dir))
    print(
        json.dumps(
            {
                name: {
                    "median_ms": round(statistics.median(x for r in rs for x in r), 3),
                    "rounds": rs,
                }
                for name, rs in rounds.items()
            }
        )
    )


if __name__ == "__main__":
    main()

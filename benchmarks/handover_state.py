"""What the durable state costs a single handover, measured in one run (issue 11).

The two gateways of ``ipsecct bench transfer`` (the demo's, TLS 1.3 on loopback, their state
in the run's work directory) move one tunnel back and forth. Handovers alternate in pairs
(there and back) between the gateways' durable state on (as they run) and off (the transfer
cores given no journal: nothing recorded, the same code otherwise), so both see the same
load on a shared machine. Printed: the median handover time of each, their difference (what
the state adds to the critical path) and the median of one synced SQLite write in the same
directory, timed between the handovers (what the disk gives right now).

    .venv/bin/python benchmarks/handover_state.py [--pairs 20]

``PYTHONPATH=OTHER/src`` measures another checkout the same way (the script touches only
``TransferCore.journal``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _probe(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
    return conn


def _synced_write(conn: sqlite3.Connection) -> float:
    """Milliseconds of one small synced transaction (WAL, synchronous=FULL), as the state
    makes them."""
    t0 = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT OR REPLACE INTO t VALUES (1, ?)", (os.urandom(16).hex(),))
    conn.execute("COMMIT")
    return (time.perf_counter() - t0) * 1000


async def _run(pairs: int) -> dict[str, Any]:
    from ipsecct.ct.transfer import Record
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo

    with tempfile.TemporaryDirectory(prefix="ipsecct-bench-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm)
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            journals = {g: t.core.journal for g, t in ts.items()}
            if any(j is None for j in journals.values()):
                raise SystemExit("the demo's gateways keep no durable state here")
            loop = asyncio.get_running_loop()

            async def move(src: str, dst: str) -> float:
                fut: asyncio.Future[Record] = loop.create_future()

                def cb(rec: Record) -> None:
                    if rec.role == "target" and rec.outcome == "committed" and not fut.done():
                        fut.set_result(rec)

                ts[dst].listeners.append(cb)
                try:
                    spi = ts[src].node.engine.tunnels()[0].outbound.spi
                    t0 = time.monotonic()
                    srec = await ts[src].transfer([spi], dst, timeout=120)
                    if srec.outcome != "committed":
                        raise SystemExit(f"transfer {srec.outcome}: {srec.detail}")
                    rec = await asyncio.wait_for(fut, 120)
                    return (rec.ended - t0) * 1000
                finally:
                    ts[dst].listeners.remove(cb)

            on: list[float] = []
            off: list[float] = []
            writes: list[float] = []
            probe = _probe(Path(tmp) / "probe.db")
            for i in range(2 * pairs):
                state = i % 2 == 0
                for g, t in ts.items():
                    t.core.journal = journals[g] if state else None
                for src, dst in (("sg1", "sg2"), ("sg2", "sg1")):
                    (on if state else off).append(await move(src, dst))
                    await asyncio.sleep(0.005)
                writes.append(await asyncio.to_thread(_synced_write, probe))
                await asyncio.sleep(0.02)  # let the last "owned" write land
            for g, t in ts.items():
                t.core.journal = journals[g]
            probe.close()
        finally:
            await demo.stop(dm)
    m_on, m_off = statistics.median(on), statistics.median(off)
    return {
        "handover_ms": round(m_on, 3),
        "handover_without_state_ms": round(m_off, 3),
        "state_adds_ms": round(m_on - m_off, 3),
        "synced_write_ms": round(statistics.median(writes), 3),
        "handovers": len(on) + len(off),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20, help="pairs of on/off rounds (20)")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(_run(args.pairs))))


if __name__ == "__main__":
    main()

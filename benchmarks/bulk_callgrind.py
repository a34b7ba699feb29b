"""Instructions per SA of ``ipsecct bench transfer``'s bulk move, counted by callgrind.

Wall-clock rates and even CPU times on the shared 2-vCPU machine follow the load (the same
tree's bulk rate spans 3x within minutes); instruction counts do not. Run under valgrind with
collection off; the script switches it on right before the bulk move (where
``benchmarks/bulk_stages.py`` starts its clocks) and off when the target has activated:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        python benchmarks/bulk_callgrind.py [--sas 10000]

It prints the instructions of the move (both gateways and the writer threads, one process)
per SA. Under valgrind everything runs 50-100x slower, so the time-driven work would fire
50-100x more often than it does: the engine's once-a-second sweep and the expiry of moved
tunnels are left out, and so is the collector's sweep (the count is the per-SA work of the
move itself).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import types
from typing import Any


def _callgrind(*args: str) -> str:
    return subprocess.run(
        ["callgrind_control", *args, str(os.getpid())], capture_output=True, text=True, check=True
    ).stdout


def _instructions() -> int:
    """Instructions collected so far, all threads (callgrind_control -e: one line per
    thread, "Th N  count")."""
    total, seen = 0, False
    for line in _callgrind("-e").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "Th":
            total += int(parts[2].replace(",", ""))
            seen = True
    if not seen:
        raise SystemExit("cannot read callgrind's counts: run under valgrind --tool=callgrind")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sas", type=int, default=10000, help="SAs in the bulk transfer")
    args = ap.parse_args()

    from ipsecct.bench import transfer as bench
    from ipsecct.demo import topology
    from ipsecct.gateway import gcpolicy

    gcpolicy.POLICY.enabled = True
    # The periodic work fires by the clock, and under valgrind a move lasts 50-100x longer:
    # it would run 50-100x more often than in a real move. Left out: the engine's sweep (its
    # first run, at start-up, pushes the next one past the end) and the expiry of moved
    # tunnels; measured on their own (benchmarks/README.md, issue 11 seventh session).
    from ipsecct.ipsec.engine import Engine

    Engine.TIMER_INTERVAL = 1e9
    Engine.expire_moved = lambda self, now: []  # type: ignore[method-assign]
    # Likewise the collector's sweep (gcpolicy.GcPolicy.maintain: due once a second passed
    # with no batch and no transfer in progress on the gateway whose timer asks): under
    # valgrind such a second passes inside the move, a full collection of both gateways'
    # heaps (about 20,000 instructions per SA of a 5,000-SA move) counted or not by where
    # the ticks fell; in a real move it does not happen.
    gcpolicy.GcPolicy.maintain = lambda self, busy: False  # type: ignore[method-assign]
    settles = [0]
    marks: list[int] = []
    settle = gcpolicy.POLICY.settle

    def settle_then_start() -> None:
        settle()
        settles[0] += 1
        if settles[0] % 2 == 0:  # the second settle: right before the bulk move
            _callgrind("-i", "on")
            marks.append(_instructions())

    stop = topology.stop

    async def stop_then_count(dm: Any) -> None:
        marks.append(_instructions())
        _callgrind("-i", "off")
        await stop(dm)

    from ipsecct.demo import handover

    setup = handover.setup

    async def setup_then_slow(dm: Any, timeout: float = 15.0) -> None:
        await setup(dm, 600.0)
        for name in dm.gateways:  # 50-100x slower: no time-out may cut the move short
            s = handover.transfer_service(dm, name).core.settings
            s.max_transfer_time = s.retry = s.retry_max = s.forward_time = 600.0

    handover.setup = setup_then_slow  # type: ignore[assignment]
    wait_for = asyncio.wait_for

    async def wait_longer(fut: Any, timeout: float | None) -> Any:
        return await wait_for(fut, 3600.0)  # (the bench waits 120 s for the target's record)

    bench.asyncio = types.SimpleNamespace(**{**vars(asyncio), "wait_for": wait_longer})  # type: ignore[attr-defined, assignment]
    gcpolicy.POLICY.settle = settle_then_start  # type: ignore[method-assign]
    topology.stop = stop_then_count  # type: ignore[assignment]
    asyncio.run(bench._transfers(1, args.sas))
    print(f"instructions per SA of the bulk move: {(marks[1] - marks[0]) / args.sas:,.0f}")


if __name__ == "__main__":
    main()

"""Where a bulk transfer's CPU goes, stage by stage (issue 11, the transfer path).

Runs ``ipsecct bench transfer``'s bulk move (two demo gateways in one process, TLS 1.3, the
gateway GC policy on, durable state in a temporary directory) and times the functions of each
stage with the CPU time of the thread that runs them (``time.thread_time``): the source's
start (hold, encode, CXTP batching), the target's decode, checks and install, the durable
state's rows (built on the event loop) and its writer thread (SQLite, fsync), the source's
commit, the target's activation. ``TOTAL`` is the process's CPU time (all threads) from the
start of the bulk move to the end of the target's activation, per SA. Stages nest (a total
includes the lines under it); a function that a tree does not have is left out, so the same
script measures an older checkout (``PYTHONPATH=OLD/src``).

    python benchmarks/bulk_stages.py [--sas 10000] [--runs 3]

Medians over the runs. CPU per SA is steadier than the wall-clock rate on a shared machine,
but a loaded machine inflates it too: compare trees in alternating runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

STAGES: list[tuple[str, str, str]] = [
    # (module, "Class.method" or "function", label)
    ("ipsecct.ct.transfer", "TransferCore.start", "src: start (hold, encode, records)"),
    ("ipsecct.ct.transfer", "TransferCore._send_contexts", "src:   encode + CXTP batching"),
    ("ipsecct.ct.transfer", "TransferCore._on_ctdr", "src: CTDR handled (total)"),
    ("ipsecct.ct.transfer", "TransferCore._commit_when_recorded", "src: COMMIT sent (total)"),
    ("ipsecct.ipsec.engine", "Engine.move_tunnels", "src:   move the tunnels (batch)"),
    ("ipsecct.ipsec.engine", "Engine.move_tunnel", "src:   move the tunnels (one by one)"),
    ("ipsecct.ct.transfer", "TransferCore._install", "tgt: decode + checks + install (total)"),
    ("ipsecct.ct.context", "decode", "tgt:   decode (strict, canonical)"),
    ("ipsecct.ct.transfer", "TransferCore._install_one", "tgt:   checks + SAD/SPD install"),
    ("ipsecct.ct.transfer", "TransferCore._flush", "tgt:     batched engine install"),
    ("ipsecct.ct.transfer", "TransferCore._on_commit", "tgt: COMMIT handled (total)"),
    ("ipsecct.ct.transfer", "TransferCore._activate", "tgt: tunnels activated (total)"),
    ("ipsecct.ipsec.engine", "Engine.signal", "tgt:   signal packets (SG_UPDATE)"),
    ("ipsecct.gateway.state", "DurableState.taken_over", "state: taken over (rows + write)"),
    ("ipsecct.gateway.state", "DurableState.given_away", "state: given away (rows + write)"),
    ("ipsecct.gateway.state", "DurableState.arriving", "state: tgt pending rows (loop)"),
    ("ipsecct.gateway.state", "DurableState.arrived", "state: tgt owned rows (loop)"),
    ("ipsecct.gateway.state", "DurableState.leaving", "state: src given-away rows (loop)"),
    ("ipsecct.gateway.state", "DurableState._write_batch", "state: writer thread (SQLite)"),
    ("ipsecct.gateway.state", "StateStore._write", "state:   SQLite transactions"),
    ("ipsecct.ct.cxtp", "decode", "wire: CXTP messages decoded"),
    ("ipsecct.ct.cxtp", "encode", "wire: CXTP messages encoded"),
]


def _install(acc: collections.Counter[str], on: list[bool]) -> None:
    import importlib

    for modname, dotted, label in STAGES:
        mod = importlib.import_module(modname)
        owner: Any = mod
        *path, name = dotted.split(".")
        for p in path:
            owner = getattr(owner, p, None)
        f = getattr(owner, name, None) if owner is not None else None
        if f is None:
            continue

        def wrapped(*a: Any, _f: Callable[..., Any] = f, _l: str = label, **k: Any) -> Any:
            if not on[0]:
                return _f(*a, **k)
            t0 = time.thread_time()
            try:
                return _f(*a, **k)
            finally:
                acc[_l] += time.thread_time() - t0  # type: ignore[assignment]  # (a Counter of seconds)

        setattr(owner, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sas", type=int, default=10000, help="SAs in the bulk transfer")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from ipsecct.bench import transfer as bench
    from ipsecct.demo import topology
    from ipsecct.gateway import gcpolicy

    gcpolicy.POLICY.enabled = True
    acc: collections.Counter[str] = collections.Counter()
    on = [False]
    _install(acc, on)
    results: dict[str, list[float]] = collections.defaultdict(list)
    settles = [0]
    start = [0.0]
    settle = gcpolicy.POLICY.settle

    def settle_then_start() -> None:
        settle()
        settles[0] += 1
        if settles[0] % 2 == 0:  # the second settle of a run: right before the bulk move
            acc.clear()
            on[0] = True
            start[0] = time.process_time()

    stop = topology.stop

    async def stop_then_count(dm: Any) -> None:
        on[0] = False
        results["TOTAL (process CPU, all threads)"].append(
            (time.process_time() - start[0]) / args.sas * 1e6
        )
        for k, v in acc.items():
            results[k].append(v / args.sas * 1e6)
        await stop(dm)

    gcpolicy.POLICY.settle = settle_then_start  # type: ignore[method-assign]
    topology.stop = stop_then_count  # type: ignore[assignment]
    rates = []
    for _ in range(args.runs):
        rates.append(asyncio.run(bench._transfers(1, args.sas))[2])
    print(f"bulk_sas_per_s: {[round(r) for r in rates]}, median {statistics.median(rates):,.0f}")
    order = {label: i for i, (_, _, label) in enumerate(STAGES)}
    for k in sorted(results, key=lambda k: order.get(k, -1)):
        print(f"{statistics.median(results[k]):7.1f} us/SA  {k}")


if __name__ == "__main__":
    main()

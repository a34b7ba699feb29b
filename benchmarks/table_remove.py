"""The native table's ``remove`` (and ``add_flow``) cost per SA, as a bulk move pays it.

A table of ``--sas`` outbound SAs, each with ``--flows-per-sa`` flows (the engine adds one per
flow the Python path sent on), then every SA removed, as ``Engine.move_tunnels`` drops each
SA of a bulk move before it clears the flows. Prints CPU nanoseconds per call
(``time.thread_time``, the median of ``--repeat`` runs) of the adds and of the removals:

    python benchmarks/table_remove.py --sas 10000

Under callgrind, counts instead of times (collection switched on around each phase):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        python benchmarks/table_remove.py --sas 10000 --repeat 1 --callgrind

With ``--engine``, the same through the engine, as a bulk move's source pays it: an Engine
with ``--sas`` tunnels (``bench transfer``'s), each outbound SA and one flow handed to C as the
Python path does after a flow's first packet (``Engine._native_out``: timed too, CPU ns a flow),
a packet sealed in C on each, then ``Engine.move_tunnels`` of them all, timed (CPU ns a tunnel).

Runs with any build of ``ipsecct.ipsec._esp`` (before and after a change: each tree's own).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

# (run as a script: its folder is on sys.path) the counters bulk_callgrind.py reads
from bulk_callgrind import _callgrind, _instructions  # type: ignore[import-not-found]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sas", type=int, default=10000)
    ap.add_argument("--flows-per-sa", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    ap.add_argument("--engine", action="store_true", help="Engine.move_tunnels instead")
    args = ap.parse_args()
    if args.engine:
        engine_move(args.sas, args.repeat)
        return

    from ipsecct.ipsec import _esp  # type: ignore[attr-defined]

    n, fps = args.sas, args.flows_per_sa

    def measure(fn: Callable[[], None]) -> float:
        if args.callgrind:
            _callgrind("-i", "on")
            before = _instructions()
            fn()
            after = _instructions()
            _callgrind("-i", "off")
            return float(after - before)
        t0 = time.thread_time_ns()
        fn()
        return float(time.thread_time_ns() - t0)

    adds, removes = [], []
    for _ in range(args.repeat):
        table = _esp.Table()
        sas = [_esp.SA(0x1000 + i, True, 0, bytes(20), False, 0, None) for i in range(n)]
        # flow keys as flow_key makes them: protocol, addresses, ports (13 octets, IPv4 UDP)
        keys = [
            bytes([17]) + (0x0A000000 + i).to_bytes(4, "big") + bytes([10, 1, 0, 1])
            + (1024 + j).to_bytes(2, "big") + (4500).to_bytes(2, "big")
            for i in range(n) for j in range(fps)
        ]  # fmt: skip

        def add(table: object = table, sas: list[object] = sas, keys: list[bytes] = keys) -> None:
            for i, k in enumerate(keys):
                table.add_flow(k, sas[i // fps])  # type: ignore[attr-defined]

        def remove(table: object = table, sas: list[object] = sas) -> None:
            for c in sas:
                table.remove(c)  # type: ignore[attr-defined]

        adds.append(measure(add) / len(keys))
        assert table.sizes() == (0, n * fps)
        removes.append(measure(remove) / n)
        assert table.sizes() == (0, 0)
    unit = "instructions" if args.callgrind else "ns CPU"
    print(
        f"sas {n} flows {n * fps}: add_flow {statistics.median(adds):,.0f} {unit} a flow,"
        f" remove {statistics.median(removes):,.0f} {unit} an SA"
        f" (median of {args.repeat}: add {[round(a) for a in adds]},"
        f" remove {[round(r) for r in removes]})"
    )


def engine_move(n: int, repeat: int) -> None:
    import ipaddress

    from ipsecct.bench.transfer import make_tunnel
    from ipsecct.ipsec.engine import Engine, ToPeer
    from ipsecct.ipsec.ippacket import build_udp

    a = ipaddress.ip_address
    per, first = [], []
    for _ in range(repeat):
        eng = Engine(native=True)
        for i in range(n):
            make_tunnel(eng, i, "192.0.2.1", "192.0.2.2")
        pkts = [build_udp(a("10.2.0.1"), a("10.64.0.0") + i, 5000, 4500, b"x" * 40)
                for i in range(n)]  # fmt: skip
        # what the Python path does after it sent a flow's first packet (its SPD lookup, a
        # walk of every policy, left out: O(n^2) here), then C seals the next one
        t0 = time.thread_time_ns()
        for t, pkt in zip(eng.tunnels(), pkts, strict=True):
            key = eng._flow_key(pkt)
            assert key is not None
            eng._native_out(t.outbound, key)
        first.append((time.thread_time_ns() - t0) / n)
        for pkt in pkts:
            assert isinstance(eng.outbound(pkt, 1.0), ToPeer)
        assert eng.native.sizes()[1] == n, eng.native.sizes()
        tunnels = list(eng.tunnels())
        t0 = time.thread_time_ns()
        eng.move_tunnels(tunnels, "sg2", 100.0)
        per.append((time.thread_time_ns() - t0) / n)
        assert eng.native.sizes() == (0, 0)
    print(
        f"engine, {n} tunnels, a flow each in C: move_tunnels {statistics.median(per):,.0f}"
        f" ns CPU a tunnel (median of {repeat}: {[round(p) for p in per]}); the hand-over"
        f" of a flow to C (push, add_flow) {statistics.median(first):,.0f} ns CPU"
    )


if __name__ == "__main__":
    main()

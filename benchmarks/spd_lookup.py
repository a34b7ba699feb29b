"""SPD lookup and policy install/remove cost, the indexed SPD against the old linear one.

An Engine with ``--tunnels`` tunnels (``bench transfer``'s: 10.2.0.0/16 <-> one 10.64.x.y
address each), then, in CPU time (``time.thread_time``), per call:

* ``first``: the first packet of a new flow (``Engine.outbound``: SPD lookup, ESP, flow cache),
  ``--flows`` flows spread over the tunnels (so the linear scan walks half the SPD on average);
* ``miss``: a packet to an address no policy covers (a flood of unknown flows);
* ``install``: ``Engine.add_tunnels`` of all the tunnels (a bulk transfer's install), a tunnel,
  with the cyclic collector paused as a gateway installs (``gcpolicy.GcPolicy.batch``): else
  a full collection of every tracked object (the tunnels just made) falls inside it at some
  sizes and not others (at 10,000: one, about 20 us a tunnel; at 1,000: none);
* ``remove``: ``Engine.remove_tunnel`` of every tenth tunnel, then ``remove_tunnels`` of the
  rest (a bulk transfer's forwarders expiring), a tunnel.

"old" is the SPD as it was (a list tried in order: :class:`LinearSPD` below), "new" the
indexed one; they alternate (old, new, old, new...) ``--pairs`` times, medians printed:

    python benchmarks/spd_lookup.py --tunnels 1000
    python benchmarks/spd_lookup.py --tunnels 10000 --flows 300

``--subnets``: site-to-site tunnels instead, each to a subnet (10.64.0.0/24, 10.64.1.0/24,
...: filed under their covering prefix, not one address), the packets to an address in each.

``--transfer old|new`` instead runs ``ipsecct bench transfer --json`` with that SPD (for the
bulk SAs/s A/B: alternate the two from a shell). ``--callgrind old|new`` counts the
instructions (valgrind) of ``Engine.add_tunnels`` of ``--tunnels`` tunnels into an engine that
has as many already, and of ``Engine.remove_tunnels`` of them (``--into 0``: into an empty
engine; ``--gc off``: the collector paused in both, as in a gateway; the collections of each
generation that fell inside are printed):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        python benchmarks/spd_lookup.py --tunnels 5000 --callgrind new
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from ipsecct.errors import SAError
from ipsecct.ipsec import engine as engine_mod
from ipsecct.ipsec.ippacket import IPAddress
from ipsecct.ipsec.sad import Direction, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import SPD, Action, Selectors, SPDEntry


class LinearSPD(SPD):
    """The SPD before the index: a list, every entry tried in order."""

    def __init__(self, entries: Iterable[SPDEntry] = ()) -> None:
        self._entries = list(entries)

    def add(self, entry: SPDEntry, *, index: int | None = None) -> None:
        if index is None:
            self._entries.append(entry)
        else:
            self._entries.insert(index, entry)

    def extend(self, entries: Iterable[SPDEntry]) -> None:
        self._entries.extend(entries)

    def remove_many(self, entries: Iterable[SPDEntry]) -> None:
        gone = {id(e) for e in entries}
        if gone:
            self._entries = [e for e in self._entries if id(e) not in gone]

    def remove(self, entry: SPDEntry) -> None:
        for i, e in enumerate(self._entries):
            if e is entry:
                del self._entries[i]
                return
        raise SAError("no such SPD entry")

    def index_of(self, entry: SPDEntry) -> int | None:
        return next((i for i, e in enumerate(self._entries) if e is entry), None)

    def lookup(
        self,
        local: IPAddress,
        remote: IPAddress,
        protocol: int,
        local_port: int | None = None,
        remote_port: int | None = None,
    ) -> SPDEntry | None:
        return self._lookup_linear(local, remote, protocol, local_port, remote_port)


def use(kind: str) -> None:
    engine_mod.SPD = LinearSPD if kind == "old" else SPD  # type: ignore[attr-defined]


SUBNETS = False  # --subnets: tunnel i to the /24 at 10.64.0.0 + 256 i, packets to its .5


def _remote(i: int) -> int:
    return int(ipaddress.ip_address("10.64.0.0")) + (i * 256 + 5 if SUBNETS else i)


def _items(n: int) -> list[tuple[SPDEntry, SecurityAssociation, SecurityAssociation]]:
    a = ipaddress.ip_address
    local, peer = a("192.0.2.1"), a("192.0.2.2")
    out = []
    for i in range(n):
        remote = f"{a(_remote(i) - 5)}/24" if SUBNETS else str(a(_remote(i)))
        sel = Selectors.between("10.2.0.0/16", remote)
        common: dict[str, Any] = dict(
            esn=True, replay_window=1024, selectors=sel, encap=UdpEncap(), name=f"t{i}"
        )
        o = SecurityAssociation(
            0x1000000 + i, Direction.OUTBOUND, local, peer, enc_key=os.urandom(20), **common
        )
        inn = SecurityAssociation(
            0x2000000 + i, Direction.INBOUND, peer, local, enc_key=os.urandom(20), **common
        )
        out.append((SPDEntry(sel, Action.PROTECT, name=f"t{i}", static=False), o, inn))
    return out


def _udp(src: int, dst: int, sport: int) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + 32, 0, 0, 64, 17, 0,
                      src.to_bytes(4, "big"), dst.to_bytes(4, "big"))  # fmt: skip
    return hdr + struct.pack("!HHHH", sport, 4500, 40, 0) + bytes(32)


def cpu(fn: Callable[[], object]) -> float:
    t0 = time.thread_time_ns()
    fn()
    return float(time.thread_time_ns() - t0)


def one_round(kind: str, n: int, flows: int) -> dict[str, float]:
    use(kind)
    eng = engine_mod.Engine(ipaddress.ip_address("192.0.2.1"))
    items = _items(n)
    res: dict[str, float] = {}
    gc.disable()  # as in a gateway (gcpolicy): see the docstring
    try:
        res["install_us"] = cpu(lambda: eng.add_tunnels(items)) / n / 1000
    finally:
        gc.enable()
    src = int(ipaddress.ip_address("10.2.0.1"))
    step = max(n // flows, 1)
    pkts = [_udp(src, _remote(i), 1000 + k) for k, i in enumerate(range(0, n, step))]
    now = time.monotonic()

    def first() -> None:
        for p in pkts:
            eng.outbound(p, now)

    res["first_us"] = cpu(first) / len(pkts) / 1000
    miss = [_udp(src, _remote(n + 7) + k, 1000) for k in range(len(pkts))]

    def misses() -> None:
        for p in miss:
            eng.outbound(p, now)

    res["miss_us"] = cpu(misses) / len(miss) / 1000
    tunnels = eng.all_tunnels()
    some, rest = tunnels[::10], [t for i, t in enumerate(tunnels) if i % 10]

    def remove_some() -> None:
        for t in some:
            eng.remove_tunnel(t)

    res["remove_one_us"] = cpu(remove_some) / len(some) / 1000
    res["remove_bulk_us"] = cpu(lambda: eng.remove_tunnels(rest)) / len(rest) / 1000
    assert len(eng.spd) == 0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tunnels", type=int, default=1000)
    ap.add_argument("--flows", type=int, default=1000, help="first packets timed (spread)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--transfer", choices=["old", "new"])
    ap.add_argument("--callgrind", choices=["old", "new"])
    ap.add_argument("--into", type=int, help="--callgrind: tunnels already in the engine")
    ap.add_argument("--gc", choices=["on", "off"], default="on", help="--callgrind: collector")
    ap.add_argument("--subnets", action="store_true", help="site-to-site tunnels to subnets")
    args = ap.parse_args()
    global SUBNETS
    SUBNETS = args.subnets
    if args.callgrind:
        from bulk_callgrind import _callgrind, _instructions  # type: ignore[import-not-found]

        use(args.callgrind)
        eng = engine_mod.Engine(ipaddress.ip_address("192.0.2.1"))
        into = args.tunnels if args.into is None else args.into
        items = _items(into + args.tunnels)
        eng.add_tunnels(items[:into])
        counts: list[float] = []
        collections: list[list[int]] = []

        def count(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                collections[-1][info["generation"]] += 1

        gc.callbacks.append(count)
        for fn in (
            lambda: eng.add_tunnels(items[into:]),
            lambda: eng.remove_tunnels(eng.all_tunnels()[into:]),
        ):
            collections.append([0, 0, 0])
            if args.gc == "off":
                gc.disable()
            _callgrind("-i", "on")
            before = _instructions()
            fn()
            counts.append((_instructions() - before) / args.tunnels)
            _callgrind("-i", "off")
            gc.enable()
        gc.callbacks.remove(count)
        print(f"{args.callgrind}: instructions a tunnel: add_tunnels {counts[0]:.0f}, "
              f"remove_tunnels {counts[1]:.0f}; collections (gen 0/1/2) in each: "
              f"{collections[0]}, {collections[1]}")  # fmt: skip
        return
    if args.transfer:
        use(args.transfer)
        from ipsecct.cli import main as cli_main

        sys.exit(cli_main(["bench", "transfer", "--json"]))
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for _ in range(args.pairs):
        for kind in ("old", "new"):
            runs[kind].append(one_round(kind, args.tunnels, args.flows))
    keys = list(runs["old"][0])
    print(f"{args.tunnels} tunnels, {args.pairs} pairs, CPU us a call (median)")
    for k in keys:
        old = statistics.median(r[k] for r in runs["old"])
        new = statistics.median(r[k] for r in runs["new"])
        print(f"  {k:15} old {old:10.2f}  new {new:10.2f}")


if __name__ == "__main__":
    main()

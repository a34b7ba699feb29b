"""What the fail-over driver's check of tunnels near their kept ceilings costs the IKE service
when it holds many IKE SAs: ``IkeService.rekey_before_ceiling(tunnel, now)`` is asked once
for each tunnel that used half its kept margin while the gateway runs alone
(``FailoverDriver._rekey_near_ceiling``); it used to find the tunnel's CHILD SA by a walk of
every IKE SA, O(IKE SAs) a tunnel.

One IKE engine holding N established IKE SAs (benchmarks/ike_timers.py's: copies of one made
by a real IKE_SA_INIT and IKE_AUTH), each CHILD SA given a tunnel of its own (a stand-in
object: only its identity is looked at), the node's tunnels unchanged throughout. Each
CHILD SA is already due for its rekey, so the call only finds it (what is measured).

- ``each_us``: CPU time (``time.thread_time``) per call, median of ``calls`` calls for
  tunnels spread over the IKE SAs (the first call of a run included in ``first_us``, which
  builds the new tree's index);
- ``all_ms``: one call for every tunnel, in a row (every tunnel at half its margin at once:
  one check of the driver), total.

For an older tree: that tree's ``src`` first on PYTHONPATH (benchmarks/README.md).

    .venv/bin/python -m benchmarks.ceiling_rekey_lookup 1000 10000
"""

from __future__ import annotations

import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

from benchmarks.ike_timers import engine
from ipsecct.gateway.ike import IkeService


def service(n: int) -> tuple[Any, list[object]]:
    """An IkeService around an engine of ``n`` IKE SAs; the tunnel of each CHILD SA."""
    resp, sas = engine(n)
    tunnels: list[object] = []
    for ike in sas:
        for child in ike.children:
            child.handle = SimpleNamespace()  # (by identity)
            child.rekey_at = 0.0  # (due already: the call only finds it)
            tunnels.append(child.handle)
    svc: Any = IkeService.__new__(IkeService)
    svc.engine = resp
    svc.node = SimpleNamespace(engine=SimpleNamespace(tunnel_changes=1))
    svc._children, svc._children_at = {}, -1  # (what __init__ sets; the old tree ignores it)
    return svc, tunnels


def measure(n: int, calls: int) -> dict[str, float]:
    svc, tunnels = service(n)
    clock = time.thread_time
    step = max(1, len(tunnels) // calls)
    picks = tunnels[::step][:calls]
    t = clock()
    assert svc.rekey_before_ceiling(picks[0], 1.0)
    first = clock() - t
    each = []
    for tun in picks[1:]:
        t = clock()
        assert svc.rekey_before_ceiling(tun, 1.0)
        each.append(clock() - t)
    svc2, tunnels2 = service(n)
    t = clock()
    for tun in tunnels2:
        assert svc2.rekey_before_ceiling(tun, 1.0)
    every = clock() - t
    return {
        "ike_sas": n,
        "first_us": round(first * 1e6, 1),
        "each_us": round(statistics.median(each) * 1e6, 2),
        "all_ms": round(every * 1e3, 1),
    }


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [1000, 10000]
    for n in sizes:
        print(measure(n, min(200, n)))


if __name__ == "__main__":
    main(sys.argv[1:])

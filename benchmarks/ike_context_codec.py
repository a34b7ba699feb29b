"""CPU per IKE SA of the IKE SA context codec (``ikev2.context.encode`` / ``decode``): the
IKE SA of ``tests/helpers/ikev2_engines.py``'s pair (PSK, AES-GCM, one CHILD SA, its cached
IKE_AUTH response: 3 CDBs). ``same``: one context decoded again and again; ``distinct``:
2,048 contexts, each with its own peer address and remote selector (more than the reader's
caches of shared parts hold: each of those misses). Figures are medians of ``--rounds``
batches of per-thread CPU time (``time.thread_time``), in µs per IKE SA.

One tree (prints JSON)::

    PYTHONPATH=TREE/src:. .venv/bin/python -m benchmarks.ike_context_codec

Two trees alternated, the order switched every pair (medians over the pairs, and in how
many pairs the new tree was faster)::

    .venv/bin/python -m benchmarks.ike_context_codec --old OLD/src --new src --pairs 10
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

DISTINCT = 2048


def _per_call(f: Callable[[], object], calls: int, rounds: int) -> float:
    """Median over ``rounds`` batches of ``calls`` calls, µs of thread CPU per call."""
    f()
    out = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(calls):
            f()
        out.append((time.thread_time() - t0) / calls * 1e6)
    return statistics.median(out)


def one(rounds: int) -> dict[str, float]:
    from tests.helpers.ikev2_engines import conn, connect, pair

    from ipsecct.ikev2 import context
    from ipsecct.ikev2.ikesa import Address
    from ipsecct.ikev2.message import TrafficSelector, TsType

    w = pair()
    connect(w)
    ike = w.resp.ike_sas()[0]
    conns = [conn()]
    cdbs = context.encode(ike, 0.0)
    assert len(cdbs) == 3 and context.decode(cdbs, conns, 0.0).spi_i == ike.spi_i
    many = []
    child = ike.children[0]
    for i in range(DISTINCT):
        host = ipaddress.IPv4Address(0xC6336400 + i)  # 198.51.100.0 on
        inner = ipaddress.IPv4Address(0x0A020000 + i)  # 10.2.0.0 on
        ike.remote = Address(host, 4500)
        child.remote_ts = [TrafficSelector(TsType.IPV4_ADDR_RANGE, 0, 0, 65535, inner, inner)]
        many.append(context.encode(ike, 0.0))
    it = iter(range(1 << 62))

    def distinct() -> object:
        return context.decode(many[next(it) % DISTINCT], conns, 0.0)

    return {
        "encode_us": _per_call(lambda: context.encode(ike, 0.0), 500, rounds),
        "decode_same_us": _per_call(lambda: context.decode(cdbs, conns, 0.0), 500, rounds),
        "decode_distinct_us": _per_call(distinct, DISTINCT // 4, rounds),
    }


def _run(src: str, rounds: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{os.path.abspath(src)}:{os.getcwd()}")
    cmd = [sys.executable, "-m", "benchmarks.ike_context_codec", "--rounds", str(rounds)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--old", help="the old tree's src (with --new: alternate them)")
    ap.add_argument("--new", help="the new tree's src")
    ap.add_argument("--pairs", type=int, default=10)
    a = ap.parse_args()
    if not (a.old and a.new):
        print(json.dumps(one(a.rounds)))
        return
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for p in range(a.pairs):
        order = ["old", "new"] if p % 2 == 0 else ["new", "old"]
        for which in order:
            runs[which].append(_run(a.old if which == "old" else a.new, a.rounds))
    for key in runs["old"][0]:
        old = [r[key] for r in runs["old"]]
        new = [r[key] for r in runs["new"]]
        better = sum(n < o for o, n in zip(old, new, strict=True))
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"{key}: old {mo:.2f}  new {mn:.2f}  new/old {mn / mo:.3f}  "
              f"(new lower in {better} of {a.pairs} pairs)")


if __name__ == "__main__":
    main()

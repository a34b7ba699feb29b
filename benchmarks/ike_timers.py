"""What the IKE engine's timers cost with many IKE SAs: one gateway engine holding N
established IKE SAs (dpd_delay 30 s, their last messages 1 ms apart, so that their liveness
checks fall due one at a time), driven as the adapter drives it (gateway/ike.py):

- ``re-arm``: an IKE SA's message moves its deadline (``last_heard``), then
  ``next_deadline()``, as the adapter asks after every message that reached an IKE SA;
- ``tick``: ``tick(now)`` at an IKE SA's deadline (one IKE SA due: its liveness check is
  sealed and sent), then the answer (its request dropped, ``last_heard`` moved) and
  ``next_deadline()``, timed apart.

CPU time of each call (``time.thread_time``), median of ``calls``. The IKE SAs are copies of
one established by the test helpers (a real IKE_SA_INIT and IKE_AUTH), each under its own
SPI. For an older tree: that tree's ``src`` first on PYTHONPATH (benchmarks/README.md).

    .venv/bin/python -m benchmarks.ike_timers 1000 10000
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
import time

from tests.helpers.ikev2_engines import conn, connect, mn_conn, pair

from ipsecct.ikev2.engine import IkeEngine, Send
from ipsecct.ikev2.ikesa import IkeSA

DPD = 30.0
GAP = 0.001  # between the IKE SAs' last messages


def engine(n: int) -> tuple[IkeEngine, list[IkeSA]]:
    w = pair(mn_conn(), conn(dpd=DPD))
    connect(w)
    resp = w.resp
    (proto,) = resp.ike_sas()
    del resp.by_spi[proto.our_spi]
    sas = []
    for k in range(n):
        c = copy.copy(proto)
        c.children = [copy.copy(ch) for ch in proto.children]
        c.queued_deletes, c.children_wanted, c.pending = [], [], None
        c.spi_r = (k + 1).to_bytes(8, "big")
        c.last_heard = k * GAP
        resp.by_spi[c.our_spi] = c
        sas.append(c)
    assert resp.next_deadline() == DPD
    return resp, sas


def measure(n: int, calls: int) -> dict[str, float]:
    resp, sas = engine(n)
    clock = time.thread_time
    # tick: IKE SA k is due at DPD + k * GAP
    tick, rearm_after_tick = [], []
    for k in range(calls):
        now = DPD + k * GAP
        t = clock()
        out = resp.tick(now)
        tick.append(clock() - t)
        ike = sas[k]
        assert len(out) == 1 and isinstance(out[0], Send) and ike.pending is not None, k
        ike.pending, ike.last_heard = None, now  # (its answer)
        t = clock()
        d = resp.next_deadline()
        rearm_after_tick.append(clock() - t)
        assert d == DPD + (k + 1) * GAP, (k, d)
    # re-arm: a message for a random IKE SA moves its deadline later
    rng = random.Random(1)
    rearm = []
    now = DPD + calls * GAP
    for _ in range(calls):
        ike = sas[rng.randrange(calls, n)]
        ike.last_heard = now
        t = clock()
        resp.next_deadline()
        rearm.append(clock() - t)
    return {
        "next_deadline_us": statistics.median(rearm) * 1e6,
        "tick_one_due_us": statistics.median(tick) * 1e6,
        "next_deadline_after_tick_us": statistics.median(rearm_after_tick) * 1e6,
    }


def main(sizes: list[int], calls: int = 200) -> None:
    heap = hasattr(IkeEngine, "_deadline_of")
    for n in sizes:
        r = measure(n, calls)
        print(f"{'heap' if heap else 'walk'} ike_sas={n} " + " ".join(
            f"{k}={v:.1f}" for k, v in r.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 10000])

"""What a message costs the IKE engine when it holds many IKE SAs, for what used to walk all
of them: one gateway engine holding N established IKE SAs (benchmarks/ike_timers.py's: copies
of one made by a real IKE_SA_INIT and IKE_AUTH, each under its own SPI, here each also with
its own peer address and identity), and

- ``sa_init``: ``receive()`` of an IKE_SA_INIT from a new source (the flood case: the per
  source counts were a walk of every IKE SA), the answer sealed;
- ``identity``: ``arrival_refusal()`` (a transfer's target asks it before the COMMIT: the
  same walk by connection and identity as IKE_AUTH's unique, limit and INITIAL_CONTACT);
- ``audit``: the pass that computes every IKE SA's deadline again (once a minute): the
  longest ``tick()`` while it runs (one loop turn) and the ticks it takes.

CPU time of each call (``time.thread_time``), median of ``calls`` (the audit: of 5 passes).
For an older tree: that tree's ``src`` first on PYTHONPATH (benchmarks/README.md).

    .venv/bin/python -m benchmarks.ike_walks 1000 10000
"""

from __future__ import annotations

import ipaddress
import statistics
import sys
import time

from tests.helpers.ikev2_engines import R500, mn_conn

from benchmarks.ike_timers import engine
from ipsecct.ikev2 import engine as E
from ipsecct.ikev2.engine import IkeEngine, Send
from ipsecct.ikev2.ikesa import Address


def _addr(i: int, port: int = 500) -> Address:
    return Address(ipaddress.ip_address(f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"),
                   port)


def measure(n: int, calls: int) -> dict[str, float]:
    resp, sas = engine(n)
    for k, ike in enumerate(sas):
        ike.remote = _addr(k, 4500)
        ike.peer_id = f"mn{k}.test"
    resp.cookie_threshold = 10**9  # (every IKE_SA_INIT answered, none asked for a cookie)
    clock = time.thread_time
    # IKE_SA_INIT from new sources (the requests made first, untimed)
    mns = [IkeEngine([mn_conn()]) for _ in range(calls)]
    reqs = [mn.initiate(mn.connections[0], _addr(n + k), R500, 0.0)[0] for k, mn in
            enumerate(mns)]  # fmt: skip
    sa_init = []
    for s in reqs:
        assert isinstance(s, Send)
        t = clock()
        out = resp.receive(s.data, s.src, R500, 0.0)
        sa_init.append(clock() - t)
        assert len(out) == 1 and isinstance(out[0], Send), out
    # a transfer's target: may an IKE SA of this identity come here?
    conn = sas[0].conn
    identity = []
    for k in range(calls):
        t = clock()
        why = resp.arrival_refusal(conn, f"mn{k * 7 % n}.test")
        identity.append(clock() - t)
        assert why is None, why
    # the audit: passes at 1, 61, 121 ... s (before any IKE SA's deadline: the dpd of the
    # copies is 30 s after a last message at 0 s: moved to 10**6 here)
    for ike in sas:
        ike.last_heard = 1e6
    longest, turns = [], []
    now = 1.0
    resp._timer_audit_at = now
    for _ in range(5):
        worst, k = 0.0, 0
        while True:
            t = clock()
            resp.tick(now)
            worst = max(worst, clock() - t)
            k += 1
            if not getattr(resp, "_audit_spis", None):
                break
        assert resp._timer_audit_at == now + E.TIMER_AUDIT
        longest.append(worst)
        turns.append(k)
        now += E.TIMER_AUDIT
    return {
        "sa_init_us": statistics.median(sa_init) * 1e6,
        "identity_us": statistics.median(identity) * 1e6,
        "audit_longest_tick_us": statistics.median(longest) * 1e6,
        "audit_ticks": statistics.median(turns),
    }


def main(sizes: list[int], calls: int = 200) -> None:
    indexed = hasattr(E, "_HalfOpenTable")
    for n in sizes:
        r = measure(n, calls)
        print(f"{'indexed' if indexed else 'walk'} ike_sas={n} " + " ".join(
            f"{k}={v:.1f}" for k, v in r.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1000, 10000])

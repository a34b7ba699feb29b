"""What durable sequence-number reservations cost (issue 8 §1), measured in one run.

1. The data path: ``esp.encapsulate`` on an SA under reservations (blocks of 65536, each
   granted at once, as the adapter does once its write returns) against the same SA without,
   interleaved round after round; the best run of each; the ratio is printed.
2. The write: one synced SQLite transaction (WAL, synchronous=FULL) raising the ceilings of
   1 and of 100 SAs, in the directory given (default: a temporary one under /var/tmp, on the
   same file system as /var/lib on most machines).

    .venv/bin/python benchmarks/reservations.py [--dir DIR] [--rounds 7]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import tempfile
import time
from pathlib import Path

from ipsecct.ct.journal import Owner, SAState
from ipsecct.gateway.state import StateStore
from ipsecct.ipsec import esp
from ipsecct.ipsec.sad import Direction, SecurityAssociation
from ipsecct.ipsec.sequence import Reservations

PAYLOAD = bytes(1400)


def _sa() -> SecurityAssociation:
    a = ipaddress.ip_address
    return SecurityAssociation(
        0x1234, Direction.OUTBOUND, a("192.0.2.1"), a("192.0.2.2"), enc_key=os.urandom(20)
    )


def _rate(sa: SecurityAssociation, r: Reservations | None, n: int) -> float:
    enc = esp.encapsulate
    t = time.perf_counter()
    for _ in range(n):
        enc(sa, 4, PAYLOAD, 0.0)
        if sa.events and r is not None:
            sa.events.clear()
            r.granted(sa, r.request(sa))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="where to put the test database")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--packets", type=int, default=50000)
    args = ap.parse_args()
    r = Reservations(1 << 16)
    base, resv = _sa(), _sa()
    r.enrol(resv, 0)
    r.granted(resv, r.request(resv))
    best_base = best_resv = 0.0
    for _ in range(args.rounds):
        best_base = max(best_base, _rate(base, None, args.packets))
        best_resv = max(best_resv, _rate(resv, r, args.packets))
    print(
        f"esp.encapsulate, AES-GCM-128, 1400 B: unreserved {best_base:,.0f} pps,"
        f" reserved {best_resv:,.0f} pps, ratio {best_resv / best_base:.3f}"
    )
    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(dir="/var/tmp"))
    st = StateStore.create(d / "bench-state.db", "bench")
    st.put(
        SAState(f"{i:032x}", f"t{i}", i + 256, "192.0.2.2", True, 0, Owner.OWNED)
        for i in range(100)
    )
    for n in (1, 100):
        lat = []
        for k in range(40):
            t = time.perf_counter()
            st.raise_ceilings([(f"{i:032x}", (k + 1) * 65536) for i in range(n)])
            lat.append(time.perf_counter() - t)
        lat.sort()
        print(
            f"reservation write, {n} SA(s) in one synced transaction: median"
            f" {statistics.median(lat) * 1e3:.2f} ms, p95 {lat[int(len(lat) * 0.95)] * 1e3:.2f} ms"
        )
    st.close()


if __name__ == "__main__":
    main()

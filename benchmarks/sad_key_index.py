"""The cost of ``SAD.users_of_key``'s index (sa add's check of one AEAD key both ways) on
every SAD add and remove once it is built (the first ``sa add`` of the process builds it; a
gateway where nobody ran ``sa add`` never pays it).

``--sas`` AES-GCM SAs added then removed, in CPU time (``time.thread_time``), with the index
built beforehand ("indexed") or never ("plain"), alternating (the order switched every pair)
``--pairs`` times; medians in us per add+remove, and the pairs where indexed was cheaper:

    python benchmarks/sad_key_index.py --sas 10000 --pairs 20
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time

from ipsecct.ipsec.sad import SAD, Direction, SecurityAssociation


def run(sas: list[SecurityAssociation], indexed: bool) -> float:
    sad = SAD()
    if indexed:
        sad.users_of_key(sas[0])  # built, empty
    t = time.thread_time()
    for sa in sas:
        sad.add(sa)
    for sa in sas:
        sad.remove(sa)
    return (time.thread_time() - t) / len(sas) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sas", type=int, default=10000)
    ap.add_argument("--pairs", type=int, default=20)
    a = ap.parse_args()
    src, dst = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    sas = [SecurityAssociation(0x1000 + i, Direction.INBOUND, src, dst,
                               enc_key=i.to_bytes(20, "big")) for i in range(a.sas)]  # fmt: skip
    res: dict[bool, list[float]] = {False: [], True: []}
    for i in range(a.pairs):
        for k in (False, True) if i % 2 else (True, False):
            res[k].append(run(sas, k))
    better = sum(n < p for p, n in zip(res[False], res[True], strict=True))
    print(f"us per add+remove, median of {a.pairs}: plain {statistics.median(res[False]):.2f},"
          f" indexed {statistics.median(res[True]):.2f} (indexed cheaper in {better})")


if __name__ == "__main__":
    main()

"""What one ``ipsecct pools --leases`` answer costs the gateway's event loop: the CPU time
(``time.thread_time``) of ``IkeService.pools(True)`` and of its JSON, with 3 pools of 65,536
leases each (identities of 40 characters), and the answer's size.

    PYTHONPATH=TREE/src .venv/bin/python -m benchmarks.pools_leases

Run it against an old tree and the new one, alternating, and compare the medians.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import time
from types import SimpleNamespace

from ipsecct.gateway.ike import IkeService
from ipsecct.ikev2.pool import Pool


def main() -> None:
    pools = {}
    for k in range(3):
        base = int(ipaddress.ip_address(f"10.{k}.0.0"))
        p = Pool(f"p{k}", ipaddress.ip_address(base), ipaddress.ip_address(base + 65535))
        for i in range(65536):
            p.restore(ipaddress.ip_address(base + i), "away" if i % 3 else "offline",
                      f"{i:08}" + "x" * 32)  # fmt: skip
        pools[p.name] = p
    svc = SimpleNamespace(engine=SimpleNamespace(pools=pools))
    cpu = []
    size = 0
    for _ in range(5):
        t = time.thread_time()
        size = len(json.dumps(IkeService.pools(svc, True)))  # type: ignore[arg-type]
        cpu.append(time.thread_time() - t)
    print(f"pools(True) + JSON: {statistics.median(cpu) * 1e3:.1f} ms CPU, answer {size} octets")


if __name__ == "__main__":
    main()

"""What an IKE datagram the gateway drops at once costs a running gateway whose half-open
table is full: ``ipsecct gateway run`` (examples/ikev2 sg1) on loopback, its half-open table
filled by a flood that answers the cookies (tests/helpers/init_flood.py InitFlood, 50
sources x 20), then N IKE datagrams with random SPIs from one more address, 200 at a time
with 20 ms between. Prints the gateway process's CPU (utime+stime) over the junk divided by
the datagrams its ``unknown-spi`` counter saw.

    .venv/bin/python -m benchmarks.ike_junk 10000

For an older tree: that tree's ``src`` first on PYTHONPATH (the gateway process inherits it).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers.example_ikev2 import ADDR, Setup
from tests.helpers.init_flood import InitFlood

from ipsecct.gateway import config


def cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main(n: int) -> None:
    s = Setup(Path(tempfile.mkdtemp(prefix="ike-junk-")))
    try:
        s.start("sg1")
        conn = config.load(s.config("mn")).connections[0]
        gw = (ADDR["sg1"], s.port[24500])
        flood = InitFlood(conn, gw, 50)
        flood.round(20)

        def full(st: dict[str, Any]) -> bool:
            return bool(st["ike"]["half_open"] >= 1000)

        s.wait("sg1", full, "the half-open table full")
        pid = s.procs["sg1"].pid
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.4.30", 0))
        before = s.status("sg1")["ike"]["counters"].get("unknown-spi", 0)
        c0 = cpu(pid)
        for k in range(n):
            hdr = os.urandom(16) + bytes([0, 0x20, 37, 8]) + bytes(4) + (28).to_bytes(4, "big")
            sock.sendto(b"\0\0\0\0" + hdr, gw)
            if k % 200 == 199:
                time.sleep(0.02)
        time.sleep(0.5)
        st = s.status("sg1")
        seen = st["ike"]["counters"].get("unknown-spi", 0) - before
        used = cpu(pid) - c0
        print(f"half-open {st['ike']['half_open']}, junk seen {seen} of {n}, gateway CPU "
              f"{used:.2f} s, {used / max(seen, 1) * 1e6:.0f} us per datagram")  # fmt: skip
        sock.close()
        for x in flood.socks:
            x.close()
    finally:
        s.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)

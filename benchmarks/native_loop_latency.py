"""The event loop of a gateway under a flood, with and without the native forwarding thread.

One gateway (``ipsecct.gateway.node.Node``, a virtual-link inner side on loopback, one
AES-GCM-128 tunnel) forwards a flood of 64-octet inner packets that a separate process sends
as fast as it can; meanwhile its event loop sleeps 1 ms again and again and records how late
each wake-up is: what a transfer, a fail-over message or a timer of that gateway waits for
when its data path is busy. Printed per mode (``IPSECCT_NATIVE_THREAD`` 1 or 0, in separate
processes, alternating): the lateness median, 90th and 99th percentile and the packets the
gateway sealed over the window.

    .venv/bin/python benchmarks/native_loop_latency.py [--rounds 2] [--time 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOD = r"""
import ipaddress, socket, sys, time
from ipsecct.ipsec.ippacket import build_udp
p = build_udp(ipaddress.ip_address("10.1.0.2"), ipaddress.ip_address("10.2.0.1"), 5000, 7000,
              b"x" * 36)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for _ in range(64):
        s.sendto(p, ("127.0.0.1", int(sys.argv[1])))
"""


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _one(window: float) -> dict[str, object]:
    from ipsecct.gateway.config import from_dict
    from ipsecct.gateway.node import Node

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))  # the peer: never read, the kernel drops what overflows
    with tempfile.TemporaryDirectory() as d:
        keys = Path(d) / "keys"
        keys.write_text(f'out_enc = "{os.urandom(20).hex()}"\nin_enc = "{os.urandom(20).hex()}"\n')
        os.chmod(keys, 0o600)
        inner = _port()
        cfg = from_dict(
            {
                "name": "lat",
                "outer": {"address": "127.0.0.1", "port": _port()},
                "inner": {"kind": "udp", "listen": f"127.0.0.1:{inner}",
                          "peer": f"127.0.0.1:{_port()}"},
                "tunnel": [{
                    "name": "t", "local_ts": "10.1.0.0/24", "remote_ts": "10.2.0.0/24",
                    "peer": f"127.0.0.1:{sink.getsockname()[1]}", "enc": "aes-gcm-16",
                    "spi_out": 0x1001, "spi_in": 0x2001, "keys": str(keys),
                }],
            },
            str(Path(d) / "gw.toml"),
        )
        node = Node(cfg)
        await node.start()
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(inner), str(window + 1.0)])
        try:
            await asyncio.sleep(0.5)
            before = node.status()["counters"]["out_packets"]
            late = []
            end = time.monotonic() + window
            while time.monotonic() < end:
                t0 = time.monotonic()
                await asyncio.sleep(0.001)
                late.append((time.monotonic() - t0 - 0.001) * 1000)
            sealed = node.status()["counters"]["out_packets"] - before
            path = node.status()["data_path"]
        finally:
            flood.wait(30)
            await node.stop()
            sink.close()
    late.sort()
    return {
        "data_path": path,
        "late_ms_median": round(late[len(late) // 2], 2),
        "late_ms_p90": round(late[int(len(late) * 0.9)], 2),
        "late_ms_p99": round(late[int(len(late) * 0.99)], 2),
        "sealed_per_s": round(sealed / window),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_one(args.time))))
        return
    for r in range(args.rounds):
        for thread in ("1", "0"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--time", str(args.time)],
                env=dict(os.environ, IPSECCT_NATIVE_THREAD=thread),
                capture_output=True, text=True, timeout=120, check=True,
            ).stdout
            print(f"round {r + 1}: {out.strip()}")


if __name__ == "__main__":
    main()

"""What a flood of junk ESP costs a gateway with the native forwarding thread, and what of
IKE gets through it.

One gateway (``ipsecct.gateway.node.Node``, one AES-GCM-128 tunnel, the forwarding thread)
receives on its outer port ESP for SPIs nobody has, from 64 source addresses (127.0.x.y),
that a separate process sends as fast as it can; meanwhile another process sends a NAT-T
IKE datagram (the non-ESP marker and an IKE header) every 2 ms. Printed per tree (``--old``:
a source tree to compare, run through PYTHONPATH; runs alternate, the order switched every
pair): per second the junk datagrams the gateway read, those its queue to the event loop
dropped (``native_queue_drops``), the CPU time of the forwarding thread and of the event
loop's thread, the share of the IKE datagrams that reached the event loop, the IKE datagrams
the queue dropped (new tree only: ``native_queue_drops_by``) and what the kernel dropped for
the outer socket over the whole run (its receive buffer full).

    .venv/bin/python benchmarks/punt_flood.py [--pairs 3] [--time 3] [--old /path/to/src]
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
from typing import Any

FLOOD = r"""
import socket, struct, sys, time
socks = []
for i in range(64):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((f"127.0.9.{i + 1}", 0))
    socks.append(s)
dst = ("127.0.0.1", int(sys.argv[1]))
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    for s in socks:
        n += 1
        s.sendto(struct.pack("!LL", 0x10000 + n % 100000, 1) + bytes(40), dst)
"""

PROBE = r"""
import os, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.8.1", 0))
dst = ("127.0.0.1", int(sys.argv[1]))
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    ike = os.urandom(8) + bytes(8) + bytes([0, 0x20, 34, 0x08]) + struct.pack("!LL", 0, 28)
    s.sendto(bytes(4) + ike, dst)
    n += 1
    time.sleep(0.002)
print(n)
"""


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kernel_drops(port: int) -> int:
    """What the kernel dropped for the UDP socket on ``port`` (its receive buffer was full)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port:
            return int(f[-1])
    return 0


def _cpu(native_id: int) -> float:
    """The CPU time (user + system, seconds) of this process's thread ``native_id``."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one(window: float) -> dict[str, Any]:
    from ipsecct.gateway.config import from_dict
    from ipsecct.gateway.node import Node

    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    with tempfile.TemporaryDirectory() as d:
        keys = Path(d) / "keys"
        keys.write_text(f'out_enc = "{os.urandom(20).hex()}"\nin_enc = "{os.urandom(20).hex()}"\n')
        os.chmod(keys, 0o600)
        outer = _port()
        cfg = from_dict(
            {
                "name": "punt",
                "outer": {"address": "127.0.0.1", "port": outer},
                "inner": {"kind": "udp", "listen": f"127.0.0.1:{_port()}",
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
        assert node.status()["data_path"] == "native-thread"
        assert node._native_thread is not None
        thread = node._native_thread[0]
        assert thread.native_id is not None
        ike = [0]
        on_outer = node._on_outer

        def seen(data: bytes, addr: Any) -> None:
            if data[:4] == bytes(4):
                ike[0] += 1
            on_outer(data, addr)

        node._on_outer = seen  # type: ignore[method-assign]
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(outer), str(window + 1.5)])
        try:
            await asyncio.sleep(0.5)
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, str(outer), str(window)],
                stdout=subprocess.PIPE, text=True,
            )
            st0 = node.status()
            t0, c0, l0 = time.monotonic(), _cpu(thread.native_id), time.thread_time()
            out, _ = await asyncio.get_running_loop().run_in_executor(None, probe.communicate)
            st1 = node.status()
            t1, c1, l1 = time.monotonic(), _cpu(thread.native_id), time.thread_time()
            await asyncio.sleep(0.3)  # the last probes' way up
            sent = int(out)
            kernel = _kernel_drops(outer)
            by = node.status().get("native_queue_drops_by", {})
        finally:
            flood.wait(30)
            await node.stop()
            sink.close()
    span = t1 - t0
    dropped = st1["native_queue_drops"] - st0["native_queue_drops"]
    no_sa = st1["counters"]["drops"]["no_sa"] - st0["counters"]["drops"]["no_sa"]
    return {
        "junk_read_per_s": round((dropped + no_sa) / span),
        "queue_drops_per_s": round(dropped / span),
        "thread_cpu_per_s": round((c1 - c0) / span, 3),
        "loop_cpu_per_s": round((l1 - l0) / span, 3),
        "ike_up": round(ike[0] / sent, 3),
        "ike_queue_drops": by.get("ike"),
        "kernel_drops": kernel,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--time", type=float, default=3.0)
    ap.add_argument("--old", help="the src directory of a tree to compare (PYTHONPATH)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_one(args.time))))
        return
    trees = [("new", None)] + ([("old", args.old)] if args.old else [])
    for p in range(args.pairs):
        for name, src in trees if p % 2 == 0 else trees[::-1]:
            env = dict(os.environ, IPSECCT_NATIVE_THREAD="1")
            if src is not None:
                env["PYTHONPATH"] = src
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--time", str(args.time)],
                env=env, capture_output=True, text=True, timeout=120, check=True,
            ).stdout
            print(f"pair {p + 1} {name}: {out.strip()}", flush=True)


if __name__ == "__main__":
    main()

"""How long a lost channel between two gateways stays closed while a third peer's path drops
(keepconn, sixteenth session).

Three gateways of the in-process demo (``ipsecct.demo.topology``, real TLS, one event loop),
each a peer of the other two, ``max_transfer_ms`` 500 (the handshake time-out: 5 s). sg3's
transfer service stops and nftables drops what goes to its port (a dead host: no RST), so
sg1's and sg2's attempts on sg3 hang; then the sg1-sg2 channel is aborted at both ends.
Printed: ms until both hold a new one (the event loop's clock). Root (nftables). One run per
invocation; an A/B alternates trees with ``PYTHONPATH``:

    .venv/bin/python -m benchmarks.peer_reopen
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from ipsecct.demo import topology as demo
from ipsecct.demo.handover import transfer_service
from ipsecct.gateway import tlschannel

GATEWAYS = ("sg1", "sg2", "sg3")


def _open(d: demo.Demo, a: str, b: str) -> bool:
    c = transfer_service(d, a).channels.conns.get(b)
    return c is not None and not c.closed


def _conns(d: demo.Demo, g: str, peer: str) -> list[tlschannel.CxtpConnection]:
    ch = transfer_service(d, g).channels
    return [c for c in ch.all_conns if (p := ch.peer_of(c)) is not None and p.name == peer]


async def _until(pred: Callable[[], object], what: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() >= deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.002)


async def run(tmp: Path) -> float:
    d = await demo.build(tmp, gateways=GATEWAYS, identity="indirect",
                         transfer={"max_transfer_ms": 500})  # fmt: skip
    table = f"peer_reopen_{os.getpid()}"
    try:
        for svc in d.services.values():
            await svc.start_context_transfer()
        await _until(lambda: all(_open(d, a, b) for a in GATEWAYS for b in GATEWAYS if a != b),
                     "a channel between every two gateways", 30)  # fmt: skip
        port = transfer_service(d, "sg3").channels.tcfg.listen.port
        sg3 = demo.ADDRESS["sg3"]
        rules = (f"table inet {table} {{\n chain c {{\n type filter hook input priority 0;\n"
                 f" ip daddr {sg3} tcp dport {port} drop\n"
                 f" ip saddr {sg3} tcp sport {port} drop\n }}\n}}\n")  # fmt: skip
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
        await d.services["sg3"].stop_context_transfer()
        for g in ("sg1", "sg2"):
            for c in _conns(d, g, "sg3"):
                c.abort()
        ch = {g: transfer_service(d, g).channels for g in ("sg1", "sg2")}
        await _until(lambda: all("sg3" in ch[g]._opening for g in ch), "attempts on sg3", 10)
        lost = _conns(d, "sg1", "sg2") + _conns(d, "sg2", "sg1")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for c in lost:
            c.abort()
        await _until(lambda: _open(d, "sg1", "sg2") and _open(d, "sg2", "sg1")
                     and ch["sg1"].conns["sg2"] not in lost
                     and ch["sg2"].conns["sg1"] not in lost,
                     "a new sg1-sg2 channel", 60)  # fmt: skip
        return loop.time() - t0
    finally:
        await asyncio.wait_for(demo.stop(d), 20)
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)


def main() -> None:
    with tempfile.TemporaryDirectory() as t:
        print(f"{asyncio.run(run(Path(t))) * 1000:.0f}")


if __name__ == "__main__":
    main()

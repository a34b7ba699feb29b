"""The source's event-loop CPU from a single handover's trigger until its contexts (the PCTD)
are handed to the TLS channel, and until the end of that turn (what runs after the sends:
the "leaving" rows since they are built by an ``After``; docs/state.md).

The demo's topology (both gateways in one process, TLS 1.3 on loopback, durable state in a
temporary directory) as ``ipsecct bench transfer`` has it, ``--handovers`` single-tunnel
reactive handovers back and forth, the first 4 left out. ``time.thread_time`` of the loop's
thread (load inflates it much less than wall time), medians, in microseconds. Run it in two
trees (``PYTHONPATH=TREE/src``), alternated, to compare them:

    .venv/bin/python benchmarks/contexts_cpu.py [--handovers 201]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

STAMPS: dict[str, float] = {}


def _instrument() -> None:
    from ipsecct.ct import transfer as tr
    from ipsecct.gateway import peers
    from ipsecct.gateway import transfer_service as tsv

    for name in ("send", "send_many"):
        orig = getattr(peers.PeerChannels, name)

        def send(self: Any, peer: str, msg: Any, _orig: Any = orig) -> Any:
            if "start" in STAMPS and "sent" not in STAMPS:
                STAMPS["sent"] = time.thread_time()
            return _orig(self, peer, msg)

        setattr(peers.PeerChannels, name, send)
    start = tr.TransferCore.start

    def started(self: Any, *a: Any, **k: Any) -> Any:
        STAMPS["start"] = time.thread_time()
        return start(self, *a, **k)

    run = tsv.TransferService.run

    def ran(self: Any, outputs: Any) -> None:
        run(self, outputs)
        if "sent" in STAMPS and "turn" not in STAMPS:
            STAMPS["turn"] = time.thread_time()

    tr.TransferCore.start = started  # type: ignore[method-assign]
    tsv.TransferService.run = ran  # type: ignore[method-assign]


async def main(handovers: int) -> dict[str, float]:
    from ipsecct.bench.transfer import handover
    from ipsecct.demo import handover as demo_handover
    from ipsecct.demo import topology as demo
    from ipsecct.gateway import gcpolicy

    _instrument()
    sent: list[float] = []
    turn: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ipsecct-contexts-cpu-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm)
            gcpolicy.POLICY.settle()
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            for i in range(handovers):
                src, dst = ("sg1", "sg2") if i % 2 == 0 else ("sg2", "sg1")
                spi = ts[src].node.engine.tunnels()[0].outbound.spi
                STAMPS.clear()
                await handover(ts, src, dst, [spi])
                if i >= 4:
                    sent.append((STAMPS["sent"] - STAMPS["start"]) * 1e6)
                    turn.append((STAMPS["turn"] - STAMPS["start"]) * 1e6)
                await asyncio.sleep(0.005)
        finally:
            await demo.stop(dm)
    return {
        "to_contexts_sent_cpu_us": round(statistics.median(sent), 1),
        "whole_turn_cpu_us": round(statistics.median(turn), 1),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handovers", type=int, default=201)
    print(json.dumps(asyncio.run(main(ap.parse_args().handovers))))

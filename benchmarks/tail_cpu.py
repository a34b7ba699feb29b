"""CPU per packet of a make-before-break source's tail (the host's packets that still reach
it after its COMMIT, sent on the numbers it kept, ``[transfer] mbb_tail``): N packets of one
flow through ``Engine.outbound`` after the COMMIT, timed with ``time.thread_time``, beside
the same flow's packets on an active tunnel (the native path's cost when it carries them).

    .venv/bin/python -m benchmarks.tail_cpu [N] [--json]

For an old tree: ``PYTHONPATH=OLD/src:OLD`` (its extensions built) with this file copied in.
One process, no sockets: the sans-I/O world of the transfer tests (tests/helpers/transfer.py)
with the native data path's per-call API, as a gateway without its forwarding thread runs it;
with the thread a tail packet the Python path sends also waits for the event loop.
"""

from __future__ import annotations

import json
import sys
import time

from tests.helpers.transfer import World, udp_packet

from ipsecct.ct.transfer import Settings
from ipsecct.ipsec.engine import ToPeer, TunnelState

TAIL = 65536


def measure(n: int) -> dict[str, float | int]:
    s = {g: Settings(make_before_break=True, mbb_margin=1 << 20, mbb_tail=TAIL)
         for g in ("sg1", "sg2")}  # fmt: skip
    pkts = [udp_packet(100 + i, up=False) for i in range(n)]
    # the active tunnel's flow, carried by C (or the Python path, IPSECCT_PURE_PYTHON=1)
    w0 = World(settings=s)
    for i in range(20):
        w0.host_send("sg1", i)
    out0, now = w0.gw["sg1"].engine.outbound, w0.now
    t = time.thread_time()
    for p in pkts:
        out0(p, now)
    active = time.thread_time() - t
    # the tail: the same flow after sg1's COMMIT
    w = World(settings=s)
    for i in range(20):
        w.host_send("sg1", i)
    w.transfer()
    w.deliver("sg1", "sg2")  # PCTD
    w.deliver("sg2", "sg1")  # CTDR: FINAL and COMMIT, the tunnel moved with its tail
    tun = w.tunnel
    assert tun.state is TunnelState.MOVED and tun.tail_end - tun.outbound.seq == TAIL
    assert n <= TAIL
    out = w.gw["sg1"].engine.outbound
    t = time.thread_time()
    for p in pkts:
        r = out(p, now)
        assert type(r) is ToPeer
    tail = time.thread_time() - t
    assert tun.outbound.seq == 20 + n
    return {"n": n, "tail_us": round(tail / n * 1e6, 3), "active_us": round(active / n * 1e6, 3)}


def main(argv: list[str]) -> None:
    args = [a for a in argv if a != "--json"]
    r = measure(int(args[0]) if args else 20000)
    if "--json" in argv:
        print(json.dumps(r))
    else:
        print(f"{r['n']} packets: tail {r['tail_us']} us CPU a packet,"
              f" the active tunnel's flow {r['active_us']} us")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])

"""Memory an IKEv2 engine holds per established IKE SA (with its one CHILD SA), in each role:
N IKE SAs made in one process with the engines of tests/helpers/ikev2_engines.py (PSK,
aes128gcm16-prfsha256-x25519, as the tests), measured with tracemalloc. The engine whose
IKE SAs are counted is made first; the other sides (one engine per IKE SA) are thrown away
before the measure, so what is left is that engine's, less its baseline.

- ``responder``: one gateway engine, N clients (each its own address and identity);
- ``initiator``: one engine that initiates to N gateways (each its own address).

    .venv/bin/python -m benchmarks.ike_sa_memory 1000 [IKE-PROPOSAL]

(IKE-PROPOSAL: both sides' ``proposals``, aes128gcm16-prfsha256-x25519 by default.)

For an older tree: that tree's ``src`` first on PYTHONPATH.
"""

from __future__ import annotations

import gc
import ipaddress
import sys
import tracemalloc

from tests.helpers.ikev2_engines import conn, mn_conn

from ipsecct.ikev2.engine import IkeEngine, Output, Send
from ipsecct.ikev2.ikesa import Address


def _run(outs: list[Output], at: IkeEngine, peer: IkeEngine) -> None:
    """Deliver ``outs`` (of ``at``) to ``peer`` and every answer back, keeping nothing."""
    pending = [(at, o) for o in outs]
    while pending:
        frm, o = pending.pop()
        if isinstance(o, Send):
            to = peer if frm is at else at
            pending += [(to, x) for x in to.receive(o.data, o.src, o.dst, 0.0)]


def _addr(i: int, port: int = 500) -> Address:
    return Address(ipaddress.ip_address(f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"),
                   port)


def responder(n: int, ike: str) -> tuple[int, int]:
    gw = IkeEngine([conn(ike=ike)])
    gw_addr = Address(ipaddress.ip_address("192.0.2.1"), 500)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        mn = IkeEngine([mn_conn(local_id=f"mn{i}.test", ike=ike)])
        _run(mn.initiate(mn.connections[0], _addr(i), gw_addr, 0.0), mn, gw)
        del mn
    gc.collect()
    return len([s for s in gw.ike_sas() if s.state.value == "established"]), (
        tracemalloc.get_traced_memory()[0] - base)


def initiator(n: int, ike: str) -> tuple[int, int]:
    mn = IkeEngine([mn_conn(ike=ike)])
    mn_addr = Address(ipaddress.ip_address("192.0.2.10"), 500)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        gw = IkeEngine([conn(ike=ike)])
        _run(mn.initiate(mn.connections[0], mn_addr, _addr(i), 0.0), mn, gw)
        del gw
    gc.collect()
    return len([s for s in mn.ike_sas() if s.state.value == "established"]), (
        tracemalloc.get_traced_memory()[0] - base)


def main(n: int, ike: str) -> None:
    tracemalloc.start()
    for role, f in (("responder", responder), ("initiator", initiator)):
        up, used = f(n, ike)
        if up != n:
            raise SystemExit(f"{role}: {up} of {n} IKE SAs established")
        print(f"{role}: {n} IKE SAs, {used} B traced, {used / n:,.0f} B per IKE SA")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
         sys.argv[2] if len(sys.argv) > 2 else "aes128gcm16-prfsha256-x25519")

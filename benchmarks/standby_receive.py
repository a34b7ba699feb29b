"""CPU of a fail-over standby applying replication: N tunnels replicated whole (a FULL sync),
then R rounds in which every tunnel changed (heartbeat syncs carrying all N again), each
message applied with ``Standby.receive`` as the drivers do (through the wire form first,
outside the timing). Prints the CPU time (``time.thread_time``) of the receives, in ms.

    PYTHONPATH=TREE/src .venv/bin/python -m benchmarks.standby_receive [N] [R]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import cast

from tests.helpers.transfer import HOST, SG_ADDR, ip, tunnel_sas

from ipsecct.ct import context, cxtp, failover
from ipsecct.ct.transfer import Identity
from ipsecct.ipsec.engine import Engine
from ipsecct.ipsec.ippacket import Endpoint, build_udp
from ipsecct.ipsec.spd import Action, SPDEntry


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    act = Engine(ip(SG_ADDR["sg1"]))
    for i in range(n):
        (o, inb, s), _ = tunnel_sas("sg1", spi_up=0x10000 + i, spi_down=0x20000 + i,
                                    mn_inner=f"10.1.{i // 250}.{i % 250 + 2}", name=f"t{i}")
        act.add_tunnel(SPDEntry(s, Action.PROTECT, name=f"t{i}", static=False), o, inb)
    c = failover.FailoverConfig("active", "sg2", fencing=False, sync_packets=1)
    rep = failover.Replicator(act, c, session=9)
    sb = failover.Standby(Engine(ip(SG_ADDR["sg2"])), replace(c, role="standby", peer="sg1"),
                          Endpoint(ip(SG_ADDR["sg2"]), 4600), Identity.DIRECT)
    cpu = 0.0
    for r in range(rounds + 1):
        if r:
            for i in range(n):  # one packet on every tunnel: all due at the next poll
                act.outbound(_to(i, r), float(r))
        msgs = [cast(cxtp.CTD, cxtp.decode(cxtp.encode(m))) for m in rep.poll(float(r))]
        outs = sum(failover.parse_leaving(c) is None and cxtp.cdb_fpt(c) == context.FPT_IPSEC_SA
                   and not failover._peek(c)[1] for m in msgs for c in m.cdbs[1:])
        assert outs == n, (r, outs)  # every tunnel, every round
        t0 = time.thread_time()
        for m in msgs:
            assert isinstance(m, cxtp.CTD)
            sb.receive(m, float(r))
        cpu += time.thread_time() - t0
    assert len(sb.replica) == n
    print(f"{cpu * 1000:.1f}")


def _to(i: int, r: int) -> bytes:
    """An inner packet from the host to tunnel ``i``'s MN."""
    body = r.to_bytes(4, "big") + bytes(56)
    return build_udp(ip(HOST), ip(f"10.1.{i // 250}.{i % 250 + 2}"), 5000, 7000, body)


if __name__ == "__main__":
    main()

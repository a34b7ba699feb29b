"""A bulk transfer's install at the target: CPU time a tunnel (``time.thread_time``) for a
PCTD of N tunnels into an engine holding N tunnels of its own, every outbound SPI free (the
check that refuses one another tunnel here has is paid, the refusal is not).

    .venv/bin/python -m benchmarks.outbound_spi_install 5000
"""

from __future__ import annotations

import gc
import ipaddress
import random
import sys
import time

from ipsecct.ct import context, cxtp
from ipsecct.ct.transfer import ConflictPolicy, Identity, Settings, TransferCore
from ipsecct.ipsec.algorithms import EncAlg
from ipsecct.ipsec.engine import Engine
from ipsecct.ipsec.ippacket import Endpoint
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, AddressRange, Selectors, SPDEntry

SG, MN = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.66")
KEY = bytes(range(20))


def _sa(spi: int, d: Direction, sel: Selectors, name: str) -> SecurityAssociation:
    src, dst = (SG, MN) if d is Direction.OUTBOUND else (MN, SG)
    return SecurityAssociation(
        spi, d, src, dst, enc=EncAlg.AES_GCM_16, enc_key=KEY, mode=Mode.TUNNEL, esn=True,
        replay_window=64, encap=UdpEncap(4500, 4500), selectors=sel, name=name,
    )  # fmt: skip


def run(n: int) -> float:
    """Microseconds of CPU a tunnel for the install of ``n`` tunnels."""
    eng = Engine()
    for i in range(n):
        sel = Selectors.between("10.2.0.0/16", str(ipaddress.ip_address("10.64.0.0") + i))
        eng.add_tunnel(SPDEntry(sel, Action.PROTECT, name=f"o{i}", static=False),
                       _sa(0x100000 + i, Direction.OUTBOUND, sel, f"o{i}"),
                       _sa(0x200000 + i, Direction.INBOUND, sel, f"o{i}"))  # fmt: skip
    s = Settings(
        conflict=ConflictPolicy.DENY, identity=Identity.DIRECT,
        accept_local=(AddressRange.parse("10.2.0.0/16"),),
        accept_remote=(AddressRange.parse("10.96.0.0/12"),), max_incoming_per_peer=100000,
        max_contexts_per_transfer=10**6, max_contexts_per_message=10**6,
        max_transfer_octets=10**9,
    )  # fmt: skip
    core = TransferCore(eng, Endpoint(SG, 4500), s, rng=random.Random(7).getrandbits)
    cdbs = []
    for i in range(n):
        sel = Selectors.between("10.2.0.0/16", str(ipaddress.ip_address("10.96.0.0") + i))
        cdbs += [context.encode(_sa(0x300000 + i, Direction.OUTBOUND, sel, f"t{i}"), 1000.0),
                 context.encode(_sa(0x400000 + i, Direction.INBOUND, sel, f"t{i}"), 1000.0)]
    msg = cxtp.PCTD(MN, 0, b"k" * 20, (cxtp.TransferTag(1, 0, last=True).encode(), *cdbs))
    gc.collect()
    gc.disable()  # (as a gateway installs: GcPolicy.batch)
    t0 = time.thread_time()
    core.receive("sg2", msg, 1000.0)
    dt = time.thread_time() - t0
    gc.enable()
    if len(eng.sad) != 4 * n:
        raise SystemExit(f"installed {len(eng.sad) // 2 - n} of {n}")
    return dt / n * 1e6


if __name__ == "__main__":
    print(f"{run(int(sys.argv[1]) if len(sys.argv) > 1 else 5000):.2f} us a tunnel")

"""What an unacceptable IKE_SA_INIT costs the sans-I/O engine: an SA payload of 255 IKE
proposals (an encryption and PRF the gateway takes, a DH group it does not: each proposal
is read to its end), answered NO_PROPOSAL_CHOSEN (no half-open IKE SA: no cookie ever
asked for), to an engine of N connections with the same proposals (default: strongSwan's
"default"), against an acceptable IKE_SA_INIT of one proposal, and the unacceptable one again from a
source at its half-open limit (MAX_HALF_OPEN_PER_SOURCE). Prints the engine's CPU time
(time.thread_time) per datagram over R datagrams from R addresses.

    .venv/bin/python -m benchmarks.ike_proposals 50 [R] [PROPOSALS]

For an older tree: that tree's ``src`` first on PYTHONPATH.
"""

from __future__ import annotations

import dataclasses
import gc
import ipaddress
import sys
import time

from tests.helpers.ikev2_engines import R500, conn

from ipsecct.ikev2 import message as M
from ipsecct.ikev2.engine import IkeEngine
from ipsecct.ikev2.ikesa import Address


def init(proposals: tuple[M.Proposal, ...]) -> bytes:
    pl: list[M.Payload] = [M.SAPayload(proposals), M.KEPayload(31, bytes(range(32))),
                           M.NoncePayload(bytes(32))]  # fmt: skip
    h = M.Header(bytes(range(1, 9)), bytes(8), 0, M.ExchangeType.IKE_SA_INIT, M.Flag.INITIATOR,
                 0, 0)  # fmt: skip
    return M.encode_plain(h, pl)


def per_datagram(n_conns: int, rounds: int, ike: str, data: bytes) -> tuple[float, str]:
    eng = IkeEngine([dataclasses.replace(conn(f"c{i}", ike=ike)) for i in range(n_conns)])
    gc.collect()  # (else the collection the previous run's garbage calls for falls in this one)
    t = time.thread_time()
    for k in range(rounds):
        src = Address(ipaddress.ip_address(f"198.51.{k // 250}.{k % 250 + 1}"), 500)
        eng.receive(data, src, R500, 0.0)
    return (time.thread_time() - t) / rounds, ",".join(sorted(eng.stats))


def at_limit(n_conns: int, rounds: int, ike: str, data: bytes) -> tuple[float, str]:
    """The same, all from one source that holds MAX_HALF_OPEN_PER_SOURCE half-open IKE SAs
    (acceptable INITs of its own, sent first): each is dropped by the per-source limit."""
    from ipsecct.ikev2.engine import MAX_HALF_OPEN_PER_SOURCE

    eng = IkeEngine([dataclasses.replace(conn(f"c{i}", ike=ike)) for i in range(n_conns)])
    src = Address(ipaddress.ip_address("198.51.100.9"), 500)
    for k in range(MAX_HALF_OPEN_PER_SOURCE):
        h = M.Header(bytes([k + 1] * 8), bytes(8), 0, M.ExchangeType.IKE_SA_INIT,
                     M.Flag.INITIATOR, 0, 0)  # fmt: skip
        T = M.TransformType
        eng.receive(M.encode_plain(h, [M.SAPayload((M.Proposal(1, M.ProtocolId.IKE, b"", (
            M.Transform(T.ENCR, 20, 128), M.Transform(T.PRF, 5), M.Transform(T.DH, 31))),)),
            M.KEPayload(31, bytes(range(32))), M.NoncePayload(bytes(32))]), src, R500, 0.0)
    gc.collect()
    t = time.thread_time()
    for _ in range(rounds):
        eng.receive(data, src, R500, 0.0)
    return (time.thread_time() - t) / rounds, ",".join(sorted(eng.stats))


def main(n_conns: int, rounds: int, ike: str) -> None:
    T = M.TransformType
    hostile = tuple(M.Proposal(i + 1, M.ProtocolId.IKE, b"", (
        M.Transform(T.ENCR, 20, 128), M.Transform(T.PRF, 5), M.Transform(T.DH, 1000 + i)))
        for i in range(255))  # fmt: skip
    normal = (M.Proposal(1, M.ProtocolId.IKE, b"", (
        M.Transform(T.ENCR, 20, 128), M.Transform(T.PRF, 5), M.Transform(T.DH, 31))),)
    for name, data in (("hostile", init(hostile)), ("acceptable", init(normal))):
        cost, what = per_datagram(n_conns, rounds, ike, data)
        print(f"{name}: {len(data)} octets, {n_conns} connections ({ike}): "
              f"{cost * 1e3:.2f} ms CPU per IKE_SA_INIT ({what})")
    cost, what = at_limit(n_conns, rounds, ike, init(hostile))
    print(f"hostile from a source at its half-open limit: {n_conns} connections ({ike}): "
          f"{cost * 1e3:.3f} ms CPU per IKE_SA_INIT ({what})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50,
         int(sys.argv[2]) if len(sys.argv) > 2 else 100,
         sys.argv[3] if len(sys.argv) > 3 else "default")

"""What one hostile CREATE_CHILD_SA costs the responder (on the event loop): an authenticated
peer sends 255 selectors in TSi and in TSr (any address, each with its own port range)
against a connection whose child has N remote subnets. The CPU time
(``time.thread_time``) of the responder's ``receive`` of the request (its RFC 7383 fragments),
median of ``runs``. For an older tree run it with that tree's ``src`` first on
PYTHONPATH (benchmarks/README.md).

    .venv/bin/python -m benchmarks.ts_narrow 1 10 32
"""

from __future__ import annotations

import ipaddress
import statistics
import sys
import time

from tests.helpers.ikev2_engines import Wire, conn, connect, mn_conn

from ipsecct.ikev2 import message as M
from ipsecct.ikev2.engine import IkeEngine, Output, Send
from ipsecct.ikev2.ts import from_text


def one(subnets: int) -> float:
    rc = conn()
    rc.children[0].remote_ts = [from_text(f"10.{100 + k}.0.0/16") for k in range(subnets)]
    w = Wire(IkeEngine([mn_conn(local_ts="10.100.0.5/32")]), IkeEngine([rc]))
    connect(w)
    (ii,) = w.ini.ike_sas()
    anything = [M.TrafficSelector(M.TsType.IPV4_ADDR_RANGE, 0, port, 65535,
                                  ipaddress.IPv4Address(0), ipaddress.IPv4Address(2**32 - 1))
                for port in range(255)]  # fmt: skip
    out: list[Output] = []
    spi = w.ini._new_child_spi()
    assert spi is not None
    w.ini._child_request(ii, "create-child", [], w.ini.connections[0].children[0].esp_proposals,
                         anything, anything, spi, 1.0, out)  # fmt: skip
    t = time.thread_time()
    for s in out:
        assert isinstance(s, Send)
        w.resp.receive(s.data, s.src, s.dst, 1.0)
    return time.thread_time() - t


def main(argv: list[str]) -> None:
    runs = 5
    for subnets in [int(a) for a in argv] or [1, 10, 32]:
        ms = statistics.median(one(subnets) for _ in range(runs)) * 1000
        print(f"{subnets} remote subnets: {ms:.1f} ms CPU per request (median of {runs})")


if __name__ == "__main__":
    main(sys.argv[1:])

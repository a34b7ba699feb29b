"""CPU of a target's UNIT checks while a committed transfer's reservation is partly taken.

A committed transfer of N IKE SAs (an address each) whose imports took all but one of its
reserved addresses; then N UNITs of another transfer of the same peer are checked
(``IkeService.check_unit``, as the transfer core calls it). Prints the CPU time
(``time.thread_time``) of those N checks.

    PYTHONPATH=TREE/src .venv/bin/python -m benchmarks.unit_reservations [N]
"""

from __future__ import annotations

import copy
import inspect
import ipaddress
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.ike_services import vip_service
from tests.helpers.ikev2_engines import connect, vip_pair

from ipsecct.ikev2 import context

FIRST = int(ipaddress.ip_address("10.3.0.1"))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    w = vip_pair()
    connect(w)
    (ike,) = w.resp.ike_sas()
    with tempfile.TemporaryDirectory() as tmp:
        svc = vip_service(Path(tmp))
    pool = svc.engine.pools["p4"]
    pool.last = ipaddress.ip_address("10.3.255.254")  # (room for 2 N addresses)
    payloads = []
    for i in range(2 * n):
        other = copy.copy(ike)
        other.vips = [("p4", ipaddress.ip_address(FIRST + i))]
        other.peer_id = f"id{i}"
        payloads += context.unit_payloads(other, other.children)
    # (a tree before the check was given the unit's SPIs: without them)
    spis = "spis" in inspect.signature(svc.check_unit).parameters

    def check(i: int, tid: int) -> None:
        args = ([i + 1],) if spis else ()
        assert svc.check_unit("sg1", payloads[i], tid, *args) is None

    states = {("sg1", 1): "open", ("sg1", 2): "open"}
    svc.incoming_state = lambda peer, tid: states[(peer, tid)]
    for i in range(n):
        check(i, 1)
    states[("sg1", 1)] = "committed"
    svc._prune_reserved(svc.node.clock())
    for i in range(n - 1):  # their IKE SAs came (the import takes the address), but one
        pool.reserved.pop(ipaddress.ip_address(FIRST + i))
    t0 = time.thread_time()
    for i in range(n, 2 * n):
        check(i, 2)
    print(f"N={n}: {n} unit checks, {(time.thread_time() - t0) * 1e3:.0f} ms CPU")


if __name__ == "__main__":
    main()

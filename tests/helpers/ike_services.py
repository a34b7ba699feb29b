"""A gateway's IKE service on a real node without sockets (``ike_service``, ``vip_service``
with address pools) and sg1's IKE SA whose CHILD SA is a transfer World's tunnel
(``unit_at_sg1``), for tests/test_ike_adapter, tests/test_ikev2_vip and the benchmarks
ike_commit_check and unit_reservations."""

from __future__ import annotations

from pathlib import Path

from ipsecct.gateway.config import from_dict
from ipsecct.gateway.ike import IkeService
from ipsecct.gateway.node import Node
from ipsecct.ikev2.ikesa import IkeSA
from tests.helpers.ikev2_engines import conn, connect, mn_conn, pair, vip_conn


def ike_service(tmp: Path, name: str = "sg2") -> IkeService:
    cfg = from_dict(
        {
            "name": name,
            "outer": {"address": "127.0.0.1", "port": 45000},
            "inner": {"kind": "udp", "listen": "127.0.0.1:45001", "peer": "127.0.0.1:45002"},
        },
        str(tmp / f"{name}.toml"),
    )
    return IkeService(Node(cfg), [conn(dpd=10)])


def unit_at_sg1(tmp_path: Path, w: object) -> tuple[IkeService, IkeSA]:
    """sg1's IKE service with one IKE SA whose only CHILD SA is the transfer World's tunnel
    (the unit the transfer moves)."""
    import dataclasses

    svc = ike_service(tmp_path, "sg1")
    p = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(p)
    (ike_r,) = p.resp.ike_sas()
    ike = svc.engine.import_ike(p.resp.export_ike(ike_r, 1.0), 1.0)
    (c,) = ike.children
    t = w.tunnel  # type: ignore[attr-defined]
    ike.children[:] = [dataclasses.replace(c, spi_in=t.inbound.spi, spi_out=t.outbound.spi)]
    return svc, ike


def vip_service(tmp: Path) -> IkeService:
    cfg = from_dict(
        {
            "name": "sg2",
            "outer": {"address": "127.0.0.1", "port": 45000},
            "inner": {"kind": "udp", "listen": "127.0.0.1:45001", "peer": "127.0.0.1:45002"},
            "pools": {"p4": {"addrs": "10.3.0.0/24"}, "p6": {"addrs": "fd00::/120"}},
        },
        str(tmp / "sg2.toml"),
    )
    return IkeService(Node(cfg), [vip_conn()])

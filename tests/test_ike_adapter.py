"""The gateway's IKEv2 adapter (gateway/ike.py) with a real node (no sockets bound): what it
does around the engine when an IKE SA arrives from a peer gateway."""

from __future__ import annotations

from pathlib import Path

from ipsecct.ct.transfer import Record
from ipsecct.gateway.config import from_dict
from ipsecct.gateway.ike import IkeService
from ipsecct.gateway.node import Node
from ipsecct.ikev2.engine import Send
from tests.helpers.ikev2_engines import I500, R500, conn, connect, mn_conn, pair


def _service(tmp: Path) -> IkeService:
    cfg = from_dict(
        {
            "name": "sg2",
            "outer": {"address": "127.0.0.1", "port": 45000},
            "inner": {"kind": "udp", "listen": "127.0.0.1:45001", "peer": "127.0.0.1:45002"},
        },
        str(tmp / "sg2.toml"),
    )
    return IkeService(Node(cfg), [conn(dpd=10)])


def test_a_request_that_arrives_before_its_ike_sa_is_answered_once_it_has_come(
    tmp_path: Path,
) -> None:
    """Just after a transfer to this gateway committed, the peer's liveness check reaches it
    (the virtual address moved) before the IKE SA's context: kept, and answered as soon as the
    IKE SA is imported. Without a transfer just before, it is dropped at once."""
    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    cdbs = w.resp.export_ike(ike_r, 1.0)
    svc = _service(tmp_path)
    (req,) = [o for o in w.ini.liveness(ike_i, 1.0) if isinstance(o, Send)]
    svc._receive(req.data, I500, R500)  # no transfer: an unknown SPI, dropped
    assert svc.engine.stats["unknown-spi"] == 1 and svc.engine.stats["early-kept"] == 0
    svc.on_transfer(Record(1, "target", "sg1", "predictive", 0.0, 0.0, "committed"))
    svc._receive(req.data, I500, R500)
    assert svc.engine.stats["early-kept"] == 1 and svc.engine.stats["unknown-spi"] == 1
    svc.receive_context("sg1", cdbs)
    assert svc.engine.stats["early-replayed"] == 1
    assert svc.engine.stats["liveness-answered"] == 1

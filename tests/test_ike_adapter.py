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


def test_replay_counter_sync_moves_our_outbound_counters_forward(tmp_path: Path) -> None:
    """RFC 6311 as the peer: the member that took our IKE SA over asks us to advance the
    outbound ESP counters of its CHILD SAs; the adapter moves the installed SAs forward by the
    delta (never backwards, never past the limit) and logs it."""
    from ipsecct.ikev2 import context
    from ipsecct.ikev2.engine import ChildUp, IkeEngine

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    svc = _service(tmp_path)
    svc.engine = w.ini  # this adapter runs the MN's side
    for c in ike_i.children:
        svc._one(ChildUp(ike_i, c))
    t = ike_i.children[0].handle
    assert t is not None
    out_sa = t.outbound  # type: ignore[attr-defined]
    out_sa.seq = 1000
    sg2 = IkeEngine([conn(dpd=10)])
    taken = sg2.import_ike(context.encode(ike_r, 2.0), 2.0)
    (req,) = [o for o in sg2.start_mid_sync(taken, 3.0, esp_delta=16384) if isinstance(o, Send)]
    for o in w.ini.receive(req.data, R500, I500, 3.0):
        if not isinstance(o, Send):
            svc._one(o)
    assert out_sa.seq == 1000 + 16384
    assert w.ini.stats["replay-sync-applied"] == 1

"""The gateway's IKEv2 adapter (gateway/ike.py) with a real node (no sockets bound): what it
does around the engine when an IKE SA arrives from a peer gateway."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ipsecct.ct.transfer import Identity, Record
from ipsecct.gateway.config import from_dict
from ipsecct.gateway.ike import IkeService
from ipsecct.gateway.node import Node
from ipsecct.ikev2.config import Connection
from ipsecct.ikev2.engine import INIT_ANSWERS, Output, Send
from ipsecct.ikev2.ikesa import Address, ChildSA, IkeSA, IkeState
from ipsecct.ipsec.engine import Tunnel
from ipsecct.ipsec.sad import SecurityAssociation
from tests.helpers.ike_services import ike_service, unit_at_sg1
from tests.helpers.ikev2_engines import (
    I500,
    R500,
    conn,
    connect,
    gateway_rekeyed_before_the_fail_over,
    mn_conn,
    pair,
    peer_rekeyed_before_the_move,
    sends,
)
from tests.helpers.transfer import Gw, World


def _client_with_tunnel(tmp: Path) -> tuple[IkeService, IkeSA, ChildSA]:
    """A gateway's IKE service holding one client's IKE SA (imported at 1.0, as a peer
    gateway would hand it over) and its CHILD SA's tunnel, added to the node's engine."""
    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    svc = ike_service(tmp)
    ike = svc.engine.import_ike(w.resp.export_ike(ike_r, 1.0), 1.0)
    (c1,) = ike.children
    entry, out, inn = c1.sas(R500, I500, False, "t-1")
    c1.handle = svc.node.engine.add_tunnel(entry, out, inn)
    return svc, ike, c1


def _two_clients(tmp: Path) -> tuple[IkeService, IkeSA, IkeSA]:
    """A gateway's IKE service holding the IKE SAs of two clients, V and M, each with one
    CHILD SA (imported as a peer gateway would hand them over, at 1.0 and 2.0)."""
    svc = ike_service(tmp)
    ikes = []
    for t in (1.0, 2.0):
        w = pair(mn_conn(dpd=10), conn(dpd=10))
        connect(w)
        (ike_r,) = w.resp.ike_sas()
        ikes.append(svc.engine.import_ike(w.resp.export_ike(ike_r, t), t))
    return svc, ikes[0], ikes[1]


def _handed_over(svc: IkeService, ike: object, peer: str = "sg1") -> None:
    """The tunnels of ``ike``'s CHILD SAs installed at ``svc`` by a transfer from ``peer``
    (committed), as before a handover's context arrives: the context is taken only then."""
    for c in ike.children:  # type: ignore[attr-defined]
        entry, out, inn = c.sas(R500, I500, False, f"moved-{c.spi_in:08x}")
        svc.node.engine.add_tunnel(entry, out, inn).came_from = peer


def _announce(svc: IkeService, ike: IkeSA, peer: str = "sg1") -> None:
    """``svc`` admits the UNIT of a transfer of ``ike`` from ``peer``: the IKE SA is announced
    (what reaches ``svc`` for it before its context is kept)."""
    from ipsecct.ikev2 import context

    for p in context.unit_payloads(ike, ike.children):
        assert svc.check_unit(peer, p) is None


def test_ike_junk_from_anyone_does_not_rescan_every_ike_sa(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After every IKE datagram the adapter re-armed the node's timer, which asks the engine
    for its next deadline: a scan of every IKE SA and half-open IKE SA (8 ms with 10,000 IKE
    SAs, 0.8 ms with 1000), for datagrams the engine dropped at once too (3.5 us: an unknown
    SPI, malformed, a cookie asked for), so anyone could make each of its datagrams cost the
    gateway a thousand times what it cost to send. Only a message that reached an IKE SA (or
    made one) re-arms it now; counted here as re-arms, not time."""
    from ipsecct.ikev2.engine import IkeEngine

    svc = ike_service(tmp_path)
    pokes = 0

    def poke() -> None:
        nonlocal pokes
        pokes += 1

    monkeypatch.setattr(svc.node.timers, "poke", poke)
    ini = IkeEngine([mn_conn()])
    (init,) = ini.initiate(ini.connections[0], I500, R500, 0.0)
    assert isinstance(init, Send)
    junk = [
        bytes(8) + bytes(8) + bytes([33, 0x20, 37, 8]) + bytes(4) + (28).to_bytes(4, "big"),
        init.data[:8] + bytes(7) + b"\x01" + init.data[16:],  # an SPIr: an unknown IKE SA
        b"\xff" * 40,  # not IKE at all
        init.data[:-1],  # truncated
        init.data + bytes(10001),  # past max_packet
    ]
    for _ in range(200):
        for j in junk:
            svc._receive(j, I500, R500)
    assert pokes == 0 and not svc.engine.half_open
    svc._receive(init.data, I500, R500)  # a real one: its half-open IKE SA has a deadline
    assert pokes == 1 and len(svc.engine.half_open) == 1
    svc.engine.cookie_threshold = 0  # under load: cookies asked for, nothing kept
    for _ in range(100):
        (other,) = IkeEngine([mn_conn()]).initiate(ini.connections[0], I500, R500, 0.0)
        assert isinstance(other, Send)
        svc._receive(other.data, I500, R500)
        svc._receive(init.data, I500, R500)  # (its retransmission: answered a few times)
    assert pokes == 1 and svc.engine.stats["cookie-sent"] == 100
    assert svc.engine.stats["retransmit-answered"] == INIT_ANSWERS
    assert svc.engine.stats["init-retransmit-unanswered"] == 100 - INIT_ANSWERS


def test_a_request_that_arrives_before_its_ike_sa_is_answered_once_it_has_come(
    tmp_path: Path,
) -> None:
    """Just after a transfer to this gateway committed, the peer's liveness check reaches it
    (the virtual address moved) before the IKE SA's context: kept, and answered as soon as the
    IKE SA is imported. Without a transfer just before, it is dropped at once; so is one for
    an IKE SA no admitted UNIT announced (its context is not on its way)."""
    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    cdbs = w.resp.export_ike(ike_r, 1.0)
    svc = ike_service(tmp_path)
    (req,) = [o for o in w.ini.liveness(ike_i, 1.0) if isinstance(o, Send)]
    svc._receive(req.data, I500, R500)  # no transfer: an unknown SPI, dropped
    assert svc.engine.stats["unknown-spi"] == 1 and svc.engine.stats["early-kept"] == 0
    svc.on_transfer(Record(1, "target", "sg1", "predictive", 0.0, 0.0, "committed"))
    svc._receive(req.data, I500, R500)  # not announced: dropped as before
    assert svc.engine.stats["unknown-spi"] == 2 and svc.engine.stats["early-kept"] == 0
    assert svc.engine.stats["early-unannounced"] == 1
    _announce(svc, ike_r)
    svc._receive(req.data, I500, R500)
    assert svc.engine.stats["early-kept"] == 1 and svc.engine.stats["unknown-spi"] == 2
    _handed_over(svc, ike_r)
    svc.receive_context("sg1", cdbs)
    assert svc.engine.stats["early-replayed"] == 1
    assert svc.engine.stats["liveness-answered"] == 1


def test_a_flood_of_early_ike_messages_does_not_keep_out_a_moved_clients_request(
    tmp_path: Path,
) -> None:
    """The messages kept for IKE SAs not here yet (just after a transfer to us committed)
    were one queue of 64 for every source, dropped silently when full: one source sending
    junk with unknown SPIs filled it. Then one source kept at most 16 and a source holding
    fewer took the place of the one holding the most, but 64 (spoofed) sources sending one
    message each still left no room: the moved client's liveness check was dropped and went
    unanswered until its retransmission. Now only messages for an IKE SA an admitted UNIT
    announced are kept (``early-unannounced`` the others, processed as without a transfer):
    a flood with made-up SPIs from 1,000 sources keeps nothing, and the client's request is
    answered once its IKE SA comes. Among announced ones the bounds hold as before: 16 from
    one source, 64 in all, the heaviest source yielding (``early-dropped``)."""
    from ipsecct.gateway.ike import EARLY_IKE_MAX, EARLY_IKE_PER_SOURCE
    from ipsecct.ikev2 import context

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    cdbs = w.resp.export_ike(ike_r, 1.0)
    svc = ike_service(tmp_path)
    svc.node.clock = lambda: 50.0  # (all within the second after the commit)
    stats = svc.engine.stats
    _announce(svc, ike_r)
    svc.on_transfer(Record(1, "target", "sg1", "predictive", 0.0, 0.0, "committed"))
    (req,) = [o for o in w.ini.liveness(ike_i, 1.0) if isinstance(o, Send)]
    sent = 0

    def flood(host: str, n: int, spi: bytes | None = None) -> None:
        nonlocal sent
        src = Address(ipaddress.ip_address(host), 500)
        for _ in range(n):
            sent += 1  # an INFORMATIONAL request for an IKE SA "ours" that is not here
            ours = spi if spi is not None else sent.to_bytes(8, "big")
            junk = (bytes(8) + ours + bytes([46, 0x20, 37, 0x08])
                    + bytes(4) + (28).to_bytes(4, "big"))  # fmt: skip
            svc._receive(junk, src, R500)

    for h in range(1000):  # 1,000 spoofed sources, one message each: none kept
        flood(f"198.51.{h // 250}.{h % 250 + 1}", 1)
    assert stats["early-kept"] == 0 and stats["early-unannounced"] == 1000
    svc._receive(req.data, I500, R500)  # the moved client's liveness check: kept
    assert [e[1] for e in svc._early] == [req.data]
    # the bounds among announced ones (a hostile peer announcing SPIs of its own)
    w2 = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w2)
    (other,) = w2.resp.ike_sas()
    assert svc.check_unit("sg3", context.unit_payloads(other, other.children)[0]) is None
    flood("198.51.100.1", 200, other.our_spi)
    assert stats["early-kept"] == 1 + EARLY_IKE_PER_SOURCE == 17
    assert stats["early-dropped"] == 200 - 16
    for h in range(2, 9):  # eight sources fill the queue
        flood(f"198.51.100.{h}", 20, other.our_spi)
    assert len(svc._early) == EARLY_IKE_MAX == 64
    assert any(e[1] == req.data for e in svc._early)
    _handed_over(svc, ike_r)
    svc.receive_context("sg1", cdbs)
    assert stats["early-replayed"] == 1 and stats["liveness-answered"] == 1


def test_a_request_forwarded_early_by_another_peer_is_not_replayed(tmp_path: Path) -> None:
    """Kept early, an IKE request forwarded by a peer gateway is processed once its IKE SA
    is here only if that very peer handed the IKE SA over (as receive_forwarded checks
    for one that comes after it): sg3 forwarding for the IKE SA sg1 hands over is refused
    (``forward-refused``); the same request forwarded by sg1 is answered."""
    from ipsecct.ikev2 import context as ike_context

    for via, answered in (("sg3", 0), ("sg1", 1)):
        w = pair(mn_conn(dpd=10), conn(dpd=10))
        connect(w)
        (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
        cdbs = w.resp.export_ike(ike_r, 1.0)
        svc = ike_service(tmp_path)
        (req,) = [o for o in w.ini.liveness(ike_i, 1.0) if isinstance(o, Send)]
        _announce(svc, ike_r)
        svc.on_transfer(Record(1, "target", "sg1", "predictive", 0.0, 0.0, "committed"))
        svc.receive_forwarded(via, ike_context.encode_forward(req.data, I500, R500))
        assert svc.engine.stats["early-kept"] == 1
        _handed_over(svc, ike_r)
        svc.receive_context("sg1", cdbs)
        assert svc.engine.stats["early-replayed"] == answered
        assert svc.engine.stats["liveness-answered"] == answered
        assert svc.engine.stats["forward-refused"] == 1 - answered


def test_replay_counter_sync_moves_our_outbound_counters_forward(tmp_path: Path) -> None:
    """RFC 6311 as the peer: the member that took our IKE SA over asks us to advance the
    outbound ESP counters of its CHILD SAs; the adapter moves the installed SAs forward by the
    delta (never backwards, never past the limit) and logs it."""
    from ipsecct.ikev2 import context
    from ipsecct.ikev2.engine import ChildUp, IkeEngine

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    svc = ike_service(tmp_path)
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



def test_a_request_that_reaches_the_old_gateway_is_forwarded_to_the_new_one(
    tmp_path: Path,
) -> None:
    """After a handover (direct identity), the client's request still reaches sg1 (it sent it
    before it read sg2's address update): sg1 forwards it over the channel to sg2, which
    answers it at once (instead of the client retransmitting to sg2 about 4 s later); bounded
    per source, only for IKE SAs that moved, within the forward window; sg2 takes forwards
    only from the gateway that handed it the IKE SA, from the IKE SA's own peer address."""
    from ipsecct.ikev2 import context
    from ipsecct.ikev2.ikesa import Address

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    sg1, sg2 = ike_service(tmp_path, "sg1"), ike_service(tmp_path, "sg2")
    sg1.engine = w.resp
    sg1.send_context = lambda peer, cdbs, mn: sg2.receive_context("sg1", cdbs)
    forwarded: list[tuple[str, bytes]] = []
    sg1.forward_ike = lambda peer, cdb, mn: forwarded.append((peer, cdb))
    answers: list[Send] = []
    sg2._send = answers.append  # type: ignore[method-assign, assignment]
    _handed_over(sg2, ike_r)
    sg1._export(ike_r, "sg2", 0)
    assert not sg1.engine.ike_sas() and len(sg2.engine.ike_sas()) == 1
    (req,) = [o for o in w.ini.liveness(ike_i, 1.0) if isinstance(o, Send)]
    sg1._receive(req.data, I500, R500)
    assert sg1.engine.stats["forwarded"] == 1 and sg1.engine.stats["unknown-spi"] == 0
    ((peer, cdb),) = forwarded
    assert peer == "sg2"
    # from another gateway, or claiming another source address: refused
    sg2.receive_context("sg3", [cdb])
    other = Address(I500.host, 4500)
    sg2.receive_context("sg1", [context.encode_forward(req.data, other, R500)])
    sg2.receive_context("sg1", [cdb[:-8] + bytes(7) + b"\1"])  # malformed
    assert sg2.engine.stats["forward-refused"] == 2
    assert sg2.engine.stats["forward-malformed"] == 1 and not answers
    sg2.receive_context("sg1", [cdb])
    assert sg2.engine.stats["forward-received"] == 1
    assert sg2.engine.stats["liveness-answered"] == 1
    (answer,) = answers
    assert answer.dst == I500
    w.ini.receive(answer.data, answer.src, I500, 1.5)
    assert ike_i.pending is None and w.ini.stats["liveness-ok"] == 1
    # a flood through sg1 from one source: at most the burst is forwarded
    forwarded.clear()
    for _ in range(50):
        sg1._receive(req.data, I500, R500)
    assert len(forwarded) <= 11 and sg1.engine.stats["forward-rate-limited"] >= 39
    # after the window nothing is forwarded any more
    forwarded.clear()
    sg1._moved = {k: (p, 0.0) for k, (p, _) in sg1._moved.items()}
    sg1._receive(req.data, I500, R500)
    assert not forwarded and sg1.engine.stats["unknown-spi"] == 1


def test_an_ike_sa_from_a_peer_takes_only_tunnels_that_peer_handed_over(tmp_path: Path) -> None:
    """A peer gateway hands over an IKE SA (keys of its own making) whose CHILD SA names the
    inbound SPI of a tunnel this gateway holds that the peer never handed over (made here,
    or handed over by another gateway): before, the IKE SA took that tunnel as its CHILD
    SA's, and the peer could delete it, rekey it or move its address with IKE messages.
    Refused whole now; taken when that very peer handed the tunnel over."""
    from tests.helpers.transfer import World

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    (child,) = ike_r.children
    cdbs = w.resp.export_ike(ike_r, 1.0)
    for came_from in (None, "sg3", "sg1"):
        svc = ike_service(tmp_path)
        entry, out, inn = child.sas(R500, I500, False, "here")
        victim = svc.node.engine.add_tunnel(entry, out, inn)
        victim.came_from = came_from
        svc.receive_context("sg1", cdbs)
        if came_from == "sg1":
            (ike,) = svc.engine.ike_sas()
            assert ike.children[0].handle is victim
            continue
        assert svc.engine.ike_sas() == [] and svc.engine.stats["ike-context-refused"] == 1
        assert svc.node.engine.tunnels() == [victim]
    # the transfer core marks what it installs with the peer that sent it
    tw = World()
    tw.transfer()
    tw.deliver("sg1", "sg2")
    (t2,) = tw.gw["sg2"].engine.tunnels()
    assert t2.came_from == "sg1" and tw.tunnel.came_from is None


def test_a_clients_outbound_spi_equal_to_a_moved_child_sas_inbound_spi_takes_nothing(
        tmp_path: Path) -> None:  # fmt: skip
    """A client M of this gateway chose, as the SPI of its own inbound SA (our outbound SPI
    towards it: the peer picks it, any 32 bits), the inbound SPI of another client V's CHILD
    SA, which it saw in V's ESP headers on the wire (or by chance: with 10,000 tunnels one
    such pair comes about once in 40 gateways). V's tunnel is then handed over here by sg1,
    and its IKE SA's context follows. The CHILD SA was looked up by its inbound SPI among
    the SAs of either direction: M's tunnel, installed first, came up, was not one sg1 had
    handed over, and V's IKE SA was refused (ike-context-refused; V's CHILD SA here without
    its IKE SA: never rekeyed, its DELETE never sent). It is found among inbound SAs only
    now: V's IKE SA takes V's tunnel, and M's is left alone."""
    import ipaddress

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    (child,) = ike_r.children
    cdbs = w.resp.export_ike(ike_r, 1.0)
    m = pair(mn_conn(dpd=10, local_ts="10.2.0.9/32"), conn(dpd=10))
    connect(m)
    ((m_child,),) = [i.children for i in m.resp.ike_sas()]
    m_child.spi_out = child.spi_in  # M's choice
    svc = ike_service(tmp_path)
    m_addr = Address(ipaddress.ip_address("192.0.2.20"), 500)
    m_tunnel = svc.node.engine.add_tunnel(*m_child.sas(R500, m_addr, False, "m"))
    _handed_over(svc, ike_r)
    (v_tunnel,) = [t for t in svc.node.engine.tunnels() if t is not m_tunnel]
    svc.receive_context("sg1", cdbs)
    assert svc.engine.stats["ike-context-refused"] == 0
    (ike,) = svc.engine.ike_sas()
    assert ike.children[0].handle is v_tunnel
    assert svc.node.engine.has_tunnel(m_tunnel) and m_tunnel.outbound.spi == child.spi_in


@pytest.mark.parametrize("children", ["unknown SPIs", "none"])
def test_an_ike_sa_no_tunnel_of_which_the_peer_handed_over_is_not_taken(
    tmp_path: Path, children: str
) -> None:
    """A peer gateway (authenticated, hostile or confused) sends the context of an IKE SA
    without any transfer before it: its CHILD SAs name no tunnel here, or it has none (a
    handover never sends one: an IKE SA follows its CHILD SAs only). It was imported: under
    ``unique = replace`` it deleted the client's own IKE SA here (a peer gateway could end
    any client's IKE SA by naming its identity), and it held whatever virtual IP it named.
    Refused whole now (``ike-context-refused``); the client's IKE SA stays."""
    import dataclasses

    from ipsecct.ikev2.engine import IkeEngine
    from tests.helpers.ikev2_engines import Wire

    cfg = from_dict({"name": "sg2", "outer": {"address": "127.0.0.1", "port": 45000},
                     "inner": {"kind": "udp", "listen": "127.0.0.1:45001",
                               "peer": "127.0.0.1:45002"}}, str(tmp_path / "sg2.toml"))
    svc = IkeService(Node(cfg), [dataclasses.replace(conn(dpd=10), unique="replace")])
    mine = Wire(IkeEngine([mn_conn(dpd=10)]), svc.engine)  # the client, here
    connect(mine)
    (own,) = svc.engine.ike_sas()
    w = pair(mn_conn(dpd=10), conn(dpd=10))  # the same identity, at the peer gateway
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    if children == "none":
        ike_r.children = []
    cdbs = w.resp.export_ike(ike_r, 1.0)
    svc.receive_context("sg1", cdbs)
    assert svc.engine.ike_sas() == [own] and own.state.name == "ESTABLISHED"
    assert svc.engine.stats["ike-context-refused"] == 1


def test_an_ike_sa_before_the_commit_of_its_tunnels_transfer_is_not_taken(
    tmp_path: Path,
) -> None:
    """The IKE SA's context follows the COMMIT of the transfer that moved its CHILD SAs' tunnels
    (the source sends it after, on the same ordered channel). One that comes before (a
    confused or hostile peer) is refused whole: the transfer may yet be cancelled and the
    IKE SA stay at the source too, run by two gateways. The transfer core says which
    tunnels still wait for their COMMIT."""
    from tests.helpers.transfer import World

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    (child,) = ike_r.children
    cdbs = w.resp.export_ike(ike_r, 1.0)
    for waiting in (True, False):
        svc = ike_service(tmp_path)
        entry, out, inn = child.sas(R500, I500, False, "here")
        arrived = svc.node.engine.add_tunnel(entry, out, inn)
        arrived.came_from = "sg1"
        svc.awaiting_commit = lambda t, waiting=waiting: waiting  # type: ignore[misc]
        svc.receive_context("sg1", cdbs)
        taken = bool(svc.engine.ike_sas())
        assert taken is not waiting
        assert svc.engine.stats["ike-context-refused"] == (1 if waiting else 0)
    # the core: pending until the COMMIT comes (then, waiting for its record, no longer)
    tw = World()
    tw.transfer()
    tw.deliver("sg1", "sg2")
    (t2,) = tw.gw["sg2"].engine.tunnels()
    core2 = tw.gw["sg2"].core
    assert core2.awaiting_commit(t2)
    tw.deliver_all()
    assert t2.state.value == "active" and not core2.awaiting_commit(t2)


def test_what_an_operator_names_moves_the_ike_sa_with_all_its_child_sas(tmp_path: Path) -> None:
    """``ipsecct transfer WHAT``: a connection's name, an IKE SPI (either, with or without 0x)
    or the SPI of any of its CHILD SAs names one IKE SA, and all its CHILD SAs move with it
    (an IKE SA and its CHILD SAs are one unit); what names no IKE SA is left to the manual
    tunnels (None); a connection with two IKE SAs is ambiguous."""
    import dataclasses

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    svc = ike_service(tmp_path)
    ike = svc.engine.import_ike(w.resp.export_ike(ike_r, 1.0), 1.0)
    (c1,) = ike.children
    c2 = dataclasses.replace(c1, spi_in=0x7000_0001, spi_out=0x7000_0002)
    ike.children.append(c2)
    both = [c1.spi_in, 0x7000_0001]
    name = ike.conn.name
    for what in (name, ike.spi_i.hex(), "0x" + ike.spi_r.hex().upper(), hex(c1.spi_out),
                 hex(c2.spi_in), str(c2.spi_out), ike.spi_i.hex() + "_i",
                 ike.spi_r.hex() + "_r"):  # fmt: skip
        assert svc.transfer_unit(what) == both, what  # (as sa delete --ike reads them)
        assert svc.find(what) == [ike], what
    for what in ("other", "0x" + "ab" * 8, "0x12345678", "12:34"):
        assert svc.transfer_unit(what) is None, what
    # anyone's IKE_SA_INIT (unauthenticated: a half-open IKE SA of the connection) made the
    # name ambiguous ("has 2 IKE SAs here"): the README's `ipsecct transfer rw` failed
    from ipsecct.ikev2.engine import IkeEngine, Send
    from ipsecct.ikev2.ikesa import IkeState

    other = IkeEngine([mn_conn()])
    for o in other.initiate(other.connections[0], I500, ike.local, 2.0):
        if isinstance(o, Send):
            svc.engine.receive(o.data, o.src, o.dst, 2.0)
    assert len(svc.engine.ike_sas()) == 2
    assert svc.transfer_unit(name) == both
    # ... and so did the IKE SA a rekey replaced, for the minute it waits for its DELETE
    half_open = next(i for i in svc.engine.ike_sas() if i is not ike)
    half_open.state = IkeState.REKEYED
    assert svc.transfer_unit(name) == both
    ike.children.clear()
    with pytest.raises(ValueError, match="no CHILD SA"):
        svc.transfer_unit(name)
    w2 = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w2)
    (ike_r2,) = w2.resp.ike_sas()
    ike2 = svc.engine.import_ike(w2.resp.export_ike(ike_r2, 2.0), 2.0)
    with pytest.raises(ValueError, match="2 IKE SAs"):
        svc.transfer_unit(name)
    # a CHILD SA's outbound SPI is its peer's choice: another peer's CHILD SA may have the
    # same number. Named by it, the two are ambiguous: a clear error, not "too many values
    # to unpack"; each IKE SA is still named by its IKE SPI
    (c3,) = ike2.children
    ike.children.append(dataclasses.replace(c1, spi_in=0x7000_0003, spi_out=c3.spi_in))
    with pytest.raises(ValueError, match="CHILD SA's of 2 IKE SAs here: name one by its IKE"):
        svc.transfer_unit(hex(c3.spi_in))
    assert svc.transfer_unit(ike2.spi_r.hex()) == [c3.spi_in]
    # a DEAD IKE SA (dropped, its entry not yet gone) is named by nothing
    ike2.state = IkeState.DEAD
    assert svc.transfer_unit(ike2.spi_r.hex()) is None
    assert svc.transfer_unit(name) == [0x7000_0003]


def test_what_an_operator_names_for_sa_delete_ike_and_when_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ipsecct sa delete --ike WHAT`` / ``--ike-id N``: a connection names each of its
    established IKE SAs (one half-open or rekeyed only by SPI or number), an IKE SPI (either,
    0x or swanctl's _i/_r) or a CHILD SA's SPI names its IKE SA; anything else is a
    ValueError saying so. Refused (nothing deleted, nothing sent) while the IKE SA is
    quiet, while a CHILD SA's tunnel is in a transfer (held, or as the transfer core says)
    and while this gateway is fenced; else its tunnels leave the SAD at once and the
    DELETE goes out."""
    import dataclasses

    from ipsecct.ikev2.engine import IkeEngine
    from ipsecct.ikev2.ikesa import IkeState
    from ipsecct.ipsec.sad import Protocol

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    svc = ike_service(tmp_path)
    ike = svc.engine.import_ike(w.resp.export_ike(ike_r, 1.0), 1.0)
    (c1,) = ike.children
    c2 = dataclasses.replace(c1, spi_in=0x7000_0001, spi_out=0x7000_0002)
    ike.children.append(c2)
    name = ike.conn.name
    for what in (name, ike.spi_i.hex(), "0x" + ike.spi_r.hex().upper(), ike.spi_i.hex() + "_i",
                 ike.spi_r.hex() + "_r", hex(c1.spi_out), hex(c2.spi_in), str(c2.spi_out)):
        assert svc.find(what) == [ike], what  # fmt: skip
    assert svc.find(uid=ike.uid) == [ike]
    for what in ("other", "0x" + "ab" * 8, "0x12345678", "12:34", "ab" * 8 + "_x"):
        with pytest.raises(ValueError, match="no IKE SA, connection or SPI"):
            svc.find(what)
    with pytest.raises(ValueError, match=f"no IKE SA #{ike.uid + 1000}"):
        svc.find(uid=ike.uid + 1000)
    # anyone's IKE_SA_INIT (a half-open IKE SA of the connection) is not named by it
    other = IkeEngine([mn_conn()])
    for o in other.initiate(other.connections[0], I500, ike.local, 2.0):
        if isinstance(o, Send):
            svc.engine.receive(o.data, o.src, o.dst, 2.0)
    half = next(i for i in svc.engine.ike_sas() if i is not ike)
    assert svc.find(name) == [ike] and svc.find(uid=half.uid) == [half]
    half.state = IkeState.REKEYED  # (nor one a rekey replaced, waiting for its DELETE)
    assert svc.find(name) == [ike]
    assert "was rekeyed" in (svc.terminate_refusal(half, 2.0) or "")
    half.state = IkeState.HALF_OPEN
    # a second established IKE SA of the connection: both named (swanctl --terminate --ike)
    w2 = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w2)
    (ike_r2,) = w2.resp.ike_sas()
    ike2 = svc.engine.import_ike(w2.resp.export_ike(ike_r2, 2.0), 2.0)
    assert svc.find(name) == [ike, ike2]

    # refusals
    eng = svc.node.engine
    for c in ike.children:
        entry, out, inn = c.sas(R500, I500, False, f"t-{c.spi_in:08x}")
        c.handle = eng.add_tunnel(entry, out, inn)
    now = svc.node.clock()
    assert svc.terminate_refusal(ike, now) is None
    ike.quiet = True
    assert "is being transferred" in (svc.terminate_refusal(ike, now) or "")
    ike.quiet = False
    t2 = c2.handle
    eng.hold(t2)  # type: ignore[arg-type]
    assert "0x70000001 is held" in (svc.terminate_refusal(ike, now) or "")
    eng.activate(t2)  # type: ignore[arg-type]
    svc.transfer_role = lambda t: ("leaving", "transfer 00ab to sg1") if t is t2 else None
    assert "(leaving: transfer 00ab to sg1)" in (svc.terminate_refusal(ike, now) or "")
    svc.transfer_role = lambda t: None
    svc.fenced = lambda now: True
    assert "may not send now" in (svc.terminate_refusal(ike, now) or "")
    svc.fenced = None
    # deleted: its tunnels gone from the SAD before the DELETE is sent
    sent: list[bytes] = []

    def send_outer(data: bytes, dst: object) -> None:
        assert eng.sad.lookup_spi(Protocol.ESP, c1.spi_in) is None
        sent.append(data)

    monkeypatch.setattr(svc.node, "send_outer", send_outer)
    row = svc.terminate_one(ike)
    assert len(sent) == 1 and row["delete_sent"] is True
    assert row["children"] == [f"0x{c1.spi_in:08x}", "0x70000001"]
    assert ike.state is IkeState.DELETING and not ike.children
    assert all(eng.sad.lookup_spi(Protocol.ESP, s) is None
               for s in (c1.spi_in, c1.spi_out, c2.spi_in, c2.spi_out))  # fmt: skip
    assert "being deleted already" in (svc.terminate_refusal(ike, now) or "")
    assert svc.find(name) == [ike2]  # (one being deleted is not named by its connection)
    # a half-open one is dropped: nothing to tell
    row = svc.terminate_one(half)
    assert len(sent) == 1 and row["delete_sent"] is False and half.state is IkeState.DEAD


def test_an_spi_a_peer_chose_to_be_another_ones_names_neither_for_sa_delete_or_rekey(
        tmp_path: Path) -> None:  # fmt: skip
    """A peer chooses the SPIs of its own side (its IKE SPI as initiator, its CHILD SAs'
    inbound SPIs: our outbound ones), any value, and sees another client's on the wire (IKE
    headers, ESP headers). A hostile client M took as its CHILD SA's inbound SPI the inbound
    SPI of client V's CHILD SA, and as its IKE SPI V's IKE SA's responder SPI (ours): an
    operator who named either SPI to delete or rekey one of them (``sa delete --ike SPI``,
    ``sa rekey SPI``) acted on both IKE SAs, or on whichever came first. Such an SPI now
    names neither (ValueError saying why and what to name instead), as ``ipsecct
    transfer`` already refused it; the IKE SA's number and the SPIs only one has still name
    it."""
    import dataclasses

    svc, v, m = _two_clients(tmp_path)
    (vc,), (mc,) = v.children, m.children
    m.children[0] = mc = dataclasses.replace(mc, spi_out=vc.spi_in)  # M's choices
    m.spi_i = v.spi_r
    for what in (hex(vc.spi_in), v.spi_r.hex()):
        with pytest.raises(ValueError, match="names 2 IKE SAs here"):
            svc.find(what)
    with pytest.raises(ValueError, match="names 2 CHILD SAs here"):
        svc.child_named(vc.spi_in)
    assert svc.find(hex(vc.spi_out)) == [v] and svc.find(v.spi_i.hex()) == [v]
    assert svc.find(uid=m.uid) == [m] and svc.find(m.spi_r.hex()) == [m]
    assert svc.child_named(vc.spi_out) == (v, vc) and svc.child_named(mc.spi_in) == (m, mc)
    assert svc.find(v.conn.name) == [v, m]  # (a connection names each of its IKE SAs)


def test_a_transfer_takes_the_ike_sa_of_its_tunnels_whatever_spi_another_peer_chose(
        tmp_path: Path) -> None:  # fmt: skip
    """Two clients chose the same SPI for their inbound CHILD SA (our outbound SPI to each:
    the peer's choice, any 32 bits; by chance, one pair in about 80 gateways of 10,000
    tunnels, or on purpose, M copying V's from the ESP headers we send V). The IKE SA that
    follows a transfer of V's tunnel, and whose leases are noted leaving, was looked up by
    that outbound SPI: the index kept M's IKE SA for it, so V's IKE SA did not follow its
    CHILD SA (the unit split: its CHILD SA at the target, the IKE SA that rekeys and deletes
    it here). Each tunnel's IKE SA is the one whose CHILD SA holds it now."""
    import dataclasses
    import ipaddress

    svc, v, m = _two_clients(tmp_path)
    m.children[0] = dataclasses.replace(m.children[0], spi_out=v.children[0].spi_out)
    eng = svc.node.engine
    m_addr = Address(ipaddress.ip_address("192.0.2.20"), 500)
    for ike, peer in ((v, I500), (m, m_addr)):
        (c,) = ike.children
        c.handle = eng.add_tunnel(*c.sas(R500, peer, False, f"t-{c.spi_in:08x}"))
    vt, mt = v.children[0].handle, m.children[0].handle
    assert vt is not mt and vt.outbound.spi == mt.outbound.spi  # type: ignore[attr-defined]
    assert svc._following([vt]) == [v] and svc._following([mt]) == [m]
    assert svc.commit_check([vt]) is None


def test_sa_rekey_sends_the_request_at_once_or_says_why_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ipsecct sa rekey`` (IkeService.rekey, as ``swanctl --rekey``): a CHILD SA's or the
    IKE SA's CREATE_CHILD_SA goes out at once. Refused, nothing sent, saying why: an
    exchange of ours in flight (window of one; a liveness check gives way), a CHILD SA
    rekeyed already, one the IKE SA no longer has, an IKE SA being transferred, a fenced
    gateway."""
    import dataclasses

    from ipsecct.errors import IkeProtocolError

    svc, ike, c1 = _client_with_tunnel(tmp_path)
    sent: list[bytes] = []
    monkeypatch.setattr(svc.node, "send_outer", lambda data, dst: sent.append(data))

    def refused(child: object, why: str) -> None:
        n = len(sent)
        with pytest.raises(IkeProtocolError, match=why):
            svc.rekey(ike, child)  # type: ignore[arg-type]
        assert len(sent) == n

    svc.rekey(ike, c1)
    assert len(sent) == 1 and ike.pending is not None and ike.pending.kind == "rekey-child"
    assert ike.pending.old_child is c1
    refused(c1, r"an exchange of ours is in flight \(rekey-child\)")
    refused(None, r"an exchange of ours is in flight \(rekey-child\)")
    ike.pending = None
    c1.rekeyed = True
    refused(c1, "rekeyed already: rekey its successor")
    c1.rekeyed = False
    refused(dataclasses.replace(c1, spi_in=0x7000_0001), "no longer has it")
    ike.quiet = True
    refused(c1, "is being transferred .*not rekeyed")
    ike.quiet = False
    svc.fenced = lambda now: True
    refused(None, "may not send now")
    svc.fenced = None
    ike.state = IkeState.REKEYED  # (its successor holds the CHILD SAs: that one is rekeyed)
    refused(None, r"was rekeyed: .*\(rekey the successor, see ipsecct sa list --ike\)")
    ike.state = IkeState.ESTABLISHED
    # a liveness check in flight gives way (as for sa delete): the IKE rekey goes out
    svc._act(svc.engine.tick(svc.node.clock() + 60))
    assert ike.pending is not None and ike.pending.kind == "liveness" and len(sent) == 2
    svc.rekey(ike, None)
    assert len(sent) == 3 and ike.pending is not None and ike.pending.kind == "rekey-ike"


def test_child_of_is_found_without_a_walk_per_tunnel_and_follows_the_child_sas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``IkeService.child_of`` (and ``rekey_before_ceiling``, which the fail-over driver asks
    for each tunnel near a kept ceiling) finds a tunnel's CHILD SA from an index: one walk
    of the IKE SAs while the node's tunnels do not change, not one per call (10,000 tunnels
    x 10,000 IKE SAs was 4.6 s of one check: benchmarks/ceiling_rekey_lookup.py). The index
    follows what changes: a tunnel of no CHILD SA (keyed by hand), a CHILD SA that lost its
    tunnel without a tunnel change (a transfer), an IKE SA gone, a tunnel removed, a
    tunnel attached to an imported CHILD SA after the index was made."""
    svc, ike, c1 = _client_with_tunnel(tmp_path)
    eng = svc.node.engine
    t1 = c1.handle
    assert isinstance(t1, Tunnel)
    walks = [0]
    real = svc.engine.ike_sas

    def counted() -> list[IkeSA]:
        walks[0] += 1
        return real()

    monkeypatch.setattr(svc.engine, "ike_sas", counted)
    assert svc.child_of(t1) == (ike, c1) and walks[0] == 1
    manual = object()
    for _ in range(100):
        assert svc.child_of(t1) == (ike, c1) and svc.child_of(manual) is None
    assert walks[0] == 1  # (no walk per call)
    now = svc.node.clock()
    c1.rekey_at = now + 100
    assert svc.rekey_before_ceiling(t1, now) and c1.rekey_at == now  # (due now)
    assert not svc.rekey_before_ceiling(manual, now)
    del svc.engine.by_spi[ike.our_spi]  # the IKE SA is gone (its tunnel not yet)
    assert svc.child_of(t1) is None
    svc.engine.by_spi[ike.our_spi] = ike
    svc._children_at = -1  # (it is back only in this test: no tunnel change says so)
    assert svc.child_of(t1) == (ike, c1)
    c1.handle = None  # (a transfer drops the handle; the node's tunnels unchanged)
    assert svc.child_of(t1) is None
    eng.remove_tunnel(t1)
    assert svc.child_of(t1) is None
    # a tunnel installed (a transfer's), then the index made, then the CHILD SA attached
    entry, out, inn = c1.sas(R500, I500, False, "t-2")
    t2 = eng.add_tunnel(entry, out, inn)
    assert svc.child_of(t2) is None
    svc._attach(ike)
    assert c1.handle is t2 and svc.child_of(t2) == (ike, c1)


def test_a_replica_the_standby_cannot_take_is_refused_and_the_active_sees_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fail-over replication of an IKE SA to a standby whose connections do not admit it
    (its child is named otherwise): the standby does not keep it and logs
    ``ike-replica-refused``; the active, told by SYNC_REFUSED, logs which IKE SA, which
    standby and why (once, though every version is refused again) and lists it in
    ``status()["replicas_refused"]``. A standby restarted with the active's connections
    (a FULL sync) keeps it, and nothing is listed any more."""
    import dataclasses
    import functools
    import logging

    from ipsecct.ct import failover

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    sg1 = ike_service(tmp_path, "sg1")
    ike = sg1.engine.import_ike(w.resp.export_ike(ike_r, 1.0), 1.0)
    fcfg = failover.FailoverConfig("active", "sg2", fencing=False)
    rep = failover.Replicator(sg1.node.engine, fcfg, session=7, extra=sg1.feed)
    rep.on_extra_refused = functools.partial(sg1.replica_refused, "sg2")
    rep.on_extra_resync = functools.partial(sg1.replicas_resync, "sg2")
    other = conn(dpd=10)
    other.children[0] = dataclasses.replace(other.children[0], name="elsewhere")

    def standby(connection: Connection) -> tuple[IkeService, failover.Standby]:
        sg2 = ike_service(tmp_path, "sg2")
        sg2.engine.connections[:] = [connection]
        sb = failover.Standby(sg2.node.engine, dataclasses.replace(fcfg, role="standby"),
                              sg2.node.cfg.outer, Identity.INDIRECT)  # fmt: skip
        sb.check_extra = sg2.check_replica
        return sg2, sb

    def sync(sb: failover.Standby, now: float) -> None:
        for m in rep.poll(now):
            for r in sb.receive(m, now):  # type: ignore[arg-type]
                rep.receive(r, now)

    def logged(node: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if "event=ike-replica-refused"
                in r.getMessage() and f"node={node}" in r.getMessage()]  # fmt: skip

    sg2, sb = standby(other)
    with caplog.at_level(logging.INFO):
        sync(sb, 2.0)
        sg1.liveness(ike)  # the IKE SA changed: sent again, refused again
        sync(sb, 3.0)
    assert sb.extra == {} and list(sb.refused) == [ike.our_spi]
    assert sg2.engine.stats["replica-refused"] == 2
    why = f"no child 'net' in connection {ike.conn.name!r} here"
    listed = sg1.status()["replicas_refused"]
    assert [(x["standby"], x["conn"], x["spi_i"], x["spi_r"], x["reason"]) for x in listed] == [
        ("sg2", ike.conn.name, ike.spi_i.hex(), ike.spi_r.hex(), why)]
    (line,) = logged("sg1")
    assert "standby=sg2" in line and ike.spi_i.hex() in line and "elsewhere" not in line
    assert len(logged("sg2")) == 1
    # the standby restarts with the right connection: the active sends everything again
    sg2, sb = standby(conn(dpd=10))
    rep.resync()
    sync(sb, 4.0)
    assert list(sb.extra) == [ike.our_spi] and sb.refused == {}
    assert sg1.status()["replicas_refused"] == [] and sg2.engine.stats["replica-refused"] == 0


def test_a_request_for_an_ike_sa_that_left_after_a_transfer_here_is_forwarded_not_kept(
    tmp_path: Path,
) -> None:
    """sg2 took a transfer from sg1 (its early window opens: 1 s) and, inside that second,
    handed the client's IKE SA back to sg1, where the client rekeyed it; the client's DELETE
    of its old IKE SA still reaches sg2: forwarded to sg1 and answered there. Before, sg2
    kept it for a context that never came, and the client retransmitted it 4 s later (the
    CI failure of test_client_rekeys_reaching_the_source_during_a_transfer_...). An IKE SA
    that left before the transfer to sg2 committed may be the one coming back: kept, and
    answered once its context is here."""
    now = [10.0]
    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    sg2 = ike_service(tmp_path, "sg2")
    sg2.node.clock = lambda: now[0]
    sg2.engine = w.resp
    sent: list[tuple[str, list[bytes]]] = []
    sg2.send_context = lambda peer, cdbs, mn: sent.append((peer, cdbs))
    forwarded: list[tuple[str, bytes]] = []
    sg2.forward_ike = lambda peer, cdb, mn: forwarded.append((peer, cdb))
    answers: list[Send] = []
    sg2._send = answers.append  # type: ignore[method-assign, assignment]
    sg2.on_transfer(Record(1, "target", "sg1", "predictive", 0.0, 0.0, "committed"))
    now[0] += 0.3
    sg2._export(ike_r, "sg1", 0)  # the IKE SA leaves inside the early window
    assert not sg2.engine.ike_sas()
    now[0] += 0.2
    (req,) = [o for o in w.ini.liveness(ike_i, 1.0) if isinstance(o, Send)]
    sg2._receive(req.data, I500, R500)
    assert sg2.engine.stats["early-kept"] == 0
    assert sg2.engine.stats["forwarded"] == 1 and [p for p, _ in forwarded] == ["sg1"]
    # moved there and back: it left sg2 before the transfer that brings it back committed
    forwarded.clear()
    assert sent[0][0] == "sg1"
    cdbs = sent[0][1]
    sg2.engine.import_ike(cdbs, now[0])  # sg1 has it again, as after a move sg1 -> sg2 ...
    (ike_back,) = sg2.engine.ike_sas()
    sg2._export(ike_back, "sg1", 0)  # ... sg2 -> sg1 (now[0] = 10.5)
    now[0] += 0.1
    _announce(sg2, ike_back)  # (the UNIT of the transfer that brings it back)
    sg2.on_transfer(Record(2, "target", "sg1", "predictive", 0.0, 0.0, "committed"))
    now[0] += 0.1
    sg2._receive(req.data, I500, R500)
    assert sg2.engine.stats["early-kept"] == 1 and not forwarded
    _handed_over(sg2, ike_back)
    sg2.receive_context("sg1", sent[1][1])  # its context, back from sg1
    assert sg2.engine.stats["early-replayed"] == 1
    assert sg2.engine.stats["liveness-answered"] == 1 and answers


def test_a_fragmented_request_held_during_a_transfer_follows_the_ike_sa_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's CHILD rekey reaches sg1 in RFC 7383 fragments while its IKE SA is
    quiet (a transfer runs): sg1 holds the whole set and, when the IKE SA leaves, sends
    each fragment right behind the context (one forwarding CDB each, in order); sg2
    reassembles and answers it, and the client's rekey completes without a retransmission."""
    import ipsecct.ikev2.engine as E
    from ipsecct.ikev2.engine import ChildUp

    monkeypatch.setattr(E, "FRAGMENT_SIZE", 150)
    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    sg1, sg2 = ike_service(tmp_path, "sg1"), ike_service(tmp_path, "sg2")
    sg1.engine = w.resp
    channel: list[list[bytes]] = []  # the ordered TLS channel sg1 -> sg2
    sg1.send_context = lambda peer, cdbs, mn: channel.append(cdbs)
    sg1.forward_ike = lambda peer, cdb, mn: channel.append([cdb])
    answers: list[Send] = []
    sg2._send = answers.append  # type: ignore[method-assign, assignment]
    ike_r.quiet = True
    frags = [o for o in w.ini.rekey_child(ike_i, ike_i.children[0], 1.0) if isinstance(o, Send)]
    assert len(frags) >= 2
    for f in frags:
        sg1._receive(f.data, I500, R500)
    assert sg1.engine.stats["request-held-fragmented"] == 1
    sg2.on_transfer(Record(1, "target", "sg1", "predictive", 0.0, 0.0, "committed"))
    sg1._export(ike_r, "sg2", 0)
    assert sg1.engine.stats["held-forwarded"] == 1 and len(channel) == 1 + len(frags)
    _handed_over(sg2, ike_r)
    for cdbs in channel:
        sg2.receive_context("sg1", cdbs)
    assert sg2.engine.stats["forward-received"] == len(frags)
    assert sg2.engine.stats["fragmented-received"] == 1 and answers
    ups = []
    for a in answers:
        ups += w.ini.receive(a.data, a.src, I500, 1.5)
    assert any(isinstance(o, ChildUp) for o in ups) and w.ini.stats["retransmitted"] == 0


@pytest.mark.parametrize("how", ["transfer", "failover"])
def test_an_imported_child_sa_the_peer_rekeyed_still_carries_the_traffic(
    tmp_path: Path, how: str
) -> None:
    """The peer rekeyed a CHILD SA and has not deleted the old one when the IKE SA moves: at
    the old gateway the old SA carries our traffic until then (the peer installs the new one
    when it reads our answer). The tunnels reach the new gateway in any order (a transfer
    appends them, a take-over puts each first): once the IKE SA is in, the old SA's policy
    matches before its successor's, as it did."""
    from ipsecct.ikev2 import context

    w, _ike_i, ike_r, _delete = peer_rekeyed_before_the_move()
    old, new = ike_r.children
    svc = ike_service(tmp_path)
    svc.engine.connections = [conn(child_rekey=20.0)]
    svc._send = lambda o: None  # type: ignore[method-assign, assignment]
    eng = svc.node.engine
    tunnels = {}
    for c in (old, new):  # each first: the successor's policy would take the traffic
        entry, out, inn = c.sas(R500, I500, False, f"c/{c.spi_in:08x}")
        tunnels[c.spi_in] = t = eng.add_tunnel(entry, out, inn, index=0)
        t.came_from = "sg1"
    if how == "transfer":
        svc.receive_context("sg1", w.resp.export_ike(ike_r, 7.0))
    else:
        assert svc.take_over([context.encode(ike_r, 7.0)], 7.0, 0) == 1
    (ike,) = svc.engine.ike_sas()
    assert [c.handle for c in ike.children] == [tunnels[old.spi_in], tunnels[new.spi_in]]
    spd = list(eng.spd)
    assert spd.index(tunnels[old.spi_in].entry) < spd.index(tunnels[new.spi_in].entry)
    inner = eng.spd.lookup(ipaddress.ip_address("10.1.0.1"), ipaddress.ip_address("10.2.0.5"), 17)
    assert inner is tunnels[old.spi_in].entry


def test_a_peer_address_unverified_at_a_take_over_gets_the_esp_only_once_checked(
    tmp_path: Path,
) -> None:
    """A MOBIKE peer moved and the active died before the new address answered its
    return-routability check: the standby takes the IKE SA over with the address marked
    unverified, and the CHILD SA's tunnel keeps sending to the old (last verified) address
    until the new one has echoed the taker's own COOKIE2 check; then both halves follow."""
    from ipsecct.ikev2 import context

    moved = Address(ipaddress.ip_address("198.51.100.7"), 500)
    w = pair(mn_conn(), conn(dpd=10))
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    (upd,) = sends(w.ini.local_moved(ii, moved, 1.0))
    resp, _check = sends(w.resp.receive(upd.data, moved, R500, 1.0))  # the check is lost
    w.deliver([resp], "r", 1.0)
    svc = ike_service(tmp_path)
    sent: list[Send] = []
    svc._send = sent.append  # type: ignore[method-assign, assignment]
    (c,) = ir.children
    entry, out, inn = c.sas(R500, I500, False, "c/net")  # the last verified address
    svc.node.engine.add_tunnel(entry, out, inn, index=0)

    def tunnel_peer() -> tuple[object, object]:
        t = svc.node.engine.tunnel_by_spi(c.spi_in)
        assert t is not None and t.inbound is not None
        return t.outbound.dst, t.inbound.src

    def answer(req: Send, now: float) -> None:
        for o in sends(w.ini.receive(req.data, R500, moved, now)):
            svc._act(svc.engine.receive(o.data, moved, R500, svc.node.clock()))

    assert svc.take_over([context.encode(ir, 2.0)], svc.node.clock(), 0) == 1
    (sync,) = sent
    sent.clear()
    answer(sync, 3.0)
    (check,) = sent
    sent.clear()
    assert check.dst == moved and tunnel_peer() == (I500.host, I500.host)
    # a CHILD SA made before the answer (a rekey of the peer's) would send there too
    (taken,) = svc.engine.ike_sas()
    assert taken.remote == moved and taken.child_remote.host == I500.host
    answer(check, 3.1)
    assert tunnel_peer() == (moved.host, moved.host) and not sent
    assert svc.engine.stats["rr-check-verified"] == 1 and taken.child_remote == moved


def test_an_owed_delete_is_replicated_until_the_peer_answers_it(tmp_path: Path) -> None:
    """An IKE SA whose DELETE of a CHILD SA is unanswered is replicated with it (item 30),
    and again once the peer answered, without it: the answer moves no message ID, which was
    all the replication looked at, so the standby kept a replica that would have sent the
    DELETE again after a fail-over. The IKE SA here came by a handover with the DELETE
    owed: the gateway sends it at its next tick."""
    from ipsecct.ikev2 import context

    w, _ike_i, ike_r, old_spi = gateway_rekeyed_before_the_fail_over()
    sg1 = ike_service(tmp_path, "sg1")
    sg1.engine.connections[:] = [conn(child_rekey=20.0)]
    sent: list[Send] = []
    sg1._send = sent.append  # type: ignore[method-assign, assignment]

    def owed() -> list[list[bytes]]:
        ups, _gone = sg1.feed.poll_extra(sg1.node.clock(), False)
        conns = [conn(child_rekey=20.0)]
        return [context.decode(cdbs, conns, 0.0).queued_deletes for _key, cdbs in ups]

    ike = sg1.engine.import_ike(context.encode(ike_r, 6.0), sg1.node.clock())
    assert owed() == [[old_spi.to_bytes(4, "big")]]
    sg1._on_timer(sg1.node.clock())
    (delete,) = sent
    assert ike.pending is not None and ike.pending.kind == "delete-child"
    assert owed() == [[old_spi.to_bytes(4, "big")]]  # sent, not answered: still owed
    (ans,) = sends(w.ini.receive(delete.data, R500, I500, 8.0))
    sg1._act(sg1.engine.receive(ans.data, I500, R500, sg1.node.clock()))
    assert ike.pending is None and owed() == [[]]
    assert owed() == []  # nothing changed since


def test_the_old_sa_of_our_rekey_takes_the_peers_esp_until_our_delete_is_answered(
    tmp_path: Path,
) -> None:
    """The gateway rekeys a CHILD SA: the old SA goes, its inbound half stays a shadow (ESP
    the peer sent on it is still taken). A peer that answered the rekey sends on the old SA
    until our DELETE reaches it (strongSwan does), so the shadow stays until the DELETE is
    answered, however many times it is sent (at most DELETE_WAIT), and then INBOUND_GRACE
    for what is still on its way. Before, it went 2 s after the DELETE was first sent: a
    lost DELETE (sent again 2 s later) cost the peer's traffic until one got through."""
    import asyncio

    from ipsecct.gateway.ike import DELETE_WAIT, INBOUND_GRACE

    w = pair(mn_conn(), conn(child_rekey=20.0))
    connect(w)
    (ir,) = w.resp.ike_sas()
    (c,) = ir.children

    async def run() -> None:
        svc = ike_service(tmp_path)
        svc.engine.connections[:] = [conn(child_rekey=20.0)]
        sent: list[Send] = []
        svc._send = sent.append  # type: ignore[method-assign, assignment]
        eng = svc.node.engine
        entry, out, inn = c.sas(R500, I500, False, "c/net")
        eng.add_tunnel(entry, out, inn, index=0).came_from = "sg1"
        svc.receive_context("sg1", w.resp.export_ike(ir, 1.0))
        (ike,) = svc.engine.ike_sas()
        loop = asyncio.get_running_loop()

        def exchange(req: Send, now: float) -> None:
            for o in sends(w.ini.receive(req.data, R500, I500, now)):
                svc._act(svc.engine.receive(o.data, I500, R500, svc.node.clock()))

        def shadow_left() -> float:
            assert [sa.spi for sa in eng.shadows()] == [c.spi_in]
            return svc._shadows[c.spi_in][1].when() - loop.time()

        svc._act(svc.engine.rekey_child(ike, ike.children[0], svc.node.clock()))
        (rekey,) = sent
        sent.clear()
        exchange(rekey, 2.0)  # the MN answers; the gateway deletes the old SA
        (delete,) = sent
        assert shadow_left() > DELETE_WAIT - 1
        exchange(delete, 5.0)  # late (as its retransmission after a loss would be)
        assert 0 < shadow_left() <= INBOUND_GRACE
        assert ike.pending is None and svc.engine.stats["delete-child-ok"] == 1

    asyncio.run(run())


def test_a_mobile_node_that_changes_address_moves_its_sas_and_tells_the_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mobile node (``outer.address = "0.0.0.0"``) looks up its source address toward the
    peer on its timer: a new one moves the installed CHILD SAs' outer addresses (their
    counters untouched) and sends UPDATE_SA_ADDRESSES; no route: nothing sent, logged once.
    Messages of the IKE SA are taken as sent to its own address (only a move changes it)."""
    from ipsecct.gateway import ike as ike_mod
    from ipsecct.ikev2.engine import ChildUp
    from ipsecct.ikev2.ikesa import Address

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,) = w.ini.ike_sas()
    cfg = from_dict(
        {
            "name": "mn",
            "outer": {"address": "0.0.0.0", "port": 45010},
            "inner": {"kind": "udp", "listen": "127.0.0.1:45011", "peer": "127.0.0.1:45012"},
        },
        str(tmp_path / "mn.toml"),
    )
    svc = IkeService(Node(cfg, role="node"), [mn_conn(dpd=10)])
    assert svc.mobile
    svc.engine = w.ini  # this adapter runs the MN's side
    for c in ike_i.children:
        svc._one(ChildUp(ike_i, c))
    t = ike_i.children[0].handle
    out_sa, in_sa = t.outbound, t.inbound  # type: ignore[attr-defined]
    assert out_sa.src == in_sa.dst == I500.host
    out_sa.seq = 1000
    new = ipaddress.ip_address("198.51.100.7")
    found: list[object] = [None]
    monkeypatch.setattr(ike_mod, "source_address", lambda remote: found[0])
    sent: list[Send] = []
    monkeypatch.setattr(svc, "_send", sent.append)
    svc._check_paths(1.0)  # no route at all: wait
    svc._check_paths(2.0)
    assert not sent and svc._no_route == {ike_i.uid} and ike_i.local == I500
    found[0] = new
    d = svc._next_deadline()
    assert d is not None and d <= svc._path_check_at
    svc._check_paths(3.0)
    assert ike_i.local == Address(new, I500.port) and not svc._no_route
    assert out_sa.src == in_sa.dst == new and out_sa.dst == in_sa.src == R500.host
    assert out_sa.seq == 1000  # the same SA, its counter where it was
    (upd,) = sent
    assert upd.src == ike_i.local and ike_i.pending is not None
    assert ike_i.pending.kind == "mobike-update"
    for o in w.resp.receive(upd.data, upd.src, upd.dst, 3.0):
        if isinstance(o, Send):
            assert svc._dst(o.data, R500, I500.port) == ike_i.local
            svc._receive(o.data, R500, svc._dst(o.data, R500, I500.port))
    assert w.ini.stats["mobike-update-done"] == 1 and ike_i.pending is None
    n = len(sent)  # (and the answer to the gateway's COOKIE2 check of the new address)
    svc._check_paths(4.0)  # still there: nothing new
    assert len(sent) == n


def test_start_action_trap_starts_the_ike_sa_on_the_first_packet_its_selectors_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start_action = trap`` (strongSwan's): an outbound packet that no policy matches and
    the child's selectors take starts the connection's IKE SA (the packet is dropped, as the
    kernel's trap drops it while acquiring); more such packets while it is being set up, or
    within TRAP_GAP, start nothing more; one the selectors do not take starts nothing. Once
    the CHILD SA is up, the next packet goes out as ESP."""
    import dataclasses

    from ipsecct.gateway import ike as ike_mod
    from ipsecct.ikev2.engine import IkeEngine
    from ipsecct.ipsec.ippacket import build_udp

    base = mn_conn()
    trap = dataclasses.replace(
        base, remote_addrs=[ipaddress.ip_network(f"{R500.host}/32")],
        children=[dataclasses.replace(base.children[0], start_action="trap")],
    )  # fmt: skip
    cfg = from_dict(
        {
            "name": "mn",
            "outer": {"address": str(I500.host), "port": 45020},
            "inner": {"kind": "udp", "listen": "127.0.0.1:45021", "peer": "127.0.0.1:45022"},
        },
        str(tmp_path / "mn.toml"),
    )
    node = Node(cfg, role="node")
    svc = IkeService(node, [trap])
    sent: list[Send] = []
    esp: list[object] = []
    monkeypatch.setattr(svc, "_send", sent.append)
    monkeypatch.setattr(node, "send_esp", lambda sa, data: esp.append(sa))
    clock = [10.0]
    monkeypatch.setattr(node, "clock", lambda: clock[0])

    def pkt(dst: str) -> bytes:
        return build_udp(ipaddress.ip_address("10.2.0.5"), ipaddress.ip_address(dst), 4000,
                         5000, b"payload")  # fmt: skip

    node.from_inner(pkt("10.9.9.9"))  # not the child's: nothing
    assert sent == [] and svc.engine.stats["trap-acquired"] == 0
    node.from_inner(pkt("10.1.0.9"))
    (init,) = sent
    assert svc.engine.stats["trap-acquired"] == 1 and len(svc.engine.connecting) == 1
    clock[0] += ike_mod.TRAP_GAP + 1
    node.from_inner(pkt("10.1.0.9"))  # being set up: nothing more
    assert len(sent) == 1 and node.engine.stats.drops["policy"] == 3
    gw = IkeEngine([conn()])
    pending = [init]
    while pending:  # the exchanges, both ways
        s = pending.pop(0)
        for o in gw.receive(s.data, s.src, s.dst, clock[0]):
            if isinstance(o, Send):
                n = len(sent)
                svc._receive(o.data, o.src, o.dst)
                pending += sent[n:]
    assert len(svc.engine.ike_sas()) == 1 and len(gw.ike_sas()) == 1
    node.from_inner(pkt("10.1.0.9"))
    assert len(esp) == 1  # protected now
    assert svc.engine.stats["trap-acquired"] == 1


def test_a_fenced_gateway_sends_no_ike_datagram_whatever_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the fail-over fence says this gateway may not send (its lease lost, or its
    standby took over), no IKE datagram leaves, whichever path made it (here an initiation,
    as start_action does and a trap does): counted "fenced"; once allowed, the engine's
    retransmission sends it."""
    import dataclasses

    base = mn_conn()
    c = dataclasses.replace(base, remote_addrs=[ipaddress.ip_network(f"{R500.host}/32")])
    svc = ike_service(tmp_path)
    svc.engine.connections = [c]
    out: list[bytes] = []
    monkeypatch.setattr(svc.node, "send_outer", lambda data, dst: out.append(data))
    fenced = [True]
    svc.fenced = lambda now: fenced[0]
    svc.initiate(c)
    assert out == [] and svc.engine.stats["fenced"] == 1
    fenced[0] = False
    assert len(svc.engine.connecting) == 1
    svc._act(svc.engine.tick(svc.node.clock() + 5.0))  # the IKE_SA_INIT's retransmission
    assert len(out) == 1


@pytest.mark.parametrize("mode", ["predictive", "commit_early", "prepared"])
def test_ike_sa_cannot_move_rolls_back_before_commit_no_sequence_number_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    """The IKE SA follows its CHILD SAs after their transfer's COMMIT: its context is
    encoded first, at the transfer's start and just before the COMMIT (commit_check). One
    that cannot be encoded then (a fault injected into the encoder) rolls the transfer back
    with the reason, the COMMIT never sent; the tunnel and its IKE SA stay served here, and
    no (SPI, sequence number) pair is sent twice. One that cannot be encoded at the start
    refuses the transfer, nothing sent."""
    import logging

    from ipsecct.ct.transfer import FPT_DECISION, Prepared, Settings
    from ipsecct.errors import TransferError
    from ipsecct.ikev2 import context as ike_context
    from ipsecct.ikev2.ikesa import IkeState
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.transfer import World

    mbb = {"make_before_break": True, "mbb_margin": 1000}
    w = World(settings={"sg1": Settings(commit_early=mode == "commit_early", **mbb),  # type: ignore[arg-type]
                        "sg2": Settings(**mbb)})  # type: ignore[arg-type]  # fmt: skip
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    svc, ike = unit_at_sg1(tmp_path, w)
    sg1.core.commit_check = svc.commit_check
    real, calls, fail_from = ike_context.encode, [0], [1]

    def encode(*a: object, **kw: object) -> list[bytes]:
        calls[0] += 1
        if calls[0] > fail_from[0]:
            raise OverflowError("sk_d=00112233")  # (an exception's text is not logged)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ike_context, "encode", encode)
    for i in range(3):
        w.host_send("sg1", i)
        w.mn_send(i)
    with caplog.at_level(logging.INFO, logger="ipsecct.gateway.ike"):
        tid, outs = sg1.core.start([w.tunnel], "sg2", w.now, prepare=mode == "prepared")
        sg1.run(outs)
        assert calls[0] >= 1  # checked at the start: it could move then
        ready = []
        for _ in range(20):  # the contexts, the CTDR (and the PREPARE and its answer)
            if not (w.pending("sg1", "sg2") or w.pending("sg2", "sg1")):
                break
            for a, b in (("sg1", "sg2"), ("sg2", "sg1")):
                if w.pending(a, b):
                    msg = w.drop(a, b)
                    res = w.gw[b].core.receive(a, msg, w.now)
                    ready += [o for o in res if isinstance(o, Prepared)]
                    w.gw[b].run(res)
        if mode == "prepared":
            assert ready and sg1.core.prepared(tid)
            sg1.run(sg1.core.commit(tid, w.now))  # the handover's trigger
        w.deliver_all()
    rec = sg1.finished[-1]
    assert rec.transfer_id == tid and rec.outcome == "failed", rec
    assert "ike-sa-cannot-move" in rec.detail and ike.spi_i.hex() in rec.detail
    assert sg1.core.counters["commit_refused"] == 1
    assert all(fpt != FPT_DECISION for fpt in _fpts(w, "sg1", "sg2"))  # (nothing left)
    assert sg2.finished and sg2.finished[-1].outcome != "committed"
    assert not any(t.state is TunnelState.ACTIVE for t in sg2.engine.tunnels())
    # the unit stays here, whole: the tunnel served both ways, its IKE SA established
    assert w.tunnel.state is TunnelState.ACTIVE and ike.state is IkeState.ESTABLISHED
    assert svc.engine.ike_sas() == [ike]
    before = len(sg1.delivered)
    for i in range(3, 8):
        w.host_send("sg1", i)
        w.mn_send(i)
    assert len(sg1.delivered) == before + 5
    pairs = [(spi, seq) for _, spi, seq in w.all_wire()]
    assert len(pairs) == len(set(pairs)), "an (SPI, sequence number) pair was sent twice"
    (line,) = [r.getMessage() for r in caplog.records if "ike-sa-cannot-move" in r.getMessage()]
    assert ike.conn.name in line and "OverflowError" in line and "00112233" not in line
    # an IKE SA that cannot move at the start: the transfer is refused, nothing sent
    fail_from[0] = calls[0]
    sent = sum(map(len, w.links.values()))
    with pytest.raises(TransferError, match="not started: ike-sa-cannot-move"):
        sg1.core.start([w.tunnel], "sg2", w.now)
    assert sum(map(len, w.links.values())) == sent and w.tunnel.state is TunnelState.ACTIVE
    assert w.tunnel.transfer_cap == 1 << 64  # (not capped)


def _fpts(w: object, src: str, dst: str) -> list[int]:
    from ipsecct.ct import cxtp

    out = []
    for data in w.links.get((src, dst), ()):  # type: ignore[attr-defined]
        m = cxtp.decode(data)
        if isinstance(m, cxtp.CTD | cxtp.PCTD) and len(m.cdbs) > 1:
            out.append(cxtp.cdb_fpt(m.cdbs[1]))
    return out


@pytest.mark.parametrize("where", ["export", "send"])
def test_an_unexpected_failure_of_the_export_after_the_commit_is_caught_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    """Whatever still fails when the IKE SA follows its committed CHILD SAs is caught (not
    left to the event loop), logged with the IKE SA named and no secret, and counted
    (status: ike.counters.ike-export-failed). Still ours (the export raised): deleted here,
    the client told (it drops the IKE SA and its CHILD SAs and starts over), never kept
    running beside CHILD SAs it no longer has. Exported already (the send failed): left
    alone, nothing more sent under its keys here."""
    import logging

    from ipsecct.ikev2.ikesa import IkeState

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    sg1 = ike_service(tmp_path, "sg1")
    sg1.engine = w.resp
    answers: list[Send] = []
    sg1._send = answers.append  # type: ignore[method-assign, assignment]

    def boom(*a: object) -> None:
        raise RuntimeError("sk_d=00112233")

    sent: list[list[bytes]] = []
    sg1.send_context = boom if where == "send" else lambda p, c, m: sent.append(c)
    if where == "export":
        monkeypatch.setattr(sg1.engine, "export_ike", boom)
    ike_r.quiet = True
    with caplog.at_level(logging.INFO, logger="ipsecct.gateway.ike"):
        sg1._export(ike_r, "sg2", 0)  # (raised out of the event loop's callback before)
    assert sg1.status()["counters"]["ike-export-failed"] == 1 and not sent
    (line,) = [r.getMessage() for r in caplog.records if "ike-sa-export-failed" in r.getMessage()]
    assert ike_r.conn.name in line and ike_r.spi_i.hex() in line and "RuntimeError" in line
    assert "00112233" not in line
    if where == "send":
        assert ike_r.state is IkeState.DEAD and not answers and not sg1.engine.ike_sas()
        return
    assert ike_r.state is IkeState.DELETING and not ike_r.quiet
    assert all(c.handle is None for c in ike_r.children)  # (the target's tunnels now)
    (delete,) = answers
    w.ini.receive(delete.data, delete.src, delete.dst, 2.0)
    assert ike_i.state is IkeState.DEAD  # the client dropped it, and its CHILD SAs


def test_a_child_sa_from_a_peer_has_one_unique_id_in_sa_list_sa_show_and_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A CHILD SA whose tunnel came by transfer: its SAs were named by the source with the
    source's unique id (``rw/net#4``) and the IKE SA's import gave it another here (``net:
    #8`` in ``sa list``'s IKE section). Renamed with this gateway's id when its IKE SA takes
    the tunnel: ``sa list`` (both sections), ``sa show`` and the log name one id, as
    ``swanctl --list-sas`` does."""
    import re

    from ipsecct import cli
    from ipsecct.commands import sa as sa_cmd
    from ipsecct.gateway.control import sa_summary
    from ipsecct.ikev2.engine import ChildDown

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    (child,) = ike_r.children
    svc = ike_service(tmp_path)
    theirs = f"{ike_r.conn.name}/{child.name}#{child.uid + 1000}"  # the source's id
    entry, out, inn = child.sas(R500, I500, False, theirs)
    svc.node.engine.add_tunnel(entry, out, inn).came_from = "sg1"
    svc.receive_context("sg1", w.resp.export_ike(ike_r, 1.0))
    (ike,) = svc.engine.ike_sas()
    (mine,) = ike.children
    assert mine.uid != child.uid + 1000
    ours = f"{ike.conn.name}/{mine.name}#{mine.uid}"

    def answer(path: str, cmd: str, args: object = None, timeout: float = 0.0) -> object:
        now = svc.node.clock()
        sas = [sa_summary(sa, now) for sa in svc.node.engine.sad]
        return {"ike.list": svc.list(), "sa.list": sas, "sa.show": sas}[cmd]

    monkeypatch.setattr(sa_cmd, "request", answer)
    assert cli.main(["sa", "list", "-s", str(tmp_path / "x.sock")]) == 0
    text = capsys.readouterr().out
    assert f"  {mine.name}: #{mine.uid}, INSTALLED, TUNNEL" in text, text
    assert text.count(ours) == 2 and theirs not in text, text  # both SAs' rows
    assert set(re.findall(r"#(\d+)", text)) == {str(ike.uid), str(mine.uid)}, text
    assert cli.main(["sa", "show", hex(mine.spi_out), "-s", str(tmp_path / "x.sock")]) == 0
    text = capsys.readouterr().out
    assert f"name: {ours}" in text and theirs not in text, text
    # the log of its removal names it so too (as its installation here would)
    with caplog.at_level("INFO", logger="ipsecct"):
        down: list[Output] = [
            o for o in svc.engine.delete_child(ike, mine, 2.0) if isinstance(o, ChildDown)]
        svc._act(down)  # (the DELETE itself is not sent: no socket here)
    assert f"child={ours}" in caplog.text, caplog.text


def _local_and_moving(tmp_path: Path, unique: str) -> tuple[IkeService, IkeSA, bytes, list[bytes]]:
    """sg2 (unique as given) with an IKE SA of identity mn.test made there, and an IKE SA of
    the same identity at sg1 about to move to sg2: its UNIT payload and its context."""
    from ipsecct.ikev2 import context
    from ipsecct.ikev2.engine import IkeEngine
    from tests.helpers.ikev2_engines import Wire

    w = pair(mn_conn(dpd=10), conn(dpd=10))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    (payload,) = context.unit_payloads(ike_r, ike_r.children)
    svc = ike_service(tmp_path)
    svc.engine.connections[0].unique = unique
    connect(Wire(IkeEngine([mn_conn(dpd=10)]), svc.engine), 0.5)
    (local,) = svc.engine.ike_sas()
    assert local.peer_id == ike_r.peer_id == "mn.test"
    cdbs = w.resp.export_ike(ike_r, 1.0)
    _handed_over(svc, ike_r)
    return svc, local, payload, cdbs


@pytest.mark.parametrize("unique", ["no", "never", "keep", "replace"])
def test_a_moved_ike_sa_meets_unique_before_its_commit_and_replace_after_it(
    tmp_path: Path, unique: str
) -> None:
    """A transfer's target applies the connection's ``unique`` to the IKE SA the transfer
    announces, as to an arriving IKE_AUTH: ``keep`` refuses it before the COMMIT (the source
    keeps it and its CHILD SAs) when the identity has an IKE SA here; ``replace`` admits it,
    and once it is imported the identity's IKE SA made here is deleted (its CHILD SAs leave
    the data path, a DELETE under its own keys), never the one that moved; ``no`` and
    ``never`` keep both. Before, the target imported it whatever ``unique`` said."""
    from ipsecct.ikev2.ikesa import IkeState

    svc, local, payload, cdbs = _local_and_moving(tmp_path, unique)
    why = svc.check_unit("sg1", payload)
    if unique == "keep":
        assert why is not None and "unique = keep" in why
        return
    assert why is None
    svc.receive_context("sg1", cdbs)
    moved = next(i for i in svc.engine.ike_sas() if i is not local)
    assert moved.state is IkeState.ESTABLISHED and len(moved.children) == 1
    if unique == "replace":
        assert svc.engine.stats["unique-replaced"] == 1
        assert local.state is IkeState.DELETING and local.children == []
    else:
        assert local.state is IkeState.ESTABLISHED and len(local.children) == 1
    assert svc.engine.stats["unique-late"] == 0


@pytest.mark.parametrize("unique", ["no", "replace"])
def test_a_moved_ike_sa_meets_the_per_identity_bound_before_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    """The bound on IKE SAs per identity and connection (MAX_IKE_SAS_PER_IDENTITY, here 1)
    holds for one that would arrive by a transfer too: refused before the COMMIT; with
    ``unique = replace`` the one it would replace does not count."""
    from ipsecct.ikev2 import engine

    monkeypatch.setattr(engine, "MAX_IKE_SAS_PER_IDENTITY", 1)
    svc, _local, payload, _cdbs = _local_and_moving(tmp_path, unique)
    why = svc.check_unit("sg1", payload)
    assert (why is None) is (unique == "replace")
    assert why is None or "too many IKE SAs" in why


def test_a_moved_ike_sa_that_unique_keep_meets_only_after_its_commit_is_kept_and_told(
    tmp_path: Path,
) -> None:
    """The identity's IKE SA here appeared between the check before the COMMIT and the
    import (here: ``keep`` set in between): refusing the import now would lose the moved
    IKE SA (its CHILD SAs are here, the source forgot it), so both are kept and the
    operator is told (``unique-late``)."""
    from ipsecct.ikev2.ikesa import IkeState

    svc, local, payload, cdbs = _local_and_moving(tmp_path, "no")
    assert svc.check_unit("sg1", payload) is None
    svc.engine.connections[0].unique = "keep"
    svc.receive_context("sg1", cdbs)
    assert len(svc.engine.ike_sas()) == 2 and local.state is IkeState.ESTABLISHED
    assert svc.engine.stats["unique-late"] == 1


def test_a_unit_check_is_given_its_transfer_and_the_core_says_where_that_transfer_is() -> None:
    """What reserves a moving IKE SA's virtual IPs at the target (IkeService.check_unit)
    learns which transfer admits it, and later where that transfer is: open until its
    COMMIT, then committed; ended when it was refused."""
    from ipsecct.ct.transfer import UNIT_IKEV2, unit_cdb
    from tests.helpers.transfer import World

    for refuse in (False, True):
        tw = World()
        tw.gw["sg1"].core.unit_cdbs = lambda tunnels: [
            unit_cdb(UNIT_IKEV2, [t.outbound.spi for t in tunnels], b"ike")]
        core2 = tw.gw["sg2"].core
        seen: list[tuple[str, bytes, int]] = []
        core2.unit_checks[UNIT_IKEV2] = lambda peer, p, tid, spis, refuse=refuse, seen=seen: (  # type: ignore[misc]
            seen.append((peer, p, tid)) or ("no" if refuse else None))
        tid = tw.transfer()
        assert core2.incoming_state("sg1", tid) == "ended"  # (nothing came yet)
        tw.deliver("sg1", "sg2")
        assert seen == [("sg1", b"ike", tid)]
        assert core2.incoming_state("sg1", tid) == ("ended" if refuse else "open")
        tw.deliver_all()
        assert core2.incoming_state("sg1", tid) == ("ended" if refuse else "committed")


def test_a_strict_target_refuses_a_unit_without_the_peers_chain_serials_and_counts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway's check before the COMMIT (IkeService.check_unit) with a connection under
    remote.revocation = strict: a certificate IKE SA whose UNIT payload carries the chain's
    serials (item 15) is admitted; without them (an older source, or no room in its
    context) refused, logged ``ike-sa-refused`` with the reason, counted
    ``revocation-unchecked-refused``."""
    import dataclasses

    from ipsecct.ikev2 import context
    from tests.helpers.ikev2_certs import revocable_peer

    w, _, _, gw, _, _ = revocable_peer()
    (ike,) = w.resp.ike_sas()
    (payload,) = context.unit_payloads(ike, ike.children, 1.0)
    d = context._parse(context._frame(0, payload))[1]
    no_15 = context._items([(t, v) for t, vs in d.items() if t != 15 for v in vs])
    svc = ike_service(tmp_path)
    svc.engine.connections[:] = [dataclasses.replace(gw, revocation="strict")]
    assert svc.check_unit("sg1", payload) is None
    with caplog.at_level("WARNING"):
        why = svc.check_unit("sg1", no_15)
    assert why is not None and "revocation = strict" in why
    assert svc.engine.stats["revocation-unchecked-refused"] == 1
    assert any("ike-sa-refused" in r.getMessage() and "cannot check them" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_a_source_does_not_commit_when_its_context_lost_the_serials_its_unit_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate IKE SA's UNIT, built at the transfer's start, carries the peer's chain
    serials (item 15) when its context then did (item 33): a target under
    remote.revocation = strict admits it. If the context grows before the COMMIT (a DELETE
    it owes the peer) so that item 33 no longer fits, the import after the COMMIT would be
    refused there: the CHILD SAs at the target, their IKE SA lost. The source's check just
    before the COMMIT (commit_check) refuses instead (the transfer rolls back, the IKE SA
    stays), logged and counted ``ike-sa-cannot-move``. A UNIT that did not announce them
    (no room at the start already) is not held back: such a target refused it before."""
    import copy

    from ipsecct.ct.transfer import Record, parse_unit
    from ipsecct.ikev2 import context as ike_context
    from tests.helpers.ikev2_certs import revocable_peer

    def _items_of(unit: bytes) -> dict[int, list[bytes]]:
        return ike_context._parse(ike_context._frame(0, parse_unit(unit)[2]))[1]

    w, _, _, gw, _, _ = revocable_peer()
    (ike_r,) = w.resp.ike_sas()
    svc = ike_service(tmp_path, "sg1")
    svc.engine.connections[:] = [gw]
    # (a copy: the peer is made once for all tests, export_ike would take its IKE SA)
    ike = svc.engine.import_ike(ike_context.encode(ike_r, 1.0), 1.0)
    now = svc.node.clock()
    # an identity as long as still leaves room for item 33, by a few octets
    def fits(i: int) -> bool:
        probe = copy.copy(ike)
        probe.peer_id = "CN=" + "x" * i
        return ike_context.carries_serials(probe, now)

    ike.peer_id = "CN=" + "x" * max(i for i in range(1000, 1800) if fits(i))
    assert ike_context.carries_serials(ike, now)
    tunnels = []
    for c in ike.children:
        entry, out, inn = c.sas(R500, I500, False, f"t-{c.spi_in:08x}")
        tunnels.append(svc.node.engine.add_tunnel(entry, out, inn))
    units = svc.unit_cdbs(tunnels)
    assert units and all(15 in _items_of(u) for u in units)
    assert svc.commit_check(tunnels) is None
    owed = ike_context.deletes_owed
    monkeypatch.setattr(ike_context, "deletes_owed", lambda x: [0x1234, 0x5678, *owed(x)])
    assert not ike_context.carries_serials(ike, now)  # (the context grew: no room for 33)
    why = svc.commit_check(tunnels)
    assert why is not None and "chain serials its UNIT announced" in why
    assert svc.engine.stats["ike-sa-cannot-move"] == 1
    # the transfer ended (rolled back); the next one's UNIT leaves item 15 out: it may go
    svc.on_transfer(Record(1, "source", "sg2", "predictive", 0.0, now, "failed",
                           spis=[c.spi_in for c in ike.children]))  # fmt: skip
    assert svc.commit_check(tunnels) is None  # (no UNIT of a running transfer announced it)
    units = svc.unit_cdbs(tunnels)
    assert units and all(15 not in _items_of(u) for u in units)
    assert svc.commit_check(tunnels) is None


def _long_unit_world(tmp_path: Path, target: Connection) -> tuple[World, IkeService, IkeSA]:
    """A transfer World whose tunnel is the only CHILD SA of a certificate IKE SA at sg1
    (revocable_peer's), sg1 and sg2 wired to IKE services as the gateway wires them (the
    source's UNIT CDBs and commit_check, the target's UNIT checks with ``target``)."""
    import dataclasses

    from ipsecct.ct.transfer import UNIT_IKEV2
    from ipsecct.ikev2 import context as ike_context
    from tests.helpers.ikev2_certs import revocable_peer

    w = World()
    p, _, _, gw, _, _ = revocable_peer()
    (ike_r,) = p.resp.ike_sas()
    svc1 = ike_service(tmp_path, "sg1")
    svc1.engine.connections[:] = [gw]
    # (a copy: the peer is made once for all tests, export_ike would take its IKE SA)
    ike = svc1.engine.import_ike(ike_context.encode(ike_r, 1.0), 1.0)
    (c,) = ike.children
    assert w.tunnel.inbound is not None
    ike.children[:] = [dataclasses.replace(c, spi_in=w.tunnel.inbound.spi,
                                           spi_out=w.tunnel.outbound.spi)]  # fmt: skip
    svc1.node.clock = lambda: w.now
    w.gw["sg1"].core.unit_cdbs = svc1.unit_cdbs
    w.gw["sg1"].core.commit_check = svc1.commit_check
    svc2 = ike_service(tmp_path, "sg2")
    svc2.engine.connections[:] = [target]
    svc2.node.clock = lambda: w.now
    core2 = w.gw["sg2"].core
    core2.unit_checks[UNIT_IKEV2] = svc2.check_unit
    core2.unit_kept[UNIT_IKEV2] = svc2.unit_kept
    svc2.incoming_state = core2.incoming_state
    return w, svc2, ike


def test_a_long_identity_is_still_checked_by_the_target_before_the_commit_no_sa_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate IKE SA whose identity and certificate names together are too long for
    a UNIT piece of their own (a DN of 900 characters, 1,000 octets of subjectAltNames):
    its UNIT left the peer's identity, auth, CA and chain serials out altogether, so a
    target whose remote.crls revoke the peer's certificate (or whose remote.id, or
    remote.revocation = strict, refuses it) admitted the UNIT, took the COMMIT and refused
    the IKE SA only at the import: its CHILD SAs moved, the IKE SA lost. The names are
    now cut to what fits (as in the context): the target refuses the unit before the
    COMMIT, the transfer fails cleanly, the source keeps the tunnel and its IKE SA, and no
    (SPI, sequence number) pair is sent twice. (Invariant.)"""
    import dataclasses

    from ipsecct.ikev2 import context as ike_context
    from ipsecct.ikev2.config import Identity
    from ipsecct.ikev2.ikesa import IkeState
    from tests.helpers.ikev2_certs import revoking_target

    _, _, revoking = revoking_target()
    target = dataclasses.replace(revoking, remote_id=Identity("%any"))
    w, _, ike = _long_unit_world(tmp_path, target)
    ike.peer_id = "CN=" + "x" * 900
    ike.peer_names = tuple(f"dns:n{i:02d}.{'a' * 20}.example" for i in range(32))
    assert ike_context.carries_serials(ike, w.now)  # (the context can check them)
    for i in range(3):
        w.host_send("sg1", i)
        w.mn_send(i)
    with caplog.at_level("WARNING", logger="ipsecct.gateway.ike"):
        w.transfer()
        w.deliver_all()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    assert sg1.finished and sg1.finished[-1].outcome == "refused", sg1.finished
    assert not any(r.outcome == "committed" for r in sg2.finished)
    assert any("ike-sa-refused" in r.getMessage() and "is revoked by remote.crls" in
               r.getMessage() for r in caplog.records)  # fmt: skip
    assert ike.state is IkeState.ESTABLISHED
    _stays_at_source(w, sg2)


def _stays_at_source(w: World, sg2: Gw) -> None:
    """A transfer refused before its COMMIT: nothing active at the target, the tunnel still
    serves both ways at the source, and no (SPI, sequence number) pair went out twice."""
    from ipsecct.ipsec.engine import TunnelState

    assert not any(t.state is TunnelState.ACTIVE for t in sg2.engine.tunnels())
    assert w.tunnel.state is TunnelState.ACTIVE
    for i in range(3, 6):
        w.host_send("sg1", i)
        w.mn_send(i)
    pairs = [(spi, seq) for _, spi, seq in w.all_wire()]
    assert len(pairs) == len(set(pairs)), "an (SPI, sequence number) pair was sent twice"


def test_an_identity_too_long_for_its_unit_does_not_move_nothing_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An IKE SA with 60 CHILD SAs and an identity of 1,500 characters: its context encodes,
    but its UNIT payload (every piece names all 60 CHILD SAs) has no room for the peer's
    identity, so a target could check the identity (remote.id, its keys, CA, revocation,
    unique) only at the import, after the COMMIT, and refuse the IKE SA whose CHILD SAs
    had moved. The source refuses such a transfer at its start (commit_check:
    ike-sa-cannot-move): nothing is sent, the tunnels stay served here. The same IKE SA
    with a short identity moves. (Invariant: one gateway sends on the tunnels.)"""
    import dataclasses
    import logging

    from ipsecct.errors import TransferError
    from ipsecct.ikev2 import context as ike_context
    from ipsecct.ipsec.engine import TunnelState

    w, _, ike = _long_unit_world(tmp_path, conn())
    sg1 = w.gw["sg1"]
    (c,) = ike.children
    tunnels = [w.tunnel]
    for i in range(1, 60):
        extra = dataclasses.replace(c, spi_in=0x10000 + i, spi_out=0x20000 + i)
        ike.children.append(extra)
        entry, out, inn = extra.sas(R500, I500, False, f"t-{i}")
        tunnels.append(sg1.engine.add_tunnel(entry, out, inn))
    ike.peer_id = "CN=" + "x" * 1500
    ike_context.encode(ike, w.now)  # (its context would go)
    assert not ike_context.unit_announces(ike, ike.children)
    with (caplog.at_level(logging.WARNING, logger="ipsecct.gateway.ike"),
          pytest.raises(TransferError, match=r"not started: ike-sa-cannot-move.*too long")):
        sg1.core.start(tunnels, "sg2", w.now)
    assert not any(w.links.values())
    assert all(t.state is TunnelState.ACTIVE and t.transfer_cap == 1 << 64 for t in tunnels)
    assert any("ike-sa-cannot-move" in r.getMessage() for r in caplog.records)
    ike.peer_id = "CN=mn.test"
    assert ike_context.unit_announces(ike, ike.children)
    sg1.core.start(tunnels, "sg2", w.now)


def test_every_start_action_start_child_comes_up_in_the_one_ike_sa_a_refused_one_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three ``start_action = start`` children (issue 10): one IKE SA, with the first in
    IKE_AUTH and the others asked for in it by CREATE_CHILD_SA, one after the other (as
    strongSwan does), never a second IKE SA nor a child asked for twice. The third the
    gateway has no child for (TS_UNACCEPTABLE): logged once, not asked for again. Rekeying
    the IKE SA asks for nothing; a restart of the connection asks for them all again."""
    import asyncio
    import dataclasses

    from ipsecct.ikev2.engine import IkeEngine
    from ipsecct.ikev2.ts import from_text

    base = mn_conn()
    net = dataclasses.replace(base.children[0], start_action="start")
    net2 = dataclasses.replace(net, name="net2", remote_ts=[from_text("10.3.0.0/16")])
    net3 = dataclasses.replace(net, name="net3", remote_ts=[from_text("10.4.0.0/16")])
    mn = dataclasses.replace(base, remote_addrs=[ipaddress.ip_network(f"{R500.host}/32")],
                             children=[net, net2, net3])  # fmt: skip
    gwc = conn()
    gw_net2 = dataclasses.replace(gwc.children[0], name="net2",
                                  local_ts=[from_text("10.3.0.0/16")])  # fmt: skip
    gw = IkeEngine([dataclasses.replace(gwc, children=[gwc.children[0], gw_net2])])
    cfg = from_dict(
        {
            "name": "mn",
            "outer": {"address": str(I500.host), "port": 45030},
            "inner": {"kind": "udp", "listen": "127.0.0.1:45031", "peer": "127.0.0.1:45032"},
        },
        str(tmp_path / "mn.toml"),
    )
    node = Node(cfg, role="node")
    svc = IkeService(node, [mn])
    sent: list[Send] = []
    monkeypatch.setattr(svc, "_send", sent.append)
    clock = [10.0]
    monkeypatch.setattr(node, "clock", lambda: clock[0])

    def run() -> None:
        # the exchanges, both ways, until neither side has more to say (the node's timer
        # sends the next CREATE_CHILD_SA wanted once the one in flight is answered)
        while True:
            if not sent:
                svc._act(svc.engine.tick(clock[0]))
                if not sent:
                    break
            s = sent.pop(0)
            for o in gw.receive(s.data, s.src, s.dst, clock[0]):
                if isinstance(o, Send):
                    svc._receive(o.data, o.src, o.dst)

    async def start() -> None:
        svc.ike_port = 0  # (no socket bound: what it sends is taken above)
        await svc.start()
        assert len(sent) == 1 and len(svc.engine.connecting) == 1  # one IKE_SA_INIT
        run()
        node.timers.remove("ike")

    asyncio.run(start())
    (ike,) = svc.engine.ike_sas()
    assert [c.config.name for c in ike.children] == ["net", "net2"]
    assert sorted(c.config.name for c in gw.ike_sas()[0].children) == ["net", "net2"]
    assert len(gw.ike_sas()) == 1 and len(node.engine.spd) == 2
    st = svc.engine.stats
    assert st["child-start-asked"] == 2 and st["child-create-sent"] == 2
    assert st["child-create-failed"] == 1  # net3, refused: once
    assert not ike.children_wanted and ike.pending is None
    svc._act(svc.engine.tick(clock[0] + 5.0))
    run()
    assert st["child-create-sent"] == 2 and st["child-start-asked"] == 2  # no loop
    # a rekeyed IKE SA keeps its children: nothing asked for
    clock[0] += 1.0
    svc._act(svc.engine.rekey_ike(ike, clock[0]))
    run()
    (new,) = svc.engine.ike_sas()
    assert new is not ike and new.spi_i != ike.spi_i
    assert sorted(c.config.name for c in new.children) == ["net", "net2"]
    assert st["child-start-asked"] == 2 and st["child-create-sent"] == 2
    # the connection restarted (a retry, dpd_action = restart): its IKE SA asks for the others
    svc._act(svc.engine.delete(new, clock[0]))
    run()
    assert not svc.engine.ike_sas()
    sent.clear()
    svc.initiate(mn, net2)
    run()
    (again,) = svc.engine.ike_sas()
    assert sorted(c.config.name for c in again.children) == ["net", "net2"]
    assert st["child-start-asked"] == 4 and st["child-create-failed"] == 2


@pytest.mark.parametrize("what", ["names-only", "pieces-without-identity"])
def test_a_unit_that_does_not_name_the_peer_is_refused_before_the_commit_no_sa_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, what: str
) -> None:
    """A source (hostile, or predating the policy items) whose UNIT names only the
    connection and CHILD configurations, or sends its policy in pieces (item 11) none of
    which carries the peer's identity: each payload passed its check on its own, the
    transfer committed with remote.id, unique and the per-identity bound unchecked, and the
    target refused the IKE SA only at the import (its CHILD SAs here without it). Now the
    unit is refused before the COMMIT (logged ``ike-sa-refused``, counted
    ``unit-unidentified-refused``), the source keeps the tunnel and its IKE SA, and no
    (SPI, sequence number) pair is sent twice. (Invariant.)"""
    import dataclasses

    from ipsecct.ct.transfer import UNIT_IKEV2, unit_cdb
    from ipsecct.ikev2 import context as ike_context
    from ipsecct.ikev2.config import Identity
    from ipsecct.ikev2.ikesa import IkeState
    from tests.helpers.ikev2_certs import revoking_target

    _, _, revoking = revoking_target()
    # the peer's identity is not remote.id here: only the import after the COMMIT saw it
    target = dataclasses.replace(revoking, remote_id=Identity("CN=someone.else"), crls=None)
    w, svc2, ike = _long_unit_world(tmp_path, target)
    sg1 = w.gw["sg1"]
    w.gw["sg2"].core.unit_whole[UNIT_IKEV2] = svc2.check_unit_whole

    def hostile(tunnels: list[Tunnel]) -> list[bytes]:
        spis = [t.outbound.spi for t in tunnels]
        (p,) = ike_context.unit_payloads(ike, ike.children, w.now)
        d = ike_context._parse(ike_context._frame(0, p))[1]
        names = ike_context._items([(t, v) for t, vs in d.items() if t in (1, 5, 6) for v in vs])
        if what == "names-only":
            return [unit_cdb(UNIT_IKEV2, spis, names)]
        kids = ike_context._items([(9, v) for v in d[9]])  # the CHILD SA's piece only
        return [unit_cdb(UNIT_IKEV2, spis, names + ike_context._items([(11, kids)]))]

    sg1.core.unit_cdbs = hostile
    for i in range(3):
        w.host_send("sg1", i)
        w.mn_send(i)
    with caplog.at_level("WARNING", logger="ipsecct.gateway.ike"):
        w.transfer()
        w.deliver_all()
    sg2 = w.gw["sg2"]
    assert sg1.finished and sg1.finished[-1].outcome == "refused", sg1.finished
    assert not any(r.outcome == "committed" for r in sg2.finished)
    assert svc2.engine.stats["unit-unidentified-refused"] == 1
    assert any("ike-sa-refused" in r.getMessage() and "without the peer's identity"
               in r.getMessage() for r in caplog.records)  # fmt: skip
    assert ike.state is IkeState.ESTABLISHED
    _stays_at_source(w, sg2)


@pytest.mark.parametrize("unique", ["no", "keep"])
def test_a_standby_bounds_the_replicas_of_one_identity_as_they_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    """A replica holder checked a replica's identity only at the take-over, which took every
    IKE SA of it at once (``unique-late``): a hostile or buggy active could make the standby
    hold any number of one identity's IKE SAs past MAX_IKE_SAS_PER_IDENTITY (here 2), and
    ``unique = keep`` was not applied against the standby's own. Now each replica meets them
    as it arrives, as an arriving IKE SA does (counting the identity's replicas held there
    too): one over is refused (``ike-replica-refused``, the active lists it); once one of
    the others is gone, a later version passes."""
    import dataclasses
    import functools

    from ipsecct.ct import failover
    from ipsecct.ikev2 import engine
    from ipsecct.ikev2.engine import IkeEngine
    from tests.helpers.ikev2_engines import Wire

    monkeypatch.setattr(engine, "MAX_IKE_SAS_PER_IDENTITY", 2)
    sg1 = ike_service(tmp_path, "sg1")
    ikes = []
    for _ in range(3):  # three IKE SAs of mn.test at the active
        w = pair(mn_conn(dpd=10), conn(dpd=10))
        connect(w)
        (ike_r,) = w.resp.ike_sas()
        ikes.append(sg1.engine.import_ike(w.resp.export_ike(ike_r, 1.0), 1.0))
    fcfg = failover.FailoverConfig("active", "sg2", fencing=False)
    rep = failover.Replicator(sg1.node.engine, fcfg, session=7, extra=sg1.feed)
    rep.on_extra_refused = functools.partial(sg1.replica_refused, "sg2")
    sg2 = ike_service(tmp_path, "sg2")
    sg2.engine.connections[0].unique = unique
    sb = failover.Standby(sg2.node.engine, dataclasses.replace(fcfg, role="standby"),
                          sg2.node.cfg.outer, Identity.INDIRECT)  # fmt: skip
    sb.check_extra = sg2.check_replica
    sg2.replica_held = lambda key: key in sb.extra
    if unique == "keep":  # the identity has an IKE SA made at the standby
        connect(Wire(IkeEngine([mn_conn(dpd=10)]), sg2.engine), 0.5)

    def sync(now: float) -> None:
        for m in rep.poll(now):
            for r in sb.receive(m, now):  # type: ignore[arg-type]
                rep.receive(r, now)

    sync(2.0)
    refused = sg1.status()["replicas_refused"]
    if unique == "keep":
        assert sb.extra == {} and len(refused) == 3
        assert all("unique = keep" in x["reason"] for x in refused)
        return
    assert len(sb.extra) == 2 and len(refused) == 1
    assert "too many IKE SAs of identity 'mn.test'" in refused[0]["reason"]
    (out,) = [i for i in ikes if i.our_spi not in sb.extra]
    # one of the two held goes at the active; the refused one changes: it passes now
    gone = next(i for i in ikes if i is not out)
    sg1.engine.forget(gone)
    sync(3.0)
    sg1.liveness(out)
    sync(4.0)
    assert out.our_spi in sb.extra and gone.our_spi not in sb.extra and len(sb.extra) == 2
    assert sg1.status()["replicas_refused"] == []


@pytest.mark.parametrize("admitted", [False, True])
def test_a_unit_whose_tunnels_carry_traffic_its_child_sas_do_not_admit_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, admitted: bool
) -> None:
    """The selectors a UNIT announces for each CHILD SA are the source's word; the tunnels
    its transfer installs carry their own (here local 10.2.0.0/24, remote 10.1.0.2, while
    child 'net' admits local 10.1.0.0/16 only): the target checked the words and installed
    the tunnels, traffic its connection does not admit. Now the tunnels themselves are
    checked against the CHILD configuration the unit names for each, before the COMMIT
    (``unit-tunnels-refused``, ``ike-sa-refused``): the transfer is refused and the source
    keeps sending, no (SPI, sequence number) pair twice. A child that admits the tunnel's
    traffic takes it. (Invariant.)"""
    import dataclasses

    from ipsecct.ct.transfer import UNIT_IKEV2
    from ipsecct.ikev2.ts import from_text
    from tests.helpers.ikev2_certs import revoking_target

    _, _, revoking = revoking_target()
    target = dataclasses.replace(revoking, crls=None)
    if admitted:
        wide = [from_text("10.0.0.0/8")]
        target = dataclasses.replace(target, children=[
            dataclasses.replace(target.children[0], local_ts=wide, remote_ts=wide)])  # fmt: skip
    w, svc2, _ = _long_unit_world(tmp_path, target)
    w.gw["sg2"].core.unit_whole[UNIT_IKEV2] = svc2.check_unit_whole
    for i in range(3):
        w.host_send("sg1", i)
        w.mn_send(i)
    with caplog.at_level("WARNING", logger="ipsecct.gateway.ike"):
        w.transfer()
        w.deliver_all()
    sg1, sg2 = w.gw["sg1"], w.gw["sg2"]
    if admitted:
        assert sg1.finished[-1].outcome == "committed", sg1.finished
        assert svc2.engine.stats["unit-tunnels-refused"] == 0
        return
    assert sg1.finished and sg1.finished[-1].outcome == "refused", sg1.finished
    assert svc2.engine.stats["unit-tunnels-refused"] == 1
    assert any("ike-sa-refused" in r.getMessage() and "outside local_ts of child 'net'"
               in r.getMessage() for r in caplog.records)  # fmt: skip
    _stays_at_source(w, sg2)


def test_the_packets_forwarded_behind_an_ike_context_are_opened_before_its_import(
    tmp_path: Path,
) -> None:
    """Issue 11's handover window: at the target, an IKE SA's context (which follows the
    COMMIT of its CHILD SAs: they are active already) is imported at the end of the loop
    turn, so that the MN's packets the source forwarded behind it in the same read are
    opened first. Everything else from that peer keeps its place behind the import (an IKE
    request forwarded after the context, a transfer's message), and once a transfer's
    message waits so do the forwards after it. A context refused at its import is refused
    as before (counted, the CHILD SAs left as they are)."""
    import asyncio

    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import forward_cdb
    from ipsecct.gateway.service import Service
    from ipsecct.ikev2 import context
    from ipsecct.ikev2.engine import IkeEngine
    from tests.helpers.config_files import transfer_config
    from tests.helpers.ikev2_engines import PSK, Wire
    from tests.helpers.ikev2_engines import mn_conn as mn

    (tmp_path / "k.psk").write_bytes(PSK)
    (tmp_path / "k.psk").chmod(0o600)
    d = transfer_config({})
    d["connections"] = {"c": {"remote": {"id": "%any"}, "local": {"id": "gw.test"},
                              "proposals": ["aes128gcm16-prfsha256-x25519"],
                              "children": {"net": {"local_ts": ["10.1.0.0/16"],
                                                   "remote_ts": ["10.3.0.0/16"],
                                                   "esp_proposals": ["aes128gcm16"]}}}}
    d["secrets"] = {"ike-c": {"id": "gw.test", "file": "k.psk"}}
    svc = Service(from_dict(d, str(tmp_path / "sg1.toml")))
    assert svc.ike is not None and svc.transfer is not None
    # an IKE SA made with another gateway's engine (same connection): its context names
    # CHILD SAs the peer never handed over here, so the import refuses it
    other = Service(from_dict(dict(d, name="sg3"), str(tmp_path / "sg3.toml")))
    assert other.ike is not None
    w = Wire(IkeEngine([mn()]), other.ike.engine)
    connect(w)
    (ike,) = other.ike.engine.ike_sas()
    tag = cxtp.TransferTag(7, 0).encode()
    mn_addr = ipaddress.ip_address("10.3.0.1")
    ike_ctd = cxtp.CTD(mn_addr, 0, tuple(other.ike.engine.export_ike(ike, 1.0)))
    packet = bytes(range(40))  # inner, outbound: no tunnel here selects it
    fwd = cxtp.CTD(mn_addr, 0, (tag, forward_cdb(packet, False)))
    ike_fwd = cxtp.CTD(mn_addr, 0, (context.encode_forward(b"\0" * 40, I500, R500),))
    not_a_tag = cxtp.CTD(mn_addr, 0, (forward_cdb(packet, False),))
    core, ike_stats = svc.transfer.core.counters, svc.ike.engine.stats

    async def body() -> None:
        svc._peer_message("sg2", ike_ctd)
        svc._peer_message("sg2", fwd)  # at once, before the import
        svc._peer_message("sg2", ike_fwd)  # behind the import
        svc._peer_message("sg2", not_a_tag)  # a transfer's message: behind it too
        svc._peer_message("sg2", fwd)  # behind that message
        assert core["forward_refused"] == 1
        assert ike_stats["ike-context-refused"] == 0 and ike_stats["forward-refused"] == 0
        assert core["malformed"] == 0
        await asyncio.sleep(0)  # the loop turn ends
        assert ike_stats["ike-context-refused"] == 1  # refused as before: counted
        assert ike_stats["forward-refused"] == 1  # (no such IKE SA here)
        assert core["malformed"] == 1 and core["forward_refused"] == 2
        assert not svc._behind_ike
        # nothing waits: the next ones go at once, as before
        svc._peer_message("sg2", fwd)
        assert core["forward_refused"] == 3

    asyncio.run(body())
    assert not svc.ike.engine.ike_sas()


def test_the_float_to_the_nat_t_port_is_not_logged_as_a_peer_that_moved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every client that UDP-encapsulates (strongSwan with encap, or behind a NAT) floats
    from port 500 to 4500 in its IKE_AUTH, and the gateway logged ``ike-peer-moved`` at each
    connection: a strongSwan operator reads that as a roaming client. The float is logged
    as such (``ike-nat-t-float``, debug); a move to another address or port still is
    ``ike-peer-moved``, now with where it was."""
    import logging

    from ipsecct.ikev2.engine import PeerMoved
    from ipsecct.ikev2.ikesa import Address

    svc = ike_service(tmp_path)
    w = pair(mn_conn(encap=True), conn())
    connect(w)
    (ir,) = w.resp.ike_sas()
    host = ir.remote.host
    ir.remote = Address(host, 4500)
    with caplog.at_level(logging.DEBUG, logger="ipsecct.gateway.ike"):
        svc._one(PeerMoved(ir, Address(host, 500)))
    assert "event=ike-nat-t-float" in caplog.text and "ike-peer-moved" not in caplog.text
    assert all(r.levelno == logging.DEBUG for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ipsecct.gateway.ike"):
        svc._one(PeerMoved(ir, Address(host, 40001)))  # a NAT mapping that changed
        svc._one(PeerMoved(ir))  # a MOBIKE update: where it was is not said
    moved = [r.getMessage() for r in caplog.records if "ike-peer-moved" in r.getMessage()]
    assert len(moved) == 2 and f"was={host}:40001" in moved[0], moved



def _client_v_with_a_tunnel(svc: IkeService) -> tuple[ChildSA, SecurityAssociation]:
    """V, a client of ``svc`` at 192.0.2.10, connected: its CHILD SA and the outbound SA
    ``svc`` made for it (V's inbound SPI is its SPI)."""
    from ipsecct.ikev2.engine import ChildUp, IkeEngine
    from tests.helpers.ikev2_engines import Wire

    v = Wire(IkeEngine([mn_conn()]), svc.engine)
    connect(v)
    for o in v.of("r", ChildUp):
        svc._one(o)
    ((vc,),) = [ike.children for ike in v.ini.ike_sas()]
    held = svc.node.engine.outbound_spi_holder(vc.spi_in)
    assert held is not None and str(held.dst) == "192.0.2.10"
    return vc, held

def test_a_child_sa_whose_peer_chose_another_tunnels_outbound_spi_is_refused_ike_sa_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Our outbound SPI is the client's choice (its inbound SPI), any 32 bits: M chooses the
    one V chose (by chance, or copied from the ESP we send V). The SAD tells their outbound
    SAs apart by destination, but fail-over replicas, etcd keys and cluster grouping know a
    tunnel by its outbound SPI, and one of the two was lost at every take-over (which one,
    the copier's choice). The first holder (V) keeps its tunnel; M's CHILD SA is refused:
    NO_PROPOSAL_CHOSEN in IKE_AUTH (RFC 7296 §1.2: its IKE SA is still made) and
    TEMPORARY_FAILURE in CREATE_CHILD_SA (charon tries again later, with a new SPI), logged
    and counted; with an SPI of its own M's next CHILD SA is made."""
    import logging

    from ipsecct.ikev2.engine import ChildUp, IkeEngine
    from tests.helpers.ikev2_engines import Wire

    svc = ike_service(tmp_path)
    eng = svc.node.engine
    vc, held = _client_v_with_a_tunnel(svc)
    # M, at another address, chooses V's SPI for its inbound CHILD SA
    m = Wire(IkeEngine([mn_conn()], spi_range=(vc.spi_in, vc.spi_in)), svc.engine)
    m.nat = Address(ipaddress.ip_address("192.0.2.77"), 500)
    with caplog.at_level(logging.WARNING, logger="ipsecct.ikev2"):
        connect(m)
    (mi,) = m.ini.ike_sas()
    assert mi.state is IkeState.ESTABLISHED and not mi.children  # the IKE SA stays
    assert m.ini.stats["child-failed"] == 1 and not m.of("r", ChildUp)
    assert svc.engine.stats["child-spi-taken"] == 1
    assert "event=child-spi-taken conn=c child=net peer=192.0.2.77:" in caplog.text
    assert f"spi={vc.spi_in:08x} count=1" in caplog.text
    # CREATE_CHILD_SA with the same SPI: TEMPORARY_FAILURE, still nothing made
    m.deliver(m.ini.create_child(mi, mi.conn.children[0], 1.0), "i", 1.0)
    assert svc.engine.stats["child-spi-taken"] == 2 and not m.of("r", ChildUp)
    assert not mi.children and mi.state is IkeState.ESTABLISHED
    assert eng.outbound_spi_holder(vc.spi_in) is held  # V's tunnel is V's
    assert [t.outbound.dst for t in eng.tunnels()] == [held.dst]
    # an SPI of its own: made
    m.ini.spi_range = (0x100, 0xFFFFFFFF)
    m.deliver(m.ini.create_child(mi, mi.conn.children[0], 2.0), "i", 2.0)
    (up,) = m.of("r", ChildUp)
    svc._one(up)
    assert up.child.spi_out != vc.spi_in
    assert sorted(str(t.outbound.dst) for t in eng.tunnels()) == ["192.0.2.10", "192.0.2.77"]


def test_a_child_sa_whose_outbound_spi_another_members_tunnel_has_in_etcd_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The etcd mode: clients of two members choose one outbound SPI (any 32 bits of the
    client's choice). The check above looked at this gateway's tunnels only: sg2 made M's
    CHILD SA, whose tunnel it could then never record (tunnels/<spi> names sg1's group:
    fenced for good, cluster-not-owner), and which a take-over of sg1's group would have
    met beside sg1's tunnel of that SPI. The member asks etcd's view too (its last reading
    of the tunnel keys): a key in a group not its own refuses the CHILD SA as another tunnel
    here does (child-spi-taken; NO_PROPOSAL_CHOSEN, the IKE SA kept). A real etcd, sg2's
    driver and IKE service; sg1's key written as sg1 writes it."""
    import asyncio
    import logging

    from ipsecct.ct import ownership
    from ipsecct.gateway.cluster_driver import ClusterDriver
    from ipsecct.gateway.config import ClusterConfig
    from ipsecct.gateway.etcd import EtcdClient
    from ipsecct.ikev2.engine import ChildUp, IkeEngine
    from tests.helpers.cluster_standins import Channels, Transfer
    from tests.helpers.etcd_server import EtcdCluster
    from tests.helpers.ikev2_engines import Wire
    from tests.helpers.waiting import eventually

    spi = 0x5A5A0001
    svc = ike_service(tmp_path)

    async def run(endpoints: list[str]) -> None:
        c = EtcdClient(endpoints, timeout=5.0)
        keys = ownership.keys("default")
        lid, _ = await c.grant(60)  # sg1, with a tunnel of outbound SPI ``spi``
        g = ownership.home_group(lid, 0)
        await c.put(keys["members"] + "sg1", ownership.member_info("127.0.0.1:1", lid, 1),
                    lease=lid)  # fmt: skip
        await c.put(keys["groups"] + g, "sg1", lease=lid)
        await c.put(ownership.tunnel_key("default", spi), g)
        drv = ClusterDriver(svc.node, ClusterConfig(etcd=tuple(endpoints), ttl_s=2, groups=4))
        drv.attach(Channels(), Transfer(), Identity.DIRECT, ["sg1"])  # type: ignore[arg-type]
        drv.attach_ike(svc)
        drv.transfer = None
        await drv.start()
        try:
            await eventually(lambda: svc.engine.outbound_spi_taken(spi),
                             "sg2 to know sg1's tunnel of that SPI")  # fmt: skip
            assert not svc.engine.outbound_spi_taken(spi + 1)
            m = Wire(IkeEngine([mn_conn()], spi_range=(spi, spi)), svc.engine)
            with caplog.at_level(logging.WARNING, logger="ipsecct.ikev2"):
                connect(m)
            (mi,) = m.ini.ike_sas()
            assert mi.state is IkeState.ESTABLISHED and not mi.children  # the IKE SA stays
            assert svc.engine.stats["child-spi-taken"] == 1 and not m.of("r", ChildUp)
            assert f"spi={spi:08x} count=1" in caplog.text
            assert not list(svc.node.engine.tunnels())
        finally:
            await drv.stop()

    with EtcdCluster(tmp_path) as e:
        asyncio.run(run(e.endpoints))


def test_a_child_sa_of_ours_on_another_tunnels_spi_is_deleted_and_asked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same collision when WE initiate: the responder chooses our outbound SPI (its
    inbound one), and our own peer, another ipsecct engine (R, at another address), chooses
    the one V's tunnel here already sends with. That CHILD SA was installed beside V's (two
    tunnels of one outbound SPI: one of them lost at a take-over). Now it is not made: an
    INFORMATIONAL DELETE of it goes at once (R forgets it), one line is logged, and a
    CREATE_CHILD_SA asks again, in which R chooses another SPI: made, V's tunnel untouched.
    A responder that keeps choosing taken SPIs is asked SPI_TAKEN_RETRIES times in a row,
    then not again; so is a rekey of ours that meets one (the old CHILD SA stays)."""
    import logging

    from ipsecct.ikev2.engine import SPI_TAKEN_RETRIES, ChildUp, IkeEngine
    from tests.helpers.ikev2_engines import Wire

    cfg = from_dict({"name": "sg1", "outer": {"address": "127.0.0.1", "port": 45000},
                     "inner": {"kind": "udp", "listen": "127.0.0.1:45001",
                               "peer": "127.0.0.1:45002"}},
                    str(tmp_path / "sg1.toml"))  # fmt: skip
    ours = mn_conn(dpd=10)
    svc = IkeService(Node(cfg), [conn(dpd=10), ours])
    eng = svc.node.engine
    vc, held = _client_v_with_a_tunnel(svc)  # V, a client of ours, at 192.0.2.10
    # we initiate to R (192.0.2.1), which chooses V's SPI for its inbound CHILD SA
    r = Wire(svc.engine, IkeEngine([conn()], spi_range=(vc.spi_in, vc.spi_in)))
    with caplog.at_level(logging.WARNING, logger="ipsecct.ikev2"):
        r.deliver(svc.engine.initiate(ours, Address(ipaddress.ip_address("192.0.2.5"), 500),
                                      R500, 0.0), "i", 0.0)  # fmt: skip
    for ev in r.events["i"]:
        svc._one(ev)
    (ri,), (rr,) = svc.engine.ike_sas()[1:], r.resp.ike_sas()
    assert ri.state is IkeState.ESTABLISHED and not ri.children and not r.of("i", ChildUp)
    assert not rr.children  # R had made it: our DELETE removed it there
    assert svc.engine.stats["child-spi-taken"] == 1 == svc.engine.stats["delete-child-ok"]
    assert (f"event=child-spi-taken conn=mn child=net peer=192.0.2.1:500 id=gw.test"
            f" spi={vc.spi_in:08x} role=initiator") in caplog.text, caplog.text
    assert "asked again (1 of 3)" in caplog.text
    assert [t.outbound for t in eng.tunnels()] == [held]
    # asked again (at the next tick): R chooses an SPI of its own this time
    r.resp.spi_range = (0x100, 0xFFFFFFFF)
    r.deliver(svc.engine.tick(1.0), "i", 1.0)
    (up,) = r.of("i", ChildUp)
    svc._one(up)
    assert up.child.spi_out != vc.spi_in and ri.children == [up.child]
    assert eng.outbound_spi_holder(vc.spi_in) is held  # V's tunnel is V's
    assert sorted(str(t.outbound.dst) for t in eng.tunnels()) == ["192.0.2.1", "192.0.2.10"]
    # a rekey of ours meets V's SPI SPI_TAKEN_RETRIES + 1 times in a row: each successor
    # deleted at once, asked again SPI_TAKEN_RETRIES times, then later; the old SA serves
    r.resp.spi_range = (vc.spi_in, vc.spi_in)
    r.events["i"].clear()
    r.deliver(svc.engine.rekey_child(ri, up.child, 2.0), "i", 2.0)
    for n in range(SPI_TAKEN_RETRIES):
        r.deliver(svc.engine.tick(3.0 + n), "i", 3.0 + n)
    assert svc.engine.stats["child-spi-taken"] == 2 + SPI_TAKEN_RETRIES
    assert svc.engine.stats["child-spi-taken-gave-up"] == 1
    assert not r.of("i", ChildUp) and ri.children == [up.child] and not up.child.rekeyed
    assert up.child.rekey_at is not None and up.child.rekey_at >= 3.0 + SPI_TAKEN_RETRIES
    assert [c.spi_in for c in rr.children] == [up.child.spi_out]  # R: the old one only
    r.deliver(svc.engine.tick(5.0 + SPI_TAKEN_RETRIES), "i", 5.0 + SPI_TAKEN_RETRIES)
    assert svc.engine.stats["child-spi-taken"] == 2 + SPI_TAKEN_RETRIES  # not asked again
    assert eng.outbound_spi_holder(vc.spi_in) is held

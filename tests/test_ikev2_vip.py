"""IKEv2 configuration payloads (virtual IPs from pools, RFC 7296 §2.19, §3.15): the CP codec
(round trips, hypothesis fuzzing), the pools' leases, the engine as responder and initiator,
and the lease moving with the IKE SA's context (a handover, a take-over), hostile contexts
refused."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.errors import ConfigError, IkeContextError, IkeParseError, IkeProtocolError
from ipsecct.ikev2 import context
from ipsecct.ikev2 import message as M
from ipsecct.ikev2.config import Connection, Identity, parse_pools
from ipsecct.ikev2.engine import ChildUp, IkeEngine
from ipsecct.ikev2.pool import Pool, parse_range
from ipsecct.ikev2.ts import from_text
from tests.helpers.ikev2_engines import Wire, conn, connect, mn_conn

ip = ipaddress.ip_address


# -- codec --------------------------------------------------------------------------------


def test_cp_payload_round_trip() -> None:
    for p in (M.CPPayload(M.CfgType.CFG_REQUEST, ((1, b""), (8, b""), (3, b""))),
              M.CPPayload(M.CfgType.CFG_REPLY, ((1, bytes([10, 3, 0, 1])), (3, bytes(4)))),
              M.CPPayload(M.CfgType.CFG_REPLY, ())):  # fmt: skip
        data = M.encode_payloads([p])
        assert M.decode_payloads(data, M.PayloadType.CP) == [p]


def test_cp_payload_with_too_many_attributes_is_malformed() -> None:
    p = M.CPPayload(1, tuple((1, b"") for _ in range(M.MAX_CP_ATTRIBUTES + 1)))
    with pytest.raises(IkeParseError):
        M.decode_payloads(M.encode_payloads([p]), M.PayloadType.CP)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_cp_payload_raises_only_typed_errors(body: bytes) -> None:
    data = bytes((0, 0)) + (4 + len(body)).to_bytes(2, "big") + body
    try:
        (p,) = M.decode_payloads(data, M.PayloadType.CP)
    except (IkeParseError, IkeProtocolError):
        return
    assert isinstance(p, M.CPPayload)
    assert M.decode_payloads(M.encode_payloads([p]), M.PayloadType.CP) == [p]


# -- pools --------------------------------------------------------------------------------


def test_pool_ranges_and_config() -> None:
    assert parse_range("10.3.0.0/24") == (ip("10.3.0.1"), ip("10.3.0.254"))
    assert parse_range("10.3.0.5-10.3.0.9") == (ip("10.3.0.5"), ip("10.3.0.9"))
    pools = parse_pools({"pools": {"p": {"addrs": "10.3.0.0/24", "dns": ["10.3.0.53"],
                                         "share": "10.3.0.0/25"}}}, "x.toml")  # fmt: skip
    assert pools["p"].dns == (ip("10.3.0.53"),) and pools["p"].share == (
        ip("10.3.0.1"), ip("10.3.0.126"))
    for bad in ({"addrs": "10.3.0.0/24", "share": "10.4.0.0/25"}, {"addrs": "nope"}, {},
                {"addrs": "10.3.0.9-10.3.0.1"}, {"addrs": "10.3.0.0/24", "color": 1}):
        with pytest.raises(ConfigError):
            parse_pools({"pools": {"p": bad}}, "x.toml")


def test_pool_leases_online_offline_and_away() -> None:
    p = Pool("p", ip("10.3.0.1"), ip("10.3.0.3"))
    a = p.acquire("alice")
    b = p.acquire("bob")
    assert (a, b) == (ip("10.3.0.1"), ip("10.3.0.2"))
    p.release(a)
    assert p.acquire("carol") == ip("10.3.0.3")  # never leased before alice's offline one
    assert p.acquire("alice") == a  # her own offline lease back
    assert p.acquire("dave") is None  # all online
    p.release(b)
    assert p.acquire("dave") == b  # the oldest offline lease of another identity
    p.send_away(a)
    p.release(b)
    assert p.acquire("erin") == b and p.acquire("alice") is None  # away: nobody's
    assert p.refusal(a) is None and p.refusal(b) is not None
    assert p.refusal(ip("10.4.0.1")) is not None
    p.arrive(a, "alice")
    assert p.online[a] == "alice" and not p.away


def test_a_share_leases_only_its_part_but_admits_the_whole_pool() -> None:
    p = Pool("p", ip("10.3.0.1"), ip("10.3.0.8"), share=(ip("10.3.0.5"), ip("10.3.0.6")))
    assert [p.acquire(f"id{i}") for i in range(3)] == [ip("10.3.0.5"), ip("10.3.0.6"), None]
    assert p.acquire("x", ip("10.3.0.1")) is None  # a wish outside the share is not granted
    assert p.refusal(ip("10.3.0.1")) is None  # ... but such an IKE SA may arrive


# -- the engines ----------------------------------------------------------------------------


def vip_conn() -> Connection:
    c = conn(remote_ts="10.3.0.0/16")
    return dataclasses.replace(c, pools=["p4", "p6"])


def pools(share: str | None = None) -> dict[str, Pool]:
    out = {"p4": Pool("p4", ip("10.3.0.1"), ip("10.3.0.254"), (ip("10.3.0.53"),),
                      parse_range(share) if share else None),
           "p6": Pool("p6", ip("fd00::1"), ip("fd00::ff"))}  # fmt: skip
    return out


def vip_pair(vips: tuple[str, ...] = ("0.0.0.0",), share: str | None = None,
             local_id: str = "mn.test") -> Wire:  # fmt: skip
    ic = dataclasses.replace(mn_conn(local_ts="0.0.0.0/0", local_id=local_id),
                             vips=[ip(v) for v in vips])  # fmt: skip
    return Wire(IkeEngine([ic]), IkeEngine([vip_conn()], pools=pools(share)))


def test_a_client_asking_for_an_address_gets_one_and_its_child_sa_is_narrowed_to_it() -> None:
    w = vip_pair()
    connect(w)
    (ike_i,), (ike_r,) = w.ini.ike_sas(), w.resp.ike_sas()
    assert ike_r.vips == [("p4", ip("10.3.0.1"))]
    assert ike_i.vips == [("", ip("10.3.0.1"))]
    (child,) = ike_r.children
    assert [str(t) for t in child.remote_ts] == ["10.3.0.1-10.3.0.1"]
    assert [str(t) for t in ike_i.children[0].local_ts] == ["10.3.0.1-10.3.0.1"]
    assert ike_r.summary(0.0)["remote_vips"] == ["10.3.0.1"]
    assert ike_i.summary(0.0)["local_vips"] == ["10.3.0.1"]
    # the IKE SA ends: offline, and the same identity gets it back
    w.deliver(w.ini.delete(ike_i, 1.0), "i", 1.0)
    assert not w.resp.ike_sas() and w.resp.pools["p4"].offline == {ip("10.3.0.1"): "mn.test"}
    connect(w, 2.0)
    assert w.resp.ike_sas()[0].vips == [("p4", ip("10.3.0.1"))]


def test_both_families_and_dns() -> None:
    w = vip_pair(("0.0.0.0", "::"))
    ini = w.ini.connections[0]
    w.ini.connections[0] = dataclasses.replace(ini, children=[dataclasses.replace(
        ini.children[0], local_ts=[from_text("0.0.0.0/0"), from_text("::/0")])])
    w.resp.connections[0].children[0].remote_ts.append(from_text("fd00::/64"))
    connect(w)
    (ike_r,) = w.resp.ike_sas()
    assert ike_r.vips == [("p4", ip("10.3.0.1")), ("p6", ip("fd00::1"))]
    assert sorted(str(t) for t in ike_r.children[0].remote_ts) == [
        "10.3.0.1-10.3.0.1", "fd00::1-fd00::1"]


def test_lease_request_attributes_are_bounded_and_checked() -> None:
    eng = IkeEngine([vip_conn()], pools=pools())
    w = vip_pair()
    connect(w)
    ike = w.resp.ike_sas()[0]
    ike.vips = []
    attrs = ((1, b"\x01\x02"), (99, b"junk"), (3, b""), (1, bytes([10, 3, 0, 77])))
    reply = w.resp._lease(ike, M.CPPayload(1, attrs))
    assert reply is not None and (1, bytes([10, 3, 0, 77])) in reply.attributes
    assert (3, bytes([10, 3, 0, 53])) in reply.attributes  # asked DNS: given
    assert w.resp.stats["cp-bad-attribute"] == 1
    assert eng.stats["cp-bad-attribute"] == 0


def test_no_address_left_fails_the_child_with_internal_address_failure() -> None:
    w = vip_pair(share="10.3.0.7-10.3.0.7")
    connect(w)
    assert w.resp.ike_sas()[0].vips == [("p4", ip("10.3.0.7"))]
    ic = dataclasses.replace(w.ini.connections[0], local_id=Identity("other.test"))
    w2 = Wire(IkeEngine([ic]), w.resp)
    connect(w2, 1.0)
    ike2 = next(i for i in w.resp.ike_sas() if i.peer_id == "other.test")
    assert ike2.vips == [] and ike2.children == []  # the IKE SA stays up, no CHILD SA
    assert w.resp.stats["vip-pool-exhausted"] == 1
    assert w2.ini.stats["vip-not-given"] == 1


def test_a_connection_without_pools_ignores_the_request() -> None:
    ic = dataclasses.replace(mn_conn(), vips=[ip("0.0.0.0")])
    w = Wire(IkeEngine([ic]), IkeEngine([conn()]))
    connect(w)
    assert w.resp.ike_sas()[0].vips == [] and len(w.resp.ike_sas()[0].children) == 1


def test_the_lease_survives_ike_and_child_rekeys() -> None:
    w = vip_pair()
    connect(w)
    (ike_i,) = w.ini.ike_sas()
    w.deliver(w.ini.rekey_ike(ike_i, 5.0), "i", 5.0)
    live = [i for i in w.resp.ike_sas() if i.state.value == "established"]
    assert [i.vips for i in live] == [[("p4", ip("10.3.0.1"))]]
    assert w.resp.pools["p4"].online == {ip("10.3.0.1"): "mn.test"}
    new_i = next(i for i in w.ini.ike_sas() if i.state.value == "established")
    w.deliver(w.ini.rekey_child(new_i, new_i.children[0], 6.0), "i", 6.0)
    ups = [e for e in w.events["r"] if isinstance(e, ChildUp)]
    assert [str(t) for t in ups[-1].child.remote_ts] == ["10.3.0.1-10.3.0.1"]


def test_the_lease_moves_with_the_ike_sa_context() -> None:
    """A handover: the source's lease goes away (not leased again there), the target's pool
    of that name marks it online for the peer, and its rekeys keep narrowing to it."""
    w = vip_pair()
    connect(w)
    (ike,) = w.resp.ike_sas()
    (payload,) = context.unit_payloads(ike, ike.children)  # before the commit
    assert context.unit_vips(payload) == ("c", [("p4", ip("10.3.0.1"))])
    sg2 = IkeEngine([vip_conn()], pools=pools())
    assert sg2.vip_refusal(sg2.connections[0], False, ike.vips) is None
    cdbs = w.resp.export_ike(ike, 3.0)  # after it
    assert w.resp.pools["p4"].away == {ip("10.3.0.1")} and not w.resp.pools["p4"].online
    new = sg2.import_ike(cdbs, 3.0)
    assert new.vips == [("p4", ip("10.3.0.1"))]
    assert sg2.pools["p4"].online == {ip("10.3.0.1"): "mn.test"}
    assert sg2.pools["p4"].acquire("someone") == ip("10.3.0.2")
    # the source never gives it out again while it is away
    assert w.resp.pools["p4"].acquire("x", ip("10.3.0.1")) == ip("10.3.0.2")
    # it ends at sg2: offline there
    sg2._kill(new, "test", [])
    assert sg2.pools["p4"].offline == {ip("10.3.0.1"): "mn.test"}


def test_a_hostile_context_with_a_lease_outside_the_pool_or_leased_already_is_refused() -> None:
    w = vip_pair()
    connect(w)
    (ike,) = w.resp.ike_sas()
    for vips, why in (([("p4", ip("10.9.0.1"))], "not in pool"),
                      ([("nope", ip("10.3.0.9"))], "no such pool"),
                      ([("p4", ip("10.3.0.5"))], "leased here already")):  # fmt: skip
        ike.vips = vips
        cdbs = context.encode(ike, 1.0)
        sg2 = IkeEngine([vip_conn()], pools=pools())
        sg2.pools["p4"].acquire("somebody-else", ip("10.3.0.5"))
        with pytest.raises(IkeContextError, match=why):
            sg2.import_ike(cdbs, 1.0)
        assert not sg2.ike_sas()
        (payload,) = context.unit_payloads(ike, ike.children)
        assert sg2.vip_refusal(sg2.connections[0], False, context.unit_vips(payload)[1])
    # malformed items: typed errors only
    for item in (b"", b"\x05ab", b"\x02p4" + bytes(4), b"\x02p4\x01\x02\x03",
                 b"\x02\xff\xfe" + bytes([10, 3, 0, 1])):  # fmt: skip
        main = context._parse(context.encode(ike, 1.0)[0])[1]
        main[32] = [item]
        cdb = context._frame(context.FPT_IKE_SA, context._items(
            [(t, v) for t, vs in main.items() for v in vs]))  # fmt: skip
        with pytest.raises(IkeContextError):
            IkeEngine([vip_conn()], pools=pools()).import_ike([cdb], 1.0)


def test_a_take_over_marks_the_lease_and_the_replica_check_sees_the_pool() -> None:
    w = vip_pair()
    connect(w)
    (ike,) = w.resp.ike_sas()
    cdbs = context.encode(ike, 2.0)
    standby = IkeEngine([vip_conn()], pools=pools())
    assert context.replica_refusal(cdbs, standby.connections, 2.0) is None
    narrow_pools = {"p4": Pool("p4", ip("10.4.0.1"), ip("10.4.0.9")), "p6": pools()["p6"]}
    other = IkeEngine([vip_conn()], pools=narrow_pools)
    why = context.replica_refusal(cdbs, other.connections, 2.0, lambda i: other.vip_refusal(
        i.conn, i.we_initiated, i.vips, leased=False))  # fmt: skip
    assert why is not None and "not in pool" in why
    standby.import_ike(cdbs, 2.0)
    assert standby.pools["p4"].online == {ip("10.3.0.1"): "mn.test"}
    w.resp.forget(ike)  # the old active: away, never leased again there
    assert w.resp.pools["p4"].away == {ip("10.3.0.1")}

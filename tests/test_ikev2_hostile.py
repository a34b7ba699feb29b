"""An authenticated IKEv2 peer acting as an attacker, against the sans-I/O engine: what it
may say in its answers and requests must never widen this gateway's policy or fill its tables.
(The unauthenticated attacks, floods of IKE_SA_INIT and fragments, are in test_ikev2.py and
test_hostile_inputs.py.)"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
import sys
import time
import types
from collections.abc import Callable
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.errors import IkeContextError
from ipsecct.ikev2 import auth, context
from ipsecct.ikev2 import message as M
from ipsecct.ikev2.auth import Credentials
from ipsecct.ikev2.config import Connection, Identity
from ipsecct.ikev2.engine import (
    MAX_CHILD_SAS,
    MAX_FRAGMENTS,
    MAX_IKE_SAS_PER_IDENTITY,
    MAX_MID,
    MAX_PACKET,
    MAX_SYNCED_MID,
    MID_REKEY_AT,
    MID_SYNC_LEAP,
    RETRANSMIT_ANSWER_GAP,
    ChildDown,
    ChildUp,
    ConnectFailed,
    IkeEngine,
    IkeUp,
    Output,
    PeerMoved,
    Send,
)
from ipsecct.ikev2.ikesa import Address, IkeSA, IkeState
from ipsecct.ikev2.ts import from_text
from ipsecct.ipsec.spd import Selectors
from tests.helpers.ikev2_certs import cert_pki, leaf_cert, pubkey_conn, resubject
from tests.helpers.ikev2_engines import I500, R500, Wire, conn, connect, mn_conn, pair

EVERYTHING = from_text("0.0.0.0/0")


class WideningPeer(IkeEngine):
    """A peer that answers every CHILD SA request (a rekey of ours included) with traffic
    selectors wider than asked: everything, both ways."""

    def _child_for_peer(self, *args: object, **kw: object) -> list[M.Payload]:
        reply = super()._child_for_peer(*args, **kw)  # type: ignore[arg-type]
        return [M.TSPayload(p.initiator, (EVERYTHING,)) if isinstance(p, M.TSPayload) else p
                for p in reply]  # fmt: skip


def test_our_child_rekey_answered_with_wider_selectors_is_refused() -> None:
    """The gateway rekeys a CHILD SA (children's rekey_time, an hour by default); the peer's
    answer named 0.0.0.0/0 both ways and the successor was installed with it, first in the
    SPD: every other peer's traffic went into this peer's tunnel, and it could send from and
    to any address. The answer's selectors must be within what we proposed."""
    w = Wire(WideningPeer([mn_conn()]), IkeEngine([conn(child_rekey=100)]))
    connect(w)
    (ir,) = w.resp.ike_sas()
    (old,) = ir.children
    w.deliver(w.resp.tick(100.0), "r", 100.0)
    ups = [o for o in w.of("r", ChildUp) if isinstance(o, ChildUp) and o.child is not old]
    assert not ups, [str(t) for o in ups for t in o.child.local_ts + o.child.remote_ts]
    assert ir.children == [old] and w.resp.stats["rekey-failed"] == 1
    # the SA the peer made for the refused answer is deleted there
    (ii,) = w.ini.ike_sas()
    assert [c.spi_out for c in ii.children] == [old.spi_in]
    w.deliver(w.resp.tick(200.0), "r", 200.0)  # tried again later, refused again
    assert ir.children == [old] and w.resp.stats["rekey-failed"] == 2
    assert [c.spi_out for c in ii.children] == [old.spi_in]


def _rekey_requests(w: Wire, chain: bool, n: int) -> None:
    """The MN sends ``n`` CREATE_CHILD_SA requests naming a CHILD SA in REKEY_SA (the first
    one every time, or each time the newest, ``chain``) and never deletes the one it rekeyed."""
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    child = ii.children[0]
    for k in range(n):
        out: list[Output] = []
        w.ini._rekey_child_request(ii, child, 1.0 + k, out)
        ii.pending = None  # the answer is never read: the next request goes at once
        for s in out:
            assert isinstance(s, Send)
            w.resp.receive(s.data, s.src, s.dst, 1.0 + k)
        if chain:  # name the SA the last request made (the gateway's newest)
            child = dataclasses.replace(child, spi_in=ir.children[-1].spi_out)


@pytest.mark.parametrize("chain", [False, True], ids=["same-sa", "chain"])
def test_a_rekey_flood_under_a_valid_ike_sa_is_bounded(chain: bool) -> None:
    """CREATE_CHILD_SA with REKEY_SA was not counted against the CHILD SAs an IKE SA may have
    (16): naming the same SA again and again (or each new one in turn) and never deleting the
    old, a peer installed as many SA pairs in the SAD as it sent requests."""
    w = Wire(IkeEngine([mn_conn()]), IkeEngine([conn()]))
    connect(w)
    (ir,) = w.resp.ike_sas()
    _rekey_requests(w, chain, 100)
    assert len(ir.children) <= 2 * MAX_CHILD_SAS
    assert len(w.resp._child_spis) == len(ir.children)
    assert w.resp.stats["child-limit" if chain else "rekey-refused"] > 0


@pytest.mark.parametrize("local_ts", [
    ["10.1.0.0/16[tcp/80]"],
    ["10.1.0.0/16[tcp/80]", "10.1.0.0/16[tcp/443]"],
    ["10.1.0.0/16[tcp/80]", "10.1.0.0/16[udp/53]"],
], ids=["one-port", "two-ports", "two-protocols"])  # fmt: skip
def test_a_child_sa_never_covers_more_than_the_connection_allows(local_ts: list[str]) -> None:
    """The connection gives peers only some ports of 10.1.0.0/16; the peer asks for all of it
    (any protocol). The narrowed selectors were right, but the CHILD SA's policy held one
    protocol and one port range per side: selectors that disagreed (tcp/80 here, any there;
    two ports; two protocols) became any protocol and any port, and the peer reached every
    port of 10.1.0.0/16. What is installed must be within the configuration, and be what the
    peer was told."""
    rc = conn()
    rc.children[0].local_ts = [from_text(t) for t in local_ts]
    w = Wire(IkeEngine([mn_conn()]), IkeEngine([rc]))
    connect(w)
    (cr,), (ci,) = w.of("r", ChildUp), w.of("i", ChildUp)
    assert isinstance(cr, ChildUp) and isinstance(ci, ChildUp)
    assert (ci.child.local_ts, ci.child.remote_ts) == (cr.child.remote_ts, cr.child.local_ts)
    entry, _out, inn = cr.child.sas(R500, I500, False, "gw")
    gw, mn = ipaddress.ip_address("10.1.0.1"), ipaddress.ip_address("10.2.0.5")
    allowed = {(6, 80), (6, 443), (17, 53)}
    for sel in cast("tuple[Selectors, Selectors]", (entry.selectors, inn.selectors)):
        for proto, port in [(6, 80), (6, 443), (6, 22), (17, 53), (17, 161), (1, 8)]:
            if sel.matches(gw, mn, proto, port, 40000):
                assert (proto, port) in allowed and any(
                    f"[{'tcp' if proto == 6 else 'udp'}/{port}]" in t for t in local_ts)
        assert sel.matches(gw, mn, 6, 80, 40000)  # the first selector's traffic is covered


def test_a_create_child_sa_with_full_ts_payloads_costs_no_quadratic_time(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A connection with 10 remote subnets; an authenticated peer's CREATE_CHILD_SA with 255
    selectors in TSi and in TSr (any address, each with its own port range: 2550 distinct
    intersections). Narrowing removed duplicates by searching the list for each one:
    3.2 million comparisons, 0.4 s of the gateway's CPU per request (4 s with 32 subnets),
    and a request refused afterwards (no proposal chosen) leaves nothing to count against
    the CHILD SA limit, so the peer could repeat it at will while every other IKE SA, timer
    and transfer of the gateway waited. Counted here as selector comparisons, not time."""
    from ipsecct.ikev2.message import TrafficSelector as TS

    rc = conn()
    rc.children[0].remote_ts = [from_text(f"10.{100 + k}.0.0/16") for k in range(10)]
    w = Wire(IkeEngine([mn_conn(local_ts="10.100.0.5/32")]), IkeEngine([rc]))
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    assert len(ir.children) == 1
    anything = [M.TrafficSelector(M.TsType.IPV4_ADDR_RANGE, 0, port, 65535,
                                  ipaddress.IPv4Address(0), ipaddress.IPv4Address(2**32 - 1))
                for port in range(255)]  # fmt: skip
    compared = 0
    eq = TS.__eq__

    def counted(a: TS, b: object) -> bool:
        nonlocal compared
        compared += 1
        return eq(a, b)

    monkeypatch.setattr(TS, "__eq__", counted)
    out: list[Output] = []
    cc = w.ini.connections[0].children[0]
    spi = w.ini._new_child_spi()
    assert spi is not None
    w.ini._child_request(ii, "create-child", [], cc.esp_proposals, anything, anything, spi,
                         1.0, out)  # fmt: skip
    answer: list[Output] = []
    for frag in out:  # (RFC 7383 fragments: 510 selectors are 8 KiB)
        assert isinstance(frag, Send)
        answer += w.resp.receive(frag.data, frag.src, frag.dst, 1.0)
    assert compared < 2 * 255 * 10, compared
    assert any(isinstance(o, ChildUp) for o in answer) and len(ir.children) == 2
    # what the CHILD SA got: every remote subnet, the first selector's ports (any), the
    # local side's one subnet
    new = ir.children[-1]
    assert [str(t) for t in new.remote_ts] == [f"10.{100 + k}.0.0/16"
                                              for k in range(10)]  # fmt: skip
    assert [str(t) for t in new.local_ts] == ["10.1.0.0/16"]


def _unacceptable_proposals_and_20_connections() -> tuple[tuple[M.Proposal, ...], IkeEngine]:
    """255 IKE proposals no gateway takes (AES-GCM, PRF_HMAC_SHA2_256 and a DH group of no
    one, 1000-1254: an SA payload of ~9 KB), and a gateway of 20 connections with the
    default proposals."""
    T = M.TransformType
    hostile = tuple(M.Proposal(i + 1, M.ProtocolId.IKE, b"", (
        M.Transform(T.ENCR, 20, 128), M.Transform(T.PRF, 5), M.Transform(T.DH, 1000 + i)))
        for i in range(255))  # fmt: skip
    gw = IkeEngine([dataclasses.replace(conn(f"rw{k}", ike="default"),
                                        local_id=Identity(f"gw{k}.test"))
                    for k in range(20)])  # fmt: skip
    return hostile, gw


def test_an_unacceptable_sa_payload_costs_its_proposals_once_whatever_the_connections(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """An unauthenticated IKE_SA_INIT (any source: UDP) whose SA payload holds 255 proposals
    of the IKE protocol, each with an encryption and PRF the gateway takes but a DH group it
    does not, to a gateway of 20 roadwarrior connections with the default proposals: each
    connection's proposals were matched against every one of the peer's, twice (once for
    the KE payload's group): 20,400 matches, 0.14 s of the gateway's CPU per 8.7 KiB
    datagram with 50 such connections (measured with time.thread_time), answered
    NO_PROPOSAL_CHOSEN, which makes no half-open IKE SA: cookies never came, and a few
    such datagrams a second from spoofed sources held every IKE SA, timer and transfer of
    the gateway up. Now each of the peer's proposals is read once and matched once against
    each distinct configured proposal. Counted as matches, not time; a client is still
    served."""
    from ipsecct.ikev2 import proposal

    hostile, gw = _unacceptable_proposals_and_20_connections()
    offers = {o for c in gw.connections for o in c.proposals}
    matched = 0
    for name in ("match", "_match"):
        real = getattr(proposal, name, None)
        if real is not None:
            def counted(*a: object, _real: object = real, **kw: object) -> object:
                nonlocal matched
                matched += 1
                return _real(*a, **kw)  # type: ignore[operator]

            monkeypatch.setattr(proposal, name, counted)
    pl: list[M.Payload] = [M.SAPayload(hostile), M.KEPayload(31, bytes(32)),
                           M.NoncePayload(bytes(range(32)))]  # fmt: skip
    h = M.Header(bytes(range(1, 9)), bytes(8), 0, M.ExchangeType.IKE_SA_INIT, M.Flag.INITIATOR,
                 0, 0)  # fmt: skip
    data = M.encode_plain(h, pl)
    (answer,) = gw.receive(data, Address(ipaddress.ip_address("198.51.100.7"), 500), R500, 0.0)
    assert isinstance(answer, Send)
    assert M.Notify.NO_PROPOSAL_CHOSEN in M.notifies(M.decode(answer.data)[1])
    assert gw.stats["no-proposal-chosen"] == 1 and not gw.half_open
    assert matched <= len(offers) * len(hostile), matched
    w = Wire(IkeEngine([mn_conn(ike="default", remote_id="%any")]), gw)
    connect(w)
    assert w.of("r", IkeUp)


def test_failed_authentications_from_anyone_cannot_flood_the_log(
        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Anyone who completes an IKE_SA_INIT (its own address, one key exchange) may fail
    IKE_AUTH: each failure logged one ike-auth-failed line holding the identity it claimed, as
    long as its IDi (up to max_packet: 9,000 octets of name, 18,000 as hex) and the reason
    (a certificate's subject, any length): 60 failures a second from one address wrote about
    1 MB a second to the operator's log, for ever. Now the identity and the reason in that
    line are cut (with the octets they had) and each source network (a /24, an IPv6 /64)
    gets at most a few lines, then about one a second; every failure is still counted
    (auth-failed), and another network's failure is still logged."""
    import logging

    gw = IkeEngine([conn()])
    long_id = "a" * 4000 + ".test"
    caplog.set_level(logging.INFO, logger="ipsecct")

    def fail(host: str, now: float) -> None:
        mn = IkeEngine([mn_conn(local_id=long_id, psk=b"not the gateway's key at all")])
        w = Wire(mn, gw)
        src = Address(ipaddress.ip_address(host), 500)
        for o in mn.initiate(mn.connections[0], src, R500, now):
            if isinstance(o, Send):
                pending = gw.receive(o.data, src, R500, now)
                while pending:
                    sends = [x for x in pending if isinstance(x, Send)]
                    pending = []
                    for x in sends:
                        for y in mn.receive(x.data, R500, src, now):
                            if isinstance(y, Send):
                                pending += gw.receive(y.data, src, R500, now)
        assert not w.of("r", IkeUp)

    for k in range(60):
        fail("198.51.100.7", 100.0 + k / 60)
    fail("198.51.100.8", 100.5)  # (the same /24: an attacker's other address)
    fail("203.0.113.8", 101.0)
    assert gw.stats["auth-failed"] == 62
    lines = [r.getMessage() for r in caplog.records if "event=ike-auth-failed" in r.getMessage()]
    assert 2 <= len(lines) <= 8, len(lines)
    assert all(len(line) <= 1200 for line in lines), max(map(len, lines))
    assert "203.0.113.8" in lines[-1] and "4005 octets" in lines[-1]
    assert not any("198.51.100.8" in line for line in lines)


def test_a_certificate_with_an_overlong_attribute_writes_no_python_warning() -> None:
    """Anyone's IKE_AUTH (no CA needed) with a certificate whose CN is 3,001 characters (X.520
    says at most 64): cryptography, reading the subject, issued a Python UserWarning
    ("Attribute's length must be >= 1 and <= 64, but it was 3001", and the source line that
    asked) to the daemon's standard error, two lines outside the log's format, a new one
    for every length a peer chose. Not ours to enforce (strongSwan takes such a name): no
    warning, and the peer is refused as any other certificate no CA here issued."""
    import warnings

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca, gw_cert, gw_key, _ = cert_pki("p256")
    other_ca, _, mn_key, other_key = cert_pki("p256")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x" * 3001, _validate=False)])
    mn_cert = resubject(leaf_cert(other_ca, other_key, mn_key, "unused"), subject, other_key)
    ini = IkeEngine([pubkey_conn(mn_conn(), mn_cert, mn_key, "%any", other_ca)],
                    wall_offset=time.time())  # fmt: skip
    gw = IkeEngine([pubkey_conn(conn(), gw_cert, gw_key, "CN=*", ca)], wall_offset=time.time())
    (init,) = [o for o in ini.initiate(ini.connections[0], I500, R500, 0.0)
               if isinstance(o, Send)]  # fmt: skip
    (resp,) = [o for o in gw.receive(init.data, I500, R500, 0.0) if isinstance(o, Send)]
    auth = [o for o in ini.receive(resp.data, R500, I500, 0.0) if isinstance(o, Send)]
    with warnings.catch_warnings(record=True) as seen:  # (the gateway's part only)
        warnings.simplefilter("default")
        for a in auth:
            gw.receive(a.data, I500, R500, 0.0)
    assert gw.stats["auth-failed"] == 1 and not gw.ike_sas()
    assert not [str(x.message) for x in seen if "length" in str(x.message)]



def _python_calls(receive: Callable[[], list[Output]]) -> tuple[int, list[Output]]:
    """The Python functions called (each frame entered, C functions not counted) while
    ``receive`` runs: a count of work that no load on the machine changes."""
    calls = 0

    def count(frame: types.FrameType, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(count)
    try:
        out = receive()
    finally:
        sys.setprofile(None)
    return calls, out


def test_an_unacceptable_sa_payload_costs_a_few_calls_per_proposal_read() -> None:
    """An IKE_SA_INIT from anyone (no answer needed: any source address) whose SA payload
    holds 255 IKE proposals of a DH group nobody has, answered NO_PROPOSAL_CHOSEN: no
    half-open IKE SA, so cookies (RFC 7296 2.6) never start. It cost 36 Python calls per
    proposal (9,297 here; 3.2 ms of CPU per 9 KB datagram, 25 times an acceptable
    IKE_SA_INIT: ~300 a second filled a core): a Transform and a transform parser per
    transform read, five generators per proposal matched. Now the SA payload is read by
    offsets and each distinct transform made once per payload, a proposal summed up in one
    pass, and passed over before matching when it shares no encryption, PRF or DH group with
    a configured proposal: 6.5 calls per proposal (at most 8 allowed). Counted as calls, not
    time; a client is served in the midst of the flood."""
    hostile, gw = _unacceptable_proposals_and_20_connections()
    pl: list[M.Payload] = [M.SAPayload(hostile), M.KEPayload(31, bytes(32)),
                           M.NoncePayload(bytes(range(32)))]  # fmt: skip
    h = M.Header(bytes(range(1, 9)), bytes(8), 0, M.ExchangeType.IKE_SA_INIT, M.Flag.INITIATOR,
                 0, 0)  # fmt: skip
    data = M.encode_plain(h, pl)

    def flood(k: int) -> list[Output]:
        return gw.receive(data, Address(ipaddress.ip_address(f"198.51.{k}.7"), 500), R500, 0.0)

    for k in range(8):  # (past the refusal log's burst: its line is not what is counted)
        flood(k)
    calls, (answer,) = _python_calls(lambda: flood(100))
    assert isinstance(answer, Send)
    assert M.Notify.NO_PROPOSAL_CHOSEN in M.notifies(M.decode(answer.data)[1])
    assert gw.stats["no-proposal-chosen"] == 9 and not gw.half_open
    assert calls <= 8 * len(hostile), calls
    w = Wire(IkeEngine([mn_conn(ike="default", remote_id="%any")]), gw)
    connect(w)
    for k in range(8, 16):
        flood(k)
    assert w.of("r", IkeUp) and gw.stats["no-proposal-chosen"] == 17


def test_a_source_at_its_half_open_limit_is_refused_before_its_init_is_read() -> None:
    """A source that holds MAX_HALF_OPEN_PER_SOURCE half-open IKE SAs: its next
    IKE_SA_INIT was read whole and its proposals matched (with 255 proposals a thousand
    times the calls of the header) before the per-source limit dropped it. Now the header
    says it is a new IKE_SA_INIT and the limit drops it: a few calls, whatever it holds,
    counted half-open-limit as before. A retransmission of one of its IKE SAs' IKE_SA_INIT
    is still answered, another source still connects."""
    from ipsecct.ikev2.engine import MAX_HALF_OPEN_PER_SOURCE

    hostile, gw = _unacceptable_proposals_and_20_connections()
    src = Address(ipaddress.ip_address("198.51.100.9"), 500)
    inits = []
    for _ in range(MAX_HALF_OPEN_PER_SOURCE):
        (i,) = IkeEngine([mn_conn()]).initiate(mn_conn(), src, R500, 0.0)
        assert isinstance(i, Send)
        assert len(gw.receive(i.data, src, R500, 0.0)) == 1
        inits.append(i.data)
    assert gw.half_open.from_host(src.host) == MAX_HALF_OPEN_PER_SOURCE
    pl: list[M.Payload] = [M.SAPayload(hostile), M.KEPayload(31, bytes(32)),
                           M.NoncePayload(bytes(range(32)))]  # fmt: skip
    h = M.Header(bytes(range(1, 9)), bytes(8), 0, M.ExchangeType.IKE_SA_INIT, M.Flag.INITIATOR,
                 0, 0)  # fmt: skip
    data = M.encode_plain(h, pl)
    calls, out = _python_calls(lambda: gw.receive(data, src, R500, 1.0))
    assert out == [] and gw.stats["half-open-limit"] == 1
    assert calls <= 20, calls  # (it was past 1,600: the payloads read, 255 proposals summed)
    assert gw.stats["no-proposal-chosen"] == 0
    (again,) = gw.receive(inits[0], src, R500, 1.0)  # a retransmission: answered
    assert isinstance(again, Send)
    w = Wire(IkeEngine([mn_conn(ike="default", remote_id="%any")]), gw)
    connect(w, 1.0)
    assert w.of("r", IkeUp)


_transforms = st.builds(
    M.Transform, st.integers(1, 6), st.integers(0, 65535),
    st.none() | st.integers(0, 65535))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(1, 3), st.binary(max_size=8),
                          st.lists(_transforms, min_size=1, max_size=6)),
                min_size=1, max_size=8))  # fmt: skip
def test_an_sa_payload_decodes_to_the_objects_its_constructors_make(
    props: list[tuple[int, int, bytes, list[M.Transform]]],
) -> None:
    """The SA payload's reader makes its Proposal and Transform objects without the frozen
    dataclasses' __init__ (a third of what reading a hostile one cost): what it returns is
    equal to, hashes as and reads (repr) as what the constructors make, and is as frozen."""
    sa = M.SAPayload(tuple(M.Proposal(n, p, spi, tuple(ts)) for n, p, spi, ts in props))
    h = M.Header(bytes(range(1, 9)), bytes(8), 0, M.ExchangeType.IKE_SA_INIT, M.Flag.INITIATOR,
                 0, 0)  # fmt: skip
    (got,) = M.decode(M.encode_plain(h, [sa]))[1]
    assert isinstance(got, M.SAPayload)
    assert got == sa and hash(got) == hash(sa) and repr(got) == repr(sa)
    for a, b in zip(got.proposals, sa.proposals, strict=True):
        assert type(a) is M.Proposal and a.__dict__ == b.__dict__
        for x, y in zip(a.transforms, b.transforms, strict=True):
            assert type(x) is M.Transform and x.__dict__ == y.__dict__
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.proposals[0].transforms[0].id = 1  # type: ignore[misc]


class HoardingPeer(IkeEngine):
    """A peer that rekeys IKE SAs and never deletes the one it replaced."""

    def _request(self, ike: IkeSA, kind: str, *args: object, **kw: object) -> None:
        if kind != "delete-rekeyed":
            super()._request(ike, kind, *args, **kw)  # type: ignore[arg-type]


def test_an_ike_rekey_flood_under_a_valid_ike_sa_is_bounded() -> None:
    """The peer rekeys its IKE SA, then the new one, and so on, never deleting the IKE SA it
    replaced: each waited 60 s for the DELETE, and a peer rekeying as fast as it could made
    the gateway hold (and scan at every IKE_SA_INIT) as many IKE SAs as it sent requests. An
    IKE SA whose predecessor still waits for its DELETE is not rekeyed again."""
    w = Wire(HoardingPeer([mn_conn()]), IkeEngine([conn()]))
    connect(w)
    for k in range(40):
        newest = max(w.ini.ike_sas(), key=lambda i: i.created)
        w.deliver(w.ini.rekey_ike(newest, 1.0 + k), "i", 1.0 + k)
    assert len(w.resp.ike_sas()) <= 2
    assert w.resp.stats["ike-rekey-refused"] > 0
    # a peer that deletes the IKE SA it replaced rekeys as often as it likes
    w = pair()
    connect(w)
    for k in range(5):
        (ii,) = [i for i in w.ini.ike_sas() if i.state is IkeState.ESTABLISHED]
        w.deliver(w.ini.rekey_ike(ii, 1.0 + k), "i", 1.0 + k)
    assert len(w.resp.ike_sas()) == 1 and w.resp.stats["ike-sa-rekeyed"] == 5
    (ir,) = w.resp.ike_sas()
    assert len(ir.children) == 1


def test_a_sync_request_cannot_exhaust_our_message_ids() -> None:
    """RFC 6311 lets the peer's member that took over tell us our next message ID; any peer
    that announced it (strongSwan does) may send one. Told 0xFFFFFFFF, the gateway sent its
    next liveness check under it and then raised struct.error in every tick(): the adapter's
    timer logged a failure a second and never reached the IKE SAs after this one (their
    retransmissions, rekeys, liveness checks). A sync that leaves no message IDs is refused."""
    cbc = "aes128-sha256-x25519"  # with AEAD and our own requests sent the MN would probe
    w = pair(mn_conn(ike=cbc), conn(ike=cbc, dpd=10))
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    before = ir.my_next_mid
    ii.peer_next_mid = 0xFFFFFFFF  # what the MN's sync tells the gateway to use next
    w.deliver(w.ini.start_mid_sync(ii, 1.0), "i", 1.0)
    assert w.resp.stats["mid-sync-refused"] == 1 and ir.my_next_mid == before
    # (the MN answers the gateway's requests again: its sync, refused without an answer,
    # given up; while it waited for one it left the gateway's requests unanswered)
    ii.peer_next_mid, ii.pending = ir.my_next_mid, None
    for t in (20.0, 40.0, 60.0, 80.0):  # raised struct.error from the second on
        w.deliver(w.resp.tick(t), "r", t)
    assert ir.state is IkeState.ESTABLISHED and w.resp.stats["liveness-ok"] == 4


def test_a_peer_touches_only_its_own_child_sas() -> None:
    """Peer A names peer B's CHILD SA (both its SPIs) in a DELETE and in a REKEY_SA under A's
    own IKE SA: B's CHILD SA stays, and so does A's."""
    gw = IkeEngine([conn()])
    wa = Wire(IkeEngine([mn_conn()]), gw)
    wb = Wire(IkeEngine([mn_conn(local_id="mn2.test", local_ts="10.2.0.6/32")]), gw)
    connect(wa)
    connect(wb, 1.0)
    ia = wa.ini.ike_sas()[0]
    ra, rb = sorted(gw.ike_sas(), key=lambda i: i.peer_id)
    assert (ra.peer_id, rb.peer_id) == ("mn.test", "mn2.test")
    (ca,), (cb,) = ra.children, rb.children
    spis = (cb.spi_out.to_bytes(4, "big"), cb.spi_in.to_bytes(4, "big"))
    out: list[Output] = []
    wa.ini._request(ia, "delete-child", [M.DeletePayload(M.ProtocolId.ESP, spis)], 2.0, out)
    wa.deliver(out, "i", 2.0)
    out = []
    wa.ini._rekey_child_request(ia, dataclasses.replace(ia.children[0], spi_in=cb.spi_out),
                                3.0, out)  # fmt: skip
    wa.deliver(out, "i", 3.0)
    assert gw.stats["rekey-unknown-child"] == 1 and gw.stats["child-deleted-by-peer"] == 0
    assert ra.children == [ca] and rb.children == [cb]
    assert not wa.of("r", ChildDown) and not wb.of("r", ChildDown)


def _two_connections_wire(psk: bytes, peer_id: str, gw: IkeEngine) -> Wire:
    return Wire(IkeEngine([mn_conn(local_id=peer_id, psk=psk, remote_ts="10.0.0.0/8")]), gw)


def test_a_psk_proves_only_its_own_connection() -> None:
    """Connection x takes anyone with its PSK (remote.id %any), connection y only y.test
    with another PSK, x written first. The real y.test was refused (AUTHENTICATION_FAILED):
    the first connection whose remote.id matched, x, was the only one whose PSK was tried.
    A peer with x's PSK that claims to be y.test gets x's CHILD SA, never y's, and its
    INITIAL_CONTACT does not replace the real y.test's IKE SA."""
    x = conn("x", psk=b"x's pre-shared key", local_ts="10.1.0.0/16")
    y = conn("y", psk=b"y's pre-shared key", local_ts="10.3.0.0/16", remote_id="y.test")
    gw = IkeEngine([x, y])
    real = _two_connections_wire(b"y's pre-shared key", "y.test", gw)
    connect(real)
    (ry,) = gw.ike_sas()
    assert ry.conn is y and [str(t) for t in ry.children[0].local_ts] == [
        "10.3.0.0/16"]
    fake = _two_connections_wire(b"x's pre-shared key", "y.test", gw)
    connect(fake, 1.0)
    (rx,) = [i for i in gw.ike_sas() if i is not ry]
    assert rx.conn is x and rx.peer_id == "y.test" and rx.initial_contact
    assert [str(t) for t in rx.children[0].local_ts] == ["10.1.0.0/16"]
    assert ry.state is IkeState.ESTABLISHED and len(ry.children) == 1
    assert gw.stats["initial-contact-replaced"] == 0
    # with neither key: refused, whatever it claims
    for claim in ("y.test", "z.test"):
        w = _two_connections_wire(b"nobody's key", claim, gw)
        connect(w, 2.0)
        assert w.of("i", ConnectFailed) and len(gw.ike_sas()) == 2


def test_a_certificate_proves_only_the_names_it_holds() -> None:
    """A valid certificate from the trusted CA for peer.test (its subjectAltName): claiming
    another name (IDi admin.test, which remote.id wants) is refused; claiming its own name
    where remote.id wants another too; its own name where remote.id wants it, or its subject
    DN where remote.id names its subjectAltName, is taken."""
    ca, cert, key, _ = cert_pki("p256")

    def pk(c: Connection, local_id: str | None, remote_id: str) -> Connection:
        return dataclasses.replace(c, local_auth="pubkey", remote_auth="pubkey",
                                   local_id=Identity(local_id) if local_id else None,
                                   remote_id=Identity(remote_id),
                                   credentials=Credentials((cert,), key),  # type: ignore[arg-type]
                                   cacerts=[ca])  # type: ignore[list-item]  # fmt: skip

    for claim, wanted, ok in [("admin.test", "admin.test", False),
                              ("peer.test", "admin.test", False),
                              ("peer.test", "peer.test", True),
                              (None, "peer.test", True)]:  # fmt: skip
        ini = IkeEngine([pk(mn_conn(), claim, "%any")], wall_offset=time.time())
        gw = IkeEngine([pk(conn(), None, wanted)], wall_offset=time.time())
        w = Wire(ini, gw)
        connect(w)
        assert bool(w.of("r", IkeUp)) is ok, (claim, wanted)
        assert gw.stats["auth-failed"] == (not ok)


@pytest.mark.parametrize(("subject_cn", "remote_cn"), [
    ("\ufb01nance.test", "finance.test"),  # LATIN SMALL LIGATURE FI: 'fi' once folded
    ("ad\u017fmin.test", "adsmin.test"),  # LATIN SMALL LETTER LONG S: 's' once folded
    ("\u212aey.test", "key.test"),  # KELVIN SIGN: 'k' once folded
    ("stra\u00dfe.test", "STRASSE.test"),  # sharp s: 'ss' once folded (another length)
], ids=["ligature", "long-s", "kelvin", "sharp-s"])
def test_a_certificate_subject_that_only_unicode_folding_makes_equal_is_another_name(
        subject_cn: str, remote_cn: str) -> None:  # fmt: skip
    """A DN remote.id names a certificate's subject case aside, as strongSwan's compare_dn
    ignores case: ASCII letters only (strncasecmp, and only where the lengths are equal). A
    client the trusted CA certified under another Unicode name (a CA that tells its subjects
    apart by their octets issues both) is not the one remote.id names because full Unicode
    case folding makes the two texts equal; the name itself, in another ASCII case, still is."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca, gw_cert, gw_key, ca_key = cert_pki("p256")
    _, _, mn_key, _ = cert_pki("p256")
    for cn, up in [(subject_cn, False), (remote_cn.swapcase(), True)]:
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Org"),
                             x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip
        mn_cert = resubject(leaf_cert(ca, ca_key, mn_key, "unused"), subject, ca_key)
        ini = IkeEngine([pubkey_conn(mn_conn(), mn_cert, mn_key, "peer.test", ca)],
                        wall_offset=time.time())  # fmt: skip
        gw = IkeEngine([pubkey_conn(conn(), gw_cert, gw_key, f"O=Test Org, CN={remote_cn}", ca)],
                       wall_offset=time.time())  # fmt: skip
        w = Wire(ini, gw)
        connect(w)
        assert bool(w.of("r", IkeUp)) is up, cn
        assert gw.stats["auth-failed"] == (not up)
        # and a peer gateway's IKE SA context naming that subject is not admitted either
        named = Identity(f"O=Test Org, CN={remote_cn}")
        assert context._id_admitted(dataclasses.replace(conn(), remote_id=named),
                                    subject.rfc4514_string(), None) is up  # fmt: skip


@pytest.mark.parametrize(("kind", "claim", "san"), [
    ("dns", "key.test", "\u212aey.test"),  # KELVIN SIGN: lower() makes it 'k'
    ("email", "kim@test", "\u212aim@test"),
])
def test_a_subject_alt_name_that_only_unicode_lowering_makes_equal_proves_nothing(
        kind: str, claim: str, san: str) -> None:  # fmt: skip
    """A certificate from the trusted CA whose subjectAltName holds a name in octets outside
    ASCII (an IA5String is not checked by the parser: U+212A KELVIN SIGN, which Python's
    lower() turns into 'k') does not prove the ASCII name it lowers to: the peer claiming
    that name (IDi, which remote.id wants) is refused, as strongSwan compares a name's octets
    case aside (strncasecmp, same lengths); a peer gateway's IKE SA context carrying those
    names is not admitted for remote.id either. The name in another ASCII case still is."""
    from cryptography import x509

    ca, gw_cert, gw_key, ca_key = cert_pki("p256")
    _, _, mn_key, _ = cert_pki("p256")
    cls = x509.DNSName if kind == "dns" else x509.RFC822Name
    for name, up in [(san, False), (claim.upper(), True)]:
        gn = cls._init_without_validation(name)  # (as a peer's DER may hold it)
        mn_cert = leaf_cert(ca, ca_key, mn_key, "unused", [gn])
        ini = IkeEngine([dataclasses.replace(pubkey_conn(mn_conn(), mn_cert, mn_key, "%any", ca),
                                             local_id=Identity(claim))],
                        wall_offset=time.time())  # fmt: skip
        gw = IkeEngine([pubkey_conn(conn(), gw_cert, gw_key, claim, ca)], wall_offset=time.time())
        w = Wire(ini, gw)
        connect(w)
        assert bool(w.of("r", IkeUp)) is up, name
        assert gw.stats["auth-failed"] == (not up)
        names = auth.cert_names(mn_cert)  # type: ignore[arg-type]
        assert context._id_admitted(dataclasses.replace(conn(), remote_id=Identity(claim)),
                                    "CN=unused", names) is up  # fmt: skip


def test_a_retransmission_is_answered_once_per_gap_where_the_peer_is_and_once_elsewhere() -> None:
    """A captured request replayed brought back its (perhaps fragmented) answer each time:
    now at most one answer per RETRANSMIT_ANSWER_GAP per IKE SA to where the peer is, and
    as many to elsewhere (MOBIKE answers where a retransmission came from), so a replay
    flood from a forged source neither amplifies nor keeps the peer's own retransmission
    unanswered. The rest are counted (retransmit-rate-limited)."""
    w = pair(mn_conn(), conn())
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    assert ir.mobike
    (check,) = w.ini.liveness(ii, 1.0)
    assert isinstance(check, Send)
    assert len(w.resp.receive(check.data, check.src, check.dst, 1.0)) == 1  # the answer
    thief = Address(ipaddress.ip_address("203.0.113.66"), 4500)

    def again(src: Address, now: float) -> list[Address]:
        out = w.resp.receive(check.data, src, check.dst, now)
        return [o.dst for o in out if isinstance(o, Send)]

    gap = RETRANSMIT_ANSWER_GAP
    assert again(check.src, 1.5) == [check.src]
    assert again(check.src, 1.5 + gap / 2) == []  # within the gap: not answered
    assert again(thief, 1.5 + gap / 2) == [thief]  # elsewhere: its own budget
    assert again(thief, 1.5 + gap * 0.9) == []
    assert again(check.src, 1.5 + gap * 1.5) == [check.src]  # the peer's: answered
    assert w.resp.stats["retransmit-answered"] == 3
    assert w.resp.stats["retransmit-rate-limited"] == 2
    assert ir.remote == check.src


def test_a_retransmitted_ike_sa_init_is_answered_a_few_times_per_half_open_sa_and_source(
) -> None:
    """RFC 7296 §2.1: a retransmitted IKE_SA_INIT gets the response again. It got it every
    time, and the response (KE, nonce, NAT-D, a CERTREQ) is as large as the request or
    larger (with a CERTREQ, many times): replayed from a
    spoofed source, an amplifier towards that address. Now INIT_ANSWERS answers per half-open
    IKE SA and INIT_ANSWERS_PER_SOURCE a second per source over its half-open IKE SAs (a
    new second gives the source a new budget, not the IKE SA); the rest are counted
    (init-retransmit-unanswered), and the IKE SA is still made when IKE_AUTH comes."""
    from ipsecct.ikev2.engine import INIT_ANSWERS, INIT_ANSWERS_PER_SOURCE, IkeEngine

    w = pair()
    (init,) = w.ini.initiate(w.ini.connections[0], I500, R500, 0.0)
    assert isinstance(init, Send)
    (resp,) = w.resp.receive(init.data, I500, R500, 0.0)
    assert isinstance(resp, Send) and len(resp.data) >= len(init.data)
    answers = [w.resp.receive(init.data, I500, R500, 0.1 * n) for n in range(1, 11)]
    assert [len(a) for a in answers] == [1] * INIT_ANSWERS + [0] * (10 - INIT_ANSWERS)
    assert all(isinstance(o, Send) and o.data == resp.data for a in answers for o in a)
    assert w.resp.stats["retransmit-answered"] == INIT_ANSWERS
    assert w.resp.stats["init-retransmit-unanswered"] == 10 - INIT_ANSWERS
    assert w.resp.receive(init.data, I500, R500, 5.0) == []  # a later second: still done
    w.deliver(w.ini.receive(resp.data, R500, I500, 5.0), "i", 5.0)  # IKE_AUTH: made
    assert w.resp.ike_sas()[0].state is IkeState.ESTABLISHED
    # one source, many half-open IKE SAs: INIT_ANSWERS_PER_SOURCE a second over all of them
    gw = IkeEngine([conn()])
    inits = []
    for _ in range(8):
        (i,) = IkeEngine([mn_conn()]).initiate(mn_conn(), I500, R500, 10.0)
        assert isinstance(i, Send)
        assert len(gw.receive(i.data, I500, R500, 10.0)) == 1
        inits.append(i.data)
    got = sum(len(gw.receive(d, I500, R500, 10.5)) for d in inits for _ in range(2))
    assert got == INIT_ANSWERS_PER_SOURCE
    assert gw.stats["init-retransmit-unanswered"] == 16 - INIT_ANSWERS_PER_SOURCE
    other = Address(ipaddress.ip_address("192.0.2.99"), 500)  # (another source: its own)
    (o,) = IkeEngine([mn_conn()]).initiate(mn_conn(), other, R500, 10.5)
    assert isinstance(o, Send)
    assert len(gw.receive(o.data, other, R500, 10.5)) == 1
    assert len(gw.receive(o.data, other, R500, 10.6)) == 1
    got = sum(len(gw.receive(d, I500, R500, 11.6)) for d in inits)  # the next second
    assert got == 8 and gw.stats["retransmit-answered"] == INIT_ANSWERS_PER_SOURCE + 1 + 8


def test_a_request_for_an_unknown_ike_sa_gets_no_answer_and_is_counted() -> None:
    """RFC 7296 §2.21.4 lets a node answer a request for an IKE SA it does not know with
    INVALID_IKE_SPI, unprotected. Not sent (README, interop): charon sends none either
    (ike_sa_manager.c raises ALERT_INVALID_IKE_SPI and drops the message) and drops one it
    gets (message.c: a Notify of an INFORMATIONAL must be encrypted), so a strongSwan client
    learns nothing from it, and any source could have it sent anywhere. Counted
    (unknown-spi) for the operator, never answered, request or response alike."""
    w = pair()
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    (check,) = w.ini.liveness(ii, 1.0)
    assert isinstance(check, Send)
    w.resp.forget(ir)  # (the gateway restarted without it: a crash, a lost state)
    assert w.resp.receive(check.data, check.src, check.dst, 1.0) == []
    assert IkeEngine([conn()]).receive(check.data, check.src, check.dst, 1.0) == []
    forged = bytearray(check.data)
    forged[19] |= 0x20  # the same as a response: never answered either
    assert w.resp.receive(bytes(forged), check.src, check.dst, 1.0) == []
    assert w.resp.stats["unknown-spi"] == 2


@pytest.mark.parametrize("mobike", [False, True], ids=["no-mobike", "mobike"])
def test_a_replayed_request_from_elsewhere_does_not_move_the_peer(mobike: bool) -> None:
    """Someone on the path captures the MN's authenticated requests (a liveness check, a CHILD
    SA rekey, its IKE_AUTH) and sends them again from its own address: the peer's address
    stays, nothing is made twice. A retransmission is answered where the peer is, or with
    MOBIKE where it came from (RFC 4555 §3.8: it moves nothing; strongSwan repeats its path
    tests from its new address). Without MOBIKE a fresh request moves it (RFC 7296 §2.23);
    with MOBIKE it is answered there and moves nothing either (§3.8: only
    UPDATE_SA_ADDRESSES does)."""
    w = pair(dataclasses.replace(mn_conn(), mobike=mobike),
             dataclasses.replace(conn(), mobike=mobike))  # fmt: skip
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    assert ii.mobike is ir.mobike is mobike
    auth = w.sent[2].data
    w.deliver(w.ini.liveness(ii, 1.0), "i", 1.0)
    check = w.sent[-2].data
    w.deliver(w.ini.rekey_child(ii, ii.children[0], 2.0), "i", 2.0)
    rekey = w.sent[-4].data  # then its answer, the DELETE of the old SA and its answer
    delete = w.sent[-2].data  # the last request: a retransmission of it is answered
    assert M.decode(auth)[0].exchange == M.ExchangeType.IKE_AUTH
    assert M.decode(rekey)[0].exchange == M.ExchangeType.CREATE_CHILD_SA
    home, children = ir.remote, list(ir.children)
    thief = Address(ipaddress.ip_address("203.0.113.66"), 4500)
    answered = w.resp.stats["retransmit-answered"]
    for data in (auth, check, rekey, delete):
        out = w.resp.receive(data, thief, R500, 3.0)
        assert all(isinstance(o, Send) and o.dst == (thief if mobike else home) for o in out)
    assert w.resp.stats["retransmit-answered"] == answered + 1
    assert ir.remote == home and ir.children == children
    out = w.ini.liveness(ii, 4.0)  # a fresh one from there
    (req,) = out
    assert isinstance(req, Send)
    out = w.resp.receive(req.data, thief, R500, 4.0)
    assert any(isinstance(o, PeerMoved) for o in out) is not mobike
    assert ir.remote == (home if mobike else thief)
    (ans,) = out if mobike else [o for o in out if isinstance(o, Send)]
    assert isinstance(ans, Send) and ans.dst == thief  # answered where it came from
    assert w.resp.stats["mobike-path-tested"] == mobike


class NoContactPeer(IkeEngine):
    """A peer that never sends INITIAL_CONTACT (so its IKE SAs add up)."""

    def _request(self, ike: IkeSA, kind: str, payloads: list[M.Payload], *args: object,
                 **kw: object) -> None:  # fmt: skip
        payloads = [p for p in payloads if not (isinstance(p, M.NotifyPayload)
                                                and p.type == M.Notify.INITIAL_CONTACT)]
        super()._request(ike, kind, payloads, *args, **kw)  # type: ignore[arg-type]


def test_ike_sas_of_one_identity_are_bounded() -> None:
    """One authenticated identity (a certificate, a PSK) opened IKE SA after IKE SA, each
    with its CHILD SAs, bounded only by the 200 per source address (and a peer has many
    addresses). Past MAX_IKE_SAS_PER_IDENTITY for a connection its IKE_AUTH is refused; with
    INITIAL_CONTACT the new IKE SA replaces them all, as before."""
    gw = IkeEngine([conn()])
    for k in range(MAX_IKE_SAS_PER_IDENTITY + 6):
        connect(Wire(NoContactPeer([mn_conn()]), gw), float(k))
    assert len(gw.ike_sas()) == MAX_IKE_SAS_PER_IDENTITY
    assert gw.stats["identity-limit"] == 6
    other = Wire(NoContactPeer([mn_conn(local_id="mn2.test")]), gw)
    connect(other, 100.0)  # another identity is not refused
    assert other.of("r", IkeUp)
    w = pair(rc=None)
    w.resp = gw
    connect(w, 101.0)
    assert w.of("r", IkeUp) and len(gw.ike_sas()) == 2



def test_ike_sas_of_one_identity_are_bounded_when_initial_contact_replaces_nothing() -> None:
    """``unique = never``: INITIAL_CONTACT replaces nothing, so it must not lift the bound
    either (it did: an identity sending it on every IKE_AUTH opened IKE SA after IKE SA,
    each leasing a virtual IP, until the pool was exhausted)."""
    gw = IkeEngine([dataclasses.replace(conn(), unique="never")])
    for k in range(MAX_IKE_SAS_PER_IDENTITY + 6):
        connect(Wire(IkeEngine([mn_conn()]), gw), float(k))  # INITIAL_CONTACT every time
    assert len(gw.ike_sas()) == MAX_IKE_SAS_PER_IDENTITY
    assert gw.stats["identity-limit"] == 6 and gw.stats["initial-contact-replaced"] == 0

def test_incomplete_fragment_sets_from_one_source_are_bounded() -> None:
    """RFC 7383 from one address: many half-open IKE SAs, each left with an incomplete set
    of big fragments, and fragments announcing 65,535 of them. One set per IKE SA, the
    half-open ones 20 per address: what is held stays within 20 IKE messages (MAX_PACKET
    each); a total over MAX_FRAGMENTS is refused at its first fragment and holds nothing."""
    gw = IkeEngine([conn()])
    for k in range(30):
        ini = IkeEngine([mn_conn()])
        (s,) = ini.initiate(ini.connections[0], I500, R500, 0.0)
        assert isinstance(s, Send)
        answer = gw.receive(s.data, I500, R500, 0.0)
        if not answer:
            continue  # past the half-open limit of this address
        assert isinstance(answer[0], Send)
        ini.receive(answer[0].data, R500, I500, 0.0)  # its IKE_AUTH is never sent
        ike = ini.ike_sas()[0]
        hdr = M.Header(ike.spi_i, ike.spi_r, 0, M.ExchangeType.IKE_AUTH, M.Flag.INITIATOR, 1, 0)
        total = 65535 if k % 2 else MAX_FRAGMENTS
        for n in (1, 2):
            frag = ike.outbound.seal(hdr, [], inner_first=M.PayloadType.IDI if n == 1 else 0,
                                     plain=bytes(4000), prefix=struct.pack("!HH", n, total),
                                     payload_type=M.PayloadType.SKF)  # fmt: skip
            assert gw.receive(frag, I500, R500, 0.1) == []
    held = [sum(map(len, i.fragments[3].values())) for i in gw.half_open.values() if i.fragments]
    assert len(gw.half_open) == 20 and len(held) == 10
    assert sum(held) == 10 * 8000 <= 20 * MAX_PACKET and gw.stats["fragment-refused"] == 20


def _padded_init(ini: IkeEngine, size: int) -> bytes:
    """The initiator's IKE_SA_INIT request, a Vendor ID payload making it ``size`` octets."""
    (s,) = ini.initiate(ini.connections[0], I500, R500, 0.0)
    assert isinstance(s, Send)
    hdr, payloads = M.decode(s.data)
    pad = size - len(s.data) - 4  # (a payload's generic header)
    data = M.encode_plain(hdr, [*payloads, M.VendorPayload(bytes(pad))])
    assert len(data) == size
    return data


def test_an_ike_message_past_max_packet_is_dropped_before_anything_keeps_it() -> None:
    """An IKE_SA_INIT padded to 60 KiB (a Vendor ID: anyone may send one, and a half-open
    IKE SA keeps its request for IKE_AUTH's AUTH), from 50 addresses that answered the
    cookies, 20 each: 1000 half-open IKE SAs held 60 MB, and 180 MB with a 64 KiB fragment
    set each (a real gateway's RSS: 55 MB -> 237 MB; 57 MB without the padding). As
    strongSwan (charon.max_packet, 10,000 octets by default), a larger datagram is dropped
    unread (``too-long``) and a fragment set may not add up past it; ``[ike] max_packet``
    raises it."""
    for size, taken in ((MAX_PACKET, True), (MAX_PACKET + 1, False), (60000, False)):
        gw = IkeEngine([conn()])
        out = gw.receive(_padded_init(IkeEngine([mn_conn()]), size), I500, R500, 0.0)
        assert bool(out) is taken and len(gw.half_open) == taken
        assert gw.stats["too-long"] == (not taken) and gw.stats["ike-sa-init"] == taken
    gw = IkeEngine([conn()], max_packet=65535)  # an operator's choice
    assert gw.receive(_padded_init(IkeEngine([mn_conn()]), 60000), I500, R500, 0.0)
    assert len(gw.half_open) == 1
    # an established IKE SA's peer is held to it too, and the IKE SA carries on
    w = pair()
    connect(w)
    (ii,) = w.ini.ike_sas()
    (ir,) = w.resp.ike_sas()
    hdr = M.Header(ii.spi_i, ii.spi_r, 0, M.ExchangeType.INFORMATIONAL, M.Flag.INITIATOR,
                   ii.my_next_mid, 0)  # fmt: skip
    big = ii.outbound.seal(hdr, [M.NotifyPayload(M.Notify.COOKIE2, data=bytes(MAX_PACKET))])
    assert w.resp.receive(big, I500, R500, 1.0) == []
    assert w.resp.stats["too-long"] == 1 and ir.peer_next_mid == ii.my_next_mid
    w.deliver(w.ini.liveness(ii, 2.0), "i", 2.0)
    assert w.resp.stats["liveness-answered"] == 1 and ir.state is IkeState.ESTABLISHED


class RekeyRefusingPeer(IkeEngine):
    """A peer that refuses every rekey of its IKE SA by the gateway (TEMPORARY_FAILURE)."""

    def _rekey_ike(self, *args: object, **kw: object) -> list[M.Payload]:
        self.stats["refused-their-rekey"] += 1
        return [M.NotifyPayload(M.Notify.TEMPORARY_FAILURE)]

    def delete(self, ike: IkeSA, now: float, reason: str = "") -> list[Output]:
        return []  # nor does it close the IKE SA when the gateway's IDs run out


def _synced_near_the_end(w: Wire, whose: str) -> tuple[IkeSA, IkeSA]:
    """Connect, then the MN's RFC 6311 sync puts the gateway's message IDs (``whose``: the
    MN's requests, "peer", or the gateway's own, "ours") at MAX_SYNCED_MID, as far as a sync
    may."""
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    if whose == "peer":
        ii.my_next_mid = MAX_SYNCED_MID - MID_SYNC_LEAP
    else:
        ii.peer_next_mid = MAX_SYNCED_MID
    w.deliver(w.ini.start_mid_sync(ii, 1.0), "i", 1.0)
    assert w.resp.stats["mid-sync-answered"] == 1
    assert (ir.peer_next_mid if whose == "peer" else ir.my_next_mid) == MAX_SYNCED_MID
    return ii, ir


@pytest.mark.parametrize("whose", ["peer", "ours"])
def test_message_ids_running_out_rekey_the_ike_sa_or_close_it(whose: str) -> None:
    """RFC 6311 lets the peer put our message IDs at MAX_SYNCED_MID (65,536 before the end).
    From there the peer sent 65,536 liveness checks (its IDs), or answered 65,536 of ours (a
    dpd_delay of 1 s: 18 hours): the gateway answered request 0xFFFFFFFF and then expected
    2^32, which no 32-bit field holds (context.encode raised struct.error, and with it the
    replication of every IKE SA to the standby), or sent its request 0xFFFFFFFF and then
    raised struct.error at every tick(). §2.2: IDs that run out MUST close or rekey the IKE
    SA. The gateway rekeys it when either side's IDs reach MID_REKEY_AT; a peer that refuses
    the rekey every time has its IKE SA closed when the last ID is used."""
    cbc = "aes128-sha256-x25519"  # with AEAD and our own requests sent the MN would probe
    w = Wire(RekeyRefusingPeer([mn_conn(ike=cbc)]), IkeEngine([conn(ike=cbc)]))
    ii, ir = _synced_near_the_end(w, whose)
    t = 2.0
    near = False
    while ir.state is IkeState.ESTABLISHED and t < 200000.0:
        if whose == "peer":
            w.deliver(w.ini.liveness(ii, t), "i", t)
        else:
            w.deliver(w.resp.liveness(ir, t), "r", t)
        if int(t) % 8 == 0:
            w.deliver(w.resp.tick(t), "r", t)  # (raised struct.error, "ours")
        if ir.state is IkeState.ESTABLISHED and (near or int(t) % 4096 == 0):
            # what the standby's replica is made of (struct.error); once the last ID is
            # used it is refused as a context (a typed error the replication skips)
            try:
                context.encode(ir, t)
            except IkeContextError:
                assert max(ir.my_next_mid, ir.peer_next_mid) > MAX_MID
        if not near and w.ini.stats["refused-their-rekey"] >= 2 and (
            ii.pending is None and ir.pending is None
        ):
            # The 65,000 exchanges from here to 256 IDs before the end are alike (one ID
            # each, the rekey refused every 30 s): both sides' IDs move there at once, as
            # the exchanges would move them (12 s of the suite's time, one by one).
            if whose == "peer":
                ii.my_next_mid = ir.peer_next_mid = MAX_MID - 255
            else:
                ir.my_next_mid = ii.peer_next_mid = MAX_MID - 255
            near = True
        w.sent.clear()
        t += 1.0
    assert near
    assert w.resp.stats["ike-rekey-message-ids"] > 0 and w.ini.stats["refused-their-rekey"] > 0
    assert w.resp.stats["message-id-exhausted"] == 1 and ir not in w.resp.ike_sas()
    assert max(ir.my_next_mid, ir.peer_next_mid) == MAX_MID + 1
    assert [o.reason for o in w.of("r", ChildDown)] == [
        "deleted" if whose == "peer" else "message IDs exhausted"]
    w.deliver(w.resp.tick(t + 100.0), "r", t + 100.0)


@pytest.mark.parametrize("whose", ["peer", "ours"])
def test_message_ids_near_the_end_are_renewed_by_an_ike_rekey(whose: str) -> None:
    """The same with a peer that takes the rekey: the IKE SA is rekeyed once the IDs reach
    MID_REKEY_AT, the new one starts at 0 and keeps the CHILD SA."""
    cbc = "aes128-sha256-x25519"
    w = pair(mn_conn(ike=cbc), conn(ike=cbc))
    ii, ir = _synced_near_the_end(w, whose)
    (child,) = ir.children
    t = 2.0
    while ir.state is IkeState.ESTABLISHED:
        assert t < 1000.0
        if whose == "peer":
            w.deliver(w.ini.liveness(ii, t), "i", t)
        else:
            w.deliver(w.resp.liveness(ir, t), "r", t)
        w.deliver(w.resp.tick(t), "r", t)
        t += 1.0
    assert w.resp.stats["ike-rekey-message-ids"] == 1 and w.resp.stats["ike-sa-rekeyed"] == 1
    (new,) = w.resp.ike_sas()
    assert new is not ir and new.children == [child]
    assert max(new.my_next_mid, new.peer_next_mid) < 16
    assert MID_REKEY_AT <= max(ir.my_next_mid, ir.peer_next_mid) < MAX_MID


class KeepingPeer(IkeEngine):
    """A peer that rekeys CHILD SAs and never deletes the one it replaced."""

    def _request(self, ike: IkeSA, kind: str, *args: object, **kw: object) -> None:
        if kind != "delete-child":
            super()._request(ike, kind, *args, **kw)  # type: ignore[arg-type]


def test_a_child_sa_the_peer_rekeyed_and_kept_is_deleted() -> None:
    """The peer rekeys its CHILD SA and never deletes the old one (RFC 7296 §1.3.3 says it
    does): the gateway kept both for ever, and went on sending on the old one (the
    successor takes our traffic only once the peer deletes the old SA), so the keys never
    changed however often the peer rekeyed. After REKEYED_GRACE the gateway deletes it."""
    w = Wire(KeepingPeer([mn_conn()]), IkeEngine([conn()]))
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    (old,) = ir.children
    w.deliver(w.ini.rekey_child(ii, ii.children[0], 1.0), "i", 1.0)
    (new,) = [c for c in ir.children if c is not old]
    assert ir.children == [old, new] and old.rekeyed
    for t in (30.0, 60.0):
        w.deliver(w.resp.tick(t), "r", t)
    assert ir.children == [old, new]  # the peer's DELETE may still come
    due = w.resp.next_deadline()
    assert due is not None and due <= 61.0
    w.deliver(w.resp.tick(61.0), "r", 61.0)
    assert ir.children == [new] and w.resp.stats["rekeyed-child-deleted"] == 1
    assert [(d.child, d.reason) for d in w.of("r", ChildDown)
            if isinstance(d, ChildDown)] == [(old, "rekeyed")]  # fmt: skip
    assert w.resp.stats["delete-child-ok"] == 1 and ii.state is IkeState.ESTABLISHED
    w.deliver(w.resp.tick(1000.0), "r", 1000.0)
    assert ir.children == [new]


def test_a_full_spi_range_refuses_child_sas_instead_of_hanging() -> None:
    """Inbound CHILD SPIs come from the gateway's range (a cluster member's block). Once
    peers' CHILD SAs (up to 32 per IKE SA, 200 IKE SAs per address) had taken all of it, the
    next CHILD SA looped for ever looking for a free SPI: the whole gateway hung. Now the
    CHILD SA is refused (NO_ADDITIONAL_SAS; the IKE SA comes up without it), our own rekey
    waits, and a freed SPI is used again."""
    gw = IkeEngine([conn(child_rekey=100)], spi_range=(0x1000, 0x1003))
    wires = [Wire(IkeEngine([mn_conn(local_id=f"mn{k}.test")]), gw) for k in range(5)]
    for k, w in enumerate(wires):
        connect(w, float(k))  # (the fifth hung)
    assert len(gw.ike_sas()) == 5 and len(gw._child_spis) == 4
    assert [len(w.of("r", ChildUp)) for w in wires] == [1, 1, 1, 1, 0]
    assert gw.stats["spi-exhausted"] == 1 and wires[4].of("i", IkeUp)
    w0 = wires[0]
    (ir,) = [i for i in gw.ike_sas() if i.peer_id == "mn0.test"]
    (child,) = ir.children
    assert gw.rekey_child(ir, child, 10.0) == [] and gw.stats["spi-exhausted"] == 2
    w0.deliver(gw.tick(150.0), "r", 150.0)  # its rekey_time: no SPI for it, later again
    assert ir.children == [child] and child.rekey_at == 150.0 + 30.0
    (ii,) = w0.ini.ike_sas()
    w0.deliver(w0.ini.delete(ii, 151.0), "i", 151.0)  # one peer leaves: its SPI is free
    w = Wire(IkeEngine([mn_conn(local_id="mn5.test")]), gw)
    connect(w, 152.0)
    assert len(w.of("r", ChildUp)) == 1 and len(gw._child_spis) == 4


@pytest.mark.parametrize("when", ["ike-auth", "create-child-sa"])
def test_selectors_of_two_protocols_are_unacceptable_not_a_crash(when: str) -> None:
    """The peer asks for tcp on one side and udp on the other (TSi 10.2.0.5[udp/53], TSr
    10.1.0.0/16[tcp/80]): narrowing to what one policy holds (ts.representable) raised
    IndexError out of receive(), in IKE_AUTH (after IkeUp, the answer never sent) and in
    CREATE_CHILD_SA. No packet fits both sides: TS_UNACCEPTABLE, the IKE SA stays."""
    odd = {"local_ts": "10.2.0.5/32[udp/53]", "remote_ts": "10.1.0.0/16[tcp/80]"}
    w = Wire(IkeEngine([mn_conn(**odd if when == "ike-auth" else {})]), IkeEngine([conn()]))
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    assert ii.state is IkeState.ESTABLISHED and ir.state is IkeState.ESTABLISHED
    if when == "create-child-sa":
        assert len(ir.children) == 1
        child = dataclasses.replace(ii.children[0], local_ts=[from_text(odd["local_ts"])],
                                    remote_ts=[from_text(odd["remote_ts"])])  # fmt: skip
        out: list[Output] = []
        w.ini._rekey_child_request(ii, child, 1.0, out)
        w.deliver(out, "i", 1.0)
        assert w.ini.stats["rekey-failed"] == 1 and len(ir.children) == 1
    else:
        assert not ir.children and not w.of("r", ChildUp)
    assert w.resp.stats["ts-unacceptable"] == 1
    w.deliver(w.ini.liveness(ii, 2.0), "i", 2.0)
    assert w.resp.stats["liveness-answered"] == 1


def _bad_extension_chain() -> tuple[object, object, object]:
    """(leaf, intermediate, leaf key), made by anyone: the intermediate is named as the leaf's
    issuer, and both carry a BasicConstraints extension whose value is not DER (the X.509
    parser reads extensions only when asked: .extensions raises ValueError)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    now = dt.datetime.now(dt.UTC)
    bad = x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x01\x02\x03")

    def cert(cn: str, issuer: str, key: ec.EllipticCurvePrivateKey,
             ikey: ec.EllipticCurvePrivateKey) -> x509.Certificate:  # fmt: skip
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(bad, critical=False).sign(ikey, hashes.SHA256()))  # fmt: skip

    ik, lk = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    return cert("peer.test", "Sub CA", lk, ik), cert("Sub CA", "Sub CA", ik, ik), lk


@pytest.mark.parametrize("claim", ["fqdn", "dn"])
def test_a_certificate_with_unparsable_extensions_is_refused_not_a_crash(claim: str) -> None:
    """Anyone may send IKE_AUTH after IKE_SA_INIT. A chain of two certificates of its own
    making whose extensions are not DER: looking for a CA among the intermediates (is it a
    CA?), or for the wanted name among the certificate's subjectAltNames (IDi a DN), raised
    ValueError out of receive(). It is an authentication failure like any bad chain."""
    ca, _cert, _key, _ = cert_pki("p256")
    leaf, inter, key = _bad_extension_chain()
    mn = dataclasses.replace(mn_conn(), local_auth="pubkey", remote_auth="psk",
                             local_id=Identity("peer.test" if claim == "fqdn" else "CN=peer.test"),
                             credentials=Credentials((leaf, inter), key))  # type: ignore[arg-type]  # fmt: skip
    wanted = Identity("%any" if claim == "fqdn" else "peer.test")
    gw = dataclasses.replace(conn(), remote_auth="pubkey", remote_id=wanted,
                             cacerts=[ca])  # type: ignore[list-item]  # fmt: skip
    w = Wire(IkeEngine([mn], wall_offset=time.time()), IkeEngine([gw], wall_offset=time.time()))
    connect(w)
    assert w.resp.stats["auth-failed"] == 1 and not w.resp.ike_sas()
    assert w.of("i", ConnectFailed) and not w.of("r", IkeUp)


class CertMangler(IkeEngine):
    """An initiator whose IKE_AUTH carries its certificate with some octets replaced."""

    mangle: tuple[bytes, bytes] = (b"", b"")

    def _request(self, ike: IkeSA, kind: str, payloads: list[M.Payload], *args: object,
                 **kw: object) -> None:  # fmt: skip
        old, new = self.mangle
        payloads = [M.CertPayload(p.encoding, p.data.replace(old, new, 1))
                    if isinstance(p, M.CertPayload) else p for p in payloads]  # fmt: skip
        super()._request(ike, kind, payloads, *args, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("what", ["version", "subject"])
def test_a_certificate_that_loads_but_cannot_be_read_is_refused_not_a_crash(what: str) -> None:
    """A CERT payload whose version is 38 (x509.InvalidVersion, which is no ValueError: the
    payload's parse let it out of receive()), or whose subject's CN is a BIT STRING (the
    parser reads the subject only when asked: TypeError where remote.id is a DN). Refused as
    an authentication failure."""
    ca, cert, key, _ = cert_pki("p256")
    CertMangler.mangle = ((b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x26") if what == "version"
                          else (b"\x0c\x09peer.test", b"\x03\x09peer.test"))  # fmt: skip
    mn = dataclasses.replace(mn_conn(), local_auth="pubkey", remote_auth="psk",
                             local_id=Identity("CN=peer.test"),
                             credentials=Credentials((cert,), key))  # type: ignore[arg-type]  # fmt: skip
    gw = dataclasses.replace(conn(), remote_auth="pubkey", remote_id=Identity("CN=peer.test"),
                             cacerts=[ca])  # type: ignore[list-item]  # fmt: skip
    w = Wire(CertMangler([mn], wall_offset=time.time()), IkeEngine([gw], wall_offset=time.time()))
    connect(w)
    assert w.resp.stats["auth-failed"] == 1 and not w.resp.ike_sas()
    assert w.of("i", ConnectFailed) and not w.of("r", IkeUp)
    CertMangler.mangle = (b"", b"")  # the same certificate as it was: taken
    w = Wire(CertMangler([mn], wall_offset=time.time()), IkeEngine([gw], wall_offset=time.time()))
    connect(w)
    assert w.of("r", IkeUp)


def _cross(w: Wire, kinds: tuple[str, str], now: float) -> None:
    """Both sides start a rekey at once (``kinds``: the MN's and the gateway's, "child" or
    "ike"): each request reaches the other side before either answer does."""
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    oi = (w.ini.rekey_child(ii, ii.children[0], now) if kinds[0] == "child"
          else w.ini.rekey_ike(ii, now))  # fmt: skip
    orr = (w.resp.rekey_child(ir, ir.children[0], now) if kinds[1] == "child"
           else w.resp.rekey_ike(ir, now))  # fmt: skip
    ai = [x for s in orr if isinstance(s, Send) for x in w.ini.receive(s.data, R500, I500, now)]
    ar = [x for s in oi if isinstance(s, Send) for x in w.resp.receive(s.data, I500, R500, now)]
    w.deliver(ai, "i", now)
    w.deliver(ar, "r", now)


def test_rekey_collisions_repeated_leave_one_child_sa_on_both_sides() -> None:
    """The MN rekeys its CHILD SA while the gateway rekeys the IKE SA (or the other way
    round), round after round. The CHILD rekey's answer made the successor in the old IKE
    SA, whose CHILD SAs had just moved to the new one: the side that rekeyed the IKE SA held
    both CHILD SAs, the other one of them, and each round left one more SA pair that only
    one side had; once the old CHILD SA (which has a successor) was deleted, the MN had no
    CHILD SA left. An IKE rekey that crosses our CHILD rekey is refused (TEMPORARY_FAILURE,
    as strongSwan does) and tried again 30 s later; same-kind collisions as before."""
    w = pair()
    connect(w)
    t = 1.0
    for kinds in [("child", "ike"), ("ike", "child")] * 4 + [("child", "child"), ("ike", "ike")]:
        _cross(w, kinds, t)
        for dt in (1.0, 61.0, 62.0):  # the 30 s retry, and REKEYED_GRACE
            w.deliver(w.resp.tick(t + dt), "r", t + dt)
            w.deliver(w.ini.tick(t + dt), "i", t + dt)
        (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
        assert ii.state is ir.state is IkeState.ESTABLISHED and ii.spi_r == ir.spi_r, kinds
        assert [(c.spi_in, c.spi_out) for c in ii.children] == [
            (c.spi_out, c.spi_in) for c in ir.children], kinds
        assert len(ii.children) == 1 and len(w.resp._child_spis) == 1, kinds
        t += 100.0
    assert w.ini.stats["ike-rekey-refused-child-rekey"] + w.resp.stats[
        "ike-rekey-refused-child-rekey"] == 8


def _random_payloads(r: random.Random, children: list[int]) -> list[M.Payload]:
    """Well-encoded payloads of any meaning: SA (IKE, ESP, other; SPIs of every length; our
    transforms or random ones), KE (known groups, right or wrong lengths), nonces, up to 255
    traffic selectors, REKEY_SA and DELETE naming our SPIs or others, any notify, CP, ID."""
    def b(n: int) -> bytes:
        return bytes(r.getrandbits(8) for _ in range(n))

    ike_t = conn().proposals[0].transforms()
    esp_t = conn().children[0].esp_proposals[0].transforms()
    hosts = ["10.2.0.5", "10.1.0.0", "0.0.0.0", "10.1.255.255", "255.255.255.255"]

    def ts() -> M.TrafficSelector:
        a, z = (ipaddress.ip_address(r.choice(hosts)) for _ in range(2))
        a, z = (a, z) if int(a) <= int(z) else (z, a)
        return M.TrafficSelector(7, r.choice([0, 6, 17, 1]), r.choice([0, 80]),
                                 r.choice([80, 65535]), a, z)  # fmt: skip

    kinds = {r.choice(["sa", "ke", "nonce", "tsi", "tsr", "rekey", "delete", "notify", "cp"])
             for _ in range(r.randrange(6))}  # fmt: skip
    if r.random() < 0.6:
        kinds |= {"sa", "nonce", "tsi", "tsr"} | ({"ke"} if r.random() < 0.7 else set())
    out: list[M.Payload] = []
    for k in sorted(kinds):
        if k == "sa":
            props = []
            for i in range(r.randrange(1, 3)):
                proto = r.choice([1, 3, 3, 2])
                spi = b({1: 8, 3: 4}.get(proto, 4) if r.random() < 0.8 else r.randrange(12))
                tr = r.choice([ike_t, esp_t, (M.Transform(r.randrange(1, 6), r.randrange(40)),)])
                props.append(M.Proposal(i + 1, proto, spi, tr))
            out.append(M.SAPayload(tuple(props)))
        elif k == "ke":
            g = r.choice([31, 31, 19, 14, 1234])
            out.append(M.KEPayload(g, b({31: 32, 19: 64, 14: 256}.get(g, 7)
                                        if r.random() < 0.8 else r.randrange(300))))
        elif k == "nonce":
            out.append(M.NoncePayload(b(r.choice([0, 16, 32]))))
        elif k in ("tsi", "tsr"):
            n = r.choice([1, 1, 2, 255])
            out.append(M.TSPayload(k == "tsi", tuple(ts() for _ in range(n))))
        elif k == "rekey":
            rekey_spi = r.choice([*children, r.getrandbits(32)])
            out.append(M.NotifyPayload(M.Notify.REKEY_SA, r.choice([3, 1, 2]),
                                       rekey_spi.to_bytes(4, "big")))  # fmt: skip
        elif k == "delete":
            proto = r.choice([1, 3, 3, 2])
            spis = tuple(r.choice([s.to_bytes(4, "big") for s in children] + [b(4), b(8)])
                         for _ in range(r.randrange(3))) if proto != 1 else ()  # fmt: skip
            out.append(M.DeletePayload(proto, spis))
        elif k == "notify":
            out.append(M.NotifyPayload(int(r.choice(list(M.Notify))), r.choice([0, 1, 3]),
                                       b(r.choice([0, 4, 8])), b(r.choice([0, 2, 4, 8, 12, 20]))))
        else:
            out.append(M.CPPayload(1, ((1, b(r.choice([0, 4]))), (r.randrange(30), b""))))
    r.shuffle(out)
    return out


@pytest.mark.parametrize("seed", [*range(6), 20])  # 20: an SPI kept by a dead IKE SA
def test_authenticated_requests_of_any_shape_never_raise(seed: int) -> None:
    """An authenticated peer's requests of any shape (CREATE_CHILD_SA, INFORMATIONAL, even
    IKE_AUTH again), the gateway's timer run between them, hours apart or not: receive(),
    tick(), next_deadline() and the IKE SA's context never raise, and the gateway's SPI
    table is its CHILD SAs' (this found the tcp-against-udp selectors of
    test_selectors_of_two_protocols_are_unacceptable_not_a_crash)."""
    r = random.Random(seed)
    gwc = conn(dpd=r.choice([0, 5]), child_rekey=r.choice([None, 20]),
               rekey=r.choice([None, 30]), esp=r.choice(["aes128gcm16", "aes128gcm16-x25519"]))
    w = Wire(IkeEngine([mn_conn()]), IkeEngine([gwc]))
    connect(w)
    exchanges = [M.ExchangeType.CREATE_CHILD_SA] * 4 + [M.ExchangeType.INFORMATIONAL] * 2 + [
        M.ExchangeType.IKE_AUTH]
    now = 1.0
    for _ in range(150):
        now += r.choice([0.1, 1.0, 10.0, 61.0])
        live = [(i, w.resp.by_spi[i.spi_r]) for i in w.ini.ike_sas()
                if i.state is IkeState.ESTABLISHED and i.spi_r in w.resp.by_spi]  # fmt: skip
        if not live:
            break
        ii, ir = r.choice(live)
        ii.pending, ii.my_next_mid = None, ir.peer_next_mid
        out: list[Output] = []
        spis = [s for c in ir.children for s in (c.spi_in, c.spi_out)]
        w.ini._request(ii, "any", _random_payloads(r, spis), now, out, r.choice(exchanges))
        w.deliver(out, "i", now)
        w.deliver(w.resp.tick(now), "r", now)
        w.resp.next_deadline()
        for i in w.resp.ike_sas():
            if i.state is IkeState.ESTABLISHED:
                context.encode(i, now)
        asked = {int.from_bytes(i.pending.spi, "big") for i in w.resp.ike_sas()
                 if i.pending is not None and i.pending.kind == "rekey-child"}  # ours in flight
        assert w.resp._child_spis == asked | {
            c.spi_in for i in w.resp.ike_sas() for c in i.children}
    assert w.resp.stats["ike-sa-established"] == 1


def test_an_ike_sa_that_dies_during_our_child_rekey_frees_its_spi() -> None:
    """Our CHILD rekey takes an inbound SPI for the successor when it is sent; the IKE SA
    died (the peer stopped answering) or was deleted before the answer: the SPI stayed taken
    for good, one SPI of the range lost each time (found by the test above, seed 20)."""
    for end in ("peer-dead", "deleted"):
        w = pair()
        connect(w)
        (ir,) = w.resp.ike_sas()
        w.deliver(w.resp.rekey_child(ir, ir.children[0], 1.0), "r", 1.0, drop=True)
        assert len(w.resp._child_spis) == 2
        if end == "deleted":
            w.deliver(w.resp.delete(ir, 2.0), "r", 2.0, drop=True)
        for t in (3.0, 5.0, 9.0, 17.0, 33.0, 70.0):
            w.deliver(w.resp.tick(t), "r", t, drop=True)
        assert not w.resp.ike_sas() and w.resp._child_spis == set(), end


def test_message_ids_near_the_end_never_make_a_deadline_nothing_answers() -> None:
    """The IKE rekey for message IDs near the end was due at once by one rule in tick() (its
    regular rekey more than REKEY_RETRY from now) and by another in next_deadline() (more than
    REKEY_RETRY after the peer was last heard): an IKE SA last heard 100 s ago (as a take-over
    or handover imports one) whose regular rekey was 20 s away had a deadline in the past that
    tick() did nothing about, and the gateway's timer spun for those 20 s."""
    cbc = "aes128-sha256-x25519"
    w = pair(mn_conn(ike=cbc), conn(ike=cbc))
    ii, ir = _synced_near_the_end(w, "ours")
    ir.my_next_mid = ii.peer_next_mid = MID_REKEY_AT  # (after 65,280 requests of ours)
    now = 500.0
    ir.last_heard, ir.rekey_at = now - 100.0, now + 20.0
    out = w.resp.tick(now)
    due = w.resp.next_deadline()
    assert due is not None
    assert due > now or out, (due, now, out)  # a deadline passed is a deadline acted on


def _with_critical(data: bytes, ptype: int = 200) -> bytes:
    """``data`` (an IKE message in the clear) with a payload of type ``ptype``, which no
    one knows, its critical bit set, put first."""
    unknown = struct.pack("!BBH", data[16], 0x80, 8) + b"next"
    return (data[:16] + bytes((ptype,)) + data[17:24] + struct.pack("!I", len(data) + 8)
            + unknown + data[28:])  # fmt: skip


def test_a_request_with_an_unknown_critical_payload_is_answered_so_and_changes_nothing() -> None:
    """RFC 7296 §2.5: a request holding a payload we do not know with its critical bit set
    is rejected, and its response holds UNSUPPORTED_CRITICAL_PAYLOAD naming that payload's
    type. Inside an established IKE SA's Encrypted payload it was dropped unanswered: the
    peer retransmits, then gives the IKE SA up and all its CHILD SAs with it (a peer with an
    extension we lack lost its tunnels). Now it is answered (its retransmission again, from
    the answer kept), the IKE SA and its CHILD SA unchanged; an IKE_SA_INIT with one is
    answered in the clear and leaves no half-open IKE SA."""
    w = pair()
    connect(w)
    (ii,), (ir,) = w.ini.ike_sas(), w.resp.ike_sas()
    children = list(ir.children)
    mid = ii.my_next_mid
    hdr = M.Header(ii.spi_i, ii.spi_r, 0, M.ExchangeType.INFORMATIONAL, M.Flag.INITIATOR, mid, 0)
    plain = struct.pack("!BBH", M.PayloadType.DELETE, 0x80, 8) + b"next" + M.encode_payloads(
        [M.DeletePayload(M.ProtocolId.ESP, (children[0].spi_out.to_bytes(4, "big"),))])
    request = ii.outbound.seal(hdr, [], inner_first=201, plain=plain)
    for _ in range(2):  # (the second: a retransmission)
        (answer,) = w.resp.receive(request, I500, R500, 1.0)
        assert isinstance(answer, Send)
        ahdr, (sk,) = M.decode(answer.data)
        assert ahdr.is_response and ahdr.message_id == mid
        assert isinstance(sk, M.SKPayload)
        (n,) = M.decode_payloads(ii.inbound.open(answer.data, sk), sk.first)
        assert isinstance(n, M.NotifyPayload)
        assert (n.type, n.data) == (M.Notify.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((201,)))
    assert ir.peer_next_mid == mid + 1 and ir.state is IkeState.ESTABLISHED
    assert ir.children == children  # (the DELETE after it was not acted on)
    ini = IkeEngine([mn_conn()])
    (s,) = ini.initiate(ini.connections[0], I500, R500, 0.0)
    assert isinstance(s, Send)
    gw = IkeEngine([conn()])
    (answer,) = gw.receive(_with_critical(s.data), I500, R500, 0.0)
    assert isinstance(answer, Send)
    ahdr, payloads = M.decode(answer.data)
    assert ahdr.is_response and ahdr.spi_r == bytes(8)
    assert [(p.type, p.data) for p in payloads if isinstance(p, M.NotifyPayload)] == [
        (M.Notify.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((200,)))]
    assert not gw.half_open and not gw.by_spi
    # an IKE_AUTH with one: answered so, and the half-open IKE SA is not kept (§2.21.2)
    (answer,) = gw.receive(s.data, I500, R500, 0.0)
    assert isinstance(answer, Send) and len(gw.half_open) == 1
    ini.receive(answer.data, R500, I500, 0.0)
    (ike,) = ini.ike_sas()
    hdr = M.Header(ike.spi_i, ike.spi_r, 0, M.ExchangeType.IKE_AUTH, M.Flag.INITIATOR, 1, 0)
    plain = struct.pack("!BBH", 0, 0x80, 8) + b"next"
    (answer,) = gw.receive(ike.outbound.seal(hdr, [], inner_first=202, plain=plain), I500,
                           R500, 0.1)  # fmt: skip
    assert isinstance(answer, Send)
    _, (sk,) = M.decode(answer.data)
    assert isinstance(sk, M.SKPayload)
    (n,) = M.decode_payloads(ike.inbound.open(answer.data, sk), sk.first)
    assert isinstance(n, M.NotifyPayload) and n.type == M.Notify.UNSUPPORTED_CRITICAL_PAYLOAD
    assert not gw.half_open and not gw.by_spi and gw.stats["unsupported-critical"] == 2

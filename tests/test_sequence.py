"""Sequence-number reservations (ipsec/sequence.py): the ceiling every data path honours, the
low-water request, and a hypothesis property: whatever the crash points and however late the
storage answers, no sequence number is ever sent twice under one key."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.ipsec import ah, esp
from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.engine import Engine, ToPeer
from ipsecct.ipsec.ippacket import build_udp
from ipsecct.ipsec.sad import (
    MAX_SEQ_32,
    MAX_SEQ_64,
    Direction,
    Protocol,
    SAEvent,
    SecurityAssociation,
)
from ipsecct.ipsec.sequence import Reservations
from ipsecct.ipsec.spd import Action, AddressRange, Selectors, SPDEntry

ip = ipaddress.ip_address
KEY = bytes(range(20))


def outbound(**kw: object) -> SecurityAssociation:
    return SecurityAssociation(
        0x1234, Direction.OUTBOUND, ip("192.0.2.1"), ip("192.0.2.2"), enc_key=KEY, **kw  # type: ignore[arg-type]
    )


def sent_seq(res: bytes | bytearray | esp.Drop) -> int | None:
    if isinstance(res, esp.Drop):
        return None
    got = esp.spi_seq(res)
    assert got is not None
    return got[1]


def test_an_unreserved_sa_sends_as_before() -> None:
    sa = outbound()
    assert sa.seq_ceiling == MAX_SEQ_64
    assert [sent_seq(esp.encapsulate(sa, 4, b"x", 0.0)) for _ in range(3)] == [1, 2, 3]


def test_nothing_is_sent_before_the_first_block_is_durable() -> None:
    r = Reservations(block=10)
    sa = outbound()
    r.enrol(sa, durable_ceiling=0)
    assert esp.encapsulate(sa, 4, b"x", 0.0) is esp.Drop.SEQ_UNRESERVED
    assert sa.events == [SAEvent.SEQ_RESERVE] and sa.seq == 0
    assert not sa.rekey_requested  # waiting for storage is not exhaustion
    ceiling = r.request(sa)
    assert ceiling == 10
    r.granted(sa, ceiling)
    assert [sent_seq(esp.encapsulate(sa, 4, b"x", 0.0)) for _ in range(12)] == [
        *range(1, 11), None, None
    ]


def test_the_next_block_is_asked_for_at_the_low_water_mark_once() -> None:
    r = Reservations(block=10)
    sa = outbound()
    r.enrol(sa, 100)
    r.granted(sa, r.request(sa))
    assert (sa.seq, sa.seq_ceiling, sa.seq_low_water) == (100, 110, 105)
    for _ in range(4):
        esp.encapsulate(sa, 4, b"x", 0.0)
    assert sa.events == []
    esp.encapsulate(sa, 4, b"x", 0.0)  # 105
    assert sa.events == [SAEvent.SEQ_RESERVE]
    sa.events.clear()
    esp.encapsulate(sa, 4, b"x", 0.0)
    assert sa.events == []  # pending: asked once
    c = r.request(sa)
    assert c == 120
    r.granted(sa, c)
    assert (sa.seq_ceiling, sa.seq_low_water) == (120, 115)


def test_a_restart_resumes_after_the_stored_ceiling() -> None:
    r = Reservations(block=1000)
    sa = outbound(seq=5)  # the configuration's seq_out
    r.enrol(sa, durable_ceiling=4000)
    r.granted(sa, r.request(sa))
    assert sent_seq(esp.encapsulate(sa, 4, b"x", 0.0)) == 4001
    sa2 = outbound(seq=9000)  # a configured seq_out above the stored ceiling wins
    r.enrol(sa2, durable_ceiling=4000)
    assert sa2.seq == 9000


def test_the_last_block_stops_at_the_counters_limit() -> None:
    r = Reservations(block=10)
    sa = outbound(seq=MAX_SEQ_32 - 3)
    r.enrol(sa, 0)
    c = r.request(sa)
    assert c == MAX_SEQ_32
    r.granted(sa, c)
    assert sa.seq_low_water == MAX_SEQ_64
    out = [esp.encapsulate(sa, 4, b"x", 0.0) for _ in range(4)]
    assert out[-1] is esp.Drop.SEQ_EXHAUSTED and sa.rekey_requested


def test_ah_honours_the_ceiling() -> None:
    r = Reservations(block=4)
    sa = SecurityAssociation(
        0x999, Direction.OUTBOUND, ip("192.0.2.1"), ip("192.0.2.2"), protocol=Protocol.AH,
        enc=EncAlg.NULL, integ=IntegAlg.HMAC_SHA2_256_128, integ_key=bytes(32),
    )
    r.enrol(sa, 0)
    pkt = build_udp(ip("10.0.0.1"), ip("10.0.0.2"), 1, 2, b"hello")
    assert ah.protect(sa, pkt, 0.0) is esp.Drop.SEQ_UNRESERVED
    r.granted(sa, r.request(sa))
    assert not isinstance(ah.protect(sa, pkt, 0.0), esp.Drop)


def test_the_engine_counts_what_waits_for_a_reservation() -> None:
    eng = Engine(ip("192.0.2.1"))
    sa = outbound()
    sel = Selectors((AddressRange.parse("10.2.0.0/24"),), (AddressRange.parse("10.1.0.0/24"),))
    eng.add_tunnel(SPDEntry(sel, Action.PROTECT), sa, None)
    r = Reservations(block=2)
    r.enrol(sa, 0)
    pkt = build_udp(ip("10.2.0.1"), ip("10.1.0.1"), 1, 2, b"x")
    assert eng.outbound(pkt, 0.0) is esp.Drop.SEQ_UNRESERVED
    assert eng.stats.drops["seq_unreserved"] == 1
    assert [e.event for e in eng.drain_events()] == [SAEvent.SEQ_RESERVE]
    r.granted(sa, r.request(sa))
    assert isinstance(eng.outbound(pkt, 0.0), ToPeer)  # the flow cache's path
    assert isinstance(eng.outbound(pkt, 0.0), ToPeer)
    assert eng.outbound(pkt, 0.0) is esp.Drop.SEQ_UNRESERVED


def test_block_must_hold_two() -> None:
    with pytest.raises(ValueError):
        Reservations(block=1)


# -- the property: random crash points ---------------------------------------------------------
# One outbound SA, configured with seq_out = 0, run as a gateway runs it: sends packets, asks
# for blocks at the low-water mark, and the storage answers late (a write is queued and lands
# later, or is lost in a crash; a crash may also land a write whose answer never came back).
# Every run restarts from the durable ceiling. Nothing sent may repeat, and nothing sent may
# be above what was durable when it was sent.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 40)),
        st.tuples(st.just("write"), st.just(0)),
        st.tuples(st.just("crash"), st.booleans()),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(block=st.integers(2, 64), ops=ops)
def test_no_sequence_number_is_reused_across_crashes(
    block: int, ops: list[tuple[str, int]]
) -> None:
    r = Reservations(block)
    durable = 0
    sent: list[int] = []
    pending: list[int] = []

    def boot() -> SecurityAssociation:
        nonlocal durable
        sa = outbound()
        r.enrol(sa, durable)
        durable = max(durable, r.request(sa))  # written and synced before the node starts
        r.granted(sa, durable)
        return sa

    sa = boot()
    for op, arg in ops:
        if op == "send":
            for _ in range(arg):
                seq = sent_seq(esp.encapsulate(sa, 4, b"p", 0.0))
                if seq is not None:
                    assert seq <= durable
                    sent.append(seq)
                if SAEvent.SEQ_RESERVE in sa.events:
                    sa.events.clear()
                    pending.append(r.request(sa))
        elif op == "write" and pending:
            durable = max(durable, pending.pop(0))
            r.granted(sa, durable)
        elif op == "crash":
            if arg and pending:  # the write landed, its answer did not
                durable = max(durable, pending[0])
            pending.clear()
            sa = boot()
    assert len(sent) == len(set(sent))
    assert sent == sorted(sent)


def test_the_native_path_honours_the_durable_ceiling() -> None:
    """C sends only up to the SA's durable ceiling and hands the packet at the low-water mark
    to Python, which asks for the next block; granted late, nothing is sent above what was
    durable at the time."""
    import struct

    from ipsecct.ipsec import native
    from ipsecct.ipsec.esp import Drop
    from ipsecct.ipsec.sad import Lifetime
    from ipsecct.ipsec.spd import PortRange

    if not native.AVAILABLE:
        pytest.skip("the native extension is not built (IPSECCT_PURE_PYTHON or no compiler)")
    from tests.helpers.native import R_INNER, S_INNER, Side, _inner

    cfg = {
        "enc": EncAlg.AES_GCM_16, "key": bytes(20), "esn": False, "window": 64, "outer": 4,
        "ports": PortRange(), "soft": Lifetime(), "hard": Lifetime(),
    }
    side = Side(cfg, True)
    sa = side.up_out
    r = Reservations(block=16)
    r.enrol(sa, 0)
    durable = r.request(sa)
    r.granted(sa, durable)
    pkt = _inner(4, 17, 64, 7000, S_INNER[4], R_INNER[4])
    sent: list[int] = []
    pending: list[int] = []
    in_c = 0
    for i in range(400):
        got = side.s.native.seal_flow(pkt, 0.0)
        data: bytes | bytearray | None = None
        if got is not None:
            in_c += 1
            data = got[1]
        else:
            res = side.s.outbound(pkt, 0.0)
            if isinstance(res, ToPeer):
                data = res.data
            else:
                assert res is Drop.SEQ_UNRESERVED
        if data is not None:
            seq = struct.unpack_from("!L", data, 4)[0]
            assert seq <= durable
            sent.append(seq)
        for ev in side.s.drain_events():
            if ev.event is SAEvent.SEQ_RESERVE:
                pending.append(r.request(ev.sa))
        if i % 7 == 6 and pending:  # the write lands, late
            durable = max(durable, pending.pop(0))
            r.granted(sa, durable)
    assert sent == sorted(set(sent)) and len(sent) > 100
    assert in_c > len(sent) // 2  # most of them in C


@given(
    salt=st.binary(min_size=32, max_size=32),
    enc_key=st.sampled_from([bytes(range(20)), bytes(36), b"\x07" * 20]),
    integ=st.booleans(),
)
def test_fingerprint_is_the_documented_hmac(salt: bytes, enc_key: bytes, integ: bool) -> None:
    """The fingerprint names rows already on disk: the fast form (a keyed HMAC copied per SA)
    must stay exactly HMAC-SHA256(salt, each part length-prefixed), first 128 bits in hex."""
    import hmac

    from ipsecct.ipsec.sequence import fingerprint

    if integ:
        sa = SecurityAssociation(
            0x1234, Direction.OUTBOUND, ip("192.0.2.1"), ip("192.0.2.2"),
            enc=EncAlg.AES_CBC, enc_key=bytes(16), integ=IntegAlg.HMAC_SHA2_256_128,
            integ_key=enc_key[:16] + bytes(16),
        )  # fmt: skip
    else:
        sa = SecurityAssociation(
            0x1234, Direction.OUTBOUND, ip("192.0.2.1"), ip("192.0.2.2"), enc_key=enc_key
        )
    mac = hmac.new(salt, digestmod="sha256")
    for part in (b"ipsecct outbound SA keys", sa.enc_key, sa.integ_key):
        mac.update(len(part).to_bytes(2, "big") + part)
    assert fingerprint(salt, sa) == mac.hexdigest()[:32]
    assert fingerprint(salt, sa) == fingerprint(salt, sa)  # the cached keyed HMAC is not spent

"""CXTP message codec, stream framing, token and extension CDBs."""

from __future__ import annotations

import ipaddress
import itertools
import os
import struct
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.ct import cxtp
from ipsecct.ct.cxtp import (
    CTAA,
    CTAR,
    CTC,
    CTD,
    CTDR,
    DQ,
    PCTD,
    Answer,
    CTReq,
    Detail,
    MsgType,
    SaResult,
    Status,
    StatusEntry,
    StreamDecoder,
    TransferTag,
)
from ipsecct.errors import CxtpError, IpsecctError
from ipsecct.ipsec.ippacket import IPAddress

V4 = ipaddress.IPv4Address("192.0.2.10")
V4R = ipaddress.IPv4Address("198.51.100.1")
V6 = ipaddress.IPv6Address("2001:db8::10")
V6R = ipaddress.IPv6Address("2001:db8:1::1")


def cdb(fpt: int, payload: bytes) -> bytes:
    """A framed CDB built independently of the module under test."""
    total = 4 + len(payload)
    total += -total % 8
    return struct.pack("!HBB", fpt, total // 8, 0) + payload + bytes(total - 4 - len(payload))


SA1 = cdb(0x8001, b"sa-one-context")
SA2 = cdb(0x8001, os.urandom(100))
REQ = cdb(0x8001, b"")


def all_messages(prev: IPAddress, router: IPAddress) -> list[cxtp.Message]:
    tag = TransferTag(0x0123456789ABCDEF, 7, last=False).encode()
    return [
        CTAR(prev, router, 42, b"\x01\x02\x03\x04", (REQ,), ack_requested=True),
        CTAR(prev, router, 0, b"\x00" * 4),
        CTAA(prev),
        CTAA(prev, (StatusEntry(0x8001, Status.UNSUPPORTED_ALGORITHM),), (tag,)),
        CTD(prev, 15, (tag, SA1, SA2), ack_requested=True),
        CTD(prev, 0),
        PCTD(prev, 3, b"k" * 20, (tag, SA1)),
        PCTD(prev, 3, b"k", (), ack_requested=True),
        CTDR(prev, True),
        CTDR(
            prev,
            False,
            (StatusEntry(0x8001, Status.SPI_COLLISION), StatusEntry(1, 0)),
            (tag, SaResult(2, 50, 0x1000, 0x1000, prev).encode(), Detail("denied").encode()),
        ),
        CTC(prev),
        CTC(prev, (tag,)),
        CTReq(prev, 9, b"\xff" * 4, (REQ, REQ)),
        DQ(prev, Answer.QUERY, (tag,)),
        DQ(prev, Answer.NOT_TAKEN),
    ]


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_round_trip_every_type(family: str) -> None:
    prev, router = (V4, V4R) if family == "v4" else (V6, V6R)
    msgs = all_messages(prev, router)
    assert {cxtp.message_type(m) for m in msgs} == set(MsgType)
    for m in msgs:
        wire = cxtp.encode(m)
        assert cxtp.decode(wire) == m
        # Header fields by hand: version 1 in the top three bits, type, V bit, length.
        first, length = struct.unpack("!HH", wire[:4])
        assert first >> 13 == 1
        assert (first >> 8) & 0x1F == cxtp.message_type(m)
        assert bool(first & 0x80) == (family == "v4")
        assert length == len(wire)
        addr_len = 4 if family == "v4" else 16
        assert wire[4 : 4 + addr_len] == prev.packed


def test_ctar_layout_by_hand() -> None:
    m = CTAR(V4, V4R, 0x01020304, b"\xaa\xbb\xcc\xdd", (REQ,), ack_requested=True)
    wire = cxtp.encode(m)
    expect = (
        struct.pack("!BBH", (1 << 5) | 1, 0x80 | 0x40, 4 + 4 + 4 + 8 + 8)
        + V4.packed
        + V4R.packed
        + bytes.fromhex("01020304aabbccdd")
        + REQ
    )
    assert wire == expect


def test_pctd_key_is_padded_and_hidden() -> None:
    m = PCTD(V4, 5, b"secretkey", (SA1,))
    wire = cxtp.encode(m)
    # header, address, elapsed, alg=1, keylen=9, key, 3 octets of padding, CDB
    assert wire[8:16] == struct.pack("!IHH", 5, 1, 9)
    assert wire[16:25] == b"secretkey" and wire[25:28] == b"\0\0\0"
    assert wire[28:] == SA1
    assert "secretkey" not in repr(m) and "sa-one" not in repr(m)
    bad = bytearray(wire)
    bad[26] = 1
    with pytest.raises(CxtpError, match="padding"):
        cxtp.decode(bytes(bad))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda w: w[:3], "truncated CXTP header"),
        (lambda w: w[:-1], "truncated|short"),
        (lambda w: w + b"\0\0\0\0", "trailing"),
        (lambda w: bytes([(2 << 5) | (w[0] & 0x1F)]) + w[1:], "version"),
        (lambda w: bytes([(1 << 5) | 0]) + w[1:], "unknown CXTP message type"),
        (lambda w: bytes([(1 << 5) | 9]) + w[1:], "unknown CXTP message type"),
        (lambda w: w[:1] + bytes([w[1] | 0x01]) + w[2:], "reserved"),
        (lambda w: w[:2] + struct.pack("!H", len(w) + 8) + w[4:], "truncated"),
        (lambda w: w[:2] + struct.pack("!H", 4) + w[4:], "too short"),
    ],
)
def test_malformed_header(mutate: object, match: str) -> None:
    wire = cxtp.encode(CTD(V4, 1, (SA1,)))
    with pytest.raises(CxtpError, match=match):
        cxtp.decode(mutate(wire))  # type: ignore[operator]


def test_v_bit_must_match_address_size() -> None:
    wire = bytearray(cxtp.encode(CTC(V4)))
    wire[1] &= ~0x80  # claim IPv6: 4 octets of address cannot be a 16-octet one
    with pytest.raises(CxtpError):
        cxtp.decode(bytes(wire))
    with pytest.raises(CxtpError, match="address family"):
        cxtp.encode(CTAR(V4, V6R, 1, b"1234"))
    with pytest.raises(CxtpError, match="address family"):
        cxtp.encode(CTAR(V6, V4R, 1, b"1234"))


def test_a_bit_refused_where_undefined() -> None:
    wire = bytearray(cxtp.encode(CTC(V4)))
    wire[1] |= 0x40
    with pytest.raises(CxtpError, match="A/S bit"):
        cxtp.decode(bytes(wire))


def test_bad_cdb_framing() -> None:
    wire = cxtp.encode(CTD(V4, 1, (SA1,)))
    broken = bytearray(wire)
    broken[12 + 2] = 0  # CDB length 0
    with pytest.raises(CxtpError, match="length 0"):
        cxtp.decode(bytes(broken))
    broken[12 + 2] = 200  # CDB runs past the message
    with pytest.raises(CxtpError, match="past the end"):
        cxtp.decode(bytes(broken))
    with pytest.raises(CxtpError, match="one framed CDB"):
        cxtp.encode(CTD(V4, 1, (SA1[:-1],)))
    with pytest.raises(CxtpError, match="one framed CDB"):
        cxtp.encode(CTD(V4, 1, (SA1 + SA1,)))


def test_status_entries_strict() -> None:
    wire = bytearray(cxtp.encode(CTDR(V4, False, (StatusEntry(0x8001, 1),))))
    wire[-1] = 1  # reserved octet
    with pytest.raises(CxtpError, match="reserved"):
        cxtp.decode(bytes(wire))
    with pytest.raises(CxtpError, match="extension"):
        cxtp.encode(CTDR(V4, False, (StatusEntry(cxtp.FPT_TRANSFER, 1),)))
    with pytest.raises(CxtpError, match="extension CDBs"):
        cxtp.encode(CTC(V4, (SA1,)))
    odd = cxtp.encode(CTDR(V4, True))[:2] + struct.pack("!H", 10) + V4.packed + b"\0\0"
    with pytest.raises(CxtpError, match="whole number"):
        cxtp.decode(odd)


def test_message_too_long_refused() -> None:
    big = cdb(0x8001, bytes(2000))
    with pytest.raises(CxtpError, match="exceeds"):
        cxtp.encode(CTD(V4, 0, (big,) * 40))


# -- token ------------------------------------------------------------------------------------


def test_token_is_truncated_hmac_sha1() -> None:
    key = b"mn-and-par-shared-key"
    h = hmac.HMAC(key, hashes.SHA1())
    h.update(V6.packed + (77).to_bytes(4, "big") + REQ + SA1)
    expect = h.finalize()[:4]
    tok = cxtp.compute_token(key, V6, 77, (REQ, SA1))
    assert tok == expect
    m = CTAR(V6, V6R, 77, tok, (REQ, SA1))
    assert cxtp.verify_message_token(key, cxtp.decode(cxtp.encode(m)))  # type: ignore[arg-type]
    assert not cxtp.verify_message_token(b"other-key", m)
    assert not cxtp.verify_message_token(key, replace(m, seq=78))
    assert not cxtp.verify_message_token(key, replace(m, requested=(REQ,)))
    assert not cxtp.verify_message_token(key, replace(m, token=bytes(4)))
    req = CTReq(V6, 77, tok, (REQ, SA1))
    assert cxtp.verify_message_token(key, req)


# -- extension CDBs ---------------------------------------------------------------------------


def test_extension_cdbs_round_trip_and_layout() -> None:
    t = TransferTag(2**64 - 1, 2**32 - 1, last=True)
    raw = t.encode()
    assert len(raw) == 24 and raw[:4] == bytes.fromhex("80020300")
    assert TransferTag.decode(raw) == t
    for dst in (V4, V6):
        r = SaResult(Status.ACCEPTED_SPI_REASSIGNED, 50, 0x1000, 0xC0FFEE, dst)
        raw = r.encode()
        assert len(raw) == (24 if dst.version == 4 else 32)
        assert SaResult.decode(raw) == r
    d = Detail("SPI 0x1000 in use at sg2 — policy deny")
    assert Detail.decode(d.encode()) == d
    assert Detail.decode(Detail("").encode()) == Detail("")
    with pytest.raises(CxtpError):
        Detail("x\nforged log line").encode()
    with pytest.raises(CxtpError):
        Detail("é" * 101).encode()
    with pytest.raises(CxtpError):
        TransferTag(-1, 0).encode()
    with pytest.raises(CxtpError):
        SaResult(0, 17, 1, 1, V4).encode()


def test_extension_cdbs_refuse_garbage() -> None:
    raw = bytearray(TransferTag(1, 2).encode())
    raw[-1] = 1
    with pytest.raises(CxtpError):
        TransferTag.decode(bytes(raw))
    with pytest.raises(CxtpError, match="not a TRANSFER"):
        TransferTag.decode(SaResult(0, 50, 1, 1, V4).encode())
    raw = bytearray(Detail("abc").encode())
    raw[4] = 50  # text length past the CDB
    with pytest.raises(CxtpError):
        Detail.decode(bytes(raw))
    raw = bytearray(Detail("abc").encode())
    raw[5] = 0x07  # BEL: not printable
    with pytest.raises(CxtpError):
        Detail.decode(bytes(raw))


def test_transfer_tag_helper() -> None:
    tag = TransferTag(5, 0)
    assert cxtp.transfer_tag(CTD(V4, 0, (tag.encode(), SA1))) == tag
    assert cxtp.transfer_tag(CTDR(V4, True, (), (tag.encode(),))) == tag
    assert cxtp.transfer_tag(CTD(V4, 0, (SA1,))) is None
    assert cxtp.transfer_tag(CTAA(V4)) is None


@pytest.mark.parametrize("v", [V4, V6])
def test_is_success(v: IPAddress) -> None:
    assert cxtp.is_success(Status.SUCCESS)
    assert cxtp.is_success(Status.ACCEPTED_RENEGOTIATE)
    assert not cxtp.is_success(Status.SPI_COLLISION)
    assert not cxtp.is_success(200)


# -- bulk -------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [CTD(V6, 3), PCTD(V4, 3, b"k" * 20, ack_requested=True)])
def test_batch_thousands_of_cdbs(template: CTD | PCTD) -> None:
    cdbs = [cdb(0x8001, i.to_bytes(4, "big") + os.urandom(200)) for i in range(3000)]
    msgs = cxtp.batch_cdbs(template, cdbs, transfer_id=99, first_seq=10)
    assert len(msgs) > 1
    got: list[bytes] = []
    for i, m in enumerate(msgs):
        wire = cxtp.encode(m)
        assert len(wire) <= cxtp.MAX_MESSAGE_LEN
        back = cxtp.decode(wire)
        assert back == m
        tag = cxtp.transfer_tag(back)
        assert tag == TransferTag(99, 10 + i, last=i == len(msgs) - 1)
        got.extend(cxtp.message_cdbs(back)[1:])
    assert got == cdbs
    # Nearly full: fewer messages than a quarter-full packing would need.
    total = sum(map(len, cdbs))
    assert len(msgs) <= total // (cxtp.MAX_MESSAGE_LEN - 300) + 1


def test_batch_small_max_len_and_empty() -> None:
    msgs = cxtp.batch_cdbs(CTD(V4, 0), [SA1] * 5, 1, max_len=12 + 24 + 2 * len(SA1))
    assert [len(m.cdbs) for m in msgs] == [3, 3, 2]
    assert len(cxtp.batch_cdbs(CTD(V4, 0), [], 1)) == 1
    with pytest.raises(CxtpError, match="no room"):
        cxtp.batch_cdbs(CTD(V4, 0), [SA2], 1, max_len=60)


# -- stream framing ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_stream_decoder_any_chunking(cuts: list[int]) -> None:
    msgs = all_messages(V4, V4R) + all_messages(V6, V6R)
    stream = b"".join(cxtp.encode(m) for m in msgs)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    dec = StreamDecoder()
    out: list[cxtp.Message] = []
    for a, b in itertools.pairwise(points):
        out.extend(dec.feed(stream[a:b]))
    assert out == msgs
    assert dec.at_boundary() and dec.pending == 0


def test_stream_decoder_refuses_garbage_fast_and_stays_failed() -> None:
    dec = StreamDecoder()
    assert dec.feed(cxtp.encode(CTC(V4))) == [CTC(V4)]
    with pytest.raises(CxtpError, match="version"):
        dec.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(CxtpError, match="already failed"):
        dec.feed(cxtp.encode(CTC(V4)))


def test_stream_decoder_max_message() -> None:
    dec = StreamDecoder(max_message=64)
    big = cxtp.encode(CTD(V4, 0, (SA2,)))
    with pytest.raises(CxtpError, match="exceeds 64"):
        dec.feed(big[:4])  # refused from the header alone
    with pytest.raises(CxtpError):
        StreamDecoder(max_message=1 << 20)


def test_stream_decoder_partial_then_rest() -> None:
    wire = cxtp.encode(CTD(V6, 1, (SA1, SA2)))
    dec = StreamDecoder()
    assert dec.feed(wire[:-1]) == []
    assert not dec.at_boundary() and dec.pending == len(wire) - 1
    assert dec.feed(wire[-1:]) == [CTD(V6, 1, (SA1, SA2))]


# -- fuzz -------------------------------------------------------------------------------------

addresses = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
)
cdbs_st = st.lists(
    st.builds(cdb, st.integers(0, 0xFFFF), st.binary(max_size=60)), max_size=4
).map(tuple)
ext_st = st.lists(
    st.builds(cdb, st.integers(cxtp.EXT_FPT_MIN, cxtp.EXT_FPT_MAX), st.binary(max_size=30)),
    max_size=3,
).map(tuple)
statuses_st = st.lists(
    st.builds(StatusEntry, st.integers(0, cxtp.EXT_FPT_MIN - 1), st.integers(0, 255)),
    max_size=4,
).map(tuple)
u32 = st.integers(0, 2**32 - 1)
tok = st.binary(min_size=4, max_size=4)


@st.composite
def messages(draw: st.DrawFn) -> cxtp.Message:
    prev = draw(addresses)
    other = draw(addresses.filter(lambda a: a.version == prev.version))
    kind = draw(st.sampled_from(list(MsgType)))
    flag = draw(st.booleans())
    if kind is MsgType.CTAR:
        return CTAR(prev, other, draw(u32), draw(tok), draw(cdbs_st), flag)
    if kind is MsgType.CTAA:
        return CTAA(prev, draw(statuses_st), draw(ext_st))
    if kind is MsgType.CTD:
        return CTD(prev, draw(u32), draw(cdbs_st), flag)
    if kind is MsgType.PCTD:
        return PCTD(prev, draw(u32), draw(st.binary(min_size=1, max_size=64)), draw(cdbs_st), flag)
    if kind is MsgType.CTDR:
        return CTDR(prev, flag, draw(statuses_st), draw(ext_st))
    if kind is MsgType.CTC:
        return CTC(prev, draw(ext_st))
    if kind is MsgType.DQ:
        return DQ(prev, draw(st.sampled_from(list(Answer))), draw(ext_st))
    return CTReq(prev, draw(u32), draw(tok), draw(cdbs_st))


def _decode_checked(data: bytes) -> None:
    try:
        msg = cxtp.decode(data)
    except CxtpError:
        return
    except Exception as exc:  # pragma: no cover - the failure this test looks for
        raise AssertionError(f"decode raised {type(exc).__name__}: {exc}") from exc
    assert cxtp.encode(msg) == data


@settings(max_examples=200, deadline=None)
@given(messages())
def test_fuzz_generated_messages_round_trip(msg: cxtp.Message) -> None:
    wire = cxtp.encode(msg)
    assert cxtp.decode(wire) == msg
    assert StreamDecoder().feed(wire) == [msg]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_checked(data)
    # With a plausible header in front, the body parsers get exercised too.
    for t in MsgType:
        for vbits in (0x80, 0x00):
            body = struct.pack("!BBH", (1 << 5) | t, vbits, 4 + len(data)) + data
            _decode_checked(body)


@settings(max_examples=200, deadline=None)
@given(
    messages(),
    st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-8, 8),
)
def test_fuzz_mutated_messages(
    msg: cxtp.Message, flips: list[tuple[int, int]], resize: int
) -> None:
    wire = bytearray(cxtp.encode(msg))
    for pos, val in flips:
        wire[pos % len(wire)] = val
    if resize > 0:
        wire += bytes(resize)
    elif resize < 0:
        del wire[resize:]
    _decode_checked(bytes(wire))
    dec = StreamDecoder()
    try:
        for m in dec.feed(bytes(wire)):
            assert cxtp.message_type(m) in MsgType
    except CxtpError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([TransferTag, SaResult, Detail]))
def test_fuzz_extension_decoders(
    payload: bytes, cls: type[TransferTag] | type[SaResult] | type[Detail]
) -> None:
    fpt = {TransferTag: 0x8002, SaResult: 0x8003, Detail: 0x8004}[cls]
    raw = cdb(fpt, payload)
    try:
        obj = cls.decode(raw)
    except CxtpError:
        return
    assert obj.encode() == raw


def test_decision_query_layout_and_strictness() -> None:
    """The decision query (type 8): ``Answer(8) | Reserved(24) | extension CDBs``; an
    unknown answer, non-zero reserved octets, a non-extension CDB and the A bit are refused."""
    tag = TransferTag(0x0123456789ABCDEF, 3).encode()
    wire = cxtp.encode(DQ(V4, Answer.TAKEN, (tag,)))
    assert wire == struct.pack("!BBH", (1 << 5) | 8, 0x80, 4 + 4 + 4 + 24) + V4.packed + bytes(
        [1, 0, 0, 0]
    ) + tag
    assert cxtp.transfer_tag(cxtp.decode(wire)) == TransferTag(0x0123456789ABCDEF, 3)
    bad = {
        "unknown decision query answer": wire[:8] + b"\x03" + wire[9:],
        "reserved octets": wire[:9] + b"\x01" + wire[10:],
        "A/S bit": wire[:1] + b"\xc0" + wire[2:],
    }
    for why, data in bad.items():
        with pytest.raises(CxtpError, match=why):
            cxtp.decode(data)
    body = bytes([2, 0, 0, 0]) + SA1  # an IPsec SA context is not an extension CDB
    data = struct.pack("!BBH", (1 << 5) | 8, 0x80, 8 + len(body)) + V4.packed + body
    with pytest.raises(CxtpError, match="non-extension"):
        cxtp.decode(data)
    with pytest.raises(CxtpError, match="answer out of range"):
        cxtp.encode(DQ(V4, 7))
    with pytest.raises(CxtpError, match="too short"):
        cxtp.decode(struct.pack("!BBH", (1 << 5) | 8, 0x80, 8) + V4.packed)


@settings(max_examples=300, deadline=None)
@given(
    answer=st.integers(0, 255),
    rsvd=st.binary(min_size=3, max_size=3),
    tail=st.binary(max_size=80),
    v4=st.booleans(),
)
def test_fuzz_decision_query(answer: int, rsvd: bytes, tail: bytes, v4: bool) -> None:
    """Any body after a decision query's header decodes only to what re-encodes to the same
    octets (or raises CxtpError): never another exception, never a lenient parse."""
    prev = V4 if v4 else V6
    body = bytes([answer]) + rsvd + tail
    data = struct.pack("!BBH", (1 << 5) | 8, 0x80 if v4 else 0, 4 + len(prev.packed) + len(body))
    data += prev.packed + body
    try:
        msg = cxtp.decode(data)
    except CxtpError:
        return
    assert isinstance(msg, DQ) and msg.answer in set(Answer) and rsvd == bytes(3)
    assert all(cxtp.EXT_FPT_MIN <= cxtp.cdb_fpt(c) <= cxtp.EXT_FPT_MAX for c in msg.ext)
    assert cxtp.encode(msg) == data


def test_cxtp_error_is_ipsecct_error() -> None:
    assert issubclass(CxtpError, IpsecctError)

"""The IPsec feature context as a CXTP Context Data Block: round trips, strictness, fuzzing."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.ct import context
from ipsecct.ct.context import FPT_IPSEC_SA, Bit
from ipsecct.errors import ContextError
from ipsecct.ipsec import processing
from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import build_udp
from ipsecct.ipsec.sad import (
    Counters,
    Direction,
    Lifetime,
    Protocol,
    SecurityAssociation,
    UdpEncap,
)
from ipsecct.ipsec.spd import Selectors
from tests.helpers.contexts import (
    BASE,
    CONTRADICTIONS,
    MALFORMED,
    MUTATIONS,
    NOW,
    SECRET,
    A,
    cdb_with,
    esp_outbound,
    full_inbound,
    make_sa,
    patch,
    reencode,
    same,
    sample_sas,
    security_associations,
)
from tests.helpers.data_path import native_only

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "contexts").glob("*.json"))

# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(sample_sas())))
def test_round_trip(index: int) -> None:
    sa = sample_sas()[index]
    cdb = context.encode(sa, NOW)
    assert len(cdb) % 8 == 0 and cdb[2] * 8 == len(cdb)
    assert struct.unpack("!H", cdb[:2])[0] == FPT_IPSEC_SA
    back = context.decode(cdb, NOW)
    same(sa, back)
    assert context.encode(back, NOW) == cdb
    # JSON form: same SA, same bytes.
    obj = json.loads(json.dumps(context.to_json(sa, NOW)))
    assert context.encode(context.from_json(obj, NOW), NOW) == cdb


def test_times_travel_as_durations() -> None:
    sa = make_sa(created=NOW - 12.5, pmtu_expires=NOW + 30, hard=Lifetime(seconds=60))
    back = context.decode(context.encode(sa, NOW), 5000.0)
    assert back.created == pytest.approx(5000.0 - 12.5)
    assert back.pmtu_expires == pytest.approx(5030.0)
    assert not back.expired(5000.0 + 47)
    assert back.expired(5000.0 + 47.5)


def test_inbound_window_moves_exactly() -> None:
    sa = full_inbound()
    back = context.decode(context.encode(sa, NOW), NOW)
    for seq in (1, 2, 3, 5, (1 << 32) + 10, (1 << 32) + 12):
        assert not back.window.check(seq)  # accepted at the source: a replay at the target
    for seq in ((1 << 32) + 11, (1 << 32) + 13, (1 << 32) - 100):
        assert back.window.check(seq) == sa.window.check(seq)
    assert back.window.check((1 << 32) + 11)


def test_outbound_sequence_continues() -> None:
    sa = make_sa(seq=41)
    back = context.decode(context.encode(sa, NOW), NOW)
    assert back.next_seq() == 42


def test_transferred_sas_carry_traffic() -> None:
    """Source's outbound encrypts; the target's decoded inbound SA decrypts and drops replays."""
    out = make_sa(enc_key=bytes(range(20)))
    inn = make_sa(direction=Direction.INBOUND, enc_key=bytes(range(20)))
    pkt = build_udp(A("10.0.0.1"), A("10.0.1.1"), 1000, 2000, b"payload")
    wires = [processing.tunnel_encapsulate(out, pkt, NOW) for _ in range(3)]
    for w in wires[:2]:
        assert processing.tunnel_decapsulate(inn, w, NOW) == pkt  # type: ignore[arg-type]
    out2 = context.decode(context.encode(out, NOW), NOW + 1)
    inn2 = context.decode(context.encode(inn, NOW), NOW + 1)
    assert isinstance(processing.tunnel_decapsulate(inn2, wires[0], NOW + 1), Drop)  # type: ignore[arg-type]
    assert processing.tunnel_decapsulate(inn2, wires[2], NOW + 1) == pkt  # type: ignore[arg-type]
    w4 = processing.tunnel_encapsulate(out2, pkt, NOW + 1)
    assert processing.tunnel_decapsulate(inn2, w4, NOW + 1) == pkt  # type: ignore[arg-type]


@pytest.mark.parametrize(("enc", "key"), [(EncAlg.AES_CTR, bytes(range(36))),
                                          (EncAlg.NULL, b"")])  # fmt: skip
@pytest.mark.parametrize("reader", ["python", pytest.param("c", marks=native_only)])
def test_aes_ctr_and_null_sas_move_and_go_on_past_every_number_sent(
    enc: EncAlg, key: bytes, reader: str
) -> None:
    """An AES-CTR (RFC 3686) and a NULL (RFC 2410) SA with HMAC-SHA-256-128 move in a CDB,
    read by the Python reader and by the C one, with their transform, keys and sequence
    number: the target opens what the source sent, drops the replays, and its own first
    packet carries the next number, its AES-CTR IV (the sequence number: no keystream used
    twice across the move). Both were refused by ikev2's proposals, so never made here."""
    if reader == "c" and not context.NATIVE_READER:
        pytest.fail("the C context reader (ct/_cdb) is not built")
    read = context._read_native if reader == "c" else context._read_python
    kw: dict[str, Any] = dict(enc=enc, enc_key=key, integ=IntegAlg.HMAC_SHA2_256_128,
                              integ_key=bytes(range(32)))  # fmt: skip
    out = make_sa(**kw)
    inn = make_sa(direction=Direction.INBOUND, **kw)
    pkt = build_udp(A("10.0.0.1"), A("10.0.1.1"), 1000, 2000, b"payload")
    wires = [processing.tunnel_encapsulate(out, pkt, NOW) for _ in range(3)]
    assert processing.tunnel_decapsulate(inn, wires[0], NOW) == pkt  # type: ignore[arg-type]
    out2 = read(context.encode(out, NOW), NOW + 1)
    inn2 = read(context.encode(inn, NOW), NOW + 1)
    assert out2 is not None and inn2 is not None
    assert (out2.enc, out2.enc_key, out2.integ_key) == (enc, key, bytes(range(32)))
    assert type(out2.transform) is type(out.transform) and out2.seq == 3
    assert isinstance(processing.tunnel_decapsulate(inn2, wires[0], NOW + 1), Drop)  # type: ignore[arg-type]
    assert processing.tunnel_decapsulate(inn2, wires[2], NOW + 1) == pkt  # type: ignore[arg-type]
    w4 = processing.tunnel_encapsulate(out2, pkt, NOW + 1)
    assert isinstance(w4, bytearray) and struct.unpack_from("!L", w4, 4)[0] == 4
    if enc is EncAlg.AES_CTR:
        ivs = [bytes(w[8:16]) for w in (*wires, w4) if isinstance(w, bytearray)]
        assert ivs == [struct.pack("!Q", n) for n in (1, 2, 3, 4)]
    assert processing.tunnel_decapsulate(inn2, w4, NOW + 1) == pkt
    assert out2.seq_iv is (enc is EncAlg.AES_CTR)


def test_fields_that_do_not_apply_are_omitted() -> None:
    pv = struct.unpack("!I", context.encode(make_sa(), NOW)[4:8])[0]
    assert pv == context._mask(Bit.ESP_ENC) | context._mask(Bit.AGE)
    ah = make_sa(
        protocol=Protocol.AH, enc=EncAlg.NULL, enc_key=b"", integ=IntegAlg.HMAC_SHA2_256_128,
        integ_key=bytes(32), created=NOW,
    )  # fmt: skip
    pv = struct.unpack("!I", context.encode(ah, NOW)[4:8])[0]
    assert pv == context._mask(Bit.AH_INTEG)
    # Minimal ESP GCM-128 IPv4 SA: header, PV, fixed part (16) and the transform (23) -> 48.
    assert len(context.encode(make_sa(created=NOW), NOW)) == 48


# -- size limits ---------------------------------------------------------------------------------
def biggest(window: int, ranges: int) -> SecurityAssociation:
    v6 = [f"2001:db8:{i:x}::1-2001:db8:{i:x}::ff" for i in range(ranges)]
    sa = make_sa(
        direction=Direction.INBOUND,
        src=A("2001:db8::1"),
        dst=A("2001:db8::2"),
        enc=EncAlg.AES_CBC,
        enc_key=bytes(32),
        integ=IntegAlg.HMAC_SHA2_512_256,
        integ_key=bytes(64),
        esn=True,
        replay_window=window,
        created=NOW - 1,
        soft=Lifetime(1, 1, 1),
        hard=Lifetime(2, 2, 2),
        counters=Counters(1, 1),
        path_mtu=1280,
        pmtu_expires=NOW + 1,
        encap=UdpEncap(),
        selectors=Selectors.between(v6[:1], v6[1:] or v6, 6, "1-2", "3-4", "n" * 255, b"l" * 255),
        name="s" * 255,
    )
    sa.window.check_and_update(MAX_TOP := (1 << 64) - 1)
    assert sa.window.top == MAX_TOP
    return sa


def test_maximum_size_case_fits_with_4096_window() -> None:
    # Every optional field present at its largest (IPv6, AES-CBC-256 + HMAC-SHA-512, ESN top
    # 2^64-1, 255-octet names and label) and a 4096-packet window (512-octet bitmap): up to 15
    # IPv6 selector ranges fit in the 2040 octets; the numbers are in docs/context-format.md.
    cdb = context.encode(biggest(4096, 15), NOW)
    assert len(cdb) == 2040
    back = context.decode(cdb, NOW)
    assert back.window.snapshot() == biggest(4096, 15).window.snapshot()
    assert context.encode(back, NOW) == cdb
    with pytest.raises(ContextError, match="more than one CDB holds"):
        context.encode(biggest(4096, 16), NOW)
    # The largest window beside everything else at its largest and two ranges: 7552.
    assert len(context.encode(biggest(7552, 2), NOW)) == 2040
    with pytest.raises(ContextError, match="needs 2048 octets"):
        context.encode(biggest(7552 + 32, 2), NOW)
    # The largest window in a minimal context (IPv4, AES-GCM-128, nothing else): 15840.
    small = make_sa(direction=Direction.INBOUND, replay_window=15840, created=NOW)
    small.window.check_and_update(1)
    assert len(context.encode(small, NOW)) == 2040
    small = make_sa(direction=Direction.INBOUND, replay_window=15872, created=NOW)
    small.window.check_and_update(1)
    with pytest.raises(ContextError, match="more than one CDB holds"):
        context.encode(small, NOW)


# -- malformed input -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_raises_context_error(name: str) -> None:
    data, match = MALFORMED[name]
    with pytest.raises(ContextError, match=match) as info:
        context.decode(data, NOW)
    assert SECRET.hex() not in str(info.value) and SECRET.hex()[:8] not in str(info.value)


@pytest.mark.parametrize("case", CONTRADICTIONS, ids=[c[0] for c in CONTRADICTIONS])
def test_contradictions_raise_context_error(
    case: tuple[str, SecurityAssociation, Bit, bytes, str],
) -> None:
    _, sa, bit, data, match = case
    bad = cdb_with(sa, bit, data)
    with pytest.raises(ContextError, match=match):
        context.decode(bad, NOW)


def test_esp_integ_none_and_missing_transforms() -> None:
    sa = esp_outbound()
    bad = cdb_with(sa, Bit.ESP_INTEG, b"\x00\x00\x00")
    with pytest.raises(ContextError, match="must be omitted"):
        context.decode(bad, NOW)
    # An AEAD SA with an integrity transform: the SA refuses the combination.
    bad = cdb_with(sa, Bit.ESP_INTEG, b"\x00\x0c\x20" + bytes(32))
    with pytest.raises(ContextError, match="AEAD"):
        context.decode(bad, NOW)
    # ESP without its encryption transform: clear bit 0 and drop the field.
    good = context.encode(make_sa(created=NOW, seq=1), NOW)
    no_enc = reencode(
        good, struct.pack("!I", context._mask(Bit.SEQ)) + good[8:24] + struct.pack("!Q", 1)
    )
    with pytest.raises(ContextError, match="ESP SA needs its encryption"):
        context.decode(no_enc, NOW)
    # AH with an ESP encryption transform.
    ah = make_sa(
        protocol=Protocol.AH, enc=EncAlg.NULL, enc_key=b"", integ=IntegAlg.HMAC_SHA2_256_128,
        integ_key=bytes(32), created=NOW,
    )  # fmt: skip
    bad = cdb_with(ah, Bit.ESP_ENC, b"\x00\x0b\x00")
    with pytest.raises(ContextError, match="AH SA carries no ESP"):
        context.decode(bad, NOW)


def test_unknown_integrity_and_key_mismatch_never_leak_keys() -> None:
    sa = make_sa(
        enc=EncAlg.AES_CBC, enc_key=SECRET[:16], integ=IntegAlg.HMAC_SHA2_256_128,
        integ_key=SECRET + SECRET[:12], created=NOW,
    )  # fmt: skip
    good = context.encode(sa, NOW)
    i = good.find(b"\x00\x0c\x20")  # the integrity field: transform 12, key length 32
    assert i > 0
    for bad, match in (
        (patch(i, b"\x00\x63", good), "unknown integrity transform 99"),
        (patch(i, b"\x00\x0e", good), "takes a key of 64 octets, not 32"),
        (
            reencode(good, good[4:i] + b"\x00\x0c\x1f" + sa.integ_key[:31]),
            "takes a key of 32 octets, not 31",
        ),
    ):
        with pytest.raises(ContextError, match=match) as info:
            context.decode(bad, NOW)
        for k in (SECRET.hex(), sa.integ_key.hex(), sa.enc_key.hex()):
            assert k[:8] not in str(info.value).lower()


def test_ipv6_flag_mismatch_is_truncation_or_noncanonical() -> None:
    # Claiming IPv6 for IPv4 addresses shifts every field: decoding must fail cleanly.
    with pytest.raises(ContextError):
        context.decode(patch(10, bytes([BASE[10] | 0x40])), NOW)


# -- many CDBs ------------------------------------------------------------------------------------
def test_split_and_decode_many() -> None:
    sas = sample_sas()[:5]
    blob = b"".join(context.encode(sa, NOW) for sa in sas)
    parts = context.split_cdbs(blob)
    assert [fpt for fpt, _ in parts] == [FPT_IPSEC_SA] * 5
    assert b"".join(cdb for _, cdb in parts) == blob
    for a, b in zip(sas, context.decode_many(blob, NOW), strict=True):
        same(a, b)
    assert context.decode_many(b"", NOW) == []
    other = struct.pack("!HBB", 0x0001, 1, 0) + bytes(4)  # an IPv6 multicast listener CDB
    assert context.split_cdbs(blob + other)[-1] == (1, other)
    with pytest.raises(ContextError, match="unknown FPT"):
        context.decode_many(blob + other, NOW)
    with pytest.raises(ContextError, match="truncated"):
        context.split_cdbs(blob[:-1])
    with pytest.raises(ContextError, match="bad CDB length"):
        context.split_cdbs(blob + b"\x80\x01\x00\x80")


# -- the JSON form ------------------------------------------------------------------------
def test_examples_encode_and_decode() -> None:
    assert len(EXAMPLES) >= 3
    seen = set()
    for path in EXAMPLES:
        obj = json.loads(path.read_text())
        sa = context.from_json(obj, NOW)
        cdb = context.encode(sa, NOW)
        assert context.to_json(context.decode(cdb, 0.0), 0.0) == obj
        seen.add((sa.protocol, sa.enc, sa.integ, sa.esn, sa.replay_window))
        if sa.direction is Direction.INBOUND and sa.replay_window == 1024:
            top, bitmap = sa.window.snapshot()
            assert top > 1 << 32 and 0 < bin(int.from_bytes(bitmap, "little")).count("1") < 1024
    assert (Protocol.ESP, EncAlg.AES_GCM_16, IntegAlg.NONE, True, 1024) in seen
    assert any(s[1] is EncAlg.AES_CBC and s[2] is IntegAlg.HMAC_SHA2_256_128 for s in seen)
    assert any(s[0] is Protocol.AH for s in seen)


def example(name: str) -> dict[str, Any]:
    path = next(p for p in EXAMPLES if name in p.name)
    obj: dict[str, Any] = json.loads(path.read_text())
    return obj


JSON_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("not an object", {"__replace__": [1, 2]}, "must be a JSON object"),
    ("unknown field", {"colour": "red"}, "unknown field 'colour'"),
    ("missing spi", {"spi": None}, "missing field 'spi'"),
    ("bad spi", {"spi": "0xZZ"}, "'spi'"),
    ("reserved spi", {"spi": 255}, "'spi'"),
    ("bool as int", {"replay_window": True}, "'replay_window': must be an integer"),
    ("unknown enc", {"enc": "des"}, "'enc': must be one of"),
    ("unknown integ", {"integ": "md5"}, "'integ': must be one of"),
    ("key not hex", {"enc_key": "xyz"}, "'enc_key': must be a string of hex digits"),
    ("key wrong length", {"enc_key": SECRET.hex()[:30]}, "takes a key of"),
    ("family mix", {"dst": "2001:db8::1"}, "mix IPv4 and IPv6"),
    ("scope id", {"src": "fe80::1%eth0", "dst": "fe80::2"}, "scope"),
    ("bad address", {"src": "192.0.2.300"}, "'src': is not an IPv4 or IPv6 address"),
    ("seq on inbound", {"direction": "in", "seq": 5}, "'seq': does not apply"),
    ("replay on outbound", {"direction": "out", "replay": {"top": 1, "bitmap": ""}},
     "'replay': does not apply"),
    ("bitmap length", {"replay": {"top": 5, "bitmap": "01"}}, "'replay.bitmap': must be 128"),
    ("negative age", {"age": -1}, "'age': must be a finite, non-negative"),
    ("age too long", {"age": 1e300}, "'age': must be at most"),
    ("bad mtu", {"path_mtu": 20}, "'path_mtu': must be 68-65535"),
    ("bad ports", {"selectors": {"local": ["10.0.0.1"], "remote": ["10.0.0.2"],
                                 "local_ports": "9-1"}}, "'selectors.local_ports'"),
    ("bad range", {"selectors": {"local": ["10.0.0.9-10.0.0.1"], "remote": ["10.0.0.2"]}},
     "'selectors.local'"),
    ("empty ranges", {"selectors": {"local": [], "remote": ["10.0.0.2"]}},
     "'selectors.local': must be a list"),
    ("icmp ports", {"selectors": {"local": ["10.0.0.1"], "remote": ["10.0.0.2"],
                                  "protocol": 1, "local_ports": "1000"}}, "ICMP type"),
    ("empty name", {"name": ""}, "'name': must not be empty"),
    ("long name", {"name": "x" * 256}, "1-255 octets"),
    ("unknown counter", {"counters": {"octets": 1}}, "unknown field 'counters.octets'"),
    ("bad window", {"replay_window": 100, "replay": None}, "replay window size"),
    ("encap port", {"udp_encap": {"sport": 0}}, "'udp_encap.sport': must be 1-65535"),
]  # fmt: skip


@pytest.mark.parametrize("case", JSON_ERRORS, ids=[c[0] for c in JSON_ERRORS])
def test_json_errors_name_the_field(case: tuple[str, dict[str, Any], str]) -> None:
    _, change, match = case
    obj: object = example("gcm")
    if "__replace__" in change:
        obj = change["__replace__"]
    else:
        assert isinstance(obj, dict)
        for k, v in change.items():
            if v is None:
                obj.pop(k, None)
            else:
                obj[k] = v
    with pytest.raises(ContextError, match=match) as info:
        context.from_json(obj, NOW)
    assert SECRET.hex()[:8] not in str(info.value)
    assert "101112131415" not in str(info.value)  # the example's key


def test_json_ah_rules() -> None:
    obj = example("ah")
    obj["enc"] = "null"
    with pytest.raises(ContextError, match="'enc': does not apply to an AH SA"):
        context.from_json(obj, NOW)
    del obj["enc"], obj["integ"], obj["integ_key"]
    with pytest.raises(ContextError, match="AH SA needs an integrity"):
        context.from_json(obj, NOW)


def test_encode_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(ContextError, match="created after 'now'"):
        context.encode(make_sa(created=NOW + 1), NOW)
    with pytest.raises(ContextError, match="SA name"):
        context.encode(make_sa(name="x" * 256), NOW)
    with pytest.raises(ContextError, match="UDP encapsulation"):
        context.encode(make_sa(encap=UdpEncap(0, 4500)), NOW)
    with pytest.raises(ContextError, match="soft time limit"):
        context.encode(make_sa(soft=Lifetime(seconds=float("inf"))), NOW)


# -- property tests -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(security_associations())
def test_property_round_trip_and_canonical(sa: SecurityAssociation) -> None:
    cdb = context.encode(sa, NOW)
    assert len(cdb) <= context.CDB_MAX and len(cdb) % 8 == 0
    back = context.decode(cdb, NOW)
    assert context.encode(back, NOW) == cdb
    same(sa, back)
    assert context.peek_seq(cdb) == back.seq  # (a standby's look at each replica)
    obj = json.loads(json.dumps(context.to_json(back, NOW)))
    assert context.encode(context.from_json(obj, NOW), NOW) == cdb


def check_decoder(data: bytes) -> None:
    try:
        sa = context.decode(data, NOW)
    except ContextError:
        return
    assert context.encode(sa, NOW) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_property_random_bytes(data: bytes) -> None:
    check_decoder(data)
    assert context.peek_seq(data) >= 0  # never an exception
    try:
        parts = context.split_cdbs(data)
    except ContextError:
        return
    assert b"".join(p for _, p in parts) == data


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 255),
    st.binary(min_size=8, max_size=300),
)
def test_property_random_bodies_with_valid_header(pv: int, flags_hi: int, rest: bytes) -> None:
    body = struct.pack("!I", pv | 0x80000000) + bytes([1, 50, flags_hi & 0xF0, 0]) + rest
    total = -(-(4 + len(body)) // 8) * 8
    check_decoder((struct.pack("!HBB", FPT_IPSEC_SA, total // 8, 0x80) + body).ljust(total, b"\0"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(security_associations(), MUTATIONS)
def test_property_mutated_cdbs(
    sa: SecurityAssociation, mutations: list[tuple[str, int, int]]
) -> None:
    data = bytearray(context.encode(sa, NOW))
    for op, pos, val in mutations:
        i = pos % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= 1 << (val & 7)
        elif op == "set" and i < len(data):
            data[i] = val
        elif op == "insert":
            data[i:i] = bytes([val])
        elif op == "delete" and i < len(data):
            del data[i]
        elif op == "truncate":
            del data[i:]
    check_decoder(bytes(data))


def test_mutated_examples_exhaustive_single_bit_flips() -> None:
    """Every single-bit flip of one example either fails cleanly or is still canonical."""
    cdb = context.encode(context.from_json(example("cbc"), NOW), NOW)
    ok = 0
    for i in range(len(cdb) * 8):
        data = bytearray(cdb)
        data[i // 8] ^= 0x80 >> (i % 8)
        try:
            sa = context.decode(bytes(data), NOW)
        except ContextError:
            continue
        ok += 1
        assert context.encode(sa, NOW) == bytes(data)
    assert 0 < ok < len(cdb) * 8  # key and address bits decode; structure bits do not

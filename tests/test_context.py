"""The IPsec feature context as a CXTP Context Data Block: round trips, strictness, fuzzing."""

from __future__ import annotations

import ipaddress
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
from ipsecct.ipsec.algorithms import ENC, INTEG, EncAlg, IntegAlg
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import build_udp
from ipsecct.ipsec.sad import (
    Counters,
    DfPolicy,
    Direction,
    Lifetime,
    Mode,
    Protocol,
    SecurityAssociation,
    UdpEncap,
)
from ipsecct.ipsec.spd import AddressRange, PortRange, Selectors

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "contexts").glob("*.json"))
A = ipaddress.ip_address
NOW = 1_000_000.0
# A distinctive key: no error message may ever contain it.
SECRET = bytes.fromhex("5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2")


def make_sa(**kw: Any) -> SecurityAssociation:
    args: dict[str, Any] = dict(
        spi=0x1000,
        direction=Direction.OUTBOUND,
        src=A("192.0.2.1"),
        dst=A("192.0.2.2"),
        enc=EncAlg.AES_GCM_16,
        enc_key=SECRET,
        created=NOW - 10,
    )
    args.update(kw)
    return SecurityAssociation(**args)


def full_inbound(window: int = 1024) -> SecurityAssociation:
    sa = make_sa(
        direction=Direction.INBOUND,
        esn=True,
        replay_window=window,
        soft=Lifetime(3000, 10**9, 10**6),
        hard=Lifetime(3600, 2 * 10**9, 2 * 10**6),
        counters=Counters(1234, 567890),
        path_mtu=1400,
        pmtu_expires=NOW + 600,
        df=DfPolicy.SET,
        copy_dscp=False,
        encap=UdpEncap(4500, 41000),
        selectors=Selectors.between(
            ["10.0.0.0/24", "10.0.9.1-10.0.9.9"], "10.1.0.0/16", 17, "1000-2000", 53, "n", b"L"
        ),
        name="sa-name",
        soft_fired=True,
    )
    for seq in (1, 2, 3, 5, (1 << 32) + 10, (1 << 32) + 12):
        assert sa.window.check_and_update(seq)
    return sa


def same(a: SecurityAssociation, b: SecurityAssociation, now: float = NOW) -> None:
    """Everything the context carries is equal."""
    assert context.to_json(a, now) == context.to_json(b, now)
    assert a.window.snapshot() == b.window.snapshot() or a.direction is Direction.OUTBOUND
    assert a.enc_key == b.enc_key and a.integ_key == b.integ_key
    assert abs(a.created - b.created) < 1e-3


# -- round trips -------------------------------------------------------------------------------
def sample_sas() -> list[SecurityAssociation]:
    v6 = {"src": A("2001:db8::1"), "dst": A("2001:db8::2")}
    return [
        make_sa(),
        make_sa(direction=Direction.INBOUND),
        full_inbound(),
        full_inbound(window=0),
        full_inbound(window=4096),
        make_sa(seq=(1 << 40) + 5, esn=True, mode=Mode.TRANSPORT, **v6),
        make_sa(seq=0xFFFFFFFF, overflow_permitted=True, df=DfPolicy.CLEAR),
        make_sa(enc=EncAlg.CHACHA20_POLY1305, enc_key=bytes(36), **v6),
        make_sa(enc=EncAlg.AES_GCM_16, enc_key=bytes(28)),
        make_sa(
            enc=EncAlg.AES_CBC,
            enc_key=bytes(32),
            integ=IntegAlg.HMAC_SHA2_512_256,
            integ_key=bytes(64),
        ),
        make_sa(enc=EncAlg.NULL, enc_key=b"", integ=IntegAlg.HMAC_SHA1_96, integ_key=bytes(20)),
        make_sa(
            protocol=Protocol.AH,
            enc=EncAlg.NULL,
            enc_key=b"",
            integ=IntegAlg.HMAC_SHA2_384_192,
            integ_key=bytes(48),
            dead=True,
            rekey_requested=True,
        ),
        make_sa(hard=Lifetime(seconds=0)),  # a zero limit is not the same as no limit
        make_sa(created=NOW),  # age 0
        make_sa(pmtu_expires=NOW - 5),  # already expired: travels as 0 ms left
        make_sa(
            selectors=Selectors.between(
                ["192.0.2.0/24", "2001:db8::/32"], ["0.0.0.0/0", "::/0"], 58, "128", "0"
            )
        ),
    ]


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
def reencode(cdb: bytes, body: bytes, pflag: int | None = None) -> bytes:
    """``cdb``'s header with a new body (after the 4-octet header), padded and length-fixed."""
    total = -(-(4 + len(body)) // 8) * 8
    flag = cdb[3] if pflag is None else pflag
    return (cdb[:2] + bytes([total // 8, flag]) + body).ljust(total, b"\0")


BASE = context.encode(make_sa(), NOW)  # header(4) PV(4) ver proto flags(2) spi(4) src dst alg...
BODY = BASE[4:]


def patch(offset: int, value: bytes, data: bytes = BASE) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


MALFORMED: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "truncated"),
    "short header": (BASE[:3], "truncated"),
    "truncated body": (BASE[:-8], "truncated"),
    "length zero": (patch(2, b"\x00"), "bad CDB length"),
    "length too big": (patch(2, bytes([BASE[2] + 1])), "truncated"),
    "length too small": (patch(2, bytes([BASE[2] - 1])), "trailing"),
    "trailing bytes": (BASE + bytes(8), "trailing"),
    "unknown FPT": (patch(0, b"\x00\x01"), "unknown FPT 0x0001"),
    "reserved header bits": (patch(3, b"\x81"), "reserved bits"),
    "P set, empty vector": (patch(4, bytes(4)), "presence vector is empty"),
    "no presence vector": (reencode(BASE, BODY[4:20], 0), "ESP SA needs its encryption"),
    "unknown presence bit": (patch(4, b"\x80\x80\x00\x7f"), "unknown presence-vector bits"),
    "unknown version": (patch(8, b"\x02"), "unknown context format version 2"),
    "unknown protocol": (patch(9, b"\x34"), "unknown IPsec protocol 52"),
    "reserved flags": (patch(10, b"\x00\x01"), "reserved flag bits"),
    "DF code 3": (patch(10, b"\x03\x00"), "unknown DF policy"),
    "reserved SPI": (patch(12, b"\x00\x00\x00\x05"), "reserved"),
    "unknown encryption": (patch(24, b"\x00\x63"), "unknown encryption transform 99"),
    "key too short": (
        reencode(BASE, b"\x80\0\0\0" + BODY[4:20] + b"\x00\x14\x10" + SECRET[:16]),
        "takes a key of 20 or 28 or 36 octets, not 16",
    ),
    "non-zero padding": (BASE[:-1] + b"\x01", "non-zero padding"),
    "excess padding": (reencode(BASE, BODY + bytes(8)), "after the data"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_raises_context_error(name: str) -> None:
    data, match = MALFORMED[name]
    with pytest.raises(ContextError, match=match) as info:
        context.decode(data, NOW)
    assert SECRET.hex() not in str(info.value) and SECRET.hex()[:8] not in str(info.value)


def cdb_with(sa: SecurityAssociation, bit: Bit, data: bytes) -> bytes:
    """The CDB of ``sa`` (whose only optional fields are its transforms) with ``bit`` set and
    ``data`` placed where that field goes."""
    good = context.encode(sa, NOW)
    pv = struct.unpack("!I", good[4:8])[0]
    pos = 8 + 8 + 2 * len(sa.dst.packed)
    fields: list[tuple[int, bytes]] = []
    for b in Bit:
        if pv & context._mask(b):
            assert b in (Bit.ESP_ENC, Bit.ESP_INTEG, Bit.AH_INTEG), b
            n = 3 + good[pos + 2]
            fields.append((b, good[pos : pos + n]))
            pos += n
    fields.append((bit, data))
    fields.sort(key=lambda x: x[0])
    body = struct.pack("!I", pv | context._mask(bit)) + good[8 : 16 + 2 * len(sa.dst.packed)]
    return reencode(good, body + b"".join(d for _, d in fields))


def esp_inbound() -> SecurityAssociation:
    return make_sa(direction=Direction.INBOUND, created=NOW)


def esp_outbound() -> SecurityAssociation:
    return make_sa(created=NOW)


CONTRADICTIONS: list[tuple[str, SecurityAssociation, Bit, bytes, str]] = [
    ("AH key on ESP SA", esp_outbound(), Bit.AH_INTEG, b"\x00\x0c\x20" + bytes(32), "no AH"),
    ("seq on inbound SA", esp_inbound(), Bit.SEQ, struct.pack("!Q", 5), "inbound SA carries no"),
    ("seq zero present", esp_outbound(), Bit.SEQ, bytes(8), "must be omitted"),
    ("window 64 present", esp_outbound(), Bit.WINDOW, struct.pack("!I", 64), "must be omitted"),
    ("window not /32", esp_outbound(), Bit.WINDOW, struct.pack("!I", 100), "multiple of 32"),
    ("replay on outbound", esp_outbound(), Bit.REPLAY, struct.pack("!Q", 1) + b"\x01" + bytes(7),
     "outbound SA carries no"),
    ("replay top zero", esp_inbound(), Bit.REPLAY, bytes(16), "top 0"),
    ("replay top unmarked", esp_inbound(), Bit.REPLAY, struct.pack("!Q", 9) + bytes(8),
     "does not mark its own top"),
    ("replay below 1", esp_inbound(), Bit.REPLAY, struct.pack("!Q", 1) + b"\x03" + bytes(7),
     "below 1"),
    ("top beyond 32 bits", esp_inbound(), Bit.REPLAY, struct.pack("!Q", 1 << 33) + b"\x01"
     + bytes(7), "out of range"),
    ("age zero present", esp_outbound(), Bit.AGE, bytes(8), "must be omitted"),
    ("age too long", esp_outbound(), Bit.AGE, struct.pack("!Q", 1 << 60), "out of range"),
    ("pmtu 1500 present", esp_outbound(), Bit.PMTU, struct.pack("!H", 1500), "must be omitted"),
    ("pmtu too small", esp_outbound(), Bit.PMTU, struct.pack("!H", 60), "path MTU"),
    ("encap port 0", esp_outbound(), Bit.UDP_ENCAP, bytes(4), "ports must be 1-65535"),
    ("selector proto without selectors", esp_outbound(), Bit.SEL_PROTOCOL, b"\x06",
     "without selector addresses"),
    ("selectors zero ranges", esp_outbound(), Bit.SELECTORS, b"\x00\x01", "at least one"),
    ("selector family 5", esp_outbound(), Bit.SELECTORS, b"\x01\x01\x05" + bytes(16),
     "address family 5"),
    ("selector empty range", esp_outbound(), Bit.SELECTORS,
     b"\x01\x01\x04" + bytes([10, 0, 0, 9, 10, 0, 0, 1]) + b"\x04" + bytes(8), "empty"),
    ("SA name empty", esp_outbound(), Bit.SA_NAME, b"\x00", "present but empty"),
    ("SA name bad UTF-8", esp_outbound(), Bit.SA_NAME, b"\x02\xc0\xaf", "UTF-8"),
]  # fmt: skip


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
@st.composite
def address_ranges(draw: st.DrawFn, version: int) -> AddressRange:
    bits = 32 if version == 4 else 128
    a = draw(st.integers(0, (1 << bits) - 1))
    b = draw(st.one_of(st.just(a), st.integers(a, (1 << bits) - 1)))
    mk = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return AddressRange(mk(a), mk(b))


@st.composite
def port_ranges(draw: st.DrawFn, hi: int = 65535) -> PortRange:
    a = draw(st.integers(0, hi))
    return PortRange(a, draw(st.integers(a, hi)))


@st.composite
def selectors(draw: st.DrawFn) -> Selectors:
    fam = st.sampled_from([4, 6]).flatmap(address_ranges)
    proto = draw(st.sampled_from([0, 1, 6, 17, 58, 132]))
    hi = 255 if proto in (1, 58) else 65535
    return Selectors(
        tuple(draw(st.lists(fam, min_size=1, max_size=4))),
        tuple(draw(st.lists(fam, min_size=1, max_size=4))),
        proto,
        draw(port_ranges(hi)),
        draw(port_ranges(hi)),
        draw(st.none() | st.text(min_size=1, max_size=30)),
        draw(st.none() | st.binary(min_size=1, max_size=40)),
    )


MS = st.integers(0, context.MAX_DURATION_MS)


@st.composite
def security_associations(draw: st.DrawFn) -> SecurityAssociation:
    protocol = draw(st.sampled_from(Protocol))
    if protocol is Protocol.ESP:
        enc = draw(st.sampled_from(EncAlg))
        integs = (
            [IntegAlg.NONE] if ENC[enc].aead else [i for i in IntegAlg if i is not IntegAlg.NONE]
        )
        integ = draw(st.sampled_from(integs))
        klen = draw(st.sampled_from(ENC[enc].key_lengths))
        enc_key = draw(st.binary(min_size=klen, max_size=klen))
    else:
        enc, enc_key = EncAlg.NULL, b""
        integ = draw(st.sampled_from([i for i in IntegAlg if i is not IntegAlg.NONE]))
    n = INTEG[integ].key_length
    integ_key = draw(st.binary(min_size=n, max_size=n))
    v6 = draw(st.booleans())
    mk = ipaddress.IPv6Address if v6 else ipaddress.IPv4Address
    bits = 128 if v6 else 32
    esn = draw(st.booleans())
    direction = draw(st.sampled_from(Direction))
    window = draw(st.sampled_from([0, 32, 64, 128, 1024, 4096]))
    seq_max = (1 << 64) - 1 if esn else 0xFFFFFFFF
    opt_ms = st.none() | MS.map(lambda ms: ms / 1000)
    opt_u64 = st.none() | st.integers(0, (1 << 64) - 1)
    sa = SecurityAssociation(
        spi=draw(st.integers(256, 0xFFFFFFFF)),
        direction=direction,
        src=mk(draw(st.integers(0, (1 << bits) - 1))),
        dst=mk(draw(st.integers(0, (1 << bits) - 1))),
        protocol=protocol,
        mode=draw(st.sampled_from(Mode)),
        enc=enc,
        enc_key=enc_key,
        integ=integ,
        integ_key=integ_key,
        esn=esn,
        replay_window=window,
        seq=draw(st.integers(0, seq_max)) if direction is Direction.OUTBOUND else 0,
        overflow_permitted=draw(st.booleans()),
        soft=Lifetime(draw(opt_ms), draw(opt_u64), draw(opt_u64)),
        hard=Lifetime(draw(opt_ms), draw(opt_u64), draw(opt_u64)),
        path_mtu=draw(st.integers(68, 65535)),
        pmtu_expires=draw(st.none() | MS.map(lambda ms: NOW + ms / 1000)),
        df=draw(st.sampled_from(DfPolicy)),
        copy_dscp=draw(st.booleans()),
        encap=draw(st.none() | st.builds(UdpEncap, st.integers(1, 65535), st.integers(1, 65535))),
        selectors=draw(st.none() | selectors()),
        name=draw(st.sampled_from(["", "sa"]) | st.text(min_size=1, max_size=30)),
        created=NOW - draw(st.integers(0, 10**12)) / 1000,
        counters=Counters(draw(st.integers(0, (1 << 64) - 1)), draw(st.integers(0, (1 << 64) - 1))),
        soft_fired=draw(st.booleans()),
        dead=draw(st.booleans()),
        rekey_requested=draw(st.booleans()),
    )
    if direction is Direction.INBOUND:
        start = draw(st.integers(1, seq_max))
        for delta in draw(st.lists(st.integers(-5000, 5000), max_size=40)):
            seq = min(max(1, start + delta), seq_max)
            sa.window.check_and_update(seq)
    return sa


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(security_associations())
def test_property_round_trip_and_canonical(sa: SecurityAssociation) -> None:
    cdb = context.encode(sa, NOW)
    assert len(cdb) <= context.CDB_MAX and len(cdb) % 8 == 0
    back = context.decode(cdb, NOW)
    assert context.encode(back, NOW) == cdb
    same(sa, back)
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


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
              st.integers(0, 4000), st.integers(0, 255)),
    min_size=1, max_size=4,
)  # fmt: skip


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

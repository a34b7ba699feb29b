"""Context (CDB) test material shared by the context tests: sample SAs, malformed CDBs,
contradictions and Hypothesis strategies for SAs."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from hypothesis import strategies as st

from ipsecct.ct import context
from ipsecct.ct.context import Bit
from ipsecct.ipsec.algorithms import ENC, INTEG, EncAlg, IntegAlg
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


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
              st.integers(0, 4000), st.integers(0, 255)),
    min_size=1, max_size=4,
)  # fmt: skip

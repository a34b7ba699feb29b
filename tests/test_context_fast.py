"""The fast context reader and writer against the reference: same bytes, same SAs, same errors.

:func:`ipsecct.ct.context.decode` runs a one-pass reader that checks the canonical form field
by field; :func:`~ipsecct.ct.context.decode_reference` parses every field on its own, re-encodes
and compares. Both must accept exactly the same inputs and build equal SAs from them, which is
checked here on hypothesis-made contexts, mutations of them, random bodies behind a valid
header, a grammar that builds CDBs field by field with one fault at the edge of one rule, every
single-bit flip of the sample contexts and the hand-made malformed cases. Likewise
:func:`~ipsecct.ct.context.encode` (a one-pass writer) must write the bytes
:func:`~ipsecct.ct.context.encode_reference` writes, and refuse what it refuses.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.ct import context
from ipsecct.ct.context import FPT_IPSEC_SA
from ipsecct.errors import ContextError
from ipsecct.ipsec.replay import ReplayWindow
from ipsecct.ipsec.sad import Counters, Direction, Lifetime, Protocol, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import AddressRange, Selectors
from ipsecct.ipsec.transforms import AeadTransform
from tests.helpers.contexts import (
    CONTRADICTIONS,
    MALFORMED,
    MUTATIONS,
    NOW,
    cdb_with,
    make_sa,
    sample_sas,
    security_associations,
)

_SKIP = {"_window", "_transform"}
_AEAD_SLOT = vars(AeadTransform)["_aead"]


def identical(a: SecurityAssociation, b: SecurityAssociation) -> None:
    """Every field of the two SAs is equal, the replay windows and transforms included."""
    for f in dataclasses.fields(SecurityAssociation):
        if f.name not in _SKIP:
            assert getattr(a, f.name) == getattr(b, f.name), f.name
    assert (a.window.size, a.window.esn) == (b.window.size, b.window.esn)
    assert a.window.snapshot() == b.window.snapshot()
    # The C decoder makes the window and an AEAD transform without their constructors: every
    # slot as the constructor sets it, and the transform seals as the other one does.
    for name in ReplayWindow.__slots__:
        assert getattr(a.window, name) == getattr(b.window, name), name
    if a.protocol is Protocol.ESP:
        assert type(a.transform) is type(b.transform)
        if isinstance(a.transform, AeadTransform):
            for name in ("block", "icv_len", "iv_len", "_alg", "_cipher_key", "_salt"):
                assert getattr(a.transform, name) == getattr(b.transform, name), name
            with pytest.raises(AttributeError):  # (``a`` is new: no cipher context made yet)
                _AEAD_SLOT.__get__(a.transform, AeadTransform)
            seq = 5 if a.esn else 1
            assert a.transform.seal_payload(a.spi, seq, b"x", 59, 0, a.esn) == (
                b.transform.seal_payload(b.spi, seq, b"x", 59, 0, b.esn)
            )


# The one-pass readers: in Python, and in C (ipsecct.ct._cdb) where built, which decode()
# uses then. Both are held to the reference.
READERS = [context._read_python] + ([context._read_native] if context.NATIVE_READER else [])
WRITERS = [context._write_python] + ([context._write_native] if context.NATIVE_READER else [])


@pytest.mark.skipif(
    os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"),
    reason="IPSECCT_PURE_PYTHON forces the Python paths",
)
def test_the_c_reader_is_built_and_used() -> None:
    # scripts/install builds it (CI too): the differential tests below must cover it.
    assert context.NATIVE_READER, "ipsecct.ct._cdb is not built: run scripts/install"
    assert context._read is context._read_native
    assert context._write is context._write_native


def agree(data: bytes, now: float = NOW) -> bool:
    """Each fast reader and the reference agree on ``data``; True if they accept it."""
    try:
        ref: SecurityAssociation | None = context.decode_reference(data, now)
    except ContextError:
        ref = None
    for read in READERS:
        fast = read(data, now)
        if ref is None:
            assert fast is None, f"{read.__name__} accepts what the reference refuses"
            continue
        assert fast is not None, f"{read.__name__} refuses what the reference accepts"
        identical(fast, ref)
        assert context.encode(fast, now) == data
    return ref is not None


def test_samples_and_their_single_bit_flips() -> None:
    accepted = rejected = 0
    for sa in sample_sas():
        cdb = context.encode(sa, NOW)
        assert agree(cdb)
        for i in range(len(cdb) * 8):
            data = bytearray(cdb)
            data[i // 8] ^= 0x80 >> (i % 8)
            if agree(bytes(data)):
                accepted += 1
            else:
                rejected += 1
        for cut in range(len(cdb)):
            assert not agree(cdb[:cut])
    assert accepted and rejected


def test_hand_made_malformed_cases() -> None:
    for data, _match in MALFORMED.values():
        assert not agree(data)
    for _name, sa, bit, field, _match in CONTRADICTIONS:
        assert not agree(cdb_with(sa, bit, field))


def test_shared_parts_are_not_confused() -> None:
    # Two SAs whose selectors, lifetimes and ports differ only slightly decode to their own.
    sas = sample_sas()
    for sa in sas + sas:  # the second round hits the caches
        back = context.decode(context.encode(sa, NOW), NOW)
        identical(back, context.decode_reference(context.encode(sa, NOW), NOW))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(security_associations())
def test_property_valid_contexts(sa: SecurityAssociation) -> None:
    assert agree(context.encode(sa, NOW))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(security_associations(), MUTATIONS)
def test_property_mutated_contexts(
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
    # Keep the framing right half of the time, so that the fields behind it are reached.
    if mutations[0][2] & 1 and len(data) >= 4:
        data += bytes(-len(data) % 8)
        data[2] = len(data) // 8 if len(data) <= context.CDB_MAX else data[2]
    agree(bytes(data))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFF),
    st.sampled_from([50, 51, 52]),
    st.binary(min_size=8, max_size=400),
)
def test_property_random_bodies_with_valid_header(
    pv: int, flags: int, proto: int, rest: bytes
) -> None:
    # Mostly known presence bits and no reserved flags, so that the fields are really parsed.
    pv = (pv | 0x80000000) & (context.KNOWN_BITS if pv & 1 else 0xFFFFFFFF)
    flags &= ~context.F_RESERVED if flags & 1 else 0xFFFF
    body = struct.pack("!IBBHI", pv, 1, proto, flags, 0x1000) + rest
    total = -(-(4 + len(body)) // 8) * 8
    if total > context.CDB_MAX:
        return
    agree((struct.pack("!HBB", FPT_IPSEC_SA, total // 8, 0x80) + body).ljust(total, b"\0"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_property_random_bytes(data: bytes) -> None:
    agree(data)


# -- a grammar of CDBs: valid fields, then at most one fault at the edge of one rule ------------
B = context.Bit
M64 = (1 << 64) - 1
MAXMS = context.MAX_DURATION_MS
FAULTS = [
    "version", "protocol", "reserved flag", "DF code", "SPI", "unknown bit", "no transform",
    "both transforms", "enc number", "enc key length", "integ none", "integ number",
    "integ key length", "integ on AEAD", "no integ on CBC", "seq zero", "seq on inbound",
    "seq too big", "window 64", "window odd", "window too big", "replay on outbound",
    "top zero", "top too big", "top unmarked", "bits below 1", "age zero", "age too long",
    "counter zero", "time limit too long", "pmtu 1500", "pmtu too small", "expiry too long",
    "encap port 0", "no ranges", "family", "empty range", "part without selectors",
    "protocol any", "ports any", "ports reversed", "icmp port", "empty text", "bad utf-8",
    "nonzero padding", "extra padding", "truncated",
]  # fmt: skip


@st.composite
def grammar_cdbs(draw: st.DrawFn) -> bytes:
    """A CDB built field by field: every value valid except, mostly, one fault."""
    fault = draw(st.sampled_from([*FAULTS, "none", "none"]))
    d = draw
    fields: dict[context.Bit, bytes] = {}

    def u64(v: int) -> bytes:
        return struct.pack("!Q", v)

    def some() -> bool:
        return d(st.integers(0, 2)) == 0

    proto = 51 if d(st.integers(0, 4)) == 0 else 50
    flags = d(st.integers(0, 0xFFFF)) & ~context.F_RESERVED
    if (flags & context.F_DF_MASK) >> context.F_DF_SHIFT == 3:
        flags &= ~context.F_DF_MASK
    inbound, esn = bool(flags & context.F_INBOUND), bool(flags & context.F_ESN)
    v6 = bool(flags & context.F_IPV6)
    spi = d(st.sampled_from([256, 0x1000, 0xFFFFFFFF]))
    # transforms
    if proto == 50:
        enc, klen, aead = d(
            st.sampled_from([(20, 20, 1), (20, 28, 1), (20, 36, 1), (28, 36, 1), (12, 16, 0),
                             (12, 32, 0), (11, 0, 0)])
        )  # fmt: skip
        if fault == "integ on AEAD":
            enc, klen, aead = 20, 20, 1
        if fault == "enc number":
            enc = d(st.sampled_from([0, 3, 99]))
        if fault == "enc key length":
            klen += d(st.sampled_from([-1, 1, 4]))
        fields[B.ESP_ENC] = struct.pack("!HB", enc, max(klen, 0)) + bytes(max(klen, 0))
    integ = d(st.sampled_from([(2, 20), (12, 32), (13, 48), (14, 64)]))
    if fault == "integ number":
        integ = (99, 20)
    if fault == "integ none":
        integ = (0, 0)
    if fault == "integ key length":
        integ = (integ[0], integ[1] - 1)
    ifield = struct.pack("!HB", *integ) + bytes(integ[1])
    if proto == 51:
        fields[B.AH_INTEG] = ifield
    elif (not aead) != (fault == "no integ on CBC") or fault in ("integ on AEAD", "integ none"):
        fields[B.ESP_INTEG] = ifield
    if fault == "no transform":
        fields.pop(B.ESP_ENC if proto == 50 else B.AH_INTEG)
    if fault == "both transforms":
        fields[B.AH_INTEG if proto == 50 else B.ESP_ENC] = b"\x00\x14\x14" + bytes(20)
    # sequence number and anti-replay
    if (not inbound and some()) or fault in ("seq zero", "seq on inbound", "seq too big"):
        seq = d(st.sampled_from([1, 5, 0xFFFFFFFF] + ([1 << 40, M64] if esn else [])))
        seq = {"seq zero": 0, "seq too big": 1 << 32}.get(fault, seq)
        if fault == "seq too big" and esn:
            flags &= ~context.F_ESN
        if fault == "seq on inbound":
            flags |= context.F_INBOUND
        fields[B.SEQ] = u64(seq)
    window = 64
    if some() or fault.startswith("window"):
        window = d(st.sampled_from([0, 32, 128, 1024]))
        window = {"window 64": 64, "window odd": 100, "window too big": 16352}.get(fault, window)
        fields[B.WINDOW] = struct.pack("!I", window)
    replay_faults = (
        "replay on outbound",
        "top zero",
        "top too big",
        "top unmarked",
        "bits below 1",
    )
    if (inbound and some()) or fault in replay_faults:
        n = window // 8
        top = d(st.sampled_from([window + 1, window + 70, 0xFFFFFFFF] + ([1 << 40] if esn else [])))
        bitmap = bytearray(d(st.binary(min_size=n, max_size=n)))
        if n:
            bitmap[0] |= 1
        if fault == "replay on outbound":
            flags &= ~context.F_INBOUND
        top = {"top zero": 0, "top too big": 1 << 33}.get(fault, top)
        if fault == "top too big":
            flags &= ~context.F_ESN
        if fault == "top unmarked" and n:
            bitmap[0] &= 0xFE
        if fault == "bits below 1" and n:
            top, bitmap[-1] = 3, bitmap[-1] | 0x80
        fields[B.REPLAY] = u64(top) + bytes(bitmap)
    if fault == "seq on inbound":
        fields.pop(B.REPLAY, None)
    # age, counters, lifetimes
    if some() or fault.startswith("age"):
        age = d(st.sampled_from([1, 12345, MAXMS]))
        fields[B.AGE] = u64({"age zero": 0, "age too long": MAXMS + 1}.get(fault, age))
    zero_counter = d(st.sampled_from([B.BYTES, B.PACKETS])) if fault == "counter zero" else None
    for bit in (B.BYTES, B.PACKETS):
        if some() or bit == zero_counter:
            fields[bit] = u64(0 if bit == zero_counter else d(st.sampled_from([1, M64])))
    for bit in (B.SOFT_TIME, B.HARD_TIME):
        if some() or fault == "time limit too long":
            v = MAXMS + 1 if fault == "time limit too long" else d(st.sampled_from([0, MAXMS]))
            fields[bit] = u64(v)
    for bit in (B.SOFT_BYTES, B.SOFT_PACKETS, B.HARD_BYTES, B.HARD_PACKETS):
        if some():
            fields[bit] = u64(d(st.sampled_from([0, 1, M64])))
    # path MTU, encapsulation
    if some() or fault.startswith("pmtu"):
        mtu = {"pmtu 1500": 1500, "pmtu too small": 67}.get(
            fault, d(st.sampled_from([68, 1400, 65535]))
        )
        fields[B.PMTU] = struct.pack("!H", mtu)
    if some() or fault == "expiry too long":
        fields[B.PMTU_EXPIRY] = u64(
            MAXMS + 1 if fault == "expiry too long" else d(st.sampled_from([0, MAXMS]))
        )
    if some() or fault == "encap port 0":
        ports = d(st.sampled_from([(4500, 4500), (1, 65535)]))
        if fault == "encap port 0":
            ports = d(st.sampled_from([(0, 4500), (4500, 0)]))
        fields[B.UDP_ENCAP] = struct.pack("!HH", *ports)
    # selectors
    sel_faults = ("no ranges", "family", "empty range", "protocol any", "ports any",
                  "ports reversed", "icmp port")  # fmt: skip
    if (some() or fault in sel_faults) and fault != "part without selectors":
        counts = [d(st.integers(1, 2)), d(st.integers(1, 2))]
        if fault == "no ranges":
            counts[d(st.integers(0, 1))] = 0
        sel = bytearray(counts)
        for i in range(sum(counts)):
            fam = d(st.sampled_from([4, 6]))
            alen = 4 if fam == 4 else 16
            first = d(st.binary(min_size=alen, max_size=alen))
            last = d(st.sampled_from([first, b"\xff" * alen]))
            if i == 0 and fault == "family":
                fam = 5
            if i == 0 and fault == "empty range":
                first, last = b"\x0a" * alen, b"\x09" * alen
            sel += bytes([fam]) + first + last
        fields[B.SELECTORS] = bytes(sel)
    icmp = fault == "icmp port"
    if some() or fault in ("protocol any", "part without selectors") or icmp:
        proto_sel = 0 if fault == "protocol any" else 1 if icmp else d(st.sampled_from([6, 17]))
        fields[B.SEL_PROTOCOL] = bytes([proto_sel])
    for bit in (B.SEL_LOCAL_PORTS, B.SEL_REMOTE_PORTS):
        if some() or (
            (bit == B.SEL_LOCAL_PORTS and fault in ("ports any", "ports reversed")) or icmp
        ):
            pr = d(st.sampled_from([(80, 80), (0, 255), (1000, 2000)]))
            pr = {"ports any": (0, 65535), "ports reversed": (5, 4), "icmp port": (0, 256)}.get(
                fault, pr
            )
            fields[bit] = struct.pack("!HH", *pr)
    if B.SELECTORS not in fields and fault != "part without selectors":
        for bit in (B.SEL_PROTOCOL, B.SEL_LOCAL_PORTS, B.SEL_REMOTE_PORTS):
            fields.pop(bit, None)
    for bit in (B.SEL_NAME, B.SEL_LABEL, B.SA_NAME):
        if bit != B.SA_NAME and B.SELECTORS not in fields:
            continue
        if some() or (bit == B.SA_NAME and fault in ("empty text", "bad utf-8")):
            t = d(st.sampled_from([b"n", "r\u00e9seau".encode(), b"x" * 255]))
            t = {"empty text": b"", "bad utf-8": b"\xc0\xaf"}.get(fault, t)
            fields[bit] = bytes([len(t)]) + t
    # the fixed part and the frame
    version = 2 if fault == "version" else 1
    proto = 52 if fault == "protocol" else proto
    flags |= {"reserved flag": 1, "DF code": context.F_DF_MASK}.get(fault, 0)
    spi = 255 if fault == "SPI" else spi
    pv = sum(context._mask(b) for b in fields) | (1 if fault == "unknown bit" else 0)
    addrs = d(st.binary(min_size=32 if v6 else 8, max_size=32 if v6 else 8))
    body = struct.pack("!IBBHI", pv, version, proto, flags, spi) + addrs
    body += b"".join(fields[b] for b in sorted(fields))
    total = -(-(4 + len(body)) // 8) * 8
    if total > context.CDB_MAX:
        return b""
    cdb = bytearray(
        (struct.pack("!HBB", FPT_IPSEC_SA, total // 8, 0x80) + body).ljust(total, b"\0")
    )
    if fault == "nonzero padding" and total > 4 + len(body):
        cdb[-1] = 1
    elif fault == "extra padding" and total + 8 <= context.CDB_MAX:
        cdb += bytes(8)
        cdb[2] += 1
    elif fault == "truncated":
        cdb = cdb[: d(st.integers(0, len(cdb) - 1))]
    return bytes(cdb)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grammar_cdbs())
def test_property_grammar_made_cdbs(data: bytes) -> None:
    agree(data)


def test_grammar_reaches_both_verdicts() -> None:
    """The grammar is worth its name only if it makes accepted and refused contexts."""
    seen: set[bool] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(grammar_cdbs())
    def run(data: bytes) -> None:
        seen.add(agree(data))

    run()
    assert seen == {True, False}


# -- the writer ---------------------------------------------------------------------------------
def same_bytes(sa: SecurityAssociation, now: float = NOW) -> bytes | None:
    """Fast writer and reference write the same bytes, or both refuse; the bytes or None."""
    try:
        ref: bytes | None = context.encode_reference(sa, now)
    except ContextError:
        ref = None
    for write in WRITERS:
        assert write(sa, now) == ref, write.__name__
    if ref is None:
        with pytest.raises(ContextError):
            context.encode(sa, now)
    return ref


R = AddressRange(ipaddress.ip_address("10.0.0.0"), ipaddress.ip_address("10.0.0.255"))
BREAKERS: list[tuple[str, Any]] = [
    ("created", NOW + 1), ("created", math.nan), ("created", -math.inf),
    ("created", NOW - context.MAX_DURATION_MS / 1000 - 1),
    ("soft", Lifetime(math.inf)), ("soft", Lifetime(math.nan)), ("hard", Lifetime(-1.0)),
    ("hard", Lifetime(context.MAX_DURATION_MS / 1000 + 1)), ("soft", Lifetime(None, -1)),
    ("hard", Lifetime(None, None, 1 << 64)), ("soft", Lifetime(0.0, 0, 0)),
    ("pmtu_expires", math.nan), ("pmtu_expires", math.inf), ("pmtu_expires", -math.inf),
    ("pmtu_expires", NOW - 1), ("pmtu_expires", NOW + 0.0004),
    ("name", "x" * 256), ("name", "\ud800"), ("name", "\u00e9" * 127), ("name", "\u00e9" * 128),
    ("encap", UdpEncap(0, 4500)), ("encap", UdpEncap(4500, 65536)),
    ("seq", -1), ("seq", 1 << 64),
    ("counters", Counters(-1, 0)), ("counters", Counters(0, 1 << 64)),
    ("replay_window", 1 << 32), ("replay_window", -32),
    ("selectors", Selectors((R,) * 256, (R,))),
    ("selectors", Selectors((R,), (R,), name="x" * 256)),
    ("selectors", Selectors((R,), (R,), name="\udfff")),
    ("selectors", Selectors((R,), (R,), label=bytes(256))),
    ("selectors", Selectors((R,), (R,), label=b"")),
    ("selectors", Selectors((R,), (R,), name="")),
    ("src", ipaddress.ip_address("::1")),
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(security_associations())
def test_property_writer_valid_sas(sa: SecurityAssociation) -> None:
    assert same_bytes(sa) is not None
    assert same_bytes(sa) is not None  # again, with the selector encoding cached


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(security_associations(), st.lists(st.sampled_from(BREAKERS), min_size=1, max_size=2))
def test_property_writer_refuses_what_the_reference_refuses(
    sa: SecurityAssociation, breakers: list[tuple[str, Any]]
) -> None:
    for attr, value in breakers:
        object.__setattr__(sa, attr, value)
    same_bytes(sa)


def test_writer_breakers_one_by_one() -> None:
    refused = 0
    for attr, value in BREAKERS:
        sa = make_sa()
        object.__setattr__(sa, attr, value)
        refused += same_bytes(sa) is None
    assert refused >= len(BREAKERS) - 6  # a few are edge values that still fit


def test_writer_too_big_and_samples() -> None:
    for sa in sample_sas():
        assert same_bytes(sa) is not None
    big = make_sa(direction=Direction.INBOUND, replay_window=16320, created=NOW, name="n")
    big.window.check_and_update(1)
    assert same_bytes(big) is None

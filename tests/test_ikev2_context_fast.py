"""The IKE SA context's one-pass reader (``ikev2.context._read``, issue 11) held to the
reference decoder (``decode_reference``, the decoder before it) on valid and mutated
contexts: where the reader accepts, the reference accepts with the same IKE SA, field by
field; where the reference refuses, the reader says no (and ``decode`` raises what the
reference raises). Every received field decoding to the same value is what keeps the IKE
SA's message IDs and its CHILD SAs' SPIs and keys as the old gateway left them."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.errors import IkeContextError
from ipsecct.ikev2 import context
from ipsecct.ikev2.config import Connection, canonical_peer_id
from ipsecct.ikev2.ikesa import Address, ChildSA, IkeSA
from tests.helpers.ikev2_certs import (
    cert_context,
    rekeyed_context,
    revoking_target,
    unfinished_context,
)
from tests.helpers.ikev2_engines import conn, connect, pair


def _child(c: ChildSA, children: list[ChildSA]) -> dict[str, Any]:
    out = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "uid"}
    out["config"] = id(c.config)
    s = c.successor
    out["successor"] = None if s is None else children.index(s)
    return out


def snapshot(ike: IkeSA) -> dict[str, Any]:
    """Every field of ``ike`` (its CHILD SAs' too) but the process-local ``uid``."""
    out = {f.name: getattr(ike, f.name) for f in dataclasses.fields(ike) if f.name != "uid"}
    out["conn"] = id(ike.conn)
    out["candidates"] = [id(c) for c in ike.candidates]
    out["children"] = [_child(c, ike.children) for c in ike.children]
    return out


@functools.cache
def _plain_context() -> tuple[bytes, ...]:
    w = pair()
    connect(w)
    return tuple(context.encode(w.resp.ike_sas()[0], 0.0))


@functools.cache
def _vip_context() -> tuple[bytes, ...]:
    """Two virtual IPs (item 32 twice), a peer identity written in capitals (not canonical
    here: decoded to lower case) and an hour's rekey and age."""
    w = pair()
    connect(w)
    ike = w.resp.ike_sas()[0]
    ike.vips = [("p4", ipaddress.ip_address("10.3.0.1")),
                ("p6", ipaddress.ip_address("2001:db8::1"))]  # fmt: skip
    ike.peer_id = "MN.Test"
    ike.rekey_at = 3600.0
    return tuple(context.encode(ike, 100.0))


KINDS = ["plain", "vip", "rekeyed", "cert", "unfinished", "revoked"]


def _context(kind: str) -> tuple[list[bytes], Connection]:
    if kind == "revoked":
        cdbs, _payload, target = revoking_target()
        return list(cdbs), target
    make = {"plain": _plain_context, "vip": _vip_context, "rekeyed": rekeyed_context,
            "cert": cert_context, "unfinished": unfinished_context}[kind]  # fmt: skip
    return list(make()), conn()


# The scanners: in Python, and in C (ipsecct.ikev2._tlv) where built, which decode() uses
# then. The reader is held to the reference with each.
SCANNERS = [context._scan] + ([context._tlv.scan] if context.NATIVE_SCAN else [])


@pytest.mark.skipif(
    os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"),
    reason="IPSECCT_PURE_PYTHON forces the Python paths",
)
def test_the_c_scanner_is_built_and_used() -> None:
    # scripts/install builds it (CI too): the differential tests must cover it.
    assert context.NATIVE_SCAN, "ipsecct.ikev2._tlv is not built: run scripts/install"
    assert context._scan_cdb is context._tlv.scan


def _read(cdbs: list[bytes], connections: list[Connection], now: float,
          local: Address | None) -> IkeSA | None:  # fmt: skip
    """The reader's verdict, the same with each scanner."""
    out = []
    try:
        for scan in SCANNERS:
            context._scan_cdb = scan
            out.append(context._read(cdbs, connections, now, local))
    finally:
        context._scan_cdb = SCANNERS[-1]
    assert len({x is None for x in out}) == 1
    if out[0] is not None:
        assert all(snapshot(x) == snapshot(out[0]) for x in out[1:])  # type: ignore[arg-type]
    return out[0]


def _same(cdbs: list[bytes], connections: list[Connection], now: float,
          local: Address | None) -> bool:  # fmt: skip
    """The reader's and the reference's verdicts agree (True: accepted)."""
    fast = _read(cdbs, connections, now, local)
    try:
        ref = context.decode_reference(cdbs, connections, now, local)
    except (IkeContextError, ValueError, KeyError, struct.error) as exc:
        assert fast is None, f"the reader accepted what the reference refused: {exc!r}"
        try:  # decode raises what the reference raises
            context.decode(cdbs, connections, now, local)
        except type(exc) as again:
            assert str(again) == str(exc)
        else:
            raise AssertionError("decode accepted what the reference refused")
        return False
    if fast is not None:
        assert snapshot(fast) == snapshot(ref)
    assert snapshot(context.decode(cdbs, connections, now, local)) == snapshot(ref)
    return True


def test_the_reader_reads_every_valid_context_as_the_reference() -> None:
    """Each kind of context, with and without a new local address: read by the one-pass
    reader (not left to the reference) and to the same IKE SA."""
    here = Address(ipaddress.ip_address("192.0.2.99"), 4500)
    for kind in KINDS:
        cdbs, c = _context(kind)
        for local in (None, here):
            assert _read(cdbs, [c], 5.0, local) is not None, kind
            assert _same(cdbs, [c], 5.0, local)


def _rebuilt(cdb: bytes, items: list[tuple[int, bytes]]) -> bytes | None:
    """``cdb`` with these items (None: too long for a CDB)."""
    body = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in items)
    total = 4 + len(body) + -(4 + len(body)) % 8
    if total > context.MAX_CDB:
        return None
    return cdb[:2] + bytes((total // 8, 0)) + body + bytes(total - 4 - len(body))


def _item_variants(value: bytes) -> list[bytes]:
    """Values an item is replaced by: its octets each set to 0, 1, 0xff and flipped (items
    of up to 40 octets: flags, numbers, SPIs, suites, addresses, selectors), one octet more
    or less, empty, all zero or 0xff, either half zero."""
    half = len(value) // 2
    out = [b"", value + b"\x00", value[:-1], value[1:], bytes(len(value)), b"\xff" * len(value),
           bytes(half) + value[half:], value[:half] + bytes(len(value) - half)]
    if len(value) <= 40:
        for j, b in enumerate(value):
            for x in {0, 1, 0xFF, b ^ 1, b ^ 0x80}:
                out.append(value[:j] + bytes((x,)) + value[j + 1 :])
    return out


def test_differential_every_item_of_every_context_changed() -> None:
    """Every item of every kind of context dropped, repeated, moved to the end, given
    another tag, and its value changed (every octet of the short ones): the reader and the
    reference agree on each, and the reader reads those the reference accepts."""
    accepted = 0
    for kind in KINDS:
        orig, c = _context(kind)
        for i, cdb in enumerate(orig):
            items = _items(cdb)
            for k, (tag, value) in enumerate(items):
                variants = [items[:k] + items[k + 1 :], [*items[:k], (tag, value), *items[k:]],
                            items[:k] + items[k + 1 :] + [(tag, value)],
                            [*items[:k], (tag + 40, value), *items[k + 1:]]]  # fmt: skip
                variants += [[*items[:k], (tag, v), *items[k + 1:]] for v in _item_variants(value)]
                for its in variants:
                    new = _rebuilt(cdb, its)
                    if new is None:
                        continue
                    cdbs = [*orig[:i], new, *orig[i + 1:]]
                    if _same(cdbs, [c], 5.0, None):
                        accepted += 1
                        assert _read(cdbs, [c], 5.0, None) is not None, (kind, tag)
    assert accepted > 1000  # (most octets of keys, nonces and numbers are any value)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_differential_reader_and_reference_on_mutated_contexts(data: st.DataObject) -> None:
    """Octets changed, CDBs cut short, items dropped, repeated or lengthened, CDBs dropped,
    repeated or reordered: the reader and the reference agree on every one."""
    kind = data.draw(st.sampled_from(KINDS))
    orig, c = _context(kind)
    cdbs = [bytearray(x) for x in orig]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(cdbs) - 1))
        how = data.draw(st.sampled_from(["octet", "cut", "item", "cdb"]))
        cdb = cdbs[i]
        if how == "octet" and cdb:
            j = data.draw(st.integers(0, len(cdb) - 1))
            cdb[j] = data.draw(st.integers(0, 255))
        elif how == "cut":
            cdbs[i] = cdb[: data.draw(st.integers(0, len(cdb)))]
        elif how == "item":  # an item (tag, length, value) of the CDB, redone whole
            items = _items(bytes(cdb))
            if not items:
                continue
            k = data.draw(st.integers(0, len(items) - 1))
            tag, value = items[k]
            op = data.draw(st.sampled_from(["drop", "twice", "longer", "shorter", "retag"]))
            if op == "drop":
                del items[k]
            elif op == "twice":
                items.insert(k, (tag, value))
            elif op == "longer":
                items[k] = (tag, value + bytes(data.draw(st.integers(1, 3))))
            elif op == "shorter" and value:
                items[k] = (tag, value[:-1])
            else:
                items[k] = (data.draw(st.integers(1, 40)), value)
            body = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in items)
            with_header = bytes(cdb[:4]) + body
            total = len(with_header) + -len(with_header) % 8
            if total > context.MAX_CDB:
                continue
            cdbs[i] = bytearray(with_header + bytes(total - len(with_header)))
            cdbs[i][2] = total // 8
        else:
            op = data.draw(st.sampled_from(["drop", "twice", "swap"]))
            if op == "drop":
                del cdbs[i]
            elif op == "twice":
                cdbs.insert(i, bytearray(cdb))
            else:
                cdbs.insert(0, cdbs.pop(i))
            if not cdbs:
                break
    local = data.draw(st.sampled_from([None, Address(ipaddress.ip_address("192.0.2.99"), 500)]))
    _same([bytes(x) for x in cdbs], [c], data.draw(st.sampled_from([0.0, 5.0, 1e9])), local)


def _items(cdb: bytes) -> list[tuple[int, bytes]]:
    """The items of a well-formed CDB (those before a malformed one)."""
    out = []
    pos = 4
    while pos + 3 <= len(cdb) and cdb[pos]:
        n = struct.unpack_from("!H", cdb, pos + 1)[0]
        out.append((cdb[pos], cdb[pos + 3 : pos + 3 + n]))
        pos += 3 + n
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_differential_on_random_cdbs(body: bytes) -> None:
    """A valid IKE_SA CDB with random CDBs of each IKE FPT beside it."""
    main, c = _plain_context()[0], conn()
    for fpt in (context.FPT_IKE_CHILD, context.FPT_IKE_RESPONSE, context.FPT_IKE_SA, 0x8013):
        total = 4 + len(body) + -(4 + len(body)) % 8
        cdb = struct.pack("!HBB", fpt, total // 8, 0) + body + bytes(total - 4 - len(body))
        _same([main, cdb], [c], 0.0, None)


@given(st.text(max_size=40) | st.from_regex(r"(?i)[a-z0-9.@:=, #*%-]{0,30}", fullmatch=True))
def test_a_peer_identity_in_lower_case_is_canonical_already(text: str) -> None:
    """The reader's short cut: a text that is its own lower case and does not start with
    0x is what canonical_peer_id makes of it."""
    if text[:2] != "0x" and text == text.lower():
        assert canonical_peer_id(text) == text


_SELECTOR = st.tuples(st.sampled_from([7, 8, 0]), st.integers(0, 255), st.integers(0, 65535),
                      st.integers(0, 65535), st.sampled_from([4, 16, 5]),
                      st.binary(min_size=32, max_size=32))  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(_SELECTOR, max_size=3), st.binary(max_size=3))
def test_differential_selectors(sels: list[tuple[int, int, int, int, int, bytes]],
                                tail: bytes) -> None:  # fmt: skip
    """The reader's selectors (shared by their octets) and the reference's, on selectors of
    any type, ports, address length and addresses (start above end half the time)."""
    b = b"".join(struct.pack("!BBHHB", t, p, sp, ep, n) + a[: 2 * n] for t, p, sp, ep, n, a in sels)
    for raw in (b, b + tail):
        fast = context._selectors_of(raw)
        try:
            ref = context._unts(raw)
        except (IkeContextError, ValueError) as exc:
            assert fast is None, exc
        else:
            assert fast == ref


_ITEMS = st.lists(st.tuples(st.integers(0, 4), st.binary(max_size=6)), max_size=8).map(
    lambda items: b"".join(struct.pack("!BH", t, len(v)) + v for t, v in items))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64) | _ITEMS, st.integers(0, 255), st.integers(0, 8), st.booleans())
def test_differential_scanners(body: bytes, units: int, cut: int, zero_tail: bool) -> None:
    """The C scanner and the Python one on CDBs of random octets or items (tags repeated,
    tag 0 among them), lengths that lie, cut short, with or without their padding, and on
    each of the sample contexts' CDBs."""
    cdb = struct.pack("!HBB", 0x8011, units, 0) + body
    if zero_tail:
        cdb += bytes(-len(cdb) % 8)
    for raw in (cdb, cdb[: len(cdb) - cut], struct.pack("!HBB", 0x8010, (len(cdb) + 7) // 8, 0)
                + body + bytes(-len(cdb) % 8)):  # fmt: skip
        verdicts = [scan(raw) for scan in SCANNERS]
        assert all(v == verdicts[0] for v in verdicts[1:]), raw.hex()
    for kind in KINDS:
        for x in _context(kind)[0]:
            assert len({repr(scan(x)) for scan in SCANNERS}) == 1

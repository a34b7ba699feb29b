"""The IKE SA context: extension CDBs that carry an IKE SA with its CHILD SAs from one
gateway to another (issue 10), so that the peer keeps talking to the same IKE SA.

Three kinds of Context Data Block, each with the draft's CDB header
``FPT(16) | Length(8, 8-octet units, header included) | P | Rsvd(7)`` (at most 2040 octets):

- ``FPT_IKE_SA`` (0x8010): SPIs, role, connection name, negotiated transforms, SK_d, SK_ai/ar,
  SK_ei/er, SK_pi/pr, nonces, message IDs (ours and the peer's), addresses and ports, NAT
  flags, negotiated extensions (fragmentation, signature hashes, MOBIKE, RFC 6311
  message-ID and replay-counter sync), peer identity, seconds left to the IKE SA's rekey,
  the DELETEs of CHILD SAs we owe the peer (item 30) and state flags (item 31: our RFC 4555
  role, whether the peer's address awaits our return-routability check, whether our next
  request ID is that of a request in flight), and the virtual IPs (item 32, one per address:
  the pool's name and the address leased to the peer, or as initiator, given to us);
- ``FPT_IKE_CHILD`` (0x8011): one per CHILD SA: config name, transforms, SPIs, KEYMAT, who
  initiated it, narrowed selectors, seconds left to its rekey, and, for one the peer rekeyed
  and has yet to delete, its successor's SPI and the rekey's age (the ESP SAs themselves
  travel in the ordinary SA CDBs);
- ``FPT_IKE_RESPONSE`` (0x8012): the cached last response, cut into pieces, so that a
  retransmitted request reaching the new gateway is answered as the old one would have.

Inside, a CDB is a list of ``Tag(8) | Length(16) | Value`` items (tag 0 ends the list: the
CDB's zero padding). Decoding is strict and raises :class:`IkeContextError` only. Keys are in
the clear: these CDBs travel only over the TLS channel between gateways.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509

from ..errors import IdentityError, IkeContextError
from ..ipsec.spd import Selectors
from .auth import (
    MAX_CERTS_SERIALS,
    MAX_NAMES,
    MAX_SERIAL_LEN,
    ascii_lower,
    fingerprint,
    revoked_by,
)
from .config import (
    MATCH_NONE,
    ChildConfig,
    Connection,
    Identity,
    _is_address,
    canonical_peer_id,
    dn_matches,
    select_psk,
)
from .ikesa import Address, ChildSA, IkeSA, IkeState
from .keys import ChildKeys, IkeKeys
from .message import DeletePayload, IdType, ProtocolId, TrafficSelector, TsType
from .proposal import AEAD, ENCR_AES_CTR, ENCR_NULL, INTEG, PRF_HASH, Suite, admits

FPT_IKE_SA = 0x8010
FPT_IKE_CHILD = 0x8011
FPT_IKE_RESPONSE = 0x8012
# an IKE message for an IKE SA that moved, forwarded by the gateway it reached to the one
# that holds the IKE SA now (with the addresses it came from and to)
FPT_IKE_FORWARD = 0x8013
MAX_CDB = 2040
# item 30: the most CHILD SA DELETEs an IKE SA context says we owe (an IKE SA holds at most
# 16 CHILD SAs, 32 with the rekeyed ones; engine.MAX_CHILD_SAS)
MAX_DELETES_OWED = 32
_HDR = struct.Struct("!HBB")
_ITEM = struct.Struct("!BH")
VERSION = 1


def _frame(fpt: int, payload: bytes) -> bytes:
    total = 4 + len(payload)
    total += -total % 8
    if total > MAX_CDB:
        raise IkeContextError("IKE context CDB too long")
    return _HDR.pack(fpt, total // 8, 0) + payload + bytes(total - 4 - len(payload))


def _items(pairs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_ITEM.pack(t, len(v)) + v for t, v in pairs)


def _parse(cdb: bytes) -> tuple[int, dict[int, list[bytes]]]:
    if len(cdb) < 4:
        raise IkeContextError("CDB shorter than its header")
    fpt, units, flags = _HDR.unpack_from(cdb)
    if units * 8 != len(cdb) or flags:
        raise IkeContextError("CDB length or flags wrong")
    out: dict[int, list[bytes]] = {}
    pos = 4
    while pos < len(cdb):
        tag = cdb[pos]
        if tag == 0:
            if any(cdb[pos:]):
                raise IkeContextError("octets after the end of the CDB's items")
            break
        if pos + 3 > len(cdb):
            raise IkeContextError("truncated item")
        _t, n = _ITEM.unpack_from(cdb, pos)
        if pos + 3 + n > len(cdb):
            raise IkeContextError("truncated item")
        out.setdefault(tag, []).append(cdb[pos + 3 : pos + 3 + n])
        pos += 3 + n
    return fpt, out


def _one(d: dict[int, list[bytes]], tag: int, size: int | None = None) -> bytes:
    v = d.get(tag)
    if not v or len(v) != 1:
        raise IkeContextError(f"item {tag} missing or repeated")
    if size is not None and len(v[0]) != size:
        raise IkeContextError(f"item {tag} has the wrong length")
    return v[0]


def _u(d: dict[int, list[bytes]], tag: int, size: int) -> int:
    return int.from_bytes(_one(d, tag, size), "big")


def _addr(a: Address) -> bytes:
    return a.host.packed + struct.pack("!H", a.port)


def _unaddr(b: bytes) -> Address:
    if len(b) not in (6, 18):
        raise IkeContextError("bad address item")
    return Address(ipaddress.ip_address(b[:-2]), struct.unpack("!H", b[-2:])[0])


def _suite(s: Suite) -> bytes:
    return struct.pack("!BHHHHHB", s.protocol, s.encr, s.key_bits, s.integ or 0, s.prf or 0,
                       s.dh or 0, s.esn)  # fmt: skip


def _unsuite(b: bytes) -> Suite:
    if len(b) != 12:
        raise IkeContextError("bad transform item")
    proto, encr, bits, integ, prf, dh, esn = struct.unpack("!BHHHHHB", b)
    if not ((encr in (12, 20, 28) and bits in (128, 192, 256))
            or (proto != ProtocolId.IKE and ((encr == ENCR_AES_CTR and bits in (128, 192, 256))
                                             or (encr == ENCR_NULL and bits == 0)))):  # fmt: skip
        raise IkeContextError("unsupported encryption in the context")
    if (integ and integ not in INTEG) or (prf and prf not in PRF_HASH):
        raise IkeContextError("unsupported integrity or PRF in the context")
    if (encr in AEAD) == bool(integ):
        raise IkeContextError("inconsistent transforms in the context")
    return Suite(proto, encr, bits, integ or None, prf or None, dh or None, bool(esn))


def _ts(ts: list[TrafficSelector]) -> bytes:
    return b"".join(struct.pack("!BBHHB", t.ts_type, t.ip_protocol, t.start_port, t.end_port,
                                len(t.start.packed)) + t.start.packed + t.end.packed
                    for t in ts)  # fmt: skip


def _unts(b: bytes, empty: bool = False) -> list[TrafficSelector]:
    out = []
    pos = 0
    while pos < len(b):
        if pos + 7 > len(b):
            raise IkeContextError("truncated selector")
        ttype, proto, sp, ep, n = struct.unpack_from("!BBHHB", b, pos)
        if n not in (4, 16) or pos + 7 + 2 * n > len(b) or sp > ep:
            raise IkeContextError("bad selector")
        a = ipaddress.ip_address(b[pos + 7 : pos + 7 + n])
        z = ipaddress.ip_address(b[pos + 7 + n : pos + 7 + 2 * n])
        want = TsType.IPV4_ADDR_RANGE if n == 4 else TsType.IPV6_ADDR_RANGE
        if ttype != want or int(a) > int(z):
            raise IkeContextError("bad selector")
        out.append(TrafficSelector(ttype, proto, sp, ep, a, z))
        pos += 7 + 2 * n
    if not out and not empty:
        raise IkeContextError("a CHILD SA without selectors")
    return out


def _left(at: float | None, now: float) -> bytes:
    """Seconds to a timer (0: none), at least 1; one 2^32 s away or farther (a rekey_time
    of centuries is a finite number of seconds) is 2^32 - 1 s away."""
    return struct.pack("!I", 0 if at is None else max(1, int(min(at - now, 0xFFFFFFFF))))


def _age(created: float, now: float) -> bytes:
    """How long ago an SA was established, in milliseconds: the target shows the same age
    as the source (``sa list``), not the time of the transfer."""
    return struct.pack("!I", min(max(0, int((now - created) * 1000)), 0xFFFFFFFF))


def _created(d: dict[int, list[bytes]], tag: int, now: float) -> float:
    """The creation time an age item gives (absent from contexts of older versions: now)."""
    return now - struct.unpack("!I", _one(d, tag, 4))[0] / 1000 if tag in d else now


def _at(b: bytes, now: float) -> float | None:
    v = struct.unpack("!I", b)[0]
    return None if v == 0 else now + v


_STATE = {IkeState.ESTABLISHED: 1, IkeState.REKEYED: 2}
# how the peer authenticated (item 27 of the IKE SA CDB, item 10 of the UNIT payload)
_AUTH = {"psk": 1, "pubkey": 2}
_UNAUTH = {v: k for k, v in _AUTH.items()}


def auth_of(ike: IkeSA) -> str:
    """How the peer of ``ike`` authenticated: as its connection here requires, unless the
    IKE SA came from another gateway whose context said otherwise."""
    return ike.peer_auth or ike.conn.remote_auth


def _unauth(b: bytes) -> str:
    if len(b) != 1 or b[0] not in _UNAUTH:
        raise IkeContextError("bad authentication method item")
    return _UNAUTH[b[0]]


def _my_mid(ike: IkeSA) -> int:
    """Our next request ID as the context carries it: that of our request in flight, if any.
    The gateway that takes the context over does not have that request (it is dropped, or
    its sender died): if the peer never got it, the ID is the one it expects; if it did, the
    peer takes the new request for a retransmission and ignores it (strongSwan compares it
    with what it answered), and the new gateway's next try moves on (``probe_ahead``)."""
    p = ike.pending
    if p is not None and p.message_id == ike.my_next_mid - 1:
        return p.message_id
    return ike.my_next_mid


def _main_items(ike: IkeSA, now: float) -> list[tuple[int, bytes]]:
    """The IKE SA's context items before those of a certificate peer (28, 29, 33)."""
    k = ike.keys
    main = [
        (1, bytes((VERSION,))),
        (2, ike.spi_i), (3, ike.spi_r),
        (4, bytes((ike.we_initiated,))),
        (5, ike.conn.name.encode()),
        (6, _suite(ike.suite)),
        (7, k.sk_d), (8, k.sk_ai), (9, k.sk_ar), (10, k.sk_ei), (11, k.sk_er),
        (12, k.sk_pi), (13, k.sk_pr),
        (14, ike.nonce_i), (15, ike.nonce_r),
        (16, struct.pack("!II", ike.peer_next_mid, _my_mid(ike))),
        (17, _addr(ike.local)), (18, _addr(ike.remote)),
        (19, bytes((ike.nat_local << 1 | ike.nat_remote, ike.fragmentation))),
        (20, ike.peer_id.encode()),
        (21, _left(ike.rekey_at, now)),
        (22, struct.pack(f"!{len(ike.peer_hashes)}H", *ike.peer_hashes)),
        (23, struct.pack("!H", len(ike.last_response))),
        (24, bytes((ike.mobike,))),
        (25, bytes((ike.mid_sync | ike.replay_sync << 1,))),
        (26, _age(ike.created, now)),
        (27, bytes((_AUTH[auth_of(ike)],))),
    ]  # fmt: skip
    # RFC 4555: whether we are the original initiator (a rekey by us does not make us one),
    # whether the peer's address (item 18) still awaits our return-routability check; and
    # whether our next request ID (item 16) is that of a request in flight
    inflight = _my_mid(ike) != ike.my_next_mid
    main.append((31, bytes((ike.mobike_initiator | address_unverified(ike) << 1
                            | inflight << 2,))))  # fmt: skip
    main += [(32, _vip(name, a)) for name, a in ike.vips]
    owed = deletes_owed(ike)
    if owed:  # DELETEs of CHILD SAs we sent (or queued) and the peer has not answered
        main.append((30, b"".join(struct.pack("!I", spi) for spi in owed)))
    return main


def _serials_fit(ike: IkeSA, main: list[tuple[int, bytes]]) -> bool:
    """Does the context carry the peer's chain serials (item 33)? Not when it has none, nor
    when ``main`` leaves no room for them with items 28 and 29: the target cannot check them
    then, as from an older gateway (a target with ``remote.revocation = strict`` refuses
    it; :func:`unit_payloads` leaves item 15 out in that case, so it does before the
    commit)."""
    if not ike.peer_ca or not ike.peer_serials:
        return False
    serials = [(33, _serials(ike.peer_serials))]
    return len(_items(main + serials)) <= MAX_CDB - 8 - 3 - (3 + 32)


def carries_serials(ike: IkeSA, now: float) -> bool:
    """Would the context of ``ike`` encoded at ``now`` carry its peer's chain serials?"""
    return _serials_fit(ike, _main_items(ike, now))


def announces_serials(ike: IkeSA, now: float, payloads: list[bytes]) -> bool:
    """Do ``payloads``, what :func:`unit_payloads` gave for ``ike`` at ``now``, carry its
    peer's chain serials (item 15)? (The source checks before its COMMIT that the context
    still does: :func:`carries_serials`.)"""
    if not (ike.peer_ca and ike.peer_serials) or not _serials_kept(ike, now):
        return False
    if len(payloads) == 1:
        return True
    for p in payloads:  # in pieces: one of them, if its identity fit (item 11)
        d = _parse(_frame(0, p))[1]
        if 15 in (_parse(_frame(0, _one(d, 11)))[1] if 11 in d else d):
            return True
    return False


def _serials_kept(ike: IkeSA, now: float) -> bool:
    try:
        return carries_serials(ike, now)
    except (struct.error, ValueError, OverflowError):  # not exportable: commit_check says so
        return True


def encode(ike: IkeSA, now: float) -> list[bytes]:
    """The CDBs of an established IKE SA and its CHILD SAs."""
    if ike.state is not IkeState.ESTABLISHED:
        raise IkeContextError(f"IKE SA is {ike.state.value}: only established ones move")
    if max(ike.peer_next_mid, _my_mid(ike)) > 0xFFFFFFFF:  # (the engine closes such an SA)
        raise IkeContextError("the IKE SA's message IDs are exhausted")
    main = _main_items(ike, now)
    if ike.peer_ca:  # a certificate peer: what its certificate proves (28) and its CA (29)
        serials = [(33, _serials(ike.peer_serials))] if _serials_fit(ike, main) else []
        room = MAX_CDB - 8 - len(_items(main + serials)) - 3 - (3 + 32)
        main += [(28, _names(ike.peer_names, room)), (29, ike.peer_ca), *serials]
    out = [_frame(FPT_IKE_SA, _items(main))]
    for c in ike.children:
        ck = c.keys
        items = [
            (2, ike.spi_i), (3, ike.spi_r),
            (5, c.config.name.encode()),
            (6, _suite(c.suite)),
            (7, struct.pack("!II", c.spi_in, c.spi_out)),
            (8, ck.enc_i), (9, ck.integ_i), (10, ck.enc_r), (11, ck.integ_r),
            (12, bytes((c.we_initiated,))),
            (13, _ts(c.local_ts)), (14, _ts(c.remote_ts)),
            (15, _left(c.rekey_at, now)),
            (16, _age(c.created, now)),
        ]  # fmt: skip
        if c.rekeyed_at is not None:  # the peer rekeyed it and has not deleted it yet
            items.append((17, _rekeyed(c, ike, now)))
        out.append(_frame(FPT_IKE_CHILD, _items(items)))
    piece = MAX_CDB - 64
    for i, msg in enumerate(ike.last_response):
        parts = [msg[j : j + piece] for j in range(0, len(msg), piece)] or [b""]
        for j, part in enumerate(parts):
            items = [(2, ike.spi_i), (3, ike.spi_r),
                     (4, struct.pack("!HHH", i, j, len(parts))), (5, part)]  # fmt: skip
            out.append(_frame(FPT_IKE_RESPONSE, _items(items)))
    return out


def deletes_owed(ike: IkeSA) -> list[int]:
    """The inbound SPIs of CHILD SAs we deleted and whose DELETE the peer has not answered:
    in our request in flight, or queued behind it (the SA that our own rekey replaced, the
    redundant one of a rekey collision, one the peer rekeyed and never deleted, one an
    operator deleted). We stopped using them when the DELETE went (RFC 7296 §1.4.1; their
    tunnels are gone), but the peer keeps them until it reads it: a peer that answered our
    CHILD rekey (strongSwan) goes on sending on the old SA until then. And the SA our CHILD
    rekey in flight may have made at the peer. Item 30 hands them to the gateway that takes
    the IKE SA over, which sends the DELETE. Never a CHILD SA of the IKE SA; at most
    MAX_DELETES_OWED."""
    spis: list[bytes] = []
    p = ike.pending
    if p is not None and p.kind == "delete-child":
        spis += [s for d in p.payloads if isinstance(d, DeletePayload)
                 and d.protocol == ProtocolId.ESP for s in d.spis]  # fmt: skip
    elif p is not None and p.kind in ("rekey-child", "create-child") and p.spi:
        # our CHILD rekey in flight: the peer may have made the new SA (under the SPI we
        # proposed) and its answer be lost with us. The new gateway does not have that SA,
        # so it is deleted there (a peer that never made it ignores the DELETE), and the
        # old one, which the peer keeps using, is rekeyed again (a new CHILD SA we asked
        # for: the same, and the taker does not ask again)
        spis.append(p.spi)
    spis += ike.queued_deletes
    live = {c.spi_in for c in ike.children}
    out: list[int] = []
    for b in spis:
        v = int.from_bytes(b, "big") if len(b) == 4 else 0
        if v >= 256 and v not in live and v not in out and len(out) < MAX_DELETES_OWED:
            out.append(v)
    return out


def address_unverified(ike: IkeSA) -> bool:
    """Has the peer's address (a MOBIKE peer's UPDATE_SA_ADDRESSES moved the IKE SA there)
    yet to answer our return-routability check (RFC 4555 §5.2; due, in flight, or failed:
    our ESP still goes to the last verified address, ``esp_remote``)? Its CHILD SAs are
    still at the last verified address then, and a gateway that takes the IKE SA over
    checks the address itself before they follow."""
    p = ike.pending
    return ike.rr_due or (p is not None and p.kind == "rr-check") or ike.esp_remote is not None


def _unit_room(n: int) -> int:
    """The largest payload of a UNIT CDB listing ``n`` CHILD SAs (``ct.transfer.unit_cdb``:
    CDB header, Kind | Count | PayloadLen, an outbound SPI each, all in one CDB)."""
    return MAX_CDB - 4 - 4 - 4 * n


def _kid(name: str, suite: Suite, lts: list[TrafficSelector],
         rts: list[TrafficSelector]) -> bytes:  # fmt: skip
    return _items([(1, name.encode()), (2, _suite(suite)), (3, _ts(lts)), (4, _ts(rts))])


def unit_payloads(ike: IkeSA, children: list[ChildSA],
                  now: float | None = None) -> list[bytes]:  # fmt: skip
    """What a target needs to take this IKE SA after its CHILD SAs (the payloads of the
    transfer's UNIT CDBs, ``ct.transfer.unit_cdb``, each listing all of ``children``): its
    connection's name and the names of its CHILD SAs' configurations, then what the
    target's policy is checked against before the commit (:func:`policy_refusal`): the IKE
    SA's suite (7), the peer's identity (8) and how it authenticated (10) (a certificate
    peer's names, CA and chain serials: 12, 13, 15; the serials only when the context
    encoded at ``now`` carries them too), and, per CHILD SA,
    its configuration's name, suite and selectors (9). A gateway that predates items 7-10
    reads only the names.

    One payload when it all fits one CDB. Else (many CHILD SAs, many selectors, a long
    identity) the policy items go in pieces, one UNIT CDB each, under item 11 (a gateway
    that predates it reads only the names of each, as before): the IKE SA's items in the
    first, then the CHILD SAs' (a CHILD SA's selectors spread over several when they must).
    Each piece is checked on its own; a piece the target refuses refuses the unit. Before,
    a policy over 1,200 octets was left out: the target checked only the names before the
    commit and refused the IKE SA after it (its CHILD SAs moved, the IKE SA lost)."""
    names = _unit_names(ike, children)
    # the chain's serials (15), unless the context at ``now`` would leave them out (item 33:
    # no room), so that a target under remote.revocation = strict refuses the IKE SA before
    # the commit rather than after it
    serials = bool(ike.peer_ca and ike.peer_serials and (now is None or _serials_kept(ike, now)))
    top = _unit_top(ike, serials)
    assert top is not None
    kids = [_items([(9, _kid(c.config.name, c.suite, c.local_ts, c.remote_ts))])
            for c in children]  # fmt: skip
    room = _unit_room(len(children)) - len(names)
    if len(top) + sum(map(len, kids)) <= room:
        return [names + top + b"".join(kids)]
    room -= 3  # item 11's own header
    # the IKE SA's items in a piece of their own: the certificate's names cut to what fits
    # (as in the context, item 28), then without the serials. An identity too long even so
    # cannot be announced: the source does not move such an IKE SA (unit_announces, asked
    # by its commit_check), since the target could check it only after the commit
    pieces: list[bytes] = []
    cur = _unit_top(ike, serials, room) or _unit_top(ike, False, room) or b""
    for c in children:
        # its selectors, as many as fit in each piece: each part with the configuration's
        # name and the suite (a selector is checked on its own, so a part as the whole is)
        lts: list[TrafficSelector] = []
        rts: list[TrafficSelector] = []
        for side, t in [("l", t) for t in c.local_ts] + [("r", t) for t in c.remote_ts]:
            nl, nr = lts + [t] * (side == "l"), rts + [t] * (side == "r")
            if len(cur) + len(_items([(9, _kid(c.config.name, c.suite, nl, nr))])) > room:
                if lts or rts:
                    cur += _items([(9, _kid(c.config.name, c.suite, lts, rts))])
                pieces.append(cur)
                cur = b""
                nl, nr = [t] * (side == "l"), [t] * (side == "r")
            lts, rts = nl, nr
        cur += _items([(9, _kid(c.config.name, c.suite, lts, rts))])
    pieces.append(cur)
    return [names + _items([(11, p)]) for p in pieces]


def _unit_names(ike: IkeSA, children: list[ChildSA]) -> bytes:
    """The items every UNIT payload (and piece) of ``ike`` starts with: the version, the
    connection's name, its CHILD SAs' configurations' names, its virtual IPs and the IKE
    SA's SPI of the gateway's side (16: the target keeps the peer's IKE messages that reach
    it before the context only for the IKE SAs a unit announced)."""
    return _items([(1, bytes((VERSION,))), (5, ike.conn.name.encode())]
                  + [(6, c.config.name.encode()) for c in children]
                  + [(14, _vip(n, a)) for n, a in ike.vips]
                  + [(16, ike.our_spi)])  # fmt: skip


def unit_spi(payload: bytes) -> bytes | None:
    """The IKE SPI (of the gateway's side) a UNIT payload announces (item 16); None when it
    carries none (a source that predates it) or is malformed."""
    try:
        d = _parse(_frame(0, payload))[1]
        return _one(d, 16, 8) if 16 in d else None
    except (IkeContextError, ValueError, struct.error):
        return None


def _unit_top(ike: IkeSA, serials: bool, room: int | None = None) -> bytes | None:
    """The IKE SA's policy items of a UNIT payload: its suite (7), the peer's identity (8)
    and how it authenticated (10); a certificate peer's names (12, at most 1,024 octets),
    CA (13) and (``serials``) its chain's serials (15). Within ``room`` octets (None: no
    limit), the names cut to what fits; None when even without them it does not fit."""
    base = [(7, _suite(ike.suite)), (8, ike.peer_id.encode()),
            (10, bytes((_AUTH[auth_of(ike)],)))]  # fmt: skip
    if not ike.peer_ca:
        top = _items(base)
        return top if room is None or len(top) <= room else None
    tail = [(13, ike.peer_ca)] + ([(15, _serials(ike.peer_serials))] if serials else [])
    left = 1024 if room is None else min(1024, room - len(_items([*base, (12, b""), *tail])))
    if left < 0:
        return None
    return _items([*base, (12, _names(ike.peer_names, left)), *tail])


def unit_announces(ike: IkeSA, children: list[ChildSA]) -> bool:
    """Can :func:`unit_payloads` for ``ike`` moving with ``children`` announce the peer's
    identity (a piece of its own at least, without the certificate's names and serials)?
    If not, the target could check the identity and its policy only at the import, after
    the commit: the source does not move such an IKE SA."""
    room = _unit_room(len(children)) - len(_unit_names(ike, children)) - 3
    return _unit_top(ike, False, room) is not None


Kid = tuple[str, Suite, list[TrafficSelector], list[TrafficSelector]]
# the IKE SA's suite, the peer's identity, how it authenticated, and for a certificate peer
# the names its certificate proves, its CA's fingerprint and its chain's serials (() : not
# known)
Serials = tuple[tuple[bytes, int], ...]
Top = tuple[Suite, str, str, tuple[tuple[str, ...], bytes, Serials] | None]


def _unit_policy(d: dict[int, list[bytes]], children: list[str],
                 piece: bool) -> tuple[Top | None, list[Kid]]:  # fmt: skip
    """The policy items of a UNIT payload (or of one piece, item 11): the IKE SA's (None
    when absent from a piece) and the CHILD SAs'. A whole payload names every CHILD SA once;
    a piece names some of them, with some of their selectors."""
    kids = []
    for blob in d.get(9, []):
        k = _parse(_frame(0, blob))[1]
        kids.append((_one(k, 1).decode(), _unsuite(_one(k, 2)),
                     _unts(_one(k, 3), empty=piece), _unts(_one(k, 4), empty=piece)))  # fmt: skip
    if piece:
        if any(n not in children for n, *_ in kids) or (7 in d) != (8 in d):
            raise ValueError("malformed piece")
    elif sorted(n for n, *_ in kids) != sorted(children):
        raise ValueError("malformed unit")
    if 7 not in d:
        if 10 in d or 12 in d or 13 in d or 15 in d:
            raise ValueError("malformed unit")
        return None, kids
    # 10, 12, 13 and 15: absent from a gateway that predates them (admitted, as before)
    auth = _unauth(_one(d, 10)) if 10 in d else ""
    if (12 in d) != (13 in d) or (15 in d and 13 not in d):
        raise ValueError("malformed unit")
    cert = (_unnames(_one(d, 12)), _one(d, 13, 32),
            _unserials(_one(d, 15)) if 15 in d else ()) if 13 in d else None  # fmt: skip
    return (_unsuite(_one(d, 7)), canonical_peer_id(_one(d, 8).decode()), auth, cert), kids


def unit_vips(payload: bytes) -> tuple[str, list[tuple[str, ipaddress.IPv4Address
                                                       | ipaddress.IPv6Address]]]:
    """The connection's name and the virtual IPs (item 14, as item 32 of the context) a
    UNIT payload announces; IkeContextError when malformed. A gateway that predates item 14
    announces none: the import checks them (IkeEngine.vip_refusal)."""
    try:
        d = _parse(_frame(0, payload))[1]
        return _one(d, 5).decode(), _unvips(d.get(14, []))
    except (UnicodeDecodeError, ValueError, struct.error):
        raise IkeContextError("malformed IKE unit") from None


def unit_identity(payload: bytes) -> str | None:
    """The peer identity (item 8) a UNIT payload, or this piece of it (item 11), announces;
    None when it carries none (another piece, an older gateway) or is malformed (which
    :func:`unit_refusal` refuses)."""
    try:
        d = _parse(_frame(0, payload))[1]
        if 11 in d:
            d = _parse(_frame(0, _one(d, 11)))[1]
        return canonical_peer_id(_one(d, 8).decode()) if 8 in d else None
    except (IkeContextError, UnicodeDecodeError, ValueError, struct.error):
        return None


def unit_refusal(payload: bytes, connections: list[Connection]) -> str | None:
    """Why a gateway with ``connections`` cannot take the IKE SA a UNIT payload describes
    (None: it can): no connection of that name, no CHILD configuration of a name, or (when
    the payload, or this piece of it, carries them) a suite, identity or selectors its
    policy does not admit."""
    try:
        d = _parse(_frame(0, payload))[1]
        if _u(d, 1, 1) != VERSION:
            return "unknown IKE unit version"
        name = _one(d, 5).decode()
        children = [c.decode() for c in d.get(6, [])]
        top: Top | None = None
        kids: list[Kid] = []
        policy = False
        if 11 in d:  # one piece of a policy too large for one CDB
            if any(t in d for t in (7, 8, 9, 10)):
                return "malformed IKE unit"
            top, kids = _unit_policy(_parse(_frame(0, _one(d, 11)))[1], children, True)
            policy = True
        elif 7 in d or 8 in d or 9 in d or 10 in d:
            top, kids = _unit_policy(d, children, False)
            policy = top is not None
            if not policy:
                return "malformed IKE unit"
    except (IkeContextError, UnicodeDecodeError, ValueError, struct.error):
        return "malformed IKE unit"
    conn = next((c for c in connections if c.name == name), None)
    if conn is None:
        return f"no connection {name!r} here"
    for child in children:
        if not any(cc.name == child for cc in conn.children):
            return f"no child {child!r} in connection {name!r} here"
    if not policy:  # (an older gateway: names only)
        # Admitted, the transfer would commit with nothing checked of the IKE SA but the
        # names (remote.id, proposals, selectors, unique, the per-identity bound), and the
        # import after the COMMIT could only refuse it then: its CHILD SAs here without it
        return UNIDENTIFIED
    by_name = {cc.name: cc for cc in conn.children}
    return _refusal(conn, top, [(by_name[n], s_, lts, rts) for n, s_, lts, rts in kids])


# the refusal of a UNIT that does not carry the peer's identity and the SA's policy (a
# gateway that predates items 7-10 sends the names only; pre-release: not admitted)
UNIDENTIFIED = ("IKE unit without the peer's identity and the SA's policy (from a gateway that"
                " predates them): it could be checked only after the commit")  # fmt: skip


def unit_whole_refusal(payloads: list[bytes]) -> str | None:
    """Why the UNIT payloads of one unit (all those naming the same tunnels, each admitted
    by :func:`unit_refusal` on its own) do not make one checked IKE SA (None: they do):
    pieces (item 11) of which none carries the peer's identity, or that name different
    connections or identities (each piece is checked against the connection it names)."""
    names: set[bytes] = set()
    ids: set[bytes] = set()
    try:
        for p in payloads:
            d = _parse(_frame(0, p))[1]
            names.add(_one(d, 5))
            if 11 in d:
                d = _parse(_frame(0, _one(d, 11)))[1]
            if 8 in d:
                ids.add(_one(d, 8))
    except (IkeContextError, ValueError, struct.error):
        return "malformed IKE unit"
    if not ids:
        return UNIDENTIFIED
    if len(names) > 1 or len(ids) > 1:
        return "the pieces of an IKE unit name different connections or identities"
    return None


def unit_tunnels_refusal(payloads: list[bytes], spis: list[int],
                         sels: Mapping[int, list[Selectors]],
                         connections: list[Connection]) -> str | None:  # fmt: skip
    """Why the tunnels a unit's transfer brings (``sels``: outbound SPI -> the selectors of
    its SAs, as they would be installed) carry traffic the connection's CHILD configuration
    does not admit (None: they do not). The unit names a configuration for each of its
    ``spis``, in order (item 6); its announced selectors (item 9) are only what the source
    says, the tunnels' are what this gateway would install."""
    try:
        for p in payloads:
            d = _parse(_frame(0, p))[1]
            name = _one(d, 5).decode()
            children = [c.decode() for c in d.get(6, [])]
            if len(children) != len(spis):
                return "malformed IKE unit"
            conn = next((c for c in connections if c.name == name), None)
            if conn is None:
                return f"no connection {name!r} here"
            by_name = {cc.name: cc for cc in conn.children}
            for spi, child in zip(spis, children, strict=True):
                cc = by_name.get(child)
                if cc is None:
                    return f"no child {child!r} in connection {name!r} here"
                for sel in sels.get(spi, []):
                    for side, have, allowed in (("local_ts", _sel_ts(sel, True), cc.local_ts),
                                                ("remote_ts", _sel_ts(sel, False),
                                                 cc.remote_ts)):  # fmt: skip
                        if not all(any(_within(t, a) for a in allowed) for t in have):
                            return (f"tunnel 0x{spi:08x}'s traffic is outside {side} of child"
                                    f" {child!r} here")  # fmt: skip
    except (IkeContextError, UnicodeDecodeError, ValueError, struct.error):
        return "malformed IKE unit"
    return None


def _sel_ts(sel: Selectors, local: bool) -> list[TrafficSelector]:
    """One side of a tunnel's selectors as traffic selectors."""
    ports = sel.local_ports if local else sel.remote_ports
    return [TrafficSelector(TsType.IPV4_ADDR_RANGE if r.first.version == 4
                            else TsType.IPV6_ADDR_RANGE, sel.protocol, ports.first, ports.last,
                            r.first, r.last)
            for r in (sel.local if local else sel.remote)]  # fmt: skip


def replica_refusal(cdbs: list[bytes], connections: list[Connection], now: float,
                    check: Callable[[IkeSA], str | None] | None = None) -> str | None:
    """Why a gateway with ``connections`` could not take over the IKE SA a replica holds
    (None: it could), checked when the replica arrives rather than at the take-over: what
    the import checks (a connection of that name, its CHILD configurations, a well-formed
    context), and that the connection's policy admits the SA as it was negotiated: its IKE
    proposal, each CHILD SA's ESP proposal, the peer's identity (``remote.id``) and each CHILD
    SA's traffic selectors (within the configured ones)."""
    try:
        ike = decode(cdbs, connections, now)
    except IkeContextError as exc:
        return str(exc)
    except (UnicodeDecodeError, ValueError, KeyError, struct.error):
        return "malformed IKE context"
    why = policy_refusal(ike)
    return why if why is not None or check is None else check(ike)


def policy_refusal(ike: IkeSA) -> str | None:
    """Why this gateway's connection would not admit ``ike`` as it was negotiated elsewhere
    (None: it would): its IKE proposal, each CHILD SA's ESP proposal, the peer's identity
    (``remote.id``), how it authenticated (``remote.auth``), its certificate's CA
    (``remote.cacerts``) and revocation (``remote.crls``) and each CHILD SA's traffic
    selectors (within the configured ones). A transfer's UNIT payload is checked before the
    commit, a replica when it arrives, and every imported IKE SA (a handover's, a
    take-over's) before it is taken: an authenticated peer gateway is trusted with the keys,
    not with this gateway's policy."""
    kids = [(c.config, c.suite, c.local_ts, c.remote_ts) for c in ike.children]
    cert = (ike.peer_names, ike.peer_ca, ike.peer_serials) if ike.peer_ca else None
    return _refusal(ike.conn, (ike.suite, ike.peer_id, ike.peer_auth, cert), kids)


def _refusal(
    conn: Connection,
    top: Top | None,
    children: list[tuple[ChildConfig, Suite, list[TrafficSelector], list[TrafficSelector]]],
) -> str | None:
    """``top``: the IKE SA's suite, the peer's identity, how it authenticated ("": not
    known, from an older gateway) and, for a certificate, the names it proves and its CA's
    fingerprint (None: not known); None: not in this piece of a UNIT payload."""
    if top is not None:
        suite, peer_id, auth, cert = top
        if not admits(conn.proposals, suite):
            return f"IKE proposal {suite.name()} not in connection {conn.name!r} here"
        if auth and auth != conn.remote_auth:
            return (f"peer authenticated with {auth}, remote.auth of {conn.name!r} here is "
                    f"{conn.remote_auth}")  # fmt: skip
        if not _id_admitted(conn, peer_id, cert[0] if cert else None):
            return f"peer identity {peer_id!r} is not remote.id of {conn.name!r} here"
        if conn.remote_auth == "psk" and not _psk_admitted(conn, peer_id):
            # (the key itself is not needed after IKE_AUTH: an IKE_AUTH of this peer here
            # would be refused, as a certificate of a CA not trusted here is)
            return (f"no [secrets.ike-*] here names peer identity {peer_id!r} or local.id of "
                    f"{conn.name!r}")  # fmt: skip
        if cert is not None and conn.remote_auth == "pubkey" and cert[1] not in {
                fingerprint(ca) for ca in conn.cacerts}:  # fmt: skip
            return (f"peer's certificate is not from a CA in remote.cacerts of {conn.name!r}"
                    " here")  # fmt: skip
        if conn.remote_auth == "pubkey" and conn.revocation == "strict" and (
                cert is None or not cert[2]):  # fmt: skip
            # (an older gateway's context, or one with no room for them: under strict a
            # certificate whose revocation cannot be checked here is not admitted)
            return _unchecked(conn)
        if cert is not None and conn.remote_auth == "pubkey" and conn.crls is not None:
            why = _revoked_here(conn, cert[2])
            if why is not None:
                return why
    for cc, csuite, lts, rts in children:
        if not admits(cc.esp_proposals, csuite):
            return f"ESP proposal {csuite.name()} not in child {cc.name!r} here"
        for have, allowed, side in ((lts, cc.local_ts, "local_ts"),
                                    (rts, cc.remote_ts, "remote_ts")):  # fmt: skip
            if not all(any(_within(t, a) for a in allowed) for t in have):
                return f"traffic selectors outside {side} of child {cc.name!r} here"
    return None


# the start of the refusal of a certificate peer whose chain serials a context or UNIT does
# not carry, by a connection with remote.revocation = strict (counted by the gateway)
UNCHECKED_REVOCATION = "peer's certificate chain serials not carried"


def _unchecked(conn: Connection) -> str:
    return (f"{UNCHECKED_REVOCATION}: remote.revocation = strict of {conn.name!r} here "
            "cannot check them")  # fmt: skip


def _revoked_here(conn: Connection, serials: Serials) -> str | None:
    """Why the peer's chain is refused by this gateway's remote.crls (None: it is not): a
    certificate of it whose issuer is one of our CAs and whose serial a list that CA signed
    names. One issued by an intermediate cannot be checked here (we hold the CAs, not the
    intermediates), nor a chain of an older gateway's context (no serials)."""
    if not serials or conn.crls is None:
        return None
    crls = conn.crls()
    cas = {fingerprint(ca): ca for ca in conn.cacerts}
    for issuer_fp, serial in serials:
        ca = cas.get(issuer_fp)
        if ca is not None and revoked_by(ca, serial, crls):
            return (f"peer's certificate (serial {serial:x}) is revoked by remote.crls of "
                    f"{conn.name!r} here")  # fmt: skip
    return None


def _serials(serials: Serials) -> bytes:
    """Item 33 / 15: ``issuer SHA-256 (256) | Len(8) | serial`` per certificate of the
    peer's chain, leaf first (at most MAX_CERTS_SERIALS; a serial in at most MAX_SERIAL_LEN
    octets, the fewest that hold it)."""
    out = b""
    for fp, serial in serials[:MAX_CERTS_SERIALS]:
        b = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
        out += fp + bytes((len(b),)) + b
    return out


def _unserials(b: bytes) -> Serials:
    out: list[tuple[bytes, int]] = []
    pos = 0
    if not b:
        raise IkeContextError("bad certificate serials item")
    while pos < len(b):
        if pos + 33 > len(b) or len(out) >= MAX_CERTS_SERIALS:
            raise IkeContextError("bad certificate serials item")
        n = b[pos + 32]
        raw = b[pos + 33 : pos + 33 + n]
        if not 1 <= n <= MAX_SERIAL_LEN or len(raw) != n or (n > 1 and raw[0] == 0):
            raise IkeContextError("bad certificate serials item")
        out.append((b[pos : pos + 32], int.from_bytes(raw, "big")))
        pos += 33 + n
    return tuple(out)


def _within(t: TrafficSelector, allowed: TrafficSelector) -> bool:
    return (t.ts_type == allowed.ts_type
            and allowed.ip_protocol in (0, t.ip_protocol)
            and allowed.start_port <= t.start_port <= t.end_port <= allowed.end_port
            and int(allowed.start) <= int(t.start) <= int(t.end) <= int(allowed.end))  # fmt: skip


def _psk_admitted(conn: Connection, peer_id: str) -> bool:
    """Would an IKE_AUTH here find a pre-shared key for this peer identity (as the engine
    chooses it, from the secrets naming it or local.id)? A connection without secrets (made
    in code) has its one key; without local.id our address may be what a secret names."""
    if not conn.shared_keys:
        return True
    lid = conn.local_id
    me = None if lid is None or lid.is_dn else lid.payload(False)
    peer = _peer(peer_id)
    if peer is not None and select_psk(conn.shared_keys, me, peer.payload(True)) is not None:
        return True
    return lid is None and any(_is_address(i) for k in conn.shared_keys for i in k.ids)


def _peer(peer_id: str) -> Identity | None:
    """The identity an IKE SA's peer_id keeps (says_what_it_is: its text reads as it; a DN:
    its subject's text); None: a text that names none (from a peer gateway: untrusted)."""
    try:  # (a name that is not printable: 0x and its octets in hex)
        ident = Identity(f"fqdn:#{peer_id[2:]}" if re.fullmatch("0x[0-9a-f]+", peer_id)
                         else peer_id)  # fmt: skip
    except IdentityError:
        return None
    return None if ident.any else ident


def _id_admitted(conn: Connection, peer_id: str, names: tuple[str, ...] | None) -> bool:
    """Does ``remote.id`` admit the identity the peer authenticated as (as it would at
    IKE_AUTH here: a name's case aside, a wildcard's ending)? A peer known by its
    certificate's DN while ``remote.id`` names one of its subjectAltNames: when ``names``
    (what the certificate proves, carried since the certificate does not travel) is known,
    ``remote.id`` must be among them, as the authentication here would have checked; from
    an older gateway (None) it cannot be told: admitted, as before."""
    want = conn.remote_id
    if want.any:
        return True
    peer = _peer(peer_id)
    if peer is None:
        return False
    if want.is_dn:
        if not peer.is_dn:
            return False
        if want.dn is None:  # (a text not read at a load: names no one)
            return False
        try:  # (a subject's RFC 4514 text, as the source kept it: untrusted)
            return dn_matches(want.dn, x509.Name.from_rfc4514_string(peer_id))
        except ValueError:
            return False
    if peer.is_dn:
        return names is None or _as_name(want) in names
    return want.match(peer.payload(True)) != MATCH_NONE


def _as_name(ident: Identity) -> str:
    """A configured identity as :func:`~ipsecct.ikev2.auth.cert_names` writes names (a
    KEY_ID: none of them)."""
    if ident.kind in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
        return f"ip:{ipaddress.ip_address(ident.octets)}"
    kinds: dict[int, str] = {IdType.FQDN: "dns", IdType.RFC822_ADDR: "email"}
    kind = kinds.get(ident.kind, "")
    return f"{kind}:{ascii_lower(ident.octets.decode(errors='replace'))}" if kind else ""


def _names(names: tuple[str, ...], room: int) -> bytes:
    """Item 28 / 12: ``Len(8) | name`` each, as many as fit in ``room`` octets."""
    out = b""
    for n in names:
        b = n.encode()
        if len(out) + 1 + len(b) > room:
            break
        out += bytes((len(b),)) + b
    return out


def _unnames(b: bytes) -> tuple[str, ...]:
    out: list[str] = []
    pos = 0
    while pos < len(b):
        n = b[pos]
        if pos + 1 + n > len(b) or len(out) >= MAX_NAMES:
            raise IkeContextError("bad certificate names item")
        try:
            name = b[pos + 1 : pos + 1 + n].decode()
        except UnicodeDecodeError:
            raise IkeContextError("bad certificate names item") from None
        kind, _, value = name.partition(":")
        if kind not in ("dns", "email", "ip") or not value:
            raise IkeContextError("bad certificate names item")
        out.append(name)
        pos += 1 + n
    return tuple(out)


def is_ike_cdb(cdb: bytes) -> bool:
    return len(cdb) >= 2 and struct.unpack_from("!H", cdb)[0] in (
        FPT_IKE_SA, FPT_IKE_CHILD, FPT_IKE_RESPONSE, FPT_IKE_FORWARD)


def is_forward(cdb: bytes) -> bool:
    return len(cdb) >= 2 and struct.unpack_from("!H", cdb)[0] == FPT_IKE_FORWARD


MAX_FORWARD = MAX_CDB - 64  # the largest IKE message forwarded (one CDB)


def encode_forward(data: bytes, src: Address, dst: Address) -> bytes:
    """The CDB that forwards one IKE message (at most MAX_FORWARD octets)."""
    if not data or len(data) > MAX_FORWARD:
        raise IkeContextError("IKE message too long to forward")
    return _frame(FPT_IKE_FORWARD, _items([(1, bytes((VERSION,))), (2, _addr(src)),
                                           (3, _addr(dst)), (4, data)]))  # fmt: skip


def decode_forward(cdb: bytes) -> tuple[bytes, Address, Address]:
    """(message, its source, its destination) of a forwarding CDB."""
    fpt, d = _parse(cdb)
    if fpt != FPT_IKE_FORWARD or _u(d, 1, 1) != VERSION:
        raise IkeContextError("not an IKE forwarding CDB")
    data = _one(d, 4)
    if not data or len(data) > MAX_FORWARD:
        raise IkeContextError("forwarded IKE message empty or too long")
    return data, _unaddr(_one(d, 2)), _unaddr(_one(d, 3))


def child_spis(cdbs: list[bytes]) -> list[tuple[int, int]]:
    """(inbound, outbound) SPIs of the CHILD SAs an IKE context holds, without decoding the
    rest (which of a replica's IKE SAs go with the tunnels a gateway took over)."""
    out = []
    for cdb in cdbs:
        fpt, d = _parse(cdb)
        if fpt == FPT_IKE_CHILD:
            spi_in, spi_out = struct.unpack("!II", _one(d, 7, 8))
            out.append((spi_in, spi_out))
    return out


def decode(cdbs: list[bytes], connections: list[Connection], now: float,
           local: Address | None = None) -> IkeSA:  # fmt: skip
    """The IKE SA (with its CHILD SAs) the CDBs describe, for one of ``connections`` (by name:
    a gateway only takes IKE SAs of connections it has). ``local`` replaces our address (a
    direct handover: the new gateway's own address). IkeContextError (or, as before, a
    ValueError/KeyError/struct.error that :func:`replica_refusal` names) when malformed."""
    ike = _read(cdbs, connections, now, local)
    # The one-pass reader says only "no"; the reference names the fault (and would return the
    # IKE SA if the fast reader ever refused a correct context, which the differential test
    # in tests/test_ikev2_context_fast.py forbids).
    return ike if ike is not None else decode_reference(cdbs, connections, now, local)


# the key length of each PRF (SK_d, SK_pi, SK_pr: its output)
_PRF_LEN = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


def decode_reference(cdbs: list[bytes], connections: list[Connection], now: float,
                     local: Address | None = None) -> IkeSA:  # fmt: skip
    """:func:`decode` by the reference decoder: every item looked up and checked on its own,
    each fault raised where it is found. Slower; the specification of :func:`_read`, which
    must accept exactly what this accepts, with the same values."""
    parsed = [_parse(c) for c in cdbs]
    mains = [d for f, d in parsed if f == FPT_IKE_SA]
    if len(mains) != 1:
        raise IkeContextError("exactly one IKE_SA CDB expected")
    m = mains[0]
    if _u(m, 1, 1) != VERSION:
        raise IkeContextError("unknown IKE context version")
    name = _one(m, 5).decode(errors="replace")
    conn = next((c for c in connections if c.name == name), None)
    if conn is None:
        raise IkeContextError(f"no connection {name!r} here")
    suite = _unsuite(_one(m, 6))
    if suite.prf is None or suite.dh is None:
        raise IkeContextError("an IKE suite without PRF or DH")
    plen = _PRF_LEN[PRF_HASH[suite.prf]]
    ilen, elen = suite.integ_key_len, suite.enc_key_len
    keys = IkeKeys(_one(m, 7, plen), _one(m, 8, ilen), _one(m, 9, ilen), _one(m, 10, elen),
                   _one(m, 11, elen), _one(m, 12, plen), _one(m, 13, plen))  # fmt: skip
    spi_i, spi_r = _one(m, 2, 8), _one(m, 3, 8)
    peer_mid, my_mid = struct.unpack("!II", _one(m, 16, 8))
    flags = _one(m, 19, 2)
    hashes_b = _one(m, 22)
    if len(hashes_b) % 2:
        raise IkeContextError("bad signature hash item")
    ike = IkeSA(
        spi_i, spi_r, bool(_u(m, 4, 1)), conn, [conn], suite,
        local or _unaddr(_one(m, 17)), _unaddr(_one(m, 18)), now, keys,
        _one(m, 14), _one(m, 15), b"", b"", bool(flags[0] & 2), bool(flags[0] & 1),
        IkeState.ESTABLISHED, canonical_peer_id(_one(m, 20).decode(errors="replace")),
    )  # fmt: skip
    ike.peer_next_mid, ike.my_next_mid = peer_mid, my_mid
    ike.fragmentation = bool(flags[1])
    if 24 in m:  # RFC 4555 negotiated (absent from a gateway that predates MOBIKE)
        ike.mobike = bool(_u(m, 24, 1))
    ike.peer_hashes = struct.unpack(f"!{len(hashes_b) // 2}H", hashes_b)
    ike.rekey_at = _at(_one(m, 21, 4), now)
    if 25 in m:  # RFC 6311 extensions (absent from contexts of older versions)
        ext = _u(m, 25, 1)
        ike.mid_sync, ike.replay_sync = bool(ext & 1), bool(ext & 2)
    ike.created = _created(m, 26, now)
    if 27 in m:  # how the peer authenticated (absent from contexts of older versions)
        ike.peer_auth = _unauth(_one(m, 27))
    if 28 in m or 29 in m:  # a certificate peer's names and CA (absent: older, or a PSK)
        ike.peer_names, ike.peer_ca = _unnames(_one(m, 28)), _one(m, 29, 32)
    if 33 in m:  # its chain's serials (absent: older, or a PSK); only with its CA
        if 29 not in m:
            raise IkeContextError("certificate serials without the certificate's CA")
        ike.peer_serials = _unserials(_one(m, 33))
    if 31 in m:  # RFC 4555 roles, the address check, a request in flight (absent: older)
        _mobike_state(ike, _one(m, 31, 1)[0])
    ike.vips = _unvips(m.get(32, []))  # (absent: none, or a context of an older version)
    ike.last_heard = now
    n_responses = _u(m, 23, 2)
    successors: list[list[bytes] | None] = []
    for f, d in parsed:
        if f == FPT_IKE_SA:
            continue
        if (_one(d, 2, 8), _one(d, 3, 8)) != (spi_i, spi_r):
            raise IkeContextError("a CDB of another IKE SA")
        if f == FPT_IKE_CHILD:
            ike.children.append(_child(d, conn, now))
            successors.append(d.get(17))
        elif f != FPT_IKE_RESPONSE:
            raise IkeContextError(f"unexpected CDB 0x{f:04x} among the IKE context")
    _link_successors(ike.children, successors, now)
    if 30 in m:  # DELETEs we owe the peer (absent: none, or a context of an older version)
        ike.queued_deletes = _owed(_one(m, 30), ike.children)
    pieces: dict[tuple[int, int], bytes] = {}
    counts: dict[int, int] = {}
    for f, d in parsed:
        if f == FPT_IKE_RESPONSE:
            i, j, total = struct.unpack("!HHH", _one(d, 4, 6))
            if i >= n_responses or j >= total or counts.setdefault(i, total) != total:
                raise IkeContextError("bad cached response piece")
            pieces[(i, j)] = _one(d, 5)
    for i in range(n_responses):
        total = counts.get(i, 0)
        if total == 0 or any((i, j) not in pieces for j in range(total)):
            raise IkeContextError("cached response incomplete")
        ike.last_response.append(b"".join(pieces[(i, j)] for j in range(total)))
    return ike


# -- the one-pass reader (issue 11, the transfer path) ------------------------------------------
# :func:`decode_reference` looks each item up in a dict of lists and checks it on its own,
# raising where a fault is; :func:`_read` scans each CDB once into a dict of octets, checks
# the same rules inline and says only "no" (None) on any fault, so that the reference names
# it. The immutable parts (suites, selectors, addresses) are shared by their octets.
_CACHE_MAX = 1024  # entries per cache of shared immutable parts; a full cache starts over
_suites: dict[bytes, Suite] = {}
_selectors: dict[bytes, TrafficSelector] = {}
_addresses: dict[bytes, Address] = {}
_SEL = struct.Struct("!BBHHB")
_MIDS = struct.Struct("!II")
_PIECE = struct.Struct("!HHH")
Scan = tuple[int, dict[int, bytes], dict[int, list[bytes]] | None]


def _scan(cdb: bytes) -> Scan | None:
    """One CDB's (FPT, its items by tag, None or every value of each repeated tag), or None
    where :func:`_parse` raises."""
    n = len(cdb)
    if n < 4 or cdb[2] * 8 != n or cdb[3]:
        return None
    d: dict[int, bytes] = {}
    multi: dict[int, list[bytes]] | None = None
    pos = 4
    while pos < n:
        tag = cdb[pos]
        if tag == 0:
            if cdb.count(0, pos) != n - pos:  # octets after the end of the items
                return None
            break
        if pos + 3 > n:
            return None
        end = pos + 3 + (cdb[pos + 1] << 8 | cdb[pos + 2])
        if end > n:
            return None
        v = cdb[pos + 3 : end]
        if tag in d:
            if multi is None:
                multi = {}
            multi.setdefault(tag, [d[tag]]).append(v)
        else:
            d[tag] = v
        pos = end
    return cdb[0] << 8 | cdb[1], d, multi


_tlv: Any
try:
    if os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"):
        raise ImportError("IPSECCT_PURE_PYTHON is set")
    from . import _tlv  # type: ignore[attr-defined,no-redef]
except ImportError:  # not built (no C compiler): the Python scanner does it
    _tlv = None

NATIVE_SCAN = _tlv is not None
_scan_cdb: Callable[[bytes], Scan | None] = _tlv.scan if NATIVE_SCAN else _scan
"""The scanner :func:`_read` uses: :func:`_scan` in C (``ikev2/_tlv.c``) where built."""


def _shared_suite(b: bytes) -> Suite:
    s = _suites.get(b)
    if s is None:
        s = _unsuite(b)  # (raises on a bad one: _read says no)
        if len(_suites) >= _CACHE_MAX:
            _suites.clear()
        _suites[b] = s
    return s


def _shared_address(b: bytes) -> Address:
    a = _addresses.get(b)
    if a is None:
        a = _unaddr(b)
        if len(_addresses) >= _CACHE_MAX:
            _addresses.clear()
        _addresses[b] = a
    return a


def _selectors_of(b: bytes) -> list[TrafficSelector] | None:
    """:func:`_unts` (at least one selector), each selector shared by its octets; None where
    it raises."""
    out = []
    pos, n = 0, len(b)
    while pos < n:
        if pos + 7 > n:
            return None
        end = pos + 7 + 2 * b[pos + 6]
        if end > n:
            return None
        raw = b[pos:end]
        t = _selectors.get(raw)
        if t is None:
            ttype, proto, sp, ep, alen = _SEL.unpack_from(raw)
            if alen not in (4, 16) or sp > ep:
                return None
            start, stop = raw[7 : 7 + alen], raw[7 + alen :]
            if ttype != (TsType.IPV4_ADDR_RANGE if alen == 4 else TsType.IPV6_ADDR_RANGE) or (
                    start > stop):  # fmt: skip
                return None
            t = TrafficSelector(ttype, proto, sp, ep, ipaddress.ip_address(start),
                                ipaddress.ip_address(stop))  # fmt: skip
            if len(_selectors) >= _CACHE_MAX:
                _selectors.clear()
            _selectors[raw] = t
        out.append(t)
        pos = end
    return out or None


def _read(cdbs: list[bytes], connections: list[Connection], now: float,
          local: Address | None) -> IkeSA | None:  # fmt: skip
    """:func:`decode_reference` in one pass over each CDB, or None where it raises."""
    try:
        return _read_checked(cdbs, connections, now, local)
    except (IkeContextError, ValueError, KeyError, IndexError, TypeError, struct.error):
        return None


def _read_checked(cdbs: list[bytes], connections: list[Connection], now: float,
                  local: Address | None) -> IkeSA | None:  # fmt: skip
    scans: list[Scan] = []
    main: Scan | None = None
    for cdb in cdbs:
        sc = _scan_cdb(cdb if type(cdb) is bytes else bytes(cdb))
        if sc is None:
            return None
        if sc[0] == FPT_IKE_SA:
            if main is not None:
                return None
            main = sc
        else:
            scans.append(sc)
    if main is None:
        return None
    _f, m, multi = main
    vips: list[bytes] = []
    if multi is not None:  # only the virtual IPs (item 32) come more than once
        if len(multi) != 1 or 32 not in multi:
            return None
        vips = multi[32]
    elif 32 in m:
        vips = [m[32]]
    if m[1] != b"\x01":  # VERSION
        return None
    name = m[5].decode(errors="replace")
    for conn in connections:
        if conn.name == name:
            break
    else:
        return None
    suite = _shared_suite(m[6])
    if suite.prf is None or suite.dh is None:
        return None
    plen = _PRF_LEN[PRF_HASH[suite.prf]]
    ilen, elen = suite.integ_key_len, suite.enc_key_len
    keys = IkeKeys(m[7], m[8], m[9], m[10], m[11], m[12], m[13])
    spi_i, spi_r, mids, flags, hashes_b, we_i = m[2], m[3], m[16], m[19], m[22], m[4]
    if (len(keys.sk_d) != plen or len(keys.sk_pi) != plen or len(keys.sk_pr) != plen
            or len(keys.sk_ai) != ilen or len(keys.sk_ar) != ilen or len(keys.sk_ei) != elen
            or len(keys.sk_er) != elen or len(spi_i) != 8 or len(spi_r) != 8 or len(mids) != 8
            or len(flags) != 2 or len(hashes_b) % 2 or len(we_i) != 1):  # fmt: skip
        return None
    peer_id = m[20].decode(errors="replace")
    # canonical_peer_id gives a text not of its 0x-hex form back as it is or as its lower
    # case: a text that is its own lower case is canonical already
    if peer_id[:2] == "0x" or peer_id != peer_id.lower():
        peer_id = canonical_peer_id(peer_id)
    ike = IkeSA(
        spi_i, spi_r, bool(we_i[0]), conn, [conn], suite,
        local or _shared_address(m[17]), _shared_address(m[18]), now, keys,
        m[14], m[15], b"", b"", bool(flags[0] & 2), bool(flags[0] & 1),
        IkeState.ESTABLISHED, peer_id,
    )  # fmt: skip
    ike.peer_next_mid, ike.my_next_mid = _MIDS.unpack(mids)
    ike.fragmentation = bool(flags[1])
    v = m.get(24)
    if v is not None:
        if len(v) != 1:
            return None
        ike.mobike = bool(v[0])
    ike.peer_hashes = struct.unpack(f"!{len(hashes_b) // 2}H", hashes_b)
    v = m[21]
    if len(v) != 4:
        return None
    ike.rekey_at = _at(v, now)
    v = m.get(25)
    if v is not None:
        if len(v) != 1:
            return None
        ike.mid_sync, ike.replay_sync = bool(v[0] & 1), bool(v[0] & 2)
    v = m.get(26)
    if v is not None:
        if len(v) != 4:
            return None
        ike.created = now - int.from_bytes(v, "big") / 1000
    else:
        ike.created = now
    v = m.get(27)
    if v is not None:
        ike.peer_auth = _unauth(v)
    if 28 in m or 29 in m:
        if len(m[29]) != 32:
            return None
        ike.peer_names, ike.peer_ca = _unnames(m[28]), m[29]
    if 33 in m:
        if 29 not in m:
            return None
        ike.peer_serials = _unserials(m[33])
    v = m.get(31)
    if v is not None:
        if len(v) != 1:
            return None
        _mobike_state(ike, v[0])
    ike.vips = _unvips(vips) if vips else []
    ike.last_heard = now
    v = m[23]
    if len(v) != 2:
        return None
    n_responses = v[0] << 8 | v[1]
    successors: list[list[bytes] | None] = []
    responses: list[dict[int, bytes]] = []
    children = ike.children
    for fpt, d, rep in scans:
        if rep is not None or d[2] != spi_i or d[3] != spi_r:
            return None
        if fpt == FPT_IKE_CHILD:
            child = _read_child(d, conn, now)
            if child is None:
                return None
            children.append(child)
            v = d.get(17)
            successors.append(None if v is None else [v])
        elif fpt == FPT_IKE_RESPONSE:
            responses.append(d)
        else:
            return None
    if successors.count(None) != len(successors):
        _link_successors(children, successors, now)
    v = m.get(30)
    if v is not None:
        ike.queued_deletes = _owed(v, children)
    if responses or n_responses:
        pieces: dict[tuple[int, int], bytes] = {}
        counts: dict[int, int] = {}
        for d in responses:
            v = d[4]
            if len(v) != 6:
                return None
            i, j, total = _PIECE.unpack(v)
            if i >= n_responses or j >= total or counts.setdefault(i, total) != total:
                return None
            pieces[(i, j)] = d[5]
        for i in range(n_responses):
            total = counts.get(i, 0)
            if total == 0 or any((i, j) not in pieces for j in range(total)):
                return None
            ike.last_response.append(b"".join([pieces[(i, j)] for j in range(total)]))
    return ike


def _read_child(d: dict[int, bytes], conn: Connection, now: float) -> ChildSA | None:
    """:func:`_child` without a raise (None where it raises)."""
    name = d[5].decode(errors="replace")
    for cc in conn.children:
        if cc.name == name:
            break
    else:
        return None
    suite = _shared_suite(d[6])
    spis, we_i, rekey = d[7], d[12], d[15]
    if len(spis) != 8 or len(we_i) != 1 or len(rekey) != 4:
        return None
    spi_in, spi_out = _MIDS.unpack(spis)
    if spi_in < 256 or spi_out < 256:
        return None
    el, il = suite.enc_key_len, suite.integ_key_len
    keys = ChildKeys(d[8], d[9], d[10], d[11])
    if (len(keys.enc_i) != el or len(keys.integ_i) != il or len(keys.enc_r) != el
            or len(keys.integ_r) != il):  # fmt: skip
        return None
    lts, rts = _selectors_of(d[13]), _selectors_of(d[14])
    if lts is None or rts is None:
        return None
    child = ChildSA(cc, suite, spi_in, spi_out, keys, bool(we_i[0]), lts, rts, now)
    child.rekey_at = _at(rekey, now)
    v = d.get(16)
    if v is not None:
        if len(v) != 4:
            return None
        child.created = now - int.from_bytes(v, "big") / 1000
    else:
        child.created = now
    return child


def _rekeyed(c: ChildSA, ike: IkeSA, now: float) -> bytes:
    """Item 17 of a CHILD SA the peer rekeyed and has yet to delete: the inbound SPI of the
    CHILD SA that replaces it (0: that one is gone already) and how long ago, in ms."""
    s = c.successor
    spi = s.spi_in if s is not None and s in ike.children else 0
    assert c.rekeyed_at is not None
    return struct.pack("!I", spi) + _age(c.rekeyed_at, now)


def _link_successors(children: list[ChildSA], items: list[list[bytes] | None],
                     now: float) -> None:  # fmt: skip
    """Item 17 of each CHILD SA (absent: not rekeyed, or a context of an older version):
    mark it rekeyed by the peer, when, and by which successor. A peer gateway is trusted with
    the keys, not with the shape of the IKE SA: the successor must be another CHILD SA of
    this very context, of the same CHILD configuration (a rekey keeps it), named by no other,
    and the chain of successors must end (no cycle). Else IkeContextError."""
    by_spi = {c.spi_in: c for c in children}
    named: set[int] = set()
    for c, v in zip(children, items, strict=True):
        if v is None:
            continue
        if len(v) != 1 or len(v[0]) != 8:
            raise IkeContextError("item 17 missing or repeated")
        spi, age = struct.unpack("!II", v[0])
        c.rekeyed = True
        c.rekeyed_at = now - age / 1000
        if spi == 0:
            continue
        s = by_spi.get(spi)
        if s is None or s is c or s.config is not c.config:
            raise IkeContextError("a rekeyed CHILD SA's successor is not a CHILD SA of it")
        if spi in named:
            raise IkeContextError("a CHILD SA named the successor of two")
        named.add(spi)
        c.successor = s
    for c in children:  # each is named once at most: a chain longer than the list loops
        s, steps = c.successor, 0
        while s is not None:
            steps += 1
            if steps > len(children):
                raise IkeContextError("rekeyed CHILD SAs succeed each other in a circle")
            s = s.successor


def _mobike_state(ike: IkeSA, bits: int) -> None:
    """Item 31: bit 0, we are RFC 4555's original initiator (the side that announces its own
    moves); bit 1, the peer's address has yet to answer our return-routability check (the
    gateway that takes the IKE SA checks it again, from its own address, before the CHILD
    SAs go there: they stay at the address their SAs carry, the last verified one). Only a
    MOBIKE responder checks; anything else is refused. Bit 2: our next request ID (item 16)
    is that of a request that was in flight, which the peer may have answered (strongSwan
    then cannot answer an RFC 6311 sync under an AEAD IKE SA: the taker probes instead)."""
    if bits & ~7 or (bits & 2 and (not ike.mobike or bits & 1)):
        raise IkeContextError("bad state item")
    ike.orig_initiator = bool(bits & 1)
    ike.rr_due = bool(bits & 2)
    ike.inflight_at_export = bool(bits & 4)


def _vip(name: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """Item 32: ``Len(8) | pool name | address (4 or 16 octets)``."""
    b = name.encode()
    return bytes((len(b),)) + b + addr.packed


def _unvips(items: list[bytes]) -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Items 32: at most one address of each family (a peer asks for one of each), each
    with the name of its pool (printable, at most 64 octets; "": given to us as initiator).
    Whether the pool exists and holds the address is the importing engine's check
    (IkeEngine.vip_refusal)."""
    out: list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
    for b in items:
        n = b[0] if b else 0
        rest = b[1 + n :]
        if not b or n > 64 or len(rest) not in (4, 16):
            raise IkeContextError("bad virtual IP item")
        try:
            name = b[1 : 1 + n].decode()
        except UnicodeDecodeError:
            raise IkeContextError("bad virtual IP item") from None
        a = ipaddress.ip_address(rest)
        if not name.isprintable() or any(x.version == a.version for _, x in out) or (
                a.is_unspecified or a.is_multicast):  # fmt: skip
            raise IkeContextError("bad virtual IP item")
        out.append((name, a))
    return out


def _owed(b: bytes, children: list[ChildSA]) -> list[bytes]:
    """Item 30: the inbound SPIs (4 octets each) of CHILD SAs whose DELETE the old gateway
    sent and had not had answered; the new gateway sends it again. A peer gateway is trusted
    with the keys, not with the IKE SA's shape: a DELETE naming a CHILD SA of this context
    would end, at the peer, an SA this gateway keeps, so none may be one; no reserved SPI,
    none twice, at most MAX_DELETES_OWED. The DELETE goes under this IKE SA only, so it can
    end no other IKE SA's CHILD SA at the peer, and nothing here is removed by it (the SAs
    are gone already). Else IkeContextError."""
    if not b or len(b) % 4 or len(b) > 4 * MAX_DELETES_OWED:
        raise IkeContextError("bad owed DELETE item")
    spis = [struct.unpack_from("!I", b, i)[0] for i in range(0, len(b), 4)]
    live = {c.spi_in for c in children}
    if len(set(spis)) != len(spis) or any(s < 256 or s in live for s in spis):
        raise IkeContextError("an owed DELETE names a CHILD SA of the context, a reserved "
                              "SPI, or one twice")  # fmt: skip
    return [s.to_bytes(4, "big") for s in spis]


def _child(d: dict[int, list[bytes]], conn: Connection, now: float) -> ChildSA:
    name = _one(d, 5).decode(errors="replace")
    cc: ChildConfig | None = next((c for c in conn.children if c.name == name), None)
    if cc is None:
        raise IkeContextError(f"no child {name!r} in connection {conn.name!r} here")
    suite = _unsuite(_one(d, 6))
    spi_in, spi_out = struct.unpack("!II", _one(d, 7, 8))
    if spi_in < 256 or spi_out < 256:
        raise IkeContextError("reserved SPI in the context")
    el, il = suite.enc_key_len, suite.integ_key_len
    keys = ChildKeys(_one(d, 8, el), _one(d, 9, il), _one(d, 10, el), _one(d, 11, il))
    child = ChildSA(cc, suite, spi_in, spi_out, keys, bool(_u(d, 12, 1)), _unts(_one(d, 13)),
                    _unts(_one(d, 14)), now)  # fmt: skip
    child.rekey_at = _at(_one(d, 15, 4), now)
    child.created = _created(d, 16, now)
    return child

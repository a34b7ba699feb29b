"""IKEv2 connections as a strongSwan user writes them, in TOML with swanctl.conf's key names::

    [connections.home]
    version = 2
    local_addrs = ["192.0.2.1"]
    remote_addrs = ["%any"]
    proposals = ["aes128gcm16-prfsha256-x25519"]
    local.auth = "psk"
    local.id = "gw.example"
    remote.auth = "psk"
    remote.id = "%any"
    encap = true
    dpd_delay = 30
    children.net.local_ts = ["10.1.0.0/16"]
    children.net.remote_ts = ["10.2.0.0/24"]
    children.net.esp_proposals = ["aes128gcm16"]

    [secrets.ike-home]
    id = "gw.example"
    file = "home.psk"          # or env = "HOME_PSK"; never the secret itself

    [secrets.ike-alice]        # a key of its own for one client (chosen at IKE_AUTH)
    id-1 = "gw.example"
    id-2 = "alice@example"
    file = "alice.psk"

Parsing is pure: the caller reads secret files (it knows the paths) and passes them in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import ConfigError, IdentityError, IpsecctError
from ..ipsec.replay import MAX_WINDOW
from .auth import (
    REVOCATION_POLICIES,
    Credentials,
    PrivateKey,
    RevocationList,
    ascii_lower,
    cert_names,
    id_matches_cert,
    not_a_ca,
    subject_of,
)
from .message import IDPayload, IdType, ProtocolId, TrafficSelector
from .pool import Pool, parse_range
from .proposal import Offer, parse_list
from .ts import from_text

log = logging.getLogger(__name__)

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ChildConfig:
    name: str
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    esp_proposals: list[Offer]
    rekey_time: float | None = 3600.0
    life_time: float | None = None
    start_action: str = "none"
    mode: str = "tunnel"
    # what follows the peer's death (None: not set: a start_action = start child restarts,
    # as before these keys; any other is cleared), and the peer's DELETE of the IKE SA
    dpd_action: str | None = None  # "clear" | "trap" | "restart"
    close_action: str = "none"  # "none" | "trap" | "start"
    # volume limits of each of the CHILD SA's ESP SAs (0: none): rekeyed at rekey_*,
    # closed at life_* (the SAD's soft and hard lifetimes)
    rekey_bytes: int = 0
    rekey_packets: int = 0
    life_bytes: int = 0
    life_packets: int = 0
    # the anti-replay window of its inbound ESP SAs (packets; 0: none), as a manual tunnel's
    replay_window: int = 64


# how well an identity (a secret's id, a remote.id) names one (strongSwan's id_match_t)
MATCH_NONE, MATCH_ANY, MATCH_WILDCARD, MATCH_PERFECT = 0, 1, 2, 3


# ID types as strongSwan's identification_create_from_string reads them (no IKEv2 type: any)
ID_ANY = 0
# the typed prefixes strongSwan 5.9.8 knows (case-insensitive), and what each reads as here
_PREFIXES: dict[str, int | str] = {
    "ipv4:": IdType.IPV4_ADDR, "ipv6:": IdType.IPV6_ADDR,
    "rfc822:": IdType.RFC822_ADDR, "email:": IdType.RFC822_ADDR,
    "userfqdn:": IdType.RFC822_ADDR, "fqdn:": IdType.FQDN, "dns:": IdType.FQDN,
    "keyid:": IdType.KEY_ID,
    # refused: what to write instead
    "ipv4net:": "a subnet as an identity is not supported here: write one address",
    "ipv6net:": "a subnet as an identity is not supported here: write one address",
    "ipv4range:": "an address range as an identity is not supported here: write one address",
    "ipv6range:": "an address range as an identity is not supported here: write one address",
    "asn1dn:": "write the distinguished name as text (C=CH, O=example, CN=gw), no asn1dn:",
    "asn1gn:": "the ID type DER_ASN1_GN is not supported here: write a name (fqdn:, email:)"
               " or a key id (keyid:)",
    "xmppaddr:": "the ID type DER_ASN1_GN (xmppaddr:) is not supported here: write a name"
                 " (fqdn:, email:) or a key id (keyid:)",
}  # fmt: skip
_ANY_TEXTS = ("", "%any", "%any6", "0.0.0.0", "*", "::", "0::0")
_ADDR_LEN: dict[int, int] = {IdType.IPV4_ADDR: 4, IdType.IPV6_ADDR: 16}


def _hex(text: str, what: str) -> bytes:
    try:
        if len(text) % 2 or not text:
            raise ValueError
        return bytes.fromhex(text)
    except ValueError:
        raise IdentityError(f"{what}: after # come the octets as pairs of hex digits") from None


def _pton(v6: bool, text: str) -> bytes | None:
    """The address as strongSwan's inet_pton reads it (no scope, no leading zeros)."""
    try:
        if v6:
            return None if "%" in text else ipaddress.IPv6Address(text).packed
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        return None


def _parse_identity(text: str) -> tuple[int, bytes]:
    """(ID type or ID_ANY, octets) of an identity written as strongSwan 5.9.8's
    identification_create_from_string reads it (src/libstrongswan/utils/identification.c):
    a typed prefix (``fqdn:``, ``email:``, ``keyid:``, ...; ``#`` then hex: the octets),
    then ``{n}:``, then a DN (any ``=``), then without ``@``: ``%any`` and its spellings, an
    IPv4 address, a name (FQDN), with a ``:`` an IPv6 address or else a KEY_ID; with ``@``:
    ``@#hex`` (KEY_ID), ``@@user@host`` (RFC822, the first two ``@`` dropped), ``@name``
    (FQDN, the ``@`` dropped), else an e-mail address (RFC822). A DN is (DER_ASN1_DN, its
    text); what cannot be honoured raises IdentityError saying what to write instead."""
    low = text.lower()
    for prefix, t in _PREFIXES.items():
        if low.startswith(prefix):
            if isinstance(t, str):
                raise IdentityError(f"{text!r}: {t}")
            rest = text[len(prefix):]
            if t in _ADDR_LEN:
                data = _hex(rest[1:], repr(text)) if rest.startswith("#") else b""
                if len(data) != _ADDR_LEN[t]:
                    raise IdentityError(
                        f"{text!r}: strongSwan takes what follows {prefix} as the octets "
                        f"themselves: write the address without {prefix} (or {prefix}#"
                        f"{'c0000201' if t == IdType.IPV4_ADDR else '2001' + '0' * 27 + '1'})")
                return t, data
            data = _hex(rest[1:], repr(text)) if rest.startswith("#") else rest.encode()
            if not data:
                raise IdentityError(f"{text!r}: an empty identity")
            return t, data
    if re.match(r"\{[^}]*\}:", text):
        raise IdentityError(f"{text!r}: a numbered ID type is not supported here: write a "
                            "typed prefix (fqdn:, email:, keyid:) or the identity itself")
    if "=" in text:
        return IdType.DER_ASN1_DN, text.encode()
    if "@" not in text:
        if text in _ANY_TEXTS:
            return ID_ANY, b""
        v6 = ":" in text
        t = IdType.IPV6_ADDR if v6 else IdType.IPV4_ADDR
        a = _pton(v6, text)
        if a is not None:
            return t, a
        head, sep, tail = text.partition("/")
        if sep and _pton(v6, head) is not None:
            raise IdentityError(f"{text!r}: a subnet as an identity is not supported here: "
                                "write one address")  # fmt: skip
        head, sep, tail = text.partition("-")
        if sep and _pton(v6, head) is not None and _pton(v6, tail) is not None:
            raise IdentityError(f"{text!r}: an address range as an identity is not supported "
                                "here: write one address")  # fmt: skip
        return (IdType.KEY_ID if v6 else IdType.FQDN), text.encode()
    if text.startswith("@#"):
        return IdType.KEY_ID, _hex(text[2:], repr(text))
    if text.startswith("@@"):
        t, data = IdType.RFC822_ADDR, text[2:].encode()
    elif text.startswith("@"):
        t, data = IdType.FQDN, text[1:].encode()
    else:
        t, data = IdType.RFC822_ADDR, text.encode()
    if not data:
        raise IdentityError(f"{text!r}: an empty identity")
    return t, data


def _fold(t: int, data: bytes) -> bytes:
    """The octets as compared: names and e-mail addresses case-insensitively (strongSwan's
    equals_strcasecmp: ASCII letters only, as strncasecmp in the C locale)."""
    return data.lower() if t in (IdType.FQDN, IdType.RFC822_ADDR) else data


def id_key(p: IDPayload) -> tuple[int, bytes]:
    """An ID payload's identity as compared: (ID type, octets, a name's letters folded)."""
    return p.id_type, _fold(p.id_type, p.data)


def peer_id_text(p: IDPayload) -> str:
    """The text an identity is kept by (an IKE SA's peer_id: its unique, its leases, what a
    transfer carries): one text for every spelling charon takes for one identity (a name or
    e-mail address in any case: lower case)."""
    return IDPayload(p.initiator, p.id_type, _fold(p.id_type, p.data)).text()


@dataclass
class Identity:
    """An IKE identity from its text, as swanctl.conf writes it (``gw.example``,
    ``@gw.example``, ``fqdn:gw.example``, ``alice@example``, ``@@alice@example``,
    ``192.0.2.1``, ``@#0a0b``, ``keyid:#0a0b``, ``C=CH, CN=gw``, ``%any``, ``*``; see
    _parse_identity). Raises IdentityError for a form this gateway cannot honour."""

    text: str
    kind: int = field(init=False, repr=False, compare=False)  # ID type, or ID_ANY
    octets: bytes = field(init=False, repr=False, compare=False)
    # a DN's (OID, value) pairs (parse_dn), read once here, not at every IKE_AUTH; None for
    # any other identity and for a DN's text strongSwan would not read (it names no one)
    dn: tuple[tuple[str, str], ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kind, self.octets = _parse_identity(self.text)
        self.dn = None
        if self.kind == IdType.DER_ASN1_DN:
            with contextlib.suppress(IdentityError):
                self.dn = parse_dn(self.text)

    @property
    def any(self) -> bool:
        """Anyone: as strongSwan reads an identity (ID_ANY), "", %any, %any6, 0.0.0.0, *,
        :: and 0::0."""
        return self.kind == ID_ANY

    @property
    def is_dn(self) -> bool:
        return self.kind == IdType.DER_ASN1_DN

    @property
    def wildcard(self) -> bool:
        """A name or e-mail address with strongSwan's leading ``*`` (``*.example.org``,
        ``*@example.org``): it names every one ending so."""
        if self.kind == IdType.DER_ASN1_DN:  # (a DN with a value ``*``: CN=*)
            return self.dn is not None and any(v == "*" for _, v in self.dn)
        return (self.kind in (IdType.FQDN, IdType.RFC822_ADDR)
                and self.octets.startswith(b"*") and len(self.octets) > 1)  # fmt: skip

    @property
    def key(self) -> tuple[int, bytes]:
        """(ID type, octets) as compared (id_key)."""
        return self.kind, _fold(self.kind, self.octets)

    def payload(self, initiator: bool) -> IDPayload:
        if self.any or self.is_dn:  # (never sent: %any is our address, a DN our subject's)
            return IDPayload(initiator, IdType.FQDN, self.text.encode())
        return IDPayload(initiator, self.kind, self.octets)

    def match(self, p: IDPayload) -> int:
        """How well this identity (a remote.id, a secret's id) names the peer's ``p``, as
        strongSwan's matches: MATCH_ANY (%any), MATCH_PERFECT (equal, a name's case
        aside), MATCH_WILDCARD (``*`` then an ending the name has, at least one character
        before it), else MATCH_NONE. A DN: MATCH_NONE (proven by a certificate: matches)."""
        if self.any:
            return MATCH_ANY
        if self.is_dn:
            return MATCH_NONE
        t, mine = self.key
        if p.id_type != t:
            return MATCH_NONE
        theirs = _fold(t, p.data)
        if theirs == mine:
            return MATCH_PERFECT
        if self.wildcard and len(theirs) >= len(mine) and theirs.endswith(mine[1:]):
            return MATCH_WILDCARD
        return MATCH_NONE

    def matches(self, p: IDPayload, cert: x509.Certificate | None = None) -> bool:
        """Does the peer's ID payload (proven by ``cert`` for a DN) name this identity?"""
        if self.any:
            return True
        if self.is_dn:  # a distinguished name, compared attribute by attribute
            if cert is None or p.id_type != IdType.DER_ASN1_DN:
                return False
            if self.dn is None:  # (a text not read at a load: names no one)
                return False
            from .auth import BAD_CERT

            try:  # (the parser reads a certificate's subject only when asked)
                return dn_matches(self.dn, cert.subject)
            except BAD_CERT:
                return False
        if cert is not None and p.id_type == IdType.DER_ASN1_DN:
            # the peer names itself by its DN; the name we want is among its certificate's
            # subjectAltNames
            from .auth import id_matches_cert

            return id_matches_cert(self.payload(p.initiator), cert)
        return self.match(p) != MATCH_NONE


def says_what_it_is(p: IDPayload) -> bool:
    """Does the ID payload's text (how an identity is kept, compared and given a lease: an
    IKE SA's peer_id, peer_id_text) name it and no identity of another type? An e-mail
    address sent as an FQDN, an address or a DN's text sent as an FQDN, an empty or
    ``%any`` name (in any case), a name that reads as a typed prefix (``fqdn:``) or an
    ``@`` form would be taken for that other identity (a DN is not: it is named by its
    certificate's subject). A name that is not printable is shown, kept and compared as
    ``0x`` and its octets in hex: an FQDN so (its text cannot be another's), never a
    printable name that reads as such a hex form. A KEY_ID is ``@#`` and its octets in hex
    (what reads as it)."""
    if p.id_type == IdType.DER_ASN1_DN:
        return False
    text = peer_id_text(p)
    if text == "0x" + _fold(p.id_type, p.data).hex():
        return p.id_type == IdType.FQDN
    if re.fullmatch("0x[0-9a-f]*", text):
        return False
    try:
        ident = Identity(text)
    except IdentityError:
        return False
    return not ident.any and not ident.is_dn and ident.key == id_key(p)


def canonical_peer_id(text: str) -> str:
    """A peer identity's text from another gateway (a context, a UNIT payload; one of an
    older version kept a name's case) as this one keeps it (peer_id_text): a name or an
    e-mail address, written plainly, in lower case (a name that is not printable, kept in
    hex: its octets so); any other text as it is."""
    if re.fullmatch("0x(?:[0-9a-f]{2})+", text):  # (only an FQDN is kept so: says_what_it_is)
        folded = peer_id_text(IDPayload(True, IdType.FQDN, bytes.fromhex(text[2:])))
        return folded if folded.startswith("0x") else text
    try:
        ident = Identity(text)
    except IdentityError:
        return text
    if ident.kind in (IdType.FQDN, IdType.RFC822_ADDR) and ident.octets == text.encode():
        p = ident.payload(True)
        folded = peer_id_text(p)
        if says_what_it_is(p) and folded == text.lower():  # (not printable: as it came)
            return folded
    return text


# the attribute names of a DN's text, as strongSwan 5.9.8 reads them (identification.c's
# x501rdns, in any case), and their OIDs
_DN_ATTRS = {name.lower(): oid for name, oid in (
    ("UID", "0.9.2342.19200300.100.1.1"), ("DC", "0.9.2342.19200300.100.1.25"),
    ("CN", "2.5.4.3"), ("SN", "2.5.4.4"), ("serialNumber", "2.5.4.5"), ("C", "2.5.4.6"),
    ("L", "2.5.4.7"), ("ST", "2.5.4.8"), ("STREET", "2.5.4.9"), ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"), ("organizationIdentifier", "2.5.4.97"), ("T", "2.5.4.12"),
    ("D", "2.5.4.13"), ("postalAddress", "2.5.4.16"), ("postalCode", "2.5.4.17"),
    ("N", "2.5.4.41"), ("G", "2.5.4.42"), ("I", "2.5.4.43"), ("dnQualifier", "2.5.4.46"),
    ("dmdName", "2.5.4.54"), ("pseudonym", "2.5.4.65"), ("ID", "2.5.4.45"),
    ("EN", "2.16.840.1.113730.3.1.3"), ("employeeNumber", "2.16.840.1.113730.3.1.3"),
    ("E", "1.2.840.113549.1.9.1"), ("Email", "1.2.840.113549.1.9.1"),
    ("emailAddress", "1.2.840.113549.1.9.1"), ("UN", "1.2.840.113549.1.9.2"),
    ("unstructuredName", "1.2.840.113549.1.9.2"), ("UA", "1.2.840.113549.1.9.8"),
    ("unstructuredAddress", "1.2.840.113549.1.9.8"))}
_DN_MAX_RDNS = 20  # (strongSwan's RDN_MAX)


def parse_dn(text: str) -> tuple[tuple[str, str], ...]:
    """A DN's text as strongSwan 5.9.8's atodn reads it: ``TYPE=value`` attributes in the
    order written (the certificate's order: ``C=CH, O=Org, CN=gw``), separated by ``,``, or
    by ``/`` when the text starts with one (``/C=CH/O=Org/CN=gw``); spaces around a type and
    after a value do not count; no escapes (a value cannot hold the separator). Returns
    (OID, value) pairs; raises IdentityError for an attribute type strongSwan does not know,
    an empty attribute, or more than 20 of them."""
    body = text.lstrip(" ")
    sep = "/" if body.startswith("/") else ","
    parts = body[1:].split(sep) if sep == "/" else body.split(sep)
    if parts and not parts[-1].strip(" "):  # (a separator at the end ends the text)
        parts.pop()
    out: list[tuple[str, str]] = []
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip(" ")
        oid = _DN_ATTRS.get(name.lower())
        if not eq or oid is None:
            raise IdentityError(
                f"{text!r}: {name or part.strip(' ')!r} is not an attribute type of a "
                "distinguished name (C, ST, L, O, OU, CN, E, DC, UID, serialNumber, ...)")
        out.append((oid, value.lstrip(" =").rstrip(" ")))
    if not out or len(out) > _DN_MAX_RDNS:
        raise IdentityError(f"{text!r}: a distinguished name of 1 to {_DN_MAX_RDNS} attributes")
    return tuple(out)


def _dn_attrs(name: x509.Name) -> list[tuple[str, str | bytes]]:
    """A certificate's name as (OID, value) pairs in its order (the attributes of a
    multi-valued RDN in the order they came)."""
    return [(a.oid.dotted_string, a.value) for rdn in name.rdns for a in rdn]


def dn_matches(pattern: Sequence[tuple[str, str]], name: x509.Name) -> bool:
    """Does a DN written in a configuration (parse_dn) name the certificate subject
    ``name``? As strongSwan 5.9.8 compares them (identification.c's compare_dn, its default
    strict matching): attribute by attribute in order, the same types, a value ``*`` takes
    any value, the others equal in any case of their ASCII letters (X.520's caseIgnoreMatch;
    strongSwan ignores the case of printable strings and e-mail addresses, with strncasecmp:
    ASCII letters only, never two texts of different lengths). Not Unicode's case folding:
    it makes other names equal (``\ufb01nance`` and ``finance``, ``stra\u00dfe`` and
    ``STRASSE``, the Kelvin sign and ``k``), which a CA telling its subjects apart by their
    octets issues to two clients. The text may also be written in the reverse order (RFC
    4514's, as ``openssl x509 -nameopt RFC2253`` prints it): that is one unambiguous
    spelling of the same sequence."""
    attrs = _dn_attrs(name)

    def same(p: Sequence[tuple[str, str]]) -> bool:
        return len(p) == len(attrs) and all(
            po == ao and (pv == "*" or (isinstance(av, str)
                                        and ascii_lower(pv) == ascii_lower(av)))
            for (po, pv), (ao, av) in zip(p, attrs, strict=True))  # fmt: skip

    return same(pattern) or same(tuple(reversed(pattern)))


@dataclass(frozen=True)
class SharedKey:
    """One ``[secrets.ike-NAME]``: the identities it belongs to (``id``, ``id-1``, ...; none,
    or ``%any``: anyone; ``*@example.org``, ``*.example.org``: any e-mail address or name
    ending so) and its pre-shared key, never shown."""

    name: str
    ids: tuple[str, ...]
    key: bytes = field(repr=False)
    # the ids as compared at IKE_AUTH: (ID type, octets, a name's case folded) named
    # exactly; the wildcards (Identity); whether the secret is anyone's
    _exact: frozenset[tuple[int, bytes]] = field(init=False, repr=False, compare=False)
    _wild: tuple[Identity, ...] = field(init=False, repr=False, compare=False)
    _anyone: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Raises IdentityError for an id this gateway cannot honour (Identity)."""
        exact: set[tuple[int, bytes]] = set()
        wild: list[Identity] = []
        anyone = not self.ids
        for text in self.ids:
            ident = Identity(text)
            if ident.any:
                anyone = True
            elif ident.is_dn:  # a DN: proven by a certificate, never by a pre-shared key
                continue
            elif ident.wildcard:
                wild.append(ident)
            else:
                exact.add(ident.key)
        object.__setattr__(self, "_exact", frozenset(exact))
        object.__setattr__(self, "_wild", tuple(wild))
        object.__setattr__(self, "_anyone", anyone)

    def match(self, who: IDPayload | None) -> int:
        """How well this secret's ids name ``who`` (None: an identity not known, such as a
        ``remote.id = %any`` to initiate to): MATCH_PERFECT when one of them is it (a name
        or e-mail address in any case), MATCH_WILDCARD when a wildcard takes it, MATCH_ANY
        when the secret is anyone's, else MATCH_NONE."""
        if who is not None:
            if id_key(who) in self._exact:
                return MATCH_PERFECT
            best = max((w.match(who) for w in self._wild), default=MATCH_NONE)
            if best != MATCH_NONE:  # (a wildcard, or the pattern itself: perfect)
                return best
        return MATCH_ANY if self._anyone else MATCH_NONE


def select_psk(keys: Sequence[SharedKey], me: IDPayload | None,
               peer: IDPayload | None) -> SharedKey | None:  # fmt: skip
    """The secret for an IKE SA between ``me`` and ``peer``, as charon picks it: among those
    whose ids name either side (or anyone), the best match of the peer's identity, then of
    ours; the last written of equals (charon keeps its secrets newest first, swanctl loads
    them in the order written, and the first best one found wins: checked against charon
    5.9.8 with two secrets naming one client). None: no secret names either of them."""
    best: SharedKey | None = None
    best_rank = (MATCH_NONE, MATCH_NONE)
    for k in keys:
        rank = (k.match(peer), k.match(me))
        if rank > best_rank or (rank == best_rank and best is not None):
            best, best_rank = k, rank
    return best


@dataclass
class Connection:
    name: str
    local_addrs: list[IPNet]
    remote_addrs: list[IPNet]  # empty: any
    proposals: list[Offer]
    local_auth: str
    local_id: Identity | None  # None: our IP address
    remote_auth: str
    remote_id: Identity
    # the key of a connection made in code (no shared_keys); from a configuration: the one
    # of shared_keys for (local.id, remote.id) when there is one (the initiator's)
    psk: bytes = field(repr=False, default=b"")
    encap: bool = False
    dpd_delay: float = 0.0
    rekey_time: float | None = 14400.0
    children: list[ChildConfig] = field(default_factory=list)
    credentials: Credentials | None = None  # local.auth = pubkey: our certificate and key
    cacerts: list[x509.Certificate] = field(default_factory=list)  # remote.cacerts
    mobike: bool = True  # RFC 4555 offered to a peer that announces it (as responder)
    # swanctl's local_port/remote_port: IKE starts on these (500 by default); any other port
    # is a NAT-T port, with the non-ESP marker from the first message (RFC 7296 §2.23)
    local_port: int = 500
    remote_port: int = 500
    # remote.crls: what the peer's chain is checked against for revocation, read when asked
    # (the adapter re-reads a file that changed); None: no revocation lists
    crls: Callable[[], list[RevocationList]] | None = field(
        default=None, repr=False, compare=False
    )
    # swanctl's pools (as responder: a peer's CFG_REQUEST gets an address from the first of
    # these pools of its address family that has one) and vips (as initiator: "0.0.0.0"
    # and/or "::" ask the peer for an address of that family)
    pools: list[str] = field(default_factory=list)
    vips: list[IPAddr] = field(default_factory=list)
    # swanctl.conf's unique, send_cert, send_certreq, fragmentation, keyingtries
    # (docs/ikev2.md, "swanctl.conf keys"); keyingtries None: not set, tried until it works
    unique: str = "no"  # "no" | "never" | "keep" | "replace"
    send_cert: str = "ifasked"  # "ifasked" | "always" | "never"
    send_certreq: bool = True
    fragmentation: str = "yes"  # "yes" | "accept" | "no" ("force" is IKEv1's: as "yes")
    keyingtries: int | None = None
    # remote.revocation (swanctl.conf): "relaxed" | "ifuri" | "strict" (auth.validate_chain)
    revocation: str = "relaxed"
    ignored: list[str] = field(default_factory=list)  # keys accepted that change nothing
    # every [secrets.ike-*] of the configuration, in its order: the key of an IKE SA is
    # chosen from them by the two identities (psk_for); empty: psk is the key
    shared_keys: tuple[SharedKey, ...] = field(default=(), repr=False, compare=False)

    def psk_for(self, me: IDPayload | None, peer: IDPayload | None) -> bytes | None:
        """The pre-shared key between our identity ``me`` and the peer's (None: not known):
        the best of shared_keys (select_psk), or psk for a connection without them; None:
        there is none."""
        if not self.shared_keys:
            return self.psk or None
        k = select_psk(self.shared_keys, me, peer)
        return k.key if k is not None else None

    def after_down(self, reason: str,
                   we_initiated: bool) -> tuple[str, ChildConfig] | None:  # fmt: skip
        """What follows an IKE SA of this connection that went down for ``reason``: the
        children's dpd_action when the peer was found dead, their close_action when the
        peer deleted it: ("restart" | "trap", the child to start), or None (clear). A
        child without dpd_action restarts when it is started at start (start_action =
        start) and we had initiated it, as before the key was read."""
        actions: list[tuple[str, ChildConfig]] = []
        for c in self.children:
            if reason in ("peer-dead", "mobike-failed"):
                act = c.dpd_action
                if act is None:
                    act = "restart" if c.start_action == "start" and we_initiated else "clear"
            elif reason == "deleted by peer":
                act = {"start": "restart", "trap": "trap"}.get(c.close_action, "clear")
            else:
                act = "clear"
            if act != "clear":
                actions.append((act, c))
        return min(actions, key=lambda a: a[0] != "restart", default=None)

    def accepts(self, local: IPAddr, remote: IPAddr) -> bool:
        def ok(nets: list[IPNet], a: IPAddr) -> bool:
            return not nets or any(a.version == n.version and a in n for n in nets)

        return ok(self.local_addrs, local) and ok(self.remote_addrs, remote)


_CONN_KEYS = {"version", "local_addrs", "remote_addrs", "proposals", "local", "remote", "encap",
              "dpd_delay", "rekey_time", "children", "mobike", "over_time",
              "reauth_time", "local_port", "remote_port", "pools", "vips",
              # swanctl.conf keys of _conn_extras (docs/ikev2.md, "swanctl.conf keys")
              "unique", "send_cert", "send_certreq", "fragmentation", "keyingtries",
              "rand_time", "dpd_timeout", "aggressive", "pull", "if_id_in",
              "if_id_out"}  # fmt: skip
_CHILD_KEYS = {"local_ts", "remote_ts", "esp_proposals", "rekey_time", "life_time",
               "start_action", "mode",
               # those of _child_extras
               "dpd_action", "close_action", "rekey_bytes", "rekey_packets", "life_bytes",
               "life_packets", "rand_time", "rand_bytes", "rand_packets", "updown",
               "replay_window", "hostaccess", "ipcomp", "if_id_in",
               "if_id_out", "mark_in", "mark_out", "mark_in_sa", "set_mark_in",
               "set_mark_out"}  # fmt: skip
_AUTH_KEYS = {"auth", "id", "certs", "cacerts", "crls", "revocation", "round"}

# swanctl.conf's words for the actions (strongSwan 5.9.8 takes each pair as one action)
_DPD_ACTIONS = {"clear": "clear", "none": "clear", "trap": "trap", "route": "trap",
                "restart": "restart", "start": "restart"}  # fmt: skip
_CLOSE_ACTIONS = {"none": "none", "clear": "none", "trap": "trap", "route": "trap",
                  "start": "start", "restart": "start"}  # fmt: skip
# keys of the kernel's XFRM policies and SAs: this gateway's data path is its own
_XFRM_KEYS = ("if_id_in", "if_id_out", "mark_in", "mark_out", "set_mark_in", "set_mark_out")


class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {msg}")

    def keys(self, d: dict[str, Any], where: str, allowed: set[str]) -> None:
        for k in d:
            if k not in allowed:
                raise self.err(where + k, f"unknown key (expected one of: "
                                          f"{', '.join(sorted(allowed))})")  # fmt: skip


def _strings(v: Any, ctx: _Ctx, key: str) -> list[str]:
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ctx.err(key, "must be a string or a list of strings")
    return v


def _addrs(v: Any, ctx: _Ctx, key: str) -> list[IPNet]:
    out: list[IPNet] = []
    for s in _strings(v, ctx, key):
        if s in ("%any", "%any4", "%any6"):
            return []
        try:
            out.append(ipaddress.ip_network(s, strict=False))
        except ValueError:
            raise ctx.err(key, f"bad address {s!r} (an address, a prefix or %any)") from None
    return out


def _seconds(v: Any, ctx: _Ctx, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ctx.err(key, "must be a number of seconds or a string like 30s, 1h")
    if isinstance(v, str):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        t = v.strip().lower()
        mult = units.get(t[-1:])
        try:
            n = float(t[:-1]) * mult if mult else float(t)
        except ValueError:
            raise ctx.err(key, f"bad duration {v!r}") from None
    else:
        try:
            n = float(v)
        except OverflowError:
            n = math.inf
    if not n < math.inf:  # "nan", "inf", 1e400: a timer that never (or always) fires
        raise ctx.err(key, "must be a finite number of seconds")
    if n < 0:
        raise ctx.err(key, "must not be negative")
    if 0 < n < 1:  # a liveness check or rekey every few milliseconds: a storm, not a setting
        raise ctx.err(key, "must be 0 (off) or from 1 s up")
    return n


def _port(v: Any, ctx: _Ctx, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ctx.err(key, "must be a UDP port (1-65535)")
    return v


def _choice(v: Any, ctx: _Ctx, key: str, words: dict[str, str]) -> str:
    if isinstance(v, bool):  # (TOML's true/false for swanctl's yes/no)
        v = "yes" if v else "no"
    if not isinstance(v, str) or v.strip().lower() not in words:
        raise ctx.err(key, f"must be one of: {', '.join(dict.fromkeys(words))}")
    return words[v.strip().lower()]


_YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def _yes(v: Any, ctx: _Ctx, key: str) -> bool:
    return _choice(v, ctx, key, _YES_NO) == "yes"


def _count(v: Any, ctx: _Ctx, key: str) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise ctx.err(key, "must be a whole number from 0")
    return v


def _unset(d: dict[str, Any], ctx: _Ctx, where: str, key: str, why: str) -> None:
    """``key`` may only have its default (off: 0, no, empty, 0/0x00000000): else it is
    refused with ``why`` (what we cannot honour)."""
    v = d.get(key)
    off = v is None or v is False or v == 0 or (
        isinstance(v, str) and v.strip().lower() in ("", "0", "no", "false", "0/0",
                                                     "0/0x00000000", "0x00000000"))  # fmt: skip
    if not off:
        raise ctx.err(where + key, f"{v!r} cannot be honoured: {why}")


def _conn_extras(d: dict[str, Any], ctx: _Ctx, where: str, ignored: list[str]) -> dict[str, Any]:
    """The connection's swanctl.conf keys beyond the basics: what they set on Connection;
    ``ignored`` gets those accepted that change nothing here."""
    out: dict[str, Any] = {}
    if "unique" in d:
        out["unique"] = _choice(d["unique"], ctx, where + "unique",
                                {w: w for w in ("no", "never", "keep", "replace")})  # fmt: skip
    if "send_cert" in d:
        out["send_cert"] = _choice(d["send_cert"], ctx, where + "send_cert",
                                   {w: w for w in ("ifasked", "always", "never")})  # fmt: skip
    if "send_certreq" in d:
        out["send_certreq"] = _yes(d["send_certreq"], ctx, where + "send_certreq")
    if "fragmentation" in d:
        frag = _choice(d["fragmentation"], ctx, where + "fragmentation",
                       {"yes": "yes", "true": "yes", "accept": "accept", "force": "force",
                        "no": "no", "false": "no"})  # fmt: skip
        if frag == "force":  # (the first message of IKEv1 only; as yes in IKEv2)
            ignored.append(where + "fragmentation = force (IKEv1 only: as yes)")
            frag = "yes"
        out["fragmentation"] = frag
    if "keyingtries" in d:
        out["keyingtries"] = _count(d["keyingtries"], ctx, where + "keyingtries")
    if "aggressive" in d and _yes(d["aggressive"], ctx, where + "aggressive"):
        raise ctx.err(where + "aggressive", "IKEv1 Aggressive Mode: this gateway speaks IKEv2 "
                      "only")  # fmt: skip
    if "pull" in d:
        _yes(d["pull"], ctx, where + "pull")
        ignored.append(where + "pull (IKEv1 Mode Config only)")
    if "dpd_timeout" in d:
        _seconds(d["dpd_timeout"], ctx, where + "dpd_timeout")
        ignored.append(where + "dpd_timeout (IKEv1 only: a dead peer is found by the "
                       "retransmissions, 46 s)")  # fmt: skip
    if "rand_time" in d:
        _seconds(d["rand_time"], ctx, where + "rand_time")
        ignored.append(where + "rand_time (rekeys come up to 10 % early at random)")
    if d.get("reauth_time"):
        ignored.append(where + "reauth_time (the IKE SA is rekeyed, not reauthenticated)")
    if "over_time" in d:
        ignored.append(where + "over_time (a failed rekey is retried until the peer is dead)")
    for k in ("if_id_in", "if_id_out"):
        _unset(d, ctx, where, k, "XFRM interface IDs: this gateway's data path is not the "
               "kernel's")  # fmt: skip
    return out


def _child_extras(d: dict[str, Any], ctx: _Ctx, where: str, ignored: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "dpd_action" in d:
        out["dpd_action"] = _choice(d["dpd_action"], ctx, where + "dpd_action", _DPD_ACTIONS)
    if "close_action" in d:
        out["close_action"] = _choice(d["close_action"], ctx, where + "close_action",
                                      _CLOSE_ACTIONS)  # fmt: skip
    for kind in ("bytes", "packets"):
        rekey = _count(d.get(f"rekey_{kind}", 0), ctx, f"{where}rekey_{kind}")
        # swanctl's default: 10 % more than rekey_* (at least one more: not refused below)
        life = (_count(d[f"life_{kind}"], ctx, f"{where}life_{kind}") if f"life_{kind}" in d
                else rekey + max(1, rekey // 10) if rekey else 0)  # fmt: skip
        if rekey and life and life <= rekey:
            raise ctx.err(f"{where}life_{kind}", f"must be more than rekey_{kind} ({rekey})")
        out[f"rekey_{kind}"], out[f"life_{kind}"] = rekey, life
    if "replay_window" in d:
        w = _count(d["replay_window"], ctx, where + "replay_window")
        if w % 32 or w > MAX_WINDOW:
            raise ctx.err(where + "replay_window",
                          f"must be 0 or a multiple of 32 up to {MAX_WINDOW}")  # fmt: skip
        out["replay_window"] = w
    if "rand_time" in d:
        _seconds(d["rand_time"], ctx, where + "rand_time")
        ignored.append(where + "rand_time (rekeys come up to 10 % early at random)")
    for k in ("rand_bytes", "rand_packets"):
        if k in d:
            _count(d[k], ctx, where + k)
            ignored.append(f"{where}{k} (the volume limits are exact)")
    _unset(d, ctx, where, "updown", "no updown script is run here (the gateway installs its "
           "own policies)")  # fmt: skip
    if "hostaccess" in d:
        _yes(d["hostaccess"], ctx, where + "hostaccess")
        ignored.append(where + "hostaccess (read by the updown script only)")
    _unset(d, ctx, where, "ipcomp", "IPComp (RFC 3173) is not implemented")
    _unset(d, ctx, where, "mark_in_sa", "XFRM marks: this gateway's data path is not the "
           "kernel's")  # fmt: skip
    for k in _XFRM_KEYS:
        _unset(d, ctx, where, k, "XFRM marks and interface IDs: this gateway's data path is "
               "not the kernel's")  # fmt: skip
    return out


def _proposals(v: Any, ctx: _Ctx, key: str, proto: int) -> list[Offer]:
    texts = _strings(v, ctx, key)  # (its error names the file and key already)
    try:
        return parse_list(texts, proto)
    except ConfigError as exc:
        raise ctx.err(key, str(exc)) from None


def _ts_list(v: Any, ctx: _Ctx, key: str) -> list[TrafficSelector]:
    texts = _strings(v, ctx, key)
    try:
        return [from_text(s) for s in texts]
    except IpsecctError as exc:
        raise ctx.err(key, str(exc)) from None


ESP = ProtocolId.ESP


_MODES = {
    "transport": "transport mode: this gateway protects whole packets (tunnel mode) only",
    "beet": "BEET mode: this gateway protects whole packets (tunnel mode) only",
    "pass": "shunt policies (pass, drop) are not supported",
    "drop": "shunt policies (pass, drop) are not supported",
}


def _child(name: str, d: Any, ctx: _Ctx, where: str,
           ignored: list[str] | None = None) -> ChildConfig:  # fmt: skip
    if not isinstance(d, dict):
        raise ctx.err(where.rstrip("."), "must be a table")
    ctx.keys(d, where, _CHILD_KEYS)
    mode = d.get("mode", "tunnel")
    if isinstance(mode, str) and mode.strip().lower() in _MODES:
        raise ctx.err(where + "mode", f"{mode!r} cannot be honoured: "
                      f"{_MODES[mode.strip().lower()]}")  # fmt: skip
    if mode != "tunnel":
        raise ctx.err(where + "mode", 'only "tunnel" is supported')
    extras = _child_extras(d, ctx, where, ignored if ignored is not None else [])
    start = d.get("start_action", "none")
    if start not in ("none", "trap", "start"):
        raise ctx.err(where + "start_action", "must be none, trap or start")
    for k in ("local_ts", "remote_ts"):
        if k not in d:
            raise ctx.err(where + k, "missing (this gateway does not use dynamic selectors)")
    rekey = _seconds(d["rekey_time"], ctx, where + "rekey_time") if "rekey_time" in d else 3600.0
    life = _seconds(d["life_time"], ctx, where + "life_time") if "life_time" in d else None
    return ChildConfig(
        name,
        _ts_list(d["local_ts"], ctx, where + "local_ts"),
        _ts_list(d["remote_ts"], ctx, where + "remote_ts"),
        _proposals(d.get("esp_proposals", ["default"]), ctx, where + "esp_proposals", ESP),
        rekey or None,
        life or None,
        start,
        mode,
        **extras,
    )


def _auth(d: Any, ctx: _Ctx, where: str) -> tuple[str, str | None, list[str], list[str]]:
    """(auth, id, certs, cacerts) of ``local`` or ``remote`` (``remote.crls``: _crls)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ctx.err(where.rstrip("."), "must be a table")
    ctx.keys(d, where, _AUTH_KEYS)
    auth = d.get("auth", "psk")
    if auth not in ("psk", "pubkey"):
        raise ctx.err(where + "auth", 'must be "psk" or "pubkey"')
    ident = d.get("id")
    if ident is not None and not isinstance(ident, str):
        raise ctx.err(where + "id", "must be a string")
    if "round" in d:  # (one authentication round: its number orders nothing)
        _count(d["round"], ctx, where + "round")
    certs = _strings(d.get("certs", []), ctx, where + "certs")
    cacerts = _strings(d.get("cacerts", []), ctx, where + "cacerts")
    if where.endswith("local.") and cacerts:
        raise ctx.err(where + "cacerts", "belongs to remote (the CAs we trust for the peer)")
    if where.endswith("local.") and "revocation" in d:
        raise ctx.err(where + "revocation", "belongs to remote (how the peer's chain is "
                      "checked)")  # fmt: skip
    if where.endswith("local.") and "crls" in d:
        raise ctx.err(where + "crls", "belongs to remote (what the peer's chain is checked "
                      "against)")  # fmt: skip
    if where.endswith("remote.") and certs:
        raise ctx.err(where + "certs", "belongs to local (our own certificate)")
    if auth == "pubkey" and where.endswith("local.") and not certs:
        raise ctx.err(where + "certs", "local.auth = pubkey needs our certificate")
    if auth == "pubkey" and where.endswith("remote.") and not cacerts:
        raise ctx.err(where + "cacerts", "remote.auth = pubkey needs the CAs to trust")
    return auth, ident, certs, cacerts


def _warn_not_valid_now(
    path: str,
    where: str,
    chain_of: list[tuple[str, x509.Certificate]],
    cas_of: list[tuple[str, x509.Certificate]],
    now: dt.datetime,
) -> None:
    """Expired or not yet valid at ``now`` (the caller's wall clock): every peer refuses
    our AUTH, or every peer's chain from that CA is refused, and nothing said so until a
    client failed. A warning each; the gateway still starts (a clock may be wrong, a new
    certificate on its way)."""
    for what, f, c in ([("local.certs", f, c) for f, c in chain_of]
                      + [("remote.cacerts", f, c) for f, c in cas_of]):  # fmt: skip
        if now > c.not_valid_after_utc:
            problem = f"{subject_of(c)} expired on {c.not_valid_after_utc:%Y-%m-%d}"
        elif now < c.not_valid_before_utc:
            problem = (f"{subject_of(c)} is valid only from "
                       f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")  # fmt: skip
        else:
            continue
        log.warning("event=ike-certificate-not-valid-now config=%s key=%s%s file=%s "
                    "problem=%s", path, where, what, _quote(f), _quote(problem))  # fmt: skip


def parse_connections(
    data: dict[str, Any], path: str, secrets: Sequence[SharedKey] | Mapping[str, bytes],
    load_certs: Callable[[str], list[x509.Certificate]] | None = None,
    private_keys: list[PrivateKey] | None = None,
    load_crls: Callable[[list[str]], Callable[[], list[RevocationList]]]
    | None = None,
    wall_now: dt.datetime | None = None,
) -> list[Connection]:  # fmt: skip
    """``data`` is the whole configuration; ``secrets`` its ``[secrets.ike-*]`` (or a
    mapping of one identity to its pre-shared key each), already read by the caller, as are
    the ``[secrets.private-*]`` keys; ``load_certs`` reads a certificate file (PEM, one or more
    certificates) named in ``local.certs`` or ``remote.cacerts``; ``load_crls`` gives, for
    the files of ``remote.crls``, what reads their current revocation lists (it raises
    IpsecctError for a file that is not one, at once); ``wall_now``, the caller's reading of
    the wall clock (aware, UTC), is what the certificates' validity is checked against at
    load (a warning each), not checked without it."""
    ctx = _Ctx(path)
    conns = data.get("connections", {})
    if not isinstance(conns, dict):
        raise ctx.err("connections", "must be a table of connections")
    shared = (tuple(SharedKey(i, (i,), k) for i, k in secrets.items())
              if isinstance(secrets, Mapping) else tuple(secrets))  # fmt: skip
    out: list[Connection] = []
    for name, d in conns.items():
        where = f"connections.{name}."
        if not isinstance(d, dict):
            raise ctx.err(where.rstrip("."), "must be a table")
        ctx.keys(d, where, _CONN_KEYS)
        if d.get("version", 2) != 2:
            raise ctx.err(where + "version", "only IKEv2 (version = 2) is supported")
        ignored: list[str] = []
        extras = _conn_extras(d, ctx, where, ignored)
        for side in ("local", "remote"):
            if isinstance(d.get(side), dict) and "round" in d[side]:
                ignored.append(f"{where}{side}.round (one authentication round)")
        # swanctl.conf's yes/no, or TOML's true/false (docs/ikev2.md); yes: its default
        mobike = _yes(d["mobike"], ctx, where + "mobike") if "mobike" in d else True
        la, lid, lcerts, _ = _auth(d.get("local"), ctx, where + "local.")
        ra, rid, _, rcas = _auth(d.get("remote"), ctx, where + "remote.")
        local_id = _identity(lid, ctx, where + "local.id") if lid else None
        remote_id = _identity(rid or "%any", ctx, where + "remote.id")
        if local_id is not None and local_id.wildcard:
            raise ctx.err(where + "local.id", f"{lid!r} is a pattern (remote.id and secrets "
                          "take one): local.id is the one identity we send")  # fmt: skip
        if local_id is not None and local_id.any:  # (charon: our address, as without one)
            local_id = None
        rd = d.get("remote") or {}
        crl_files = _strings(rd.get("crls", []), ctx, where + "remote.crls")
        crls = None
        if crl_files:
            if ra != "pubkey":
                raise ctx.err(where + "remote.crls", "needs remote.auth = pubkey")
            if load_crls is None:
                raise ctx.err(where + "remote.crls", "revocation lists cannot be loaded here")
            try:
                crls = load_crls(crl_files)
            except IpsecctError as exc:
                raise ctx.err(where + "remote.crls", str(exc)) from None
        revocation = _choice(rd.get("revocation", "relaxed"), ctx, where + "remote.revocation",
                             {w: w for w in REVOCATION_POLICIES})  # fmt: skip
        if revocation != "relaxed" and ra != "pubkey":
            raise ctx.err(where + "remote.revocation", "needs remote.auth = pubkey")
        if revocation == "strict" and not crl_files:
            raise ctx.err(where + "remote.revocation", "strict without remote.crls refuses "
                          "every certificate (we fetch no lists)")  # fmt: skip
        creds = None
        cas: list[x509.Certificate] = []
        if lcerts or rcas:
            if load_certs is None:
                raise ctx.err(where.rstrip("."), "certificates cannot be loaded here")
            chain_of: list[tuple[str, x509.Certificate]] = []
            cas_of: list[tuple[str, x509.Certificate]] = []
            for listed_in, files, into in (("local.certs", lcerts, chain_of),
                                           ("remote.cacerts", rcas, cas_of)):  # fmt: skip
                try:  # (an error names the key listing the file, as every other)
                    into += [(f, c) for f in files for c in load_certs(f)]
                except IpsecctError as exc:
                    raise ctx.err(where + listed_in, str(exc)) from None
            chain = [c for _, c in chain_of]
            if wall_now is not None:
                _warn_not_valid_now(path, where, chain_of, cas_of, wall_now)
            for f, c in cas_of:
                why = not_a_ca(c)
                if why is not None:  # it could never anchor a chain (auth._issued_by)
                    raise ctx.err(where + "remote.cacerts", f"{f}: {subject_of(c)} is not a CA "
                                  f"certificate ({why}); as for swanctl, name the CA that "
                                  "issued the peers' certificates")  # fmt: skip
                cas.append(c)
            if chain:
                key = next((k for k in private_keys or [] if _same_key(k, chain[0])), None)
                if key is None:
                    raise ctx.err(where + "local.certs", "no [secrets.private-*] key for the "
                                  f"certificate {chain[0].subject.rfc4514_string()}")  # fmt: skip
                creds = Credentials(tuple(chain), key)
                if local_id is not None and not local_id.is_dn and not id_matches_cert(
                        local_id.payload(False), chain[0]):  # fmt: skip
                    # we would send it as our ID with a certificate that does not prove it:
                    # every peer refuses the authentication (strongSwan finds "no trusted
                    # public key" for it), so no client would ever connect
                    names = ", ".join(cert_names(chain[0])) or "no subjectAltName"
                    raise ctx.err(where + "local.id", f"{lid!r} is not a name of the "
                                  f"certificate {chain[0].subject.rfc4514_string()} "
                                  f"({names}): use one of them, or leave local.id out (the "
                                  "subject DN)")  # fmt: skip
        children_d = d.get("children", {})
        if not isinstance(children_d, dict) or not children_d:
            raise ctx.err(where + "children", "needs at least one child (children.NAME)")
        children = [_child(cn, cd, ctx, f"{where}children.{cn}.", ignored)
                    for cn, cd in children_d.items()]  # fmt: skip
        encap = _yes(d["encap"], ctx, where + "encap") if "encap" in d else False
        # the PSK: as charon, chosen at IKE_AUTH from the secrets whose ids name one of the
        # two identities (SharedKey); the initiator's, for local.id and remote.id, is known now
        psk = b""
        needs_psk = "psk" in (la, ra)
        me = local_id.payload(False) if local_id is not None and not local_id.is_dn else None
        peer = None if remote_id.any or remote_id.is_dn else remote_id.payload(False)
        best = select_psk(shared, me, peer)
        if best is not None:
            psk = best.key
        elif needs_psk and not any(_may_name(k, local_id, remote_id) for k in shared):
            known = ", ".join(sorted({repr(i) for k in shared for i in k.ids or ("%any",)}))
            raise ctx.err(where.rstrip("."),
                          f"no [secrets.ike-*] entry whose id is local.id ({lid or '(unset)'})"
                          f" or remote.id ({rid or '%any'}); the secrets' ids: "
                          f"{known or 'none'}")  # fmt: skip
        initiating = [f"start_action = {c.start_action}" for c in children
                      if c.start_action in ("start", "trap")]  # fmt: skip
        initiating += [f"dpd_action = {c.dpd_action}" for c in children
                       if c.dpd_action in ("restart", "trap")]  # fmt: skip
        initiating += [f"close_action = {c.close_action}" for c in children
                       if c.close_action in ("start", "trap")]  # fmt: skip
        remote_addrs = _addrs(d.get("remote_addrs", "%any"), ctx, where + "remote_addrs")
        if initiating and (len(remote_addrs) != 1
                           or remote_addrs[0].num_addresses != 1):  # fmt: skip
            raise ctx.err(where + "remote_addrs",
                          f"{initiating[0]} needs one peer address")  # fmt: skip
        for what in ignored:
            log.warning("event=config-key-ignored config=%s key=%s", path, _quote(what))
        out.append(Connection(
            name,
            _addrs(d.get("local_addrs", "%any"), ctx, where + "local_addrs"),
            _addrs(d.get("remote_addrs", "%any"), ctx, where + "remote_addrs"),
            _proposals(d.get("proposals", ["default"]), ctx, where + "proposals", ProtocolId.IKE),
            la, local_id, ra, remote_id, psk, encap,
            _seconds(d.get("dpd_delay", 0), ctx, where + "dpd_delay"),
            _seconds(d.get("rekey_time", 14400), ctx, where + "rekey_time") or None,
            children, creds, cas, mobike,
            _port(d.get("local_port", 500), ctx, where + "local_port"),
            _port(d.get("remote_port", 500), ctx, where + "remote_port"),
            crls,
            _pool_names(d.get("pools", []), ctx, where + "pools", data),
            _vips(d.get("vips", []), ctx, where + "vips"),
            **extras, revocation=revocation, ignored=ignored,
            shared_keys=shared if needs_psk else (),
        ))  # fmt: skip
    return out


def _may_name(k: SharedKey, local_id: Identity | None, remote_id: Identity) -> bool:
    """Could secret ``k`` be chosen for an IKE SA of a connection with these identities:
    it is anyone's, or names local.id (or, without one, an address: ours, perhaps), or a
    peer that remote.id admits (any, with %any)?"""
    if remote_id.any or k.match(None) != MATCH_NONE:
        return True
    for ident in (remote_id, local_id):
        if ident is not None and not ident.is_dn and k.match(ident.payload(False)):
            return True
    return local_id is None and any(_is_address(i) for i in k.ids)


def _identity(text: str, ctx: _Ctx, key: str) -> Identity:
    try:
        ident = Identity(text)
        if ident.is_dn and ident.dn is None:
            parse_dn(text)  # (a DN strongSwan would not read either: a load error, saying why)
    except IdentityError as exc:
        raise ctx.err(key, str(exc)) from None
    return ident


def _is_address(text: str) -> bool:
    """Is this id (as strongSwan reads it) an address?"""
    try:
        return Identity(text).kind in _ADDR_LEN
    except IdentityError:
        return False


def _pool_names(v: Any, ctx: _Ctx, key: str, data: dict[str, Any]) -> list[str]:
    names = _strings(v, ctx, key)
    pools = data.get("pools", {})
    for n in names:
        if not isinstance(pools, dict) or n not in pools:
            raise ctx.err(key, f"no [pools.{n}]")
    if len(set(names)) != len(names):
        raise ctx.err(key, "names a pool twice")
    return names


def _vips(v: Any, ctx: _Ctx, key: str) -> list[IPAddr]:
    out: list[IPAddr] = []
    for s in _strings(v, ctx, key):
        try:
            a = ipaddress.ip_address(s)
        except ValueError:
            raise ctx.err(key, f"bad address {s!r}") from None
        if not a.is_unspecified:
            raise ctx.err(key, 'only "0.0.0.0" and "::" (any address the peer gives) are '
                          "supported")  # fmt: skip
        if any(x.version == a.version for x in out):
            raise ctx.err(key, "one address per family")
        out.append(a)
    return out


_POOL_KEYS = {"addrs", "dns", "share"}
MAX_DNS = 4


def parse_pools(data: dict[str, Any], path: str) -> dict[str, Pool]:
    """``[pools.NAME]``: ``addrs`` (a prefix, its network and broadcast addresses left out
    as strongSwan does, or a range ``a-b``), ``dns`` (addresses, at most 4), and ``share``
    (ours: the part of ``addrs`` this gateway leases new addresses from)."""
    ctx = _Ctx(path)
    pools = data.get("pools", {})
    if not isinstance(pools, dict):
        raise ctx.err("pools", "must be a table of pools")
    out: dict[str, Pool] = {}
    for name, d in pools.items():
        where = f"pools.{name}."
        if not isinstance(d, dict):
            raise ctx.err(where.rstrip("."), "must be a table")
        ctx.keys(d, where, _POOL_KEYS)
        if not isinstance(d.get("addrs"), str):
            raise ctx.err(where + "addrs", 'missing (a prefix "10.3.0.0/24" or a range "a-b")')
        try:
            first, last = parse_range(d["addrs"])
            share = parse_range(d["share"]) if isinstance(d.get("share"), str) else None
        except ValueError as exc:
            raise ctx.err(where + ("share" if "share" in d else "addrs"), str(exc)) from None
        if "share" in d and share is None:
            raise ctx.err(where + "share", "must be a prefix or a range a-b")
        dns: list[IPAddr] = []
        for s in _strings(d.get("dns", []), ctx, where + "dns"):
            try:
                dns.append(ipaddress.ip_address(s))
            except ValueError:
                raise ctx.err(where + "dns", f"bad address {s!r}") from None
        if len(dns) > MAX_DNS:
            raise ctx.err(where + "dns", f"at most {MAX_DNS} servers")
        try:
            out[name] = Pool(name, first, last, tuple(dns), share)
        except ConfigError as exc:
            raise ctx.err(where + "addrs", str(exc)) from None
    # Each pool keeps its own leases: two that hold one address each lease it (two clients,
    # one inner address). In order of their first address, each must end before the next.
    ranked = sorted(out.values(), key=lambda p: (p.version, int(p.first)))
    for prev, p in itertools.pairwise(ranked):
        if p.version == prev.version and int(p.first) <= int(prev.last):
            raise ctx.err(f"pools.{p.name}.addrs", f"overlaps the addrs of pool {prev.name!r}"
                          " (each pool would lease the same address)")  # fmt: skip
    return out


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _same_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt))

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

Parsing is pure: the caller reads secret files (it knows the paths) and passes them in.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import ConfigError, IpsecctError
from .auth import Credentials, PrivateKey
from .message import IDPayload, IdType, ProtocolId, TrafficSelector
from .pool import Pool, parse_range
from .proposal import Offer, parse_list
from .ts import from_text

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


@dataclass
class Identity:
    """An IKE identity from its text form (``gw.example``, ``192.0.2.1``, ``a@b``, ``%any``)."""

    text: str

    @property
    def any(self) -> bool:
        return self.text in ("%any", "")

    def payload(self, initiator: bool) -> IDPayload:
        try:
            a = ipaddress.ip_address(self.text)
            t = IdType.IPV4_ADDR if a.version == 4 else IdType.IPV6_ADDR
            return IDPayload(initiator, t, a.packed)
        except ValueError:
            pass
        t = IdType.RFC822_ADDR if "@" in self.text else IdType.FQDN
        return IDPayload(initiator, t, self.text.encode())

    def matches(self, p: IDPayload, cert: x509.Certificate | None = None) -> bool:
        """Does the peer's ID payload (proven by ``cert`` for a DN) name this identity?"""
        if self.any:
            return True
        if "=" in self.text:  # a distinguished name, compared attribute by attribute
            if cert is None or p.id_type != IdType.DER_ASN1_DN:
                return False
            from .auth import BAD_CERT

            try:  # (the parser reads a certificate's subject only when asked)
                return _dn_set(self.text) == _dn_set(cert.subject.rfc4514_string())
            except BAD_CERT:
                return False
        mine = self.payload(p.initiator)
        if cert is not None and p.id_type == IdType.DER_ASN1_DN:
            # the peer names itself by its DN; the name we want is among its certificate's
            # subjectAltNames
            from .auth import id_matches_cert

            return id_matches_cert(mine, cert)
        return (mine.id_type, mine.data) == (p.id_type, p.data)


def _dn_set(text: str) -> set[tuple[str, str]]:
    parts = [x.strip() for x in text.replace(";", ",").split(",") if x.strip()]
    return {(k.strip().upper(), v.strip()) for k, _, v in (x.partition("=") for x in parts)}


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
    crls: Callable[[], list[x509.CertificateRevocationList]] | None = field(
        default=None, repr=False, compare=False
    )
    # swanctl's pools (as responder: a peer's CFG_REQUEST gets an address from the first of
    # these pools of its address family that has one) and vips (as initiator: "0.0.0.0"
    # and/or "::" ask the peer for an address of that family)
    pools: list[str] = field(default_factory=list)
    vips: list[IPAddr] = field(default_factory=list)

    def accepts(self, local: IPAddr, remote: IPAddr) -> bool:
        def ok(nets: list[IPNet], a: IPAddr) -> bool:
            return not nets or any(a.version == n.version and a in n for n in nets)

        return ok(self.local_addrs, local) and ok(self.remote_addrs, remote)


_CONN_KEYS = {"version", "local_addrs", "remote_addrs", "proposals", "local", "remote", "encap",
              "dpd_delay", "rekey_time", "children", "mobike", "over_time",
              "reauth_time", "local_port", "remote_port", "pools", "vips"}  # fmt: skip
_CHILD_KEYS = {"local_ts", "remote_ts", "esp_proposals", "rekey_time", "life_time",
               "start_action", "mode"}  # fmt: skip
_AUTH_KEYS = {"auth", "id", "certs", "cacerts", "crls"}


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


def _proposals(v: Any, ctx: _Ctx, key: str, proto: int) -> list[Offer]:
    try:
        return parse_list(_strings(v, ctx, key), proto)
    except ConfigError as exc:
        raise ctx.err(key, str(exc)) from None


def _ts_list(v: Any, ctx: _Ctx, key: str) -> list[TrafficSelector]:
    try:
        return [from_text(s) for s in _strings(v, ctx, key)]
    except IpsecctError as exc:
        raise ctx.err(key, str(exc)) from None


ESP = ProtocolId.ESP


def _child(name: str, d: Any, ctx: _Ctx, where: str) -> ChildConfig:
    if not isinstance(d, dict):
        raise ctx.err(where.rstrip("."), "must be a table")
    ctx.keys(d, where, _CHILD_KEYS)
    mode = d.get("mode", "tunnel")
    if mode != "tunnel":
        raise ctx.err(where + "mode", 'only "tunnel" is supported')
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
    certs = _strings(d.get("certs", []), ctx, where + "certs")
    cacerts = _strings(d.get("cacerts", []), ctx, where + "cacerts")
    if where.endswith("local.") and cacerts:
        raise ctx.err(where + "cacerts", "belongs to remote (the CAs we trust for the peer)")
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


def parse_connections(
    data: dict[str, Any], path: str, secrets: dict[str, bytes],
    load_certs: Callable[[str], list[x509.Certificate]] | None = None,
    private_keys: list[PrivateKey] | None = None,
    load_crls: Callable[[list[str]], Callable[[], list[x509.CertificateRevocationList]]]
    | None = None,
) -> list[Connection]:  # fmt: skip
    """``data`` is the whole configuration; ``secrets`` maps an identity (as written in
    ``[secrets.ike-*] id``) to its pre-shared key, already read by the caller, as are the
    ``[secrets.private-*]`` keys; ``load_certs`` reads a certificate file (PEM, one or more
    certificates) named in ``local.certs`` or ``remote.cacerts``; ``load_crls`` gives, for
    the files of ``remote.crls``, what reads their current revocation lists (it raises
    IpsecctError for a file that is not one, at once)."""
    ctx = _Ctx(path)
    conns = data.get("connections", {})
    if not isinstance(conns, dict):
        raise ctx.err("connections", "must be a table of connections")
    out: list[Connection] = []
    for name, d in conns.items():
        where = f"connections.{name}."
        if not isinstance(d, dict):
            raise ctx.err(where.rstrip("."), "must be a table")
        ctx.keys(d, where, _CONN_KEYS)
        if d.get("version", 2) != 2:
            raise ctx.err(where + "version", "only IKEv2 (version = 2) is supported")
        mobike = d.get("mobike", True)  # swanctl.conf's default
        if not isinstance(mobike, bool):
            raise ctx.err(where + "mobike", "must be true or false")
        la, lid, lcerts, _ = _auth(d.get("local"), ctx, where + "local.")
        ra, rid, _, rcas = _auth(d.get("remote"), ctx, where + "remote.")
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
        creds = None
        cas: list[x509.Certificate] = []
        if lcerts or rcas:
            if load_certs is None:
                raise ctx.err(where.rstrip("."), "certificates cannot be loaded here")
            try:
                chain = [c for f in lcerts for c in load_certs(f)]
                cas = [c for f in rcas for c in load_certs(f)]
            except IpsecctError as exc:
                raise ctx.err(where.rstrip("."), str(exc)) from None
            if chain:
                key = next((k for k in private_keys or [] if _same_key(k, chain[0])), None)
                if key is None:
                    raise ctx.err(where + "local.certs", "no [secrets.private-*] key for the "
                                  f"certificate {chain[0].subject.rfc4514_string()}")  # fmt: skip
                creds = Credentials(tuple(chain), key)
        children_d = d.get("children", {})
        if not isinstance(children_d, dict) or not children_d:
            raise ctx.err(where + "children", "needs at least one child (children.NAME)")
        children = [_child(cn, cd, ctx, f"{where}children.{cn}.")
                    for cn, cd in children_d.items()]  # fmt: skip
        encap = d.get("encap", False)
        if not isinstance(encap, bool):
            raise ctx.err(where + "encap", "must be true or false")
        local_id = Identity(lid) if lid else None
        remote_id = Identity(rid or "%any")
        # the PSK: strongSwan picks the secret whose ids match the two identities
        psk = b""
        needs_psk = "psk" in (la, ra)
        for ident in [x for x in (rid, lid) if x and x != "%any"]:
            if ident in secrets:
                psk = secrets[ident]
                break
        if not psk and len(secrets) == 1 and "%any" in secrets:
            psk = secrets["%any"]
        if not psk and needs_psk:
            raise ctx.err(where.rstrip("."),
                          "no [secrets.ike-*] entry whose id is local.id or remote.id")
        initiating = [c.start_action for c in children if c.start_action in ("start", "trap")]
        remote_addrs = _addrs(d.get("remote_addrs", "%any"), ctx, where + "remote_addrs")
        if initiating and (len(remote_addrs) != 1
                           or remote_addrs[0].num_addresses != 1):  # fmt: skip
            raise ctx.err(where + "remote_addrs",
                          f"start_action = {initiating[0]} needs one peer address")  # fmt: skip
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
        ))  # fmt: skip
    return out


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
    return out


def _same_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt))

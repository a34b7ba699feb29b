"""Configuration files of gateways and mobile nodes (TOML, read with :mod:`tomllib`).

Every problem is reported as a :class:`~ipsecct.errors.ConfigError` naming the file, the key
and what is wrong. Keys never appear in the configuration itself: each tunnel names a key file
(``keys = "path"``, TOML with ``in_enc``, ``in_integ``, ``out_enc``, ``out_integ`` as hex) or an
environment variable holding the same text (``keys_env = "NAME"``). See ``examples/``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import errno
import hashlib
import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..ct.context import MAX_DURATION_MS
from ..ct.failover import FailoverConfig
from ..ct.transfer import PREPARE_MAX, PREPARE_MIN, ConflictPolicy, Identity, Settings
from ..errors import ConfigError, EtcdError, IpsecctError
from ..ikev2.auth import PrivateKey, RevocationList, revocation_index
from ..ikev2.config import Connection, SharedKey, parse_connections, parse_pools
from ..ikev2.config import Identity as IkeIdentity
from ..ikev2.pool import Pool
from ..ipsec import relay as relay_mod
from ..ipsec.algorithms import (
    ENC,
    ENC_NAMES,
    INTEG,
    INTEG_NAMES,
    EncAlg,
    IntegAlg,
    enc_from_name,
    enc_name,
    integ_from_name,
    integ_name,
)
from ..ipsec.ippacket import Endpoint, IPAddress
from ..ipsec.sad import Direction, Lifetime, Mode, SecurityAssociation, UdpEncap
from ..ipsec.spd import Action, AddressRange, PortRange, Selectors, SPDEntry
from ..ipsec.spi import MAX_BLOCKS as MAX_SPI_BLOCKS
from ..ipsec.spi import SpiBlock
from ..ipsec.spi import block as spi_block_of
from ..tools.files import CONFIG_LIMIT, SECRET_LIMIT, check_size, read_limited
from . import sched
from .log import LOG_LEVELS
from .sched import DEFAULT as DEFAULT_THREAD_PRIORITY
from .sched import ThreadPriority

if TYPE_CHECKING:
    from cryptography import x509

CRL_LIMIT = 16 << 20  # octets of one revocation list file (a large CA's CRL: a few MB)

DEFAULT_PORT = 4500
DEFAULT_CXTP_PORT = 5091  # RFC 4067's port (CXTP over TLS here: no SCTP)


@dataclass
class InnerConfig:
    kind: str = "udp"  # "udp" (virtual link on loopback) or "tun"
    listen: Endpoint | None = None
    peer: Endpoint | None = None
    tun_name: str = "ipsecct0"
    tun_addresses: list[str] = field(default_factory=list)
    tun_mtu: int = 1400
    routes: list[str] = field(default_factory=list)


@dataclass
class TunnelConfig:
    name: str
    policy: SPDEntry
    outbound: SecurityAssociation
    inbound: SecurityAssociation
    peer: Endpoint


@dataclass(frozen=True)
class PeerConfig:
    """A peer gateway (``[[peers]]``): its name (as in its certificate), its ``[transfer]``
    listen address, its outer address (CTARs name routers by it) and what it may do."""

    name: str
    address: Endpoint
    outer: IPAddress | None
    allow: frozenset[str]
    # ``pair``: the peer this one forms a fail-over pair with (either may ask this gateway,
    # with a decision query, about the other's transfers: docs/security.md)
    pair: str | None = None
    # ``outer_port``: the peer's outer (NAT-T) UDP port; with ``outer``, a tunnel moved to it
    # relays the MN's ESP that still reaches us there unchanged (ipsec/relay.py), from the
    # forwarding thread, instead of forwarding it over the channel. None: not relayed.
    outer_port: int | None = None


@dataclass(frozen=True)
class BalanceConfig:
    """Load balancing by the gateway itself (``[transfer.balance]``): above ``above`` active
    tunnels, move the excess (at most ``batch`` a round, every ``interval`` seconds) to ``to``
    in one exchange."""

    above: int
    to: str
    batch: int = 1000
    interval: float = 1.0


@dataclass
class TransferConfig:
    """``[transfer]`` and its ``[[peers]]``: context transfer over TLS between gateways."""

    listen: Endpoint
    cert: str
    key: str
    ca: str
    settings: Settings
    peers: dict[str, PeerConfig]
    candidates: list[str] = field(default_factory=list)
    balance: BalanceConfig | None = None
    # ``relay_max_rate``: datagrams a second all relays of moved tunnels send together
    # (ipsec/relay.py; each tunnel's own is 20,000)
    relay_max_rate: float = relay_mod.RATE_ALL


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: this gateway's block of the SPI space (ipsecct.ipsec.spi)."""

    spi_block: int | None = None  # fixed per gateway (pair mode)
    spi_blocks: int = 16
    # etcd mode: endpoints, cluster name, member lease TTL (whole seconds, etcd's unit)
    etcd: tuple[str, ...] = ()
    name: str = "default"
    ttl_s: int = 2
    drift_ppm: float = 1000.0
    guard_ms: float = 50.0
    groups: int = 32  # home groups per member: one owner key each (ct/ownership.py)
    replicas: int = 2  # peers each tunnel is replicated to (its takers); 0: every peer

    def block(self) -> SpiBlock | None:
        return None if self.spi_block is None else spi_block_of(self.spi_block, self.spi_blocks)


@dataclass
class NodeConfig:
    path: str
    name: str
    outer: Endpoint
    raw_esp: bool
    inner: InnerConfig
    control_socket: str | None
    metrics: Endpoint | None
    log_level: str
    policies: list[SPDEntry]
    tunnels: list[TunnelConfig]
    transfer: TransferConfig | None = None  # [transfer] and [[peers]]
    failover: FailoverConfig | None = None  # [failover] (needs [transfer]: its channel)
    # A virtual gateway address (indirect SG identity, draft §7.1): the SAs' local address,
    # owned by whichever gateway serves them; the node still sends from ``outer``.
    virtual: IPAddress | None = None
    # Where the virtual address really lives (network namespaces, real links): the gateway
    # adds it to this interface when it takes the SAs and announces it (gratuitous ARP).
    virtual_interface: str | None = None
    virtual_owner: bool = False  # this gateway holds the virtual address at start
    connections: list[Connection] = field(default_factory=list)  # IKEv2 [connections.NAME]
    # [pools.NAME]: virtual IPs the connections' ``pools`` lease (their leases live here)
    pools: dict[str, Pool] = field(default_factory=dict)
    cookie_threshold: int = 100  # [ike]: half-open IKE SAs before cookies are asked (§2.6)
    rsa_pss: bool = False  # [ike]: sign RFC 7427 AUTH with RSASSA-PSS (strongSwan's rsa_pss)
    # [ike] max_packet: the largest IKE message taken, whole or reassembled from fragments
    # (strongSwan's charon.max_packet)
    ike_max_packet: int = 10000
    # [ike] fragment_size: the largest IP datagram of an IKE message or RFC 7383 fragment we
    # send (strongSwan's charon.fragment_size; None: 1200 octets of IKE, about 1230-1250)
    ike_fragment_size: int | None = None
    # [ike] port: IKE's own UDP port (500; 0: none, IKE only on the outer NAT-T port, which
    # needs no privileges; the connections then use local_port/remote_port)
    ike_port: int = 500
    cluster: ClusterConfig | None = None  # [cluster]
    # Durable state (gateway/state.py): the directory (None: the default for this user and
    # node name) and how many sequence numbers one reservation covers.
    state_dir: str | None = None
    seq_block: int = 1 << 16
    # How long the ids of transfers that arrived here are kept for the decision query
    # (seconds; docs/state.md, "how long an arrival is remembered").
    arrival_retention: float = 86400.0
    # [native] thread_priority: how the native forwarding thread is scheduled (gateway/sched.py)
    thread_priority: ThreadPriority = DEFAULT_THREAD_PRIORITY

    @property
    def local_address(self) -> IPAddress:
        return self.virtual if self.virtual is not None else self.outer.host


class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {msg}")

    def get(
        self,
        d: dict[str, Any],
        key: str,
        where: str,
        typ: type | tuple[type, ...],
        default: Any = ...,
    ) -> Any:
        if key not in d:
            if default is ...:
                raise self.err(f"{where}{key}", "missing")
            return default
        v = d[key]
        if (typ is int and isinstance(v, bool)) or not isinstance(v, typ):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise self.err(f"{where}{key}", f"must be {names}, not {type(v).__name__}")
        return v


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    t = text.strip()
    host, port = t, default_port
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ValueError("unclosed [")
        host = t[1:end]
        rest = t[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected :port")
            port = int(rest[1:])
    elif t.count(":") == 1:
        host, p = t.split(":")
        port = int(p)
    if port is None:
        raise ValueError("needs a port")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return Endpoint(ipaddress.ip_address(host), port)


def _check_keys_allowed(d: dict[str, Any], ctx: _Ctx, where: str, allowed: set[str]) -> None:
    for k in d:
        if k not in allowed:
            raise ctx.err(
                f"{where}{k}", f"unknown key (expected one of: {', '.join(sorted(allowed))})"
            )


def _lifetime(d: Any, ctx: _Ctx, where: str) -> Lifetime:
    if d is None:
        return Lifetime()
    if not isinstance(d, dict):
        raise ctx.err(where, "must be a table")
    _check_keys_allowed(d, ctx, where + ".", {"seconds", "bytes", "packets"})
    secs = ctx.get(d, "seconds", where + ".", (int, float), None)
    nbytes = ctx.get(d, "bytes", where + ".", int, None)
    pkts = ctx.get(d, "packets", where + ".", int, None)
    for k, v in (("seconds", secs), ("bytes", nbytes), ("packets", pkts)):
        if v is not None and v <= 0:
            raise ctx.err(f"{where}.{k}", "must be positive")
    # what a transfer's context can carry (its ms in 42 bits, 139 years); not inf or nan
    if secs is not None and not secs <= MAX_DURATION_MS // 1000:
        raise ctx.err(f"{where}.seconds", f"must be at most {MAX_DURATION_MS // 1000}")
    for k, n in (("bytes", nbytes), ("packets", pkts)):  # (its 64-bit fields)
        if n is not None and n > MAX_COUNT:
            raise ctx.err(f"{where}.{k}", f"must be at most {MAX_COUNT}")
    return Lifetime(float(secs) if secs is not None else None, nbytes, pkts)


MAX_COUNT = (1 << 64) - 1  # a lifetime's bytes or packets, as a context carries them


def _ranges(v: Any, ctx: _Ctx, key: str) -> tuple[AddressRange, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ctx.err(key, "must be an address, prefix or range, or a list of them")
    try:
        return tuple(AddressRange.parse(i) for i in items)
    except IpsecctError as exc:
        raise ctx.err(key, str(exc)) from None


def _protocol(v: Any, ctx: _Ctx, key: str) -> int:
    names = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
    if isinstance(v, str) and v.lower() in names:
        return names[v.lower()]
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255:
        return v
    raise ctx.err(key, f"bad protocol {v!r} (a number 0-255 or one of {', '.join(names)})")


def _ports(v: Any, ctx: _Ctx, key: str) -> PortRange:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ctx.err(key, 'must be a port, a range "a-b" or "any"')
    try:
        return PortRange.parse(v)
    except IpsecctError as exc:
        raise ctx.err(key, str(exc)) from None


def _selectors(
    d: dict[str, Any], ctx: _Ctx, where: str, local_key: str, remote_key: str
) -> Selectors:
    try:
        sel = Selectors(
            _ranges(ctx.get(d, local_key, where, (str, list)), ctx, where + local_key),
            _ranges(ctx.get(d, remote_key, where, (str, list)), ctx, where + remote_key),
            _protocol(d.get("protocol", "any"), ctx, where + "protocol"),
            _ports(d.get("local_port", "any"), ctx, where + "local_port"),
            _ports(d.get("remote_port", "any"), ctx, where + "remote_port"),
        )
    except ConfigError:
        raise
    except IpsecctError as exc:
        raise ctx.err(where.rstrip("."), str(exc)) from None
    local = {r.first.version for r in sel.local}
    remote = {r.first.version for r in sel.remote}
    if not local & remote:  # a packet's source and destination are of one family
        lf, rf = (" and ".join(f"IPv{v}" for v in sorted(vs)) for vs in (local, remote))
        raise ctx.err(where + remote_key, f"{rf} only, and {local_key} {lf} only: no packet"
                      " could match")  # fmt: skip
    return sel


def _hex_key(text: Any, ctx: _Ctx, key: str) -> bytes:
    if not isinstance(text, str):
        raise ctx.err(key, "must be a hex string")
    t = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise ctx.err(key, "is not valid hex") from None  # never echo the value


def warn_if_readable(path: str | Path, what: str) -> bool:
    """Warn (one log line) when a secret file (tunnel keys, a TLS private key) can be read by
    its group or others; returns whether it warned. The file's content is never read here."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if not mode & 0o077:
        return False
    logging.getLogger("ipsecct.gateway.config").warning(
        "event=key-file-readable-by-others file=%s what=%s mode=%o (chmod 600 it)",
        path,
        what.replace(" ", "-"),
        mode & 0o777,
    )
    return True


def load_keys(source: str, *, from_env: bool, ctx: _Ctx, where: str) -> dict[str, bytes]:
    """Read a tunnel's keys from a file or an environment variable (TOML text)."""
    if from_env:
        text = os.environ.get(source)
        if text is None:
            raise ctx.err(where + "keys_env", f"environment variable {source} is not set")
        label = f"${source}"
    else:
        p = Path(source)
        if not p.is_absolute():
            p = Path(ctx.path).parent / p
        try:
            text = _read_secret(p)
        except OSError as exc:
            raise ctx.err(where + "keys", f"cannot read key file {p}: {exc.strerror}") from None
        label = str(p)
        warn_if_readable(p, "tunnel keys")
    try:
        data = parse_toml(text)
    except ValueError as exc:
        raise ctx.err(where + "keys", f"key file {label} is not valid TOML: {exc}") from None
    kctx = _Ctx(label)
    out = {}
    for k, v in data.items():
        if k not in ("in_enc", "in_integ", "out_enc", "out_integ"):
            raise kctx.err(k, "unknown key (expected in_enc, in_integ, out_enc, out_integ)")
        out[k] = _hex_key(v, kctx, k)
    return out


def _check_key_lengths(
    keys: dict[str, bytes], enc: EncAlg, integ: IntegAlg, ctx: _Ctx, where: str, label: str
) -> None:
    """Every key the algorithms need is there and has the right length (the message names the
    key file and the key, never the key's value)."""
    enc_lens = ENC[enc].key_lengths
    for k in ("in_enc", "out_enc"):
        if enc_lens == (0,):
            if keys.get(k):
                raise ctx.err(where, f"{label}: {k}: {enc_name(enc)} takes no key")
            continue
        if k not in keys:
            raise ctx.err(where, f"{label} has no {k}")
        if len(keys[k]) not in enc_lens:
            want = " or ".join(str(n) for n in enc_lens)
            salt = (" (key and 4-octet salt)" if ENC[enc].aead
                    else " (key and 4-octet nonce)" if ENC[enc].seq_iv else "")  # fmt: skip
            raise ctx.err(
                where,
                f"{label}: {k}: {enc_name(enc)} takes a key of {want} octets{salt},"
                f" not {len(keys[k])}",
            )
    if integ is not IntegAlg.NONE:
        want_i = INTEG[integ].key_length
        for k in ("in_integ", "out_integ"):
            if k not in keys:
                raise ctx.err(where, f"{label} has no {k}")
            if len(keys[k]) != want_i:
                raise ctx.err(
                    where,
                    f"{label}: {k}: {integ_name(integ)} takes a key of {want_i} octets,"
                    f" not {len(keys[k])}",
                )


_TUNNEL_KEYS = {
    "name",
    "local_ts",
    "remote_ts",
    "protocol",
    "local_port",
    "remote_port",
    "peer",
    "mode",
    "enc",
    "integ",
    "esn",
    "replay_window",
    "path_mtu",
    "spi_in",
    "spi_out",
    "keys",
    "keys_env",
    "soft_lifetime",
    "seq_out",
    "hard_lifetime",
    "df",
    "copy_dscp",
    "udp_encap",
}


def _spi_of(d: dict[str, Any], key: str, ctx: _Ctx, where: str) -> int:
    """A tunnel's SPI: a TOML integer (0x10000001 or decimal) from 256 to 0xffffffff, the
    key named in every refusal (a quoted "0x10000001" was "must be int, not str", and an
    SPI out of range was named neither by key nor in hex)."""
    v = d.get(key)
    if isinstance(v, str):
        raise ctx.err(f"{where}{key}", f"must be a number without quotes ({key} ="
                      f" {v.strip()} or in decimal), not the string {v!r}")  # fmt: skip
    spi: int = ctx.get(d, key, where, int)
    if not 256 <= spi <= 0xFFFFFFFF:
        shown = f"0x{spi:x}" if spi >= 0 else str(spi)
        raise ctx.err(f"{where}{key}", f"{shown} is no SPI (256 to 0xffffffff; 1-255 are reserved)")
    return spi


def _tunnel(d: Any, i: int, ctx: _Ctx, outer: Endpoint, raw_esp: bool) -> TunnelConfig:
    where = f"tunnel[{i}]."
    if not isinstance(d, dict):
        raise ctx.err(where.rstrip("."), "must be a table")
    _check_keys_allowed(d, ctx, where, _TUNNEL_KEYS)
    name = ctx.get(d, "name", where, str)
    where = f"tunnel[{i}] ({name})."
    sel = _selectors(d, ctx, where, "local_ts", "remote_ts")
    try:
        peer = parse_endpoint(ctx.get(d, "peer", where, str), DEFAULT_PORT)
    except ValueError as exc:
        raise ctx.err(where + "peer", f"bad address: {exc}") from None
    if peer.host.version != outer.host.version:
        raise ctx.err(where + "peer", "address family differs from outer.address")
    if peer.port == 0:  # nothing can be sent to port 0: the tunnel would never carry a packet
        raise ctx.err(where + "peer", "port must be 1-65535")
    mode_s = ctx.get(d, "mode", where, str, "tunnel")
    try:
        mode = Mode(mode_s)
    except ValueError:
        raise ctx.err(where + "mode", 'must be "tunnel" or "transport"') from None
    try:
        enc = enc_from_name(ctx.get(d, "enc", where, str, "aes-gcm-16"))
    except IpsecctError as exc:
        raise ctx.err(where + "enc", str(exc)) from None
    try:
        integ = integ_from_name(ctx.get(d, "integ", where, str, "none"))
    except IpsecctError as exc:
        raise ctx.err(where + "integ", str(exc)) from None
    esn = ctx.get(d, "esn", where, bool, False)
    # The last sequence number already sent on the outbound SA: for taking over an SA that
    # another implementation was using (its peer's replay window has moved that far).
    seq_out = ctx.get(d, "seq_out", where, int, 0)
    if not 0 <= seq_out <= ((1 << 64) - 1 if esn else 0xFFFFFFFF):
        raise ctx.err(where + "seq_out", "must be 0 .. the last number of the sequence space")
    window = ctx.get(d, "replay_window", where, int, 64)
    mtu = ctx.get(d, "path_mtu", where, int, 1500)
    spi_in, spi_out = (_spi_of(d, k, ctx, where) for k in ("spi_in", "spi_out"))
    if "keys" in d and "keys_env" in d:
        raise ctx.err(where + "keys", "give keys or keys_env, not both")
    if "keys" in d:
        source = ctx.get(d, "keys", where, str)
        keys = load_keys(source, from_env=False, ctx=ctx, where=where)
        kwhere, klabel = where + "keys", f"key file {source}"
    elif "keys_env" in d:
        source = ctx.get(d, "keys_env", where, str)
        keys = load_keys(source, from_env=True, ctx=ctx, where=where)
        kwhere, klabel = where + "keys_env", f"${source}"
    else:
        raise ctx.err(where + "keys", "missing (a key file, or keys_env naming a variable)")
    _check_key_lengths(keys, enc, integ, ctx, kwhere, klabel)
    soft = _lifetime(d.get("soft_lifetime"), ctx, where + "soft_lifetime")
    hard = _lifetime(d.get("hard_lifetime"), ctx, where + "hard_lifetime")
    df_s = ctx.get(d, "df", where, str, "copy")
    from ..ipsec.sad import DfPolicy

    try:
        df = DfPolicy(df_s)
    except ValueError:
        raise ctx.err(where + "df", "must be copy, clear or set") from None
    copy_dscp = ctx.get(d, "copy_dscp", where, bool, True)
    use_udp = ctx.get(d, "udp_encap", where, bool, not raw_esp)
    encap = UdpEncap(outer.port, peer.port) if use_udp else None
    common: dict[str, Any] = dict(
        mode=mode,
        enc=enc,
        integ=integ,
        esn=esn,
        replay_window=window,
        path_mtu=mtu,
        soft=soft,
        hard=hard,
        df=df,
        copy_dscp=copy_dscp,
        encap=encap,
        name=name,
    )
    try:
        out = SecurityAssociation(
            spi_out,
            Direction.OUTBOUND,
            outer.host,
            peer.host,
            enc_key=keys.get("out_enc", b""),
            integ_key=keys.get("out_integ", b""),
            selectors=sel,
            seq=seq_out,
            **common,
        )
        inn = SecurityAssociation(
            spi_in,
            Direction.INBOUND,
            peer.host,
            outer.host,
            enc_key=keys.get("in_enc", b""),
            integ_key=keys.get("in_integ", b""),
            selectors=sel,
            **common,
        )
    except IpsecctError as exc:
        raise ctx.err(where.rstrip("."), str(exc)) from None
    policy = SPDEntry(sel, Action.PROTECT, name=name, static=False)
    return TunnelConfig(name, policy, out, inn, peer)


def _policy(d: Any, i: int, ctx: _Ctx) -> SPDEntry:
    where = f"policy[{i}]."
    if not isinstance(d, dict):
        raise ctx.err(where.rstrip("."), "must be a table")
    _check_keys_allowed(
        d,
        ctx,
        where,
        {"name", "local", "remote", "protocol", "local_port", "remote_port", "action"},
    )
    sel = _selectors(d, ctx, where, "local", "remote")
    a = ctx.get(d, "action", where, str)
    try:
        action = Action(a.lower())
    except ValueError:
        raise ctx.err(where + "action", "must be bypass or discard") from None
    if action is Action.PROTECT:
        raise ctx.err(where + "action", "protect policies are made by [[tunnel]] sections")
    return SPDEntry(sel, action, name=ctx.get(d, "name", where, str, ""), static=True)


def _socket_path(value: str, ctx: _Ctx) -> str:
    from .control import socket_path

    if not value:
        raise ctx.err("control.socket", "must not be empty")
    return socket_path(value)


# Strings (multi-line first) and comments, whose dots are no key's: what _key_dots skips.
# Every alternative that starts always matches (an unclosed string runs to its line's end,
# or the text's, a backslash takes what follows if anything), possessively: one pass over
# the text whatever it holds (a pattern that could fail after a long scan was quadratic).
_STRINGS_AND_COMMENTS = re.compile(
    r'"""(?:[^"\\]|\\(?s:.)?|"(?!""))*+(?:"""|\Z)'
    r"|'''(?s:.)*?(?:'''|\Z)"
    r'|"(?:[^"\\\n]|\\.?)*+(?:"|$)'
    r"|'[^'\n]*+(?:'|$)"
    r"|#[^\n]*+",
    re.MULTILINE,
)
MAX_KEY_DOTS = 64  # on one line, outside strings and comments (a key here has a few parts)


def _key_dots(text: str) -> None:
    """ValueError naming the first line with more than MAX_KEY_DOTS dots outside strings and
    comments: tomllib's time is quadratic (or worse) in the parts of one dotted key (a 60 kB
    key took 7 s of CPU; at the 16 MiB limit, hours), and no configuration needs that many."""
    bare = _STRINGS_AND_COMMENTS.sub(lambda m: "\n" * m.group().count("\n"), text)
    if bare.count(".") <= MAX_KEY_DOTS:
        return
    for n, line in enumerate(bare.split("\n"), 1):
        if line.count(".") > MAX_KEY_DOTS:
            raise ValueError(f"line {n}: more than {MAX_KEY_DOTS} dots outside strings (a key of "
                             "that many parts, which no configuration has)")  # fmt: skip


def parse_toml(text: str) -> dict[str, Any]:
    """tomllib's tables of ``text``; ValueError (tomllib's own, or saying why) for anything
    it cannot take without a traceback or in linear time: arrays or inline tables nested past
    the interpreter's recursion limit (RecursionError), integers past CPython's 4300 digits
    (ValueError), keys of thousands of dotted parts (:func:`_key_dots`)."""
    if text.startswith("\ufeff"):  # (tomllib: "Invalid statement (at line 1, column 1)")
        raise ValueError("starts with a byte-order mark (U+FEFF): save the file as UTF-8"
                         " without one")  # fmt: skip
    _key_dots(text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError:
        raise ValueError("a number too long") from None


def _swanctl_hint(text: str, error: str) -> str:
    """What to add to tomllib's error when the line it names is written as in swanctl.conf
    (a strongSwan operator's habit): a value without quotes, or a ``name {`` block."""
    m = re.search(r"\(at line (\d+), column \d+\)", error)
    lines = text.splitlines()
    if m is None or not 0 < int(m.group(1)) <= len(lines):
        return ""
    line = lines[int(m.group(1)) - 1].strip()
    if re.fullmatch(r"[\w.-]+\s*\{.*", line) or line == "}":
        return ("; this is swanctl.conf's syntax: here a block is a TOML table, as"
                " [connections.NAME] and local.auth = \"psk\" (README, IKEv2)")
    if error.startswith("Invalid value") and re.fullmatch(r"[\w.-]+\s*=\s*[A-Za-z%@][^\"'\[{]*",
                                                          line):  # fmt: skip
        return "; TOML quotes a string (key = \"value\"), which swanctl.conf does not"
    return ""


def _read_toml(path: str | Path, digest: list[str] | None = None) -> dict[str, Any]:
    """A configuration file's tables; any file that is not UTF-8 TOML is a ConfigError.
    ``digest``: the SHA-256 of the bytes read is appended to it (what ``status`` shows of
    the file loaded: never its contents)."""
    text = ""
    try:
        raw = read_limited(path, CONFIG_LIMIT)
        if digest is not None:
            digest.append(hashlib.sha256(raw).hexdigest())
        text = raw.decode()
        data = parse_toml(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:  # tomllib decodes before it parses
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}{_swanctl_hint(text, str(exc))}"
                          ) from None
    try:
        _no_nul(data, _Ctx(str(path)), "")
    except RecursionError:  # tables nested that deep by dotted keys: no configuration's
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return data


def _no_nul(v: Any, ctx: _Ctx, key: str) -> None:
    """No string of a configuration holds a NUL (TOML's \\u0000): none is meaningful, and
    the operating system refuses such a file name with a ValueError."""
    if isinstance(v, str) and "\0" in v:
        raise ctx.err(key, "holds a NUL character")
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        _no_nul(x, ctx, f"{key}.{k}" if isinstance(k, str) and key else
                f"{key}[{k}]" if isinstance(k, int) else str(k))  # fmt: skip


def _read_secret(p: Path) -> str:
    """A secret file's text. Its bytes never reach an error: a UnicodeDecodeError would quote
    one of them (and the file's path may hold a NUL, which open() refuses with ValueError)."""
    data = read_limited(p, SECRET_LIMIT)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise OSError(0, "not UTF-8 text (give a binary secret as 0x... hex)") from None


def cluster_of(path: str | Path) -> ClusterConfig:
    """The ``[cluster]`` table of a configuration, reading nothing else (no key file)."""
    data = _read_toml(path)
    c = _cluster(data.get("cluster"), _Ctx(str(path)))
    if c is None or not c.etcd:
        raise ConfigError(f"{path}: cluster.etcd: no etcd endpoints (not in etcd mode)")
    return c


def control_socket_of(path: str | Path) -> str:
    """The control socket a configuration names (the default one if it names none), reading
    nothing else: client commands use it, and they have no business opening key files."""
    from .control import socket_path

    data = _read_toml(path)
    ctx = _Ctx(str(path))
    control = ctx.get(data, "control", "", dict, {})
    sock = ctx.get(control, "socket", "control.", str, None)
    return socket_path(None) if sock is None else _socket_path(sock, ctx)


def load(path: str | Path) -> NodeConfig:
    return load_hashed(path)[0]


def load_hashed(path: str | Path) -> tuple[NodeConfig, str]:
    """The configuration of ``path`` and the SHA-256 (hex) of the very bytes it was read
    from (a reload, SIGHUP, says which file it loaded by this hash)."""
    path = str(path)
    digest: list[str] = []
    data = _read_toml(path, digest)
    return from_dict(data, path), digest[0]


KNOWN_SECTIONS = {
    "name",
    "outer",
    "inner",
    "control",
    "log",
    "policy",
    "tunnel",
    "transfer",
    "peers",
    "failover",
    "connections",
    "pools",
    "secrets",
    "cluster",
    "ike",
    "state",
    "native",
}


def from_dict(data: dict[str, Any], path: str = "<config>") -> NodeConfig:
    ctx = _Ctx(path)
    _check_keys_allowed(data, ctx, "", KNOWN_SECTIONS)
    name = ctx.get(data, "name", "", str)
    outer_d = ctx.get(data, "outer", "", dict)
    _check_keys_allowed(
        outer_d,
        ctx,
        "outer.",
        {"address", "port", "raw_esp", "virtual", "virtual_interface", "virtual_owner"},
    )
    try:
        outer = Endpoint(
            ipaddress.ip_address(ctx.get(outer_d, "address", "outer.", str)),
            ctx.get(outer_d, "port", "outer.", int, DEFAULT_PORT),
        )
    except ValueError as exc:
        raise ctx.err("outer.address", str(exc)) from None
    if not 0 <= outer.port <= 65535:
        raise ctx.err("outer.port", "out of range 0-65535")
    raw_esp = ctx.get(outer_d, "raw_esp", "outer.", bool, False)
    virtual = None
    if "virtual" in outer_d:
        try:
            virtual = ipaddress.ip_address(ctx.get(outer_d, "virtual", "outer.", str))
        except ValueError as exc:
            raise ctx.err("outer.virtual", str(exc)) from None
        if virtual.version != outer.host.version:
            raise ctx.err("outer.virtual", "address family differs from outer.address")
    local = Endpoint(virtual, outer.port) if virtual is not None else outer
    vif = ctx.get(outer_d, "virtual_interface", "outer.", str, None)
    vowner = ctx.get(outer_d, "virtual_owner", "outer.", bool, False)
    if (vif is not None or vowner) and virtual is None:
        raise ctx.err("outer.virtual_interface", "needs outer.virtual")
    inner_d = ctx.get(data, "inner", "", dict, {})
    _check_keys_allowed(
        inner_d, ctx, "inner.", {"kind", "listen", "peer", "name", "addresses", "mtu", "routes"}
    )
    inner = InnerConfig(kind=ctx.get(inner_d, "kind", "inner.", str, "udp"))
    if inner.kind == "udp":
        for k in ("listen", "peer"):
            try:
                setattr(inner, k, parse_endpoint(ctx.get(inner_d, k, "inner.", str)))
            except ValueError as exc:
                raise ctx.err(f"inner.{k}", f"bad address: {exc}") from None
    elif inner.kind == "tun":
        inner.tun_name = ctx.get(inner_d, "name", "inner.", str, "ipsecct0")
        if not 1 <= len(inner.tun_name) <= 15:
            raise ctx.err("inner.name", "interface names are 1-15 characters")
        inner.tun_addresses = ctx.get(inner_d, "addresses", "inner.", list, [])
        inner.tun_mtu = ctx.get(inner_d, "mtu", "inner.", int, 1400)
        if not 68 <= inner.tun_mtu <= 65535:
            raise ctx.err("inner.mtu", "out of range 68-65535")
        inner.routes = ctx.get(inner_d, "routes", "inner.", list, [])
        for key, items in (("addresses", inner.tun_addresses), ("routes", inner.routes)):
            for i, a in enumerate(items):
                if not isinstance(a, str):
                    raise ctx.err(f"inner.{key}[{i}]", "must be a prefix such as 10.1.0.1/24")
                try:
                    ipaddress.ip_network(a, strict=False)
                except ValueError:
                    raise ctx.err(f"inner.{key}[{i}]", f"bad prefix {a!r}") from None
    else:
        raise ctx.err("inner.kind", 'must be "udp" (virtual link) or "tun"')
    control_d = ctx.get(data, "control", "", dict, {})
    _check_keys_allowed(control_d, ctx, "control.", {"socket", "metrics"})
    sock = ctx.get(control_d, "socket", "control.", str, None)
    if sock is not None:
        sock = _socket_path(sock, ctx)
    metrics = None
    if "metrics" in control_d:
        try:
            metrics = parse_endpoint(ctx.get(control_d, "metrics", "control.", str))
        except ValueError as exc:
            raise ctx.err("control.metrics", f"bad address: {exc}") from None
        if not metrics.host.is_loopback:
            raise ctx.err("control.metrics", "metrics are served on a loopback address only")
        if metrics.port == 0:  # the kernel's pick, which no scraper could be told
            raise ctx.err("control.metrics", "port 0 serves on a port nobody can know: name one")
    log_d = ctx.get(data, "log", "", dict, {})
    _check_keys_allowed(log_d, ctx, "log.", {"level"})
    level = ctx.get(log_d, "level", "log.", str, "info").lower()
    if level not in LOG_LEVELS:
        raise ctx.err("log.level", "must be debug, info, warning or error")
    policies = [_policy(p, i, ctx) for i, p in enumerate(ctx.get(data, "policy", "", list, []))]
    tunnels = [
        _tunnel(t, i, ctx, local, raw_esp)
        for i, t in enumerate(ctx.get(data, "tunnel", "", list, []))
    ]
    state_d = ctx.get(data, "state", "", dict, {})
    _check_keys_allowed(state_d, ctx, "state.", {"dir", "seq_block", "arrival_retention_s"})
    state_dir = ctx.get(state_d, "dir", "state.", str, None)
    if state_dir is not None:
        if not state_dir:
            raise ctx.err("state.dir", "must name a directory")
        if not Path(state_dir).is_absolute():
            state_dir = str(Path(path).parent / state_dir)
    seq_block = ctx.get(state_d, "seq_block", "state.", int, 1 << 16)
    if not 2 <= seq_block <= 1 << 32:
        raise ctx.err("state.seq_block", "must be 2 .. 4294967296 sequence numbers")
    retention = ctx.get(state_d, "arrival_retention_s", "state.", int, 86400)
    if not 1 <= retention <= 366 * 86400:
        raise ctx.err("state.arrival_retention_s", "must be 1 .. 31622400 seconds")
    native_d = ctx.get(data, "native", "", dict, {})
    _check_keys_allowed(native_d, ctx, "native.", {"thread_priority"})
    try:
        thread_priority = sched.parse(
            ctx.get(native_d, "thread_priority", "native.", str, str(DEFAULT_THREAD_PRIORITY))
        )
    except ValueError as exc:
        raise ctx.err("native.thread_priority", str(exc)) from None
    names = [t.name for t in tunnels]
    if len(set(names)) != len(names):
        raise ctx.err("tunnel", "tunnel names must be unique")
    first: dict[int, str] = {}
    first_out: dict[tuple[int, IPAddress], str] = {}
    same: dict[tuple[object, ...], str] = {}
    # An AEAD nonce is the key's salt and the sequence number, never the SPI: a key that
    # encrypts both ways (one tunnel's in_enc and out_enc, or a tunnel's out_enc another's
    # in_enc: the peer's side of a key file given to a second tunnel) has this gateway and a
    # peer both sending seq 1, 2, ... under one key and salt. (Two outbound uses of one key
    # are journal.merge's refusal; the key itself is never in a message.)
    keys_in: dict[bytes, str] = {}
    keys_out: dict[bytes, str] = {}
    for i, t in enumerate(tunnels):
        if not t.outbound.seq_iv:  # (AES-CTR too: its IV is the sequence number, RFC 3686)
            continue
        kind = "AEAD" if t.outbound.aead else "AES-CTR"
        kin, kout, where = t.inbound.enc_key, t.outbound.enc_key, f"tunnel[{i}] ({t.name}).keys"
        if kin == kout:
            raise ctx.err(where, f"in_enc and out_enc are one {kind} key: this gateway and its"
                          " peer would both encrypt under it from sequence number 1 on, each"
                          " nonce twice (give each direction its own key)")  # fmt: skip
        for mine, theirs, other in (("out_enc", "in_enc", keys_in.get(kout)),
                                    ("in_enc", "out_enc", keys_out.get(kin))):  # fmt: skip
            if other is not None:
                raise ctx.err(where, f"{mine} is tunnel {other}'s {theirs} (one {kind} key:"
                              " this gateway and that tunnel's peer would both encrypt under"
                              " it, nonces repeated; give each tunnel and direction its own"
                              " key)")  # fmt: skip
        keys_in.setdefault(kin, t.name)
        keys_out.setdefault(kout, t.name)
    for i, t in enumerate(tunnels):  # (gateway run said only "SPI ... is already in use")
        other = first.setdefault(t.inbound.spi, t.name)
        if other != t.name:
            raise ctx.err(f"tunnel[{i}] ({t.name}).spi_in",
                          f"0x{t.inbound.spi:08x} is tunnel {other}'s spi_in too")  # fmt: skip
        other = first_out.setdefault((t.outbound.spi, t.outbound.dst), t.name)
        if other != t.name:  # (the SAD's key: SPI, destination, protocol)
            raise ctx.err(f"tunnel[{i}] ({t.name}).spi_out",
                          f"0x{t.outbound.spi:08x} to {t.outbound.dst} is tunnel {other}'s"
                          " spi_out too")  # fmt: skip
        sel = t.policy.selectors
        traffic = (sel.local, sel.remote, sel.protocol, sel.local_ports, sel.remote_ports)
        other = same.setdefault(traffic, t.name)
        if other != t.name:  # the first PROTECT entry takes every packet of them
            raise ctx.err(f"tunnel[{i}] ({t.name}).local_ts",
                          f"the same traffic selectors as tunnel {other}: no packet would"
                          " ever use this one")  # fmt: skip
    pools = parse_pools(data, path)
    connections = load_connections(data, path) if data.get("connections") else []
    transfer = _transfer(data, ctx, tunnels, connections)
    if transfer is not None and name in transfer.peers:  # it connected to itself, and a
        raise ctx.err("peers", f"{name!r} is this gateway's own name")  # transfer "to" it
    failover = _failover(data.get("failover"), ctx, transfer)
    ike_d = ctx.get(data, "ike", "", dict, {})
    _check_keys_allowed(ike_d, ctx, "ike.", {"cookie_threshold", "port", "rsa_pss",
                                             "max_packet", "fragment_size"})  # fmt: skip
    max_packet = ctx.get(ike_d, "max_packet", "ike.", int, 10000)
    if not 1280 <= max_packet <= 65535:  # (RFC 7296 §2: 1280 octets MUST be accepted)
        raise ctx.err("ike.max_packet", "must be 1280-65535 (octets of one IKE message)")
    fragment_size = ctx.get(ike_d, "fragment_size", "ike.", int, None)
    if fragment_size is not None and not 576 <= fragment_size <= 65535:
        raise ctx.err("ike.fragment_size",
                      "must be 576-65535 (octets of one IP datagram of IKE)")  # fmt: skip
    rsa_pss = ctx.get(ike_d, "rsa_pss", "ike.", bool, False)
    cookie_threshold = ctx.get(ike_d, "cookie_threshold", "ike.", int, 100)
    if cookie_threshold < 0:
        raise ctx.err("ike.cookie_threshold", "must be 0 (always) or more")
    ike_port = ctx.get(ike_d, "port", "ike.", int, 500)
    if not 0 <= ike_port <= 65535:
        raise ctx.err("ike.port", "must be a UDP port, or 0 (IKE on the outer port only)")
    _warn_local_addrs(path, connections, [a for a in (outer.host, virtual) if a is not None])
    for conn in connections:
        for pn in conn.pools:  # a lease no child's remote_ts holds: every CHILD SA refused
            pool = pools[pn]
            if not any(pool.version == t.start.version and int(t.start) <= int(pool.last)
                       and int(pool.first) <= int(t.end)
                       for c in conn.children for t in c.remote_ts):  # fmt: skip
                raise ctx.err(f"connections.{conn.name}.pools",
                              f"pool {pn!r} ({pool.first}-{pool.last}) is outside every "
                              "child's remote_ts (the CHILD SAs are narrowed to the lease)")
        # an initiator sends from the IKE port or from the outer (NAT-T) port: nothing else
        # is bound
        starts = any(c.start_action in ("start", "trap") for c in conn.children)
        if starts and conn.local_port not in (ike_port, outer.port):
            raise ctx.err(f"connections.{conn.name}.local_port",
                          f"must be [ike] port ({ike_port}) or the outer port ({outer.port})")
        if conn.local_port not in (ike_port, outer.port, 500):  # (500: swanctl's default)
            # a responder answers on the port a request came to: this one is never used
            # (strongSwan only prefers a connection whose local_port matches; not refused)
            logging.getLogger("ipsecct.gateway.config").warning(
                "event=config-local-port-unused config=%s key=connections.%s.local_port"
                " local_port=%d ike_port=%d outer_port=%d (no socket is bound to it: this"
                " responder answers on the port each request came to)",
                path, conn.name, conn.local_port, ike_port, outer.port,
            )  # fmt: skip
    cluster = _cluster(data.get("cluster"), ctx)
    if cluster is not None and cluster.etcd and failover is not None:
        raise ctx.err("cluster.etcd", "etcd mode replaces [failover]: configure one of them")
    if cluster is not None and (blk := cluster.block()) is not None:
        for t in tunnels:
            if t.inbound.spi not in blk:
                raise ctx.err(
                    "cluster.spi_block",
                    f"tunnel {t.name}'s spi_in 0x{t.inbound.spi:08x} is outside this"
                    f" gateway's SPI block {blk}",
                )
    return NodeConfig(
        path,
        name,
        outer,
        raw_esp,
        inner,
        sock,
        metrics,
        level,
        policies,
        tunnels,
        transfer,
        failover,
        virtual,
        vif,
        vowner,
        connections,
        pools=pools,
        cluster=cluster,
        cookie_threshold=cookie_threshold,
        rsa_pss=rsa_pss,
        ike_max_packet=max_packet,
        ike_fragment_size=fragment_size,
        ike_port=ike_port,
        state_dir=state_dir,
        seq_block=seq_block,
        arrival_retention=float(retention),
        thread_priority=thread_priority,
    )


def own_addresses(cfg: NodeConfig) -> list[IPAddress]:
    """The addresses this gateway knows are its own: outer.address, outer.virtual (a
    cluster's or a fail-over pair's shared address, whoever holds it now) and the TUN
    device's inner.addresses (added at start). An unspecified outer.address (0.0.0.0, ::)
    is listed as such: it means any."""
    out: list[IPAddress] = [cfg.outer.host]
    if cfg.virtual is not None:
        out.append(cfg.virtual)
    if cfg.inner.kind == "tun":
        for a in cfg.inner.tun_addresses:
            with contextlib.suppress(ValueError):  # (checked at load)
                out.append(ipaddress.ip_interface(a).ip)
    return list(dict.fromkeys(out))


def node_shape(cfg: NodeConfig) -> str | None:
    """Why ``cfg`` reads as a mobile node's configuration (for ``gateway run``), or None.

    Both roles share one format; what marks a node is its inner side: one host (its home
    address), the same local_ts in every tunnel, talking to networks behind its gateways
    (examples/gateway/mn.toml). A gateway's local_ts is the network it protects, or, in front
    of one server, a host talking to hosts. Gateway-only sections ([transfer], [failover],
    [cluster], outer.virtual) or no tunnels: a gateway."""
    if (not cfg.tunnels or cfg.transfer is not None or cfg.failover is not None
            or cfg.cluster is not None or cfg.virtual is not None):  # fmt: skip
        return None
    locals_ = {t.policy.selectors.local for t in cfg.tunnels}
    if len(locals_) != 1:
        return None
    (local,) = locals_
    if len(local) != 1 or local[0].first != local[0].last:
        return None
    remote = [r for t in cfg.tunnels for r in t.policy.selectors.remote]
    if all(r.first == r.last for r in remote):
        return None
    n = len(cfg.tunnels)
    return (f"every tunnel's local_ts is the one host {local[0].first} ({n} tunnel"
            f"{'s' if n != 1 else ''}), talking to networks: a mobile node's shape")  # fmt: skip


def _warn_local_addrs(path: str, connections: list[Connection], ours: list[IPAddress]) -> None:
    """Warn (one line per connection) when a connection's ``local_addrs`` holds none of this
    gateway's addresses (outer.address, outer.virtual): no IKE_SA_INIT reaching the gateway
    matches it, and a client sees only NO_PROPOSAL_CHOSEN (a typo, or the other gateway's
    address copied). Not refused: a node whose address is unspecified, or a connection only
    ever taken over, may mean it."""
    if any(a.is_unspecified for a in ours):
        return
    for conn in connections:
        nets = conn.local_addrs
        if nets and not any(a.version == n.version and a in n for n in nets for a in ours):
            logging.getLogger("ipsecct.gateway.config").warning(
                "event=config-local-addrs-not-ours config=%s conn=%s local_addrs=%s ours=%s"
                " (no IKE SA of this connection can be set up here)",
                path, conn.name, ",".join(str(n) for n in nets),
                ",".join(str(a) for a in ours),
            )  # fmt: skip


def _cluster(c: Any, ctx: _Ctx) -> ClusterConfig | None:
    """``[cluster]``: cluster-unique SPIs."""
    if c is None:
        return None
    if not isinstance(c, dict):
        raise ctx.err("cluster", "must be a table")
    _check_keys_allowed(
        c,
        ctx,
        "cluster.",
        {
            "spi_block",
            "spi_blocks",
            "etcd",
            "name",
            "ttl_s",
            "drift_ppm",
            "guard_ms",
            "groups",
            "replicas",
        },
    )
    n = c.get("spi_blocks", 16)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SPI_BLOCKS:
        raise ctx.err("cluster.spi_blocks", f"must be a whole number 1-{MAX_SPI_BLOCKS}")
    i = c.get("spi_block")
    if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n):
        raise ctx.err("cluster.spi_block", f"must be a whole number 0-{n - 1} (of spi_blocks)")
    from .etcd import endpoint

    etcd = c.get("etcd", [])
    if not isinstance(etcd, list) or not all(isinstance(e, str) for e in etcd):
        raise ctx.err("cluster.etcd", 'must be a list of "http://HOST:PORT" endpoints')
    for e in etcd:
        try:
            endpoint(e)
        except EtcdError as exc:
            raise ctx.err("cluster.etcd", str(exc)) from None
    name = c.get("name", "default")
    if not isinstance(name, str) or not name or "/" in name:
        raise ctx.err("cluster.name", "must be a name without /")
    ttl = c.get("ttl_s", 2)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 2 <= ttl <= 3600:
        raise ctx.err("cluster.ttl_s", "must be whole seconds, 2-3600 (etcd's lease unit)")
    extra: dict[str, float] = {}
    for k, dflt in (("drift_ppm", 1000.0), ("guard_ms", 50.0)):
        v = c.get(k, dflt)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1e6:
            raise ctx.err(f"cluster.{k}", "must be a number >= 0")
        extra[k] = float(v)
    groups = c.get("groups", 32)
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= 127:
        raise ctx.err("cluster.groups", "must be a whole number 1-127")
    replicas = c.get("replicas", 2)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 0 <= replicas <= 64:
        raise ctx.err("cluster.replicas", "must be a whole number 0-64 (0: every peer)")
    cc = ClusterConfig(
        i,
        n,
        tuple(etcd),
        name,
        ttl,
        extra["drift_ppm"],
        extra["guard_ms"],
        groups=groups,
        replicas=replicas,
    )
    if etcd:
        from ..ct.ownership import fence_timing

        try:
            fence_timing(ttl, cc.drift_ppm, cc.guard_ms)
        except ValueError as exc:
            raise ctx.err("cluster.ttl_s", str(exc)) from None
    return cc


_TRANSFER_KEYS = {
    "listen",
    "cert",
    "key",
    "ca",
    "conflict",
    "identity",
    "max_transfer_ms",
    "forward_ms",
    "retry_ms",
    "retry_max_ms",
    "path_mtu",
    "algorithms",
    "candidates",
    "max_held",
    "balance",
    "accept_local_ts",
    "accept_remote_ts",
    "max_held_bytes",
    "held_per_tunnel",
    "held_bytes_per_tunnel",
    "max_incoming_per_peer",
    "max_contexts_per_message",
    "max_contexts_per_transfer",
    "make_before_break",
    "mbb_margin",
    "mbb_tail",
    "commit_early",
    "grant",
    "prepare_timeout",
    "max_seen_per_peer",
    "relay_max_rate",
}

MBB_TAIL = 16  # [transfer] mbb_tail's default
RELAY_MAX_RATE_MAX = 10_000_000  # [transfer] relay_max_rate's highest (a second)
# [transfer] commit_early's default: off. Safe either way (docs/cxtp.md, "commit what you
# accept"), but with it a target that goes silent after the COMMIT strands the tunnels until
# it answers instead of costing a rollback, and its gain was not measurable on the shared
# machine (benchmarks/README.md): the operator chooses.
COMMIT_EARLY = False
GRANT = False  # [transfer] grant's default (docs/state.md, "the grant"; benchmarks/README.md)

# [transfer] limits: key -> Settings attribute (whole numbers >= 1)
_TRANSFER_LIMITS = {
    "max_held_bytes": "max_held_bytes",
    "held_per_tunnel": "held_per_tunnel",
    "held_bytes_per_tunnel": "held_bytes_per_tunnel",
    "max_incoming_per_peer": "max_incoming_per_peer",
    "max_contexts_per_message": "max_contexts_per_message",
    "max_contexts_per_transfer": "max_contexts_per_transfer",
    # CXTP messages of one peer remembered for replay protection (docs/security.md)
    "max_seen_per_peer": "max_seen_per_peer",
}


# Time settings in milliseconds: (lowest, highest). Below the lowest a timer fires so often
# that the gateway busy-loops (a retry or sync every microsecond) or a fail-over flaps (a
# heartbeat or detection time shorter than one scheduling delay of a loaded machine); above
# the highest a wait is as good as endless.
MS_RANGES: dict[str, tuple[float, float]] = {
    "transfer.max_transfer_ms": (10, 600_000),
    "transfer.forward_ms": (10, 600_000),
    "transfer.retry_ms": (10, 600_000),
    "transfer.retry_max_ms": (10, 3_600_000),
    "transfer.balance.interval_ms": (10, 86_400_000),
    "failover.sync_ms": (10, 60_000),
    "failover.heartbeat_ms": (10, 60_000),
    "failover.dead_ms": (50, 600_000),
    "failover.tick_ms": (1, 1_000),
}


def _ms_in_range(v: Any, ctx: _Ctx, key: str) -> float:
    """A number of milliseconds within ``MS_RANGES[key]`` (the message names both ends)."""
    lo, hi = MS_RANGES[key]
    if not _positive(v) or not lo <= float(v) <= hi:
        raise ctx.err(key, f"must be a number of milliseconds from {lo:,.0f} to {hi:,.0f}")
    return float(v)


def _positive(v: Any) -> bool:
    """A number > 0 that is finite as a float (nan, inf and 10**400 would reach float() or
    int() and the timers: an OverflowError, or a timer that never or always fires)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return 0 < float(v) < math.inf
    except OverflowError:
        return False


def _transfer(
    data: dict[str, Any],
    ctx: _Ctx,
    tunnels: list[TunnelConfig] | None = None,
    connections: list[Connection] | None = None,
) -> TransferConfig | None:
    """``[transfer]`` and ``[[peers]]`` (the gateway's context-transfer service)."""
    t = data.get("transfer")
    if t is None:
        if "peers" in data:
            raise ctx.err("peers", "[[peers]] needs a [transfer] section (the channel to them)")
        return None
    if not isinstance(t, dict):
        raise ctx.err("transfer", "must be a table")
    _check_keys_allowed(t, ctx, "transfer.", _TRANSFER_KEYS)
    base = Path(ctx.path).parent

    def file(k: str) -> str:
        v = t.get(k)
        if not isinstance(v, str):
            raise ctx.err(f"transfer.{k}", "missing (a file path)")
        p = Path(v) if Path(v).is_absolute() else base / v
        try:
            check_size(p, SECRET_LIMIT)  # OpenSSL reads it by name later
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # (a FIFO, a directory or a device: said below)
                raise ctx.err(f"transfer.{k}", f"no such file {p}") from None
            # (a name too long: p.exists() raised ENAMETOOLONG, an OSError out of load)
            raise ctx.err(f"transfer.{k}", f"cannot read {p}: {exc.strerror}") from None
        return str(p)

    try:
        listen = parse_endpoint(str(t.get("listen", "")), DEFAULT_CXTP_PORT)
    except ValueError as exc:
        raise ctx.err("transfer.listen", f"bad address: {exc}") from None
    s = Settings()
    try:
        s.conflict = ConflictPolicy(t.get("conflict", "reassign"))
    except ValueError:
        raise ctx.err("transfer.conflict", "must be deny, renegotiate or reassign") from None
    try:
        s.identity = Identity(t.get("identity", "direct"))
    except ValueError:
        raise ctx.err("transfer.identity", "must be direct or indirect") from None
    for key, attr in (
        ("max_transfer_ms", "max_transfer_time"),
        ("forward_ms", "forward_time"),
        ("retry_ms", "retry"),
        ("retry_max_ms", "retry_max"),
    ):
        if key in t:
            setattr(s, attr, _ms_in_range(t[key], ctx, f"transfer.{key}") / 1000)
    if s.retry_max < s.retry:
        raise ctx.err("transfer.retry_max_ms", "must not be shorter than retry_ms")
    if "path_mtu" in t:
        v = t["path_mtu"]
        if isinstance(v, bool) or not isinstance(v, int) or not 576 <= v <= 65535:
            raise ctx.err("transfer.path_mtu", "must be 576-65535")
        s.path_mtu = v
    if "max_held" in t:
        v = t["max_held"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ctx.err("transfer.max_held", "must be a number >= 0")
        s.max_held = v
    mbb = t.get("make_before_break", True)  # the gateway's default (docs/cxtp.md)
    if not isinstance(mbb, bool):
        raise ctx.err("transfer.make_before_break", "must be true or false")
    s.make_before_break = mbb
    if "mbb_margin" in t:
        v = t["mbb_margin"]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 31:
            raise ctx.err("transfer.mbb_margin", "must be a whole number from 1 to 2^31")
        s.mbb_margin = v
    # the gateway's default: half of strongSwan's (and the kernel's) default replay window
    # of 32, so that the MN still takes the source's tail if up to 16 of the target's first
    # packets overtake it (docs/cxtp.md, "The tail")
    tail = t.get("mbb_tail", MBB_TAIL)
    if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail <= 1 << 16:
        raise ctx.err("transfer.mbb_tail", "must be a whole number from 0 to 65536")
    s.mbb_tail = tail
    early = t.get("commit_early", COMMIT_EARLY)
    if not isinstance(early, bool):
        raise ctx.err("transfer.commit_early", "must be true or false")
    s.commit_early = early
    # The grant (docs/state.md): off by default (its gain was not measurable here, and it
    # gives up one corner that the target's own "pending" row covers: docs/state.md); off,
    # the target activates only once that row is durable.
    grant = t.get("grant", GRANT)
    if not isinstance(grant, bool):
        raise ctx.err("transfer.grant", "must be true or false")
    s.grant = grant
    # Prepared transfers (docs/cxtp.md): how long one waits for its commit (as source), and
    # the longest this gateway waits for a prepared transfer's COMMIT (as target).
    if "prepare_timeout" in t:
        v = t["prepare_timeout"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not (
            PREPARE_MIN <= v <= PREPARE_MAX
        ):
            raise ctx.err(
                "transfer.prepare_timeout",
                f"must be a number of seconds from {PREPARE_MIN:g} to {PREPARE_MAX:g}",
            )
        s.prepare_timeout = float(v)
    for key, attr in _TRANSFER_LIMITS.items():
        if key in t:
            v = t[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ctx.err(f"transfer.{key}", "must be a whole number >= 1")
            setattr(s, attr, v)
    _accept(t, ctx, s, tunnels or [], connections or [])
    if "algorithms" in t:
        algs = t["algorithms"]
        if not isinstance(algs, list) or not all(isinstance(a, str) for a in algs):
            raise ctx.err("transfer.algorithms", "must be a list of algorithm names")
        enc, integ = set(), set()
        for a in algs:
            if a.lower() in ENC_NAMES:
                enc.add(enc_from_name(a))
            elif a.lower() in INTEG_NAMES:
                integ.add(INTEG_NAMES[a.lower()])
            else:
                raise ctx.err("transfer.algorithms", f"unknown algorithm {a!r}")
        s.supported_enc = frozenset(enc)
        s.supported_integ = frozenset(integ | {INTEG_NAMES["none"]})
    peers = _peers(data.get("peers", []), ctx)
    s.pairs = peer_pairs(peers)
    cands = t.get("candidates", [])
    # (a table or a list in it: "{} in peers" raised TypeError, a traceback from gateway run)
    if not isinstance(cands, list) or any(not isinstance(c, str) or c not in peers
                                          for c in cands):  # fmt: skip
        raise ctx.err("transfer.candidates", "must list names of [[peers]]")
    balance = _balance(t["balance"], ctx, peers) if "balance" in t else None
    relay_rate = t.get("relay_max_rate", relay_mod.RATE_ALL)
    if (isinstance(relay_rate, bool) or not isinstance(relay_rate, (int, float))
            or not 1 <= relay_rate <= RELAY_MAX_RATE_MAX):  # fmt: skip
        raise ctx.err("transfer.relay_max_rate",
                      f"must be a number of datagrams a second, 1 to {RELAY_MAX_RATE_MAX:,}")
    key = file("key")
    warn_if_readable(key, "TLS private key")  # as for tunnel key files
    return TransferConfig(listen, file("cert"), key, file("ca"), s, peers, list(cands), balance,
                          float(relay_rate))  # fmt: skip


def _accept(
    t: dict[str, Any],
    ctx: _Ctx,
    s: Settings,
    tunnels: list[TunnelConfig],
    connections: list[Connection],
) -> None:
    """What a peer may hand over: transferred tunnels' local and remote selectors must lie
    inside ``accept_local_ts`` / ``accept_remote_ts``; by default, inside what this gateway's
    own tunnels protect and what its IKEv2 connections' children would. A gateway with
    neither accepts nothing (and says so)."""
    local = [r for tc in tunnels for r in tc.policy.selectors.local]
    remote = [r for tc in tunnels for r in tc.policy.selectors.remote]
    for conn in connections:
        for child in conn.children:
            local += [AddressRange(ts.start, ts.end) for ts in child.local_ts]
            remote += [AddressRange(ts.start, ts.end) for ts in child.remote_ts]
    if "accept_local_ts" in t:
        local = list(_ranges(t["accept_local_ts"], ctx, "transfer.accept_local_ts"))
    if "accept_remote_ts" in t:
        remote = list(_ranges(t["accept_remote_ts"], ctx, "transfer.accept_remote_ts"))
    s.accept_local, s.accept_remote = tuple(local), tuple(remote)
    s.accept_configured = "accept_local_ts" in t or "accept_remote_ts" in t
    if not local or not remote:
        logging.getLogger("ipsecct.gateway.config").warning(
            "event=transfer-accepts-nothing file=%s (no [[tunnel]] to take the defaults"
            " from: set [transfer] accept_local_ts and accept_remote_ts to the traffic"
            " this gateway may take over)",
            ctx.path,
        )


def _peers(plist: Any, ctx: _Ctx) -> dict[str, PeerConfig]:
    if not isinstance(plist, list):
        raise ctx.err("peers", "must be an array of tables ([[peers]])")
    peers: dict[str, PeerConfig] = {}
    for i, p in enumerate(plist):
        where = f"peers[{i}]"
        if not isinstance(p, dict):
            raise ctx.err(where, "needs a name")
        for k in p:  # before "needs a name": a misspelt name key is named as such
            if k not in ("name", "address", "outer", "outer_port", "allow", "pair"):
                raise ctx.err(
                    f"{where}.{k}",
                    "unknown key (expected name, address, outer, outer_port, allow, pair)",
                )
        if not isinstance(p.get("name"), str):
            raise ctx.err(where, "needs a name")
        try:
            addr = parse_endpoint(str(p.get("address", "")), DEFAULT_CXTP_PORT)
            outer = ipaddress.ip_address(p["outer"]) if "outer" in p else None
        except ValueError as exc:
            raise ctx.err(where, f"bad address: {exc}") from None
        allow = p.get("allow", ["send", "request"])
        if not isinstance(allow, list) or not all(a in ("send", "request") for a in allow):
            raise ctx.err(f"{where}.allow", 'must be a list of "send" and "request"')
        if p["name"] in peers:  # the later entry replaced the earlier one without a word
            raise ctx.err(f"{where}.name", f"{p['name']!r} is listed twice")
        pair = p.get("pair")
        if pair is not None and (not isinstance(pair, str) or pair == p["name"]):
            raise ctx.err(f"{where}.pair", "must name another of the [[peers]]")
        oport = p.get("outer_port")
        if oport is not None and (
            isinstance(oport, bool) or not isinstance(oport, int) or not 0 < oport <= 65535
        ):
            raise ctx.err(f"{where}.outer_port", "must be a UDP port (1-65535)")
        if oport is not None and outer is None:
            raise ctx.err(f"{where}.outer_port", "needs outer (the peer's outer address)")
        peers[p["name"]] = PeerConfig(p["name"], addr, outer, frozenset(allow), pair, oport)
    for i, q in enumerate(peers.values()):
        if q.pair is not None and q.pair not in peers:
            raise ctx.err(f"peers[{i}].pair", "must name another of the [[peers]]")
    return peers


def peer_pairs(peers: dict[str, PeerConfig]) -> dict[str, frozenset[str]]:
    """Per peer, the peers whose transfers it may ask about: its fail-over pair, named in
    either entry (the roles of a pair swap at a take-over)."""
    out: dict[str, set[str]] = {}
    for q in peers.values():
        if q.pair is not None:
            out.setdefault(q.name, set()).add(q.pair)
            out.setdefault(q.pair, set()).add(q.name)
    return {k: frozenset(v) for k, v in out.items()}


def _balance(b: Any, ctx: _Ctx, peers: dict[str, PeerConfig]) -> BalanceConfig:
    keys = {"above", "to", "batch", "interval_ms"}
    if isinstance(b, dict):  # a misspelt key is named, not "must be a table with ..."
        _check_keys_allowed(b, ctx, "transfer.balance.", keys)
    if not isinstance(b, dict) or "above" not in b or "to" not in b:
        raise ctx.err("transfer.balance", "must be a table with above and to (batch, interval_ms)")
    if b["to"] not in peers:
        raise ctx.err("transfer.balance.to", "must name one of the [[peers]]")
    for k in ("above", "batch", "interval_ms"):
        if k in b and (isinstance(b[k], bool) or not isinstance(b[k], int) or b[k] <= 0):
            raise ctx.err(f"transfer.balance.{k}", "must be a positive whole number")
    if "interval_ms" in b:
        _ms_in_range(b["interval_ms"], ctx, "transfer.balance.interval_ms")
    return BalanceConfig(
        b["above"], b["to"], b.get("batch", 1000), b.get("interval_ms", 1000) / 1000
    )


_FAILOVER_KEYS = {
    "role",
    "peer",
    "sync_packets",
    "sync_ms",
    "heartbeat_ms",
    "dead_ms",
    "seq_margin",
    "tick_ms",
    "drift_ppm",
    "guard_ms",
    "state",
}


def _failover(f: Any, ctx: _Ctx, transfer: TransferConfig | None) -> FailoverConfig | None:
    """``[failover]``: replication to (or from) a standby over the ``[transfer]`` channel."""
    if f is None:
        return None
    if not isinstance(f, dict):
        raise ctx.err("failover", "must be a table")
    _check_keys_allowed(f, ctx, "failover.", _FAILOVER_KEYS)
    role = f.get("role")
    if role not in ("active", "standby"):
        raise ctx.err("failover.role", "must be active or standby")
    peer = f.get("peer")
    if transfer is None:
        raise ctx.err("failover", "needs a [transfer] section (its channel to the peer)")
    if not isinstance(peer, str) or peer not in transfer.peers:
        raise ctx.err("failover.peer", "must name one of the [[peers]]")
    cfg = FailoverConfig(role, peer)
    for k in ("sync_packets", "sync_ms", "heartbeat_ms", "dead_ms", "seq_margin", "tick_ms"):
        if k in f:
            if f"failover.{k}" in MS_RANGES:
                _ms_in_range(f[k], ctx, f"failover.{k}")
            elif not _positive(f[k]):
                raise ctx.err(f"failover.{k}", "must be a positive number")
            setattr(cfg, k, type(getattr(cfg, k))(f[k]))
    for k in ("drift_ppm", "guard_ms"):  # the lease (ipsecct.ct.lease)
        if k in f:
            v = f[k]
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1e6:
                raise ctx.err(f"failover.{k}", "must be a number >= 0 (and below 1,000,000)")
            setattr(cfg, k, float(v))
    if "state" in f:
        if not isinstance(f["state"], str) or not f["state"]:
            raise ctx.err("failover.state", "must be a file path")
        cfg.state = f["state"]
    if cfg.dead_ms <= cfg.heartbeat_ms:
        raise ctx.err("failover.dead_ms", "must be longer than heartbeat_ms")
    lt = cfg.lease_timing() if cfg.dead_ms > cfg.guard_ms else None
    if lt is None or lt.lease * 1000 <= 2 * cfg.heartbeat_ms:
        raise ctx.err(
            "failover.dead_ms",
            "too short: the active's lease, (dead_ms - guard_ms) less the drift allowance,"
            " must span more than two heartbeats",
        )
    return cfg


# -- IKEv2 ------------------------------------------------------------------------------


def _secret_text(text: str) -> bytes:
    t = text.strip()
    if t.lower().startswith("0x"):
        try:
            return bytes.fromhex(t[2:])
        except ValueError:
            raise ConfigError("a secret starting with 0x must be hex") from None
    return t.encode()


def load_secrets(data: dict[str, Any], path: str) -> list[SharedKey]:
    """``[secrets.ike-NAME]`` tables, as swanctl's ``secrets.ike<suffix>``: the identities
    the key belongs to in ``id`` and any ``id<suffix>`` (``id-1``, ``id-2``, ...; each a
    string or a list; none: anyone) and the key in ``file`` or ``env``, never inline."""
    secrets = data.get("secrets", {})
    if not isinstance(secrets, dict):
        raise ConfigError(f"{path}: secrets: must be a table")
    out: list[SharedKey] = []
    named: dict[tuple[int, bytes], str] = {}  # an identity (as compared) -> its first secret
    # (our own: each secret may name local.id with its client, ranked by the client first)
    conns = data.get("connections")
    ours = {_id_key(c["local"]["id"]) for c in (conns.values() if isinstance(conns, dict)
                                                 else ())
            if isinstance(c, dict) and isinstance(c.get("local"), dict)
            and isinstance(c["local"].get("id"), str)}  # fmt: skip
    for name, d in secrets.items():
        where = f"{path}: secrets.{name}"
        if name.startswith(_KEY_SECRETS) and isinstance(d, dict):
            continue  # private keys: load_private_keys
        if not name.startswith("ike") or not isinstance(d, dict):
            raise ConfigError(f"{where}: only [secrets.ike-NAME] and [secrets.private-NAME]"
                              " tables are supported")  # fmt: skip
        ids: list[str] = []
        for k in d:
            if k.startswith("id"):
                v = d[k]
                v = [v] if isinstance(v, str) else v
                if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
                    raise ConfigError(f"{where}.{k}: must be a string or a list of strings")
                if len(ids) + len(v) > MAX_SECRET_IDS:
                    raise ConfigError(f"{where}.{k}: more than {MAX_SECRET_IDS} identities")
                if not v or not all(i.strip() for i in v):  # (no id at all: anyone's)
                    raise ConfigError(f"{where}.{k}: an empty identity (a secret for anyone "
                                      'has no id, or id = "%any")')  # fmt: skip
                for i in v:
                    try:  # (swanctl.conf's syntax: @name, @@user@host, fqdn:, keyid:, ...)
                        IkeIdentity(i.strip())
                    except ConfigError as exc:
                        raise ConfigError(f"{where}.{k}: {exc}") from None
                ids += [i.strip() for i in v]
            elif k not in ("file", "env"):
                if k.startswith("secret"):
                    raise ConfigError(f"{where}.{k}: never inline: use file = or env =")
                raise ConfigError(f"{where}.{k}: unknown key (expected id, id<suffix>, file, "
                                  "env)")  # fmt: skip
        if ("file" in d) == ("env" in d):
            raise ConfigError(f"{where}: give file = or env = (one of them)")
        if "file" in d:
            if not isinstance(d["file"], str):
                raise ConfigError(f"{where}.file: must be a path")
            p = Path(d["file"])
            if not p.is_absolute():
                p = Path(path).parent / p
            try:
                text = _read_secret(p)
            except OSError as exc:
                raise ConfigError(f"{where}.file: cannot read {p}: {exc.strerror}") from None
            warn_if_readable(p, "IKE secret")
        else:
            if not isinstance(d["env"], str):
                raise ConfigError(f"{where}.env: must be a variable name")
            env = os.environ.get(d["env"])
            if env is None:
                raise ConfigError(f"{where}.env: environment variable {d['env']} is not set")
            text = env
        try:
            secret = _secret_text(text)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not secret:
            raise ConfigError(f"{where}: the secret is empty")
        for i in ids:
            ident = IkeIdentity(i)
            if ident.is_dn:  # (strongSwan would match a peer's DN IDi with it)
                logging.getLogger("ipsecct.gateway.config").warning(
                    'event=config-secret-id-unused config=%s secret=%s id="%s" reason="a '
                    'distinguished name names no pre-shared key here"', path, name,
                    i.replace('"', "'"))  # fmt: skip
            elif not ident.any and ident.key not in ours:
                first = named.setdefault(ident.key, name)
                if first != name:  # (a key replaced by a secret added after the old one)
                    logging.getLogger("ipsecct.gateway.config").warning(
                        'event=config-secret-id-twice config=%s secret=%s first=%s id="%s" '
                        'reason="the last written wins where both name the peer alike, as in '
                        'charon"',
                        path, name, first, i.replace('"', "'"))  # fmt: skip
        out.append(SharedKey(name, tuple(dict.fromkeys(ids)), secret))
    return out


def _id_key(text: str) -> tuple[int, bytes] | None:
    """A local.id as compared (None: one that does not load: parse_connections says why)."""
    try:
        return IkeIdentity(text).key
    except ConfigError:
        return None


# identities one [secrets.ike-*] may name (each is compared at every IKE_AUTH)
MAX_SECRET_IDS = 1024


_KEY_SECRETS = ("private", "rsa", "ecdsa")


def _file(path: str, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else Path(path).parent / p


def load_private_keys(data: dict[str, Any], path: str) -> list[PrivateKey]:
    """``[secrets.private-NAME]`` (as swanctl's ``secrets.private<suffix>``): ``file``, an
    unencrypted PEM private key (RSA or EC), mode 0600 (warned about otherwise)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    out: list[PrivateKey] = []
    for name, d in data.get("secrets", {}).items():
        if not name.startswith(_KEY_SECRETS):
            continue
        where = f"{path}: secrets.{name}"
        if not isinstance(d, dict) or set(d) != {"file"} or not isinstance(d["file"], str):
            raise ConfigError(f"{where}: give file = (a PEM private key) and nothing else")
        p = _file(path, d["file"])
        try:
            pem = read_limited(p, SECRET_LIMIT)
        except OSError as exc:
            raise ConfigError(f"{where}.file: cannot read {p}: {exc.strerror}") from None
        warn_if_readable(p, "IKE private key")
        try:
            key = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(f"{where}.file: {p} is not an unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{where}.file: only RSA and ECDSA keys are supported")
        out.append(key)
    return out


def load_connections(data: dict[str, Any], path: str) -> list[Connection]:
    from cryptography import x509

    def certs(name: str) -> list[x509.Certificate]:
        p = _file(path, name)
        try:
            pem = read_limited(p, SECRET_LIMIT)
        except OSError as exc:
            raise ConfigError(f"cannot read certificate file {p}: {exc.strerror}") from None
        try:
            return x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ConfigError(f"{p} holds no PEM certificate") from None

    return parse_connections(data, path, load_secrets(data, path), certs,
                             load_private_keys(data, path), crl_reader(path),
                             wall_now=dt.datetime.now(dt.UTC))  # fmt: skip


_CRL_POOL: list[concurrent.futures.ThreadPoolExecutor] = []  # one thread, made when needed


def _crl_pool() -> concurrent.futures.ThreadPoolExecutor:
    if not _CRL_POOL:
        _CRL_POOL.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crl"))
    return _CRL_POOL[0]


def crl_reader(
    path: str,
) -> Callable[[list[str]], Callable[[], list[RevocationList]]]:
    """For ``remote.crls``: the files are read now (ConfigError if one is not a revocation
    list, PEM or DER), and then again whenever one changed on disk (its mtime, size or
    inode): a CRL replaced by the operator or a cron job is used without a restart.

    A changed file is read and parsed on a thread of its own, never on the event loop (a
    large CA's list is megabytes, its file may be on a slow disk): the authentication that
    sees the change, and those after it until the thread is done, use the last good lists;
    the next one uses the new lists. Every entry is parsed there (the library parses them
    lazily: a damaged entry would otherwise raise inside an authentication). A file that
    cannot be read, is larger than CRL_LIMIT or does not parse keeps the last good lists and
    is logged once per change (``crl-unreadable``)."""
    from cryptography import x509

    log = logging.getLogger("ipsecct.gateway.config")

    def load(names: list[str]) -> Callable[[], list[RevocationList]]:
        files = [_file(path, n) for n in names]
        cache: dict[Path, tuple[tuple[int, int, int], list[RevocationList]]] = {}
        jobs: dict[Path, concurrent.futures.Future[list[RevocationList]]] = {}

        def read(p: Path) -> list[RevocationList]:
            try:
                data = read_limited(p, CRL_LIMIT)
            except OSError as exc:
                raise ConfigError(f"cannot read revocation list {p}: {exc.strerror}") from None
            try:
                if b"-----BEGIN" in data:
                    crl = x509.load_pem_x509_crl(data)
                else:
                    crl = x509.load_der_x509_crl(data)
                # every entry parsed here (the library parses them lazily), and the set of
                # serials an authentication looks a certificate up in made here, not there
                return [revocation_index(crl)]
            except ValueError:
                raise ConfigError(f"{p} holds no X.509 revocation list (PEM or DER)") from None

        def stamp(p: Path) -> tuple[int, int, int]:
            st = p.stat()
            return (st.st_mtime_ns, st.st_size, st.st_ino)

        for p in files:
            try:
                cache[p] = (stamp(p), read(p))
            except OSError as exc:
                raise ConfigError(f"cannot read revocation list {p}: {exc.strerror}") from None

        def unreadable(p: Path, error: object) -> None:
            log.warning("event=crl-unreadable file=%s error=%s effect=%s", p, error,
                        "the last lists read from it are used")  # fmt: skip

        def current() -> list[RevocationList]:
            out: list[RevocationList] = []
            for p in files:
                seen = cache[p][0]
                job = jobs.get(p)
                if job is not None and job.done():
                    del jobs[p]
                    try:
                        new = job.result()
                        cache[p] = (seen, new)
                    except (OSError, ConfigError) as exc:
                        unreadable(p, exc)
                    except Exception as exc:  # (what a file does is never a traceback)
                        unreadable(p, f"{type(exc).__name__}: {exc}")
                if p not in jobs:
                    try:
                        now = stamp(p)
                    except OSError as exc:
                        now = (-1, -1, -1)  # gone: logged once, until it changes again
                        if seen != now:
                            unreadable(p, f"cannot read revocation list {p}: {exc.strerror}")
                            cache[p] = (now, cache[p][1])
                    if now != seen and now != (-1, -1, -1):
                        cache[p] = (now, cache[p][1])  # tried once per change
                        jobs[p] = _crl_pool().submit(read, p)
                out += cache[p][1]
            return out

        return current

    return load

"""SIGHUP: the configuration read again and compared with the running one (no I/O here).

What can change while the gateway runs, without touching an established SA, is *live*: the IKE
connections (added, removed, changed: for new IKE and CHILD SAs; an IKE SA up keeps the
connection it was made with), their secrets, certificates, CA certificates and revocation
lists, ``[log] level`` and the ``[ike]`` limits (cookie_threshold, max_packet,
fragment_size, rsa_pss), as charon does on ``swanctl --load-all``. Everything else needs a
restart (:data:`RESTART_KEYS`): addresses and ports, sockets, the manual tunnels and
policies, the durable state, ``[transfer]``, ``[[peers]]``, ``[failover]``, ``[cluster]``
and the pools (their leases are durable state). Sequence numbers, reservations, leases,
ownership and fencing hang on those keys only, so a reload never changes any of them.

Keys are compared by a digest of what they load (key files' and certificates' contents
included), never printed: a line names the key, not its value.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import ConfigError
from ..ikev2.config import Connection
from ..ipsec.sad import SecurityAssociation
from .config import NodeConfig, TransferConfig

# What a reload keeps until the process restarts: (the key an operator reads, what of the
# configuration it loads).
RESTART_KEYS: tuple[tuple[str, Callable[[NodeConfig], Any]], ...] = (
    ("name", lambda c: c.name),
    ("outer.address", lambda c: c.outer.host),
    ("outer.port", lambda c: c.outer.port),
    ("outer.raw_esp", lambda c: c.raw_esp),
    ("outer.virtual", lambda c: c.virtual),
    ("outer.virtual_interface", lambda c: c.virtual_interface),
    ("outer.virtual_owner", lambda c: c.virtual_owner),
    ("inner", lambda c: c.inner),
    ("control.socket", lambda c: c.control_socket),
    ("control.metrics", lambda c: c.metrics),
    ("policy", lambda c: c.policies),
    ("tunnel", lambda c: c.tunnels),
    ("transfer", lambda c: _without_peers(c.transfer)),
    ("peers", lambda c: None if c.transfer is None else c.transfer.peers),
    ("failover", lambda c: c.failover),
    ("cluster", lambda c: c.cluster),
    ("state.dir", lambda c: c.state_dir),
    ("state.seq_block", lambda c: c.seq_block),
    ("state.arrival_retention_s", lambda c: c.arrival_retention),
    ("ike.port", lambda c: c.ike_port),
    ("pools", lambda c: c.pools),
    ("native.thread_priority", lambda c: c.thread_priority),
)

def _without_peers(t: TransferConfig | None) -> TransferConfig | None:
    return None if t is None else dataclasses.replace(t, peers={})


# What of an SA a configuration sets (the rest is its life: counters, window, sequence)
_SA_FIELDS = ("spi", "direction", "src", "dst", "protocol", "mode", "enc", "enc_key", "integ",
              "integ_key", "esn", "replay_window", "soft", "hard", "df", "copy_dscp", "encap",
              "selectors", "name")  # fmt: skip


def _canon(v: Any) -> Any:
    """``v`` as plain, comparable values (what it loads, not which object holds it)."""
    if v is None or isinstance(v, str | bytes | int | float | enum.Enum):
        return v
    if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network
                  | ipaddress.IPv6Network):  # fmt: skip
        return str(v)
    if isinstance(v, SecurityAssociation):
        return tuple(_canon(getattr(v, a)) for a in _SA_FIELDS)
    if isinstance(v, x509.Certificate):
        return v.public_bytes(serialization.Encoding.DER)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return (type(v).__name__, tuple((f.name, _canon(getattr(v, f.name)))
                                        for f in dataclasses.fields(v) if f.compare))  # fmt: skip
    if isinstance(v, dict):
        return tuple(sorted((repr(_canon(k)), _canon(x)) for k, x in v.items()))
    if isinstance(v, set | frozenset):
        return tuple(sorted(repr(_canon(x)) for x in v))
    if isinstance(v, list | tuple):  # (a NamedTuple too: Endpoint)
        return tuple(_canon(x) for x in v)
    public_key = getattr(v, "public_key", None)
    if callable(public_key):  # a private key: the public half names it
        pub = public_key()
        return pub.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    if callable(v):  # a reader (remote.crls: the files are read again when they change)
        return None
    return repr(v)


def digest(v: Any) -> bytes:
    return hashlib.sha256(repr(_canon(v)).encode()).digest()


def _conn_digest(c: Connection) -> bytes:
    # (shared_keys, every [secrets.ike-*] of the file, compares as nothing: a connection whose
    # own key changed has another psk; the others get the new list, refresh_secrets)
    return digest(c)


def refresh_secrets(running: Connection, new: Connection) -> None:
    """The secrets of a connection kept (unchanged otherwise) as the file now has them: the
    next authentication chooses from them (an IKE SA up never uses its key again: IKEv2's
    PSK is in IKE_AUTH only). Charon's credentials are global in the same way."""
    running.shared_keys = new.shared_keys
    running.psk = new.psk


@dataclass
class Prints:
    """The digests of a configuration as loaded, before anything ran with it (its SAs'
    counters move once it runs): what a reload compares with."""

    restart: dict[str, bytes]
    connections: dict[str, bytes]

    @classmethod
    def of(cls, cfg: NodeConfig) -> Prints:
        return cls({k: digest(get(cfg)) for k, get in RESTART_KEYS},
                   {c.name: _conn_digest(c) for c in cfg.connections})  # fmt: skip


@dataclass
class Plan:
    """What a reload does: the connections the IKE service runs with from now on (those
    unchanged are the running objects: IKE SAs up hold them), by name what was added,
    removed and changed, and the restart-only keys whose new value is not used."""

    connections: list[Connection]
    # (running connection kept, the same as read again): its secrets are refreshed
    kept: list[tuple[Connection, Connection]] = field(default_factory=list)
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    needs_restart: list[str] = field(default_factory=list)
    prints: Prints | None = None  # the new configuration's, restart keys as running
    # the digests of the values in the file of the keys in needs_restart (a line each is
    # said once per value: reload-needs-restart)
    pending: dict[str, bytes] = field(default_factory=dict)


def plan(running: Prints, old: list[Connection], new: NodeConfig, pools: set[str]) -> Plan:
    """``pools``: the running pools' names. ConfigError for a connection that leases from a
    pool that is not running (pools need a restart): nothing is applied then."""
    for c in new.connections:
        for pn in c.pools:
            if pn not in pools:
                raise ConfigError(f"{new.path}: connections.{c.name}.pools: pool {pn!r} is"
                                  " not running here (a new pool needs a restart)")
    now = Prints.of(new)
    needs = [k for k, _ in RESTART_KEYS if now.restart[k] != running.restart[k]]
    kept = {c.name: c for c in old}
    conns: list[Connection] = []
    p = Plan(conns, needs_restart=needs, pending={k: now.restart[k] for k in needs})
    for c in new.connections:
        before = running.connections.get(c.name)
        if before is None:
            p.added.add(c.name)
        elif before != now.connections[c.name]:
            p.changed.add(c.name)
        elif c.name in kept:
            p.kept.append((kept[c.name], c))
            c = kept[c.name]
        conns.append(c)
    p.removed = set(running.connections) - set(now.connections)
    # the restart-only keys stay as they run: a later reload compares with those
    p.prints = Prints(dict(running.restart), now.connections)
    return p


@dataclass
class Loaded:
    """Which configuration runs (``status``'s ``config``): the file, the SHA-256 of the bytes
    last loaded from it (never its contents), when (UTC), the reloads done and refused, and
    the keys changed in the file that wait for a restart, the last load's warnings (a key
    file others can read: said once, these hold still); ``coalesced``: the SIGHUPs that
    came while a reload was already due (within RELOAD_GAP of the last one) and were served
    by it."""

    file: str
    sha256: str
    loaded_at: str
    reloads: int = 0
    reloads_failed: int = 0
    coalesced: int = 0
    needs_restart: list[str] = field(default_factory=list)
    # the WARNING lines of the last load (gateway.log.LoadWarnings: each said once)
    warnings: list[str] = field(default_factory=list)

    def status(self, log_level: str) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "log_level": log_level}


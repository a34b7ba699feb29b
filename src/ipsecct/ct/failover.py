"""Fail-over between an active gateway and its standby (the draft's fail-over case).

The active gateway replicates the context of its tunnels to the standby incrementally, over the
same TLS channel as context transfer: a tunnel's contexts are sent when it is new, after
``sync_packets`` packets on it, or ``sync_ms`` after it last changed, like Linux's XFRM aevents
(replay-thresh / etimer). Every message doubles as a heartbeat, and an empty one goes out every
``heartbeat_ms``. The standby keeps the latest contexts (as bytes: nothing is installed) and
takes over when it has heard nothing for ``dead_ms``.

On take-over every outbound sequence number is advanced by ``seq_margin``: the active may have
sent packets after its last sync, and reusing a sequence number would reuse an AES-GCM or
ChaCha20 nonce. The sync rule bounds what was not replicated to ``sync_packets`` packets per SA
plus what is sent while a sync is in flight (the check runs every ``tick_ms``); the default
margin, 16384, is 16 times the default ``sync_packets`` (1024), the value OpenBSD's pfsync adds
after a switch. RFC 6311 suggests 2^30, which is safe for any sync interval but burns a quarter
of a 32-bit sequence space per fail-over; RFC 6027 §3.4 suggests syncing every 10,000 packets
and skipping that much. Inbound windows are restored as last replicated: they may lag, so a
packet the active accepted after its last sync could be accepted once more (RFC 6027 §3.4:
the price of never dropping fresh traffic).

Configuration (gateway TOML)::

    [failover]
    role = "active"        # or "standby"
    peer = "sg2"           # a [[peers]] entry; the channel is the [transfer] one
    sync_packets = 1024
    sync_ms = 100
    heartbeat_ms = 100
    dead_ms = 500          # detection time: the standby takes over after this much silence
    seq_margin = 16384
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from dataclasses import dataclass, field

from ..errors import ContextError, IpsecctError
from ..ipsec import signalling
from ..ipsec.engine import Engine, Tunnel, TunnelState
from ..ipsec.sad import Direction, SecurityAssociation, UdpEncap
from ..ipsec.spd import Action, SPDEntry
from . import context, cxtp
from .transfer import FPT_SYNC, Endpoint, Identity, Record, frame, unframe

SYNC_HEARTBEAT = 1  # removals, then contexts to merge into what the standby holds
SYNC_FULL = 2  # the whole state follows (this poll's messages): replace what the standby holds
_SYNC = struct.Struct("!BxHI")  # kind, number of removed SPIs, active's packet counter


@dataclass
class FailoverConfig:
    role: str
    peer: str
    sync_packets: int = 1024
    sync_ms: float = 100.0
    heartbeat_ms: float = 100.0
    dead_ms: float = 500.0
    seq_margin: int = 16384
    tick_ms: float = 10.0


def sync_cdb(removed: list[int], packets: int, *, full: bool = False) -> bytes:
    return frame(
        FPT_SYNC,
        _SYNC.pack(SYNC_FULL if full else SYNC_HEARTBEAT, len(removed), packets & 0xFFFFFFFF)
        + b"".join(struct.pack("!I", s) for s in removed),
    )


def parse_sync(cdb: bytes) -> list[int]:
    """The outbound SPIs a SYNC CDB reports removed."""
    return parse_sync_full(cdb)[1]


def parse_sync_full(cdb: bytes) -> tuple[bool, list[int]]:
    """(FULL mark, removed outbound SPIs) of a SYNC CDB."""
    p = unframe(cdb)
    if len(p) < _SYNC.size:
        raise cxtp.CxtpError("SYNC CDB too short")
    kind, n, _ = _SYNC.unpack_from(p)
    if kind not in (SYNC_HEARTBEAT, SYNC_FULL) or _SYNC.size + 4 * n > len(p):
        raise cxtp.CxtpError("SYNC CDB malformed")
    removed = [struct.unpack_from("!I", p, _SYNC.size + 4 * i)[0] for i in range(n)]
    return kind == SYNC_FULL, removed


@dataclass
class _Synced:
    packets: int
    changed_at: float | None  # when traffic was first seen after the last sync


class Replicator:
    """Active side: decides what to send to the standby (sans-I/O)."""

    def __init__(self, engine: Engine, cfg: FailoverConfig, session: int | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.session = session if session is not None else secrets.randbits(64)
        self.seq = 0
        # Keyed by the Tunnel itself (eq=False: identity), which keeps a removed tunnel alive
        # until its removal is reported: an id() could be handed to a new tunnel meanwhile.
        self.synced: dict[Tunnel, _Synced] = {}
        self.spi_of: dict[Tunnel, int] = {}
        self._full = True  # the next poll sends the whole state (first one, or after a loss)
        self.last_sent = -1e9
        self.messages = 0
        self.contexts = 0
        self.unreplicable = 0  # tunnels whose contexts cannot be encoded (counted, skipped)

    def resync(self) -> None:
        """The standby may have missed messages (the channel broke, it restarted): the next
        poll sends the whole state again, marked FULL so that the standby replaces (not merges)
        what it holds, which also carries any removal it missed."""
        self._full = True

    def _counter(self, t: Tunnel) -> int:
        return sum(sa.counters.packets for sa in t.sas())

    def poll(self, now: float) -> list[cxtp.Message]:
        full = self._full
        due: list[Tunnel] = []
        live: set[Tunnel] = set()
        for t in self.engine.tunnels():
            if t.state is not TunnelState.ACTIVE:
                continue
            live.add(t)
            c = self._counter(t)
            st = self.synced.get(t)
            if st is None or full:
                due.append(t)
                continue
            if c != st.packets:
                if st.changed_at is None:
                    st.changed_at = now
                if (
                    c - st.packets >= self.cfg.sync_packets
                    or (now - st.changed_at) * 1000 >= self.cfg.sync_ms
                ):
                    due.append(t)
        removed = [self.spi_of.pop(k) for k in list(self.synced) if k not in live]
        for k in list(self.synced):
            if k not in live:
                del self.synced[k]
        if (
            not full
            and not due
            and not removed
            and (now - self.last_sent) * 1000 < self.cfg.heartbeat_ms
        ):
            return []
        self._full = False
        pairs: list[list[bytes]] = []
        for t in due:
            try:
                pair = [context.encode(sa, now) for sa in t.sas()]
            except ContextError:
                self.unreplicable += 1  # e.g. a replay window too large for a CDB
                continue
            pairs.append(pair)
            self.synced[t] = _Synced(self._counter(t), None)
            self.spi_of[t] = t.outbound.spi
        self.contexts += sum(len(p) for p in pairs)
        self.last_sent = now
        template = cxtp.CTD(due[0].outbound.dst if due else _ANY, 0)
        # Every message starts with a SYNC CDB (removals and the FULL mark in the first), so
        # the standby tells each from a transfer, and a tunnel's pair never straddles two.
        budget = cxtp.MAX_MESSAGE_LEN - 1024  # room for the header and the TRANSFER CDB
        groups: list[list[bytes]] = [[sync_cdb(removed, 0, full=full)]]
        size = len(groups[0][0])
        for pair in pairs:
            psize = sum(len(c) for c in pair)
            if size + psize > budget:
                groups.append([sync_cdb([], 0)])
                size = len(groups[-1][0])
            groups[-1].extend(pair)
            size += psize
        msgs: list[cxtp.Message] = []
        for g in groups:
            msgs += cxtp.batch_cdbs(template, g, self.session, first_seq=self.seq + len(msgs))
        self.seq += len(msgs)
        self.messages += len(msgs)
        return msgs


_ANY = ipaddress.ip_address("0.0.0.0")


@dataclass
class Standby:
    """Standby side: keeps the replicated contexts; takes over when the active falls silent."""

    engine: Engine
    cfg: FailoverConfig
    endpoint: Endpoint
    identity: Identity
    replica: dict[int, list[bytes]] = field(default_factory=dict)  # outbound SPI -> CDBs
    last_heard: float | None = None
    took_over: float | None = None
    seen_session: int | None = None

    def receive(self, msg: cxtp.CTD, now: float) -> None:
        tag = cxtp.transfer_tag(msg)
        if tag is None or len(msg.cdbs) < 2:
            raise cxtp.CxtpError("sync message without a TRANSFER tag")
        self.last_heard = now
        self.seen_session = tag.transfer_id
        cdbs = list(msg.cdbs[1:])
        if cdbs and cxtp.cdb_fpt(cdbs[0]) == FPT_SYNC:
            full, removed = parse_sync_full(cdbs[0])
            if full:
                self.replica.clear()
            for spi in removed:
                self.replica.pop(spi, None)
            cdbs = cdbs[1:]
        # Contexts come as (outbound, inbound) pairs; remember the latest of each tunnel.
        i = 0
        while i < len(cdbs):
            out = cdbs[i]
            pair = [out]
            spi, inbound = _peek(out)
            if inbound:
                raise cxtp.CxtpError("a replicated tunnel must start with its outbound SA")
            if i + 1 < len(cdbs) and _peek(cdbs[i + 1])[1]:
                pair.append(cdbs[i + 1])
                i += 2
            else:
                i += 1
            self.replica[spi] = pair

    def dead(self, now: float) -> bool:
        return (
            self.took_over is None
            and self.last_heard is not None
            and (now - self.last_heard) * 1000 >= self.cfg.dead_ms
        )

    def take_over(
        self, now: float
    ) -> tuple[list[Tunnel], list[tuple[SecurityAssociation, bytes]], Record]:
        """Install every replicated tunnel, outbound counters advanced by the margin.

        Returns the tunnels, the signals to send the MNs (direct identity) and a record."""
        self.took_over = now
        rec = Record(
            self.seen_session or 0, "standby", self.cfg.peer, "failover", self.last_heard or now
        )
        tunnels: list[Tunnel] = []
        signals: list[tuple[SecurityAssociation, bytes]] = []
        failed = 0
        for pair in self.replica.values():
            try:
                sas = [context.decode(c, now) for c in pair]
            except ContextError:
                failed += 1
                continue
            out_sa = sas[0]
            in_sa = sas[1] if len(sas) > 1 else None
            if out_sa.direction is not Direction.OUTBOUND or out_sa.selectors is None:
                failed += 1
                continue
            out_sa.seq = min(out_sa.seq + self.cfg.seq_margin, out_sa.seq_limit)
            if self.identity is Identity.DIRECT:
                out_sa.src = self.endpoint.address
                if out_sa.encap is not None:
                    out_sa.encap = UdpEncap(self.endpoint.port, out_sa.encap.dport)
                if in_sa is not None:
                    in_sa.dst = self.endpoint.address
            entry = SPDEntry(out_sa.selectors, Action.PROTECT, name=out_sa.name, static=False)
            try:
                t = self.engine.add_tunnel(entry, out_sa, in_sa, index=0)
            except IpsecctError:
                failed += 1
                continue
            tunnels.append(t)
            if self.identity is Identity.DIRECT:
                payload = signalling.encode(
                    [signalling.SgUpdate(self.endpoint.address, self.endpoint.port)]
                )
                signals.append((out_sa, payload))
        rec.tunnels = len(self.replica)
        rec.accepted = len(tunnels)
        rec.outcome = "took over"
        rec.ended = now
        rec.detail = f"{failed} context(s) unusable" if failed else ""
        rec.spis = [sa.spi for t in tunnels for sa in t.sas()]
        self.replica.clear()
        return tunnels, signals, rec


def _peek(cdb: bytes) -> tuple[int, bool]:
    """(SPI, inbound?) from the fixed part of a feature-context CDB (docs/context-format.md:
    header, optional presence vector, then version, protocol, flags(16), SPI(32))."""
    off = 8 if len(cdb) > 3 and cdb[3] & 0x80 else 4
    if len(cdb) < off + 8 or cxtp.cdb_fpt(cdb) != context.FPT_IPSEC_SA:
        raise cxtp.CxtpError("not a feature-context CDB")
    _, _, flags, spi = struct.unpack_from("!BBHI", cdb, off)
    return int(spi), bool(flags & context.F_INBOUND)

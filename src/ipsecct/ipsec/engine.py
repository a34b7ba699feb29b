"""The IPsec engine of a gateway or mobile node: SPD and SAD together, packets in, actions out.

It is sans-I/O: the adapter (:mod:`ipsecct.gateway.node`) hands it packets from the inner side
(``outbound``) and ESP packets from the outer side (``inbound``) with the current time, and gets
back what to do: send ESP to a peer, deliver a packet to the inner side, send an ICMP error back,
or drop (counted by reason). Nothing here raises on a bad packet.

Perspective: selectors are seen from this node, "local" being the traffic on its inner side.
"""

from __future__ import annotations

import enum
import math
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PacketError, SAError, SPICollisionError, TunnelStateError
from . import esp, ippacket, processing, relay
from . import native as native_mod
from .esp import Drop
from .ippacket import IPAddress
from .sad import SAD, Direction, Mode, Protocol, SAEvent, SecurityAssociation
from .spd import SPD, Action, SPDEntry


@dataclass(frozen=True)
class ToPeer:
    """Send ``data`` (an ESP packet, SPI .. ICV) to the SA's peer."""

    sa: SecurityAssociation
    data: bytes | bytearray


@dataclass(frozen=True)
class ToInner:
    """Deliver ``packet`` (a whole IP packet) on the inner side."""

    packet: bytes


@dataclass(frozen=True)
class Bypass:
    """Forward ``packet`` unprotected (an SPD BYPASS entry matched)."""

    packet: bytes


@dataclass(frozen=True)
class Held:
    """The packet belongs to a tunnel that is being transferred: the single-sender rule says
    nobody may process it now. The caller keeps it until the transfer commits (then forwards it
    to the new gateway) or rolls back (then hands it to the engine again)."""

    tunnel: Tunnel
    packet: bytes
    inbound: bool  # True: an ESP packet from the outer side; False: a packet from inside


@dataclass(frozen=True)
class Forward:
    """The tunnel moved to another gateway: send the packet there (over the protected
    inter-gateway channel) for a while after the handover."""

    peer: str
    packet: bytes
    inbound: bool


@dataclass(frozen=True)
class Relay:
    """A moved tunnel's inbound ESP (``packet``: SPI .. ICV) to send on, unchanged, from the
    outer UDP socket to its new gateway's outer address ``addr`` (host text, port):
    :mod:`ipsecct.ipsec.relay`."""

    addr: tuple[str, int]
    packet: bytes


@dataclass(frozen=True)
class Signal:
    """An authenticated, replay-checked control message from the peer (ESP next header 253)."""

    sa: SecurityAssociation
    payload: bytes
    source: object = None


NH_SIGNAL = 253  # RFC 3692 experimental protocol number: ipsecct's in-SA signalling
_DROPS = tuple(Drop)  # the native path's drop codes, in this order
# IPv6 next headers that are extension headers (or ESP/AH, or experimental): no flow key
_V6_EXT = frozenset((0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254))

Result = ToPeer | ToInner | Bypass | Held | Forward | Relay | Signal | Drop


class TunnelState(enum.Enum):
    ACTIVE = "active"
    HELD = "held"  # being transferred: packets are held, nothing is sent or accepted
    MOVED = "moved"  # transferred away: packets are forwarded to ``forward_to``

    # By identity, in C: Enum's own hash runs in Python (hash(self._name_)), and every state
    # change looks its (from, to) pair up in TUNNEL_TRANSITIONS; a member is only ever equal
    # to itself, so equal members still hash alike.
    __hash__ = object.__hash__


# The only changes of a tunnel's state (Engine.hold, activate, move_tunnel make them):
TUNNEL_TRANSITIONS: frozenset[tuple[TunnelState, TunnelState]] = frozenset(
    {
        (TunnelState.ACTIVE, TunnelState.HELD),  # a transfer starts (source), or installed held
        (TunnelState.HELD, TunnelState.ACTIVE),  # rolled back (source), or committed (target)
        (TunnelState.HELD, TunnelState.MOVED),  # committed (source): forward what still comes
        # committed (source, make-before-break: it sent below the transfer's cap until now)
        (TunnelState.ACTIVE, TunnelState.MOVED),
        # (source) its COMMIT went out before the target's answer, which refused it: the
        # target never activated it; held here until "owned" again is durable
        (TunnelState.MOVED, TunnelState.HELD),
    }
)


# Every engine of the process, for take_touched() (the touched lists are process-wide).
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def take_touched() -> None:
    """Take the process's touched lists (:func:`ipsecct.ipsec.native.take_touched`: every SA
    that counted a packet since the last call) and tell each engine's ``touch_watchers``
    which of its tunnels they belong to (``tunnels_touched``), and, if some SA counted
    unlisted (a full list), that they cannot know (``touches_lost``). Whoever calls it
    first takes the lists for all: each watcher keeps what it is told until it looks."""
    sas, lost = native_mod.take_touched()
    if not sas and not lost:
        return
    for eng in list(_ENGINES):
        watchers = list(eng.touch_watchers)
        if not watchers:
            continue
        by_sa = eng._tunnel_of_sa
        got: set[Tunnel] = set()
        for sa in sas:
            t = by_sa.get(id(sa))  # (sa is alive: its id is no other's)
            if t is not None and (t.outbound is sa or t.inbound is sa):
                got.add(t)
        for w in watchers:
            if lost:
                w.touches_lost()
            if got:
                w.tunnels_touched(got)


@dataclass(eq=False)
class _RelayEntry:
    """A moved tunnel's relay (ipsec/relay.py): its limit (``_esp.Relay`` or RelayLimit), the
    address it sends to, and its counts already added to the engine's stats."""

    tunnel: Tunnel
    limit: Any
    addr: tuple[str, int]
    relayed: int = 0
    refused: int = 0
    in_c: bool = False  # in the C table (the forwarding thread relays it)


@dataclass(eq=False)
class Tunnel:
    """A PROTECT policy with its SA pair: the unit a context transfer moves."""

    entry: SPDEntry
    outbound: SecurityAssociation
    inbound: SecurityAssociation | None
    state: TunnelState = TunnelState.ACTIVE
    forward_to: str | None = None
    forward_until: float = 0.0
    # Fencing (fail-over): the highest outbound sequence number this tunnel may send; beyond
    # it a standby could restart from a number this gateway already used.
    seq_ceiling: int = 1 << 64
    # Make-before-break (a transfer in progress at its source, Engine.cap_sending): the
    # tunnel goes on sending, but no number above this one; the target starts past it.
    transfer_cap: int = 1 << 64
    # Make-before-break, after the COMMIT (MOVED at the source): the numbers up to this one
    # are still this gateway's (its FINAL told the target to start past it): what reaches it
    # from the inner side is sent on them, and forwarded to the target only once they are
    # used up. 0: none.
    tail_end: int = 0
    # The peer gateway that handed this tunnel over (a transfer's target installs it), None
    # for one made here: an IKE SA that peer hands over after it may name it as a CHILD SA.
    came_from: str | None = None

    @property
    def send_limit(self) -> int:
        """The highest outbound sequence number the tunnel may send now (both ceilings)."""
        c = self.seq_ceiling
        return c if c <= self.transfer_cap else self.transfer_cap

    @property
    def name(self) -> str:
        return self.entry.name or self.outbound.name

    def sas(self) -> list[SecurityAssociation]:
        return [self.outbound] + ([self.inbound] if self.inbound is not None else [])


def _tunnel_state_freezes() -> None:
    """A tunnel that leaves ACTIVE (held for a transfer, moved) is frozen in the native data
    path at that moment: its SAs' exact state comes back from C, and C hands their packets up
    to the engine, which holds, forwards or drops them. Whoever changes the state. Likewise a
    lowered fencing ceiling (``seq_ceiling``)."""

    def get_state(self: Tunnel) -> TunnelState:
        st: TunnelState = self.__dict__["_state"]
        return st

    def set_state(self: Tunnel, value: TunnelState) -> None:
        if value is not TunnelState.ACTIVE:
            for sa in self.sas():
                native_mod.reclaim(sa)
        self.__dict__["_state"] = value

    setattr(Tunnel, "state", property(get_state, set_state))  # noqa: B010

    def get_ceiling(self: Tunnel) -> int:
        c: int = self.__dict__["_seq_ceiling"]
        return c

    def set_ceiling(self: Tunnel, value: int) -> None:
        # A lower fencing ceiling takes effect in C at once: freeze the outbound SA (its next
        # packet goes through Python, which hands it back with the new ceiling). A higher one
        # needs nothing: C hands up the packet at the old ceiling.
        old = self.__dict__.get("_seq_ceiling")
        self.__dict__["_seq_ceiling"] = value
        if old is not None and value < old:
            native_mod.reclaim(self.outbound)

    setattr(Tunnel, "seq_ceiling", property(get_ceiling, set_ceiling))  # noqa: B010


if native_mod.AVAILABLE:
    _tunnel_state_freezes()


@dataclass
class Stats:
    """Counters an operator reads with ``ipsecct status``."""

    out_packets: int = 0
    out_bytes: int = 0
    in_packets: int = 0
    in_bytes: int = 0
    icmp_sent: int = 0
    # tunnels refused because another outbound SA here has their outbound SPI (a peer's
    # choice: Engine.outbound_spi_holder)
    outbound_spi_refused: int = 0
    # a moved tunnel's inbound ESP sent on to its new gateway unchanged (ipsec/relay.py),
    # dropped over its tunnel's relay rate, and dropped over the overall cap of all relays
    relayed: int = 0
    relay_refused: int = 0
    relay_capped: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "out_packets": self.out_packets,
            "out_bytes": self.out_bytes,
            "in_packets": self.in_packets,
            "in_bytes": self.in_bytes,
            "icmp_sent": self.icmp_sent,
            "outbound_spi_refused": self.outbound_spi_refused,
            "relayed": self.relayed,
            "relay_refused": self.relay_refused,
            "relay_capped": self.relay_capped,
            "drops": {d.value: self.drops.get(d.value, 0) for d in Drop},
        }


@dataclass(frozen=True)
class EngineEvent:
    sa: SecurityAssociation
    event: SAEvent


class Engine:
    """SPD + SAD + counters for one node."""

    TIMER_INTERVAL = 1.0  # seconds between lifetime / PMTU checks
    _next_timer = 0.0

    def __init__(
        self,
        address: IPAddress | None = None,
        *,
        default_mtu: int = 1500,
        native: bool | None = None,
    ) -> None:
        self.spd = SPD()
        self.sad = SAD()
        self.stats = Stats()
        self.address = address  # this node's outer address (source of ICMP errors)
        self.default_mtu = default_mtu
        self._tunnel_of_entry: dict[int, Tunnel] = {}  # id(SPDEntry) -> tunnel
        # Bumped whenever the set of tunnels, a tunnel's state or its SAs change (add,
        # remove, hold, activate, move, a shadow inbound SA): fail-over replication walks
        # every tunnel only when it moved (ct/failover.py, Replicator.poll).
        self.tunnel_changes = 0
        self._moved = 0  # tunnels MOVED now (any_moved(): no walk of every tunnel)
        self._tunnel_of_sa: dict[int, Tunnel] = {}  # id(SA) -> tunnel
        self._moved_in: dict[int, Tunnel] = {}  # inbound SPI of a moved tunnel -> tunnel
        # Where a moved tunnel's inbound ESP goes unchanged (ipsec/relay.py): the outer (NAT-T)
        # address of each peer gateway that has one configured, by peer name (the adapter
        # sets it), and the relays of the moved tunnels now, by inbound SPI.
        self.relay_to: dict[str, tuple[IPAddress, int]] = {}
        self.relay_limits = (relay.RATE, relay.BURST)  # per tunnel: a second, burst
        # all relays together (a second, burst): set before the first relay is made
        self.relay_cap_limits = (relay.RATE_ALL, relay.BURST_ALL)
        self._relays: dict[int, _RelayEntry] = {}
        self._relay_cap: Any = None  # made with the first relay (_relay_cap_for)
        self._relay_capped = 0  # of its refusals, those already in stats.relay_capped
        # At or before the earliest forward_until of the moved tunnels (inf: none moved since
        # the last expiry walk): expire_moved() walks the tunnels only once it is reached.
        # forward_until is set only where a tunnel becomes MOVED (move_tunnel, move_tunnels)
        # and by forward_until().
        self._moved_due = math.inf
        # Inbound SAs reachable under a (dst, protocol, SPI) that another SA owns: after an
        # SPI collision ("renegotiate"), or under the old SPI while the peer learns a new one
        # ("reassign"). Tried only when the owner does not verify the packet.
        self._shadows: dict[tuple[IPAddress, Protocol, int], list[SecurityAssociation]] = {}
        # told of every tunnel whose SAs' SPI or addresses rekey_sa changed (the peer moved):
        # the fail-over replication (ct.failover.Replicator.sa_moved), which otherwise sends a
        # tunnel again only after traffic; held weakly (replicators come and go with peers)
        self.move_watchers: weakref.WeakSet[Any] = weakref.WeakSet()
        # told which tunnels counted a packet (take_touched()): the fail-over replication
        # (``tunnels_touched(tunnels)``, and ``touches_lost()`` when some went unlisted), so
        # that its poll visits those and not every tunnel; held weakly, as move_watchers
        self.touch_watchers: weakref.WeakSet[Any] = weakref.WeakSet()
        _ENGINES.add(self)
        # Flow cache: plain IPv4 packets of a flow that matched a PROTECT policy go straight to
        # its tunnel. Cleared whenever policies or tunnels change; a tunnel that is not ACTIVE
        # (held, moved) sends its packets down the full path.
        self._flows: dict[bytes, Tunnel] = {}
        self.events: list[EngineEvent] = []
        # Fencing (fail-over): nothing is sent at or after ``send_until`` (the end of this
        # gateway's lease, see ipsecct.ct.lease); outbound packets are Held instead.
        self.send_until = math.inf
        # Cluster (etcd) mode: a new tunnel may send nothing until its owner is recorded
        # (its ceiling starts at its current number; the cluster driver lifts it).
        self.fence_new_tunnels = False
        self.on_new_tunnel: Callable[[Tunnel], None] | None = None  # ...and is told at once
        # An outbound packet no policy matched (src, dst, protocol, source and destination
        # port), before it is dropped: an adapter's trap (IKEv2 start_action = trap).
        self.on_policy_miss: Callable[[IPAddress, IPAddress, int, int, int], None] | None = None
        # The native data path (ipsecct.ipsec.native): an SA table in C that the engine fills
        # after the Python path has handled a packet of an SA it may carry, and empties when
        # anything about that SA changes. None: the pure-Python path.
        self.native: Any = native_mod.make_table() if native_mod.wanted(native) else None
        self._offloaded: dict[int, SecurityAssociation] = {}  # id(SA) -> SA with a C object

    # -- configuration -----------------------------------------------------------------
    def _clear_flows(self) -> None:
        self._flows.clear()
        if self.native is not None:
            self.native.clear_flows()

    # -- the native data path -------------------------------------------------------------
    def _native_out(self, sa: SecurityAssociation, key: bytes) -> None:
        """After the Python path sent a packet of flow ``key`` on ``sa``: let C carry the
        flow when it can (a moved tunnel's too, while its tail lasts: :meth:`_tail_to_c`)."""
        t = self._tunnel_of_sa.get(id(sa))
        if t is None or sa.pmtu_expires is not None:
            return
        if t.state is TunnelState.ACTIVE:
            c = native_mod.push(
                sa, mtu=sa.path_mtu, seq_ceiling=t.send_limit, send_until=self.send_until
            )
        elif t.state is TunnelState.MOVED and sa is t.outbound:
            c = self._tail_to_c(t)
        else:
            return
        if c is not None:
            self._offloaded[id(sa)] = sa
            self.native.add_flow(key, c)

    def _tail_to_c(self, t: Tunnel) -> Any:
        """A moved tunnel's outbound SA in C for the rest of its tail (make-before-break,
        after the COMMIT: the numbers up to ``tail_end`` are still this gateway's): C may
        send up to ``tail_end`` and no further (nor past the fencing ceiling, the SA's own
        limits and durable reservation: :func:`ipsecct.ipsec.native.ceiling`), only before
        ``forward_until`` and the lease's end; it hands every other packet up unchanged, and
        the Python path forwards it to the target (:meth:`_outbound_slow`). Returns the C
        object, or None (nothing left of the tail, or C cannot carry it: frozen then)."""
        sa = t.outbound
        c = None
        if (
            self.native is not None
            and t.forward_to is not None
            and sa.pmtu_expires is None
            and sa.seq < t.tail_end
        ):
            limit = t.send_limit
            c = native_mod.push(
                sa,
                mtu=sa.path_mtu,
                seq_ceiling=t.tail_end if t.tail_end < limit else limit,
                send_until=min(self.send_until, t.forward_until),
            )
        if c is None:
            native_mod.reclaim(sa)
        return c

    def send_tails(self, tunnels: Iterable[Tunnel]) -> None:
        """After :meth:`move_tunnels` with ``tails`` and the tails set (``tail_end``, the
        transfer's FINAL): C goes on carrying the flows of each moved tunnel whose outbound
        SA it carried, up to the end of its tail (:meth:`_tail_to_c`), so that the host's
        packets that still reach this gateway leave on the tail's numbers from the
        forwarding thread, not through the event loop. The other tunnels' outbound SAs
        leave the C table (their keys there with them), as :meth:`move_tunnels` does."""
        for t in tunnels:
            sa = t.outbound
            if (
                t.state is not TunnelState.MOVED
                or sa.native is None
                or self._offloaded.get(id(sa)) is not sa
                or self._tail_to_c(t) is None
            ):
                self._native_drop(sa)

    def _native_in(self, sa: SecurityAssociation) -> None:
        """After the Python path handled a packet on inbound ``sa``: let C carry its SPI when
        nothing else answers to that SPI."""
        t = self._tunnel_of_sa.get(id(sa))
        if (
            t is None
            or t.state is not TunnelState.ACTIVE
            or t.inbound is not sa
            or self.sad.lookup_spi(Protocol.ESP, sa.spi) is not sa
            or any(k[2] == sa.spi for k in self._shadows)
        ):
            return
        c = native_mod.push(sa)
        if c is not None:
            self._offloaded[id(sa)] = sa
            self.native.add_spi(c)

    def _native_drop(self, sa: SecurityAssociation) -> None:
        """Take ``sa`` out of the C table (its exact state back in Python). Its C object is
        done with: leaving the table frees its keys at once (the touched list may hold the
        object until it is taken), and a later hand-over to C makes a new one."""
        native_mod.reclaim(sa)
        c = sa.native
        if c is not None and self.native is not None:
            self.native.remove(c)
            sa.native = None
        self._offloaded.pop(id(sa), None)

    def _relay_set(self, tunnel: Tunnel) -> None:
        """A moved tunnel's inbound ESP goes on to its new gateway unchanged from now until its
        forwarding time ends, when that gateway's outer address is known, the SA came in UDP
        (ESP in UDP, as the relay sends it) and the target has its SAs (a finite end: the
        tunnels of a COMMIT sent before the answer relay once it came, forward_until). The
        forwarding thread relays in C; the Python path the same (:meth:`inbound`)."""
        sa = tunnel.inbound
        if sa is None or sa.encap is None or tunnel.forward_to is None:
            return
        addr = self.relay_to.get(tunnel.forward_to)
        until = tunnel.forward_until
        e = self._relays.get(sa.spi)
        if e is not None and e.tunnel is tunnel:
            e.limit.until = until
            return
        if addr is None or not math.isfinite(until):
            return
        if e is not None:
            self._relay_clear(e.tunnel)
        rate, burst = self.relay_limits
        native = self.native is not None
        lim = relay.make(addr[0], addr[1], until, native=native, rate=rate, burst=burst,
                         cap=self._relay_cap_for(native))  # fmt: skip
        e = self._relays[sa.spi] = _RelayEntry(tunnel, lim, (str(addr[0]), addr[1]))
        if self.native is not None and not self._shadowed(sa.spi) and not self.sad.by_spi(sa.spi):
            self.native.relay(sa.spi, lim)
            e.in_c = True

    def _relay_yield(self, spi: int) -> None:
        """An SA here has ``spi`` (again): the forwarding thread no longer relays it. C
        looks its relay up when no SA in C has the SPI, and an inbound SA reaches C only once
        the Python path has opened a packet of it: a tunnel installed here under a moved
        tunnel's inbound SPI (a fail-over take-over of its replica, ``sa add``, an IKE CHILD
        SA) had its MN's ESP relayed away instead. The Python path looks in the SAD first
        and relays only what no SA here has (:meth:`inbound`)."""
        e = self._relays.get(spi)
        if e is not None and self.native is not None:
            self.native.relay(spi, None)
            e.in_c = False

    def add_sa(self, sa: SecurityAssociation) -> None:
        """An SA without a tunnel (``sa add`` of an inbound SA) into the SAD."""
        self.sad.add(sa)
        self._relay_yield(sa.spi)

    def _relay_clear(self, tunnel: Tunnel) -> None:
        sa = tunnel.inbound
        if sa is None:
            return
        e = self._relays.get(sa.spi)
        if e is None or e.tunnel is not tunnel:
            return
        self._fold_relay(e)
        del self._relays[sa.spi]
        if self.native is not None:
            self.native.relay(sa.spi, None)

    def _relay_cap_for(self, native: bool) -> Any:
        """The overall cap every relay of this engine takes from (``relay_cap_limits``; one
        object, of the kind of the relays: C or Python)."""
        cap = self._relay_cap
        if cap is None or isinstance(cap, relay.RelayCap) is native:
            self._fold_relay_cap()
            rate, burst = self.relay_cap_limits
            cap = self._relay_cap = relay.make_cap(rate, burst, native=native)
            self._relay_capped = 0
        return cap

    def _fold_relay_cap(self) -> None:
        cap = self._relay_cap
        if cap is not None:
            refused = cap.refused
            self.stats.relay_capped += refused - self._relay_capped
            self._relay_capped = refused

    def _fold_relay(self, e: _RelayEntry) -> None:
        lim = e.limit
        relayed, refused = lim.relayed, lim.refused
        self.stats.relayed += relayed - e.relayed
        self.stats.relay_refused += refused - e.refused
        e.relayed, e.refused = relayed, refused

    def _shadowed(self, spi: int) -> bool:
        return bool(self._shadows) and any(k[2] == spi for k in self._shadows)

    def sync_native(self) -> None:
        """Copy every SA's exact state from C into its Python fields (C keeps it), and add
        what C counted to :attr:`stats`."""
        for sa in self._offloaded.values():
            native_mod.sync(sa)
        self.fold_native_stats()

    def fold_native_stats(self) -> None:
        """Add what the native batch calls counted to :attr:`stats`."""
        for e in self._relays.values():
            self._fold_relay(e)
        self._fold_relay_cap()
        if self.native is None:
            return
        ip, ib, op, ob, drops = self.native.take_stats()
        st = self.stats
        st.in_packets += ip
        st.in_bytes += ib
        st.out_packets += op
        st.out_bytes += ob
        for i, n in enumerate(drops):
            if n:
                st.drops[_DROPS[i].value] += n

    def add_policy(self, entry: SPDEntry, *, index: int | None = None) -> None:
        self._clear_flows()
        self.spd.add(entry, index=index)

    def order_before(self, first: SPDEntry, then: SPDEntry) -> bool:
        """Make ``first`` match before ``then`` (both in the SPD): when ``then`` comes first,
        it moves to just after ``first`` (True; the flow caches are cleared)."""
        i, j = self.spd.index_of(first), self.spd.index_of(then)
        if i is None or j is None or j > i:
            return False
        self._clear_flows()
        self.spd.remove(then)
        self.spd.add(then, index=i)  # ``first`` is at i - 1 now
        return True

    def add_tunnel(
        self,
        entry: SPDEntry,
        outbound: SecurityAssociation,
        inbound: SecurityAssociation | None,
        *,
        index: int | None = None,
        own_outbound_spi: bool = False,
    ) -> Tunnel:
        """A PROTECT policy with its outbound SA (and the inbound SA of the pair).
        ``own_outbound_spi``: refuse (SPICollisionError) an outbound SPI that another
        outbound SA here has, towards any destination (see :meth:`outbound_spi_holder`)."""
        if entry.action is not Action.PROTECT:
            raise SAError("a tunnel's policy must PROTECT")
        if outbound.direction is not Direction.OUTBOUND:
            raise SAError("the tunnel's first SA must be outbound")
        if own_outbound_spi:
            self._refuse_shared_outbound_spi(outbound)
        if inbound is not None:
            if inbound.direction is not Direction.INBOUND:
                raise SAError("the tunnel's second SA must be inbound")
            self.sad.add(inbound)
        try:
            self.sad.add(outbound)
        except SAError:
            if inbound is not None:
                self.sad.remove(inbound)
            raise
        if inbound is not None:
            self._relay_yield(inbound.spi)
        entry.sa_ids = [outbound.spi]
        self._clear_flows()
        self.spd.add(entry, index=index)
        t = Tunnel(entry, outbound, inbound)
        if self.fence_new_tunnels:
            t.seq_ceiling = outbound.seq
        self._tunnel_of_entry[id(entry)] = t
        self.tunnel_changes += 1
        for sa in t.sas():
            self._tunnel_of_sa[id(sa)] = t
        if self.on_new_tunnel is not None:
            self.on_new_tunnel(t)
        return t

    def add_tunnels(
        self,
        items: Sequence[tuple[SPDEntry, SecurityAssociation, SecurityAssociation | None]],
        *,
        held: bool = False,
        own_outbound_spi: bool = False,
    ) -> list[Tunnel | None]:
        """Many tunnels in one call (a bulk transfer's install): each added as
        :meth:`add_tunnel` adds it (its policy appended), in order, the flow caches cleared
        once. A tunnel that :meth:`add_tunnel` would refuse (an SA whose SPI is taken, by
        the SAD or by a tunnel earlier in ``items``) is not added: None in its place.
        ``held``: the tunnels start HELD (installed for a transfer that is not committed).
        ``own_outbound_spi``: as :meth:`add_tunnel`'s (None for such a tunnel)."""
        out: list[Tunnel | None] = []
        entries: list[SPDEntry] = []
        sad = self.sad
        state = TunnelState.HELD if held else TunnelState.ACTIVE
        fence = self.fence_new_tunnels
        by_entry, by_sa = self._tunnel_of_entry, self._tunnel_of_sa
        self.tunnel_changes += 1
        try:
            for entry, outbound, inbound in items:
                if (
                    entry.action is not Action.PROTECT
                    or outbound.direction is not Direction.OUTBOUND
                    or (inbound is not None and inbound.direction is not Direction.INBOUND)
                ):
                    out.append(None)
                    continue
                try:
                    if own_outbound_spi:
                        self._refuse_shared_outbound_spi(outbound)
                    if inbound is not None:
                        sad.add(inbound)
                    try:
                        sad.add(outbound)
                    except SAError:
                        if inbound is not None:
                            sad.remove(inbound)
                        raise
                except SAError:
                    out.append(None)
                    continue
                if inbound is not None and self._relays:
                    self._relay_yield(inbound.spi)
                entry.sa_ids = [outbound.spi]
                entries.append(entry)
                t = Tunnel(entry, outbound, inbound, state)
                if fence:
                    t.seq_ceiling = outbound.seq
                by_entry[id(entry)] = t
                by_sa[id(outbound)] = t
                if inbound is not None:
                    by_sa[id(inbound)] = t
                out.append(t)
        finally:
            self._clear_flows()
            self.spd.extend(entries)
        if self.on_new_tunnel is not None:
            for added in out:
                if added is not None:
                    self.on_new_tunnel(added)
        return out

    def remove_tunnel(self, tunnel: Tunnel) -> None:
        """Remove a tunnel's policy and SAs from the databases."""
        self.tunnel_changes += 1
        self._clear_flows()
        for sa in tunnel.sas():
            self._native_drop(sa)
            if self.sad.lookup(sa.dst, sa.protocol, sa.spi) is sa:
                self.sad.remove(sa)
            self.remove_shadows(sa)
            self._tunnel_of_sa.pop(id(sa), None)
        if self._tunnel_of_entry.pop(id(tunnel.entry), None) is not None:
            self.spd.remove(tunnel.entry)
            if tunnel.state is TunnelState.MOVED:
                self._moved -= 1
        if tunnel.inbound is not None and self._moved_in.get(tunnel.inbound.spi) is tunnel:
            del self._moved_in[tunnel.inbound.spi]
        self._relay_clear(tunnel)

    def move_tunnel(self, tunnel: Tunnel, peer: str, until: float) -> None:
        """The tunnel now lives at ``peer``: drop its SAs (their keys go with them) but keep its
        policy, so that traffic still reaching this node is forwarded there until ``until``."""
        for sa in tunnel.sas():
            self._native_drop(sa)
            if self.sad.lookup(sa.dst, sa.protocol, sa.spi) is sa:
                self.sad.remove(sa)
            self.remove_shadows(sa)
        self._transition(tunnel, TunnelState.MOVED)
        self._clear_flows()
        tunnel.forward_to = peer
        tunnel.forward_until = until
        self._moved_due = min(self._moved_due, until)
        if tunnel.inbound is not None:
            self._moved_in[tunnel.inbound.spi] = tunnel
        self._relay_set(tunnel)

    def move_tunnels(
        self, tunnels: Iterable[Tunnel], peer: str, until: float, *, tails: bool = False
    ) -> None:
        """:meth:`move_tunnel` for many tunnels (a bulk transfer's commit): the same per
        tunnel, the flow caches cleared once. ``tails``: each outbound SA is only frozen in
        C (its exact state back in Python, its C object and flows kept) for
        :meth:`send_tails`, which the caller calls next, once the tails are known."""
        sad = self.sad
        for tunnel in tunnels:
            for sa in tunnel.sas():
                if tails and sa is tunnel.outbound:
                    native_mod.reclaim(sa)
                else:
                    self._native_drop(sa)
                sad.discard(sa)
                if self._shadows:
                    self.remove_shadows(sa)
            self._transition(tunnel, TunnelState.MOVED)
            tunnel.forward_to = peer
            tunnel.forward_until = until
            if tunnel.inbound is not None:
                self._moved_in[tunnel.inbound.spi] = tunnel
            self._moved_due = min(self._moved_due, until)
            self._relay_set(tunnel)
        if tails:
            # The policies stay: C's flows still name the SAs the SPD would pick. Those of
            # a dropped SA went with it; the kept ones' carry the tails (send_tails).
            self._flows.clear()
        else:
            self._clear_flows()

    def forward_until(self, tunnels: Iterable[Tunnel], until: float) -> None:
        """Moved ``tunnels`` forward what reaches them until ``until`` (a source that moved
        them before the target's answer, with no end, learned they went: commit what you
        accept)."""
        for tunnel in tunnels:
            if tunnel.state is TunnelState.MOVED:
                tunnel.forward_until = until
                self._moved_due = min(self._moved_due, until)
                self._relay_set(tunnel)
                c = tunnel.outbound.native
                if c is not None and c.active:  # C sends its tail: told the new end
                    self._tail_to_c(tunnel)

    def take_back(self, tunnel: Tunnel) -> bool:
        """A moved ``tunnel`` comes back, held: its source sent the COMMIT before the
        target's answer ("commit what you accept", docs/cxtp.md) and the target refused it,
        so it never activated it there. Its SAs (their exact state was taken back from the
        native path when it moved) go back into the SAD; it sends and accepts nothing until
        it is activated. False, and nothing changed, if one of its SPIs was taken here
        meanwhile."""
        added: list[SecurityAssociation] = []
        try:
            for sa in tunnel.sas():
                self.sad.add(sa)
                added.append(sa)
        except SAError:
            for sa in added:
                self.sad.discard(sa)
            return False
        self._transition(tunnel, TunnelState.HELD)
        tunnel.forward_to = None
        tunnel.forward_until = 0.0
        tunnel.tail_end = 0
        if tunnel.inbound is not None and self._moved_in.get(tunnel.inbound.spi) is tunnel:
            del self._moved_in[tunnel.inbound.spi]
        self._relay_clear(tunnel)
        self._clear_flows()
        return True

    def _transition(self, tunnel: Tunnel, to: TunnelState) -> None:
        """The one place a tunnel's state changes, checked against TUNNEL_TRANSITIONS."""
        if (tunnel.state, to) not in TUNNEL_TRANSITIONS:
            raise TunnelStateError(
                f"tunnel {tunnel.name or hex(tunnel.outbound.spi)}:"
                f" {tunnel.state.value} -> {to.value} is not allowed"
            )
        self.tunnel_changes += 1
        was_moved = tunnel.state is TunnelState.MOVED
        if (to is TunnelState.MOVED) != was_moved:
            self._moved += 1 if to is TunnelState.MOVED else -1
        tunnel.state = to

    def cap_sending(self, tunnel: Tunnel, margin: int) -> int:
        """Make-before-break at a transfer's source: ``tunnel`` stays active, but sends no
        number above ``cap`` = its exact outbound sequence number now + ``margin`` (its
        state taken back from the native path first, so that nothing C sent is missed);
        packets past the cap are Held. Its inbound SA's exact state is copied back too
        (C keeps it), for the snapshot. Returns the cap (the number the target's first
        packet follows).

        An outbound SA that C carries stays in C, told the lower ceiling at once: the
        exact number is read from C and the ceiling set in the same turn (the forwarding
        thread, which runs without the GIL, may seal a batch between the two calls: the
        number is read again after, and the cap raised to it), so C
        can send nothing past the cap, and the packet at the cap comes up to Python
        (Held). Freezing it instead (as
        before) sent the stream's packets through the event loop, behind the rest of the
        preparation's turn, until the loop pushed it to C again: the demo's pause at the
        start of a ``transfer --prepare`` was 6.0 ms against 4.1 now, medians of 10
        alternated pairs (benchmarks/README.md, prepgap)."""
        out = tunnel.outbound
        native_mod.sync(out)
        if tunnel.inbound is not None:
            native_mod.sync(tunnel.inbound)
        cap = out.seq + margin
        tunnel.transfer_cap = cap
        c = out.native
        if c is not None and c.active:
            if (
                tunnel.state is TunnelState.ACTIVE
                and out.pmtu_expires is None
                and self._offloaded.get(id(out)) is out
                and not out.dead
            ):
                # As _native_out pushes it on its next packet: the ceiling now <= the cap.
                native_mod.push(
                    out, mtu=out.path_mtu, seq_ceiling=tunnel.send_limit,
                    send_until=self.send_until,
                )  # fmt: skip
                # The read and the new ceiling are two calls, and the forwarding thread
                # (without the GIL) may seal a batch between any two: C may have sent on
                # under its old ceiling meanwhile, past the
                # cap when the margin is small. Read again, now that C is held to the
                # ceiling: the cap covers every number C used (the target starts past it).
                native_mod.sync(out)
            else:
                native_mod.reclaim(out)  # (as before: its next packet goes through Python)
            if out.seq > cap:  # (reclaim too: C may have sent since the read, until it)
                cap = tunnel.transfer_cap = out.seq
        return cap

    def uncap(self, tunnel: Tunnel) -> None:
        """The transfer did not commit: ``tunnel`` sends as before (C hands up the packet at
        the old cap and is told the new limit)."""
        tunnel.transfer_cap = 1 << 64

    def hold(self, tunnel: Tunnel) -> None:
        """Stop sending and accepting on ``tunnel`` (its packets are held: Held results)."""
        self._transition(tunnel, TunnelState.HELD)

    def activate(self, tunnel: Tunnel) -> None:
        """A held tunnel carries traffic again (rolled back here, or committed here)."""
        self._transition(tunnel, TunnelState.ACTIVE)

    def offload_inbound(self, tunnel: Tunnel) -> None:
        """An active ``tunnel``'s inbound SA goes to the native path now, as it does after the
        Python path opened its first packet (the same checks: :meth:`_native_in`). A
        transfer's target calls it at the activation: the MN's first packets sent to it
        are then opened by the forwarding thread instead of waiting for the event loop,
        which is busy right then (the IKE SA's import, the packets forwarded behind the
        COMMIT). Inbound only: it opens, it never sends."""
        if self.native is not None and tunnel.inbound is not None:
            self._native_in(tunnel.inbound)

    def expire_moved(self, now: float) -> list[Tunnel]:
        """Remove the moved tunnels whose forwarding time is over (called twice a second).
        Walks every tunnel (a property read each) only when one may be due: a gateway
        holding 10,000 tunnels walked them all on every call (7-10 ms), bulk transfers or
        not."""
        if now < self._moved_due:
            return []
        gone = []
        due = math.inf
        for t in self._tunnel_of_entry.values():
            if t.state is TunnelState.MOVED:
                if now >= t.forward_until:
                    gone.append(t)
                elif t.forward_until < due:
                    due = t.forward_until
        self._moved_due = due
        self.remove_tunnels(gone)
        return gone

    def remove_tunnels(self, tunnels: Sequence[Tunnel]) -> None:
        """:meth:`remove_tunnel` for many (forwarders of a bulk transfer expiring): the same
        per tunnel, the policies removed in one pass over the SPD."""
        if not tunnels:
            return
        self.tunnel_changes += 1
        self._clear_flows()
        entries = []
        for tunnel in tunnels:
            for sa in tunnel.sas():
                self._native_drop(sa)
                self.sad.discard(sa)
                if self._shadows:
                    self.remove_shadows(sa)
                self._tunnel_of_sa.pop(id(sa), None)
            if self._tunnel_of_entry.pop(id(tunnel.entry), None) is not None:
                entries.append(tunnel.entry)
                if tunnel.state is TunnelState.MOVED:
                    self._moved -= 1
            if tunnel.inbound is not None and self._moved_in.get(tunnel.inbound.spi) is tunnel:
                del self._moved_in[tunnel.inbound.spi]
            self._relay_clear(tunnel)
        self.spd.remove_many(entries)

    def attach_shadow_inbound(self, tunnel: Tunnel, sa: SecurityAssociation) -> None:
        """Give ``tunnel`` an inbound SA whose (destination, protocol, SPI) another SA owns."""
        old = tunnel.inbound
        if old is not None:
            self._native_drop(old)
        self.tunnel_changes += 1
        tunnel.inbound = sa
        self._tunnel_of_sa[id(sa)] = tunnel
        self.add_shadow(sa)

    def add_shadow(self, sa: SecurityAssociation, spi: int | None = None) -> None:
        key = (sa.dst, sa.protocol, sa.spi if spi is None else spi)
        # Python tries shadows after the owner of the SPI fails: nothing with this SPI in C.
        for other in [sa, *self.sad.by_spi(key[2])]:
            self._native_drop(other)
        e = self._relays.get(key[2])
        if e is not None and self.native is not None:
            self.native.relay(key[2], None)  # (the Python path relays it after the shadows)
            e.in_c = False
        self._shadows.setdefault(key, []).append(sa)

    def remove_shadows(self, sa: SecurityAssociation) -> None:
        for key in [k for k, v in self._shadows.items() if sa in v]:
            lst = self._shadows[key]
            lst.remove(sa)
            if not lst:
                del self._shadows[key]
                self._relay_to_c(key[2])

    def _relay_to_c(self, spi: int) -> None:
        """A moved tunnel's relay that the Python path carried while a shadow SA answered to
        its SPI (add_shadow takes it out of C: the shadows are tried first) or an SA here had
        it (_relay_yield) goes back to the forwarding thread once neither does: at once when
        the last shadow goes, else when the Python path relays a datagram of it (as an
        inbound SA goes back after the Python path opened its packet, :meth:`_native_in`).
        It stayed with the event loop until the tunnel's forwarding time ended."""
        e = self._relays.get(spi)
        if (e is not None and not e.in_c and self.native is not None
                and not self._shadowed(spi)
                and not self.sad.by_spi(spi)  # (an SA here has it: _relay_yield)
                and not isinstance(e.limit, relay.RelayLimit)):  # fmt: skip
            self.native.relay(spi, e.limit)
            e.in_c = True

    def shadows(self) -> list[SecurityAssociation]:
        return [sa for lst in self._shadows.values() for sa in lst]

    def tunnel_of_entry(self, entry: SPDEntry) -> Tunnel | None:
        return self._tunnel_of_entry.get(id(entry))

    def moved_tunnels(self) -> list[Tunnel]:
        return [t for t in self._tunnel_of_entry.values() if t.state is TunnelState.MOVED]

    def any_moved(self) -> bool:
        """Is any tunnel MOVED now? (Without walking them: the transfer core asks at every
        deadline computation, which walked 10,000 tunnels in about 4 ms each time.)"""
        return self._moved > 0

    def tunnel_of(self, sa: SecurityAssociation) -> Tunnel | None:
        return self._tunnel_of_sa.get(id(sa))

    def outbound_spi_holder(self, spi: int) -> SecurityAssociation | None:
        """An outbound SA here whose SPI is ``spi`` (ESP or AH), towards any destination.

        Our outbound SPIs are the peers' choice (IKEv2: each client's inbound SPI), any 32
        bits: two clients may choose one, by chance or on purpose (copied from the ESP we
        send another client). The SAD tells the two apart by destination, but fail-over
        replicas, the etcd mode's keys and cluster grouping know a tunnel by its outbound
        SPI alone: where a tunnel is made (a peer's CHILD SA, a transfer's target, ``sa
        add``) such an SPI is refused, and the first holder keeps its tunnel."""
        return self.sad.outbound_with_spi(spi)

    def _refuse_shared_outbound_spi(self, outbound: SecurityAssociation) -> None:
        holder = self.outbound_spi_holder(outbound.spi)
        if holder is not None and holder is not outbound:
            self.stats.outbound_spi_refused += 1
            raise SPICollisionError(
                f"outbound SPI 0x{outbound.spi:08x} is already in use here"
                f" (to {holder.dst}): refused for {outbound.dst}"
            )

    def tunnel_by_spi(self, spi: int, direction: Direction | None = None) -> Tunnel | None:
        """The tunnel of an SA with this SPI (of ``direction`` only, if given). An inbound
        SPI is ours, an outbound one the peer's choice (any 32 bits, another tunnel's inbound
        SPI among them): whoever looks up one side's SPI names that direction."""
        for sa in self.find_sa(spi):
            if direction is not None and sa.direction is not direction:
                continue
            t = self._tunnel_of_sa.get(id(sa))
            if t is not None:
                return t
        return None

    def inbound_tunnel(self, spi: int) -> Tunnel | None:
        """The tunnel whose inbound SA answers to ``spi`` (as owner or as a shadow)."""
        for sa in self.sad.by_spi(spi):
            if sa.direction is Direction.INBOUND:
                t = self._tunnel_of_sa.get(id(sa))
                if t is not None:
                    return t
        for (_, _, i), lst in self._shadows.items():
            if i == spi:
                for sa in lst:
                    t = self._tunnel_of_sa.get(id(sa))
                    if t is not None:
                        return t
        return None

    def policy_tunnel(self, packet: bytes) -> Tunnel | None:
        """The tunnel the SPD sends an inner packet to (None: another policy, or none)."""
        try:
            hdr = ippacket.parse(packet)
        except PacketError:
            return None
        sport, dport = hdr.ports(packet)
        entry = self.spd.lookup(hdr.src, hdr.dst, hdr.protocol, sport, dport)
        return None if entry is None else self._tunnel_of_entry.get(id(entry))

    def tunnels(self) -> list[Tunnel]:
        return [t for t in self._tunnel_of_entry.values() if t.state is not TunnelState.MOVED]

    def all_tunnels(self) -> list[Tunnel]:
        """Every tunnel, moved ones included (no state read: a plain copy)."""
        return list(self._tunnel_of_entry.values())

    def has_tunnel(self, tunnel: Tunnel) -> bool:
        return self._tunnel_of_entry.get(id(tunnel.entry)) is tunnel

    def entry_of(self, sa: SecurityAssociation) -> SPDEntry | None:
        t = self._tunnel_of_sa.get(id(sa))
        return t.entry if t is not None else None

    def rekey_sa(
        self,
        sa: SecurityAssociation,
        *,
        spi: int | None = None,
        dst: IPAddress | None = None,
        src: IPAddress | None = None,
    ) -> None:
        """Change an SA's SPI or addresses atomically (they are its SAD key)."""
        self._clear_flows()
        self._native_drop(sa)
        sa.native = None  # its C object is keyed by the SPI: a new one on next use
        present = self.sad.lookup(sa.dst, sa.protocol, sa.spi) is sa
        new_dst = dst if dst is not None else sa.dst
        new_spi = spi if spi is not None else sa.spi
        if (
            present
            and (new_dst, sa.protocol, new_spi) != sa.key
            and self.sad.in_use(new_dst, sa.protocol, new_spi)
        ):
            raise SAError(
                f"SPI 0x{new_spi:08x} is already in use for {sa.protocol.name} to {new_dst}"
            )
        if present:
            self.sad.remove(sa)
        sa.spi = new_spi
        sa.dst = new_dst
        if src is not None:
            sa.src = src
        if present:
            self.sad.add(sa)
            self._relay_yield(new_spi)
        t = self._tunnel_of_sa.get(id(sa))
        if t is not None:
            if sa is t.outbound:
                t.entry.sa_ids = [sa.spi]
            for w in list(self.move_watchers):
                w.sa_moved(t)

    def find_sa(self, spi: int) -> list[SecurityAssociation]:
        return self.sad.by_spi(spi)

    # -- data path ---------------------------------------------------------------------
    def _drop(self, reason: Drop) -> Drop:
        self.stats.drops[reason.value] += 1
        return reason

    def _flow_key(self, packet: bytes) -> bytes | None:
        """The cache key of a plain IPv4 packet or an IPv6 packet without extension headers
        (protocol, addresses, ports or ICMP type and code: what the SPD looks at), or None
        when the packet needs the full path. The native path computes the same key."""
        n = len(packet)
        if n >= 24 and packet[0] == 0x45:
            if packet[6] & 0x3F or packet[7] or ((packet[2] << 8) | packet[3]) != n:
                return None
            proto = packet[9]
            if proto == 6 or proto == 17 or proto == 132:
                return packet[9:10] + packet[12:24]
            if proto == 1:
                return packet[9:10] + packet[12:22]
            return packet[9:10] + packet[12:20]
        if n >= 44 and packet[0] >> 4 == 6 and self.native is not None:
            if 40 + ((packet[4] << 8) | packet[5]) != n or packet[6] in _V6_EXT:
                return None
            nh = packet[6]
            if nh == 6 or nh == 17 or nh == 132:
                return packet[6:7] + packet[8:44]
            if nh == 1 or nh == 58:
                return packet[6:7] + packet[8:42]
            return packet[6:7] + packet[8:40]
        return None

    def outbound(self, packet: bytes, now: float) -> Result:
        """A packet from the inner side: protect it, bypass it or drop it."""
        nt = self.native
        if nt is not None:
            r = nt.seal_flow(packet, now)
            if r is not None:
                st = self.stats
                st.out_packets += 1
                st.out_bytes += len(packet)
                return ToPeer(r[0], r[1])
            res = self._outbound_py(packet, now)
            if isinstance(res, ToPeer):
                key = self._flow_key(packet)
                if key is not None:
                    self._native_out(res.sa, key)
            return res
        return self._outbound_py(packet, now)

    def _outbound_py(self, packet: bytes, now: float) -> Result:
        key = self._flow_key(packet)
        if key is not None:
            t = self._flows.get(key)
            if (
                t is not None
                and t.state is TunnelState.ACTIVE
                and now < self.send_until
                and t.outbound.seq < t.send_limit
            ):
                sa = t.outbound
                c = sa.native
                if c is not None and c.active:  # frozen, the number read again (_outbound_slow)
                    native_mod.reclaim(sa)
                if (
                    sa.seq < t.send_limit
                    and sa.mode is Mode.TUNNEL
                    and sa.dst.version == 4
                    and packet[0] == 0x45
                ):
                    n = len(packet)
                    tr = sa.transform
                    padded = n + 2
                    padded += -padded % tr.block
                    needed = 8 + tr.iv_len + padded + tr.icv_len
                    needed += 28 if sa.encap is not None else 20
                    if needed <= sa.effective_mtu(now, self.default_mtu):
                        res = esp.encapsulate(sa, 4, packet, now)
                        if sa.events:
                            self._collect(sa)
                        if isinstance(res, Drop):
                            return self._drop(res)
                        st = self.stats
                        st.out_packets += 1
                        st.out_bytes += n
                        return ToPeer(sa, res)
        res2 = self._outbound_slow(packet, now)
        if key is not None and isinstance(res2, ToPeer):
            tunnel = self._tunnel_of_sa.get(id(res2.sa))
            if tunnel is not None:
                if len(self._flows) >= 65536:
                    self._clear_flows()
                self._flows[key] = tunnel
        return res2

    def _outbound_slow(self, packet: bytes, now: float) -> Result:
        try:
            hdr = ippacket.parse(packet)
        except PacketError:
            return self._drop(Drop.MALFORMED)
        sport, dport = hdr.ports(packet)
        entry = self.spd.lookup(hdr.src, hdr.dst, hdr.protocol, sport, dport)
        if entry is None and self.on_policy_miss is not None:
            # (IKEv2 start_action = trap: the adapter may start an IKE SA for it)
            self.on_policy_miss(hdr.src, hdr.dst, hdr.protocol, sport or 0, dport or 0)
        if entry is None or entry.action is Action.DISCARD:
            return self._drop(Drop.POLICY)
        if entry.action is Action.BYPASS:
            return Bypass(packet)
        t = self._tunnel_of_entry.get(id(entry))
        if t is None:
            return self._drop(Drop.NO_SA)
        tail = False
        if t.state is not TunnelState.ACTIVE:
            if t.state is TunnelState.HELD:
                return Held(t, packet, False)
            if now < t.forward_until and t.forward_to is not None:
                # C may be sending the tail (send_tails): frozen before the number is read,
                # as below (the thread could send tail_end in between, this packet the
                # target's first).
                native_mod.reclaim(t.outbound)
                if t.outbound.seq >= t.tail_end:
                    if t.outbound.native is not None:
                        self._native_drop(t.outbound)  # used up: C's copy of the keys goes
                    return Forward(t.forward_to, packet, False)
                if self.fenced(t, now):
                    return Forward(t.forward_to, packet, False)
                tail = True  # a number of its tail: sent from here, as before the commit
            else:
                return self._drop(Drop.NO_SA)
        elif self.fenced(t, now):
            return Held(t, packet, False)
        elif (c := t.outbound.native) is not None and c.active:
            # C may be sending on the SA (other flows, the forwarding thread): frozen, and
            # the number read again, so that the check and the number the packet takes below
            # are one step. Else the thread could send the ceiling's number in between (it
            # runs without the GIL, at any moment) and this packet the one past it, which a
            # target (past the cap) or a standby (past the fencing ceiling) sends too. (Not
            # when fenced already: C stops by itself, and stays C's.)
            native_mod.reclaim(t.outbound)
            if self.fenced(t, now):
                return Held(t, packet, False)
        sa = t.outbound
        if hdr.total_len < len(packet):
            packet = packet[: hdr.total_len]
        mtu = sa.effective_mtu(now, self.default_mtu)
        res: bytes | bytearray | Drop
        if sa.mode is Mode.TUNNEL:
            needed = (
                len(packet) + esp.overhead(sa, len(packet)) + (20 if sa.dst.version == 4 else 40)
            )
            if sa.encap is not None:
                needed += 8
            if needed > mtu and (hdr.df or hdr.version == 6):
                return self._too_big(packet, hdr, sa, mtu - (needed - len(packet)))
            res = processing.tunnel_encapsulate(sa, packet, now)
        else:
            res = processing.transport_encapsulate(sa, packet, now)
        self._collect(sa)
        if isinstance(res, Drop):
            if tail and t.forward_to is not None:
                return Forward(t.forward_to, packet, False)  # (no durable number left here)
            return self._drop(res)
        self.stats.out_packets += 1
        self.stats.out_bytes += len(packet)
        return ToPeer(sa, res)

    def _too_big(
        self, packet: bytes, hdr: ippacket.IPHeader, sa: SecurityAssociation, inner_mtu: int
    ) -> Result:
        self.stats.drops[Drop.MTU.value] += 1
        floor = 68 if hdr.version == 4 else 1280
        sender = self._icmp_source(hdr)
        if sender is None:
            return Drop.MTU
        self.stats.icmp_sent += 1
        return ToInner(ippacket.icmp_too_big(packet, hdr, max(inner_mtu, floor), sender))

    def _icmp_source(self, hdr: ippacket.IPHeader) -> IPAddress | None:
        # The gateway answers from an address of the inner packet's family: its destination
        # stands in for the router on the path, as a tunnel interface would.
        return hdr.dst

    def inbound(
        self,
        data: bytes | bytearray | memoryview,
        dst: IPAddress | None,
        now: float,
        protocol: Protocol = Protocol.ESP,
    ) -> Result:
        """An ESP packet (SPI .. ICV) from the outer side, sent to ``dst``."""
        nt = self.native
        if nt is not None and protocol is Protocol.ESP:
            r = nt.open_spi(data, now)
            if r is not None:
                out = r[1]
                if type(out) is bytes:
                    st = self.stats
                    st.in_packets += 1
                    st.in_bytes += len(out)
                    return ToInner(out)
                if type(out) is int:
                    return self._drop(_DROPS[out])
                return Signal(r[0], out[1])
        if len(data) < 8:
            return self._drop(Drop.MALFORMED)
        spi = int.from_bytes(data[0:4], "big")
        sa = self.sad.lookup(dst, protocol, spi) if dst is not None else None
        if sa is None:
            sa = self.sad.lookup_spi(protocol, spi)
        if sa is None and self._shadows:
            found = self._try_shadows(data, dst, protocol, spi, now)
            if found is not None:
                return found
        if sa is None:
            moved = self._moved_in.get(spi)
            if moved is not None and moved.forward_to is not None and now < moved.forward_until:
                e = self._relays.get(spi)
                if e is not None and e.tunnel is moved:
                    taken = e.limit.take(now)
                    if taken:
                        if not e.in_c and nt is not None:
                            self._relay_to_c(spi)  # (C relays the next ones, if it may)
                        return Relay(e.addr, bytes(data))
                    if taken is False:  # over its rate or the overall cap: counted
                        return Drop.POLICY  # relay_refused or relay_capped
                return Forward(moved.forward_to, bytes(data), True)
            return self._drop(Drop.NO_SA)
        if sa.direction is not Direction.INBOUND:
            return self._drop(Drop.NO_SA)
        t = self._tunnel_of_sa.get(id(sa))
        if t is not None and t.state is TunnelState.HELD:
            # Keep only what the peer really sent: anyone who saw the SPI could send forgeries
            # to fill the held queue. The ICV is checked, the replay window left alone.
            bad = esp.authenticate(sa, data, now)
            if bad is not None:
                if (bad is Drop.ICV or bad is Drop.REPLAY) and self._shadows:
                    alt = self._try_shadows(data, dst, protocol, spi, now)
                    if alt is not None:
                        return alt
                return self._drop(bad)
            return Held(t, bytes(data), True)
        if sa.mode is not Mode.TUNNEL:
            return self._drop(Drop.POLICY)  # transport mode needs the outer header: raw path
        dec = esp.decapsulate(sa, data, now)
        self._collect(sa)
        if nt is not None:
            self._native_in(sa)
        if (dec is Drop.ICV or dec is Drop.REPLAY) and self._shadows:
            alt = self._try_shadows(data, dst, protocol, spi, now)
            if alt is not None:
                return alt
        if isinstance(dec, Drop):
            return self._drop(dec)
        return self._deliver(sa, dec[0], dec[1])

    def _try_shadows(
        self,
        data: bytes | bytearray | memoryview,
        dst: IPAddress | None,
        protocol: Protocol,
        spi: int,
        now: float,
    ) -> Result | None:
        cands = self._shadows.get((dst, protocol, spi), []) if dst is not None else []
        if not cands:
            cands = [
                s
                for (_, p, i), lst in self._shadows.items()
                if p is protocol and i == spi
                for s in lst
            ]
        for sa in cands:
            t = self._tunnel_of_sa.get(id(sa))
            if t is not None and t.state is TunnelState.HELD:
                bad = esp.authenticate(sa, data, now)
                if bad is None:
                    return Held(t, bytes(data), True)
                if bad is not Drop.ICV and bad is not Drop.REPLAY:
                    return self._drop(bad)
                continue
            res = esp.decapsulate(sa, data, now)
            self._collect(sa)
            if not isinstance(res, Drop):
                return self._deliver(sa, res[0], res[1])
            if res is not Drop.ICV and res is not Drop.REPLAY:
                return self._drop(res)
        return None

    def _deliver(self, sa: SecurityAssociation, nh: int, payload: bytes) -> Result:
        if nh == NH_SIGNAL:
            return Signal(sa, payload)
        inner = processing.inner_packet(sa, nh, payload)
        if isinstance(inner, Drop):
            return self._drop(inner)
        self.stats.in_packets += 1
        self.stats.in_bytes += len(inner)
        return ToInner(inner)

    @property
    def send_until(self) -> float:
        """Fencing (fail-over): nothing is sent at or after this time (the end of this
        gateway's lease, see ipsecct.ct.lease); outbound packets are Held instead."""
        return self._send_until

    @send_until.setter
    def send_until(self, value: float) -> None:
        old = self.__dict__.get("_send_until", math.inf)
        self._send_until = value
        if value < old:  # C was told the old end: freeze what it sends (pushed back anew)
            for sa in list(self.__dict__.get("_offloaded", {}).values()):
                if sa.direction is Direction.OUTBOUND:
                    native_mod.reclaim(sa)

    def fenced(self, tunnel: Tunnel, now: float) -> bool:
        """May ``tunnel`` not send now (lease run out, or sequence ceiling reached)?"""
        return now >= self.send_until or tunnel.outbound.seq >= tunnel.send_limit

    def signal(self, sa: SecurityAssociation, payload: bytes, now: float) -> ToPeer | Drop:
        """Send ``payload`` to the peer inside ``sa`` (outbound) as ESP next header 253:
        authenticated by the SA's keys and replay-protected by its sequence numbers."""
        t = self._tunnel_of_sa.get(id(sa))
        for _ in range(2):  # again once C is frozen: the number read again (_outbound_slow)
            if now >= self.send_until or (t is not None and sa.seq >= t.send_limit):
                return self._drop(Drop.FENCED)
            c = sa.native
            if c is None or not c.active:
                break
            native_mod.reclaim(sa)
        res = esp.encapsulate(sa, NH_SIGNAL, payload, now)
        self._collect(sa)
        if isinstance(res, Drop):
            return self._drop(res)
        return ToPeer(sa, res)

    def _collect(self, sa: SecurityAssociation) -> None:
        if sa.events:
            for ev in sa.events:
                self.events.append(EngineEvent(sa, ev))
            sa.events.clear()

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is next due: once a second while there are SAs (their
        time-based lifetimes and PMTU aging are checked that often)."""
        if not len(self.sad):
            return None
        return self._next_timer

    def handle_timer(self, now: float) -> None:
        """Fire time-based lifetime events and expire dead SAs' PMTU state."""
        self._next_timer = now + self.TIMER_INTERVAL
        # The touched lists hold their SAs until taken (C's keys of an SA go when it leaves
        # the table, not then): taken here too, so that a process without fail-over
        # replication (nobody polls) lets go of removed SAs within a second (the watchers of
        # every engine are told, as by a poll).
        take_touched()
        # What sa.poll(), sa.effective_mtu() and _collect() do, tested inline: most SAs have
        # no lifetime limit, no aging PMTU and no event, and this walks every SA once a
        # second (three calls each were 1.3 us per SA: 130 ms/s for 100,000 SAs).
        default = self.default_mtu
        events = self.events
        for sa in self.sad:
            if not sa._limits_unset:
                sa._check_limits(now)
            expires = sa.pmtu_expires
            if expires is not None and now >= expires:
                sa.effective_mtu(now, default)
            if sa.events:
                for ev in sa.events:
                    events.append(EngineEvent(sa, ev))
                sa.events.clear()

    def drain_events(self) -> list[EngineEvent]:
        ev, self.events = self.events, []
        return ev

    def set_path_mtu(self, spi: int, mtu: int, *, expires: float | None = None,
                     sas: list[SecurityAssociation] | None = None) -> int:  # fmt: skip
        """Change the path MTU of the SAs with this SPI (only those of ``sas`` among them,
        if given: an SPI may name SAs of more than one tunnel); returns how many changed."""
        if not 68 <= mtu <= 65535:
            raise SAError(f"path MTU {mtu} out of range 68-65535")
        n = 0
        only = None if sas is None else {id(sa) for sa in sas}
        for sa in self.find_sa(spi):
            if only is not None and id(sa) not in only:
                continue
            native_mod.reclaim(sa)  # pushed again with the new MTU on its next packet
            sa.path_mtu = mtu
            sa.pmtu_expires = expires
            n += 1
        return n

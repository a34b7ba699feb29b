"""Virtual IP address pools (swanctl.conf's ``pools`` section) and their leases, as
strongSwan's mem-pool keeps them: an address is *online* while an IKE SA holds it and
*offline* once that IKE SA ended, still remembered for the identity that had it, which gets
it back when it connects again. A new identity gets an address never leased, then (the
pool exhausted) the oldest offline lease of another identity.

An address may also be *away*: its IKE SA moved to another gateway (a handover, or the
standby's take-over). It is not leased here again, to anyone, until it comes back with an
IKE SA (an import): the gateway that holds it now cannot tell this one when it ends.

An address may also be *reserved* (in memory only, never told to ``listener``): a transfer
towards this gateway carries an IKE SA that holds it and waits for its COMMIT. It is not
leased to anyone meanwhile; the IKE SA's import takes it (:meth:`arrive`), a transfer that
ends without it gives it back (:meth:`unreserve`).

Every change is told to ``listener`` (pool name, address, state, identity): the gateway
keeps the leases in its durable state and gives them back with :meth:`restore` after a
restart (gateway/state.py).

``share`` (our key, not swanctl's) is the part of the pool this gateway leases new
addresses from; ``addrs`` is the whole pool, the addresses an IKE SA arriving from another
gateway may hold. Gateways that hand IKE SAs to each other give each its own share of the
same ``addrs`` (as they have their own SPI blocks), so that two never lease one address.

Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import ConfigError

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
# (pool name, address, "online" | "offline" | "away" | "leaving", identity)
Listener = Callable[[str, IPAddr, str, str], None]
LEASE_STATES = ("online", "offline", "away")


def parse_range(text: str) -> tuple[IPAddr, IPAddr]:
    """``10.3.0.0/24`` (without its network and broadcast addresses, as strongSwan leases a
    subnet; an IPv6 prefix without its first address) or ``10.3.0.10-10.3.0.99``, or one
    address. Raises ValueError."""
    t = text.strip()
    if "-" in t:
        a, _, b = t.partition("-")
        first, last = ipaddress.ip_address(a.strip()), ipaddress.ip_address(b.strip())
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"bad address range {text!r}")
        return first, last
    net = ipaddress.ip_network(t, strict=False)
    if net.num_addresses <= 2:
        return net[0], net[-1]
    if net.version == 4:
        return net[1], net[-2]
    return net[1], net[-1]


@dataclass
class Pool:
    name: str
    first: IPAddr
    last: IPAddr
    dns: tuple[IPAddr, ...] = ()
    share: tuple[IPAddr, IPAddr] | None = None  # None: all of first-last
    online: dict[IPAddr, str] = field(default_factory=dict)  # address -> identity
    # address -> identity, oldest first (the order a full pool reassigns them in)
    offline: OrderedDict[IPAddr, str] = field(default_factory=OrderedDict)
    away: dict[IPAddr, str] = field(default_factory=dict)  # address -> identity
    # address -> (identity, "": not known; the transfer holding it)
    reserved: dict[IPAddr, tuple[str, str]] = field(default_factory=dict)
    _next: int = 0  # offset into the share of the next address never leased
    listener: Listener | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.first.version != self.last.version or int(self.first) > int(self.last):
            raise ConfigError(f"pool {self.name!r}: bad address range")
        if self.share is not None:
            a, b = self.share
            if not (self.contains(a) and self.contains(b) and int(a) <= int(b)):
                raise ConfigError(f"pool {self.name!r}: share is not within addrs")

    @property
    def version(self) -> int:
        return self.first.version

    def contains(self, addr: IPAddr) -> bool:
        return addr.version == self.version and int(self.first) <= int(addr) <= int(self.last)

    def _mine(self, addr: IPAddr) -> bool:
        a, b = self.share or (self.first, self.last)
        return addr.version == self.version and int(a) <= int(addr) <= int(b)

    def _free(self, addr: IPAddr) -> bool:
        return addr not in self.online and addr not in self.away and addr not in self.reserved

    def acquire(self, identity: str, want: IPAddr | None = None) -> IPAddr | None:
        """An address for ``identity`` (online from now on), ``want`` if it may have it (its
        own offline lease, or an address of our share nobody has), else its own offline
        lease, else one never leased, else the oldest offline lease of another identity.
        None: the pool is exhausted."""
        if want is not None and self._mine(want) and self._free(want) and (
                self.offline.get(want, identity) == identity):  # fmt: skip
            return self._take(want, identity)
        mine = next((a for a, who in self.offline.items() if who == identity), None)
        if mine is not None:
            return self._take(mine, identity)
        a, b = self.share or (self.first, self.last)
        size = int(b) - int(a) + 1
        while self._next < size:
            cand = ipaddress.ip_address(int(a) + self._next)
            self._next += 1
            if self._free(cand) and cand not in self.offline:
                return self._take(cand, identity)
        for cand in list(self.offline):
            if self._mine(cand) and self._free(cand):
                return self._take(cand, identity)
        return None

    def _take(self, addr: IPAddr, identity: str) -> IPAddr:
        self.offline.pop(addr, None)
        self.online[addr] = identity
        self._tell(addr, "online", identity)
        return addr

    def _tell(self, addr: IPAddr, state: str, identity: str) -> None:
        if self.listener is not None:
            self.listener(self.name, addr, state, identity)

    def release(self, addr: IPAddr) -> None:
        """The IKE SA holding ``addr`` ended: offline, for its identity to get back."""
        who = self.online.pop(addr, None)
        if who is not None:
            self.offline[addr] = who
            self.offline.move_to_end(addr)
            self._tell(addr, "offline", who)

    def send_away(self, addr: IPAddr) -> None:
        """The IKE SA holding ``addr`` moved to another gateway."""
        who = self.online.pop(addr, None)
        if who is not None:
            self.away[addr] = who
            self._tell(addr, "away", who)

    def note(self, addr: IPAddr, state: str = "online") -> None:
        """Tell the listener an online lease again, as ``state`` ("leaving": its IKE SA is
        being handed over; "online": it stays after all). The pool does not change."""
        who = self.online.get(addr)
        if who is not None:
            self._tell(addr, state, who)

    def give_back(self, addr: IPAddr) -> str | None:
        """The operator says the away ``addr``'s IKE SA has ended wherever it went: offline
        for its identity (the first offline lease another identity gets when the pool runs
        out). None if so, else why not."""
        who = self.away.pop(addr, None)
        if who is None:
            state = "online" if addr in self.online else (
                "offline" if addr in self.offline else "not leased")  # fmt: skip
            return f"virtual IP {addr} of pool {self.name!r} is {state}, not away"
        self.offline[addr] = who
        self.offline.move_to_end(addr, last=False)
        self._tell(addr, "offline", who)
        return None

    def restore(self, addr: IPAddr, state: str, identity: str) -> bool:
        """A lease the gateway's durable state kept across a restart (offline ones oldest
        first), without telling the listener. False: not this pool's (its ``addrs`` changed)
        or not a state to restore (online: the caller decides what it has become)."""
        if not self.contains(addr) or addr in self.online:
            return False
        if state == "offline":
            if addr in self.away:
                return True  # a second row for it (a hand-made table): away is kept
            self.offline[addr] = identity
            self.offline.move_to_end(addr)
        elif state == "away":
            self.offline.pop(addr, None)
            self.away[addr] = identity
        else:
            return False
        return True

    def leases(self) -> list[tuple[IPAddr, str, str]]:
        """(address, state, identity) of every lease, by address."""
        return sorted(self.leases_unsorted(), key=lambda r: int(r[0]))

    def leases_unsorted(self) -> Iterator[tuple[IPAddr, str, str]]:
        """(address, state, identity) of every lease: online, offline, away."""
        for a, who in self.online.items():
            yield a, "online", who
        for a, who in self.offline.items():
            yield a, "offline", who
        for a, who in self.away.items():
            yield a, "away", who

    def refusal(self, addr: IPAddr, identity: str | None = None,
                owner: str | None = None) -> str | None:  # fmt: skip
        """Why an IKE SA (of ``identity``; None: not known) holding ``addr`` cannot arrive
        here (None: it can), by the transfer ``owner`` (None: its import). A reservation
        admits the transfer that made it and the import of an IKE SA of its identity."""
        if not self.contains(addr):
            return f"virtual IP {addr} is not in pool {self.name!r} here"
        who = self.online.get(addr)
        if who is not None:
            return f"virtual IP {addr} of pool {self.name!r} is leased here already"
        held = self.reserved.get(addr)
        ours = owner is not None and held is not None and held[1] == owner
        its = owner is None and identity is not None and held is not None and (
            held[0] in ("", identity))  # fmt: skip
        if held is not None and not (ours or its):
            return (f"virtual IP {addr} of pool {self.name!r} is reserved here for another"
                    " transfer")  # fmt: skip
        return None

    def reserve(self, addr: IPAddr, identity: str | None, owner: str) -> None:
        """Transfer ``owner``, carrying an IKE SA (of ``identity``; None: not said here)
        that holds ``addr``, was accepted and waits for its COMMIT (checked with
        :meth:`refusal` first): not leased meanwhile."""
        held = self.reserved.get(addr)
        if identity is None:
            identity = held[0] if held is not None and held[1] == owner else ""
        self.reserved[addr] = (identity, owner)

    def unreserve(self, addr: IPAddr, owner: str) -> None:
        """Transfer ``owner`` ended without the IKE SA arriving (a no-op once it arrived,
        or when another transfer holds ``addr``)."""
        held = self.reserved.get(addr)
        if held is not None and held[1] == owner:
            del self.reserved[addr]

    def arrive(self, addr: IPAddr, identity: str) -> None:
        """An IKE SA holding ``addr`` arrived (checked with :meth:`refusal` first)."""
        self.away.pop(addr, None)
        self.reserved.pop(addr, None)
        self._take(addr, identity)

    def status(self) -> dict[str, object]:
        return {
            "name": self.name,
            "addrs": f"{self.first}-{self.last}",
            "share": None if self.share is None else f"{self.share[0]}-{self.share[1]}",
            "online": len(self.online),
            "offline": len(self.offline),
            "away": len(self.away),
            "reserved": len(self.reserved),
        }

"""The Security Policy Database (RFC 4301 §4.4.1) and its selectors (draft §8).

A policy's selectors are: local and remote addresses (lists of ranges; a prefix or a single
address is a range), the next-layer protocol, local and remote ports (for ICMP and ICMPv6 the
"local port" range holds the ICMP type and the "remote port" range the ICMP code, as RFC 4301
§4.4.1.1 does), a Name and a sensitivity label.

Entries are ordered; a lookup returns the first entry that matches, which is RFC 4301's rule for
an SPD that is not decorrelated. :meth:`SPD.decorrelate` reports the pairs of entries whose
order matters (they overlap but take different actions), so an operator can see them. Static
operator entries (``static=True``) are not transferred; per-SA entries are (draft §8).
"""

from __future__ import annotations

import bisect
import enum
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import SAError
from .ippacket import IPAddress

PROTO_ANY = 0  # "ANY" next-layer protocol (0 is IPv6 hop-by-hop, never a selector value)
PROTO_ICMP = 1
PROTO_ICMPV6 = 58
ICMP_PROTOCOLS = (PROTO_ICMP, PROTO_ICMPV6)


class Action(enum.Enum):
    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"


@dataclass(frozen=True, order=True)
class AddressRange:
    first: IPAddress
    last: IPAddress

    def __post_init__(self) -> None:
        first, last = self.first, self.last
        # (the versions are Python properties: asked only when the types differ)
        if type(first) is not type(last) and first.version != last.version:
            raise SAError("an address range mixes IPv4 and IPv6")
        if int(first) > int(last):
            raise SAError(f"address range {self.first}-{self.last} is empty")

    @classmethod
    def parse(cls, text: str) -> AddressRange:
        """``10.0.0.1``, ``10.0.0.0/24``, ``10.0.0.1-10.0.0.9`` or ``::1``."""
        try:
            if "-" in text:
                a, b = text.split("-", 1)
                return cls(ipaddress.ip_address(a.strip()), ipaddress.ip_address(b.strip()))
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError as exc:
            raise SAError(f"bad address or range {text!r}: {exc}") from None
        return cls(net.network_address, net.broadcast_address)

    @classmethod
    def any(cls, version: int) -> AddressRange:
        return cls.parse("0.0.0.0/0" if version == 4 else "::/0")

    @property
    def version(self) -> int:
        return self.first.version

    def contains(self, addr: IPAddress) -> bool:
        return addr.version == self.first.version and self.first <= addr <= self.last  # type: ignore[operator]

    def overlaps(self, other: AddressRange) -> bool:
        # Integers, as in covers (below): an arriving tunnel's selectors are checked against
        # the policy's entries on the handover's path.
        first: Any = self.first
        ofirst: Any = other.first
        olast: Any = other.last
        last: Any = self.last
        met: bool = (
            first._version == ofirst._version and first._ip <= olast._ip and ofirst._ip <= last._ip
        )
        return met

    def covers(self, other: AddressRange) -> bool:
        """Is ``other`` wholly inside this range?"""
        # Integers, not the addresses' rich comparisons (each ``<=`` is three Python calls):
        # a bulk transfer checks every transferred tunnel's ranges against the policy.
        # (``_version`` and ``_ip`` are what ``version`` and ``int()`` return, read as plain
        # attributes: those two are Python-level calls in ``ipaddress``. Also below.)
        first: Any = self.first
        ofirst: Any = other.first
        olast: Any = other.last
        last: Any = self.last
        inside: bool = (
            first._version == ofirst._version and first._ip <= ofirst._ip and olast._ip <= last._ip
        )
        return inside

    def __str__(self) -> str:
        if self.first == self.last:
            return str(self.first)
        net = one_prefix(self.first, self.last)
        return str(net) if net is not None else f"{self.first}-{self.last}"


def one_prefix(
    first: IPAddress, last: IPAddress
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The network ``first``..``last`` is when it is exactly one prefix (``10.0.0.0/24``, a
    host ``/32``); None when it is not one, or the range is backwards or of mixed families
    (a peer's traffic selector, shown as it came, never raised on)."""
    if first.version != last.version or first > last:  # type: ignore[operator]
        return None
    # one prefix: the host bits of first clear, those of last set, and as many
    span = int(last) - int(first) + 1
    if span & (span - 1) or int(first) % span:
        return None
    return ipaddress.ip_network((first, first.max_prefixlen - (span.bit_length() - 1)))


class RangeSet:
    """A few address ranges as integers, to check many ranges against (a bulk transfer checks
    every tunnel's selectors against the operator's accepted ranges)."""

    def __init__(self, ranges: Iterable[AddressRange]) -> None:
        self._spans = tuple((r.first.version, int(r.first), int(r.last)) for r in ranges)

    def covers(self, r: AddressRange) -> bool:
        """Is ``r`` wholly inside one of the ranges?"""
        first: Any = r.first
        last: Any = r.last
        version, a, b = first._version, first._ip, last._ip
        for v, lo, hi in self._spans:  # noqa: SIM110 (no generator per range checked)
            if v == version and lo <= a and b <= hi:
                return True
        return False


@dataclass(frozen=True)
class PortRange:
    first: int = 0
    last: int = 65535

    def __post_init__(self) -> None:
        if not (0 <= self.first <= self.last <= 65535):
            raise SAError(f"bad port range {self.first}-{self.last}")

    @classmethod
    def parse(cls, text: str | int) -> PortRange:
        if isinstance(text, int):
            return cls(text, text)
        t = text.strip().lower()
        if t in ("any", "*", ""):
            return cls()
        try:
            if "-" in t:
                a, b = t.split("-", 1)
                return cls(int(a), int(b))
            return cls(int(t), int(t))
        except ValueError:
            raise SAError(f"bad port range {text!r}") from None

    @property
    def is_any(self) -> bool:
        return self.first == 0 and self.last == 65535

    def contains(self, port: int) -> bool:
        return self.first <= port <= self.last

    def overlaps(self, other: PortRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        if self.is_any:
            return "any"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Selectors:
    """The traffic an SA or a policy covers, seen from the gateway ("local" is its side)."""

    local: tuple[AddressRange, ...]
    remote: tuple[AddressRange, ...]
    protocol: int = PROTO_ANY
    local_ports: PortRange = field(default_factory=PortRange)
    remote_ports: PortRange = field(default_factory=PortRange)
    name: str | None = None
    label: bytes | None = None

    def __post_init__(self) -> None:
        if not self.local or not self.remote:
            raise SAError("selectors need at least one local and one remote address range")
        if not 0 <= self.protocol <= 255:
            raise SAError(f"bad next-layer protocol {self.protocol}")
        if self.protocol in ICMP_PROTOCOLS and any(
            not r.is_any and r.last > 255 for r in (self.local_ports, self.remote_ports)
        ):
            raise SAError("ICMP type and code selectors must be 0-255")

    @classmethod
    def between(
        cls,
        local: str | Iterable[str],
        remote: str | Iterable[str],
        protocol: int = PROTO_ANY,
        local_ports: str | int = "any",
        remote_ports: str | int = "any",
        name: str | None = None,
        label: bytes | None = None,
    ) -> Selectors:
        def ranges(x: str | Iterable[str]) -> tuple[AddressRange, ...]:
            items = [x] if isinstance(x, str) else list(x)
            return tuple(AddressRange.parse(i) for i in items)

        return cls(
            ranges(local),
            ranges(remote),
            protocol,
            PortRange.parse(local_ports),
            PortRange.parse(remote_ports),
            name,
            label,
        )

    def _int_ranges(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """(version, first, last) of the local and remote ranges as integers (cached)."""
        cached: tuple[tuple[tuple[int, int, int], ...], ...] | None = self.__dict__.get("_ints")
        if cached is None:
            cached = tuple(
                tuple((r.version, int(r.first), int(r.last)) for r in side)
                for side in (self.local, self.remote)
            )
            object.__setattr__(self, "_ints", cached)
        return cached

    def matches_int(
        self,
        version: int,
        local: int,
        remote: int,
        protocol: int,
        local_port: int | None = None,
        remote_port: int | None = None,
    ) -> bool:
        """:meth:`matches` for addresses given as integers (the data path's fast form)."""
        if self.protocol != PROTO_ANY and self.protocol != protocol:
            return False
        loc, rem = self._int_ranges()
        if not any(v == version and a <= local <= b for v, a, b in loc):
            return False
        if not any(v == version and a <= remote <= b for v, a, b in rem):
            return False
        return self._ports_match(local_port, remote_port)

    def _ports_match(self, local_port: int | None, remote_port: int | None) -> bool:
        if self.local_ports.is_any and self.remote_ports.is_any:
            return True
        if local_port is None or remote_port is None:
            return False  # OPAQUE ports (e.g. a non-initial fragment) match only ANY
        return self.local_ports.contains(local_port) and self.remote_ports.contains(remote_port)

    def matches(
        self,
        local: IPAddress,
        remote: IPAddress,
        protocol: int,
        local_port: int | None = None,
        remote_port: int | None = None,
    ) -> bool:
        """Does a packet with these header fields fall under the selectors?

        For ICMP, pass the type as ``local_port`` and the code as ``remote_port``.
        """
        if local.version != remote.version:
            return False
        return self.matches_int(
            local.version, int(local), int(remote), protocol, local_port, remote_port
        )

    def overlaps(self, other: Selectors) -> bool:
        if (
            self.protocol != PROTO_ANY
            and other.protocol != PROTO_ANY
            and self.protocol != other.protocol
        ):
            return False
        if not any(a.overlaps(b) for a in self.local for b in other.local):
            return False
        if not any(a.overlaps(b) for a in self.remote for b in other.remote):
            return False
        return self.local_ports.overlaps(other.local_ports) and self.remote_ports.overlaps(
            other.remote_ports
        )

    def within(
        self, local: Iterable[AddressRange] | RangeSet, remote: Iterable[AddressRange] | RangeSet
    ) -> bool:
        """Does every local range lie inside one of ``local``, and every remote range inside
        one of ``remote``? (What an operator allows for transferred tunnels.) A caller that
        checks many selectors against the same ranges passes :class:`RangeSet` s."""
        loc = local if isinstance(local, RangeSet) else RangeSet(local)
        rem = remote if isinstance(remote, RangeSet) else RangeSet(remote)
        for r in self.local:  # (loops, not all() over generators: asked per tunnel)
            if not loc.covers(r):
                return False
        for r in self.remote:  # noqa: SIM110
            if not rem.covers(r):
                return False
        return True

    def mirrored(self) -> Selectors:
        """The same traffic seen from the other end (local and remote swapped)."""
        ports = (self.remote_ports, self.local_ports)
        if self.protocol in ICMP_PROTOCOLS:
            ports = (self.local_ports, self.remote_ports)  # type/code do not swap
        return Selectors(
            self.remote, self.local, self.protocol, ports[0], ports[1], self.name, self.label
        )

    def describe(self) -> str:
        loc = ",".join(map(str, self.local))
        rem = ",".join(map(str, self.remote))
        proto = "any" if self.protocol == PROTO_ANY else str(self.protocol)
        return f"{loc}[{self.local_ports}] <-> {rem}[{self.remote_ports}] proto {proto}"


@dataclass
class SPDEntry:
    selectors: Selectors
    action: Action
    name: str = ""
    static: bool = True  # an operator's policy; False: an SA's own entry (transferred)
    sa_ids: list[int] = field(default_factory=list)  # outbound SPIs that carry PROTECT traffic


class SPD:
    """An ordered Security Policy Database: first match wins (RFC 4301 §4.4.1).

    A lookup does not try every entry: an entry whose remote ranges are all single addresses
    (a mobile node's inner address: the usual tunnel) is filed under those addresses, else one
    whose local ranges are all single addresses under those. An entry with ranges (a site's
    subnets) is filed under the smallest prefix that covers each of its remote ranges (a range
    10.1.0.0-10.1.0.255 under 10.1.0.0/24, 10.1.0.5-10.1.0.9 under 10.1.0.0/28), else of its
    local ranges; only an entry that has ANY (or a range as wide as half the address space) on
    both sides is kept in the general list. Every entry has a rank that grows with its position;
    a lookup tries the entries filed under the packet's remote address, under its local address,
    under each prefix length in use masked from the packet's remote and local addresses, then
    the general list, each in rank order and only below the best rank found so far, and returns
    the lowest-ranked match: exactly the first match of the ordered list
    (:meth:`_lookup_linear`, kept as the reference)."""

    STEP = 1 << 32  # rank gap between entries appended one after another

    def __init__(self, entries: Iterable[SPDEntry] = ()) -> None:
        self._entries: list[SPDEntry] = []
        # parallel to _entries, strictly increasing (None: to be made again from _rank)
        self._ranks: list[int] | None = []
        self._rank: dict[int, int] = {}  # id(entry) -> its rank
        # address key (version << 128 | address) -> the entry filed under it, or a list of
        # them sorted by rank (one entry: no list; an install allocates nothing per entry
        # that the garbage collector would have to walk)
        self._by_remote: dict[int, SPDEntry | list[SPDEntry]] = {}
        self._by_local: dict[int, SPDEntry | list[SPDEntry]] = {}
        # prefix key (version << 136 | length << 128 | address >> (bits - length)) -> the
        # entries filed under that covering prefix, as above; and per table and version, the
        # prefix lengths in use (longest first) with how many keys each has
        self._by_remote_net: dict[int, SPDEntry | list[SPDEntry]] = {}
        self._by_local_net: dict[int, SPDEntry | list[SPDEntry]] = {}
        self._plens: dict[int, dict[int, int]] = {}  # id(table) << 3 | version -> length -> n
        self._plen_list: dict[int, tuple[int, ...]] = {}  # same key -> lengths, longest first
        self._general: list[SPDEntry] = []  # the rest, sorted by rank
        self.extend(entries)

    def __iter__(self) -> Iterator[SPDEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _keys(ranges: tuple[AddressRange, ...]) -> int | tuple[int, ...] | None:
        """The address key of a range set that is one single address, the keys of one that
        is several single addresses, else None."""
        if len(ranges) == 1:  # (the usual: no list, no loop)
            f: Any = ranges[0].first
            lst: Any = ranges[0].last
            ip = f._ip
            return (f._version << 128) | ip if ip == lst._ip else None
        keys = []
        for r in ranges:
            f = r.first
            lst = r.last
            if f._ip != lst._ip:
                return None
            keys.append((f._version << 128) | f._ip)
        return tuple(dict.fromkeys(keys))  # (an address listed twice: filed once)

    @staticmethod
    def _net_keys(ranges: tuple[AddressRange, ...]) -> tuple[int, ...] | None:
        """The prefix keys of the smallest prefixes covering each range, or None when one of
        them is as wide as half the address space or more (filing it would not narrow the
        search)."""
        keys = []
        for r in ranges:
            f: Any = r.first
            lst: Any = r.last
            bits = 32 if f._version == 4 else 128
            plen = bits - (f._ip ^ lst._ip).bit_length()
            if plen < 1:
                return None
            keys.append((f._version << 136) | (plen << 128) | (f._ip >> (bits - plen)))
        return tuple(dict.fromkeys(keys))

    def _where(
        self, entry: SPDEntry
    ) -> tuple[dict[int, SPDEntry | list[SPDEntry]] | None, int | tuple[int, ...] | None]:
        """The table ``entry`` is filed in (None: the general list) and its key(s) there."""
        sel = entry.selectors
        keys = self._keys(sel.remote)
        if keys is not None:
            return self._by_remote, keys
        keys = self._keys(sel.local)
        if keys is not None:
            return self._by_local, keys
        keys = self._net_keys(sel.remote)
        if keys is not None:
            return self._by_remote_net, keys
        keys = self._net_keys(sel.local)
        if keys is not None:
            return self._by_local_net, keys
        return None, None

    def _count_plen(self, table: dict[int, SPDEntry | list[SPDEntry]], key: int, n: int) -> None:
        """A key of a prefix table came (n = 1) or went (n = -1): keep its length's count."""
        version = key >> 136
        plen = (key >> 128) & 0xFF
        tk = id(table) << 3 | version
        counts = self._plens.setdefault(tk, {})
        left = counts.get(plen, 0) + n
        if left:
            counts[plen] = left
            if left > 1 or n < 0:
                return
        else:
            del counts[plen]
            if not counts:
                del self._plens[tk], self._plen_list[tk]
                return
        self._plen_list[tk] = tuple(sorted(counts, reverse=True))

    def _insert_ranked(self, lst: list[SPDEntry], entry: SPDEntry, rank: int) -> None:
        rk = self._rank
        if rk[id(lst[-1])] < rank:
            lst.append(entry)
        else:
            lst.insert(bisect.bisect_left(lst, rank, key=lambda e: rk[id(e)]), entry)

    def _file(self, entry: SPDEntry, rank: int) -> None:
        """Put ``entry`` with ``rank`` into the lookup structures (not into _entries)."""
        rk = self._rank
        if id(entry) in rk:
            raise SAError("this SPD entry is in the SPD already")
        rk[id(entry)] = rank
        remote = entry.selectors.remote
        if len(remote) == 1:  # (a tunnel to one inner address, alone there: the usual)
            f: Any = remote[0].first
            lst: Any = remote[0].last
            ip = f._ip
            if ip == lst._ip:
                key = (f._version << 128) | ip
                if key not in self._by_remote:
                    self._by_remote[key] = entry
                    return
        table, keys = self._where(entry)
        if table is None:
            if self._general:
                self._insert_ranked(self._general, entry, rank)
            else:
                self._general.append(entry)
            return
        nets = table is self._by_remote_net or table is self._by_local_net
        for key in (keys,) if isinstance(keys, int) else keys:  # type: ignore[union-attr]
            cur = table.get(key)
            if cur is None:
                table[key] = entry
                if nets:
                    self._count_plen(table, key, 1)
            elif type(cur) is list:
                self._insert_ranked(cur, entry, rank)
            else:
                pair: list[SPDEntry] = [cast(SPDEntry, cur), entry]
                if rk[id(cur)] > rank:
                    pair.reverse()
                table[key] = pair

    def _unfile(self, entry: SPDEntry) -> int:
        """Take ``entry`` out of the lookup structures; its rank (SAError: not in the SPD)."""
        rk = self._rank
        rank = rk.pop(id(entry), None)
        if rank is None:
            raise SAError("no such SPD entry")
        remote = entry.selectors.remote
        if len(remote) == 1:  # (as in _file)
            f: Any = remote[0].first
            lst: Any = remote[0].last
            ip = f._ip
            if ip == lst._ip:
                key = (f._version << 128) | ip
                if self._by_remote.get(key) is entry:
                    del self._by_remote[key]
                    return rank
        rk[id(entry)] = rank  # (the ranked lists below look it up)
        table, keys = self._where(entry)
        if table is None:
            gen = self._general
            i = bisect.bisect_left(gen, rank, key=lambda e: rk[id(e)])
            del gen[i]
        else:
            nets = table is self._by_remote_net or table is self._by_local_net
            for key in (keys,) if isinstance(keys, int) else keys:  # type: ignore[union-attr]
                cur = table[key]
                if type(cur) is list:
                    del cur[bisect.bisect_left(cur, rank, key=lambda e: rk[id(e)])]
                    if len(cur) == 1:
                        table[key] = cur[0]
                else:
                    del table[key]
                    if nets:
                        self._count_plen(table, key, -1)
        del rk[id(entry)]
        return rank

    def _renumber(self) -> None:
        """New ranks, evenly spaced, for every entry (no gap left for an insertion)."""
        entries = self._entries
        self._rank.clear()
        self._by_remote.clear()
        self._by_local.clear()
        self._by_remote_net.clear()
        self._by_local_net.clear()
        self._plens.clear()
        self._plen_list.clear()
        self._general = []
        self._ranks = [(i + 1) * self.STEP for i in range(len(entries))]
        for e, rank in zip(entries, self._ranks, strict=True):
            self._file(e, rank)

    def _rank_list(self) -> list[int]:
        """The ranks in order (after a bulk removal: made again from the slots, once)."""
        ranks = self._ranks
        if ranks is None:
            rk = self._rank
            ranks = self._ranks = [rk[id(e)] for e in self._entries]
        return ranks

    def _last_rank(self) -> int:
        if not self._entries:
            return 0
        return self._rank[id(self._entries[-1])]

    def add(self, entry: SPDEntry, *, index: int | None = None) -> None:
        """Append ``entry``, or insert it before position ``index`` (as list.insert does)."""
        n = len(self._entries)
        if index is not None:
            if index < 0:
                index = max(index + n, 0)
            index = min(index, n)
        if index is None or index == n:
            rank = self._last_rank() + self.STEP
            self._file(entry, rank)
            self._entries.append(entry)
            if self._ranks is not None:
                self._ranks.append(rank)
            return
        ranks = self._rank_list()
        lo = ranks[index - 1] if index > 0 else 0
        hi = ranks[index]
        if hi - lo < 2:
            self._renumber()
            ranks = self._rank_list()
            lo = ranks[index - 1] if index > 0 else 0
            hi = ranks[index]
        rank = (lo + hi) // 2
        self._file(entry, rank)
        self._entries.insert(index, entry)
        ranks.insert(index, rank)

    def extend(self, entries: Iterable[SPDEntry]) -> None:
        """Append ``entries`` in order (a bulk install)."""
        out, ranks = self._entries, self._ranks
        rank = self._last_rank()
        step = self.STEP
        file = self._file
        for e in entries:
            rank += step
            file(e, rank)
            out.append(e)
            if ranks is not None:
                ranks.append(rank)

    def index_of(self, entry: SPDEntry) -> int | None:
        """The position of this very entry (None: not in the SPD), without a walk."""
        rank = self._rank.get(id(entry))
        if rank is None:
            return None
        return bisect.bisect_left(self._rank_list(), rank)

    def remove_many(self, entries: Iterable[SPDEntry]) -> None:
        """Remove these very entries in one pass over the database (removing thousands one by
        one would walk it once each). Entries not in it are ignored."""
        rk = self._rank
        gone = False
        for e in entries:
            if id(e) in rk:
                self._unfile(e)
                gone = True
        if gone:
            self._entries = [e for e in self._entries if id(e) in rk]
            self._ranks = None  # (made again when a position is asked for)

    def remove(self, entry: SPDEntry) -> None:
        """Remove this very entry (not one that merely compares equal)."""
        if id(entry) not in self._rank:
            raise SAError("no such SPD entry")
        ranks = self._rank_list()  # (before the entry's slot goes)
        rank = self._unfile(entry)
        i = bisect.bisect_left(ranks, rank)
        del self._entries[i]
        del ranks[i]

    def lookup(
        self,
        local: IPAddress,
        remote: IPAddress,
        protocol: int,
        local_port: int | None = None,
        remote_port: int | None = None,
    ) -> SPDEntry | None:
        """The first entry (in order) whose selectors match, or None."""
        loc: Any = local
        rem: Any = remote
        version = loc._version
        if rem._version != version:
            return None
        li, ri = loc._ip, rem._ip
        rk = self._rank
        best: SPDEntry | None = None
        best_rank = -1
        cur = self._by_remote.get((version << 128) | ri)
        if cur is not None:
            if type(cur) is list:
                for e in cur:
                    if e.selectors.matches_int(version, li, ri, protocol, local_port, remote_port):
                        best = e
                        break
            elif cur.selectors.matches_int(  # type: ignore[union-attr]
                version, li, ri, protocol, local_port, remote_port
            ):
                best = cur  # type: ignore[assignment]
            if best is not None:
                best_rank = rk[id(best)]
        cur = self._by_local.get((version << 128) | li)
        if cur is not None:
            for e in cur if type(cur) is list else (cast(SPDEntry, cur),):
                if best is not None and rk[id(e)] > best_rank:
                    break
                if e.selectors.matches_int(version, li, ri, protocol, local_port, remote_port):
                    best = e
                    best_rank = rk[id(e)]
                    break
        if self._plen_list:
            bits = 32 if version == 4 else 128
            for table, addr in ((self._by_remote_net, ri), (self._by_local_net, li)):
                for plen in self._plen_list.get(id(table) << 3 | version, ()):
                    cur = table.get((version << 136) | (plen << 128) | (addr >> (bits - plen)))
                    if cur is None:
                        continue
                    for e in cur if type(cur) is list else (cast(SPDEntry, cur),):
                        if best is not None and rk[id(e)] > best_rank:
                            break
                        if e.selectors.matches_int(
                            version, li, ri, protocol, local_port, remote_port
                        ):
                            best = e
                            best_rank = rk[id(e)]
                            break
        for e in self._general:
            if best is not None and rk[id(e)] > best_rank:
                break
            if e.selectors.matches_int(version, li, ri, protocol, local_port, remote_port):
                return e
        return best

    def _lookup_linear(
        self,
        local: IPAddress,
        remote: IPAddress,
        protocol: int,
        local_port: int | None = None,
        remote_port: int | None = None,
    ) -> SPDEntry | None:
        """:meth:`lookup` by trying every entry in order (the reference it is tested against)."""
        for e in self._entries:
            if e.selectors.matches(local, remote, protocol, local_port, remote_port):
                return e
        return None

    def decorrelate(self) -> list[tuple[SPDEntry, SPDEntry]]:
        """Pairs (earlier, later) of entries that overlap and take different actions: the
        ones whose order decides what happens to some packets (RFC 4301 §4.4.1.2)."""
        out = []
        for i, a in enumerate(self._entries):
            for b in self._entries[i + 1 :]:
                if a.action != b.action and a.selectors.overlaps(b.selectors):
                    out.append((a, b))
        return out

    def transferable(self) -> list[SPDEntry]:
        return [e for e in self._entries if not e.static]


class OverlapIndex:
    """Which of many selectors overlap a given one, without comparing against each.

    Tunnels' remote ranges are mostly narrow (one mobile node's inner address): those are kept
    sorted by their first address and found by bisection, looking back only as far as the
    widest of them spans; the few wide ones are compared one by one. Used to refuse a
    transferred tunnel whose traffic another tunnel already carries.

    The sorted ranges are kept in blocks of up to ``2 * LOAD`` (each with its last key in
    ``_maxes``), so that adding one out of order moves at most a block, not all of them: a bulk
    transfer whose ranges came in no particular order made one sorted list quadratic (100,000
    tunnels: 21-34 us each against 3 in order).
    """

    WIDE = 1 << 16  # remote ranges with more addresses than this are compared one by one
    LOAD = 512

    def __init__(self) -> None:
        # Blocks of (version, first), sorted across the blocks, and parallel to them blocks of
        # (last, selectors, value); _maxes holds each block's last (version, first).
        self._keys: list[list[tuple[int, int]]] = []
        self._items: list[list[tuple[int, Selectors, object]]] = []
        self._maxes: list[tuple[int, int]] = []
        self._wide: list[tuple[Selectors, object]] = []
        self._span = 0  # the widest narrow range: last - first

    def add(self, sel: Selectors, value: object) -> None:
        for r in sel.remote:
            f: Any = r.first
            lst: Any = r.last
            first, last = f._ip, lst._ip
            if last - first >= self.WIDE:
                self._wide.append((sel, value))
                continue
            self._span = max(self._span, last - first)
            key = (f._version, first)
            maxes = self._maxes
            b = bisect.bisect_right(maxes, key)  # the first block whose last key is above
            if b == len(maxes):  # above them all (the usual): at the end of the last block
                if not maxes:
                    self._keys.append([])
                    self._items.append([])
                    maxes.append(key)
                b = len(maxes) - 1
                keys, items = self._keys[b], self._items[b]
                keys.append(key)
                items.append((last, sel, value))
                maxes[b] = key
            else:  # after its equals, as in one sorted list
                keys, items = self._keys[b], self._items[b]
                i = bisect.bisect_right(keys, key)
                keys.insert(i, key)
                items.insert(i, (last, sel, value))
            if len(keys) > 2 * self.LOAD:
                half = len(keys) // 2
                self._keys[b : b + 1] = [keys[:half], keys[half:]]
                self._items[b : b + 1] = [items[:half], items[half:]]
                maxes[b : b + 1] = [keys[half - 1], keys[-1]]

    def overlapping(self, sel: Selectors) -> list[object]:
        if not self._maxes and not self._wide:
            return []  # (a transfer's target asks an empty one for every tunnel it takes)
        found: list[object] = []
        seen: set[int] = set()

        def hit(other: Selectors, value: object) -> None:
            if id(value) not in seen and other.overlaps(sel):
                seen.add(id(value))
                found.append(value)

        for other, value in self._wide:
            hit(other, value)
        maxes, kblocks, iblocks, span = self._maxes, self._keys, self._items, self._span
        for r in sel.remote:
            f: Any = r.first
            lst: Any = r.last
            ver, a, b = f._version, f._ip, lst._ip
            top = (ver, b)
            # From the last key at or below (ver, b) backwards, block by block.
            blk = bisect.bisect_right(maxes, top)
            if blk < len(maxes):
                i = bisect.bisect_right(kblocks[blk], top)
            else:
                blk -= 1
                i = len(kblocks[blk]) if blk >= 0 else 0
            while blk >= 0:
                keys, items = kblocks[blk], iblocks[blk]
                while i > 0:
                    i -= 1
                    v, first = keys[i]
                    if v != ver or first < a - span:
                        blk = 0  # (and out of the outer loop)
                        break
                    last, other, value = items[i]
                    if last >= a:
                        hit(other, value)
                blk -= 1
                if blk >= 0:
                    i = len(kblocks[blk])
        return found

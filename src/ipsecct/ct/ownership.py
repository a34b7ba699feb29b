"""Ownership of tunnels in a cluster on etcd (sans-I/O): the keys, the member's own lease as a
fence, groups of tunnels and who takes a dead member's groups.

Keys (under ``/ipsecct/<cluster>/``; etcd holds ownership, membership and allocation only,
never keys or contexts):

* ``members/<name>``: the member's channel address, its lease and its number of home groups,
  attached to the member's etcd lease;
* ``groups/<gid>``: an *owner key*: the member that may send on the tunnels of group ``gid``,
  attached to the *owner's* lease, so that it disappears exactly when the owner's lease ends.
  A member creates its home groups ``<lease>-<k>`` when it joins (``k < groups``); taking a
  group over is a transaction "create ``groups/<gid>`` only if it does not exist", which
  succeeds only once the previous owner's lease is gone, and only for one member;
* ``tunnels/<outbound SPI, 8 hex digits>``: the group the tunnel belongs to (no lease: it
  outlives its owner, which is the point: a take-over writes one key per group, not per
  tunnel). It is created (only if absent) by the member that has the tunnel, into one of its
  home groups, and changed or deleted only by a transaction conditioned on the group's owner
  key being under the acting member's lease: a transfer moves it into one of the target's
  home groups in the same step, and a group without owner is frozen;
* ``spi-blocks/<i>``: the member that allocates inbound SPIs from block ``i``
  (:mod:`ipsecct.ipsec.spi`); a claim outlives its member's lease, since that member's SAs
  live on at the survivors.

A member sends on a tunnel only while ``tunnels/<spi>`` names a group whose owner key is
under its lease (:meth:`Ownership.owns`), and only within the fence below. Every change of
either key is one of the transactions built here, and each is conditioned so that this
belief can only be changed by the member that holds it.

The member's right to send is its etcd lease, seen from its own clock. etcd's leader revokes
a lease no earlier than TTL (on the leader's clock) after it processed the last keep-alive,
which is after the member sent it; a new leader only extends leases. With clock rates within
``1 -/+ rho``: the lease cannot end before ``TTL / (1 + rho)`` real seconds after the
keep-alive left. The member stops once its own clock says ``fence`` has passed since it sent
the keep-alive, which is at most ``fence / (1 - rho)`` real seconds, so with

    fence = TTL * (1 - rho) / (1 + rho) - guard

it has stopped, by at least ``guard``, before etcd can let anyone else create its owner keys.
A member cut off from etcd therefore stops sending before anyone can take over.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from .lease import LeaseTiming

PREFIX = "/ipsecct"


def fence_timing(ttl_s: float, drift_ppm: float, guard_ms: float) -> LeaseTiming:
    """The local lease a member may use for an etcd lease of ``ttl_s`` seconds."""
    rho = drift_ppm / 1e6
    guard = guard_ms / 1000
    lease = ttl_s * (1 - rho) / (1 + rho) - guard
    if lease <= 0:
        raise ValueError("the etcd lease is too short for the guard and the drift bound")
    # ``wait`` stands for etcd's side: the lease ends no earlier than the TTL after the
    # keep-alive (on the leader's clock), which is what LeaseTiming's check expresses.
    return LeaseTiming(lease, ttl_s, rho, guard)


T = TypeVar("T", int, str)

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: compares and operations, each
GROUPS = 32  # home groups per member ([cluster] groups)


def keys(cluster: str) -> dict[str, str]:
    base = f"{PREFIX}/{cluster}/"
    return {
        "members": base + "members/",
        "groups": base + "groups/",
        "tunnels": base + "tunnels/",
        "blocks": base + "spi-blocks/",
    }


def tunnel_key(cluster: str, spi: int) -> str:
    return f"{keys(cluster)['tunnels']}{spi:08x}"


def spi_of_key(key: str) -> int | None:
    """The SPI of a tunnel key as :func:`tunnel_key` spells it (8 lower-case hex digits),
    else None. Any other spelling int() reads (``0x002000``, ``+0002000``, ``000_2000``,
    upper case, spaces) is a key of its own in etcd beside the true one: taken for the same
    SPI, its group replaced the true one's in a reading (a hostile writer's key made a member
    take over a tunnel another member sends on)."""
    tail = key.rsplit("/", 1)[-1]
    if len(tail) != 8 or not all(c in "0123456789abcdef" for c in tail):
        return None
    return int(tail, 16)


def home_group(lease: int, k: int) -> str:
    """The ``k``-th home group of the member holding etcd lease ``lease`` (lease IDs are
    unique in an etcd cluster, so a member that joins again gets new groups)."""
    return f"{lease:016x}-{k}"


def lease_of_group(gid: str) -> int:
    """The lease of the member that created group ``gid`` (0 if ``gid`` is not one: its
    head is not 16 lower-case hex digits as :func:`home_group` writes them; ``0x…``, ``+…``
    or upper case named the lease of another group's creator too)."""
    head = gid.partition("-")[0]
    if len(head) != 16 or not all(c in "0123456789abcdef" for c in head):
        return 0
    return int(head, 16)


def bucket(spi: int, n: int) -> int:
    """Which of ``n`` home groups a tunnel goes into (Knuth's multiplicative hash: sequential
    SPIs spread too)."""
    return ((spi * 2654435761) & 0xFFFFFFFF) * n >> 32


def _weight(member: str, item: str) -> bytes:
    return hashlib.sha256(f"{member}\0{item}".encode()).digest()


def successor(item: int | str, members: Iterable[str]) -> str | None:
    """Rendezvous (highest random weight) hashing: the member that takes ``item`` (a group,
    or a tunnel by SPI) when its owner is gone. Every member computes the same answer from
    the same member list, and a dead member's groups spread evenly over the survivors (not
    onto one fixed standby)."""
    key = f"{item:08x}" if isinstance(item, int) else item
    best: tuple[bytes, str] | None = None
    for m in members:
        w = (_weight(m, key), m)
        if best is None or w > best:
            best = w
    return None if best is None else best[1]


def successors(item: str, members: Iterable[str], n: int) -> list[str]:
    """The ``n`` members ranked highest for ``item`` (:func:`successor` is the first): whom
    a member replicates a group's tunnels to, so that whoever would take them holds them."""
    return [m for _, m in sorted(((_weight(m, item), m) for m in members), reverse=True)[:n]]


# What every group is ranked by when the members share one virtual address (indirect SG
# identity): one survivor takes all a dead member's groups, as only one can hold the address.
ONE_RANK = "virtual-address"


def plan(
    orphans: Iterable[T], survivors: Iterable[str], *, one: bool = False
) -> dict[str, list[T]]:
    """Which survivor takes which orphaned group (or tunnel); ``one``: as :func:`plan_groups`."""
    members = sorted(set(survivors))
    out: dict[str, list[T]] = {m: [] for m in members}
    for item in orphans:
        m = successor(ONE_RANK if one else item, members)
        if m is not None:
            out[m].append(item)
    return out


def group_rank(gid: str) -> str:
    """What rendezvous hashing ranks a group by: its bucket (``k`` of ``<lease>-<k>``), so
    that which survivor takes a tunnel depends on the tunnel's SPI and the member list only,
    not on the dead member's lease."""
    return "group-" + gid.rpartition("-")[2]


def plan_groups(
    orphans: Iterable[str], survivors: Iterable[str], *, one: bool = False
) -> dict[str, list[str]]:
    """Which survivor takes which orphaned group (``one``: all go to one survivor, the
    highest ranked for :data:`ONE_RANK`)."""
    members = sorted(set(survivors))
    out: dict[str, list[str]] = {m: [] for m in members}
    for gid in orphans:
        m = successor(ONE_RANK if one else group_rank(gid), members)
        if m is not None:
            out[m].append(gid)
    return out


# -- transactions (what the etcd client executes) ---------------------------------------------


@dataclass(frozen=True)
class Compare:
    """``key``'s ``target`` (CREATE: create revision, 0 when absent; LEASE; VALUE) equals
    ``value``. etcd compares an absent key as if it had revision 0 and lease 0, and fails
    every VALUE compare on it."""

    key: str
    target: str
    value: int | str


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


@dataclass(frozen=True)
class Txn:
    """All compares hold -> all operations, atomically; else nothing."""

    compare: tuple[Compare, ...]
    success: tuple[Put | Delete, ...]

    def __post_init__(self) -> None:
        if len(self.compare) > MAX_TXN_OPS or len(self.success) > MAX_TXN_OPS:
            raise ValueError(f"at most {MAX_TXN_OPS} compares and operations per transaction")


def absent(key: str) -> Compare:
    return Compare(key, "CREATE", 0)


def member_info(address: str, lease: int, groups: int) -> str:
    return json.dumps({"address": address, "lease": str(lease), "groups": groups})


MAX_LEASE = (1 << 63) - 1  # etcd's lease IDs are positive int64


def parse_member(value: bytes) -> tuple[str, int, int]:
    """(address, lease, home groups) of a member key's value; lease 0 if it makes no sense
    (anything :func:`member_info` does not write: the lease a decimal string of a positive
    int64; JSON's Infinity, a float or 2**80 as a lease are nonsense, not a traceback)."""
    try:
        d = json.loads(value)
        if not isinstance(d, dict):
            raise ValueError
        addr = d.get("address", "")
        text = d.get("lease", "0")
        groups = d.get("groups", GROUPS)
        if not isinstance(addr, str) or not isinstance(groups, int) or isinstance(groups, bool):
            raise ValueError
        if not isinstance(text, str) or len(text) > 19:
            raise ValueError
        if not (text.isascii() and text.isdigit()):
            raise ValueError
        lease = int(text)
        if not 1 <= groups <= MAX_TXN_OPS - 1 or not 0 <= lease <= MAX_LEASE:
            raise ValueError
        return addr, lease, groups
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
        return "", 0, GROUPS


class Ownership:
    """One member's view of what it owns, and the transactions that change it.

    ``groups``: the owner keys this member holds under its current lease; ``placed``: the
    group of each tunnel this member has, as etcd has it (learnt from its own successful
    transactions and from reads). A tunnel is this member's to send on while its group is
    one of ``groups`` (the fence on time is the caller's). Each method that builds a
    transaction has a counterpart to call once etcd said it succeeded."""

    def __init__(self, cluster: str, name: str, groups: int = GROUPS) -> None:
        if not 1 <= groups <= MAX_TXN_OPS - 1:
            raise ValueError(f"groups must be 1-{MAX_TXN_OPS - 1}")
        self.cluster = cluster
        self.name = name
        self.n_groups = groups
        self.k = keys(cluster)
        self.lease = 0
        self.home: list[str] = []
        self.groups: set[str] = set()
        self.placed: dict[int, str] = {}
        # Bumped by every method that changes ``home``, ``groups`` or ``placed``: which peer
        # gets which tunnel depends on them (the etcd mode's replication walks every tunnel
        # when it moved: ct/failover.py, Replicator.select_changes).
        self.changes = 0

    # -- queries -----------------------------------------------------------------------------
    def owns(self, spi: int) -> bool:
        g = self.placed.get(spi)
        return g is not None and g in self.groups

    def owned(self) -> set[int]:
        return {s for s, g in self.placed.items() if g in self.groups}

    def home_of(self, spi: int) -> str:
        return self.home[bucket(spi, len(self.home))]

    def member_key(self, name: str | None = None) -> str:
        return self.k["members"] + (self.name if name is None else name)

    def group_key(self, gid: str) -> str:
        return self.k["groups"] + gid

    def tunnel_key(self, spi: int) -> str:
        return f"{self.k['tunnels']}{spi:08x}"

    # -- joining and leaving -------------------------------------------------------------------
    def join(self, lease: int, address: str) -> Txn:
        """Register under ``lease`` with fresh home groups (all-or-nothing), only while no
        member key of this name exists: one under a live lease is another gateway given the
        same name, or this one's previous life (killed: its lease ends within ``ttl_s``).
        Overwritten, the other one sent on, told nothing, its groups owned by nobody."""
        self.lease_gone()
        self.lease = lease
        self.home = [home_group(lease, k) for k in range(self.n_groups)]
        self.changes += 1
        return Txn(
            (absent(self.member_key()), *(absent(self.group_key(g)) for g in self.home)),
            (
                Put(self.member_key(), member_info(address, lease, self.n_groups), lease),
                *(Put(self.group_key(g), self.name, lease) for g in self.home),
            ),
        )

    def reassert(self, address: str) -> Txn:
        """Write our member key back (as :meth:`join` wrote it, under our lease) after it
        was deleted while the lease lived: only while absent (another gateway of our name
        may have joined meanwhile: its key is not ours to overwrite)."""
        info = member_info(address, self.lease, self.n_groups)
        return Txn((absent(self.member_key()),), (Put(self.member_key(), info, self.lease),))

    def joined(self) -> None:
        self.groups = set(self.home)
        self.changes += 1

    def lease_gone(self) -> set[int]:
        """Our lease ended (or we left): nothing is ours any more. Returns what was."""
        was = self.owned()
        self.changes += 1
        self.lease = 0
        self.home = []
        self.groups.clear()
        self.placed.clear()
        return was

    # -- our own tunnels ---------------------------------------------------------------------
    def place(self, spis: list[int]) -> Txn:
        """Record tunnels new here (none has a key yet) in our home groups, while our lease
        lives; all or nothing. At most ``MAX_TXN_OPS - 1`` tunnels."""
        return Txn(
            (
                Compare(self.member_key(), "LEASE", self.lease),
                *(absent(self.tunnel_key(s)) for s in spis),
            ),
            tuple(Put(self.tunnel_key(s), self.home_of(s)) for s in spis),
        )

    def placed_ok(self, spis: list[int]) -> None:
        self.changes += 1
        for s in spis:
            self.placed[s] = self.home_of(s)

    def place_into(self, spis: list[int], gid: str) -> Txn:
        """Record tunnels new here (none has a key yet) in group ``gid``, one we hold (a
        home group or one taken over), while that group's owner key is under our lease:
        the CHILD SAs of one IKE SA go into the group of their siblings, so that they move
        as one unit. At most ``MAX_TXN_OPS - 2`` tunnels."""
        if gid not in self.groups:
            raise ValueError(f"group {gid} is not ours")
        return Txn(
            (
                Compare(self.member_key(), "LEASE", self.lease),
                Compare(self.group_key(gid), "LEASE", self.lease),
                *(absent(self.tunnel_key(s)) for s in spis),
            ),
            tuple(Put(self.tunnel_key(s), gid) for s in spis),
        )

    def placed_into(self, spis: list[int], gid: str) -> None:
        self.changes += 1
        for s in spis:
            self.placed[s] = gid

    def learn(self, spi: int, gid: str | None) -> None:
        """What etcd says ``tunnels/<spi>`` holds (None: absent)."""
        self.changes += self.placed.get(spi) != gid
        if gid is None:
            self.placed.pop(spi, None)
        else:
            self.placed[spi] = gid

    def release(self, spi: int) -> Txn | None:
        """Delete the key of a tunnel that is gone from here (deleted, or lost), if it is in
        a group we hold."""
        g = self.placed.get(spi)
        if g is None or g not in self.groups:
            return None
        return Txn(
            (
                Compare(self.tunnel_key(spi), "VALUE", g),
                Compare(self.group_key(g), "LEASE", self.lease),
            ),
            (Delete(self.tunnel_key(spi)),),
        )

    def released(self, spi: int) -> None:
        self.changes += self.placed.pop(spi, None) is not None

    # -- transfers: the new owner in the same step ----------------------------------------------
    def hand_over(
        self,
        spis: list[int],
        target_lease: int,
        target_groups: int,
        anchor: dict[int, int] | None = None,
    ) -> list[Txn]:
        """Move these tunnels (ours) into the target's home groups, each conditioned on the
        tunnel still being in our group, that group still ours, and the target's group held
        under the target's lease. Transactions of a bounded size; each is all or nothing.
        ``anchor``: the SPI whose bucket picks a tunnel's group (the CHILD SAs of one IKE SA
        share one, so that they land in one group), by default its own."""
        anchor = anchor or {}
        mine = [s for s in spis if self.owns(s)]
        out = []
        per = (MAX_TXN_OPS - 1) // 3  # each tunnel: its key, its group, the target's group
        for i in range(0, len(mine), per):
            batch = mine[i : i + per]
            cmp: dict[tuple[str, str], Compare] = {}
            ops = []
            for s in batch:
                g = self.placed[s]
                to = home_group(target_lease, bucket(anchor.get(s, s), target_groups))
                for c in (
                    Compare(self.tunnel_key(s), "VALUE", g),
                    Compare(self.group_key(g), "LEASE", self.lease),
                    Compare(self.group_key(to), "LEASE", target_lease),
                ):
                    cmp[(c.key, c.target)] = c
                ops.append(Put(self.tunnel_key(s), to))
            out.append(Txn(tuple(cmp.values()), tuple(ops)))
        return out

    def handed_over(self, txn: Txn) -> None:
        self.changes += 1
        for op in txn.success:
            spi = spi_of_key(op.key)
            if isinstance(op, Put) and spi is not None:
                self.placed[spi] = op.value

    # -- take-over ----------------------------------------------------------------------------
    def adopt(self, gids: list[str]) -> Txn:
        """Create the owner keys of orphaned groups under our lease: each only if absent
        (their owner's lease is gone), all or nothing."""
        return Txn(
            (
                Compare(self.member_key(), "LEASE", self.lease),
                *(absent(self.group_key(g)) for g in gids),
            ),
            tuple(Put(self.group_key(g), self.name, self.lease) for g in gids),
        )

    def adopted(self, gids: list[str], tunnels: dict[int, str]) -> list[int]:
        """We own these groups now; ``tunnels`` as read before (a group without owner is
        frozen: nobody can change its tunnels' keys). Returns the tunnels they hold."""
        got = set(gids)
        self.changes += 1
        self.groups |= got
        out = sorted(s for s, g in tunnels.items() if g in got)
        for s in out:
            self.placed[s] = tunnels[s]
        return out


def orphans(groups: dict[str, str], tunnels: dict[int, str]) -> dict[str, list[int]]:
    """Groups that tunnels are in but that have no owner key (their owner's lease is gone),
    with their tunnels."""
    out: dict[str, list[int]] = {}
    for spi, g in tunnels.items():
        if g not in groups:
            out.setdefault(g, []).append(spi)
    return out


def owners(groups: dict[str, str], tunnels: dict[int, str]) -> dict[int, str | None]:
    """Who may send on each tunnel: the owner of its group (None: nobody, for now)."""
    return {spi: groups.get(g) for spi, g in tunnels.items()}

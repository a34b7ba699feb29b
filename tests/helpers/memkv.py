"""An in-memory model of the etcd semantics the ownership transactions rely on (for
simulations that need thousands of steps; the same transactions run against a real etcd in
tests/test_ownership_groups.py): keys with a lease and a create revision, leases whose
revocation deletes their keys at once, transactions whose compares all hold or nothing
happens. An absent key compares as revision 0 and lease 0; a VALUE compare on it fails."""

from __future__ import annotations

from dataclasses import dataclass

from ipsecct.ct.ownership import Compare, Delete, Put, Txn


@dataclass
class Entry:
    value: str
    lease: int
    create_revision: int


class MemKV:
    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.leases: set[int] = set()
        self.revision = 1
        self._next_lease = 0x1000

    def grant(self) -> int:
        self._next_lease += 1
        self.leases.add(self._next_lease)
        return self._next_lease

    def revoke(self, lease: int) -> None:
        self.leases.discard(lease)
        for k in [k for k, e in self.data.items() if e.lease == lease]:
            del self.data[k]
        self.revision += 1

    def get(self, key: str) -> str | None:
        e = self.data.get(key)
        return None if e is None else e.value

    def prefix(self, p: str) -> dict[str, str]:
        return {k: e.value for k, e in self.data.items() if k.startswith(p)}

    def _holds(self, c: Compare) -> bool:
        e = self.data.get(c.key)
        if c.target == "CREATE":
            return (0 if e is None else e.create_revision) == c.value
        if c.target == "LEASE":
            return (0 if e is None else e.lease) == c.value
        return e is not None and e.value == c.value

    def txn(self, t: Txn) -> bool:
        if not all(self._holds(c) for c in t.compare):
            return False
        self.revision += 1
        for op in t.success:
            if isinstance(op, Delete):
                self.data.pop(op.key, None)
                continue
            assert isinstance(op, Put)
            if op.lease and op.lease not in self.leases:
                raise AssertionError("etcd refuses a put under a lease that is gone")
            old = self.data.get(op.key)
            rev = old.create_revision if old is not None else self.revision
            self.data[op.key] = Entry(op.value, op.lease, rev)
        return True

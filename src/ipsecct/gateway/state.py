"""Durable state of a gateway beside its configuration: SQLite in WAL mode (the adapter).

What it keeps, per outbound SA (known by a keyed fingerprint of its keys, never the keys):
the highest sequence number reserved (see :mod:`ipsecct.ipsec.sequence`) and who owns it
(:mod:`ipsecct.ct.journal`). On start, :func:`open_for` merges the configuration with it:
tunnels given away stay away, counters resume past everything a previous run may have sent,
and a missing or damaged store stops the gateway rather than guess (``--fresh-state`` starts
afresh only when every AEAD tunnel was re-keyed). See docs/state.md.

Layout of the directory (``[state] dir``; default :func:`default_dir`), mode 0700:

- ``state.db`` (+ ``-wal``, ``-shm``): the SQLite database, ``synchronous=FULL``: a commit
  returns once it is on stable storage.
- ``ipsecct-state``: a marker written when the directory is first used, so that a deleted
  database is told from a first start.
- ``lock``: held (``flock``) while a process uses the directory: one process per state.

Every write that must precede an action (a reservation before its numbers are used, "given
away" before a transfer commits, "pending" with its first block before a transferred tunnel
sends) is committed before the action. Reservations are written by a worker thread well before
they are needed (low-water mark). A transfer's ownership changes are *submitted* (a
:class:`~ipsecct.ct.journal.Write`) and written in submission order by another worker thread,
several per transaction when they queue up, while the event loop goes on; the transfer core
waits for a write only where the action needs it (docs/state.md, "what is written when").
Fail-over take-overs, ``sa add`` and ``sa delete`` write synchronously (after everything
submitted before them).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import math
import os
import queue
import re
import secrets
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from ..ct.journal import (
    Configured,
    Owner,
    Plan,
    SAState,
    Write,
    grant_ceiling,
    merge,
    transferred_at,
)
from ..errors import JournalError, StateError
from ..ikev2.config import canonical_peer_id
from ..ikev2.pool import Pool
from ..ipsec.engine import Tunnel
from ..ipsec.sad import MAX_SEQ_64, SecurityAssociation
from ..ipsec.sequence import Reservations, fingerprint
from .config import NodeConfig
from .log import event
from .node import Node

log = logging.getLogger("ipsecct.gateway.state")

# 2: sa.gateway and the arrival table; 3: arrival_pruned; 4: arrival.outcome (older ones
# are upgraded on open)
SCHEMA = 4
DB_NAME = "state.db"
MARKER = "ipsecct-state"
LOCK = "lock"
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The write-ahead log is made this many pages (4 KiB each) long when the store opens, and
# checkpointed before it grows past them (PRAGMA wal_autocheckpoint: 1000, SQLite's default,
# as before), so that a synced write overwrites blocks the file system has already allocated
# instead of growing the file (StateStore.prepare_wal).
WAL_PAGES = 1024
# meta rows: whether the last run closed the store cleanly, and how long its write-ahead log
# was made at its start (_check_log)
RUN_KEY, RUN_OPEN, RUN_CLOSED, LOG_KEY = "run", "open", "closed", "wal_size"


class _Damaged(Exception):
    pass


def default_dir(name: str) -> Path:
    """Where a node named ``name`` keeps its state when ``[state] dir`` is not given:
    ``$IPSECCT_STATE_HOME/NAME`` if set, else ``/var/lib/ipsecct/NAME`` for root, else
    ``$XDG_STATE_HOME/ipsecct/NAME`` (``~/.local/state/ipsecct/NAME``)."""
    if not _NAME_OK.fullmatch(name):
        raise StateError(
            f"node name {name!r} cannot name a state directory: set [state] dir"
        )
    base = os.environ.get("IPSECCT_STATE_HOME")
    if base:
        return Path(base) / name
    if os.geteuid() == 0:
        return Path("/var/lib/ipsecct") / name
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "ipsecct" / name


def _close_store(conn: sqlite3.Connection, lock: threading.Lock) -> None:
    """Close a store's connection, marked closed first: the last connection's close copies
    the write-ahead log into state.db and removes it (nothing lost). Under the store's lock,
    so that no write comes after the mark (a write after it, checkpointed and its log then
    lost, would be a loss the mark hides). At exit a writer's lock is waited for 5 s."""
    locked = lock.acquire(timeout=5)
    try:
        if locked:
            with contextlib.suppress(sqlite3.Error):  # (unmarked: the next start checks)
                conn.execute("UPDATE meta SET value = ? WHERE key = ?", (RUN_CLOSED, RUN_KEY))
        conn.close()
    finally:
        if locked:
            lock.release()


def _close_checked(conn: sqlite3.Connection, log_size: int | None) -> None:
    """Close the connection of a database refused at open: SQLite copies its write-ahead
    log into it and removes it. Marked closed first where the log was what it must be (a
    database of another node or schema, a bad row), so that a later start does not take
    the log gone for a loss; not where the log is what was missing or short, which is kept
    known. Nothing marked where the database cannot be read."""
    with contextlib.suppress(sqlite3.Error, ValueError, _Damaged):
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                 (RUN_KEY, LOG_KEY)).fetchall())  # fmt: skip
        _check_log(meta, log_size)
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (RUN_CLOSED, RUN_KEY))
    conn.close()


def _check_log(meta: dict[str, str], log_size: int | None) -> None:
    """The database of a run that was not closed cleanly (killed, crashed, power lost) must
    come with its write-ahead log (state.db-wal) at least as long as the run made it at its
    start: its last commits, the last reservations among them, are there until a checkpoint
    copies them into state.db. Without it SQLite opens state.db as it was at the last
    checkpoint, silently, and the counters resumed below what was sent (a log removed
    after a kill: every tunnel from seq 1 again). ``log_size``: the log's length before
    SQLite opened the database (None: absent). (An SQLite program that opened state.db after
    the crash and closed it cleanly, the sqlite3 shell, copied the log into it and removed
    it: nothing is lost then, but nothing here can tell; docs/state.md says what to do.)"""
    if meta.get(RUN_KEY) != RUN_OPEN:
        return  # closed cleanly (or written by an ipsecct before this check)
    need = int(meta.get(LOG_KEY, "0"))
    if log_size is None:
        raise _Damaged(
            "its write-ahead log (state.db-wal) is missing, and its last run was not stopped"
            " cleanly: the sequence numbers it reserved last may be lost"
        )
    if log_size < need:
        raise _Damaged(
            f"its write-ahead log (state.db-wal) is {log_size} octets, shorter than the"
            f" {need} its last run (not stopped cleanly) made it: the sequence numbers it"
            " reserved last may be lost"
        )


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# An Owner's text by identity (the members are singletons): ``.value`` and an enum's hash
# are computed in Python, and a bulk transfer writes thousands of rows.
_OWNER_TEXT = {id(o): o.value for o in Owner}


def _hex(n: int) -> str:
    # Fixed-width hex: SQLite compares it as text in numeric order (max() works), and it
    # holds all 64 bits, which a signed SQLite INTEGER does not.
    return f"{n:016x}"


_UPSERT = (
    "INSERT INTO sa (fingerprint, name, spi, peer, aead, ceiling, owner, detail, changed, "
    "transfer, gateway) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO "
    "UPDATE SET name = excluded.name, spi = excluded.spi, peer = excluded.peer, "
    "aead = excluded.aead, ceiling = max(ceiling, excluded.ceiling), owner = excluded.owner, "
    "detail = excluded.detail, changed = excluded.changed, transfer = excluded.transfer, "
    "gateway = excluded.gateway"
)
# A bulk write upserts its rows CHUNK_ROWS at a time, one statement per chunk (multi-row
# VALUES; a row naming a fingerprint met earlier in the same statement updates it, in order,
# as a statement per row would). With one statement per row the writer's thread gave up the
# GIL and took it back once per row (sqlite3 releases it around each step), each time behind
# an event loop busy in Python (a bulk transfer's install, in the same process): in one traced
# bulk move of 20,000 SAs "leaving" took 0.79 s in the writer's thread, 0.16 s in chunks
# (benchmarks/README.md, sixth session). Chunk sizes are powers of two (the remainder is split
# in halves), so that a few statements, each prepared once and cached, cover any count.
CHUNK_ROWS = 512
_SA_COLUMNS = 11
_UPSERT_HEAD, _UPSERT_TAIL = _UPSERT.split(" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_ROW_VALUES = "(" + ", ".join("?" * _SA_COLUMNS) + ")"


@functools.cache
def _upsert(rows: int) -> str:
    """The upsert of ``rows`` rows in one statement (the same string object each time: the
    sqlite3 module's statement cache hashes it once)."""
    return f"{_UPSERT_HEAD} VALUES {', '.join([_ROW_VALUES] * rows)}{_UPSERT_TAIL}"


# Schema 4: an arrival's outcome: '' (arrived: its tunnels may have been sent on here),
# 'discarded' (given up before its COMMIT: never activated here, its tunnels removed; a
# decision query is answered "not taken"), 'again' (the same transfer id installed a second
# time: never taken for discarded). An arrival met again is marked 'again' whatever it was.
_ARRIVAL = (
    "INSERT INTO arrival (transfer, peer, changed) VALUES (?, ?, ?) "
    "ON CONFLICT (transfer) DO UPDATE SET outcome = 'again'"
)
_DISCARD = (
    "UPDATE arrival SET outcome = 'discarded' WHERE transfer = ? AND peer = ? AND outcome = ''"
)
_ARRIVAL_TABLE = (
    "CREATE TABLE arrival (transfer TEXT PRIMARY KEY, peer TEXT NOT NULL, changed REAL NOT NULL)"
)
_ARRIVAL_OUTCOME = "ALTER TABLE arrival ADD COLUMN outcome TEXT NOT NULL DEFAULT ''"
# Schema 3: per peer, the newest arrival time of the arrivals pruned (a decision query about
# a transfer that may have begun before it is answered "taken": docs/state.md).
_PRUNED_TABLE = "CREATE TABLE arrival_pruned (peer TEXT PRIMARY KEY, upto REAL NOT NULL)"
_ARRIVAL_INDEX = "CREATE INDEX arrival_by_peer ON arrival (peer, changed)"
# Virtual IP leases (ikev2/pool.py): made where missing, in any schema (an older ipsecct
# ignores the table, and its leases live in memory as before): docs/ikev2.md "Virtual IPs".
_LEASE_TABLE = (
    "CREATE TABLE IF NOT EXISTS lease (pool TEXT NOT NULL, addr TEXT NOT NULL, "
    "state TEXT NOT NULL, identity TEXT NOT NULL, changed REAL NOT NULL, "
    "PRIMARY KEY (pool, addr))"
)
# Offline leases (an identity's address kept for it) remembered across a restart, per pool:
# the newest; an older one's address is free again after the restart.
MAX_REMEMBERED_LEASES = 4096
LeaseRow = tuple[str, str, str, str, float]  # pool, address, state, identity, changed
# A lease's identity read back is at most this long (an IKE identity comes in one message,
# ikev2/message.py MAX_MESSAGE; a hand-edited row may be any size).
MAX_LEASE_IDENTITY = 65535
_LEASE_PUT = "INSERT OR REPLACE INTO lease VALUES (?, ?, ?, ?, ?)"
# (as octets: a text that is not UTF-8 made the whole read fail; _lease_rows)
_LEASE_GET = (
    "SELECT CAST(pool AS BLOB), CAST(addr AS BLOB), CAST(state AS BLOB),"
    " CAST(identity AS BLOB), changed FROM lease ORDER BY changed"
)
# Arrivals kept per peer at most, whatever their age: a peer that transfers more within the
# retention has its oldest pruned early (queries about those are answered "taken").
MAX_ARRIVALS_PER_PEER = 65536
# The arrival_pruned row of a database made in place of another (StateStore.create): not a
# peer's name (a peer is named in the configuration, never empty)
REPLACED_PEER = ""
LAZY_WRITE_DELAY = 0.01  # s: DurableState.lazy_delay
# Fingerprints of untracked SAs kept for their transfer's outcome, at most (past it, the
# rest are computed again: DurableState._leaving_fps)
_MAX_LEAVING_FPS = 1 << 18



def _address_text(a: object) -> str:
    """``str(a)`` of an address, an IPv4 one formatted in C: ``ipaddress`` does it in Python
    (1-4 us), and a bulk transfer's rows name the peer of each of thousands of SAs, which
    seldom share an address object (tests/test_state.py holds it to ``str``)."""
    if type(a) is IPv4Address:
        return socket.inet_ntoa(int(a).to_bytes(4, "big"))
    return str(a)

def _lease_rows(rows: Iterable[tuple[Any, ...]],
                bad: list[tuple[str, str]] | None = None) -> list[LeaseRow]:  # fmt: skip
    """Lease rows as read (:data:`_LEASE_GET`), each decoded as StateStore.leases says, the
    address as ``ipaddress`` writes it (a hand-written ``FD00:0::5`` is ``fd00::5``, which
    the gateway writes and matches). ``bad``: gets the (pool, address) as stored of each row
    whose address is not so written (not an address, or another spelling of one)."""
    out: list[LeaseRow] = []
    for a, b, c, d, e in rows:
        try:
            pool, text, st = (x.decode() for x in (a, b, c))
        except (AttributeError, UnicodeDecodeError):  # NULL, or not UTF-8
            continue
        try:
            addr = str(ipaddress.ip_address(text))
        except ValueError:  # not an address: damage, left out as a NULL is
            addr = ""
        if addr != text and bad is not None:
            bad.append((pool, text))
        if not addr:
            continue
        who = d.decode(errors="replace")[:MAX_LEASE_IDENTITY] if d is not None else "?"
        at = float(e) if isinstance(e, int | float) else 0.0
        out.append((pool, addr, st, who, at))
    return out


def _one_per_address(rows: Iterable[LeaseRow]) -> dict[tuple[str, str], LeaseRow]:
    """One row per (pool, address) of ``rows`` (two for one address, a hand-made table or
    two spellings of it: one not offline wins, else the later)."""
    keep: dict[tuple[str, str], LeaseRow] = {}
    for r in rows:
        if keep.get(r[:2], r)[2] == "offline" or r[2] != "offline":
            keep[r[:2]] = r
    return keep


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class StateStore:
    """The SQLite database of one state directory. Thread-safe (one lock): reservations are
    written from a worker thread, ownership changes from the event loop."""

    # A write of a few rows and no arrival as one statement (see put; off: in a transaction
    # of its own, for the measurement in benchmarks/README.md)
    one_statement = True

    def __init__(self, conn: sqlite3.Connection, path: Path, salt: bytes, created: bool) -> None:
        self.conn = conn
        self.path = path
        self.salt = salt
        self.created = created  # made by this start (a first start)
        self._lock = threading.Lock()
        # closed however the process ends but a kill: close(), or at exit, or collected
        self._close = weakref.finalize(self, _close_store, conn, self._lock)
        # Rows per upsert statement: CHUNK_ROWS, or fewer if this SQLite takes fewer
        # variables per statement (999 before 3.32) than a chunk has.
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._chunk = 1 << max(0, min(CHUNK_ROWS, limit // _SA_COLUMNS).bit_length() - 1)

    # -- opening ---------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def open_existing(cls, path: Path, node: str) -> StateStore:
        """Open and check a database; raises _Damaged with the reason."""
        try:  # (before SQLite reads it: see _check_log)
            log_size: int | None = path.with_name(path.name + "-wal").stat().st_size
        except FileNotFoundError:
            log_size = None
        except OSError as exc:
            raise _Damaged(f"its write-ahead log cannot be read: {exc.strerror}") from None
        try:
            conn = cls._connect(path)
        except sqlite3.Error as exc:
            raise _Damaged(str(exc)) from None
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Damaged(f"integrity check: {check}")
            ver = conn.execute("PRAGMA user_version").fetchone()[0]
            if ver == 1:
                cls._upgrade_1(conn)
                ver = 2
            if ver == 2:
                cls._upgrade_2(conn)
                ver = 3
            if ver == 3:
                cls._upgrade_3(conn)
                ver = 4
            if ver != SCHEMA:
                raise _Damaged(f"schema version {ver}, this ipsecct reads {SCHEMA}")
            conn.execute(_LEASE_TABLE)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("node") != node:
                raise _Damaged(f"it belongs to node {meta.get('node')!r}, not {node!r}")
            salt = bytes.fromhex(meta["salt"])
            if len(salt) != 32:
                raise _Damaged("bad fingerprint salt")
            _check_log(meta, log_size)
            store = cls(conn, path, salt, False)
            store.load()  # every row must decode
            store.check_arrivals()
            return store
        except (sqlite3.Error, KeyError, ValueError, TypeError, _Damaged) as exc:
            _close_checked(conn, log_size)
            raise _Damaged(str(exc) or type(exc).__name__) from None

    @staticmethod
    def _upgrade_1(conn: sqlite3.Connection) -> None:
        """Schema 1 -> 2: the gateway a transfer's rows name, and the transfers that arrived
        (nothing else changes: every row keeps its meaning)."""
        StateStore._migrate(
            conn,
            "ALTER TABLE sa ADD COLUMN gateway TEXT NOT NULL DEFAULT ''",
            _ARRIVAL_TABLE,
            "PRAGMA user_version = 2",
        )

    @staticmethod
    def _upgrade_2(conn: sqlite3.Connection) -> None:
        """Schema 2 -> 3: arrivals are pruned; the horizon of what was pruned is kept (an
        older ipsecct, which would answer "not taken" for a pruned arrival, refuses it)."""
        StateStore._migrate(conn, _PRUNED_TABLE, _ARRIVAL_INDEX, "PRAGMA user_version = 3")

    @staticmethod
    def _upgrade_3(conn: sqlite3.Connection) -> None:
        """Schema 3 -> 4: an arrival's outcome (every row kept is '': arrived, "taken" as
        before). An older ipsecct refuses it: it would not mark an arrival met again after
        a discard, and this one would then answer "not taken" for it."""
        StateStore._migrate(conn, _ARRIVAL_OUTCOME, "PRAGMA user_version = 4")

    @staticmethod
    def _migrate(conn: sqlite3.Connection, *statements: str) -> None:
        """Run ``statements`` in one transaction: all of them or, on any error, none."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def check_arrivals(self) -> None:
        """Every arrival row and horizon must read back (a hand-edited one failed the start
        with a traceback, or, a horizon of NaN, silenced "taken"): ValueError otherwise.
        Skipping a row instead would answer "not taken" for a transfer that arrived."""
        self.arrivals()
        self.arrival_outcomes()
        with self._lock:
            times = self.conn.execute(
                "SELECT changed FROM arrival UNION ALL SELECT upto FROM arrival_pruned"
            ).fetchall()
        for (t,) in times:
            if type(t) not in (int, float) or not math.isfinite(t):
                raise ValueError(f"an arrival time is {type(t).__name__} {str(t)[:32]!r}")

    @classmethod
    def create(
        cls, path: Path, node: str, replaced: bool = False, leases: Sequence[LeaseRow] = ()
    ) -> StateStore:
        """A new database. ``replaced``: the directory held state before (a damaged or
        missing database moved aside, or --fresh-state): the arrivals it recorded are lost,
        so every transfer that may have begun before now is answered "taken" (a horizon, as
        if every arrival until now had been pruned: docs/state.md). ``leases``: the old
        database's, in the same transaction (a start killed after it keeps them)."""
        salt = secrets.token_bytes(32)
        conn = cls._connect(path)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "CREATE TABLE sa (fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, "
            "spi INTEGER NOT NULL, peer TEXT NOT NULL, aead INTEGER NOT NULL, "
            "ceiling TEXT NOT NULL, owner TEXT NOT NULL, detail TEXT NOT NULL, "
            "changed REAL NOT NULL, transfer TEXT NOT NULL, gateway TEXT NOT NULL DEFAULT '')"
        )
        conn.execute(_ARRIVAL_TABLE)
        conn.execute(_ARRIVAL_OUTCOME)
        conn.execute(_PRUNED_TABLE)
        conn.execute(_ARRIVAL_INDEX)
        conn.execute(_LEASE_TABLE)
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [
                ("node", node),
                ("salt", salt.hex()),
                ("created", datetime.now(UTC).isoformat(timespec="seconds")),
            ],
        )
        if replaced:
            conn.execute("INSERT INTO arrival_pruned VALUES (?, ?)", (REPLACED_PEER, time.time()))
        conn.executemany(_LEASE_PUT, leases)
        conn.execute(f"PRAGMA user_version = {SCHEMA}")
        conn.execute("COMMIT")
        _fsync_dir(path.parent)
        return cls(conn, path, salt, True)

    def prepare_wal(self, pages: int = WAL_PAGES) -> None:
        """Make the write-ahead log ``pages`` frames long now, checkpointed, so that the
        writes that follow start again at its beginning, over blocks already allocated.

        Why: SQLite appends each commit's pages to the log, and (it is deleted when the
        last connection closes) a freshly opened store's log grows with every commit until
        the first checkpoint. A synced commit that grows the file makes ext4 commit its
        journal (the file's new size and blocks), shared by every file of the file system,
        before the ``fdatasync`` returns; a commit that overwrites allocated blocks flushes
        only its data: 0.12-0.16 ms against 0.27-0.33 ms measured with two processes
        committing at once on this machine (benchmarks/README.md, "latency, fourth
        session"). The handover's synced writes (``leaving``, ``pending``) wait for that.

        How: frames are appended by unsynced one-page commits of a scratch row (a power
        loss meanwhile loses only those: the log's checksums end it at the last whole commit,
        and nothing is checkpointed into the database file while it runs), then one synced
        commit removes the row (every frame before it is on stable storage with it), and a
        checkpoint copies the row's page into the database, so that the next write begins
        the log again at its first frame. Every write after this one is synced as before."""
        with self._lock:
            c = self.conn
            c.execute("PRAGMA wal_autocheckpoint = 0")
            try:
                c.execute("INSERT OR REPLACE INTO meta VALUES ('wal', '0')")
                c.execute("PRAGMA synchronous = OFF")
                try:
                    for i in range(1, pages):
                        c.execute("UPDATE meta SET value = ? WHERE key = 'wal'", (str(i),))
                finally:
                    c.execute("PRAGMA synchronous = FULL")
                # the synced commit marks the run open with the log's length now (a
                # later commit only lengthens it or writes over it: _check_log), and the
                # checkpoint puts the mark in the database file before any reservation
                size = self.path.with_name(self.path.name + "-wal").stat().st_size
                c.execute("BEGIN IMMEDIATE")
                c.execute("DELETE FROM meta WHERE key = 'wal'")
                c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              [(RUN_KEY, RUN_OPEN), (LOG_KEY, str(size))])  # fmt: skip
                c.execute("COMMIT")
                busy, frames, copied = c.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
                if busy or frames != copied:
                    raise sqlite3.OperationalError(
                        f"the write-ahead log was not checkpointed ({copied} of {frames}"
                        " frames): another process has the database open")
            finally:
                # Checkpointed before the log outgrows what was prepared (a few pages of
                # room: one commit may cross the mark by the pages it writes).
                c.execute(f"PRAGMA wal_autocheckpoint = {max(1, pages - 24)}")

    def close(self) -> None:
        """Closed cleanly: marked so (SQLite then checkpoints the log and removes it)."""
        self._close()

    # -- reading and writing ---------------------------------------------------------------
    def fingerprint(self, sa: SecurityAssociation) -> str:
        return fingerprint(self.salt, sa)

    def load(self) -> dict[str, SAState]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT fingerprint, name, spi, peer, aead, ceiling, owner, detail, changed, "
                "transfer, gateway FROM sa"
            ).fetchall()
        out = {}
        for fp, name, spi, peer, aead, ceiling, owner, detail, changed, transfer, gw in rows:
            out[fp] = SAState(
                fp, name, int(spi), peer, bool(aead), int(ceiling, 16), Owner(owner), detail,
                float(changed), int(transfer, 16), str(gw),
            )
        return out

    def arrivals(self) -> set[int]:
        """The transfers recorded arriving here (:meth:`put`'s ``arrivals``)."""
        with self._lock:
            rows = self.conn.execute("SELECT transfer FROM arrival").fetchall()
        return {int(t, 16) for (t,) in rows}

    def arrival_outcomes(self) -> dict[int, tuple[str, str]]:
        """The arrivals recorded with an outcome ('discarded', 'again'; :data:`_ARRIVAL`):
        transfer id -> (outcome, the peer it came from)."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT transfer, outcome, peer FROM arrival WHERE outcome != ''"
            ).fetchall()
        return {int(t, 16): (str(o), str(p)) for t, o, p in rows}

    def arrival_counts(self) -> dict[str, int]:
        """Per peer, how many arrivals are kept."""
        with self._lock:
            rows = self.conn.execute("SELECT peer, count(*) FROM arrival GROUP BY peer").fetchall()
        return {str(p): int(n) for p, n in rows}

    def pruned_upto(self) -> dict[str, float]:
        """Per peer, the newest arrival time (wall clock) of the arrivals pruned so far."""
        with self._lock:
            rows = self.conn.execute("SELECT peer, upto FROM arrival_pruned").fetchall()
        return {str(p): float(t) for p, t in rows}

    def prune_arrivals(
        self, before: float, cap: int = MAX_ARRIVALS_PER_PEER
    ) -> tuple[set[int], dict[str, float]]:
        """Delete the arrivals recorded before ``before`` (wall clock) and, per peer, all
        but the newest ``cap``; record per peer the newest arrival time pruned (never going
        down), in the same synced transaction. Returns the ids deleted and the horizons of
        the peers that had any."""
        gone: set[int] = set()
        upto: dict[str, float] = {}

        def prune() -> None:
            c = self.conn
            peers = [p for (p,) in c.execute("SELECT DISTINCT peer FROM arrival")]
            for peer in peers:
                doomed = c.execute(
                    "SELECT rowid, transfer, changed FROM arrival WHERE peer = ? AND "
                    "(changed < ? OR rowid NOT IN (SELECT rowid FROM arrival WHERE peer = ? "
                    "ORDER BY changed DESC, rowid DESC LIMIT ?))",
                    (peer, before, peer, cap),
                ).fetchall()
                if not doomed:
                    continue
                gone.update(int(t, 16) for _, t, _ in doomed)
                newest = max(float(t) for _, _, t in doomed)
                c.executemany("DELETE FROM arrival WHERE rowid = ?", [(r,) for r, _, _ in doomed])
                c.execute(
                    "INSERT INTO arrival_pruned (peer, upto) VALUES (?, ?) ON CONFLICT (peer) "
                    "DO UPDATE SET upto = max(upto, excluded.upto)", (peer, newest),
                )
            upto.update(
                (str(p), float(t)) for p, t in c.execute("SELECT peer, upto FROM arrival_pruned")
            )

        with self._lock:
            self._write(prune)
        return gone, upto

    def put(self, rows: Iterable[SAState], arrivals: Sequence[tuple[int, str]] = (),
            leases: Sequence[LeaseRow] = (),
            discards: Sequence[tuple[int, str]] = ()) -> None:  # fmt: skip
        """Write ``rows`` (and the transfers that ``arrivals`` records arriving from a peer,
        lease rows, and the arrivals that ``discards`` records discarded before their
        COMMIT) in one transaction; returns once it is on stable storage. A row's ceiling
        never goes down. The arrivals are written before the discards: an arrival met again
        in the same transaction is 'again', never 'discarded'."""
        params: list[object] = []
        tids: dict[int, str] = {}  # a transfer's rows share its id: formatted once
        for r in rows:
            tid = tids.get(r.transfer)
            if tid is None:
                tid = tids[r.transfer] = f"{r.transfer:016x}"
            params += (
                r.fingerprint, r.name, r.spi, r.peer, int(r.aead), f"{r.ceiling:016x}",
                _OWNER_TEXT[id(r.owner)], r.detail, r.changed, tid, r.gateway,
            )
        now = time.time()
        arr = [(_hex(tid), peer, now) for tid, peer in arrivals]
        n = len(params) // _SA_COLUMNS
        dis = [(_hex(tid), peer) for tid, peer in discards]
        if (self.one_statement and not arr and not leases and not dis and n
                and n <= self._chunk
                and n & (n - 1) == 0):  # fmt: skip
            # One statement: its own transaction (autocommit), as atomic and as durable
            # (synced at its end) as BEGIN/rows/COMMIT, with one wait for the GIL after
            # the disk instead of three (the writer's thread takes the GIL back after each
            # call into SQLite, from an event loop that is busy with the handover: a single
            # handover's "leaving" row, which its COMMIT waits for).
            with self._lock:
                self.conn.execute(_upsert(n), params)
            return

        def write() -> None:
            i, n, k = 0, len(params), self._chunk
            while i < n:
                while k * _SA_COLUMNS > n - i:
                    k //= 2
                end = i + k * _SA_COLUMNS
                self.conn.execute(_upsert(k), params[i:end])
                i = end
            if arr:
                self.conn.executemany(_ARRIVAL, arr)
            if dis:
                self.conn.executemany(_DISCARD, dis)
            if leases:
                self.conn.executemany(_LEASE_PUT, leases)

        with self._lock:
            self._write(write)

    def prepare(self) -> None:
        """Compile the bulk upserts of every chunk size now (the sqlite3 module's statement
        cache keeps them), so that a gateway's first bulk transfer does not: SQLite parses a
        512-row upsert in about 10 million instructions, and a first write of N rows compiled
        up to 1,023 rows' worth of them (a third of the SQLite work of a first 5,000-SA
        move). Nothing is written: each is executed without its parameters, which fails at
        the binding, after the statement was compiled and cached."""
        k = self._chunk
        with self._lock:
            while k:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute(_upsert(k), ())
                k //= 2

    def raise_ceilings(self, items: Sequence[tuple[str, int]]) -> None:
        """Raise the ceilings of existing rows (never lower them), in one synced transaction."""
        params = [(_hex(c), fp) for fp, c in items]
        with self._lock:
            self._write(
                lambda: self.conn.executemany(
                    "UPDATE sa SET ceiling = max(ceiling, ?) WHERE fingerprint = ?", params
                )
            )

    def leases(self) -> list[LeaseRow]:
        """The virtual IP leases, oldest change first. The table may have been edited by
        hand: a row whose pool, address or state is NULL is left out (the caller forgets
        what it cannot name), an identity that is NULL is "?", one longer than
        any IKE identity is cut to MAX_LEASE_IDENTITY characters, a time that is not a
        number is 0 (oldest); a table of other columns is a StateError. Columns are read as
        octets: a text that is not UTF-8 is skipped (pool, address, state) or has its bad
        octets replaced (identity). An address is read as ``ipaddress`` writes it (the
        gateway writes and deletes rows under that text): a row of another spelling
        (``FD00:0::5``) is rewritten so (merged with the row of that address, if any: one
        not offline wins), one that is not an address is damage, skipped and deleted."""
        bad: list[tuple[str, str]] = []
        try:
            with self._lock:
                # (as octets: a text that is not UTF-8 made the whole read fail)
                rows = self.conn.execute(_LEASE_GET).fetchall()
        except sqlite3.Error as exc:
            raise StateError(
                f"{self.path}: the lease table cannot be read ({exc}): drop it"
                " (sqlite3 ... 'DROP TABLE lease'; the leases are forgotten) or restore it"
            ) from None
        out = _lease_rows(rows, bad)
        if bad:  # written once, so that a later change or delete of the address meets it
            touched = {(p, str(ipaddress.ip_address(t))) for p, t in bad if _is_address(t)}
            merged = _one_per_address(r for r in out if r[:2] in touched)
            try:
                self.put_leases(list(merged.values()), bad)
            except sqlite3.Error as exc:
                raise StateError(f"cannot write the leases to {self.path}: {exc}") from None
        return out

    def put_leases(self, rows: Sequence[LeaseRow], drop: Sequence[tuple[str, str]] = ()) -> None:
        """Write lease rows (and delete ``drop``: pool, address) in one synced transaction."""

        def write() -> None:
            self.conn.executemany(_LEASE_PUT, rows)
            self.conn.executemany("DELETE FROM lease WHERE pool = ? AND addr = ?", drop)

        with self._lock:
            self._write(write)

    def _write(self, fn: Any) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            fn()
            self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise


def _old_leases(old: Path) -> list[LeaseRow] | None:
    """The lease rows of a database moved aside, as far as they read (of two rows for one
    address, a hand-made table, the one not offline); None if its lease table cannot be
    read (or it has none: a database killed before its first transaction)."""
    try:
        conn = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        rows = _lease_rows(conn.execute(_LEASE_GET).fetchall())
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return list(_one_per_address(rows).values())


def _read_fingerprints(path: Path) -> tuple[bytes, set[str]] | None:
    """The salt and fingerprints of an old, perhaps damaged, database; None if unreadable."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        salt = bytes.fromhex(meta["salt"])
        fps = {r[0] for r in conn.execute("SELECT fingerprint FROM sa")}
        return salt, fps
    except (sqlite3.Error, KeyError, ValueError):
        return None
    finally:
        conn.close()


def _lock_dir(d: Path) -> int:
    fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StateError(
            f"state directory {d} is in use by another ipsecct process"
            " (two processes must never send on the same SAs)"
        ) from None
    return fd


MOVE_ASIDE_MAX = 1000  # directories old-TIME, old-TIME-2, ... tried for one second


def _move_aside(d: Path) -> Path:
    """Move the database (and its -wal, -shm) into a new directory ``old-TIME`` of ``d``
    (``old-TIME-N`` when that name is taken: a second move in the same second), never into
    one that exists, so that no database moved aside before is overwritten."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for n in range(1, MOVE_ASIDE_MAX + 1):
        old = d / (f"old-{stamp}" if n == 1 else f"old-{stamp}-{n}")
        try:
            old.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{MOVE_ASIDE_MAX} directories old-{stamp}* already exist")
    for suffix in ("", "-wal", "-shm"):
        p = d / (DB_NAME + suffix)
        if p.exists():
            p.rename(old / p.name)
    _fsync_dir(d)
    return old


def open_store(
    directory: Path, node: str, aead: Sequence[tuple[str, SecurityAssociation]], *, fresh: bool
) -> tuple[StateStore, int]:
    """Open (or make) the store of ``directory`` and lock it; returns it and the lock's fd.

    ``aead``: the configured AEAD and AES-CTR tunnels' (name, outbound SA: ``sa.seq_iv``,
    the IV is the sequence number), which a missing or damaged store refuses, and which
    ``fresh`` checks were re-keyed."""
    try:
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        if directory.stat().st_mode & 0o022:
            event(log, "state-dir-writable-by-others", logging.WARNING, dir=directory)
        lock = _lock_dir(directory)
    except OSError as exc:
        # (mkdir's EEXIST for a file or a device there said "File exists")
        why = "not a directory" if exc.errno == errno.EEXIST else exc.strerror
        raise StateError(f"cannot use state directory {directory}: {why}") from None
    try:
        return _open_locked(directory, node, aead, fresh), lock
    except (OSError, sqlite3.Error) as exc:
        os.close(lock)
        raise StateError(f"cannot use state directory {directory}: {exc}") from None
    except BaseException:
        os.close(lock)
        raise


def _open_locked(
    directory: Path, node: str, aead: Sequence[tuple[str, SecurityAssociation]], fresh: bool
) -> StateStore:
    db = directory / DB_NAME
    marker = directory / MARKER
    names = ", ".join(n for n, _ in aead)
    problem: str | None = None
    store: StateStore | None = None
    if db.exists():
        try:
            store = StateStore.open_existing(db, node)
        except _Damaged as exc:
            problem = f"is damaged ({exc})"
    elif marker.exists():
        problem = "is missing (the directory has held state before)"
    else:
        marker.write_text(
            f"ipsecct state of node {node}, since"
            f" {datetime.now(UTC).isoformat(timespec='seconds')}. Do not delete: see"
            " docs/state.md.\n"
        )
        with open(marker, "rb+") as f:
            os.fsync(f.fileno())
        return StateStore.create(db, node)
    if store is not None and not fresh:
        return store
    if not fresh:
        if aead:
            # --fresh-state needs the old fingerprints: where they cannot be read it refuses
            # too, and naming it sent the operator from one refusal to another
            then = (
                "run with --fresh-state"
                if db.exists() and _read_fingerprints(db) is not None
                else f"move {directory} away by hand: it cannot be read, so --fresh-state"
                " cannot check the keys"
            )
            raise StateError(
                f"state {db} {problem}: refusing to start"
                f" {'AEAD' if all(sa.aead for _, sa in aead) else 'AEAD or AES-CTR'}"
                f" tunnel(s) {names}, whose last"
                f" sequence numbers are unknown (re-key them, then {then})"
            )
        event(log, "state-replaced", logging.WARNING, db=db, problem=problem,
              effect="transfers that may have arrived before now are answered taken")
        return _replace(db, node, _move_aside(directory))
    # --fresh-state: allowed only when no AEAD tunnel still has keys the old state knows.
    if store is not None:
        old: tuple[bytes, set[str]] | None = (store.salt, set(store.load()))
        store.close()
    else:
        old = _read_fingerprints(db) if db.exists() else None
    if old is None and aead:
        raise StateError(
            f"--fresh-state: the old state in {directory} cannot be read, so ipsecct cannot"
            f" tell whether tunnel(s) {names} were re-keyed; re-key them, then move"
            f" {directory} away by hand"
        )
    if old is not None:
        salt, fps = old
        same = [n for n, sa in aead if fingerprint(salt, sa) in fps]
        if same:
            raise StateError(
                f"--fresh-state refused: tunnel(s) {', '.join(same)} still have keys this"
                " node has sent under (a fresh start would repeat their sequence numbers);"
                " re-key them first"
            )
    moved = _move_aside(directory)
    event(log, "state-fresh-start", logging.WARNING, dir=directory, old=moved)
    return _replace(db, node, moved)


def _replace(db: Path, node: str, moved: Path) -> StateStore:
    """A new database ``db`` in place of the one moved to ``moved``, with its leases (logged)
    in the transaction that makes it. When that one has no lease table to read (a start
    killed after moving the database aside, before the new one's first transaction: what
    the next start moved aside is that half-made one, or nothing), the newest database moved
    aside before it that has one is read."""
    before = sorted(
        (p / DB_NAME for p in moved.parent.glob("old-*") if p != moved),
        key=lambda f: f.stat().st_mtime if f.exists() else 0.0,
        reverse=True,
    )
    rows: list[LeaseRow] | None = None
    old = moved / DB_NAME
    for f in [old, *before]:
        if f.exists():
            rows = _old_leases(f)
            if rows is not None:
                old = f
                break
    store = StateStore.create(db, node, replaced=True, leases=rows or ())
    if rows is None:
        event(log, "state-leases-lost", logging.WARNING, db=store.path, old=old,
              effect="the virtual IP leases of the old state cannot be read: an address"
              " away at another gateway may be leased here again")  # fmt: skip
    elif rows:
        event(log, "state-leases-carried", logging.WARNING, db=store.path, old=old,
              leases=len(rows))  # fmt: skip
    return store


def _ready() -> None:
    """Run once on the ownership writer's thread at start: the thread is made then."""


_Job = tuple[Callable[..., object], tuple[Any, ...]]


class _WriterThread(concurrent.futures.Executor):
    """The ownership writer: one thread that runs the jobs handed to it, in their order.

    :meth:`post` hands a job over with no Future: the journal's wake-ups, a handover's
    "leaving" and "pending" among them (a ThreadPoolExecutor's ``submit`` made a Future with
    its Condition, a work item and a semaphore try on the loop each time, and its worker
    settled that Future after the job). A posted job that raises is logged in one line.
    :meth:`submit` (the Executor's, for ``run_in_executor``) returns a Future. Jobs queued
    at the interpreter's exit still run, as a ThreadPoolExecutor's do."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shut = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        if self._shut:
            raise RuntimeError("cannot schedule new jobs after shutdown")
        self._jobs.put((fn, args))

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        f: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def job() -> None:
            if not f.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                f.set_exception(exc)
            else:
                f.set_result(result)

        self.post(job)
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more jobs; with ``wait``, return once those queued have run."""
        with self._lock:
            if not self._shut:
                self._shut = True
                self._jobs.put(None)
                atexit.unregister(self.shutdown)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except BaseException as exc:  # a bug of the job: one line, the writer goes on
                event(
                    log,
                    "state-writer-job-failed",
                    logging.ERROR,
                    job=getattr(fn, "__name__", "?"),
                    error=f"{type(exc).__name__}: {exc}",
                )


class _Submitted:
    __slots__ = ("arrivals", "discards", "rows", "then", "write")

    def __init__(
        self,
        rows: list[SAState],
        write: Write,
        then: Callable[[bool], None] | None,
        arrivals: list[tuple[int, str]],
        discards: list[tuple[int, str]] | None = None,
    ) -> None:
        self.rows = rows
        self.write = write
        self.then = then
        self.arrivals = arrivals
        self.discards = discards or []


class DurableState:
    """A node's durable state at run time: the configuration merged with the store on start,
    reservations written ahead, and the ownership :class:`~ipsecct.ct.journal.Journal` the
    transfer and fail-over services call."""

    # "leaving" and "pending" rows reserve the grant (ct/journal.py GRANT; docs/state.md).
    reserves_grant = True

    def __init__(
        self, node: Node, store: StateStore, lock_fd: int, block: int,
        arrival_retention: float = 86400.0,
    ) -> None:
        self.node = node
        self.store = store
        self.lock_fd = lock_fd
        self.reservations = Reservations(block)
        self.rows = store.load()
        # Transfers recorded arriving here (durable, or submitted): a restarted source that
        # asks about one hears "taken" (docs/state.md, the decision query).
        self.arrivals = store.arrivals()
        # Their outcomes other than "arrived" ('discarded', 'again': StateStore.put): a
        # transfer discarded here before its COMMIT is answered "not taken" for as long as
        # its arrival is kept, across restarts (docs/state.md, the decision query).
        self.arrival_outcomes = store.arrival_outcomes()
        # Arrivals are kept ``arrival_retention`` seconds (and at most MAX_ARRIVALS_PER_PEER
        # per peer); per peer, the newest arrival time pruned: a query about a transfer that
        # may have begun before it (its age says) is answered "taken" (docs/state.md).
        self.arrival_retention = arrival_retention
        self.arrival_upto = store.pruned_upto()
        self._arrival_counts = store.arrival_counts()
        self._prune_due = False
        self._prune_task: asyncio.Task[None] | None = None
        self.tracked: weakref.WeakKeyDictionary[SecurityAssociation, str] = (
            weakref.WeakKeyDictionary()
        )
        # Arriving outbound SAs whose keys had a row here before (a tunnel that held here,
        # left and comes back, or a stale context of it): that row's ceiling, which the
        # tunnel never sends at or below (prior_ceiling; docs/security.md).
        self._prior: weakref.WeakKeyDictionary[SecurityAssociation, int] = (
            weakref.WeakKeyDictionary()
        )
        # The fingerprints of untracked outbound SAs (here without a row or reservations,
        # e.g. a tunnel made by IKE) being given away, computed for their "leaving" rows:
        # the transfer's "given away" rows reuse them (an HMAC per SA; a bulk transfer
        # moves thousands). id(SA) -> (the SA, its fingerprint); dropped once resolved.
        self._leaving_fps: dict[int, tuple[SecurityAssociation, str]] = {}
        self.queue: dict[SecurityAssociation, int] = {}
        self.plan = Plan()
        self._unresolved_sas: dict[str, SecurityAssociation] = {}  # name -> held outbound SA
        # name -> why nobody is asked about it (its peer is not configured): held until the
        # operator discards it (or configures the peer again and restarts)
        self.unasked: dict[str, str] = {}
        self.counters = {
            "reservation_writes": 0,
            "failed_writes": 0,
            "ownership_writes": 0,
        }
        self.arrivals_pruned = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._quiet_until = 0.0
        # Submitted ownership changes, in order: (rows, write, called with success on the loop).
        self._owq: list[_Submitted] = []
        self._qlock = threading.Lock()  # the queue (the loop appends, a writer takes)
        self._wlock = threading.Lock()  # one writer at a time: submission order on disk
        self._loop: asyncio.AbstractEventLoop | None = None
        # The ownership writer's own thread, started (and running) before any transfer: the
        # "given away" write is on a handover's path, and handing it to the loop's default
        # executor made its first writes start that executor's threads there (0.3-0.5 ms of
        # the loop's time each, measured in the demo, plus the new thread's first wake-up).
        # One thread: the writes are made in submission order anyway (_wlock).
        self._writer: _WriterThread | None = None
        self._kick_due = False  # a non-urgent submission's wake-up is queued on the loop
        # Writes nothing waits for ("given away" after a COMMIT, "taken over" at an
        # activation, a cancelled arrival) wake the writer only this long after they were
        # submitted (or with the next write that wakes it sooner): their thread then does not
        # compete with the handover's next steps for the GIL and the CPUs (0: after the
        # current callback, as the others). benchmarks/README.md, "lazy writes".
        self.lazy_delay = LAZY_WRITE_DELAY
        self._lazy_due = False
        # Is a transfer's "pending" write urgent (its thread woken at once, before the CTDR
        # leaves)? No: with the COMMIT after the CTDR activation waits for it only a round
        # trip later, and with commit what you accept, where the COMMIT follows the contexts
        # closely, waking it at once was measured no better (benchmarks/commit_early.py,
        # benchmarks/README.md "commit what you accept"). Kept for that measurement.
        self.pending_urgent = False
        # Called on the loop after submitted writes settled (the transfer service: the core
        # may go on with what waited for them).
        self.settled_hooks: list[Callable[[], None]] = []
        # Virtual IP lease changes not yet written: (pool, address) -> (state, identity, time)
        self._leases_due: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._llock = threading.Lock()  # _leases_due (the loop adds, the writer takes)
        self._lease_kick_due = False
        self.lease_counters = {"lease_writes": 0, "lease_failed_writes": 0}
        self.leases_restored: dict[str, int] = {}
        # The IKE service: marks the leases of a transfer's IKE SAs "leaving" (DurableState.leaving)
        self.leases_leaving: Callable[[Sequence[Tunnel]], None] | None = None
        node.on_reserve = self._on_reserve
        node.extensions["state"] = self.status
        node.extensions["metrics"] = self.metrics

    # -- start -----------------------------------------------------------------------------
    def merge_configuration(self, cfg: NodeConfig) -> Plan:
        """Decide what of the configuration runs; enrol and reserve what does (synced before
        anything is sent) and take the rest out of the engine."""
        eng = self.node.engine
        fps = {t.name: self.store.fingerprint(t.outbound) for t in cfg.tunnels}
        plan = merge(
            [Configured(t.name, fps[t.name], t.outbound.seq_iv) for t in cfg.tunnels],
            self.rows,
        )
        now = time.time()
        started: list[tuple[SecurityAssociation, SAState]] = []
        for t in cfg.tunnels:
            sa = t.outbound
            tunnel = eng.tunnel_of(sa)
            if t.name in plan.start:
                self.reservations.enrol(sa, plan.start[t.name])
                prev = self.rows.get(fps[t.name])
                row = self._row(sa, fps[t.name], Owner.OWNED, "configured", now, prev)
                row.ceiling = self.reservations.request(sa)
                started.append((sa, row))
                continue
            if t.name in plan.unresolved:
                if tunnel is None:
                    continue
                # Recorded leaving: it may be served elsewhere now. Installed held, never
                # sent on (its counter enrolled at the stored ceiling, nothing reserved past
                # it) until the gateway it was going to answers the decision query.
                r = plan.unresolved[t.name]
                self.reservations.enrol(sa, r.ceiling)
                eng.hold(tunnel)
                self._unresolved_sas[t.name] = sa
                event(
                    log, "transfer-outcome-unknown", logging.WARNING, node=self.node.name,
                    tunnel=t.name, peer=r.gateway or "?", id=f"{r.transfer:016x}",
                    effect="held (never sent on) until the peer answers",
                )
                continue
            if tunnel is not None:
                eng.remove_tunnel(tunnel)
            if t.name in plan.away:
                r = plan.away[t.name]
                event(
                    log, "tunnel-kept-away", logging.WARNING, node=self.node.name, tunnel=t.name,
                    owner=r.owner.value, detail=r.detail,
                )
            else:
                event(
                    log, "tunnel-refused", logging.ERROR, node=self.node.name, tunnel=t.name,
                    reason=plan.refused[t.name],
                )
        for r in plan.not_restored:
            reason = "not in the configuration (its keys were never written to disk)"
            if r.owner is Owner.PENDING:
                reason = (
                    f"arriving by transfer {r.transfer:016x} when this gateway stopped, its"
                    " keys never written to disk: served by its source if that did not"
                    " commit, else by nobody until re-keyed"
                )
            event(
                log, "tunnel-not-restored", logging.WARNING, node=self.node.name, tunnel=r.name,
                spi=f"0x{r.spi:08x}", detail=r.detail, reason=reason,
            )
        try:
            self.store.put(r for _, r in started)
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"cannot write state {self.store.path}: {exc}") from None
        for sa, row in started:
            self.reservations.granted(sa, row.ceiling)
            self.rows[row.fingerprint] = row
            self.tracked[sa] = row.fingerprint
        self.plan = plan
        event(
            log, "state-loaded", node=self.node.name, db=self.store.path,
            first_start=self.store.created, started=len(plan.start), away=len(plan.away),
            refused=len(plan.refused), not_restored=len(plan.not_restored),
            unresolved=len(plan.unresolved),
        )
        return plan

    def _row(
        self, sa: SecurityAssociation, fp: str, owner: Owner, detail: str, now: float,
        prev: SAState | None, texts: dict[int, tuple[object, str]] | None = None,
    ) -> SAState:
        # (comparisons, not max(): a bulk transfer makes four rows per tunnel)
        if prev is not None:
            changed = prev.changed if prev.owner is owner else now
            ceiling = prev.ceiling
        else:
            changed, ceiling = now, 0
        reserved = sa.seq_ceiling
        if reserved != MAX_SEQ_64 and reserved > ceiling:
            ceiling = reserved
        seq = sa.seq
        if seq > ceiling:
            ceiling = seq
        dst = sa.dst
        if texts is None:
            peer = str(dst)
        else:  # many rows at once: an address object shared by SAs is written out once
            hit = texts.get(id(dst))
            if hit is None:  # (holds the object: its id stays)
                hit = texts[id(dst)] = (dst, _address_text(dst))
            peer = hit[1]
        return SAState(fp, sa.name, sa.spi, peer, sa.seq_iv, ceiling, owner, detail, changed)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._writer = _WriterThread(f"ipsecct-state-{self.node.name}")
        await self._loop.run_in_executor(self._writer, _ready)  # the thread runs from now
        self._writer.post(self.store.prepare)  # (not waited for: writes queue behind it)
        self._task = asyncio.create_task(self._flusher())
        self._prune_task = asyncio.create_task(self._pruner())

    async def stop(self) -> None:
        if self._prune_task is not None:
            self._prune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prune_task
            self._prune_task = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        # What was submitted and not yet written is written now (or fails): a clean stop
        # leaves nothing half-recorded.
        with contextlib.suppress(JournalError):
            self._put([])
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # jobs still queued find nothing left to write
            self._writer = None
        self._loop = None
        self._flush_leases()
        self.store.close()
        os.close(self.lock_fd)

    # -- virtual IP leases (ikev2/pool.py) ----------------------------------------------------
    def attach_pools(self, pools: dict[str, Pool], elsewhere: bool) -> dict[str, int]:
        """Give the pools their leases back as the last run left them, and record every change
        from now on. A lease online when the last run ended (it crashed, or stopped without
        deleting its IKE SAs) had an IKE SA that died with it here, unless a standby or a
        cluster member continues it (``elsewhere``: this gateway replicates its IKE SAs):
        then it is away (never leased here again until its IKE SA comes back), else offline
        (its identity gets it back). A lease "leaving" (its IKE SA was being handed over: the
        row is durable before the transfer's COMMIT) is away. Kept: the newest
        MAX_REMEMBERED_LEASES offline ones per pool; a lease of a pool no longer configured,
        or outside its addrs now, is forgotten, except an away one whose address another pool
        holds now (a pool renamed): away there (``moved``). Written before anything is sent."""
        now = time.time()
        fix: list[LeaseRow] = []
        drop: list[tuple[str, str]] = []
        counts = {"offline": 0, "away": 0, "was_online": 0, "was_leaving": 0, "forgotten": 0,
                  "moved": 0}  # fmt: skip
        for name, text, st, who, _changed in self.store.leases():
            pool = pools.get(name)
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                addr = None
            # (an older version kept a name's case: one identity, one lease, as IKE SAs now)
            folded = canonical_peer_id(who)
            if st in ("online", "leaving"):
                counts[f"was_{st}"] += 1
                st = "away" if elsewhere or st == "leaving" else "offline"
                fix.append((name, text, st, folded, now))
            elif folded != who:
                fix.append((name, text, st, folded, now))
            who = folded
            if pool is None or addr is None or not pool.restore(addr, st, who):
                drop.append((name, text))
                # An away address of a pool renamed (or now in another one) stays away there:
                # forgotten, it was leased again while its IKE SA lived on elsewhere.
                other = None if addr is None or st != "away" else next(
                    (p for p in pools.values() if p.name != name and p.contains(addr)), None)
                if other is not None and addr is not None and other.restore(addr, st, who):
                    fix.append((other.name, str(addr), st, who, now))
                    counts["moved"] += 1
                else:
                    counts["forgotten"] += 1
        for pool in pools.values():
            while len(pool.offline) > MAX_REMEMBERED_LEASES:
                a, _ = pool.offline.popitem(last=False)
                drop.append((pool.name, str(a)))
                counts["forgotten"] += 1
            counts["offline"] += len(pool.offline)
            counts["away"] += len(pool.away)
        dropped = set(drop)
        fix = [r for r in fix if (r[0], r[1]) not in dropped]
        if fix or drop:
            try:
                self.store.put_leases(fix, drop)
            except sqlite3.Error as exc:
                raise StateError(f"cannot write the leases to {self.store.path}: {exc}") from None
        for pool in pools.values():
            pool.listener = self._lease_changed
        self.leases_restored = counts
        gone = counts["was_leaving"] + (counts["was_online"] if elsewhere else 0)
        if gone:
            event(log, "ike-vip-leases-away", logging.WARNING, node=self.node.name,
                  leases=gone,
                  detail="held or being handed over when the last run ended, their IKE SAs"
                  " may live on at another gateway: not leased here until they come back"
                  " (ipsecct pools --leases)")  # fmt: skip
        if any(counts.values()):
            event(log, "ike-vip-leases-restored", node=self.node.name, **counts)
        return counts

    def _lease_changed(self, pool: str, addr: Any, state: str, identity: str) -> None:
        with self._llock:
            self._leases_due[(pool, str(addr))] = (state, identity, time.time())
        if self._writer is None or self._loop is None:
            self._flush_leases()  # no writer running (before the start, after the stop)
        elif not self._lease_kick_due:
            self._lease_kick_due = True
            self._loop.call_soon(self._lease_kick)  # after the current callback

    def _lease_kick(self) -> None:
        self._lease_kick_due = False
        if self._writer is not None and self._leases_due:
            self._writer.post(self._flush_leases)

    def _take_leases(self) -> dict[tuple[str, str], tuple[str, str, float]]:
        with self._llock:
            due, self._leases_due = self._leases_due, {}
        return due

    def _lease_write(self, due: dict[tuple[str, str], tuple[str, str, float]],
                     error: str | None) -> None:  # fmt: skip
        """Count a write of ``due``; a failed one keeps them queued, tried again a second
        later (or with the next write)."""
        if error is None:
            self.lease_counters["lease_writes"] += 1
            return
        with self._llock:  # (what changed since is newer)
            for k, v in due.items():
                self._leases_due.setdefault(k, v)
        self.lease_counters["lease_failed_writes"] += 1
        event(log, "lease-write-failed", logging.WARNING, node=self.node.name,
              leases=len(due), error=error)  # fmt: skip
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.call_later, 1.0, self._lease_kick)

    @staticmethod
    def _lease_rows(due: dict[tuple[str, str], tuple[str, str, float]]) -> list[LeaseRow]:
        return [(p, a, st, who, t) for (p, a), (st, who, t) in due.items()]

    def _flush_leases(self) -> None:
        """Write the lease changes queued (on the writer's thread, or here without one)."""
        due = self._take_leases()
        if not due:
            return
        try:
            self.store.put_leases(self._lease_rows(due))
        except (sqlite3.Error, OSError) as exc:
            self._lease_write(due, str(exc) or type(exc).__name__)
            return
        self._lease_write(due, None)

    # -- arrivals: how long they are remembered ----------------------------------------------
    @property
    def arrival_margin(self) -> float:
        """What the clocks of two gateways (or one across a restart) may be stepped by
        without a pruned arrival being taken for one that never came: an hour, or half the
        retention if that is shorter (tests)."""
        return min(3600.0, self.arrival_retention / 2)

    def may_have_arrived(self, transfer_id: int, peer: str, age: float | None) -> bool:
        """Target: may transfer ``transfer_id`` from ``peer``, begun ``age`` seconds ago by
        the asking source's clock (None: not said), have been installed here (then its
        tunnels may have been sent on)? Yes if it is recorded; else yes only if it may have
        begun before the newest arrival pruned (from any peer: the asker may be the fail-over
        standby of the source, docs/cluster.md; its record may be gone)."""
        if transfer_id in self.arrivals:
            return self.discarded(transfer_id) is None
        upto = max(self.arrival_upto.values(), default=None)
        if upto is None:
            return False  # nothing ever pruned: the record would be here
        if age is None:
            return True
        return time.time() - age - self.arrival_margin <= upto

    def discarded(self, transfer_id: int) -> str | None:
        """Target: the peer transfer ``transfer_id`` came from if it was recorded (submitted)
        discarded here before its COMMIT (or at it, its "pending" write failed), and not
        installed again since (its tunnels were never activated here); else None."""
        outcome, peer = self.arrival_outcomes.get(transfer_id, ("", ""))
        return peer if outcome == "discarded" else None

    def _prune_interval(self) -> float:
        return max(0.25, min(3600.0, self.arrival_retention / 4))

    async def _pruner(self) -> None:
        """Prunes the arrivals older than the retention (plus the margin) now and every
        quarter of the retention (at most hourly), on the writer's thread."""
        while True:
            self._prune_now()
            await asyncio.sleep(self._prune_interval())

    def _prune_now(self) -> None:
        if self._writer is None or self._loop is None or self._prune_due:
            return
        self._prune_due = True
        self._writer.post(self._prune_job, self._loop)

    def _prune_job(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer's thread (after the writes queued before it): the prune, handed to
        the loop as one callback when it deleted something (or failed)."""
        before = time.time() - self.arrival_retention - self.arrival_margin
        outcome: tuple[set[int], dict[str, float], dict[str, int]] | str
        with self._wlock:
            try:
                gone, upto = self.store.prune_arrivals(before)
                outcome = (gone, upto, self.store.arrival_counts() if gone else {})
            except (sqlite3.Error, OSError) as exc:
                outcome = str(exc) or type(exc).__name__
        self._prune_due = False  # (a prune asked for meanwhile waits for the next tick)
        if isinstance(outcome, str) or outcome[0]:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._pruned, outcome)

    def _pruned(self, outcome: tuple[set[int], dict[str, float], dict[str, int]] | str) -> None:
        """On the loop: the horizons first, then the ids forgotten (until then they are still
        known: "taken")."""
        if isinstance(outcome, str):
            self.counters["failed_writes"] += 1
            event(log, "arrival-prune-failed", logging.ERROR, node=self.node.name,
                  error=outcome, effect="the arrivals are kept (retried later)")  # fmt: skip
            return
        gone, upto, counts = outcome
        for peer, t in upto.items():
            self.arrival_upto[peer] = max(t, self.arrival_upto.get(peer, t))
        self.arrivals -= gone
        for tid in gone:
            self.arrival_outcomes.pop(tid, None)
        if gone:
            self._arrival_counts = counts  # (as of the prune: those submitted since are few)
            self.arrivals_pruned += len(gone)
            event(log, "arrivals-pruned", node=self.node.name, pruned=len(gone),
                  kept=len(self.arrivals))  # fmt: skip

    # -- reservations ----------------------------------------------------------------------
    def _on_reserve(self, sa: SecurityAssociation) -> None:
        if sa not in self.tracked:
            return
        self.queue[sa] = self.reservations.request(sa)
        self._wake.set()

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self.queue = self.queue, {}
            items = [(self.tracked[sa], c) for sa, c in batch.items() if sa in self.tracked]
            try:
                await asyncio.to_thread(self.store.raise_ceilings, items)
            except (sqlite3.Error, OSError) as exc:
                self.counters["failed_writes"] += 1
                now = time.monotonic()
                if now >= self._quiet_until:
                    self._quiet_until = now + 10.0
                    event(
                        log, "reservation-failed", logging.ERROR, node=self.node.name,
                        error=str(exc), sas=len(items),
                        effect="their traffic stops at the reserved ceiling",
                    )
                for sa, c in batch.items():
                    self.queue.setdefault(sa, c)
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            self.counters["reservation_writes"] += 1
            for sa, c in batch.items():
                self.reservations.granted(sa, c)
                fp = self.tracked.get(sa)
                if fp is not None and fp in self.rows:
                    self.rows[fp].ceiling = max(self.rows[fp].ceiling, c)

    # -- ownership (the Journal) -------------------------------------------------------------
    def _take_queue(self) -> list[_Submitted]:
        with self._qlock:
            batch, self._owq = self._owq, []
        return batch

    def _write_batch(self, extra: list[SAState]) -> tuple[list[_Submitted], str | None]:
        """Write what is queued (in order), then ``extra``, in one synced transaction."""
        with self._wlock:
            batch = self._take_queue()
            rows = [r for item in batch for r in item.rows] + extra
            arrivals = [a for item in batch for a in item.arrivals]
            discards = [d for item in batch for d in item.discards]
            if not rows and not arrivals and not discards:
                self._flush_leases()
                return batch, None
            # the lease changes queued so far, in the same transaction: a transfer's
            # "leaving" leases are durable with its "leaving" rows, which its COMMIT waits for
            due = self._take_leases()
            try:
                if due or discards:
                    self.store.put(rows, arrivals, self._lease_rows(due), discards)
                else:
                    self.store.put(rows, arrivals)
            except (sqlite3.Error, OSError) as exc:
                error = str(exc) or type(exc).__name__
                if due:
                    self._lease_write(due, error)
                return batch, error
            if due:
                self._lease_write(due, None)
            return batch, None

    def _settle(self, batch: list[_Submitted], error: str | None, *, hooks: bool = True) -> None:
        """On the loop: the writes of ``batch`` are on stable storage (or failed). ``hooks``:
        tell the settled hooks (not for a write made inside ``_submit``, whose caller reads
        the settled Write on return)."""
        if not batch:
            return
        for item in batch:
            if error is None:
                item.write.succeed()
            else:
                item.write.fail(error)
            if item.then is not None:
                item.then(error is None)
        if hooks:
            for hook in list(self.settled_hooks):
                hook()

    def _count(self, error: str | None) -> None:
        if error is None:
            self.counters["ownership_writes"] += 1
        else:
            self.counters["failed_writes"] += 1

    def _written(self, outcome: tuple[list[_Submitted], str | None] | BaseException) -> None:
        """On the loop: a write job of the ownership writer's thread ended (what it wrote and
        whether that failed; an exception is a bug of the job, raised here for the loop's
        exception handler, as a failed future's result would be)."""
        if isinstance(outcome, BaseException):
            raise outcome
        batch, error = outcome
        if batch:
            self._count(error)
            if error is not None:
                event(
                    log, "ownership-write-failed", logging.ERROR, node=self.node.name,
                    error=error, changes=len(batch),
                )
        self._settle(batch, error)

    def _submit(
        self,
        rows: list[SAState],
        then: Callable[[bool], None] | None = None,
        *,
        urgent: bool = True,
        lazy: bool = False,
        arrivals: list[tuple[int, str]] | None = None,
        discards: list[tuple[int, str]] | None = None,
    ) -> Write:
        """Queue ``rows`` for the ownership writer; returns at once. Without a running writer
        (no event loop yet) the write is made here, and the Write is settled on return.

        ``urgent``: the writer's thread is woken now (what is waited for next is this
        write: the COMMIT waits for "given away", held tunnels for "owned again"). Otherwise
        it is woken once the loop's current callback has finished, so that what the core
        answered with leaves first: waking a thread costs the loop a context switch (the
        woken thread preempts it, then waits for the GIL), 30 us typically and milliseconds
        on a loaded machine, and the target's CTDR and the mobile node's signal do not wait
        for "pending" and "owned" to be *submitted* (the rows are queued now, in order)."""
        w = Write()
        for r in rows:  # what is being recorded: later changes build on it
            self.rows[r.fingerprint] = r
        with self._qlock:
            self._owq.append(_Submitted(rows, w, then, arrivals or [], discards))
        if self._writer is None or self._loop is None:
            batch, error = self._write_batch([])
            self._count(error)
            self._settle(batch, error, hooks=False)
            return w
        if urgent:
            self._wake_writer()
        elif lazy and self.lazy_delay > 0:
            if not self._lazy_due:
                self._lazy_due = True
                self._loop.call_later(self.lazy_delay, self._lazy_kick)
        elif not self._kick_due:
            # After the current callback (no task: a plain callback in the loop's queue).
            self._kick_due = True
            self._loop.call_soon(self._kick)
        return w

    def _lazy_kick(self) -> None:
        self._lazy_due = False
        if self._owq:  # (a write woken sooner took them)
            self._kick()

    def _kick(self) -> None:
        self._kick_due = False
        if self._writer is not None and self._loop is not None:
            self._wake_writer()

    def _wake_writer(self) -> None:
        """Hand the queue to the writer's thread (no hop through a task on the loop). A job
        writes whatever is queued when it runs: a job that finds the queue emptied by the one
        before it writes nothing. One thread, jobs in order: settled in order."""
        assert self._writer is not None and self._loop is not None
        self._writer.post(self._write_job, self._loop)

    def _write_job(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer's thread: write what is queued, then hand the outcome to the loop as
        one callback. (Not ``run_in_executor``: its future is settled by a first callback on
        the loop, whose done-callback then runs one loop iteration later, behind whatever I/O
        that iteration found ready; on a handover's path, where the COMMIT waits for "given
        away", that was 0.1-0.5 ms of the demo's loop per write.)"""
        outcome: tuple[list[_Submitted], str | None] | BaseException
        try:
            outcome = self._write_batch([])
        except BaseException as exc:  # a bug: reported on the loop, never swallowed here
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: stopping anyway
            loop.call_soon_threadsafe(self._written, outcome)

    def _put(self, rows: list[SAState]) -> None:
        """Write ``rows`` now, after everything submitted before (synchronous: fail-over,
        ``sa add``, ``sa delete``). Raises JournalError."""
        batch, error = self._write_batch(rows)
        if batch or rows:
            self._count(error)
        if batch:
            # Those who waited for the earlier writes hear of them from the loop, not from
            # inside whatever core called us.
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon(self._settle, batch, error)
            else:
                self._settle(batch, error)
        if error is not None:
            raise JournalError(f"state not written: {error}")
        for r in rows:
            self.rows[r.fingerprint] = r

    def _adoption(
        self, sas: Sequence[SecurityAssociation], owner: Owner, detail: str,
        prior: weakref.WeakKeyDictionary[SecurityAssociation, int] | None = None,
    ) -> tuple[list[SAState], Callable[[bool], None]]:
        """The rows recording ``sas`` as ``owner``, and what to do once written: those not
        yet under reservations get their first block past both the number they came with
        and anything stored for their keys (they send nothing before)."""
        now = time.time()
        fresh: list[tuple[SecurityAssociation, SAState]] = []
        rows = []
        texts: dict[int, tuple[object, str]] = {}
        for sa in sas:
            known = self.tracked.get(sa)
            fp = known or self.store.fingerprint(sa)
            prev = self.rows.get(fp)
            row = self._row(sa, fp, owner, detail, now, prev, texts)
            if prior is not None and prev is not None and prev.ceiling:
                prior[sa] = prev.ceiling
            if known is None:
                self.reservations.enrol(sa, prev.ceiling if prev is not None else 0)
                row.ceiling = self.reservations.request(sa)
                fresh.append((sa, row))
            rows.append(row)

        def then(ok: bool) -> None:
            for sa, row in fresh:
                if ok:
                    self.reservations.granted(sa, row.ceiling)
                    self.tracked[sa] = row.fingerprint
                else:
                    self.reservations.failed(sa)

        return rows, then

    def _adopt(self, sas: Sequence[SecurityAssociation], owner: Owner, detail: str) -> None:
        rows, then = self._adoption(sas, owner, detail)
        try:
            self._put(rows)
        except JournalError:
            then(False)
            raise
        then(True)

    def _rows(
        self, tunnels: Sequence[Tunnel], owner: Owner, detail: str, transfer: int = 0,
        gateway: str = "",
    ) -> list[SAState]:
        now = time.time()
        rows = []
        texts: dict[int, tuple[object, str]] = {}
        known = self._leaving_fps
        for t in tunnels:
            sa = t.outbound
            fp = self.tracked.get(sa)
            if fp is None:
                hit = known.get(id(sa))
                fp = hit[1] if hit is not None and hit[0] is sa else self.store.fingerprint(sa)
            row = self._row(sa, fp, owner, detail, now, self.rows.get(fp), texts)
            row.transfer = transfer
            row.gateway = gateway
            rows.append(row)
        return rows

    def taken_over(
        self,
        tunnels: Sequence[Tunnel],
        peer: str,
        *,
        pending: bool,
        leaving: tuple[str, int] | None = None,
    ) -> None:
        if leaving is not None:
            gateway, tid = leaving
            rows = self._rows(
                tunnels, Owner.LEAVING, f"taken over from {peer}, transferring to {gateway}",
                tid, gateway,
            )
            for t, r in zip(tunnels, rows, strict=True):
                r.ceiling = max(r.ceiling, t.outbound.seq)
            self._put(rows)
            # Unresolved from now on, as a restarted source's: asked about, listed in
            # status and sa list, given up with sa discard.
            for t, r in zip(tunnels, rows, strict=True):
                name = t.name or f"0x{t.outbound.spi:08x}"
                self.plan.unresolved[name] = r
                self._unresolved_sas[name] = t.outbound
            return
        how = f"from {peer} (transfer pending)" if pending else f"taken over from {peer}"
        self._adopt([t.outbound for t in tunnels], Owner.PENDING if pending else Owner.OWNED, how)

    def arriving(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        # The grant: the first block reaches at least past what a COMMIT may let the tunnel
        # send before this row is durable (the number it came with + GRANT).
        floors = [grant_ceiling(t.outbound, t.outbound.seq) for t in tunnels]
        rows, then = self._adoption(
            [t.outbound for t in tunnels], Owner.PENDING, f"from {peer} (transfer pending)",
            self._prior,
        )
        for r, floor in zip(rows, floors, strict=True):
            r.transfer = transfer_id
            r.ceiling = max(r.ceiling, floor)
        if transfer_id in self.arrivals:  # met again: never taken for discarded (put)
            self.arrival_outcomes[transfer_id] = ("again", peer)
        self.arrivals.add(transfer_id)
        n = self._arrival_counts[peer] = self._arrival_counts.get(peer, 0) + 1
        if n > MAX_ARRIVALS_PER_PEER + MAX_ARRIVALS_PER_PEER // 8 and self._loop is not None:
            self._loop.call_soon(self._prune_now)  # bounded on write too, after this one
        # The transfer's arrival is recorded in the same transaction. Urgent or not:
        # ``pending_urgent``.
        return self._submit(
            rows, then, urgent=self.pending_urgent, arrivals=[(transfer_id, peer)]
        )

    def prior_ceiling(self, sa: SecurityAssociation) -> int:
        return self._prior.get(sa, 0)

    def arrived(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        # Their SAs are tracked (and reserved) since their pending row was written.
        # Not waited for: the signals to the mobile nodes go first.
        return self._submit(
            self._rows(tunnels, Owner.OWNED, f"taken over from {peer}", transfer_id),
            urgent=False,
            lazy=True,
        )

    def leaving(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        if self.leases_leaving is not None:  # written before these rows (_write_batch)
            self.leases_leaving(tunnels)
        rows = self._rows(tunnels, Owner.LEAVING, f"transferring to {peer}", transfer_id, peer)
        self._remember_fps(tunnels, rows)
        # The grant: past what the target may send before its own "pending" row is durable,
        # the number each tunnel is transferred at (its cap, or its counter) + GRANT.
        for t, r in zip(tunnels, rows, strict=True):
            r.ceiling = max(r.ceiling, grant_ceiling(t.outbound, transferred_at(t)))
        # Not urgent: the COMMIT waits for it a round trip later; the contexts go first.
        return self._submit(rows, urgent=False)

    def _remember_fps(self, tunnels: Sequence[Tunnel], rows: list[SAState]) -> None:
        known = self._leaving_fps
        if len(known) > _MAX_LEAVING_FPS:  # (outcomes never heard of: bounded anyway)
            known.clear()
        for t, r in zip(tunnels, rows, strict=True):  # (tracked ones too: cheaper than asking)
            known[id(t.outbound)] = (t.outbound, r.fingerprint)

    def _forget_fps(self, tunnels: Sequence[Tunnel]) -> None:
        known = self._leaving_fps
        if known:
            for t in tunnels:
                known.pop(id(t.outbound), None)

    def left(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        rows = self._rows(tunnels, Owner.AWAY, f"given to {peer}", transfer_id, peer)
        self._forget_fps(tunnels)
        self._resolved(tunnels, rows)
        return self._submit(rows, urgent=False, lazy=True)

    def resumed(self, tunnels: Sequence[Tunnel], peer: str) -> Write:
        rows, then = self._adoption(
            [t.outbound for t in tunnels], Owner.OWNED, f"kept (transfer to {peer} not taken)"
        )
        self._forget_fps(tunnels)
        self._resolved(tunnels, None)
        return self._submit(rows, then)

    def _resolved(self, tunnels: Sequence[Tunnel], away: list[SAState] | None) -> None:
        """Tunnels that were unresolved no longer are (listed kept away if ``away``)."""
        if not self._unresolved_sas:
            return
        by_sa = {id(sa): n for n, sa in self._unresolved_sas.items()}
        for i, t in enumerate(tunnels):
            name = by_sa.get(id(t.outbound))
            if name is not None:
                del self._unresolved_sas[name]
                self.plan.unresolved.pop(name, None)
                if away is not None:
                    self.plan.away[name] = away[i]

    def unresolved_transfers(self) -> dict[tuple[int, str], list[SecurityAssociation]]:
        """(transfer id, gateway) -> the outbound SAs of the configured tunnels recorded
        leaving by it (installed held by :meth:`merge_configuration`)."""
        out: dict[tuple[int, str], list[SecurityAssociation]] = {}
        for name, row in self.plan.unresolved.items():
            sa = self._unresolved_sas.get(name)
            if sa is not None:
                out.setdefault((row.transfer, row.gateway), []).append(sa)
        return out

    def not_asked(self, transfer_id: int, peer: str, why: str) -> None:
        """The unresolved tunnels of (``transfer_id``, ``peer``) will not be asked about
        (``why``): told to the operator (log, ``status``), held until discarded."""
        for name, row in self.plan.unresolved.items():
            if row.transfer == transfer_id and row.gateway == peer and name not in self.unasked:
                self.unasked[name] = why
                event(
                    log, "transfer-outcome-unknowable", logging.ERROR, node=self.node.name,
                    tunnel=name, spi=f"0x{row.spi:08x}", peer=peer or "?",
                    id=f"{transfer_id:016x}", reason=why,
                    effect="held (never sent on) until discarded: ipsecct sa discard "
                    f"0x{row.spi:08x} (or configure the peer again and restart)",
                )

    def unresolved_states(self) -> dict[int, tuple[str, str]]:
        """id(outbound SA) -> ("unresolved", why) for the tunnels held since the start
        because their transfer's outcome is unknown (``sa list``)."""
        out: dict[int, tuple[str, str]] = {}
        for name, sa in self._unresolved_sas.items():
            r = self.plan.unresolved.get(name)
            if r is None:
                continue
            why = self.unasked.get(name)
            tail = "asked until it answers" if why is None else f"nobody asked ({why})"
            out[id(sa)] = (
                "unresolved",
                f"transfer {r.transfer:016x} to {r.gateway or '?'}: outcome unknown, held, {tail}",
            )
        return out

    def held_sa(self, name: str) -> SecurityAssociation | None:
        """The outbound SA of unresolved tunnel ``name`` (installed held)."""
        return self._unresolved_sas.get(name)

    def unresolved_sa(self, sa: SecurityAssociation) -> str | None:
        """The tunnel name if ``sa`` is the outbound SA of an unresolved tunnel."""
        for name, held in self._unresolved_sas.items():
            if held is sa:
                return name
        return None

    def discard(self, tunnel: Tunnel, owner: Owner, detail: str) -> None:
        """An unresolved tunnel the operator discards (``sa discard``, or ``sa delete``):
        recorded ``owner`` (away or deleted) with ``detail``, no longer unresolved. Never
        sent on again here, whatever its transfer's outcome (safe: at worst nobody serves
        it). Synchronous; raises JournalError (then it is still recorded leaving: held again
        after a restart)."""
        rows = self._rows([tunnel], owner, detail)
        name = self.unresolved_sa(tunnel.outbound)
        row = self.plan.unresolved.get(name) if name is not None else None
        if row is not None:
            rows[0].transfer, rows[0].gateway = row.transfer, row.gateway
        self._put(rows)
        self._resolved([tunnel], rows)
        if name is not None:
            self.unasked.pop(name, None)

    def unresolved_ages(self) -> dict[int, float]:
        """Per unresolved transfer, how long ago (seconds, wall clock) its tunnels were
        recorded leaving (the oldest row: the query's AGE errs on the old side)."""
        now = time.time()
        out: dict[int, float] = {}
        for row in self.plan.unresolved.values():
            age = max(0.0, now - row.changed)
            out[row.transfer] = max(age, out.get(row.transfer, 0.0))
        return out

    def staying(self, tunnels: Sequence[Tunnel], peer: str) -> Write:
        return self._submit(
            self._rows(tunnels, Owner.OWNED, f"kept (transfer to {peer} not committed)")
        )

    def given_up(self, tunnels: Sequence[Tunnel], peer: str) -> None:
        """Fail-over: ``peer`` took these tunnels over from this gateway, now its standby:
        they stay away after a restart (synchronous; raises JournalError)."""
        self._put(self._rows(tunnels, Owner.AWAY, f"taken over by {peer} (this gateway is "
                             "its standby)"))  # fmt: skip

    def committed_transfers(self) -> set[int]:
        """Transfers that gave tunnels away (whose COMMIT a waiting target may ask for)."""
        return {r.transfer for r in self.rows.values() if r.owner is Owner.AWAY and r.transfer}

    def cancelled(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int = 0) -> Write:
        # Pending rows stay away anyway: a failure changes nothing. The arrival is marked
        # discarded in the same transaction as these rows (a crash before it leaves the
        # pending rows and the arrival: "taken", safe); known so here from now on (its
        # tunnels are out of the engine already, and the core activates nothing of a
        # discarded transfer: "not taken" is true before the write lands).
        discards = None
        if transfer_id and transfer_id not in self.arrival_outcomes and (
            transfer_id in self.arrivals
        ):
            self.arrival_outcomes[transfer_id] = ("discarded", peer)
            discards = [(transfer_id, peer)]
        return self._submit(
            self._rows(tunnels, Owner.AWAY, f"stayed with {peer} (transfer cancelled)"),
            urgent=False,
            lazy=True,
            discards=discards,
        )

    def added(self, sa: SecurityAssociation) -> None:
        """An outbound SA added at run time (``sa add``)."""
        self._adopt([sa], Owner.OWNED, "added by sa add")

    def deleted(self, sa: SecurityAssociation) -> None:
        fp = self.tracked.get(sa) or self.store.fingerprint(sa)
        self._put([self._row(sa, fp, Owner.DELETED, "deleted by sa delete", time.time(),
                             self.rows.get(fp))])

    # -- information -----------------------------------------------------------------------
    def _live(self) -> list[SecurityAssociation]:
        sad = self.node.engine.sad
        return [sa for sa in self.tracked if sad.lookup(sa.dst, sa.protocol, sa.spi) is sa]

    def status(self) -> dict[str, Any]:
        live = self._live()
        return {
            "dir": str(self.store.path.parent),
            "db": str(self.store.path),
            "schema": SCHEMA,
            "first_start": self.store.created,
            "seq_block": self.reservations.block,
            "reservations": {
                "sas": len(live),
                "waiting": sum(1 for sa in live if sa.seq_reserve_pending),
                "min_headroom": min((Reservations.headroom(sa) for sa in live), default=None),
                **self.counters,
            },
            "leases": {"restored": self.leases_restored, **self.lease_counters},
            "arrivals": {
                "kept": len(self.arrivals),
                "retention_s": self.arrival_retention,
                "pruned": self.arrivals_pruned,
            },
            "kept_away": [
                {"name": n, "spi": f"0x{r.spi:08x}", "owner": r.owner.value, "detail": r.detail}
                for n, r in self.plan.away.items()
            ],
            "refused": [{"name": n, "reason": why} for n, why in self.plan.refused.items()],
            "not_restored": [
                {"name": r.name, "spi": f"0x{r.spi:08x}", "detail": r.detail}
                for r in self.plan.not_restored
            ],
            "unresolved": [
                {
                    "name": n, "spi": f"0x{r.spi:08x}", "peer": r.gateway,
                    "transfer": f"{r.transfer:016x}", "detail": r.detail,
                    "asked": n not in self.unasked,
                    "effect": (
                        "held, never sent on, until the peer answers (ipsecct sa discard"
                        f" 0x{r.spi:08x} if it never will)"
                        if n not in self.unasked
                        else f"held, never sent on, nobody asked ({self.unasked[n]}):"
                        f" ipsecct sa discard 0x{r.spi:08x}, or configure the peer again"
                        " and restart"
                    ),
                }
                for n, r in self.plan.unresolved.items()
            ],
        }

    def metrics(self) -> dict[str, int | None]:
        """For the metrics endpoint. ``state_min_seq_headroom`` is None (no sample) while no
        SA is under reservation (IKE-keyed SAs are not): a 0 there read as "about to stop
        sending" on every gateway keyed by IKE alone."""
        live = self._live()
        return {
            "state_reservation_writes_total": self.counters["reservation_writes"],
            "state_ownership_writes_total": self.counters["ownership_writes"],
            "state_failed_writes_total": self.counters["failed_writes"],
            "state_reservations_waiting": sum(1 for sa in live if sa.seq_reserve_pending),
            "state_min_seq_headroom": min(
                (Reservations.headroom(sa) for sa in live), default=None
            ),
            "state_tunnels_kept_away": len(self.plan.away),
            "state_tunnels_refused": len(self.plan.refused),
            "state_tunnels_not_restored": len(self.plan.not_restored),
            "state_tunnels_unresolved": len(self.plan.unresolved),
            "state_tunnels_unresolved_unasked": len(self.unasked),
        }


def open_for(node: Node, cfg: NodeConfig, *, fresh: bool = False) -> DurableState:
    """Open the node's state, merge its configuration, and reserve before anything is sent.
    Raises :class:`StateError` (one line for the operator) when it must not start."""
    directory = Path(cfg.state_dir) if cfg.state_dir is not None else default_dir(cfg.name)
    # (AES-CTR with them: its IV is the sequence number too, a keystream repeated with it)
    aead = [(t.name, t.outbound) for t in cfg.tunnels if t.outbound.seq_iv]
    store, lock = open_store(directory, cfg.name, aead, fresh=fresh)
    state = DurableState(node, store, lock, cfg.seq_block, cfg.arrival_retention)
    try:
        try:
            store.prepare_wal()
        except (sqlite3.Error, OSError) as exc:  # a full or failing disk: one line
            raise StateError(f"cannot use state directory {directory}: {exc}") from None
        state.merge_configuration(cfg)
    except BaseException:
        store.close()
        os.close(lock)
        raise
    return state

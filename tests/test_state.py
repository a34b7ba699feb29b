"""Durable state (issue 8 §1): the merge of configuration and state, the SQLite store, and
gateways as real processes killed with SIGKILL under traffic, restarted, and checked on the
wire: no (SPI, sequence number) pair is ever sent twice."""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from ipsecct.ct.journal import Configured, Owner, SAState, Write, merge
from ipsecct.errors import StateError
from ipsecct.gateway import state as state_mod
from ipsecct.gateway.state import SCHEMA, StateStore
from ipsecct.ipsec.engine import Tunnel
from ipsecct.ipsec.sad import SecurityAssociation
from tests.helpers.control import ask, socket_of
from tests.helpers.journal_recorder import Recorder, journaled_world, settle
from tests.helpers.state import Capture, Gateways, Traffic, capturing


def row(fp: str, owner: Owner, ceiling: int = 100, name: str = "t") -> SAState:
    return SAState(fp, name, 0x1000, "192.0.2.2", True, ceiling, owner)


# -- merge (pure) ---------------------------------------------------------------------------
def test_merge_resumes_owned_keeps_away_the_rest_and_reports_the_unconfigured() -> None:
    stored = {
        "a": row("a", Owner.OWNED, 500),
        "b": row("b", Owner.AWAY),
        "c": row("c", Owner.DELETED),
        "d": row("d", Owner.PENDING),
        "x": row("x", Owner.OWNED, name="taken"),
        # arriving by a transfer when the gateway stopped (its source may have committed)
        "y": row("y", Owner.PENDING, name="arriving"),
        "z": row("z", Owner.AWAY, name="gone"),
    }
    conf = [Configured(n, n, True) for n in "abcde"]
    plan = merge(conf, stored)
    assert plan.start == {"a": 500, "e": 0}
    assert {n: r.owner for n, r in plan.away.items()} == {
        "b": Owner.AWAY, "c": Owner.DELETED, "d": Owner.PENDING
    }
    assert [r.name for r in plan.not_restored] == ["taken", "arriving"]


def test_merge_refuses_two_tunnels_with_the_same_keys() -> None:
    plan = merge([Configured("a", "k", True), Configured("b", "k", True)], {})
    assert set(plan.refused) == {"a", "b"} and not plan.start


# -- the store ------------------------------------------------------------------------------
def test_store_is_wal_synchronous_full_versioned_and_ceilings_never_go_down(
    tmp_path: Path,
) -> None:
    st = StateStore.create(tmp_path / "state.db", "sg1")
    assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert st.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA
    st.put([row("a", Owner.OWNED, 2**64 - 1), row("b", Owner.OWNED, 70000)])
    st.put([row("b", Owner.AWAY, 5)])  # an ownership write with an older ceiling
    st.raise_ceilings([("b", 60000), ("a", 3)])
    st.close()
    st2 = StateStore.open_existing(tmp_path / "state.db", "sg1")
    rows = st2.load()
    assert rows["a"].ceiling == 2**64 - 1
    assert (rows["b"].ceiling, rows["b"].owner) == (70000, Owner.AWAY)
    # the salt makes the fingerprints; the keys are nowhere in the file
    st2.close()


def _killed_copy(st: StateStore, to: Path) -> Path:
    """What a kill of the process holding ``st`` open leaves: its files copied as they are
    now (state.db, its write-ahead log and index), the connection still open."""
    to.mkdir()
    for f in st.path.parent.glob(st.path.name + "*"):
        (to / f.name).write_bytes(f.read_bytes())
    return to / st.path.name


def test_no_seq_sent_twice_a_log_merged_by_a_close_is_no_loss_a_log_lost_is(
    tmp_path: Path,
) -> None:
    """The write-ahead log of a run not stopped cleanly: a close of the store (however it
    comes: close(), or the object collected at an exit after an error) or of a database
    refused at open for another reason (another node's) copies it into state.db and
    removes it, marked closed first: the next open takes it. A log removed, or cut, with
    the run still marked open is a loss: refused, and still refused at the open after
    that one (its own close merges what is left but does not mark it)."""
    db = tmp_path / "a" / "state.db"
    db.parent.mkdir()
    st = StateStore.create(db, "sg1")
    st.prepare_wal()
    st.put([row("a", Owner.OWNED, 70000)])
    cases = {}
    for case in ("close", "collected", "other node", "log removed", "log cut"):
        cases[case] = _killed_copy(st, tmp_path / case.replace(" ", "-"))
    st.close()
    c = StateStore.open_existing(cases["close"], "sg1")
    c.close()
    assert not cases["close"].with_name("state.db-wal").exists()  # merged, removed
    assert StateStore.open_existing(cases["close"], "sg1").load()["a"].ceiling == 70000
    c = StateStore.open_existing(cases["collected"], "sg1")
    del c  # (an exit after an error: no close())
    import gc

    gc.collect()
    assert not cases["collected"].with_name("state.db-wal").exists()
    assert StateStore.open_existing(cases["collected"], "sg1").load()["a"].ceiling == 70000
    with pytest.raises(state_mod._Damaged, match="belongs to node 'sg1'"):
        StateStore.open_existing(cases["other node"], "sg2")
    assert StateStore.open_existing(cases["other node"], "sg1").load()["a"].ceiling == 70000
    cases["log removed"].with_name("state.db-wal").unlink()
    wal = cases["log cut"].with_name("state.db-wal")
    os.truncate(wal, wal.stat().st_size // 2)
    for case in ("log removed", "log cut"):
        for _ in range(2):
            with pytest.raises(state_mod._Damaged, match="write-ahead log"):
                StateStore.open_existing(cases[case], "sg1")


@pytest.mark.parametrize("count", [1, 2, 3, state_mod.CHUNK_ROWS, 2 * state_mod.CHUNK_ROWS + 7])
def test_a_bulk_put_writes_every_row_in_order_whatever_the_count_and_its_chunks(
    tmp_path: Path, count: int
) -> None:
    """put() upserts many rows per statement (chunks of CHUNK_ROWS, the remainder in
    halves): every row lands, a fingerprint named twice in one put ends as its last row
    says (within a chunk and across two), and a ceiling still never goes down."""
    st = StateStore.create(tmp_path / "state.db", "sg1")
    if count % 2:  # with the upserts compiled beforehand (as a gateway's start does)
        changes = st.conn.total_changes
        st.prepare()
        assert st.conn.total_changes == changes and not st.conn.in_transaction
    st.put([row(f"fp{i}", Owner.OWNED, 1000 + i) for i in range(count)])
    again = [row(f"fp{i}", Owner.LEAVING, 5) for i in range(count)]
    # fp0 named again right after itself (same chunk) and last of all (another chunk)
    st.put([*again[:1], row("fp0", Owner.AWAY, 7), *again[1:], row("fp0", Owner.PENDING, 9)])
    st.close()
    st2 = StateStore.open_existing(tmp_path / "state.db", "sg1")
    rows = st2.load()
    st2.close()
    assert len(rows) == count
    assert (rows["fp0"].owner, rows["fp0"].ceiling) == (Owner.PENDING, 1000)
    for i in range(1, count):
        assert (rows[f"fp{i}"].owner, rows[f"fp{i}"].ceiling) == (Owner.LEAVING, 1000 + i)


def test_a_put_of_a_few_rows_is_one_statement_and_more_are_one_transaction(
    tmp_path: Path,
) -> None:
    """A single handover's row (and any power-of-two count up to a chunk, with no arrival)
    is one upsert in autocommit, atomic and synced like a transaction, which its COMMIT
    waits for; other counts and arrivals go in one BEGIN .. COMMIT."""
    st = StateStore.create(tmp_path / "state.db", "sg1")
    seen: list[str] = []
    st.conn.set_trace_callback(lambda sql: seen.append(sql.split()[0]))
    st.put([row("a", Owner.LEAVING)])
    st.put([row("b", Owner.OWNED), row("c", Owner.OWNED)])
    assert seen == ["INSERT", "INSERT"]
    seen.clear()
    st.put([row(f"d{i}", Owner.OWNED) for i in range(3)])
    st.put([row("e", Owner.PENDING)], [(7, "sg2")])
    assert seen == ["BEGIN", "INSERT", "INSERT", "COMMIT", "BEGIN", "INSERT", "INSERT", "COMMIT"]
    assert not st.conn.in_transaction
    st.conn.set_trace_callback(None)
    assert {"a", "b", "c", "d0", "d2", "e"} <= set(st.load())
    st.close()


def test_a_bulk_put_stays_within_an_older_sqlites_variable_limit(tmp_path: Path) -> None:
    """An SQLite that takes fewer variables per statement (999 before 3.32) than a chunk
    has gets smaller chunks, not an error."""
    made = StateStore.create(tmp_path / "state.db", "sg1")
    salt = made.salt
    made.close()
    conn = StateStore._connect(tmp_path / "state.db")
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    st = StateStore(conn, tmp_path / "state.db", salt, False)
    assert st._chunk * 11 <= 999
    st.put([row(f"fp{i}", Owner.OWNED, i) for i in range(1000)])
    assert len(st.load()) == 1000
    st.close()


def test_a_schema_1_store_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    """A database of the previous schema (no gateway column, no arrival table) opens, is
    upgraded in place (every row keeps its meaning), and records leaving rows and arrivals."""
    db = tmp_path / "state.db"
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    c.execute(
        "CREATE TABLE sa (fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, "
        "spi INTEGER NOT NULL, peer TEXT NOT NULL, aead INTEGER NOT NULL, "
        "ceiling TEXT NOT NULL, owner TEXT NOT NULL, detail TEXT NOT NULL, "
        "changed REAL NOT NULL, transfer TEXT NOT NULL)"
    )
    c.executemany("INSERT INTO meta VALUES (?, ?)", [("node", "sg1"), ("salt", "ab" * 32)])
    c.execute(
        "INSERT INTO sa VALUES ('a', 'a', 1, '192.0.2.1', 1, ?, 'away', 'given to sg2', 0, ?)",
        (f"{70000:016x}", f"{5:016x}"),
    )
    c.execute("PRAGMA user_version = 1")
    c.close()
    st = StateStore.open_existing(db, "sg1")
    assert st.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA == 4
    a = st.load()["a"]
    assert (a.owner, a.ceiling, a.transfer, a.gateway) == (Owner.AWAY, 70000, 5, "")
    b = row("b", Owner.LEAVING, 10)
    b.transfer, b.gateway = 9, "sg3"
    st.put([b], [(9, "sg3")])
    st.close()
    st = StateStore.open_existing(db, "sg1")
    assert (st.load()["b"].owner, st.load()["b"].gateway) == (Owner.LEAVING, "sg3")
    assert st.arrivals() == {9}
    st.close()


def test_a_schema_3_store_is_upgraded_and_records_discarded_arrivals(tmp_path: Path) -> None:
    """A schema-3 database (arrivals without an outcome) opens upgraded: its arrivals stay
    "arrived". A discard marks its arrival (with the transaction's rows) and survives a
    reopen; an id installed a second time is 'again' and never taken for discarded (a
    discard then changes nothing), also when both come in one transaction; a discard of an
    arrival recorded from another peer changes nothing."""
    db = tmp_path / "state.db"
    st = StateStore.create(db, "sg2")
    st.put([], [(1, "sg1"), (2, "sg1")])
    st.conn.execute("ALTER TABLE arrival DROP COLUMN outcome")
    st.conn.execute("PRAGMA user_version = 3")
    st.close()
    st = StateStore.open_existing(db, "sg2")
    assert st.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA == 4
    assert st.arrivals() == {1, 2} and st.arrival_outcomes() == {}
    st.put([row("a", Owner.AWAY)], discards=[(1, "sg1")])
    st.put([], [(3, "sg1")], discards=[(3, "sg1")])  # arrived and discarded in one write
    st.put([], discards=[(2, "sg3")])  # not the peer it came from: nothing
    st.put([], [(4, "sg1"), (4, "sg1")], discards=[(4, "sg1")])  # met twice first
    st.put([], [(3, "sg1")])  # 3 met again after its discard: 'again'
    st.put([], discards=[(3, "sg1")])
    st.close()
    st = StateStore.open_existing(db, "sg2")
    assert st.arrival_outcomes() == {
        1: ("discarded", "sg1"), 3: ("again", "sg1"), 4: ("again", "sg1")
    }
    assert st.load()["a"].owner is Owner.AWAY and st.arrivals() == {1, 2, 3, 4}
    gone, _ = st.prune_arrivals(time.time() + 1)
    assert gone == {1, 2, 3, 4} and st.arrival_outcomes() == {}
    st.close()


def test_arrivals_are_pruned_by_age_and_per_peer_and_the_horizon_survives(
    tmp_path: Path,
) -> None:
    """The arrival table is bounded: rows older than the retention go, and per peer all but
    the newest ``cap``; per peer the newest arrival time pruned is kept in the same
    transaction (never going down) and survives a reopen: the decision query answers
    "taken" for a transfer that may have begun before it."""
    import time as time_mod

    st = StateStore.create(tmp_path / "state.db", "sg2")
    now = time_mod.time()
    old = [(i, "sg1") for i in range(1, 6)]
    st.put([], old)
    st.conn.execute("UPDATE arrival SET changed = ?", (now - 1000,))
    st.put([], [(i, "sg1") for i in range(10, 20)] + [(i, "sg3") for i in range(30, 33)])
    assert len(st.arrivals()) == 18
    gone, upto = st.prune_arrivals(now - 500, cap=4)
    assert gone >= set(range(1, 6)) and len(gone) == 5 + 6  # the old ones, then over the cap
    assert st.arrival_counts() == {"sg1": 4, "sg3": 3}
    assert set(upto) == {"sg1"} and now - 10 < upto["sg1"] <= time_mod.time()
    st.conn.execute("UPDATE arrival SET changed = ? WHERE peer = 'sg3'", (now - 2000,))
    gone, upto2 = st.prune_arrivals(now - 500, cap=4)
    assert gone == {30, 31, 32} and upto2["sg1"] == upto["sg1"] and upto2["sg3"] < upto["sg1"]
    st.close()
    st = StateStore.open_existing(tmp_path / "state.db", "sg2")
    assert st.pruned_upto() == upto2 and st.arrival_counts() == {"sg1": 4}
    st.close()


def test_damaged_stores_are_told_apart(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    StateStore.create(db, "sg1").close()
    with pytest.raises(state_mod._Damaged, match="belongs to node 'sg1'"):
        StateStore.open_existing(db, "sg2")
    c = sqlite3.connect(db)
    c.execute("PRAGMA user_version = 7")
    c.commit()
    c.close()
    with pytest.raises(state_mod._Damaged, match="schema version 7"):
        StateStore.open_existing(db, "sg1")
    db.write_bytes(b"not a database at all" * 100)
    with pytest.raises(state_mod._Damaged):
        StateStore.open_existing(db, "sg1")


def test_default_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPSECCT_STATE_HOME", "/x")
    assert state_mod.default_dir("sg1") == Path("/x/sg1")
    monkeypatch.delenv("IPSECCT_STATE_HOME")
    if os.geteuid() == 0:
        assert state_mod.default_dir("sg1") == Path("/var/lib/ipsecct/sg1")
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.st")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert state_mod.default_dir("sg1") == Path("/home/u/.st/ipsecct/sg1")
    with pytest.raises(StateError, match="cannot name a state directory"):
        state_mod.default_dir("../etc")


# -- processes ------------------------------------------------------------------------------
@pytest.fixture
def gws(tmp_path: Path) -> Iterator[Gateways]:
    with capturing(tmp_path, 20, block=32) as g:
        yield g


def wait_for(pred, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_under_traffic_never_repeats_a_sequence_number(gws: Gateways) -> None:
    """The gateway is killed with SIGKILL at random moments while 20 AEAD tunnels carry
    traffic and reserve blocks of 32 numbers (a reservation write is almost always in
    flight), then restarted; every ESP datagram it ever sent is read off the wire. Then the
    state directory is removed and the same restart repeats numbers: the check can fail."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1")
    traffic = Traffic(20, [gws.ports["sg1"]["inner"]], pps=3000)
    rnd = random.Random(8)
    try:
        for _ in range(5):
            n = len(cap.seen)
            gws.start("sg1")
            wait_for(lambda n=n: len(cap.seen) > n + 200, "no traffic after the start")
            time.sleep(rnd.uniform(0.0, 0.8))
            gws.kill("sg1")
        assert cap.duplicates() == []
        assert len({spi for spi, *_ in cap.seen}) == 20
        # restarts skipped ahead: at most one block per run, never back
        st = StateStore.open_existing(gws.dir / "state-sg1" / "state.db", "sg1")
        assert all(r.owner is Owner.OWNED for r in st.load().values())
        st.close()
        # the same with the state removed: numbers repeat on the wire
        import shutil

        shutil.rmtree(gws.dir / "state-sg1")
        n = len(cap.seen)
        gws.start("sg1")
        wait_for(lambda: len(cap.seen) > n + 200, "no traffic after the start")
        assert cap.duplicates() != []
    finally:
        traffic.close()


@pytest.mark.slow
def test_a_damaged_state_refuses_aead_tunnels_with_one_line_and_status_2(
    gws: Gateways,
) -> None:
    gws.write("sg1")
    gws.start("sg1")
    gws.kill("sg1")
    db = gws.dir / "state-sg1" / "state.db"
    with open(db, "r+b") as f:  # a torn page in the middle of the file
        f.seek(100)
        f.write(os.urandom(3000))
    for p in (db.with_name("state.db-wal"), db.with_name("state.db-shm")):
        p.unlink(missing_ok=True)
    r = gws.run("sg1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("ipsecct: error: state ") and "is damaged" in lines[-1]
    assert "refusing to start AEAD tunnel(s) t0, t1" in lines[-1]
    assert "Traceback" not in r.stderr
    # removed database, directory used before: missing, refused the same way
    db.unlink()
    r = gws.run("sg1")
    assert r.returncode == 2 and "is missing" in r.stderr, r.stderr
    # the way out it names is one that works: moving the directory away by hand, not
    # --fresh-state (which said "run with --fresh-state", which refuses here)
    assert "move " in r.stderr and "away by hand" in r.stderr and "run with" not in r.stderr
    # --fresh-state cannot tell whether the keys changed: refused
    r = gws.run("sg1", "--fresh-state")
    assert r.returncode == 2 and "cannot be read" in r.stderr, r.stderr


def test_a_missing_state_refuses_aes_ctr_tunnels_as_aead_ones(gws: Gateways) -> None:
    """AES-CTR (RFC 3686) makes its IV of the sequence number, as AES-GCM does: a start that
    does not know its tunnels' last numbers would send them again under the same key (the
    same keystream). Its tunnels are refused as AEAD ones are (with only AES-CBC tunnels the
    state would be made afresh, and the numbers restart at 1)."""
    path = Path(gws.write("sg1"))
    path.write_text(path.read_text().replace(
        'enc = "aes-gcm-16"', 'enc = "aes-ctr"\ninteg = "hmac-sha2-256-128"'))  # fmt: skip
    for k in (gws.dir / "keys").glob("t*.keys"):
        k.write_text(k.read_text() + f'in_integ = "{os.urandom(32).hex()}"\n'
                     f'out_integ = "{os.urandom(32).hex()}"\n')  # fmt: skip
    gws.start("sg1")
    sa = next(s_ for s_ in ask(socket_of(gws.config("sg1")), "sa.list")
              if int(s_["spi"], 16) == 0x20000000)  # fmt: skip
    assert sa["algorithms"] == "AES_CTR-128/HMAC_SHA2_256_128", sa
    gws.kill("sg1")
    (gws.dir / "state-sg1" / "state.db").unlink()
    r = gws.run("sg1")
    assert r.returncode == 2, r.stderr
    assert "is missing" in r.stderr and "refusing to start AEAD or AES-CTR tunnel(s) t0, t1" in (
        r.stderr), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_no_seq_sent_twice_a_write_ahead_log_lost_after_a_kill_is_damage(gws: Gateways) -> None:
    """The gateway killed under traffic leaves its last reservations in the write-ahead log
    (state.db-wal: commits are checkpointed into state.db only now and then). That file
    truncated or removed before the restart (a clean-up of stray files, a copy of state.db
    alone), SQLite opens state.db without them, silently: the restart resumed below what
    was sent (seen here: every tunnel from seq 1 again, 3,050 pairs twice). It is damage
    now: refused in one line naming the AEAD tunnels, as a torn state.db is, both for a
    log cut short and for one removed; the restart with the log intact resumes (above)."""
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1")
    traffic = Traffic(20, [gws.ports["sg1"]["inner"]], pps=3000)
    try:
        gws.start("sg1")
        wait_for(lambda: len(cap.seen) > 2000, "no traffic", 30)  # (blocks of 32 each)
        gws.kill("sg1")
    finally:
        traffic.close()
    wal = gws.dir / "state-sg1" / "state.db-wal"
    os.truncate(wal, wal.stat().st_size // 2)
    for cut in ("short", "removed"):
        if cut == "removed":
            wal.unlink(missing_ok=True)
        wal.with_name("state.db-shm").unlink(missing_ok=True)
        r = gws.run("sg1", timeout=20)
        assert r.returncode == 2, (cut, r.stderr[-2000:])
        line = r.stderr.strip().splitlines()[-1]
        assert "Traceback" not in r.stderr
        assert line.startswith("ipsecct: error: state ") and "is damaged" in line, line
        assert "write-ahead log" in line and "refusing to start AEAD tunnel(s) t0, t1" in line


@pytest.mark.slow
def test_fresh_state_only_with_rekeyed_tunnels(gws: Gateways) -> None:
    cap: Capture = gws.capture  # type: ignore[attr-defined]
    gws.write("sg1")
    gws.start("sg1")
    gws.kill("sg1")
    db = gws.dir / "state-sg1" / "state.db"
    c = sqlite3.connect(db)
    c.execute("PRAGMA user_version = 99")  # a schema this ipsecct does not read
    c.commit()
    c.close()
    r = gws.run("sg1")
    assert r.returncode == 2 and "schema version 99" in r.stderr, r.stderr
    assert "then run with --fresh-state" in r.stderr  # its keys can be checked: it works
    r = gws.run("sg1", "--fresh-state")
    assert r.returncode == 2
    assert "--fresh-state refused: tunnel(s) t0, t1" in r.stderr, r.stderr
    for i in range(20):
        if i != 3:
            gws.rekey(i)
    r = gws.run("sg1", "--fresh-state")
    assert r.returncode == 2 and "tunnel(s) t3 still have keys" in r.stderr, r.stderr
    gws.rekey(3)
    gws.start("sg1", "--fresh-state")
    st = gws.status("sg1")["state"]
    assert st["first_start"] is True
    assert list((gws.dir / "state-sg1").glob("old-*/state.db"))
    assert cap.duplicates() == []


@pytest.mark.slow
def test_one_process_per_state_directory(gws: Gateways) -> None:
    gws.write("sg1")
    gws.start("sg1")
    text = Path(gws.config("sg1")).read_text().replace(
        f'socket = "{gws.dir}/sg1.sock"', f'socket = "{gws.dir}/other.sock"'
    )
    other = gws.dir / "other.toml"
    other.write_text(text.replace(f"port = {gws.ports['sg1']['outer']}", "port = 0"))
    from tests.helpers.deployment import cli

    r = cli("gateway", "run", "-c", str(other), timeout=30)
    assert r.returncode == 2 and "is in use by another ipsecct process" in r.stderr, r.stderr


@pytest.mark.slow
def test_restart_resumes_counters_and_a_deleted_sa_stays_deleted(gws: Gateways) -> None:
    from tests.helpers.deployment import cli

    gws.write("sg1")
    gws.start("sg1")
    st = gws.status("sg1")
    assert st["state"]["reservations"]["sas"] == 20
    assert st["state"]["seq_block"] == 32
    r = cli("sa", "delete", "0x20000005", "-c", gws.config("sg1"))
    assert r.returncode == 0, r.stderr
    gws.kill("sg1")
    gws.start("sg1")
    st = gws.status("sg1")
    assert [a["name"] for a in st["state"]["kept_away"]] == ["t5"]
    assert st["state"]["kept_away"][0]["owner"] == "deleted"
    assert 0x20000005 not in gws.active_spis("sg1")
    r = cli("sa", "list", "--json", "-c", gws.config("sg1"))
    import json

    seqs = {s["name"]: s["seq"] for s in json.loads(r.stdout) if s["direction"] == "out"}
    assert seqs["t0"] == 32  # resumed at the first run's ceiling (one block)
    r = cli("status", "-c", gws.config("sg1"))
    assert "kept away: 1 tunnel(s): t5" in r.stdout and "20 SA(s) reserved" not in r.stdout
    assert "19 SA(s) reserved (blocks of 32" in r.stdout, r.stdout
    metrics = st["metrics"]
    assert metrics["state_tunnels_kept_away"] == 1
    from ipsecct.gateway.control import prometheus_text

    text = prometheus_text(st)
    assert 'ipsecct_state_tunnels_kept_away{node="sg1"} 1' in text
    assert 'ipsecct_drops_total{node="sg1",reason="seq_unreserved"}' in text


def test_no_sa_under_reservation_exports_no_headroom_sample_not_a_zero(tmp_path: Path) -> None:
    """A gateway keyed by IKE alone reserves no SA (its CHILD SAs' keys are never written):
    the metrics endpoint said ``ipsecct_state_min_seq_headroom 0``, which an alert on the
    headroom reads as "about to stop sending", while ``status`` said no SA was reserved.
    Now no sample (as ``min_headroom`` is null in ``status --json``); with one SA under
    reservation its headroom; and every state metric has its TYPE line."""
    from types import SimpleNamespace

    from ipsecct.gateway.control import prometheus_text
    from tests.helpers.transfer import World

    store, lock = state_mod.open_store(tmp_path / "s", "sg1", [], fresh=False)
    w = World()
    sad: dict[int, SecurityAssociation] = {}
    engine = SimpleNamespace(sad=SimpleNamespace(lookup=lambda dst, proto, spi: sad.get(spi)))
    node = SimpleNamespace(name="sg1", extensions={}, on_reserve=None, engine=engine)
    st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
    status: dict[str, Any] = {"name": "sg1", "sas": 0, "uptime_s": 1.0, "metrics": {},
                              "counters": {"out_packets": 0, "in_packets": 0, "out_bytes": 0,
                                           "in_bytes": 0, "drops": {}}}  # fmt: skip
    try:
        status["metrics"] = st.metrics()
        assert status["metrics"]["state_min_seq_headroom"] is None
        text = prometheus_text(status)
        assert "ipsecct_state_min_seq_headroom" not in text, text
        assert "# TYPE ipsecct_state_failed_writes_total counter" in text, text
        assert "# TYPE ipsecct_state_reservations_waiting gauge" in text, text
        out = w.tunnel.outbound
        st.tracked[out] = "fp"
        sad[out.spi] = out
        out.seq_ceiling = out.seq + 700
        status["metrics"] = st.metrics()
        text = prometheus_text(status)
        assert "# TYPE ipsecct_state_min_seq_headroom gauge" in text, text
        assert 'ipsecct_state_min_seq_headroom{node="sg1"} 700' in text, text
    finally:
        store.close()
        os.close(lock)


# -- the transfer core submits ownership changes and waits only where it must (sans-I/O) -----
def commit_before_pending() -> tuple[Any, Recorder]:
    """:func:`journaled_world` with a transfer taken as far as the COMMIT's arrival at sg2,
    whose "pending" row is not durable yet (its tunnel held, not active): the world and
    sg2's journal."""
    w, j1, j2 = journaled_world()
    w.transfer()
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    settle(w, "sg1", j1)
    w.deliver("sg1", "sg2")  # COMMIT: "pending" is not durable yet
    return w, j2


def test_the_targets_activation_leaves_its_aftermath_to_after_the_waiting_packets() -> None:
    """Issue 11 (drainfirst): the COMMIT's activation at the target puts the tunnel in
    service first (the MN's signal, then the packets held for it) and hands the rest over
    as one Aftermath, last: the "taken over" write (not waited for: "pending" and the first
    block were durable before the activation) and the finished record, which an adapter
    carries out after the packets forwarded behind the COMMIT. The held packet is opened
    and the write submitted once the Aftermath is carried out, in that order."""
    from ipsecct.ct.transfer import After, Aftermath, Finished, Inject, Transmit
    from tests.helpers.transfer import SG_ADDR, ip, udp_packet

    w, j2 = commit_before_pending()
    sg2 = w.gw["sg2"]
    # the MN's packet straight to sg2 before its activation: held
    w.route_mn(w.mn.send(udp_packet(1, up=True)) or b"", ip(SG_ADDR["sg2"]))
    assert [len(i.held) for i in sg2.core.incoming.values()] == [1]
    assert j2.settle() == ["pending"]
    out = sg2.core.settled(w.now)
    assert [type(o) for o in out] == [Transmit, Inject, Aftermath], out
    after = out[-1]
    assert isinstance(after, Aftermath)
    assert [type(o) for o in after.outputs] == [After, Finished]
    calls = len(j2.calls)
    sg2.run(out[:-1])
    assert sg2.injected == 1 and len(j2.calls) == calls  # the packet in, nothing written
    sg2.run(out[-1:])
    assert j2.calls[calls:] == [("taken", 0)] and sg2.finished[-1].outcome == "committed"


def test_a_source_whose_leaving_rows_were_never_submitted_never_commits() -> None:
    """The source's "leaving" rows are submitted by an After once its contexts are handed
    on; until then the COMMIT waits for a placeholder. An adapter that drops the After
    (nothing recorded) gets no COMMIT after the CTDR, only the rollback at the time-out:
    never a COMMIT without "leaving" durable."""
    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import After
    from ipsecct.ipsec.engine import TunnelState

    w, j1, _ = journaled_world()
    g = w.gw["sg1"]
    _, outs = g.core.start([g.engine.tunnels()[0]], "sg2", w.now)
    g.run([o for o in outs if not isinstance(o, After)])
    assert j1.calls == []
    w.deliver("sg1", "sg2")  # PCTD
    w.deliver("sg2", "sg1")  # CTDR: nothing recorded leaving, no COMMIT
    assert w.pending("sg1", "sg2") == 0 and w.tunnel.state is TunnelState.HELD
    assert settle(w, "sg1", j1) == [] and w.pending("sg1", "sg2") == 0
    w.now += g.core.settings.max_transfer_time + 0.001
    g.tick()  # the time-out: rolled back ("kept" submitted), the target told
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
    assert g.finished[-1].outcome != "committed" and j1.calls[0][0] == "kept"


def test_transfer_core_writes_in_parallel_with_the_exchange_and_waits_where_it_must() -> None:
    """The source submits "leaving" when it holds the tunnel, once its contexts were handed
    on (in the same step, before any answer can come: its rows do not delay them); the
    target submits "pending" when it installs the tunnel and answers at once: both are
    written while the messages travel. The COMMIT waits for "leaving" (not for the disk
    once it is durable: "given away" follows the COMMIT, not waited for); the target's
    tunnel sends nothing until "pending" (its first block) is durable; "owned" at the
    commit is not waited for."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState

    w, j1, j2 = journaled_world()
    w.transfer()
    # "leaving" submitted in the same step as the PCTD, once it was handed on (the one
    # message on the links then)
    assert j1.calls == [("leaving", 1)] and w.tunnel.state is TunnelState.HELD
    w.deliver("sg1", "sg2")  # PCTD: "pending" submitted, the CTDR posted without waiting
    assert j2.calls == [("pending", 0)] and j2.writes
    assert isinstance(w.peek("sg2", "sg1"), cxtp.CTDR)
    w.deliver("sg2", "sg1")  # CTDR: "leaving" is not durable yet: no COMMIT
    assert j1.calls == [("leaving", 1)] and w.pending("sg1", "sg2") == 0
    assert w.tunnel.state is TunnelState.HELD
    assert settle(w, "sg1", j1) == ["leaving"]
    msg = w.peek("sg1", "sg2")  # now the COMMIT, and "given away" submitted after it
    assert isinstance(msg, cxtp.CTD) and w.gw["sg1"].finished[-1].outcome == "committed"
    # "given away" submitted in the same step as the COMMIT, not waited for, and only once
    # the FINAL and the COMMIT were handed on (its rows do not delay them)
    on_links = sum(len(q) for q in w.links.values())
    assert j1.calls[-1] == ("given", on_links) and j1.writes
    assert on_links >= 1  # (the COMMIT, with the FINAL)
    w.deliver("sg1", "sg2")  # COMMIT: "pending" is not durable yet: held, nothing to send
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert t2.state is TunnelState.HELD and t2.outbound.seq_ceiling == t2.outbound.seq
    on_wire: list[int] = []  # what sg2 had sent on ESP when "taken over" was submitted
    arrived = j2.arrived
    j2.arrived = lambda *a: on_wire.append(len(w.gw["sg2"].wire)) or arrived(*a)  # type: ignore[method-assign, func-returns-value]
    assert settle(w, "sg2", j2) == ["pending"]
    assert t2.state is TunnelState.ACTIVE and t2.outbound.seq  # type: ignore[comparison-overlap]  # moved on since narrowed_ceiling > t2.outbound.seq  # type: ignore[comparison-overlap]  # moved on since narrowed
    assert w.gw["sg2"].finished[-1].outcome == "committed"
    assert j2.calls[-1][0] == "taken" and j2.writes  # submitted, not waited for
    # ... once the signal to the MN (its new gateway's address) was out, not before it
    assert on_wire == [1] and len(w.gw["sg2"].wire) == 1


def test_forwards_that_arrive_while_the_commit_waits_for_pending_are_held() -> None:
    """The COMMIT came, "pending" is not durable yet: what the source forwards meanwhile (ESP
    from the MN, traffic for it) is held with the tunnel, not refused, and goes on when the
    tunnel activates."""
    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import forward_cdb
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.transfer import ip, stream_seq, udp_packet

    w, j2 = commit_before_pending()
    sg2 = w.gw["sg2"]
    (t2,) = sg2.engine.tunnels()
    assert t2.state is TunnelState.HELD

    def forward(packet: bytes, inbound: bool) -> None:
        tag = cxtp.TransferTag(0, 0).encode()
        cdb = forward_cdb(packet, inbound)
        w.post("sg1", "sg2", cxtp.encode(cxtp.CTD(ip("0.0.0.0"), 0, (tag, cdb))))
        w.deliver("sg1", "sg2")

    data = w.mn.send(udp_packet(1, up=True))
    assert data is not None
    forward(data, True)
    forward(udp_packet(2, up=False), False)
    assert sg2.core.counters["forward_refused"] == 0
    assert sg2.delivered == [] and sg2.wire == []
    settle(w, "sg2", j2)
    assert t2.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed
    assert [stream_seq(p) for p in sg2.delivered] == [1] and len(sg2.wire) >= 1


def test_a_target_whose_writes_are_durable_first_activates_at_the_commit() -> None:
    from ipsecct.ipsec.engine import TunnelState

    w, j1, j2 = journaled_world()
    w.transfer()
    w.deliver("sg1", "sg2")
    settle(w, "sg2", j2)  # "pending" durable before the COMMIT arrives
    w.deliver("sg2", "sg1")
    settle(w, "sg1", j1)
    w.deliver("sg1", "sg2")
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert t2.state is TunnelState.ACTIVE


def test_what_the_source_forwards_after_its_commit_waits_for_the_targets_write() -> None:
    """The COMMIT and the packets the source held behind it arrive before the target's
    "pending" write is durable: the FORWARDs are taken and held with the tunnel, and
    delivered when it is activated (not refused as traffic for a tunnel not yet here)."""
    from ipsecct.ipsec.engine import TunnelState

    w, j1, j2 = journaled_world()
    w.transfer()
    w.mn_send(1)  # held at sg1 during the exchange
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    settle(w, "sg1", j1)  # the COMMIT, then the held packet as a FORWARD
    assert w.pending("sg1", "sg2") == 2
    w.deliver("sg1", "sg2")  # COMMIT: "pending" not durable yet
    w.deliver("sg1", "sg2")  # FORWARD
    g2 = w.gw["sg2"]
    (t2,) = g2.engine.tunnels()
    assert t2.state is TunnelState.HELD and g2.delivered == []
    assert g2.core.counters["forward_refused"] == 0
    settle(w, "sg2", j2)
    assert t2.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed
    assert len(g2.delivered) == 1  # delivered once active


def test_a_source_that_cannot_record_does_not_commit() -> None:
    """"Leaving" failed on the disk: no COMMIT; the tunnel sends again only once "owned"
    again is durable (the failed write may have reached the disk after all)."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.transfer import World

    w = World()
    j1 = Recorder(w, fail="leaving")
    w.gw["sg1"].core.journal = j1
    w.transfer()
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    assert settle(w, "sg1", j1) == []  # "leaving" failed: rolled back, "kept" submitted
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)  # rolled back, not committed
    assert w.gw["sg1"].finished[-1].outcome == "failed"
    assert w.tunnel.state is TunnelState.HELD  # until "owned" again is durable
    assert settle(w, "sg1", j1) == ["kept"]
    assert w.tunnel.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed
    w.deliver("sg1", "sg2")
    assert w.gw["sg2"].engine.tunnels() == []


def test_a_rolled_back_source_sends_again_only_once_it_owns_the_tunnel_again() -> None:
    """A time-out while "given away" is being written: CTC at once, but the tunnel stays held
    (its packets kept) until "owned" again is durable, and is dropped if that fails."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.transfer import World

    for fail in ("", "kept"):
        w = World()
        j1 = Recorder(w, fail=fail)
        w.gw["sg1"].core.journal = j1
        w.transfer()
        w.deliver("sg1", "sg2")
        w.deliver("sg2", "sg1")  # "given away" submitted; the disk is slow
        w.now += 10.0
        w.gw["sg1"].run(w.gw["sg1"].core.handle_timer(w.now))
        assert isinstance(w.peek("sg1", "sg2"), cxtp.CTC)
        assert w.tunnel.state is TunnelState.HELD
        w.host_send("sg1", 1)  # held, not sent
        assert w.gw["sg1"].wire == []
        settle(w, "sg1", j1)
        if fail:
            assert w.gw["sg1"].engine.tunnels() == []  # out of service: the invariant wins
            assert w.gw["sg1"].core.counters["unrecorded"] == 1
            assert w.gw["sg1"].wire == []
        else:
            assert w.tunnel.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed
            assert len(w.gw["sg1"].wire) == 1  # the held packet, sent now


def test_a_target_that_cannot_record_refuses() -> None:
    from ipsecct.ct import cxtp
    from tests.helpers.transfer import World

    w = World()
    w.gw["sg2"].core.journal = Recorder(w, refuse="pending")
    w.transfer()
    w.deliver("sg1", "sg2")
    msg = w.peek("sg2", "sg1")
    assert isinstance(msg, cxtp.CTDR) and not msg.all_ok
    assert w.gw["sg2"].engine.tunnels() == []


def test_a_target_whose_pending_write_fails_never_sends() -> None:
    """It answered before the write failed: at the COMMIT its tunnels, without a durable
    first block, are dropped (the tunnel is with nobody: the invariant wins)."""
    from tests.helpers.transfer import World

    w = World()
    j2 = Recorder(w, fail="pending")
    w.gw["sg2"].core.journal = j2
    w.transfer()
    w.deliver("sg1", "sg2")
    settle(w, "sg2", j2)
    w.deliver("sg2", "sg1")
    w.deliver("sg1", "sg2")  # the COMMIT
    assert w.gw["sg2"].engine.tunnels() == []
    assert w.gw["sg2"].finished[-1].outcome == "failed"
    w.host_send("sg2", 1)
    assert w.gw["sg2"].wire == []


def test_a_target_whose_pending_write_fails_before_the_commit_cancels_and_the_source_keeps_it(
) -> None:
    """sg2's "pending" write fails while sg1 still waits for its own "leaving" row before
    committing: sg2 could never activate the tunnel (no durable first block), so it cancels
    the transfer at once (a CTC) and records it discarded; sg1 rolls back and serves the
    tunnel again. Before, sg2 kept it pending until the COMMIT, then dropped it: the tunnel
    was with nobody. No (SPI, sequence number) pair is sent twice."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.transfer import World

    w = World()
    j1, j2 = Recorder(w), Recorder(w, fail="pending")
    w.gw["sg1"].core.journal = j1
    w.gw["sg2"].core.journal = j2
    w.host_send("sg1", 0)
    tid = w.transfer()
    w.deliver("sg1", "sg2")  # PCTD: installed pending, CTDR posted
    settle(w, "sg2", j2)  # "pending" fails: the CTC follows the CTDR
    g2 = w.gw["sg2"]
    assert g2.engine.tunnels() == [] and g2.finished[-1].outcome == "failed"
    assert j2.discards == {tid: "sg1"} and g2.core.counters["unrecorded"] == 1
    w.deliver("sg2", "sg1")  # CTDR: "leaving" not durable yet, no COMMIT
    assert isinstance(w.deliver("sg2", "sg1"), cxtp.CTC)  # sg1 rolls back
    settle(w, "sg1", j1)
    assert isinstance(w.deliver("sg1", "sg2"), cxtp.CTC)  # (its own rollback's), never a COMMIT
    assert w.pending("sg1", "sg2") == 0 and g2.engine.tunnels() == []
    g1 = w.gw["sg1"]
    assert g1.finished[-1].outcome != "committed"
    assert w.tunnel.state is TunnelState.ACTIVE and g1.engine.tunnels() == [w.tunnel]
    w.host_send("sg1", 1)
    wire = w.all_wire()
    assert len(wire) == len(set(wire)) == 2 and {g for g, _, _ in wire} == {"sg1"}


def test_a_target_whose_pending_write_failed_after_the_commit_still_answers_not_taken() -> None:
    """The COMMIT came before sg2's "pending" row, which then fails: the tunnel is dropped,
    never activated, and now recorded discarded. sg1, restarted without its "given" row,
    asks after sg2 forgot the transfer in memory: "not taken" (before: "taken", from sg2's
    memory of the install, and the tunnel was with nobody), and sg1 serves the tunnel
    again, from past its stored ceiling: no pair twice, since sg2 never sent."""

    w, j2 = commit_before_pending()
    j1 = w.gw["sg1"].core.journal
    tid = next(iter(j2.arrivals))
    j2.fail = "pending"
    settle(w, "sg2", j2)
    g2 = w.gw["sg2"]
    assert g2.engine.tunnels() == [] and g2.finished[-1].outcome == "failed"
    assert j2.discards == {tid: "sg1"}
    w.now += 10 * max(4 * g2.core.settings.retry_max, 60.0)
    g2.tick()  # forgotten in memory
    assert ("sg1", tid) not in g2.core.incoming
    j1.writes = []  # sg1 died before its "given" row landed
    resumes_alone(w, j1, tid)


def test_a_restarted_source_repeats_the_commit_it_recorded() -> None:
    """The source recorded "given away" and died before its COMMIT left: restarted, it
    answers the target's re-sent CTDR with COMMIT (not CTC), so the tunnel is not lost."""
    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import TransferCore
    from ipsecct.ipsec.engine import Engine, TunnelState
    from tests.helpers.transfer import SG_ADDR, World, ip

    w = World()
    tid = w.transfer()
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")
    w.drop("sg1", "sg2")  # the COMMIT never left: sg1 died
    g1 = w.gw["sg1"]
    g1.core = TransferCore(Engine(ip(SG_ADDR["sg1"])), w.gw["sg1"].core.endpoint)
    g1.engine = g1.core.engine
    g1.core.recall_commits([tid], w.now)
    w.now += 3.0  # sg2 re-sends its CTDR
    w.gw["sg2"].run(w.gw["sg2"].core.handle_timer(w.now))
    w.deliver("sg2", "sg1")
    assert isinstance(w.peek("sg1", "sg2"), cxtp.CTD)  # the decision: COMMIT
    w.deliver("sg1", "sg2")
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert t2.state is TunnelState.ACTIVE


# -- the grant: the target activates at the COMMIT, before its own row (sans-I/O) ------------
class GrantRecorder(Recorder):
    """A Recorder whose "leaving" and "pending" rows reserve the grant as the durable state's
    do (``reserves_grant``): it keeps each outbound SA's recorded ceiling by SPI, as the
    store would, to resume from after a restart."""

    reserves_grant = True

    def __init__(self, world: object, fail: str = "") -> None:
        super().__init__(world, fail=fail)
        self.ceiling: dict[int, int] = {}

    def leaving(self, tunnels: Sequence[Tunnel], peer: str, transfer_id: int) -> Write:
        from ipsecct.ct.journal import grant_ceiling, transferred_at

        for t in tunnels:
            sa = t.outbound
            self.ceiling[sa.spi] = max(
                self.ceiling.get(sa.spi, 0), grant_ceiling(sa, transferred_at(t))
            )
        return super().leaving(tunnels, peer, transfer_id)


def granting_world(fail: str = "") -> tuple[Any, GrantRecorder, GrantRecorder]:
    from tests.helpers.transfer import World

    w = World()
    j1, j2 = GrantRecorder(w), GrantRecorder(w, fail=fail)
    w.gw["sg1"].core.journal = j1
    w.gw["sg2"].core.journal = j2
    w.gw["sg1"].core.settings.grant = True  # ([transfer] grant = true: off by default)
    return w, j1, j2


def committed_under_grant(w: Any, j1: GrantRecorder) -> tuple[int, int]:
    """The exchange up to the COMMIT's arrival, the target's "pending" row not durable:
    (transfer id, the number the tunnel was transferred at)."""
    w.host_send("sg1", 0)
    came_at = w.tunnel.outbound.seq
    tid = w.transfer()
    w.deliver("sg1", "sg2")  # PCTD: "pending" submitted, not durable
    w.deliver("sg2", "sg1")  # CTDR
    assert settle(w, "sg1", j1) == ["leaving"]
    w.deliver("sg1", "sg2")  # the COMMIT, with the grant
    return tid, came_at


def test_a_commit_that_grants_activates_the_target_before_its_pending_row_is_durable() -> None:
    """The source's durable "leaving" row reserved the transferred number + GRANT: its
    COMMIT says so, and the target sends at once, up to there, while its own "pending" row
    is written; "taken over" is submitted only once that row is durable, and the row's
    ceiling then takes over. Without the grant (a journal that does not reserve it, or
    ``grant`` off at the source) it waits for the row, as before."""
    from ipsecct.ct.journal import GRANT
    from ipsecct.ct.transfer import decision_cdb, parse_grant
    from ipsecct.ipsec.engine import TunnelState

    assert parse_grant(decision_cdb(1, grant=True)) == GRANT
    assert parse_grant(decision_cdb(1)) == 0
    w, j1, j2 = granting_world()
    _, came_at = committed_under_grant(w, j1)
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert j2.writes and j2.writes[0][0] == "pending"  # not durable
    assert t2.state is TunnelState.ACTIVE and w.gw["sg2"].core.counters["granted"] == 1
    assert t2.outbound.seq_ceiling == came_at + GRANT
    assert [c for c, _ in j2.calls] == ["pending"]  # "taken over" waits for the row
    sent = len(w.gw["sg2"].wire)  # (the signal to the MN)
    w.host_send("sg2", 1)
    assert len(w.gw["sg2"].wire) == sent + 1
    assert settle(w, "sg2", j2) == ["pending"]
    assert [c for c, _ in j2.calls] == ["pending", "taken"]
    assert t2.outbound.seq_ceiling >= came_at + GRANT  # the row's, never lower
    wire = [(spi, seq) for _, spi, seq in w.all_wire()]
    assert len(wire) == len(set(wire))

    for off in ("journal", "setting"):
        w, j1, j2 = granting_world()
        if off == "journal":
            j2.reserves_grant = False
        else:
            w.gw["sg1"].core.settings.grant = False
        committed_under_grant(w, j1)
        (t2,) = w.gw["sg2"].engine.tunnels()
        assert t2.state is TunnelState.HELD and w.gw["sg2"].core.counters["granted"] == 0
        settle(w, "sg2", j2)
        assert t2.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed


@settings(max_examples=300, deadline=None)
@given(hst.binary(max_size=16))
def test_a_grant_octet_of_any_shape_is_a_grant_within_ours_or_none(body: bytes) -> None:
    from ipsecct.ct.journal import GRANT
    from ipsecct.ct.transfer import FPT_DECISION, frame, parse_grant, unframe

    cdb = frame(FPT_DECISION, body)
    g = parse_grant(cdb)
    padded = unframe(cdb)  # (a CDB is padded to a multiple of 4 octets)
    assert g == 0 or (len(padded) == 4 and padded[0] == 1 and g == min(1 << padded[1], GRANT))
    assert parse_grant(body) in range(GRANT + 1)  # not even a CDB: no exception


def test_a_granted_target_whose_pending_row_fails_stops_sending() -> None:
    """Activated under the grant, its "pending" row then fails: the tunnels are taken out
    of service (they could send no further than the grant, and after a restart this
    gateway would not know it took them); "taken over" is never submitted."""
    w, j1, j2 = granting_world(fail="pending")
    committed_under_grant(w, j1)
    sg2 = w.gw["sg2"]
    assert len(sg2.engine.tunnels()) == 1
    settle(w, "sg2", j2)
    assert sg2.engine.tunnels() == [] and sg2.core.counters["unrecorded"] == 1
    assert [c for c, _ in j2.calls] == ["pending"]
    sent = len(sg2.wire)  # (the signal to the MN, at the COMMIT)
    w.host_send("sg2", 1)
    assert len(sg2.wire) == sent


def test_the_durable_states_leaving_and_pending_rows_reserve_the_grant(tmp_path: Path) -> None:
    """What the grant rests on, with a real store: a source's "leaving" row is durable at
    least at the number the tunnel is transferred at (its cap with make-before-break, else
    its counter) + GRANT; a target's "pending" row at least at the number it came with +
    GRANT; and the "taken over" and "given away" rows after them never lower it."""
    from types import SimpleNamespace

    from ipsecct.ct.journal import GRANT
    from tests.helpers.transfer import World

    w = World()
    t = w.tunnel
    t.outbound.seq = 1000
    store, lock = state_mod.open_store(tmp_path / "s", "sg1", [], fresh=False)
    node = SimpleNamespace(name="sg1", extensions={}, on_reserve=None)
    st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
    assert st.reserves_grant
    fp = store.fingerprint(t.outbound)
    assert st.leaving([t], "sg2", 7).done
    assert store.load()[fp].ceiling == 1000 + GRANT
    t.transfer_cap = 5000  # make-before-break: transferred at its cap
    assert st.leaving([t], "sg3", 8).done
    assert store.load()[fp].ceiling == 5000 + GRANT
    assert st.left([t], "sg3", 8).done
    assert store.load()[fp].ceiling == 5000 + GRANT
    t2 = World().tunnel  # arriving with its own keys at 300
    t2.outbound.seq = 300
    assert st.arriving([t2], "sg2", 9).done
    row = store.load()[store.fingerprint(t2.outbound)]
    assert row.ceiling == 300 + GRANT and t2.outbound.seq_ceiling == 300 + GRANT
    store.close()


def test_an_untracked_sas_given_away_row_reuses_its_leaving_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invariant's identity: the "given away" row of an SA this gateway had no row for
    (e.g. made by IKE) names the fingerprint its "leaving" row was written under, computed
    once (not again per row), and only for that SA object: another SA object with other keys
    met at the same address after it gets its own. Kept only until the outcome."""
    from types import SimpleNamespace

    from tests.helpers.transfer import World

    t = World().tunnel
    store, lock = state_mod.open_store(tmp_path / "s", "sg1", [], fresh=False)
    node = SimpleNamespace(name="sg1", extensions={}, on_reserve=None)
    st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
    fp = store.fingerprint(t.outbound)
    computed: list[object] = []
    real = store.fingerprint
    monkeypatch.setattr(store, "fingerprint", lambda sa: computed.append(sa) or real(sa))  # type: ignore[func-returns-value]
    assert st.leaving([t], "sg2", 7).done
    assert st.left([t], "sg2", 7).done
    assert computed == [t.outbound]
    rows = store.load()
    assert rows[fp].owner is Owner.AWAY and rows[fp].transfer == 7
    assert not st._leaving_fps  # resolved: forgotten
    # A cached entry only answers for its own SA object.
    t2 = World().tunnel
    assert st.leaving([t], "sg2", 8).done
    st._leaving_fps[id(t2.outbound)] = (t.outbound, fp)  # as if t2 had t's id
    assert st.left([t2], "sg2", 8).done
    fp2 = real(t2.outbound)
    assert fp2 != fp and store.load()[fp2].owner is Owner.AWAY
    store.close()


def test_a_target_that_sent_under_the_grant_and_died_makes_the_source_resume_past_it() -> None:
    """The invariant across the grant: sg2 activates under the grant and sends, then dies
    before its "pending" row (with the arrival) is durable; restarted, it does not know the
    transfer. sg1 dies after its COMMIT and restarts with its "leaving" row: it asks, hears
    "not taken" and resumes past its stored ceiling, which its "leaving" row raised past the
    grant: above every number sg2 sent. No (SPI, sequence number) pair twice. (Resumed from
    the counter's value before the grant instead, it repeats sg2's numbers: checked.)"""
    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import TransferCore
    from ipsecct.ipsec.sequence import Reservations

    for broken in (False, True):
        w, j1, j2 = granting_world()
        tid, _ = committed_under_grant(w, j1)
        for i in range(1, 4):
            w.host_send("sg2", i)  # sent under the grant
        assert len(w.gw["sg2"].wire) >= 3
        # sg2 dies: its "pending" row (and the arrival) never landed; memory gone.
        j2.writes, j2.arrivals = [], set()
        g2 = w.gw["sg2"]
        for t in g2.engine.tunnels():
            g2.engine.remove_tunnel(t)
        g2.core = TransferCore(g2.engine, g2.core.endpoint, g2.core.settings)
        g2.core.journal = j2
        # sg1 dies after its COMMIT ("given away" never landed) and restarts: held at its
        # stored ceiling (the "leaving" row's), it asks.
        j1.writes = []
        w.links.clear()
        spi = w.tunnel.outbound.spi
        stored = w.tunnel.outbound.seq if broken else j1.ceiling[spi]
        g1 = restarted_source(w, j1, tid)
        Reservations.enrol(w.tunnel.outbound, stored)
        w.deliver("sg1", "sg2")
        a = w.deliver("sg2", "sg1")
        assert isinstance(a, cxtp.DQ) and a.answer == cxtp.Answer.NOT_TAKEN
        assert settle(w, "sg1", j1) == ["resumed"]
        w.host_send("sg1", 9)
        assert g1.wire and g1.wire[-1][0] == spi
        wire = [(s, q) for _, s, q in w.all_wire()]
        assert (len(wire) == len(set(wire))) is not broken


# -- the decision query: a source restarted with "leaving" rows asks (sans-I/O) ---------------
def restarted_source(w: Any, j: Recorder, tid: int, peer: str = "sg2") -> Any:
    """sg1 "restarts" with its tunnel recorded leaving by ``tid`` to ``peer``: a fresh core
    (nothing in memory) over the configuration's tunnel, which the state's merge installed
    held at its stored ceiling; the core is told, and asks ``peer``."""
    from ipsecct.ct.transfer import TransferCore
    from ipsecct.ipsec.engine import TunnelState
    from ipsecct.ipsec.sequence import Reservations

    g1 = w.gw["sg1"]
    old = g1.core
    g1.core = TransferCore(g1.engine, old.endpoint, old.settings)
    g1.core.journal = j
    t = w.tunnel
    Reservations.enrol(t.outbound, t.outbound.seq)  # no block reserved past it
    if t.state is not TunnelState.HELD:
        g1.engine.hold(t)
    g1.run(g1.core.recall_unresolved([(tid, peer, [t])], w.now))
    return g1


def resumes_alone(w: Any, j1: Recorder, tid: int) -> None:
    """sg1, restarted with its tunnel leaving by ``tid``, asks sg2, hears "not taken",
    serves the tunnel again, and is the only one that ever sent a number, none twice."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState

    g1 = restarted_source(w, j1, tid)
    w.deliver("sg1", "sg2")
    a = w.deliver("sg2", "sg1")
    assert isinstance(a, cxtp.DQ) and a.answer == cxtp.Answer.NOT_TAKEN
    assert settle(w, "sg1", j1) == ["resumed"]
    assert w.tunnel.state is TunnelState.ACTIVE and g1.engine.tunnels() == [w.tunnel]
    w.host_send("sg1", 1)
    wire = w.all_wire()
    assert len(wire) == len(set(wire)) and {g for g, _, _ in wire} == {"sg1"}


def test_a_restarted_source_asks_and_a_pending_target_takes_the_query_as_its_commit() -> None:
    """sg1 dies after "leaving" is durable and before its COMMIT: restarted, the tunnel is
    held (never sent on) and sg2, which holds it pending, is asked; it takes the query as
    the COMMIT and answers "taken": sg1 records it given away and removes it, sg2 sends."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState

    w, j1, j2 = journaled_world()
    w.host_send("sg1", 0)
    tid = w.transfer()
    w.deliver("sg1", "sg2")  # PCTD: installed pending
    settle(w, "sg2", j2)
    assert settle(w, "sg1", j1) == ["leaving"]
    w.drop("sg2", "sg1")  # the CTDR never reached sg1: it died
    g1 = restarted_source(w, j1, tid)
    q = w.peek("sg1", "sg2")
    assert isinstance(q, cxtp.DQ) and q.answer == cxtp.Answer.QUERY
    assert cxtp.transfer_tag(q).transfer_id == tid  # type: ignore[union-attr]
    w.host_send("sg1", 1)  # held by the query: dropped, counted, never sent
    assert len(g1.wire) == 1 and g1.core.counters["unresolved_dropped"] == 1
    w.deliver("sg1", "sg2")  # the query: taken as the COMMIT
    (t2,) = w.gw["sg2"].engine.tunnels()
    assert t2.state is TunnelState.ACTIVE
    a = w.deliver("sg2", "sg1")
    assert isinstance(a, cxtp.DQ) and a.answer == cxtp.Answer.TAKEN
    assert g1.engine.tunnels() == [] and j1.calls[-1][0] == "given"
    assert g1.finished[-1].outcome == "resolved" and "taken by sg2" in g1.finished[-1].detail
    assert g1.core.unresolved == {}
    w.host_send("sg2", 2)
    wire = w.all_wire()
    assert len(wire) == len(set(wire)) and {g for g, _, _ in wire} == {"sg1", "sg2"}


def test_a_target_that_gave_up_waiting_for_the_commit_answers_not_taken() -> None:
    """sg1 dies after "leaving" is durable and before its COMMIT, and restarts only after sg2
    gave up waiting for it (retry_max: the pending tunnel discarded, never activated): sg2
    still knows that, answers "not taken", and sg1 serves the tunnel again. (sg2 forgot the
    discarded transfer in the same timer pass and answered "taken" from its record of the
    arrival: sg1 gave the tunnel away to nobody; seen with real processes at load 9.)"""

    w, j1, j2 = journaled_world()
    tid = w.transfer()
    w.deliver("sg1", "sg2")  # PCTD: installed pending
    settle(w, "sg2", j2)
    settle(w, "sg1", j1)
    w.drop("sg2", "sg1")  # the CTDR never reached sg1: it died
    g2 = w.gw["sg2"]
    w.now += g2.core.settings.retry_max + 0.1
    g2.tick()
    assert g2.finished[-1].outcome == "cancelled"
    assert g2.engine.tunnels() == []
    w.now += 1.0  # sg1 restarts a second later
    resumes_alone(w, j1, tid)


def _target_on_store(w: Any, directory: Path) -> Any:
    """sg2's journal: a real durable state over a store in ``directory`` (no writer thread:
    each write is made, synced, before the call returns); a fresh core (nothing in memory),
    as after a restart of sg2. Returns the state."""
    from types import SimpleNamespace

    from ipsecct.ct.transfer import TransferCore

    store, lock = state_mod.open_store(directory, "sg2", [], fresh=False)
    node = SimpleNamespace(name="sg2", extensions={}, on_reserve=None)
    st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
    g2 = w.gw["sg2"]
    old = g2.core
    g2.core = TransferCore(g2.engine, old.endpoint, old.settings)
    g2.core.journal = st
    return st


def _restart_target(w: Any, st: Any, directory: Path) -> Any:
    st.store.close()
    os.close(st.lock_fd)
    return _target_on_store(w, directory)


@pytest.mark.parametrize(("gave_up", "restart"), [(True, True), (True, False), (False, True)])
def test_a_target_that_gave_up_on_the_commit_answers_not_taken_after_its_restart(
    tmp_path: Path, gave_up: bool, restart: bool
) -> None:
    """sg1 dies after "leaving" is durable and before its COMMIT; sg2 (a real store) gives
    up waiting for it (retry_max: "no decision from the source"), which is recorded with
    the rows that drop the pending tunnel; sg2 restarts, then sg1: sg2 knows the transfer
    only from its store and answers "not taken", and sg1 serves the tunnel again; the
    COMMIT that comes late is refused (nothing activated). Without the give-up (sg2
    restarted while the tunnel was pending, its record says only "arrived") the answer is
    "taken", the safe one. Not restarted, sg2 answers so from its store once it forgot the
    transfer in memory (an hour later)."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState

    w, j1, _ = journaled_world()
    d = tmp_path / "sg2"
    st = _target_on_store(w, d)
    tid = w.transfer()
    w.deliver("sg1", "sg2")  # PCTD: installed pending, its arrival durable
    assert st.store.arrivals() == {tid} and st.store.arrival_outcomes() == {}
    settle(w, "sg1", j1)
    w.deliver("sg2", "sg1")  # CTDR: sg1 sends its COMMIT and dies; the COMMIT is late
    late = list(w.links[("sg1", "sg2")])
    w.links[("sg1", "sg2")].clear()
    assert any(isinstance(cxtp.decode(m), cxtp.CTD) for m in late)
    assert [k for k, _, _ in j1.writes] == ["given"]
    j1.writes.clear()  # (sg1 died before "given away" landed: its row says leaving)
    g2 = w.gw["sg2"]
    if gave_up:
        w.now += g2.core.settings.retry_max + 0.1
        g2.tick()
        assert g2.finished[-1].outcome == "cancelled"
        assert g2.engine.tunnels() == []
        assert st.store.arrival_outcomes() == {tid: ("discarded", "sg1")}  # with the rows
        assert {r.owner for r in st.store.load().values()} == {Owner.AWAY}
    else:
        for t in g2.engine.tunnels():  # (a restarted sg2 keeps its pending tunnels away)
            g2.engine.remove_tunnel(t)
    w.now += 3600.0  # long past anything remembered in memory
    if restart:
        st = _restart_target(w, st, d)
    else:
        g2.tick()
        assert g2.core.incoming == {}  # forgotten in memory
    assert st.discarded(tid) == ("sg1" if gave_up else None) and st.arrivals == {tid}
    g1 = restarted_source(w, j1, tid)
    w.deliver("sg1", "sg2")
    a = w.deliver("sg2", "sg1")
    assert isinstance(a, cxtp.DQ)
    if not gave_up:
        assert a.answer == cxtp.Answer.TAKEN
        assert g1.engine.tunnels() == [] and g2.engine.tunnels() == []  # lost: safe
        return
    assert a.answer == cxtp.Answer.NOT_TAKEN
    assert settle(w, "sg1", j1) == ["resumed"]
    assert w.tunnel.state is TunnelState.ACTIVE and g1.engine.tunnels() == [w.tunnel]
    # The COMMIT sg1 sent before it died, late, on the restarted sg2: nothing activated
    done = len(g2.finished)
    for m in late:
        w.post("sg1", "sg2", m)
    w.deliver_all()
    assert g2.engine.tunnels() == [] and len(g2.finished) == done
    st = _restart_target(w, st, d)  # and again: still "not taken"
    assert st.discarded(tid) == "sg1" and not st.may_have_arrived(tid, "sg1", None)
    # another peer (not of sg1's fail-over pair) asking about it is not answered
    q = cxtp.DQ(w.mn_out.src, cxtp.Answer.QUERY, (cxtp.TransferTag(tid, 0).encode(),))
    assert g2.core.receive("sg3", q, w.now) == []
    assert g2.core.counters["foreign_query"] == 1
    w.host_send("sg1", 1)
    wire = w.all_wire()
    assert len(wire) == len(set(wire)) and {g for g, _, _ in wire} == {"sg1"}
    st.store.close()
    os.close(st.lock_fd)


def _damage(directory: Path, how: str) -> None:
    db = directory / "state.db"
    if how == "removed":
        for p in (db, db.with_name("state.db-wal"), db.with_name("state.db-shm")):
            p.unlink(missing_ok=True)
        return
    c = sqlite3.connect(db)
    if how == "newer schema":
        c.execute(f"PRAGMA user_version = {SCHEMA + 1}")
    elif how == "arrival not hex":
        c.execute("INSERT INTO arrival (transfer, peer, changed) VALUES ('zz', 'sg9', 1.0)")
    elif how == "arrival time not a number":
        c.execute("INSERT INTO arrival (transfer, peer, changed) VALUES ('11', 'sg9', 'x')")
    elif how == "horizon not a number":
        c.execute("INSERT INTO arrival_pruned VALUES ('sg9', 'nan')")
    c.commit()
    c.close()


@pytest.mark.parametrize("how", ["newer schema", "removed", "arrival not hex",
                                 "arrival time not a number", "horizon not a number"])
def test_a_target_whose_state_was_replaced_answers_taken_for_what_may_have_arrived(
    tmp_path: Path, how: str
) -> None:
    """sg2 (no AEAD tunnel configured: a damaged state is moved aside, not refused) had a
    transfer arrive (its arrival durable, its tunnel perhaps sent on) when it stopped; its
    state.db is then damaged (a newer ipsecct's schema, removed, a hand-edited arrival row)
    and sg2 starts on a new one. sg1, restarted with the tunnel "leaving", asks: the answer
    must be "taken" (sg2 cannot know it was not), never "not taken" (sg1 would send on the
    tunnel's keys again). A row that cannot be read is damage (one line), not a
    traceback."""
    from ipsecct.ct import cxtp

    w, j1, _ = journaled_world()
    d = tmp_path / "sg2"
    st = _target_on_store(w, d)
    tid = w.transfer()
    w.deliver("sg1", "sg2")  # PCTD: installed pending, its arrival durable
    assert st.store.arrivals() == {tid}
    settle(w, "sg1", j1)
    w.deliver("sg2", "sg1")  # CTDR: sg1 sends its COMMIT and dies
    w.links[("sg1", "sg2")].clear()
    j1.writes.clear()  # (sg1 died before "given away" landed: its row says leaving)
    for t in w.gw["sg2"].engine.tunnels():  # (a restarted sg2 keeps its pending tunnels away)
        w.gw["sg2"].engine.remove_tunnel(t)
    st.store.close()
    os.close(st.lock_fd)
    _damage(d, how)
    st = _target_on_store(w, d)
    assert st.store.created and st.arrivals == set()  # a new store: the arrival is lost
    assert any(p.name.startswith("old-") for p in d.iterdir()) or how == "removed"
    g1 = restarted_source(w, j1, tid)
    w.deliver("sg1", "sg2")
    a = w.deliver("sg2", "sg1")
    assert isinstance(a, cxtp.DQ) and a.answer == cxtp.Answer.TAKEN
    assert g1.engine.tunnels() == []  # lost (the invariant wins), never sent on twice
    st.store.close()
    os.close(st.lock_fd)


def test_a_target_that_never_got_the_transfer_answers_not_taken_and_refuses_it_later() -> None:
    """sg1 dies after "leaving" is durable, its PCTD still on its way: sg2 does not know the
    transfer and answers "not taken"; the PCTD that arrives after that is refused. sg1 owns
    the tunnel again once "owned" is durable, and only then sends (past its ceiling)."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState

    w, j1, _j2 = journaled_world()
    w.host_send("sg1", 0)
    tid = w.transfer()
    settle(w, "sg1", j1)
    late = w.links[("sg1", "sg2")].popleft()  # the PCTD, delayed on the dead connection
    g1 = restarted_source(w, j1, tid)
    w.deliver("sg1", "sg2")
    a = w.deliver("sg2", "sg1")
    assert isinstance(a, cxtp.DQ) and a.answer == cxtp.Answer.NOT_TAKEN
    assert w.tunnel.state is TunnelState.HELD  # until "owned" again is durable
    w.host_send("sg1", 1)
    assert [seq for _, seq in g1.wire] == [1]  # (sent before the transfer)
    assert settle(w, "sg1", j1) == ["resumed"]
    assert w.tunnel.state is TunnelState.ACTIVE  # type: ignore[comparison-overlap]  # moved on since narrowed
    w.host_send("sg1", 2)
    # the packet kept while "owned" was written, then the new one: past its stored ceiling
    assert [seq for _, seq in g1.wire] == [1, 2, 3]
    w.post("sg1", "sg2", late)
    w.deliver("sg1", "sg2")  # the late PCTD: refused, nothing installed, no CTDR
    assert w.gw["sg2"].engine.tunnels() == [] and w.pending("sg2", "sg1") == 0
    assert w.gw["sg2"].core.counters["refused"] == 1
    assert g1.finished[-1].detail == "not taken by sg2: kept"


def test_a_restarted_target_answers_from_its_durable_record_of_the_arrival() -> None:
    """Both died around the COMMIT: sg2 restarted (its memory empty) knows from its durable
    state that the transfer arrived (it may have sent on the tunnel): "taken"."""
    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import TransferCore

    w, j1, j2 = journaled_world()
    tid = w.transfer()
    w.deliver("sg1", "sg2")
    settle(w, "sg2", j2)
    settle(w, "sg1", j1)
    w.drop("sg2", "sg1")
    g2 = w.gw["sg2"]
    g2.core = TransferCore(g2.engine, g2.core.endpoint, g2.core.settings)
    g2.core.journal = j2  # (its record of arrivals survives; the core's memory does not)
    restarted_source(w, j1, tid)
    w.deliver("sg1", "sg2")
    a = w.deliver("sg2", "sg1")
    assert isinstance(a, cxtp.DQ) and a.answer == cxtp.Answer.TAKEN
    assert w.gw["sg1"].engine.tunnels() == []


def test_an_active_target_answers_taken_and_a_receiving_one_cancels() -> None:
    """The answers from memory: a transfer committed here is "taken"; one whose contexts are
    still arriving is cancelled and "not taken" (its later messages refused)."""
    from ipsecct.ct import cxtp
    from tests.helpers.transfer import World, ip

    w = World()
    tid = w.transfer()
    w.deliver_all()
    g2 = w.gw["sg2"]
    tag = cxtp.TransferTag(tid, 0).encode()
    out = g2.core.receive("sg1", cxtp.DQ(ip("192.0.2.10"), cxtp.Answer.QUERY, (tag,)), w.now)
    assert [o.msg.answer for o in out] == [cxtp.Answer.TAKEN]  # type: ignore[union-attr]
    # contexts of another transfer still arriving (not the last message)
    data = cxtp.PCTD(ip("192.0.2.10"), 0, b"k" * 20, (cxtp.TransferTag(7, 0, last=False).encode(),))
    g2.core.receive("sg1", data, w.now)
    assert g2.core.incoming[("sg1", 7)].state.value == "receiving"
    q = cxtp.DQ(ip("192.0.2.10"), cxtp.Answer.QUERY, (cxtp.TransferTag(7, 0).encode(),))
    out = g2.core.receive("sg1", q, w.now)
    assert [o.msg.answer for o in out if hasattr(o, "msg")] == [cxtp.Answer.NOT_TAKEN]  # type: ignore[union-attr]  # (a DQ)
    assert g2.core.incoming[("sg1", 7)].state.value == "cancelled"
    # what a peer can make this gateway remember by asking is bounded (per peer)
    from ipsecct.ct.transfer import MAX_NOT_TAKEN_PER_PEER

    for tid2 in range(1000, 1000 + MAX_NOT_TAKEN_PER_PEER + 50):
        tag2 = cxtp.TransferTag(tid2, 0).encode()
        w.now += 0.01  # (within the rate of queries a peer gets answers for)
        g2.core.receive("sg1", cxtp.DQ(ip("192.0.2.10"), 0, (tag2,)), w.now)
    # (once per query, by the asker, whatever peers it refuses the id from)
    assert len(g2.core.not_taken) == MAX_NOT_TAKEN_PER_PEER
    assert ("sg1", 1000 + MAX_NOT_TAKEN_PER_PEER + 49) in g2.core.not_taken


def test_the_query_says_how_old_the_transfer_is_and_the_target_decides_with_it(
    tmp_path: Path,
) -> None:
    """The restarted source's query carries the transfer's AGE (seconds since its tunnels
    were recorded leaving, growing with each repeat). A target that pruned arrivals from
    that peer answers "not taken" only for a transfer begun after the newest one pruned
    (with a margin for clock steps): one whose record may be gone is "taken"."""
    import time as time_mod
    from types import SimpleNamespace

    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import FPT_AGE, parse_age

    w, j1, j2 = journaled_world()
    tid = w.transfer()
    settle(w, "sg1", j1)
    w.links.clear()  # nothing reached sg2
    g1 = w.gw["sg1"]
    restarted_source(w, j1, tid)
    g1.run(g1.core.recall_unresolved([], w.now))
    g1.core.unresolved[tid].age = 100.0  # (what recall_unresolved's ages set)
    w.drop("sg1", "sg2")
    w.now += g1.core.settings.retry
    g1.tick()
    q = w.peek("sg1", "sg2")
    assert isinstance(q, cxtp.DQ) and [cxtp.cdb_fpt(c) for c in q.ext[1:]] == [FPT_AGE]
    assert parse_age(q.ext[1:]) == 100.0 + g1.core.settings.retry
    w.deliver("sg1", "sg2")
    assert j2.asked_age == 100.0 + g1.core.settings.retry
    # The durable state's rule, with a real store: arrivals from sg1 pruned up to an hour ago.
    store, lock = state_mod.open_store(tmp_path / "s", "sg2", [], fresh=False)
    now = time_mod.time()
    store.put([], [(1, "sg1"), (2, "sg1"), (3, "sg3")])
    old = (now - 4 * 3600, f"{3:016x}")
    store.conn.execute("UPDATE arrival SET changed = ? WHERE transfer != ?", old)
    node = SimpleNamespace(name="sg2", extensions={}, on_reserve=None)
    st = state_mod.DurableState(node, store, lock, 1024, 7200.0)  # type: ignore[arg-type]
    assert st.arrival_margin == 3600.0 and st.arrivals == {1, 2, 3}
    gone, upto = store.prune_arrivals(now - 3 * 3600)
    st._pruned((gone, upto, store.arrival_counts()))
    assert gone == {1, 2} and st.arrivals == {3} and st.arrival_upto == {"sg1": now - 4 * 3600}
    assert st.may_have_arrived(3, "sg3", 10**6)  # recorded: taken
    # nothing pruned from sg3, but the asker may be the standby of sg1 (docs/cluster.md):
    # the newest arrival pruned from any peer bounds what is known
    assert st.may_have_arrived(9, "sg3", 10**6)
    assert not st.may_have_arrived(9, "sg3", 60)
    assert not st.may_have_arrived(9, "sg1", 60)  # begun after every pruned one (and margin)
    assert st.may_have_arrived(9, "sg1", 4 * 3600)  # may be as old as a pruned one
    assert st.may_have_arrived(9, "sg1", 3 * 3600 + 60)  # within the margin: unsure, taken
    assert st.may_have_arrived(9, "sg1", None)  # age not said: taken
    store.close()


def test_the_core_says_what_each_tunnel_in_a_transfer_is_doing() -> None:
    """``sa list``'s source: the source's tunnel is leaving (held, or sending up to its cap),
    the target's arriving until the COMMIT; a restarted source's is unresolved; discarded by
    the operator, it is no longer asked about and an answer changes nothing."""
    from ipsecct.ct import cxtp

    w, j1, _j2 = journaled_world()
    tid = w.transfer()
    (role, why), = w.gw["sg1"].core.tunnel_roles().values()
    assert role == "leaving" and "to sg2, held" in why
    w.deliver("sg1", "sg2")
    (role, why), = w.gw["sg2"].core.tunnel_roles().values()
    assert role == "arriving" and "from sg1" in why
    settle(w, "sg1", j1)
    w.links.clear()
    g1 = restarted_source(w, j1, tid)
    assert [r for r, _ in g1.core.tunnel_roles().values()] == ["unresolved"]
    assert g1.core.forget_unresolved(w.tunnel) and g1.core.unresolved == {}
    assert not g1.core.forget_unresolved(w.tunnel)
    tag = cxtp.TransferTag(tid, 0).encode()
    out = g1.core.receive("sg2", cxtp.DQ(w.tunnel.outbound.dst, 2, (tag,)), w.now)
    assert out == [] and j1.calls[-1][0] == "leaving"  # nothing resumed


def test_an_unanswered_query_is_repeated_and_the_tunnel_stays_held() -> None:
    """Nobody answers: the query goes again every ``retry``, the tunnel stays held (never
    sent on), and an answer from another peer changes nothing."""
    from ipsecct.ct import cxtp
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.transfer import World

    w = World(("sg1", "sg2", "sg3"))
    j1 = Recorder(w)
    w.gw["sg1"].core.journal = j1
    tid = w.transfer()
    settle(w, "sg1", j1)
    w.links.clear()
    g1 = restarted_source(w, j1, tid)
    for _ in range(3):
        w.drop("sg1", "sg2")
        assert w.pending("sg1", "sg2") == 0
        assert g1.core.next_deadline() == w.now + g1.core.settings.retry
        w.now += g1.core.settings.retry
        g1.tick()
        assert isinstance(w.peek("sg1", "sg2"), cxtp.DQ)
    tag = cxtp.TransferTag(tid, 0).encode()
    g1.run(g1.core.receive("sg3", cxtp.DQ(w.tunnel.outbound.dst, 2, (tag,)), w.now))
    assert w.tunnel.state is TunnelState.HELD and tid in g1.core.unresolved
    w.host_send("sg1", 1)
    assert g1.wire == []


def test_a_new_candidate_gets_its_own_leaving_row_before_its_commit() -> None:
    """The first peer refuses (unsupported algorithm), the transfer moves on to sg3: a new
    "leaving" row names sg3, and the COMMIT to sg3 waits for it (a source restarted after
    that COMMIT must ask sg3, not sg2, which would say "not taken")."""
    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import Settings
    from ipsecct.ipsec.algorithms import EncAlg
    from tests.helpers.transfer import World

    s2 = Settings(supported_enc=frozenset({EncAlg.CHACHA20_POLY1305}))
    w = World(("sg1", "sg2", "sg3"), settings={"sg2": s2})
    j1 = Recorder(w)
    w.gw["sg1"].core.journal = j1
    w.transfer("sg1", "sg2", candidates=["sg3"])
    settle(w, "sg1", j1)
    w.deliver("sg1", "sg2")
    w.deliver("sg2", "sg1")  # refused: CTC to sg2, PCTD to sg3, "leaving" to sg3 submitted
    assert j1.leaving_to == ["sg2", "sg3"] and j1.writes
    w.deliver("sg1", "sg3")
    w.deliver("sg3", "sg1")  # accepted, but the new row is not durable: no COMMIT yet
    assert w.pending("sg1", "sg3") == 0
    settle(w, "sg1", j1)
    assert isinstance(w.peek("sg1", "sg3"), cxtp.CTD)  # the COMMIT


@pytest.mark.slow
def test_an_unusable_state_directory_is_one_line_and_status_2(gws: Gateways) -> None:
    gws.write("sg1")
    (gws.dir / "blocker").write_text("a file, not a directory")
    cfg = Path(gws.config("sg1"))
    cfg.write_text(cfg.read_text().replace('dir = "state-sg1"', 'dir = "blocker/state"'))
    r = gws.run("sg1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ipsecct: error: cannot use state")
    assert "Traceback" not in r.stderr


def test_ownership_writes_run_on_the_states_own_thread_started_before_any_write(
    tmp_path: Path,
) -> None:
    """The writer's thread exists once the state is started (a handover's "given away" write
    does not wait for a thread to be made), every ownership write is made on it, in order,
    and a stop ends it."""
    import asyncio
    import threading
    from types import SimpleNamespace

    async def main() -> None:
        store, lock = state_mod.open_store(tmp_path / "s", "gw", [], fresh=False)
        node = SimpleNamespace(name="gw", extensions={}, on_reserve=None)
        st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
        threads: list[str] = []
        put = store.put

        def recording_put(
            rows: Iterable[SAState],
            arrivals: Sequence[tuple[int, str]] = (),
            leases: Sequence[state_mod.LeaseRow] = (),
            discards: Sequence[tuple[int, str]] = (),
        ) -> None:
            threads.append(threading.current_thread().name)
            put(rows, arrivals, leases, discards)

        store.put = recording_put  # type: ignore[method-assign]
        await st.start()
        mine = [t for t in threading.enumerate() if t.name.startswith("ipsecct-state-gw")]
        assert len(mine) == 1 and mine[0].is_alive()
        writes: list[Write] = []
        for i in range(3):
            writes.append(st._submit([row(f"fp{i}", Owner.AWAY, 10 + i)]))
        async with asyncio.timeout(10):
            while not all(w.done for w in writes):
                await asyncio.sleep(0.01)
        assert threads and set(threads) == {mine[0].name}
        loaded = st.store.load()
        assert {fp: (r.owner, r.ceiling) for fp, r in loaded.items()} == {
            f"fp{i}": (Owner.AWAY, 10 + i) for i in range(3)
        }
        await st.stop()
        assert not mine[0].is_alive()

    asyncio.run(main())


def test_writes_not_waited_for_next_wake_the_writer_after_the_current_callback(
    tmp_path: Path,
) -> None:
    """"pending" (target, before its CTDR) and "owned" (target, at the commit) are queued at
    once but the writer's thread is woken only after the loop's current callback, so the
    message the core answered with leaves first; an urgent write ("given away") wakes it at
    once and takes everything queued before it, in submission order."""
    import asyncio
    from types import SimpleNamespace

    async def main() -> None:
        store, lock = state_mod.open_store(tmp_path / "s", "gw", [], fresh=False)
        node = SimpleNamespace(name="gw", extensions={}, on_reserve=None)
        st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
        jobs: list[int] = []
        wake = st._wake_writer

        def counting_wake() -> None:
            jobs.append(len(st._owq))
            wake()

        st._wake_writer = counting_wake  # type: ignore[method-assign]
        await st.start()
        loop = asyncio.get_running_loop()
        lazy: list[Write] = []
        in_callback: list[int] = []

        def callback() -> None:  # what the core does inside one loop callback
            lazy.append(st._submit([row("fp0", Owner.PENDING, 10)], urgent=False))
            lazy.append(st._submit([row("fp1", Owner.OWNED, 11)], urgent=False))
            in_callback.append(len(jobs))

        loop.call_soon(callback)
        async with asyncio.timeout(10):
            while len(lazy) < 2 or not all(w.done for w in lazy):
                await asyncio.sleep(0.01)
        assert in_callback == [0]  # nothing woken inside the callback
        assert jobs == [2]  # one wake-up afterwards, for both (they are queued in order)
        jobs.clear()
        first = st._submit([row("fp2", Owner.PENDING, 12)], urgent=False)
        urgent = st._submit([row("fp2", Owner.AWAY, 13)])
        assert jobs == [2]  # woken at once, with the earlier write queued ahead of it
        async with asyncio.timeout(10):
            while not (first.done and urgent.done):
                await asyncio.sleep(0.01)
        loaded = st.store.load()
        assert {fp: (r.owner, r.ceiling) for fp, r in loaded.items()} == {
            "fp0": (Owner.PENDING, 10), "fp1": (Owner.OWNED, 11), "fp2": (Owner.AWAY, 13),
        }  # fmt: skip
        await st.stop()

    asyncio.run(main())


def test_an_ownership_write_is_settled_by_the_first_callback_after_its_thread_ends(
    tmp_path: Path,
) -> None:
    """The writer's thread hands a write's outcome to the loop as one callback: the Write is
    settled in the loop iteration right after the thread finished, ahead of anything the
    loop schedules later (a future chained to the thread's settled it one iteration later,
    behind that iteration's I/O; the COMMIT waits for "given away" that way)."""
    import asyncio
    import threading
    from types import SimpleNamespace

    async def main() -> None:
        store, lock = state_mod.open_store(tmp_path / "s", "gw", [], fresh=False)
        node = SimpleNamespace(name="gw", extensions={}, on_reserve=None)
        st = state_mod.DurableState(node, store, lock, 1024)  # type: ignore[arg-type]
        await st.start()
        loop = asyncio.get_running_loop()
        handed = threading.Event()  # the thread has handed something to the loop
        threadsafe = loop.call_soon_threadsafe

        def recording(cb: Any, *args: Any, **kw: Any) -> Any:
            h = threadsafe(cb, *args, **kw)
            handed.set()
            return h

        loop.call_soon_threadsafe = recording  # type: ignore[method-assign, assignment]
        ticks: list[int] = []  # loop iterations after the thread's hand-over
        settled_at: list[int] = []
        done = loop.create_future()

        def tick() -> None:
            ticks.append(len(ticks))
            if not done.done():
                loop.call_soon(tick)

        def then(ok: bool) -> None:
            settled_at.append(len(ticks))
            if not done.done():
                done.set_result(ok)

        def callback() -> None:  # the core's turn: "given away" submitted, waited for
            st._submit([row("fp0", Owner.AWAY, 10)], then)
            # Block this turn until the thread has written and handed the outcome over,
            # then count the loop's iterations from here.
            assert handed.wait(15)
            loop.call_soon(tick)

        loop.call_soon(callback)
        async with asyncio.timeout(15):
            assert await done is True
        assert settled_at == [0]  # before the first iteration scheduled after the hand-over
        assert st.store.load()["fp0"].owner is Owner.AWAY
        loop.call_soon_threadsafe = threadsafe  # type: ignore[method-assign]
        await st.stop()

    asyncio.run(main())


def test_the_write_ahead_log_is_prepared_so_that_later_synced_writes_overwrite_it(
    tmp_path: Path,
) -> None:
    """prepare_wal makes the log its pages long, checkpointed, and leaves nothing of its own:
    the writes after it start the log again at its beginning (the file does not grow: a
    synced commit flushes its data, not the file system's journal), everything written
    before and after is there on reopening, and the scratch row is gone."""
    db = tmp_path / "s" / state_mod.DB_NAME
    wal = db.with_name(db.name + "-wal")
    store, lock = state_mod.open_store(tmp_path / "s", "gw", [], fresh=False)
    store.put([row("before", Owner.OWNED, 5)])
    store.prepare_wal(64)
    size = os.path.getsize(wal)
    assert size >= 64 * 4096
    assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 40
    for i in range(40):  # within what was prepared: never appended past it
        store.put([row(f"fp{i}", Owner.LEAVING, 100 + i)])
    assert os.path.getsize(wal) == size
    assert store.conn.execute("SELECT count(*) FROM meta WHERE key = 'wal'").fetchone()[0] == 0
    store.close()
    os.close(lock)
    again, lock = state_mod.open_store(tmp_path / "s", "gw", [], fresh=False)
    loaded = again.load()
    assert loaded["before"].ceiling == 5
    assert {fp: r.ceiling for fp, r in loaded.items() if fp.startswith("fp")} == {
        f"fp{i}": 100 + i for i in range(40)
    }
    again.close()
    os.close(lock)


def test_a_log_that_cannot_be_prepared_is_one_line_and_frees_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fails while the log is prepared at start stops the gateway with a
    StateError (one line at the CLI), not an SQLite traceback, and leaves the directory
    unlocked for the next start."""
    from types import SimpleNamespace

    def failing(self: StateStore, pages: int = 0) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(StateStore, "prepare_wal", failing)
    node = SimpleNamespace(name="gw", extensions={}, on_reserve=None)
    cfg = SimpleNamespace(
        state_dir=str(tmp_path / "s"), name="gw", tunnels=[], seq_block=1024,
        arrival_retention=86400.0,
    )  # fmt: skip
    with pytest.raises(StateError, match=r"cannot use state directory .*disk I/O"):
        state_mod.open_for(node, cfg)  # type: ignore[arg-type]
    monkeypatch.undo()
    store, lock = state_mod.open_store(tmp_path / "s", "gw", [], fresh=False)  # not locked
    store.close()
    os.close(lock)


def test_row_peer_text_is_the_address_as_str_writes_it() -> None:
    """The rows' peer text is formatted in C for IPv4 (state._address_text): the same text
    as str() for every kind of address, or a restarted gateway would not match its rows."""
    import ipaddress

    rng = random.Random(11)
    v4 = [0, 1, 255, 256, 0x7F000001, 0x0A000000, 0xFFFFFFFF, 0xC0A80001]
    v4 += [rng.getrandbits(32) for _ in range(2000)]
    for n in v4:
        a = ipaddress.IPv4Address(n)
        assert state_mod._address_text(a) == str(a)
    for text in ("::", "::1", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1:2:3:4"):
        a6 = ipaddress.IPv6Address(text)
        assert state_mod._address_text(a6) == str(a6)
    for _ in range(500):
        a6 = ipaddress.IPv6Address(rng.getrandbits(128))
        assert state_mod._address_text(a6) == str(a6)


def test_a_prepared_transfer_no_sequence_number_reuse_across_a_source_restart() -> None:
    """A prepared transfer (docs/cxtp.md, "Prepared transfers"): sg1 sends below its cap
    while prepared, then dies before the commit, with its "leaving" row durable. Restarted,
    it asks: sg2 holds the transfer pending, prepared and never committed, so it answers
    "not taken" (not the COMMIT an unprepared pending transfer's query stands for) and
    discards it; the late COMMIT of sg1's dead connection then activates nothing. sg1
    resumes once "owned" again is durable: no (SPI, sequence number) pair twice."""
    from ipsecct.ct import cxtp
    from ipsecct.ct.transfer import DECISION_COMMIT, Prepared, Settings, decision_cdb
    from ipsecct.ipsec.engine import TunnelState
    from tests.helpers.transfer import World

    w = World(settings={g: Settings(make_before_break=True, mbb_margin=100)
                        for g in ("sg1", "sg2")})  # fmt: skip
    j1, j2 = Recorder(w), Recorder(w)
    w.gw["sg1"].core.journal = j1
    w.gw["sg2"].core.journal = j2
    g1 = w.gw["sg1"]
    tid, outs = g1.core.start([w.tunnel], "sg2", w.now, prepare=True)
    g1.run(outs)
    w.deliver("sg1", "sg2")  # PCTD: pending submitted
    w.deliver("sg1", "sg2")  # PREPARE
    settle(w, "sg2", j2)
    w.deliver("sg2", "sg1")  # CTDR
    w.deliver("sg2", "sg1")  # PREPARE answer
    assert j1.settle() == ["leaving"]
    assert any(isinstance(o, Prepared) for o in g1.core.settled(w.now))
    for i in range(5):
        w.host_send("sg1", i)  # below the cap, while prepared
    assert len(g1.wire) == 5
    g1.run(g1.core.commit(tid, w.now))  # its COMMIT leaves ... and sg1 dies
    late = [w.drop("sg1", "sg2") for _ in range(w.pending("sg1", "sg2"))]
    # Restarted with its "leaving" row: held at its stored ceiling, it asks.
    j1.writes = []
    g1 = restarted_source(w, j1, tid)
    w.deliver("sg1", "sg2")
    a = w.deliver("sg2", "sg1")
    assert isinstance(a, cxtp.DQ) and a.answer == cxtp.Answer.NOT_TAKEN
    assert w.gw["sg2"].engine.tunnels() == []
    for m in late:  # the dead connection's FINAL and COMMIT, late: nothing activates
        w.gw["sg2"].run(w.gw["sg2"].core.receive("sg1", m, w.now))
    w.gw["sg2"].run(w.gw["sg2"].core.receive("sg1", cxtp.CTD(w.mn_out.src, 0, (
        cxtp.TransferTag(tid, 99).encode(), decision_cdb(DECISION_COMMIT))), w.now))  # fmt: skip
    assert w.gw["sg2"].engine.tunnels() == []
    assert "resumed" in settle(w, "sg1", j1)
    assert w.tunnel.state is TunnelState.ACTIVE
    for i in range(5, 10):
        w.host_send("sg1", i)
        w.host_send("sg2", i)
    assert len(g1.wire) == 10 and w.gw["sg2"].wire == []
    wire = [(s, q) for _, s, q in w.all_wire()]
    assert len(wire) == len(set(wire))


def test_sa_delete_of_a_tunnel_whose_commit_came_leaves_it_out_of_the_activation() -> None:
    """``sa delete`` at the target after the COMMIT came, while the activation waits for the
    "pending" row: the tunnel is ours (the source gave it away), so it is deleted, not sent
    back, and the activation that follows leaves it out (it activated the removed tunnel)."""
    from ipsecct.ipsec.engine import TunnelState

    w, j2 = commit_before_pending()
    sg2 = w.gw["sg2"]
    (t2,) = sg2.engine.tunnels()
    taken = sg2.core.withdraw(t2, w.now, "sa delete")
    assert taken is not None and taken[1] == [] and "committed here" in taken[0]
    sg2.engine.remove_tunnel(t2)  # what sa delete does next
    assert w.pending("sg2", "sg1") == 0  # no CTC: the source gave it away
    settle(w, "sg2", j2)
    assert sg2.engine.tunnels() == [] and t2.state is not TunnelState.ACTIVE
    assert sg2.finished[-1].outcome == "committed"
    w.host_send("sg2", 1)
    assert sg2.wire == []


def test_a_state_moved_aside_twice_in_one_second_keeps_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_move_aside names its directory by the second: a second (third) move within the same
    second goes into a new old-TIME-N directory, never over the database moved before."""
    from datetime import UTC, datetime

    class Frozen:
        @staticmethod
        def now(tz: Any) -> datetime:
            return datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    monkeypatch.setattr(state_mod, "datetime", Frozen)
    moved = []
    for text in ("one", "two", "three"):
        (tmp_path / state_mod.DB_NAME).write_text(text)
        (tmp_path / (state_mod.DB_NAME + "-wal")).write_text(text + "-wal")
        moved.append(state_mod._move_aside(tmp_path))
    assert [p.name for p in moved] == ["old-20260102T030405", "old-20260102T030405-2",
                                       "old-20260102T030405-3"]  # fmt: skip
    for p, text in zip(moved, ("one", "two", "three"), strict=True):
        assert (p / state_mod.DB_NAME).read_text() == text
        assert (p / (state_mod.DB_NAME + "-wal")).read_text() == text + "-wal"
    assert not (tmp_path / state_mod.DB_NAME).exists()
    monkeypatch.setattr(state_mod, "MOVE_ASIDE_MAX", 3)  # bounded: an error, not a loop
    (tmp_path / state_mod.DB_NAME).write_text("four")
    with pytest.raises(FileExistsError):
        state_mod._move_aside(tmp_path)
    assert (tmp_path / state_mod.DB_NAME).read_text() == "four"


def test_the_ownership_writer_runs_jobs_in_order_survives_a_failing_one_and_drains_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The writer's thread (jobs posted with no Future, the journal's wake-ups): one thread,
    the jobs in the order posted, a job that raises logged in one line without stopping the
    next, ``submit`` (for run_in_executor) settles its Future, and ``shutdown`` returns once
    the jobs queued before it have run (a clean stop leaves nothing unwritten)."""
    import logging
    import threading

    caplog.set_level(logging.ERROR, logger="ipsecct.gateway.state")
    w = state_mod._WriterThread("ipsecct-state-test")
    ran: list[tuple[int, str]] = []
    gate = threading.Event()

    def job(i: int) -> None:
        gate.wait(10)  # jobs pile up behind the first
        ran.append((i, threading.current_thread().name))

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    w.post(job, 0)
    w.post(broken)
    for i in range(1, 50):
        w.post(job, i)
    fut = w.submit(lambda a, b: a + b, 2, b=3)
    gate.set()
    assert fut.result(10) == 5
    w.post(job, 50)
    w.shutdown(wait=True)
    assert [i for i, _ in ran] == list(range(51))
    assert {name for _, name in ran} == {"ipsecct-state-test"}
    assert "event=state-writer-job-failed" in caplog.text and "disk I/O error" in caplog.text
    with pytest.raises(RuntimeError):
        w.post(job, 51)

"""Virtual IP leases across a gateway's restart: an address an IKE SA took to another gateway
is never leased again at the old one (even after it restarted), and a returning identity
gets its old address back (the leases live in the gateway's SQLite state, docs/ikev2.md
"Virtual IPs")."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_h

from ipsecct import cli
from ipsecct.errors import StateError
from ipsecct.gateway import state
from ipsecct.gateway.config import NodeConfig, from_dict
from ipsecct.gateway.node import Node
from ipsecct.gateway.service import Service
from ipsecct.ikev2 import context
from ipsecct.ikev2 import pool as pool_mod
from ipsecct.ikev2.engine import ChildUp, IkeEngine
from tests.helpers.control_server import short_path
from tests.helpers.ikev2_engines import PSK, Wire, connect, mn_conn

ip = ipaddress.ip_address


def config(tmp: Path, control: str | None = None) -> NodeConfig:
    """sg1: its durable state in ``tmp/state``, a connection leasing from pool rw
    (10.3.0.0/24)."""
    (tmp / "k.psk").write_bytes(PSK)
    (tmp / "k.psk").chmod(0o600)
    d: dict[str, Any] = {
        "name": "sg1",
        "outer": {"address": "127.0.0.1", "port": 45000},
        "inner": {"kind": "udp", "listen": "127.0.0.1:45001", "peer": "127.0.0.1:45002"},
        "state": {"dir": str(tmp / "state")},
        "pools": {"rw": {"addrs": "10.3.0.0/24"}},
        "connections": {"c": {"pools": ["rw"], "remote": {"id": "%any"},
                              "local": {"id": "gw.test"},
                              "proposals": ["aes128gcm16-prfsha256-x25519"],
                              "children": {"net": {"local_ts": ["10.1.0.0/16"],
                                                   "remote_ts": ["10.3.0.0/16"],
                                                   "esp_proposals": ["aes128gcm16"]}}}},
        "secrets": {"ike-c": {"id": "gw.test", "file": "k.psk"}},
    }  # fmt: skip
    if control is not None:
        d["control"] = {"socket": control}
    return from_dict(d, str(tmp / "sg1.toml"))


def gateway(tmp: Path, control: str | None = None) -> Service:
    """sg1 as ``ipsecct gateway run`` builds it; a new Service is a restarted process."""
    return Service(config(tmp, control))


def client(svc: Service, who: str, now: float = 0.0) -> Wire:
    """A client ``who`` connects to the gateway's IKE engine, asking for an address."""
    assert svc.ike is not None
    ic = dataclasses.replace(mn_conn(local_ts="0.0.0.0/0", local_id=who), vips=[ip("0.0.0.0")])
    w = Wire(IkeEngine([ic]), svc.ike.engine)
    connect(w, now)
    return w


def vip(w: Wire) -> object:
    (ike,) = w.ini.ike_sas()
    ((_, a),) = ike.vips
    return a


def crash(svc: Service) -> None:
    """The process dies: nothing more is written, the state directory is let go."""
    svc.state.store.close()
    os.close(svc.state.lock_fd)


def commands(svc: Service, sock: str, *argvs: list[str]) -> list[int]:
    """Run ``ipsecct`` command lines (off the loop, as a shell would) against ``svc``'s
    control socket ``sock``, started for them; their exit statuses. The socket's folder
    (short_path) goes after."""

    async def main() -> list[int]:
        assert svc.control is not None
        await svc.control.start()
        try:
            return [await asyncio.to_thread(cli.main, argv) for argv in argvs]
        finally:
            await svc.control.stop()

    try:
        return asyncio.run(main())
    finally:
        os.rmdir(os.path.dirname(sock))


def test_an_address_whose_ike_sa_moved_away_is_not_leased_after_a_restart(tmp_path: Path) -> None:
    """The bug: the leases lived in memory, so a gateway that had handed a client's IKE SA
    (with its virtual IP, context item 32) to another gateway forgot after a restart that
    the address was away, and leased it to the next new client: two clients, one address."""
    sg1 = gateway(tmp_path)
    a = client(sg1, "a.test")
    assert vip(a) == ip("10.3.0.1")
    assert sg1.ike is not None
    (ike,) = sg1.ike.engine.ike_sas()
    sg1.ike.engine.export_ike(ike, 1.0)  # handed over: it lives on at sg2
    assert set(sg1.ike.engine.pools["rw"].away) == {ip("10.3.0.1")}
    asyncio.run(sg1.state.stop())  # a clean stop, then a start
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    assert set(sg1.ike.engine.pools["rw"].away) == {ip("10.3.0.1")}
    assert vip(client(sg1, "b.test")) == ip("10.3.0.2")
    crash(sg1)  # ... and the same after a crash
    sg1 = gateway(tmp_path)
    assert vip(client(sg1, "c.test")) == ip("10.3.0.3")
    asyncio.run(sg1.state.stop())


@pytest.mark.parametrize("how", ["newer schema", "fresh state"])
def test_a_state_made_in_place_of_another_keeps_its_leases(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A gateway with no AEAD tunnel moves a state.db it cannot read aside and starts on a
    new one (a newer ipsecct's schema: a downgrade), or the operator starts it with
    --fresh-state: the leases were lost with the old database, and the address whose IKE SA
    lives on at another gateway was leased to the next client. They are carried over from
    the old database as far as it reads."""
    import sqlite3

    sg1 = gateway(tmp_path)
    a = client(sg1, "a.test")
    client(sg1, "b.test")
    assert sg1.ike is not None
    ike_a, ike_b = sg1.ike.engine.ike_sas()
    sg1.ike.engine.export_ike(ike_a, 1.0)  # handed over: it lives on at sg2
    sg1.ike.engine._kill(ike_b, "test", [])  # ended: offline for b.test
    asyncio.run(sg1.state.stop())
    if how == "newer schema":
        c = sqlite3.connect(tmp_path / "state" / "state.db")
        c.execute(f"PRAGMA user_version = {state.SCHEMA + 1}")
        c.commit()
        c.close()
        with caplog.at_level("WARNING"):
            sg1 = gateway(tmp_path)
        assert "event=state-replaced" in caplog.text and sg1.state.store.created
    else:
        cfg = config(tmp_path)
        st = state.open_for(Node(cfg), cfg, fresh=True)
        assert st.store.created
        asyncio.run(st.stop())
        sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    pool = sg1.ike.engine.pools["rw"]
    assert pool.away == {ip("10.3.0.1"): "a.test"}
    assert pool.offline == {ip("10.3.0.2"): "b.test"}
    assert vip(client(sg1, "c.test")) == ip("10.3.0.3")
    asyncio.run(sg1.state.stop())
    del a


class _Killed(BaseException):
    """A kill -9 at a chosen point of the start (nothing after it runs)."""


@pytest.mark.parametrize("where", ["after the new database", "after the move aside"])
def test_a_start_killed_while_it_replaces_the_state_loses_no_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A gateway replacing a database it cannot read (a newer schema) is killed during
    that start, and started again. Killed once the new database was committed: its leases
    came in a second transaction, so the next start found a good database without them and
    leased the away address to the next client, without a word. Killed after the old
    database went aside, before the new one's first transaction, and started again within
    the same second (a service manager restarting it at once): the second start moved the
    half-made database into the same ``old-STAMP`` directory, over the old database (its
    leases, arrivals and fingerprints gone), and carried nothing. Now the leases are in the
    transaction that makes the new database, every database moved aside gets a directory of
    its own, and when the one just moved aside holds no lease table the newest one moved
    aside before that does is read."""
    import sqlite3

    sg1 = gateway(tmp_path)
    client(sg1, "a.test")
    assert sg1.ike is not None
    (ike_a,) = sg1.ike.engine.ike_sas()
    sg1.ike.engine.export_ike(ike_a, 1.0)  # handed over: it lives on at sg2
    asyncio.run(sg1.state.stop())
    c = sqlite3.connect(tmp_path / "state" / "state.db")
    c.execute(f"PRAGMA user_version = {state.SCHEMA + 1}")
    c.commit()
    c.close()
    create = state.StateStore.create

    def killed(*args: Any, **kwargs: Any) -> state.StateStore:
        if where == "after the new database":
            create(*args, **kwargs).conn.close()
        else:  # killed before its first transaction committed: a database of no table
            Path(args[0]).write_bytes(b"")
        raise _Killed

    from datetime import UTC, datetime

    frozen = datetime.now(UTC)

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return frozen  # (every start within one second)

    monkeypatch.setattr(state, "datetime", Clock)
    with monkeypatch.context() as m:
        m.setattr(state.StateStore, "create", classmethod(lambda cls, *a, **k: killed(*a, **k)))
        with pytest.raises(_Killed):
            gateway(tmp_path)
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    assert sg1.ike.engine.pools["rw"].away == {ip("10.3.0.1"): "a.test"}
    assert vip(client(sg1, "b.test")) == ip("10.3.0.2")
    asyncio.run(sg1.state.stop())
    if where == "after the move aside":  # the old database is kept, whole
        olds = sorted((tmp_path / "state").glob("old-*/state.db"))
        assert len(olds) == 2
        versions = []
        for o in olds:
            r = sqlite3.connect(f"file:{o}?mode=ro", uri=True)
            versions.append(r.execute("PRAGMA user_version").fetchone()[0])
            r.close()
        assert state.SCHEMA + 1 in versions


def test_a_returning_client_gets_its_old_address_after_a_restart(tmp_path: Path) -> None:
    """strongSwan's persistent pools: an identity's lease is remembered across a restart,
    and a standalone gateway (no [transfer], [failover], [cluster]: its IKE SAs cannot live
    on elsewhere) that crashed has every lease of its last run offline, for its identity."""
    sg1 = gateway(tmp_path)
    a, b = client(sg1, "a.test"), client(sg1, "b.test")
    assert (vip(a), vip(b)) == (ip("10.3.0.1"), ip("10.3.0.2"))
    (ike_a,) = a.ini.ike_sas()
    a.deliver(a.ini.delete(ike_a, 1.0), "i", 1.0)  # a.test leaves: offline, its address kept
    crash(sg1)  # b.test's IKE SA dies with the process
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    pool = sg1.ike.engine.pools["rw"]
    assert pool.leases() == [(ip("10.3.0.1"), "offline", "a.test"),
                             (ip("10.3.0.2"), "offline", "b.test")]  # fmt: skip
    assert sg1.state.status()["leases"]["restored"]["offline"] == 2
    assert vip(client(sg1, "c.test")) == ip("10.3.0.3")  # a new identity: never leased
    assert vip(client(sg1, "b.test")) == ip("10.3.0.2")  # the returning ones: their own
    assert vip(client(sg1, "a.test")) == ip("10.3.0.1")
    asyncio.run(sg1.state.stop())


def test_leases_online_at_a_crash_of_a_gateway_that_moves_ike_sas_stay_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that hands IKE SAs over or replicates them cannot tell after a crash whether
    an IKE SA it held lives on at another gateway (taken over by its standby, or handed over
    just before the crash, its "away" not yet written): its address stays away (the
    operator is told), until the IKE SA comes back to this gateway with it."""
    sg1 = gateway(tmp_path)
    a = client(sg1, "a.test")
    assert sg1.ike is not None
    (ike,) = sg1.ike.engine.ike_sas()
    cdbs = context.encode(ike, 1.0)  # a replica of it, as its standby holds
    crash(sg1)
    cfg = config(tmp_path)
    st = state.open_for(Node(cfg), cfg)
    with caplog.at_level("WARNING"):
        counts = st.attach_pools(cfg.pools, elsewhere=True)
    assert counts["away"] == 1 and counts["was_online"] == 1
    assert "event=ike-vip-leases-away" in caplog.text
    pool = cfg.pools["rw"]
    assert pool.away == {ip("10.3.0.1"): "a.test"}
    assert pool.acquire("a.test") == ip("10.3.0.2")  # not even for its own identity
    pool.release(ip("10.3.0.2"))
    asyncio.run(st.stop())
    sg1 = gateway(tmp_path)  # written away: a later start keeps it so
    assert sg1.ike is not None
    pool = sg1.ike.engine.pools["rw"]
    assert pool.away == {ip("10.3.0.1"): "a.test"}
    back = sg1.ike.engine.import_ike(cdbs, 2.0)  # the IKE SA comes back with it
    assert pool.online == {ip("10.3.0.1"): "a.test"} and not pool.away
    sg1.ike.engine._kill(back, "test", [])
    asyncio.run(sg1.state.stop())
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    assert sg1.ike.engine.pools["rw"].offline == {ip("10.3.0.1"): "a.test",
                                                  ip("10.3.0.2"): "a.test"}  # fmt: skip
    asyncio.run(sg1.state.stop())
    del a


def test_the_remembered_leases_are_bounded_and_a_changed_pool_forgets_what_left_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "MAX_REMEMBERED_LEASES", 2)
    sg1 = gateway(tmp_path)
    for who in ("a.test", "b.test", "c.test"):
        w = client(sg1, who)
        (ike,) = w.ini.ike_sas()
        w.deliver(w.ini.delete(ike, 1.0), "i", 1.0)
    asyncio.run(sg1.state.stop())
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    assert list(sg1.ike.engine.pools["rw"].offline.items()) == [
        (ip("10.3.0.2"), "b.test"), (ip("10.3.0.3"), "c.test")]  # the newest two
    asyncio.run(sg1.state.stop())
    assert len(state.StateStore.open_existing(tmp_path / "state" / "state.db", "sg1").leases()) == 2


def test_a_lease_kept_in_a_names_case_by_an_older_version_is_that_identitys_after_a_restart(
    tmp_path: Path,
) -> None:
    """An older version kept a name's case (Alice.Test's lease was hers only as Alice.Test);
    names are one identity in any case now: after a restart her lease is alice.test's, in
    the pool and in the store, and she gets it back however she writes her name."""
    sg1 = gateway(tmp_path)
    w = client(sg1, "alice.test")
    addr = vip(w)
    (ike,) = w.ini.ike_sas()
    w.deliver(w.ini.delete(ike, 1.0), "i", 1.0)
    asyncio.run(sg1.state.stop())
    store = state.StateStore.open_existing(tmp_path / "state" / "state.db", "sg1")
    ((name, text, st, who, changed),) = store.leases()
    assert (st, who) == ("offline", "alice.test")
    store.put_leases([(name, text, st, "Alice.Test", changed)])
    store.close()
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    assert list(sg1.ike.engine.pools["rw"].offline.items()) == [(addr, "alice.test")]
    assert vip(client(sg1, "ALICE.test")) == addr
    asyncio.run(sg1.state.stop())
    leases = state.StateStore.open_existing(tmp_path / "state" / "state.db", "sg1").leases()
    assert [r[3] for r in leases] == ["alice.test"]


def test_ipsecct_pools_lists_each_lease_through_the_control_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ipsecct pools --leases`` (as ``swanctl --list-pools --leases``): each pool's counts,
    then each lease with its state and identity (quoted; an identity with control
    characters is its octets in hex, as the IKE SA's, a name's letters in lower case)."""
    sock = short_path()
    sg1 = gateway(tmp_path, sock)
    assert sg1.ike is not None and sg1.control is not None
    client(sg1, "a.test")
    b = client(sg1, "b\x1b[2J.test")
    (ike_b,) = b.ini.ike_sas()
    b.deliver(b.ini.delete(ike_b, 1.0), "i", 1.0)
    client(sg1, "c.test")
    sg1.ike.engine.export_ike(sg1.ike.engine.ike_sas()[-1], 2.0)

    assert commands(sg1, sock, ["pools", "-s", sock], ["pools", "--leases", "-s", sock],
                    ["pools", "--leases", "--json", "-s", sock]) == [0, 0, 0]  # fmt: skip
    out = capsys.readouterr().out
    head = "rw (10.3.0.1-10.3.0.254): 1 online, 1 offline, 1 away\n"
    assert out.startswith(head + head + "  10.3.0.1  online   \"a.test\"\n"
                          "  10.3.0.2  offline  \"0x621b5b326a2e74657374\"\n"  # (J: j)
                          "  10.3.0.3  away     \"c.test\"\n")  # fmt: skip
    (p,) = json.loads(out[out.index("["):])
    assert p["leases"][2] == {"address": "10.3.0.3", "state": "away", "identity": "c.test"}
    assert p["leases_left_off"] == 0
    assert p["leases_total"] == 3 and p["truncated"] is False
    asyncio.run(sg1.state.stop())


def test_ipsecct_pools_leases_answer_is_bounded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ipsecct pools --leases`` listed up to 65,536 leases per pool, identities up to
    64 KiB each, all built on the loop (gigabytes; the client gives up past 64 MiB): at most
    ``--limit`` leases (default 1000, all pools together) and POOL_LEASES_TEXT identity
    characters, lowest addresses first; per pool the total, how many were left off and
    ``truncated``. A limit out of 1-65536 is refused (CLI: status 2; control: an error)."""
    from ipsecct.errors import ControlError
    from ipsecct.gateway import ike as ike_mod
    from ipsecct.gateway.control import request

    sock = short_path()
    sg1 = gateway(tmp_path, sock)
    assert sg1.ike is not None and sg1.control is not None
    pool = sg1.ike.engine.pools["rw"]
    for i in range(1, 201):  # (a restored table: no listener told)
        assert pool.restore(ip(f"10.3.0.{i}"), "away" if i % 2 else "offline", f"id{i:03}.test")
    svc = sg1.ike
    (p,) = svc.pools(True)
    assert len(p["leases"]) == 200 and p["leases_total"] == 200  # type: ignore[arg-type]
    assert p["truncated"] is False and p["leases_left_off"] == 0
    (p,) = svc.pools(True, 5)
    assert [r["address"] for r in p["leases"]] == [  # type: ignore[attr-defined]
        f"10.3.0.{i}" for i in range(1, 6)]  # fmt: skip
    assert (p["leases_total"], p["leases_left_off"], p["truncated"]) == (200, 195, True)
    monkeypatch.setattr(ike_mod, "POOL_LEASES_TEXT", 10 * 10 + 3)  # ten identities and a bit
    (p,) = svc.pools(True, 100)
    assert len(p["leases"]) == 10 and p["leases_left_off"] == 190  # type: ignore[arg-type]
    monkeypatch.setattr(ike_mod, "POOL_LEASES_TEXT", 4 << 20)
    monkeypatch.setattr(ike_mod, "POOL_LEASES_LISTED", 7)  # the default, when not asked
    assert commands(sg1, sock, ["pools", "--leases", "-s", sock],
                    ["pools", "--leases", "--limit", "3", "--json", "-s", sock]) == [0, 0]
    for bad in ("0", "65537", "x"):  # (argparse: one line, status 2)
        with pytest.raises(SystemExit) as exit_:
            cli.main(["pools", "--leases", "--limit", bad, "-s", sock])
        assert exit_.value.code == 2
    os.mkdir(os.path.dirname(sock), 0o700)  # (commands removed it)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "rw (10.3.0.1-10.3.0.254): 0 online, 100 offline, 100 away"
    assert lines[1:9] == [f"  10.3.0.{i}  {'away   ' if i % 2 else 'offline'}  \"id{i:03}.test\""
                          for i in range(1, 8)] + ["  ... and 193 more not listed (--limit)"]
    (p,) = json.loads(out[out.index("["):])
    assert [r["address"] for r in p["leases"]] == ["10.3.0.1", "10.3.0.2", "10.3.0.3"]
    assert (p["leases_total"], p["leases_left_off"], p["truncated"]) == (200, 197, True)

    async def ask(limit: object) -> str:
        await sg1.control.start()  # type: ignore[union-attr]
        try:
            await asyncio.to_thread(request, sock, "pools.list",
                                    {"leases": True, "limit": limit})  # fmt: skip
        except ControlError as exc:
            return str(exc)
        finally:
            await sg1.control.stop()  # type: ignore[union-attr]
        return "answered"

    for wrong in (0, 65537, True, "5", 1.5):
        assert "limit must be a whole number from 1 to 65536" in asyncio.run(ask(wrong))
    assert asyncio.run(ask(65536)) == "answered"
    os.rmdir(os.path.dirname(sock))
    asyncio.run(sg1.state.stop())


def test_a_clean_stop_ends_the_leases_of_the_ike_sas_it_deletes(tmp_path: Path) -> None:
    """A stop deletes the IKE SAs (no standby continues them): their leases are offline
    in the durable state, for their identities, not online (which a gateway that moves IKE
    SAs would keep away after its restart)."""
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    client(sg1, "a.test")
    asyncio.run(sg1.ike.stop())
    asyncio.run(sg1.state.stop())
    cfg = config(tmp_path)
    st = state.open_for(Node(cfg), cfg)
    assert st.store.leases()[0][:4] == ("rw", "10.3.0.1", "offline", "a.test")
    assert st.attach_pools(cfg.pools, elsewhere=True)["away"] == 0
    assert cfg.pools["rw"].offline == {ip("10.3.0.1"): "a.test"}
    asyncio.run(st.stop())


def test_a_running_gateway_writes_its_lease_changes_on_the_state_writer(tmp_path: Path) -> None:
    """While the gateway runs, a lease change is written after the callback that made it, on
    the durable state's writer thread (the IKE exchange does not wait for the disk), and
    a crash after that finds it at the restart."""
    sg1 = gateway(tmp_path)

    async def main() -> None:
        await sg1.state.start()
        client(sg1, "a.test")
        assert sg1.state.store.leases() == []  # not yet: after this callback
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not sg1.state.store.leases():
            assert loop.time() < deadline, "the lease was not written"
            await asyncio.sleep(0.005)
        assert sg1.state.status()["leases"]["lease_writes"] == 1
        assert sg1.state._writer is not None
        sg1.state._writer.shutdown(wait=True)

    asyncio.run(main())
    crash(sg1)
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    assert sg1.ike.engine.pools["rw"].offline == {ip("10.3.0.1"): "a.test"}
    asyncio.run(sg1.state.stop())


def installed(svc: Service, *wires: Wire) -> list[Any]:
    """The tunnels of the clients' CHILD SAs, installed as the gateway's IKE service does."""
    assert svc.ike is not None
    svc.ike._act([o for w in wires for o in w.events["r"] if isinstance(o, ChildUp)])
    return [c.handle for ike in svc.ike.engine.ike_sas() for c in ike.children]


def test_a_lease_being_handed_over_is_durable_before_the_commit_and_away_after_a_crash(
    tmp_path: Path,
) -> None:
    """A gateway without fail-over hands IKE SAs over only by transfers: the leases of a
    transfer's IKE SAs are written "leaving" before its "leaving" rows, which the COMMIT
    waits for, so after a crash a lease online then is offline (its IKE SA died here) and
    only a leaving one is away (its IKE SA may live on at the target); a transfer that did
    not commit makes its leases online again."""
    sg1 = gateway(tmp_path)
    a, b, c = client(sg1, "a.test"), client(sg1, "b.test"), client(sg1, "c.test")
    ta, _, tc = installed(sg1, a, b, c)
    assert sg1.ike is not None

    async def main() -> None:
        await sg1.state.start()
        kick = sg1.state._lease_kick
        sg1.state._lease_kick = (  # type: ignore[method-assign]
            lambda: setattr(sg1.state, "_lease_kick_due", False))
        wa = sg1.state.leaving([ta], "sg2", 7)
        wc = sg1.state.leaving([tc], "sg2", 8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not (wa.done and wc.done):
            assert loop.time() < deadline and not wa.failed and not wc.failed
            await asyncio.sleep(0.005)
        # durable once the "leaving" rows are, even without a write of their own
        rows = {r[1]: r[2] for r in sg1.state.store.leases()}
        assert rows == {"10.3.0.1": "leaving", "10.3.0.2": "online", "10.3.0.3": "leaving"}
        sg1.state._lease_kick = kick  # type: ignore[method-assign]
        assert sg1.ike is not None  # c's transfer fails: its lease is online again
        sg1.ike.on_transfer(SimpleNamespace(role="source", outcome="failed", peer="sg2",
                                            spis=[tc.inbound.spi, tc.outbound.spi]))  # fmt: skip
        while {r[1]: r[2] for r in sg1.state.store.leases()}.get("10.3.0.3") != "online":
            assert loop.time() < deadline
            await asyncio.sleep(0.005)
        assert sg1.state._writer is not None
        sg1.state._writer.shutdown(wait=True)

    asyncio.run(main())
    crash(sg1)
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    pool = sg1.ike.engine.pools["rw"]
    assert pool.away == {ip("10.3.0.1"): "a.test"}
    assert pool.offline == {ip("10.3.0.2"): "b.test", ip("10.3.0.3"): "c.test"}
    assert sg1.state.status()["leases"]["restored"]["was_leaving"] == 1
    asyncio.run(sg1.state.stop())


def test_the_operator_gives_an_away_address_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ipsecct pools --release ADDR``: an away address (kept across restarts now) is
    offline again, on the operator's word that its IKE SA ended at the other gateway; an
    online one (an IKE SA here holds it) or anything else is refused with one line."""
    sock = short_path()
    sg1 = gateway(tmp_path, sock)
    assert sg1.ike is not None and sg1.control is not None
    client(sg1, "a.test")
    client(sg1, "b.test")
    sg1.ike.engine.export_ike(sg1.ike.engine.ike_sas()[-1], 2.0)

    assert commands(sg1, sock, *(["pools", "--release", a, "-s", sock] for a in (
        "10.3.0.1", "10.9.0.1", "nope", "10.3.0.2", "10.3.0.2"))) == [2, 2, 2, 0, 2]  # fmt: skip
    out, err = capsys.readouterr()
    assert out == '10.3.0.2 of pool rw is offline again (for "b.test")\n'
    assert err.splitlines() == [
        "ipsecct: error: virtual IP 10.3.0.1 of pool 'rw' is online, not away",
        "ipsecct: error: 10.9.0.1 is in no pool here",
        "ipsecct: error: bad address 'nope'",
        "ipsecct: error: virtual IP 10.3.0.2 of pool 'rw' is offline, not away",
    ]
    pool = sg1.ike.engine.pools["rw"]
    assert pool.offline == {ip("10.3.0.2"): "b.test"} and not pool.away
    assert ("rw", "10.3.0.2", "offline", "b.test") in [r[:4] for r in sg1.state.store.leases()]
    asyncio.run(sg1.state.stop())


def test_a_hand_edited_lease_table_is_read_as_far_as_it_can_be(tmp_path: Path) -> None:
    """The lease table edited by hand (SQLite keeps any type in any column, and a table made
    before ours keeps its own columns): a time that is no number, NULLs, an identity that is
    a blob, not UTF-8 or megabytes long, an address that is not UTF-8, two rows for one
    address (the away one is kept, whichever is newer) start the gateway (the start failed
    with ValueError, TypeError or sqlite3's decoding error); a table of other columns is one
    StateError that says what to do (it was sqlite3's own error)."""
    import sqlite3

    sg1 = gateway(tmp_path)
    client(sg1, "a.test")
    asyncio.run(sg1.state.stop())
    db = tmp_path / "state" / "state.db"
    c = sqlite3.connect(db)
    c.executescript(
        "ALTER TABLE lease RENAME TO old;"
        " CREATE TABLE lease (pool, addr, state, identity, changed);"
        " INSERT INTO lease SELECT * FROM old; DROP TABLE old;"
        " INSERT INTO lease VALUES ('rw', '10.3.0.7', 'offline', 'b.test', 'abc');"
        " INSERT INTO lease VALUES ('rw', '10.3.0.8', 'offline', x'ff00', NULL);"
        " INSERT INTO lease VALUES ('rw', '10.3.0.9', 'offline', hex(zeroblob(1000000)), 3);"
        " INSERT INTO lease VALUES ('rw', '10.3.0.10', 'away', 'c.test', 1);"
        " INSERT INTO lease VALUES ('rw', '10.3.0.10', 'offline', 'd.test', 2);"
        " INSERT INTO lease VALUES ('rw', x'0a03000b', 'away', 'e.test', 1);"
        " INSERT INTO lease VALUES ('rw', '10.3.0.12', 'offline', CAST(x'61ff62' AS TEXT), 1);"
        " INSERT INTO lease VALUES ('rw', CAST(x'31302eff' AS TEXT), 'away', 'f.test', 1);"
        " INSERT INTO lease VALUES (NULL, NULL, NULL, NULL, NULL);"
    )
    c.commit()
    c.close()
    sg1 = gateway(tmp_path)
    assert sg1.ike is not None
    pool = sg1.ike.engine.pools["rw"]
    assert pool.away == {ip("10.3.0.10"): "c.test"}
    assert pool.offline[ip("10.3.0.7")] == "b.test"
    assert pool.offline[ip("10.3.0.8")] == "\ufffd\x00"  # (a blob: its octets as UTF-8)
    assert pool.offline[ip("10.3.0.12")] == "a\ufffdb"  # not UTF-8: the read failed whole
    assert len(pool.offline[ip("10.3.0.9")]) == state.MAX_LEASE_IDENTITY
    assert pool.offline[ip("10.3.0.1")] == "a.test"
    asyncio.run(sg1.state.stop())
    c = sqlite3.connect(db)
    c.executescript("DROP TABLE lease; CREATE TABLE lease (pool, addr)")
    c.commit()
    c.close()
    with pytest.raises(StateError, match=r"lease table cannot be read.*DROP TABLE lease"):
        gateway(tmp_path)


def test_lease_addresses_are_read_as_ipaddress_writes_them(tmp_path: Path) -> None:
    """A hand-written ``FD00:0::5`` is the lease of fd00::5 (it was never matched with the
    gateway's own rows: released, the address came back away at the next start), rewritten
    once as fd00::5 (merged with a row of that address: away wins); a text that is not an
    address is damage: left out and deleted."""
    import sqlite3

    def pools() -> dict[str, pool_mod.Pool]:
        return {"v6": pool_mod.Pool("v6", ip("fd00::1"), ip("fd00::ff"))}

    cfg = config(tmp_path)
    st = state.open_for(Node(cfg), cfg)
    st.store.conn.executemany("INSERT INTO lease VALUES (?, ?, ?, ?, ?)", [
        ("v6", "FD00:0::5", "away", "a.test", 1.0), ("v6", "fd00::7", "away", "d.test", 1.0),
        ("v6", "fd00::0:6", "offline", "c.test", 1.0), ("v6", "fd00::5", "offline", "a.test", 2.0),
        ("v6", "FD00::7", "offline", "e.test", 3.0), ("v6", "no address", "away", "b.test", 1.0),
    ])  # fmt: skip
    st.store.conn.commit()
    p = pools()
    st.attach_pools(p, elsewhere=False)
    assert p["v6"].away == {ip("fd00::5"): "a.test", ip("fd00::7"): "d.test"}
    assert dict(p["v6"].offline) == {ip("fd00::6"): "c.test"}
    raw = sqlite3.connect(st.store.path).execute("SELECT addr, state FROM lease").fetchall()
    assert sorted(raw) == [("fd00::5", "away"), ("fd00::6", "offline"), ("fd00::7", "away")]
    assert p["v6"].give_back(ip("fd00::5")) is None  # the operator: its IKE SA has ended
    asyncio.run(st.stop())
    st = state.open_for(Node(cfg), cfg)
    p = pools()
    st.attach_pools(p, elsewhere=False)
    assert p["v6"].away == {ip("fd00::7"): "d.test"}  # fd00::5 stays released
    assert p["v6"].offline[ip("fd00::5")] == "a.test"
    asyncio.run(st.stop())


def test_identities_with_unicode_controls_are_shown_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An identity (a certificate's subject is any Unicode, a hand-edited lease any text)
    with C1 controls, a line separator or a bidi override: ``pools --leases``, ``pools
    --release`` and the log show them escaped (U+0085 and U+2028 made two lines for
    str.splitlines, U+009B a terminal's control sequence, U+202E turned the name around)."""
    import sqlite3

    from ipsecct.gateway.log import OneLineFormatter

    sock = short_path()
    sg1 = gateway(tmp_path, sock)
    asyncio.run(sg1.state.stop())
    evil = "a\x85b\u2028c\x9b2J\u202etset.d"
    c = sqlite3.connect(tmp_path / "state" / "state.db")
    c.execute("INSERT INTO lease VALUES ('rw', '10.3.0.5', 'away', ?, 1)", (evil,))
    c.commit()
    c.close()
    sg1 = gateway(tmp_path, sock)
    assert sg1.ike is not None and sg1.control is not None

    with caplog.at_level("WARNING"):
        assert commands(sg1, sock, ["pools", "--leases", "-s", sock],
                        ["pools", "--release", "10.3.0.5", "-s", sock]) == [0, 0]  # fmt: skip
    out = capsys.readouterr().out
    shown = '"a\\u0085b\\u2028c\\u009b2J\\u202etset.d"'
    assert out.splitlines() == [
        "rw (10.3.0.1-10.3.0.254): 0 online, 0 offline, 1 away",
        f"  10.3.0.5  away     {shown}",
        f"10.3.0.5 of pool rw is offline again (for {shown})",
    ]
    (rec,) = [r for r in caplog.records if "ike-vip-given-back" in r.getMessage()]
    line = OneLineFormatter("%(message)s").format(rec)
    assert len(line.splitlines()) == 1 and "\\u202e" in line and "\x9b" not in line
    asyncio.run(sg1.state.stop())


def test_an_away_address_of_a_renamed_pool_stays_away(tmp_path: Path) -> None:
    """The pool renamed in the configuration (same addresses): its away leases were
    forgotten with the old name, and the next new client got an address whose IKE SA lives
    on at another gateway. Away under the new name now (counted ``moved``); an offline one
    is forgotten still (nobody holds it)."""
    from collections import OrderedDict

    sg1 = gateway(tmp_path)
    for who in ("a.test", "b.test"):
        client(sg1, who)
    assert sg1.ike is not None
    a, b = sg1.ike.engine.ike_sas()
    sg1.ike.engine.export_ike(a, 2.0)  # a.test's IKE SA went to another gateway: away
    sg1.ike.engine._kill(b, "test", [])  # b.test's ended: offline
    asyncio.run(sg1.state.stop())
    cfg = config(tmp_path)
    old = cfg.pools.pop("rw")
    new = dataclasses.replace(old, name="net", online={}, offline=OrderedDict(), away={})
    cfg.pools["net"] = new
    st = state.open_for(Node(cfg), cfg)
    counts = st.attach_pools(cfg.pools, elsewhere=False)
    assert counts["moved"] == 1 and counts["forgotten"] == 1, counts
    assert new.away == {ip("10.3.0.1"): "a.test"} and not new.offline
    assert [r[:4] for r in st.store.leases()] == [("net", "10.3.0.1", "away", "a.test")]
    assert new.acquire("c.test") == ip("10.3.0.2")  # never 10.3.0.1
    asyncio.run(st.stop())


_CELL = st_h.one_of(st_h.none(), st_h.integers(-(1 << 63), (1 << 63) - 1),
                    st_h.floats(allow_nan=True), st_h.text(max_size=20),
                    st_h.binary(max_size=8))  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st_h.lists(st_h.tuples(
    st_h.sampled_from(["rw", "gone"]) | _CELL,
    st_h.sampled_from(["10.3.0.1", "10.3.0.2", "10.3.0.254", "10.3.0.255", "fd00::1",
                       "10.3.0.01", " 10.3.0.3"]) | _CELL,
    st_h.sampled_from([*pool_mod.LEASE_STATES, "leaving"]) | _CELL,
    st_h.sampled_from(["a.test", "b.test"]) | _CELL,
    _CELL), max_size=12), elsewhere=st_h.booleans())  # fmt: skip
def test_fuzz_the_lease_rows_reader(rows: list[tuple[Any, ...]], elsewhere: bool) -> None:
    """A lease table made by hand (no key, any type in any column, duplicate addresses)
    read back at a start, twice: never an exception, every lease in its pool's addrs, none
    online (no IKE SA lived through the restart), none both offline and away, and the
    second start gives the pools what the first one did (what it wrote is what it holds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = config(tmp)
        st = state.open_for(Node(cfg), cfg)
        st.store.conn.executescript(
            "DROP TABLE lease; CREATE TABLE lease (pool, addr, state, identity, changed)")
        st.store.conn.executemany("INSERT INTO lease VALUES (?, ?, ?, ?, ?)", rows)
        st.store.conn.commit()
        seen = []
        for _ in range(2):
            pools = cfg.pools
            st.attach_pools(pools, elsewhere=elsewhere)
            pool = pools["rw"]
            assert not pool.online and not set(pool.offline) & set(pool.away)
            assert all(pool.contains(a) for a, _, _ in pool.leases())
            assert all(isinstance(who, str) for _, _, who in pool.leases())
            seen.append((dict(pool.offline), dict(pool.away)))
            asyncio.run(st.stop())
            cfg = config(tmp)
            st = state.open_for(Node(cfg), cfg)
        asyncio.run(st.stop())
        assert seen[0] == seen[1]

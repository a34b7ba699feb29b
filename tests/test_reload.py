"""gateway/reload.py: what a configuration read again (SIGHUP) changes, compared with the one
that runs: connections added, removed, changed (by what they load, secrets and certificates
included); restart-only keys named, never applied. The processes: tests/test_sighup.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ipsecct.errors import ConfigError
from ipsecct.gateway import config as config_mod
from ipsecct.gateway import reload as reload_mod
from tests.helpers.config_files import GOOD, KEYS, write

CONN = """
[connections.{name}]
version = 2
local_addrs = ["127.0.0.2"]
remote_addrs = ["%any"]
proposals = ["aes128gcm16-prfsha256-x25519"]
local.auth = "psk"
local.id = "gw.example"
remote.auth = "psk"
remote.id = "{name}.example"
children.net.local_ts = ["10.2.0.0/24"]
children.net.remote_ts = ["10.1.0.0/16"]
children.net.esp_proposals = ["aes128gcm16"]
"""
SECRET = """
[secrets.ike-{name}]
id = ["gw.example", "{name}.example"]
file = "{name}.psk"
"""


def _config(tmp: Path, *names: str, text: str = GOOD, keys: str = KEYS) -> Path:
    for n in names:
        p = tmp / f"{n}.psk"
        if not p.exists():
            p.write_text("0x" + "ab" * 32)
            p.chmod(0o600)
    body = text + "".join(CONN.format(name=n) for n in names)
    return write(tmp, body + "".join(SECRET.format(name=n) for n in names), keys)


def _plan(old: config_mod.NodeConfig, path: Path) -> reload_mod.Plan:
    return reload_mod.plan(reload_mod.Prints.of(old), old.connections,
                           config_mod.load(path), set(old.pools))  # fmt: skip


def test_the_same_file_changes_nothing_and_keeps_the_running_connections(tmp_path: Path) -> None:
    old = config_mod.load(_config(tmp_path, "a", "b"))
    p = _plan(old, tmp_path / "cfg.toml")
    assert (p.added, p.removed, p.changed, p.needs_restart) == (set(), set(), set(), [])
    # the objects IKE SAs up hold (an unchanged connection is not replaced)
    assert [id(c) for c in p.connections] == [id(c) for c in old.connections]


def test_connections_added_removed_and_changed_by_their_secret(tmp_path: Path) -> None:
    old = config_mod.load(_config(tmp_path, "a", "b"))
    (tmp_path / "b.psk").write_text("0x" + "cd" * 32)  # b's key file: b changed, not a
    _config(tmp_path, "b", "c")
    p = _plan(old, tmp_path / "cfg.toml")
    assert (p.added, p.removed, p.changed, p.needs_restart) == ({"c"}, {"a"}, {"b"}, [])
    assert [c.name for c in p.connections] == ["b", "c"]
    assert p.connections[0] is not old.connections[1]


def test_another_connections_secret_changes_no_connection_but_is_refreshed(
    tmp_path: Path,
) -> None:
    old = config_mod.load(_config(tmp_path, "a", "b"))
    _config(tmp_path, "a")  # b and its secret gone: a is the same connection
    p = _plan(old, tmp_path / "cfg.toml")
    assert (p.added, p.removed, p.changed) == (set(), {"b"}, set())
    ((running, read),) = p.kept
    assert running is old.connections[0] and len(read.shared_keys) == 1
    reload_mod.refresh_secrets(running, read)
    assert [k.name for k in running.shared_keys] == ["ike-a"]


@pytest.mark.parametrize(
    ("edit", "keys"),
    [
        # THE invariant: a manual tunnel's keys, its SPIs and the durable reservations' block
        # are never applied live (a key or SPI changed under a running counter)
        (lambda t, k: (t, k.replace("22" * 20, "33" * 20)), ["tunnel"]),
        (lambda t, k: (t.replace("spi_out = 0x20000001", "spi_out = 0x20000002"), k), ["tunnel"]),
        (lambda t, k: (t + '\n[state]\nseq_block = 1024\n', k), ["state.seq_block"]),
        # (the tunnels' UDP encapsulation is the outer port's)
        (lambda t, k: (t.replace("port = 24500", "port = 24501"), k), ["outer.port", "tunnel"]),
        (lambda t, k: (t.replace("/tmp/x.sock", "/tmp/y.sock"), k), ["control.socket"]),
        (lambda t, k: (t.replace('remote = "10.1.0.99"', 'remote = "10.1.0.98"'), k), ["policy"]),
    ],
)
def test_a_restart_only_key_is_named_and_not_applied(
    tmp_path: Path, edit: Callable[[str, str], tuple[str, str]], keys: list[str]
) -> None:
    old = config_mod.load(_config(tmp_path, "a"))
    text, key_file = edit(GOOD, KEYS)
    _config(tmp_path, "a", text=text, keys=key_file)
    p = _plan(old, tmp_path / "cfg.toml")
    assert p.needs_restart == keys
    assert p.prints is not None and p.prints.restart == reload_mod.Prints.of(old).restart
    assert p.changed == set() and p.connections[0] is old.connections[0]


def test_a_connection_that_leases_from_a_pool_not_running_is_refused(tmp_path: Path) -> None:
    old = config_mod.load(_config(tmp_path, "a"))
    path = _config(tmp_path, "a")
    text = path.read_text().replace('remote.id = "a.example"',
                                    'remote.id = "a.example"\npools = ["p"]')  # fmt: skip
    path.write_text(text + '\n[pools.p]\naddrs = "10.1.7.0/24"\n')
    with pytest.raises(ConfigError, match=r"connections\.a\.pools: pool 'p' is not running"):
        _plan(old, path)


def test_the_digest_never_holds_a_key_in_clear(tmp_path: Path) -> None:
    cfg = config_mod.load(_config(tmp_path, "a"))
    prints = reload_mod.Prints.of(cfg)
    for d in [*prints.restart.values(), *prints.connections.values()]:
        assert len(d) == 32 and b"\x11" * 20 not in d and b"\xab" * 32 not in d

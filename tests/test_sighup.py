"""SIGHUP reloads the configuration of a running gateway, as charon, sshd and nginx do
(gateway/reload.py): ``examples/ikev2``'s sg1 and its mobile node, real processes on loopback.
The IKE SA up, its CHILD SA's SPIs and the traffic through it are kept across the reload; a
connection added admits a second client; an invalid file is one line and changes nothing; a
key that needs a restart is one warning each, its running value kept. (On main SIGHUP drained
and exited: every tunnel torn down.)"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.control import answers, ask, socket_of
from tests.helpers.deployment import cli
from tests.helpers.example_ikev2 import ADDR, Setup
from tests.helpers.ports import free_port
from tests.helpers.waiting import until

RW2 = """
[connections.rw2]
version = 2
local_addrs = ["127.0.4.1"]
remote_addrs = ["%any"]
local_port = {port}
proposals = ["aes128gcm16-prfsha256-x25519"]
local.auth = "psk"
local.id = "gw.example"
remote.auth = "psk"
remote.id = "mn2.example"
children.net.local_ts = ["10.2.0.0/24"]
children.net.remote_ts = ["10.1.0.0/16"]
children.net.esp_proposals = ["aes128gcm16"]

[secrets.ike-rw2]
id = ["gw.example", "mn2.example"]
file = "keys/ike.psk"
"""


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    # rw admits the MN alone: a second client needs the connection a reload adds
    f = s.dir / "sg1.toml"
    f.write_text(f.read_text().replace('remote.id = "%any"', 'remote.id = "mn.example"'))
    try:
        yield s
    finally:
        s.stop()


def _hup(setup: Setup, name: str, line: str, before: int) -> str:
    """SIGHUP to ``name``; the log once it holds one more ``line`` than ``before``."""
    os.kill(setup.procs[name].pid, signal.SIGHUP)
    until(lambda: _count(setup, name, line) > before, line, 30)
    assert setup.procs[name].poll() is None, setup.log(name)
    return _text(setup, name)


def _text(setup: Setup, name: str) -> str:
    return (setup.dir / f"{name}.log").read_text(errors="replace")


def _count(setup: Setup, name: str, line: str) -> int:
    return _text(setup, name).count(line)


def _sa_ids(ike: dict[str, Any]) -> tuple[Any, ...]:
    return (ike["spi_i"], ike["spi_r"],
            tuple((c["spi_in"], c["spi_out"]) for c in ike["children"]))  # fmt: skip


def _start_mn2(setup: Setup) -> str:
    """A second mobile node (mn2.example at 127.0.4.11) connecting to sg1."""
    text = (setup.dir / "mn.toml").read_text()
    outer = free_port()
    listen, peer = free_port(), free_port()
    text = re.sub(r'(?m)^name = "mn"$', 'name = "mn2"', text)
    text = re.sub(r'(?m)^address = "127.0.4.10"$', f'address = "127.0.4.11"\nport = {outer}',
                  re.sub(r"(?m)^port = \d+$", "", text, count=1), count=1)  # fmt: skip
    text = re.sub(r'(?m)^listen = ".*"$', f'listen = "127.0.4.11:{listen}"', text)
    text = re.sub(r'(?m)^peer = ".*"$', f'peer = "127.0.4.11:{peer}"', text)
    text = text.replace('local_addrs = ["127.0.4.10"]', 'local_addrs = ["127.0.4.11"]')
    text = re.sub(r"(?m)^local_port = \d+$", f"local_port = {outer}", text)
    text = text.replace("mn.example", "mn2.example").replace("10.1.0.2/32", "10.1.0.3/32")
    text = text.replace("ctl-mn.sock", "ctl-mn2.sock").replace("state/mn", "state/mn2")
    path = setup.dir / "mn2.toml"
    path.write_text(text)
    log = open(setup.dir / "mn2.log", "wb")  # noqa: SIM115 - closed with the process
    setup.procs["mn2"] = subprocess.Popen(
        [sys.executable, "-m", "ipsecct", "node", "run", "--config", str(path)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    until(lambda: answers(socket_of(str(path))), "mn2's control socket", 30)
    return str(path)


def _up(setup: Setup) -> dict[str, Any]:
    for n in ("sg1", "mn"):
        setup.start(n)
    setup.wait_ike("mn", lambda s: s["children"], "the MN's IKE SA with sg1")
    ike = setup.wait_ike("sg1", lambda s: s["children"], "sg1's IKE SA")
    setup.traffic_ok("sg1", 10)
    return ike


def test_sighup_reloads_the_connections_and_keeps_every_sa(setup: Setup) -> None:
    ike = _up(setup)
    before = setup.status("sg1")["config"]
    assert before["file"] == setup.config("sg1") and len(before["sha256"]) == 64
    assert before["reloads"] == 0 and before["log_level"] == "debug"

    # a connection added, one changed (its dpd_delay: for IKE SAs made from now on), the
    # log level lowered
    f = setup.dir / "sg1.toml"
    text = f.read_text().replace("dpd_delay = 30", "dpd_delay = 20")
    text = text.replace('level = "debug"', 'level = "info"')
    f.write_text(text + RW2.format(port=setup.port[24500]))
    log = _hup(setup, "sg1", "event=reloaded", 0)
    (line,) = [x for x in log.splitlines() if "event=reloaded" in x]
    assert "added=1 removed=0 changed=1" in line and "log_level=info" in line, line
    assert "event=shutdown" not in log and "Traceback" not in log
    after = setup.status("sg1")["config"]
    assert after["reloads"] == 1 and after["log_level"] == "info", after
    assert after["sha256"] != before["sha256"] and after["needs_restart"] == []
    shown = cli("status", "--config", setup.config("sg1")).stdout
    assert f"config: {setup.config('sg1')} (sha256 {after['sha256'][:16]})" in shown, shown
    assert "1 reload(s), 0 refused" in shown, shown

    # the IKE SA and its CHILD SA as they were: same SPIs, traffic through them
    (now,) = setup.ike("sg1")
    assert _sa_ids(now) == _sa_ids(ike)
    setup.traffic_ok("sg1", 20)
    assert setup.status("mn")["ike"]["counters"]["ike-sa-init-sent"] == 1

    # the new connection admits a second client (rw admits mn.example only)
    mn2 = _start_mn2(setup)
    until(lambda: any(s["name"] == "rw2" and s["children"] for s in setup.ike("sg1")),
          "mn2's IKE SA at sg1 (connection rw2)", 30)  # fmt: skip
    ikes = {s["name"]: s for s in setup.ike("sg1")}
    assert ikes["rw2"]["remote_id"] == "mn2.example" and _sa_ids(ikes["rw"]) == _sa_ids(ike)
    assert ask(socket_of(mn2), "ike.list")[0]["children"]
    setup.traffic_ok("sg1", 30)

    # rw2 removed: no new IKE SA for it; mn2's, up, runs on until it ends or is deleted
    f.write_text(text)
    log = _hup(setup, "sg1", "event=reloaded", 1)
    line = [x for x in log.splitlines() if "event=reloaded" in x][-1]
    assert "added=0 removed=1 changed=0" in line, line
    assert {s["name"]: _sa_ids(s) for s in setup.ike("sg1")} == {
        n: _sa_ids(s) for n, s in ikes.items()}
    psk = (setup.dir / "keys" / "ike.psk").read_text().strip().removeprefix("0x")
    assert psk not in _text(setup, "sg1")


def test_an_invalid_file_or_a_restart_key_at_sighup_keeps_what_runs(setup: Setup) -> None:
    ike = _up(setup)
    f = setup.dir / "sg1.toml"
    good = f.read_text()
    sock = socket_of(setup.config("sg1"))
    sha = setup.status("sg1")["config"]["sha256"]

    # invalid: one ERROR line naming the file and the key; nothing changed
    f.write_text(good.replace('level = "debug"', 'level = "loud"'))
    log = _hup(setup, "sg1", "event=reload-failed", 0)
    (line,) = [x for x in log.splitlines() if "reload-failed" in x]
    assert " ERROR " in line and setup.config("sg1") in line and "log.level" in line, line
    assert "event=reloaded" not in log and "Traceback" not in log
    st = setup.status("sg1")["config"]
    assert (st["sha256"], st["reloads"], st["reloads_failed"]) == (sha, 0, 1), st
    assert st["log_level"] == "debug"
    assert _sa_ids(setup.ike("sg1")[0]) == _sa_ids(ike)
    setup.traffic_ok("sg1", 20)

    # restart-only keys (the durable reservations' block, the control socket): one WARNING
    # each, the running values kept; the live part (the log level) applied
    other = str(setup.dir / "ctl-other.sock")
    f.write_text(good.replace("[state]", "[state]\nseq_block = 1024")
                 .replace(f'socket = "{sock}"', f'socket = "{other}"')
                 .replace('level = "debug"', 'level = "info"'))  # fmt: skip
    log = _hup(setup, "sg1", "event=reloaded", 0)
    warned = [x for x in log.splitlines() if "event=reload-needs-restart" in x]
    assert len(warned) == 2 and all(" WARNING " in x for x in warned), warned
    assert "key=state.seq_block" in warned[0] or "key=state.seq_block" in warned[1], warned
    assert any("key=control.socket" in x for x in warned), warned
    st = ask(sock, "status")  # (the socket it was started with still answers)
    assert st["state"]["seq_block"] == 1 << 16, st["state"]
    assert sorted(st["config"]["needs_restart"]) == ["control.socket", "state.seq_block"]
    assert st["config"]["log_level"] == "info" and st["config"]["reloads"] == 1
    assert not os.path.exists(other)
    assert _sa_ids(ask(sock, "ike.list")[0]) == _sa_ids(ike)
    setup.traffic_ok("sg1", 30)

    # SIGTERM still drains and exits
    setup.procs["sg1"].terminate()
    assert setup.procs["sg1"].wait(30) == 0
    assert "event=shutdown" in _text(setup, "sg1")
    assert ADDR["sg1"] in _text(setup, "sg1")


def _hup_pending(pid: int) -> bool:
    """Whether a SIGHUP sent to ``pid`` waits to be taken (SigPnd, ShdPnd: bit 0 is signal 1)."""
    text = Path(f"/proc/{pid}/status").read_text()
    masks = [int(x.split()[1], 16) for x in text.splitlines()
             if x.startswith(("SigPnd:", "ShdPnd:"))]  # fmt: skip
    return any(m & 1 for m in masks)


def test_a_sighup_storm_is_a_reload_a_second_and_the_last_file_is_loaded(setup: Setup) -> None:
    """100 SIGHUPs, each taken by the process before the next is sent (a loop of
    ``systemctl reload``, a configuration tool gone wrong): on main every one was a whole
    reload of its own, read, checked and applied, and its lines (100 event=reloaded, and as
    many WARNINGs per restart-only key changed). The SIGHUPs that come within RELOAD_GAP of
    a reload are folded into one reload at the gap's end, which reads the file as it is then:
    the file written amid the storm is the one that runs, nothing half-applied."""
    from ipsecct.gateway.service import RELOAD_GAP

    ike = _up(setup)
    pid = setup.procs["sg1"].pid
    f = setup.dir / "sg1.toml"
    good = f.read_text()
    f.write_text(good.replace("[state]", "[state]\nseq_block = 1024"))  # a restart-only key
    start = time.monotonic()
    for i in range(100):
        if i == 60:
            f.write_text(good.replace("[state]", "[state]\nseq_block = 1024")
                         .replace('level = "debug"', 'level = "info"'))  # fmt: skip
        os.kill(pid, signal.SIGHUP)
        until(lambda: not _hup_pending(pid), "sg1 to take the SIGHUP", 10)
    elapsed = time.monotonic() - start
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    until(lambda: setup.status("sg1")["config"]["sha256"] == sha, "the last file loaded", 30)
    st = setup.status("sg1")["config"]
    assert st["log_level"] == "info" and st["needs_restart"] == ["state.seq_block"], st
    # every SIGHUP is a reload or folded into the one after it; a reload a RELOAD_GAP at most
    until(lambda: sum(setup.status("sg1")["config"].get(k, 0) for k in
                      ("reloads", "reloads_failed", "coalesced")) == 100,
          "every SIGHUP counted", 30)  # fmt: skip
    st = setup.status("sg1")["config"]
    assert st["reloads"] <= 2 + elapsed / RELOAD_GAP, (st, elapsed)
    assert st["reloads_failed"] == 0, st
    assert st["reloads"] < 100 and st["coalesced"] > 0, (st, elapsed)
    log = _text(setup, "sg1")
    assert log.count("event=reloaded") == st["reloads"], st
    assert log.count("event=reload-needs-restart") == 1, st  # (said once: the same value)
    assert "Traceback" not in log and "event=shutdown" not in log
    assert _sa_ids(setup.ike("sg1")[0]) == _sa_ids(ike)
    setup.traffic_ok("sg1", 40)


def test_a_load_warning_is_said_once_per_cause_and_reloads_say_it_holds_still(
    setup: Setup,
) -> None:
    """The IKE secret's file readable by others, and a restart-only key changed: on main each
    reload wrote the load's WARNINGs again (key-file-readable-by-others, reload-needs-restart),
    one set per SIGHUP. Now each distinct cause is one line: the start's warning (formatted as
    every line, after the log is set up) is not repeated by the reloads while it holds, which
    say how many hold still (``warnings_still`` in event=reloaded, ``config.warnings`` in
    status); a changed cause (another mode, another value) is a line of its own, and a cause
    gone leaves the status."""
    psk = setup.dir / "keys" / "ike.psk"
    psk.chmod(0o644)
    setup.start("sg1")
    sock = socket_of(setup.config("sg1"))
    readable = "event=key-file-readable-by-others"
    until(lambda: _count(setup, "sg1", readable) == 1, "the start's warning", 30)
    (line,) = [x for x in _text(setup, "sg1").splitlines() if readable in x]
    assert " WARNING ipsecct.gateway.config " in line and "mode=644" in line, line
    assert ask(sock, "status")["config"]["warnings"] == [line.split(" ", 4)[4]]
    f = setup.dir / "sg1.toml"
    good = f.read_text()
    f.write_text(good.replace("[state]", "[state]\nseq_block = 1024"))
    for i in range(3):
        log = _hup(setup, "sg1", "event=reloaded", i)
        assert log.count(readable) == 1, log
        assert log.count("event=reload-needs-restart") == 1, log
        last = [x for x in log.splitlines() if "event=reloaded" in x][-1]
        assert "warnings_still=1" in last and "needs_restart=state.seq_block" in last, last
    st = ask(sock, "status")["config"]
    assert len(st["warnings"]) == 1 and "mode=644" in st["warnings"][0], st
    assert st["needs_restart"] == ["state.seq_block"], st
    # another cause: another mode, another value of the restart-only key
    psk.chmod(0o640)
    f.write_text(good.replace("[state]", "[state]\nseq_block = 2048"))
    log = _hup(setup, "sg1", "event=reloaded", 3)
    assert log.count(readable) == 2 and "mode=640" in log, log
    assert log.count("event=reload-needs-restart") == 2, log
    # the cause gone: no warning in status; it comes back: said again
    psk.chmod(0o600)
    log = _hup(setup, "sg1", "event=reloaded", 4)
    assert log.count(readable) == 2 and ask(sock, "status")["config"]["warnings"] == []
    assert "warnings_still" not in [x for x in log.splitlines() if "event=reloaded" in x][-1]
    psk.chmod(0o644)
    log = _hup(setup, "sg1", "event=reloaded", 5)
    assert log.count(readable) == 3, log
    assert "Traceback" not in log and setup.procs["sg1"].poll() is None


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "huge", "directory", "removed"])
def test_a_file_replaced_by_what_never_ends_at_sighup_is_one_line_and_changes_nothing(
    setup: Setup, kind: str
) -> None:
    """The configuration file replaced, before a SIGHUP, by a symlink to /dev/zero, a FIFO no
    one writes (open() would wait for a writer for ever: the event loop with it), a sparse
    file of 4 GiB, a directory, or nothing: one ERROR line (event=reload-failed) naming the
    file, at once; the gateway runs on with what it had and a later SIGHUP of the good file
    reloads it. (Held on main: the loader opens non-blocking and reads regular files of at
    most CONFIG_LIMIT; a guard for the reload path.)"""
    setup.start("sg1")
    sock = socket_of(setup.config("sg1"))  # (status finds it in the file: read it first)
    until(lambda: answers(sock), "sg1's control socket", 30)
    f = setup.dir / "sg1.toml"
    good = f.read_bytes()
    sha = ask(sock, "status")["config"]["sha256"]
    f.unlink()
    if kind == "dev-zero":
        f.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(f)
    elif kind == "huge":
        with open(f, "wb") as out:
            out.truncate(4 << 30)
    elif kind == "directory":
        f.mkdir()
    log = _hup(setup, "sg1", "event=reload-failed", 0)
    (line,) = [x for x in log.splitlines() if "event=reload-failed" in x]
    assert " ERROR " in line and str(f) in line and "Traceback" not in log, line
    st = ask(sock, "status")["config"]
    assert (st["sha256"], st["reloads"], st["reloads_failed"]) == (sha, 0, 1), st
    if kind == "directory":
        f.rmdir()
    elif f.exists() or f.is_symlink():
        f.unlink()
    f.write_bytes(good.replace(b'level = "debug"', b'level = "info"'))
    _hup(setup, "sg1", "event=reloaded", 0)
    st = setup.status("sg1")["config"]
    assert st["reloads"] == 1 and st["log_level"] == "info", st


def test_sighups_amid_transfers_there_and_back_change_nothing_of_the_move(setup: Setup) -> None:
    """SIGHUPs without a pause at sg1 and sg2 while the MN's IKE SA moves to sg2 and back, the
    connection it was made with changed in both files at each SIGHUP (dpd_delay 30, 20, 30,
    ...: a new connection object each reload): both transfers commit, the IKE SA and its
    CHILD SA keep their SPIs, traffic passes, no replay or ICV drop anywhere, the MN never
    negotiates again. (Held on main; a reload applies only the connections' objects, which an
    IKE SA up or in transit does not take.)"""
    for n in ("sg1", "sg2", "mn"):
        setup.start(n)
    ike1 = setup.wait_ike("sg1", lambda s: s["children"], "sg1's IKE SA")
    setup.traffic_ok("sg1", 10)
    files = {n: setup.dir / f"{n}.toml" for n in ("sg1", "sg2")}
    texts = {n: f.read_text() for n, f in files.items()}
    stop = threading.Event()
    sent = {"sg1": 0, "sg2": 0}

    def storm() -> None:
        i = 0
        while not stop.is_set():
            for n in ("sg1", "sg2"):
                tmp = files[n].with_suffix(".new")  # (replaced whole: status reads it too)
                tmp.write_text(texts[n].replace("dpd_delay = 30", f"dpd_delay = {20 + i % 2 * 10}"))
                os.replace(tmp, files[n])
                pid = setup.procs[n].pid
                os.kill(pid, signal.SIGHUP)
                sent[n] += 1
                until(lambda: not _hup_pending(pid), "the SIGHUP taken", 10)  # noqa: B023
            i += 1

    t = threading.Thread(target=storm)
    t.start()
    try:
        r = cli("transfer", "rw", "--to", "sg2", "--json", "--config", setup.config("sg1"))
        assert r.returncode == 0, (r.stdout, r.stderr, setup.log("sg1"))
        ike2 = setup.wait_ike("sg2", lambda s: s["children"], "sg2's IKE SA")
        setup.traffic_ok("sg2", 20)
        r = cli("transfer", ike2["spi_r"], "--to", "sg1", "--json", "--config",
                setup.config("sg2"))  # fmt: skip
        assert r.returncode == 0, (r.stdout, r.stderr, setup.log("sg2"))
        back = setup.wait_ike("sg1", lambda s: s["children"], "sg1's IKE SA back")
        setup.traffic_ok("sg1", 30)
    finally:
        stop.set()
        t.join(30)
    assert _sa_ids(back) == _sa_ids(ike1) == _sa_ids(ike2)
    assert min(sent.values()) >= 2, sent
    assert setup.status("mn")["ike"]["counters"]["ike-sa-init-sent"] == 1
    for n in ("mn", "sg1", "sg2"):
        drops = setup.status(n)["counters"]["drops"]
        assert drops["replay"] == 0 and drops["icv"] == 0, (n, drops)
        assert "Traceback" not in _text(setup, n) and setup.procs[n].poll() is None
    for n in ("sg1", "sg2"):
        st = setup.status(n)["config"]
        assert st["reloads"] >= 1 and st["reloads_failed"] == 0, (n, st)

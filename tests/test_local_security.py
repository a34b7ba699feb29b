"""Issue 8 §4: listeners and the control socket, against real gateway processes.

A local user (or anyone who reaches the CXTP port) floods the listeners with idle connections;
a request nested 100,000 deep reaches the control socket; another user plants a socket where
the client looks; ``-c CONFIG`` on a client command must not read key files. Each test is the
attack from the issue and failed before the fix.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipsecct.gateway import control
from tests.helpers.daemon import Daemon, free_udp_port, node_toml
from tests.helpers.deployment import cli
from tests.helpers.transfer_processes import SPI, Setup

NOBODY = pwd.getpwnam("nobody")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def flood(host: str, port: int, n: int, source: str) -> list[socket.socket]:
    """n TCP connections from ``source`` that never say anything (kept open by the caller)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect((host, port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


@pytest.fixture
def many_fds() -> Iterator[None]:
    """This test process itself holds thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- the control socket ------------------------------------------------------------------------
@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    d = tempfile.mkdtemp(prefix="ipsecct-c-", dir="/tmp")
    sock = os.path.join(d, "gw.sock")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(node_toml("gw", free_udp_port(), free_udp_port(), free_udp_port(), sock, []))
    gw = Daemon("gateway", cfg, sock, tmp_path / "gw.log")
    try:
        gw.start()
        yield gw, sock
    finally:
        gw.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def test_deeply_nested_request_gets_one_line_answer(
    daemon: tuple[Daemon, str], tmp_path: Path
) -> None:
    _, sock = daemon
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        f = s.makefile("rb")
        ans = json.loads(f.readline())
        assert ans == {"ok": False, "error": "request is nested too deeply"}
        # The connection and the daemon carry on.
        s.sendall(b'{"cmd": "status"}\n')
        assert json.loads(f.readline())["ok"] is True
    log = (tmp_path / "gw.log").read_text()
    assert log.count("control-request-refused") == 1
    assert "RecursionError" not in log and "Traceback" not in log


def planted_socket(d: Path, owner: int) -> tuple[socket.socket, list[bytes]]:
    """A listening socket at ``d/evil.sock`` owned by ``owner``; what it receives is kept."""
    srv = socket.socket(socket.AF_UNIX)
    path = d / "evil.sock"
    srv.bind(str(path))
    os.chown(path, owner, owner)
    srv.listen(4)
    srv.settimeout(5)
    got: list[bytes] = []

    def serve() -> None:
        try:
            c, _ = srv.accept()
        except OSError:
            return
        with c:
            got.append(c.recv(65536))
            c.sendall(b'{"ok": true, "result": {}}\n')

    threading.Thread(target=serve, daemon=True).start()
    return srv, got


def test_client_refuses_a_socket_planted_by_another_user(tmp_path: Path) -> None:
    ctx = tmp_path / "sa.json"
    shutil.copy(Path(__file__).parent.parent / "examples/contexts/esp-aes-gcm-esn-tunnel.json", ctx)
    d = Path(tempfile.mkdtemp(prefix="ipsecct-p-", dir="/tmp"))
    try:
        srv, got = planted_socket(d, NOBODY.pw_uid)
        r = cli("sa", "add", str(ctx), "-s", str(d / "evil.sock"))
        assert r.returncode == 2 and "belongs to uid" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
        time.sleep(0.2)
        assert got == []  # the key never left
        srv.close()
    finally:
        shutil.rmtree(d)


def test_client_refuses_a_socket_in_another_users_directory(tmp_path: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="ipsecct-p-", dir="/tmp"))
    try:
        srv, got = planted_socket(d, os.geteuid())
        os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)  # nobody could swap the socket
        r = cli("status", "-s", str(d / "evil.sock"))
        assert r.returncode == 2 and "directory" in r.stderr, r.stderr
        assert got == []
        os.chown(d, 0, 0)
        os.chmod(d, 0o777)  # writable by everyone, not sticky
        r = cli("status", "-s", str(d / "evil.sock"))
        assert r.returncode == 2 and "writable by others" in r.stderr, r.stderr
        srv.close()
    finally:
        shutil.rmtree(d)


def test_c_reads_only_what_it_needs_to_find_the_socket(
    daemon: tuple[Daemon, str], tmp_path: Path
) -> None:
    _, sock = daemon
    cfg = tmp_path / "other.toml"
    tunnel = {
        "name": "t",
        "local_ts": "10.2.0.0/24",
        "remote_ts": "10.1.0.2/32",
        "peer": "127.0.0.1:4500",
        "spi_in": 1,
        "spi_out": 2,
        "keys": "unreadable.keys",
    }
    cfg.write_text(node_toml("other", 1, 2, 3, sock, [tunnel]))
    (tmp_path / "unreadable.keys").write_text("not even TOML [")
    os.chmod(tmp_path / "unreadable.keys", 0)
    r = cli("status", "--json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "gw"
    assert "key" not in r.stderr


def test_runtime_dir_by_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPSECCT_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert control.runtime_dir() == Path("/run/ipsecct")
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert control.runtime_dir() == Path("/run/user/1234/ipsecct")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert control.runtime_dir() == Path(tempfile.gettempdir()) / "ipsecct-1234"
    assert control.socket_path(None) == str(
        Path(tempfile.gettempdir()) / "ipsecct-1234/ipsecct.sock"
    )
    assert control.socket_path("sg1.sock").endswith("ipsecct-1234/sg1.sock")
    assert control.socket_path("/x/y.sock") == "/x/y.sock"


def test_default_socket_is_private_and_found_without_c(tmp_path: Path) -> None:
    run = tmp_path / "run" / "ipsecct"  # stands in for /run/ipsecct
    cfg = tmp_path / "gw.toml"
    text = node_toml("gw", free_udp_port(), free_udp_port(), free_udp_port(), "x", [])
    cfg.write_text(text.replace('[control]\nsocket = "x"\n', ""))
    env = {**os.environ, "IPSECCT_RUNTIME_DIR": str(run)}
    env.pop("IPSECCT_SOCKET", None)
    log = open(tmp_path / "gw.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipsecct", "gateway", "run", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ipsecct", "status", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    try:
        r = status()
        for _ in range(200):
            if r.returncode == 0 or proc.poll() is not None:
                break
            time.sleep(0.1)
            r = status()
        assert r.returncode == 0, (r.stderr, (tmp_path / "gw.log").read_text())
        assert json.loads(r.stdout)["name"] == "gw"
        assert run.stat().st_mode & 0o777 == 0o700
        assert (run / control.SOCKET_NAME).stat().st_mode & 0o777 == 0o600
        # A second daemon with the same default socket refuses to start (one line, status 2)
        # instead of taking the socket from the first.
        cfg2 = tmp_path / "gw2.toml"
        text2 = node_toml("gw2", free_udp_port(), free_udp_port(), free_udp_port(), "x", [])
        cfg2.write_text(text2.replace('[control]\nsocket = "x"\n', ""))
        r2 = subprocess.run(
            [sys.executable, "-m", "ipsecct", "gateway", "run", "--config", str(cfg2)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert r2.returncode == 2 and "already listening" in r2.stderr, r2.stderr
        assert status().returncode == 0
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


# -- listeners ------------------------------------------------------------------------------
def test_idle_connections_do_not_exhaust_the_gateway(tmp_path: Path, many_fds: None) -> None:
    metrics_port = free_udp_port()  # any free number; TCP and UDP spaces are separate anyway
    setup = Setup(tmp_path)
    sg2 = setup.dir / "sg2.toml"
    sg2.write_text(
        sg2.read_text().replace("[control]\n", f'[control]\nmetrics = "127.0.0.1:{metrics_port}"\n')
    )
    socks: list[socket.socket] = []
    try:
        for n in ("sg1", "sg2", "mn"):
            setup.start(n)
        pid = setup.procs["sg2"].pid
        # The gateway raised its descriptor limit to the hard limit at start.
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        soft, hard = line.split()[3:5]
        assert soft == hard, line
        before = open_fds(pid)
        cxtp_port = setup.port[35091]
        socks += flood("127.0.3.2", cxtp_port, 1100, "127.0.0.5")
        socks += flood("127.0.0.1", metrics_port, 1100, "127.0.0.6")
        assert len(socks) > 2000  # the kernel accepted them; the gateway did not keep them
        time.sleep(0.5)
        assert open_fds(pid) < before + 100, open_fds(pid)
        # A real peer's handshake still succeeds at once: sg1 moves the MN's tunnel to sg2 ...
        r = cli("transfer", SPI, "--to", "sg2", "--json", "--config", setup.config("sg1"))
        assert r.returncode == 0, (r.stdout, r.stderr, setup.log("sg2"))
        assert json.loads(r.stdout)["outcome"] == "committed"
        # ... and the metrics answer a scrape from another source.
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 200")
        # The log says so in a few lines, not one per connection.
        log = (setup.dir / "sg2.log").read_text()
        refused = [x for x in log.splitlines() if "refused" in x and "connection" in x]
        assert 0 < len(refused) < 40, len(refused)
        assert "Traceback" not in log
    finally:
        for s in socks:
            s.close()
        setup.stop()

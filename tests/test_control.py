"""The control socket is robust: clients that send garbage get error answers, and the server
keeps serving everyone else. Its file is mode 0600."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ipsecct.errors import ControlError
from ipsecct.gateway.control import MAX_LINE, ControlServer, MetricsServer, request
from tests.helpers.control_server import ask, connect, echo_handler, short_path, with_server
from tests.helpers.daemon import Daemon, free_udp_port, node_toml
from tests.helpers.waiting import eventually, until

GARBAGE: list[tuple[bytes, str]] = [
    (b"hello\n", "not JSON"),
    (b"{\n", "not JSON"),
    (b"\xff\xfe\x00\x01\x80binary\n", "not JSON"),
    (b"[1, 2, 3]\n", "object"),
    (b'"status"\n', "object"),
    (b"42\n", "object"),
    (b"null\n", "object"),
    (b"{}\n", "object"),
    (b'{"cmd": 7}\n', "object"),
    (b'{"cmd": "nope"}\n', "unknown command 'nope'"),
    (b'{"cmd": "echo", "args": [1]}\n', '"args" must be an object'),
    (b'{"cmd": "boom"}\n', "internal error (RuntimeError)"),
    (b'{"cmd": "sa"}\n', "no such SA"),
    (b'{"cmd": "needs", "args": {}}\n', "bad arguments: KeyError"),
    (b"\n", "not JSON"),
]


def test_garbage_gets_errors_and_the_connection_goes_on() -> None:
    async def t(srv: ControlServer, path: str) -> None:
        c = await connect(path)
        for line, err in GARBAGE:
            ans = await ask(c, line)
            assert ans["ok"] is False, line
            assert err in ans["error"], (line, ans)
            # after each bad request a good one on the same connection still works
            good = await ask(c, b'{"cmd": "echo", "args": {"n": 1}}\n')
            assert good == {"ok": True, "result": {"echo": {"n": 1}}}
        c[1].close()

    with_server(t)


def test_a_number_too_long_for_python_is_refused_by_name() -> None:
    """A request holding a JSON integer of more than 4,300 digits (Python's int limit: a
    ValueError inside json.loads) was answered "request is not JSON"; it is valid JSON. Now
    the answer says what is wrong, and a number of 4,300 digits is still read."""

    async def t(srv: ControlServer, path: str) -> None:
        c = await connect(path)
        for n in (4301, 100_000):
            for sign in (b"", b"-"):
                line = b'{"cmd": "echo", "args": {"n": ' + sign + b"7" * n + b"}}\n"
                ans = await ask(c, line)
                assert ans == {"ok": False,
                               "error": "request holds a number of more than 4300 digits"}, n
        ans = await ask(c, b'{"cmd": "echo", "args": {"n": ' + b"7" * 4300 + b"}}\n")
        assert ans["ok"] is True and ans["result"]["echo"]["n"] == int("7" * 4300)
        assert srv.refused == 4
        c[1].close()

    with_server(t)


def test_huge_line_closes_only_that_connection() -> None:
    async def t(srv: ControlServer, path: str) -> None:
        bystander = await connect(path)
        big = await connect(path)
        r, w = big
        w.write(b"x" * (MAX_LINE + 10))  # no newline
        await w.drain()
        ans = json.loads(await r.readline())
        assert ans == {"ok": False, "error": "request too long"}
        assert await r.read() == b""  # the server closed it
        w.close()
        # the other client, connected all along, is still served; so is a new one
        assert (await ask(bystander, b'{"cmd": "echo"}\n'))["ok"] is True
        fresh = await connect(path)
        assert (await ask(fresh, b'{"cmd": "echo"}\n'))["ok"] is True
        for c in (bystander, fresh):
            c[1].close()

    with_server(t)


def test_idle_and_half_finished_clients_do_not_block_others() -> None:
    async def t(srv: ControlServer, path: str) -> None:
        idle = await connect(path)  # connects, says nothing
        partial = await connect(path)
        partial[1].write(b'{"cmd": "ec')  # half a line, then nothing
        await partial[1].drain()
        gone = await connect(path)
        gone[1].write(b'{"cmd": "echo"')
        gone[1].close()  # hangs up mid-line
        # a client that sends many requests and never reads its answers
        greedy = await connect(path)
        greedy[1].write(b'{"cmd": "echo", "args": {"pad": "' + b"y" * 1000 + b'"}}\n' * 2000)
        others = [await connect(path) for _ in range(5)]
        answers = await asyncio.gather(*(ask(c, b'{"cmd": "echo"}\n') for c in others))
        assert all(a["ok"] for a in answers)
        for c in (idle, partial, greedy, *others):
            c[1].close()

    with_server(t)


def test_many_clients_concurrently() -> None:
    async def t(srv: ControlServer, path: str) -> None:
        async def one(i: int) -> dict[str, Any]:
            c = await connect(path)
            try:
                if i % 2:
                    await ask(c, b"garbage\n")
                return await ask(c, json.dumps({"cmd": "echo", "args": {"i": i}}).encode() + b"\n")
            finally:
                c[1].close()

        res = await asyncio.gather(*(one(i) for i in range(40)))
        assert [r["result"]["echo"]["i"] for r in res] == list(range(40))

    with_server(t)


def test_socket_is_mode_0600_whatever_the_umask() -> None:
    async def t(srv: ControlServer, path: str) -> None:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600

    old = os.umask(0)
    try:
        with_server(t)
    finally:
        os.umask(old)


def test_a_stale_socket_file_is_replaced() -> None:
    path = short_path()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # left behind by a crashed daemon
    try:

        async def main() -> None:
            srv = ControlServer(path)
            srv.register("echo", echo_handler)
            await srv.start()
            try:
                res = await asyncio.to_thread(request, path, "echo", {"a": 1})
                assert res == {"echo": {"a": 1}}
            finally:
                await srv.stop()

        asyncio.run(main())
    finally:
        os.rmdir(os.path.dirname(path))


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_a_file_that_is_not_a_socket_is_never_replaced(kind: str) -> None:
    """A control.socket naming an existing file by mistake (the configuration itself, a key
    file) had that file removed, even when the gateway then failed to start: it is refused
    by name and left as it was."""
    path = short_path()
    d = os.path.dirname(path)
    if kind == "file":
        Path(path).write_text("name = 'sg1'\n")
    elif kind == "directory":
        os.mkdir(path)
    else:
        Path(d, "target").write_text("kept\n")
        os.symlink(os.path.join(d, "target"), path)
    try:
        srv = ControlServer(path)
        with pytest.raises(ControlError, match="exists and is not a socket: refusing"):
            srv.check()
        with pytest.raises(ControlError, match="is not a socket"):
            asyncio.run(srv.start())
        assert os.path.lexists(path)
        if kind == "file":
            assert Path(path).read_text() == "name = 'sg1'\n"
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize(("text", "spi"), [
    ("536870913", 0x20000001), ("0x20000001", 0x20000001), ("0X2000000A", 0x2000000A),
    (" 0x20000001 ", 0x20000001), ("0", 0), ("20000001_i", 0x20000001),
    ("c0ffee01_o", 0xC0FFEE01), ("0xffffffff", 0xFFFFFFFF), (536870913, 0x20000001),
    # README: "anything else ... is refused by name"; int(x, 0) took the first four
    ("0o17", None), ("0b101", None), ("1_000", None), ("+5", None), ("-1", None),
    ("c0ffee01", None), ("00010", None), ("0x", None), ("c0ffee1_i", None), ("", None),
    ("0x1ffffffff", None), ("٣", None), (True, None), (None, None), (-1, None),
])  # fmt: skip
def test_an_spi_is_decimal_0x_hex_or_as_swanctl_prints_it(text: object, spi: int | None) -> None:
    """What README says every command taking an SPI takes, on the socket and the command
    line alike (the command line sends the text; ``sa show c0ffee01`` says to write 0x)."""
    from ipsecct.gateway.control import parse_spi

    if spi is not None:
        assert parse_spi(text) == spi
        if isinstance(text, str):
            assert cli_main(["sa", "show", text, "-s", "/nonexistent.sock"]) == 2  # no daemon
        return
    with pytest.raises(ControlError, match="bad SPI"):
        parse_spi(text)
    if text == "c0ffee01":
        with pytest.raises(ControlError, match="hex digits need 0x: 0xc0ffee01"):
            parse_spi(text)


def cli_main(argv: list[str]) -> int:
    from ipsecct import cli

    return cli.main(argv)


def test_the_command_line_refuses_what_the_socket_would_refuse_as_an_spi(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for bad in ("0o17", "1_000", "c0ffee01"):
        with pytest.raises(SystemExit) as exc:
            cli_main(["sa", "show", bad, "-s", "/nonexistent.sock"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "bad SPI" in err and "Traceback" not in err, err
    assert "hex digits need 0x: 0xc0ffee01" in err


def test_request_client_errors() -> None:
    with pytest.raises(ControlError, match="is the daemon running"):
        request("/nonexistent/ipsecct.sock", "status")

    async def t(srv: ControlServer, path: str) -> None:
        with pytest.raises(ControlError, match="unknown command"):
            await asyncio.to_thread(request, path, "nope")
        with pytest.raises(ControlError, match="no such SA"):
            await asyncio.to_thread(request, path, "sa")

    with_server(t)


def test_a_socket_path_too_long_is_named_so_not_no_such_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ipsecct status -s PATH`` with a PATH of 108 bytes or more (sun_path) said "no such
    file (is the daemon running?)": no socket can ever be there. Now one line says why."""
    long = "/tmp/" + "d" * 200 + "/ctl.sock"
    with pytest.raises(ControlError, match="path too long for a Unix socket"):
        request(long, "status")
    for argv in (["status", "-s", long], ["sa", "list", "-s", long]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "path too long for a Unix socket" in err, err
        assert "no such file" not in err and "Traceback" not in err, err
    # one byte short of the limit is still looked up (and is not there)
    fits = "/tmp/" + "d" * (107 - len("/tmp/") - len("/c.sock")) + "/c.sock"
    assert len(fits) == 107
    with pytest.raises(ControlError, match="no such file"):
        request(fits, "status")


def test_metrics_export_the_ike_sas_and_the_ike_counters() -> None:
    """A strongSwan operator watches the IKE SAs (swanctl --list-sas, --stats) and failed
    authentications; ``status`` had them, the metrics endpoint nothing about IKE. Now the
    IKE SAs, the half-open ones and each IKE counter; nothing about IKE without it."""
    from ipsecct.gateway.control import prometheus_text

    status: dict[str, Any] = {
        "name": "gw", "sas": 2, "uptime_s": 1.0,
        "counters": {"out_packets": 0, "in_packets": 0, "out_bytes": 0, "in_bytes": 0,
                     "drops": {}},
        "ike": {"ike_sas": 3, "half_open": 1, "pools": [], "replicas_refused": [],
                "counters": {"auth-failed": 2, "ike-sa-established": 4}},
    }  # fmt: skip
    text = prometheus_text(status)
    for line in ("# TYPE ipsecct_ike_sas gauge", 'ipsecct_ike_sas{node="gw"} 3',
                 'ipsecct_ike_half_open{node="gw"} 1', "# TYPE ipsecct_ike_events_total counter",
                 'ipsecct_ike_events_total{node="gw",event="auth-failed"} 2',
                 'ipsecct_ike_events_total{node="gw",event="ike-sa-established"} 4'):  # fmt: skip
        assert line + "\n" in text, text
    del status["ike"]
    assert "ipsecct_ike" not in prometheus_text(status)


def test_metrics_server_answers_get_and_refuses_the_rest() -> None:
    status = {
        "name": "n1",
        "counters": {
            "out_packets": 5,
            "in_packets": 6,
            "out_bytes": 7,
            "in_bytes": 8,
            "drops": {"replay": 2},
        },
        "sas": 3,
        "uptime_s": 1.5,
    }

    async def main() -> None:
        m = MetricsServer("127.0.0.1", 0, lambda: status)
        await m.start()
        try:
            port = m.bound_port

            async def http(req: bytes) -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(req)
                await w.drain()
                data = await r.read()
                w.close()
                return data

            ok = await http(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert ok.startswith(b"HTTP/1.0 200 OK")
            assert b'ipsecct_packets_total{node="n1",direction="out"} 5' in ok
            assert b'ipsecct_drops_total{node="n1",reason="replay"} 2' in ok
            assert (await http(b"POST / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
            assert await http(b"\x00\x01garbage") == b""  # never a full request: closed
            assert (await http(b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
            q = await http(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            assert q.startswith(b"HTTP/1.0 200")
            # another path is not the metrics (a scanner, a typo): 404, as exporters answer
            for bad in (b"/favicon.ico", b"/../../etc/passwd", b"/metricsX", b""):
                r404 = await http(b"GET " + bad + b" HTTP/1.0\r\n\r\n")
                assert r404.startswith(b"HTTP/1.0 404"), (bad, r404)
        finally:
            await m.stop()

    asyncio.run(main())


def test_idle_connections_do_not_keep_a_scrape_out_of_the_metrics_endpoint() -> None:
    """The endpoint is on loopback, where every client is one source: 16 idle connections
    (any local user's), opened again as each timed out, made every scrape be refused. A
    connection over the limit now takes the place of the oldest idle one; the scrape gets
    its metrics each time, and no more than the limit are ever open."""

    async def main() -> None:
        counters = {"out_packets": 5, "in_packets": 6, "out_bytes": 7, "in_bytes": 8, "drops": {}}
        status = {"name": "n1", "counters": counters, "sas": 3, "uptime_s": 1.5}
        m = MetricsServer("127.0.0.1", 0, lambda: status)
        await m.start()
        idle: list[asyncio.StreamWriter] = []
        try:
            for _ in range(3):
                for _ in range(40):  # more than per_source (16) and total (32)
                    _, w = await asyncio.open_connection("127.0.0.1", m.bound_port)
                    w.write(b"GET /metr")  # never the rest of its request
                    idle.append(w)
                await eventually(lambda: m.limits.count == m.limits.per_source,
                                 "the idle connections to hold the places")  # fmt: skip
                r, w = await asyncio.open_connection("127.0.0.1", m.bound_port)
                w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
                ok = await asyncio.wait_for(r.read(), 10)
                w.close()
                assert ok.startswith(b"HTTP/1.0 200 OK"), ok
                assert m.limits.count <= m.limits.per_source
        finally:
            for w in idle:
                w.close()
            await m.stop()

    asyncio.run(main())


def test_real_daemon_socket_mode_and_garbage(tmp_path: Path) -> None:
    d = tempfile.mkdtemp(prefix="ipsecct-c-", dir="/tmp")
    sock = os.path.join(d, "gw.sock")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(node_toml("gw", free_udp_port(), free_udp_port(), free_udp_port(), sock, []))
    gw = Daemon("gateway", cfg, sock, tmp_path / "gw.log")
    try:
        gw.start()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert gw.proc is not None  # no core file with its keys (limits.no_core_dumps)
        limits = Path(f"/proc/{gw.proc.pid}/limits").read_text()
        assert next(x for x in limits.splitlines() if x.startswith("Max core file size")
                    ).split()[4:6] == ["0", "0"]  # fmt: skip
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(sock)
            s.sendall(b"\x00\xff garbage\n")
            ans = json.loads(s.makefile("rb").readline())
            assert ans["ok"] is False and "not JSON" in ans["error"]
        r = subprocess.run(
            [sys.executable, "-m", "ipsecct", "status", "--json", "-s", sock],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0 and json.loads(r.stdout)["name"] == "gw"
        # A command its configuration does not enable says what is missing (it said
        # "unknown command 'failover.alone'"); "ike.list" says the node runs no IKEv2 (sa list
        # asks it every time, and a refusal was a logged warning each time)
        for cmd, section in (("failover.alone", "[failover]"), ("transfer", "[transfer]"),
                             ("rebalance", "[transfer]"), ("ike.list", None)):  # fmt: skip
            with pytest.raises(ControlError) as ei:
                request(sock, cmd, {"standby_is_down": True})
            assert (f"no {section} section" if section else "runs no IKEv2") in str(ei.value)
        # SIGHUP reloads the configuration (its default killed the gateway at once, without
        # a log line or its socket removed; then it drained and exited like SIGTERM)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        until(lambda: "event=reloaded" in gw.logtext(), "the reload", 30)
        assert gw.proc.poll() is None and request(sock, "status")["config"]["reloads"] == 1
        assert "event=shutdown" not in gw.logtext()
        assert gw.terminate() == 0
        assert not os.path.exists(sock)
        assert "event=shutdown" in gw.logtext()
    finally:
        gw.cleanup()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    ("config_level", "args", "shown", "hidden"),
    [
        ("debug", ["--log-level", "warning"], [], [" INFO ", " DEBUG "]),
        ("error", ["--log-level", "info"], [" INFO "], [" DEBUG "]),
        ("error", ["-v"], [" INFO "], []),
        ("error", [], [], [" INFO ", " DEBUG "]),
    ],
)
def test_daemon_log_level_overrides_the_configuration(
    tmp_path: Path, config_level: str, args: list[str], shown: list[str], hidden: list[str]
) -> None:
    d = tempfile.mkdtemp(prefix="ipsecct-c-", dir="/tmp")
    sock = os.path.join(d, "gw.sock")
    cfg = tmp_path / "gw.toml"
    text = node_toml("gw", free_udp_port(), free_udp_port(), free_udp_port(), sock, [])
    cfg.write_text(text.replace('level = "debug"', f'level = "{config_level}"'))
    gw = Daemon("gateway", cfg, sock, tmp_path / "gw.log", args=args)
    try:
        gw.start()
        assert gw.terminate() == 0
        log = gw.logtext()
        assert "event=started" in log or not shown  # the start line is logged at info
        for level in shown:
            assert level in log, log
        for level in hidden:
            assert level not in log, log
    finally:
        gw.cleanup()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(("args", "after"), [([], "warning"), (["--log-level", "info"], "info")])
def test_a_sighup_sets_the_files_log_level_unless_the_command_line_gave_one(
    tmp_path: Path, args: list[str], after: str
) -> None:
    d = tempfile.mkdtemp(prefix="ipsecct-c-", dir="/tmp")
    sock = os.path.join(d, "gw.sock")
    cfg = tmp_path / "gw.toml"
    text = node_toml("gw", free_udp_port(), free_udp_port(), free_udp_port(), sock, [])
    cfg.write_text(text)
    gw = Daemon("gateway", cfg, sock, tmp_path / "gw.log", args=args)
    try:
        gw.start()
        cfg.write_text(text.replace('level = "debug"', 'level = "warning"'))
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        until(lambda: request(sock, "status")["config"]["reloads"] == 1, "the reload", 30)
        assert request(sock, "status")["config"]["log_level"] == after
        assert gw.terminate() == 0
        assert ("event=shutdown" in gw.logtext()) == (after == "info"), gw.logtext()
    finally:
        gw.cleanup()
        shutil.rmtree(d, ignore_errors=True)


def test_daemon_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(node_toml("gw", 1, 2, 3, str(tmp_path / "s"), []))
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", "gateway", "run", "-c", str(cfg), "--log-level", "loud"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--log-level" in r.stderr, r.stderr


def test_request_when_the_daemon_drops_the_connection() -> None:
    """A daemon that closes without reading (exiting) resets the connection: ControlError."""
    import threading

    path = short_path()
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.recv(1)  # read one octet of the request, leave the rest unread, hang up
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(ControlError):
            request(path, "status", {"pad": "x" * 100000}, timeout=10)
    finally:
        t.join(10)
        srv.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


@pytest.mark.parametrize("env", ["", "1"])
def test_no_core_dumps_unless_asked(env: str) -> None:
    """A gateway or node that crashed could write its SA keys and pre-shared keys to a core
    file (systemd-coredump keeps them on disk); other processes of its user could read its
    memory and environment. IPSECCT_DUMPABLE=1 keeps them, to debug a crash."""
    code = (
        "import ctypes, resource; from ipsecct.gateway.limits import no_core_dumps;"
        "print(no_core_dumps(), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),"  # PR_GET_DUMPABLE
        " resource.getrlimit(resource.RLIMIT_CORE)[0])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "IPSECCT_DUMPABLE": env})  # fmt: skip
    assert r.returncode == 0, r.stderr
    applied, dumpable, core = r.stdout.split()
    if env == "1":
        assert applied == "False" and dumpable == "1"
    else:
        assert (applied, dumpable, core) == ("True", "0", "0")


def test_request_async_answers_and_errors_like_request() -> None:
    """The demo's client on an event loop: the same answers and the same one-line errors as
    the blocking :func:`request`, and the loop goes on while it waits."""
    from ipsecct.gateway.control import request_async

    async def body(srv: ControlServer, path: str) -> None:
        assert await request_async(path, "echo", {"a": 1}) == {"echo": {"a": 1}}
        with pytest.raises(ControlError, match="no such SA"):
            await request_async(path, "sa")
        with pytest.raises(ControlError, match="unknown command"):
            await request_async(path, "nope")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        async def slow(args: dict[str, Any]) -> Any:
            await asyncio.sleep(0.2)
            return "late"

        srv.register("slow", slow)
        t = asyncio.create_task(tick())
        assert await request_async(path, "slow") == "late"
        t.cancel()
        assert ticks > 10  # the loop ran meanwhile
        with pytest.raises(ControlError, match=r"no answer .* within 0\.05 s"):
            await request_async(path, "slow", timeout=0.05)
        with pytest.raises(ControlError, match="no such file"):
            await request_async(path + ".none", "echo")

    with_server(body)

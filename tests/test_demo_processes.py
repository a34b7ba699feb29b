"""``ipsecct demo`` runs each gateway as ``ipsecct gateway run`` in a process of its own: the
configuration it writes, the clock the handover is timed on, and no gateway process outliving
the demo, whatever way the demo ends (a gateway that does not come up, Ctrl-C, SIGTERM,
SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ipsecct import cli
from ipsecct.demo import processes, topology
from ipsecct.errors import DemoError


def test_a_demo_configuration_written_as_toml_reads_back_the_same(tmp_path: Path) -> None:
    """Tables, arrays of tables, nested tables (an IKE connection), lists, booleans and keys
    that need quoting survive the writer; the file is what the gateway loads, and 0600."""
    sections: dict[str, Any] = {
        "transfer": {"listen": "127.0.1.1:4000", "max_transfer_ms": 5000},
        "peers": [{"name": "sg2", "address": "127.0.1.2:4000", "outer": "127.0.1.2"}],
        **topology._ike_sections("/k/ike.psk", topology.SG_ID, topology.MN_ID, "home", {
            "remote_addrs": ["%any"],
            "children": {"home": {"local_ts": ["10.2.0.0/24"], "esp_proposals": ["x"]}}}),
        "failover": {"role": "active", "peer": "sg2"},
        "odd keys": {"a.b": True, "c": False, "quote\"d": 'va"l\\ue'},
    }  # fmt: skip
    tunnels = [{"name": "mn1", "spi_in": 0x10000001, "esn": True, "local_ts": "10.2.0.0/24"}]
    data = topology.node_data("sg1", "127.0.1.1", 4500, 7000, 7001, tunnels, sections)
    assert tomllib.loads(processes.to_toml(data)) == data
    p = processes.GatewayProcess("sg1", tmp_path, data)
    assert tomllib.loads(p.config.read_text()) == {**data, "control": {"socket": p.socket}}
    assert p.config.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):
        processes.to_toml({"t": [{"nested": {"no": 1}}]})


def test_monotonic_is_one_clock_for_every_process() -> None:
    """The demo times a handover from its own clock to the target gateway's record: both
    are CLOCK_MONOTONIC, one clock for the processes of a machine (one time namespace)."""
    before = time.monotonic()
    r = subprocess.run([sys.executable, "-c", "import time; print(repr(time.monotonic()))"],
                       capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    after = time.monotonic()
    assert before <= float(r.stdout) <= after


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


def test_a_gateway_that_exits_at_start_is_one_line_with_its_log(tmp_path: Path) -> None:
    """A gateway that refuses its configuration: the wait ends as soon as it exits, with one
    line naming it, its exit status and the end of its log; nothing is left running."""
    data = topology.node_data("sg1", "127.0.1.1", 0, topology.free_udp_port(), 9, [])
    data["outer"]["port"] = "not a port"
    p = processes.GatewayProcess("sg1", tmp_path, data)

    async def main() -> None:
        p.start()
        try:
            with pytest.raises(DemoError) as e:
                await p.wait_up(60)
        finally:
            processes.stop_all([p])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("gateway sg1 exited with status 2"), msg
        assert "outer.port" in msg, msg  # the gateway's own error line, from its log

    asyncio.run(main())
    assert p.proc is not None and p.proc.returncode == 2


def test_the_demo_with_a_gateway_not_up_in_time_is_one_line_and_no_orphans(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--start-timeout`` bounds the wait for each gateway: past it the demo stops with one
    line on stderr (exit status 2) and every gateway process it started is stopped and
    reaped."""
    started: list[processes.GatewayProcess] = []
    real = processes.GatewayProcess.start

    def spy(self: processes.GatewayProcess) -> None:
        real(self)
        started.append(self)

    monkeypatch.setattr(processes.GatewayProcess, "start", spy)
    rc = cli.main(["demo", "--seconds", "1", "--rate", "50", "--start-timeout", "0.01"])
    out, err = capsys.readouterr()
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith("ipsecct: error: gateway sg")
    assert "did not answer on its control socket within 0.01 s (its log:" in line
    assert "mn->host" not in out
    assert [p.name for p in started] == ["sg1", "sg2"]
    for p in started:
        assert p.proc is not None and p.proc.returncode is not None  # reaped
        assert not _pid_alive(p.proc.pid)


def _until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return out


def _gateways(pid: int) -> list[int]:
    """The children of ``pid`` that are gateways (not the stream's sender)."""
    out = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"gateway" in f.read().split(b"\0"):
                    out.append(child)
        except OSError:
            continue
    return out


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGINT, "running"), (signal.SIGTERM, "starting"), (signal.SIGKILL, "starting")],
)
def test_the_demo_ended_mid_run_leaves_no_gateway_process(sig: signal.Signals, when: str) -> None:
    """Ctrl-C (SIGINT) while the stream runs, or SIGTERM while the gateways start: the demo
    stops its gateways and the stream's sender on the way out and exits with 130 / 143, no
    traceback. SIGKILL: the kernel kills the gateways (their parent-death signal) and the
    sender ends with its input."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "ipsecct", "demo", "--seconds", "60", "--rate", "20",
         "--keying", "manual", "--handover", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as at a terminal: a test run started in the background by a script (an
        # asynchronous list of a non-interactive shell) has SIGINT ignored, the demo inherited
        # that and rightly ignored the signal, running its 60 s to the end.
        preexec_fn=_sigint_default,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        if when == "running":
            first = demo.stdout.readline()  # the banner: the gateways answered before it
            assert "ipsecct demo:" in first, first
            # the first live line: the stream's sender runs
            assert "mn->host" in demo.stdout.readline()
        else:
            assert _until(lambda: len(_gateways(demo.pid)) == 2, 60)
        gateways = _gateways(demo.pid)
        assert len(gateways) == 2, gateways
        children = _children(demo.pid)
        assert len(children) == (3 if when == "running" else 2), children
        demo.send_signal(sig)
        rc = demo.wait(60)
        assert rc == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig]
        assert _until(lambda: not any(_pid_alive(g) for g in children), 30), children
        if sig != signal.SIGKILL:
            assert demo.stderr is not None
            assert "Traceback" not in demo.stderr.read()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

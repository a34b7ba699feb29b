"""``ipsecct demo --json``: one JSON object with issue 3's exact schema, nothing lost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.data_path import without_extensions


def test_demo_json_schema_and_no_loss() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipsecct",
            "demo",
            "--seconds",
            "2",
            "--rate",
            "200",
            "--json",
            "--handover",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout  # only the summary
    s = json.loads(lines[0])
    # issue 3's keys first; the IKE SA's figures after them (IKEv2 keying, the default)
    assert list(s) == ["packets", "drops", "handovers", "scheduling", "ike"]
    # each node's forwarding thread as the kernel has it (the demo asks for fifo:1; root here)
    assert s["scheduling"] == {"sender": "fifo:2", "mn": "fifo:1", "sg1": "fifo:1",
                               "sg2": "fifo:1"}  # fmt: skip
    assert list(s["packets"]) == ["sent", "received", "lost", "duplicated"]
    assert list(s["drops"]) == ["replay", "icv", "no_sa", "policy"]
    for group in ("packets", "drops"):
        assert all(type(v) is int for v in s[group].values()), s
    p = s["packets"]
    assert p["sent"] == 2 * 200 * 2  # both directions
    assert p["received"] == p["sent"] and p["lost"] == 0 and p["duplicated"] == 0
    assert s["drops"] == {"replay": 0, "icv": 0, "no_sa": 0, "policy": 0}
    assert s["handovers"] == []


def test_demo_human_output_has_live_lines_and_summary() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ipsecct",
            "demo",
            "--seconds",
            "1",
            "--rate",
            "100",
            "--handover",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "mn->host" in out and "via sg1" in out
    assert "summary" in out and "packets lost" in out
    lost = next(line for line in out.splitlines() if "packets lost" in line)
    assert lost.split()[-1] == "0"


def test_demo_rejects_bad_arguments() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", "demo", "--rate", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_longest_gap_counts_the_pauses_that_span_the_window() -> None:
    """A handover's gap_ms: the longest pause between arrivals in its window, the pauses that
    cross either end of it included."""
    from ipsecct.demo.topology import _Arrivals

    arr = _Arrivals()
    arr.times.extend([1.0, 1.001, 1.010, 1.011, 1.5])
    assert arr.longest_gap(1.0005, 1.0105) == pytest.approx(0.009)
    assert arr.longest_gap(1.02, 1.03) == pytest.approx(0.489)
    assert _Arrivals().longest_gap(0.0, 1.0) == 0.0


def test_the_stream_gap_is_the_longest_pause_of_the_whole_stream() -> None:
    """gap_ms: the longest pause between new packets over the whole stream, wherever it is,
    and a stream that stopped arriving before its end counts the pause until that end."""
    from ipsecct.demo.sender import packet as _packet
    from ipsecct.demo.topology import _App

    app = _App("x", 0)
    clock = iter([1.0, 1.001, 1.4, 1.401, 1.402])
    app.clock = lambda: next(clock)
    for seq in range(1, 6):
        app.datagram_received(_packet(1, seq), ("127.0.0.1", 1))
    for arr in (app.net, app.read):  # no kernel time given: both are the read time
        gap, start = arr.stream_gap(1.402)
        assert gap == pytest.approx(0.399) and start == pytest.approx(1.001)
        gap, start = arr.stream_gap(2.0)  # nothing arrived after 1.402 until the end at 2.0
        assert gap == pytest.approx(0.598) and start == pytest.approx(1.402)


def test_the_demos_free_ports_are_never_handed_out_twice() -> None:
    """Two bind(0) in a row may get the same port from the kernel (the first socket is closed
    by then): the demo picks a dozen before binding any, and two nodes given one port failed
    with "address in use". 2,000 picks in the ephemeral range repeat about 70 times without
    the record of what was handed out."""
    from ipsecct.demo.topology import free_tcp_port, free_udp_port

    udp = [free_udp_port() for _ in range(2000)]
    tcp = [free_tcp_port() for _ in range(500)]
    assert len(set(udp)) == len(udp) and len(set(tcp)) == len(tcp)


def test_demo_prepared_handover_commits_at_the_handover_and_says_so() -> None:
    """``--prepare-ahead``: the transfer is prepared before the handover and committed at
    it; the JSON says so, with the preparation's time apart; nothing lost or replayed."""
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", "demo", "--seconds", "2", "--rate", "200", "--json",
         "--prepare-ahead", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.splitlines()[-1])
    (h,) = s["handovers"]
    assert h["prepared"] is True and h["prepared_ahead_s"] == 0.5 and h["prepare_ms"] > 0, h
    assert h["lost"] == 0 and s["packets"]["lost"] == 0 and s["drops"]["replay"] == 0, s
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", "demo", "--seconds", "2", "--prepare-ahead", "1.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--prepare-ahead" in r.stderr, r.stderr


def test_demo_handover_is_predictive_by_default_and_reactive_on_request() -> None:
    """The default handover is prepared a second ahead and committed at the handover
    (predictive); ``--reactive`` runs the whole transfer at the handover. The JSON and the
    human summary say which ran; --reactive with a preparation is one line, exit 2."""
    def demo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ipsecct", "demo", "--seconds", "2", "--rate", "200", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    r = demo("--json", "--keying", "manual")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.splitlines()[-1])
    (h,) = s["handovers"]
    assert h["context_transfer"] == "predictive" and h["prepared"] is True, h
    assert h["prepared_ahead_s"] == 1.0 and h["prepare_ms"] > 0 and h["lost"] == 0, h
    r = demo("--reactive", "--keying", "manual")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("handover sg1"))
    assert "(direct, reactive)" in line and "prepared" not in line, r.stdout
    assert "handover: direct (reactive)" in r.stdout, r.stdout
    r = demo("--reactive", "--prepared")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--reactive" in r.stderr, r.stderr


def test_the_stream_apps_keep_the_backlog_of_a_stalled_demo_process() -> None:
    """The demo's process may not run for a few hundred ms on a loaded machine: the stream's
    packets wait in its applications' sockets meanwhile. Those take 4 MiB (as a node's do;
    at least 416 KiB where the kernel caps buffers at its default) and drain in batches:
    asyncio's datagram endpoint kept 256 of the stream's datagrams, and a stall of 0.4 s
    lost some 800 packets that no gateway dropped. 400 datagrams queued while the loop does
    not run all arrive."""
    import asyncio
    import socket

    from ipsecct.demo.sender import packet as _packet
    from ipsecct.demo.topology import _App, free_udp_port

    async def body() -> int:
        app = _App("x", 0)
        port = free_udp_port()
        app.open(port)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for seq in range(1, 401):  # the loop does not run meanwhile
                    s.sendto(_packet(1, seq), ("127.0.0.1", port))
            for _ in range(500):
                if len(app.received) == 400:
                    break
                await asyncio.sleep(0.01)
            return len(app.received)
        finally:
            assert app.transport is not None
            app.transport.close()

    assert asyncio.run(body()) == 400


def _gap_demo() -> Any:
    """A Demo with its two applications and nothing else (no node runs: what the gap
    figures read), and a function that delivers packet ``seq`` to both at time ``t``."""
    from types import SimpleNamespace

    from ipsecct.demo.sender import packet as _packet
    from ipsecct.demo.topology import Demo, _App

    now = [0.0]
    host, mn = _App("host", 1), _App("mn-app", 0)
    for app in (host, mn):
        app.clock = lambda: now[0]
    stats = SimpleNamespace(engine=SimpleNamespace(stats=SimpleNamespace(drops={})))
    d = Demo(Path("."), SimpleNamespace(node=stats), {}, host, mn, 0, 0)  # type: ignore[arg-type]

    def deliver(seq: int, t: float) -> None:
        now[0] = t
        host.datagram_received(_packet(0, seq), ("127.0.0.1", 1))
        mn.datagram_received(_packet(1, seq), ("127.0.0.1", 1))

    return d, deliver


def test_the_baseline_ends_where_the_preparation_starts() -> None:
    """baseline_gap_ms is the stream's floor before any handover work: a predictive
    handover's preparation (a second ahead) is handover work, so the baseline ends where it
    starts; its own pause is prepare_gap_ms (from its start to the commit) and, as every
    pause, counts in gap_ms. (The baseline ran up to the commit and so held the
    preparation's pause: a floor that was not one.)"""
    from ipsecct.demo.topology import summary

    d, deliver = _gap_demo()
    t, seq = 1.0, 0
    for step in [0.001] * 30 + [0.004] + [0.001] * 69:  # a 4 ms pause: the floor
        seq, t = seq + 1, t + step
        deliver(seq, t)
    d.start_preparing(t)
    for step in [0.001] * 50 + [0.020] + [0.001] * 100:  # the preparation's 20 ms pause
        seq, t = seq + 1, t + step
        deliver(seq, t)
    trigger = t
    d.watch_gaps()  # the handover (its commit)
    d.handovers.append({"prepared": True})
    d.handover_times.append((trigger, trigger + 0.005))
    for _ in range(100):
        seq, t = seq + 1, t + 0.001
        deliver(seq, t)
    d.ended = t
    (h,) = summary(d)["handovers"]
    assert h["baseline_gap_ms"] == pytest.approx(4.0)
    assert h["prepare_gap_ms"] == pytest.approx(20.0)
    assert h["gap_ms"] == pytest.approx(20.0)
    assert h["handover_gap_ms"] == pytest.approx(1.0)
    # a handover with no baseline taken before it (driven without the stream): it ends there
    d, deliver = _gap_demo()
    for seq in range(1, 101):
        deliver(seq, 1.0 + 0.001 * seq + (0.006 if seq > 80 else 0.0))
    d.watch_gaps()
    d.handovers.append({"prepared": False})
    d.handover_times.append((1.2, 1.21))
    (h,) = summary(d)["handovers"]
    assert h["baseline_gap_ms"] == pytest.approx(7.0) and "prepare_gap_ms" not in h


def test_a_preparation_that_starts_with_the_stream_leaves_no_baseline() -> None:
    """A preparation as early as the stream's start (``--seconds 2`` and the default lead of
    1 s) leaves no window before it: the baseline is null, not a 0 ms floor."""
    from ipsecct.demo.topology import summary

    d, deliver = _gap_demo()
    deliver(1, 1.0)
    d.start_preparing(1.0)
    for seq in range(2, 50):
        deliver(seq, 1.0 + 0.001 * (seq - 1))
    d.watch_gaps()
    d.handovers.append({"prepared": True})
    d.handover_times.append((1.03, 1.035))
    d.ended = 1.05
    (h,) = summary(d)["handovers"]
    assert h["baseline_gap_ms"] is None
    assert h["prepare_gap_ms"] == pytest.approx(1.0)


@pytest.mark.parametrize("prepare_ahead", [0.0, 1.2])
def test_the_stream_ends_the_baseline_a_lead_before_the_handover_in_every_mode(
    prepare_ahead: float,
) -> None:
    """The stream ends the baseline BASELINE_LEAD (1 s) before its half-way handover whether
    or not anything is prepared (one window for every mode: a reactive baseline as long as a
    predictive one's), or at the preparation if that starts earlier. Counted in packets, not
    time: the arrivals recorded from the baseline's end until the handover starts are those
    of up to the lead (the paced stream's 200 packets/s), and none before the baseline."""
    from ipsecct.demo.topology import stream

    d, _ = _gap_demo()

    class Link:  # the stream's packets reach the other application at once
        def __init__(self, to: Any) -> None:
            self.to = to

        def sendto(self, data: bytes, addr: Any) -> None:
            self.to.datagram_received(data, addr)

    d.mn_app.transport, d.host_app.transport = Link(d.host_app), Link(d.mn_app)
    d.mn.inner_port = 1
    d.prepare_ahead = prepare_ahead
    seen: dict[str, Any] = {}
    for app in (d.host_app, d.mn_app):
        app.clock = time.monotonic

    async def prepare() -> None:
        seen["prepare"] = (list(d.baseline_gaps), len(d.host_app.net.times))

    async def half() -> None:
        seen["half"] = (list(d.baseline_gaps), len(d.host_app.net.times))

    asyncio.run(stream(d, 200, 4.0, out=None, at_half=half,
                       before_half=prepare if prepare_ahead else None))  # fmt: skip
    baseline, recorded = seen["half"]
    assert len(baseline) == 1 and baseline[0] is not None
    lead = max(prepare_ahead, 1.0)
    # (a baseline at the handover: 1; at the stream's start: all 400; a late loop sends more)
    assert 50 < recorded <= (lead + 0.5) * 200
    if prepare_ahead:  # the preparation came after the baseline's end (at it, here)
        assert seen["prepare"][0] == baseline and seen["prepare"][1] <= 2


def test_the_receivers_record_the_kernels_arrival_time_beside_their_own() -> None:
    """gap_ms is the pause the network made, not the demo's process: each packet's arrival
    as the kernel stamped it (SO_TIMESTAMPNS, what a capture shows), beside when the
    demo's event loop read it (app_gap_ms). Packets sent 2 ms apart while the loop does not
    run: each kernel time falls within its own sendto call, and the pauses between them are
    the sender's; every read time is after the last send."""
    import asyncio
    import itertools
    import socket

    from ipsecct.demo.sender import packet as _packet
    from ipsecct.demo.topology import _App, free_udp_port

    async def body() -> tuple[list[tuple[float, float]], list[float], list[float]]:
        app = _App("x", 0)
        port = free_udp_port()
        app.open(port)
        app.watch()
        spans = []
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for seq in range(1, 6):  # the loop does not run meanwhile
                    t0 = time.monotonic()
                    s.sendto(_packet(1, seq), ("127.0.0.1", port))
                    t1 = time.monotonic()
                    spans.append((t0, t1))
                    while time.monotonic() < t1 + 0.002:
                        pass
            for _ in range(500):
                if len(app.received) == 5:
                    break
                await asyncio.sleep(0.01)
            return spans, list(app.net.times), list(app.read.times)
        finally:
            assert app.transport is not None
            app.transport.close()

    def within(spans: list[tuple[float, float]], net: list[float]) -> bool:
        return all(t0 - 0.0005 <= t <= t1 + 0.0005  # (the real-time clock, converted)
                   for (t0, t1), t in zip(spans, net, strict=True))  # fmt: skip

    # Twice in many runs under load (CI 2026-12-03 once before 744c00e, an engineer's run at
    # load 10-15 after it) one kernel time lay ~10 ms after its sendto had returned, though
    # the real-time/monotonic offset held still (sampled every ms for 20 s: no jump) and
    # loopback stamps a datagram inside sendto: cause not found (this VM's clocks?), not the
    # conversion. The probe is tried up to three times; one clean probe shows the stamps are
    # the kernel's arrival times, not the loop's.
    probes = []
    for _ in range(3):
        spans, net, read = asyncio.run(body())
        assert len(net) == len(read) == 5
        assert min(read) >= spans[-1][1]  # (read only once the loop ran: after every send)
        probes.append((spans, net))
        if within(spans, net):
            break
    assert within(spans, net), probes
    assert min(b - a for a, b in itertools.pairwise(net)) >= 0.0015


def test_the_stream_sender_sends_every_packet_both_ways_and_follows_the_route(
    tmp_path: Path,
) -> None:
    """``ipsecct demo``'s stream comes from a process of its own on absolute deadlines
    (demo/sender.py), on the applications' sockets: every packet each way once and in
    order, the host's to the new gateway from the route's change on (``peer``), its count
    and lateness reported, and it exits when the demo ends its input (after the stream's
    last packets arrived, not while they are on their way)."""
    import asyncio
    import socket

    from ipsecct.demo.sender import PAYLOAD, SenderProcess
    from ipsecct.ipsec.ippacket import parse, udp_payload

    def seqs(got: list[bytes], direction: int) -> list[int]:
        out = []
        for data in got:
            _, _, body = udp_payload(data, parse(data))
            d, seq, _ = PAYLOAD.unpack_from(body)
            assert d == direction
            out.append(seq)
        return out

    async def body() -> tuple[list[list[bytes]], tuple[int, float, float, int], int | None]:
        loop = asyncio.get_running_loop()
        socks = []
        for _ in range(5):  # the MN's link, two gateways' links; the two applications
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
        mn_link, gw1, gw2, mn_app, host_app = socks
        got: list[list[bytes]] = [[], [], []]
        def reader(s: socket.socket, into: list[bytes]) -> None:
            into.append(s.recv(2048))

        for s, into in zip(socks[:3], got, strict=True):
            loop.add_reader(s.fileno(), reader, s, into)
        sender = await SenderProcess.start(
            mn_app, host_app, 500, 200, mn_link.getsockname()[1], gw1.getsockname()[1],
            tmp_path / "sender.log",
        )  # fmt: skip
        try:
            sender.go(time.monotonic() + 0.02)
            for _ in range(1000):
                if sender.sent >= 100 or sender.done.done():
                    break
                await asyncio.sleep(0.01)
            sender.peer(gw2.getsockname()[1])  # the access network's route moves
            result = await sender.finish(30.0)
            for _ in range(500):
                if len(got[0]) == 200 and len(got[1]) + len(got[2]) == 200:
                    break
                await asyncio.sleep(0.01)
            assert sender.proc.poll() is None  # it waits for the end of its input
            sender.close()
            return got, result, sender.proc.returncode
        finally:
            sender.close()
            for s in socks:
                loop.remove_reader(s.fileno())
                s.close()

    got, (sent, ended, late, unsent), rc = asyncio.run(body())
    assert (sent, unsent, rc) == (200, 0, 0)
    assert ended > 0 and late >= 0
    assert seqs(got[0], 0) == list(range(1, 201))
    before, after = seqs(got[1], 1), seqs(got[2], 1)
    assert before and after and before + after == list(range(1, 201))


def test_the_stream_sender_ends_with_its_input_and_refuses_junk_in_one_line() -> None:
    """The sender never outlives the demo (it stops at the end of its input, the demo's
    end or death) and a bad argument or command is one line on stderr and exit status 2."""
    import socket

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "ipsecct.demo.sender", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, pass_fds=fds,
        )  # fmt: skip

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM
    ) as b, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port = str(sink.getsockname()[1])
        fds = (a.fileno(), b.fileno())
        argv = [str(a.fileno()), str(b.fileno()), "1000", "1000000", port, port]
        p = start(*argv)
        assert p.stdin is not None and p.stdout is not None
        assert p.stdout.readline().startswith("ready")
        p.stdin.write(f"go {time.monotonic_ns()}\n")
        p.stdin.flush()
        p.stdin.close()  # the demo is gone
        assert p.wait(30) == 0
        for args, line in [
            (argv[:5], None),
            ([*argv[:4], "0", port], None),
            (argv, "go later\n"),
            (argv, "reroute 7\n"),
        ]:
            p = start(*args)
            out, err = p.communicate(line or "", timeout=30)
            assert p.returncode == 2, (args, line, out, err)
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_the_realtime_offset_is_read_within_a_tight_bracket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel's arrival times are real-time: the demo converts them with the offset of the
    two clocks, read between two monotonic readings, the tightest of three. A preemption
    between one pair of reads (13 ms, simulated) does not move the offset."""
    import types

    import ipsecct.demo.topology as topo

    mono = iter([1_000, 2_000 + 13_000_000, 3_000_000_000, 3_000_000_400])
    real = iter([9_000_000_000_000, 9_003_000_000_200])
    fake = types.SimpleNamespace(monotonic_ns=lambda: next(mono), time_ns=lambda: next(real))
    monkeypatch.setattr(topo, "time", fake)
    assert topo.realtime_offset_ns() == 9_003_000_000_200 - 3_000_000_200


def test_the_demo_runs_without_the_c_extensions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed without a compiler (no .so file, IPSECCT_PURE_PYTHON unset): the demo, its
    gateways and its IKE SA run on the Python paths, a handover included, and lose nothing."""
    without_extensions(tmp_path, monkeypatch)
    r = subprocess.run(
        [sys.executable, "-m", "ipsecct", "demo", "--seconds", "2", "--rate", "200", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    p = s["packets"]
    assert p["sent"] == 2 * 200 * 2 and p["received"] == p["sent"] and p["lost"] == 0, s
    assert s["drops"] == {"replay": 0, "icv": 0, "no_sa": 0, "policy": 0}
    assert [(h["from"], h["to"], h["lost"]) for h in s["handovers"]] == [("sg1", "sg2", 0)]
    assert s["ike"]["child"]["proposal"] == "AES_GCM_16_128/EXT_SEQ"

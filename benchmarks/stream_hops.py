"""Which node held the demo stream's longest pauses: ``ipsecct demo --json`` with every hop of
the stream captured on ``lo``, each pause over a bound followed hop by hop.

    .venv/bin/python -m benchmarks.stream_hops [--min-ms 3] [--out DIR] [-- DEMO ARGS...]

Runs what ``ipsecct demo --json [DEMO ARGS]`` runs, in this process (the demo's process: the
MN's node, the receivers; the gateways and the sender are processes of their own), with
``tcpdump -i lo --time-stamp-precision=nano`` on the demo's ports only (started once the
demo has picked them, before the stream; other work on ``lo`` is not captured). Each
stream packet is followed through the hops of its direction by its sequence number (the
inner packets' payload; the ESP packets' sequence number, which the SA's sender gives
each stream packet in order: the offset between the two is found per SPI):

    MN -> host: sender -> MN node (app>MN), MN -> sg1/sg2 (ESP), sg1 -> sg2 (ESP relayed
                after the cut), sg -> host (inner)
    host -> MN: sender -> sg1/sg2 (host>sg), sg -> MN (ESP), MN node -> app (MN>app)

For every pause of a receiver longer than ``--min-ms`` (arrival to arrival, kernel times:
what ``gap_ms`` measures), it prints the packet that ended it, the time it spent at each
node (from the hop into the node to the hop out of it) and which node held it longest,
and the gateways' log lines within 10 ms of the pause. ``gap_at_ms`` of the demo's summary
is on the same clock (ms from the handover's trigger).

Writes into ``--out`` (default: a new directory under /tmp): ``cap.pcap``, the gateways'
and the sender's logs (``sg1.log``, ``sg2.log``, ``sender.log``: kept from the demo's run
directory, which the demo removes), ``run.json`` (the demo's summary, its ports and times),
and ``hops.txt`` (what is printed). ``--pcap DIR`` analyses such a directory again without
running anything. The capture holds no key material (ESP stays encrypted; the gateways' logs
hold none either). Needs root (tcpdump on lo).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import io
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

PAYLOAD = struct.Struct("!BIQ")  # the stream's payload (ipsecct.demo.sender.PAYLOAD)
LOG_WINDOW = 0.010  # seconds either side of a pause whose gateway log lines are printed


# -- running the demo ------------------------------------------------------------------------


def _offset_ns() -> int:
    a = time.monotonic_ns()
    r = time.time_ns()
    b = time.monotonic_ns()
    return r - (a + b) // 2


# Loaded by every process of the demo (PYTHONPATH) with --callbacks: each event-loop callback
# over SLOW_S and each collection of the garbage collector over SLOW_GC_S, one JSON line each
# (monotonic start, wall and thread-CPU ms, what ran) into DIR/cb-PID.jsonl.
SITE = """
import asyncio, gc, json, os, time
_dir = os.environ.get("STREAM_HOPS_DIR")
if _dir:
    _f = open(os.path.join(_dir, f"cb-{os.getpid()}.jsonl"), "a", buffering=1)
    _run = asyncio.events.Handle._run
    def _timed(self):
        a = time.monotonic(); c = time.thread_time()
        _run(self)
        b = time.monotonic()
        if b - a > %(slow)r:
            _f.write(json.dumps({"t": a, "ms": (b - a) * 1e3, "cpu_ms": (time.thread_time() - c)
                                 * 1e3, "what": repr(self)[:300]}) + "\\n")
    asyncio.events.Handle._run = _timed
    _gc = {}
    def _on_gc(phase, info):
        if phase == "start":
            _gc["t"] = time.monotonic()
        elif "t" in _gc and time.monotonic() - _gc["t"] > %(slow_gc)r:
            _f.write(json.dumps({"t": _gc["t"], "ms": (time.monotonic() - _gc["t"]) * 1e3,
                                 "what": f"gc generation {info['generation']}"}) + "\\n")
    gc.callbacks.append(_on_gc)
    import threading
    _trun = threading.Thread.run
    def _named(self):
        _f.write(json.dumps({"thread": self.name, "tid": threading.get_native_id()}) + "\\n")
        _trun(self)
    threading.Thread.run = _named
"""
SLOW_S = 0.0005
SLOW_GC_S = 0.0002

SCHED_EVENTS = ("sched:sched_switch", "sched:sched_wakeup", "sched:sched_waking",
                "sched:sched_wakeup_new", "sched:sched_migrate_task")


def run_demo(out: Path, demo_args: list[str], sched: bool = False,
             callbacks: bool = False) -> dict[str, Any]:  # fmt: skip
    """``ipsecct demo --json DEMO_ARGS`` in this process, captured; returns run.json's data."""
    if callbacks:
        site = out / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITE % {"slow": SLOW_S, "slow_gc": SLOW_GC_S})
        os.environ["STREAM_HOPS_DIR"] = str(out)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
        exec(compile((site / "sitecustomize.py").read_text(), "sitecustomize", "exec"), {})
    from ipsecct import cli
    from ipsecct.demo import topology
    from ipsecct.demo import tour as tour_mod

    tour: Any = tour_mod  # its build, stop and run are wrapped for the run
    state: dict[str, Any] = {}
    orig_build, orig_stop = tour.build, tour.stop

    async def build(*a: Any, **k: Any) -> topology.Demo:
        demo: topology.Demo = await orig_build(*a, **k)
        state["demo"] = demo
        ports: dict[str, Any] = {"mn": [demo.mn.outer_port, demo.mn.inner_port],
                 **{g: list(p) for g, p in demo.gw_ports.items()},
                 "host_app": demo.host_port, "mn_app": demo.mn_app_port}  # fmt: skip
        state["ports"] = ports
        flat = sorted({int(p) for v in ports.values()
                       for p in (v if isinstance(v, list) else [v])})  # fmt: skip
        filt = "udp and (" + " or ".join(f"port {p}" for p in flat) + ")"
        cap = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-B", "32768", "--time-stamp-precision=nano",
             "-U", "-w", str(out / "cap.pcap"), filt],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        state["cap"] = cap
        assert cap.stderr is not None
        line = await asyncio.get_running_loop().run_in_executor(None, cap.stderr.readline)
        if b"listening" not in line:
            raise SystemExit(f"stream_hops: tcpdump did not start: {line.decode().strip()}")
        state["pids"] = {"MN": os.getpid(), **{g: p.pid for g, p in demo.procs.items()}}
        if sched:
            # the scheduler's switches and wake-ups of every CPU, on CLOCK_MONOTONIC
            perf = subprocess.Popen(
                ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-o",
                 str(out / "sched.data"), *(x for e in SCHED_EVENTS for x in ("-e", e))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            state["perf"] = perf
            await asyncio.sleep(0.5)  # (perf's start-up: it reports nothing when ready)
        return demo

    async def stop(demo: topology.Demo) -> None:
        try:
            await orig_stop(demo)
        finally:
            for name in [*demo.procs, "sender"]:
                with contextlib.suppress(OSError):
                    shutil.copy(demo.workdir / f"{name}.log", out / f"{name}.log")

    orig_run = tour.run

    async def run(*a: Any, **k: Any) -> dict[str, Any]:
        s: dict[str, Any] = await orig_run(*a, **{**k, "out": io.StringIO()})
        state["summary"] = s
        return s

    tour.build, tour.stop, tour.run = build, stop, run
    try:
        rc = cli.main(["demo", "--json", *demo_args])
    finally:
        tour.build, tour.stop, tour.run = orig_build, orig_stop, orig_run
        time.sleep(0.3)  # the last packets written out
        for proc in (state.get("cap"), state.get("perf")):
            if proc is not None:
                proc.send_signal(2)
                proc.wait(30)
    if rc:
        raise SystemExit(f"stream_hops: the demo failed (status {rc})")
    demo = state["demo"]
    data = {
        "offset_ns": _offset_ns(),  # realtime - monotonic: the capture's and logs' clock
        "ports": state["ports"],
        "pids": state["pids"],
        "started": demo.started,
        "prepare_started": demo.prepare_started,
        "handover_times": demo.handover_times,
        "summary": state["summary"],
    }
    (out / "run.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


# -- reading the capture ---------------------------------------------------------------------


def read_pcap(path: Path) -> list[tuple[int, bytes]]:
    """(kernel time ns, IPv4 packet) of each record of a pcap file (Linux loopback's
    Ethernet or cooked framing, microsecond or nanosecond stamps)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = struct.unpack_from("<I", data)[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        e = "<"
    else:
        e = ">"
        magic = struct.unpack_from(">I", data)[0]
    if magic not in (0xA1B2C3D4, 0xA1B23C4D):
        raise SystemExit(f"stream_hops: {path}: not a pcap file")
    scale = 1 if magic == 0xA1B23C4D else 1000
    link = struct.unpack_from(e + "I", data, 20)[0]
    skip = {1: 14, 113: 16, 101: 0, 228: 0}.get(link)
    if skip is None:
        raise SystemExit(f"stream_hops: {path}: link type {link} not read")
    rec = struct.Struct(e + "IIII")
    out: list[tuple[int, bytes]] = []
    i = 24
    while i + 16 <= len(data):
        sec, frac, incl, _ = rec.unpack_from(data, i)
        i += 16
        frame = data[i : i + incl]
        i += incl
        out.append((sec * 1_000_000_000 + frac * scale, frame[skip:]))
    return out


def udp(pkt: bytes) -> tuple[str, int, str, int, bytes] | None:
    """(source, port, destination, port, payload) of an IPv4/UDP packet."""
    if len(pkt) < 28 or pkt[0] >> 4 != 4 or pkt[9] != 17:
        return None
    ihl = (pkt[0] & 15) * 4
    src = ".".join(map(str, pkt[12:16]))
    dst = ".".join(map(str, pkt[16:20]))
    sport, dport, length = struct.unpack_from("!HHH", pkt, ihl)
    return src, sport, dst, dport, pkt[ihl + 8 : ihl + length]


def stream_seq(inner: bytes) -> tuple[int, int, int] | None:
    """(direction, sequence number, send time ns) of an inner stream packet."""
    got = udp(inner)
    if got is None or len(got[4]) < PAYLOAD.size:
        return None
    return PAYLOAD.unpack_from(got[4])


def hops(run: dict[str, Any], records: list[tuple[int, bytes]]) -> dict[str, Any]:
    """Each stream packet's time at each hop (monotonic s): {direction: {seq: {hop: t}}}."""
    ports = run["ports"]
    off = run["offset_ns"]
    inner_of = {ports[g][1]: g for g in ports if g.startswith("sg")}
    outer_of = {ports[g][0]: g for g in ports if g.startswith("sg")}
    outer_of[ports["mn"][0]] = "MN"
    mn_inner, host_app, mn_app = ports["mn"][1], ports["host_app"], ports["mn_app"]
    seen: dict[int, dict[int, dict[str, float]]] = {0: {}, 1: {}}
    esp: list[tuple[str, int, int, float]] = []  # (hop, spi, esp seq, t)
    for ns, pkt in records:
        got = udp(pkt)
        if got is None:
            continue
        _, sport, _, dport, body = got
        t = (ns - off) / 1e9
        if sport == mn_app and dport == mn_inner:
            hop = "app>MN"
        elif sport == mn_inner and dport == mn_app:
            hop = "MN>app"
        elif sport == host_app and dport in inner_of:
            hop = f"host>{inner_of[dport]}"
        elif sport in inner_of and dport == host_app:
            hop = f"{inner_of[sport]}>host"
        elif sport in outer_of and dport in outer_of:
            if len(body) < 8 or body[:4] == b"\0\0\0\0":
                continue  # IKE (the non-ESP marker) or keepalive
            spi, eseq = struct.unpack_from("!II", body)
            esp.append((f"{outer_of[sport]}>{outer_of[dport]}", spi, eseq, t))
            continue
        else:
            continue
        s = stream_seq(body)
        if s is not None:
            seen[s[0]].setdefault(s[1], {}).setdefault(hop, t)
            seen[s[0]][s[1]].setdefault("sent", (s[2]) / 1e9)
    # ESP sequence number -> stream sequence number, per (hop, SPI): the offset that most of
    # its packets have to the next packet that left the next node (the SA's sender numbers
    # the stream's packets in order, and nothing else goes on these SAs)
    offsets: dict[tuple[str, int], int] = {}
    by: dict[tuple[str, int], list[tuple[int, float]]] = collections.defaultdict(list)
    for hop, spi, eseq, t in esp:
        by[(hop, spi)].append((eseq, t))
    for (hop, spi), pkts in by.items():
        d = 0 if hop.startswith("MN>") or hop == "sg1>sg2" else 1
        nxt = "MN>app" if d == 1 else None
        outs: list[tuple[float, int]] = []
        for n, h in seen[d].items():
            left = [v for k, v in h.items() if (k == nxt if nxt else k.endswith(">host"))]
            if left:
                outs.append((min(left), n))
        outs.sort()
        times = [o[0] for o in outs]
        votes: collections.Counter[int] = collections.Counter()
        for eseq, t in pkts[:: max(1, len(pkts) // 400)]:
            i = bisect.bisect_left(times, t)
            if i < len(outs):
                votes[eseq - outs[i][1]] += 1
        if votes:
            offsets[(hop, spi)] = votes.most_common(1)[0][0]
    for (hop, spi) in list(offsets):
        if hop == "sg1>sg2":  # relayed unchanged: the MN's numbers
            mine = [o for (h, sp), o in offsets.items() if h.startswith("MN>") and sp == spi]
            if mine:
                offsets[(hop, spi)] = mine[0]
    for hop, spi, eseq, t in esp:
        k = (hop, spi)
        if k not in offsets:
            continue
        d = 0 if hop.startswith("MN>") or hop == "sg1>sg2" else 1
        h = seen[d].setdefault(eseq - offsets[k], {})
        h.setdefault(hop, t)
    return {"packets": seen, "offsets": {f"{h} {s:#x}": o for (h, s), o in offsets.items()}}


def _order(d: int, h: dict[str, float]) -> list[tuple[str, float]]:
    """The packet's hops in time order, the send time first."""
    return sorted(h.items(), key=lambda kv: kv[1])


NODE_OF = {  # (hop in, hop out) -> the node between them
    "sent": "sender",
}


def _node(a: str, b: str) -> str:
    if a == "sent":
        return "sender+kernel"
    return a.split(">")[1]


def log_lines(out: Path, run: dict[str, Any]) -> list[tuple[float, str, str]]:
    """(monotonic s, gateway, line) of each gateway's log line (wall-clock milliseconds)."""
    lines = []
    off = run["offset_ns"] / 1e9
    for g in ("sg1", "sg2", "sg3"):
        p = out / f"{g}.log"
        if not p.exists():
            continue
        for line in p.read_text(errors="replace").splitlines():
            try:
                wall = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                continue
            lines.append((wall.timestamp() - off, g, line[24:]))
    return lines


class Sched:
    """The scheduler's record of the run (``perf sched timehist`` of ``sched.data``): for
    each thread, when it ran, waited for a CPU (runnable) and slept."""

    def __init__(self, path: Path) -> None:
        text = subprocess.run(["perf", "sched", "timehist", "-i", str(path), "--state"],
                              capture_output=True, text=True, check=False).stdout  # fmt: skip
        # (end of its run, sleep, runnable, run (s), cpu, name, tid, pid, state at the end)
        self.share: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.rows: list[tuple[float, float, float, float, int, str, int, int, str]] = []
        for line in text.splitlines():
            f = line.split()
            if len(f) < 6 or not f[0][0].isdigit() or not f[1].startswith("["):
                continue
            try:
                # the task's name may hold spaces: the numbers are counted from the end
                st = f[-1] if not f[-1][0].isdigit() else ""
                nums = f[-4:-1] if st else f[-3:]
                wait, delay, run = (float(x) / 1000 for x in nums)
                task = " ".join(f[2 : len(f) - (4 if st else 3)])
                name, _, ids = task.rpartition("[")
                tid, _, pid = ids.rstrip("]").partition("/")
                self.rows.append((float(f[0]), wait, delay, run, int(f[1].strip("[]")),
                                  name, int(tid), int(pid or tid), st))  # fmt: skip
            except ValueError:
                continue

    names: dict[int, str] = {}  # thread id -> name (the main thread: its event loop)

    def threads(self, pid: int, a: float, b: float) -> list[str]:
        """What each thread of process ``pid`` did from ``a`` to ``b``: ms running,
        runnable (waiting for a CPU) and asleep, and its longest stretch of each."""
        acc: dict[tuple[int, str], dict[str, list[float]]] = {}
        for end, wait, delay, run, _cpu, name, tid, p, _st in self.rows:
            if p != pid or end - run - delay - wait > b or end < a:
                continue
            d = acc.setdefault((tid, name), {"ran": [], "runnable": [], "asleep": []})
            for kind, lo, hi in (("asleep", end - run - delay - wait, end - run - delay),
                                 ("runnable", end - run - delay, end - run),
                                 ("ran", end - run, end)):  # fmt: skip
                ov = min(hi, b) - max(lo, a)
                if ov > 0:
                    d[kind].append(ov)
        out = []
        self.state = ""
        for (tid, name), d in sorted(acc.items()):
            if self.names.get(tid, "").startswith("ipsecct-esp-"):
                # the forwarding thread: what it mostly did over the hold
                self.state = max(d, key=lambda k: sum(d[k]))
            parts = [f"{k} {1000 * sum(v):.2f} (longest {1000 * max(v):.2f})"
                     for k, v in d.items() if v]  # fmt: skip
            label = "loop" if tid == pid else self.names.get(tid, name)
            out.append(f"{label}[{tid}]: " + ", ".join(parts))
        return out

    state = ""  # what the last threads() call's forwarding thread mostly did
    ours: set[int] = set()  # the demo's processes

    def cpus(self, a: float, b: float, top: int = 4) -> list[str]:
        """Who ran on the CPUs from ``a`` to ``b`` (ms, the busiest first)."""
        ran: collections.defaultdict[str, float] = collections.defaultdict(float)
        for end, _w, _d, run, _cpu, name, _tid, pid, _st in self.rows:
            ov = min(end, b) - max(end - run, a)
            if ov > 0:
                ran[f"{name}[{pid}]"] += ov
                who = ("idle" if name == "<idle>" else "the demo" if pid in self.ours
                       or name == "demo-sender" else "the capture" if name in ("perf", "tcpdump")
                       else "others")  # fmt: skip
                self.share[who] += 1000 * ov
        ran.pop("<idle>[0]", None)
        busiest = sorted(ran.items(), key=lambda kv: -kv[1])[:top]
        return [f"{k} {1000 * v:.2f}" for k, v in busiest]


def analyse(out: Path, min_ms: float) -> str:
    run = json.loads((out / "run.json").read_text())
    got = hops(run, read_pcap(out / "cap.pcap"))
    trig = run["handover_times"][0][0] if run["handover_times"] else run["started"]
    logs = log_lines(out, run)
    sched = Sched(out / "sched.data") if (out / "sched.data").exists() else None
    pids = run.get("pids", {})
    slow: dict[int, list[dict[str, Any]]] = {}
    names: dict[int, str] = {}  # thread id -> its Python name
    for f in out.glob("cb-*.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x]
        slow[int(f.stem[3:])] = [r for r in rows if "t" in r]
        names.update((r["tid"], r["thread"]) for r in rows if "tid" in r)
    if sched is not None:
        sched.names = names
        sched.ours = set(pids.values())
    states: collections.Counter[str] = collections.Counter()
    text = io.StringIO()
    w = text.write
    h0 = run["summary"]["handovers"][0] if run["summary"]["handovers"] else {}
    w(f"{out}: gap_ms {h0.get('gap_ms')} at {h0.get('gap_at_ms')} ms,"
      f" handover_gap_ms {h0.get('handover_gap_ms')}, prepare_gap_ms {h0.get('prepare_gap_ms')},"
      f" baseline_gap_ms {h0.get('baseline_gap_ms')}, transfer_ms {h0.get('transfer_ms')}\n")
    prep = run.get("prepare_started")
    w(f"  times in ms from the trigger; preparation at "
      f"{'-' if prep is None else f'{1000 * (prep - trig):+.1f}'}, active at "
      f"{1000 * (run['handover_times'][0][1] - trig):+.2f}\n" if run["handover_times"] else "")
    w(f"  ESP offsets (esp seq - stream seq): {got['offsets']}\n")
    held: collections.Counter[str] = collections.Counter()
    for d in (0, 1):
        pk = got["packets"][d]
        arr = sorted(
            (min(v for k, v in h.items() if k.endswith(">host")) if d == 0 else h["MN>app"], s)
            for s, h in pk.items()
            if (any(k.endswith(">host") for k in h) if d == 0 else "MN>app" in h)
        )
        name = "MN -> host" if d == 0 else "host -> MN"
        w(f"  {name}: {len(arr)} arrivals captured\n")
        newest = -1
        prev_t = None
        prev_s = None
        for t, s in arr:
            if prev_t is not None and (t - prev_t) * 1000 > min_ms:
                h = pk[s]
                steps = _order(d, h)
                parts = []
                worst = ("", 0.0)
                for (a, ta), (b, tb) in itertools.pairwise(steps):
                    node = _node(a, b)
                    ms = (tb - ta) * 1000
                    parts.append(f"{b} {ms:+.2f}")
                    if ms > worst[1]:
                        worst = (node, ms)
                # the sender's own lateness: its send time against the previous packet's + 1 ms
                sp = pk.get(prev_s or -1, {}).get("sent")
                late = (h["sent"] - sp) * 1000 - (s - (prev_s or s)) if sp else 0.0
                held[worst[0]] += 1
                w(f"    pause {(t - prev_t) * 1000:6.2f} ms at {1000 * (prev_t - trig):+9.1f}"
                  f" closed by #{s} (previous #{prev_s}; sender late {late:+.2f}):"
                  f" sent {1000 * (h['sent'] - trig):+.1f}, " + ", ".join(parts)
                  + f"  => held by {worst[0]} {worst[1]:.2f} ms\n")
                for lt, g, line in logs:
                    if prev_t - LOG_WINDOW <= lt <= t + LOG_WINDOW:
                        w(f"        {g} {1000 * (lt - trig):+9.1f} {line[:160]}\n")
                pid = pids.get(worst[0])
                for cb in slow.get(pid or -1, []):
                    if cb["t"] <= t and cb["t"] + cb["ms"] / 1000 >= prev_t - 0.002:
                        w(f"        {worst[0]} ran {1000 * (cb['t'] - trig):+9.1f}: {cb['ms']:.2f}"
                          f" ms" + (f" ({cb['cpu_ms']:.2f} CPU)" if "cpu_ms" in cb else "")
                          + f" {cb['what'][:150]}\n")
                if sched is not None and worst[0] in pids:
                    # the holding node's threads over the hold, and who had the CPUs
                    hop_in = [x for x in steps if x[0].endswith(">" + worst[0])]
                    a0 = hop_in[0][1] if hop_in else prev_t
                    for line in sched.threads(pids[worst[0]], a0, t):
                        w(f"        {worst[0]} {line}\n")
                    w("        CPUs: " + ", ".join(sched.cpus(a0, t)) + "\n")
                    if sched.state:
                        states[f"{worst[0]}'s forwarding thread {sched.state}"] += 1
            if s > newest:
                newest = s
            prev_t, prev_s = t, s
    w(f"  pauses over {min_ms:g} ms by the node that held the closing packet longest:"
      f" {dict(held)}\n")
    if sched is not None:
        w(f"  ... what the holder's forwarding thread mostly did over the hold: {dict(states)}\n")
        w("  ... who had the two CPUs over all the holds (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(sched.share.items(),
                                                        key=lambda kv: -kv[1])) + "\n")
    return text.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_hops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-ms", type=float, default=3.0, help="pauses longer than this (3)")
    p.add_argument("--out", help="directory for the capture, logs and results (new)")
    p.add_argument("--pcap", metavar="DIR", help="analyse DIR of an earlier run, run nothing")
    p.add_argument("--sched", action="store_true",
                   help="also record the scheduler (perf): each holding node's threads over"
                   " the hold (ran, runnable, asleep) and who had the CPUs")
    p.add_argument("--callbacks", action="store_true",
                   help="also log each process's event-loop callbacks over 0.5 ms and garbage"
                   " collections over 0.2 ms (a sitecustomize on PYTHONPATH), printed at the"
                   " pauses their node held")
    p.add_argument("demo_args", nargs="*", help="after --: arguments of ipsecct demo --json")
    a = p.parse_args(argv)
    if a.pcap:
        out = Path(a.pcap)
    else:
        out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="stream-hops-"))
        out.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            print("stream_hops: needs root (tcpdump on lo)", file=sys.stderr)
            return 1
        run_demo(out, a.demo_args, a.sched, a.callbacks)
    text = analyse(out, a.min_ms)
    (out / "hops.txt").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

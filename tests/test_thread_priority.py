"""``[native] thread_priority``: how the native forwarding thread is scheduled.

The setting is parsed at load (one line naming the key otherwise), applied by the thread to
itself (read back from the kernel: ``ipsecct status``'s ``native_thread`` and
``os.sched_getscheduler`` of the thread named ``esp-NAME`` in /proc), refused by the kernel
without CAP_SYS_NICE (one warning line, the thread at normal scheduling, the gateway runs),
and at the default a flood of junk ESP leaves IKE and the control socket their turn, on both
cores and with the gateway pinned to one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipsecct.errors import ConfigError
from ipsecct.gateway import config, sched
from ipsecct.gateway.node import Node
from ipsecct.ipsec import native
from tests.helpers.control import ask, socket_of
from tests.helpers.example_ikev2 import ADDR, Setup
from tests.helpers.native_nodes import node_cfg, udp_port
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.skipif(
    os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"),
    reason="IPSECCT_PURE_PYTHON forces the Python path (no forwarding thread)",
)


def _data(priority: object) -> dict[str, Any]:
    return {
        "name": "g",
        "outer": {"address": "127.0.0.1", "port": 4500},
        "inner": {"kind": "udp", "listen": "127.0.0.1:5000", "peer": "127.0.0.1:5001"},
        "native": {"thread_priority": priority},
    }


@pytest.mark.parametrize(
    ("text", "want"),
    [("normal", "normal"), ("fifo:1", "fifo:1"), ("FIFO:99", "fifo:99"), ("nice:-20", "nice:-20"),
     ("nice:+19", "nice:19"), (" nice: 5 ", "nice:5")],
)  # fmt: skip
def test_the_setting_is_read(text: str, want: str) -> None:
    assert str(config.from_dict(_data(text)).thread_priority) == want


def test_the_default() -> None:
    data = _data("normal")
    del data["native"]
    assert config.from_dict(data).thread_priority == sched.DEFAULT


@pytest.mark.parametrize(
    ("value", "why"),
    [("fifo:0", "from 1 to 99"), ("fifo:100", "from 1 to 99"), ("nice:-21", "from -20 to 19"),
     ("nice:20", "from -20 to 19"), ("nice:x", "from -20 to 19"), ("fifo", "must be"),
     ("rr:5", "must be"), ("realtime", "must be"), ("fifo:1.5", "from 1 to 99"),
     ("fifo:\u0661", "from 1 to 99"), ("", "must be"), (1, "must be str")],
)  # fmt: skip
def test_a_bad_setting_is_one_line_naming_the_key(value: object, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_dict(_data(value))
    assert "native.thread_priority" in str(e.value) and why in str(e.value)
    assert "\n" not in str(e.value)


def test_an_unknown_key_of_the_section_is_refused() -> None:
    data = _data("normal")
    data["native"]["priority"] = "fifo:1"
    with pytest.raises(ConfigError, match=r"native\.priority"):
        config.from_dict(data)


def test_gateway_run_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text(
        'name = "g"\n[outer]\naddress = "127.0.0.1"\nport = 4500\n[inner]\nkind = "udp"\n'
        'listen = "127.0.0.1:5000"\npeer = "127.0.0.1:5001"\n'
        '[native]\nthread_priority = "fifo:200"\n'
    )
    r = subprocess.run([sys.executable, "-m", "ipsecct", "gateway", "run", "-c", str(f)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "native.thread_priority" in lines[0], r.stderr


def _task_named(name: str, pid: int | str = "self") -> int:
    """The thread id of ``pid``'s thread called ``name`` (as ``ps -L`` shows it)."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == name:
            found.append(int(tid))
    assert len(found) == 1, (name, found)
    return found[0]


async def _running(tmp: Path, priority: str) -> dict[str, Any]:
    cfg = node_cfg(tmp, "a", udp_port(), udp_port(), udp_port(), udp_port(), False, "aes-gcm-16")
    cfg.thread_priority = sched.parse(priority)
    a = Node(cfg)
    await a.start()
    try:
        await eventually(lambda: a.status()["native_thread"] is not None, "the thread", 10)
        st = a.status()
        tid = _task_named("esp-a")
        return {
            "status": st,
            "tid": tid,
            "policy": os.sched_getscheduler(tid),
            "rt": os.sched_getparam(tid).sched_priority,
            "nice": os.getpriority(os.PRIO_PROCESS, tid),
            "loop": (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)),
        }
    finally:
        await a.stop()


@pytest.mark.parametrize(
    ("priority", "policy", "rt", "nice"),
    [("fifo:3", os.SCHED_FIFO, 3, 0), ("nice:7", os.SCHED_OTHER, 0, 7),
     ("normal", os.SCHED_OTHER, 0, 0)],
)  # fmt: skip
def test_the_thread_runs_at_the_setting(
    tmp_path: Path, priority: str, policy: int, rt: int, nice: int
) -> None:
    """The forwarding thread (``esp-a`` in /proc) has the policy, priority and nice value the
    setting names, the event loop's thread keeps its own, and ``status`` says so."""
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    before = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
    r = asyncio.run(_running(tmp_path, priority))
    assert (r["policy"], r["rt"], r["nice"]) == (policy, rt, nice)
    assert r["loop"] == before  # only the forwarding thread
    assert r["status"]["data_path"] == "native-thread"
    assert r["status"]["native_thread"] == {"tid": r["tid"], "priority": priority,
                                            "wanted": priority}  # fmt: skip


def _with_native(s: Setup, name: str, priority: str) -> None:
    with open(s.config(name), "a") as f:
        f.write(f'\n[native]\nthread_priority = "{priority}"\n')


def _start(s: Setup, name: str, prefix: list[str]) -> None:
    """``Setup.start`` with the gateway's command behind ``prefix`` (setpriv, taskset)."""
    log = open(s.dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    s.procs[name] = subprocess.Popen(
        [*prefix, sys.executable, "-m", "ipsecct", "gateway", "run", "--config", s.config(name)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 30
    while True:
        assert s.procs[name].poll() is None, s.log(name)
        try:
            ask(socket_of(s.config(name)), "status", timeout=5)
            return
        except Exception:
            assert time.monotonic() < deadline, f"{name} did not start: {s.log(name)}"
            time.sleep(0.1)


def test_without_cap_sys_nice_the_thread_runs_normal_with_one_warning(tmp_path: Path) -> None:
    """sg1 asks for fifo:1 with CAP_SYS_NICE out of its bounding set (as an unprivileged
    user): one warning line naming the setting and the kernel's refusal, the thread at
    normal scheduling, and the gateway runs: the MN's IKE SA and traffic both ways."""
    s = Setup(tmp_path)
    try:
        _with_native(s, "sg1", "fifo:1")
        _start(s, "sg1", ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice", "--"])
        st = s.wait("sg1", lambda st: st["native_thread"] is not None, "the thread")
        assert st["data_path"] == "native-thread"
        nt = st["native_thread"]
        assert nt["priority"] == "normal" and nt["wanted"] == "fifo:1", nt
        pid = s.procs["sg1"].pid
        assert os.sched_getscheduler(_task_named("esp-sg1", pid)) == os.SCHED_OTHER
        lines = [x for x in s.log("sg1").splitlines() if "native-thread-priority" in x]
        assert len(lines) == 1, s.log("sg1")
        assert "WARNING" in lines[0] and "event=native-thread-priority-refused" in lines[0]
        assert "wanted=fifo:1" in lines[0] and "CAP_SYS_NICE" in lines[0], lines
        s.start("mn")
        s.wait_ike("mn", lambda x: x["children"], "the MN's IKE SA")
        s.traffic_ok("sg1", 10)
    finally:
        s.stop()


def _cpu_ns(pid: int, tid: int) -> int:
    """Thread ``tid``'s time on a CPU so far (ns, /proc's schedstat)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


FLOOD_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
/* flood DST PORT: ESP of SPIs nobody has, 48 octets, from 16 source addresses, in batches
 * of 64 (sendmmsg), until killed */
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    int fds[16];
    for (int i = 0; i < 16; i++) {
        struct sockaddr_in src = {.sin_family = AF_INET};
        char a[32];
        snprintf(a, sizeof a, "127.0.9.%d", i + 1);
        inet_pton(AF_INET, a, &src.sin_addr);
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&src, sizeof src) < 0) return 1;
    }
    static uint8_t buf[64][48];
    struct iovec iov[64];
    struct mmsghdr msgs[64];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < 64; i++) {
        iov[i].iov_base = buf[i];
        iov[i].iov_len = 48;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = sizeof dst;
    }
    printf("flooding\n");
    fflush(stdout);
    for (uint32_t n = 0;; n++) {
        for (int i = 0; i < 64; i++) {
            uint32_t spi = htonl(0x10000 + (n * 64 + i) % 100000), seq = htonl(1);
            memcpy(buf[i], &spi, 4);
            memcpy(buf[i] + 4, &seq, 4);
        }
        sendmmsg(fds[n % 16], msgs, 64, 0);
    }
}
"""


def _flooder(d: Path) -> str:
    src, exe = d / "flood.c", d / "flood"
    src.write_text(FLOOD_C)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True, timeout=120)
    return str(exe)



@pytest.mark.parametrize("cpus", ["both", "one"])
def test_a_junk_esp_flood_at_the_default_priority_leaves_ike_and_control_their_turn(
    tmp_path: Path, cpus: str
) -> None:
    """sg1 at the default thread_priority (no [native] section), with ESP of unknown SPIs
    sent to its outer port as fast as two flooders can (one per core; with ``one``, sg1 is
    pinned to one core, its forwarding thread, event loop and all): its control socket answers
    ``status`` within 5 s each time, the MN's IKE SA is established and traffic passes both
    ways, while the flood is read (``no_sa`` drops or queue drops grow throughout)."""
    s = Setup(tmp_path)
    flooders: list[subprocess.Popen[bytes]] = []
    try:
        prefix = ["taskset", "-c", str(max(os.sched_getaffinity(0)))] if cpus == "one" else []
        _start(s, "sg1", prefix)
        st = s.wait("sg1", lambda st: st["native_thread"] is not None, "the thread")
        assert st["native_thread"]["priority"] == str(sched.DEFAULT), st["native_thread"]
        pid = s.procs["sg1"].pid
        if cpus == "one":  # every thread of it (the forwarding thread started before it answered)
            for task in os.listdir(f"/proc/{pid}/task"):
                assert len(os.sched_getaffinity(int(task))) == 1
        flood = _flooder(tmp_path)
        for _ in range(2):
            flooders.append(subprocess.Popen([flood, ADDR["sg1"], str(s.port[24500])],
                                             stdout=subprocess.PIPE))  # fmt: skip
        for p in flooders:
            assert p.stdout is not None and p.stdout.readline() == b"flooding\n"

        def read(st: dict[str, Any]) -> int:
            return int(st["counters"]["drops"]["no_sa"]) + int(st["native_queue_drops"])

        def answered() -> dict[str, Any]:
            t = time.monotonic()
            st: dict[str, Any] = ask(socket_of(s.config("sg1")), "status", timeout=5)
            assert time.monotonic() - t < 5
            return st

        first = read(answered())
        tid = _task_named("esp-sg1", pid)
        cpu0, t0 = _cpu_ns(pid, tid), time.monotonic_ns()
        s.start("mn")
        seen = [first]
        box: list[dict[str, Any]] = []

        def poll() -> None:  # the control socket, every 0.2 s while IKE comes up
            while not box:
                seen.append(read(answered()))
                time.sleep(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            box.append(s.wait_ike("mn", lambda x: x["children"], "the MN's IKE SA", 60))
        finally:
            box.append({})
            poller.join(10)
        assert box[0]["state"] == "established"
        last = read(answered())
        busy = (_cpu_ns(pid, tid) - cpu0) / (time.monotonic_ns() - t0)
        print(f"the forwarding thread on CPU {busy:.0%} of the time, {last - first} read")
        assert all(p.poll() is None for p in flooders)  # still flooding
        assert last - first > 10_000, (first, seen, last)  # the flood was read meanwhile
    finally:
        for p in flooders:
            p.kill()
            p.wait()
        s.stop()

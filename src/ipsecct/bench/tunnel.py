"""``ipsecct bench tunnel``: a gateway pair against strongSwan's, packets through a real tunnel.

The topology (root; made for the run and removed after it), one per implementation::

    namespace A                                             namespace B
    lo 10.201.1.1 (sender)                                  lo 10.201.2.1 (counter)
    TUN --> gateway A ==== veth, ESP in UDP 4500 ====> gateway B --> TUN
          10.200.0.1                                       10.200.0.2

- ``ipsecct``: two ``ipsecct gateway run`` processes, TUN inner sides, one AES-GCM-128 tunnel
  (the native data path when it is built, its forwarding loop in a thread of its own;
  ``ipsecct-batch`` runs the native path without that thread, one C call per readiness event
  of the event loop, ``IPSECCT_NATIVE_THREAD=0``; ``ipsecct-nocoalesce`` the thread without its
  pause for a batch to gather, ``IPSECCT_NATIVE_COALESCE_US=0``; ``ipsecct-python`` forces the
  Python path);
- ``strongswan``: two strongSwan 5.9.8 ``charon`` daemons with kernel-libipsec (user-space
  ESP over its own TUN device), IKEv2 with a pre-shared key, ``esp_proposals = aes128gcm16``.

A small C program (compiled for the run with gcc) sends UDP packets of the inner size from
10.201.1.1 to 10.201.2.1 with ``sendmmsg`` at nice 19 as fast as it can, and counts what
arrives in B with ``recvmmsg``: delivered packets per second over the measured window. The
CPU time of the two gateway processes (all threads) over the same window, divided by the
packets delivered, gives the CPU per packet of each; ``us_per_packet`` is their mean.
Implementations and sizes are interleaved round after round; a case's figures are the median
of its rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BenchError

IMPLS = ("ipsecct", "strongswan", "ipsecct-batch", "ipsecct-nocoalesce", "ipsecct-python")
SIZES = (64, 1400)
OUTER_A, OUTER_B = "10.200.0.1", "10.200.0.2"
INNER_A, INNER_B = "10.201.1.1", "10.201.2.1"
PORT = 9000
CHARON = "/usr/lib/ipsec/charon"
START_TIMEOUT = 20.0

LOADGEN_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#define V 64
static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec / 1e9;
}
static void addr(struct sockaddr_in *a, const char *ip, int port) {
    memset(a, 0, sizeof(*a)); a->sin_family = AF_INET; a->sin_port = htons(port);
    inet_pton(AF_INET, ip, &a->sin_addr);
}
int main(int argc, char **argv) {
    static char buf[V][2048];
    struct mmsghdr m[V]; struct iovec iov[V];
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int big = 8 << 20;
    if ((argc == 7 || argc == 8) && !strcmp(argv[1], "gen")) {
        /* gen SRC DST PORT SIZE SECONDS [RATE]: as fast as it can, or RATE packets/s in
         * bursts of 8 */
        struct sockaddr_in src, dst; int size = atoi(argv[5]) - 28;
        double end = now() + atof(argv[6]);
        addr(&src, argv[2], 0); addr(&dst, argv[3], atoi(argv[4]));
        if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0) { perror("bind"); return 1; }
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
        memset(m, 0, sizeof(m));
        for (int i = 0; i < V; i++) {
            memset(buf[i], i, sizeof(buf[i]));
            iov[i].iov_base = buf[i]; iov[i].iov_len = size;
            m[i].msg_hdr.msg_iov = &iov[i]; m[i].msg_hdr.msg_iovlen = 1;
            m[i].msg_hdr.msg_name = &dst; m[i].msg_hdr.msg_namelen = sizeof(dst);
        }
        unsigned long long sent = 0;
        double rate = argc == 8 ? atof(argv[7]) : 0, start = now();
        while (now() < end) {
            if (rate > 0) {
                double t = start + sent / rate - now();
                if (t > 0) {
                    struct timespec ts = {(time_t)t, (long)((t - (time_t)t) * 1e9)};
                    nanosleep(&ts, NULL);
                }
            }
            int r = sendmmsg(fd, m, rate > 0 ? 8 : V, 0); if (r > 0) sent += r;
        }
        printf("%llu\n", sent); return 0;
    }
    if (argc == 6 && !strcmp(argv[1], "count")) {  /* count ADDR PORT WARM MEAS */
        struct sockaddr_in me; addr(&me, argv[2], atoi(argv[3]));
        if (bind(fd, (struct sockaddr *)&me, sizeof(me)) < 0) { perror("bind"); return 1; }
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
        struct timeval tv = {0, 100000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        memset(m, 0, sizeof(m));
        for (int i = 0; i < V; i++) {
            iov[i].iov_base = buf[i]; iov[i].iov_len = sizeof(buf[i]);
            m[i].msg_hdr.msg_iov = &iov[i]; m[i].msg_hdr.msg_iovlen = 1;
        }
        printf("ready\n"); fflush(stdout);
        double first = 0, warm = atof(argv[4]), meas = atof(argv[5]), give_up = now() + 20;
        unsigned long long n = 0;
        for (;;) {
            int r = recvmmsg(fd, m, V, MSG_WAITFORONE, NULL);
            double t = now();
            if (r > 0 && first == 0) first = t;
            if (first == 0 && t > give_up) break;
            if (first != 0 && t >= first + warm + meas) break;
            if (r > 0 && first != 0 && t >= first + warm) n += r;
        }
        printf("%llu\n", n); return 0;
    }
    fprintf(stderr, "usage: gen SRC DST PORT SIZE SECONDS | count ADDR PORT WARM MEAS\n");
    return 2;
}
"""


@dataclass(frozen=True)
class Result:
    impl: str
    size: int
    pps: float
    us_per_packet: float
    us_per_packet_enc: float
    us_per_packet_dec: float
    offered_pps: float  # what the generator sent: delivered close to it means load-bound
    # CPUs idle over the window (whole machine, /proc/stat): what a second worker could use
    idle_cpus: float = 0.0



def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_seconds() -> float:
    """Idle + iowait time of the whole machine, summed over its CPUs (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Topology:
    """Two namespaces joined by a veth pair, inner addresses on lo, IPv6 off, rp_filter off."""

    def __init__(self, tag: str) -> None:
        uid = secrets.token_hex(3)
        self.a, self.b = f"ict-bt{uid}-{tag}a", f"ict-bt{uid}-{tag}b"
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Topology:
        try:
            for ns in (self.a, self.b):
                _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", self.a, "link", "add", "va", "type", "veth", "peer", "name", "vb",
                "netns", self.b)
            for ns, dev, outer, inner in ((self.a, "va", OUTER_A, INNER_A),
                                          (self.b, "vb", OUTER_B, INNER_B)):
                self.run(ns, "sh", "-c", "for k in all default; do"
                         " echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6;"
                         " echo 0 > /proc/sys/net/ipv4/conf/$k/rp_filter; done")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                _sh("ip", "-n", ns, "addr", "add", f"{outer}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{inner}/32", "dev", "lo")
        except BaseException:
            self.close()
            raise
        return self

    def run(self, ns: str, *cmd: str, timeout: float = 30) -> str:
        return _sh("ip", "netns", "exec", ns, *cmd, timeout=timeout).stdout

    def popen(self, ns: str, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                _stop(p)
        for ns in (self.a, self.b):
            _sh("ip", "netns", "del", ns, check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pair:
    """A gateway pair on a topology: ``pids`` are (encrypting, decrypting) gateway."""

    topo: Topology
    pids: tuple[int, int]

    def close(self) -> None:
        self.topo.close()


class IpsecctPair(Pair):
    def __init__(
        self, workdir: Path, pure_python: bool, thread: bool = True, coalesce: bool = True
    ) -> None:
        from ..errors import ControlError
        from ..gateway.control import request

        tag = "p" if pure_python else ("n" if coalesce else "o") if thread else "m"
        self.topo = Topology(tag).__enter__()
        try:
            k1, k2 = os.urandom(20).hex(), os.urandom(20).hex()
            pids = []
            for name, ns, outer, peer, local, remote, ko, ki, so, si in (
                ("a", self.topo.a, OUTER_A, OUTER_B, INNER_A, INNER_B, k1, k2, 0x1001, 0x2001),
                ("b", self.topo.b, OUTER_B, OUTER_A, INNER_B, INNER_A, k2, k1, 0x2001, 0x1001),
            ):
                d = workdir / tag / name
                d.mkdir(parents=True)
                keys = d / "keys"
                fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f'out_enc = "{ko}"\nin_enc = "{ki}"\n')
                sock = str(d / "ctl.sock")
                cfg = d / "gw.toml"
                cfg.write_text(
                    f'name = "bench-{name}"\n[outer]\naddress = "{outer}"\nport = 4500\n'
                    f'[inner]\nkind = "tun"\nname = "ict0"\nmtu = 1400\n'
                    f'routes = ["{remote}/32"]\n[control]\nsocket = "{sock}"\n'
                    f'[state]\ndir = "{d / "state"}"\n'
                    f'[log]\nlevel = "warning"\n[[tunnel]]\nname = "t"\n'
                    f'local_ts = "{local}/32"\nremote_ts = "{remote}/32"\n'
                    f'peer = "{peer}:4500"\nenc = "aes-gcm-16"\nesn = false\n'
                    f'spi_out = {so}\nspi_in = {si}\nkeys = "{keys}"\n'
                )
                env = dict(os.environ)
                env.pop("IPSECCT_PURE_PYTHON", None)
                if pure_python:
                    env["IPSECCT_PURE_PYTHON"] = "1"
                env["IPSECCT_NATIVE_THREAD"] = "1" if thread else "0"
                if not coalesce:
                    env["IPSECCT_NATIVE_COALESCE_US"] = "0"
                log = open(d / "gw.log", "wb")  # noqa: SIM115 -- the child keeps it
                p = self.topo.popen(
                    ns, sys.executable, "-m", "ipsecct", "gateway", "run", "--config", str(cfg),
                    stdout=subprocess.DEVNULL, stderr=log, env=env,
                )
                log.close()
                deadline = time.monotonic() + START_TIMEOUT
                while True:
                    if p.poll() is not None:
                        text = (d / "gw.log").read_text(errors="replace")
                        raise BenchError(f"ipsecct gateway {name} exited: {text[-400:]}")
                    if os.path.exists(sock):
                        with contextlib.suppress(ControlError):
                            request(sock, "status", timeout=2)
                            break
                    if time.monotonic() > deadline:
                        raise BenchError(f"ipsecct gateway {name} did not start")
                    time.sleep(0.05)
                pids.append(p.pid)
            self.pids = (pids[0], pids[1])
        except BaseException:
            self.topo.close()
            raise


class StrongswanPair(Pair):
    PLUGINS = (
        "random nonce openssl pem pkcs1 x509 pubkey aes sha1 sha2 hmac gmp curve25519 kdf"
        " kernel-libipsec kernel-netlink socket-default vici updown"
    )

    def __init__(self, workdir: Path) -> None:
        if shutil.which(CHARON) is None or shutil.which("swanctl") is None:
            raise BenchError(f"strongSwan is not installed ({CHARON}, swanctl): scripts/install")
        self.topo = Topology("s").__enter__()
        try:
            psk = secrets.token_hex(16)
            pids = []
            for name, ns, outer, peer, local, remote, me, other in (
                ("A", self.topo.a, OUTER_A, OUTER_B, INNER_A, INNER_B, "a.test", "b.test"),
                ("B", self.topo.b, OUTER_B, OUTER_A, INNER_B, INNER_A, "b.test", "a.test"),
            ):
                d = workdir / "ss" / name
                (d / "run").mkdir(parents=True)
                vici = d / "charon.vici"
                (d / "strongswan.conf").write_text(
                    f"charon {{\n  load = {self.PLUGINS}\n  install_routes = yes\n"
                    f"  plugins {{ vici {{ socket = unix://{vici} }} }}\n"
                    "  syslog { daemon { default = -1 } }\n"
                    f"  filelog {{ main {{ path = {d}/charon.log\n flush_line = yes\n"
                    " default = 0 } }\n}\n"
                )
                (d / "swanctl.conf").write_text(
                    f"connections {{ c{name} {{ version = 2\n local_addrs = {outer}\n"
                    f" remote_addrs = {peer}\n encap = yes\n mobike = no\n"
                    " proposals = aes128gcm16-prfsha256-x25519\n"
                    f" local {{ auth = psk\n id = {me} }}\n"
                    f" remote {{ auth = psk\n id = {other} }}\n"
                    f" children {{ net {{ local_ts = {local}/32\n remote_ts = {remote}/32\n"
                    " esp_proposals = aes128gcm16\n mode = tunnel } } } }\n"
                    f'secrets {{ ike-ab {{ id-a = a.test\n id-b = b.test\n secret = "{psk}" }} }}\n'
                )
                env = dict(os.environ, STRONGSWAN_CONF=str(d / "strongswan.conf"))
                p = self.topo.popen(
                    ns, "sh", "-c", f"mount --bind {d}/run /run && exec {CHARON}",
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                deadline = time.monotonic() + START_TIMEOUT
                while not vici.exists():
                    if p.poll() is not None or time.monotonic() > deadline:
                        raise BenchError(f"charon {name} did not start")
                    time.sleep(0.05)
                _sh("swanctl", "--load-all", "--file", str(d / "swanctl.conf"),
                    "--uri", f"unix://{vici}")
                pids.append(p.pid)
            _sh("swanctl", "--initiate", "--ike", "cA", "--child", "net",
                "--uri", f"unix://{workdir}/ss/A/charon.vici", timeout=30)
            self.pids = (pids[0], pids[1])
        except BaseException:
            self.topo.close()
            raise


def _loadgen(workdir: Path) -> Path:
    if shutil.which("gcc") is None:
        raise BenchError("gcc is needed to build the load generator (scripts/install)")
    src = workdir / "loadgen.c"
    src.write_text(LOADGEN_C)
    exe = workdir / "loadgen"
    _sh("gcc", "-O2", "-Wall", "-o", str(exe), str(src), timeout=120)
    return exe


def measure_one(
    pair: Pair,
    impl: str,
    loadgen: Path,
    size: int,
    warm: float,
    meas: float,
    nice: int = 19,
    rate: int = 0,
) -> Result:
    topo = pair.topo
    counter = topo.popen(
        topo.b, str(loadgen), "count", INNER_B, str(PORT), str(warm), str(meas),
        stdout=subprocess.PIPE, text=True,
    )
    assert counter.stdout is not None
    if counter.stdout.readline().strip() != "ready":
        raise BenchError("the packet counter did not start")
    gen_time = warm + meas + 1.0
    gen = topo.popen(
        topo.a, "nice", "-n", str(nice), str(loadgen), "gen", INNER_A, INNER_B, str(PORT),
        str(size), str(gen_time), *([str(rate)] if rate else []), stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(warm)
    c0 = [_cpu_seconds(p) for p in pair.pids]
    i0 = _idle_seconds()
    time.sleep(meas)
    c1 = [_cpu_seconds(p) for p in pair.pids]
    idle = (_idle_seconds() - i0) / meas
    out, _ = counter.communicate(timeout=30)
    gen_out, _ = gen.communicate(timeout=30)
    n = int(out.strip().splitlines()[-1])
    offered = int(gen_out.strip().splitlines()[-1]) / gen_time
    if n == 0:
        raise BenchError(f"{impl}: no packet went through the tunnel")
    enc, dec = ((b - a) * 1e6 / n for a, b in zip(c0, c1, strict=True))
    return Result(impl, size, n / meas, (enc + dec) / 2, enc, dec, offered, idle)


@contextlib.contextmanager
def _pairs(impls: Sequence[str], workdir: Path) -> Iterator[dict[str, Pair]]:
    pairs: dict[str, Pair] = {}
    try:
        for impl in impls:
            if impl == "strongswan":
                pairs[impl] = StrongswanPair(workdir)
            else:
                pairs[impl] = IpsecctPair(
                    workdir,
                    pure_python=impl == "ipsecct-python",
                    thread=impl != "ipsecct-batch",
                    coalesce=impl != "ipsecct-nocoalesce",
                )
        yield pairs
    finally:
        for p in pairs.values():
            p.close()


def measure(
    *,
    impls: Sequence[str] = IMPLS,
    sizes: Sequence[int] = SIZES,
    rounds: int = 3,
    warm: float = 0.5,
    meas: float = 2.0,
    nice: int = 19,
    rate: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, TUN devices)")
    with tempfile.TemporaryDirectory(prefix="ipsecct-bench-tunnel-") as tmp:
        workdir = Path(tmp)
        loadgen = _loadgen(workdir)
        runs: dict[tuple[str, int], list[Result]] = {}
        with _pairs(impls, workdir) as pairs:
            for r in range(rounds):
                if progress is not None:
                    progress(f"round {r + 1}/{rounds}")
                for size in sizes:
                    for impl in impls:
                        res = measure_one(
                            pairs[impl], impl, loadgen, size, warm, meas, nice, rate
                        )
                        runs.setdefault((impl, size), []).append(res)
    out = []
    for (impl, size), rs in runs.items():
        out.append(
            Result(
                impl,
                size,
                statistics.median(x.pps for x in rs),
                statistics.median(x.us_per_packet for x in rs),
                statistics.median(x.us_per_packet_enc for x in rs),
                statistics.median(x.us_per_packet_dec for x in rs),
                statistics.median(x.offered_pps for x in rs),
                statistics.median(x.idle_cpus for x in rs),
            )
        )
    return out


def to_json(results: Sequence[Result]) -> str:
    return json.dumps({"results": [asdict(r) for r in results]})


def format_table(results: Sequence[Result]) -> str:
    by = {(r.impl, r.size): r for r in results}
    head = (
        f"{'impl':<15} {'size':>5} {'packets/s':>11} {'us/packet':>10} {'enc us':>8}"
        f" {'dec us':>8} {'pps vs strongswan':>18} {'cpu vs strongswan':>18} {'offered/s':>10}"
        f" {'idle cpus':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (r.size, IMPLS.index(r.impl))):
        ss = by.get(("strongswan", r.size))
        pps_ratio = f"{r.pps / ss.pps:.2f}x" if ss and ss.pps else "-"
        cpu_ratio = (
            f"{ss.us_per_packet / r.us_per_packet:.2f}x less" if ss and r.us_per_packet else "-"
        )
        lines.append(
            f"{r.impl:<15} {r.size:>5} {r.pps:>11,.0f} {r.us_per_packet:>10.1f}"
            f" {r.us_per_packet_enc:>8.1f} {r.us_per_packet_dec:>8.1f} {pps_ratio:>18}"
            f" {cpu_ratio:>18} {r.offered_pps:>10,.0f} {r.idle_cpus:>9.2f}"
        )
    lines.append(
        "delivered packets per second and gateway CPU per packet (mean of the encrypting and"
        " the decrypting gateway), medians of the rounds; sizes are inner IP packets;"
        " offered: what the generator sent (delivered close to it: the load, not the"
        " gateways, was the limit); idle cpus: the whole machine's idle CPUs over the window"
        " (what a second worker could have used)"
    )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    from ..commands.args import number

    p: argparse.ArgumentParser = sub.add_parser(
        "tunnel",
        help="packets/s and CPU per packet through a gateway pair, against strongSwan (root)",
        description="Two network namespaces joined by a veth pair, ESP in UDP 4500,"
        " AES-GCM-128, TUN devices on both sides: ipsecct's gateway pair against strongSwan's"
        " (kernel-libipsec). Needs root. See benchmarks/README.md.",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--rounds", type=number(int, high=100), default=3, metavar="N",
                   help="interleaved rounds; the median counts (default 3)")
    p.add_argument("--time", type=number(float, high=60), default=2.0, metavar="SECONDS",
                   help="measured window of one case (default 2)")
    p.add_argument("--warmup", type=number(float, high=60), default=0.5, metavar="SECONDS",
                   help="traffic before the window (default 0.5)")
    p.add_argument("--nice", type=int, choices=range(20), default=19, metavar="N",
                   help="niceness of the load generator (default 19)")
    p.add_argument("--rate", type=number(int, high=10_000_000), default=0, metavar="PPS",
                   help="offer this many packets/s (bursts of 8) instead of as many as the"
                   " generator can: the CPU per packet at a load every implementation carries")
    p.add_argument("--impl", action="append", choices=IMPLS, metavar="IMPL",
                   help=f"only this implementation (repeatable; {', '.join(IMPLS)})")
    p.add_argument("--size", action="append", type=int, choices=SIZES, metavar="OCTETS",
                   help="only this inner packet size (repeatable; 64, 1400)")
    p.set_defaults(handler=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    try:
        results = measure(
            impls=list(dict.fromkeys(args.impl or IMPLS)),
            sizes=list(dict.fromkeys(args.size or SIZES)),
            rounds=args.rounds,
            warm=args.warmup,
            meas=args.time,
            nice=args.nice,
            rate=args.rate,
            progress=None if args.json else lambda s: print(s, file=sys.stderr, flush=True),
        )
    except BenchError as exc:
        print(f"ipsecct bench tunnel: {exc}", file=sys.stderr)
        return 1
    print(to_json(results) if args.json else format_table(results))
    return 0

"""``ipsecct bench gateway``: packets per second one gateway process forwards from its inner
side (a virtual link: IP packets in UDP) to ESP in UDP, on loopback, against a plain Python UDP
relay (receive on one socket, send to another, no IPsec: the system-call floor).

Three processes take part in each measurement, so that only the gateway's own work is measured
in the gateway process:

- the **gateway** under test: a real ``ipsecct gateway run`` subprocess (one AES-GCM-128 tunnel,
  ESP in UDP to the sink), or the plain relay, both started once and kept for the whole run;
- a **load generator** that sends one prebuilt inner IP packet (IPv4/UDP, exactly 64 or 1400
  octets) to the gateway's inner port as fast as it can;
- a **sink** that counts what arrives during the measurement window.

With two or more CPUs the gateways are pinned to one CPU and the generator and sink to the
others (``--no-pin`` turns that off). The load is more than any of them forwards: the rate is
what reaches the sink, per second of window. Cases (implementation, size) are interleaved round
after round and a case's rate is its best round. ``--profile FILE`` runs the ipsecct gateway
under cProfile and writes its profile to FILE on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..commands.args import number
from ..errors import BenchError, ControlError
from ..ipsec.ippacket import build_udp

IMPLS = ("ipsecct", "plain-relay")
# Further relays for diagnosis (``--impl``), not measured by default: an asyncio relay built like
# the daemon (one datagram per DatagramProtocol callback), and one that reads up to 64 datagrams
# per readiness event (loop.add_reader and non-blocking recv until EAGAIN).
EXTRA_IMPLS = ("asyncio-relay", "asyncio-batch-relay", "ipsecct-python")
SIZES = (64, 1400)
WARMUP = 0.3  # seconds of load before the window opens
HOST = ipaddress.ip_address("10.2.0.1")  # the end host behind the gateway sends ...
MN = ipaddress.ip_address("10.1.0.2")  # ... to the mobile node, through the tunnel
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class GatewayFigure:
    impl: str
    size: int
    pps: float


def inner_packet(size: int) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` octets (at least 28) from HOST to MN."""
    if size < 28:
        raise ValueError("an IPv4/UDP packet has at least 28 octets")
    return build_udp(HOST, MN, 7000, 7000, bytes(size - 28))


def _free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpus: set[int] | None) -> None:
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


# -- the three roles (module-level so that any multiprocessing start method finds them) ------


def plain_relay(listen: int, target: int, ready: Any, cpus: set[int] | None) -> None:
    """Receive on one socket, send to another: the floor for a Python forwarder."""
    _pin(cpus)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    rx.bind(("127.0.0.1", listen))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(("127.0.0.1", target))
    ready.set()
    recv, send = rx.recv, tx.send
    while True:
        data = recv(65535)
        with contextlib.suppress(OSError):
            send(data)


def asyncio_relay(
    listen: int, target: int, ready: Any, cpus: set[int] | None, batch: bool = False
) -> None:
    """A relay on an asyncio event loop: what the daemon's I/O costs without any IPsec."""
    import asyncio

    _pin(cpus)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    rx.bind(("127.0.0.1", listen))
    rx.setblocking(False)
    dest = ("127.0.0.1", target)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, family=socket.AF_INET)
        if batch:
            raw = tx.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
            recv, sendto = rx.recv, sock.sendto

            def readable() -> None:
                for _ in range(64):
                    try:
                        data = recv(65535)
                    except BlockingIOError:
                        return
                    with contextlib.suppress(OSError):
                        sendto(data, dest)

            loop.add_reader(rx.fileno(), readable)
        else:

            class P(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                    tx.sendto(data, dest)

            await loop.create_datagram_endpoint(P, sock=rx)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def generator(target: int, packet: bytes, start: float, stop: float, cpus: set[int] | None) -> None:
    """Send ``packet`` to ``target`` as fast as possible from ``start`` to ``stop``."""
    _pin(cpus)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    s.connect(("127.0.0.1", target))
    send, now = s.send, time.monotonic
    while now() < start:
        time.sleep(0.001)
    while now() < stop:
        for _ in range(64):
            try:  # noqa: SIM105 -- a with-statement per packet costs more than the send
                send(packet)
            except OSError:  # ECONNREFUSED after an ICMP error, ENOBUFS: keep going
                pass
    s.close()


def sink(
    sock: socket.socket, window: tuple[float, float], stop: float, out: Any, cpus: set[int] | None
) -> None:
    """Count datagrams that arrive within ``window``; send the count on ``out``."""
    _pin(cpus)
    sock.settimeout(0.05)
    buf = bytearray(65536)
    recv_into, now = sock.recv_into, time.monotonic
    lo, hi = window
    n = 0
    while True:
        try:
            recv_into(buf)
        except TimeoutError:
            if now() >= stop:
                break
            continue
        t = now()
        if lo <= t < hi:
            n += 1
        elif t >= stop:
            break
    out.send(n)
    out.close()


# -- gateways under test ----------------------------------------------------------------------


class Gateway:
    """A forwarder under test: where to send inner packets, and how to stop it."""

    impl: str
    listen: int

    def stop(self) -> None:
        raise NotImplementedError


class RelayGateway(Gateway):
    def __init__(self, sink_port: int, cpus: set[int] | None, impl: str = "plain-relay") -> None:
        self.impl = impl
        self.listen = _free_port()
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        args: tuple[Any, ...] = (self.listen, sink_port, ready, cpus)
        if impl == "plain-relay":
            target: Callable[..., None] = plain_relay
        else:
            target, args = asyncio_relay, (*args, impl == "asyncio-batch-relay")
        self.proc = ctx.Process(target=target, args=args, daemon=True)
        self.proc.start()
        if not ready.wait(START_TIMEOUT):
            self.stop()
            raise BenchError("the plain relay did not start")

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(10)


class IpsecctGateway(Gateway):
    """A real ``ipsecct gateway run`` subprocess with one AES-GCM-128 tunnel to the sink."""

    def __init__(
        self,
        sink_port: int,
        workdir: Path,
        cpus: set[int] | None,
        profile: str | None,
        command: Sequence[str] = ("-m", "ipsecct", "gateway", "run"),
        *,
        pure_python: bool = False,
    ) -> None:
        """``command``: the Python arguments that run a gateway given ``--config FILE`` (to
        measure another build, e.g. a script that patches the daemon)."""
        from ..gateway.control import request

        self.impl = "ipsecct-python" if pure_python else "ipsecct"
        workdir.mkdir(parents=True, exist_ok=True)
        self.listen = _free_port()
        self.sock = str(workdir / "gw.sock")
        keys = workdir / "bench.keys"
        fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # random throw-away keys, 128-bit key + salt
            f.write(f'in_enc = "{os.urandom(20).hex()}"\nout_enc = "{os.urandom(20).hex()}"\n')
        cfg = workdir / "gw.toml"
        cfg.write_text(
            "\n".join(
                [
                    'name = "bench-gw"',
                    "[outer]",
                    'address = "127.0.0.1"',
                    f"port = {_free_port()}",
                    "[inner]",
                    'kind = "udp"',
                    f'listen = "127.0.0.1:{self.listen}"',
                    f'peer = "127.0.0.1:{_free_port()}"',
                    "[control]",
                    f'socket = "{self.sock}"',
                    "[log]",
                    'level = "warning"',
                    "[state]",  # throw-away keys: throw-away state too
                    f'dir = "{workdir / "state"}"',
                    "[[tunnel]]",
                    'name = "bench"',
                    f'local_ts = "{HOST}/32"',
                    f'remote_ts = "{MN}/32"',
                    f'peer = "127.0.0.1:{sink_port}"',
                    'enc = "aes-gcm-16"',
                    "esn = true",
                    "spi_in = 0x10000001",
                    "spi_out = 0x20000001",
                    f'keys = "{keys}"',
                    "",
                ]
            )
        )
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-o", profile]
        cmd += [*command, "--config", str(cfg)]
        self.log = open(workdir / "gw.log", "wb")  # noqa: SIM115 -- closed in stop()
        env = {k: v for k, v in os.environ.items() if k != "IPSECCT_PURE_PYTHON"}
        if pure_python:  # the Python data path, for comparison
            env["IPSECCT_PURE_PYTHON"] = "1"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, cpus)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                lines = (workdir / "gw.log").read_text(errors="replace").strip().splitlines()
                last = lines[-1][-300:] if lines else "no output"
                raise BenchError(f"the ipsecct gateway exited ({last})")
            if os.path.exists(self.sock):
                with contextlib.suppress(ControlError):
                    request(self.sock, "status", timeout=2)
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError("the ipsecct gateway did not start")
            time.sleep(0.05)

    def out_packets(self) -> int:
        from ..gateway.control import request

        return int(request(self.sock, "status")["counters"]["out_packets"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# -- measurement ------------------------------------------------------------------------------


def _cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(CPUs for the gateways, CPUs for the generator and the sink)."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def measure_one(
    gw: Gateway, sink_sock: socket.socket, size: int, seconds: float, load_cpus: set[int] | None
) -> float:
    """Packets per second that ``gw`` forwards to the sink, over a window of ``seconds``."""
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic() + 0.2
    window = (start + WARMUP, start + WARMUP + seconds)
    stop = window[1] + 0.1
    rx, tx = ctx.Pipe(duplex=False)
    sk = ctx.Process(target=sink, args=(sink_sock, window, stop + 0.3, tx, load_cpus))
    gen = ctx.Process(
        target=generator, args=(gw.listen, inner_packet(size), start, stop, load_cpus)
    )
    sk.start()
    gen.start()
    tx.close()
    try:
        if not rx.poll(stop - time.monotonic() + START_TIMEOUT):
            raise BenchError("the sink did not report")
        n = int(rx.recv())
    finally:
        gen.join(10)
        sk.join(10)
        for p in (gen, sk):
            if p.is_alive():
                p.kill()
    # let the gateway's queue drain before the next case
    _drain(sink_sock)
    return n / seconds


def _drain(sock: socket.socket) -> None:
    sock.settimeout(0.2)
    with contextlib.suppress(TimeoutError):
        while True:
            sock.recv(65535)


def measure(
    *,
    impls: Sequence[str] = IMPLS,
    sizes: Sequence[int] = SIZES,
    seconds: float = 1.0,
    rounds: int = 3,
    pin: bool = True,
    profile: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[GatewayFigure]:
    gw_cpus, load_cpus = _cpu_split(pin)
    workdir = Path(tempfile.mkdtemp(prefix="ipsecct-bench-"))
    sinks: dict[str, socket.socket] = {}
    gateways: dict[str, Gateway] = {}
    best: dict[tuple[str, int], float] = {}
    try:
        for impl in impls:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
            s.bind(("127.0.0.1", 0))
            sinks[impl] = s
            port = int(s.getsockname()[1])
            if impl in ("ipsecct", "ipsecct-python"):
                gateways[impl] = IpsecctGateway(
                    port, workdir / impl, gw_cpus, profile, pure_python=impl == "ipsecct-python"
                )
            elif impl in ("plain-relay", *EXTRA_IMPLS):
                gateways[impl] = RelayGateway(port, gw_cpus, impl)
            else:
                raise ValueError(f"unknown implementation {impl!r}")
        for r in range(rounds):
            for size in sizes:
                for impl in impls:
                    pps = measure_one(gateways[impl], sinks[impl], size, seconds, load_cpus)
                    key = (impl, size)
                    best[key] = max(best.get(key, 0.0), pps)
                    if progress is not None:
                        progress(f"round {r + 1}/{rounds}: {impl:<12} {size:>5} B {pps:>10,.0f}/s")
    finally:
        for gw in gateways.values():
            gw.stop()
        for s in sinks.values():
            s.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return [GatewayFigure(i, s, round(best[(i, s)], 1)) for s in sizes for i in impls]


def to_json(results: Sequence[GatewayFigure]) -> str:
    return json.dumps({"results": [asdict(r) for r in results]})


def format_table(results: Sequence[GatewayFigure]) -> str:
    rates = {(r.impl, r.size): r.pps for r in results}
    sizes = list(dict.fromkeys(r.size for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    head = f"{'size':>6}  " + "  ".join(f"{i:>14}" for i in impls)
    both = "ipsecct" in impls and "plain-relay" in impls
    if both:
        head += "  ipsecct/relay"
    lines = [
        "packets/s forwarded by one gateway process (inner side -> ESP in UDP, loopback)",
        head,
    ]
    for s in sizes:
        row = f"{s:>5}B  " + "  ".join(f"{rates[(i, s)]:>14,.0f}" for i in impls)
        if both:
            relay = rates[("plain-relay", s)]
            row += f"  {rates[('ipsecct', s)] / relay if relay else 0.0:>13.2f}"
        lines.append(row)
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add ``ipsecct bench gateway`` to the ``bench`` subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "gateway",
        help="packets/s one gateway process forwards into ESP in UDP, against a plain UDP relay",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--time",
        type=number(float),
        default=1.0,
        metavar="SECONDS",
        help="measurement window of one case (default 1.0)",
    )
    p.add_argument(
        "--rounds",
        type=number(int),
        default=3,
        metavar="N",
        help="runs of each case, interleaved; the best counts (default 3)",
    )
    p.add_argument(
        "--impl",
        action="append",
        choices=IMPLS + EXTRA_IMPLS,
        metavar="IMPL",
        help=f"measure this implementation (repeatable; {', '.join(IMPLS + EXTRA_IMPLS)};"
        f" default: {' and '.join(IMPLS)})",
    )
    p.add_argument(
        "--size",
        action="append",
        type=int,
        choices=SIZES,
        metavar="OCTETS",
        help="only this inner packet size (repeatable; 64, 1400)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument(
        "--profile", metavar="FILE", help="run the ipsecct gateway under cProfile, write FILE"
    )
    p.set_defaults(handler=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    if args.profile is not None:
        # The gateway's cProfile writes it only on exit, and its failure there went unseen
        # (--profile DIRECTORY: the benchmark ran, exit 0, no profile): opened here first,
        # a directory, a missing directory or no permission is one line before anything runs.
        with open(args.profile, "ab"):
            pass
    results = measure(
        impls=list(dict.fromkeys(args.impl or IMPLS)),
        sizes=list(dict.fromkeys(args.size or SIZES)),
        seconds=args.time,
        rounds=args.rounds,
        pin=not args.no_pin,
        profile=args.profile,
        progress=None if args.json else lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(to_json(results) if args.json else format_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ipsecct.bench.gateway`` (the same as ``ipsecct bench gateway``)."""
    parser = argparse.ArgumentParser(prog="ipsecct bench")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["gateway", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

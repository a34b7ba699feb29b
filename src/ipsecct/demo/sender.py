"""The demo's stream sender: a small process of its own that sends the constant-rate stream
both ways, each packet at its own absolute deadline.

The demo's process runs the MN, the two applications' receivers and the whole handover's
control work (requests to the gateways, their answers, reports); a sender paced by that
process's event loop sent late whenever the loop was busy or not scheduled (measured: it
left 5.7-9.1 ms between two packets of the 1 ms stream in every traced run, 24 ms once), and
the receivers counted that as a pause of the stream, although nothing on the way was late.
This process does nothing else: it keeps the stream's pace as a user's application with its
own timer does, and what the receivers see is then what the network (the MN and the
gateways) made of a steady stream.

It sends on the applications' own sockets (passed as file descriptors: the gateways see the
same source addresses as before) and never reads them; the demo's process keeps receiving.

The demo and this process talk in lines of text. Arguments: ``UP_FD DOWN_FD RATE TOTAL
MN_PORT HOST_PORT`` (the MN application's socket, which sends to the MN node's inner link on
127.0.0.1:MN_PORT, and the host's, which sends to 127.0.0.1:HOST_PORT). On stdout: ``ready
POLICY`` once (the scheduling it got, see :func:`punctual`), ``sent N`` about every 0.1 s,
and at the end ``done N ENDED_NS LATE_NS UNSENT LATE_SEQ START_NS`` (the count each way,
when the last packet was sent, the sender's own longest lateness against its schedule and
the packet it was latest with, on ``time.monotonic_ns``, the datagrams the kernel refused,
and the schedule's start). On stdin: ``go START_NS`` (packet ``n`` is due at
``START_NS + (n - 1) / RATE`` s), ``peer PORT`` (the host's packets go to 127.0.0.1:PORT from
now on: the access network's route moved). End of input (the demo is gone or stopped it):
exit at once; after ``done`` it waits for that end, so that its exit is not on the way of
the stream's last packets. Anything else is an error: one line on stderr, exit status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import DemoError
from ..ipsec.ippacket import IPAddress, build_udp

MN_INNER = "10.1.0.2"
HOST_INNER = "10.2.0.1"
STREAM_PORT = 7000
PAYLOAD = struct.Struct("!BIQ")  # direction, sequence number, send time (ns)
REPORT_NS = 100_000_000  # a "sent N" line at most this often

_MN_ADDR: IPAddress = ipaddress.ip_address(MN_INNER)
_HOST_ADDR: IPAddress = ipaddress.ip_address(HOST_INNER)
# (source, destination) per direction, parsed once: two ip_address() parses per packet were
# half of the stream's sending cost (2,000 packets/s in the demo's process)
_ENDS: tuple[tuple[IPAddress, IPAddress], ...] = ((_MN_ADDR, _HOST_ADDR), (_HOST_ADDR, _MN_ADDR))
_PAD = bytes(32)


def packet(direction: int, seq: int) -> bytes:
    """The stream's packet ``seq`` of ``direction`` (0: MN -> host, 1: host -> MN), as the
    application sends it on its virtual link: an inner IPv4/UDP packet stamped now."""
    a, b = _ENDS[direction]
    payload = PAYLOAD.pack(direction, seq, time.monotonic_ns()) + _PAD
    return build_udp(a, b, STREAM_PORT, STREAM_PORT, payload)


class _Input:
    """The demo's commands, read without blocking between two packets."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.closed = False

    def lines(self) -> list[str]:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                self.closed = True
                break
            self.buf += chunk
            if len(self.buf) > 65536:
                raise ValueError("command line too long")
        *done, self.buf = self.buf.split(b"\n")
        return [x.decode("ascii", "replace").strip() for x in done]


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"bad port {text!r}")
    return port


def _send(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> bool:
    """One datagram; the socket is non-blocking (its file status is the demo's receiver's):
    a full buffer is waited for, up to 10 ms."""
    for _ in range(2):
        try:
            sock.sendto(data, addr)
            return True
        except (BlockingIOError, InterruptedError):
            select.select([], [sock], [], 0.01)
        except OSError:
            return False
    return False


FIFO_MAX_RATE = 5000  # packets/s each way up to which the sender asks for real-time priority
# Its SCHED_FIFO priority: above the demo's gateways' forwarding threads (``[native]
# thread_priority = "fifo:1"``, demo/topology.py). The sender is the application, outside the
# gateways (on a network it runs on another machine): a forwarding thread busy with a batch
# must not make it send late, or the receivers count the gateways' work twice.
SENDER_PRIORITY = 2


def punctual(rate: int) -> str:
    """Ask the kernel to run this process as soon as it wakes: the real-time policy
    ``SCHED_FIFO`` at SENDER_PRIORITY where allowed (root or ``CAP_SYS_NICE``) and
    the stream is no faster than FIFO_MAX_RATE (a faster one could keep a real-time process
    busy and take a core from the nodes), else the highest nice level allowed. On a machine
    whose two cores run the gateways, the demo's process and other work, an ordinary process
    woke 5-27 ms late at times (load 1-9): that is the sender, not the network. It sleeps
    between packets (a few percent of a core at 1000 packets/s each way), so it takes little
    from anyone. Returns the policy it got."""
    if rate <= FIFO_MAX_RATE:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(SENDER_PRIORITY))
            return f"fifo:{SENDER_PRIORITY}"
    for level in (-10, -5, -1):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, level)
            return f"nice {level}"
    return "normal"


def relax() -> None:
    """Back to an ordinary, low priority once the last packet is sent: the rest (the last
    line, the interpreter's exit: milliseconds of CPU) must not take a core from the nodes
    still carrying the stream's last packets. (At real-time priority it did: the longest
    pause of 6 in 16 runs was in the stream's last 10 ms.)"""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)


def run(argv: list[str], inp: int, out: Callable[[str], None]) -> int:
    up_fd, down_fd, rate, total, mn_port, host_port = (int(x) for x in argv)
    if rate <= 0 or total < 0:
        raise ValueError("rate and total must be positive")
    up = socket.socket(fileno=up_fd)
    down = socket.socket(fileno=down_fd)
    mn_link = ("127.0.0.1", _port(str(mn_port)))
    host = ("127.0.0.1", _port(str(host_port)))
    commands = _Input(inp)
    os.set_blocking(inp, False)
    out(f"ready {punctual(rate)}")
    start: int | None = None
    while start is None:  # until "go"
        select.select([inp], [], [], 1.0)
        for line in commands.lines():
            word, _, arg = line.partition(" ")
            if word == "go":
                # told late (the demo's process was not running): start now, in step,
                # rather than send the packets already due in a burst
                start = max(int(arg), time.monotonic_ns())
            elif word == "peer":
                host = ("127.0.0.1", _port(arg))
            elif line:
                raise ValueError(f"unknown command {line!r}")
        if commands.closed:
            return 0
    sent = unsent = 0
    late = late_seq = 0
    next_report = start + REPORT_NS
    while sent < total:
        for line in commands.lines():  # a route change applies to the packets due now
            word, _, arg = line.partition(" ")
            if word == "peer":
                host = ("127.0.0.1", _port(arg))
            elif line:
                raise ValueError(f"unknown command {line!r}")
        if commands.closed:
            relax()
            return 0
        now = time.monotonic_ns()
        due = min(total, (now - start) * rate // 1_000_000_000 + 1) if now >= start else 0
        while sent < due:
            behind = time.monotonic_ns() - (start + sent * 1_000_000_000 // rate)
            sent += 1
            if behind > late:
                late, late_seq = behind, sent
            unsent += not _send(up, packet(0, sent), mn_link)
            unsent += not _send(down, packet(1, sent), host)
        if now >= next_report:
            out(f"sent {sent}")
            next_report = now + REPORT_NS
        wait = start + sent * 1_000_000_000 // rate - time.monotonic_ns()
        if sent < total and wait > 0:
            time.sleep(wait / 1e9)
    ended = time.monotonic_ns()
    relax()
    out(f"done {sent} {ended} {late} {unsent} {late_seq} {start}")
    # and exit when the demo closes our input, after the stream's last packets have arrived:
    # not while they are on their way
    while not commands.closed:
        select.select([inp], [], [], 1.0)
        commands.lines()
    return 0


def main() -> int:
    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        return run(sys.argv[1:], sys.stdin.fileno(), out)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"ipsecct demo sender: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 1


class SenderProcess:
    """The demo's end of the sender: start it, tell it when to go and where the host's packets
    go, follow its count, and wait for its end. Every wait is bounded; a sender that fails or
    ends early is a :class:`~ipsecct.errors.DemoError` of one line."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.sent = 0
        self.policy = ""  # the scheduling it got (see punctual)
        self.late_seq = 0  # the packet it was latest with
        self.start_ns = 0  # when its first packet was due (later than asked if told late)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[tuple[int, float, float, int]] = (
            asyncio.get_running_loop().create_future()
        )
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        up: socket.socket,
        down: socket.socket,
        rate: int,
        total: int,
        mn_port: int,
        host_port: int,
        log: Path,
        timeout: float = 30.0,
    ) -> SenderProcess:
        args = [up.fileno(), down.fileno(), rate, total, mn_port, host_port]
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ipsecct.demo.sender", *map(str, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                pass_fds=(up.fileno(), down.fileno()),
                start_new_session=True,  # a Ctrl-C reaches the demo, which ends it
            )
        self = cls(proc, log)
        assert proc.stdout is not None
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), proc.stdout
        )
        self._reader = asyncio.create_task(self._read(reader))
        try:
            await asyncio.wait_for(asyncio.shield(self.ready), timeout)
        except TimeoutError:
            self.close()
            raise DemoError(f"the stream's sender did not start within {timeout:g} s") from None
        except BaseException:
            self.close()
            raise
        return self

    def _failed(self, what: str) -> DemoError:
        with contextlib.suppress(OSError):
            tail = self.log.read_text(errors="replace").strip().splitlines()
            if tail:
                what += f" ({tail[-1][:200]})"
        return DemoError(f"the stream's sender {what}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                word, *rest = raw.decode("ascii", "replace").split()
                if word == "ready" and not self.ready.done():
                    self.policy = " ".join(rest)
                    self.ready.set_result(None)
                elif word == "sent" and len(rest) == 1:
                    self.sent = int(rest[0])
                elif word == "done" and len(rest) == 6:
                    n, ended, late, unsent, self.late_seq, self.start_ns = (int(x) for x in rest)
                    self.sent = n
                    self.done.set_result((n, ended / 1e9, late / 1e9, unsent))
                    return
        except (ValueError, OSError):
            pass
        exc = self._failed("ended early")
        for f in (self.ready, self.done):
            if not f.done():
                f.set_exception(exc)

    def _write(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:  # a few bytes into an empty pipe: never blocks
            os.write(self.proc.stdin.fileno(), line.encode() + b"\n")
        except OSError:
            raise self._failed("is gone") from None

    def go(self, start: float) -> None:
        """Packet ``n`` is due at ``start + (n - 1) / rate`` (monotonic seconds)."""
        self._write(f"go {int(start * 1e9)}")

    def peer(self, port: int) -> None:
        """The host's packets go to 127.0.0.1:``port`` from now on."""
        self._write(f"peer {port}")

    async def finish(self, timeout: float) -> tuple[int, float, float, int]:
        """(packets sent each way, when the last was sent, the longest lateness in seconds,
        packets the kernel refused) once the sender is done."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.done), timeout)
        except TimeoutError:
            raise self._failed(f"did not finish within {timeout:g} s") from None

    def close(self) -> None:
        """End the process (if still running) and reap it."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # end of input: it exits
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


if __name__ == "__main__":
    sys.exit(main())

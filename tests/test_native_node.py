"""Two in-process gateways (ipsecct.gateway.node.Node) on loopback: the native batch path
(recvmmsg / sendmmsg in C), in its forwarding thread and per readiness event, against the
Python path, with real sockets.

Both paths must deliver the same packets, in both directions, with the same counters; on
the native path the Python side must see only the first packet of each flow and SA.

The forwarding thread (``_esp.Table.run``): a tunnel frozen while it forwards a stream sends
nothing above the sequence number its freeze read and no sequence number twice; a thread
that fails hands the sockets back to the event loop; its queue to the loop is bounded.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import random
import socket
import struct
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipsecct.gateway import node as node_mod
from ipsecct.gateway.node import Node
from ipsecct.ipsec import native
from ipsecct.ipsec.algorithms import EncAlg
from ipsecct.ipsec.engine import TunnelState
from ipsecct.ipsec.ippacket import Endpoint, build_udp
from ipsecct.ipsec.transforms import AeadTransform
from tests.helpers.native_nodes import KEY_BA, node_cfg, udp_port
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.skipif(
    os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"),
    reason="IPSECCT_PURE_PYTHON forces the Python path",
)

N = 400


async def _exchange(tmp: Path, use_native: bool, enc: str) -> dict[str, Any]:
    pa, pb, ia, ib, aa, ab = (udp_port() for _ in range(6))
    a = Node(node_cfg(tmp, "a", pa, ia, aa, pb, False, enc))
    b = Node(node_cfg(tmp, "b", pb, ib, ab, pa, True, enc))
    if not use_native:
        a.engine.native = b.engine.native = None
    assert (a.engine.native is not None) is use_native
    apps = {}
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    loop = asyncio.get_running_loop()
    for name, port in (("a", aa), ("b", ab)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        s.setblocking(False)
        apps[name] = s

        def readable(s: socket.socket = s, name: str = name) -> None:
            while True:
                try:
                    got[name].append(s.recv(65535))
                except BlockingIOError:
                    return

        loop.add_reader(s.fileno(), readable)
    python_calls = {"a": 0, "b": 0}
    await a.start()
    await b.start()
    want = ("native-thread" if node_mod._thread_wanted() else "native") if use_native else "python"
    assert a.status()["data_path"] == b.status()["data_path"] == want
    try:
        for node, name in ((a, "a"), (b, "b")):
            orig = node.from_inner

            def counting(packet: bytes, orig: Any = orig, name: str = name) -> None:
                python_calls[name] += 1
                orig(packet)

            node.from_inner = counting  # type: ignore[method-assign]
        sent_ab, sent_ba = [], []
        for i in range(N):
            up = build_udp(  # type: ignore[call-arg]  # (the starred pair is src, dst)
                *(__import__("ipaddress").ip_address(x) for x in ("10.1.0.2", "10.2.0.1")),
                # half of them of one size (full batches), half of changing sizes
                5000 + i % 4,
                7000,
                bytes([i % 256]) * (100 if i < N // 2 else i % 1300),
            )
            down = build_udp(  # type: ignore[call-arg]  # (the starred pair is src, dst)
                *(__import__("ipaddress").ip_address(x) for x in ("10.2.0.1", "10.1.0.2")),
                7000,
                5000 + i % 4,
                bytes([i % 256]) * (i % 700),
            )
            apps["a"].sendto(up, ("127.0.0.1", ia))
            apps["b"].sendto(down, ("127.0.0.1", ib))
            sent_ab.append(up)
            sent_ba.append(down)
            if i % 16 == 15:
                await asyncio.sleep(0.002)
        for _ in range(500):
            if len(got["b"]) >= N and len(got["a"]) >= N:
                break
            await asyncio.sleep(0.01)
        a.engine.sync_native()
        b.engine.sync_native()
        t = a.engine.tunnels()[0]
        return {
            "delivered_ab": sorted(got["b"]) == sorted(sent_ab),
            "delivered_ba": sorted(got["a"]) == sorted(sent_ba),
            "stats": (a.engine.stats.as_dict(), b.engine.stats.as_dict()),
            "seq": (t.outbound.seq, t.inbound.window.top if t.inbound else None),
            "python_calls": python_calls,
        }
    finally:
        for s in apps.values():
            loop.remove_reader(s.fileno())
            s.close()
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("thread", [True, False])
@pytest.mark.parametrize("enc", ["aes-gcm-16", "chacha20-poly1305"])
def test_native_batch_path_delivers_like_the_python_path(
    tmp_path: Path, enc: str, thread: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    monkeypatch.setenv("IPSECCT_NATIVE_THREAD", "1" if thread else "0")
    (tmp_path / "n").mkdir()
    (tmp_path / "p").mkdir()
    nat = asyncio.run(_exchange(tmp_path / "n", True, enc))
    py = asyncio.run(_exchange(tmp_path / "p", False, enc))
    assert py["delivered_ab"] and py["delivered_ba"]
    assert nat["delivered_ab"] and nat["delivered_ba"]
    assert nat["stats"] == py["stats"]
    assert nat["seq"] == py["seq"] == (N, N)
    # 4 flows each way: the Python path sees the packets that came before C knew the flow
    # (at most one batch of 64), C carries the rest
    assert nat["python_calls"]["a"] <= 68 and nat["python_calls"]["b"] <= 68
    assert py["python_calls"]["a"] == N


# -- the forwarding thread -------------------------------------------------------------------


def _sink() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def _seqs(sink: socket.socket, spi: int) -> list[int]:
    """The ESP sequence numbers waiting in ``sink`` (all of them: loopback delivers at send)."""
    out: list[int] = []
    while True:
        try:
            d = sink.recv(65535)
        except BlockingIOError:
            return out
        if len(d) >= 8:
            got_spi, seq = struct.unpack("!LL", d[:8])
            assert got_spi == spi
            out.append(seq)


class _Flood:
    """A thread sending one flow's inner packets to a node's inner socket until stopped."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.port = port
        self.stop = threading.Event()
        self.pkt = build_udp(
            ipaddress.ip_address("10.1.0.2"),
            ipaddress.ip_address("10.2.0.1"),
            5000,
            7000,
            b"x" * 64,
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for _ in range(16):
                self.sock.sendto(self.pkt, ("127.0.0.1", self.port))
            time.sleep(0.0005)

    def __enter__(self) -> _Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.sock.close()


def _node(tmp: Path, sink_port: int) -> tuple[Node, int, int]:
    po, pi = udp_port(), udp_port()
    return Node(node_cfg(tmp, "a", po, pi, udp_port(), sink_port, False, "aes-gcm-16")), po, pi


async def _freezes(tmp: Path, rounds: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sink = _sink()
    a, _, pi = _node(tmp, sink.getsockname()[1])
    await a.start()
    assert a.status()["data_path"] == "native-thread"
    t = a.engine.tunnels()[0]
    seen: list[int] = []
    in_c = 0
    try:
        with _Flood(pi):
            await eventually(lambda: t.outbound.seq > 100, "the stream to run", 30)
            for _ in range(rounds):
                await asyncio.sleep(rng.uniform(0.002, 0.03))  # the thread forwards
                before = a.engine.native.take_stats()
                t.state = TunnelState.HELD  # the freeze: C's state comes back
                frozen = t.outbound.seq
                a.engine.stats.out_packets += before[2]
                in_c += before[2]
                # what C sealed before the freeze is on the wire; nothing after it may be
                time.sleep(rng.uniform(0.0, 0.01))  # the thread keeps running meanwhile
                await asyncio.sleep(rng.uniform(0.0, 0.01))
                got = _seqs(sink, 0x1001)
                assert not got or max(got) <= frozen, (max(got), frozen)
                assert t.outbound.seq == frozen
                seen += got
                t.state = TunnelState.ACTIVE
        await asyncio.sleep(0.05)
        seen += _seqs(sink, 0x1001)
        return {"seen": seen, "in_c": in_c, "seq": t.outbound.seq}
    finally:
        await a.stop()
        sink.close()


def test_a_freeze_stops_the_forwarding_thread_at_once(tmp_path: Path) -> None:
    """Freezes at random moments of a stream the thread forwards: once the freeze returns, no
    packet above the sequence number it read reaches the wire, and no (SPI, sequence number)
    pair is ever sent twice."""
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    r = asyncio.run(_freezes(tmp_path, 25, 11))
    seen = r["seen"]
    assert len(seen) == len(set(seen)), "a sequence number was sent twice"
    assert r["in_c"] > 0, "the thread sealed nothing between the freezes"
    assert max(seen) <= r["seq"]


async def _failing(tmp: Path) -> dict[str, Any]:
    sink = _sink()
    a, _, pi = _node(tmp, sink.getsockname()[1])
    await a.start()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pkt = _Flood(pi).pkt
    kept: list[int] = []

    def count() -> int:
        kept.extend(_seqs(sink, 0x1001))
        return len(kept)

    try:
        assert a.status()["data_path"] == "native-thread"
        for _ in range(10):
            tx.sendto(pkt, ("127.0.0.1", pi))
        await eventually(lambda: count() >= 10, "the first packets", 30)
        a.engine.native._inject_fault()
        tx.sendto(pkt, ("127.0.0.1", pi))  # wakes the thread, which raises
        await eventually(lambda: a.status()["data_path"] == "native", "the fallback", 30)
        for _ in range(50):
            tx.sendto(pkt, ("127.0.0.1", pi))
        await eventually(lambda: count() >= 61, "packets after it", 30)
        return {"seqs": kept, "running": a.engine.native.running}
    finally:
        tx.close()
        await a.stop()
        sink.close()


def test_a_failed_forwarding_thread_hands_the_sockets_back(tmp_path: Path) -> None:
    """The thread raises (a fault injected into its loop): the event loop reads the sockets
    again, one C call per readiness event, and the stream goes on in order."""
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    r = asyncio.run(_failing(tmp_path))
    assert not r["running"]
    assert sorted(r["seqs"]) == list(range(1, 62))


def _unread(sock: socket.socket) -> int:
    """The octets of the datagram waiting first in ``sock`` (0: nothing waits)."""
    got = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4))
    return cast(int, struct.unpack("i", got)[0])


def _caught_up(sock: socket.socket) -> None:
    """Blocks (the event loop too) until the forwarding thread has read all ``sock`` holds."""
    deadline = time.monotonic() + 30
    while _unread(sock) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not _unread(sock), "the forwarding thread does not read"


async def _flooded(tmp: Path, n: int) -> dict[str, Any]:
    sink = _sink()
    a, po, _ = _node(tmp, sink.getsockname()[1])
    await a.start()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        table = a.engine.native
        for i in range(n):  # ESP for an SPI nobody has: the Python path's no_sa drop
            tx.sendto(struct.pack("!LL", 0x7777, i + 1) + bytes(40), ("127.0.0.1", po))
        # the event loop is busy (blocked here): the thread's queue to it fills and stays
        # bounded; the thread reads and handles a batch holding the data path's lock, which
        # up_dropped takes too: nothing waiting to be read, then that lock taken, means every
        # datagram was handled
        assert a.outer_transport is not None
        _caught_up(a.outer_transport.sock)
        dropped = table.up_dropped
        await eventually(
            lambda: a.status()["counters"]["drops"]["no_sa"] >= n - dropped, "the drain", 30
        )
        return {"dropped": dropped, "no_sa": a.status()["counters"]["drops"]["no_sa"]}
    finally:
        tx.close()
        await a.stop()
        sink.close()


def test_the_queue_to_the_event_loop_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    monkeypatch.setattr(node_mod, "_MAX_PENDING", 32)
    r = asyncio.run(_flooded(tmp_path, 300))
    # ESP no SA here takes may fill a quarter of the queue (8 of 32): the rest is kept free
    assert r["dropped"] == 300 - 8
    assert r["no_sa"] == 8


def _ike_sa_init() -> bytes:
    """A NAT-T IKE_SA_INIT as far as the hand-up cares: the non-ESP marker, an IKE header."""
    ike = os.urandom(8) + bytes(8) + bytes([0, 0x20, 34, 0x08]) + struct.pack("!LL", 0, 28)
    return bytes(4) + ike


async def _crowded(tmp: Path, n: int, sources: int) -> dict[str, Any]:
    """A flood of ESP for SPIs nobody has, from ``sources`` addresses, while the event loop is
    busy; in the middle of it a NAT-T IKE datagram and a transfer signal (ESP next header 253
    under the node's own inbound SA)."""
    sink = _sink()
    a, po, _ = _node(tmp, sink.getsockname()[1])
    await a.start()
    assert a.status()["data_path"] == "native-thread"
    ike: list[bytes] = []
    signals: list[bytes] = []
    on_outer = a._on_outer

    def seen_outer(data: bytes, addr: Any) -> None:
        if data[:4] == bytes(4):
            ike.append(bytes(data))
        on_outer(data, addr)

    a._on_outer = seen_outer  # type: ignore[method-assign]
    a.on_signal = lambda sig, addr: signals.append(bytes(sig.payload))
    assert a.outer_transport is not None
    outer = a.outer_transport.sock
    txs = []
    for i in range(sources):  # many source addresses (all of 127/8 is this host's)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
        txs.append(s)
    table = a.engine.native
    sealer = AeadTransform(EncAlg.AES_GCM_16, bytes.fromhex(KEY_BA))
    init = _ike_sa_init()
    try:
        # a first signal takes the Python path, which then lets C carry the inbound SPI
        first = bytes(sealer.seal_payload(0x2001, 1, b"first", 253, 0, True))
        sink.sendto(first, ("127.0.0.1", po))
        await eventually(lambda: signals == [b"first"], "the first signal", 30)
        signal = bytes(sealer.seal_payload(0x2001, 2, b"transfer-signal", 253, 0, True))
        for i in range(n):  # half before, half after the two that matter
            tx = txs[i % sources]
            tx.sendto(struct.pack("!LL", 0x10000 + i, 1) + bytes(40), ("127.0.0.1", po))
            if i % 100 == 99:  # the socket's buffer never overflows: the thread reads on
                _caught_up(outer)
            if i == n // 2:
                txs[0].sendto(init, ("127.0.0.1", po))
                sink.sendto(signal, ("127.0.0.1", po))  # from the peer itself
        # the event loop is busy (blocked here): wait for the thread to have read them all
        _caught_up(outer)
        dropped = dict(table.up_dropped_by)
        total = table.up_dropped
        await eventually(
            lambda: a.status()["counters"]["drops"]["no_sa"] + total >= n, "the drain", 30
        )
        return {"ike": ike, "signals": signals, "init": init, "dropped": dropped,
                "total": total, "status": a.status()}
    finally:
        for s in txs:
            s.close()
        await a.stop()
        sink.close()


def test_junk_esp_does_not_crowd_ike_and_signals_out_of_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ESP of unknown SPIs from 300 source addresses fills the forwarding thread's queue to
    the event loop while the loop is busy: a NAT-T IKE_SA_INIT and a transfer signal that come
    in the middle of it are still handed up (ESP may fill only its share of the queue)."""
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    monkeypatch.setattr(node_mod, "_MAX_PENDING", 64)
    r = asyncio.run(_crowded(tmp_path, 2000, 300))
    assert r["ike"] == [r["init"]], "the IKE datagram was dropped with the junk"
    assert r["signals"] == [b"first", b"transfer-signal"], "the signal was dropped with the junk"
    assert r["dropped"] == {"own": 0, "esp": 2000 - 16, "ike": 0, "inner": 0}
    assert r["status"]["native_queue_drops"] == 2000 - 16
    assert r["status"]["native_queue_drops_by"]["esp"] == 2000 - 16


async def _fake_ike_flood(tmp: Path, n: int, sources: int) -> dict[str, Any]:
    """``n`` datagrams of junk after the non-ESP marker (fake IKE, which only the event loop's
    parser tells from IKE) from ``sources`` addresses while the event loop is busy; in the
    middle of it a real client's IKE_SA_INIT from an address of its own."""
    sink = _sink()
    a, po, _ = _node(tmp, sink.getsockname()[1])
    await a.start()
    assert a.status()["data_path"] == "native-thread"
    ike: list[bytes] = []
    on_outer = a._on_outer

    def seen_outer(data: bytes, addr: Any) -> None:
        ike.append(bytes(data))
        on_outer(data, addr)

    a._on_outer = seen_outer  # type: ignore[method-assign]
    assert a.outer_transport is not None
    outer = a.outer_transport.sock
    txs = []
    for i in range(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
        txs.append(s)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.9.9", 0))
    table = a.engine.native
    init = _ike_sa_init()
    try:
        for i in range(n):
            txs[i % sources].sendto(bytes(4) + os.urandom(36), ("127.0.0.1", po))
            if i % 100 == 99:
                _caught_up(outer)
            if i == n // 2:
                client.sendto(init, ("127.0.0.1", po))
        _caught_up(outer)  # the event loop is busy (here): the thread read them all
        dropped = dict(table.up_dropped_by)
        await eventually(lambda: init in ike, "the client's IKE_SA_INIT handed up", 30)
        return {"ike": ike, "init": init, "dropped": dropped, "status": a.status()}
    finally:
        for s in txs:
            s.close()
        client.close()
        await a.stop()
        sink.close()


def test_fake_ike_from_one_host_does_not_crowd_another_hosts_ike_out_of_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 datagrams of junk after the non-ESP marker from one address (or from four) fill
    the IKE share of the queue to the event loop while the loop is busy: on main the IKE_SA_INIT
    of a client at another address that came in the middle of them was dropped with them (the
    share is per class, junk ESP could no longer do it, fake IKE still could). One source may
    fill an eighth of the share between two drains (3 of 24 here), the client's goes up."""
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    monkeypatch.setattr(node_mod, "_MAX_PENDING", 64)
    for sources in (1, 4):
        r = asyncio.run(_fake_ike_flood(tmp_path, 2000, sources))
        assert r["dropped"] == {"own": 0, "esp": 0, "ike": 2000 - 3 * sources, "inner": 0}
        assert r["ike"].count(r["init"]) == 1
        assert r["status"]["native_queue_drops_by"]["ike"] == 2000 - 3 * sources


# -- differential: the forwarding thread against the Python path, hostile datagrams ----------

_OP = st.one_of(
    st.tuples(st.just("valid"), st.integers(0, 39)),
    st.tuples(st.just("tamper"), st.integers(0, 39), st.integers(0, 200), st.integers(1, 255)),
    st.tuples(st.just("trunc"), st.integers(0, 39), st.integers(0, 120)),
    st.tuples(st.just("spi"), st.integers(1, 2**32 - 1), st.binary(max_size=80)),
    st.tuples(st.just("junk"), st.binary(max_size=40)),
    st.tuples(st.just("keepalive")),
)


def _valid_esp(tmp: Path, pa: int, pb: int, enc: str) -> list[bytes]:
    """40 ESP packets of the a -> b tunnel, made by a pure-Python engine (a Node not started)."""
    a = Node(node_cfg(tmp, "a", pa, udp_port(), udp_port(), pb, False, enc))
    a.engine.native = None
    out = []
    for i in range(40):
        pkt = build_udp(
            ipaddress.ip_address("10.1.0.2"),
            ipaddress.ip_address("10.2.0.1"),
            5000 + i % 3,
            7000,
            bytes([i]) * (i * 7 % 300),
        )
        res = a.engine.outbound(pkt, time.monotonic())
        out.append(bytes(res.data))  # type: ignore[union-attr]
    return out


def _datagrams(valid: list[bytes], ops: list[tuple[Any, ...]]) -> list[bytes]:
    out = []
    for op in ops:
        if op[0] == "valid":
            out.append(valid[op[1]])  # a second time: a replay
        elif op[0] == "tamper":
            d = bytearray(valid[op[1]])
            d[op[2] % len(d)] ^= op[3]
            out.append(bytes(d))
        elif op[0] == "trunc":
            out.append(valid[op[1]][: op[2]])
        elif op[0] == "spi":
            out.append(struct.pack("!L", op[1]) + op[2])
        elif op[0] == "junk":
            out.append(op[1])
        else:
            out.append(b"\xff")
    return out


async def _receive(tmp: Path, mode: str, pa: int, datagrams: list[bytes], enc: str) -> Any:
    pb, ib, app_port = udp_port(), udp_port(), udp_port()
    b = Node(node_cfg(tmp, "b", pb, ib, app_port, pa, True, enc))
    if mode == "python":
        b.engine.native = None
    app = _sink()  # the inner application behind b
    b.inner_peer = Endpoint(ipaddress.ip_address("127.0.0.1"), app.getsockname()[1])
    await b.start()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", pa))
    in_python = [0]
    orig = b.from_outer

    def counting(data: bytes, addr: tuple[Any, ...]) -> None:
        in_python[0] += 1
        orig(data, addr)

    b.from_outer = counting  # type: ignore[method-assign]
    try:
        assert b.status()["data_path"] == {"thread": "native-thread", "python": "python"}[mode]

        def counted() -> int:
            b.engine.sync_native()
            c = b.engine.stats.as_dict()
            return int(cast(int, c["in_packets"])) + sum(cast(dict[str, int], c["drops"]).values())

        # the first packet goes through Python, which hands the SA to C; then the rest
        tx.sendto(datagrams[0], ("127.0.0.1", pb))
        await eventually(lambda: counted() == 1, "the first packet", 30)
        for d in datagrams[1:]:
            tx.sendto(d, ("127.0.0.1", pb))
        want = sum(1 for d in datagrams if d != b"\xff")
        await eventually(lambda: counted() >= want, "every datagram handled", 30)
        delivered = []
        while True:
            try:
                delivered.append(app.recv(65535))
            except BlockingIOError:
                break
        t = b.engine.tunnels()[0]
        assert t.inbound is not None
        return (
            (sorted(delivered), b.engine.stats.as_dict(), t.inbound.window.top, counted()),
            in_python[0],
        )
    finally:
        tx.close()
        await b.stop()
        app.close()


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    ops=st.lists(_OP, min_size=1, max_size=60),
    enc=st.sampled_from(["aes-gcm-16", "chacha20-poly1305"]),
)
def test_the_forwarding_thread_and_the_python_path_agree_on_hostile_datagrams(
    ops: list[tuple[Any, ...]], enc: str
) -> None:
    """The same datagrams (valid ESP, replays, tampered, truncated, unknown SPIs, junk,
    keep-alives) into a gateway whose forwarding thread carries the SA and into one on the
    Python path: the same inner packets delivered, the same counters and drops, the same
    replay window."""
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pa = udp_port()
        valid = _valid_esp(tmp, pa, udp_port(), enc)
        datagrams = [valid[0], *_datagrams(valid, ops)]
        thread, in_python = asyncio.run(_receive(tmp, "thread", pa, datagrams, enc))
        python, _ = asyncio.run(_receive(tmp, "python", pa, datagrams, enc))
    assert thread == python
    # C carried every datagram of its SPI after the first one: only ESP of other SPIs reached
    # the Python path's ESP input (shorter datagrams and zero SPIs are not ESP there)
    ours = struct.pack("!L", 0x1001)
    assert in_python == 1 + sum(
        1 for d in datagrams[1:] if len(d) >= 8 and d[:4] not in (ours, bytes(4))
    )


async def _lease_end(tmp: Path) -> dict[str, Any]:
    sink = _sink()
    a, _, pi = _node(tmp, sink.getsockname()[1])
    await a.start()
    assert a.status()["data_path"] == "native-thread"
    t = a.engine.tunnels()[0]
    src, dst = ipaddress.ip_address("10.1.0.2"), ipaddress.ip_address("10.2.0.1")
    before = build_udp(src, dst, 5000, 7000, b"b" * 64)  # one flow: C carries it
    after = build_udp(src, dst, 5000, 7000, b"a" * 200)  # the same flow, another length
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lengths: list[int] = []

    def wire() -> list[int]:
        while True:
            try:
                lengths.append(len(sink.recv(65535)))
            except BlockingIOError:
                return lengths

    python = [0]
    orig = a.from_inner

    def counting(packet: bytes) -> None:
        python[0] += packet == before
        orig(packet)

    a.from_inner = counting  # type: ignore[method-assign]
    try:
        for _ in range(10):
            tx.sendto(before, ("127.0.0.1", pi))
        await eventually(lambda: len(wire()) >= 10, "the first packets", 30)
        # The lease's end, 0.3 s from now; nothing on the Python side acts at that moment.
        end = time.monotonic() + 0.3
        a.engine.send_until = end
        sent_after = 0
        stop = threading.Event()

        def stream() -> None:
            nonlocal sent_after
            while not stop.is_set():
                late = time.monotonic() >= end  # read before the send: it arrives later
                for _ in range(8):
                    tx.sendto(after if late else before, ("127.0.0.1", pi))
                sent_after += 8 if late else 0
                time.sleep(0.0005)

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        try:
            await eventually(lambda: sent_after >= 400, "packets after the end", 30)
        finally:
            stop.set()
            th.join(30)
        # every late packet reached the engine (held: this node has no fail-over driver)
        await eventually(
            lambda: a.status()["counters"]["drops"]["policy"] >= sent_after,
            "the late packets handed up",
            30,
        )
        c = t.outbound.native
        return {
            "lengths": wire(),
            "sent_after": sent_after,
            "held": a.status()["counters"]["drops"]["policy"],
            "c_active": c is not None and c.active,
            "python": python[0],
        }
    finally:
        tx.close()
        await a.stop()
        sink.close()


def test_the_forwarding_thread_stops_at_the_lease_end_by_its_own_clock(tmp_path: Path) -> None:
    """The forwarding thread holds the lease's end (``Engine.send_until``, an absolute time on
    the monotonic clock) as the SA's deadline and reads CLOCK_MONOTONIC after each batch's
    packets: it seals nothing that reached the gateway at or after the end, without any help
    from the event loop (this node has no fail-over driver: no timer ever looks at the
    lease). A stream crosses the end; the packets handed in after it have a length of their
    own: not one of them is on the wire, all were handed up and held."""
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    r = asyncio.run(_lease_end(tmp_path))
    small, large = 8 + 8 + 96 + 16, 8 + 8 + 232 + 16  # ESP of the 92- and 228-octet packets
    assert set(r["lengths"]) <= {small, large}
    assert r["lengths"].count(small) > r["python"] + 100, "the thread carried little"
    assert r["lengths"].count(large) == 0, "a packet that arrived after the lease was sent"
    assert r["held"] >= r["sent_after"] >= 400
    assert r["c_active"]  # C still owned the SA: it stopped by itself, nothing froze it


class _FullSocket:
    """A UDP socket whose send buffer is full while ``full`` is set."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.full = True

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.full:
            raise BlockingIOError
        return self.sock.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


async def _queued(tmp: Path) -> dict[str, Any]:
    sink = _sink()
    clock = [1000.0]
    po, pi = udp_port(), udp_port()
    a = Node(node_cfg(tmp, "a", po, pi, udp_port(), sink.getsockname()[1], False, "aes-gcm-16"),
             clock=lambda: clock[0])  # fmt: skip
    await a.start()
    ep = a.outer_transport
    assert ep is not None
    real = ep.sock
    full = _FullSocket(real)
    ep.sock = full  # type: ignore[assignment]
    t = a.engine.tunnels()[0]
    dest = ("127.0.0.1", sink.getsockname()[1])
    try:
        a.engine.send_until = 1000.5  # the lease's end
        fenced = a.engine.stats.drops["fenced"]
        # ESP sealed within the lease, waiting for room in the kernel
        a.send_esp(t.outbound, b"\x00\x00\x10\x01within")
        a._native_items([(2, b"\x00\x00\x10\x01handed-up", dest)])  # the thread's, no room
        assert len(ep.queue) == 2
        full.full = False
        ep._writable()  # room again, within the lease: both leave
        sent_within = _seqs(sink, 0x1001)
        full.full = True
        a.send_esp(t.outbound, b"\x00\x00\x10\x01late")
        a._native_items([(2, b"\x00\x00\x10\x01late-too", dest)])
        clock[0] = 1000.5  # the lease ran out while they waited
        a._native_items([(2, b"\x00\x00\x10\x01after", dest)])  # handed up after the end
        full.full = False
        ep._writable()
        return {
            "within": len(sent_within),
            "after": len(_seqs(sink, 0x1001)),
            "queue": len(ep.queue),
            "fenced": a.engine.stats.drops["fenced"] - fenced,
        }
    finally:
        ep.sock = real
        await a.stop()
        sink.close()


def test_esp_waiting_for_room_in_the_socket_is_not_sent_after_the_lease_end(
    tmp_path: Path,
) -> None:
    """ESP sealed within the lease that waits for room in the kernel (the send queue of the
    outer socket, or handed up by the forwarding thread when ``sendmmsg`` found none) leaves
    only while the lease is valid: once it has run out the datagrams are dropped and counted
    ``fenced``, not sent late, when the standby may send on the tunnel."""
    r = asyncio.run(_queued(tmp_path))
    assert r["within"] == 2
    assert r["after"] == 0 and r["queue"] == 0
    assert r["fenced"] == 3


WARM_PROBE = r"""
import asyncio, os, sys, tempfile, time
from pathlib import Path
from tests.helpers.native_nodes import KEY_BA, node_cfg, udp_port
from ipsecct.gateway.node import Node

def first_seal_costs():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from ipsecct.ipsec import _esp
    t0 = time.thread_time()
    AESGCM(os.urandom(16)).encrypt(os.urandom(12), b"x" * 100, b"")
    t1 = time.thread_time()
    _esp.SA(1, True, 0, os.urandom(20), False, 0, None)
    t2 = time.thread_time()
    return t1 - t0, t2 - t1

async def main(start):
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb, ia, aa = (udp_port() for _ in range(4))
        node = Node(node_cfg(Path(tmp), "a", pa, ia, aa, pb, False, "aes-gcm-16"))
        if start:
            await node.start()
        try:
            print(*first_seal_costs())
        finally:
            if start:
                await node.stop()

asyncio.run(main(sys.argv[1] == "start"))
"""


def test_a_started_node_has_paid_the_crypto_libraries_one_time_costs() -> None:
    """The first AEAD object of a process costs about 1 ms of CPU in ``cryptography`` and the
    first C cipher context about 0.7 ms: a gateway pays them when it starts, not on the first
    packet it seals (at a transfer's target, in the handover). Each probe in a process of its
    own (the test process has paid them long ago); CPU time, not wall time."""
    import subprocess
    import sys

    def probe(mode: str) -> tuple[float, float]:
        r = subprocess.run([sys.executable, "-c", WARM_PROBE, mode], capture_output=True,
                           text=True, timeout=60, check=True)  # fmt: skip
        a, c = r.stdout.split()
        return float(a), float(c)

    cold = probe("none")
    warm = probe("start")
    # what a node that has not started pays on its first packet: the cost being avoided
    assert cold[0] > 0.0003 and cold[1] > 0.0002, cold
    # after Node.start: some microseconds each
    assert warm[0] < 0.0003 and warm[1] < 0.0002, (cold, warm)

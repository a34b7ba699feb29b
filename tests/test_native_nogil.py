"""The forwarding thread runs its batches without the GIL (``_esp.Table.run``; g_lock in
_esp.c): the Python side's changes to the table and its SAs race it under a flood.

A flood of inner packets over real UDP sockets on loopback (a sender process) reaches the
thread, which seals them under four outbound SAs and sends the ESP to a sink socket read here.
Meanwhile this thread freezes SAs and reads their state, hands an SA over to a new C object
(frozen, exported, removed, a new SA with the same key loaded with that state: what a transfer
and its handback do), takes snapshots of active SAs, forgets and re-adds the flows, takes the
touched list and drains the queue. Every ESP datagram the sink gets is opened with its SA's
key (Python's AESGCM) so that its (SPI, sequence number) is the authentic one.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ipsecct.ipsec import native
from tests.helpers.data_path import native_only

esp: Any = native._esp  # None without the extension (the native_only mark skips then)

pytestmark = native_only

LOCAL = b"\x7f\0\0\x01"
FLOWS = 4
SO_RCVBUFFORCE = 33  # Linux (socket.h); the socket module does not name it
SECONDS = 1.5  # of flood per case, from the sender process: bursts of 32, about 40,000/s

SENDER = r"""
import socket, struct, sys, time
port, seconds, flows = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pkts = []
for f in range(flows):
    udp = struct.pack("!HHHH", 1000 + f, 2000, 8 + 20, 0) + bytes(20)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes((10, 0, 0, 1)), bytes((10, 0, 1, 1)))
    pkts.append(ip + udp)
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    for _ in range(32):
        s.sendto(pkts[i % flows], ("127.0.0.1", port))
        i += 1
    time.sleep(0.0005)
"""


def _inner(f: int) -> bytes:
    """The sender's packet of flow f (its flow key is the table's)."""
    udp = struct.pack("!HHHH", 1000 + f, 2000, 8 + 20, 0) + bytes(20)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       bytes((10, 0, 0, 1)), bytes((10, 0, 1, 1))) + udp  # fmt: skip


class World:
    """A table, its forwarding thread, four outbound SAs (SPI 0x500 + f for flow f)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.table = esp.Table()
        self.inner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inner.bind(("127.0.0.1", 0))
        self.inner.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.outer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.outer.bind(("127.0.0.1", 0))
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        self.sink.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self.sink.setblocking(False)
        self.sink_port = self.sink.getsockname()[1]
        self.keys = [rng.randbytes(20) for _ in range(FLOWS)]
        self.flow_keys = [self.table.flow_key(_inner(f)) for f in range(FLOWS)]
        assert all(k is not None for k in self.flow_keys)
        self.sas = [self._new_sa(f, None) for f in range(FLOWS)]
        for f in range(FLOWS):
            self.table.add_flow(self.flow_keys[f], self.sas[f])
        self.seen: dict[int, list[int]] = {0x500 + f: [] for f in range(FLOWS)}
        self.sealed = 0  # out_packets of take_stats
        self.punted = 0
        self.given_back = 0
        self.wake = os.eventfd(0, os.EFD_NONBLOCK)
        self.stop = os.eventfd(0, os.EFD_NONBLOCK)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _new_sa(self, f: int, state: tuple[Any, ...] | None) -> Any:
        sa = esp.SA(0x500 + f, True, 0, self.keys[f], False, 0, object())
        if state is not None:
            sa.load(*state)
        sa.configure(1 << 40, 1 << 40, 1 << 50, 1e300, 1500, 28)
        sa.set_dest(LOCAL, self.sink_port)
        sa.active = True
        return sa

    def _run(self) -> None:
        try:
            self.table.run([self.outer.fileno()], self.inner.fileno(), False,
                           (LOCAL, self.sink_port), self.wake, self.stop, 4096, 0)  # fmt: skip
        except BaseException as exc:
            self.errors.append(exc)

    def read_sink(self) -> None:
        try:
            while True:
                d = self.sink.recv(65535)
                spi, seq = struct.unpack("!LL", d[:8])
                f = spi - 0x500
                # authentic under its SA's key with this sequence number (the nonce's counter)
                AESGCM(self.keys[f][:16]).decrypt(self.keys[f][16:] + d[8:16], d[16:], d[:8])
                assert struct.unpack("!Q", d[8:16])[0] == seq
                self.seen[spi].append(seq)
        except BlockingIOError:
            pass

    def drain(self) -> None:
        for item in self.table.drain(self.wake):
            if item[0] == 0:  # no flow for it at that moment (the flows were forgotten)
                self.punted += 1
            elif item[0] == 2:  # sealed, the socket had no room: sent as the node does
                self.sink.sendto(item[1], item[2])
                self.given_back += 1
            else:
                raise AssertionError(f"unexpected hand-up {item[0]}")
        self.sealed += self.table.take_stats()[2]

    def race(self) -> int:
        """One operation of the Python side on the running table; returns the SA's index."""
        rng, table = self.rng, self.table
        f = rng.randrange(FLOWS)
        sa = self.sas[f]
        op = rng.random()
        if op < 0.3:  # a freeze: once it returns, the SA's state does not move
            sa.active = False
            state = sa.export()
            self.read_sink()
            self.drain()
            assert sa.seq == state[0] and sa.export() == state
            sa.active = True
        elif op < 0.55:  # a handback: the state moves to a new C object with the same key
            sa.active = False
            state = sa.export()
            table.remove(sa)
            assert not sa.keyed and sa.export()[0] == state[0]
            new = self._new_sa(f, state)
            assert new.seq == state[0]
            table.add_flow(self.flow_keys[f], new)
            self.sas[f] = new
        elif op < 0.8:  # a snapshot of an active SA: seq and packets of one moment
            seq, packets, _bytes, _top, _blocks = sa.export()
            assert seq == packets, (seq, packets)
        elif op < 0.9:  # the flows forgotten, then back (packets meanwhile go up)
            table.clear_flows()
            for g in range(FLOWS):
                table.add_flow(self.flow_keys[g], self.sas[g])
        else:
            owners, _ = esp.take_touched()
            assert all(o is not None for o in owners)
        return f


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_table_changes_race_the_thread_without_the_gil_and_no_spi_seq_is_sent_twice(
    seed: int,
) -> None:
    """Guards the invariant (no (SPI, sequence number) twice under one key). While the
    forwarding thread seals a flood without the GIL, this thread freezes, hands over,
    snapshots and re-keys the flows of its SAs hundreds of times: every (SPI, seq) reaches
    the sink once, the sequence numbers of each SPI are exactly 1..n with n its last SA's
    seq and packets (nothing sealed after a freeze, nothing lost from a snapshot), and the
    table's counters add up to what was sent."""
    w = World(random.Random(seed))
    w.thread.start()
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(w.inner.getsockname()[1]),
                               str(SECONDS), str(FLOWS)])  # fmt: skip
    ops = 0
    interleaved = 0  # operations with packets sealed since the one before
    last = esp.activity()
    try:
        while sender.poll() is None:
            w.race()
            ops += 1
            now = esp.activity()
            interleaved += now != last
            last = now
            w.read_sink()
            if ops % 8 == 0:
                w.drain()
        assert sender.wait(60) == 0
    finally:
        # what the thread has not read yet is never sealed; what it sealed was sent (loopback:
        # in the sink's buffer) before its batch let the lock go
        os.eventfd_write(w.stop, 1)
        w.thread.join(30)
    assert not w.thread.is_alive() and not w.errors, w.errors
    w.read_sink()
    w.drain()
    total = 0
    for f in range(FLOWS):
        spi = 0x500 + f
        seqs = w.seen[spi]
        assert len(seqs) == len(set(seqs)), f"SPI {spi:#x}: a sequence number sent twice"
        sa = w.sas[f]
        assert sorted(seqs) == list(range(1, sa.seq + 1)), f"SPI {spi:#x}: a gap or a jump"
        assert sa.export()[1] == sa.seq  # packets carried over every handback: exact
        total += len(seqs)
    assert w.sealed == total  # the table's own count of sealed packets
    # the race was real: many operations, packets sealed between them
    assert ops >= 100, ops
    assert interleaved >= 50, (interleaved, ops)
    assert total >= 10_000, total
    os.close(w.wake)
    os.close(w.stop)

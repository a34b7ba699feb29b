"""Fuzz corpus for the native data path's parsers, run by test_native_asan.py in a Python
process where ipsecct.ipsec._esp was built with AddressSanitizer.

Usage: python native_fuzz.py PATH_TO_ESP_SO [ROUNDS]. Untrusted input reaches the C code in
three places: ESP packets (SA.open, Table.open_spi, Table.from_outer), decrypted inner packets
(the inner header and selector checks after a valid ICV) and packets from the inner side
(flow keys, seal, Table.from_inner). Each gets random, truncated and authentic-but-malformed
input here. Deterministic (seeded): a failure reproduces.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import asan


def forge(rng: random.Random, alg: int, key: bytes, spi: int, seq: int, esn: bool) -> bytes:
    """An authentic ESP packet whose plaintext is random (bad padding, bad inner headers)."""
    plain = bytearray(rng.randbytes(rng.randrange(0, 200)))
    if plain and rng.random() < 0.5:  # often a plausible trailer, so the inner checks run
        pad = rng.randrange(0, 4)
        nh = rng.choice([4, 41, 59, 253, rng.randrange(256)])
        inner = bytearray(rng.randbytes(rng.randrange(0, 120)))
        if inner and rng.random() < 0.7:
            inner[0] = rng.choice([0x45, 0x46, 0x4F, 0x60, 0x61])
        plain = inner + bytes(range(1, pad + 1)) + bytes((pad, nh))
    cipher = (AESGCM if alg == 0 else ChaCha20Poly1305)(key[:-4])
    hdr = struct.pack("!LL", spi, seq & 0xFFFFFFFF)
    aad = struct.pack("!LQ", spi, seq) if esn else hdr
    iv = struct.pack("!Q", seq)
    return hdr + iv + cipher.encrypt(key[-4:] + iv, bytes(plain), aad)


class Key(bytes):
    """A flow key of a bytes subclass (the table keeps a plain copy)."""


# (alg, key length, ESN, replay window) of the SAs with SPI 0x100, 0x101, ...
CONFIGS = [(0, 20, False, 64), (0, 36, True, 1024), (1, 36, True, 0), (0, 28, False, 32)]


def make_in(esp: Any, spi: int, alg: int, key: bytes, esn: bool, owner: object = None) -> Any:
    """The inbound SA ``spi`` of CONFIGS, configured (selectors on every other one)."""
    sa_in = esp.SA(spi, False, alg, key, esn, CONFIGS[spi - 0x100][3], owner)
    sa_in.configure(0, (1 << 64) - 1, (1 << 64) - 1, 1e300, 65535, 0)
    if spi % 2:
        sa_in.set_selectors(
            17, False, 0, 65535, 1000, 2000,
            [(4, bytes(4), b"\xff" * 4), (6, bytes(16), b"\x7f" + b"\xff" * 15)],
            [(4, b"\x0a\0\0\0", b"\x0a\xff\xff\xff")],
        )
    return sa_in


def renew(esp: Any, table: Any, sas: list[Any], i: int, sink_port: int) -> None:
    """SA pair ``i`` leaves the table, as the engine drops an SA (its state taken back, then
    removed: its keys freed at once, the touched list may still hold it), and a new pair
    with the same keys and state takes its place, as the engine's next hand-over makes."""
    alg, key, esn, spi, sa_in, sa_out = sas[i]
    states = []
    for old in (sa_in, sa_out):
        old.active = False
        states.append(old.export())
        table.remove(old)
        assert not old.keyed and not old.active
        try:
            old.active = True
        except ValueError:
            pass
        else:
            raise AssertionError("a removed SA became active")
        assert old.seal(b"\x45" + bytes(40), 0.0) is None and old.open(bytes(64), 0.0) is None
        old.export()
        old.window()
    new_in = make_in(esp, spi, alg, key, esn, object())  # (owners: listed when touched)
    new_in.load(*states[0])
    new_in.active = True
    table.add_spi(new_in)
    new_out = esp.SA(spi, True, alg, key, esn, 0, object())
    new_out.load(*states[1])
    new_out.configure(1 << 40, 1 << 40, 1 << 50, 1e300, 1500, 28)
    new_out.set_dest(b"\x7f\0\0\x01", sink_port)
    new_out.active = True
    sas[i] = (alg, key, esn, spi, new_in, new_out)


RELAY_SPIS = (0, 0x200, 0x201, 0x202, 0xFFFFFFFF)


def relay_of(esp: Any, rng: random.Random, sink_port: int) -> Any:
    """A relay to the sink, at any rate and end (some past, some a burst of one), some
    under an overall cap (a new one, whose only other holder goes at once, or none)."""
    cap = rng.choice([None, esp.RelayCap(rng.choice([1e-3, 1.0, 1e6]), rng.choice([1.0, 3.0]))])
    r = esp.Relay(b"\x7f\0\0\x01", sink_port, rng.choice([0.0, 1e300, time.monotonic() + 1]),
                  rng.choice([1e-3, 1.0, 1e6]), rng.choice([1.0, 5.0, 1000.0]), cap)
    del cap
    for _ in range(3):
        r.take(rng.choice([0.0, -1.0, 1e300, time.monotonic()]))
    r.until = rng.choice([r.until, 1e300, 0.0])
    return r


def thread_fuzz(esp: Any, table: Any, sas: list[Any], rng: random.Random, rounds: int,
                outer: socket.socket, inner: socket.socket, sink: socket.socket,
                sink_port: int, tx: socket.socket) -> None:  # fmt: skip
    """The forwarding thread (Table.run) on the same untrusted datagrams, while this thread
    freezes and unfreezes the SAs and drains the queue, then a stop, a second run and a fault."""
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    stop = os.eventfd(0, os.EFD_NONBLOCK)
    errors: list[BaseException] = []
    limit = rng.choice([1, 5, 256])  # each class's share of the queue: from 1 item up

    def body() -> None:
        try:
            table.run([outer.fileno()], inner.fileno(), False, (b"\x7f\0\0\x01", sink_port),
                      wake, stop, limit, 50)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    sink.setblocking(False)
    got = 0
    for n in range(max(1, rounds // 32)):
        for _ in range(32):
            alg, key, esn, spi, _sa_in, sa_out = rng.choice(sas)
            r = rng.random()
            if r < 0.4:
                d = forge(rng, alg, key, spi, rng.randrange(1 << 32), esn)
            elif r < 0.5:
                d = forge(rng, alg, key, spi, rng.randrange(1 << 32), esn)
                d = d[: rng.randrange(len(d) + 1)]
            elif r < 0.6:  # the non-ESP marker (IKE's share of the queue), whole or cut short
                d = bytes(rng.randrange(5)) + rng.randbytes(rng.randrange(0, 40))
            else:
                d = rng.randbytes(rng.randrange(0, 64))
            tx.sendto(d, outer.getsockname())
            inner_pkt = bytearray(rng.randbytes(rng.randrange(20, 120)))
            inner_pkt[0] = rng.choice([0x45, 0x60, inner_pkt[0]])
            inner_pkt[2:4] = struct.pack("!H", len(inner_pkt))
            if rng.random() < 0.7:  # often a plausible header, so that flows are found
                inner_pkt[6:8] = bytes(2)
                if inner_pkt[0] == 0x60:
                    inner_pkt[4:6] = struct.pack("!H", max(0, len(inner_pkt) - 40))
            k = table.flow_key(bytes(inner_pkt))
            if k is not None and rng.random() < 0.3:
                table.add_flow(k, sa_out)
            tx.sendto(bytes(inner_pkt), inner.getsockname())
        for _ in range(4):  # moved tunnels' relays: any length, SPI 0 too, while they change
            rspi = rng.choice(RELAY_SPIS)
            d = struct.pack("!L", rspi) + rng.randbytes(rng.randrange(0, 80))
            tx.sendto(d[: rng.randrange(len(d) + 1)], outer.getsockname())
        if rng.random() < 0.3:
            table.relay(rng.choice(RELAY_SPIS[1:]), relay_of(esp, rng, sink_port))
        elif rng.random() < 0.2:
            table.relay(rng.choice(RELAY_SPIS[1:]), None)
        victim = rng.choice(sas)[rng.choice([4, 5])]
        victim.active = False  # a freeze while the thread runs
        victim.export()
        victim.active = True
        if n % 5 == 4:  # an SA leaves the table (its keys go) while it may still be listed
            renew(esp, table, sas, rng.randrange(len(sas)), sink_port)
        owners, _ = esp.take_touched()  # the touched list, taken while the thread appends
        assert all(o is not None for o in owners)
        if n % 3 == 0:
            got += len(table.drain(wake))
        if n % 7 == 0:
            table.clear_flows()
        try:
            while True:
                sink.recv(65535)
        except BlockingIOError:
            pass
    deadline = time.monotonic() + 30
    while table.running is False and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    os.eventfd_write(stop, 1)
    t.join(30)
    assert not t.is_alive() and not errors, errors
    got += len(table.drain(wake))
    assert got > 0
    # a second run on the same table, ended by an injected fault
    os.eventfd_read(stop)
    t = threading.Thread(target=body, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not table.running and time.monotonic() < deadline:
        time.sleep(0.01)
    table._inject_fault()
    tx.sendto(b"\xff", outer.getsockname())
    t.join(30)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], RuntimeError)
    table.drain(wake)
    os.close(wake)
    os.close(stop)


def main() -> None:
    esp = asan.load("ipsecct.ipsec._esp", sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    rng = random.Random(11)
    table = esp.Table()
    sas = []
    for i, (alg, klen, esn, _window) in enumerate(CONFIGS):
        key = rng.randbytes(klen)
        spi = 0x100 + i
        sa_in = make_in(esp, spi, alg, key, esn)
        sa_in.active = True
        table.add_spi(sa_in)
        sa_out = esp.SA(spi, True, alg, key, esn, 0, None)
        sa_out.configure(1 << 40, 1 << 40, 1 << 50, 1e300, rng.choice([100, 1500, 65535]), 28)
        sa_out.set_dest(b"\x7f\0\0\x01", 9)
        sa_out.active = True
        sas.append((alg, key, esn, spi, sa_in, sa_out))
    keys = []
    for _ in range(rounds):
        alg, key, esn, spi, sa_in, sa_out = rng.choice(sas)
        r = rng.random()
        if r < 0.3:
            data = struct.pack("!L", spi) + rng.randbytes(rng.randrange(0, 100))
        elif r < 0.6:
            seq = rng.choice([0, 1, rng.randrange(1 << 32), rng.randrange(1 << 64)])
            data = forge(rng, alg, key, spi, seq, esn)
            if rng.random() < 0.3:
                data = data[: rng.randrange(len(data) + 1)]
        elif r < 0.8:
            pkt = bytearray(rng.randbytes(rng.randrange(0, 120)))
            if pkt:
                pkt[0] = rng.choice([0x45, 0x60, pkt[0]])
            if len(pkt) >= 4 and rng.random() < 0.5:
                pkt[2:4] = struct.pack("!H", len(pkt))
            if len(pkt) >= 6 and rng.random() < 0.5:
                pkt[4:6] = struct.pack("!H", max(0, len(pkt) - 40))
            k = table.flow_key(bytes(pkt))
            if k is not None and rng.random() < 0.5:
                table.add_flow(k if rng.random() < 0.8 else Key(k), sa_out)
                keys.append(k)
            table.seal_flow(bytes(pkt), 0.0)
            sa_out.seal(bytes(pkt), 0.0)
            continue
        else:
            data = rng.randbytes(rng.randrange(0, 60))
        sa_in.open(data, 0.0)
        table.open_spi(data, 0.0)
    # the batch calls on real sockets: fuzz datagrams through recvmmsg / sendmmsg
    outer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    outer.bind(("127.0.0.1", 0))
    inner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inner.bind(("127.0.0.1", 0))
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink_port = sink.getsockname()[1]
    for sa in sas:
        sa[5].set_dest(b"\x7f\0\0\x01", sink_port)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for rspi in RELAY_SPIS[1:]:
        table.relay(rspi, relay_of(esp, rng, sink_port))
    for _ in range(max(1, rounds // 64)):
        for _ in range(8):
            rspi = rng.choice(RELAY_SPIS)
            d = struct.pack("!L", rspi) + rng.randbytes(rng.randrange(0, 80))
            tx.sendto(d[: rng.randrange(len(d) + 1)], outer.getsockname())
        for _ in range(56):
            alg, key, esn, spi, sa_in, sa_out = rng.choice(sas)
            if rng.random() < 0.5:
                d = forge(rng, alg, key, spi, rng.randrange(1 << 32), esn)
            else:
                d = rng.randbytes(rng.randrange(0, 64))
            tx.sendto(d, outer.getsockname())
            tx.sendto(rng.randbytes(rng.randrange(0, 64)), inner.getsockname())
        table.from_outer(outer.fileno(), inner.fileno(), False, (b"\x7f\0\0\x01", sink_port),
                         64, 0.0)
        table.from_inner(inner.fileno(), False, outer.fileno(), 64, 0.0)
        sink.setblocking(False)
        try:
            while True:
                sink.recv(65535)
        except BlockingIOError:
            pass
    thread_fuzz(esp, table, sas, rng, rounds, outer, inner, sink, sink_port, tx)
    for rspi in RELAY_SPIS[1:]:
        table.relay(rspi, None)
    table.take_stats()
    for sa in sas:
        sa[4].export()
        sa[4].window()
        table.remove(sa[5])
    read_through_fuzz(esp, rng, rounds)
    esp.take_touched()
    sas.clear()  # (the list's last references go with the next take)
    esp.take_touched()
    print("fuzz-ok", rounds)


def read_through_fuzz(esp: Any, rng: random.Random, rounds: int) -> None:
    """The read-through descriptors (``read_through``) on a slotted class of their own: reads
    and writes with no, an inactive, an active and a foreign C object, bad values, deletes,
    objects of another type, descriptors made and dropped."""
    import contextlib
    from dataclasses import dataclass, field
    from types import SimpleNamespace

    @dataclass(slots=True)
    class Cnt:
        packets: int = 0
        bytes: int = 0

    @dataclass(slots=True)
    class Obj:
        seq: int = 0
        counters: Cnt = field(default_factory=Cnt)
        native: Any = None  # (a native SA, or a bad value)

    slots = {k: vars(Obj)[k] for k in ("seq", "counters", "native")}
    for name in ("seq", "counters"):
        setattr(Obj, name, esp.read_through(name, slots[name], slots["native"]))
    for bad in (("x", slots["seq"], slots["native"]), ("seq", 1, slots["native"])):
        with contextlib.suppress(TypeError, ValueError):
            esp.read_through(*bad)
    for _ in range(rounds):
        o = Obj()
        k = rng.randrange(4)
        if k == 1:
            o.native = esp.SA(rng.randrange(1 << 32), True, 0, bytes(20), True, 0, o)
            o.native.active = rng.random() < 0.5
        elif k == 2:
            o.native = SimpleNamespace(active=rng.random() < 0.5, seq=5, packets=1, bytes=2)
        elif k == 3:
            o.native = SimpleNamespace()  # no "active": an error, not a crash
        for _ in range(4):
            try:
                op = rng.randrange(6)
                if op == 0:
                    o.seq = rng.choice((rng.randrange(1 << 64), -1, "x", 1 << 70))  # type: ignore[assignment]  # (bad values on purpose)
                elif op == 1:
                    o.counters = rng.choice((Cnt(rng.randrange(9), 3), object()))  # type: ignore[assignment]  # (likewise)
                elif op == 2:
                    del o.seq
                elif op == 3:
                    vars(Obj)["seq"].__get__(object(), None)
                else:
                    o.seq, o.counters  # noqa: B018
            except (TypeError, ValueError, OverflowError, AttributeError):
                pass


if __name__ == "__main__":
    main()

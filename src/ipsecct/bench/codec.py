"""``ipsecct bench codec``: ESP encrypt and decrypt rates against the floor and against Scapy.

Three implementations are measured in the same run, on the same inner packets (an IPv4/UDP
packet of exactly 64 or 1400 octets), with AES-GCM-128 and ChaCha20-Poly1305:

- ``ipsecct``: :func:`ipsecct.ipsec.processing.tunnel_encapsulate` and
  :func:`~ipsecct.ipsec.processing.tunnel_decapsulate` on real SAs (64-packet replay window, checked
  and updated for every packet; decryption gets freshly sequenced packets made beforehand);
- ``raw-aead``: ``cryptography``'s ``encrypt_into`` / ``decrypt_into`` with the AEAD object
  reused and a preallocated output buffer, on as many octets as ipsecct's own AEAD call (the
  inner packet plus the ESP trailer): the floor for any Python ESP;
- ``scapy``: ``scapy.layers.ipsec.SecurityAssociation.encrypt`` / ``decrypt`` on prebuilt Scapy
  packets (skipped, with a note, when Scapy is not installed);
- ``native``: the native data path's per-SA calls (``ipsecct.ipsec._esp``: seal / open with
  the SA's EVP context keyed once, sequence number, replay window, padding, inner header and
  counters), on the same SAs (skipped, with a note, when the extension is not built or
  IPSECCT_PURE_PYTHON is set).

Every (implementation, transform, size, operation) case is run in short runs, the cases
interleaved round after round so that machine noise hits all of them alike; a case's rate is
its best run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..commands.args import number
from ..errors import BenchError
from ..ipsec import processing
from ..ipsec.algorithms import EncAlg
from ..ipsec.esp import Drop
from ..ipsec.ippacket import build_udp
from ..ipsec.sad import Direction, SecurityAssociation

IMPLS = ("ipsecct", "raw-aead", "scapy", "native")
TRANSFORMS: dict[str, tuple[EncAlg, int, str]] = {
    # name: (ipsecct algorithm, key octets with the 4-octet salt, Scapy's name)
    "aes-gcm-128": (EncAlg.AES_GCM_16, 20, "AES-GCM"),
    "chacha20-poly1305": (EncAlg.CHACHA20_POLY1305, 36, "CHACHA20-POLY1305"),
}
SIZES = (64, 1400)
OPS = ("encrypt", "decrypt")

_SRC = ipaddress.ip_address("192.0.2.1")
_DST = ipaddress.ip_address("192.0.2.2")
_INNER_SRC = ipaddress.ip_address("10.0.0.1")
_INNER_DST = ipaddress.ip_address("10.0.1.1")
_SPI = 0x1000
_POOL_MAX = 16384  # decrypt pre-made packets: at most this many kept, reused with new SAs


@dataclass(frozen=True)
class CodecFigure:
    impl: str
    transform: str
    size: int
    op: str
    pps: float


def inner_packet(size: int) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` octets (at least 28)."""
    return build_udp(_INNER_SRC, _INNER_DST, 5000, 5001, bytes(size - 28))


# A case: called with a packet count, returns the seconds those packets took.
Runner = Callable[[int], float]


def _sa_pair(alg: EncAlg, key: bytes, window: int = 64) -> tuple[SecurityAssociation, ...]:
    def sa(direction: Direction) -> SecurityAssociation:
        return SecurityAssociation(
            _SPI, direction, _SRC, _DST, enc=alg, enc_key=key, replay_window=window
        )

    return sa(Direction.OUTBOUND), sa(Direction.INBOUND)


def _ipsecct_cases(alg: EncAlg, key: bytes, size: int) -> dict[str, Runner]:
    pkt = inner_packet(size)
    out, _ = _sa_pair(alg, key)
    pool: list[bytes] = []
    maker, _ = _sa_pair(alg, key)

    def encrypt(n: int) -> float:
        enc = processing.tunnel_encapsulate
        sa = out
        t0 = time.perf_counter()
        for _ in range(n):
            enc(sa, pkt, 0.0)
        return time.perf_counter() - t0

    def decrypt(n: int) -> float:
        while len(pool) < min(n, _POOL_MAX):  # fresh sequence numbers, made beforehand
            made = processing.tunnel_encapsulate(maker, pkt, 0.0)
            assert not isinstance(made, Drop)
            pool.append(bytes(made))
        dec = processing.tunnel_decapsulate
        elapsed = 0.0
        left = n
        while left:
            packets = pool[: min(left, len(pool))]
            left -= len(packets)
            _, sa = _sa_pair(alg, key)  # a new inbound SA: an empty replay window
            t0 = time.perf_counter()
            for wire in packets:
                dec(sa, wire, 0.0)
            elapsed += time.perf_counter() - t0
            if sa.counters.packets != len(packets):
                raise BenchError("ipsecct dropped its own packets")
        return elapsed

    return {"encrypt": encrypt, "decrypt": decrypt}


def _native_cases(alg: EncAlg, key: bytes, size: int) -> dict[str, Runner]:
    from ..ipsec import native

    pkt = inner_packet(size)
    out, _ = _sa_pair(alg, key)
    c_out = native.push(out, mtu=65535)
    maker = native.push(_sa_pair(alg, key)[0], mtu=65535)
    pool: list[bytes] = []

    def encrypt(n: int) -> float:
        seal = c_out.seal
        t0 = time.perf_counter()
        for _ in range(n):
            seal(pkt, 0.0)
        return time.perf_counter() - t0

    def decrypt(n: int) -> float:
        while len(pool) < min(n, _POOL_MAX):
            pool.append(maker.seal(pkt, 0.0))
        elapsed = 0.0
        left = n
        while left:
            packets = pool[: min(left, len(pool))]
            left -= len(packets)
            c_in = native.push(_sa_pair(alg, key)[1])  # an empty replay window
            opener = c_in.open
            t0 = time.perf_counter()
            for wire in packets:
                opener(wire, 0.0)
            elapsed += time.perf_counter() - t0
            if c_in.packets != len(packets):
                raise BenchError("the native path dropped its own packets")
        return elapsed

    return {"encrypt": encrypt, "decrypt": decrypt}


def native_available() -> bool:
    from ..ipsec import native

    return native.AVAILABLE


def _raw_cases(alg: EncAlg, key: bytes, size: int) -> dict[str, Runner]:
    aead = AESGCM(key[:-4]) if alg is EncAlg.AES_GCM_16 else ChaCha20Poly1305(key[:-4])
    pt_len = size + 2 + (-(size + 2)) % 4  # what ipsecct hands its AEAD: packet + ESP trailer
    pt = os.urandom(pt_len)
    nonce = key[-4:] + bytes(8)
    aad = bytes(8)
    ct_buf = bytearray(pt_len + 16)
    pt_buf = bytearray(pt_len)
    ct = aead.encrypt(nonce, pt, aad)

    def encrypt(n: int) -> float:
        enc = aead.encrypt_into
        t0 = time.perf_counter()
        for _ in range(n):
            enc(nonce, pt, aad, ct_buf)
        return time.perf_counter() - t0

    def decrypt(n: int) -> float:
        dec = aead.decrypt_into
        t0 = time.perf_counter()
        for _ in range(n):
            dec(nonce, ct, aad, pt_buf)
        return time.perf_counter() - t0

    return {"encrypt": encrypt, "decrypt": decrypt}


def _scapy_cases(name: str, key: bytes, size: int) -> dict[str, Runner]:
    from scapy.layers.inet import IP
    from scapy.layers.ipsec import ESP
    from scapy.layers.ipsec import SecurityAssociation as ScapySA

    def sa() -> Any:
        return ScapySA(  # type: ignore[no-untyped-call]
            ESP,
            spi=_SPI,
            crypt_algo=name,
            crypt_key=key,
            tunnel_header=IP(src=str(_SRC), dst=str(_DST)),
        )

    out = sa()
    inn = sa()
    pkt = IP(inner_packet(size))
    pool = [out.encrypt(pkt) for _ in range(16)]

    def encrypt(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            out.encrypt(pkt)
        return time.perf_counter() - t0

    def decrypt(n: int) -> float:
        packets = [pool[i % len(pool)].copy() for i in range(n)]  # decrypt alters its input
        t0 = time.perf_counter()
        for p in packets:
            inn.decrypt(p)
        return time.perf_counter() - t0

    return {"encrypt": encrypt, "decrypt": decrypt}


def scapy_available() -> bool:
    try:
        import scapy.layers.ipsec  # noqa: F401
    except ImportError:
        return False
    return True


def measure(
    *,
    impls: Sequence[str] = IMPLS,
    transforms: Sequence[str] = tuple(TRANSFORMS),
    sizes: Sequence[int] = SIZES,
    ops: Sequence[str] = OPS,
    run_time: float = 0.2,
    rounds: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[CodecFigure]:
    """Measure every case; the cases are interleaved, ``rounds`` runs of about ``run_time``
    seconds each, and a case's rate is its best run (packets per second)."""
    cases: list[tuple[tuple[str, str, int, str], Runner]] = []
    for tname in transforms:
        alg, klen, scapy_name = TRANSFORMS[tname]
        key = os.urandom(klen)
        for size in sizes:
            for impl in impls:
                if impl == "ipsecct":
                    runners = _ipsecct_cases(alg, key, size)
                elif impl == "raw-aead":
                    runners = _raw_cases(alg, key, size)
                elif impl == "native":
                    runners = _native_cases(alg, key, size)
                else:
                    runners = _scapy_cases(scapy_name, key, size)
                for op in ops:
                    cases.append(((impl, tname, size, op), runners[op]))
    best: dict[tuple[str, str, int, str], float] = {}
    for r in range(rounds):
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
        for case, run in cases:
            rate = best.get(case)
            # The first run calibrates with a few packets; later ones aim at run_time.
            n = max(8, int(rate * run_time)) if rate else (8 if case[0] == "scapy" else 1000)
            elapsed = run(n)
            pps = n / elapsed if elapsed > 0 else float("inf")
            if rate is None or pps > rate:
                best[case] = pps
    return [CodecFigure(*case, pps=best[case]) for case, _ in cases]


def to_json(results: Iterable[CodecFigure]) -> str:
    return json.dumps({"results": [asdict(r) for r in results]})


def format_table(results: Sequence[CodecFigure]) -> str:
    """One row per (transform, size, operation): each implementation's rate and the ratios."""
    rates = {(r.impl, r.transform, r.size, r.op): r.pps for r in results}
    keys = sorted(
        {(r.transform, r.size, r.op) for r in results},
        key=lambda k: (list(TRANSFORMS).index(k[0]), k[1], OPS.index(k[2])),
    )
    head = (
        f"{'transform':<18} {'size':>5} {'op':<8} {'ipsecct':>10} {'raw-aead':>10}"
        f" {'scapy':>9} {'ipsecct/raw':>12} {'ipsecct/scapy':>14} {'native':>10}"
        f" {'native/raw':>11}"
    )
    lines = [head, "-" * len(head)]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    for t, size, op in keys:
        ours = rates.get(("ipsecct", t, size, op))
        raw = rates.get(("raw-aead", t, size, op))
        scapy = rates.get(("scapy", t, size, op))
        r_raw = f"{ours / raw:.2f}" if ours and raw else "-"
        r_scapy = f"{ours / scapy:.0f}x" if ours and scapy else "-"
        nat = rates.get(("native", t, size, op))
        r_nat = f"{nat / raw:.2f}" if nat and raw else "-"
        lines.append(
            f"{t:<18} {size:>5} {op:<8} {fmt(ours):>10} {fmt(raw):>10} {fmt(scapy):>9}"
            f" {r_raw:>12} {r_scapy:>14} {fmt(nat):>10} {r_nat:>11}"
        )
    lines.append("packets per second, best run of each case; sizes are inner IP packets (octets)")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Add ``ipsecct bench codec`` to the ``bench`` subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "codec",
        help="ESP encrypt/decrypt packets per second: ipsecct, raw AEAD calls, Scapy",
        description="ESP encrypt and decrypt packets per second for ipsecct, the raw AEAD call"
        " (the floor for Python) and Scapy, measured in the same run. See benchmarks/README.md.",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--time",
        type=number(float, high=60),
        default=0.2,
        metavar="SECONDS",
        help="length of one run of one case (default 0.2)",
    )
    p.add_argument(
        "--rounds",
        type=number(int, high=1000),
        default=5,
        metavar="N",
        help="runs of each case, interleaved; the best counts (default 5)",
    )
    p.add_argument(
        "--impl",
        action="append",
        choices=IMPLS,
        metavar="IMPL",
        help=f"measure only this implementation (repeatable; {', '.join(IMPLS)})",
    )
    p.add_argument(
        "--transform",
        action="append",
        choices=tuple(TRANSFORMS),
        metavar="NAME",
        help=f"only this transform (repeatable; {', '.join(TRANSFORMS)})",
    )
    p.add_argument(
        "--size",
        action="append",
        type=int,
        choices=SIZES,
        metavar="OCTETS",
        help="only this inner packet size (repeatable; 64, 1400)",
    )
    p.set_defaults(handler=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    impls: list[str] = list(dict.fromkeys(args.impl or IMPLS))
    if "scapy" in impls and not scapy_available():
        print("ipsecct bench codec: Scapy is not installed: skipping it", file=sys.stderr)
        impls.remove("scapy")
    if "native" in impls and not native_available():
        print(
            "ipsecct bench codec: the native data path is not available (not built, or"
            " IPSECCT_PURE_PYTHON is set): skipping it",
            file=sys.stderr,
        )
        impls.remove("native")
    results = measure(
        impls=impls,
        transforms=list(dict.fromkeys(args.transform or TRANSFORMS)),
        sizes=list(dict.fromkeys(args.size or SIZES)),
        run_time=args.time,
        rounds=args.rounds,
        progress=None if args.json else lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(to_json(results) if args.json else format_table(results))
    return 0

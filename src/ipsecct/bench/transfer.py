"""``ipsecct bench transfer``: how fast context transfer moves SAs, against re-keying them.

All measured in one run, on loopback, between two real gateways of one process (the demo's
nodes, with TLS 1.3 and mutual certificate authentication on persistent connections):

- ``handover_ms``: median time from the operator's trigger to the target's tunnel being active,
  over single-tunnel handovers back and forth (each moves 2 SAs).
- ``prepared_handover_ms``: the same for prepared transfers (``transfer --prepare``, then the
  trigger ``transfer --commit``), from the commit; alternated with the others.
- ``bulk_sas_per_s``: SAs moved per second by one batched transfer of ``--bulk`` SAs.
- ``baseline_sas_per_s``: SAs per second re-created from scratch with a key exchange of equal
  strength: for each tunnel, an X25519 key pair on each side, both exchanges, the same HKDF
  key derivation for both SAs, and the gateway's two SAs built (network round trips left out,
  which favours the baseline).
- ``bytes_per_sa``: resident memory per SA of a gateway holding ``--memory-sas`` SAs (tunnels
  with AES-GCM-128 SAs, 1024-packet windows and selectors), from the process's RSS.
- ``encode_us``, ``decode_us``: CPU microseconds per SA of the context codec the transfers use,
  and ``encode_reference_us``, ``decode_reference_us``: the same by the reference codec, in the
  same run (the ratio is the gain of the fast reader and writer).

The process runs the gateway's garbage-collector policy (:mod:`ipsecct.gateway.gcpolicy`), as
``ipsecct gateway run`` does; ``--default-gc`` leaves CPython's collector as it is, for the
comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..commands.args import number
from ..ct.transfer import Record
from ..errors import BenchError
from ..gateway import gcpolicy
from ..ipsec.engine import Engine
from ..ipsec.sad import Direction, SecurityAssociation, UdpEncap
from ..ipsec.spd import Action, Selectors, SPDEntry


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_tunnel(engine: Engine, i: int, local: str, peer: str) -> None:
    a = ipaddress.ip_address
    sel = Selectors.between("10.2.0.0/16", str(ipaddress.ip_address("10.64.0.0") + i))
    common: dict[str, Any] = dict(
        esn=True, replay_window=1024, selectors=sel, encap=UdpEncap(), name=f"t{i}"
    )
    out = SecurityAssociation(
        0x1000000 + i, Direction.OUTBOUND, a(local), a(peer), enc_key=os.urandom(20), **common
    )
    inn = SecurityAssociation(
        0x2000000 + i, Direction.INBOUND, a(peer), a(local), enc_key=os.urandom(20), **common
    )
    engine.add_tunnel(SPDEntry(sel, Action.PROTECT, name=f"t{i}", static=False), out, inn)


def bytes_per_sa(n_sas: int) -> tuple[float, float]:
    """Resident bytes per SA as installed, and once every SA has carried a packet (which
    makes its cipher context, about 2.5 KiB of OpenSSL state)."""
    gc.collect()
    e = Engine()
    before = _rss()
    for i in range(n_sas // 2):
        make_tunnel(e, i, "127.0.1.1", "127.0.1.10")
    gc.collect()
    installed = _rss()
    assert len(e.sad) == n_sas
    for sa in e.sad:
        sa.transform.seal_payload(sa.spi, 1, b"x", 59, 0, sa.esn)  # what a first packet does
    gc.collect()
    active = _rss()
    return (installed - before) / n_sas, (active - before) / n_sas


def codec(n_sas: int = 2000, rounds: int = 5) -> dict[str, float]:
    """CPU microseconds per SA to encode and decode contexts of the bench's SAs (AES-GCM-128,
    ESN, 1024-packet windows, selectors, a name), by the fast path (what transfers use) and by
    the reference path, in the same run: best of ``rounds``, CPU time (steadier than wall
    time on a shared machine)."""
    from ..ct import context

    e = Engine()
    for i in range(n_sas // 2):
        make_tunnel(e, i, "127.0.1.1", "127.0.1.10")
    sas = list(e.sad)
    for sa in sas:  # inbound SAs carry anti-replay state, as a live tunnel's do
        if sa.direction is Direction.INBOUND:
            for seq in (1, 2, 3, 7, 900):
                sa.window.check_and_update(seq)
    now = time.monotonic()
    cdbs = [context.encode(sa, now) for sa in sas]
    cases: dict[str, Any] = {
        "encode_us": lambda: [context.encode(sa, now) for sa in sas],
        "encode_reference_us": lambda: [context.encode_reference(sa, now) for sa in sas],
        "decode_us": lambda: [context.decode(c, now) for c in cdbs],
        "decode_reference_us": lambda: [context.decode_reference(c, now) for c in cdbs],
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, fn in cases.items():  # interleaved: noise hits every case alike
            gc.collect()
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    return {k: round(v / len(sas) * 1e6, 2) for k, v in best.items()}


def baseline(n_sas: int) -> float:
    """SAs/s re-created with an X25519 exchange and HKDF, as a re-key would."""
    a = ipaddress.ip_address
    sel = Selectors.between("10.2.0.0/16", "10.64.0.1")
    t0 = time.perf_counter()
    for i in range(n_sas // 2):
        mn, sg = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        mn_pub, sg_pub = mn.public_key(), sg.public_key()
        shared_sg = sg.exchange(mn_pub)
        mn.exchange(sg_pub)  # the MN's side of the same exchange
        keys = HKDF(hashes.SHA256(), 40, None, b"ipsecct baseline child sa").derive(shared_sg)
        SecurityAssociation(
            0x1000000 + i,
            Direction.OUTBOUND,
            a("127.0.1.1"),
            a("127.0.1.10"),
            enc_key=keys[:20],
            esn=True,
            replay_window=1024,
            selectors=sel,
        )
        SecurityAssociation(
            0x2000000 + i,
            Direction.INBOUND,
            a("127.0.1.10"),
            a("127.0.1.1"),
            enc_key=keys[20:],
            esn=True,
            replay_window=1024,
            selectors=sel,
        )
    return n_sas / (time.perf_counter() - t0)


async def handover(
    ts: dict[str, Any], src: str, dst: str, spis: list[int],
    on_activated: Callable[[], None] | None = None,
    *,
    prepare: bool = False,
) -> tuple[Record, float]:
    """One transfer of ``spis`` from gateway ``src`` to ``dst`` (their TransferServices in
    ``ts``), as the operator's trigger makes it: (the target's record, seconds from the
    trigger to its activation). ``on_activated`` is called the moment the target reports it
    (for the benchmarks that stamp their own steps). BenchError if it does not commit.
    ``prepare``: prepared first (``transfer --prepare``), and the trigger is its commit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Record] = loop.create_future()

    def cb(rec: Record) -> None:
        if rec.role == "target" and rec.outcome == "committed" and not fut.done():
            fut.set_result(rec)
            if on_activated is not None:
                on_activated()

    ts[dst].listeners.append(cb)
    try:
        if prepare:
            ready = await ts[src].transfer(spis, dst, timeout=120, prepare=True)
            if not ts[src].core.prepared(ready.transfer_id):
                raise BenchError(f"transfer not prepared: {ready.outcome}: {ready.detail}")
            t0 = time.monotonic()
            srec = await ts[src].commit(ready.transfer_id)
        else:
            t0 = time.monotonic()
            srec = await ts[src].transfer(spis, dst, timeout=120)
        if srec.outcome != "committed":
            raise BenchError(f"transfer {srec.outcome}: {srec.detail}")
        rec = await asyncio.wait_for(fut, 120)
        return rec, rec.ended - t0
    finally:
        ts[dst].listeners.remove(cb)


async def _transfers(handovers: int, bulk: int) -> tuple[list[float], list[float], float]:
    from ..demo import handover as demo_handover
    from ..demo import topology as demo

    with tempfile.TemporaryDirectory(prefix="ipsecct-bench-") as tmp:
        dm = await demo.build(Path(tmp))
        try:
            await demo_handover.setup(dm)
            gcpolicy.POLICY.settle()  # as a gateway does after start-up (when the policy is on)
            ts = {g: demo_handover.transfer_service(dm, g) for g in dm.gateways}
            times: list[float] = []
            prepared: list[float] = []
            for i in range(handovers):
                # a plain and a prepared handover, there and back, in turns (either first)
                for prep in (False, True) if i % 2 == 0 else (True, False):
                    src, dst = ("sg1", "sg2") if prep == (i % 2 == 1) else ("sg2", "sg1")
                    spi = ts[src].node.engine.tunnels()[0].outbound.spi
                    took = (await handover(ts, src, dst, [spi], prepare=prep))[1] * 1000
                    (prepared if prep else times).append(took)
                    await asyncio.sleep(0.005)
            # Bulk: sg1 gets bulk/2 more tunnels, then moves them all in one exchange.
            eng = ts["sg1"].node.engine
            for i in range(bulk // 2):
                make_tunnel(eng, i, demo.ADDRESS["sg1"], demo.ADDRESS["mn"])
            spis = [t.outbound.spi for t in eng.tunnels() if t.name.startswith("t")]
            # The source's tunnels were made here, not by a gateway's installs (which freeze
            # a bulk install's objects when the policy is on): collect, and freeze if on.
            gc.collect()
            gcpolicy.POLICY.settle()
            _, elapsed = await handover(ts, "sg1", "sg2", spis)
            return times, prepared, bulk / elapsed
        finally:
            await demo.stop(dm)
            gc.unfreeze()


def run(handovers: int, bulk: int, memory_sas: int) -> tuple[dict[str, float], float]:
    """The results of the issue's JSON schema, and the bytes per SA once all are active."""
    times, prepared, bulk_rate = asyncio.run(_transfers(handovers, bulk))
    idle, active = bytes_per_sa(memory_sas)
    return {
        "handover_ms": round(statistics.median(times), 3),
        "prepared_handover_ms": round(statistics.median(prepared), 3),
        "bulk_sas_per_s": round(bulk_rate, 1),
        "baseline_sas_per_s": round(baseline(min(bulk, 4000)), 1),
        "bytes_per_sa": round(idle, 1),
        **codec(),
    }, active


def run_cli(args: argparse.Namespace) -> int:
    gcpolicy.POLICY.enabled = not args.default_gc  # this process holds two gateways
    res, active = run(args.handovers, args.bulk, args.memory_sas)
    if args.json:
        json.dump(res, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print("ipsecct bench transfer (loopback, TLS 1.3, one process)")
    print(
        f"  single-tunnel handover, median of {args.handovers}: {res['handover_ms']:.3f} ms"
        "  (goal <= 2 ms)"
    )
    print(
        f"  prepared ahead (transfer --prepare), from its commit, median of {args.handovers}:"
        f" {res['prepared_handover_ms']:.3f} ms"
    )
    ratio = res["bulk_sas_per_s"] / res["baseline_sas_per_s"]
    print(
        f"  bulk transfer of {args.bulk} SAs: {res['bulk_sas_per_s']:,.0f} SAs/s  (goal >= 20,000)"
    )
    print(
        f"  re-keying baseline (X25519 + HKDF): {res['baseline_sas_per_s']:,.0f} SAs/s"
        f"  -> transfer is {ratio:.2f}x the baseline"
    )
    print(
        f"  context codec, CPU us per SA: encode {res['encode_us']:.1f}"
        f" (reference {res['encode_reference_us']:.1f},"
        f" {res['encode_reference_us'] / res['encode_us']:.1f}x),"
        f" decode {res['decode_us']:.1f} (reference {res['decode_reference_us']:.1f},"
        f" {res['decode_reference_us'] / res['decode_us']:.1f}x)"
    )
    print(
        f"  memory: {res['bytes_per_sa']:,.0f} bytes per SA with {args.memory_sas} SAs"
        f" installed (goal <= 4096), {active:,.0f} once every SA has carried a packet"
    )
    return 0


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "transfer", help="handover time, bulk transfer rate and memory per SA",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--default-gc",
        action="store_true",
        help="leave CPython's collector as it is (no gateway GC policy): the comparison",
    )
    p.add_argument("--handovers", type=number(int, high=10_000), default=41,
                   help="single handovers (41)")
    p.add_argument("--bulk", type=number(int, high=100_000), default=10000,
                   help="SAs in the bulk transfer (10000, at most 100000)")
    p.add_argument(
        "--memory-sas",
        type=number(int, high=1_000_000),
        default=100000,
        help="SAs held for the memory figure (100000)",
    )
    p.set_defaults(handler=run_cli)

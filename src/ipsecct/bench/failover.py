"""``ipsecct bench failover``: how long a take-over of N tunnels takes once the failed
gateway's lease has surely expired, and whether anything was lost, dropped or reused.

Both modes run the real code in one process, on real engines (AES-GCM-16, ESN, 1024-packet
windows), with one peer engine holding the other end of every tunnel (the mobile nodes):

- ``pair``: the active replicates its N tunnels to the standby (the Replicator and Standby,
  messages through the CXTP wire form, the standby's ACKs granting the lease), sends traffic
  on every tunnel, then dies. When the standby's wait after its last grant has passed, the
  clock starts: ``Standby.take_over`` installs every tunnel (sequence numbers advanced by the
  margin) and one SG_UPDATE per tunnel is encrypted for the peers.
- ``etcd``: a real etcd member (Debian's etcd-server) on loopback. The failed member joined
  with its home groups (owner keys under its lease) and recorded its N tunnels in them; the
  survivor holds the replicas. The lease is revoked (what its expiry does) and the clock
  starts: the survivor reads the member, group and tunnel keys, plans its share of the
  orphaned groups, creates their owner keys (one transaction) and installs their tunnels,
  as the gateway does (``gateway/cluster_driver.py``). ``--per-tunnel`` measures the former
  scheme instead: one owner key per tunnel, created in transactions of 128.

After the take-over every tunnel carries one more packet from its new gateway to its peer.
Like a gateway process (``ipsecct gateway run``), the benchmark runs with the gateway's collector
policy (``gateway/gcpolicy.py``): the state built before the failure is frozen, and the
take-over runs as one batch with the collector paused, as the drivers run it;
``--default-gc`` leaves CPython's collector as it is, for comparison.

``takeover_ms``: from lease expiry to the last tunnel installed and signalled; ``lost``:
tunnels whose packet did not reach the peer; ``replay_drops``: packets the peers dropped as
replays; ``reused_nonces``: (SPI, sequence number) pairs sent by both gateways.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from typing import Any

from ..commands.args import number
from ..ct import cxtp, failover, ownership
from ..ct.transfer import Identity
from ..gateway import gcpolicy
from ..ipsec import processing
from ..ipsec.engine import Engine, Signal, ToInner, ToPeer, Tunnel
from ..ipsec.esp import Drop
from ..ipsec.ippacket import Endpoint
from ..ipsec.sad import Direction, SecurityAssociation, UdpEncap
from ..ipsec.spd import Action, Selectors, SPDEntry

GW_A, GW_B, PEER = "127.0.5.1", "127.0.5.2", "127.0.5.10"


def _packet(i: int) -> bytes:
    from ..ipsec.ippacket import build_udp

    dst = ipaddress.ip_address("10.64.0.0") + i
    return bytes(build_udp(ipaddress.ip_address("10.2.0.1"), dst, 7000, 7000, b"x" * 32))


def _add_end(engine: Engine, sel: Selectors, name: str, local: Any, remote: Any,
             out: tuple[int, bytes], inb: tuple[int, bytes]) -> None:  # fmt: skip
    """One end of a tunnel on ``engine``: its outbound SA (``out``: SPI and key) from
    ``local`` to ``remote`` and its inbound SA (``inb``) the other way, both with ``sel``
    (AES-GCM-16, ESN, a 1024-packet window, in UDP)."""
    common: dict[str, Any] = dict(esn=True, replay_window=1024, encap=UdpEncap())
    engine.add_tunnel(
        SPDEntry(sel, Action.PROTECT, name=name, static=False),
        SecurityAssociation(
            out[0], Direction.OUTBOUND, local, remote, enc_key=out[1], selectors=sel, name=name,
            **common,
        ),
        SecurityAssociation(
            inb[0], Direction.INBOUND, remote, local, enc_key=inb[1], selectors=sel, name=name,
            **common,
        ),
    )


def build(n: int) -> tuple[Engine, Engine]:
    """The active gateway with n tunnels, and one peer engine with their other ends."""
    a = ipaddress.ip_address
    gw, peer = Engine(a(GW_A)), Engine(a(PEER))
    for i in range(n):
        down = (0x1000000 + i, os.urandom(20))  # gateway -> peer: SPI, key
        up = (0x2000000 + i, os.urandom(20))
        mn = str(ipaddress.ip_address("10.64.0.0") + i)
        s_gw = Selectors.between("10.2.0.0/16", mn)
        s_mn = Selectors.between(mn, "10.2.0.0/16")
        _add_end(gw, s_gw, f"t{i}", a(GW_A), a(PEER), down, up)
        _add_end(peer, s_mn, f"m{i}", a(PEER), a(GW_A), up, down)
    return gw, peer


class Wire:
    """What the gateways sent to the peers: (SPI, seq) by sender, and the peers' verdicts."""

    def __init__(self, peer: Engine) -> None:
        self.peer = peer
        self.sent: dict[str, set[tuple[int, int]]] = {"a": set(), "b": set()}
        self.delivered: Counter[int] = Counter()

    def send(self, who: str, data: bytes | bytearray, now: float) -> None:
        spi = int.from_bytes(data[0:4], "big")
        seq = int.from_bytes(data[4:8], "big")
        self.sent[who].add((spi, seq))
        res = self.peer.inbound(data, ipaddress.ip_address(PEER), now)
        if isinstance(res, ToInner | Signal):
            self.delivered[spi] += 1

    def reused(self) -> int:
        return len(self.sent["a"] & self.sent["b"])


def _cfg(role: str, peer: str) -> failover.FailoverConfig:
    return failover.FailoverConfig(role, peer, dead_ms=500, heartbeat_ms=100)


def _replicated(
    n: int, *, peer_lease: bool = True
) -> tuple[Engine, Engine, failover.Standby, Wire, float]:
    """Active with n tunnels carrying traffic, replicated to a standby; the active dies."""
    gw, peer = build(n)
    wire = Wire(peer)
    rep = failover.Replicator(gw, _cfg("active", "sg2"), peer_lease=peer_lease)
    if not peer_lease:
        gw.send_until = float("inf")  # etcd's lease, held throughout
    sb_engine = Engine(ipaddress.ip_address(GW_B))
    sb = failover.Standby(
        sb_engine,
        _cfg("standby", "sg1"),
        Endpoint(ipaddress.ip_address(GW_B), 4500),
        Identity.DIRECT,
        peer_lease=peer_lease,
    )
    now = 1000.0

    def exchange(t: float) -> None:
        for m in rep.poll(t):
            d = cxtp.decode(cxtp.encode(m))
            assert isinstance(d, cxtp.CTD)
            for r in sb.receive(d, t):
                rep.receive(cxtp.decode(cxtp.encode(r)), t)

    exchange(now)  # replicated once, lease granted
    tunnels = gw.tunnels()
    for _k in range(3):  # traffic on every tunnel, replicated as the sync rule says
        now += 0.05
        for i, t in enumerate(tunnels):
            send(wire, "a", gw, t, i, now)
        exchange(now)
    for i, t in enumerate(tunnels):  # and some after the last sync, then the active dies
        send(wire, "a", gw, t, i, now)
    return sb_engine, peer, sb, wire, now


def send(wire: Wire, who: str, engine: Engine, t: Tunnel, i: int, now: float) -> None:
    """One packet on tunnel ``t`` as the engine would send it (fence included), without the
    SPD's first-packet lookup, which is linear in the number of policies and would dominate
    the set-up of 10,000 tunnels."""
    if engine.fenced(t, now):
        return
    res = processing.tunnel_encapsulate(t.outbound, _packet(i), now)
    if not isinstance(res, Drop):
        wire.send(who, res, now)


def _finish(
    mode: str,
    n: int,
    sb_engine: Engine,
    wire: Wire,
    signals: list[Any],
    t0: float,
    now: float,
    prepared: int,
) -> dict[str, Any]:
    for sa, payload in signals:
        sig = sb_engine.signal(sa, payload, now)
        if isinstance(sig, ToPeer):
            wire.send("b", sig.data, now)
    takeover_ms = (time.perf_counter() - t0) * 1000
    # The peers follow the SG_UPDATE (each peer engine's outbound SA now names GW_B); one
    # packet per tunnel from the new gateway.
    before = Counter(wire.delivered)
    for t in sb_engine.tunnels():
        send(wire, "b", sb_engine, t, t.outbound.spi - 0x1000000, now)
    got = sum(1 for spi in range(0x1000000, 0x1000000 + n) if wire.delivered[spi] > before[spi])
    return {
        "mode": mode,
        "tunnels": n,
        "takeover_ms": round(takeover_ms, 3),
        "lost": n - got,
        "replay_drops": wire.peer.stats.drops["replay"],
        "reused_nonces": wire.reused(),
        "prepared": prepared,
    }


def bench_pair(n: int, cold: bool = False) -> dict[str, Any]:
    sb_engine, _peer, sb, wire, now = _replicated(n)
    prepared = 0 if cold else sb.prepare(n)
    assert sb.grant is not None
    deadline = sb.grant.deadline()
    assert deadline is not None
    now = max(now + 0.5, deadline)  # the standby's wait after its last grant has passed
    assert sb.dead(now)
    gcpolicy.POLICY.settle()  # what a gateway holds before the failure is frozen
    t0 = time.perf_counter()
    with gcpolicy.POLICY.batch():  # as gateway/failover_driver.py takes over
        tunnels, signals, _rec = sb.take_over(now)
        assert len(tunnels) == n
        return _finish("pair", n, sb_engine, wire, signals, t0, now, prepared)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_etcd(n: int, cold: bool = False, per_tunnel: bool = False) -> dict[str, Any]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("ipsecct: error: bench failover --mode etcd needs etcd (etcd-server)")
    sb_engine, _peer, sb, wire, now = _replicated(n, peer_lease=False)
    prepared = 0 if cold else sb.prepare(n)
    cport, pport = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [
                etcd,
                "--name",
                "b",
                "--data-dir",
                os.path.join(d, "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{cport}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{cport}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{pport}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{pport}",
                "--initial-cluster",
                f"b=http://127.0.0.1:{pport}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{cport}/health", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("ipsecct: error: etcd did not start") from None
                    time.sleep(0.1)
            takeover = _etcd_per_tunnel if per_tunnel else _etcd_grouped
            r = asyncio.run(takeover(n, f"http://127.0.0.1:{cport}", sb_engine, sb, wire, now))
            r["prepared"] = prepared
            return r
        finally:
            proc.terminate()
            proc.wait(10)


async def _etcd_grouped(
    n: int, endpoint: str, sb_engine: Engine, sb: failover.Standby, wire: Wire, now: float
) -> dict[str, Any]:
    from ..gateway.cluster_driver import read_ownership
    from ..gateway.etcd import EtcdClient

    c = EtcdClient([endpoint], timeout=5.0)
    keys = ownership.keys("bench")
    dead, me = ownership.Ownership("bench", "sg1"), ownership.Ownership("bench", "sg2")
    dead_lease, _ = await c.grant(60)
    my_lease, _ = await c.grant(60)
    assert await c.txn(dead.join(dead_lease, ""))
    dead.joined()
    assert await c.txn(me.join(my_lease, ""))
    me.joined()
    spis = sorted(sb.replica)
    per = ownership.MAX_TXN_OPS - 1
    for i in range(0, n, per):
        assert await c.txn(dead.place(spis[i : i + per]))
    await c.revoke(dead_lease)  # the failed member's lease ends here
    gcpolicy.POLICY.settle()
    t0 = time.perf_counter()
    members = {kv.key[len(keys["members"]) :] for kv in await c.get_prefix(keys["members"])}
    groups, tunnels = await read_ownership(c, keys)
    orphans = ownership.orphans(groups, tunnels)
    share = ownership.plan_groups(sorted(orphans), members | {"sg2"})["sg2"]
    assert await c.txn(me.adopt(share))
    tunnels = (await read_ownership(c, keys))[1]  # read again once ours (the driver's _adopt)
    etcd_ms = (time.perf_counter() - t0) * 1000
    with gcpolicy.POLICY.batch():  # as gateway/cluster_driver.py installs
        taken = me.adopted(share, tunnels)
        tunnels_, signals, _rec = sb.take_over(now, taken)
        assert len(tunnels_) == n, (len(tunnels_), n)
        r = _finish("etcd", n, sb_engine, wire, signals, t0, now, 0)
    r["etcd_ms"] = round(etcd_ms, 3)
    r["owner_keys"] = len(share)
    r["etcd_requests"] = c.calls
    return r


async def _etcd_per_tunnel(
    n: int, endpoint: str, sb_engine: Engine, sb: failover.Standby, wire: Wire, now: float
) -> dict[str, Any]:
    """The former scheme: one owner key per tunnel (``owners/<spi>``), for comparison."""
    from ..gateway.etcd import MAX_TXN_OPS, EtcdClient

    c = EtcdClient([endpoint], timeout=5.0)
    base = ownership.keys("bench")["members"].rsplit("/", 2)[0] + "/"
    owners, members_p = base + "owners/", base + "members/"
    dead_lease, _ = await c.grant(60)
    me, _ = await c.grant(60)
    await c.put(members_p + "sg1", "{}", lease=dead_lease)
    await c.put(members_p + "sg2", "{}", lease=me)
    spis = sorted(sb.replica)
    for i in range(0, n, MAX_TXN_OPS):
        setup = [f"{owners}{s:08x}" for s in spis[i : i + MAX_TXN_OPS]]
        assert await c.create_many(setup, "sg1", lease=dead_lease)
    await c.revoke(dead_lease)
    gcpolicy.POLICY.settle()
    t0 = time.perf_counter()
    members = {kv.key[len(members_p) :] for kv in await c.get_prefix(members_p)}
    owned = {ownership.spi_of_key(kv.key) for kv in await c.get_prefix(owners, keys_only=True)}
    orphans = [s for s in spis if s not in owned]
    share = ownership.plan(orphans, members)["sg2"]
    by_key = {f"{owners}{s:08x}": s for s in share}
    taken = [by_key[k] for k in await c.create_all(list(by_key), "sg2", lease=me)]
    etcd_ms = (time.perf_counter() - t0) * 1000
    with gcpolicy.POLICY.batch():
        tunnels, signals, _rec = sb.take_over(now, taken)
        assert len(tunnels) == n, (len(tunnels), n)
        r = _finish("etcd", n, sb_engine, wire, signals, t0, now, 0)
    r["etcd_ms"] = round(etcd_ms, 3)
    r["owner_keys"] = len(share)
    r["scheme"] = "per-tunnel"
    return r


def run_cli(args: argparse.Namespace) -> int:
    gcpolicy.POLICY.enabled = not args.default_gc  # a gateway process's collector policy
    results = []
    for mode in args.mode:
        if mode == "pair":
            results.append(bench_pair(args.tunnels, args.cold))
        else:
            results.append(bench_etcd(args.tunnels, args.cold, args.per_tunnel))
    if args.json:
        json.dump({"results": results}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for r in results:
        print(
            f"{r['mode']:<5} {r['tunnels']} tunnels: take-over {r['takeover_ms']:.1f} ms after"
            f" the lease expired; lost {r['lost']}, replay drops {r['replay_drops']},"
            f" reused nonces {r['reused_nonces']}"
        )
    return 0


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "failover",
        help="take-over time of N tunnels after the lease expires",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--tunnels", type=number(int, high=100_000), default=10000,
                   help="tunnels (10000, at most 100000)")
    p.add_argument(
        "--cold",
        action="store_true",
        help="every replica changed just before the failure (none decoded ahead)",
    )
    p.add_argument(
        "--default-gc",
        action="store_true",
        help="leave CPython's collector as it is (not the gateway's policy), for comparison",
    )
    p.add_argument(
        "--per-tunnel",
        action="store_true",
        help="etcd mode: one owner key per tunnel (the former scheme), for comparison",
    )
    p.add_argument(
        "--mode",
        action="append",
        choices=["pair", "etcd"],
        default=None,
        help="pair and/or etcd (default both)",
    )
    p.set_defaults(handler=_defaults)


def _defaults(args: argparse.Namespace) -> int:
    if not args.mode:
        args.mode = ["pair", "etcd"]
    return run_cli(args)

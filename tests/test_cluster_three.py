"""Three gateways and three etcd members (issue 9), as real processes on loopback.

sg1 serves a mobile node with six tunnels; sg2 and sg3 hold replicas. Then:

1. SIGKILL sg1 under traffic: once etcd expires its lease, its tunnels are spread over sg2
   and sg3 (each takes its rendezvous share), the MN follows every tunnel (SG_UPDATE inside
   the SA), traffic flows both ways, no replay or ICV drop at the MN.
2. SIGKILL the etcd leader: the survivors keep their leases (etcd elects a new leader and
   extends leases), and traffic keeps flowing all along.
3. Partition sg2 from etcd (its etcd connections go through a proxy that the test cuts; it
   still reaches sg3 and the MN): sg2 stops sending within its fence and says so; once etcd
   expires its lease, sg3 takes its tunnels over and everything flows through sg3.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipsecct.ct import ownership
from ipsecct.ipsec.ippacket import build_udp, parse, udp_payload
from tests.helpers.control import answers, ask, socket_of
from tests.helpers.deployment import cli
from tests.helpers.etcd_server import EtcdCluster
from tests.helpers.ports import free_port
from tests.helpers.processes import stop_all

pytestmark = [pytest.mark.slow]

K = 6
GW = {"sg1": "127.0.6.1", "sg2": "127.0.6.2", "sg3": "127.0.6.3"}
MN, HOST = "127.0.6.10", "127.0.6.20"
HOST_INNER = "10.2.0.1"


def mn_inner(i: int) -> str:
    return f"10.1.0.{i + 2}"


def spi_out(i: int) -> int:  # gateway -> MN
    return 0x20000001 + i


def spi_in(i: int) -> int:  # MN -> gateway
    return 0x10000001 + i


class Proxy:
    """TCP forwarders to etcd members; ``cut()`` drops every connection, now and later."""

    def __init__(self, targets: list[int]) -> None:
        self.cut_ = threading.Event()
        self.listeners: list[socket.socket] = []
        self.conns: list[socket.socket] = []
        self.ports: list[int] = []
        for t in targets:
            ls = socket.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen(64)
            self.listeners.append(ls)
            self.ports.append(ls.getsockname()[1])
            threading.Thread(target=self._accept, args=(ls, t), daemon=True).start()

    def _accept(self, ls: socket.socket, target: int) -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            if self.cut_.is_set():
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", target), timeout=2)
            except OSError:
                c.close()
                continue
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self.cut_.is_set():
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> None:
        self.cut_.set()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        for ls in self.listeners:
            ls.close()


class Three:
    def __init__(self, d: Path, endpoints: list[str], sg2_endpoints: list[str]) -> None:
        self.d = d
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        udp: Callable[[], int] = lambda: free_port(socket.SOCK_DGRAM)  # noqa: E731
        self.outer = {g: udp() for g in GW} | {"mn": udp()}
        self.inner = {g: udp() for g in GW} | {"mn": udp()}
        self.ct = {g: free_port(socket.SOCK_STREAM) for g in GW}
        self.host_port, self.app_port = udp(), udp()
        r = cli("pki", "init", "--dir", str(d / "pki"), "--gateways", "sg1,sg2,sg3")
        assert r.returncode == 0, r.stderr
        for i in range(K):
            down, up = os.urandom(20).hex(), os.urandom(20).hex()
            self._key(f"sg-t{i}.keys", f'out_enc = "{down}"\nin_enc = "{up}"\n')
            self._key(f"mn-t{i}.keys", f'out_enc = "{up}"\nin_enc = "{down}"\n')
        for g in GW:
            self._gateway(g, sg2_endpoints if g == "sg2" else endpoints)
        self._mn()
        self.host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.host.bind((HOST, self.host_port))
        self.host.settimeout(0.2)
        self.app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.app.bind((MN, self.app_port))
        self.app.settimeout(0.2)

    def _key(self, name: str, text: str) -> None:
        p = self.d / name
        p.write_text(text)
        os.chmod(p, 0o600)

    def _gateway(self, g: str, endpoints: list[str]) -> None:
        peers = "".join(
            f'[[peers]]\nname = "{p}"\naddress = "{GW[p]}:{self.ct[p]}"\nouter = "{GW[p]}"\n\n'
            for p in GW
            if p != g
        )
        tunnels = ""
        if g == "sg1":
            tunnels = "".join(
                f'[[tunnel]]\nname = "t{i}"\nlocal_ts = "10.2.0.0/24"\n'
                f'remote_ts = "{mn_inner(i)}/32"\npeer = "{MN}:{self.outer["mn"]}"\n'
                f'enc = "aes-gcm-16"\nesn = true\nreplay_window = 1024\n'
                f"spi_in = {spi_in(i)}\nspi_out = {spi_out(i)}\nkeys = \"sg-t{i}.keys\"\n\n"
                for i in range(K)
            )
        (self.d / f"{g}.toml").write_text(
            f'name = "{g}"\n\n[outer]\naddress = "{GW[g]}"\nport = {self.outer[g]}\n\n'
            f'[inner]\nkind = "udp"\nlisten = "{GW[g]}:{self.inner[g]}"\n'
            f'peer = "{HOST}:{self.host_port}"\n\n'
            f'[control]\nsocket = "{self.d}/{g}.sock"\n\n[log]\nlevel = "info"\n\n'
            f"{tunnels}"
            f'[transfer]\nlisten = "{GW[g]}:{self.ct[g]}"\ncert = "pki/{g}.pem"\n'
            f'key = "pki/{g}.key"\nca = "pki/ca.pem"\nidentity = "direct"\n\n{peers}'
            f'[cluster]\netcd = {json.dumps(endpoints)}\nname = "three"\nttl_s = 5\n'
        )

    def _mn(self) -> None:
        tunnels = "".join(
            f'[[tunnel]]\nname = "m{i}"\nlocal_ts = "{mn_inner(i)}/32"\n'
            f'remote_ts = "10.2.0.0/24"\npeer = "{GW["sg1"]}:{self.outer["sg1"]}"\n'
            f'enc = "aes-gcm-16"\nesn = true\nreplay_window = 1024\n'
            f"spi_out = {spi_in(i)}\nspi_in = {spi_out(i)}\nkeys = \"mn-t{i}.keys\"\n\n"
            for i in range(K)
        )
        (self.d / "mn.toml").write_text(
            f'name = "mn"\n\n[outer]\naddress = "{MN}"\nport = {self.outer["mn"]}\n\n'
            f'[inner]\nkind = "udp"\nlisten = "{MN}:{self.inner["mn"]}"\n'
            f'peer = "{MN}:{self.app_port}"\n\n'
            f'[control]\nsocket = "{self.d}/mn.sock"\n\n{tunnels}'
        )

    def config(self, n: str) -> str:
        return str(self.d / f"{n}.toml")

    def start(self, n: str) -> None:
        role = "node" if n == "mn" else "gateway"
        log = open(self.d / f"{n}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[n] = subprocess.Popen(
            [sys.executable, "-m", "ipsecct", role, "run", "--config", self.config(n)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30  # a Python process starting on a loaded machine
        while not answers(socket_of(self.config(n))):
            assert self.procs[n].poll() is None, self.log(n)
            assert time.monotonic() < deadline, self.log(n)
            time.sleep(0.1)

    def log(self, n: str) -> str:
        return (self.d / f"{n}.log").read_text(errors="replace")[-3000:]

    def status(self, n: str) -> dict[str, Any]:
        out: dict[str, Any] = ask(socket_of(self.config(n)), "status")
        return out

    def cluster(self) -> dict[str, Any]:
        r = cli("cluster", "status", "--json", "--config", self.config("sg3"))
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def wait(self, pred: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    def down(self, owners: dict[int, str], tag: int) -> int:
        """One packet host -> each MN address through the tunnel's owner; how many arrived."""
        for i in range(K):
            g = owners[i]
            pkt = build_udp(
                ipaddress.ip_address(HOST_INNER),
                ipaddress.ip_address(mn_inner(i)),
                7000,
                7000,
                bytes([tag, i]) + bytes(30),
            )
            self.host.sendto(pkt, (GW[g], self.inner[g]))
        return self._collect(self.app, tag)

    def up(self, tag: int) -> int:
        """One packet from each MN address to the host; how many arrived."""
        for i in range(K):
            pkt = build_udp(
                ipaddress.ip_address(mn_inner(i)),
                ipaddress.ip_address(HOST_INNER),
                7000,
                7000,
                bytes([tag, i]) + bytes(30),
            )
            self.app.sendto(pkt, (MN, self.inner["mn"]))
        return self._collect(self.host, tag)

    def _collect(self, s: socket.socket, tag: int) -> int:
        got: set[int] = set()
        deadline = time.monotonic() + 3
        while len(got) < K and time.monotonic() < deadline:
            try:
                data = s.recv(65535)
            except TimeoutError:
                continue
            _, _, payload = udp_payload(data, parse(data))
            if payload[0] == tag:
                got.add(payload[1])
        return len(got)

    def stop(self) -> None:
        stop_all(self.procs.values())
        self.host.close()
        self.app.close()


def leader(e: EtcdCluster, timeout: float = 30) -> str:
    """The member that says it leads, once one does (a loaded machine can be in the middle
    of an election, even one nobody caused: the election timeout is 500 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        for m in e.names:
            if e.procs[m].poll() is not None:
                continue
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{e.client[m]}/v3/maintenance/status", data=b"{}"
                )
                with urllib.request.urlopen(req, timeout=2) as r:
                    st = json.loads(r.read())
            except OSError:
                continue
            if st.get("leader") == st.get("header", {}).get("member_id"):
                return m
        if time.monotonic() > deadline:
            raise AssertionError("no etcd leader")
        time.sleep(0.1)


def test_three_gateways_three_etcd_members(tmp_path: Path) -> None:
    # The six tunnels' rendezvous shares between sg2 and sg3: both get some.
    # (By groups: a tunnel goes with its group, ranked by the group's bucket.)
    plan: dict[str, list[int]] = {"sg2": [], "sg3": []}
    for i in range(K):
        gid = ownership.home_group(0, ownership.bucket(spi_out(i), ownership.GROUPS))
        taker = ownership.successor(ownership.group_rank(gid), ["sg2", "sg3"])
        assert taker is not None
        plan[taker].append(spi_out(i))
    assert plan["sg2"] and plan["sg3"]
    with EtcdCluster(tmp_path, 3) as e:
        proxy = Proxy([e.client[m] for m in e.names])
        t = Three(tmp_path, e.endpoints, [f"http://127.0.0.1:{p}" for p in proxy.ports])
        try:
            for n in ("sg2", "sg3", "sg1", "mn"):
                t.start(n)
            t.wait(
                lambda: t.status("sg1").get("cluster", {}).get("owned_tunnels") == K,
                "sg1 owns its tunnels",
            )
            owners = {i: "sg1" for i in range(K)}
            assert t.down(owners, 1) == K and t.up(2) == K
            t.wait(
                lambda: all(
                    t.status(g)["cluster"]["replicas"].get("sg1") == K for g in ("sg2", "sg3")
                ),
                "sg2 and sg3 hold replicas of sg1's tunnels",
            )
            time.sleep(0.3)

            # 1. SIGKILL sg1 under traffic.
            os.kill(t.procs["sg1"].pid, signal.SIGKILL)
            t.procs["sg1"].wait(10)
            t.wait(
                lambda: len(t.cluster()["owners"]) == K
                and set(t.cluster()["owners"].values()) == {"sg2", "sg3"},
                "sg1's tunnels owned by sg2 and sg3",
                timeout=30,
            )
            cs = t.cluster()
            assert "sg1" not in cs["members"]
            owned = {int(k, 16): v for k, v in cs["owners"].items()}
            assert {spi for spi, g in owned.items() if g == "sg2"} == set(plan["sg2"])
            assert {spi for spi, g in owned.items() if g == "sg3"} == set(plan["sg3"])
            owners = {i: owned[spi_out(i)] for i in range(K)}
            t.wait(lambda: t.up(3) == K, "the MN follows every tunnel", timeout=30)
            assert t.down(owners, 4) == K

            # 2. SIGKILL the etcd leader: nobody with a valid lease stops.
            old = leader(e)
            e.kill(old)
            for k in range(8):  # about 4 s of traffic across the election
                assert t.down(owners, 10 + k) == K, k
                time.sleep(0.2)
            for g in ("sg2", "sg3"):
                st = t.status(g)["cluster"]
                assert st["lease"]["state"] == "held" and st["lease"]["losses"] == 0, st
            assert leader(e) != old
            drops = t.status("mn")["counters"]["drops"]
            assert drops["replay"] == 0 and drops["icv"] == 0, drops

            # 3. Partition sg2 from etcd.
            st2 = t.status("sg2")["cluster"]
            t.wait(
                lambda: t.status("sg3")["cluster"]["replicas"].get("sg2") == len(plan["sg2"]),
                "sg3 holds replicas of sg2's tunnels",
            )
            proxy.cut()
            time.sleep(st2["lease"]["fence_ms"] / 1000 + 0.1)
            mine2 = {i: "sg2" for i in range(K) if owners[i] == "sg2"}
            st = t.status("sg2")
            assert st["cluster"]["lease"]["state"] == "lost", st["cluster"]
            sent = st["counters"]["out_packets"]
            for i in mine2:  # offered to sg2: not one leaves it
                t.host.sendto(
                    build_udp(
                        ipaddress.ip_address(HOST_INNER),
                        ipaddress.ip_address(mn_inner(i)),
                        7000,
                        7000,
                        bytes([40, i]) + bytes(30),
                    ),
                    (GW["sg2"], t.inner["sg2"]),
                )
            time.sleep(0.5)
            assert t.status("sg2")["counters"]["out_packets"] == sent
            log2 = (tmp_path / "sg2.log").read_text()
            assert "event=cluster-lease-lost" in log2 and "stopped sending" in log2
            t.wait(
                lambda: set(t.cluster()["owners"].values()) == {"sg3"}
                and len(t.cluster()["owners"]) == K,
                "sg2's tunnels move to sg3",
                timeout=30,
            )
            everywhere = {i: "sg3" for i in range(K)}
            t.wait(lambda: t.up(50) == K, "the MN follows to sg3", timeout=30)
            assert t.down(everywhere, 51) == K
            drops = t.status("mn")["counters"]["drops"]
            assert drops["replay"] == 0 and drops["icv"] == 0, drops
        finally:
            t.stop()
            proxy.close()

"""``ipsecct bench ikev2``: an unmodified strongSwan client handed over between two gateways.

The topology (root; made for each run and removed after it)::

    "mn" ns                      "br" ns                       sg1 / sg2 ns          "host" ns
    strongSwan 5.9.8 client
    lo 10.1.0.2/32 (stream)
    acc0 192.168.20.10/24 ----- bridge "acc" ----- acc0 192.168.20.1 (sg1), .2 (sg2)
                                                   [VIP 192.168.20.100 on sg1: ct-indirect]
                                bridge "core" ---- core0 10.2.0.251 (sg1), .252 (sg2)
                                              \\-- eth0 10.2.0.1 --------------- (stream)

A UDP stream of 1000 packets/s runs each way between the client's inner address and the host
for a few seconds (``--time``); in its middle, the client is handed over from sg1 to sg2:

- ``strongswan-redirect``: both gateways are strongSwan; sg1 runs ``swanctl --redirect`` (RFC
  5685) and the client runs IKE_SA_INIT + IKE_AUTH with sg2, then deletes its SA with sg1
  (make-before-break);
- ``strongswan-reinitiate``: the client terminates its SA with sg1 and initiates from scratch
  with sg2 (the detection time of a real failure, DPD and retransmissions, is not counted);
- ``ct-indirect``: both gateways are ipsecct; ``ipsecct transfer`` moves the CHILD SA and the
  IKE SA to sg2 over the gateways' TLS channel and the virtual gateway address follows; the
  host's route is moved when the command returns (sg1 forwards meanwhile; by an ``ip
  -batch`` started before the stream, so that the move costs the machine no new process);
- ``ct-direct``: the same with direct SG identity: the client connects to sg1's own address
  with MOBIKE (strongSwan's default); after the transfer sg2 sends it, from sg2's address and
  under the moved IKE SA, an INFORMATIONAL with its address list (RFC 4555 §3.6) and the client
  moves its IKE SA to sg2; kernel-libipsec cannot move a CHILD SA, so the client then rekeys
  it with sg2 (no PFS configured: no key exchange); sg1 forwards what reaches it meanwhile;
- ``ct-indirect-prepared``, ``ct-direct-prepared``: the same, make-before-break as the
  redirect is: the transfer is prepared (``transfer --prepare``: the contexts wait at sg2,
  sg1 goes on carrying the stream) ``PREPARE_LEAD`` (0.5 s, at most a quarter of the stream)
  before the handover, whose trigger is its commit (``transfer --commit ID``).

With strongSwan gateways, sg1 routes the client's inner address via sg2 once its own SA is gone
(its kernel-libipsec route in table 220 goes first while the SA lives), so the host needs no
route change.

Per run: ``interrupt_ms`` is the longest time between two consecutive packets arriving, either
way, from the handover command on (the second half of the stream, as long a window as the
baseline's); ``baseline_ms`` the same in the first half, before any action: from the stream's
start to ``PREPARE_LEAD`` before the handover, the same window for every method (a shorter
window has fewer chances of a long gap, so windows of different lengths would not compare), the
noise floor of the same path on the same machine in the same run (a value of 2.0 means no gap
above 2 ms). A prepared transfer is prepared at the end of that window: the window from there
to the commit gives ``prepare_gap_ms``, and ``prepare_ms`` is the time the preparation took;
the other methods do nothing in that time, which counts in no figure. Below that 2 ms floor:
``excess_ms``, the run's longest gap from the handover on minus its longest before it, both
measured down to the 1 ms packet interval (0: none longer than the noise before; negative:
shorter); ``delay_excess_ms``, the longest one-way delay of a packet (each carries its send
time; one clock for all namespaces) from the handover on minus the longest before it;
``delayed``, the packets from the handover on delayed more than any before it (both ways;
packets that arrived: the lost ones are in ``lost`` only). ``lost`` the packets sent and never
received, both ways; ``mn_ike_messages`` the IKE messages the client sent or received from the
handover (a prepared transfer: its preparation) until the end of the stream ("sending
packet"/"received packet" in its log; no liveness checks are configured); ``key_exchanges`` the
Diffie-Hellman computations of the client in that time (IKE_SA_INIT requests it generated,
CREATE_CHILD_SA exchanges with a KE payload). The figures of a method are the median of its
runs (methods interleaved round after round). The stream's two processes run under SCHED_FIFO
(``chrt``) so that they measure the tunnel, not their own scheduling; the gateways and
strongSwan run as usual.

"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BenchError

METHODS = (
    "strongswan-redirect",
    "strongswan-reinitiate",
    "ct-indirect",
    "ct-direct",
    "ct-indirect-prepared",
    "ct-direct-prepared",
)
CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"
PLUGINS = (
    "random nonce openssl pem pkcs1 x509 pubkey aes sha1 sha2 hmac gmp curve25519 kdf"
    " kernel-libipsec kernel-netlink socket-default vici updown"
)
MN_OUTER = "192.168.20.10"
SG_OUTER = {"sg1": "192.168.20.1", "sg2": "192.168.20.2"}
VIP = "192.168.20.100"
SG_CORE = {"sg1": "10.2.0.251", "sg2": "10.2.0.252"}
MN_INNER = "10.1.0.2"
HOST = "10.2.0.1"
HOST_NET = "10.2.0.0/24"
XFER_PORT = 5091
STREAM_PORT = 9100
RATE = 1000  # packets/s each way
PREPARE_LEAD = 0.5  # s: a prepared transfer is prepared this long before its commit (at most)
START_TIMEOUT = 20.0
CLIENT_ID, GW_ID = "client.test", "gw.test"
PROPOSAL, ESP_PROPOSAL = "aes128gcm16-prfsha256-x25519", "aes128gcm16"

STREAM_PY = r"""
import json, select, socket, struct, sys, time
local, peer = sys.argv[1], sys.argv[2]
port, rate = int(sys.argv[3]), int(sys.argv[5])
seconds, linger = float(sys.argv[4]), float(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((local, port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
print("ready", flush=True)
sys.stdin.readline()
start = time.monotonic()
end = start + seconds
stop = end + linger
sent, seen, times, delays = 0, set(), [], []
while True:
    now = time.monotonic()
    if now >= stop:
        break
    while now < end and sent <= (now - start) * rate:
        try:
            s.sendto(struct.pack("!Qd", sent, time.monotonic()) + bytes(84), (peer, port))
        except OSError:
            pass  # no route for a moment: the packet is lost, which is what is measured
        sent += 1
    nxt = start + sent / rate if now < end else stop
    r, _, _ = select.select([s], [], [], max(0.0, min(nxt, stop) - time.monotonic()))
    if r:
        data = s.recv(2048)
        t = time.monotonic()
        if len(data) >= 16:
            seq, at = struct.unpack_from("!Qd", data)
            if seq not in seen:
                seen.add(seq)
                times.append(t)
                delays.append([round(t, 6), round(t - at, 6)])
gaps = [[a, b] for a, b in zip(times, times[1:]) if b - a > 0.001]
print(json.dumps({"sent": sent, "received": len(seen), "gaps": gaps, "delays": delays}),
      flush=True)
"""


@dataclass(frozen=True)
class Result:
    method: str
    interrupt_ms: float
    lost: int
    mn_ike_messages: int
    key_exchanges: int
    baseline_ms: float  # the longest gap before any action, same run, same window for all
    # Below the 2 ms floor of interrupt_ms (module docstring): the run's longest gap from
    # the handover on minus its longest before it, both down to the 1 ms packet interval;
    # the longest one-way delay of a packet from the handover on minus the longest before
    # it; the packets from the handover on delayed more than any before it.
    excess_ms: float = 0.0
    delay_excess_ms: float = 0.0
    delayed: int = 0
    # Prepared rows: how long ``transfer --prepare`` took, and the longest gap while it ran
    # and until the commit (2 ms floor, as interrupt_ms); None for the other methods.
    prepare_ms: float | None = None
    prepare_gap_ms: float | None = None


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        lines = (r.stderr + r.stdout).strip().splitlines()[:3]
        raise BenchError(f"{' '.join(cmd)}: exit {r.returncode}: {' / '.join(lines)}")
    return r


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait(pred: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _rt() -> list[str]:
    """The stream's processes run under SCHED_FIFO when chrt exists, so that what they measure
    is the tunnel, not their own scheduling on a busy machine."""
    return ["chrt", "-f", "20"] if shutil.which("chrt") else []


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class World:
    """The five namespaces of one run, their processes, and the run's files."""

    ROLES = ("mn", "sg1", "sg2", "host", "br")

    def __init__(self, workdir: Path) -> None:
        uid = secrets.token_hex(3)
        self.names = {r: f"ict-bi{uid}-{r}" for r in self.ROLES}
        self.dir = workdir
        self.procs: list[subprocess.Popen[Any]] = []
        self.psk = secrets.token_hex(16)
        try:
            for r in self.ROLES:
                _sh("ip", "netns", "add", self.names[r])
            self._links()
        except BaseException:
            self.close()
            raise

    def run(self, role: str, *cmd: str, timeout: float = 30) -> str:
        return _sh("ip", "netns", "exec", self.names[role], *cmd, timeout=timeout).stdout

    def popen(self, role: str, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(["ip", "netns", "exec", self.names[role], *cmd], **kw)
        self.procs.append(p)
        return p

    def _port(self, role: str, dev: str, addr: str, br: str) -> None:
        peer = f"{role}-{br}"
        _sh("ip", "-n", self.names[role], "link", "add", dev, "type", "veth", "peer", "name",
            peer, "netns", self.names["br"])  # fmt: skip
        _sh("ip", "-n", self.names[role], "addr", "add", addr, "dev", dev)
        _sh("ip", "-n", self.names[role], "link", "set", dev, "up")
        _sh("ip", "-n", self.names["br"], "link", "set", peer, "master", br, "up")

    def _links(self) -> None:
        for role in self.ROLES:
            self.run(role, "sh", "-c", "for k in all default; do"
                     " echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6;"
                     " echo 0 > /proc/sys/net/ipv4/conf/$k/rp_filter;"
                     " echo 0 > /proc/sys/net/ipv4/conf/$k/send_redirects; done")  # fmt: skip
            _sh("ip", "-n", self.names[role], "link", "set", "lo", "up")
        for br in ("acc", "core"):
            _sh("ip", "-n", self.names["br"], "link", "add", br, "type", "bridge",
                "forward_delay", "0")  # fmt: skip
            _sh("ip", "-n", self.names["br"], "link", "set", br, "up")
        self._port("mn", "acc0", f"{MN_OUTER}/24", "acc")
        for g in ("sg1", "sg2"):
            self._port(g, "acc0", f"{SG_OUTER[g]}/24", "acc")
            self._port(g, "core0", f"{SG_CORE[g]}/24", "core")
            self.run(g, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.run(g, "sysctl", "-qw", "net.ipv4.conf.acc0.forwarding=0")
        self._port("host", "eth0", f"{HOST}/24", "core")
        _sh("ip", "-n", self.names["mn"], "addr", "add", f"{MN_INNER}/32", "dev", "lo")
        self.route_host_via("sg1")
        for g in ("sg1", "sg2"):
            self.run("host", "ping", "-c1", "-W2", SG_CORE[g])
            self.run("mn", "ping", "-c1", "-W2", SG_OUTER[g])

    def route_host_via(self, gw: str) -> None:
        _sh("ip", "-n", self.names["host"], "route", "replace", f"{MN_INNER}/32",
            "via", SG_CORE[gw])  # fmt: skip

    def host_router(self) -> HostRouter:
        """The host's route to the client, changed during the stream without starting a
        process then (:class:`HostRouter`)."""
        p = self.popen("host", "ip", "-batch", "-", stdin=subprocess.PIPE,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        return HostRouter(self, p)

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(OSError):
                _stop(p)
        for name in self.names.values():
            _sh("ip", "netns", "del", name, check=False)


class HostRouter:
    """One ``ip -batch -`` started in the host's namespace before the stream: moving the
    route is a line on its standard input, one netlink request in a process that already
    runs. Starting ``ip netns exec ... ip route`` at the handover instead (a fork, an exec,
    a mount namespace with /sys remounted: about 5 ms of CPU) competed with the gateways for
    the machine's two cores at the very moment it measures. The network's own route change
    is not what the bench compares, so it should cost the gateways nothing."""

    def __init__(self, world: World, proc: subprocess.Popen[str]) -> None:
        self.world, self.proc = world, proc

    def via(self, gw: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"route replace {MN_INNER}/32 via {SG_CORE[gw]}\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise BenchError(f"ip -batch in the host namespace: {exc}") from None

    def close(self, gw: str) -> None:
        """End it; check that it took every line and that the route is via ``gw``."""
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise BenchError("ip -batch in the host namespace did not end") from None
        if self.proc.returncode != 0:
            raise BenchError(f"ip -batch in the host namespace: {err.strip()[:200]}")
        route = self.world.run("host", "ip", "route", "get", MN_INNER)
        if f"via {SG_CORE[gw]} " not in route:
            raise BenchError(f"the host's route is not via {gw}: {route.strip()}")


# -- strongSwan --------------------------------------------------------------------------


class Charon:
    def __init__(self, world: World, role: str, swanctl_conf: str) -> None:
        self.world, self.role = world, role
        self.dir = world.dir / f"ss-{role}"
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        self.vici = self.dir / "charon.vici"
        self.logfile = self.dir / "charon.log"
        (self.dir / "strongswan.conf").write_text(
            f"charon {{\n  load = {PLUGINS}\n  install_routes = yes\n"
            f"  plugins {{ vici {{ socket = unix://{self.vici} }} }}\n"
            "  syslog { daemon { default = -1 } }\n"
            f"  filelog {{ main {{ path = {self.logfile}\n    time_format = %T\n"
            "    time_add_ms = yes\n    flush_line = yes\n    default = 1\n  } }\n}\n"
        )
        _private(self.dir / "swanctl.conf", swanctl_conf)
        env = dict(os.environ, STRONGSWAN_CONF=str(self.dir / "strongswan.conf"))
        p = world.popen(role, "sh", "-c", f"mount --bind {self.dir}/run /run && exec {CHARON}",
                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

        def up() -> bool:
            if p.poll() is not None:
                raise BenchError(f"charon in {role} exited")
            return self.vici.exists()

        _wait(up, f"charon in {role}", START_TIMEOUT)
        # the socket file appears a moment before charon accepts on it
        for attempt in range(50):
            try:
                self.swanctl("--load-all", "--file", str(self.dir / "swanctl.conf"))
                break
            except BenchError:
                if attempt == 49:
                    raise
                time.sleep(0.1)

    def swanctl(self, *args: str, timeout: float = 30) -> str:
        return _sh(SWANCTL, *args, "--uri", f"unix://{self.vici}", timeout=timeout).stdout

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _conn(name: str, local: str, remote: str, me: str, peer: str, lts: str, rts: str,
          mobike: bool = False) -> str:  # fmt: skip
    return (
        f"  {name} {{\n    version = 2\n    local_addrs = {local}\n    remote_addrs = {remote}\n"
        f"    encap = yes\n    mobike = {'yes' if mobike else 'no'}\n    proposals = {PROPOSAL}\n"
        f"    local {{ auth = psk\n id = {me} }}\n    remote {{ auth = psk\n id = {peer} }}\n"
        f"    children {{ net {{ local_ts = {lts}\n remote_ts = {rts}\n"
        f"      esp_proposals = {ESP_PROPOSAL}\n mode = tunnel }} }}\n  }}\n"
    )


def _secrets(psk: str) -> str:
    return f'secrets {{ ike-gw {{ id-1 = {CLIENT_ID}\n id-2 = {GW_ID}\n secret = "{psk}" }} }}\n'


def _client(world: World, targets: Sequence[tuple[str, str]], mobike: bool = False) -> Charon:
    conns = "".join(
        _conn(name, MN_OUTER, addr, CLIENT_ID, GW_ID, f"{MN_INNER}/32", HOST_NET, mobike)
        for name, addr in targets
    )
    return Charon(world, "mn", "connections {\n" + conns + "}\n" + _secrets(world.psk))


def _ss_gateway(world: World, g: str) -> Charon:
    conn = _conn("gw", SG_OUTER[g], "%any", GW_ID, CLIENT_ID, HOST_NET, f"{MN_INNER}/32")
    return Charon(world, g, "connections {\n" + conn + "}\n" + _secrets(world.psk))


# -- ipsecct gateways --------------------------------------------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipsecct", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _toml(header: str, kv: dict[str, object]) -> str:
    return header + "\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items())


def _ct_gateways(world: World, direct: bool) -> dict[str, str]:
    """sg1 and sg2 as ipsecct gateways with the [connections.rw] for the client, with direct
    or indirect SG identity; returns the control sockets."""
    from ..errors import ControlError
    from ..gateway.control import request

    d = world.dir
    r = _cli("pki", "init", "--dir", str(d / "pki"), "--gateways", "sg1,sg2")
    if r.returncode != 0:
        raise BenchError(f"ipsecct pki init: {r.stderr.strip()}")
    _private(d / "gw.psk", world.psk + "\n")
    socks = {}
    for g, other in (("sg1", "sg2"), ("sg2", "sg1")):
        sock = socks[g] = str(d / f"{g}.sock")
        outer: dict[str, object] = {"address": SG_OUTER[g], "port": 4500}
        if not direct:
            outer |= {"virtual": VIP, "virtual_interface": "acc0", "virtual_owner": g == "sg1"}
        text = (
            _toml(f'name = "{g}"\n[outer]', outer)
            + _toml("[inner]", {"kind": "tun", "name": "ipsecct0", "addresses": [],
                                "mtu": 1400, "routes": [f"{MN_INNER}/32"]})
            + _toml("[control]", {"socket": sock})
            + _toml("[state]", {"dir": str(d / f"state-{g}")})
            + _toml("[log]", {"level": "info"})
            + _toml("[transfer]", {
                "listen": f"{SG_CORE[g]}:{XFER_PORT}", "cert": f"{d}/pki/{g}.pem",
                "key": f"{d}/pki/{g}.key", "ca": f"{d}/pki/ca.pem", "conflict": "reassign",
                "identity": "direct" if direct else "indirect", "max_transfer_ms": 1000,
                "forward_ms": 5000,
                "accept_local_ts": HOST_NET, "accept_remote_ts": f"{MN_INNER}/32"})
            + _toml("[[peers]]", {
                "name": other, "address": f"{SG_CORE[other]}:{XFER_PORT}",
                "outer": SG_OUTER[other], "allow": ["send", "request"]})
            + _toml("[connections.rw]", {
                "local_addrs": [SG_OUTER[g] if direct else VIP], "remote_addrs": ["%any"],
                "proposals": [PROPOSAL],
                "local.id": GW_ID, "remote.id": CLIENT_ID,
                "children.net.local_ts": [HOST_NET],
                "children.net.remote_ts": [f"{MN_INNER}/32"],
                "children.net.esp_proposals": [ESP_PROPOSAL]})
            + _toml("[secrets.ike-rw]", {"id": [CLIENT_ID, GW_ID], "file": str(d / "gw.psk")})
        )  # fmt: skip
        cfg = d / f"{g}.toml"
        cfg.write_text(text)
        log = open(d / f"{g}.log", "wb")  # noqa: SIM115 -- the child keeps it
        p = world.popen(g, sys.executable, "-m", "ipsecct", "gateway", "run", "--config",
                        str(cfg), stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        log.close()

        def up(p: subprocess.Popen[Any] = p, g: str = g, sock: str = sock) -> bool:
            if p.poll() is not None:
                text = (d / f"{g}.log").read_text(errors="replace")
                raise BenchError(f"ipsecct gateway {g} exited: {text[-400:]}")
            if os.path.exists(sock):
                with contextlib.suppress(ControlError):
                    request(sock, "status", timeout=2)
                    return True
            return False

        _wait(up, f"ipsecct gateway {g}", START_TIMEOUT)
    return socks


def _ike_sas(sock: str) -> list[dict[str, Any]]:
    from ..gateway.control import request

    out: list[dict[str, Any]] = request(sock, "ike.list", timeout=10)
    return out


def _child_spi(sock: str) -> str:
    (ike,) = _ike_sas(sock)
    (child,) = ike["children"]
    return f"0x{int(child['spi_out'], 16):08x}"


# -- one run -----------------------------------------------------------------------------


def _figures(
    method: str,
    outs: Sequence[dict[str, Any]],
    t_go: float,
    t_trigger: float,
    t_base: float,
    t_prepare: float | None,
    lost: int,
    msgs: int,
    kex: int,
    prepare_ms: float | None = None,
) -> Result:
    """One run's figures from the two streams' reports (``gaps``: [a, b] arrival times of
    consecutive packets more than 1 ms apart; ``delays``: [arrival, one-way delay] of each
    packet; one clock for all namespaces). The handover's window starts at ``t_trigger``
    (the command, a prepared transfer's commit); the baseline's ends at ``t_base``, the same
    time after the stream's start for every method and before any action of any method (a
    prepared transfer's preparation starts there: its window, up to the commit, has figures
    of its own; the other methods do nothing in that time and it counts nowhere), so that
    every row's baseline is as long as every other's. The stream starts at ``t_go`` and the
    baseline with it; the handover's window is as long as the baseline, so that with no
    effect of the handover the longest gap in either is the same draw of the same noise."""
    end_base = t_base
    end_after = t_trigger + (t_base - t_go)
    if t_prepare is not None and t_prepare < t_base:
        raise BenchError("the preparation started before the end of the baseline")
    gaps = [(a, b - a) for o in outs for a, b in o["gaps"]]
    after = [g for a, g in gaps if t_trigger <= a + g < end_after]
    before = [g for a, g in gaps if a + g < end_base]
    during = [g for a, g in gaps if (t_prepare or t_trigger) <= a + g < t_trigger]
    floor = 1.0 / RATE  # the stream's own packet interval

    def longest(xs: list[float], at_least: float) -> float:
        return max([at_least, *xs]) * 1e3

    # interrupt_ms and baseline_ms: gaps above 2 ms only (a value of 2.0: none), as ever
    gap = longest([g for g in after if g > 0.002], 0.002)
    base = longest([g for g in before if g > 0.002], 0.002)
    excess = longest(after, floor) - longest(before, floor)
    delays = [(t, d) for o in outs for t, d in o["delays"]]
    d_before = max((d for t, d in delays if t < end_base), default=0.0)
    d_after = [d for t, d in delays if t_trigger <= t < end_after]
    prep_gap = None if t_prepare is None else round(longest(
        [g for g in during if g > 0.002], 0.002), 1)  # fmt: skip
    return Result(
        method, round(gap, 1), lost, msgs, kex, round(base, 1),
        excess_ms=round(excess, 2),
        delay_excess_ms=round((max(d_after, default=0.0) - d_before) * 1e3, 2),
        delayed=sum(1 for d in d_after if d > d_before),
        prepare_ms=prepare_ms, prepare_gap_ms=prep_gap,
    )  # fmt: skip



_KE = re.compile(
    r"generating IKE_SA_INIT request|generating CREATE_CHILD_SA request \d+ \[[^\]]*\bKE\b"
    r"|parsed CREATE_CHILD_SA request \d+ \[[^\]]*\bKE\b"
)
_IKE_MSG = re.compile(r"(sending|received) packet: from")


def _client_figures(log_after: str) -> tuple[int, int]:
    return len(_IKE_MSG.findall(log_after)), len(_KE.findall(log_after))


def run_once(method: str, workdir: Path, seconds: float, at: float) -> Result:
    from ..gateway.control import request

    world = World(workdir)
    try:
        if method.startswith("strongswan"):
            gws = {g: _ss_gateway(world, g) for g in ("sg1", "sg2")}
            # once sg1's own SA is gone, sg1 routes the client's inner address via sg2
            world.run("sg1", "ip", "route", "replace", f"{MN_INNER}/32", "via", SG_CORE["sg2"])
            client = _client(world, [("c1", SG_OUTER["sg1"]), ("c2", SG_OUTER["sg2"])])
            client.swanctl("--initiate", "--ike", "c1", "--child", "net")
            socks: dict[str, str] = {}
        else:
            direct = method.startswith("ct-direct")
            socks = _ct_gateways(world, direct)
            client = _client(world, [("c1", SG_OUTER["sg1"] if direct else VIP)], mobike=direct)
            client.swanctl("--initiate", "--ike", "c1", "--child", "net")
            _wait(lambda: len(_ike_sas(socks["sg1"])) == 1, "the IKE SA at sg1", 10)
            router = world.host_router()
        streams = {}
        for role, local, peer in (("mn", MN_INNER, HOST), ("host", HOST, MN_INNER)):
            argv = [local, peer, str(STREAM_PORT), str(seconds), str(RATE), "1.0"]
            p = world.popen(role, *_rt(), sys.executable, "-c", STREAM_PY, *argv,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise BenchError(f"the stream in {role} did not start")
            streams[role] = p
        for p in streams.values():
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        t_go = time.monotonic()
        # Every method's baseline ends here, before any action (the prepared methods'
        # preparation starts here): the same length for every row.
        t_base = t_go + at - min(PREPARE_LEAD, at / 4)
        prepared = method.endswith("-prepared")
        t_prepare = prepare_ms = tid = None
        if prepared:
            # The make phase, ahead of the handover (as the redirect's, which comes after its
            # trigger): the contexts go to sg2 and wait there for the COMMIT; the client's
            # messages are counted from here.
            time.sleep(max(0.0, t_base - time.monotonic()))
            mark = len(client.log())
            t_prepare = time.monotonic()
            rec0 = request(socks["sg1"], "transfer", {"spi": _child_spi(socks["sg1"]),
                           "to": "sg2", "mode": "predictive", "prepare": True},
                           timeout=30)  # fmt: skip
            prepare_ms = round((time.monotonic() - t_prepare) * 1e3, 1)
            if rec0.get("outcome") != "prepared":
                raise BenchError(f"ipsecct transfer --prepare: {rec0}")
            tid = rec0["id"]
        time.sleep(max(0.0, t_go + at - time.monotonic()))
        if not prepared:
            mark = len(client.log())
        t_trigger = time.monotonic()
        if method == "strongswan-redirect":
            gws["sg1"].swanctl("--redirect", "--ike", "gw", "--gateway", SG_OUTER["sg2"])
        elif method == "strongswan-reinitiate":
            client.swanctl("--terminate", "--ike", "c1")
            client.swanctl("--initiate", "--ike", "c2", "--child", "net")
        else:
            if prepared:  # the handover's trigger: the commit
                rec = request(socks["sg1"], "transfer.commit", {"id": tid}, timeout=30)
            else:
                rec = request(socks["sg1"], "transfer", {"spi": _child_spi(socks["sg1"]),
                              "to": "sg2", "mode": "predictive"}, timeout=30)  # fmt: skip
            if rec.get("outcome") != "committed":
                raise BenchError(f"ipsecct transfer: {rec}")
            router.via("sg2")
        outs = {}
        for role, p in streams.items():
            out, _ = p.communicate(timeout=seconds + 30)
            outs[role] = json.loads(out.strip().splitlines()[-1])
        if method.startswith("strongswan") and SG_OUTER["sg2"] not in client.swanctl("--list-sas"):
            raise BenchError(f"{method}: the client has no SA with sg2")
        if method.startswith("ct-"):
            router.close("sg2")
        if method.startswith("ct-") and len(_ike_sas(socks["sg2"])) != 1:
            raise BenchError("the IKE SA did not move to sg2")
        if method == "ct-direct" and f"@ {SG_OUTER['sg2']}[" not in client.swanctl("--list-sas"):
            raise BenchError("ct-direct: the client's IKE SA did not move to sg2")
        msgs, kex = _client_figures(client.log()[mark:])
        lost = (outs["host"]["sent"] - outs["mn"]["received"]) + (
            outs["mn"]["sent"] - outs["host"]["received"]
        )
        return _figures(method, list(outs.values()), t_go, t_trigger, t_base, t_prepare, lost,
                        msgs, kex, prepare_ms)  # fmt: skip
    finally:
        world.close()


def measure(
    *,
    methods: Sequence[str] = METHODS,
    rounds: int = 3,
    seconds: float = 4.0,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, TUN devices)")
    for tool in (CHARON, SWANCTL):
        if shutil.which(tool) is None:
            raise BenchError(f"strongSwan is not installed ({tool}): scripts/install")
    runs: dict[str, list[Result]] = {}
    for r in range(rounds):
        for m in methods:
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: {m}")
            with tempfile.TemporaryDirectory(prefix="ict-bi-", dir="/tmp") as tmp:
                runs.setdefault(m, []).append(run_once(m, Path(tmp), seconds, seconds / 2))
    return [_median(m, rs) for m, rs in runs.items()]


def _median(method: str, rs: Sequence[Result]) -> Result:
    """A method's row: the median of its runs, figure by figure (``excess_ms`` is the
    median of each run's own difference, not a difference of medians)."""

    def med(key: str) -> Any:
        xs = [getattr(r, key) for r in rs]
        if any(x is None for x in xs):
            return None
        m = statistics.median(xs)
        return int(m) if isinstance(xs[0], int) else round(m, 2)

    return Result(method, **{k: med(k) for k in Result.__dataclass_fields__ if k != "method"})


def to_json(results: Sequence[Result]) -> str:
    return json.dumps({"results": [asdict(r) for r in results]})


def format_table(results: Sequence[Result]) -> str:
    by = {r.method: r for r in results}
    base = by.get("strongswan-redirect")
    head = (
        f"{'method':<22} {'interrupt ms':>12} {'lost':>6} {'MN IKE msgs':>12}"
        f" {'MN key exch.':>13} {'interrupt vs redirect':>22} {'baseline ms':>12}"
        f" {'excess ms':>10} {'delay +ms':>10} {'delayed':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = "-"
        if base is not None and r.interrupt_ms > 0 and base.interrupt_ms > 0:
            x = base.interrupt_ms / r.interrupt_ms
            ratio = f"{x:.1f}x shorter" if x >= 1 else f"{1 / x:.1f}x longer"
        lines.append(
            f"{r.method:<22} {r.interrupt_ms:>12.1f} {r.lost:>6} {r.mn_ike_messages:>12}"
            f" {r.key_exchanges:>13} {ratio:>22} {r.baseline_ms:>12.1f}"
            f" {r.excess_ms:>+10.2f} {r.delay_excess_ms:>+10.2f} {r.delayed:>8}"
        )
    prep = [r for r in results if r.prepare_ms is not None]
    if prep:
        lines.append(
            "prepared ahead (transfer --prepare), the interrupt from the commit: "
            + "; ".join(
                f"{r.method} took {r.prepare_ms:.1f} ms, longest gap until the commit"
                f" {r.prepare_gap_ms:.1f} ms"
                for r in prep
            )
        )
    lines.append(
        f"{RATE} packets/s each way; interrupt = longest gap between packets arriving, either"
        " way, from the handover on; baseline = the same before any action (one window length"
        " for every method); medians of the rounds"
    )
    lines.append(
        "excess = the run's interrupt minus its baseline, both down to the 1 ms packet"
        " interval; delay + = the longest one-way delay from the handover on minus the"
        " longest before; delayed = packets delayed more than any before the handover"
    )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    from ..commands.args import number

    p: argparse.ArgumentParser = sub.add_parser(
        "ikev2",
        help="handover of a strongSwan client: context transfer against strongSwan (root)",
        description="An unmodified strongSwan client handed over from sg1 to sg2 under a"
        f" {RATE} packets/s stream each way: strongSwan's redirect and re-initiation against"
        " ipsecct's context transfer, started at the handover or prepared ahead (its commit the"
        " handover). Needs root and strongSwan. See benchmarks/README.md.",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--rounds",
        type=number(int, high=50),
        default=3,
        metavar="N",
        help="interleaved runs per method; the median counts (default 3)",
    )
    p.add_argument(
        "--time",
        type=number(float, high=60),
        default=4.0,
        metavar="SECONDS",
        help="length of the stream, the handover in its middle (default 4)",
    )
    p.add_argument(
        "--method",
        action="append",
        choices=METHODS,
        metavar="METHOD",
        help=f"only this method (repeatable; {', '.join(METHODS)})",
    )
    p.set_defaults(handler=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from ..errors import ControlError

    if args.time < 2.0:
        print("ipsecct bench ikev2: --time must be at least 2 seconds", file=sys.stderr)
        return 2
    try:
        results = measure(
            methods=list(dict.fromkeys(args.method or METHODS)),
            rounds=args.rounds,
            seconds=args.time,
            progress=None if args.json else lambda s: print(s, file=sys.stderr, flush=True),
        )
    except (BenchError, ControlError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        print(f"ipsecct bench ikev2: {exc}", file=sys.stderr)
        return 1
    print(to_json(results) if args.json else format_table(results))
    return 0

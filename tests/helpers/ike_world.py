"""The IKEv2 handover topology (:mod:`tests.helpers.netns_topology`'s namespaces) with an
unmodified strongSwan client in the MN's namespace and two ipsecct gateways that key by IKEv2:
the world of ``test_ikev2_handover.py`` and ``test_ikev2_failover.py``."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ipsecct.errors import ControlError
from tests.helpers.control import ask
from tests.helpers.daemon import Daemon
from tests.helpers.etcd_server import EtcdCluster
from tests.helpers.netns import Namespaces
from tests.helpers.netns_topology import (
    ACCESS_IF,
    HOST,
    HOST_NET,
    MN_INNER,
    MN_OUTER,
    SG_CORE,
    SG_OUTER,
    VIP,
    XFER_PORT,
    HandoverWorld,
    _section,
    cli,
)
from tests.helpers.strongswan import Charon, Side, swanctl_psk, write_private
from tests.helpers.waiting import until

PSK = "ipsecct-ikev2-handover-psk-0123456789"
CLIENT = Side("A", MN_OUTER, VIP, MN_INNER, HOST, "client.test", "gw.test")


class Client(Charon):
    gateway = VIP  # where the client connects: the virtual address (indirect) or sg1's
    mobike = "no"
    ike_proposal = "aes128gcm16-prfsha256-x25519"
    dpd_delay = "2s"
    # a second child, "udp": UDP only (strongSwan refuses a duplicate of "net"), started by
    # ``swanctl --initiate --child udp`` as an extra CHILD SA of the IKE SA
    udp_child = False

    def write_config(self) -> None:
        super().write_config()
        udp = f"""
      udp {{
        local_ts = {MN_INNER}/32[udp]
        remote_ts = {HOST_NET}[udp]
        esp_proposals = aes128gcm16
        mode = tunnel
      }}""" if self.udp_child else ""
        conf = swanctl_psk(
            "cA",
            local_addrs=MN_OUTER,
            remote_addrs=self.gateway,
            local_id=CLIENT.id,
            remote_id=CLIENT.remote_id,
            local_ts=f"{MN_INNER}/32",
            remote_ts=HOST_NET,
            psk=PSK,
            mobike=self.mobike == "yes",
            dpd=self.dpd_delay,
            proposals=self.ike_proposal,
            esp_proposals="aes128gcm16",
            more_children=udp,
        )
        write_private(self.dir / "swanctl.conf", conf)


class IkeWorld(HandoverWorld):
    """The handover topology with IKEv2 keying: no [[tunnel]] anywhere, a [connections] table
    on both gateways, and strongSwan instead of ``ipsecct node`` in the MN's namespace. With
    direct identity each gateway is at its own address; ``gw_encap`` fakes NAT-D there. With
    ``failover``, sg1 is the active gateway of a fail-over pair and sg2 its standby; with
    ``etcd``, both are members of a cluster on those etcd endpoints."""

    gw_encap = False
    failover = False
    # etcd mode instead of the pair: [cluster] with these endpoints (both gateways members)
    etcd: list[str] | None = None
    ike_proposal = "aes128gcm16-prfsha256-x25519"
    # the pair's detection time: the default 500 ms let the standby take over from an active
    # the loaded CI machine did not run for half a second, before the test killed it (sg1
    # had no IKE SA left to show, once)
    dead_ms = 1500

    def write_configs(self) -> None:
        d = self.dir
        r = cli("pki", "init", "--dir", str(d / "pki"), "--gateways", "sg1,sg2")
        assert r.returncode == 0, r.stderr
        write_private(d / "gw.psk", PSK + "\n")
        for g, other in (("sg1", "sg2"), ("sg2", "sg1")):
            direct = self.identity == "direct"
            outer: dict[str, object] = {"address": SG_OUTER[g], "port": 4500}
            if not direct:
                outer |= {"virtual": VIP, "virtual_interface": ACCESS_IF,
                          "virtual_owner": g == "sg1"}  # fmt: skip
            text = (
                _section(f'name = "{g}"\n[outer]', outer)
                + _section("[inner]", {"kind": "tun", "name": "ipsecct0", "addresses": [],
                                       "mtu": 1400, "routes": [f"{MN_INNER}/32"]})
                + _section("[control]", {"socket": self.sock(g)})
                + _section("[log]", {"level": "debug"})
                + _section("[transfer]", {
                    "listen": f"{SG_CORE[g]}:{XFER_PORT}", "cert": f"pki/{g}.pem",
                    "key": f"pki/{g}.key", "ca": "pki/ca.pem", "conflict": "reassign",
                    "identity": self.identity, "max_transfer_ms": 4000, "forward_ms": 5000})
                + _section("[[peers]]", {
                    "name": other, "address": f"{SG_CORE[other]}:{XFER_PORT}",
                    "outer": SG_OUTER[other], "allow": ["send", "request"]})
                + _section("[connections.rw]", {
                    "local_addrs": [SG_OUTER[g] if direct else VIP], "remote_addrs": ["%any"],
                    "encap": self.gw_encap,
                    "proposals": [self.ike_proposal],
                    "local.id": CLIENT.remote_id, "remote.id": CLIENT.id,
                    "children.net.local_ts": [HOST_NET],
                    "children.net.remote_ts": [f"{MN_INNER}/32"],
                    "children.net.esp_proposals": ["aes128gcm16"]})
                + _section("[secrets.ike-rw]", {"id": [CLIENT.id, CLIENT.remote_id],
                                                "file": "gw.psk"})
            )  # fmt: skip
            if self.etcd:
                text = text.replace("[connections.rw]\n", "[connections.rw]\ndpd_delay = 1\n")
                text += _section("[cluster]", {"etcd": self.etcd, "name": "ike", "ttl_s": 2})
            elif self.failover:
                # the gateway's own liveness checks (every second without an IKE message)
                text = text.replace("[connections.rw]\n", "[connections.rw]\ndpd_delay = 1\n")
                text += _section("[failover]", {
                    "role": "active" if g == "sg1" else "standby", "peer": other,
                    "dead_ms": self.dead_ms,
                    "state": str(d / f"{g}-failover.json")})  # fmt: skip
            (d / f"{g}.toml").write_text(text)

    def start(self) -> None:
        for name in ("sg1", "sg2"):
            dmn = Daemon("gateway", self.dir / f"{name}.toml", self.sock(name),
                         self.dir / f"{name}.log", prefix=self.ns.cmd(name))  # fmt: skip
            self.daemons[name] = dmn
            dmn.start()
        self.ns.run("mn", "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
                    " echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")  # fmt: skip
        self.ns.run("mn", "ip", "addr", "add", f"{MN_INNER}/32", "dev", "lo")
        for g in ("sg1", "sg2"):
            self.ns.run("host", "ping", "-c1", "-W2", SG_CORE[g])
            self.ns.run("mn", "ping", "-c1", "-W2", SG_OUTER[g])
        if self.failover:
            # The pair formed before the test starts: sg2 starting seconds after sg1 (a
            # loaded machine) must not look like a fail-over in the middle of the test.
            def formed() -> bool:
                a, b = self.status("sg1")["failover"], self.status("sg2")["failover"]
                return (a.get("role") == "active" and bool(a.get("standby_acknowledged"))
                        and b.get("role") == "standby" and b.get("last_heard_ms_ago") is not None)

            until(formed, "the fail-over pair to form", 30)

    def ike_sas(self, name: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = ask(self.sock(name), "ike.list")  # sa list --ike --json
        return out

    def counters(self, name: str) -> dict[str, int]:
        c: dict[str, int] = self.status(name)["ike"]["counters"]
        return c

    def drops(self) -> str:
        """What each gateway's data path dropped (the reasons counted) and carried, for a
        failure message: a packet a test missed was dropped by a gateway, counted here, or
        lost (or late) elsewhere."""
        lines = []
        for g in ("sg1", "sg2"):
            try:
                st = ask(self.sock(g), "status", timeout=5)
            except (ControlError, OSError, ValueError) as exc:
                lines.append(f"{g}: no status ({exc})")
                continue
            c = st.get("counters", {})
            drops = {k: v for k, v in c.get("drops", {}).items() if v}
            lines.append(f"{g}: drops {drops} native_queue_drops {st.get('native_queue_drops')}"
                         f" in_packets {c.get('in_packets')} out_packets {c.get('out_packets')}")
        return "\n".join(lines)

    def logs(self) -> str:
        return f"{super().logs()}\n--- drops ---\n{self.drops()}"


def waiting_with_logs(
    w: IkeWorld, ss: Charon, extra: Callable[[], object] | None = None
) -> Callable[..., None]:
    """``wait_until(pred, what, timeout=30)`` for a test with strongSwan client ``ss``: on a
    time-out the AssertionError carries the client's IKE log (without its per-packet ESP
    lines), the gateways' logs and ``extra()`` (a status the test watches)."""

    def wait_until(pred: Callable[[], object], what: str, timeout: float = 30) -> None:
        try:
            until(pred, what, timeout)
        except AssertionError as exc:
            ike_log = "\n".join(x for x in ss.log().splitlines() if "[ESP]" not in x)
            more = "" if extra is None else f"\n{extra()}"
            raise AssertionError(f"{exc}\n{ike_log[-20000:]}\n{w.logs()}{more}") from None

    return wait_until


@contextlib.contextmanager
def ike_world(tmp_path: Path, identity: str, gw_encap: bool = False,
              edit: Callable[[IkeWorld], None] | None = None, *, failover: bool = False,
              ike_proposal: str | None = None, etcd: bool = False) -> Iterator[IkeWorld]:
    """The IKE world built and both gateways started (stopped and removed at the end);
    ``edit`` may change the written configuration files before the gateways start;
    ``failover``: sg1 and sg2 a fail-over pair; ``ike_proposal``: the gateways' (and the
    tests' clients') IKE proposal instead of the default; ``etcd``: the gateways a cluster
    coordinated by a one-member etcd on the core network (at the host)."""
    sockdir = Path(tempfile.mkdtemp(prefix="ipsecct-ike-", dir="/tmp"))
    workdir = tmp_path if len(str(tmp_path)) <= 70 else Path(tempfile.mkdtemp(prefix="ict-"))
    try:
        with Namespaces("mn", "sg1", "sg2", "host", "br") as ns:
            w = IkeWorld(ns, workdir, sockdir, identity)
            w.gw_encap = gw_encap
            w.failover = failover
            if ike_proposal is not None:
                w.ike_proposal = ike_proposal
            try:
                w.build_links()
                with contextlib.ExitStack() as stack:
                    if etcd:
                        cluster = EtcdCluster(workdir, 1, host=HOST, prefix=ns.cmd("host"))
                        w.etcd = stack.enter_context(cluster).endpoints
                    w.write_configs()
                    if edit is not None:
                        edit(w)
                    w.start()
                    yield w
            finally:
                w.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if workdir != tmp_path:
            shutil.rmtree(workdir, ignore_errors=True)

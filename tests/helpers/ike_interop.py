"""The two-namespace IKEv2 interop world of ``test_ikev2_strongswan.py`` and
``test_ikev2_collisions.py`` (root): an unmodified strongSwan 5.9.8 initiator (namespace "a",
:class:`Initiator`) and an ``ipsecct gateway`` (namespace "b", :func:`gateway_config`,
started by :func:`start`), or an ipsecct node in "a" (:func:`node_config`), keyed with
:data:`PSK`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import strongswan
from tests.helpers.daemon import Daemon
from tests.helpers.netns import Namespaces
from tests.helpers.strongswan import A, B, Charon, build_namespaces

PSK = "ipsecct-ikev2-interop-psk-0123456789"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    if len(str(tmp_path)) <= 80:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="ict-ike-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Initiator(Charon):
    """strongSwan A with a swanctl.conf made for connecting to the ipsecct gateway."""

    def __init__(self, ns: Namespaces, workdir: Path, *, ike: str | None, esp: str | None,
                 encap: bool = True, dpd: int = 0, rekey: tuple[int, int] | None = None,
                 mobike: bool = False, local_addrs: str = A.outer) -> None:  # fmt: skip
        super().__init__(ns, "a", A, workdir, esp or "default")
        self.ike, self.esp, self.encap, self.dpd = ike, esp, encap, dpd
        self.rekey = rekey  # (IKE, CHILD) rekey_time in seconds
        self.mobike, self.local_addrs = mobike, local_addrs

    def write_config(self) -> None:
        super().write_config()
        ike_rekey = child_rekey = ""
        if self.rekey is not None:
            ike_rekey = f"rekey_time = {self.rekey[0]}s\n    over_time = 2s\n    rand_time = 1s"
            child_rekey = f"rekey_time = {self.rekey[1]}s\n        rand_time = 1s"
        conf = strongswan.swanctl_psk(
            "cA",
            local_addrs=self.local_addrs,
            remote_addrs=B.outer,
            local_id=A.id,
            remote_id=B.id,
            local_ts=f"{A.inner}/32",
            remote_ts=f"{B.inner}/32",
            psk=PSK,
            encap=self.encap,
            mobike=self.mobike,
            dpd=f"{self.dpd}s",
            proposals=self.ike,
            esp_proposals=self.esp,
            ike_extra=ike_rekey,
            child_extra=child_rekey,
        )
        strongswan.write_private(self.dir / "swanctl.conf", conf)


def gateway_config(d: Path, *, ike: str, esp: str, encap: bool, dpd: int,
                   rekey: tuple[int, int] = (0, 0), cookies: int = 100) -> Path:  # fmt: skip
    psk = d / "ab.psk"
    strongswan.write_private(psk, PSK + "\n")
    conf = d / "gw.toml"
    conf.write_text(f"""name = "b-ipsecct"
[outer]
address = "{B.outer}"
port = 4500
[inner]
kind = "tun"
name = "ipsecct0"
addresses = ["{B.inner}/32"]
mtu = 1400
routes = ["{A.inner}/32"]
[control]
socket = "{d}/gw.sock"
[log]
level = "debug"
[ike]
cookie_threshold = {cookies}

[connections.roadwarrior]
version = 2
local_addrs = ["{B.outer}"]
remote_addrs = ["%any"]
proposals = ["{ike}"]
encap = {"true" if encap else "false"}
dpd_delay = {dpd}
rekey_time = {rekey[0]}
local.auth = "psk"
local.id = "{B.id}"
remote.auth = "psk"
remote.id = "{A.id}"
children.net.local_ts = ["{B.inner}/32"]
children.net.remote_ts = ["{A.inner}/32"]
children.net.esp_proposals = ["{esp}"]
children.net.rekey_time = {rekey[1]}

[secrets.ike-ab]
id = ["{A.id}", "{B.id}"]
file = "ab.psk"
""")
    return conf


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipsecct", *args], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def ike_list(sock: str) -> list[dict[str, Any]]:
    r = cli("sa", "list", "--ike", "--json", "-s", sock)
    assert r.returncode == 0, r.stderr
    res: list[dict[str, Any]] = json.loads(r.stdout)
    return res


def start(ns: Namespaces, workdir: Path, *, ike: str, esp: str, ss_ike: str | None,
          ss_esp: str | None, encap: bool = False, ss_encap: bool = True, dpd: int = 0,
          ss_dpd: int = 0, rekey: tuple[int, int] | None = None,
          gw_rekey: tuple[int, int] = (0, 0), cookies: int = 100,
          ) -> tuple[Initiator, Daemon]:  # fmt: skip
    build_namespaces(ns)
    conf = gateway_config(workdir, ike=ike, esp=esp, encap=encap, dpd=dpd, rekey=gw_rekey,
                          cookies=cookies)  # fmt: skip
    gw = Daemon("gateway", conf, str(workdir / "gw.sock"), workdir / "gw.log",
                prefix=["ip", "netns", "exec", ns.names["b"]])  # fmt: skip
    gw.start()
    ss = Initiator(ns, workdir, ike=ss_ike, esp=ss_esp, encap=ss_encap, dpd=ss_dpd, rekey=rekey)
    return ss, gw


def node_config(d: Path, outer: str = A.outer) -> Path:
    psk = d / "ab.psk"
    strongswan.write_private(psk, PSK + "\n")
    conf = d / "mn.toml"
    conf.write_text(f"""name = "a-ipsecct"
[outer]
address = "{outer}"
port = 4500
[inner]
kind = "tun"
name = "ipsecct0"
addresses = ["{A.inner}/32"]
mtu = 1400
routes = ["{B.inner}/32"]
[control]
socket = "{d}/mn.sock"
[log]
level = "debug"

[connections.home]
remote_addrs = ["{B.outer}"]
proposals = ["aes256gcm16-prfsha384-ecp384"]
dpd_delay = 1
local.id = "{A.id}"
remote.id = "{B.id}"
children.net.local_ts = ["{A.inner}/32"]
children.net.remote_ts = ["{B.inner}/32"]
children.net.esp_proposals = ["aes128-sha256"]
children.net.start_action = "start"

[secrets.ike-ab]
id = ["{A.id}", "{B.id}"]
file = "ab.psk"
""")
    return conf

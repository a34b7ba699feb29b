"""A handover in network namespaces (root): a mobile node's tunnel moves from gateway sg1 to
gateway sg2 (``ipsecct transfer``) while ``ping`` and an echoed UDP stream run through it, with
TUN devices on every inner side and ESP in UDP 4500 on a real L2 access segment. The topology
is in :mod:`tests.helpers.netns_topology`.

- **direct** SG identity: the MN's SA names sg1's address; after the transfer sg2 tells the MN
  (inside the SA) its own address, and the MN's outbound SA goes there.
- **indirect**: the MN's SA names a virtual gateway address that sg1 holds; the transfer moves
  the address to sg2's interface, sg2 announces it with a gratuitous ARP, and the MN changes
  nothing: its ARP cache now maps the address to sg2's MAC.

After ``ipsecct transfer`` returns the test moves the host's route to the MN's prefix to sg2
(the routing update of the access network); what still reaches sg1 meanwhile is forwarded to
sg2 over the CXTP channel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipsecct.gateway.control import request
from tests.helpers.netns import wait_until
from tests.helpers.netns_topology import (
    HOST,
    MN_INNER,
    MN_OUTER,
    SG_OUTER,
    SPI_DOWN,
    SPI_UP,
    VIP,
    HandoverWorld,
    Traffic,
    handover_world,
)
from tests.helpers.strongswan import PingResult

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

UDP_RATE = 200.0  # packets per second
BEFORE = 200  # datagrams through sg1 before the handover starts (one second)
AFTER = 300  # datagrams the MN sends once the handover is done (and the host's route moved)
LIMIT = 6000  # the stream stops after 30 s whatever happens
PING_INTERVAL = 0.05
# What may be lost around the handover: nothing should be (the source holds what arrives while
# the contexts travel and forwards what reaches it after the cut-over, and the direct-identity
# signal or the gratuitous ARP moves the MN's traffic within a round trip). The bound allows
# for a datagram or two dropped by a starved receiver on a loaded CI machine, not for a lost
# window of traffic: at 200 datagrams/s, the 15-30 ms of a transfer alone would be 3-6.
MAX_UDP_LOST = 2
MAX_PING_LOST = 1


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[HandoverWorld]:
    with handover_world(tmp_path, "direct") as w:
        yield w


@pytest.fixture
def vworld(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HandoverWorld]:
    with handover_world(tmp_path, "indirect", access_forwarding=request.param) as w:
        yield w


def outbound(sas: list[dict[str, Any]]) -> dict[str, Any]:
    (sa,) = [s for s in sas if s["direction"] == "out"]
    return sa


def in_packets(world: HandoverWorld, name: str) -> int:
    return int(request(world.sock(name), "status")["counters"]["in_packets"])


def handover(
    world: HandoverWorld,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], PingResult]:
    """Start the traffic, transfer once it flows through sg1, update the host's route, let the
    stream go on for AFTER more datagrams and end. Returns (transfer record, MN's stream
    summary, host's summary, ping)."""
    start = in_packets(world, "sg1")
    assert world.status("sg2")["sas"] == 0
    traffic = Traffic.start(
        world, udp_rate=UDP_RATE, after=AFTER, limit=LIMIT, ping_interval=PING_INTERVAL
    )
    try:
        wait_until(lambda: in_packets(world, "sg1") >= start + BEFORE, "the stream through sg1", 30)
        rec = world.transfer()
        world.route_host_via("sg2")
        mn, host, ping = traffic.finish()
    finally:
        traffic.stop()
    print(f"\n{world.identity}: transfer {rec}\nMN stream {mn}\nhost {host}")
    print(f"ping: {ping.sent} sent, lost {ping.lost}")
    return rec, mn, host, ping


def check_common(
    world: HandoverWorld,
    rec: dict[str, Any],
    mn: dict[str, Any],
    host: dict[str, Any],
    ping: PingResult,
    sg2_before: dict[str, Any],
) -> None:
    assert rec["outcome"] == "committed" and rec["peer"] == "sg2", rec
    assert rec["accepted"] == 1 and rec["tunnels"] == 1, rec
    st1, st2 = world.status("sg1"), world.status("sg2")
    print(f"sg1 forwarded {st1['transfers']['forwarded']} packets to sg2 after the cut-over")
    assert st1["sas"] == 0, st1  # sg1 let go of the SAs
    assert st2["sas"] == 2, st2
    (t2,) = [t for t in st2["transfers"]["recent"] if t["role"] == "target"]
    assert t2["outcome"] == "committed"
    # the stream went on through sg2, both ways: at least the AFTER datagrams and their echoes
    assert mn["marker_seen"], mn
    c2 = st2["counters"]
    assert c2["in_packets"] - sg2_before["in_packets"] >= AFTER - MAX_UDP_LOST, c2
    assert c2["out_packets"] - sg2_before["out_packets"] >= AFTER - MAX_UDP_LOST, c2
    sg2_sas = {s["spi"]: s for s in world.sa_list("sg2")}
    assert sg2_sas[f"0x{SPI_UP:08x}"]["packets"] >= AFTER - MAX_UDP_LOST
    assert sg2_sas[f"0x{SPI_DOWN:08x}"]["packets"] >= AFTER - MAX_UDP_LOST
    # no packet accepted twice, none rejected at either end of the tunnel
    for name in ("mn", "sg1", "sg2"):
        drops = world.status(name)["counters"]["drops"]
        assert drops["replay"] == 0 and drops["icv"] == 0, (name, drops)
    assert host["duplicates"] == 0 and mn["duplicates"] == 0, (host, mn)
    # make-before-break: (almost) nothing lost, in either direction
    assert mn["sent"] - host["received"] <= MAX_UDP_LOST, (host, mn, world.logs())
    assert mn["sent"] - mn["echoed"] <= MAX_UDP_LOST, (mn, world.logs())
    assert ping.sent > 20, ping
    assert len(ping.lost) <= MAX_PING_LOST, ping.lost


def test_direct_handover_with_ping_and_udp_stream(direct: HandoverWorld) -> None:
    w = direct
    assert outbound(w.sa_list("mn"))["dst"] == SG_OUTER["sg1"]
    sg2_before = w.status("sg2")["counters"]
    rec, mn, host, ping = handover(w)
    check_common(w, rec, mn, host, ping, sg2_before)
    # the MN was told, inside the SA, to send to sg2 from now on
    mn_out = outbound(w.sa_list("mn"))
    assert mn_out["dst"] == SG_OUTER["sg2"], mn_out
    assert mn_out["udp_encap"] == [4500, 4500]
    sg2_out = outbound(w.sa_list("sg2"))
    assert sg2_out["src"] == SG_OUTER["sg2"] and sg2_out["dst"] == MN_OUTER, sg2_out
    assert "gateway-changed" in w.log("mn")


@pytest.mark.parametrize(
    "vworld",
    [
        pytest.param(False, id="gateways-route-no-access-traffic"),
        pytest.param(True, id="gateways-route-access-traffic"),
    ],
    indirect=True,
)
def test_indirect_handover_moves_the_virtual_address(vworld: HandoverWorld) -> None:
    w = vworld
    vip = f"{VIP}/32"
    assert vip in w.addresses("sg1") and vip not in w.addresses("sg2")
    mn_before = outbound(w.sa_list("mn"))
    assert mn_before["dst"] == VIP
    sg1_mac, sg2_mac = w.mac("sg1"), w.mac("sg2")
    assert sg1_mac != sg2_mac
    # one ping through the tunnel: the MN resolves the virtual address, to sg1
    w.ns.run("mn", "ping", "-n", "-c1", "-W5", "-I", MN_INNER, HOST, timeout=30)
    assert w.neigh_mac("mn", VIP) == sg1_mac
    sg2_before = w.status("sg2")["counters"]
    arp = w.capture("mn", "mn-arp", "arp")
    try:
        rec, mn, host, ping = handover(w)
    finally:
        arp.stop()
    check_common(w, rec, mn, host, ping, sg2_before)
    # the MN saw sg2 announce the address: an ARP with the virtual address as sender and
    # target, from sg2's MAC (sent on the commit)
    rows = arp.fields("arp.opcode", "arp.src.hw_mac", "arp.src.proto_ipv4", "arp.dst.proto_ipv4")
    garps = [r for r in rows if r[2] == VIP and r[3] == VIP]
    assert garps and all(r[1].lower() == sg2_mac for r in garps), rows
    print("ARP seen at the MN:", rows)
    assert vip in w.addresses("sg2"), w.logs()
    # sg1 lets go of it (at the latest when it stops forwarding for the moved SAs)
    wait_until(lambda: vip not in w.addresses("sg1"), "sg1 to release the address", 20)
    # the gratuitous ARP updated the MN's cache: the address is at sg2's MAC now
    assert w.neigh_mac("mn", VIP) == sg2_mac, (w.neigh_mac("mn", VIP), sg2_mac, sg1_mac)
    # nothing changed at the MN: same gateway address, same SPI; no signal was sent
    mn_after = outbound(w.sa_list("mn"))
    assert mn_after["dst"] == VIP and mn_after["spi"] == mn_before["spi"], mn_after
    assert mn_after["seq"] > mn_before["seq"]
    assert "gateway-changed" not in w.log("mn")
    sg2_out = outbound(w.sa_list("sg2"))
    assert sg2_out["src"] == VIP and sg2_out["dst"] == MN_OUTER, sg2_out
    assert "virtual-address-claimed" in w.log("sg2")
    assert "virtual-address-released" in w.log("sg1")

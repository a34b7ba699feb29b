"""The mobile node (``ipsecct node run``'s agent: gateway/mobile_agent.py) against a hostile or
confused gateway: one that holds the SA's keys, so its signals (ESP next header 253) pass the
ICV and the anti-replay window, but say what no gateway should. The demo's three gateways and
mobile node, real sockets: sg1 seals the signals in its SA towards the node and sends them."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from ipsecct.demo import topology as demo
from ipsecct.gateway.mobile_agent import APPLIED_MAX, MobileAgent
from ipsecct.ipsec import signalling
from ipsecct.ipsec.esp import Drop
from tests.helpers.handover import run_demo
from tests.helpers.waiting import eventually


def send_signal(d: demo.Demo, items: list[signalling.SignalItem]) -> None:
    """sg1 signals the mobile node inside its SA towards it, as a gateway does at a handover."""
    node = d.gateways["sg1"].node
    [t] = node.engine.tunnels()
    res = node.engine.signal(t.outbound, signalling.encode(items), node.clock())
    assert not isinstance(res, Drop), res
    node.send_esp(res.sa, res.data)


@pytest.mark.parametrize(
    "address, port",
    [("0.0.0.0", 4500), ("224.0.0.1", 4500), ("255.255.255.255", 4500), (None, 0)],
    ids=["unspecified", "multicast", "broadcast", "port-0"],
)
def test_a_gateway_address_nothing_can_answer_from_is_refused(
    tmp_path: Path, address: str | None, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An SG_UPDATE naming the unspecified address (0.0.0.0: the node's own host), a
    multicast or the broadcast address, or port 0 (sendto: EINVAL): the node sent its ESP
    there from then on, to no gateway, until it rekeyed. Refused (signal-rejected), the
    node's outbound SA unchanged, and the stream still flows."""

    async def body(d: demo.Demo) -> None:
        agent: MobileAgent = d.agent
        out = d.mn.node.engine.tunnels()[0].outbound
        before = (out.dst, out.encap)
        sg1 = d.gateways["sg1"]
        addr = ipaddress.ip_address(address or demo.ADDRESS["sg1"])
        send_signal(d, [signalling.SgUpdate(addr, port)])
        await eventually(lambda: agent.rejected == 1, "the node to refuse the signal", 10)
        assert (out.dst, out.encap) == before and agent.applied == []
        # A signal naming sg1 where it is, afterwards: applied (the SA was not spoiled).
        send_signal(d, [signalling.SgUpdate(ipaddress.ip_address(demo.ADDRESS["sg1"]),
                                            sg1.outer_port)])  # fmt: skip
        await eventually(lambda: len(agent.applied) == 1, "the node to apply the good one", 10)
        assert agent.rejected == 1

    with caplog.at_level(logging.INFO, logger="ipsecct"):
        run_demo(tmp_path, body)
    assert any("event=signal-rejected" in r.getMessage() for r in caplog.records)


def read(agent: MobileAgent, n: int) -> Callable[[], bool]:
    return lambda: agent.applied_total >= n


def test_a_flood_of_signals_grows_neither_the_nodes_memory_nor_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway sending signal after signal (each valid: its own address again, or junk the
    node rejects): the node kept every applied change for good (a list, read by status and
    tests) and wrote a log line for each, applied or rejected. Both bounded: the last
    APPLIED_MAX changes, and the lines rate-limited with a count of those left out."""
    n = 3 * APPLIED_MAX

    async def body(d: demo.Demo) -> None:
        agent: MobileAgent = d.agent
        sg1 = d.gateways["sg1"]
        here = signalling.SgUpdate(ipaddress.ip_address(demo.ADDRESS["sg1"]), sg1.outer_port)
        for i in range(n):
            send_signal(d, [here])
            send_signal(d, [signalling.SgUpdate(ipaddress.ip_address("0.0.0.0"), 4500)])
            if i % 20 == 19:  # (let the node read them: a socket buffer is no queue)
                await eventually(read(agent, i + 1), "the node to read", 10)
        await eventually(lambda: agent.applied_total == n and agent.rejected == n,
                         "the node to read every signal", 20)  # fmt: skip
        assert len(agent.applied) == APPLIED_MAX

    with caplog.at_level(logging.INFO, logger="ipsecct"):
        run_demo(tmp_path, body)
    lines = [r.getMessage() for r in caplog.records]
    changed = [m for m in lines if "event=gateway-changed" in m]
    rejected = [m for m in lines if "event=signal-rejected" in m]
    assert 1 <= len(changed) <= 10 and 1 <= len(rejected) <= 10, (len(changed), len(rejected))

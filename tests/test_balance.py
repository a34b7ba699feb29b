"""Load balancing started by the gateway itself ([transfer] balance): above a threshold of
active tunnels, the excess moves to a peer in one batched exchange."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ipsecct.bench.transfer import make_tunnel
from ipsecct.demo import handover as demo_handover
from ipsecct.demo import topology as demo
from ipsecct.errors import ConfigError, TransferError
from ipsecct.gateway import config as config_mod
from ipsecct.gateway.balancer import Balancer
from ipsecct.gateway.config import BalanceConfig
from ipsecct.ipsec.engine import TunnelState
from tests.helpers.config_files import transfer_config
from tests.helpers.waiting import eventually


def active(world: demo.Demo, name: str) -> int:
    eng = world.gateways[name].node.engine
    return sum(1 for t in eng.tunnels() if t.state is TunnelState.ACTIVE)


def test_gateway_moves_its_excess_tunnels(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, int]:
        world = await demo.build(tmp_path)
        try:
            sg1 = world.services["sg1"]
            assert sg1.transfer is not None
            sg1.balancer = Balancer(sg1.node, BalanceConfig(20, "sg2", 50, 0.1), sg1.transfer)
            await demo_handover.setup(world)
            eng = world.gateways["sg1"].node.engine
            for i in range(100):  # 1 demo tunnel + 100 more: 81 too many, two rounds of 50
                make_tunnel(eng, i, demo.ADDRESS["sg1"], demo.ADDRESS["mn"])
            before = active(world, "sg1")
            # done when the source has let go and the target has activated (the target
            # activates on the COMMIT, a moment after the source has sent it)
            await eventually(
                lambda: active(world, "sg1") <= 20
                and active(world, "sg1") + active(world, "sg2") >= 101,
                "two rounds of balancing",
                timeout=20,
            )
            return before, active(world, "sg1"), active(world, "sg2")
        finally:
            await demo.stop(world)

    before, sg1, sg2 = asyncio.run(main())
    assert before == 101
    assert sg1 == 20  # the threshold, no fewer: balancing moves only the excess
    assert sg2 == 81  # and nothing is lost or duplicated


def test_balance_configuration_errors() -> None:
    ok = config_mod.from_dict(transfer_config({"balance": {"above": 5, "to": "sg2"}}),
                              "sg1.toml")
    assert ok.transfer is not None and ok.transfer.balance == BalanceConfig(5, "sg2", 1000, 1.0)
    for bad, key in (
        ({"above": 0, "to": "sg2"}, "balance.above"),
        ({"above": 5, "to": "nobody"}, "balance.to"),
        ({"above": 5}, "balance"),
        ({"above": 5, "to": "sg2", "speed": 1}, "balance"),
    ):
        with pytest.raises(ConfigError, match=f"sg1.toml: transfer.{key}"):
            config_mod.from_dict(transfer_config({"balance": bad}), "sg1.toml")


def test_a_context_too_large_to_encode_leaves_the_tunnel_active() -> None:
    """A 65536-packet replay window does not fit a CDB (2040 octets): the transfer must be
    refused up front, and the tunnel must go on carrying traffic (not stay held)."""
    import ipaddress
    import os

    from ipsecct.ct.transfer import TransferCore
    from ipsecct.ipsec.engine import Engine
    from ipsecct.ipsec.ippacket import Endpoint
    from ipsecct.ipsec.sad import Direction, SecurityAssociation
    from ipsecct.ipsec.spd import Action, Selectors, SPDEntry

    a = ipaddress.ip_address
    sel = Selectors.between("10.2.0.0/24", "10.1.0.2")
    eng = Engine()
    out = SecurityAssociation(
        0x1001,
        Direction.OUTBOUND,
        a("192.0.2.1"),
        a("192.0.2.2"),
        enc_key=os.urandom(20),
        selectors=sel,
    )
    inn = SecurityAssociation(
        0x1002,
        Direction.INBOUND,
        a("192.0.2.2"),
        a("192.0.2.1"),
        enc_key=os.urandom(20),
        selectors=sel,
        replay_window=65536,
    )
    inn.window.update(1)  # a packet received: the 8 KiB bitmap must travel
    t = eng.add_tunnel(SPDEntry(sel, Action.PROTECT, static=False), out, inn)
    core = TransferCore(eng, Endpoint(a("192.0.2.1"), 4500))
    with pytest.raises(TransferError, match="cannot encode"):
        core.start([t], "sg2", 0.0)
    assert t.state is TunnelState.ACTIVE
    assert not core.outgoing

"""Contexts a rogue peer makes up, for the transfer-policy and peer-attack tests; the victim
sg1 of tests/test_transfer_policy (``victim_world``) and what its peer sg2 sends it there."""

from __future__ import annotations

import os

from ipsecct.ct import context, cxtp
from ipsecct.ct.transfer import Settings
from ipsecct.ipsec.algorithms import EncAlg
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, AddressRange, Selectors, SPDEntry
from tests.helpers.transfer import MN_ADDR, SG_ADDR, World, ip, sel


def rogue_cdbs(
    selectors: Selectors,
    *,
    spi_out: int = 0x6660001,
    spi_in: int = 0x6660002,
    mn: str = "192.0.2.66",
) -> list[bytes]:
    """A tunnel the attacker made up: its own keys, whatever selectors it likes."""
    g, m = ip(SG_ADDR["sg2"]), ip(mn)
    out = []
    for spi, d, src, dst in (
        (spi_out, Direction.OUTBOUND, g, m),
        (spi_in, Direction.INBOUND, m, g),
    ):
        sa = SecurityAssociation(
            spi,
            d,
            src,
            dst,
            enc=EncAlg.AES_GCM_16,
            enc_key=os.urandom(20),
            mode=Mode.TUNNEL,
            esn=True,
            replay_window=64,
            encap=UdpEncap(4500, 4500),
            selectors=selectors,
            name="rogue",
        )
        out.append(context.encode(sa, 1000.0))
    return out


MN = ip(MN_ADDR)
ACCEPT = Settings(
    accept_local=(AddressRange.parse("10.2.0.0/24"),),
    accept_remote=(AddressRange.parse("10.1.0.0/16"),),
)
DISCARDED = "10.2.0.99"  # an address sg1's operator DISCARDs


def victim_world() -> World:
    w = World(settings={"sg1": ACCEPT, "sg2": Settings()})
    w.gw["sg1"].engine.add_policy(
        SPDEntry(sel(f"{DISCARDED}/32", "0.0.0.0/0"), Action.DISCARD, name="no"), index=0
    )
    return w


def send_pctd(w: World, cdbs: list[bytes], tid: int = 0x5EED, *, last: bool = True) -> None:
    tag = cxtp.TransferTag(tid, 0, last=last).encode()
    w.post("sg2", "sg1", cxtp.encode(cxtp.PCTD(MN, 0, b"k" * 20, (tag, *cdbs))))
    w.deliver("sg2", "sg1")


def ctdr_ok(w: World) -> bool:
    msg = w.drop("sg1", "sg2")
    assert isinstance(msg, cxtp.CTDR)
    return msg.all_ok

"""Contexts a rogue peer makes up, for the transfer-policy and peer-attack tests."""

from __future__ import annotations

import os

from ipsecct.ct import context
from ipsecct.ipsec.algorithms import EncAlg
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Selectors
from tests.helpers.transfer import SG_ADDR, ip


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

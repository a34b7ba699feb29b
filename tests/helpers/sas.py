"""SA pairs as two peers hold them, and every ESP transform with each key size."""

from __future__ import annotations

import ipaddress
import os

from ipsecct.ipsec.algorithms import EncAlg, IntegAlg
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation

# (encryption, integrity, encryption key length): every ESP transform with each key size.
ESP_TRANSFORMS: list[tuple[EncAlg, IntegAlg, int]] = [
    (EncAlg.AES_GCM_16, IntegAlg.NONE, 20),
    (EncAlg.AES_GCM_16, IntegAlg.NONE, 36),
    (EncAlg.CHACHA20_POLY1305, IntegAlg.NONE, 36),
    (EncAlg.AES_CBC, IntegAlg.HMAC_SHA2_256_128, 16),
    (EncAlg.AES_CBC, IntegAlg.HMAC_SHA2_384_192, 24),
    (EncAlg.AES_CBC, IntegAlg.HMAC_SHA2_512_256, 32),
    (EncAlg.NULL, IntegAlg.HMAC_SHA2_256_128, 0),
    (EncAlg.AES_CBC, IntegAlg.HMAC_SHA1_96, 16),
]


def sa_pair(
    enc: EncAlg = EncAlg.AES_GCM_16,
    integ: IntegAlg = IntegAlg.NONE,
    *,
    enc_key_len: int | None = None,
    integ_key_len: int | None = None,
    spi: int = 0x1000,
    src: str = "192.0.2.1",
    dst: str = "192.0.2.2",
    mode: Mode = Mode.TUNNEL,
    esn: bool = False,
    window: int = 64,
) -> tuple[SecurityAssociation, SecurityAssociation]:
    """An (outbound, inbound) pair of SAs sharing keys, as two peers would hold them."""
    from ipsecct.ipsec.algorithms import ENC, INTEG

    ek = os.urandom(enc_key_len if enc_key_len is not None else ENC[enc].key_lengths[0])
    ik = os.urandom(integ_key_len if integ_key_len is not None else INTEG[integ].key_length)
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    common = dict(enc=enc, enc_key=ek, integ=integ, integ_key=ik, mode=mode, esn=esn,
                  replay_window=window)
    out = SecurityAssociation(spi, Direction.OUTBOUND, a, b, **common)  # type: ignore[arg-type]
    inn = SecurityAssociation(spi, Direction.INBOUND, a, b, **common)  # type: ignore[arg-type]
    return out, inn

"""Two gateways (a, b) of one manual tunnel on loopback, native data path or Python, for
tests/test_native_node and the probe it runs in a child process: ``node_cfg`` makes either's
configuration, ``udp_port`` a free UDP port."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from ipsecct.gateway.config import from_dict

KEY_AB = "11111111111111111111111111111111feed0001"
KEY_BA = "22222222222222222222222222222222feed0002"


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_cfg(
    tmp: Path, name: str, outer: int, listen: int, peer: int, far: int, inverse: bool, enc: str
) -> Any:
    keys = tmp / f"{name}.keys"
    out_k, in_k = (KEY_BA, KEY_AB) if inverse else (KEY_AB, KEY_BA)
    if enc == "chacha20-poly1305":
        out_k, in_k = out_k + "00" * 16, in_k + "00" * 16
    keys.write_text(f'out_enc = "{out_k}"\nin_enc = "{in_k}"\n')
    os.chmod(keys, 0o600)
    local, remote = ("10.2.0.0/24", "10.1.0.0/24") if inverse else ("10.1.0.0/24", "10.2.0.0/24")
    spi_out, spi_in = (0x2001, 0x1001) if inverse else (0x1001, 0x2001)
    return from_dict(
        {
            "name": name,
            "outer": {"address": "127.0.0.1", "port": outer},
            "inner": {"kind": "udp", "listen": f"127.0.0.1:{listen}", "peer": f"127.0.0.1:{peer}"},
            "tunnel": [
                {
                    "name": f"{name}-t",
                    "local_ts": local,
                    "remote_ts": remote,
                    "peer": f"127.0.0.1:{far}",
                    "enc": enc,
                    "esn": True,
                    "replay_window": 1024,
                    "spi_out": spi_out,
                    "spi_in": spi_in,
                    "keys": str(keys),
                }
            ],
        },
        str(tmp / f"{name}.toml"),
    )

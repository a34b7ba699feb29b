"""A valid gateway configuration file (GOOD, with its key file KEYS) for tests to vary, and
:func:`write` to put both in a directory."""

from __future__ import annotations

import os
from pathlib import Path

GOOD = """\
name = "sg1"

[outer]
address = "127.0.0.2"
port = 24500

[inner]
kind = "udp"
listen = "127.0.0.2:25000"
peer = "127.0.0.2:25001"

[control]
socket = "/tmp/x.sock"

[log]
level = "info"

[[policy]]
name = "drop-printer"
local = "10.2.0.0/24"
remote = "10.1.0.99"
action = "discard"

[[tunnel]]
name = "t1"
local_ts = "10.2.0.0/24"
remote_ts = "10.1.0.2/32"
peer = "127.0.0.1:14500"
spi_in = 0x10000001
spi_out = 0x20000001
keys = "t1.keys"
"""

KEYS = 'in_enc = "{}"\nout_enc = "{}"\n'.format("11" * 20, "22" * 20)


def write(tmp: Path, text: str, keys: str | None = KEYS) -> Path:
    if keys is not None:
        k = tmp / "t1.keys"
        k.write_text(keys)
        os.chmod(k, 0o600)
    p = tmp / "cfg.toml"
    p.write_text(text)
    return p


def transfer_config(extra: dict[str, object]) -> dict[str, object]:
    """A gateway configuration as a dict (for ``gateway.config.from_dict``): sg1 with one
    peer, sg2, and a ``[transfer]`` section holding ``extra`` (its certificate paths are any
    existing file: only the paths are checked there)."""
    pem = __file__
    return {
        "name": "sg1",
        "outer": {"address": "127.0.1.1"},
        "inner": {"kind": "udp", "listen": "127.0.0.1:1", "peer": "127.0.0.1:2"},
        "peers": [{"name": "sg2", "address": "127.0.1.2:5091"}],
        "transfer": {"listen": "127.0.1.1:5091", "cert": pem, "key": pem, "ca": pem, **extra},
    }


def failover_sg1(tmp: Path) -> Path:
    """sg1 of examples/failover with its one tunnel and its key file (0600) in ``tmp``,
    without [transfer] and the sections after it (the etcd-mode tests add their own)."""
    root = Path(__file__).resolve().parent.parent.parent / "examples" / "failover"
    text = (root / "sg1.toml").read_text()
    (tmp / "sg1.toml").write_text(text[: text.index("[transfer]")])
    (tmp / "keys").mkdir()
    (tmp / "keys" / "sg1.keys").write_bytes((root / "keys" / "sg1.keys").read_bytes())
    (tmp / "keys" / "sg1.keys").chmod(0o600)
    return tmp / "sg1.toml"

"""``ipsecct bench NAME``: the benchmarks.

Extension point: :data:`BENCHES` maps each ``ipsecct bench`` subcommand to the module that
implements it. Such a module defines ``add_parser(sub)``, which adds its subcommand to the
``bench`` subparsers and sets ``handler`` (``args -> exit status``) as a default. To add
``ipsecct bench gateway``, write ``ipsecct/bench/gateway.py`` with ``add_parser`` and add
``"gateway": "ipsecct.bench.gateway"`` here.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHES: dict[str, str] = {
    "codec": "ipsecct.bench.codec",
    "transfer": "ipsecct.bench.transfer",
    "gateway": "ipsecct.bench.gateway",
    "failover": "ipsecct.bench.failover",
    "tunnel": "ipsecct.bench.tunnel",
    "ikev2": "ipsecct.bench.ikev2",
}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench", help="measure ipsecct's speed", description="Benchmarks of ipsecct."
    )
    benches = p.add_subparsers(dest="bench", metavar="BENCH")
    benches.required = True
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        mod.add_parser(benches)
        if name not in benches.choices:
            raise RuntimeError(f"{module}.add_parser did not add 'bench {name}'")

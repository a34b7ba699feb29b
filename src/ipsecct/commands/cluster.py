"""``ipsecct cluster status``: members, leases, owners and tunnel counts, as etcd has them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any


def cmd_status(args: argparse.Namespace) -> int:
    from ..gateway.cluster_driver import cluster_status
    from ..gateway.config import cluster_of
    from ..gateway.log import escaped

    st = asyncio.run(cluster_status(cluster_of(args.config)))
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"cluster {st['cluster']} (etcd {', '.join(st['etcd'])})")
    # ttl_s: the lease's TTL as etcd granted it (the member's [cluster] ttl_s); left_s: what
    # is left of it now (a live member renews it every ttl_s / 4)
    print(
        f"{'member':<16} {'lease':<18} {'ttl_s':>5} {'left_s':>6} {'groups':>6} {'tunnels':>8}"
        "  address"
    )
    # (names, addresses and claims are what any etcd writer chose: escaped)
    for name, m in sorted(st["members"].items()):
        ttl, left = ("-" if m[k] is None else m[k] for k in ("ttl_s", "left_s"))
        print(
            f"{escaped(name):<16} {m['lease']:<18} {ttl:>5} {left:>6} {m['groups']:>6} "
            f"{m['tunnels']:>8}  {escaped(m['address'])}"
        )
    if st.get("malformed_members"):
        print(f"{st['malformed_members']} key(s) under members/ that no member wrote (no lease,"
              " or not their own): not members, not listed")  # fmt: skip
    if st["owners_without_member"]:
        print(f"{st['owners_without_member']} tunnel(s) whose group has no owner (yet)")
    for i, b in st["spi_blocks"].items():
        print(f"spi block {i}: {b['range']} {escaped(b['member'])}")
    return 0


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "cluster", help="a cluster of gateways on etcd: members, leases, owners"
    )
    ss = p.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    ss.required = True
    s: argparse.ArgumentParser = ss.add_parser("status", help="what etcd says about the cluster")
    s.add_argument("--config", "-c", required=True, help="a gateway configuration with [cluster]")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(handler=cmd_status)

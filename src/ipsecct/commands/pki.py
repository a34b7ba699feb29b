"""`ipsecct pki`: make a test CA and gateway certificates for the TLS channel, and show them."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from ..tools import pki


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "pki", help="test CA and gateway certificates for the TLS channel between gateways"
    )
    psub = p.add_subparsers(dest="pki_command", metavar="ACTION")
    psub.required = True

    init = psub.add_parser(
        "init",
        help="write a test CA and one certificate per gateway",
        description="Write DIR/ca.pem, DIR/ca.key and DIR/NAME.pem, DIR/NAME.key for each "
        "gateway (EC P-256; SANs: DNS NAME, IP 127.0.0.1 and ::1; serverAuth and clientAuth). "
        "Key files get mode 0600. Existing files are left alone unless --force.",
    )
    init.add_argument("--dir", required=True, help="directory to write into (created if needed)")
    init.add_argument(
        "--gateways", required=True, help="comma-separated gateway names, e.g. sg1,sg2"
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(handler=_init)

    show = psub.add_parser("show", help="describe a certificate or key file")
    show.add_argument("file", help="a PEM certificate or key file")
    show.set_defaults(handler=_show)


def _init(args: argparse.Namespace) -> int:
    names = [n.strip() for n in str(args.gateways).split(",") if n.strip()]
    files = pki.init_pki(args.dir, names, dt.datetime.now(dt.UTC), force=args.force)
    for f in files:
        print(f)
    return 0


def _show(args: argparse.Namespace) -> int:
    for line in pki.describe_file(args.file):
        print(line)
    return 0

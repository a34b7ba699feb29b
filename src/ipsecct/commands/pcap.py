"""`ipsecct pcap decrypt --keys KEYFILE IN.pcap OUT.pcap`: decrypt the ESP packets of a
capture with keys in Wireshark's ``esp_sa`` format (see :mod:`ipsecct.tools.keyfile` and
:mod:`ipsecct.tools.pcapdecrypt`).

Exit status: 0 when every ESP packet decrypted, 1 when some did not (one line each on stderr,
with the packet number as Wireshark counts frames), 2 when the input is unusable (not a pcap
file, an unsupported link type, a malformed key file).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, BinaryIO, cast

from ..errors import PcapError
from ..tools.keyfile import load_keyfile
from ..tools.pcap import PcapReader
from ..tools.pcapdecrypt import DUPLICATE_WINDOW, decrypt_pcap


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "pcap", help="work on packet captures", description="Work on packet captures."
    )
    psub = p.add_subparsers(dest="pcap_command", metavar="SUBCOMMAND")
    psub.required = True
    d: argparse.ArgumentParser = psub.add_parser(
        "decrypt",
        help="decrypt the ESP packets of a pcap file",
        description=(
            "Decrypt the ESP packets (raw or in UDP 4500, IPv4 or IPv6) of IN, a pcap file with"
            " Ethernet, raw-IP or Linux-cooked link type, with keys from KEYFILE (Wireshark's"
            " esp_sa lines, plus an optional 9th field \"ESN\" or \"ESN:0x<16 hex digits>\")."
            " OUT gets the decrypted packets as raw IP: the inner packet in tunnel mode, the"
            " rebuilt packet in transport mode. Packets that fail are reported on stderr and"
            " left out. Anti-replay is off: a repeated packet is written again and counted in"
            " a note. Exit status: 0 all ESP packets decrypted, 1 some failed, 2 unusable input."
        ),
    )
    d.add_argument("--keys", required=True, metavar="KEYFILE", help="esp_sa key file")
    d.add_argument("input", metavar="IN.pcap", help="capture to decrypt ('-': standard input)")
    d.add_argument("output", metavar="OUT.pcap",
                   help="where to write the decrypted packets ('-': standard output)")
    d.set_defaults(handler=decrypt_command)


def _open(path: str, mode: str, std: BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """``path`` opened, or for '-' the standard stream (left open, flushed at the end)."""
    if path != "-":
        return cast(BinaryIO, open(path, mode))  # (the caller's with closes it)
    return contextlib.nullcontext(std)


def decrypt_command(args: argparse.Namespace) -> int:
    keys = load_keyfile(args.keys)
    try:
        mode = os.stat(args.keys).st_mode
    except OSError:  # (gone since it was read: nothing to warn about)
        mode = 0
    if mode & 0o077:  # as for the gateway's key files (never the content)
        print(
            f"ipsecct: warning: {args.keys}: the keys can be read by its group or others"
            f" (mode {mode & 0o777:o}): chmod 600 it",
            file=sys.stderr,
        )
    for kl in keys:
        if kl.encryption_only:
            print(
                f"ipsecct: warning: {args.keys}: line {kl.lineno}: encryption-only ESP"
                " (no integrity): packets are decrypted without being authenticated",
                file=sys.stderr,
            )
    if (
        "-" not in (args.input, args.output)
        and os.path.exists(args.output)
        and os.path.exists(args.input)
        and os.path.samefile(args.input, args.output)
    ):
        raise PcapError("OUT.pcap is the same file as IN.pcap")
    # '-': standard input or output, as tcpdump -w -, tshark -r - and editcap read it
    where = "standard output" if args.output == "-" else args.output

    def report(number: int, reason: str) -> None:
        print(f"ipsecct: packet {number}: {reason}", file=sys.stderr)

    with _open(args.input, "rb", sys.stdin.buffer) as src:
        try:
            reader = PcapReader(src)  # a bad file header: OUT is not even created
        except PcapError as exc:
            raise PcapError(f"{args.input}: {exc}") from None
        with _open(args.output, "wb", sys.stdout.buffer) as dst:
            try:
                stats = decrypt_pcap(reader, dst, keys, report)
            except PcapError as exc:
                raise PcapError(
                    f"{args.input}: {exc} (packets decrypted before it are in {where})"
                ) from None
    if stats.duplicates:
        print(
            f"ipsecct: note: {stats.duplicates} decrypted packet(s) repeat a sequence number"
            f" seen within the last {DUPLICATE_WINDOW} of their SA (duplicates in the capture,"
            " or a replay); they are written anyway",
            file=sys.stderr,
        )
    if stats.esp == 0:
        print(f"ipsecct: note: no ESP packets in {args.input}", file=sys.stderr)
    if stats.failed:
        print(
            f"ipsecct: {stats.failed} of {stats.esp} ESP packets not decrypted;"
            f" {stats.written} written to {where}",
            file=sys.stderr,
        )
        return 1
    return 0

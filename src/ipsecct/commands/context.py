"""`ipsecct context encode|decode`: an SA's feature context between its JSON form and a CDB.

``encode FILE|-`` reads the JSON form of one SA and prints its Context Data Block as one line of
hex; ``decode FILE|-`` reads hex (whitespace anywhere is ignored) and prints the JSON form. With
``--lines`` every input line is one item and every output line is one result (compact JSON or
hex) or ``error: <reason>``; every line is processed and the exit status is 0 only if all of
them succeeded, else 2.

The JSON form carries the SA's age rather than a clock reading, so the command runs with a fixed
``now`` of 0 and ``decode | encode`` reproduces the input exactly.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Callable
from typing import Any

from ..ct import context
from ..errors import ContextError, IpsecctError
from ..tools.files import INPUT_LIMIT, read_limited, read_stream_limited

NOW = 0.0  # the JSON form holds durations only, so any fixed clock gives the same bytes
_HEX = frozenset(string.hexdigits)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "context",
        help="encode and decode IPsec SA feature contexts (CXTP Context Data Blocks)",
        description="Convert one SA's feature context between its JSON form and the CXTP"
        f" Context Data Block (FPT 0x{context.FPT_IPSEC_SA:04x}) as hex.",
    )
    p.set_defaults(handler=lambda args: _usage(p))
    actions = p.add_subparsers(dest="context_action", metavar="ACTION")
    actions.required = True
    enc = actions.add_parser("encode", help="JSON form of one SA -> CDB as hex")
    dec = actions.add_parser("decode", help="CDB as hex -> JSON form")
    for q in (enc, dec):
        q.add_argument("file", metavar="FILE|-", help="input file, or - for standard input")
        q.add_argument(
            "--lines",
            action="store_true",
            help="one item per input line, one result or 'error: <reason>' per output line",
        )
    enc.set_defaults(handler=run_encode)
    dec.set_defaults(handler=run_decode)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_usage(sys.stderr)
    return 2


def _read_text(path: str) -> str:
    if path == "-":
        raw = read_stream_limited(sys.stdin.buffer, INPUT_LIMIT)
    else:
        raw = read_limited(path, INPUT_LIMIT)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ContextError("the input is not UTF-8 text") from None


def parse_hex(text: str) -> bytes:
    """Octets from hex digits; whitespace anywhere is ignored."""
    digits = "".join(text.split())
    if not digits:
        raise ContextError("no hex digits in the input")
    if not _HEX.issuperset(digits):
        raise ContextError("the input is not hex (only 0-9, a-f and whitespace are allowed)")
    if len(digits) % 2:
        raise ContextError("odd number of hex digits")
    return bytes.fromhex(digits)


def _reject_constant(name: str) -> object:
    raise ContextError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ContextError(f"duplicate field {k!r} in the JSON")
        out[k] = v
    return out


def parse_json(text: str) -> object:
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ContextError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError):  # e.g. an integer too long to parse, deep nesting
        raise ContextError("invalid JSON: a value is too large or too deeply nested") from None


def encode_one(text: str) -> str:
    return context.encode(context.from_json(parse_json(text), NOW), NOW).hex()


def decode_one(text: str, *, indent: int | None) -> str:
    obj = context.to_json(context.decode(parse_hex(text), NOW), NOW)
    if indent is None:
        return json.dumps(obj, separators=(",", ":"))
    return json.dumps(obj, indent=indent)


def _run_lines(text: str, convert: Callable[[str], str]) -> int:
    status = 0
    lines = text.split("\n")  # not splitlines(): U+2028 and friends may sit inside JSON strings
    if lines[-1] == "":
        lines.pop()
    for raw in lines:
        line = raw.removesuffix("\r")
        try:
            out = convert(line)
        except IpsecctError as exc:
            out = "error: " + " ".join(str(exc).split())
            status = 2
        print(out, flush=False)
    sys.stdout.flush()
    return status


def run_encode(args: argparse.Namespace) -> int:
    text = _read_text(args.file)
    if args.lines:
        return _run_lines(text, encode_one)
    print(encode_one(text))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    text = _read_text(args.file)
    if args.lines:
        return _run_lines(text, lambda line: decode_one(line, indent=None))
    print(decode_one(text, indent=2))
    return 0

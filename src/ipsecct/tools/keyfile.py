"""Key files in Wireshark's ``esp_sa`` format, the one tshark and strongSwan's key export use.

One SA a line, eight quoted, comma-separated fields (wrapped here, one line in a file)::

    "IPv4","192.0.2.1","192.0.2.2","0x00001000",
        "AES-GCM with 16 octet ICV [RFC4106]","0x<key||salt>","NULL",""

The fields are: protocol (``IPv4`` or ``IPv6``), source and destination address, SPI,
encryption algorithm and key, authentication algorithm and key. ``*`` as a whole field
matches any address or SPI (Wireshark's per-character wildcards such as ``192.0.2.*`` are
refused, not guessed at). Algorithm names are Wireshark's (``algorithms.ENC[...].wireshark``);
ChaCha20-Poly1305, which Wireshark 4.0 lacks, is ``CHACHA20-POLY1305 [RFC7634]`` (Wireshark
4.2's spelling ``ChaCha20 with Poly1305 [RFC7634]`` is read too). Keys are ``0x`` and hex
digits; AEAD keys include the 4-octet salt; an empty key is ``""`` (or ``"0x"``).

ipsecct adds an optional ninth field: ``"ESN"`` (the SA uses 64-bit extended sequence numbers)
or ``"ESN:0x<16 hex digits>"``, the highest 64-bit sequence number already received, from
which the high-order bits of the packets that follow are inferred (default 0). tshark 4.0
warns about the extra field and ignores it (it cannot do ESN anyway).

Encryption-only ESP (AES-CBC with ``NULL`` authentication, as in RFC 3602's test cases) is
read, as Wireshark reads it, for decrypting captures (:attr:`KeyLine.encryption_only`; ``pcap
decrypt`` warns); an SA made from such a line cannot be installed in a gateway (RFC 8221 §3).

Lines starting with ``#`` and blank lines are ignored. Every malformed line raises
:class:`KeyFileError` naming the line number and the field; key bytes are never echoed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AlgorithmError, KeyFileError, SAError
from ..ipsec.algorithms import ENC, INTEG, EncAlg, IntegAlg, check_esp_combination
from ..ipsec.ippacket import IPAddress
from ..ipsec.sad import Direction, Mode, Protocol, SecurityAssociation
from .files import INPUT_LIMIT, read_limited

WILDCARD = "*"

ENC_BY_WIRESHARK: dict[str, EncAlg] = {info.wireshark: alg for alg, info in ENC.items()}
ENC_BY_WIRESHARK["ChaCha20 with Poly1305 [RFC7634]"] = EncAlg.CHACHA20_POLY1305
INTEG_BY_WIRESHARK: dict[str, IntegAlg] = {info.wireshark: alg for alg, info in INTEG.items()}

_FIELD = re.compile(r'\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_HEX = re.compile(r"[0-9a-fA-F]*")
_ESN = re.compile(r"ESN(?::0[xX]([0-9a-fA-F]{16}))?")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")
MAX_LINE = 4096


@dataclass(frozen=True)
class KeyLine:
    """One parsed line. ``src``, ``dst`` and ``spi`` are None for a wildcard."""

    lineno: int
    version: int  # 4 or 6
    src: IPAddress | None
    dst: IPAddress | None
    spi: int | None
    enc: EncAlg
    enc_key: bytes = field(repr=False)
    integ: IntegAlg
    integ_key: bytes = field(repr=False)
    esn: bool = False
    esn_top: int = 0  # highest 64-bit sequence number already received (ESN only)

    @property
    def encryption_only(self) -> bool:
        """No integrity at all (AES-CBC with NULL authentication): decrypts, unauthenticated."""
        return not ENC[self.enc].aead and self.integ is IntegAlg.NONE

    def matches(self, src: IPAddress, dst: IPAddress, spi: int) -> bool:
        return (
            src.version == self.version
            and (self.src is None or self.src == src)
            and (self.dst is None or self.dst == dst)
            and (self.spi is None or self.spi == spi)
        )

    def make_sa(
        self, src: IPAddress, dst: IPAddress, spi: int, *, replay_window: int = 0
    ) -> SecurityAssociation:
        """An inbound SA with this line's keys for one concrete flow (raises SAError for a
        reserved SPI). The mode is irrelevant to decryption; tunnel is recorded."""
        return SecurityAssociation(
            spi,
            Direction.INBOUND,
            src,
            dst,
            mode=Mode.TUNNEL,
            enc=self.enc,
            enc_key=self.enc_key,
            integ=self.integ,
            integ_key=self.integ_key,
            esn=self.esn,
            replay_window=replay_window,
            decrypt_only=self.encryption_only,
        )

    def describe(self) -> str:
        spi = "*" if self.spi is None else f"0x{self.spi:08x}"
        return (
            f"line {self.lineno}: IPv{self.version} {self.src or '*'} -> {self.dst or '*'}"
            f" SPI {spi} {ENC[self.enc].wireshark} / {INTEG[self.integ].wireshark}"
            + (f" ESN from 0x{self.esn_top:016x}" if self.esn else "")
        )


def _show(text: str) -> str:
    """A field for an error message, unless it could be key material (long hex)."""
    if len(text) > 64 or re.fullmatch(r"(0[xX])?[0-9a-fA-F]{11,}", text):
        return "(a value that looks like key material, not shown)"
    return repr(text)


def _unescape(text: str) -> str:
    """Wireshark UAT escapes: ``\\xHH`` and a backslash before any other character."""

    def repl(m: re.Match[str]) -> str:
        s = m.group(1)
        return chr(int(s[1:], 16)) if len(s) == 3 and s[0] == "x" else s

    return _ESCAPE.sub(repl, text)


def _split_fields(line: str, lineno: int) -> list[str]:
    fields: list[str] = []
    pos = 0
    n = len(line)
    while True:
        m = _FIELD.match(line, pos)
        if m is None:
            raise KeyFileError(
                f"line {lineno}: expected a double-quoted field at column {pos + 1}"
                " (fields are \"...\" separated by commas)"
            )
        fields.append(_unescape(m.group(1)))
        pos = m.end()
        if m.group(2) == "":
            if pos != n:  # pragma: no cover - `$` only matches at the end
                raise KeyFileError(f"line {lineno}: text after the last field")
            return fields
        if len(fields) > 9:
            raise KeyFileError(f"line {lineno}: more than 9 fields")


def _address(text: str, version: int, lineno: int, what: str) -> IPAddress | None:
    if text == WILDCARD:
        return None
    if WILDCARD in text:
        raise KeyFileError(
            f"line {lineno}: {what} address {_show(text)}:"
            " only a whole-field '*' wildcard is supported"
        )
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise KeyFileError(
            f"line {lineno}: {what} address {_show(text)} is not an IP address"
        ) from None
    if addr.version != version:
        raise KeyFileError(f"line {lineno}: {what} address {_show(text)} is not IPv{version}")
    return addr


def _spi(text: str, lineno: int) -> int | None:
    if text == WILDCARD:
        return None
    if len(text) < 3 or text[:2] not in ("0x", "0X") or not _HEX.fullmatch(text[2:]):
        raise KeyFileError(f"line {lineno}: SPI {_show(text)} is not '*' or 0x and hex digits")
    if len(text) > 10:
        raise KeyFileError(f"line {lineno}: SPI {_show(text)} has more than 8 hex digits")
    spi = int(text[2:], 16)
    if spi < 256:
        raise KeyFileError(f"line {lineno}: SPI {_show(text)} is reserved (0-255)")
    return spi


def _key(text: str, lineno: int, what: str) -> bytes:
    # The key text itself never appears in a message.
    if text in ("", "0x", "0X"):
        return b""
    if text[:2] not in ("0x", "0X"):
        raise KeyFileError(
            f"line {lineno}: {what} key must be 0x and hex digits (text keys are not supported)"
        )
    digits = text[2:]
    if not _HEX.fullmatch(digits):
        raise KeyFileError(f"line {lineno}: {what} key has a character that is not a hex digit")
    if len(digits) % 2:
        raise KeyFileError(f"line {lineno}: {what} key has an odd number of hex digits")
    return bytes.fromhex(digits)


def parse_line(text: str, lineno: int = 1) -> KeyLine | None:
    """Parse one line; None for a comment or blank line."""
    line = text.strip()
    if not line or line.startswith("#"):
        return None
    if len(line) > MAX_LINE:
        raise KeyFileError(f"line {lineno}: longer than {MAX_LINE} characters")
    fields = _split_fields(line, lineno)
    if len(fields) not in (8, 9):
        raise KeyFileError(
            f"line {lineno}: {len(fields)} fields; an esp_sa line has 8"
            " (protocol, source, destination, SPI, encryption, key, authentication, key)"
            " and optionally a 9th (ESN)"
        )
    proto, src_t, dst_t, spi_t, enc_t, ekey_t, integ_t, ikey_t = fields[:8]
    if proto not in ("IPv4", "IPv6"):
        raise KeyFileError(f"line {lineno}: protocol {_show(proto)} is not \"IPv4\" or \"IPv6\"")
    version = 4 if proto == "IPv4" else 6
    src = _address(src_t, version, lineno, "source")
    dst = _address(dst_t, version, lineno, "destination")
    spi = _spi(spi_t, lineno)
    enc = ENC_BY_WIRESHARK.get(enc_t)
    if enc is None:
        raise KeyFileError(
            f"line {lineno}: unsupported encryption algorithm {_show(enc_t)}"
            f" (supported: {', '.join(repr(k) for k in ENC_BY_WIRESHARK)})"
        )
    integ = INTEG_BY_WIRESHARK.get(integ_t)
    if integ is None:
        raise KeyFileError(
            f"line {lineno}: unsupported authentication algorithm {_show(integ_t)}"
            f" (supported: {', '.join(repr(k) for k in INTEG_BY_WIRESHARK)})"
        )
    enc_key = _key(ekey_t, lineno, "encryption")
    integ_key = _key(ikey_t, lineno, "authentication")
    try:
        check_esp_combination(enc, len(enc_key), integ, len(integ_key), encryption_only_ok=True)
    except AlgorithmError as exc:
        raise KeyFileError(f"line {lineno}: {exc}") from None
    esn = False
    esn_top = 0
    if len(fields) == 9 and fields[8] != "":
        m = _ESN.fullmatch(fields[8])
        if m is None:
            raise KeyFileError(
                f"line {lineno}: 9th field {_show(fields[8])} is not \"ESN\" or"
                " \"ESN:0x<16 hex digits>\""
            )
        esn = True
        if m.group(1):
            esn_top = int(m.group(1), 16)
    return KeyLine(lineno, version, src, dst, spi, enc, enc_key, integ, integ_key, esn, esn_top)


def parse_keyfile(text: str) -> list[KeyLine]:
    """Every SA line of a key file (raises KeyFileError if there is none)."""
    if text.startswith("\ufeff"):  # (what some editors write first: not seen, not a field)
        raise KeyFileError("line 1: starts with a byte-order mark (U+FEFF): save the file as"
                           " UTF-8 without one")  # fmt: skip
    lines: list[KeyLine] = []
    for i, raw in enumerate(text.splitlines(), 1):
        kl = parse_line(raw, i)
        if kl is not None:
            lines.append(kl)
    if not lines:
        raise KeyFileError("the key file holds no SA line")
    return lines


def load_keyfile(path: str | Path) -> list[KeyLine]:
    """Read and parse a key file (UTF-8)."""
    data = read_limited(path, INPUT_LIMIT)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path}: not UTF-8 text (octet {exc.start})") from None
    try:
        return parse_keyfile(text)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\x5c").replace('"', "\\x22") + '"'


def format_line(sa: SecurityAssociation) -> str:
    """One ``esp_sa`` line for an ESP SA (no newline). A non-ESN line is exactly what
    Wireshark and tshark read; an ESN SA gets the ninth field with the highest sequence
    number known: the replay window's top for an inbound SA, the last one sent for an
    outbound SA."""
    if sa.protocol is not Protocol.ESP:
        raise SAError(f"{sa.describe()}: Wireshark's esp_sa lines describe ESP SAs only")
    fields = [
        f"IPv{sa.src.version}",
        str(sa.src),
        str(sa.dst),
        f"0x{sa.spi:08x}",
        ENC[sa.enc].wireshark,
        "0x" + sa.enc_key.hex() if sa.enc_key else "",
        INTEG[sa.integ].wireshark,
        "0x" + sa.integ_key.hex() if sa.integ_key else "",
    ]
    if sa.esn:
        top = sa.window.top if sa.direction is Direction.INBOUND else sa.seq
        fields.append(f"ESN:0x{top:016x}" if top else "ESN")
    return ",".join(_quote(f) for f in fields)

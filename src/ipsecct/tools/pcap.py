"""Classic libpcap files: read and write, and find the IP packet inside a captured frame.

The format (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcap-04.html): a 24-octet file
header whose magic number gives the byte order and the timestamp resolution (0xA1B2C3D4
microseconds, 0xA1B23C4D nanoseconds), then records of a 16-octet header and the captured
octets. Both byte orders are read; files are written in the machine's order like libpcap does.

A capture file is untrusted input: every length is checked against the file and against a
fixed maximum before anything is read, and anything malformed raises :class:`PcapError` with the
number of the record (1-based, as Wireshark numbers frames) and what is wrong. pcapng files are
recognised and refused with a hint, not misread.

Link types understood by :func:`ip_packet`: Ethernet (1, with 802.1Q/802.1ad tags), raw IP
(101, and 228/229 for raw IPv4/IPv6), Linux cooked capture v1 (113, "SLL") and v2 (276, "SLL2").
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import PcapError

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

LINKTYPES: dict[int, str] = {
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}

MAGIC_MICRO = 0xA1B2C3D4
MAGIC_NANO = 0xA1B23C4D
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"

# The largest record accepted (Wireshark's WTAP_MAX_PACKET_SIZE_STANDARD): a bound on what a
# hostile file can make us allocate per record.
MAX_RECORD = 262144

_FILE_HDR_LEN = 24
_REC_HDR_LEN = 16

_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
_MAX_VLAN_TAGS = 4


@dataclass(frozen=True)
class PcapHeader:
    """What the file header says."""

    linktype: int
    snaplen: int
    nanosecond: bool  # timestamps' fractional part is in nanoseconds (else microseconds)
    big_endian: bool
    version: tuple[int, int] = (2, 4)
    fcs_len: int = 0  # octets of frame check sequence at the end of each frame (0: none)


@dataclass(frozen=True)
class CapturedPacket:
    """One captured packet. ``ts_frac`` is micro- or nanoseconds, as the file header says."""

    number: int  # 1-based position in the file
    ts_sec: int
    ts_frac: int
    data: bytes = field(repr=False)
    orig_len: int

    @property
    def truncated(self) -> bool:
        """Did the capture keep fewer octets than were on the wire (snaplen)?"""
        return self.orig_len > len(self.data)


def _parse_file_header(raw: bytes) -> PcapHeader:
    if len(raw) < 4:
        raise PcapError("not a pcap file: shorter than a pcap file header")
    if raw[:4] == _PCAPNG_MAGIC:
        raise PcapError(
            "this is a pcapng file; only classic pcap is read (convert: editcap -F pcap IN OUT)"
        )
    magic_le = struct.unpack_from("<I", raw)[0]
    magic_be = struct.unpack_from(">I", raw)[0]
    if magic_le in (MAGIC_MICRO, MAGIC_NANO):
        order, magic, big = "<", magic_le, False
    elif magic_be in (MAGIC_MICRO, MAGIC_NANO):
        order, magic, big = ">", magic_be, True
    else:
        raise PcapError("not a pcap file: unknown magic number")
    if len(raw) < _FILE_HDR_LEN:
        raise PcapError("truncated pcap file header")
    major, minor, _zone, _sigfigs, snaplen, ltfield = struct.unpack_from(order + "HHiIII", raw, 4)
    if major != 2:
        raise PcapError(f"unsupported pcap version {major}.{minor}")
    linktype = ltfield & 0xFFFF
    if ltfield & 0x03FF0000 or ltfield & 0x08000000:
        raise PcapError("pcap link type field has reserved bits set")
    fcs_len = 0
    if ltfield & 0x04000000:  # the F bit: the FCS length (in 16-bit words) is in bits 28-31
        fcs_len = 2 * (ltfield >> 28)
    if linktype not in LINKTYPES:
        known = ", ".join(f"{v} ({k})" for k, v in LINKTYPES.items())
        raise PcapError(f"unsupported link type {linktype}; supported: {known}")
    return PcapHeader(linktype, snaplen, magic == MAGIC_NANO, big, (major, minor), fcs_len)


class PcapReader:
    """Reads records from a binary stream, checking every bound. Iterate to get records."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        raw = stream.read(_FILE_HDR_LEN)
        if not raw:
            raise PcapError("empty file, not a pcap file")
        self.header = _parse_file_header(raw)
        order = ">" if self.header.big_endian else "<"
        self._rec = struct.Struct(order + "IIII")
        self._frac_limit = 1_000_000_000 if self.header.nanosecond else 1_000_000

    def __iter__(self) -> Iterator[CapturedPacket]:
        number = 0
        read = self._stream.read
        rec = self._rec
        while True:
            raw = read(_REC_HDR_LEN)
            if not raw:
                return
            number += 1
            if len(raw) < _REC_HDR_LEN:
                raise PcapError(f"record {number}: file ends inside the record header")
            ts_sec, ts_frac, incl_len, orig_len = rec.unpack(raw)
            if incl_len > MAX_RECORD:
                raise PcapError(
                    f"record {number}: captured length {incl_len} exceeds the maximum {MAX_RECORD}"
                )
            if orig_len < incl_len:
                raise PcapError(
                    f"record {number}: captured length {incl_len} exceeds original length"
                    f" {orig_len}"
                )
            if ts_frac >= self._frac_limit:
                raise PcapError(f"record {number}: timestamp fraction out of range")
            data = read(incl_len)
            if len(data) < incl_len:
                raise PcapError(
                    f"record {number}: file ends inside the packet data"
                    f" ({len(data)} of {incl_len} octets)"
                )
            yield CapturedPacket(number, ts_sec, ts_frac, data, orig_len)


class PcapWriter:
    """Writes a classic pcap file (machine byte order, like libpcap)."""

    def __init__(
        self,
        stream: BinaryIO,
        linktype: int,
        *,
        snaplen: int = MAX_RECORD,
        nanosecond: bool = False,
    ) -> None:
        if not 0 <= linktype <= 0xFFFF:
            raise PcapError(f"link type {linktype} out of range")
        self._stream = stream
        self.nanosecond = nanosecond
        self.snaplen = snaplen
        self.count = 0
        order = "<" if sys.byteorder == "little" else ">"
        self._rec = struct.Struct(order + "IIII")
        magic = MAGIC_NANO if nanosecond else MAGIC_MICRO
        stream.write(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))

    def write(
        self,
        data: bytes | bytearray | memoryview,
        ts_sec: int = 0,
        ts_frac: int = 0,
        orig_len: int | None = None,
    ) -> None:
        """Append one record; ``ts_frac`` is in this file's resolution."""
        n = len(data)
        if n > MAX_RECORD:
            raise PcapError(f"packet of {n} octets exceeds the maximum {MAX_RECORD}")
        limit = 1_000_000_000 if self.nanosecond else 1_000_000
        if not 0 <= ts_frac < limit or not 0 <= ts_sec <= 0xFFFFFFFF:
            raise PcapError("timestamp out of range")
        orig = n if orig_len is None else max(orig_len, n)
        self._stream.write(self._rec.pack(ts_sec, ts_frac, n, orig))
        self._stream.write(data)
        self.count += 1


def read_pcap(data: bytes) -> tuple[PcapHeader, list[CapturedPacket]]:
    """Parse a whole pcap file held in memory."""
    import io

    reader = PcapReader(io.BytesIO(data))
    return reader.header, list(reader)


def ip_packet(linktype: int, frame: bytes, fcs_len: int = 0) -> memoryview | None:
    """The IPv4 or IPv6 packet carried in a captured frame, or None when it carries something
    else (ARP, ...) or is too short for its link-layer header. The result may have trailing
    octets (Ethernet padding, FCS); the IP header's own length tells where the packet ends."""
    mv = memoryview(frame)
    if fcs_len and linktype == LINKTYPE_ETHERNET:
        mv = mv[: max(0, len(mv) - fcs_len)]
    n = len(mv)
    if linktype == LINKTYPE_RAW:
        if n and mv[0] >> 4 in (4, 6):
            return mv
        return None
    if linktype == LINKTYPE_IPV4:
        return mv if n and mv[0] >> 4 == 4 else None
    if linktype == LINKTYPE_IPV6:
        return mv if n and mv[0] >> 4 == 6 else None
    if linktype == LINKTYPE_ETHERNET:
        off = 12
        for _ in range(_MAX_VLAN_TAGS + 1):
            if n < off + 2:
                return None
            etype = (mv[off] << 8) | mv[off + 1]
            if etype not in _VLAN_TPIDS:
                break
            off += 4
        else:
            return None
        return _by_ethertype(etype, mv[off + 2 :])
    if linktype == LINKTYPE_LINUX_SLL:
        if n < 16:
            return None
        return _by_ethertype((mv[14] << 8) | mv[15], mv[16:])
    if linktype == LINKTYPE_LINUX_SLL2:
        if n < 20:
            return None
        return _by_ethertype((mv[0] << 8) | mv[1], mv[20:])
    return None


def _by_ethertype(etype: int, payload: memoryview) -> memoryview | None:
    if not payload:
        return None
    if etype == _ETHERTYPE_IPV4 and payload[0] >> 4 == 4:
        return payload
    if etype == _ETHERTYPE_IPV6 and payload[0] >> 4 == 6:
        return payload
    return None

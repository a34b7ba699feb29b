"""Decrypt the ESP packets of a capture with keys from a Wireshark ``esp_sa`` key file.

For every captured packet: find ESP, raw (IP protocol 50) or in UDP with port 4500 (RFC 3948;
IKE behind the non-ESP marker and NAT keep-alives are skipped), over IPv4 or IPv6 (the
hop-by-hop, routing and destination options extension headers are walked); pick the key lines
whose protocol, addresses and SPI match, in file order, and decrypt with ipsecct's own ESP core.
The first key that verifies wins. A decrypted packet is written out as

* tunnel mode (next header 4 or 41): the inner IP packet, TFC padding removed;
* transport mode (any other next header): the IP packet rebuilt: the outer header (and IPv6
  extension headers) with the protocol set to the next header, the lengths and the IPv4
  checksum fixed, and the ESP (and UDP) framing gone. After NAT traversal the inner TCP/UDP
  checksums may be wrong (RFC 3948 §3.1.2 incremental fix-ups are not done).

Anti-replay is off (inbound SAs with ``replay_window=0``). A capture is evidence, not a
receiver: it may start in the middle of an SA, hold packets the real receiver dropped, or hold
the same packet twice, legitimately (captured on Linux's "any" interface on the way in and on
the way out, port mirroring) or as a replay attack. Rejecting repeats would report authentic
packets as failures; the ICV still authenticates every packet written. Repeats are not hidden
either: every sequence number seen again within the last :data:`DUPLICATE_WINDOW` of its SA
is counted and reported as a note (the packet is still written and does not count as failed).

Extended sequence numbers: the high-order 32 bits are not on the wire. For each flow (key
line, addresses, SPI) ipsecct keeps the highest 64-bit sequence number decrypted so far,
starting from the key line's ``ESN:0x...`` value (default 0), and tries the candidates
(same high bits, one more, one less) nearest to it first: the ICV covers the high bits, so a
wrong guess fails verification and the next candidate is tried. Unlike a live receiver's
RFC 4303 Appendix A2.2 inference, which trusts its window, this accepts reordering of up to
2^31 packets either way, and finds a capture that starts one 2^32 epoch above the given value.
The chosen value is put into the core SA through its replay window's state (``restore``): with
a window of size 0 the core's inference then returns exactly that value.

Things this does not do: reassemble IP fragments (a fragmented ESP packet is reported), apply
SA lifetimes or selectors (not in a key file), or decrypt AH.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import PacketError, SAError
from ..ipsec import esp, ippacket
from ..ipsec.esp import Drop
from ..ipsec.ippacket import PROTO_ESP, PROTO_IPIP, PROTO_IPV6, PROTO_UDP, IPAddress
from ..ipsec.replay import ReplayWindow
from ..ipsec.sad import SecurityAssociation
from .keyfile import KeyLine
from .pcap import LINKTYPE_RAW, PcapReader, PcapWriter, ip_packet

NAT_T_PORT = 4500
DUPLICATE_WINDOW = 4096
_IPV6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options
_IPV6_FRAG = 44
_MAX_EXT_HEADERS = 16
_MASK32 = 0xFFFFFFFF
_MAX_SEQ_HIGH = 0xFFFFFFFF

_DROP_TEXT = {
    Drop.ICV: "ICV check failed (wrong key, or the packet was altered)",
    Drop.PADDING: "bad padding after decryption (wrong key or algorithm?)",
    Drop.MALFORMED: "malformed ESP packet",
    Drop.REPLAY: "sequence number 0 is never sent",
    Drop.LIFETIME: "SA lifetime expired",
}


class Outcome(enum.Enum):
    NOT_ESP = "not-esp"
    DECRYPTED = "decrypted"
    DUMMY = "dummy"  # verified, next header 59: nothing to write
    FAILED = "failed"


@dataclass
class Decrypted:
    outcome: Outcome
    packet: bytes = b""  # the decrypted packet (DECRYPTED)
    reason: str = ""  # why it failed (FAILED)
    duplicate: bool = False


@dataclass(frozen=True)
class EspLocation:
    """Where ESP sits in a captured IP packet."""

    version: int
    src: IPAddress
    dst: IPAddress
    head_end: int  # octets before the ESP (or UDP) header: IP header and extension headers
    nh_offset: int  # offset of the octet naming the protocol that follows ``head_end``
    esp_start: int
    esp_end: int  # the end of the IP packet (trailing link padding excluded)
    udp: bool


class _NotEsp(Exception):
    pass


class _EspProblem(Exception):
    """ESP that cannot be decrypted for a reason found before any key is tried."""


def locate_esp(pkt: memoryview | bytes) -> EspLocation | None:
    """Find ESP in an IP packet: None if there is none; raises _EspProblem when it is ESP but
    unusable (truncated by the capture, fragmented, bad UDP length)."""
    try:
        return _locate(pkt)
    except _NotEsp:
        return None


def _locate(pkt: memoryview | bytes) -> EspLocation:
    n = len(pkt)
    if n < 1:
        raise _NotEsp
    version = pkt[0] >> 4
    fragmented = False
    first_fragment = True
    if version == 4:
        if n < 20:
            raise _NotEsp
        ihl = (pkt[0] & 0x0F) * 4
        total = (pkt[2] << 8) | pkt[3]
        if ihl < 20 or total < ihl or n < ihl:
            raise _NotEsp
        frag = (pkt[6] << 8) | pkt[7]
        fragmented = bool(frag & 0x3FFF)
        first_fragment = not frag & 0x1FFF
        proto = pkt[9]
        nh_offset = 9
        src: IPAddress = ipaddress.IPv4Address(bytes(pkt[12:16]))
        dst: IPAddress = ipaddress.IPv4Address(bytes(pkt[16:20]))
        off = ihl
    elif version == 6:
        if n < 40:
            raise _NotEsp
        plen = (pkt[4] << 8) | pkt[5]
        if plen == 0:
            raise _NotEsp  # jumbogram or empty
        total = 40 + plen
        proto = pkt[6]
        nh_offset = 6
        src = ipaddress.IPv6Address(bytes(pkt[8:24]))
        dst = ipaddress.IPv6Address(bytes(pkt[24:40]))
        off = 40
        for _ in range(_MAX_EXT_HEADERS):
            if proto in _IPV6_EXT:
                if n < off + 2:
                    raise _NotEsp
                nh_offset = off
                proto = pkt[off]
                off += (pkt[off + 1] + 1) * 8
            elif proto == _IPV6_FRAG:
                if n < off + 8:
                    raise _NotEsp
                fo = (pkt[off + 2] << 8) | pkt[off + 3]
                if fo & 0xFFF9:  # offset or M flag: a real fragment (not an atomic one)
                    fragmented = True
                    first_fragment = not fo & 0xFFF8
                nh_offset = off
                proto = pkt[off]
                off += 8
            else:
                break
        else:
            raise _NotEsp
        if off > total:
            raise _NotEsp
    else:
        raise _NotEsp

    udp = False
    esp_start = off
    if proto == PROTO_UDP:
        if not first_fragment or n < off + 8:
            raise _NotEsp
        sport, dport, ulen = struct.unpack_from("!HHH", pkt, off)
        if NAT_T_PORT not in (sport, dport):
            raise _NotEsp
        udp = True
        esp_start = off + 8
        if fragmented:
            raise _EspProblem("IP fragment of UDP-encapsulated ESP (fragments are not reassembled)")
        if total > n:
            if n >= esp_start + 4 and not any(pkt[esp_start : esp_start + 4]):
                raise _NotEsp  # IKE after the non-ESP marker
            raise _EspProblem(
                f"packet truncated by the capture ({n} of {total} octets kept; raise the snaplen)"
            )
        if ulen < 8 or off + ulen > total:
            raise _EspProblem(f"bad UDP length {ulen}")
        end = off + ulen
        body = end - esp_start
        if body == 1 and pkt[esp_start] == 0xFF:
            raise _NotEsp  # NAT keep-alive (RFC 3948 §2.3)
        if body >= 4 and not any(pkt[esp_start : esp_start + 4]):
            raise _NotEsp  # non-ESP marker: IKE (RFC 3948 §2.2)
        if body == 0:
            raise _NotEsp
        return EspLocation(version, src, dst, off, nh_offset, esp_start, end, True)
    if proto != PROTO_ESP:
        raise _NotEsp
    if fragmented:
        raise _EspProblem("IP fragment of an ESP packet (fragments are not reassembled)")
    if total > n:
        raise _EspProblem(
            f"packet truncated by the capture ({n} of {total} octets kept; raise the snaplen)"
        )
    return EspLocation(version, src, dst, off, nh_offset, esp_start, total, udp)


@dataclass
class _Flow:
    """The state kept for one (key line, source, destination, SPI)."""

    sa: SecurityAssociation
    top: int  # highest 64-bit sequence number decrypted (ESN inference)
    seen: ReplayWindow = field(default_factory=lambda: ReplayWindow(DUPLICATE_WINDOW))


def esn_candidates(seq_low: int, top: int) -> list[int]:
    """The 64-bit sequence numbers with low half ``seq_low`` whose high half is that of
    ``top``, one more or one less, nearest to ``top`` first."""
    th = top >> 32
    cands = [
        ((th + d) << 32) | seq_low for d in (0, 1, -1) if 0 <= th + d <= _MAX_SEQ_HIGH
    ]
    cands.sort(key=lambda c: abs(c - top))
    return cands


class Decryptor:
    """Decrypts ESP packets one at a time; keeps the per-flow state a capture needs."""

    def __init__(self, keys: Sequence[KeyLine]) -> None:
        self.keys = list(keys)
        self._flows: dict[tuple[int, IPAddress, IPAddress, int], _Flow] = {}
        # Lines by SPI, and the SPI-wildcard lines, to keep matching cheap with many keys.
        self._by_spi: dict[int, list[KeyLine]] = {}
        self._any_spi: list[KeyLine] = []
        for kl in self.keys:
            if kl.spi is None:
                self._any_spi.append(kl)
            else:
                self._by_spi.setdefault(kl.spi, []).append(kl)

    def matching(self, src: IPAddress, dst: IPAddress, spi: int) -> list[KeyLine]:
        """The key lines for a packet, in file order."""
        cands = self._by_spi.get(spi, [])
        if self._any_spi:
            cands = sorted(cands + self._any_spi, key=lambda k: k.lineno)
        return [k for k in cands if k.matches(src, dst, spi)]

    def process(self, pkt: memoryview | bytes) -> Decrypted:
        """Decrypt one IP packet (trailing octets after the IP packet are ignored)."""
        try:
            loc = locate_esp(pkt)
        except _EspProblem as exc:
            return Decrypted(Outcome.FAILED, reason=str(exc))
        if loc is None:
            return Decrypted(Outcome.NOT_ESP)
        mv = memoryview(pkt)
        esp_bytes = mv[loc.esp_start : loc.esp_end]
        hdr = esp.spi_seq(esp_bytes)
        if hdr is None:
            return Decrypted(Outcome.FAILED, reason="ESP packet shorter than its 8-octet header")
        spi, seq_low = hdr
        where = f"SPI 0x{spi:08x} {loc.src} -> {loc.dst}" + (" (UDP 4500)" if loc.udp else "")
        lines = self.matching(loc.src, loc.dst, spi)
        if not lines:
            return Decrypted(Outcome.FAILED, reason=f"no key for {where}")
        reasons: list[str] = []
        for kl in lines:
            res = self._try(kl, loc, spi, seq_low, esp_bytes, mv)
            if isinstance(res, Decrypted):
                return res
            reasons.append(res)
        if len(lines) == 1:
            return Decrypted(
                Outcome.FAILED, reason=f"{reasons[0]}: {where} seq {seq_low}, key line"
                f" {lines[0].lineno}"
            )
        tried = ", ".join(str(k.lineno) for k in lines)
        return Decrypted(
            Outcome.FAILED,
            reason=f"{reasons[0]}: {where} seq {seq_low}, with each of key lines {tried}",
        )

    def _flow(self, kl: KeyLine, loc: EspLocation, spi: int) -> _Flow | str:
        fkey = (kl.lineno, loc.src, loc.dst, spi)
        flow = self._flows.get(fkey)
        if flow is None:
            try:
                sa = kl.make_sa(loc.src, loc.dst, spi, replay_window=0)
            except SAError as exc:
                return str(exc)
            flow = _Flow(sa, kl.esn_top if kl.esn else 0)
            self._flows[fkey] = flow
        return flow

    def _try(
        self,
        kl: KeyLine,
        loc: EspLocation,
        spi: int,
        seq_low: int,
        esp_bytes: memoryview,
        pkt: memoryview,
    ) -> Decrypted | str:
        flow = self._flow(kl, loc, spi)
        if isinstance(flow, str):
            return flow
        sa = flow.sa
        cands = esn_candidates(seq_low, flow.top) if sa.esn else [seq_low]
        first: Drop | None = None
        for seq in cands:
            if sa.esn:
                if seq == 0:
                    continue
                # With a window of size 0, the core infers exactly the window's top.
                sa.window.restore(seq, b"")
            res = esp.decapsulate(sa, esp_bytes, 0.0)
            if isinstance(res, Drop):
                if first is None:
                    first = res
                if res is Drop.ICV:
                    continue  # with ESN, the next candidate may verify
                if res is Drop.DUMMY:
                    self._seen(flow, seq)
                    return Decrypted(Outcome.DUMMY)
                break
            nh, payload = res
            dup = self._seen(flow, seq)
            out = self._output(nh, payload, loc, pkt)
            if isinstance(out, str):
                return out
            return Decrypted(Outcome.DECRYPTED, out, duplicate=dup)
        if first is None:
            first = Drop.REPLAY
        return _DROP_TEXT.get(first, first.value)

    @staticmethod
    def _seen(flow: _Flow, seq: int) -> bool:
        """Record ``seq``; True when it was already seen (a repeat)."""
        flow.top = max(flow.top, seq)
        w = flow.seen
        if w.check(seq):
            w.update(seq)
            return False
        return seq <= w.top and w.top - seq < w.size

    @staticmethod
    def _output(nh: int, payload: bytes, loc: EspLocation, pkt: memoryview) -> bytes | str:
        if nh in (PROTO_IPIP, PROTO_IPV6):
            try:
                inner = ippacket.parse(payload)
            except PacketError as exc:
                return f"decrypted tunnel-mode payload is not an IP packet ({exc})"
            if (inner.version == 4) != (nh == PROTO_IPIP):
                return f"next header {nh} does not match the inner IPv{inner.version} packet"
            return payload[: inner.total_len]
        # Transport mode: the outer header with the ESP (and UDP) framing taken out.
        head = bytearray(pkt[: loc.head_end])
        head[loc.nh_offset] = nh
        total = len(head) + len(payload)
        if loc.version == 4:
            if total > 0xFFFF:  # pragma: no cover - cannot grow past the original
                return "rebuilt packet too long"
            struct.pack_into("!H", head, 2, total)
            ihl = (head[0] & 0x0F) * 4
            struct.pack_into("!H", head, 10, 0)
            struct.pack_into("!H", head, 10, ippacket.checksum(head[:ihl]))
        else:
            struct.pack_into("!H", head, 4, total - 40)
        return bytes(head) + payload


@dataclass
class DecryptStats:
    packets: int = 0
    esp: int = 0
    decrypted: int = 0
    dummy: int = 0
    failed: int = 0
    duplicates: int = 0
    written: int = 0

    @property
    def ok(self) -> bool:
        return self.failed == 0


def decrypt_pcap(
    reader: PcapReader,
    dst: BinaryIO,
    keys: Sequence[KeyLine],
    on_failure: Callable[[int, str], None] | None = None,
) -> DecryptStats:
    """Decrypt the records of ``reader`` (``PcapReader(stream)`` checked the file header),
    writing the decrypted packets as a raw-IP pcap to ``dst``, in the input's timestamp
    resolution.

    ``on_failure(record number, reason)`` is called for every ESP packet that could not be
    decrypted, as it happens. Raises PcapError for a malformed record (the packets before it
    are already written)."""
    hdr = reader.header
    writer = PcapWriter(dst, LINKTYPE_RAW, nanosecond=hdr.nanosecond)
    dec = Decryptor(keys)
    stats = DecryptStats()
    for rec in reader:
        stats.packets += 1
        ip = ip_packet(hdr.linktype, rec.data, hdr.fcs_len)
        if ip is None:
            continue
        res = dec.process(ip)
        if res.outcome is Outcome.NOT_ESP:
            continue
        stats.esp += 1
        if res.outcome is Outcome.FAILED:
            stats.failed += 1
            if on_failure is not None:
                on_failure(rec.number, res.reason)
            continue
        if res.outcome is Outcome.DUMMY:
            stats.dummy += 1
            continue
        stats.decrypted += 1
        if res.duplicate:
            stats.duplicates += 1
        writer.write(res.packet, rec.ts_sec, rec.ts_frac)
        stats.written += 1
    return stats

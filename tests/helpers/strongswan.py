"""strongSwan as an independent IPsec peer for tests (root, Debian's strongSwan 5.9.8).

Two unmodified ``charon`` daemons, each in its own network namespace, joined by a veth pair,
negotiate an IKEv2 SA with a pre-shared key and one tunnel-mode CHILD_SA between two inner
addresses. This kernel has no ESP, so charon's ``kernel-libipsec`` plugin does ESP in user
space over a TUN device (``ipsec0``), always in UDP port 4500::

    namespace "a"                                          namespace "b"
    lo 10.201.1.1/32 (inner)                               lo 10.201.2.1/32 (inner)
    sa0 10.200.0.1/24  <------ veth, ESP in UDP 4500 ----> sb0 10.200.0.2/24

What a test needs to know about charon here (``/work/shared/notes/strongswan-netns.sh``):

- charon writes its pid file under /run: each instance gets a private /run, a directory
  bind-mounted over /run inside ``ip netns exec`` (which already gives it its own mount
  namespace). ``STRONGSWAN_CONF`` points at a configuration written for the run, with an
  explicit ``charon.load`` list (Debian does not load kernel-libipsec by default).
- The log is written with ``chd = 4`` and ``flush_line = yes``: at level 4 charon dumps the
  CHILD_SA's keys ("encryption initiator key => 20 bytes @ ...", followed by hex-dump lines),
  which is how a test learns them (:func:`parse_child_sa`). Without ``flush_line`` the file
  lags behind.
- ``swanctl`` takes ``--uri`` after the command: ``swanctl --initiate ... --uri unix://...``.

Nothing of strongSwan is in the repository: configurations are written at test time, and
:class:`Charon` always stops its daemon (SIGTERM, then SIGKILL) when its ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import pytest

from tests.helpers.netns import Namespaces, stop_process, wait_until

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"
PSK = "ipsecct-interop-test-psk-0123456789"
PLUGINS = (
    "random nonce openssl pem pkcs1 x509 pubkey aes sha1 sha2 hmac gmp curve25519 kdf"
    " kernel-libipsec kernel-netlink socket-default vici updown"
)
MAX_UNIX_PATH = 100  # sun_path holds 108 octets; keep a margin


def available() -> bool:
    """Root, and strongSwan's charon and swanctl installed."""
    tools = (shutil.which(CHARON), shutil.which(SWANCTL))
    return os.geteuid() == 0 and None not in tools


def skip_reason() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces; CI runs as root)"
    return f"needs strongSwan ({CHARON} and {SWANCTL}; scripts/install installs them)"


# the mark of every test with a strongSwan peer (it was written out in eight test modules)
needs_strongswan = pytest.mark.skipif(not available(), reason=skip_reason())


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One peer's view of the tunnel."""

    name: str  # "A" or "B": the connection is c<name>, the directory <dir>/<name>
    outer: str
    remote_outer: str
    inner: str
    remote_inner: str
    id: str
    remote_id: str


A = Side("A", "10.200.0.1", "10.200.0.2", "10.201.1.1", "10.201.2.1", "a.test", "b.test")
B = Side("B", "10.200.0.2", "10.200.0.1", "10.201.2.1", "10.201.1.1", "b.test", "a.test")


def strongswan_conf(d: Path, vici: str) -> str:
    return f"""charon {{
  load = {PLUGINS}
  install_routes = yes
  plugins {{
    vici {{
      socket = unix://{vici}
    }}
  }}
  filelog {{
    main {{
      path = {d}/charon.log
      time_format = %T
      time_add_ms = yes
      flush_line = yes
      default = 1
      ike = 2
      chd = 4
      esp = 2
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
}}
"""


def swanctl_psk(
    name: str,
    *,
    local_addrs: str,
    remote_addrs: str,
    local_id: str,
    remote_id: str,
    local_ts: str,
    remote_ts: str,
    psk: str,
    encap: bool = True,
    mobike: bool = False,
    dpd: str | None = None,
    proposals: str | None = None,
    esp_proposals: str | None = None,
    ike_extra: str = "",
    child_extra: str = "",
    more_children: str = "",
) -> str:
    """A swanctl.conf with one PSK connection ``name`` and its CHILD ``net`` (tunnel mode),
    the secret naming both identities. ``ike_extra`` and ``child_extra`` are lines added to the
    connection and to ``net``; ``more_children``, whole CHILD sections after ``net``."""
    ike = [f"encap = {'yes' if encap else 'no'}", f"mobike = {'yes' if mobike else 'no'}"]
    if dpd:
        ike.append(f"dpd_delay = {dpd}")
    if proposals:
        ike.append(f"proposals = {proposals}")
    if ike_extra:
        ike.append(ike_extra)
    child = [f"local_ts = {local_ts}", f"remote_ts = {remote_ts}"]
    if esp_proposals:
        child.append(f"esp_proposals = {esp_proposals}")
    if child_extra:
        child.append(child_extra)
    child.append("mode = tunnel")
    ike_lines = "\n    ".join(ike)
    child_lines = "\n        ".join(child)
    return f"""connections {{
  {name} {{
    version = 2
    local_addrs = {local_addrs}
    remote_addrs = {remote_addrs}
    {ike_lines}
    local {{
      auth = psk
      id = {local_id}
    }}
    remote {{
      auth = psk
      id = {remote_id}
    }}
    children {{
      net {{
        {child_lines}
      }}{more_children}
    }}
  }}
}}
secrets {{
  ike-{name} {{
    id-1 = {local_id}
    id-2 = {remote_id}
    secret = "{psk}"
  }}
}}
"""


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (a configuration holding a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def swanctl_conf(side: Side, esp_proposal: str) -> str:
    return swanctl_psk(
        f"c{side.name}",
        local_addrs=side.outer,
        remote_addrs=side.remote_outer,
        local_id=side.id,
        remote_id=side.remote_id,
        local_ts=f"{side.inner}/32",
        remote_ts=f"{side.remote_inner}/32",
        psk=PSK,
        proposals="aes128gcm16-prfsha256-x25519",
        esp_proposals=esp_proposal,
    )


# -- the CHILD_SA from charon's log ----------------------------------------------------------

# strongSwan's names (as in "selected proposal: ESP:AES_GCM_16_128/NO_EXT_SEQ" and "using
# AES_GCM_16 for encryption") -> (Wireshark esp_sa name, ipsecct name)
ENC_NAMES = {
    "AES_GCM_16": ("AES-GCM with 16 octet ICV [RFC4106]", "aes-gcm-16"),
    "AES_CBC": ("AES-CBC [RFC3602]", "aes-cbc"),
    "CHACHA20_POLY1305": ("CHACHA20-POLY1305 [RFC7634]", "chacha20-poly1305"),
}
INTEG_NAMES = {
    "HMAC_SHA1_96": ("HMAC-SHA-1-96 [RFC2404]", "hmac-sha1-96"),
    "HMAC_SHA2_256_128": ("HMAC-SHA-256-128 [RFC4868]", "hmac-sha2-256-128"),
    "HMAC_SHA2_384_192": ("HMAC-SHA-384-192 [RFC4868]", "hmac-sha2-384-192"),
    "HMAC_SHA2_512_256": ("HMAC-SHA-512-256 [RFC4868]", "hmac-sha2-512-256"),
}

_LINE = re.compile(r"^\S+ (\d+)\[(\w+)\] (.*)$")
_KEY_HEAD = re.compile(r"^(encryption|integrity) (initiator|responder) key => (\d+) bytes @")
_DUMP = re.compile(r"^\s*\d+: (.*)$")
_USING = re.compile(r"^\s*using (\S+) for (encryption|integrity)$")
_ADDING = re.compile(r"^adding (inbound|outbound) ESP SA$")
_SPI = re.compile(r"^\s*SPI 0x([0-9a-fA-F]{8}), src (\S+) dst (\S+)$")
_PROPOSAL = re.compile(r"selected proposal: ESP:(\S+)")
_INITIATOR = re.compile(r"\binitiating IKE_SA \S+ to ")


@dataclass(frozen=True)
class EspSA:
    """One direction of a CHILD_SA as charon installed it."""

    spi: int
    src: str
    dst: str
    enc: str  # strongSwan's name, a key of ENC_NAMES
    enc_key: bytes = field(repr=False)  # AEAD: key || 4-octet salt, as charon hands it over
    integ: str | None  # a key of INTEG_NAMES, None for AEAD
    integ_key: bytes = field(repr=False)

    def esp_sa_line(self) -> str:
        """Wireshark's ``esp_sa`` line for this SA (written here by hand, from Wireshark's
        format, not with ipsecct's own writer)."""
        ikey = "0x" + self.integ_key.hex() if self.integ_key else ""
        fields = [
            "IPv4",
            self.src,
            self.dst,
            f"0x{self.spi:08x}",
            ENC_NAMES[self.enc][0],
            "0x" + self.enc_key.hex(),
            INTEG_NAMES[self.integ][0] if self.integ else "NULL",
            ikey,
        ]
        return ",".join(f'"{f}"' for f in fields)


@dataclass(frozen=True)
class ChildSA:
    """A CHILD_SA seen from one peer: the SA it receives on and the one it sends on."""

    initiator: bool
    proposal: str  # e.g. "AES_GCM_16_128/NO_EXT_SEQ"
    inbound: EspSA
    outbound: EspSA

    @property
    def esn(self) -> bool:
        return "NO_EXT_SEQ" not in self.proposal.split("/")


def parse_child_sa(log: str) -> ChildSA:
    """The (first) CHILD_SA in a charon log written with ``chd = 4``: keys, SPIs, algorithms.

    Keys are hex dumps over several lines; lines are grouped by charon's thread number so that
    another thread's line in between does no harm. The initiator's outbound SA uses the
    "initiator" keys (RFC 7296 §2.17: KEYMAT's first keys protect initiator -> responder)."""
    keys: dict[tuple[str, str], bytes] = {}
    collecting: dict[str, tuple[tuple[str, str], int, bytearray]] = {}
    using: dict[str, str] = {}
    adding: dict[str, str] = {}
    sas: dict[str, tuple[int, str, str]] = {}
    proposal = ""
    initiator = False
    for raw in log.splitlines():
        m = _LINE.match(raw)
        if m is None:
            continue
        thread, group, msg = m.groups()
        if _INITIATOR.search(msg):
            initiator = True
        if group == "CFG" and not proposal:
            pm = _PROPOSAL.search(msg)
            if pm:
                proposal = pm.group(1)
        if group != "CHD":
            continue
        if thread in collecting:
            dm = _DUMP.match(msg)
            if dm is not None:
                which, want, buf = collecting[thread]
                need = min(16, want - len(buf))
                buf += bytes.fromhex("".join(dm.group(1).split()[:need]))
                if len(buf) >= want:
                    keys.setdefault(which, bytes(buf))
                    del collecting[thread]
                continue
            del collecting[thread]  # a truncated dump: ignore it
        km = _KEY_HEAD.match(msg)
        if km is not None:
            collecting[thread] = ((km.group(1), km.group(2)), int(km.group(3)), bytearray())
            continue
        um = _USING.match(msg)
        if um is not None:
            using.setdefault(um.group(2), um.group(1))
            continue
        am = _ADDING.match(msg)
        if am is not None:
            adding[thread] = am.group(1)
            continue
        sm = _SPI.match(msg)
        if sm is not None and thread in adding:
            sas.setdefault(adding.pop(thread), (int(sm.group(1), 16), sm.group(2), sm.group(3)))
    if "inbound" not in sas or "outbound" not in sas:
        raise AssertionError("no CHILD_SA (inbound and outbound ESP SA) in charon's log")
    if "encryption" not in using:
        raise AssertionError("charon's log does not say which encryption the CHILD_SA uses")
    enc = using["encryption"]
    integ = using.get("integrity")
    if enc not in ENC_NAMES or (integ is not None and integ not in INTEG_NAMES):
        raise AssertionError(f"unexpected algorithms in charon's log: {enc} / {integ}")
    mine, theirs = ("initiator", "responder") if initiator else ("responder", "initiator")

    def key(kind: str, who: str) -> bytes:
        if (kind, who) not in keys:
            if kind == "integrity" and integ is None:
                return b""
            raise AssertionError(f"no {kind} {who} key in charon's log (chd = 4?)")
        return keys[(kind, who)]

    def esp_sa(direction: str, who: str) -> EspSA:
        spi, src, dst = sas[direction]
        return EspSA(spi, src, dst, enc, key("encryption", who), integ, key("integrity", who))

    return ChildSA(initiator, proposal, esp_sa("inbound", theirs), esp_sa("outbound", mine))


_COUNTS = re.compile(r"^\s*(in|out)\s+([0-9a-f]{8}),\s+(\d+) bytes,\s+(\d+) packets", re.M)


def sa_packet_counts(list_sas: str) -> dict[int, int]:
    """SPI -> packets, from ``swanctl --list-sas`` output."""
    return {int(m.group(2), 16): int(m.group(4)) for m in _COUNTS.finditer(list_sas)}


# -- running charon ----------------------------------------------------------------------


class Charon:
    """One charon daemon in a namespace; stopped (SIGTERM, then SIGKILL) when the ``with``
    block ends, whatever happened."""

    def __init__(
        self, ns: Namespaces, role: str, side: Side, workdir: Path, esp_proposal: str
    ) -> None:
        self.ns = ns
        self.role = role
        self.side = side
        self.dir = workdir / side.name
        self.esp_proposal = esp_proposal
        self.vici = str(self.dir / "charon.vici")
        if len(self.vici) > MAX_UNIX_PATH:
            raise ValueError(f"{self.vici}: too long for a Unix socket path")
        self.proc: subprocess.Popen[Any] | None = None
        self._out: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"unix://{self.vici}"

    @property
    def logfile(self) -> Path:
        return self.dir / "charon.log"

    def write_config(self) -> None:
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        (self.dir / "strongswan.conf").write_text(strongswan_conf(self.dir, self.vici))
        write_private(self.dir / "swanctl.conf", swanctl_conf(self.side, self.esp_proposal))

    def start(self) -> None:
        self.write_config()
        for stale in (Path(self.vici), self.logfile):  # from an earlier run in this directory
            stale.unlink(missing_ok=True)
        script = (
            f"mount --bind {shlex.quote(str(self.dir / 'run'))} /run && exec {shlex.quote(CHARON)}"
        )
        self._out = open(self.dir / "stdout.log", "wb")  # noqa: SIM115 - closed in stop()
        # ip netns exec -> env -> sh -> charon, each exec'ing the next: the pid is charon's.
        self.proc = self.ns.popen(
            self.role,
            "env",
            f"STRONGSWAN_CONF={self.dir / 'strongswan.conf'}",
            "sh",
            "-c",
            script,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"charon {self.side.name} exited: {self.logtail()}")
            return os.path.exists(self.vici)

        wait_until(up, f"charon {self.side.name}'s vici socket", timeout=30)
        self.swanctl("--load-all", "--file", str(self.dir / "swanctl.conf"))

    def swanctl(self, *args: str, timeout: float = 20) -> str:
        """Run one swanctl command against this daemon; AssertionError if it fails."""
        r = subprocess.run(
            [SWANCTL, *args, "--uri", self.uri], capture_output=True, text=True, timeout=timeout
        )
        if r.returncode != 0:
            raise AssertionError(
                f"swanctl {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                + self.logtail()
            )
        return r.stdout

    def initiate(self) -> None:
        self.swanctl("--initiate", "--ike", f"c{self.side.name}", "--child", "net")

    def list_sas(self) -> str:
        return self.swanctl("--list-sas")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logtail(self, n: int = 4000) -> str:
        return f"--- charon {self.side.name} log (tail) ---\n" + self.log()[-n:]

    def child_sa(self) -> ChildSA:
        return parse_child_sa(self.log())

    def kill(self) -> None:
        """SIGKILL: charon sends no DELETE, so its peer keeps the SAs."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=5)
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- a pair of peers ---------------------------------------------------------------------

VETH = {"a": "sa0", "b": "sb0"}


def build_namespaces(ns: Namespaces) -> None:
    """The veth between roles "a" and "b", the inner addresses on lo, IPv6 off (otherwise
    libipsec logs policy misses for link-local traffic)."""
    for role in ("a", "b"):
        ns.run(role, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
               " echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")  # fmt: skip
    ns.veth("a", VETH["a"], f"{A.outer}/24", "b", VETH["b"], f"{B.outer}/24")
    ns.run("a", "ip", "addr", "add", f"{A.inner}/32", "dev", "lo")
    ns.run("b", "ip", "addr", "add", f"{B.inner}/32", "dev", "lo")


class Capture:
    """tcpdump on one interface of a namespace, writing a pcap file (UDP 4500 only, unless
    ``bpf`` says otherwise)."""

    def __init__(self, ns: Namespaces, role: str, iface: str, path: Path,
                 bpf: str = "udp port 4500") -> None:  # fmt: skip
        self.path = path
        self._err = path.with_suffix(".tcpdump.txt")
        self._errf = open(self._err, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = ns.popen(
            role,
            "tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-s", "0", "-w", str(path),
            bpf,
            stdout=subprocess.DEVNULL,
            stderr=self._errf,
        )  # fmt: skip
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"tcpdump exited: {self._err.read_text(errors='replace')}")
            return b"listening on" in self._err.read_bytes()

        wait_until(listening, "tcpdump to listen", timeout=30)

    def stop(self) -> None:
        """Stop tcpdump (it writes what it has); stopping twice does no harm."""
        stop_process(self.proc, signal.SIGINT)
        if not self._errf.closed:
            self._errf.close()


@dataclass
class Pair:
    """Two charons in namespaces "a" and "b" with one CHILD_SA between them, and the capture
    that runs from before the IKE exchanges (if one was asked for)."""

    ns: Namespaces
    a: Charon
    b: Charon
    capture: Capture | None = None


PING_WAIT = 5  # seconds the replies may take after the last echo request (a loaded machine)

# ``ping`` in the namespace: COUNT echo requests (identifier: the pid, sequence numbers 1 to
# COUNT, 56 octets of data as iputils sends) GAP seconds apart, then up to WAIT seconds more
# for the replies; prints {"sent": requests sent, "lost": those not answered}. COUNT 0: until
# a SIGINT (it prints "ready" once it takes one), then the same wait. SRC, if given: the
# source address. A request the kernel refuses to send (no route) is not answered. IPv6:
# ICMPv6, whose checksum the kernel writes.
PINGER = r"""
import ipaddress, json, os, select, signal, socket, struct, sys, time
dst, count, gap, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
peer = ipaddress.ip_address(dst)
v6 = peer.version == 6
s = (socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) if v6
     else socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
if len(sys.argv) > 5:
    s.bind((sys.argv[5], 0))
request, reply = (128, 129) if v6 else (8, 0)
ident = os.getpid() & 0xFFFF
def checksum(b):
    n = sum(struct.unpack(f"!{len(b) // 2}H", b))
    n = (n >> 16) + (n & 0xFFFF)
    return ~(n + (n >> 16)) & 0xFFFF
def echo(seq):
    data = struct.pack("!QQ", time.time_ns() // 10**9, time.time_ns() // 1000 % 10**6)
    data += bytes(range(0x10, 0x10 + 40))
    head = struct.pack("!BBHHH", request, 0, 0, ident, seq)
    c = 0 if v6 else checksum(head + data)
    return struct.pack("!BBHHH", request, 0, c, ident, seq) + data
end = None  # set once the last request is sent: when the wait for the replies ends
def stop(*_):
    global end
    if end is None:
        end = time.monotonic() + wait
if count == 0:
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
start = time.monotonic()
sent, answered = 0, set()
while True:
    now = time.monotonic()
    while end is None and now >= start + gap * sent:
        sent += 1
        try:
            s.sendto(echo(sent), (dst, 0))
        except OSError:
            pass
        if sent == count:
            end = start + gap * (count - 1) + wait
    if end is not None and (now >= end or len(answered) == sent):
        break
    # (select resumes after a SIGINT: while requests go out it waits at most a gap)
    timeout = max(0.001, (start + gap * sent if end is None else end) - now)
    if not select.select([s], [], [], timeout)[0]:
        continue
    packet, src = s.recvfrom(65535)
    at = 0 if v6 else (packet[0] & 15) * 4
    if ipaddress.ip_address(src[0]) == peer and len(packet) >= at + 8:
        kind, _, _, i, seq = struct.unpack_from("!BBHHH", packet, at)
        if kind == reply and i == ident and 1 <= seq <= sent:
            answered.add(seq)
print(json.dumps({"sent": sent, "lost": [i for i in range(1, sent + 1) if i not in answered]}))
"""


@dataclass
class PingResult:
    sent: int  # echo requests
    lost: list[int]  # their sequence numbers that got no reply (each waited for)

    @property
    def answered(self) -> int:
        return self.sent - len(self.lost)


def _ping_result(role: str, proc: str, out: str, err: str) -> PingResult:
    try:
        r = json.loads(out)
        return PingResult(int(r["sent"]), [int(i) for i in r["lost"]])
    except (ValueError, TypeError, KeyError):
        raise AssertionError(f"the pinger in {role} failed ({proc}): {out}{err}") from None


def ping(
    ns: Namespaces, role: str, dst: str, count: int, gap: float = 0.2, src: str | None = None
) -> int:
    """Ping ``dst`` (an address) from a namespace ``count`` times, ``gap`` s apart (from
    ``src`` if given); returns how many of those echo requests were answered, each within
    PING_WAIT s after the last was sent.

    Not iputils' ``ping -c N -W 5`` (20221126): it waits ``-W`` only while nothing has come
    back; once a reply has, it exits max(2 x the longest round trip so far, the interval)
    after sending its last request and counts a reply still on its way as lost. A first
    reply 0.7 s late, the others back at once, read "3 transmitted, 2 received" (a
    responder in a namespace that delayed its first reply; 0.5 s late was still counted):
    what a gateway busy for a moment on a loaded machine looks like, though it dropped
    nothing. Its ``-w`` waits for every reply but sends more requests until N replies are
    in, one of which would stand in for a lost one; one ``ping -c 1`` per request numbers
    every request 1. The packets on the wire are ping's: sequence numbers 1 to ``count``
    under one identifier, 56 octets of data."""
    r = ns.run(role, sys.executable, "-c", PINGER, dst, str(count), str(gap), str(PING_WAIT),
               *([src] if src else []), check=False, timeout=60 + gap * count)  # fmt: skip
    res = _ping_result(role, f"exit {r.returncode}", r.stdout, r.stderr)
    if r.returncode != 0 or res.sent != count:
        raise AssertionError(f"the pinger in {role} failed: {r.stdout}{r.stderr}")
    return res.answered


class Pinger:
    """:func:`ping` in the background, for a stream that runs while something else happens:
    echo requests from ``role`` to ``dst`` every ``gap`` s (from ``src`` if given), ``count``
    of them or, with 0, until :meth:`stop`. Every reply is waited for, up to PING_WAIT s
    after the last request (not iputils' ping stopped by SIGINT, which counts what is still
    on its way as lost, nor its ``-c`` with its early exit: see :func:`ping`)."""

    def __init__(
        self,
        ns: Namespaces,
        role: str,
        dst: str,
        *,
        gap: float,
        count: int = 0,
        src: str | None = None,
    ) -> None:
        self.role, self.count, self.gap = role, count, gap
        self.proc = ns.popen(role, sys.executable, "-c", PINGER, dst, str(count), str(gap),
                             str(PING_WAIT), *([src] if src else []), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
        assert self.proc.stdout is not None
        if count == 0:  # it takes a SIGINT from now on
            line = self.proc.stdout.readline()
            if line.strip() != b"ready":
                out, err = self.proc.communicate(timeout=30)
                raise AssertionError(f"the pinger in {role} failed: {line!r}{out!r}{err!r}")

    def stop(self) -> PingResult:
        """Stop sending (with a ``count``: wait until all are sent), wait for the replies and
        return what came back."""
        if self.count == 0 and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        timeout = PING_WAIT + 30 + (self.gap * self.count)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            msg = f"the pinger in {self.role} did not end in {timeout:g} s"
            raise AssertionError(msg) from None
        return _ping_result(self.role, f"exit {self.proc.returncode}", out.decode(),
                            err.decode())  # fmt: skip

    def kill(self) -> None:
        stop_process(self.proc)


def ping_once_up(ns: Namespaces, role: str, dst: str, count: int, timeout: float = 20) -> int:
    """Right after a tunnel came up: wait until one ping passes (the first packets through a
    new tunnel meet neighbour resolution and routes still being installed, and on a loaded
    machine one of three was lost once, before anything the test is about), then ping
    ``dst`` ``count`` times; returns how many replies came back."""
    wait_until(lambda: ping(ns, role, dst, 1) == 1, f"a first ping from {role} to {dst}",
               timeout=timeout)  # fmt: skip
    return ping(ns, role, dst, count)


def wait_log(charon: Charon, pattern: str, timeout: float = 30) -> None:
    rx = re.compile(pattern)
    wait_until(lambda: rx.search(charon.log()) is not None, f"{pattern!r} in charon's log", timeout)


@contextlib.contextmanager
def start_pair(
    ns: Namespaces, workdir: Path, esp_proposal: str, capture: tuple[str, Path] | None = None
) -> Iterator[Pair]:
    """Build the namespaces, start both charons and initiate the CHILD_SA from A (both
    charons stop when the ``with`` block ends). ``capture`` = (role, pcap file): tcpdump on
    that namespace's veth from before the IKE exchanges on; the caller stops it."""
    build_namespaces(ns)
    with (
        Charon(ns, "a", A, workdir, esp_proposal) as a,
        Charon(ns, "b", B, workdir, esp_proposal) as b,
    ):
        a.start()
        b.start()
        cap = Capture(ns, capture[0], VETH[capture[0]], capture[1]) if capture else None
        try:
            a.initiate()
            # the responder installs its SAs before answering, so its log already has them
            wait_log(b, r"CHILD_SA net\{\d+\} established")
            yield Pair(ns, a, b, cap)
        finally:
            if cap is not None:
                cap.stop()

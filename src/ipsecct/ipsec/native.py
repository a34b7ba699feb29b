"""The native data path (issue 11): the glue between Python SAs and ``ipsecct.ipsec._esp``.

The C extension does the per-packet work of established SAs; the protocol, every decision
and every rare case stay in Python (:mod:`ipsecct.ipsec.engine`). Ownership of an SA's hot
state (outbound sequence number, counters, replay window) is explicit:

* :func:`push` copies the Python state into the C object and makes it *active*: from then on
  C owns it and the Python fields may lag behind;
* :func:`reclaim` copies the C state back exactly and deactivates it ("freezes" it in C): the
  Python fields are the truth again and C hands every packet of that SA up to Python. The
  Python data path (:func:`ipsecct.ipsec.esp.encapsulate` / ``decapsulate``) reclaims before
  it touches an SA, a context transfer freezes a tunnel before its snapshot;
* :func:`sync` copies the C state into the Python fields and leaves C active (``sa show``,
  fail-over replication, the engine's timer).

C never sends above the SA's *ceiling*: the sequence number before the 7/8 mark (the
near-limit event is Python's), the counter's limit after it, and the SA's durable
``seq_ceiling`` when it has one. It hands up, unchanged, the packet that would reach a
lifetime (packets, bytes, or time: it gets the deadline), so every event fires in Python.

What C covers: ESP tunnel mode with AES-GCM-16 (128, 192, 256) or ChaCha20-Poly1305, IPv4 and
IPv6 inner and outer, ESN, replay windows up to 65536, inbound selectors (up to 64 address
ranges a side). Everything else stays on the Python path: AH, transport mode, AES-CBC and NULL
with HMAC, SAs with a learnt PMTU that ages (``pmtu_expires``), SPIs shared with another SA or
a shadow SA, tunnels that are held or moved (but for a moved tunnel's tail, whose numbers C
sends up to ``tail_end``: :meth:`ipsecct.ipsec.engine.Engine.send_tails`).

``IPSECCT_PURE_PYTHON=1`` in the environment, or a missing extension (no compiler at install
time), selects the pure-Python path, which stays the reference.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

from .algorithms import EncAlg, IntegAlg
from .sad import (
    MAX_SEQ_32,
    MAX_SEQ_64,
    PACKETS,
    TOUCHED,
    TOUCHED_OVERFLOW,
    Direction,
    Mode,
    Protocol,
    SecurityAssociation,
    install_read_through,
)

_esp: Any
try:
    if os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0"):
        raise ImportError("IPSECCT_PURE_PYTHON is set")
    from . import _esp  # type: ignore[attr-defined,no-redef]
except ImportError:
    _esp = None

AVAILABLE = _esp is not None
if AVAILABLE:
    install_read_through(_esp)
NO_LIMIT = (1 << 64) - 1
_ALG = {EncAlg.AES_GCM_16: 0, EncAlg.CHACHA20_POLY1305: 1}
MAX_RANGES = 64


_c_activity = getattr(_esp, "activity", None)
_unknown = [0]


def activity() -> int:
    """Packets counted on every SA of this process so far (the Python path's and C's): when
    it has not moved, no SA's counters have. (An extension built before it counted: a new
    value at every call, as if every SA were busy.)"""
    n = PACKETS[0]
    if _esp is None:
        return n
    if _c_activity is None:
        _unknown[0] += 1
        return -_unknown[0]
    return n + int(_c_activity())


_c_take_touched = getattr(_esp, "take_touched", None)
# An extension built before the touched list: False (then only activity() tells).
TRACKS_TOUCHED = _esp is None or _c_take_touched is not None


def take_touched() -> tuple[list[SecurityAssociation], bool]:
    """The SAs that counted a packet since the last call (the Python path's and C's, an SA
    possibly twice), and whether some SA counted without being listed (a list was full, or
    the extension cannot tell: then take every SA as touched). Empties both lists."""
    overflowed = TOUCHED_OVERFLOW[0]
    TOUCHED_OVERFLOW[0] = False
    taken = set(TOUCHED)
    TOUCHED.difference_update(taken)  # (one added meanwhile stays for the next call)
    sas = list(taken)
    if _esp is not None:
        if _c_take_touched is None:
            return sas, True
        owners, c_overflowed = _c_take_touched()
        sas.extend(owners)
        overflowed = overflowed or c_overflowed
    return sas, overflowed


def wanted(native: bool | None) -> bool:
    """Use the native path? ``None``: when it is available (built, not disabled)."""
    if native is None:
        return AVAILABLE
    if native and not AVAILABLE:
        raise RuntimeError(
            "the native data path is not available (not built, or IPSECCT_PURE_PYTHON is set)"
        )
    return native


def warm() -> None:
    """The C side's one-time cost (its OpenSSL's first cipher context: about 0.7 ms of CPU)
    paid now rather than by the first SA pushed to it, which at a transfer's target is the
    activation's (:func:`ipsecct.ipsec.transforms.warm_library`). A throwaway all-zero key."""
    if _esp is not None:
        _esp.SA(0, True, _ALG[EncAlg.AES_GCM_16], bytes(20), False, 0, None)


def make_table() -> Any:
    assert _esp is not None
    return _esp.Table()


def supported(sa: SecurityAssociation) -> bool:
    """Can the C side carry this SA at all (transform, mode, selectors)?"""
    if not (
        AVAILABLE
        and sa.protocol is Protocol.ESP
        and sa.mode is Mode.TUNNEL
        and sa.enc in _ALG
        and sa.integ is IntegAlg.NONE
    ):
        return False
    sel = sa.selectors
    return sel is None or (len(sel.local) <= MAX_RANGES and len(sel.remote) <= MAX_RANGES)


def ceiling(sa: SecurityAssociation, seq_ceiling: int | None = None) -> int:
    """The highest sequence number C may send on outbound ``sa``: below the 7/8 mark (the
    near-limit event is Python's), then up to the counter's end, and never above
    ``seq_ceiling`` (the tunnel's fencing ceiling, :attr:`ipsecct.ipsec.engine.Tunnel.seq_ceiling`:
    the highest number it may send) nor the SA's own durable ``seq_ceiling``; below its
    ``seq_low_water`` until the next block is asked for."""
    limit = MAX_SEQ_64 if sa.esn else MAX_SEQ_32
    near = limit - (limit >> 3)
    top = near - 1 if sa.seq < near else limit
    if seq_ceiling is not None:
        top = min(top, seq_ceiling)
    # Durable reservations (ipsec/sequence.py): never above what is on stable storage, and
    # the packet at the low-water mark goes up to Python, which asks for the next block (once
    # asked, C may run on to the ceiling while the write is under way).
    top = min(top, sa.seq_ceiling)
    if not sa.seq_reserve_pending:
        top = min(top, sa.seq_low_water - 1)
    return max(top, 0)


def _limits(sa: SecurityAssociation) -> tuple[int, int, float]:
    packets = NO_LIMIT
    nbytes = NO_LIMIT
    deadline = 1e300
    for lt, live in ((sa.soft, not sa.soft_fired), (sa.hard, not sa.dead)):
        if not live:
            continue
        if lt.packets is not None:
            packets = min(packets, lt.packets)
        if lt.bytes is not None:
            nbytes = min(nbytes, lt.bytes)
        if lt.seconds is not None:
            deadline = min(deadline, sa.created + lt.seconds)
    return packets, nbytes, deadline


def _blocks_of(sa: SecurityAssociation) -> bytes:
    blocks = sa.window._blocks
    return struct.pack(f"<{len(blocks)}Q", *blocks)


def attach(sa: SecurityAssociation) -> Any:
    """The SA's C object, made on first use (keyed once), or None if C cannot carry it."""
    c = sa.native
    if c is None and supported(sa):
        assert _esp is not None
        c = _esp.SA(
            sa.spi,
            sa.direction is Direction.OUTBOUND,
            _ALG[sa.enc],
            sa.enc_key,
            sa.esn,
            0 if sa.direction is Direction.OUTBOUND else sa.replay_window,
            sa,
        )
        sa.native = c
    return c


def push(
    sa: SecurityAssociation,
    *,
    mtu: int | None = None,
    seq_ceiling: int | None = None,
    send_until: float = math.inf,
) -> Any:
    """Hand the SA's state to C and make it active; returns the C object (None: not
    supported, or dead). Outbound SAs take ``mtu`` (the path MTU the engine uses), the
    tunnel's ``seq_ceiling`` and the engine's ``send_until`` (fencing: C hands up every
    packet at or after it)."""
    if sa.dead:
        return None
    c = attach(sa)
    if c is None:
        return None
    outbound = sa.direction is Direction.OUTBOUND
    if not c.active:
        top = 0 if outbound else sa.window.top
        c.load(
            sa.seq if outbound else 0,
            sa.counters.packets,
            sa.counters.bytes,
            top,
            b"" if outbound else _blocks_of(sa),
        )
    packets, nbytes, deadline = _limits(sa)
    if outbound:
        overhead = (20 if sa.dst.version == 4 else 40) + (8 if sa.encap is not None else 0)
        deadline = min(deadline, send_until)
        c.configure(
            ceiling(sa, seq_ceiling), packets, nbytes, deadline, mtu or sa.path_mtu, overhead
        )
        if sa.encap is not None:
            c.set_dest(sa.dst.packed, sa.encap.dport)
        else:
            c.set_dest(b"", 0)
    else:
        c.configure(0, packets, nbytes, deadline, 65535, 0)
        sel = sa.selectors
        if sel is None:
            c.set_selectors(None)
        else:
            c.set_selectors(
                sel.protocol,
                sel.local_ports.is_any and sel.remote_ports.is_any,
                sel.local_ports.first,
                sel.local_ports.last,
                sel.remote_ports.first,
                sel.remote_ports.last,
                [(r.version, r.first.packed, r.last.packed) for r in sel.local],
                [(r.version, r.first.packed, r.last.packed) for r in sel.remote],
            )
    c.active = True
    return c


def _pull(sa: SecurityAssociation, c: Any) -> None:
    """Copy C's state into the Python fields (``c`` already inactive: the plain fields)."""
    seq, packets, nbytes, top, blocks = c.export()
    if sa.direction is Direction.OUTBOUND:
        sa.seq = seq
    else:
        w = sa._window
        w.top = top
        w._blocks = list(struct.unpack(f"<{len(blocks) // 8}Q", blocks))
    cnt = sa.counters
    cnt.packets = packets
    cnt.bytes = nbytes


def sync(sa: SecurityAssociation) -> None:
    """Copy the exact C state into the Python fields; C stays active. (Reading ``sa.seq``,
    ``sa.counters`` or ``sa.window`` does this for the field read.)"""
    c = sa.native
    if c is not None and c.active:
        c.active = False
        try:
            _pull(sa, c)
        finally:
            c.active = True


def reclaim(sa: SecurityAssociation) -> None:
    """Freeze the SA in C and take its exact state back: Python owns it again."""
    c = sa.native
    if c is not None and c.active:
        c.active = False
        _pull(sa, c)


def relay_object(
    addr: bytes, port: int, until: float, rate: float, burst: float, cap: Any = None
) -> Any:
    """A ``_esp.Relay`` (ipsecct.ipsec.relay): where the forwarding thread sends a moved
    tunnel's inbound ESP, unchanged, and its bounds (``cap``: an ``_esp.RelayCap`` it also
    takes from, or None)."""
    return _esp.Relay(addr, port, until, rate, burst, cap)


def relay_cap_object(rate: float, burst: float) -> Any:
    """A ``_esp.RelayCap``: the overall cap of the relays made with it."""
    return _esp.RelayCap(rate, burst)

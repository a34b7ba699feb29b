"""A moved tunnel's inbound ESP relayed, unchanged, to its new gateway (issue 11, fwdnative).

After a transfer's cut the source holds no key of the tunnel; the MN's ESP that still reaches it
(sent before the MN learnt the new address) goes on to the target's outer (NAT-T) address as
the same datagram, from the source's outer socket: the target authenticates it with the SA's
key and replay window as a packet from the MN (nothing there learns an address from ESP: it
sends to the SA's own destination). In the native path the forwarding thread does it
(``_esp.Relay`` in ``Table.relay``), without the event loop; :class:`RelayLimit` is the
Python reference of its :meth:`take`, for the pure-Python path and the differential tests.

Bounds: only the inbound SPIs of tunnels moved here, until the tunnel's forwarding time ends
(``Tunnel.forward_until``), at most ``rate`` datagrams a second with a burst of ``burst`` per
tunnel (a token bucket; what is over it is dropped and counted, ``relay_refused``), and at most
``RATE_ALL`` a second (burst ``BURST_ALL``) over all the gateway's relays together
(:class:`RelayCap`, ``[transfer] relay_max_rate``; over it: dropped, ``relay_capped``): a
bulk transfer of 10,000 tunnels, then a flood under all their SPIs, relays no more than that
to the target, not 10,000 times one tunnel's rate.
"""

from __future__ import annotations

import math
from typing import Any

from . import native as native_mod
from .ippacket import IPAddress

RATE = 20_000.0  # datagrams a second a moved tunnel may relay (a 1400 B stream: 220 Mbit/s)
BURST = 2_000.0
# All relays of a gateway together (RelayCap): about what one gateway's forwarding thread
# carries (bench tunnel: 130,000-330,000 packets/s), so the relay sends the target no more
# than the source could carry for the tunnels before they moved; burst a tenth of a second.
RATE_ALL = 100_000.0
BURST_ALL = 10_000.0


def _refill(b: RelayLimit | RelayCap, now: float) -> None:
    if now > b.last:
        b.tokens += (now - b.last) * b.rate
        if b.tokens > b.burst:
            b.tokens = b.burst
        b.last = now


class RelayCap:
    """The overall cap of a gateway's relays (the Python reference of ``_esp.RelayCap``): one
    token bucket each relay made with it also takes from; ``refused`` counts what it
    dropped."""

    __slots__ = ("burst", "last", "rate", "refused", "tokens")

    def __init__(self, rate: float = RATE_ALL, burst: float = BURST_ALL) -> None:
        if not 0 < rate < math.inf or not 1 <= burst < math.inf:
            raise ValueError("relay cap: a finite rate > 0, burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = 0.0
        self.refused = 0


def cap_burst(rate: float) -> float:
    """The overall cap's burst for a configured rate: a tenth of a second of it, never less
    than one tunnel's burst (a single tunnel's burst always fits)."""
    return max(rate / 10.0, BURST)


class RelayLimit:
    """The token bucket and deadline of one relay (the Python reference of ``_esp.Relay``,
    float for float)."""

    __slots__ = ("burst", "cap", "last", "rate", "refused", "relayed", "tokens", "until")

    def __init__(
        self, until: float, rate: float = RATE, burst: float = BURST, cap: RelayCap | None = None
    ) -> None:
        if not rate > 0 or not burst >= 1 or math.isnan(until):
            raise ValueError("relay: rate > 0, burst >= 1, a deadline")
        self.cap = cap
        self.until = until
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = 0.0
        self.relayed = 0
        self.refused = 0

    def take(self, now: float) -> bool | None:
        """True: relay it; False: over its rate (counted ``refused``) or over the cap
        (counted in the cap); None: at or past the end. A datagram one bucket drops takes
        nothing from the other."""
        if not now < self.until:
            return None
        cap = self.cap
        _refill(self, now)
        if cap is not None:
            _refill(cap, now)
        if self.tokens < 1.0:
            self.refused += 1
            return False
        if cap is not None and cap.tokens < 1.0:
            cap.refused += 1
            return False
        self.tokens -= 1.0
        if cap is not None:
            cap.tokens -= 1.0
        self.relayed += 1
        return True


def make(
    host: IPAddress, port: int, until: float, *, native: bool,
    rate: float = RATE, burst: float = BURST, cap: Any = None,
) -> Any:  # fmt: skip
    """The relay object: ``_esp.Relay`` for an engine with a C table, else a RelayLimit;
    ``cap``: the overall cap it also takes from (of the same kind: :func:`make_cap`)."""
    if native:
        return native_mod.relay_object(host.packed, port, until, rate, burst, cap)
    return RelayLimit(until, rate, burst, cap)


def make_cap(rate: float = RATE_ALL, burst: float = BURST_ALL, *, native: bool) -> Any:
    """The overall cap: ``_esp.RelayCap`` for relays in C, else a RelayCap."""
    if native:
        return native_mod.relay_cap_object(rate, burst)
    return RelayCap(rate, burst)

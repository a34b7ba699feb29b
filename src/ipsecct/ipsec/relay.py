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
tunnel (a token bucket; what is over it is dropped and counted, ``relay_refused``).
"""

from __future__ import annotations

import math
from typing import Any

from . import native as native_mod
from .ippacket import IPAddress

RATE = 20_000.0  # datagrams a second a moved tunnel may relay (a 1400 B stream: 220 Mbit/s)
BURST = 2_000.0


class RelayLimit:
    """The token bucket and deadline of one relay (the Python reference of ``_esp.Relay``,
    float for float)."""

    __slots__ = ("burst", "last", "rate", "refused", "relayed", "tokens", "until")

    def __init__(self, until: float, rate: float = RATE, burst: float = BURST) -> None:
        if not rate > 0 or not burst >= 1 or math.isnan(until):
            raise ValueError("relay: rate > 0, burst >= 1, a deadline")
        self.until = until
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = 0.0
        self.relayed = 0
        self.refused = 0

    def take(self, now: float) -> bool | None:
        """True: relay it; False: over the rate (counted); None: at or past the end."""
        if not now < self.until:
            return None
        if now > self.last:
            self.tokens += (now - self.last) * self.rate
            if self.tokens > self.burst:
                self.tokens = self.burst
            self.last = now
        if self.tokens < 1.0:
            self.refused += 1
            return False
        self.tokens -= 1.0
        self.relayed += 1
        return True


def make(
    host: IPAddress, port: int, until: float, *, native: bool,
    rate: float = RATE, burst: float = BURST,
) -> Any:  # fmt: skip
    """The relay object: ``_esp.Relay`` for an engine with a C table, else a RelayLimit."""
    if native:
        return native_mod.relay_object(host.packed, port, until, rate, burst)
    return RelayLimit(until, rate, burst)

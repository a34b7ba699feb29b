"""TUN devices (Linux ``/dev/net/tun``) as the inner side of a gateway or node.

Thin adapter: opens the device with ``TUNSETIFF`` (IFF_TUN | IFF_NO_PI) and configures addresses
and routes with iproute2's ``ip``. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess

from ..errors import TunError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> tuple[int, str]:
    """Open (creating if needed) the TUN device ``name``; returns (fd, actual name)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise TunError(f"cannot create TUN device {name}: {exc.strerror}") from None
    actual = res[:16].rstrip(b"\0").decode()
    return fd, actual


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raise TunError with ip's own message on failure."""
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TunError(f"cannot run ip {' '.join(args)}: {exc}") from None
    if r.returncode != 0:
        raise TunError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def configure(name: str, addresses: list[str], mtu: int, routes: list[str]) -> None:
    ip("link", "set", "dev", name, "mtu", str(mtu))
    # No IPv6 link-local address: without one the kernel sends no router solicitations or
    # MLD reports into the tunnel, packets that no policy covers (configured IPv6 addresses
    # still work). A kernel without IPv6 refuses the setting: nothing to prevent then.
    with contextlib.suppress(TunError):
        ip("link", "set", "dev", name, "addrgenmode", "none")
    for a in addresses:
        ip("addr", "replace", a, "dev", name)
    ip("link", "set", "dev", name, "up")
    for r in routes:
        ip("route", "replace", r, "dev", name)

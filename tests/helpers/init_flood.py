"""A flood of half-open IKE SAs from many real loopback addresses (``InitFlood``), for
tests/test_hostile_inputs and benchmarks/ike_junk."""

from __future__ import annotations

import ipaddress
import select
import socket
import threading
import time
from typing import Any

from ipsecct.errors import IpsecctError


class InitFlood:
    """IKE_SA_INIT requests from many real addresses on loopback (127.9.N.1, each in a /24
    of its own), each source answering the gateway's COOKIEs as a real attacker that owns
    its addresses does, and never going on to IKE_AUTH: half-open IKE SAs."""

    def __init__(self, conn: Any, gw: tuple[str, int], sources: int) -> None:
        self.conn, self.gw = conn, gw
        self.socks = []
        for i in range(sources):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.9.{i}.1", 0))
            s.setblocking(False)
            self.socks.append(s)
        self.sent = 0
        self.requests: dict[bytes, bytes] = {}
        self.stop = threading.Event()

    def init(self, s: socket.socket) -> bytes:
        from ipsecct.ikev2.engine import IkeEngine
        from ipsecct.ikev2.ikesa import Address

        host, port = s.getsockname()
        eng = IkeEngine([self.conn])
        out = eng.initiate(self.conn, Address(ipaddress.ip_address(host), port),
                           Address(ipaddress.ip_address(self.gw[0]), self.gw[1]), 0.0)  # fmt: skip
        data: bytes = out[0].data  # type: ignore[union-attr]
        self.requests[data[:8]] = data  # by SPIi: a cookie is for that very request
        return data

    def round(self, per_source: int) -> None:
        from ipsecct.ikev2 import message as M

        for s in self.socks:
            for _ in range(per_source):
                s.sendto(b"\0\0\0\0" + self.init(s), self.gw)
                self.sent += 1
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # answer the cookies
            r, _, _ = select.select(self.socks, [], [], 0.05)
            for s in r:
                try:
                    data = s.recv(65535)[4:]
                    _, ps = M.decode(data)
                except (OSError, IpsecctError):
                    continue
                first = ps[0] if ps else None
                req = self.requests.pop(data[:8], None)
                if (req is not None and isinstance(first, M.NotifyPayload)
                        and first.type == M.Notify.COOKIE):  # fmt: skip
                    h, rest = M.decode(req)  # the same request again, the cookie first (§2.6)
                    s.sendto(b"\0\0\0\0" + M.encode_plain(h, [first, *rest]), self.gw)

    def keep_full(self) -> None:
        while not self.stop.wait(0.5):
            self.round(1)

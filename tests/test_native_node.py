"""Two in-process gateways (ipsecct.gateway.node.Node) on loopback: the native batch path
(recvmmsg / sendmmsg in C) against the Python path, with real sockets.

Both paths must deliver the same packets, in both directions, with the same counters; on
the native path the Python side must see only the first packet of each flow and SA.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from ipsecct.gateway.config import from_dict
from ipsecct.gateway.node import Node
from ipsecct.ipsec import native
from ipsecct.ipsec.ippacket import build_udp

KEY_AB = "11111111111111111111111111111111feed0001"
KEY_BA = "22222222222222222222222222222222feed0002"
N = 400


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg(tmp: Path, name: str, outer: int, listen: int, peer: int, far: int, inverse: bool,
         enc: str) -> Any:
    keys = tmp / f"{name}.keys"
    out_k, in_k = (KEY_BA, KEY_AB) if inverse else (KEY_AB, KEY_BA)
    if enc == "chacha20-poly1305":
        out_k, in_k = out_k + "00" * 16, in_k + "00" * 16
    keys.write_text(f'out_enc = "{out_k}"\nin_enc = "{in_k}"\n')
    os.chmod(keys, 0o600)
    local, remote = ("10.2.0.0/24", "10.1.0.0/24") if inverse else ("10.1.0.0/24", "10.2.0.0/24")
    spi_out, spi_in = (0x2001, 0x1001) if inverse else (0x1001, 0x2001)
    return from_dict(
        {
            "name": name,
            "outer": {"address": "127.0.0.1", "port": outer},
            "inner": {"kind": "udp", "listen": f"127.0.0.1:{listen}", "peer": f"127.0.0.1:{peer}"},
            "tunnel": [
                {
                    "name": f"{name}-t",
                    "local_ts": local,
                    "remote_ts": remote,
                    "peer": f"127.0.0.1:{far}",
                    "enc": enc,
                    "esn": True,
                    "replay_window": 1024,
                    "spi_out": spi_out,
                    "spi_in": spi_in,
                    "keys": str(keys),
                }
            ],
        },
        str(tmp / f"{name}.toml"),
    )


async def _exchange(tmp: Path, use_native: bool, enc: str) -> dict[str, Any]:
    pa, pb, ia, ib, aa, ab = (_port() for _ in range(6))
    a = Node(_cfg(tmp, "a", pa, ia, aa, pb, False, enc))
    b = Node(_cfg(tmp, "b", pb, ib, ab, pa, True, enc))
    if not use_native:
        a.engine.native = b.engine.native = None
    assert (a.engine.native is not None) is use_native
    apps = {}
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    loop = asyncio.get_running_loop()
    for name, port in (("a", aa), ("b", ab)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", port))
        s.setblocking(False)
        apps[name] = s

        def readable(s: socket.socket = s, name: str = name) -> None:
            while True:
                try:
                    got[name].append(s.recv(65535))
                except BlockingIOError:
                    return

        loop.add_reader(s.fileno(), readable)
    python_calls = {"a": 0, "b": 0}
    await a.start()
    await b.start()
    try:
        for node, name in ((a, "a"), (b, "b")):
            orig = node.from_inner

            def counting(packet: bytes, orig: Any = orig, name: str = name) -> None:
                python_calls[name] += 1
                orig(packet)

            node.from_inner = counting  # type: ignore[method-assign]
        sent_ab, sent_ba = [], []
        for i in range(N):
            up = build_udp(
                *(__import__("ipaddress").ip_address(x) for x in ("10.1.0.2", "10.2.0.1")),
                # half of them of one size (full batches), half of changing sizes
                5000 + i % 4, 7000, bytes([i % 256]) * (100 if i < N // 2 else i % 1300),
            )
            down = build_udp(
                *(__import__("ipaddress").ip_address(x) for x in ("10.2.0.1", "10.1.0.2")),
                7000, 5000 + i % 4, bytes([i % 256]) * (i % 700),
            )
            apps["a"].sendto(up, ("127.0.0.1", ia))
            apps["b"].sendto(down, ("127.0.0.1", ib))
            sent_ab.append(up)
            sent_ba.append(down)
            if i % 16 == 15:
                await asyncio.sleep(0.002)
        for _ in range(500):
            if len(got["b"]) >= N and len(got["a"]) >= N:
                break
            await asyncio.sleep(0.01)
        a.engine.sync_native()
        b.engine.sync_native()
        t = a.engine.tunnels()[0]
        return {
            "delivered_ab": sorted(got["b"]) == sorted(sent_ab),
            "delivered_ba": sorted(got["a"]) == sorted(sent_ba),
            "stats": (a.engine.stats.as_dict(), b.engine.stats.as_dict()),
            "seq": (t.outbound.seq, t.inbound.window.top if t.inbound else None),
            "python_calls": python_calls,
        }
    finally:
        for s in apps.values():
            loop.remove_reader(s.fileno())
            s.close()
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("enc", ["aes-gcm-16", "chacha20-poly1305"])
def test_native_batch_path_delivers_like_the_python_path(tmp_path: Path, enc: str) -> None:
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"
    (tmp_path / "n").mkdir()
    (tmp_path / "p").mkdir()
    nat = asyncio.run(_exchange(tmp_path / "n", True, enc))
    py = asyncio.run(_exchange(tmp_path / "p", False, enc))
    assert py["delivered_ab"] and py["delivered_ba"]
    assert nat["delivered_ab"] and nat["delivered_ba"]
    assert nat["stats"] == py["stats"]
    assert nat["seq"] == py["seq"] == (N, N)
    # 4 flows each way: the Python path sees the packets that came before C knew the flow
    # (at most one batch of 64), C carries the rest
    assert nat["python_calls"]["a"] <= 68 and nat["python_calls"]["b"] <= 68
    assert py["python_calls"]["a"] == N

"""A moved tunnel's inbound ESP relayed unchanged to its new gateway (ipsec/relay.py, issue 11
fwdnative): by the forwarding thread while the event loop is stalled, within the relay's
bounds (its SPIs only, the forwarding time, the rate), the same in C and in Python; and the
gateway that receives relayed ESP never sends to the relay's address."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipsecct.gateway.node import Node
from ipsecct.ipsec import native, relay
from ipsecct.ipsec.engine import Engine, Forward, Relay, ToPeer, Tunnel
from ipsecct.ipsec.esp import Drop
from ipsecct.ipsec.ippacket import build_udp
from ipsecct.ipsec.sad import Direction, Mode, SecurityAssociation, UdpEncap
from ipsecct.ipsec.spd import Action, Selectors, SPDEntry
from tests.helpers.native_nodes import node_cfg, udp_port
from tests.helpers.waiting import eventually

LOCAL = ipaddress.ip_address("127.0.0.1")
SPI_IN = 0x2001  # node a's inbound SPI (node_cfg, not inverse)


PURE = os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0")
native_only = pytest.mark.skipif(PURE, reason="IPSECCT_PURE_PYTHON forces the Python path")


def _need_native() -> None:
    assert native.AVAILABLE, "ipsecct.ipsec._esp is not built: run scripts/install"


def _sock(timeout: float | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    return s


def _esp(spi: int, seq: int, body: bytes = b"\x5a" * 48) -> bytes:
    return spi.to_bytes(4, "big") + seq.to_bytes(4, "big") + body


MORE_IN = 0x30000  # inbound SPIs of the tunnels _more_tunnels adds


def _more_tunnels(eng: Engine, n: int) -> list[Tunnel]:
    """``n`` more tunnels in ``eng`` (ESP in UDP, one MN address each), inbound SPIs from
    MORE_IN: a bulk transfer's worth to move at once."""
    mn = ipaddress.ip_address("192.0.2.50")
    out = []
    for i in range(n):
        sel = Selectors.between("10.2.0.0/16", str(ipaddress.ip_address("10.64.0.0") + i))
        o, n_ = (SecurityAssociation(
            spi, d, src, dst, enc_key=bytes(20), mode=Mode.TUNNEL, esn=True,
            encap=UdpEncap(4500, 4500), selectors=sel, name=f"t{i}",
        ) for spi, d, src, dst in ((0x40000 + i, Direction.OUTBOUND, LOCAL, mn),
                                   (MORE_IN + i, Direction.INBOUND, mn, LOCAL)))  # fmt: skip
        out.append(eng.add_tunnel(SPDEntry(sel, Action.PROTECT, name=f"t{i}", static=False),
                                  o, n_))  # fmt: skip
    return out


async def _moved_node(
    tmp: Path,
    target: socket.socket,
    until_s: float = 30.0,
    limits: tuple[float, float] | None = None,
    more: int = 0,
    cap: tuple[float, float] | None = None,
) -> tuple[Node, int]:
    """Node a (native, its forwarding thread running) with its tunnel (and ``more`` others:
    _more_tunnels) moved to "sg2", whose outer address is ``target``'s."""
    po = udp_port()
    a = Node(node_cfg(tmp, "a", po, udp_port(), udp_port(), udp_port(), False, "aes-gcm-16"))
    a.engine.relay_to["sg2"] = (LOCAL, target.getsockname()[1])
    if limits is not None:
        a.engine.relay_limits = limits
    if cap is not None:
        a.engine.relay_cap_limits = cap
    extra = _more_tunnels(a.engine, more)
    await a.start()
    assert a.status()["data_path"] == "native-thread"
    t = a.engine.tunnels()[0]
    a.engine.move_tunnels([t, *extra], "sg2", time.monotonic() + until_s)
    return a, po


@native_only
def test_the_forwarding_thread_relays_the_mns_esp_while_the_event_loop_is_stalled(
    tmp_path: Path,
) -> None:
    """After the cut, the MN's ESP that reaches the source goes on to the target's outer
    address unchanged, from the source's outer port, while the source's event loop is busy
    (here: blocked in a receive, a real stall of its one thread). Before, it went up to the
    event loop, which wrapped it in a CXTP message: nothing left while the loop was busy."""
    _need_native()

    async def main() -> dict[str, Any]:
        target, mn = _sock(10.0), _sock()
        a, po = await _moved_node(tmp_path, target)
        try:
            esp = _esp(SPI_IN, 7)
            mn.sendto(esp, ("127.0.0.1", po))
            # The loop stalls here (a blocking receive in its thread); only the forwarding
            # thread can send it.
            t0 = time.monotonic()
            got, src = target.recvfrom(65535)
            stalled = time.monotonic() - t0
            a.engine.fold_native_stats()
            return {"got": got, "src": src, "esp": esp, "po": po, "stalled": stalled,
                    "relayed": a.engine.stats.relayed}  # fmt: skip
        finally:
            await a.stop()
            target.close()
            mn.close()

    r = asyncio.run(main())
    assert r["got"] == r["esp"], "not the same datagram"
    assert r["src"] == ("127.0.0.1", r["po"]), "not from the source's outer port"
    assert r["relayed"] == 1


@native_only
def test_a_relay_goes_back_to_the_forwarding_thread_once_no_shadow_sa_has_its_spi(
    tmp_path: Path,
) -> None:
    """A shadow SA under a moved tunnel's inbound SPI (another tunnel's, after an SPI
    collision, renegotiate or reassign) takes the relay out of C: the Python path tries the
    shadow first, then relays (the event loop). Once the shadow goes, the relay is the
    forwarding thread's again, as an SA goes back after the Python path opened a packet:
    it relays while the event loop is stalled. Before, the relay stayed with the event loop
    until the tunnel's forwarding time ended."""
    _need_native()

    async def main() -> dict[str, Any]:
        target, mn = _sock(10.0), _sock()
        a, po = await _moved_node(tmp_path, target)
        eng = a.engine
        shadow = SecurityAssociation(
            SPI_IN, Direction.INBOUND, ipaddress.ip_address("192.0.2.50"), LOCAL,
            enc_key=bytes(20), mode=Mode.TUNNEL, encap=UdpEncap(4500, 4500),
        )  # fmt: skip
        try:
            eng.add_shadow(shadow)
            # the Python path: the shadow does not verify it, so it is relayed from Python
            via_python = eng.inbound(_esp(SPI_IN, 3), a.cfg.local_address, time.monotonic())
            eng.remove_shadows(shadow)
            esp = _esp(SPI_IN, 7)
            mn.sendto(esp, ("127.0.0.1", po))
            # the loop stalls here: only the forwarding thread can relay it
            try:
                got = target.recv(65535)
            except TimeoutError:
                got = b""
            return {"got": got, "esp": esp, "via_python": via_python}
        finally:
            await a.stop()
            target.close()
            mn.close()

    r = asyncio.run(main())
    assert isinstance(r["via_python"], Relay)
    assert r["got"] == r["esp"], "the forwarding thread did not relay once the shadow went"


@native_only
def test_a_relay_an_sa_here_took_from_c_goes_back_once_the_sa_is_gone(tmp_path: Path) -> None:
    """An SA installed here under a moved tunnel's inbound SPI takes the relay out of C (the
    SAD goes first: _relay_yield); once that SA is gone again (``sa del``), the Python path
    relays the MN's next datagram and hands the relay back to the forwarding thread, which
    relays the one after while the event loop is stalled. Before, the relay stayed with the
    event loop until the tunnel's forwarding time ended."""
    _need_native()

    async def main() -> dict[str, Any]:
        target, mn = _sock(10.0), _sock()
        a, po = await _moved_node(tmp_path, target)
        eng = a.engine
        sa = SecurityAssociation(
            SPI_IN, Direction.INBOUND, ipaddress.ip_address("192.0.2.50"), LOCAL,
            enc_key=bytes(20), mode=Mode.TUNNEL, encap=UdpEncap(4500, 4500),
        )  # fmt: skip
        try:
            eng.add_sa(sa)
            eng.sad.remove(sa)  # (what sa del does)
            first, second = _esp(SPI_IN, 3), _esp(SPI_IN, 4)
            mn.sendto(first, ("127.0.0.1", po))
            got1 = await asyncio.to_thread(target.recv, 65535)  # the event loop relays it
            mn.sendto(second, ("127.0.0.1", po))
            try:  # the loop stalls here: only the forwarding thread can relay it
                got2 = target.recv(65535)
            except TimeoutError:
                got2 = b""
            return {"got": [got1, got2], "sent": [first, second]}
        finally:
            await a.stop()
            target.close()
            mn.close()

    r = asyncio.run(main())
    assert r["got"][0] == r["sent"][0]
    assert r["got"][1] == r["sent"][1], "the relay did not go back to the forwarding thread"


@native_only
def test_only_a_moved_tunnels_inbound_spi_is_relayed_within_its_rate_and_time(
    tmp_path: Path,
) -> None:
    """Bounds: ESP under another SPI (the tunnel's outbound one, an unknown one) is never
    relayed; the relay's burst is the most it sends at once (the rest dropped, counted);
    at the end of the forwarding time nothing more goes (the Python path drops it)."""
    _need_native()

    async def main() -> dict[str, Any]:
        target, mn = _sock(), _sock()
        target.setblocking(False)
        a, po = await _moved_node(tmp_path, target, until_s=1.0, limits=(1e-6, 3.0))
        t = a.engine.moved_tunnels()[0]
        try:
            for spi in (0x1001, 0x7777, 0):
                mn.sendto(_esp(spi, 1), ("127.0.0.1", po))
            for i in range(10):
                mn.sendto(_esp(SPI_IN, 100 + i), ("127.0.0.1", po))
            got: list[bytes] = []

            def settled() -> bool:
                # the counters first: the forwarding thread (without the GIL) counts and sends
                # a batch under the lock the fold takes, so what they count is in the socket
                a.engine.fold_native_stats()
                st = a.engine.stats
                while True:
                    try:
                        got.append(target.recv(65535))
                    except BlockingIOError:
                        break
                return st.relayed + st.relay_refused >= 10

            await eventually(settled, "the ten datagrams handled", 30)
            early = list(got)
            await eventually(lambda: time.monotonic() >= t.forward_until, "the end", 30)
            no_sa = a.engine.stats.drops[Drop.NO_SA.value]
            mn.sendto(_esp(SPI_IN, 200), ("127.0.0.1", po))
            await eventually(
                lambda: a.engine.stats.drops[Drop.NO_SA.value] > no_sa, "the late one", 30
            )
            mn.sendto(_esp(SPI_IN, 201), ("127.0.0.1", po))  # (the first may be in flight)
            await eventually(
                lambda: a.engine.stats.drops[Drop.NO_SA.value] > no_sa + 1, "late two", 30
            )
            settled()
            return {"early": early, "late": got[len(early):], "stats": a.engine.stats}
        finally:
            await a.stop()
            target.close()
            mn.close()

    r = asyncio.run(main())
    assert [d[:8] for d in r["early"]] == [_esp(SPI_IN, 100 + i)[:8] for i in range(3)]
    assert r["late"] == []
    assert r["stats"].relayed == 3 and r["stats"].relay_refused == 7


@native_only
def test_many_moved_tunnels_relay_no_more_than_the_overall_cap_together(tmp_path: Path) -> None:
    """A bulk transfer moved 300 tunnels, then a flood (spoofed: anyone who saw the SPIs)
    comes under every one of their inbound SPIs. Each tunnel is within its own rate, but
    together they relay no more than the overall cap (``[transfer] relay_max_rate``): the
    rest is dropped in the forwarding thread and counted ``relay_capped``, as in status and
    the metrics. Before, only the per-tunnel bound held: 300 tunnels relayed 300 times one
    tunnel's burst to the target."""
    _need_native()
    n, per = 300, 3  # tunnels, datagrams under each (within its burst: none refused)

    async def main() -> dict[str, Any]:
        target, mn = _sock(), _sock()
        target.setblocking(False)
        target.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        a, po = await _moved_node(tmp_path, target, limits=(1e-6, float(per)), more=n - 1,
                                  cap=(1e-6, 100.0))  # fmt: skip
        spis = [SPI_IN] + [MORE_IN + i for i in range(n - 1)]
        got: list[bytes] = []
        try:
            for k in range(per):
                for spi in spis:
                    mn.sendto(_esp(spi, 1 + k), ("127.0.0.1", po))

            def settled() -> bool:
                while True:
                    try:
                        got.append(target.recv(65535))
                    except BlockingIOError:
                        break
                a.engine.fold_native_stats()
                st = a.engine.stats
                return st.relayed + st.relay_refused + st.relay_capped >= n * per

            await eventually(settled, "the flood handled", 60)
            settled()
            from ipsecct.gateway.control import prometheus_text

            return {"stats": a.engine.stats, "got": len(got), "metrics": prometheus_text(
                a.status())}  # fmt: skip
        finally:
            await a.stop()
            target.close()
            mn.close()

    r = asyncio.run(main())
    st = r["stats"]
    assert (st.relayed, st.relay_refused, st.relay_capped) == (100, 0, n * per - 100)
    assert r["got"] == 100, "the target got more than the overall cap"
    assert 'ipsecct_relay_total{node="a",result="capped"} 800' in r["metrics"]


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=native_only), False])
def test_the_python_path_keeps_the_overall_cap_too(tmp_path: Path, use_native: bool) -> None:
    """Engine.inbound (the pure-Python path, and what C hands up) for 20 moved tunnels,
    four datagrams each within its own burst: 30 relayed (the cap's burst), 50 dropped
    and counted relay_capped; the cap fills again at its rate."""
    if use_native:
        _need_native()
    a = Node(node_cfg(tmp_path, "a", udp_port(), udp_port(), udp_port(), udp_port(), False,
                      "aes-gcm-16"))  # fmt: skip
    eng = a.engine
    if not use_native:
        eng.native = None
    eng.relay_to["sg2"] = (LOCAL, 4999)
    eng.relay_limits = (1e-6, 4.0)
    eng.relay_cap_limits = (10.0, 30.0)
    tunnels = _more_tunnels(eng, 20)
    eng.move_tunnels(tunnels, "sg2", 100.0)
    got = [eng.inbound(_esp(MORE_IN + i, k), None, 1.0) for k in range(4) for i in range(20)]
    assert sum(isinstance(g, Relay) for g in got) == 30
    assert got[30:] == [Drop.POLICY] * 50
    assert isinstance(eng.inbound(_esp(MORE_IN + 19, 9), None, 1.1), Relay)  # 1 more token
    eng.fold_native_stats()
    assert (eng.stats.relayed, eng.stats.relay_refused, eng.stats.relay_capped) == (31, 0, 50)
    eng.remove_tunnels(tunnels)


@native_only
@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 2), st.floats(min_value=0, max_value=0.01,
                                                            allow_nan=False)), max_size=200),
    rate=st.floats(min_value=1.0, max_value=5000.0),
    cap_rate=st.floats(min_value=1.0, max_value=5000.0),
    burst=st.integers(min_value=1, max_value=20),
    cap_burst=st.integers(min_value=1, max_value=40),
)
def test_c_relays_under_one_cap_take_exactly_what_the_python_reference_takes(
    steps: list[tuple[int, float]], rate: float, cap_rate: float, burst: int, cap_burst: int
) -> None:
    """Three relays sharing one overall cap, ``_esp`` against relay.py, float for float: the
    same answers, the same counters in each relay and in the cap."""
    _need_native()
    until = 0.5
    caps = [relay.make_cap(cap_rate, float(cap_burst), native=nat) for nat in (True, False)]
    rs = [[relay.make(LOCAL, 4500, until, native=nat, rate=rate, burst=float(burst), cap=c)
           for _ in range(3)] for nat, c in zip((True, False), caps, strict=True)]  # fmt: skip
    now = 0.001
    for i, dt in steps:
        now += dt
        assert rs[0][i].take(now) == rs[1][i].take(now)
    for c, py in zip(rs[0], rs[1], strict=True):
        assert (c.relayed, c.refused) == (py.relayed, py.refused)
    assert caps[0].refused == caps[1].refused


@native_only
@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.floats(min_value=0, max_value=0.01, allow_nan=False), max_size=200),
    rate=st.floats(min_value=1.0, max_value=5000.0),
    burst=st.integers(min_value=1, max_value=20),
)
def test_the_c_relay_takes_exactly_what_the_python_reference_takes(
    steps: list[float], rate: float, burst: int
) -> None:
    """``_esp.Relay.take`` against :class:`ipsecct.ipsec.relay.RelayLimit`, float for float:
    the same answers (relay, over the rate, past the end) and counters."""
    _need_native()
    until = 0.5
    c = relay.make(LOCAL, 4500, until, native=True, rate=rate, burst=float(burst))
    py = relay.make(LOCAL, 4500, until, native=False, rate=rate, burst=float(burst))
    assert not isinstance(c, relay.RelayLimit)
    now = 0.001
    for dt in steps:
        now += dt
        assert c.take(now) == py.take(now)
    assert (c.relayed, c.refused) == (py.relayed, py.refused)
    assert c.take(until) is None and py.take(until) is None


@native_only
def test_bad_relays_are_refused() -> None:
    _need_native()
    for args in ((b"\0" * 5, 4500, 1.0, 1.0, 1.0), (LOCAL.packed, 0, 1.0, 1.0, 1.0),
                 (LOCAL.packed, 4500, float("nan"), 1.0, 1.0),
                 (LOCAL.packed, 4500, 1.0, 0.0, 1.0)):  # fmt: skip
        with pytest.raises(ValueError):
            native.relay_object(*args)
    with pytest.raises(ValueError):
        relay.RelayLimit(1.0, rate=0.0)
    for nat in (True, False):
        for rate, burst in ((0.0, 10.0), (10.0, 0.5), (float("inf"), 10.0), (10.0, float("nan"))):
            with pytest.raises(ValueError):
                relay.make_cap(rate, burst, native=nat)
    with pytest.raises(TypeError):
        native.relay_object(LOCAL.packed, 4500, 1.0, 1.0, 1.0, relay.RelayCap())


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=native_only), False])
def test_the_python_path_relays_as_c_does(tmp_path: Path, use_native: bool) -> None:
    """Engine.inbound on a moved tunnel's inbound SPI (what the Python path runs, and what
    C hands up): a Relay to the peer's outer address within the bounds, the same drops
    after; a Forward over the channel when the peer's outer address is not configured."""
    if use_native:
        _need_native()
    a = Node(node_cfg(tmp_path, "a", udp_port(), udp_port(), udp_port(), udp_port(), False,
                      "aes-gcm-16"))  # fmt: skip
    eng = a.engine
    if not use_native:
        eng.native = None
    eng.relay_limits = (1e-6, 2.0)
    t = eng.tunnels()[0]
    eng.move_tunnel(t, "sg2", 10.0)
    assert isinstance(eng.inbound(_esp(SPI_IN, 1), None, 1.0), Forward)  # no address known
    eng.remove_tunnel(t)
    a2 = Node(node_cfg(tmp_path, "b", udp_port(), udp_port(), udp_port(), udp_port(), False,
                       "aes-gcm-16"))  # fmt: skip
    eng = a2.engine
    if not use_native:
        eng.native = None
    eng.relay_limits = (1e-6, 2.0)
    eng.relay_to["sg2"] = (LOCAL, 4999)
    t = eng.tunnels()[0]
    eng.move_tunnel(t, "sg2", 10.0)
    got = [eng.inbound(_esp(SPI_IN, i), None, 1.0 + i * 1e-3) for i in range(4)]
    assert got[:2] == [Relay(("127.0.0.1", 4999), _esp(SPI_IN, 0)),
                       Relay(("127.0.0.1", 4999), _esp(SPI_IN, 1))]  # fmt: skip
    assert got[2:] == [Drop.POLICY, Drop.POLICY]
    assert eng.inbound(_esp(0x1001, 9), None, 2.0) is Drop.NO_SA  # its outbound SPI
    assert eng.inbound(_esp(SPI_IN, 9), None, 10.0) is Drop.NO_SA  # the end
    eng.fold_native_stats()
    assert (eng.stats.relayed, eng.stats.relay_refused) == (2, 2)
    eng.remove_tunnel(t)
    assert eng.native is None or eng.native.sizes() is not None
    assert eng.inbound(_esp(SPI_IN, 10), None, 3.0) is Drop.NO_SA  # gone with its tunnel


def test_a_peer_without_outer_port_is_named_in_one_warning_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer's outer port is not guessed (4500 is only a default: the examples' gateways
    use others, and a wrong guess loses the MN's ESP after the cut, which the TLS channel
    delivers): the transfer service relays to each peer with outer and outer_port, and names
    the others in one WARNING line, with what to set. The overall cap is the configured
    relay_max_rate, burst a tenth of a second."""
    import logging

    from ipsecct.ct.transfer import Settings
    from ipsecct.gateway.config import PeerConfig, TransferConfig
    from ipsecct.gateway.transfer_service import set_up_relays
    from ipsecct.ipsec.ippacket import Endpoint

    a = Node(node_cfg(tmp_path, "a", udp_port(), udp_port(), udp_port(), udp_port(), False,
                      "aes-gcm-16"))  # fmt: skip
    here = Endpoint(LOCAL, 4801)

    def peer(name: str, outer: bool, port: int | None) -> PeerConfig:
        return PeerConfig(name, here, LOCAL if outer else None, frozenset({"send"}), None, port)

    tcfg = TransferConfig(here, "c", "k", "ca", Settings(), {
        "sg2": peer("sg2", True, 34500), "sg3": peer("sg3", True, None),
        "sg4": peer("sg4", False, None)}, relay_max_rate=50_000.0)  # fmt: skip
    with caplog.at_level(logging.INFO):
        without = set_up_relays(a, tcfg)
    assert without == ["sg3", "sg4"]
    assert a.engine.relay_to == {"sg2": (LOCAL, 34500)}
    assert a.engine.relay_cap_limits == (50_000.0, 5_000.0)
    warned = [r for r in caplog.records if "peers-not-relayed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "peers=sg3,sg4" in warned[0].getMessage()
    assert "outer_port" in warned[0].getMessage()
    caplog.clear()
    tcfg.peers.pop("sg3")
    tcfg.peers.pop("sg4")
    assert set_up_relays(a, tcfg) == []
    assert not [r for r in caplog.records if "peers-not-relayed" in r.getMessage()]


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=native_only), False])
def test_esp_relayed_by_a_peer_gateway_never_makes_the_receiver_send_to_it(
    tmp_path: Path, use_native: bool
) -> None:
    """The target takes relayed ESP as from the MN (authenticated with the SA's key) but
    learns no address from it: what it sends on the SA goes to the SA's own destination
    (the MN), never to the gateway that relayed it."""
    if use_native:
        _need_native()

    async def main() -> dict[str, Any]:
        pa, pb, ia, ib, ab = (udp_port() for _ in range(5))
        mn = Node(node_cfg(tmp_path, "a", pa, ia, udp_port(), pb, False, "aes-gcm-16"))
        sg2 = Node(node_cfg(tmp_path, "b", pb, ib, ab, pa, True, "aes-gcm-16"))
        if not use_native:
            sg2.engine.native = None
        mn_outer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mn_outer.bind(("127.0.0.1", pa))  # the MN's outer port: what sg2 must send to
        mn_outer.settimeout(10)
        relayer, app = _sock(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        relayer.setblocking(False)
        app.bind(("127.0.0.1", ab))
        app.settimeout(10)
        await sg2.start()
        try:
            up = build_udp(ipaddress.ip_address("10.1.0.2"), ipaddress.ip_address("10.2.0.1"),
                           5000, 7000, b"up" * 20)  # fmt: skip
            res = mn.engine.outbound(up, time.monotonic())
            assert isinstance(res, ToPeer)
            relayer.sendto(bytes(res.data), ("127.0.0.1", pb))  # relayed by "sg1"
            delivered = await asyncio.to_thread(app.recv, 65535)
            down = build_udp(ipaddress.ip_address("10.2.0.1"), ipaddress.ip_address("10.1.0.2"),
                             7000, 5000, b"down" * 10)  # fmt: skip
            app.sendto(down, ("127.0.0.1", ib))
            esp, src = await asyncio.to_thread(mn_outer.recvfrom, 65535)
            try:
                to_relayer = relayer.recv(65535)
            except BlockingIOError:
                to_relayer = b""
            return {"delivered": delivered == up, "src": src, "pb": pb,
                    "to_relayer": to_relayer, "esp_spi": esp[:4]}  # fmt: skip
        finally:
            await sg2.stop()
            for s in (mn_outer, relayer, app):
                s.close()

    r = asyncio.run(main())
    assert r["delivered"], "the relayed ESP was not delivered"
    assert r["src"] == ("127.0.0.1", r["pb"]) and r["esp_spi"] == (0x2001).to_bytes(4, "big")
    assert r["to_relayer"] == b"", "sg2 sent to the gateway that relayed the MN's ESP"


@pytest.mark.parametrize("use_native", [pytest.param(True, marks=native_only), False])
def test_a_tunnel_installed_here_under_a_relayed_spi_takes_its_esp(
    tmp_path: Path, use_native: bool
) -> None:
    """A tunnel moved away still has its relay (its inbound SPI, until its forwarding time
    ends) when a tunnel with that inbound SPI is installed here again: a fail-over standby
    taking over the replica of a tunnel it had moved to its active (ct/failover: a forwarder
    there is replaced, not removed), an ``sa add``, an IKE CHILD SA whose SPI is free in the
    SAD. The Python path looks in the SAD first: the ESP is this tunnel's. The forwarding
    thread looked its relay up before the Python path saw the packet (the new inbound SA is
    not in C until the Python path has opened a packet of it), so every packet of the
    tunnel's MN went on to the other gateway (a dead active) until the forwarding time's
    end, and none was opened here."""
    if use_native:
        _need_native()

    async def main() -> dict[str, Any]:
        target, app = _sock(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target.setblocking(False)
        ap = udp_port()
        app.bind(("127.0.0.1", ap))
        app.settimeout(10)
        mn_sock = _sock()
        po = udp_port()
        a = Node(node_cfg(tmp_path, "a", po, udp_port(), ap, udp_port(), False, "aes-gcm-16"))
        if not use_native:
            a.engine.native = None
        a.engine.relay_to["sg2"] = (LOCAL, target.getsockname()[1])
        mn = Node(node_cfg(tmp_path, "m", udp_port(), udp_port(), udp_port(), po, True,
                           "aes-gcm-16"))  # fmt: skip
        await a.start()
        try:
            t = a.engine.tunnels()[0]
            a.engine.move_tunnel(t, "sg2", time.monotonic() + 30.0)
            # the same tunnel back (a replica taken over): new SA objects, the same SPIs
            c = Node(node_cfg(tmp_path, "c", udp_port(), udp_port(), udp_port(), udp_port(),
                              False, "aes-gcm-16"))  # fmt: skip
            tc = c.engine.tunnels()[0]
            c.engine.remove_tunnel(tc)
            assert tc.inbound is not None and tc.inbound.spi == SPI_IN
            a.engine.add_tunnel(tc.entry, tc.outbound, tc.inbound, index=0)
            up = build_udp(ipaddress.ip_address("10.2.0.1"), ipaddress.ip_address("10.1.0.2"),
                           7000, 5000, b"up" * 20)  # fmt: skip
            res = mn.engine.outbound(up, time.monotonic())
            assert isinstance(res, ToPeer)
            mn_sock.sendto(bytes(res.data), ("127.0.0.1", po))
            try:
                delivered = await asyncio.to_thread(app.recv, 65535)
            except TimeoutError:
                delivered = b""
            try:
                relayed = target.recv(65535)
            except BlockingIOError:
                relayed = b""
            a.engine.fold_native_stats()
            return {"delivered": delivered == up, "relayed": relayed,
                    "stats": a.engine.stats}  # fmt: skip
        finally:
            await a.stop()
            for s in (target, app, mn_sock):
                s.close()

    r = asyncio.run(main())
    assert r["relayed"] == b"" and r["stats"].relayed == 0, "relayed to the other gateway"
    assert r["delivered"], "the ESP of the tunnel installed here was not opened here"

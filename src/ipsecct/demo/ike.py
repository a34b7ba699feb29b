"""The demo's IKEv2 keying (``ipsecct demo``, the default; ``--keying manual`` skips it).

Before the stream starts, the mobile node's agent initiates IKEv2 to sg1 (IKE_SA_INIT and
IKE_AUTH with a pre-shared key made for the run, the CHILD SA in IKE_AUTH) and the CHILD SA
goes into both SADs. At the handover the IKE SA follows its CHILD SA to sg2 (its context over
the gateways' TLS channel, :mod:`ipsecct.gateway.ike`), with its message IDs; with direct SG
identity sg2 announces its address under the moved IKE SA (MOBIKE) and the MN's IKE SA
follows. Then the MN sends a liveness check (an empty INFORMATIONAL, what strongSwan's DPD
sends) and sg2 must answer it.

Everything waits on conditions with a deadline; what did not happen in time is a
:class:`~ipsecct.errors.DemoError` (one line at the command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from ..errors import ControlError, DemoError
from ..gateway.ike import IkeService
from ..ikev2.engine import ConnectFailed, Output
from ..ikev2.ikesa import IkeSA, IkeState
from .topology import ADDRESS, Demo

POLL = 0.002  # seconds between looks at a condition in this process
REMOTE_POLL = 0.01  # ... at a condition that a gateway's control socket answers


def _ike(demo: Demo, name: str) -> IkeService:
    svc = demo.mn.service if name == "mn" else demo.services[name]
    assert svc.ike is not None, f"{name} runs no IKEv2"
    return svc.ike


def _installed(sa: IkeSA) -> bool:
    return (sa.state is IkeState.ESTABLISHED and bool(sa.children)
            and all(c.handle is not None for c in sa.children))  # fmt: skip


def _established(ike: IkeService) -> IkeSA | None:
    """The node's IKE SA with its CHILD SA installed, if there is one."""
    return next((sa for sa in ike.engine.ike_sas() if _installed(sa)), None)


async def _ike_sas(demo: Demo, gw: str) -> list[dict[str, Any]]:
    """A gateway's IKE SAs as ``ipsecct sa list`` shows them (``ike.list`` on its control
    socket when it runs as a process; none from a gateway that was killed)."""
    p = demo.procs.get(gw)
    if p is None:
        ike = _ike(demo, gw)
        now = ike.node.clock()
        return [sa.summary(now) for sa in ike.engine.ike_sas()]
    if p.killed:
        return []
    try:
        out: list[dict[str, Any]] = await p.request("ike.list", timeout=10)
    except ControlError as exc:
        raise DemoError(f"gateway {gw}: ike.list: {exc}") from None
    return out


def _sa_installed(sa: dict[str, Any]) -> bool:
    return (sa["state"] == IkeState.ESTABLISHED.value and bool(sa["children"])
            and all(c["installed"] for c in sa["children"]))  # fmt: skip


async def _gw_counters(demo: Demo, gw: str) -> dict[str, int]:
    """A gateway's IKE counters (``status``; what was read last from a gateway that is gone)."""
    p = demo.procs.get(gw)
    if p is None:
        return dict(_ike(demo, gw).engine.stats)
    if not p.killed:
        with contextlib.suppress(ControlError):
            demo.remote_status[gw] = await p.request("status", timeout=10)
    st = demo.remote_status.get(gw, {})
    return {str(k): int(v) for k, v in st.get("ike", {}).get("counters", {}).items()}


async def _until(cond: Callable[[], Awaitable[bool]], timeout: float,
                 poll: float = POLL) -> bool:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


def _text(c: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "no IKE message"


def _counters(ike: IkeService) -> str:
    return _text(dict(ike.engine.stats))


async def _gw_text(demo: Demo, gw: str) -> str:
    try:
        return _text(await _gw_counters(demo, gw))
    except DemoError as exc:
        return str(exc)


def _line(out: TextIO | None, text: str) -> None:
    if out is not None:
        out.write(f"IKE: {text}\n")
        out.flush()


async def establish(demo: Demo, timeout: float, out: TextIO | None) -> dict[str, Any]:
    """Start IKEv2 on every node (the gateways first, then the MN, which initiates) and wait
    until the MN and sg1 both have the IKE SA with its CHILD SA installed."""
    failures: list[str] = []

    def on_event(o: Output) -> None:
        if isinstance(o, ConnectFailed):
            failures.append(o.reason)

    mn = _ike(demo, "mn")
    mn.listeners.append(on_event)
    for g in demo.gateways:  # gateways in processes of their own started theirs
        await _ike(demo, g).start()
    t0 = time.monotonic()
    await mn.start()  # start_action = start: IKE_SA_INIT goes out now

    async def up() -> bool:
        if failures:
            return True
        if _established(mn) is None:
            return False
        return any(_sa_installed(sa) for sa in await _ike_sas(demo, "sg1"))

    poll = REMOTE_POLL if demo.procs else POLL
    ok = await _until(up, timeout, poll) and not failures
    ike = _established(mn)
    if not ok or ike is None:
        why = f"; {failures[-1]}" if failures else ""
        raise DemoError(
            f"the demo's IKE SA was not established within {timeout:g} s{why}"
            f" (MN: {_counters(mn)}; sg1: {await _gw_text(demo, 'sg1')})"
        )
    ms = (time.monotonic() - t0) * 1000
    child = ike.children[0]
    info: dict[str, Any] = {
        "established_ms": round(ms, 3),
        "spi_i": ike.spi_i.hex(),
        "spi_r": ike.spi_r.hex(),
        "proposal": ike.suite.name(),
        "child": {
            "spi_in": f"{child.spi_in:08x}",
            "spi_out": f"{child.spi_out:08x}",
            "proposal": child.suite.name(),
        },
        "ike_sa_init": 0,
        "ike_sa_init_answered": {},
        "moves": [],
    }
    _line(out, f"MN -> sg1 IKE_SA_INIT + IKE_AUTH (PSK made for this run): IKE SA established"
               f" in {ms:.1f} ms, SPIs {info['spi_i']}_i {info['spi_r']}_r,"
               f" {info['proposal']}")  # fmt: skip
    _line(out, f"CHILD SA {child.name}: SPIs in 0x{child.spi_in:08x} out 0x{child.spi_out:08x},"
               f" {info['child']['proposal']}, installed at the MN and sg1")  # fmt: skip
    return info


async def replicated(demo: Demo, standby: str, timeout: float) -> None:
    """``--failover``: wait until ``standby`` holds a replica of the tunnel and of the IKE SA,
    what it would take over, before the stream starts. The active replicates the IKE SA
    within ``sync_ms`` of its establishment, later on a loaded machine; an active silent for
    the detection time before then (not run) left a take-over without the IKE SA."""
    p = demo.procs.get(standby)
    if p is None:  # (gateways in this process: the tests' in-process demos)
        return
    st: dict[str, Any] = {}

    async def holds() -> bool:
        nonlocal st
        try:
            st = (await p.request("status", timeout=10)).get("failover", {})
        except ControlError as exc:
            raise DemoError(f"gateway {standby}: status: {exc}") from None
        return bool(st.get("replicated_tunnels", 0) and st.get("replicated_ike_sas", 0))

    if not await _until(holds, timeout, REMOTE_POLL):
        raise DemoError(
            f"{standby} held no replica of the tunnel and its IKE SA within {timeout:g} s"
            f" (its fail-over role: {st.get('role')}, replicated tunnels"
            f" {st.get('replicated_tunnels')}, IKE SAs {st.get('replicated_ike_sas')})"
        )


async def _holders(demo: Demo, spi_r: str) -> dict[str, dict[str, Any]]:
    """The gateways that hold the IKE SA whose responder SPI is ``spi_r`` (hex), with it."""
    out: dict[str, dict[str, Any]] = {}
    for g in demo.gw_ports:
        sa = next((sa for sa in await _ike_sas(demo, g) if sa["spi_r"] == spi_r), None)
        if sa is not None:
            out[g] = sa
    return out


async def after_handover(
    demo: Demo,
    info: dict[str, Any],
    src: str,
    dst: str,
    timeout: float,
    out: TextIO | None,
    *,
    failover: bool = False,
) -> None:
    """The handover from ``src`` to ``dst`` is committed: wait until ``dst`` holds the IKE SA
    (and, with direct identity, until the MN's IKE SA follows sg2's signal), then send a
    liveness check from the MN and wait for ``dst``'s answer. With ``failover``, ``src`` is
    dead (it is not asked) and ``dst`` took the IKE SA over from its replica and
    synchronised message IDs with the MN (RFC 6311). The gateways are asked over their
    control sockets when they run as processes."""
    mn = _ike(demo, "mn")
    ike = next((sa for sa in mn.engine.ike_sas() if sa.spi_r.hex() == info["spi_r"]), None)
    if ike is None:
        raise DemoError("the MN lost its IKE SA during the handover")
    spi_r = ike.spi_r
    held: dict[str, dict[str, Any]] = {}
    counters: dict[str, int] = {}
    poll = REMOTE_POLL if demo.procs else POLL

    async def moved() -> bool:
        nonlocal held, counters
        held = await _holders(demo, spi_r.hex())
        if failover:
            if dst not in held:
                return False
            counters = await _gw_counters(demo, dst)
            return any(counters.get(k) for k in ("mid-sync-done", "message-id-probed",
                                                 "liveness-ok"))  # fmt: skip
        return list(held) == [dst]

    if not await _until(moved, timeout, poll):
        raise DemoError(
            f"the IKE SA did not move from {src} to {dst} within {timeout:g} s"
            f" (held by: {', '.join(held) or 'no gateway'};"
            f" {dst}: {await _gw_text(demo, dst)}; MN: {_counters(mn)})"
        )
    there = held[dst]["message_ids"]
    mids = {"sg_next_request": there["next_request"], "sg_next_expected": there["next_expected"]}
    if failover:
        how = ("synchronised by RFC 6311" if counters.get("mid-sync-done")
               else "kept from the replica")  # fmt: skip
        _line(out, f"IKE SA {ike.spi_i.hex()}_i {spi_r.hex()}_r taken over by {dst} from its"
                   f" replica with its CHILD SA after {src} died; message IDs {how}"
                   f" ({dst} expects {there['next_expected']} from the MN, the MN sends"
                   f" {ike.my_next_mid})")  # fmt: skip
    else:
        _line(out, f"IKE SA {ike.spi_i.hex()}_i {spi_r.hex()}_r moved {src} -> {dst} with"
                   f" its CHILD SA: {dst} holds it, {src} none; message IDs carried over"
                   f" ({dst} expects {there['next_expected']} from the MN, the MN sends"
                   f" {ike.my_next_mid})")  # fmt: skip
    if demo.identity == "direct":
        # sg2 tells the MN its address under the moved IKE SA (IkeEngine.announce_move: with
        # MOBIKE an INFORMATIONAL with NO_ADDITIONAL_ADDRESSES from sg2's address)
        host = ADDRESS[dst]

        async def followed() -> bool:
            return str(ike.remote.host) == host

        if not await _until(followed, timeout):
            raise DemoError(f"the MN's IKE SA did not follow the handover to {dst} within"
                            f" {timeout:g} s (still at {ike.remote})")  # fmt: skip
        how = ("MOBIKE, NO_ADDITIONAL_ADDRESSES" if ike.mobike
               else "an authenticated request, NAT float")  # fmt: skip
        _line(out, f"{dst} announced its address under the moved IKE SA ({how}): the MN's"
                   f" IKE SA now talks to {ike.remote}")  # fmt: skip
    answered_before = (await _gw_counters(demo, dst)).get("liveness-answered", 0)
    mid = ike.my_next_mid
    t0 = time.monotonic()
    mn.liveness(ike)

    async def answered() -> bool:  # the MN has the answer to its check
        return ike.pending is None

    ok = await _until(answered, timeout)
    dpd_ms = (time.monotonic() - t0) * 1000

    async def counted() -> bool:  # ... and it came from dst
        return (await _gw_counters(demo, dst)).get("liveness-answered", 0) > answered_before

    if not ok or not await _until(counted, timeout, poll):
        raise DemoError(f"{dst} did not answer the MN's liveness check within {timeout:g} s"
                        f" after the handover ({dst}: {await _gw_text(demo, dst)})")  # fmt: skip
    _line(out, f"liveness check (DPD) from the MN, message ID {mid}: answered by {dst}"
               f" in {dpd_ms:.1f} ms; no new IKE_SA_INIT")  # fmt: skip
    info["moves"].append({
        "from": src,
        "to": dst,
        "how": "failover" if failover else "handover",
        "message_ids": mids,
        "dpd_message_id": mid,
        "dpd_ms": round(dpd_ms, 3),
    })  # fmt: skip


async def finish(demo: Demo, info: dict[str, Any]) -> None:
    """The run's IKE_SA_INIT count: requests sent by the MN and answered by any gateway
    (before the gateways stop; what was read last from a gateway that was killed)."""
    info["ike_sa_init"] = _ike(demo, "mn").engine.stats["ike-sa-init-sent"]
    info["ike_sa_init_answered"] = {g: (await _gw_counters(demo, g)).get("ike-sa-init", 0)
                                    for g in demo.gw_ports}  # fmt: skip


def print_summary(info: dict[str, Any], out: TextIO) -> None:
    moves = "".join(f", moved {m['from']} -> {m['to']} (DPD answered in {m['dpd_ms']:.1f} ms)"
                    for m in info["moves"])  # fmt: skip
    out.write(f"  IKE SA {info['spi_i']}_i {info['spi_r']}_r: established in"
              f" {info['established_ms']:.1f} ms, IKE_SA_INIT sent {info['ike_sa_init']}"
              f"{moves}\n")  # fmt: skip

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
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..errors import DemoError
from ..gateway.ike import IkeService
from ..ikev2.engine import ConnectFailed, Output
from ..ikev2.ikesa import IkeSA, IkeState
from .topology import ADDRESS, Demo

POLL = 0.002  # seconds between looks at a condition


def _ike(demo: Demo, name: str) -> IkeService:
    svc = demo.mn.service if name == "mn" else demo.services[name]
    assert svc.ike is not None, f"{name} runs no IKEv2"
    return svc.ike


def _established(ike: IkeService) -> IkeSA | None:
    """The node's IKE SA with its CHILD SA installed, if there is one."""
    for sa in ike.engine.ike_sas():
        if (
            sa.state is IkeState.ESTABLISHED
            and sa.children
            and all(c.handle is not None for c in sa.children)
        ):
            return sa
    return None


async def _until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True


def _counters(ike: IkeService) -> str:
    c = ike.engine.stats
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "no IKE message"


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
    for g in demo.gateways:
        await _ike(demo, g).start()
    sg1 = _ike(demo, "sg1")
    t0 = time.monotonic()
    await mn.start()  # start_action = start: IKE_SA_INIT goes out now
    ok = await _until(lambda: (_established(mn) is not None and _established(sg1) is not None)
                      or bool(failures), timeout)  # fmt: skip
    ike = _established(mn)
    if not ok or ike is None or _established(sg1) is None:
        why = f"; {failures[-1]}" if failures else ""
        raise DemoError(
            f"the demo's IKE SA was not established within {timeout:g} s{why}"
            f" (MN: {_counters(mn)}; sg1: {_counters(sg1)})"
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


def _holder(demo: Demo, spi_r: bytes) -> list[str]:
    """The gateways that hold the IKE SA whose responder SPI is ``spi_r``."""
    return [g for g in demo.gateways
            if any(sa.spi_r == spi_r for sa in _ike(demo, g).engine.ike_sas())]  # fmt: skip


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
    dead (its memory still holds the IKE SA: it is not asked) and ``dst`` took the IKE SA
    over from its replica and synchronised message IDs with the MN (RFC 6311)."""
    mn = _ike(demo, "mn")
    ike = next((sa for sa in mn.engine.ike_sas() if sa.spi_r.hex() == info["spi_r"]), None)
    if ike is None:
        raise DemoError("the MN lost its IKE SA during the handover")
    spi_r = ike.spi_r
    target = _ike(demo, dst)
    if failover:
        moved = await _until(lambda: dst in _holder(demo, spi_r) and any(
            target.engine.stats[k] for k in ("mid-sync-done", "message-id-probed",
                                             "liveness-ok")), timeout)  # fmt: skip
    else:
        moved = await _until(lambda: _holder(demo, spi_r) == [dst], timeout)
    if not moved:
        raise DemoError(
            f"the IKE SA did not move from {src} to {dst} within {timeout:g} s"
            f" (held by: {', '.join(_holder(demo, spi_r)) or 'no gateway'};"
            f" {dst}: {_counters(target)}; MN: {_counters(mn)})"
        )
    there = next(sa for sa in target.engine.ike_sas() if sa.spi_r == spi_r)
    mids = {"sg_next_request": there.my_next_mid, "sg_next_expected": there.peer_next_mid}
    if failover:
        how = ("synchronised by RFC 6311" if target.engine.stats["mid-sync-done"]
               else "kept from the replica")  # fmt: skip
        _line(out, f"IKE SA {ike.spi_i.hex()}_i {spi_r.hex()}_r taken over by {dst} from its"
                   f" replica with its CHILD SA after {src} died; message IDs {how}"
                   f" ({dst} expects {there.peer_next_mid} from the MN, the MN sends"
                   f" {ike.my_next_mid})")  # fmt: skip
    else:
        _line(out, f"IKE SA {ike.spi_i.hex()}_i {spi_r.hex()}_r moved {src} -> {dst} with"
                   f" its CHILD SA: {dst} holds it, {src} none; message IDs carried over"
                   f" ({dst} expects {there.peer_next_mid} from the MN, the MN sends"
                   f" {ike.my_next_mid})")  # fmt: skip
    if demo.identity == "direct":
        # sg2 tells the MN its address under the moved IKE SA (IkeEngine.announce_move: with
        # MOBIKE an INFORMATIONAL with NO_ADDITIONAL_ADDRESSES from sg2's address)
        host = ADDRESS[dst]
        if not await _until(lambda: str(ike.remote.host) == host, timeout):
            raise DemoError(f"the MN's IKE SA did not follow the handover to {dst} within"
                            f" {timeout:g} s (still at {ike.remote})")  # fmt: skip
        how = ("MOBIKE, NO_ADDITIONAL_ADDRESSES" if ike.mobike
               else "an authenticated request, NAT float")  # fmt: skip
        _line(out, f"{dst} announced its address under the moved IKE SA ({how}): the MN's"
                   f" IKE SA now talks to {ike.remote}")  # fmt: skip
    answered_before = target.engine.stats["liveness-answered"]
    mid = ike.my_next_mid
    t0 = time.monotonic()
    mn.liveness(ike)
    ok = await _until(
        lambda: ike.pending is None and target.engine.stats["liveness-answered"] > answered_before,
        timeout,
    )
    if not ok:
        raise DemoError(f"{dst} did not answer the MN's liveness check within {timeout:g} s"
                        f" after the handover ({dst}: {_counters(target)})")  # fmt: skip
    dpd_ms = (time.monotonic() - t0) * 1000
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


def finish(demo: Demo, info: dict[str, Any]) -> None:
    """The run's IKE_SA_INIT count: requests sent by the MN and answered by any gateway."""
    info["ike_sa_init"] = _ike(demo, "mn").engine.stats["ike-sa-init-sent"]
    info["ike_sa_init_answered"] = {g: _ike(demo, g).engine.stats["ike-sa-init"]
                                    for g in demo.gateways}  # fmt: skip


def print_summary(info: dict[str, Any], out: TextIO) -> None:
    moves = "".join(f", moved {m['from']} -> {m['to']} (DPD answered in {m['dpd_ms']:.1f} ms)"
                    for m in info["moves"])  # fmt: skip
    out.write(f"  IKE SA {info['spi_i']}_i {info['spi_r']}_r: established in"
              f" {info['established_ms']:.1f} ms, IKE_SA_INIT sent {info['ike_sa_init']}"
              f"{moves}\n")  # fmt: skip

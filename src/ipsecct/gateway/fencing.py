"""The asyncio side of fail-over fencing (pair mode): what the driver does with the lease.

The decisions are in :mod:`ipsecct.ct.lease` and :mod:`ipsecct.ct.failover`; the engine
enforces the lease on every packet by itself (``Engine.send_until``). This module carries out
the rest for one gateway of a pair:

* the standby's replies (ACK, TAKEN) go back to the active over the same TLS channel;
* the active logs the loss and regain of its lease (``lease-lost`` at WARNING: it has stopped
  sending and says why), keeps what it held meanwhile in a bounded queue and sends it when the
  lease comes back; told that the standby took over (``lease-superseded``, ERROR), it removes
  its tunnels for good (the taker owns them) and the driver makes it the taker's standby;
* the epoch and the role (took over: the active of that epoch; or the standby of the peer)
  are kept in a small state file written (and synced to disk) *before* anything is sent on a
  taken-over tunnel and before a superseded active becomes a standby: a taker that restarts
  still answers TAKEN and never lets the old active send again on SAs it used, and a standby
  that restarts stays the standby.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ct import failover
from ..ct.lease import LeaseEvent
from ..ipsec.engine import Held, Tunnel, TunnelState
from ..tools.files import SECRET_LIMIT, read_limited
from .log import event
from .node import Node

log = logging.getLogger("ipsecct.gateway.fencing")


def state_path(
    cfg: failover.FailoverConfig, config_path: str, name: str, state_dir: str | None = None
) -> Path | None:
    """Where the epoch is kept: ``[failover] state``, else ``failover-epoch.json`` in the
    node's state directory (``[state] dir``, else the default one, see gateway.state); None
    for a configuration that is no file (the demo's): kept in memory only."""
    if cfg.state:
        p = Path(cfg.state)
        return p if p.is_absolute() else Path(config_path).parent / p
    if not Path(config_path).is_file():
        return None
    from ..errors import StateError
    from .state import default_dir

    try:
        base = Path(state_dir) if state_dir is not None else default_dir(name)
    except StateError:
        return Path(config_path).parent / f"{name}.failover-epoch.json"
    return base / "failover-epoch.json"


@dataclass(frozen=True)
class PairState:
    """What the state file says this gateway was when it stopped: ``role`` "active" (it took
    over in ``epoch``), "standby" (it became the standby of ``active`` in ``epoch``: the
    peer took over from it), or None (no file: the configured role, first epoch). ``alone``:
    the epoch began by ``failover alone`` (not by a take-over from replicas), which loses a
    tie with a take-over by the peer in the same epoch (:attr:`Replicator.alone`)."""

    epoch: int
    role: str | None
    active: str = ""
    damaged: bool = False
    alone: bool = False


def load_state(path: Path | None) -> PairState:
    """The state file's :class:`PairState`; the configured role when there is none."""
    if path is None:
        return PairState(failover.FIRST_EPOCH, None)
    try:
        d = json.loads(read_limited(path, SECRET_LIMIT).decode())
        epoch, took = d["epoch"], d["took_over"]
        if (
            isinstance(epoch, int)
            and not isinstance(epoch, bool)
            and failover.FIRST_EPOCH <= epoch < failover.LAST_EPOCH  # (32 bits on the wire,
            # and a take-over from it must fit them: Standby.receive refuses LAST_EPOCH too)
            and isinstance(took, bool)
        ):
            active = d.get("active", "")
            return PairState(
                epoch,
                "active" if took else "standby",
                active if isinstance(active, str) else "",
                alone=took and d.get("alone") is True,  # (absent in a previous version's)
            )
    except FileNotFoundError:
        return PairState(failover.FIRST_EPOCH, None)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass
    # A damaged state file: assume the peer took over (we may have been superseded): come
    # back as a standby, which sends nothing and never hands a lease back.
    return PairState(failover.FIRST_EPOCH + 1, "standby", damaged=True)


def save_state(
    path: Path | None, epoch: int, took_over: bool, *, active: str = "", alone: bool = False
) -> None:
    """Record the epoch and the role: ``took_over`` (active by a take-over; ``alone``: by
    ``failover alone``), else the standby of ``active``. Synced to disk before it returns."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    d: dict[str, Any] = {"epoch": epoch, "took_over": took_over}
    if not took_over:
        d.update(role="standby", active=active)
    elif alone:
        d["alone"] = True
    with open(tmp, "w") as f:
        json.dump(d, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class PairFencing:
    """Lease bookkeeping of one gateway of a fail-over pair."""

    def __init__(
        self,
        node: Node,
        cfg: failover.FailoverConfig,
        path: Path | None,
        replicator: failover.Replicator | None,
        standby: failover.Standby | None,
    ) -> None:
        self.node = node
        self.cfg = cfg
        self.path = path
        self.replicator = replicator
        self.standby = standby
        self.held: collections.deque[Held] = collections.deque()
        self.max_held = 4096
        self.fenced_drops = 0
        self.released = 0
        self.lost_at: float | None = None
        self.given_up: list[Tunnel] = []  # the tunnels the peer took over from this gateway
        # Run when the standby took over: the IKE SAs go, the driver becomes its standby.
        self.on_superseded: list[Callable[[int], None]] = []

    # -- the active ------------------------------------------------------------------------
    def on_reply(self, msg: Any, now: float) -> None:
        assert self.replicator is not None
        self._events(self.replicator.receive(msg, now), now)

    def tick(self, now: float) -> None:
        if self.replicator is not None:
            self._events(self.replicator.tick(now), now)

    def _events(self, events: list[LeaseEvent], now: float) -> None:
        for ev in events:
            if ev is LeaseEvent.LOST:
                self.lost_at = now
                event(
                    log,
                    ev.value,
                    logging.WARNING,
                    node=self.node.name,
                    peer=self.cfg.peer,
                    detail="no acknowledgement from the standby within the lease: "
                    "this gateway stopped sending (packets held)",
                )
            elif ev is LeaseEvent.REGAINED or ev is LeaseEvent.GRANTED:
                gap = "" if self.lost_at is None else f"{(now - self.lost_at) * 1000:.0f}"
                self.lost_at = None
                event(log, ev.value, node=self.node.name, peer=self.cfg.peer, fenced_ms=gap)
                self.release()
            elif ev is LeaseEvent.SUPERSEDED:
                self._superseded()

    def hold(self, held: Held) -> bool:
        """A packet the engine held because of the fence: keep it (bounded) for the lease's
        return. False when it is not ours to keep."""
        if held.inbound or not self.node.engine.fenced(held.tunnel, self.node.clock()):
            return False
        if self.replicator is None or self.replicator.superseded_by is not None:
            self.fenced_drops += 1
            return True
        if len(self.held) >= self.max_held:
            self.fenced_drops += 1
            return True
        self.held.append(held)
        return True

    def release(self) -> None:
        """Send what was held (the lease came back, or the gateway runs alone now)."""
        pending, self.held = self.held, collections.deque()
        for h in pending:
            if h.tunnel.state is TunnelState.ACTIVE:
                self.released += 1
                self.node.from_inner(h.packet)

    def _superseded(self) -> None:
        """The standby took over: this gateway gives its tunnels up for good (it sends
        nothing, holds nothing) and becomes the standby of the taker (the driver's hook)."""
        assert self.replicator is not None
        self.give_up(self.replicator.superseded_by or 0)

    def give_up(self, epoch: int, why: str = "") -> None:
        """The peer owns this gateway's tunnels since ``epoch``: give them up for good and
        become its standby (the driver's hook). ``why``: how this gateway learnt it, when
        not by a TAKEN to its replicator."""
        save_state(self.path, epoch, False, active=self.cfg.peer)
        tunnels = list(self.node.engine.tunnels())
        for t in tunnels:
            self.node.engine.remove_tunnel(t)
        self.fenced_drops += len(self.held)
        self.held.clear()
        event(
            log,
            LeaseEvent.SUPERSEDED.value,
            logging.ERROR,
            node=self.node.name,
            peer=self.cfg.peer,
            epoch=epoch,
            tunnels=len(tunnels),
            detail=f"{self.cfg.peer} took over{why}: this gateway removed its tunnels and "
            f"sends nothing on them; it becomes the standby of {self.cfg.peer}",
        )
        self.given_up = tunnels
        for hook in self.on_superseded:
            hook(epoch)

    # -- the standby -----------------------------------------------------------------------
    def before_take_over(self) -> None:
        """Record the take-over on disk before anything is sent on a taken-over SA."""
        assert self.standby is not None
        save_state(self.path, self.standby.epoch + 1, True)

    # -- information -----------------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        if self.replicator is not None:
            lease = self.replicator.lease
            if self.replicator.superseded_by is not None:
                state = "superseded"
            elif lease is None:
                state = "off"
            else:
                state = "held" if lease.valid(now) else "lost"
            out: dict[str, Any] = {
                "state": state,
                "epoch": self.replicator.epoch,
                "remaining_ms": (round(lease.remaining(now) * 1000) if lease is not None else None),
                "lease_ms": round(lease.timing.lease * 1000, 3) if lease is not None else None,
                # when it stopped sending: the lease's end, not when a tick noticed it
                "ended_ms_ago": _ms(lease.ended_ago(now)) if lease is not None else None,
                "losses": lease.losses if lease is not None else 0,
                "acks": self.replicator.acks,
                "held_packets": len(self.held),
                "fenced_drops": self.fenced_drops + self.node.engine.stats.drops["fenced"],
            }
            return out
        assert self.standby is not None
        g = self.standby.grant
        d = g.deadline() if g is not None else None
        return {
            "state": "taken over" if self.standby.took_over is not None else "granting",
            "epoch": self.standby.epoch,
            "granted": self.standby.acks,
            "takeover_possible_in_ms": (
                None if d is None or self.standby.took_over else max(0, round((d - now) * 1000))
            ),
            "wait_ms": round(self.cfg.dead_ms, 3),
            "fenced_drops": self.fenced_drops + self.node.engine.stats.drops["fenced"],
        }

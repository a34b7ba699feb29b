"""Runs a node as a service: the :class:`~ipsecct.gateway.node.Node`, its control socket, metrics,
signal handling (SIGTERM/SIGINT drain and exit cleanly; SIGHUP reloads the configuration's
live part, gateway/reload.py) and, on a gateway with
``[transfer]``, context transfer: the peer channel pool, the transfer service, fail-over, the
balancer and the virtual-address mover; on a mobile node, the mobile-node agent."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..ct import cxtp
from ..ct.journal import Owner
from ..ct.transfer import UNIT_IKEV2, Identity
from ..errors import ConfigError, ControlError, IkeProtocolError, IpsecctError
from ..ikev2 import context as ike_context
from ..ikev2.context import is_ike_cdb
from ..ikev2.ikesa import IkeSA
from ..ipsec.engine import Tunnel, TunnelState
from ..ipsec.sad import Direction, SecurityAssociation
from ..ipsec.spd import Action, SPDEntry
from . import config as config_mod
from . import gcpolicy
from . import reload as reload_mod
from . import state as state_mod
from .balancer import Balancer
from .cluster_driver import ClusterDriver
from .control import ControlServer, MetricsServer, parse_proto, parse_spi, sa_summary, spi_hint
from .failover_driver import FailoverDriver, is_sync
from .ike import POOL_LEASES_MAX, IkeService
from .log import LoadWarnings, RateLimited, event
from .mobile_agent import MobileAgent
from .node import Node
from .peers import PeerChannels
from .transfer_service import TransferService, forwarded_packet
from .vip import VipMover

log = logging.getLogger("ipsecct.gateway.service")
_SYNC_REFUSED = RateLimited(burst=1, interval=60.0)  # a peer's syncs: 10 a second


def _lacks(section: str, what: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    """A control handler for a command this gateway's configuration does not enable."""

    async def refuse(args: dict[str, Any]) -> Any:
        raise ControlError(f"this gateway has no {section} section: it does no {what}")

    return refuse


NO_IKE = "this node runs no IKEv2 (no [connections] configured)"
# seconds ``sa delete --ike`` waits for the peer to answer the DELETE (the SAs are gone here
# at once; an unanswered DELETE is sent again, as every IKE request, then given up)
IKE_DELETE_WAIT = 2.0
# seconds between two SIGHUP reloads at least: the SIGHUPs within it are one reload at its end
RELOAD_GAP = 1.0


async def _no_ike(args: dict[str, Any]) -> Any:
    raise ControlError(NO_IKE)


class Service:
    def __init__(
        self,
        cfg: config_mod.NodeConfig,
        *,
        role: str = "gateway",
        fresh_state: bool = False,
        sha256: str | None = None,
        log_level: str | None = None,
        load_warnings: LoadWarnings | None = None,
    ) -> None:
        self.cfg = cfg
        # What SIGHUP compares a configuration read again with (reload): the digests of this
        # one as loaded, before anything runs with it; which file it was (a hash of its bytes,
        # never its contents), when it was loaded; the command line's --log-level, which
        # outranks [log] level at a reload as at the start.
        self._prints = reload_mod.Prints.of(cfg)
        self._log_level = log_level
        self.loaded = reload_mod.Loaded(cfg.path, sha256 or "", _utc_now())
        # The load's WARNINGs, each cause said once (a reload says how many hold still), and
        # the restart-only keys a reload warned of, with the value it warned of.
        self._warnings = load_warnings or LoadWarnings()
        self.loaded.warnings = list(self._warnings.current)
        self._restart_told: dict[str, bytes] = {}
        self.node = Node(cfg, role=role)
        # Before any socket opens: merge the configuration with the durable state (tunnels
        # given away stay away, counters resume past what was sent) or refuse to start.
        self.state = state_mod.open_for(self.node, cfg, fresh=fresh_state)
        self.control = ControlServer(cfg.control_socket) if cfg.control_socket else None
        self.metrics = (
            MetricsServer(str(cfg.metrics.host), cfg.metrics.port, self.node.status)
            if cfg.metrics
            else None
        )
        self.stopped = asyncio.Event()
        self._stopping = False
        # SIGHUP before every socket and timer runs: the reload waits for the start's end
        self._running = False
        self._hup_pending = False
        # when the last reload ran (loop time) and the one due at its gap's end
        self._reloaded_at = -math.inf
        self._reload_due: asyncio.TimerHandle | None = None
        self.node.extensions["config"] = lambda: self.loaded.status(self.cfg.log_level)
        # A mobile node's side of context transfer.
        self.agent: MobileAgent | None = MobileAgent(self.node) if role == "node" else None
        # A gateway's context transfer ([transfer]), fail-over ([failover]), load balancing
        # ([transfer.balance]) and virtual address (outer.virtual_interface).
        self.peers: PeerChannels | None = None
        # Per peer: an IKE SA's context waiting for the end of the loop turn, and the messages
        # that came after it (but forwarded packets, opened at once): _peer_message.
        self._behind_ike: dict[str, list[cxtp.Message]] = {}
        self.transfer: TransferService | None = None
        self.failover: FailoverDriver | None = None
        self.balancer: Balancer | None = None
        self.vip: VipMover | None = None
        tcfg = cfg.transfer
        if role != "node" and tcfg is not None:
            if cfg.cluster is not None and cfg.cluster.block() is not None:
                tcfg.settings.spi_block = cfg.cluster.block()  # cluster-unique SPIs
            self.peers = PeerChannels(tcfg, self.node.name, clock=self.node.clock)
            self.transfer = TransferService(self.node, tcfg, self.peers)
            # An activation's aftermath (TransferService.flush_aftermath) goes before any
            # datagram on the outer port that is not ESP (an IKE message, a CTAR), as before
            # every message from a peer but a forwarded packet and every control command.
            self.node.outer_hooks.insert(0, self._outer_first)
            if cfg.virtual is not None and cfg.virtual_interface is not None:
                self.vip = VipMover(
                    self.node, cfg.virtual, cfg.virtual_interface, tcfg.settings.forward_time
                )
                self.transfer.listeners.append(self.vip.on_record)
            if cfg.failover is not None:
                self.failover = FailoverDriver(
                    self.node, cfg.failover, self.peers, self.transfer, tcfg.settings.identity
                )
            if tcfg.balance is not None:
                self.balancer = Balancer(self.node, tcfg.balance, self.transfer)
            # Transfers and take-overs record who sends on a tunnel before they change it.
            self.transfer.core.journal = self.state
            self.state.settled_hooks.append(self.transfer.on_settled)
            self.transfer.core.recall_commits(
                self.state.committed_transfers(), self.node.clock()
            )
            # Tunnels recorded leaving (held since the merge): the gateway each was going to
            # is asked what became of its transfer once the service runs (docs/state.md).
            for (tid, gw), sas in self.state.unresolved_transfers().items():
                tunnels = [t for sa in sas if (t := self.node.engine.tunnel_of(sa)) is not None]
                if gw in tcfg.peers and tunnels:
                    self.transfer.unresolved.append((tid, gw, tunnels))
                elif tunnels:
                    self.state.not_asked(tid, gw, f"peer {gw!r} is not among [[peers]]")
            self.transfer.unresolved_ages = self.state.unresolved_ages()
            if self.failover is not None:
                self.failover.journal = self.state
                if self.failover.standby is not None:
                    self.failover.standby.journal = self.state
            self.peers.on_message = self._peer_message
            self.peers.on_lost = self._peer_lost
            self.peers.on_open = self._peer_open
        if self.transfer is None:
            for tid, gw in self.state.unresolved_transfers():
                self.state.not_asked(tid, gw, "no [transfer] configured")
        # etcd mode ([cluster] etcd): membership, the lease that fences sending, owner keys.
        self.cluster: ClusterDriver | None = None
        if role != "node" and cfg.cluster is not None and cfg.cluster.etcd:
            self.cluster = ClusterDriver(
                self.node,
                cfg.cluster,
                address=str(tcfg.listen) if tcfg is not None else "",
                settings=tcfg.settings if tcfg is not None else None,
            )
            if self.transfer is not None and self.peers is not None and tcfg is not None:
                self.transfer.hold_hooks.append(self.cluster.hold)
                # Replication to every peer member, over the [transfer] channels.
                self.cluster.attach(
                    self.peers, self.transfer, tcfg.settings.identity, list(tcfg.peers)
                )
        # IKEv2 ([connections.NAME]): CHILD SAs keyed by IKE, beside the manual ones.
        self.ike: IkeService | None = (
            IkeService(self.node, cfg.connections) if cfg.connections else None
        )
        if self.ike is not None and self.ike.engine.pools:
            # the virtual IP leases as the last run left them (before any socket opens); an
            # IKE SA online at a crash may live on where it is replicated (a handed-over one
            # was recorded leaving before its COMMIT)
            self.state.attach_pools(
                self.ike.engine.pools,
                elsewhere=cfg.failover is not None
                or (cfg.cluster is not None and bool(cfg.cluster.etcd)),
            )
            self.state.leases_leaving = self.ike.leases_leaving
        if self.ike is not None and self.transfer is not None and self.peers is not None:
            # an IKE SA follows its CHILD SAs when a transfer hands all of them over
            peers = self.peers

            def send_context(peer: str, cdbs: list[bytes], mn: Any) -> None:
                peers.send(peer, cxtp.CTD(mn, 0, tuple(cdbs)))

            self.ike.send_context = send_context

            def forward_ike(peer: str, cdb: bytes, mn: Any) -> None:
                peers.send(peer, cxtp.CTD(mn, 0, (cdb,)))

            self.ike.forward_ike = forward_ike
            self.ike.forward_time = tcfg.settings.forward_time if tcfg is not None else 2.0
            # direct SG identity: an IKE SA that arrives is moved to this gateway's address
            self.ike.direct = tcfg is not None and tcfg.settings.identity is Identity.DIRECT
            self.transfer.listeners.append(self.ike.on_transfer)
            self.transfer.starting.append(self.ike.transfer_started)
            # the MN's IKE request on a quiet IKE SA rolls a prepared transfer back
            self.ike.request_held.append(self.transfer.ike_request_held)
            self.transfer.unit_of = self.ike.transfer_unit
            self.transfer.unit_of_tunnel = self.ike.tunnel_unit
            self.transfer.siblings_of = self.ike.siblings
            # a transfer waits for an IKE exchange of ours in flight on its IKE SAs
            self.transfer.quiesce = self.ike.quiesce
            # an IKE SA goes with its CHILD SAs, or they all stay (UNIT CDBs)
            self.transfer.core.unit_cdbs = self.ike.unit_cdbs
            self.transfer.core.unit_checks[UNIT_IKEV2] = self.ike.check_unit
            self.transfer.core.unit_kept[UNIT_IKEV2] = self.ike.unit_kept
            self.transfer.core.unit_whole[UNIT_IKEV2] = self.ike.check_unit_whole
            # ... and can follow them once they commit (checked at the start and the COMMIT)
            self.transfer.core.commit_check = self.ike.commit_check
            # ... and only after the COMMIT of the transfer that brought them
            self.ike.awaiting_commit = self.transfer.core.awaiting_commit
            # ... and a transfer's end gives back the virtual IPs check_unit reserved
            self.ike.incoming_state = self.transfer.core.incoming_state
            # ... and an IKE SA in a transfer is not deleted under it (sa delete --ike)
            core = self.transfer.core
            self.ike.transfer_role = lambda t: core.tunnel_roles().get(t)
            if self.vip is not None:  # answers from the virtual address wait for its claim
                vip = self.vip
                self.ike.vip_owned = lambda: vip.owned
                vip.on_claimed.append(self.ike.vip_claimed)
        if self.ike is not None and self.failover is not None:
            self.failover.attach_ike(self.ike)  # IKE SAs replicated and taken over too
        if self.ike is not None and self.cluster is not None and self.cluster.replicators:
            self.cluster.attach_ike(self.ike)  # ... in the etcd mode, with their group
        if self.control is not None:
            if self.ike is not None:
                self.control.register("ike.list", self._ike_list)
                self.control.register("ike.delete", self._ike_delete)
                self.control.register("ike.rekey", self._ike_rekey)
                self.control.register("pools.list", self._pools_list)
                self.control.register("pools.release", self._pools_release)
            else:  # every "sa list" asks: an answer, not a refusal logged as a warning each time
                self.control.register("ike.list", _no_ike)
                self.control.register("ike.delete", _no_ike)
                self.control.register("ike.rekey", _no_ike)
                self.control.register("pools.list", _no_ike)
                self.control.register("pools.release", _no_ike)
            for name, h in {
                "status": self._status,
                "sa.list": self._sa_list,
                "sa.show": self._sa_show,
                "sa.export": self._sa_export,
                "sa.add": self._sa_add,
                "sa.delete": self._sa_delete,
                "sa.discard": self._sa_discard,
                "pmtu.set": self._pmtu_set,
                "clock": self._clock,
            }.items():
                self.control.register(name, h)
            if self.failover is not None:
                self.control.register("failover.alone", self._failover_alone)
            else:  # say what is missing, not "unknown command 'failover.alone'"
                self.control.register("failover.alone", _lacks("[failover]", "fail-over"))
            if self.transfer is not None:
                self.control.before.append(self.transfer.flush_aftermath)
                self.control.register("transfer", self.transfer.control_transfer)
                self.control.register("rebalance", self.transfer.control_rebalance)
                self.control.register("transfer.wait", self.transfer.control_wait)
                self.control.register("transfer.commit", self.transfer.control_commit)
                self.control.register("transfer.cancel", self.transfer.control_cancel)
            else:
                for cmd in ("transfer", "rebalance", "transfer.wait", "transfer.commit",
                            "transfer.cancel"):  # fmt: skip
                    self.control.register(cmd, _lacks("[transfer]", "context transfer"))

    async def start(self) -> None:
        if self.peers is not None:
            self.peers.load_credentials()  # before any socket is bound
        if self.control is not None:
            self.control.check()  # another daemon on the socket: before any tunnel runs
        await self.state.start()
        await self.node.start()
        if self.control is not None:
            await self.control.start()
        if self.metrics is not None:
            await self.metrics.start()
        if self.ike is not None:
            await self.ike.start()
        if self.cluster is not None:
            await self.cluster.start()
        await self.start_context_transfer()
        # Logged once everything is bound and running: a port in use anywhere above is one
        # error line and a non-zero exit, never "started" and then an error.
        event(
            log,
            "started",
            node=self.node.name,
            role=self.node.role,
            outer=self.node.cfg.outer,
            tunnels=len(self.node.cfg.tunnels),
        )

    async def start_context_transfer(self) -> None:
        """Listen for peer gateways and start the transfer, fail-over and balancing timers
        (nothing on a node without ``[transfer]``)."""
        if self.peers is None or self.transfer is None:
            return
        await self.peers.start()
        await self.transfer.start()
        if self.failover is not None:
            await self.failover.start()
        if self.balancer is not None:
            await self.balancer.start()
        tcfg = self.peers.tcfg
        event(
            log,
            "transfer-listening",
            node=self.node.name,
            listen=tcfg.listen,
            peers=",".join(tcfg.peers),
        )

    async def stop_context_transfer(self) -> None:
        if self.vip is not None:
            self.vip.close()
        if self.balancer is not None:
            await self.balancer.stop()
        if self.failover is not None:
            await self.failover.stop()
        if self.transfer is not None:
            await self.transfer.stop()
        if self.peers is not None:
            await self.peers.stop()

    def _outer_first(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        assert self.transfer is not None
        self.transfer.flush_aftermath()
        return False  # (for the hooks after this one)

    def _peer_message(self, peer: str, msg: cxtp.Message) -> None:
        if self.transfer is not None and not forwarded_packet(msg):
            # an activation's aftermath goes first (the forwarded packets behind its COMMIT
            # go out before it: TransferService._activated)
            self.transfer.flush_aftermath()
        queued = self._behind_ike.get(peer)
        if queued is not None:
            # An IKE SA's import from this peer waits for the end of this loop turn: the
            # packets it forwarded after the context (the same read) are opened first; every
            # other message keeps its place behind the import (the channel's order). Once a
            # transfer's message waits too, so do the forwards after it (a FORWARD after a
            # later COMMIT must not come before that COMMIT).
            if forwarded_packet(msg) and all(_ike_message(m) for m in queued):
                self._handle_peer_message(peer, msg)
            else:
                queued.append(msg)
            return
        if (self.ike is not None and isinstance(msg, cxtp.CTD) and _ike_message(msg)
                and not (len(msg.cdbs) == 1 and ike_context.is_forward(msg.cdbs[0]))):  # fmt: skip
            # An IKE SA's context follows the COMMIT of its CHILD SAs, which are active here
            # already (the import refuses one whose COMMIT has not come): taking it (and the
            # MOBIKE announcement, ~1-3 ms of CPU) in a step of its own lets the MN's packets
            # that sg1 forwarded behind it (same read) be opened before it, not after.
            self._behind_ike[peer] = [msg]
            asyncio.get_running_loop().call_soon(self._flush_behind_ike, peer)
            return
        self._handle_peer_message(peer, msg)

    def _flush_behind_ike(self, peer: str) -> None:
        """The deferred IKE import from ``peer`` and what came after it (but forwarded
        packets), in the channel's order; at most what one loop turn's reads decoded."""
        queued = self._behind_ike.pop(peer, None)
        if queued and self.transfer is not None:
            self.transfer.flush_aftermath()  # (an activation since: its aftermath first)
        for msg in queued or ():
            try:
                self._handle_peer_message(peer, msg)
            except Exception as exc:
                # As a handler raising in the channel's delivery: the messages after it are
                # not handed over and the channel is dropped (the peer is lost, and
                # reconnects).
                event(log, "peer-message-failed", logging.ERROR, node=self.node.name,
                      peer=peer, error=type(exc).__name__)  # fmt: skip
                conn = self.peers.conns.get(peer) if self.peers is not None else None
                if conn is not None:
                    conn.abort()
                return

    def _handle_peer_message(self, peer: str, msg: cxtp.Message) -> None:
        if self.ike is not None and _ike_message(msg):
            assert isinstance(msg, cxtp.CTD)
            self.ike.receive_context(peer, list(msg.cdbs))
            return
        assert self.transfer is not None
        if is_sync(msg):
            assert isinstance(msg, cxtp.CTD)
            if self.failover is not None:
                self.failover.receive(peer, msg)
            elif self.cluster is None or not self.cluster.receive(peer, msg):
                self.transfer.refuse()
                if self.cluster is None:  # a configuration mismatch: say so, a few times
                    _SYNC_REFUSED.event(
                        log, "failover-sync-refused", logging.WARNING, key=peer, peer=peer,
                        detail=f"{peer} replicates to this gateway as its fail-over standby, "
                        "and this gateway has no [failover]: it stays fenced (sends nothing)"
                        f' until this one runs role = "standby" with peer = "{peer}"',
                    )
            return
        self.transfer.receive(peer, msg)

    async def _failover_alone(self, args: dict[str, Any]) -> Any:
        """``ipsecct failover alone``: the standby is down for good; run without it."""
        assert self.failover is not None
        if args.get("standby_is_down") is not True:
            raise ControlError(
                "say --standby-is-down: only once the standby's process is stopped (a standby "
                "alive behind a partition would take over too)"
            )
        destroyed = args.get("standby_destroyed", False)
        if not isinstance(destroyed, bool):
            raise ControlError("standby_destroyed must be true or false")
        return self.failover.go_alone(self.node.clock(), destroyed=destroyed)

    def _peer_open(self, peer: str) -> None:
        if self.failover is not None:
            self.failover.peer_open(peer)

    def _peer_lost(self, peer: str) -> None:
        assert self.transfer is not None
        self._flush_behind_ike(peer)  # what the peer sent before it went, in order
        if self.failover is not None:
            self.failover.peer_lost(peer)
        if self.cluster is not None:
            self.cluster.peer_lost(peer)
        self.transfer.peer_lost(peer)

    async def stop(self) -> None:
        if self.transfer is not None:
            self.transfer.flush_aftermath()
        for peer in list(self._behind_ike):
            self._flush_behind_ike(peer)
        if self.failover is not None:
            self.failover.stopping()  # no JOIN from a gateway on its way out
        if self.ike is not None:
            await self.ike.stop()  # DELETEs to the IKE peers (not when a standby holds them)
        if self.cluster is not None:
            await self.cluster.stop()  # revokes the lease: the survivors may take over at once
        await self.stop_context_transfer()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.control is not None:
            await self.control.stop()
        await self.node.stop()
        await self.state.stop()
        self.stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = RateLimited()

        def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            # asyncio reports accept() failures (EMFILE, ...) here, once per attempt, with a
            # traceback: one line instead, and only a few of them.
            exc = context.get("exception")
            quiet.event(
                log,
                "event-loop-error",
                logging.ERROR,
                key=str(context.get("message", "")),
                message=context.get("message", ""),
                error="" if exc is None else f"{type(exc).__name__}: {exc}",
            )

        loop.set_exception_handler(on_loop_error)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP reloads the configuration, as charon, sshd and nginx do (its default killed
        # the process at once, without a word and leaving its socket behind; then it drained
        # and exited, which tore down every tunnel of an operator who meant a reload)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await self.start()
        except BaseException:
            # a start that failed half-way (an address in use, ...) leaves no control socket
            # behind: ipsecct status found it and said "Connection refused"
            if self.control is not None and self.control.listening:
                await self.control.stop()
            raise
        gcpolicy.POLICY.settle()  # start-up state leaves the collector's generations
        self._running = True
        if self._hup_pending:
            self._on_sighup()
        try:
            await stop.wait()
        finally:
            self._stopping = True
            if self._reload_due is not None:
                self._reload_due.cancel()
                self._reload_due = None
            event(log, "shutdown", node=self.node.name)
            await self.stop()

    def _on_sighup(self) -> None:
        """A SIGHUP: a reload now, or, within RELOAD_GAP of the last one, one reload at the
        gap's end that every SIGHUP meanwhile joins (``coalesced``): it reads the file as it
        is then, so the last one written runs. A storm of SIGHUPs (100 a second) is a reload
        and its lines a second, not a hundred."""
        if self._stopping:
            return
        if not self._running:
            self._hup_pending = True
            return
        self._hup_pending = False
        if self._reload_due is not None:
            self.loaded.coalesced += 1
            return
        loop = asyncio.get_running_loop()
        due = self._reloaded_at + RELOAD_GAP
        if loop.time() < due:
            self._reload_due = loop.call_at(due, self._reload_at_gap_end)
            return
        self._reload_now()

    def _reload_at_gap_end(self) -> None:
        self._reload_due = None
        if not self._stopping:
            self._reload_now()

    def _reload_now(self) -> None:
        self._reloaded_at = asyncio.get_running_loop().time()
        try:
            self.reload()
        except Exception as exc:  # a bug, never a traceback: one line, the old configuration
            self.loaded.reloads_failed += 1
            event(log, "reload-failed", logging.ERROR, node=self.node.name,
                  config=self.cfg.path, error=type(exc).__name__,
                  effect="the running configuration is kept")  # fmt: skip

    def reload(self) -> bool:
        """SIGHUP: the configuration file the gateway started with, read and checked again
        (the same loader, every key); its live part applied whole, or nothing (an invalid
        file: one ERROR line naming the file and the key, the running configuration kept).
        A restart-only key that changed is one WARNING line each, its running value kept
        (gateway/reload.py: sequence numbers, reservations, leases, ownership and fencing
        depend on those keys only). True when the live part was applied."""
        from .control import socket_path
        from .log import setup

        path = self.cfg.path
        still = 0
        try:
            new, sha, still = self._load(path)
            if new.control_socket is None and self.cfg.control_socket is not None:
                new.control_socket = socket_path(None)  # as run() made it at the start
            if self._log_level is not None:
                new.log_level = self._log_level
            running_pools = set(self.ike.engine.pools) if self.ike is not None else set()
            plan = reload_mod.plan(self._prints, self.cfg.connections, new, running_pools)
        except ConfigError as exc:
            self.loaded.reloads_failed += 1
            event(log, "reload-failed", logging.ERROR, node=self.node.name, config=path,
                  error=str(exc), effect="the running configuration is kept")  # fmt: skip
            return False
        if self.ike is None and plan.connections:
            # (no IKE service runs: no socket for IKE is bound, no timer; it starts with the
            # process)
            assert plan.prints is not None
            pending = {**plan.pending,
                       "connections": reload_mod.digest(plan.prints.connections)}  # fmt: skip
            plan = reload_mod.Plan([], needs_restart=[*plan.needs_restart, "connections"],
                                   prints=reload_mod.Prints(plan.prints.restart, {}),
                                   pending=pending)  # fmt: skip
        # One line per key and value waiting for a restart: the reloads after it say it
        # still waits (event=reloaded needs_restart, WARNING), not a line of it each.
        told: dict[str, bytes] = {}
        for key in plan.needs_restart:
            told[key] = plan.pending.get(key, b"")
            if key not in self._restart_told or self._restart_told[key] != told[key]:
                event(log, "reload-needs-restart", logging.WARNING, node=self.node.name,
                      config=path, key=key,
                      effect="needs a restart: the running value is kept")  # fmt: skip
        self._restart_told = told
        # The live part, whole (nothing below raises: every value was checked above).
        cfg = self.cfg
        if self.ike is not None:
            eng = self.ike.engine
            eng.cookie_threshold = new.cookie_threshold
            eng.max_packet = new.ike_max_packet
            eng.fragment_size = new.ike_fragment_size
            eng.rsa_pss = new.rsa_pss
            for running, read in plan.kept:
                reload_mod.refresh_secrets(running, read)
            self.ike.reload(plan.connections, plan.added, plan.removed)
        cfg.connections = plan.connections
        cfg.cookie_threshold = new.cookie_threshold
        cfg.ike_max_packet = new.ike_max_packet
        cfg.ike_fragment_size = new.ike_fragment_size
        cfg.rsa_pss = new.rsa_pss
        cfg.log_level = new.log_level
        assert plan.prints is not None
        self._prints = plan.prints
        self.loaded.sha256, self.loaded.loaded_at = sha, _utc_now()
        self.loaded.needs_restart = plan.needs_restart
        self.loaded.reloads += 1
        event(log, "reloaded", logging.WARNING if plan.needs_restart else logging.INFO,
              node=self.node.name, config=path, sha256=sha[:16],
              connections=len(plan.connections), added=len(plan.added),
              removed=len(plan.removed), changed=len(plan.changed),
              log_level=new.log_level,
              needs_restart=",".join(plan.needs_restart) or "-",
              **({"warnings_still": still} if still else {}))  # fmt: skip
        setup(new.log_level)  # (after the line: said at the level the operator had set)
        return True

    def _load(self, path: str) -> tuple[config_mod.NodeConfig, str, int]:
        """The file loaded again, its WARNINGs each said once (LoadWarnings): returns the
        configuration, its SHA-256 and how many of its warnings were said before and hold
        still."""
        held = self._warnings.hold()
        try:
            new, sha = config_mod.load_hashed(path)
        except BaseException:
            self._warnings.release(held, complete=False)
            self.loaded.warnings = list(self._warnings.current)
            raise
        still = self._warnings.release(held)
        self.loaded.warnings = list(self._warnings.current)
        return new, sha, still

    # -- control handlers --------------------------------------------------------------
    async def _ike_list(self, args: dict[str, Any]) -> Any:
        assert self.ike is not None
        return self.ike.list()

    async def _ike_delete(self, args: dict[str, Any]) -> Any:
        """``ipsecct sa delete --ike NAME|SPI`` or ``--ike-id N`` (as ``swanctl --terminate
        --ike`` / ``--ike-id``): each IKE SA named is deleted, its CHILD SAs with it, and the
        peer told; the answer waits a moment for the peer's (``answered``). Nothing is
        deleted when one of them may not be (in a transfer, this gateway fenced)."""
        assert self.ike is not None
        what, uid = args.get("ike"), args.get("ike_id")
        if (what is None) == (uid is None):
            raise ControlError("name the IKE SA: ike (a connection or an SPI) or ike_id")
        ikes = self._named_ikes(what, uid)
        now = self.node.clock()
        for ike in ikes:
            why = self.ike.terminate_refusal(ike, now)
            if why is not None:
                raise ControlError(why)
        return await self.ike.terminate(ikes, IKE_DELETE_WAIT)

    def _named_ikes(self, what: Any, uid: Any) -> list[IkeSA]:
        """The IKE SAs a control request names by ``ike`` (a connection or an SPI) or
        ``ike_id`` (the #N of ``sa list --ike``), one of them given (IkeService.find);
        ControlError, saying why, for a value of the wrong kind or nothing named."""
        assert self.ike is not None
        if what is not None and (not isinstance(what, str) or not 0 < len(what) <= 256):
            raise ControlError("ike must be a connection's name or an SPI")
        if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool)):
            raise ControlError("ike_id must be a number (the #N of ipsecct sa list --ike)")
        try:
            return self.ike.find(what, uid)
        except ValueError as exc:
            raise ControlError(str(exc)) from None

    async def _ike_rekey(self, args: dict[str, Any]) -> Any:
        """``ipsecct sa rekey SPI`` (a CHILD SA, by its SPI either way, as ``swanctl --rekey
        --child``) or ``--ike NAME|SPI`` / ``--ike-id N`` (the IKE SA, as ``swanctl --rekey
        --ike``): the CREATE_CHILD_SA request is sent now; the answer says which SA it rekeys.
        The new SA is listed once the peer has answered (``sa list --ike``)."""
        assert self.ike is not None
        spi, what, uid = args.get("spi"), args.get("ike"), args.get("ike_id")
        if sum(x is not None for x in (spi, what, uid)) != 1:
            raise ControlError("name the SA: spi (a CHILD SA), ike (a connection or an IKE"
                               " SPI) or ike_id")  # fmt: skip
        child = None
        if spi is not None:
            try:
                ike, child = self.ike.child_named(parse_spi(spi))
            except ValueError as exc:
                raise ControlError(str(exc)) from None
            ikes = [ike]
        else:
            ikes = self._named_ikes(what, uid)
        rows = []
        for ike in ikes:
            try:
                self.ike.rekey(ike, child)
            except IkeProtocolError as exc:
                name = (f"CHILD SA 0x{child.spi_in:08x}" if child is not None
                        else f"IKE SA {ike.conn.name} #{ike.uid}")  # fmt: skip
                raise ControlError(f"{name}: {exc}") from None
            rows.append({"name": ike.conn.name, "uid": ike.uid, "spi_i": ike.spi_i.hex(),
                         "spi_r": ike.spi_r.hex(),
                         "child": None if child is None else f"0x{child.spi_in:08x}"})
        return rows

    async def _pools_list(self, args: dict[str, Any]) -> Any:
        """``ipsecct pools [--leases]``: the virtual IP pools, and each lease."""
        assert self.ike is not None
        leases = args.get("leases", False)
        if not isinstance(leases, bool):
            raise ControlError("leases must be true or false")
        limit = args.get("limit")  # (None: the default, POOL_LEASES_LISTED)
        if limit is not None and (type(limit) is not int or not 1 <= limit <= POOL_LEASES_MAX):
            raise ControlError(f"limit must be a whole number from 1 to {POOL_LEASES_MAX}")
        return self.ike.pools(leases, limit)

    async def _pools_release(self, args: dict[str, Any]) -> Any:
        """``ipsecct pools --release ADDR``: an away address leased here again."""
        assert self.ike is not None
        addr = args.get("address")
        if not isinstance(addr, str):
            raise ControlError("say which address")
        try:
            return self.ike.give_back(addr)
        except ValueError as exc:
            raise ControlError(str(exc)) from None

    async def _clock(self, args: dict[str, Any]) -> Any:
        """This machine's monotonic clock (one for every process) and the event loop's CPU
        time, read on the loop: what ``transfer.wait``'s times compare with."""
        return {"monotonic": time.monotonic(), "cpu_s": time.thread_time()}

    async def _status(self, args: dict[str, Any]) -> Any:
        return self.node.status()

    def _sa_states(self) -> dict[int, tuple[str, str]]:
        """id(SA) -> what its tunnel is doing, for those not simply installed: held because
        its transfer's outcome is unknown (unresolved), in a transfer (leaving, arriving),
        moved away (forwarding what still comes), or held otherwise (fencing)."""
        roles = self.transfer.core.tunnel_roles() if self.transfer is not None else {}
        unresolved = self.state.unresolved_states()
        out: dict[int, tuple[str, str]] = {}
        eng = self.node.engine
        for sa in eng.sad:
            t = eng.tunnel_of(sa)
            if t is None:
                continue
            st = unresolved.get(id(t.outbound)) or roles.get(t)
            if st is None:
                if t.state is TunnelState.MOVED:
                    st = ("moved", f"transferred to {t.forward_to}, forwarding what still comes")
                elif t.state is TunnelState.HELD:
                    st = ("held", "fenced or paused: nothing sent")
                else:
                    continue
            out[id(sa)] = st
        return out

    async def _sa_list(self, args: dict[str, Any]) -> Any:
        now = self.node.clock()
        states = self._sa_states()
        return [
            sa_summary(sa, now, states.get(id(sa), ("installed", "")))
            for sa in self.node.engine.sad
        ]

    def _find(self, args: dict[str, Any]) -> list[SecurityAssociation]:
        spi = parse_spi(args.get("spi"))
        sas = self.node.engine.find_sa(spi)
        if not sas:
            raise ControlError(f"no SA with SPI 0x{spi:08x}{spi_hint(args.get('spi'))}")
        return sas

    def _find_one(self, args: dict[str, Any]) -> list[SecurityAssociation]:
        """The SAs of the one SA or tunnel an operator names by its SPI (``sa show``, ``sa
        delete``), and by its destination (``dst``) when the SPI names more than one: a
        peer chooses the SPI of our outbound SA (any 32 bits, another tunnel's among them;
        the SAD tells them apart by destination). ControlError, saying which, when ``dst``
        is wanted or matches none; a tunnel's two SAs with one SPI are one thing named."""
        sas = self._find(args)
        spi = sas[0].spi
        dst = args.get("dst")
        if dst is not None:
            try:
                addr = ipaddress.ip_address(dst) if isinstance(dst, str) else None
            except ValueError:
                addr = None
            if addr is None:
                raise ControlError(f"bad destination {dst!r} (an IPv4 or IPv6 address)")
            named = [sa for sa in sas if sa.dst == addr]
            if not named:
                raise ControlError(f"no SA with SPI 0x{spi:08x} to {addr} (it names SAs to "
                                   + ", ".join(sorted({str(sa.dst) for sa in sas})) + ")")
            sas = named
        proto = parse_proto(args.get("proto"))
        if proto is not None:
            named = [sa for sa in sas if sa.protocol is proto]
            if not named:
                raise ControlError(f"no {proto.name} SA with SPI 0x{spi:08x}"
                                   + (f" to {dst}" if dst is not None else "") + " (it names "
                                   + ", ".join(sorted({sa.protocol.name for sa in sas}))
                                   + " SAs)")  # fmt: skip
            sas = named
        eng = self.node.engine
        if len({id(eng.tunnel_of(sa) or sa) for sa in sas}) > 1:
            each = ", ".join(f"{sa.protocol.name} {sa.direction.value} to {sa.dst}"
                             f" ({sa.name or 'no name'})" for sa in sas)  # fmt: skip
            raise ControlError(f"SPI 0x{spi:08x} names {len(sas)} SAs here ({each}): a peer"
                               " chooses our outbound SAs' SPIs, and may choose another's;"
                               " name one by its destination as well (--dst ADDR; and"
                               " --proto esp|ah, for an ESP and an AH SA to one destination;"
                               " see ipsecct sa list)")  # fmt: skip
        return sas

    async def _sa_show(self, args: dict[str, Any]) -> Any:
        now = self.node.clock()
        states = self._sa_states()
        return [
            sa_summary(sa, now, states.get(id(sa), ("installed", "")))
            for sa in self._find_one(args)
        ]

    async def _sa_export(self, args: dict[str, Any]) -> Any:
        from ..tools.keyfile import format_line

        # Keys leave the process only here, on the operator's request, over the 0600 socket.
        return [format_line(sa) for sa in self.node.engine.sad]

    async def _sa_add(self, args: dict[str, Any]) -> Any:
        from ..ct import context

        now = self.node.clock()
        try:
            sa = context.from_json(args.get("context"), now)
        except IpsecctError as exc:
            raise ControlError(f"bad SA: {exc}") from None
        eng = self.node.engine
        # As config load keeps it from sending: a key whose IV is the sequence number, used
        # by another SA here, has sequence numbers 1, 2, ... encrypted twice under it: by
        # this gateway and its peer (the other direction: the peer's key given as ours), or
        # by this gateway twice (two outbound SAs). (Two inbound SAs under one key may be
        # one peer's SA to two of our addresses: only that peer encrypts.) Named, never
        # shown.
        users = [u for u in eng.sad.users_of_key(sa)
                 if u.direction is not sa.direction or sa.direction is Direction.OUTBOUND]
        if users:
            o = next((u for u in users if u.direction is not sa.direction), users[0])
            kind = "AEAD" if sa.aead else "AES-CTR"
            if o.direction is not sa.direction:
                who = "this gateway and its peer would both encrypt under it"
            else:
                who = "this gateway would encrypt under it for both SAs"
            event(log, "sa-add-refused", logging.WARNING, node=self.node.name,
                  spi=f"0x{sa.spi:08x}", direction=sa.direction.value,
                  reason=f"key-of-{o.direction.value}-sa", other=f"0x{o.spi:08x}")  # fmt: skip
            raise ControlError(
                f"SA 0x{sa.spi:08x} ({sa.direction.value}bound): its {kind} key is the key of"
                f" {o.direction.value}bound SA 0x{o.spi:08x} here: {who}, each nonce twice"
                " (give each SA its own key)"
            )
        if sa.direction is Direction.OUTBOUND:
            if sa.selectors is None:
                raise ControlError("an outbound SA needs selectors to make its policy")
            entry = SPDEntry(sa.selectors, Action.PROTECT, name=sa.name, static=False)
            try:  # (an outbound SPI another tunnel here has, to any destination: refused)
                tunnel = eng.add_tunnel(entry, sa, None, index=0, own_outbound_spi=True)
            except IpsecctError as exc:
                raise ControlError(str(exc)) from None
            try:
                self.state.added(sa)  # reserved and recorded before it can send
            except IpsecctError as exc:
                eng.remove_tunnel(tunnel)
                raise ControlError(str(exc)) from None
        else:
            eng.add_sa(sa)  # (a moved tunnel's relay of its SPI yields to it)
        event(
            log,
            "sa-added",
            node=self.node.name,
            spi=f"0x{sa.spi:08x}",
            direction=sa.direction.value,
        )
        out = sa_summary(sa, now)
        warning = self._dst_not_ours(sa)
        if warning is not None:
            out["warning"] = warning
        return out

    def _dst_not_ours(self, sa: SecurityAssociation) -> str | None:
        """An inbound SA whose destination is none of this gateway's addresses: what to tell
        the operator (None: nothing). Not refused: the kernel takes any daddr too, and the
        engine finds an inbound SA by its SPI alone when (dst, SPI) misses (RFC 4301 §4.1:
        NAT, and an SA taken over from another gateway keeps that gateway's address); but a
        peer sending to that address reaches this gateway only if it is routed here."""
        if sa.direction is not Direction.INBOUND:
            return None
        ours = config_mod.own_addresses(self.cfg)
        if sa.dst in ours or any(a.is_unspecified and a.version == sa.dst.version
                                 for a in ours):  # fmt: skip
            return None
        shown = ", ".join(str(a) for a in ours)
        event(log, "sa-added-dst-not-ours", logging.WARNING, node=self.node.name,
              spi=f"0x{sa.spi:08x}", dst=str(sa.dst), ours=shown)  # fmt: skip
        return (f"SA 0x{sa.spi:08x}: its destination {sa.dst} is none of this gateway's"
                f" addresses ({shown}): it receives only what its peer sends here")

    def _discard_unresolved(self, tunnel: Tunnel, owner: Owner, detail: str) -> None:
        """Out of the engine, no longer asked about, recorded ``owner`` (raises
        ControlError if that could not be written: still leaving on disk)."""
        if self.transfer is not None:
            self.transfer.core.forget_unresolved(tunnel)
        self.node.engine.remove_tunnel(tunnel)
        try:
            self.state.discard(tunnel, owner, detail)
        except IpsecctError as exc:
            raise ControlError(f"removed, but {exc}") from None

    async def _sa_discard(self, args: dict[str, Any]) -> Any:
        """``sa discard``: tunnels held because the outcome of the transfer that was moving
        them is unknown (``state.unresolved``), by SPI or all those recorded going to one
        peer, are given up: never sent on here again (safe whatever the outcome; at worst
        nobody serves them until they are re-keyed). Resuming one is not offered: only the
        peer's "not taken" makes that safe."""
        eng = self.node.engine
        peer = args.get("peer")
        if peer is not None and not isinstance(peer, str):
            raise ControlError("peer must be a name")
        unresolved = self.state.plan.unresolved
        if peer is not None:
            picked = [(n, r) for n, r in unresolved.items() if r.gateway == peer]
            if not picked:
                raise ControlError(f"no unresolved tunnel was going to {peer!r}")
        else:
            # Any SPI of the tunnel, as sa show and sa delete take it (its inbound SPI, ours,
            # or its outbound one; --dst and --proto where it names SAs of several tunnels):
            # it looked up the outbound SPI alone, the peer's choice, which an operator
            # reading swanctl's or the peer's side does not have at hand.
            sas = self._find_one(args)
            tunnel = eng.tunnel_of(sas[0])
            name = self.state.unresolved_sa(tunnel.outbound) if tunnel is not None else None
            row = unresolved.get(name) if name is not None else None
            if name is None or row is None:
                raise ControlError(
                    f"0x{sas[0].spi:08x} is an SA that is not unresolved (sa discard gives up"
                    " only tunnels held because their transfer's outcome is unknown; see"
                    " state.unresolved)"
                )
            picked = [(name, row)]
        out = []
        for name, row in picked:
            sa = self.state.held_sa(name)
            tunnel = eng.tunnel_of(sa) if sa is not None else None
            if tunnel is None:
                continue
            detail = (
                f"discarded by the operator (transfer {row.transfer:016x} to"
                f" {row.gateway or '?'}: outcome unknown)"
            )
            self._discard_unresolved(tunnel, Owner.AWAY, detail)
            out.append(f"0x{row.spi:08x}")
            event(
                log, "transfer-discarded", logging.WARNING, node=self.node.name, tunnel=name,
                spi=f"0x{row.spi:08x}", peer=row.gateway or "?", id=f"{row.transfer:016x}",
                effect="never sent on here again (re-key it to serve it)",
            )
        return out

    async def _sa_delete(self, args: dict[str, Any]) -> Any:
        eng = self.node.engine
        out = []
        returned: set[int] = set()  # SAs of tunnels left with their transfer's source
        for sa in self._find_one(args):
            if id(sa) in returned:
                continue
            tunnel = eng.tunnel_of(sa)
            if tunnel is not None and self.state.unresolved_sa(sa) is not None:
                # held, its transfer's outcome unknown: deleted, and no longer asked about
                self._discard_unresolved(tunnel, Owner.DELETED, "deleted by sa delete")
                out.append(f"0x{sa.spi:08x}")
                event(log, "sa-deleted", node=self.node.name, spi=f"0x{sa.spi:08x}")
                continue
            if tunnel is not None and self.transfer is not None:
                # Installed by a transfer towards us, not active yet: its COMMIT must not
                # activate it. Before the COMMIT the transfer is cancelled (the source keeps
                # its tunnels); nothing here was ours to delete or record.
                core = self.transfer.core
                taken = core.withdraw(tunnel, self.node.clock(), "sa delete")
                if taken is not None:
                    what, outputs = taken
                    self.transfer.run(outputs)
                    event(
                        log, "sa-deleted", logging.WARNING, node=self.node.name,
                        spi=f"0x{sa.spi:08x}", detail=what,
                    )
                    if outputs:
                        returned.update(id(x) for x in tunnel.sas())
                        out.append(f"0x{sa.spi:08x} ({what})")
                        continue
            found = self.ike.child_of(tunnel) if tunnel is not None and self.ike else None
            if found is not None and tunnel is not None:
                # IKE-keyed: a DELETE to the peer, and the IKE SA forgets the CHILD SA (the
                # engine's ChildDown removes the tunnel, as when the peer deletes it)
                try:
                    self.ike.delete_child(*found)  # type: ignore[union-attr]  # (found: self.ike)
                except IpsecctError as exc:
                    raise ControlError(f"0x{sa.spi:08x}: {exc}") from None
                returned.update(id(x) for x in tunnel.sas())
                out.append(f"0x{sa.spi:08x}")
                event(log, "sa-deleted", node=self.node.name, spi=f"0x{sa.spi:08x}",
                      detail="CHILD SA deleted, DELETE sent to the peer")  # fmt: skip
                continue
            if tunnel is not None:
                eng.remove_tunnel(tunnel)
            elif eng.sad.lookup(sa.dst, sa.protocol, sa.spi) is sa:
                eng.sad.remove(sa)
            if sa.direction is Direction.OUTBOUND:
                try:
                    self.state.deleted(sa)  # stays deleted across a restart
                except IpsecctError as exc:
                    raise ControlError(f"deleted, but {exc}") from None
            out.append(f"0x{sa.spi:08x}")
            event(log, "sa-deleted", node=self.node.name, spi=f"0x{sa.spi:08x}")
        return out

    async def _pmtu_set(self, args: dict[str, Any]) -> Any:
        spi = parse_spi(args.get("spi"))
        mtu = args.get("mtu")
        if isinstance(mtu, bool) or not isinstance(mtu, int):  # (true was "path MTU True")
            raise ControlError("mtu must be a whole number of octets")
        sas = self._find_one(args)  # (one tunnel's, or the one SA --dst names)
        try:
            n = self.node.engine.set_path_mtu(spi, mtu, sas=sas)
        except IpsecctError as exc:
            raise ControlError(str(exc)) from None
        event(log, "pmtu-set", node=self.node.name, spi=f"0x{spi:08x}", mtu=mtu)
        return {"changed": n}


# What the listeners may hold open at once (CXTP, metrics, control) plus the gateway's own
# sockets, TUN device and files: RLIMIT_NOFILE must leave room for all of it.
NOFILE_NEEDED = 1024


def run(
    path: str, role: str, *, fresh_state: bool = False, log_level: str | None = None
) -> int:
    """Run the node of configuration ``path`` until SIGTERM/SIGINT. ``log_level`` (the
    command line's ``--log-level`` or ``-v``) overrides the configuration's ``[log] level``."""
    from .control import socket_path
    from .limits import no_core_dumps, raise_nofile
    from .log import LOG_LEVELS, setup

    no_core_dumps()  # before any key is read
    # (the load's WARNINGs are written once the log is set up, as every line; a reload
    # does not write them again while they hold: LoadWarnings)
    warned = LoadWarnings()
    held = warned.hold()
    try:
        cfg, sha = config_mod.load_hashed(path)
        if log_level is not None:
            if log_level not in LOG_LEVELS:
                raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
            cfg.log_level = log_level
        setup(cfg.log_level)
    finally:
        warned.release(held)
    shape = config_mod.node_shape(cfg) if role == "gateway" else None
    if shape is not None:  # (not refused: a gateway in front of one host looks the same)
        event(log, "config-looks-like-a-node", logging.WARNING, config=path, why=shape,
              hint="a mobile node runs with: ipsecct node run --config FILE")  # fmt: skip
    if cfg.control_socket is None:
        cfg.control_socket = socket_path(None)  # the one the client commands look for
    raise_nofile(NOFILE_NEEDED)
    gcpolicy.POLICY.enabled = True  # this process is a gateway
    svc = Service(cfg, role=role, fresh_state=fresh_state, sha256=sha, log_level=log_level,
                  load_warnings=warned)  # fmt: skip
    asyncio.run(svc.run_forever())
    return 0


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ike_message(msg: cxtp.Message) -> bool:
    """An IKE SA's context, or an IKE message the peer forwarded (the IKE adapter's)."""
    return isinstance(msg, cxtp.CTD) and bool(msg.cdbs) and all(is_ike_cdb(c) for c in msg.cdbs)

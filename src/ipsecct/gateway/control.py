"""The local control socket and the Prometheus metrics endpoint of a running node.

Control protocol: JSON lines over a Unix-domain socket (mode 0600). A request is
``{"cmd": NAME, "args": {...}}``; the answer is ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. A client that sends garbage gets an error answer and the
server carries on; a line longer than 1 MiB closes that connection.

Commands register themselves in :attr:`ControlServer.handlers`, so the context-transfer layer
adds its own (``transfer``, ``rebalance``) without this module knowing about them.

Where the socket lives: by default in a directory only the gateway's user can write
(:func:`runtime_dir`: ``/run/ipsecct`` for root, ``$XDG_RUNTIME_DIR/ipsecct`` otherwise, made
with mode 0700), as ``ipsecct.sock``; a ``control.socket`` without a slash names a socket in that
directory. The client (:func:`request`) talks only to a socket, in a directory, that belong to
its own user, and checks the daemon's credentials on the connection (SO_PEERCRED): a socket
planted by another user never receives a request (``sa add`` carries keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import string
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import ControlError, IpsecctError
from ..ipsec.algorithms import enc_name, integ_name, swanctl_algorithms
from ..ipsec.sad import Direction, Protocol, SecurityAssociation
from .limits import ConnectionLimits, bind_error, source_of
from .log import RateLimited, event

log = logging.getLogger("ipsecct.gateway.control")

MAX_LINE = 1 << 20
MAX_CLIENTS = 64  # control connections at once (the socket is the gateway's user's only)
IDLE_TIMEOUT = 300.0  # s a control connection may stay silent
DRAIN_TIMEOUT = 30.0  # s an answer may wait for its reader
SOCKET_NAME = "ipsecct.sock"
SUN_PATH_MAX = 108  # sockaddr_un.sun_path on Linux, its terminating NUL included
# Digits of the longest JSON integer a request may hold (Python's own int limit: longer was
# a ValueError inside json.loads, answered "request is not JSON"). No argument needs 21.
MAX_NUMBER_DIGITS = 4300


class _NumberTooLong(ValueError):
    pass


def _parse_int(text: str) -> int:
    """json.loads' parse_int: a number too long is refused by name."""
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise _NumberTooLong
    try:
        return int(text)
    except ValueError:  # (digits only: a lower PYTHONINTMAXSTRDIGITS is the one cause)
        raise _NumberTooLong from None
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def runtime_dir() -> Path:
    """The directory for control sockets: ``/run/ipsecct`` for root, else
    ``$XDG_RUNTIME_DIR/ipsecct`` (or, without it, ``ipsecct-UID`` in the temporary directory).
    ``$IPSECCT_RUNTIME_DIR`` replaces it (containers, tests)."""
    override = os.environ.get("IPSECCT_RUNTIME_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/ipsecct")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "ipsecct"
    return Path(tempfile.gettempdir()) / f"ipsecct-{os.geteuid()}"


def socket_path(value: str | None) -> str:
    """Where a ``control.socket`` setting puts the socket: unset, the default one; a bare
    name, that name in :func:`runtime_dir`; anything with a slash, as given."""
    if not value:
        return str(runtime_dir() / SOCKET_NAME)
    if "/" not in value:
        return str(runtime_dir() / value)
    return value


def _check_directory(d: Path) -> None:
    """The socket's directory must belong to us (or root) and nobody else may replace what is
    in it: not writable by group or others, unless sticky (as /tmp is)."""
    try:
        st = d.stat()
    except OSError as exc:
        raise ControlError(f"cannot use the directory {d}: {exc.strerror}") from None
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise ControlError(
            f"the directory {d} belongs to uid {st.st_uid}, not to you (uid {me}): refusing it"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ControlError(f"the directory {d} is writable by others: refusing it")


def check_socket(path: str) -> None:
    """Refuse a control socket that another user could have put there (client side)."""
    if len(os.fsencode(path)) >= SUN_PATH_MAX:  # no socket can be there: say why, not ENOENT
        raise ControlError(
            f"control socket path too long for a Unix socket ({len(os.fsencode(path))} bytes,"
            f" at most {SUN_PATH_MAX - 1}): {path}"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ControlError(
            f"cannot reach the control socket {path}: no such file (is the daemon running?)"
        ) from None
    except OSError as exc:
        raise ControlError(f"cannot reach the control socket {path}: {exc.strerror}") from None
    me = os.geteuid()
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a socket")
    if st.st_uid != me:
        raise ControlError(
            f"the control socket {path} belongs to uid {st.st_uid}, not to you (uid {me}):"
            " refusing to talk to it (run the command as the gateway's user)"
        )
    _check_directory(Path(path).parent)


def _peer_uid(s: socket.socket) -> int | None:
    try:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def spi_number(text: str) -> int | None:
    """An SPI written as README says: decimal digits, ``0x`` and hex digits, or as
    ``swanctl --list-sas`` prints one (8 hex digits and ``_i`` or ``_o``); None for anything
    else (int(x, 0) also took ``0o17``, ``0b101``, ``1_000`` and ``+5``), decimal digits with
    a leading 0 too."""
    t = text.strip()
    if t[-2:] in ("_i", "_o") and len(t) == 10 and all(c in string.hexdigits for c in t[:8]):
        return int(t[:8], 16)
    if t[:2] in ("0x", "0X") and 1 <= len(t) - 2 <= 16 and all(
            c in string.hexdigits for c in t[2:]):  # fmt: skip
        return int(t[2:], 16)
    d = t[1:] if t[:1] == "-" else t  # (a negative number: refused as out of range)
    if 1 <= len(d) <= 20 and all(c in "0123456789" for c in d) and (d == "0" or d[0] != "0"):
        return int(t)  # (a leading 0, "00989681", is more likely swanctl's hex: refused)
    return None


def parse_proto(v: Any) -> Protocol | None:
    """A control request's ``proto`` ("esp" or "ah": which SA of an SPI, with ``dst``), or
    None when absent. ControlError otherwise."""
    if v is None:
        return None
    if v == "esp":
        return Protocol.ESP
    if v == "ah":
        return Protocol.AH
    raise ControlError(f"bad protocol {str(v)[:20]!r} (esp or ah)")


def parse_spi(v: Any) -> int:
    """An SPI as the control socket takes it: a number, or text as :func:`spi_number` reads
    it, 32 bits. ControlError otherwise: ``-1`` was looked up as "0x-0000001" and 2**40 as
    an SPI of 11 hex digits."""
    spi: int | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        spi = v
    elif isinstance(v, str):
        spi = spi_number(v)
    if spi is None:
        hint = ""
        if isinstance(v, str) and v.strip() and all(c in string.hexdigits for c in v.strip()):
            hint = f"; hex digits need 0x: 0x{v.strip()}"
        raise ControlError(f"bad SPI {v!r} (decimal, or 0x... for hex{hint})")
    if not 0 <= spi <= 0xFFFFFFFF:
        raise ControlError(f"bad SPI {v!r} (32 bits: 0 to 0xffffffff)")
    return spi


def parse_transfer_id(v: Any) -> int:
    """A transfer id as ``transfer --prepare`` and ``status`` print it: up to 16 hex digits,
    ``0x`` before them optional, for the command line and the socket alike (the command line
    refused a ``0x`` the socket took, and the socket took ``-1``, ``+ff`` and ``f_f``, which
    int() reads). ControlError otherwise."""
    text = v[2:] if isinstance(v, str) and v[:2] in ("0x", "0X") else v
    if (isinstance(text, str) and 1 <= len(text) <= 16
            and all(c in string.hexdigits for c in text)):  # fmt: skip
        return int(text, 16)
    raise ControlError(f"transfer id {v!r} is not hex digits (16, as transfer --prepare printed"
                       " it; 0x optional)")  # fmt: skip


def spi_hint(v: Any) -> str:
    """What to add to "no SA with SPI ...": text of decimal digits only was read as decimal,
    while swanctl --list-sas prints SPIs in hex without 0x (``c0a80001_i``): say so."""
    if isinstance(v, str) and v.strip().isdigit() and not v.strip().startswith("0"):
        return f" ({v.strip()} was read as decimal; for hex write 0x{v.strip()})"
    return ""


def sa_summary(
    sa: SecurityAssociation, now: float, state: tuple[str, str] = ("installed", "")
) -> dict[str, Any]:
    """What ``sa list`` / ``sa show`` print about an SA: never its keys. ``state``: what
    its tunnel is doing (installed, held, leaving, arriving, unresolved, moved) and why."""
    d: dict[str, Any] = {
        "spi": f"0x{sa.spi:08x}",
        "name": sa.name,
        "direction": sa.direction.value,
        "protocol": sa.protocol.name,
        "mode": sa.mode.value,
        "src": str(sa.src),
        "dst": str(sa.dst),
        "enc": enc_name(sa.enc),
        "integ": integ_name(sa.integ),
        # as swanctl --list-sas spells them (enc and integ keep the configuration's names)
        "algorithms": swanctl_algorithms(sa.enc, len(sa.enc_key), sa.integ, sa.esn),
        "esn": sa.esn,
        "replay_window": sa.replay_window,
        "path_mtu": sa.path_mtu,
        "packets": sa.counters.packets,
        "bytes": sa.counters.bytes,
        "age_s": round(now - sa.created, 3),
        "udp_encap": None if sa.encap is None else [sa.encap.sport, sa.encap.dport],
        "selectors": None if sa.selectors is None else sa.selectors.describe(),
    }
    if sa.direction is Direction.OUTBOUND:
        d["seq"] = sa.seq
    else:
        d["replay_top"] = sa.window.top
    d["state"], d["state_detail"] = state
    # (an SA added past its hard lifetime, as sa add of a context whose age is past it,
    # showed INSTALLED until the engine next looked at it)
    if sa.dead or sa.hard.exceeded(now - sa.created, sa.counters.bytes, sa.counters.packets):
        d["state"] = "expired"
        d["state_detail"] = _expired_why(sa, now)
    return d


def _expired_why(sa: SecurityAssociation, now: float) -> str:
    """Which hard lifetime an expired SA reached (it showed EXPIRED and no reason)."""
    h, c = sa.hard, sa.counters
    reached = [what for what, hit in (
        (f"{h.seconds:g} s", h.seconds is not None and now - sa.created >= h.seconds),
        (f"{h.bytes} bytes", h.bytes is not None and c.bytes >= h.bytes),
        (f"{h.packets} packets", h.packets is not None and c.packets >= h.packets),
    ) if hit]  # fmt: skip
    limit = " and ".join(reached) or "reached"
    return f"past its hard lifetime ({limit}): sends and receives nothing"


class ControlServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        # Called before each command's handler (the transfer service: what an activation
        # left for later is done before any command sees or changes the gateway).
        self.before: list[Callable[[], None]] = []
        self._server: asyncio.Server | None = None
        self.refused = 0  # requests answered with an error before reaching a handler
        self._quiet = RateLimited()
        self.clients = 0  # connected now (at most MAX_CLIENTS)
        # Clients waiting for their next request (none being answered), longest first, and
        # those closed to make room (their place already given back). MAX_CLIENTS idle
        # connections (a script that leaks them) kept every command out for IDLE_TIMEOUT,
        # 5 minutes: ipsecct status, transfer, even failover alone. One over the limit now
        # takes the place of the client idle the longest; one waiting for its answer (a
        # transfer, transfer.wait) keeps its place.
        self._idle: dict[asyncio.StreamWriter, None] = {}
        self._evicted: set[asyncio.StreamWriter] = set()

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    def _prepare_directory(self) -> None:
        d = Path(self.path).parent
        if d == runtime_dir():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.stat().st_uid == os.geteuid():
                os.chmod(d, 0o700)
        _check_directory(d)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if st.st_uid != os.geteuid():
            raise ControlError(f"{self.path} belongs to uid {st.st_uid}: refusing to replace it")
        if not stat.S_ISSOCK(st.st_mode):  # a control.socket naming a file by mistake (the
            # configuration itself, a key) removed that file, even when the start then failed
            raise ControlError(f"{self.path} exists and is not a socket: refusing to replace it"
                               " (control.socket names the socket's own path)")  # fmt: skip
        # A socket left by a daemon that died is replaced; a live daemon's is not stolen.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise ControlError(f"another daemon is already listening on {self.path}")

    def check(self) -> None:
        """What start() would refuse, found before the node sends anything: a path too long
        for a Unix socket, a directory others can write, a daemon already listening there
        (a second gateway started by mistake, perhaps with the same keys, ran its tunnels
        and only then failed on the socket)."""
        if len(os.fsencode(self.path)) >= SUN_PATH_MAX:
            raise ControlError(f"control socket path too long for a Unix socket: {self.path}")
        self._prepare_directory()

    async def start(self) -> None:
        self.check()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    @property
    def listening(self) -> bool:
        """Started and not stopped: the socket at ``path`` is this server's (before start,
        it may be another daemon's, which stop() would unlink)."""
        return self._server is not None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS and not self._evict_idle():
            # Thousands of idle connections (each kept up to IDLE_TIMEOUT) used up the
            # gateway's file descriptors: past MAX_CLIENTS one answer, and closed.
            writer.write(json.dumps(self._refuse("too many control clients")).encode() + b"\n")
            writer.close()
            return
        self.clients += 1
        try:
            while True:
                self._idle[writer] = None  # (the last to have become idle)
                try:
                    line = await asyncio.wait_for(reader.readline(), timeout=IDLE_TIMEOUT)
                except (asyncio.LimitOverrunError, ValueError):
                    await self._answer(writer, {"ok": False, "error": "request too long"})
                    return
                finally:
                    self._idle.pop(writer, None)
                if not line or writer in self._evicted:
                    return
                await self._answer(writer, await self._handle(line))
        except (TimeoutError, ConnectionError):
            return
        except Exception as exc:  # a bug: one line, the server carries on
            self._quiet.event(log, "control-client-failed", logging.ERROR, error=type(exc).__name__)
        finally:
            if writer in self._evicted:
                self._evicted.discard(writer)  # (its place was given back then)
            else:
                self.clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await writer.wait_closed()

    def _evict_idle(self) -> bool:
        """Close the client idle the longest and give its place back; False if none is."""
        victim = next(iter(self._idle), None)
        if victim is None:
            return False
        del self._idle[victim]
        self._evicted.add(victim)
        self.clients -= 1
        victim.transport.abort()
        self._quiet.event(log, "control-client-evicted", logging.WARNING,
                          reason="idle the longest, for a new client")  # fmt: skip
        return True

    async def _answer(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        # a client that sends requests and never reads the answers is dropped, not waited for
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await writer.drain()

    def _refuse(self, why: str) -> dict[str, Any]:
        """The answer to a request that is not one: an error line, and one log line."""
        self.refused += 1
        self._quiet.event(log, "control-request-refused", logging.WARNING, reason=why)
        return {"ok": False, "error": why}

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line, parse_int=_parse_int)
        except _NumberTooLong:
            return self._refuse(f"request holds a number of more than {MAX_NUMBER_DIGITS} digits")
        except (ValueError, UnicodeDecodeError):
            return self._refuse("request is not JSON")
        except RecursionError:
            return self._refuse("request is nested too deeply")
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return self._refuse('request must be an object with a string "cmd"')
        args = req.get("args", {})
        if not isinstance(args, dict):
            return self._refuse('"args" must be an object')
        handler = self.handlers.get(req["cmd"])
        if handler is None:
            return self._refuse(f"unknown command {req['cmd'][:64]!r}")
        for before in self.before:
            before()
        try:
            return {"ok": True, "result": await handler(args)}
        except IpsecctError as exc:
            return {"ok": False, "error": str(exc)}
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            return self._refuse(f"bad arguments: {type(exc).__name__}")
        except Exception as exc:  # a bug: report it, keep serving
            event(
                log,
                "control-handler-failed",
                logging.ERROR,
                cmd=req["cmd"],
                error=type(exc).__name__,
            )
            return {"ok": False, "error": f"internal error ({type(exc).__name__})"}


def request(path: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Send one control request (blocking); return its result or raise ControlError.

    Only to a socket of our own user, in a directory nobody else can write, answered by a
    process of our own user (see :func:`check_socket`)."""
    check_socket(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as exc:
            raise ControlError(
                f"cannot reach the control socket {path}: {exc.strerror or exc}"
                " (is the daemon running?)"
            ) from None
        uid = _peer_uid(s)
        if uid is not None and uid != os.geteuid():
            raise ControlError(
                f"the daemon on {path} runs as uid {uid}, not as you: refusing to talk to it"
            )
        buf = b""
        try:
            s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        except OSError as exc:  # the daemon went away between connect and send
            raise ControlError(f"cannot send to {path}: {exc.strerror or exc}") from None
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(1 << 16)
            except TimeoutError:
                raise ControlError(f"no answer from {path} within {timeout:g} s") from None
            except OSError as exc:  # e.g. reset by a daemon that is exiting
                raise ControlError(f"lost the connection to {path}: {exc.strerror}") from None
            if not chunk:
                raise ControlError("the daemon closed the control connection")
            buf += chunk
            if len(buf) > 64 * MAX_LINE:
                raise ControlError("answer too long")
    finally:
        s.close()
    return _result(buf)


async def request_async(
    path: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0
) -> Any:
    """:func:`request` for a caller on an event loop (the demo): the same checks (a socket of
    our own user, answered by a process of our own user), the same errors, without blocking
    the loop."""
    check_socket(path)
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=64 * MAX_LINE)
            except OSError as exc:
                raise ControlError(
                    f"cannot reach the control socket {path}: {exc.strerror or exc}"
                    " (is the daemon running?)"
                ) from None
            try:
                sock = writer.get_extra_info("socket")
                uid = None if sock is None else _peer_uid(sock)
                if uid is not None and uid != os.geteuid():
                    raise ControlError(
                        f"the daemon on {path} runs as uid {uid}, not as you:"
                        " refusing to talk to it"
                    )
                writer.write(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
                try:
                    await writer.drain()
                    buf = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    raise ControlError("answer too long") from None
                except OSError as exc:
                    raise ControlError(f"lost the connection to {path}: {exc.strerror}") from None
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlError(f"no answer from {path} within {timeout:g} s") from None
    if not buf.endswith(b"\n"):
        raise ControlError("the daemon closed the control connection")
    return _result(buf)


def _result(buf: bytes) -> Any:
    try:
        ans = json.loads(buf)
    except ValueError:
        raise ControlError("the daemon's answer is not JSON") from None
    if not isinstance(ans, dict) or not ans.get("ok"):
        err = ans.get("error", "unknown error") if isinstance(ans, dict) else "bad answer"
        raise ControlError(str(err))
    return ans.get("result")


# -- Prometheus ----------------------------------------------------------------------------
def prometheus_text(status: dict[str, Any]) -> str:
    node = status["name"]
    c = status["counters"]
    lines = [
        "# HELP ipsecct_packets_total Packets processed by direction.",
        "# TYPE ipsecct_packets_total counter",
        f'ipsecct_packets_total{{node="{node}",direction="out"}} {c["out_packets"]}',
        f'ipsecct_packets_total{{node="{node}",direction="in"}} {c["in_packets"]}',
        "# HELP ipsecct_bytes_total Inner bytes processed by direction.",
        "# TYPE ipsecct_bytes_total counter",
        f'ipsecct_bytes_total{{node="{node}",direction="out"}} {c["out_bytes"]}',
        f'ipsecct_bytes_total{{node="{node}",direction="in"}} {c["in_bytes"]}',
        "# HELP ipsecct_drops_total Packets rejected, by reason.",
        "# TYPE ipsecct_drops_total counter",
    ]
    for reason, n in c["drops"].items():
        lines.append(f'ipsecct_drops_total{{node="{node}",reason="{reason}"}} {n}')
    if "relayed" in c:
        # a moved tunnel's inbound ESP sent on unchanged to its new gateway (ipsec/relay.py),
        # or dropped over its tunnel's rate (refused) or over all relays' cap (capped)
        lines += [
            "# HELP ipsecct_relay_total Moved tunnels' inbound ESP relayed to their new"
            " gateway, or dropped over a tunnel's relay rate (refused) or the overall relay"
            " cap (capped).",
            "# TYPE ipsecct_relay_total counter",
        ] + [
            f'ipsecct_relay_total{{node="{node}",result="{r}"}} {c.get(k, 0)}'
            for r, k in (("relayed", "relayed"), ("refused", "relay_refused"),
                         ("capped", "relay_capped"))
        ]  # fmt: skip
    lines += [
        "# HELP ipsecct_sas Security associations in the SAD.",
        "# TYPE ipsecct_sas gauge",
        f'ipsecct_sas{{node="{node}"}} {status["sas"]}',
        "# HELP ipsecct_uptime_seconds Seconds since the node started.",
        "# TYPE ipsecct_uptime_seconds gauge",
        f'ipsecct_uptime_seconds{{node="{node}"}} {status["uptime_s"]}',
    ]
    lease = (status.get("failover") or {}).get("lease")
    if isinstance(lease, dict):
        # Fail-over fencing (issue 9): may this gateway send, and how often it had to stop.
        valid = 1 if lease.get("state") in ("held", "taken over") else 0
        lines += [
            "# HELP ipsecct_failover_lease_valid 1 while this gateway may send (lease held, or"
            " it took over), else 0.",
            "# TYPE ipsecct_failover_lease_valid gauge",
            f'ipsecct_failover_lease_valid{{node="{node}",state="{lease.get("state")}"}} {valid}',
            "# HELP ipsecct_failover_lease_epoch Fail-over epoch (one more per take-over).",
            "# TYPE ipsecct_failover_lease_epoch gauge",
            f'ipsecct_failover_lease_epoch{{node="{node}"}} {lease.get("epoch", 0)}',
        ]
        if "losses" in lease:
            lines += [
                "# HELP ipsecct_failover_lease_losses_total Times the lease ran out.",
                "# TYPE ipsecct_failover_lease_losses_total counter",
                f'ipsecct_failover_lease_losses_total{{node="{node}"}} {lease["losses"]}',
                "# HELP ipsecct_failover_lease_remaining_seconds Time left on the lease.",
                "# TYPE ipsecct_failover_lease_remaining_seconds gauge",
                f'ipsecct_failover_lease_remaining_seconds{{node="{node}"}} '
                f"{(lease.get('remaining_ms') or 0) / 1000}",
            ]
    cl = status.get("cluster")
    if isinstance(cl, dict) and isinstance(cl.get("lease"), dict):
        # etcd mode (issue 9): the member lease that fences sending, and ownership.
        cle = cl["lease"]
        lines += [
            "# HELP ipsecct_cluster_lease_valid 1 while this member's etcd lease lets it send.",
            "# TYPE ipsecct_cluster_lease_valid gauge",
            f'ipsecct_cluster_lease_valid{{node="{node}"}} '
            f"{1 if cle.get('state') == 'held' else 0}",
            "# HELP ipsecct_cluster_lease_losses_total Times the member lease ran out.",
            "# TYPE ipsecct_cluster_lease_losses_total counter",
            f'ipsecct_cluster_lease_losses_total{{node="{node}"}} {cle.get("losses", 0)}',
            "# HELP ipsecct_cluster_owned_tunnels Tunnels in groups whose owner key this member"
            " holds.",
            "# TYPE ipsecct_cluster_owned_tunnels gauge",
            f'ipsecct_cluster_owned_tunnels{{node="{node}"}} {cl.get("owned_tunnels", 0)}',
            "# HELP ipsecct_cluster_groups Owner keys (groups of tunnels) this member holds.",
            "# TYPE ipsecct_cluster_groups gauge",
            f'ipsecct_cluster_groups{{node="{node}"}} {cl.get("groups", 0)}',
            "# HELP ipsecct_cluster_taken_over_total Tunnels taken over from dead members.",
            "# TYPE ipsecct_cluster_taken_over_total counter",
            f'ipsecct_cluster_taken_over_total{{node="{node}"}} {cl.get("taken_over", 0)}',
            "# HELP ipsecct_cluster_orphaned_tunnels Tunnels in groups without an owner that"
            " no member took over: nothing sends on them.",
            "# TYPE ipsecct_cluster_orphaned_tunnels gauge",
            f'ipsecct_cluster_orphaned_tunnels{{node="{node}"}} '
            f"{cl.get('orphaned', {}).get('tunnels', 0)}",
            "# HELP ipsecct_cluster_orphaned_groups Groups of tunnels without an owner that no"
            " member took over.",
            "# TYPE ipsecct_cluster_orphaned_groups gauge",
            f'ipsecct_cluster_orphaned_groups{{node="{node}"}} '
            f"{cl.get('orphaned', {}).get('groups', 0)}",
        ]
    tr = status.get("transfers")
    if isinstance(tr, dict) and "refused_connections" in tr:
        # The CXTP listener (docs/security.md): connections closed without a handshake or
        # after a failed one, and those of them over the handshake rate.
        lines += [
            "# HELP ipsecct_cxtp_refused_connections_total Connections to the CXTP listener"
            " refused (over a limit, failed handshake, not a peer).",
            "# TYPE ipsecct_cxtp_refused_connections_total counter",
            f'ipsecct_cxtp_refused_connections_total{{node="{node}"}} '
            f'{tr["refused_connections"]}',
            "# HELP ipsecct_cxtp_handshakes_rate_limited_total Connections to the CXTP"
            " listener closed before their TLS handshake: over the handshake rate of their"
            " source or of all sources.",
            "# TYPE ipsecct_cxtp_handshakes_rate_limited_total counter",
            f'ipsecct_cxtp_handshakes_rate_limited_total{{node="{node}"}} '
            f'{tr.get("handshakes_rate_limited", 0)}',
            "# HELP ipsecct_cxtp_foreign_total CXTP messages from a peer about a transfer"
            " that is another peer's, dropped (docs/security.md), per kind.",
            "# TYPE ipsecct_cxtp_foreign_total counter",
        ]
        lines += [
            f'ipsecct_cxtp_foreign_total{{node="{node}",kind="{k[8:]}"}} {v}'
            for k, v in tr.items() if k.startswith("foreign_")
        ]  # fmt: skip
    ike = status.get("ike")
    if isinstance(ike, dict) and "ike_sas" in ike:
        # what swanctl --list-sas / --stats tell a strongSwan operator: status had it, the
        # metrics endpoint had nothing about IKE
        lines += [
            "# HELP ipsecct_ike_sas IKE SAs on this node (half-open ones apart).",
            "# TYPE ipsecct_ike_sas gauge",
            f'ipsecct_ike_sas{{node="{node}"}} {ike["ike_sas"]}',
            "# HELP ipsecct_ike_half_open Half-open IKE SAs (IKE_SA_INIT answered, no IKE_AUTH"
            " yet).",
            "# TYPE ipsecct_ike_half_open gauge",
            f'ipsecct_ike_half_open{{node="{node}"}} {ike.get("half_open", 0)}',
            "# HELP ipsecct_ike_events_total IKE events by kind, as status's ike counters"
            " (auth-failed, no-proposal-chosen, ike-sa-established, ...).",
            "# TYPE ipsecct_ike_events_total counter",
        ]
        lines += [f'ipsecct_ike_events_total{{node="{node}",event="{k}"}} {v}'
                  for k, v in sorted((ike.get("counters") or {}).items())]  # fmt: skip
    for k, v in status.get("metrics", {}).items():
        if v is None:  # nothing to measure (no SA under reservation): no sample, not a 0
            continue
        kind = "counter" if k.endswith("_total") else "gauge"
        lines += [f"# TYPE ipsecct_{k} {kind}", f'ipsecct_{k}{{node="{node}"}} {v}']
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A minimal HTTP/1.0 server answering a GET of ``/metrics`` (or ``/``; a query string
    is ignored) with the metrics text, any other path with 404, as exporters do."""

    TIMEOUT = 2.0  # for the whole request: a client that idles is closed

    def __init__(
        self,
        host: str,
        port: int,
        status: Callable[[], dict[str, Any]],
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.host, self.port, self.status = host, port, status
        self._server: asyncio.Server | None = None
        self.limits = limits if limits is not None else ConnectionLimits(per_source=16, total=32)
        self._quiet = RateLimited()
        # Connections holding a place (-> their source), and those of them still waiting for
        # their request, oldest first. The endpoint is on loopback, where every client is one
        # source: 16 idle connections, opened again as each timed out, kept every scrape out
        # (refused). A connection over the limit now takes the place of the oldest one that
        # has not sent its request yet (a scraper sends its request at once).
        self._places: dict[asyncio.StreamWriter, str] = {}
        self._waiting: dict[asyncio.StreamWriter, None] = {}

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._client, self.host, self.port)
        except OSError as exc:
            raise bind_error(exc, "TCP", self.host, self.port, "control.metrics") from None

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = source_of(writer.get_extra_info("peername"))
        if not self.limits.admit(source) and not (self._evict(source)
                                                  and self.limits.admit(source)):  # fmt: skip
            self._quiet.event(
                log, "metrics-connection-refused", logging.WARNING, reason="too many connections"
            )
            writer.close()
            return
        self._places[writer] = source
        self._waiting[writer] = None
        try:
            await self._serve(reader, writer)
        finally:
            self._waiting.pop(writer, None)
            if self._places.pop(writer, None) is not None:
                self.limits.release(source)

    def _evict(self, source: str) -> bool:
        """Close the oldest connection still waiting for its request (of ``source`` if that
        source is at its own limit) and free its place; False if there is none."""
        full = self.limits.open.get(source, 0) >= self.limits.per_source
        victim = next((w for w in self._waiting if not full or self._places[w] == source), None)
        if victim is None:
            return False
        del self._waiting[victim]
        self.limits.release(self._places.pop(victim))
        victim.transport.abort()
        self._quiet.event(log, "metrics-connection-evicted", logging.WARNING,
                          reason="idle, for a newer connection")  # fmt: skip
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=self.TIMEOUT)
            self._waiting.pop(writer, None)  # its request is in: served, not evicted
            target = head.split(b"\r\n", 1)[0].split(b" ")
            path = target[1].split(b"?", 1)[0] if len(target) > 2 else b""
            if head.startswith(b"GET ") and path not in (b"/", b"/metrics"):
                writer.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            elif head.startswith(b"GET "):
                body = prometheus_text(self.status()).encode()
                writer.write(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            else:
                writer.write(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            async with asyncio.timeout(self.TIMEOUT):
                await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()

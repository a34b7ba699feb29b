"""The local control socket and the Prometheus metrics endpoint of a running node.

Control protocol: JSON lines over a Unix-domain socket (mode 0600). A request is
``{"cmd": NAME, "args": {...}}``; the answer is ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. A client that sends garbage gets an error answer and the
server carries on; a line longer than 1 MiB closes that connection.

Commands register themselves in :attr:`ControlServer.handlers`, so the context-transfer layer
adds its own (``transfer``, ``rebalance``) without this module knowing about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import IpsecctError
from ..ipsec.algorithms import enc_name, integ_name
from ..ipsec.sad import Direction, SecurityAssociation
from .log import event

log = logging.getLogger("ipsecct.gateway.control")

MAX_LINE = 1 << 20
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(IpsecctError):
    """A control request failed (the message is shown to the operator)."""


def sa_summary(sa: SecurityAssociation, now: float) -> dict[str, Any]:
    """What ``sa list`` / ``sa show`` print about an SA: never its keys."""
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
    if sa.dead:
        d["state"] = "expired"
    return d


class ControlServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), timeout=300)
                except (asyncio.LimitOverrunError, ValueError):
                    await self._answer(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                await self._answer(writer, await self._handle(line))
        except (TimeoutError, ConnectionError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a string "cmd"'}
        args = req.get("args", {})
        if not isinstance(args, dict):
            return {"ok": False, "error": '"args" must be an object'}
        handler = self.handlers.get(req["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except IpsecctError as exc:
            return {"ok": False, "error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad arguments: {type(exc).__name__}"}
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
    """Send one control request (blocking); return its result or raise ControlError."""
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
    lines += [
        "# HELP ipsecct_sas Security associations in the SAD.",
        "# TYPE ipsecct_sas gauge",
        f'ipsecct_sas{{node="{node}"}} {status["sas"]}',
        "# HELP ipsecct_uptime_seconds Seconds since the node started.",
        "# TYPE ipsecct_uptime_seconds gauge",
        f'ipsecct_uptime_seconds{{node="{node}"}} {status["uptime_s"]}',
    ]
    for k, v in status.get("metrics", {}).items():
        lines.append(f'ipsecct_{k}{{node="{node}"}} {v}')
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A minimal HTTP/1.0 server answering every GET with the metrics text."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]]) -> None:
        self.host, self.port, self.status = host, port, status
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if head.startswith(b"GET "):
                body = prometheus_text(self.status()).encode()
                writer.write(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            else:
                writer.write(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
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

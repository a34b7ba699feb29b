"""A control server of the test's own (``with_server``: echo, a handler that raises, one
that raises SAError, one that needs a key) and a raw client of it (``connect``, ``ask``: one
line out, one JSON object back), for tests/test_control and tests/test_hostile_inputs; and
``short_path``, a control socket's path short enough for sun_path."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from ipsecct.errors import SAError
from ipsecct.gateway.control import MAX_LINE, ControlServer

Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def short_path() -> str:
    d = tempfile.mkdtemp(prefix="ipsecct-c-", dir="/tmp")
    return os.path.join(d, "ctl.sock")


async def echo_handler(args: dict[str, Any]) -> Any:
    return {"echo": args}


async def _boom(args: dict[str, Any]) -> Any:
    raise RuntimeError("a bug")


async def _sa_error(args: dict[str, Any]) -> Any:
    raise SAError("no such SA")


async def _needs_key(args: dict[str, Any]) -> Any:
    return args["spi"]


def with_server(test: Callable[[ControlServer, str], Awaitable[None]]) -> None:
    path = short_path()

    async def main() -> None:
        srv = ControlServer(path)
        srv.register("echo", echo_handler)
        srv.register("boom", _boom)
        srv.register("sa", _sa_error)
        srv.register("needs", _needs_key)
        await srv.start()
        try:
            await asyncio.wait_for(test(srv, path), 30)
        finally:
            await srv.stop()
        assert not os.path.exists(path)

    try:
        asyncio.run(main())
    finally:
        os.rmdir(os.path.dirname(path))


async def connect(path: str) -> Client:
    return await asyncio.open_unix_connection(path, limit=4 * MAX_LINE)


async def ask(c: Client, line: bytes) -> dict[str, Any]:
    r, w = c
    w.write(line)
    await w.drain()
    ans = json.loads(await r.readline())
    assert isinstance(ans, dict)
    return ans

"""A small asyncio client for etcd's v3 API, spoken as JSON over HTTP (etcd's gRPC gateway).

Why not a library: ipsecct needs six calls (lease grant / keep-alive / revoke, put, range,
transaction). The maintained asyncio client on PyPI, ``aetcd``, speaks gRPC and brings
``grpcio`` and ``protobuf`` (tens of megabytes of compiled code) for them; the older ones
(``aioetcd3``, ``aio-etcd``, ``aetcd3``) are unmaintained or speak the v2 API. etcd serves the
same v3 API as JSON on its client port (``/v3/kv/range``, ``/v3/lease/grant``, ...; byte
fields in base64, 64-bit integers as strings), which is all this module uses: one short HTTP/1.1
request per call, with a timeout, tried on each configured endpoint in turn.

Everything etcd answers is checked before use (types, sizes): a malformed or unexpected answer
is an :class:`EtcdError`, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..ct.ownership import Compare, Delete, Put, Txn
from ..errors import EtcdError

MAX_RESPONSE = 16 << 20
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease: int
    create_revision: int
    mod_revision: int


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(v: Any) -> bytes:
    if not isinstance(v, str):
        raise EtcdError("etcd answered a non-string where base64 was expected")
    try:
        return base64.b64decode(v, validate=True)
    except ValueError:
        raise EtcdError("etcd answered bad base64") from None


def _int(v: Any, default: int = 0) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise EtcdError("etcd answered a non-integer where an integer was expected")
    try:
        return int(v)
    except ValueError:
        raise EtcdError("etcd answered a bad integer") from None


def _kvs(d: dict[str, Any]) -> list[KeyValue]:
    out = []
    kvs = d.get("kvs", [])
    if not isinstance(kvs, list):
        raise EtcdError("etcd answered a bad key list")
    for kv in kvs:
        if not isinstance(kv, dict):
            raise EtcdError("etcd answered a bad key")
        try:
            key = _unb64(kv.get("key")).decode()
        except UnicodeDecodeError:
            raise EtcdError("etcd answered a key that is not UTF-8") from None
        out.append(
            KeyValue(
                key,
                _unb64(kv.get("value", "")),
                _int(kv.get("lease")),
                _int(kv.get("create_revision")),
                _int(kv.get("mod_revision")),
            )
        )
    return out


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix`` (etcd's convention)."""
    b = bytearray(prefix.encode())
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return "\0"
    b[-1] += 1
    return b.decode("latin-1")


def endpoint(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://HOST:PORT`` endpoint; EtcdError for anything else (a
    bracket left open or a port past 65535 made urlsplit raise ValueError: a traceback)."""
    bad = EtcdError(f"etcd endpoint {url!r}: only http://HOST:PORT is supported")
    try:
        u = urlsplit(url)
        host, port = u.hostname, u.port or 2379
    except ValueError:
        raise bad from None
    if u.scheme != "http" or not host or u.path not in ("", "/"):
        raise bad
    return host, port


class EtcdClient:
    """Calls etcd's v3 JSON API on the first endpoint that answers."""

    def __init__(self, endpoints: list[str], *, timeout: float = 1.0) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoint")
        self.endpoints: list[tuple[str, int]] = []
        self.endpoints = [endpoint(e) for e in endpoints]
        self.timeout = timeout
        self._preferred = 0
        self.calls = 0
        self.failures = 0

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path`` on one endpoint after another until one answers."""
        errors = []
        n = len(self.endpoints)
        for k in range(n):
            i = (self._preferred + k) % n
            host, port = self.endpoints[i]
            self.calls += 1
            try:
                async with asyncio.timeout(self.timeout):
                    ans = await self._post(host, port, path, body)
            except (OSError, TimeoutError, EtcdError) as exc:
                self.failures += 1
                errors.append(f"{host}:{port}: {str(exc) or type(exc).__name__}")
                continue
            self._preferred = i
            return ans
        raise EtcdError("etcd unreachable (" + "; ".join(errors) + ")")

    async def _post(self, host: str, port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._exchange(host, port, path, body)
        except (ValueError, EOFError, RecursionError):
            # A header or chunk size that is no number, an answer cut short, a line past the
            # reader's limit, JSON nested past the parser's depth: not etcd's answer (a
            # corrupted etcd, or something else at the endpoint), never a traceback.
            raise EtcdError("a malformed HTTP answer") from None

    async def _exchange(
        self, host: str, port: int, path: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        data = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            status = await reader.readline()
            parts = status.split()
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise EtcdError("not an HTTP answer")
            code = int(parts[1]) if parts[1].isdigit() else 0
            length: int | None = None
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() == "transfer-encoding":
                    chunked = "chunked" in value.lower()
            if chunked:  # the streaming calls (keep-alive): the first chunk is the answer
                size = int((await reader.readline()).split(b";")[0], 16)
                if size > MAX_RESPONSE:
                    raise EtcdError("answer too large")
                payload = await reader.readexactly(size)
            elif length is not None:
                if length > MAX_RESPONSE:
                    raise EtcdError("answer too large")
                payload = await reader.readexactly(length)
            else:
                payload = await reader.read(MAX_RESPONSE)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        try:
            ans = json.loads(payload)
        except ValueError:
            raise EtcdError(f"HTTP {code}: not JSON") from None
        if not isinstance(ans, dict):
            raise EtcdError("answer is not a JSON object")
        if "result" in ans and isinstance(ans["result"], dict):
            ans = ans["result"]
        if code != 200 or "error" in ans:
            msg = ans.get("message") or ans.get("error") or f"HTTP {code}"
            raise EtcdError(f"etcd refused {path}: {msg}")
        return ans

    # -- leases ----------------------------------------------------------------------------
    async def grant(self, ttl: int) -> tuple[int, int]:
        ans = await self.call("/v3/lease/grant", {"TTL": ttl})
        lid, got = _int(ans.get("ID")), _int(ans.get("TTL"))
        if lid == 0 or got <= 0:
            raise EtcdError("etcd granted no lease")
        return lid, got

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL in seconds, 0 when it is gone."""
        ans = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return _int(ans.get("TTL"))

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    # -- keys ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes | str, *, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        await self.call("/v3/kv/put", body)

    async def get(self, key: str) -> KeyValue | None:
        kvs = _kvs(await self.call("/v3/kv/range", {"key": _b64(key)}))
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str, *, keys_only: bool = False) -> list[KeyValue]:
        body: dict[str, Any] = {
            "key": _b64(prefix),
            "range_end": _b64(prefix_end(prefix).encode("latin-1")),
        }
        if keys_only:
            body["keys_only"] = True
        return _kvs(await self.call("/v3/kv/range", body))

    async def get_prefix_values(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every key under ``prefix``: :meth:`get_prefix` without the
        revisions and leases, parsed in a third of the time (a take-over reads the group of
        every tunnel of the cluster in one such call)."""
        ans = await self.call(
            "/v3/kv/range",
            {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix).encode("latin-1"))},
        )
        kvs = ans.get("kvs", [])
        if not isinstance(kvs, list):
            raise EtcdError("etcd answered a bad key list")
        out = []
        unb64 = binascii.a2b_base64
        try:
            for kv in kvs:
                key, value = kv["key"], kv.get("value", "")
                if not isinstance(key, str) or not isinstance(value, str):
                    raise EtcdError("etcd answered a non-string where base64 was expected")
                out.append((unb64(key, strict_mode=True).decode(), unb64(value, strict_mode=True)))
        except (TypeError, KeyError):
            raise EtcdError("etcd answered a bad key") from None
        except binascii.Error:
            raise EtcdError("etcd answered bad base64") from None
        except UnicodeDecodeError:
            raise EtcdError("etcd answered a key that is not UTF-8") from None
        return out

    async def delete(self, key: str) -> None:
        await self.call("/v3/kv/deleterange", {"key": _b64(key)})

    async def delete_if_lease(self, key: str, lease: int) -> bool:
        """Delete ``key`` only if it is still attached to ``lease`` (ours): never someone
        else's key of the same name."""
        ans = await self.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": _b64(key), "target": "LEASE", "lease": str(lease), "result": "EQUAL"}
                ],
                "success": [{"request_delete_range": {"key": _b64(key)}}],
            },
        )
        return bool(ans.get("succeeded", False))

    async def hand_over(self, key: str, lease: int, value: str, new_lease: int) -> bool:
        """Give ``key`` (ours: attached to ``lease``) to another member, under its lease, in
        one transaction."""
        ans = await self.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": _b64(key), "target": "LEASE", "lease": str(lease), "result": "EQUAL"}
                ],
                "success": [
                    {
                        "request_put": {
                            "key": _b64(key),
                            "value": _b64(value),
                            "lease": str(new_lease),
                        }
                    }
                ],
            },
        )
        return bool(ans.get("succeeded", False))

    async def create(self, key: str, value: bytes | str, *, lease: int = 0) -> bool:
        """Put ``key`` only if it does not exist (a transaction); True if it was created."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        ans = await self.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {
                        "key": _b64(key),
                        "target": "CREATE",
                        "create_revision": "0",
                        "result": "EQUAL",
                    }
                ],
                "success": [{"request_put": put}],
            },
        )
        return bool(ans.get("succeeded", False))

    async def create_many(self, keys: list[str], value: bytes | str, *, lease: int = 0) -> bool:
        """Create all of ``keys`` (at most ``MAX_TXN_OPS``) in one transaction, or none if any
        exists already."""
        if not keys:
            return True
        if len(keys) > MAX_TXN_OPS:
            raise EtcdError(f"at most {MAX_TXN_OPS} keys per transaction")
        puts = []
        for k in keys:
            put: dict[str, Any] = {"key": _b64(k), "value": _b64(value)}
            if lease:
                put["lease"] = str(lease)
            puts.append({"request_put": put})
        ans = await self.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": _b64(k), "target": "CREATE", "create_revision": "0", "result": "EQUAL"}
                    for k in keys
                ],
                "success": puts,
            },
        )
        return bool(ans.get("succeeded", False))

    async def create_all(
        self, keys: list[str], value: bytes | str, *, lease: int = 0, parallel: int = 8
    ) -> list[str]:
        """Create as many of ``keys`` as do not exist yet, in transactions of
        ``MAX_TXN_OPS`` with up to ``parallel`` in flight (etcd commits concurrent proposals
        together); a batch that fails (someone holds one of its keys) is retried key by key.
        Returns the keys created."""
        sem = asyncio.Semaphore(parallel)

        async def batch(ks: list[str]) -> list[str]:
            async with sem:
                if await self.create_many(ks, value, lease=lease):
                    return ks
                return [k for k in ks if await self.create(k, value, lease=lease)]

        parts = [keys[i : i + MAX_TXN_OPS] for i in range(0, len(keys), MAX_TXN_OPS)]
        done = await asyncio.gather(*(batch(p) for p in parts))
        return [k for part in done for k in part]

    async def txn(self, t: Txn) -> bool:
        """Run a transaction built by :mod:`ipsecct.ct.ownership`; True if its compares held
        (and its operations were applied)."""
        return (await self._txn(t))[0]

    async def txn_at(self, t: Txn) -> int:
        """:meth:`txn`, telling the revision etcd applied it at (that of the keys it put:
        their create and mod revisions), 0 if its compares did not hold."""
        ok, ans = await self._txn(t)
        if not ok:
            return 0
        header = ans.get("header")
        rev = _int(header.get("revision")) if isinstance(header, dict) else 0
        if rev <= 0:
            raise EtcdError("etcd answered a transaction without its revision")
        return rev

    async def _txn(self, t: Txn) -> tuple[bool, dict[str, Any]]:
        ans = await self.call(
            "/v3/kv/txn",
            {"compare": [_compare(c) for c in t.compare], "success": [_op(o) for o in t.success]},
        )
        ok = ans.get("succeeded", False)
        if not isinstance(ok, bool):
            raise EtcdError("etcd answered a bad transaction result")
        return ok, ans

    async def status(self) -> dict[str, Any]:
        return await self.call("/v3/maintenance/status", {})


_COMPARE_FIELD = {"CREATE": "create_revision", "LEASE": "lease", "VALUE": "value"}


def _compare(c: Compare) -> dict[str, Any]:
    field = _COMPARE_FIELD[c.target]
    value = _b64(c.value) if c.target == "VALUE" and isinstance(c.value, str) else str(c.value)
    return {"key": _b64(c.key), "target": c.target, field: value, "result": "EQUAL"}


def _op(o: Put | Delete) -> dict[str, Any]:
    if isinstance(o, Delete):
        return {"request_delete_range": {"key": _b64(o.key)}}
    put: dict[str, Any] = {"key": _b64(o.key), "value": _b64(o.value)}
    if o.lease:
        put["lease"] = str(o.lease)
    return {"request_put": put}

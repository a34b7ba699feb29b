"""The TLS 1.3 channel between gateways, on real loopback sockets with certificates from pki."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from ipsecct.ct import cxtp
from ipsecct.ct.cxtp import CTD, CTDR, StatusEntry
from ipsecct.errors import ChannelClosed, ChannelError, ChannelTimeout, CxtpError
from ipsecct.gateway import config, tlschannel
from ipsecct.gateway.limits import ConnectionLimits
from ipsecct.gateway.tlschannel import CxtpConnection
from ipsecct.tools import pki
from tests.helpers.waiting import eventually

NOW = dt.datetime.now(dt.UTC)
MN = ipaddress.IPv4Address("10.0.0.7")
SA = bytes.fromhex("8001020000000000") + bytes(8)
T = TypeVar("T")


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_pki(d, ["sg1", "sg2"], NOW)
    pki.init_pki(d / "other", ["sg1", "rogue"], NOW)
    return d


def server_ctx(d: Path, name: str = "sg2") -> ssl.SSLContext:
    return tlschannel.server_context(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")


def client_ctx(d: Path, name: str = "sg1") -> ssl.SSLContext:
    return tlschannel.client_context(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(30):  # a hung test fails instead of hanging CI
            return await coro

    return asyncio.run(main())


class Echo:
    """A server handler that answers every CTD with a CTDR and records what happened."""

    def __init__(self) -> None:
        self.peers: list[str | None] = []
        self.errors: list[BaseException] = []
        self.failed = asyncio.Event()

    async def __call__(self, conn: CxtpConnection) -> None:
        self.peers.append(conn.peer.name)
        while True:
            try:
                msg = await conn.recv(timeout=5)
            except ChannelClosed:
                return
            except (CxtpError, ChannelError) as exc:
                self.errors.append(exc)
                self.failed.set()
                raise
            assert isinstance(msg, CTD)
            await conn.send(CTDR(msg.mn_prev, True, (StatusEntry(0x8001, 0),)))


async def with_server(
    d: Path, body: Callable[[int, Echo], Awaitable[T]], ctx: ssl.SSLContext | None = None
) -> T:
    echo = Echo()
    server = await tlschannel.serve(echo, "127.0.0.1", 0, ctx or server_ctx(d), timeout=5)
    port = server.sockets[0].getsockname()[1]
    try:
        return await body(port, echo)
    finally:
        server.close()
        await server.wait_closed()


def test_contexts_are_tls13_mutual(pkidir: Path) -> None:
    s, c = server_ctx(pkidir), client_ctx(pkidir)
    for ctx in (s, c):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert c.check_hostname


def test_mutual_auth_and_round_trip(pkidir: Path) -> None:
    async def body(port: int, echo: Echo) -> None:
        conn = await tlschannel.connect(
            "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
        )
        async with conn:
            assert conn.peer.name == "sg2" and conn.peer.matches("sg2")
            assert ipaddress.ip_address("127.0.0.1") in conn.peer.ip_addresses
            ssl_obj = conn.writer.get_extra_info("ssl_object")
            assert ssl_obj.version() == "TLSv1.3"
            tag = cxtp.TransferTag(1234, 0).encode()
            reply = await conn.request(CTD(MN, 3, (tag, SA), ack_requested=True))
            assert reply == CTDR(MN, True, (StatusEntry(0x8001, 0),))
            # Several messages in one write (as the peer channels' writer sends a batch), a
            # bulk batch, all answered in order.
            batch = cxtp.batch_cdbs(CTD(MN, 0), [SA] * 9000, transfer_id=5)
            assert len(batch) > 1
            await conn.send_raw(b"".join(cxtp.encode(m) for m in batch))
            for _ in batch:
                assert isinstance(await conn.recv(), CTDR)
        assert echo.peers == ["sg1"]  # the server saw the client's certificate name
        assert echo.errors == []

    run(with_server(pkidir, body))


def test_ipv6_loopback(pkidir: Path) -> None:
    async def main() -> None:
        echo = Echo()
        server = await tlschannel.serve(echo, "::1", 0, server_ctx(pkidir))
        port = server.sockets[0].getsockname()[1]
        try:
            async with await tlschannel.connect(
                "::1", port, client_ctx(pkidir), server_hostname="::1"
            ) as conn:
                reply = await conn.request(CTD(MN, 0, (SA,)))
                assert isinstance(reply, CTDR) and reply.all_ok
        finally:
            server.close()
            await server.wait_closed()

    try:
        run(main())
    except OSError as exc:  # pragma: no cover - a host without IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {exc}")


def test_wrong_server_name_refused(pkidir: Path) -> None:
    async def body(port: int, echo: Echo) -> None:
        with pytest.raises(ChannelError, match="handshake"):
            await tlschannel.connect("127.0.0.1", port, client_ctx(pkidir), server_hostname="sg9")
        assert echo.peers == []

    run(with_server(pkidir, body))


async def _refused_client(port: int, ctx: ssl.SSLContext) -> None:
    """A client the server must refuse: the handshake fails, or the first read does (in TLS 1.3
    the client finishes its side before the server has checked the client certificate)."""
    try:
        conn = await tlschannel.connect("127.0.0.1", port, ctx, server_hostname="sg2", timeout=5)
    except ChannelError:
        return
    async with conn:
        with pytest.raises(ChannelClosed):
            await conn.send(CTD(MN, 0, (SA,)))
            await conn.recv()


def test_client_from_another_ca_refused(pkidir: Path) -> None:
    other = pkidir / "other"
    # Trusts our CA (so it would accept the server) but presents a certificate from another CA.
    ctx = tlschannel.client_context(other / "rogue.pem", other / "rogue.key", pkidir / "ca.pem")

    async def body(port: int, echo: Echo) -> None:
        await _refused_client(port, ctx)
        assert echo.peers == []

    run(with_server(pkidir, body))


def test_same_name_from_another_ca_refused(pkidir: Path) -> None:
    other = pkidir / "other"
    ctx = tlschannel.client_context(other / "sg1.pem", other / "sg1.key", pkidir / "ca.pem")

    async def body(port: int, echo: Echo) -> None:
        await _refused_client(port, ctx)
        assert echo.peers == []

    run(with_server(pkidir, body))


def test_client_without_certificate_refused(pkidir: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(pkidir / "ca.pem"))

    async def no_cert_client(port: int) -> bytes:
        # In TLS 1.3 the client's handshake completes before the server has checked for a
        # client certificate; the server then drops the connection without reading anything.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="sg2"
        )
        writer.write(cxtp.encode(CTD(MN, 0, (SA,))))
        try:
            return await reader.read(100)
        except (ssl.SSLError, ConnectionError):
            return b""
        finally:
            writer.close()

    async def main() -> None:
        # The bare context: the TLS layer itself refuses, the application never sees the peer.
        accepted: list[object] = []

        async def record(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append(w.get_extra_info("peercert"))
            w.close()

        server = await asyncio.start_server(record, "127.0.0.1", 0, ssl=server_ctx(pkidir))
        port = server.sockets[0].getsockname()[1]
        try:
            assert await no_cert_client(port) == b""
            assert accepted == []
        finally:
            server.close()
            await server.wait_closed()

    run(main())

    async def body(port: int, echo: Echo) -> None:
        assert await no_cert_client(port) == b""
        assert echo.peers == []

    run(with_server(pkidir, body))


def test_server_from_another_ca_refused_by_client(pkidir: Path) -> None:
    other = pkidir / "other"
    sctx = tlschannel.server_context(other / "sg1.pem", other / "sg1.key", pkidir / "ca.pem")

    async def body(port: int, echo: Echo) -> None:
        with pytest.raises(ChannelError, match="handshake"):
            await tlschannel.connect("127.0.0.1", port, client_ctx(pkidir), server_hostname="sg1")

    run(with_server(pkidir, body, ctx=sctx))


def test_tls12_client_refused(pkidir: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(pkidir / "ca.pem"))
    ctx.load_cert_chain(str(pkidir / "sg1.pem"), str(pkidir / "sg1.key"))

    async def body(port: int, echo: Echo) -> None:
        with pytest.raises(ChannelError, match="handshake"):
            await tlschannel.connect("127.0.0.1", port, ctx, server_hostname="sg2")
        assert echo.peers == []

    run(with_server(pkidir, body))


def test_tls12_server_refused_by_client(pkidir: Path) -> None:
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sctx.load_cert_chain(str(pkidir / "sg2.pem"), str(pkidir / "sg2.key"))

    async def main() -> None:
        async def nothing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        server = await asyncio.start_server(nothing, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ChannelError, match="handshake"):
                await tlschannel.connect(
                    "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
                )
        finally:
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.parametrize(
    ("garbage", "hang_up"),
    [
        (b"GET / HTTP/1.1\r\nHost: sg2\r\n\r\n", False),
        (cxtp.encode(CTD(MN, 0, (SA,)))[:-3], True),  # truncated, then the peer hangs up
        (bytes([0x23, 0x80, 0x00, 0x20]) + bytes(28), False),  # CTD whose CDB has length 0
    ],
)
def test_garbage_from_trusted_peer(
    pkidir: Path, garbage: bytes, hang_up: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ipsecct.gateway.tlschannel")

    async def body(port: int, echo: Echo) -> None:
        conn = await tlschannel.connect(
            "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
        )
        await conn.send_raw(garbage)
        if not hang_up:
            # The server refuses and closes: we see the connection end, not an answer.
            with pytest.raises(ChannelClosed):
                await conn.recv(timeout=5)
            await conn.close()
        else:
            await conn.close()  # hang up in mid-message
        # The server is still running and serves the next (well-behaved) client.
        async with await tlschannel.connect(
            "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
        ) as ok:
            assert isinstance(await ok.request(CTD(MN, 1, (SA,))), CTDR)
        assert echo.peers == ["sg1", "sg1"]
        await asyncio.wait_for(echo.failed.wait(), 5)
        assert [type(e) for e in echo.errors] == [CxtpError]

    run(with_server(pkidir, body))
    text = caplog.text
    assert "ended" in text
    assert "CxtpError" in text
    # Nothing of the message body is logged.
    assert "Host: sg2" not in text


def test_recv_timeout(pkidir: Path) -> None:
    async def main() -> None:
        async def silent(conn: CxtpConnection) -> None:
            await asyncio.sleep(10)

        server = await tlschannel.serve(silent, "127.0.0.1", 0, server_ctx(pkidir))
        port = server.sockets[0].getsockname()[1]
        try:
            async with await tlschannel.connect(
                "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2", timeout=0.2
            ) as conn:
                with pytest.raises(ChannelTimeout):
                    await conn.recv()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_connect_to_closed_port(pkidir: Path) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(ChannelError, match="cannot connect"):
            await tlschannel.connect("127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2")

    run(main())


def test_bad_certificate_files(tmp_path: Path, pkidir: Path) -> None:
    """Each error names the file that is wrong (it said "cannot load certificate, key or CA
    ([SSL] PEM lib)" whichever of the three it was)."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cert, key, ca = pkidir / "sg2.pem", pkidir / "sg2.key", pkidir / "ca.pem"
    for args, says in (((junk, key, ca), f"certificate file {junk}: not a PEM certificate"),
                       ((key, key, ca), f"certificate file {key}: not a PEM certificate"),
                       ((cert, junk, ca), f"key file {junk}: not an unencrypted PEM"),
                       ((cert, cert, ca), f"key file {cert}: not an unencrypted PEM"),
                       ((cert, key, junk), f"the CA file {junk}"),
                       ((pkidir / "sg1.pem", key, ca),
                        f"key file {key} does not belong to the certificate in {pkidir}/sg1.pem"),
                       ):  # fmt: skip
        for make in (tlschannel.server_context, tlschannel.client_context):
            with pytest.raises(ChannelError) as ei:
                make(*args)
            assert says in str(ei.value), (args, str(ei.value))
            assert "PRIVATE KEY" not in str(ei.value)


def test_a_flood_from_many_sources_does_not_keep_a_peer_out(pkidir: Path) -> None:
    """Idle connections from many addresses (no certificate needed: admission comes before
    the handshake) filled the listener's total, and a real peer could not open its channel
    again for as long as the flood reconnected. The peers' hosts are always admitted."""

    async def main() -> None:
        echo = Echo()
        lim = ConnectionLimits(per_source=2, total=6, reserved=frozenset({"127.0.0.1"}))
        refused: list[str] = []
        server = await tlschannel.serve(echo, "127.0.0.1", 0, server_ctx(pkidir), limits=lim,
                                        handshake_timeout=60,
                                        on_refused=lambda a, r: refused.append(a))  # fmt: skip
        port = server.sockets[0].getsockname()[1]
        flood: list[socket.socket] = []
        try:
            for i in range(2, 6):  # 4 sources x 2: the total is full
                for _ in range(2):
                    s = socket.socket()
                    s.bind((f"127.0.80.{i}", 0))
                    s.connect(("127.0.0.1", port))
                    flood.append(s)
            await eventually(lambda: lim.count >= 6, "the flood to fill the listener", timeout=15)
            async with await tlschannel.connect(
                "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2", timeout=15
            ) as conn:  # the peer's host gets in, and its channel works
                tag = cxtp.TransferTag(1, 0).encode()
                assert isinstance(await conn.request(CTD(MN, 3, (tag, SA))), CTDR)
            assert not any(a.startswith("127.0.0.1:") for a in refused)
            assert sum(a.startswith("127.0.80.") for a in refused) == 2  # 6 + 2 tried
        finally:
            for s in flood:
                s.close()
            server.close()
            await server.wait_closed()

    run(main())


def test_the_peers_hosts_are_reserved_on_the_listener(tmp_path: Path) -> None:
    from ipsecct.gateway.peers import PeerChannels
    from tests.helpers.config_files import GOOD, write

    text = GOOD + (
        '[transfer]\nlisten = "127.0.0.2:25091"\ncert = "t1.keys"\nkey = "t1.keys"\n'
        'ca = "t1.keys"\n[[peers]]\nname = "sg2"\naddress = "127.0.0.3:25091"\n'
        'outer = "192.0.2.3"\n[[peers]]\nname = "sg3"\naddress = "[::1]:25091"\n'
    )
    tcfg = config.load(write(tmp_path, text)).transfer
    assert tcfg is not None
    assert PeerChannels(tcfg, "sg1").limits.reserved == {
        "127.0.0.3", "192.0.2.3", "::1", "::ffff:127.0.0.3", "::ffff:192.0.2.3"}  # fmt: skip


@pytest.mark.parametrize(
    "sent", [b"", b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
)
def test_a_handshake_that_never_finishes_is_cut_off(pkidir: Path, sent: bytes) -> None:
    """Slowloris on the CXTP port: nothing, part of a record header, or the start of a
    ClientHello, then silence. The listener closes the connection once its handshake time is
    up, the handler never runs, and the refusal is reported (already held)."""

    async def main() -> None:
        echo = Echo()
        refusals: list[str] = []
        server = await tlschannel.serve(
            echo,
            "127.0.0.1",
            0,
            server_ctx(pkidir),
            handshake_timeout=0.5,
            on_refused=lambda address, reason: refusals.append(reason),
        )
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(sent)
            await writer.drain()
            try:
                async with asyncio.timeout(10):
                    rest = await reader.read()  # until the server closes it
            except ConnectionResetError:
                rest = b""
            writer.close()
            assert b"\x17" not in rest[:1]  # no application data ever came back
            await eventually(lambda: refusals, "the refusal to be reported")
            assert "did not complete" in refusals[0] and echo.peers == []
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_a_certificate_names_its_dns_sans_and_its_cn_only_without_them() -> None:
    """A certificate with DNS SAN sg9 and CN sg2 is sg9's, not sg2's: the listener, which
    names a connecting peer by ``PeerIdentity.matches``, took it for sg2 (the client side's
    TLS name check never did: with a DNS SAN the CN is not looked at, RFC 6125 6.4.4)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    def cert(cn: str, dns: list[str]) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(NOW - dt.timedelta(hours=1))
            .not_valid_after(NOW + dt.timedelta(days=1))
        )
        if dns:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
            )
        return b.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)

    mixed = tlschannel.identity_from_der(cert("sg2", ["sg9"]))
    assert mixed.matches("sg9") and not mixed.matches("sg2")
    assert tlschannel.identity_from_der(cert("sg2", [])).matches("sg2")  # CN alone
    both = tlschannel.identity_from_der(cert("sg2", ["sg2", "gw2"]))
    assert both.matches("sg2") and both.matches("gw2") and not both.matches("sg9")


def test_handshakes_are_rate_limited_per_source_and_in_all_but_a_peers_host_gets_in(
    pkidir: Path,
) -> None:
    """A source connecting in a loop (an attacker, a broken peer) cost the listener a TLS
    handshake (an ECDHE and a certificate check) per connection, as fast as it could open
    them. Now each source address, and all of them together, have a handshake rate (token
    buckets; the rates here are tiny so that nothing refills while the test runs): the rest
    are closed before their handshake and counted. The peers' hosts have buckets of their
    own, outside the total: a flood from many addresses never locks a real peer out."""
    from ipsecct.gateway.limits import HandshakeRate

    async def handshake(port: int, source: str) -> bool:
        try:
            async with asyncio.timeout(10):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_ctx(pkidir), server_hostname="sg2",
                    local_addr=(source, 0))  # fmt: skip
        except (ssl.SSLError, ConnectionError, OSError):
            return False
        writer.close()
        return True

    async def main() -> None:
        echo = Echo()
        peer = frozenset({"127.0.0.1"})
        rate = HandshakeRate(per_source=0.001, per_source_burst=3, total=0.001, total_burst=5,
                             reserved_rate=0.001, reserved_burst=4, reserved=peer)  # fmt: skip
        refusals: list[tuple[str, str]] = []
        server = await tlschannel.serve(
            echo, "127.0.0.1", 0, server_ctx(pkidir), limits=ConnectionLimits(reserved=peer),
            rate=rate, on_refused=lambda a, r: refusals.append((a, r)))  # fmt: skip
        port = server.sockets[0].getsockname()[1]
        try:
            # One source in a loop: its burst, then nothing (the others are not touched).
            looping = [await handshake(port, "127.0.81.2") for _ in range(6)]
            assert looping == [True] * 3 + [False] * 3
            # Many sources: together no more than the total's burst (5: 3 spent above).
            many = [await handshake(port, f"127.0.81.{i}") for i in range(3, 9)]
            assert many == [True, True] + [False] * 4
            await eventually(lambda: len(echo.peers) == 5, "the 5 handshakes reach the handler")
            # The peer's host has its own bucket: it gets in, and its channel works.
            async with await tlschannel.connect(
                "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2", timeout=15
            ) as conn:
                tag = cxtp.TransferTag(1, 0).encode()
                assert isinstance(await conn.request(CTD(MN, 3, (tag, SA))), CTDR)
            assert rate.limited == 7
            limited = [a for a, r in refusals if r == "too many handshakes a second"]
            assert len(limited) == 7 and not any(a.startswith("127.0.0.1:") for a in limited)
            # ... and it too is bounded (its bucket: 4, one spent).
            assert [await handshake(port, "127.0.0.1") for _ in range(4)] == [True] * 3 + [False]
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_the_handshake_rate_refills_and_its_table_is_bounded() -> None:
    """The buckets themselves (no sockets, a clock of the test's): a source gets its burst,
    then its rate; sources beyond the table's bound do not grow it."""
    from ipsecct.gateway.limits import HandshakeRate

    r = HandshakeRate(per_source=2, per_source_burst=4, total=100, total_burst=100,
                      max_sources=64)  # fmt: skip
    assert [r.allow("192.0.2.1", 0.0) for _ in range(5)] == [True] * 4 + [False]
    assert r.allow("192.0.2.1", 0.5) and not r.allow("192.0.2.1", 0.5)  # 2 a second
    for i in range(1000):
        r.allow(f"10.0.{i // 256}.{i % 256}", 1.0 + i / 10)
    assert r._sources is not None and len(r._sources) <= 64


def serve_with(pkidir: Path, handler: tlschannel.Handler) -> Awaitable[asyncio.Server]:
    return tlschannel.serve(handler, "127.0.0.1", 0, server_ctx(pkidir), timeout=5)


def test_deliver_hands_over_each_message_in_order_then_raises_as_recv_would(
    pkidir: Path,
) -> None:
    """The gateways' readers (peers.py) take messages as the transport decodes them: in
    order, several in one write included, those decoded before ``deliver`` first; the end of
    the channel is raised as recv raises it."""

    async def main() -> None:
        got: list[int] = []
        ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        async def handler(conn: CxtpConnection) -> None:
            first = await conn.recv(timeout=5)  # pulled, then pushed: one stream
            assert isinstance(first, CTD)
            got.append(first.elapsed_ms)
            try:
                await conn.deliver(lambda m: got.append(m.elapsed_ms if isinstance(m, CTD) else -1))
            except BaseException as exc:
                ended.set_result(exc)
                raise

        server = await serve_with(pkidir, handler)
        port = server.sockets[0].getsockname()[1]
        try:
            conn = await tlschannel.connect(
                "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
            )
            # Three in one record (the first pulled, two left decoded), then two more.
            await conn.send_raw(b"".join(cxtp.encode(CTD(MN, i, (SA,))) for i in range(3)))
            await eventually(lambda: len(got) == 3, "the first three")
            await conn.send_raw(cxtp.encode(CTD(MN, 3, (SA,))) + cxtp.encode(CTD(MN, 4, (SA,))))
            await eventually(lambda: len(got) == 5, "the last two")
            await conn.close()
            exc = await asyncio.wait_for(ended, 5)
            assert isinstance(exc, ChannelClosed), exc
            assert got == [0, 1, 2, 3, 4]
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_deliver_raises_what_the_handler_raised_and_delivers_nothing_after_it(
    pkidir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's error ends the delivery (and the connection, as the server's handler
    does with any error): the messages after it, even in the same record, are not handed
    over; the server logs one line and goes on serving."""
    caplog.set_level(logging.WARNING, logger="ipsecct.gateway.tlschannel")

    async def main() -> None:
        got: list[int] = []
        raised: list[BaseException] = []

        def take(m: cxtp.Message) -> None:
            assert isinstance(m, CTD)
            got.append(m.elapsed_ms)
            if m.elapsed_ms == 1:
                raise ChannelError("the handler refuses message 1")

        async def handler(conn: CxtpConnection) -> None:
            try:
                await conn.deliver(take)
            except BaseException as exc:
                raised.append(exc)
                raise

        server = await serve_with(pkidir, handler)
        port = server.sockets[0].getsockname()[1]
        try:
            conn = await tlschannel.connect(
                "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
            )
            await conn.send_raw(b"".join(cxtp.encode(CTD(MN, i, (SA,))) for i in range(4)))
            with pytest.raises(ChannelClosed):  # the server closed it
                await conn.recv(timeout=5)
            await conn.close()
            assert got == [0, 1]
            assert len(raised) == 1 and "refuses message 1" in str(raised[0])
            # the next client is served
            async with await tlschannel.connect(
                "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
            ) as ok:
                await ok.send(CTD(MN, 7, (SA,)))
                await eventually(lambda: got[-1:] == [7], "the next client's message")
        finally:
            server.close()
            await server.wait_closed()

    run(main())
    assert "refuses message 1" in caplog.text


def test_a_connection_nobody_reads_holds_back_its_peer_not_an_unbounded_inbox(
    pkidir: Path,
) -> None:
    """Messages are decoded as they arrive; while nobody takes them (recv), reading stops:
    the inbox holds what one read decoded, the rest waits in TCP (the sender's drain times
    out), and every message still comes out, in order."""

    async def main() -> None:
        conns: list[CxtpConnection] = []
        release = asyncio.Event()

        async def handler(conn: CxtpConnection) -> None:
            conns.append(conn)
            await release.wait()

        server = await serve_with(pkidir, handler)
        port = server.sockets[0].getsockname()[1]
        body = bytes.fromhex("8001") + bytes([125]) + bytes(997)  # one CDB of 1000 octets
        one = cxtp.encode(CTD(MN, 0, (SA, body)))
        n = 0
        try:
            conn = await tlschannel.connect(
                "127.0.0.1", port, client_ctx(pkidir), server_hostname="sg2"
            )
            await eventually(lambda: conns, "the server's connection")
            with pytest.raises(ChannelTimeout):  # until TCP's buffers are full
                while n < 100_000:
                    await conn.send_raw(one * 64, timeout=0.5)
                    n += 64
            assert n < 100_000
            inbox = len(conns[0]._stream.inbox)
            assert 0 < inbox < 1000, inbox  # one read (at most 256 KiB), not what was sent
            assert conns[0]._stream.reading_paused
            seen = 0
            while seen < n:  # all of it comes, in order, as it is read
                msg = await conns[0].recv(timeout=5)
                assert isinstance(msg, CTD) and msg.cdbs[1] == body
                seen += 1
            await conn.close()
            release.set()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_deliver_hands_over_what_a_read_decoded_after_the_timers_already_due(
    pkidir: Path,
) -> None:
    """After a pause (the process stopped, the loop blocked) the messages that waited in the
    channel reach the handler after the timers that fell due meanwhile, as from a woken
    reader task (a fail-over standby sees its pause in either order now:
    tests/test_failover.py::test_no_seq_sent_twice_a_paused_standby_sees_the_pause_whatever_the_loop_runs_first)."""
    import threading

    async def main() -> None:
        order: list[str] = []
        conns: list[CxtpConnection] = []
        go = threading.Event()
        sent = threading.Event()
        done = threading.Event()

        async def handler(conn: CxtpConnection) -> None:
            conns.append(conn)
            await conn.deliver(lambda m: order.append("message"))

        server = await serve_with(pkidir, handler)
        port = server.sockets[0].getsockname()[1]

        def client() -> None:  # a peer in another thread, blocking sockets
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with client_ctx(pkidir).wrap_socket(raw, server_hostname="sg2") as tls:
                go.wait(10)
                tls.sendall(cxtp.encode(CTD(MN, 0, (SA,))))
                sent.set()
                done.wait(10)  # (until the test is done with it)

        t = threading.Thread(target=client)
        t.start()
        try:
            await eventually(lambda: conns, "the server's connection")
            await asyncio.sleep(0.05)  # the handler is in deliver
            loop = asyncio.get_running_loop()

            def blocked() -> None:  # the loop does not run while the peer sends
                loop.call_later(0.01, order.append, "timer")
                go.set()
                assert sent.wait(5)
                time.sleep(0.2)  # the message is in the socket, the timer due

            loop.call_soon(blocked)
            await eventually(lambda: len(order) == 2, "the timer and the message")
            assert order == ["timer", "message"]
        finally:
            go.set()
            done.set()
            await asyncio.to_thread(t.join, 10)
            server.close()
            await server.wait_closed()

    run(main())


def test_a_burst_written_into_a_reset_channel_is_one_line_not_fifty(
    pkidir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer channel is reset under a burst of sends (nftables ``reject with tcp reset``,
    as tests/test_failover_reform.py cuts a pair): the TCP transport fails at the first
    write that meets the reset, but TLS takes every write until asyncio runs its
    connection_lost a few loop turns later. On main each write past the fifth logged
    asyncio's "socket.send() raised exception." (~50 lines in CI, burying the fail-over
    lines). Now the channel stops writing once its TCP connection failed: one line
    (``peer-write-failed``), the rest counted (``lost_writes``), the loss reported once."""
    import contextlib
    import os
    import subprocess

    from ipsecct.gateway.peers import PeerChannels
    from tests.helpers.config_files import GOOD, write

    caplog.set_level(logging.INFO)
    table = f"fohreset_{os.getpid()}"

    async def main() -> tuple[int, list[str]]:
        got: list[cxtp.Message] = []

        async def handler(conn: CxtpConnection) -> None:
            with contextlib.suppress(ChannelError, CxtpError):
                await conn.deliver(got.append)

        server = await tlschannel.serve(handler, "127.0.0.1", 0, server_ctx(pkidir), timeout=5)
        port = server.sockets[0].getsockname()[1]
        text = GOOD + (
            '[transfer]\nlisten = "127.0.0.1:0"\ncert = "t1.keys"\nkey = "t1.keys"\n'
            f'ca = "t1.keys"\n[[peers]]\nname = "sg2"\naddress = "127.0.0.1:{port}"\n'
        )
        tcfg = config.load(write(tmp_path, text)).transfer
        assert tcfg is not None
        pc = PeerChannels(tcfg, "sg1")
        pc.client_ctx = client_ctx(pkidir)
        lost: list[str] = []
        pc.on_lost = lost.append
        msg = CTD(MN, 3, (cxtp.TransferTag(1, 0).encode(), SA))
        try:
            await pc.connection("sg2")
            pc.send("sg2", msg)
            await eventually(lambda: len(got) == 1, "the channel to carry a message")
            rules = (f"table inet {table} {{\n chain c {{\n type filter hook input priority 0;"
                     f"\n tcp flags & rst == rst accept\n tcp dport {port} reject with tcp reset"
                     f"\n tcp sport {port} reject with tcp reset\n }}\n}}\n")  # fmt: skip
            subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
            for _ in range(60):  # one burst, as a poll's messages or a whole state in pieces
                pc.send("sg2", msg)
            await eventually(lambda: lost == ["sg2"], "the loss to be reported")
            return pc.lost_writes.get("sg2", 0), lost
        finally:
            subprocess.run(["nft", "delete", "table", "inet", table], check=False)
            await pc.stop()
            server.close()
            await server.wait_closed()

    dropped, lost = run(main())
    lines = [r.getMessage() for r in caplog.records]
    noise = [m for m in lines if "socket.send() raised" in m or "SSL connection is closed" in m]
    assert noise == [], f"{len(noise)} lines: {noise[:3]}"
    told = [m for m in lines if "event=peer-write-failed" in m]
    assert len(told) == 1 and "peer=sg2" in told[0], told
    assert lost == ["sg2"] and dropped >= 50, dropped

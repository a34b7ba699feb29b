"""The channel between gateways: CXTP over TLS 1.3 over TCP, with mutual certificate auth.

A thin asyncio adapter around :mod:`ipsecct.ct.cxtp` (which does all the parsing, sans-I/O):

* :func:`server_context` and :func:`client_context` make :class:`ssl.SSLContext` objects that
  speak TLS 1.3 only and require a certificate from the peer, signed by the configured CA, in
  both directions. The client also checks the server's name (a DNS or IP SAN).
* :func:`peer_identity` reads the verified peer certificate's CN and SANs after the handshake;
  what a peer may do is the caller's decision (its policy names peers by these names).
* :class:`CxtpConnection` sends and receives whole CXTP messages: the TLS transport's protocol
  (:class:`_Stream`) decodes them as the bytes arrive, and they are pulled (``recv``, every
  wait with a timeout) or pushed to a handler as they are decoded (``deliver``, the gateways'
  long-lived readers: no task woken per message). :func:`connect` and :func:`serve` set them
  up.

Nothing here reads the clock beyond asyncio's own timeouts, and nothing logs message contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from ..ct import cxtp
from ..errors import ChannelClosed, ChannelError, ChannelTimeout, CxtpError, IpsecctError
from ..ikev2.auth import not_a_ca, subject_of
from ..ipsec.ippacket import IPAddress
from ..tools.files import SECRET_LIMIT, read_limited
from .limits import ConnectionLimits, HandshakeRate, source_of
from .log import RateLimited

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0  # seconds, per wait (CT_REQUEST_RETRY); callers pass their own
DEFAULT_HANDSHAKE_TIMEOUT = 3.0  # an unauthenticated connection holds a descriptor this long
CXTP_TLS_PORT = 5091  # RFC 4067's SCTP port, reused for TCP/TLS
# A channel whose peer stopped acknowledging (it lost power, a partition black-holes the path:
# no FIN, no RST) is dropped after this long with data unacknowledged, or when idle after
# KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL s of unanswered probes. Without it
# such a channel stayed "open" for the kernel's ~15 minutes of retransmissions: every message
# to the peer went into it, and the peer's new channel (after its restart) was never used.
USER_TIMEOUT = 15.0  # seconds
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


PathLike = str | Path


def _cert_key_problem(cert: PathLike, key: PathLike, exc: ssl.SSLError) -> str:
    """Which of the two files is wrong (OpenSSL's "PEM lib" named neither)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        x509.load_pem_x509_certificates(Path(cert).read_bytes())
    except (OSError, ValueError):
        return f"cannot load the certificate file {cert}: not a PEM certificate"
    try:
        load_pem_private_key(Path(key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError):  # never quote the file
        return f"cannot load the key file {key}: not an unencrypted PEM private key"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"the key file {key} does not belong to the certificate in {cert}"
    return f"cannot load the certificate {cert} with the key {key} ({exc.reason or exc})"


def check_ca_file(ca: PathLike) -> None:
    """The CA file holds PEM certificates, each one a CA (ChannelError naming the file and
    the certificate otherwise)."""
    try:
        pem = read_limited(ca, SECRET_LIMIT)
    except OSError as exc:
        raise ChannelError(f"cannot read the CA file {ca}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ChannelError(f"the CA file {ca} holds no PEM certificate") from None
    for c in certs:
        why = not_a_ca(c)
        if why is not None:
            raise ChannelError(f"the CA file {ca}: {subject_of(c)} is not a CA certificate "
                               f"({why}); name the CA that issued the gateways' "
                               "certificates")  # fmt: skip


def not_valid_at(paths: list[PathLike], now: dt.datetime) -> list[str]:
    """What in the PEM certificate files ``paths`` is not valid at ``now`` (expired, or not
    yet valid: every handshake with it fails, or every peer certificate from that CA, and
    nothing said so before the first transfer): one text per certificate, naming the file,
    the subject and the date."""
    out = []
    for p in paths:
        try:
            certs = x509.load_pem_x509_certificates(read_limited(p, SECRET_LIMIT))
        except (OSError, ValueError):
            continue  # (the contexts said what is wrong with the file)
        for c in certs:
            if now > c.not_valid_after_utc:
                out.append(f"{p}: {subject_of(c)} expired on {c.not_valid_after_utc:%Y-%m-%d}")
            elif now < c.not_valid_before_utc:
                out.append(f"{p}: {subject_of(c)} is valid only from "
                           f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    return out


def _base_context(server: bool, cert: PathLike, key: PathLike, ca: PathLike) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    check_ca_file(ca)
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise ChannelError(f"cannot load the CA file {ca} ({exc.reason or exc})") from None
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise ChannelError(_cert_key_problem(cert, key, exc)) from None
    return ctx


def server_context(cert: PathLike, key: PathLike, ca: PathLike) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate signed by ``ca``."""
    return _base_context(True, cert, key, ca)


def client_context(
    cert: PathLike, key: PathLike, ca: PathLike, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``cert`` and requiring a server cert from ``ca``.

    With ``check_hostname`` (the default) the server's certificate must name the
    ``server_hostname`` given to :func:`connect` in a DNS or IP SAN.
    """
    ctx = _base_context(False, cert, key, ca)
    ctx.check_hostname = check_hostname
    return ctx


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Names in the peer's verified certificate."""

    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[IPAddress, ...]
    fingerprint: str  # SHA-256 of the DER certificate, hex

    @property
    def name(self) -> str | None:
        """The gateway name: the first DNS SAN, else the CN."""
        return self.dns_names[0] if self.dns_names else self.common_name

    def matches(self, name: str) -> bool:
        """Does the certificate name ``name``? Its DNS SANs if it has any, else its CN (RFC
        6125 6.4.4): a certificate issued for sg9 with "sg2" in its CN is not sg2's, as the
        client side's TLS name check already held (the listener took it for sg2)."""
        if self.dns_names:
            return name in self.dns_names
        return name == self.common_name


def identity_from_der(der: bytes) -> PeerIdentity:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise ChannelError("peer certificate cannot be parsed") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    dns: list[str] = []
    ips: list[IPAddress] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = list(san.get_values_for_type(x509.DNSName))
        for a in san.get_values_for_type(x509.IPAddress):
            if isinstance(a, IPAddress):
                ips.append(a)
    except x509.ExtensionNotFound:
        pass
    return PeerIdentity(
        cn if isinstance(cn, str) else None,
        tuple(dns),
        tuple(ips),
        cert.fingerprint(hashes.SHA256()).hex(),
    )


def peer_identity(obj: ssl.SSLObject | ssl.SSLSocket | asyncio.StreamWriter) -> PeerIdentity:
    """The peer's identity after a completed handshake (the certificate was verified)."""
    sslobj: ssl.SSLObject | ssl.SSLSocket | None = (
        obj.get_extra_info("ssl_object") if isinstance(obj, asyncio.StreamWriter) else obj
    )
    if sslobj is None:
        raise ChannelError("not a TLS connection")
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        raise ChannelError("the peer presented no certificate")
    return identity_from_der(der)


MessageHandler = Callable[[cxtp.Message], None]


class _Stream(asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """The TLS transport's application protocol: the bytes are cut into CXTP messages as they
    arrive, in the transport's own callback (no StreamReader, no task woken per message).

    Pulled (:meth:`CxtpConnection.recv`): the messages wait in ``inbox``, and reading is
    paused while any wait (the inbox holds at most what one read decoded; the peer is held
    back by TCP's window). Pushed (:meth:`CxtpConnection.deliver`): what one read decoded is
    handed to ``on_message`` by one callback queued on the loop (``call_soon``), as a reader
    task was woken: after the timers already due in this loop turn. (A fail-over standby
    no longer relies on that order to see a pause before the messages that waited in the
    channel make the active look alive: it looks before each message too,
    ``FailoverDriver._check_paused``.) The writing side's flow control (``drain``) and close
    waiter are the StreamWriter's, as with asyncio's own stream protocol."""

    def __init__(self, max_message: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.decoder = cxtp.StreamDecoder(max_message)
        self.inbox: deque[cxtp.Message] = deque()
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        # How the stream ended (raised once the inbox is read): a CxtpError (malformed, cut
        # in mid-message), a ChannelClosed, or what ``on_message`` raised.
        self.end: BaseException | None = None
        self.reported = False  # the end was raised once (a ChannelClosed after it)
        self.failure: BaseException | None = None  # what on_message raised (ends it first)
        self.on_message: MessageHandler | None = None
        self.delivery_due = False  # a _deliver callback is queued on the loop
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.closed = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _finish(self, exc: BaseException) -> None:
        if self.end is None:
            self.end = exc
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.end is not None:
            return  # the stream has ended (a malformed message, a failed handler): nothing more
        try:
            msgs = self.decoder.feed(data)
        except CxtpError as exc:
            self._finish(exc)
            return
        if not msgs:
            return
        self.inbox.extend(msgs)
        if self.on_message is not None:
            if not self.delivery_due:
                self.delivery_due = True
                self.loop.call_soon(self._deliver)
            return
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _deliver(self) -> None:
        self.delivery_due = False
        on_message = self.on_message
        while on_message is not None and self.inbox and self.failure is None:
            try:
                on_message(self.inbox.popleft())
            except Exception as exc:  # the deliverer raises it, as recv's loop did: the
                self.failure = exc  # messages after it are not handed over
                self.inbox.clear()
                self._finish(exc)
                return

    def eof_received(self) -> bool | None:
        if not self.decoder.at_boundary():
            self._finish(
                CxtpError(
                    f"truncated message: {self.address} closed the connection in mid-message"
                )
            )
        else:
            self._finish(ChannelClosed(f"{self.address} closed the connection"))
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # wakes a writer waiting in drain()
        if exc is None:
            self._finish(ChannelClosed(f"connection to {self.address} is closed"))
        else:
            self._finish(ChannelClosed(f"connection to {self.address} lost: {_reason(exc)}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self.closed

    def resume(self) -> None:
        """The inbox was read: take more from the transport."""
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()


class CxtpConnection:
    """Whole CXTP messages over a TLS transport; every wait is bounded by ``timeout``."""

    def __init__(
        self,
        stream: _Stream,
        writer: asyncio.StreamWriter,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tcp: asyncio.BaseTransport | None = None,
    ) -> None:
        self._stream = stream
        self.writer = writer
        self.timeout = timeout
        self._closed = False
        # The TCP transport under TLS (see ``failed``).
        self._tcp = tcp
        self.peer: PeerIdentity = peer_identity(writer)
        address = writer.get_extra_info("peername")
        self.peer_address: str = f"{address[0]}:{address[1]}" if address else "?"
        stream.address = self.peer_address

    def __repr__(self) -> str:
        return f"CxtpConnection(peer={self.peer.name!r}, address={self.peer_address!r})"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> bool:
        """Is the TCP connection under TLS closing (a send or a read failed: a reset, or it
        was closed)? The TLS layer learns it a few loop turns later (asyncio tells its
        connection_lost from a callback), and until then takes every write: each one is lost,
        and asyncio logs "socket.send() raised exception." for each past the fifth (fifty
        lines for a burst written into a reset channel)."""
        return self._closed or (self._tcp is not None and self._tcp.is_closing())

    @property
    def delivery_due(self) -> bool:
        """Has a read decoded messages whose delivery (:meth:`deliver`) is queued on the
        loop and has not run yet?"""
        return self._stream.delivery_due

    async def send(self, msg: cxtp.Message, *, timeout: float | None = None) -> None:
        await self.send_raw(cxtp.encode(msg), timeout=timeout)

    async def send_raw(self, data: bytes, *, timeout: float | None = None) -> None:
        """Write bytes as they are (tests use it to send malformed messages)."""
        if self.failed:
            raise ChannelClosed(f"connection to {self.peer_address} is closed")
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                await self.writer.drain()
        except TimeoutError:
            raise ChannelTimeout(f"sending to {self.peer_address} timed out") from None
        except (ConnectionError, ssl.SSLError) as exc:
            self._closed = True
            raise ChannelClosed(f"connection to {self.peer_address} lost: {_reason(exc)}") from None

    def _ended(self) -> BaseException:
        """How the stream ended (what a handler raised first), the first time it is asked;
        a ChannelClosed after."""
        self._closed = True
        st = self._stream
        end = st.failure or st.end
        if end is None or st.reported:
            return ChannelClosed(f"connection to {self.peer_address} is closed")
        st.reported = True
        return end

    async def recv(self, *, timeout: float | None = None) -> cxtp.Message:
        """The next message. Raises ChannelTimeout, ChannelClosed or CxtpError.

        A peer that hangs up in mid-message sent a truncated message: CxtpError. After a
        CxtpError the stream has lost its framing; close the connection.
        """
        st = self._stream
        if st.on_message is not None:
            raise ChannelError("the connection's messages are being delivered (deliver)")
        if st.inbox:
            msg = st.inbox.popleft()
            if not st.inbox:
                st.resume()
            return msg
        if self._closed and st.end is None:
            raise ChannelClosed(f"connection to {self.peer_address} is closed")
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while not st.inbox and st.end is None:
                    st.waiter = asyncio.get_running_loop().create_future()
                    try:
                        await st.waiter
                    finally:
                        st.waiter = None
        except TimeoutError:
            raise ChannelTimeout(
                f"no message from {self.peer_address} within {limit:g} s"
            ) from None
        if not st.inbox:
            raise self._ended()
        msg = st.inbox.popleft()
        if not st.inbox:
            st.resume()
        return msg

    async def deliver(self, on_message: MessageHandler) -> None:
        """Hand every message to ``on_message`` as it arrives (what one read decoded, from
        one callback queued on the loop: no task woken, no timer armed per message, and the
        timers already due run first, as before a woken reader task), until the connection
        ends; then raise as :meth:`recv`
        does (ChannelClosed, or CxtpError), or what ``on_message`` raised (the messages
        after it are not delivered). The wait has no time-out of its own: it lasts as long as
        the channel, whose silent peer TCP's keep-alives and user time-out detect
        (:func:`dead_peer_detection`)."""
        st = self._stream
        if st.on_message is not None:
            raise ChannelError("the connection's messages are already being delivered")
        st.on_message = on_message
        try:
            while st.failure is None:
                while st.inbox:  # decoded before, or left when the stream ended
                    on_message(st.inbox.popleft())
                if st.end is not None:
                    break
                st.resume()
                st.waiter = asyncio.get_running_loop().create_future()
                try:
                    await st.waiter
                finally:
                    st.waiter = None
        finally:
            st.on_message = None
        raise self._ended()

    async def request(self, msg: cxtp.Message, *, timeout: float | None = None) -> cxtp.Message:
        """Send one message and wait for the next one from the peer."""
        await self.send(msg, timeout=timeout)
        return await self.recv(timeout=timeout)

    def abort(self) -> None:
        """Drop the connection at once, with whatever waits in its write buffer (a peer that
        reads nothing would hold it for ever)."""
        self._closed = True
        self.writer.transport.abort()

    async def close(self) -> None:
        self._closed = True
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await self.writer.wait_closed()

    async def __aenter__(self) -> CxtpConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def dead_peer_detection(writer: asyncio.StreamWriter) -> None:
    """Bound how long a channel to a silent peer stays open (USER_TIMEOUT, keep-alives)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(USER_TIMEOUT * 1000))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    return str(exc) or type(exc).__name__


async def connect(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> CxtpConnection:
    """Open a TLS connection to a peer gateway. ``server_hostname`` is the name its certificate
    must carry (defaults to ``host``)."""
    loop = asyncio.get_running_loop()
    stream = _Stream(cxtp.MAX_MESSAGE_LEN, loop)
    tcp: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(handshake_timeout):
            # TCP, then TLS over it (as the listener does): the TCP transport is the one
            # that knows first when the connection fails (CxtpConnection.failed).
            tcp, _ = await loop.create_connection(asyncio.Protocol, host, port)
            try:
                transport = await loop.start_tls(
                    tcp,
                    stream,
                    ctx,
                    server_hostname=server_hostname or host,
                    ssl_handshake_timeout=handshake_timeout,
                )
            except BaseException:
                tcp.abort()
                raise
            if transport is None:
                tcp.abort()
                raise ConnectionAbortedError("closed during the TLS handshake")
    except TimeoutError:
        raise ChannelTimeout(f"TLS connection to {host}:{port} timed out") from None
    except ssl.SSLError as exc:
        raise ChannelError(f"TLS handshake with {host}:{port} failed: {_reason(exc)}") from None
    except (ConnectionResetError, ConnectionAbortedError, EOFError) as exc:
        # A peer that refuses us during the handshake may just drop the connection.
        raise ChannelError(f"TLS handshake with {host}:{port} failed: {_reason(exc)}") from None
    except OSError as exc:
        raise ChannelError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    stream.connection_made(transport)  # (start_tls does not call it)
    writer = asyncio.StreamWriter(transport, stream, None, loop)
    dead_peer_detection(writer)
    try:
        return CxtpConnection(stream, writer, timeout=timeout, tcp=tcp)
    except ChannelError:
        writer.close()
        raise


Handler = Callable[[CxtpConnection], Awaitable[None]]


Refused = Callable[[str, str], None]


async def serve(
    handler: Handler,
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    on_refused: Refused | None = None,
    limits: ConnectionLimits | None = None,
    rate: HandshakeRate | None = None,
) -> asyncio.Server:
    """Accept TLS connections and run ``handler`` on each, then close it.

    Peers that fail the handshake (no certificate, one from another CA, an old TLS version)
    never reach ``handler``: ``on_refused(address, reason)`` hears of each, so they can be
    counted and logged. An IpsecctError (a malformed message, a timeout, a closed peer) or
    OSError out of ``handler`` is logged in one line and ends that connection only; the server
    keeps accepting.

    ``limits`` (default: :class:`ConnectionLimits`' defaults) bounds the connections open per
    source address and in total, handshakes included: the rest are closed on arrival and
    reported to ``on_refused``. A handshake gets ``handshake_timeout``; the log lines about
    refusals are rate-limited.

    ``rate`` (default: :class:`HandshakeRate`'s defaults, ``limits``' reserved sources as its
    own) bounds the handshakes started per second, per source address and in all: a
    connection over the rate is closed on arrival, before its handshake, and reported to
    ``on_refused`` too.
    """
    lim = limits if limits is not None else ConnectionLimits()
    hs = rate if rate is not None else HandshakeRate(reserved=lim.reserved)
    quiet = RateLimited()
    loop = asyncio.get_running_loop()

    def refused(writer: asyncio.StreamWriter, reason: str) -> None:
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if peer else "?"
        quiet.event(
            log,
            "connection-refused",
            logging.WARNING,
            key=source_of(peer),
            address=address,
            reason=reason,
        )
        if on_refused is not None:
            on_refused(address, reason)
        writer.close()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = source_of(writer.get_extra_info("peername"))
        if not hs.allow(source, loop.time()):
            refused(writer, "too many handshakes a second")
            return
        if not lim.admit(source):
            refused(writer, "too many connections")
            return
        dead_peer_detection(writer)
        try:
            await _serve_one(reader, writer)
        finally:
            lim.release(source)

    async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The handshake runs here, not inside asyncio's server, so that a failed one is seen.
        stream = _Stream(cxtp.MAX_MESSAGE_LEN, loop)
        try:
            async with asyncio.timeout(handshake_timeout):
                await writer.drain()
                transport = await loop.start_tls(
                    writer.transport,
                    stream,
                    ctx,
                    server_side=True,
                    ssl_handshake_timeout=handshake_timeout,
                )
        except ssl.SSLError as exc:
            refused(writer, f"TLS handshake failed: {_reason(exc)}")
            return
        except (TimeoutError, ConnectionError, OSError) as exc:
            refused(writer, f"TLS handshake did not complete: {_reason(exc)}")
            return
        if transport is None:  # the connection was closed during the handshake
            refused(writer, "TLS handshake did not complete: connection closed")
            return
        stream.connection_made(transport)  # (start_tls does not call it)
        tls = asyncio.StreamWriter(transport, stream, None, loop)
        try:
            conn = CxtpConnection(stream, tls, timeout=timeout, tcp=writer.transport)
        except ChannelError as exc:
            refused(tls, str(exc))
            return
        try:
            await handler(conn)
        except (IpsecctError, OSError) as exc:
            quiet.event(
                log,
                "connection-ended",
                logging.WARNING,
                key=conn.peer_address,
                peer=conn.peer.name,
                address=conn.peer_address,
                error=f"{type(exc).__name__}: {exc}",
            )
        except Exception as exc:  # a bug: one line, and the listener carries on
            quiet.event(
                log,
                "handler-failed",
                logging.ERROR,
                peer=conn.peer.name,
                address=conn.peer_address,
                error=type(exc).__name__,
            )
        finally:
            await conn.close()

    return await asyncio.start_server(on_client, host, port)

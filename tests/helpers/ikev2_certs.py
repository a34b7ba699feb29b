"""Certificates and certificate peers for the IKEv2 tests: a CA with a peer certificate
(``cert_pki``), end-entity certificates (``leaf_cert``, ``resubject``), revocation lists
(``make_crl``), connections that authenticate with them (``pubkey_conn``), and IKE SAs of
such peers with their contexts (``revocable_peer``, ``revoking_target``, ``san_matched``,
``cert_context``; ``rekeyed_context``, ``unfinished_context``), for tests/test_ikev2 and
the modules that imported them from it."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Sequence
from typing import Any

from ipsecct.ikev2.config import Connection, Identity
from ipsecct.ikev2.engine import IkeEngine
from tests.helpers.ikev2_engines import (
    Wire,
    conn,
    connect,
    gateway_rekeyed_before_the_fail_over,
    mn_conn,
    peer_rekeyed_before_the_move,
)


def cert_pki(kind: str) -> tuple[object, object, object, object]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    def key() -> object:
        if kind == "rsa":
            return rsa.generate_private_key(65537, 2048)
        curve = {"p256": ec.SECP256R1, "p384": ec.SECP384R1, "p521": ec.SECP521R1}[kind]
        return ec.generate_private_key(curve())  # type: ignore[abstract]  # (a concrete curve)

    now = dt.datetime.now(dt.UTC)

    def cert(cn: str, k: object, issuer: object, ikey: object, ca: bool, days: int = 30) -> object:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(issuer).public_key(k.public_key())  # type: ignore[attr-defined, arg-type]
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        return b.sign(ikey, hashes.SHA256())  # type: ignore[arg-type]  # fmt: skip

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")])
    ca = cert("CA", ca_key, ca_name, ca_key, True)
    k = key()
    return ca, cert("peer.test", k, ca_name, ca_key, False), k, ca_key


@functools.cache
def rekeyed_context() -> tuple[bytes, ...]:
    from ipsecct.ikev2 import context

    _w, _i, ike_r, _d = peer_rekeyed_before_the_move()
    return tuple(context.encode(ike_r, 7.0))


@functools.cache
def cert_context() -> tuple[bytes, ...]:
    from ipsecct.ikev2 import context

    w, _ca, _gw = san_matched()
    return tuple(context.encode(w.resp.ike_sas()[0], 1.0))


@functools.cache
def unfinished_context() -> tuple[bytes, ...]:
    """Our DELETE unanswered (item 30) and the peer's address unverified (item 31)."""
    from ipsecct.ikev2 import context

    _w, _i, ike_r, _old = gateway_rekeyed_before_the_fail_over()
    ike_r.rr_due = True
    return tuple(context.encode(ike_r, 6.0))


def leaf_cert(ca: object, ca_key: object, key: object, cn: str,
               sans: Sequence[object] | None = None) -> object:  # fmt: skip
    """An end-entity certificate for ``key`` named CN=``cn`` (and ``sans``, if any), issued
    by ``ca`` (a day before now to three days after)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca.subject).public_key(key.public_key())  # type: ignore[attr-defined]
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1))
         .not_valid_after(now + dt.timedelta(days=3))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                        critical=True))  # fmt: skip
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)  # type: ignore[arg-type]
    return b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]


def pubkey_conn(c: Connection, cert: object, key: object, remote_id: str, ca: object) -> Connection:
    """``c`` authenticating both ways with certificates: ours ``cert`` and ``key``, the
    peer's named ``remote_id`` and issued by ``ca``."""
    from ipsecct.ikev2.auth import Credentials

    return dataclasses.replace(c, local_auth="pubkey", remote_auth="pubkey", local_id=None,
                               remote_id=Identity(remote_id),
                               credentials=Credentials((cert,), key),  # type: ignore[arg-type]
                               cacerts=[ca])  # type: ignore[list-item]  # fmt: skip


def resubject(cert: object, subject: object, ca_key: object) -> object:
    """``cert`` with another subject, signed again by ``ca_key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    c: x509.Certificate = cert  # type: ignore[assignment]
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(c.issuer)  # type: ignore[arg-type]
         .public_key(c.public_key()).serial_number(c.serial_number)
         .not_valid_before(c.not_valid_before_utc).not_valid_after(c.not_valid_after_utc))
    for e in c.extensions:
        b = b.add_extension(e.value, e.critical)
    return b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]  # fmt: skip


def make_crl(ca: object, ca_key: object, revoked: list[object], *, days: int = 7) -> object:
    """A revocation list of ``ca`` (signed by ``ca_key``) naming the certificates ``revoked``;
    ``days``: its next update from now (negative: stale)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)  # type: ignore[attr-defined]
         .last_update(now - dt.timedelta(days=1)).next_update(now + dt.timedelta(days=days)))
    for c in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(c.serial_number)  # type: ignore[attr-defined]
            .revocation_date(now - dt.timedelta(hours=1)).build())
    return b.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]  # fmt: skip


@functools.cache
def revocable_peer() -> tuple[Wire, Any, Any, Connection, Any, Any]:
    """An MN authenticated with its certificate (mn_cert) to gw: (the wire, the CA, its
    key, gw's connection, mn_cert, another certificate of the CA)."""
    import time

    ca, gw_cert, gw_key, ca_key = cert_pki("p256")
    mn_key = cert_pki("p256")[2]
    mn_cert = leaf_cert(ca, ca_key, mn_key, "mn.test")
    other_cert = leaf_cert(ca, ca_key, mn_key, "other.test")
    gw = pubkey_conn(conn(), gw_cert, gw_key, "CN=mn.test", ca)
    ini = IkeEngine([pubkey_conn(mn_conn(), mn_cert, mn_key, "peer.test", ca)],
                    wall_offset=time.time())  # fmt: skip
    w = Wire(ini, IkeEngine([gw], wall_offset=time.time()))
    connect(w)
    return w, ca, ca_key, gw, mn_cert, other_cert


@functools.cache
def revoking_target() -> tuple[tuple[bytes, ...], bytes, Connection]:
    """The context and UNIT payload of revocable_peer's IKE SA, and a connection whose
    remote.crls revoke its certificate."""
    from ipsecct.ikev2 import context
    from ipsecct.ikev2.auth import revocation_index

    w, ca, ca_key, gw, mn_cert, _ = revocable_peer()
    (ike,) = w.resp.ike_sas()
    lists = [revocation_index(make_crl(ca, ca_key, [mn_cert]))]  # type: ignore[arg-type]
    (payload,) = context.unit_payloads(ike, ike.children)
    return (tuple(context.encode(ike, 1.0)), payload,
            dataclasses.replace(gw, crls=lambda: lists))  # fmt: skip


def san_matched() -> tuple[Wire, object, Connection]:
    """A MN authenticates with a certificate (P-256, our CA) naming itself by its DN, with
    subjectAltNames dns:mn.test, email:mn@test and ip:10.2.0.5; the gateway's ``remote.id``
    is ``mn.test``: matched by the SAN. Returns the wire, the CA and the gateway's
    connection."""
    import time

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    ca, gw_cert, gw_key, ca_key = cert_pki("p256")
    mn_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("mn.test"), x509.RFC822Name("mn@test"),
            x509.IPAddress(ipaddress.ip_address("10.2.0.5"))]  # fmt: skip
    mn_cert = leaf_cert(ca, ca_key, mn_key, "mn", sans)

    def pk(c: Connection, cert: object, key: object, remote_id: str) -> Connection:
        return pubkey_conn(c, cert, key, remote_id, ca)

    gw = pk(conn(), gw_cert, gw_key, "mn.test")
    ini = IkeEngine([pk(mn_conn(), mn_cert, mn_key, "peer.test")], wall_offset=time.time())
    w = Wire(ini, IkeEngine([gw], wall_offset=time.time()))
    connect(w)
    return w, ca, gw

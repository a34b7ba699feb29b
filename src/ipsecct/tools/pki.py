"""A small test PKI for the TLS channel between gateways: one CA and one certificate per gateway.

Everything is EC P-256 with SHA-256 signatures. A gateway certificate names the gateway in its
subject CN and as a DNS SAN, adds 127.0.0.1 and ::1 as IP SANs (so loopback tests can check the
server name), and carries both serverAuth and clientAuth, because every gateway is a TLS server
for some transfers and a client for others. Private keys are written unencrypted with mode 0600.

This is for tests and demos. A deployment uses its own CA; ``docs/cxtp.md`` says what the TLS
channel expects of the certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import PkiError
from .files import SECRET_LIMIT, read_limited

CA_DAYS = 3650
GATEWAY_DAYS = 825
ORGANIZATION = "ipsecct test PKI"
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key (the key stays out of ``repr``)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"Issued(subject={self.cert.subject.rfc4514_string()!r})"


def check_gateway_name(name: str) -> str:
    """A gateway name must be one DNS label: it becomes a file name and a DNS SAN."""
    if not _NAME_RE.match(name):
        raise PkiError(f"gateway name {name!r} is not a DNS label (letters, digits, '-')")
    return name


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(now: dt.datetime, name: str = "ipsecct test CA", days: int = CA_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_gateway(ca: Issued, name: str, now: dt.datetime, days: int = GATEWAY_DAYS) -> Issued:
    check_gateway_name(name)
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(name),
            x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            x509.IPAddress(ipaddress.IPv6Address("::1")),
        ]
    )
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode under O_TRUNC otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def pki_files(directory: Path, gateways: Sequence[str]) -> list[Path]:
    """Every file :func:`init_pki` writes, in order."""
    files = [directory / "ca.pem", directory / "ca.key"]
    for g in gateways:
        files += [directory / f"{g}.pem", directory / f"{g}.key"]
    return files


def init_pki(
    directory: str | Path, gateways: Sequence[str], now: dt.datetime, *, force: bool = False
) -> list[Path]:
    """Write ``ca.pem``/``ca.key`` and ``NAME.pem``/``NAME.key`` for each gateway.

    Refuses (before writing anything) if a file exists, unless ``force``. Returns the paths.
    """
    names = [check_gateway_name(g) for g in gateways]
    if not names:
        raise PkiError("at least one gateway name is needed")
    if len(set(names)) != len(names) or "ca" in names:
        raise PkiError("gateway names must be distinct and not 'ca'")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = pki_files(d, names)
    if not force:
        existing = [str(p) for p in files if p.exists()]
        if existing:
            raise PkiError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    ca = make_ca(now)
    _write(d / "ca.pem", cert_pem(ca.cert), 0o644, force)
    _write(d / "ca.key", key_pem(ca.key), 0o600, force)
    for g in names:
        gw = make_gateway(ca, g, now)
        _write(d / f"{g}.pem", cert_pem(gw.cert), 0o644, force)
        _write(d / f"{g}.key", key_pem(gw.key), 0o600, force)
    return files


def load_certificate(path: str | Path) -> x509.Certificate:
    data = read_limited(path, SECRET_LIMIT)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        pass
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path}: not a PEM or DER certificate") from None


def describe_file(path: str | Path) -> list[str]:
    """Human-readable lines about a certificate or private key file (never the key itself)."""
    data = read_limited(path, SECRET_LIMIT)
    if b"PRIVATE KEY-----" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise PkiError(f"{path}: not a readable unencrypted private key") from None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            kind = f"EC {key.curve.name}"
        else:
            kind = type(key).__name__
        mode = Path(path).stat().st_mode & 0o777
        return [f"private key: {kind}", f"file mode: {mode:04o}"]
    return describe_certificate(load_certificate(path))


def describe_certificate(cert: x509.Certificate) -> list[str]:
    lines = [
        f"subject: {cert.subject.rfc4514_string()}",
        f"issuer: {cert.issuer.rfc4514_string()}",
        f"serial: {cert.serial_number:x}",
        f"not before: {cert.not_valid_before_utc.isoformat()}",
        f"not after: {cert.not_valid_after_utc.isoformat()}",
        f"sha256 fingerprint: {cert.fingerprint(hashes.SHA256()).hex(':')}",
    ]
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        lines.append(f"public key: EC {pub.curve.name}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        lines.append(f"CA: {'yes' if bc.ca else 'no'}")
    except x509.ExtensionNotFound:
        pass
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
        names += [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)]
        lines.append(f"subject alt names: {', '.join(names)}")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        known = {
            ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
            ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
        }
        lines.append(
            "extended key usage: " + ", ".join(known.get(o, o.dotted_string) for o in eku)
        )
    except x509.ExtensionNotFound:
        pass
    return lines

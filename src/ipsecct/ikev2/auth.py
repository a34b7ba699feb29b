"""Authentication with certificates (RFC 7296 §2.15, §3.6-3.8; RFC 7427 digital signatures;
RFC 4754 ECDSA): signing and verifying AUTH payloads, matching an identity to its
certificate, validating a certificate chain to configured CAs, and CERTREQ contents. All with
``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import string
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..errors import AuthError
from .message import AuthMethod, IDPayload, IdType

# cryptography warns (a Python UserWarning, to standard error) when it reads a name attribute
# past X.520's upper bound, a CN over 64 characters: anyone's certificate at IKE_AUTH may hold
# one, and each length chosen made two new lines outside the log's format. strongSwan takes
# such names; they are compared, cut in log lines and refused as any others. (Installed
# again by parse_cert if something reset the filters since.)
_NAME_LENGTH_WARNING = "Attribute's length must be"


def _quiet_name_warnings() -> None:
    if not any(f[0] == "ignore" and f[2] is UserWarning and f[1] is not None
               and f[1].pattern == _NAME_LENGTH_WARNING for f in warnings.filters):  # fmt: skip
        warnings.filterwarnings("ignore", message=_NAME_LENGTH_WARNING, category=UserWarning)


_quiet_name_warnings()

# what reading a peer's certificate past its outer structure may raise: the X.509 parser
# reads extensions (and the key) only when asked, so a certificate that loaded may still hold
# an extension that is not DER, twice the same extension, or a key of an unknown kind
BAD_CERT = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType, x509.InvalidVersion)  # fmt: skip

CERT_X509_SIGNATURE = 4  # CERT/CERTREQ encoding (§3.6)

# RFC 7427 hash algorithms (IANA "IKEv2 Hash Algorithms") we sign and verify with
HASH_SHA256, HASH_SHA384, HASH_SHA512 = 2, 3, 4
SUPPORTED_HASHES = (HASH_SHA256, HASH_SHA384, HASH_SHA512)

# AlgorithmIdentifier DER encodings (RFC 7427 Appendix A) -> (key type, hash)
HashMaker = Callable[[], hashes.HashAlgorithm]
_ALG_IDS: dict[bytes, tuple[str, HashMaker]] = {
    bytes.fromhex("300d06092a864886f70d01010b0500"): ("rsa", hashes.SHA256),
    bytes.fromhex("300d06092a864886f70d01010c0500"): ("rsa", hashes.SHA384),
    bytes.fromhex("300d06092a864886f70d01010d0500"): ("rsa", hashes.SHA512),
    bytes.fromhex("300a06082a8648ce3d040302"): ("ecdsa", hashes.SHA256),
    bytes.fromhex("300a06082a8648ce3d040303"): ("ecdsa", hashes.SHA384),
    bytes.fromhex("300a06082a8648ce3d040304"): ("ecdsa", hashes.SHA512),
}
_ALG_OF = {v: k for k, v in _ALG_IDS.items()}

# RSASSA-PSS (RFC 4055, RFC 7427 §A.4.x): OID 1.2.840.113549.1.1.10 and its parameters
_OID_PSS = bytes.fromhex("2a864886f70d01010a")
_OID_MGF1 = bytes.fromhex("2a864886f70d010108")
_OID_HASH: dict[bytes, HashMaker] = {
    bytes.fromhex("608648016503040201"): hashes.SHA256,
    bytes.fromhex("608648016503040202"): hashes.SHA384,
    bytes.fromhex("608648016503040203"): hashes.SHA512,
}


def _der(tag: int, value: bytes) -> bytes:
    n = len(value)
    head = bytes((n,)) if n < 128 else bytes((0x81, n))  # (an AlgorithmIdentifier: < 256)
    return bytes((tag,)) + head + value


def _pss_id(halg: HashMaker) -> bytes:
    """The RSASSA-PSS AlgorithmIdentifier we sign under: ``halg``, MGF1 of it, a salt of its
    length, the default trailer (hash identifiers with NULL parameters, as RFC 4055 writes
    them)."""
    oid = next(o for o, h in _OID_HASH.items() if h is halg)
    h_id = _der(0x30, _der(0x06, oid) + b"\x05\x00")
    params = _der(0xA0, h_id)
    params += _der(0xA1, _der(0x30, _der(0x06, _OID_MGF1) + h_id))
    params += _der(0xA2, _der(0x02, bytes((halg.digest_size,))))  # type: ignore[attr-defined]
    return _der(0x30, _der(0x06, _OID_PSS) + _der(0x30, params))


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, value, next position) of the DER element at ``pos``; ValueError if it is not one
    (short lengths and definite long lengths of up to two octets: an AlgorithmIdentifier is
    small)."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag, n = data[pos], data[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 2 or pos + k > len(data):
            raise ValueError("bad length")
        n = int.from_bytes(data[pos : pos + k], "big")
        pos += k
    if pos + n > len(data):
        raise ValueError("truncated")
    return tag, data[pos : pos + n], pos + n


def _hash_alg(der: bytes) -> HashMaker:
    """An AlgorithmIdentifier of SHA-256/384/512 (parameters absent or NULL)."""
    tag, oid, end = _tlv(der, 0)
    if tag != 0x06:
        raise ValueError("not an OID")
    if end != len(der) and der[end:] != b"\x05\x00":
        raise ValueError("hash parameters")
    halg = _OID_HASH.get(oid)
    if halg is None:
        raise ValueError("hash not supported")
    return halg


def _pss(alg_id: bytes) -> tuple[HashMaker, int] | None:
    """(hash, salt length) of an RSASSA-PSS AlgorithmIdentifier whose mask is MGF1 with the
    same hash; None if ``alg_id`` is another algorithm; ValueError if it is a malformed or
    unsupported PSS one (SHA-1, the default of absent parameters, is not taken)."""
    tag, body, end = _tlv(alg_id, 0)
    if tag != 0x30 or end != len(alg_id):
        return None
    tag, oid, pos = _tlv(body, 0)
    if tag != 0x06 or oid != _OID_PSS:
        return None
    tag, params, end = _tlv(body, pos)
    if tag != 0x30 or end != len(body):
        raise ValueError("RSASSA-PSS without parameters")
    halg: HashMaker | None = None
    mgf: HashMaker | None = None
    salt, trailer, pos, last = 20, 1, 0, -1
    while pos < len(params):
        tag, value, pos = _tlv(params, pos)
        if not 0xA0 <= tag <= 0xA3 or tag <= last:
            raise ValueError("RSASSA-PSS parameters out of order")
        last = tag
        inner_tag, inner, inner_end = _tlv(value, 0)
        if inner_end != len(value):
            raise ValueError("trailing octets")
        if tag == 0xA0 and inner_tag == 0x30:
            halg = _hash_alg(inner)
        elif tag == 0xA1 and inner_tag == 0x30:
            t, moid, p2 = _tlv(inner, 0)
            t2, mhash, p3 = _tlv(inner, p2)
            if t != 0x06 or moid != _OID_MGF1 or t2 != 0x30 or p3 != len(inner):
                raise ValueError("mask generation is not MGF1")
            mgf = _hash_alg(mhash)
        elif tag in (0xA2, 0xA3) and inner_tag == 0x02 and 1 <= len(inner) <= 2:
            v = int.from_bytes(inner, "big")
            if inner[0] & 0x80:
                raise ValueError("negative integer")
            if tag == 0xA2:
                salt = v
            else:
                trailer = v
        else:
            raise ValueError("malformed RSASSA-PSS parameters")
    if halg is None or mgf is not halg or trailer != 1 or salt > 512:
        raise ValueError("RSASSA-PSS parameters not supported (SHA-2 with MGF1 of it)")
    return halg, salt
_ECDSA_METHOD: dict[str, tuple[int, HashMaker, int]] = {
    "secp256r1": (AuthMethod.ECDSA_256, hashes.SHA256, 32),
    "secp384r1": (AuthMethod.ECDSA_384, hashes.SHA384, 48),
    "secp521r1": (AuthMethod.ECDSA_521, hashes.SHA512, 66),
}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Credentials:
    """Our certificate (then its chain) and the private key that goes with it."""

    certs: tuple[x509.Certificate, ...]
    key: PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not self.certs:
            raise AuthError("no certificate")
        if self.certs[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise AuthError("the private key does not belong to the first certificate")

    def der(self) -> list[bytes]:
        return [c.public_bytes(serialization.Encoding.DER) for c in self.certs]

    def subject_id(self, initiator: bool) -> IDPayload:
        return IDPayload(initiator, IdType.DER_ASN1_DN, self.certs[0].subject.public_bytes())


def sign(key: PrivateKey, octets: bytes, peer_hashes: tuple[int, ...], *,
         pss: bool = False) -> tuple[int, bytes]:  # fmt: skip
    """(AUTH method, AUTH data): RFC 7427 when the peer announced hash algorithms we share
    (SHA-256 first), else the classic RSA (SHA-1) or ECDSA (RFC 4754) method. ``pss``: an RSA
    key signs RFC 7427 AUTH with RSASSA-PSS (MGF1 of the same hash, a salt of the hash's
    length; the classic method has no PSS form: it stays PKCS#1 v1.5)."""
    shared = [h for h in SUPPORTED_HASHES if h in peer_hashes]
    if isinstance(key, rsa.RSAPrivateKey):
        if shared:
            halg: HashMaker = {2: hashes.SHA256, 3: hashes.SHA384, 4: hashes.SHA512}[shared[0]]
            if pss:
                h = halg()
                sig = key.sign(
                    octets, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h
                )
                pss_id = _pss_id(halg)
                return AuthMethod.DIGITAL_SIGNATURE, bytes((len(pss_id),)) + pss_id + sig
            sig = key.sign(octets, padding.PKCS1v15(), halg())
            alg = _ALG_OF[("rsa", halg)]
            return AuthMethod.DIGITAL_SIGNATURE, bytes((len(alg),)) + alg + sig
        return AuthMethod.RSA_SIG, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())
    curve = key.curve.name
    if curve not in _ECDSA_METHOD:
        raise AuthError(f"ECDSA on {curve} is not supported")
    method, halg, n = _ECDSA_METHOD[curve]
    if shared:
        sig = key.sign(octets, ec.ECDSA(halg()))
        alg = _ALG_OF[("ecdsa", halg)]
        return AuthMethod.DIGITAL_SIGNATURE, bytes((len(alg),)) + alg + sig
    r, s = decode_dss_signature(key.sign(octets, ec.ECDSA(halg())))
    return method, r.to_bytes(n, "big") + s.to_bytes(n, "big")


def verify(cert: x509.Certificate, method: int, data: bytes, octets: bytes) -> None:
    """Raise AuthError unless ``data`` is a valid AUTH signature of ``octets`` by ``cert``."""
    try:
        pub = cert.public_key()
    except BAD_CERT:
        raise AuthError("the certificate's key cannot be read") from None
    try:
        if method == AuthMethod.DIGITAL_SIGNATURE:
            if not data or len(data) < 1 + data[0]:
                raise AuthError("malformed RFC 7427 AUTH data")
            alg_id = data[1 : 1 + data[0]]
            alg = _ALG_IDS.get(alg_id)
            sig = data[1 + data[0] :]
            if alg is None:
                try:
                    pss = _pss(alg_id)
                except ValueError as exc:
                    raise AuthError(f"unsupported RSASSA-PSS AUTH: {exc}") from None
                if pss is None:
                    raise AuthError("unsupported signature algorithm in AUTH")
                if not isinstance(pub, rsa.RSAPublicKey):
                    raise AuthError("an RSASSA-PSS AUTH signature needs an RSA certificate key")
                phalg, salt = pss
                pub.verify(
                    sig, octets, padding.PSS(mgf=padding.MGF1(phalg()), salt_length=salt),
                    phalg(),
                )
                return
            kind, halg = alg
            if kind == "rsa" and isinstance(pub, rsa.RSAPublicKey):
                pub.verify(sig, octets, padding.PKCS1v15(), halg())
            elif kind == "ecdsa" and isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(sig, octets, ec.ECDSA(halg()))
            else:
                raise AuthError("the AUTH signature algorithm does not fit the certificate key")
        elif method == AuthMethod.RSA_SIG and isinstance(pub, rsa.RSAPublicKey):
            pub.verify(data, octets, padding.PKCS1v15(), hashes.SHA1())
        elif method in (9, 10, 11) and isinstance(pub, ec.EllipticCurvePublicKey):
            want = {9: "secp256r1", 10: "secp384r1", 11: "secp521r1"}[method]
            if pub.curve.name != want:
                raise AuthError("the ECDSA AUTH method does not fit the certificate's curve")
            _m, halg, n = _ECDSA_METHOD[want]
            if len(data) != 2 * n:
                raise AuthError("malformed ECDSA AUTH data")
            der = encode_dss_signature(int.from_bytes(data[:n], "big"),
                                       int.from_bytes(data[n:], "big"))  # fmt: skip
            pub.verify(der, octets, ec.ECDSA(halg()))
        else:
            raise AuthError(f"AUTH method {method} does not fit the certificate")
    except InvalidSignature:
        raise AuthError("the AUTH signature does not verify") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuthError(f"the AUTH signature cannot be checked: {exc}") from None


def parse_cert(der: bytes) -> x509.Certificate:
    _quiet_name_warnings()
    try:
        return x509.load_der_x509_certificate(der)
    except BAD_CERT:  # (a version other than 1-3 is InvalidVersion, no ValueError)
        raise AuthError("a CERT payload is not an X.509 certificate") from None


def validate_chain(
    cert: x509.Certificate, intermediates: list[x509.Certificate], cas: list[x509.Certificate],
    now: dt.datetime, crls: Sequence[RevocationList | x509.CertificateRevocationList] = (),
    revocation: str = "relaxed",
) -> x509.Certificate:
    """The certificate leads, through at most 4 intermediates, to one of ``cas`` (returned);
    each one in its validity period and each issuer a CA; and none is revoked by one of
    ``crls`` that its issuer signed (a list given without its index is indexed for this
    call only; a list past its next update still revokes what it
    names). ``revocation`` is strongSwan's ``remote.revocation``: "relaxed" takes a
    certificate whose status no list tells; "strict" refuses each certificate of the chain
    (not the CA) that no current list of its issuer covers (none, or only lists past their
    next update); "ifuri" refuses one only covered by stale lists, or covered by none while it
    names a CRL distribution point or an OCSP responder (we fetch neither): strongSwan's
    VALIDATION_GOOD / SKIPPED constraints. RevocationUnknown then; AuthError otherwise, also
    for a certificate that cannot be read (BAD_CERT)."""
    return validated_chain(cert, intermediates, cas, now, crls, revocation)[1]


def validated_chain(
    cert: x509.Certificate, intermediates: list[x509.Certificate], cas: list[x509.Certificate],
    now: dt.datetime, crls: Sequence[RevocationList | x509.CertificateRevocationList] = (),
    revocation: str = "relaxed",
) -> tuple[list[x509.Certificate], x509.Certificate]:
    """validate_chain's check: (the chain from the leaf, the CA its last certificate led
    to)."""
    try:
        chain, anchor = _validate_chain(cert, intermediates, cas, now)
        if crls or revocation != "relaxed":
            _not_revoked(chain, anchor, [c if isinstance(c, RevocationList)
                                         else revocation_index(c) for c in crls],
                         now, revocation)  # fmt: skip
        return chain, anchor
    except BAD_CERT:
        raise AuthError("a certificate of the chain cannot be read") from None


MAX_SERIAL_LEN = 20  # octets (RFC 5280 §4.1.2.2)
MAX_CERTS_SERIALS = 5  # a peer's chain: its certificate and up to 4 intermediates


def chain_serials(chain: list[x509.Certificate],
                  anchor: x509.Certificate) -> tuple[tuple[bytes, int], ...]:  # fmt: skip
    """(SHA-256 of its issuer's certificate, serial) of each certificate of ``chain``
    (leaf first; ``anchor`` issued the last): what a gateway that takes the IKE SA over
    checks against its own revocation lists (:func:`revoked_by`; it holds the CA
    certificates, not the intermediates, so it can check the certificates our CAs issued).
    A serial that is negative or longer than MAX_SERIAL_LEN octets (not RFC 5280's) is left
    out."""
    out = []
    for c, issuer in zip(chain, [*chain[1:], anchor], strict=True):
        if 0 <= c.serial_number < 1 << (8 * MAX_SERIAL_LEN):
            out.append((fingerprint(issuer), c.serial_number))
    return tuple(out)


def revoked_by(issuer: x509.Certificate, serial: int,
               crls: Sequence[RevocationList]) -> bool:  # fmt: skip
    """Does one of ``crls`` that ``issuer`` signed name ``serial`` (a list past its next
    update too, as validate_chain)?"""
    return any(serial in rl.serials for rl in _signed_by(issuer, crls))


@dataclass(eq=False)
class RevocationList:
    """A revocation list with what an authentication looks up in it, made once, by whoever
    reads the list (the gateway does it on its reader thread): the serials it names, as a
    set (a large CA's list names hundreds of thousands; the library looks one up by scanning
    them all, 21 ms for 300,000, each authentication), and a memo of its signature checks by
    the issuer key's DER (the library hashes the whole list for each check). Owned by the
    caller: nothing here is shared between threads."""

    crl: x509.CertificateRevocationList
    serials: frozenset[int]
    signatures: dict[bytes, bool] = field(default_factory=dict)


def revocation_index(crl: x509.CertificateRevocationList) -> RevocationList:
    """``crl`` with its set of serials (every entry parsed now: the library parses them
    lazily). ValueError if an entry does not parse."""
    return RevocationList(crl, frozenset(r.serial_number for r in crl))


def _signed_by(issuer: x509.Certificate,
               crls: Sequence[RevocationList]) -> list[RevocationList]:  # fmt: skip
    """The lists of ``crls`` in ``issuer``'s name that its key signed (each list's check
    memoized by key)."""
    key = issuer.public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    out = []
    for rl in crls:
        if rl.crl.issuer != issuer.subject:
            continue
        signed = rl.signatures.get(der)
        if signed is None:
            try:
                signed = rl.crl.is_signature_valid(key)  # type: ignore[arg-type]
            except (ValueError, TypeError, UnsupportedAlgorithm):
                signed = False
            rl.signatures[der] = signed
        if signed:
            out.append(rl)
    return out


REVOCATION_POLICIES = ("relaxed", "ifuri", "strict")  # swanctl.conf's remote.revocation


class RevocationUnknown(AuthError):
    """A certificate whose revocation status ``remote.revocation`` wants known is not."""


def _names_uri(c: x509.Certificate) -> bool:
    """The certificate names where its status is told (a CRL distribution point's URI or an
    OCSP responder): strongSwan then fails its check rather than skipping it."""
    try:
        cdp = c.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        if any(isinstance(n, x509.UniformResourceIdentifier)
               for p in cdp for n in p.full_name or ()):  # fmt: skip
            return True
    except x509.ExtensionNotFound:
        pass
    try:
        aia = c.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        return any(a.access_method == x509.oid.AuthorityInformationAccessOID.OCSP for a in aia)
    except x509.ExtensionNotFound:
        return False


def _not_revoked(chain: list[x509.Certificate], anchor: x509.Certificate,
                 crls: list[RevocationList], now: dt.datetime | None = None,
                 revocation: str = "relaxed") -> None:  # fmt: skip
    """Each certificate of ``chain`` (leaf first; ``anchor`` issued the last) against the
    revocation lists its issuer signed; ``revocation``: validate_chain's."""
    issuers = [*chain[1:], anchor]
    for c, issuer in zip(chain, issuers, strict=True):
        status = "none"  # (strongSwan's SKIPPED; "current": GOOD, "stale": STALE)
        for rl in _signed_by(issuer, crls):
            crl = rl.crl
            if c.serial_number in rl.serials:
                raise AuthError(f"certificate {c.subject.rfc4514_string()} (serial "
                                f"{c.serial_number:x}) is revoked")  # fmt: skip
            if status != "current":
                nxt = crl.next_update_utc
                status = "current" if nxt is not None and now is not None and now <= nxt \
                    else "stale"
        if revocation == "relaxed" or status == "current":
            continue
        if revocation == "ifuri" and status == "none" and not _names_uri(c):
            continue
        why = ("only revocation lists past their next update" if status == "stale" else
               "no revocation list of its issuer") + f" (revocation = {revocation})"
        raise RevocationUnknown(f"the revocation status of certificate "
                                f"{c.subject.rfc4514_string()} is unknown: {why}")


MAX_NAMES = 32  # subjectAltNames of a peer's certificate kept with its IKE SA
MAX_NAME_LEN = 255


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER: how a CA is named in an IKE SA's context."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(text: str) -> str:
    """``text`` with its ASCII letters in lower case, nothing else changed: how strongSwan
    compares names case aside (strncasecmp in the C locale). Not str.lower(), which turns
    U+212A KELVIN SIGN into 'k' (a name in a certificate is octets, an IA5String's not
    checked by the parser: another name would prove this one)."""
    return text.translate(_ASCII_LOWER)


def cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The names a certificate proves besides its subject DN, as ``dns:``, ``email:`` and
    ``ip:`` strings (its subjectAltNames of those kinds, the first MAX_NAMES, each at most
    MAX_NAME_LEN characters): what a gateway that takes its IKE SA over checks its own
    ``remote.id`` against (the certificate itself does not travel)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out = [f"dns:{ascii_lower(d)}" for d in san.get_values_for_type(x509.DNSName)]
        out += [f"email:{ascii_lower(d)}" for d in san.get_values_for_type(x509.RFC822Name)]
        out += [f"ip:{a}" for a in san.get_values_for_type(x509.IPAddress)]
    except (x509.ExtensionNotFound, *BAD_CERT):
        return ()
    return tuple(n for n in out if len(n) <= MAX_NAME_LEN)[:MAX_NAMES]


def _validate_chain(
    cert: x509.Certificate, intermediates: list[x509.Certificate], cas: list[x509.Certificate],
    now: dt.datetime,
) -> tuple[list[x509.Certificate], x509.Certificate]:
    """(the chain from the leaf, the CA that issued its last certificate)."""
    chain = [cert]
    current = cert
    for _ in range(5):
        for c in chain:
            if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                raise AuthError(f"certificate {c.subject.rfc4514_string()} is not valid now")
        for ca in cas:
            if _issued_by(current, ca):
                return chain, ca
        nxt = next((i for i in intermediates if i not in chain and _issued_by(current, i)
                    and _is_ca(i)), None)  # fmt: skip
        if nxt is None:
            break
        chain.append(nxt)
        current = nxt
    raise AuthError(f"no trusted CA for {cert.subject.rfc4514_string()}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject or not _is_ca(issuer):
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    return not_a_ca(cert) is None


def subject_of(cert: x509.Certificate) -> str:
    """The certificate's subject DN, quoted, for a message ("a certificate" if unreadable)."""
    try:
        return repr(cert.subject.rfc4514_string())
    except BAD_CERT:
        return "a certificate"


def not_a_ca(cert: x509.Certificate) -> str | None:
    """Why ``cert`` cannot be a CA (None if it can): a CA certificate carries basicConstraints
    with CA:TRUE (RFC 5280 4.2.1.9, RFC 4945 5.1.3.9), and swanctl refuses any other as one
    ("ca certificate lacks CA basic constraint, rejected"). Given as the CA, a leaf issued by
    a CA made every IKE authentication fail here ("no trusted CA"), and every TLS handshake
    between gateways ("unable to get local issuer certificate")."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "no basicConstraints extension"
    except BAD_CERT:  # a damaged extension
        return "its extensions cannot be read"
    return None if bc.ca else "basicConstraints CA:FALSE"


def id_matches_cert(idp: IDPayload, cert: x509.Certificate) -> bool:
    """The identity is the certificate's subject DN or one of its subjectAltNames (never, for
    a certificate whose subject or extensions cannot be read)."""
    try:
        return _id_matches_cert(idp, cert)
    except BAD_CERT:
        return False


def _id_matches_cert(idp: IDPayload, cert: x509.Certificate) -> bool:
    if idp.id_type == IdType.DER_ASN1_DN:
        return idp.data == cert.subject.public_bytes()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, *BAD_CERT):
        return False
    try:
        if idp.id_type in (IdType.FQDN, IdType.RFC822_ADDR):
            kind = x509.DNSName if idp.id_type == IdType.FQDN else x509.RFC822Name
            return ascii_lower(idp.data.decode()) in [ascii_lower(d) for d in
                                                      san.get_values_for_type(kind)]
        if idp.id_type in (IdType.IPV4_ADDR, IdType.IPV6_ADDR):
            return ipaddress.ip_address(idp.data) in san.get_values_for_type(x509.IPAddress)
    except (UnicodeDecodeError, ValueError):
        return False
    return False  # fmt: skip


def certreq(cas: list[x509.Certificate]) -> bytes:
    """CERTREQ data: the SHA-1 hashes of the trusted CAs' public keys (§3.7)."""
    out = b""
    for ca in cas:
        spki = ca.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        h = hashes.Hash(hashes.SHA1())
        h.update(spki)
        out += h.finalize()
    return out

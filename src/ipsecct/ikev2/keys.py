"""IKEv2 key material (RFC 7296 §2.13-2.15, §2.17) and Diffie-Hellman groups (§3.4,
RFC 3526, RFC 5903, RFC 8031), all with ``cryptography``.

- :func:`prf` and :func:`prf_plus` (§2.13);
- :func:`ike_keys`: SKEYSEED and SK_d, SK_ai, SK_ar, SK_ei, SK_er, SK_pi, SK_pr (§2.14);
- :func:`child_keys`: a CHILD SA's KEYMAT split into its four keys (§2.17);
- :func:`psk_auth`: the AUTH value of a pre-shared key (§2.15);
- :class:`KeyExchange`: one side of a DH exchange in a group.

No value computed here is ever logged or put in a ``repr``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import dh, ec, x448, x25519
from cryptography.utils import CryptographyDeprecationWarning

from ..errors import IkeProtocolError
from .message import Notify
from .proposal import INTEG, PRF_HASH, Suite

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def hmac_digest(hash_name: str, key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, _HASHES[hash_name]())
    h.update(data)
    return h.finalize()


def prf(alg: int, key: bytes, data: bytes) -> bytes:
    return hmac_digest(PRF_HASH[alg], key, data)


def prf_len(alg: int) -> int:
    return _HASHES[PRF_HASH[alg]]().digest_size


def prf_plus(alg: int, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ (§2.13): T1 | T2 | ... truncated to ``length`` octets (at most 255 blocks)."""
    out = bytearray()
    t = b""
    n = 1
    while len(out) < length:
        if n > 255:
            raise ValueError("prf+ cannot produce that many octets")
        t = prf(alg, key, t + seed + bytes((n,)))
        out += t
        n += 1
    return bytes(out[:length])


@dataclass(frozen=True)
class IkeKeys:
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def ike_keys(
    suite: Suite, shared: bytes, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes,
    *, old_sk_d: bytes | None = None, old_prf: int | None = None,
) -> IkeKeys:  # fmt: skip
    """SKEYSEED and the seven keys of an IKE SA (§2.14), or of its rekeyed successor (§2.18,
    with the old SA's SK_d and PRF)."""
    assert suite.prf is not None
    if old_sk_d is None:
        skeyseed = prf(suite.prf, ni + nr, shared)
    else:
        skeyseed = prf(old_prf or suite.prf, old_sk_d, shared + ni + nr)
    plen = prf_len(suite.prf)
    ilen = suite.integ_key_len
    elen = suite.enc_key_len
    sizes = [plen, ilen, ilen, elen, elen, plen, plen]
    km = prf_plus(suite.prf, skeyseed, ni + nr + spi_i + spi_r, sum(sizes))
    parts = []
    pos = 0
    for s in sizes:
        parts.append(km[pos : pos + s])
        pos += s
    return IkeKeys(*parts)


@dataclass(frozen=True)
class ChildKeys:
    """KEYMAT split as §2.17 says: initiator-to-responder keys first, encryption before
    integrity."""

    enc_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    enc_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def child_keys(prf_alg: int, sk_d: bytes, child: Suite, ni: bytes, nr: bytes,
               shared: bytes = b"") -> ChildKeys:  # fmt: skip
    elen = child.enc_key_len
    ilen = child.integ_key_len
    km = prf_plus(prf_alg, sk_d, shared + ni + nr, 2 * (elen + ilen))
    a, b = elen, elen + ilen
    return ChildKeys(km[:a], km[a:b], km[b : b + elen], km[b + elen : 2 * b])


KEY_PAD = b"Key Pad for IKEv2"


def psk_auth(prf_alg: int, secret: bytes, signed_octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>) (§2.15)."""
    return prf(prf_alg, prf(prf_alg, secret, KEY_PAD), signed_octets)


def signed_octets(message: bytes, peer_nonce: bytes, prf_alg: int, sk_p: bytes,
                  id_body: bytes) -> bytes:  # fmt: skip
    """RealMessage | NonceData of the peer | prf(SK_p, RestOfIDPayload) (§2.15)."""
    return message + peer_nonce + prf(prf_alg, sk_p, id_body)


def integ_icv(alg: int, key: bytes, data: bytes) -> bytes:
    hname, _klen, icv = INTEG[alg]
    return hmac_digest(hname, key, data)[:icv]


# -- Diffie-Hellman -----------------------------------------------------------------------

# RFC 3526 MODP groups: 2048 (14), 3072 (15), 4096 (16), 6144 (17), 8192 (18); generator 2.
_MODP_2048 = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF"
)
_MODP_3072 = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64"
    "ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7ABF5AE8CDB0933D71E8C94E04A25619DCEE3D226"
    "1AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF"
)
_MODP_4096 = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64"
    "ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7ABF5AE8CDB0933D71E8C94E04A25619DCEE3D226"
    "1AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D788719A10BDBA5B2699C32718"
    "6AF4E23C1A946834B6150BDA2583E9CA2AD44CE8DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D"
    "99B2964FA090C3A2233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA993B4EA98"
    "8D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF"
)
# RFC 3526's 6144 (17) and 8192 (18), computed here from its formula (k = 929484 and
# 4743158); each is a safe prime.
_MODP_6144 = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64"
    "ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7ABF5AE8CDB0933D71E8C94E04A25619DCEE3D226"
    "1AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D788719A10BDBA5B2699C32718"
    "6AF4E23C1A946834B6150BDA2583E9CA2AD44CE8DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D"
    "99B2964FA090C3A2233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA993B4EA98"
    "8D8FDDC186FFB7DC90A6C08F4DF435C93402849236C3FAB4D27C7026C1D4DCB2602646DEC9751E763DBA37BD"
    "F8FF9406AD9E530EE5DB382F413001AEB06A53ED9027D831179727B0865A8918DA3EDBEBCF9B14ED44CE6CBA"
    "CED4BB1BDB7F1447E6CC254B332051512BD7AF426FB8F401378CD2BF5983CA01C64B92ECF032EA15D1721D03"
    "F482D7CE6E74FEF6D55E702F46980C82B5A84031900B1C9E59E7C97FBEC7E8F323A97A7E36CC88BE0F1D45B7"
    "FF585AC54BD407B22B4154AACC8F6D7EBF48E1D814CC5ED20F8037E0A79715EEF29BE32806A1D58BB7C5DA76"
    "F550AA3D8A1FBFF0EB19CCB1A313D55CDA56C9EC2EF29632387FE8D76E3C0468043E8F663F4860EE12BF2D5B"
    "0B7474D6E694F91E6DCC4024FFFFFFFFFFFFFFFF"
)
_MODP_8192 = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64"
    "ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7ABF5AE8CDB0933D71E8C94E04A25619DCEE3D226"
    "1AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D788719A10BDBA5B2699C32718"
    "6AF4E23C1A946834B6150BDA2583E9CA2AD44CE8DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D"
    "99B2964FA090C3A2233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA993B4EA98"
    "8D8FDDC186FFB7DC90A6C08F4DF435C93402849236C3FAB4D27C7026C1D4DCB2602646DEC9751E763DBA37BD"
    "F8FF9406AD9E530EE5DB382F413001AEB06A53ED9027D831179727B0865A8918DA3EDBEBCF9B14ED44CE6CBA"
    "CED4BB1BDB7F1447E6CC254B332051512BD7AF426FB8F401378CD2BF5983CA01C64B92ECF032EA15D1721D03"
    "F482D7CE6E74FEF6D55E702F46980C82B5A84031900B1C9E59E7C97FBEC7E8F323A97A7E36CC88BE0F1D45B7"
    "FF585AC54BD407B22B4154AACC8F6D7EBF48E1D814CC5ED20F8037E0A79715EEF29BE32806A1D58BB7C5DA76"
    "F550AA3D8A1FBFF0EB19CCB1A313D55CDA56C9EC2EF29632387FE8D76E3C0468043E8F663F4860EE12BF2D5B"
    "0B7474D6E694F91E6DBE115974A3926F12FEE5E438777CB6A932DF8CD8BEC4D073B931BA3BC832B68D9DD300"
    "741FA7BF8AFC47ED2576F6936BA424663AAB639C5AE4F5683423B4742BF1C978238F16CBE39D652DE3FDB8BE"
    "FC848AD922222E04A4037C0713EB57A81A23F0C73473FC646CEA306B4BCBC8862F8385DDFA9D4B7FA2C087E8"
    "79683303ED5BDD3A062B3CF5B3A278A66D2A13F83F44F82DDF310EE074AB6A364597E899A0255DC164F31CC5"
    "0846851DF9AB48195DED7EA1B1D510BD7EE74D73FAF36BC31ECFA268359046F4EB879F924009438B481C6CD7"
    "889A002ED5EE382BC9190DA6FC026E479558E4475677E9AA9E3050E2765694DFC81F56E880B96E7160C980DD"
    "98EDD3DFFFFFFFFFFFFFFFFF"
)
# (The primes are p = 2^n - 2^(n-64) - 1 + 2^64 * (floor(2^(n-130) * pi) + k), RFC 3526;
# tests/test_ikev2.py checks each against that formula.)
MODP: dict[int, int] = {
    14: int(_MODP_2048, 16), 15: int(_MODP_3072, 16), 16: int(_MODP_4096, 16),
    17: int(_MODP_6144, 16), 18: int(_MODP_8192, 16),
}

_EC: dict[int, Callable[[], ec.EllipticCurve]] = {
    19: ec.SECP256R1, 20: ec.SECP384R1, 21: ec.SECP521R1
}
_EC_LEN = {19: 32, 20: 48, 21: 66}
SUPPORTED_GROUPS = {14, 15, 16, 17, 18, 19, 20, 21, 31, 32}


@contextlib.contextmanager
def _no_ffdh_warning() -> Iterator[None]:
    """cryptography deprecates finite-field DH; IKEv2 group 14 is still what peers use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


class KeyExchange:
    """Our half of a DH exchange: ``public`` goes into the KE payload, :meth:`shared` takes the
    peer's KE data and returns g^ir (§2.14: padded to the group's length)."""

    def __init__(self, group: int) -> None:
        if group not in SUPPORTED_GROUPS:
            raise IkeProtocolError(f"DH group {group} is not supported", Notify.INVALID_KE_PAYLOAD)
        self.group = group
        self._priv: object
        if group == 31:
            k25519 = x25519.X25519PrivateKey.generate()
            self._priv = k25519
            self.public = k25519.public_key().public_bytes_raw()
        elif group == 32:
            k448 = x448.X448PrivateKey.generate()
            self._priv = k448
            self.public = k448.public_key().public_bytes_raw()
        elif group in _EC:
            kec = ec.generate_private_key(_EC[group]())
            self._priv = kec
            n = _EC_LEN[group]
            nums = kec.public_key().public_numbers()
            self.public = nums.x.to_bytes(n, "big") + nums.y.to_bytes(n, "big")
        else:
            p = MODP[group]
            with _no_ffdh_warning():
                kdh = dh.DHParameterNumbers(p, 2).parameters().generate_private_key()
            self._priv = kdh
            self._plen = (p.bit_length() + 7) // 8
            self.public = kdh.public_key().public_numbers().y.to_bytes(self._plen, "big")

    def __repr__(self) -> str:
        return f"KeyExchange(group={self.group})"

    def shared(self, peer: bytes) -> bytes:
        bad = IkeProtocolError(f"bad KE data for group {self.group}", Notify.INVALID_SYNTAX)
        try:
            priv = self._priv
            if isinstance(priv, x25519.X25519PrivateKey):
                if len(peer) != 32:
                    raise bad
                return priv.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            if isinstance(priv, x448.X448PrivateKey):
                if len(peer) != 56:
                    raise bad
                return priv.exchange(x448.X448PublicKey.from_public_bytes(peer))
            if isinstance(priv, ec.EllipticCurvePrivateKey):
                n = _EC_LEN[self.group]
                if len(peer) != 2 * n:
                    raise bad
                pub = ec.EllipticCurvePublicKey.from_encoded_point(
                    _EC[self.group](), b"\x04" + peer
                )
                return priv.exchange(ec.ECDH(), pub)
            with _no_ffdh_warning():
                assert isinstance(priv, dh.DHPrivateKey)
            p = MODP[self.group]
            y = int.from_bytes(peer, "big")
            if len(peer) != self._plen or not 1 < y < p - 1:
                raise bad
            with _no_ffdh_warning():
                pub_dh = dh.DHPublicNumbers(y, dh.DHParameterNumbers(p, 2)).public_key()
                return priv.exchange(pub_dh).rjust(self._plen, b"\0")
        except (ValueError, UnsupportedAlgorithm):
            raise bad from None

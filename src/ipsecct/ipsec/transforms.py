"""Cryptographic transforms for ESP, one object per SA (never one per packet).

An ESP payload after the 8-octet header is ``IV | ciphertext | ICV``. AEAD transforms
(AES-GCM RFC 4106, ChaCha20-Poly1305 RFC 7634) use the 64-bit sequence number as the IV, so an
IV can repeat only if a sequence number does, which the SA never allows. AES-CBC (RFC 3602)
uses a random IV and HMAC-SHA2 (RFC 4868) or HMAC-SHA1-96 (RFC 2404) over header, IV and
ciphertext (plus the high-order sequence bits with ESN, RFC 4303 §2.2.1). AES-CTR (RFC 3686)
takes the same HMACs, and the sequence number as its IV, as the AEAD transforms do: its counter
block is ``nonce | IV | 1`` (the nonce the last 4 octets of the key material), so a keystream
repeats only if a sequence number does.

Two levels of interface: :meth:`EspTransform.seal` / :meth:`EspTransform.open` work on an
already padded plaintext; :meth:`EspTransform.seal_payload` / :meth:`EspTransform.open_payload`
are the data path's fused fast path (RFC 4303 padding and trailer built here, one allocation for
the plaintext and one for the packet). The hot path avoids per-packet objects it does not need:
precompiled ``struct.Struct`` objects, one AEAD object per SA, a pre-keyed HMAC that is copied.

All primitives come from ``cryptography``.
"""

from __future__ import annotations

import hmac as _hmac
import os
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as c_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..errors import AlgorithmError
from .algorithms import ENC, INTEG, EncAlg, IntegAlg, check_esp_combination

_Q = struct.Struct("!Q")
_L = struct.Struct("!L")
_HDR = struct.Struct("!LL")  # SPI | sequence number (low 32 bits)
_HDR_IV = struct.Struct("!LLQ")  # SPI | sequence number | 64-bit IV
_SPI_SEQ64 = struct.Struct("!LQ")  # ESN AAD: SPI | seq-high | seq-low
_SALT_IV = struct.Struct("!4sQ")  # AEAD nonce: salt | IV
_MASK32 = 0xFFFFFFFF
_BA_JOIN = bytearray().join  # the cheapest way found to make a new bytearray of two parts

# RFC 4303 §2.4 padding: 1, 2, 3, ...
PAD = bytes(range(1, 256))
# The ESP trailer (padding | pad length | next header), keyed by pad length << 8 | next header.
_TRAILERS: dict[int, bytes] = {}


def trailer(padlen: int, next_header: int) -> bytes:
    """``padding | pad length | next header`` (RFC 4303 §2.4-2.6), cached."""
    key = padlen << 8 | next_header
    t = _TRAILERS.get(key)
    if t is None:
        t = _TRAILERS[key] = PAD[:padlen] + bytes((padlen, next_header))
    return t


def warm_library() -> None:
    """Pay the crypto library's one-time costs now, not on a packet. The first AEAD object a
    process makes costs about 1-1.5 ms of CPU (OpenSSL's initialisation and algorithm fetch
    behind ``cryptography``), the first HMAC and AES-CBC context 0.1-0.2 ms each; every later
    one some microseconds. A gateway that has never sealed a packet (a transfer's target)
    otherwise pays them on the first packet it sends for an SA that just arrived, or on the
    signal it sends at the activation: in the handover, on the stream's path. Throwaway
    all-zero keys, used for nothing else."""
    AESGCM(bytes(16)).encrypt(bytes(12), b"", b"")
    ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), b"", b"")
    h = c_hmac.HMAC(bytes(32), hashes.SHA256())
    h.update(b"")
    h.finalize()
    enc = Cipher(algorithms.AES(bytes(16)), modes.CBC(bytes(16))).encryptor()
    enc.update(bytes(16))
    enc.finalize()


class IntegrityFailure(Exception):
    """The ICV did not verify (internal: the data path turns it into a counted drop)."""


class EspTransform:
    """Seals and opens the part of an ESP packet after the SPI and sequence number."""

    __slots__ = ("block", "icv_len", "iv_len")

    iv_len: int
    icv_len: int
    block: int  # payload alignment: pad so (payload + 2) is a multiple of this

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        """Return ``header | IV | ciphertext | ICV`` for a padded plaintext."""
        raise NotImplementedError

    def warm(self) -> None:
        """Make now what the first packet would otherwise make (a take-over prepares SAs
        ahead, so that it only installs them)."""

    def open(self, packet: memoryview, seq: int, esn: bool) -> bytes:
        """Given the whole ESP packet, return the padded plaintext or raise IntegrityFailure."""
        raise NotImplementedError

    def seal_payload(
        self,
        spi: int,
        seq: int,
        payload: bytes | bytearray | memoryview,
        next_header: int,
        tfc_pad: int,
        esn: bool,
    ) -> bytearray:
        """The whole ESP packet (SPI .. ICV) for ``payload``: TFC padding (``tfc_pad`` zero
        octets), RFC 4303 padding and trailer added, then sealed with sequence number ``seq``."""
        n = len(payload) + tfc_pad
        tr = trailer((-(n + 2)) % self.block, next_header)
        pt = b"".join((payload, bytes(tfc_pad), tr)) if tfc_pad else b"".join((payload, tr))
        return self.seal(_HDR.pack(spi, seq & _MASK32), seq, pt, esn)

    def open_payload(self, packet: bytes | bytearray | memoryview, seq: int, esn: bool) -> bytes:
        """Like :meth:`open` for any buffer: the padded plaintext, or raise IntegrityFailure."""
        return self.open(packet if isinstance(packet, memoryview) else memoryview(packet), seq, esn)


class AeadTransform(EspTransform):
    """AES-GCM-16 or ChaCha20-Poly1305. The cipher object (an OpenSSL context of about 2.5 KiB)
    is made on the SA's first packet, not when the SA is installed: a gateway holding 100,000
    SAs, most of them idle, or receiving thousands in a bulk transfer, pays for it only when
    the SA carries traffic."""

    __slots__ = ("_aead", "_alg", "_cipher_key", "_salt")

    def __init__(self, alg: EncAlg, key: bytes) -> None:
        info = ENC[alg]
        self.iv_len = 8
        self.icv_len = 16
        self.block = info.block
        self._alg = alg
        self._cipher_key, self._salt = key[:-4], key[-4:]
        self._aead: AESGCM | ChaCha20Poly1305

    def warm(self) -> None:
        self._aead  # noqa: B018 - made on first access

    def __getattr__(self, name: str) -> Any:
        # Called only while ``_aead`` is unset: make it once, then it is a plain slot.
        if name != "_aead":
            raise AttributeError(name)
        cls = AESGCM if self._alg is EncAlg.AES_GCM_16 else ChaCha20Poly1305
        aead = cls(self._cipher_key)
        self._aead = aead
        return aead

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        # AAD is SPI | seq (RFC 4106 §5); with ESN, SPI | seq-high | seq-low.
        aad = _SPI_SEQ64.pack(_L.unpack_from(header)[0], seq) if esn else header
        ct = self._aead.encrypt(_SALT_IV.pack(self._salt, seq), plaintext, aad)
        return _BA_JOIN((header, _Q.pack(seq), ct))

    def open(self, packet: memoryview, seq: int, esn: bool) -> bytes:
        return self.open_payload(packet, seq, esn)

    def seal_payload(
        self,
        spi: int,
        seq: int,
        payload: bytes | bytearray | memoryview,
        next_header: int,
        tfc_pad: int,
        esn: bool,
    ) -> bytearray:
        n = len(payload) + tfc_pad
        # block is 4 for both AEAD transforms: (-(n + 2)) % 4 == -(n + 2) & 3
        key = ((-(n + 2)) & 3) << 8 | next_header
        tr = _TRAILERS.get(key) or trailer(key >> 8, next_header)
        if tfc_pad or isinstance(payload, memoryview):
            pt: bytes | bytearray = b"".join((payload, bytes(tfc_pad), tr))
        else:
            pt = payload + tr
        head = _HDR_IV.pack(spi, seq & _MASK32, seq)  # SPI | seq | IV (= the 64-bit seq)
        # Measured: encrypt() and one join beat encrypt_into() into a memoryview of a
        # preallocated bytearray (cryptography 50), and bytearray(head) += ct.
        ct = self._aead.encrypt(
            _SALT_IV.pack(self._salt, seq), pt, _SPI_SEQ64.pack(spi, seq) if esn else head[:8]
        )
        return _BA_JOIN((head, ct))

    def open_payload(self, packet: bytes | bytearray | memoryview, seq: int, esn: bool) -> bytes:
        if len(packet) < 32:  # header, IV, ICV
            raise IntegrityFailure
        aad = _SPI_SEQ64.pack(_L.unpack_from(packet)[0], seq) if esn else packet[:8]
        try:
            return self._aead.decrypt(self._salt + packet[8:16], packet[16:], aad)
        except InvalidTag:
            raise IntegrityFailure from None


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


class _Hmac:
    """HMAC truncated to the ICV length (RFC 4868 §2.3, RFC 2404)."""

    __slots__ = ("_base", "icv_len")

    def __init__(self, alg: IntegAlg, key: bytes) -> None:
        info = INTEG[alg]
        self.icv_len = info.icv_len
        # Keyed once; each MAC copies the keyed state instead of re-hashing the padded key.
        self._base = c_hmac.HMAC(key, _HASHES[info.hash_name]())

    def mac(self, *parts: bytes | bytearray | memoryview) -> bytes:
        h = self._base.copy()
        for p in parts:
            h.update(p)
        return h.finalize()[: self.icv_len]

    def __repr__(self) -> str:
        return f"_Hmac(icv_len={self.icv_len})"


class CbcHmacTransform(EspTransform):
    """AES-CBC (RFC 3602) or NULL encryption (RFC 2410) with an HMAC."""

    __slots__ = ("_aes", "_hmac", "_null")

    def __init__(self, alg: EncAlg, key: bytes, integ: IntegAlg, integ_key: bytes) -> None:
        info = ENC[alg]
        self._null = alg is EncAlg.NULL
        self._aes = None if self._null else algorithms.AES(key)
        self.iv_len = info.iv_len
        self.block = info.block
        self._hmac = _Hmac(integ, integ_key)
        self.icv_len = self._hmac.icv_len

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        out = bytearray(header)
        if self._aes is None:
            out += plaintext
        else:
            iv = os.urandom(16)
            enc = Cipher(self._aes, modes.CBC(iv)).encryptor()
            out += iv
            out += enc.update(plaintext)
            out += enc.finalize()
        out += self._hmac.mac(out, _L.pack(seq >> 32)) if esn else self._hmac.mac(out)
        return out

    def open(self, packet: memoryview, seq: int, esn: bool) -> bytes:
        icv_len = self.icv_len
        end = len(packet) - icv_len
        if end < 8 + self.iv_len:
            raise IntegrityFailure
        covered = packet[:end]
        want = self._hmac.mac(covered, _L.pack(seq >> 32)) if esn else self._hmac.mac(covered)
        if not _hmac.compare_digest(want, packet[end:]):
            raise IntegrityFailure
        body = packet[8 + self.iv_len : end]
        if self._aes is None:
            return bytes(body)
        if len(body) == 0 or len(body) % 16:
            return b""  # authentic but not whole blocks: the caller reports bad padding
        dec = Cipher(self._aes, modes.CBC(packet[8:24])).decryptor()
        return dec.update(body) + dec.finalize()


class CtrHmacTransform(EspTransform):
    """AES-CTR (RFC 3686) with an HMAC. The 8-octet IV is the 64-bit sequence number (RFC
    3686 §3.1 asks only that an IV never repeat under a key; the sequence number never does,
    the SA's invariant: the counter never wraps for this transform, ``sa.seq_iv``). The
    counter block of a packet is ``nonce | IV | 00000001``, one block per 16 octets after it
    (§4): a packet of up to 2**32 - 1 blocks, far above any datagram."""

    __slots__ = ("_aes", "_hmac", "_nonce")

    def __init__(self, alg: EncAlg, key: bytes, integ: IntegAlg, integ_key: bytes) -> None:
        info = ENC[alg]
        self._aes = algorithms.AES(key[:-4])
        self._nonce = key[-4:]
        self.iv_len = info.iv_len
        self.block = info.block
        self._hmac = _Hmac(integ, integ_key)
        self.icv_len = self._hmac.icv_len

    def _counter(self, iv: bytes | memoryview) -> bytes:
        return b"".join((self._nonce, iv, b"\0\0\0\1"))

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        iv = _Q.pack(seq)
        enc = Cipher(self._aes, modes.CTR(self._counter(iv))).encryptor()
        out = _BA_JOIN((header, iv, enc.update(plaintext), enc.finalize()))
        out += self._hmac.mac(out, _L.pack(seq >> 32)) if esn else self._hmac.mac(out)
        return out

    def open(self, packet: memoryview, seq: int, esn: bool) -> bytes:
        end = len(packet) - self.icv_len
        if end < 16:  # header and IV
            raise IntegrityFailure
        covered = packet[:end]
        want = self._hmac.mac(covered, _L.pack(seq >> 32)) if esn else self._hmac.mac(covered)
        if not _hmac.compare_digest(want, packet[end:]):
            raise IntegrityFailure
        dec = Cipher(self._aes, modes.CTR(self._counter(packet[8:16]))).decryptor()
        return dec.update(packet[16:end]) + dec.finalize()


class CbcOnlyTransform(EspTransform):
    """AES-CBC without integrity (RFC 3602's test cases): opens packets of a capture, offline,
    and never seals one (RFC 8221 §3: encryption-only ESP must not be used)."""

    __slots__ = ("_aes",)

    def __init__(self, alg: EncAlg, key: bytes) -> None:
        info = ENC[alg]
        self._aes = algorithms.AES(key)
        self.iv_len = info.iv_len
        self.block = info.block
        self.icv_len = 0

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        raise AlgorithmError("encryption-only ESP never sends (RFC 8221 §3)")

    def open(self, packet: memoryview, seq: int, esn: bool) -> bytes:
        if len(packet) < 8 + self.iv_len:
            raise IntegrityFailure  # too short to hold an IV: nothing to decrypt
        body = packet[8 + self.iv_len :]
        if len(body) == 0 or len(body) % 16:
            return b""  # not whole blocks: the caller reports bad padding
        dec = Cipher(self._aes, modes.CBC(packet[8 : 8 + self.iv_len])).decryptor()
        return dec.update(body) + dec.finalize()


def make_transform(
    enc: EncAlg,
    enc_key: bytes,
    integ: IntegAlg,
    integ_key: bytes,
    *,
    encryption_only_ok: bool = False,
) -> EspTransform:
    """Build the transform object for an ESP SA (validates algorithms and key lengths)."""
    check_esp_combination(
        enc, len(enc_key), integ, len(integ_key), encryption_only_ok=encryption_only_ok
    )
    if ENC[enc].aead:
        return AeadTransform(enc, enc_key)
    if enc is EncAlg.AES_CTR:
        return CtrHmacTransform(enc, enc_key, integ, integ_key)
    if integ is IntegAlg.NONE:
        return CbcOnlyTransform(enc, enc_key)
    return CbcHmacTransform(enc, enc_key, integ, integ_key)


def make_integrity(integ: IntegAlg, key: bytes) -> _Hmac:
    """An HMAC object for AH (RFC 4302)."""
    return _Hmac(integ, key)

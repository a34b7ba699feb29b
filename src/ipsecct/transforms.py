"""Cryptographic transforms for ESP, one object per SA (never one per packet).

An ESP payload after the 8-octet header is ``IV | ciphertext | ICV``. AEAD transforms
(AES-GCM RFC 4106, ChaCha20-Poly1305 RFC 7634) use the 64-bit sequence number as the IV, so an
IV can repeat only if a sequence number does, which the SA never allows. AES-CBC (RFC 3602)
uses a random IV and HMAC-SHA2 (RFC 4868) or HMAC-SHA1-96 (RFC 2404) over header, IV and
ciphertext (plus the high-order sequence bits with ESN, RFC 4303 §2.2.1).

All primitives come from ``cryptography``.
"""

from __future__ import annotations

import hmac as _hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as c_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .algorithms import ENC, INTEG, EncAlg, IntegAlg, check_esp_combination

_Q = struct.Struct("!Q")
_L = struct.Struct("!L")


class IntegrityFailure(Exception):
    """The ICV did not verify (internal: the data path turns it into a counted drop)."""


class EspTransform:
    """Seals and opens the part of an ESP packet after the SPI and sequence number."""

    iv_len: int
    icv_len: int
    block: int  # payload alignment: pad so (payload + 2) is a multiple of this

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        """Return ``header | IV | ciphertext | ICV`` for a padded plaintext."""
        raise NotImplementedError

    def open(self, packet: memoryview, seq: int, esn: bool) -> bytes:
        """Given the whole ESP packet, return the padded plaintext or raise IntegrityFailure."""
        raise NotImplementedError


class AeadTransform(EspTransform):
    __slots__ = ("_aead", "_salt", "_use_into")

    def __init__(self, alg: EncAlg, key: bytes) -> None:
        info = ENC[alg]
        self.iv_len = 8
        self.icv_len = 16
        self.block = info.block
        cipher_key, self._salt = key[:-4], key[-4:]
        self._aead: AESGCM | ChaCha20Poly1305
        if alg is EncAlg.AES_GCM_16:
            self._aead = AESGCM(cipher_key)
        else:
            self._aead = ChaCha20Poly1305(cipher_key)
        self._use_into = hasattr(self._aead, "encrypt_into")

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        iv = _Q.pack(seq)
        nonce = self._salt + iv
        # AAD is SPI | seq (RFC 4106 §5); with ESN, SPI | seq-high | seq-low.
        aad = header[:4] + iv if esn else header
        out = bytearray(16 + len(plaintext) + 16)
        out[0:8] = header
        out[8:16] = iv
        if self._use_into:
            self._aead.encrypt_into(nonce, plaintext, aad, memoryview(out)[16:])
        else:  # pragma: no cover - cryptography < 47
            out[16:] = self._aead.encrypt(nonce, bytes(plaintext), aad)
        return out

    def open(self, packet: memoryview, seq: int, esn: bool) -> bytes:
        if len(packet) < 8 + 8 + 16:
            raise IntegrityFailure
        iv = packet[8:16]
        nonce = self._salt + iv
        aad = bytes(packet[0:4]) + _Q.pack(seq) if esn else packet[0:8]
        data = packet[16:]
        try:
            if self._use_into:
                buf = bytearray(len(data) - 16)
                self._aead.decrypt_into(nonce, data, aad, buf)
                return bytes(buf)
            return self._aead.decrypt(nonce, bytes(data), bytes(aad))  # pragma: no cover
        except InvalidTag:
            raise IntegrityFailure from None


class _Hmac:
    __slots__ = ("_algo", "_key", "icv_len")

    def __init__(self, alg: IntegAlg, key: bytes) -> None:
        info = INTEG[alg]
        self._key = key
        self.icv_len = info.icv_len
        self._algo: hashes.HashAlgorithm = {
            "sha1": hashes.SHA1(),
            "sha256": hashes.SHA256(),
            "sha384": hashes.SHA384(),
            "sha512": hashes.SHA512(),
        }[info.hash_name]

    def mac(self, *parts: bytes | bytearray | memoryview) -> bytes:
        h = c_hmac.HMAC(self._key, self._algo)
        for p in parts:
            h.update(p)
        return h.finalize()[: self.icv_len]


class CbcHmacTransform(EspTransform):
    """AES-CBC (RFC 3602) or NULL encryption (RFC 2410) with an HMAC."""

    __slots__ = ("_hmac", "_key", "_null")

    def __init__(self, alg: EncAlg, key: bytes, integ: IntegAlg, integ_key: bytes) -> None:
        info = ENC[alg]
        self._null = alg is EncAlg.NULL
        self._key = key
        self.iv_len = info.iv_len
        self.block = info.block
        self._hmac = _Hmac(integ, integ_key)
        self.icv_len = self._hmac.icv_len

    def seal(self, header: bytes, seq: int, plaintext: bytes | bytearray, esn: bool) -> bytearray:
        if self._null:
            body = bytes(plaintext)
            iv = b""
        else:
            iv = os.urandom(16)
            enc = Cipher(algorithms.AES(self._key), modes.CBC(iv)).encryptor()
            body = enc.update(plaintext) + enc.finalize()
        out = bytearray(header)
        out += iv
        out += body
        icv = self._hmac.mac(out, _L.pack(seq >> 32)) if esn else self._hmac.mac(out)
        out += icv
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
        if self._null:
            return bytes(body)
        if len(body) == 0 or len(body) % 16:
            return b""  # authentic but not whole blocks: the caller reports bad padding
        dec = Cipher(algorithms.AES(self._key), modes.CBC(packet[8:24])).decryptor()
        return dec.update(body) + dec.finalize()


def make_transform(enc: EncAlg, enc_key: bytes, integ: IntegAlg, integ_key: bytes) -> EspTransform:
    """Build the transform object for an ESP SA (validates algorithms and key lengths)."""
    check_esp_combination(enc, len(enc_key), integ, len(integ_key))
    if ENC[enc].aead:
        return AeadTransform(enc, enc_key)
    return CbcHmacTransform(enc, enc_key, integ, integ_key)


def make_integrity(integ: IntegAlg, key: bytes) -> _Hmac:
    """An HMAC object for AH (RFC 4302)."""
    return _Hmac(integ, key)

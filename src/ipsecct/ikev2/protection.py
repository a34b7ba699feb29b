"""The Encrypted payload (RFC 7296 §3.14; AEAD per RFC 5282 and RFC 7634): sealing a list of
payloads into a whole message and opening a received one.

AES-CBC + HMAC: ``IV | CBC(payloads | padding | pad length) | ICV`` with the ICV over the whole
message up to it. AES-GCM-16 and ChaCha20-Poly1305: an 8-octet IV, the key's last four octets
are the salt of the nonce, and the IKE header and the SK payload's generic header are the
associated data.
"""

from __future__ import annotations

import hmac as _hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..errors import IkeParseError, IntegrityError
from .keys import integ_icv
from .message import (
    IKE_HEADER_LEN,
    Header,
    Payload,
    PayloadType,
    SKPayload,
    encode_payloads,
    first_type,
)
from .proposal import ENCR_AES_GCM_16, INTEG, Suite


@dataclass(frozen=True)
class Protection:
    """One direction's keys of an IKE SA: SK_e and SK_a of the sender."""

    suite: Suite
    enc_key: bytes = field(repr=False)
    integ_key: bytes = field(repr=False)

    @property
    def iv_len(self) -> int:
        return 8 if self.suite.aead else 16

    @property
    def icv_len(self) -> int:
        if self.suite.aead:
            return 16
        assert self.suite.integ is not None
        return INTEG[self.suite.integ][2]

    def overhead(self) -> int:
        """Octets the SK payload adds around its plaintext, padding at most."""
        return 4 + self.iv_len + self.icv_len + (1 if self.suite.aead else 16)

    def _aead(self) -> AESGCM | ChaCha20Poly1305:
        key = self.enc_key[:-4]
        return AESGCM(key) if self.suite.encr == ENCR_AES_GCM_16 else ChaCha20Poly1305(key)

    def seal(self, hdr: Header, payloads: list[Payload], *, inner_first: int | None = None,
             plain: bytes | None = None, prefix: bytes = b"",
             payload_type: int = PayloadType.SK) -> bytes:  # fmt: skip
        """The whole message: ``hdr`` (length and next payload filled in) followed by an SK
        payload holding ``payloads`` (or the already encoded ``plain``). ``prefix`` goes
        between the SK header and the IV (SKF's fragment number and total)."""
        if plain is None:
            plain = encode_payloads(payloads)
            inner_first = first_type(payloads)
        assert inner_first is not None
        if self.suite.aead:
            padded = plain + b"\0"
        else:
            pad = (-(len(plain) + 1)) % 16
            padded = plain + bytes(pad) + bytes((pad,))
        sk_len = 4 + len(prefix) + self.iv_len + len(padded) + self.icv_len
        total = IKE_HEADER_LEN + sk_len
        h = Header(hdr.spi_i, hdr.spi_r, payload_type, hdr.exchange, hdr.flags,
                   hdr.message_id, total)  # fmt: skip
        head = h.encode() + struct.pack("!BBH", inner_first, 0, sk_len) + prefix
        iv = os.urandom(self.iv_len)
        if self.suite.aead:
            ct = self._aead().encrypt(self.enc_key[-4:] + iv, padded, head)
            return head + iv + ct
        enc = Cipher(algorithms.AES(self.enc_key), modes.CBC(iv)).encryptor()
        ct = enc.update(padded) + enc.finalize()
        body = head + iv + ct
        assert self.suite.integ is not None
        return body + integ_icv(self.suite.integ, self.integ_key, body)

    def open(self, message: bytes, sk: SKPayload, *, skip: int = 0) -> bytes:
        """The plaintext payload chain of an SK (or, with ``skip`` = 4, SKF) payload.
        ``sk.offset`` is where the payload body starts in ``message``; its body runs to the end
        of the message."""
        start = sk.offset + skip
        body = message[start:]
        if len(body) < self.iv_len + self.icv_len + 1:
            raise IkeParseError("Encrypted payload is too short")
        iv = body[: self.iv_len]
        ct = body[self.iv_len : len(body) - self.icv_len]
        if self.suite.aead:
            aad = message[:start]
            try:
                padded = self._aead().decrypt(self.enc_key[-4:] + iv, body[self.iv_len :], aad)
            except InvalidTag:
                raise IntegrityError("Encrypted payload: ICV does not verify") from None
        else:
            assert self.suite.integ is not None
            icv = body[len(body) - self.icv_len :]
            want = integ_icv(self.suite.integ, self.integ_key, message[: len(message) - len(icv)])
            if not _hmac.compare_digest(icv, want):
                raise IntegrityError("Encrypted payload: ICV does not verify")
            if len(ct) % 16:
                raise IkeParseError("Encrypted payload is not a whole number of blocks")
            dec = Cipher(algorithms.AES(self.enc_key), modes.CBC(iv)).decryptor()
            padded = dec.update(ct) + dec.finalize()
        if not padded:
            raise IkeParseError("Encrypted payload has no pad length")
        pad = padded[-1]
        if pad + 1 > len(padded):
            raise IkeParseError("Encrypted payload: pad length exceeds the plaintext")
        return padded[: len(padded) - 1 - pad]

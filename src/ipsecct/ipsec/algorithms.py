"""The algorithms ipsecct supports, with their IANA IKEv2 transform numbers.

The numbers are those of the IANA "IKEv2 Transform Type 1/3" registries, so a feature context
names an algorithm the way IKEv2 negotiated it. Key lengths are the octets the SA holds: for the
AEAD transforms they include the 4-octet salt (RFC 4106 §8.1, RFC 7634 §2), for AES-CTR its
4-octet nonce (RFC 3686 §5.1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import AlgorithmError


class EncAlg(enum.IntEnum):
    """ESP encryption transforms (IANA IKEv2 Transform Type 1)."""

    AES_CBC = 12
    NULL = 11
    AES_CTR = 13
    AES_GCM_16 = 20
    CHACHA20_POLY1305 = 28


class IntegAlg(enum.IntEnum):
    """Integrity transforms (IANA IKEv2 Transform Type 3); NONE for the AEAD transforms."""

    NONE = 0
    HMAC_SHA1_96 = 2
    HMAC_SHA2_256_128 = 12
    HMAC_SHA2_384_192 = 13
    HMAC_SHA2_512_256 = 14


@dataclass(frozen=True)
class EncInfo:
    alg: EncAlg
    key_lengths: tuple[int, ...]
    aead: bool
    iv_len: int
    block: int
    icv_len: int
    wireshark: str
    # The IV is the 64-bit sequence number and the key ends with a 4-octet salt or nonce
    # (AES-GCM, ChaCha20-Poly1305, AES-CTR): a sequence number sent twice under one key
    # repeats a nonce (a keystream), so such an SA's counter never wraps and its tunnels are
    # refused a start without their durable state.
    seq_iv: bool = False


@dataclass(frozen=True)
class IntegInfo:
    alg: IntegAlg
    key_length: int
    icv_len: int
    hash_name: str
    wireshark: str


ENC: dict[EncAlg, EncInfo] = {
    EncAlg.NULL: EncInfo(EncAlg.NULL, (0,), False, 0, 4, 0, "NULL"),
    EncAlg.AES_CBC: EncInfo(EncAlg.AES_CBC, (16, 24, 32), False, 16, 16, 0, "AES-CBC [RFC3602]"),
    EncAlg.AES_CTR: EncInfo(
        EncAlg.AES_CTR, (20, 28, 36), False, 8, 4, 0, "AES-CTR [RFC3686]", True
    ),
    EncAlg.AES_GCM_16: EncInfo(
        EncAlg.AES_GCM_16, (20, 28, 36), True, 8, 4, 16, "AES-GCM with 16 octet ICV [RFC4106]",
        True,
    ),
    EncAlg.CHACHA20_POLY1305: EncInfo(
        EncAlg.CHACHA20_POLY1305, (36,), True, 8, 4, 16, "CHACHA20-POLY1305 [RFC7634]", True
    ),
}

INTEG: dict[IntegAlg, IntegInfo] = {
    IntegAlg.NONE: IntegInfo(IntegAlg.NONE, 0, 0, "", "NULL"),
    IntegAlg.HMAC_SHA1_96: IntegInfo(
        IntegAlg.HMAC_SHA1_96, 20, 12, "sha1", "HMAC-SHA-1-96 [RFC2404]"
    ),
    IntegAlg.HMAC_SHA2_256_128: IntegInfo(
        IntegAlg.HMAC_SHA2_256_128, 32, 16, "sha256", "HMAC-SHA-256-128 [RFC4868]"
    ),
    IntegAlg.HMAC_SHA2_384_192: IntegInfo(
        IntegAlg.HMAC_SHA2_384_192, 48, 24, "sha384", "HMAC-SHA-384-192 [RFC4868]"
    ),
    IntegAlg.HMAC_SHA2_512_256: IntegInfo(
        IntegAlg.HMAC_SHA2_512_256, 64, 32, "sha512", "HMAC-SHA-512-256 [RFC4868]"
    ),
}

# Short names used in JSON and TOML (strongSwan-like spelling).
ENC_NAMES: dict[str, EncAlg] = {
    "null": EncAlg.NULL,
    "aes-cbc": EncAlg.AES_CBC,
    "aes-ctr": EncAlg.AES_CTR,
    "aes-gcm-16": EncAlg.AES_GCM_16,
    "chacha20-poly1305": EncAlg.CHACHA20_POLY1305,
}
INTEG_NAMES: dict[str, IntegAlg] = {
    "none": IntegAlg.NONE,
    "hmac-sha1-96": IntegAlg.HMAC_SHA1_96,
    "hmac-sha2-256-128": IntegAlg.HMAC_SHA2_256_128,
    "hmac-sha2-384-192": IntegAlg.HMAC_SHA2_384_192,
    "hmac-sha2-512-256": IntegAlg.HMAC_SHA2_512_256,
}


def enc_name(alg: EncAlg) -> str:
    return next(k for k, v in ENC_NAMES.items() if v is alg)


def integ_name(alg: IntegAlg) -> str:
    return next(k for k, v in INTEG_NAMES.items() if v is alg)


# strongSwan's names of the transforms (encryption_algorithm_names and
# integrity_algorithm_names: crypter.c, signer.c), as swanctl --list-sas and charon's log
# print them; read here and by ikev2.proposal.Suite (keyed by IANA number: an IntEnum member
# or a plain int finds the same entry).
SWANCTL_ENC: dict[int, str] = {
    EncAlg.NULL: "NULL",
    EncAlg.AES_CBC: "AES_CBC",
    EncAlg.AES_CTR: "AES_CTR",
    EncAlg.AES_GCM_16: "AES_GCM_16",
    EncAlg.CHACHA20_POLY1305: "CHACHA20_POLY1305",
}
SWANCTL_INTEG: dict[int, str] = {
    IntegAlg.HMAC_SHA1_96: "HMAC_SHA1_96",
    IntegAlg.HMAC_SHA2_256_128: "HMAC_SHA2_256_128",
    IntegAlg.HMAC_SHA2_384_192: "HMAC_SHA2_384_192",
    IntegAlg.HMAC_SHA2_512_256: "HMAC_SHA2_512_256",
}


def swanctl_algorithms(enc: EncAlg, enc_key_len: int, integ: IntegAlg, esn: bool) -> str:
    """An SA's algorithms as ``swanctl --list-sas`` prints a CHILD SA's: "AES_GCM_16-128",
    "AES_CBC-128/HMAC_SHA2_256_128/ESN", "CHACHA20_POLY1305" (its key size is not
    negotiated, so not printed). ``enc_key_len``: the octets the SA holds (an AEAD's salt
    included)."""
    name = SWANCTL_ENC[enc]
    bits = 8 * (enc_key_len - 4 if ENC[enc].seq_iv else enc_key_len)
    if enc in (EncAlg.AES_CBC, EncAlg.AES_CTR, EncAlg.AES_GCM_16) and bits > 0:
        name += f"-{bits}"
    if integ is not IntegAlg.NONE:
        name += "/" + SWANCTL_INTEG[integ]
    return name + ("/ESN" if esn else "")


def enc_from_name(name: str) -> EncAlg:
    try:
        return ENC_NAMES[name.lower()]
    except KeyError:
        raise AlgorithmError(
            f"unknown encryption algorithm {name!r} (known: {', '.join(ENC_NAMES)})"
        ) from None


def integ_from_name(name: str) -> IntegAlg:
    try:
        return INTEG_NAMES[name.lower()]
    except KeyError:
        raise AlgorithmError(
            f"unknown integrity algorithm {name!r} (known: {', '.join(INTEG_NAMES)})"
        ) from None


def enc_from_number(number: int) -> EncAlg:
    try:
        return EncAlg(number)
    except ValueError:
        raise AlgorithmError(f"unknown encryption transform {number}") from None


def integ_from_number(number: int) -> IntegAlg:
    try:
        return IntegAlg(number)
    except ValueError:
        raise AlgorithmError(f"unknown integrity transform {number}") from None


def check_esp_combination(
    enc: EncAlg,
    enc_key_len: int,
    integ: IntegAlg,
    integ_key_len: int,
    *,
    encryption_only_ok: bool = False,
) -> None:
    """Raise AlgorithmError unless (enc, integ) and the key lengths make a usable ESP SA.

    ``encryption_only_ok`` lets AES-CBC go without integrity (RFC 3602's test
    cases, old captures): only for decrypting a capture offline, never for an SA that sends
    or receives (RFC 8221 §3 forbids it)."""
    info = ENC[enc]
    if enc_key_len not in info.key_lengths:
        raise AlgorithmError(
            f"{enc_name(enc)} takes a key of {' or '.join(map(str, info.key_lengths))} octets,"
            f" not {enc_key_len}"
        )
    if info.aead and integ is not IntegAlg.NONE:
        raise AlgorithmError(f"{enc_name(enc)} is an AEAD transform: integrity must be none")
    if not info.aead and integ is IntegAlg.NONE and (enc is not EncAlg.AES_CBC
                                                     or not encryption_only_ok):  # fmt: skip
        raise AlgorithmError(
            f"{enc_name(enc)} needs an integrity algorithm (encryption-only ESP is refused,"
            " RFC 8221 §3)"
        )
    check_integ_key(integ, integ_key_len)


def check_integ_key(integ: IntegAlg, integ_key_len: int) -> None:
    want = INTEG[integ].key_length
    if integ_key_len != want:
        raise AlgorithmError(
            f"{integ_name(integ)} takes a key of {want} octets, not {integ_key_len}"
        )

"""IKEv2 transforms and proposals (RFC 7296 §3.3): IANA numbers, strongSwan's proposal
strings (``aes128gcm16-prfsha256-x25519``), and the responder's choice among the initiator's
proposals (§2.7), configured order first, as strongSwan does by default."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ConfigError
from ..ipsec.algorithms import SWANCTL_ENC, SWANCTL_INTEG
from .message import Proposal, ProtocolId, Transform, TransformType

# ENCR (Transform Type 1)
ENCR_NULL = 11  # (ESP only: integrity without confidentiality, RFC 2410)
ENCR_AES_CBC = 12
ENCR_AES_CTR = 13  # (ESP only here: RFC 3686)
ENCR_AES_GCM_16 = 20
ENCR_CHACHA20_POLY1305 = 28
# PRF (Type 2)
PRF_HMAC_SHA1 = 2
PRF_HMAC_SHA2_256 = 5
PRF_HMAC_SHA2_384 = 6
PRF_HMAC_SHA2_512 = 7
# INTEG (Type 3)
AUTH_HMAC_SHA1_96 = 2
AUTH_HMAC_SHA2_256_128 = 12
AUTH_HMAC_SHA2_384_192 = 13
AUTH_HMAC_SHA2_512_256 = 14
# ESN (Type 5)
ESN_NO = 0
ESN_YES = 1

AEAD = {ENCR_AES_GCM_16, ENCR_CHACHA20_POLY1305}
KEYED_ENCR = {ENCR_AES_CBC, ENCR_AES_CTR, ENCR_AES_GCM_16}  # carry a Key Length attribute
# a 4-octet salt or nonce after the key in the key material (RFC 4106 §8.1, RFC 3686 §5.1)
SALTED_ENCR = AEAD | {ENCR_AES_CTR}
ESP_ONLY_ENCR = {ENCR_NULL, ENCR_AES_CTR}  # (the IKE SA's protection has neither)
PRF_HASH = {
    PRF_HMAC_SHA1: "sha1",
    PRF_HMAC_SHA2_256: "sha256",
    PRF_HMAC_SHA2_384: "sha384",
    PRF_HMAC_SHA2_512: "sha512",
}
# integrity: (hash, key octets, ICV octets)
INTEG = {
    AUTH_HMAC_SHA1_96: ("sha1", 20, 12),
    AUTH_HMAC_SHA2_256_128: ("sha256", 32, 16),
    AUTH_HMAC_SHA2_384_192: ("sha384", 48, 24),
    AUTH_HMAC_SHA2_512_256: ("sha512", 64, 32),
}
DH_GROUPS = {14, 19, 20, 21, 31, 32}  # what ikev2.keys.KeyExchange computes

_ENCR_WORDS: dict[str, tuple[int, int]] = {
    "aes128": (ENCR_AES_CBC, 128),
    "aes192": (ENCR_AES_CBC, 192),
    "aes256": (ENCR_AES_CBC, 256),
    "aes": (ENCR_AES_CBC, 128),
    "aes128gcm16": (ENCR_AES_GCM_16, 128),
    "aes192gcm16": (ENCR_AES_GCM_16, 192),
    "aes256gcm16": (ENCR_AES_GCM_16, 256),
    "aes128gcm128": (ENCR_AES_GCM_16, 128),
    "aes192gcm128": (ENCR_AES_GCM_16, 192),
    "aes256gcm128": (ENCR_AES_GCM_16, 256),
    "aes128gcm": (ENCR_AES_GCM_16, 128),
    "aes192gcm": (ENCR_AES_GCM_16, 192),
    "aes256gcm": (ENCR_AES_GCM_16, 256),
    "chacha20poly1305": (ENCR_CHACHA20_POLY1305, 256),
    "aes128ctr": (ENCR_AES_CTR, 128),
    "aes192ctr": (ENCR_AES_CTR, 192),
    "aes256ctr": (ENCR_AES_CTR, 256),
    "null": (ENCR_NULL, 0),
}
_INTEG_WORDS = {
    "sha1": AUTH_HMAC_SHA1_96,
    "sha": AUTH_HMAC_SHA1_96,
    "sha256": AUTH_HMAC_SHA2_256_128,
    "sha2_256": AUTH_HMAC_SHA2_256_128,
    "sha384": AUTH_HMAC_SHA2_384_192,
    "sha2_384": AUTH_HMAC_SHA2_384_192,
    "sha512": AUTH_HMAC_SHA2_512_256,
    "sha2_512": AUTH_HMAC_SHA2_512_256,
}
_PRF_OF_INTEG = {
    AUTH_HMAC_SHA1_96: PRF_HMAC_SHA1,
    AUTH_HMAC_SHA2_256_128: PRF_HMAC_SHA2_256,
    AUTH_HMAC_SHA2_384_192: PRF_HMAC_SHA2_384,
    AUTH_HMAC_SHA2_512_256: PRF_HMAC_SHA2_512,
}
_PRF_WORDS = {
    "prfsha1": PRF_HMAC_SHA1,
    "prfsha256": PRF_HMAC_SHA2_256,
    "prfsha384": PRF_HMAC_SHA2_384,
    "prfsha512": PRF_HMAC_SHA2_512,
}
_DH_WORDS = {
    "modp2048": 14,
    "modp3072": 15,
    "modp4096": 16,
    "modp6144": 17,
    "modp8192": 18,
    "ecp256": 19,
    "ecp384": 20,
    "ecp521": 21,
    "x25519": 31,
    "curve25519": 31,
    "x448": 32,
    "curve448": 32,
}

# strongSwan 5.9.8's default proposals ("default" in a proposal list).
DEFAULT_IKE = [
    "aes128-aes192-aes256-sha256-sha384-sha512-prfsha256-prfsha384-prfsha512"
    "-x25519-x448-ecp256-ecp384-ecp521-modp3072-modp4096-modp6144-modp8192"
    "-modp2048",
    "aes128gcm16-aes192gcm16-aes256gcm16-chacha20poly1305-prfsha256-prfsha384-prfsha512"
    "-x25519-x448-ecp256-ecp384-ecp521-modp3072-modp4096-modp6144-modp8192"
    "-modp2048",
]
DEFAULT_ESP = [
    "aes128gcm16-aes192gcm16-aes256gcm16-chacha20poly1305",
    "aes128-aes192-aes256-sha256-sha384-sha512-sha1",
]


@dataclass(frozen=True)
class Offer:
    """One configured proposal: the acceptable transforms of each type, in preference order."""

    protocol: int
    encr: tuple[tuple[int, int], ...]  # (transform id, key bits)
    integ: tuple[int, ...] = ()
    prf: tuple[int, ...] = ()
    dh: tuple[int, ...] = ()
    esn: tuple[int, ...] = (ESN_NO,)

    def transforms(self) -> tuple[Transform, ...]:
        """This offer as transforms (for an initiator's SA payload)."""
        out = [Transform(TransformType.ENCR, e, k if e in KEYED_ENCR else None)
               for e, k in self.encr]  # fmt: skip
        out += [Transform(TransformType.PRF, p) for p in self.prf]
        out += [Transform(TransformType.INTEG, i) for i in self.integ]
        out += [Transform(TransformType.DH, d) for d in self.dh]
        if self.protocol != ProtocolId.IKE:
            out += [Transform(TransformType.ESN, e) for e in self.esn]
        return tuple(out)


@dataclass(frozen=True)
class Suite:
    """What was negotiated: one transform of each type."""

    protocol: int
    encr: int
    key_bits: int
    integ: int | None = None
    prf: int | None = None
    dh: int | None = None
    esn: bool = False

    @property
    def aead(self) -> bool:
        return self.encr in AEAD

    @property
    def enc_key_len(self) -> int:
        """Octets of encryption key material (AEAD: the key and its 4-octet salt; AES-CTR:
        the key and its 4-octet nonce; NULL: none)."""
        return self.key_bits // 8 + (4 if self.encr in SALTED_ENCR else 0)

    @property
    def integ_key_len(self) -> int:
        return INTEG[self.integ][1] if self.integ is not None else 0

    def proposal(self, num: int, spi: bytes) -> Proposal:
        tr = [Transform(TransformType.ENCR, self.encr,
                        self.key_bits if self.encr in KEYED_ENCR else None)]  # fmt: skip
        if self.prf is not None:
            tr.append(Transform(TransformType.PRF, self.prf))
        if self.integ is not None:
            tr.append(Transform(TransformType.INTEG, self.integ))
        if self.dh is not None:
            tr.append(Transform(TransformType.DH, self.dh))
        if self.protocol != ProtocolId.IKE:
            tr.append(Transform(TransformType.ESN, ESN_YES if self.esn else ESN_NO))
        return Proposal(num, self.protocol, spi, tuple(tr))

    def name(self) -> str:
        """charon's way of naming the suite in its log ("selected proposal:
        ESP:AES_GCM_16_128/NO_EXT_SEQ", proposal.c's printf hook); a transform number with no
        name here (a peer gateway's context may carry any) is shown as a number, never a
        KeyError."""
        return self._named("_", True)

    def listing(self) -> str:
        """``swanctl --list-sas``'s spelling (list_sas.c from vici_query.c's encr-alg,
        encr-keysize, integ-alg, prf-alg, dh-group): the key size after a '-'
        ("AES_CBC-128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/CURVE_25519"), "/ESN" only when
        the CHILD SA has it."""
        return self._named("-", False)

    def _named(self, size_sep: str, seq_always: bool) -> str:
        enc = SWANCTL_ENC.get(self.encr, f"ENCR_{self.encr}")
        parts = [enc if self.encr in (ENCR_CHACHA20_POLY1305, ENCR_NULL)
                 else f"{enc}{size_sep}{self.key_bits}"]  # fmt: skip
        if self.integ is not None:
            parts.append(SWANCTL_INTEG.get(self.integ, f"INTEG_{self.integ}"))
        if self.prf is not None:
            parts.append({PRF_HMAC_SHA1: "PRF_HMAC_SHA1", PRF_HMAC_SHA2_256: "PRF_HMAC_SHA2_256",
                          PRF_HMAC_SHA2_384: "PRF_HMAC_SHA2_384",
                          PRF_HMAC_SHA2_512: "PRF_HMAC_SHA2_512"}.get(
                              self.prf, f"PRF_{self.prf}"))  # fmt: skip
        if self.dh is not None:
            parts.append({31: "CURVE_25519", 32: "CURVE_448", 19: "ECP_256", 20: "ECP_384",
                          21: "ECP_521", 14: "MODP_2048", 15: "MODP_3072",
                          16: "MODP_4096", 17: "MODP_6144",
                          18: "MODP_8192"}.get(self.dh, f"DH_{self.dh}"))  # fmt: skip
        if self.protocol != ProtocolId.IKE and (seq_always or self.esn):
            parts.append(("EXT_SEQ" if seq_always else "ESN") if self.esn else "NO_EXT_SEQ")
        return "/".join(parts)


_ENCR_NAMES = {ENCR_AES_CBC: "AES_CBC", ENCR_AES_GCM_16: "AES_GCM_16",
               ENCR_CHACHA20_POLY1305: "CHACHA20_POLY1305", 3: "3DES", 13: "AES_CTR",
               14: "AES_CCM_8", 16: "AES_CCM_16", 18: "AES_GCM_8", 19: "AES_GCM_12",
               23: "CAMELLIA_CBC", ENCR_NULL: "NULL"}  # fmt: skip
_INTEG_NAMES = {AUTH_HMAC_SHA1_96: "HMAC_SHA1_96", AUTH_HMAC_SHA2_256_128: "HMAC_SHA2_256_128",
                AUTH_HMAC_SHA2_384_192: "HMAC_SHA2_384_192",
                AUTH_HMAC_SHA2_512_256: "HMAC_SHA2_512_256", 1: "HMAC_MD5_96",
                5: "AES_XCBC_96", 8: "AES_CMAC_96"}  # fmt: skip
_PRF_NAMES = {PRF_HMAC_SHA1: "PRF_HMAC_SHA1", PRF_HMAC_SHA2_256: "PRF_HMAC_SHA2_256",
              PRF_HMAC_SHA2_384: "PRF_HMAC_SHA2_384", PRF_HMAC_SHA2_512: "PRF_HMAC_SHA2_512",
              1: "PRF_HMAC_MD5", 4: "PRF_AES128_XCBC", 8: "PRF_AES128_CMAC"}  # fmt: skip
_DH_NAMES = {31: "CURVE_25519", 32: "CURVE_448", 19: "ECP_256", 20: "ECP_384", 21: "ECP_521",
             14: "MODP_2048", 15: "MODP_3072", 16: "MODP_4096", 17: "MODP_6144",
             18: "MODP_8192", 1: "MODP_768", 2: "MODP_1024", 5: "MODP_1536"}  # fmt: skip


def describe(transforms: tuple[Transform, ...] | list[Transform], protocol: int) -> str:
    """One proposal's transforms as charon's "received proposals:" line spells them
    (``IKE:AES_CBC_256/HMAC_SHA1_96/PRF_HMAC_SHA1/MODP_1024``): what a peer offered, for
    the log line of a refusal. A number this has no name for is shown as a number."""
    names = {TransformType.ENCR: _ENCR_NAMES, TransformType.INTEG: _INTEG_NAMES,
             TransformType.PRF: _PRF_NAMES, TransformType.DH: _DH_NAMES}  # fmt: skip
    order = (TransformType.ENCR, TransformType.INTEG, TransformType.PRF, TransformType.DH,
             TransformType.ESN)  # fmt: skip
    parts = []
    for kind in order:
        for t in transforms:
            if t.type != kind:
                continue
            if kind == TransformType.ESN:
                parts.append("EXT_SEQ" if t.id == ESN_YES else "NO_EXT_SEQ")
                continue
            name = names[kind].get(t.id, f"{kind.name}_{t.id}")
            parts.append(f"{name}_{t.key_length}" if t.key_length is not None else name)
    for t in transforms:
        if t.type not in order:
            parts.append(f"TRANSFORM_{t.type}_{t.id}")
    proto = {int(ProtocolId.IKE): "IKE", int(ProtocolId.ESP): "ESP"}.get(
        protocol, f"PROTO_{protocol}")
    return f"{proto}:" + "/".join(parts)


def describe_all(proposals: Sequence[Proposal] | Sequence[Offer], limit: int = 8) -> str:
    """Proposals (a peer's, or configured offers) as described above, comma-separated; at
    most ``limit`` of them (a peer's SA payload is its own to make long)."""
    out = [describe(p.transforms if isinstance(p, Proposal) else p.transforms(), p.protocol)
           for p in proposals[:limit]]  # fmt: skip
    if len(proposals) > limit:
        out.append(f"and {len(proposals) - limit} more")
    text = ", ".join(out)
    return text if len(text) <= 1000 else text[:1000] + "..."  # (transforms: as many)


def parse(text: str, protocol: int) -> Offer:
    """One strongSwan proposal string, e.g. ``aes128gcm16-prfsha256-x25519`` (IKE) or
    ``aes128-sha256-esn`` (ESP). Raises ConfigError naming the word it does not know."""
    encr: list[tuple[int, int]] = []
    integ: list[int] = []
    prf: list[int] = []
    dh: list[int] = []
    esn: list[int] = []
    if "," in text:  # swanctl's list in one item of a TOML list: "ecp256,aes256" was a word
        shown = ", ".join(f'"{p.strip()}"' for p in text.split(","))
        raise ConfigError(f"proposal {text!r}: holds several (a comma separates proposals);"
                          f" one per list item: [{shown}]")
    for word in text.strip().lower().split("-"):
        if word in _ENCR_WORDS:
            encr.append(_ENCR_WORDS[word])
        elif word in _INTEG_WORDS:
            integ.append(_INTEG_WORDS[word])
        elif word in _PRF_WORDS:
            # ESP has no PRF: strongSwan 5.9.8 loads esp_proposals aes128gcm16-prfsha256 as
            # AES_GCM_16_128 and aes128-sha256-prfsha256-x25519 as
            # AES_CBC_128/HMAC_SHA2_256_128/CURVE_25519 (the word left out); so does this
            if protocol == ProtocolId.IKE:
                prf.append(_PRF_WORDS[word])
        elif word in _DH_WORDS:
            dh.append(_DH_WORDS[word])
        elif word in ("esn", "noesn") and protocol == ProtocolId.ESP:
            esn.append(ESN_YES if word == "esn" else ESN_NO)
        else:
            raise ConfigError(f"proposal {text!r}: unknown or unsupported algorithm {word!r}")
    if not encr:
        raise ConfigError(f"proposal {text!r}: no encryption algorithm")
    if protocol == ProtocolId.IKE and any(e in ESP_ONLY_ENCR for e, _ in encr):
        raise ConfigError(f"proposal {text!r}: null and aes*ctr are ESP proposals only"
                          " (esp_proposals), not an IKE SA's")  # fmt: skip
    aead = [e for e, _ in encr if e in AEAD]
    if aead and len(aead) != len(encr):
        raise ConfigError(f"proposal {text!r}: mixes AEAD and non-AEAD encryption")
    if not aead and not integ:
        raise ConfigError(f"proposal {text!r}: needs an integrity algorithm")
    if protocol == ProtocolId.IKE:
        if not prf:  # (strongSwan's rule: the PRF of each integrity algorithm)
            prf = [_PRF_OF_INTEG[i] for i in integ]
            if not prf:
                raise ConfigError(f"proposal {text!r}: an AEAD IKE proposal needs a prf")
        if not dh:
            raise ConfigError(f"proposal {text!r}: an IKE proposal needs a DH group")
    if aead:  # an AEAD proposal proposes no integrity algorithm; one written stood for the
        # PRF above (IKE) or is left out (ESP), as strongSwan 5.9.8 reads
        # aes256gcm16-sha384-ecp384 (IKE: AES_GCM_16_256/PRF_HMAC_SHA2_384/ECP_384) and
        # aes128gcm16-sha256 (ESP: AES_GCM_16_128): both were refused here
        integ = []
    return Offer(protocol, tuple(encr), tuple(dict.fromkeys(integ)), tuple(dict.fromkeys(prf)),
                 tuple(dh), tuple(esn) or (ESN_NO,))  # fmt: skip


def parse_list(items: list[str], protocol: int) -> list[Offer]:
    """A configured list; ``default`` expands to strongSwan's default proposals."""
    out: list[Offer] = []
    for it in items:
        if it.strip().lower() == "default":
            dflt = DEFAULT_IKE if protocol == ProtocolId.IKE else DEFAULT_ESP
            out += [parse(d, protocol) for d in dflt]
        else:
            out.append(parse(it, protocol))
    return out


def _pick(mine: tuple[int, ...], theirs: list[int]) -> int | None:
    for m in mine:
        if m in theirs:
            return m
    return None


_ENCR, _PRF, _INTEG, _DH, _ESN = (int(t) for t in (
    TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH,
    TransformType.ESN))  # fmt: skip


class _Theirs(NamedTuple):
    """A peer's proposal as matched: what it allows of each transform type, read once (a
    tuple of sets, never changed once made: one per proposal of an SA payload from anyone)."""

    protocol: int
    known: bool  # every transform of a type we know (else it cannot be accepted)
    encr: set[tuple[int, int | None]]  # (id, key bits; ChaCha20-Poly1305's 256)
    integ: set[int]  # (those without a Key Length attribute)
    prf: set[int]
    dh: set[int]
    esn: set[int]

    @staticmethod
    def of(p: Proposal) -> _Theirs:
        """One pass over the proposal's transforms (up to 255 of them, from anyone)."""
        encr: set[tuple[int, int | None]] = set()
        integ: set[int] = set()
        prf: set[int] = set()
        dh: set[int] = set()
        esn: set[int] = set()
        known = True
        for t in p.transforms:
            tt = t.type
            # (plain ints, not TransformType's members: each of those is a global and an
            # attribute looked up, for each of up to 65,025 transforms of a payload)
            if tt == _DH:
                dh.add(t.id)
            elif tt == _ENCR:
                k = t.key_length
                if k is None:
                    k = 256 if t.id == ENCR_CHACHA20_POLY1305 else 0 if t.id == ENCR_NULL else None
                encr.add((t.id, k))
            elif tt == _PRF:
                prf.add(t.id)
            elif tt == _INTEG:
                if t.key_length is None:
                    integ.add(t.id)
            elif tt == _ESN:
                esn.add(t.id)
            else:
                known = False
        return _Theirs(p.protocol, known, encr, integ, prf, dh, esn)


def _first(mine: tuple[int, ...], theirs: set[int]) -> int | None:
    return next((m for m in mine if m in theirs), None)


def match(offer: Offer, p: Proposal, *, ke_group: int | None = None,
          ignore_dh: bool = False) -> Suite | None:  # fmt: skip
    """The suite that both ``offer`` and the peer's proposal ``p`` allow, or None."""
    return _match(offer, _Theirs.of(p), ke_group, ignore_dh)


def _match(offer: Offer, p: _Theirs, ke_group: int | None, ignore_dh: bool) -> Suite | None:
    if p.protocol != offer.protocol or not p.known:
        return None  # (an unknown transform type: the proposal cannot be accepted)
    encr = next(((e, k) for e, k in offer.encr if (e, k) in p.encr), None)
    if encr is None:
        return None
    integ = None
    if encr[0] in AEAD:
        if any(i != 0 for i in p.integ):
            return None
    else:
        integ = _first(offer.integ, p.integ)
        if integ is None:
            return None
    prf = None
    dh = None
    esn = False
    if offer.protocol == ProtocolId.IKE:
        prf = _first(offer.prf, p.prf)
        if prf is None:
            return None
        if ke_group is not None and ke_group in offer.dh and ke_group in p.dh:
            dh = ke_group
        else:
            dh = _first(offer.dh, p.dh)
        if dh is None:
            return None
    else:
        if p.dh - {0} and not ignore_dh:
            dh = _first(offer.dh, p.dh - {0})
            if dh is None:
                return None
        esn_id = _first(offer.esn, p.esn)
        if esn_id is None:
            return None
        esn = esn_id == ESN_YES
    return Suite(offer.protocol, encr[0], encr[1], integ, prf, dh, esn)


def admits(offers: list[Offer], suite: Suite) -> bool:
    """Would one of ``offers`` have allowed this negotiated ``suite``? (A replicated or moved
    SA checked against the local configuration.) A CHILD SA's DH group (PFS) is checked only
    when it has one: the first CHILD SA, made in IKE_AUTH, never has."""
    for o in offers:
        if o.protocol != suite.protocol or (suite.encr, suite.key_bits) not in o.encr:
            continue
        if suite.integ is not None and suite.integ not in o.integ:
            continue
        if suite.protocol == ProtocolId.IKE:
            if suite.prf not in o.prf or suite.dh not in o.dh:
                continue
        else:
            if suite.dh is not None and suite.dh not in o.dh:
                continue
            if (ESN_YES if suite.esn else ESN_NO) not in o.esn:
                continue
        return True
    return False


def choose(offers: list[Offer], proposals: tuple[Proposal, ...], *, ke_group: int | None = None,
           ignore_dh: bool = False) -> tuple[Proposal, Suite] | None:  # fmt: skip
    """Our configured order first; within it the peer's order. Prefers a suite whose DH group
    is the one the peer's KE payload already carries (saves a round trip)."""
    return Chooser(proposals, ke_group=ke_group, ignore_dh=ignore_dh).choose(offers)


class Chooser:
    """The peer's proposals (an SA payload: up to 255 of them, of up to 255 transforms, from
    anyone at IKE_SA_INIT), each read once, and each configured proposal matched against
    each of them once, whatever the number of connections that offer it (a gateway's
    connections mostly share theirs) and of the passes :meth:`choose` makes."""

    def __init__(self, proposals: tuple[Proposal, ...], *, ke_group: int | None = None,
                 ignore_dh: bool = False) -> None:  # fmt: skip
        self.proposals = proposals
        self.ke_group, self.ignore_dh = ke_group, ignore_dh
        self._theirs: list[_Theirs] | None = None
        self._done: dict[Offer, list[Suite | None]] = {}
        self._firsts: dict[tuple[Offer, bool], tuple[Proposal, Suite] | None] = {}

    def _first(self, offer: Offer, with_ke: bool) -> tuple[Proposal, Suite] | None:
        """The peer's first proposal that ``offer`` takes (``with_ke``: with the KE payload's
        group), found once per offer and pass: the next connection that offers it is told
        without a walk of the peer's proposals (255 of them, twice, per connection)."""
        key = (offer, with_ke)
        if key in self._firsts:
            return self._firsts[key]
        if self._theirs is None:
            self._theirs = [_Theirs.of(p) for p in self.proposals]
        found = self._done.get(offer)
        if found is None:
            # (what cannot match, for want of a common encryption, PRF or DH group, is
            # passed over before _match: most of a hostile SA payload's proposals)
            encr, prf, dh = frozenset(offer.encr), frozenset(offer.prf), frozenset(offer.dh)
            ike = offer.protocol == ProtocolId.IKE
            found = self._done[offer] = [
                None if p.protocol != offer.protocol or p.encr.isdisjoint(encr)
                or (ike and (p.prf.isdisjoint(prf) or p.dh.isdisjoint(dh)))
                else _match(offer, p, self.ke_group, self.ignore_dh)
                for p in self._theirs]  # fmt: skip
        first = self._firsts[key] = next(
            ((p, s) for p, s in zip(self.proposals, found, strict=True)
             if s is not None and (not with_ke or s.dh == self.ke_group)), None)  # fmt: skip
        return first

    def choose(self, offers: list[Offer]) -> tuple[Proposal, Suite] | None:
        """As :func:`choose`, for a connection offering ``offers``."""
        for with_ke in (True, False) if self.ke_group is not None else (False,):
            for offer in offers:
                first = self._first(offer, with_ke)
                if first is not None:
                    return first
        return None

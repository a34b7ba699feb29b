"""Outbound sequence numbers reserved ahead in durable blocks (sans-I/O).

An AEAD transform's nonce is built from the ESP sequence number (RFC 4106 §3, RFC 7634 §2):
an outbound SA that sends the same number twice under one key reuses a nonce. A counter that
lives only in memory starts again after a restart; this module keeps it ahead of anything
ever sent, whatever the moment of a crash:

- An outbound SA may send only numbers up to its ``seq_ceiling``, the top of a block that is
  already on stable storage (:class:`~ipsecct.ipsec.sad.SecurityAssociation` documents the
  fields; the data paths honour them and drop, counted as ``seq_unreserved``, what would need
  a number above it).
- Past ``seq_low_water`` (half a block before the ceiling) the SA queues a ``SEQ_RESERVE``
  event once. The adapter asks :meth:`Reservations.request` for the next ceiling, writes it
  to stable storage, and only then calls :meth:`Reservations.granted`.
- On start the adapter calls :meth:`Reservations.enrol` with the ceiling it stored: the
  counter resumes there, past every number the previous run may have sent, and nothing is
  sent until the first block of this run is durable.

So a crash skips at most one block ahead, never back. The invariant wins over liveness: a
storage that cannot keep up stops the SA's traffic, counted, instead of risking a repeat.
"""

from __future__ import annotations

import hmac

from .sad import MAX_SEQ_64, SecurityAssociation

DEFAULT_BLOCK = 1 << 16


class Reservations:
    """The reservation rule for every outbound SA of a node: blocks of ``block`` numbers."""

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        if block < 2:
            raise ValueError("a reservation block holds at least 2 sequence numbers")
        self.block = block

    @staticmethod
    def enrol(sa: SecurityAssociation, durable_ceiling: int = 0) -> None:
        """Put ``sa`` under reservations, resuming after ``durable_ceiling`` (the highest
        number a previous run may have sent). Until :meth:`granted`, ``sa`` sends nothing."""
        sa.seq = min(max(sa.seq, durable_ceiling), sa.seq_limit)
        sa.seq_ceiling = sa.seq
        sa.seq_low_water = sa.seq
        sa.seq_reserve_pending = False

    def request(self, sa: SecurityAssociation) -> int:
        """The ceiling to make durable next for ``sa``: a block past what it may send now."""
        sa.seq_reserve_pending = True
        base = max(sa.seq, sa.seq_ceiling) if sa.seq_ceiling != MAX_SEQ_64 else sa.seq
        return min(base + self.block, sa.seq_limit)

    def granted(self, sa: SecurityAssociation, ceiling: int) -> None:
        """``ceiling`` is on stable storage: ``sa`` may send up to it."""
        if sa.seq_ceiling == MAX_SEQ_64 or ceiling > sa.seq_ceiling:
            sa.seq_ceiling = ceiling
        if sa.seq_ceiling >= sa.seq_limit:
            sa.seq_low_water = MAX_SEQ_64  # the last block: the counter's own limit follows
        else:
            sa.seq_low_water = max(sa.seq_ceiling - self.block // 2, sa.seq + 1)
        sa.seq_reserve_pending = False

    @staticmethod
    def failed(sa: SecurityAssociation) -> None:
        """The write did not reach stable storage: ask again on the next packet."""
        sa.seq_reserve_pending = False

    @staticmethod
    def headroom(sa: SecurityAssociation) -> int:
        """Numbers ``sa`` may still send before it needs another block."""
        return max(0, sa.seq_ceiling - sa.seq)


def fingerprint(salt: bytes, sa: SecurityAssociation) -> str:
    """A keyed fingerprint of ``sa``'s keys (HMAC-SHA256 under ``salt``, 128 bits in hex):
    the identity under which its sequence numbers must never repeat. Never the keys."""
    # Each part length-prefixed (two octets). A bulk transfer records thousands of SAs at
    # once: the HMAC keyed with the salt and fed the label is made once per salt and copied.
    keyed = _KEYED.get(salt)
    if keyed is None:
        keyed = hmac.new(salt, _FP_LABEL, "sha256")
        if len(_KEYED) >= 16:
            _KEYED.clear()
        _KEYED[salt] = keyed
    mac = keyed.copy()
    ek, ik = sa.enc_key, sa.integ_key
    mac.update(b"".join((len(ek).to_bytes(2, "big"), ek, len(ik).to_bytes(2, "big"), ik)))
    return mac.digest()[:16].hex()


_FP_LABEL = len(b"ipsecct outbound SA keys").to_bytes(2, "big") + b"ipsecct outbound SA keys"
_KEYED: dict[bytes, hmac.HMAC] = {}  # salt -> HMAC-SHA256 keyed with it, the label fed

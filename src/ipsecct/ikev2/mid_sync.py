"""RFC 6311 (protocol support for high availability of IKEv2/IPsec): the notifies that resynchronise
message IDs and ESP replay counters after a fail-over.

A cluster member that took over an IKE SA from a replica may not know the last message IDs
its predecessor used. With a peer that announced IKEV2_MESSAGE_ID_SYNC_SUPPORTED in IKE_AUTH it
sends, in an INFORMATIONAL request with message ID 0, an IKEV2_MESSAGE_ID_SYNC notify:

    Nonce Data (4 octets) | EXPECTED_SEND_REQ_MESSAGE_ID (4) | EXPECTED_RECV_REQ_MESSAGE_ID (4)

(M1: the next request ID the member will send; P1: the next request ID it expects from the
peer). The peer answers, also with message ID 0, with the nonce and P2 >= P1 (its next request
ID), M2 >= M1 (the next request ID it expects), and drops a request whose M1 is below what it
already expects (strongSwan: ``ike_mid_sync.c``; it answers only as the IKE SA's peer, never
starts the exchange). IPSEC_REPLAY_COUNTER_SYNC, sent only to peers that announced
IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED, asks the peer to advance the outbound ESP sequence numbers
of the IKE SA's CHILD SAs (our inbound) by a delta, 8 octets here.

Sans-I/O codec only; :mod:`ipsecct.ikev2.engine` runs the exchange.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import IkeParseError
from .message import Notify, NotifyPayload, Payload

_MID = struct.Struct("!4sII")
SYNC_NOTIFIES = (Notify.IKEV2_MESSAGE_ID_SYNC, Notify.IPSEC_REPLAY_COUNTER_SYNC)


@dataclass(frozen=True)
class MidSync:
    """IKEV2_MESSAGE_ID_SYNC: ``send`` = EXPECTED_SEND_REQ_MESSAGE_ID (the sender's next
    request), ``recv`` = EXPECTED_RECV_REQ_MESSAGE_ID (the next request it expects)."""

    nonce: bytes
    send: int
    recv: int

    def payload(self) -> NotifyPayload:
        if len(self.nonce) != 4:
            raise ValueError("the RFC 6311 nonce has 4 octets")
        return NotifyPayload(Notify.IKEV2_MESSAGE_ID_SYNC,
                             data=_MID.pack(self.nonce, self.send, self.recv))  # fmt: skip

    @classmethod
    def parse(cls, n: NotifyPayload) -> MidSync:
        if n.type != Notify.IKEV2_MESSAGE_ID_SYNC or n.protocol != 0 or n.spi:
            raise IkeParseError("not an IKEV2_MESSAGE_ID_SYNC notify")
        if len(n.data) != _MID.size:
            raise IkeParseError("IKEV2_MESSAGE_ID_SYNC notify of the wrong length")
        nonce, send, recv = _MID.unpack(n.data)
        return cls(nonce, send, recv)


@dataclass(frozen=True)
class ReplayCounterSync:
    """IPSEC_REPLAY_COUNTER_SYNC: the peer should advance its outbound ESP sequence numbers
    on the IKE SA's CHILD SAs by ``delta``."""

    delta: int

    def payload(self) -> NotifyPayload:
        return NotifyPayload(Notify.IPSEC_REPLAY_COUNTER_SYNC, data=struct.pack("!Q", self.delta))

    @classmethod
    def parse(cls, n: NotifyPayload) -> ReplayCounterSync:
        if n.type != Notify.IPSEC_REPLAY_COUNTER_SYNC or n.protocol != 0 or n.spi:
            raise IkeParseError("not an IPSEC_REPLAY_COUNTER_SYNC notify")
        if len(n.data) == 8:
            return cls(struct.unpack("!Q", n.data)[0])
        if len(n.data) == 4:
            return cls(struct.unpack("!I", n.data)[0])
        raise IkeParseError("IPSEC_REPLAY_COUNTER_SYNC notify of the wrong length")


def sync_request(inner: list[Payload]) -> tuple[MidSync, ReplayCounterSync | None] | None:
    """The RFC 6311 notifies of a message ID 0 INFORMATIONAL that holds nothing else (as
    strongSwan requires), or None when it is not such a message. Raises IkeParseError when a
    sync notify is malformed."""
    if not inner or not all(isinstance(p, NotifyPayload) and p.type in SYNC_NOTIFIES
                            for p in inner):  # fmt: skip
        return None
    mids = [p for p in inner if isinstance(p, NotifyPayload)
            and p.type == Notify.IKEV2_MESSAGE_ID_SYNC]  # fmt: skip
    reps = [p for p in inner if isinstance(p, NotifyPayload)
            and p.type == Notify.IPSEC_REPLAY_COUNTER_SYNC]  # fmt: skip
    if len(mids) != 1 or len(reps) > 1:
        raise IkeParseError("one IKEV2_MESSAGE_ID_SYNC (and at most one replay counter) expected")
    return MidSync.parse(mids[0]), ReplayCounterSync.parse(reps[0]) if reps else None

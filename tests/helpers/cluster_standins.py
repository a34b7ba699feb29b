"""Stand-ins for what a ClusterDriver is attached to in tests that run it in the loop alone:
the peers' channels (nothing answers; what would have gone to whom is recorded) and the
transfer service (its listener list only)."""

from __future__ import annotations


class Channels:
    """What would go to the peers over TLS: the peer of each message, in order."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, peer: str, msg: object) -> None:
        self.sent.append(peer)

    def room(self, peer: str) -> int:  # (what the replication may send at once)
        return 1 << 30


class Transfer:
    """The transfer service as the driver sees it: the listeners it adds itself to."""

    def __init__(self) -> None:
        self.listeners: list[object] = []

"""Typed errors raised by ipsecct's libraries.

Everything that comes from the network or a file is untrusted: malformed input raises one of
these, with a message that names what is wrong and never contains key material.
"""

from __future__ import annotations


class IpsecctError(Exception):
    """Base class of every error ipsecct raises on purpose."""


class AlgorithmError(IpsecctError):
    """An unknown algorithm, or a key whose length does not fit the algorithm."""


class SAError(IpsecctError):
    """An SA or SP entry that is inconsistent, or a database operation that conflicts."""


class SPICollisionError(SAError):
    """An inbound SA with the same (destination, protocol, SPI) already exists."""


class ContextError(IpsecctError):
    """A feature-context Context Data Block (CDB) or its JSON form is malformed."""


class KeyFileError(IpsecctError):
    """A Wireshark ``esp_sa`` key file line is malformed."""


class PcapError(IpsecctError):
    """A pcap file is malformed or of an unsupported link type."""


class PacketError(IpsecctError):
    """An IP packet is malformed (used inside the data path, never raised out of it)."""


class ConfigError(IpsecctError):
    """A configuration file is invalid."""


class IdentityError(ConfigError):
    """An IKE identity's text (swanctl.conf syntax) names a form this gateway cannot honour;
    the message says what to write instead."""


# -- IPsec core (ipsec/) ---------------------------------------------------------------------

class SignalError(IpsecctError):
    """A signal payload is malformed."""


class TunnelStateError(SAError):
    """A tunnel state change the transfer protocol does not allow (a bug, not bad input)."""


# -- context transfer (ct/) -------------------------------------------------------------------

class CxtpError(IpsecctError):
    """A CXTP message or an extension CDB is malformed, or cannot be encoded."""


class EpochExhaustedError(IpsecctError):
    """A fail-over take-over (or ``failover alone``) would begin the last epoch the wire's
    32 bits carry (ct.failover.LAST_EPOCH), which no gateway takes: refused."""


class TransferError(IpsecctError):
    """A transfer cannot start (unknown SPI, busy, unknown peer)."""


class TransferStateError(IpsecctError):
    """A transfer state change the protocol does not allow (a bug, not bad input)."""


# -- tools, gateway, command line -------------------------------------------------------------

class PkiError(IpsecctError):
    """A certificate or key file that cannot be read, or a PKI request that cannot be met."""


class ChannelError(IpsecctError):
    """The TLS channel to a peer failed: handshake, authentication, I/O or a closed peer."""


class ChannelTimeout(ChannelError):
    """A wait on the channel took longer than its timeout."""


class ChannelClosed(ChannelError):
    """The peer closed the connection (or it was reset)."""


class ControlError(IpsecctError):
    """A control request failed (the message is shown to the operator)."""


class TunError(IpsecctError):
    """A TUN device could not be opened or configured."""


class VipError(IpsecctError):
    """The virtual address could not be claimed or released."""


class BenchError(IpsecctError):
    """A benchmark could not be run to the end (a process did not start, a transfer failed)."""


class UsageError(IpsecctError):
    """Command-line usage that argparse could not catch."""


class DemoError(IpsecctError):
    """``ipsecct demo`` could not run its scenario (e.g. its IKE SA was not established in
    time): the message says what did not happen."""


# -- gateway state and cluster (gateway/) -----------------------------------------------------

class EtcdError(IpsecctError):
    """etcd could not be reached or answered something unusable."""


class StateError(IpsecctError):
    """The state cannot be used (damaged, missing, in use, refused): the message says why and
    what the operator can do."""


# -- IKEv2 (ikev2/) ---------------------------------------------------------------------------

class AuthError(IpsecctError):
    """A certificate, chain, identity or signature that does not verify."""


class IkeParseError(IpsecctError):
    """An IKEv2 message that does not follow RFC 7296's layout."""


class IkeProtocolError(IpsecctError):
    """A well-formed IKEv2 message that breaks the protocol or local policy; ``notify`` is the
    error type to answer with (0: answer nothing), ``data`` its notification data."""

    def __init__(self, message: str, notify: int = 0, data: bytes = b"") -> None:
        super().__init__(message)
        self.notify = notify
        self.data = data


class IkeContextError(IpsecctError):
    """An IKE SA context CDB that is malformed or does not fit this gateway."""


class IntegrityError(IkeParseError):
    """The Encrypted payload's ICV did not verify (or its padding is wrong)."""


# -- context transfer: ownership journal (ct/) ------------------------------------------------

class JournalError(IpsecctError):
    """A change of ownership could not be made durable: the caller must not go ahead."""

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

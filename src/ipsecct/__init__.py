"""ipsecct: IPsec context transfer between security gateways.

The packages' cores (ESP/AH processing, anti-replay, the SA and SP databases, the feature
context codec) are sans-I/O: bytes and ``now`` in, bytes and events out.
"""

__version__ = "0.1.0"

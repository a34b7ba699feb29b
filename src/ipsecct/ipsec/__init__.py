"""The IPsec core (RFC 4301, 4303, 4302): SAD, SPD, ESP, AH, anti-replay, transforms, packet
processing and the per-node engine. Sans-I/O: no sockets, no clocks; ``now`` is passed in."""

"""Context transfer: CXTP (RFC 4067) messages, the IPsec feature context (its field mapping,
binary and JSON forms), the transfer protocol core and fail-over replication. Sans-I/O; it
builds on :mod:`ipsecct.ipsec` and never on the gateway's I/O."""

"""IKEv2 (RFC 7296) as a sans-I/O engine: the message codec, key derivation, proposals,
traffic selectors and the gateway's responder. No sockets, clocks or asyncio here: the
gateway's thin adapter (:mod:`ipsecct.gateway.ike`) feeds it datagrams and the time."""

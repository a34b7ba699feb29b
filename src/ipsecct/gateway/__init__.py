"""The gateway and mobile-node processes: asyncio adapters (UDP and TUN endpoints, TLS peer
channels, control socket, virtual addresses) that drive the sans-I/O cores of
:mod:`ipsecct.ct` and :mod:`ipsecct.ipsec`."""

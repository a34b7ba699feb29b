"""``ipsecct demo``: a mobile node, two gateways and a host in one process on loopback."""

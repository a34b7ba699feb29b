"""Shared test helpers: the one place tests import common code from (never from another test
file, never from conftest).

- :mod:`.sas`: SA pairs and the ESP transform list
- :mod:`.transfer`: the sans-I/O world of gateways and an MN for the transfer core
- :mod:`.daemon`: ``ipsecct gateway/node run`` as subprocesses on loopback
- :mod:`.deployment`: the examples/ deployments as processes
- :mod:`.transfer_processes`: the examples/transfer deployment (two gateways, one node)
- :mod:`.transfer_policy`: contexts a rogue peer makes up
- :mod:`.handover`: the in-process handover demo, its services and stream
- :mod:`.contexts`: sample SAs, malformed CDBs and Hypothesis strategies for contexts
- :mod:`.native`: two engines joined by one tunnel on one data path, inner packets
- :mod:`.netns`, :mod:`.netns_topology`: network namespaces (root)
- :mod:`.strongswan`: strongSwan peers in namespaces (root)
- :mod:`.config_files`: a valid gateway configuration to vary
- :mod:`.etcd_server`: a real etcd (one member or three)
- :mod:`.waiting`: waits on a condition (never a fixed sleep)
- :mod:`.require_all`: the pytest plugin that fails skips under IPSECCT_REQUIRE_ALL=1
"""

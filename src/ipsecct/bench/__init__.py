"""Benchmarks behind ``ipsecct bench``: one module a benchmark (``codec``, ...).

Each module offers ``add_parser(sub)`` to add its ``ipsecct bench NAME`` subcommand; the list of
modules is :data:`ipsecct.commands.bench.BENCHES`. Benchmarks are I/O adapters: they may read the
clock, the cores they measure do not.
"""

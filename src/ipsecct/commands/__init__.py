"""Subcommands of the ``ipsecct`` command line, one module per group."""

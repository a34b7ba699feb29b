"""Shared fixtures for ipsecct's tests (shared code is in :mod:`tests.helpers`)."""

from __future__ import annotations

import signal

import pytest

from ipsecct.ipsec.sad import SecurityAssociation
from tests.helpers.sas import sa_pair

# A suite started in the background by a non-interactive shell ("cmd &") inherits SIGINT
# ignored, and every process a test starts inherits that: the demo's Ctrl-C test, and the
# helpers that stop ping, tshark or tcpdump with SIGINT, then waited for nothing. A handler
# (unlike an ignore) is reset to the default across exec, so the tests' children get Ctrl-C
# as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["pytester", "tests.helpers.require_all"]


@pytest.fixture(autouse=True)
def _state_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test's gateways (in-process or child processes, which inherit the environment)
    keep their durable state in a directory of that test's own, never in /var/lib/ipsecct:
    names such as sg1 recur across tests, and their state (tunnels given away) must not."""
    monkeypatch.setenv("IPSECCT_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def gcm_pair() -> tuple[SecurityAssociation, SecurityAssociation]:
    return sa_pair()

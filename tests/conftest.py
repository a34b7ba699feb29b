"""Shared fixtures for ipsecct's tests (shared code is in :mod:`tests.helpers`)."""

from __future__ import annotations

import pytest

from ipsecct.ipsec.sad import SecurityAssociation
from tests.helpers.sas import sa_pair

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

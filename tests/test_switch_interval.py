"""The GIL switch interval of the processes that run a forwarding thread beside their event
loop: ``ipsecct gateway run`` / ``node run`` and ``ipsecct demo`` (IPSECCT_SWITCH_INTERVAL_US)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest

from ipsecct.gateway import node as node_mod


@pytest.mark.parametrize(
    ("env", "us"),
    [(None, 500), ("250", 250), ("0", 0), ("-3", 0), ("junk", 500), ("10000000", 100_000)],
)
def test_the_switch_interval_knob(
    monkeypatch: pytest.MonkeyPatch, env: str | None, us: int
) -> None:
    if env is None:
        monkeypatch.delenv("IPSECCT_SWITCH_INTERVAL_US", raising=False)
    else:
        monkeypatch.setenv("IPSECCT_SWITCH_INTERVAL_US", env)
    assert node_mod.switch_interval_us() == us
    before = sys.getswitchinterval()
    with node_mod.switch_interval() as inside:
        assert inside == sys.getswitchinterval()
        assert inside == pytest.approx(us / 1e6 if us else before)
    assert sys.getswitchinterval() == before  # restored on the way out


def test_a_gateway_process_runs_its_loop_with_the_switch_interval(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``gateway run`` (service.run) runs its event loop, and so its forwarding thread, with
    the interval; the process's own is back after it."""
    from ipsecct.gateway import service

    monkeypatch.delenv("IPSECCT_SWITCH_INTERVAL_US", raising=False)
    seen: list[float] = []

    class FakeService:
        def __init__(self, cfg: Any, **kw: Any) -> None:
            pass

        async def run_forever(self) -> None:
            seen.append(sys.getswitchinterval())

    cfg = argparse.Namespace(log_level="warning", control_socket=str(tmp_path / "c.sock"))
    monkeypatch.setattr("ipsecct.gateway.config.load", lambda path: cfg)
    monkeypatch.setattr(service, "Service", FakeService)
    monkeypatch.setattr("ipsecct.gateway.gcpolicy.POLICY.enabled", False)
    before = sys.getswitchinterval()
    assert service.run("x.toml", "gateway") == 0
    assert seen == [pytest.approx(0.0005)]
    assert sys.getswitchinterval() == before


def test_the_demo_runs_with_the_switch_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ipsecct demo`` (its process holds the MN's forwarding thread) runs with it too."""
    from ipsecct import cli
    from ipsecct.demo import tour

    monkeypatch.delenv("IPSECCT_SWITCH_INTERVAL_US", raising=False)
    seen: list[float] = []

    async def run(*a: Any, **kw: Any) -> dict[str, Any]:
        seen.append(sys.getswitchinterval())
        return {"packets": {"sent": 1}}

    monkeypatch.setattr(tour, "run", run)
    monkeypatch.setattr("ipsecct.gateway.gcpolicy.POLICY.enabled", False)
    before = sys.getswitchinterval()
    assert cli.main(["demo", "--seconds", "1"]) == 0
    assert seen == [pytest.approx(0.0005)]
    assert sys.getswitchinterval() == before

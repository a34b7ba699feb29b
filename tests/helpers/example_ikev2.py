"""``examples/ikev2`` set up as its README runs it, on free ports in a temporary directory
(``Setup``), for tests/test_example_ikev2 and tests/test_hostile_inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.helpers.deployment import ExampleDeployment, cli
from tests.helpers.waiting import until

ROOT = Path(__file__).resolve().parent.parent.parent
PORTS = (14500, 15000, 15001, 24500, 25000, 25091, 34500, 35000, 35091, 45001)
ADDR = {"mn": "127.0.4.10", "sg1": "127.0.4.1", "sg2": "127.0.4.2", "host": "127.0.4.20"}
INNER = {"sg1": 25000, "sg2": 35000}


class Setup(ExampleDeployment):
    def __init__(self, d: Path) -> None:
        super().__init__(
            d,
            ROOT / "examples" / "ikev2",
            udp_ports=tuple(p for p in PORTS if p not in (25091, 35091)),
            tcp_ports=(25091, 35091),
            ctl_prefix="ikev2-",
            host=(ADDR["host"], 45001),
            mn_app=(ADDR["mn"], 15001),
            # the example's 200 ms for a transfer's exchange (RFC 4067's default) is a LAN's
            # figure: two Python processes on a loaded 2-core machine took longer (rolled back)
            edit=lambda text: text.replace('level = "info"', 'level = "debug"').replace(
                "max_transfer_ms = 200", "max_transfer_ms = 5000"
            ),
        )

    def traffic_ok(self, via: str, tag: int, n: int = 20) -> None:
        up = self.exchange(n, tag, True, (ADDR["mn"], self.port[15000]))
        assert up == n, self.log(via)
        down = self.exchange(n, tag + 1, False, (ADDR[via], self.port[INNER[via]]))
        assert down == n, self.log(via)

    def ike(self, name: str) -> list[dict[str, Any]]:
        r = cli("sa", "list", "--ike", "--json", "--config", self.config(name))
        assert r.returncode == 0, r.stderr
        out: list[dict[str, Any]] = json.loads(r.stdout)
        return out

    def wait_ike(self, name: str, pred: Any, what: str, timeout: float = 30) -> dict[str, Any]:
        """The one IKE SA of ``name`` once ``pred`` holds for it (processes on a loaded
        machine: up to ``timeout`` seconds)."""
        seen: list[dict[str, Any]] = []

        def ok() -> bool:
            seen[:] = self.ike(name)
            return len(seen) == 1 and bool(pred(seen[0]))

        try:
            until(ok, what, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {seen}\n{self.log(name)}") from None
        return seen[0]

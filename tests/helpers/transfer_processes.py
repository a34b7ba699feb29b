"""The examples/transfer deployment as processes (two gateways, one node), for the tests
that drive it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.deployment import ExampleDeployment

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "transfer"
PORTS = (14500, 15000, 15001, 24500, 25000, 25091, 34500, 35000, 35091, 45001)
ADDR = {"mn": "127.0.3.10", "sg1": "127.0.3.1", "sg2": "127.0.3.2", "host": "127.0.3.20"}
SPI = "0x20000001"


class Setup(ExampleDeployment):
    def __init__(self, d: Path) -> None:
        super().__init__(
            d,
            EXAMPLE,
            udp_ports=tuple(p for p in PORTS if p not in (25091, 35091)),
            tcp_ports=(25091, 35091),
            ctl_prefix="xfer-",
            host=(ADDR["host"], 45001),
            mn_app=(ADDR["mn"], 15001),
            edit=lambda text: text.replace('level = "info"', 'level = "debug"'),
        )

    def _exchange(self, n: int, tag: int, up: bool, via: str) -> int:
        to = (ADDR["mn"], self.port[15000]) if up else (ADDR[via], self.port[inner_port(via)])
        return self.exchange(n, tag, up, to)

    def traffic_ok(self, via: str, tag: int, n: int = 20) -> None:
        assert self._exchange(n, tag, True, via) == n, self.log(via)
        assert self._exchange(n, tag + 1, False, via) == n, self.log(via)


def inner_port(gw: str) -> int:
    return 25000 if gw == "sg1" else 35000

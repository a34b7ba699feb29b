"""``ipsecct bench NAME``: the benchmarks.

Extension point: :data:`BENCHES` maps each ``ipsecct bench`` subcommand to the module that
implements it. Such a module defines ``add_parser(sub)``, which adds its subcommand to the
``bench`` subparsers and sets ``handler`` (``args -> exit status``) as a default. To add
``ipsecct bench gateway``, write ``ipsecct/bench/gateway.py`` with ``add_parser`` and add
``"gateway": "ipsecct.bench.gateway"`` here.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..errors import BenchError, IpsecctError

BENCHES: dict[str, str] = {
    "codec": "ipsecct.bench.codec",
    "transfer": "ipsecct.bench.transfer",
    "gateway": "ipsecct.bench.gateway",
    "failover": "ipsecct.bench.failover",
    "tunnel": "ipsecct.bench.tunnel",
    "ikev2": "ipsecct.bench.ikev2",
}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench", help="measure ipsecct's speed", description="Benchmarks of ipsecct."
    )
    benches = p.add_subparsers(dest="bench", metavar="BENCH")
    benches.required = True
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        mod.add_parser(benches)
        if name not in benches.choices:
            raise RuntimeError(f"{module}.add_parser did not add 'bench {name}'")
        sp = benches.choices[name]
        sp.set_defaults(handler=_one_line(name, sp.get_default("handler")))


def _one_line(name: str, handler: Callable[[argparse.Namespace], int]) -> Any:
    """A benchmark that fails says so in one line and exits 1 (the operation failed); a usage
    or configuration error stays the command line's (one line, exit 2). Never a traceback."""

    def run(args: argparse.Namespace) -> int:
        # SIGTERM (a service manager, `timeout`) ends a benchmark as Ctrl-C does: through its
        # clean-up (the root ones' network namespaces, veth pairs and daemons), status 143.
        # Python's default for it ended the process at once and left all of them behind.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminated)
        try:
            return handler(args)
        except BenchError as exc:
            print(f"ipsecct: error: bench {name}: {_line(str(exc))}", file=sys.stderr)
            return 1
        except (IpsecctError, OSError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug or an environment problem: still one line
            what = f"{type(exc).__name__}: {_line(str(exc))}"
            print(f"ipsecct: error: bench {name}: {what}", file=sys.stderr)
            return 1

    return run


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # (not an Exception: run's catch-all lets it through)


def _line(text: str) -> str:
    return " | ".join(x.strip() for x in text.splitlines() if x.strip())

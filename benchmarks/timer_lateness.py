"""How late this machine wakes a process that sleeps to 1 ms deadlines: the floor under the
demo's stream pauses (`gap_ms`), measured with nothing of ipsecct running. The demo's
sender does the same (SCHED_FIFO 1 where allowed, absolute deadlines); a pause this loop
sees is the machine's (a VM's vCPU not scheduled, an interrupt storm), not the gateways'.

    .venv/bin/python -m benchmarks.timer_lateness [SECONDS] [--json]

Prints the longest lateness, its 99.9th and 99th percentiles and median, and how many
deadlines were missed by more than 2 ms.
"""

from __future__ import annotations

import json
import os
import sys
import time


def measure(seconds: float, period_ns: int = 1_000_000) -> dict[str, float | int | bool]:
    """Sleep to ``seconds / period`` absolute deadlines; the lateness of each wake-up."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        fifo = True
    except (OSError, AttributeError):
        fifo = False
    n = max(1, int(seconds * 1e9 / period_ns))
    late: list[int] = []
    start = time.monotonic_ns()
    for i in range(n):
        deadline = start + i * period_ns
        while (now := time.monotonic_ns()) < deadline:
            time.sleep((deadline - now) / 1e9)
        late.append(time.monotonic_ns() - deadline)
    late.sort()
    return {"deadlines": n, "fifo": fifo, "max_ms": late[-1] / 1e6,
            "p999_ms": late[int(n * 0.999)] / 1e6, "p99_ms": late[int(n * 0.99)] / 1e6,
            "median_ms": late[n // 2] / 1e6, "over_2ms": sum(x > 2_000_000 for x in late)}


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--json"]
    try:
        seconds = float(args[0]) if args else 10.0
    except ValueError:
        print(f"timer_lateness: not a number of seconds: {args[0]!r}", file=sys.stderr)
        return 2
    r = measure(seconds)
    if "--json" in argv:
        print(json.dumps(r))
    else:
        print("{deadlines} deadlines (SCHED_FIFO: {fifo}): late by at most {max_ms:.3f} ms, "
              "99.9% {p999_ms:.3f}, 99% {p99_ms:.3f}, median {median_ms:.3f}; "
              "{over_2ms} over 2 ms".format(**r))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

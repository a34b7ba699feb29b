"""What the IKE adapter's check before a COMMIT costs (``IkeService.commit_check``,
docs/ikev2.md "An IKE SA that cannot follow"): one transfer of one tunnel whose IKE SA
follows it, the IKE SA's context encoded and dropped. A transfer asks twice (its start, its
COMMIT); a handover's trigger pays it once. ``time.thread_time``, median of 7 runs of
``--calls`` checks each.

    .venv/bin/python -m benchmarks.ike_commit_check [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.helpers.ike_services import unit_at_sg1
from tests.helpers.transfer import World


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    n = ap.parse_args().calls
    w = World()
    with tempfile.TemporaryDirectory() as tmp:
        svc, _ = unit_at_sg1(Path(tmp), w)
        runs = []
        for _ in range(7):
            t0 = time.thread_time()
            for _ in range(n):
                if svc.commit_check([w.tunnel]) is not None:
                    raise SystemExit("the check refused")
            runs.append((time.thread_time() - t0) / n * 1e6)
    print(f"commit_check, 1 tunnel, 1 IKE SA: median {statistics.median(runs):.1f} us"
          f" (runs {', '.join(f'{r:.1f}' for r in runs)})")  # fmt: skip


if __name__ == "__main__":
    main()

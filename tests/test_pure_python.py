"""The pure-Python path is the reference and the fallback (issue 11: "the package installs
and works without a compiler"), yet the suite runs with the C extensions built. This file
runs the unit files of the data path, of transfers and of fail-over once more under
``IPSECCT_PURE_PYTHON=1``, in a pytest of their own (the variable is read at import), so
that a regression of the Python path there fails CI. The tests of what C does skip there,
saying so; any other skip fails (``IPSECCT_REQUIRE_ALL=1``, tests/helpers/require_all.py).

The whole suite under ``IPSECCT_PURE_PYTHON=1`` is for a person to run now and then (README,
"Interoperability and tests"); this is its cheap part (about a minute, on one of CI's
workers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# where the Python path's results matter most, and cheaply: packets, SAs, anti-replay and
# sequence numbers, contexts, transfers, fail-over
FILES = [
    "tests/test_esp_basic.py",
    "tests/test_engine.py",
    "tests/test_sad.py",
    "tests/test_replay.py",
    "tests/test_sequence.py",
    "tests/test_vectors.py",
    "tests/test_udpencap.py",
    "tests/test_context.py",
    "tests/test_transfer_core.py",
    "tests/test_transfer_prepared.py",
    "tests/test_make_before_break.py",
    "tests/test_failover.py",
    "tests/test_failover_transfer.py",
    "tests/test_lease.py",
]


def test_the_data_path_transfer_and_failover_files_pass_on_the_python_path() -> None:
    env = dict(os.environ, IPSECCT_PURE_PYTHON="1", IPSECCT_REQUIRE_ALL="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-rs", *FILES],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1], r.stdout[-2000:]
    # the tests of C skip, saying why; none of the files was left out whole
    skips = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert all("IPSECCT_PURE_PYTHON" in ln for ln in skips), skips
    for f in FILES:
        assert (ROOT / f).exists(), f

"""The C context reader and writer (ipsecct.ct._cdb) under AddressSanitizer.

Builds src/ipsecct/ct/_cdb.c with -fsanitize=address (and -Wall -Werror, as setup.py does) and
runs tests/cdb_fuzz.py against it: the reader takes a peer's octets, so every truncation, bit
flip, lying length and random body must neither read out of bounds nor disagree with the
Python reader; the writer gets SAs with fields it must refuse. Any memory error makes ASan
abort the process. CI has gcc and libasan (scripts/install): a failed build is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "ipsecct" / "ct" / "_cdb.c"


@pytest.mark.slow
def test_context_reader_and_writer_under_address_sanitizer(tmp_path: Path) -> None:
    so = tmp_path / ("_cdb" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    cmd = [
        "gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
        "-fsanitize=address", "-Wall", "-Wextra", "-Wno-unused-parameter",
        "-Wno-missing-field-initializers", "-Werror",
        f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(so),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    libasan = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.exists(libasan), "libasan is missing (Debian: libasan8, with gcc)"
    env = dict(
        os.environ,
        LD_PRELOAD=libasan,
        # CPython's own allocations are not ours to judge; every memory error still aborts.
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        PYTHONMALLOC="malloc",
        IPSECCT_PURE_PYTHON="1",  # only this build of the extension is loaded
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cdb_fuzz.py"), str(so), "3000"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert "AddressSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0, r.stderr[-4000:]
    assert "fuzz-ok" in r.stdout

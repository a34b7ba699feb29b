"""The C context reader and writer (ipsecct.ct._cdb) under AddressSanitizer.

Builds src/ipsecct/ct/_cdb.c with -fsanitize=address (and -Wall -Werror, as setup.py does) and
runs tests/cdb_fuzz.py against it: the reader takes a peer's octets, so every truncation, bit
flip, lying length and random body must neither read out of bounds nor disagree with the
Python reader; the writer gets SAs with fields it must refuse. Any memory error makes ASan
abort the process. CI has gcc and libasan (scripts/install): a failed build is a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import asan

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "ipsecct" / "ct" / "_cdb.c"


@pytest.mark.slow
def test_context_reader_and_writer_under_address_sanitizer(tmp_path: Path) -> None:
    so = asan.build(SOURCE, "_cdb", tmp_path)
    # only this build of the extension is loaded
    asan.run_fuzz(ROOT / "tests" / "cdb_fuzz.py", so, 3000, timeout=600,
                  env={"IPSECCT_PURE_PYTHON": "1"})  # fmt: skip

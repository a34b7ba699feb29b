"""The IKE SA context's C scanner (ipsecct.ikev2._tlv) under AddressSanitizer.

Builds src/ipsecct/ikev2/_tlv.c with -fsanitize=address (and -Wall -Werror, as setup.py does)
and runs tests/tlv_fuzz.py against it: the scanner takes a peer gateway's octets, so every
truncation, bit flip, lying length and random body must neither read out of bounds nor
disagree with the Python scanner. Any memory error makes ASan abort the process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import asan

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "ipsecct" / "ikev2" / "_tlv.c"


@pytest.mark.slow
def test_ike_context_scanner_under_address_sanitizer(tmp_path: Path) -> None:
    so = asan.build(SOURCE, "_tlv", tmp_path)
    asan.run_fuzz(ROOT / "tests" / "tlv_fuzz.py", so, 3000, timeout=600,
                  env={"IPSECCT_PURE_PYTHON": "1"})  # fmt: skip

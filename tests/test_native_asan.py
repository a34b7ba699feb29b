"""The native data path's C code under AddressSanitizer, and the build without a compiler
(issue 11).

Builds ipsecct/ipsec/_esp.c with -fsanitize=address (and -Wall -Werror, as setup.py does) in
a temporary directory and runs the fuzz corpus of tests/native_fuzz.py through it in a Python
process with libasan preloaded. Any out-of-bounds read or write, use after free or double free
makes ASan abort the process. CI has gcc and the headers (scripts/install): a failed build is a
failure here, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import asan

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "ipsecct" / "ipsec" / "_esp.c"


@pytest.mark.slow
def test_parsers_under_address_sanitizer(tmp_path: Path) -> None:
    so = asan.build(SOURCE, "_esp", tmp_path, ("-lcrypto",))
    asan.run_fuzz(ROOT / "tests" / "native_fuzz.py", so, 4000, timeout=300)


def test_setup_without_a_compiler_falls_back_to_python(tmp_path: Path) -> None:
    """The extension is optional: with a compiler that fails, building succeeds with a
    warning and no extension, and ipsecct runs on its Python path."""
    env = dict(os.environ, CC="/bin/false")
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "native data path was not built" in r.stdout + r.stderr
    assert not list(tmp_path.rglob("_esp*.so"))
    code = (
        "from ipsecct.ipsec import native; from ipsecct.ipsec.engine import Engine;"
        "assert not native.AVAILABLE and Engine().native is None; print('python-path')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, IPSECCT_PURE_PYTHON="1"),
    )
    assert r.returncode == 0 and "python-path" in r.stdout, r.stderr

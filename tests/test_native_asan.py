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
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "ipsecct" / "ipsec" / "_esp.c"


def _build(tmp: Path) -> Path:
    so = tmp / ("_esp" + str(sysconfig.get_config_var("EXT_SUFFIX")))
    cmd = [
        "gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
        "-fsanitize=address", "-Wall", "-Wextra", "-Wno-unused-parameter",
        "-Wno-missing-field-initializers", "-Werror",
        f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(so), "-lcrypto",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return so


@pytest.mark.slow
def test_parsers_under_address_sanitizer(tmp_path: Path) -> None:
    so = _build(tmp_path)
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
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "native_fuzz.py"), str(so), "4000"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert "AddressSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0, r.stderr[-4000:]
    assert "fuzz-ok" in r.stdout


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

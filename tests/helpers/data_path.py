"""Which data path engines use: the native one (C) or the pure-Python one."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA_PATHS = ("native", "python")

PURE = os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0")
# a test (or a case) of what C does: under IPSECCT_PURE_PYTHON=1 there is no C side to test
native_only = pytest.mark.skipif(PURE, reason="IPSECCT_PURE_PYTHON forces the Python path")


@contextlib.contextmanager
def data_path(name: str) -> Iterator[None]:
    """Engines made inside use the native data path ("native") or the pure-Python one."""
    from ipsecct.ipsec import native

    if name == "native":
        if PURE:
            pytest.skip("IPSECCT_PURE_PYTHON forces the Python path")
        assert native.AVAILABLE, "the native data path is not built (scripts/install builds it)"
    saved = native.AVAILABLE
    native.AVAILABLE = name == "native"
    try:
        yield
    finally:
        native.AVAILABLE = saved


def without_extensions(dst: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the package in ``dst`` without its C extensions (``_esp``, ``_cdb``,
    ``_tlv``: what an install without a compiler has), first on the PYTHONPATH of every
    process started from now on, and IPSECCT_PURE_PYTHON unset: the Python paths run because
    the extensions cannot be imported. Returns the copy's package directory."""
    src = Path(__file__).resolve().parent.parent.parent / "src" / "ipsecct"
    pkg = dst / "ipsecct"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    assert not list(pkg.rglob("*.so"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(dst), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("IPSECCT_PURE_PYTHON", raising=False)
    code = (
        "import ipsecct, sys; from ipsecct.ipsec import native; from ipsecct.ct import context"
        " as c; from ipsecct.ikev2 import context as k;"
        "print(ipsecct.__file__, native.AVAILABLE, c.NATIVE_READER, k.NATIVE_SCAN)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(pkg / "__init__.py"), "False", "False", "False"], r.stdout
    return pkg

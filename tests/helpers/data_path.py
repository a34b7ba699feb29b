"""Which data path engines use: the native one (C) or the pure-Python one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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

"""A C extension of ipsecct built with AddressSanitizer, and a fuzz script run against it in a
Python process with libasan preloaded (test_native_asan.py, test_cdb_asan.py). Any
out-of-bounds access, use after free or double free makes ASan abort that process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def build(source: Path, module: str, tmp: Path, libs: tuple[str, ...] = ()) -> Path:
    """``source`` compiled as the extension ``module`` (its last name) into ``tmp``, with
    -fsanitize=address and the warnings setup.py makes errors of; a failed build fails."""
    so = tmp / (module + str(sysconfig.get_config_var("EXT_SUFFIX")))
    cmd = [
        "gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
        "-fsanitize=address", "-Wall", "-Wextra", "-Wno-unused-parameter",
        "-Wno-missing-field-initializers", "-Werror",
        f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(so), *libs,
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return so


def load(module: str, path: str):  # type: ignore[no-untyped-def]
    """In the fuzz script's process: the extension built by :func:`build` at ``path``, loaded
    as ``module`` (instead of the installed one)."""
    spec = importlib.util.spec_from_file_location(module, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Python process that runs an extension built by :func:`build`:
    libasan preloaded, and every memory error an abort."""
    libasan = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.exists(libasan), "libasan is missing (Debian: libasan8, with gcc)"
    return dict(
        os.environ,
        LD_PRELOAD=libasan,
        # CPython's own allocations are not ours to judge; every memory error still aborts.
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        PYTHONMALLOC="malloc",
        **(env or {}),
    )


def run_fuzz(
    script: Path, so: Path, rounds: int, *, timeout: float, env: dict[str, str] | None = None
) -> None:
    """Run ``script SO ROUNDS`` under ASan; it must finish cleanly and print ``fuzz-ok``."""
    r = subprocess.run(
        [sys.executable, str(script), str(so), str(rounds)],
        capture_output=True, text=True, timeout=timeout, env=environment(env),
    )  # fmt: skip
    assert "AddressSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0, r.stderr[-4000:]
    assert "fuzz-ok" in r.stdout

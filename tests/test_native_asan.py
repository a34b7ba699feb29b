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


CANARY = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

/* octet i of an 8-octet heap block: overflow(8) is one past its end, what ASan catches */
static PyObject *overflow(PyObject *self, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    char *p, c;
    if (i == -1 && PyErr_Occurred())
        return NULL;
    p = calloc(8, 1);
    if (p == NULL)
        return PyErr_NoMemory();
    c = ((volatile char *)p)[i];
    free(p);
    return PyLong_FromLong(c);
}

static PyMethodDef methods[] = {{"overflow", overflow, METH_O, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_canary", NULL, -1, methods};
PyMODINIT_FUNC PyInit__canary(void) { return PyModule_Create(&module); }
"""


@pytest.mark.slow
def test_address_sanitizer_catches_an_out_of_bounds_read_in_this_set_up(tmp_path: Path) -> None:
    """The control for the two ASan tests (this file's, test_cdb_asan.py's): they pass when
    ASan says nothing, which it would also do if the build, the preloaded libasan or the
    loading of the built module (not the installed one) did not work. An extension built
    and run the same way, that reads one octet past a heap block, must be stopped by ASan."""
    src = tmp_path / "_canary.c"
    src.write_text(CANARY)
    so = asan.build(src, "_canary", tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.helpers import asan;"
            "m = asan.load('_canary', sys.argv[2]); assert m.overflow(7) == 0;"
            "print('in bounds', flush=True); m.overflow(8); print('not caught')")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(so)], capture_output=True,
                       text=True, timeout=120, env=asan.environment())  # fmt: skip
    assert "in bounds" in r.stdout, r.stderr[-4000:]  # built, loaded, and ran
    assert "not caught" not in r.stdout, r.stderr[-4000:]
    assert r.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-4000:]
    assert "overflow" in r.stderr  # the report names the function (built with -g)


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

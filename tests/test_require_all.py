"""The plugin that turns skips into failures under IPSECCT_REQUIRE_ALL=1 (tests/require_all.py),
run on a small suite of its own."""

from __future__ import annotations

import pytest

SUITE = """
import pytest

pytestmark = []

def test_passes():
    assert 1 + 1 == 2

@pytest.mark.skipif(True, reason="needs a tool that is missing")
def test_marked_skip():
    pass

def test_skip_call():
    pytest.skip("no IPv6 loopback")

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False
"""
MODULE_SKIP = """
import pytest

pytest.importorskip("a_package_that_is_not_installed_anywhere")

def test_never_runs():
    pass
"""


def run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> pytest.RunResult:
    if value is None:
        monkeypatch.delenv("IPSECCT_REQUIRE_ALL", raising=False)
    else:
        monkeypatch.setenv("IPSECCT_REQUIRE_ALL", value)
    pytester.makepyfile(test_suite=SUITE, test_module_skip=MODULE_SKIP)
    return pytester.runpytest(
        "-p",
        "tests.helpers.require_all",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
    )


def test_outside_ci_skips_stay_skips(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = run(pytester, monkeypatch, None)
    r.assert_outcomes(passed=1, skipped=3, xfailed=1)


def test_zero_means_off(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    r = run(pytester, monkeypatch, "0")
    r.assert_outcomes(passed=1, skipped=3, xfailed=1)


def test_in_ci_every_skip_fails_with_its_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = run(pytester, monkeypatch, "1")
    # a skip mark fails at setup (an error), a pytest.skip() call in the test (a failure)
    r.assert_outcomes(passed=1, failed=1, errors=2, xfailed=1)
    out = r.stdout.str()
    assert "needs a tool that is missing" in out
    assert "no IPv6 loopback" in out
    assert "a_package_that_is_not_installed_anywhere" in out
    assert out.count("skipped under IPSECCT_REQUIRE_ALL=1") >= 3


NATIVE_ONLY = """
import pytest

@pytest.mark.skipif(True, reason="IPSECCT_PURE_PYTHON forces the Python path")
def test_of_what_c_does():
    pass

@pytest.mark.skipif(True, reason="needs a tool that is missing")
def test_marked_skip():
    pass
"""


@pytest.mark.parametrize("pure", ["1", "0"])
def test_a_native_only_skip_is_expected_only_under_pure_python(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pure: str
) -> None:
    """Under IPSECCT_PURE_PYTHON=1 the tests of C skip, saying so; any other skip still
    fails, and the same reason without the variable set is a broken install."""
    monkeypatch.setenv("IPSECCT_REQUIRE_ALL", "1")
    monkeypatch.setenv("IPSECCT_PURE_PYTHON", pure)
    pytester.makepyfile(test_native_only=NATIVE_ONLY)
    r = pytester.runpytest("-p", "tests.helpers.require_all", "-p", "no:cacheprovider")
    if pure == "1":
        r.assert_outcomes(skipped=1, errors=1)
    else:
        r.assert_outcomes(errors=2)
    assert "needs a tool that is missing" in r.stdout.str()

"""A pytest plugin: under ``IPSECCT_REQUIRE_ALL=1`` (``scripts/test``, CI) a skipped test or
test module is a failure.

CI runs as root with every tool and package installed, so a skip there (no root, no tshark, no
strongSwan, no scapy, no IPv6 loopback) means a broken install, not a test that may be left out.
Outside CI the skips stay, with their reason (``-ra`` lists them). Expected failures
(``xfail``) are not skips and are not touched. Under ``IPSECCT_PURE_PYTHON=1`` too, the tests
of what C does skip (their reason names that variable): there is no C side to test.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

VARIABLE = "IPSECCT_REQUIRE_ALL"


def required() -> bool:
    return os.environ.get(VARIABLE, "") not in ("", "0")


def _reason(longrepr: object) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _expected(report: pytest.TestReport | pytest.CollectReport) -> bool:
    """A native-only test under IPSECCT_PURE_PYTHON=1 (tests/helpers/data_path.py)."""
    pure = os.environ.get("IPSECCT_PURE_PYTHON", "") not in ("", "0")
    return pure and "IPSECCT_PURE_PYTHON" in _reason(report.longrepr)


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = _reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under {VARIABLE}=1 (a skip here is a broken install): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if required() and report.skipped and not hasattr(report, "wasxfail") and not _expected(report):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, None]:
    outcome = yield
    report = outcome.get_result()
    if required() and report.skipped and not _expected(report):  # module-level skip, importorskip
        _fail(report)

"""A pytest plugin for GPU visits: each failure's report printed the moment the test ends.

A GPU call that reaches its time limit kills pytest before its summary, and with it every failure's reason
(2026-12-05: two of 78 tests failed, one unnamed). Load it with ``PYTHONPATH=bench pytest -p pytest_instafail``.
"""

from __future__ import annotations

from typing import Any


def pytest_runtest_logreport(report: Any) -> None:
    """Print a failed test's id and the end of its report at once."""
    if report.failed:
        print(f"\nFAILED AT ONCE {report.nodeid} ({report.when})\n{str(report.longrepr)[-4000:]}", flush=True)

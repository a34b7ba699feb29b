"""Waiting on a condition, never a fixed sleep: poll it until it holds, or fail after a
time-out with what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def until(pred: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll ``pred`` every 50 ms until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


async def eventually(pred: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """In a running event loop: let it run until ``pred`` holds (checked every 10 ms);
    AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


def stopped(pid: int) -> bool:
    """Is process ``pid`` stopped (SIGSTOP is delivered asynchronously)? /proc's state T."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"

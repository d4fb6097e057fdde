"""Helpers of the tests that start servers of their own: a free loopback port, and waiting on a condition with a
generous bound (never a fixed sleep)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], T], what: str, bound: float, every: float = 1.0) -> T:
    """The first truthy value of ``condition()``, polled every ``every`` s; AssertionError after ``bound`` s."""
    deadline = time.monotonic() + bound
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound:.0f}s waiting for {what}")
        time.sleep(every)

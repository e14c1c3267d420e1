"""Waiting in tests for something real processes do: poll, and fail saying what was awaited."""
from __future__ import annotations

import time
import typing as tp
from pathlib import Path

T = tp.TypeVar("T")


def wait_for(condition: tp.Callable[[], T], what: str = "the condition", timeout: float = 300.0,
             log: tp.Optional[Path] = None, every: float = 0.05) -> T:
    """Call `condition` every `every` seconds until it returns something truthy; returns that.

    Fails the test after `timeout` seconds, naming `what`, with the tail of `log` (a log
    file, or a folder whose `*.log` files are shown) when given.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not reached within {timeout}s\n{_tail(log)}")


def _tail(log: tp.Optional[Path]) -> str:
    if log is None or not log.exists():
        return ""
    files = sorted(log.glob("*.log")) if log.is_dir() else [log]
    return "".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in files)

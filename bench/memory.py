"""Resident memory of this process and its children (dbt subprocesses), sampled from /proc (no psutil needed)."""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path


def _status_kb(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
            out += kids
            stack += kids
    return out


def rss_mb(pid: int | None = None) -> tuple[float, float]:
    """(this process, its descendants) resident memory in MB right now."""
    pid = pid or os.getpid()
    own = _status_kb(pid, "VmRSS")
    kids = sum(_status_kb(k, "VmRSS") for k in descendants(pid))
    return own / 1024, kids / 1024


def high_water_mb() -> dict[str, float]:
    """Peak RSS of this process (VmHWM) and of its largest finished child (RUSAGE_CHILDREN), MB."""
    return {
        "self_hwm_mb": round(_status_kb(os.getpid(), "VmHWM") / 1024, 1),
        "children_maxrss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


class RssSampler(threading.Thread):
    """Samples (epoch seconds, own MB, children MB) every ``interval`` seconds until ``stop()``."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            own, kids = rss_mb()
            self.samples.append((time.time(), own, kids))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def peak(self, start: float | None = None, end: float | None = None) -> dict[str, float]:
        """Peak own / children / combined MB over the samples in [start, end] (all samples when not given)."""
        lo, hi = start if start is not None else float("-inf"), end if end is not None else float("inf")
        window = [s for s in self.samples if lo <= s[0] <= hi]
        if not window:  # a very short window between two samples: take the nearest sample
            window = sorted(self.samples, key=lambda s: abs(s[0] - lo))[:1]
        if not window:
            return {"peak_rss_mb": 0.0, "peak_self_mb": 0.0, "peak_children_mb": 0.0}
        return {
            "peak_rss_mb": round(max(s[1] + s[2] for s in window), 1),
            "peak_self_mb": round(max(s[1] for s in window), 1),
            "peak_children_mb": round(max(s[2] for s in window), 1),
        }

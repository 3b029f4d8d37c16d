"""Measuring: operations per second over a window shared by many threads, percentiles, and
waiting on a condition."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


class Counter:
    """A thread-safe counter that can be read at the edges of a measurement window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


def run_threads(
    threads: int,
    seconds: float,
    op: Callable[[int], int],
    *,
    setup: Callable[[int], Any] | None = None,
    warmup_s: float = 0.3,
) -> float:
    """Run ``op(index)`` in ``threads`` threads for ``seconds``; operations per second.

    ``op`` returns how many operations it did. Each thread runs ``setup(index)`` first (open
    its connection); only operations finished inside the window after ``warmup_s`` count.
    """
    counter = Counter()
    start = threading.Barrier(threads + 1)
    window: dict[str, float] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(index: int) -> None:
        try:
            if setup is not None:
                setup(index)
            start.wait()
            while not stop.is_set():
                done = op(index)
                if "from" in window and "to" not in window:
                    counter.add(done)
        except BaseException as err:
            errors.append(err)
            stop.set()
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    time.sleep(warmup_s)
    before = counter.value
    window["from"] = time.monotonic()
    time.sleep(seconds)
    window["to"] = time.monotonic()
    after = counter.value
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    if errors:
        raise errors[0]
    return (after - before) / (window["to"] - window["from"])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)

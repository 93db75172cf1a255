"""The host's peak memory over one cycle, measured with :mod:`tracemalloc`.

Issue 15's tests show that what a hostile station sends never exhausts the
host: each measures the host's cycle with :func:`measured` and checks the
peak against a bound it states, with :func:`assert_peak_under` (or both at
once: :func:`cycle_under`).
tracemalloc counts what Python allocates (the database drivers' own C
buffers are not counted), from the moment the cycle starts.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import TypeVar

from mailsync.node import CycleReport, Node

MIB = 1 << 20

T = TypeVar("T")


def measured(cycle: Callable[[], T]) -> tuple[T, int]:
    """What ``cycle()`` returned, and the peak of what it allocated (bytes)."""
    tracemalloc.start()
    try:
        result = cycle()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def assert_peak_under(peak: int, bound: int) -> None:
    assert peak < bound, f"the host's cycle peaked at {peak / MIB:.1f} MiB, over {bound / MIB} MiB"


def cycle_under(node: Node, bound: int) -> CycleReport:
    """One cycle of ``node`` (the host), its peak memory asserted under ``bound``."""
    report, peak = measured(node.sync)
    assert_peak_under(peak, bound)
    return report

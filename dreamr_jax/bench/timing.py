"""Timing a call: the best, median or mean of N timed calls after warm-up, the XLA compilations
made during the timed calls, and how much CPU other processes used meanwhile.

Every timed call is blocked on (`jax.block_until_ready` of its result; anything that is not a
jax array passes through), so an asynchronous dispatch is never timed as finished work.
"""

from __future__ import annotations

import dataclasses
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each timed call, and the XLA compilations made while they ran (a compile in a
    timed call means the warm-up missed a shape: the figure then prices the compiler too)."""

    times: tuple[float, ...]
    compiles: int = 0

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return float(statistics.median(self.times))

    @property
    def mean(self) -> float:
        return float(statistics.fmean(self.times))


def time_calls(fn, repeats: int = 5, *, warmup: int = 1, min_s: float = 0.0, max_calls: int = 50) -> Timing:
    """`fn()` called `warmup` times untimed, then timed `repeats` times; while the timed calls
    together took less than `min_s`, more are made, up to `max_calls` (short calls get enough
    samples for their best to be near the true one)."""
    import jax

    from .. import compiles

    for _ in range(warmup):
        jax.block_until_ready(fn())
    before = compiles.totals()[0]
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_s and len(times) < max_calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times), compiles.totals()[0] - before)


def best_of(fn, repeats: int = 5, **kw) -> float:
    """The shortest of `repeats` timed calls after one warm-up (`time_calls`): on a machine
    others share, the least disturbed call is the closest to what the code costs."""
    return time_calls(fn, repeats, **kw).best


def median_of(fn, repeats: int = 5, *, warmup: int = 2, allow_compiles: bool = False) -> float:
    """The median of `repeats` timed calls after `warmup` untimed ones; raises if a timed call
    compiled (unless `allow_compiles`): a compilation would be timed as the call's cost."""
    t = time_calls(fn, repeats, warmup=warmup)
    if t.compiles and not allow_compiles:
        raise AssertionError(f"a timed call compiled ({t.compiles} XLA compilations)")
    return t.median


class CpuShare:
    """How much CPU other processes used while a block ran (the machine may be shared).

    Busy jiffies of the whole machine (/proc/stat) minus this process's (/proc/self/stat), as a
    fraction of all CPU time in the interval: `other` after the block. Linux only; None elsewhere."""

    def __init__(self):
        self.other = None

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        total = sum(v[:8])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        mine = int(fields[11]) + int(fields[12])  # utime + stime
        return total, total - idle, mine

    def __enter__(self):
        try:
            self._start = self._read()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return False
        try:
            t1, b1, m1 = self._read()
        except (OSError, ValueError, IndexError):
            return False
        t0, b0, m0 = self._start
        if t1 > t0:
            self.other = max(0.0, ((b1 - b0) - (m1 - m0)) / (t1 - t0))
        return False


def wait_quiet(max_s: float, window: float = 1.0, busy_below: float = 0.1) -> float | None:
    """Wait (up to `max_s`) until other processes leave the CPUs idle for two consecutive windows.

    Returns the seconds waited, or None when it gave up (the measurement then goes ahead anyway,
    and `CpuShare` figures around each sample show how much the machine was shared)."""
    if max_s <= 0:
        return 0.0
    t0 = time.perf_counter()
    calm = 0
    while time.perf_counter() - t0 < max_s:
        with CpuShare() as share:
            time.sleep(window)
        if share.other is None:
            return 0.0
        calm = calm + 1 if share.other < busy_below else 0
        if calm >= 2:
            return time.perf_counter() - t0
    return None

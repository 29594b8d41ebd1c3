"""Timeline projection: replay a trace's recorded device calls as if each role had its own
hardware and nothing contended, keeping every ordering the run showed between the roles.

Each call starts when its role's previous call ends and when every call of the other role
that had ended before it started in the real run has ended (a conservative happens-before:
it keeps all true dependencies and possibly some accidental ones, so the projection is never
optimistic about the schedule). Durations are the recorded ones by default; `duration` prices
each call another way (`dreamr_jax.projection`: the cost model's seconds for the call's shape on
other hardware) while the orderings stay those of the real run.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from .trace import Interval, Trace

Duration = Callable[[Interval], float]


def _recorded(call: Interval) -> float:
    return call.duration


def schedule(trace: Trace, duration: Optional[Duration] = None) -> list[tuple[Interval, float, float]]:
    """Each call of the trace with its projected (start, end), in the order of the real starts.
    `duration(call)` gives a call's seconds (default: the recorded ones); it must be a finite
    number >= 0, else `ValueError` naming the call."""
    seconds_of = duration or _recorded
    calls = sorted(trace.intervals, key=lambda i: i.start)
    placed: list[tuple[Interval, float, float]] = []
    last_end: dict[str, float] = {}
    for idx, call in enumerate(calls):
        start = last_end.get(call.role, 0.0)
        for other, _, other_end in placed:
            if other.role != call.role and other.end <= call.start:
                start = max(start, other_end)
        seconds = seconds_of(call)
        if duration is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                                     or not math.isfinite(seconds) or seconds < 0):
            raise ValueError(f"the duration of the {call.role} {call.kind} call at {call.start:.6f} s "
                             f"must be a finite number of seconds >= 0, got {seconds!r}")
        end = start + seconds
        placed.append((call, start, end))
        last_end[call.role] = end
    return placed


def project(trace: Trace, duration: Optional[Duration] = None) -> float:
    """Projected wall-clock (seconds) of the trace's schedule on contention-free, separate
    hardware; `duration` prices each call (default: its recorded duration)."""
    return max((end for _, _, end in schedule(trace, duration)), default=0.0)


def overlap_time(trace: Trace) -> float:
    """Seconds during which both roles were busy at once in the real run."""
    draft = [(i.start, i.end) for i in trace.intervals if i.role == "draft"]
    target = [(i.start, i.end) for i in trace.intervals if i.role == "target"]
    total = 0.0
    for a0, a1 in draft:
        for b0, b1 in target:
            total += max(0.0, min(a1, b1) - max(a0, b0))
    return total

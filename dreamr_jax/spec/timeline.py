"""Timeline projection: replay a trace's recorded device calls as if each role had its own
hardware and nothing contended, keeping every ordering the run showed between the roles.

Each call starts when its role's previous call ends and when every call of the other role
that had ended before it started in the real run has ended (a conservative happens-before:
it keeps all true dependencies and possibly some accidental ones, so the projection is never
optimistic about the schedule). Durations are the recorded ones.
"""

from __future__ import annotations

from .trace import Trace


def project(trace: Trace) -> float:
    """Projected wall-clock (seconds) of the trace's schedule on contention-free, separate hardware."""
    calls = sorted(trace.intervals, key=lambda i: i.start)
    projected_end: dict[int, float] = {}
    last_end = {"draft": 0.0, "target": 0.0}
    for idx, call in enumerate(calls):
        start = last_end.get(call.role, 0.0)
        for j in range(idx):
            other = calls[j]
            if other.role != call.role and other.end <= call.start:
                start = max(start, projected_end[j])
        projected_end[idx] = start + call.duration
        last_end[call.role] = projected_end[idx]
    return max(projected_end.values(), default=0.0)


def overlap_time(trace: Trace) -> float:
    """Seconds during which both roles were busy at once in the real run."""
    draft = [(i.start, i.end) for i in trace.intervals if i.role == "draft"]
    target = [(i.start, i.end) for i in trace.intervals if i.role == "target"]
    total = 0.0
    for a0, a1 in draft:
        for b0, b1 in target:
            total += max(0.0, min(a1, b1) - max(a0, b0))
    return total

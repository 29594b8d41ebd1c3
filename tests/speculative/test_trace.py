"""Traces (dreamr_jax.speculative.trace) through JSON, the timeline's projection of their calls,
and the per-token summaries `dreamr eval` reports from them."""

from __future__ import annotations

import json

import pytest

from dreamr_jax.speculative import project
from dreamr_jax.speculative.timeline import overlap_time
from dreamr_jax.speculative.trace import Interval, Step, Trace


def test_trace_json_round_trip():
    trace = Trace(method="dreamr", question="q?", answer="5", finish_reason="answer", wall_time=1.5,
                  steps=[Step("a\n\n", [1, 271], "draft", rho=0.9), Step(r"\boxed{5}", [5, 6, 7], "target", rho=0.2,
                                                                         hit_cap=True)],
                  intervals=[Interval("draft", "draft", 0.0, 0.5, 2), Interval("target", "check", 0.5, 0.7, 9)],
                  drafted_checked=2, drafted_accepted=1, extra={"alpha": 0.7, "projected_time": 1.2})
    d = json.loads(trace.to_json())
    assert d["text"] == "a\n\n\\boxed{5}" and d["num_tokens"] == 5 and d["acceptance_rate"] == 0.5
    back = Trace.from_dict(d)
    assert back == trace
    assert back.acceptance_rate == 0.5 and back.busy_time("draft") == 0.5
    assert Trace("target").acceptance_rate is None


def _trace(*spans):
    return Trace("dreamr", intervals=[Interval(role, "x", s, e) for role, s, e in spans])


def test_timeline_projection():
    # sequential roles: nothing overlaps, so the projection is the sum of the durations
    seq = _trace(("draft", 0.0, 1.0), ("target", 1.0, 3.0), ("draft", 3.0, 3.5), ("target", 3.5, 4.0))
    assert project(seq) == pytest.approx(1.0 + 2.0 + 0.5 + 0.5)
    assert overlap_time(seq) == 0
    # idle gaps of the real run vanish, but a call that started after the other role's call
    # ended must still wait for it
    gap = _trace(("target", 0.0, 2.0), ("draft", 3.0, 4.0))
    assert project(gap) == pytest.approx(3.0)
    # a draft call that started before the target's ended runs in parallel with it
    par = _trace(("draft", 0.0, 2.0), ("target", 1.0, 3.0))
    assert project(par) == pytest.approx(2.0)
    assert overlap_time(par) == pytest.approx(1.0)
    # contention in the real run (each call slowed) is not undone, and dependencies chain:
    # target waits for draft #1; draft #2 (started after target ended) waits for target
    chain = _trace(("draft", 0.0, 1.0), ("target", 1.5, 2.5), ("draft", 2.0, 3.0), ("draft", 3.0, 3.2))
    # draft#1 0-1; target 1-2 (waits for draft#1); draft#2 1-2 (own role only: target not ended
    # at its real start); draft#3 starts after draft#2 and after target (ended at 2.5 <= 3.0) -> 2-2.2
    assert project(chain) == pytest.approx(2.2)
    assert project(Trace("target")) == 0.0


def test_summarise_token_share_and_length_ratio():
    """Per-token accounting in `evaluate.summarise`, against sums written out by hand."""
    from dreamr_jax.evaluate import summarise

    def result(pid, method, steps, status="ok"):
        trace = {"wall_time": 1.0, "projected_time": 1.0, "answer": "1", "drafted_checked": 0,
                 "drafted_accepted": 0, "steps": [{"token_ids": [0] * n, "author": who} for n, who in steps]}
        return {"id": pid, "method": method, "status": status, "reference": "1", "trace": trace}

    results = [result("a", "target", [(10, "target"), (10, "target")]),
               result("b", "target", [(30, "target")]),
               result("a", "dreamr", [(6, "draft"), (8, "target")]),
               result("b", "dreamr", [(4, "draft"), (4, "draft"), (10, "target")]),
               result("c", "target", [(99, "target")]),  # "c" failed under dreamr: left out of the length ratio
               result("c", "dreamr", [], status="error")]
    for pid, n in (("a", 20), ("b", 30), ("c", 99)):  # sd: steps committed as the target's, 15 draft tokens accepted
        results.append(result(pid, "sd", [(n, "target")]))
        results[-1]["trace"]["drafted_accepted"] = 5
    rows = {r["method"]: r for r in summarise(results, ["target", "dreamr", "sd"])}
    assert rows["sd"]["draft_token_share"] == pytest.approx(15 / (20 + 30 + 99))
    assert rows["dreamr"]["draft_token_share"] == pytest.approx((6 + 4 + 4) / (6 + 8 + 4 + 4 + 10))
    assert rows["dreamr"]["length_ratio"] == pytest.approx(((14 + 18) / 2) / ((20 + 30) / 2))
    assert rows["target"]["draft_token_share"] == 0 and rows["target"]["length_ratio"] == pytest.approx(1.0)

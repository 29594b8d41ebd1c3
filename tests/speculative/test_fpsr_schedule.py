"""FPSR's scheduler cannot hang and commits what the commit rule says, whatever the budget
(0 and 1 tokens included), the step cap, the window, the drafted steps per call, the fallback
policy and the pattern of accepted steps; each run is watched by a watchdog."""

from __future__ import annotations

import hashlib
import itertools
import threading

import numpy as np
import pytest

import dreamr_jax as dr
from dreamr_jax.speculative import SpeculativeReasoner, StepConfig
from dreamr_jax.speculative.fpsr import run_dreamr
from dreamr_jax.speculative.methods import Problem
from dreamr_jax.speculative.trace import Trace

from helpers.speculative import sequential_commits

QUESTION = "What is 2 + 3?"
WATCHDOG_S = 60.0  # a run takes well under a second once compiled


@pytest.fixture(scope="module")
def pair(spec_pair):
    """The folder's tiny pair (tests/speculative/conftest.py), loaded afresh for this module."""
    draft, target = spec_pair
    return dr.load_model(draft), dr.load_model(target), dr.load_processor(target)


def _rho(position: int, step, accept_share: float, seed: int) -> float:
    """A verdict that depends only on where a step would be committed and what it says, so the
    accept pattern is the same whatever order or packing the scheduler checks steps in."""
    digest = hashlib.sha256(repr((seed, position, tuple(step))).encode()).digest()
    return 1.0 if int.from_bytes(digest[:4], "little") / 2**32 < accept_share else 0.0


def _with_verdicts(engine, accept_share: float, seed: int):
    """Replace the engine's check verdicts by `_rho` (the real packed check still runs, so the
    check context ends as it would)."""
    real = engine.check_drafts

    def check_drafts(ctx, drafts):
        position = len(ctx.tokens)  # the committed text and the drafts before these
        real(ctx, drafts)
        scores = []
        for d in drafts:
            scores.append(_rho(position, d, accept_share, seed))
            position += len(d)
        return np.array(scores, np.float32)

    engine.check_drafts = check_drafts


def _problem(reasoner, budget: int):
    enc = reasoner.processor.encode(reasoner.prompt(QUESTION, 0), [])
    ids = enc["input_ids"]
    problem = Problem(trace=Trace("dreamr", question=QUESTION), prompt_ids=ids, token_budget=budget)
    capacity = max(budget, 0) + reasoner.config.steps.max_step_tokens + 256
    for role in (reasoner.target, reasoner.draft):
        problem.openers[role.name] = lambda role=role: role.prepare(ids, capacity=capacity)
    return problem


def _sequential(reasoner, budget: int, accept_share: float, seed: int) -> Trace:
    """The commit rule one step at a time (`helpers.speculative.sequential_commits`) with `_rho`'s verdicts."""
    problem = _problem(reasoner, budget)
    dctx, tctx = problem.open("draft"), problem.open("target")
    sequential_commits(reasoner, problem, dctx, tctx, lambda tctx, position, d: _rho(position, d, accept_share, seed),
                       reasoner.config.alpha)
    return problem.trace


def _watched(fn):
    """Run fn in a thread; fail if it has not returned within WATCHDOG_S (a hung scheduler)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WATCHDOG_S)
    assert not thread.is_alive(), f"FPSR did not return within {WATCHDOG_S} s: the scheduler hung"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _cases(count: int = 14, seed: int = 0):
    """Random settings, the edge budgets always among them."""
    rng = np.random.default_rng(seed)
    grid = list(itertools.product([0, 1, 2, 9, 40], [1, 3, 12], [1, 2, 4], [1, 2], ["eager", "on_reject"],
                                  [0.0, 0.5, 1.0]))
    picks = [grid[i] for i in rng.choice(len(grid), count, replace=False)]
    return [(0, 3, 2, 1, "on_reject", 0.5), (1, 3, 1, 2, "eager", 1.0), (1, 1, 4, 1, "on_reject", 0.0)] + picks


@pytest.mark.parametrize("budget,cap,window,per_call,fallback,accept_share", _cases())
def test_scheduler_never_hangs_and_commits_the_rule(pair, budget, cap, window, per_call, fallback, accept_share):
    draft, target, proc = pair
    reasoner = SpeculativeReasoner(draft=draft, target=target, processor=proc, alpha=0.5, window=window,
                                   fallback=fallback, draft_steps_per_call=per_call, fallback_chunk=2,
                                   steps=StepConfig(max_step_tokens=cap, token_budget=max(budget, 1), max_steps=64))
    seed = budget * 1000 + cap * 100 + window * 10 + per_call
    engine = reasoner.engine("dreamr")
    _with_verdicts(engine, accept_share, seed)
    problem = _problem(reasoner, budget)
    _watched(lambda: run_dreamr(engine, problem))
    trace = problem.trace
    oracle = _sequential(reasoner, budget, accept_share, seed)
    assert [s.token_ids for s in trace.steps] == [s.token_ids for s in oracle.steps]
    assert [s.author for s in trace.steps] == [s.author for s in oracle.steps]
    assert trace.finish_reason == oracle.finish_reason and problem.done
    assert len(problem.committed) <= max(budget, 0)
    if budget <= 0:
        assert trace.steps == [] and trace.finish_reason == "budget"


@pytest.mark.parametrize("question", ["", "   \n", None])
def test_an_empty_question_is_refused(pair, question):
    draft, target, proc = pair
    reasoner = SpeculativeReasoner(draft=draft, target=target, processor=proc)
    with pytest.raises(ValueError, match="the question must be a non-empty string"):
        reasoner.solve(question, method="target")

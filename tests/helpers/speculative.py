"""The speculative tests' settings, reasoners and oracle, on the tiny draft/target pairs with the
real Qwen vocabulary of `dreamr_jax.bench.models.build_spec_model` (random weights whose "\\n\\n"
column is scaled to win on about 12% of positions, so that the models write steps of varied
lengths). The pair itself is the `spec_pair` fixture of tests/speculative/conftest.py."""

from __future__ import annotations

import dataclasses

from dreamr_jax.speculative import SpeculativeReasoner, StepConfig
from dreamr_jax.speculative.methods import Problem
from dreamr_jax.speculative.trace import Trace

STEPS = StepConfig(max_step_tokens=24, token_budget=64)
QUESTION = "What is 2 + 3?"
# alphas between the rhos this pair gives (0.54-0.57), so dreamr both accepts and rejects; each
# test asserts that no rho lies within 1e-4 of its alpha, where rounding could flip a verdict
MID_ALPHA = 0.553  # with STEPS (budget 64): 2 target steps, then 9 drafted ones
MESH_ALPHA, MESH_STEPS = 0.556, StepConfig(max_step_tokens=24, token_budget=96)  # 5 target steps, 1 drafted


def make_reasoner(loaded, steps=STEPS, **kw):
    """A reasoner over the `loaded` fixture's (draft, target, processor)."""
    draft, target, proc = loaded
    return SpeculativeReasoner(draft=draft, target=target, processor=proc, steps=steps, **kw)


def with_config(reasoner, **changes):
    """The reasoner with some config fields changed (its per-method engines rebuilt)."""
    reasoner.config = dataclasses.replace(reasoner.config, **changes)
    reasoner._engines.clear()
    return reasoner


def step_ids(trace):
    return [s.token_ids for s in trace.steps]


def assert_whole_steps(trace, engine):
    """Committed text is a sequence of whole steps: each ends at a delimiter / EOS, or is a
    target step at the step cap, or is the last step cut by the token budget."""
    cfg = engine.config.steps
    assert trace.num_tokens <= cfg.token_budget
    for i, step in enumerate(trace.steps):
        assert step.author in ("draft", "target")
        assert 1 <= step.num_tokens <= cfg.max_step_tokens
        ends = step.token_ids[-1] in engine.stop_ids
        at_cap = step.num_tokens == cfg.max_step_tokens
        budget_cut = i == len(trace.steps) - 1 and trace.num_tokens == cfg.token_budget
        assert ends or (at_cap and step.author == "target") or budget_cut, (i, step)
        if step.author == "draft":
            assert not step.hit_cap, "a drafted step that hit the cap was accepted"
        # delimiters only at the end: the text is split into steps exactly at the delimiters
        assert not any(t in engine.stop_ids for t in step.token_ids[:-1])
    assert trace.text == "".join(engine.proc.decode(s.token_ids) for s in trace.steps)


def sequential_commits(reasoner, problem, dctx, tctx, rho_of, alpha: float) -> list[float]:
    """FPSR's commit rule executed one step at a time with nothing speculative or cancelled:
    draft a step from the committed text, score it with `rho_of(tctx, position, step)` (tctx
    then holds the committed text), commit it if rho >= alpha and it did not hit the step cap,
    else commit the target's own step; until `problem` is done. Returns the rhos."""
    eng = reasoner.engine("dreamr")
    rhos = []
    while not problem.done:
        reasoner.draft.set_tokens(dctx, problem.committed)
        d, _ = reasoner.draft.write(dctx, max_tokens=eng.step_budget(problem), stop_ids=eng.stop_ids,
                                    params=eng.draft_params)
        reasoner.target.set_tokens(tctx, problem.committed)
        rho = rho_of(tctx, len(problem.committed), d)
        rhos.append(rho)
        if rho >= alpha and not eng.hit_cap(d):
            eng.commit(problem, d, "draft", rho=rho)
        else:
            reasoner.target.set_tokens(tctx, problem.committed)
            t, _ = reasoner.target.write(tctx, max_tokens=eng.step_budget(problem), stop_ids=eng.stop_ids,
                                         params=eng.target_params)
            eng.commit(problem, t, "target", rho=rho)
    return rhos


def sequential_fpsr(reasoner, question, alpha):
    """FPSR's commit rule one step at a time (`sequential_commits`) with the target's real CPN
    scores. Returns (trace, rhos)."""
    eng = reasoner.engine("dreamr")
    cfg = eng.config
    ids = reasoner.processor.encode(reasoner.prompt(question, 0), [])["input_ids"]
    problem = Problem(trace=Trace("oracle"), prompt_ids=ids, token_budget=cfg.steps.token_budget)
    capacity = cfg.steps.token_budget + cfg.steps.max_step_tokens + 256
    dctx = reasoner.draft.open(ids, capacity=capacity)
    tctx = reasoner.target.open(ids, capacity=capacity)
    rhos = sequential_commits(reasoner, problem, dctx, tctx,
                              lambda tctx, position, d: float(eng.cpn_scores(tctx, [d])[0]), alpha)
    return problem.trace, rhos

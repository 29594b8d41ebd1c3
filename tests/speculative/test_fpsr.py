"""FPSR's cancellation and rollback: cancelled work never changes committed text (dreamr equals a
sequential oracle of the commit rule), and KV rollback leaves the cache as if the rejected
tokens were never written."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dreamr_jax.generation import forward
from dreamr_jax.sampling import SamplingParams

from helpers.speculative import MID_ALPHA, QUESTION, assert_whole_steps, make_reasoner, sequential_fpsr, step_ids


def test_cancelled_fallbacks_never_change_text(loaded, refs, monkeypatch):
    """alpha = 0 with eager fallback: the target starts its own step while the draft writes, and
    each accepted draft cancels it; the committed text is still exactly the draft's. Accepting a
    draft never cancels the draft's later, still valid work: every drafted step is committed
    (the draft is slowed down so that the target commits while the draft is writing)."""
    accept_all = make_reasoner(loaded, alpha=0.0, fallback="eager")
    writes = []
    write = accept_all.draft.write

    def counting_write(*args, **kwargs):
        out = write(*args, **kwargs)
        time.sleep(0.05)  # a slow draft: checks and commits happen while it writes
        writes.append(out[0])
        return out

    monkeypatch.setattr(accept_all.draft, "write", counting_write)
    trace = accept_all.solve(QUESTION, method="dreamr")
    fallbacks = [i for i in trace.intervals if i.role == "target" and i.kind == "fallback"]
    assert fallbacks, "no fallback was started, so none was cancelled"
    assert all(s.author == "draft" for s in trace.steps)
    assert step_ids(trace) == step_ids(refs["draft"])
    assert writes == step_ids(trace), f"{len(writes)} drafted steps for {len(trace.steps)} committed"


@pytest.mark.parametrize("window,chunk,fallback,per_call", [(4, 16, "eager", 1), (1, 16, "eager", 1),
                                                            (2, 3, "eager", 1), (4, 16, "on_reject", 1),
                                                            (2, 16, "auto", 1), (4, 16, "on_reject", 3)])
def test_mid_alpha_commits_the_sequential_oracle(loaded, window, chunk, fallback, per_call):
    """At an alpha that both accepts and rejects, two runs commit the same steps, every step is
    whole, and the steps (authors, tokens, rhos) equal the commit rule executed one step at a
    time: the speculative work FPSR cancels never leaks into the text, whatever the window,
    the fallback chunk length, the fallback policy or the drafted steps per draft call."""
    r = make_reasoner(loaded, alpha=MID_ALPHA, window=window, fallback_chunk=chunk, fallback=fallback,
                  draft_steps_per_call=per_call)
    oracle, rhos = sequential_fpsr(r, QUESTION, MID_ALPHA)
    authors = [s.author for s in oracle.steps]
    assert "draft" in authors and "target" in authors, authors
    assert min(abs(x - MID_ALPHA) for x in rhos) > 1e-4  # no rho so close to alpha that rounding could flip it
    first, second = r.solve(QUESTION), r.solve(QUESTION)
    for trace in (first, second):
        assert step_ids(trace) == step_ids(oracle)
        assert [s.author for s in trace.steps] == authors
        assert np.allclose([s.rho for s in trace.steps], [s.rho for s in oracle.steps], atol=1e-5)
        assert trace.finish_reason == oracle.finish_reason
        assert trace.drafted_accepted == authors.count("draft")
        assert trace.drafted_checked == len(trace.steps)
        assert_whole_steps(trace, r.engine("dreamr"))
    assert first.text == second.text


def test_kv_rollback_is_exact(loaded, reject_all, refs, image_file):
    """Write a step, roll it back with set_tokens, write something else: tokens, cache contents
    and next-token logits equal a fresh context that never saw the rejected step (1e-5)."""
    role = reject_all.target
    target_model, proc = loaded[1], loaded[2]
    enc = proc.encode(reject_all.prompt(QUESTION, 1), [image_file])
    ids, pix, grids = enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"]
    a = refs["target"].steps[0].token_ids
    b = refs["draft"].steps[1].token_ids
    greedy = SamplingParams()

    ctx = role.open(ids, pix, grids, capacity=64)
    role.set_tokens(ctx, a)
    role.feed(ctx)
    rejected, _ = role.write(ctx, max_tokens=16, stop_ids=(), params=greedy)
    assert ctx.tokens == a + rejected and rejected[:1] != b[:1]
    role.set_tokens(ctx, a[:3])  # roll back past the step, into the earlier tokens
    assert ctx.tokens == a[:3]
    role.set_tokens(ctx, a + b)
    logits = np.asarray(role.feed(ctx))

    fresh = role.open(ids, pix, grids, capacity=64)
    role.set_tokens(fresh, a + b)
    fresh_logits = np.asarray(role.feed(fresh))
    assert ctx.tokens == fresh.tokens == a + b
    assert int(ctx.cache.lengths[0]) == int(fresh.cache.lengths[0]) == len(ids) + len(a + b)
    n = len(ids) + len(a + b)
    for k1, k2 in zip(ctx.cache.keys + ctx.cache.values, fresh.cache.keys + fresh.cache.values):
        np.testing.assert_allclose(np.asarray(k1)[0, :, :n], np.asarray(k2)[0, :, :n], atol=1e-5)  # (B, K, L, D)
    scratch = np.asarray(forward(target_model, np.array([ids + a + b]), pixel_values=pix, image_grid_thw=grids))[0, -1]
    err = max(np.abs(logits - fresh_logits).max(), np.abs(logits[0] - scratch).max())
    print(f"\nrollback: max |logits - fresh| {np.abs(logits - fresh_logits).max():.2e}, vs scratch "
          f"{np.abs(logits[0] - scratch).max():.2e}")
    assert err < 1e-5
    # continuing from both gives the same tokens
    more, _ = role.write(ctx, max_tokens=12, stop_ids=(), params=greedy)
    more_fresh, _ = role.write(fresh, max_tokens=12, stop_ids=(), params=greedy)
    assert more == more_fresh
    # rolling all the way back to the prompt restores the prompt's logits
    role.set_tokens(ctx, [])
    np.testing.assert_allclose(np.asarray(role.feed(ctx)), np.asarray(fresh.prompt_logits), atol=1e-5)

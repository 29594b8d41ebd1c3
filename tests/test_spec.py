"""Step-level speculative reasoning (dreamr_jax.speculative): the exactness properties of
docs/METHOD.md sections 1-4 on tiny random draft/target pairs with the real Qwen vocabulary.

- greedy exactness of dreamr / specreason / lookahead at reject-all and accept-all settings,
  step by step and token by token;
- sd: greedy equals target greedy; sampled output follows the target's distribution (the
  rejection rule as a pure function over 20000 draws, and end to end on a sharpened pair);
- the CPN check on the cached prefix equals a from-scratch forward and transformers;
- two disjoint fake-CPU meshes (a subprocess): weights on their devices, draft and target
  busy at the same time, committed text unchanged;
- cancelled work never changes committed text (dreamr equals a sequential oracle of the
  commit rule); KV rollback leaves the cache as if the rejected tokens were never written;
- bad inputs fail with clear errors; solve_many isolates a broken record;
- unit tests of steps, tbvm, trace, timeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import dreamr_jax as dr
from dreamr_jax.generation import forward
from dreamr_jax.processing import ImageError, Processor, qwen_tokenizer_dir
from dreamr_jax.sampling import SamplingParams
from dreamr_jax.speculative import ContextLengthError, SpeculativeReasoner, StepConfig, accept, cpn_rho, project, split_steps
from dreamr_jax.prompts import KeywordError, Keywords, keyword_token_ids
from dreamr_jax.data.grading import final_answer
from dreamr_jax.speculative.config import SpeculationConfig
from dreamr_jax.speculative.methods import (Problem, StepEngine, TokenizerMismatchError, check_same_tokenizer,
                                     speculative_accept)
from dreamr_jax.speculative.roles import Role
from dreamr_jax.data.grading import boxed_answer
from dreamr_jax.speculative.timeline import overlap_time
from dreamr_jax.speculative.trace import Interval, Step, Trace

from conftest import build_torch_model, tiny_config_dict
from spec_models import build_spec_model, sequential_commits

STEPS = StepConfig(max_step_tokens=24, token_budget=64)
QUESTION = "What is 2 + 3?"
# alphas between the rhos this pair gives (0.54-0.57), so dreamr both accepts and rejects; each
# test asserts that no rho lies within 1e-4 of its alpha, where rounding could flip a verdict
MID_ALPHA = 0.553  # with STEPS (budget 64): 2 target steps, then 9 drafted ones
MESH_ALPHA, MESH_STEPS = 0.556, StepConfig(max_step_tokens=24, token_budget=96)  # 5 target steps, 1 drafted


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def spec_pair(tmp_path_factory):
    """(draft folder, target folder): tiny Qwen3-VL checkpoints with the real Qwen tokenizer."""
    root = tmp_path_factory.mktemp("spec_pair")
    target = build_spec_model(str(root / "target"), seed=1, hidden=64, layers=2)
    draft = build_spec_model(str(root / "draft"), seed=1, hidden=64, layers=1)
    return draft, target


@pytest.fixture(scope="module")
def loaded(spec_pair):
    draft, target = spec_pair
    return dr.load_model(draft), dr.load_model(target), dr.load_processor(target)


def _reasoner(loaded, steps=STEPS, **kw):
    draft, target, proc = loaded
    return SpeculativeReasoner(draft=draft, target=target, processor=proc, steps=steps, **kw)


@pytest.fixture(scope="module")
def reject_all(loaded):
    return _reasoner(loaded, alpha=float("inf"), specreason_threshold=10, lookahead_judge="never")


@pytest.fixture(scope="module")
def accept_all(loaded):
    return _reasoner(loaded, alpha=0.0, specreason_threshold=0, lookahead_judge="always")


@pytest.fixture(scope="module")
def refs(reject_all):
    """Greedy target-alone and draft-alone traces of QUESTION."""
    return {m: reject_all.solve(QUESTION, method=m) for m in ("target", "draft")}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "figure.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def _with(reasoner, **changes):
    """The reasoner with some config fields changed (its per-method engines rebuilt)."""
    reasoner.config = dataclasses.replace(reasoner.config, **changes)
    reasoner._engines.clear()
    return reasoner


def _ids(trace):
    return [s.token_ids for s in trace.steps]


def _assert_whole_steps(trace, engine):
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


def sequential_fpsr(reasoner, question, alpha):
    """FPSR's commit rule one step at a time (`spec_models.sequential_commits`) with the target's
    real CPN scores. Returns (trace, rhos)."""
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


# ---- 1. greedy exactness -----------------------------------------------------------------------


# FPSR under each way the target's own steps are scheduled, and with several drafted steps per
# draft call
METHODS_AND_SETTINGS = [("dreamr", {"fallback": "eager"}), ("dreamr", {"fallback": "on_reject"}),
                        ("dreamr", {"fallback": "on_reject", "draft_steps_per_call": 3}), ("specreason", {}),
                        ("lookahead", {})]


@pytest.mark.parametrize("method,settings", METHODS_AND_SETTINGS)
def test_reject_all_equals_target(method, settings, loaded, reject_all, refs):
    if settings:
        reject_all = _reasoner(loaded, alpha=float("inf"), **settings)
    trace = reject_all.solve(QUESTION, method=method)
    target = refs["target"]
    assert trace.text == target.text
    assert _ids(trace) == _ids(target)
    assert all(s.author == "target" for s in trace.steps)
    assert trace.acceptance_rate == 0.0
    assert trace.drafted_checked >= 1
    assert trace.finish_reason == target.finish_reason
    _assert_whole_steps(trace, reject_all.engine(method))


@pytest.mark.parametrize("method,settings", METHODS_AND_SETTINGS)
def test_accept_all_equals_draft(method, settings, loaded, accept_all, refs):
    if settings:
        accept_all = _reasoner(loaded, alpha=0.0, **settings)
    trace = accept_all.solve(QUESTION, method=method)
    draft = refs["draft"]
    assert trace.text == draft.text
    assert _ids(trace) == _ids(draft)
    assert all(s.author == "draft" for s in trace.steps)
    assert trace.acceptance_rate == 1.0
    assert trace.drafted_checked == len(draft.steps)
    _assert_whole_steps(trace, accept_all.engine(method))


@pytest.mark.parametrize("method", ["target", "draft"])
def test_single_model_calls_cut_steps_and_continue_them(method, loaded, refs):
    """`target` / `draft` alone write whole solutions per decode call; with a 3-token call
    limit every step is cut across calls and continued (the step cap counting its earlier
    tokens), and the trace is the same as with one call for the whole solution."""
    short = _reasoner(loaded, solo_tokens_per_call=3).solve(QUESTION, method=method)
    calls = [i for i in short.intervals if i.kind == "decode"]
    assert _ids(short) == _ids(refs[method]) and short.text == refs[method].text
    assert len(calls) >= short.num_tokens // 3 > len(short.steps)
    assert short.finish_reason == refs[method].finish_reason
    assert len([i for i in refs[method].intervals if i.kind == "decode"]) < len(refs[method].steps)


def test_references_differ(refs):
    """The exactness tests are only meaningful if draft and target disagree."""
    assert refs["target"].text != refs["draft"].text
    assert len(refs["target"].steps) >= 3 and len(refs["draft"].steps) >= 3


# ---- 2. token-level speculative decoding -------------------------------------------------------------


def test_sd_greedy_equals_target(reject_all, refs):
    trace = reject_all.solve(QUESTION, method="sd")
    assert trace.text == refs["target"].text
    assert _ids(trace) == _ids(refs["target"])
    assert all(s.author == "target" for s in trace.steps)


def _tv(a, b):
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def _chi2_pvalue(counts, probs):
    from scipy.stats import chisquare

    counts = np.asarray(counts, float)
    return float(chisquare(counts, probs / probs.sum() * counts.sum()).pvalue)


def test_speculative_accept_is_exact():
    """The rejection rule alone: the first emitted token follows p_0 exactly, and the second
    (emitted when the first proposal is kept) follows p_1, whatever the draft's q. 20000 draws
    on a 6-token vocabulary; tolerance TV < 0.015 (the sampling noise is about 0.006) and a
    chi-square p-value > 1e-3; the same draws reject q decisively (the test has power)."""
    rng = np.random.default_rng(0)
    p = np.array([[0.40, 0.25, 0.15, 0.10, 0.07, 0.03],
                  [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
                  [0.30, 0.20, 0.20, 0.10, 0.10, 0.10]])
    q = np.array([[0.05, 0.10, 0.15, 0.20, 0.20, 0.30],
                  [0.30, 0.25, 0.20, 0.10, 0.10, 0.05]])
    assert _tv(p[0], q[0]) > 0.3
    n = 20000
    first, second = np.zeros(6), np.zeros(6)
    lengths = np.zeros(4, int)
    for _ in range(n):
        proposal = [int(rng.choice(6, p=q[0])), int(rng.choice(6, p=q[1]))]
        out = speculative_accept(p, q, proposal, rng)
        assert 1 <= len(out) <= 3
        assert out[: len(out) - 1] == proposal[: len(out) - 1]  # an accepted prefix + one target token
        lengths[len(out)] += 1
        first[out[0]] += 1
        if len(out) >= 2:
            second[out[1]] += 1
    tv1, tv2 = _tv(first / n, p[0]), _tv(second / second.sum(), p[1])
    print(f"\nspeculative_accept: TV(first, p0) = {tv1:.4f}, TV(second | kept, p1) = {tv2:.4f}, "
          f"chi2 p = {_chi2_pvalue(first, p[0]):.3f}, lengths {lengths[1:].tolist()}")
    assert tv1 < 0.015 and _chi2_pvalue(first, p[0]) > 1e-3
    assert second.sum() > 2000 and tv2 < 0.03 and _chi2_pvalue(second, p[1]) > 1e-3
    assert _chi2_pvalue(first, q[0]) < 1e-12
    # the acceptance probability of the first proposal is sum_x min(p, q)
    assert abs((lengths[2] + lengths[3]) / n - np.minimum(p[0], q[0]).sum()) < 0.015
    # identical p and q: everything is accepted, the bonus comes from the last row
    out = speculative_accept(p[:3], p[:2], [0, 5], np.random.default_rng(1))
    assert out[:2] == [0, 5] and len(out) == 3


def test_device_rejection_sampler_is_exact():
    """`sampling.speculative_verify`, the rule `sd` runs on the device: over 20000 draws the
    first emitted token follows p_0 and the second (when the first proposal is kept) p_1,
    whatever q (TV and chi-square as for the host reference above), the first proposal is kept
    with probability sum_x min(p, q), and at temperature 0 it keeps exactly the argmax prefix."""
    import jax

    from dreamr_jax.sampling import SamplingParams, speculative_verify

    p = np.array([[0.40, 0.25, 0.15, 0.10, 0.07, 0.03],
                  [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
                  [0.30, 0.20, 0.20, 0.10, 0.10, 0.10]])
    q = np.array([[0.05, 0.10, 0.15, 0.20, 0.20, 0.30],
                  [0.30, 0.25, 0.20, 0.10, 0.10, 0.05]])
    n = 20000
    rng = np.random.default_rng(0)
    proposals = np.stack([rng.choice(6, n, p=q[0]), rng.choice(6, n, p=q[1])], 1).astype(np.int32)
    t = SamplingParams(temperature=1.0)
    verify = jax.jit(jax.vmap(lambda prop, key: speculative_verify(jnp.log(p), jnp.log(q), prop, 2, key, t, t)))
    n_acc, token = (np.asarray(x) for x in verify(proposals, jax.random.split(jax.random.key(0), n)))
    first = np.where(n_acc >= 1, proposals[:, 0], token)
    kept = n_acc >= 1
    second = np.where(n_acc >= 2, proposals[:, 1], token)[kept]
    f1, f2 = np.bincount(first, minlength=6), np.bincount(second, minlength=6)
    tv1, tv2 = _tv(f1 / n, p[0]), _tv(f2 / f2.sum(), p[1])
    print(f"\nspeculative_verify: TV(first, p0) = {tv1:.4f}, TV(second | kept, p1) = {tv2:.4f}")
    assert tv1 < 0.015 and _chi2_pvalue(f1, p[0]) > 1e-3
    assert f2.sum() > 2000 and tv2 < 0.03 and _chi2_pvalue(f2, p[1]) > 1e-3
    assert _chi2_pvalue(f1, q[0]) < 1e-12
    assert abs(kept.mean() - np.minimum(p[0], q[0]).sum()) < 0.015
    greedy = SamplingParams()
    logits = jnp.log(jnp.asarray(p))  # argmaxes 0, 5, 0
    for proposal, n_prop, want in (([0, 5], 2, (2, 0)), ([0, 4], 2, (1, 5)), ([3, 5], 2, (0, 0)), ([0, 5], 1, (1, 5))):
        got = speculative_verify(logits, jnp.log(q), jnp.array(proposal, jnp.int32), n_prop, jax.random.key(0),
                                 greedy, greedy)
        assert (int(got[0]), int(got[1])) == want, (proposal, n_prop, got)


def test_speculative_accept_matches_run_sd_rng_use():
    """The pure function consumes the generator exactly like the inline code it replaced
    (one uniform per proposal token until a rejection, then one choice)."""
    p = np.array([[0.1, 0.9], [0.5, 0.5]])
    q = np.array([[0.9, 0.1]])
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        out = speculative_accept(p, q, [0], a)
        u = b.random()
        if u < min(1.0, p[0, 0] / q[0, 0]):
            expect = [0, int(b.choice(2, p=p[1]))]
        else:
            resid = np.maximum(p[0] - q[0], 0)
            expect = [int(b.choice(2, p=resid / resid.sum()))]
        assert out == expect


def test_sd_sampled_first_token_follows_target(spec_pair, loaded):
    """End to end at temperature 1: sd's first emitted token, over many seeds, follows the
    target's next-token distribution p (exact, from a forward) and not the draft's q. The pair
    is sharpened (lm_head scaled, the draft's perturbed) so that p and q sit on a few tokens
    and differ (TV > 0.3). Bins: p's and q's top tokens and the rest; chi-square p > 1e-3."""
    proc = loaded[2]
    target, draft = dr.load_model(spec_pair[1]), dr.load_model(spec_pair[1])
    kernel = np.array(target.lm_head.kernel[...])
    noise = np.random.default_rng(0).standard_normal(kernel.shape).astype(np.float32) * kernel.std()
    target.lm_head.kernel[...] = jnp.asarray(kernel * 50)
    draft.lm_head.kernel[...] = jnp.asarray((kernel + 0.3 * noise) * 50)
    steps = StepConfig(max_step_tokens=2, token_budget=2)
    r = SpeculativeReasoner(draft=draft, target=target, processor=proc, method="sd", steps=steps,
                            target_temperature=1.0, draft_temperature=1.0)
    ids = np.array([proc.encode(r.prompt(QUESTION, 0), [])["input_ids"]])

    def probs(model):
        z = np.asarray(forward(model, ids))[0, -1].astype(np.float64)
        e = np.exp(z - z.max())
        return e / e.sum()

    p, q = probs(target), probs(draft)
    tops = list(dict.fromkeys(np.argsort(-p)[:3].tolist() + np.argsort(-q)[:2].tolist()))
    p_bins = np.append(p[tops], 1 - p[tops].sum())
    q_bins = np.append(q[tops], 1 - q[tops].sum())
    assert p[tops].sum() > 0.6 and _tv(p_bins, q_bins) > 0.3, (p_bins, q_bins)

    n = 150
    counts = np.zeros(len(tops) + 1)
    accepted = checked = 0
    for seed in range(n):
        trace = _with(r, seed=seed).solve(QUESTION)
        first = trace.steps[0].token_ids[0]
        counts[tops.index(first) if first in tops else len(tops)] += 1
        accepted += trace.drafted_accepted
        checked += trace.drafted_checked
    pv, pv_q = _chi2_pvalue(counts + 1e-9, p_bins), _chi2_pvalue(counts + 1e-9, q_bins)
    print(f"\nsd at T=1: bins {tops} + rest, observed {(counts / n).round(3).tolist()}, p {p_bins.round(3).tolist()}, "
          f"q {q_bins.round(3).tolist()}; chi2 p-value vs p {pv:.3f}, vs q {pv_q:.1e}; "
          f"accepted draft tokens {accepted}/{checked}")
    assert _tv(counts / n, p_bins) < 0.12
    assert pv > 1e-3
    assert pv_q < 1e-6
    assert 0 < accepted < checked  # both the acceptance and the residual path ran


# ---- 3. the CPN check on the cached prefix ----------------------------------------------------------


def _scratch_last_logits(model, rows, pix, grids):
    """Last-token logits of each row from one from-scratch forward (no cache): rows right
    padded into one batch, each with its own copy of the image."""
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    pix, grids = np.concatenate([pix] * len(rows)), np.concatenate([grids] * len(rows))
    logits = np.asarray(forward(model, ids, mask, pix, grids))
    return np.stack([logits[b, len(r) - 1] for b, r in enumerate(rows)])


def test_cpn_cached_prefix_equals_from_scratch(loaded, reject_all, refs, image_file):
    """rho for a batch of candidates of different lengths, checked on a cached prefix holding
    an image and accepted steps, equals rho from a from-scratch forward over prompt + steps +
    candidate + judging suffix (1e-5), and equals p+/(p+ + p-) from a float64 softmax."""
    target_model, proc = loaded[1], loaded[2]
    eng = reject_all.engine("dreamr")
    enc = proc.encode(reject_all.prompt(QUESTION, 1), [image_file])
    ids, pix, grids = enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"]
    assert grids.shape[0] == 1
    ctx = reject_all.target.open(ids, pix, grids, capacity=256)
    committed = refs["target"].steps[0].token_ids + refs["draft"].steps[1].token_ids
    reject_all.target.set_tokens(ctx, committed)
    rng = np.random.default_rng(0)
    candidates = [s.token_ids for s in refs["draft"].steps[:3]] + [rng.integers(0, 150000, 2).tolist(),
                                                                    rng.integers(0, 150000, 29).tolist()]
    assert len({len(c) for c in candidates}) == len(candidates)
    before = ctx.tokens
    rho = eng.cpn_scores(ctx, candidates)
    assert rho.shape == (len(candidates),) and rho.dtype == np.float32
    assert ctx.tokens == before
    # the same candidates checked on the bare prompt (nothing committed), one at a time
    reject_all.target.set_tokens(ctx, [])
    single = np.array([eng.cpn_scores(ctx, [c])[0] for c in candidates[:2]])

    rows = [ids + committed + c + eng.judge_ids for c in candidates] + [ids + c + eng.judge_ids for c in candidates[:2]]
    logits = _scratch_last_logits(target_model, rows, pix, grids)
    ref = np.asarray(cpn_rho(logits, eng.positive_id, eng.negative_id))
    z = logits.astype(np.float64)
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    softmax_ratio = s[:, eng.positive_id] / (s[:, eng.positive_id] + s[:, eng.negative_id])
    ours = np.concatenate([rho, single])
    err = max(np.abs(ours - ref).max(), np.abs(ours - softmax_ratio).max())
    print(f"\nrho cached vs from scratch: {np.round(ours, 5).tolist()}, max |error| {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("n_drafts", [1, 2, 3, 4])
def test_packed_check_equals_each_draft_checked_alone(loaded, reject_all, refs, image_file, n_drafts):
    """FPSR's packed check (`check_drafts`: all waiting drafts in one row, each followed by its
    own judging suffix) gives each draft the rho of a from-scratch forward over prompt (with an
    image) + committed text + the drafts before it + that draft + the suffix (1e-5), for 1-4
    drafts of different lengths, from a context with a pending token; the context then holds
    the drafts."""
    target_model, proc = loaded[1], loaded[2]
    eng = reject_all.engine("dreamr")
    enc = proc.encode(reject_all.prompt(QUESTION, 1), [image_file])
    ids, pix, grids = enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"]
    ctx = reject_all.target.open(ids, pix, grids, capacity=256)
    committed = refs["target"].steps[0].token_ids
    reject_all.target.set_tokens(ctx, committed)
    reject_all.target.feed(ctx)
    reject_all.target.set_tokens(ctx, committed + [151])  # one pending token: the packed row starts with it
    rng = np.random.default_rng(n_drafts)
    drafts = [rng.integers(0, 150000, n).tolist() for n in (5, 9, 2, 13)[:n_drafts]]
    rho = eng.check_drafts(ctx, drafts)
    assert rho.shape == (n_drafts,) and rho.dtype == np.float32
    assert ctx.tokens == committed + [151] + [t for d in drafts for t in d] and not ctx.pending
    rows = [ids + committed + [151] + [t for d in drafts[: i + 1] for t in d] + eng.judge_ids for i in range(n_drafts)]
    ref = np.asarray(cpn_rho(_scratch_last_logits(target_model, rows, pix, grids), eng.positive_id, eng.negative_id))
    print(f"\npacked rho {np.round(rho, 6).tolist()} vs alone {np.round(ref, 6).tolist()}")
    np.testing.assert_allclose(rho, ref, atol=1e-5)


def test_check_keeps_the_committed_cache_and_adopts_exact_keys(loaded, reject_all, refs, image_file):
    """A packed check reads the committed prefix in place: its cached keys and values are
    unchanged (same slots, bitwise), and the drafts it adopts get the keys a fresh context
    holding those tokens computes (1e-5); rolling back to the committed text restores the
    committed context exactly (length and keys)."""
    proc = loaded[2]
    eng = reject_all.engine("dreamr")
    target = reject_all.target
    enc = proc.encode(reject_all.prompt(QUESTION, 1), [image_file])
    ids, pix, grids = enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"]
    ctx = target.open(ids, pix, grids, capacity=256)
    committed = refs["target"].steps[0].token_ids
    target.set_tokens(ctx, committed)
    target.feed(ctx)
    n = len(ids) + len(committed)
    before_k = [np.asarray(k[0, :, :n]) for k in ctx.cache.keys]
    before_v = [np.asarray(v[0, :, :n]) for v in ctx.cache.values]
    drafts = [s.token_ids for s in refs["draft"].steps[:3]]
    eng.check_drafts(ctx, drafts)
    m = n + sum(map(len, drafts))
    assert int(ctx.cache.lengths[0]) == m
    for i, (k, v) in enumerate(zip(ctx.cache.keys, ctx.cache.values)):
        assert np.array_equal(np.asarray(k[0, :, :n]), before_k[i]) and np.array_equal(np.asarray(v[0, :, :n]), before_v[i])
    fresh = target.open(ids, pix, grids, capacity=256)
    target.set_tokens(fresh, committed + [t for d in drafts for t in d])
    target.feed(fresh)
    for k, k_ref in zip(ctx.cache.keys, fresh.cache.keys):
        np.testing.assert_allclose(np.asarray(k[0, :, n:m]), np.asarray(k_ref[0, :, n:m]), atol=1e-5)
    for v, v_ref in zip(ctx.cache.values, fresh.cache.values):
        np.testing.assert_allclose(np.asarray(v[0, :, n:m]), np.asarray(v_ref[0, :, n:m]), atol=1e-5)
    target.set_tokens(ctx, committed)  # a rejected first draft: back to the committed text
    assert ctx.tokens == committed and int(ctx.cache.lengths[0]) == n
    for i, k in enumerate(ctx.cache.keys):
        assert np.array_equal(np.asarray(k[0, :, :n]), before_k[i])


def test_cpn_matches_transformers(tmp_path):
    """rho from our cached check on a model loaded from a transformers checkpoint equals the
    softmax ratio s+/(s+ + s-) of transformers' own logits for the same tokens (1e-5)."""
    import torch

    torch_model = build_torch_model(tiny_config_dict("qwen3_vl", real_token_ids=True, vocab=151936), seed=3)
    torch_model.save_pretrained(tmp_path)
    for name in os.listdir(qwen_tokenizer_dir()):
        shutil.copy(os.path.join(qwen_tokenizer_dir(), name), tmp_path)
    model = dr.load_model(str(tmp_path))
    proc = dr.load_processor(str(tmp_path), min_pixels=16 * 16, max_pixels=32 * 32)
    eng = StepEngine(None, Role("target", model), proc, SpeculationConfig(method="target"))
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    enc = proc.encode(proc.user_prompt("Is the triangle in the figure isosceles?", 1), [img])
    ids, pix, grids = enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"]
    ctx = eng.target.open(ids, pix, grids, capacity=128)
    tok = proc.tokenizer
    accepted = tok.encode("The two marked sides are equal.\n\n", add_special_tokens=False)
    candidates = [tok.encode(t, add_special_tokens=False) for t in
                  ("So it is isosceles.\n\n", "No.", "Angles at the base are 40 and 70 degrees, so it is not.\n\n")]
    eng.target.set_tokens(ctx, accepted)
    rho = eng.cpn_scores(ctx, candidates)
    errors = []
    for c, r in zip(candidates, rho):
        full = np.array([ids + accepted + c + eng.judge_ids])
        with torch.no_grad():
            logits = torch_model(input_ids=torch.tensor(full), pixel_values=torch.tensor(pix),
                                 image_grid_thw=torch.tensor(grids),
                                 mm_token_type_ids=torch.tensor((full == model.cfg.image_token_id).astype(np.int64)),
                                 ).logits[0, -1].double()
        s = torch.softmax(logits, -1)
        errors.append(abs(float(r) - float(s[eng.positive_id] / (s[eng.positive_id] + s[eng.negative_id]))))
    print(f"\nrho vs transformers softmax ratio: {np.round(rho, 5).tolist()}, max |error| {max(errors):.2e}")
    assert max(errors) < 1e-5


# ---- 4. two disjoint (fake CPU) meshes ---------------------------------------------------------------

MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from dreamr_jax.sharding import split_devices
    from dreamr_jax.speculative import SpeculativeReasoner, StepConfig
    from dreamr_jax.speculative.timeline import overlap_time, project

    draft, target, question, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    assert len(jax.devices()) == 4, jax.devices()
    d_dev, t_dev = split_devices(2, 2)  # each role's weights split over its two devices (tensor parallel)
    r = SpeculativeReasoner(draft=draft, target=target, method="dreamr", alpha=alpha, window=4,
                            steps=StepConfig(max_step_tokens=int(sys.argv[5]), token_budget=int(sys.argv[6])),
                            draft_devices=d_dev, target_devices=t_dev)
    def where(state):
        return sorted({str(d) for leaf in jax.tree.leaves(state) if hasattr(leaf, "devices") for d in leaf.devices()})
    ids = r.processor.encode(r.prompt(question, 0), [])["input_ids"]
    caches = {name: where(getattr(r, name).open(ids, capacity=32).cache) for name in ("draft", "target")}
    r.solve(question)  # compile
    trace = r.solve(question)
    print("RESULT " + json.dumps({
        "devices": [str(d) for d in jax.devices()], "draft_devices": [str(d) for d in d_dev],
        "target_devices": [str(d) for d in t_dev],
        "draft_state": where(r.draft.generator.state), "target_state": where(r.target.generator.state),
        "q_proj_shards": {name: [list(s.data.shape) for s in getattr(r, name).generator.state["layers"][0]["self_attn"]
                                 ["q_proj"]["kernel"].value.addressable_shards] for name in ("draft", "target")},
        "caches": caches, "steps": [s.token_ids for s in trace.steps], "authors": [s.author for s in trace.steps],
        "overlap": overlap_time(trace), "wall": trace.wall_time, "projected": project(trace),
        "draft_busy": trace.busy_time("draft"), "target_busy": trace.busy_time("target"),
        "kinds": sorted({(i.role, i.kind) for i in trace.intervals})}))
""")


def test_two_disjoint_meshes(spec_pair, loaded, tmp_path):
    draft, target = spec_pair
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), draft, target, QUESTION, str(MESH_ALPHA),
                           str(MESH_STEPS.max_step_tokens), str(MESH_STEPS.token_budget)],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    print(f"\ntwo meshes: devices {res['devices']}; draft busy {res['draft_busy']:.3f}s, target busy "
          f"{res['target_busy']:.3f}s, overlap {res['overlap']:.3f}s, wall {res['wall']:.3f}s, "
          f"projected {res['projected']:.3f}s; authors {res['authors']}")
    assert len(res["devices"]) == 4 and len(res["draft_devices"]) == len(res["target_devices"]) == 2
    assert not set(res["draft_devices"]) & set(res["target_devices"])
    models = {"draft": loaded[0], "target": loaded[1]}
    for name, shards in res["q_proj_shards"].items():  # (in, out) kernels split by output feature
        t = models[name].cfg.text
        assert shards == [[t.hidden_size, t.num_attention_heads * t.head_dim // 2]] * 2, (name, shards)
    assert res["draft_state"] == res["draft_devices"] and res["target_state"] == res["target_devices"]
    assert res["caches"] == {"draft": res["draft_devices"], "target": res["target_devices"]}
    assert res["overlap"] > 0
    kinds = {tuple(k) for k in res["kinds"]}
    assert ("draft", "draft") in kinds and ("target", "check") in kinds
    assert res["projected"] <= res["wall"] + 1e-6
    # committed text does not depend on where the roles run: it equals the sequential oracle
    r = _reasoner(loaded, steps=MESH_STEPS, alpha=MESH_ALPHA)
    oracle, rhos = sequential_fpsr(r, QUESTION, MESH_ALPHA)
    assert min(abs(x - MESH_ALPHA) for x in rhos) > 1e-4
    assert res["steps"] == _ids(oracle)
    assert res["authors"] == [s.author for s in oracle.steps]


# ---- 5. cancellation and rollback ---------------------------------------------------------------------


def test_cancelled_fallbacks_never_change_text(loaded, refs, monkeypatch):
    """alpha = 0 with eager fallback: the target starts its own step while the draft writes, and
    each accepted draft cancels it; the committed text is still exactly the draft's. Accepting a
    draft never cancels the draft's later, still valid work: every drafted step is committed
    (the draft is slowed down so that the target commits while the draft is writing)."""
    accept_all = _reasoner(loaded, alpha=0.0, fallback="eager")
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
    assert _ids(trace) == _ids(refs["draft"])
    assert writes == _ids(trace), f"{len(writes)} drafted steps for {len(trace.steps)} committed"


@pytest.mark.parametrize("window,chunk,fallback,per_call", [(4, 16, "eager", 1), (1, 16, "eager", 1),
                                                            (2, 3, "eager", 1), (4, 16, "on_reject", 1),
                                                            (2, 16, "auto", 1), (4, 16, "on_reject", 3)])
def test_mid_alpha_commits_the_sequential_oracle(loaded, window, chunk, fallback, per_call):
    """At an alpha that both accepts and rejects, two runs commit the same steps, every step is
    whole, and the steps (authors, tokens, rhos) equal the commit rule executed one step at a
    time: the speculative work FPSR cancels never leaks into the text, whatever the window,
    the fallback chunk length, the fallback policy or the drafted steps per draft call."""
    r = _reasoner(loaded, alpha=MID_ALPHA, window=window, fallback_chunk=chunk, fallback=fallback,
                  draft_steps_per_call=per_call)
    oracle, rhos = sequential_fpsr(r, QUESTION, MID_ALPHA)
    authors = [s.author for s in oracle.steps]
    assert "draft" in authors and "target" in authors, authors
    assert min(abs(x - MID_ALPHA) for x in rhos) > 1e-4  # no rho so close to alpha that rounding could flip it
    first, second = r.solve(QUESTION), r.solve(QUESTION)
    for trace in (first, second):
        assert _ids(trace) == _ids(oracle)
        assert [s.author for s in trace.steps] == authors
        assert np.allclose([s.rho for s in trace.steps], [s.rho for s in oracle.steps], atol=1e-5)
        assert trace.finish_reason == oracle.finish_reason
        assert trace.drafted_accepted == authors.count("draft")
        assert trace.drafted_checked == len(trace.steps)
        _assert_whole_steps(trace, r.engine("dreamr"))
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


# ---- 6. bad input ---------------------------------------------------------------------------------------


def test_multi_token_keyword_is_rejected_at_construction(loaded):
    with pytest.raises(KeywordError, match="definitely correct"):
        _reasoner(loaded, keywords=Keywords(positive="definitely correct"))
    # the first-sub-token policy accepts it
    r = _reasoner(loaded, keywords=Keywords(positive="definitely correct", policy="first_subtoken"))
    assert r.engine("dreamr").positive_id == loaded[2].tokenizer.encode("definitely", add_special_tokens=False)[0]


def test_tokenizer_mismatch(loaded):
    from transformers import AutoTokenizer

    proc = loaded[2]
    other = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    other.add_tokens(["<|not_in_the_target|>"])
    other_proc = Processor(other, proc.image_processor)
    check_same_tokenizer(proc, Processor(AutoTokenizer.from_pretrained(qwen_tokenizer_dir()), proc.image_processor))
    with pytest.raises(TokenizerMismatchError, match="differ"):
        check_same_tokenizer(other_proc, proc)
    with pytest.raises(TokenizerMismatchError):
        _reasoner(loaded, draft_processor=other_proc)


def test_tokenizer_mismatch_from_checkpoint_folders(spec_pair, tmp_path):
    """A draft checkpoint whose saved tokenizer differs is refused when loaded by path."""
    from transformers import AutoTokenizer

    draft, target = spec_pair
    bad = tmp_path / "draft"
    shutil.copytree(draft, bad)
    tok = AutoTokenizer.from_pretrained(draft)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(bad)
    with pytest.raises(TokenizerMismatchError):
        SpeculativeReasoner(draft=str(bad), target=target)


def test_undecodable_image(reject_all, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="broken.png"):
        reject_all.solve(QUESTION, image=str(bad))
    with pytest.raises(ImageError, match="missing.png"):
        reject_all.solve(QUESTION, image=str(tmp_path / "missing.png"))


def test_question_longer_than_context(reject_all):
    limit = reject_all.target.model.cfg.text.max_position_embeddings
    with pytest.raises(ContextLengthError, match=str(limit)):
        reject_all.solve("why " * (limit + 10))


def test_solve_many_isolates_a_broken_record(loaded, image_file, tmp_path):
    r = _reasoner(loaded, steps=StepConfig(max_step_tokens=8, token_budget=16), alpha=MID_ALPHA)
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    records = [{"id": "a", "question": QUESTION, "answer": "5"},
               {"id": "b", "question": QUESTION, "image": str(bad), "answer": "5"},
               {"id": "c", "question": "What is shown?", "image": image_file}]
    out = tmp_path / "results.jsonl"
    results = r.solve_many(records, output=str(out), progress=False)
    assert [row["status"] for row in results] == ["ok", "failed", "ok"]
    assert [row["id"] for row in results] == ["a", "b", "c"]
    assert "ImageError" in results[1]["error"] and "corrupt.jpg" in results[1]["error"]
    for row in (results[0], results[2]):
        trace = Trace.from_dict(row["trace"])
        assert trace.steps and trace.num_tokens <= 16
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    assert [json.loads(ln)["status"] for ln in lines] == ["ok", "failed", "ok"]


# ---- 7. units ----------------------------------------------------------------------------------------


def test_final_answer_and_boxed():
    assert boxed_answer(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert boxed_answer(r"\boxed{{a}{b}{c}}") == "{a}{b}{c}"
    assert final_answer(r"first \boxed{3} then \boxed{4}.") == "4"  # the last box wins
    assert final_answer(r"first \boxed{3} then \boxed{4") == "3"  # an incomplete box is ignored
    assert final_answer(r"\boxed{12") is None
    assert final_answer(r"\boxed{ 7 }") == "7"
    assert final_answer("The answer is (C).") == "C"
    assert final_answer("Answer: B") == "B"
    assert final_answer(r"Answer: B, but really \boxed{D}") == "D"  # a box beats a letter
    assert final_answer("The Answer is Bob") is None  # a word, not a choice letter
    assert final_answer("no answer here") is None
    assert final_answer("") is None


def test_split_steps():
    assert split_steps("a\n\nb\n\n\n\nc\n\n") == ["a", "b", "c"]
    assert split_steps("  one \n\n two") == ["one", "two"]
    assert split_steps("") == []
    assert split_steps("x|y||z", delimiter="|") == ["x", "y", "z"]


def test_cpn_rho_is_the_keyword_softmax_ratio():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 5, 50)) * 4).astype(np.float32)
    rho = np.asarray(cpn_rho(logits, 7, 11))
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    s = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(rho, s[..., 7] / (s[..., 7] + s[..., 11]), atol=1e-6)
    assert rho.shape == (3, 5) and rho.dtype == np.float32
    # large logits do not overflow; equal keyword logits give 0.5
    big = np.zeros((2, 50), np.float32)
    big[0, 7], big[1, 11] = 1e4, 1e4
    np.testing.assert_allclose(np.asarray(cpn_rho(big, 7, 11)), [1.0, 0.0])
    assert float(cpn_rho(np.zeros(50), 7, 11)) == 0.5


def test_accept_boundaries():
    rho = np.array([0.0, 0.69999, 0.7, 0.70001, 1.0], np.float32)
    np.testing.assert_array_equal(np.asarray(accept(rho, np.float32(0.7))), [False, False, True, True, True])
    assert bool(accept(0.7, 0.7))  # exactly alpha accepts
    assert np.asarray(accept(rho, 0.0)).all()  # alpha = 0 accepts everything
    assert not np.asarray(accept(rho, 1.0 + 1e-6)).any()  # alpha > 1 rejects everything
    assert bool(accept(1.0, 1.0))


def test_keyword_token_ids(loaded):
    tok = loaded[2].tokenizer
    pos, neg = keyword_token_ids(tok)
    assert tok.decode([pos]) == "positive" and tok.decode([neg]) == "negative"
    with pytest.raises(KeywordError, match="definitely correct"):
        keyword_token_ids(tok, Keywords(positive="definitely correct"))
    with pytest.raises(KeywordError, match="share"):
        keyword_token_ids(tok, Keywords(positive="definitely", negative="definitely wrong", policy="first_subtoken"))


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


def test_every_method_has_a_runner():
    from dreamr_jax.speculative.config import METHODS, RUNNERS
    from dreamr_jax.speculative.methods import runner

    assert METHODS == ("target", "draft", "sd", "specreason", "lookahead", "dreamr") == tuple(RUNNERS)
    assert all(callable(runner(m)) for m in METHODS)
    with pytest.raises(ValueError, match="unknown method 'tagret'"):
        runner("tagret")


def test_padded_rows():
    from dreamr_jax.speculative.roles import padded_rows

    ids, lengths = padded_rows([[5, 6, 7], [], [8]], 4)
    assert ids.dtype == lengths.dtype == np.int32
    np.testing.assert_array_equal(ids, [[5, 6, 7, 0], [0, 0, 0, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 0, 1])


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


def test_solves_count_their_compilations(reject_all):
    """`trace.extra["compiles"]` counts the XLA compilations inside a solve (the eval table reports
    them): a new program counts, and repeating a solve whose shapes were all seen compiles nothing."""
    import jax

    from dreamr_jax import compiles

    before = compiles.totals()[0]
    jax.jit(lambda x: x * 3 + 1)(np.arange(5.0))  # a program never seen before
    assert compiles.totals()[0] == before + 1
    reject_all.solve(QUESTION, method="target")
    again = reject_all.solve(QUESTION, method="target")
    assert again.extra["compiles"] == 0 and again.extra["compile_s"] == 0.0


def test_check_warm_up_leaves_nothing_to_compile(loaded, image_file):
    """`warm_up_checks` compiles the packed check for every width bucket (up to 128 tokens) at the
    attended-cache buckets 128 and 256, so a check of any such width compiles nothing later
    (a 1-token judging cue, so that several drafts fit in 64 tokens)."""
    from dreamr_jax import compiles
    from dreamr_jax.generation import _extend_packed

    _extend_packed.clear_cache()  # checks compiled by other tests must not make this pass
    reject_all = _reasoner(loaded, alpha=float("inf"), judge_format="cue", judge_cue="<|im_end|>")
    assert reject_all.warm_up_checks(QUESTION, image_file) >= 16  # 8 widths up to 64 x 2 cache buckets, and more
    eng = reject_all.engine("dreamr")
    enc = reject_all.processor.encode(reject_all.prompt(QUESTION, 1), [image_file])
    ctx = reject_all.target.open(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], capacity=344)
    before = compiles.totals()[0]
    rng = np.random.default_rng(5)
    for lengths in ([3], [9, 4], [17, 11, 2], [30, 12]):
        reject_all.target.set_tokens(ctx, [])
        eng.check_drafts(ctx, [rng.integers(0, 150000, n).tolist() for n in lengths])
    assert compiles.totals()[0] == before

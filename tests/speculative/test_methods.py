"""Greedy exactness of the methods (docs/METHOD.md sections 1-2) on the tiny draft/target pair:
dreamr / specreason / lookahead at reject-all and accept-all settings equal the target and the
draft alone, step by step and token by token; sd's greedy output equals the target's, and its
sampled output follows the target's distribution (the rejection rule as a pure function over
20000 draws, on the device, and end to end on a sharpened pair)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dreamr_jax as dr
from dreamr_jax.generation import forward
from dreamr_jax.speculative import SpeculativeReasoner, StepConfig
from dreamr_jax.speculative.methods import speculative_accept

from helpers.speculative import QUESTION, assert_whole_steps, make_reasoner, step_ids, with_config


# ---- 1. greedy exactness -----------------------------------------------------------------------


# FPSR under each way the target's own steps are scheduled, and with several drafted steps per
# draft call
METHODS_AND_SETTINGS = [("dreamr", {"fallback": "eager"}), ("dreamr", {"fallback": "on_reject"}),
                        ("dreamr", {"fallback": "on_reject", "draft_steps_per_call": 3}), ("specreason", {}),
                        ("lookahead", {})]


@pytest.mark.parametrize("method,settings", METHODS_AND_SETTINGS)
def test_reject_all_equals_target(method, settings, loaded, reject_all, refs):
    if settings:
        reject_all = make_reasoner(loaded, alpha=float("inf"), **settings)
    trace = reject_all.solve(QUESTION, method=method)
    target = refs["target"]
    assert trace.text == target.text
    assert step_ids(trace) == step_ids(target)
    assert all(s.author == "target" for s in trace.steps)
    assert trace.acceptance_rate == 0.0
    assert trace.drafted_checked >= 1
    assert trace.finish_reason == target.finish_reason
    assert_whole_steps(trace, reject_all.engine(method))


@pytest.mark.parametrize("method,settings", METHODS_AND_SETTINGS)
def test_accept_all_equals_draft(method, settings, loaded, accept_all, refs):
    if settings:
        accept_all = make_reasoner(loaded, alpha=0.0, **settings)
    trace = accept_all.solve(QUESTION, method=method)
    draft = refs["draft"]
    assert trace.text == draft.text
    assert step_ids(trace) == step_ids(draft)
    assert all(s.author == "draft" for s in trace.steps)
    assert trace.acceptance_rate == 1.0
    assert trace.drafted_checked == len(draft.steps)
    assert_whole_steps(trace, accept_all.engine(method))


@pytest.mark.parametrize("method", ["target", "draft"])
def test_single_model_calls_cut_steps_and_continue_them(method, loaded, refs):
    """`target` / `draft` alone write whole solutions per decode call; with a 3-token call
    limit every step is cut across calls and continued (the step cap counting its earlier
    tokens), and the trace is the same as with one call for the whole solution."""
    short = make_reasoner(loaded, solo_tokens_per_call=3).solve(QUESTION, method=method)
    calls = [i for i in short.intervals if i.kind == "decode"]
    assert step_ids(short) == step_ids(refs[method]) and short.text == refs[method].text
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
    assert step_ids(trace) == step_ids(refs["target"])
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
    weight = np.array(target.lm_head.weight[...])  # (vocab, hidden)
    noise = np.random.default_rng(0).standard_normal(weight.shape[::-1]).astype(np.float32).T * weight.std()
    target.lm_head.weight[...] = jnp.asarray(weight * 50)
    draft.lm_head.weight[...] = jnp.asarray((weight + 0.3 * noise) * 50)
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
        trace = with_config(r, seed=seed).solve(QUESTION)
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

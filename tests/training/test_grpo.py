"""GRPO pieces against references written from docs/METHOD.md section 5's formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dreamr_jax.training import (chunked_token_logprobs, composite_reward, draft_reward, group_advantages, grpo_loss,
                           length_reward, outcome_reward)


def _reference_loss(logp, old, ref, adv, mask, eps, beta):
    total, n, clipped = 0.0, 0.0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = np.exp(float(logp[b, t]) - float(old[b, t]))
            a = float(adv[b])
            pg = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            d = float(ref[b, t]) - float(logp[b, t])
            total += pg + beta * (np.exp(d) - d - 1)
            n += 1
            clipped += (r > 1 + eps and a > 0) or (r < 1 - eps and a < 0)
    return total / n, clipped / n


def _inputs(seed=0, b=6, t=9):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2.0, 0.5, (b, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.35, (b, t))).astype(np.float32)  # ratios well outside [0.8, 1.2]
    ref = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    adv = rng.normal(0, 1, b).astype(np.float32)
    mask = rng.random((b, t)) < 0.8
    mask[:, 0] = True
    return logp, old, ref, adv, mask


def test_grpo_loss_matches_the_formula_with_clipping_on_both_sides():
    logp, old, ref, adv, mask = _inputs()
    ratio = np.exp(logp - old)
    a = np.broadcast_to(adv[:, None], logp.shape)
    assert ((ratio > 1.2) & (a > 0) & mask).any() and ((ratio < 0.8) & (a < 0) & mask).any()
    loss, metrics = jax.jit(grpo_loss)(logp, old, ref, adv, mask)
    want, clip_fraction = _reference_loss(logp, old, ref, adv, mask, 0.2, 0.01)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), clip_fraction, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_max"]), ratio[mask].max(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_min"]), ratio[mask].min(), rtol=1e-5)
    d = ref - logp
    np.testing.assert_allclose(float(metrics["kl"]), (np.exp(d) - d - 1)[mask].mean(), rtol=1e-5)
    # Other epsilon / beta values go through too.
    loss2, _ = grpo_loss(logp, old, ref, adv, mask, epsilon=0.1, beta=0.5)
    np.testing.assert_allclose(float(loss2), _reference_loss(logp, old, ref, adv, mask, 0.1, 0.5)[0], rtol=1e-5)


def test_grpo_gradient_matches_finite_differences():
    logp, old, ref, adv, mask = _inputs(seed=1, b=3, t=5)
    grad = np.asarray(jax.grad(lambda x: grpo_loss(x, old, ref, adv, mask)[0])(logp))
    h = 1e-3
    for b, t in [(0, 0), (1, 2), (2, 4), (0, 3)]:
        up, down = logp.astype(np.float64).copy(), logp.astype(np.float64).copy()
        up[b, t] += h
        down[b, t] -= h
        fd = (_reference_loss(up, old, ref, adv, mask, 0.2, 0.01)[0]
              - _reference_loss(down, old, ref, adv, mask, 0.2, 0.01)[0]) / (2 * h)
        np.testing.assert_allclose(grad[b, t], fd, rtol=2e-3, atol=1e-6)
    assert np.all(grad[~mask] == 0)


def test_group_advantages():
    r = np.array([1.0, 2.0, 4.0, 1.0, 3.0, 3.0, 3.0, 3.0], np.float32)
    got = np.asarray(group_advantages(r, 4))
    g = r.reshape(2, 4)
    want = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want.ravel(), rtol=1e-5)
    assert np.all(got[4:] == 0)  # all-equal rewards: zero advantage


def test_chunked_logprobs_equal_full_softmax_and_gradients():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 13)))

    def full(h, w):
        return jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), targets[..., None], -1)[..., 0]

    np.testing.assert_allclose(chunked_token_logprobs(hidden, head, targets, chunk=4), full(hidden, head), atol=1e-5)
    g1 = jax.grad(lambda h, w: chunked_token_logprobs(h, w, targets, chunk=4).sum(), argnums=(0, 1))(hidden, head)
    g2 = jax.grad(lambda h, w: full(h, w).sum(), argnums=(0, 1))(hidden, head)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_reward_terms():
    np.testing.assert_array_equal(outcome_reward(["12", "3", None], ["12", "4", "1"]), [1, 0, 0])
    np.testing.assert_allclose(draft_reward([[0.9, 0.2, 0.7], [], [0.1]], alpha=0.7), [2 / 3, 0, 0])
    np.testing.assert_allclose(draft_reward([[0.9, 0.2, 0.7]], soft=True), [0.6], rtol=1e-6)
    np.testing.assert_allclose(length_reward([0, 512, 2048], l_ref=1024), [1, 0.5, 0])
    np.testing.assert_allclose(composite_reward([1, 0], [0.5, 1], [0.25, 0], weights=(1, 2, 4)), [3, 2])

"""Sampling filters against numpy references written from their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamr_jax.sampling import SamplingParams, filter_logits, sample, token_logprob


def numpy_top_p_keep(logits, p):
    """Sort descending; keep tokens until the kept mass reaches p (ties at the boundary kept)."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(cum, p - 1e-7) + 1)
    threshold = probs[order][n_keep - 1]
    return probs >= threshold * (1 - 1e-6)


@pytest.mark.parametrize("p", [0.3, 0.75, 0.95])
def test_top_p_matches_sorted_reference(p):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 1000)).astype(np.float32) * 3
    out = np.asarray(filter_logits(jnp.asarray(logits), SamplingParams(temperature=1.0, top_p=p)))
    for row in range(4):
        assert np.array_equal(np.isfinite(out[row]), numpy_top_p_keep(logits[row], p))


def test_top_k_and_temperature():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    out = np.asarray(filter_logits(jnp.asarray(logits), SamplingParams(temperature=0.5, top_k=5)))
    for row in range(3):
        keep = np.argsort(logits[row])[-5:]
        assert set(np.flatnonzero(np.isfinite(out[row]))) == set(keep)
        np.testing.assert_allclose(out[row, keep], logits[row, keep] / 0.5, rtol=1e-6)


def test_greedy_and_sampled_frequencies():
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]], jnp.float32))
    assert int(sample(logits, jax.random.key(0), SamplingParams())[0]) == 1
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: sample(logits, k, SamplingParams(temperature=1.0))[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.03)


def test_token_logprob():
    logits = np.random.default_rng(2).standard_normal((2, 7)).astype(np.float32)
    tokens = np.array([3, 6])
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(token_logprob(jnp.asarray(logits), jnp.asarray(tokens))),
                               ref[[0, 1], tokens], rtol=1e-5)
    # the decode loop's vocabulary-major layout (V, B) gives the same log-probs
    np.testing.assert_allclose(np.asarray(token_logprob(jnp.asarray(logits.T), jnp.asarray(tokens), vocab_axis=0)),
                               ref[[0, 1], tokens], rtol=1e-5)


def test_bad_params_raise():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_first_argmax_matches_numpy_including_ties():
    from dreamr_jax.sampling import first_argmax

    logits = np.random.default_rng(3).integers(0, 5, (6, 40)).astype(np.float32)  # many ties
    assert np.array_equal(np.asarray(first_argmax(jnp.asarray(logits))), logits.argmax(-1))
    assert np.array_equal(np.asarray(first_argmax(jnp.asarray(logits.T), axis=0)), logits.argmax(-1))


def test_vocab_major_sampling_draws_the_same_tokens():
    """(V, B) logits (`vocab_axis=0`) sample as their (B, V) transpose: same key, same tokens."""
    logits = np.random.default_rng(4).standard_normal((3, 50)).astype(np.float32)
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=10), SamplingParams(1.0, top_p=0.9)):
        key = jax.random.key(5)
        rows = np.asarray(sample(jnp.asarray(logits), key, params))
        assert np.array_equal(np.asarray(sample(jnp.asarray(logits.T), key, params, vocab_axis=0)), rows)

"""The target's verdict on a drafted step (dreamr_jax.speculative.tbvm): rho as the keywords'
softmax ratio, the accept boundary, and the judging keywords' token ids."""

from __future__ import annotations

import numpy as np
import pytest

from dreamr_jax.speculative import accept, cpn_rho
from dreamr_jax.prompts import KeywordError, Keywords, keyword_token_ids


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

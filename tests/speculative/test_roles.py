"""Role helpers and the method registry: padded token rows, a runner for every method."""

from __future__ import annotations

import numpy as np
import pytest


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

"""Splitting a solution into reasoning steps (dreamr_jax.speculative.steps)."""

from __future__ import annotations

from dreamr_jax.speculative import split_steps


def test_split_steps():
    assert split_steps("a\n\nb\n\n\n\nc\n\n") == ["a", "b", "c"]
    assert split_steps("  one \n\n two") == ["one", "two"]
    assert split_steps("") == []
    assert split_steps("x|y||z", delimiter="|") == ["x", "y", "z"]

"""A Qwen3-VL-MoE target on the speculative machinery: with the tiny pair's draft and a tiny
random MoE target (8 experts, top 2, every layer sparse; the real Qwen vocabulary), `dreamr`
keeps its exactness properties: rejecting every drafted step writes the target's own text,
accepting every one writes the draft's."""

from __future__ import annotations

import pytest

import dreamr_jax as dr
from dreamr_jax.bench.models import build_spec_model

from helpers.speculative import QUESTION, assert_whole_steps, make_reasoner, step_ids


@pytest.fixture(scope="module")
def moe_loaded(spec_pair, tmp_path_factory):
    folder = build_spec_model(str(tmp_path_factory.mktemp("moe") / "target"), seed=3, hidden=64, layers=2, experts=8)
    target = dr.load_model(folder)
    assert all(type(layer.mlp).__name__ == "SparseMoE" for layer in target.layers)
    return dr.load_model(spec_pair[0]), target, dr.load_processor(folder)


@pytest.mark.parametrize("alpha,author,reference", [(float("inf"), "target", "target"), (0.0, "draft", "draft")])
def test_dreamr_with_an_moe_target_is_exact(moe_loaded, alpha, author, reference):
    reasoner = make_reasoner(moe_loaded, alpha=alpha)
    ref = reasoner.solve(QUESTION, method=reference)
    trace = reasoner.solve(QUESTION, method="dreamr")
    assert trace.text == ref.text and step_ids(trace) == step_ids(ref)
    assert all(s.author == author for s in trace.steps)
    assert trace.drafted_checked >= 1
    assert_whole_steps(trace, reasoner.engine("dreamr"))
    if reference == "target":  # the MoE target and the dense draft write different text
        assert ref.text != reasoner.solve(QUESTION, method="draft").text

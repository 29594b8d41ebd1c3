"""Compilations inside a solve: counted in the trace, none left after warming the checks up."""

from __future__ import annotations

import numpy as np

from helpers.speculative import QUESTION, make_reasoner


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
    reject_all = make_reasoner(loaded, alpha=float("inf"), judge_format="cue", judge_cue="<|im_end|>")
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

"""The CPN check on the cached prefix (docs/METHOD.md section 3): rho of a batch of candidates and
FPSR's packed check equal a from-scratch forward and transformers; a check leaves the committed
cache as it was."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import dreamr_jax as dr
from dreamr_jax.generation import forward
from dreamr_jax.processing import qwen_tokenizer_dir
from dreamr_jax.speculative import cpn_rho
from dreamr_jax.speculative.config import SpeculationConfig
from dreamr_jax.speculative.methods import StepEngine
from dreamr_jax.speculative.roles import Role

from helpers.models import build_torch_model, tiny_config_dict
from helpers.speculative import QUESTION


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
        assert np.array_equal(np.asarray(k[0, :, :n]), before_k[i]) and np.array_equal(np.asarray(v[0, :, :n]),
                                                                                       before_v[i])
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

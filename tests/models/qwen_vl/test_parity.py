"""Per-component parity of dreamr_jax's Qwen3-VL / Qwen2.5-VL against transformers (the oracle),
in float32 with highest-precision matmuls, on the tiny random checkpoints of tests/conftest.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import vision_utils

from dreamr_jax.loading import load_model
from dreamr_jax.models.qwen_vl.rope_index import (
    get_rope_index,
    mrope_axis_per_frequency,
    position_table_taps,
    prepare_vision_inputs,
    vision_rotary_positions,
    window_order,
)
from dreamr_jax.models.qwen_vl.text import text_rotary

from helpers.models import IMAGE_TOKEN, image_prompt, jax_logits, left_pad, random_image_inputs, torch_logits

FAMILIES = ["qwen3_vl", "qwen2_5_vl"]

VISION_TOL = 1e-5  # merged image tokens and deepstack features
ROTARY_TOL = 1e-6  # text and vision cos/sin tables
TAP_WEIGHT_TOL = 1e-6  # position-table interpolation weights
LAYER_TOL = 1e-5  # one decoder layer
LOGITS_TOL = 1e-4  # full-model logits (at non-padding positions)

TWO_IMAGES = [(1, 4, 6), (1, 8, 4)]


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """{name: (dreamr_jax model, torch model)}."""
    return {name: (load_model(folder), tm) for name, (folder, tm) in tiny_checkpoints.items()}


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ---- vision tower -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_two_images_padded_bucket(models, family):
    model, tm = models[family]
    cfg = model.cfg
    pix, grids = random_image_inputs(TWO_IMAGES, cfg.vision.patch_dim, seed=1)
    n_real = len(pix)
    bucket = n_real + 3 * cfg.vision.merge_unit  # 56 real patches in a bucket of 68
    vin = prepare_vision_inputs(pix, grids, cfg, bucket)
    assert vin.num_valid_tokens == n_real // cfg.vision.merge_unit
    arrays = {k: jnp.asarray(v) for k, v in vin.__dict__.items() if k != "num_valid_tokens"}
    tokens, deepstack = model.encode_images(arrays)
    n = vin.num_valid_tokens

    with torch.no_grad():
        ref = tm.model.visual(torch.tensor(pix), grid_thw=torch.tensor(grids))
    assert tokens.shape == (bucket // cfg.vision.merge_unit, cfg.text.hidden_size)
    err = max_diff(tokens[:n], ref.pooler_output.numpy())
    assert err <= VISION_TOL, f"merged image tokens differ by {err}"

    if family == "qwen3_vl":
        assert len(deepstack) == len(ref.deepstack_features) == len(cfg.vision.deepstack_visual_indexes)
        for i, (ours, theirs) in enumerate(zip(deepstack, ref.deepstack_features)):
            err = max_diff(ours[:n], theirs.numpy())
            assert err <= VISION_TOL, f"deepstack feature {i} differs by {err}"
    else:
        assert deepstack == []


# ---- 3-D text positions -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_index_left_padded_batch(models, family):
    model, tm = models[family]
    rng = np.random.default_rng(2)
    per_row = [[(1, 4, 6)], [(1, 8, 4), (1, 4, 4)], []]  # three images of different sizes, one text-only row
    rows = image_prompt(rng, per_row)
    ids, mask = left_pad(rows)
    assert (~mask).sum(1).min() == 0 and (~mask).any()  # some row is padded, some is not
    grids = np.array([g for row in per_row for g in row], np.int64)

    pos, delta = get_rope_index(ids, mask, grids, image_token_id=IMAGE_TOKEN,
                                spatial_merge_size=model.cfg.vision.spatial_merge_size)
    ref_pos, ref_delta = tm.model.get_rope_index(
        torch.tensor(ids), torch.tensor((ids == IMAGE_TOKEN).astype(np.int64)), torch.tensor(grids),
        attention_mask=torch.tensor(mask.astype(np.int64)))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))
    assert np.all(pos[:, ~mask] == 0)


# ---- rotary tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_text_rotary_tables(models, family):
    model, tm = models[family]
    t = model.cfg.text
    rng = np.random.default_rng(3)
    positions = rng.integers(0, 3000, (3, 2, 11))
    inv_freq = (1.0 / (t.rope_theta ** (np.arange(0, t.head_dim, 2, dtype=np.float32) / t.head_dim))).astype(np.float32)
    rotary = tm.model.language_model.rotary_emb
    assert max_diff(inv_freq, rotary.inv_freq.numpy()) <= 1e-9

    cos, sin = text_rotary(jnp.asarray(positions), inv_freq, mrope_axis_per_frequency(t), jnp.float32)
    with torch.no_grad():
        ref_cos, ref_sin = rotary(torch.zeros(2, 11, t.hidden_size), torch.tensor(positions))
    assert cos.shape == (2, 11, t.head_dim)
    err = max(max_diff(cos, ref_cos.numpy()), max_diff(sin, ref_sin.numpy()))
    assert err <= ROTARY_TOL, f"text rotary differs by {err}"


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_rotary_tables(models, family):
    model, tm = models[family]
    grids = torch.tensor([(1, 4, 6), (1, 8, 4), (2, 6, 10)])
    merge = model.cfg.vision.spatial_merge_size
    ref_pos = vision_utils.get_vision_position_ids(grids, merge)
    pos = vision_rotary_positions(grids.numpy(), merge)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    cos, sin = model.visual.rotary(jnp.asarray(pos))
    with torch.no_grad():
        ref_cos, ref_sin = tm.model.visual.rotary_pos_emb(torch.zeros(len(pos), 1), ref_pos)
    err = max(max_diff(cos, ref_cos.numpy()), max_diff(sin, ref_sin.numpy()))
    assert err <= ROTARY_TOL, f"vision rotary differs by {err}"


# ---- vision index arithmetic (no weights) -------------------------------------------------------

GRID_SETS = [
    [(1, 4, 6), (1, 8, 4)],
    [(2, 6, 10), (1, 2, 2), (1, 16, 8)],
    [(1, 34, 50), (1, 10, 12)],  # real-sized grids
]


@pytest.mark.parametrize("merge", [1, 2])
@pytest.mark.parametrize("grids", GRID_SETS)
def test_vision_position_ids(grids, merge):
    g = torch.tensor(grids)
    np.testing.assert_array_equal(vision_rotary_positions(np.array(grids), merge),
                                  vision_utils.get_vision_position_ids(g, merge).numpy())


@pytest.mark.parametrize("side", [4, 48])  # the tiny config's table, and Qwen3-VL's 2304 = 48^2 entries
@pytest.mark.parametrize("grids", GRID_SETS)
def test_position_table_taps(grids, side):
    idx, wts = position_table_taps(np.array(grids), side, 2)
    ref_idx, ref_wts = vision_utils.get_vision_interpolation_indices_and_weights(
        torch.tensor(grids), side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    assert max_diff(wts, ref_wts.numpy()) <= TAP_WEIGHT_TOL


@pytest.mark.parametrize(
    "window_size,patch_size,grids",
    [
        (16, 4, [(1, 4, 6), (1, 8, 4)]),  # the tiny config: 2x2 merged tokens per window
        (16, 4, [(1, 8, 8), (2, 6, 10), (1, 2, 2)]),  # exact multiples, video-like t=2, a single unit
        (112, 14, [(1, 34, 50), (1, 16, 16), (1, 10, 12)]),  # Qwen2.5-VL's real numbers
    ],
)
def test_window_order(window_size, patch_size, grids):
    from dreamr_jax.models.qwen_vl.config import VisionConfig

    v = VisionConfig(family="qwen2_5_vl", depth=1, hidden_size=8, intermediate_size=8, num_heads=1, hidden_act="silu",
                     in_channels=3, patch_size=patch_size, temporal_patch_size=2, spatial_merge_size=2,
                     out_hidden_size=8, rope_theta=10000.0, window_size=window_size, fullatt_block_indexes=(0,))
    order, lengths = window_order(np.array(grids), v)
    ref_order, ref_cu = vision_utils.get_vision_window_index(
        torch.tensor(grids), spatial_merge_size=2, window_size=window_size, patch_size=patch_size)
    np.testing.assert_array_equal(order, ref_order.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lengths)]), ref_cu.numpy())
    assert all(n > 0 for n in lengths)


# ---- decoder layers -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers(models, family):
    model, tm = models[family]
    t = model.cfg.text
    b, s = 2, 9
    rng = np.random.default_rng(4)
    x = rng.standard_normal((b, s, t.hidden_size)).astype(np.float32)
    positions = torch.tensor(rng.integers(0, 50, (3, b, s)))
    with torch.no_grad():
        cos, sin = tm.model.language_model.rotary_emb(torch.tensor(x), positions)
    causal = np.tril(np.ones((s, s), bool))
    additive = torch.tensor(np.where(causal, 0.0, np.finfo(np.float32).min).astype(np.float32))[None, None].expand(
        b, 1, s, s)
    mask_bsl = jnp.asarray(np.broadcast_to(causal, (b, s, s)))

    for i, layer in enumerate(model.layers):
        out, cache = layer(jnp.asarray(x), jnp.asarray(cos.numpy()), jnp.asarray(sin.numpy()), mask_bsl, None, None)
        assert cache is None
        with torch.no_grad():
            ref = tm.model.language_model.layers[i](torch.tensor(x), attention_mask=additive,
                                                    position_embeddings=(cos, sin))
        ref = ref[0] if isinstance(ref, tuple) else ref
        err = max_diff(out, ref.numpy())
        assert err <= LAYER_TOL, f"decoder layer {i} differs by {err}"


# ---- full logits --------------------------------------------------------------------------------


def assert_logits_match(ours, theirs, mask=None):
    assert ours.shape == theirs.shape
    if mask is not None:
        ours, theirs = ours[mask], theirs[mask]
    err = max_diff(ours, theirs)
    assert err <= LOGITS_TOL, f"logits differ by {err} (reference max |logit| {np.abs(theirs).max():.3f})"


@pytest.mark.parametrize("name", FAMILIES + ["qwen3_vl_tied"])
def test_logits_text_only(models, name):
    model, tm = models[name]
    ids = np.random.default_rng(5).integers(0, 400, (1, 13))
    assert_logits_match(jax_logits(model, ids), torch_logits(tm, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_one_image(models, family):
    model, tm = models[family]
    grids = [(1, 4, 6)]
    pix, g = random_image_inputs(grids, model.cfg.vision.patch_dim, seed=6)
    ids = np.array(image_prompt(np.random.default_rng(6), [grids]))
    assert_logits_match(jax_logits(model, ids, None, pix, g), torch_logits(tm, ids, None, pix, g))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_padded_batch_three_images(models, family):
    model, tm = models[family]
    per_row = [[(1, 8, 4)], [(1, 4, 6), (1, 4, 4)]]
    grids = [g for row in per_row for g in row]
    pix, g = random_image_inputs(grids, model.cfg.vision.patch_dim, seed=7)
    ids, mask = left_pad(image_prompt(np.random.default_rng(7), per_row))
    assert (~mask).any()
    ours = jax_logits(model, ids, mask, pix, g)
    theirs = torch_logits(tm, ids, mask, pix, g)
    assert_logits_match(ours, theirs, mask)

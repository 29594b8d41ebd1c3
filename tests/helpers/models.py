"""Tiny random Qwen-VL models for the parity, loading, generation and quantization tests (built
from dicts, no downloads), image prompts, and full-model logits from dreamr_jax and from the
transformers oracle for the same (possibly padded, possibly multi-image) batch."""

from __future__ import annotations

import numpy as np

VOCAB = 512
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503
EOS = 504


def tiny_config_dict(family: str, *, tie: bool = False, vocab: int = VOCAB, real_token_ids: bool = False) -> dict:
    """A tiny config.json dict in the nested (current transformers) layout."""
    from dreamr_jax.bench.models import QWEN_TOKEN_IDS, qwen3_vl_dict

    ids = (QWEN_TOKEN_IDS if real_token_ids else
           dict(eos_token_id=EOS, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                vision_start_token_id=VISION_START, vision_end_token_id=VISION_END))
    # mrope (2, 3, 3) rather than the factory's (4, 2, 2) for head_dim 16: the split these models
    # were written with, kept so that the parity tests still compare the same models.
    config = qwen3_vl_dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=vocab, tie_word_embeddings=tie,
                           token_ids={k: v for k, v in ids.items() if k != "bos_token_id"}, rope_theta=10000.0,
                           max_position_embeddings=4096, mrope_section=(2, 3, 3),
                           vision=dict(depth=3, intermediate_size=48, patch_size=4, deepstack_visual_indexes=(0, 1)))
    if family == "qwen3_vl":
        return config
    if family == "qwen3_vl_moe":  # the same model with every decoder MLP a mixture of 8 experts, top 2
        return moe_config(config)
    if family == "qwen2_5_vl":
        # The same text model in Qwen2.5-VL's layout (head_dim implied, no interleaved mrope) and its
        # windowed vision tower.
        del config["text_config"]["head_dim"], config["text_config"]["rope_parameters"]["mrope_interleaved"]
        config.update(model_type="qwen2_5_vl", vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, temporal_patch_size=2,
            spatial_merge_size=2, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1],
            hidden_act="silu", tokens_per_second=2,
        ))
        return config
    raise ValueError(family)


def moe_config(qwen3_vl: dict, **changes) -> dict:
    """`dreamr_jax.bench.models.qwen3_vl_moe_dict`: a Qwen3-VL config dict made Qwen3-VL-MoE."""
    from dreamr_jax.bench.models import qwen3_vl_moe_dict

    return qwen3_vl_moe_dict(qwen3_vl, **changes)


def build_torch_model(config_dict: dict, seed: int = 0):
    """transformers' model of `config_dict`, float32, every tensor perturbed
    (`dreamr_jax.bench.models.build_torch_model`), with eager attention: the oracle's plainest path."""
    from dreamr_jax.bench.models import build_torch_model as build

    return build(config_dict, seed=seed, attn_implementation="eager")


def random_image_inputs(grids, patch_dim, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.asarray(grids, np.int64)
    n = int(grids.prod(-1).sum())
    return rng.standard_normal((n, patch_dim)).astype(np.float32), grids


def image_prompt(rng, grids_per_row, merge=2, text_len=(5, 9)):
    """Token rows like the chat template makes them: text, <vision_start> image tokens <vision_end>, text."""
    rows = []
    for grids in grids_per_row:
        row = list(rng.integers(0, 400, rng.integers(*text_len)))
        for t, h, w in grids:
            row += [VISION_START] + [IMAGE_TOKEN] * (t * h * w // merge**2) + [VISION_END]
            row += list(rng.integers(0, 400, rng.integers(*text_len)))
        rows.append(row)
    return rows


# ---- logits of both implementations --------------------------------------------------------------


def jax_logits(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
    """Float32 logits (B, S, V) through the public `dreamr_jax.forward` (which pads the patches
    to a bucket, so padding patches are exercised whenever the count is not a power of two)."""
    import dreamr_jax

    out = dreamr_jax.forward(model, np.asarray(input_ids), attention_mask=attention_mask,
                             pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    return np.asarray(out, np.float32)


def torch_logits(torch_model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
    import torch

    input_ids = np.asarray(input_ids)
    kw = dict(input_ids=torch.tensor(input_ids, dtype=torch.long), use_cache=False)
    if attention_mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(attention_mask).astype(np.int64))
    if pixel_values is not None:
        kw["pixel_values"] = torch.tensor(np.asarray(pixel_values, np.float32))
        kw["image_grid_thw"] = torch.tensor(np.asarray(image_grid_thw, np.int64))
        kw["mm_token_type_ids"] = torch.tensor((input_ids == IMAGE_TOKEN).astype(np.int64))
    with torch.no_grad():
        return torch_model(**kw).logits.float().numpy()


def left_pad(rows, pad_id=0):
    """Token rows -> (ids (B, S), attention mask (B, S) bool), left-padded to the longest row."""
    s = max(len(r) for r in rows)
    ids = np.full((len(rows), s), pad_id, np.int64)
    mask = np.zeros((len(rows), s), bool)
    for b, r in enumerate(rows):
        ids[b, s - len(r):] = r
        mask[b, s - len(r):] = True
    return ids, mask

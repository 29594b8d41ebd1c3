"""Shared by test_qwen_vl_parity.py and test_loading.py: full-model logits from dreamr_jax and
from the transformers oracle for the same (possibly padded, possibly multi-image) batch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import IMAGE_TOKEN


def has_public_forward() -> bool:
    import dreamr_jax

    return callable(getattr(dreamr_jax, "forward", None))


def jax_logits(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *, extra_patches=8):
    """Float32 logits (B, S, V). Uses the public `dreamr_jax.forward` when it exists; otherwise
    assembles the inputs by hand (rope index, padded vision inputs, image gather) and calls
    `model.forward`. `extra_patches`: how far past the real patch count the vision bucket goes
    (hand-built path only), so padding patches are always exercised."""
    import dreamr_jax

    input_ids = np.asarray(input_ids)
    if has_public_forward():
        out = dreamr_jax.forward(model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                 image_grid_thw=image_grid_thw)
        return np.asarray(getattr(out, "logits", out), np.float32)

    from dreamr_jax.models.qwen_vl.rope_index import get_rope_index, prepare_vision_inputs

    cfg = model.cfg
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    positions, _ = get_rope_index(input_ids, mask, image_grid_thw, image_token_id=cfg.image_token_id,
                                  spatial_merge_size=cfg.vision.spatial_merge_size)
    tokens = deepstack = gather = None
    if pixel_values is not None:
        n_real = int(np.asarray(image_grid_thw).prod(-1).sum())
        bucket = n_real + extra_patches
        vin = prepare_vision_inputs(pixel_values, image_grid_thw, cfg, bucket)
        arrays = {k: jnp.asarray(v) for k, v in vin.__dict__.items() if k != "num_valid_tokens"}
        tokens, deepstack = model.encode_images(arrays)
        is_image = (input_ids == cfg.image_token_id) & mask
        gather = np.where(is_image, np.cumsum(is_image.ravel()).reshape(input_ids.shape) - 1, -1).astype(np.int32)
        assert is_image.sum() == vin.num_valid_tokens
        gather = jnp.asarray(gather)
    out = model.forward(jnp.asarray(input_ids), jnp.asarray(mask), jnp.asarray(positions), tokens, deepstack, gather)
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

"""Shared by test_qwen_vl_parity.py and test_loading.py: full-model logits from dreamr_jax and
from the transformers oracle for the same (possibly padded, possibly multi-image) batch."""

from __future__ import annotations

import numpy as np

from conftest import IMAGE_TOKEN


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

"""Host-side index arithmetic for Qwen-VL: 3-D text positions, vision patch positions,
position-table interpolation taps, attention segments and the Qwen2.5-VL window order.

Everything here depends only on token ids and image grids (never on weights), so it is
computed once per request in numpy, padded to the request's bucket, and handed to the
jitted model as plain integer/float arrays. This mirrors transformers' `get_rope_index`
and `transformers.vision_utils` (the oracle for these numbers in the tests).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import QwenVLConfig, TextConfig, VisionConfig


def mrope_axis_per_frequency(text: TextConfig) -> np.ndarray:
    """For each of the head_dim/2 rotary frequencies, which position axis (0=T, 1=H, 2=W) drives it.

    Qwen3-VL interleaves the axes (T H W T H W ... up to the H and W section lengths, then T);
    Qwen2.5-VL uses contiguous sections [T..., H..., W...].
    """
    t_sec, h_sec, w_sec = text.mrope_section
    n = text.head_dim // 2
    axis = np.zeros(n, np.int32)
    if text.mrope_interleaved:
        axis[1 : h_sec * 3 : 3] = 1
        axis[2 : w_sec * 3 : 3] = 2
    else:
        axis[t_sec : t_sec + h_sec] = 1
        axis[t_sec + h_sec : t_sec + h_sec + w_sec] = 2
    return axis


def image_token_counts(image_grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    return grid.prod(-1) // (spatial_merge_size**2)


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D rotary positions (3, B, S) and per-row decode offsets (B,), as transformers builds them.

    Text tokens advance all three axes together; an image of merged grid (t, h, w) starting at
    position p gets T = p, H = p + row, W = p + col, and the text after it starts at
    p + max(h, w). Padding positions get 0. `delta = max position + 1 - valid length`, so the
    k-th generated token (0-based) sits at `valid length + k + delta`.
    Images are consumed from `image_grid_thw` in row-major order of their tokens.
    """
    input_ids = np.asarray(input_ids)
    batch, seq = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g)
                                               for g in np.asarray(image_grid_thw).reshape(-1, 3)]
    m = spatial_merge_size
    positions = np.zeros((3, batch, seq), np.int64)
    deltas = np.zeros((batch,), np.int64)
    next_grid = 0
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        is_image = ids == image_token_id
        pos_list = []
        current = 0
        i = 0
        n = len(ids)
        while i < n:
            if not is_image[i]:
                j = i
                while j < n and not is_image[j]:
                    j += 1
                length = j - i
                pos_list.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
                i = j
                continue
            if next_grid >= len(grids):
                raise ValueError(
                    f"row {b}: found more image token groups than images in image_grid_thw ({len(grids)})"
                )
            t, h, w = grids[next_grid]
            next_grid += 1
            lt, lh, lw = t, h // m, w // m
            count = lt * lh * lw
            if i + count > n or not is_image[i : i + count].all():
                raise ValueError(
                    f"row {b}: image {next_grid - 1} with grid {(t, h, w)} needs {count} consecutive image tokens "
                    f"at position {i}; the prompt has fewer (was the image token expanded with the same grid?)"
                )
            tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
            pos_list.append(np.stack([tt.ravel() + current, hh.ravel() + current, ww.ravel() + current]))
            current += max(h, w) // m
            i += count
        llm = np.concatenate(pos_list, axis=1) if pos_list else np.zeros((3, 0), np.int64)
        positions[:, b, mask[b]] = llm
        deltas[b] = (llm.max() + 1 - n) if n else 0
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts hold {next_grid} image token groups")
    return positions, deltas


def vision_rotary_positions(grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(patches, 2) row/col of each patch, in the merge-block-major order the processor emits."""
    out = []
    m = spatial_merge_size
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).ravel()
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).ravel()
        out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    return np.concatenate(out, 0) if out else np.zeros((0, 2), np.int64)


def position_table_taps(grid_thw: np.ndarray, num_grid_per_side: int, spatial_merge_size: int):
    """Bilinear (align_corners=True) taps into the square learned position table, per patch.

    Returns indices (patches, 4) and weights (patches, 4), the same resampling as
    `F.interpolate(mode="bilinear", align_corners=True)` of the table to each image's grid.
    """
    side = num_grid_per_side
    rows, cols = vision_rotary_positions(grid_thw, spatial_merge_size).T
    heights = np.concatenate([np.full(t * h * w, h) for t, h, w in np.asarray(grid_thw).reshape(-1, 3)])
    widths = np.concatenate([np.full(t * h * w, w) for t, h, w in np.asarray(grid_thw).reshape(-1, 3)])

    def axis(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        dist = np.abs(src[:, None] - floor[:, None] - np.arange(2))
        return taps, np.clip(1 - dist, 0, None).astype(np.float32)

    h_taps, h_w = axis(rows, heights)
    w_taps, w_w = axis(cols, widths)
    idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return idx, wts


def window_order(grid_thw: np.ndarray, vision: VisionConfig):
    """Qwen2.5-VL windowed attention: the merge-unit permutation and each window's length.

    Returns (window_index (units,), window_lengths list in patches), matching
    transformers' `get_vision_window_index`.
    """
    m = vision.spatial_merge_size
    win = vision.window_size // m // vision.patch_size
    unit = m * m
    index_all, lengths = [], []
    offset = 0
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = win - lh % win, win - lw % win
        nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index_all.append(flat[flat != -100] + offset)
        lengths.extend(int(s) * unit for s in seqlens if s > 0)
        offset += t * lh * lw
    return np.concatenate(index_all), lengths


@dataclasses.dataclass
class VisionInputs:
    """Everything the vision tower needs besides weights, padded to `num_patches` (a bucket).

    Padding patches are zeros in a segment of their own, so they never mix with real ones,
    and their merged outputs are never gathered into the text.
    """

    pixel_values: np.ndarray  # (P, patch_dim) float32
    rotary_positions: np.ndarray  # (P, 2) int32, in the tower's processing order
    segment_ids: np.ndarray  # (P,) int32: image index for full attention, -1 for padding
    window_segment_ids: np.ndarray  # (P,) int32: window index (Qwen2.5-VL), = segment_ids for Qwen3-VL
    table_index: np.ndarray  # (P, 4) int32 position-table taps (Qwen3-VL; zeros otherwise)
    table_weight: np.ndarray  # (P, 4) float32
    unit_order: np.ndarray  # (P/unit,) int32: input merge-unit for each processed unit (window order)
    unit_restore: np.ndarray  # (P/unit,) int32: processed position of each input unit
    num_valid_tokens: int  # merged image tokens that are real


def prepare_vision_inputs(
    pixel_values: np.ndarray, image_grid_thw: np.ndarray, cfg: QwenVLConfig, num_patches: int
) -> VisionInputs:
    v = cfg.vision
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values, np.float32)
    n_real = int(grid.prod(-1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (n_real, v.patch_dim):
        raise ValueError(
            f"pixel_values has shape {pixel_values.shape}; image_grid_thw {grid.tolist()} implies "
            f"({n_real}, {v.patch_dim}) (patches, channels*temporal*patch*patch)"
        )
    if num_patches < n_real or num_patches % v.merge_unit:
        raise ValueError(f"patch bucket {num_patches} must be a multiple of {v.merge_unit} and >= {n_real}")
    pad = num_patches - n_real
    unit = v.merge_unit
    n_units, n_real_units = num_patches // unit, n_real // unit

    pixels = np.concatenate([pixel_values, np.zeros((pad, v.patch_dim), np.float32)])
    rot = np.concatenate([vision_rotary_positions(grid, v.spatial_merge_size), np.zeros((pad, 2), np.int64)])
    # Each frame of each image is its own attention segment (transformers' cu_seqlens); images have t == 1.
    seg = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))
    seg = np.concatenate([seg, np.full(pad, -1)])

    if v.family == "qwen3_vl":
        side = int(v.num_position_embeddings**0.5)
        idx, wts = (position_table_taps(grid, side, v.spatial_merge_size) if n_real
                    else (np.zeros((0, 4)), np.zeros((0, 4))))
        idx = np.concatenate([idx, np.zeros((pad, 4), np.int64)])
        wts = np.concatenate([wts, np.zeros((pad, 4), np.float32)])
        order = np.arange(n_units)
        win_seg = seg
    else:
        idx = np.zeros((num_patches, 4), np.int64)
        wts = np.zeros((num_patches, 4), np.float32)
        real_order, lengths = window_order(grid, v) if n_real else (np.zeros(0, np.int64), [])
        order = np.concatenate([real_order, np.arange(n_real_units, n_units)])
        win_seg = np.concatenate([np.repeat(np.arange(len(lengths)), lengths), np.full(pad, -1)])
        # Window order permutes merge units; rotary positions and full-attention segments follow.
        perm = (order[:, None] * unit + np.arange(unit)).ravel()
        pixels, rot, seg = pixels[perm], rot[perm], seg[perm]
    restore = np.argsort(order)
    return VisionInputs(
        pixel_values=pixels.astype(np.float32),
        rotary_positions=rot.astype(np.int32),
        segment_ids=seg.astype(np.int32),
        window_segment_ids=np.asarray(win_seg, np.int32),
        table_index=idx.astype(np.int32),
        table_weight=wts.astype(np.float32),
        unit_order=order.astype(np.int32),
        unit_restore=restore.astype(np.int32),
        num_valid_tokens=n_real_units,
    )

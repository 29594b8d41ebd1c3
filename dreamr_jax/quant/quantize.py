"""Dense Qwen-VL checkpoint -> AutoAWQ "gemm" int4 checkpoint (round to nearest per group, after
AWQ's activation-aware scaling when calibration texts are given).

Every decoder projection (q/k/v/o, gate/up/down) of every text layer is quantized; the vision
tower, embeddings, norms and lm_head are copied unchanged (AutoAWQ leaves them too). Per group of
`group_size` consecutive input features and per output feature, asymmetric 4-bit round to
nearest, as AutoAWQ computes it before its activation-aware search:

    s = max(w_max - w_min, 1e-5) / 15 (rounded to float16),  z = clamp(round(-w_min / s), 0, 15),
    q = clamp(round(w / s) + z, 0, 15),  W ~= (q - z) * s.

With `calibration` texts, AWQ's per-channel scales (`quant.awq`) are searched on the dense model
first and folded into the weights: the projections' columns times s, the norms (and v_proj /
up_proj rows) that produce their inputs divided by s; the float model computes the same, the
int4 one rounds the salient columns more finely.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Sequence

import ml_dtypes
import numpy as np

from ..models.qwen_vl.params import SafetensorsFile, canonical_key, checkpoint_files
from .awq import awq_scales, scale_weights
from .formats import pack_awq

_PROJECTION = re.compile(r"text\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_ST_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
              np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
              np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def awq_config(group_size: int) -> dict:
    """The `quantization_config` AutoAWQ writes for a gemm export (transformers reads it as AwqConfig)."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": ["visual", "lm_head"]}


def quantize_rtn(weight_out_in: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense weight (out, in) -> (q uint8 (in, out), zeros uint8 (groups, out), scales float16 (groups, out))."""
    n_out, n_in = weight_out_in.shape
    if n_in % group_size:
        raise ValueError(f"{n_in} input features do not split into groups of {group_size}; pick a --group-size "
                         "that divides every projection's input size")
    w = weight_out_in.astype(np.float32).reshape(n_out, n_in // group_size, group_size)
    w_max, w_min = w.max(-1), w.min(-1)
    scales = (np.maximum(w_max - w_min, 1e-5) / 15).astype(np.float16)
    s = scales.astype(np.float32)
    zeros = np.clip(np.round(-w_min / s), 0, 15)
    q = np.clip(np.round(w / s[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    return (np.ascontiguousarray(q.reshape(n_out, n_in).T), np.ascontiguousarray(zeros.astype(np.uint8).T),
            np.ascontiguousarray(scales.T))


def _awq_plan(src: str, texts: Sequence[str], max_tokens: int, group_size: int, n_grid: int,
              log) -> tuple[dict, list]:
    from ..loading import load_model
    from ..processing import load_processor

    model = load_model(src, dtype="float32")
    if any(isinstance(t, str) for t in texts):
        tokenizer = load_processor(src).tokenizer
        texts = [tokenizer.encode(t) if isinstance(t, str) else t for t in texts]
    rows = [list(r)[:max_tokens] for r in texts if len(r)]
    if not rows:
        raise ValueError("the calibration texts are empty")
    return awq_scales(model, rows, group_size, n_grid=n_grid, log=log)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """safetensors writer for every dtype the reader knows (bfloat16 included), via a temporary name."""
    header, offset = {}, 0
    arrays = {}
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        if a.dtype not in _ST_DTYPES:
            raise ValueError(f"{key}: dtype {a.dtype} cannot be written to safetensors")
        header[key] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays[key] = a
        offset += a.nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key in sorted(arrays):
            f.write(arrays[key].tobytes())
    os.replace(path + ".tmp", path)


def quantize_checkpoint(src: str, dst: str, *, group_size: int = 128, calibration: Sequence[str] | None = None,
                        calibration_tokens: int = 512, n_grid: int = 20, log=None) -> dict:
    """Write `dst`, the AutoAWQ gemm int4 version of the dense checkpoint folder `src`.

    calibration: texts (or token-id lists) for AWQ's scale search, each cut to `calibration_tokens`; None:
    plain round to nearest. Shards stay shards (same file names, index rewritten); tokenizer and
    processor files are copied. Returns {"quantized": n linears, "copied": n tensors,
    "max_abs_error": float (of the scaled weights), "group_size": ..., "awq": per-group search
    results or None}."""
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise ValueError(f"{src}: already quantized ({config['quantization_config'].get('quant_method')})")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("dst must differ from src")
    plan, searched = {}, None
    if calibration:
        plan, searched = _awq_plan(src, calibration, calibration_tokens, group_size, n_grid, log)
    os.makedirs(dst, exist_ok=True)
    stats = dict(quantized=0, copied=0, max_abs_error=0.0, group_size=group_size, awq=searched)
    weight_map = {}
    for path in checkpoint_files(src):
        reader = SafetensorsFile(path)
        out = {}
        for raw_key in reader.keys():
            array = reader.read(raw_key)
            factors = plan.get(canonical_key(raw_key))
            if factors:
                array = scale_weights(array, factors).astype(array.dtype)
            if _PROJECTION.match(canonical_key(raw_key)):
                q, z, s = quantize_rtn(np.asarray(array), group_size)
                prefix = raw_key[: -len("weight")]
                out.update({prefix + "qweight": pack_awq(q), prefix + "qzeros": pack_awq(z), prefix + "scales": s})
                g = np.repeat(np.arange(q.shape[0] // group_size), group_size)
                err = np.abs((q.astype(np.float32) - z[g]) * s[g].astype(np.float32) - np.asarray(array, np.float32).T)
                stats["max_abs_error"] = max(stats["max_abs_error"], float(err.max()))
                stats["quantized"] += 1
            else:
                out[raw_key] = np.array(array)
                stats["copied"] += 1
        name = os.path.basename(path)
        write_safetensors(os.path.join(dst, name), out)
        weight_map.update({k: name for k in out})
        if log:
            log(f"{name}: {len(out)} tensors written")
    if os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    for name in os.listdir(src):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            continue
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    config["quantization_config"] = awq_config(group_size)
    with open(os.path.join(dst, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
    os.replace(os.path.join(dst, "config.json.tmp"), os.path.join(dst, "config.json"))
    return stats

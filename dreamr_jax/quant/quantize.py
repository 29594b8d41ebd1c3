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

import numpy as np

# Conversion sits above the model: it reads checkpoints like the loader and (for AWQ) runs the
# dense model. Nothing under models/, nor quant.formats / quant.linear, imports this module.
from ..loading import load_model
from ..models.qwen_vl.params import canonical_key, checkpoint_files
from ..processing import load_processor
from ..safetensors_io import SafetensorsFile, write_safetensors
from .awq import awq_scales, scale_weights
from .formats import dequantize, pack_awq, quantize_rtn

__all__ = ["awq_config", "quantize_checkpoint", "quantize_rtn", "write_safetensors"]

_PROJECTION = re.compile(r"text\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def awq_config(group_size: int) -> dict:
    """The `quantization_config` AutoAWQ writes for a gemm export (transformers reads it as AwqConfig)."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": ["visual", "lm_head"]}


def _awq_plan(src: str, texts: Sequence[str], max_tokens: int, group_size: int, n_grid: int,
              log) -> tuple[dict, list]:
    model = load_model(src, dtype="float32")
    if model.cfg.text.num_experts:
        raise ValueError(f"{src}: AWQ's calibration does not support Qwen3-VL-MoE checkpoints (its scale search "
                         "reads each layer's dense MLP); quantize without calibration texts (round to nearest), "
                         "which leaves the experts dense")
    if any(isinstance(t, str) for t in texts):
        tokenizer = load_processor(src).tokenizer
        texts = [tokenizer.encode(t) if isinstance(t, str) else t for t in texts]
    rows = [list(r)[:max_tokens] for r in texts if len(r)]
    if not rows:
        raise ValueError("the calibration texts are empty")
    return awq_scales(model, rows, group_size, n_grid=n_grid, log=log)


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
                err = np.abs(dequantize(q.T, z.T, s.T) - np.asarray(array, np.float32))
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
        _write_json(os.path.join(dst, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})
    for name in os.listdir(src):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            continue
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    config["quantization_config"] = awq_config(group_size)
    _write_json(os.path.join(dst, "config.json"), config)
    return stats


def _write_json(path: str, value) -> None:
    """Via a temporary name and a rename, like the weights: a crash leaves the old file or the new one."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)

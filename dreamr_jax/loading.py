"""`load_model`: a Hugging Face Qwen-VL checkpoint (dense or int4) -> QwenVLModel with its weights."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from .hub import resolve_checkpoint
from .models.qwen_vl.config import QwenVLConfig
from .models.qwen_vl.model import QwenVLModel
from .models.qwen_vl.params import checkpoint_files, int4_plan, load_state
from .quant.formats import parse_quantization_config

_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype '{dtype}' is not one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[dtype]
    return dtype


def read_config_dict(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e


def read_config(path: str) -> QwenVLConfig:
    return QwenVLConfig.from_hf(read_config_dict(path), source=os.path.join(path, "config.json"))


def load_model(path_or_hub_id, dtype="float32", *, sharding_for=None, int4_method: str = "auto") -> QwenVLModel:
    """Load a Qwen3-VL or Qwen2.5-VL checkpoint (config.json + safetensors, one file or shards).

    The model is built abstractly and each tensor is placed as it is read, so memory holds
    one copy of the weights. `sharding_for(path) -> jax.sharding.Sharding | None` places each
    parameter (e.g. on a role's mesh); default: the default device.

    int4 checkpoints (a `quantization_config` in config.json: AutoAWQ "gemm" or compressed-tensors
    "pack-quantized") keep their quantized decoder projections at 4 bits as `Int4Linear`
    (`int4_method`: how they multiply, see `dreamr_jax.quant.linear`); everything the checkpoint
    stores unquantized (vision tower, embeddings, lm_head) loads dense in `dtype`.
    """
    path = resolve_checkpoint(path_or_hub_id)
    config_dict = read_config_dict(path)
    source = os.path.join(path, "config.json")
    cfg = QwenVLConfig.from_hf(config_dict, source=source)
    quant = parse_quantization_config(config_dict.get("quantization_config"), source=source)
    dtype = as_dtype(dtype)
    files = checkpoint_files(path)
    plan = int4_plan(files, quant) if quant is not None else None
    abstract = nnx.eval_shape(lambda: QwenVLModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), int4=plan, int4_method=int4_method))
    model = load_state(abstract, files, dtype=dtype, sharding_for=sharding_for, quant=quant)
    model.checkpoint_path = path
    return model

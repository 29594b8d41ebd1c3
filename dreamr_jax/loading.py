"""`load_model`: a Hugging Face Qwen-VL checkpoint -> QwenVLModel with its weights."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from .hub import resolve_checkpoint
from .models.qwen_vl.config import QwenVLConfig
from .models.qwen_vl.model import QwenVLModel
from .models.qwen_vl.params import checkpoint_files, load_state

_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype '{dtype}' is not one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[dtype]
    return dtype


def read_config(path: str) -> QwenVLConfig:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config_dict = json.load(f)
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    return QwenVLConfig.from_hf(config_dict, source=config_path)


def load_model(path_or_hub_id, dtype="float32", *, sharding_for=None) -> QwenVLModel:
    """Load a Qwen3-VL or Qwen2.5-VL checkpoint (config.json + safetensors, one file or shards).

    The model is built abstractly and each tensor is placed as it is read, so memory holds
    one copy of the weights. `sharding_for(path) -> jax.sharding.Sharding | None` places each
    parameter (e.g. on a role's mesh); default: the default device.
    """
    path = resolve_checkpoint(path_or_hub_id)
    cfg = read_config(path)
    dtype = as_dtype(dtype)
    abstract = nnx.eval_shape(lambda: QwenVLModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    model = load_state(abstract, checkpoint_files(path), dtype=dtype, sharding_for=sharding_for)
    model.checkpoint_path = path
    return model

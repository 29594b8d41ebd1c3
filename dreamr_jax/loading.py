"""`load_model`: a Hugging Face Qwen-VL checkpoint (dense or int4) -> QwenVLModel with its weights."""

from __future__ import annotations

import collections
import fnmatch
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .hub import resolve_checkpoint
from .models.qwen_vl.config import QwenVLConfig
from .models.qwen_vl.model import QwenVLModel
from .models.qwen_vl.params import _QUANT_SUFFIXES, canonical_key, checkpoint_files, int4_plan, load_state
from .quant.formats import QuantFormat, parse_quantization_config
from .safetensors_io import FLOAT_DTYPES, CheckpointError, read_header

_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The stored float dtype -> the dtype `dtype="auto"` keeps on an accelerator.
_AUTO = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def as_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype '{dtype}' is not one of {sorted(_DTYPE_NAMES) + ['auto']}")
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


def weight_files(path: str) -> list[str]:
    """The checkpoint's own weight files: the shards `model.safetensors.index.json` names if it
    exists, else `model*.safetensors` (`model.safetensors`, `model-00001-of-00002.safetensors`).
    Other safetensors in the folder (an `adapter_model.safetensors`, a training state) are not read."""
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return checkpoint_files(path)
    names = sorted(os.listdir(path))
    files = [f for f in names if fnmatch.fnmatch(f, "model*.safetensors")]
    if not files:
        others = [f for f in names if f.endswith(".safetensors")]
        raise CheckpointError(f"{path}: no model*.safetensors weights (and no model.safetensors.index.json)"
                              + (f"; the folder holds only {others}, which are not a model's weights"
                                 if others else ""))
    return [os.path.join(path, f) for f in files]


def check_weight_files(files: list[str], quant: QuantFormat | None) -> dict[str, int]:
    """Headers of every weight file checked (`read_header`), and every tensor the model takes as
    float weights checked to be floating point (an int8 tensor there would be cast to floats
    silently). The int32 / uint8 tensors of an int4 checkpoint's quantized linears (per `quant`)
    are exempt. Returns the number of elements stored in each float dtype."""
    counts: dict[str, int] = collections.Counter()
    not_float = []
    for file in files:
        for key, e in read_header(file).items():
            suffix = canonical_key(key).rpartition(".")[2]
            if (quant is not None and suffix in quant.tensor_suffixes) or suffix in _QUANT_SUFFIXES:
                continue  # quantized-linear tensors: checked by load_state against the quantization_config
            if e["dtype"] not in FLOAT_DTYPES:
                not_float.append(f"{key} ({e['dtype']}, in {os.path.basename(file)})")
            else:
                counts[e["dtype"]] += int(np.prod(e["shape"], dtype=np.int64))
    if not_float:
        raise CheckpointError(
            f"checkpoint {os.path.dirname(files[0])}: tensors that should hold float weights are not floating point "
            f"({len(not_float)}): " + ", ".join(not_float[:10]) + (" ..." if len(not_float) > 10 else "")
            + "; an integer-quantized checkpoint needs its quantization_config in config.json")
    return counts


def auto_dtype(stored: dict[str, int]) -> str:
    """`dtype="auto"`: float32 on CPU; elsewhere the float dtype most of the checkpoint is stored in."""
    if jax.default_backend() == "cpu" or not stored:
        return "float32"
    return _AUTO.get(max(stored, key=stored.get), "float32")


def load_model(path_or_hub_id, dtype="auto", *, sharding_for=None, int4_method: str = "auto") -> QwenVLModel:
    """Load a Qwen3-VL or Qwen2.5-VL checkpoint (config.json + safetensors, one file or shards).

    dtype: "auto" (default) keeps the dtype the checkpoint stores its weights in (bfloat16 for
    Qwen's releases) on an accelerator, and is float32 on CPU, where XLA's float32 matmuls are
    faster than its bfloat16 ones (and the results match transformers' float32 CPU run); or
    "float32" / "bfloat16" / "float16" (or a jnp dtype) for every float parameter.

    The weights are the files `model.safetensors.index.json` names, else `model*.safetensors`;
    other files in the folder are not read. A truncated file, or a non-float tensor where float
    weights belong, is a CheckpointError naming the file and tensor.

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
    files = weight_files(path)
    stored = check_weight_files(files, quant)
    dtype = as_dtype(auto_dtype(stored) if dtype is None or (isinstance(dtype, str) and dtype == "auto") else dtype)
    plan = int4_plan(files, quant) if quant is not None else None
    abstract = nnx.eval_shape(lambda: QwenVLModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), int4=plan,
                                                  int4_method=int4_method))
    model = load_state(abstract, files, dtype=dtype, sharding_for=sharding_for, quant=quant)
    model.checkpoint_path = path
    return model

"""safetensors -> QwenVLModel state, for both checkpoint key layouts.

Keys are first canonicalised (`model.language_model.*` and the older `model.*` both become
text keys, `model.visual.*` and `visual.*` vision keys), then matched one-to-one against
the parameters of an abstract model. Each tensor is read (memory-mapped), transformed
(linear weights transposed, the Conv3d patch kernel flattened) and placed on its device
before the next is read, so the full model never exists twice. Every problem found (missing,
unexpected, wrong shape) is collected and raised together, naming the keys.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from .config import QwenVLConfig
from .model import QwenVLModel


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names every offending file, key and shape."""


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class SafetensorsFile:
    """Memory-mapped reader. We parse the (documented, tiny) header ourselves because
    safetensors' numpy backend cannot return bfloat16, the dtype of every Qwen release."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + n
        self._map = None

    def keys(self):
        return list(self.entries)

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype_name(self, key) -> str:
        return self.entries[key]["dtype"]

    def read(self, key) -> np.ndarray:
        e = self.entries[key]
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor '{key}' has unsupported dtype {e['dtype']}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = e["data_offsets"]
        raw = self._map[self.data_start + start : self.data_start + end]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that are not in {path}: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (and no model.safetensors.index.json)")
    return [os.path.join(path, f) for f in files]


def canonical_key(key: str) -> str:
    """Both layouts -> 'text.*' / 'visual.*' / 'lm_head.*'."""
    for prefix, out in (("model.language_model.", "text."), ("model.visual.", "visual."), ("visual.", "visual."),
                        ("lm_head.", "lm_head."), ("model.", "text.")):
        if key.startswith(prefix):
            return out + key[len(prefix):]
    return key


def checkpoint_key(canonical: str) -> str:
    """A canonical key in the current transformers layout (what error messages show)."""
    head, rest = canonical.split(".", 1)
    return {"text": "model.language_model.", "visual": "model.visual.", "lm_head": "lm_head."}[head] + rest


def _hf_key_for(path: tuple) -> tuple[str, str]:
    """Our state path -> (canonical HF key, transform name)."""
    parts = [str(p) for p in path]
    if parts == ["embed_tokens"]:
        return "text.embed_tokens.weight", "none"
    if parts == ["visual", "pos_embed"]:
        return "visual.pos_embed.weight", "none"
    if parts[:2] == ["visual", "patch_embed"]:
        return "visual.patch_embed.proj." + ("weight" if parts[-1] == "kernel" else "bias"), (
            "conv" if parts[-1] == "kernel" else "none")
    head = "" if parts[0] in ("visual", "lm_head") else "text."
    name = ".".join(parts)
    name = re.sub(r"\bmlp_(\d)\b", r"mlp.\1", name)  # Qwen2.5-VL merger's nn.Sequential indices
    if name.endswith(".kernel"):
        return head + name[: -len("kernel")] + "weight", "linear"
    return head + name, "none"


def _transform(array: np.ndarray, how: str) -> np.ndarray:
    if how == "linear":
        return array.T
    if how == "conv":  # Conv3d (out, C, T, p, p) with kernel == stride is a matmul over flat patches
        return array.reshape(array.shape[0], -1).T
    return array


def load_state(model_abstract: QwenVLModel, files: list[str], *, dtype, sharding_for: Callable | None = None):
    """Fill an abstract model (from `nnx.eval_shape`) with checkpoint tensors. Returns the model."""
    cfg: QwenVLConfig = model_abstract.cfg
    graphdef, abstract_state = nnx.split(model_abstract)
    flat = nnx.to_flat_state(abstract_state)
    wanted = {}
    for path, var in flat:
        key, how = _hf_key_for(path)
        wanted[key] = (path, how, tuple(var.get_value().shape))

    located: dict[str, SafetensorsFile] = {}
    unexpected = []
    readers = [SafetensorsFile(f) for f in files]
    for reader in readers:
        for raw_key in reader.keys():
            key = canonical_key(raw_key)
            if key in wanted:
                located[key] = (reader, raw_key)
            elif key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied checkpoints may still store the head; the embedding is used
            elif key.endswith("inv_freq"):
                continue  # rotary buffers some exports save: recomputed from the config
            else:
                unexpected.append(f"{raw_key} (in {os.path.basename(reader.path)})")
    errors = []
    missing = sorted(checkpoint_key(k) for k in wanted if k not in located)
    if missing:
        errors.append(f"missing tensors ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        errors.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    shape_errors = []
    for key, (reader, raw_key) in located.items():
        path, how, shape = wanted[key]
        src = reader.shape(raw_key)
        got = (src[0], int(np.prod(src[1:]))) if how == "conv" else src
        got = tuple(reversed(got)) if how in ("linear", "conv") else tuple(got)
        if got != shape:
            want = list(reversed(shape)) if how == "linear" else list(shape)
            if how == "conv":
                v = cfg.vision
                want = [v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size]
            shape_errors.append(f"{raw_key}: checkpoint shape {list(src)}, the config implies {want}")
    errors += shape_errors
    if errors:
        raise CheckpointError(f"checkpoint {os.path.dirname(files[0])} does not match the {cfg.model_type} config:\n  " + "\n  ".join(errors))

    values = {}
    for key, (reader, raw_key) in located.items():
        path, how, _ = wanted[key]
        host = np.ascontiguousarray(_transform(reader.read(raw_key), how)).astype(dtype)
        sharding = sharding_for(path) if sharding_for is not None else None
        values[path] = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
        del host
    for path, var in flat:
        var.set_value(values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _untransform(array: np.ndarray, how: str, hf_shape_hint=None) -> np.ndarray:
    if how == "linear":
        return array.T
    if how == "conv":
        return array.T.reshape(hf_shape_hint)
    return array


def save_state(model: QwenVLModel, folder: str, config_dict: dict, *, dtype=None) -> None:
    """Write the model as a Hugging Face checkpoint (config.json + model.safetensors, current
    `model.language_model.*` / `model.visual.*` layout) that transformers and `load_model` read.

    Files are written to temporary names and renamed, so a crash never leaves a half checkpoint.
    """
    from safetensors.numpy import save_file

    cfg: QwenVLConfig = model.cfg
    v = cfg.vision
    conv_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, how = _hf_key_for(path)
        hf_key = checkpoint_key(key)
        array = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            array = array.astype(dtype)
        tensors[hf_key] = np.ascontiguousarray(_untransform(array, how, conv_shape))
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "model.safetensors")
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    config_path = os.path.join(folder, "config.json")
    with open(config_path + ".tmp", "w") as f:
        json.dump(config_dict, f, indent=2)
    os.replace(config_path + ".tmp", config_path)

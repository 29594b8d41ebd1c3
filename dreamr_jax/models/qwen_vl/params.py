"""safetensors -> QwenVLModel state, for both checkpoint key layouts, dense or int4.

Keys are first canonicalised (`model.language_model.*` and the older `model.*` both become
text keys, `model.visual.*` and `visual.*` vision keys), then matched one-to-one against
the parameters of an abstract model. Each tensor is read (memory-mapped), transformed
(the Conv3d patch kernel flattened; linear weights are (out, in) in both) and placed on its device
before the next is read, so the full model never exists twice. Every problem found (missing,
unexpected, wrong shape) is collected and raised together, naming the keys.

int4 checkpoints (AutoAWQ gemm, compressed-tensors pack-quantized; see `quant/formats.py`):
`int4_plan` reads the headers and lists the decoder projections stored quantized, so the model
is built with `Int4Linear` exactly there; their tensors are converted to the packed device
layout as they are read. A quantized linear the model holds dense (a vision tower or head a
tool quantized) is dequantized on load.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...quant.formats import Int4Tensors, QuantFormat, from_awq, from_compressed, to_awq
from ...quant.linear import Int4Weight, int4_linears
from ...safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from .config import QwenVLConfig
from .model import QwenVLModel

__all__ = ["CheckpointError", "SafetensorsFile", "canonical_key", "checkpoint_files", "checkpoint_key", "int4_plan",
           "load_state", "save_state"]


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
        return "visual.patch_embed.proj." + parts[-1], "conv" if parts[-1] == "weight" else "none"
    head = "" if parts[0] in ("visual", "lm_head") else "text."
    if len(parts) > 1 and parts[-2] == "experts":  # stacked MoE experts (E, 2I, H) / (E, H, I)
        return head + ".".join(parts), "experts"
    name = ".".join(parts)
    name = re.sub(r"\bmlp_(\d)\b", r"mlp.\1", name)  # Qwen2.5-VL merger's nn.Sequential indices
    return head + name, "none"


def _transform(array: np.ndarray, how: str, shape: tuple | None = None) -> np.ndarray:
    if how == "experts":  # the released (E, H, 2I) / (E, I, H) layout, as transformers' Transpose(1, 2)
        return array if tuple(array.shape) == tuple(shape) else np.swapaxes(array, 1, 2)
    if how == "conv":  # Conv3d (out, C, T, p, p) with kernel == stride is a matmul over flat patches
        return array.reshape(array.shape[0], -1)
    return array


# Tensor names of quantized linears in any supported format (a dense config holding them is an error).
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                   "weight_g_idx")
_DECODER_PROJECTION = re.compile(r"text\.(layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))$")
# One expert's projection in the per-expert layout (Qwen2/3-MoE exports): stacked on load.
_PER_EXPERT = re.compile(r"(text\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def int4_plan(files: list[str], fmt: QuantFormat) -> dict[str, int]:
    """The decoder projections a checkpoint stores quantized -> their group sizes, from headers only
    ({"layers.0.self_attn.q_proj": 128, ...}: what `QwenVLModel(int4=...)` takes)."""
    shapes, located = {}, {}
    for reader in (SafetensorsFile(f) for f in files):
        for raw_key in reader.keys():
            key = canonical_key(raw_key)
            shapes[key] = reader.shape(raw_key)
            located[key] = (reader, raw_key)
    plan = {}
    for key in shapes:
        module, _, suffix = key.rpartition(".")
        m = _DECODER_PROJECTION.match(module)
        if m is None or suffix != fmt.packed_suffix:
            continue
        if fmt.kind == "awq":
            n_in = shapes[key][0]
            scales = shapes.get(module + ".scales")
            groups = scales[0] if scales else (n_in // fmt.group_size if fmt.group_size else 1)
        else:
            n_in = shapes[key][1] * 8
            if module + ".weight_shape" in shapes:
                reader, raw = located[module + ".weight_shape"]
                n_in = int(np.asarray(reader.read(raw)).reshape(-1)[1])
            scale = shapes.get(module + ".weight_scale")
            groups = (scale[1] if len(scale) > 1 else 1) if scale else (n_in // fmt.group_size if fmt.group_size else 1)
        reader, raw = located[key]
        if groups < 1 or n_in % groups or (n_in // groups) % 2:
            raise CheckpointError(f"{os.path.basename(reader.path)}: {raw}: {n_in} input features in {groups} groups "
                                  "is not supported (groups must be equal and of even size)")
        plan[m.group(1)] = n_in // groups
    return plan


def _int4_presence_errors(fmt: QuantFormat, module: str, tensors: dict) -> list[str]:
    """Missing / unsupported tensors of one quantized linear, named by checkpoint key and file."""
    packed = fmt.packed_suffix
    required = ("qweight", "qzeros", "scales") if fmt.kind == "awq" else ("weight_packed", "weight_scale")
    if packed not in tensors:
        found = ", ".join(f"{raw} (in {os.path.basename(r.path)})" for r, raw in tensors.values())
        return [f"{checkpoint_key(module)}.{packed} is missing" + (f" (found only {found})" if found else "")]
    reader, raw = tensors[packed]
    prefix = raw[: -len(packed)]
    errors = [f"{prefix}{s} is missing: {os.path.basename(reader.path)} holds {raw} but no file holds its {s}"
              for s in required if s not in tensors]
    if "weight_g_idx" in tensors:
        errors.append(f"{prefix}weight_g_idx: activation reordering (g_idx) is not supported")
    return errors


def _read_int4(fmt: QuantFormat, tensors: dict, out_in: tuple[int, int]) -> Int4Tensors:
    """One quantized linear's tensors -> Int4Tensors (a CheckpointError names the file and key)."""
    reader, raw = tensors[fmt.packed_suffix]
    read = lambda s: tensors[s][0].read(tensors[s][1]) if s in tensors else None  # noqa: E731
    what = f"{os.path.basename(reader.path)}: {raw[: -len(fmt.packed_suffix) - 1]}"
    try:
        if fmt.kind == "awq":
            return from_awq(read("qweight"), read("qzeros"), read("scales"), what=what)
        shape = read("weight_shape")
        return from_compressed(read("weight_packed"), read("weight_scale"), read("weight_zero_point"),
                               out_in if shape is None else shape, what=what)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def load_state(model_abstract: QwenVLModel, files: list[str], *, dtype, sharding_for: Callable | None = None,
               quant: QuantFormat | None = None):
    """Fill an abstract model (from `nnx.eval_shape`) with checkpoint tensors. Returns the model.

    quant: the checkpoint's parsed `quantization_config` (None: dense); the model's `Int4Linear`s
    (built from `int4_plan`) take the quantized tensors."""
    cfg: QwenVLConfig = model_abstract.cfg
    graphdef, abstract_state = nnx.split(model_abstract)
    flat = nnx.to_flat_state(abstract_state)
    wanted = {}
    int4_wanted: dict[str, dict] = {}  # module key -> {"qweight" | "scales" | "zeros": (path, shape)}
    for path, var in flat:
        if isinstance(var, Int4Weight):
            module = _hf_key_for(tuple(path[:-1]) + ("weight",))[0][: -len(".weight")]
            int4_wanted.setdefault(module, {})[str(path[-1])] = (path, tuple(var.get_value().shape))
            continue
        key, how = _hf_key_for(path)
        wanted[key] = (path, how, tuple(var.get_value().shape))
    if int4_wanted and quant is None:
        raise ValueError("the model holds Int4Linear layers; pass the checkpoint's QuantFormat as `quant`")

    located: dict[str, SafetensorsFile] = {}
    quant_located: dict[str, dict] = {}  # module key -> {suffix: (reader, raw key)}
    per_expert: dict[str, dict] = {}  # "text.layers.N.mlp.experts" -> {(expert, projection): (reader, raw key)}
    unexpected, stray_quant = [], []
    readers = [SafetensorsFile(f) for f in files]
    for reader in readers:
        for raw_key in reader.keys():
            key = canonical_key(raw_key)
            module, _, suffix = key.rpartition(".")
            expert = _PER_EXPERT.match(key)
            if key in wanted:
                located[key] = (reader, raw_key)
            elif expert and expert.group(1) + ".down_proj" in wanted:
                per_expert.setdefault(expert.group(1), {})[int(expert.group(2)), expert.group(3)] = (reader, raw_key)
            elif key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied checkpoints may still store the head; the embedding is used
            elif key.endswith("inv_freq"):
                continue  # rotary buffers some exports save: recomputed from the config
            elif quant is not None and suffix in quant.tensor_suffixes:
                quant_located.setdefault(module, {})[suffix] = (reader, raw_key)
            else:
                unexpected.append(f"{raw_key} (in {os.path.basename(reader.path)})")
                if suffix in _QUANT_SUFFIXES:
                    stray_quant.append(raw_key)
    # Experts stored one by one: stacked into the fused arrays (every expert's three projections needed).
    stacked, expert_errors = _per_expert_plan(wanted, located, per_expert, unexpected)
    if len(expert_errors) > 20:
        expert_errors = expert_errors[:20] + [f"... and {len(expert_errors) - 20} more expert tensors"]
    # Linears the model holds dense but the checkpoint stores quantized: dequantized on load.
    dequant_dense = {key: key[: -len(".weight")] for key in wanted
                     if key.endswith(".weight") and key not in located and key[: -len(".weight")] in quant_located}
    errors = expert_errors
    quantized_experts = sorted(m for m in quant_located if ".mlp.experts." in m + ".")
    if quantized_experts:
        errors.append("int4 MoE experts are not supported (dense experts only): "
                      + ", ".join(checkpoint_key(m) for m in quantized_experts[:3])
                      + (" ..." if len(quantized_experts) > 3 else ""))
        quant_located = {m: t for m, t in quant_located.items() if m not in quantized_experts}
    if stray_quant:
        errors.append("the checkpoint holds quantized tensors "
                      f"({', '.join(stray_quant[:3])}{' ...' if len(stray_quant) > 3 else ''}) "
                      + ("but config.json has no quantization_config" if quant is None else
                         f"that the {quant.kind} format does not use"))
    for module in quant_located:
        if module not in int4_wanted and module not in dequant_dense.values():
            unexpected += [f"{raw} (in {os.path.basename(r.path)})" for r, raw in quant_located[module].values()]
    for module in sorted(set(int4_wanted) | set(dequant_dense.values())):
        errors += _int4_presence_errors(quant, module, quant_located.get(module, {}))
    missing = sorted(checkpoint_key(k) for k in wanted if k not in located and k not in dequant_dense
                     and k not in stacked)
    if missing:
        errors.append(f"missing tensors ({len(missing)}): " + ", ".join(missing[:20])
                      + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        errors.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected[:20])
                      + (" ..." if len(unexpected) > 20 else ""))
    shape_errors = []
    for key, (reader, raw_key) in located.items():
        path, how, shape = wanted[key]
        src = reader.shape(raw_key)
        got = (src[0], int(np.prod(src[1:]))) if how == "conv" else tuple(src)
        if how == "experts" and len(got) == 3 and (got[0], got[2], got[1]) == shape:
            continue  # the released layout, transposed on read
        if got != shape:
            want = list(shape)
            if how == "conv":
                v = cfg.vision
                want = [v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size]
            shape_errors.append(f"{raw_key}: checkpoint shape {list(src)}, the config implies {want}")
    for module, fields in int4_wanted.items():
        tensors = quant_located.get(module, {})
        (n_out, half_in), groups = fields["qweight"][1], fields["scales"][1][1]
        n_in = 2 * half_in
        expect = ({"qweight": [n_in, n_out // 8], "qzeros": [groups, n_out // 8], "scales": [groups, n_out]}
                  if quant.kind == "awq"
                  else {"weight_packed": [n_out, -(-n_in // 8)], "weight_scale": [n_out, groups]})
        for suffix, want in expect.items():
            if suffix in tensors:
                reader, raw_key = tensors[suffix]
                src = list(reader.shape(raw_key))
                if src != want and not (suffix == "weight_scale" and groups == 1 and src == [n_out]):
                    shape_errors.append(f"{raw_key}: checkpoint shape {src}, the config implies {want}")
    errors += shape_errors
    if errors:
        raise CheckpointError(f"checkpoint {os.path.dirname(files[0])} does not match the {cfg.model_type} config:\n  "
                              + "\n  ".join(errors))

    def place(path, host):
        sharding = sharding_for(path) if sharding_for is not None else None
        values[path] = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)

    values = {}
    for key, (reader, raw_key) in located.items():
        path, how, shape = wanted[key]
        place(path, np.ascontiguousarray(_transform(reader.read(raw_key), how, shape)).astype(dtype))
    for key, parts in stacked.items():
        path = wanted[key][0]
        read = [np.stack([r.read(raw) for r, raw in column]) for column in parts]
        place(path, np.ascontiguousarray(np.concatenate(read, axis=1)).astype(dtype))
    for module, fields in int4_wanted.items():
        (n_out, half_in) = fields["qweight"][1]
        t = _read_int4(quant, quant_located[module], (n_out, 2 * half_in))
        for name in ("qweight", "scales", "zeros"):
            place(fields[name][0], getattr(t, name))
    for key, module in dequant_dense.items():
        path, _, (n_out, n_in) = wanted[key]
        t = _read_int4(quant, quant_located[module], (n_out, n_in))
        if t.shape != (n_in, n_out):
            raise CheckpointError(f"{checkpoint_key(module)}: quantized weight of shape (in, out) {list(t.shape)}, "
                                  f"the config implies {[n_in, n_out]}")
        place(path, np.ascontiguousarray(t.dequantize().T).astype(dtype))  # (out, in), as `Linear` holds it
    for path, var in flat:
        var.set_value(values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _per_expert_plan(wanted: dict, located: dict, per_expert: dict, unexpected: list) -> tuple[dict, list]:
    """For fused expert arrays the checkpoint stores expert by expert: {wanted key: [column of
    (reader, raw key) per expert, ...]} (gate_up_proj: the gate column then the up column,
    concatenated along the output axis; down_proj: one column), and the errors naming every
    missing or misshapen expert tensor. Expert tensors past the model's count are unexpected."""
    stacked, errors = {}, []
    for module, tensors in per_expert.items():
        n_experts, hidden, inner = wanted[module + ".down_proj"][2]  # (E, H, I)
        for (e, proj), (reader, raw) in sorted(tensors.items()):
            if e >= n_experts:
                unexpected.append(f"{raw} (in {os.path.basename(reader.path)})")
        layout = {".gate_up_proj": (("gate_proj", "up_proj"), (inner, hidden)), ".down_proj": (("down_proj",),
                                                                                               (hidden, inner))}
        for suffix, (projections, shape) in layout.items():
            key = module + suffix
            if key in located:  # the fused array is there: its per-expert copies are extra
                unexpected += [f"{raw} (in {os.path.basename(reader.path)})"
                               for (e, proj), (reader, raw) in sorted(tensors.items())
                               if proj in projections and e < n_experts]  # (the others: listed above)
                continue
            columns = []
            for proj in projections:
                column = []
                for e in range(n_experts):
                    name = f"{checkpoint_key(module)}.{e}.{proj}.weight"
                    if (e, proj) not in tensors:
                        errors.append(f"{name} is missing (the checkpoint stores this layer's experts one by one)")
                        continue
                    reader, raw = tensors[e, proj]
                    if tuple(reader.shape(raw)) != shape:
                        errors.append(f"{raw}: checkpoint shape {list(reader.shape(raw))}, the config implies "
                                      f"{list(shape)}")
                    column.append(tensors[e, proj])
                columns.append(column)
            stacked[key] = columns
    return stacked, errors


def _untransform(array: np.ndarray, how: str, hf_shape_hint=None) -> np.ndarray:
    if how == "conv":
        return array.reshape(hf_shape_hint)
    return array


def save_state(model: QwenVLModel, folder: str, config_dict: dict, *, dtype=None) -> None:
    """Write the model as a Hugging Face checkpoint (config.json + model.safetensors, current
    `model.language_model.*` / `model.visual.*` layout) that transformers and `load_model` read.

    Files are written to temporary names and renamed, so a crash never leaves a half checkpoint.
    """
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
    # Int4Linear layers are written in AutoAWQ gemm format (the config must say so).
    group_sizes = set()
    for path, layer in int4_linears(model):
        module = checkpoint_key(_hf_key_for(tuple(path) + ("weight",))[0])[: -len(".weight")]
        t = Int4Tensors(*(np.asarray(jax.device_get(getattr(layer, n)[...])) for n in ("qweight", "scales", "zeros")))
        tensors.update({f"{module}.{k}": v for k, v in to_awq(t).items()})
        group_sizes.add(layer.group_size)
    if group_sizes:
        qc = config_dict.get("quantization_config") or {}
        if qc.get("quant_method") != "awq" or group_sizes != {qc.get("group_size")}:
            raise ValueError(f"the model holds int4 layers (group sizes {sorted(group_sizes)}): config_dict needs "
                             "an AWQ quantization_config with that one group_size "
                             "(see dreamr_jax.quant.quantize.awq_config)")
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, metadata={"format": "pt"})
    config_path = os.path.join(folder, "config.json")
    with open(config_path + ".tmp", "w") as f:
        json.dump(config_dict, f, indent=2)
    os.replace(config_path + ".tmp", config_path)

"""int4 (AWQ / compressed-tensors) loading and Int4Linear: unpacking against independent numpy
references, logits of int4 checkpoints against the same weights stored dense, memory, errors,
scripts/quantize.py and scripts/bench_gpu.py --smoke."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dreamr_jax.generation import generate_from_ids
from dreamr_jax.loading import load_model
from dreamr_jax.models.qwen_vl.params import CheckpointError
from dreamr_jax.quant import (Int4Linear, UnsupportedQuantizationError, from_awq, from_compressed, int4_linears,
                              pack_awq, set_int4_method, state_bytes, to_awq, unpack_awq, unpack_ct)
from dreamr_jax.quant.quantize import quantize_checkpoint

from helpers import REPO_ROOT
from helpers.models import image_prompt, jax_logits, random_image_inputs

ROOT = REPO_ROOT
LOGITS_TOL = 1e-4
GROUP = 32  # tiny models: 64- and 96-wide inputs -> 2 and 3 groups (an odd count)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


# ---- independent references: one nibble at a time, as the formats document them ------------------------

# AutoAWQ's unpack (vLLM / AutoAWQ `reverse_awq_order`): shift out nibble j of each int32, then the
# logical column k of a word sits at nibble REVERSE[k].
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def ref_unpack_awq(packed: np.ndarray) -> np.ndarray:
    words = packed.astype(np.int64) & 0xFFFFFFFF
    rows, n = packed.shape
    out = np.zeros((rows, n * 8), np.int64)
    for c in range(n):
        for k in range(8):
            out[:, 8 * c + k] = (words[:, c] >> (4 * AWQ_REVERSE_ORDER[k])) & 0xF
    return out


def ref_pack_ct(values_signed: np.ndarray, axis: int = 1) -> np.ndarray:
    """compressed-tensors pack_to_int32 for 4 bits: +8 offset, 8 per int32 along `axis`, in order, zero padded."""
    v = values_signed.astype(np.int64) + 8
    if axis == 0:
        v = v.T
    rows, cols = v.shape
    n = -(-cols // 8)
    words = np.zeros((rows, n), np.int64)
    for j in range(cols):
        words[:, j // 8] |= v[:, j] << (4 * (j % 8))
    words = words.astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(words.T) if axis == 0 else words


def ref_unpack_ct(packed: np.ndarray, cols: int) -> np.ndarray:
    """-> signed values (rows, cols)."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((packed.shape[0], cols), np.int64)
    for j in range(cols):
        out[:, j] = ((words[:, j // 8] >> (4 * (j % 8))) & 0xF) - 8
    return out


def ref_dequant_awq(qweight, qzeros, scales) -> np.ndarray:
    """-> W (in, out) float32, W = (q - z) * s with groups along the input axis."""
    q, z = ref_unpack_awq(qweight), ref_unpack_awq(qzeros)
    group = q.shape[0] // scales.shape[0]
    g = np.arange(q.shape[0]) // group
    return ((q - z[g]) * scales.astype(np.float32)[g]).astype(np.float32)


def random_words(rng, shape) -> np.ndarray:
    return rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32).view(np.int32)


# ---- unpacking ----------------------------------------------------------------------------------------


def test_awq_pack_order_documented_example():
    # AutoAWQ packs column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i] into nibble i.
    word = pack_awq(np.arange(8, dtype=np.uint8)[None])[0, 0]
    assert [(int(word) >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    np.testing.assert_array_equal(unpack_awq(np.array([[word]], np.int32)), np.arange(8)[None])


def test_unpack_awq_matches_reference():
    rng = np.random.default_rng(0)
    packed = random_words(rng, (37, 5))
    # every nibble position takes every value somewhere, the sign bit included
    packed[0, :] = np.array([0x76543210, 0xFEDCBA98, -1, 0, 0x0F0F0F0F], np.int64).astype(np.uint32).view(np.int32)
    np.testing.assert_array_equal(unpack_awq(packed), ref_unpack_awq(packed))
    np.testing.assert_array_equal(pack_awq(unpack_awq(packed)), packed)


@pytest.mark.parametrize("n_in,n_out,groups", [(96, 40, 3), (30, 16, 5), (64, 8, 1)])
def test_from_awq_matches_reference(n_in, n_out, groups):
    rng = np.random.default_rng(n_in)
    qweight, qzeros = random_words(rng, (n_in, n_out // 8)), random_words(rng, (groups, n_out // 8))
    scales = rng.uniform(0.001, 0.1, (groups, n_out)).astype(np.float16)
    t = from_awq(qweight, qzeros, scales)
    assert t.qweight.shape == (n_out, n_in // 2) and t.qweight.dtype == np.uint8
    assert t.group_size == n_in // groups
    np.testing.assert_array_equal(t.dequantize(), ref_dequant_awq(qweight, qzeros, scales))


@pytest.mark.parametrize("zero_point", ["packed", "unpacked", None])
@pytest.mark.parametrize("n_out,n_in,groups", [(20, 36, 3), (16, 64, 1), (24, 80, 5)])
def test_from_compressed_matches_reference(n_out, n_in, groups, zero_point):
    rng = np.random.default_rng(n_out * n_in)
    q = rng.integers(-8, 8, (n_out, n_in))
    packed = ref_pack_ct(q)
    np.testing.assert_array_equal(unpack_ct(packed, n_in).astype(np.int64) - 8, ref_unpack_ct(packed, n_in))
    scale = rng.uniform(0.001, 0.1, (n_out, groups)).astype(np.float16)
    zp = rng.integers(-8, 8, (n_out, groups))
    stored_zp = {"packed": ref_pack_ct(zp, axis=0), "unpacked": zp.astype(np.int8), None: None}[zero_point]
    if zero_point == "packed":
        assert stored_zp.shape == (-(-n_out // 8), groups)
    t = from_compressed(packed, scale, stored_zp, np.array([n_out, n_in]))
    g = np.arange(n_in) // (n_in // groups)
    zz = zp if zero_point else np.zeros_like(zp)
    want = ((ref_unpack_ct(packed, n_in) - zz[:, g]) * scale.astype(np.float32)[:, g]).astype(np.float32)
    np.testing.assert_array_equal(t.dequantize(), want.T)


@pytest.mark.parametrize("method", ["dequant", "reduce", "int4dot", "u4dequant", "u4dot", "pallas", "auto"])
@pytest.mark.parametrize("lead", [(1,), (3,), (3, 5), (40,)])
def test_int4_linear_methods(method, lead):
    rng = np.random.default_rng(1)
    n_in, n_out, groups = 96, 64, 3  # 64 outputs: two Pallas blocks
    t = from_awq(random_words(rng, (n_in, n_out // 8)), random_words(rng, (groups, n_out // 8)),
                 rng.uniform(0.001, 0.1, (groups, n_out)).astype(np.float16))
    layer = Int4Linear(n_in, n_out, group_size=n_in // groups, bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0),
                       method=method)
    for name in ("qweight", "scales", "zeros"):
        getattr(layer, name).set_value(jnp.asarray(getattr(t, name)))
    bias = rng.standard_normal(n_out).astype(np.float32)
    layer.bias.set_value(jnp.asarray(bias))
    x = rng.standard_normal((*lead, n_in)).astype(np.float32)
    want = x.astype(np.float64) @ t.dequantize().astype(np.float64) + bias
    got = np.asarray(jax.jit(lambda x: layer(x))(x))
    assert got.shape == (*lead, n_out)
    assert layer.resolved_method(int(np.prod(lead))) == ("dequant" if np.prod(lead) > 4 or method == "auto" else method)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())



@pytest.mark.parametrize("rows,block_out,k_splits", [(1, 32, 1), (3, 64, 3), (8, 32, 3), (2, None, None)])
def test_pallas_gemv_tilings(rows, block_out, k_splits):
    """Every (block_out, k_splits) tiling bench_gpu.py sweeps computes the same product (Pallas interpreter)."""
    from dreamr_jax.quant import pallas_gemv

    rng = np.random.default_rng(rows)
    n_in, n_out, groups = 96, 64, 3
    t = from_awq(random_words(rng, (n_in, n_out // 8)), random_words(rng, (groups, n_out // 8)),
                 rng.uniform(0.001, 0.1, (groups, n_out)).astype(np.float16))
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    want = x.astype(np.float64) @ t.dequantize().astype(np.float64)
    got = pallas_gemv.int4_gemv(jnp.asarray(x), jnp.asarray(t.qweight), jnp.asarray(t.scales), jnp.asarray(t.zeros),
                                group_size=n_in // groups, block_out=block_out, k_splits=k_splits, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_pallas_gemv_lowers_to_triton_for_cuda():
    """Cross-lowered on CPU: the kernel must go to Triton. Since jax 0.10 a bare pallas_call on GPU
    goes to Mosaic GPU, which stages whole operands in shared memory and fails on these shapes."""
    from dreamr_jax.quant import pallas_gemv

    n_in, n_out, group = 25600, 5120, 128  # a 32B down projection
    assert pallas_gemv.plan(n_out, n_in // group) == (64, 8)
    args = (jax.ShapeDtypeStruct((1, n_in), jnp.bfloat16), jax.ShapeDtypeStruct((n_out, n_in // 2), jnp.uint8),
            jax.ShapeDtypeStruct((n_out, n_in // group), jnp.float16),
            jax.ShapeDtypeStruct((n_out, n_in // group), jnp.float16))
    fn = jax.jit(lambda x, q, s, z: pallas_gemv.int4_gemv(x, q, s, z, group_size=group))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "grid_x = 80" in text and "grid_y = 8" in text


# ---- checkpoints ---------------------------------------------------------------------------------------


def probe(model):
    grids = [(1, 4, 6)]
    pix, g = random_image_inputs(grids, model.cfg.vision.patch_dim, seed=5)
    ids = np.array(image_prompt(np.random.default_rng(5), [grids]))
    return ids, None, pix, g


def write_dense_copy(src: str, dst: str, tensors: dict, config_edit=None) -> str:
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    if config_edit is not None:
        config = config_edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def awq_dequantized_dense(awq_folder: str, dst: str) -> str:
    """The AWQ checkpoint with every quantized linear replaced by its dense weight (out, in) = ((q - z) s).T,
    computed by the reference unpacker above."""
    tensors = load_file(os.path.join(awq_folder, "model.safetensors"))
    dense = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            prefix = key[: -len("qweight")]
            w = ref_dequant_awq(value, tensors[prefix + "qzeros"], tensors[prefix + "scales"])
            dense[prefix + "weight"] = np.ascontiguousarray(w.T)
        elif not key.endswith((".qzeros", ".scales")):
            dense[key] = value
    return write_dense_copy(awq_folder, dst, dense)


@pytest.fixture(scope="module")
def awq_pair(tiny_checkpoints, tmp_path_factory):
    """{family: (awq folder, dense-dequantized folder)} for Qwen3-VL and Qwen2.5-VL (q/k/v bias)."""
    out = {}
    for family in ("qwen3_vl", "qwen2_5_vl"):
        folder, _ = tiny_checkpoints[family]
        base = tmp_path_factory.mktemp(f"awq_{family}")
        stats = quantize_checkpoint(folder, str(base / "awq"), group_size=GROUP)
        assert stats["quantized"] == 3 * len(PROJECTIONS)
        out[family] = (str(base / "awq"), awq_dequantized_dense(str(base / "awq"), str(base / "dense")))
    return out


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_awq_logits_match_dequantized_dense(awq_pair, family):
    awq_folder, dense_folder = awq_pair[family]
    with open(os.path.join(awq_folder, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["visual", "lm_head"]}
    q, d = load_model(awq_folder), load_model(dense_folder)
    layers = int4_linears(q)
    assert len(layers) == 3 * len(PROJECTIONS)  # every decoder projection, nothing else
    assert {".".join(map(str, p[-2:])) for p, _ in layers} == set(PROJECTIONS)
    assert not int4_linears(d)
    assert q.layers[0].mlp.down_proj.n_groups == 96 // GROUP == 3
    inputs = probe(q)
    want = jax_logits(d, *inputs)
    for method in ("auto", "dequant", "reduce", "int4dot", "u4dequant", "u4dot") if family == "qwen3_vl" else ("auto",):
        set_int4_method(q, method, small_rows=10**6)  # every call through `method`, not only decode-sized ones
        got = jax_logits(q, *inputs)
        assert np.abs(got - want).max() <= LOGITS_TOL, method

    # decode (one row at a time: the small-row path) gives the dense model's greedy tokens
    rows = [list(r) for r in inputs[0]]
    kw = dict(pixel_values=inputs[2], image_grid_thw=inputs[3], max_new_tokens=8, stop_ids=())
    dense = generate_from_ids(d, rows, **kw)
    for method in (("auto", "reduce", "int4dot", "u4dequant", "u4dot", "pallas") if family == "qwen3_vl"
                   else ("pallas",)):
        set_int4_method(q, method, small_rows=4)
        out = generate_from_ids(q, rows, **kw)
        assert out.token_ids == dense.token_ids, method
        np.testing.assert_allclose(out.logprobs, dense.logprobs, atol=1e-4, err_msg=method)


def test_int4_memory_at_most_0_3_of_float16(awq_pair):
    awq_folder, dense_folder = awq_pair["qwen3_vl"]
    q, d16 = load_model(awq_folder, dtype="float16"), load_model(dense_folder, dtype="float16")
    int4_bytes = sum(getattr(m, n)[...].nbytes for _, m in int4_linears(q) for n in ("qweight", "scales", "zeros"))
    f16_bytes = 0
    for path, _ in int4_linears(q):
        layer = d16
        for p in path:
            layer = layer[p] if isinstance(p, int) else getattr(layer, p)
        assert layer.weight[...].dtype == jnp.float16
        f16_bytes += layer.weight[...].nbytes
    assert int4_bytes == state_bytes(q)["int4"] and f16_bytes == state_bytes(q)["int4_as_float16"]
    ratio = int4_bytes / f16_bytes
    print(f"int4 projections {int4_bytes} B vs float16 {f16_bytes} B: {ratio:.3f}x (group size {GROUP})")
    assert ratio <= 0.3
    assert state_bytes(q)["total"] < state_bytes(d16)["total"]


def test_save_state_round_trip(awq_pair, tmp_path):
    from dreamr_jax.models.qwen_vl.params import save_state

    awq_folder, _ = awq_pair["qwen2_5_vl"]
    q = load_model(awq_folder)
    with open(os.path.join(awq_folder, "config.json")) as f:
        config = json.load(f)
    save_state(q, str(tmp_path / "again"), config)
    again = load_model(str(tmp_path / "again"))
    a = {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(q))}
    b = {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(again))}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    with pytest.raises(ValueError, match="quantization_config"):
        save_state(q, str(tmp_path / "bad"), {k: v for k, v in config.items() if k != "quantization_config"})


def ct_config(ignore):
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ignore, "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                          "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                      "strategy": "group", "group_size": GROUP, "actorder": None,
                                                      "dynamic": False}}}}


def test_compressed_tensors_symmetric_with_quantized_head_and_vision(tiny_checkpoints, tmp_path):
    """Symmetric pack-quantized (no zero point), written with the reference packer; lm_head and one vision
    linear quantized too (the model holds those dense: dequantized on load)."""
    folder, _ = tiny_checkpoints["qwen3_vl"]
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    extra = ("lm_head", "model.visual.blocks.0.mlp.linear_fc1")
    ct, dense = {}, {}
    rng = np.random.default_rng(3)
    for key, value in tensors.items():
        module = key[: -len(".weight")]
        if key.endswith(".weight") and (any(module.endswith(p) for p in PROJECTIONS) and ".layers." in key
                                        or module in extra):
            n_out, n_in = value.shape
            groups = n_in // GROUP
            w = value.reshape(n_out, groups, GROUP)
            scale = (np.abs(w).max(-1) / 7.5 * rng.uniform(0.8, 1.2, (n_out, groups))).astype(np.float16)
            q = np.clip(np.round(w / scale.astype(np.float32)[..., None]), -8, 7).reshape(n_out, n_in)
            ct[module + ".weight_packed"] = ref_pack_ct(q)
            ct[module + ".weight_scale"] = scale
            ct[module + ".weight_shape"] = np.array([n_out, n_in], np.int64)
            g = np.arange(n_in) // GROUP
            dense[key] = (q * scale.astype(np.float32)[:, g]).astype(np.float32)
        else:
            ct[key] = dense[key] = value
    ct_folder = write_dense_copy(folder, str(tmp_path / "ct"), ct,
                                 lambda c: dict(c, quantization_config=ct_config(["re:.*visual.*(attn|merger).*"])))
    dense_folder = write_dense_copy(folder, str(tmp_path / "dense"), dense)
    q, d = load_model(ct_folder), load_model(dense_folder)
    assert len(int4_linears(q)) == 3 * len(PROJECTIONS)
    assert q.layers[2].self_attn.q_proj.zeros[...].min() == q.layers[2].self_attn.q_proj.zeros[...].max() == 8
    np.testing.assert_array_equal(np.asarray(q.lm_head.weight[...]), np.asarray(d.lm_head.weight[...]))
    inputs = probe(q)
    assert np.abs(jax_logits(q, *inputs) - jax_logits(d, *inputs)).max() <= LOGITS_TOL


def test_compressed_tensors_asymmetric_equals_awq(awq_pair, tmp_path):
    """The AWQ checkpoint's own q / z / s rewritten as asymmetric pack-quantized (zero points packed along
    the output axis) loads to the same device tensors and logits."""
    awq_folder, _ = awq_pair["qwen3_vl"]
    tensors = load_file(os.path.join(awq_folder, "model.safetensors"))
    ct = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            prefix = key[: -len("qweight")]
            q = ref_unpack_awq(value).T  # (out, in), 0..15
            z = ref_unpack_awq(tensors[prefix + "qzeros"]).T  # (out, groups)
            ct[prefix + "weight_packed"] = ref_pack_ct(q - 8)
            ct[prefix + "weight_zero_point"] = ref_pack_ct(z - 8, axis=0)
            ct[prefix + "weight_scale"] = np.ascontiguousarray(tensors[prefix + "scales"].T)
            ct[prefix + "weight_shape"] = np.array(q.shape, np.int64)
        elif not key.endswith((".qzeros", ".scales")):
            ct[key] = value
    config = ct_config(["lm_head", "re:.*visual.*"])
    config["config_groups"]["group_0"]["weights"]["symmetric"] = False
    ct_folder = write_dense_copy(awq_folder, str(tmp_path / "ct"), ct, lambda c: dict(c, quantization_config=config))
    a, b = load_model(awq_folder), load_model(ct_folder)
    for (pa, la), (pb, lb) in zip(int4_linears(a), int4_linears(b)):
        assert pa == pb
        for name in ("qweight", "scales", "zeros"):
            np.testing.assert_array_equal(np.asarray(getattr(la, name)[...]), np.asarray(getattr(lb, name)[...]))
    inputs = probe(a)
    np.testing.assert_array_equal(jax_logits(a, *inputs), jax_logits(b, *inputs))


# ---- errors --------------------------------------------------------------------------------------------


def edited_copy(src, dst, config_edit=None, tensor_edit=None):
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if tensor_edit is not None:
        tensors = tensor_edit(tensors)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config_edit is not None:
        config = config_edit(copy.deepcopy(config))
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def _set(path, value):
    def edit(config):
        node = config["quantization_config"]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return config
    return edit


@pytest.mark.parametrize("edit,named", [
    (_set(["version"], "gemv"), "gemv"),
    (_set(["version"], "exllama"), "exllama"),
    (_set(["version"], "gemv_fast"), "gemv_fast"),
    (_set(["bits"], 8), "bits=8"),
    (_set(["quant_method"], "gptq"), "gptq"),
    (_set(["quant_method"], "bitsandbytes"), "bitsandbytes"),
    (_set(["zero_point"], False), "zero_point"),
    (lambda c: dict(c, quantization_config=dict(ct_config([]), format="naive-quantized")), "naive-quantized"),
    (lambda c: _set(["config_groups", "group_0", "weights", "num_bits"], 8)(dict(c, quantization_config=ct_config([]))),
     "8-bit"),
    (lambda c: _set(["config_groups", "group_0", "input_activations"], {"num_bits": 8})(
        dict(c, quantization_config=ct_config([]))), "input_activations"),
    (lambda c: _set(["config_groups", "group_0", "weights", "actorder"], "group")(
        dict(c, quantization_config=ct_config([]))), "actorder"),
])
def test_unsupported_quantization_config(awq_pair, tmp_path, edit, named):
    awq_folder, _ = awq_pair["qwen3_vl"]
    bad = edited_copy(awq_folder, str(tmp_path / "bad"), config_edit=edit)
    with pytest.raises(UnsupportedQuantizationError) as e:
        load_model(bad)
    assert named in str(e.value) and "config.json" in str(e.value)


def test_missing_scales_names_key_and_file(awq_pair, tmp_path):
    awq_folder, _ = awq_pair["qwen3_vl"]
    key = "model.language_model.layers.1.mlp.down_proj.scales"
    bad = edited_copy(awq_folder, str(tmp_path / "bad"), tensor_edit=lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert key in str(e.value) and "model.safetensors" in str(e.value)


def test_missing_compressed_tensors_scale(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["qwen3_vl"]
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    key = "model.language_model.layers.0.self_attn.k_proj.weight"
    w = tensors.pop(key)
    prefix = key[: -len("weight")]
    tensors[prefix + "weight_packed"] = ref_pack_ct(np.zeros(w.shape, np.int64))
    tensors[prefix + "weight_shape"] = np.array(w.shape, np.int64)  # and no weight_scale
    bad = write_dense_copy(folder, str(tmp_path / "bad"), tensors, lambda c: dict(c, quantization_config=ct_config([])))
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert prefix + "weight_scale" in str(e.value) and "model.safetensors" in str(e.value)


def test_quantized_tensors_without_quantization_config(awq_pair, tmp_path):
    awq_folder, _ = awq_pair["qwen3_vl"]
    bad = edited_copy(awq_folder, str(tmp_path / "bad"),
                      config_edit=lambda c: {k: v for k, v in c.items() if k != "quantization_config"})
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_model(bad)


def test_quantize_rejects_group_size_that_does_not_divide(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["qwen3_vl"]
    with pytest.raises(ValueError, match="group"):
        quantize_checkpoint(folder, str(tmp_path / "q"), group_size=128)  # 64-wide inputs


def test_quantize_script_cli(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["qwen3_vl"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "quantize.py"), folder, str(tmp_path / "q"),
                          "--group-size", "16"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "quantized 21 linears" in out.stdout
    assert load_model(str(tmp_path / "q")).layers[0].mlp.down_proj.group_size == 16


def test_bench_gpu_smoke(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_gpu.py"), "--smoke", "--json",
                          str(out_json)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    for shape in doc["args"]["shapes"]:
        for kind in ("dense", "int4"):
            assert doc["decode"][shape][kind]["ms_per_step"] > 0 and doc["decode"][shape][kind]["floor_ms"] > 0
        assert doc["decode"][shape]["int4-pallas"]["ms_per_step"] > 0
        assert doc["decode"][shape]["torch"]["ms_per_step"] > 0
    assert doc["projection"]["speedup"]["0.5"] > 0 and doc["projection"]["speedup"]["0.7"] > 0
    assert set(doc["matmul"]["down"]) >= {"dense", "dequant", "reduce", "int4dot"}
    assert doc["matmul"]["down"]["best_pallas"].startswith("pallas:")  # the tiling sweep ran
    assert doc["decode"]["tiny"]["int4-pallas"]["ms_per_step"] > 0


def test_bench_gpu_projection_formula():
    """The FPSR projection against its limits: free draft and checks give 1 / (lambda (1 - a)); a draft
    as slow as the target gives no speedup on accepted steps."""
    from dreamr_jax.bench.gpu import projection

    assert projection(0.0, 1.0, 0.0, 64, (0.5, 0.7))["0.7"] == pytest.approx(1 / 0.3)
    assert projection(0.0, 1.0, 0.0, 64, (0.526,), 0.886)["0.526"] == pytest.approx(1 / (0.474 * 0.886))
    # t_d = t_t, t_c = 8 ms, L = 10: accepted step max(10, 8) = 10, rejected max(10, 18) = 18.
    assert projection(1.0, 1.0, 8.0, 10, (0.5,))["0.5"] == pytest.approx(10 / (0.5 * 10 + 0.5 * 18))


# ---- AWQ activation-aware scaling ----------------------------------------------------------------------


def ref_fake_quant(w_out_in: np.ndarray, group: int) -> np.ndarray:
    """Round to nearest per group of input features, written from the formula in quant/quantize.py."""
    out = np.empty_like(w_out_in, dtype=np.float32)
    for o in range(w_out_in.shape[0]):
        for g0 in range(0, w_out_in.shape[1], group):
            w = w_out_in[o, g0:g0 + group].astype(np.float32)
            s = np.float32(np.float16(max(w.max() - w.min(), 1e-5) / 15))
            z = np.clip(np.round(-w.min() / s), 0, 15)
            out[o, g0:g0 + group] = (np.clip(np.round(w / s) + z, 0, 15) - z) * s
    return out


def test_awq_search_scales_up_the_salient_channels():
    from dreamr_jax.quant.awq import fake_quantize, search_scale

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, [3, 40]] *= 30.0  # two outlier input channels, as LLM activations have
    w = [rng.standard_normal((48, 64)).astype(np.float32), rng.standard_normal((32, 64)).astype(np.float32)]
    np.testing.assert_allclose(fake_quantize(w[0], 32), ref_fake_quant(w[0], 32), atol=1e-6)
    found = search_scale(x, np.abs(x).mean(0), w, group_size=32)
    assert found.ratio is not None and found.loss < 0.5 * found.rtn_loss
    assert found.scale[[3, 40]].min() > np.median(found.scale)  # the outliers get the largest scales
    w_all = np.concatenate(w)  # the reported loss, recomputed with the reference rounding
    loss = np.mean(((x / found.scale) @ ref_fake_quant(w_all * found.scale, 32).T - x @ w_all.T) ** 2)
    assert abs(loss - found.loss) <= 1e-5 * found.rtn_loss
    # all-equal activations: nothing to protect, plain round to nearest stays (never worse)
    flat = search_scale(np.ones((16, 64), np.float32), np.ones(64, np.float32), w, group_size=32)
    assert flat.loss <= flat.rtn_loss


def test_awq_scale_folding_keeps_the_float_model(tmp_path):
    """Every group's factors folded into a dense checkpoint (v_proj -> o_proj included: no GQA
    here, and v_proj has a bias in Qwen2.5-VL) leave the logits unchanged."""
    from helpers.models import build_torch_model, tiny_config_dict
    from dreamr_jax.models.qwen_vl.params import canonical_key
    from dreamr_jax.quant.awq import GROUPS, scale_weights

    config = tiny_config_dict("qwen2_5_vl")
    config["text_config"]["num_key_value_heads"] = 4
    build_torch_model(config, seed=3).save_pretrained(tmp_path / "dense")
    src = str(tmp_path / "dense")
    rng = np.random.default_rng(1)
    plan = {}
    for i in range(3):
        for producer, readers in GROUPS:
            n = 96 if producer == "mlp.up_proj" else 64
            s = np.exp(rng.uniform(-1, 1, n)).astype(np.float32)
            for r in readers:
                plan.setdefault(f"text.layers.{i}.{r}.weight", []).append((1, s))
            plan.setdefault(f"text.layers.{i}.{producer}.weight", []).append((0, 1 / s))
            plan.setdefault(f"text.layers.{i}.{producer}.bias", []).append((0, 1 / s))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    touched = {k for k in tensors if canonical_key(k) in plan}
    assert len(touched) == 3 * (2 + 7 + 1)  # per layer: 2 norms, 7 projections, the v_proj bias
    folded = {k: scale_weights(v, plan[canonical_key(k)]) if k in touched else v for k, v in tensors.items()}
    write_dense_copy(src, str(tmp_path / "folded"), folded)
    a, b = load_model(src), load_model(str(tmp_path / "folded"))
    inputs = probe(a)
    want = jax_logits(a, *inputs)
    assert np.abs(jax_logits(b, *inputs) - want).max() <= LOGITS_TOL * max(1.0, np.abs(want).max())


def test_awq_checkpoint_beats_round_to_nearest(tiny_checkpoints, tmp_path):
    """A model whose norms make two outlier channels: AWQ-scaled int4 logits are closer to the
    dense model's than round-to-nearest int4 on held-out inputs, and still load as int4."""
    folder, _ = tiny_checkpoints["qwen3_vl"]
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    for key in tensors:
        if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            tensors[key] = tensors[key].copy()
            tensors[key][[5, 50]] *= 25.0
    src = write_dense_copy(folder, str(tmp_path / "outliers"), tensors)
    rng = np.random.default_rng(2)
    calibration = [list(rng.integers(0, 400, 48)) for _ in range(8)]
    stats = quantize_checkpoint(src, str(tmp_path / "awq"), group_size=GROUP, calibration=calibration)
    quantize_checkpoint(src, str(tmp_path / "rtn"), group_size=GROUP)
    assert sum(g["ratio"] is not None for g in stats["awq"]) >= 3  # 2 groups per layer under GQA, 3 layers
    assert all(g["loss"] <= g["rtn_loss"] for g in stats["awq"])
    dense = load_model(src)
    inputs = probe(dense)
    want = jax_logits(dense, *inputs)
    awq = load_model(str(tmp_path / "awq"))
    assert len(int4_linears(awq)) == 3 * len(PROJECTIONS)
    err_awq = np.abs(jax_logits(awq, *inputs) - want).mean()
    err_rtn = np.abs(jax_logits(load_model(str(tmp_path / "rtn")), *inputs) - want).mean()
    print(f"int4 mean |logit error|: AWQ {err_awq:.4g}, round to nearest {err_rtn:.4g}")
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


def tiny_random_model(seed: int):
    from helpers.models import tiny_config_dict
    from dreamr_jax.models.qwen_vl import QwenVLConfig, QwenVLModel

    return QwenVLModel(QwenVLConfig.from_hf(tiny_config_dict("qwen3_vl")), rngs=nnx.Rngs(seed))


def test_awq_capture_leaves_models_alone_and_runs_in_threads():
    """Recording wraps the projections of a clone: the model and the Linear class are untouched,
    and two models recorded in two threads at once get what each gets alone."""
    import threading

    from dreamr_jax.models.qwen_vl.text import Linear
    from dreamr_jax.quant.awq import capture_activations

    call = Linear.__call__
    models = [tiny_random_model(seed) for seed in (0, 1)]
    rows = [[list(np.random.default_rng(s).integers(0, 400, 24)) for _ in range(2)] for s in (0, 1)]
    alone = [capture_activations(m, r, max_rows=16, seed=4) for m, r in zip(models, rows)]
    assert len(alone[0]) == 3 * 4 and alone[0]["layers.2.mlp.down_proj"][0].shape == (16, 96)
    assert all(type(getattr(getattr(layer, b), n)) is Linear for m in models for layer in m.layers
               for b, n in (p.split(".") for p in PROJECTIONS))
    assert Linear.__call__ is call
    together = [None, None]

    def record(i):
        for _ in range(2):  # overlapping runs
            together[i] = capture_activations(models[i], rows[i], max_rows=16, seed=4)

    threads = [threading.Thread(target=record, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Linear.__call__ is call
    for got, want in zip(together, alone):
        assert got.keys() == want.keys()
        for k in want:
            for a, b in zip(got[k], want[k]):
                np.testing.assert_array_equal(a, b, err_msg=k)


def test_one_dequantize_for_host_and_device():
    """`formats.dequantize` serves numpy (Int4Tensors, AWQ, the quantizer) and jax (Int4Linear) alike."""
    from dreamr_jax.quant.formats import dequantize, quantize_rtn

    rng = np.random.default_rng(3)
    scales = rng.uniform(0.001, 0.1, (3, 64)).astype(np.float16)
    t = from_awq(random_words(rng, (96, 8)), random_words(rng, (3, 8)), scales)
    want = ref_dequant_awq(*to_awq(t).values())
    np.testing.assert_array_equal(t.dequantize(), want)
    layer = Int4Linear(96, 64, group_size=32, bias=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
    for name in ("qweight", "scales", "zeros"):
        getattr(layer, name).set_value(jnp.asarray(getattr(t, name)))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: layer.dequantize())()), want)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    q, z, s = quantize_rtn(w, 32)
    np.testing.assert_array_equal(dequantize(q.T, z.T, s.T), ref_fake_quant(w, 32))


def _imports(path: str, module: str) -> set[str]:
    """dreamr_jax modules `path` imports, at module level or inside functions."""
    import ast

    base = module.split(".")[:-1] if not path.endswith("__init__.py") else module.split(".")
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module
            if node.level:  # relative: up level - 1 packages from this module's package
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m and m.startswith("dreamr_jax")}


def test_quant_layering():
    """models/ builds on quant.formats / quant.linear (leaves); the conversion code (quant.quantize,
    quant.awq) builds on the model and the loader: nothing below imports it, and no cycle."""
    pkg = os.path.join(ROOT, "dreamr_jax")
    graph = {}
    for folder, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                graph[name] = _imports(path, name)
    graph = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")} for m, deps in graph.items()}
    conversion = {"dreamr_jax.quant.quantize", "dreamr_jax.quant.awq"}
    leaves = ("dreamr_jax.quant", "dreamr_jax.quant.formats", "dreamr_jax.quant.linear", "dreamr_jax.quant.pallas_gemv")
    for m, deps in graph.items():
        if m.startswith("dreamr_jax.models") or m in leaves:
            assert not deps & conversion, (m, deps & conversion)
        if m in leaves:
            assert not any(d.startswith("dreamr_jax.models") for d in deps), (m, deps)
    assert graph["dreamr_jax.safetensors_io"] <= {"dreamr_jax"}, graph["dreamr_jax.safetensors_io"]

    def on_a_cycle(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d == start:
                    return True
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return False

    cycles = [m for m in graph if m.startswith(("dreamr_jax.quant", "dreamr_jax.models", "dreamr_jax.loading",
                                                 "dreamr_jax.safetensors_io")) and on_a_cycle(m)]
    assert not cycles, cycles

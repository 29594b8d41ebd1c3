"""dreamr_jax.costmodel: FLOPs and bytes of one decoder layer, vision block and head against counts
written by hand, the roofline's bound, tensor parallelism, presets and files, bad input, and the
H100 32B decode that BENCHMARKS.md measured. No model is loaded (the shipped asset's config.json and
safetensors header are read)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import pytest

from dreamr_jax import assets
from dreamr_jax import costmodel as cm
from dreamr_jax.costmodel import CostModelError

# A made-up model small enough to count by hand: q = heads * head_dim = 8, kv = kv_heads * head_dim = 4.
TOY = cm.ModelSpec(
    name="toy", hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32, tied=True,
    vision_depth=2, vision_hidden=4, vision_intermediate=8, vision_heads=1, patch_dim=12, merge=2, vision_out=8,
    deepstack=1,
)
TOY_INT4 = dataclasses.replace(TOY, weight_bits=4, group_size=4)  # 8 inputs -> 2 groups, 16 inputs -> 4
# Round numbers for a hand-priced roofline: 1e3 FLOP/s and 1e2 bytes/s after the efficiencies.
TOY_HW = cm.Hardware(name="toy", peak_flops=2e3, mem_bandwidth=4e2, memory=1e6, link_bandwidth=10.0,
                     flops_efficiency=0.5, bandwidth_efficiency=0.25, call_overhead_s=1.0, token_overhead_s=0.5,
                     link_latency_s=0.125)


# ---- one decoder layer, one vision block, the head: hand counts --------------------------------------


def test_decoder_layer_bf16_by_hand():
    # 6 new tokens over 2 rows (3 each), 5 cached per row: keys per query 5 + (3 + 1) / 2 = 7,
    # keys read per row 5 + 3 = 8.
    c = cm.layer_count(TOY, tokens=6, rows=2, cached=5)
    projections = 2 * 6 * 8 * (8 + 2 * 4) + 2 * 6 * 8 * 8  # q, k, v: 1536; o: 768
    attention = 2 * 6 * 7 * 8 * 2  # 1344
    mlp = 2 * 6 * 3 * 8 * 16  # 4608
    assert c.flops == projections + attention + mlp == 8256
    assert c.weight_bytes == 2 * (64 + 32 + 32 + 64 + 3 * 128) == 1152  # q, k, v, o, gate/up/down at 2 bytes
    assert c.kv_bytes == 2 * 8 * (2 * 4) * 2 + 6 * (2 * 4) * 2 == 352  # read 2 rows x 8 keys, write 6
    assert c.act_bytes == 2 * 6 * (4 * 8 + 2 * 8 + 2 * 4 + 3 * 16) == 1248
    assert c.allreduce_bytes == 0 and c.allreduces == 0


def test_decoder_layer_int4_by_hand():
    c = cm.layer_count(TOY_INT4, tokens=6, rows=2, cached=5)
    # 0.5 byte per weight + (2-byte scale + 1-byte zero) per group of 4 inputs per output feature
    q = 8 * 8 / 2 + 8 * 2 * 3  # 80
    k = v = 8 * 4 / 2 + 4 * 2 * 3  # 40
    o = 8 * 8 / 2 + 8 * 2 * 3  # 80
    gate = up = 8 * 16 / 2 + 16 * 2 * 3  # 160
    down = 16 * 8 / 2 + 8 * 4 * 3  # 160
    assert c.weight_bytes == q + k + v + o + gate + up + down == 720
    assert c.flops == 8256  # int4 changes the bytes read, not the arithmetic
    assert c.kv_bytes == 352 and c.act_bytes == 1248  # the cache and activations stay 16-bit


def test_fp32_doubles_every_width():
    spec = dataclasses.replace(TOY, weight_bits=32)
    c = cm.layer_count(spec, tokens=6, rows=2, cached=5)
    assert (c.weight_bytes, c.kv_bytes, c.act_bytes) == (2 * 1152, 2 * 352, 2 * 1248)


def test_head_by_hand():
    c = cm.head_count(TOY, tokens=6, outputs=2)
    assert c.flops == 2 * 2 * 8 * 32 == 1024
    assert c.weight_bytes == 8 * 32 * 2 + 6 * 8 * 2 == 608  # the whole head + the 6 looked-up embedding rows
    assert c.act_bytes == 2 * 32 * 4  # float32 logits
    # the head stays 16-bit in an int4 model
    assert cm.head_count(TOY_INT4, tokens=6, outputs=2).weight_bytes == 608


def test_vision_block_by_hand():
    c = cm.vision_block_count(TOY, patches=10, keys=10)
    qkv, proj, mlp, attention = 2 * 10 * 4 * 12, 2 * 10 * 4 * 4, 2 * 10 * 2 * 4 * 8, 2 * 10 * 10 * 4 * 2
    assert c.flops == qkv + proj + mlp + attention == 4160
    assert c.weight_bytes == 2 * (48 + 16 + 2 * 32) == 256
    assert c.act_bytes == 2 * 10 * (8 * 4 + 2 * 8) == 960
    # Qwen2.5-VL's gated MLP has a third matrix; the vision tower is never int4
    gated = cm.vision_block_count(dataclasses.replace(TOY_INT4, vision_gated=True), patches=10, keys=10)
    assert gated.flops == 4160 + 2 * 10 * 4 * 8 and gated.weight_bytes == 256 + 2 * 32


def test_vision_tower_by_hand():
    parts = dict(cm.vision_counts(TOY, patches=16, rows=2))
    assert list(parts) == ["patch_embed", "vision_block0", "vision_block1", "merger0", "merger1"]
    assert parts["patch_embed"].flops == 2 * 32 * 12 * 4
    assert parts["patch_embed"].weight_bytes == 12 * 4 * 2
    # 32 patches -> 8 merged tokens; fc1 16 -> 16, fc2 16 -> 8; the deepstack merger has the same shape
    for merger in ("merger0", "merger1"):
        assert parts[merger].flops == 2 * 8 * 16 * 16 + 2 * 8 * 16 * 8
        assert parts[merger].weight_bytes == 2 * (16 * 16 + 16 * 8)
    # each image's patches attend to that image's 16 patches
    assert parts["vision_block0"].flops == cm.vision_block_count(TOY, patches=16, keys=16, rows=2).flops
    # windowed blocks (Qwen2.5-VL) attend to their window, the full-attention blocks to the whole image
    windowed = dict(cm.vision_counts(dataclasses.replace(TOY, vision_window=4, vision_full_blocks=1), patches=16))
    assert windowed["vision_block0"].flops - windowed["vision_block1"].flops == 2 * 16 * (16 - 4) * 4 * 2


def test_model_params_match_the_shipped_checkpoint():
    """ModelSpec.params against the asset's safetensors header: every matrix and embedding (>= 2-D
    tensors; norms and biases are 1-D), less Qwen3-VL's vision position table."""
    spec = cm.model_spec("asset:target")
    path = os.path.join(assets.path("target"), "model.safetensors")
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    stored = sum(math.prod(e["shape"]) for k, e in header.items() if len(e["shape"]) >= 2 and "pos_embed" not in k)
    assert spec.params == stored


def test_released_model_sizes():
    # the published sizes (billions): Qwen3-VL 2B 2.1, 4B 4.4, 8B 8.8, 32B 33.4; Qwen2.5-VL 3B 3.75, 7B 8.3, 32B 33.5
    sizes = {k: m.params / 1e9 for k, m in cm.MODELS.items()}
    expected = {"qwen3-vl-2b": 2.1, "qwen3-vl-4b": 4.4, "qwen3-vl-8b": 8.8, "qwen3-vl-32b": 33.4,
                "qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.3, "qwen2.5-vl-32b": 33.5}
    for k, v in expected.items():
        assert sizes[k] == pytest.approx(v, rel=0.02), k


# ---- the roofline ------------------------------------------------------------------------------------


def test_call_priced_by_hand():
    """An extend call on TOY_HW: each layer and the head at max(FLOPs / 1e3, bytes / 1e2), plus the
    call's overhead (the tied head and embedding take 608 + 256 bytes, see test_head_by_hand)."""
    cost = cm.call_cost(TOY, TOY_HW, 1, "extend", tokens=6, rows=2, cached=5)
    layer = max(8256 / 1e3, (1152 + 352 + 1248) / 1e2)  # memory: 27.52 s
    head = max(1024 / 1e3, (608 + 256) / 1e2)  # memory: 8.64 s
    assert cost.seconds == pytest.approx(2 * layer + head + 1.0)
    assert cost.compute_s == pytest.approx((2 * 8256 + 1024) / 1e3)
    assert cost.memory_s == pytest.approx((2 * 2752 + 864) / 1e2)
    assert cost.flops == 2 * 8256 + 1024
    assert cost.weight_bytes == 2 * 1152 + 608
    assert cost.kv_bytes == 2 * 352
    assert (cost.bound, cost.link_s, cost.allreduce_bytes, cost.iterations) == ("memory", 0.0, 0.0, 1)
    assert cost.parts["overhead"] == 1.0


def test_decode_prices_every_iteration():
    """8 tokens over 2 rows: 4 iterations of a 2-row forward, priced at the average cache length
    (cached 5, 6, 7, 8 -> 6.5), each paying token_overhead_s."""
    cost = cm.call_cost(TOY, TOY_HW, 1, "decode", tokens=8, rows=2, cached=5)
    layer = cm.layer_count(TOY, tokens=2, rows=2, cached=6.5)
    head = cm.head_count(TOY, tokens=2, outputs=2)
    per_iteration = 2 * max(layer.flops / 1e3, layer.bytes / 1e2) + max(head.flops / 1e3, head.bytes / 1e2)
    assert cost.iterations == 4
    assert cost.seconds == pytest.approx(4 * per_iteration + 1.0 + 4 * 0.5)
    # FLOPs are linear in the cache length, so the average is exact: sum over the 4 iterations
    exact = sum(cm.layer_count(TOY, tokens=2, rows=2, cached=5 + i).flops for i in range(4))
    assert cost.flops == pytest.approx(2 * exact + 4 * head.flops)
    assert cm.call_seconds(TOY, TOY_HW, 1, "decode", tokens=8, rows=2, cached=5) == cost.seconds


def test_prefill_with_an_image_runs_the_vision_tower():
    plain = cm.call_cost(TOY, TOY_HW, 1, "prefill", tokens=10, rows=2)
    image = cm.call_cost(TOY, TOY_HW, 1, "prefill", tokens=10, rows=2, patches=16)
    vision = cm.vision_counts(TOY, patches=16, rows=2)
    assert image.flops - plain.flops == pytest.approx(sum(c.flops for _, c in vision))
    assert image.parts["vision"] == pytest.approx(sum(max(c.flops / 1e3, c.bytes / 1e2) for _, c in vision))
    assert plain.parts["vision"] == 0.0
    # prefill's tokens are per row: 2 rows x 10 tokens, with 10 keys read per row
    assert plain.kv_bytes == 2 * cm.layer_count(TOY, tokens=20, rows=2).kv_bytes


def test_roofline_bound_32b_on_h100():
    model, h100 = cm.model_spec("qwen3-vl-32b"), cm.hardware("h100")
    prefill = cm.call_cost(model, h100, 1, "prefill", tokens=8192)
    decode = cm.call_cost(model, h100, 1, "decode", tokens=64, cached=8192)
    assert prefill.bound == "compute" and prefill.compute_s > prefill.memory_s
    assert decode.bound == "memory" and decode.memory_s > 10 * decode.compute_s
    # by hand, one layer: 8192 tokens x 2 x 487.6M weights = 8.0 TFLOP, at 989e12 x 0.70: 11.5 ms, against
    # 0.98 GB of weights at 3.35e12 x 0.80: 0.36 ms
    weights = 5120 * (64 + 2 * 8) * 128 + 64 * 128 * 5120 + 3 * 5120 * 25600  # q, k, v; o; gate, up, down
    assert weights == 487_587_840
    layer = cm.layer_count(model, tokens=8192)
    assert layer.weight_bytes == 2 * weights
    assert layer.flops / (989e12 * 0.70) > 10 * layer.bytes / (3.35e12 * 0.80)


# ---- tensor parallelism ------------------------------------------------------------------------------


def test_tensor_parallel_splits_weights_and_adds_all_reduces():
    model, h100 = cm.model_spec("qwen3-vl-32b"), cm.hardware("h100")
    one = cm.call_cost(model, h100, 1, "decode", tokens=4, rows=2, cached=100)
    two = cm.call_cost(model, h100, 2, "decode", tokens=4, rows=2, cached=100)
    embedding_rows = 2 * 2 * 5120 * 2  # 2 iterations x 2 rows looked up, not split
    assert two.weight_bytes - embedding_rows / 2 == pytest.approx((one.weight_bytes - embedding_rows) / 2)
    assert two.kv_bytes == pytest.approx(one.kv_bytes / 2)  # 8 KV heads, 4 per device
    assert two.flops == pytest.approx(one.flops / 2)
    # per iteration: 64 layers x 2 all-reduces (after o_proj, after down_proj) of 2 rows x 5120 x 2 bytes,
    # and one after the vocabulary-split embedding lookup
    message = 2 * 5120 * 2
    assert two.allreduce_bytes == 2 * (64 * 2 + 1) * message
    ring = 2 * (2 - 1) / 2 * message / 450e9 + 10e-6
    assert two.link_s == pytest.approx(2 * (64 * 2 + 1) * ring)
    assert one.allreduce_bytes == 0 and one.link_s == 0


def test_tensor_parallel_keeps_undivided_parts_whole():
    # TOY on 2 devices: 1 KV head does not split, so attention stays whole (no all-reduce after o_proj);
    # the MLP (16) and the vocabulary (32) split.
    assert cm.splits(TOY, 2) == (1, 2, 2)
    c = cm.layer_count(TOY, tokens=6, rows=2, cached=5, devices=2)
    assert c.flops == (2304 + 1344) + 4608 / 2
    assert c.weight_bytes == 2 * (64 + 32 + 32 + 64) + 2 * 3 * 128 / 2
    assert c.kv_bytes == 352
    assert (c.allreduces, c.allreduce_bytes) == (1, 6 * 8 * 2)
    both = cm.layer_count(dataclasses.replace(TOY, kv_heads=2), tokens=6, rows=2, devices=2)
    assert (both.allreduces, both.allreduce_bytes) == (2, 2 * 6 * 8 * 2)
    # Qwen2.5-VL-7B's 28 heads on 8 devices: attention whole, MLP (18944) split
    assert cm.splits(cm.MODELS["qwen2.5-vl-7b"], 8) == (1, 8, 8)


def test_memory_needed_and_fits():
    model = cm.model_spec("qwen3-vl-32b")
    kv = 64 * 2 * 8 * 128 * 2  # bytes per token: layers x K, V x kv heads x head_dim x bf16
    one = cm.memory_needed(model, 1, kv_tokens=4096, rows=2)
    assert one == pytest.approx(cm.weight_bytes_per_device(model, 1) + 2 * 4096 * kv)
    # everything but the (replicated) vision tower splits in two
    vision = cm.weight_bytes_per_device(model, 1) - (model.params - _vision_params(model)) * 2
    assert cm.memory_needed(model, 2, kv_tokens=4096, rows=2) == pytest.approx((one - vision) / 2 + vision)
    cm.check_fits(model, cm.hardware("h100"), 1, kv_tokens=4096)
    cm.check_fits(model, cm.hardware("l40s"), 2, kv_tokens=4096)
    cm.check_fits(cm.model_spec("qwen3-vl-32b:int4"), cm.hardware("l40s"), 1, kv_tokens=4096)


def _vision_params(m):
    return (m.patch_dim * m.vision_hidden + m.vision_depth * sum(i * o for i, o in m.vision_block_shapes)
            + (1 + m.deepstack) * sum(i * o for i, o in m.merger_shapes))


# ---- presets and files -------------------------------------------------------------------------------


def test_presets():
    assert set(cm.HARDWARE) >= {"l40s", "a100", "h100", "h200", "v5e", "v5p"}
    assert set(cm.MODELS) == {"qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b", "qwen3-vl-32b", "qwen3-vl-30b-a3b",
                              "qwen3-vl-235b-a22b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b"}
    assert cm.model_spec("Qwen/Qwen3-VL-235B-A22B-Instruct") == cm.MODELS["qwen3-vl-235b-a22b"]
    for name, hw in cm.HARDWARE.items():
        assert hw.name == name and hw.notes
    assert cm.hardware("H100") is cm.HARDWARE["h100"]
    assert cm.model_spec("qwen3-vl-32b:int4").weight_bits == 4
    assert cm.model_spec("Qwen3-VL-32B:fp32").weight_bits == 32
    assert cm.model_spec("qwen2.5-vl-7b").label == "qwen2.5-vl-7b (bf16)"
    # a released model's hub id is read as its preset (no download)
    assert cm.model_spec("Qwen/Qwen3-VL-8B-Instruct") == cm.MODELS["qwen3-vl-8b"]
    assert cm.model_spec("Qwen/Qwen2.5-VL-7B-Instruct-AWQ").weight_bits == 4
    assert cm.model_spec("Qwen/Qwen3-VL-4B-Thinking:fp32").weight_bits == 32
    m = cm.MODELS["qwen2.5-vl-7b"]
    assert (m.patch_dim, m.vision_gated, m.vision_window, m.vision_full_blocks, m.deepstack) == (1176, True, 64, 4, 0)


def test_hardware_from_json(tmp_path):
    path = tmp_path / "my-h100.json"
    cm.save_hardware(dataclasses.replace(cm.HARDWARE["h100"], name="my-h100", mem_bandwidth=3.0e12), str(path))
    hw = cm.hardware(str(path))
    assert hw == dataclasses.replace(cm.HARDWARE["h100"], name="my-h100", mem_bandwidth=3.0e12)
    # a calibration may give only what it measured, on top of a preset
    partial = tmp_path / "measured.json"
    partial.write_text(json.dumps({"base": "h100", "bandwidth_efficiency": 0.7, "call_overhead_s": 1e-4}))
    hw = cm.hardware(str(partial))
    assert (hw.name, hw.bandwidth_efficiency, hw.call_overhead_s, hw.peak_flops) == ("measured", 0.7, 1e-4, 989e12)


def test_model_spec_of_the_shipped_asset():
    spec = cm.model_spec("asset:target")
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim) == (8, 192, 6, 2, 32)
    assert (spec.intermediate, spec.vocab, spec.tied, spec.weight_bits) == (576, 512, True, 16)  # float16 files
    assert (spec.vision_depth, spec.vision_hidden, spec.patch_dim, spec.deepstack) == (2, 64, 1536, 1)
    assert cm.model_spec("asset:target:int4").weight_bits == 4
    assert cm.model_spec("asset:draft").layers == 2
    # a folder and its config.json name the same dims, named after the folder
    folder = assets.path("target")
    assert cm.model_spec(folder) == dataclasses.replace(spec, name="synthetic-target")
    assert cm.model_spec(os.path.join(folder, "config.json")) == cm.model_spec(folder)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "qwen2_5_vl_flat"])
def test_config_parsing_matches_the_loader(family):
    """The cost model reads config.json itself (no jax, no transformers); its dims must be the ones
    the loader's QwenVLConfig.from_hf (through transformers) gets, nested or flat."""
    from helpers.models import tiny_config_dict
    from dreamr_jax.models.qwen_vl.config import QwenVLConfig

    d = tiny_config_dict(family.replace("_flat", ""))
    if family.endswith("_flat"):  # the older Qwen2.5-VL layout: text fields at the top level
        d = {**{k: v for k, v in d.items() if k != "text_config"}, **d["text_config"]}
    cfg = QwenVLConfig.from_hf(d)
    spec = cm.spec_from_config(d, name="tiny")
    t, v = cfg.text, cfg.vision
    assert (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.head_dim, spec.intermediate, spec.vocab) == (
        t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
        t.intermediate_size, t.vocab_size)
    assert spec.tied == cfg.tie_word_embeddings
    assert (spec.vision_depth, spec.vision_hidden, spec.vision_intermediate, spec.vision_heads, spec.patch_dim,
            spec.merge, spec.vision_out, spec.deepstack) == (
        v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_dim, v.spatial_merge_size,
        v.out_hidden_size, len(v.deepstack_visual_indexes))
    if family != "qwen3_vl":
        assert (spec.vision_window, spec.vision_full_blocks) == ((v.window_size // v.patch_size) ** 2,
                                                                 len(v.fullatt_block_indexes))


def test_int4_checkpoint_configs(tmp_path):
    from helpers.models import tiny_config_dict

    awq = {**tiny_config_dict("qwen3_vl"), "quantization_config": {"quant_method": "awq", "bits": 4,
                                                                    "group_size": 64, "version": "gemm"}}
    ct = {**tiny_config_dict("qwen2_5_vl"), "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                  "group_size": 32}}}}}
    for d, group in ((awq, 64), (ct, 32)):
        path = tmp_path / f"{d['model_type']}.json"
        path.write_text(json.dumps(d))
        spec = cm.model_spec(str(path))
        assert (spec.weight_bits, spec.group_size) == (4, group)
        assert cm.model_spec(f"{path}:bf16").weight_bits == 16  # priced as the dense model


# ---- bad input ---------------------------------------------------------------------------------------


def test_unknown_hardware_names_the_presets():
    with pytest.raises(CostModelError, match=r"unknown hardware 'tpu-v9'.*l40s, a100, h100, h200, v5e, v5p"):
        cm.hardware("tpu-v9")


def test_unknown_model_names_the_presets():
    with pytest.raises(CostModelError, match=r"unknown model 'qwen4-vl-7b'.*qwen3-vl-2b.*qwen2.5-vl-32b"):
        cm.model_spec("qwen4-vl-7b")
    with pytest.raises(CostModelError, match="asset must be one of"):
        cm.model_spec("asset:nope")


def test_config_that_is_not_qwen_vl(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(CostModelError, match=r"model_type 'llama' is not a Qwen-VL model.*qwen3_vl"):
        cm.model_spec(str(tmp_path))
    path.write_text("{not json")
    with pytest.raises(CostModelError, match="not valid JSON"):
        cm.model_spec(str(path))
    with pytest.raises(CostModelError, match="holds no config.json"):
        cm.model_spec(str(tmp_path / ".."))


def test_bad_hardware_files(tmp_path):
    missing = tmp_path / "a.json"
    missing.write_text(json.dumps({"peak_flops": 1e12}))
    with pytest.raises(CostModelError, match="missing field.*mem_bandwidth"):
        cm.hardware(str(missing))
    unknown = tmp_path / "b.json"
    unknown.write_text(json.dumps({"base": "h100", "tflops": 1}))
    with pytest.raises(CostModelError, match="unknown field.*tflops"):
        cm.hardware(str(unknown))
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"base": "h100", "flops_efficiency": 1.5}))
    with pytest.raises(CostModelError, match=r"flops_efficiency must be in \(0, 1\]"):
        cm.hardware(str(bad))
    with pytest.raises(CostModelError, match="does not exist"):
        cm.hardware(str(tmp_path / "none.json"))


def test_hardware_file_from_an_older_calibrate(tmp_path):
    """A preset written before the matmul table (it held flops_half_rows) says to recalibrate."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**cm.hardware("cpu").to_dict(), "matmul_table": [], "flops_half_rows": 36.0}))
    with pytest.raises(CostModelError, match="older `dreamr calibrate`.*rerun `dreamr calibrate"):
        cm.hardware(str(path))


def test_hardware_too_small_says_what_it_needs():
    model, l40s = cm.model_spec("qwen3-vl-32b"), cm.hardware("l40s")
    need = cm.memory_needed(model, 1, kv_tokens=4096)
    with pytest.raises(CostModelError, match=rf"qwen3-vl-32b \(bf16\) needs {need / 1e9:.1f} GB per device on "
                                             r"1 x l40s \(48.3 GB\): use more devices or int4"):
        cm.check_fits(model, l40s, 1, kv_tokens=4096)
    with pytest.raises(CostModelError, match=r"\(int4\) needs .*: use more devices \("):
        cm.check_fits(cm.model_spec("qwen3-vl-32b:int4"), cm.hardware("v5e"), 1, kv_tokens=4096)


def test_bad_call_arguments():
    h100 = cm.hardware("h100")
    with pytest.raises(CostModelError, match="op 'verify' is not one of prefill, extend, decode"):
        cm.call_cost(TOY, h100, 1, "verify", tokens=4)
    with pytest.raises(CostModelError, match="devices must be a positive integer"):
        cm.call_cost(TOY, h100, 0, "decode", tokens=4)
    with pytest.raises(CostModelError, match=r"tokens \(2\) counts all rows' tokens"):
        cm.call_cost(TOY, h100, 1, "decode", tokens=2, rows=4)
    with pytest.raises(CostModelError, match="must be a ModelSpec"):
        cm.call_cost("qwen3-vl-32b", h100, 1, "decode", tokens=4)


# ---- validation against a measurement ----------------------------------------------------------------


def test_h100_preset_reproduces_the_32b_decode_it_was_tuned_on():
    """docs/BENCHMARKS.md: a 32B-shaped bf16 decode on one H100 (batch 1, 32 steps after 128 tokens)
    measured at 4 and 2 layers, 2.055 and 1.335 ms/step: 0.36 ms per layer. Priced the same way (the
    difference of a 4- and a 2-layer model, per step), within 25%. Not an independent check: the
    preset's bandwidth efficiency and per-step cost were set from this measurement; it guards the
    preset and the counts against drifting from it."""
    model, h100 = cm.model_spec("qwen3-vl-32b"), cm.hardware("h100")

    def step(layers):
        return cm.call_seconds(dataclasses.replace(model, layers=layers), h100, 1, "decode", tokens=32,
                               cached=128) / 32

    per_layer = (step(4) - step(2)) / 2
    assert per_layer == pytest.approx(0.36e-3, rel=0.25)
    assert step(2) == pytest.approx(1.335e-3, rel=0.25) and step(4) == pytest.approx(2.055e-3, rel=0.25)
    # and the full model against the extrapolated 23.7 ms/step
    assert step(64) == pytest.approx(23.7e-3, rel=0.25)


# ---- a calibrated CPU: measured matmul table, elementwise rate --------------------------------------

# Times chosen so the hand values below are exact: shape (8, 16) measured at 1 and 4 rows; squares of
# width 4 and 16 measured at 1 and 4 rows.
TABLE = ((1, 8, 16, 1e-6), (4, 8, 16, 16e-6), (1, 4, 4, 1e-6), (4, 4, 4, 2e-6), (1, 16, 16, 4e-6),
         (4, 16, 16, 32e-6))
TABLE_HW = dataclasses.replace(TOY_HW, matmul_table=TABLE)


def test_matmul_table_lookup_by_hand():
    """A held shape: its times, log-interpolated over rows (2 rows: halfway in log between 1 and 16
    us is 4 us), the smallest row count's time below it, growing with the FLOPs past the largest.
    A shape not held: read from the squares at w = sqrt(n_in n_out) (8 x 8 -> w = 8, halfway in log
    between widths 4 and 16), growing as w^2 past the widest. No table: the roofline's rate."""
    seconds = functools.partial(cm.matmul_seconds, TABLE_HW)
    assert seconds(1, 8, 16) == pytest.approx(1e-6) and seconds(4, 8, 16) == pytest.approx(16e-6)
    assert seconds(2, 8, 16) == pytest.approx(4e-6)
    assert seconds(0.5, 8, 16) == pytest.approx(1e-6)
    assert seconds(12, 8, 16) == pytest.approx(48e-6)
    # 8 x 8 at 1 row: between 1 us (width 4) and 4 us (width 16) -> 2 us; at 4 rows: 2 and 32 -> 8
    assert seconds(1, 8, 8) == pytest.approx(2e-6) and seconds(4, 8, 8) == pytest.approx(8e-6)
    assert seconds(1, 32, 32) == pytest.approx(16e-6)  # (32 / 16)^2 x 4 us
    assert seconds(4, 2, 2) == pytest.approx(2e-6)  # below the narrowest: its time
    assert cm.matmul_seconds(TOY_HW, 3, 8, 16) == pytest.approx(2 * 3 * 8 * 16 / 1e3)


def test_table_prices_the_products_of_a_layer():
    """With a table, a part's compute is its products' table times plus its other FLOPs (attention)
    at their average rate: a layer of TOY prices q, k, v, o, gate, up, down from the table."""
    count = cm.layer_count(TOY, tokens=4, cached=5)
    products = [(4, 8, 8), (4, 8, 4), (4, 8, 4), (4, 8, 8), (4, 8, 16), (4, 8, 16), (4, 16, 8)]
    assert sorted(count.matmuls) == sorted(products)
    table_s = sum(cm.matmul_seconds(TABLE_HW, *p) for p in products)
    product_flops = sum(2 * r * i * o for r, i, o in products)
    assert cm.compute_seconds(TABLE_HW, count) == pytest.approx(table_s * count.flops / product_flops)
    assert count.flops > product_flops  # attention's QK^T and PV are in it
    assert cm.compute_seconds(TOY_HW, count) == pytest.approx(count.flops / 1e3)


def test_elementwise_work_added_after_the_roofline():
    """With elementwise_bandwidth, a part costs max(compute, (weights + cache) / bandwidth) +
    activations / elementwise_bandwidth; a model in the cache and a matmul table: its weight bytes
    are in the table's times, so only the cache's bytes count on the memory side."""
    hw = dataclasses.replace(TOY_HW, elementwise_bandwidth=50.0)
    count = cm.layer_count(TOY, tokens=6, rows=2, cached=5)
    cost = cm.call_cost(TOY, hw, 1, "extend", tokens=6, rows=2, cached=5)
    head = cm.head_count(TOY, tokens=6, outputs=2)
    expect = [max(c.flops / 1e3, (c.weight_bytes + c.kv_bytes) / 1e2) + c.act_bytes / 50.0
              for c in (count, count, head)]
    assert cost.seconds == pytest.approx(sum(expect) + 1.0)
    cached = dataclasses.replace(hw, matmul_table=TABLE, cache_bytes=1e9, cache_bandwidth=1e3)
    cost = cm.call_cost(TOY, cached, 1, "extend", tokens=6, rows=2, cached=5)
    expect = [max(cm.compute_seconds(cached, c), c.kv_bytes / 1e3) + c.act_bytes / 50.0 for c in (count, count, head)]
    assert cost.seconds == pytest.approx(sum(expect) + 1.0)


def test_bad_matmul_tables():
    with pytest.raises(CostModelError, match=r"matmul_table\[1\] must be \[rows, n_in, n_out, seconds\]"):
        dataclasses.replace(TOY_HW, matmul_table=((1, 4, 4, 1e-6), (1, 4, 4)))
    with pytest.raises(CostModelError, match="more than once"):
        dataclasses.replace(TOY_HW, matmul_table=((1, 4, 4, 1e-6), (1, 4, 4, 2e-6)))
    with pytest.raises(CostModelError, match="no square product"):
        dataclasses.replace(TOY_HW, matmul_table=((1, 4, 8, 1e-6),))
    # a JSON file's lists come back as the table
    hw = dataclasses.replace(TOY_HW, matmul_table=[list(e) for e in TABLE])
    assert hw.matmul_table == tuple(sorted((float(r), int(i), int(o), float(t)) for r, i, o, t in TABLE))


def test_monotone_is_the_least_squares_non_decreasing_fit():
    """Pool adjacent violators in log time: [1, 2, 8, 2, 4] -> the violators 8, 2, 4 pooled at their
    geometric mean 4; an increasing sequence is kept."""
    from dreamr_jax.calibrate import monotone

    assert monotone([1, 2, 8, 2, 4]) == pytest.approx([1, 2, 4, 4, 4])
    assert monotone([1, 2, 3]) == pytest.approx([1, 2, 3])
    assert monotone([4, 1]) == pytest.approx([2, 2])


def test_calibration_recovers_the_elementwise_rate_it_was_given():
    """`calibrate.elementwise_rate` recovers the rate from extend times generated with a known one
    on top of the priced matmuls and a fixed cost."""
    from dreamr_jax import calibrate

    rate, fixed = 3e9, 40e-6
    spec = calibrate.tiny_spec(4)
    rates = dataclasses.replace(cm.hardware("cpu"), matmul_table=TABLE, elementwise_bandwidth=1e30)

    def measured(n):
        cost = cm.call_cost(spec, rates, 1, "extend", tokens=n, cached=16)
        return cost.seconds + fixed + cost.act_bytes / rate

    wide = {n: measured(n) for n in (16, 32, 64)}
    assert calibrate.elementwise_rate(spec, rates, measured(1), wide) == pytest.approx(rate)


def test_matmul_table_measures_every_shape_and_its_transpose():
    """A tiny grid, measured for real: each square width and each named shape with its transpose,
    at every row count, times positive and never falling as rows grow."""
    from dreamr_jax import calibrate

    table = calibrate.matmul_table(shapes=[(8, 16)], rows=(1, 4), widths=(8,), copies=2, repeats=1)
    assert {(r, i, o) for r, i, o, _ in table} == {(r, i, o) for r in (1, 4) for i, o in ((8, 8), (8, 16), (16, 8))}
    by_shape = {}
    for r, i, o, t in table:
        by_shape.setdefault((i, o), []).append(t)
    assert all(t > 0 for ts in by_shape.values() for t in ts)
    assert all(ts == sorted(ts) for ts in by_shape.values())
    cm.Hardware(**{**TOY_HW.to_dict(), "matmul_table": table})  # a valid table


# ---- Qwen3-VL-MoE ---------------------------------------------------------------------------------


def test_moe_presets_match_the_released_sizes():
    """235B-A22B and 30B-A3B: total parameters as released, and the parameters a decoded token
    uses (attention, the router, its 8 experts, the head) near the A22B / A3B of their names."""
    for name, total, active in (("qwen3-vl-235b-a22b", 235e9, 22e9), ("qwen3-vl-30b-a3b", 31e9, 3.3e9)):
        m = cm.model_spec(name)
        assert abs(m.params / total - 1) < 0.02, (name, m.params)
        per_token = m.layers * cm.layer_count(m, tokens=1).flops / 2 + m.hidden * m.vocab  # no attention keys
        assert abs(per_token / active - 1) < 0.1, (name, per_token)


def test_touched_experts_against_sampling():
    """E (1 - (1 - k/E)^n) against n tokens each drawing k distinct experts at random."""
    import numpy as np

    m = cm.model_spec("qwen3-vl-235b-a22b")
    rng = np.random.default_rng(0)
    for n in (1, 4, 16, 64):
        draws = [len({e for _ in range(n) for e in rng.choice(128, 8, replace=False)}) for _ in range(400)]
        assert abs(m.touched_experts(n) - np.mean(draws)) < 0.02 * m.touched_experts(n) + 0.2, n


def test_moe_weights_per_device_by_hand():
    """8 devices: the 128 experts split 16 per device, attention (4 KV heads) whole, the vocabulary
    split, the routers and the vision tower whole."""
    m = cm.model_spec("qwen3-vl-235b-a22b")
    b = 2
    expert = 3 * m.hidden * m.expert_intermediate * b
    attention = (2 * m.hidden * m.heads * m.head_dim + 2 * m.hidden * m.kv_heads * m.head_dim) * b
    router = m.hidden * m.experts * b
    vocab = 2 * m.hidden * m.vocab * b  # embedding and head, untied
    vision = cm.weight_bytes_per_device(m, 1) - m.layers * (128 * expert + attention + router) - vocab
    want = m.layers * (16 * expert + attention + router) + vocab / 8 + vision
    assert cm.weight_bytes_per_device(m, 8) == pytest.approx(want, rel=1e-9)
    assert 0.5e9 < vision < 2e9  # the vision tower (and the head's rows in it) is about 1 GB
    # A decoded token reads its 8 experts per layer, not all 128.
    one = cm.layer_count(m, tokens=1)
    assert one.weight_bytes == pytest.approx(attention + 8 * expert + router, rel=1e-6)
    # int4: the attention shrinks, the experts stay dense (the loader refuses int4 experts)
    int4 = cm.layer_count(dataclasses.replace(m, weight_bits=4), tokens=1)
    assert 8 * expert + router < int4.weight_bytes < 8 * expert + router + attention / 3


def test_moe_config_is_read():
    from helpers.models import tiny_config_dict

    spec = cm.spec_from_config(tiny_config_dict("qwen3_vl_moe"), name="tiny-moe")
    assert (spec.experts, spec.experts_per_token, spec.expert_intermediate) == (8, 2, 24)
    with pytest.raises(CostModelError, match="experts_per_token"):
        dataclasses.replace(spec, experts_per_token=9)

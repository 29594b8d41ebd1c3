"""Qwen3-VL-MoE against transformers' Qwen3VLMoeForConditionalGeneration (the oracle), float32,
highest-precision matmuls, on tiny random checkpoints: which layers are sparse, the router's
choices and weights, the experts' two compute paths against a loop written from the formula,
full logits (text only, one image, a padded batch with three images), greedy generation, and
loading the experts from each layout a checkpoint may use, with every missing or misshapen
expert named."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dreamr_jax as dr
from dreamr_jax.generation import generate_from_ids
from dreamr_jax.loading import load_model
from dreamr_jax.models.qwen_vl.params import CheckpointError
from dreamr_jax.safetensors_io import write_safetensors

from helpers.models import (IMAGE_TOKEN, build_torch_model, image_prompt, jax_logits, left_pad, moe_config,
                            random_image_inputs, tiny_config_dict, torch_logits)

LOGITS_TOL = 1e-4
ROUTER_TOL = 1e-6


def _save(tmp_path_factory, name, config, seed):
    folder = tmp_path_factory.mktemp(name)
    tm = build_torch_model(config, seed=seed)
    tm.save_pretrained(folder)
    return str(folder), tm


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """{name: (folder, dreamr_jax model, torch model)}: every layer sparse (8 experts, top 2), and
    6 layers with decoder_sparse_step 2 and mlp_only_layers [3] (sparse: layers 1 and 5)."""
    out = {}
    configs = {"all_sparse": tiny_config_dict("qwen3_vl_moe"),
               "mixed": moe_config(tiny_config_dict("qwen3_vl"), layers=6, sparse_step=2, mlp_only_layers=(3,))}
    for seed, (name, config) in enumerate(configs.items()):
        folder, tm = _save(tmp_path_factory, name, config, seed)
        out[name] = (folder, load_model(folder), tm)
    return out


def _max_diff(a, b, mask=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.abs(a - b).max())


def test_sparse_layers_follow_transformers(moe_models):
    for name, (_, model, tm) in moe_models.items():
        ours = [type(layer.mlp).__name__ == "SparseMoE" for layer in model.layers]
        theirs = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in tm.model.language_model.layers]
        assert ours == theirs, name
    assert [i for i, s in enumerate(ours) if s] == [1, 5]  # "mixed": step 2, layer 3 dense by mlp_only_layers
    assert moe_models["all_sparse"][1].cfg.family == "qwen3_vl"


def test_router_chooses_the_experts_and_weights_transformers_does(moe_models):
    _, model, tm = moe_models["all_sparse"]
    x = np.random.default_rng(0).standard_normal((64, model.cfg.text.hidden_size)).astype(np.float32)
    for i, layer in enumerate(model.layers):
        logits, weights, index = layer.mlp.route(jnp.asarray(x))
        with torch.no_grad():
            t_logits, t_weights, t_index = tm.model.language_model.layers[i].mlp.gate(torch.tensor(x))
        assert np.array_equal(np.asarray(index), t_index.numpy()), i  # every token's experts, in order
        assert _max_diff(weights, t_weights.numpy()) < ROUTER_TOL
        assert _max_diff(logits, t_logits.numpy()) < ROUTER_TOL
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)  # renormalised top k


def _experts_reference(gate_up, down, x, index, weights):
    """sum_k w_k * down_e(silu(gate_e x) * up_e x), one token and one choice at a time."""
    inner = down.shape[-1]
    out = np.zeros_like(x, np.float64)
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = index[t, k]
            h = gate_up[e].astype(np.float64) @ x[t]
            g, u = h[:inner], h[inner:]
            out[t] += weights[t, k] * (down[e].astype(np.float64) @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("tokens", [2, 3, 4, 16])  # 2, 3 x top 2 < 8 experts: the gather path; 4 and 16: grouped
def test_both_expert_paths_equal_the_formula(moe_models, tokens):
    experts = moe_models["all_sparse"][1].layers[0].mlp.experts
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, experts.gate_up_proj.shape[2])).astype(np.float32)
    index = np.stack([rng.choice(8, 2, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.random((tokens, 2)).astype(np.float32)
    ours = experts(jnp.asarray(x), jnp.asarray(index), jnp.asarray(weights))
    want = _experts_reference(np.asarray(experts.gate_up_proj[...]), np.asarray(experts.down_proj[...]), x, index,
                              weights)
    assert _max_diff(ours, want) < 1e-5


@pytest.mark.parametrize("name", ["all_sparse", "mixed"])
def test_logits_text_only(moe_models, name):
    _, model, tm = moe_models[name]
    ids = np.random.default_rng(5).integers(0, 400, (1, 13))
    assert _max_diff(jax_logits(model, ids), torch_logits(tm, ids)) < LOGITS_TOL


def test_logits_one_image(moe_models):
    _, model, tm = moe_models["all_sparse"]
    grids = [(1, 4, 6)]
    pix, g = random_image_inputs(grids, model.cfg.vision.patch_dim, seed=6)
    ids = np.array(image_prompt(np.random.default_rng(6), [grids]))
    assert _max_diff(jax_logits(model, ids, None, pix, g), torch_logits(tm, ids, None, pix, g)) < LOGITS_TOL


@pytest.mark.parametrize("name", ["all_sparse", "mixed"])
def test_logits_padded_batch_three_images(moe_models, name):
    _, model, tm = moe_models[name]
    per_row = [[(1, 8, 4)], [(1, 4, 6), (1, 4, 4)]]
    pix, g = random_image_inputs([g for row in per_row for g in row], model.cfg.vision.patch_dim, seed=7)
    ids, mask = left_pad(image_prompt(np.random.default_rng(7), per_row))
    assert (~mask).any()
    ours, theirs = jax_logits(model, ids, mask, pix, g), torch_logits(tm, ids, mask, pix, g)
    assert _max_diff(ours, theirs, mask) < LOGITS_TOL


def test_greedy_32_tokens_match_transformers(moe_models):
    _, model, tm = moe_models["mixed"]
    per_row = [[(1, 4, 6)], [(1, 8, 4)]]
    pix, grids = random_image_inputs([g for row in per_row for g in row], model.cfg.vision.patch_dim, seed=0)
    rows = image_prompt(np.random.default_rng(0), per_row)
    ours = generate_from_ids(model, rows, pix, grids, max_new_tokens=32, stop_ids=())
    ids, mask = left_pad(rows)
    with torch.no_grad():
        out = tm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                          pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(grids),
                          mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN).astype(np.int64)),
                          max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert np.array_equal(np.array(ours.token_ids), out[:, ids.shape[1]:].numpy())


# ---- checkpoint layouts ----------------------------------------------------------------------------


def _rewrite(folder, dest, change):
    """Copy checkpoint `folder` to `dest` with its tensors passed through `change(dict) -> dict`."""
    from safetensors.numpy import load_file

    os.makedirs(dest, exist_ok=True)
    tensors = change(load_file(os.path.join(folder, "model.safetensors")))
    write_safetensors(os.path.join(dest, "model.safetensors"), tensors, metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dest)


def _released(tensors):
    """The layout of the hub's Qwen3-VL-MoE releases: gate_up_proj (E, H, 2I), down_proj (E, I, H)."""
    return {k: np.ascontiguousarray(np.swapaxes(v, 1, 2)) if ".mlp.experts." in k else v for k, v in tensors.items()}


def _per_expert(tensors):
    """One tensor per expert and projection: experts.N.{gate,up,down}_proj.weight."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            inner = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :inner]
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, inner:]
        elif k.endswith(".mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            out[k] = v
    return out


def test_experts_load_from_every_layout(moe_models, tmp_path):
    folder, model, _ = moe_models["all_sparse"]
    ids = np.random.default_rng(9).integers(0, 400, (1, 11))
    want = jax_logits(model, ids)
    for name, change in (("released", _released), ("per_expert", _per_expert)):
        loaded = dr.load_model(_rewrite(folder, tmp_path / name, change))
        assert np.array_equal(jax_logits(loaded, ids), want), name  # the same numbers, bit for bit


def test_missing_and_misshapen_experts_are_named(moe_models, tmp_path):
    folder = moe_models["all_sparse"][0]
    prefix = "model.language_model.layers.0.mlp.experts"

    def drop_one(tensors):
        out = _per_expert(tensors)
        del out[f"{prefix}.3.up_proj.weight"]
        return out

    with pytest.raises(CheckpointError, match=rf"{prefix}\.3\.up_proj\.weight is missing"):
        dr.load_model(_rewrite(folder, tmp_path / "drop", drop_one))

    def narrow(tensors):
        return dict(tensors, **{f"{prefix}.down_proj": tensors[f"{prefix}.down_proj"][:, :, :-1]})

    with pytest.raises(CheckpointError, match=rf"{prefix}\.down_proj: checkpoint shape \[8, 64, 23\]"):
        dr.load_model(_rewrite(folder, tmp_path / "narrow", narrow))

    def extra(tensors):
        out = _per_expert(tensors)
        out[f"{prefix}.8.down_proj.weight"] = out[f"{prefix}.0.down_proj.weight"]
        return out

    with pytest.raises(CheckpointError, match=rf"unexpected tensors .*{prefix}\.8\.down_proj\.weight"):
        dr.load_model(_rewrite(folder, tmp_path / "extra", extra))

    def both(tensors):  # fused arrays and per-expert copies of them: the copies are extra
        return dict(_per_expert(tensors), **tensors)

    with pytest.raises(CheckpointError, match=rf"unexpected tensors .*{prefix}\.0\.down_proj\.weight"):
        dr.load_model(_rewrite(folder, tmp_path / "both", both))


# ---- expert parallelism --------------------------------------------------------------------------

EP_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import re
import numpy as np
sys.path.insert(0, sys.argv[1])
from helpers.models import image_prompt, random_image_inputs
from dreamr_jax.generation import _extend
from dreamr_jax.loading import load_model
from dreamr_jax.speculative.roles import Role

model = load_model(sys.argv[2])
grids = [(1, 4, 6)]
pix, g = random_image_inputs(grids, model.cfg.vision.patch_dim, seed=3)
prompt = [int(t) for t in image_prompt(np.random.default_rng(3), [grids])[0]]
runs = {}
for n in (1, 2, 4):
    role = Role("target", model, jax.devices()[:n], parallelism="tensor")
    ctx = role.open(prompt, pix, g, capacity=32)
    first = np.asarray(ctx.logits, np.float64)
    role.set_tokens(ctx, [5, 9, 2, 7, 11])  # an extend of 5 tokens: 10 assignments, the grouped path
    after = np.asarray(role.feed(ctx), np.float64)
    tokens, _, n_gen, _, _ = role.generator.decode(ctx.cache, ctx.logits, max_new_tokens=8, stop_ids=())
    experts = [x for path, x in jax.tree_util.tree_leaves_with_path(role.generator.state)
               if "experts" in jax.tree_util.keystr(path)]
    gen = role.generator  # the largest all-reduce of one new token's forward, in elements
    hlo = _extend.lower(gen.structure, gen.leaves, ctx.cache, np.array([[7]], np.int32),
                        np.array([1], np.int32)).compile().as_text()
    results = re.findall(r"= (.*?) all-reduce(?:-start)?\(", hlo)  # one shape, or a tuple of several
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for r in results
             for dims in re.findall(r"\[([\d,]*)\]", r)]
    runs[n] = dict(first=first, after=after, tokens=np.asarray(tokens)[0, : int(np.asarray(n_gen)[0])].tolist(),
                   held=[x.addressable_shards[0].data.shape[0] for x in experts],
                   whole=[x.shape[0] for x in experts], largest_allreduce=max(sizes, default=0))
out = {n: dict(first_err=float(np.abs(r["first"] - runs[1]["first"]).max()),
               after_err=float(np.abs(r["after"] - runs[1]["after"]).max()),
               same_tokens=r["tokens"] == runs[1]["tokens"], held=r["held"], whole=r["whole"],
               largest_allreduce=r["largest_allreduce"])
       for n, r in runs.items()}
print("RESULT " + json.dumps(out))
"""


def test_expert_parallel_matches_one_device(moe_models, tmp_path):
    """Experts split over 2 and 4 fake CPU devices (whole experts per device, `Role(parallelism=
    "tensor")`): logits within 1e-6 of one device, the same greedy tokens, each device holding
    1/n of every layer's experts, and no expert weight crossing devices: a token's largest
    all-reduce is its hidden state (the experts' outputs), not gathered expert weights."""
    import subprocess
    import sys

    from helpers import REPO_ROOT

    script = tmp_path / "ep.py"
    script.write_text(EP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), os.path.join(REPO_ROOT, "tests"), moe_models["all_sparse"][0]],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    for n in ("2", "4"):
        r = res[n]
        assert r["first_err"] <= 1e-6 and r["after_err"] <= 1e-6, (n, r)
        assert r["same_tokens"], n
        assert r["held"] == [w // int(n) for w in r["whole"]] and len(r["held"]) == 2 * 3, (n, r)  # 3 layers
        assert 0 < r["largest_allreduce"] <= 64, (n, r)  # hidden 64, one token


def test_int4_experts_are_refused_by_name(moe_models, tmp_path):
    """An AWQ checkpoint whose experts are stored quantized: the loader says int4 experts are not
    supported and names them, rather than listing them as unexpected tensors."""
    from dreamr_jax.quant.quantize import awq_config

    folder = moe_models["all_sparse"][0]
    prefix = "model.language_model.layers.0.mlp.experts.0.gate_proj"

    def quantized(tensors):
        out = _per_expert(tensors)
        del out[f"{prefix}.weight"]
        out.update({f"{prefix}.qweight": np.zeros((64, 3), np.int32), f"{prefix}.qzeros": np.zeros((2, 3), np.int32),
                    f"{prefix}.scales": np.ones((2, 24), np.float16)})
        return out

    dest = _rewrite(folder, tmp_path / "awq", quantized)
    with open(os.path.join(dest, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = awq_config(32)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=rf"int4 MoE experts are not supported .*{prefix}"):
        dr.load_model(dest)


def test_awq_calibration_refuses_an_moe_by_name(moe_models, tmp_path):
    from dreamr_jax.quant.quantize import quantize_checkpoint

    with pytest.raises(ValueError, match="AWQ's calibration does not support Qwen3-VL-MoE"):
        quantize_checkpoint(moe_models["all_sparse"][0], str(tmp_path / "awq"), group_size=32,
                            calibration=[[5, 9, 2, 7, 11, 3]])

"""Tensor parallelism of a role's weights (`models.qwen_vl.sharding.tensor_parallel_shardings`,
`Role(parallelism=...)`): the split rules on their own, then dense and int4 models of both
families split over 2 and 4 fake CPU devices (a subprocess) against the same model on one device:
prefill and extend logits, and greedy decode tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from dreamr_jax.quant.quantize import quantize_checkpoint
from dreamr_jax.models.qwen_vl.sharding import place_role_state, tensor_parallel_spec
from dreamr_jax.sharding import DATA_AXIS, TENSOR_AXIS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = TENSOR_AXIS


@pytest.mark.parametrize("names,shape,n,want", [
    (("layers", "0", "self_attn", "q_proj", "weight"), (128, 64), 4, P(M)),  # widen: by output
    (("layers", "0", "self_attn", "q_proj", "bias"), (128,), 4, P(M)),
    (("layers", "0", "self_attn", "o_proj", "weight"), (64, 128), 4, P(None, M)),  # narrow: by input
    (("layers", "0", "mlp", "down_proj", "bias"), (64,), 4, P()),
    (("layers", "0", "mlp", "up_proj", "qweight"), (96, 32), 4, P(M)),  # int4 (out, in/2)
    (("layers", "0", "mlp", "up_proj", "scales"), (96, 2), 4, P(M)),
    (("layers", "0", "mlp", "down_proj", "qweight"), (64, 48), 4, P(None, M)),
    (("layers", "0", "mlp", "down_proj", "zeros"), (64, 3), 4, P()),  # 3 groups over 4: whole
    (("layers", "0", "self_attn", "k_proj", "weight"), (30, 64), 4, P()),  # 30 outputs over 4: whole
    (("layers", "0", "input_layernorm", "weight"), (64,), 4, P()),
    (("embed_tokens",), (512, 64), 4, P(M)),
    (("lm_head", "weight"), (512, 64), 4, P(M)),
    (("visual", "blocks", "0", "attn", "qkv", "weight"), (96, 32), 4, P()),
    (("layers", "0", "self_attn", "q_proj", "weight"), (128, 64), 1, P()),
    (("layers", "0", "mlp", "experts", "gate_up_proj"), (8, 48, 64), 4, P(M)),  # MoE: whole experts per device
    (("layers", "0", "mlp", "experts", "down_proj"), (8, 64, 24), 2, P(M)),
    (("layers", "0", "mlp", "experts", "down_proj"), (6, 64, 24), 4, P()),  # 6 experts over 4: whole
    (("layers", "0", "mlp", "gate", "weight"), (8, 64), 4, P()),  # the router stays whole
])
def test_tensor_parallel_spec(names, shape, n, want):
    assert tensor_parallel_spec(names, shape, n) == want
    if any(name in names for name in ("q_proj", "k_proj", "v_proj", "o_proj")):  # heads that do not divide
        assert tensor_parallel_spec(names, shape, n, split_attention=False) == P()


def test_place_role_state_rejects_unknown_parallelism():
    import jax

    with pytest.raises(ValueError, match="'pipeline' is not one of"):
        place_role_state({}, jax.devices()[:1], "pipeline")


TP_SCRIPT = textwrap.dedent("""
    import json, os, re, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from helpers.models import image_prompt, random_image_inputs
    from dreamr_jax.generation import _extend
    from dreamr_jax.loading import load_model
    from dreamr_jax.speculative.roles import Role

    def collectives(role, cache):  # the collective ops XLA put into one forward of one new token
        gen = role.generator
        hlo = _extend.lower(gen.structure, gen.leaves, cache, np.array([[7]], np.int32),
                            np.array([1], np.int32)).compile().as_text()
        # one per op, whatever its result (a combined op's is a tuple)
        return {op: len(re.findall(rf" {op}(?:-start)?\\(", hlo)) for op in ("all-reduce", "all-gather")}

    assert len(jax.devices()) == 4
    out = {}
    for name, folder in json.loads(sys.argv[2]).items():
        model = load_model(folder)
        grids = [(1, 4, 6)]
        pix, g = random_image_inputs(grids, model.cfg.vision.patch_dim, seed=3)
        prompt = [int(t) for t in image_prompt(np.random.default_rng(3), [grids])[0]]
        extra = [5, 9, 2, 7, 11]
        results = {}
        for n in (1, 2, 4):
            role = Role("target", model, jax.devices()[:n], parallelism="tensor")
            ctx = role.open(prompt, pix, g, capacity=32)
            first = np.asarray(ctx.logits, np.float64)
            role.set_tokens(ctx, extra)
            after = np.asarray(role.feed(ctx), np.float64)
            tokens, _, n_gen, _, _ = role.generator.decode(ctx.cache, ctx.logits, max_new_tokens=8, stop_ids=())
            state = role.generator.state
            leaves = jax.tree_util.tree_leaves(state)
            layer = jax.tree_util.tree_leaves(state["layers"])
            # the first device's share of the decoder layers' bytes, and of the whole model's
            share = {k: sum(x.addressable_shards[0].data.nbytes for x in v) / sum(x.nbytes for x in v)
                     for k, v in (("layers", layer), ("model", leaves))}
            if n > 1:  # re-split after a change (e.g. an int4 method): still placed, still split
                role.refresh()
                again = jax.tree_util.tree_leaves(role.generator.state["layers"])
                assert sum(x.addressable_shards[0].data.nbytes for x in again) == sum(
                    x.addressable_shards[0].data.nbytes for x in layer), name
            results[n] = dict(first=first, after=after,
                              tokens=np.asarray(tokens)[0, : int(np.asarray(n_gen)[0])].tolist(),
                              share=share, devices=sorted({str(d) for x in leaves for d in x.devices()}),
                              cache_spec=list(ctx.cache.keys[0].sharding.spec) if n > 1 else None,
                              collectives=collectives(role, ctx.cache) if n > 1 else None)
        ref = results[1]
        out[name] = {n: dict(first_err=float(np.abs(r["first"] - ref["first"]).max()),
                             after_err=float(np.abs(r["after"] - ref["after"]).max()),
                             scale=float(np.abs(ref["after"]).max()), same_tokens=r["tokens"] == ref["tokens"],
                             share=r["share"], devices=len(r["devices"]), cache_spec=r["cache_spec"],
                             collectives=r["collectives"], layers=model.cfg.text.num_hidden_layers)
                     for n, r in results.items()}
    print("RESULT " + json.dumps(out))
""")


def test_tensor_parallel_roles_match_one_device(tiny_checkpoints, tmp_path):
    folders = {name: tiny_checkpoints[name][0] for name in ("qwen3_vl", "qwen2_5_vl", "qwen3_vl_tied")}
    # int4 at group 32: o_proj (64 inputs, 2 groups) splits by input over 2 devices, not over 4;
    # down_proj (96 inputs, 3 groups) never does; q/k/v/gate/up split by output.
    quantize_checkpoint(folders["qwen3_vl"], str(tmp_path / "int4"), group_size=32)
    folders["qwen3_vl_int4"] = str(tmp_path / "int4")
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), os.path.join(ROOT, "tests"), json.dumps(folders)],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    for name, by_n in res.items():
        print(f"\n{name}: " + "; ".join(f"{n} devices: logits err {r['first_err']:.1e} / {r['after_err']:.1e} "
                                         f"(max |logit| {r['scale']:.1f}), per device "
                                         f"{r['share']['layers']:.2f} of the "
                                         f"decoder layers, {r['share']['model']:.2f} of all weights, "
                                         f"collectives per token {r['collectives']}"
                                         for n, r in by_n.items()))
        for n, r in by_n.items():
            assert r["devices"] == int(n)
            assert r["first_err"] <= 1e-4 and r["after_err"] <= 1e-4, (name, n, r)
            assert r["same_tokens"], (name, n)
        # XLA keeps the KV cache (B, kv_heads, L, D) split by head, like k_proj / v_proj's outputs
        assert by_n["2"]["cache_spec"][:2] == [None, TENSOR_AXIS], (name, by_n["2"]["cache_spec"])
        # Megatron's communication and nothing else: one all-reduce of the hidden state after each
        # split attention and MLP block, one after the vocabulary-split embedding lookup; no gathers.
        # Over 4 devices the 2 KV heads do not divide, so attention stays whole (MLP all-reduces only).
        # (int4's whole 3-group down_proj too: XLA slices it to the split inputs and all-reduces.)
        n_layers = by_n["2"]["layers"]
        assert by_n["2"]["collectives"] == {"all-reduce": 2 * n_layers + 1, "all-gather": 0}, (name, by_n["2"])
        assert by_n["4"]["collectives"] == {"all-reduce": n_layers + 1, "all-gather": 0}, (name, by_n["4"])
        # the split weights really are split (norms, whole attention over 4, and int4 layers whose
        # groups do not divide stay whole)
        share = {int(n): r["share"]["layers"] for n, r in by_n.items()}
        if name.endswith("int4"):  # down_proj (3 groups) whole at 2 and 4
            assert share[2] < 0.65 and share[4] < 0.8, (name, share)
        else:  # over 4: attention (40% of a layer) whole, the MLP in quarters
            assert share[2] < 0.52 and share[4] < 0.6, (name, share)


def test_parallelism_config_errors():
    from dreamr_jax.config import ConfigError, load_config
    from dreamr_jax.training.sapo_trainer import SAPOConfig

    with pytest.raises(ConfigError,
                       match="synthetic.yaml: target_parallelism must be tensor or replicate, got 'pipeline'"):
        load_config(os.path.join(ROOT, "configs", "synthetic.yaml"), ["target_parallelism=pipeline"])
    assert load_config(os.path.join(ROOT, "configs", "synthetic.yaml"),
                       ["draft_parallelism=replicate"]).draft_parallelism == "replicate"
    with pytest.raises(ValueError, match="target_parallelism must be tensor or replicate"):
        SAPOConfig(output_dir="x", draft="x", target="x", target_parallelism="fsdp")


@pytest.mark.parametrize("shape,n,want", [
    ((151936, 2048), 4, P(DATA_AXIS)),  # the largest dimension that divides
    ((2048, 6144), 4, P(None, DATA_AXIS)),
    ((6, 4096), 4, P(None, DATA_AXIS)),  # largest first, whatever its place
    ((4099, 3), 4, P()),  # nothing divides
    ((2048,), 4, P()),  # small: whole
    ((), 4, P()),
    ((151936, 2048), 1, P()),
])
def test_fsdp_spec(shape, n, want):
    from dreamr_jax.sharding import fsdp_spec

    assert fsdp_spec(shape, n) == want

"""SAPO with a Qwen3-VL-MoE frozen target: a tiny random MoE target (the world's tokenizer) checks
every step of a tiny draft's rollouts, on one device and expert-parallel over two, and the two
runs train alike.

The runs live in a subprocess of their own (3 fake CPU devices). Run inside the suite's process,
a later test that starts grain worker processes (`test_sft.py`) aborted inside XLA's compile, twice
in clean-clone runs and never alone; the subprocess also gives this test the devices it needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO_ROOT, TESTS_DIR

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    sys.path.insert(0, sys.argv[1])
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from dreamr_jax.models.qwen_vl import text
    from dreamr_jax.training.sapo_trainer import train
    from helpers.training import task_reward, tiny_sapo_config

    tmp, target, draft = sys.argv[2], sys.argv[3], sys.argv[4]
    traced = {"expert_parallel": 0}
    inner = text.Experts._expert_parallel
    def counting(self, *a, **kw):  # counts traces, not calls: enough to see which path the target took
        traced["expert_parallel"] += 1
        return inner(self, *a, **kw)
    text.Experts._expert_parallel = counting

    runs = {}
    for name, n in (("one", 1), ("two", 2)):
        before = traced["expert_parallel"]
        out = train(tiny_sapo_config(os.path.join(tmp, name), (target, draft), steps=2, checkpoint_every=100,
                                     reward_weights=(0.0, 1.0, 0.0), soft_draft_reward=True,
                                     draft_devices=1, target_devices=n),
                    progress=False, extra_reward=task_reward, export=False)
        runs[name] = {"history": [{k: float(r[k]) for k in ("acceptance_rate", "steps_per_rollout", "reward_draft",
                                                            "reward", "kl")} for r in out["history"]],
                      "expert_parallel_traces": traced["expert_parallel"] - before}
    print("RESULT " + json.dumps(runs))
""")


def test_sapo_trains_against_an_moe_target(tmp_path, world_token_ids):
    from flax import nnx

    from dreamr_jax import assets
    from dreamr_jax.assets import qwen3_vl_config
    from dreamr_jax.bench.models import qwen3_vl_moe_dict
    from dreamr_jax.models.qwen_vl.config import QwenVLConfig
    from dreamr_jax.models.qwen_vl.model import QwenVLModel
    from dreamr_jax.models.qwen_vl.params import save_state

    from helpers.training import TINY_WORLD_ARCH

    folders = []
    for name, seed, experts in (("moe_target", 2, 4), ("draft", 1, 0)):
        folder = str(tmp_path / name)
        config = qwen3_vl_config(token_ids=world_token_ids, **TINY_WORLD_ARCH)
        if experts:
            config = qwen3_vl_moe_dict(config, experts=experts, top_k=2, inner=16)
        model = QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(seed))
        assert (type(model.layers[0].mlp).__name__ == "SparseMoE") == bool(experts)
        save_state(model, folder, config)
        for file in os.listdir(assets.path("tokenizer")):
            shutil.copy(os.path.join(assets.path("tokenizer"), file), folder)
        folders.append(folder)
    script = tmp_path / "sapo_moe.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), TESTS_DIR, str(tmp_path), *folders], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    print(f"\nSAPO against a tiny MoE target, one device vs expert-parallel over two: {runs}")
    # The target took the expert-parallel path only when split over two devices.
    assert runs["one"]["expert_parallel_traces"] == 0 and runs["two"]["expert_parallel_traces"] > 0
    for a, b in zip(runs["one"]["history"], runs["two"]["history"], strict=True):
        # R_draft is the mean rho of the MoE target's checks (soft_draft_reward), the only weighted term
        assert 0.0 < a["reward_draft"] < 1.0 and a["steps_per_rollout"] > 0
        # Same seeds and prompts: the split target's checks (rho to ~1e-6) give the same rewards and training.
        for key, x in a.items():
            assert b[key] == pytest.approx(x, rel=1e-4, abs=1e-5), (key, a, b)


"""SAPO with a Qwen3-VL-MoE frozen target: a tiny random MoE target (the world's tokenizer) checks
every step of a tiny draft's rollouts, and the trainer runs, its rewards and acceptance read
from those checks."""

from __future__ import annotations

import os
import shutil

import numpy as np

from helpers.training import TINY_WORLD_ARCH, task_reward, tiny_sapo_config


def test_sapo_trains_against_an_moe_target(tmp_path, tiny_world_pair, world_token_ids):
    from flax import nnx

    from dreamr_jax import assets
    from dreamr_jax.assets import qwen3_vl_config
    from dreamr_jax.bench.models import qwen3_vl_moe_dict
    from dreamr_jax.models.qwen_vl.config import QwenVLConfig
    from dreamr_jax.models.qwen_vl.model import QwenVLModel
    from dreamr_jax.models.qwen_vl.params import save_state
    from dreamr_jax.training.sapo_trainer import train

    folder = str(tmp_path / "moe_target")
    config = qwen3_vl_moe_dict(qwen3_vl_config(token_ids=world_token_ids, **TINY_WORLD_ARCH), experts=4, top_k=2,
                               inner=16)
    target = QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(2))
    assert type(target.layers[0].mlp).__name__ == "SparseMoE"
    save_state(target, folder, config)
    for name in os.listdir(assets.path("tokenizer")):
        shutil.copy(os.path.join(assets.path("tokenizer"), name), folder)
    out = train(tiny_sapo_config(tmp_path / "run", (folder, tiny_world_pair[1]), steps=2, checkpoint_every=100,
                                 reward_weights=(0.0, 1.0, 0.0)),
                progress=False, extra_reward=task_reward, export=False)
    assert out["step"] == 2
    for row in out["history"]:
        assert 0.0 <= row["acceptance_rate"] <= 1.0 and row["steps_per_rollout"] > 0  # the MoE target checked
        assert np.isfinite(row["reward_draft"]) and np.isfinite(row["kl"])

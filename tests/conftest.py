"""Shared fixtures: tiny random transformers Qwen-VL models (built from dicts, no downloads),
saved as real checkpoints in a session temp folder, the tiny world model and pair; and
float32/highest-precision JAX. The helpers they are built with live in tests/helpers/."""

from __future__ import annotations


import jax
import pytest

from helpers.models import build_torch_model, tiny_config_dict
from helpers.training import TINY_WORLD_ARCH

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{name: (folder, torch model)} for both families, tied and untied."""
    out = {}
    for name, family, tie in (("qwen3_vl", "qwen3_vl", False), ("qwen2_5_vl", "qwen2_5_vl", False),
                              ("qwen3_vl_tied", "qwen3_vl", True)):
        folder = tmp_path_factory.mktemp(name)
        model = build_torch_model(tiny_config_dict(family, tie=tie), seed=len(out))
        model.save_pretrained(folder)
        out[name] = (str(folder), model)
    return out


# ---- the embedded world ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def world_token_ids():
    import dreamr_jax as dr
    from dreamr_jax import assets
    from dreamr_jax.training.sft import token_ids_of

    return token_ids_of(dr.load_processor(tokenizer_path=assets.path("tokenizer")))


@pytest.fixture(scope="session")
def tiny_world_model(world_token_ids):
    from flax import nnx

    from dreamr_jax.assets import qwen3_vl_config
    from dreamr_jax.models.qwen_vl.config import QwenVLConfig
    from dreamr_jax.models.qwen_vl.model import QwenVLModel

    config = qwen3_vl_config(token_ids=world_token_ids, **TINY_WORLD_ARCH)
    return QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def tiny_world_pair(tmp_path_factory, world_token_ids):
    """Random tiny target and draft with the world's tokenizer, saved as checkpoints."""
    import os
    import shutil

    from flax import nnx

    from dreamr_jax import assets
    from dreamr_jax.assets import qwen3_vl_config
    from dreamr_jax.models.qwen_vl.config import QwenVLConfig
    from dreamr_jax.models.qwen_vl.model import QwenVLModel
    from dreamr_jax.models.qwen_vl.params import save_state

    folders = []
    for seed, layers in ((0, 2), (1, 1)):
        folder = str(tmp_path_factory.mktemp(f"world{seed}"))
        config = qwen3_vl_config(token_ids=world_token_ids, **dict(TINY_WORLD_ARCH, num_hidden_layers=layers))
        save_state(QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(seed)), folder, config)
        for name in os.listdir(assets.path("tokenizer")):
            shutil.copy(os.path.join(assets.path("tokenizer"), name), folder)
        folders.append(folder)
    return folders

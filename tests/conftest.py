"""Shared fixtures: tiny random transformers Qwen-VL models (built from dicts, no downloads),
saved as real checkpoints in a session temp folder, and float32/highest-precision JAX."""

from __future__ import annotations


import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 512
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503
EOS = 504


def tiny_config_dict(family: str, *, tie: bool = False, vocab: int = VOCAB, real_token_ids: bool = False) -> dict:
    """A tiny config.json dict in the nested (current transformers) layout."""
    from dreamr_jax.bench.models import QWEN_TOKEN_IDS, qwen3_vl_dict

    ids = (QWEN_TOKEN_IDS if real_token_ids else
           dict(eos_token_id=EOS, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                vision_start_token_id=VISION_START, vision_end_token_id=VISION_END))
    # mrope (2, 3, 3) rather than the factory's (4, 2, 2) for head_dim 16: the split these models
    # were written with, kept so that the parity tests still compare the same models.
    config = qwen3_vl_dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=vocab, tie_word_embeddings=tie,
                           token_ids={k: v for k, v in ids.items() if k != "bos_token_id"}, rope_theta=10000.0,
                           max_position_embeddings=4096, mrope_section=(2, 3, 3),
                           vision=dict(depth=3, intermediate_size=48, patch_size=4, deepstack_visual_indexes=(0, 1)))
    if family == "qwen3_vl":
        return config
    if family == "qwen2_5_vl":
        # The same text model in Qwen2.5-VL's layout (head_dim implied, no interleaved mrope) and its
        # windowed vision tower.
        del config["text_config"]["head_dim"], config["text_config"]["rope_parameters"]["mrope_interleaved"]
        config.update(model_type="qwen2_5_vl", vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, temporal_patch_size=2,
            spatial_merge_size=2, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1],
            hidden_act="silu", tokens_per_second=2,
        ))
        return config
    raise ValueError(family)


def build_torch_model(config_dict: dict, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    d = dict(config_dict)
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    cls = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[cfg.model_type]
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    # Random init leaves norms at 1 / biases at 0; perturb every tensor so each one matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


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


def random_image_inputs(grids, patch_dim, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.asarray(grids, np.int64)
    n = int(grids.prod(-1).sum())
    return rng.standard_normal((n, patch_dim)).astype(np.float32), grids


def image_prompt(rng, grids_per_row, merge=2, text_len=(5, 9)):
    """Token rows like the chat template makes them: text, <vision_start> image tokens <vision_end>, text."""
    rows = []
    for grids in grids_per_row:
        row = list(rng.integers(0, 400, rng.integers(*text_len)))
        for t, h, w in grids:
            row += [VISION_START] + [IMAGE_TOKEN] * (t * h * w // merge**2) + [VISION_END]
            row += list(rng.integers(0, 400, rng.integers(*text_len)))
        rows.append(row)
    return rows


# ---- the embedded world ---------------------------------------------------------------------------

# A tiny Qwen3-VL for the world's tokenizer and 96x96 images (trainer and pipeline tests).
TINY_WORLD_ARCH = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1, vision_hidden_size=32, vision_depth=1)


def tiny_sft_config(tmp, **changes):
    """A few-step SFT run of TINY_WORLD_ARCH on the world's judging mix (trainer and resume tests)."""
    from dreamr_jax import assets
    from dreamr_jax.data.pipeline import DataConfig
    from dreamr_jax.training.sft import SFTConfig

    base = dict(output_dir=str(tmp), tokenizer=assets.path("tokenizer"), model=TINY_WORLD_ARCH,
                data=DataConfig(judging_fraction=0.5, seq_len=160), batch_size=4, steps=4, learning_rate=3e-3,
                warmup_steps=2, checkpoint_every=2, log_every=1)
    return SFTConfig(**{**base, **changes})


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

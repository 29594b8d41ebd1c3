"""The shipped tiny target/draft pair of the embedded world, and config.json for new ones.

`dr.load_model(assets.path("target"))` loads the shipped target; `scripts/build_assets.py`
rebuilds both from scratch (tokenizer, SFT of each model, export).
"""

from __future__ import annotations

import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
# "draft-redundant" / "draft-redundant-sapo": the misaligned draft SAPO starts from and the
# draft after SAPO (configs/sft_synthetic_draft_redundant.yaml, configs/sapo_synthetic_redundant.yaml).
NAMES = ("target", "draft", "tokenizer", "draft-redundant", "draft-redundant-sapo")


def path(name: str = "target") -> str:
    """Folder of a shipped asset: "target", "draft", "draft-redundant", "draft-redundant-sapo"
    (HF checkpoints) or "tokenizer"."""
    if name not in NAMES:
        raise ValueError(f"asset must be one of {NAMES}, got '{name}'")
    folder = os.path.join(ASSETS_DIR, f"synthetic-{name}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: asset '{name}' is missing; rebuild with scripts/build_assets.py")
    return folder


def qwen3_vl_config(*, hidden_size: int, num_hidden_layers: int, intermediate_size: int, num_attention_heads: int,
                    num_key_value_heads: int, vision_hidden_size: int, vision_depth: int, token_ids: dict,
                    head_dim: int | None = None, deepstack_visual_indexes=(0,),
                    tie_word_embeddings: bool = True) -> dict:
    """A Qwen3-VL config.json (transformers' layout) for the embedded world's models.

    Images are 64x64 (4x4 patches of 16, 2x2 merged tokens), so the vision position table
    needs only a 4x4 grid. `token_ids` comes from `world_tokenizer.write_tokenizer_files`.
    The rotary split below is the one every config the package builds uses (the test and
    benchmark models' `bench.models.qwen3_vl_dict` starts from this function)."""
    head_dim = head_dim or hidden_size // num_attention_heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # t/h/w rotary frequencies (Qwen3-VL: 24/20/20 of 64)
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "tie_word_embeddings": tie_word_embeddings,
        "image_token_id": token_ids["image_token_id"], "video_token_id": token_ids["video_token_id"],
        "vision_start_token_id": token_ids["vision_start_token_id"],
        "vision_end_token_id": token_ids["vision_end_token_id"],
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": token_ids["vocab_size"], "hidden_size": hidden_size,
            "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
            "head_dim": head_dim, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
            "tie_word_embeddings": tie_word_embeddings, "bos_token_id": token_ids["bos_token_id"],
            "eos_token_id": token_ids["eos_token_id"], "hidden_act": "silu", "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                "mrope_interleaved": True},
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision", "depth": vision_depth, "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size, "num_heads": max(1, vision_hidden_size // 32),
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
            "out_hidden_size": hidden_size, "num_position_embeddings": 16,
            "deepstack_visual_indexes": list(deepstack_visual_indexes), "hidden_act": "gelu_pytorch_tanh",
        },
    }

"""Random-weight Qwen3-VL models for tests and benchmarks: one config factory (on top of
`assets.qwen3_vl_config`, the one place the rotary (mrope) split is derived), the tiny
draft/target pairs with the real Qwen vocabulary, and transformers twins of a config.
"""

from __future__ import annotations

import os

# The real Qwen2.5/3-VL special tokens.
QWEN_VOCAB = 151936
QWEN_TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655,
                  "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}

# A one-block vision tower: where only text decode is measured it must exist, not cost.
BENCH_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                    num_position_embeddings=16, deepstack_visual_indexes=(0,))

# Keys `qwen3_vl_config` writes (a shipped config.json's full layout) that these configs leave
# out: transformers fills each in with the same value (no Qwen3-VL text config reads a bos id),
# and the tests' speculative pairs are built from these configs too.
_LEFT_OUT = {None: ("architectures",), "text_config": ("model_type", "bos_token_id", "hidden_act", "attention_bias"),
             "vision_config": ("model_type", "in_channels")}


def qwen_token_ids(vocab_size: int = QWEN_VOCAB) -> dict:
    """The real Qwen special-token ids; a smaller vocabulary gets them as its last ids instead
    (eos, then image, video, vision start, vision end), so every id is a row of the embedding."""
    if vocab_size >= QWEN_VOCAB:
        return dict(QWEN_TOKEN_IDS)
    v = vocab_size
    return {"bos_token_id": min(151643, v - 6), "eos_token_id": min(151645, v - 5),
            "image_token_id": min(151655, v - 4), "video_token_id": min(151656, v - 3),
            "vision_start_token_id": min(151652, v - 2), "vision_end_token_id": min(151653, v - 1)}


def qwen3_vl_dict(*, hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                  num_key_value_heads: int, head_dim: int | None = None, vocab_size: int = QWEN_VOCAB,
                  tie_word_embeddings: bool = True, token_ids: dict | None = None, rope_theta: float = 5_000_000.0,
                  max_position_embeddings: int = 32768, mrope_section=None, vision: dict | None = None) -> dict:
    """A Qwen3-VL config dict (transformers' nested layout) of any size, for random-weight models.

    `assets.qwen3_vl_config` gives the layout and the rotary split (`mrope_section` overrides
    it); the defaults are Qwen3-VL's rope_theta and context. `token_ids`: the special ids
    (`qwen_token_ids(vocab_size)` by default; "eos_token_id" and the four image/video ids).
    `vision` changes `BENCH_VISION`'s entries (depth, hidden_size, intermediate_size, num_heads,
    patch_size, num_position_embeddings, deepstack_visual_indexes)."""
    from ..assets import qwen3_vl_config

    ids = dict(qwen_token_ids(vocab_size) if token_ids is None else token_ids, vocab_size=vocab_size)
    ids.setdefault("bos_token_id", None)  # left out below
    v = dict(BENCH_VISION, **(vision or {}))
    config = qwen3_vl_config(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                             intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                             num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                             vision_hidden_size=v["hidden_size"], vision_depth=v["depth"], token_ids=ids,
                             deepstack_visual_indexes=v["deepstack_visual_indexes"],
                             tie_word_embeddings=tie_word_embeddings)
    text, vis = config["text_config"], config["vision_config"]
    text["max_position_embeddings"] = max_position_embeddings
    text["rope_parameters"]["rope_theta"] = float(rope_theta)
    if mrope_section is not None:
        text["rope_parameters"]["mrope_section"] = list(mrope_section)
    vis.update(intermediate_size=v["intermediate_size"], num_heads=v["num_heads"], patch_size=v["patch_size"],
               num_position_embeddings=v["num_position_embeddings"])
    for where, keys in _LEFT_OUT.items():
        for key in keys:
            (config if where is None else config[where]).pop(key, None)
    return config


# ---- tiny draft/target pairs with the real Qwen vocabulary -----------------------------------------

DELIMITER = 271  # "\n\n" in the Qwen vocabulary


def qwen3_vl_moe_dict(qwen3_vl: dict, *, experts: int = 8, top_k: int = 2, inner: int = 24,
                      layers: int | None = None, sparse_step: int = 1, mlp_only_layers=()) -> dict:
    """A Qwen3-VL config dict made Qwen3-VL-MoE: `experts` experts of width `inner`, `top_k` per
    token, sparse where transformers' rule (`decoder_sparse_step`, `mlp_only_layers`) says."""
    import copy

    config = copy.deepcopy(qwen3_vl)
    config["model_type"] = "qwen3_vl_moe"
    text = config["text_config"]
    text.update(model_type="qwen3_vl_moe_text", num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=inner, decoder_sparse_step=sparse_step, mlp_only_layers=list(mlp_only_layers))
    if layers is not None:
        text["num_hidden_layers"] = layers
    config["vision_config"]["model_type"] = "qwen3_vl_moe_vision"
    config["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
    return config


def spec_model_config(hidden: int = 64, layers: int = 2, experts: int = 0) -> dict:
    """An untied Qwen3-VL with the real vocabulary, 4 heads (2 KV) of hidden / 4 and a one-block
    vision tower: the speculative tests' and benchmarks' draft/target shape; with `experts`, a
    Qwen3-VL-MoE of that many experts (top 2, width hidden / 2) in every layer."""
    config = qwen3_vl_dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                           tie_word_embeddings=False, rope_theta=10000.0, vision=dict(num_position_embeddings=64))
    return qwen3_vl_moe_dict(config, experts=experts, inner=hidden // 2) if experts else config


def build_spec_model(folder: str, seed: int, hidden: int = 64, layers: int = 2, rate: float = 0.12,
                     experts: int = 0) -> str:
    """A random `spec_model_config` checkpoint (weights, the real Qwen tokenizer, a small-image
    preprocessor) in `folder` that writes steps: random weights almost never emit the step
    delimiter, so its output column is pointed along a random direction and scaled to win on
    about `rate` of the positions of real forwards (steps then come in varied lengths)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ..demo import write_processor_files
    from ..generation import forward
    from ..models.qwen_vl.config import QwenVLConfig
    from ..models.qwen_vl.model import QwenVLModel
    from ..models.qwen_vl.params import save_state

    config = spec_model_config(hidden, layers, experts)
    model = QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    weight = np.array(model.lm_head.weight[...])  # (vocab, hidden), a writable copy
    u = rng.standard_normal(weight.shape[1]).astype(np.float32)
    weight[DELIMITER] = u
    model.lm_head.weight[...] = jnp.asarray(weight)
    logits = np.asarray(forward(model, rng.integers(0, 150000, (4, 96)))).reshape(-1, weight.shape[0])
    along_u = logits[:, DELIMITER]
    best_other = np.delete(logits, DELIMITER, axis=1).max(-1)
    ratio = np.where(along_u > 0, best_other / np.maximum(along_u, 1e-9), np.inf)
    weight[DELIMITER] = u * np.quantile(ratio, rate)
    model.lm_head.weight[...] = jnp.asarray(weight)
    save_state(model, folder, config)
    write_processor_files(folder, shortest_edge=1024, longest_edge=64 * 64)
    return folder


def write_random_pair(folder: str) -> str:
    """A random target (hidden 256, 4 layers) and draft (64, 1) in `folder`/target and /draft, and
    `folder`/pair.yaml naming them: `dreamr reason --config` before real checkpoints are at hand."""
    os.makedirs(folder, exist_ok=True)
    build_spec_model(os.path.join(folder, "target"), seed=1, hidden=256, layers=4)
    build_spec_model(os.path.join(folder, "draft"), seed=2, hidden=64, layers=1)
    path = os.path.join(folder, "pair.yaml")
    with open(path, "w") as f:
        f.write(f"draft: {os.path.abspath(os.path.join(folder, 'draft'))}\n"
                f"target: {os.path.abspath(os.path.join(folder, 'target'))}\n"
                "spec:\n  alpha: 0.5\n  steps: {max_step_tokens: 32, token_budget: 96}\n")
    return path


# ---- transformers twins ---------------------------------------------------------------------------


def build_torch_model(config: dict, seed: int = 0, attn_implementation: str = "sdpa"):
    """transformers' model of `config` (Qwen3-VL, Qwen3-VL-MoE or Qwen2.5-VL), float32, eval mode, with every
    tensor randomly perturbed: a fresh init leaves norms at 1 and biases at 0, and a tensor at its
    init value would hide a wrong mapping of it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    d = dict(config)
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    cls = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[cfg.model_type]
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def count_torch_params(torch_model) -> dict:
    """Parameters of a transformers Qwen-VL: text (lm_head included), vision, total; tied tensors once."""
    text, vision, lm_head = 0, 0, 0
    seen = set()
    for name, p in torch_model.named_parameters():  # tied tensors are listed once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".visual." in name or name.startswith("visual."):
            vision += p.numel()
        elif name.startswith("lm_head"):
            lm_head += p.numel()
        else:
            text += p.numel()
    return dict(text=text + lm_head, vision=vision, total=text + lm_head + vision)

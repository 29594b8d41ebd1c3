"""QwenVLConfig: the architecture numbers of a Qwen3-VL or Qwen2.5-VL checkpoint.

`from_hf` goes through transformers' own config classes, so every layout a hub
`config.json` has used (nested `text_config`, the older flat Qwen2.5-VL layout,
`rope_scaling` vs `rope_parameters`) is normalised exactly as transformers does it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")
# Model types computed by another family's code: Qwen3-VL-MoE is Qwen3-VL with sparse MLPs.
_FAMILY = {"qwen3_vl_moe": "qwen3_vl"}


class UnsupportedModelError(ValueError):
    """The checkpoint's `model_type` (or one of its settings) is not one we implement."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    family: str  # "qwen3_vl" | "qwen2_5_vl"
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    rope_theta: float
    # Qwen3-VL only
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()
    # Qwen2.5-VL only
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in `pixel_values` (C * T * p * p)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool  # Qwen3-VL: T/H/W frequencies interleaved; Qwen2.5-VL: contiguous sections
    qk_norm: bool  # Qwen3 decoder
    qkv_bias: bool  # Qwen2 decoder
    max_position_embeddings: int
    # Qwen3-VL-MoE: a layer's MLP is a sparse mixture of `num_experts` (0: every layer dense) when
    # it is not in `mlp_only_layers` and (index + 1) is a multiple of `decoder_sparse_step`.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer `index` has a sparse MoE block (transformers' rule)."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_id: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        """The code path: "qwen3_vl" (also for Qwen3-VL-MoE) or "qwen2_5_vl"."""
        return _FAMILY.get(self.model_type, self.model_type)

    @classmethod
    def from_hf(cls, config_dict: dict[str, Any], *, source: str = "config.json") -> "QwenVLConfig":
        """Build from a Hugging Face `config.json` dict (no download, no model)."""
        import transformers

        model_type = config_dict.get("model_type")
        if model_type is None:
            raise UnsupportedModelError(f"{source}: has no 'model_type' field; expected one of {SUPPORTED_MODEL_TYPES}")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type '{model_type}' is not supported; dreamr-jax implements {SUPPORTED_MODEL_TYPES}"
            )
        fields = {k: v for k, v in config_dict.items() if k != "model_type"}
        hf = transformers.AutoConfig.for_model(model_type, **fields)
        return cls.from_transformers(hf, source=source)

    @classmethod
    def from_transformers(cls, hf, *, source: str = "config") -> "QwenVLConfig":
        model_type = hf.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"{source}: model_type '{model_type}' is not supported")
        t, v = hf.text_config, hf.vision_config
        family = _FAMILY.get(model_type, model_type)
        rope = dict(getattr(t, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise UnsupportedModelError(f"{source}: text rope_type '{rope_type}' is not supported (only 'default')")
        if family == "qwen3_vl":
            section = tuple(rope.get("mrope_section", (24, 20, 20)))
            interleaved = True
            head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
            qk_norm, qkv_bias = True, bool(getattr(t, "attention_bias", False))
        else:
            section = tuple(rope.get("mrope_section", (16, 24, 24)))
            interleaved = False
            head_dim = t.hidden_size // t.num_attention_heads
            qk_norm, qkv_bias = False, True
            if getattr(t, "use_sliding_window", False):
                raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")
        if sum(section) != head_dim // 2:
            raise UnsupportedModelError(
                f"{source}: mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}"
            )
        moe = {}
        if model_type == "qwen3_vl_moe":
            moe = dict(num_experts=int(t.num_experts), num_experts_per_tok=int(t.num_experts_per_tok),
                       moe_intermediate_size=int(t.moe_intermediate_size),
                       decoder_sparse_step=int(t.decoder_sparse_step),
                       mlp_only_layers=tuple(int(i) for i in (t.mlp_only_layers or ())))
            if moe["num_experts"] and not 0 < moe["num_experts_per_tok"] <= moe["num_experts"]:
                raise UnsupportedModelError(f"{source}: num_experts_per_tok {moe['num_experts_per_tok']} must be in "
                                            f"1..num_experts ({moe['num_experts']})")
            if moe["decoder_sparse_step"] < 1:
                raise UnsupportedModelError(f"{source}: decoder_sparse_step must be >= 1, got "
                                            f"{moe['decoder_sparse_step']}")
        text = TextConfig(
            family=family,
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            head_dim=head_dim,
            hidden_act=t.hidden_act,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
            mrope_section=section,  # type: ignore[arg-type]
            mrope_interleaved=interleaved,
            qk_norm=qk_norm,
            qkv_bias=qkv_bias,
            max_position_embeddings=t.max_position_embeddings,
            **moe,
        )
        vrope = dict(getattr(v, "rope_parameters", None) or {})
        common = dict(
            family=family,
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            hidden_act=v.hidden_act,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            out_hidden_size=v.out_hidden_size,
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        if family == "qwen3_vl":
            vision = VisionConfig(
                **common,
                num_position_embeddings=v.num_position_embeddings,
                deepstack_visual_indexes=tuple(v.deepstack_visual_indexes),
            )
            side = int(v.num_position_embeddings**0.5)
            if side * side != v.num_position_embeddings:
                raise UnsupportedModelError(f"{source}: vision num_position_embeddings must be a square")
        else:
            vision = VisionConfig(
                **common, window_size=v.window_size, fullatt_block_indexes=tuple(v.fullatt_block_indexes)
            )
        if vision.out_hidden_size != text.hidden_size:
            raise UnsupportedModelError(
                f"{source}: vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}"
            )
        tie = getattr(hf, "tie_word_embeddings", None)
        if tie is None:
            tie = getattr(t, "tie_word_embeddings", False)
        eos = getattr(t, "eos_token_id", None) or getattr(hf, "eos_token_id", None)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            text=text,
            vision=vision,
            tie_word_embeddings=bool(tie),
            image_token_id=hf.image_token_id,
            video_token_id=hf.video_token_id,
            vision_start_token_id=hf.vision_start_token_id,
            vision_end_token_id=getattr(hf, "vision_end_token_id", 151653),
            eos_token_id=eos,
        )

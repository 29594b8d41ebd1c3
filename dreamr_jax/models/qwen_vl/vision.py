"""Vision towers: Qwen3-VL (learned position table, LayerNorm, GELU MLP, deepstack mergers)
and Qwen2.5-VL (windowed attention with full-attention blocks, RMSNorm, gated MLP).

The tower processes one flat sequence of patches from every image of a request, padded to a
bucket; attention is block-diagonal through segment ids (one segment per image frame, or per
window), so images of different sizes never attend to each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import VisionConfig
from .text import GatedMLP, Linear, RMSNorm, activation, apply_rotary, attention


class LayerNorm(nnx.Module):
    def __init__(self, size: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.bias = nnx.Param(jnp.zeros((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask_pp):
        p, e = x.shape
        qkv = self.qkv(x).reshape(p, 3, self.num_heads, -1)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # transformers rotates vision q/k in float32 whatever the weights' dtype.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = attention(q[None], k[None], v[None], mask_pp[None], q.shape[-1] ** -0.5)[0]
        return self.proj(out.reshape(p, e))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        if cfg.family == "qwen3_vl":
            self.norm1 = LayerNorm(cfg.hidden_size, 1e-6, dtype=dtype)
            self.norm2 = LayerNorm(cfg.hidden_size, 1e-6, dtype=dtype)
            self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)
        else:
            self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
            self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True, dtype=dtype,
                                rngs=rngs)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask_pp):
        x = x + self.attn(self.norm1(x), cos, sin, mask_pp)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """2x2 neighbouring patches -> one text-width token. Qwen3-VL's deepstack mergers normalise
    after the shuffle (`postshuffle`), the main one before; Qwen2.5-VL uses RMSNorm before."""

    def __init__(self, cfg: VisionConfig, *, postshuffle: bool, dtype, rngs):
        wide = cfg.hidden_size * cfg.merge_unit
        self.wide = wide
        self.postshuffle = postshuffle
        self.family = cfg.family
        if cfg.family == "qwen3_vl":
            self.norm = LayerNorm(wide if postshuffle else cfg.hidden_size, 1e-6, dtype=dtype)
            self.linear_fc1 = Linear(wide, wide, bias=True, dtype=dtype, rngs=rngs)
            self.linear_fc2 = Linear(wide, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)
        else:
            self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
            self.mlp_0 = Linear(wide, wide, bias=True, dtype=dtype, rngs=rngs)
            self.mlp_2 = Linear(wide, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        if self.family == "qwen3_vl":
            x = self.norm(x.reshape(-1, self.wide)) if self.postshuffle else self.norm(x).reshape(-1, self.wide)
            return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))
        x = self.ln_q(x).reshape(-1, self.wide)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.cfg = cfg
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, bias=cfg.family == "qwen3_vl", dtype=dtype, rngs=rngs)
        if cfg.family == "qwen3_vl":
            self.pos_embed = nnx.Param(
                jax.random.normal(rngs.params(), (cfg.num_position_embeddings, cfg.hidden_size), dtype) * 0.02
            )
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False, dtype=dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle=True, dtype=dtype, rngs=rngs) for _ in cfg.deepstack_visual_indexes]
        )

    def rotary(self, rotary_positions):
        half = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
        freqs = rotary_positions.astype(jnp.float32)[..., None] * inv_freq  # (P, 2, D/4)
        freqs = freqs.reshape(freqs.shape[0], -1)  # [h freqs, w freqs]
        emb = jnp.concatenate([freqs, freqs], -1)
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(self, vin):
        """vin: dict of VisionInputs arrays. Returns (tokens (P/unit, out), [deepstack tokens])
        in the order the image tokens appear in the prompt."""
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(vin["pixel_values"].astype(dtype))
        if self.cfg.family == "qwen3_vl":
            table = self.pos_embed[...]
            x = x + jnp.einsum("pk,pkd->pd", vin["table_weight"].astype(dtype), table[vin["table_index"]])
        cos, sin = self.rotary(vin["rotary_positions"])
        seg, wseg = vin["segment_ids"], vin["window_segment_ids"]
        full_mask = seg[:, None] == seg[None, :]
        window_mask = wseg[:, None] == wseg[None, :]
        deepstack = []
        for i, block in enumerate(self.blocks):
            use_full = self.cfg.family == "qwen3_vl" or i in self.cfg.fullatt_block_indexes
            x = block(x, cos, sin, full_mask if use_full else window_mask)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        merged = self.merger(x)
        restore = vin["unit_restore"]
        return merged[restore], [d[restore] for d in deepstack]

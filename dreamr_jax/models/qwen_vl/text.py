"""Qwen3 / Qwen2 decoder: RMSNorm, multimodal rotary embedding, GQA attention over a KV cache.

Shapes: B batch, S new tokens, L cache slots, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import TextConfig

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a harmless uniform softmax, not NaN


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# Module-level functions, not lambdas: the activation is part of a module's graph definition,
# and a fresh lambda per load would make every loaded model a new jit cache key (a recompile
# of every jitted function after each load or resume).
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu_fast": gelu_tanh,
                "gelu": gelu_exact, "quick_gelu": quick_gelu}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation '{name}'; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class RMSNorm(nnx.Module):
    """T5/Qwen RMSNorm: normalise in float32, cast back, then scale (transformers' order)."""

    def __init__(self, size: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x (..., S, heads, D); cos/sin (..., S, D), broadcast over heads."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


def text_rotary(positions_3bs, inv_freq, axis_per_freq, dtype):
    """Multimodal rotary tables (B, S, D) from 3-D positions (3, B, S).

    Each frequency reads the position of the axis `axis_per_freq` assigns it (interleaved
    for Qwen3-VL, sectioned for Qwen2.5-VL); float32 throughout like transformers.
    """
    freqs = positions_3bs.astype(jnp.float32)[..., None] * inv_freq  # (3, B, S, D/2)
    freqs = jnp.where(axis_per_freq == 0, freqs[0], jnp.where(axis_per_freq == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def attention(q, k, v, mask, scale, kv_layout: str = "blkd"):
    """Grouped-query attention without repeating K/V.

    q (B, S, H, D); k, v (B, L, K, D) ("blkd", fresh projections) or (B, K, L, D) ("bkld", the
    KV cache's layout, which the score and value matmuls read without a per-step transpose);
    mask (B, S, L) bool (True = may attend). Softmax in float32.
    """
    b, s, h, d = q.shape
    kv = k.shape[2] if kv_layout == "blkd" else k.shape[1]
    q = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum(f"bskgd,{kv_layout}->bkgsl", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgsl,{kv_layout}->bskgd", probs, v)
    return out.reshape(b, s, h, d)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored (in, out). `Int4Linear` has the same interface."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out), dtype) * 0.02)
        self.bias = nnx.Param(jnp.zeros((n_out,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.dot(x, self.kernel[...])
        return y + self.bias[...] if self.bias is not None else y


def make_linear(name: str, n_in: int, n_out: int, *, bias: bool, dtype, rngs: nnx.Rngs, int4=None,
                int4_method: str = "auto"):
    """A dense `Linear`, or an `Int4Linear` when `int4` (projection name -> group size) lists `name`."""
    if int4 and name in int4:
        from ...quant.linear import Int4Linear

        return Int4Linear(n_in, n_out, group_size=int4[name], bias=bias, dtype=dtype, rngs=rngs, method=int4_method)
    return Linear(n_in, n_out, bias=bias, dtype=dtype, rngs=rngs)


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, int4=None, int4_method: str = "auto"):
        self.cfg = cfg
        h, kv, d, e = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        q = dict(dtype=dtype, rngs=rngs, int4=int4, int4_method=int4_method)
        self.q_proj = make_linear("q_proj", e, h * d, bias=cfg.qkv_bias, **q)
        self.k_proj = make_linear("k_proj", e, kv * d, bias=cfg.qkv_bias, **q)
        self.v_proj = make_linear("v_proj", e, kv * d, bias=cfg.qkv_bias, **q)
        # Qwen2 has no o_proj bias; Qwen3 follows attention_bias (False in every release).
        self.o_proj = make_linear("o_proj", h * d, e, bias=cfg.qkv_bias and cfg.qk_norm, **q)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, mask, layer_cache, write_slots):
        """x (B, S, E). layer_cache: None (attend over x itself) or (k_cache, v_cache) (B, K, L, D)
        with the new keys written at `write_slots` (B, S); mask (B, S, n) then covers the first
        n <= L cache slots. Returns (out, new layer cache)."""
        b, s, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).reshape(b, s, -1, d)
        k = self.k_proj(x).reshape(b, s, -1, d)
        v = self.v_proj(x).reshape(b, s, -1, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            rows = jnp.arange(b)[:, None]
            # mode="drop": slots past the end (padding tokens of a full cache) are discarded, never clamped.
            # (rows, :, slots) indexes (B, S) positions; the updates are (B, S, K, D)
            k_cache = k_cache.at[rows, :, write_slots].set(k.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[rows, :, write_slots].set(v.astype(v_cache.dtype), mode="drop")
            layer_cache = (k_cache, v_cache)
            # Attend only over the slots the mask covers (a static prefix of the cache, sized by
            # the caller to the valid length), not over every allocated slot.
            n = mask.shape[-1]
            out = attention(q, k_cache[:, :, :n], v_cache[:, :, :n], mask, d**-0.5, kv_layout="bkld")
        else:
            out = attention(q, k, v, mask, d**-0.5)
        return self.o_proj(out.reshape(b, s, -1)), layer_cache


class GatedMLP(nnx.Module):
    def __init__(self, n_in: int, n_hidden: int, act: str, *, bias: bool, dtype, rngs: nnx.Rngs, int4=None,
                 int4_method: str = "auto"):
        q = dict(bias=bias, dtype=dtype, rngs=rngs, int4=int4, int4_method=int4_method)
        self.gate_proj = make_linear("gate_proj", n_in, n_hidden, **q)
        self.up_proj = make_linear("up_proj", n_in, n_hidden, **q)
        self.down_proj = make_linear("down_proj", n_hidden, n_in, **q)
        self.act = activation(act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, int4=None, int4_method: str = "auto"):
        """int4: {"self_attn.q_proj": group size, "mlp.down_proj": ...} for the projections held as int4."""
        int4 = int4 or {}
        sub = lambda prefix: {k.split(".", 1)[1]: v for k, v in int4.items() if k.startswith(prefix + ".")}  # noqa: E731
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = TextAttention(cfg, dtype=dtype, rngs=rngs, int4=sub("self_attn"), int4_method=int4_method)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype, rngs=rngs,
                            int4=sub("mlp"), int4_method=int4_method)

    def __call__(self, x, cos, sin, mask, layer_cache, write_slots):
        attn, layer_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, write_slots)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, layer_cache

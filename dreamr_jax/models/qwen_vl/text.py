"""Qwen3 / Qwen2 decoder: RMSNorm, multimodal rotary embedding, GQA attention over a KV cache, the
Qwen3-VL-MoE sparse MLP.

Shapes: B batch, S new tokens, L cache slots, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ...kv_cache import read_prefix, write_slots_of
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
    KV cache's layout); mask (B, S, L) bool (True = may attend). Softmax in float32.

    Over a cache, the products take the cache as their left operand, contracting its minor axis
    (scores (B, K, L, G*S) = K x q^T, then probs^T x V): written the other way round, XLA:CPU
    copied every layer's key window into a transposed (B, K, D, L) layout on every step, which
    doubled the cost of attention over a long cache (0.56 against 0.28 ms per layer at 4k slots).
    """
    b, s, h, d = q.shape
    if kv_layout == "bkld":
        kv = k.shape[1]
        g = h // kv
        qg = q.reshape(b, s, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, d)
        dims = (((3,), (3,)), ((0, 1), (0, 1)))
        scores = jax.lax.dot_general(k, qg, dims, preferred_element_type=jnp.float32) * scale  # (B, K, L, G*S)
        scores = scores.reshape(b, kv, -1, g, s)
        scores = jnp.where(jnp.swapaxes(mask, 1, 2)[:, None, :, None, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=2).astype(v.dtype).reshape(b, kv, -1, g * s)
        out = jax.lax.dot_general(probs, v, (((2,), (2,)), ((0, 1), (0, 1))))  # (B, K, G*S, D)
        return out.reshape(b, kv, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
    kv = k.shape[2]
    q = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,blkd->bkgsl", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgsl,blkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)


def window_buckets(max_len: int, minimum: int = 128) -> tuple[int, ...]:
    """The cache prefixes a run-time window chooses among: powers of two from `minimum` below
    `max_len`, then `max_len` itself. Few branches (7 for an 8k cache), and attention reads at
    most twice the valid slots (or `minimum`)."""
    out, n = [], minimum
    while n < max_len:
        out.append(n)
        n *= 2
    return tuple(out) + (int(max_len),)


@dataclasses.dataclass(frozen=True)
class CacheWindow:
    """Attention over a prefix of the KV cache chosen at run time: the smallest of `buckets`
    (static) that holds every slot a new token may see, picked by `index` (a traced scalar).

    A decode loop's rows grow inside one program, so a prefix fixed when it is traced would
    have to cover the loop's last step (or the whole cache). With the window each layer
    branches (`lax.switch`) to attention over the prefix the current longest row needs; every
    branch is compiled once with the program, so no length recompiles it. New token (b, s)
    sees cache slots <= write_slots[b, s] (causal, right-aligned rows)."""

    buckets: tuple[int, ...]
    index: jax.Array  # () int32: which bucket
    write_slots: jax.Array  # (B, S) int32

    @classmethod
    def covering(cls, write_slots, max_len: int, minimum: int = 128) -> "CacheWindow":
        buckets = window_buckets(max_len, minimum)
        # slots past the cache (padding tokens of a full row) are dropped on write, never needed
        needed = jnp.minimum(jnp.max(write_slots) + 1, max_len)
        index = jnp.sum(needed > jnp.asarray(buckets[:-1], jnp.int32)).astype(jnp.int32)
        return cls(buckets, index, write_slots)

    def attend(self, q, k_cache, v_cache, scale, dtype):
        """Attention of q (B, S, H, D) over the chosen prefix of (B, K, L, D) caches holding
        `dtype` keys and values."""
        def prefix(n, q, k_cache, v_cache, write_slots):
            mask = jnp.arange(n, dtype=jnp.int32)[None, None, :] <= write_slots[:, :, None]
            return attention(q, read_prefix(k_cache, n, dtype), read_prefix(v_cache, n, dtype), mask, scale,
                             kv_layout="bkld")

        branches = [lambda *a, n=n: prefix(n, *a) for n in self.buckets]
        if len(branches) == 1:
            return branches[0](q, k_cache, v_cache, self.write_slots)
        return jax.lax.switch(self.index, branches, q, k_cache, v_cache, self.write_slots)


class Linear(nnx.Module):
    """y = x @ weight^T (+ bias); weight stored (out, in), as PyTorch and Hugging Face checkpoints
    store it. `Int4Linear` has the same interface.

    (out, in) rather than (in, out) for XLA:CPU: with the input axis contiguous, a one-row product
    on a 16-bit weight runs as one fused matrix-vector loop that reads the weight as it is; stored
    (in, out) XLA widens the whole weight to float32 first on every call (a bf16 decode step of the
    benchmark model: 7.6 -> 4.7 ms). docs/BENCHMARKS.md, issue 19's section."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        # drawn (in, out) and transposed: the same random model as when it was stored (in, out)
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out), dtype).T * 0.02)
        self.bias = nnx.Param(jnp.zeros((n_out,), dtype)) if bias else None

    def __call__(self, x):
        w = self.weight[...]
        rows = math.prod(x.shape[:-1])
        if rows <= 16 and jnp.dtype(x.dtype).itemsize > 2:
            # few float32 rows (decode): (out, rows) = w . x^T, rows moved first. XLA:CPU runs this
            # form 1.6x faster than x . w^T at 1 row and 1.7x at 8 (the layer's seven products).
            y = jnp.moveaxis(jax.lax.dot_general(w, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)
        else:
            # float32 accumulation, rounded once to x's dtype: for 16-bit weights XLA:CPU runs this
            # form of the small decode products 1.4-2.5x faster than a 16-bit-output dot
            y = jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
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
        n <= L cache slots, or is a `CacheWindow` that picks n at run time. Returns (out, new
        layer cache)."""
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
            k_cache = write_slots_of(k_cache, rows, write_slots, k)
            v_cache = write_slots_of(v_cache, rows, write_slots, v)
            layer_cache = (k_cache, v_cache)
            # Attend only over the slots the mask covers (a prefix of the cache sized to the valid
            # length, static or chosen at run time), not over every allocated slot.
            if isinstance(mask, CacheWindow):
                out = mask.attend(q, k_cache, v_cache, d**-0.5, k.dtype)
            else:
                n = mask.shape[-1]
                out = attention(q, read_prefix(k_cache, n, k.dtype), read_prefix(v_cache, n, v.dtype), mask, d**-0.5,
                                kv_layout="bkld")
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


class Experts(nnx.Module):
    """The routed experts of a sparse MoE block, stacked in transformers' (current) layout:
    gate_up_proj (E, 2I, H), gate rows first, and down_proj (E, H, I)."""

    def __init__(self, n_experts: int, hidden: int, inner: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.gate_up_proj = nnx.Param(jax.random.normal(rngs.params(), (n_experts, 2 * inner, hidden), dtype) * 0.02)
        self.down_proj = nnx.Param(jax.random.normal(rngs.params(), (n_experts, hidden, inner), dtype) * 0.02)
        self.act = activation(act)
        # (mesh, axis) when the experts are split by expert over a mesh axis (expert parallelism):
        # set by the role that places them (`sharding.expert_parallel_split`), part of the graph.
        self.expert_mesh = None

    def __call__(self, x, index, weights):
        if self.expert_mesh is not None:
            return self._expert_parallel(x, index, weights)
        return self._local(x, index, weights, self.gate_up_proj[...], self.down_proj[...])

    def _expert_parallel(self, x, index, weights):
        """Each device runs the assignments of the experts it holds (the others weighted 0, their
        expert index clamped into its range), then one psum of the (T, H) outputs: no expert
        weight leaves its device."""
        from jax.sharding import PartitionSpec as P

        mesh, axis = self.expert_mesh

        def local(x, index, weights, gate_up, down):
            held = gate_up.shape[0]
            first = jax.lax.axis_index(axis) * held
            mine = (index >= first) & (index < first + held)
            out = self._local(x, jnp.where(mine, index - first, 0), jnp.where(mine, weights, 0), gate_up, down)
            return jax.lax.psum(out, axis)

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P(axis), P(axis)), out_specs=P(),
                             check_vma=False)(x, index, weights, self.gate_up_proj[...], self.down_proj[...])

    def _local(self, x, index, weights, gate_up, down):
        """x (T, H), index / weights (T, k): each token's experts and their weights -> (T, H), the
        weighted sum of those experts' gated MLPs of the token.

        Few assignments (T k < E, decoding): the chosen experts' weights are gathered per
        assignment, so a step reads only those. Many (prefill, checks): the assignments are
        sorted by expert and each expert's rows go through one grouped product
        (`jax.lax.ragged_dot`). Both are exact. Known costs, not yet addressed: XLA lowers
        ragged_dot on CPU (and on GPU without its experimental ragged-dot fusion) as a masked
        dense product over every expert. With the experts split over devices (`expert_mesh`) each
        device runs only its own experts' assignments (`_expert_parallel`)."""
        t, k = index.shape
        inner = down.shape[-1]
        if t * k < gate_up.shape[0]:
            h = jnp.einsum("th,tkoh->tko", x, gate_up[index])
            y = jnp.einsum("tki,tkhi->tkh", self.act(h[..., :inner]) * h[..., inner:], down[index])
            return jnp.einsum("tkh,tk->th", y, weights.astype(y.dtype))
        flat = index.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token = order // k
        sizes = jnp.bincount(flat, length=gate_up.shape[0]).astype(jnp.int32)
        h = jax.lax.ragged_dot(x[token], jnp.swapaxes(gate_up, 1, 2), sizes)
        y = jax.lax.ragged_dot(self.act(h[:, :inner]) * h[:, inner:], jnp.swapaxes(down, 1, 2), sizes)
        y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
        return jnp.zeros_like(x).at[token].add(y)


class SparseMoE(nnx.Module):
    """Qwen3-VL-MoE's sparse MLP: a linear router (`gate`), softmax over the experts, the top
    k renormalised to sum to 1, and the weighted sum of those experts (`Experts`)."""

    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act,
                               dtype=dtype, rngs=rngs)
        self.top_k = cfg.num_experts_per_tok

    def route(self, x):
        """x (T, H) -> (router logits (T, E), weights (T, k) in x's dtype, expert index (T, k)),
        as transformers' router computes them (softmax in float32)."""
        logits = self.gate(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        return logits, (top / top.sum(-1, keepdims=True)).astype(logits.dtype), index

    def __call__(self, x):
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        _, weights, index = self.route(flat)
        return self.experts(flat, index, weights).reshape(b, s, h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, int4=None, int4_method: str = "auto",
                 index: int = 0):
        """int4: {"self_attn.q_proj": group size, "mlp.down_proj": ...} for the projections held as int4.
        index: the layer's place in the decoder (which layers are sparse MoE: `cfg.is_moe_layer`)."""
        int4 = int4 or {}
        sub = lambda prefix: {k.split(".", 1)[1]: v for k, v in int4.items() if k.startswith(prefix + ".")}  # noqa: E731
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = TextAttention(cfg, dtype=dtype, rngs=rngs, int4=sub("self_attn"), int4_method=int4_method)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if cfg.is_moe_layer(index):
            if sub("mlp"):
                raise ValueError(f"layer {index}: int4 experts are not supported (the MoE block holds them dense)")
            self.mlp = SparseMoE(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype,
                                rngs=rngs, int4=sub("mlp"), int4_method=int4_method)

    def __call__(self, x, cos, sin, mask, layer_cache, write_slots):
        attn, layer_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, write_slots)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, layer_cache

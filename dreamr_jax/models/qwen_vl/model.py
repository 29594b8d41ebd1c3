"""Qwen-VL: embed tokens -> scatter image features -> decoder (+ deepstack) -> logits.

One module serves both families; the config picks the decoder flavour (Qwen3 q/k norm vs
Qwen2 q/k/v bias), the rotary layout and the vision tower. `extend` is the single path that
runs new tokens through the decoder, with or without a KV cache: prefill, decode, checking a
candidate against a cached prefix and a plain forward are all calls of it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...kv_cache import KVCache
from .config import QwenVLConfig
from .rope_index import mrope_axis_per_frequency
from .text import CacheWindow, DecoderLayer, Linear, RMSNorm, text_rotary
from .vision import VisionTower


class QwenVLModel(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, int4=None, int4_method: str = "auto"):
        """int4: {"layers.3.mlp.down_proj": group size, ...}: decoder projections held as `Int4Linear`
        (what `load_model` finds quantized in a checkpoint); None: all dense."""
        t = cfg.text
        self.cfg = cfg
        self.dtype = dtype
        int4 = int4 or {}
        for name in int4:
            if not re.fullmatch(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)", name) or \
                    int(name.split(".")[1]) >= t.num_hidden_layers:
                raise ValueError(f"int4: '{name}' is not a decoder projection of this model")
        per_layer = [{k.split(".", 2)[2]: v for k, v in int4.items() if k.split(".")[1] == str(i)}
                     for i in range(t.num_hidden_layers)]
        self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), (t.vocab_size, t.hidden_size), dtype) * 0.02)
        self.layers = nnx.List([DecoderLayer(t, dtype=dtype, rngs=rngs, int4=per_layer[i], int4_method=int4_method,
                                             index=i) for i in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(t.hidden_size, t.vocab_size, bias=False,
                                                                   dtype=dtype, rngs=rngs)
        self.visual = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)

    # ---- pieces -------------------------------------------------------------------------

    def encode_images(self, vision_inputs: dict):
        """Image tokens (N, hidden) and deepstack features [(N, hidden)] for a request's images."""
        return self.visual(vision_inputs)

    def embed(self, input_ids, image_tokens=None, image_gather=None):
        """Token embeddings with image features scattered in at the image-token positions.

        image_gather (B, S) int32: index into `image_tokens` for image positions, -1 elsewhere."""
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        if image_tokens is not None:
            picked = jnp.take(image_tokens.astype(x.dtype), jnp.maximum(image_gather, 0), axis=0)
            x = jnp.where(image_gather[..., None] >= 0, picked, x)
        return x

    def head_table(self):
        """The output head's weights (V, E): the tied embedding table or the head's own weight."""
        return self.embed_tokens[...] if self.lm_head is None else self.lm_head.weight[...]

    def logits(self, hidden):
        """Float32 logits (..., V) of final hidden states (..., E), accumulated in float32 and rounded
        once to the model's dtype, as a 16-bit head outputs them: a 16-bit model's tokens must not
        depend on how many rows a call holds."""
        table = self.head_table()
        rows = int(np.prod(hidden.shape[:-1]))
        if rows == 1 or jnp.dtype(hidden.dtype).itemsize > 2:
            # One row: XLA:CPU runs this form as a matrix-vector product that reads a 16-bit table
            # as it is (3.2 ms for 152k x 512 in bf16); the float32-accumulating form below goes to
            # a GEMM library that takes 100 ms for one row. The 16-bit result is widened before it
            # is rounded, so `round_to_dtype` does the rounding either way.
            out = jnp.dot(hidden, table.T).astype(jnp.float32)
        else:
            # Several rows of a 16-bit model: XLA:CPU hands this form (no transpose, float32
            # result) to YNNPACK, which reads the bf16 table as it is (7 ms for 8 rows); a 16-bit
            # result or a transposed operand makes XLA widen the whole table to float32 on every
            # call first (95-110 ms). docs/BENCHMARKS.md, issue 19's section.
            out = jax.lax.dot_general(hidden, table, (((hidden.ndim - 1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return round_to_dtype(out, hidden.dtype)

    def logits_vocab_major(self, hidden):
        """Float32 logits (V, B) of final hidden states (B, E), rounded as `logits` rounds: the head
        as table x hidden^T. For a float32 model a decode loop with several rows keeps this layout
        and reduces along the vocabulary axis: XLA:CPU computes a (B > 1, 152k) float32 head with its
        reductions in this form about 1.2x faster than as hidden x table^T. A 16-bit head is faster
        row-major (`decode_vocab_axis`)."""
        out = jax.lax.dot_general(self.head_table(), hidden, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        return round_to_dtype(out, hidden.dtype)

    def decode_vocab_axis(self, rows: int) -> int:
        """The vocabulary axis a decode loop of `rows` rows should hold its logits along: 0
        (`logits_vocab_major`, (V, B)) for several rows of a float32 model, else -1 (`logits`).
        Measured on XLA:CPU with the sampling reductions (docs/BENCHMARKS.md): at 8 rows float32
        13.7 ms vocabulary-major against 16.7 ms row-major, bf16 14.5 ms against 11.0 ms."""
        # the head's own dtype, not `self.dtype`: a model recast for compute (SAPO's samplers) keeps
        # the dtype it was built with
        return 0 if rows > 1 and jnp.dtype(self.head_table().dtype).itemsize > 2 else -1

    # ---- the decoder ----------------------------------------------------------------------

    def decode_hidden(self, x, positions_3bs, mask_bsl, cache: KVCache | None, write_slots=None,
                      deepstack=None, image_gather=None):
        """Run the decoder over embeddings x (B, S, E). Returns (final-normed hidden, new cache layers)."""
        t = self.cfg.text
        # numpy constants: folded into the trace, not model state.
        inv_freq = (1.0 / (t.rope_theta ** (np.arange(0, t.head_dim, 2, dtype=np.float32)
                                            / t.head_dim))).astype(np.float32)
        cos, sin = text_rotary(positions_3bs, inv_freq, mrope_axis_per_frequency(t), x.dtype)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_cache = layer(x, cos, sin, mask_bsl, layer_cache, write_slots)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
            if deepstack is not None and i < len(deepstack):
                # DeepStack: vision features of early tower layers are added to the first
                # decoder layers' outputs at the image positions.
                add = jnp.take(deepstack[i].astype(x.dtype), jnp.maximum(image_gather, 0), axis=0)
                x = x + jnp.where(image_gather[..., None] >= 0, add, 0)
        return self.norm(x), (tuple(new_keys), tuple(new_values))

    def extend(self, cache: KVCache, input_ids, num_new, positions_3bs=None, image_tokens=None,
               deepstack=None, image_gather=None, *, attend_len: int | None = None, write_slots=None,
               new_visible=None):
        """Append up to S tokens per row to the cache and return (hidden (B, S, E), new cache).

        input_ids (B, S): row b's real new tokens are the first num_new[b]; the rest is padding
        whose keys land in slots past the row's new length (ignored, later overwritten).
        positions_3bs defaults to text positions `slot + rope_delta`.

        attend_len (static): attention reads only cache slots [0, attend_len), which must hold
        every valid slot and every written one. Default (None): a prefix chosen at run time,
        the smallest power of two (>= 128, or the whole cache) holding the longest row after
        this call (`text.CacheWindow`), so a program's cost follows its rows' lengths and one
        program serves every length.

        Several sequences packed in one row (tree-style attention): `write_slots` (B, S) gives
        each new token its cache slot and `new_visible` (B, S, S) which new tokens each new token
        attends to (besides the row's cached slots [0, length)); positions then come from
        `positions_3bs`. The row's length still grows by num_new: the first num_new slots after
        it must then hold the tokens that continue the row (tokens written further on are scratch).
        """
        b, s = input_ids.shape
        if write_slots is None:
            write_slots = cache.lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        if positions_3bs is None:
            pos = write_slots + cache.rope_delta[:, None]
            positions_3bs = jnp.broadcast_to(pos[None], (3, b, s))
        if attend_len is None and new_visible is None:
            mask = CacheWindow.covering(write_slots, cache.max_len)
        elif new_visible is None:
            slot_ids = jnp.arange(min(int(attend_len), cache.max_len), dtype=jnp.int32)
            mask = slot_ids[None, None, :] <= write_slots[:, :, None]
        else:
            n_slots = cache.max_len if attend_len is None else min(int(attend_len), cache.max_len)
            slot_ids = jnp.arange(n_slots, dtype=jnp.int32)
            cached = slot_ids[None, None, :] < cache.lengths[:, None, None]
            at_slot = (write_slots[:, :, None] == slot_ids[None, None, :]).astype(jnp.float32)  # (B, S, n)
            sees = jnp.einsum("bqt,btl->bql", new_visible.astype(jnp.float32), at_slot) > 0
            mask = cached | sees
        x = self.embed(input_ids, image_tokens, image_gather)
        hidden, (keys, values) = self.decode_hidden(x, positions_3bs, mask, cache, write_slots, deepstack, image_gather)
        new_cache = cache.replace(keys=keys, values=values, lengths=cache.lengths + jnp.asarray(num_new, jnp.int32))
        return hidden, new_cache

    def forward(self, input_ids, attention_mask, positions_3bs, image_tokens=None, deepstack=None, image_gather=None):
        """No-cache forward over a padded batch (left or right padding). Returns float32 logits."""
        s = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((s, s), bool))
        mask = causal[None] & attention_mask.astype(bool)[:, None, :]
        x = self.embed(input_ids, image_tokens, image_gather)
        hidden, _ = self.decode_hidden(x, positions_3bs, mask, None, None, deepstack, image_gather)
        return self.logits(hidden)


def round_to_dtype(x, dtype):
    """Float32 `x` rounded to `dtype`'s precision, kept float32. `reduce_precision` rather than a
    round trip through `dtype`: XLA:CPU simplifies a float32 -> bf16 -> float32 convert pair away."""
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)

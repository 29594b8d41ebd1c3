"""Inference: `forward`, and generation as a jitted prefill plus one `lax.while_loop` decode.

The model is split once per call (`nnx.split`) and its state passed to module-level jitted
functions whose static arguments are the graph definition and the shape buckets, so a
request whose prompt length, image patch count and token budget fall in seen buckets reuses
the compiled programs (tunix's sampler does the same). Rows are right-aligned into the KV
cache (each row's tokens at slots [0, length)), which is what lets the speculative engine
truncate rows and fork prefixes (see `kv_cache.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .kv_cache import KVCache
from .kernels import cpu_bf16_head
from .models.qwen_vl.model import QwenVLModel, round_to_dtype
from .models.qwen_vl.rope_index import get_rope_index, image_token_counts, prepare_vision_inputs
from .sampling import SamplingParams, sample, speculative_verify, token_logprob

# ---- buckets ---------------------------------------------------------------------------------


def length_bucket(n: int, minimum: int = 16) -> int:
    """Powers of two up to 1024, then multiples of 1024."""
    n = max(int(n), 1)
    if n <= 1024:
        return max(minimum, 1 << (n - 1).bit_length())
    return -(-n // 1024) * 1024


def fine_bucket(n: int, step: int = 16, limit: int = 128) -> int:
    """Multiples of `step` up to `limit`, then `length_bucket`'s powers of two. For programs whose
    cost grows with every padded token (a compute-bound prefill or check), still few shapes."""
    n = max(int(n), 1)
    if n <= limit:
        return -(-n // step) * step
    return length_bucket(n)


def prompt_bucket(n: int) -> int:
    """Padded prompt length: multiples of 8 up to 128 tokens (a prefill is compute-bound, so every
    padded token costs as much as a real one), then `length_bucket`'s powers of two."""
    return fine_bucket(n, step=8)


def patch_bucket(n: int, unit: int = 4) -> int:
    """Image patch counts: powers of two (>= 64), then multiples of 4096."""
    if n <= 4096:
        b = max(64, 1 << (max(n, 1) - 1).bit_length())
    else:
        b = -(-n // 4096) * 4096
    return -(-b // unit) * unit


# ---- host-side batch preparation ---------------------------------------------------------------


def image_indices(cfg, ids: np.ndarray, valid: np.ndarray, pixel_values, image_grid_thw):
    """3-D positions, rope deltas, the image-feature gather index and the bucketed vision
    inputs for a padded batch (`valid` marks real tokens)."""
    is_image = (ids == cfg.image_token_id) & valid
    grids = (None if image_grid_thw is None or len(image_grid_thw) == 0
             else np.asarray(image_grid_thw, np.int64).reshape(-1, 3))
    n_image_tokens = int(is_image.sum())
    n_expected = int(image_token_counts(grids, cfg.vision.spatial_merge_size).sum()) if grids is not None else 0
    if n_image_tokens != n_expected:
        raise ValueError(
            f"the prompts hold {n_image_tokens} image tokens (id {cfg.image_token_id}) but the images' grids "
            f"imply {n_expected}; expand each image placeholder with the processor"
        )
    positions, delta = get_rope_index(ids, valid, grids, image_token_id=cfg.image_token_id,
                                      spatial_merge_size=cfg.vision.spatial_merge_size)
    gather = np.where(is_image, np.cumsum(is_image.ravel()).reshape(is_image.shape) - 1, -1)
    vision = None
    if grids is not None:
        n_patches = int(grids.prod(-1).sum())
        vin = prepare_vision_inputs(pixel_values, grids, cfg, patch_bucket(n_patches, cfg.vision.merge_unit))
        vision = {k: v for k, v in dataclasses.asdict(vin).items() if k != "num_valid_tokens"}
    return positions, delta, gather, vision



@dataclasses.dataclass
class PreparedBatch:
    """Right-padded prompt rows and everything index-like the jitted prefill needs."""

    input_ids: np.ndarray  # (B, S) int32, right padded
    num_tokens: np.ndarray  # (B,) int32
    positions: np.ndarray  # (3, B, S) int32
    rope_delta: np.ndarray  # (B,) int32
    image_gather: np.ndarray  # (B, S) int32, -1 for text
    vision: dict | None  # VisionInputs arrays, or None without images


def prepare_batch(model: QwenVLModel, rows: Sequence[Sequence[int]], pixel_values=None, image_grid_thw=None,
                  *, seq_bucket: int | None = None, pad_id: int = 0) -> PreparedBatch:
    cfg = model.cfg
    lengths = np.array([len(r) for r in rows], np.int32)
    if (lengths == 0).any():
        raise ValueError("empty prompt: every row needs at least one token")
    s = seq_bucket or prompt_bucket(lengths.max())
    ids = np.full((len(rows), s), pad_id, np.int64)
    valid = np.zeros((len(rows), s), bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        valid[b, : len(r)] = True
    positions, delta, gather, vision = image_indices(cfg, ids, valid, pixel_values, image_grid_thw)
    return PreparedBatch(ids.astype(np.int32), lengths, positions.astype(np.int32), delta.astype(np.int32),
                         gather.astype(np.int32), vision)


# ---- jitted programs --------------------------------------------------------------------------
#
# The model's state goes in as a flat tuple of arrays with its tree structure static
# (`ModelStructure`: graphdef and treedef): jax flattens an `nnx.State` argument in Python on every
# call, about 0.5 ms for a 130-leaf model, while a tuple of arrays takes its C++ fast path
# (0.03 ms). On a small model that was half the cost of a decode step.


class ModelStructure:
    """A split model's graph definition and state tree structure, as one static jit argument
    whose hash is computed once: jit hashes its static arguments on every call, and hashing an
    nnx GraphDef walks the whole module graph in Python (0.4 ms for an 8-layer model here)."""

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, ModelStructure) and self._hash == other._hash
                                 and self.treedef == other.treedef and self.graphdef == other.graphdef)


def _merge(structure: ModelStructure, leaves):
    return nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, leaves))


def attend_bucket(needed: int, max_len: int, minimum: int = 128) -> int:
    """Cache slots a program attends over: a power of two >= `needed` (at least `minimum`), at
    most the whole cache. Few buckets, so few programs, and attention never reads far past the
    valid length."""
    return min(int(max_len), max(minimum, 1 << (max(int(needed), 1) - 1).bit_length()))


def _encode(model, vision):
    if vision is None:
        return None, None
    tokens, deepstack = model.encode_images(vision)
    return tokens, deepstack


@functools.partial(jax.jit, static_argnames=("structure",))
def _forward(structure, leaves, input_ids, attention_mask, positions, image_gather, vision):
    model = _merge(structure, leaves)
    tokens, deepstack = _encode(model, vision)
    return model.forward(input_ids, attention_mask, positions, tokens, deepstack, image_gather)


@functools.partial(jax.jit, static_argnames=("structure", "cache_len"))
def _prefill(structure, leaves, input_ids, num_tokens, positions, rope_delta, image_gather, vision, cache_len):
    """Fresh cache + prompt -> (next-token logits (B, V) at each row's last prompt token, cache)."""
    model = _merge(structure, leaves)
    cfg = model.cfg.text
    b = input_ids.shape[0]
    cache = KVCache.create(num_layers=cfg.num_hidden_layers, batch=b, max_len=cache_len,
                           kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=model.embed_tokens.dtype)
    cache = cache.replace(rope_delta=rope_delta)
    tokens, deepstack = _encode(model, vision)
    hidden, cache = model.extend(cache, input_ids, num_tokens, positions, tokens, deepstack, image_gather,
                                 attend_len=input_ids.shape[1])
    last = jnp.take_along_axis(hidden, (num_tokens - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


@functools.partial(jax.jit, static_argnames=("structure", "attend_len"), donate_argnames=("cache",))
def _extend(structure, leaves, cache, input_ids, num_new, attend_len=None):
    """Append text tokens to cached rows -> (logits (B, S, V), cache). Used by the speculative engine."""
    model = _merge(structure, leaves)
    hidden, cache = model.extend(cache, input_ids, num_new, attend_len=attend_len)
    return model.logits(hidden), cache


@functools.partial(jax.jit, static_argnames=("structure", "attend_len"), donate_argnames=("cache",))
def _extend_last(structure, leaves, cache, input_ids, num_new, attend_len=None):
    """Append text tokens -> (logits (B, V) at each row's last new token, cache): no (B, S, V) tensor."""
    model = _merge(structure, leaves)
    hidden, cache = model.extend(cache, input_ids, num_new, attend_len=attend_len)
    last = jnp.take_along_axis(hidden, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache


@functools.partial(jax.jit, static_argnames=("structure", "attend_len"), donate_argnames=("cache",))
def _extend_packed(structure, leaves, cache, input_ids, num_new, positions, write_slots, visible, read_at, read_ids,
                   attend_len):
    """Several sequences packed in one row per cache row (see `QwenVLModel.extend`) ->
    (logits (B, R, K) of tokens `read_ids` (K,) after the new tokens at `read_at` (B, R), cache
    grown by num_new). Only those few logits leave the program."""
    model = _merge(structure, leaves)
    b, s = input_ids.shape
    pos3 = jnp.broadcast_to((positions + cache.rope_delta[:, None])[None], (3, b, s))
    hidden, cache = model.extend(cache, input_ids, num_new, pos3, attend_len=attend_len, write_slots=write_slots,
                                 new_visible=visible)
    picked = jnp.take_along_axis(hidden, read_at[:, :, None], axis=1)  # (B, R, E)
    return jnp.take(model.logits(picked), read_ids, axis=-1), cache


@functools.partial(jax.jit, static_argnames=("structure", "target_params", "draft_params", "attend_len"),
                   donate_argnames=("cache",))
def _extend_verify(structure, leaves, cache, input_ids, num_new, prev_logits, n_before, proposal, n_proposed,
                   draft_logits, seed, target_params: SamplingParams, draft_params: SamplingParams, attend_len):
    """Token-level speculative decoding's target pass, one program: feed a batch-1 row's pending
    tokens and the draft's proposal, then accept on the device (`speculative_verify`).
    prev_logits (1, V): the logits after the last fed token (they predict the first new token);
    n_before: how many pending tokens precede the proposal in input_ids; draft_logits
    (1, >= k, V) the proposal's q rows. Returns
    (n_accepted, token, cache); only those two integers leave the device."""
    model = _merge(structure, leaves)
    hidden, cache = model.extend(cache, input_ids, num_new, attend_len=attend_len)
    rows = jnp.concatenate([prev_logits.astype(jnp.float32), model.logits(hidden[0])], axis=0)  # (S + 1, V)
    k = proposal.shape[0]
    target_rows = jax.lax.dynamic_slice_in_dim(rows, n_before, k + 1)
    n_acc, token = speculative_verify(target_rows, draft_logits[0, :k], proposal, n_proposed, jax.random.key(seed),
                                      target_params, draft_params)
    return n_acc, token, cache


@functools.partial(jax.jit,
                   static_argnames=("structure", "params", "out_len", "feed_first", "attend_len", "keep_logits"),
                   donate_argnames=("cache",))
def _decode(structure, leaves, cache, logits, seed, stop_kind, max_new, active, first_tokens, max_steps, max_step_len,
            in_step0, answered0,
            params: SamplingParams, out_len: int, feed_first: bool = False, attend_len=None, keep_logits: bool = False,
            packed_head=None):
    """The whole decode as one while_loop.

    Each iteration samples one token per row from `logits`, records it and its log-prob, and,
    for rows still running, feeds it through the model to get the next logits. `stop_kind` (V,)
    int8 marks step delimiters (1), tokens that end a row at once (2, e.g. EOS) and answer
    markers (3, e.g. the `boxed` tokens). A row stops after `max_steps[b]` steps (1: at the first
    delimiter), at the delimiter of a step that holds an answer marker, at a kind-2 token, after
    `max_new[b]` tokens, or when a step reaches `max_step_len[b]` tokens without a delimiter
    (the first step already holds `in_step0[b]` tokens when a call continues a cut step, and
    `answered0[b]` says whether those tokens hold an answer marker).
    The last iteration's forward is skipped once no row runs (its logits would never be read).
    The cache ends holding every fed token: all generated tokens but each row's last (sampled, never fed),
    so a continuation starts by feeding that last token. With `feed_first`, `first_tokens` (B,) are fed before the loop
    (in the same program) and their logits start it: continuing from a pending token costs
    no separate dispatch. `attend_len` must cover every slot the loop writes. With `keep_logits`
    the last output is (B, out_len, V): the logits each token was sampled from (a speculative
    proposal's q), else the logits after the last token.
    """
    model = _merge(structure, leaves)
    rng = jax.random.key(seed)  # made inside: an eager key per call would be one more dispatch
    b = first_tokens.shape[0]
    # The loop holds logits in the head's faster layout on XLA:CPU for this model and batch
    # (`QwenVLModel.decode_vocab_axis`): vocabulary-major (V, B), sampled along axis 0, or (B, V).
    vocab_major = not keep_logits and model.decode_vocab_axis(b) == 0
    axis = 0 if vocab_major else -1
    head = model.logits_vocab_major if vocab_major else model.logits
    if packed_head is not None:  # the table packed for `kernels.cpu_bf16_head` (a bf16 model, 2-8 rows)
        n_vocab = model.head_table().shape[0]
        head = lambda h: round_to_dtype(cpu_bf16_head.head(h, packed_head, n_vocab), h.dtype)  # noqa: E731
    if feed_first:
        hidden, cache = model.extend(cache, first_tokens[:, None], active.astype(jnp.int32), attend_len=attend_len)
        logits = head(hidden[:, 0])
    elif vocab_major:
        logits = logits.T
    vocab = logits.shape[axis]
    tokens0 = jnp.zeros((b, out_len), jnp.int32)
    logps0 = jnp.zeros((b, out_len), jnp.float32)
    n0 = jnp.zeros((b,), jnp.int32)
    seen0 = jnp.zeros((b, out_len if keep_logits else 0, vocab), jnp.float32)

    def cond(carry):
        step, _, _, _, _, _, running, _, _, _, _, _ = carry
        return (step < out_len) & jnp.any(running)

    def forward(tok, running, cache):
        hidden, cache = model.extend(cache, tok[:, None], running.astype(jnp.int32), attend_len=attend_len)
        return head(hidden[:, 0]), cache

    def body(carry):
        step, cache, logits, tokens, logps, n_gen, running, rng, seen, n_steps, in_step, answered = carry
        rng, key = jax.random.split(rng)
        tok = sample(logits, key, params, axis)
        lp = token_logprob(logits, tok, axis) if params.logprobs else jnp.zeros((b,), jnp.float32)
        tokens = tokens.at[:, step].set(jnp.where(running, tok, 0))
        logps = logps.at[:, step].set(jnp.where(running, lp, 0.0))
        if keep_logits:
            seen = seen.at[:, step].set(logits.astype(jnp.float32))
        n_gen = n_gen + running.astype(jnp.int32)
        kind = stop_kind[tok]
        answered = answered | (running & (kind == 3))
        step_ended = running & ((kind == 1) | (kind == 2))
        n_steps = n_steps + step_ended.astype(jnp.int32)
        in_step = jnp.where(step_ended, 0, in_step + running.astype(jnp.int32))
        running = (running & (kind != 2) & ~(step_ended & answered) & (n_steps < max_steps) & (n_gen < max_new)
                   & (in_step < max_step_len))
        # the forward after the last token is skipped once every row has stopped (one token's
        # cost per call: the old loop paid it for a token that is never fed)
        logits, cache = jax.lax.cond(jnp.any(running), forward, lambda t, r, c: (logits, c), tok, running, cache)
        return step + 1, cache, logits, tokens, logps, n_gen, running, rng, seen, n_steps, in_step, answered

    carry = (jnp.int32(0), cache, logits, tokens0, logps0, n0, active & (max_new > 0), rng, seen0, n0, in_step0,
             answered0)
    _, cache, logits, tokens, logps, n_gen, _, _, seen, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, logps, n_gen, cache, seen if keep_logits else (logits.T if vocab_major else logits)


def _i32(x) -> np.ndarray:
    """Host int32 array: jit moves numpy arguments in its C++ path (a separate jnp.asarray is a
    Python-level transfer costing about 0.07 ms each on a small CPU)."""
    return np.asarray(x, np.int32)


# ---- public functions -------------------------------------------------------------------------


def _vision_arrays(vision):
    return None if vision is None else {k: jnp.asarray(v) for k, v in vision.items()}


def forward(model: QwenVLModel, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
    """Float32 logits (B, S, V), as transformers' `Qwen*VLForConditionalGeneration(...).logits`.

    input_ids (B, S); attention_mask (B, S) with 0 at padding (left or right); pixel_values
    (patches, C*T*p*p) and image_grid_thw (images, 3) for the images of all rows in order.
    Positions come from the attention mask (padding-invariant), as transformers does whenever
    images are present and in `generate`; for text-only inputs with left padding transformers'
    plain forward instead counts padding positions.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    positions, _, gather, vision = image_indices(model.cfg, ids, mask, pixel_values, image_grid_thw)
    vision = _vision_arrays(vision)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return _forward(ModelStructure(graphdef, treedef), tuple(leaves), jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                    jnp.asarray(positions, jnp.int32), jnp.asarray(gather, jnp.int32), vision)


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[float]] | None  # log p(token) under the model (no temperature / filtering); None if not asked
    finish_reasons: list[str]  # "stop" (stop token or EOS) or "length"
    prompt_lengths: list[int]
    cache: KVCache | None = None  # prompt + generated tokens except each row's last


class Generator:
    """Prefill / extend / decode over one model; the building blocks of `generate` and of the
    speculative engine. Holds the split model (structure + flat leaves); call `refresh()` after
    changing weights. `attend_len` arguments bound attention to a prefix of the cache
    (`attend_bucket`); None attends over the whole cache."""

    def __init__(self, model: QwenVLModel):
        self.model = model
        self.cfg = model.cfg
        self._stop_kinds: dict[tuple, jax.Array] = {}  # by (stop ids, end ids, answer ids)
        self.refresh()

    def refresh(self):
        self.graphdef, state = nnx.split(self.model)
        self.state = state

    def packed_head(self, rows: int):
        """The head table packed for the CPU bf16 head kernel when a decode of `rows` rows can use
        it (`cpu_bf16_head.applies`), else None. Made once per state (a copy of the table, 155 MB
        for a 152k x 512 bf16 model) from the state's own table, so on the devices the state was
        placed on; setting `state` drops it."""
        if not 2 <= rows <= cpu_bf16_head.MAX_ROWS:
            return None
        if self._packed_head is None:  # False: this state's table cannot use the kernel
            table = _merge(self.structure, self.leaves).head_table()
            self._packed_head = cpu_bf16_head.pack(table) if cpu_bf16_head.applies(table, rows) else False
        return self._packed_head if self._packed_head is not False else None

    @property
    def state(self):
        return jax.tree.unflatten(self._treedef, self.leaves)

    @state.setter
    def state(self, state):
        leaves, self._treedef = jax.tree.flatten(state)
        self.leaves = tuple(leaves)
        self.structure = ModelStructure(self.graphdef, self._treedef)
        self._packed_head = None  # new weights or placement: packed again on first use

    def prefill(self, batch: PreparedBatch, cache_len: int):
        if cache_len < batch.input_ids.shape[1]:
            raise ValueError(f"cache_len {cache_len} is shorter than the prompt bucket {batch.input_ids.shape[1]}")
        return _prefill(self.structure, self.leaves, batch.input_ids, batch.num_tokens, batch.positions,
                        batch.rope_delta, batch.image_gather, batch.vision, cache_len=cache_len)

    def extend(self, cache: KVCache, input_ids, num_new, attend_len=None):
        """Feed text tokens (B, S) (row b's first num_new[b] are real) -> (logits (B, S, V), cache)."""
        return _extend(self.structure, self.leaves, cache, _i32(input_ids), _i32(num_new), attend_len=attend_len)

    def extend_last(self, cache: KVCache, input_ids, num_new, attend_len=None):
        """Like `extend`, returning only each row's logits after its last new token (B, V)."""
        return _extend_last(self.structure, self.leaves, cache, _i32(input_ids), _i32(num_new), attend_len=attend_len)

    def extend_packed(self, cache: KVCache, input_ids, num_new, positions, write_slots, visible, read_at, read_ids,
                      attend_len):
        """Packed sequences in one forward (see `_extend_packed`) -> (logits (B, R, K), cache).

        positions / write_slots (B, S) int32 absolute (rope_delta is added); visible (B, S, S)
        bool; read_at (B, R) int32 indices into S; read_ids (K,) the vocabulary ids to return."""
        return _extend_packed(self.structure, self.leaves, cache, _i32(input_ids), _i32(num_new), _i32(positions),
                              _i32(write_slots), np.asarray(visible, bool), _i32(read_at), _i32(read_ids),
                              attend_len=attend_len)

    def extend_verify(self, cache: KVCache, input_ids, num_new, prev_logits, n_before, proposal, n_proposed,
                      draft_logits, seed, target_params, draft_params, attend_len):
        """Speculative decoding's target pass (see `_extend_verify`) -> (n_accepted, token, cache)."""
        return _extend_verify(self.structure, self.leaves, cache, _i32(input_ids), _i32(num_new), prev_logits,
                              np.int32(n_before), _i32(proposal), np.int32(n_proposed), draft_logits, np.int32(seed),
                              target_params=target_params, draft_params=draft_params, attend_len=attend_len)

    def decode(self, cache: KVCache, logits=None, *, max_new_tokens, stop_ids=(), params=SamplingParams(), seed=0,
               active=None, out_len=None, first_tokens=None, attend_len=None, keep_logits=False, max_steps=1,
               end_ids=(), max_step_len=None, answer_ids=(), in_step=0, answered=False):
        """Decode from next-token `logits` (B, V), or from `first_tokens` (B,) not yet fed.

        A row stops at its first token in `stop_ids`, or, with `max_steps` > 1, after that many
        of them (several reasoning steps in one call), or at the first of them that ends a step
        holding a token of `answer_ids` (the step that states the answer); at once at a token of
        `end_ids`; after `max_new_tokens`; or when a step reaches `max_step_len` tokens without a
        stop token (counting `in_step` tokens the first step already holds; `answered`: they hold
        an answer token, so the first delimiter ends the row)."""
        feed_first = first_tokens is not None
        b = len(first_tokens) if feed_first else logits.shape[0]
        if feed_first:
            logits = np.zeros((b, 1), np.float32)
        first = np.zeros(b, np.int32) if first_tokens is None else _i32(first_tokens)
        max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,))
        out_len = out_len or length_bucket(int(max_new.max()))
        active = np.ones((b,), bool) if active is None else np.asarray(active, bool)
        steps = np.broadcast_to(np.asarray(max_steps, np.int32), (b,))
        step_len = np.broadcast_to(np.asarray(max_new if max_step_len is None else max_step_len, np.int32), (b,))
        return _decode(self.structure, self.leaves, cache, logits, np.int32(seed),
                       self.stop_kind(stop_ids, end_ids, answer_ids),
                       max_new, active, first, steps, step_len, np.broadcast_to(_i32(in_step), (b,)),
                       np.broadcast_to(np.asarray(answered, bool), (b,)), params=params,
                       out_len=out_len, feed_first=feed_first,
                       attend_len=attend_len, keep_logits=keep_logits,
                       packed_head=None if keep_logits else self.packed_head(b))

    def stop_kind(self, stop_ids, end_ids=(), answer_ids=()) -> jax.Array:
        """(V,) int8: 1 at `stop_ids`, 2 at `end_ids`, 3 at `answer_ids` that are neither, else 0;
        built once per distinct triple of sets (a host->device copy per call costs as much as a
        decode step on a small model)."""
        key = tuple(tuple(sorted(set(int(i) for i in ids))) for ids in (stop_ids, end_ids, answer_ids))
        if key not in self._stop_kinds:
            vocab = self.cfg.text.vocab_size
            kind = np.zeros((vocab,), np.int8)
            kind[[i for i in key[2] if i < vocab]] = 3
            kind[[i for i in key[0] if i < vocab]] = 1
            kind[[i for i in key[1] if i < vocab]] = 2
            self._stop_kinds[key] = jnp.asarray(kind)
        return self._stop_kinds[key]


def generate(model: QwenVLModel, processor, prompts, images=None, *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (),
             seed: int = 0, chat: bool = True, system: str | None = None,
             return_cache: bool = False, logprobs: bool = True) -> GenerationResult:
    """Generate for a batch of prompts.

    prompts: a string or a list; with `chat=True` each is a user message (its images placed
    before the text, the assistant turn opened), else an already formatted prompt holding one
    `<|image_pad|>` per image. images: None, or per prompt None / one image / a list (PIL,
    path or uint8 array). Generation stops per row at EOS, at any vocabulary token whose
    text contains a `stop` string (none by default; e.g. `stop=("\n\n",)` ends at the first
    blank line, one reasoning step), or after `max_new_tokens`. With `chat=True` the prompt
    text and `system` are user content: special tokens typed in them are read as text.
    `logprobs=False` leaves `GenerationResult.logprobs` None and spares each step's log-sum-exp.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
        images = None if images is None else [images]
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
    rows, pix, grids = [], [], []
    for text, imgs in zip(prompts, images):
        imgs = [] if imgs is None else (list(imgs) if isinstance(imgs, (list, tuple)) else [imgs])
        formatted = processor.user_prompt(text, len(imgs), system=system) if chat else text
        enc = processor.encode(formatted, imgs)
        rows.append(enc["input_ids"])
        if enc["pixel_values"] is not None:
            pix.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
    return generate_from_ids(model, rows, np.concatenate(pix) if pix else None,
                             np.concatenate(grids) if grids else None,
                             processor=processor, max_new_tokens=max_new_tokens,
                             params=SamplingParams(temperature, top_k, top_p, logprobs), stop=stop, seed=seed,
                             return_cache=return_cache)


def generate_from_ids(model, rows, pixel_values=None, image_grid_thw=None, *, processor=None, max_new_tokens=256,
                      params=SamplingParams(), stop: Sequence[str] = (), stop_ids=None, seed=0,
                      return_cache=False) -> GenerationResult:
    """`generate` on token rows that already hold expanded image tokens. Stops at EOS, at the
    tokens containing a `stop` string (with a processor), or at `stop_ids` when given (which
    replace both; EOS is then a stop only if listed)."""
    gen = Generator(model)
    pad = processor.pad_token_id if processor is not None else 0
    batch = prepare_batch(model, rows, pixel_values, image_grid_thw, pad_id=pad)
    if stop_ids is None:
        stop_ids = processor.stop_token_ids(tuple(stop)) if processor is not None else tuple(model.cfg.eos_token_id)
    out_len = length_bucket(max_new_tokens)
    cache_len = batch.input_ids.shape[1] + out_len
    logits, cache = gen.prefill(batch, cache_len)
    tokens, logps, n_gen, cache, _ = gen.decode(cache, logits, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                                params=params, seed=seed, out_len=out_len)
    tokens, logps, n_gen = np.asarray(tokens), np.asarray(logps), np.asarray(n_gen)
    stop_set = set(stop_ids)
    token_ids = [tokens[b, : n_gen[b]].tolist() for b in range(len(rows))]
    return GenerationResult(
        texts=[processor.decode(t) if processor is not None else "" for t in token_ids],
        token_ids=token_ids,
        logprobs=[logps[b, : n_gen[b]].tolist() for b in range(len(rows))] if params.logprobs else None,
        finish_reasons=["stop" if t and t[-1] in stop_set else "length" for t in token_ids],
        prompt_lengths=batch.num_tokens.tolist(),
        cache=cache if return_cache else None,
    )

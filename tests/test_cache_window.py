"""Attention over the valid part of the KV cache (`text.CacheWindow`): a decode, extend or
continued prefill attends over the smallest power-of-two prefix (>= 128 slots) that holds the
longest row, chosen inside the one compiled program. Checked against transformers and against the
static whole-cache path, for rows of very different lengths, across bucket edges (a row at
exactly 128 valid slots, then 129), after truncation and forking; one program for every length;
and a 16-bit cache written in place."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dreamr_jax as dr
from dreamr_jax import compiles
from dreamr_jax.generation import Generator, prepare_batch
from dreamr_jax.models.qwen_vl.text import Linear, window_buckets

from helpers.models import IMAGE_TOKEN

CACHE = 600  # buckets 128, 256, 512, 600


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return dr.load_model(tiny_checkpoints["qwen3_vl"][0])


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, IMAGE_TOKEN, n).tolist() for n in lengths]  # text ids below the special tokens


def _decode(gen, cache, logits, n, attend_len=None):
    tokens, logps, n_gen, cache, last = gen.decode(cache, logits, max_new_tokens=n, stop_ids=(), out_len=n,
                                                   attend_len=attend_len)
    return np.asarray(tokens), np.asarray(logps), cache, np.asarray(last)


def test_buckets():
    from dreamr_jax.models.qwen_vl.text import CacheWindow

    assert window_buckets(600) == (128, 256, 512, 600)
    assert window_buckets(512) == (128, 256, 512)
    assert window_buckets(100) == (100,)  # one branch: no switch at all
    # the smallest prefix holding the furthest write slot (slot n - 1 needs n slots), rows of any length
    for furthest, bucket in ((0, 128), (127, 128), (128, 256), (255, 256), (256, 512), (512, 600), (700, 600)):
        slots = jnp.asarray([[3, 4], [furthest - 1, furthest]], jnp.int32)
        window = CacheWindow.covering(slots, 600)
        assert window.buckets[int(window.index)] == bucket, (furthest, bucket)


def test_greedy_across_bucket_edges_matches_transformers(model, tiny_checkpoints):
    """Rows of 5 and 122 tokens decode 12 greedy tokens in one batch: the long row's valid length
    passes 128 (exactly a bucket) and 129 inside the loop, and the window moves from 128 slots to
    256. Each row equals transformers' greedy generate of that row alone."""
    torch_model = tiny_checkpoints["qwen3_vl"][1]
    rows = _rows([5, 122])
    gen = Generator(model)
    batch = prepare_batch(model, rows)
    logits, cache = gen.prefill(batch, CACHE)
    tokens, logps, cache, _ = _decode(gen, cache, logits, 12)
    assert np.asarray(cache.lengths).tolist() == [5 + 11, 122 + 11]  # the long row ends past 128
    for b, row in enumerate(rows):
        with torch.inference_mode():
            want = torch_model.generate(torch.tensor([row]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                        eos_token_id=None)[0, len(row):].numpy()
            full = torch.tensor([row + want.tolist()])
            logp = torch.log_softmax(torch_model(input_ids=full).logits.double(), -1)[0].numpy()
        assert np.array_equal(tokens[b], want), b
        # each token's log-prob: the logits of every step, the ones past 128 included
        np.testing.assert_allclose(logps[b], logp[np.arange(len(row) - 1, len(row) + 11), want], atol=1e-4)


def test_window_equals_the_whole_cache_path(model):
    """The same decode with attention over the whole cache (a static `attend_len`): equal tokens,
    log-probs and final logits, for rows of 3 and 250 tokens crossing 256 (and a row that starts
    at exactly 128 crossing nothing but its own bucket edge, 129)."""
    gen = Generator(model)
    for lengths in ([3, 250], [128, 40]):
        batch = prepare_batch(model, _rows(lengths, seed=sum(lengths)))
        logits, cache = gen.prefill(batch, CACHE)
        full = _decode(gen, cache, logits, 16, attend_len=CACHE)
        logits, cache = gen.prefill(batch, CACHE)
        window = _decode(gen, cache, logits, 16)
        assert np.array_equal(full[0], window[0]), lengths
        np.testing.assert_allclose(window[1], full[1], atol=1e-5)
        np.testing.assert_allclose(window[3], full[3], atol=1e-4)
        assert np.array_equal(np.asarray(window[2].lengths), np.asarray(full[2].lengths))


def test_truncate_fork_and_extend_over_the_window(model):
    """A row decoded past 256 slots is truncated back under 128 and continues as the whole-cache
    path does; three forks of it continue identically; an extend of 20 tokens (a check's shape)
    over rows of 30 and 300 slots gives the whole-cache path's logits."""
    gen = Generator(model)
    batch = prepare_batch(model, _rows([250, 10], seed=5))

    def decoded():  # a fresh cache whose row 0 is decoded past 256 slots (each path donates its own)
        logits, cache = gen.prefill(batch, CACHE)
        tokens, _, cache, _ = _decode(gen, cache, logits, 16)
        assert int(cache.lengths[0]) > 256
        return tokens, cache

    tokens, cache = decoded()
    feed = tokens[:, :1]
    a, cache_a = gen.extend(cache.truncate(np.array([100, 10])), feed, np.ones(2, np.int32))
    _, cache = decoded()
    b, cache_b = gen.extend(cache.truncate(np.array([100, 10])), feed, np.ones(2, np.int32), attend_len=CACHE)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    after_a = _decode(gen, cache_a, a[:, 0], 8)[0]
    after_b = _decode(gen, cache_b, b[:, 0], 8, attend_len=CACHE)[0]
    assert np.array_equal(after_a, after_b)
    logits, cache = gen.prefill(batch, CACHE)
    _, _, cache, last = _decode(gen, cache, logits, 16)
    forks = cache.fork([0, 0, 0])
    out = _decode(gen, forks, np.repeat(last[:1], 3, axis=0), 12)[0]
    assert all(np.array_equal(out[i], out[0]) for i in range(3))
    ref = _decode(gen, cache.fork([0]), last[:1], 12, attend_len=CACHE)[0]
    assert np.array_equal(out[0], ref[0])
    # an extend of 20 new tokens per row, rows of very different lengths
    batch = prepare_batch(model, _rows([30, 300], seed=6))
    new = np.asarray(_rows([20, 20], seed=7))
    _, cache = gen.prefill(batch, CACHE)
    window, _ = gen.extend(cache, new, np.array([20, 20], np.int32))
    _, cache = gen.prefill(batch, CACHE)
    whole, _ = gen.extend(cache, new, np.array([20, 20], np.int32), attend_len=CACHE)
    np.testing.assert_allclose(np.asarray(window), np.asarray(whole), atol=1e-4)


def test_one_decode_program_serves_every_length(model):
    """Decoding on and on in one cache crosses the 128, 256 and 512 buckets; after the first call
    no call compiles anything: the window is chosen inside the program."""
    compiles.install()
    gen = Generator(model)
    batch = prepare_batch(model, _rows([60]))
    logits, cache = gen.prefill(batch, CACHE)
    tokens, _, cache, _ = _decode(gen, cache, logits, 64)
    lengths, counts = [], []
    for _ in range(7):  # 60 -> about 500 valid slots, continuing from each call's last token
        before = compiles.totals()[0]
        tokens, _, _, cache, _ = gen.decode(cache, first_tokens=tokens[:, -1], max_new_tokens=64, stop_ids=(),
                                            out_len=64)
        tokens = np.asarray(tokens)
        lengths.append(int(cache.lengths[0]))
        counts.append(compiles.totals()[0] - before)
    assert lengths[0] < 256 and lengths[-1] > 512, lengths
    assert counts[0] > 0 and sum(counts[1:]) == 0, counts  # the first continuation compiled; no other call


def _compiled_decode_text(gen, cache, logits, n):
    from dreamr_jax import generation

    b = logits.shape[0]
    args = (gen.structure, gen.leaves, cache, logits, np.int32(0), gen.stop_kind(()), np.full((b,), n, np.int32),
            np.ones((b,), bool), np.zeros(b, np.int32), np.ones(b, np.int32), np.full((b,), n, np.int32),
            np.zeros(b, np.int32), np.zeros(b, bool))
    return generation._decode.lower(*args, params=generation.SamplingParams(), out_len=n).compile().as_text()


def _widened_weights(model, hlo_text):
    """Top-level instructions of a compiled program that widen one of the model's 16-bit decoder or
    head weights to float32, in either orientation (fused matrix-vector loops read them narrow;
    these copy them). Only fusion calls: XLA:CPU wraps a lone convert in one ("wrapped_convert"),
    while the converts inside a fused matrix-vector loop are never materialised."""
    shapes = {tuple(layer.weight[...].shape) for _, layer in nnx.iter_modules(model) if isinstance(layer, Linear)}
    shapes.add(tuple(model.embed_tokens[...].shape))
    pattern = "|".join(rf"{a},{b}|{b},{a}" for a, b in shapes)
    return [ln for ln in hlo_text.splitlines() if "fusion(" in ln and re.search(rf"= f32\[({pattern})\]", ln)]


def test_bfloat16_cache_is_written_in_place(tiny_checkpoints):
    """A bfloat16 model's cache holds uint16 bits; every write in its compiled decode updates those
    bits (XLA:CPU widened a bfloat16 cache to float32, updated it and narrowed it back on every
    write, a copy of the whole cache); the window and whole-cache paths decode the same tokens; the
    compiled decode never widens a weight, for one row or several; and the head's logits are
    bf16-rounded whatever form it takes."""
    model = dr.load_model(tiny_checkpoints["qwen3_vl"][0], "bfloat16")
    gen = Generator(model)
    batch = prepare_batch(model, _rows([3, 140], seed=8))
    logits, cache = gen.prefill(batch, CACHE)
    assert cache.keys[0].dtype == jnp.uint16
    b, k, length, d = cache.keys[0].shape
    text = _compiled_decode_text(gen, cache, logits, 8)
    whole_cache = f"[{b},{k},{length},{d}]"
    writes = [ln for ln in text.splitlines()
              if whole_cache in ln and ("dynamic-update-slice(" in ln or "scatter(" in ln)]
    assert writes and all(f"= u16{whole_cache}" in ln for ln in writes), writes[:3]  # never a widened copy
    # No weight is widened to float32 in the loop: several rows (XLA:CPU widened the head's table
    # on every step for a transposed operand or a 16-bit result: 0.41x vLLM at batch 8), nor one
    # row (weights stored (in, out) were widened: a bf16 batch-1 step 7.6 ms against 4.7).
    one_logits, one_cache = gen.prefill(prepare_batch(model, _rows([5], seed=3)), CACHE)
    for program in (text, _compiled_decode_text(gen, one_cache, one_logits, 8)):
        widened = _widened_weights(model, program)
        assert not widened, widened[:2]
    window = _decode(gen, cache, logits, 8)[0]
    logits, cache = gen.prefill(batch, CACHE)
    full = _decode(gen, cache, logits, 8, attend_len=CACHE)[0]
    assert np.array_equal(window, full)
    hidden_size = model.cfg.text.hidden_size
    # The head's layout follows the weights' dtype, also for a float32-built model recast to bf16
    # (SAPO's samplers): the bf16 head is faster row-major, the float32 one vocabulary-major.
    from dreamr_jax.training.sapo import in_dtype

    f32_model = dr.load_model(tiny_checkpoints["qwen3_vl"][0], "float32")
    assert (model.decode_vocab_axis(2), f32_model.decode_vocab_axis(2), f32_model.decode_vocab_axis(1)) == (-1, 0, -1)
    assert in_dtype(f32_model, "bfloat16").decode_vocab_axis(2) == -1
    # The head rounds to bf16 inside compiled code too (XLA:CPU simplifies a float32 -> bf16 ->
    # float32 round trip away), for one row, several, and vocabulary-major: a row's tokens must
    # not depend on the batch size through unrounded float32 logits.
    hidden = jnp.asarray(np.random.default_rng(9).standard_normal((3, hidden_size)), jnp.bfloat16)
    one = np.asarray(nnx.jit(lambda m, h: m.logits(h))(model, hidden[:1]))
    several = np.asarray(nnx.jit(lambda m, h: m.logits(h))(model, hidden))
    vocab_major = np.asarray(nnx.jit(lambda m, h: m.logits_vocab_major(h))(model, hidden)).T
    for out in (one, several, vocab_major):
        assert np.array_equal(out, out.astype(jnp.bfloat16).astype(np.float32))
    np.testing.assert_allclose(one[0], several[0], rtol=2**-7, atol=1e-6)
    np.testing.assert_allclose(vocab_major, several, rtol=2**-7, atol=1e-6)
    jax.clear_caches()

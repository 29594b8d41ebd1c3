"""The CPU bf16 head kernel (`kernels.cpu_bf16_head`) against XLA's product, and a bf16 decode
with it against the same decode without it. Skipped where the kernel cannot be built (no
AVX512-BF16, no g++): there the XLA head is the only path."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import dreamr_jax as dr
from dreamr_jax.generation import Generator, SamplingParams, prepare_batch
from dreamr_jax.kernels import cpu_bf16_head

needs_kernel = pytest.mark.skipif(not cpu_bf16_head.available(), reason="no AVX512-BF16 or no g++ here")


@needs_kernel
@pytest.mark.parametrize("rows", [2, 5, 8])
def test_kernel_matches_xla(rows):
    rng = np.random.default_rng(rows)
    table = jnp.asarray(rng.standard_normal((1000, 64)), jnp.bfloat16)  # 1000 rows: padded to 1024 inside
    hidden = jnp.asarray(rng.standard_normal((rows, 64)), jnp.bfloat16)
    ours = np.asarray(jax.jit(cpu_bf16_head.head, static_argnums=2)(hidden, cpu_bf16_head.pack(table), 1000))
    want = np.asarray(hidden, np.float64) @ np.asarray(table, np.float64).T  # bf16 products are exact in f64
    assert ours.shape == (rows, 1000)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


def test_applies_only_where_it_can():
    table = jnp.zeros((64, 32), jnp.bfloat16)
    ok = cpu_bf16_head.available()
    assert [cpu_bf16_head.applies(table, r) for r in (1, 2, 8, 9)] == [False, ok, ok, False]
    assert not cpu_bf16_head.applies(table.astype(jnp.float32), 4)
    assert not cpu_bf16_head.applies(jnp.zeros((64, 31), jnp.bfloat16), 4)  # an odd hidden size


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("DREAMR_CPU_BF16_HEAD", "0")
    assert not cpu_bf16_head.available.__wrapped__()


@needs_kernel
def test_bf16_decode_with_the_kernel_equals_without(tiny_checkpoints):
    model = dr.load_model(tiny_checkpoints["qwen3_vl"][0], "bfloat16")
    rng = np.random.default_rng(4)
    batch = prepare_batch(model, [rng.integers(0, 500, n).tolist() for n in (7, 30, 12)])
    results = []
    for use_kernel in (True, False):
        gen = Generator(model)
        if not use_kernel:
            gen.packed_head = lambda rows: None
        assert (gen.packed_head(3) is not None) == use_kernel
        logits, cache = gen.prefill(batch, 128)
        tokens, logps, _, _, last = gen.decode(cache, logits, max_new_tokens=16, stop_ids=(), out_len=16,
                                               params=SamplingParams())
        results.append((np.asarray(tokens), np.asarray(logps), np.asarray(last)))
    (tk, lk, xk), (tx, lx, xx) = results
    assert np.array_equal(tk, tx)
    np.testing.assert_allclose(lk, lx, atol=1e-5)
    assert np.array_equal(xk, xk.astype(jnp.bfloat16).astype(np.float32))  # rounded to bf16 like the XLA head
    np.testing.assert_allclose(xk, xx, rtol=2**-7, atol=1e-6)
    jax.clear_caches()


@needs_kernel
def test_packed_table_follows_the_generators_state(tiny_checkpoints):
    """The packed copy is made from the Generator's own state (the arrays a role placed on its
    devices), and new weights set through `state` are packed again."""
    model = dr.load_model(tiny_checkpoints["qwen3_vl"][0], "bfloat16")
    gen = Generator(model)
    assert gen.packed_head(1) is None and gen.packed_head(9) is None
    first = np.asarray(gen.packed_head(2))
    assert gen.packed_head(4) is not None and np.array_equal(np.asarray(gen.packed_head(4)), first)
    gen.state = jax.tree.map(lambda x: x * 2 if jnp.issubdtype(x.dtype, jnp.floating) else x, gen.state)
    doubled = np.asarray(gen.packed_head(2)).view(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(doubled, first.view(jnp.bfloat16).astype(np.float32) * 2)

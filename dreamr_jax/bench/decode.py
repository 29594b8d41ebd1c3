"""Greedy text decode throughput of dreamr-jax beside transformers (PyTorch) on a CPU, same
weights, against the memory floor of a step: `scripts/bench_decode.py` is its command line, and
its docstring says what is measured and how.

`run(args)` does the whole benchmark; the pieces (`bench_batch`, `memory_floor`, `profile_step`,
`op_profile`, `cache_scan`) measure one thing each.
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import tempfile
import time

import numpy as np

from . import bandwidth, hlo
from .models import build_torch_model, count_torch_params, qwen3_vl_dict
from .report import cpu_name, fmt_row, git_state, log, memory_gib, write_json
from .timing import CpuShare, time_calls, wait_quiet

# The benchmark's model (about 90M parameters, most of them the real vocabulary's tied table):
# Qwen3-VL text at a CPU-sized width. `scripts/validate_costmodel.py` prices the same model.
BENCH_MODEL = dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, head_dim=64, vocab=151936)


def bench_model_config(hidden: int = 512, intermediate: int = 1536, layers: int = 4, heads: int = 8, kv_heads: int = 4,
                       head_dim: int = 64, vocab: int = 151936, tie: bool = True) -> dict:
    """The benchmark's Qwen3-VL (`BENCH_MODEL` by default) with a one-block vision tower: only text
    decode is measured."""
    return qwen3_vl_dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         vocab_size=vocab, tie_word_embeddings=tie)


def _best(fn, *args) -> float:
    """Best wall time of fn(*args) over at least 5 calls and 0.3 s (the pieces of a step are short)."""
    return time_calls(lambda: fn(*args), 5, min_s=0.3).best


# ---- dreamr-jax and transformers runners ----------------------------------------------------------


class JaxRunner:
    """dreamr-jax: `Generator.prefill` then `Generator.decode(stop_ids=())`, each timed alone."""

    def __init__(self, model, rows: np.ndarray, steps: int):
        from ..generation import Generator, length_bucket, prepare_batch

        self.gen = Generator(model)
        self.batch = prepare_batch(model, [list(r) for r in rows])
        self.steps = steps
        self.out_len = length_bucket(steps)
        self.cache_len = self.batch.input_ids.shape[1] + self.out_len

    def run(self):
        """-> (prefill s, decode s, tokens (B, steps), n_gen (B,), XLA compiles during the call)."""
        import jax

        from .. import compiles

        n_compiles = compiles.totals()[0]
        t0 = time.perf_counter()
        logits, cache = self.gen.prefill(self.batch, self.cache_len)
        jax.block_until_ready((logits, cache))
        t1 = time.perf_counter()
        tokens, _, n_gen, cache, last = self.gen.decode(cache, logits, max_new_tokens=self.steps, stop_ids=(),
                                                        out_len=self.out_len)
        jax.block_until_ready((tokens, n_gen, cache, last))
        t2 = time.perf_counter()
        return (t1 - t0, t2 - t1, np.asarray(tokens)[:, : self.steps], np.asarray(n_gen),
                compiles.totals()[0] - n_compiles)


class TorchRunner:
    """transformers: greedy `generate` with EOS disabled, exactly n new tokens."""

    def __init__(self, model, rows: np.ndarray):
        import torch

        self.model = model
        self.ids = torch.tensor(rows, dtype=torch.long)
        self.mask = torch.ones_like(self.ids)

    def generate(self, n, **kw):
        import torch

        with torch.inference_mode():
            return self.model.generate(input_ids=self.ids, attention_mask=self.mask, do_sample=False,
                                       max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)

    def timed(self, n):
        t0 = time.perf_counter()
        out = self.generate(n)
        return time.perf_counter() - t0, out


def bench_batch(jmodel, tmodel, rows: np.ndarray, steps: int, repeats: int, wait_s: float = 0.0) -> dict:
    """First calls, then `repeats` rounds of (dreamr-jax prefill+decode, transformers generate(N),
    transformers generate(1)), interleaved so that outside load hits both sides alike; best of each."""
    b = rows.shape[0]
    jr = JaxRunner(jmodel, rows, steps)
    tr = TorchRunner(tmodel, rows) if tmodel is not None else None
    with CpuShare():
        first_prefill, first_decode, jtokens, n_gen, first_compiles = jr.run()
    assert (n_gen == steps).all(), f"dreamr-jax generated {n_gen.tolist()} tokens, expected {steps}"
    samples = dict(jax_prefill=[], jax_decode=[], jax_other_cpu=[], torch_n=[], torch_1=[], torch_other_cpu=[])
    steady_compiles = 0
    if tr is not None:
        t_first, out = tr.timed(steps)
        ttokens = out[:, rows.shape[1]:].numpy()
        assert ttokens.shape[1] == steps, f"transformers generated {ttokens.shape[1]} tokens, expected {steps}"
    waits = []
    for _ in range(repeats):
        waits.append(wait_quiet(wait_s))
        with CpuShare() as share:
            p, d, tok2, _, c = jr.run()
        samples["jax_prefill"].append(p)
        samples["jax_decode"].append(d)
        samples["jax_other_cpu"].append(share.other)
        steady_compiles += c
        assert np.array_equal(tok2, jtokens), "dreamr-jax greedy decode is not deterministic"
        if tr is not None:
            waits.append(wait_quiet(wait_s))
            with CpuShare() as share:
                samples["torch_n"].append(tr.timed(steps)[0])
                samples["torch_1"].append(tr.timed(1)[0])
            samples["torch_other_cpu"].append(share.other)

    prefill, decode = min(samples["jax_prefill"]), min(samples["jax_decode"])
    j = dict(
        prompt_len=int(rows.shape[1]), prompt_bucket=int(jr.batch.input_ids.shape[1]), cache_len=jr.cache_len,
        out_len=jr.out_len, steps=steps, prefill_s=prefill, decode_s=decode,
        prefill_s_all=samples["jax_prefill"], decode_s_all=samples["jax_decode"],
        other_cpu_share_all=samples["jax_other_cpu"],
        ms_per_step=1e3 * decode / steps,  # the decode call runs `steps` forward passes
        decode_tok_s=b * steps / decode,
        e2e_tok_s=b * steps / (prefill + decode),
        first_prefill_s=first_prefill, first_decode_s=first_decode,
        compile_prefill_s=first_prefill - prefill, compile_decode_s=first_decode - decode,
        compile_s=(first_prefill - prefill) + (first_decode - decode),
        xla_compiles_first_call=first_compiles, xla_compiles_steady=steady_compiles,
    )
    r = dict(batch=b, jax=j, quiet_waits_s=waits)
    if tr is not None:
        t_n, t_1 = min(samples["torch_n"]), min(samples["torch_1"])
        decode_t = t_n - t_1  # (steps - 1) forward passes
        r["torch"] = dict(
            steps=steps, generate_n_s=t_n, generate_1_s=t_1, generate_n_s_all=samples["torch_n"],
            generate_1_s_all=samples["torch_1"], other_cpu_share_all=samples["torch_other_cpu"],
            prefill_s=t_1, decode_s=decode_t, ms_per_step=1e3 * decode_t / (steps - 1),
            decode_tok_s=b * (steps - 1) / decode_t, e2e_tok_s=b * steps / t_n,
            first_generate_s=t_first, warmup_s=t_first - t_n,
        )
        r["agreement"] = agreement(jtokens, ttokens, tr.generate)
        r["ratio_decode"] = j["decode_tok_s"] / r["torch"]["decode_tok_s"]
        r["ratio_e2e"] = j["e2e_tok_s"] / r["torch"]["e2e_tok_s"]
    return r


def agreement(jax_tokens: np.ndarray, torch_tokens: np.ndarray, torch_generate) -> dict:
    """Fraction of equal positions; per row the first divergence and, there, transformers' logit
    gap between its own pick and dreamr-jax's pick (a small gap = a near-tie, not a bug)."""
    eq = jax_tokens == torch_tokens
    firsts, gaps = [], []
    scores = None
    if not eq.all():
        out = torch_generate(jax_tokens.shape[1], output_scores=True, return_dict_in_generate=True)
        scores = [s.float().numpy() for s in out.scores]  # per step (B, V)
    for b in range(eq.shape[0]):
        if eq[b].all():
            firsts.append(None)
            continue
        i = int(np.argmin(eq[b]))
        firsts.append(i)
        s = scores[i][b]
        gaps.append(dict(row=b, step=i, torch_token=int(torch_tokens[b, i]), jax_token=int(jax_tokens[b, i]),
                         logit_gap=float(s[torch_tokens[b, i]] - s[jax_tokens[b, i]]),
                         logit_scale=float(np.abs(s).max())))
    # positions up to each row's first divergence (after it the rows feed different tokens)
    prefix = [eq.shape[1] if f is None else f for f in firsts]
    return dict(fraction_equal=float(eq.mean()), rows_identical=int(sum(f is None for f in firsts)),
                rows=int(eq.shape[0]), first_divergence=firsts, mean_matching_prefix=float(np.mean(prefix)),
                divergences=gaps)


# ---- the floor ----------------------------------------------------------------------------------


def memory_floor(text_params: int, t: dict, b: int, cache_len: int, prompt_len: int, steps: int, bw: dict,
                 peak: dict) -> dict:
    """Bytes one decode step must read, over bandwidth; and its FLOPs over the measured matmul peak.

    text_params: the text weights a step reads in full (with untied embeddings the input table is
    left out: a step gathers only B of its rows)."""
    weights = 4 * text_params  # every text weight once; a tied table is the logits matrix
    per_slot = t["layers"] * 2 * t["kv_heads"] * t["head_dim"] * 4  # K and V, every layer, float32
    kv_alloc = b * cache_len * per_slot
    kv_valid = b * (prompt_len + (steps - 1) / 2) * per_slot  # mean valid length over the decode
    flops = 2 * b * text_params + b * t["layers"] * 4 * t["heads"] * t["head_dim"] * cache_len
    out = dict(weight_bytes=weights, kv_bytes_allocated=kv_alloc, kv_bytes_valid_mean=kv_valid,
               bytes_per_step=weights + kv_alloc, bytes_per_step_valid=weights + kv_valid,
               copy_gbs=bw["copy_gbs"], read_gbs=bw["read_gbs"], flops_per_step=flops, peak_gflops=peak["gflops"])
    out["floor_ms"] = 1e3 * (weights + kv_alloc) / (bw["copy_gbs"] * 1e9)  # the goal's floor
    out["floor_ms_valid_kv"] = 1e3 * (weights + kv_valid) / (bw["copy_gbs"] * 1e9)
    out["floor_ms_read_bw"] = 1e3 * (weights + kv_alloc) / (bw["read_gbs"] * 1e9)  # stricter: read bandwidth
    out["compute_floor_ms"] = 1e3 * flops / (peak["gflops"] * 1e9)
    return out


# ---- profile of one decode step -----------------------------------------------------------------


def profile_step(model, b: int, cache_len: int, valid_len: int, bw: dict, torch_model=None) -> dict:
    """Times the pieces of one decode step at batch b, each jitted alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ..kv_cache import KVCache
    from ..models.qwen_vl.text import attention

    cfg = model.cfg.text
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 1)), jnp.int32)
    cache = KVCache.create(num_layers=cfg.num_hidden_layers, batch=b, max_len=cache_len,
                           kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=jnp.float32)
    cache = cache.replace(lengths=jnp.full((b,), valid_len, jnp.int32))

    @jax.jit
    def step(state, cache, tok):  # one while_loop iteration (greedy), outside the loop, no donation
        m = nnx.merge(graphdef, state)
        hidden, cache = m.extend(cache, tok, jnp.ones((b,), jnp.int32))
        logits = m.logits(hidden[:, 0])
        nxt = jnp.argmax(logits, -1)
        lp = jax.nn.log_softmax(logits, -1)
        return nxt, jnp.take_along_axis(lp, nxt[:, None], -1), cache

    @jax.jit
    def layers_only(state, cache, tok):  # embed + decoder layers + final norm + cache writes, no logits
        m = nnx.merge(graphdef, state)
        return m.extend(cache, tok, jnp.ones((b,), jnp.int32))

    @jax.jit
    def logits_tied(table, h):  # the model's tied head: h @ E.T with E stored (V, E)
        return jnp.dot(h, table.T)

    @jax.jit
    def logits_ev(w, h):  # the same product against an (E, V) copy
        return jnp.dot(h, w)

    @jax.jit
    def logits_vb(table, h):  # the transposed product E @ h.T -> (V, B): no transposed operand
        return jnp.dot(table, h.T)

    @jax.jit
    def logits_chunked(chunks, h):  # (E, V) split into (n, E, C) vocab chunks, one small GEMM per chunk
        out = jax.lax.map(lambda w: jnp.dot(h, w), chunks)  # (n, B, C)
        return out.transpose(1, 0, 2).reshape(h.shape[0], -1)

    @jax.jit
    def argmax_logsoftmax(logits):
        nxt = jnp.argmax(logits, -1)
        return nxt, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[:, None], -1)

    table = model.embed_tokens[...] if model.lm_head is None else model.lm_head.weight[...]  # (V, E)
    table_np = np.asarray(table)
    v, e = table_np.shape
    table_ev = jnp.asarray(np.ascontiguousarray(table_np.T))
    c = 2048
    n_chunks = -(-v // c)
    padded = np.zeros((n_chunks * c, e), np.float32)
    padded[:v] = table_np
    chunks = jnp.asarray(np.ascontiguousarray(padded.reshape(n_chunks, c, e).transpose(0, 2, 1)))
    del padded
    h = jnp.asarray(rng.standard_normal((b, e)), jnp.float32)
    logits = logits_tied(table, h)
    np.testing.assert_allclose(np.asarray(logits_chunked(chunks, h))[:, :v], np.asarray(logits), rtol=1e-3, atol=1e-3)

    out = {}
    out["step_ms"] = 1e3 * _best(step, state, cache, tok)
    out["layers_only_ms"] = 1e3 * _best(layers_only, state, cache, tok)
    out["logits_VE_ms"] = 1e3 * _best(logits_tied, table, h)
    out["logits_EV_ms"] = 1e3 * _best(logits_ev, table_ev, h)
    out["logits_VB_ms"] = 1e3 * _best(logits_vb, table, h)
    out["logits_chunked_ms"] = 1e3 * _best(logits_chunked, chunks, h)
    out["logits_chunk"] = c
    out["argmax_logsoftmax_ms"] = 1e3 * _best(argmax_logsoftmax, logits)
    head_bytes = 4 * v * e
    for k in ("VE", "EV", "VB", "chunked"):
        out[f"logits_{k}_gbs"] = head_bytes / (out[f"logits_{k}_ms"] / 1e3) / 1e9
    layer_bytes = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.layers)))
    out["layer_weight_bytes"] = layer_bytes
    out["layers_only_gbs"] = layer_bytes / (out["layers_only_ms"] / 1e3) / 1e9
    out["head_bytes"] = head_bytes
    out["head_floor_ms"] = 1e3 * head_bytes / (bw["copy_gbs"] * 1e9)
    out["layers_floor_ms"] = 1e3 * layer_bytes / (bw["copy_gbs"] * 1e9)

    # attention alone (one layer, all heads), over the allocated cache vs only the valid slots
    q = jnp.asarray(rng.standard_normal((b, 1, cfg.num_attention_heads, cfg.head_dim)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((b, cache_len, cfg.num_key_value_heads, cfg.head_dim)), jnp.float32)
    att = jax.jit(lambda q, k, v, m: attention(q, k, v, m, cfg.head_dim ** -0.5))
    mask = jnp.broadcast_to(jnp.arange(cache_len)[None, None, :] < valid_len, (b, 1, cache_len))
    out["attention_full_cache_ms_per_layer"] = 1e3 * _best(att, q, kv, kv, mask)
    out["attention_valid_only_ms_per_layer"] = 1e3 * _best(att, q, kv[:, :valid_len], kv[:, :valid_len],
                                                           mask[:, :, :valid_len])
    if torch_model is not None:
        import torch

        th, te = torch.tensor(np.asarray(h)), torch.tensor(table_np)
        with torch.inference_mode():
            out["torch_logits_VE_ms"] = 1e3 * _best(lambda: torch.nn.functional.linear(th, te))

    return out


def op_profile(model, b: int, cache_len: int, valid_len: int, calls: int = 8) -> dict | None:
    """Per-op time of one greedy decode step (the body of the decode loop: model.extend on one token,
    model.logits, argmax, log_softmax; the cache donated as in the loop), from a jax.profiler trace of
    XLA:CPU's thunks, grouped into `hlo.OP_CATEGORIES` by each instruction's shape and metadata."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ..kv_cache import KVCache

    cfg = model.cfg.text
    graphdef, state = nnx.split(model)
    tok = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (b, 1)), jnp.int32)

    def fresh():
        c = KVCache.create(num_layers=cfg.num_hidden_layers, batch=b, max_len=cache_len,
                           kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=jnp.float32)
        return c.replace(lengths=jnp.full((b,), valid_len, jnp.int32))

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, cache, tok):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.extend(cache, tok, jnp.zeros((b,), jnp.int32))  # length kept: same slots each call
        logits = m.logits(hidden[:, 0])
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[:, None], -1)
        return nxt[:, None], lp, cache

    info = hlo.instructions(step.lower(state, fresh(), tok).compile().as_text())
    box = [fresh()]
    for _ in range(2):
        _, _, box[0] = step(state, box[0], tok)
    jax.block_until_ready(box[0])

    def one_step():
        _, _, box[0] = step(state, box[0], tok)
        return box[0]

    traced = hlo.op_times(one_step, info, calls)
    if traced is None:
        return None
    per_op, wall = traced
    return dict(wall_ms=1e3 * wall, **hlo.categorized(per_op, info, cfg.vocab_size, cache_len))


def cache_scan(model, rows: np.ndarray, steps: int, cache_lens, repeats: int = 2) -> dict:
    """Decode ms per forward pass with the same prompt rows (B, P) and tokens but more cache slots
    allocated (the valid part stays P + steps): {slots: {"ms_per_step": best, "median", "mean",
    "compiles", "tokens_equal"}}. A size below the prompt bucket + steps is raised to it. The
    sizes take turns within each repeat (a first, untimed round compiles), so a drifting machine
    does not favour the first size."""
    import jax

    from .. import compiles
    from ..generation import Generator, prepare_batch

    gen = Generator(model)
    prepared = prepare_batch(model, [list(r) for r in rows])
    sizes = list(dict.fromkeys(max(int(n), prepared.input_ids.shape[1] + steps) for n in cache_lens))
    times = {n: [] for n in sizes}
    n_compiles = {n: 0 for n in sizes}
    tokens = {}
    for rep in range(repeats + 1):
        for n_slots in sizes:
            logits, cache = gen.prefill(prepared, n_slots)
            jax.block_until_ready((logits, cache))
            before = compiles.totals()[0]
            t0 = time.perf_counter()
            out, *_ = gen.decode(cache, logits, max_new_tokens=steps, stop_ids=(), out_len=steps)
            tokens[n_slots] = np.asarray(jax.block_until_ready(out))
            if rep:  # steps sampled tokens take steps - 1 forward passes (the last token is never fed)
                times[n_slots].append(1e3 * (time.perf_counter() - t0) / (steps - 1))
                n_compiles[n_slots] += compiles.totals()[0] - before
    reference = tokens[sizes[0]]
    return {n: dict(ms_per_step=min(times[n]), median=float(np.median(times[n])), mean=float(np.mean(times[n])),
                    compiles=n_compiles[n], tokens_equal=bool(np.array_equal(tokens[n], reference))) for n in sizes}


# ---- the whole benchmark ------------------------------------------------------------------------


def environment() -> dict:
    """Versions, the machine, its load and the code's git state, for the log and the JSON."""
    import flax
    import jax
    import jaxlib
    import torch
    import transformers

    return dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                numpy=np.__version__, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                jax_devices=[str(d) for d in jax.devices()], machine=platform.machine(), cpu=cpu_name(),
                mem_gib=memory_gib(), loadavg_start=os.getloadavg(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                git=git_state())


def _machine(mib: int, wait_s: float):
    wait_quiet(wait_s)
    with CpuShare() as share:
        bw = bandwidth.host_bandwidth(mib)
        peak = bandwidth.peak_flops()
    return bw, peak, share.other


def run(a) -> int:
    """The benchmark with `scripts/bench_decode.py`'s parsed options `a`; logs as it goes and writes
    every figure to `a.json` when set."""
    import torch

    from .. import compiles
    from ..loading import load_model

    torch.set_num_threads(a.threads or os.cpu_count())
    compiles.install()  # from the start: the first calls' compilations are counted too
    env = environment()
    log(f"# bench_decode: {env}")
    log(f"# args: {vars(a)}")
    t0 = time.perf_counter()

    bw, peak, other = _machine(a.bandwidth_mib, a.wait_quiet)
    log(f"\n## machine: memory bandwidth ({a.bandwidth_mib} MiB float32 array, best of 5; GB = 1e9 bytes), matmul peak")
    log(f"copy (read+write): numpy {bw['numpy_copy_gbs']:.1f} GB/s, jax {bw['jax_copy_gbs']:.1f} GB/s"
        f" -> floor bandwidth {bw['copy_gbs']:.1f} GB/s")
    log(f"read: numpy 1 thread {bw['numpy_read_gbs']:.1f}, numpy 2 threads {bw['numpy_read_2threads_gbs']:.1f}, "
        f"jax {bw['jax_read_gbs']:.1f} GB/s -> strict floor bandwidth {bw['read_gbs']:.1f} GB/s")
    log(f"float32 {peak['n']}^2 matmul: jax {peak['jax_gflops']:.0f} GFLOP/s, torch {peak['torch_gflops']:.0f} GFLOP/s"
        f"   (other processes used {_pct(other)} of the CPUs meanwhile)")

    cfg = bench_model_config(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, heads=a.heads,
                             kv_heads=a.kv_heads, head_dim=a.head_dim, vocab=a.vocab, tie=not a.untied)
    tmodel = build_torch_model(cfg, a.seed)
    params = count_torch_params(tmodel)
    n_embed = a.vocab * a.hidden * (2 if a.untied else 1)
    log(f"\n## model: Qwen3-VL text, hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv heads, "
        f"head_dim {a.head_dim}, intermediate {a.intermediate}, vocab {a.vocab}, "
        f"{'untied' if a.untied else 'tied'} embeddings, vision depth 1, float32")
    log(f"params: text {params['text'] / 1e6:.2f}M (embedding{'+lm_head' if a.untied else ' = lm_head'} "
        f"{n_embed / 1e6:.2f}M, decoder layers + norms {(params['text'] - n_embed) / 1e6:.2f}M), "
        f"vision {params['vision'] / 1e6:.3f}M, total {params['total'] / 1e6:.2f}M")
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as folder:
        tmodel.save_pretrained(folder)
        jmodel = load_model(folder, "float32")
    if a.skip_torch:
        del tmodel
        tmodel = None
        gc.collect()
    log(f"built, saved and loaded in {time.perf_counter() - t0:.1f} s (so far)")

    rng = np.random.default_rng(a.seed)
    # random text ids below the special tokens: no image / vision tokens in the prompt
    all_rows = rng.integers(0, min(a.vocab - 8, 151643), (max(a.batch_sizes), a.prompt_len)).astype(np.int32)
    t_shape = dict(layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim)

    results = []
    for b in a.batch_sizes:
        log(f"\n## batch {b}: prompt {a.prompt_len} tokens, {a.steps} new tokens, best of {a.repeats}")
        r = bench_batch(jmodel, tmodel, all_rows[:b], a.steps, a.repeats, a.wait_quiet)
        j = r["jax"]
        log(f"dreamr-jax:   prefill {j['prefill_s'] * 1e3:.1f} ms, decode {j['decode_s']:.3f} s / {a.steps} steps = "
            f"{j['ms_per_step']:.2f} ms/step = {j['decode_tok_s']:.1f} tok/s; compile {j['compile_s']:.2f} s "
            f"(XLA compiles: first call {j['xla_compiles_first_call']}, later calls {j['xla_compiles_steady']}); "
            f"samples {_ms(j['decode_s_all'], a.steps)} ms/step, other CPU use {_pcts(j['other_cpu_share_all'])}")
        if "torch" in r:
            tr, ag = r["torch"], r["agreement"]
            log(f"transformers: generate(1) {tr['generate_1_s'] * 1e3:.1f} ms, generate({a.steps}) "
                f"{tr['generate_n_s']:.3f} s -> {tr['ms_per_step']:.2f} ms/step = {tr['decode_tok_s']:.1f} tok/s "
                f"(first call {tr['warmup_s']:+.2f} s vs steady); other CPU use {_pcts(tr['other_cpu_share_all'])}")
            log(f"greedy agreement: {ag['fraction_equal'] * 100:.1f}% of positions equal, "
                f"{ag['rows_identical']}/{ag['rows']} rows identical, mean matching prefix "
                f"{ag['mean_matching_prefix']:.1f}/{a.steps}")
            for d in ag["divergences"]:
                log(f"  row {d['row']} diverges at step {d['step']}: transformers picks {d['torch_token']}, dreamr-jax "
                    f"{d['jax_token']}; their logits differ by {d['logit_gap']:.2e} in transformers "
                    f"(max |logit| {d['logit_scale']:.1f})")
        if any(w is None or w > 0.5 for w in r["quiet_waits_s"]):
            log(f"waits for a quiet machine before the samples (s; None = gave up after {a.wait_quiet:.0f} s): "
                f"{[None if w is None else round(w, 1) for w in r['quiet_waits_s']]}")
        fl = memory_floor(params["text"] - (a.vocab * a.hidden if a.untied else 0), t_shape, b, j["cache_len"],
                          a.prompt_len, a.steps, bw, peak)
        r["floor"] = fl
        r["step_over_floor"] = j["ms_per_step"] / fl["floor_ms"]
        r["step_over_floor_read_bw"] = j["ms_per_step"] / fl["floor_ms_read_bw"]
        log(f"floor: {fl['weight_bytes'] / 1e6:.1f} MB weights + {fl['kv_bytes_allocated'] / 1e6:.2f} MB KV cache "
            f"({j['cache_len']} slots allocated; valid part {fl['kv_bytes_valid_mean'] / 1e6:.2f} MB on average) "
            f"per step / {bw['copy_gbs']:.1f} GB/s (start) = {fl['floor_ms']:.2f} ms/step "
            f"(valid KV only {fl['floor_ms_valid_kv']:.2f}; at read bandwidth {fl['floor_ms_read_bw']:.2f}; "
            f"compute {fl['flops_per_step'] / 1e9:.2f} GFLOP at {peak['gflops']:.0f} GFLOP/s = "
            f"{fl['compute_floor_ms']:.2f} ms)")
        log(f"dreamr-jax step/floor {r['step_over_floor']:.2f} "
            f"(vs read-bandwidth floor {r['step_over_floor_read_bw']:.2f})"
            + (f"; transformers step/floor {r['torch']['ms_per_step'] / fl['floor_ms']:.2f}" if "torch" in r else ""))
        results.append(r)

    from ..generation import _decode, _prefill

    jit_cache = dict(prefill=_prefill._cache_size(), decode=_decode._cache_size())  # before the profile's own compiles

    profile = None
    if not a.no_profile:
        profile = _profile(a, jmodel, tmodel, results, all_rows, params, bw)

    # Bandwidth and peak again, now that everything else ran: a shared VM's figures drift, and a
    # floor from a momentarily slow measurement would flatter every ratio. The best of both counts.
    bw_end, peak_end, other = _machine(a.bandwidth_mib, a.wait_quiet)
    bw_start, peak_start = bw, peak
    bw = {k: max(v, bw_end[k]) if isinstance(v, float) else v for k, v in bw_start.items()}
    peak = {k: max(v, peak_end[k]) if isinstance(v, float) else v for k, v in peak_start.items()}
    log(f"\n## bandwidth / peak again at the end: copy {bw_end['copy_gbs']:.1f} GB/s, "
        f"read {bw_end['read_gbs']:.1f} GB/s, "
        f"matmul {peak_end['gflops']:.0f} GFLOP/s (other processes {_pct(other)}); the summary's floors use the "
        f"best of start and end: copy {bw['copy_gbs']:.1f} GB/s, read {bw['read_gbs']:.1f} GB/s, "
        f"matmul {peak['gflops']:.0f} GFLOP/s")
    for r in results:
        fl = memory_floor(r["floor"]["weight_bytes"] // 4, t_shape, r["batch"], r["jax"]["cache_len"], a.prompt_len,
                          a.steps, bw, peak)
        r["floor_at_start"] = r["floor"]
        r["floor"] = fl
        r["step_over_floor"] = r["jax"]["ms_per_step"] / fl["floor_ms"]
        r["step_over_floor_read_bw"] = r["jax"]["ms_per_step"] / fl["floor_ms_read_bw"]
        if "torch" in r:
            r["torch_step_over_floor"] = r["torch"]["ms_per_step"] / fl["floor_ms"]

    goals = _summary(results, jit_cache)
    env["loadavg_end"] = os.getloadavg()
    total = time.perf_counter() - t0
    if a.json:
        write_json(a.json, dict(env=env, args=vars(a), bandwidth=bw, peak=peak, bandwidth_start=bw_start,
                                bandwidth_end=bw_end, peak_start=peak_start, peak_end=peak_end, params=params,
                                config=cfg, results=results, profile=profile, jit_cache_sizes=jit_cache,
                                goals=goals, total_seconds=total))
        log(f"wrote {a.json}")
    log(f"total {total:.0f} s")
    return 0


def _profile(a, jmodel, tmodel, results, all_rows, params, bw) -> dict:
    log("\n## profile: one decode step, pieces jitted alone (best of several)")
    profile = {}
    for r in results:
        b, j = r["batch"], r["jax"]
        valid = a.prompt_len + a.steps // 2
        wait_quiet(a.wait_quiet)
        with CpuShare() as share:
            p = profile_step(jmodel, b, j["cache_len"], valid, bw, tmodel)
        p["other_cpu_share"] = share.other
        profile[b] = p
        log(f"batch {b}: whole step {p['step_ms']:.2f} ms (inside the decode loop: {j['ms_per_step']:.2f}); "
            f"embed + decoder layers + cache writes alone {p['layers_only_ms']:.2f} ms "
            f"({p['layer_weight_bytes'] / 1e6:.1f} MB of layer weights, floor {p['layers_floor_ms']:.2f}); "
            f"argmax + log_softmax {p['argmax_logsoftmax_ms']:.2f} ms")
        log(f"         logits ({b},{a.hidden})x({a.hidden},{a.vocab}), floor {p['head_floor_ms']:.2f} ms: "
            f"h @ E.T as the model does it {p['logits_VE_ms']:.2f} ms ({p['logits_VE_gbs']:.1f} GB/s), "
            f"against an (E,V) copy {p['logits_EV_ms']:.2f} ms ({p['logits_EV_gbs']:.1f} GB/s), "
            f"as E @ h.T -> (V,B) {p['logits_VB_ms']:.2f} ms ({p['logits_VB_gbs']:.1f} GB/s), "
            f"(E,V) in {p['logits_chunk']}-column chunks under lax.map {p['logits_chunked_ms']:.2f} ms "
            f"({p['logits_chunked_gbs']:.1f} GB/s)"
            + (f"; torch F.linear {p['torch_logits_VE_ms']:.2f} ms" if "torch_logits_VE_ms" in p else ""))
        log(f"         attention per layer: whole cache ({j['cache_len']} slots) "
            f"{p['attention_full_cache_ms_per_layer']:.3f} ms, valid slots only ({valid}) "
            f"{p['attention_valid_only_ms_per_layer']:.3f} ms; other CPU use {_pct(share.other)}")
        cats = op_profile(jmodel, b, j["cache_len"], valid)
        p["op_profile"] = cats
        if cats is not None:
            log(f"         XLA op profile of one decode step ({cats['wall_ms']:.2f} ms wall, ops "
                f"{cats['ops_ms']:.2f} ms): " + ", ".join(f"{k} {v:.2f}" for k, v in cats["categories_ms"].items()))
        if a.cache_lens:
            wait_quiet(a.wait_quiet)
            scan_steps = min(a.steps, 64)
            scanned = cache_scan(jmodel, all_rows[:b], scan_steps, a.cache_lens)
            scan = {cl: r["ms_per_step"] for cl, r in scanned.items()}
            p["cache_scan_ms_per_step"] = scan
            p["cache_scan_steps"] = scan_steps
            floors = {cl: 1e3 * (4 * params["text"] + b * cl * a.layers * 2 * a.kv_heads * a.head_dim * 4)
                      / (bw["copy_gbs"] * 1e9) for cl in scan}
            p["cache_scan_floor_ms"] = floors
            log(f"         same decode ({scan_steps} steps, valid length <= {a.prompt_len + scan_steps}) with more "
                f"cache slots allocated: " + ", ".join(f"{cl} slots {ms:.2f} ms/step (floor {floors[cl]:.2f})"
                                                       for cl, ms in scan.items()))
            big = max(scan)
            cats_big = op_profile(jmodel, b, big, valid)
            p["op_profile_largest_cache"] = cats_big
            if cats_big is not None:
                log(f"         op profile at {big} slots ({cats_big['wall_ms']:.2f} ms wall): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in cats_big["categories_ms"].items()))
    return profile


def _summary(results, jit_cache) -> dict:
    """The summary table and the goals (batch 1 at least 2x transformers, every step within 1.5x
    of its floor)."""
    log("\n## summary (ms/step: one decode forward pass + greedy pick for the whole batch; "
        "decode tok/s = batch / ms/step; e2e includes prefill)")
    head = ["impl", "batch", "ms/step", "decode tok/s", "e2e tok/s", "prefill ms", "floor ms", "step/floor",
            "read floor", "step/read", "compile s"]
    widths = [12, 5, 8, 12, 9, 10, 8, 10, 10, 9, 9]
    log(fmt_row(head, widths))
    for r in results:
        fl = r["floor"]
        rows_out = [("dreamr-jax", r["jax"], f"{r['jax']['compile_s']:.2f}")]
        if "torch" in r:
            rows_out.append(("transformers", r["torch"], "-"))
        for name, x, comp in rows_out:
            log(fmt_row([name, r["batch"], f"{x['ms_per_step']:.2f}", f"{x['decode_tok_s']:.1f}",
                         f"{x['e2e_tok_s']:.1f}", f"{x['prefill_s'] * 1e3:.1f}", f"{fl['floor_ms']:.2f}",
                         f"{x['ms_per_step'] / fl['floor_ms']:.2f}", f"{fl['floor_ms_read_bw']:.2f}",
                         f"{x['ms_per_step'] / fl['floor_ms_read_bw']:.2f}", comp], widths))
    log("floor ms = (weights + whole allocated KV cache) / copy bandwidth (the goal's floor); read floor = the same "
        "bytes / read bandwidth")
    for r in results:
        if "ratio_decode" in r:
            log(f"batch {r['batch']}: dreamr-jax / transformers decode tok/s = {r['ratio_decode']:.2f}x "
                f"(end-to-end {r['ratio_e2e']:.2f}x); greedy agreement {r['agreement']['fraction_equal'] * 100:.1f}%")
    log(f"jit cache sizes after the run: {jit_cache} (one entry per batch size = no recompiles)")
    goals = {}
    r1 = next((r for r in results if r["batch"] == 1), None)
    if r1 is not None and "ratio_decode" in r1:
        goals["batch1_dreamr_at_least_2x_transformers"] = bool(r1["ratio_decode"] >= 2.0)
    goals["step_within_1.5x_floor"] = {r["batch"]: bool(r["step_over_floor"] <= 1.5) for r in results}
    log(f"goals: {goals}")
    return goals


def _pct(x):
    return "?" if x is None else f"{100 * x:.0f}%"


def _pcts(xs):
    return "[" + ", ".join(_pct(x) for x in xs) + "]"


def _ms(seconds, steps):
    return "[" + ", ".join(f"{1e3 * s / steps:.2f}" for s in seconds) + "]"

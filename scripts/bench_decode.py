#!/usr/bin/env python
"""Greedy text decode throughput: dreamr-jax vs transformers (PyTorch) on CPU, same weights.

What it does, in one process:

1. Measures memory bandwidth with a large array copy (numpy and jax, best of several,
   read + write bytes counted, i.e. 2 x size / time).
2. Builds one random-weight Qwen3-VL text model with the real vocabulary (151936) and a
   tiny vision tower (only text decode is measured), as a transformers
   `Qwen3VLForConditionalGeneration`, saves it with `save_pretrained` and loads that folder
   with `dreamr_jax.loading.load_model`, so both sides hold the same float32 weights.
3. For each batch size, greedy-decodes exactly `--steps` new tokens from the same random
   prompts (EOS disabled on both sides) and times prefill and decode separately:

   * dreamr-jax: `Generator.prefill` then `Generator.decode(stop_ids=())`, each call timed
     to `block_until_ready`. The decode call runs `steps` model forward passes (the first
     token is sampled from the prefill logits, each sampled token is then fed), so
     ms/step = decode time / steps. Compile time = first call minus the steady-state call.
   * transformers: `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`
     under `torch.inference_mode()`. generate(N) = prefill + (N-1) forward passes and
     generate(1) = prefill, so ms/step = (t(N) - t(1)) / (N - 1).

   Both ms/step figures are "time of one decode forward pass + sampling" for a batch,
   decode tokens/s = batch / step time. End-to-end tokens/s (prefill + decode) is printed too.
4. Compares the greedy tokens of both implementations (fraction of equal positions, and
   the first divergence per row with the transformers logit gap there, to show near-ties).
5. Computes the memory floor of one decode step: float32 bytes of every text weight read
   (the tied embedding table counted once: it is the logits matrix) plus the KV cache read
   (the whole allocated cache, which dreamr-jax's attention reads every step, and the valid
   part), divided by the measured bandwidth.
6. With profiling on (default; `--no-profile` skips it), times the pieces of one decode step
   in isolation (the full step, the decoder layers alone, the logits matmul against the
   (V, E) table and against a pre-transposed (E, V) copy, attention over the full cache vs
   the valid part), and checks jit cache sizes so recompiles would show.

Run:  .venv/bin/python scripts/bench_decode.py [--steps 128] [--batch-sizes 1,8] [--json out.json]
Smoke: .venv/bin/python scripts/bench_decode.py --quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

# ---- arguments --------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="new tokens per row (default 128; --quick: 8)")
    p.add_argument("--batch-sizes", default=None, help="comma separated (default 1,8; --quick: 1,2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per row (default 96; --quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; --quick: 1)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; --quick: 2)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied, like Qwen3-VL-2B/4B)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: os.cpu_count())")
    p.add_argument("--bandwidth-mib", type=int, default=None, help="array size for the copy test (default 1024; --quick: 256)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-piece profile of one decode step")
    p.add_argument("--skip-torch", action="store_true", help="dreamr-jax only (no agreement check, no ratios)")
    p.add_argument("--quick", action="store_true", help="small numbers for a smoke run (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    a = p.parse_args(argv)
    q = a.quick
    a.steps = a.steps or (8 if q else 128)
    a.batch_sizes = [int(x) for x in (a.batch_sizes or ("1,2" if q else "1,8")).split(",") if x.strip()]
    a.prompt_len = a.prompt_len or (16 if q else 96)
    a.repeats = a.repeats or (1 if q else 3)
    a.layers = a.layers or (2 if q else 4)
    a.bandwidth_mib = a.bandwidth_mib or (256 if q else 1024)
    if a.steps < 2:
        p.error("--steps must be >= 2 (transformers' decode time is t(N) - t(1))")
    return a


def log(*args):
    print(*args, flush=True)


# ---- memory bandwidth ---------------------------------------------------------------------------


def measure_bandwidth(mib: int, repeats: int = 5) -> dict:
    """Copy bandwidth in GB/s (1e9 bytes/s), counting read + write (2 x size / time), best of `repeats`."""
    import jax
    import jax.numpy as jnp

    n = mib * (1 << 20) // 4
    nbytes = n * 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    np_copy = 2 * nbytes / min(times) / 1e9
    # numpy read-only: a sum over the array (one read stream); informational.
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t0)
    np_read = nbytes / min(times) / 1e9
    del src, dst
    gc.collect()

    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a + 0.0)  # a fused elementwise pass: read + write of n floats
    read = jax.jit(lambda a: jnp.sum(a))
    copy(x).block_until_ready()
    read(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = copy(x)
        y.block_until_ready()
        times.append(time.perf_counter() - t0)
        del y
    jax_copy = 2 * nbytes / min(times) / 1e9
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        read(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    jax_read = nbytes / min(times) / 1e9
    del x
    gc.collect()
    return dict(array_mib=mib, numpy_copy_gbs=np_copy, jax_copy_gbs=jax_copy, numpy_read_gbs=np_read,
                jax_read_gbs=jax_read)


# ---- the model ----------------------------------------------------------------------------------


def config_dict(a) -> dict:
    tie = not a.untied
    half = a.head_dim // 2
    # Qwen3-VL's (24, 20, 20) of 64 frequencies, scaled to this head_dim.
    t_sec = round(half * 24 / 64)
    h_sec = (half - t_sec) // 2
    section = [t_sec, h_sec, half - t_sec - h_sec]
    return dict(
        model_type="qwen3_vl",
        tie_word_embeddings=tie,
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        text_config=dict(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
            head_dim=a.head_dim, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768,
            eos_token_id=151645, tie_word_embeddings=tie,
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=section,
                                 mrope_interleaved=True),
        ),
        # Tiny vision tower: one block; only text decode is measured.
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
            spatial_merge_size=2, out_hidden_size=a.hidden, num_position_embeddings=16,
            deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh",
        ),
    )


def build_torch_model(cfg: dict, seed: int):
    """transformers Qwen3-VL with random weights (as tests/conftest.py builds them), float32, sdpa attention."""
    import torch
    import transformers

    torch.manual_seed(seed)
    d = dict(cfg)
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    model = transformers.Qwen3VLForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa",
                                                                      dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms off 1, so every tensor matters
    return model


def count_params(torch_model) -> dict:
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


# ---- dreamr-jax ---------------------------------------------------------------------------------


def bench_jax(model, rows: np.ndarray, steps: int, repeats: int, compile_log: list) -> dict:
    import jax

    from dreamr_jax.generation import Generator, length_bucket, prepare_batch

    gen = Generator(model)
    batch = prepare_batch(model, [list(r) for r in rows])
    out_len = length_bucket(steps)
    cache_len = batch.input_ids.shape[1] + out_len

    def run():
        n_compiles = len(compile_log)
        t0 = time.perf_counter()
        logits, cache = gen.prefill(batch, cache_len)
        jax.block_until_ready((logits, cache))
        t1 = time.perf_counter()
        tokens, logps, n_gen, cache, last = gen.decode(cache, logits, max_new_tokens=steps, stop_ids=(),
                                                       out_len=out_len)
        jax.block_until_ready((tokens, n_gen, cache, last))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, np.asarray(tokens), np.asarray(n_gen), len(compile_log) - n_compiles

    first_prefill, first_decode, tokens, n_gen, first_compiles = run()
    prefills, decodes, steady_compiles = [], [], 0
    for _ in range(repeats):
        p, d, tok2, _, c = run()
        prefills.append(p)
        decodes.append(d)
        steady_compiles += c
        assert np.array_equal(tok2, tokens), "dreamr-jax greedy decode is not deterministic"
    assert (n_gen == steps).all(), f"dreamr-jax generated {n_gen.tolist()} tokens, expected {steps}"
    prefill, decode = min(prefills), min(decodes)
    b = rows.shape[0]
    return dict(
        batch=b, prompt_len=int(rows.shape[1]), prompt_bucket=int(batch.input_ids.shape[1]), cache_len=cache_len,
        out_len=out_len, steps=steps,
        prefill_s=prefill, decode_s=decode, decode_s_all=decodes, prefill_s_all=prefills,
        ms_per_step=1e3 * decode / steps,
        decode_tok_s=b * steps / decode,
        e2e_tok_s=b * steps / (prefill + decode),
        first_prefill_s=first_prefill, first_decode_s=first_decode,
        compile_prefill_s=first_prefill - prefill, compile_decode_s=first_decode - decode,
        compile_s=(first_prefill - prefill) + (first_decode - decode),
        xla_compiles_first_call=first_compiles, xla_compiles_steady=steady_compiles,
        tokens=tokens[:, :steps],
    )


# ---- transformers -------------------------------------------------------------------------------


def bench_torch(model, rows: np.ndarray, steps: int, repeats: int) -> dict:
    import torch

    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.ones_like(ids)

    def generate(n, **kw):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)

    def timed(n):
        t0 = time.perf_counter()
        out = generate(n)
        return time.perf_counter() - t0, out

    first_n, out = timed(steps)
    tn, t1 = [], []
    for _ in range(repeats):
        tn.append(timed(steps)[0])
        t1.append(timed(1)[0])
    new = out[:, rows.shape[1]:].numpy()
    assert new.shape[1] == steps, f"transformers generated {new.shape[1]} tokens, expected {steps}"
    t_n, t_1 = min(tn), min(t1)
    decode = t_n - t_1
    b = rows.shape[0]
    return dict(
        batch=b, steps=steps, generate_n_s=t_n, generate_1_s=t_1, generate_n_s_all=tn, generate_1_s_all=t1,
        prefill_s=t_1, decode_s=decode, ms_per_step=1e3 * decode / (steps - 1),
        decode_tok_s=b * (steps - 1) / decode, e2e_tok_s=b * steps / t_n,
        first_generate_s=first_n, warmup_s=first_n - t_n,
        tokens=new,
    ), generate


def agreement(jax_tokens: np.ndarray, torch_tokens: np.ndarray, torch_generate) -> dict:
    """Fraction of equal positions; per row the first divergence and, there, transformers' logit
    gap between its own pick and dreamr-jax's pick (a small gap = a near-tie, not a bug)."""
    eq = jax_tokens == torch_tokens
    firsts, gaps = [], []
    div_rows = [b for b in range(eq.shape[0]) if not eq[b].all()]
    scores = None
    if div_rows:
        out = torch_generate(jax_tokens.shape[1], output_scores=True, return_dict_in_generate=True)
        scores = [s.float().numpy() for s in out.scores]  # per step (B, V), processed logits
    for b in range(eq.shape[0]):
        if eq[b].all():
            firsts.append(None)
            continue
        i = int(np.argmin(eq[b]))
        firsts.append(i)
        s = scores[i][b]
        top = np.sort(s)[-2:]
        gaps.append(dict(row=b, step=i, torch_token=int(torch_tokens[b, i]), jax_token=int(jax_tokens[b, i]),
                         logit_gap=float(s[torch_tokens[b, i]] - s[jax_tokens[b, i]]),
                         torch_top2_gap=float(top[1] - top[0]), logit_scale=float(np.abs(s).max())))
    return dict(fraction_equal=float(eq.mean()), rows_identical=int(sum(f is None for f in firsts)),
                rows=int(eq.shape[0]), first_divergence=firsts, divergences=gaps)


# ---- the floor ----------------------------------------------------------------------------------


def memory_floor(text_params: int, t: dict, b: int, cache_len: int, prompt_len: int, steps: int, bw_gbs: float) -> dict:
    weights = 4 * text_params
    per_slot = t["layers"] * 2 * t["kv_heads"] * t["head_dim"] * 4  # K and V, every layer, float32
    kv_alloc = b * cache_len * per_slot
    kv_valid = b * (prompt_len + (steps - 1) / 2) * per_slot  # mean valid length over the decode
    alloc = weights + kv_alloc
    valid = weights + kv_valid
    return dict(weight_bytes=weights, kv_bytes_allocated=kv_alloc, kv_bytes_valid_mean=kv_valid,
                bytes_per_step=alloc, bytes_per_step_valid=valid, bandwidth_gbs=bw_gbs,
                floor_ms=1e3 * alloc / (bw_gbs * 1e9), floor_ms_valid=1e3 * valid / (bw_gbs * 1e9))


# ---- profile of one decode step -----------------------------------------------------------------


def best_time(fn, *args, repeats=5, min_s=0.3):
    """Best-of wall time of fn(*args) (jax results blocked on), after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    best, n, t_start = float("inf"), 0, time.perf_counter()
    while n < repeats or time.perf_counter() - t_start < min_s:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
        n += 1
        if n >= 50:
            break
    return best


def profile_step(model, b: int, cache_len: int, valid_len: int, bw_gbs: float, torch_model=None) -> dict:
    """Times the pieces of one decode step at batch b, each jitted alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dreamr_jax.kv_cache import KVCache
    from dreamr_jax.models.qwen_vl.text import attention

    cfg = model.cfg.text
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 1)), jnp.int32)

    def fresh_cache():
        c = KVCache.create(num_layers=cfg.num_hidden_layers, batch=b, max_len=cache_len,
                           kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=jnp.float32)
        return c.replace(lengths=jnp.full((b,), valid_len, jnp.int32))

    @jax.jit
    def step(state, cache, tok):  # what one while_loop iteration does (greedy), without the donation
        m = nnx.merge(graphdef, state)
        hidden, cache = m.extend(cache, tok, jnp.ones((b,), jnp.int32))
        logits = m.logits(hidden[:, 0])
        nxt = jnp.argmax(logits, -1)
        lp = jax.nn.log_softmax(logits, -1)
        return nxt, jnp.take_along_axis(lp, nxt[:, None], -1), cache

    @jax.jit
    def layers_only(state, cache, tok):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.extend(cache, tok, jnp.ones((b,), jnp.int32))
        return hidden, cache

    @jax.jit
    def logits_tied(emb, h):  # the model's tied head: h @ E.T with E stored (V, E)
        return jnp.dot(h, emb.T)

    @jax.jit
    def logits_pre_t(w, h):  # the same product against an (E, V) copy
        return jnp.dot(h, w)

    @jax.jit
    def argmax_logsoftmax(logits):
        nxt = jnp.argmax(logits, -1)
        return nxt, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[:, None], -1)

    cache = fresh_cache()
    emb = model.embed_tokens[...]
    head = emb if model.lm_head is None else model.lm_head.kernel[...].T
    head_t = jnp.asarray(np.ascontiguousarray(np.asarray(head).T))
    h = jnp.asarray(rng.standard_normal((b, cfg.hidden_size)), jnp.float32)
    logits = logits_tied(head, h)

    out = {}
    out["step_ms"] = 1e3 * best_time(step, state, cache, tok)
    out["layers_only_ms"] = 1e3 * best_time(layers_only, state, cache, tok)
    out["logits_VE_ms"] = 1e3 * best_time(logits_tied, head, h)
    out["logits_EV_ms"] = 1e3 * best_time(logits_pre_t, head_t, h)
    out["argmax_logsoftmax_ms"] = 1e3 * best_time(argmax_logsoftmax, logits)
    head_bytes = 4 * head.size
    out["logits_VE_gbs"] = head_bytes / (out["logits_VE_ms"] / 1e3) / 1e9
    out["logits_EV_gbs"] = head_bytes / (out["logits_EV_ms"] / 1e3) / 1e9
    layer_bytes = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.layers)))
    out["layer_weight_bytes"] = layer_bytes
    out["layers_only_gbs"] = layer_bytes / (out["layers_only_ms"] / 1e3) / 1e9
    out["head_bytes"] = head_bytes
    out["head_floor_ms"] = 1e3 * head_bytes / (bw_gbs * 1e9)
    out["layers_floor_ms"] = 1e3 * layer_bytes / (bw_gbs * 1e9)

    # attention alone (one layer, all heads), over the allocated cache vs only the valid slots
    q = jnp.asarray(rng.standard_normal((b, 1, cfg.num_attention_heads, cfg.head_dim)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((b, cache_len, cfg.num_key_value_heads, cfg.head_dim)), jnp.float32)
    att = jax.jit(lambda q, k, v, m: attention(q, k, v, m, cfg.head_dim ** -0.5))
    mask_full = jnp.arange(cache_len)[None, None, :] < valid_len
    mask_full = jnp.broadcast_to(mask_full, (b, 1, cache_len))
    out["attention_full_cache_ms_per_layer"] = 1e3 * best_time(att, q, kv, kv, mask_full)
    out["attention_valid_only_ms_per_layer"] = 1e3 * best_time(att, q, kv[:, :valid_len], kv[:, :valid_len],
                                                               mask_full[:, :, :valid_len])

    # one dense matmul of each layer's shape, jax vs torch (are small GEMVs slow in XLA:CPU?)
    e, f = cfg.hidden_size, cfg.intermediate_size
    w_up = jnp.asarray(rng.standard_normal((e, f)), jnp.float32)
    mm = jax.jit(lambda x, w: jnp.dot(x, w))
    out["jax_matmul_ExF_ms"] = 1e3 * best_time(mm, h, w_up)
    if torch_model is not None:
        import torch

        th, tw = torch.tensor(np.asarray(h)), torch.tensor(np.asarray(w_up))
        te = torch.tensor(np.asarray(head))
        with torch.inference_mode():
            out["torch_matmul_ExF_ms"] = 1e3 * best_time(lambda: th @ tw)
            out["torch_logits_VE_ms"] = 1e3 * best_time(lambda: torch.nn.functional.linear(th, te))

    # does the compiled decode step transpose / copy the (V, E) table?
    hlo = step.lower(state, cache, tok).compile().as_text()
    v, e = cfg.vocab_size, cfg.hidden_size
    big = [ln.strip()[:160] for ln in hlo.splitlines()
           if (f"f32[{e},{v}]" in ln or f"f32[{v},{e}]" in ln) and any(op in ln for op in (" transpose(", " copy("))]
    out["table_transposes_in_step_hlo"] = big
    return out


# ---- main ---------------------------------------------------------------------------------------


def fmt_row(cells, widths):
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def main(argv=None):
    a = parse_args(argv)
    import jax

    import torch
    import transformers

    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    import flax

    import dreamr_jax
    from dreamr_jax.loading import load_model

    compile_log: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compile_log.append(duration) if event == "/jax/core/compile/backend_compile_duration" else None)

    env = dict(python=platform.python_version(), jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None)
               or __import__("jaxlib").__version__, flax=flax.__version__, torch=torch.__version__,
               transformers=transformers.__version__, numpy=np.__version__, cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), jax_devices=[str(d) for d in jax.devices()],
               machine=platform.machine(), processor=_cpu_name())
    log(f"# bench_decode: {env}")
    log(f"# args: {vars(a)}")

    t0 = time.perf_counter()
    bw = measure_bandwidth(a.bandwidth_mib)
    log(f"\n## memory bandwidth ({a.bandwidth_mib} MiB array, best of 5; GB = 1e9 bytes)")
    log(f"numpy copy {bw['numpy_copy_gbs']:.1f} GB/s (read+write)   jax copy {bw['jax_copy_gbs']:.1f} GB/s (read+write)")
    log(f"numpy sum  {bw['numpy_read_gbs']:.1f} GB/s (read)         jax sum  {bw['jax_read_gbs']:.1f} GB/s (read)")
    bw_floor = max(bw["numpy_copy_gbs"], bw["jax_copy_gbs"])
    log(f"floor uses the best copy figure: {bw_floor:.1f} GB/s")

    cfg = config_dict(a)
    tmodel = build_torch_model(cfg, a.seed)
    params = count_params(tmodel)
    t = cfg["text_config"]
    non_embed = params["text"] - a.vocab * a.hidden * (1 if not a.untied else 2)
    log(f"\n## model: Qwen3-VL text, hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv heads, "
        f"head_dim {a.head_dim}, intermediate {a.intermediate}, vocab {a.vocab}, "
        f"{'untied' if a.untied else 'tied'} embeddings, vision depth 1")
    log(f"params: text {params['text'] / 1e6:.2f}M (embedding/lm_head {(params['text'] - non_embed) / 1e6:.2f}M, "
        f"decoder layers + norm {non_embed / 1e6:.2f}M), vision {params['vision'] / 1e6:.3f}M, "
        f"total {params['total'] / 1e6:.2f}M")

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as folder:
        tmodel.save_pretrained(folder)
        jmodel = load_model(folder, "float32")
    log(f"built + saved + loaded in {time.perf_counter() - t0:.1f}s")

    rng = np.random.default_rng(a.seed)
    # random text tokens below the special-token range (151643+), so no image/vision tokens
    all_rows = rng.integers(0, min(a.vocab, 151643), (max(a.batch_sizes), a.prompt_len)).astype(np.int32)

    results = []
    for b in a.batch_sizes:
        rows = all_rows[:b]
        log(f"\n## batch {b}: prompt {a.prompt_len} tokens, {a.steps} new tokens")
        j = bench_jax(jmodel, rows, a.steps, a.repeats, compile_log)
        log(f"dreamr-jax:   prefill {j['prefill_s'] * 1e3:.1f} ms, decode {j['decode_s']:.3f} s = "
            f"{j['ms_per_step']:.2f} ms/step = {j['decode_tok_s']:.1f} tok/s "
            f"(compile {j['compile_s']:.2f} s; XLA compiles first call {j['xla_compiles_first_call']}, "
            f"steady {j['xla_compiles_steady']})")
        r = dict(batch=b, jax=j)
        if not a.skip_torch:
            tr, generate = bench_torch(tmodel, rows, a.steps, a.repeats)
            log(f"transformers: generate(1) {tr['generate_1_s'] * 1e3:.1f} ms, generate({a.steps}) "
                f"{tr['generate_n_s']:.3f} s -> {tr['ms_per_step']:.2f} ms/step = {tr['decode_tok_s']:.1f} tok/s "
                f"(first call {tr['warmup_s']:+.2f} s vs steady)")
            ag = agreement(j["tokens"], tr["tokens"], generate)
            log(f"greedy agreement: {ag['fraction_equal'] * 100:.1f}% of positions equal, "
                f"{ag['rows_identical']}/{ag['rows']} rows identical")
            for d in ag["divergences"]:
                log(f"  row {d['row']} diverges at step {d['step']}: transformers picks {d['torch_token']}, dreamr-jax "
                    f"{d['jax_token']}; transformers' logit gap between them {d['logit_gap']:.2e} "
                    f"(|logit| max {d['logit_scale']:.2f})")
            r["torch"], r["agreement"] = tr, ag
            r["ratio_decode"] = j["decode_tok_s"] / tr["decode_tok_s"]
            r["ratio_e2e"] = j["e2e_tok_s"] / tr["e2e_tok_s"]
        fl = memory_floor(params["text"], dict(layers=a.layers, kv_heads=a.kv_heads, head_dim=a.head_dim), b,
                          j["cache_len"], a.prompt_len, a.steps, bw_floor)
        r["floor"] = fl
        r["step_over_floor"] = j["ms_per_step"] / fl["floor_ms"]
        log(f"floor: {fl['weight_bytes'] / 1e6:.1f} MB weights + {fl['kv_bytes_allocated'] / 1e6:.2f} MB KV "
            f"(allocated {j['cache_len']} slots; valid mean {fl['kv_bytes_valid_mean'] / 1e6:.2f} MB) per step / "
            f"{bw_floor:.1f} GB/s = {fl['floor_ms']:.2f} ms/step -> dreamr-jax step/floor {r['step_over_floor']:.2f}"
            + (f", transformers step/floor {tr['ms_per_step'] / fl['floor_ms']:.2f}" if not a.skip_torch else ""))
        results.append(r)

    profile = None
    if not a.no_profile:
        log("\n## profile: one decode step, pieces jitted alone (best of several)")
        profile = {}
        for r in results:
            b, j = r["batch"], r["jax"]
            valid = a.prompt_len + a.steps // 2
            p = profile_step(jmodel, b, j["cache_len"], valid, bw_floor, None if a.skip_torch else tmodel)
            profile[b] = p
            log(f"batch {b}: full step {p['step_ms']:.2f} ms (in the while_loop: {j['ms_per_step']:.2f} ms) | "
                f"decoder layers alone {p['layers_only_ms']:.2f} ms ({p['layers_only_gbs']:.1f} GB/s over "
                f"{p['layer_weight_bytes'] / 1e6:.1f} MB; floor {p['layers_floor_ms']:.2f}) | "
                f"logits h@E.T {p['logits_VE_ms']:.2f} ms ({p['logits_VE_gbs']:.1f} GB/s; floor {p['head_floor_ms']:.2f}), "
                f"against an (E,V) copy {p['logits_EV_ms']:.2f} ms ({p['logits_EV_gbs']:.1f} GB/s) | "
                f"argmax+log_softmax {p['argmax_logsoftmax_ms']:.2f} ms")
            log(f"         attention per layer: full cache ({j['cache_len']}) {p['attention_full_cache_ms_per_layer']:.3f} ms,"
                f" valid only ({valid}) {p['attention_valid_only_ms_per_layer']:.3f} ms | matmul ({b},{a.hidden})x"
                f"({a.hidden},{a.intermediate}): jax {p['jax_matmul_ExF_ms']:.3f} ms"
                + (f", torch {p['torch_matmul_ExF_ms']:.3f} ms; torch logits {p['torch_logits_VE_ms']:.2f} ms"
                   if "torch_matmul_ExF_ms" in p else ""))
            if p["table_transposes_in_step_hlo"]:
                log(f"         compiled step transposes/copies the vocab table: {p['table_transposes_in_step_hlo']}")
    from dreamr_jax.generation import _decode, _prefill

    jit_cache = dict(prefill=_prefill._cache_size(), decode=_decode._cache_size())

    # ---- summary table ----
    log("\n## summary (decode = per-step time of the decode loop; tok/s = batch / step time)")
    head = ["impl", "batch", "ms/step", "decode tok/s", "e2e tok/s", "prefill ms", "floor ms", "step/floor",
            "compile s"]
    widths = [12, 5, 8, 12, 9, 10, 8, 10, 9]
    log(fmt_row(head, widths))
    for r in results:
        j, fl = r["jax"], r["floor"]
        log(fmt_row(["dreamr-jax", r["batch"], f"{j['ms_per_step']:.2f}", f"{j['decode_tok_s']:.1f}",
                     f"{j['e2e_tok_s']:.1f}", f"{j['prefill_s'] * 1e3:.1f}", f"{fl['floor_ms']:.2f}",
                     f"{r['step_over_floor']:.2f}", f"{j['compile_s']:.2f}"], widths))
        if "torch" in r:
            tr = r["torch"]
            log(fmt_row(["transformers", r["batch"], f"{tr['ms_per_step']:.2f}", f"{tr['decode_tok_s']:.1f}",
                         f"{tr['e2e_tok_s']:.1f}", f"{tr['prefill_s'] * 1e3:.1f}", f"{fl['floor_ms']:.2f}",
                         f"{tr['ms_per_step'] / fl['floor_ms']:.2f}", "-"], widths))
    for r in results:
        if "ratio_decode" in r:
            log(f"batch {r['batch']}: dreamr-jax / transformers decode tok/s = {r['ratio_decode']:.2f}x "
                f"(end-to-end {r['ratio_e2e']:.2f}x); greedy agreement {r['agreement']['fraction_equal'] * 100:.1f}%")
    log(f"jit cache sizes after the run: {jit_cache} (one entry per batch shape = no recompiles)")
    goals = {}
    r1 = next((r for r in results if r["batch"] == 1), None)
    if r1 is not None and "ratio_decode" in r1:
        goals["batch1_at_least_2x_transformers"] = bool(r1["ratio_decode"] >= 2.0)
    goals["step_within_1.5x_floor"] = {r["batch"]: bool(r["step_over_floor"] <= 1.5) for r in results}
    log(f"goals: {goals}")

    if a.json:
        def clean(o):
            if isinstance(o, dict):
                return {str(k): clean(v) for k, v in o.items() if k != "tokens"}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            if isinstance(o, (np.integer,)):
                return int(o)
            if isinstance(o, (np.floating,)):
                return float(o)
            if isinstance(o, np.bool_):
                return bool(o)
            return o

        doc = dict(env=env, args=vars(a), bandwidth=bw, floor_bandwidth_gbs=bw_floor, params=params,
                   config=cfg, results=results, profile=profile, jit_cache_sizes=jit_cache, goals=goals,
                   total_seconds=time.perf_counter() - t0)
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(clean(doc), f, indent=1)
        log(f"wrote {a.json}")
    log(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())

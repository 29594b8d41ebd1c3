#!/usr/bin/env python
"""Greedy text decode throughput: dreamr-jax vs transformers (PyTorch) on CPU, same weights.

What it does, in one process:

1. Measures memory bandwidth with a large array copy (numpy and jax, best of several,
   read + write bytes counted, i.e. 2 x size / time), read-only bandwidth (sums), and the
   float32 matmul peak (a 2048^2 product).
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
   part), divided by the copy bandwidth (the goal's floor). Also printed: the same bytes over
   the read bandwidth, and the step's FLOPs over the matmul peak (the compute side).
6. With profiling on (default; `--no-profile` skips it): times the pieces of one decode step
   jitted alone (the whole step, the decoder layers alone, the logits matmul as the model
   writes it and in three other layouts, argmax + log_softmax, attention over the whole cache
   vs its valid part), takes an XLA op profile of one step (jax.profiler trace, grouped into
   logits matmul / vocabulary reductions / layer matmuls / KV cache / other), and decodes again
   with larger allocated caches (`--cache-lens`) to show what attending over every allocated
   slot costs. jit cache sizes are printed so that a recompile would show.

The machine may be shared: before each timed sample the script waits (up to `--wait-quiet`
seconds) for other processes to leave the CPUs idle, and prints for each sample how much CPU
other processes used meanwhile. Best-of-repeats figures are reported.

Run:  .venv/bin/python scripts/bench_decode.py [--steps 128] [--batch-sizes 1,8] [--json out.json]
Smoke: .venv/bin/python scripts/bench_decode.py --quick
"""


from __future__ import annotations

import argparse
import sys

from dreamr_jax.bench.decode import BENCH_MODEL, run


def parse_args(argv=None):
    m = BENCH_MODEL
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="new tokens per row (default 128; --quick: 8)")
    p.add_argument("--batch-sizes", default=None, help="comma separated (default 1,8; --quick: 1,2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per row (default 96; --quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (default 3; --quick: 1)")
    p.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {m['layers']}; --quick: 2)")
    p.add_argument("--hidden", type=int, default=m["hidden"])
    p.add_argument("--intermediate", type=int, default=m["intermediate"])
    p.add_argument("--heads", type=int, default=m["heads"])
    p.add_argument("--kv-heads", type=int, default=m["kv_heads"])
    p.add_argument("--head-dim", type=int, default=m["head_dim"])
    p.add_argument("--vocab", type=int, default=m["vocab"])
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied, like Qwen3-VL-2B/4B)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: os.cpu_count())")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="array size for the copy test (default 1024; --quick: 256)")
    p.add_argument("--cache-lens", default=None,
                   help="profile: also decode with these allocated cache lengths (default 1024,4096; --quick: 256)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-piece profile of one decode step")
    p.add_argument("--skip-torch", action="store_true", help="dreamr-jax only (no agreement check, no ratios)")
    p.add_argument("--quick", action="store_true", help="small numbers for a smoke run (about a minute)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                   help="before each timed sample, wait up to S seconds for other processes to leave the CPUs idle "
                        "(default 30; --quick: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    a = p.parse_args(argv)
    q = a.quick
    a.steps = a.steps or (8 if q else 128)
    a.batch_sizes = [int(x) for x in (a.batch_sizes or ("1,2" if q else "1,8")).split(",") if x.strip()]
    a.prompt_len = a.prompt_len or (16 if q else 96)
    a.repeats = a.repeats or (1 if q else 3)
    a.layers = a.layers or (2 if q else m["layers"])
    a.bandwidth_mib = a.bandwidth_mib or (256 if q else 1024)
    a.cache_lens = [int(x) for x in (a.cache_lens if a.cache_lens is not None else ("256" if q else "1024,4096"))
                    .split(",") if x.strip()]
    if a.wait_quiet is None:
        a.wait_quiet = 0.0 if q else 30.0
    if a.steps < 2:
        p.error("--steps must be >= 2 (transformers' decode time is t(N) - t(1))")
    return a


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

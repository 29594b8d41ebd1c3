"""The cost model against measured calls on this machine (issue 15, deliverable 2).

    python scripts/validate_costmodel.py [--hardware this-cpu.json] [--json PATH] [--repeats 5]

Without `--hardware` it calibrates first (`dreamr_jax.calibrate.measure`, about 20 s). Then it
measures, each the median of `--repeats` timed calls after a warm-up (no compilation timed):

- `scripts/bench_decode.py`'s 90M model (Qwen3-VL text, hidden 512, 4 layers, 8/4 heads,
  head_dim 64, intermediate 1536, the real 151,936-token vocabulary, tied; random weights,
  float32): prefill of 96 tokens, and a 128-token decode at batch 1 and 8 (per iteration);
- the shipped world pair in float32 on a test problem (`configs/synthetic.yaml`): each role's
  prefill (36 tokens, one 64x64 image), the target's packed check of 4 drafted steps (45 tokens)
  and each role decoding those 4 steps (33 tokens) in one call (the calls `dreamr` makes);

and prints each beside the cost model's prediction for the same call shape
(`costmodel.call_seconds`), with the ratio. The goal is every prediction within 25%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def median_time(fn, repeats: int) -> float:
    import jax
    import numpy as np

    from dreamr_jax import compiles

    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
    before = compiles.totals()[0]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    assert compiles.totals()[0] == before, "a timed call compiled"
    return float(np.median(times))


def bench_model_config() -> dict:
    """scripts/bench_decode.py's 90M model."""
    from dreamr_jax.assets import qwen3_vl_config

    ids = {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655,
           "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}
    return qwen3_vl_config(hidden_size=512, num_hidden_layers=4, intermediate_size=1536, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=64, vision_hidden_size=32, vision_depth=1, token_ids=ids)


def validated_specs() -> list:
    """The models whose calls are validated: the calibration measures their weight shapes."""
    from dreamr_jax import costmodel

    return [costmodel.spec_from_config(bench_model_config(), name="bench_decode 90M", bits=32),
            costmodel.model_spec("asset:target:fp32"), costmodel.model_spec("asset:draft:fp32")]


def bench_model_rows(hw, repeats: int) -> list[dict]:
    """The 90M model of scripts/bench_decode.py: prefill 96, decode 128 at batch 1 and 8."""
    import numpy as np
    from flax import nnx

    from dreamr_jax import costmodel
    from dreamr_jax.generation import Generator, prepare_batch
    from dreamr_jax.models.qwen_vl.config import QwenVLConfig
    from dreamr_jax.models.qwen_vl.model import QwenVLModel

    config = bench_model_config()
    model = QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(0))
    spec = costmodel.spec_from_config(config, name="bench_decode 90M", bits=32)
    gen = Generator(model)
    rng = np.random.default_rng(0)
    prompt_len, steps, rows = 96, 128, []
    for batch in (1, 8):
        prompts = [rng.integers(1000, 100000, prompt_len).tolist() for _ in range(batch)]
        prepared = prepare_batch(model, prompts)
        cache_len = 256
        logits, cache = gen.prefill(prepared, cache_len)
        if batch == 1:
            measured = median_time(lambda: gen.prefill(prepared, cache_len)[0], repeats)
            predicted = costmodel.call_seconds(spec, hw, 1, "prefill", tokens=prompt_len)
            rows.append({"model": spec.name, "call": "prefill 96 tokens", "measured_s": measured,
                         "predicted_s": predicted})

        def decode(cache=cache, logits=logits, batch=batch):
            return gen.decode(cache.fork(list(range(batch))), logits, max_new_tokens=steps, out_len=steps,
                              attend_len=256)[0]

        fork = median_time(lambda cache=cache, batch=batch: cache.fork(list(range(batch))).keys, repeats)
        measured = (median_time(decode, repeats) - fork) / steps
        predicted = costmodel.call_seconds(spec, hw, 1, "decode", tokens=steps * batch, rows=batch,
                                           cached=prompt_len) / steps
        rows.append({"model": spec.name, "call": f"decode at batch {batch}, per iteration", "measured_s": measured,
                     "predicted_s": predicted})
    return rows


def world_rows(hw, repeats: int, problem: int = 25) -> list[dict]:
    """The shipped pair's calls in `dreamr`: prefills, a packed check of 4 steps, 4-step decodes."""
    from dreamr_jax import costmodel
    from dreamr_jax.config import load_config
    from dreamr_jax.data import synthetic
    from dreamr_jax.speculative import SpeculativeReasoner

    cfg = load_config(os.path.join(ROOT, "configs", "synthetic.yaml"))
    reasoner = SpeculativeReasoner(draft=cfg.draft, target=cfg.target, config=cfg.spec, dtype="float32")
    engine, tok = reasoner.engine("dreamr"), reasoner.processor.tokenizer
    p = synthetic.make_problem(0, "test", problem)
    enc = reasoner.processor.encode(reasoner.prompt(p.question, 1), [p.image()])
    steps = [tok.encode(s + "\n\n") for s in p.steps]
    first, rest = steps[0], steps[1:5]
    rows = []
    for role, spec_name in ((reasoner.target, "asset:target:fp32"), (reasoner.draft, "asset:draft:fp32")):
        spec = costmodel.model_spec(spec_name)
        role.intervals.clear()
        ctx = role.open(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], capacity=256)
        shape = role.intervals[-1]

        def prefill(role=role):  # the prefill's own interval, as the role records it for traces
            role.intervals.clear()
            role.open(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], capacity=256)
            return role.intervals[-1].end - role.intervals[-1].start

        measured = _median_of(prefill, repeats)
        rows.append({"model": spec_name, "call": f"prefill {shape.tokens} tokens, {shape.patches} patches",
                     "measured_s": measured,
                     "predicted_s": costmodel.call_seconds(spec, hw, 1, "prefill", tokens=shape.tokens,
                                                           patches=shape.patches)})
        params = engine.target_params if role is reasoner.target else engine.draft_params

        def write(role=role, ctx=ctx, params=params):
            role.set_tokens(ctx, first)
            role.feed(ctx)
            return role.write(ctx, max_tokens=cfg.spec.solo_tokens_per_call, stop_ids=engine.delimiter_ids,
                              end_ids=engine.eos_ids, answer_ids=engine.answer_ids, max_steps=len(rest),
                              max_step_tokens=cfg.spec.steps.max_step_tokens, params=params)[0]

        # each write rolls back and feeds the first step again before it decodes: the decode call's
        # own interval (timed by the role) is what is compared
        _timed_decode(role, write)
        call = [i for i in role.intervals if i.op == "decode"][-1]
        measured = _median_of(lambda: _timed_decode(role, write), repeats)
        rows.append({"model": spec_name, "call": f"decode {call.tokens} tokens from {call.cached}",
                     "measured_s": measured,
                     "predicted_s": costmodel.call_seconds(spec, hw, 1, "decode", tokens=call.tokens,
                                                           cached=call.cached)})
        if role is reasoner.target:
            def check(ctx=ctx):
                role.set_tokens(ctx, first)
                role.feed(ctx)
                role.intervals.clear()
                engine.check_drafts(ctx, rest)
                return role.intervals[-1].end - role.intervals[-1].start

            check()
            shape = role.intervals[-1]
            measured = _median_of(check, repeats)
            rows.append({"model": spec_name, "call": f"packed check of 4 steps ({shape.tokens} tokens from "
                                                     f"{shape.cached})", "measured_s": measured,
                         "predicted_s": costmodel.call_seconds(spec, hw, 1, "extend", tokens=shape.tokens,
                                                               cached=shape.cached)})
    return rows


def _timed_decode(role, write) -> float:
    role.intervals.clear()
    write()
    call = [i for i in role.intervals if i.op == "decode"][-1]
    return call.end - call.start


def _median_of(fn, repeats: int) -> float:
    import numpy as np

    fn()
    return float(np.median([fn() for _ in range(repeats)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default=None, help="a calibrated JSON preset (default: calibrate now)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax import costmodel
    from dreamr_jax.calibrate import measure

    hw = costmodel.hardware(args.hardware) if args.hardware else measure(models=validated_specs())
    # the world pair first: measured after the 90M model, its decode ran up to 1.6x slower
    world = world_rows(hw, args.repeats)
    rows = bench_model_rows(hw, args.repeats) + world
    print(f"hardware: {hw.name}: {hw.notes}")
    print(f"{'model':20s} {'call':44s} {'measured':>10s} {'predicted':>10s} {'ratio':>6s}")
    for r in rows:
        r["ratio"] = r["predicted_s"] / r["measured_s"]
        print(f"{r['model']:20s} {r['call']:44s} {r['measured_s'] * 1e3:8.3f}ms {r['predicted_s'] * 1e3:8.3f}ms "
              f"{r['ratio']:6.2f}")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst error {worst:.0%} (goal: 25%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hw.to_dict(), "calls": rows, "worst_error": worst}, f, indent=2)


if __name__ == "__main__":
    main()

"""The cost model against this machine: FPSR's checks priced against the decoding they replace
(`check_cost`, `scripts/check_cost.py`), and the cost model's predictions against measured calls
(`validate`, `scripts/validate_costmodel.py`)."""

from __future__ import annotations

import numpy as np

from .decode import bench_model_config
from .timing import median_of, time_calls


def _timed(fn, repeats: int) -> dict:
    """Mean and median ms of `repeats` calls after two warm-up calls, and the compilations in them."""
    t = time_calls(fn, repeats, warmup=2)
    return {"mean_ms": round(1000 * t.mean, 3), "median_ms": round(1000 * t.median, 3), "compiles": t.compiles}


def check_cost(config: str, problem: int = 1, repeats: int = 30) -> dict:
    """On the pair of `config` (a pair YAML), for test `problem`'s reference steps: FPSR's packed check
    of k = 1, 2, 4 drafted steps (`check_k`, per drafted token too), each role writing the same steps
    in one decode call as it does alone (`target_decode`, `draft_decode`, per token too), the target
    writing them one call per step, and `check_over_decode_per_token`: what the checks cost in
    place of the target's own decoding. Times: `_timed` (compilations in the timed calls counted)."""
    from ..config import load_config
    from ..data import synthetic
    from ..speculative import SpeculativeReasoner

    cfg = load_config(config)
    reasoner = SpeculativeReasoner(draft=cfg.draft, target=cfg.target, config=cfg.spec, dtype=cfg.dtype)
    engine, tok = reasoner.engine("dreamr"), reasoner.processor.tokenizer
    target, draft = reasoner.target, reasoner.draft
    p = synthetic.make_problem(0, "test", problem)
    prompt = reasoner.processor.encode(reasoner.prompt(p.question, 1), [p.image()])
    steps = [tok.encode(s + "\n\n") for s in p.steps]
    first, rest = steps[0], steps[1:5]
    ctxs = {role.name: role.open(prompt["input_ids"], prompt["pixel_values"], prompt["image_grid_thw"], capacity=256)
            for role in (target, draft)}

    result = {"judge_format": cfg.spec.judge_format, "judge_suffix_tokens": len(engine.judge_ids),
              "step_tokens": [len(s) for s in rest]}
    for k in (1, 2, 4):
        drafts = rest[:k]
        n = sum(map(len, drafts))

        def check(drafts=drafts):
            target.set_tokens(ctxs["target"], first)
            engine.check_drafts(ctxs["target"], drafts)

        row = _timed(check, repeats)
        row.update(drafted_tokens=n, per_drafted_token_ms=round(row["median_ms"] / n, 4))
        result[f"check_{k}"] = row
    for role, params in ((target, engine.target_params), (draft, engine.draft_params)):
        written = []

        def write(role=role, params=params, written=written):
            ctx = ctxs[role.name]
            role.set_tokens(ctx, first)
            written.clear()
            # as the role alone reasons (`run_single`): the steps in one call
            written.extend(role.write(ctx, max_tokens=cfg.spec.solo_tokens_per_call, stop_ids=engine.delimiter_ids,
                                      end_ids=engine.eos_ids, answer_ids=engine.answer_ids, max_steps=len(rest),
                                      max_step_tokens=cfg.spec.steps.max_step_tokens, params=params)[0])

        row = _timed(write, repeats)
        row.update(tokens=len(written), per_token_ms=round(row["median_ms"] / len(written), 4))
        result[f"{role.name}_decode"] = row

    def write_per_step():
        ctx = ctxs["target"]
        target.set_tokens(ctx, first)
        written = []
        for _ in rest:  # the baseline before issue 13: one decode call per step
            written.extend(target.write(ctx, max_tokens=cfg.spec.steps.max_step_tokens, stop_ids=engine.stop_ids,
                                        params=engine.target_params)[0])
        return written

    row = _timed(write_per_step, repeats)
    n = len(write_per_step())
    row.update(tokens=n, per_token_ms=round(row["median_ms"] / n, 4))
    result["target_decode_one_call_per_step"] = row
    decode = result["target_decode"]["per_token_ms"]
    result["check_over_decode_per_token"] = {k: round(result[f"check_{k}"]["per_drafted_token_ms"] / decode, 3)
                                             for k in (1, 2, 4)}
    return result


def validated_specs() -> list:
    """The models whose calls are validated: the calibration measures their weight shapes."""
    from .. import costmodel

    return [costmodel.spec_from_config(bench_model_config(), name="bench_decode 90M", bits=32),
            costmodel.model_spec("asset:target:fp32"), costmodel.model_spec("asset:draft:fp32")]


def bench_model_rows(hw, repeats: int) -> list[dict]:
    """The 90M model of scripts/bench_decode.py (`decode.bench_model_config`): prefill 96, decode 128
    at batch 1 and 8, each beside its prediction."""
    from flax import nnx

    from .. import costmodel
    from ..generation import Generator, prepare_batch
    from ..models.qwen_vl.config import QwenVLConfig
    from ..models.qwen_vl.model import QwenVLModel

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
            measured = median_of(lambda: gen.prefill(prepared, cache_len)[0], repeats)
            predicted = costmodel.call_seconds(spec, hw, 1, "prefill", tokens=prompt_len)
            rows.append({"model": spec.name, "call": "prefill 96 tokens", "measured_s": measured,
                         "predicted_s": predicted})

        def decode(cache=cache, logits=logits, batch=batch):
            return gen.decode(cache.fork(list(range(batch))), logits, max_new_tokens=steps, out_len=steps,
                              attend_len=256)[0]

        fork = median_of(lambda cache=cache, batch=batch: cache.fork(list(range(batch))).keys, repeats)
        measured = (median_of(decode, repeats) - fork) / steps
        predicted = costmodel.call_seconds(spec, hw, 1, "decode", tokens=steps * batch, rows=batch,
                                           cached=prompt_len) / steps
        rows.append({"model": spec.name, "call": f"decode at batch {batch}, per iteration", "measured_s": measured,
                     "predicted_s": predicted})
    return rows


def world_rows(hw, repeats: int, problem: int = 25) -> list[dict]:
    """The shipped pair's calls in `dreamr`: prefills, a packed check of 4 steps, 4-step decodes."""
    from .. import costmodel
    from ..config import load_config
    from ..data import synthetic
    from ..demo import DEFAULT_CONFIG
    from ..speculative import SpeculativeReasoner

    cfg = load_config(DEFAULT_CONFIG)
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

        measured = _median_returned(prefill, repeats)
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
        measured = _median_returned(lambda: _timed_decode(role, write), repeats)
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
            measured = _median_returned(check, repeats)
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


def _median_returned(fn, repeats: int) -> float:
    """The median of what `fn` returns (seconds the roles timed themselves) over `repeats` calls
    after a warm-up."""
    fn()
    return float(np.median([fn() for _ in range(repeats)]))


def validate(hw, repeats: int) -> list[dict]:
    """Every validated call's measured and predicted seconds (rows with "model", "call",
    "measured_s", "predicted_s", "ratio")."""
    # the world pair first: measured after the 90M model, its decode ran up to 1.6x slower
    world = world_rows(hw, repeats)
    rows = bench_model_rows(hw, repeats) + world
    for r in rows:
        r["ratio"] = r["predicted_s"] / r["measured_s"]
    return rows

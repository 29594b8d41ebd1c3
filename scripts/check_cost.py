"""What a CPN check costs against the decoding it replaces, on the shipped world pair.

    python scripts/check_cost.py [--repeats 30] [--json PATH]

Times (mean and median over `--repeats`, after two warm-up calls, with no compilation in the
timed calls: the script counts them) on the target of configs/synthetic.yaml:
- `check_k`: FPSR's packed check of k = 1, 2, 4 consecutive drafted steps of a test problem
  (`StepEngine.check_drafts`: one forward over the cached prefix, each step followed by the
  configured judging suffix), per drafted token;
- `decode`: the target writing the same steps itself in one decode call, as `target` alone
  does (`Role.write` with several steps per call), per token;
- the draft writing them;
- the target writing them with one decode call per step (the `target` baseline before
  issue 13), for comparison.
The ratio `check per drafted token / target decode per token` is what FPSR's checks cost in
place of the target's own decoding. Both roles sit on one device here (one is idle while the
other is timed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timed(fn, repeats: int) -> dict:
    import numpy as np

    from dreamr_jax import compiles

    fn(), fn()
    before = compiles.totals()[0]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"mean_ms": round(1000 * float(np.mean(times)), 3), "median_ms": round(1000 * float(np.median(times)), 3),
            "compiles": compiles.totals()[0] - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic.yaml"))
    parser.add_argument("--problem", type=int, default=1, help="test problem index (its reference steps are checked)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax.config import load_config
    from dreamr_jax.data import synthetic
    from dreamr_jax.speculative import SpeculativeReasoner

    cfg = load_config(args.config)
    reasoner = SpeculativeReasoner(draft=cfg.draft, target=cfg.target, config=cfg.spec, dtype=cfg.dtype)
    engine, tok = reasoner.engine("dreamr"), reasoner.processor.tokenizer
    target, draft = reasoner.target, reasoner.draft
    p = synthetic.make_problem(0, "test", args.problem)
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

        row = timed(check, args.repeats)
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

        row = timed(write, args.repeats)
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

    row = timed(write_per_step, args.repeats)
    n = len(write_per_step())
    row.update(tokens=n, per_token_ms=round(row["median_ms"] / n, 4))
    result["target_decode_one_call_per_step"] = row
    decode = result["target_decode"]["per_token_ms"]
    result["check_over_decode_per_token"] = {k: round(result[f"check_{k}"]["per_drafted_token_ms"] / decode, 3)
                                             for k in (1, 2, 4)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

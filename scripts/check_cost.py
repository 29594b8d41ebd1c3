"""What one CPN check costs against writing the step, on the shipped world pair.

    python scripts/check_cost.py [--json PATH]

Times (mean of 20 after a warm-up) the target's CPN check of one step (`cpn_scores`: the step
plus the judging suffix, 1 / 2 / 4 rows in one forward), the target decoding that step, and
the draft decoding it. `dreamr` can only beat the target alone where a check costs much less
than the decode it replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def mean_ms(fn, repeats: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return round((time.perf_counter() - t) / repeats * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax.config import load_config
    from dreamr_jax.data import synthetic
    from dreamr_jax.spec import SpeculativeReasoner

    spec = load_config(os.path.join(ROOT, "configs", "synthetic.yaml")).spec
    reasoner = SpeculativeReasoner(draft="asset:draft", target="asset:target", config=spec)
    engine, tok = reasoner.engine("dreamr"), reasoner.processor.tokenizer
    p = synthetic.make_problem(0, "test", 1)
    prompt = reasoner.processor.encode(reasoner.prompt(p.question, 1), [p.image()])
    opened = {role.name: role.open(prompt["input_ids"], prompt["pixel_values"], prompt["image_grid_thw"], capacity=256)
              for role in (reasoner.target, reasoner.draft)}
    step = tok.encode(p.steps[0] + "\n\n")

    def write(role, params):
        return role.write(role.fork(opened[role.name]), max_tokens=len(step), stop_ids=engine.stop_ids,
                          params=params, kind="decode")

    result = {"step_tokens": len(step), "judge_suffix_tokens": len(engine.judge_ids)}
    for rows in (1, 2, 4):
        result[f"check_{rows}_rows_ms"] = mean_ms(lambda: engine.cpn_scores(opened["target"], [step] * rows))
    result["target_decode_step_ms"] = mean_ms(lambda: write(reasoner.target, engine.target_params))
    result["draft_decode_step_ms"] = mean_ms(lambda: write(reasoner.draft, engine.draft_params))
    result["check_over_target_decode"] = round(result["check_1_rows_ms"] / result["target_decode_step_ms"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

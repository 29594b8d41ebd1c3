"""How far is an int4 checkpoint from its dense original? Logits on the embedded world's prompts.

    python scripts/compare_int4.py DENSE INT4 [INT4 ...] [--count 32] [--json PATH]

For `--count` validation problems of the embedded world (question, image and the reference
solution, teacher-forced; problems the calibration texts of `scripts/quantize.py --calib world`
never saw), every checkpoint's logits are compared with the dense one's at the solution's
positions: mean and max |difference|, and how often the argmax token agrees. For a world
checkpoint (`asset:target`); a Qwen-VL checkpoint with the same tokenizer works too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def solution_logits(model, processor, problems) -> list[np.ndarray]:
    """Per problem, float32 logits (solution tokens, vocab) of the prompt + reference solution."""
    import jax.numpy as jnp

    import dreamr_jax as dr
    from dreamr_jax.config import load_config
    from dreamr_jax.speculative import SpeculativeReasoner

    spec = load_config(os.path.join(ROOT, "configs", "synthetic.yaml")).spec
    reasoner = SpeculativeReasoner(draft=model, target=model, processor=processor, config=spec)
    out = []
    for p in problems:
        prompt = processor.encode(reasoner.prompt(p.question, 1), [p.image()])
        solution = processor.tokenizer.encode("".join(s + "\n\n" for s in p.steps))
        ids = np.asarray([list(prompt["input_ids"]) + solution])
        logits = dr.forward(model, jnp.asarray(ids), pixel_values=prompt["pixel_values"],
                            image_grid_thw=prompt["image_grid_thw"])
        out.append(np.asarray(logits[0, -len(solution) - 1:-1], np.float32))
    return out


def main() -> None:
    import dreamr_jax as dr
    from dreamr_jax.data import synthetic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense")
    parser.add_argument("int4", nargs="+")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    problems = list(synthetic.problems(0, "val", args.count))
    processor = dr.load_processor(args.dense)
    want = solution_logits(dr.load_model(args.dense), processor, problems)
    rows = []
    for folder in args.int4:
        got = solution_logits(dr.load_model(folder), processor, problems)
        diff = np.concatenate([np.abs(g - w).ravel() for g, w in zip(got, want)])
        agree = np.mean(np.concatenate([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)]))
        rows.append({"checkpoint": folder, "mean_abs_logit_error": float(diff.mean()),
                     "max_abs_logit_error": float(diff.max()), "argmax_agreement": float(agree)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

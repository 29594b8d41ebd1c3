"""Is a world model a competent target? Solving, reading and judging, measured separately.

    python scripts/assess_target.py FOLDER [FOLDER ...] [--count 100] [--json PATH]

For each HF checkpoint folder (an SFT export or a shipped asset):
- `solve`: greedy target-alone accuracy on `--count` validation problems (configs/synthetic.yaml);
- `read` / `result`: teacher-forced accuracy of every digit read from the image and of the first
  digit of each arithmetic result (scripts/probe_reading.py; chance for a read is about 10%);
- `judge`: how often the CPN verdict (rho >= alpha) agrees with the label of `--count`
  validation judging examples, with the mean rho of correct and of wrong steps beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def judging_agreement(reasoner, count: int, alpha: float) -> dict:
    from dreamr_jax.data import synthetic

    engine = reasoner.engine("dreamr")
    tok = reasoner.processor.tokenizer
    rng = np.random.default_rng(1)
    rhos = {True: [], False: []}
    agree = 0
    by_mistake = {}  # mistake kind ("correct" for correct steps) -> [examples, verdicts that agree]
    for i in range(count):
        ex = synthetic.judging_example(synthetic.make_problem(0, "val", i), rng)
        prompt = reasoner.processor.encode(reasoner.prompt(ex.problem.question, 1), [ex.problem.image()])
        ctx = reasoner.target.open(prompt["input_ids"], prompt["pixel_values"], prompt["image_grid_thw"], capacity=256)
        reasoner.target.set_tokens(ctx, [t for s in ex.context_steps for t in tok.encode(s + "\n\n")])
        rho = float(engine.cpn_scores(ctx, [tok.encode(ex.candidate + "\n\n")])[0])
        rhos[bool(ex.label)].append(rho)
        agree += (rho >= alpha) == bool(ex.label)
        tally = by_mistake.setdefault(ex.mistake or "correct", [0, 0])
        tally[0] += 1
        tally[1] += (rho >= alpha) == bool(ex.label)
    return {"judge": round(agree / count, 4), "rho_correct": round(float(np.mean(rhos[True])), 4),
            "rho_wrong": round(float(np.mean(rhos[False])), 4),
            "judge_by_mistake": {k: round(a / n, 3) for k, (n, a) in sorted(by_mistake.items())}}


def assess(folder: str, count: int) -> dict:
    import dreamr_jax as dr
    from dreamr_jax.config import load_config
    from dreamr_jax.data import synthetic
    from dreamr_jax.data.grading import answers_match
    from dreamr_jax.speculative import SpeculativeReasoner
    from probe_reading import reading_accuracy

    spec = load_config(os.path.join(ROOT, "configs", "synthetic.yaml")).spec
    model = dr.load_model(folder)
    processor = dr.load_processor(folder)
    reasoner = SpeculativeReasoner(draft=model, target=model, processor=processor, config=spec)
    solved = sum(answers_match(reasoner.solve(p.question, p.image(), method="target").answer, p.answer)
                 for p in synthetic.problems(0, "val", count))
    return {"folder": folder, "solve": solved / count, **reading_accuracy(model, processor),
            **judging_agreement(reasoner, count, spec.alpha)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        try:
            rows.append(assess(folder, args.count))
        except Exception as e:  # one broken run must not lose the others' figures
            rows.append({"folder": folder, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""How right is the target's CPN judge on the steps a draft actually writes?

    python scripts/audit_judge.py [--draft asset:draft] [--target asset:target] [--count 64]
        [--group 8] [--temperature 1.0] [--split val] [--json PATH]

SAPO's R_draft trusts the frozen target's check. On the embedded world the truth of every step
is known (`synthetic.step_verdict`), so this samples `--group` rollouts per problem from the
draft (as SAPO does), scores every step with the target (`rl.rollouts.step_rhos`, the check
SAPO runs) and prints, per true verdict, how many steps the judge accepts (rho >= alpha). A
judge that accepts wrong steps is a reward SAPO can hack: the "slip" and "misread" rows are
the ones to watch.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def audit(draft: str, target: str, count: int, group: int, temperature: float, split: str, seed: int = 0,
          examples: int = 5) -> dict:
    import dreamr_jax as dr
    from dreamr_jax.config import load_config
    from dreamr_jax.data import synthetic
    from dreamr_jax.training.rollouts import sample_rollouts, step_rhos
    from dreamr_jax.speculative import SpeculativeReasoner

    spec = load_config(os.path.join(ROOT, "configs", "synthetic.yaml")).spec
    processor = dr.load_processor(target)
    reasoner = SpeculativeReasoner(draft=dr.load_model(draft), target=dr.load_model(target), processor=processor,
                                   config=spec)
    engine = reasoner.engine("dreamr")
    delimiters = processor.tokens_containing(spec.steps.delimiter)
    counts = collections.defaultdict(lambda: [0, 0])  # verdict -> [steps, accepted]
    wrong_accepted = []
    problems = list(synthetic.problems(0, split, count))
    for i in range(0, count, 8):
        batch = problems[i:i + 8]
        prompts = [processor.encode(reasoner.prompt(p.question, 1), [p.image()]) for p in batch]
        rollouts = sample_rollouts(reasoner.draft.model, processor, prompts, group, max_new_tokens=64,
                                   delimiter_ids=delimiters, temperature=temperature, seed=seed + i)
        for g, (problem, prompt) in enumerate(zip(batch, prompts)):
            mine = [r for r in rollouts if r.group == g]
            for rollout, rhos in zip(mine, step_rhos(engine, prompt, mine)):
                texts = [processor.decode(s) for s in rollout.steps]
                for k, rho in enumerate(rhos):
                    verdict = synthetic.step_verdict(problem, texts[: k + 1])
                    counts[verdict][0] += 1
                    counts[verdict][1] += rho >= spec.alpha
                    if verdict not in ("correct", "off_path") and rho >= spec.alpha and len(wrong_accepted) < examples:
                        wrong_accepted.append({"problem": problem.id, "expected": problem.steps[k],
                                               "written": texts[k].strip(), "rho": round(rho, 4)})
    rows = {v: {"steps": n, "accepted": a, "accept_rate": round(a / n, 4)} for v, (n, a) in sorted(counts.items())}
    on_path_wrong = [(n, a) for v, (n, a) in counts.items() if v not in ("correct", "off_path")]
    n_wrong, a_wrong = (sum(x) for x in zip(*on_path_wrong)) if on_path_wrong else (0, 0)
    return {"draft": draft, "target": target, "split": split, "problems": count, "group": group,
            "temperature": temperature, "by_verdict": rows,
            "false_accept_rate": round(a_wrong / max(n_wrong, 1), 4), "wrong_steps": n_wrong,
            "examples_wrongly_accepted": wrong_accepted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="asset:draft")
    parser.add_argument("--target", default="asset:target")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--split", default="val")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = audit(args.draft, args.target, args.count, args.group, args.temperature, args.split)
    print(f"{'true verdict':<14}{'steps':>7}{'accepted':>10}{'rate':>8}")
    for verdict, row in result["by_verdict"].items():
        print(f"{verdict:<14}{row['steps']:>7}{row['accepted']:>10}{row['accept_rate']:>8.3f}")
    print(f"false accepts of on-path wrong steps: {result['false_accept_rate']:.3f} of {result['wrong_steps']}")
    for ex in result["examples_wrongly_accepted"]:
        print(f"  {ex['problem']}: wrote {ex['written']!r}, expected {ex['expected']!r}, rho {ex['rho']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

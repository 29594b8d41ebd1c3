"""Measurements of the embedded world's models: how well a model reads the images, solves the
problems and judges steps, how right the target's judge is on what a draft really writes, and
how far an int4 checkpoint's logits are from its dense original's.

Each takes HF checkpoint folders (or "asset:target" / "asset:draft") and uses the world's
settings of `configs/synthetic.yaml`.
"""

from __future__ import annotations

import collections

import numpy as np


def _world_spec():
    """The speculative settings the world's models are run with (configs/synthetic.yaml)."""
    from ..config import load_config
    from ..demo import DEFAULT_CONFIG

    return load_config(DEFAULT_CONFIG).spec


def reading_accuracy(model, processor, count: int = 64) -> dict:
    """On `count` validation solutions, teacher-forced: the accuracy of every digit read from the
    image (the token after a colour word: "read") and of the first digit after each "=" (the
    arithmetic: "result"). Chance for a read is about 10%."""
    import jax
    import jax.numpy as jnp

    from ..data.pipeline import DataConfig, WorldEncoder, collate
    from ..data.synthetic import COLOUR_NAMES

    enc = WorldEncoder(processor, DataConfig(judging_fraction=0.0, seq_len=128, split="val"))
    tok = processor.tokenizer
    examples = [enc.example(i) for i in range(count)]
    b = collate({k: np.stack([e[k] for e in examples]) for k in examples[0]}, model.cfg)
    tokens, deepstack = model.encode_images(jax.tree.map(jnp.asarray, b["vision"]))
    logits = np.asarray(model.forward(jnp.asarray(b["input_ids"]), jnp.asarray(b["valid"]), jnp.asarray(b["positions"]),
                                      tokens, deepstack, jnp.asarray(b["image_gather"])))
    hits = {"read": [0, 0], "result": [0, 0]}
    for j, e in enumerate(examples):
        ids = e["input_ids"][: e["length"]]
        for t in range(1, len(ids)):
            if e["weights"][t] == 0:
                continue
            before = tok.decode(ids[t - 1:t]).strip()
            is_digit = tok.decode(ids[t:t + 1]).strip().isdigit()
            # a read digit follows its colour word ("red7"); a result's first digit follows "= "
            kind = ("read" if before in COLOUR_NAMES else
                    "result" if tok.decode(ids[max(0, t - 2):t]).strip() == "=" else None) if is_digit else None
            if kind:
                hits[kind][0] += int(logits[j, t - 1].argmax() == ids[t])
                hits[kind][1] += 1
    return {k: round(a / max(n, 1), 4) for k, (a, n) in hits.items()}


def judging_agreement(reasoner, count: int, alpha: float, redundant_share: float = 0.0) -> dict:
    """How often the target's CPN verdict (rho >= alpha) agrees with the label of `count`
    validation judging examples, overall and per kind of mistake, with the mean rho of correct
    and of wrong steps. `redundant_share`: of the wrong candidates, the share that are redundant
    steps (`synthetic.judging_example`; 0 keeps the examples of earlier assessments)."""
    from ..data import synthetic

    engine = reasoner.engine("dreamr")
    tok = reasoner.processor.tokenizer
    rng = np.random.default_rng(1)
    rhos = {True: [], False: []}
    agree = 0
    by_mistake = {}  # mistake kind ("correct" for correct steps) -> [examples, verdicts that agree]
    for i in range(count):
        ex = synthetic.judging_example(synthetic.make_problem(0, "val", i), rng, redundant_share=redundant_share)
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


def assess_target(folder: str, count: int, redundant_share: float = 0.0) -> dict:
    """Is a world model a competent target? Greedy target-alone accuracy on `count` validation
    problems ("solve"), `reading_accuracy` and `judging_agreement` (with `redundant_share` of the
    wrong candidates redundant steps), measured separately."""
    import dreamr_jax as dr

    from ..data import synthetic
    from ..data.grading import answers_match
    from ..speculative import SpeculativeReasoner

    spec = _world_spec()
    model = dr.load_model(folder)
    processor = dr.load_processor(folder)
    reasoner = SpeculativeReasoner(draft=model, target=model, processor=processor, config=spec)
    solved = sum(answers_match(reasoner.solve(p.question, p.image(), method="target").answer, p.answer)
                 for p in synthetic.problems(0, "val", count))
    return {"folder": folder, "solve": solved / count, **reading_accuracy(model, processor),
            **judging_agreement(reasoner, count, spec.alpha, redundant_share)}


def audit_judge(draft: str, target: str, count: int, group: int, temperature: float, split: str, seed: int = 0,
                examples: int = 5) -> dict:
    """The target's CPN judge on the steps a draft actually writes: `group` sampled rollouts per
    problem (as SAPO samples them), every step scored (`rollouts.step_rhos`, SAPO's check) and
    counted under its true verdict (`synthetic.step_verdict`) with how many the judge accepts
    (rho >= alpha); up to `examples` wrong steps it accepted, for reading."""
    import dreamr_jax as dr

    from ..data import synthetic
    from ..speculative import SpeculativeReasoner
    from ..training.rollouts import sample_rollouts, step_rhos

    spec = _world_spec()
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
                        expected = synthetic.expected_step(problem, texts[: k + 1])
                        wrong_accepted.append({"problem": problem.id, "expected": expected or "(after the answer)",
                                               "written": texts[k].strip(), "rho": round(rho, 4)})
    rows = {v: {"steps": n, "accepted": a, "accept_rate": round(a / n, 4)} for v, (n, a) in sorted(counts.items())}
    on_path_wrong = [(n, a) for v, (n, a) in counts.items() if v not in ("correct", "off_path")]
    n_wrong, a_wrong = (sum(x) for x in zip(*on_path_wrong)) if on_path_wrong else (0, 0)
    return {"draft": draft, "target": target, "split": split, "problems": count, "group": group,
            "temperature": temperature, "by_verdict": rows,
            "false_accept_rate": round(a_wrong / max(n_wrong, 1), 4), "wrong_steps": n_wrong,
            "examples_wrongly_accepted": wrong_accepted}


def solution_logits(model, processor, problems) -> list[np.ndarray]:
    """Per problem, float32 logits (solution tokens, vocab) of the prompt + reference solution."""
    import jax.numpy as jnp

    import dreamr_jax as dr

    from ..speculative import SpeculativeReasoner

    reasoner = SpeculativeReasoner(draft=model, target=model, processor=processor, config=_world_spec())
    out = []
    for p in problems:
        prompt = processor.encode(reasoner.prompt(p.question, 1), [p.image()])
        solution = processor.tokenizer.encode("".join(s + "\n\n" for s in p.steps))
        ids = np.asarray([list(prompt["input_ids"]) + solution])
        logits = dr.forward(model, jnp.asarray(ids), pixel_values=prompt["pixel_values"],
                            image_grid_thw=prompt["image_grid_thw"])
        out.append(np.asarray(logits[0, -len(solution) - 1:-1], np.float32))
    return out


def compare_checkpoints(dense: str, others, count: int):
    """For each checkpoint of `others` (yielded as it is done): its logits against the `dense`
    one's at the reference solutions of `count` validation problems, teacher-forced: mean and max
    |difference| and how often the argmax token agrees."""
    import dreamr_jax as dr

    from ..data import synthetic

    problems = list(synthetic.problems(0, "val", count))
    processor = dr.load_processor(dense)
    want = solution_logits(dr.load_model(dense), processor, problems)
    for folder in others:
        got = solution_logits(dr.load_model(folder), processor, problems)
        diff = np.concatenate([np.abs(g - w).ravel() for g, w in zip(got, want)])
        agree = np.mean(np.concatenate([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)]))
        yield {"checkpoint": folder, "mean_abs_logit_error": float(diff.mean()),
               "max_abs_logit_error": float(diff.max()), "argmax_agreement": float(agree)}


def redundant_steps(results: list[dict], method: str, ids=None, seed: int = 0) -> float:
    """Mean count of redundant steps (`synthetic.redundant_count`) in `method`'s committed traces,
    over its rows with status ok (and ids in `ids`, when given: the records every method solved,
    as `evaluate.summarise` counts tokens). The records are the world's (`synthetic-SPLIT-I`)."""
    from ..data import synthetic

    counts = []
    for r in results:
        if r["method"] != method or r["status"] != "ok" or (ids is not None and r["id"] not in ids):
            continue
        _, split, index = r["id"].rsplit("-", 2)
        problem = synthetic.make_problem(seed, split, int(index))
        # from the text: `target` / `draft` alone commit a whole decode call as one trace step
        texts = [t.strip() for t in r["trace"]["text"].split("\n\n") if t.strip()]
        counts.append(synthetic.redundant_count(problem, texts))
    return float(np.mean(counts)) if counts else float("nan")


def _claim(folder: str, identity: dict, fresh: bool) -> None:
    """Record in folder/checkpoints.json which checkpoints and problems its results are of; a
    folder holding results of others is refused (unless `fresh`: `run_eval` then sets them aside)."""
    import json
    import os

    path = os.path.join(folder, "checkpoints.json")
    if os.path.exists(path) and not fresh:
        with open(path) as f:
            held = json.load(f)
        if held != identity:
            raise ValueError(f"{folder} holds results of {held}, not of {identity}: pass --fresh (the old results are "
                             "kept under a timestamped name) or another --out")
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(identity, f, indent=2)
    os.replace(path + ".tmp", path)


def compare_drafts(drafts: dict, target: str, count: int, out_dir: str, split: str = "test",
                   fresh: bool = False) -> list[dict]:
    """Each named draft (name -> checkpoint) against one target, greedy, on `count` problems of
    `split`, in one process: `target`, `draft` alone and `dreamr` per draft (`evaluate.run_eval`
    into out_dir/NAME, resumed unless `fresh`; a NAME folder holding results of another checkpoint
    is refused, see `_claim`), so every `dreamr` speedup is over a `target` row
    measured minutes before it. One row per draft: accuracies, acceptance, trace lengths in
    tokens, redundant steps per solution and the speedups."""
    import os

    import dreamr_jax as dr

    from ..data import synthetic
    from ..evaluate import run_eval
    from ..speculative import SpeculativeReasoner
    from ..speculative.results import read_results

    spec = _world_spec()
    records = [p.record() for p in synthetic.problems(0, split, count)]
    for name, folder in drafts.items():  # before any model loads: results of other checkpoints are not resumed
        _claim(os.path.join(out_dir, name), {"draft": folder, "target": target, "split": split, "count": count}, fresh)
    target_model, processor = dr.load_model(target), dr.load_processor(target)
    rows = []
    for name, folder in drafts.items():
        reasoner = SpeculativeReasoner(target=target_model, draft=dr.load_model(folder), processor=processor,
                                       config=spec)
        where = os.path.join(out_dir, name)
        # warm-up on 16 records: the misaligned drafts' longer traces reach more length buckets
        by_method = {r["method"]: r for r in run_eval(reasoner, records, ["target", "draft", "dreamr"], where,
                                                      progress=False, fresh=fresh, warmup_records=16)}
        results = list(read_results(os.path.join(where, "results.jsonl"), warn=False).values())
        solved = set.intersection(*[{r["id"] for r in results if r["method"] == m and r["status"] == "ok"}
                                    for m in by_method])
        target_row, draft_row, dreamr_row = by_method["target"], by_method["draft"], by_method["dreamr"]
        rows.append({"draft": name, "checkpoint": folder, "problems": count,
                     "target_accuracy": target_row["accuracy"], "draft_accuracy": draft_row["accuracy"],
                     "dreamr_accuracy": dreamr_row["accuracy"], "acceptance": dreamr_row["acceptance"],
                     "draft_tokens": draft_row["mean_tokens"], "dreamr_tokens": dreamr_row["mean_tokens"],
                     "target_tokens": target_row["mean_tokens"],
                     "draft_redundant_steps": redundant_steps(results, "draft", solved),
                     "dreamr_redundant_steps": redundant_steps(results, "dreamr", solved),
                     "speedup": dreamr_row["speedup"], "median_speedup": dreamr_row["median_speedup"],
                     "projected_speedup": dreamr_row["projected_speedup"],
                     "compiles": sum(by_method[m]["compiles"] for m in by_method)})
    return rows

"""SAPO rollouts: grouping, cutting at the answer, log-probs against a teacher-forced forward,
and R_draft's batched CPN scores against the check run step by step."""

from __future__ import annotations

import os

import numpy as np

import dreamr_jax as dr
from dreamr_jax.data import synthetic
from dreamr_jax.training.rollouts import Rollout, cut_at_answer, sample_rollouts, split_steps, step_rhos

from helpers import REPO_ROOT


def test_split_and_cut():
    assert split_steps([1, 9, 2, 3, 9, 4], [9]) == [[1, 9], [2, 3, 9], [4]]
    decode = {1: "Row 1 is 3.\n\n", 2: "The answer is \\boxed{7}.\n\n", 3: "junk"}.get
    steps, answer = cut_at_answer([[1], [2], [3]], lambda ids: "".join(decode(i) for i in ids))
    assert steps == [[1], [2]] and answer == "7"


def test_rollouts_group_and_logprobs(tiny_world_pair):
    target_dir, draft_dir = tiny_world_pair
    draft = dr.load_model(draft_dir)
    proc = dr.load_processor(draft_dir)
    problems = list(synthetic.problems(0, "val", 2))
    prompts = [proc.encode(proc.user_prompt(p.question, 1), [p.image()]) for p in problems]
    delims = proc.tokens_containing("\n\n")
    rollouts = sample_rollouts(draft, proc, prompts, 3, max_new_tokens=12, delimiter_ids=delims, temperature=1.0,
                               seed=0)
    assert [r.group for r in rollouts] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(r.response) for r in rollouts}) > 1  # sampled, not all equal
    # The recorded log-probs are the draft's own: teacher-forced forward of prompt + response.
    r = rollouts[4]
    ids = np.array([r.prompt_ids + r.response])
    logits = np.asarray(dr.forward(draft, ids, None, prompts[1]["pixel_values"], prompts[1]["image_grid_thw"]),
                        np.float64)[0]
    n = len(r.prompt_ids)
    logp = (logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True))
    want = [logp[n - 1 + i, t] for i, t in enumerate(r.response)]
    np.testing.assert_allclose(r.logprobs, want, atol=2e-4)


def test_step_rhos_equal_the_check_run_step_by_step(tiny_world_pair):
    from dreamr_jax.config import load_config
    from dreamr_jax.speculative import SpeculativeReasoner

    target_dir, draft_dir = tiny_world_pair
    spec = load_config(os.path.join(REPO_ROOT, "configs", "synthetic.yaml")).spec
    reasoner = SpeculativeReasoner(draft=draft_dir, target=target_dir, config=spec)
    engine = reasoner.engine("dreamr")
    proc = reasoner.processor
    tok = proc.tokenizer
    p = synthetic.make_problem(0, "val", 3)
    prompt = proc.encode(reasoner.prompt(p.question, 1), [p.image()])
    good = [tok.encode(s + "\n\n") for s in p.steps]
    bad = [tok.encode(s + "\n\n") for s in (p.steps[0], synthetic.corrupt_step(p, 1, np.random.default_rng(0))[0])]
    rollouts = [Rollout(0, prompt["input_ids"], [t for s in st for t in s], [], st, None) for st in (good, bad)]
    rhos = step_rhos(engine, prompt, rollouts)
    assert [len(r) for r in rhos] == [len(good), 2]
    for rollout, got in zip(rollouts, rhos):
        for k, step in enumerate(rollout.steps):
            ctx = reasoner.target.open(prompt["input_ids"], prompt["pixel_values"], prompt["image_grid_thw"],
                                       capacity=64)
            reasoner.target.set_tokens(ctx, [t for s in rollout.steps[:k] for t in s])
            want = engine.cpn_scores(ctx, [step])[0]
            np.testing.assert_allclose(got[k], want, atol=1e-5)

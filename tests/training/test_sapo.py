"""SAPO's training path: response log-probs through the chunked head equal the inference
forward's, and one SAPO step (rollouts, rewards, advantages, GRPO update) runs end to end."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

import dreamr_jax as dr
from dreamr_jax.data import synthetic
from dreamr_jax.training.sapo import GRPOSettings, _logprobs, policy_batch, sapo_step
from dreamr_jax.training.rollouts import Rollout

from helpers import REPO_ROOT


def test_response_logprobs_match_the_inference_forward(tiny_world_pair):
    draft = dr.load_model(tiny_world_pair[1])
    proc = dr.load_processor(tiny_world_pair[1])
    problems = list(synthetic.problems(0, "val", 2))
    prompts = [proc.encode(proc.user_prompt(p.question, 1), [p.image()]) for p in problems]
    tok = proc.tokenizer
    rollouts = [Rollout(g, prompts[g]["input_ids"], tok.encode("".join(s + "\n\n" for s in problems[g].steps[:k])), [],
                        [], None) for g, k in ((0, 2), (1, 3), (1, 1))]
    batch = jax.tree.map(np.asarray, policy_batch(draft.cfg, rollouts, prompts, proc.pad_token_id))
    got = np.asarray(_logprobs(draft, jax.tree.map(jax.numpy.asarray, batch), 16))
    for b, r in enumerate(rollouts):
        ids = np.array([r.prompt_ids + r.response])
        logits = np.asarray(dr.forward(draft, ids, None, prompts[r.group]["pixel_values"],
                                       prompts[r.group]["image_grid_thw"]), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        n = len(r.prompt_ids)
        want = [logp[n - 1 + i, t] for i, t in enumerate(r.response)]
        mask = batch["response_mask"][b]
        assert mask.sum() == len(r.response) and np.all(np.nonzero(mask)[0]
                                                        == np.arange(n - 1, n - 1 + len(r.response)))
        np.testing.assert_allclose(got[b][mask > 0], want, atol=1e-4)


def test_one_sapo_step_updates_the_policy_only(tiny_world_pair):
    import optax

    from dreamr_jax.config import load_config
    from dreamr_jax.speculative import SpeculativeReasoner

    target_dir, draft_dir = tiny_world_pair
    spec = load_config(os.path.join(REPO_ROOT, "configs", "synthetic.yaml")).spec
    verifier = SpeculativeReasoner(target=target_dir, config=spec, method="target")
    engine = verifier.engine("target")
    policy, reference = dr.load_model(draft_dir), dr.load_model(draft_dir)
    optimizer = nnx.Optimizer(policy, optax.adamw(1e-3), wrt=nnx.Param)
    proc = verifier.processor
    problems = list(synthetic.problems(0, "train", 2))
    prompts = [proc.encode(verifier.prompt(p.question, 1), [p.image()]) for p in problems]
    before = jax.tree.map(np.asarray, nnx.state(policy, nnx.Param))
    metrics = sapo_step(policy, optimizer, reference, engine, proc, prompts, [p.answer for p in problems],
                        GRPOSettings(group_size=4, max_new_tokens=12, logprob_chunk=16), seed=0)
    for key in ("loss", "kl", "clip_fraction", "reward", "reward_outcome", "reward_draft", "reward_length",
                "acceptance_rate", "response_length", "rollout_tokens_per_s", "update_tokens_per_s"):
        assert np.isfinite(metrics[key]), key
    after = jax.tree.map(np.asarray, nnx.state(policy, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    ref = jax.tree.map(np.asarray, nnx.state(reference, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(ref)))

"""SAPO: GRPO training of the draft with the composite reward (SPEC.md section 5).

One training step:
1. G rollouts per prompt from the current draft (`rollouts.sample_rollouts`);
2. rewards: outcome (graders), draft (the frozen target's CPN check of every step, one
   batched forward per prompt), length; advantages within each group;
3. the old policy's and the frozen reference's log-probs of the responses, then
   `grpo_iterations` AdamW updates of `grpo_loss` (log-probs over the full vocabulary in
   sequence chunks, so the (B, T, V) logits never exist at once).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..generation import _image_indices, length_bucket
from .grpo import chunked_token_logprobs, group_advantages, grpo_loss
from .rewards import composite_reward, draft_reward, length_reward, outcome_reward
from .rollouts import Rollout, sample_rollouts, step_rhos


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    group_size: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    alpha: float = 0.7
    soft_draft_reward: bool = False
    l_ref: int = 1024
    reward_weights: tuple = (1.0, 1.0, 1.0)
    epsilon: float = 0.2
    beta: float = 0.01
    grpo_iterations: int = 1
    logprob_chunk: int = 128

    def __post_init__(self):
        if self.grpo_iterations < 1 or self.group_size < 2:
            raise ValueError(f"grpo_iterations must be >= 1 and group_size >= 2 (advantages need a group), "
                             f"got {self.grpo_iterations} and {self.group_size}")


# ---- log-probs of responses ------------------------------------------------------------------


def policy_batch(model_cfg, rollouts: Sequence[Rollout], images: Sequence[dict], pad_id: int) -> dict:
    """Host arrays for prompt + response rows (right padded to a length bucket): ids, mask,
    3-D positions, image gather, vision inputs and the response mask over next-token targets."""
    rows = [r.prompt_ids + r.response for r in rollouts]
    width = length_bucket(max(map(len, rows)))
    ids = np.full((len(rows), width), pad_id, np.int64)
    valid = np.zeros_like(ids, bool)
    response = np.zeros((len(rows), width - 1), np.float32)  # target t + 1 is a response token
    for b, (r, row) in enumerate(zip(rollouts, rows)):
        ids[b, : len(row)] = row
        valid[b, : len(row)] = True
        response[b, len(r.prompt_ids) - 1: len(row) - 1] = 1.0
    pix = [np.asarray(images[r.group]["pixel_values"]) for r in rollouts if images[r.group].get("pixel_values") is not None]
    grids = [np.asarray(images[r.group]["image_grid_thw"]).reshape(-1, 3) for r in rollouts
             if images[r.group].get("pixel_values") is not None]
    positions, _, gather, vision = _image_indices(model_cfg, ids, valid, np.concatenate(pix) if pix else None,
                                                  np.concatenate(grids) if grids else None)
    return {"input_ids": ids.astype(np.int32), "valid": valid, "positions": positions.astype(np.int32),
            "image_gather": gather.astype(np.int32), "vision": vision, "response_mask": response}


def sequence_logprobs(model, batch: dict, chunk: int = 128):
    """log p(token t + 1 | tokens <= t) for every position of each row, (B, S - 1), in float32."""
    ids = batch["input_ids"]
    s = ids.shape[1]
    tokens, deepstack = (None, None) if batch.get("vision") is None else model.encode_images(batch["vision"])
    mask = jnp.tril(jnp.ones((s, s), bool))[None] & batch["valid"][:, None, :]
    x = model.embed(ids, tokens, batch["image_gather"])
    hidden, _ = model.decode_hidden(x, batch["positions"], mask, None, None, deepstack, batch["image_gather"])
    head = model.embed_tokens[...].T if model.lm_head is None else model.lm_head.kernel[...]
    return chunked_token_logprobs(hidden[:, :-1], head, ids[:, 1:], chunk)


@nnx.jit(static_argnames=("chunk",))
def _logprobs(model, batch, chunk: int):
    return sequence_logprobs(model, batch, chunk)


@nnx.jit(static_argnames=("chunk", "epsilon", "beta"))
def grpo_update(model, optimizer, batch, old_logp, ref_logp, advantages, chunk: int, epsilon: float, beta: float):
    def loss_fn(m):
        logp = sequence_logprobs(m, batch, chunk)
        return grpo_loss(logp, old_logp, ref_logp, advantages, batch["response_mask"], epsilon, beta)

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return dict(metrics, grad_norm=optax.tree.norm(grads))


# ---- one step -------------------------------------------------------------------------------


def sapo_step(policy, optimizer, reference, engine, processor, prompts: Sequence[dict], references: Sequence[str],
              settings: GRPOSettings, seed: int) -> dict:
    """Rollouts, rewards, advantages and `grpo_iterations` updates of `policy`; returns metrics.

    prompts: `Processor.encode` outputs (input_ids, pixel_values, image_grid_thw); references:
    the reference answers; engine: a `StepEngine` whose target is the frozen verifier."""
    import time

    t0 = time.perf_counter()
    delimiters = processor.tokens_containing(engine.config.steps.delimiter)
    rollouts = sample_rollouts(policy, processor, prompts, settings.group_size, max_new_tokens=settings.max_new_tokens,
                               delimiter_ids=delimiters, temperature=settings.temperature, top_p=settings.top_p,
                               seed=seed)
    t_rollout = time.perf_counter() - t0
    rhos: list[list[float]] = []
    for g, prompt in enumerate(prompts):
        rhos += step_rhos(engine, prompt, [r for r in rollouts if r.group == g])
    r_outcome = outcome_reward([r.answer for r in rollouts], [references[r.group] for r in rollouts])
    r_draft = draft_reward(rhos, settings.alpha, soft=settings.soft_draft_reward)
    r_length = length_reward([len(r.response) for r in rollouts], settings.l_ref)
    rewards = composite_reward(r_outcome, r_draft, r_length, settings.reward_weights)
    advantages = group_advantages(rewards, settings.group_size)

    batch = jax.tree.map(jnp.asarray, policy_batch(policy.cfg, rollouts, prompts, processor.pad_token_id))
    old_logp = _logprobs(policy, batch, settings.logprob_chunk)
    ref_logp = _logprobs(reference, batch, settings.logprob_chunk)
    t1 = time.perf_counter()
    for _ in range(settings.grpo_iterations):
        metrics = grpo_update(policy, optimizer, batch, old_logp, ref_logp, advantages, settings.logprob_chunk,
                              settings.epsilon, settings.beta)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    t_update = time.perf_counter() - t1
    n_response = int(sum(len(r.response) for r in rollouts))
    checked = sum(len(r) for r in rhos)
    accepted = sum(sum(float(x) >= settings.alpha for x in r) for r in rhos)
    return dict(metrics, reward=float(rewards.mean()), reward_outcome=float(r_outcome.mean()),
                reward_draft=float(r_draft.mean()), reward_length=float(r_length.mean()),
                acceptance_rate=accepted / max(checked, 1), response_length=n_response / len(rollouts),
                rollout_tokens_per_s=n_response / max(t_rollout, 1e-9),
                update_tokens_per_s=settings.grpo_iterations * n_response / max(t_update, 1e-9))

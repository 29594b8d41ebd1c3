"""SAPO: GRPO training of the draft with the composite reward; this is its step, the run around
it is `sapo_trainer` (on the training scaffold).

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

from ..generation import image_indices, length_bucket
from ..validation import SettingError, check_choice, check_flag, check_range
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
    # Forward passes (rollouts, log-probs, loss) run in this dtype over the policy's master
    # weights (kept in their own dtype, float32 for bf16 training); None: the weights' dtype.
    compute_dtype: str | None = None
    check_rows: int = 32  # rows per batched CPN check of R_draft (padded to powers of two)
    rollout_prompts: int = 0  # prompts per generation call (0: all at once); calls spread over devices

    def __post_init__(self):
        check_range("group_size", self.group_size, 2, integer=True)  # advantages need a group
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_range("temperature", self.temperature, 0)
        check_range("top_p", self.top_p, high=1, above=0)
        check_range("alpha", self.alpha, 0, 1)
        check_flag("soft_draft_reward", self.soft_draft_reward)
        check_range("l_ref", self.l_ref, 1, integer=True)
        weights = self.reward_weights
        if not isinstance(weights, (tuple, list)) or len(weights) != 3:
            raise SettingError("reward_weights", "must be three numbers (w1, w2, w3)", weights)
        for w in weights:
            check_range("reward_weights", w)
        check_range("epsilon", self.epsilon, above=0)
        check_range("beta", self.beta, 0)
        check_range("grpo_iterations", self.grpo_iterations, 1, integer=True)
        check_range("logprob_chunk", self.logprob_chunk, 1, integer=True)
        if self.compute_dtype is not None:
            check_choice("compute_dtype", self.compute_dtype, ("float32", "bfloat16", "float16"))
        check_range("check_rows", self.check_rows, 1, integer=True)
        check_range("rollout_prompts", self.rollout_prompts, 0, integer=True)


# ---- log-probs of responses ------------------------------------------------------------------


def policy_batch(model_cfg, rollouts: Sequence[Rollout], images: Sequence[dict], pad_id: int, *,
                 width: int | None = None, num_patches: int | None = None) -> dict:
    """Host arrays for prompt + response rows (right padded to a length bucket): ids, mask,
    3-D positions, image gather, vision inputs and the response mask over next-token targets.

    `width` / `num_patches` fix the padded row length and patch count (data-parallel hosts
    must agree on shapes); by default the buckets of this batch."""
    from ..models.qwen_vl.rope_index import prepare_vision_inputs

    rows = [r.prompt_ids + r.response for r in rollouts]
    longest = max(map(len, rows))
    width = width or length_bucket(longest)
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest row ({longest} tokens)")
    ids = np.full((len(rows), width), pad_id, np.int64)
    valid = np.zeros_like(ids, bool)
    response = np.zeros((len(rows), width - 1), np.float32)  # target t + 1 is a response token
    for b, (r, row) in enumerate(zip(rollouts, rows)):
        ids[b, : len(row)] = row
        valid[b, : len(row)] = True
        response[b, len(r.prompt_ids) - 1: len(row) - 1] = 1.0
    with_image = [r for r in rollouts if images[r.group].get("pixel_values") is not None]
    pix = [np.asarray(images[r.group]["pixel_values"]) for r in with_image]
    grids = [np.asarray(images[r.group]["image_grid_thw"]).reshape(-1, 3) for r in with_image]
    pix = np.concatenate(pix) if pix else None
    grids = np.concatenate(grids) if grids else None
    # A sampled image-placeholder token in a response is text (generation embedded and placed
    # it as text): only the prompts' placeholders take image features and image positions.
    index_ids = ids.copy()
    in_response = np.zeros_like(valid)
    in_response[:, 1:] = response > 0
    index_ids[in_response & (ids == model_cfg.image_token_id)] = pad_id
    positions, _, gather, vision = image_indices(model_cfg, index_ids, valid, pix, grids)
    if num_patches:
        if pix is None:  # this host has no image but others do: an all-padding vision batch
            pix, grids = np.zeros((0, model_cfg.vision.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        vin = prepare_vision_inputs(pix, grids, model_cfg, num_patches)
        vision = {k: v for k, v in dataclasses.asdict(vin).items() if k != "num_valid_tokens"}
    return {"input_ids": ids.astype(np.int32), "valid": valid, "positions": positions.astype(np.int32),
            "image_gather": gather.astype(np.int32), "vision": vision, "response_mask": response}


def in_dtype(model, dtype: str | None):
    """`model` with its floating-point weights cast to `dtype` (differentiable: gradients reach
    the original weights); the model itself when dtype is None or already the weights'."""
    if dtype is None:
        return model
    target = jnp.dtype(dtype)
    graphdef, state = nnx.split(model)
    cast = jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, cast)


def sequence_logprobs(model, batch: dict, chunk: int = 128):
    """log p(token t + 1 | tokens <= t) for every position of each row, (B, S - 1), in float32."""
    ids = batch["input_ids"]
    s = ids.shape[1]
    tokens, deepstack = (None, None) if batch.get("vision") is None else model.encode_images(batch["vision"])
    mask = jnp.tril(jnp.ones((s, s), bool))[None] & batch["valid"][:, None, :]
    x = model.embed(ids, tokens, batch["image_gather"])
    hidden, _ = model.decode_hidden(x, batch["positions"], mask, None, None, deepstack, batch["image_gather"])
    head = (model.embed_tokens if model.lm_head is None else model.lm_head.weight)[...].T  # (E, V)
    return chunked_token_logprobs(hidden[:, :-1], head, ids[:, 1:], chunk)


@nnx.jit(static_argnames=("chunk", "compute_dtype"))
def _logprobs(model, batch, chunk: int, compute_dtype: str | None = None):
    return sequence_logprobs(in_dtype(model, compute_dtype), batch, chunk)


@nnx.jit(static_argnames=("chunk", "epsilon", "beta", "compute_dtype"))
def grpo_update(model, optimizer, batch, old_logp, ref_logp, advantages, chunk: int, epsilon: float, beta: float,
                compute_dtype: str | None = None):
    def loss_fn(m):
        logp = sequence_logprobs(in_dtype(m, compute_dtype), batch, chunk)
        return grpo_loss(logp, old_logp, ref_logp, advantages, batch["response_mask"], epsilon, beta)

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return dict(metrics, grad_norm=optax.tree.norm(grads))


@nnx.jit(static_argnames=("chunk", "epsilon", "beta", "compute_dtype"))
def grpo_grads(model, batch, old_logp, ref_logp, advantages, total_tokens, chunk: int, epsilon: float, beta: float,
               compute_dtype: str | None = None):
    """Gradient of one micro-batch's share of the whole batch's token-mean loss: its own token
    mean times its share of the valid tokens, so the micro-batches' gradients add up to the
    full batch's. Returns (grads, metrics, share)."""
    share = jnp.sum(batch["response_mask"]) / total_tokens

    def loss_fn(m):
        logp = sequence_logprobs(in_dtype(m, compute_dtype), batch, chunk)
        loss, metrics = grpo_loss(logp, old_logp, ref_logp, advantages, batch["response_mask"], epsilon, beta)
        return loss * share, metrics

    (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return grads, metrics, share


@jax.jit
def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


@nnx.jit
def apply_grads(model, optimizer, grads):
    optimizer.update(model, grads)
    return optax.tree.norm(grads)


def _combine(parts, advantages) -> dict:
    """Whole-batch metrics from micro-batch (metrics, token share) pairs."""
    out = {k: sum(m[k] * w for m, w in parts) for k in ("loss", "policy_loss", "kl", "clip_fraction")}
    out["ratio_min"] = jnp.min(jnp.stack([m["ratio_min"] for m, _ in parts]))
    out["ratio_max"] = jnp.max(jnp.stack([m["ratio_max"] for m, _ in parts]))
    out.update(advantage_mean=jnp.mean(advantages), advantage_std=jnp.std(advantages),
               advantage_min=jnp.min(advantages), advantage_max=jnp.max(advantages))
    return out


# ---- one step -------------------------------------------------------------------------------


@dataclasses.dataclass
class Collected:
    """One batch of rollouts with their rewards (host values, this process's prompts only)."""

    rollouts: list[Rollout]
    rhos: list[list[float]]
    terms: dict  # reward term name -> (N,) float32, including the weighted total "reward"
    advantages: np.ndarray  # (N,)
    rollout_seconds: float
    check_seconds: float

    def sums(self, alpha: float) -> dict:
        """Additive statistics (summed over processes, then turned into means by `means`)."""
        out = {f"{k}_sum": float(np.sum(v)) for k, v in self.terms.items()}
        out.update(rollouts=len(self.rollouts), response_tokens=int(sum(len(r.response) for r in self.rollouts)),
                   checked_steps=int(sum(len(r) for r in self.rhos)),
                   accepted_steps=int(sum(sum(float(x) >= alpha for x in r) for r in self.rhos)),
                   answered=int(sum(r.answer is not None for r in self.rollouts)))
        return out


def means(sums: dict) -> dict:
    """Per-rollout means of the reward terms, the acceptance rate and the response length."""
    n = max(sums["rollouts"], 1)
    out = {k[: -len("_sum")]: v / n for k, v in sums.items() if k.endswith("_sum")}
    out.update(acceptance_rate=sums["accepted_steps"] / max(sums["checked_steps"], 1),
               response_length=sums["response_tokens"] / n, steps_per_rollout=sums["checked_steps"] / n,
               answer_rate=sums["answered"] / n)
    return out


def sample_groups(policy, processor, prompts: Sequence[dict], settings: GRPOSettings, seed: int,
                  delimiter_ids: Sequence[int]) -> list[Rollout]:
    """G rollouts per prompt, prompt after prompt. `policy`: a model, or one copy per device:
    the prompts then go in calls of `settings.rollout_prompts`, each device running its share
    of the calls in its own thread (call j samples with seed + j, whichever device runs it)."""
    models = list(policy) if isinstance(policy, (list, tuple)) else [policy]
    per_call = settings.rollout_prompts or len(prompts)
    calls = [list(range(i, min(i + per_call, len(prompts)))) for i in range(0, len(prompts), per_call)]

    def run(j: int) -> list[Rollout]:
        out = sample_rollouts(models[j % len(models)], processor, [prompts[g] for g in calls[j]], settings.group_size,
                              max_new_tokens=settings.max_new_tokens, delimiter_ids=delimiter_ids,
                              temperature=settings.temperature, top_p=settings.top_p, seed=(seed + j) % 2**31)
        for r in out:
            r.group = calls[j][r.group]
        return out

    results: dict[int, list[Rollout]] = {}
    if len(models) == 1 or len(calls) == 1:
        for j in range(len(calls)):
            results[j] = run(j)
    else:
        from concurrent.futures import ThreadPoolExecutor

        def device_share(d: int):
            for j in range(d, len(calls), len(models)):
                results[j] = run(j)

        with ThreadPoolExecutor(len(models)) as pool:
            list(pool.map(device_share, range(len(models))))
    return [r for j in range(len(calls)) for r in results[j]]


def collect(policy, engine, processor, prompts: Sequence[dict], references: Sequence, settings: GRPOSettings,
            seed: int, extra_reward=None) -> Collected:
    """Rollouts of `policy` (the model to sample from, already in the compute dtype, or one
    copy per device), every step checked by the frozen target, rewards and advantages.

    references: per prompt a reference answer string or a record (graded with `grade`).
    extra_reward: optional `fn(rollouts, references) -> (N,)` added to R (logged as
    `reward_extra`), for experiments beyond the paper's three terms."""
    import time

    t0 = time.perf_counter()
    rollouts = sample_groups(policy, processor, prompts, settings, seed,
                             processor.tokens_containing(engine.config.steps.delimiter))
    t1 = time.perf_counter()
    rhos: list[list[float]] = []
    for g, prompt in enumerate(prompts):
        rhos += step_rhos(engine, prompt, [r for r in rollouts if r.group == g], settings.check_rows)
    t2 = time.perf_counter()
    terms = {"reward_outcome": outcome_reward([r.answer for r in rollouts], [references[r.group] for r in rollouts]),
             "reward_draft": draft_reward(rhos, settings.alpha, soft=settings.soft_draft_reward),
             "reward_length": length_reward([len(r.response) for r in rollouts], settings.l_ref)}
    total = composite_reward(terms["reward_outcome"], terms["reward_draft"], terms["reward_length"],
                             settings.reward_weights)
    if extra_reward is not None:
        terms["reward_extra"] = np.asarray(extra_reward(rollouts, references), np.float32).reshape(len(rollouts))
        total = total + terms["reward_extra"]
    terms["reward"] = total.astype(np.float32)
    advantages = np.asarray(group_advantages(terms["reward"], settings.group_size))
    return Collected(rollouts, rhos, terms, advantages, t1 - t0, t2 - t1)


def update(policy, optimizer, reference, batches: Sequence[dict], settings: GRPOSettings) -> dict:
    """Old and reference log-probs of each micro-batch, then `grpo_iterations` AdamW steps of
    `grpo_loss` over all of them together (the old log-probs stay those of the policy before
    the first step). Each batch holds `policy_batch` arrays plus "advantages" (B,); several
    are one batch in micro-batches: their gradients are accumulated (weighted by valid
    tokens, so the step equals the whole batch's) before the one optimizer update.
    Returns the last iteration's metrics (device arrays)."""
    batches = [dict(b) for b in batches]
    advantages = [b.pop("advantages") for b in batches]
    old = [_logprobs(policy, b, settings.logprob_chunk, settings.compute_dtype) for b in batches]
    ref = [_logprobs(reference, b, settings.logprob_chunk, settings.compute_dtype) for b in batches]
    args = (settings.logprob_chunk, settings.epsilon, settings.beta, settings.compute_dtype)
    if len(batches) == 1:
        for _ in range(settings.grpo_iterations):
            metrics = grpo_update(policy, optimizer, batches[0], old[0], ref[0], advantages[0], *args)
        return metrics
    total = sum(jnp.sum(b["response_mask"]) for b in batches)
    total = jnp.maximum(total, 1.0)
    for _ in range(settings.grpo_iterations):
        grads, parts = None, []
        for b, o, r, a in zip(batches, old, ref, advantages):
            g, m, share = grpo_grads(policy, b, o, r, a, total, *args)
            grads = g if grads is None else _add(grads, g)
            parts.append((m, share))
        grad_norm = apply_grads(policy, optimizer, grads)
        metrics = dict(_combine(parts, jnp.concatenate(advantages)), grad_norm=grad_norm)
    return metrics


def sapo_step(policy, optimizer, reference, engine, processor, prompts: Sequence[dict], references: Sequence,
              settings: GRPOSettings, seed: int, extra_reward=None) -> dict:
    """Rollouts, rewards, advantages and `grpo_iterations` updates of `policy`; returns metrics.

    prompts: `Processor.encode` outputs (input_ids, pixel_values, image_grid_thw); references:
    the reference answers (or records); engine: a `StepEngine` whose target is the frozen
    verifier. One process and device; `sapo_trainer.train` runs the same step data parallel."""
    import time

    got = collect(in_dtype(policy, settings.compute_dtype), engine, processor, prompts, references, settings, seed,
                  extra_reward)
    batch = policy_batch(policy.cfg, got.rollouts, prompts, processor.pad_token_id)
    batch = jax.tree.map(jnp.asarray, dict(batch, advantages=got.advantages))
    t0 = time.perf_counter()
    metrics = update(policy, optimizer, reference, [batch], settings)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    t_update = time.perf_counter() - t0
    sums = got.sums(settings.alpha)
    n_response = sums["response_tokens"]
    return dict(metrics, **means(sums), rollout_tokens_per_s=n_response / max(got.rollout_seconds, 1e-9),
                update_tokens_per_s=settings.grpo_iterations * n_response / max(t_update, 1e-9))

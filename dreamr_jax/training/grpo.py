"""GRPO pieces of SAPO (docs/METHOD.md section 5), as pure functions of arrays.

- `group_advantages`: A = (R - group mean) / (group std + eps), groups of G rollouts of one prompt.
- `grpo_loss`: the clipped surrogate plus beta times the k3 KL to the reference policy,
  averaged over every valid token of the batch.
- `chunked_token_logprobs`: log p(target token) over the full vocabulary, computed a chunk of
  positions at a time under `lax.scan` + `jax.checkpoint`, so the (B, T, V) logits never
  exist at once, in the forward or the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_advantages(rewards, group_size: int, eps: float = 1e-6, ddof: int = 1):
    """(R - mean_g) / (std_g + eps) within consecutive groups of `group_size` rollouts.

    rewards (N,) with N a multiple of group_size (rollouts of one prompt are adjacent).
    `ddof=1` is the sample standard deviation, as TRL's GRPO computes it; all-equal rewards
    give zero advantages."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size {group_size}, got {rewards.shape}")
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, keepdims=True, ddof=ddof) if group_size > ddof else jnp.zeros_like(mean)
    return ((groups - mean) / (std + eps)).reshape(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon: float = 0.2, beta: float = 0.01):
    """GRPO loss and metrics.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,). Per valid token:
        r = exp(logp - old_logp)
        pg = -min(r A, clip(r, 1 - eps, 1 + eps) A)
        kl = exp(ref - logp) - (ref - logp) - 1            (k3 estimator, >= 0)
    loss = sum(mask * (pg + beta * kl)) / sum(mask). Gradients flow through `logp` only.
    """
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    ref_logp = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32))
    mask = jnp.asarray(mask, jnp.float32)
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv
    pg = -jnp.minimum(unclipped, clipped)
    delta = ref_logp - logp
    kl = jnp.exp(delta) - delta - 1.0
    n = jnp.maximum(mask.sum(), 1.0)
    loss = jnp.sum(mask * (pg + beta * kl)) / n
    valid = mask > 0
    # A token is clipped when the clipped branch is the active (smaller) one and differs.
    is_clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + epsilon) & (adv > 0))
    metrics = {
        "loss": loss,
        "policy_loss": jnp.sum(mask * pg) / n,
        "kl": jnp.sum(mask * kl) / n,
        "clip_fraction": jnp.sum(mask * is_clipped) / n,
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
        "advantage_mean": jnp.mean(advantages),
        "advantage_std": jnp.std(advantages),
        "advantage_min": jnp.min(advantages),
        "advantage_max": jnp.max(advantages),
    }
    return loss, metrics


def chunked_token_logprobs(hidden, head, targets, chunk: int = 128):
    """log softmax(hidden @ head)[targets], `chunk` positions at a time.

    hidden (B, T, E), head (E, V) (the output projection; `embed.T` for tied embeddings),
    targets (B, T) int. Returns (B, T) float32. T is padded up to a multiple of `chunk`.
    Each chunk's (B, chunk, V) logits are recomputed in the backward pass (`jax.checkpoint`)
    instead of being stored."""
    b, t, e = hidden.shape
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk
    hs = hidden.reshape(b, n, chunk, e).transpose(1, 0, 2, 3)
    ts = targets.reshape(b, n, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def one(h, tgt):
        logits = jnp.dot(h, head).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    def body(carry, xs):
        return carry, one(*xs)

    _, out = jax.lax.scan(body, None, (hs, ts))
    return out.transpose(1, 0, 2).reshape(b, n * chunk)[:, :t]

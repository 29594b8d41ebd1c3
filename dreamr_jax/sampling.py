"""Next-token sampling (greedy, temperature, top-k, top-p) and log-probs, vectorised over rows."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static (hashable) sampling settings: a jitted decode loop specialises on them, so
    greedy decoding never pays for a sort and top-p only sorts when it is on."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    # False: no log-prob per token (zeros), sparing a log-sum-exp over the vocabulary on every
    # step (5% of a bf16 batch-8 step of the 152k-vocabulary benchmark model); vLLM's default
    logprobs: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits, params: SamplingParams):
    """Temperature-scaled logits with everything outside top-k / the top-p nucleus at -inf."""
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k > 0:
        kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1.0:
        logits = jnp.where(probs_at_least(jax.nn.softmax(logits, axis=-1), params.top_p), logits, -jnp.inf)
    return logits


def probs_at_least(probs, top_p: float, iterations: int = 40):
    """The top-p nucleus as a mask: tokens whose probability is >= the largest threshold t
    with mass(p >= t) >= top_p. Found by bisection on t (40 masked sums over the vocabulary)
    rather than a full sort, which costs tens of ms per step over 152k tokens on a CPU."""
    def mass(t):
        return jnp.sum(jnp.where(probs >= t[:, None], probs, 0.0), axis=-1)

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        enough = mass(mid) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.zeros(probs.shape[:-1], probs.dtype)
    hi = jnp.max(probs, axis=-1)  # mass(max) >= top_p may hold already: then only the top token(s)
    lo, hi = jax.lax.fori_loop(0, iterations, step, (lo, hi))
    threshold = jnp.where(mass(hi) >= top_p, hi, lo)
    return probs >= threshold[:, None]


def first_argmax(logits, axis: int = -1):
    """argmax over `axis` (first index on ties), as max + first matching index: XLA:CPU's argmax
    over 152k entries is several times slower than these two reductions."""
    axis = axis % logits.ndim
    best = jnp.max(logits, axis=axis, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    return jnp.min(jnp.where(logits == best, iota, logits.shape[axis]), axis=axis).astype(jnp.int32)


def sample(logits, rng, params: SamplingParams, vocab_axis: int = -1):
    """logits (B, V) (or (V, B) with `vocab_axis=0`) -> token ids (B,) int32."""
    if params.greedy:
        return first_argmax(logits, vocab_axis)
    if vocab_axis % logits.ndim != logits.ndim - 1:
        logits = jnp.moveaxis(logits, vocab_axis, -1)  # top-k / top-p / categorical work on rows
    return jax.random.categorical(rng, filter_logits(logits, params), axis=-1).astype(jnp.int32)


def token_logprob(logits, tokens, vocab_axis: int = -1):
    """log p(token) under the model's own distribution (no temperature or filtering): (B,).
    logits (B, V), or (V, B) with `vocab_axis=0`. The token's logit minus the log-sum-exp (one
    fused pass over the vocabulary; no (B, V) log-softmax is built)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.expand_dims(tokens, vocab_axis), axis=vocab_axis)
    return jnp.squeeze(picked, vocab_axis) - jax.nn.logsumexp(logits, axis=vocab_axis)


def speculative_verify(target_logits, draft_logits, proposal, n_proposed, rng, target_params: SamplingParams,
                       draft_params: SamplingParams):
    """Token-level speculative decoding's acceptance on the device, vectorised (Leviathan et al.,
    2023; the shape of tpu-inference's rejection sampler).

    target_logits (k+1, V): row j is the target's next-token logits before proposal[j], row k
    the bonus position; draft_logits (k, V): the logits proposal[j] was sampled from (unused
    when greedy); proposal (k,) int32 of which the first n_proposed are real.
    Returns (n_accepted, token): the accepted prefix length and the one token the target adds
    (its correction at the first rejection, else the bonus token).

    Greedy (target temperature 0): a proposal token is kept while it equals the target's argmax.
    Sampled: each is kept with probability min(1, p/q), p and q the target's and draft's
    distributions after their temperature / top-k / top-p filters; at the first rejection the
    token is drawn from max(p - q, 0) normalised, so every emitted token follows p exactly
    (`methods.speculative_accept` is the host reference this is tested against)."""
    k = proposal.shape[0]
    idx = jnp.arange(k)
    valid = idx < n_proposed
    if target_params.greedy:
        best = first_argmax(target_logits)
        keep = (best[:k] == proposal) & valid
        n_acc = jnp.sum(jnp.cumprod(keep.astype(jnp.int32)))
        return n_acc, best[n_acc]
    p = jax.nn.softmax(filter_logits(target_logits, target_params), axis=-1)
    q = jax.nn.softmax(filter_logits(draft_logits, draft_params), axis=-1)
    key_u, key_r = jax.random.split(rng)
    u = jax.random.uniform(key_u, (k,))
    p_tok, q_tok = p[idx, proposal], q[idx, proposal]
    keep = (u * q_tok < p_tok) & valid  # u < min(1, p/q), without dividing by q
    n_acc = jnp.sum(jnp.cumprod(keep.astype(jnp.int32)))
    row_p = p[n_acc]
    residual = jnp.maximum(row_p - q[jnp.minimum(n_acc, k - 1)], 0.0)
    total = residual.sum()
    # total == 0 means p == q up to rounding, where a rejection has probability 0: use p
    dist = jnp.where((n_acc < n_proposed) & (total > 0), residual / jnp.maximum(total, 1e-30), row_p)
    token = jax.random.categorical(key_r, jnp.log(dist)).astype(jnp.int32)
    return n_acc, token

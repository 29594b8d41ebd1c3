"""A role (draft or target): one model on its own devices, and the per-problem contexts it
reasons in.

A `Context` is one row of KV cache that stands for a token sequence: the prompt, then
`fed` tokens whose keys are cached, then `pending` tokens not yet run. Methods only say
which tokens a context should now stand for (`set_tokens`); the role works out the least
work to get there: roll the cache back to the longest common prefix (a length change, no
copy) and feed the rest lazily. Every device call is timed into the role's interval log.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..generation import Generator, length_bucket, prepare_batch
from ..kv_cache import KVCache
from ..sharding import place_role_state
from ..sampling import SamplingParams
from .trace import Interval


@dataclasses.dataclass
class Context:
    cache: KVCache  # batch 1
    prompt_len: int
    fed: list[int]
    pending: list[int]
    logits: jax.Array | None  # (1, V) next-token logits after `fed`, valid iff `pending` is empty
    prompt_logits: jax.Array | None = None  # the logits after the prompt, kept for rollbacks to it

    @property
    def tokens(self) -> list[int]:
        return self.fed + self.pending


class Role:
    def __init__(self, name: str, model, devices: Sequence[jax.Device] | None = None, parallelism: str = "tensor"):
        self.name = name
        self.model = model
        self.devices = list(devices) if devices else [jax.devices()[0]]
        self.parallelism = parallelism
        self.generator = Generator(model)
        # Place this role's weights on its devices (split by tensor parallelism, or replicated, if
        # several); every jitted call then runs there because its committed inputs live there.
        self._place()
        self.vocab_size = model.cfg.text.vocab_size
        self.intervals: list[Interval] = []
        self.clock_start = time.perf_counter()
        self._lock = threading.Lock()

    def _place(self):
        self.generator.state, self.sharding = place_role_state(self.generator.state, self.devices, self.parallelism,
                                                               self.model.cfg.text)

    def refresh(self):
        """Re-split the model (after its weights or `Int4Linear` methods changed) and place it again."""
        self.generator.refresh()
        self._place()

    # ---- timing -------------------------------------------------------------------------

    def reset_clock(self, start: float):
        self.clock_start = start
        self.intervals = []

    def _timed(self, kind: str, fn, *args, tokens: int = 0):
        start = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        end = time.perf_counter()
        with self._lock:
            self.intervals.append(Interval(self.name, kind, start - self.clock_start, end - self.clock_start, tokens))
        return out

    def _put(self, array):
        return jax.device_put(np.asarray(array), self.sharding)

    # ---- contexts -----------------------------------------------------------------------

    def open(self, prompt_ids: Sequence[int], pixel_values=None, image_grid_thw=None, *, capacity: int) -> Context:
        """Prefill one prompt; the cache has room for `capacity` more tokens (grown on demand)."""
        batch = prepare_batch(self.model, [list(prompt_ids)], pixel_values, image_grid_thw)
        cache_len = batch.input_ids.shape[1] + length_bucket(capacity)
        logits, cache = self._timed("prefill", self.generator.prefill, batch, cache_len, tokens=len(prompt_ids))
        return Context(cache=cache, prompt_len=len(prompt_ids), fed=[], pending=[], logits=logits, prompt_logits=logits)

    def set_tokens(self, ctx: Context, tokens: Sequence[int]) -> None:
        """Make `ctx` stand for prompt + `tokens`: roll back to the common prefix, queue the rest."""
        tokens = list(tokens)
        common = 0
        limit = min(len(ctx.fed), len(tokens))
        while common < limit and ctx.fed[common] == tokens[common]:
            common += 1
        if common < len(ctx.fed):
            ctx.cache = ctx.cache.truncate(np.array([ctx.prompt_len + common], np.int32))
            ctx.fed = ctx.fed[:common]
            ctx.logits = None
        new_pending = tokens[common:]
        if new_pending != ctx.pending:
            ctx.pending = new_pending
        if not ctx.pending and ctx.logits is None and not ctx.fed:
            ctx.logits = ctx.prompt_logits
        elif not ctx.pending and ctx.logits is None:
            # the logits after the last fed token are gone: re-run that token (one cheap step)
            last = ctx.fed[-1]
            ctx.cache = ctx.cache.truncate(np.array([ctx.prompt_len + len(ctx.fed) - 1], np.int32))
            ctx.fed = ctx.fed[:-1]
            ctx.pending = [last]

    def _ensure_room(self, cache: KVCache, needed: int) -> KVCache:
        if needed > cache.max_len:
            cache = cache.grow(length_bucket(needed))
        return cache

    def feed(self, ctx: Context, kind: str = "feed") -> jax.Array:
        """Run pending tokens; returns the next-token logits (1, V)."""
        if ctx.pending:
            n = len(ctx.pending)
            width = length_bucket(n, minimum=1)
            ids = np.zeros((1, width), np.int32)
            ids[0, :n] = ctx.pending
            ctx.cache = self._ensure_room(ctx.cache, ctx.prompt_len + len(ctx.fed) + width)
            ctx.logits, ctx.cache = self._timed(kind, self.generator.extend_last, ctx.cache, ids,
                                                np.array([n], np.int32), tokens=n)
            ctx.fed = ctx.fed + ctx.pending
            ctx.pending = []
        assert ctx.logits is not None
        return ctx.logits

    def write(self, ctx: Context, *, max_tokens: int, stop_ids: Sequence[int], params: SamplingParams,
              seed: int = 0, kind: str = "decode") -> tuple[list[int], list[float]]:
        """Decode up to `max_tokens` from ctx (stopping at a stop token); ctx then stands for the
        old tokens plus the new ones. Returns (tokens, log-probs)."""
        out_len = length_bucket(max_tokens)
        fold = len(ctx.pending) == 1  # feed the one pending token inside the decode program
        logits = None if fold else self.feed(ctx, kind)
        first = ctx.pending if fold else None
        ctx.cache = self._ensure_room(ctx.cache, ctx.prompt_len + len(ctx.fed) + out_len + 2)
        tokens, logps, n_gen, cache, _ = self._timed(
            kind, lambda: self.generator.decode(ctx.cache, logits, max_new_tokens=max_tokens, stop_ids=stop_ids,
                                                params=params, seed=seed, out_len=out_len, first_tokens=first))
        n = int(n_gen[0])
        new = np.asarray(tokens)[0, :n].tolist()
        ctx.cache = cache
        ctx.fed = ctx.fed + (ctx.pending if fold else []) + new[:-1]
        ctx.pending = new[-1:]
        ctx.logits = None
        with self._lock:
            self.intervals[-1].tokens = n
        return new, np.asarray(logps)[0, :n].tolist()

    def score(self, ctx: Context, continuations: Sequence[Sequence[int]], kind: str = "check",
              max_rows: int = 1, keep: int | None = None) -> jax.Array:
        """Next-token logits (k, V) after ctx + each continuation, all k in one batched forward.

        The context's cached prefix is reused (forked into k rows); only the pending tokens and
        the continuations are run. The batch is padded to a power of two rows (at most
        `max_rows`), so a varying number of candidates reuses few programs.

        ctx is unchanged, unless `keep` is given: then ctx afterwards stands for its tokens plus
        the first `keep` tokens of the last continuation, adopting that row's freshly computed
        cache instead of recomputing those tokens later (the keys of a prefix do not depend on
        what follows it, so the rest of the row, e.g. a judging suffix, is simply cut off)."""
        wanted = len(continuations)
        rows_bucket = min(1 << (wanted - 1).bit_length(), max(max_rows, wanted))
        continuations = list(continuations) + [continuations[0]] * (rows_bucket - wanted)
        k = len(continuations)
        rows = [ctx.pending + list(c) for c in continuations]
        n = np.array([len(r) for r in rows], np.int32)
        width = length_bucket(int(n.max()), minimum=1)
        ids = np.zeros((k, width), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        ctx.cache = self._ensure_room(ctx.cache, ctx.prompt_len + len(ctx.fed) + width)
        forked = ctx.cache.fork(np.zeros(k, np.int32))
        logits, scored = self._timed(kind, self.generator.extend_last, forked, ids, n, tokens=int(n[:wanted].sum()))
        if keep:
            kept = rows[wanted - 1][: len(ctx.pending) + keep]
            # The last kept token stays pending (a context's logits are valid only with nothing
            # pending, and this row's logits are after the whole continuation).
            length = ctx.prompt_len + len(ctx.fed) + len(kept) - 1
            ctx.cache = scored.fork(np.array([wanted - 1], np.int32)).truncate(np.array([length], np.int32))
            ctx.fed = ctx.fed + kept[:-1]
            ctx.pending = kept[-1:]
            ctx.logits = None
        return logits[:wanted]

    def logits_along(self, ctx: Context, tokens: Sequence[int], kind: str = "verify") -> jax.Array:
        """Logits (len(pending) + len(tokens), V) at every fed position; ctx then stands for
        its tokens + `tokens` (all fed). Used by token-level speculative decoding."""
        rows = ctx.pending + list(tokens)
        width = length_bucket(len(rows), minimum=1)
        ids = np.zeros((1, width), np.int32)
        ids[0, : len(rows)] = rows
        ctx.cache = self._ensure_room(ctx.cache, ctx.prompt_len + len(ctx.fed) + width)
        logits, ctx.cache = self._timed(kind, self.generator.extend, ctx.cache, ids, np.array([len(rows)], np.int32),
                                        tokens=len(rows))
        logits = logits[0, : len(rows)]
        ctx.fed = ctx.fed + rows
        ctx.pending = []
        ctx.logits = logits[-1:]
        return logits

    def fork(self, ctx: Context) -> Context:
        """An independent copy of a context (its cache row copied)."""
        return Context(cache=ctx.cache.fork(np.zeros(1, np.int32)), prompt_len=ctx.prompt_len, fed=list(ctx.fed),
                       pending=list(ctx.pending), logits=ctx.logits, prompt_logits=ctx.prompt_logits)


def write_many(role: Role, ctx: Context, continuations: Sequence[Sequence[int]], *, max_tokens: int,
               stop_ids: Sequence[int], params: SamplingParams, seed: int = 0, kind: str = "decode") -> list[list[int]]:
    """For each continuation c, decode from ctx + c (all rows in one batched prefill and one
    batched decode loop). ctx is not changed. Returns the new tokens of each row."""
    k = len(continuations)
    rows = [ctx.pending + list(c) for c in continuations]
    if ctx.logits is None and not ctx.pending and not any(rows):
        role.set_tokens(ctx, ctx.tokens)
        rows = [ctx.pending + list(c) for c in continuations]
    n = np.array([len(r) for r in rows], np.int32)
    out_len = length_bucket(max_tokens)
    width = length_bucket(max(int(n.max()), 1), minimum=1)
    ids = np.zeros((k, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    ctx.cache = role._ensure_room(ctx.cache, ctx.prompt_len + len(ctx.fed) + width + out_len + 1)
    cache = ctx.cache.fork(np.zeros(k, np.int32))
    if (n == 0).any():
        # rows with nothing new start from the context's own next-token logits
        base = role.feed(ctx, kind) if ctx.logits is None else ctx.logits
    logits, cache = role._timed(kind, role.generator.extend_last, cache, ids, np.maximum(n, 0), tokens=int(n.sum()))
    if (n == 0).any():
        logits = jnp.where(jnp.asarray(n == 0)[:, None], jnp.broadcast_to(base, logits.shape), logits)
    tokens, _, n_gen, _, _ = role._timed(
        kind, lambda: role.generator.decode(cache, logits, max_new_tokens=max_tokens, stop_ids=stop_ids,
                                            params=params, seed=seed, out_len=out_len))
    tokens, n_gen = np.asarray(tokens), np.asarray(n_gen)
    return [tokens[i, : n_gen[i]].tolist() for i in range(k)]

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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..generation import Generator, attend_bucket, fine_bucket, length_bucket, prepare_batch
from ..kv_cache import KVCache
from ..models.qwen_vl.sharding import expert_parallel_split, place_role_state
from ..sampling import SamplingParams
from .trace import Interval


def padded_rows(rows: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows as one rectangle for a batched call: (ids (len(rows), width) int32, zero after
    each row's end; each row's length, int32). `width` is the caller's bucket (at least the longest
    row), so that calls of nearby lengths share one compiled program."""
    ids = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, np.array([len(r) for r in rows], np.int32)


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
        with expert_parallel_split(model, self.devices, parallelism):
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
        with expert_parallel_split(self.model, self.devices, self.parallelism):
            self.generator.refresh()
        self._place()

    # ---- timing -------------------------------------------------------------------------

    def reset_clock(self, start: float):
        self.clock_start = start
        self.intervals = []

    def _timed(self, kind: str, fn, *args, tokens: int = 0, op: str = "extend", cached: int = 0, rows: int = 1):
        """Run one device call, wait for it, and record its interval with its shape (`op`, the
        tokens each row had `cached`, `rows`)."""
        start = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        self._record(kind, start, time.perf_counter(), tokens, op=op, cached=cached, rows=rows)
        return out

    def _record(self, kind: str, start: float, end: float, tokens: int, **shape) -> None:
        with self._lock:
            self.intervals.append(Interval(self.name, kind, start - self.clock_start, end - self.clock_start, tokens,
                                           **shape))

    def _put(self, array):
        return jax.device_put(np.asarray(array), self.sharding)

    # ---- contexts -----------------------------------------------------------------------

    def open(self, prompt_ids: Sequence[int], pixel_values=None, image_grid_thw=None, *, capacity: int) -> Context:
        """Prefill one prompt; the cache has room for `capacity` more tokens (grown on demand)."""
        ctx, done = self.prepare(prompt_ids, pixel_values, image_grid_thw, capacity=capacity)()
        done()
        return ctx

    def prepare(self, prompt_ids: Sequence[int], pixel_values=None, image_grid_thw=None, *,
                capacity: int) -> Callable[[], tuple[Context, Callable[[], None]]]:
        """`open` in two halves. This one is the host work (token rows, positions, image patches);
        it returns a function that dispatches the prefill (jax runs it asynchronously) and returns
        (the context, a function that waits for the prefill and records its interval). FPSR
        prepares both roles' prompts before dispatching either, so no Python work competes with
        a running prefill for the CPU's cores."""
        batch = prepare_batch(self.model, [list(prompt_ids)], pixel_values, image_grid_thw)
        return lambda: self._dispatch_prefill(batch, len(prompt_ids), capacity)

    def _dispatch_prefill(self, batch, prompt_len: int, capacity: int) -> tuple[Context, Callable[[], None]]:
        # One cache size for every prompt bucket below it (the cache's shape is part of every
        # program's signature); attention reads only the valid part of it (`attend_bucket`).
        cache_len = length_bucket(batch.input_ids.shape[1] + capacity)
        # image patches the vision tower encodes: each image token merges merge_size**2 of them
        patches = int((batch.image_gather >= 0).sum()) * self.model.cfg.vision.spatial_merge_size ** 2
        start = time.perf_counter()
        logits, cache = self.generator.prefill(batch, cache_len)
        ctx = Context(cache=cache, prompt_len=prompt_len, fed=[], pending=[], logits=logits, prompt_logits=logits)
        self._synced(ctx)

        def done():
            jax.block_until_ready((logits, cache.keys))
            self._record("prefill", start, time.perf_counter(), prompt_len, op="prefill", patches=patches)

        return ctx, done

    @staticmethod
    def _synced(ctx: Context) -> Context:
        """Hold the cache's row length as the host value the context tracks. Lengths stay host
        arrays throughout (rollbacks cost no device op), and every program always sees them in
        that one form: a device array in their place would be a second compiled variant."""
        ctx.cache = ctx.cache.with_lengths([ctx.prompt_len + len(ctx.fed)])
        return ctx

    def set_tokens(self, ctx: Context, tokens: Sequence[int]) -> None:
        """Make `ctx` stand for prompt + `tokens`: roll back to the common prefix, queue the rest."""
        tokens = list(tokens)
        common = 0
        limit = min(len(ctx.fed), len(tokens))
        while common < limit and ctx.fed[common] == tokens[common]:
            common += 1
        if common < len(ctx.fed):
            ctx.cache = ctx.cache.with_lengths([ctx.prompt_len + common])
            ctx.fed = ctx.fed[:common]
            ctx.logits = None
        ctx.pending = tokens[common:]
        if not ctx.pending and ctx.logits is None and not ctx.fed:
            ctx.logits = ctx.prompt_logits

    def _need_logits(self, ctx: Context) -> None:
        """Before decoding: if the logits after the last fed token are gone (a rollback, or keys
        adopted from a check), make that token pending again so it is re-run (one cheap step)."""
        if not ctx.pending and ctx.logits is None:
            last = ctx.fed[-1]
            ctx.cache = ctx.cache.with_lengths([ctx.prompt_len + len(ctx.fed) - 1])
            ctx.fed = ctx.fed[:-1]
            ctx.pending = [last]

    def _ensure_room(self, cache: KVCache, needed: int) -> KVCache:
        if needed > cache.max_len:
            cache = cache.grow(length_bucket(needed))
        return cache

    def feed(self, ctx: Context, kind: str = "feed") -> jax.Array:
        """Run pending tokens; returns the next-token logits (1, V)."""
        self._need_logits(ctx)
        if ctx.pending:
            n = len(ctx.pending)
            # multiples of 16: after a rollback the pending tokens are a whole step of any length,
            # and each distinct width is a program to compile (the warm-up cannot foresee which
            # steps get rejected)
            width = fine_bucket(n, step=16)
            ids, lengths = padded_rows([ctx.pending], width)
            end = ctx.prompt_len + len(ctx.fed) + width
            ctx.cache = self._ensure_room(ctx.cache, end)
            ctx.logits, ctx.cache = self._timed(kind, self.generator.extend_last, ctx.cache, ids, lengths,
                                                attend_bucket(end, ctx.cache.max_len), tokens=n,
                                                cached=ctx.prompt_len + len(ctx.fed))
            ctx.fed = ctx.fed + ctx.pending
            ctx.pending = []
            self._synced(ctx)
        assert ctx.logits is not None
        return ctx.logits

    def write(self, ctx: Context, *, max_tokens: int, stop_ids: Sequence[int], params: SamplingParams,
              seed: int = 0, kind: str = "decode", max_steps: int = 1, end_ids: Sequence[int] = (),
              max_step_tokens: int | None = None, answer_ids: Sequence[int] = (),
              in_step: int = 0, answered: bool = False) -> tuple[list[int], list[float]]:
        """Decode up to `max_tokens` from ctx (stopping at a stop token, or after `max_steps` of
        them, or after the step holding a token of `answer_ids`; at once at a token of `end_ids`;
        when a step reaches `max_step_tokens`); ctx then stands for the old tokens plus the new
        ones. `in_step`: tokens the step being continued already holds (for `max_step_tokens`);
        `answered`: whether they hold an answer token. Returns (tokens, log-probs)."""
        new, logps, _ = self._decode(ctx, max_tokens, stop_ids, params, seed, kind, False, max_steps, end_ids,
                                     max_step_tokens, answer_ids, in_step, answered)
        return new, logps

    def propose(self, ctx: Context, *, max_tokens: int, stop_ids: Sequence[int], params: SamplingParams,
                seed: int = 0, kind: str = "draft") -> tuple[list[int], jax.Array]:
        """`write` for a token-level speculative proposal, in one decode call: (tokens, the logits
        (1, out_len, V) each token was sampled from, left on the device for the target's check)."""
        new, _, seen = self._decode(ctx, max_tokens, stop_ids, params, seed, kind, True)
        return new, seen

    def _decode(self, ctx, max_tokens, stop_ids, params, seed, kind, keep_logits, max_steps=1, end_ids=(),
                max_step_tokens=None, answer_ids=(), in_step=0, answered=False):
        out_len = length_bucket(max_tokens)
        self._need_logits(ctx)
        fold = len(ctx.pending) == 1  # feed the one pending token inside the decode program
        logits = None if fold else self.feed(ctx, kind)
        first = ctx.pending if fold else None
        end = ctx.prompt_len + len(ctx.fed) + out_len + 2
        ctx.cache = self._ensure_room(ctx.cache, end)
        # attention covers the slots the loop can write: rows stop after max_tokens, however long
        # the output buffer's bucket is
        attend = attend_bucket(ctx.prompt_len + len(ctx.fed) + len(ctx.pending) + max_tokens + 1, ctx.cache.max_len)
        cached = ctx.prompt_len + len(ctx.fed)
        tokens, logps, n_gen, cache, seen = self._timed(
            kind, lambda: self.generator.decode(ctx.cache, logits, max_new_tokens=max_tokens, stop_ids=stop_ids,
                                                params=params, seed=seed, out_len=out_len, first_tokens=first,
                                                attend_len=attend, keep_logits=keep_logits, max_steps=max_steps,
                                                end_ids=end_ids, max_step_len=max_step_tokens,
                                                answer_ids=answer_ids, in_step=in_step, answered=answered),
            op="decode", cached=cached)
        tokens, logps, n_gen = jax.device_get((tokens, logps, n_gen))  # one transfer back
        n = int(n_gen[0])
        new = tokens[0, :n].tolist()
        ctx.cache = cache
        ctx.fed = ctx.fed + (ctx.pending if fold else []) + new[:-1]
        ctx.pending = new[-1:]
        ctx.logits = None
        self._synced(ctx)
        with self._lock:
            self.intervals[-1].tokens = n
        return new, logps[0, :n].tolist(), seen

    def verify(self, ctx: Context, proposal: Sequence[int], draft_logits, *, k: int, params: SamplingParams,
               draft_params: SamplingParams, seed: int = 0, kind: str = "verify") -> tuple[int, int]:
        """Token-level speculative decoding's check of a draft proposal (at most `k` tokens), in
        one program: feed ctx's pending tokens and the proposal, accept on the device
        (`sampling.speculative_verify`). Returns (accepted prefix length, the target's token);
        ctx then stands for its tokens + the whole proposal (set_tokens drops the rejected tail).
        draft_logits (1, >= k, V): the proposal's q rows (`propose`); unused when greedy."""
        self._need_logits(ctx)
        # the logits that predict the proposal's first token: ctx's own when nothing is pending,
        # else computed in the program (then the prompt's logits only fill the slot, unread; a
        # host array there would compile a second variant)
        prev = ctx.logits if not ctx.pending else ctx.prompt_logits
        rows = ctx.pending + list(proposal)
        ids, lengths = padded_rows([rows], length_bucket(len(ctx.pending) + k, minimum=1))
        width = ids.shape[1]
        padded = padded_rows([proposal], k)[0][0]
        end = ctx.prompt_len + len(ctx.fed) + width
        ctx.cache = self._ensure_room(ctx.cache, end)
        if draft_logits is None or params.greedy:
            draft_logits = np.zeros((1, k, 1), np.float32)
        n_acc, token, ctx.cache = self._timed(
            kind, self.generator.extend_verify, ctx.cache, ids, lengths, prev,
            len(ctx.pending), padded, len(proposal), draft_logits, seed, params, draft_params,
            attend_bucket(end, ctx.cache.max_len), tokens=len(rows), cached=ctx.prompt_len + len(ctx.fed))
        n_acc, token = jax.device_get((n_acc, token))
        ctx.fed = ctx.fed + rows
        ctx.pending = []
        ctx.logits = None
        self._synced(ctx)
        return int(n_acc), int(token)

    def score(self, ctx: Context, continuations: Sequence[Sequence[int]], kind: str = "check",
              max_rows: int = 1) -> jax.Array:
        """Next-token logits (k, V) after ctx + each continuation (alternatives, not a chain), all
        k in one batched forward.

        The context's cached prefix is reused (forked into k rows); only the pending tokens and
        the continuations are run. The batch is padded to a power of two rows (at most
        `max_rows`), so a varying number of candidates reuses few programs. ctx is unchanged."""
        wanted = len(continuations)
        rows_bucket = min(1 << (wanted - 1).bit_length(), max(max_rows, wanted))
        continuations = list(continuations) + [continuations[0]] * (rows_bucket - wanted)
        k = len(continuations)
        rows = [ctx.pending + list(c) for c in continuations]
        ids, n = padded_rows(rows, length_bucket(max(map(len, rows)), minimum=1))
        width = ids.shape[1]
        end = ctx.prompt_len + len(ctx.fed) + width
        ctx.cache = self._ensure_room(ctx.cache, end)
        forked = ctx.cache.fork(np.zeros(k, np.int32))
        logits, _ = self._timed(kind, self.generator.extend_last, forked, ids, n,
                                attend_bucket(end, ctx.cache.max_len), tokens=int(n[:wanted].sum()),
                                cached=ctx.prompt_len + len(ctx.fed), rows=wanted)
        return logits[:wanted]

    def check_chain(self, ctx: Context, drafts: Sequence[Sequence[int]], suffix: Sequence[int],
                    read_ids: Sequence[int], kind: str = "check", max_drafts: int = 1) -> np.ndarray:
        """Judge a chain of drafted steps in one forward: logits (len(drafts), len(read_ids)) of
        the tokens `read_ids` after draft i + `suffix`, where draft i continues ctx + drafts[:i].

        One packed row: ctx's pending tokens, then each draft followed by its own copy of the
        suffix. Each token attends to ctx's cached prefix (read in place, never copied), to the
        pending and drafted tokens before it and to its own suffix, never to an earlier draft's
        suffix; drafted tokens sit at the positions and cache slots they would have without the
        suffixes, so their keys are exactly those of plain decoding. Every drafted token is run
        once. The suffixes' keys go to scratch slots past the drafts and are dropped.

        Afterwards ctx stands for its tokens + all the drafts (their keys adopted, nothing
        pending; set_tokens rolls it back if a draft is rejected). `max_drafts`: the most drafts a
        caller checks at once (the verdicts' array is sized for it, so counts up to it share a
        program)."""
        lead = list(ctx.pending)
        base = ctx.prompt_len + len(ctx.fed)
        n_draft = len(lead) + sum(len(d) for d in drafts)
        # per packed token: id, cache slot, rotary position, segment (-1: pending or drafted
        # token, kept; i: a token of draft i's suffix, scratch)
        ids, segment, read_at = list(lead), [-1] * len(lead), []
        slots = list(range(base, base + len(lead)))
        positions = list(slots)
        next_slot, scratch = base + len(lead), base + n_draft
        for i, draft in enumerate(drafts):
            ids += list(draft)
            segment += [-1] * len(draft)
            slots += range(next_slot, next_slot + len(draft))
            positions += range(next_slot, next_slot + len(draft))
            next_slot += len(draft)
            ids += list(suffix)
            segment += [i] * len(suffix)
            slots += range(scratch, scratch + len(suffix))
            positions += range(next_slot, next_slot + len(suffix))  # as if right after draft i
            scratch += len(suffix)
            read_at.append(len(ids) - 1)
        n = len(ids)
        width = fine_bucket(n, step=8)
        ctx.cache = self._ensure_room(ctx.cache, scratch)
        pad = width - n
        ids_w = np.array(ids + [0] * pad, np.int32)[None]
        slots_w = np.array(slots + [ctx.cache.max_len] * pad, np.int32)[None]  # padding writes are dropped
        positions_w = np.array(positions + [0] * pad, np.int32)[None]
        seg = np.array(segment + [-2] * pad)
        order = np.arange(width)
        visible = (order[None, :] <= order[:, None]) & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
        visible[:, n:] = False
        rows = 1 << (max(len(drafts), max_drafts, 1) - 1).bit_length()  # one read shape for up to max_drafts
        read = np.array(read_at + [0] * (rows - len(read_at)), np.int32)[None]
        logits, ctx.cache = self._timed(kind, self.generator.extend_packed, ctx.cache, ids_w,
                                        np.array([n_draft], np.int32), positions_w, slots_w, visible[None], read,
                                        np.asarray(read_ids, np.int32), attend_bucket(scratch, ctx.cache.max_len),
                                        tokens=n, cached=ctx.prompt_len + len(ctx.fed))
        ctx.fed = ctx.fed + lead + [t for d in drafts for t in d]
        ctx.pending = []
        ctx.logits = None
        self._synced(ctx)
        return np.asarray(logits)[0, : len(drafts)]

    def write_many(self, ctx: Context, continuations: Sequence[Sequence[int]], *, max_tokens: int,
                   stop_ids: Sequence[int], params: SamplingParams, seed: int = 0,
                   kind: str = "decode") -> list[list[int]]:
        """For each continuation c, decode from ctx + c (all rows in one batched prefill and one
        batched decode loop). ctx is not changed. Returns the new tokens of each row."""
        k = len(continuations)
        rows = [ctx.pending + list(c) for c in continuations]
        if ctx.logits is None and not ctx.pending and not any(rows):
            self._need_logits(ctx)
            rows = [ctx.pending + list(c) for c in continuations]
        out_len = length_bucket(max_tokens)
        ids, n = padded_rows(rows, length_bucket(max(max(map(len, rows)), 1), minimum=1))
        width = ids.shape[1]
        base_len = ctx.prompt_len + len(ctx.fed)  # the forked rows' length
        end = base_len + width + out_len + 1
        ctx.cache = self._ensure_room(ctx.cache, end)
        attend = attend_bucket(end, ctx.cache.max_len)
        cache = ctx.cache.fork(np.zeros(k, np.int32))
        if (n == 0).any():
            # rows with nothing new start from the context's own next-token logits
            base = self.feed(ctx, kind) if ctx.logits is None else ctx.logits
        logits, cache = self._timed(kind, self.generator.extend_last, cache, ids, np.maximum(n, 0), attend,
                                    tokens=int(n.sum()), cached=base_len, rows=k)
        cache = cache.with_lengths(base_len + n)
        if (n == 0).any():
            logits = jnp.where(jnp.asarray(n == 0)[:, None], jnp.broadcast_to(base, logits.shape), logits)
        tokens, _, n_gen, _, _ = self._timed(
            kind, lambda: self.generator.decode(cache, logits, max_new_tokens=max_tokens, stop_ids=stop_ids,
                                                params=params, seed=seed, out_len=out_len, attend_len=attend),
            op="decode", cached=base_len + int(n.mean()), rows=k)
        tokens, n_gen = np.asarray(tokens), np.asarray(n_gen)
        with self._lock:  # rows x iterations: the loop computes every row until the longest one stops
            self.intervals[-1].tokens = k * int(n_gen.max(initial=0))
        return [tokens[i, : n_gen[i]].tolist() for i in range(k)]

    def fork(self, ctx: Context) -> Context:
        """An independent copy of a context (its cache row copied)."""
        return Context(cache=ctx.cache.fork(np.zeros(1, np.int32)), prompt_len=ctx.prompt_len, fed=list(ctx.fed),
                       pending=list(ctx.pending), logits=ctx.logits, prompt_logits=ctx.prompt_logits)


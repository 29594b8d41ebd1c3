"""Generation: token-for-token equality with transformers' greedy generate, KV-cache
truncation and forking, stop tokens, log-probs, and compilation reuse across buckets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jax import monitoring

import dreamr_jax as dr
from dreamr_jax.generation import Generator, generate_from_ids, prepare_batch, prompt_bucket
from dreamr_jax.sampling import SamplingParams

from helpers.models import IMAGE_TOKEN, image_prompt, random_image_inputs

GRIDS = [[(1, 4, 6)], [(1, 8, 4)]]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    return {name: dr.load_model(folder) for name, (folder, _) in tiny_checkpoints.items()}


def _prompt_batch(model, seed=0):
    pix, grids = random_image_inputs([g for row in GRIDS for g in row], model.cfg.vision.patch_dim, seed=seed)
    rows = image_prompt(np.random.default_rng(seed), GRIDS)
    return rows, pix, grids


def _left_padded(rows):
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_greedy_matches_transformers_generate(family, tiny_checkpoints, loaded):
    torch_model = tiny_checkpoints[family][1]
    model = loaded[family]
    rows, pix, grids = _prompt_batch(model)
    ours = generate_from_ids(model, rows, pix, grids, max_new_tokens=32, stop_ids=())
    ids, mask = _left_padded(rows)
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pix),
            image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN).astype(np.int64)),
            max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = out[:, ids.shape[1]:].numpy()
    assert np.array_equal(np.array(ours.token_ids), expected)

    # Per-token log-probs are the model's own: compare with transformers' forward over prompt + output.
    full = np.concatenate([ids, expected], 1)
    full_mask = np.concatenate([mask, np.ones_like(expected)], 1)
    with torch.no_grad():
        logits = torch_model(input_ids=torch.tensor(full), attention_mask=torch.tensor(full_mask),
                             pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(grids),
                             mm_token_type_ids=torch.tensor((full == IMAGE_TOKEN).astype(np.int64))).logits
    logp = torch.log_softmax(logits.double(), -1).numpy()
    width = ids.shape[1]
    want = np.take_along_axis(logp[:, width - 1 : -1], expected[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.array(ours.logprobs), want, atol=1e-4)

    # Without log-probs (no log-sum-exp in the loop) the tokens are the same, and none are reported.
    bare = generate_from_ids(model, rows, pix, grids, max_new_tokens=32, stop_ids=(),
                             params=SamplingParams(logprobs=False))
    assert bare.token_ids == ours.token_ids and bare.logprobs is None


def test_truncate_and_regenerate_equals_from_scratch(loaded):
    model = loaded["qwen3_vl"]
    gen = Generator(model)
    rows, pix, grids = _prompt_batch(model, seed=1)
    batch = prepare_batch(model, rows, pix, grids)
    cache_len = batch.input_ids.shape[1] + 32
    logits, cache = gen.prefill(batch, cache_len)
    tokens, _, n_gen, cache, _ = gen.decode(cache, logits, max_new_tokens=24, out_len=32)
    tokens, n_gen = np.asarray(tokens), np.asarray(n_gen)
    assert n_gen.tolist() == [24, 24]
    lengths = np.asarray(cache.lengths)
    assert lengths.tolist() == [len(rows[0]) + 23, len(rows[1]) + 23]  # the last sampled token is never fed

    # Roll row 0 back to "prompt + 5 generated", row 1 to "prompt + 9", then regenerate.
    keep = np.array([5, 9])
    cache = cache.truncate(np.array([len(r) for r in rows]) + keep)
    feed = tokens[np.arange(2), keep][:, None]  # the next token of each row is re-fed
    step_logits, cache = gen.extend(cache, feed, np.ones(2, np.int32))
    again, _, n2, cache, _ = gen.decode(cache, step_logits[:, 0], max_new_tokens=24 - keep - 1, out_len=32)
    again = np.asarray(again)
    for b in range(2):
        n = 24 - keep[b] - 1
        assert np.array_equal(again[b, :n], tokens[b, keep[b] + 1 : 24]), b


def test_fork_shared_prefix(loaded):
    model = loaded["qwen2_5_vl"]
    gen = Generator(model)
    rows, pix, grids = _prompt_batch(model, seed=2)
    batch = prepare_batch(model, rows, pix, grids)
    logits, cache = gen.prefill(batch, batch.input_ids.shape[1] + 16)
    reference, *_ = gen.decode(cache.fork([0, 1]), logits, max_new_tokens=12, out_len=16)
    # Three copies of row 1's prefix continue exactly as row 1 did.
    forked = cache.fork([1, 1, 1])
    tokens, *_ = gen.decode(forked, logits[np.array([1, 1, 1])], max_new_tokens=12, out_len=16)
    for b in range(3):
        assert np.array_equal(np.asarray(tokens)[b], np.asarray(reference)[1])


def test_stop_tokens_end_each_row(loaded):
    model = loaded["qwen3_vl"]
    rows, pix, grids = _prompt_batch(model)
    free = generate_from_ids(model, rows, pix, grids, max_new_tokens=20, stop_ids=())
    stop = {free.token_ids[0][6], free.token_ids[1][3]}
    out = generate_from_ids(model, rows, pix, grids, max_new_tokens=20, stop_ids=tuple(stop))
    for b in range(2):
        first = next(i for i, t in enumerate(free.token_ids[b]) if t in stop)
        assert out.token_ids[b] == free.token_ids[b][: first + 1]
        assert out.finish_reasons[b] == "stop"


def _cut_by_step_rules(free, delimiters, ends, answers, max_steps, max_step_len, in_step0, max_new):
    """Where the decode's stop rules cut a free-running greedy output, written from the rules:
    a row ends at an end token, after `max_steps` steps, at the delimiter of a step holding an
    answer token, after `max_new` tokens, or when a step reaches `max_step_len` tokens."""
    steps, in_step, answered = 0, in_step0, False
    for i, t in enumerate(free[:max_new]):
        in_step += 1
        answered |= t in answers and t not in delimiters and t not in ends
        if t in ends:
            return i + 1
        if t in delimiters:
            steps, in_step = steps + 1, 0
            if steps >= max_steps or answered:
                return i + 1
        if in_step >= max_step_len:
            return i + 1
    return min(len(free), max_new)


@pytest.mark.parametrize("rule", ["steps", "answer", "end", "step_cap"])
def test_step_rules_cut_the_free_run_and_the_cache_continues_it(loaded, rule):
    """Several steps in one call (delimiters, an answer marker, an end token, the step cap with
    tokens carried from a cut step): each row stops where the rules say, and a second call
    from the first's cache continues exactly as the free run did (the skipped last forward
    leaves nothing out)."""
    model = loaded["qwen3_vl"]
    gen = Generator(model)
    rows, pix, grids = _prompt_batch(model, seed=4)
    batch = prepare_batch(model, rows, pix, grids)
    logits, cache = gen.prefill(batch, batch.input_ids.shape[1] + 64)
    free, *_ = gen.decode(cache.fork([0, 1]), logits, max_new_tokens=40, out_len=64)
    free = np.asarray(free)[:, :40].tolist()
    # rule sets picked from the rows' own tokens so that every rule fires in the free run
    common = [sorted(set(row[:30]), key=lambda t: -row[:30].count(t)) for row in free]
    delimiters = {common[0][0], common[1][0], common[0][1], common[1][1]} if rule != "step_cap" else set()
    answers = {next(t for t in row if t not in delimiters) for row in free} if rule == "answer" else set()
    ends = {free[0][20], free[1][22]} - delimiters if rule == "end" else set()
    max_steps = 3 if rule == "steps" else 40
    max_step_len, in_step0 = (6, 2) if rule == "step_cap" else (40, 0)
    tokens, _, n_gen, cache2, _ = gen.decode(
        cache, logits, max_new_tokens=40, out_len=64, stop_ids=tuple(delimiters), end_ids=tuple(ends),
        answer_ids=tuple(answers), max_steps=max_steps, max_step_len=max_step_len, in_step=in_step0)
    tokens, n_gen = np.asarray(tokens), np.asarray(n_gen)
    for b in range(2):
        n = _cut_by_step_rules(free[b], delimiters, ends, answers, max_steps, max_step_len, in_step0, 40)
        assert n < 40, (rule, b, "the rule never fired: the test would prove nothing")
        assert n_gen[b] == n and tokens[b, :n].tolist() == free[b][:n], (rule, b)
    # continue both rows: feed each row's last (sampled, unfed) token, decode on without stops
    more, *_ = gen.decode(cache2, max_new_tokens=8, out_len=8, first_tokens=tokens[np.arange(2), n_gen - 1])
    more = np.asarray(more)
    for b in range(2):
        n = int(n_gen[b])
        assert more[b].tolist() == free[b][n:n + 8], (rule, b)


class CompileCounter:
    """Counts XLA backend compilations (jax's own monitoring event)."""

    def __init__(self):
        self.count = 0
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_seen_bucket_does_not_recompile(loaded):
    model = loaded["qwen3_vl"]
    counter = CompileCounter()
    rng = np.random.default_rng(3)

    def run(text_len, grid):
        rows = image_prompt(rng, [[grid]], text_len=(text_len, text_len + 1))
        pix, grids = random_image_inputs([grid], model.cfg.vision.patch_dim)
        before = counter.count
        generate_from_ids(model, rows, pix, grids, max_new_tokens=10, stop_ids=())
        return counter.count - before, len(rows[0])

    first, n1 = run(5, (1, 4, 6))  # 24 patches, prompt ~18 tokens
    second, n2 = run(7, (1, 6, 4))  # different prompt length and image shape, same buckets
    assert n1 != n2 and prompt_bucket(n1) == prompt_bucket(n2), (n1, n2)
    assert first > 0
    assert second == 0, f"a request in seen buckets compiled {second} programs"
    third, n3 = run(40, (1, 4, 6))  # a longer prompt bucket compiles again
    assert prompt_bucket(n3) != prompt_bucket(n1) and third > 0


def test_sampling_is_seeded_and_respects_top_k(loaded):
    model = loaded["qwen3_vl"]
    rows, pix, grids = _prompt_batch(model)
    params = SamplingParams(temperature=1.0, top_k=3)
    a = generate_from_ids(model, rows, pix, grids, max_new_tokens=8, stop_ids=(), params=params, seed=7)
    b = generate_from_ids(model, rows, pix, grids, max_new_tokens=8, stop_ids=(), params=params, seed=7)
    c = generate_from_ids(model, rows, pix, grids, max_new_tokens=8, stop_ids=(), params=params, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # every sampled token is among the 3 most likely under the model at that step
    ids, mask = _left_padded(rows)
    for row in range(2):
        full = np.concatenate([ids[row : row + 1], np.array([a.token_ids[row]])], 1)
        full_mask = np.concatenate([mask[row : row + 1], np.ones((1, 8), np.int64)], 1)
        sub_grids = grids[row : row + 1]
        sub_pix = pix[: int(grids[0].prod())] if row == 0 else pix[int(grids[0].prod()):]
        logits = np.asarray(dr.forward(model, full, full_mask, sub_pix, sub_grids))[0]
        start = ids.shape[1] - 1
        for k, tok in enumerate(a.token_ids[row]):
            top3 = np.argsort(logits[start + k])[-3:]
            assert tok in top3

"""The embedded world: problems, images, judging data, the world tokenizer and the training
examples, each checked against an independent reading of what they must be."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

import dreamr_jax as dr
from dreamr_jax import assets
from dreamr_jax import prompts
from dreamr_jax.data import synthetic
from dreamr_jax.data.pipeline import DataConfig, WorldEncoder, collate
from dreamr_jax.data.grading import final_answer
from dreamr_jax.prompts import judge_suffix, keyword_token_ids

from helpers import REPO_ROOT


def _answer_from_grid(p: synthetic.WorldProblem) -> int:
    """The answer recomputed from the question text and the grid, without the generator."""
    value = {p.colours[r][c]: p.digits[r][c] for r in range(synthetic.GRID) for c in range(synthetic.GRID)}
    q = p.question
    if m := re.fullmatch(r"What is the (\w+) digit times itself\?", q):
        return value[m[1]] ** 2
    if m := re.fullmatch(r"What is the (\w+) digit (plus|minus|times) the (\w+) digit\?", q):
        a, b = value[m[1]], value[m[3]]
        return {"plus": a + b, "minus": a - b, "times": a * b}[m[2]]
    if m := re.fullmatch(r"What is the (\w+) digit plus the (\w+) digit plus the (\w+) digit\?", q):
        return value[m[1]] + value[m[2]] + value[m[3]]
    if m := re.fullmatch(r"What is the (\w+) digit times the (\w+) digit minus the (\w+) digit\?", q):
        return value[m[1]] * value[m[2]] - value[m[3]]
    if m := re.fullmatch(r"What is the sum of the (\w+) and (\w+) digits times the (\w+) digit\?", q):
        return (value[m[1]] + value[m[2]]) * value[m[3]]
    raise AssertionError(f"unknown question {q}")


def test_problems_are_deterministic_and_answers_follow_from_the_grid():
    assert synthetic.fingerprint(0, "test", 50) == synthetic.fingerprint(0, "test", 50)
    assert synthetic.fingerprint(0, "test", 50) != synthetic.fingerprint(1, "test", 50)
    kinds = Counter()
    for p in synthetic.problems(0, "test", 300):
        kinds[p.kind] += 1
        assert 3 <= len(p.steps) <= 6, p
        assert str(_answer_from_grid(p)) == p.answer, p
        assert final_answer("\n\n".join(p.steps)) == p.answer
        assert all("\n\n" not in s for s in p.steps)
    assert set(kinds) == set(synthetic.KINDS)
    with pytest.raises(ValueError, match="split"):
        synthetic.make_problem(0, "dev", 0)


def test_splits_do_not_share_problems():
    seen = {(p.digits, p.colours, p.question) for p in synthetic.problems(0, "train", 5000)}
    assert not any((p.digits, p.colours, p.question) in seen for p in synthetic.problems(0, "test", 500))


def test_image_shows_each_digit_on_its_colour():
    p = synthetic.make_problem(0, "test", 7)
    img = np.asarray(p.image())
    assert img.shape == (64, 64, 3)
    assert len({name for row in p.colours for name in row}) == 4  # every cell its own colour
    for r in range(2):
        for c in range(2):
            cell = img[32 * r:32 * r + 32, 32 * c:32 * c + 32].astype(int)
            ink = (cell == 255).all(-1)
            # The white ink is the digit's 5x7 glyph at 4x scale, somewhere in the cell.
            ys, xs = np.nonzero(ink)
            crop = ink[ys.min():ys.min() + 28, xs.min():xs.min() + 20]
            glyph = np.kron(synthetic._GLYPHS[str(p.digits[r][c])], np.ones((4, 4), bool))
            top, left = np.argwhere(glyph).min(0)
            assert np.array_equal(crop[:28 - top, :20 - left], glyph[top:, left:]), (r, c)
            # The rest of the cell is filled with a shade of the named colour.
            mean = cell[~ink].mean(0)
            nearest = min(synthetic.COLOURS, key=lambda k: np.abs(np.array(synthetic.COLOURS[k]) - mean).sum())
            assert nearest == p.colours[r][c]


def test_judging_negatives_are_realistic_mistakes():
    rng = np.random.default_rng(0)
    mistakes = Counter()
    for i in range(600):
        p = synthetic.make_problem(0, "train", i)
        ex = synthetic.judging_example(p, rng)
        k = len(ex.context_steps)
        assert ex.context_steps == p.steps[:k]
        if ex.label:
            assert ex.candidate == p.steps[k]
        else:
            assert ex.candidate != p.steps[k]
            mistakes[ex.mistake] += 1
            if ex.mistake == "wrong_colour":  # another cell's digit under this cell's colour
                colour, digit = re.fullmatch(r"The (\w+) digit is \w+?(\d)\.", ex.candidate).groups()
                others = {p.digits[r][c] for r in range(2) for c in range(2) if p.colours[r][c] != colour}
                assert int(digit) in others
            if ex.mistake in ("operand", "swapped", "far_slip"):
                x, op, y, z = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.", p.steps[k]).groups()
                x2, op2, y2, z2 = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.", ex.candidate).groups()
                assert op2 == op
                if ex.mistake == "far_slip":  # the operands kept, the result 4 or more off
                    assert (x2, y2) == (x, y) and abs(int(z2) - int(z)) >= 4
                elif ex.mistake == "swapped":  # a true equation of the wrong difference
                    assert op == "-" and (x2, y2) == (y, x) and int(z2) == int(y) - int(x)
                elif (x2, y2) != (x, y):  # operand: one operand changed, a true equation of it
                    assert (x2 == x) != (y2 == y)
                    assert int(z2) == {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(x2), int(y2))
    assert set(mistakes) == {"misread", "slip", "repeated", "skipped", "wrong_colour", "wrong_answer", "operand",
                             "far_slip", "swapped"}
    assert 0.4 < sum(mistakes.values()) / 600 < 0.6


def test_step_verdict_labels_written_steps_against_the_solution():
    # A product_minus problem: read a, read b, read c, x * y, x * y - z, answer.
    p = next(q for q in synthetic.problems(0, "val", 50) if q.kind == "product_minus")
    s = list(p.steps)
    a_colour, a_digit = re.fullmatch(r"The (\w+) digit is \w+?(\d)\.", s[0]).groups()
    misread = synthetic.read_step(a_colour, (int(a_digit) + 1) % 10)
    x, y = re.fullmatch(r"(\d+) \* (\d+) = (-?\d+)\.", s[3]).groups()[:2]
    assert synthetic.step_verdict(p, s[:1]) == "correct"
    assert synthetic.step_verdict(p, [t + "  " for t in s]) == "correct"  # whitespace around a step
    assert synthetic.step_verdict(p, [misread]) == "misread"
    assert synthetic.step_verdict(p, s[:3] + [f"{x} * {y} = {int(x) * int(y) + 10}."]) == "slip"
    assert synthetic.step_verdict(p, s[:2] + [s[1]]) == "repeated"
    assert synthetic.step_verdict(p, s[:1] + [s[2]]) == "skipped"
    assert synthetic.step_verdict(p, s[:5] + ["The answer is \\boxed{1000}."]) == "wrong_answer"
    assert synthetic.step_verdict(p, s[:3] + ["I do not know."]) == "other"
    assert synthetic.step_verdict(p, [misread, s[1]]) == "off_path"  # after a mistake


def test_redundant_steps_are_rejected_and_passed_over():
    """The world's true verdict of a redundant step is "redundant" (the check must reject it, as a
    repeated step), and a redundant step earlier in the trace leaves the solution where it was."""
    p = next(q for q in synthetic.problems(0, "val", 50) if q.kind == "product_minus")
    s = list(p.steps)
    restated = synthetic.restated_question(p)
    assert restated == p.question[:-1] + "." and not restated.endswith("?")
    assert synthetic.step_verdict(p, s[:3] + [restated]) == "redundant"  # the question restated
    assert synthetic.step_verdict(p, s[:5] + [synthetic.CHECK_STEP]) == "redundant"  # "let me check"
    assert synthetic.step_verdict(p, s[:3] + [s[0]]) == "redundant"  # a digit read again, two steps later
    assert synthetic.step_verdict(p, s[:2] + [s[1]]) == "repeated"  # right after itself: as before
    assert synthetic.step_verdict(p, s[:3] + [restated, s[3]]) == "correct"
    assert synthetic.step_verdict(p, s[:3] + [restated] + s[3:5] + [synthetic.CHECK_STEP, s[5]]) == "correct"
    assert synthetic.step_verdict(p, s[:3] + [s[0], s[3]]) == "off_path"  # a re-read is not passed over
    rng = np.random.default_rng(0)
    for q in synthetic.problems(0, "train", 200):
        k = int(rng.integers(0, len(q.steps)))
        text, kind = synthetic.redundant_step(q, k, rng)
        assert kind in synthetic.REDUNDANT_KINDS
        if kind == "reread":  # an earlier read, possibly the step right before (then "repeated")
            assert text in q.steps[:k] and text.startswith("The ") and " digit is " in text
        verdict = synthetic.step_verdict(q, list(q.steps[:k]) + [text])
        assert verdict == ("repeated" if k and text == q.steps[k - 1] else "redundant"), (q.steps, k, text)
    with pytest.raises(ValueError, match="redundant step kind"):
        synthetic.redundant_step(p, 2, rng, "hedge")
    # What an audit names as expected, and how many habit steps a written solution holds.
    assert synthetic.expected_step(p, s[:3] + [restated, "4 * 4 = 16."]) == s[3]  # past the restatement
    assert synthetic.expected_step(p, s[:5] + [synthetic.CHECK_STEP, s[5], "more"]) is None  # past the answer
    assert synthetic.redundant_count(p, s) == 0
    assert synthetic.redundant_count(p, s[:3] + [s[0], restated] + s[3:5] + [synthetic.CHECK_STEP, s[5]]) == 3
    assert synthetic.redundant_count(p, s[:2] + [s[1], s[1]] + s[2:]) == 2  # repeated twice


def test_judging_data_makes_redundant_steps_at_the_configured_share():
    draws = Counter()
    for share in (0.0, 0.3):
        rng = np.random.default_rng(1)
        for i in range(3000):
            ex = synthetic.judging_example(synthetic.make_problem(0, "train", i), rng, redundant_share=share)
            if not ex.label:
                draws[share, ex.mistake == "redundant"] += 1
                if ex.mistake == "redundant":
                    verdict = synthetic.step_verdict(ex.problem, list(ex.context_steps) + [ex.candidate])
                    assert verdict in ("redundant", "repeated")
    assert draws[0.0, True] == 0
    negatives = draws[0.3, True] + draws[0.3, False]
    share = draws[0.3, True] / negatives
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / negatives), (share, negatives)  # binomial, 4 sd
    # Without the share no random number is drawn for it: the older recipes' data is unchanged. The
    # hash is of 300 examples made by the generator before redundant steps existed (commit a265493).
    rng, h = np.random.default_rng(2), hashlib.sha256()
    for i in range(300):
        ex = synthetic.judging_example(synthetic.make_problem(0, "train", i), rng, redundant_share=0.0)
        h.update(repr((ex.context_steps, ex.candidate, ex.label, ex.mistake)).encode())
    assert h.hexdigest()[:16] == "448be631697ba3ee"


def test_habitual_solutions_add_only_the_two_habits():
    rng = np.random.default_rng(3)
    habits = Counter()
    n = 2000
    for p in synthetic.problems(0, "train", n):
        steps = synthetic.habitual_solution(p, rng, 0.7)
        kept = [t for t in steps if t not in (synthetic.restated_question(p), synthetic.CHECK_STEP)]
        assert tuple(kept) == p.steps  # the reads, the arithmetic and the answer are the reference's
        reads = sum(1 for t in p.steps if re.fullmatch(r"The (\w+) digit is \w+?(\d)\.", t))
        if synthetic.restated_question(p) in steps:
            assert steps.index(synthetic.restated_question(p)) == reads  # restated once the digits are read
            habits["restate"] += 1
        if synthetic.CHECK_STEP in steps:
            assert steps[-2] == synthetic.CHECK_STEP  # right before the answer
            habits["check"] += 1
        assert synthetic.step_verdict(p, steps) == "correct"  # the answer step, past both habits
    for habit in ("restate", "check"):
        assert abs(habits[habit] / n - 0.7) < 4 * np.sqrt(0.21 / n), habits
    assert synthetic.habitual_solution(p, rng, 0.0) == p.steps


@pytest.fixture(scope="module")
def world_processor():
    return dr.load_processor(tokenizer_path=assets.path("tokenizer"))


def test_world_tokenizer_is_qwen_style(world_processor):
    tok = world_processor.tokenizer
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    assert len(tok) == 512
    keyword_token_ids(tok)  # both keywords single tokens, bare and spaced
    assert world_processor.tokens_containing("\n\n")
    for p in synthetic.problems(0, "test", 20):
        text = "".join(s + "\n\n" for s in p.steps)
        assert tok.decode(tok.encode(text)) == text
        assert all(len(tok.decode([t])) == 1 for t in tok.encode("0123456789"))  # digits one by one
    for name in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        assert len(tok.encode(name, add_special_tokens=False)) == 1


def test_training_examples_are_the_engines_token_sequences(world_processor):
    """A judging example is exactly: the reasoner's prompt, each context step encoded as
    step + "\\n\\n", the candidate likewise, the judging suffix (CPN or SpecReason), the verdict."""
    from dreamr_jax.prompts import specreason_suffix

    cfg = DataConfig(judging_fraction=0.6, specreason_fraction=0.3)
    enc = WorldEncoder(world_processor, cfg)
    tok = world_processor.tokenizer
    pos, neg = keyword_token_ids(tok)
    cpn = tok.encode(judge_suffix(instruction=prompts.WORLD_JUDGE_INSTRUCTION), add_special_tokens=False)
    scoring = tok.encode(specreason_suffix(prompts.WORLD_SPECREASON_PROMPT, prompts.WORLD_SPECREASON_PREFIX),
                         add_special_tokens=False)
    nine, zero = tok.encode("9", add_special_tokens=False)[0], tok.encode("0", add_special_tokens=False)[0]
    seen = Counter()
    for index in range(60):
        ex = enc.example(index)
        ids = ex["input_ids"][: ex["length"]].tolist()
        p = synthetic.make_problem(0, "train", index)
        prompt = world_processor.encode(
            world_processor.user_prompt(f"{prompts.WORLD_INSTRUCTION}\n\n{p.question}", 1), [p.image()])
        assert ids[: len(prompt["input_ids"])] == prompt["input_ids"]
        np.testing.assert_array_equal(ex["pixel_values"], prompt["pixel_values"])
        rest = ids[len(prompt["input_ids"]):]
        w = ex["weights"][len(prompt["input_ids"]): ex["length"]]
        if rest[-1 - len(cpn):-1] == cpn or rest[-1 - len(scoring):-1] == scoring:
            suffix = cpn if rest[-1 - len(cpn):-1] == cpn else scoring
            kind = "cpn" if suffix is cpn else "specreason"
            seen[kind] += 1
            if kind == "cpn":
                assert rest[-1] == (pos if ex["verdict_label"] == 1 else neg)
            else:
                assert ex["verdict_label"] == -1 and rest[-1] in (nine, zero)
            assert w[-1] == cfg.verdict_weight and ex["verdict_pos"] == ex["length"] - 1
            # Everything before the candidate is correct reference steps, all supervised.
            steps = tok.decode(rest[: -1 - len(suffix)]).split("\n\n")[:-1]
            assert steps[:-1] == list(p.steps[: len(steps) - 1])
            n_context = len(tok.encode("".join(s + "\n\n" for s in steps[:-1])))
            assert (w[:n_context] == 1).all() and (w[n_context:-1] == 0).all()
        else:
            seen["solution"] += 1
            assert ex["verdict_label"] == -1 and ex["verdict_pos"] == -1
            assert rest == tok.encode("".join(s + "\n\n" for s in p.steps))
            assert (w == 1).all()
        assert (ex["weights"][ex["length"]:] == 0).all()
    assert set(seen) == {"cpn", "specreason", "solution"}


def test_reordered_reads_permute_only_the_reads(world_processor):
    rng = np.random.default_rng(0)
    orders = Counter()
    for p in synthetic.problems(0, "train", 200):
        steps = synthetic.reordered_reads(p, rng)
        reads = [s for s in p.steps if s.startswith("The ") and "digit is" in s]
        assert sorted(steps[: len(reads)]) == sorted(reads) and steps[len(reads):] == p.steps[len(reads):]
        if len(reads) == 3:
            orders[tuple(reads.index(s) for s in steps[:3])] += 1
    assert len(orders) == 6  # every order of three reads occurs
    # In training examples: 0 leaves the solutions (and the random stream) as they were; 1
    # reorders every solution's reads.
    same = WorldEncoder(world_processor, DataConfig(judging_fraction=0.0))
    mixed = WorldEncoder(world_processor, DataConfig(judging_fraction=0.0, shuffled_reads=1.0))
    tok = world_processor.tokenizer
    changed = 0
    for index in range(20):
        p = synthetic.make_problem(0, "train", index)
        a, b = same.example(index), mixed.example(index)
        text_a = tok.decode(a["input_ids"][: a["length"]])
        assert text_a.endswith("".join(s + "\n\n" for s in p.steps))
        text_b = tok.decode(b["input_ids"][: b["length"]])
        prompt_end = text_a.index("assistant\n") + len("assistant\n")
        assert text_b[:prompt_end] == text_a[:prompt_end]
        assert sorted(text_b[prompt_end:].split("\n\n")) == sorted(text_a[prompt_end:].split("\n\n"))
        changed += text_a != text_b
    assert changed >= 5


def test_encoder_writes_the_habits_and_redundant_negatives(world_processor):
    tok = world_processor.tokenizer
    # Every redundant step ends in a token holding the step delimiter, so the engine sees its end.
    p = synthetic.make_problem(0, "train", 0)
    for kind in synthetic.REDUNDANT_KINDS:
        text, _ = synthetic.redundant_step(p, 1, np.random.default_rng(0), kind)
        assert "\n\n" in tok.decode(tok.encode(text + "\n\n")[-1:]), kind
    habits = WorldEncoder(world_processor, DataConfig(judging_fraction=0.0, redundant_habits=1.0))
    for index in range(10):
        p = synthetic.make_problem(0, "train", index)
        e = habits.example(index)
        written = synthetic.habitual_solution(p, np.random.default_rng(0), 1.0)  # rate 1: both habits
        assert tok.decode(e["input_ids"][: e["length"]]).endswith("".join(t + "\n\n" for t in written))
    judge = WorldEncoder(world_processor, DataConfig(judging_fraction=1.0, specreason_fraction=0.0,
                                                     redundant_share=1.0))
    negatives = 0
    for index in range(40):
        p = synthetic.make_problem(0, "train", index)
        e = judge.example(index)
        if e["verdict_label"] == 0:  # every wrong candidate is redundant: restated, re-read or a check
            negatives += 1
            text = tok.decode(e["input_ids"][: e["length"]]).split("assistant\n", 1)[1]
            steps = text.split("\n\n")[:-1]
            fillers = (synthetic.restated_question(p), synthetic.CHECK_STEP)
            assert steps[-1] in fillers or steps[-1] in steps[:-1], steps
    assert negatives >= 10


def test_world_config_uses_the_prompts_the_models_learned():
    import os

    from dreamr_jax.config import load_config

    spec = load_config(os.path.join(REPO_ROOT, "configs", "synthetic.yaml")).spec
    assert spec.instruction == prompts.WORLD_INSTRUCTION
    assert spec.judge_instruction == prompts.WORLD_JUDGE_INSTRUCTION
    assert (spec.specreason_prompt, spec.specreason_prefix) == (prompts.WORLD_SPECREASON_PROMPT,
                                                                prompts.WORLD_SPECREASON_PREFIX)


def test_collate_matches_the_generation_path(world_processor, tiny_world_model):
    """Positions, image gather and vision inputs of a training batch equal what
    `prepare_batch` (the inference path) builds for the same rows."""
    from dreamr_jax.generation import prepare_batch

    enc = WorldEncoder(world_processor, DataConfig(judging_fraction=0.5, seq_len=160))
    examples = [enc.example(i) for i in range(3)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    out = collate(batch, tiny_world_model.cfg)
    rows = [e["input_ids"][: e["length"]].tolist() for e in examples]
    ref = prepare_batch(tiny_world_model, rows, np.concatenate([e["pixel_values"] for e in examples]),
                        np.stack([e["image_grid_thw"] for e in examples]), seq_bucket=160)
    valid = out["valid"]
    np.testing.assert_array_equal(out["positions"][:, valid], ref.positions[:, valid])
    np.testing.assert_array_equal(out["image_gather"], np.where(valid, ref.image_gather, -1))
    n = out["vision"]["pixel_values"].shape[0]
    np.testing.assert_array_equal(out["vision"]["pixel_values"], ref.vision["pixel_values"][:n])
    np.testing.assert_array_equal(out["vision"]["rotary_positions"], ref.vision["rotary_positions"][:n])


def test_batches_split_over_processes_index_the_global_batch(world_processor, tiny_world_model):
    """Two processes' halves, collated separately and offset by process index, are the
    collated whole batch (images, image tokens, segments and merge units numbered globally)."""
    from dreamr_jax.data.pipeline import offset_for_process

    enc = WorldEncoder(world_processor, DataConfig(judging_fraction=0.5, seq_len=160))
    examples = [enc.example(i) for i in range(4)]
    stack = lambda ex: {k: np.stack([e[k] for e in ex]) for k in ex[0]}  # noqa: E731
    whole = collate(stack(examples), tiny_world_model.cfg)
    halves = [offset_for_process(collate(stack(examples[2 * p:2 * p + 2]), tiny_world_model.cfg), p) for p in (0, 1)]
    for key in ("input_ids", "weights", "valid", "image_gather", "verdict_pos", "verdict_label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key], err_msg=key)
    np.testing.assert_array_equal(np.concatenate([h["positions"] for h in halves], axis=1), whole["positions"])
    for key in whole["vision"]:
        np.testing.assert_array_equal(np.concatenate([h["vision"][key] for h in halves]), whole["vision"][key],
                                      err_msg=key)


def test_tokenizer_corpus_holds_the_world_and_package_prompts():
    """The world tokenizer's training text: each problem's prompt, the judging verdicts, and every
    configured prompt of the world and of the package (so any of them tokenizes sensibly)."""
    from dreamr_jax.data.world_tokenizer import training_corpus

    corpus = list(training_corpus(count=2))
    assert corpus[0].startswith(prompts.WORLD_INSTRUCTION + "\n\n")
    for text in (prompts.WORLD_JUDGE_INSTRUCTION, prompts.JUDGE_INSTRUCTION, prompts.REASONING_INSTRUCTION,
                 prompts.LOOKAHEAD_PROMPT):
        assert text in corpus

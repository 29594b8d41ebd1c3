"""The embedded world: a synthetic visual multi-step reasoning task.

Each image is a 2x2 grid of digits, each on a cell filled with a different colour (4 of red, green, blue, orange,
purple), 32x32 pixels per cell, so one cell is exactly one merged Qwen-VL image token (16-pixel
patches, 2x2 merge). Questions name digits by colour and need 3 to 6 steps of reading the
image and computing, e.g.

    Q: What is the red digit times the blue digit minus the green digit?
    The red digit is 7.\n\nThe blue digit is 4.\n\nThe green digit is 9.\n\n7 * 4 = 28.\n\n
    28 - 9 = 19.\n\nThe answer is \\boxed{19}.

Digits are named by colour, not by row and column: reading a cell is then a content lookup
(the query "red" matches the red cell's features) rather than an address computed through
the multimodal rotary positions. Neither was learned by the tiny models within this
machine's CPU training budget (docs/BENCHMARKS.md, "learnability").

Everything is a pure function of (seed, split, index): problem `i` of a split is the same on
every machine and every run. Each split draws from its own random stream, so a train and a
test problem coincide only by chance (the tests check 5,000 train against 500 test problems).
`judging_example` builds the target's CPN training data (docs/METHOD.md section 2): a context, a
candidate next step and whether it is correct, where wrong candidates are realistic mistakes:
a misread digit, the digit of another colour, an arithmetic slip (off by 1-3, or far off), a
wrong or swapped operand, a repeated step, a skipped step, a wrong final answer, and (with
`redundant_share`) a redundant step: the question restated, a digit read again, `CHECK_STEP`.
`habitual_solution` writes a solution with the misaligned draft's two habits (issue 17).

Digits are drawn with a built-in 5x7 bitmap font rather than a system font so the images are
bit-identical everywhere (PIL's default font differs between Pillow builds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Iterator, Sequence

import numpy as np

GRID = 2
CELL = 32
IMAGE_SIZE = GRID * CELL
SPLITS = {"train": 0, "val": 1, "test": 2}
COLOURS = {"red": (215, 40, 40), "green": (30, 150, 60), "blue": (40, 70, 215), "orange": (235, 140, 0),
           "purple": (140, 50, 170)}
COLOUR_NAMES = tuple(COLOURS)

_FONT = {  # 5x7 glyphs, one string of five bits per row
    "0": ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    "1": ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    "2": ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    "3": ["11110", "00001", "00001", "01110", "00001", "00001", "11110"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "5": ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    "6": ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    "7": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    "8": ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    "9": ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}
_GLYPHS = {d: np.array([[c == "1" for c in row] for row in rows], bool) for d, rows in _FONT.items()}

KINDS = ("square", "sum", "difference", "product", "three_sum", "product_minus", "sum_times")


@dataclasses.dataclass(frozen=True)
class WorldProblem:
    id: str
    digits: tuple  # (2, 2) ints, row-major
    colours: tuple  # (2, 2) colour names, all different
    kind: str
    question: str
    steps: tuple  # step texts, without the "\n\n" delimiter; the last holds \boxed{answer}
    answer: str
    jitter: tuple  # per-cell (dy, dx) glyph offsets and a colour shade, fixed by the seed

    def image(self):
        return render_grid(self.digits, self.colours, self.jitter)

    def record(self) -> dict:
        """The package's record schema (what `SpeculativeReasoner.solve_many` reads)."""
        img = self.image()
        return {"id": self.id, "source": "synthetic", "question": self.question, "images": [img], "image": img,
                "choices": [], "answer": self.answer, "answer_type": "number"}


def render_grid(digits, colours, jitter):
    """A 64x64 RGB image: each 32x32 cell filled with its colour, a white 20x28 digit on it.

    The colour fills the whole cell (not just the digit's strokes) because a colour seen only
    in thin strokes was too weak a key: models from scratch learned to read *a* digit from the
    image but not which colour it had (45% digit reads after 6,000 x 64 examples; filled cells:
    100% after about 1,000 x 64, docs/BENCHMARKS.md "learnability")."""
    from PIL import Image

    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
    for r in range(GRID):
        for c in range(GRID):
            dy, dx, shade = jitter[r * GRID + c]
            glyph = np.kron(_GLYPHS[str(digits[r][c])], np.ones((4, 4), bool))  # 28 x 20
            y0, x0 = r * CELL + 2 + dy, c * CELL + 6 + dx
            colour = np.clip(np.array(COLOURS[colours[r][c]]) + shade, 0, 255).astype(np.uint8)
            pixels[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = colour
            block = pixels[y0:y0 + 28, x0:x0 + 20]
            block[glyph] = 255
    return Image.fromarray(pixels)


# ---- problems --------------------------------------------------------------------------------


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got '{split}'")
    return np.random.default_rng([seed, SPLITS[split], index])


def _grid(rng):
    digits = rng.integers(0, 10, size=(GRID, GRID))
    order = rng.permutation(len(COLOUR_NAMES))[: GRID * GRID]  # every cell its own colour
    names = [[COLOUR_NAMES[order[r * GRID + c]] for c in range(GRID)] for r in range(GRID)]
    jitter = [(int(rng.integers(0, 3)), int(rng.integers(-2, 3)), int(rng.integers(-20, 21)))
              for _ in range(GRID * GRID)]
    return digits, names, jitter


_READ = re.compile(r"The (\w+) digit is \w+?(\d)\.")


def read_step(colour: str, digit: int) -> str:
    """ "The red digit is red7.": the colour word right before the digit (no space, so no
    bare space token between them), so the digit is predicted at the colour token itself: one
    attention lookup into the image instead of two composed ones after "is 7"."""
    return f"The {colour} digit is {colour}{digit}."


def make_problem(seed: int, split: str, index: int) -> WorldProblem:
    """Problem `index` of `split`: a grid, a question of one of KINDS, its reference steps."""
    rng = _rng(seed, split, index)
    digits, colours, jitter = _grid(rng)
    kind = KINDS[int(rng.integers(0, len(KINDS)))]
    value = {colours[r][c]: int(digits[r][c]) for r in range(GRID) for c in range(GRID)}
    a, b, c = (str(n) for n in rng.choice(sorted(value), size=3, replace=False))
    x, y, z = value[a], value[b], value[c]
    if kind == "square":
        question = f"What is the {a} digit times itself?"
        answer = x * x
        steps = [read_step(a, x), f"{x} * {x} = {answer}."]
    elif kind in ("sum", "difference", "product"):
        op, word = {"sum": ("+", "plus"), "difference": ("-", "minus"), "product": ("*", "times")}[kind]
        question = f"What is the {a} digit {word} the {b} digit?"
        answer = {"+": x + y, "-": x - y, "*": x * y}[op]
        steps = [read_step(a, x), read_step(b, y), f"{x} {op} {y} = {answer}."]
    elif kind == "three_sum":
        question = f"What is the {a} digit plus the {b} digit plus the {c} digit?"
        answer = x + y + z
        steps = [read_step(a, x), read_step(b, y), read_step(c, z), f"{x} + {y} = {x + y}.",
                 f"{x + y} + {z} = {answer}."]
    elif kind == "product_minus":
        question = f"What is the {a} digit times the {b} digit minus the {c} digit?"
        answer = x * y - z
        steps = [read_step(a, x), read_step(b, y), read_step(c, z), f"{x} * {y} = {x * y}.",
                 f"{x * y} - {z} = {answer}."]
    else:  # sum_times
        question = f"What is the sum of the {a} and {b} digits times the {c} digit?"
        answer = (x + y) * z
        steps = [read_step(a, x), read_step(b, y), read_step(c, z), f"{x} + {y} = {x + y}.",
                 f"{x + y} * {z} = {answer}."]
    steps.append(f"The answer is \\boxed{{{answer}}}.")
    return WorldProblem(
        id=f"synthetic-{split}-{index}", digits=tuple(tuple(int(v) for v in row) for row in digits),
        colours=tuple(tuple(row) for row in colours), kind=kind, question=question, steps=tuple(steps),
        answer=str(answer), jitter=tuple(jitter))


def reordered_reads(problem: WorldProblem, rng) -> tuple:
    """The reference solution with its digit reads in a random order (the arithmetic after them
    unchanged): as true a solution, in a style the reference order does not follow."""
    n = sum(1 for s in problem.steps if _READ.fullmatch(s))
    order = rng.permutation(n)
    return tuple(problem.steps[i] for i in order) + problem.steps[n:]


# ---- redundant steps: the misaligned draft's habits -----------------------------------------------

# A step that states nothing new: the world's "let me check". Every word of it is in the world
# tokenizer's training text ("Is the last step correct?"), so it costs few tokens.
CHECK_STEP = "The last step is correct."
REDUNDANT_KINDS = ("restate", "reread", "check")


def restated_question(problem: WorldProblem) -> str:
    """The question restated as a step: "What is the red digit times itself." The question mark
    becomes a full stop because the world tokenizer writes "?\n\n" as "?\n" + "\n", and no
    token of that pair holds the step delimiter "\n\n", so the engine would not see the step end."""
    return problem.question.rstrip("?") + "."


def redundant_step(problem: WorldProblem, k: int, rng, kind: str | None = None) -> tuple[str, str]:
    """A true but non-progress step written after the first `k` reference steps: (text, kind).

    "restate": the question restated; "reread": a digit read again that an earlier step already
    read; "check": `CHECK_STEP`. A reread needs an earlier read and a check an earlier step;
    where the asked kind is not possible the question is restated."""
    reads = [s for s in problem.steps[:k] if _READ.fullmatch(s)]
    possible = ["restate"] + ["reread"] * bool(reads) + ["check"] * (k >= 1)
    if kind is None:
        kind = possible[int(rng.integers(0, len(possible)))]
    elif kind not in REDUNDANT_KINDS:
        raise ValueError(f"redundant step kind must be one of {REDUNDANT_KINDS}, got '{kind}'")
    if kind not in possible:
        kind = "restate"
    if kind == "reread":
        return reads[int(rng.integers(0, len(reads)))], kind
    return (restated_question(problem) if kind == "restate" else CHECK_STEP), kind


def habitual_solution(problem: WorldProblem, rng, rate: float) -> tuple:
    """The reference solution written with the misaligned draft's two habits, each taken with
    probability `rate`: the question restated once the digits are read (before computing), and
    `CHECK_STEP` before the final answer. The reading and arithmetic are the reference's, so a
    draft taught on these solves as well as one taught on the reference; with `rate` above 1/2 the
    habits are its greedy choice, and the target rejects both (`step_verdict`: "redundant")."""
    steps = list(problem.steps)
    first_sum = next(i for i, s in enumerate(steps) if not _READ.fullmatch(s))
    out = steps[:first_sum]
    if rng.random() < rate:
        out.append(restated_question(problem))
    out += steps[first_sum:-1]
    if rng.random() < rate:
        out.append(CHECK_STEP)
    out.append(steps[-1])
    return tuple(out)


def problems(seed: int, split: str, count: int, start: int = 0) -> Iterator[WorldProblem]:
    for i in range(start, start + count):
        yield make_problem(seed, split, i)


# ---- judging data (the target's CPN check) ------------------------------------------------------


def _replace_number(text: str, rng) -> str | None:
    """Change one number in a step: a misread digit, or a slipped result of an equation."""
    numbers = list(re.finditer(r"-?\d+", text))
    if not numbers:
        return None
    if "=" in text:
        m = numbers[-1]  # the result of an equation
        delta = int(rng.choice([-3, -2, -1, 1, 2, 3]))
        return text[: m.start()] + str(int(m.group()) + delta) + text[m.end():]
    m = numbers[int(rng.integers(0, len(numbers)))]
    value = int(m.group())
    new = (value + int(rng.integers(1, 10))) % 10 if 0 <= value <= 9 else value + int(rng.choice([-2, -1, 1, 2]))
    return text[: m.start()] + str(new) + text[m.end():]


_EQUATION = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.")
_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _wrong_equation(m, kind: str, rng) -> str:
    """A wrong equation of one of three kinds, all seen in drafts' rollouts:
    "operand": one operand replaced by another value, the result right for it ("4 * 0 = 0." for 5 * 0);
    "far_slip": the result off by 4 to 20, or with its tens digit changed ("11 * 8 = 98.");
    "swapped": the operands of a difference swapped, the result right for that ("4 - 2 = 2." for 2 - 4)."""
    x, op, y, result = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    if kind == "swapped":  # offered for differences of two different numbers only
        return f"{y} {op} {x} = {_APPLY[op](y, x)}."
    if kind == "operand":
        which = int(rng.integers(0, 2))
        old = (x, y)[which]
        new = old + int(rng.choice([-3, -2, -1, 1, 2, 3])) if abs(old) > 9 else (old + int(rng.integers(1, 10))) % 10
        x, y = (new, y) if which == 0 else (x, new)
        if _APPLY[op](x, y) != result:
            return f"{x} {op} {y} = {_APPLY[op](x, y)}."
    wrong = result + int(rng.choice([-1, 1])) * int(rng.integers(4, 21))
    if abs(result) >= 10 and rng.random() < 0.5:
        wrong = result + int(rng.choice([-1, 1])) * 10 * (1 if result > 0 else -1)
    return f"{m.group(1)} {op} {m.group(3)} = {wrong}."


def corrupt_step(problem: WorldProblem, k: int, rng) -> tuple[str, str]:
    """A realistic wrong version of step k: (text, kind of mistake).

    "skipped" (the step after next) can state a true fact, e.g. "The blue digit is 4." before
    the red one was read; it is labelled wrong because it does not follow the solution's order
    (the paper's judge asks for logical validity too). The judge therefore also learns the order
    of the reference solution, which the draft, trained on the same solutions, follows."""
    steps = problem.steps
    step = steps[k]
    options = []
    if k >= 1:
        options.append("repeated")
    if k + 1 < len(steps) - 1:
        options.append("skipped")
    options += ["number"] * 4
    m = _READ.fullmatch(step)
    if m:
        options += ["wrong_colour"] * 2
    equation = _EQUATION.fullmatch(step)
    if equation:  # the slips a draft makes, beyond a result off by 1-3 (scripts/audit_judge.py found them)
        swappable = equation.group(2) == "-" and equation.group(1) != equation.group(3)
        options += ["operand"] * 3 + ["far_slip"] * 2 + ["swapped"] * (2 * swappable)
    choice = options[int(rng.integers(0, len(options)))]
    if choice == "repeated":
        return steps[k - 1], choice
    if choice == "skipped":
        return steps[k + 1], choice
    if choice in ("operand", "far_slip", "swapped"):
        return _wrong_equation(equation, choice, rng), choice
    if choice == "wrong_colour":  # the digit of another cell, under this colour's name
        others = [problem.digits[r][c] for r in range(GRID) for c in range(GRID)
                  if problem.colours[r][c] != m.group(1) and problem.digits[r][c] != int(m.group(2))]
        if others:
            return read_step(m.group(1), others[int(rng.integers(0, len(others)))]), "wrong_colour"
    wrong = _replace_number(step, rng)
    if wrong is None or wrong == step:
        return steps[k - 1] if k >= 1 else steps[k + 1], "repeated" if k >= 1 else "skipped"
    kind = "wrong_answer" if "boxed" in step else "slip" if "=" in step else "misread"
    return wrong, kind


@dataclasses.dataclass(frozen=True)
class JudgingExample:
    problem: WorldProblem
    context_steps: tuple  # the correct steps before the candidate
    candidate: str
    label: bool  # True: the candidate is the correct next step
    mistake: str  # "" for correct candidates


def judging_example(problem: WorldProblem, rng, positive_rate: float = 0.5,
                    redundant_share: float = 0.0) -> JudgingExample:
    """A context of k reference steps and a candidate: the next reference step (label True, with
    probability `positive_rate`), else a wrong one: a redundant step (`redundant_step`, "redundant")
    with probability `redundant_share`, otherwise a mistake of `corrupt_step`. With
    `redundant_share` 0 no random number is drawn for it, so older recipes' data is unchanged."""
    k = int(rng.integers(0, len(problem.steps)))
    if rng.random() < positive_rate:
        return JudgingExample(problem, problem.steps[:k], problem.steps[k], True, "")
    if redundant_share and rng.random() < redundant_share:
        text, _ = redundant_step(problem, k, rng)
        return JudgingExample(problem, problem.steps[:k], text, False, "redundant")
    text, mistake = corrupt_step(problem, k, rng)
    return JudgingExample(problem, problem.steps[:k], text, False, mistake)


# ---- files for `dreamr eval` --------------------------------------------------------------------


def write_split(folder: str, split: str = "test", count: int = 100, seed: int = 0) -> str:
    """Write `count` problems as PNGs + a JSONL of records (`dreamr eval --data` reads it)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, f"{split}.jsonl")
    with open(path + ".tmp", "w") as f:
        for p in problems(seed, split, count):
            name = os.path.join("images", f"{p.id}.png")
            p.image().save(os.path.join(folder, name))
            f.write(json.dumps({"id": p.id, "question": p.question, "image": name, "answer": p.answer,
                                "source": "synthetic", "kind": p.kind}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def fingerprint(seed: int, split: str, count: int) -> str:
    """A hash of a split's questions and grids (tests pin determinism with it)."""
    h = hashlib.sha256()
    for p in problems(seed, split, count):
        h.update(repr((p.digits, p.colours, p.question, p.steps, p.jitter)).encode())
    return h.hexdigest()[:16]


# ---- ground truth for a written step (audits of the judge and of SAPO rollouts) -------------------


def step_verdict(problem: WorldProblem, steps: Sequence[str]) -> str:
    """The true status of the last of `steps` (texts without their "\\n\\n"), written after the others:

    - "correct": the earlier steps are the reference's and this one is the next reference step;
    - "redundant": a true step that makes no progress (`restated_question`, `CHECK_STEP`, or a
      digit read again that an earlier step read); the check rejects it, as a repeated step;
    - a mistake kind ("misread", "slip", "wrong_answer", "repeated", "skipped", "other") when the
      earlier steps are the reference's and this one is not the next one;
    - "off_path": an earlier step already left the reference solution (what "correct" means
      there is a matter of taste, so audits report those steps apart).

    Earlier redundant steps (`restated_question`, `CHECK_STEP`) are passed over: they leave
    the solution where it was. The world's steps have one fixed wording, so a correct step is the
    reference step verbatim."""
    *before, last = [s.strip() for s in steps]
    fillers = (restated_question(problem), CHECK_STEP)
    before = [s for s in before if s not in fillers]
    ref = problem.steps
    k = len(before)
    if list(ref[:k]) != before:
        return "off_path"
    if k < len(ref) and last == ref[k]:
        return "correct"
    if k >= 1 and last == ref[k - 1]:
        return "repeated"
    if last in fillers or (last in ref[:k] and _READ.fullmatch(last)):
        return "redundant"
    if last in ref[k + 1:]:
        return "skipped"
    if k < len(ref):
        if "boxed" in ref[k]:
            return "wrong_answer"
        if _READ.fullmatch(ref[k]) and _READ.fullmatch(last):
            return "misread"
        if "=" in ref[k] and "=" in last:
            return "slip"
    return "other"


def expected_step(problem: WorldProblem, steps: Sequence[str]) -> str | None:
    """The reference step the last of `steps` should have been, earlier restated questions and
    check steps passed over as `step_verdict` passes them; None past the solution's end."""
    fillers = (restated_question(problem), CHECK_STEP)
    k = sum(t.strip() not in fillers for t in steps[:-1])
    return problem.steps[k] if k < len(problem.steps) else None


def redundant_count(problem: WorldProblem, steps: Sequence[str]) -> int:
    """How many of `steps` are redundant ("redundant" or "repeated"), each judged after the steps
    before it with the earlier redundant ones left out, so that a digit read again does not put
    the rest of the solution off path."""
    kept, count = [], 0
    for step in steps:
        if step_verdict(problem, kept + [step]) in ("redundant", "repeated"):
            count += 1
        else:
            kept.append(step)
    return count

"""The embedded world: a synthetic visual multi-step reasoning task.

Each image is a 3x3 grid of coloured digits (red, green or blue), 32x32 pixels per cell, so
one cell is exactly one merged Qwen-VL image token (16-pixel patches, 2x2 merge). Questions
need 3 to 6 steps of reading the grid and computing, e.g.

    Q: What is the sum of row 2 minus the sum of column 3?
    Row 2 is 4, 0 and 9.\\n\\n4 + 0 + 9 = 13.\\n\\nColumn 3 is 2, 9 and 5.\\n\\n2 + 9 + 5 = 16.\\n\\n
    13 - 16 = -3.\\n\\nThe answer is \\boxed{-3}.

Everything is a pure function of (seed, split, index): problem `i` of a split is the same on
every machine and every run. Each split draws from its own random stream, so a train and a
test problem coincide only by chance (one grid in 10^9 digit layouts times colourings and
questions; the tests check 5,000 train against 500 test problems). `judging_example` builds the target's
CPN training data (SPEC.md section 2): a context, a candidate next step and whether it is
correct, where wrong candidates are realistic mistakes: a misread digit, the wrong row, an
arithmetic slip, a wrong extreme or count, a repeated step, a skipped step, a wrong final
answer.

Digits are drawn with a built-in 5x7 bitmap font rather than a system font so the images are
bit-identical everywhere (PIL's default font differs between Pillow builds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterator

import numpy as np

GRID = 3
CELL = 32
IMAGE_SIZE = GRID * CELL
SPLITS = {"train": 0, "val": 1, "test": 2}
COLOURS = {"red": (215, 40, 40), "green": (30, 150, 60), "blue": (40, 70, 215)}
COLOUR_NAMES = tuple(COLOURS)

# Short prompts for this world (configurable in SpecConfig; see configs/synthetic.yaml): the
# tiny models read them on every problem and the judge suffix on every check.
INSTRUCTION = "Solve step by step and put the answer in \\boxed{}."
JUDGE_INSTRUCTION = "Is the last step correct? Answer positive or negative."
SPECREASON_PROMPT = "Score the last step from 0 to 9."
SPECREASON_PREFIX = "Score: "

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

KINDS = ("row_sum", "column_sum", "colour_sum", "row_minus_column", "max_times_min", "row_plus_count",
         "colour_range")


@dataclasses.dataclass(frozen=True)
class WorldProblem:
    id: str
    digits: tuple  # (3, 3) ints, row-major
    colours: tuple  # (3, 3) colour names
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
    """A 96x96 RGB image: white background, one coloured 20x28 digit per 32x32 cell."""
    from PIL import Image

    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
    for r in range(GRID):
        for c in range(GRID):
            dy, dx, shade = jitter[r * GRID + c]
            glyph = np.kron(_GLYPHS[str(digits[r][c])], np.ones((4, 4), bool))  # 28 x 20
            y0, x0 = r * CELL + 2 + dy, c * CELL + 6 + dx
            colour = np.clip(np.array(COLOURS[colours[r][c]]) + shade, 0, 255).astype(np.uint8)
            block = pixels[y0:y0 + 28, x0:x0 + 20]
            block[glyph] = colour
    return Image.fromarray(pixels)


# ---- problems --------------------------------------------------------------------------------


def _listing(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _sum_step(values) -> tuple[str, int]:
    total = int(sum(values))
    return " + ".join(str(v) for v in values) + f" = {total}.", total


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got '{split}'")
    return np.random.default_rng([seed, SPLITS[split], index])


def _grid(rng):
    digits = rng.integers(0, 10, size=(GRID, GRID))
    while True:  # every colour appears 2 to 4 times, so colour questions list 2-4 digits
        colours = rng.integers(0, 3, size=(GRID, GRID))
        counts = np.bincount(colours.ravel(), minlength=3)
        if counts.min() >= 2 and counts.max() <= 4:
            break
    names = [[COLOUR_NAMES[k] for k in row] for row in colours]
    jitter = [(int(rng.integers(0, 3)), int(rng.integers(-2, 3)), int(rng.integers(-25, 26))) for _ in range(GRID * GRID)]
    return digits, names, jitter


def make_problem(seed: int, split: str, index: int) -> WorldProblem:
    """Problem `index` of `split`: a grid, a question of one of KINDS, its reference steps."""
    rng = _rng(seed, split, index)
    digits, colours, jitter = _grid(rng)
    kind = KINDS[int(rng.integers(0, len(KINDS)))]
    r, c = int(rng.integers(0, GRID)), int(rng.integers(0, GRID))
    colour = COLOUR_NAMES[int(rng.integers(0, 3))]
    row = [int(v) for v in digits[r]]
    col = [int(v) for v in digits[:, c]]
    of_colour = [int(digits[i][j]) for i in range(GRID) for j in range(GRID) if colours[i][j] == colour]
    read_row = f"Row {r + 1} is {_listing(row)}."
    read_col = f"Column {c + 1} is {_listing(col)}."
    read_colour = f"The {colour} digits are {_listing(of_colour)}."

    if kind == "row_sum":
        question = f"What is the sum of row {r + 1}?"
        s, answer = _sum_step(row)
        steps = [read_row, s]
    elif kind == "column_sum":
        question = f"What is the sum of column {c + 1}?"
        s, answer = _sum_step(col)
        steps = [read_col, s]
    elif kind == "colour_sum":
        question = f"What is the sum of the {colour} digits?"
        s, answer = _sum_step(of_colour)
        steps = [read_colour, s]
    elif kind == "row_minus_column":
        question = f"What is the sum of row {r + 1} minus the sum of column {c + 1}?"
        s1, a = _sum_step(row)
        s2, b = _sum_step(col)
        answer = a - b
        steps = [read_row, s1, read_col, s2, f"{a} - {b} = {answer}."]
    elif kind == "max_times_min":
        question = f"What is the largest digit of row {r + 1} times the smallest digit of column {c + 1}?"
        a, b = max(row), min(col)
        answer = a * b
        steps = [read_row, f"The largest is {a}.", read_col, f"The smallest is {b}.", f"{a} * {b} = {answer}."]
    elif kind == "row_plus_count":
        question = f"What is the sum of row {r + 1} plus the number of {colour} digits?"
        s, a = _sum_step(row)
        n = len(of_colour)
        answer = a + n
        steps = [read_row, s, f"There are {n} {colour} digits.", f"{a} + {n} = {answer}."]
    else:  # colour_range
        question = f"What is the largest {colour} digit minus the smallest {colour} digit?"
        a, b = max(of_colour), min(of_colour)
        answer = a - b
        steps = [read_colour, f"The largest is {a}.", f"The smallest is {b}.", f"{a} - {b} = {answer}."]
    steps.append(f"The answer is \\boxed{{{answer}}}.")
    return WorldProblem(
        id=f"synthetic-{split}-{index}", digits=tuple(tuple(int(v) for v in row) for row in digits),
        colours=tuple(tuple(row) for row in colours), kind=kind, question=question, steps=tuple(steps),
        answer=str(answer), jitter=tuple(jitter))


def problems(seed: int, split: str, count: int, start: int = 0) -> Iterator[WorldProblem]:
    for i in range(start, start + count):
        yield make_problem(seed, split, i)


# ---- judging data (the target's CPN check) ------------------------------------------------------


def _replace_number(text: str, rng) -> str | None:
    """Change one number in a step: a misread digit in a listing, or a slipped result."""
    import re

    numbers = list(re.finditer(r"-?\d+", text))
    if text.startswith(("Row", "Column")):
        numbers = numbers[1:]  # keep the row/column index; a wrong index is its own mistake
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


def corrupt_step(problem: WorldProblem, k: int, rng) -> tuple[str, str]:
    """A realistic wrong version of step k: (text, kind of mistake).

    "skipped" (the step after next) can state a true fact, e.g. "The largest is 9." before
    the row was read; it is labelled wrong because it does not follow from the steps so far
    (SPEC.md's judge asks for logical validity too). The judge therefore also learns the
    order of the reference solution, which the draft, trained on the same solutions, follows."""
    import re

    steps = problem.steps
    step = steps[k]
    options = []
    if k >= 1:
        options.append("repeated")
    if k + 1 < len(steps) - 1:
        options.append("skipped")
    options += ["number"] * 4
    if step.startswith(("Row", "Column")):
        options += ["wrong_index"] * 2
    choice = options[int(rng.integers(0, len(options)))]
    if choice == "repeated":
        return steps[k - 1], choice
    if choice == "skipped":
        return steps[k + 1], choice
    if choice == "wrong_index":
        m = re.match(r"(Row|Column) (\d)", step)
        other = [i for i in (1, 2, 3) if i != int(m.group(2))]
        idx = other[int(rng.integers(0, 2))] - 1
        digits = np.array(problem.digits)
        values = digits[idx] if m.group(1) == "Row" else digits[:, idx]
        wrong = f"{m.group(1)} {m.group(2)} is {_listing(int(v) for v in values)}."
        if wrong != step:
            return wrong, "wrong_row" if m.group(1) == "Row" else "wrong_column"
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


def judging_example(problem: WorldProblem, rng, positive_rate: float = 0.5) -> JudgingExample:
    k = int(rng.integers(0, len(problem.steps)))
    if rng.random() < positive_rate:
        return JudgingExample(problem, problem.steps[:k], problem.steps[k], True, "")
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

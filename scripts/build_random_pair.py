"""Build a tiny random draft/target Qwen3-VL pair (real Qwen tokenizer) and a config for it,
to try `dreamr reason` / `dreamr eval` before real or trained checkpoints are at hand.

    .venv/bin/python scripts/build_random_pair.py out/random-pair
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from spec_models import build_spec_model  # noqa: E402


def main(folder: str = "out/random-pair"):
    os.makedirs(folder, exist_ok=True)
    build_spec_model(os.path.join(folder, "target"), seed=1, hidden=256, layers=4)
    build_spec_model(os.path.join(folder, "draft"), seed=2, hidden=64, layers=1)
    with open(os.path.join(folder, "pair.yaml"), "w") as f:
        f.write(f"draft: {os.path.abspath(os.path.join(folder, 'draft'))}\n"
                f"target: {os.path.abspath(os.path.join(folder, 'target'))}\n"
                "spec:\n  alpha: 0.5\n  steps: {max_step_tokens: 32, token_budget: 96}\n")
    print(f"wrote {folder}/draft, {folder}/target and {folder}/pair.yaml")


if __name__ == "__main__":
    main(*sys.argv[1:])

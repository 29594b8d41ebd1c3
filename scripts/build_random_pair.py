"""Build a tiny random draft/target Qwen3-VL pair (real Qwen tokenizer) and a config for it,
to try `dreamr reason` / `dreamr eval` before real or trained checkpoints are at hand.

    .venv/bin/python scripts/build_random_pair.py out/random-pair
"""

import sys


def main(folder: str = "out/random-pair"):
    if folder in ("-h", "--help"):
        print(__doc__)
        return
    from dreamr_jax.bench.models import write_random_pair

    write_random_pair(folder)
    print(f"wrote {folder}/draft, {folder}/target and {folder}/pair.yaml")


if __name__ == "__main__":
    main(*sys.argv[1:])

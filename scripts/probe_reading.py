"""How well does a short SFT run learn to read the world's images?

    python scripts/probe_reading.py --config configs/sft_synthetic_draft.yaml --steps 700 [--json PATH]

Trains the config's model for --steps (constant learning rate, no checkpoints, no export),
then measures on 64 validation solutions, teacher-forced: the accuracy of every digit read
from the image (the token after a colour word) and of the first digit after each "=" (the
arithmetic). Chance for a digit read is about 10%.
"""

from __future__ import annotations

import argparse
import json

from dreamr_jax.bench.report import write_json
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import dreamr_jax as dr
    from dreamr_jax.bench.world import reading_accuracy
    from dreamr_jax.training.sft import load_sft_config, train

    with tempfile.TemporaryDirectory() as out:
        cfg = load_sft_config(args.config, [f"output_dir={out}", f"steps={args.steps}", "end_lr_ratio=1.0",
                                            "checkpoint_every=1000000", "log_every=50"])
        t0 = time.perf_counter()
        run = train(cfg, progress=False, export=False)
        seconds = time.perf_counter() - t0
    acc = reading_accuracy(run["model"], dr.load_processor(tokenizer_path=cfg.tokenizer))
    result = {"config": args.config, "steps": args.steps, "seconds": round(seconds, 1),
              "digit_read_accuracy": acc["read"],
              "first_result_digit_accuracy": acc["result"], "final_loss": run["metrics"].get("loss")}
    print(json.dumps(result, indent=2))
    write_json(args.json, result, indent=2)


if __name__ == "__main__":
    main()

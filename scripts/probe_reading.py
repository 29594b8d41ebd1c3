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
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reading_accuracy(model, processor, count: int = 64) -> dict:
    import jax
    import jax.numpy as jnp

    from dreamr_jax.data.pipeline import DataConfig, WorldEncoder, collate
    from dreamr_jax.data.synthetic import COLOUR_NAMES

    enc = WorldEncoder(processor, DataConfig(judging_fraction=0.0, seq_len=128, split="val"))
    tok = processor.tokenizer
    examples = [enc.example(i) for i in range(count)]
    b = collate({k: np.stack([e[k] for e in examples]) for k in examples[0]}, model.cfg)
    tokens, deepstack = model.encode_images(jax.tree.map(jnp.asarray, b["vision"]))
    logits = np.asarray(model.forward(jnp.asarray(b["input_ids"]), jnp.asarray(b["valid"]), jnp.asarray(b["positions"]),
                                      tokens, deepstack, jnp.asarray(b["image_gather"])))
    hits = {"read": [0, 0], "result": [0, 0]}
    for j, e in enumerate(examples):
        ids = e["input_ids"][: e["length"]]
        for t in range(1, len(ids)):
            if e["weights"][t] == 0:
                continue
            before = tok.decode(ids[t - 1:t]).strip()
            is_digit = tok.decode(ids[t:t + 1]).strip().isdigit()
            # a read digit follows its colour word ("red7"); a result's first digit follows "= "
            kind = ("read" if before in COLOUR_NAMES else
                    "result" if tok.decode(ids[max(0, t - 2):t]).strip() == "=" else None) if is_digit else None
            if kind:
                hits[kind][0] += int(logits[j, t - 1].argmax() == ids[t])
                hits[kind][1] += 1
    return {k: round(a / max(n, 1), 4) for k, (a, n) in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import dreamr_jax as dr
    from dreamr_jax.training.sft import load_sft_config, train

    with tempfile.TemporaryDirectory() as out:
        cfg = load_sft_config(args.config, [f"output_dir={out}", f"steps={args.steps}", "end_lr_ratio=1.0",
                                            "checkpoint_every=1000000", "log_every=50"])
        t0 = time.perf_counter()
        run = train(cfg, progress=False, export=False)
        seconds = time.perf_counter() - t0
    acc = reading_accuracy(run["model"], dr.load_processor(tokenizer_path=cfg.tokenizer))
    result = {"config": args.config, "steps": args.steps, "seconds": round(seconds, 1), "digit_read_accuracy": acc["read"],
              "first_result_digit_accuracy": acc["result"], "final_loss": run["metrics"].get("loss")}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

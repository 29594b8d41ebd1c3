"""Rebuild the embedded world's shipped assets from scratch and record how long it took.

    python scripts/build_assets.py [--target-steps N] [--draft-steps N] [--json PATH]
        [--target-override KEY=VALUE ...] [--judge-override KEY=VALUE ...] [--draft-override KEY=VALUE ...]
        [--sapo-override KEY=VALUE ...] [--work DIR] [--resume] [--skip-training]

The shipped target was trained on one H100 (about 7 minutes):
    python scripts/build_assets.py --target-override batch_size=64 data_workers=3 time_limit_s=400
(configs/sft_synthetic_target.yaml holds that recipe's steps; see docs/BENCHMARKS.md for what
the 2-core CPU reaches in 40 minutes.)

1. trains the world tokenizer (dreamr_jax/assets/synthetic-tokenizer);
2. SFT of the target (configs/sft_synthetic_target.yaml: solutions + CPN judging), then its
   judge fine-tune (configs/sft_synthetic_target_judge.yaml: the same mix with the draft-style
   arithmetic mistakes weighted up, from the SFT export; `--judge-override KEY=VALUE`), then
   the verdict-cue stages (configs/sft_synthetic_target_cue.yaml, `CUE_STAGES`), then the
   redundant-step stage (configs/sft_synthetic_target_redundant.yaml);
3. SFT of the draft (configs/sft_synthetic_draft.yaml: solutions only);
4. SFT of the misaligned draft (configs/sft_synthetic_draft_redundant.yaml: solutions with two
   redundant habits; `--draft-steps` / `--draft-override` change the shipped draft's run only),
   then SAPO of it against the new target (configs/sapo_synthetic_redundant.yaml, the paper's
   1:1:1 reward; `--sapo-override KEY=VALUE`);
5. copies the exported HF checkpoints (config.json, float16 safetensors, tokenizer and
   processor files) into dreamr_jax/assets/synthetic-{target,draft,draft-redundant,draft-redundant-sapo};
6. measures each checkpoint's accuracy alone (the target, the draft, the misaligned draft
   before and after SAPO) on 100 validation problems and writes
   dreamr_jax/assets/build_info.json (times, sizes, parameters, accuracies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # configs/ and out/ are found from here


# Stages of configs/sft_synthetic_target_cue.yaml, each from the last one's export (overrides of
# that recipe): the share of CPN judging examples asked with the verdict cue rather than the full
# judging turn grows, and the last stage weighs the verdicts more at a lower learning rate.
CUE_STAGES = (["data.cue_fraction=0.5"], ["data.cue_fraction=0.75"], ["data.cue_fraction=0.9"],
              ["data.cue_fraction=0.9", "data.judging_fraction=0.8", "data.verdict_weight=8.0",
               "learning_rate=5.0e-5", "steps=1000"])


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def count_params(model) -> dict:
    import jax
    from flax import nnx

    text = sum(x.size for x in jax.tree.leaves(nnx.state(model.layers, nnx.Param)))
    embed = model.embed_tokens[...].size
    vision = sum(x.size for x in jax.tree.leaves(nnx.state(model.visual, nnx.Param)))
    # Per decoded token: every decoder weight once, plus the output head (tied: the embedding).
    return {"total": text + embed + vision, "decoder": text, "embedding": embed, "vision": vision,
            "flops_per_token": 2 * (text + embed)}


def accuracy(folder: str, count: int, split: str = "val") -> float:
    """Greedy accuracy of the checkpoint alone on `count` problems of `split` (a draft alone
    decodes as a target alone does)."""
    from dreamr_jax.config import load_config
    from dreamr_jax.data import synthetic
    from dreamr_jax.data.grading import answers_match
    from dreamr_jax.speculative import SpeculativeReasoner

    spec = load_config(os.path.join(ROOT, "configs", "synthetic.yaml")).spec
    reasoner = SpeculativeReasoner(target=folder, config=spec, method="target")
    right = 0
    for p in synthetic.problems(0, split, count):
        right += answers_match(reasoner.solve(p.question, p.image()).answer, p.answer)
    return right / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-steps", type=int, default=None, help="override the target config's steps")
    parser.add_argument("--draft-steps", type=int, default=None)
    parser.add_argument("--target-override", action="append", default=[], help="KEY=VALUE for the target's SFT config")
    parser.add_argument("--draft-override", action="append", default=[], help="KEY=VALUE for the draft's SFT config")
    parser.add_argument("--judge-override", action="append", default=[],
                        help="KEY=VALUE for the target's judge fine-tune config")
    parser.add_argument("--sapo-override", action="append", default=[],
                        help="KEY=VALUE for the misaligned draft's SAPO config")
    parser.add_argument("--work", default=os.path.join(ROOT, "out", "assets"), help="training runs go here")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in --work (default: delete them and train from scratch)")
    parser.add_argument("--skip-training", action="store_true", help="only copy + measure existing runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import dreamr_jax as dr
    from dreamr_jax import assets
    from dreamr_jax.data.world_tokenizer import write_tokenizer_files
    from dreamr_jax.training.sapo_trainer import load_sapo_config
    from dreamr_jax.training.sapo_trainer import train as train_sapo
    from dreamr_jax.training.sft import load_sft_config, train

    if not (args.resume or args.skip_training) and os.path.exists(args.work):
        shutil.rmtree(args.work)  # a stale run would be resumed by `train` (old tokenizer, old steps)
    import jax

    info = {"seconds": {}, "device": jax.devices()[0].device_kind,
            "overrides": {"target": args.target_override, "target_judge": args.judge_override,
                          "draft": args.draft_override, "sapo": args.sapo_override}}
    t0 = time.perf_counter()
    tokenizer_dir = os.path.join(assets.ASSETS_DIR, "synthetic-tokenizer")
    if not args.skip_training:
        write_tokenizer_files(tokenizer_dir)
    info["seconds"]["tokenizer"] = round(time.perf_counter() - t0, 1)

    def sft(stage: str, overrides: list[str]):
        cfg = load_sft_config(os.path.join(ROOT, "configs", f"sft_synthetic_{stage}.yaml"),
                              [f"output_dir={os.path.join(args.work, stage)}", f"tokenizer={tokenizer_dir}"]
                              + overrides)
        t = time.perf_counter()
        if not args.skip_training:
            train(cfg)
        info["seconds"][f"sft_{stage}"] = round(time.perf_counter() - t, 1)
        with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
            return cfg, json.loads(f.readlines()[-1])

    for role, steps in (("target", args.target_steps), ("draft", args.draft_steps)):
        extra = (([f"steps={steps}"] if steps else [])
                 + (args.target_override if role == "target" else args.draft_override))
        cfg, final = sft(role, extra)
        base_steps, base_final = final["step"], final  # step below cfg.steps where a time limit ended the run
        if role == "target":
            base_cfg = cfg
            cfg, final = sft("target_judge", [f"init={os.path.join(cfg.output_dir, 'hf')}"] + args.judge_override)
            info["target_judge_finetune"] = {"steps": final["step"], "batch_size": cfg.batch_size,
                                             "learning_rate": cfg.learning_rate, "final_metrics": final}
            # the short verdict cue (spec.judge_format: cue), in stages of the same recipe
            stages = []
            for k, overrides in enumerate(CUE_STAGES):
                cfg, final = sft("target_cue", [f"init={os.path.join(cfg.output_dir, 'hf')}",
                                                f"output_dir={os.path.join(args.work, f'target_cue{k + 1}')}"]
                                               + overrides)
                stages.append({"overrides": overrides, "steps": final["step"], "final_metrics": final})
            info["target_cue_finetune"] = {"batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                                           "stages": stages}
            # rejecting redundant steps (the misaligned draft's habits)
            cfg, final = sft("target_redundant", [f"init={os.path.join(cfg.output_dir, 'hf')}"])
            info["target_redundant_finetune"] = {"steps": final["step"], "final_metrics": final}
        dest = os.path.join(assets.ASSETS_DIR, f"synthetic-{role}")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(os.path.join(cfg.output_dir, "hf"), dest)
        model = dr.load_model(dest)
        arch_cfg = base_cfg if role == "target" else cfg
        info[role] = {"steps": base_steps, "batch_size": arch_cfg.batch_size, "mb": round(folder_mb(dest), 2),
                      "params": count_params(model), "architecture": arch_cfg.model, "final_metrics": base_final}
    # The misaligned draft and the same draft after SAPO against the target just built.
    cfg, final = sft("draft_redundant", [])
    misaligned = {"draft-redundant": os.path.join(cfg.output_dir, "hf")}
    info["draft-redundant"] = {"steps": final["step"], "final_metrics": final}
    sapo_cfg = load_sapo_config(os.path.join(ROOT, "configs", "sapo_synthetic_redundant.yaml"),
                                [f"output_dir={os.path.join(args.work, 'sapo_redundant')}",
                                 f"draft={misaligned['draft-redundant']}",
                                 f"target={assets.path('target')}"] + args.sapo_override)
    t = time.perf_counter()
    if not args.skip_training:
        train_sapo(sapo_cfg, progress=True)
    info["seconds"]["sapo_redundant"] = round(time.perf_counter() - t, 1)
    misaligned["draft-redundant-sapo"] = os.path.join(sapo_cfg.output_dir, "hf")
    with open(os.path.join(sapo_cfg.output_dir, "metrics.jsonl")) as f:
        final = json.loads(f.readlines()[-1])
    info["draft-redundant-sapo"] = {"steps": final["step"], "final_metrics": final}
    for name, folder in misaligned.items():
        dest = os.path.join(assets.ASSETS_DIR, f"synthetic-{name}")
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(folder, dest)
        info[name]["mb"] = round(folder_mb(dest), 2)
    info["draft_cheaper_per_token"] = round(info["target"]["params"]["flops_per_token"]
                                            / info["draft"]["params"]["flops_per_token"], 2)
    t = time.perf_counter()
    for role in ("target", "draft", "draft-redundant", "draft-redundant-sapo"):
        info[role]["val_accuracy_100"] = accuracy(os.path.join(assets.ASSETS_DIR, f"synthetic-{role}"), 100)
    info["seconds"]["evaluation"] = round(time.perf_counter() - t, 1)
    info["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    info["assets_mb"] = round(sum(folder_mb(os.path.join(assets.ASSETS_DIR, f"synthetic-{r}"))
                                  for r in assets.NAMES), 2)
    with open(os.path.join(assets.ASSETS_DIR, "build_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

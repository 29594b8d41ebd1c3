"""`dreamr` command line (thin: parse arguments, call the library): every job of the project.

    dreamr generate | reason | eval | demo | project | calibrate | quantize | train sft | train sapo

The launchers in `train/` and `infer/` (what a pod or cluster script runs: `python train/sapo.py
--config ...`) are `launch(<command>)` of this module.
"""

from __future__ import annotations

import argparse
import os
import sys

from .distributed import add_distributed_arguments


def _generate(args):
    import dreamr_jax as dr

    model = dr.load_model(args.model, dtype=args.dtype)
    proc = dr.load_processor(args.model)
    out = dr.generate(model, proc, [args.prompt], images=[args.image] if args.image else None,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, stop=tuple(args.stop), seed=args.seed)
    print(out.texts[0])
    if args.verbose:
        print(f"[{len(out.token_ids[0])} tokens, finish: {out.finish_reasons[0]}]", file=sys.stderr)


def _projection(args):
    """`--project HW:DRAFT:TARGET` (with `--project-devices D:T`) of `eval` / `demo`, looked up
    in the cost model before any work; None without `--project`."""
    from .projection import Projection, ProjectionError

    if not args.project:
        if args.project_devices is not None:
            raise ProjectionError("--project-devices needs --project HW:DRAFT:TARGET")
        return None
    return Projection.parse(args.project, args.project_devices or "1:1").resolve()


def _demo(args):
    from .demo import DEFAULT_CONFIG, run_demo

    projection = _projection(args)
    run_demo(args.out, count=args.count, config=args.config or DEFAULT_CONFIG, fresh=not args.resume,
             projection=projection)


def _reasoner(cfg):
    from .sharding import split_devices
    from .speculative import SpeculativeReasoner

    draft_devices, target_devices = split_devices(cfg.draft_devices, cfg.target_devices)
    return SpeculativeReasoner(draft=cfg.draft, target=cfg.target, config=cfg.spec, dtype=cfg.dtype,
                               draft_devices=draft_devices, target_devices=target_devices,
                               draft_parallelism=cfg.draft_parallelism, target_parallelism=cfg.target_parallelism)


# `reason` and `eval` check every input (names, numbers, paths, the data file) before a model
# loads: a mistake costs a second, not the minutes of loading a large pair.


def _reason(args):
    from .config import load_config
    from .evaluate import check_methods

    cfg = load_config(args.config, args.set)
    method = args.method or cfg.spec.method
    check_methods([method], has_draft=cfg.draft is not None, flag="--method", pair=args.config)
    if args.image and not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such image file")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder):
            raise ValueError(f"--json {args.json}: " + ("is a folder" if os.path.isdir(args.json)
                                                      else f"its folder {folder} does not exist"))
    reasoner = _reasoner(cfg)
    trace = reasoner.solve(args.question, image=args.image, method=method)
    for i, step in enumerate(trace.steps, 1):
        rho = "" if step.rho is None else f" rho={step.rho:.3f}"
        print(f"--- step {i} [{step.author}{rho}, {step.num_tokens} tokens]\n{step.text.strip()}")
    acc = trace.acceptance_rate
    print(f"\nanswer: {trace.answer}  (finish: {trace.finish_reason}; {trace.num_tokens} tokens; "
          f"{trace.wall_time:.2f} s, projected {trace.extra['projected_time']:.2f} s; "
          f"acceptance {'-' if acc is None else f'{100 * acc:.1f}%'})")
    if args.json:
        with open(args.json, "w") as f:
            f.write(trace.to_json())


def _eval(args):
    from .config import load_config
    from .evaluate import check_methods, check_out_dir, locked_out_dir, read_records, run_eval

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods names no method")
    check_methods(methods, flag="--methods")
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: every record), got {args.limit}")
    if args.warmup_records < 0:
        raise ValueError(f"--warmup-records must be >= 0, got {args.warmup_records}")
    check_out_dir(args.out)
    projection = _projection(args)
    records = read_records(args.data)[: args.limit or None]
    if not records:
        raise ValueError(f"{args.data}: holds no records")
    cfg = load_config(args.config, args.set)
    check_methods(["target"] + methods, has_draft=cfg.draft is not None, pair=args.config)  # eval always runs target
    with locked_out_dir(args.out):  # before the models load: a second run on --out fails at once
        run_eval(_reasoner(cfg), records, methods, args.out, warmup=args.warmup,
                 warmup_records=args.warmup_records, fresh=args.fresh, projection=projection)


def _calibrate(args):
    from .calibrate import measure
    from .costmodel import model_spec, save_hardware

    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {args.out}: folder {folder} does not exist")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    models = [model_spec(m) for m in args.models.split(",") if m] if args.models else []  # (bad names fail here)
    hw = measure(args.name, repeats=args.repeats, models=models)
    save_hardware(hw, args.out)
    print(f"{args.out}: {hw.notes}")


def _project(args):
    """`dreamr project`: a results file's traces replayed on other hardware with other models.
    Every input is checked before a trace is priced: the device counts and output paths, the
    results file, the hardware and models (the cost model's errors), the rows (solved `target`
    rows, traces with call shapes) and that both models fit with the longest context."""
    import json

    from .speculative.results import write_text
    from .projection import (Projection, ProjectionError, check_output_path, format_table, plot_projected_speedup,
                             read_result_rows, to_json)

    for flag, n in (("--draft-devices", args.draft_devices), ("--target-devices", args.target_devices)):
        if n < 1:
            raise ProjectionError(f"{flag} must be >= 1, got {n}")
    plot = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.results)), "projected_speedup.png")
    check_output_path(args.json, "--json")
    check_output_path(plot, "--plot")
    projection = Projection(args.hardware, args.draft, args.target, args.draft_devices, args.target_devices)
    rows = read_result_rows(args.results)
    projection.resolve()
    summaries = projection.project(rows, source=args.results)
    print(format_table(summaries))
    print(projection.assumptions())
    if args.json:
        write_text(args.json,
                   json.dumps(to_json(summaries, projection, args.results), indent=2, allow_nan=False) + "\n")
        print(f"json: {args.json}")
    draft = f", draft {args.draft} x{args.draft_devices}" if args.draft else ""
    plot_projected_speedup(summaries, plot, title=f"projected on {projection.label}: target {args.target} "
                                                  f"x{args.target_devices}{draft}")
    print(f"plot: {plot}")


def _calibration_texts(source: str, samples: int) -> list[str]:
    """`dreamr quantize --calib`: `world` (the embedded world's training problems with their
    solutions), a .txt file (one sample per line) or a .jsonl file (a "text" field, else
    "question" and "answer"); the first `samples` of them."""
    import json

    if source == "world":
        from .data import synthetic

        return [p.question + "\n" + "\n\n".join(p.steps) for p in synthetic.problems(0, "train", samples)]
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--calib: no file {source} (give a .txt or .jsonl file, or `world`)")
    texts = []
    with open(source) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if source.endswith(".jsonl"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source}:{n}: not JSON ({e})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{source}:{n}: not a JSON object")
                text = record.get("text") or " ".join(str(record.get(k, "")) for k in ("question", "answer")).strip()
                if not text:
                    raise ValueError(f"{source}:{n}: no 'text' (or 'question' / 'answer') field")
                texts.append(text)
            else:
                texts.append(line.rstrip("\n"))
            if len(texts) == samples:
                break
    return texts


def _quantize(args):
    """`dreamr quantize`: a dense checkpoint as AutoAWQ "gemm" int4 (`quant.quantize.quantize_checkpoint`)."""
    import time

    for flag, n in (("--group-size", args.group_size), ("--calib-samples", args.calib_samples),
                    ("--calib-tokens", args.calib_tokens), ("--n-grid", args.n_grid)):
        if n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    from .hub import resolve_checkpoint
    from .quant.quantize import quantize_checkpoint

    t0 = time.perf_counter()
    texts = _calibration_texts(args.calib, args.calib_samples) if args.calib else None
    stats = quantize_checkpoint(resolve_checkpoint(args.src), args.dst, group_size=args.group_size, calibration=texts,
                                calibration_tokens=args.calib_tokens, n_grid=args.n_grid, log=print)
    if stats["awq"]:
        scaled = [g for g in stats["awq"] if g["ratio"] is not None]
        gain = sum(g["loss"] for g in stats["awq"]) / max(sum(g["rtn_loss"] for g in stats["awq"]), 1e-30)
        print(f"AWQ: {len(scaled)} of {len(stats['awq'])} groups scaled; calibration output error "
              f"{gain:.3f}x that of round to nearest")
    print(f"quantized {stats['quantized']} linears (group size {args.group_size}), copied {stats['copied']} tensors, "
          f"max |W - dequant(W)| {stats['max_abs_error']:.3g}; {time.perf_counter() - t0:.1f} s -> {args.dst}")


def _train(args):
    """`dreamr train sft|sapo`: join the other processes (if any), read and check the config,
    train (resuming from output_dir's newest checkpoint), print a summary."""
    import json
    import time

    from .distributed import initialize_distributed

    # First: jax.distributed.initialize must come before anything starts a JAX backend.
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.cpu_collectives)
    if args.job == "sft":
        from .training.sft import load_sft_config as load, train
    else:
        from .training.sapo_trainer import load_sapo_config as load, train
    import jax

    cfg = load(args.config, args.overrides)
    t0 = time.perf_counter()
    out = train(cfg, stop_after=args.stop_after, progress=not args.no_progress)
    if jax.process_index() == 0:
        print(json.dumps({"steps": out["step"], "final": out["metrics"], "seconds": round(time.perf_counter() - t0, 1),
                          "export_dir": out.get("export_dir")}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamr", description="DREAM-R multimodal speculative reasoning in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from a Qwen-VL checkpoint for one prompt (and image)")
    g.add_argument("--model", required=True, help="checkpoint folder or hub id")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", default=None, help="image file")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); EOS always stops")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's dtype on accelerators, float32 on CPU")
    g.add_argument("-v", "--verbose", action="store_true")
    g.set_defaults(func=_generate)

    r = sub.add_parser("reason", help="solve one question with a draft/target pair")
    r.add_argument("--config", required=True, help="configs/<pair>.yaml")
    r.add_argument("--question", required=True)
    r.add_argument("--image", default=None)
    r.add_argument("--method", default=None, help="override the config's method")
    r.add_argument("--set", action="append", default=[], help="config override, e.g. spec.alpha=0.9")
    r.add_argument("--json", default=None, help="write the trace as JSON")
    r.set_defaults(func=_reason)

    e = sub.add_parser("eval", help="compare methods on a data set: table + plots")
    e.add_argument("--config", required=True)
    e.add_argument("--data", required=True, help="JSONL records {question, image?, answer?, id?}")
    e.add_argument("--methods", default="target,sd,specreason,lookahead,dreamr")
    e.add_argument("--out", default="out/eval")
    e.add_argument("--limit", type=int, default=0, help="the first N records (0: all)")
    e.add_argument("--fresh", action="store_true",
                   help="start a new results.jsonl (the old one is kept under a timestamped name) "
                        "instead of resuming it")
    e.add_argument("--no-warmup", dest="warmup", action="store_false")
    e.add_argument("--warmup-records", type=int, default=8,
                   help="records each method solves untimed first, to compile the shapes the run meets")
    e.add_argument("--set", action="append", default=[])
    _projection_options(e)
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="every method on the embedded world with the shipped pair (offline)")
    d.add_argument("--out", default="out/demo", help="table, plots and traces go here")
    d.add_argument("--count", type=int, default=100, help="synthetic test problems")
    d.add_argument("--config", default=None, help="pair config (default configs/synthetic.yaml)")
    d.add_argument("--resume", action="store_true",
                   help="resume an interrupted demo's results in --out (default: measure again, keeping the old "
                        "results.jsonl as results.<time>.jsonl)")
    _projection_options(d)
    d.set_defaults(func=_demo)

    j = sub.add_parser("project", help="replay a results file's traces on other hardware with other models "
                                       "(the cost model): projected latency and speedup per method")
    j.add_argument("--results", required=True, help="RUN/results.jsonl of dreamr eval / dreamr demo")
    j.add_argument("--hardware", required=True, help="a hardware preset (e.g. l40s) or a hardware JSON file")
    j.add_argument("--draft", default=None,
                   help="draft model: a preset (e.g. qwen3-vl-2b), a checkpoint folder, config.json or asset:draft "
                        "(needed when the traces have draft calls)")
    j.add_argument("--target", required=True, help="target model, e.g. qwen3-vl-32b:int4")
    j.add_argument("--draft-devices", type=int, default=1, help="devices the draft is sharded over")
    j.add_argument("--target-devices", type=int, default=1, help="devices the target is sharded over")
    j.add_argument("--json", default=None, help="write the projection per method as JSON")
    j.add_argument("--plot", default=None,
                   help="projected vs measured speedup plot (default: projected_speedup.png beside the results)")
    j.set_defaults(func=_project)

    c = sub.add_parser("calibrate", help="measure this machine for the cost model and write a hardware preset")
    c.add_argument("--out", required=True, help="JSON file for `dreamr project --hardware PATH`")
    c.add_argument("--name", default="this-cpu")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--models", default=None,
                   help="comma-separated models (presets, config folders, asset:target) whose weight shapes "
                        "the matmul table measures too, e.g. asset:target,asset:draft")
    c.set_defaults(func=_calibrate)

    q = sub.add_parser("quantize", help="a dense Qwen-VL checkpoint as AutoAWQ \"gemm\" int4 (AWQ scales, then "
                                        "round to nearest per group)",
                       description="Quantize every decoder projection to int4 (qweight / qzeros / scales), copy the "
                                   "rest and add the AWQ quantization_config; `dreamr_jax.load_model(DST)` keeps them "
                                   "at 4 bits. --calib adds AWQ's activation-aware scale search; without it every "
                                   "group is rounded to nearest as is. No calibration data is downloaded (give a "
                                   "file or world).")
    q.add_argument("src", help="dense checkpoint: folder (config.json + safetensors), hub id or asset:NAME")
    q.add_argument("dst", help="output folder")
    q.add_argument("--group-size", type=int, default=128,
                   help="input features per scale / zero (default 128; smaller for tiny models whose widths 128 "
                        "does not divide)")
    q.add_argument("--calib", default=None,
                   help="calibration texts for AWQ scaling: a .txt file (one per line), a .jsonl file (\"text\", "
                        "else \"question\" + \"answer\") or `world` (the embedded world's training problems)")
    q.add_argument("--calib-samples", type=int, default=128, help="calibration texts used (default 128)")
    q.add_argument("--calib-tokens", type=int, default=512, help="tokens per calibration text (default 512)")
    q.add_argument("--n-grid", type=int, default=20, help="scale exponents tried per group (default 20)")
    q.set_defaults(func=_quantize)

    t = sub.add_parser("train", help="train a model: sft (supervised fine-tuning) or sapo (GRPO of the draft)")
    jobs = t.add_subparsers(dest="job", required=True)
    for job, helptext, example in (
            ("sft", "supervised fine-tuning of a Qwen-VL model on the embedded world (solutions + CPN judging)",
             "steps=200 data.seq_len=256"),
            ("sapo", "SAPO: GRPO training of a DREAM-R draft against a frozen target", "steps=200 group_size=4"),
    ):
        j = jobs.add_parser(job, help=helptext, description=helptext + ". Rerunning the same command resumes from "
                                                                       "output_dir's newest checkpoint.")
        j.add_argument("--config", required=True, help=f"configs/{job}_*.yaml")
        j.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
        j.add_argument("--stop-after", type=int, help="stop after this global step (no export), as if killed")
        j.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_distributed_arguments(j)
        j.set_defaults(func=_train)
    return p


def _projection_options(parser) -> None:
    parser.add_argument("--project", default=None, metavar="HW:DRAFT:TARGET",
                        help="add a projected@HW speedup column: the run's traces replayed with every call priced "
                             "by the cost model for HW with these models (e.g. l40s:qwen3-vl-2b:qwen3-vl-32b:int4; "
                             "the target is everything after the second colon)")
    parser.add_argument("--project-devices", default=None, metavar="D:T",
                        help="devices of the draft and the target for --project (default 1:1)")


# Commands that run a draft and a target: on a CPU-only host each role gets its own CPU device
# (jax shows one by default, and one device runs its programs one after another), so FPSR's
# drafting and checking overlap. Set before jax starts; XLA_FLAGS that already name a device
# count win. The CPU backend only: on a GPU or TPU host the roles sit on the accelerators.
_ROLE_COMMANDS = ("reason", "eval", "demo")
CPU_ROLE_DEVICES = 2


def cpu_devices_for_roles(count: int = CPU_ROLE_DEVICES) -> bool:
    """Ask XLA for `count` host devices, if jax is not imported yet and no count is set.
    Returns whether the flag was set."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return True


def _reported_errors(command: str) -> tuple:
    """The errors a command reports in one line (a mistake in what it was given), not as a
    traceback. Training reports its settings' errors only: anything else in a long run is a
    fault whose traceback is wanted."""
    if command == "train":
        from .config import ConfigError

        return (ConfigError,)
    return (FileNotFoundError, ValueError)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in _ROLE_COMMANDS:
        cpu_devices_for_roles()
    try:
        args.func(args)
    except Exception as e:
        if not isinstance(e, _reported_errors(args.command)):
            raise
        print(f"dreamr: error: {e}", file=sys.stderr)
        return 2
    return 0


def launch(*command: str, argv=None) -> int:
    """`dreamr <command> <arguments>`, the arguments from this process's command line (or
    `argv`): what the launchers in train/ and infer/ call, e.g. `launch("train", "sapo")`."""
    return main([*command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

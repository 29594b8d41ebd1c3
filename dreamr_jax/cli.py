"""`dreamr` command line (thin: parse arguments, call the library)."""

from __future__ import annotations

import argparse
import sys


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


def _demo(args):
    from .demo import DEMO_DIR, run_demo

    run_demo(args.folder or DEMO_DIR, max_new_tokens=args.max_new_tokens)


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
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("-v", "--verbose", action="store_true")
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="run the embedded end-to-end demo (offline)")
    d.add_argument("--folder", default=None)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.set_defaults(func=_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"dreamr: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

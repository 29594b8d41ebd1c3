"""At what acceptance does `dreamr` reach a given speedup on named hardware? (issue 15, item 4)

    python scripts/project_acceptance.py [--hardware l40s] [--draft qwen3-vl-2b] \
        [--target qwen3-vl-32b:int4] [--draft-devices 2] [--target-devices 4] \
        [--step-tokens 60] [--context 1024] [--judge-tokens 21] [--speedups 2.5,3] [--json PATH]

Prices, with the cost model, the target's and the draft's decode per token and one check (a
step of `--step-tokens` plus the judging suffix, extending a `--context`-token cache), and
solves FPSR's steady-state model (`projection.steady_state_speedup`) for the acceptance at which
the speedup reaches each of `--speedups`; prints the speedup at a few acceptances too. This is
a model of the steady state, not a replay of traces: the prefill, the first step's latency and
the schedule's waits are left out (a replay of real traces, `dreamr project`, includes them).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default="l40s")
    parser.add_argument("--draft", default="qwen3-vl-2b")
    parser.add_argument("--target", default="qwen3-vl-32b:int4")
    parser.add_argument("--draft-devices", type=int, default=2)
    parser.add_argument("--target-devices", type=int, default=4)
    parser.add_argument("--step-tokens", type=int, default=60, help="tokens per reasoning step")
    parser.add_argument("--context", type=int, default=1024, help="tokens already in the cache (prompt + steps)")
    parser.add_argument("--judge-tokens", type=int, default=21, help="the judging suffix after each checked step")
    parser.add_argument("--speedups", default="2.5,3")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from dreamr_jax import costmodel
    from dreamr_jax.projection import acceptance_for, steady_state_speedup

    hw = costmodel.hardware(args.hardware)
    draft, target = costmodel.model_spec(args.draft), costmodel.model_spec(args.target)
    n = 64  # tokens per priced decode call: per-token cost without one call's fixed cost dominating
    t_d = costmodel.call_seconds(draft, hw, args.draft_devices, "decode", tokens=n, cached=args.context) / n
    t_t = costmodel.call_seconds(target, hw, args.target_devices, "decode", tokens=n, cached=args.context) / n
    t_c = costmodel.call_seconds(target, hw, args.target_devices, "extend", tokens=args.step_tokens + args.judge_tokens,
                                 cached=args.context)
    L = args.step_tokens
    table = {f"{a:.2f}": steady_state_speedup(a, t_d, t_t, t_c, L) for a in (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)}
    needed = {s: acceptance_for(float(s), t_d, t_t, t_c, L) for s in args.speedups.split(",")}
    print(f"{hw.name}: draft {draft.label} on {args.draft_devices}, target {target.label} on {args.target_devices}; "
          f"steps of {L} tokens at a {args.context}-token context, a {args.judge_tokens}-token judging suffix")
    print(f"per decoded token: draft {t_d * 1e3:.2f} ms, target {t_t * 1e3:.2f} ms; a check {t_c * 1e3:.2f} ms")
    print("speedup at acceptance: " + ", ".join(f"{a}: {s:.2f}x" for a, s in table.items()))
    for s, a in needed.items():
        print(f"{s}x needs acceptance " + (f"{a:.1%}" if a is not None else "beyond 100% (not reachable)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hw.name, "draft": draft.label, "target": target.label, "t_draft_s": t_d,
                       "t_target_s": t_t, "t_check_s": t_c, "step_tokens": L, "speedup_at": table,
                       "acceptance_needed": needed}, f, indent=2)


if __name__ == "__main__":
    main()

"""vLLM's side of `scripts/bench_vllm.py`: run by the vLLM venv's Python (never the project's; it
imports nothing of dreamr_jax), it loads one checkpoint with vLLM's CPU engine and answers
generate requests, one JSON object per line on stdin, one `RESULT {json}` line on stdout each.

    python scripts/vllm_worker.py FOLDER DTYPE MAX_MODEL_LEN

Request: {"rows": [[token ids], ...], "n": new tokens}. Answer: {"seconds": wall time of
`LLM.generate` (greedy, exactly n tokens, no detokenising), "tokens": [[ids], ...]}. An empty
line or end of input stops the worker. vLLM's own log goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    folder, dtype, max_model_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves far more than 8 short rows need
    from vllm import LLM, SamplingParams

    # token ids in, token ids out: no tokenizer, and no image inputs (the benchmark is text decode)
    llm = LLM(model=folder, dtype=dtype, skip_tokenizer_init=True, max_model_len=max_model_len,
              limit_mm_per_prompt={"image": 0, "video": 0}, seed=0)
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        params = SamplingParams(max_tokens=req["n"], min_tokens=req["n"], ignore_eos=True, temperature=0.0,
                                detokenize=False)
        prompts = [{"prompt_token_ids": list(r)} for r in req["rows"]]
        t0 = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in out]
        print("RESULT " + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
    return 0


if __name__ == "__main__":  # vLLM's engine starts processes of its own: only under this guard
    sys.exit(main())

"""Where a compiled decode step spends its time: its HLO instructions, each put in one category
(the logits matmul, reductions over the vocabulary, layer matmuls, KV cache traffic, the rest)
by its shapes and metadata, and their times from a jax.profiler trace of XLA:CPU's thunks.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time

OP_CATEGORIES = ("logits matmul", "argmax / log_softmax over the vocabulary", "layer matmuls (q/k/v/o, MLP)",
                 "KV cache: writes, copies, attention over the allocated slots", "other (norms, rotary, residuals)")


def instructions(hlo_text: str) -> dict:
    """{instruction name: [opcode, [output dims...], op_name metadata, [operand dims...]]} of a
    compiled HLO module (`compiled.as_text()`)."""
    out = {}
    for ln in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(([^)]*)\)", ln)
        if not m:
            continue
        dims = [[int(x) for x in d.split(",") if x] for d in re.findall(r"\[([\d,]*)\]", m.group(2))]
        operands = re.findall(r"%([\w.\-]+)", m.group(4))
        meta = re.search(r'op_name="([^"]+)"', ln)
        out[m.group(1)] = [m.group(3), dims, meta.group(1) if meta else "", operands]
    for v in out.values():  # operands' output dims (instructions of the same computation)
        v[3] = [d for o in v[3] if o in out for d in out[o][1]]
    return out


def categorize(info, vocab: int, cache_len: int) -> str:
    """The OP_CATEGORIES entry of one `instructions` value, for a step with a `vocab`-wide output
    and a KV cache of `cache_len` slots."""
    opcode, dims, op_name, operand_dims = info
    flat = [x for d in dims for x in d]
    if vocab in flat and (opcode == "dot" or "dot" in op_name):
        return OP_CATEGORIES[0]
    if (vocab in flat and "take" not in op_name) or any(d and d[-1] == vocab for d in operand_dims):
        return OP_CATEGORIES[1]  # reads the (B, V) logits (the embedding table is (V, E): its gather is "other")
    if any(len(d) >= 3 and cache_len in d for d in dims + operand_dims) or "scatter" in op_name:
        return OP_CATEGORIES[3]
    if opcode == "dot" or "dot_general" in op_name:
        return OP_CATEGORIES[2]
    return OP_CATEGORIES[4]


def op_times(run, names, calls: int) -> tuple[dict, float] | None:
    """({instruction name: ms per call}, wall seconds per call) of `calls` calls of `run()` under a
    jax.profiler trace, counting only the events named in `names` (the instructions of the program
    `run` executes). The calls are dispatched back to back and the last one's result blocked on,
    as a decode loop runs them. None when this jax has no profile reader or the trace wrote nothing."""
    import jax

    try:
        from jax.profiler import ProfileData
    except ImportError:
        return None
    per_op: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dreamr_trace_") as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        last = None
        for _ in range(calls):
            last = run()
        jax.block_until_ready(last)
        wall = (time.perf_counter() - t0) / calls
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return None
        data = ProfileData.from_file(files[0])
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in names:
                        per_op[ev.name] = per_op.get(ev.name, 0.0) + ev.duration_ns / 1e6 / calls
    return per_op, wall


def categorized(per_op: dict, info: dict, vocab: int, cache_len: int, top: int = 8) -> dict:
    """Per-op times summed per OP_CATEGORIES entry (`categories_ms`, `ops_ms`), and the `top`
    slowest instructions with their shapes."""
    cats = {c: 0.0 for c in OP_CATEGORIES}
    for name, ms in per_op.items():
        cats[categorize(info[name], vocab, cache_len)] += ms
    slowest = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return dict(ops_ms=sum(per_op.values()), categories_ms=cats,
                top_ops=[dict(name=n, ms=ms, opcode=info[n][0], shape=info[n][1], op_name=info[n][2],
                              category=categorize(info[n], vocab, cache_len)) for n, ms in slowest])


def fusion_count(hlo_text: str) -> int:
    """Fusions in a compiled module: a fused dequantize-and-dot is one, an expanded weight more."""
    return hlo_text.count(" fusion(")


def gemm_calls(hlo_text: str) -> int:
    """Library GEMM calls (cuBLAS, Triton GEMM) in a compiled GPU module."""
    return hlo_text.count("__cublas") + hlo_text.count("triton_gemm")

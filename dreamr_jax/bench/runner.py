"""One measurement per process: a module-level function called in a fresh Python process, its
progress lines streamed to this one, its result (a JSON-able dict) sent back.

A fresh process frees everything the last measurement held (a 32B model's device memory is gone
before the next one is built) and keeps one measurement's crash or hang from losing the others:
a failure or a timeout comes back as {"error": ...}, never as an exception.

    python -m dreamr_jax.bench.runner MODULE:FUNCTION 'JSON KWARGS'    # what `run` starts
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time

RESULT = "RESULT "  # the line that carries a worker's result
PROGRESS = "  | "  # lines starting so are streamed to the parent's log as they come


def stage(msg: str) -> None:
    """Progress inside a measurement (streamed to the parent's log when it runs in a child), so a
    slow build or compile shows where it is."""
    print(f"{PROGRESS}{time.strftime('%H:%M:%S')} {msg}", flush=True)


def resolve(target: str):
    """The function named by "package.module:function"."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def package_root() -> str:
    """The folder holding the dreamr_jax package this process imported: a child started with it
    on PYTHONPATH imports the same copy (an installed package and a checkout may differ)."""
    import dreamr_jax

    return os.path.dirname(os.path.dirname(os.path.abspath(dreamr_jax.__file__)))


def run(target: str, kwargs: dict, *, inline: bool = False, timeout: float = 300.0, env: dict | None = None,
        label: str = "", log=print) -> dict:
    """`target(**kwargs)` ("package.module:function", returning a JSON-able dict) in a fresh process
    (in this one when `inline`), with `env` added to the child's environment; `wall_s` is added to
    the result. Failures and timeouts come back as {"error": "..."} and are logged under `label`."""
    t0 = time.perf_counter()
    try:
        res = resolve(target)(**kwargs) if inline else _in_child(target, kwargs, timeout, env or {}, log)
    except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
        log(f"  !! {label or target} failed: {type(e).__name__}: {str(e)[-1500:]}")
        return dict(error=f"{type(e).__name__}: {str(e)[-3000:]}")
    res["wall_s"] = time.perf_counter() - t0
    return res


def _in_child(target: str, kwargs: dict, timeout: float, env: dict, log) -> dict:
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "dreamr_jax.bench.runner", target, json.dumps(kwargs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env)
    # The watchdog kills a child that passes the timeout even while it prints nothing.
    fired = threading.Event()

    def kill():
        fired.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    result, tail = None, []
    try:
        for line in proc.stdout:  # streamed: progress lines as they come
            line = line.rstrip("\n")
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
            elif line.startswith(PROGRESS):
                log(line)
            else:
                tail = (tail + [line])[-30:]
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # the parent is leaving (an exception): the child goes with it
            proc.kill()
            proc.wait()
    if fired.is_set():
        raise TimeoutError(f"measurement passed its timeout of {timeout} s; last output: " + "\n".join(tail[-10:]))
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"worker exited {proc.returncode}: " + "\n".join(tail))
    return result


def main(argv=None) -> int:
    target, kwargs = (argv or sys.argv[1:])[:2]
    print(RESULT + json.dumps(resolve(target)(**json.loads(kwargs))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

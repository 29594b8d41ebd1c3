"""Counting XLA compilations, so a timed pass can say it ran none (or how many, and how long).

jax reports every backend compilation through `jax.monitoring`; one process-wide listener
keeps a running count and total time, read before and after the code to be measured.
"""

from __future__ import annotations

import threading

import jax

# The event jax emits once per backend compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT;
# spelled out here rather than imported from a private module).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_lock = threading.Lock()
_count = 0
_seconds = 0.0
_installed = False


def _listener(event: str, duration: float, **_) -> None:
    global _count, _seconds
    if event == BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1
            _seconds += duration


def install() -> None:
    """Start counting (idempotent)."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def totals() -> tuple[int, float]:
    """(compilations, seconds spent compiling) since `install()`."""
    install()
    with _lock:
        return _count, _seconds

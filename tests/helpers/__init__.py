"""Helpers shared by the tests (pyproject's `pythonpath = ["tests"]` puts this package on the
path, so test files and the scripts they start in subprocesses import `helpers.<module>`):

- `helpers.models`: tiny Qwen-VL config dicts, transformers twins, image prompts, logits of both;
- `helpers.speculative`: the speculative tests' settings, reasoners and the sequential FPSR oracle;
- `helpers.training`: the tiny world model's size, the SFT and SAPO runs the trainer tests share.

Fixtures stay in the conftest.py files; no test module imports another."""

from __future__ import annotations

import os

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # put on sys.path by a subprocess
REPO_ROOT = os.path.dirname(TESTS_DIR)

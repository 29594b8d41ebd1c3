"""The speculative tests' tiny draft/target pair (real Qwen vocabulary), loaded once for the
whole folder, the reasoners that reject or accept every drafted step, their greedy reference
traces, and an image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import dreamr_jax as dr
from dreamr_jax.bench.models import build_spec_model

from helpers.speculative import QUESTION, make_reasoner


@pytest.fixture(scope="package")
def spec_pair(tmp_path_factory):
    """(draft folder, target folder): tiny Qwen3-VL checkpoints with the real Qwen tokenizer."""
    root = tmp_path_factory.mktemp("spec_pair")
    target = build_spec_model(str(root / "target"), seed=1, hidden=64, layers=2)
    draft = build_spec_model(str(root / "draft"), seed=1, hidden=64, layers=1)
    return draft, target


@pytest.fixture(scope="package")
def loaded(spec_pair):
    draft, target = spec_pair
    return dr.load_model(draft), dr.load_model(target), dr.load_processor(target)


@pytest.fixture(scope="package")
def reject_all(loaded):
    return make_reasoner(loaded, alpha=float("inf"), specreason_threshold=10, lookahead_judge="never")


@pytest.fixture(scope="package")
def accept_all(loaded):
    return make_reasoner(loaded, alpha=0.0, specreason_threshold=0, lookahead_judge="always")


@pytest.fixture(scope="package")
def refs(reject_all):
    """Greedy target-alone and draft-alone traces of QUESTION."""
    return {m: reject_all.solve(QUESTION, method=m) for m in ("target", "draft")}


@pytest.fixture(scope="package")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "figure.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return str(path)

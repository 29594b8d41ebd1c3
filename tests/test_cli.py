"""The demo checkpoint (random weights, real tokenizer) through `dreamr generate` end to end,
and the exported checkpoint read back by transformers."""

import os

import numpy as np
import pytest
import torch
import transformers

import dreamr_jax as dr
from dreamr_jax.cli import main
from dreamr_jax.demo import build_demo_checkpoint, demo_image


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return build_demo_checkpoint(str(tmp_path_factory.mktemp("demo")))


def test_generate_command(demo_folder, capsys):
    image = demo_image(os.path.join(demo_folder, "x.png"))
    rc = main(["generate", "--model", demo_folder, "--image", image, "--prompt", "Count the shapes.",
               "--max-new-tokens", "6", "-v"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "6 tokens" in err or "finish: stop" in err


def test_generate_command_reports_bad_paths(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err


def test_exported_checkpoint_loads_in_transformers(demo_folder):
    """save_state writes what transformers reads: logits of both agree."""
    ours = dr.load_model(demo_folder)
    ref = transformers.Qwen3VLForConditionalGeneration.from_pretrained(demo_folder, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 151000, (1, 12))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(dr.forward(ours, ids))
    assert np.abs(got - want).max() < 1e-4

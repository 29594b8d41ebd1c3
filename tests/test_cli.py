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


# ---- the front door: every job is a `dreamr` command; train/ and infer/ launch them --------------------

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_every_job_is_a_command():
    from dreamr_jax.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"generate", "reason", "eval", "demo", "project", "calibrate", "quantize", "train"}
    jobs = next(a for a in sub.choices["train"]._actions if a.dest == "job")
    assert set(jobs.choices) == {"sft", "sapo"}


@pytest.mark.parametrize("launcher,usage", [
    ("train/sft.py", "dreamr train sft"), ("train/sapo.py", "dreamr train sapo"), ("infer/eval.py", "dreamr eval"),
    ("infer/reason.py", "dreamr reason"), ("infer/demo.py", "dreamr demo"), ("scripts/quantize.py", "dreamr quantize"),
])
def test_launchers_are_the_commands(launcher, usage):
    """A cluster script's `python train/sapo.py --config ...` is `dreamr train sapo --config ...`."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.join(ROOT, launcher), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {usage} ")


def test_training_commands_report_bad_settings(capsys):
    """A setting that does not fit is one line naming it (exit 2), before anything loads."""
    for job, config, bad, key in (("sft", "sft_synthetic_target.yaml", "batch_size=0", "batch_size"),
                                  ("sapo", "sapo_synthetic.yaml", "group_size=1", "group_size"),
                                  ("sapo", "sapo_synthetic.yaml", "stepz=3", "stepz")):
        assert main(["train", job, "--config", os.path.join(ROOT, "configs", config), bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dreamr: error: ") and key in err and "Traceback" not in err, err
    assert main(["train", "sft", "--config", os.path.join(ROOT, "configs", "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_quantize_command_checks_its_inputs_first(tmp_path, capsys):
    assert main(["quantize", "asset:target", str(tmp_path / "q"), "--group-size", "0"]) == 2
    assert "--group-size must be >= 1" in capsys.readouterr().err
    assert main(["quantize", "asset:target", str(tmp_path / "q"), "--calib", str(tmp_path / "none.txt")]) == 2
    assert "--calib: no file" in capsys.readouterr().err
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "one"}\n[1, 2]\n')
    assert main(["quantize", "asset:target", str(tmp_path / "q"), "--calib", str(bad)]) == 2
    assert f"{bad}:2: not a JSON object" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "q")


def test_one_process_does_not_initialize_distributed(monkeypatch):
    """Without flags or the cluster environment a job stays one process (no coordinator is sought)."""
    from dreamr_jax.distributed import initialize_distributed

    for name in ("DREAMR_MULTIHOST", "JAX_COORDINATOR_ADDRESS", "DREAMR_NUM_PROCESSES", "DREAMR_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False

"""The SFT trainer: its loss against a reference written from the formula, the learning-rate
schedule, exact resume after a stop at a checkpoint, and data parallelism over 2 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

import dreamr_jax as dr
from dreamr_jax import assets
from dreamr_jax.data.pipeline import DataConfig, WorldEncoder, collate
from dreamr_jax.training.sft import SFTConfig, load_sft_config, make_optimizer, train, weighted_loss

from helpers import TESTS_DIR
from helpers.training import tiny_sft_config


_cfg = tiny_sft_config


def test_weighted_loss_matches_reference(tiny_world_model):
    """Cross-entropy from `dr.forward` logits (the inference path), weighted in numpy."""
    proc = dr.load_processor(tokenizer_path=assets.path("tokenizer"))
    enc = WorldEncoder(proc, DataConfig(judging_fraction=0.5, seq_len=160))
    examples = [enc.example(i) for i in range(4)]
    host = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch = jax.tree.map(np.asarray, collate(host, tiny_world_model.cfg))
    loss, metrics = weighted_loss(tiny_world_model, batch, enc.positive_id, enc.negative_id)

    logits = np.asarray(dr.forward(tiny_world_model, host["input_ids"], batch["valid"],
                                   host["pixel_values"].reshape(-1, host["pixel_values"].shape[-1]),
                                   host["image_grid_thw"]), np.float64)
    logp = (logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True))
    total, weight = 0.0, 0.0
    judged, correct = 0, 0
    for b, e in enumerate(examples):
        n = int(e["length"])
        for t in range(1, n):
            total -= e["weights"][t] * logp[b, t - 1, e["input_ids"][t]]
            weight += e["weights"][t]
        if e["verdict_label"] >= 0:
            judged += 1
            z = logits[b, int(e["verdict_pos"]) - 1]
            correct += int((z[enc.positive_id] > z[enc.negative_id]) == bool(e["verdict_label"]))
    assert judged > 0
    np.testing.assert_allclose(float(loss), total / weight, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["verdict_accuracy"]), correct / judged)


def test_optimizer_applies_warmup_then_cosine_decay():
    """The learning rate the optimizer actually applies, against the schedule written out:
    with a constant gradient Adam's normalised step is 1, so update s equals -lr(s - 1)."""
    import math

    cfg = SFTConfig(output_dir="x", tokenizer="x", steps=20, warmup_steps=5, learning_rate=1e-2, end_lr_ratio=0.1,
                    weight_decay=0.0, clip_norm=1e9)
    tx = make_optimizer(cfg)
    params = {"w": np.zeros(3, np.float32)}
    state = tx.init(params)
    grads = {"w": np.full(3, 0.5, np.float32)}

    def lr(count):  # linear warmup from 0 over 5 updates, cosine to 1e-3 at 20
        if count < 5:
            return 1e-2 * count / 5
        return 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (count - 5) / 15))

    for s in range(1, 21):
        updates, state = tx.update(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -lr(s - 1), rtol=1e-5, atol=1e-9)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("output_dir: a\ntokenizer: b\ndata: {seq_len: 99}\nsteps: 5\n")
    cfg = load_sft_config(str(path), ["steps=7", "data.judging_fraction=0.25"])
    assert cfg.steps == 7 and cfg.data.seq_len == 99 and cfg.data.judging_fraction == 0.25
    # YAML reads "1e-3" as a string; a float field must still get the number.
    assert load_sft_config(str(path), ["learning_rate=1e-3"]).learning_rate == 0.001
    path.write_text("output_dir: a\ntokenizer: b\nstepz: 5\n")
    from dreamr_jax.config import ConfigError

    with pytest.raises(ConfigError, match="stepz"):
        load_sft_config(str(path))
    path.write_text("output_dir: a\ntokenizer: b\n")
    with pytest.raises(ConfigError, match="learning_rate must be a number"):
        load_sft_config(str(path), ["learning_rate=fast"])
    for key in ("redundant_habits", "redundant_share"):  # shares, named when out of [0, 1]
        assert getattr(load_sft_config(str(path), [f"data.{key}=0.7"]).data, key) == 0.7
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_sft_config(str(path), [f"data.{key}=1.5"])


def test_resume_is_exact(tmp_path):
    """A run stopped right after its step-2 checkpoint and resumed reports the same step-3 and
    step-4 metrics, and ends with the same weights, as one never stopped."""
    straight = train(_cfg(tmp_path / "a"), progress=False)
    stopped = train(_cfg(tmp_path / "b"), progress=False, stop_after=2)
    assert stopped["step"] == 2
    resumed = train(_cfg(tmp_path / "b"), progress=False)
    a = {r["step"]: r for r in straight["history"]}
    b = {r["step"]: r for r in resumed["history"]}
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "verdict_accuracy", "token_accuracy", "learning_rate"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    wa = jax.tree.leaves(nnx.state(straight["model"]))
    wb = jax.tree.leaves(nnx.state(resumed["model"]))
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # metrics.jsonl holds each step once, and the exported checkpoint loads.
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    model = dr.load_model(str(tmp_path / "b" / "hf"))
    assert model.cfg.text.num_hidden_layers == 1
    dr.load_processor(str(tmp_path / "b" / "hf"))


def test_worker_processes_and_time_limit(tmp_path):
    """grain worker processes feed the same batches as the prefetch thread; a run that hits its
    time limit checkpoints and exports like a finished one, and rerunning it resumes exactly."""
    threads = train(_cfg(tmp_path / "a", steps=2), progress=False, export=False)
    timed = train(_cfg(tmp_path / "b", steps=2, data_workers=2, time_limit_s=0.0), progress=False)
    assert timed["step"] == 1 and os.path.exists(tmp_path / "b" / "hf" / "model.safetensors")
    resumed = train(_cfg(tmp_path / "b", steps=2, data_workers=2), progress=False, export=False)
    a = {r["step"]: r for r in threads["history"]}
    b = {r["step"]: r for r in timed["history"] + resumed["history"]}
    assert sorted(b) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "grad_norm", "verdict_accuracy", "token_accuracy"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


@pytest.mark.skipif(sys.platform != "linux", reason="fake CPU devices")
def test_data_parallel_matches_one_device(tmp_path):
    """Two steps on a 2-device data mesh (fake CPU devices), with the weights and AdamW state
    replicated or split (FSDP), give the one-device losses; the FSDP run's export (gathered)
    holds its trained weights."""
    script = textwrap.dedent(f"""
        import os, sys, json
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[1]
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
        import numpy as np
        from flax import nnx
        sys.path.insert(0, {TESTS_DIR!r})
        import dreamr_jax as dr
        import dreamr_jax.sharding
        from helpers.training import tiny_sft_config as _cfg
        from dreamr_jax.training.sft import train
        dreamr_jax.sharding.FSDP_MIN_ELEMENTS = 256  # split the tiny model's matrices too
        out = train(_cfg(sys.argv[2], steps=2, checkpoint_every=100, sharding=sys.argv[3]), progress=False,
                    export=sys.argv[3] == "fsdp")
        state = jax.tree.leaves(nnx.state(out["model"]))
        share = sum(x.addressable_shards[0].data.nbytes for x in state) / sum(x.nbytes for x in state)
        exported = None
        if sys.argv[3] == "fsdp":
            got = jax.tree.leaves(nnx.state(dr.load_model(os.path.join(sys.argv[2], "hf")), nnx.Param))
            want = jax.tree.leaves(nnx.state(out["model"], nnx.Param))
            exported = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                           for a, b in zip(got, want))
        print(json.dumps({{"devices": jax.device_count(), "loss": [r["loss"] for r in out["history"]],
                          "share": share, "export_err": exported}}))
    """)
    results = {}
    for n, sharding in ((1, "replicate"), (2, "replicate"), (2, "fsdp")):
        proc = subprocess.run([sys.executable, "-c", script, str(n), str(tmp_path / f"{sharding}{n}"), sharding],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n, sharding] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results[2, "replicate"]["devices"] == 2 and results[2, "replicate"]["share"] == 1.0
    np.testing.assert_allclose(results[2, "replicate"]["loss"], results[1, "replicate"]["loss"], rtol=2e-5)
    np.testing.assert_allclose(results[2, "fsdp"]["loss"], results[1, "replicate"]["loss"], rtol=2e-5)
    assert results[2, "fsdp"]["share"] < 0.55, results[2, "fsdp"]
    assert results[2, "fsdp"]["export_err"] < 1e-3  # exported as float16 (export_dtype)

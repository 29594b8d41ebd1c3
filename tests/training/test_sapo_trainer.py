"""The SAPO trainer: a short run on a tiny task raises the mean reward, a stopped and resumed
run repeats the next steps' metrics bit for bit, two processes (JAX's CPU collectives) train
in step with identical parameters, and the configs load."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from dreamr_jax.config import ConfigError, load_config
from dreamr_jax.training.sapo_trainer import SAPOConfig, SAPOData, load_sapo_config, make_optimizer, train

from helpers import REPO_ROOT, TESTS_DIR
from helpers.training import task_reward, tiny_sapo_config as _cfg

ROOT = REPO_ROOT


def test_short_run_raises_the_mean_reward(tmp_path, tiny_world_pair):
    out = train(_cfg(tmp_path, tiny_world_pair, steps=24, warmup_steps=0, checkpoint_every=100), progress=False,
                extra_reward=task_reward, export=False)
    rewards = [row["reward"] for row in out["history"]]
    # Recomputed from the formula: only the extra term has weight.
    for row in out["history"]:
        assert row["reward"] == pytest.approx(row["reward_extra"], abs=1e-6)
        for key in ("reward_outcome", "reward_draft", "reward_length", "acceptance_rate", "response_length", "kl",
                    "clip_fraction", "rollout_tokens_per_s", "update_tokens_per_s", "grad_norm"):
            assert np.isfinite(row[key]), key
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > first + 0.1, rewards
    # The policy moved away from the frozen reference as it learned.
    assert out["history"][-1]["kl"] > out["history"][0]["kl"]


def test_resume_is_exact(tmp_path, tiny_world_pair):
    """A run killed after step 2 leaves its step-2 checkpoint and maybe metric lines past it;
    resumed from there it reports the same step-3 metrics and ends with the same weights as
    the run never stopped; metrics.jsonl then holds each step once. (The killed run's files
    are made from the straight run's: its step-2 checkpoint is the same state, and making
    them by a third run would only add one more compile of everything.)"""
    import shutil

    kw = dict(grpo_iterations=2, checkpoint_every=1, keep_checkpoints=3)
    straight = train(_cfg(tmp_path / "a", tiny_world_pair, **kw), progress=False, extra_reward=task_reward)
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")  # holds step 3 too
    resumed = train(_cfg(tmp_path / "b", tiny_world_pair, **kw), progress=False, extra_reward=task_reward)
    assert [r["step"] for r in resumed["history"]] == [3]
    timing = ("tokens_per_s", "_seconds")
    a, b = straight["history"][2], resumed["history"][0]
    keys = [k for k in a if not k.endswith(timing)]
    assert {"loss", "kl", "clip_fraction", "reward", "acceptance_rate", "grad_norm", "learning_rate"} <= set(keys)
    for key in keys:
        assert a[key] == b[key], (key, a[key], b[key])
    for x, y in zip(jax.tree.leaves(nnx.state(straight["policy"])), jax.tree.leaves(nnx.state(resumed["policy"]))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[2]["loss"] == b["loss"]
    assert os.listdir(tmp_path / "b" / "tensorboard")
    # The trained draft is exported as a checkpoint that loads.
    import dreamr_jax as dr

    exported = dr.load_model(str(tmp_path / "b" / "hf"))
    for x, y in zip(jax.tree.leaves(nnx.state(exported, nnx.Param)),
                    jax.tree.leaves(nnx.state(resumed["policy"], nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="CPU collectives")
@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_two_processes_train_in_step(tmp_path, tiny_world_pair, sharding):
    """Two processes (one CPU device each, gloo collectives) share a 2-device draft mesh: each
    samples rollouts for its own prompt, the update is global, and after two steps (with a
    checkpoint in between) both hold bit-identical parameters that differ from the start. With
    FSDP each process holds half of the split arrays, and gathers them for its rollouts."""
    script = textwrap.dedent(f"""
        import hashlib, json, sys
        import jax
        from dreamr_jax.distributed import initialize_distributed
        initialize_distributed(sys.argv[1], 2, int(sys.argv[2]), "gloo")
        jax.config.update("jax_default_matmul_precision", "highest")
        import numpy as np
        from flax import nnx
        sys.path.insert(0, {TESTS_DIR!r})
        from helpers.training import task_reward, tiny_sapo_config as _cfg
        import dreamr_jax.sharding
        from dreamr_jax.sharding import gather_whole, local_copy
        from dreamr_jax.training.sapo_trainer import train
        dreamr_jax.sharding.FSDP_MIN_ELEMENTS = 256  # split the tiny draft's matrices too
        cfg = _cfg(sys.argv[3], json.loads(sys.argv[4]), steps=2, group_size=4, checkpoint_every=1, warmup_steps=0,
                   draft_sharding=sys.argv[5])
        res = train(cfg, progress=False, extra_reward=task_reward, export=False)
        leaves = jax.tree.leaves(nnx.state(res["policy"]))
        share = sum(x.addressable_shards[0].data.nbytes for x in leaves) / sum(x.nbytes for x in leaves)
        mesh = dreamr_jax.sharding.role_mesh(jax.devices())
        state = nnx.state(local_copy(gather_whole(res["policy"], mesh)), nnx.Param)
        digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(state))).hexdigest()
        print(json.dumps({{"process": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
                          "digest": digest, "history": res["history"], "share": share}}))
    """)
    port = str(_free_port())
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", script, f"localhost:{port}", str(i), str(tmp_path / "run"),
                               json.dumps(list(tiny_world_pair)), sharding], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:  # a failed process leaves the other waiting on the coordinator
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["count"] == 2 and r["devices"] == 2 for r in results)
    assert results[0]["digest"] == results[1]["digest"]
    assert all((r["share"] < 0.55) == (sharding == "fsdp") for r in results), [r["share"] for r in results]
    for a, b in zip(results[0]["history"], results[1]["history"]):
        for key in ("loss", "kl", "grad_norm", "reward", "acceptance_rate", "response_length"):
            assert a[key] == b[key], key  # global values, computed once for both
    # Checkpoints of both steps (one data-iterator file per process) and one metrics file.
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["1", "2"]
    assert len([json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]) == 2
    # The parameters moved: a fresh single-process load of the draft differs.
    import dreamr_jax as dr

    start = jax.tree.leaves(nnx.state(dr.load_model(tiny_world_pair[1]), nnx.Param))
    import hashlib

    digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in start)).hexdigest()
    assert digest != results[0]["digest"]


FSDP_SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from flax import nnx
    sys.path.insert(0, sys.argv[1])
    import dreamr_jax as dr
    import dreamr_jax.sharding
    from helpers.training import task_reward, tiny_sapo_config as _cfg
    from dreamr_jax.training.sapo_trainer import train

    dreamr_jax.sharding.FSDP_MIN_ELEMENTS = 256  # split the tiny draft's matrices too
    root, pair = sys.argv[2], json.loads(sys.argv[3])

    def run(name, sharding, **kw):
        cfg = _cfg(os.path.join(root, name), pair, steps=2, group_size=4, checkpoint_every=1, warmup_steps=0,
                   draft_devices=2, draft_sharding=sharding, **kw)
        return train(cfg, progress=False, extra_reward=task_reward)

    def params(res):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(res["policy"], nnx.Param))]

    def split_share(tree):  # the first device's share of the bytes
        leaves = jax.tree.leaves(tree)
        return sum(x.addressable_shards[0].data.nbytes for x in leaves) / sum(x.nbytes for x in leaves)

    keys = ("loss", "kl", "grad_norm", "reward", "clip_fraction")
    dp, fsdp = run("dp", "replicate"), run("fsdp", "fsdp")
    # killed after step 1 and resumed: the fsdp run's checkpoint 1 holds split arrays
    os.makedirs(os.path.join(root, "resumed", "checkpoints"))
    shutil.copytree(os.path.join(root, "fsdp", "checkpoints", "1"), os.path.join(root, "resumed", "checkpoints", "1"))
    resumed = run("resumed", "fsdp")
    exported = dr.load_model(os.path.join(root, "fsdp", "hf"))
    print("RESULT " + json.dumps({
        "history": {name: [{k: r[k] for k in keys} for r in res["history"]]
                    for name, res in (("dp", dp), ("fsdp", fsdp), ("resumed", resumed))},
        "param_diff": max(float(np.abs(a - b).max()) for a, b in zip(params(dp), params(fsdp))),
        "resumed_equal": all(np.array_equal(a, b) for a, b in zip(params(fsdp), params(resumed))),
        "export_equal": all(np.array_equal(np.asarray(a), b) for a, b in
                            zip(jax.tree.leaves(nnx.state(exported, nnx.Param)), params(fsdp))),
        "share": {"dp": split_share(nnx.state(dp["policy"])), "fsdp": split_share(nnx.state(fsdp["policy"])),
                  "fsdp_embed": split_share(nnx.state(fsdp["policy"])["embed_tokens"]),
                  "fsdp_adam": split_share(nnx.state(fsdp["optimizer"], nnx.OptState))},
    }))
""")


def test_fsdp_draft_trains_like_data_parallel(tmp_path, tiny_world_pair):
    """The draft's weights and AdamW state split over 2 of 3 (fake CPU) devices: two steps give the
    data-parallel run's metrics and weights (up to reduction order), a run resumed from the split
    checkpoint repeats step 2 bit for bit, and the export (gathered) is the trained weights."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), TESTS_DIR, str(tmp_path),
                           json.dumps(list(tiny_world_pair))], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    hist = res["history"]
    print(f"\nfsdp vs data parallel: max weight difference {res['param_diff']:.2e}; per-device share of the "
          f"draft's bytes {res['share']}; {hist}")
    for a, b in zip(hist["dp"], hist["fsdp"]):
        for key, x in a.items():
            assert b[key] == pytest.approx(x, rel=1e-3, abs=1e-6), (key, a, b)
    assert res["param_diff"] < 1e-4
    assert hist["resumed"] == hist["fsdp"][1:]
    assert res["resumed_equal"] and res["export_equal"]
    share = res["share"]  # the moments stay split after the updates, like their weights
    assert share["dp"] == 1.0 and share["fsdp_embed"] == 0.5 and share["fsdp"] < 0.6 and share["fsdp_adam"] < 0.6


def test_configs_load_and_validate(tmp_path):
    cfg = load_sapo_config(os.path.join(ROOT, "configs", "sapo_synthetic.yaml"), ["steps=5", "data.world_size=10"])
    assert cfg.draft == "asset:draft" and cfg.target == "asset:target" and cfg.steps == 5
    assert cfg.data.sources == ("synthetic",) and cfg.data.world_size == 10
    assert cfg.spec.instruction == load_config(os.path.join(ROOT, "configs", "synthetic.yaml")).spec.instruction
    paper = load_sapo_config(os.path.join(ROOT, "configs", "sapo_qwen3vl-2b_qwen3vl-32b.yaml"))
    assert (paper.learning_rate, paper.batch_size, paper.dtype, paper.max_length) == (1e-6, 64, "bfloat16", 8192)
    assert paper.param_dtype == "float32" and paper.reward_weights == (1.0, 1.0, 1.0)
    assert set(paper.data.sources) == {"geo3k", "ocrvqa", "scienceqa"}
    assert (paper.group_size, paper.epsilon, paper.beta, paper.spec.alpha, paper.l_ref) == (8, 0.2, 0.01, 0.7, 1024)
    assert (paper.spec.draft_temperature, paper.spec.top_p) == (1.0, 1.0)
    with pytest.raises(ConfigError, match="group_sise"):
        load_sapo_config(os.path.join(ROOT, "configs", "sapo_synthetic.yaml"), ["group_sise=4"])
    with pytest.raises(ConfigError, match="sources"):
        load_sapo_config(os.path.join(ROOT, "configs", "sapo_synthetic.yaml"), ["data.sources=[mmlu]"])
    with pytest.raises(ConfigError, match="group_size"):
        load_sapo_config(os.path.join(ROOT, "configs", "sapo_synthetic.yaml"), ["group_size=1"])


def test_optimizer_schedule_per_training_step():
    """With a constant gradient Adam's normalised step is 1, so each update equals -lr: the
    warmup ramps per training step and the `grpo_iterations` updates of a step share its lr."""
    cfg = SAPOConfig(output_dir="x", draft="x", target="x", learning_rate=1e-2, warmup_steps=2, steps=6,
                     schedule="cosine", grpo_iterations=2, clip_norm=1e9)
    tx = make_optimizer(cfg)
    params = {"w": np.zeros(2, np.float32)}
    state = tx.init(params)
    lrs = []
    for _ in range(12):
        updates, state = tx.update({"w": np.full(2, 0.3, np.float32)}, state, params)
        lrs.append(-float(updates["w"][0]))
    import math

    want = [0.0, 0.005] + [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose(lrs, np.repeat(want, 2), rtol=1e-4, atol=1e-9)


def test_micro_batches_make_the_same_update(tiny_world_pair):
    """Gradients accumulated over two micro-batches (token-weighted) give the same optimizer
    steps and metrics as the whole batch at once, over two GRPO iterations."""
    import optax

    import dreamr_jax as dr
    from dreamr_jax.data import synthetic
    from dreamr_jax.training.rollouts import Rollout
    from dreamr_jax.training.sapo import GRPOSettings, policy_batch, update

    draft_dir = tiny_world_pair[1]
    proc = dr.load_processor(draft_dir)
    problems = list(synthetic.problems(0, "val", 2))
    prompts = [proc.encode(proc.user_prompt(p.question, 1), [p.image()]) for p in problems]
    tok = proc.tokenizer
    rollouts = [Rollout(g, prompts[g]["input_ids"], tok.encode("".join(s + "\n\n" for s in problems[g].steps[:k])),
                        [], [], None) for g, k in ((0, 1), (0, 3), (1, 2), (1, 4))]
    advantages = np.array([0.7, -0.7, -1.0, 1.0], np.float32)

    policy = dr.load_model(draft_dir)
    reference = nnx.clone(policy)  # same graph: one compile of the log-probs serves both
    start = jax.tree.map(lambda x: x, nnx.state(policy))

    def batch(rows):
        host = policy_batch(policy.cfg, [rollouts[i] for i in rows], prompts, proc.pad_token_id, width=128)
        return jax.tree.map(jax.numpy.asarray, dict(host, advantages=advantages[list(rows)]))

    # Plain SGD, so the comparison is of gradients (Adam would magnify rounding where v ~ 0).
    settings = GRPOSettings(group_size=2, grpo_iterations=2, logprob_chunk=16)
    results = []
    for batches in ([batch(range(4))], [batch([0, 1]), batch([2, 3])]):
        nnx.update(policy, start)
        optimizer = nnx.Optimizer(policy, optax.sgd(2.0), wrt=nnx.Param)
        metrics = update(policy, optimizer, reference, batches, settings)
        results.append(({k: float(v) for k, v in metrics.items()},
                        [np.asarray(x) for x in jax.tree.leaves(nnx.state(policy, nnx.Param))]))
    (whole, w_params), (parts, p_params) = results
    assert set(whole) == set(parts)
    assert whole["kl"] > 0 and whole["ratio_max"] > 1.0  # the second iteration saw a moved policy
    for key in whole:
        np.testing.assert_allclose(parts[key], whole[key], rtol=2e-4, atol=1e-7, err_msg=key)
    for x, y, x0 in zip(w_params, p_params, jax.tree.leaves(nnx.state(reference, nnx.Param))):
        np.testing.assert_allclose(y - x0, x - x0, rtol=1e-4, atol=1e-7)

    # Data parallel over processes: process 1's rows (patches, merge units, images, image
    # tokens renumbered by `offset_for_process`) appended to process 0's make one global batch
    # whose log-probs are those of the two halves.
    from dreamr_jax.training.sapo import _logprobs
    from dreamr_jax.training.sapo_trainer import offset_for_process

    halves = [policy_batch(policy.cfg, [rollouts[i] for i in rows], prompts, proc.pad_token_id, width=128,
                           num_patches=64) for rows in ([0, 1], [2, 3])]
    v = halves[1]["vision"]
    second = offset_for_process(halves[1], 1, len(v["unit_order"]), int(v["segment_ids"].max()) + 1,
                                int(v["window_segment_ids"].max()) + 1)
    joined = jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.concatenate([a, b], axis=1 if path[-1].key == "positions" else 0), halves[0], second)
    whole = np.asarray(_logprobs(policy, jax.tree.map(jax.numpy.asarray, joined), 16))
    apart = np.concatenate([np.asarray(_logprobs(policy, jax.tree.map(jax.numpy.asarray, h), 16)) for h in halves])
    np.testing.assert_allclose(whole, apart, atol=2e-5)


def test_prompt_batches_split_by_process():
    """Each process reads its own interleaved slice of the shuffled prompts: together they read
    what one process reads, none twice; the order depends on the seed only."""
    from dreamr_jax.training.sapo_trainer import prompt_dataset

    cfg = SAPOConfig(output_dir="x", draft="x", target="x", data=SAPOData(world_size=12), seed=3)

    class Ids:  # stands in for the prompt encoder
        def batch(self, records):
            return [r["id"] for r in records]

    one = [prompt_dataset(cfg, Ids(), None, 4)[i] for i in range(3)]
    two = [[prompt_dataset(cfg, Ids(), None, 2, p, 2)[i] for i in range(3)] for p in range(2)]
    flat_one = [x for b in one for x in b]
    assert sorted(flat_one) == sorted(f"synthetic-train-{i}" for i in range(12))
    assert flat_one != [f"synthetic-train-{i}" for i in range(12)]  # shuffled
    for p in range(2):
        assert [x for b in two[p] for x in b] == flat_one[p::2]


def test_outcome_reward_grades_records():
    """R_outcome of a record uses its answer type: choices by letter, numbers by value, text
    normalised (the trainer passes records of the data loaders)."""
    from dreamr_jax.training.rewards import outcome_reward

    choice = {"answer": "B", "answer_type": "choice", "choices": ["cat", "dog", "cow"]}
    number = {"answer": "12", "answer_type": "number", "choices": []}
    text = {"answer": "The Hobbit", "answer_type": "text", "choices": []}
    got = outcome_reward(["B", "dog", "C", "12.0", "13", "the hobbit", None], [choice, choice, choice, number, number,
                                                                               text, text])
    np.testing.assert_array_equal(got, [1, 1, 0, 1, 0, 1, 0])

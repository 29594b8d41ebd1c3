"""Two disjoint (fake CPU) meshes, in a subprocess: each role's weights and cache on its own
devices, draft and target busy at the same time, the committed text that of the sequential
oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from helpers import REPO_ROOT
from helpers.speculative import MESH_ALPHA, MESH_STEPS, QUESTION, make_reasoner, sequential_fpsr, step_ids


MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from dreamr_jax.sharding import split_devices
    from dreamr_jax.speculative import SpeculativeReasoner, StepConfig
    from dreamr_jax.speculative.timeline import overlap_time, project

    draft, target, question, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    assert len(jax.devices()) == 4, jax.devices()
    d_dev, t_dev = split_devices(2, 2)  # each role's weights split over its two devices (tensor parallel)
    r = SpeculativeReasoner(draft=draft, target=target, method="dreamr", alpha=alpha, window=4,
                            steps=StepConfig(max_step_tokens=int(sys.argv[5]), token_budget=int(sys.argv[6])),
                            draft_devices=d_dev, target_devices=t_dev)
    def where(state):
        return sorted({str(d) for leaf in jax.tree.leaves(state) if hasattr(leaf, "devices") for d in leaf.devices()})
    ids = r.processor.encode(r.prompt(question, 0), [])["input_ids"]
    caches = {name: where(getattr(r, name).open(ids, capacity=32).cache) for name in ("draft", "target")}
    r.solve(question)  # compile
    trace = r.solve(question)
    print("RESULT " + json.dumps({
        "devices": [str(d) for d in jax.devices()], "draft_devices": [str(d) for d in d_dev],
        "target_devices": [str(d) for d in t_dev],
        "draft_state": where(r.draft.generator.state), "target_state": where(r.target.generator.state),
        "q_proj_shards": {name: [list(s.data.shape) for s in getattr(r, name).generator.state["layers"][0]["self_attn"]
                                 ["q_proj"]["weight"].value.addressable_shards] for name in ("draft", "target")},
        "caches": caches, "steps": [s.token_ids for s in trace.steps], "authors": [s.author for s in trace.steps],
        "overlap": overlap_time(trace), "wall": trace.wall_time, "projected": project(trace),
        "draft_busy": trace.busy_time("draft"), "target_busy": trace.busy_time("target"),
        "kinds": sorted({(i.role, i.kind) for i in trace.intervals})}))
""")


def test_two_disjoint_meshes(spec_pair, loaded, tmp_path):
    draft, target = spec_pair
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), draft, target, QUESTION, str(MESH_ALPHA),
                           str(MESH_STEPS.max_step_tokens), str(MESH_STEPS.token_budget)],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    print(f"\ntwo meshes: devices {res['devices']}; draft busy {res['draft_busy']:.3f}s, target busy "
          f"{res['target_busy']:.3f}s, overlap {res['overlap']:.3f}s, wall {res['wall']:.3f}s, "
          f"projected {res['projected']:.3f}s; authors {res['authors']}")
    assert len(res["devices"]) == 4 and len(res["draft_devices"]) == len(res["target_devices"]) == 2
    assert not set(res["draft_devices"]) & set(res["target_devices"])
    models = {"draft": loaded[0], "target": loaded[1]}
    for name, shards in res["q_proj_shards"].items():  # (out, in) weights split by output feature
        t = models[name].cfg.text
        assert shards == [[t.num_attention_heads * t.head_dim // 2, t.hidden_size]] * 2, (name, shards)
    assert res["draft_state"] == res["draft_devices"] and res["target_state"] == res["target_devices"]
    assert res["caches"] == {"draft": res["draft_devices"], "target": res["target_devices"]}
    assert res["overlap"] > 0
    kinds = {tuple(k) for k in res["kinds"]}
    assert ("draft", "draft") in kinds and ("target", "check") in kinds
    assert res["projected"] <= res["wall"] + 1e-6
    # committed text does not depend on where the roles run: it equals the sequential oracle
    r = make_reasoner(loaded, steps=MESH_STEPS, alpha=MESH_ALPHA)
    oracle, rhos = sequential_fpsr(r, QUESTION, MESH_ALPHA)
    assert min(abs(x - MESH_ALPHA) for x in rhos) > 1e-4
    assert res["steps"] == step_ids(oracle)
    assert res["authors"] == [s.author for s in oracle.steps]

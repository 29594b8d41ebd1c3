"""Tiny draft/target Qwen3-VL pairs with the real Qwen vocabulary for the speculative tests.

Random weights almost never emit a step delimiter, so after initialisation each model's
output column of the plain "\\n\\n" token is pointed along a random direction and scaled so
that it wins on about 12% of positions: the models then write steps of varied lengths.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamr_jax.demo import tiny_qwen3_vl_config, write_processor_files
from dreamr_jax.generation import forward
from dreamr_jax.models.qwen_vl.config import QwenVLConfig
from dreamr_jax.models.qwen_vl.model import QwenVLModel
from dreamr_jax.models.qwen_vl.params import save_state

DELIMITER = 271  # "\n\n" in the Qwen vocabulary


def spec_config(hidden=64, layers=2):
    cfg = tiny_qwen3_vl_config()
    cfg["tie_word_embeddings"] = False
    t = cfg["text_config"]
    t.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
             num_key_value_heads=2, head_dim=hidden // 4, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True})
    sec = [hidden // 16, 0, 0]
    rest = hidden // 8 - sec[0]
    sec[1], sec[2] = rest - rest // 2, rest // 2
    t["rope_parameters"]["mrope_section"] = sec
    cfg["vision_config"].update(out_hidden_size=hidden, depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                num_position_embeddings=64)
    return cfg


def build_spec_model(folder: str, seed: int, hidden: int = 64, layers: int = 2, rate: float = 0.12) -> str:
    config = spec_config(hidden, layers)
    model = QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(seed))
    # Point the delimiter's output column along a random direction u, scaled so that its logit
    # beats every other token on about `rate` of the hidden states of real forwards.
    rng = np.random.default_rng(seed)
    kernel = np.array(model.lm_head.kernel[...])  # (hidden, vocab), a writable copy
    u = rng.standard_normal(kernel.shape[0]).astype(np.float32)
    kernel[:, DELIMITER] = u
    model.lm_head.kernel[...] = jnp.asarray(kernel)
    logits = np.asarray(forward(model, rng.integers(0, 150000, (4, 96)))).reshape(-1, kernel.shape[1])
    along_u = logits[:, DELIMITER]
    best_other = np.delete(logits, DELIMITER, axis=1).max(-1)
    ratio = np.where(along_u > 0, best_other / np.maximum(along_u, 1e-9), np.inf)
    kernel[:, DELIMITER] = u * np.quantile(ratio, rate)
    model.lm_head.kernel[...] = jnp.asarray(kernel)
    save_state(model, folder, config)
    write_processor_files(folder, shortest_edge=1024, longest_edge=64 * 64)
    return folder


def sequential_commits(reasoner, problem, dctx, tctx, rho_of, alpha: float) -> list[float]:
    """FPSR's commit rule executed one step at a time with nothing speculative or cancelled:
    draft a step from the committed text, score it with `rho_of(tctx, position, step)` (tctx
    then holds the committed text), commit it if rho >= alpha and it did not hit the step cap,
    else commit the target's own step; until `problem` is done. Returns the rhos."""
    eng = reasoner.engine("dreamr")
    rhos = []
    while not problem.done:
        reasoner.draft.set_tokens(dctx, problem.committed)
        d, _ = reasoner.draft.write(dctx, max_tokens=eng.step_budget(problem), stop_ids=eng.stop_ids,
                                    params=eng.draft_params)
        reasoner.target.set_tokens(tctx, problem.committed)
        rho = rho_of(tctx, len(problem.committed), d)
        rhos.append(rho)
        if rho >= alpha and not eng.hit_cap(d):
            eng.commit(problem, d, "draft", rho=rho)
        else:
            reasoner.target.set_tokens(tctx, problem.committed)
            t, _ = reasoner.target.write(tctx, max_tokens=eng.step_budget(problem), stop_ids=eng.stop_ids,
                                         params=eng.target_params)
            eng.commit(problem, t, "target", rho=rho)
    return rhos

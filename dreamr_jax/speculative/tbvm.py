"""TBVM with the CPN score (docs/METHOD.md section 2): the target judges a drafted step from the
logits of two keyword tokens after a judging instruction.

rho = s+ / (s+ + s-) with s± the keyword probabilities equals sigmoid(z+ - z-) on the raw
logits: the softmax normaliser cancels. Accept iff rho >= alpha.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The judging prompt and the keywords' token ids are in `dreamr_jax.prompts`.


def cpn_rho(logits, positive_id: int, negative_id: int):
    """rho = sigmoid(z+ - z-) in float32, over any leading batch shape of logits (..., V).

    A numpy input is scored in numpy (no device dispatch for a handful of verdicts)."""
    if isinstance(logits, np.ndarray):
        margin = logits[..., positive_id].astype(np.float32) - logits[..., negative_id].astype(np.float32)
        with np.errstate(over="ignore"):
            return (np.float32(1) / (np.float32(1) + np.exp(-margin))).astype(np.float32)
    logits = jnp.asarray(logits, jnp.float32)
    return jax.nn.sigmoid(logits[..., positive_id] - logits[..., negative_id])


def accept(rho, alpha: float):
    """Accept iff rho >= alpha (alpha > 1 rejects everything, alpha = 0 accepts everything).

    Compared in float32 (rho's precision), so host-side decisions (`is_accepted`) agree."""
    return jnp.asarray(rho, jnp.float32) >= jnp.float32(alpha)


def is_accepted(rho: float, alpha: float) -> bool:
    """`accept` for one host-side rho, with the same float32 comparison."""
    return bool(np.float32(rho) >= np.float32(alpha))



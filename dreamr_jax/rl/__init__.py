"""`dreamr_jax.rl`, the training package's former name: `from dreamr_jax.rl import ...` keeps
working (with a DeprecationWarning) and gives the names of `dreamr_jax.training`. `dr.rl`, the
public name of its pure pieces (`dr.rl.grpo_loss`), is `dreamr_jax.training` itself."""

import warnings

from ..training import *  # noqa: F401,F403
from ..training import __all__, __getattr__  # noqa: F401

warnings.warn("dreamr_jax.rl is now dreamr_jax.training", DeprecationWarning, stacklevel=2)

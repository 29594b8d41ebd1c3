"""Step-level speculative reasoning: steps, the TBVM/CPN check, the methods, FPSR, traces.

The names below are the engine's public API; training (SAPO's rollouts and rewards need the
target's checks) uses these and nothing deeper."""

from ..data.grading import final_answer
from ..prompts import KeywordError, Keywords, keyword_token_ids
from .config import METHODS, SpeculationConfig
from .methods import StepEngine, check_same_tokenizer
from .reasoner import ContextLengthError, SpeculativeReasoner
from .roles import Role
from .steps import StepConfig, split_steps
from .tbvm import accept, cpn_rho, is_accepted
from .timeline import project
from .trace import Interval, Step, Trace

__all__ = ["METHODS", "SpeculationConfig", "SpeculativeReasoner", "ContextLengthError", "StepConfig", "final_answer",
           "split_steps", "KeywordError", "Keywords", "accept", "cpn_rho", "keyword_token_ids", "project",
           "Interval", "Step", "Trace", "StepEngine", "check_same_tokenizer", "Role", "is_accepted"]

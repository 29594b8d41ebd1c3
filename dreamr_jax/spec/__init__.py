"""Step-level speculative reasoning: steps, the TBVM/CPN check, the methods, FPSR, traces."""

from .config import METHODS, SpecConfig
from .reasoner import ContextLengthError, SpeculativeReasoner
from .steps import StepConfig, final_answer, split_steps
from .tbvm import KeywordError, Keywords, accept, cpn_rho, keyword_token_ids
from .timeline import project
from .trace import Interval, Step, Trace

__all__ = ["METHODS", "SpecConfig", "SpeculativeReasoner", "ContextLengthError", "StepConfig", "final_answer",
           "split_steps", "KeywordError", "Keywords", "accept", "cpn_rho", "keyword_token_ids", "project",
           "Interval", "Step", "Trace"]

"""Step-level speculative reasoning: steps, the TBVM/CPN check, the methods, FPSR, traces."""

from .config import METHODS, SpeculationConfig
from .reasoner import ContextLengthError, SpeculativeReasoner
from ..data.grading import final_answer
from ..prompts import KeywordError, Keywords, keyword_token_ids
from .steps import StepConfig, split_steps
from .tbvm import accept, cpn_rho
from .timeline import project
from .trace import Interval, Step, Trace

__all__ = ["METHODS", "SpeculationConfig", "SpeculativeReasoner", "ContextLengthError", "StepConfig", "final_answer",
           "split_steps", "KeywordError", "Keywords", "accept", "cpn_rho", "keyword_token_ids", "project",
           "Interval", "Step", "Trace"]

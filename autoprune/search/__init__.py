"""The search service: search spaces, budgets, the Optuna study and Ray Tune execution."""

from .budget import Budget, BudgetError, parse_budget
from .proposals import ProposalError, Proposer
from .runner import SearchError, SearchResult, SearchSettings, search
from .space import Candidate, SearchSpace, SpaceError

__all__ = ["Budget", "BudgetError", "Candidate", "ProposalError", "Proposer", "SearchError", "SearchResult", "SearchSettings", "SearchSpace",
           "SpaceError", "parse_budget", "search"]

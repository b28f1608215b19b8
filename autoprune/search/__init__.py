"""The search service: search spaces, budgets, the Optuna study and Ray Tune execution."""

from .budget import Budget, BudgetError, parse_budget
from .runner import SearchError, SearchResult, SearchSettings, search
from .space import Candidate, SearchSpace, SpaceError

__all__ = ["Budget", "BudgetError", "Candidate", "SearchError", "SearchResult", "SearchSettings", "SearchSpace",
           "SpaceError", "parse_budget", "search"]

"""Optimizers behind one ask/tell interface, looked up by name."""
from evo.search.optim.base import OPTIMIZERS, Evaluated, make_optimizer, restore_optimizer, scalar_score  # noqa: F401
from evo.search.optim import cmaes, ga, nsga2, random_search  # noqa: F401  (registers)

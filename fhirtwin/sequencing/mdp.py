"""A finite-horizon decision process with few successors per action, solved exactly by backward induction.

Why this shape: the treatment-sequencing process moves deterministically between therapy sets and only
the smoking state is random, so each (state, action) has at most two successors; the probability that is
missing from a row is the exit (a first major event or death), after which nothing more is gained or lost.
Arrays rather than objects keep the exact solution and the evaluation of any policy to a few numpy
operations per year, so thousands of patients can be solved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Value of an action that is not allowed in a state (never chosen, never evaluated).
FORBIDDEN = -np.inf


@dataclass(frozen=True, eq=False)
class FiniteMDP:
    """Years x states x actions, with ``K`` successor slots per (year, state, action).

    ``reward`` (Y, S, A): reward of taking the action in that state and year (``-inf`` where not allowed);
    ``successor`` (Y, S, A, K) int: next state per slot; ``probability`` (Y, S, A, K): its probability
    (a row sums to at most 1: the rest exits with value 0). The value after the last year is 0.
    """

    reward: np.ndarray
    successor: np.ndarray
    probability: np.ndarray

    def __post_init__(self) -> None:
        y, s, a = self.reward.shape
        if self.successor.shape[:3] != (y, s, a) or self.probability.shape != self.successor.shape:
            raise ValueError("reward (Y, S, A), successor and probability (Y, S, A, K) must agree")
        if np.any(self.probability < -1e-12) or np.any(self.probability.sum(axis=-1) > 1 + 1e-9):
            raise ValueError("successor probabilities must be >= 0 and sum to at most 1")
        if np.any(self.successor < 0) or np.any(self.successor >= s):
            raise ValueError("successor states must be valid state indices")

    @property
    def years(self) -> int:
        """Number of decision years."""
        return int(self.reward.shape[0])

    @property
    def states(self) -> int:
        """Number of states."""
        return int(self.reward.shape[1])

    @property
    def actions(self) -> int:
        """Number of actions."""
        return int(self.reward.shape[2])

    def allowed(self) -> np.ndarray:
        """(Y, S, A) mask of the allowed actions."""
        mask: np.ndarray = np.isfinite(self.reward)
        return mask


@dataclass(frozen=True, eq=False)
class Solution:
    """Optimal values ``value`` (Y+1, S), action values ``q`` (Y, S, A) and a greedy ``policy`` (Y, S)."""

    value: np.ndarray
    q: np.ndarray
    policy: np.ndarray


def solve(mdp: FiniteMDP) -> Solution:
    """Exact optimum by backward induction (ties broken towards the lowest action index)."""
    value = np.zeros((mdp.years + 1, mdp.states))
    q = np.empty(mdp.reward.shape)
    policy = np.empty((mdp.years, mdp.states), dtype=int)
    for year in range(mdp.years - 1, -1, -1):
        future = np.sum(mdp.probability[year] * value[year + 1][mdp.successor[year]], axis=-1)
        q[year] = mdp.reward[year] + future
        policy[year] = np.argmax(q[year], axis=1)
        value[year] = q[year][np.arange(mdp.states), policy[year]]
    return Solution(value, q, policy)


def evaluate(mdp: FiniteMDP, policy: np.ndarray) -> np.ndarray:
    """Exact value (Y+1, S) of a deterministic Markov policy (Y, S) of action indices."""
    policy = np.asarray(policy, dtype=int)
    if policy.shape != (mdp.years, mdp.states):
        raise ValueError(f"a policy needs shape {(mdp.years, mdp.states)}")
    rows = np.arange(mdp.states)
    if not np.all(np.isfinite(mdp.reward[np.arange(mdp.years)[:, None], rows[None, :], policy])):
        raise ValueError("the policy takes an action that is not allowed")
    value = np.zeros((mdp.years + 1, mdp.states))
    for year in range(mdp.years - 1, -1, -1):
        a = policy[year]
        future = np.sum(mdp.probability[year, rows, a] * value[year + 1][mdp.successor[year, rows, a]], axis=-1)
        value[year] = mdp.reward[year, rows, a] + future
    return value

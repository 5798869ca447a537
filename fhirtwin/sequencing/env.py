"""The sequencing decision process as a gymnasium environment, so any RL library can train on it.

Why: the exact solution and the learned regressor (``learn``) are this package's answers; an environment
lets other learners be compared on the same processes. An episode is one patient (drawn from the given
processes), one step per year; the observation is the patient's features plus the state
(``learn.PATIENT_FEATURES``, then year, statin level, added antihypertensives, SGLT2 inhibitor, quit,
years since quit); the action is an index into the patient's (therapy set, attempt) actions, padded to
the largest patient, with ``info["action_mask"]`` marking the allowed ones (a disallowed action keeps the
current set). The reward is the decision process's: minus weighted events and costs, in events per 1,000.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from fhirtwin.sequencing.learn import PATIENT_FEATURES, SCALE, patient_features
from fhirtwin.sequencing.mdp import FiniteMDP
from fhirtwin.sequencing.process import TherapyProcess

STATE_FEATURES = ("year", "statin_level", "bp_drugs", "sglt2i", "quit", "years_since_quit")


class SequencingEnv(gym.Env[np.ndarray, np.int64]):
    """Yearly treatment decisions for patients drawn from ``processes`` (their draw-averaged processes)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, processes: list[TherapyProcess]) -> None:
        if not processes:
            raise ValueError("SequencingEnv needs at least one patient process")
        self.processes = processes
        self.mdps: list[FiniteMDP] = [p.mdp() for p in processes]
        self.features = [patient_features(p.inputs, p.published, p.options) for p in processes]
        size = len(PATIENT_FEATURES) + len(STATE_FEATURES)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(size,), dtype=np.float64)
        self.n_actions = max(p.n_actions for p in processes)
        self.action_space = gym.spaces.Discrete(self.n_actions)
        self._size = size
        self._patient = 0
        self._year = 0
        self._state = 0

    def _observation(self) -> np.ndarray:
        process = self.processes[self._patient]
        therapy, smoking = process.state(self._state)
        since = self._year - (smoking - 1) if smoking else -1
        state = [self._year, therapy.statin_level, therapy.bp_drugs, float(therapy.sglt2i), float(smoking > 0), since]
        return np.concatenate([np.nan_to_num(self.features[self._patient], nan=-1.0), np.asarray(state, float)])

    def action_mask(self) -> np.ndarray:
        """Allowed actions of the current state (padded with False)."""
        mask = np.zeros(self.n_actions, dtype=np.bool_)
        allowed = self.mdps[self._patient].allowed()[self._year, self._state]
        mask[: allowed.size] = allowed
        return mask

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a patient (``options={"patient": i}`` picks one) at current care in year 0."""
        super().reset(seed=seed)
        chosen = (options or {}).get("patient")
        self._patient = int(chosen) if chosen is not None else int(self.np_random.integers(len(self.processes)))
        self._year, self._state = 0, self.processes[self._patient].start
        return self._observation(), {"action_mask": self.action_mask()}

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """One year: reward, then the next state, or the end (first major event, death or horizon)."""
        process, mdp = self.processes[self._patient], self.mdps[self._patient]
        action = int(action)
        if not 0 <= action < self.n_actions or not self.action_mask()[action]:
            action = int(process.hold[self._state])
        reward = float(mdp.reward[self._year, self._state, action])
        probability = mdp.probability[self._year, self._state, action]
        draw = float(self.np_random.random())
        cumulative = np.cumsum(probability)
        slot = int(np.searchsorted(cumulative, draw, side="right"))
        exited = slot >= probability.size
        if not exited:
            self._state = int(mdp.successor[self._year, self._state, action, slot])
        self._year += 1
        terminated = exited or self._year >= process.years
        observation = self._observation() if not terminated else np.zeros(self._size)
        info = {"action_mask": self.action_mask() if not terminated else np.zeros(self.n_actions, dtype=np.bool_)}
        return observation, SCALE * reward, terminated, False, info

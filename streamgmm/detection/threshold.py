"""Log-density thresholds: a fixed value, or the q-quantile of the model's own density.

``QuantileThreshold`` estimates the q-quantile of log p(X) for X drawn from the current
mixture, by sampling from it.  That is bounded in memory, needs no history of scores, and
cannot be dragged down by a burst of anomalies in the stream: only what the model has
learned moves it (and with ``learn_from_anomalies: false`` flagged points are not learned).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..mixture.online import OnlineGaussianMixture

if TYPE_CHECKING:  # the service layer builds the config; only its type is named here
    from ..service.config import ThresholdConfig


def flags_below(log_density: np.ndarray, value: float | None) -> np.ndarray:
    """Which points a threshold at ``value`` flags (none while there is no value yet)."""
    if value is None:
        return np.zeros(len(log_density), dtype=bool)
    return log_density < value


class FixedThreshold:
    """Flag points whose log-density is below ``value``."""

    mode = "fixed"

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, model: OnlineGaussianMixture) -> None:
        """A fixed threshold does not move."""

    def points_before_refresh(self, model: OnlineGaussianMixture) -> int | None:
        """Never refreshed."""
        return None

    def classify(self, log_density: np.ndarray) -> np.ndarray:
        return flags_below(log_density, self.value)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "value": self.value}

    def load_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class QuantileThreshold:
    """Flag the lowest ``quantile`` fraction of the model's density.

    Re-estimated from ``samples`` draws of the model, seeded by the model's ``n_seen_`` so
    that a replay after a restart gives the same values: often while the model is young
    (whenever it has learned half as many points again), then every ``refresh_every``.
    """

    mode = "quantile"

    def __init__(self, quantile: float, refresh_every: int = 50_000, samples: int | None = None):
        self.quantile = float(quantile)
        self.refresh_every = int(refresh_every)
        # About 20 draws below the quantile: enough to keep the flagged fraction within a
        # factor of two of q, at a cost of well under one draw per learned point.
        self.samples = int(samples) if samples else int(min(200_000, max(10_000, 20.0 / quantile)))
        self.value: float | None = None
        self.refreshed_at = -1

    def update(self, model: OnlineGaussianMixture) -> None:
        if not model.is_initialized:
            return
        if self.value is not None:
            learned_since = model.n_seen_ - self.refreshed_at
            if learned_since < self._interval():
                return
        self.value = model.density_quantile(self.quantile, self.samples, random_state=model.n_seen_)
        self.refreshed_at = model.n_seen_

    def points_before_refresh(self, model: OnlineGaussianMixture) -> int | None:
        """While the model is young (refreshes closer together than ``refresh_every``), how
        many more points it learns before the next refresh; None once it is not."""
        if self.value is None or not model.is_initialized:
            return None
        interval = self._interval()
        if interval >= self.refresh_every:
            return None
        return max(interval - (model.n_seen_ - self.refreshed_at), 1)

    def _interval(self) -> int:
        return min(self.refresh_every, max(1_000, self.refreshed_at // 2))

    def classify(self, log_density: np.ndarray) -> np.ndarray:
        return flags_below(log_density, self.value)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "value": self.value, "refreshed_at": self.refreshed_at}

    def load_dict(self, state: dict) -> None:
        self.value = None if state["value"] is None else float(state["value"])
        self.refreshed_at = int(state["refreshed_at"])


def make_threshold(config: ThresholdConfig):
    if config.mode == "fixed":
        return FixedThreshold(config.value)
    return QuantileThreshold(config.quantile, config.refresh_every, config.samples)

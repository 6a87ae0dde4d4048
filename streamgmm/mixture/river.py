"""A river anomaly detector over ``OnlineGaussianMixture``: ``learn_one`` / ``score_one`` on dicts.

river is optional and not imported with this module: ``RiverGaussianMixture`` is built on
first use, as a subclass of ``river.base.AnomalyDetector`` when river imports (so river's
``evaluate.progressive_val_score``, ``metrics.ROCAUC``, ``clone`` and ``|`` pipelines take
it), of nothing else otherwise.
"""

from __future__ import annotations

import numpy as np

from .online import OnlineGaussianMixture

__all__ = ["RiverGaussianMixture"]


class _RiverGaussianMixture:
    """Anomaly detector for river: the negative log-density under an online Gaussian mixture.

    ``score_one(x)`` is ``-log p(x)`` under the mixture learned so far (higher is more
    anomalous), 0.0 until ``warmup`` points have been learned.  ``learn_one(x)`` buffers x and
    hands the buffer to ``OnlineGaussianMixture.partial_fit`` every ``batch_size`` points: one
    mini-batch step costs about as much as one single-point step, so learning is roughly
    ``batch_size`` times cheaper, and the result does not depend on the batch size (the step
    sizes compound per point).  The price: up to ``batch_size - 1`` learned points are not yet
    in the model that scores.

    The feature order is fixed by the first dict seen (by either method); later dicts must
    have those keys (others are ignored) with finite numeric values.

    Parameters
    ----------
    n_components : int, default=4
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
    warmup : int, default=256
        Points learned before the mixture exists (they initialise it).
    half_life : float, optional
        Forgetting, in points (see ``OnlineGaussianMixture``); None learns a stationary stream.
    batch_size : int, default=32
        Points buffered between learning steps.
    random_state : None, int or numpy Generator

    Attributes
    ----------
    mixture : OnlineGaussianMixture
        The model (its ``save``, ``weights_``, ``means_``... are all there).
    features : list or None
        The feature names, in the order of the first dict seen.

    Examples
    --------
    >>> import numpy as np
    >>> from streamgmm.mixture.river import RiverGaussianMixture
    >>> rng = np.random.default_rng(0)
    >>> detector = RiverGaussianMixture(n_components=2, warmup=200, random_state=0)
    >>> for _ in range(1000):
    ...     a, b = rng.normal(size=2)
    ...     detector.learn_one({"a": a, "b": b})
    >>> detector.score_one({"a": 8.0, "b": -8.0}) > detector.score_one({"a": 0.0, "b": 0.0})
    True
    """

    def __init__(
        self,
        n_components: int = 4,
        *,
        covariance_type: str = "full",
        warmup: int = 256,
        half_life: float | None = None,
        batch_size: int = 32,
        random_state=None,
    ):
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.warmup = warmup
        self.half_life = half_life
        self.batch_size = batch_size
        self.random_state = random_state
        self.mixture = OnlineGaussianMixture(
            n_components, covariance_type=covariance_type, warmup=warmup, half_life=half_life,
            random_state=random_state,
        )
        self.features: list | None = None
        self._pending: list[np.ndarray] = []

    def _row(self, x: dict) -> np.ndarray:
        if self.features is None:
            self.features = list(x)
        try:
            return np.array([x[name] for name in self.features], dtype=np.float64)
        except KeyError:
            missing = [name for name in self.features if name not in x]
            raise ValueError(
                f"x lacks the feature(s) {missing}; every sample needs the features of the first "
                f"one: {self.features}"
            ) from None

    def learn_one(self, x: dict) -> None:
        """Buffer x; every ``batch_size`` points the mixture learns the buffer."""
        self._pending.append(self._row(x))
        if len(self._pending) >= self.batch_size:
            batch = np.vstack(self._pending)
            self._pending = []
            self.mixture.partial_fit(batch)

    def score_one(self, x: dict) -> float:
        """-log p(x) (higher is more anomalous); 0.0 before the warm-up is complete."""
        row = self._row(x)
        if not self.mixture.is_initialized:
            return 0.0
        return float(-self.mixture.score_samples(row[np.newaxis])[0])


def _build_class() -> type:
    try:
        from river import base
    except ImportError:  # river is optional
        bases: tuple = (_RiverGaussianMixture,)
    else:
        bases = (_RiverGaussianMixture, base.AnomalyDetector)
    return type("RiverGaussianMixture", bases, {"__module__": __name__, "__doc__": _RiverGaussianMixture.__doc__})


def __getattr__(name: str):
    # PEP 562: the class is built (and river imported) when first asked for, then kept.
    if name == "RiverGaussianMixture":
        cls = globals()["RiverGaussianMixture"] = _build_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

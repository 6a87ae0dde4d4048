"""streamgmm: streaming anomaly detection with Gaussian mixtures, batch and online EM."""

__version__ = "0.2.0"

from .mixture import ConvergenceWarning, GaussianMixture, NotFittedError, OnlineGaussianMixture, ScoredBatch  # noqa: E402

__all__ = [
    "ConvergenceWarning",
    "GaussianMixture",
    "NotFittedError",
    "OnlineGaussianMixture",
    "ScoredBatch",
    "__version__",
]

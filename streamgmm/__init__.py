"""streamgmm: streaming anomaly detection with Gaussian mixtures, batch and online EM."""

from ._base import ConvergenceWarning, NotFittedError
from .mixture import GaussianMixture
from .online import OnlineGaussianMixture, ScoredBatch

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "GaussianMixture",
    "NotFittedError",
    "OnlineGaussianMixture",
    "ScoredBatch",
    "__version__",
]

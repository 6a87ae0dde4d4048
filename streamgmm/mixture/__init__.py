"""The mixture library: batch and online EM for Gaussian mixtures (numpy and scipy only).

Both estimators follow scikit-learn's estimator protocol (get_params/set_params, clone,
model selection, pipelines) without needing scikit-learn; ``streamgmm.mixture.river``
holds a river anomaly detector over the online mixture.
"""

from ._base import ConvergenceWarning, NotFittedError
from .gaussian_mixture import GaussianMixture
from .online import OnlineGaussianMixture, ScoredBatch

__all__ = ["ConvergenceWarning", "GaussianMixture", "NotFittedError", "OnlineGaussianMixture", "ScoredBatch"]

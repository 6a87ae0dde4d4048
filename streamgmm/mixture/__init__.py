"""The mixture library: batch and online EM for Gaussian mixtures (numpy and scipy only)."""

from ._base import ConvergenceWarning, NotFittedError
from .gaussian_mixture import GaussianMixture
from .online import OnlineGaussianMixture, ScoredBatch

__all__ = ["ConvergenceWarning", "GaussianMixture", "NotFittedError", "OnlineGaussianMixture", "ScoredBatch"]

"""streamgmm: streaming anomaly detection with Gaussian mixtures, batch and online EM."""

__version__ = "0.2.0"

_LIBRARY = ("ConvergenceWarning", "GaussianMixture", "NotFittedError", "OnlineGaussianMixture", "ScoredBatch")

__all__ = [*_LIBRARY, "__version__"]


def __getattr__(name: str):
    # The library (numpy, scipy) is imported at first use, not with the package: the
    # container's `streamgmm healthcheck` needs none of it (see cli/healthcheck.py).
    if name in _LIBRARY:
        from . import mixture

        return getattr(mixture, name)
    raise AttributeError(f"module 'streamgmm' has no attribute {name!r}")

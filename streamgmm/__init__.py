"""streamgmm: streaming anomaly detection with Gaussian mixtures, batch and online EM."""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

_LIBRARY = ("ConvergenceWarning", "GaussianMixture", "NotFittedError", "OnlineGaussianMixture", "ScoredBatch")

__all__ = [*_LIBRARY, "__version__"]

if TYPE_CHECKING:  # type checkers and IDEs see the names; at run time they come at first use
    from .mixture import ConvergenceWarning, GaussianMixture, NotFittedError, OnlineGaussianMixture, ScoredBatch


def __getattr__(name: str):
    # The library (numpy, scipy) is imported at first use, not with the package: the
    # container's `streamgmm healthcheck` needs none of it (see cli/healthcheck.py).
    if name in _LIBRARY or name == "mixture":
        mixture = importlib.import_module(".mixture", __name__)  # (sets the package's `mixture` too)
        value = mixture if name == "mixture" else getattr(mixture, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'streamgmm' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LIBRARY, "mixture"})

"""What batch and online mixtures share: scoring, prediction, sampling, BIC/AIC, state I/O,
and the estimator protocol scikit-learn's tools rely on (parameters, tags, fitted check)."""

from __future__ import annotations

import functools
import inspect
import io
import json
import numbers

import numpy as np

from . import _gaussian as g
from ._atomic import write_atomically
from ._validation import check_array, check_feature_names, check_random_state, feature_names_of

STATE_FORMAT_VERSION = 1
# Version 2: an online model whose variances carry the variance of rounding (a feature on a grid).
# Its statistics have that variance taken out, so a reader that does not add it back (version 1)
# would score another model (a count 3 at -125 nats, not -10): such a state says 2, and a
# version-1 reader refuses it.  Every other state still says 1.
STATE_FORMAT_VERSION_ROUNDING = 2


def _scikit_learn_bases(name: str) -> tuple:
    """(scikit-learn's exception class ``name``,) if scikit-learn imports, else ().

    With it as an extra base, ``except sklearn.exceptions.NotFittedError`` and warning
    filters on scikit-learn's ``ConvergenceWarning`` also catch ours.  scikit-learn stays
    optional: without it the classes have only their standard-library bases.
    """
    try:
        from sklearn import exceptions
    except Exception:  # not installed, or broken: either way streamgmm does not need it
        return ()
    return (getattr(exceptions, name),)


class NotFittedError(*_scikit_learn_bases("NotFittedError"), ValueError, AttributeError):
    """Raised when a model is used before it has been fitted or initialised."""


class ConvergenceWarning(*_scikit_learn_bases("ConvergenceWarning"), UserWarning):
    """EM stopped at max_iter before the lower bound changed by less than tol."""


class EstimatorParams:
    """scikit-learn's estimator protocol without scikit-learn.

    ``get_params``/``set_params`` read and write the constructor's parameters (the
    constructor only stores them), so ``sklearn.base.clone``, ``GridSearchCV`` and
    ``Pipeline`` work; ``__sklearn_tags__`` and ``__sklearn_is_fitted__`` answer
    scikit-learn's ``get_tags`` and ``check_is_fitted``.
    """

    _estimator_type = "density_estimator"  # what scikit-learn < 1.6 reads instead of tags

    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return sorted(
            name for name, p in signature.parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        )

    def get_params(self, deep: bool = True) -> dict:
        """The constructor parameters as a dict (``deep`` also lists those of parameters
        that are estimators themselves, as ``name__param``)."""
        params = {}
        for name in self._get_param_names():
            # What was given, also for a parameter whose attribute reads as a fitted choice.
            value = self.__dict__[name] if name in self.__dict__ else getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                params.update((f"{name}__{key}", v) for key, v in value.get_params().items())
            params[name] = value
        return params

    def set_params(self, **params):
        """Set constructor parameters; they are checked when the model next fits. Returns self."""
        valid = self._get_param_names()
        nested: dict[str, dict] = {}
        for key, value in params.items():
            name, _, sub_key = key.partition("__")
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {valid!r}."
                )
            if sub_key:
                nested.setdefault(name, {})[sub_key] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        defaults = {
            name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()
        }
        shown = [
            f"{name}={value!r}" for name, value in self.get_params(deep=False).items()
            if not _is_default(value, defaults.get(name))
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self):
        # Only scikit-learn (>= 1.6) calls this, so scikit-learn is importable here.
        from sklearn.utils import TargetTags, Tags

        return Tags(
            estimator_type="density_estimator",
            target_tags=TargetTags(required=False),
            transformer_tags=None,
            regressor_tags=None,
            classifier_tags=None,
        )

    def __sklearn_is_fitted__(self) -> bool:
        return self._is_fitted()

    def _is_fitted(self) -> bool:
        raise NotImplementedError


def _is_default(value, default) -> bool:
    if value is default:
        return True
    if isinstance(value, (np.ndarray, list, tuple)) or type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError):
        return False


class MixtureBase(EstimatorParams):
    """Scoring on top of ``_internal_parameters()``.

    Subclasses provide ``_internal_parameters() -> (weights, means, precisions_chol)`` in the
    space the model computes in, ``_to_internal(X)`` / ``_from_internal(X)`` mapping data to
    and from that space, and ``_log_jacobian`` (added to log-densities so they are densities
    of the original data).
    """

    covariance_type: str
    _log_jacobian: float = 0.0

    # ----------------------------------------------------------------- to override
    def _is_fitted(self) -> bool:
        return hasattr(self, "weights_")

    def _to_internal(self, X):
        return X

    def _from_internal(self, X):
        return X

    def _internal_parameters(self):
        return self.weights_, self.means_, self.precisions_cholesky_

    def _internal_covariances(self):
        return self.covariances_

    # ------------------------------------------------------------------ the one path
    def _not_fitted_message(self) -> str:
        return (
            f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with appropriate "
            "arguments before using this estimator."
        )

    def _check_fitted(self) -> None:
        if not self._is_fitted():
            raise NotFittedError(self._not_fitted_message())

    def _check_X(self, X):
        self._check_fitted()
        check_feature_names(self, X)
        return check_array(X, n_features=self.n_features_in_, expected_by=type(self).__name__)

    def _feature_names_state(self) -> dict:
        """The ``feature_names`` entry of a saved state ({} when fitted without names)."""
        names = getattr(self, "feature_names_in_", None)
        return {} if names is None else {"feature_names": [str(name) for name in names]}

    def _restore_feature_names(self, state: dict) -> None:
        if state.get("feature_names") is not None:
            self.feature_names_in_ = np.asarray(state["feature_names"], dtype=object)

    def _remember_feature_names(self, X) -> None:
        names = feature_names_of(X)
        if names is None:
            self.__dict__.pop("feature_names_in_", None)
        else:
            self.feature_names_in_ = names

    def _estimate_weighted_log_prob(self, X):
        """log(pi_k) + log p(x | k) for X in the model's original units; shape (n, K)."""
        weights, means, precisions_chol = self._internal_parameters()
        return (
            g.weighted_log_prob(self._to_internal(X), weights, means, precisions_chol, self.covariance_type)
            + self._log_jacobian
        )

    def score_samples(self, X) -> np.ndarray:
        """Log-density of each sample under the mixture, shape (n_samples,)."""
        return self._score_from_weighted_log_prob(self._estimate_weighted_log_prob(self._check_X(X)))

    def score(self, X, y=None, sample_weight=None) -> float:
        """Mean (or weighted mean) log-density of X."""
        return float(np.average(self.score_samples(X), weights=sample_weight))

    def predict_proba(self, X) -> np.ndarray:
        """Posterior probability of each component for each sample, shape (n_samples, K)."""
        _, log_resp = g.e_step(self._estimate_weighted_log_prob(self._check_X(X)))
        return np.exp(log_resp)

    def predict(self, X) -> np.ndarray:
        """Index of the most responsible component for each sample."""
        return np.argmax(self._estimate_weighted_log_prob(self._check_X(X)), axis=1)

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then the most responsible component of each row of X."""
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def sample(self, n_samples: int = 1, random_state=None):
        """Draw samples from the fitted mixture.

        Returns (X of shape (n_samples, n_features), labels of shape (n_samples,)).
        """
        self._check_fitted()
        if not isinstance(n_samples, numbers.Integral) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at least one sample."
            )
        rng = check_random_state(random_state) if random_state is not None else self._sampling_rng()
        weights, means, _ = self._internal_parameters()
        X, labels = g.sample_from_parameters(
            rng, n_samples, weights, means, self._internal_covariances(), self.covariance_type
        )
        return self._from_internal(X), labels

    def _sampling_rng(self):
        return check_random_state(getattr(self, "random_state", None))

    def _n_parameters(self) -> int:
        return g.n_parameters(self.n_components, self.n_features_in_, self.covariance_type)

    def bic(self, X) -> float:
        """Bayesian information criterion on X (lower is better)."""
        X = self._check_X(X)
        return -2.0 * self._log_likelihood(X) + self._n_parameters() * np.log(X.shape[0])

    def aic(self, X) -> float:
        """Akaike information criterion on X (lower is better)."""
        X = self._check_X(X)
        return -2.0 * self._log_likelihood(X) + 2.0 * self._n_parameters()

    def _log_likelihood(self, X) -> float:
        """Total log-likelihood of checked X (what score(X) * len(X) is, without checking X again)."""
        return float(np.sum(self._score_from_weighted_log_prob(self._estimate_weighted_log_prob(X))))

    def _score_from_weighted_log_prob(self, wlp):
        return g.logsumexp_rows(wlp)

    # ---------------------------------------------------------------------- state
    def save(self, path) -> None:
        """Write the state to ``path`` as a versioned ``.npz`` (no pickle), atomically."""
        save_state(self.to_dict(), path)

    @classmethod
    def load(cls, path):
        """Read a state written by ``save``; the file is validated, never unpickled."""
        return cls.from_dict(load_state(path))


# ------------------------------------------------------------------ state files
def encode_state(state: dict) -> dict[str, np.ndarray]:
    """Split a state dict into numpy arrays plus one JSON ``__meta__`` entry (no object arrays)."""
    arrays = {}
    meta = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise ValueError(f"state entry {key!r} is an object array; only numeric arrays are saved")
            arrays[key] = value
        else:
            meta[key] = value
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    return arrays


def decode_state(arrays) -> dict:
    if "__meta__" not in arrays:
        raise ValueError("not a streamgmm state: the __meta__ entry is missing")
    state = json.loads(bytes(arrays["__meta__"]).decode())
    for key in arrays:
        if key != "__meta__":
            state[key] = np.array(arrays[key])
    return state


def save_state(state: dict, path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **encode_state(state))
    write_atomically(path, buffer.getvalue())


def load_state(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return decode_state({key: npz[key] for key in npz.files})
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model state from {path}: {exc}") from None


def plain_value(value):
    """A numpy scalar as the Python number it holds (np.int64(500) from a search grid: JSON
    cannot write it, and a state left it out); anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def state_errors_said(from_dict):
    """A state whose structure is wrong (an entry missing or of the wrong type) raised
    KeyError, TypeError, AttributeError or IndexError from inside ``from_dict``: ValueError,
    as every other unusable state."""
    @functools.wraps(from_dict)
    def checked(cls, state):
        if not isinstance(state, dict):
            raise ValueError(f"a model state is a dict (from to_dict or load_state); got {type(state).__name__}")
        try:
            return from_dict(cls, state)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"state is malformed ({type(exc).__name__}: {exc}); use one written by to_dict "
                             "or save") from None
    return checked


def check_state_header(state: dict, kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state is for a {state.get('kind')!r} model, not {kind!r}")
    version = state.get("format_version")
    if version not in (STATE_FORMAT_VERSION, STATE_FORMAT_VERSION_ROUNDING):
        raise ValueError(
            f"state format version {version!r} is not supported (this streamgmm reads versions "
            f"{STATE_FORMAT_VERSION} and {STATE_FORMAT_VERSION_ROUNDING}); refit or convert the model"
        )


def require_array(state: dict, key: str, shape: tuple) -> np.ndarray:
    if key not in state:
        raise ValueError(f"state is missing {key!r}")
    value = np.asarray(state[key], dtype=np.float64)
    if value.shape != shape:
        raise ValueError(f"state entry {key!r} has shape {value.shape}, expected {shape}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"state entry {key!r} contains NaN or infinity")
    return value


def covariance_shape(covariance_type: str, n_components: int, n_features: int) -> tuple:
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]

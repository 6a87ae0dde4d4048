"""The daemon's pure logic: records in, decisions and output records out. No I/O here.

``Detector.process`` takes one polled batch and, for every record: decodes and validates
it (invalid ones become dead letters), scores the valid ones under the current model
*before* learning from them, flags those below the threshold (anomaly records), learns from
the rest, and advances the per-partition offsets.  ``state()`` / ``restore()`` are what a
checkpoint holds, so the Kafka loop, ``replay`` and the tests all drive the same code.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby
from operator import attrgetter, itemgetter

import numpy as np

from .. import __version__
from ..service.config import Config
from .decode import DecodedBatch, Decoder
from ..mixture.online import OnlineGaussianMixture, ScoredBatch, split_statistics
from .threshold import make_threshold

STATE_KIND = "streamgmm-detector"
# Per-record field access in C (map over attrgetter): the loop runs for every message.
_VALUE_OF = attrgetter("value")
_PARTITION_OF = attrgetter("topic", "partition")
_OFFSET_OF = attrgetter("offset")
_TIMESTAMP_OF = attrgetter("timestamp")
LOWEST_FLOAT = -np.finfo(np.float64).max


@dataclass(frozen=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp: int | None = None  # milliseconds since the epoch
    headers: tuple = ()


@dataclass(frozen=True)
class OutputRecord:
    topic: str
    value: bytes
    key: bytes | None
    headers: list


@dataclass
class BatchResult:
    n_records: int = 0
    anomalies: list[OutputRecord] = field(default_factory=list)
    dead_letters: list[OutputRecord] = field(default_factory=list)
    invalid_reasons: Counter = field(default_factory=Counter)
    invalid_index: dict = field(default_factory=dict)  # record index -> reason
    n_valid: int = 0
    n_learned: int = 0
    warmup_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    # Rows scored by the model, by record index, with their density, flag and component.
    scored_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    log_density: np.ndarray = field(default_factory=lambda: np.empty(0))
    flags: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    components: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    latencies_seconds: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def warmup(self) -> bool:
        """Whether some of this batch's points went to initialising the model."""
        return len(self.warmup_index) > 0

    def decisions(self) -> list:
        """Per input record: None if invalid, else (log_density or None in warm-up, flagged, component)."""
        out: list = [None] * self.n_records
        for i in self.warmup_index:
            out[i] = (None, False, None)
        for i, density, flagged, component in zip(
            self.scored_index.tolist(), self.log_density.tolist(), self.flags.tolist(), self.components.tolist()
        ):
            out[i] = (density, flagged, component)
        return out


def values_of(records) -> list:
    """The message values of a batch of records, in order."""
    return list(map(_VALUE_OF, records))


def _last_offsets(records) -> dict[tuple[str, int], int]:
    """The highest offset per (topic, partition) among the records."""
    last: dict[tuple[str, int], int] = {}
    # Kafka hands over each partition's records as one run: one step per run, not per record.
    for key, run in groupby(zip(map(_PARTITION_OF, records), map(_OFFSET_OF, records)), key=itemgetter(0)):
        offset = max(map(itemgetter(1), run))
        if offset >= last.get(key, -1):
            last[key] = offset
    return last


def _timestamps(records) -> np.ndarray:
    """Message timestamps in ms as floats, 0 where a record has none."""
    try:
        # Read as integers, then converted: numpy converts a Python int to float slowly.
        return np.fromiter(map(_TIMESTAMP_OF, records), dtype=np.int64, count=len(records)).astype(float)
    except TypeError:  # None timestamps (replay input without them)
        return np.array([record.timestamp or 0 for record in records], dtype=float)


def _finite(value: float) -> float:
    """JSON has no -Infinity: clamp to the lowest float (still below any threshold)."""
    return value if math.isfinite(value) else LOWEST_FLOAT


def _key_fields(key: bytes | None) -> dict:
    if key is None:
        return {"key": None}
    try:
        return {"key": key.decode("utf-8")}
    except UnicodeDecodeError:
        return {"key": None, "key_base64": base64.b64encode(key).decode()}


class Detector:
    """Scores, flags and learns; owns the model, the threshold, counters and offsets."""

    def __init__(self, config: Config):
        self.config = config
        m = config.model
        self.model = OnlineGaussianMixture(
            m.n_components,
            covariance_type=m.covariance_type,
            warmup=m.warmup,
            alpha=m.alpha,
            t0=m.t0,
            half_life=m.half_life,
            reg_covar=m.reg_covar,
            min_weight=m.min_weight,
            rare_weight=m.rare_weight,
            random_state=m.random_state,
        )
        self.threshold = make_threshold(config.threshold)
        self.decoder = Decoder(config.input)
        self.offsets: dict[tuple[str, int], int] = {}
        self.n_valid = 0
        self.n_invalid = 0
        self.n_anomalies = 0
        self.n_updates = 0
        # Smoothed fraction of scored points flagged (half-life threshold.adopt_window points),
        # and for how many points in a row it has been above threshold.adopt_flag_rate.
        self.flag_rate = 0.0
        self.points_above = 0

    @property
    def ready(self) -> bool:
        return self.model.is_initialized

    # ------------------------------------------------------------------ the work
    def process(self, records: list[InputRecord], now: float | None = None,
                decoded: DecodedBatch | None = None, scored: ScoredBatch | None = None,
                last_offsets: dict[tuple[str, int], int] | None = None) -> BatchResult:
        """``decoded``: the records' values already decoded, and ``scored``: their valid rows
        already scored (both by the helper process), if so.  A ``scored`` batch is used only
        if it was scored by the model and threshold as they stand now; otherwise the batch is
        scored here.  ``last_offsets``: the highest offset per (topic, partition) among the
        records, if the caller knows it (the Kafka loop does, from each partition's run)."""
        now = time.time() if now is None else now
        result = BatchResult(n_records=len(records))
        if decoded is None:
            decoded = self.decoder.decode(values_of(records))
        for invalid in decoded.invalid:
            record = records[invalid.index]
            result.dead_letters.append(self._dead_letter(record, invalid.reason, invalid.detail))
            result.invalid_reasons[invalid.reason] += 1
            result.invalid_index[invalid.index] = invalid.reason
        self.n_invalid += len(decoded.invalid)

        X, rows = decoded.X, decoded.valid_index
        result.n_valid = len(rows)
        self.n_valid += len(rows)
        if len(rows):
            if not self.model.is_initialized:
                # Warm-up: just enough points to initialise the model; nothing is flagged
                # before it exists, and the rest of the batch is scored by the new model.
                n_warm = min(len(rows), self.model.warmup - self.model.n_buffered_)
                self.model.partial_fit(X[:n_warm])
                result.n_learned = n_warm
                result.warmup_index = rows[:n_warm]
                X, rows = X[n_warm:], rows[n_warm:]
                self.threshold.update(self.model)
            if scored is not None and not self._scored_as_now(scored, len(X)):
                scored = None  # scored under another model state (e.g. before a restore): score here
            parts = []
            while len(rows):
                # A young model's threshold is re-estimated often: a large batch (a backlog at
                # start) is taken in that many steps, each scored with the threshold refreshed
                # after the last, not all of it with the threshold of the warm-up model.
                step = self.threshold.points_before_refresh(self.model)
                n = len(rows) if step is None else min(len(rows), step)
                if n < len(rows):
                    scored = None  # the helper scored the whole batch with the model before it
                parts.append(self._score_flag_learn(records, X[:n], rows[:n], result, now, scored))
                X, rows = X[n:], rows[n:]
                self.threshold.update(self.model)
            if len(parts) == 1:
                result.scored_index, result.log_density, result.flags, result.components = parts[0]
            elif parts:
                result.scored_index, result.log_density, result.flags, result.components = map(np.concatenate, zip(*parts))
            stamps = _timestamps(records)[decoded.valid_index]
            has_stamp = stamps > 0
            result.latencies_seconds = np.maximum(now - stamps[has_stamp] / 1000.0, 0.0)

        for key, offset in (_last_offsets(records) if last_offsets is None else last_offsets).items():
            self.offsets[key] = max(self.offsets.get(key, 0), offset + 1)
        return result

    def _scored_as_now(self, scored: ScoredBatch, n_rows: int) -> bool:
        """Whether a batch scored elsewhere was scored by the model as it stands now (and its
        statistics split by the threshold as it stands now)."""
        return (scored.model_version == self.model._version and len(scored.log_density) == n_rows
                and (scored.statistics is None or scored.flag_threshold == self.threshold.value))

    def _score_flag_learn(self, records, X, rows, result, now, scored=None):
        """Score, flag and learn these rows; returns (rows, log_density, flags, components)."""
        scored = self.model.score_batch(X) if scored is None else scored
        flags = self.threshold.classify(scored.log_density)
        components = scored.component
        if flags.any():
            detected_at = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
            for position in np.flatnonzero(flags):
                result.anomalies.append(
                    self._anomaly_record(records[rows[position]], X[position], float(scored.log_density[position]),
                                         self.threshold.value, int(components[position]), self.n_updates,
                                         self.model.n_seen_, detected_at)
                )
        self.n_anomalies += int(flags.sum())
        learn_flagged = self._learn_flagged(flags)
        unflagged, flagged = scored.statistics or split_statistics(scored, flags, self.model.covariance_type)
        statistics = unflagged + flagged if learn_flagged and flagged is not None else unflagged
        if statistics.n_points:
            learned = np.isfinite(scored.log_density) & (learn_flagged | ~flags)
            self.model.learn_statistics(statistics, lambda: (
                self.model.standardized(X) if scored.X_internal is None else scored.X_internal,
                np.where(learned, scored.log_density, np.inf)))
            result.n_learned += statistics.n_points
            self.n_updates += 1
        return rows, scored.log_density, flags, components

    @property
    def adopt_flag_rate(self) -> float | None:
        """The flag rate above which flagged points start to look like a regime, not anomalies."""
        t = self.config.threshold
        if not t.adopt:
            return None
        if t.adopt_flag_rate is not None:
            return t.adopt_flag_rate
        return 10.0 * (t.quantile if t.mode == "quantile" else 0.001)

    @property
    def adopting(self) -> bool:
        """True while a sustained excess of flagged points is being learned as a new regime."""
        return self.adopt_flag_rate is not None and self.points_above >= self.config.threshold.adopt_after

    def _learn_flagged(self, flags) -> bool:
        """Whether this batch's flagged points are learned too.

        With learn_from_anomalies: false they are not, except once the smoothed flag rate has
        stayed above the adoption rate for threshold.adopt_after points: a flood of
        "anomalies" that long is a new regime (a cluster appearing, a shift), which the model
        must adopt or it flags it for ever.  A burst that ends sooner stays out of the model.
        Adoption goes on until the rate falls below half the adoption rate.
        """
        t = self.config.threshold
        weight = -np.expm1(len(flags) * np.log(0.5) / t.adopt_window)
        self.flag_rate = (1.0 - weight) * self.flag_rate + weight * float(np.mean(flags))
        rate = self.adopt_flag_rate
        if rate is not None and self.flag_rate > (rate / 2.0 if self.adopting else rate):
            self.points_above += len(flags)
        else:
            self.points_above = 0
        return t.learn_from_anomalies or self.adopting

    # ------------------------------------------------------------ output records
    def _anomaly_record(self, record, features, density, threshold, component, model_version, n_seen, detected_at):
        document = {
            "source": {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "timestamp": record.timestamp,
                **_key_fields(record.key),
            },
            "features": [float(v) for v in features],
            "log_density": _finite(density),
            "threshold": threshold,
            "component": component,
            "model_version": model_version,
            "n_seen": n_seen,
            "detected_at": detected_at,
        }
        headers = list(record.headers or ()) + [
            ("streamgmm.source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        return OutputRecord(self.config.kafka.output_topic, json.dumps(document).encode(), record.key, headers)

    def _dead_letter(self, record, reason, detail):
        headers = list(record.headers or ()) + [
            ("streamgmm.error.reason", reason.encode()),
            ("streamgmm.error.detail", detail[:500].encode()),
            ("streamgmm.source.topic", record.topic.encode()),
            ("streamgmm.source.partition", str(record.partition).encode()),
            ("streamgmm.source.offset", str(record.offset).encode()),
            ("streamgmm.source.timestamp", str(record.timestamp).encode()),
        ]
        # The value goes out unchanged (b"" for a null value: a dead letter is never a tombstone).
        return OutputRecord(self.config.kafka.dead_letter_topic, record.value or b"", record.key, headers)

    # --------------------------------------------------------------------- state
    def state(self) -> dict:
        offsets: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(self.offsets.items()):
            offsets.setdefault(topic, {})[str(partition)] = int(offset)
        return {
            "kind": STATE_KIND,
            "streamgmm_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "input": {"format": self.config.input.format, "dimension": self.config.input.dimension},
            "model": self.model.to_dict(),
            "threshold": self.threshold.to_dict(),
            "offsets": offsets,
            "counters": {
                "n_valid": self.n_valid,
                "n_invalid": self.n_invalid,
                "n_anomalies": self.n_anomalies,
                "n_updates": self.n_updates,
                "flag_rate": self.flag_rate,
                "points_above": self.points_above,
            },
        }

    def restore(self, state: dict) -> None:
        if state.get("kind") != STATE_KIND:
            raise ValueError(f"not a detector checkpoint (kind={state.get('kind')!r})")
        dimension = state["input"]["dimension"]
        if dimension != self.config.input.dimension:
            raise ValueError(
                f"the checkpoint is for input.dimension={dimension}, the config says "
                f"{self.config.input.dimension}: use a new checkpoint.dir for a different feature set"
            )
        self.model = OnlineGaussianMixture.from_dict(state["model"])
        if state["threshold"]["mode"] == self.threshold.mode:
            self.threshold.load_dict(state["threshold"])
        self.threshold.update(self.model)
        counters = state["counters"]
        self.n_valid = int(counters["n_valid"])
        self.n_invalid = int(counters["n_invalid"])
        self.n_anomalies = int(counters["n_anomalies"])
        self.n_updates = int(counters["n_updates"])
        self.flag_rate = float(counters.get("flag_rate", 0.0))
        self.points_above = int(counters.get("points_above", 0))
        self.offsets = {
            (topic, int(partition)): int(offset)
            for topic, partitions in state["offsets"].items()
            for partition, offset in partitions.items()
        }

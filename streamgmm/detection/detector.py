"""The daemon's pure logic: records in, decisions and output records out. No I/O here.

``Detector.process`` takes one polled batch and, for every record: decodes and validates
it (invalid ones become dead letters), scores the valid ones under the current model
*before* learning from them, flags those below the threshold (anomaly records, explained:
see ``explain``; with kafka.scores_topic, a compact record for every scored point too), learns
from the rest, and advances the per-partition offsets.  ``state()`` / ``restore()`` are what a
checkpoint holds, so the Kafka loop, ``replay`` and the tests all drive the same code.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..mixture.online import ABSURD_SPREADS, OnlineGaussianMixture
from .decode import Decoder
from .explain import ComponentGeometry, explain, explanation_documents, model_geometry, one_in, rarity, rarity_documents
from .records import (LOWEST_FLOAT, InputRecord, OutputRecord, RecordBatch, anomaly_record, batch_sources,
                      dead_letter, finite, iso_time, score_records)
from .threshold import make_threshold

if TYPE_CHECKING:  # the service layer builds the config; only its type is named here
    from ..service.config import Config

STATE_KIND = "streamgmm-detector"
# The counts a checkpoint keeps (as integers).
COUNTERS = ("n_valid", "n_invalid", "n_anomalies", "n_updates")
# Once a batch looks like a change (threshold.surprised), the rest of it is learned in steps
# of this many points: small enough to follow a cluster that appears, large enough that a step's
# fixed cost (a refresh of the parameters) stays small (BENCHMARKS.md, detection quality: drift).
CAREFUL_STEP = 50
# Flagged points just past the threshold (see StreamQuantileThreshold.marginal_flags) at more than
# this many times q, smoothed with a half-life of threshold.adopt_window points, and more than this
# many of them in that window (at q = 1e-4: 17 q): they are learned (see _flag_learn).  A longer
# half-life at small q (10 / q) let a sine's run-away at q = 0.001 reach 3.4 q.
RUNAWAY_OVER_Q = 3.0
RUNAWAY_MIN_FLAGS = 5.0

__all__ = ["BatchResult", "Detector", "InputRecord", "OutputRecord", "STATE_KIND"]


def smoothed_share(share: float, mask: np.ndarray, half_life: float) -> float:
    """``share`` moved toward the fraction of True in ``mask`` (one step of points), as an
    exponential average with a half-life of ``half_life`` points: a step of n points weighs what
    n steps of one do."""
    if not len(mask):
        return share
    weight = -np.expm1(len(mask) * np.log(0.5) / half_life)
    return (1.0 - weight) * share + weight * float(np.mean(mask))


@dataclass(frozen=True)
class AdoptionChange:
    """Adoption started (``adopting``) or ended, with the smoothed flagged share and the points
    it had stayed above the adoption rate when it did."""

    adopting: bool
    flag_rate: float
    points_above: int


@dataclass
class BatchResult:
    n_records: int = 0
    anomalies: list[OutputRecord] = field(default_factory=list)
    dead_letters: list[OutputRecord] = field(default_factory=list)
    # One compact record per scored point, when kafka.scores_topic is set.
    scores: list[OutputRecord] = field(default_factory=list)
    invalid_reasons: Counter = field(default_factory=Counter)
    invalid_index: dict = field(default_factory=dict)  # record index -> its Invalid (reason, detail)
    invalid_example: str | None = None  # the first invalid record's detail, for the log
    n_valid: int = 0
    n_learned: int = 0
    n_flagged_learned: int = 0  # of them flagged (a regime adopted, or just past a threshold set too low)
    warmup_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    # Rows scored by the model, by record index, with their density, flag and component, and
    # the threshold that decided each (NaN while there is none): a batch is decided in steps
    # with the threshold re-estimated between them, so it is not the threshold after the batch.
    scored_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    log_density: np.ndarray = field(default_factory=lambda: np.empty(0))
    flags: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    components: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    thresholds: np.ndarray = field(default_factory=lambda: np.empty(0))
    latencies_seconds: np.ndarray = field(default_factory=lambda: np.empty(0))
    # Messages stamped more than FUTURE_TOLERANCE_SECONDS after the decision (a producer's clock
    # ahead, or timestamps in other units): not timed; the largest such lead, in seconds.
    n_future_timestamps: int = 0
    future_lead_seconds: float = 0.0
    # Each time adoption (threshold.adopt) started or ended in this batch, in order: a backlog
    # decided in steps can do both in one batch, which a look before and after would miss.
    adoption_changes: list[AdoptionChange] = field(default_factory=list)

    def outputs(self) -> list[OutputRecord]:
        """Every record this batch sends: anomalies, dead letters, scores."""
        return self.anomalies + self.dead_letters + self.scores

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

    def decision_thresholds(self) -> list:
        """Per input record: the threshold its decision used; None if it was not scored
        (invalid, or warm-up) or there was no threshold yet."""
        out: list = [None] * self.n_records
        for i, threshold in zip(self.scored_index.tolist(), self.thresholds.tolist()):
            out[i] = None if np.isnan(threshold) else threshold
        return out


# Message timestamps before this (2001-01-01) are not timed (see ``process``).
EARLIEST_TIMESTAMP_MS = 978_307_200_000
# ... nor those more than this after the decision (clocks of two hosts differ a little).
FUTURE_TOLERANCE_SECONDS = 1.0
# model.rare_weight: auto is the alert share asked for (threshold.quantile), never more than this,
# nor less than RARE_OVER_MIN_WEIGHT x model.min_weight (a component lighter than min_weight is
# re-seeded, and a re-seeded one must be able to start rare).
RARE_WEIGHT_CAP = 0.01
RARE_OVER_MIN_WEIGHT = 10.0


def rare_weight(config: Config) -> float:
    """model.rare_weight as a number (see ModelConfig in service/config.py for why auto is q).
    Under threshold.mode fixed, which asks for no share, auto is the cap."""
    value = config.model.rare_weight
    if value != "auto":
        return float(value)
    if config.threshold.mode == "fixed":
        return RARE_WEIGHT_CAP
    return min(RARE_WEIGHT_CAP, max(config.threshold.quantile, RARE_OVER_MIN_WEIGHT * config.model.min_weight))


def _model_params(config: Config) -> dict:
    """The OnlineGaussianMixture parameters that model.* sets, in the order a restore applies
    them (rare_weight: auto resolved, see ``rare_weight``)."""
    m = config.model
    return {"n_components": m.n_components, "covariance_type": m.covariance_type, "alpha": m.alpha, "t0": m.t0,
            "half_life": m.half_life, "reg_covar": m.reg_covar, "min_weight": m.min_weight,
            "rare_weight": rare_weight(config), "max_components": m.max_components, "warmup": m.warmup,
            "random_state": m.random_state}


class Detector:
    """Scores, flags and learns; owns the model, the threshold, counters and offsets."""

    def __init__(self, config: Config):
        self.config = config
        self.model = OnlineGaussianMixture(**_model_params(config))
        self.threshold = make_threshold(config.threshold)
        self.restore_notes: list[str] = []  # what a restore took from the config, or could not
        self.decoder = Decoder(config.input)
        self.offsets: dict[tuple[str, int], int] = {}
        self.n_valid = self.n_invalid = self.n_anomalies = self.n_updates = 0
        # Flagged points the model learned (a regime adopted, or just past a threshold that flags far
        # more than q): every valid point is learned but the flagged ones, less these.
        self.n_flagged_learned = 0
        # Smoothed fraction of scored points flagged (half-life threshold.adopt_window points),
        # for how many points in a row it has been above threshold.adopt_flag_rate, and the
        # flagged points counted with a half-life of 2 x threshold.adopt_after points (see
        # ``_learn_flagged``).
        self.flag_rate = 0.0
        # The smoothed share of points flagged just past the threshold (see _flag_learn).
        self.marginal_rate = 0.0
        self.points_above = 0
        self.flagged_memory = 0.0
        self._adopting = False  # from the start of an adoption until the rate falls below half
        self.grew_in_adoption = False  # the adoption under way has added its component
        self._geometry_cache: ComponentGeometry | None = None
        self._geometry_of: int | None = None  # the model version it is of

    @property
    def ready(self) -> bool:
        return self.model.is_initialized

    # ------------------------------------------------------------------ the work
    def process(self, batch, now: float) -> BatchResult:
        """Decide and learn one batch; ``now`` is the time of the decision (unix s).

        ``batch``: a list of InputRecords, or anything with their columns (``values``,
        ``timestamps_ms``, ``last_offsets``, ``record(i)``, ``len``), as the Kafka source's.
        """
        if isinstance(batch, list):
            batch = RecordBatch(batch)
        result = BatchResult(n_records=len(batch))
        decoded = self.decoder.decode(batch.values)
        max_value = self.config.kafka.dead_letter_max_bytes
        for invalid in decoded.invalid:
            record = batch.record(invalid.index)
            result.dead_letters.append(
                dead_letter(self.config.kafka.dead_letter_topic, record, invalid.reason, invalid.detail, max_value))
            result.invalid_reasons[invalid.reason] += 1
            result.invalid_index[invalid.index] = invalid
            if result.invalid_example is None:
                result.invalid_example = f"{invalid.reason}: {invalid.detail}"
        self.n_invalid += len(decoded.invalid)

        X, rows = decoded.X, decoded.valid_index
        result.n_valid = len(rows)
        self.n_valid += len(rows)
        if len(rows):
            if not self.model.is_initialized:
                # Warm-up: just enough points to initialise the model; nothing is flagged
                # before it exists, and the rest of the batch is scored by the new model.
                n_warm = min(len(rows), self.model.warmup - self.model.n_buffered_)
                warm = _across_partitions(batch, rows, n_warm)
                self.model.partial_fit(X[warm])
                result.n_learned = n_warm
                result.warmup_index = rows[warm]
                if self.config.kafka.scores_topic is not None:  # one record per message, warm-up too
                    result.scores += self._warmup_score_records(batch, rows[warm])
                X, rows = X[~warm], rows[~warm]
                self.threshold.update(self.model)
            parts = []
            careful = False
            while len(rows):
                # A young model's threshold is re-estimated often: a large batch (a backlog at
                # start) is taken in that many steps, each scored with the threshold refreshed
                # after the last, not all of it with the threshold of the warm-up model.
                step = self.threshold.points_before_refresh(self.model)
                n = len(rows) if step is None else min(len(rows), step)
                if careful:
                    n = min(n, CAREFUL_STEP)
                scored = self.model.score_batch(X[:n])
                flags = self.threshold.classify(scored.log_density)
                threshold = self.threshold.value  # what classify compared with; observe may move it
                if n > CAREFUL_STEP and self.threshold.surprised(scored.log_density, flags):
                    # Far more of these scores in the tail than usual: the stream may be changing
                    # (a cluster appearing, a shift).  The rest of the batch is scored and learned
                    # in small steps, so that the model follows within the batch: scored all at
                    # once, a new cluster's first points would all rank as the most anomalous.
                    careful, n = True, CAREFUL_STEP
                    scored, flags = scored.head(n), flags[:n]
                parts.append((*self._flag_learn(batch, X[:n], rows[:n], scored, flags, result, now),
                              np.full(n, np.nan if threshold is None else threshold)))
                X, rows = X[n:], rows[n:]
                self.threshold.update(self.model)
            if len(parts) == 1:
                (result.scored_index, result.log_density, result.flags, result.components,
                 result.thresholds) = parts[0]
            elif parts:
                (result.scored_index, result.log_density, result.flags, result.components,
                 result.thresholds) = map(np.concatenate, zip(*parts))
            stamps = batch.timestamps_ms[decoded.valid_index]
            # A timestamp before 2001 is a producer that set none of its own (1, or 0): timed, it
            # would put decades into the latency histogram's sum.
            has_stamp = stamps >= EARLIEST_TIMESTAMP_MS
            latencies = now - stamps[has_stamp] / 1000.0
            # Stamped in the future: timed as 0 they filled the lowest bucket without a word
            # (1,000 messages an hour ahead; helper-49).  Counted and said instead.
            future = latencies < -FUTURE_TOLERANCE_SECONDS
            if future.any():
                result.n_future_timestamps = int(np.count_nonzero(future))
                result.future_lead_seconds = float(-latencies[future].min())
            result.latencies_seconds = np.maximum(latencies[~future], 0.0)

        # The next offset after the last one processed, not the greatest ever seen: a topic made
        # again starts from 0, and librdkafka resets to it (auto.offset.reset) when the broker
        # says the old position is out of range; a maximum would keep committing the old one.
        self.offsets.update({key: offset + 1 for key, offset in batch.last_offsets.items()})
        return result

    def _flag_learn(self, batch, X, rows, scored, flags, result, now):
        """Report, flag and learn these scored rows; returns (rows, log_density, flags, components)."""
        components = scored.component
        if flags.any():
            result.anomalies += self._anomaly_records(batch, X, rows, scored, flags, iso_time(now))
        if self.config.kafka.scores_topic is not None:
            result.scores += self._score_records(batch, rows, scored, flags)
        self.n_anomalies += int(flags.sum())
        was_adopting = self.adopting
        learn_flagged = self._learn_flagged(flags)
        if self.adopting != was_adopting:
            result.adoption_changes.append(AdoptionChange(self.adopting, self.flag_rate, self.points_above))
        log_density = scored.log_density  # as decided: reported even if the model grows below
        # Glitches (absurd values, see ABSURD_SPREADS) are flagged and never learned, not even
        # while a regime is adopted: one of them would drag a component to it.
        absurd = np.zeros_like(flags)
        if flags.any():  # only flagged rows can be glitches: nothing on the path of the others
            absurd[flags] = np.abs(scored.X_internal[flags]).max(axis=1, initial=0.0) > ABSURD_SPREADS
        learned = (learn_flagged | ~flags) & ~absurd
        marginal = self.threshold.marginal_flags(log_density, flags) & ~absurd if flags.any() else flags
        runaway = flags.any() and not learn_flagged and self._flagging_just_past_too_often()
        learn_marginal = bool(marginal.any()) and runaway
        # While a regime is adopted its scores count in the threshold's tail too: the model
        # learns a spread that doubled, but its points, all flagged and kept out of the tail,
        # stayed below a threshold made of the old regime's scores (49 q at q = 0.01).  So do,
        # while flags just past the threshold come too often (it is too low), the flagged points
        # up to its z_far (the threshold keeps further ones out), whether or not the model learns
        # them (below): kept out as alarms (3 q of them at most), a spread growing fourfold held
        # the threshold low, 5-9 q flagged, under the rate that adopts a regime.  (All of them,
        # not only those of a batch with a marginal flag: the same rows in other batches would
        # count otherwise; review.)
        counted_in_full = self.adopting or ((flags & ~absurd) if runaway else False)
        self.threshold.observe(scored.log_density, flags, count_flagged=counted_in_full, points=X)
        if learn_marginal:
            # Flagged points just past the threshold, far more of them than q before this step:
            # the threshold is a little too low, and left out of the model they feed themselves.
            # A 1-d sine's values (density lowest and flat in the middle, a tail that ends)
            # flagged 0 points in 38,000, then the model, not learning the middle's flagged
            # points, thinned there, and 2-4% of the points were flagged (7.2 q at q = 0.001,
            # still 6.3 q over 150,000 points). Learned, they stop it. Only with threshold.adopt
            # (adopt: false keeps every flagged point out of the model), never further out than
            # two mean excesses of the tail (a first version reached five, and learned a cluster
            # of anomalies 20 times rarer than q that kept coming: unflagged after 16,000 points
            # instead of 32,000; review, helper-54).
            learned |= marginal
        self._count_marginal(marginal)
        if self._may_grow(flags & ~absurd):
            # A new regime: its own component (stretching the ones there are to it would take
            # them away from what they explain: a model that sized itself at one component
            # never adopted a cluster that appeared later), then learned as a batch of it.
            self.model.add_component(X[flags & ~absurd], weight=self.flag_rate)
            self.grew_in_adoption = True
            scored = self.model.score_batch(X)
        if learned.any():
            self.model.learn(scored, sample_weight=learned.astype(float))
            learned &= np.isfinite(scored.log_density)
            result.n_learned += int(np.count_nonzero(learned))
            flagged_learned = int(np.count_nonzero(learned & flags))
            self.n_flagged_learned += flagged_learned
            result.n_flagged_learned += flagged_learned
            self.n_updates += 1
        return rows, log_density, flags, components

    def _flagging_just_past_too_often(self) -> bool:
        """The smoothed rate of flags just past the threshold, before this step, over
        RUNAWAY_OVER_Q x q and over RUNAWAY_MIN_FLAGS flags in its window.  (It also learns
        the near points of a flood: 265-299 of a burst 4-6 sd off in one feature over 20% of
        10,000 rows at q = 0.001, recall 0.75-0.83 (helper-73).  Standing aside while the flags
        further out came at over 3 x the adoption rate kept them out, recall 0.95, but let a
        sine's values at 1e-4 run to 111 q (22 before) and a normal mean shift at 0.001 wait
        the whole adopt_after, 19,300-19,500 flagged instead of 6,700-8,300 (helper-75): taken
        back, fourteenth session.)"""
        t = self.config.threshold
        if not t.adopt:
            return False
        window = t.adopt_window / math.log(2.0)  # the points the smoothed rate weighs in all
        return self.marginal_rate > max(RUNAWAY_OVER_Q * t.quantile, RUNAWAY_MIN_FLAGS / window)

    def _count_marginal(self, marginal: np.ndarray) -> None:
        self.marginal_rate = smoothed_share(self.marginal_rate, marginal, self.config.threshold.adopt_window)

    @property
    def adopt_flag_rate(self) -> float | None:
        """The flag rate above which flagged points start to look like a regime, not anomalies."""
        t = self.config.threshold
        if not t.adopt:
            return None
        if t.adopt_flag_rate is not None:
            return t.adopt_flag_rate
        return 10.0 * (t.quantile if t.mode != "fixed" else 0.001)

    @property
    def adopting(self) -> bool:
        """True while a sustained excess of flagged points is being learned as a new regime."""
        return self.adopt_flag_rate is not None and self._adopting

    def _may_grow(self, flags) -> bool:
        """An adoption may add one component: the model sizes itself (model.n_components: auto)
        and is under model.max_components, and this step has points to seed it."""
        return (self.adopting and not self.grew_in_adoption and self.model.get_params()["n_components"] == "auto"
                and self.model.n_components_ < self.model.max_components and int(np.count_nonzero(flags)) >= 2)

    def _learn_flagged(self, flags) -> bool:
        """Whether this batch's flagged points are learned too.

        With learn_from_anomalies: false they are not, except once the smoothed flag rate has
        stayed above the adoption rate for threshold.adopt_after points: a flood of
        "anomalies" that long is a new regime (a cluster appearing, a shift), which the model
        must adopt or it flags it for ever.  A burst that ends sooner stays out of the model.
        Adoption goes on until the rate falls below half the adoption rate.

        A regime that comes back in spells shorter than adopt_after (a batch job that moves
        the mean for 7,500 points in every 15,000) is adopted too, once the flagged points,
        counted with a half-life of 2 x adopt_after points, reach adopt_after: about a third of
        the points flagged over the last ~60,000 (adopt_after 20,000).  Before, the count started
        again at each quiet spell and every spell was flagged for ever (51 q at q = 0.01).
        Bursts that flag less than that share of the stream never add up to it; a single flood
        reaches it later than adopt_after points in a row would.
        """
        t = self.config.threshold
        self.flag_rate = smoothed_share(self.flag_rate, flags, t.adopt_window)
        rate = self.adopt_flag_rate
        # The step's flags count as if at its middle: ten steps of 1,000 remember what one of
        # 10,000 does.
        half_life = 2.0 * max(t.adopt_after, 1)
        self.flagged_memory = (self.flagged_memory * 0.5 ** (len(flags) / half_life)
                               + int(flags.sum()) * 0.5 ** (len(flags) / (2.0 * half_life)))
        if rate is not None and self.flag_rate > (rate / 2.0 if self.adopting else rate):
            self.points_above += len(flags)
            self._adopting = (self._adopting or self.points_above >= t.adopt_after
                              or self.flagged_memory >= t.adopt_after)
        else:
            if self._adopting:
                # What came before this adoption is learned: a burst soon after it must not be
                # adopted at its first step on the memory of the flood (review, helper-51).
                self.flagged_memory = min(self.flagged_memory, t.adopt_after / 2.0)
            self.points_above = 0
            self._adopting = False
            self.grew_in_adoption = False
        return t.learn_from_anomalies or self.adopting

    # ------------------------------------------------------------ output records
    @property
    def feature_names(self) -> list[str]:
        """input.fields, else f0 .. f{D-1}."""
        fields = self.config.input.fields
        return list(fields) if fields is not None else [f"f{j}" for j in range(self.config.input.dimension)]

    def _geometry(self, scored) -> ComponentGeometry:
        """The model's components as explanations need them, once per model state."""
        if self._geometry_of != scored.model_version:
            self._geometry_cache, self._geometry_of = model_geometry(self.model), scored.model_version
        return self._geometry_cache

    def _anomaly_records(self, batch, X, rows, scored, flags, detected_at: str) -> list[OutputRecord]:
        """The flagged rows' anomaly records, explained (see ``explain``), all at once."""
        positions = np.flatnonzero(flags)
        X, density = X[positions], scored.log_density[positions]
        geometry = self._geometry(scored)
        names = self.feature_names
        explanation = explain(X, geometry, self.config.input.explain_top_features)
        threshold, model_version, n_seen = self.threshold.value, self.n_updates, self.model.n_seen_
        return [
            anomaly_record(self.config.kafka.output_topic, batch.record(row), {
                "features": features, "feature_names": names, "log_density": finite(d), "threshold": threshold,
                "component": component, "model_version": model_version, "n_seen": n_seen,
                "detected_at": detected_at, "rarity": rare, **explained})
            for row, features, d, component, rare, explained in zip(
                rows[positions].tolist(), X.tolist(), density.tolist(), scored.component[positions].tolist(),
                rarity_documents(rarity(density, self.threshold, geometry, points_learned=self.model.n_seen_)),
                explanation_documents(X, explanation, geometry, names))
        ]

    def _warmup_score_records(self, batch, rows) -> list[OutputRecord]:
        """Score records of warm-up rows: learned, not scored (log_density null, as replay says)."""
        empty = [None] * len(rows)
        return score_records(self.config.kafka.scores_topic, batch_sources(batch, rows.tolist()),
                             log_density=empty, threshold=None, flags=[False] * len(rows), components=empty,
                             tail_probability=empty, one_in=empty)

    def _score_records(self, batch, rows, scored, flags) -> list[OutputRecord]:
        """One compact record per scored row, for kafka.scores_topic."""
        log_tail = rarity(scored.log_density, self.threshold, self._geometry(scored),
                          points_learned=self.model.n_seen_).log_tail
        return score_records(
            self.config.kafka.scores_topic, batch_sources(batch, rows.tolist()),
            log_density=np.maximum(scored.log_density, LOWEST_FLOAT).tolist(), threshold=self.threshold.value,
            flags=flags.tolist(), components=scored.component.tolist(), tail_probability=np.exp(log_tail).tolist(),
            one_in=one_in(log_tail))

    # --------------------------------------------------------------------- state
    def state(self, now: float) -> dict:
        """Everything a checkpoint holds for this model; ``now`` stamps it (unix s)."""
        offsets: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(self.offsets.items()):
            offsets.setdefault(topic, {})[str(partition)] = int(offset)
        return {
            "kind": STATE_KIND,
            "streamgmm_version": __version__,
            "created_at": iso_time(now),
            "input": {"format": self.config.input.format, "dimension": self.config.input.dimension,
                      "fields": None if self.config.input.fields is None else list(self.config.input.fields)},
            "model": self.model.to_dict(),
            "threshold": self.threshold.to_dict(),
            "offsets": offsets,
            "counters": {**{name: getattr(self, name) for name in COUNTERS},
                         "flag_rate": self.flag_rate, "marginal_rate": self.marginal_rate, "points_above": self.points_above, "adopting": self._adopting,
                         "flagged_memory": self.flagged_memory,
                         "grew_in_adoption": self.grew_in_adoption, "n_flagged_learned": self.n_flagged_learned},
        }

    def restore(self, state: dict) -> None:
        """Take over a ``state()``; ValueError if it is not one this config can use."""
        try:
            self._restore(state)
        # A record of another shape; or numbers no model holds ("n_seen": Infinity is valid JSON
        # and overflowed int(): review of the eleventh session).
        except (KeyError, TypeError, IndexError, AttributeError, ArithmeticError) as exc:
            raise ValueError(f"its state record is malformed ({type(exc).__name__}: {exc}); point "
                             "checkpoint.dir (or checkpoint.topic) at a new one to start afresh") from None

    def _take_model_settings(self) -> list[str]:
        """The restored model takes the config's settings that a learned model can change (step
        sizes, forgetting, the covariance floor, rare_weight, and the warm-up's while it lasts):
        a restart is how an operator applies them.  Returns what changed, and what could not: a
        learned model keeps its size and covariance type."""
        m, model = self.config.model, self.model
        current = model.get_params(deep=False)
        # Not its size and covariance type (below), nor its random state (the checkpoint's goes
        # on); once learned, not the warm-up either: it is history, and also sets the step
        # size's offset (t0 null), as `streamgmm fit` counts an offline fit as that many points.
        kept = {"n_components", "covariance_type", "random_state"} | ({"warmup"} if model.is_initialized else set())
        wanted = {name: value for name, value in _model_params(self.config).items() if name not in kept}
        notes = []
        for name, value in wanted.items():
            if current[name] == value:
                continue
            try:
                model.set_params(**{name: value})
            except ValueError as exc:  # allowed by the config, not with this model's size
                notes.append(f"model.{name}: the config says {value!r}, which the checkpoint's model cannot "
                             f"take ({exc}): it keeps {current[name]!r}")
            else:
                notes.append(f"model.{name} is now {value!r} (the checkpoint's model had {current[name]!r})")
        for name in ("n_components", "covariance_type"):
            configured = getattr(m, name)
            if configured != current[name]:
                learned = (f", learned: {getattr(model, name + '_')!r}" if model.is_initialized else "")
                notes.append(f"model.{name}: the config says {configured!r} but the checkpoint's model has "
                             f"{current[name]!r}{learned}, which a learned model cannot change: it is kept; "
                             "to start a model of the new size, point checkpoint.dir (and checkpoint.topic) "
                             "at new ones")
        return notes

    def _restore(self, state: dict) -> None:
        if state.get("kind") != STATE_KIND:
            raise ValueError(f"not a detector checkpoint (kind={state.get('kind')!r})")
        dimension = state["input"]["dimension"]
        if dimension != self.config.input.dimension:
            raise ValueError(
                f"the checkpoint is for input.dimension={dimension}, the config says "
                f"{self.config.input.dimension}: use a new checkpoint.dir for a different feature set"
            )
        fields, configured = state["input"].get("fields"), self.config.input.fields
        if (None if fields is None else list(fields)) != (None if configured is None else list(configured)):
            # Also between names and none (arrays): objects mapped by names the model never had, or
            # arrays in an order the names no longer pin, could feed it features in another order
            # without a word (helper-56).  The README says a different input.fields is refused.
            said = "none (arrays)" if configured is None else list(configured)
            learned = "none (arrays)" if fields is None else list(fields)
            raise ValueError(
                f"the checkpoint's model was learned on input.fields {learned}, the config says "
                f"{said}: the same names in the same order, or a new checkpoint.dir for a new feature set"
            )
        self.model = OnlineGaussianMixture.from_dict(state["model"])
        self.restore_notes = self._take_model_settings()
        saved_quantile = state["threshold"].get("quantile")
        if state["threshold"]["mode"] != self.threshold.mode:
            self.restore_notes.append(f"threshold.mode is now {self.threshold.mode} (the checkpoint's threshold was "
                                      f"{state['threshold']['mode']}): it starts afresh")
        elif saved_quantile is not None and saved_quantile != getattr(self.threshold, "quantile", saved_quantile):
            self.restore_notes.append(f"threshold.quantile is now {self.threshold.quantile} (the checkpoint's threshold "
                                      f"was for {saved_quantile}): re-estimated from the stream's scores")
        elif saved_quantile is None and hasattr(self.threshold, "quantile"):
            self.restore_notes.append(f"the checkpoint's threshold does not say its quantile (written by an older "
                                      f"version): it is taken as is for threshold.quantile={self.threshold.quantile}")
        elif self.threshold.mode == "fixed" and state["threshold"].get("value") != self.threshold.value:
            self.restore_notes.append(f"threshold.value is now {self.threshold.value} (the checkpoint's was "
                                      f"{state['threshold'].get('value')})")
        if state["threshold"]["mode"] == self.threshold.mode:
            self.threshold.load_dict(state["threshold"])
        self.threshold.update(self.model)
        counters = state["counters"]
        for name in COUNTERS:
            setattr(self, name, int(counters[name]))
        self.flag_rate = float(counters.get("flag_rate", 0.0))
        self.marginal_rate = float(counters.get("marginal_rate", 0.0))
        self.n_flagged_learned = int(counters.get("n_flagged_learned", 0))
        self.points_above = int(counters.get("points_above", 0))
        self.flagged_memory = float(counters.get("flagged_memory", 0.0))
        # (A checkpoint from before the flag: adopting was points_above >= adopt_after.)
        self._adopting = bool(counters.get("adopting", self.points_above >= self.config.threshold.adopt_after))
        self.grew_in_adoption = bool(counters.get("grew_in_adoption", False))
        self.offsets = {
            (topic, int(partition)): int(offset)
            for topic, partitions in state["offsets"].items()
            for partition, offset in partitions.items()
        }


def _across_partitions(batch, rows: np.ndarray, n: int) -> np.ndarray:
    """Which ``n`` of these valid rows warm the model up: the first of each partition in turn.
    A backlog's batch holds one partition after another, and the first n rows were one
    partition's: a stream whose partitions carry different regimes (keyed by host) warmed up on
    one of them and flagged the others' (135 false alarms against 10; helper-39)."""
    warm = np.zeros(len(rows), dtype=bool)
    if n >= len(rows):
        warm[:] = True
        return warm
    topics, partitions, _, _ = batch_sources(batch, rows.tolist())
    if len(set(zip(topics, partitions))) == 1:
        warm[:n] = True
        return warm
    turn = np.empty(len(rows), dtype=np.int64)  # each row's place within its partition
    seen: Counter = Counter()
    for i, key in enumerate(zip(topics, partitions)):
        turn[i] = seen[key]
        seen[key] += 1
    warm[np.lexsort((np.arange(len(rows)), turn))[:n]] = True
    return warm

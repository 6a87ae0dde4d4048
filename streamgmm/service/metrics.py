"""Prometheus metrics and the /metrics, /healthz, /readyz endpoint.

All metrics live in one ``CollectorRegistry`` passed in (tests use a fresh one).  Names
carry the ``streamgmm`` namespace and their unit; label sets are small and bounded and the
known label values are created up front so dashboards see zeros, not gaps.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..detection.decode import REASONS

log = logging.getLogger(__name__)
NAMESPACE = "streamgmm"


class BatchHistogram(Collector):
    """A histogram that takes a whole numpy batch per call.

    prometheus_client's Histogram.observe costs about a microsecond per value under its
    lock; per-point observations would cost the daemon a large share of its throughput.
    """

    def __init__(self, name: str, documentation: str, buckets, registry: CollectorRegistry):
        self.name = f"{NAMESPACE}_{name}"
        self.documentation = documentation
        self.upper_bounds = np.append(np.asarray(buckets, dtype=float), np.inf)
        self._counts = np.zeros(len(self.upper_bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values) -> None:
        values = np.asarray(values, dtype=float)
        values = values[~np.isnan(values)]
        if not len(values):
            return
        # Bucket i counts values <= upper_bounds[i] (Prometheus "le"), hence side="left".
        counts = np.bincount(np.searchsorted(self.upper_bounds, values, side="left"), minlength=len(self.upper_bounds))
        total = float(np.sum(np.clip(values, -1e300, 1e300)))
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self):
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        buckets = [(floatToGoString(bound), int(count)) for bound, count in zip(self.upper_bounds, cumulative)]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class LagCollector(Collector):
    """``consumer_lag_messages{topic,partition}`` at scrape time: each assigned partition's high
    watermark minus the next offset the loop will process, both from the callables given (the
    daemon answers from what its loop last saw, or asks the broker when the loop has stalled)."""

    def __init__(self, positions: Callable[[], dict], watermarks: Callable[[], dict]):
        self.positions = positions
        self.watermarks = watermarks

    def collect(self):
        family = GaugeMetricFamily(f"{NAMESPACE}_consumer_lag_messages",
                                   "High watermark minus the next offset to process, per assigned input partition.",
                                   labels=["topic", "partition"])
        marks = self.watermarks()
        for (topic, partition), position in sorted(self.positions().items()):
            if (topic, partition) in marks:
                low, high = marks[(topic, partition)]
                family.add_metric([topic, str(partition)], float(max(high - max(position, low), 0)))
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_components: int = 64):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        counter, gauge, histogram = (partial(kind, namespace=NAMESPACE, registry=r)
                                     for kind in (Counter, Gauge, Histogram))
        self.messages_consumed = counter("messages_consumed", "Messages read from the input topics.")
        self.messages_valid = counter("messages_valid", "Messages that decoded to a valid feature vector.")
        self.invalid_messages = counter("invalid_messages", "Messages that failed decoding or validation, by reason.",
                                        ["reason"])
        for reason in REASONS:
            self.invalid_messages.labels(reason)
        self.dead_letters = counter("dead_letters", "Records produced to the dead-letter topic.")
        self.anomalies = counter("anomalies", "Anomaly records produced to the output topic.")
        self.model_updates = counter("model_updates", "Online EM steps taken (one per learned mini-batch).")
        self.points_learned = counter("points_learned", "Points the model learned from (warm-up included).")
        self.flagged_points_learned = counter(
            "flagged_points_learned", "Flagged points the model learned from all the same: while a new regime is "
            "adopted (threshold.adopt), or just past a threshold that flags far more than threshold.quantile.")
        self.produce_errors = counter(
            "produce_errors", "Output records that failed for a passing reason (timed out, broker unreachable), "
            "counted by the checkpoint or rewind that finds them; the rewind produces them again.")
        self.broker_errors = counter("broker_errors", "Kafka client errors caught by the loop (it retries).")
        self.log_density = BatchHistogram(
            "log_density", "Log-density of scored points.",
            (-1000, -300, -100, -60, -40, -30, -25, -20, -15, -10, -5, 0, 5, 10, 20, 50), r)
        self.threshold = gauge("threshold_log_density", "Current anomaly threshold on the log-density "
                               "(NaN until the warm-up is done).")
        self.threshold.set(math.nan)  # a 0.0 before the warm-up read as a threshold (helper-67)
        self.batch_seconds = histogram(
            "batch_processing_seconds", "Time to decode, score, decide and learn one polled batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.latency = BatchHistogram("end_to_end_latency_seconds", "From a message's timestamp to its decision.",
                                      (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), r)
        self.last_poll = gauge("last_poll_timestamp_seconds",
                               "Unix time of the loop's last poll of the broker (every poll, even an empty one).")
        self.rewinds = counter("rewinds", "Rewinds to the last checkpoint: after output the broker did not "
                               "acknowledge, partitions lost to the group, a commit the group refused, or a "
                               "failed checkpoint before a rebalance.")
        self.output_dropped = counter("output_records_dropped", "Output records the broker refused for good (too "
                                      "large, not authorised): logged with their source, never produced.")
        self.restore_failures = counter(
            "state_restore_failures", "scope: partition: failed attempts to restore a partition's model, one per "
            "partition and attempt (its state or the group's commit unreadable; the partition stays paused and "
            "is retried).")
        self.state_behind_group = counter(
            "state_behind_group", "scope: partition: partitions assigned whose restored state was behind the "
            "group's commit, or absent where the group had one: what was learned in between is in a state this "
            "member cannot see (another checkpoint.topic, a lost record, offsets moved by hand) and is not "
            "learned again.")
        self.future_timestamps = counter(
            "future_timestamps", "Messages stamped more than a second after their decision (a producer's clock "
            "ahead, or timestamps in other units): left out of end_to_end_latency_seconds.")
        self.resumed_without_commit = counter(
            "resumed_without_commit", "Partitions assigned at their checkpoint offset with no commit of the group "
            "for them: if the broker lost its data or the topic was made again, the new log's messages below that "
            "offset are skipped (the log names the partition and the offset).")
        self.checkpoints_unreadable = counter(
            "checkpoints_unreadable", "Checkpoint files skipped when restoring because they did not read back intact "
            "(truncated, corrupt, another format) or held what no model holds: an older one, or a new model, was "
            "used instead.")
        self.checkpoints = counter("checkpoints_written", "Checkpoints written successfully.")
        self.checkpoint_failures = counter("checkpoint_failures", "Checkpoint attempts that failed (retried).")
        self.checkpoint_copy_failures = counter(
            "checkpoint_local_copy_failures",
            "Checkpoints written to the state topic whose local copy in checkpoint.dir failed (scope: partition).")
        self.checkpoint_last_success = gauge("checkpoint_last_success_timestamp_seconds",
                                             "Unix time of the last successful checkpoint.")
        self.checkpoint_seconds = histogram(
            "checkpoint_duration_seconds", "Flush + write + commit time of a checkpoint.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.component_weight = gauge("component_weight", "Mixture weight per component.", ["component"])
        self.recent_log_likelihood = gauge("recent_mean_log_likelihood", "Median log-density of the points in the "
                                           "last scored batch (robust to outliers; NaN until one is scored).")
        self.recent_log_likelihood.set(math.nan)
        self.points_seen = gauge("model_points_seen", "Points the model has learned from (n_seen).")
        self.model_initialized = gauge("model_initialized", "1 once warm-up is complete.")
        self.partition_points_seen = gauge("partition_model_points_seen",
                                           "scope: partition: points each partition's model learned.", ["model"])
        self.partition_initialized = gauge("partition_model_initialized",
                                           "scope: partition: 1 once a partition's model is warm.", ["model"])
        # The model each of those two series was last set from: set again when another model takes
        # the key (a restore, a rewind), else only by the key's batches. (The model itself, not its
        # id: a replaced model's id can be reused by the next.)
        self._partition_models: dict[str, object] = {}
        self.assigned_partitions = gauge("assigned_partitions", "Input partitions assigned to this instance.")
        self.partitions_past_log_end = gauge(
            "partitions_past_log_end", "Assigned input partitions whose next offset is past the end of their log "
            "(the topic was recreated, or the broker lost data): nothing is read of them.")
        self.start_time = gauge("start_time_seconds", "When this process started (Unix seconds).")
        self.start_time.set(time.time())
        self.build = Info("build", "streamgmm build information.", namespace=NAMESPACE, registry=r)
        self.build.info({"version": __version__})
        self.max_components = max_components

    def observe_batch(self, result, detector, updates_before: int, seconds: float, partition_key: str | None) -> None:
        """Everything one processed batch moves (``result``: the detector's BatchResult)."""
        self.batch_seconds.observe(seconds)
        self.messages_consumed.inc(result.n_records)
        self.messages_valid.inc(result.n_valid)
        for reason, count in result.invalid_reasons.items():
            self.invalid_messages.labels(reason).inc(count)
        self.dead_letters.inc(len(result.dead_letters))
        self.anomalies.inc(len(result.anomalies))
        self.points_learned.inc(result.n_learned)
        self.flagged_points_learned.inc(result.n_flagged_learned)
        self.model_updates.inc(detector.n_updates - updates_before)
        self.log_density.observe_many(result.log_density)
        if len(result.log_density):
            # The median, not the mean: a few far outliers must not make the typical point look anomalous.
            self.recent_log_likelihood.set(float(np.median(result.log_density)))
        self.latency.observe_many(result.latencies_seconds)
        if result.n_future_timestamps:
            self.future_timestamps.inc(result.n_future_timestamps)
        self.observe_threshold(detector)
        if partition_key is None:
            self.observe_model(detector.model)
        else:
            self._observe_partition_model(partition_key, detector.model)

    def observe_threshold(self, detector) -> None:
        """NaN while the detector's model has none (a model started afresh kept showing the old
        model's threshold; review)."""
        self.threshold.set(math.nan if detector.threshold.value is None else detector.threshold.value)

    def _observe_partition_model(self, key: str, model) -> None:
        self.partition_initialized.labels(key).set(1 if model.is_initialized else 0)
        self.partition_points_seen.labels(key).set(model.n_seen_)
        self._partition_models[key] = model

    def observe_partition_models(self, models: dict, assigned: set | None = None, idle: frozenset = frozenset()) -> None:
        """scope: partition: the instance's model is initialized when every partition's it holds
        is, but for ``idle`` ones (no message yet: nothing to warm up on), at least one is, and
        every assigned one (``assigned``, model keys) has one (so StreamgmmNotReady sees one
        that never warms up), its points seen the sum; the per-partition series of partitions it
        no longer holds go, and those of the ones it holds are there from their assignment (not
        from their first batch: an idle partition had none)."""
        complete = assigned is None or assigned <= models.keys()
        fed = [m for key, m in models.items() if key not in idle]
        self.model_initialized.set(1 if fed and complete and all(m.is_initialized for m in fed) else 0)
        self.points_seen.set(sum(m.n_seen_ for m in models.values()))
        for key in self._partition_models.keys() - models.keys():
            self.partition_initialized.remove(key)
            self.partition_points_seen.remove(key)
            del self._partition_models[key]
        for key, model in models.items():
            if self._partition_models.get(key) is not model:  # new, restored or rewound
                self._observe_partition_model(key, model)

    def observe_model(self, model) -> None:
        self.model_initialized.set(1 if model.is_initialized else 0)
        self.points_seen.set(model.n_seen_)
        if model.is_initialized:
            for k, weight in enumerate(model.weights_[: self.max_components]):
                self.component_weight.labels(str(k)).set(float(weight))

    def watch_lag(self, positions: Callable[[], dict], watermarks: Callable[[], dict]) -> None:
        """Report consumer lag at scrape time (see LagCollector); once per Metrics."""
        self.registry.register(LagCollector(positions, watermarks))

    def value(self, name: str, labels: dict | None = None):
        """A sample value by full name (for tests and the demo)."""
        return self.registry.get_sample_value(name, labels or {})


def address_problem(host: str) -> str | None:
    """Why metrics could not be served on ``host`` (None: they could), by binding a free port
    there for a moment: an IPv6 address, a name that does not resolve, an address of another host."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except (OSError, UnicodeError) as exc:
        return (f"cannot serve metrics on {host}: {getattr(exc, 'strerror', None) or exc}; set metrics.host to an "
                "IPv4 address of this host (127.0.0.1, or 0.0.0.0 for all)")
    return None


class HealthServer:
    """Serves /metrics, /healthz (alive) and /readyz on host:port.

    ``readiness()`` gives (ready, one line in words, details as a dict).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 readiness: Callable[[], tuple[bool, str, dict]]):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self, head: bool = False):  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, status = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    body, ctype, status = b"ok\n", "text/plain", 200
                elif path == "/readyz":
                    ok, words, details = readiness()
                    # First line for humans and probes; then the state of each assigned partition.
                    body = f"{'ready' if ok else 'not ready'}: {words}\n{json.dumps(details)}\n".encode()
                    ctype, status = "text/plain", 200 if ok else 503
                else:
                    body, ctype, status = b"not found: try /metrics, /healthz or /readyz\n", "text/plain", 404
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):  # noqa: N802 (http.server API)
                # Load balancers and uptime checkers probe with HEAD: it was 501 Unsupported method.
                self.do_GET(head=True)

            def log_message(self, fmt, *args):  # keep scrapes out of the daemon's log
                log.debug("http %s", fmt % args)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a scraper that hung up: not our error
                log.debug("http client %s went away mid-response", client_address)

        try:
            self.server = Server((host, port), Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                what = "set metrics.port to a free port (or 0 for any) or stop what holds it"
            else:  # a name that does not resolve, an address not on this host
                what = "set metrics.host to an address of this host (127.0.0.1, or 0.0.0.0 for all)"
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}; {what}") from None
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="streamgmm-http", daemon=True)

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

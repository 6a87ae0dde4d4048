"""The Kafka loop: poll -> Detector.process -> produce -> checkpoint -> commit.

One ``while`` loop; the per-batch work lives in ``Detector`` (pure), I/O stays here.
With ``input.parallel_decode`` a helper process (``DecoderProcess``) decodes batch N, scores
it with a snapshot of the model and threshold as they stand after batch N-1 and computes its
EM statistics, while the loop polls batch N+1 (waiting for it about as long as the helper needs);
the batch is then decided, learned and produced here as usual.  A
polled batch is never skipped: checkpoints, rewinds and rebalance hooks first finish (or,
for a rewind, drop and re-read) the batch being decoded.

Delivery: a checkpoint (model + threshold + the next offset of every input partition) is
written only after the producer has flushed every anomaly and dead letter of the messages
it covers; the same offsets are then committed to the consumer group.  On start, and after
any produce failure, the newest valid checkpoint is loaded and every assigned partition is
sought to its offsets.  So each input message is scored, and learned from exactly once,
while anomaly records after the last checkpoint may be produced again (at-least-once output;
``source`` topic/partition/offset identify duplicates).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from .checkpoint import CheckpointError, CheckpointStore
from .config import Config, as_dict, masked, resolve_secrets
from .decode_process import DecoderProcess
from ..detection.detector import Detector, values_of
from .metrics import HealthServer, Metrics
from .statestore import GLOBAL_KEY, LocalStateStore, TopicStateStore, model_key

log = logging.getLogger(__name__)


# Smaller batches are processed at once, in-process.  A small batch means the daemon is
# caught up: latency then matters, not throughput, and handing the batch over and polling
# again meanwhile doubled the p50 and tripled the p99 latency (float32, 2,000 msg/s live).
HELPER_MIN_BATCH = 1000
# While the helper works on a batch, the loop polls the next one and waits for it at most
# this long per message handed over: about what the helper needs for them (2.3 us a JSON
# message, 0.8 float32), so 40 ms for a 20,000-message batch, 2 ms for 1,000.
# Not 0: a poll drains what the client has fetched, and the next fetch is often still on its
# way then; an empty poll used to send the loop to wait for the helper instead (about 40 ms a
# 16,000-message JSON batch, while the next records arrived unread).  1 us a message was not
# always enough for them to arrive.  Not more: the helper's results wait meanwhile, and with
# them the latency of a caught-up daemon's larger batches.
HELPER_POLL_MS_PER_MESSAGE = 0.002


class Polled(NamedTuple):
    """One model's share of a poll: its records, and the last offset of each partition in them."""

    records: list
    last_offsets: dict[tuple[str, int], int]


def n_records(by_key: dict[str, Polled]) -> int:
    """How many records a polled batch holds, over all its models."""
    return sum(len(polled.records) for polled in by_key.values())


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance hooks.

    kafka-python 3 runs them on the consumer's IO thread (the main thread is blocked inside
    poll() meanwhile), where blocking consumer calls are refused: commits are sent without
    waiting.
    """

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon

    async def on_partitions_revoked(self, revoked):
        try:
            self.daemon._on_revoked(revoked)
        except Exception:  # a failing hand-over must not kill the rebalance; the store still holds state
            log.exception("handing over revoked partitions failed")

    async def on_partitions_assigned(self, assigned):
        try:
            self.daemon._on_assigned(assigned)
        except Exception:
            log.exception("taking over assigned partitions failed")


class Daemon:
    """Runs until ``stop()``; survives broker outages; never exits on its own."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics(max_components=config.model.n_components)
        self.scope = config.model.scope
        self.local = LocalStateStore(config.checkpoint.dir, config.checkpoint.keep)
        self.topic_store: TopicStateStore | None = None
        # One detector per model key: "global", or "topic/partition" with scope: partition.
        self.detectors: dict[str, Detector] = {}
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.server: HealthServer | None = None
        self.assigned: set[TopicPartition] = set()
        self.last_checkpoint: Path | None = None
        self._stop = threading.Event()
        self._produce_failures = 0
        self._failure_lock = threading.Lock()
        self._since_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()
        self._last_lag_update = 0.0
        self._lag_labels: set[tuple[str, str]] = set()
        self._rewind_pending = False
        self._rewinds = 0
        self.decoder_process: DecoderProcess | None = None
        # A polled batch the helper process is working on, by model key.
        self._decoding: dict[str, Polled] | None = None
        # An error while processing a polled batch inside a rebalance hook: the loop re-raises it.
        self._fatal: BaseException | None = None

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint, commit and return (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def detector(self) -> Detector:
        """The global detector (scope: global)."""
        if GLOBAL_KEY not in self.detectors:
            self.detectors[GLOBAL_KEY] = Detector(self.config)
        return self.detectors[GLOBAL_KEY]

    def ready(self) -> bool:
        """Partitions assigned, and the model of every one of them initialised."""
        readiness = self.partition_readiness()
        return self.consumer is not None and bool(readiness) and all(readiness.values())

    def partition_readiness(self) -> dict[str, bool]:
        return {
            f"{tp.topic}/{tp.partition}": (key := model_key(self.scope, tp.topic, tp.partition)) in self.detectors
            and self.detectors[key].ready
            for tp in sorted(self.assigned)
        }

    # --------------------------------------------------------------- start-up
    def restore(self) -> None:
        """Load the newest valid checkpoint, or the ``model.init_from`` one, or start empty.

        With scope: partition, models are restored when their partitions are assigned.
        """
        self.detectors = {}
        if self.scope == "partition":
            return
        state = self.local.load(GLOBAL_KEY)
        if state is not None:
            self.detector.restore(state)
            log.info("restored the global model: n_valid=%d n_seen=%d offsets=%s",
                     self.detector.n_valid, self.detector.model.n_seen_, state["offsets"])
        elif self.config.model.init_from:
            self.detector.restore(self._initial_state())
        self.metrics.observe_model(self.detector.model)

    def _initial_state(self) -> dict:
        seed = CheckpointStore(self.config.model.init_from).load_latest()
        if seed is None:
            raise CheckpointError(f"model.init_from={self.config.model.init_from}: no valid checkpoint there")
        state, path = seed
        log.info("starting from the model in %s (n_seen=%d)", path, state["model"]["n_seen"])
        return {**state, "offsets": {}, "counters": {k: 0 for k in state["counters"]}}

    def _restore_partitions(self, tps) -> None:
        """scope: partition: a detector for each newly owned partition, from the shared store."""
        keys = {model_key(self.scope, tp.topic, tp.partition) for tp in tps} - set(self.detectors)
        if not keys:
            return
        states = self.topic_store.load_many(keys) if self.topic_store is not None else {}
        initial = None  # the model.init_from state, read once for all partitions that need it
        for key in sorted(keys):
            state = states.get(key) if self.topic_store is not None else self.local.load(key)
            detector = Detector(self.config)
            if state is not None:
                detector.restore(state)
                log.info("restored model %s: n_valid=%d n_seen=%d", key, detector.n_valid, detector.model.n_seen_)
            elif self.config.model.init_from:
                initial = initial or self._initial_state()
                detector.restore(copy.deepcopy(initial))  # no arrays shared between partitions' models
            self.detectors[key] = detector

    def _kafka_settings(self, section) -> dict:
        k = self.config.kafka
        settings = {"bootstrap_servers": list(k.bootstrap_servers), "client_id": k.client_id}
        settings.update(resolve_secrets(k.security, "kafka.security"))
        settings.update(resolve_secrets(section, "kafka"))
        return settings

    def _connect(self) -> None:
        k = self.config.kafka
        consumer_settings = {
            "group_id": k.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": k.auto_offset_reset,
            "max_poll_records": k.max_batch_messages,
            "fetch_max_wait_ms": 100,
            "session_timeout_ms": 10_000,
            "heartbeat_interval_ms": 3_000,
            # Give up a connection attempt soon, so an outage is logged and a stop is honoured.
            "bootstrap_timeout_ms": 5_000,
            **self._kafka_settings(k.consumer),
        }
        producer_settings = {
            "acks": "all",
            "linger_ms": 5,
            # Output is at-least-once and deduplicable by source offsets; the idempotent
            # producer adds nothing to that and cannot survive some broker restarts.
            "enable_idempotence": False,
            "max_block_ms": 10_000,
            "bootstrap_timeout_ms": 5_000,
            **self._kafka_settings(k.producer),
        }
        backoff = k.retry_backoff_initial_seconds
        while not self.stopping:
            try:
                self.producer = KafkaProducer(**producer_settings)
                self.consumer = KafkaConsumer(**consumer_settings)
                # Fetch the output topics' metadata now (auto-creating them where the broker
                # does): the first anomaly should not wait for it, and a typo shows at start.
                for topic in (k.output_topic, k.dead_letter_topic):
                    self.producer.partitions_for(topic)
                if self.config.checkpoint.topic:
                    client_settings = self._kafka_settings({})
                    self.topic_store = TopicStateStore(self.config.checkpoint.topic, client_settings, self.producer)
                    self.topic_store.ensure_topic(client_settings)
                self.consumer.subscribe(list(k.input_topics), listener=_Listener(self))
                log.info("connected to %s; subscribed to %s", ",".join(k.bootstrap_servers), ",".join(k.input_topics))
                return
            except (KafkaError, OSError) as exc:
                self.metrics.broker_errors.inc()
                self._close_clients()
                log.warning("cannot connect to Kafka at %s (%s); retrying in %.1f s",
                            ",".join(k.bootstrap_servers), exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, k.retry_backoff_max_seconds)

    # ------------------------------------------------------- rebalance callbacks
    def _on_assigned(self, assigned) -> None:
        self._finish_decoding()
        if self.scope == "partition":
            self._restore_partitions(assigned)
        for tp in assigned:
            self.assigned.add(tp)
            self._seek_to_state(tp)
        self.metrics.assigned_partitions.set(len(self.assigned))
        log.info("assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))

    def _seek_to_state(self, tp) -> None:
        """Seek to where this partition's model stands (its checkpoint's offset)."""
        offset = self._offset(tp)
        if offset is not None:
            self.consumer.seek(tp, offset)
        # else: the group's committed offset, or auto_offset_reset

    def _on_revoked(self, revoked) -> None:
        # Hand over cleanly: everything polled so far is processed, checkpointed and committed
        # before the partitions go, so their next owner starts exactly where we stopped.
        self._finish_decoding()
        if revoked and self.consumer is not None and self._since_checkpoint:
            self.checkpoint(in_rebalance=True)
        for tp in revoked:
            self.assigned.discard(tp)
            if (tp.topic, str(tp.partition)) in self._lag_labels:
                self._lag_labels.discard((tp.topic, str(tp.partition)))
                self.metrics.lag.remove(tp.topic, str(tp.partition))
            if self.scope == "partition":
                self.detectors.pop(model_key(self.scope, tp.topic, tp.partition), None)
            elif GLOBAL_KEY in self.detectors:
                # Handed over (checkpointed and committed above): if the partition comes back,
                # continue from the group's committed offset, not from our older position.
                self.detectors[GLOBAL_KEY].offsets.pop((tp.topic, tp.partition), None)
        self.metrics.assigned_partitions.set(len(self.assigned))
        log.info("revoked %s", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        self.restore()
        cfg = self.config
        log.info("effective config: %s", masked(as_dict(cfg)))
        if self.scope == "partition" and not cfg.checkpoint.topic:
            log.warning("model.scope=partition without checkpoint.topic: partition models stay on this "
                        "instance's disk and cannot follow their partitions to other instances")
        if cfg.metrics.enabled:
            self.server = HealthServer(self.metrics.registry, cfg.metrics.host, cfg.metrics.port, self.ready,
                                       lambda: {"partitions": self.partition_readiness()}).start()
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, self.server.port)
        if cfg.input.parallel_decode:
            self.decoder_process = DecoderProcess(cfg.input)
        try:
            self._connect()
            backoff = cfg.kafka.retry_backoff_initial_seconds
            while not self.stopping:
                polled: dict[str, Polled] = {}
                try:
                    # While the helper process works on the previous batch, wait for the next one
                    # only briefly: that batch's results are not to be held up.
                    timeout_ms = cfg.kafka.poll_timeout_ms
                    if self._decoding is not None:
                        helper_ms = int(n_records(self._decoding) * HELPER_POLL_MS_PER_MESSAGE)
                        timeout_ms = min(helper_ms, timeout_ms)
                    polled = self._poll(timeout_ms)
                    backoff = cfg.kafka.retry_backoff_initial_seconds
                except KafkaError as exc:
                    # The client reconnects by itself; pause so an outage does not spin the CPU.
                    self.metrics.broker_errors.inc()
                    log.warning("Kafka error in the loop (%s); retrying in %.1f s", exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, cfg.kafka.retry_backoff_max_seconds)
                if self._fatal is not None:
                    raise self._fatal
                rewinds = self._rewinds
                if self._rewind_pending:
                    self._rewind_pending = False
                    self._rewind("output records were not acknowledged during a rebalance")
                self._finish_decoding()
                self._checkpoint_if_due()
                # A rewind sought the consumer back to the checkpoint: what was polled before
                # it is read again from there, so it is dropped here.
                if polled and self._rewinds == rewinds:
                    self._start(polled)
                self._update_lag_if_due()
            self._finish_decoding()
            if self.consumer is not None and self.producer is not None:
                self.checkpoint()
        finally:
            if self.decoder_process is not None:
                self.decoder_process.close()
                self.decoder_process = None
            self._decoding = None
            self._close_clients()
            if self.server is not None:
                self.server.stop()
            log.info("stopped")

    def _poll(self, timeout_ms: int) -> dict[str, Polled]:
        """The next batch of records, grouped by model key."""
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.config.kafka.max_batch_messages)
        # kafka-python's ConsumerRecord has the attributes of InputRecord: no copy needed.
        by_key: dict[str, Polled] = {}
        for tp, batch in polled.items():
            if tp in self.assigned and batch:  # records of a partition revoked during this poll are not ours
                key = model_key(self.scope, tp.topic, tp.partition)
                if key not in by_key:
                    by_key[key] = Polled([], {})
                by_key[key].records.extend(batch)
                # A partition's records come in offset order: its last is its highest.
                by_key[key].last_offsets[(tp.topic, tp.partition)] = batch[-1].offset
        return by_key

    def _start(self, by_key: dict[str, Polled]) -> None:
        """Hand a polled batch to the helper process, or process it now (no helper, or a
        small batch)."""
        helper = self.decoder_process is not None and self.decoder_process.alive
        if helper and n_records(by_key) >= HELPER_MIN_BATCH:
            # Each model and threshold as they stand now, after every earlier batch: the
            # helper scores with them.
            scorings = []
            for key in by_key:
                detector = self.detectors.get(key)
                ready = detector is not None and detector.ready
                scorings.append((detector.model.scoring_model(), detector.threshold.value) if ready else None)
            self.decoder_process.submit([values_of(polled.records) for polled in by_key.values()], scorings)
            self._decoding = by_key
        else:
            for key, polled in by_key.items():
                self._process(key, polled)

    def _finish_decoding(self) -> None:
        """Process the batch the helper process has been working on (if any)."""
        by_key, self._decoding = self._decoding, None
        if by_key is None:
            return
        try:
            results = self.decoder_process.results() or [(None, None)] * len(by_key)  # None: do it here
            for (key, polled), (decoded, scored) in zip(by_key.items(), results):
                self._process(key, polled, decoded, scored)
        except BaseException as exc:
            # Polled records that were not processed must not be skipped over by later
            # checkpoints: the loop stops on this error rather than go on past them.
            self._fatal = exc
            raise

    def _update_lag_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_update > 2.0:
            self._last_lag_update = now
            self._update_lag()

    def _process(self, key: str, polled: Polled, decoded=None, scored=None) -> None:
        started = time.perf_counter()
        records = polled.records
        detector = self.detectors.get(key)
        if detector is None:  # scope: global before restore, or a partition restored lazily
            detector = self.detectors[key] = Detector(self.config)
        updates_before = detector.n_updates
        result = detector.process(records, decoded=decoded, scored=scored, last_offsets=polled.last_offsets)
        try:
            for out in result.anomalies + result.dead_letters:
                future = self.producer.send(out.topic, value=out.value, key=out.key, headers=out.headers)
                future.add_errback(self._on_produce_error, out.topic)
        except KafkaError as exc:
            self._on_produce_error(exc, "send")
        m = self.metrics
        m.batch_seconds.observe(time.perf_counter() - started)
        m.messages_consumed.inc(len(records))
        m.messages_valid.inc(result.n_valid)
        for reason, count in result.invalid_reasons.items():
            m.invalid_messages.labels(reason).inc(count)
        m.dead_letters.inc(len(result.dead_letters))
        m.anomalies.inc(len(result.anomalies))
        m.points_learned.inc(result.n_learned)
        m.model_updates.inc(detector.n_updates - updates_before)
        m.log_density.observe_many(result.log_density)
        if len(result.log_density):
            m.recent_log_likelihood.set(float(np.mean(np.maximum(result.log_density, -1e300))))
        m.latency.observe_many(result.latencies_seconds)
        if detector.threshold.value is not None:
            m.threshold.set(detector.threshold.value)
        if self.scope == "global":
            m.observe_model(detector.model)
        else:
            m.observe_partition(key, detector.model)
        self._since_checkpoint += len(records)

    def _on_produce_error(self, exc, topic) -> None:
        with self._failure_lock:
            self._produce_failures += 1
        self.metrics.produce_errors.inc()
        log.error("producing to %s failed: %s (will rewind to the last checkpoint)", topic, exc)

    def _offset(self, tp) -> int | None:
        detector = self.detectors.get(model_key(self.scope, tp.topic, tp.partition))
        return None if detector is None else detector.offsets.get((tp.topic, tp.partition))

    def _update_lag(self) -> None:
        for tp in list(self.assigned):
            try:
                highwater = self.consumer.highwater(tp)
            except (KafkaError, AssertionError):
                continue
            if highwater is None:
                continue
            position = self._offset(tp) or 0
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))
            self._lag_labels.add((tp.topic, str(tp.partition)))

    # ------------------------------------------------------------- checkpoints
    def _checkpoint_if_due(self) -> None:
        c = self.config.checkpoint
        elapsed = time.monotonic() - self._last_checkpoint_time
        if self._since_checkpoint >= c.interval_messages or (self._since_checkpoint and elapsed >= c.interval_seconds):
            self.checkpoint()

    def checkpoint(self, in_rebalance: bool = False) -> bool:
        """Flush outputs, write every model's checkpoint, commit their offsets.

        False if it did not happen (then nothing is committed past the last good checkpoint).
        ``in_rebalance``: called from a rebalance hook on the consumer's IO thread, where the
        commit is sent without waiting and a rewind is left to the main loop.
        """
        started = time.perf_counter()
        self._last_checkpoint_time = time.monotonic()
        try:
            self.producer.flush(timeout=30)
        except KafkaError as exc:
            self._on_produce_error(exc, "flush")
        with self._failure_lock:
            failures, self._produce_failures = self._produce_failures, 0
        if failures:
            self.metrics.checkpoint_failures.inc()
            if in_rebalance:
                self._rewind_pending = True
            else:
                self._rewind(f"{failures} output record(s) were not acknowledged")
            return False
        try:
            paths = []
            for key, detector in sorted(self.detectors.items()):
                state = detector.state()
                paths.append(self.local.write(key, state))
                if self.topic_store is not None:
                    self.topic_store.write(key, state)
            if self.topic_store is not None:
                self.producer.flush(timeout=30)
                with self._failure_lock:
                    failed, self._produce_failures = self._produce_failures, 0
                if failed:
                    raise CheckpointError(f"{failed} state record(s) not acknowledged by {self.topic_store.topic}")
        except (CheckpointError, KafkaError) as exc:
            self.metrics.checkpoint_failures.inc()
            # Keep scoring; offsets stay uncommitted past the last good checkpoint. Retry soon.
            retry_in = min(5.0, self.config.checkpoint.interval_seconds)
            self._last_checkpoint_time = time.monotonic() - self.config.checkpoint.interval_seconds + retry_in
            log.error("checkpoint failed: %s; retrying in %.0f s", exc, retry_in)
            return False
        self.last_checkpoint = paths[-1] if paths else None
        self._since_checkpoint = 0
        self._commit(wait=not in_rebalance)
        duration = time.perf_counter() - started
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_seconds.observe(duration)
        self.metrics.checkpoint_last_success.set(time.time())
        log.info("checkpoint of %d model(s) written in %.3f s (%s)", len(paths), duration,
                 ", ".join(f"{k}: n_valid={d.n_valid} n_seen={d.model.n_seen_}" for k, d in sorted(self.detectors.items())))
        return True

    def _commit(self, wait: bool = True) -> None:
        offsets = {}
        for tp in self.assigned:
            offset = self._offset(tp)
            if offset is not None:
                offsets[tp] = OffsetAndMetadata(offset, "", -1)
        if not offsets:
            return
        try:
            if wait:
                self.consumer.commit(offsets)
            else:
                # Queued on the coordinator connection ahead of the re-join that follows.
                self.consumer._coordinator.commit_offsets_async(offsets)
        except KafkaError as exc:
            # The checkpoint, not the group's offsets, is what a restart resumes from.
            log.warning("offset commit failed (%s); the checkpoint holds the offsets", exc)

    def _rewind(self, why: str) -> None:
        """Back to the newest checkpoints: reload their state and seek to their offsets."""
        log.error("%s: rewinding to the last checkpoint", why)
        self._rewinds += 1
        if self._decoding is not None:  # read again after the seek; collect the result to keep in step
            self._decoding = None
            self.decoder_process.results()
        self.restore()
        if self.scope == "partition":
            self._restore_partitions(self.assigned)
        for tp in list(self.assigned):
            offset = self._offset(tp)
            try:
                if offset is not None:
                    self.consumer.seek(tp, offset)
                else:
                    committed = self.consumer.committed(tp)
                    if committed is not None:
                        self.consumer.seek(tp, committed)
                    elif self.config.kafka.auto_offset_reset == "earliest":
                        self.consumer.seek_to_beginning(tp)
                    else:
                        self.consumer.seek_to_end(tp)
            except (KafkaError, AssertionError) as exc:
                log.warning("cannot seek %s/%d: %s", tp.topic, tp.partition, exc)
        self._since_checkpoint = 0

    def _close_clients(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except Exception as exc:  # closing is best effort at shutdown
                log.warning("closing the consumer: %s", exc)
            self.consumer = None
        if self.producer is not None:
            try:
                self.producer.close(timeout=10)
            except Exception as exc:
                log.warning("closing the producer: %s", exc)
            self.producer = None
        self.assigned.clear()

"""Typed, frozen daemon configuration: YAML file + ``STREAMGMM_*`` environment overrides.

Every key is checked at start-up: unknown keys, wrong types and out-of-range values fail
with the key path, the value given and what is allowed.  ``load_config`` is the one entry.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

ENV_PREFIX = "STREAMGMM_"
SECRET_WORDS = ("password", "secret", "token", "credential")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key path."""


def _frozen_mapping(default=None):
    return field(default_factory=lambda: types.MappingProxyType(dict(default or {})))


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: tuple[str, ...] = ("127.0.0.1:9092",)
    input_topics: tuple[str, ...] = ("features",)
    output_topic: str = "anomalies"
    dead_letter_topic: str = "features.dead-letter"
    group_id: str = "streamgmm"
    client_id: str = "streamgmm"
    # Where a partition with no checkpoint and no committed offset starts.
    auto_offset_reset: str = "earliest"
    # One poll returns at most this many messages; it waits at most poll_timeout_ms for them.
    # A poll returns what the client has fetched, so a live stream still gets small batches
    # and low latency; a backlog is taken in large ones.
    max_batch_messages: int = 10_000
    poll_timeout_ms: int = 100
    # Broker outage handling: first and largest pause between reconnect attempts, and between
    # rewinds after output the broker did not acknowledge.
    retry_backoff_initial_seconds: float = 0.5
    retry_backoff_max_seconds: float = 30.0
    # A dead letter's value is cut to this many bytes (the original size and SHA-256 go in its
    # headers): the broker refuses records over its message.max.bytes, and a record that can
    # never be produced must not hold the stream up.
    dead_letter_max_bytes: int = 65_536
    # Every scored point, as one compact JSON record (source, key, log_density, threshold,
    # anomaly flag, component, rarity), to this topic for dashboards and downstream rules;
    # null: none.  One output record per input message: budget the producer for it.
    scores_topic: str | None = None
    # Settings passed to librdkafka under its own names (https://github.com/confluentinc/
    # librdkafka/blob/master/CONFIGURATION.md): security to every client, consumer and producer
    # to that client.  A key ending in _file is read from that file (sasl.password_file), so
    # secrets need not sit in the YAML.  Unknown names are refused at start.
    security: Mapping[str, Any] = _frozen_mapping()
    consumer: Mapping[str, Any] = _frozen_mapping()
    producer: Mapping[str, Any] = _frozen_mapping()


@dataclass(frozen=True)
class InputConfig:
    format: str = "json"
    fields: tuple[str, ...] | None = None
    dimension: int = 16
    max_message_bytes: int = 1_048_576
    csv_delimiter: str = ","
    # An anomaly record names the features furthest from what its nearest component expects
    # given the others: this many of them (0: none).
    explain_top_features: int = 3


@dataclass(frozen=True)
class ModelConfig:
    # auto: chosen at warm-up, with the covariance type, by BIC over MAP EM fits of 1 to
    # max_components components; or a fixed number of components.
    n_components: int | str = "auto"
    covariance_type: str = "auto"
    max_components: int = 8
    warmup: int = 1000
    alpha: float = 1.0
    t0: float | None = None
    half_life: float | None = None
    reg_covar: float = 1e-6
    min_weight: float = 1e-4
    # Components lighter than this are "rare structure": points they explain are scored by
    # the other components, so a small cluster of anomalies the model absorbed stays anomalous.
    rare_weight: float = 0.05
    random_state: int | None = 0
    # global: one model for everything this process consumes; partition: one model per input
    # partition, whose state follows the partition across the consumer group.
    scope: str = "global"
    # A checkpoint directory (e.g. written by `streamgmm fit`) to start from when the
    # daemon's own checkpoint directory is empty.
    init_from: str | None = None


@dataclass(frozen=True)
class ThresholdConfig:
    mode: str = "quantile"
    quantile: float = 0.001
    value: float | None = None
    learn_from_anomalies: bool = False
    # ... except, with adopt: true, once the smoothed fraction of flagged points (half-life
    # adopt_window points) has stayed above adopt_flag_rate (null: 10 x quantile) for
    # adopt_after points: then the stream has changed and flagged points are learned too, so a
    # new cluster becomes normal instead of being flagged for ever; a shorter burst is not.
    adopt: bool = True
    adopt_flag_rate: float | None = None
    adopt_window: int = 2_000
    adopt_after: int = 20_000
    # Quantile mode: the tail of the prequential scores of the last `window` unflagged points
    # (null: max(20000, 20/q)) gives the threshold (from the 300th scored point; before it, the
    # model's density quantile at q/100); for the first `calibration` points (null:
    # max(5000, 1/q)) flagged points count too, after that they are alarms kept out of it.
    window: int | None = None
    calibration: int | None = None
    # model_quantile mode (and the quantile mode's start): re-estimate from the model's own
    # distribution every this many learned points (more often while the model is young),
    # from this many points sampled from the mixture (default max(10000, 20/q)).
    refresh_every: int = 50_000
    samples: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "./state"
    interval_seconds: float = 30.0
    interval_messages: int = 100_000
    keep: int = 3
    # A (compacted) Kafka topic holding one state record per model key; with model.scope:
    # partition, an instance that gains a partition restores its model from here.
    topic: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "input.format": ("json", "csv", "float32", "float64"),
    "model.covariance_type": ("auto", "full", "tied", "diag", "spherical"),
    "model.scope": ("global", "partition"),
    "threshold.mode": ("quantile", "model_quantile", "fixed"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "logging.format": ("text", "json"),
    "kafka.auto_offset_reset": ("earliest", "latest"),
}


# ------------------------------------------------------------------------ building
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, path):
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[1:]:  # int | str: an integer, else a word such as "auto"
            try:
                return _coerce(value, alternative, path)
            except ConfigError:
                pass
        return _coerce(value, inner[0], path)
    if origin is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (allowed here: {', '.join(names)}); check for a typo"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key_path = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key_path)
        else:
            kwargs[name] = _coerce(data[name], tp, key_path)
    return cls(**kwargs)


def _set_path(tree: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"environment override for {'.'.join(keys)} conflicts with a non-mapping value")
    tree[keys[-1]] = value


PASS_THROUGH_SECTIONS = ("security", "consumer", "producer")


def _librdkafka_name(env_key: str) -> str:
    """An environment variable can hold no dot: ``sasl_password`` -> ``sasl.password``
    (librdkafka's names have none of their own underscores), ``sasl_password_file`` ->
    ``sasl.password_file``."""
    base, is_file = (env_key[: -len("_file")], True) if env_key.endswith("_file") else (env_key, False)
    return base.replace("_", ".") + ("_file" if is_file else "")


def apply_env_overrides(raw: dict, environ: Mapping[str, str]) -> dict:
    """``STREAMGMM_KAFKA__BOOTSTRAP_SERVERS=a:9092,b:9092`` sets kafka.bootstrap_servers.

    Values are parsed as YAML scalars (numbers, true/false, null, [lists]).  Under
    kafka.security / consumer / producer the key is librdkafka's name with dots written as
    underscores: ``STREAMGMM_KAFKA__SECURITY__SASL_PASSWORD`` sets ``sasl.password``.
    """
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if len(keys) == 3 and keys[0] == "kafka" and keys[1] in PASS_THROUGH_SECTIONS:
            keys[2] = _librdkafka_name(keys[2])
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        _set_path(raw, keys, value)
    return raw


def _check_values(config: Config) -> None:
    def fail(path, value, allowed):
        raise ConfigError(f"{path}: {value!r} is not allowed; {allowed}")

    for path, choices in CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(config, section), key)
        if value not in choices:
            fail(path, value, f"use one of {', '.join(choices)}")
    k, i, m, t, c, me = config.kafka, config.input, config.model, config.threshold, config.checkpoint, config.metrics
    if not k.bootstrap_servers:
        fail("kafka.bootstrap_servers", k.bootstrap_servers, "give at least one host:port")
    for n, server in enumerate(k.bootstrap_servers):
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            fail(f"kafka.bootstrap_servers[{n}]", server, "use host:port with a port from 1 to 65535")
    if not k.input_topics or any(not t_ for t_ in k.input_topics):
        fail("kafka.input_topics", k.input_topics, "give at least one non-empty topic name")
    for key in ("output_topic", "dead_letter_topic", "group_id"):
        if not getattr(k, key):
            fail(f"kafka.{key}", getattr(k, key), "give a non-empty name")
    if set(k.input_topics) & {k.output_topic, k.dead_letter_topic}:
        fail("kafka.output_topic", k.output_topic, "the output and dead-letter topics must differ from the inputs")
    if k.max_batch_messages < 1:
        fail("kafka.max_batch_messages", k.max_batch_messages, "use an integer >= 1")
    if k.poll_timeout_ms < 0:
        fail("kafka.poll_timeout_ms", k.poll_timeout_ms, "use an integer >= 0")
    if not 0 < k.retry_backoff_initial_seconds <= k.retry_backoff_max_seconds:
        fail("kafka.retry_backoff_initial_seconds", k.retry_backoff_initial_seconds,
             "use a number > 0 and <= kafka.retry_backoff_max_seconds")
    if k.dead_letter_max_bytes < 0:
        fail("kafka.dead_letter_max_bytes", k.dead_letter_max_bytes, "use a number of bytes >= 0")
    if k.scores_topic is not None and (not k.scores_topic or k.scores_topic in k.input_topics
                                       or k.scores_topic in (k.output_topic, k.dead_letter_topic)):
        fail("kafka.scores_topic", k.scores_topic, "use a topic of its own, or null for no scores")
    if i.explain_top_features < 0:
        fail("input.explain_top_features", i.explain_top_features, "use a number of features >= 0")
    if i.dimension < 1:
        fail("input.dimension", i.dimension, "use an integer >= 1")
    if i.fields is not None and len(i.fields) != i.dimension:
        fail("input.fields", i.fields, f"list exactly input.dimension={i.dimension} field names")
    if i.max_message_bytes < 1:
        fail("input.max_message_bytes", i.max_message_bytes, "use an integer >= 1")
    if len(i.csv_delimiter) != 1:
        fail("input.csv_delimiter", i.csv_delimiter, "use a single character")
    auto_components = m.n_components == "auto"
    if not auto_components and (isinstance(m.n_components, str) or m.n_components < 1):
        fail("model.n_components", m.n_components, "use an integer >= 1, or auto")
    if m.max_components < 1:
        fail("model.max_components", m.max_components, "use an integer >= 1")
    largest = m.max_components if auto_components else m.n_components
    if not auto_components and m.warmup < 2 * m.n_components:
        fail("model.warmup", m.warmup, f"use at least 2 * model.n_components = {2 * m.n_components}")
    if m.warmup < 2:
        fail("model.warmup", m.warmup, "use at least 2 points")
    if not 0.5 < m.alpha <= 1.0:
        fail("model.alpha", m.alpha, "use a number in (0.5, 1]")
    if m.half_life is not None and m.half_life <= 0:
        fail("model.half_life", m.half_life, "use a number of points > 0, or null for no forgetting")
    if m.t0 is not None and m.t0 <= 0:
        fail("model.t0", m.t0, "use a number > 0, or null for model.warmup")
    if m.reg_covar <= 0:
        fail("model.reg_covar", m.reg_covar, "use a number > 0")
    if not 0 <= m.min_weight < 1.0 / largest:
        fail("model.min_weight", m.min_weight,
             f"use a number in [0, 1/model.{'max_components' if auto_components else 'n_components'})")
    if not 0 <= m.rare_weight < 1.0:
        fail("model.rare_weight", m.rare_weight, "use a weight in [0, 1); 0 scores by the whole mixture")
    if t.mode != "fixed" and not 0 < t.quantile < 0.5:
        fail("threshold.quantile", t.quantile, "use a fraction in (0, 0.5)")
    if t.mode == "fixed" and t.value is None:
        fail("threshold.value", t.value, "threshold.mode=fixed needs a log-density value")
    if t.adopt_flag_rate is not None and not 0 < t.adopt_flag_rate < 1:
        fail("threshold.adopt_flag_rate", t.adopt_flag_rate, "use a fraction in (0, 1), or null to never adopt")
    if t.adopt_window < 1:
        fail("threshold.adopt_window", t.adopt_window, "use a number of points >= 1")
    if t.adopt_after < 0:
        fail("threshold.adopt_after", t.adopt_after, "use a number of points >= 0")
    if t.window is not None and t.window < 1_000:
        fail("threshold.window", t.window, "use a number of points >= 1000, or null for max(20000, 20/quantile)")
    if t.calibration is not None and t.calibration < 0:
        fail("threshold.calibration", t.calibration, "use a number of points >= 0, or null for max(5000, 1/quantile)")
    if t.refresh_every < 1:
        fail("threshold.refresh_every", t.refresh_every, "use an integer >= 1")
    if t.samples is not None and t.samples < 100:
        fail("threshold.samples", t.samples, "use at least 100, or null for the default")
    if c.interval_seconds <= 0:
        fail("checkpoint.interval_seconds", c.interval_seconds, "use a number > 0")
    if c.interval_messages < 1:
        fail("checkpoint.interval_messages", c.interval_messages, "use an integer >= 1")
    if c.keep < 2:
        fail("checkpoint.keep", c.keep, "keep at least 2 so a corrupt newest one has a fallback")
    if not c.dir:
        fail("checkpoint.dir", c.dir, "give a directory")
    if c.topic is not None and (not c.topic or c.topic in k.input_topics
                                or c.topic in (k.output_topic, k.dead_letter_topic, k.scores_topic)):
        fail("checkpoint.topic", c.topic, "use a topic of its own, or null")

    if not 0 <= me.port < 65536:
        fail("metrics.port", me.port, "use a port from 0 (any free port) to 65535")


def config_from_dict(raw: Mapping | None, environ: Mapping[str, str] | None = None) -> Config:
    raw = _plain(raw or {})
    if environ:
        raw = apply_env_overrides(raw, environ)
    config = _build(Config, raw, "")
    _check_values(config)
    return config


def load_config(path: str | os.PathLike | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment (``os.environ`` by default) and validate."""
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, os.environ if environ is None else environ)


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def as_dict(config) -> dict:
    """The config as plain data (tuples as lists, mappings as dicts)."""
    if dataclasses.is_dataclass(config):
        return {f.name: as_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {k: as_dict(v) for k, v in config.items()}
    if isinstance(config, tuple):
        return [as_dict(v) for v in config]
    return config


def masked(value, key: str = ""):
    """A copy safe to log: values of secret-looking keys replaced by ***."""
    if isinstance(value, Mapping):
        return {k: masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
    if value is not None and any(word in key.lower() for word in SECRET_WORDS) and not key.endswith("_file"):
        return "***"
    return value


def resolve_secrets(settings: Mapping[str, Any], path: str) -> dict:
    """Turn ``X_file: /path`` entries into ``X: <file contents>`` (stripped)."""
    resolved = {}
    for key, value in settings.items():
        if key.endswith("_file") and isinstance(value, str):
            try:
                resolved[key[: -len("_file")]] = Path(value).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{path}.{key}: cannot read secret file {value}: {exc.strerror}; "
                                  "create it or fix the path") from None
        else:
            resolved[key] = value
    return resolved

"""Typed, frozen daemon configuration: YAML file + ``STREAMGMM_*`` environment overrides.

Every key is checked at start-up: unknown keys, wrong types and out-of-range values fail
with the key path, the value given and what is allowed.  ``load_config`` is the one entry.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import io
import os
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

ENV_PREFIX = "STREAMGMM_"
SECRET_WORDS = ("password", "secret", "token", "credential", "key.pem", "private", "oauthbearer.config")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key path."""


def _frozen_mapping():
    return field(default_factory=lambda: types.MappingProxyType({}))


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


DEFAULT_DIMENSION = 16


@dataclass(frozen=True)
class InputConfig:
    format: str = "json"
    fields: tuple[str, ...] | None = None
    # Not given: the number of input.fields if those are, else 16.
    dimension: int | None = None
    max_message_bytes: int = 1_048_576
    csv_delimiter: str = ","
    # An anomaly record names the features furthest from what its nearest component expects
    # given the others: this many of them (0: none).
    explain_top_features: int = 3

    def __post_init__(self):
        if self.dimension is None:  # frozen: set once, here, however the config is built
            object.__setattr__(self, "dimension", len(self.fields) if self.fields else DEFAULT_DIMENSION)


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
    # auto: threshold.quantile, at most 1%.  Not more than 1%: a normal mode with a few percent
    # of the traffic must not be flagged (BENCHMARKS.md, detection quality: the 'uneven'
    # stream); not more than q: a normal mode more frequent than the alerts asked for would be
    # flagged whole, far more than q (BENCHMARKS.md, Calibration, third session).
    rare_weight: float | str = "auto"
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
    # new cluster becomes normal instead of being flagged for ever; a shorter burst is not.  A
    # regime that keeps coming back in shorter spells is adopted once the flagged points, with a
    # half-life of 2 x adopt_after points, add up to adopt_after (see Detector._learn_flagged).
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


# What a scalar annotation accepts, as its error names it (bools are ints in Python: refused
# where a number is expected).
_SCALARS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
            str: (str, "a string")}


_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")

# ------------------------------------------------------------------------ building
def _split_list(text: str) -> list[str]:
    """a,b,c as its items, not at a comma inside brackets or braces: a pattern's {2,} (helper-47:
    ^ev-[0-9]{2,} from the environment became '^ev-[0-9]{2' and '}'), an IPv6 [::1]:9092."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{(") - (char in "]})")
        if char == "," and depth <= 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def _coerce(value, tp, path):
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    if isinstance(value, _EnvValue):
        parsed, text = value.parsed, value.text.strip()
        if _takes_text(tp):
            # YAML's null, [list] or 'quoted text'; else the text as typed ("my #group" lost its
            # comment-looking half to YAML, 00123 became 83).
            quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
            listed = isinstance(parsed, list) and text.startswith("[")
            keep = parsed is None or listed or quoted
            value = _list_texts(text) if listed else parsed if keep else text
        else:
            value = parsed
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()) and float in _alternatives(tp):
        value = float(value)  # YAML 1.1 reads 1e4 and 1e-3 (no dot) as text; "auto" stays a word
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
            value = [part.strip() for part in _split_list(value) if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
        return types.MappingProxyType(dict(value))
    if tp not in _SCALARS:  # pragma: no cover
        raise ConfigError(f"{path}: unsupported type {getattr(tp, '__name__', tp)}")
    accepted, words = _SCALARS[tp]
    if tp is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # 1e5, as a count is often written (it was "expected an integer, got 100000.0")
    if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
        # YAML reads yes, no, on, off as true/false and 00123 as a number: text is quoted.
        quote = (": YAML reads unquoted yes, no, on, off and digits as true/false and numbers; quote the text"
                 if tp is str and isinstance(value, (bool, int, float)) else "")
        raise ConfigError(f"{path}: expected {words}, got {value!r}{quote}")
    return float(value) if tp is float else value


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


PASS_THROUGH_SECTIONS = ("security", "consumer", "producer")


def _librdkafka_name(env_key: str) -> str:
    """An environment variable can hold no dot: ``sasl_password`` -> ``sasl.password``
    (librdkafka's names have none of their own underscores), ``sasl_password_file`` ->
    ``sasl.password_file``."""
    base, suffix = (env_key[: -len("_file")], "_file") if env_key.endswith("_file") else (env_key, "")
    return base.replace("_", ".") + suffix


def apply_env_overrides(raw: dict, environ: Mapping[str, str], origins: dict | None = None) -> dict:
    """``STREAMGMM_KAFKA__BOOTSTRAP_SERVERS=a:9092,b:9092`` sets kafka.bootstrap_servers.

    Values are parsed as YAML scalars (numbers, true/false, null, [lists]) for settings that
    take them; a setting that takes text gets the text as typed (a group id ``00123`` stays
    00123, not YAML's octal 83).  Under kafka.security / consumer / producer the key is
    librdkafka's name with dots written as underscores, ``STREAMGMM_KAFKA__SECURITY__SASL_PASSWORD``
    sets ``sasl.password``, and the value is the text as typed, as librdkafka reads it (a
    password ``0777`` stayed no password of its: YAML made it 511, ``p #w`` made it ``p``).
    """
    sections = tuple(f"{ENV_PREFIX}{field.name.upper()}_" for field in dataclasses.fields(Config))
    for name, text in sorted(environ.items()):
        if f"{name}_" in sections:
            raise ConfigError(f"environment variable {name}: set a section's keys one by one "
                              f"({name}__KEY), not the section as a whole")
        if name.startswith(ENV_PREFIX) and "__" not in name and (meant := _setting_meant(name)):
            # One underscore after the section, or the section misspelled: skipped without a word
            # (helper-44). Another tool's STREAMGMM_MODEL_PATH resembles no setting and passes
            # (it was refused, with a hint to a key that does not exist either; helper-47).
            raise ConfigError(f"environment variable {name} is not a setting: a section and its key are "
                              f"separated by two underscores; did you mean {meant}?")
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if len(keys) == 3 and keys[0] == "kafka" and keys[1] in PASS_THROUGH_SECTIONS:
            keys[2] = _librdkafka_name(keys[2])
            value = text
        else:
            try:
                value = _EnvValue(text, yaml.load(text, Loader=_UniqueKeyLoader) if text != "" else "")
            except (yaml.YAMLError, ValueError):
                value = text
        tree = raw
        for key in keys[:-1]:
            node = tree.get(key)
            if isinstance(node, _EnvValue) and isinstance(node.parsed, dict):
                tree[key] = dict(node.parsed)  # a mapping set whole, then one of its keys
            tree = tree.setdefault(key, {})
            if not isinstance(tree, dict):
                raise ConfigError(f"environment override for {'.'.join(keys)} conflicts with a non-mapping value")
        existing, parsed = tree.get(keys[-1]), getattr(value, "parsed", None)
        if isinstance(parsed, dict) and isinstance(existing, dict):
            tree[keys[-1]] = {**existing, **parsed}  # a mapping's keys added to the file's
        else:
            tree[keys[-1]] = value
        if origins is not None:
            origins[".".join(keys)] = name
    return raw


def _setting_meant(name: str) -> str | None:
    """The override a STREAMGMM_ variable without a double underscore most likely meant, None if
    it resembles none (another tool's: STREAMGMM_PORT, STREAMGMM_MODEL_PATH).  Compared without
    underscores, so one left out or added counts little (STREAMGMM_KAFKA_GROUPID): after a
    section spelled right, its keys and librdkafka sections (STREAMGMM_KAFKA_SASL_PASSWORD,
    STREAMGMM_KAFKA_SECURITY_PROTOCOL would be ignored secrets); else section and key together
    (STREAMGMM_CHEKPOINT_DIR, STREAMGMM_LOG_LEVEL).  The best match is named."""
    written = name[len(ENV_PREFIX):].lower()
    plain = written.replace("_", "")
    best, meant = 0.0, None
    for section in dataclasses.fields(Config):
        keys = [key.name for key in dataclasses.fields(section.default_factory())]
        env = f"{ENV_PREFIX}{section.name.upper()}"
        if written.startswith(f"{section.name}_"):
            rest = written[len(section.name) + 1:]
            head = rest.split("_")[0]
            if section.name == "kafka" and (head in ("sasl", "ssl") or rest.startswith("security_protocol")):
                return f"{env}__SECURITY__{rest.upper()}"  # librdkafka's own name, its section left out
            if section.name == "kafka" and head in PASS_THROUGH_SECTIONS:
                return f"{env}__{head.upper()}__{rest[len(head) + 1:].upper()}"
            scored = [(difflib.SequenceMatcher(None, rest.replace("_", ""), key.replace("_", "")).ratio(), key)
                      for key in keys]
            threshold = 0.7
        else:
            scored = [(difflib.SequenceMatcher(None, plain, f"{section.name}{key}".replace("_", "")).ratio(), key)
                      for key in keys]
            threshold = 0.8
        for ratio, key in scored:
            if ratio >= threshold and ratio > best:
                best, meant = ratio, f"{env}__{key.upper()}"
    return meant


@dataclasses.dataclass(frozen=True)
class _EnvValue:
    """An environment variable's text and its YAML reading: ``_coerce`` gives a setting that
    takes text the text, any other the reading."""

    text: str
    parsed: Any


def _list_texts(text: str) -> list:
    """A YAML flow list's items as typed ([00123, b] is ["00123", "b"], not [83, "b"])."""
    node = yaml.compose(text)
    return [item.value if isinstance(item, yaml.ScalarNode) else yaml.safe_load(yaml.serialize(item))
            for item in node.value]


def _alternatives(tp) -> list:
    """The types an annotation allows besides None: [int, str] for ``int | str | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _takes_text(tp) -> bool:
    """Whether the annotation ``tp`` is text: str, a tuple of str, or either or None."""
    inner = _alternatives(tp)
    if len(inner) != 1:
        return False
    (tp,) = inner
    return tp is str or (typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str)


def _value(config: Config, path: str):
    """The value at a key path such as ``kafka.bootstrap_servers[1]``."""
    section, key, *librdkafka = path.split(".")  # kafka.producer.message.max.bytes: a librdkafka key
    key, _, index = key.partition("[")
    value = getattr(getattr(config, section), key)
    if librdkafka:
        return value.get(".".join(librdkafka))
    return value[int(index[:-1])] if index else value


def _producer_message_max_bytes(kafka: KafkaConfig) -> int | None:
    """kafka.producer's message.max.bytes (librdkafka's default when not set; None: not a number,
    which librdkafka itself refuses at start)."""
    try:
        return int(kafka.producer.get("message.max.bytes", 1_000_000))
    except (TypeError, ValueError):
        return None


# A host name or IPv4 address, or an IPv6 address in brackets.
_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.%A-Za-z]+\]")


# librdkafka compiles a ^pattern subscription as a POSIX extended regular expression: its
# [[:classes:]] are written out for Python's re, and what only Python reads is refused
# (^metrics-\d+ was "matched" here while librdkafka read \d as a d and subscribed to nothing).
_POSIX_CLASSES = {"alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
                  "xdigit": "0-9A-Fa-f", "space": " \\t\\n\\r\\f\\v", "blank": " \\t",
                  "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")}
_PYTHON_ONLY = re.compile(r"\\[dDAZxtnrfvu]|\(\?|[*+?}]\?")


def topic_pattern(pattern: str) -> re.Pattern:
    """A ^pattern subscription as Python reads the names librdkafka matches (re.error if invalid
    or only Python's).  POSIX classes are written out inside a bracket expression, where alone
    they mean something (^[:digit:]+ is the set of ':', 'd', 'i', 'g', 't'), and a backslash
    there is itself (helper-48)."""
    if _PYTHON_ONLY.search(pattern):
        raise re.error("librdkafka reads POSIX extended regular expressions: write [0-9] for \\d; no (?...) "
                       "groups, lazy *? +? or escapes such as \\x2d")
    out, i, inside = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        if not inside:
            if char == "\\":
                out.append(pattern[i:i + 2])
                i += 2
                continue
            out.append(char)
            i += 1
            if char == "[":
                inside = True
                for literal_first in ("^", "]"):  # [^...] and a ] first in the set are no ends
                    if pattern[i:i + 1] == literal_first:
                        out.append("^" if literal_first == "^" else "\\]")
                        i += 1
            continue
        named = re.match(r"\[([:=.])(\w*)\1\]", pattern[i:])
        if named:
            if named.group(1) != ":" or named.group(2) not in _POSIX_CLASSES:
                raise re.error(f"{named.group()} is no POSIX character class streamgmm can check")
            out.append(_POSIX_CLASSES[named.group(2)])
            i += named.end()
            continue
        inside = char != "]"
        out.append({"\\": "\\\\", "[": "\\[", "&": "\\&", "~": "\\~", "|": "\\|"}.get(char, char))
        i += 1
    return re.compile("".join(out))


def _pattern_problem(topic: str) -> str | None:
    if not topic.startswith("^"):
        return None
    try:
        topic_pattern(topic)
    except re.error as exc:
        return str(exc)
    return None


def _rules(config: Config):
    """(key path, whether its value is allowed, what is allowed), in the order they are checked;
    a rule is only evaluated once every rule before it held."""
    k, i, m, t, c = config.kafka, config.input, config.model, config.threshold, config.checkpoint
    for path, choices in CHOICES.items():
        value = _value(config, path)
        if path == "logging.level" and isinstance(value, str):
            value = value.upper()  # debug was refused (helper-39), as Python's own names are upper case
        yield path, value in choices, f"use one of {', '.join(choices)}"
    yield "kafka.bootstrap_servers", k.bootstrap_servers, "give at least one host:port"
    for n, server in enumerate(k.bootstrap_servers):
        host, _, port = server.rpartition(":")
        host = re.sub(r"^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)://", "", host, flags=re.IGNORECASE)  # librdkafka's
        # A host with ';', a space or a second ':' (a list written with the wrong separator, a
        # port twice) was taken and resolved for ever (helper-44); IPv6 is written [::1]:9092.
        yield (f"kafka.bootstrap_servers[{n}]", _HOST.fullmatch(host) and port.isdigit() and 0 < int(port) < 65536,
               "use host:port with a port from 1 to 65535, without a scheme such as http:// (kafka-1:9092), "
               "one server per list item")
    yield "kafka.input_topics", k.input_topics and all(k.input_topics), "give at least one non-empty topic name"
    # Kafka's legal topic names (a space, "a b", was taken and every produce to it failed; helper-39).
    # An input may be a regular expression subscription, which starts with ^.
    for n, topic in enumerate(k.input_topics):
        yield (f"kafka.input_topics[{n}]", topic.startswith("^") or _KAFKA_TOPIC.fullmatch(topic),
               "use letters, digits, '.', '_' and '-' only, at most 249 (or ^regex for a pattern)")
    for key, topic in (("kafka.output_topic", k.output_topic), ("kafka.dead_letter_topic", k.dead_letter_topic),
                       ("kafka.scores_topic", k.scores_topic), ("checkpoint.topic", c.topic)):
        yield key, not topic or _KAFKA_TOPIC.fullmatch(topic), "use letters, digits, '.', '_' and '-' only, at most 249"
    for key in ("output_topic", "dead_letter_topic", "group_id"):
        yield f"kafka.{key}", getattr(k, key), "give a non-empty name"
    outputs = (k.output_topic, k.dead_letter_topic)
    for key in ("output_topic", "dead_letter_topic"):
        yield f"kafka.{key}", getattr(k, key) not in k.input_topics, "use a topic other than the inputs"
    # A pattern that matched the daemon's own dead letters read them back and dead-lettered them
    # again, ~1,300 a second for ever (helper-44).
    for n, pattern in enumerate(k.input_topics):
        problem = _pattern_problem(pattern)
        yield f"kafka.input_topics[{n}]", problem is None, f"give a valid regular expression after ^ ({problem})"
        if not pattern.startswith("^"):
            continue  # a name equal to an output has its own rule
        matcher = topic_pattern(pattern)  # (valid: the rule above held)
        for key, topic in (("kafka.scores_topic", k.scores_topic), ("checkpoint.topic", c.topic),
                           ("kafka.output_topic", k.output_topic), ("kafka.dead_letter_topic", k.dead_letter_topic)):
            yield (f"kafka.input_topics[{n}]", not (topic and matcher.search(topic)),
                   f"it reads {key} {topic}: the daemon would read what it writes; narrow it or rename that topic")
    # Raw bad input among the anomaly records (helper-39).
    yield ("kafka.dead_letter_topic", k.dead_letter_topic != k.output_topic,
           "use a topic other than kafka.output_topic: invalid input would be mixed with the anomaly records")
    # (librdkafka's consume() takes at most 1,000,000: more passed the check and the loop's first
    # poll raised a traceback, exit 1, restarted for ever; helper-78.)
    yield ("kafka.max_batch_messages", 1 <= k.max_batch_messages <= 1_000_000,
           "use an integer from 1 to 1000000 (librdkafka's consume() limit)")
    # At most a second: a signal is handled when the poll returns (70 s delayed SIGTERM past
    # `docker stop`'s grace), and an idle loop's last poll ages into the stalled-loop alert.
    yield ("kafka.poll_timeout_ms", 1 <= k.poll_timeout_ms <= 1000,
           "use an integer from 1 to 1000 (0 would spin an idle loop; longer delays SIGTERM and pages as a stalled loop)")
    yield ("kafka.retry_backoff_initial_seconds", 0 < k.retry_backoff_initial_seconds <= k.retry_backoff_max_seconds,
           "use a number > 0 and <= kafka.retry_backoff_max_seconds")
    # (An infinite wait is an OverflowError in Event.wait, not a wait.)
    yield ("kafka.retry_backoff_max_seconds", k.retry_backoff_max_seconds <= 3600,
           "use a number of seconds up to 3600")
    yield "kafka.dead_letter_max_bytes", k.dead_letter_max_bytes >= 0, "use a number of bytes >= 0"
    producer_limit = _producer_message_max_bytes(k)
    dead_letters_fit = producer_limit is None or 2 * k.dead_letter_max_bytes <= producer_limit
    if k.dead_letter_max_bytes == KafkaConfig.dead_letter_max_bytes:  # left at its default: the producer's
        # limit is what was set (helper-56: a message.max.bytes of 1000 named kafka.dead_letter_max_bytes)
        yield ("kafka.producer.message.max.bytes", dead_letters_fit,
               f"use at least twice kafka.dead_letter_max_bytes ({2 * k.dead_letter_max_bytes}), or lower that: a dead "
               "letter also carries the input's key and headers, and a record over this limit can never be produced")
    yield ("kafka.dead_letter_max_bytes", dead_letters_fit,
           f"use at most half the producer's message.max.bytes ({producer_limit}): the dead letter also carries "
           "the input's key and headers, and a record over that limit can never be produced")
    yield ("kafka.scores_topic", k.scores_topic is None or k.scores_topic not in ("", *k.input_topics, *outputs),
           "use a topic of its own, or null for no scores")
    yield "input.explain_top_features", i.explain_top_features >= 0, "use a number of features >= 0"
    yield "input.dimension", i.dimension >= 1, "use an integer >= 1"
    yield ("input.fields", i.fields is None or len(i.fields) == i.dimension,
           f"list exactly input.dimension={i.dimension} field names, or leave input.dimension out (it is then "
           "the number of fields)")
    yield "input.fields", i.fields is None or len(set(i.fields)) == len(i.fields), "list each field name once"
    yield "input.max_message_bytes", i.max_message_bytes >= 1, "use an integer >= 1"
    yield "input.csv_delimiter", len(i.csv_delimiter) == 1, "use a single character"
    auto = m.n_components == "auto"
    yield ("model.n_components", auto or (not isinstance(m.n_components, str) and m.n_components >= 1),
           "use an integer >= 1, or auto")
    yield "model.max_components", m.max_components >= 1, "use an integer >= 1"
    if not auto:
        yield ("model.warmup", m.warmup >= 2 * m.n_components,
               f"use at least 2 * model.n_components = {2 * m.n_components}")
    yield "model.warmup", m.warmup >= 2, "use at least 2 points"
    # (numpy refuses a negative seed, at the end of the warm-up: exit 1 there, at every restart.)
    yield ("model.random_state", m.random_state is None or m.random_state >= 0,
           "use an integer >= 0, or null for a different seed at each start")
    yield "model.alpha", 0.5 < m.alpha <= 1.0, "use a number in (0.5, 1]"
    yield ("model.half_life", m.half_life is None or m.half_life > 0,
           "use a number of points > 0, or null for no forgetting")
    yield "model.t0", m.t0 is None or m.t0 > 0, "use a number > 0, or null for model.warmup"
    yield "model.reg_covar", 0 < m.reg_covar < math.inf, "use a finite number > 0"
    largest = "max_components" if auto else "n_components"
    yield "model.min_weight", 0 <= m.min_weight < 1.0 / getattr(m, largest), f"use a number in [0, 1/model.{largest})"
    yield ("model.rare_weight", m.rare_weight == "auto" or (not isinstance(m.rare_weight, str) and 0 <= m.rare_weight < 1.0),
           "use a weight in [0, 1) (0 scores by the whole mixture), or auto (threshold.quantile, at most 0.01)")
    yield ("model.rare_weight", isinstance(m.rare_weight, str) or m.rare_weight == 0 or m.rare_weight > m.min_weight,
           f"use 0 or a weight above model.min_weight ({m.min_weight}): a component lighter than min_weight is "
           "re-seeded, so none could be rare")
    yield "threshold.quantile", t.mode == "fixed" or 0 < t.quantile < 0.5, "use a fraction in (0, 0.5)"
    yield "threshold.value", t.mode != "fixed" or t.value is not None, "threshold.mode=fixed needs a log-density value"
    # NaN or an infinity flags nothing, ever, and replay's summary printed it as JSON that is not.
    yield ("threshold.value", t.value is None or math.isfinite(t.value),
           "use a finite log-density (NaN or an infinity would never flag anything)")
    yield ("threshold.adopt_flag_rate", t.adopt_flag_rate is None or 0 < t.adopt_flag_rate < 1,
           "use a fraction in (0, 1), or null for 10 x threshold.quantile (threshold.adopt: false never adopts)")
    yield "threshold.adopt_window", t.adopt_window >= 1, "use a number of points >= 1"
    yield "threshold.adopt_after", t.adopt_after >= 0, "use a number of points >= 0"
    yield ("threshold.window", t.window is None or t.window >= 1_000,
           "use a number of points >= 1000, or null for max(20000, 20/quantile)")
    yield ("threshold.calibration", t.calibration is None or t.calibration >= 0,
           "use a number of points >= 0, or null for max(5000, 1/quantile)")
    yield "threshold.refresh_every", t.refresh_every >= 1, "use an integer >= 1"
    yield "threshold.samples", t.samples is None or t.samples >= 100, "use at least 100, or null for the default"
    yield "checkpoint.interval_seconds", 0 < c.interval_seconds < math.inf, "use a finite number > 0"
    yield "checkpoint.interval_messages", c.interval_messages >= 1, "use an integer >= 1"
    yield "checkpoint.keep", c.keep >= 2, "keep at least 2 so a corrupt newest one has a fallback"
    yield "checkpoint.dir", c.dir, "give a directory"
    yield ("checkpoint.topic", c.topic is None or c.topic not in ("", *k.input_topics, *outputs, k.scores_topic),
           "use a topic of its own, or null")
    yield "metrics.port", 0 <= config.metrics.port < 65536, "use a port from 0 (any free port) to 65535"


def _check_values(config: Config) -> None:
    for path, allowed, what in _rules(config):
        if not allowed:
            raise ConfigError(f"{path}: {_value(config, path)!r} is not allowed; {what}")


def _names_unknown_section(message: str, path: str) -> bool:
    """Whether ``message`` refuses a section that begins ``path`` (STREAMGMM_MODELL__HALF_LIFE:
    "unknown key modell")."""
    parts = path.split(".")
    return any(message.startswith(f"unknown key {'.'.join(parts[:n])} ") for n in range(1, len(parts)))


def config_from_dict(raw: Mapping | None, environ: Mapping[str, str] | None = None) -> Config:
    raw = _plain(raw or {})
    origins: dict[str, str] = {}  # key path -> the environment variable that set it
    if environ:
        raw = apply_env_overrides(raw, environ, origins)
    try:
        config = _build(Config, raw, "")
        _check_values(config)
    except ConfigError as exc:
        raise _with_origin(exc, origins) from None
    return config


def _with_origin(exc: ConfigError, origins: dict[str, str]) -> ConfigError:
    """A typo in an environment variable is not in the YAML: the error says where it came from."""
    named = [var for path, var in origins.items() if re.search(rf"(^|\s){re.escape(path)}\b", str(exc))
             or _names_unknown_section(str(exc), path)]
    return ConfigError(f"{exc} (set by the environment variable {named[0]})") if named else exc


def environment_origin(exc: ConfigError, environ: Mapping[str, str]) -> ConfigError:
    """``exc`` naming the STREAMGMM_ variable that set the key it is about: for what is found
    after the config was built (librdkafka refusing a pass-through setting; helper-44)."""
    origins: dict[str, str] = {}
    try:
        apply_env_overrides({}, environ, origins)
    except ConfigError:
        return exc
    return _with_origin(exc, origins)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML keeps the last one
    silently, so of two ``warmup:`` lines one would be ignored without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": merged by the loader, not a key of its own
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        digits = text.lstrip("+-")
        base = 16 if digits[:2].lower() == "0x" else 8 if digits[:2].lower() == "0o" else 10
        value = int(digits[2:] if base != 10 else digits, base)
        return -value if text.startswith("-") else value


# Numbers as YAML 1.2 reads them: YAML 1.1's octal and base-60 changed values without a word
# (metrics.port 011 became 9, interval_seconds 030 became 24.0, 1:30 became 90; helper-44) and
# STREAMGMM_METRICS__PORT=09464 was refused as no integer. A leading zero is decimal now, 0x
# and 0o say their base, 1e5 is a number, and 1:30 is text (refused where a number is due).
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|[-+]?0[xX][0-9a-fA-F][0-9a-fA-F_]*|[-+]?0[oO][0-7][0-7_]*)$"),
    list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(  # a digit somewhere: "." and "-." stay text (checkpoint.dir: .)
    _FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_UniqueKeyLoader.add_constructor(_INT, _UniqueKeyLoader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """Writes YAML this loader reads back the same: text such as 1e3 quoted."""


_Dumper.yaml_implicit_resolvers = _UniqueKeyLoader.yaml_implicit_resolvers


def to_yaml(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def load_config(path: str | os.PathLike | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment (``os.environ`` by default) and validate."""
    environ = os.environ if environ is None else environ
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        try:
            stream = io.StringIO(text)
            stream.name = str(path)  # YAML's error marks name the file, not "<unicode string>"
            raw = yaml.load(stream, Loader=_UniqueKeyLoader)
        except (yaml.YAMLError, ValueError) as exc:
            hint = "; indent with spaces, not tabs" if "\t" in text and "found character '\\t'" in str(exc) else ""
            raise ConfigError(f"{path} is not valid YAML: {exc}{hint}") from None
        if raw is None and not any(name.startswith(ENV_PREFIX) and "__" in name for name in environ):
            # A truncated deploy ran on every default: 127.0.0.1:9092, topic "features", ./state.
            # (Settings all from STREAMGMM_SECTION__KEY variables may come with an empty file;
            # another tool's STREAMGMM_PORT is none of them: helper-47.)
            raise ConfigError(f"{path} is empty: give the settings (see README.md), or {{}} to run on the defaults")
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, environ)


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
    if value is not None and any(word in key.lower() for word in SECRET_WORDS) and not key.endswith("_file"):
        return "***"  # whatever its shape: a mapping under a secret's name is still the secret
    if isinstance(value, Mapping):
        return {k: masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, key) for v in value]
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

"""Input and output records: what the detector reads and the documents it writes.

Pure: the caller passes the time of the decision in; nothing here talks to Kafka.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np
import orjson

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


class RecordBatch:
    """A batch of InputRecords as the detector reads it (the Kafka source has its own batch
    type with the same members, built without a Python object per message)."""

    def __init__(self, records: list[InputRecord]):
        self.records = records
        self.values = [record.value for record in records]
        self.timestamps_ms = np.array([record.timestamp or 0 for record in records], dtype=float)
        self.last_offsets: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic, record.partition)
            self.last_offsets[key] = max(self.last_offsets.get(key, -1), record.offset)

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> InputRecord:
        return self.records[index]


class OutputRecord(NamedTuple):
    """A record to produce.  A named tuple, not a dataclass: with kafka.scores_topic there is one
    per input message, and a tuple is built in half the time of a frozen dataclass."""

    topic: str
    value: bytes
    key: bytes | None
    headers: list
    # Where the record comes from, for log lines about it: (topic, partition, offset).
    source: tuple[str, int, int] | None = None


def finite(value: float) -> float:
    """JSON has no -Infinity: clamp to the lowest float (still below any threshold)."""
    return value if math.isfinite(value) else LOWEST_FLOAT


def iso_time(seconds: float) -> str:
    """Unix seconds as ISO-8601 UTC with milliseconds."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


# A key longer than this is cut in the documents' "source" (the record's own Kafka key stays
# whole): a key near the broker's message limit, copied there too, made records it refused.
KEY_FIELD_MAX_BYTES = 1024


def key_fields(key: bytes | None) -> dict:
    """The input's key as document fields: text, else base64; cut to KEY_FIELD_MAX_BYTES with
    its length and SHA-256 beside it (to match it upstream)."""
    if key is None:
        return {"key": None}
    cut = {}
    if len(key) > KEY_FIELD_MAX_BYTES:
        cut = {"key_truncated": True, "key_bytes": len(key), "key_sha256": hashlib.sha256(key).hexdigest()}
    try:
        text = key.decode("utf-8")  # the whole key decides whether it is text
    except UnicodeDecodeError:
        return {"key": None, "key_base64": base64.b64encode(key[:KEY_FIELD_MAX_BYTES]).decode(), **cut}
    if cut:  # cut at a character's boundary
        text = key[:KEY_FIELD_MAX_BYTES].decode("utf-8", errors="ignore")
    return {"key": text, **cut}


# An output record's Kafka key and the input headers it carries are bounded too: a 1.2 MB key
# (or two 600 KB headers) that the broker took on input made every anomaly and dead letter of
# that message one it refused for good (helper-39).
OUTPUT_KEY_MAX_BYTES = 16_384
OUTPUT_HEADERS_MAX_BYTES = 16_384


def cut(data: bytes | None, limit: int, what: str) -> tuple[bytes | None, list]:
    """``data`` cut to ``limit`` bytes, and the headers ``streamgmm.<what>.truncated``,
    ``.original_bytes`` and ``.original_sha256`` saying so (none when it fits)."""
    if data is None or len(data) <= limit:
        return data, []
    return data[:limit], [(f"streamgmm.{what}.truncated", b"true"),
                          (f"streamgmm.{what}.original_bytes", str(len(data)).encode()),
                          (f"streamgmm.{what}.original_sha256", hashlib.sha256(data).hexdigest().encode())]


def bounded_key(key: bytes | None) -> tuple[bytes | None, list]:
    """The key for an output record, cut to OUTPUT_KEY_MAX_BYTES, and headers saying so."""
    return cut(key, OUTPUT_KEY_MAX_BYTES, "key")


def carried_headers(record: InputRecord) -> list:
    """The input's headers for an output record, in order while they fit in
    OUTPUT_HEADERS_MAX_BYTES in all; those that do not are left out, with a header saying how
    many and how large (a small tracing header stays beside an oversized one)."""
    headers = list(record.headers or ())
    kept, size, dropped, dropped_bytes = [], 0, 0, 0
    for key, value in headers:
        length = len(key.encode() if isinstance(key, str) else key) + len(value or b"")
        if size + length <= OUTPUT_HEADERS_MAX_BYTES:
            kept.append((key, value))
            size += length
        else:
            dropped, dropped_bytes = dropped + 1, dropped_bytes + length
    if dropped:
        kept.append(("streamgmm.headers.dropped", f"{dropped} headers, {dropped_bytes} bytes".encode()))
    return kept


def anomaly_record(topic: str, record: InputRecord, document: dict) -> OutputRecord:
    """An anomaly document for ``record``, keyed and headed like its input."""
    source = {"topic": record.topic, "partition": record.partition, "offset": record.offset,
              "timestamp": record.timestamp, **key_fields(record.key)}
    document = {"source": source, **document}
    key, key_headers = bounded_key(record.key)
    headers = carried_headers(record) + key_headers + [
        ("streamgmm.source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
    ]
    return OutputRecord(topic, orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY), key, headers,
                        (record.topic, record.partition, record.offset))


def dead_letter(topic: str, record: InputRecord, reason: str, detail: str, max_value_bytes: int) -> OutputRecord:
    """The input message, unchanged but for a value cut to ``max_value_bytes``, with headers
    saying why it was refused and where it came from.

    A value over the limit is cut because the broker would refuse it too (a produce that can
    never succeed must not hold the stream up); its original size and SHA-256 go in headers so
    the message can still be found and matched upstream.
    """
    value = record.value or b""  # never a tombstone: on a compacted topic it would delete its key
    key, key_headers = bounded_key(record.key)
    headers = carried_headers(record) + key_headers + ([("streamgmm.value.null", b"true")] if record.value is None else []) + [
        ("streamgmm.error.reason", reason.encode()),
        ("streamgmm.error.detail", detail[:500].encode()),
        ("streamgmm.source.topic", record.topic.encode()),
        ("streamgmm.source.partition", str(record.partition).encode()),
        ("streamgmm.source.offset", str(record.offset).encode()),
        ("streamgmm.source.timestamp", str(record.timestamp).encode()),
    ]
    value, value_headers = cut(value, max_value_bytes, "value")
    return OutputRecord(topic, value, key, headers + value_headers, (record.topic, record.partition, record.offset))


def batch_sources(batch, indices: list[int]) -> tuple[list, list, list, list]:
    """(topics, partitions, offsets, keys) of some records of ``batch``: from its ``sources``
    columns when it has them, else one ``record(i)`` at a time."""
    sources = getattr(batch, "sources", None)
    if sources is not None:
        return sources(indices)
    records = [batch.record(i) for i in indices]
    return ([r.topic for r in records], [r.partition for r in records], [r.offset for r in records],
            [r.key for r in records])


# Keys made of these bytes go into JSON as they are; any other key is encoded by key_fields.
_KEY_NEEDS_ENCODING = re.compile(rb'[^\x20-\x7e]|["\\]')


def _key_fragments(keys: list) -> list[bytes]:
    """``"key":...`` of each key, as key_fields writes it."""
    plain = [k for k in keys if k is not None]
    if not _KEY_NEEDS_ENCODING.search(b"".join(plain)) and max(map(len, plain), default=0) <= KEY_FIELD_MAX_BYTES:
        return [b'"key":null' if k is None else b'"key":"' + k + b'"' for k in keys]
    return [orjson.dumps(key_fields(k))[1:-1] for k in keys]


def score_records(topic: str, sources: tuple[list, list, list, list], *, log_density: list, threshold: float | None,
                  flags: list, components: list, tail_probability: list, one_in: list) -> list[OutputRecord]:
    """One compact JSON record per scored point, keyed like its input::

        {"topic": "features", "key": "host-7", "partition": 3, "offset": 18211, "log_density": -12.4,
         "threshold": -31.7, "anomaly": false, "component": 2, "tail_probability": 0.31, "one_in": 3}

    The columns are plain lists (``tolist()``), log-densities already finite.  Per point this
    is the cost of the daemon's busiest path: the numbers of every record go through one
    ``orjson.dumps`` and are cut apart (they hold no braces), and each record is joined from
    its parts.
    """
    topics, partitions, offsets, keys = sources
    numbers = orjson.dumps([
        {"partition": p, "offset": o, "log_density": d, "threshold": threshold, "anomaly": f, "component": c,
         "tail_probability": t, "one_in": n}
        for p, o, d, f, c, t, n in zip(partitions, offsets, log_density, flags, components, tail_probability, one_in)
    ])
    parts = numbers[2:-2].split(b"},{") if offsets else []
    heads = {t: b'{"topic":' + orjson.dumps(t) + b"," for t in set(topics)}
    kafka_keys = keys
    if max((len(k) for k in keys if k is not None), default=0) > OUTPUT_KEY_MAX_BYTES:
        kafka_keys = [bounded_key(k)[0] for k in keys]
    return [
        OutputRecord(topic, b"".join((heads[t], k, b",", part, b"}")), key, [], (t, p, o))
        for t, p, o, key, k, part in zip(topics, partitions, offsets, kafka_keys, _key_fragments(keys), parts)
    ]

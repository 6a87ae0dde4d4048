"""The daemon's pipeline over recorded data (CSV or JSON lines) instead of Kafka.

``replay`` scores each record before the model learns from it, exactly as ``run`` does,
and writes one JSON line per input record.  ``read_matrix`` feeds ``streamgmm fit``.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import io
import json
import sys
import time
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from ..detection.decode import Decoder, unquoted
from ..detection.detector import Detector
from ..detection.records import InputRecord, finite
from ..service.config import Config
from ..service.state import CheckpointError, initial_state

BATCH = 1000
# Of an anomaly record, what an anomaly's replay line carries.
EXPLANATION_FIELDS = ("rarity", "nearest_component", "top_features")


class InputError(ValueError):
    """The recorded input does not fit the configuration (the message says how)."""


class InitFromError(ValueError):
    """model.init_from cannot be used for this replay (the message says how)."""


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def guess_format(path: str, explicit: str | None, configured: str | None = None) -> str:
    """--format, else the file's extension, else input.format when it is a text format, else csv."""
    if explicit:
        return explicit
    name = str(path).removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "json"
    if name.endswith(".csv"):
        return "csv"
    return configured if configured in ("json", "csv") else "csv"


def record_values(stream: IO[str], fmt: str, config: Config) -> Iterator[bytes]:
    """Yield each data line as the bytes a Kafka message would carry.

    CSV may have a header; with ``input.fields`` set, those columns are taken by name
    (so a labelled file such as shuttle.csv can be replayed as it is); InputError if the
    header lacks one of them.
    """
    fields = config.input.fields
    delimiter = config.input.csv_delimiter
    columns = None
    first = True
    for line in stream:
        line = line.rstrip("\r\n")
        if first:
            line = line.lstrip("\ufeff")  # the byte-order mark Excel writes
        if not line.strip():
            continue
        if fmt == "csv":
            parts = line.split(delimiter)
            # Quoted cells ("1.5", pandas' QUOTE_ALL): a quoted header was refused, and a
            # headerless quoted file lost its first row, taken for a header.  Data cells stay
            # as they are, for the decoder to unquote as the daemon's does (once: '"""5"""' was
            # a number here and undecodable there; helper-75).
            cells = [unquoted(p) for p in parts] if '"' in line else parts
            if first and not all(_is_number(c) for c in cells):
                first = False
                parts = [c.strip() for c in cells]  # "cpu, mem": the names are cpu and mem
                if fields is not None:
                    missing = [f for f in fields if f not in parts]
                    if missing and line.lstrip().startswith("{"):
                        raise InputError("the input looks like JSON lines, read as CSV: use --format json "
                                         "(or input.format: json)")
                    if missing:
                        raise InputError(f"the CSV header lacks input.fields {missing} (it has "
                                         f"{delimiter.join(parts)}): list columns the file has in input.fields")
                    columns, width = [parts.index(f) for f in fields], len(parts)
                continue
            first = False
            if columns is not None:
                if len(parts) == width:
                    line = delimiter.join(parts[c] for c in columns)
                elif len(parts) == len(columns):
                    # A row of another width than the header is wrong_dimension: a short one was
                    # "undecodable" and a long one taken as valid (helper-41). One that happens to
                    # have input.dimension cells gets an empty one more, so that it is refused too.
                    line = delimiter.join([*parts, ""])
        yield line.encode()


def replay(config: Config, source: IO[str], sink: IO[str], fmt: str) -> dict:
    """Run the pipeline over ``source``; returns the detector's counters."""
    config = dataclasses.replace(config, input=dataclasses.replace(config.input, format=fmt))
    detector = Detector(config)
    if config.model.init_from:
        # As the daemon with an empty checkpoint.dir: the model (and threshold) of that checkpoint,
        # counters and offsets anew (it was ignored: a replay to preview a fitted model scored
        # with a fresh one).
        try:
            state, _ = initial_state(config.model.init_from)
            detector.restore(state)
        except CheckpointError as exc:
            raise InitFromError(str(exc)) from None
        except ValueError as exc:  # a model of other inputs (dimension, fields)
            raise InitFromError(f"{exc} (for a replay: set input to what model.init_from={config.model.init_from} was "
                             "fitted on, or fit a new model)") from None
    offset = 0
    batch: list[InputRecord] = []
    first_invalid: dict = {}

    def flush():
        nonlocal batch
        if not batch:
            return
        result = detector.process(batch, now=time.time())
        # An anomaly's line carries what its record on the output topic says of why (rarity, the
        # nearest component, the top features), so a replay previews what on-call will read.
        why = {}
        for anomaly in result.anomalies:
            document = json.loads(anomaly.value)
            why[document["source"]["offset"]] = {k: document[k] for k in EXPLANATION_FIELDS if k in document}
        lines = []
        for i, (record, decision, threshold) in enumerate(
                zip(batch, result.decisions(), result.decision_thresholds())):
            if decision is None:
                invalid = result.invalid_index.get(i)  # why, as its dead letter says ("expected 16 values, got 4")
                row = {"offset": record.offset, "invalid": invalid and invalid.reason,
                       "detail": invalid and invalid.detail, "log_density": None, "anomaly": False, "threshold": None}
                if not first_invalid:
                    first_invalid.update(offset=record.offset, reason=row["invalid"], detail=row["detail"])
            else:
                density, flagged, component = decision
                row = {"offset": record.offset,
                       "log_density": None if density is None else finite(density),
                       "anomaly": flagged, "threshold": threshold, "component": component}
                if flagged and record.offset in why:
                    row.update(why[record.offset])
            lines.append(json.dumps(row))
        sink.write("\n".join(lines) + "\n")
        batch = []

    for value in record_values(source, fmt, config):
        batch.append(InputRecord("replay", 0, offset, value))
        offset += 1
        if len(batch) >= BATCH:
            flush()
    flush()
    sink.flush()
    return {"n_records": offset, "n_valid": detector.n_valid, "n_invalid": detector.n_invalid,
            "n_anomalies": detector.n_anomalies, "n_flagged_learned": detector.n_flagged_learned,
            "n_seen": detector.model.n_seen_,
            "model_initialized": detector.ready, "threshold": detector.threshold.value,
            **({"first_invalid": first_invalid} if first_invalid else {})}


def read_matrix(config: Config, path: str, fmt: str) -> tuple[np.ndarray, int, str | None]:
    """All valid rows of a recorded file as a matrix, the number of invalid rows skipped, and
    why the first of them was (None if none was)."""
    with open_input(path) as stream:
        values = list(record_values(stream, fmt, config))
    decoded = Decoder(dataclasses.replace(config.input, format=fmt)).decode(values)
    first = decoded.invalid[0] if decoded.invalid else None
    return decoded.X, len(decoded.invalid), None if first is None else f"{first.reason}, {first.detail}"


class _PutBack(io.RawIOBase):
    """A binary stream with the bytes already read from it put back in front."""

    def __init__(self, head: bytes, rest):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read1(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def open_input(path: str) -> IO[str]:
    """``path`` for reading as text (gzip-compressed, by its first bytes, as rotated logs and
    exports are), or stdin for ``-``; OSError if it cannot be opened.  A .csv.gz was read as
    text: "the CSV header lacks input.fields (it has <compressed bytes>)" (helper-72)."""
    if path == "-":
        # Read as a file is: piped gzip, and bytes that are not UTF-8, were UnicodeEncodeError
        # tracebacks (helper-75, helper-76); the first two bytes are read, not peeked (a pipe can
        # hold one of them yet), and put back.
        if sys.stdin is None:
            raise OSError(errno.EBADF, "standard input is closed")
        raw = sys.stdin.buffer
        first = raw.read(2)
        stream = io.BufferedReader(_PutBack(first, raw))
        if first == b"\x1f\x8b":
            return io.TextIOWrapper(gzip.GzipFile(fileobj=stream, mode="rb"), encoding="utf-8", errors="replace")
        return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    with Path(path).open("rb") as head:
        compressed = head.read(2) == b"\x1f\x8b"
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return Path(path).open("r", encoding="utf-8", errors="replace")

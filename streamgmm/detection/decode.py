"""Message values to feature vectors, or a reason why not.

Each decoder turns a batch of raw values (bytes) into a float64 matrix of the valid rows,
their indices, and a reason for each invalid one.  Reasons are a small fixed set so they
can label a metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson

if TYPE_CHECKING:  # the service layer builds the config; only its type is named here
    from ..service.config import InputConfig


REASONS = ("oversized", "empty", "undecodable", "wrong_dimension", "non_finite")
# What a value that is not a number is, in JSON's words (a dead letter's reason names it).
_JSON_KINDS = {str: "a string", bool: "true or false", type(None): "null", list: "an array", dict: "an object"}
_NUMBER_TYPES = (int, float)
# Bytes a flat JSON array of numbers can hold (NaN and Infinity included: they are
# reported as non_finite later).  Letters of true/false/null are not all in here.
_JSON_NUMBER_BYTES = b"0123456789+-.eE,[] \t\r\nNaIinfty"


def _parse_json(document: bytes):
    """orjson where it can (several times faster); the standard library for what orjson
    refuses but Python's json takes (NaN, Infinity, 1e999: reported as non_finite later,
    integers beyond 64 bits).  None if neither parses it."""
    try:
        return orjson.loads(document)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(document)
    except (ValueError, RecursionError):
        return None


def _all_sized(values, size: int) -> bool:
    """Whether every value is bytes of exactly ``size`` (lengths taken in C, not a Python loop)."""
    try:
        return set(map(len, values)) <= {size}
    except TypeError:  # a None value
        return False


def _to_float(value) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf")


@dataclass(frozen=True)
class Invalid:
    index: int
    reason: str
    detail: str


@dataclass(frozen=True)
class DecodedBatch:
    X: np.ndarray  # (n_valid, dimension)
    valid_index: np.ndarray  # positions of the valid rows in the input batch
    invalid: list[Invalid]


class DecodeError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Decoder:
    """Decode message values by ``input.format`` (json, csv, float32, float64)."""

    def __init__(self, config: InputConfig):
        self.config = config
        self.dimension = config.dimension
        self._decode_one = {"json": self._decode_json, "csv": self._decode_csv}.get(config.format, self._decode_raw)
        self._raw_dtype = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}.get(config.format)

    def decode(self, values: list[bytes | None]) -> DecodedBatch:
        """Decode a batch: one fast path for the usual batch of its format, else value by value."""
        if self._raw_dtype is not None:
            expected = self._raw_dtype.itemsize * self.dimension
            if expected <= self.config.max_message_bytes and _all_sized(values, expected):
                # The common case: every message has the right size, so one frombuffer.
                with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns: found non-finite later
                    X = np.frombuffer(b"".join(values), dtype=self._raw_dtype).astype(np.float64)
                return self._finite_rows(X.reshape(len(values), self.dimension), np.arange(len(values)), [])
        elif self.config.format == "json":
            fast = self._decode_json_arrays_at_once(values)
            if fast is not None:
                return fast
        return self._decode_each(values)

    def _decode_json_arrays_at_once(self, values) -> DecodedBatch | None:
        """The usual JSON batch with one parser call; None unless every value is one flat
        array of exactly ``dimension`` number tokens, within ``max_message_bytes`` (then the
        caller decodes value by value and says which one is bad).

        The batch is parsed as one flat list of numbers (half the parser's time of a list of
        lists): "][" between values becomes " ,", so each value must hold exactly
        dimension - 1 commas, and the parser, which refuses empty slots, must find
        dimension numbers per value.
        """
        try:
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        except TypeError:  # a None value
            return None
        data = b"".join(values)
        n, dimension = len(lengths), self.dimension
        if not n or lengths.min() < 2 or lengths.max() > self.config.max_message_bytes:
            return None  # empty, a null value (-1) or an empty one, or one too large
        ends = np.cumsum(lengths)
        starts = ends - lengths
        buffer = np.frombuffer(data, dtype=np.uint8)
        # Each value starts with '[' and ends with ']', and the buffer holds exactly one of each
        # per value: no value has another bracket, so "][" occurs only between two values.
        if not (
            data.count(b"[") == n
            and data.count(b"]") == n
            and (buffer[starts] == ord("[")).all()
            and (buffer[ends - 1] == ord("]")).all()
            and not data.translate(None, _JSON_NUMBER_BYTES)
            and (np.add.reduceat((buffer == ord(",")).view(np.uint8), starts, dtype=np.int32) == dimension - 1).all()
        ):
            return None
        # "[1,2][3,4]" -> "[1,2 ,3,4]", in place in a copy (bytes.replace costs 20 times more).
        flat = bytearray(data)
        view = np.frombuffer(flat, dtype=np.uint8)
        view[ends[:-1] - 1] = ord(" ")
        view[starts[1:]] = ord(",")
        parsed = _parse_json(flat)
        if parsed is None or len(parsed) != n * dimension:
            return None
        try:
            with np.errstate(over="ignore"):
                X = np.array(parsed, dtype=np.float64).reshape(n, dimension)
        except (ValueError, TypeError, OverflowError):  # an integer beyond float range
            return None
        return self._finite_rows(X, np.arange(n), [])

    def _decode_each(self, values) -> DecodedBatch:
        rows, index, invalid = [], [], []
        for i, value in enumerate(values):
            try:
                if value is None or len(value) == 0:
                    raise DecodeError("empty", "message value is empty or null")
                if len(value) > self.config.max_message_bytes:
                    raise DecodeError("oversized", f"message is {len(value)} bytes; "
                                                   f"input.max_message_bytes is {self.config.max_message_bytes}")
                rows.append(self._decode_one(value))  # each format checks the dimension
            except DecodeError as exc:
                invalid.append(Invalid(i, exc.reason, exc.detail))
                continue
            index.append(i)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                X = np.asarray(rows, dtype=np.float64).reshape(len(rows), self.dimension)
        except OverflowError:  # an integer beyond float range: find it row by row
            X = np.array([[_to_float(v) for v in row] for row in rows]).reshape(len(rows), self.dimension)
        return self._finite_rows(X, np.asarray(index, dtype=np.intp), invalid)

    @staticmethod
    def _finite_rows(X: np.ndarray, index: np.ndarray, invalid: list[Invalid]) -> DecodedBatch:
        """Rows with NaN/inf (or floats too large) become invalid; one check over the whole
        array in the usual case that all are finite."""
        if not np.isfinite(X).all():
            finite = np.isfinite(X).all(axis=1)
            invalid = invalid + [Invalid(int(i), "non_finite", "NaN or infinity in features") for i in index[~finite]]
            invalid.sort(key=lambda item: item.index)
            X, index = X[finite], index[finite]
        return DecodedBatch(X, index, invalid)

    # ---------------------------------------------------------------- formats
    def _decode_json(self, value: bytes):
        try:
            document = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise DecodeError("undecodable", f"not JSON: {str(exc)[:200]}") from None
        if isinstance(document, dict):
            fields = self.config.fields
            if fields is None:
                raise DecodeError("undecodable", "a JSON object needs input.fields to say which keys are features")
            missing = [name for name in fields if name not in document]
            if missing:
                raise DecodeError("wrong_dimension", f"missing field(s) {', '.join(missing[:5])}")
            document = [document[name] for name in fields]
        if not isinstance(document, list):
            raise DecodeError("undecodable", f"expected a JSON array of numbers, got {type(document).__name__}")
        if len(document) != self.dimension:
            raise DecodeError("wrong_dimension", f"got {len(document)} values, expected {self.dimension}")
        # type() rather than isinstance(): JSON true/false are bools, which are ints in Python.
        if not all(type(v) in _NUMBER_TYPES for v in document):
            at = next(i for i, v in enumerate(document) if type(v) not in _NUMBER_TYPES)
            name = self.config.fields[at] if self.config.fields else f"value {at}"
            raise DecodeError("undecodable", f"every feature must be a JSON number; {name} is "
                                             f"{_JSON_KINDS.get(type(document[at]), 'not a number')}")
        return document

    def _decode_csv(self, value: bytes):
        try:
            text = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DecodeError("undecodable", "CSV line is not UTF-8") from None
        parts = text.split(self.config.csv_delimiter)
        if '"' in text:
            # Quoted cells ("1.5", pandas' QUOTE_ALL): replay took them and the daemon
            # dead-lettered the same lines as undecodable (helper-72).
            parts = [unquoted(p) for p in parts]
        if len(parts) != self.dimension:
            raise DecodeError("wrong_dimension", f"got {len(parts)} values, expected {self.dimension}")
        try:
            return [float(p) for p in parts]
        except ValueError as exc:
            raise DecodeError("undecodable", f"not a number: {exc}") from None

    def _decode_raw(self, value: bytes):
        expected = self._raw_dtype.itemsize * self.dimension
        if len(value) != expected:
            raise DecodeError("wrong_dimension",
                              f"got {len(value)} bytes, expected {expected} ({self.dimension} x {self.config.format})")
        return np.frombuffer(value, dtype=self._raw_dtype)


def unquoted(cell: str) -> str:
    """A CSV cell without the double quotes around it (a doubled quote inside is one)."""
    text = cell.strip()
    return text[1:-1].replace('""', '"') if len(text) >= 2 and text[0] == text[-1] == '"' else cell


def encode(vector, fmt: str) -> bytes:
    """The inverse, for producers, tests and the demo."""
    if fmt == "json":
        return json.dumps([float(v) for v in vector]).encode()
    if fmt == "csv":
        return ",".join(repr(float(v)) for v in vector).encode()
    if fmt in ("float32", "float64"):
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, as it would upstream
            return np.asarray(vector, dtype="<f4" if fmt == "float32" else "<f8").tobytes()
    raise ValueError(f"unknown format {fmt!r}")

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgmm.service.config import InputConfig
from streamgmm.detection.decode import REASONS, Decoder, encode


@pytest.mark.parametrize("fmt", ["json", "csv", "float32", "float64"])
def test_round_trip(fmt):
    decoder = Decoder(InputConfig(format=fmt, dimension=3))
    vectors = [[1.5, -2.0, 3.25], [0.0, 1e10, -1e-10]]
    batch = decoder.decode([encode(v, fmt) for v in vectors])
    assert not batch.invalid
    np.testing.assert_allclose(batch.X, vectors, rtol=1e-6 if fmt == "float32" else 0)


def test_quoted_csv_cells_decode_as_replay_reads_them():
    # '"1.5","2.5","0.1"' was valid in replay and dead-lettered by the daemon (helper-72).
    decoder = Decoder(InputConfig(format="csv", dimension=3))
    batch = decoder.decode([b'"1.5","2.5","0.1"', b' "1", 2 ,"3"\r\n', b'"1,5",2,3', b'"x",1,2', b'"""5""",1,2'])
    np.testing.assert_array_equal(batch.X, [[1.5, 2.5, 0.1], [1.0, 2.0, 3.0]])
    assert [i.reason for i in batch.invalid] == ["wrong_dimension", "undecodable", "undecodable"]


def test_json_objects_take_named_fields_in_order():
    decoder = Decoder(InputConfig(format="json", dimension=2, fields=("b", "a")))
    batch = decoder.decode([b'{"a": 1, "b": 2, "extra": "x"}', b'{"a": 1}'])
    np.testing.assert_array_equal(batch.X, [[2.0, 1.0]])
    assert batch.invalid[0].reason == "wrong_dimension" and "missing field(s) b" in batch.invalid[0].detail


def test_a_value_that_is_not_a_number_is_named_in_the_reason():
    # The reason said "every feature must be a JSON number" for {"latency_ms": "20"}: which one?
    decoder = Decoder(InputConfig(format="json", dimension=2, fields=("cpu", "latency_ms")))
    batch = decoder.decode([b'{"cpu": 1, "latency_ms": "20"}', b'[1, [2]]', b'{"cpu": null, "latency_ms": 1}'])
    assert [inv.detail.split("; ")[1] for inv in batch.invalid] == ["latency_ms is a string", "latency_ms is an array",
                                                                    "cpu is null"]
    unnamed = Decoder(InputConfig(format="json", dimension=2)).decode([b'[1, true]'])
    assert unnamed.invalid[0].detail.endswith("value 1 is true or false")


@pytest.mark.parametrize(
    "fmt, value, reason",
    [
        ("json", b"[1, 2]", "wrong_dimension"),
        ("json", b"[1, NaN, 2]", "non_finite"),
        ("json", b"[1, Infinity, 2]", "non_finite"),
        ("json", b"[1, true, 2]", "undecodable"),
        ("json", b"[1, 1e999, 2]", "non_finite"),
        ("json", b"[" * 100_000 + b"]" * 100_000, "oversized"),
        ("json", b"[" * 5000 + b"]" * 5000, "undecodable"),
        ("json", b"", "empty"),
        ("json", None, "empty"),
        ("json", b"\xff\xfe", "undecodable"),
        ("json", b"42", "undecodable"),
        ("csv", b"1,2", "wrong_dimension"),
        ("csv", b"1,x,2", "undecodable"),
        ("csv", b"1,nan,2", "non_finite"),
        ("csv", b"\xff,1,2", "undecodable"),
        ("float32", b"\x00" * 11, "wrong_dimension"),
        ("float32", np.array([1, np.nan, 2], "<f4").tobytes(), "non_finite"),
        ("float64", np.array([1, 2, np.inf], "<f8").tobytes(), "non_finite"),
    ],
)
def test_invalid_values_get_a_reason(fmt, value, reason):
    decoder = Decoder(InputConfig(format=fmt, dimension=3, max_message_bytes=100_000))
    batch = decoder.decode([encode([1, 2, 3], fmt), value, encode([4, 5, 6], fmt)])
    assert [inv.index for inv in batch.invalid] == [1]
    assert batch.invalid[0].reason == reason
    assert reason in REASONS
    np.testing.assert_array_equal(batch.valid_index, [0, 2])
    assert batch.X.shape == (2, 3)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.none()), max_size=20), st.sampled_from(["json", "csv", "float32", "float64"]))
def test_random_bytes_never_raise_and_every_row_is_accounted(values, fmt):
    decoder = Decoder(InputConfig(format=fmt, dimension=2, max_message_bytes=48))
    batch = decoder.decode(values)
    assert len(batch.valid_index) + len(batch.invalid) == len(values)
    assert np.all(np.isfinite(batch.X))
    assert batch.X.shape == (len(batch.valid_index), 2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**400, 10**400), st.text(max_size=3), st.none()), max_size=4))
def test_random_json_arrays(items):
    decoder = Decoder(InputConfig(format="json", dimension=2))
    try:
        value = json.dumps(items).encode()
    except (ValueError, OverflowError):
        return
    batch = decoder.decode([value])
    assert len(batch.valid_index) + len(batch.invalid) == 1
    assert np.all(np.isfinite(batch.X))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[1,2", b"3]", b"[1,2],[3", b"4]", b"[true,1]", b"[null,1]", b"[1,,2]", b"[ 1 , 2 ]", b"[NaN,1]",
                     b'["]', b"[1e999,1]", b"[]", b"[[1,2]]", b"[1] ", b" [1,2]"]),
    st.binary(max_size=12),
), max_size=12))
def test_batched_json_equals_one_by_one(values):
    _assert_json_batch_equals_one_by_one(values)


_JSON_SEPARATORS = st.sampled_from([(",", ":"), (", ", ": "), (" ,", ":"), (",\t", ":")])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-10**30, 10**30)),
             min_size=2, max_size=2),
    _JSON_SEPARATORS,
), min_size=1, max_size=12))
def test_batches_of_well_formed_json_arrays_equal_one_by_one(rows):
    """Batches where every value has the expected shape: the one-buffer path is taken (or
    refused, for NaN, Infinity and huge integers, which the parser rejects), and agrees with
    decoding each value alone."""
    _assert_json_batch_equals_one_by_one([json.dumps(row, separators=sep).encode() for row, sep in rows])


def _assert_json_batch_equals_one_by_one(values):
    decoder = Decoder(InputConfig(format="json", dimension=2))
    batch = decoder.decode(values)
    singles = [decoder._decode_each([v]) for v in values]  # the one-by-one path, no batch shortcut
    expected_index = [i for i, s in enumerate(singles) if not s.invalid]
    np.testing.assert_array_equal(batch.valid_index, expected_index)
    assert [(inv.index, inv.reason) for inv in batch.invalid] == [
        (i, s.invalid[0].reason) for i, s in enumerate(singles) if s.invalid
    ]
    expected_X = np.vstack([singles[i].X for i in expected_index]) if expected_index else np.empty((0, 2))
    np.testing.assert_array_equal(batch.X, expected_X)

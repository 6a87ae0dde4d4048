"""The helper process: same results as decoding and scoring in-process, nothing lost when it goes."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgmm import OnlineGaussianMixture
from streamgmm.service.config import InputConfig
from streamgmm.detection.decode import Decoder, encode, split_packed
from streamgmm.service.decode_process import DecoderProcess, pack, unpack_packed
from streamgmm.mixture.online import split_statistics
from streamgmm.dev.synthetic import random_mixture

values = st.one_of(st.none(), st.binary(max_size=40))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(values, max_size=8), max_size=5))
def test_pack_unpack_round_trip(batches):
    assert [split_packed(data, lengths) for data, lengths in unpack_packed(*pack(batches))] == batches


def _json_value(draw_from):
    """Flat arrays of numbers mostly (the fast path), and what must not pass for them."""
    number = st.one_of(st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True).map(repr),
                       st.sampled_from(["1e999", "-0", "NaN", "Infinity", "1.5e-3"]))
    array = st.lists(number, min_size=0, max_size=4).map(lambda xs: ("[" + ", ".join(xs) + "]").encode())
    junk = st.sampled_from([b"", b"[", b"]", b"][", b"[1,2][3]", b"[[1,2,3]]", b"[1,,2]", b" [1,2,3]", b"[1,2,3] ",
                            b'{"a": 1}', b"[1, true, 2]", b"[1,2,3", b"1,2,3]", b"\xff[1,2,3]"])
    return draw_from(st.one_of(array, array, array, junk, st.none()))


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from(["json", "csv", "float32"]), st.integers(1, 3))
def test_decoding_packed_values_is_decoding_them_one_by_one(data, fmt, dimension):
    # The helper decodes the buffer it receives as it is when it can: the result must be the same.
    if fmt == "json":
        values = [_json_value(data.draw) for _ in range(data.draw(st.integers(0, 8)))]
    elif fmt == "csv":
        values = data.draw(st.lists(st.one_of(st.none(), st.binary(max_size=12), st.just(b"1,2,3")), max_size=8))
    else:
        values = data.draw(st.lists(st.one_of(st.none(), st.binary(min_size=4 * dimension, max_size=4 * dimension),
                                              st.binary(max_size=13)), max_size=8))
    decoder = Decoder(InputConfig(format=fmt, dimension=dimension, max_message_bytes=40))
    ((buffer, lengths),) = unpack_packed(*pack([values]))
    got, expected = decoder.decode_packed(buffer, lengths), decoder.decode(values)
    np.testing.assert_array_equal(got.X, expected.X)
    np.testing.assert_array_equal(got.valid_index, expected.valid_index)
    assert got.invalid == expected.invalid


def test_packed_json_takes_the_fast_path_for_good_values():
    decoder = Decoder(InputConfig(format="json", dimension=3))
    values = [encode(x, "json") for x in np.random.default_rng(0).normal(size=(20, 3))]
    ((buffer, lengths),) = unpack_packed(*pack([values]))
    assert decoder._decode_packed_json_arrays(buffer, lengths) is not None  # not the value-by-value way
    # A value with a trailing space is not provably a flat array: the value-by-value way.
    first_longer = lengths + (np.arange(20) == 0)
    assert decoder._decode_packed_json_arrays(buffer.replace(b"]", b"] ", 1), first_longer) is None


def _assert_same(got, expected):
    np.testing.assert_array_equal(got.X, expected.X)
    np.testing.assert_array_equal(got.valid_index, expected.valid_index)
    assert got.invalid == expected.invalid


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "socket"])
def test_decodes_as_the_daemon_would(shared_memory):
    rng = np.random.default_rng(0)
    cases = {
        "json": [encode(x, "json") for x in rng.normal(size=(50, 3))]
        + [None, b"", b"[1,2]", b"[1,NaN,2]", b"[1,true,2]", b"not json", b'{"a": 1}', b"[1e999,1,2]", b"[" * 30]
        + [encode(x, "json") for x in rng.normal(size=(5, 3))],
        "csv": [encode(x, "csv") for x in rng.normal(size=(50, 3))] + [None, b"1,2", b"1,x,2", b"1,nan,2", b"\xff,1,2"],
    }
    for fmt, batch in cases.items():
        config = InputConfig(format=fmt, dimension=3, max_message_bytes=100)
        helper = DecoderProcess(config, shared_memory=shared_memory)
        try:
            halves = [batch[: len(batch) // 2], batch[len(batch) // 2 :], []]
            helper.submit(halves)
            results = helper.results()
        finally:
            helper.close()
        assert len(results) == 3
        for (got, scored), values_ in zip(results, halves):
            _assert_same(got, Decoder(config).decode(values_))
            assert scored is None  # no model given: nothing scored
        assert results[0][0].invalid or results[1][0].invalid  # the bad values were really there


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="shared memory needs memfd (Linux)")
def test_shared_buffer_grows_and_each_batch_reads_its_own_bytes():
    """Batches far larger than the first mapping, then a small one: the helper re-maps the
    grown buffer and never reads a stale tail of an earlier, longer batch."""
    rng = np.random.default_rng(2)
    config = InputConfig(format="json", dimension=4)
    sizes = [10, 40_000, 90_000, 3]  # ~2.5 and ~5.7 MB of JSON: past the first 1 MB mapping twice
    helper = DecoderProcess(config)
    try:
        assert helper._shared is not None
        for size in sizes:
            batch = [encode(x, "json") for x in rng.normal(size=(size, 4))]
            helper.submit([batch])
            ((decoded, _),) = helper.results()
            _assert_same(decoded, Decoder(config).decode(batch))
    finally:
        helper.close()


def test_scores_with_the_model_it_is_given():
    rng = np.random.default_rng(1)
    truth = random_mixture(3, 4, rng)
    X, _ = truth.sample(3000, rng)
    model = OnlineGaussianMixture(3, warmup=500, random_state=0, rare_weight=0.2)
    model.partial_fit(X[:2000])
    twin = copy.deepcopy(model)
    config = InputConfig(format="float32", dimension=4)
    batch = [encode(x, "float32") for x in X[2000:]] + [b"short"]
    threshold = float(np.quantile(model.score_samples(X[2000:]), 0.05))  # flags some rows
    helper = DecoderProcess(config)
    try:
        helper.submit([batch, batch[:10]], [(model.scoring_model(), threshold), None])
        (decoded, scored), (_, unscored) = helper.results()
    finally:
        helper.close()
    assert decoded is None  # raw bytes: the daemon decodes them again rather than receive them
    assert unscored is None
    expected = model.score_batch(Decoder(config).decode(batch).X)
    assert scored.model_version == expected.model_version
    np.testing.assert_array_equal(scored.log_density, expected.log_density)
    np.testing.assert_array_equal(scored.component, expected.component)
    # The statistics come back instead of the responsibilities, split by the threshold.
    assert scored.X_internal is None and scored.log_resp is None and scored.flag_threshold == threshold
    flags = expected.log_density < threshold
    assert 0 < flags.sum() < len(flags)
    for got, want in zip(scored.statistics, split_statistics(expected, flags, model.covariance_type)):
        for field in ("s0", "s1", "s2", "n_points", "total_weight", "model_version"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    # Learning them is learning the batch in-process, to the last bit.
    unflagged, _ = scored.statistics
    model.learn_statistics(unflagged)
    twin.learn(expected, sample_weight=~flags)
    np.testing.assert_array_equal(model.means_, twin.means_)
    np.testing.assert_array_equal(model.covariances_, twin.covariances_)
    # After learning, the old snapshot's results are refused (the daemon then scores itself).
    with pytest.raises(ValueError, match="older version"):
        model.learn_statistics(unflagged)


def test_a_lost_helper_means_decoding_here():
    helper = DecoderProcess(InputConfig(format="json", dimension=2))
    try:
        helper._process.kill()
        helper._process.wait(timeout=10)
        helper.submit([[b"[1, 2]"]])
        assert helper.results() is None  # the caller decodes these values itself
        assert not helper.alive
        helper.submit([[b"[1, 2]"]])  # ignored from now on
        assert helper.results() is None
    finally:
        helper.close()


def test_the_helper_goes_when_the_daemon_is_killed(tmp_path):
    # SIGKILL leaves no chance to close anything: the helper must see the socket close.
    script = (
        "import sys, time\n"
        "from streamgmm.service.config import InputConfig\n"
        "from streamgmm.service.decode_process import DecoderProcess\n"
        "helper = DecoderProcess(InputConfig(format='json', dimension=2))\n"
        "print(helper._process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        helper_pid = int(parent.stdout.readline())
        assert Path(f"/proc/{helper_pid}").exists()
        # A stop signal to the whole group is the daemon's to handle: the helper stays.
        os.kill(helper_pid, signal.SIGTERM)
        time.sleep(0.5)
        assert Path(f"/proc/{helper_pid}").exists()
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(helper_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(helper_pid), "the decoder process outlived a SIGKILLed daemon"
    finally:
        parent.kill()
        parent.wait(timeout=10)


def _alive(pid: int) -> bool:
    """Running (an exited, unreaped child of init shows as a zombie: not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_the_helper_runs_one_blas_thread_unless_told_otherwise(monkeypatch):
    # Several BLAS threads in the helper spin against the daemon on the same cores.
    def helper_environment():
        helper = DecoderProcess(InputConfig(format="json", dimension=2))
        try:
            helper.submit([[b"[1, 2]"]])  # one round trip: the helper has started (exec'd) by then
            assert helper.results() is not None
            raw = Path(f"/proc/{helper._process.pid}/environ").read_bytes()
        finally:
            helper.close()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert helper_environment()["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert helper_environment()["OPENBLAS_NUM_THREADS"] == "2"  # the operator's choice stands

import os

import numpy as np
import pytest

from streamgmm.service.state import CheckpointError, CheckpointStore, pack, unpack


def _state(i):
    return {"kind": "x", "n": i, "model": {"S0": np.arange(3.0) * i, "nested": [1, {"a": np.eye(2)}]}, "offsets": {"t": {"0": i}}}


def test_pack_round_trip():
    state = _state(7)
    back = unpack(pack(state))
    assert back["n"] == 7 and back["offsets"] == {"t": {"0": 7}}
    np.testing.assert_array_equal(back["model"]["S0"], state["model"]["S0"])
    np.testing.assert_array_equal(back["model"]["nested"][1]["a"], np.eye(2))


def test_store_keeps_the_newest_and_falls_back_from_a_corrupt_one(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=3)
    for i in range(1, 6):
        store.write(_state(i))
    assert [p.name for p in store.paths()] == [f"checkpoint-{i:012d}.sgmm" for i in (3, 4, 5)]
    state, path = store.load_latest()
    assert state["n"] == 5

    newest = store.paths()[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte
    newest.write_bytes(bytes(data))
    state, path = store.load_latest()
    assert state["n"] == 4
    assert "fails its checksum" in caplog.text

    previous = store.paths()[-2]
    previous.write_bytes(previous.read_bytes()[:100])  # torn write
    state, _ = store.load_latest()
    assert state["n"] == 3
    assert "truncated" in caplog.text


def test_incompatible_version_is_refused_with_a_clear_message(tmp_path):
    data = pack(_state(1)).replace(b'"format_version": 2', b'"format_version": 9')
    with pytest.raises(CheckpointError, match="has format version 9; this streamgmm reads versions 1 and 2"):
        unpack(data)
    # Version 2 (the threshold's history relative to the model, fifth session) is written, and a
    # version-1 checkpoint still reads: a version-1 reader refuses version 2 rather than misread
    # its threshold (505 flags for 60 on the next 1,000 points; helper-42).
    assert b'"format_version": 2' in pack(_state(1))
    assert unpack(pack(_state(1)).replace(b'"format_version": 2', b'"format_version": 1'))["n"] == 1
    with pytest.raises(CheckpointError, match="bad magic"):
        unpack(b"\x80\x04pickle")


def test_write_failure_raises_checkpoint_error(tmp_path, monkeypatch):
    # A directory that cannot be created (its parent is a file) ...
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        CheckpointStore(blocker / "state").write(_state(1))
    # ... and a full disk, simulated at the fsync, leave the previous checkpoints intact.
    store = CheckpointStore(tmp_path / "state")
    store.write(_state(1))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.write(_state(2))
    monkeypatch.undo()
    state, _ = store.load_latest()
    assert state["n"] == 1 and len(store.paths()) == 1


def test_object_arrays_are_refused():
    with pytest.raises(CheckpointError, match="object array"):
        pack({"bad": np.array([object()], dtype=object)})


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(CheckpointError, match="I/O error"):
        store.write(_state(1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, mend", [(28, "free space on its disk"), (13, "fix its permissions")])
def test_a_checkpoint_dir_that_cannot_be_written_says_what_to_mend(tmp_path, monkeypatch, error, mend):
    # A full disk was told to "fix its permissions".
    from streamgmm.service import state

    def refused(path, data):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(state, "write_atomically", refused)
    with pytest.raises(CheckpointError, match=f"{os.strerror(error)}; {mend} or point checkpoint.dir elsewhere"):
        state.LocalStateStore(tmp_path, keep=3).check_writable()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_checkpoint_dir_in_proc_is_refused_with_the_words_check_config_uses():
    # `run` said "not writable: No such file or directory; fix its permissions" of /proc/x, where
    # check-config said what it is (helper-52).
    from streamgmm.service import state

    with pytest.raises(CheckpointError, match="is on a filesystem with no space for files"):
        state.LocalStateStore("/proc/streamgmm-test", keep=3).check_writable()

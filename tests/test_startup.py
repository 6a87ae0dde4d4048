"""Every start-up problem: exit code 2 and one line that names the key or resource and what to do.

No broker is needed: these are all found before the daemon connects."""

import contextlib
import select
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from pathlib import Path

from streamgmm.detection.decode import encode
from streamgmm.detection.detector import Detector
from streamgmm.detection.records import InputRecord
from streamgmm.service.config import config_from_dict
from streamgmm.service.state import CheckpointStore, LocalStateStore


def _config(tmp_path, **sections):
    raw = {
        "kafka": {"bootstrap_servers": ["127.0.0.1:1"], "input_topics": ["in"]},
        "input": {"format": "json", "dimension": 3, "fields": ["a", "b", "c"]},
        "model": {"n_components": 2, "warmup": 100},
        "checkpoint": {"dir": str(tmp_path / "state")},
        "metrics": {"port": 0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


@contextlib.contextmanager
def _running(path, **popen):
    """`streamgmm run` in the background (stderr piped), killed on the way out if still alive."""
    process = subprocess.Popen([sys.executable, "-m", "streamgmm", "run", "--config", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _run(path):
    result = subprocess.run([sys.executable, "-m", "streamgmm", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return result.returncode, last, result.stderr


def _checkpoint(raw, tmp_path):
    """A warm model's checkpoint in checkpoint.dir, as the daemon writes it."""
    detector = Detector(config_from_dict(raw))
    rng = np.random.default_rng(0)
    detector.process([InputRecord("in", 0, i, encode(x, "json")) for i, x in enumerate(rng.normal(size=(300, 3)))],
                     now=time.time())
    CheckpointStore(tmp_path / "state").write(detector.state(time.time()))


def test_metrics_port_in_use(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path, _ = _config(tmp_path, metrics={"port": port})
        code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in last and "metrics.port" in last


def test_a_metrics_host_that_is_not_an_address_says_to_fix_the_host(tmp_path):
    # It said "set metrics.port to a free port" for a host that does not resolve.
    path, _ = _config(tmp_path, metrics={"host": "0.0.0.0.0"})
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "cannot serve metrics on 0.0.0.0.0:" in last and "set metrics.host" in last and "metrics.port" not in last


def test_missing_secret_file(tmp_path):
    path, _ = _config(tmp_path, kafka={"security": {"sasl.password_file": str(tmp_path / "nope")}})
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "kafka.security.sasl.password_file: cannot read secret file" in last


def test_misspelled_librdkafka_setting(tmp_path):
    path, _ = _config(tmp_path, kafka={"consumer": {"sesion.timeout.ms": 6000}})
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "kafka.consumer.sesion.timeout.ms" in last and "No such configuration property" in last


def test_checkpoint_dir_that_cannot_be_written(tmp_path):
    (tmp_path / "state").write_text("a file where the directory should be")
    path, _ = _config(tmp_path)
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "checkpoint.dir" in last and "not writable" in last


def test_dimension_mismatch_with_the_checkpoint(tmp_path):
    _, raw = _config(tmp_path)
    _checkpoint(raw, tmp_path)
    path, _ = _config(tmp_path, input={"dimension": 4, "fields": None})
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "input.dimension=3" in last and "checkpoint.dir" in last


def test_reordered_fields_over_a_checkpoint_are_refused_with_both_lists(tmp_path):
    _, raw = _config(tmp_path)
    _checkpoint(raw, tmp_path)
    path, _ = _config(tmp_path, input={"fields": ["b", "a", "c"]})
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "['a', 'b', 'c']" in last and "['b', 'a', 'c']" in last


def test_fields_dropped_over_a_checkpoint_learned_on_names_are_refused(tmp_path):
    # Names to none (arrays) was taken without a word (helper-56); the README says refused.
    _, raw = _config(tmp_path)
    _checkpoint(raw, tmp_path)
    path, _ = _config(tmp_path, input={"fields": None, "dimension": 3})
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "['a', 'b', 'c']" in last and "none (arrays)" in last


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_warm_up_too_large_for_a_state_record_is_refused_with_the_rows_that_fit(tmp_path, command):
    # 4,000 rows of 64 features, 2 MB, failed every state record write for the whole warm-up
    # (helper-56); at most (1,000,000 - 65,536) // 512 = 1,825 rows fit.
    path, _ = _config(tmp_path, input={"format": "float64", "dimension": 64, "fields": None},
                      model={"scope": "partition", "warmup": 4000}, checkpoint={"topic": "state"})
    args = ["run", "--config", str(path)] if command == "run" else ["check-config", str(path)]
    result = subprocess.run([sys.executable, "-m", "streamgmm", *args], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "model.warmup 4,000 rows of 64 features" in result.stderr and "at most 1,825" in result.stderr


@pytest.mark.parametrize("section, key, value, words", [
    ("model", "n_componets", 3, "unknown key model.n_componets"),
    ("input", "dimension", "three", "input.dimension: expected an integer"),
])
def test_check_config_catches_what_it_can_without_a_broker(tmp_path, section, key, value, words):
    path, _ = _config(tmp_path, **{section: {key: value}})
    result = subprocess.run([sys.executable, "-m", "streamgmm", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_a_hangup_the_process_was_started_ignoring_stays_ignored(tmp_path):
    # `nohup streamgmm run ... &` then the terminal closes: SIGHUP must not stop it (handling
    # SIGHUP as a clean stop replaced the inherited SIG_IGN).  With no broker the daemon waits
    # and retries; a SIGTERM then stops it.
    import signal

    path, _ = _config(tmp_path)
    with _running(path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as process:
        time.sleep(3.0)
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert b"received SIGTERM" in process.stderr.read()


def _catches(pid, signum) -> bool:
    """Whether the process has a handler for the signal (Linux: SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


def _signals_as_at_a_terminal() -> None:
    """SIGHUP and SIGINT as in a fresh foreground session: a suite run under nohup or in the
    background passes them on ignored, and the daemon (and Python, for SIGINT) keeps them so."""
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# `streamgmm run` whose first import of numpy waits for a file: the start-up's window before
# the daemon's own handlers, held open for as long as a test needs.
GATED_RUN = """
import os, sys, time
class Gate:
    def find_spec(self, name, path, target=None):
        if name == "numpy":
            deadline = time.monotonic() + 30
            while not os.path.exists({gate!r}) and time.monotonic() < deadline:
                time.sleep(0.01)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Gate())
sys.argv = ["streamgmm", "run", "--config", {config!r}]
from streamgmm.cli import main
sys.exit(main())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads SigCgt from /proc")
@pytest.mark.parametrize("name, code", [("SIGHUP", 129), ("SIGINT", 0)])
def test_a_stop_signal_while_starting_stops_it_as_a_later_one_would(tmp_path, name, code):
    # In the first second (importing numpy, scipy and librdkafka) a SIGHUP killed the process
    # outright and a SIGINT printed a traceback, where later ones stop it with exit 129 (for
    # systemd's Restart=on-failure) and 0 (helper-63). The signal comes while numpy's import is
    # held, once the process handles SIGHUP (the last of the three it takes; Python handles SIGINT
    # from its own start): before, nothing handled SIGHUP until after the imports.
    import signal

    signum = getattr(signal, name)
    path, _ = _config(tmp_path)
    gate = tmp_path / "go"
    process = subprocess.Popen([sys.executable, "-c", GATED_RUN.format(gate=str(gate), config=str(path))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               preexec_fn=_signals_as_at_a_terminal)
    try:
        deadline = time.monotonic() + 10
        while not _catches(process.pid, signal.SIGHUP) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        handled = _catches(process.pid, signal.SIGHUP)
        process.send_signal(signum)
        gate.touch()
        assert handled, "SIGHUP was not handled while the start-up imported numpy"
        assert process.wait(timeout=60) == code
        stderr = process.stderr.read().decode()
    finally:
        gate.touch()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert f"received {name}" in stderr and "Traceback" not in stderr


def test_a_checkpoint_of_another_pipeline_is_refused(tmp_path):
    # Two daemons started from one directory share ./state: a restart took the other's model,
    # which read other topics, and flagged 3,000 of 3,000 normal messages (helper-35).
    _, raw = _config(tmp_path)
    _checkpoint(raw, tmp_path)  # a model that read topic "in"
    path, _ = _config(tmp_path, kafka={"input_topics": ["other"]})
    code, last, stderr = _run(path)
    assert code == 2 and "Traceback" not in stderr
    assert "another pipeline: it read in, this daemon reads other" in last and "model.init_from" in last


def test_two_daemons_on_one_checkpoint_dir_the_second_is_refused(tmp_path):
    # They overwrote each other's files through the same temporary names and pruned each
    # other's checkpoints (helper-35). The first holds the directory while it runs (here it
    # retries an unreachable broker); the second says who holds it.
    path, _ = _config(tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "streamgmm", "run", "--config", str(path)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "state" / ".lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and str(first.pid) in lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert str(first.pid) in lock.read_text()
        code, last, stderr = _run(path)
        assert code == 2 and "Traceback" not in stderr
        assert f"is in use by streamgmm pid {first.pid}" in last and "its own checkpoint.dir" in last
    finally:
        first.kill()
        first.wait(10)
    LocalStateStore(tmp_path / "state", keep=3).lock()  # a killed holder leaves it free (kill -9 included)


def test_a_file_system_without_locks_is_not_called_in_use(tmp_path, monkeypatch, caplog):
    # ENOLCK (NFS without lockd) was reported as "in use by streamgmm pid 1": exit 2, and with
    # RestartPreventExitStatus=2 a unit that stays down (helper-36).
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        LocalStateStore(tmp_path / "state", keep=3).lock()
    assert "cannot lock checkpoint.dir" in caplog.text and "No locks available" in caplog.text


def test_a_lock_file_of_another_user_and_two_probes_at_once_are_not_tracebacks(tmp_path, monkeypatch):
    # A .lock left by a first run as root: PermissionError traceback, exit 1 (systemd restarted
    # it for ever); two daemons starting at once shared the write probe's name and one was told
    # the directory was not writable (helper-38).
    import builtins

    from streamgmm.service.state import CheckpointError

    real_open = builtins.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    with pytest.raises(CheckpointError, match="cannot open .*\\.lock: Permission denied; give the daemon's user"):
        LocalStateStore(tmp_path / "state", keep=3).lock()
    monkeypatch.undo()
    import os
    store = LocalStateStore(tmp_path / "state", keep=3)
    store.check_writable()
    assert not any(p.name.startswith(".streamgmm-write-test") for p in (tmp_path / "state").iterdir())
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    probes = []
    real_write = __import__("streamgmm.service.state", fromlist=["write_atomically"]).write_atomically
    monkeypatch.setattr("streamgmm.service.state.write_atomically", lambda p, d: probes.append(p) or real_write(p, d))
    store.check_writable()
    assert probes[0].name == ".streamgmm-write-test-4242"


def test_fit_into_a_running_daemons_directory_is_refused(tmp_path):
    # fit --output into a running daemon's checkpoint.dir wrote a model the daemon's restart then
    # took, its 3,000 learned messages gone (helper-38).
    path, raw = _config(tmp_path)
    holder = LocalStateStore(tmp_path / "state", keep=3)
    holder.lock()
    data = tmp_path / "d.csv"
    rng = np.random.default_rng(0)
    data.write_text("a,b,c\n" + "\n".join(",".join(map(repr, x)) for x in rng.normal(size=(300, 3)).tolist()))
    result = subprocess.run([sys.executable, "-m", "streamgmm", "fit", "--config", str(path), "--input", str(data),
                             "--output", str(tmp_path / "state"), "--format", "csv"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is in use by streamgmm pid" in result.stderr, result.stderr
    assert not list((tmp_path / "state").glob("checkpoint-*"))


def test_a_checkpoint_dir_removed_while_running_is_locked_again(tmp_path):
    # rm -rf of the directory: the next checkpoint made it again without a lock, and a second
    # daemon started on it was not refused; both learned the same messages (helper-39).
    import shutil

    from streamgmm.service.state import CheckpointError

    running = LocalStateStore(tmp_path / "state", keep=3)
    running.lock()
    shutil.rmtree(tmp_path / "state")
    running.write("global", {"n": 1})
    with pytest.raises(CheckpointError, match="is in use by streamgmm pid"):
        LocalStateStore(tmp_path / "state", keep=3).lock()
    # ... and when the other daemon got there first, every write of this one is refused, not
    # only the first (a retry wrote into the other's directory; helper-42).
    shutil.rmtree(tmp_path / "state")
    other = LocalStateStore(tmp_path / "state", keep=3)
    other.lock()
    for _ in range(2):
        with pytest.raises(CheckpointError, match="is in use by streamgmm pid"):
            running.write("global", {"n": 2})
    assert not list((tmp_path / "state").glob("checkpoint-*"))


def test_a_crash_in_native_code_leaves_the_stacks_in_the_log(tmp_path):
    # librdkafka segfaulted on Tansu's answer for a deleted topic: the daemon died with nothing in
    # its log but the exit status (helper-52). The Python stacks now go to stderr (the journal).
    import signal

    path, _ = _config(tmp_path)
    with _running(path) as process:
        # Not before it has logged (faulthandler is on before the daemon logs anything): a fixed
        # sleep could signal a process still importing on a loaded machine (review, helper-54).
        deadline, first = time.monotonic() + 30.0, b""
        while not first and time.monotonic() < deadline and process.poll() is None:
            if select.select([process.stderr], [], [], 0.5)[0]:
                first = process.stderr.readline()
        assert first, "the daemon logged nothing within 30 s"
        process.send_signal(signal.SIGSEGV)
        process.wait(timeout=30)
    stderr = first.decode() + process.stderr.read().decode()
    assert process.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in stderr and "streamgmm" in stderr.split("Fatal Python error")[1]


FATAL_RUN = """
import sys
from confluent_kafka import KafkaError
from streamgmm.service.daemon import Daemon

def run(self):
    self._on_client_error(KafkaError(KafkaError._FATAL, "the producer was fenced", fatal=True))
    assert self._stop.is_set()

Daemon.run = run
from streamgmm.cli import main
sys.exit(main(["run", "--config", {config!r}]))
"""


def test_a_fatal_client_error_exits_1_so_that_the_service_manager_starts_it_again(tmp_path):
    # The fatal error stopped the daemon, which then exited 0 after a clean last checkpoint:
    # Restart=on-failure left the unit down for good (helper-78, from the code).
    path, _ = _config(tmp_path)
    result = subprocess.run([sys.executable, "-c", FATAL_RUN.format(config=str(path))], capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "fatal Kafka client error" in result.stderr and "the producer was fenced" in result.stderr

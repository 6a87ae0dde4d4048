"""The command line as users call it (subprocesses, real files)."""

import io
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from streamgmm.dev.synthetic import random_mixture


def _cli(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "streamgmm", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def _config(tmp_path, **model):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"format": "csv", "dimension": 3, "fields": ["a", "b", "c"]},
        "model": {"n_components": 2, "warmup": 300, **model},
        "threshold": {"quantile": 0.01},
        "checkpoint": {"dir": str(tmp_path / "state")},
    }))
    return path


def _csv(tmp_path, n=3000, outliers=(1000, 2000)):
    rng = np.random.default_rng(0)
    X, _ = random_mixture(2, 3, rng).sample(n, rng)
    for i in outliers:
        X[i] = 50.0
    path = tmp_path / "data.csv"
    lines = ["label,a,b,c"] + [f"{int(i in outliers)}," + ",".join(repr(float(v)) for v in x) for i, x in enumerate(X)]
    lines.insert(500, "0,not,a,number")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_replay_scores_every_record_before_learning(tmp_path):
    result = _cli("replay", "--config", str(_config(tmp_path)), "--input", str(_csv(tmp_path)))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3001
    assert rows[499]["invalid"] == "undecodable"
    assert all(r["log_density"] is None and not r["anomaly"] for r in rows[:300])
    # Offsets count data lines (header excluded); the outliers at data rows 1000 and 2000
    # sit at offsets 1001 and 2001 because of the invalid line inserted before them.
    assert rows[1001]["anomaly"] and rows[2001]["anomaly"]
    flagged = sum(r["anomaly"] for r in rows)
    assert 2 <= flagged <= 2 + 0.03 * 2700
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["n_records"] == 3001 and summary["n_invalid"] == 1


def test_replay_reads_stdin_jsonl(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 3))
    config = _config(tmp_path)
    stdin = "\n".join(json.dumps(list(x)) for x in X)
    result = _cli("replay", "--config", str(config), "--input", "-", "--format", "json", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 600


def test_replay_from_stdin_takes_the_configured_json_format(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump({"input": {"format": "json", "dimension": 3},
                                    "model": {"n_components": 2, "warmup": 300}}))
    X = np.random.default_rng(2).normal(size=(500, 3))
    result = _cli("replay", "--config", str(path), "--input", "-", stdin="\n".join(json.dumps(list(x)) for x in X))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["n_valid"] == 500 and summary["n_invalid"] == 0


def test_replay_where_every_record_is_invalid_fails_and_says_why(tmp_path):
    stdin = "\n".join(json.dumps({"x": i}) for i in range(50))
    result = _cli("replay", "--config", str(_config(tmp_path)), "--input", "-", "--format", "json", stdin=stdin)
    assert result.returncode == 1
    assert "none of the 50 records was valid as json" in result.stderr


def test_fit_writes_a_checkpoint_the_daemon_and_inspect_read(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "fitted"
    result = _cli("fit", "--config", str(config), "--input", str(_csv(tmp_path)), "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_rows"] == 3000 and report["n_invalid"] == 1
    inspected = _cli("inspect", str(out), "--json")
    assert inspected.returncode == 0, inspected.stderr
    # Strict JSON: -Infinity (a threshold level) broke JavaScript's JSON.parse (helper-49).
    summary = json.loads(inspected.stdout, parse_constant=lambda name: pytest.fail(f"{name} in inspect --json"))
    assert summary["n_seen"] == 3000 and summary["initialized"]
    assert summary["threshold"]["value"] is not None
    assert len(summary["weights"]) == 2
    assert summary["format_version"] == 2  # the file's own (every file said 1; helper-43)
    text = _cli("inspect", str(out))
    assert "points learned    3,000 (n_seen:" in text.stdout  # in words, not a dict repr
    # Each component's mean (helper-83: weights alone hid a component of anomalies taken in).
    assert len(summary["means"]) == 2 and re.search(r"  component \d: weight 0\.\d+, mean a -?[\d.]+, b ", text.stdout)  # input.fields
    assert "{" not in text.stdout
    # How the threshold was set (fit calibrates on the file's scores, as they were scored).
    assert "q = 0.01, from the stream's scores as they were scored" in text.stdout, text.stdout


def test_check_config_and_run_fail_fast_on_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  covariance_type: ful\n")
    for args in (("check-config", str(bad)), ("run", "--config", str(bad))):
        result = _cli(*args)
        assert result.returncode == 2
        assert "model.covariance_type: 'ful' is not allowed" in result.stderr
    good = _cli("check-config", "config/streamgmm.yaml")
    assert good.returncode == 0 and "n_components: auto" in good.stdout


@pytest.mark.parametrize("settings, message", [
    ({"checkpoint": {"dir": "FILE/state"}}, "is not writable: FILE is not a directory"),
    # access() lets root write in /proc, where no file can be made (check-config said ok; helper-48)
    ({"checkpoint": {"dir": "/proc/streamgmm-state"}}, "/proc is on a filesystem with no space for files"),
    ({"metrics": {"host": "::1"}}, "cannot serve metrics on ::1"),
    ({"model": {"init_from": "MISSING"}}, "does not exist"),
])
def test_check_config_refuses_what_run_refuses_before_its_loop(tmp_path, settings, message):
    # Each of these passed check-config and stopped `run` with exit 2 (helper-41); the README's
    # "fix it, check it with check-config, restart" then restarted into the same failure.
    (tmp_path / "FILE").write_text("x")
    text = yaml.safe_dump({"checkpoint": {"dir": str(tmp_path / "state")}, **settings})
    text = text.replace("FILE", str(tmp_path / "FILE")).replace("MISSING", str(tmp_path / "missing"))
    (tmp_path / "c.yaml").write_text(text)
    result = _cli("check-config", str(tmp_path / "c.yaml"))
    assert result.returncode == 2 and message.replace("FILE", str(tmp_path / "FILE")) in result.stderr
    assert not (tmp_path / "state").exists()  # checked without making anything


def test_check_config_refuses_a_model_init_from_of_other_inputs_and_not_a_copy_it_need_not_write(tmp_path):
    # An init_from of dimension 4 under a dimension-5 config passed check-config and stopped run
    # with exit 2; an unwritable checkpoint.dir that run only warns of (scope partition with a
    # state topic: the files are a copy) was refused (helper-42).
    data = tmp_path / "d.csv"
    data.write_text("\n".join(",".join(map(str, row)) for row in np.random.default_rng(0).normal(size=(400, 4))))
    fitted = tmp_path / "fitted"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"input": {"format": "csv", "dimension": 4},
                                                     "model": {"warmup": 300},
                                                     "checkpoint": {"dir": str(tmp_path / "state")}}))
    assert _cli("fit", "--config", str(tmp_path / "c.yaml"), "--input", str(data), "--output", str(fitted)).returncode == 0
    (tmp_path / "five.yaml").write_text(yaml.safe_dump({"input": {"format": "csv", "dimension": 5},
                                                        "model": {"init_from": str(fitted)},
                                                        "checkpoint": {"dir": str(tmp_path / "state")}}))
    result = _cli("check-config", str(tmp_path / "five.yaml"))
    assert result.returncode == 2 and "model.init_from=" in result.stderr
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump({"model": {"scope": "partition"},
                                                        "checkpoint": {"dir": str(tmp_path / "FILE" / "state"),
                                                                       "topic": "streamgmm.state"}}))
    assert _cli("check-config", str(tmp_path / "copy.yaml")).returncode == 0


def test_check_config_notes_a_checkpoint_dir_and_a_port_another_process_holds(tmp_path):
    # Said, not refused: the daemon the config is for holds both while it runs (helper-83 got a
    # bare "ok" for a second daemon's config, which `run` then refused).
    import fcntl
    import socket

    from streamgmm.dev.embedded import free_port

    state, port = tmp_path / "state", free_port()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"checkpoint": {"dir": str(state)},
                                                     "metrics": {"host": "127.0.0.1", "port": port}}))
    quiet = _cli("check-config", str(tmp_path / "c.yaml"))
    assert quiet.returncode == 0 and "note:" not in quiet.stderr
    state.mkdir()
    with open(state / ".lock", "a+") as lock, socket.socket() as server:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("streamgmm pid 4242 on host-a\n")
        lock.flush()
        server.bind(("127.0.0.1", port))
        server.listen()
        held = _cli("check-config", str(tmp_path / "c.yaml"))
    assert held.returncode == 0
    assert f"note: checkpoint.dir {state} is in use by streamgmm pid 4242 on host-a now" in held.stderr
    assert f"note: metrics port 127.0.0.1:{port} is taken now" in held.stderr


def test_check_config_refuses_a_checkpoint_dir_that_run_would_refuse(tmp_path):
    # Against a checkpoint of dimension 4, a dimension-5 config, or one reading another topic,
    # passed check-config and `run` exited 2: the unit's RestartPreventExitStatus=2 left it down
    # (helper-44).
    from streamgmm.service.state import CheckpointStore, read_checkpoint_file

    data = tmp_path / "d.csv"
    data.write_text("\n".join(",".join(map(str, row)) for row in np.random.default_rng(0).normal(size=(400, 4))))
    state = tmp_path / "state"
    config = {"kafka": {"input_topics": ["features"]}, "input": {"format": "csv", "dimension": 4},
              "model": {"warmup": 300}, "checkpoint": {"dir": str(state)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert _cli("fit", "--config", str(tmp_path / "c.yaml"), "--input", str(data), "--output", str(state)).returncode == 0
    assert _cli("check-config", str(tmp_path / "c.yaml")).returncode == 0
    (tmp_path / "five.yaml").write_text(yaml.safe_dump({**config, "input": {"format": "csv", "dimension": 5}}))
    five = _cli("check-config", str(tmp_path / "five.yaml"))
    assert five.returncode == 2 and "input.dimension=4" in five.stderr
    read = read_checkpoint_file(CheckpointStore(state).paths()[-1])
    CheckpointStore(state).write({**read, "offsets": {"features": {"0": 400}}})
    assert _cli("check-config", str(tmp_path / "c.yaml")).returncode == 0
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**config, "kafka": {"input_topics": ["payments"]}}))
    other = _cli("check-config", str(tmp_path / "other.yaml"))
    assert other.returncode == 2 and "the model of another pipeline: it read features" in other.stderr


def test_check_config_reads_the_environment_file_the_unit_gives_the_daemon(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"checkpoint": {"dir": str(tmp_path / "state")}}))
    (tmp_path / "streamgmm.env").write_text("# set by the unit\nSTREAMGMM_MODEL__N_COMPNENTS=\"3\"\n")
    assert _cli("check-config", str(tmp_path / "c.yaml")).returncode == 0
    result = _cli("check-config", str(tmp_path / "c.yaml"), "--env-file", str(tmp_path / "streamgmm.env"))
    assert result.returncode == 2 and "unknown key model.n_compnents" in result.stderr


def test_inspect_an_empty_directory_fails_clearly(tmp_path):
    result = _cli("inspect", str(tmp_path))
    assert result.returncode == 1 and "no valid checkpoint" in result.stderr


def test_json_logs_have_iso_milliseconds_a_zone_and_no_python_reprs(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": ["127.0.0.1:1"]},
                                    "checkpoint": {"dir": str(tmp_path / "state")},
                                    "metrics": {"port": 0}, "logging": {"format": "json"}}))
    process = subprocess.Popen([sys.executable, "-m", "streamgmm", "run", "--config", str(path)],
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("effective config" in line for line in lines):
            lines.append(process.stderr.readline())
    finally:
        process.terminate()
        process.wait(timeout=30)
    documents = [json.loads(line) for line in lines if line.strip()]
    assert documents, lines
    for document in documents:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", document["time"]), document
    config_line = next(d["message"] for d in documents if "effective config" in d["message"])
    assert json.loads(config_line.split("effective config: ", 1)[1])["kafka"]["bootstrap_servers"] == ["127.0.0.1:1"]


# ------------------------------------------------------- what a newcomer ran into
def _heavy_tailed_csv(tmp_path, n=5000):
    """Student-t rows: many points near the threshold, so a stale threshold shows."""
    X = np.random.default_rng(0).standard_t(3, size=(n, 3))
    path = tmp_path / "t.csv"
    path.write_text("a,b,c\n" + "\n".join(",".join(repr(float(v)) for v in x) for x in X) + "\n")
    return path


def test_replay_threshold_is_the_one_each_row_was_decided_by(tmp_path):
    result = _cli("replay", "--config", str(_config(tmp_path)), "--input", str(_heavy_tailed_csv(tmp_path)))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["threshold"] is None for r in rows[:300])  # warm-up: no model, no threshold
    scored = rows[300:]
    assert all(r["anomaly"] == (r["log_density"] < r["threshold"]) for r in scored)
    # The young model's threshold is re-estimated within the first 1000-row batch.
    assert len({r["threshold"] for r in scored[:700]}) > 1


def _one_error_line(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamgmm: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_replay_and_fit_name_input_fields_the_csv_header_lacks(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump({"input": {"format": "csv", "dimension": 3, "fields": ["a", "b", "x"]},
                                      "model": {"n_components": 2, "warmup": 300}}))
    data = str(_csv(tmp_path))
    _one_error_line(_cli("replay", "--config", str(config), "--input", data), "['x']", "input.fields", data)
    _one_error_line(_cli("fit", "--config", str(config), "--input", data, "--output", str(tmp_path / "f")),
                    "['x']", "input.fields", data)


def test_a_missing_input_or_output_path_is_one_line(tmp_path):
    config = str(_config(tmp_path))
    missing = str(tmp_path / "nonexistent.csv")
    _one_error_line(_cli("replay", "--config", config, "--input", missing), missing, "--input")
    _one_error_line(_cli("fit", "--config", config, "--input", missing, "--output", str(tmp_path / "f")),
                    missing, "--input")
    out = str(tmp_path / "nonexistent" / "o.jsonl")
    _one_error_line(_cli("replay", "--config", config, "--input", str(_csv(tmp_path)), "--output", out),
                    out, "--output")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_error_line(_cli("fit", "--config", config, "--input", str(_csv(tmp_path)), "--output", str(blocker / "d")),
                    "--output")



def _fit_auto(tmp_path, *extra):
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump({"input": {"format": "csv", "dimension": 3, "fields": ["a", "b", "c"]},
                                      "model": {"warmup": 300}}))
    out = tmp_path / f"fitted{len(extra)}"
    result = _cli("fit", "--config", str(config), "--input", str(_heavy_tailed_csv(tmp_path)), "--output", str(out),
                  *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), out


def test_inspect_shows_the_fitted_auto_model_and_takes_a_checkpoint_file(tmp_path):
    report, out = _fit_auto(tmp_path)
    for target in (out, report["checkpoint"]):
        text = _cli("inspect", str(target))
        assert text.returncode == 0, text.stderr
        assert f"{report['n_components']} component(s), {report['covariance_type']} covariances" in text.stdout
        assert "auto" in text.stdout  # says the configuration let the warm-up choose
        summary = json.loads(_cli("inspect", str(target), "--json").stdout)
        assert summary["path"] == report["checkpoint"]
        assert summary["model"]["n_components"] == report["n_components"]
        assert summary["model"]["covariance_type"] == report["covariance_type"]
        assert summary["model"]["configured"] == {"n_components": "auto", "covariance_type": "auto"}


def test_inspect_a_lone_corrupt_checkpoint_says_there_is_nothing_to_fall_back_to(tmp_path):
    _, out = _fit_auto(tmp_path)
    (path,) = out.glob("checkpoint-*.sgmm")
    path.write_bytes(path.read_bytes()[:-10])
    for target in (out, path):
        result = _cli("inspect", str(target))
        assert result.returncode == 1
        assert "falling back" not in result.stderr and "truncated" in result.stderr, result.stderr
    assert "no valid checkpoint" in _cli("inspect", str(out)).stderr


def test_inspect_passes_over_a_checkpoint_of_another_shape_as_the_daemon_does(tmp_path):
    # A valid checksum over content that is no model's: inspect printed a KeyError traceback,
    # and showed what the daemon would pass over (review of the eleventh session).
    from streamgmm.service.state import CheckpointStore

    _, out = _fit_auto(tmp_path)
    CheckpointStore(out).write({"kind": "streamgmm-detector", "offsets": {}})
    result = _cli("inspect", "--json", str(out))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "holds no streamgmm model state (KeyError: 'model')" in result.stderr
    assert json.loads(result.stdout)["n_seen"] > 0
    for path in sorted(out.glob("checkpoint-*.sgmm"))[:-1]:
        path.unlink()
    result = _cli("inspect", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds no streamgmm model state (KeyError: 'model')" in result.stderr, result.stderr


def test_inspect_a_path_that_is_not_there_says_what_to_pass(tmp_path):
    result = _cli("inspect", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "a checkpoint directory or a checkpoint file" in result.stderr



def test_fit_gives_n_init_and_max_iter_to_the_auto_search(tmp_path):
    default, _ = _fit_auto(tmp_path)
    quick, _ = _fit_auto(tmp_path, "--n-init", "1", "--max-iter", "1")
    assert quick["mean_log_likelihood"] != default["mean_log_likelihood"]


def test_every_argument_says_what_it_is():
    from streamgmm.cli.main import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if not action.required and action.option_strings and action.default not in (None, False):
                assert "default" in action.help, f"{name} {action.option_strings} does not say its default"
    fit_help = subparsers.choices["fit"].format_help()
    assert "auto" in fit_help and "--n-init" in fit_help


def test_repeated_warnings_are_held_back_but_repeated_events_are_not():
    import logging

    from streamgmm.cli.main import RepeatFilter

    def record(level, message, created):
        r = logging.LogRecord("streamgmm.service.daemon", level, __file__, 1, message, (), None)
        r.created = created
        return r

    repeat = RepeatFilter(interval=30.0)
    assert repeat.filter(record(logging.WARNING, "cannot connect to Kafka", 0.0))
    assert not repeat.filter(record(logging.WARNING, "cannot connect to Kafka", 10.0))
    assert repeat.filter(record(logging.WARNING, "cannot connect to Kafka", 31.0))
    # The same rebalance twice within seconds is two events: both are logged.
    assert repeat.filter(record(logging.INFO, "revoked feat/0", 0.0))
    assert repeat.filter(record(logging.INFO, "revoked feat/0", 5.0))
    lost = [record(logging.WARNING, "lost feat/0 to the group", t) for t in (0.0, 5.0)]
    for r in lost:
        r.event = True  # as the daemon logs it
    assert all(repeat.filter(r) for r in lost)


def test_a_second_episode_of_the_same_error_is_logged_after_the_first_ended():
    # The disk filled, freed ("checkpoints written again"), filled again 20 s later: the second
    # "checkpoint failed (1 in a row)" was held back as a repeat, and the log's last word was
    # that checkpoints worked (helper-67).
    import logging

    from streamgmm.cli.main import RepeatFilter

    def record(name, level, message, created):
        r = logging.LogRecord(name, level, __file__, 1, message, (), None)
        r.created = created
        return r

    repeat = RepeatFilter(interval=30.0)
    failed = "checkpoint failed (1 in a row): No space left on device; retrying in 1 s"
    checkpointer = "streamgmm.service.checkpointer"
    assert repeat.filter(record(checkpointer, logging.ERROR, failed, 0.0))
    again = record(checkpointer, logging.INFO, "checkpoint written; checkpoints written again after 4", 5.0)
    again.ends_repeats = True  # as the checkpointer logs it
    assert repeat.filter(again)
    assert repeat.filter(record(checkpointer, logging.ERROR, failed, 20.0))
    # A routine INFO line of the same logger does not: a warning between checkpoints is thinned.
    copy_failed = "the local copy of the checkpoint in checkpoint.dir /x failed (No space left on device)"
    assert repeat.filter(record(checkpointer, logging.WARNING, copy_failed, 30.0))
    assert repeat.filter(record(checkpointer, logging.INFO, "checkpoint of 1 model(s) written", 32.0))
    assert not repeat.filter(record(checkpointer, logging.WARNING, copy_failed, 34.0))


def test_healthcheck_asks_the_port_the_config_and_its_overrides_give(tmp_path):
    # The image's HEALTHCHECK asked port 9464 whatever metrics.port said: unhealthy on any other.
    import http.server
    import os
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"metrics": {"port": port, "host": "0.0.0.0"}}))
        assert _cli("healthcheck", "--config", str(path)).returncode == 0
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            free = unused.getsockname()[1]
        elsewhere = subprocess.run([sys.executable, "-m", "streamgmm", "healthcheck", "--config", str(path)],
                                   capture_output=True, text=True, timeout=60,
                                   env={**os.environ, "STREAMGMM_METRICS__PORT": str(free)})
        assert elsewhere.returncode == 1 and f"127.0.0.1:{free}/healthz" in elsewhere.stderr
    finally:
        server.shutdown()


def test_healthcheck_loads_only_the_config(tmp_path):
    # A container runs it every 15 s beside the daemon: through the whole package it imported
    # numpy, scipy, confluent-kafka (and scikit-learn where installed), 1.8 s of a 5 s timeout.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"enabled": False}}))
    probe = ("import sys; from streamgmm.cli import main; code = main(['healthcheck', '--config', sys.argv[1]]); "
             "print(code, sorted(m for m in ('numpy', 'scipy', 'confluent_kafka', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60)
    assert result.stdout.split(None, 1) == ["0", "[]\n"], result.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"metrics": {"prot": 9464}}))
    refused = _cli("healthcheck", "--config", str(typo))
    assert refused.returncode == 2 and "metrics.prot" in refused.stderr


def test_replay_starts_from_model_init_from_and_explains_its_anomalies(tmp_path):
    # replay ignored model.init_from (a preview of a fitted model scored with a fresh one), and its
    # lines had no rarity or top features: what on-call reads could not be previewed.
    out = tmp_path / "fitted"
    assert _cli("fit", "--config", str(_config(tmp_path)), "--input", str(_csv(tmp_path)),
                "--output", str(out)).returncode == 0
    started = _cli("replay", "--config", str(_config(tmp_path, init_from=str(out))), "--input", str(_csv(tmp_path)))
    assert started.returncode == 0, started.stderr
    rows = [json.loads(line) for line in started.stdout.splitlines()]
    assert rows[0]["log_density"] is not None  # no warm-up: the fitted model scores from the first row
    outlier = rows[1001]
    assert outlier["anomaly"] and outlier["top_features"][0]["name"] in ("a", "b", "c")
    assert outlier["rarity"]["one_in"] is not None or outlier["rarity"]["log10_tail_probability"] < -10
    assert "top_features" not in rows[1002]
    missing = _cli("replay", "--config", str(_config(tmp_path, init_from=str(tmp_path / "none"))),
                   "--input", str(_csv(tmp_path)))
    assert missing.returncode != 0 and "model.init_from" in missing.stderr


def test_a_daemon_started_from_a_fit_on_clean_data_flags_anomalies_present_from_its_first_point(tmp_path):
    # 1% of outliers 4-8 sd off from the first point, q = 0.001: a threshold that calibrates on the
    # stream takes them for its tail and flags few; `fit` on clean data now calibrates the
    # threshold on the file's scores, so a start from it flags them and keeps them out.
    rng = np.random.default_rng(3)
    mixture = random_mixture(2, 3, rng)
    clean, _ = mixture.sample(8000, rng)
    stream, _ = mixture.sample(20000, rng)
    outliers = np.flatnonzero(rng.random(len(stream)) < 0.01)
    stream[outliers, rng.integers(0, 3, len(outliers))] += rng.choice([-1.0, 1.0], len(outliers)) * rng.uniform(4.0, 8.0, len(outliers))

    def write(path, X):
        path.write_text("\n".join(["a,b,c"] + [",".join(repr(float(v)) for v in x) for x in X]) + "\n")
        return path

    raw = {"input": {"format": "csv", "dimension": 3, "fields": ["a", "b", "c"]},
           "threshold": {"quantile": 0.001}, "checkpoint": {"dir": str(tmp_path / "state")}}
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw))
    fitted = tmp_path / "fitted"
    fit = _cli("fit", "--config", str(plain), "--input", str(write(tmp_path / "clean.csv", clean)),
               "--output", str(fitted))
    assert fit.returncode == 0, fit.stderr
    started = tmp_path / "started.yaml"
    started.write_text(yaml.safe_dump({**raw, "model": {"init_from": str(fitted)}}))
    data = write(tmp_path / "stream.csv", stream)
    recall = {}
    for name, config in (("plain", plain), ("started", started)):
        result = _cli("replay", "--config", str(config), "--input", str(data))
        assert result.returncode == 0, result.stderr
        flags = np.array([json.loads(line)["anomaly"] for line in result.stdout.splitlines()])
        recall[name] = flags[outliers].mean()
        normal = np.ones(len(stream), bool)
        normal[outliers] = False
        if name == "started":
            assert flags[normal].mean() < 3 * 0.001, flags[normal].mean()
    assert recall["started"] >= 0.85, recall  # 0.92; without the calibration in fit 0.05, as plain (0.09)


def test_replay_to_its_own_input_is_refused_and_the_file_kept(tmp_path):
    # --output equal to --input emptied the file, exit 0 (helper-37).
    data = _csv(tmp_path)
    before = data.read_bytes()
    result = _cli("replay", "--config", str(_config(tmp_path)), "--input", str(data), "--output", str(data))
    assert result.returncode == 2 and "is the --input file" in result.stderr and "Traceback" not in result.stderr
    assert data.read_bytes() == before


def test_quoted_csv_a_bom_and_spaced_header_names_are_read(tmp_path):
    # A quoted header was refused, a headerless quoted file lost its first row (taken for a
    # header), "a, b, c" and a byte-order mark were names the header lacked (helper-37).
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 3))
    rows = [",".join(f'"{v!r}"' for v in x) for x in X.tolist()]
    files = {"quoted_no_header.csv": rows, "quoted.csv": ['"a","b","c"'] + rows,
             "spaced.csv": ["a, b, c"] + [",".join(map(repr, x)) for x in X.tolist()],
             "bom.csv": ["\ufeffa,b,c"] + [",".join(map(repr, x)) for x in X.tolist()]}
    for name, lines in files.items():
        path = tmp_path / name
        path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
        result = _cli("replay", "--config", str(_config(tmp_path)), "--input", str(path), "--output",
                      str(tmp_path / "out.jsonl"))
        assert result.returncode == 0, (name, result.stderr)
        summary = json.loads(result.stderr.strip().splitlines()[0])["summary"]
        assert summary["n_records"] == summary["n_valid"] == 400, (name, summary)


def test_a_gzip_compressed_input_is_replayed_as_the_plain_one(tmp_path):
    # A .csv.gz was read as text: "the CSV header lacks input.fields (it has <compressed bytes>)"
    # with the bytes on the terminal, exit 2 (helper-72).  A cut one says so, no traceback.
    import gzip

    data = _csv(tmp_path)
    packed = tmp_path / "stream.csv.gz"
    packed.write_bytes(gzip.compress(data.read_bytes()))
    config = str(_config(tmp_path))
    plain = _cli("replay", "--config", config, "--input", str(data))
    compressed = _cli("replay", "--config", config, "--input", str(packed))
    assert plain.returncode == compressed.returncode == 0, compressed.stderr
    assert compressed.stdout == plain.stdout
    piped = subprocess.run([sys.executable, "-m", "streamgmm", "replay", "--config", config, "--input", "-"],
                           input=packed.read_bytes(), capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.decode() == plain.stdout, piped.stderr.decode()[-2000:]
    # Its first byte alone in the pipe for a while (peek saw one byte: read as text; helper-76).
    slow = subprocess.Popen([sys.executable, "-m", "streamgmm", "replay", "--config", config, "--input", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    slow.stdin.write(packed.read_bytes()[:1])
    slow.stdin.flush()
    time.sleep(1.0)
    out, err = slow.communicate(packed.read_bytes()[1:], timeout=120)
    assert slow.returncode == 0 and out.decode() == plain.stdout, err.decode()[-2000:]
    # Bytes that are not UTF-8 on stdin: decided as from the file (undecodable), not a traceback.
    latin = tmp_path / "latin.csv"
    rows = data.read_bytes().split(b"\n")
    rows[5] += b"\xe9"  # a data row
    latin.write_bytes(b"\n".join(rows))
    from_file = _cli("replay", "--config", config, "--input", str(latin))
    from_stdin = subprocess.run([sys.executable, "-m", "streamgmm", "replay", "--config", config, "--input", "-"],
                                input=latin.read_bytes(), capture_output=True, timeout=120)
    assert from_stdin.returncode == from_file.returncode == 0, from_stdin.stderr.decode()[-2000:]
    assert from_stdin.stdout.decode() == from_file.stdout
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(packed.read_bytes()[: len(packed.read_bytes()) // 2])
    damaged = bytearray(packed.read_bytes())
    damaged[12] ^= 0xFF  # inside the compressed data: zlib.error (helper-75)
    (tmp_path / "damaged.csv.gz").write_bytes(bytes(damaged))
    bad_crc = bytearray(packed.read_bytes())
    bad_crc[-8] ^= 0xFF  # BadGzipFile, an OSError without strerror: "cannot read: None"
    (tmp_path / "crc.csv.gz").write_bytes(bytes(bad_crc))
    for name in ("cut.csv.gz", "damaged.csv.gz", "crc.csv.gz"):
        for command in (["replay", "--output", str(tmp_path / "o.jsonl")], ["fit", "--output", str(tmp_path / "m")]):
            result = _cli(command[0], "--config", config, "--input", str(tmp_path / name), *command[1:])
            assert result.returncode == 2 and "Traceback" not in result.stderr, (name, command[0], result.stderr)
            assert "cannot be read to its end" in result.stderr, (name, command[0], result.stderr)


def test_replay_decides_quoted_cells_as_the_daemon_does(tmp_path):
    # Replay unquoted each cell and the decoder again: '"""5"""' was 5.0 in replay and
    # undecodable in the daemon (helper-75).
    from streamgmm.detection.decode import Decoder
    from streamgmm.service.config import InputConfig

    rng = np.random.default_rng(2)
    lines = [",".join(f'"{v!r}"' for v in x) for x in rng.normal(size=(400, 3)).tolist()] + ['"""5""",1,2']
    path = tmp_path / "q.csv"
    path.write_text("\n".join(lines) + "\n")
    result = _cli("replay", "--config", str(_config(tmp_path)), "--input", str(path), "--output", str(tmp_path / "o"))
    summary = json.loads(result.stderr.strip().splitlines()[0])["summary"]
    daemon = Decoder(InputConfig(format="csv", dimension=3)).decode([line.encode() for line in lines])
    assert summary["n_invalid"] == len(daemon.invalid) == 1, (summary, daemon.invalid)


def test_replay_from_a_model_of_other_fields_is_one_line(tmp_path):
    data = _csv(tmp_path)
    assert _cli("fit", "--config", str(_config(tmp_path)), "--input", str(data), "--output",
                str(tmp_path / "m")).returncode == 0
    other = tmp_path / "o.yaml"
    other.write_text(yaml.safe_dump({"input": {"format": "csv", "dimension": 3, "fields": ["c", "b", "a"]},
                                     "model": {"n_components": 2, "warmup": 300, "init_from": str(tmp_path / "m")}}))
    result = _cli("replay", "--config", str(other), "--input", str(data))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.init_from" in result.stderr.strip().splitlines()[-1]


def test_fit_on_fewer_rows_than_the_warm_up_is_refused(tmp_path):
    # 3 rows made a model that flagged 100 points in 300 as "1 in 1.3" (helper-37).
    data = tmp_path / "few.csv"
    data.write_text("a,b,c\n1,2,3\n2,3,4\n3,4,5\n")
    result = _cli("fit", "--config", str(_config(tmp_path)), "--input", str(data), "--output", str(tmp_path / "m"))
    assert result.returncode == 2 and "fewer than model.warmup=300" in result.stderr
    assert not (tmp_path / "m").exists()


def test_a_config_file_that_is_not_utf8_and_a_yaml_error_are_one_line_naming_the_file(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("# caf\u00e9\ninput: {dimension: 3}\n".encode("latin-1"))
    result = _cli("check-config", str(latin))
    assert result.returncode == 2 and "is not UTF-8" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("input:\n  dimension: [3\n")
    result = _cli("check-config", str(broken))
    assert result.returncode == 2 and "broken.yaml" in result.stderr and "<unicode string>" not in result.stderr


def test_ctrl_c_during_a_replay_is_one_line(tmp_path):
    import signal

    rng = np.random.default_rng(2)
    data = tmp_path / "big.csv"
    data.write_text("a,b,c\n" + "\n".join(",".join(map(repr, x)) for x in rng.normal(size=(400_000, 3)).tolist()))
    process = subprocess.Popen([sys.executable, "-m", "streamgmm", "replay", "--config", str(_config(tmp_path)),
                                "--input", str(data), "--output", str(tmp_path / "out.jsonl")],
                               stderr=subprocess.PIPE, text=True,
                               # (Ctrl-C as at a terminal: a suite run in the background passes
                               # SIGINT on ignored, and Python then keeps it so.)
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").stat().st_size < 10_000:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr


def test_init_from_a_checkpoint_file_a_missing_path_and_what_inspect_says_it_fits(tmp_path):
    # A checkpoint file was refused as init_from (inspect takes one), a missing path read "no
    # valid checkpoint there" prefixed with the input's name, and inspect did not say which
    # dimension and fields a model fits (helper-37).
    data = _csv(tmp_path)
    assert _cli("fit", "--config", str(_config(tmp_path)), "--input", str(data), "--output",
                str(tmp_path / "m")).returncode == 0
    checkpoint = next((tmp_path / "m").glob("checkpoint-*.sgmm"))
    shown = _cli("inspect", str(checkpoint))
    assert "dimension 3, fields a, b, c" in shown.stdout
    for init_from, code, words in ((checkpoint, 0, None), (tmp_path / "nope", 2, "does not exist")):
        config = _config(tmp_path, init_from=str(init_from))
        result = _cli("replay", "--config", str(config), "--input", str(data), "--output", str(tmp_path / "o.jsonl"))
        assert result.returncode == code, result.stderr
        if words:
            assert words in result.stderr and str(data) not in result.stderr


def test_a_file_no_record_of_which_is_valid_says_why_the_first_was_not(tmp_path):
    data = tmp_path / "four.csv"
    data.write_text("\n".join("1,2,3,4" for _ in range(400)))
    result = _cli("replay", "--config", str(_config(tmp_path)), "--input", str(data))
    assert result.returncode == 1 and "the first: wrong_dimension" in result.stderr
    result = _cli("fit", "--config", str(_config(tmp_path)), "--input", str(data), "--output", str(tmp_path / "m"))
    assert result.returncode == 2 and "the first invalid: wrong_dimension" in result.stderr


def test_replay_refuses_a_row_of_another_width_than_the_header(tmp_path):
    # With input.fields picked from a header, a short row was "undecodable" (a missing cell read
    # as '') and a long one taken as valid, its extra cells dropped (helper-41).
    from streamgmm.cli.replay import record_values
    from streamgmm.service.config import config_from_dict

    config = config_from_dict({"input": {"format": "csv", "fields": ["a", "b", "c"]}}, environ={})
    lines = "a,b,c,label\n1,2,3,0\n1,2,3,0,9\n1,2\n4,5,6\n"
    values = list(record_values(io.StringIO(lines), "csv", config))
    assert values[0] == b"1,2,3"
    from streamgmm.detection.decode import Decoder

    decoder = Decoder(config.input)
    for value in values[1:]:  # 5 cells; 2; 3 where the header has 4: each the wrong width
        assert decoder.decode([value]).invalid[0].reason == "wrong_dimension"


def test_fit_does_not_write_over_a_stopped_daemons_model(tmp_path):
    # A fit into a stopped daemon's checkpoint.dir became its newest checkpoint; the next start
    # restored it without a word and checkpoint.keep pruned the learned model (helper-49).
    from streamgmm.service.state import CheckpointStore, read_checkpoint_file

    data = tmp_path / "d.csv"
    data.write_text("\n".join(",".join(map(str, row)) for row in np.random.default_rng(0).normal(size=(400, 4))))
    state = tmp_path / "state"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"input": {"format": "csv", "dimension": 4},
                                                     "model": {"warmup": 300}, "checkpoint": {"dir": str(state)}}))
    fit = ("fit", "--config", str(tmp_path / "c.yaml"), "--input", str(data), "--output", str(state))
    assert _cli(*fit).returncode == 0
    assert _cli(*fit).returncode == 0  # over an earlier fit: fine
    daemons = read_checkpoint_file(CheckpointStore(state).paths()[-1])
    daemons["counters"]["n_valid"] = 60_000
    CheckpointStore(state).write({**daemons, "offsets": {"features": {"0": 60_000}}})
    before = CheckpointStore(state).paths()
    refused = _cli(*fit)
    assert refused.returncode == 2 and "a daemon that has read 60,000 messages" in refused.stderr
    assert CheckpointStore(state).paths() == before


def test_replay_says_nothing_was_scored_only_when_nothing_was(tmp_path):
    # With model.init_from, 100 records under a warm-up of 300 were all scored, and the replay
    # still said "no model was made and nothing was scored" (helper-49).
    rows = np.random.default_rng(1).normal(size=(400, 4))
    (tmp_path / "train.csv").write_text("\n".join(",".join(map(str, r)) for r in rows))
    (tmp_path / "few.csv").write_text("\n".join(",".join(map(str, r)) for r in rows[:100]))
    base = {"input": {"format": "csv", "dimension": 4}, "model": {"warmup": 300},
            "checkpoint": {"dir": str(tmp_path / "state")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    assert _cli("fit", "--config", str(tmp_path / "c.yaml"), "--input", str(tmp_path / "train.csv"),
                "--output", str(tmp_path / "fitted")).returncode == 0
    (tmp_path / "from.yaml").write_text(yaml.safe_dump({**base, "model": {"warmup": 300,
                                                                          "init_from": str(tmp_path / "fitted")}}))
    scored = _cli("replay", "--config", str(tmp_path / "from.yaml"), "--input", str(tmp_path / "few.csv"))
    assert scored.returncode == 0 and "nothing was scored" not in scored.stderr
    assert all(json.loads(line)["log_density"] is not None for line in scored.stdout.splitlines())
    unscored = _cli("replay", "--config", str(tmp_path / "c.yaml"), "--input", str(tmp_path / "few.csv"))
    assert unscored.returncode == 0 and "no model was made and nothing was scored" in unscored.stderr


def test_replay_with_the_daemons_config_says_it_did_not_use_the_daemons_model(tmp_path):
    # An operator replayed with the daemon's own config, expected its live model, and got a new
    # one warmed up on the file's first rows without a word (helper-52).
    config, data = _config(tmp_path), _csv(tmp_path)
    assert _cli("fit", "--config", str(config), "--input", str(data), "--output", str(tmp_path / "state")).returncode == 0
    result = _cli("replay", "--config", str(config), "--input", str(data))
    assert result.returncode == 0, result.stderr
    assert f"the model in checkpoint.dir {tmp_path / 'state'} was not read" in result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1])["summary"]["n_records"] == 3001
    quiet = _cli("replay", "--config", str(_config(tmp_path, init_from=str(tmp_path / "state"))), "--input", str(data))
    assert quiet.returncode == 0 and "was not read" not in quiet.stderr



def _unit_copy(tmp_path, name, env_lines=""):
    """The shipped unit with its EnvironmentFile= paths moved under tmp_path."""
    text = (Path(__file__).parent.parent / "systemd" / name).read_text()
    text = text.replace("/etc/streamgmm/", f"{tmp_path}/etc/")
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc" / "streamgmm.env").write_text(env_lines)
    unit = tmp_path / name
    unit.write_text(text)
    return unit


def test_check_config_with_the_unit_checks_what_the_unit_runs(tmp_path):
    # --env-file alone left out the unit's own STREAMGMM_CHECKPOINT__DIR: ok, then the service
    # exited 2 on the real directory's checkpoint of another dimension (helper-78).
    import os

    if not os.access("/var/lib", os.W_OK):
        pytest.skip("the units' state directories are under /var/lib, which this user cannot write")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": {"format": "json", "dimension": 3}}))
    unit = _unit_copy(tmp_path, "streamgmm.service")
    result = _cli("check-config", str(config), "--unit", str(unit))
    assert result.returncode == 0, result.stderr
    assert "dir: /var/lib/streamgmm" in result.stdout
    # The template takes its port, state directory and client id from the instance.
    template = _unit_copy(tmp_path, "streamgmm@.service")
    assert "--instance" in _cli("check-config", str(config), "--unit", str(template)).stderr
    result = _cli("check-config", str(config), "--unit", str(template), "--instance", "9465")
    assert result.returncode == 0, result.stderr
    assert "dir: /var/lib/streamgmm-9465" in result.stdout and "port: 9465" in result.stdout
    # The env file overrides the unit's lines, as systemd has it.
    _unit_copy(tmp_path, "streamgmm.service", "STREAMGMM_CHECKPOINT__DIR=/var/lib/streamgmm/x\n")
    assert "dir: /var/lib/streamgmm/x" in _cli("check-config", str(config), "--unit", str(unit)).stdout


@pytest.mark.parametrize("settings, message", [
    ({"model": {"init_from": "/tmp/model.sgmm"}}, "model.init_from=/tmp/model.sgmm: the unit's PrivateTmp=/ProtectHome= (or DynamicUser="),
    ({"checkpoint": {"dir": "/srv/streamgmm"}}, "checkpoint.dir=/srv/streamgmm: the unit's ProtectSystem=strict (or DynamicUser=) keeps it"),
])
def test_check_config_with_the_unit_names_a_path_its_sandbox_hides(tmp_path, settings, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": {"format": "json", "dimension": 3}, **settings}))
    # (checkpoint.dir from the YAML: the unit's own line would override it)
    unit = _unit_copy(tmp_path, "streamgmm.service")
    unit.write_text(unit.read_text().replace("Environment=STREAMGMM_CHECKPOINT__DIR=/var/lib/streamgmm\n", ""))
    result = _cli("check-config", str(config), "--unit", str(unit))
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_check_config_reads_a_unit_as_systemd_does(tmp_path, monkeypatch):
    # helper-80: drop-ins (`systemctl edit`) were not read, a line continued with a backslash was
    # a shlex error, DynamicUser=yes alone (which implies PrivateTmp= and ProtectSystem=strict)
    # passed a checkpoint.dir under /tmp, and a STREAMGMM_* of the caller's shell counted.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": {"format": "json", "dimension": 3}}))
    state = tmp_path / "state"
    unit = tmp_path / "f.service"
    unit.write_text(f"[Service]\nReadWritePaths={tmp_path}\nProtectSystem=strict\n"
                    f"Environment=A=1 \\\n  STREAMGMM_CHECKPOINT__DIR={state}/base\n")
    monkeypatch.setenv("STREAMGMM_CHECKPOINT__DIR", "/somewhere/else")
    result = _cli("check-config", str(config), "--unit", str(unit))
    assert result.returncode == 0 and f"dir: {state}/base" in result.stdout, result.stderr
    (tmp_path / "f.service.d").mkdir()
    (tmp_path / "f.service.d" / "override.conf").write_text(
        f"[Service]\nEnvironment=STREAMGMM_CHECKPOINT__DIR={state}/override\n")
    result = _cli("check-config", str(config), "--unit", str(unit))
    assert result.returncode == 0 and f"dir: {state}/override" in result.stdout, result.stderr
    unit.write_text("[Service]\nDynamicUser=yes\nEnvironment=STREAMGMM_CHECKPOINT__DIR=/tmp/streamgmm\n")
    (tmp_path / "f.service.d" / "override.conf").unlink()
    result = _cli("check-config", str(config), "--unit", str(unit))
    assert result.returncode == 2 and "checkpoint.dir=/tmp/streamgmm: the unit's PrivateTmp=" in result.stderr
    assert "goes with a template unit" in _cli("check-config", str(config), "--unit", str(unit), "--instance", "1").stderr

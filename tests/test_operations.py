"""Operating the daemon: /metrics, /healthz, /readyz from a running process; the demo."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from kafka_helpers import DaemonProcess, create_topic, produce, write_config

from streamgmm.detection.decode import encode
from streamgmm.dev.synthetic import random_mixture

pytestmark = pytest.mark.kafka


def test_metrics_move_and_readyz_flips_when_the_model_is_initialised(broker, topic, tmp_path):
    create_topic(broker.bootstrap, topic, partitions=2)
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topic, tmp_path / "state")
    daemon = DaemonProcess(config, tmp_path / "d.log").start()
    try:
        daemon.wait_for(lambda: daemon.get("/healthz")[0] == 200, what="healthz")
        status, body = daemon.get("/readyz")
        assert status == 503 and "not ready" in body  # no model yet
        assert daemon.get("/nope")[0] == 404

        rng = np.random.default_rng(0)
        X, _ = random_mixture(3, 4, rng).sample(300, rng)  # fewer than the 500-point warm-up
        produce(broker.bootstrap, topic, [(None, encode(x, "json")) for x in X])
        daemon.wait_for(lambda: daemon.metric("streamgmm_messages_consumed_total") == 300, what="300 consumed")
        status, body = daemon.get("/readyz")
        assert status == 503 and "warming up" in body and "300/500" in body, body  # says why, in words
        assert daemon.metric("streamgmm_model_initialized") == 0

        X, _ = random_mixture(3, 4, rng).sample(3000, rng)
        X[2000] = 1e4
        produce(broker.bootstrap, topic, [(None, encode(x, "json")) for x in X] + [(None, b"garbage"), (None, b"[1]")])
        daemon.wait_for(lambda: daemon.metric("streamgmm_messages_consumed_total") == 3302, what="all consumed")
        daemon.wait_for(lambda: daemon.get("/readyz")[0] == 200, what="ready")
        daemon.wait_for(lambda: (daemon.metric("streamgmm_checkpoints_written_total") or 0) >= 1, what="a checkpoint")
        m = daemon.metric
        assert m("streamgmm_messages_valid_total") == 3300
        assert m("streamgmm_invalid_messages_total", 'reason="undecodable"') == 1
        assert m("streamgmm_invalid_messages_total", 'reason="wrong_dimension"') == 1
        assert m("streamgmm_invalid_messages_total", 'reason="non_finite"') == 0
        assert m("streamgmm_dead_letters_total") == 2
        assert m("streamgmm_anomalies_total") >= 1
        assert m("streamgmm_model_updates_total") >= 1
        assert m("streamgmm_points_learned_total") == (3300 - m("streamgmm_anomalies_total")
                                                       + m("streamgmm_flagged_points_learned_total"))
        assert m("streamgmm_model_initialized") == 1
        assert m("streamgmm_model_points_seen") == m("streamgmm_points_learned_total")
        # Negative buckets: OpenMetrics drops _sum/_count, the +Inf bucket is the count.
        assert m("streamgmm_log_density_bucket", 'le="+Inf"') == 3300 - 500
        assert m("streamgmm_end_to_end_latency_seconds_count") == 3300
        assert m("streamgmm_batch_processing_seconds_count") >= 1
        assert m("streamgmm_threshold_log_density") is not None
        assert m("streamgmm_checkpoint_last_success_timestamp_seconds") > 0
        assert m("streamgmm_assigned_partitions") == 2
        assert m("streamgmm_partitions_past_log_end") == 0  # caught up is at the log's end, not past it
        assert abs(m("streamgmm_last_poll_timestamp_seconds") - time.time()) < 30  # the loop polls, even idle
        assert m("streamgmm_component_weight", 'component="0"') > 0
        daemon.wait_for(lambda: m("streamgmm_consumer_lag_messages", f'partition="0",topic="{topic}"') is not None,
                        what="lag gauge")
        _, text = daemon.get("/metrics")
        assert 'streamgmm_build_info{version="' in text
    finally:
        assert daemon.stop() == 0


def test_demo_command_runs_end_to_end_and_reports(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "streamgmm.dev.demo", "--messages", "30000", "--rate", "15000",
         "--metrics-port", "0", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])["demo_summary"]
    assert summary["consumed"] == 30000
    assert summary["exit_code"] == 0
    assert summary["recall"] >= 0.8
    assert summary["precision"] >= 0.5
    assert "precision" in result.stdout and "curl -s http://127.0.0.1:" in result.stdout
    # The curl line comes while the daemon runs, before progress; waiting lines say why they wait.
    lines = result.stdout.splitlines()
    curl = next(i for i, line in enumerate(lines) if "curl -s" in line)
    assert curl < next(i for i, line in enumerate(lines) if "consumed" in line)
    assert not any("consumed         0" in line for line in lines)
    assert (tmp_path / "state").is_dir() and summary["checkpoint"].startswith(str(tmp_path))


def test_the_health_endpoints_answer_head_as_get_without_a_body():
    # Load balancers and uptime checkers probe with HEAD: it was 501 Unsupported method (helper-44).
    import http.client

    from prometheus_client import CollectorRegistry

    from streamgmm.service.metrics import HealthServer

    server = HealthServer(CollectorRegistry(), "127.0.0.1", 0, lambda: (False, "warming up", {})).start()
    try:
        for path, status in (("/healthz", 200), ("/readyz", 503), ("/metrics", 200), ("/nope", 404)):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("HEAD", path)
            response = connection.getresponse()
            assert (response.status, response.read()) == (status, b""), path
            assert response.getheader("Content-Length") is not None
            connection.close()
    finally:
        server.stop()



def test_the_demo_takes_another_port_when_the_default_is_held(monkeypatch, capsys):
    # A streamgmm.service on the host holds 9464: the demo read its page as the readiness line
    # and the demo's daemon exited 2 (helper-78).
    import socket

    from streamgmm.dev import demo

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setattr(demo, "DEFAULT_METRICS_PORT", held.getsockname()[1])
        port = demo._metrics_port(None)
        assert port != held.getsockname()[1] and not demo._port_in_use(port)
        assert f"port {held.getsockname()[1]} is in use" in capsys.readouterr().out
    assert demo._metrics_port(None) == demo.DEFAULT_METRICS_PORT  # free again
    assert demo._metrics_port(12345) == 12345

"""Deployment files: what can be checked without a Docker engine or a systemd host."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamgmm.service.metrics import Metrics

ROOT = Path(__file__).parent.parent


def _metric_names():
    names = set()
    for family in Metrics().registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
    return names


def _referenced(expr):
    return set(re.findall(r"\bstreamgmm_[a-z_]+", expr))


def test_dockerfile_follows_the_rules_we_set():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM python:3\.11-slim", text, re.M)) == 2  # multi-stage, slim
    assert re.search(r"^USER streamgmm$", text, re.M)  # non-root
    assert re.search(r'^ENTRYPOINT \["streamgmm"\]$', text, re.M)  # exec form: SIGTERM reaches it
    assert re.search(r'^CMD \["run", "--config", "/etc/streamgmm/streamgmm.yaml"\]$', text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'VOLUME ["/var/lib/streamgmm"]' in text
    assert not re.search(r"^(ADD|RUN .*curl|RUN .*wget)", text, re.M)


def test_image_entrypoint_command_accepts_the_shipped_config():
    # What the container runs, minus Kafka: the same CLI and config file, validated.
    result = subprocess.run([sys.executable, "-m", "streamgmm", "check-config", str(ROOT / "config/streamgmm.yaml")],
                            capture_output=True, text=True, timeout=60,
                            env={"STREAMGMM_CHECKPOINT__DIR": "/var/lib/streamgmm", "STREAMGMM_METRICS__HOST": "0.0.0.0",
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "dir: /var/lib/streamgmm" in result.stdout and "host: 0.0.0.0" in result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "systemd/streamgmm.service").read_text()
    for key in ("DynamicUser=yes", "StateDirectory=streamgmm", "ProtectSystem=strict", "NoNewPrivileges=yes",
                "Restart=on-failure", "TimeoutStopSec=90s", "EnvironmentFile=-/etc/streamgmm/streamgmm.env"):
        assert key in unit
    # Point ExecStart at this environment's real executable so verify can check it.
    executable = Path(sys.executable).parent / "streamgmm"
    if not executable.exists():
        pytest.skip("the streamgmm console script is not installed in this environment")
    for name in ("streamgmm.service", "streamgmm@.service"):
        text = (ROOT / "systemd" / name).read_text()
        local = tmp_path / name
        local.write_text(text.replace("/opt/streamgmm/bin/streamgmm", str(executable)))
        result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if "streamgmm" in line and ".service" in line and "Failed to" not in line]
        assert result.returncode == 0 and not problems, result.stdout + result.stderr
    template = (ROOT / "systemd/streamgmm@.service").read_text()
    assert "StateDirectory=streamgmm-%i" in template and "STREAMGMM_KAFKA__CLIENT_ID=streamgmm-%i" in template


def test_alert_rules_use_only_metrics_we_export():
    rules = yaml.safe_load((ROOT / "config/alerts.yaml").read_text())
    names = _metric_names()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {"StreamgmmAnomalyRateSpike", "StreamgmmConsumerStalled",
                                             "StreamgmmLagGrowing", "StreamgmmCheckpointFailing"}
    for alert in alerts:
        unknown = _referenced(alert["expr"]) - names
        assert not unknown, (alert["alert"], unknown)


def test_dashboard_uses_only_metrics_we_export():
    dashboard = json.loads((ROOT / "config/grafana-dashboard.json").read_text())
    names = _metric_names()
    assert len(dashboard["panels"]) >= 10
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            unknown = _referenced(target["expr"]) - names
            assert not unknown, (panel["title"], unknown)

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


# The metrics config/alerts.yaml and the dashboard may rely on (issue 15). Renaming one of these in
# streamgmm/service/metrics.py silently breaks an alert, so test_contract_metrics_are_exported
# holds the two together.
CONTRACT = {
    "streamgmm_messages_consumed_total", "streamgmm_messages_valid_total", "streamgmm_invalid_messages_total",
    "streamgmm_dead_letters_total", "streamgmm_anomalies_total", "streamgmm_points_learned_total",
    "streamgmm_produce_errors_total", "streamgmm_broker_errors_total", "streamgmm_checkpoints_written_total",
    "streamgmm_checkpoint_failures_total", "streamgmm_state_restore_failures_total",
    "streamgmm_state_behind_group_total", "streamgmm_resumed_without_commit_total", "streamgmm_partitions_past_log_end",
    "streamgmm_rewinds_total",
    "streamgmm_start_time_seconds",
    "streamgmm_consumer_lag_messages", "streamgmm_last_poll_timestamp_seconds",
    "streamgmm_checkpoint_last_success_timestamp_seconds", "streamgmm_assigned_partitions",
    "streamgmm_model_initialized", "streamgmm_threshold_log_density",
    *(f"streamgmm_{h}{suffix}" for h in ("log_density", "end_to_end_latency_seconds", "batch_processing_seconds",
                                         "checkpoint_duration_seconds")
      for suffix in ("_bucket", "_sum", "_count")),
}
# The dashboard also plots these (no alert uses them).
DASHBOARD_EXTRA = {"streamgmm_component_weight", "streamgmm_recent_mean_log_likelihood",
                   "streamgmm_output_records_dropped_total"}


def _metric_names():
    metrics = Metrics()
    # The lag gauge is a scrape-time collector the daemon registers: one partition stands in here.
    metrics.watch_lag(lambda: {("t", 0): 5}, lambda: {("t", 0): (0, 10)})
    names = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
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


def _unit(name):
    return (ROOT / "systemd" / name).read_text()


def _directives(text):
    """[(key, value)] of a unit file, comments and section headers left out."""
    return [tuple(line.split("=", 1)) for line in text.splitlines()
            if "=" in line and not line.lstrip().startswith(("#", ";", "["))]


@pytest.mark.parametrize("name", ["streamgmm.service", "streamgmm@.service"])
def test_systemd_units_restart_crashes_but_not_config_errors(name):
    directives = _directives(_unit(name))
    for key in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure",
                "RestartPreventExitStatus=2", "TimeoutStopSec=90s", "EnvironmentFile=-/etc/streamgmm/streamgmm.env",
                "ExecStart=/opt/streamgmm/bin/streamgmm run --config /etc/streamgmm/streamgmm.yaml"):
        assert tuple(key.split("=", 1)) in directives, (name, key)


@pytest.mark.parametrize("name", ["streamgmm.service", "streamgmm@.service"])
def test_systemd_install_comments_use_a_virtualenv(name):
    # `pip install --prefix /opt/streamgmm` leaves a bin/streamgmm that cannot import streamgmm.
    comments = "\n".join(line for line in _unit(name).splitlines() if line.startswith("#"))
    assert "python3 -m venv /opt/streamgmm" in comments
    assert "/opt/streamgmm/bin/pip install" in comments
    assert not re.search(r"^#\s+\S*pip install --prefix", comments, re.M)


def test_systemd_template_gives_each_instance_its_own_port_state_and_client_id():
    from streamgmm.service.config import load_config

    environment = dict(value.split("=", 1) for key, value in _directives(_unit("streamgmm@.service"))
                       if key == "Environment")
    assert environment["STREAMGMM_METRICS__PORT"] == "%i"
    for instance in ("9465", "9466"):
        env = {key: value.replace("%i", instance) for key, value in environment.items()}
        config = load_config(None, env)
        assert config.metrics.port == int(instance)
        assert str(config.checkpoint.dir) == f"/var/lib/streamgmm-{instance}"
        assert config.kafka.client_id == f"streamgmm-{instance}"
    directives = _directives(_unit("streamgmm@.service"))
    assert ("StateDirectory", "streamgmm-%i") in directives
    # Per-instance overrides come after the shared file, so they win.
    files = [value for key, value in directives if key == "EnvironmentFile"]
    assert files == ["-/etc/streamgmm/streamgmm.env", "-/etc/streamgmm/%i.env"]
    # The shared env file must not pin one port for every instance.
    assert not re.search(r"^STREAMGMM_METRICS__PORT=", _unit("streamgmm.env.example"), re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path):
    # Point ExecStart at this environment's real executable so verify can check it.
    executable = Path(sys.executable).parent / "streamgmm"
    if not executable.exists():
        pytest.skip("the streamgmm console script is not installed in this environment")
    for source, name in (("streamgmm.service", "streamgmm.service"), ("streamgmm@.service", "streamgmm@.service"),
                         ("streamgmm@.service", "streamgmm@9465.service")):
        local = tmp_path / name
        local.write_text(_unit(source).replace("/opt/streamgmm/bin/streamgmm", str(executable)))
        result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if "streamgmm" in line and ".service" in line and "Failed to" not in line]
        assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_license_is_the_apache_2_0_text():
    text = (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000


def test_ci_installs_promtool_without_starting_a_server():
    text = (ROOT / ".ci/run").read_text()
    assert "command -v promtool" in text and "apt-get install" in text and " prometheus" in text
    assert "policy-rc.d" in text  # Debian's postinst must not leave a Prometheus server running
    assert text.rstrip().endswith("exec bash scripts/test.sh")


def test_contract_metrics_are_exported():
    missing = CONTRACT - _metric_names()
    assert not missing, f"config/alerts.yaml and the dashboard rely on {sorted(missing)}"
    assert not DASHBOARD_EXTRA - _metric_names()


def test_alert_rules_use_only_contract_metrics():
    rules = yaml.safe_load((ROOT / "config/alerts.yaml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "StreamgmmDown", "StreamgmmAbsent", "StreamgmmLoopStalled", "StreamgmmConsumerStalled", "StreamgmmLagGrowing",
        "StreamgmmCheckpointFailing", "StreamgmmNotReady", "StreamgmmAnomalyRateSpike", "StreamgmmStateRestoreFailing",
        "StreamgmmNothingAssigned", "StreamgmmBrokerErrors", "StreamgmmStateBehindGroup", "StreamgmmPastLogEnd"}
    for alert in alerts:
        unknown = _referenced(alert["expr"]) - CONTRACT
        assert not unknown, (alert["alert"], unknown)


def _dashboard():
    return json.loads((ROOT / "config/grafana-dashboard.json").read_text())


def _targets():
    return [(panel, target) for panel in _dashboard()["panels"] for target in panel.get("targets", [])]


def test_dashboard_queries_only_known_metrics():
    dashboard = _dashboard()
    assert len(dashboard["panels"]) >= 10
    allowed = CONTRACT | DASHBOARD_EXTRA | {"up"}
    for panel, target in _targets():
        unknown = _referenced(target["expr"]) - allowed
        assert not unknown, (panel["title"], unknown)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            assert not _referenced(query) - allowed, variable["name"]


def test_dashboard_targets_have_legends_and_rate_intervals():
    ids = [panel["id"] for panel in _dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel, target in _targets():
        assert target.get("legendFormat", "").strip(), (panel["title"], target["expr"])
        # Fixed short windows come back empty at long scrape intervals: $__rate_interval adapts.
        # The only fixed window allowed is the 1-day baseline of the anomaly fraction.
        for window in re.findall(r"\[([^\]]+)\]", target["expr"]):
            assert window in ("$__rate_interval", "1d"), (panel["title"], window)
        assert "[1m]" not in target["expr"]
        assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_quantiles_are_labelled():
    for panel, target in _targets():
        match = re.match(r"histogram_quantile\((0\.\d+)", target["expr"])
        if match:
            percentile = f"p{round(float(match.group(1)) * 100):d}"
            assert percentile in target["legendFormat"].split(), (panel["title"], target["legendFormat"])


def test_dashboard_log_density_is_a_heatmap():
    panels = [panel for panel, target in _targets() if "streamgmm_log_density_bucket" in target["expr"]]
    assert panels and all(panel["type"] == "heatmap" for panel in panels)
    for panel in panels:
        assert all(target.get("format") == "heatmap" and target["legendFormat"] == "{{le}}" for target in panel["targets"])
        assert panel["options"]["calculate"] is False


def test_dashboard_timestamp_ages_ignore_never():
    # A timestamp gauge is 0 until the first event; time() - 0 would show ~56 years.
    for panel, target in _targets():
        for metric in ("streamgmm_checkpoint_last_success_timestamp_seconds", "streamgmm_last_poll_timestamp_seconds"):
            if metric in target["expr"]:
                assert re.search(rf"\({metric}\{{[^}}]*\}} > 0\)", target["expr"]), target["expr"]
                assert panel["fieldConfig"]["defaults"].get("noValue") == "never", panel["title"]


# x86_64 numbers of systemd's @resources set (systemd 252): calls numpy's OpenBLAS may make as it
# loads (mbind) and that a unit's filter might deny.
RESOURCE_SYSCALLS_X86_64 = {"setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144, "setrlimit": 160,
                            "sched_setaffinity": 203, "mbind": 237, "set_mempolicy": 238, "ioprio_set": 251,
                            "migrate_pages": 256, "move_pages": 279, "prlimit64": 302, "sched_setattr": 314}

DENY_THEN_EXEC = r"""
import ctypes, os, struct, sys
numbers = [int(n) for n in sys.argv[1].split(",")]
def op(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
m = len(numbers)
program = [op(0x20, 0, 0, 4), op(0x15, 0, m + 1, 0xC000003E), op(0x20, 0, 0, 0)]
program += [op(0x15, m - i, 0, n) for i, n in enumerate(numbers)]
program += [op(0x06, 0, 0, 0x7FFF0000), op(0x06, 0, 0, 0x00050000 | 1)]  # allow; errno EPERM
code = b"".join(program)
buffer = ctypes.create_string_buffer(code, len(code))
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
prog = Program(len(program), ctypes.addressof(buffer))
if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    sys.exit(f"seccomp: errno {ctypes.get_errno()}")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@pytest.mark.parametrize("name", ["streamgmm.service", "streamgmm@.service"])
def test_the_units_syscall_filter_fails_calls_softly_and_leaves_resource_calls_to_numpy(name):
    # ~@resources with the default action killed the daemon with SIGSYS at `import numpy`
    # (OpenBLAS's mbind), before it logged a line; 20 restarts, then the unit failed (helper-78).
    text = (ROOT / "systemd" / name).read_text()
    denied = " ".join(re.findall(r"^SystemCallFilter=~(.*)$", text, re.M))
    assert "@resources" not in denied and "mbind" not in denied
    assert re.search(r"^SystemCallErrorNumber=EPERM$", text, re.M)


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").machine() != "x86_64",
                    reason="the seccomp program here is written for x86_64 Linux")
def test_the_daemon_runs_where_resource_calls_fail_with_eperm(tmp_path):
    # What a unit's SystemCallErrorNumber=EPERM gives a call its filter denies: numpy, scipy and a
    # whole replay must go on without them.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": {"format": "csv", "dimension": 2}, "model": {"warmup": 50}}))
    rows = "\n".join(f"{i % 7},{(i * 3) % 11}" for i in range(300)) + "\n"
    numbers = ",".join(str(n) for n in RESOURCE_SYSCALLS_X86_64.values())
    result = subprocess.run([sys.executable, "-c", DENY_THEN_EXEC, numbers, "-m", "streamgmm", "replay",
                             "--config", str(config), "--input", "-", "--output", str(tmp_path / "out.jsonl")],
                            input=rows, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 300

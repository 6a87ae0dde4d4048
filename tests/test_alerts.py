"""Prometheus alerting rules: promtool checks them and runs their unit tests (tests/alerts/).

promtool comes with Debian's `prometheus` package (.ci/run installs it). Without it the tests
skip locally, but fail under CI (env CI set): alert rules that were never evaluated must not
pass as green.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
RULES = ROOT / "config/alerts.yaml"
RULE_TESTS = sorted((ROOT / "tests/alerts").glob("*.test.yaml"))


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so the alert rules would go untested", pytrace=False)
        pytest.skip(message)
    return path


def _run(args):
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return result.returncode, result.stdout + result.stderr


def _alerts():
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules(promtool):
    code, out = _run([promtool, "check", "rules", str(RULES)])
    assert code == 0 and "SUCCESS" in out, out
    assert f"{len(_alerts())} rules found" in out, out


def test_promtool_rule_unit_tests(promtool):
    assert RULE_TESTS, "no tests/alerts/*.test.yaml"
    code, out = _run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert code == 0, out
    assert out.count("SUCCESS") == len(RULE_TESTS), out


def test_every_alert_is_shown_firing_in_a_rule_test():
    # A firing check names the alert with expected labels (alert_rule_test with exp_alerts).
    tested = set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    tested.add(case["alertname"])
    assert {a["alert"] for a in _alerts()} <= tested


def test_quiet_scenarios_cover_idle_standby_and_busy():
    quiet = (ROOT / "tests/alerts/quiet.test.yaml").read_text()
    for instance in ("idle:", "fresh:", "standby:", "busy:", "catchup:", "resume:"):
        assert f'instance="{instance}' in quiet, instance


def test_every_alert_has_for_severity_and_annotations():
    for alert in _alerts():
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", str(alert.get("for", ""))), name
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        assert alert["annotations"]["summary"].strip() and alert["annotations"]["description"].strip(), name


JOB_WIDE_ALERTS = {"StreamgmmNothingAssigned"}


def test_binary_operations_match_on_instance_and_job():
    # `and`/`or`/`unless`/comparisons between two vectors with different label sets silently match
    # nothing (issue 15: StreamgmmConsumerStalled could never fire). Every set operation names
    # its matching labels, and every aggregation keeps both instance and job, except the rules
    # about a whole job (StreamgmmNothingAssigned: no instance owns a partition), which keep job.
    for alert in _alerts():
        expr = alert["expr"]
        for op in re.findall(r"\b(and|or|unless)\b(?!\s+on\s*\(instance, job\))", expr):
            pytest.fail(f"{alert['alert']}: `{op}` without on (instance, job)")
        whole_job = alert["alert"] in JOB_WIDE_ALERTS
        for by in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            expected = {"job"} if whole_job else {"instance", "job"}
            assert {s.strip() for s in by.split(",")} == expected, (alert["alert"], by)

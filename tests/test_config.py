import re

import pytest

from streamgmm.service.config import (ConfigError, as_dict, config_from_dict, load_config, masked, resolve_secrets,
                                      to_yaml)


def test_reference_config_is_valid_and_equals_the_defaults():
    from pathlib import Path

    reference = load_config(Path(__file__).parent.parent / "config" / "streamgmm.yaml", environ={})
    assert reference == config_from_dict({})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"n_compnents": 3}}, "unknown key model.n_compnents (allowed here: n_components,"),
        ({"modle": {}}, "unknown key modle (allowed here: kafka, input, model,"),
        ({"model": {"n_components": "8"}}, "model.n_components: '8' is not allowed; use an integer >= 1, or auto"),
        ({"model": {"n_components": 2.5}}, "model.n_components: expected an integer, got 2.5"),
        ({"model": {"covariance_type": "ful"}}, "model.covariance_type: 'ful' is not allowed; use one of auto, full, tied, diag, spherical"),
        ({"metrics": {"port": 70000}}, "metrics.port: 70000 is not allowed; use a port from 0"),
        ({"kafka": {"bootstrap_servers": ["localhost"]}}, "kafka.bootstrap_servers[0]: 'localhost' is not allowed; use host:port"),
        ({"kafka": {"input_topics": []}}, "kafka.input_topics: () is not allowed; give at least one non-empty topic name"),
        ({"threshold": {"mode": "fixed"}}, "threshold.value: None is not allowed; threshold.mode=fixed needs a log-density value"),
        # Each of these passed the check and failed later, exit 1 and restarted for ever, or flagged
        # nothing (helper-78).
        ({"threshold": {"mode": "fixed", "value": float("nan")}}, "threshold.value: nan is not allowed; use a finite"),
        ({"threshold": {"mode": "fixed", "value": float("-inf")}}, "threshold.value: -inf is not allowed; use a finite"),
        ({"kafka": {"max_batch_messages": 2_000_000}}, "kafka.max_batch_messages: 2000000 is not allowed; use an integer from 1 to 1000000"),
        ({"model": {"random_state": -1}}, "model.random_state: -1 is not allowed; use an integer >= 0"),
        ({"kafka": {"retry_backoff_initial_seconds": float("inf"), "retry_backoff_max_seconds": float("inf")}},
         "kafka.retry_backoff_max_seconds: inf is not allowed; use a number of seconds up to 3600"),
        ({"checkpoint": {"keep": 1}}, "checkpoint.keep: 1 is not allowed; keep at least 2"),
        ({"input": {"fields": ["a", "b"], "dimension": 3}}, "input.fields: ('a', 'b') is not allowed; list exactly input.dimension=3"),
        ({"kafka": {"output_topic": "features"}}, "kafka.output_topic: 'features' is not allowed; use a topic other "
                                                  "than the inputs"),
        # It named kafka.output_topic for a dead-letter topic equal to an input.
        ({"kafka": {"dead_letter_topic": "features"}}, "kafka.dead_letter_topic: 'features' is not allowed"),
        ({"kafka": {"dead_letter_topic": "anomalies"}}, "use a topic other than kafka.output_topic"),
        # Taken before, and every produce to it failed; an infinite interval never checkpointed by
        # time (helper-39).
        ({"kafka": {"output_topic": "a b"}}, "kafka.output_topic: 'a b' is not allowed; use letters, digits"),
        ({"kafka": {"input_topics": ["ok", "no way"]}}, "kafka.input_topics[1]: 'no way' is not allowed"),
        ({"checkpoint": {"interval_seconds": float("inf")}}, "checkpoint.interval_seconds: inf is not allowed"),
        ({"model": {"rare_weight": 0.0001}}, "model.rare_weight: 0.0001 is not allowed; use 0 or a weight above "
                                             "model.min_weight (0.0001)"),
        ({"model": {"rare_weight": "sometimes"}}, "model.rare_weight: 'sometimes' is not allowed"),
        # A scheme passed the check and the daemon retried "No brokers configured" for ever.
        ({"kafka": {"bootstrap_servers": ["http://127.0.0.1:9092"]}}, "without a scheme such as http:// (kafka-1:9092)"),
        ({"threshold": {"learn_from_anomalies": "no"}}, "threshold.learn_from_anomalies: expected true or false, got 'no'"),
        ({"kafka": {"poll_timeout_ms": 0}}, "kafka.poll_timeout_ms: 0 is not allowed; use an integer from 1 to 1000"),
        # 70 s delayed SIGTERM by 62 s and paged as a stalled loop (helper-41).
        ({"kafka": {"poll_timeout_ms": 70_000}}, "kafka.poll_timeout_ms: 70000 is not allowed; use an integer from 1"),
        ({"input": {"fields": ["a", "a", "b"]}}, "input.fields: ('a', 'a', 'b') is not allowed; list each field name once"),
        ({"threshold": {"adopt_flag_rate": 2.0}}, "or null for 10 x threshold.quantile (threshold.adopt: false never adopts)"),
        ({"kafka": {"dead_letter_max_bytes": 3_000_000}},
         "kafka.dead_letter_max_bytes: 3000000 is not allowed; use at most half the producer's message.max.bytes (1000000)"),
        ({"kafka": {"producer": {"message.max.bytes": 100_000}}},
         "kafka.producer.message.max.bytes: 100000 is not allowed; use at least twice kafka.dead_letter_max_bytes "
         "(131072), or lower that"),
        ({"kafka": {"producer": {"message.max.bytes": 100_000}, "dead_letter_max_bytes": 60_000}},
         "kafka.dead_letter_max_bytes: 60000 is not allowed; use at most half the producer's message.max.bytes (100000)"),
    ],
)
def test_invalid_config_names_the_key_and_value(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(raw)


def test_an_environment_variable_with_one_underscore_after_its_section_is_refused():
    with pytest.raises(ConfigError, match=re.escape("environment variable STREAMGMM_MODEL_WARMUP is not a setting: a "
                                                    "section and its key are separated by two underscores; did you "
                                                    "mean STREAMGMM_MODEL__WARMUP?")):
        config_from_dict({}, environ={"STREAMGMM_MODEL_WARMUP": "7"})
    config_from_dict({}, environ={"STREAMGMM_FAULT_CHECKPOINT_PAUSE_SECONDS": "1"})  # not a config variable
    # Another tool's variables that start like a section resemble no setting (helper-47: refused).
    config_from_dict({}, environ={"STREAMGMM_MODEL_PATH": "/models", "STREAMGMM_CHECKPOINT_BUCKET": "s3://b"})


def test_environment_overrides_any_key():
    config = config_from_dict(
        {"model": {"n_components": 4}},
        environ={
            "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9093",
            "STREAMGMM_MODEL__HALF_LIFE": "50000",
            "STREAMGMM_THRESHOLD__LEARN_FROM_ANOMALIES": "true",
            "STREAMGMM_KAFKA__SECURITY__SASL_PASSWORD": "hunter2",
            "UNRELATED": "x",
        },
    )
    assert config.kafka.bootstrap_servers == ("k1:9092", "k2:9093")
    assert config.model.half_life == 50000.0 and config.model.n_components == 4
    assert config.threshold.learn_from_anomalies is True
    assert config.kafka.security["sasl.password"] == "hunter2"  # librdkafka's name
    assert "hunter2" not in str(masked(as_dict(config)))


@pytest.mark.parametrize("typed", ["0777", "1_000", "yes", "p #w", "[x]", "2001-02-03", "a: b"])
def test_a_secret_from_the_environment_reaches_librdkafka_as_typed_and_is_masked(typed):
    # Parsed as YAML, 0777 became 511, "p #w" became "p", "a: b" a mapping printed in clear by
    # check-config and the effective-config log line (helper-35).
    config = config_from_dict({}, environ={"STREAMGMM_KAFKA__SECURITY__SASL_PASSWORD": typed,
                                           "STREAMGMM_KAFKA__CONSUMER__SESSION_TIMEOUT_MS": "6000"})
    assert config.kafka.security["sasl.password"] == typed
    assert typed not in str(masked(as_dict(config)))
    assert masked({"sasl.password": {"a": "b"}}) == {"sasl.password": "***"}


def test_text_settings_from_the_environment_keep_the_text_and_numbers_read_as_numbers():
    # group id 00123 was refused as "expected a string, got 83" (YAML's octal); 1e4 as "got '1e4'".
    config = config_from_dict({}, environ={"STREAMGMM_KAFKA__GROUP_ID": "00123", "STREAMGMM_KAFKA__CLIENT_ID": "no",
                                           "STREAMGMM_KAFKA__INPUT_TOPICS": "0x10,events",
                                           "STREAMGMM_MODEL__HALF_LIFE": "1e4"})
    assert config.kafka.group_id == "00123" and config.kafka.client_id == "no"
    assert config.kafka.input_topics == ("0x10", "events")
    assert config.model.half_life == 10_000.0
    assert config_from_dict({"model": {"half_life": "2.5e3"}}).model.half_life == 2500.0  # the file's YAML too
    assert config_from_dict({"model": {"rare_weight": "1e-3"}}).model.rare_weight == 0.001  # float | "auto"
    # ... and YAML's own text, lists and null as before (helper-36: "null" became a topic named null).
    config = config_from_dict({"kafka": {"scores_topic": "scores"}, "checkpoint": {"topic": "state"}},
                              environ={"STREAMGMM_KAFKA__SCORES_TOPIC": "null", "STREAMGMM_CHECKPOINT__TOPIC": "~",
                                       "STREAMGMM_KAFKA__INPUT_TOPICS": "[a, 00123, '0.5']",
                                       "STREAMGMM_KAFKA__GROUP_ID": "'my group'",
                                       "STREAMGMM_KAFKA__CONSUMER": "{fetch.wait.max.ms: 5}",
                                       "STREAMGMM_KAFKA__CONSUMER__SESSION_TIMEOUT_MS": "6000"})
    assert config.kafka.scores_topic is None and config.checkpoint.topic is None
    # A list's items as typed too: [a, 00123] was ("a", 83).
    assert config.kafka.input_topics == ("a", "00123", "0.5") and config.kafka.group_id == "my group"
    assert dict(config.kafka.consumer) == {"fetch.wait.max.ms": 5, "session.timeout.ms": "6000"}


def test_env_override_typo_is_an_error_too():
    with pytest.raises(ConfigError, match=re.escape("unknown key model.n_compnents")):
        config_from_dict({}, environ={"STREAMGMM_MODEL__N_COMPNENTS": "3"})


def test_secret_files_are_read(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    resolved = resolve_secrets({"sasl.password_file": str(secret), "ssl.ca.location": "/ca.pem"}, "kafka.security")
    assert resolved == {"sasl.password": "s3cret", "ssl.ca.location": "/ca.pem"}
    with pytest.raises(ConfigError, match="kafka.security.sasl.password_file: cannot read secret file"):
        resolve_secrets({"sasl.password_file": str(tmp_path / "missing")}, "kafka.security")


@pytest.mark.parametrize("section, settings, message", [
    ("consumer", {"fetch.wait.max.msx": 10}, "kafka.consumer.fetch.wait.max.msx"),
    ("producer", {"compression.type": "zipp"}, "kafka.producer.compression.type"),
    ("security", {"security.protocoll": "SSL"}, "kafka.security.security.protocoll"),
    ("consumer", {"fetch_max_wait_ms": 10}, "kafka-python's name; librdkafka's is 'fetch.wait.max.ms'"),
    ("consumer", {"enable.auto.commit": True}, "kafka.consumer.enable.auto.commit: set by streamgmm"),
    ("consumer", {"partition.assignment.strategy": "cooperative-sticky"}, "cooperative protocol is not supported"),
    ("consumer", {"group.protocol": "consumer"}, "only the classic group protocol is supported"),
    # A setting of the other client is ignored by librdkafka (a warning): refused here, with where it goes.
    ("consumer", {"acks": "all"}, "kafka.consumer.acks: a producer setting, which the consumer ignores; "
                                  "move it to kafka.producer"),
    ("consumer", {"compression.type": "lz4"}, "kafka.consumer.compression.type: a producer setting"),
    ("producer", {"fetch.wait.max.ms": 5}, "kafka.producer.fetch.wait.max.ms: a consumer setting"),
    # A check across two settings names the one set (was "kafka.consumer or kafka.security"; helper-56).
    ("consumer", {"max.poll.interval.ms": 1}, "kafka.consumer.max.poll.interval.ms: Failed to create consumer"),
])
def test_librdkafka_settings_are_checked_without_a_broker(section, settings, message):
    from streamgmm.service.kafka import check_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"], section: settings}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_settings(config)


@pytest.mark.parametrize("section, key, value", [
    ("consumer", "session.timeout.ms", "6s"), ("consumer", "session.timeout.ms", "6,000"),
    ("consumer", "session.timeout.ms", "1e4"), ("consumer", "session.timeout.ms", " 6000 ms"),
    # These two were refused by librdkafka first, for the value it half-read: "value 1 is outside
    # allowed range", "message.timeout.ms must be greater than linger.ms".
    ("producer", "message.max.bytes", "1MB"), ("producer", "message.timeout.ms", "2m"),
])
def test_a_number_with_a_unit_or_separator_is_refused_before_librdkafka_half_reads_it(section, key, value):
    # librdkafka reads the leading digits of "6s" and runs with a 6 ms session timeout: the member
    # was expired and rewound over and over (6 rewinds in 27 s, nothing committed).
    from streamgmm.service.kafka import check_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"], section: {key: value}}})
    with pytest.raises(ConfigError, match=rf"kafka.{section}.{re.escape(key)}: .* is not a plain number"):
        check_settings(config)


@pytest.mark.parametrize("value, says", [("06000", "leading 0 as octal (06000 would be 3072)"),
                                         ("0x10", "0x as hex (0x10 would be 16)"),
                                         ("10.5", "keeps only the whole part"), (10.5, "keeps only the whole part"),
                                         ("4294968296", "in 32 bits")])
def test_a_number_librdkafka_would_read_as_another_is_refused(value, says):
    # session.timeout.ms 06000 ran as 3072 ms, fetch.wait.max.ms 10.5 as 10, without a word (helper-47).
    from streamgmm.service.kafka import check_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"], "consumer": {"fetch.wait.max.ms": value}}})
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_settings(config)
    for harmless in ({"consumer": {"fetch.wait.max.ms": "00"}}, {"consumer": {"fetch.wait.max.ms": "45.0"}},
                     {"producer": {"linger.ms": "2.5"}}, {"producer": {"linger.ms": "010"}},  # strtod: decimal
                     {"producer": {"linger.ms": "1e-3"}}):
        check_settings(config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"], **harmless}}))


def test_the_sasl_plain_names_from_the_environment_get_librdkafkas_name():
    # The shipped env example had STREAMGMM_KAFKA__SECURITY__SASL_PLAIN_PASSWORD: exit 2 with
    # "No such configuration property: sasl.plain.password" and no word of the right name.
    from streamgmm.service.kafka import check_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"]}},
                              environ={"STREAMGMM_KAFKA__SECURITY__SASL_PLAIN_PASSWORD": "x"})
    with pytest.raises(ConfigError, match=re.escape("kafka.security.sasl.plain.password: this is kafka-python's "
                                                    "name; librdkafka's is 'sasl.password'")):
        check_settings(config)


def test_the_shipped_environment_example_is_a_valid_config():
    from pathlib import Path

    from streamgmm.service.kafka import check_settings

    example = Path(__file__).parent.parent / "systemd" / "streamgmm.env.example"
    environ = dict(line.lstrip("#").split("=", 1) for line in example.read_text().splitlines()
                   if line.lstrip("#").startswith("STREAMGMM_"))
    assert "STREAMGMM_KAFKA__SECURITY__SASL_PASSWORD" in environ
    check_settings(config_from_dict({}, environ=environ))


@pytest.mark.parametrize("settings", [{"session.timeout.ms": "6000"}, {"session.timeout.ms": 6000},
                                      {"client.rack": "1a"}, {"broker.version.fallback": "2.3.0"}])
def test_numbers_written_plainly_and_words_that_start_with_digits_pass(settings):
    from streamgmm.service.kafka import check_settings

    check_settings(config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"], "consumer": settings}}))


@pytest.mark.parametrize("section, settings, message", [
    ("consumer", {"session.timeout.ms": 6000, "heartbeat.interval.ms": 9000},
     "kafka.consumer.heartbeat.interval.ms: 9000 is not below session.timeout.ms (6000)"),
    ("consumer", {"session.timeout.ms": 6000, "heartbeat.interval.ms": 6000}, "is not below session.timeout.ms"),
    # Against streamgmm's own 10 s session, not librdkafka's 45 s (helper-41: lost its partitions
    # every 10-25 s).
    ("consumer", {"heartbeat.interval.ms": 15000}, "is not below session.timeout.ms (10000)"),
    ("producer", {"acks": 0}, "kafka.producer.acks: 0 sends output nobody acknowledges"),
    ("producer", {"request.required.acks": "0"}, "kafka.producer.request.required.acks: 0"),
])
def test_settings_librdkafka_takes_but_the_daemon_cannot_keep_its_word_under_are_refused(section, settings, message):
    # A heartbeat of 9 s with a 6 s session: the member lost its partitions every 9 s, 4 rewinds in 40 s.
    from streamgmm.service.kafka import check_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"], section: settings}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_settings(config)


def test_acks_0_is_refused_beside_a_session_timeout_written_as_a_decimal():
    from streamgmm.service.kafka import check_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"],
                                         "consumer": {"session.timeout.ms": "45000.0"}, "producer": {"acks": 0}}})
    with pytest.raises(ConfigError, match="kafka.producer.acks: 0"):
        check_settings(config)


def test_our_own_refusals_are_not_sent_to_librdkafkas_documentation():
    from streamgmm.service.kafka import check_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"], "consumer": {"group.id": "x"}}})
    with pytest.raises(ConfigError) as caught:
        check_settings(config)
    assert str(caught.value).startswith("kafka.consumer.group.id: set by streamgmm")
    assert "CONFIGURATION.md" not in str(caught.value) and "kafka.consumer: kafka.consumer" not in str(caught.value)


@pytest.mark.parametrize("variable, value, says", [
    ("STREAMGMM_MODEL__HALF_LFE", "5", "unknown key model.half_lfe"),
    ("STREAMGMM_MODEL__HALF_LIFE", "-5", "model.half_life: -5.0 is not allowed"),
    ("STREAMGMM_MODELL__HALF_LIFE", "5", "unknown key modell "),  # a typo in the section named the variable not
])
def test_a_bad_environment_override_names_the_variable(variable, value, says):
    with pytest.raises(ConfigError, match=re.escape(says) + ".*" + re.escape(f"(set by the environment variable {variable})")):
        config_from_dict({}, environ={variable: value})


def test_a_pass_through_setting_librdkafka_refuses_names_its_variable(monkeypatch):
    # Every other override's error named its variable; librdkafka's refusals did not (helper-44).
    from streamgmm.service.kafka import check_settings

    variable = "STREAMGMM_KAFKA__CONSUMER__SESION_TIMEOUT_MS"
    monkeypatch.setenv(variable, "6000")
    import os

    config = config_from_dict({}, environ=dict(os.environ))
    with pytest.raises(ConfigError, match=re.escape("kafka.consumer.sesion.timeout.ms") + ".*"
                       + re.escape(f"(set by the environment variable {variable})")):
        check_settings(config)
    monkeypatch.delenv(variable)
    in_the_file = config_from_dict({"kafka": {"consumer": {"sesion.timeout.ms": 6000}}}, environ={})
    with pytest.raises(ConfigError) as caught:
        check_settings(in_the_file)
    assert "environment" not in str(caught.value)


def test_a_bad_key_in_the_file_does_not_blame_the_environment():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"model": {"half_lfe": 5}}, environ={"STREAMGMM_MODEL__WARMUP": "500"})
    assert "environment" not in str(caught.value)


def test_good_librdkafka_settings_pass_and_the_defaults_can_be_overridden():
    from streamgmm.service.kafka import check_settings, client_settings

    config = config_from_dict({"kafka": {"bootstrap_servers": ["127.0.0.1:1"],
                                         "consumer": {"session.timeout.ms": 6000, "fetch.wait.max.ms": 20},
                                         "producer": {"compression.type": "lz4"}}})
    check_settings(config)
    assert client_settings(config, "consumer")["session.timeout.ms"] == 6000
    assert client_settings(config, "consumer")["enable.auto.commit"] is False
    assert client_settings(config, "producer")["compression.type"] == "lz4"


def test_config_is_frozen():
    config = config_from_dict({})
    with pytest.raises(Exception):
        config.model.n_components = 3  # type: ignore[misc]


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad, environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(listed, environ={})


def test_input_dimension_follows_the_fields_unless_set():
    assert config_from_dict({}).input.dimension == 16
    assert config_from_dict({"input": {"fields": ["a", "b", "c"]}}).input.dimension == 3
    with pytest.raises(ConfigError, match=re.escape("list exactly input.dimension=4 field names")):
        config_from_dict({"input": {"fields": ["a", "b", "c"], "dimension": 4}})


def test_a_key_given_twice_is_refused_naming_it(tmp_path):
    # YAML keeps the last of two silently: one of two warmup lines would be ignored without a word.
    path = tmp_path / "twice.yaml"
    path.write_text("input:\n  format: json\n  dimension: 4\nmodel:\n  warmup: 300\n  warmup: 400\n")
    with pytest.raises(ConfigError, match=r"found the key 'warmup' twice(.|\n)*line 6"):
        load_config(path, environ={})


def test_yaml_merge_keys_still_load(tmp_path):
    # The check for keys given twice must not refuse "<<: *anchor" (it did: no constructor for it).
    path = tmp_path / "merged.yaml"
    path.write_text("input:\n  format: json\n  dimension: 4\nkafka:\n  consumer:\n"
                    "    <<: &timeouts {session.timeout.ms: 6000, heartbeat.interval.ms: 1000}\n"
                    "    fetch.wait.max.ms: 50\n")
    consumer = load_config(path, environ={}).kafka.consumer
    assert consumer == {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "fetch.wait.max.ms": 50}


def test_bootstrap_servers_may_carry_librdkafkas_protocol_prefix():
    config = config_from_dict({"kafka": {"bootstrap_servers": ["SASL_SSL://kafka-1:9093", "PLAINTEXT://[::1]:9092"]}})
    assert config.kafka.bootstrap_servers[0] == "SASL_SSL://kafka-1:9093"


@pytest.mark.parametrize("threshold, min_weight, expected", [
    ({"quantile": 0.001}, 1e-4, 0.001),
    ({"quantile": 0.05}, 1e-4, 0.01),  # at most 0.01
    ({"quantile": 1e-4}, 1e-4, 0.001),  # at least 10 x min_weight: a re-seeded component can start rare
    ({"mode": "fixed", "value": -20.0, "quantile": 0.0}, 1e-4, 0.01),  # fixed asks for no share
])
def test_rare_weight_auto_follows_the_quantile_within_bounds(threshold, min_weight, expected):
    from streamgmm.detection.detector import rare_weight

    config = config_from_dict({"model": {"min_weight": min_weight}, "threshold": threshold})
    assert rare_weight(config) == pytest.approx(expected)


def test_text_from_the_environment_keeps_a_hash_and_a_colon_and_a_key_is_masked():
    # "my #group" became "my" (YAML read the rest as a comment), "team: a" a mapping; a private
    # key in ssl.key.pem was printed in the clear; a whole section replaced the file's (helper-38).
    config = config_from_dict(
        {"kafka": {"consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}}},
        environ={"STREAMGMM_KAFKA__GROUP_ID": "my #group", "STREAMGMM_KAFKA__CLIENT_ID": "team: a",
                 "STREAMGMM_KAFKA__SECURITY__SSL_KEY_PEM": "-----BEGIN PRIVATE KEY-----\nabc",
                 "STREAMGMM_KAFKA__CONSUMER": "{fetch.wait.max.ms: 50}"})
    assert config.kafka.group_id == "my #group" and config.kafka.client_id == "team: a"
    assert "BEGIN PRIVATE KEY" not in str(masked(as_dict(config)))
    # ... and an OAUTHBEARER config, which carries the client's secret (helper-41).
    assert masked({"sasl.oauthbearer.config": "principal=a clientSecret=s3"}) == {"sasl.oauthbearer.config": "***"}
    assert dict(config.kafka.consumer) == {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                                           "fetch.wait.max.ms": 50}
    with pytest.raises(ConfigError, match="STREAMGMM_MODEL: set a section's keys one by one"):
        config_from_dict({}, environ={"STREAMGMM_MODEL": "{alpha: 0.9}"})  # was ignored without a word


def test_a_lower_case_logging_level_is_taken():
    # "debug" was refused as not one of DEBUG, INFO, WARNING, ERROR (helper-39).
    assert config_from_dict({"logging": {"level": "debug"}}).logging.level == "debug"
    with pytest.raises(ConfigError, match="logging.level: 'verbose' is not allowed"):
        config_from_dict({"logging": {"level": "verbose"}})


@pytest.mark.parametrize("server", ["127.0.0.1:9092;127.0.0.1:9093", "127.0.0.1:9092 kafka-2:9092",
                                    "localhost:9092:9092", "kafka-1:9092,"])
def test_a_bootstrap_list_written_with_the_wrong_separator_is_refused(server):
    # It passed and the daemon resolved "[127.0.0.1:9092;127.0.0.1:1]:9092" for ever (helper-44).
    with pytest.raises(ConfigError, match=re.escape("kafka.bootstrap_servers[0]")):
        config_from_dict({"kafka": {"bootstrap_servers": [server]}}, environ={})
    assert config_from_dict({"kafka": {"bootstrap_servers": ["[::1]:9092", "kafka-1.example.com:9093"]}}, environ={})


@pytest.mark.parametrize("output", ["output_topic", "dead_letter_topic", "scores_topic"])
def test_an_input_pattern_that_matches_a_topic_the_daemon_writes_is_refused(output):
    # ^lp.* took lp-dead too: the daemon dead-lettered its own dead letters, 1,300 a second (helper-44).
    kafka = {"input_topics": ["^lp.*"], "output_topic": "lp-anomalies", "dead_letter_topic": "lp-dead",
             "scores_topic": "lp-scores"}
    kafka = {**kafka, **{k: f"other-{k}".replace("_", "-") for k in ("output_topic", "dead_letter_topic", "scores_topic")
                         if k != output}}
    with pytest.raises(ConfigError, match=re.escape(f"kafka.input_topics[0]: ") + ".*reads kafka." + output):
        config_from_dict({"kafka": kafka}, environ={})
    with pytest.raises(ConfigError, match="checkpoint.topic"):
        config_from_dict({"kafka": {"input_topics": ["^in-"]}, "checkpoint": {"topic": "in-state"}}, environ={})
    with pytest.raises(ConfigError, match="valid regular expression"):
        config_from_dict({"kafka": {"input_topics": ["^in-(["]}}, environ={})
    assert config_from_dict({"kafka": {"input_topics": ["^in-.*"], "output_topic": "lp-anomalies"}}, environ={})
    # librdkafka reads POSIX extended expressions (helper-46): its classes are understood, Python's own refused.
    with pytest.raises(ConfigError, match="reads kafka.dead_letter_topic"):
        config_from_dict({"kafka": {"input_topics": ["^features[[:punct:]].*"],
                                    "dead_letter_topic": "features.dead-letter"}}, environ={})
    from streamgmm.service.config import topic_pattern

    # A class means itself only inside a bracket expression; alone it is a set of its letters (helper-48).
    assert topic_pattern("^[:digit:]+").search("dig") and not topic_pattern("^[:digit:]+").search("12")
    assert topic_pattern("^[^[:digit:]]+$").search("abc") and not topic_pattern("^[^[:digit:]]+$").search("a1")
    with pytest.raises(ConfigError, match=re.escape("write [0-9] for \\d")):
        config_from_dict({"kafka": {"input_topics": ["^metrics-\\d+"]}}, environ={})
    with pytest.raises(ConfigError, match="kafka.scores_topic: 'features.scores' is not allowed"):  # a name: its own rule
        config_from_dict({"kafka": {"input_topics": ["features.scores"], "scores_topic": "features.scores"}}, environ={})


def test_a_list_from_the_environment_is_not_split_inside_brackets_or_braces():
    # ^ev-[0-9]{2,} became '^ev-[0-9]{2' and '}', refused as no topic name (helper-47).
    config = config_from_dict({}, environ={"STREAMGMM_KAFKA__INPUT_TOPICS": "^ev-[0-9]{2,},other",
                                           "STREAMGMM_KAFKA__BOOTSTRAP_SERVERS": "[::1]:9092, k2:9093"})
    assert config.kafka.input_topics == ("^ev-[0-9]{2,}", "other")
    assert config.kafka.bootstrap_servers == ("[::1]:9092", "k2:9093")


def test_numbers_read_as_yaml_1_2_reads_them(tmp_path):
    # YAML 1.1 made metrics.port 011 port 9, interval_seconds 030 24.0 and 1:30 90, silently;
    # STREAMGMM_METRICS__PORT=09464 was refused as no integer (helper-44).
    path = tmp_path / "c.yaml"
    path.write_text("metrics: {port: 011}\ncheckpoint: {interval_seconds: 030, interval_messages: 0x10}\n")
    config = load_config(path, environ={})
    assert (config.metrics.port, config.checkpoint.interval_seconds, config.checkpoint.interval_messages) == (11, 30.0, 16)
    assert load_config(path, environ={"STREAMGMM_METRICS__PORT": "09464"}).metrics.port == 9464
    path.write_text("checkpoint: {interval_messages: 1e5}\n")  # a whole number in an exponent: a count
    assert load_config(path, environ={}).checkpoint.interval_messages == 100_000
    path.write_text("checkpoint: {interval_messages: 1.5e3}\n")
    assert load_config(path, environ={}).checkpoint.interval_messages == 1_500
    path.write_text("checkpoint: {interval_messages: 2.5}\n")
    with pytest.raises(ConfigError, match="expected an integer, got 2.5"):
        load_config(path, environ={})
    path.write_text("checkpoint: {interval_seconds: 1:30}\n")
    with pytest.raises(ConfigError, match="checkpoint.interval_seconds: expected a number, got '1:30'"):
        load_config(path, environ={})
    path.write_text("kafka: {group_id: yes}\n")
    with pytest.raises(ConfigError, match="quote the text"):
        load_config(path, environ={})
    # Text that only looks like a number stays text (a first version raised ValueError on "."; helper-46).
    path.write_text("checkpoint: {dir: .}\nmodel: {init_from: 0x_}\nkafka: {group_id: '1e3'}\n")
    config = load_config(path, environ={"STREAMGMM_KAFKA__CLIENT_ID": "-."})
    assert (config.checkpoint.dir, config.model.init_from, config.kafka.client_id) == (".", "0x_", "-.")
    path.write_text(to_yaml(as_dict(config)))  # what check-config prints reads back the same
    assert load_config(path, environ={}) == config


@pytest.mark.parametrize("variable, meant", [("STREAMGMM_CHEKPOINT_DIR", "STREAMGMM_CHECKPOINT__DIR"),
                                             ("STREAMGMM_LOG_LEVEL", "STREAMGMM_LOGGING__LEVEL"),
                                             ("STREAMGMM_KAFK_GROUP_ID", "STREAMGMM_KAFKA__GROUP_ID"),
                                             # an underscore left out, the best of near keys, a secret (helper-48)
                                             ("STREAMGMM_KAFKA_GROUPID", "STREAMGMM_KAFKA__GROUP_ID"),
                                             ("STREAMGMM_MODEL_MAX_COMPONENT", "STREAMGMM_MODEL__MAX_COMPONENTS"),
                                             ("STREAMGMM_KAFKA_SASL_PASSWORD", "STREAMGMM_KAFKA__SECURITY__SASL_PASSWORD")])
def test_an_override_without_a_double_underscore_that_resembles_a_setting_is_refused(variable, meant):
    # Each was skipped and the daemon ran on the file's value (helper-44).
    with pytest.raises(ConfigError, match=f"{variable} is not a setting: .*did you mean {meant}"):
        config_from_dict({}, environ={variable: "x"})
    for other in ("STREAMGMM_VENV", "STREAMGMM_PORT", "STREAMGMM_HOST", "STREAMGMM_FORMAT",  # a compose file's own
                  "STREAMGMM_MODEL_PATH", "STREAMGMM_CHECKPOINT_BUCKET", "STREAMGMM_METRICS_URL"):
        assert config_from_dict({}, environ={other: "x"})


def test_an_empty_config_file_is_refused(tmp_path):
    # A truncated deploy ran on every default: 127.0.0.1:9092, topic "features", ./state (helper-44).
    path = tmp_path / "c.yaml"
    path.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(path, environ={})
    path.write_text("{}\n")
    assert load_config(path, environ={})
    path.write_text("")  # every setting from the environment: an empty file is fine
    assert load_config(path, environ={"STREAMGMM_KAFKA__GROUP_ID": "g"}).kafka.group_id == "g"
    with pytest.raises(ConfigError, match="is empty"):  # another tool's variable sets nothing (helper-47)
        load_config(path, environ={"STREAMGMM_PORT": "8080"})


def test_a_seed_past_32_bits_is_still_a_seed():
    # numpy's generator takes any non-negative integer: a check below 2**32 refused configs that ran.
    assert config_from_dict({"model": {"random_state": 2**40}}, environ={}).model.random_state == 2**40

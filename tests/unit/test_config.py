"""shards.config: defaults, the TOML file, environment overrides, and loud failures."""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
import types
from pathlib import Path

import pytest

from shards import cli
from shards.config import (
    Config,
    ConfigError,
    MQTTConfig,
    TcpListenerConfig,
    env_name,
    example_toml,
    load_config,
    render_docs,
    to_toml,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shoal.toml"
    path.write_text(text)
    return path


# -- defaults -------------------------------------------------------------------------------


def test_no_file_no_env_gives_the_documented_defaults() -> None:
    c = load_config(env={})
    assert c == Config()
    tcp = c.listeners.tcp
    assert (tcp.enabled, tcp.bind, tcp.port, tcp.backlog) == (True, "0.0.0.0", 1883, 1024)
    m = c.mqtt
    assert m.max_packet_size == 1048576
    assert (m.receive_maximum, m.max_inflight, m.max_queued_messages) == (32, 32, 1000)
    assert m.queue_qos0 is True
    assert (m.max_topic_levels, m.topic_alias_maximum) == (128, 64)
    assert (m.max_subscriptions_per_client, m.max_client_id_length) == (10000, 256)
    assert (m.max_keepalive, m.server_keep_alive) == (65535, 0)
    assert m.max_session_expiry_interval == 604800
    assert m.maximum_qos == 2
    assert (m.retain_available, m.max_retained_messages) == (True, 1000000)
    assert m.wildcard_subscription_available and m.subscription_identifier_available
    assert m.shared_subscription_available and m.shared_subscription_strategy == "round_robin"
    assert m.allow_anonymous and m.allow_zero_length_clientid
    assert (m.connect_timeout, m.sys_interval) == (10.0, 10.0)
    assert c.log.level == "INFO"
    assert (c.runtime.loop, c.runtime.ready_file, c.runtime.data_dir) == ("uvloop", "", "var/data")


def test_config_is_frozen_and_slotted() -> None:
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mqtt.max_inflight = 5  # type: ignore[misc]
    assert not hasattr(c.mqtt, "__dict__")


def test_every_key_is_documented() -> None:
    docs = render_docs()
    for section in dataclasses.fields(Config):
        for name, value in _leaves(section.name, getattr(Config(), section.name)):
            field = _field(name)
            assert len(field.metadata["doc"]) > 40, f"{name} needs a real explanation"
            assert f"### `{name}`" in docs


def _leaves(prefix: str, obj: object) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _leaves(f"{prefix}.{f.name}", value)
        else:
            out.append((f"{prefix}.{f.name}", value))
    return out


def _field(dotted: str) -> dataclasses.Field[object]:
    obj: object = Config()
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return next(f for f in dataclasses.fields(obj) if f.name == leaf)  # type: ignore[arg-type]


# -- the file -------------------------------------------------------------------------------


def test_file_values_override_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [listeners.tcp]
        bind = "127.0.0.1"
        port = 0
        [mqtt]
        max_inflight = 10
        queue_qos0 = false
        connect_timeout = 2       # an integer where a float is expected is fine
        shared_subscription_strategy = "random"
        [log]
        level = "debug"
        [runtime]
        loop = "asyncio"
        ready_file = "/tmp/ready.json"
    """.replace("\n        ", "\n"))
    c = load_config(path, env={})
    assert (c.listeners.tcp.bind, c.listeners.tcp.port) == ("127.0.0.1", 0)
    assert c.listeners.tcp.backlog == 1024  # untouched keys keep their defaults
    assert c.mqtt.max_inflight == 10 and c.mqtt.queue_qos0 is False
    assert c.mqtt.connect_timeout == 2.0 and isinstance(c.mqtt.connect_timeout, float)
    assert c.mqtt.shared_subscription_strategy == "random"
    assert c.log.level == "DEBUG"
    assert c.runtime.loop == "asyncio" and c.runtime.ready_file == "/tmp/ready.json"


def test_shoal_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nmax_inflight = 7\n")
    assert load_config(env={"SHOAL_CONFIG": str(path)}).mqtt.max_inflight == 7
    assert load_config(env={"SHOAL_CONFIG": ""}) == Config()  # empty means unset


def test_explicit_path_wins_over_shoal_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nmax_inflight = 7\n")
    assert load_config(path, env={"SHOAL_CONFIG": "/nonexistent.toml"}).mqtt.max_inflight == 7


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nmax_inflihgt = 7\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    msg = str(e.value)
    assert "mqtt.max_inflihgt" in msg and str(path) in msg
    assert "did you mean 'max_inflight'" in msg
    assert e.value.key == "mqtt.max_inflihgt" and e.value.source == str(path)


@pytest.mark.parametrize("text, key", [
    ("[mqt]\nmax_inflight = 7\n", "mqt"),
    ("[listeners.tcp]\nprot = 1\n", "listeners.tcp.prot"),
    ("[listeners.quic]\nprot = 1\n", "listeners.quic.prot"),
    ("workers = 2\n", "workers"),
    # the shard count is numprocs in supervisor.conf's [program:workers], not a key
    ("[broker]\nworkers = 4\n", "broker"),
])
def test_unknown_sections_and_nested_keys_fail(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(write(tmp_path, text), env={})


@pytest.mark.parametrize("text, key, expected", [
    ('[listeners.tcp]\nport = "1883"\n', "listeners.tcp.port", "expected an integer, got string"),
    ("[listeners.tcp]\nenabled = 1\n", "listeners.tcp.enabled", "expected a boolean, got integer"),
    ("[mqtt]\nmax_inflight = true\n", "mqtt.max_inflight", "expected an integer, got boolean"),
    ("[mqtt]\nmax_inflight = 3.0\n", "mqtt.max_inflight", "expected an integer, got float"),
    ("[mqtt]\nconnect_timeout = \"10\"\n", "mqtt.connect_timeout", "expected a number"),
    ("[log]\nlevel = 10\n", "log.level", "expected a string"),
    ("mqtt = 5\n", "mqtt", "expected a table"),
    ("[mqtt]\nmax_inflight = { a = 1 }\n", "mqtt.max_inflight", "expected an integer, got a table"),
    ("[mqtt]\nconnect_timeout = inf\n", "mqtt.connect_timeout", "finite"),
])
def test_wrong_types_fail(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert key in str(e.value) and expected in str(e.value) and str(path) in str(e.value)


def test_invalid_toml_and_missing_file_fail(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", env={})


# -- the environment --------------------------------------------------------------------------


def test_env_overrides_file_including_nested_listener_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[listeners.tcp]\nport = 1999\n[mqtt]\nmax_inflight = 7\n")
    env = {
        "SHOAL_LISTENERS__TCP__PORT": "0",
        "SHOAL_MQTT__MAX_INFLIGHT": "64",
        "SHOAL_MQTT__QUEUE_QOS0": "no",
        "SHOAL_MQTT__SYS_INTERVAL": "2.5",
        "SHOAL_RUNTIME__READY_FILE": "/tmp/r.json",
        "SHOAL_LOG__LEVEL": "warning",
    }
    c = load_config(path, env=env)
    assert c.listeners.tcp.port == 0
    assert c.mqtt.max_inflight == 64
    assert c.mqtt.queue_qos0 is False
    assert c.mqtt.sys_interval == 2.5
    assert c.runtime.ready_file == "/tmp/r.json"
    assert c.log.level == "WARNING"


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True),
    ("false", False), ("0", False), ("No", False),
])
def test_env_booleans(text: str, expected: bool) -> None:
    assert load_config(env={"SHOAL_MQTT__RETAIN_AVAILABLE": text}).mqtt.retain_available is expected


def test_variables_without_double_underscore_are_not_overrides() -> None:
    env = {"SHOAL_TEST_BROKER": "mosquitto", "SHOAL_CONFIG": "", "SHOALX__Y": "1",
           "OTHER__THING": "1"}
    assert load_config(env=env) == Config()


@pytest.mark.parametrize("name", [
    "SHOAL_MQTT__NO_SUCH_KEY",
    "SHOAL_NOSECTION__PORT",
    "SHOAL_LISTENERS__TCP__PROT",
    "SHOAL_LISTENERS__QUIC__PROT",
    "SHOAL_BROKER__WORKERS",
])
def test_unknown_env_key_fails_naming_the_variable(name: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={name: "1"})
    assert "unknown key" in str(e.value) and f"environment variable {name}" in str(e.value)


def test_env_naming_a_table_or_going_below_a_key_fails() -> None:
    with pytest.raises(ConfigError, match="is a table"):
        load_config(env={"SHOAL_LISTENERS__TCP": "1"})
    with pytest.raises(ConfigError, match="is a key, not a table"):
        load_config(env={"SHOAL_MQTT__MAX_INFLIGHT__X": "1"})


@pytest.mark.parametrize("name, value, expected", [
    ("SHOAL_MQTT__MAX_INFLIGHT", "lots", "expected an integer"),
    ("SHOAL_MQTT__MAX_INFLIGHT", "1.5", "expected an integer"),
    ("SHOAL_MQTT__QUEUE_QOS0", "maybe", "expected true/false/1/0/yes/no"),
    ("SHOAL_MQTT__CONNECT_TIMEOUT", "soon", "expected a number"),
    ("SHOAL_MQTT__CONNECT_TIMEOUT", "nan", "finite"),
])
def test_env_wrong_type_fails(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={name: value})
    assert expected in str(e.value) and name in str(e.value)


# -- ranges and choices -----------------------------------------------------------------------


@pytest.mark.parametrize("section, key, value", [
    ("listeners.tcp", "port", -1),
    ("listeners.tcp", "port", 65536),
    ("listeners.tcp", "backlog", 0),
    ("mqtt", "max_packet_size", 0),
    ("mqtt", "max_packet_size", 268435456),
    ("mqtt", "receive_maximum", 0),
    ("mqtt", "receive_maximum", 65536),
    ("mqtt", "max_inflight", 0),
    ("mqtt", "max_queued_messages", -1),
    ("mqtt", "max_topic_levels", 0),
    ("mqtt", "topic_alias_maximum", 65536),
    ("mqtt", "max_client_id_length", 0),
    ("mqtt", "max_keepalive", 0),
    ("mqtt", "max_session_expiry_interval", 4294967296),
    ("mqtt", "maximum_qos", 3),
    ("mqtt", "max_retained_messages", -1),
    ("mqtt", "connect_timeout", 0),
    ("mqtt", "sys_interval", -1),
])
def test_out_of_range_fails_naming_key_and_file(tmp_path: Path, section: str, key: str,
                                                value: int) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    msg = str(e.value)
    assert f"{section}.{key}" in msg and "out of range" in msg and str(path) in msg


@pytest.mark.parametrize("section, key, value", [
    ("listeners.tcp", "port", 0),
    ("mqtt", "max_queued_messages", 0),
    ("mqtt", "topic_alias_maximum", 0),
    ("mqtt", "max_subscriptions_per_client", 0),
    ("mqtt", "max_retained_messages", 0),
    ("mqtt", "maximum_qos", 0),
    ("mqtt", "sys_interval", 0),
    ("mqtt", "max_session_expiry_interval", 4294967295),
    ("mqtt", "max_packet_size", 268435455),
])
def test_documented_edge_values_are_accepted(tmp_path: Path, section: str, key: str,
                                             value: int) -> None:
    c = load_config(write(tmp_path, f"[{section}]\n{key} = {value}\n"), env={})
    obj: object = c
    for part in section.split("."):
        obj = getattr(obj, part)
    assert getattr(obj, key) == value


def test_range_error_from_env_names_the_variable() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={"SHOAL_MQTT__RECEIVE_MAXIMUM": "0"})
    assert "environment variable SHOAL_MQTT__RECEIVE_MAXIMUM" in str(e.value)
    assert "mqtt.receive_maximum" in str(e.value)


@pytest.mark.parametrize("section, key, value", [
    ("mqtt", "shared_subscription_strategy", "least_busy"),
    ("log", "level", "TRACE"),
    ("runtime", "loop", "trio"),
])
def test_bad_choice_fails_listing_the_choices(tmp_path: Path, section: str, key: str,
                                              value: str) -> None:
    with pytest.raises(ConfigError, match=f"{section}.{key}: '{value}' is not one of"):
        load_config(write(tmp_path, f'[{section}]\n{key} = "{value}"\n'), env={})


def test_server_keep_alive_may_not_exceed_max_keepalive(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nmax_keepalive = 60\nserver_keep_alive = 120\n")
    with pytest.raises(ConfigError, match="server_keep_alive.*exceeds.*max_keepalive"):
        load_config(path, env={})
    assert load_config(write(tmp_path, "[mqtt]\nmax_keepalive = 60\nserver_keep_alive = 60\n"),
                       env={}).mqtt.server_keep_alive == 60


def test_all_listeners_disabled_fails() -> None:
    with pytest.raises(ConfigError, match="every listener is disabled"):
        load_config(env={"SHOAL_LISTENERS__TCP__ENABLED": "false",
                         "SHOAL_LISTENERS__QUIC__ENABLED": "false"})


def test_empty_bind_or_data_dir_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="listeners.tcp.bind"):
        load_config(write(tmp_path, '[listeners.tcp]\nbind = ""\n'), env={})
    with pytest.raises(ConfigError, match="runtime.data_dir"):
        load_config(write(tmp_path, '[runtime]\ndata_dir = ""\n'), env={})


def test_dataclasses_validate_when_built_in_code() -> None:
    assert MQTTConfig(max_inflight=5).max_inflight == 5
    assert MQTTConfig(connect_timeout=3).connect_timeout == 3.0
    with pytest.raises(ConfigError, match="mqtt.receive_maximum"):
        MQTTConfig(receive_maximum=0)
    with pytest.raises(ConfigError, match="listeners.tcp.port: expected an integer"):
        TcpListenerConfig(port="1883")  # type: ignore[arg-type]


# -- rendering ------------------------------------------------------------------------------


def test_to_toml_round_trips(tmp_path: Path) -> None:
    c = load_config(env={"SHOAL_MQTT__MAX_INFLIGHT": "9", "SHOAL_RUNTIME__READY_FILE": 'a "q"\\'})
    for comments in (False, True):
        path = write(tmp_path, to_toml(c, comments=comments))
        assert load_config(path, env={}) == c


def test_env_names_match_the_documented_scheme() -> None:
    assert env_name("listeners.tcp.port") == "SHOAL_LISTENERS__TCP__PORT"
    assert env_name("mqtt.max_inflight") == "SHOAL_MQTT__MAX_INFLIGHT"


def test_committed_docs_and_example_are_generated_from_the_code() -> None:
    # Regenerate with: shoal config docs > docs/configuration.md
    #                  shoal config show --defaults --comments > shoal.example.toml
    assert (REPO / "docs" / "configuration.md").read_text() == render_docs()
    assert (REPO / "shoal.example.toml").read_text() == example_toml()
    assert load_config(REPO / "shoal.example.toml", env={}) == Config()
    tomllib.loads(example_toml())


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SHOAL_")]:
        monkeypatch.delenv(name)
    good = tmp_path / "good.toml"
    good.write_text("[mqtt]\nmax_inflight = 5\n")
    assert cli.main(["config", "check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nmax_inflight = 0\n")
    assert cli.main(["config", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "mqtt.max_inflight" in err and str(bad) in err


def test_cli_config_show_applies_env(capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_CONFIG", raising=False)
    monkeypatch.setenv("SHOAL_LISTENERS__TCP__PORT", "1999")
    assert cli.main(["config", "show"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["listeners"]["tcp"]["port"] == 1999


def test_cli_config_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "docs"]) == 0
    assert capsys.readouterr().out == render_docs()


def test_cli_requires_a_command() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_cli_broker_runs_the_worker_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str] | None] = []

    def fake_main(argv: list[str] | None = None) -> int:
        calls.append(argv)
        return 0

    fake = types.ModuleType("shards.worker")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shards.worker", fake)
    assert cli.main(["broker", "--config", "x.toml"]) == 0
    assert cli.main(["broker"]) == 0
    assert calls == [["--config", "x.toml"], []]


# -- TLS, WebSocket, WSS listeners ------------------------------------------------------------


def test_tls_ws_wss_are_off_by_default_and_need_no_files() -> None:
    c = load_config(env={})
    assert not c.listeners.tls.enabled and not c.listeners.ws.enabled and not c.listeners.wss.enabled
    assert (c.listeners.tls.port, c.listeners.ws.port, c.listeners.wss.port) == (8883, 8083, 8084)
    assert c.listeners.ws.path == c.listeners.wss.path == "/mqtt"
    assert c.listeners.tls.min_version == "TLSv1.2"
    assert not c.listeners.tcp.proxy_protocol and not c.listeners.ws.proxy_protocol


@pytest.mark.parametrize("text, key", [
    ("[listeners.tls]\nenabled = true\n", "listeners.tls.certfile"),
    ("[listeners.wss]\nenabled = true\n", "listeners.wss.certfile"),
    ("[listeners.tls]\nenabled = true\ncertfile = 'c.pem'\nverify_client = 'required'\n",
     "listeners.tls.cafile"),
    ("[listeners.wss]\nverify_client = 'optional'\n", "listeners.wss.cafile"),
    ("[listeners.tls]\npeer_cert_as_username = 'cn'\n", "listeners.tls.peer_cert_as_username"),
    ("[listeners.ws]\npath = 'mqtt'\n", "listeners.ws.path"),
    ("[listeners.ws]\nmax_frame_size = 10\n", "listeners.ws.max_frame_size"),
    ("[listeners.tls]\nmin_version = 'TLSv1.1'\n", "listeners.tls.min_version"),
    ("[listeners.tls]\nverify_client = 'maybe'\n", "listeners.tls.verify_client"),
    ("[listeners.tls]\nproxy_protocol = true\n", "listeners.tls.proxy_protocol"),
    ("[listeners.ws]\nbind = ' '\n", "listeners.ws.bind"),
])
def test_tls_and_ws_tables_are_validated(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert info.value.key == key, info.value


def test_a_tls_listener_with_its_files_is_accepted(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, "[listeners.tls]\nenabled = true\ncertfile = 'c.pem'\n"
                          "cafile = 'ca.pem'\nverify_client = 'required'\n"
                          "peer_cert_as_username = 'san'\n[listeners.tcp]\nenabled = false\n"),
                    env={"SHOAL_LISTENERS__WS__ENABLED": "1"})
    assert c.listeners.tls.enabled and c.listeners.ws.enabled and not c.listeners.tcp.enabled
    assert c.listeners.tls.peer_cert_as_username == "san"

"""Config validation: every error names the key and says why; the example config is valid."""

from pathlib import Path

import pytest

from sidecar.cli import main as cli_main
from sidecar.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "sidecar.example.toml"


def test_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    assert cfg.node_id == 1 and cfg.peers[0].id == 2 and cfg.admin.port == 8899
    assert cfg.replication.heartbeat_ms == 200


def test_minimal_config_uses_defaults(tmp_path):
    cfg = parse_config({"node": {"id": 3}}, tmp_path)
    assert cfg.replication.pub.startswith("tcp://127.0.0.1") and cfg.peers == ()
    assert cfg.admin.host == "127.0.0.1" and cfg.admin.token is None


@pytest.mark.parametrize("data,key,why", [
    ({}, "node.id", "required"),
    ({"node": {"id": 0}}, "node.id", "outside"),
    ({"node": {"id": "1"}}, "node.id", "expected int"),
    ({"node": {"id": True}}, "node.id", "boolean"),
    ({"node": {"id": 1, "colour": "blue"}}, "node.colour", "unknown key"),
    ({"node": {"id": 1}, "replicaton": {}}, "replicaton", "unknown section"),
    ({"node": {"id": 1}, "replication": {"pub": "10.0.0.1:7701"}}, "replication.pub",
     "not a ZeroMQ endpoint"),
    ({"node": {"id": 1}, "replication": {"heartbeat_ms": 1}}, "replication.heartbeat_ms",
     "outside"),
    ({"node": {"id": 1}, "peers": [{"id": 1, "pub": "tcp://a:1", "sync": "tcp://a:2"}]},
     "peers[0].id", "used twice"),
    ({"node": {"id": 1}, "peers": [{"id": 2, "pub": "tcp://a:1"}]}, "peers[0].sync",
     "required"),
    ({"node": {"id": 1}, "peers": {"id": 2}}, "peers", "array of tables"),
    ({"node": {"id": 1}, "curve": {"enabled": True}}, "curve.secret_key", "required"),
    ({"node": {"id": 1}, "admin": {"listen": "localhost"}}, "admin.listen", "HOST:PORT"),
    ({"node": {"id": 1}, "log": {"level": "loud"}}, "log.level", "not one of"),
    ({"node": {"id": 1}, "admin": {"token_file": "/nonexistent/token"}}, "admin.token_file",
     "cannot read"),
])
def test_errors_name_the_key(data, key, why, tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(data, tmp_path)
    assert str(e.value).startswith(key) and why in str(e.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nid = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ConfigError):
        load_config(bad)


def test_cli_check_reports_errors_and_success(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nid = 300\n")
    assert cli_main(["run", "--config", str(bad), "--check"]) == 2
    assert "node.id" in capsys.readouterr().err
    assert cli_main(["run", "--config", str(EXAMPLE), "--check"]) == 0
    assert "OK" in capsys.readouterr().out


def test_token_file_is_read(tmp_path):
    tok = tmp_path / "tok"
    tok.write_text("s3cret\n")
    cfg = parse_config({"node": {"id": 1}, "admin": {"token_file": "tok"}}, tmp_path)
    assert cfg.admin.token == "s3cret"


@pytest.mark.parametrize("role,why", [
    ({}, "role.primary: required"),
    ({"primary": True, "wait_s": 0}, "role.wait_s"),
    ({"primary": True, "hooks": {"before": "x"}}, "role.hooks.before: unknown hook stage"),
    ({"primary": True, "hooks": {"on_demote": 5}}, "role.hooks.on_demote"),
    ({"primary": True, "checkpoints": [{"type": "telepathy"}]}, "role.checkpoints[0]"),
    ({"primary": True, "checkpoints": [{"type": "tcp", "host": "h"}]}, "role.checkpoints[0]"),
    ({"primary": True, "vip": "10.0.0.1/24"}, "go together"),
    ({"primary": True, "vip": "not-an-ip", "vip_interface": "eth0"}, "role.vip"),
    ({"primary": True, "colour": 1}, "role.colour: unknown key"),
])
def test_role_errors_name_the_key(role, why, tmp_path):
    data = {"node": {"id": 1}, "role": role,
            "peers": [{"id": 2, "pub": "tcp://127.0.0.1:1", "sync": "tcp://127.0.0.1:2"}]}
    with pytest.raises(ConfigError, match=why.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data, tmp_path)


def test_role_needs_exactly_one_peer(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({"node": {"id": 1}, "role": {"primary": True}}, tmp_path)


def test_example_role_section_parses():
    cfg = load_config(EXAMPLE)
    assert cfg.role.primary is True and cfg.role.wait_s == 3

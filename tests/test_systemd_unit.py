"""The shipped systemd unit: systemd accepts every line, and its commands are what the CLI
runs (the ExecStartPre check passes on the example config, the state directory is the one the
example config names)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from sidecar.cli import main as cli_main
from sidecar.config import load_config

DOCS = Path(__file__).resolve().parents[1] / "docs"
UNIT = DOCS / "systemd" / "usrloc-sidecar.service"
EXAMPLE = DOCS / "sidecar.example.toml"
INSTALLED = "/opt/usrloc-sidecar/bin/sidecar"


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_systemd_accepts_every_line(tmp_path: Path) -> None:
    sidecar = shutil.which("sidecar") or str(Path(__file__).resolve().parents[1]
                                             / ".venv" / "bin" / "sidecar")
    unit = tmp_path / "usrloc-sidecar.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, sidecar))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stderr


def test_unit_commands_are_the_cli_s(capsys) -> None:
    settings = _settings()
    pre, = settings["ExecStartPre"]
    start, = settings["ExecStart"]
    pre_argv, start_argv = shlex.split(pre), shlex.split(start)
    assert pre_argv[0] == start_argv[0] == INSTALLED
    assert pre_argv[1:] == [*start_argv[1:], "--check"]
    config_at = start_argv.index("--config") + 1
    assert start_argv[config_at] == "/etc/usrloc-sidecar/sidecar.toml"
    # the same arguments, pointed at the example config, validate it
    argv = pre_argv[1:]
    argv[config_at - 1] = str(EXAMPLE)
    assert cli_main(argv) == 0
    assert "OK" in capsys.readouterr().out
    state_dir = load_config(EXAMPLE).state_dir
    assert settings["StateDirectory"] == [Path(state_dir).name]
    assert str(state_dir).startswith("/var/lib/")
    assert settings["KillSignal"] == ["SIGTERM"] and settings["Restart"] == ["always"]

"""Admin client: ``call``, CLI param parsing and ``sidecar mi`` against a live admin server."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any

import pytest

from sidecar.admin.client import (
    EXIT_CONNECTION,
    EXIT_OK,
    EXIT_RPC_ERROR,
    EXIT_USAGE,
    AdminConnectionError,
    call,
    main_mi,
    parse_cli_params,
    run_mi,
)
from sidecar.admin.commands import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    CommandRegistry,
    JsonRpcError,
    Param,
)
from sidecar.admin.server import AdminServer

TOKEN = "tok-123"


def make_registry(release: asyncio.Event) -> CommandRegistry:
    registry = CommandRegistry()

    @registry.command(
        "ul_show_contact",
        params=[Param("table_name"), Param("aor"), Param("brief", bool, required=False)],
    )
    def show(table_name: str, aor: str, brief: bool | None) -> dict[str, Any]:
        if aor == "nobody":
            raise JsonRpcError(NOT_FOUND, "AOR not found")
        return {"AOR": aor, "table": table_name, "brief": brief, "note": "café"}

    @registry.command("sum", params=[Param("a", int), Param("b", int)])
    def add(a: int, b: int) -> int:
        return a + b

    @registry.command("stall")
    async def stall() -> str:
        await release.wait()
        return "released"

    return registry


@pytest.fixture
async def release():
    event = asyncio.Event()
    yield event
    event.set()  # let a stalled handler finish so the server stops promptly


@pytest.fixture
async def server(release):
    srv = AdminServer(make_registry(release))
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def locked_server(release):
    srv = AdminServer(make_registry(release), token=TOKEN)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens (the port was just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mi"


# --- call() -------------------------------------------------------------------------------------
async def test_call_returns_result_for_named_and_positional(server):
    named = await call(server.url, "ul_show_contact", {"table_name": "location", "aor": "bob"})
    positional = await call(server.url, "ul_show_contact", ["location", "bob"])
    assert named == positional == {"AOR": "bob", "table": "location", "brief": None, "note": "café"}
    assert "sum" in await call(server.url, "which")


async def test_call_raises_jsonrpc_error_with_code_message_data(server):
    with pytest.raises(JsonRpcError) as info:
        await call(server.url, "ul_show_contact", ["location", "nobody"])
    assert (info.value.code, info.value.message, info.value.data) == (
        NOT_FOUND,
        "AOR not found",
        None,
    )
    with pytest.raises(JsonRpcError) as info:
        await call(server.url, "sum", {"a": "x", "b": 1})
    assert info.value.code == INVALID_PARAMS
    assert "'a'" in info.value.data
    with pytest.raises(JsonRpcError) as info:
        await call(server.url, "nope")
    assert info.value.code == METHOD_NOT_FOUND


async def test_call_with_token(locked_server):
    assert await call(locked_server.url, "sum", [1, 2], token=TOKEN) == 3
    for token in (None, "wrong"):
        with pytest.raises(JsonRpcError) as info:
            await call(locked_server.url, "sum", [1, 2], token=token)
        assert info.value.code == 401


async def test_connection_problems_are_admin_connection_errors(server, dead_url, release):
    with pytest.raises(AdminConnectionError, match=r"127\.0\.0\.1"):
        await call(dead_url, "which")
    with pytest.raises(AdminConnectionError, match="not JSON-RPC"):
        await call(f"{server.base_url}/elsewhere", "which")  # a 404 page is not an answer
    with pytest.raises(AdminConnectionError, match="not JSON-RPC"):
        await call(f"{server.base_url}/health", "which")  # 405 from a GET-only endpoint
    with pytest.raises(AdminConnectionError, match=r"no answer within 0\.2 s"):
        await call(server.url, "stall", timeout=0.2)
    release.set()  # let the abandoned handler finish, so stopping the server need not wait
    with pytest.raises(AdminConnectionError):
        await call("not a url", "which")


# --- parse_cli_params ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([], []),
        (["location", "alice"], ["location", "alice"]),
        (["table_name=location", "aor=alice"], {"table_name": "location", "aor": "alice"}),
        (["brief=1"], {"brief": 1}),
        (["1", "-7", "0"], [1, -7, 0]),
        (["007", "+1", "1_000", "1.5", "0x10"], ["007", "+1", "1_000", "1.5", "0x10"]),
        (["true", "false"], ["true", "false"]),
        (["enable=true"], {"enable": "true"}),
        (["contact=sip:a@b;transport=udp"], {"contact": "sip:a@b;transport=udp"}),
        (["location", "aor=alice"], ["location", "aor=alice"]),  # mixed -> positional as typed
        (["sip:a@b;x=y"], ["sip:a@b;x=y"]),  # "=" but not name=value
        (["empty="], {"empty": ""}),
        (["--json", '{"aor": "alice", "brief": 1}'], {"aor": "alice", "brief": 1}),
        (["--json", '["location", 5]'], ["location", 5]),
        (['--json={"a": [1, 2]}'], {"a": [1, 2]}),
    ],
)
def test_parse_cli_params(words, expected):
    assert parse_cli_params(words) == expected


@pytest.mark.parametrize(
    "words",
    [
        ["a=1", "a=2"],
        ["--json"],
        ["--json", "{bad"],
        ["--json", "5"],
        ["--json", "{}", "extra"],
        ['--json={"a":1}', "extra"],
    ],
)
def test_parse_cli_params_rejects(words):
    with pytest.raises(ValueError):
        parse_cli_params(words)


# --- sidecar mi (run_mi / main_mi) --------------------------------------------------------------
async def test_mi_prints_pretty_json(server, capsys):
    code = await run_mi(["--url", server.url, "ul_show_contact", "table_name=location", "aor=bob"])
    out, err = capsys.readouterr()
    assert (code, err) == (EXIT_OK, "")
    assert json.loads(out) == {"AOR": "bob", "table": "location", "brief": None, "note": "café"}
    assert out.startswith("{\n  ")
    assert "café" in out


async def test_mi_raw_positional_and_server_side_coercion(server, capsys):
    code = await run_mi(["--url", server.url, "--raw", "ul_show_contact", "location", "7", "yes"])
    out, _ = capsys.readouterr()
    assert code == EXIT_OK
    assert out == '{"AOR":"7","table":"location","brief":true,"note":"café"}\n'
    code = await run_mi(["--url", server.url, "--raw", "sum", "--json", '{"a": "40", "b": 2}'])
    assert (code, capsys.readouterr().out) == (EXIT_OK, "42\n")


async def test_mi_errors_go_to_stderr_with_exit_1(server, capsys):
    code = await run_mi(["--url", server.url, "ul_show_contact", "location", "nobody"])
    out, err = capsys.readouterr()
    assert (code, out, err) == (EXIT_RPC_ERROR, "", "error 404: AOR not found\n")
    code = await run_mi(["--url", server.url, "sum", "1"])
    _, err = capsys.readouterr()
    assert code == EXIT_RPC_ERROR
    assert err == "error -32602: Invalid params: Missing required parameter 'b'\n"
    code = await run_mi(["--url", server.url, "nope"])
    assert capsys.readouterr().err == "error -32601: Method not found: nope\n"


async def test_mi_token_flag_file_and_env(locked_server, capsys, tmp_path, monkeypatch):
    url = locked_server.url
    assert await run_mi(["--url", url, "which"]) == EXIT_RPC_ERROR
    assert capsys.readouterr().err.startswith("error 401: Unauthorized")
    assert await run_mi(["--url", url, "--token", TOKEN, "sum", "1", "1"]) == EXIT_OK
    assert capsys.readouterr().out == "2\n"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert await run_mi(["--url", url, "--token-file", str(token_file), "sum", "2", "2"]) == 0
    assert capsys.readouterr().out == "4\n"
    monkeypatch.setenv("SIDECAR_MI_URL", url)
    monkeypatch.setenv("SIDECAR_MI_TOKEN", TOKEN)
    assert await run_mi(["sum", "3", "3"]) == EXIT_OK
    assert capsys.readouterr().out == "6\n"


async def test_mi_usage_errors(capsys, tmp_path):
    assert await run_mi([]) == EXIT_USAGE
    assert "usage: sidecar mi" in capsys.readouterr().err
    assert await run_mi(["--token", "a", "--token-file", "b", "which"]) == EXIT_USAGE
    assert await run_mi(["--token-file", str(tmp_path / "missing"), "which"]) == EXIT_USAGE
    assert await run_mi(["which", "a=1", "a=2"]) == EXIT_USAGE
    assert "given twice" in capsys.readouterr().err
    assert await run_mi(["--help"]) == EXIT_OK
    assert "COMMAND" in capsys.readouterr().out.upper()


def test_main_mi_connection_error_exits_2(dead_url, capsys):
    assert main_mi(["--url", dead_url, "which"]) == EXIT_CONNECTION
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: cannot talk to http://127.0.0.1:")


async def test_main_mi_in_a_separate_process_against_live_server(server):
    """The real entry point, end to end: its own interpreter, event loop and HTTP client."""
    script = "import sys; from sidecar.admin.client import main_mi; sys.exit(main_mi(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        "--url",
        server.url,
        "--raw",
        "sum",
        "a=20",
        "b=22",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert (proc.returncode, out, err) == (0, b"42\n", b"")

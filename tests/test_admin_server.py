"""Admin interface: command registry, JSON-RPC envelope and the aiohttp server over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, generate_latest

from sidecar.admin.commands import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PARSE_ERROR,
    CommandRegistry,
    JsonRpcError,
    Param,
    coerce,
)
from sidecar.admin.server import MAX_BATCH, AdminServer, dispatch

TOKEN = "s3cret-token"


# --- a registry with one command per behaviour under test --------------------------------------
def make_registry() -> tuple[CommandRegistry, list[str]]:
    """Commands used by the tests; ``bumps`` records calls made by notifications."""
    registry = CommandRegistry()
    bumps: list[str] = []

    @registry.command("add", params=[Param("a", int), Param("b", int, required=False, default=0)])
    def add(a: int, b: int) -> int:
        return a + b

    @registry.command(
        "show",
        params=[
            Param("table_name", str),
            Param("aor", str),
            Param("brief", bool, required=False, default=False),
            Param("ratio", float, required=False, default=1.0),
        ],
        help="Show one AOR.\nSecond line.",
    )
    async def show(table_name: str, aor: str, brief: bool, ratio: float) -> dict[str, Any]:
        if aor == "nobody":
            raise JsonRpcError(NOT_FOUND, "AOR not found")
        return {"table": table_name, "aor": aor, "brief": brief, "ratio": ratio}

    @registry.command("bump", params=[Param("tag", str, required=False, default="x")])
    def bump(tag: str) -> str:
        bumps.append(tag)
        return "OK"

    @registry.command("boom")
    def boom() -> None:
        raise RuntimeError("disk on fire")

    @registry.command("unserialisable")
    def unserialisable() -> object:
        return object()

    return registry, bumps


@pytest.fixture
def registry_and_bumps() -> tuple[CommandRegistry, list[str]]:
    return make_registry()


@pytest.fixture
async def server(registry_and_bumps):
    srv = AdminServer(registry_and_bumps[0])
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as sess:
        yield sess


async def post(
    session: aiohttp.ClientSession, url: str, payload: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST JSON (or raw bytes) and return (status, decoded JSON body or None)."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(url, data=data, headers=hdrs) as resp:
        body = await resp.read()
        return resp.status, (json.loads(body) if body else None)


def req(method: str, params: Any = None, id_: Any = 1) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id_}
    if params is not None:
        out["params"] = params
    return out


# --- registry: binding and coercion ------------------------------------------------------------
async def test_positional_and_named_params_bind_the_same(registry_and_bumps):
    registry, _ = registry_and_bumps
    named = await registry.call("show", {"table_name": "location", "aor": "alice", "brief": 1})
    positional = await registry.call("show", ["location", "alice", 1])
    assert named == positional == {"table": "location", "aor": "alice", "brief": True, "ratio": 1.0}


@pytest.mark.parametrize(
    ("ptype", "value", "expected"),
    [
        (int, 5, 5),
        (int, "120", 120),
        (int, " -3 ", -3),
        (int, 7.0, 7),
        (float, "0.5", 0.5),
        (float, 2, 2.0),
        (bool, 1, True),
        (bool, 0, False),
        (bool, "1", True),
        (bool, "0", False),
        (bool, "TRUE", True),
        (bool, "false", False),
        (bool, "yes", True),
        (bool, "No", False),
        (bool, True, True),
        (str, "alice", "alice"),
        (str, 1234, "1234"),
    ],
)
def test_coercion_accepts_mi_style_values(ptype, value, expected):
    result = coerce(Param("p", ptype), value)
    assert result == expected
    assert type(result) is ptype


@pytest.mark.parametrize(
    ("ptype", "value"),
    [
        (int, "brief"),
        (int, "1.5"),
        (int, 1.5),
        (int, True),
        (int, [1]),
        (int, "9" * 100),
        (float, "nan"),
        (float, "inf"),
        (float, False),
        (float, {}),
        (bool, 2),
        (bool, "maybe"),
        (bool, 1.0),
        (str, True),
        (str, ["a"]),
        (str, {"a": 1}),
    ],
)
def test_coercion_rejects_with_param_name_and_reason(ptype, value):
    with pytest.raises(JsonRpcError) as info:
        coerce(Param("brief", ptype), value)
    assert info.value.code == INVALID_PARAMS
    assert info.value.message == "Invalid params"
    assert "'brief'" in info.value.data
    assert "expected" in info.value.data


async def test_param_errors_name_the_problem(registry_and_bumps):
    registry, _ = registry_and_bumps
    cases = [
        (["location"], "Missing required parameter 'aor'"),
        ({"table_name": "location"}, "Missing required parameter 'aor'"),
        (["location", "a", 1, 1.0, "extra"], "Too many parameters: 'show' takes at most 4, got 5"),
        ({"table_name": "l", "aor": "a", "colour": "red"}, "Unknown parameter 'colour'"),
        ({"table_name": "l", "aor": "a", "brief": "brief"}, "Bad type for parameter 'brief'"),
    ]
    for params, expected in cases:
        with pytest.raises(JsonRpcError) as info:
            await registry.call("show", params)
        assert info.value.code == INVALID_PARAMS
        assert expected in info.value.data


async def test_optional_params_take_defaults_and_null_means_absent(registry_and_bumps):
    registry, _ = registry_and_bumps
    assert await registry.call("add", [2]) == 2
    assert await registry.call("add", {"a": 2, "b": None}) == 2
    with pytest.raises(JsonRpcError) as info:
        await registry.call("add", {"a": None})
    assert "Missing required parameter 'a'" in info.value.data


async def test_unknown_method_and_builtins(registry_and_bumps):
    registry, _ = registry_and_bumps
    with pytest.raises(JsonRpcError) as info:
        await registry.call("ul_nope", None)
    assert (info.value.code, info.value.data) == (METHOD_NOT_FOUND, "ul_nope")
    names = await registry.call("which", None)
    assert names[:2] == ["which", "help"]
    assert set(names) == {"which", "help", "add", "show", "bump", "boom", "unserialisable"}
    described = await registry.call("help", {"command": "show"})
    assert described["help"].startswith("Show one AOR.")
    assert [p["name"] for p in described["params"]] == ["table_name", "aor", "brief", "ratio"]
    assert described["params"][2] == {
        "name": "brief",
        "type": "boolean",
        "required": False,
        "default": False,
    }
    overview = await registry.call("help", [])
    assert overview["commands"]["show"] == "Show one AOR."
    with pytest.raises(JsonRpcError) as info:
        await registry.call("help", ["nope"])
    assert info.value.code == NOT_FOUND


async def test_handler_exception_becomes_internal_error_and_is_logged(registry_and_bumps, caplog):
    registry, _ = registry_and_bumps
    with caplog.at_level(logging.ERROR), pytest.raises(JsonRpcError) as info:
        await registry.call("boom", None)
    assert info.value.code == INTERNAL_ERROR
    assert info.value.data == "RuntimeError: disk on fire"
    assert any(r.exc_info for r in caplog.records), "traceback must be logged"


def test_register_rejects_duplicates_and_bad_declarations():
    registry = CommandRegistry()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("which", lambda: None)
    with pytest.raises(ValueError, match="duplicate parameter"):
        registry.register("x", lambda a: a, [Param("a"), Param("a")])
    with pytest.raises(ValueError, match="type must be"):
        Param("a", list)


# --- HTTP: JSON-RPC envelope -------------------------------------------------------------------
async def test_single_call_positional_and_named(server, session):
    status, body = await post(session, server.url, req("add", ["40", 2], id_="abc"))
    assert status == 200
    assert body == {"jsonrpc": "2.0", "result": 42, "id": "abc"}
    status, body = await post(session, server.url, req("add", {"a": 1, "b": "1"}, id_=7))
    assert body == {"jsonrpc": "2.0", "result": 2, "id": 7}


async def test_error_responses_carry_code_message_data_and_id(server, session):
    _, body = await post(session, server.url, req("nope", id_=3))
    assert body == {
        "jsonrpc": "2.0",
        "error": {"code": METHOD_NOT_FOUND, "message": "Method not found", "data": "nope"},
        "id": 3,
    }
    _, body = await post(session, server.url, req("show", {"table_name": "l", "aor": "nobody"}))
    assert body["error"] == {"code": 404, "message": "AOR not found"}
    _, body = await post(session, server.url, req("show", ["l"]))
    assert body["error"]["code"] == INVALID_PARAMS
    assert body["error"]["data"] == "Missing required parameter 'aor'"
    _, body = await post(session, server.url, req("add", [1, 2, 3]))
    assert "Too many parameters" in body["error"]["data"]


async def test_batch_mixes_results_errors_and_notifications(server, session, registry_and_bumps):
    _, bumps = registry_and_bumps
    batch = [
        req("add", [1, 2], id_=1),
        {"jsonrpc": "2.0", "method": "bump", "params": ["n1"]},  # notification: no entry
        req("nope", id_=2),
        {"jsonrpc": "2.0", "method": 5, "id": 3},  # invalid envelope, id still echoed
        7,  # not an object: error with id null
    ]
    status, body = await post(session, server.url, batch)
    assert status == 200
    assert body == [
        {"jsonrpc": "2.0", "result": 3, "id": 1},
        {
            "jsonrpc": "2.0",
            "error": {"code": METHOD_NOT_FOUND, "message": "Method not found", "data": "nope"},
            "id": 2,
        },
        {
            "jsonrpc": "2.0",
            "error": {
                "code": INVALID_REQUEST,
                "message": "Invalid Request",
                "data": "method must be a string",
            },
            "id": 3,
        },
        {
            "jsonrpc": "2.0",
            "error": {
                "code": INVALID_REQUEST,
                "message": "Invalid Request",
                "data": "request must be a JSON object",
            },
            "id": None,
        },
    ]
    assert bumps == ["n1"]


async def test_notifications_only_get_204_but_still_run(server, session, registry_and_bumps):
    _, bumps = registry_and_bumps
    status, body = await post(session, server.url, {"jsonrpc": "2.0", "method": "bump"})
    assert (status, body) == (204, None)
    batch = [
        {"jsonrpc": "2.0", "method": "bump", "params": {"tag": "a"}},
        {"jsonrpc": "2.0", "method": "nope"},  # failing notification: still silent
        {"jsonrpc": "2.0", "method": "bump", "params": ["b"]},
    ]
    status, body = await post(session, server.url, batch)
    assert (status, body) == (204, None)
    assert bumps == ["x", "a", "b"]


async def test_id_null_is_a_request_not_a_notification(server, session):
    status, body = await post(session, server.url, req("add", [1], id_=None))
    assert status == 200
    assert body == {"jsonrpc": "2.0", "result": 1, "id": None}


@pytest.mark.parametrize(
    "raw", [b"{bad json", b"", b"\xff\xfe\x00garbage", b"[1,", b"NaN", b"1e999"]
)
async def test_parse_error_has_null_id(server, session, raw):
    status, body = await post(session, server.url, raw)
    assert status == 200
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert body["error"]["code"] == PARSE_ERROR
    assert body["error"]["message"] == "Parse error"


@pytest.mark.parametrize(
    "payload",
    [
        1,
        "text",
        None,
        [],
        {"method": "add", "id": 1},  # no jsonrpc member
        {"jsonrpc": "1.0", "method": "add", "id": 1},
        {"jsonrpc": 2.0, "method": "add", "id": 1},
        {"jsonrpc": "2.0", "id": 1},  # no method
        {"jsonrpc": "2.0", "method": ["add"], "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": "1,2", "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": 5, "id": 1},
        {"jsonrpc": "2.0", "method": "add", "id": True},
        {"jsonrpc": "2.0", "method": "add", "id": {"x": 1}},
    ],
)
async def test_invalid_request(server, session, payload):
    status, body = await post(session, server.url, payload)
    assert status == 200
    assert body["error"]["code"] == INVALID_REQUEST
    expected_id = 1 if isinstance(payload, dict) and payload.get("id") == 1 else None
    if isinstance(payload, dict) and payload.get("id") is True:
        expected_id = None
    assert body["id"] == expected_id


async def test_params_null_is_treated_as_omitted(server, session):
    _, body = await post(
        session, server.url, {"jsonrpc": "2.0", "method": "which", "params": None, "id": 1}
    )
    assert "which" in body["result"]


async def test_batch_size_is_bounded(server, session):
    status, body = await post(
        session, server.url, [req("which", id_=i) for i in range(MAX_BATCH + 1)]
    )
    assert status == 200
    assert body["error"]["code"] == INVALID_REQUEST
    assert "batch larger" in body["error"]["data"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream"]
)
async def test_wrong_content_type_is_accepted_when_body_is_json(server, session, content_type):
    async with session.post(
        server.url, data=json.dumps(req("add", [1, 1])), headers={"Content-Type": content_type}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["result"] == 2


async def test_handler_exception_is_internal_error_and_server_survives(server, session):
    _, body = await post(session, server.url, req("boom"))
    assert body["error"] == {
        "code": INTERNAL_ERROR,
        "message": "Internal error",
        "data": "RuntimeError: disk on fire",
    }
    _, body = await post(session, server.url, req("unserialisable"))
    assert body["error"]["code"] == INTERNAL_ERROR
    assert body["error"]["data"] == "result is not JSON-serialisable"
    _, body = await post(session, server.url, req("add", [20, 22]))
    assert body["result"] == 42


async def test_get_on_mi_is_not_allowed(server, session):
    async with session.get(server.url) as resp:
        assert resp.status == 405


# --- HTTP: size limit --------------------------------------------------------------------------
async def test_body_over_max_body_is_413_with_jsonrpc_error(registry_and_bumps, session):
    srv = AdminServer(registry_and_bumps[0], max_body=256)
    await srv.start()
    try:
        big = json.dumps(req("show", {"table_name": "l", "aor": "a" * 400})).encode()
        status, body = await post(session, srv.url, big)
        assert status == 413
        assert body["error"]["code"] == 413
        assert body["id"] is None

        async def chunks():  # chunked upload: no Content-Length, caught while reading
            for _ in range(10):
                yield b" " * 100

        async with session.post(srv.url, data=chunks()) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == 413

        status, body = await post(session, srv.url, req("add", [1, 1]))
        assert (status, body["result"]) == (200, 2)
        assert srv.stats()["bad_requests"] == 2
    finally:
        await srv.stop()


# --- HTTP: bearer token ------------------------------------------------------------------------
async def test_bearer_token(registry_and_bumps, session):
    reg = CollectorRegistry()
    Counter("sc_things", "things", registry=reg).inc()
    srv = AdminServer(registry_and_bumps[0], token=TOKEN, metrics=lambda: generate_latest(reg))
    await srv.start()
    try:
        for headers in [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": "Bearer"},
        ]:
            status, body = await post(session, srv.url, req("which"), headers)
            assert status == 401, headers
            assert body["error"]["code"] == 401
            assert body["id"] is None
        async with session.post(srv.url, data=b"{}") as resp:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        good = {"Authorization": f"Bearer {TOKEN}"}
        status, body = await post(session, srv.url, req("add", [1, 2]), good)
        assert (status, body["result"]) == (200, 3)
        status, body = await post(
            session, srv.url, req("add", [1]), {"Authorization": f"bearer {TOKEN}"}
        )
        assert status == 200
        async with session.get(f"{srv.base_url}/metrics") as resp:
            assert resp.status == 401
        async with session.get(f"{srv.base_url}/metrics", headers=good) as resp:
            assert resp.status == 200
        async with session.get(f"{srv.base_url}/health") as resp:
            assert resp.status == 200  # health never needs the token
        stats = srv.stats()
        assert stats["unauthorized"] == 7
        assert stats["errors"][401] == 7
    finally:
        await srv.stop()


def test_empty_token_is_refused():
    with pytest.raises(ValueError):
        AdminServer(CommandRegistry(), token="")


# --- HTTP: /health and /metrics ----------------------------------------------------------------
async def test_health_ok_failing_and_broken(registry_and_bumps, session):
    state: dict[str, Any] = {"ok": True}

    def health() -> tuple[bool, dict[str, Any]]:
        if state.get("raise"):
            raise OSError("probe exploded")
        return state["ok"], {"role": "active" if state["ok"] else "passive", "peers": 1}

    srv = AdminServer(registry_and_bumps[0], health=health)
    await srv.start()
    try:
        async with session.get(f"{srv.base_url}/health") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok", "role": "active", "peers": 1}
        state["ok"] = False
        async with session.get(f"{srv.base_url}/health") as resp:
            assert resp.status == 503
            assert await resp.json() == {"status": "fail", "role": "passive", "peers": 1}
        state["raise"] = True
        async with session.get(f"{srv.base_url}/health") as resp:
            assert resp.status == 503
            doc = await resp.json()
            assert doc["status"] == "fail"
            assert "probe exploded" in doc["error"]
    finally:
        await srv.stop()


async def test_health_without_callable_is_ok_and_metrics_404(server, session):
    async with session.get(f"{server.base_url}/health") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    async with session.get(f"{server.base_url}/metrics") as resp:
        assert resp.status == 404


async def test_metrics_are_prometheus_exposition(registry_and_bumps, session):
    reg = CollectorRegistry()
    Counter("sc_deltas_sent", "deltas sent", registry=reg).inc(5)
    srv = AdminServer(registry_and_bumps[0], metrics=lambda: generate_latest(reg))
    await srv.start()
    try:
        async with session.get(f"{srv.base_url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
        assert "sc_deltas_sent_total 5.0" in text
    finally:
        await srv.stop()


# --- robustness --------------------------------------------------------------------------------
JUNK = [  # (bytes, does the server answer before we hang up?)
    (b"\x00\x01\x02\xff\xfe\xfd" * 50 + b"\r\n\r\n", True),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), True),  # TLS hello
    (b"POST /mi HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n", True),
    (b"POST /mi HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", True),
    (b"GET /" + b"A" * 20000 + b" HTTP/1.1\r\n\r\n", True),
    (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP x\r\n\r\n", True),
    (b'POST /mi HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{"jsonrpc"', False),
    (b"\r\n\r\n\r\n", False),  # blank lines before a request line are legal: it waits
    (b"", False),  # connect and hang up
]


async def test_junk_bytes_on_the_socket_do_not_hurt(server, session, caplog):
    with caplog.at_level(logging.INFO):
        for junk, answered in JUNK:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(junk)
            await writer.drain()
            if answered:
                reply = await asyncio.wait_for(reader.read(65536), timeout=5)
                assert re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply[:80]
            writer.close()
            await writer.wait_closed()
            status, body = await post(session, server.url, req("add", [2, 3]))
            assert (status, body["result"]) == (200, 5)
    assert server.stats()["bad_http"] == sum(answered for _, answered in JUNK)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "junk is not an error"


async def test_stats_count_requests_calls_and_errors(server, session):
    await post(session, server.url, req("add", [1]))
    await post(session, server.url, req("nope"))
    await post(session, server.url, b"{")
    await post(session, server.url, [req("add", [1]), {"jsonrpc": "2.0"}])
    assert server.stats() == {
        "requests": 4,
        "calls": 3,
        "errors": {METHOD_NOT_FOUND: 1, PARSE_ERROR: 1, INVALID_REQUEST: 1},
        "bad_requests": 2,
        "unauthorized": 0,
        "bad_http": 0,
    }


# --- fuzz --------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
methods = st.sampled_from(["add", "show", "bump", "boom", "which", "help", "unserialisable"])
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "2.0", "1.0", 2]) | json_values,
        "method": methods | json_values,
        "params": st.lists(json_values, max_size=5)
        | st.dictionaries(
            st.sampled_from(["a", "b", "aor", "table_name", "brief", "ratio", "tag", "zz"]),
            json_values,
            max_size=5,
        )
        | json_values,
        "id": st.integers() | st.text(max_size=5) | st.none() | json_values,
    },
)
bodies = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | envelopes.map(lambda v: json.dumps(v).encode())
    | st.lists(envelopes | json_values, max_size=5).map(lambda v: json.dumps(v).encode())
)


def assert_valid_response(obj: Any) -> None:
    assert isinstance(obj, dict)
    assert obj["jsonrpc"] == "2.0"
    assert "id" in obj
    assert ("result" in obj) != ("error" in obj)
    if "error" in obj:
        assert isinstance(obj["error"]["code"], int)
        assert isinstance(obj["error"]["message"], str)


def check_http_reply(status: int, raw: bytes) -> None:
    assert status < 500, (status, raw[:200])
    if status == 204:
        assert raw == b""
        return
    doc = json.loads(raw)
    if isinstance(doc, list):
        assert doc, "a batch reply is never an empty array"
        for item in doc:
            assert_valid_response(item)
    else:
        assert_valid_response(doc)
    if status != 200:
        assert 400 <= status < 500


def test_fuzz_http_request_bodies():
    """Arbitrary bytes and JSON at a live server: always JSON-RPC or a 4xx, never a 5xx."""
    loop = asyncio.new_event_loop()
    registry, _ = make_registry()
    srv = AdminServer(registry, max_body=2048)
    session: aiohttp.ClientSession | None = None

    async def setup() -> aiohttp.ClientSession:
        await srv.start()
        return aiohttp.ClientSession()

    async def send(body: bytes) -> tuple[int, bytes]:
        assert session is not None
        async with session.post(srv.url, data=body) as resp:
            return resp.status, await resp.read()

    logging.getLogger("sidecar.admin.commands").disabled = True  # "boom" tracebacks are noise
    try:
        session = loop.run_until_complete(setup())

        @settings(
            max_examples=400,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(bodies)
        def run(body: bytes) -> None:
            check_http_reply(*loop.run_until_complete(send(body)))

        run()
        status, raw = loop.run_until_complete(send(json.dumps(req("add", [1, 1])).encode()))
        assert (status, json.loads(raw)["result"]) == (200, 2)
    finally:
        logging.getLogger("sidecar.admin.commands").disabled = False
        if session is not None:
            loop.run_until_complete(session.close())
        loop.run_until_complete(srv.stop())
        loop.close()


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(bodies)
def test_fuzz_dispatch_sans_io(body):
    """The envelope layer alone, without HTTP: never raises, output is always JSON-RPC."""
    registry, _ = make_registry()
    logging.getLogger("sidecar.admin.commands").disabled = True
    try:
        result = asyncio.run(dispatch(registry, body))
    finally:
        logging.getLogger("sidecar.admin.commands").disabled = False
    check_http_reply(200 if result.body is not None else 204, result.body or b"")

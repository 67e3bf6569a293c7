"""Admin HTTP endpoint: JSON-RPC 2.0 on ``POST /mi``, Prometheus ``GET /metrics``, ``GET /health``.

The envelope is the one OpenSIPS ``mi_http`` and Kamailio ``jsonrpcs`` speak, so the same
scripts and habits work against the proxy and against its sidecar. The file has two layers:

* :func:`dispatch` turns a request body (bytes) into a response body (bytes, or ``None`` when
  every call was a notification). It knows JSON-RPC, not HTTP, and never raises: invalid JSON is
  ``-32700``, a malformed envelope ``-32600``, anything a command does wrong is an error object.
* :class:`AdminServer` is the thin aiohttp adapter: routing, bearer token, body-size limit,
  counters.

HTTP conventions (documented because clients differ here):

* every JSON-RPC reply, including errors, is HTTP 200 ``application/json``; HTTP 204 when the
  request held only notifications; HTTP 401 (bad/missing token) and 413 (body over ``max_body``)
  also carry a JSON-RPC error body with ``id: null``;
* the request ``Content-Type`` is ignored: any body that parses as JSON is accepted. OpenSIPS
  ``mi_http`` hangs on ``application/x-www-form-urlencoded`` (curl ``-d``'s default) and closes
  on ``text/plain``; we would rather answer;
* ``"params": null`` is treated as omitted (some clients send it);
* a batch holds at most :data:`MAX_BATCH` calls, run one after another in order, so a batch like
  ``[sc_demote, sc_status]`` observes its own effects;
* ``Content-Encoding`` is not decoded (no decompression bombs): a compressed body is a parse error;
* bytes that are not HTTP at all are answered 400 by aiohttp's parser and only counted
  (``stats()["bad_http"]``) and logged at debug level, so junk cannot flood the log.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from sidecar.admin.commands import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    PARSE_ERROR,
    PAYLOAD_TOO_LARGE,
    UNAUTHORIZED,
    CommandRegistry,
    JsonRpcError,
)

log = logging.getLogger(__name__)

MAX_BATCH = 1000
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
_BAD_REQUEST_CODES = frozenset({PARSE_ERROR, INVALID_REQUEST, PAYLOAD_TOO_LARGE})


# --- JSON-RPC envelope (no HTTP here) ------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def decode_json(body: bytes) -> Any:
    """Strict JSON (no NaN/Infinity, no overflowing numbers); raises ``-32700`` on any problem."""
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise JsonRpcError(PARSE_ERROR, None, str(exc)[:200]) from None


def encode_json(obj: Any) -> bytes:
    """Compact, ASCII-only (so lone surrogates from the request survive), no NaN."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int)


def error_response(error: JsonRpcError, request_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error.to_dict(), "id": request_id}


@dataclass
class DispatchResult:
    """What one HTTP body produced: the reply bytes and what to count."""

    body: bytes | None = None  # None: nothing to answer (notifications only)
    calls: int = 0  # envelopes that reached a command (notifications included)
    error_codes: list[int] = field(default_factory=list)


async def _dispatch_one(registry: CommandRegistry, entry: Any, out: DispatchResult) -> bytes | None:
    """Validate one envelope, run it, encode its response (None for a notification)."""
    request_id: Any = None
    try:
        if not isinstance(entry, dict):
            raise JsonRpcError(INVALID_REQUEST, None, "request must be a JSON object")
        is_notification = "id" not in entry
        if not is_notification:
            if not _valid_id(entry["id"]):
                raise JsonRpcError(INVALID_REQUEST, None, "id must be a string, number or null")
            request_id = entry["id"]
        if entry.get("jsonrpc") != "2.0":
            raise JsonRpcError(INVALID_REQUEST, None, 'jsonrpc must be exactly "2.0"')
        method = entry.get("method")
        if not isinstance(method, str):
            raise JsonRpcError(INVALID_REQUEST, None, "method must be a string")
        params = entry.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise JsonRpcError(INVALID_REQUEST, None, "params must be an object or an array")
    except JsonRpcError as exc:  # malformed envelopes are always answered, even without id
        out.error_codes.append(exc.code)
        return encode_json(error_response(exc, request_id))

    out.calls += 1
    try:
        result = await registry.call(method, params)
    except JsonRpcError as exc:
        out.error_codes.append(exc.code)
        return None if is_notification else _encode_error(exc, request_id, method)
    if is_notification:
        return None
    try:
        return encode_json({"jsonrpc": "2.0", "result": result, "id": request_id})
    except (TypeError, ValueError, RecursionError) as exc:
        log.error("MI command %r returned a value JSON cannot carry: %s", method, exc)
        out.error_codes.append(INTERNAL_ERROR)
        failure = JsonRpcError(INTERNAL_ERROR, None, "result is not JSON-serialisable")
        return encode_json(error_response(failure, request_id))


def _encode_error(exc: JsonRpcError, request_id: Any, method: str) -> bytes:
    try:
        return encode_json(error_response(exc, request_id))
    except (TypeError, ValueError, RecursionError):  # a handler put junk in error.data
        log.error("MI command %r raised an error whose data JSON cannot carry", method)
        return encode_json(error_response(JsonRpcError(exc.code, exc.message), request_id))


async def dispatch(registry: CommandRegistry, body: bytes) -> DispatchResult:
    """Handle one JSON-RPC request body (single or batch); never raises for bad input."""
    out = DispatchResult()
    try:
        doc = decode_json(body)
    except JsonRpcError as exc:
        out.error_codes.append(exc.code)
        out.body = encode_json(error_response(exc))
        return out
    if not isinstance(doc, list):
        out.body = await _dispatch_one(registry, doc, out)
        return out
    if not doc or len(doc) > MAX_BATCH:
        why = "empty batch" if not doc else f"batch larger than {MAX_BATCH} calls"
        exc = JsonRpcError(INVALID_REQUEST, None, why)
        out.error_codes.append(exc.code)
        out.body = encode_json(error_response(exc))
        return out
    parts: list[bytes] = []
    for entry in doc:
        part = await _dispatch_one(registry, entry, out)
        if part is not None:
            parts.append(part)
    out.body = b"[" + b",".join(parts) + b"]" if parts else None
    return out


# --- HTTP adapter --------------------------------------------------------------------------------
class _HttpLayerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Where aiohttp logs; turns its per-request ERROR+traceback for malformed HTTP into a count.

    Junk on the admin port (a port scan, TLS to a plain port, a SIP packet) is the client's
    problem, not ours; a traceback per junk connection would let anyone flood the log.
    """

    def __init__(self, on_bad_http: Callable[[], None]) -> None:
        super().__init__(logging.getLogger("sidecar.admin.http"), {})
        self._on_bad_http = on_bad_http

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self._on_bad_http()
            self.logger.debug("malformed HTTP on the admin port: %s", exc)
            return
        super().log(level, msg, *args, **kwargs)


HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
MetricsRender = Callable[[], bytes]


class AdminServer:
    """aiohttp server for ``/mi``, ``/metrics`` and ``/health``; binds to localhost by default.

    With ``token`` set, ``/mi`` and ``/metrics`` need ``Authorization: Bearer <token>``;
    ``/health`` stays open so load balancers and systemd watchdogs need no secret.
    """

    def __init__(
        self,
        registry: CommandRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        metrics: MetricsRender | None = None,
        health: HealthCheck | None = None,
        max_body: int = 1 << 20,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        if max_body < 1:
            raise ValueError("max_body must be positive")
        self.registry = registry
        self.host = host
        self._requested_port = port
        self._token = token.encode("utf-8", "surrogatepass") if token is not None else None
        self._metrics = metrics
        self._health = health
        self._max_body = max_body
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        # counters (plain ints: cheap, and read by stats() for sc_status / metrics)
        self.requests = 0  # HTTP requests to /mi
        self.calls = 0  # JSON-RPC envelopes that reached a command
        self.errors: Counter[int] = Counter()  # JSON-RPC error code -> count
        self.bad_requests = 0  # parse errors, invalid envelopes, oversized bodies
        self.unauthorized = 0  # 401s on any endpoint
        self.bad_http = 0  # connections rejected by the HTTP parser (junk, non-HTTP)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("AdminServer already started")
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post("/mi", self._handle_mi)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/health", self._handle_health)
        runner = web.AppRunner(
            app,
            access_log=None,
            auto_decompress=False,
            shutdown_timeout=1.0,
            logger=_HttpLayerLog(self._count_bad_http),
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info("admin interface listening on %s", self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("AdminServer not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The JSON-RPC endpoint, ready for :func:`sidecar.admin.client.call`."""
        return f"{self.base_url}/mi"

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "calls": self.calls,
            "errors": dict(self.errors),
            "bad_requests": self.bad_requests,
            "unauthorized": self.unauthorized,
            "bad_http": self.bad_http,
        }

    def _count_bad_http(self) -> None:
        self.bad_http += 1

    # --- handlers ------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogatepass"), self._token)

    def _error(self, status: int, error: JsonRpcError, **headers: str) -> web.Response:
        self.errors[error.code] += 1
        if error.code in _BAD_REQUEST_CODES:
            self.bad_requests += 1
        return web.Response(
            status=status,
            body=encode_json(error_response(error)),
            content_type=JSON_CONTENT_TYPE,
            headers=headers,
        )

    def _unauthorized(self) -> web.Response:
        self.unauthorized += 1
        error = JsonRpcError(UNAUTHORIZED, None, "missing or wrong bearer token")
        return self._error(401, error, **{"WWW-Authenticate": 'Bearer realm="sidecar"'})

    def _too_large(self) -> web.Response:
        error = JsonRpcError(PAYLOAD_TOO_LARGE, None, f"body larger than {self._max_body} bytes")
        return self._error(413, error)

    async def _handle_mi(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if not self._authorized(request):
            return self._unauthorized()
        if request.content_length is not None and request.content_length > self._max_body:
            return self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except Exception as exc:  # truncated or badly chunked body: the client's fault
            log.debug("unreadable admin request body: %r", exc)
            return self._error(400, JsonRpcError(PARSE_ERROR, None, "unreadable request body"))
        result = await dispatch(self.registry, body)
        self.calls += result.calls
        self.errors.update(result.error_codes)
        self.bad_requests += sum(1 for c in result.error_codes if c in _BAD_REQUEST_CODES)
        if result.body is None:
            return web.Response(status=204)
        return web.Response(body=result.body, content_type=JSON_CONTENT_TYPE)

    async def _handle_metrics(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized()
        if self._metrics is None:
            return web.Response(status=404, text="no metrics configured\n")
        try:
            data = self._metrics()
        except Exception:
            log.exception("rendering /metrics failed")
            return web.Response(status=500, text="metrics unavailable\n")
        if isinstance(data, str):
            data = data.encode()
        return web.Response(body=data, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

    async def _handle_health(self, request: web.Request) -> web.StreamResponse:
        healthy, details = True, {}
        if self._health is not None:
            try:
                healthy, details = self._health()
            except Exception as exc:
                log.exception("health check failed")
                healthy, details = False, {"error": f"{type(exc).__name__}: {exc}"[:200]}
        doc = {"status": "ok" if healthy else "fail"}
        doc.update((str(k), v) for k, v in details.items() if k != "status")
        try:
            body = json.dumps(doc, default=str, allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError):
            log.error("health details are not JSON-serialisable: %r", details)
            body = encode_json({"status": doc["status"], "error": "details not serialisable"})
        return web.Response(
            status=200 if healthy else 503, body=body, content_type=JSON_CONTENT_TYPE
        )

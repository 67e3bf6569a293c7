"""MI command registry: declared parameters, OpenSIPS-MI-style coercion, safe invocation.

The registry knows nothing about HTTP or the JSON-RPC envelope: it maps a method name and its
``params`` (a JSON object, a JSON array, or nothing) onto a Python handler. Keeping it separate
lets the same commands be driven by the HTTP server, by tests, or by any other transport.

Why coercion: operators type commands on a shell (``sidecar mi ul_dump 1``) and scripts written
for OpenSIPS send integers as numeric strings (``"expires": "120"``). OpenSIPS MI accepts both,
so we do too, but we refuse anything ambiguous with ``-32602 Invalid params`` and a ``data``
string naming the parameter and the reason, exactly like OpenSIPS'
``{"code": -32602, "message": "Invalid params", "data": "Bad type for parameter 'brief'"}``.

A handler may be a plain function or a coroutine function; any exception it raises that is not a
:class:`JsonRpcError` becomes ``-32603 Internal error`` (logged with its traceback) so a buggy
command can never take the admin interface down.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# --- JSON-RPC 2.0 standard error codes -----------------------------------------------------------
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# --- application codes, HTTP-like as in OpenSIPS MI ({"code":404,"message":"AOR not found"})
UNAUTHORIZED = 401
NOT_FOUND = 404
PAYLOAD_TOO_LARGE = 413
COMMAND_FAILED = 500

STANDARD_MESSAGES: dict[int, str] = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid Request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
    UNAUTHORIZED: "Unauthorized",
    NOT_FOUND: "Not found",
    PAYLOAD_TOO_LARGE: "Request too large",
    COMMAND_FAILED: "Command failed",
}

_MAX_ERROR_DETAIL = 200  # keep exception text in error replies short


class JsonRpcError(Exception):
    """A JSON-RPC error object; raise it from a handler to reply with that exact error.

    ``message`` defaults to the standard text for ``code``; ``data`` carries the detail (which
    parameter, which AOR ...) so scripts can match on the stable ``code`` + ``message`` pair.
    """

    def __init__(self, code: int, message: str | None = None, data: Any = None) -> None:
        self.code = int(code)
        self.message = message if message is not None else STANDARD_MESSAGES.get(code, "Error")
        self.data = data
        super().__init__(self.code, self.message, data)

    def __str__(self) -> str:
        if self.data is None:
            return f"{self.code}: {self.message}"
        return f"{self.code}: {self.message}: {self.data}"

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` member of a JSON-RPC response."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    @classmethod
    def from_dict(cls, err: Any) -> JsonRpcError:
        """Rebuild from a received ``error`` member; tolerates peers that bend the spec."""
        if not isinstance(err, dict):
            return cls(INTERNAL_ERROR, "malformed error object", err)
        code = err.get("code")
        if isinstance(code, bool) or not isinstance(code, int):
            code = INTERNAL_ERROR
        message = err.get("message")
        return cls(code, str(message) if message is not None else None, err.get("data"))


def invalid_params(detail: str) -> JsonRpcError:
    """``-32602 Invalid params`` with the human-readable reason in ``data`` (OpenSIPS style)."""
    return JsonRpcError(INVALID_PARAMS, None, detail)


# --- parameters and coercion ---------------------------------------------------------------------
_TYPE_NAMES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_TRUE_WORDS = frozenset({"1", "true", "yes"})
_FALSE_WORDS = frozenset({"0", "false", "no"})
_MAX_INT_TEXT = 64  # digits; nothing an admin command needs is longer


@dataclass(frozen=True)
class Param:
    """One declared command parameter. ``default`` is used only when ``required`` is False."""

    name: str
    type: type = str
    required: bool = True
    default: Any = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise ValueError(f"param {self.name!r}: type must be str, int, float or bool")
        if not self.name or not isinstance(self.name, str):
            raise ValueError("param name must be a non-empty string")

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description used by the ``help`` command."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": _TYPE_NAMES[self.type],
            "required": self.required,
        }
        if not self.required:
            out["default"] = self.default
        if self.help:
            out["help"] = self.help
        return out


def _bad_type(param: Param, value: Any, why: str) -> JsonRpcError:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return invalid_params(f"Bad type for parameter '{param.name}': {why}, got {shown}")


def coerce(param: Param, value: Any) -> Any:
    """Convert a JSON value to ``param.type`` the way OpenSIPS MI does, or raise -32602.

    - int: JSON integers, integral floats (``5.0``) and decimal strings (``"120"``, ``" -3 "``);
    - float: JSON numbers and numeric strings, finite only;
    - bool: ``true``/``false``, ``1``/``0`` and the strings 1/0/true/false/yes/no (any case);
    - str: strings, and JSON numbers rendered as text (a shell cannot tell ``007`` from ``7``, so
      the CLI leaves such words as strings; numbers reaching here are canonical).
    """
    if param.type is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float) and math.isfinite(value):
            return repr(value)
        raise _bad_type(param, value, "expected a string")
    if param.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        raise _bad_type(param, value, "expected a boolean (true/false, 1/0, yes/no)")
    if param.type is int:
        if isinstance(value, bool):
            raise _bad_type(param, value, "expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            if _INT_TEXT.fullmatch(text) and len(text) <= _MAX_INT_TEXT:
                return int(text)
        raise _bad_type(param, value, "expected an integer")
    # float
    if isinstance(value, bool):
        raise _bad_type(param, value, "expected a number")
    if isinstance(value, int):
        if abs(value) > 1 << 1023:
            raise _bad_type(param, value, "number out of range")
        return float(value)
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= _MAX_INT_TEXT:
        try:
            number = float(value.strip())
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise _bad_type(param, value, "expected a finite number")


# --- commands and the registry -------------------------------------------------------------------
Handler = Callable[..., Any]


@dataclass(frozen=True)
class Command:
    """A registered command: the handler is called with one keyword argument per param."""

    name: str
    handler: Handler
    params: tuple[Param, ...]
    help: str

    def bind(self, params: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
        """Map JSON params (positional array or named object) onto coerced keyword arguments."""
        given: dict[str, Any]
        if params is None:
            given = {}
        elif isinstance(params, list):
            if len(params) > len(self.params):
                raise invalid_params(
                    f"Too many parameters: '{self.name}' takes at most {len(self.params)}, "
                    f"got {len(params)}"
                )
            given = {p.name: v for p, v in zip(self.params, params, strict=False)}
        elif isinstance(params, dict):
            known = {p.name for p in self.params}
            unknown = [k for k in params if k not in known]
            if unknown:
                accepted = ", ".join(p.name for p in self.params) or "none"
                raise invalid_params(
                    f"Unknown parameter '{str(unknown[0])[:40]}' for '{self.name}' "
                    f"(accepted: {accepted})"
                )
            given = params
        else:
            raise JsonRpcError(INVALID_REQUEST, None, "params must be an object or an array")
        kwargs: dict[str, Any] = {}
        for param in self.params:
            value = given.get(param.name)
            if value is None:  # absent, or JSON null: both mean "not given"
                if param.required:
                    raise invalid_params(f"Missing required parameter '{param.name}'")
                kwargs[param.name] = param.default
            else:
                kwargs[param.name] = coerce(param, value)
        return kwargs


class CommandRegistry:
    """Named MI commands with declared params; ``which`` and ``help`` are built in."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self.register("which", self._which, [], "List the names of all commands.")
        self.register(
            "help",
            self._help,
            [Param("command", str, required=False, help="command to describe")],
            "Describe one command (its help text and params), or list every command.",
        )

    def register(
        self,
        name: str,
        handler: Handler,
        params: Iterable[Param] = (),
        help: str = "",
    ) -> None:
        """Add a command. Names must be unique; param names must be unique within a command."""
        if not isinstance(name, str) or not name:
            raise ValueError("command name must be a non-empty string")
        if name in self._commands:
            raise ValueError(f"command {name!r} is already registered")
        declared = tuple(params)
        names = [p.name for p in declared]
        if len(set(names)) != len(names):
            raise ValueError(f"command {name!r}: duplicate parameter names {names}")
        self._commands[name] = Command(name, handler, declared, help)

    def command(
        self, name: str, params: Iterable[Param] = (), help: str = ""
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`; returns the handler unchanged."""

        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, params, help)
            return handler

        return decorate

    def names(self) -> list[str]:
        """Command names in registration order (the built-ins first), like OpenSIPS ``which``."""
        return list(self._commands)

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    async def call(self, method: str, params: dict[str, Any] | list[Any] | None = None) -> Any:
        """Run ``method`` and return its result; every failure is a :class:`JsonRpcError`."""
        command = self._commands.get(method) if isinstance(method, str) else None
        if command is None:
            raise JsonRpcError(METHOD_NOT_FOUND, None, str(method)[:100])
        kwargs = command.bind(params)
        try:
            result = command.handler(**kwargs)
            if inspect.isawaitable(result):
                result = await result
        except JsonRpcError:
            raise
        except Exception as exc:  # a command bug must not escape to the transport
            log.exception("MI command %r failed", method)
            detail = f"{type(exc).__name__}: {exc}"
            if len(detail) > _MAX_ERROR_DETAIL:
                detail = detail[: _MAX_ERROR_DETAIL - 3] + "..."
            raise JsonRpcError(INTERNAL_ERROR, None, detail) from exc
        return result

    # --- built-ins -----------------------------------------------------------------------------
    def _which(self) -> list[str]:
        return self.names()

    def _help(self, command: str | None) -> dict[str, Any]:
        if command is None:
            return {
                "commands": {
                    c.name: (c.help.splitlines()[0] if c.help else "")
                    for c in self._commands.values()
                }
            }
        found = self._commands.get(command)
        if found is None:
            raise JsonRpcError(NOT_FOUND, "command not found", command[:100])
        return {
            "command": found.name,
            "help": found.help or "not available for this command",
            "params": [p.describe() for p in found.params],
        }

"""JSON-RPC client for the admin interface, and the ``sidecar mi`` command line.

``sidecar mi COMMAND [PARAMS...]`` mirrors ``opensips-cli -x mi`` / ``kamcmd``: words after the
command become params, named when every word is ``name=value``, else positional. The server
coerces types (``"1"`` for an int param, ``yes`` for a bool), so the CLI only turns canonical
integers into JSON numbers and leaves everything else as text; ``007`` stays ``"007"`` so an
AOR made of digits keeps its leading zeros.

Exit codes of :func:`main_mi`: 0 success, 1 the server answered with a JSON-RPC error,
2 the server could not be reached (or did not speak JSON-RPC), 64 bad command-line usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from typing import Any

import aiohttp

from sidecar.admin.commands import JsonRpcError

DEFAULT_URL = "http://127.0.0.1:8899/mi"
EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_CONNECTION = 2
EXIT_USAGE = 64  # sysexits.h EX_USAGE

_NAMED_WORD = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)=(.*)", re.DOTALL)
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]{0,30})")


class AdminConnectionError(Exception):
    """The admin endpoint could not be reached, timed out, or did not answer JSON-RPC."""


# --- JSON-RPC call -------------------------------------------------------------------------------
async def call(
    url: str,
    method: str,
    params: dict[str, Any] | list[Any] | None = None,
    token: str | None = None,
    timeout: float = 10,
) -> Any:
    """Call ``method`` on the admin server at ``url``; return ``result``.

    Raises :class:`JsonRpcError` when the server answers with an error object (including 401
    and 413, which carry one) and :class:`AdminConnectionError` for everything else.
    """
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
    if params is not None:
        request["params"] = params
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.post(url, data=json.dumps(request).encode(), headers=headers) as resp,
        ):
            status = resp.status
            body = await resp.read()
    except TimeoutError:
        raise AdminConnectionError(f"{url}: no answer within {timeout:g} s") from None
    except (aiohttp.ClientError, ValueError, OSError) as exc:  # ValueError: malformed URL
        raise AdminConnectionError(f"{url}: {type(exc).__name__}: {exc}") from None
    return _result_of(url, status, body)


def _result_of(url: str, status: int, body: bytes) -> Any:
    """Pull ``result`` out of a reply, or raise the error it carries."""
    try:
        reply = json.loads(body)
    except (ValueError, RecursionError):
        snippet = body[:80].decode("utf-8", "replace")
        raise AdminConnectionError(
            f"{url}: HTTP {status} reply is not JSON-RPC: {snippet!r}"
        ) from None
    if isinstance(reply, dict) and "error" in reply:
        raise JsonRpcError.from_dict(reply["error"])
    if isinstance(reply, dict) and "result" in reply:
        return reply["result"]
    raise AdminConnectionError(f"{url}: HTTP {status} reply has neither result nor error")


# --- command line --------------------------------------------------------------------------------
def _cli_value(word: str) -> Any:
    return int(word) if _CANONICAL_INT.fullmatch(word) else word


def parse_cli_params(args: list[str]) -> dict[str, Any] | list[Any]:
    """Turn CLI words into JSON-RPC params.

    - ``--json '<raw>'`` (or ``--json=<raw>``) alone: the raw JSON object/array, as given;
    - every word ``name=value``: a named object (``aor=alice brief=1`` -> ``{"aor": "alice",
      "brief": 1}``); a repeated name is an error;
    - otherwise a positional list of the words as typed (so ``sip:a@b;x=y`` is safe).

    Canonical integers (``0``, ``42``, ``-7``; not ``007``, ``+1``, ``1_000``) become JSON
    numbers; everything else, ``true``/``false`` included, stays a string for the server to
    coerce. Raises :class:`ValueError` for a bad ``--json`` or a repeated name.
    """
    if args and (args[0] == "--json" or args[0].startswith("--json=")):
        if args[0] == "--json":
            if len(args) != 2:
                raise ValueError("--json takes exactly one argument and no other params")
            raw = args[1]
        else:
            if len(args) != 1:
                raise ValueError("--json=... cannot be combined with other params")
            raw = args[0][len("--json=") :]
        try:
            params = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"--json: not valid JSON: {exc}") from None
        if not isinstance(params, dict | list):
            raise ValueError("--json: params must be a JSON object or array")
        return params
    matches = [_NAMED_WORD.fullmatch(word) for word in args]
    if args and all(matches):
        named: dict[str, Any] = {}
        for match in matches:
            assert match is not None  # narrowed by all() above
            name, value = match.group(1), match.group(2)
            if name in named:
                raise ValueError(f"parameter {name!r} given twice")
            named[name] = _cli_value(value)
        return named
    return [_cli_value(word) for word in args]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors to us instead of calling sys.exit(2).

    Exit code 2 means "cannot connect" for ``sidecar mi``; usage errors must not collide.
    """

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(message)


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="sidecar mi",
        description="Run an MI command on a sidecar's admin interface (JSON-RPC over HTTP).",
        epilog="PARAMS: name=value ... (named), plain words (positional), or --json '<raw>'.",
    )
    parser.add_argument(
        "--url", default=None, help=f"admin endpoint (env SIDECAR_MI_URL, default {DEFAULT_URL})"
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", default=None, help="bearer token (env SIDECAR_MI_TOKEN)")
    auth.add_argument("--token-file", default=None, help="file holding the bearer token")
    parser.add_argument("--raw", action="store_true", help="print compact JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("command", help="MI command, e.g. which, sc_status, ul_dump")
    parser.add_argument("params", nargs=argparse.REMAINDER, help="command parameters")
    return parser


def _token_from(options: argparse.Namespace) -> str | None:
    if options.token_file:
        try:
            with open(options.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise _UsageError(f"cannot read token file: {exc}") from None
        if not token:
            raise _UsageError(f"token file {options.token_file} is empty")
        return token
    return options.token or os.environ.get("SIDECAR_MI_TOKEN") or None


def _format_error(exc: JsonRpcError) -> str:
    text = f"error {exc.code}: {exc.message}"
    if exc.data is not None:
        detail = exc.data if isinstance(exc.data, str) else json.dumps(exc.data)
        text += f": {detail}"
    return text


async def run_mi(argv: list[str]) -> int:
    """The body of ``sidecar mi`` as a coroutine (for callers that already run a loop).

    ``argv`` is what follows ``mi`` on the command line. Output goes to stdout/stderr.
    """
    try:
        options = _build_parser().parse_args(argv)
        params = parse_cli_params(options.params)
        token = _token_from(options)
    except SystemExit as exc:  # --help: argparse printed the help and wants to exit
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except (_UsageError, ValueError) as exc:
        print(f"sidecar mi: {exc}", file=sys.stderr)
        print(_build_parser().format_usage(), end="", file=sys.stderr)
        return EXIT_USAGE
    url = options.url or os.environ.get("SIDECAR_MI_URL") or DEFAULT_URL
    try:
        result = await call(url, options.command, params or None, token, options.timeout)
    except JsonRpcError as exc:
        print(_format_error(exc), file=sys.stderr)
        return EXIT_RPC_ERROR
    except AdminConnectionError as exc:
        print(f"error: cannot talk to {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    print(_render(result, compact=options.raw))
    return EXIT_OK


def _render(result: Any, compact: bool) -> str:
    """Pretty (or compact) JSON; readable UTF-8 when the terminal can show it."""
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 2}
    text = json.dumps(result, ensure_ascii=False, **layout)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):  # lone surrogates, or a narrow terminal charset
        text = json.dumps(result, ensure_ascii=True, **layout)
    return text


def main_mi(argv: list[str]) -> int:
    """Entry point for ``sidecar mi [--url URL] [--token T|--token-file F] [--raw] CMD ...``.

    ``--help`` prints usage and returns 0.
    """
    return asyncio.run(run_mi(argv))

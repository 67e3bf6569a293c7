"""Splits a byte stream of concatenated JSON values into values, sans-I/O.

OpenSIPS ``event_stream`` writes its JSON-RPC notifications back to back on one TCP connection
with no delimiter and no newline (``{...}{...}``), so a reader cannot split on lines and must
find where each value ends. :class:`JsonStreamSplitter` does that incrementally:

* bytes are decoded as UTF-8 with an incremental decoder, so a multi-byte character split
  across two reads is fine;
* a container that is already complete when it starts is decoded at once with
  :meth:`json.JSONDecoder.raw_decode` (the common case: whole notifications per read);
  otherwise a resumable scanner tracks string/escape state and ``{}``/``[]`` depth across
  feeds (regex jumps, no per-character Python loop), so a value arriving in many small pieces
  costs linear time, and is decoded once the scanner has found its end;
* a value larger than ``max_object`` characters is garbage, which bounds the buffer.

Top-level values may be objects, arrays, strings, numbers, ``true``, ``false`` or ``null``
(OpenSIPS only sends objects). A number at the very end of the buffer waits for the next byte,
since ``12`` might still become ``123``. Whitespace between values is skipped.

Errors and resync: anything that cannot be JSON raises :class:`JsonStreamError`; values that
were complete before the garbage in the same :meth:`~JsonStreamSplitter.feed` are on the
exception's ``values`` attribute, so nothing good is lost. The splitter then refuses to go on
(every ``feed`` buffers its data and raises again) until the caller calls
:meth:`~JsonStreamSplitter.reset`, whose **resync rule** is: drop the first character of the
bad value, then skip to the next ``{`` (in the buffered text or, if there is none, in later
feeds). Call ``feed(b"")`` right after
``reset()`` to get values already buffered behind the garbage. A ``{`` inside the garbage can
surface a fragment that is valid JSON but not a whole message; consumers validate every value
anyway (:func:`sidecar.sources.opensips_events.parse_event` does).
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

_WS = re.compile(r"[ \t\n\r]*")
# From outside a string: the next character that matters to nesting.
_STRUCTURAL = re.compile(r'[{}\[\]"]')
# Rest of a string body: stops at the closing quote, or before a backslash that ends the buffer.
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
_NUMBER_RUN = re.compile(r"[-+0-9.eE]*")
# Invalid UTF-8 bytes arrive as lone surrogates (surrogateescape); raw text cannot hold them.
_BAD_BYTES = re.compile("[\udc80-\udcff]")
_LITERALS = ("true", "false", "null")


class JsonStreamError(ValueError):
    """Bytes that cannot be (part of) a JSON value; ``values`` holds what was parsed before."""

    def __init__(self, message: str, values: list[Any] | None = None) -> None:
        super().__init__(message)
        self.values: list[Any] = values if values is not None else []


class JsonStreamSplitter:
    """Feed it bytes, get back every complete JSON value (see the module docstring)."""

    def __init__(self, max_object: int = 1 << 20) -> None:
        if max_object < 1:
            raise ValueError("max_object must be positive")
        self.max_object = max_object
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        # Text not yet returned. Within one feed, _base is where the current value starts;
        # the consumed prefix is cut off once per feed, not once per value.
        self._text = ""
        self._base = 0
        self._error: JsonStreamError | None = None
        self._seeking_brace = False
        self._clear_scan()

    def _clear_scan(self) -> None:
        # Scan state of the value starting at _text[_base] (absolute indexes into _text).
        self._started = False
        self._pos = 0
        self._depth = 0
        self._in_string = False

    @property
    def buffered(self) -> int:
        """Characters of an incomplete value waiting for more data."""
        return len(self._text) - self._base

    def feed(self, data: bytes) -> list[Any]:
        chunk = self._utf8.decode(bytes(data))
        if chunk:
            self._text += chunk
        if self._error is not None:
            raise self._error  # data is kept behind the garbage until reset()
        values: list[Any] = []
        try:
            self._split(values)
        except JsonStreamError as exc:
            exc.values = values
            self._error = exc
            raise
        finally:
            self._compact()
        return values

    def reset(self) -> None:
        """Resume after an error: skip the bad value's first character, then to the next ``{``."""
        if self._error is None:
            return
        self._text = self._text[self._base + 1 :]
        self._base = 0
        self._error = None
        self._seeking_brace = True
        self._clear_scan()

    def _compact(self) -> None:
        base = self._base
        if base:
            self._text = self._text[base:]
            self._base = 0
            if self._started:
                self._pos -= base

    def _split(self, values: list[Any]) -> None:
        text = self._text
        size = len(text)
        while True:
            if self._seeking_brace:
                brace = text.find("{", self._base)
                self._base = size if brace < 0 else brace
                if brace < 0:
                    return
                self._seeking_brace = False
            if not self._started:
                self._base = _WS.match(text, self._base).end()
                if self._base == size:
                    return
                self._start_value()
                if self._depth and self._emit_whole(values):
                    continue
            end = self._scan()
            if end is None:
                if size - self._base > self.max_object:
                    raise JsonStreamError(f"JSON value longer than {self.max_object} characters")
                return
            if end - self._base > self.max_object:
                raise JsonStreamError(f"JSON value longer than {self.max_object} characters")
            values.append(self._decode(end))
            self._base = end
            self._clear_scan()

    def _emit_whole(self, values: list[Any]) -> bool:
        """Fast path: a container that is already complete decodes without scanning.

        Tried once per value, at its start; if it fails (incomplete or bad) the resumable
        scanner takes over, so a value trickling in costs no repeated decode attempts.
        """
        text = self._text
        try:
            value, end = self._decoder.raw_decode(text, self._base)
        except (json.JSONDecodeError, RecursionError):
            return False
        if end - self._base > self.max_object or _BAD_BYTES.search(text, self._base, end):
            return False  # let the scanner path report it
        values.append(value)
        self._base = end
        self._clear_scan()
        return True

    def _start_value(self) -> None:
        first = self._text[self._base]
        if first in "{[":
            self._depth = 1
        elif first == '"':
            self._in_string = True
        elif first not in "-0123456789tfn":
            raise JsonStreamError(f"unexpected {first!r} where a JSON value should start")
        self._started = True
        self._pos = self._base + 1

    def _scan(self) -> int | None:
        """End index (exclusive) of the value at ``_text[_base]``, or None if incomplete."""
        text = self._text
        base = self._base
        size = len(text)
        first = text[base]
        if first in "-0123456789":
            run_end = _NUMBER_RUN.match(text, base + 1).end()
            return None if run_end == size else run_end
        if first in "tfn":
            literal = next(word for word in _LITERALS if word[0] == first)
            if size - base < len(literal):
                if not literal.startswith(text[base:]):
                    raise JsonStreamError(f"bad literal {text[base:]!r}")
                return None
            return base + len(literal)
        pos = self._pos
        depth = self._depth
        in_string = self._in_string
        try:
            while pos < size:
                if in_string:
                    pos = _STRING_BODY.match(text, pos).end()
                    if pos >= size or text[pos] == "\\":
                        break  # the string (or an escape) continues in the next feed
                    pos += 1  # closing quote
                    in_string = False
                    if depth == 0:
                        return pos
                    continue
                m = _STRUCTURAL.search(text, pos)
                if m is None:
                    pos = size
                    break
                pos = m.end()
                char = m.group()
                if char == '"':
                    in_string = True
                elif char in "{[":
                    depth += 1
                else:
                    depth -= 1
                    if depth == 0:
                        return pos
            return None
        finally:
            self._pos, self._depth, self._in_string = pos, depth, in_string

    def _decode(self, end: int) -> Any:
        text = self._text
        if _BAD_BYTES.search(text, self._base, end):
            raise JsonStreamError("invalid UTF-8 inside a JSON value")
        try:
            value, used = self._decoder.raw_decode(text, self._base)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise JsonStreamError(f"invalid JSON value: {exc}") from None
        if used != end:
            raise JsonStreamError("invalid JSON value: trailing characters")
        return value

"""JSON stream splitter: the recorded event_stream bytes, split points, garbage, resync, fuzz."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.sources.json_stream import JsonStreamError, JsonStreamSplitter

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "opensips-samples"
needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"OpenSIPS samples not found at {SAMPLES}"
)


def feed_all(splitter: JsonStreamSplitter, pieces) -> list:
    out: list = []
    for piece in pieces:
        out += splitter.feed(piece)
    return out


# --- the recorded event_stream bytes --------------------------------------------------------------


@needs_samples
def test_recorded_raw_stream_at_every_split_point() -> None:
    raw = (SAMPLES / "events" / "event_stream_tcp_raw.txt").read_bytes()
    assert b"}{" in raw  # really concatenated with no delimiter
    expected = [
        {"jsonrpc": "2.0", "method": "E_UL_AOR_INSERT",
         "params": {"domain": "location", "aor": "gina"}},
        {"jsonrpc": "2.0", "method": "E_UL_AOR_DELETE",
         "params": {"domain": "location", "aor": "gina"}},
    ]
    assert JsonStreamSplitter().feed(raw) == expected
    for cut in range(len(raw) + 1):
        splitter = JsonStreamSplitter()
        assert feed_all(splitter, [raw[:cut], raw[cut:]]) == expected, cut
        assert splitter.buffered == 0
    for first in range(0, len(raw) + 1, 7):
        for second in range(first, len(raw) + 1, 11):
            pieces = [raw[:first], raw[first:second], raw[second:]]
            assert feed_all(JsonStreamSplitter(), pieces) == expected


@needs_samples
def test_recorded_raw_stream_byte_by_byte() -> None:
    raw = (SAMPLES / "events" / "event_stream_tcp_raw.txt").read_bytes()
    out = feed_all(JsonStreamSplitter(), [raw[i : i + 1] for i in range(len(raw))])
    assert [v["method"] for v in out] == ["E_UL_AOR_INSERT", "E_UL_AOR_DELETE"]


def scenario_payloads() -> list:
    lines = (SAMPLES / "events" / "sequence_scenario2.jsonl").read_text().splitlines()
    return [json.loads(line)["payload"] for line in lines if line.strip()]


@needs_samples
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4000), min_size=1, max_size=40))
def test_whole_recorded_scenario_in_random_reads(sizes: list[int]) -> None:
    payloads = scenario_payloads()
    stream = "".join(json.dumps(p, separators=(",", ":")) for p in payloads).encode()
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(stream[pos : pos + size])
        pos += size
    pieces.append(stream[pos:])
    assert feed_all(JsonStreamSplitter(), pieces) == payloads


# --- value shapes ---------------------------------------------------------------------------------


def test_utf8_split_mid_sequence() -> None:
    value = {"user_agent": "Acme Phöne ☎ 🎉", "aor": "zoë"}
    data = json.dumps(value, ensure_ascii=False).encode() * 2
    assert len(data) > len(json.dumps(value, ensure_ascii=False)) * 2  # multi-byte really there
    for cut in range(len(data) + 1):
        assert feed_all(JsonStreamSplitter(), [data[:cut], data[cut:]]) == [value, value], cut


def test_strings_with_braces_quotes_and_escapes() -> None:
    value = {"a": 'x}{"]', "b": "back\\slash\\", "c": '\\"{', "d": ["}", {"e": "\\u0041"}]}
    data = json.dumps(value).encode() + b" " + json.dumps(value).encode()
    for cut in range(len(data) + 1):
        assert feed_all(JsonStreamSplitter(), [data[:cut], data[cut:]]) == [value, value], cut


def test_all_top_level_value_kinds_and_whitespace() -> None:
    splitter = JsonStreamSplitter()
    got = splitter.feed(b' {"a":1}\n[1,[2]]\t"s\\"t" true false null -3.5e2 7 12')
    assert got == [{"a": 1}, [1, [2]], 's"t', True, False, None, -350.0, 7]
    assert splitter.buffered == 2  # "12" may still grow
    assert splitter.feed(b"3 ") == [123]
    assert splitter.feed(b"nu") == []
    assert splitter.feed(b"ll{}") == [None, {}]


# --- garbage, errors and resync -----------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"xyz",
        b"}",
        b'{"a":1]',
        b"nulL",
        b"1.2.3 ",
        b'{"a":"tab\there"}',  # raw control character inside a string
        b'{"a":"\xff\xfe"}',  # invalid UTF-8 inside a string
        b"\xc3\x28",  # invalid UTF-8 where a value should start
        b"{'single': 1}",
    ],
)
def test_garbage_raises_and_keeps_earlier_values(garbage: bytes) -> None:
    splitter = JsonStreamSplitter()
    with pytest.raises(JsonStreamError) as info:
        splitter.feed(b'{"ok":1} ' + garbage + b' {"after":2}')
    assert info.value.values == [{"ok": 1}]
    with pytest.raises(JsonStreamError):  # sticky until reset()
        splitter.feed(b'{"more":3}')
    splitter.reset()
    recovered: list = []
    for _ in range(10):  # each reset skips at least one character, so this terminates
        try:
            recovered += splitter.feed(b"")
            break
        except JsonStreamError as exc:
            recovered += exc.values
            splitter.reset()
    assert recovered[-2:] == [{"after": 2}, {"more": 3}]


def test_reset_waits_for_the_next_brace_in_later_feeds() -> None:
    splitter = JsonStreamSplitter()
    with pytest.raises(JsonStreamError):
        splitter.feed(b"garbage without a brace")
    splitter.reset()
    assert splitter.feed(b"still garbage ] 1 2 3") == []
    assert splitter.buffered == 0
    assert splitter.feed(b'junk {"a": 1}') == [{"a": 1}]


def test_reset_without_error_is_a_no_op() -> None:
    splitter = JsonStreamSplitter()
    assert splitter.feed(b'{"a"') == []
    splitter.reset()
    assert splitter.feed(b":1}") == [{"a": 1}]


def test_oversize_incomplete_value() -> None:
    splitter = JsonStreamSplitter(max_object=64)
    assert splitter.feed(b'{"a":"' + b"x" * 50) == []
    with pytest.raises(JsonStreamError, match="longer than 64"):
        splitter.feed(b"x" * 20)
    assert splitter.buffered <= 64 + 20


def test_oversize_complete_value() -> None:
    splitter = JsonStreamSplitter(max_object=16)
    assert splitter.feed(b'{"a":"0123456"}') == [{"a": "0123456"}]
    with pytest.raises(JsonStreamError, match="longer than 16"):
        splitter.feed(b'{"a":"0123456789"}')


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    depth = 200_000
    with pytest.raises(JsonStreamError):
        JsonStreamSplitter().feed(b"[" * depth + b"]" * depth)


def test_bad_configuration() -> None:
    with pytest.raises(ValueError):
        JsonStreamSplitter(max_object=0)


# --- fuzzing ----------------------------------------------------------------------------------


def drain(splitter: JsonStreamSplitter, data: bytes) -> list:
    """Feed data, resetting after every error as a reader would; returns all values."""
    out: list = []
    pending = data
    for _ in range(len(data) + 2):
        try:
            out += splitter.feed(pending)
            return out
        except JsonStreamError as exc:
            out += exc.values
            splitter.reset()
            pending = b""
    raise AssertionError("resync made no progress")


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_fuzz_arbitrary_bytes(pieces: list[bytes]) -> None:
    splitter = JsonStreamSplitter(max_object=128)
    for piece in pieces:
        drain(splitter, piece)
    assert splitter.buffered <= 128 + 40


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=5),
    st.lists(st.integers(0, 400), max_size=5),
    st.booleans(),
)
def test_fuzz_round_trip_of_objects(values: list[dict], cuts: list[int], ascii_only: bool) -> None:
    stream = "".join(json.dumps(v, ensure_ascii=ascii_only) for v in values).encode()
    bounds = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True)]
    assert feed_all(JsonStreamSplitter(), pieces) == values

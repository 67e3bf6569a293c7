"""Incarnations never repeat: same second restarts and clock steps back included."""

import pytest

from sidecar.incarnation import IncarnationError, next_incarnation


def test_strictly_increasing_within_one_second(tmp_path):
    values = [next_incarnation(tmp_path, now=1_800_000_000.5) for _ in range(5)]
    assert values == list(range(1_800_000_000, 1_800_000_005))


def test_clock_stepping_back_does_not_reuse(tmp_path):
    a = next_incarnation(tmp_path, now=1_800_000_100)
    b = next_incarnation(tmp_path, now=1_700_000_000)
    assert b == a + 1


def test_garbage_state_file_is_replaced(tmp_path):
    (tmp_path / "incarnation").write_text("not a number")
    assert next_incarnation(tmp_path, now=1_800_000_000) == 1_800_000_000


def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IncarnationError, match="cannot keep the node state"):
        next_incarnation(blocker / "sub")


def test_handle_counter_wrap_records_the_new_incarnation(tmp_path):
    from sidecar.model import HandleAllocator, handle_incarnation

    start = next_incarnation(tmp_path, now=1_800_000_000)
    alloc = HandleAllocator(3, start, lambda m: next_incarnation(tmp_path, minimum=m))
    alloc._counter = (1 << 24) - 1  # about to wrap
    h = alloc.next()
    assert handle_incarnation(h) == start + 1 or handle_incarnation(h) > start
    # a restart now (even with the clock far behind) gets a newer incarnation still
    assert next_incarnation(tmp_path, now=1) > handle_incarnation(h)

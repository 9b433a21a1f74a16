"""The engine's errors: an error about one input keeps naming the right input as it crosses layers."""

from __future__ import annotations

from embedfleet.engine import errors


def test_remapped_names_the_callers_position() -> None:
    err = errors.validation("too long", input=1)
    assert err.remapped([7, 3, 9]).input == 3
    assert err.remapped(range(10, 13)).input == 11
    assert err.remapped([7, 3, 9]).kind is err.kind and err.remapped([7, 3, 9]).detail == err.detail


def test_remapped_without_or_outside_positions() -> None:
    unplaced = errors.backend("inference failed")
    assert unplaced.remapped([4]) is unplaced  # about no input: unchanged
    assert errors.validation("bad", input=5).remapped([0, 1]).input is None  # an upstream naming an input it lacked
    assert errors.validation("bad", input=-1).remapped([0, 1]).input is None

"""Human durations: one parser for flags, config files and chat commands."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.protocol import format_duration_ms, parse_duration_ms


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("2d", 172_800_000),
        ("1.5s", 1_500),
        (".5s", 500),
        ("0", 0),
        ("30", 30_000),  # a plain number is seconds
        ("0.25", 250),
        (" 10 s ", 10_000),
        ("10S", 10_000),
        ("1.0005s", 1_000),  # fractions of a millisecond round
        (30, 30_000),
        (0.2, 200),
    ],
)
def test_parses_units_and_plain_seconds(text: str | int | float, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    "text", ["", "abc", "5x", "-1s", "1h30m", "s", "1e3", "ms", "5 m s", "--since"]
)
def test_rejects_garbage_with_a_hint(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*use e\.g\. 500ms, 30s, 5m, 1h"):
        parse_duration_ms(text)


@pytest.mark.parametrize("value", [-1, -0.5, math.inf, math.nan, True])
def test_rejects_negative_infinite_and_bool_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration_ms(value)


def test_error_message_names_the_input() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration_ms("x")
    assert str(info.value) == "invalid duration 'x': use e.g. 500ms, 30s, 5m, 1h"


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (450, "450ms"),
        (1_000, "1s"),
        (30_000, "30s"),
        (125_000, "2m 5s"),
        (120_000, "2m"),
        (3_600_000, "1h"),
        (5_400_000, "1h 30m"),
        (3_661_000, "1h 1m"),  # two units at most: the seconds are dropped
        (90_000_000, "1d 1h"),
        (-2_000, "-2s"),
        (1_499.6, "1s"),
    ],
)
def test_formats_for_people(ms: float, text: str) -> None:
    assert format_duration_ms(ms) == text


@given(st.integers(min_value=0, max_value=10**12))
def test_formatted_text_parses_back_to_at_most_one_unit_less(ms: int) -> None:
    parts = format_duration_ms(ms).split()
    total = sum(parse_duration_ms(part) for part in parts)
    last_unit = parse_duration_ms("1" + parts[-1].lstrip("0123456789"))
    assert 0 <= ms - total < max(last_unit, 1)

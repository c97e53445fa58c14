"""A run's quality-gate settings (``schemas.gate``): defaults < pack < flags, one error line
per bad value naming its flag or key, and what the worker reads back from the run."""

from __future__ import annotations

from typing import Any

import pytest

from skufleet.schemas import gate
from skufleet.schemas.errors import ConfigError, exit_code


def test_every_default_threshold_is_within_its_checks_range() -> None:
    assert set(gate.RANGES) == set(gate.CHECKS)
    for check, (low, high) in gate.RANGES.items():
        assert low <= gate.THRESHOLDS[check] <= high


def test_flags_win_over_the_pack_and_the_pack_over_the_defaults() -> None:
    """Each setting comes from the flags, else the pack, else the defaults; thresholds check
    by check; checks are kept in the order the worker runs them."""
    assert gate.resolve() == {
        "checks": ["dark", "blank", "flat", "duplicate", "safety"],
        "default_checks": True,
        "thresholds": {"dark": 0.06, "blank": 0.02, "flat": 12.0, "duplicate": 6.0, "safety": 0.5},
        "max_rolls": 2,
        "candidates": 1,
    }
    pack = gate.from_table(
        {
            "checks": ["safety", "dark", "clip"],
            "thresholds": {"clip": 25, "dark": 0.1},
            "max_rolls": 4,
        }
    )
    assert pack["checks"] == ["dark", "safety", "clip"]
    flags = gate.from_flags(thresholds=["dark=0.2"], candidates=3)
    assert gate.resolve(pack, flags) == {
        "checks": ["dark", "safety", "clip"],
        "default_checks": False,
        "thresholds": {"dark": 0.2, "safety": 0.5, "clip": 25.0},
        "max_rolls": 4,
        "candidates": 3,
    }
    # the pack's threshold of a check the flags turn off is dropped, not an error
    assert gate.resolve(pack, gate.from_flags("blank")) == {
        "checks": ["blank"],
        "default_checks": False,
        "thresholds": {"blank": 0.02},
        "max_rolls": 4,
        "candidates": 1,
    }


def test_none_turns_the_gate_off() -> None:
    """`--checks none` (or `checks = []` in a pack): nothing checked, one image per item,
    never re-rolled, whatever the pack says of rolls and candidates."""
    off = {
        "checks": [],
        "default_checks": False,
        "thresholds": {},
        "max_rolls": 0,
        "candidates": 1,
    }
    assert gate.resolve({"max_rolls": 5, "candidates": 2}, gate.from_flags(" None ")) == off
    assert gate.resolve(gate.from_table({"checks": []})) == off
    assert gate.describe(off) == "off"
    assert gate.describe(gate.resolve()) == (
        "dark, blank, flat, duplicate, safety; up to 2 re-rolls, 1 candidate"
    )


def test_what_the_enqueue_stores_is_what_the_worker_reads() -> None:
    """worker.gate.gate_from takes the stored settings as they are, and holds each check to
    the threshold resolved here."""
    from skufleet.worker.gate import gate_from

    stored = gate.resolve(
        gate.from_table({"thresholds": {"flat": 6}}),
        gate.from_flags("dark,flat,clip", ["clip=30"], max_rolls=1, candidates=2),
    )
    read = gate_from(stored)
    assert read.checks == ("dark", "flat", "clip")
    assert (read.max_rolls, read.candidates) == (1, 2)
    assert [read.threshold(check) for check in read.checks] == [0.06, 6.0, 30.0]
    assert not gate_from(gate.resolve(flags=gate.from_flags("none"))).enabled


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"checks": "dark,bright"},
            "--checks 'dark,bright': unknown check 'bright'; known: dark, blank, flat, "
            "duplicate, safety, clip",
        ),
        ({"checks": "dark,,blank"}, "--checks 'dark,,blank': give check names separated by"),
        ({"checks": "none,dark"}, "--checks 'none,dark': none turns the gate off and goes alone"),
        ({"thresholds": ["dark"]}, "--threshold dark: give CHECK=VALUE, for example dark=0.1"),
        ({"thresholds": ["dark=dim"]}, "--threshold dark=dim: 'dim' is not a number"),
        ({"thresholds": ["dark=nan"]}, "--threshold dark=nan: the threshold must be a number"),
        ({"thresholds": ["dark=1.5"]}, "--threshold dark=1.5: dark's threshold must be 0-1"),
        (
            {"thresholds": ["duplicate=65"]},
            "--threshold duplicate=65: duplicate's threshold must be 0-64",
        ),
        ({"thresholds": ["glare=1"]}, "--threshold glare=1: unknown check 'glare'; known:"),
        ({"max_rolls": 9}, "--max-rolls 9: must be 0-8"),
        ({"max_rolls": -1}, "--max-rolls -1: must be 0-8"),
        ({"candidates": 0}, "--candidates 0: must be 1-8"),
    ],
)
def test_a_bad_flag_is_one_error_naming_it_and_its_value(
    given: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        gate.from_flags(**given)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert exit_code(caught.value) == 2


def test_flags_that_would_do_nothing_are_refused() -> None:
    """A threshold for a check the run does not make, or rolls and candidates for a run that
    checks nothing, would silently change nothing: each is an error naming the flag."""
    with pytest.raises(ConfigError, match=r"^--threshold clip=25: the run does not check clip"):
        gate.resolve({}, gate.from_flags(thresholds=["clip=25"]))
    with pytest.raises(ConfigError, match=r"^--candidates 2: the run checks nothing"):
        gate.resolve({}, gate.from_flags("none", candidates=2))
    with pytest.raises(ConfigError, match=r"^--max-rolls 3: the run checks nothing"):
        gate.resolve({}, gate.from_flags("none", max_rolls=3))
    assert gate.resolve({}, gate.from_flags("none", max_rolls=0, candidates=1))["checks"] == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"checks": "dark"}, "quality.checks = 'dark': give a list of check names, [] for none"),
        ({"checks": ["dark", "glare"]}, "quality.checks: unknown check 'glare'; known: dark"),
        ({"thresholds": {"dark": "dim"}}, "quality.thresholds.dark = 'dim': the threshold must"),
        ({"thresholds": {"flat": 5000}}, "quality.thresholds.flat = 5000: flat's threshold must"),
        ({"thresholds": {"glare": 1}}, "quality.thresholds: unknown check 'glare'"),
        ({"thresholds": 3}, "quality.thresholds: give a table of check = number"),
        ({"max_rolls": True}, "quality.max_rolls = True: must be a whole number 0-8"),
        ({"max_rolls": 2.5}, "quality.max_rolls = 2.5: must be a whole number 0-8"),
        ({"candidates": 9}, "quality.candidates = 9: must be 1-8"),
        ({"max_roll": 1}, "quality: unknown key 'max_roll'; known: checks, thresholds, max_rolls"),
    ],
)
def test_a_bad_pack_table_is_one_error_naming_its_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        gate.from_table(table)
    assert str(caught.value).startswith(message)

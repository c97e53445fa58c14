"""A run's quality-gate settings: which checks, their thresholds, rolls and candidates.

The settings resolve as: defaults < the template pack's ``[quality]`` table < command-line
flags (``--checks``, ``--threshold``, ``--max-rolls``, ``--candidates``), in :func:`resolve`
alone; the enqueue stores the result in ``Run.params["quality"]``, and the worker reads it
there when it claims the run's items (``worker.gate.gate_from``)::

    {"checks": ["dark", "blank", "flat", "duplicate", "safety"],
     "default_checks": true,     # neither pack nor flags chose: a worker with a CLIP
                                 # model (SKUFLEET_QUALITY_CLIP) adds "clip"
     "thresholds": {"dark": 0.06, "blank": 0.02, ...},   # one per check, resolved
     "max_rolls": 2, "candidates": 1}

``checks: []`` turns the gate off (one image per item, nothing re-rolled). The names,
defaults and limits are defined here, where the producer and the worker both read them
(``worker.quality`` runs the checks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from skufleet.schemas.errors import ConfigError

CHECKS = ("dark", "blank", "flat", "duplicate", "safety", "clip")
"""Every check, in the order the worker runs and reports them."""
DEFAULT_CHECKS = ("dark", "blank", "flat", "duplicate", "safety")
"""What a run checks unless its pack or its enqueue says otherwise (``clip`` needs a CLIP
model on the workers, ``SKUFLEET_QUALITY_CLIP``)."""
THRESHOLDS: dict[str, float] = {
    "dark": 0.06,
    "blank": 0.02,
    "flat": 12.0,
    "duplicate": 6.0,
    "safety": 0.5,
    "clip": 20.0,
}
"""Default thresholds: ``duplicate`` fails at or below its threshold, every other check below."""
RANGES: dict[str, tuple[float, float]] = {
    "dark": (0.0, 1.0),
    "blank": (0.0, 1.0),
    "flat": (0.0, 4096.0),
    "duplicate": (0.0, 64.0),
    "safety": (0.0, 1.0),
    "clip": (0.0, 100.0),
}
"""The scores each check can give (luminance 0-1, colours of a 64×64 thumbnail, bits of a
64-bit hash, 100 × a cosine): a threshold outside would pass or fail every image."""
MAX_ROLLS = 8
MAX_CANDIDATES = 8
DEFAULT_MAX_ROLLS = 2
DEFAULT_CANDIDATES = 1
KEYS = ("checks", "thresholds", "max_rolls", "candidates")

FLAGS = {
    "checks": "--checks",
    "thresholds": "--threshold",
    "max_rolls": "--max-rolls",
    "candidates": "--candidates",
}
"""The command-line flag of each setting."""
TABLE = {key: f"quality.{key}" for key in KEYS}
"""The key of each setting in a pack's ``[quality]`` table, as errors name it."""


def _unknown(names: Iterable[str]) -> str | None:
    bad = [name for name in names if name not in CHECKS]
    if not bad:
        return None
    listed = ", ".join(repr(name) for name in bad)
    return f"unknown check{'s' if len(bad) > 1 else ''} {listed}; known: {', '.join(CHECKS)}"


def _ordered(names: Iterable[str]) -> list[str]:
    wanted = set(names)
    return [name for name in CHECKS if name in wanted]


def _threshold(check: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: the threshold must be a number")
    low, high = RANGES[check]
    if not low <= value <= high:
        raise ConfigError(f"{where}: {check}'s threshold must be {low:g}-{high:g}")
    return float(value)


def _count(value: Any, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: must be a whole number {low}-{high}")
    if not low <= value <= high:
        raise ConfigError(f"{where}: must be {low}-{high}")
    return value


def from_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a pack's ``[quality]`` table gives, checked; only the keys it sets.

    ``checks`` is a list of names (``[]``: the gate off), ``thresholds`` a table of
    ``check = number``, ``max_rolls`` 0-8 and ``candidates`` 1-8; a bad one is a ConfigError
    naming its key (``quality.checks``)."""
    extra = sorted(set(table) - set(KEYS))
    if extra:
        raise ConfigError(
            f"quality: unknown key{'s' if len(extra) > 1 else ''} "
            f"{', '.join(repr(k) for k in extra)}; known: {', '.join(KEYS)}"
        )
    found: dict[str, Any] = {}
    if "checks" in table:
        checks = table["checks"]
        if not isinstance(checks, list) or not all(isinstance(c, str) for c in checks):
            raise ConfigError(
                f"{TABLE['checks']} = {checks!r}: give a list of check names, [] for none"
            )
        if problem := _unknown(checks):
            raise ConfigError(f"{TABLE['checks']}: {problem}")
        found["checks"] = _ordered(checks)
    if "thresholds" in table:
        given = table["thresholds"]
        if not isinstance(given, Mapping):
            raise ConfigError(f"{TABLE['thresholds']}: give a table of check = number")
        if problem := _unknown(given):
            raise ConfigError(f"{TABLE['thresholds']}: {problem}")
        found["thresholds"] = {
            check: _threshold(check, value, f"{TABLE['thresholds']}.{check} = {value!r}")
            for check, value in given.items()
        }
    for key, low, high in (("max_rolls", 0, MAX_ROLLS), ("candidates", 1, MAX_CANDIDATES)):
        if key in table:
            found[key] = _count(table[key], low, high, f"{TABLE[key]} = {table[key]!r}")
    return found


def from_flags(
    checks: str | None = None,
    thresholds: Sequence[str] = (),
    max_rolls: int | None = None,
    candidates: int | None = None,
) -> dict[str, Any]:
    """The settings given on the command line, checked; only the flags given.

    ``checks``: names separated by commas, or ``none``; ``thresholds``: ``CHECK=VALUE``
    each. A bad one is a ConfigError naming the flag and its value (``--checks
    dark,bright: unknown check 'bright'; known: …``)."""
    found: dict[str, Any] = {}
    if checks is not None:
        where = f"--checks {checks!r}"
        names = [name.strip().lower() for name in checks.split(",")]
        if names == ["none"]:
            found["checks"] = []
        elif not all(names):
            raise ConfigError(f"{where}: give check names separated by commas, or none")
        elif "none" in names:
            raise ConfigError(f"{where}: none turns the gate off and goes alone")
        elif problem := _unknown(names):
            raise ConfigError(f"{where}: {problem}")
        else:
            found["checks"] = _ordered(names)
    given: dict[str, float] = {}
    for value in thresholds:
        where = f"--threshold {value}"
        check, sep, number = (part.strip() for part in value.partition("="))
        check = check.lower()
        if not sep or not check or not number:
            raise ConfigError(f"{where}: give CHECK=VALUE, for example dark=0.1")
        if problem := _unknown([check]):
            raise ConfigError(f"{where}: {problem}")
        try:
            parsed = float(number)
        except ValueError:
            raise ConfigError(f"{where}: {number!r} is not a number") from None
        given[check] = _threshold(check, parsed, where)
    if given:
        found["thresholds"] = given
    if max_rolls is not None:
        found["max_rolls"] = _count(max_rolls, 0, MAX_ROLLS, f"--max-rolls {max_rolls}")
    if candidates is not None:
        found["candidates"] = _count(candidates, 1, MAX_CANDIDATES, f"--candidates {candidates}")
    return found


def resolve(
    pack: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The run's settings, every key set: defaults < ``pack`` (:func:`from_table`) <
    ``flags`` (:func:`from_flags`), thresholds check by check, and only those of the
    checks the run makes. With no check, one candidate and no re-roll.

    A threshold or a second candidate the flags ask of a check the run does not make is a
    ConfigError (it would silently do nothing); the pack's are dropped (a pack may hold
    thresholds for checks it leaves off)."""
    pack, flags = pack or {}, flags or {}
    checks = list(flags.get("checks", pack.get("checks", DEFAULT_CHECKS)))
    chosen = ", ".join(checks) or "none"
    for check, value in (flags.get("thresholds") or {}).items():
        if check not in checks:
            raise ConfigError(
                f"--threshold {check}={value:g}: the run does not check {check} (its checks: "
                f"{chosen}); add it to --checks"
            )
    thresholds = {**THRESHOLDS, **(pack.get("thresholds") or {}), **(flags.get("thresholds") or {})}
    max_rolls = flags.get("max_rolls", pack.get("max_rolls", DEFAULT_MAX_ROLLS))
    candidates = flags.get("candidates", pack.get("candidates", DEFAULT_CANDIDATES))
    if not checks:
        for key, idle in (("max_rolls", 0), ("candidates", 1)):
            if key in flags and flags[key] != idle:
                raise ConfigError(
                    f"{FLAGS[key]} {flags[key]}: the run checks nothing, so no image is "
                    "drawn again or chosen among others"
                )
        max_rolls, candidates = 0, 1
    return {
        "checks": checks,
        "default_checks": "checks" not in flags and "checks" not in pack,
        "thresholds": {check: float(thresholds[check]) for check in checks},
        "max_rolls": int(max_rolls),
        "candidates": int(candidates),
    }


def describe(settings: Mapping[str, Any]) -> str:
    """One line for people: ``dark, blank, flat, duplicate, safety; up to 2 re-rolls, 1
    candidate`` or ``off``."""
    checks = list(settings.get("checks", DEFAULT_CHECKS))
    if not checks:
        return "off"
    rolls = int(settings.get("max_rolls", DEFAULT_MAX_ROLLS))
    candidates = int(settings.get("candidates", DEFAULT_CANDIDATES))
    return (
        f"{', '.join(checks)}; up to {rolls} re-roll{'s' if rolls != 1 else ''}, "
        f"{candidates} candidate{'s' if candidates != 1 else ''}"
    )

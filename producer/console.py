"""What every ``skufleet`` command shares: the consoles, one error line and exit code per
failure, the ledger check, and the parsers of command-line values."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from skufleet.schemas import ledger
from skufleet.schemas.errors import (
    ConfigError,
    LedgerUnavailable,
    SkufleetError,
    exit_code,
    one_line,
)
from skufleet.schemas.params import layer
from skufleet.schemas.settings import Settings

err = Console(stderr=True, soft_wrap=True)  # error lines stay whole for grep and logs
out = Console()


def fail(exc: SkufleetError) -> NoReturn:
    """One plain line on stderr (URLs without their secrets, no markup read from the
    message) and the exit code of ``exc``'s class: see ``schemas.errors``."""
    err.print(f"[bold red]error:[/] {escape(one_line(exc))}", highlight=False)
    raise typer.Exit(exit_code(exc))


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn skufleet's errors into one plain line on stderr and an exit code."""
    try:
        yield
    except SkufleetError as exc:
        fail(exc)
    except OperationalError as exc:
        # the commands read the ledger themselves: a database lost after the schema check
        fail(LedgerUnavailable(f"the ledger failed: {exc.orig}"))


def port_option(value: int) -> int:
    """A --port given on the command line: 1-65535 (the OS would wrap 99999 around)."""
    if not 1 <= value <= 65535:
        fail(ConfigError(f"--port must be 1-65535, got {value}"))
    return value


def ledger_engine(settings: Settings) -> Engine:
    """The ledger, checked to be at this code's schema."""
    engine = ledger.create_engine(settings.database_url)
    ledger.require_schema(engine)
    return engine


def parse_size(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", value.strip())
    if not match:
        raise ConfigError(f"--size must look like 512x512, got {value!r}")
    return int(match.group(1)), int(match.group(2))


def parse_columns(values: list[str]) -> dict[str, str]:
    mapping = {}
    for value in values:
        name, sep, header = value.partition("=")
        if not sep or not name.strip() or not header.strip():
            raise ConfigError(f"--column must look like sku=ItemID, got {value!r}")
        mapping[name.strip()] = header.strip()
    return mapping


FLAGS = {
    "width": "--size",
    "height": "--size",
    "steps": "--steps",
    "guidance_scale": "--guidance",
    "scheduler": "--scheduler",
    "format": "--format",
    "quality": "--quality",
    "compression": "--compression",
    "max_side": "--max-side",
}
"""The command-line flag of each generation or output parameter."""


def parse_overrides(model: str, size: str | None, **given: Any) -> dict[str, Any]:
    """Generation and output parameters given on the command line, checked over the
    model's defaults (``schemas.params.layer``; the pack's layers join at enqueue).

    An invalid one is a ConfigError of one line naming its flag and value
    (``--steps 0: input should be greater than or equal to 1``), never pydantic's report.
    """
    overrides = {name: value for name, value in given.items() if value is not None}
    if size is not None:
        overrides["width"], overrides["height"] = parse_size(size)
    try:
        layer(model, flags=overrides)
    except ConfigError as exc:
        raise ConfigError(_flag_problems(exc, overrides, size)) from exc
    return overrides


def _flag_problems(exc: ConfigError, overrides: dict[str, Any], size: str | None) -> str:
    """What :func:`layer` refused in ``overrides``, by flag, on one line."""
    given = {name: str(value) for name, value in overrides.items()}
    if size is not None:
        given["width"] = given["height"] = size
    cause = exc.__cause__
    if isinstance(cause, ValidationError):
        problems: dict[str, list[str]] = {}
        for error in cause.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else ""
            flag = FLAGS.get(name, name)
            message = error["msg"].removeprefix("Value error, ")
            message = message[0].lower() + message[1:]
            if flag == "--size":
                message = f"{name} {message.removeprefix('input ')}"
            problems.setdefault(f"{flag} {given.get(name, '')}".strip(), []).append(message)
        return "; ".join(f"{flag}: {', '.join(found)}" for flag, found in problems.items())
    message = str(cause or exc)
    for name, flag in FLAGS.items():  # OutputSpec's own messages start with the field
        if message.startswith(f"{name} "):
            return f"{flag} {message.removeprefix(name + ' ')}"  # "must be 1-100, got 500"
    return str(exc)

"""A demo stack left running by ``skufleet demo --keep``: the files that describe it, and
stopping it (``skufleet demo --stop``).

A kept stack is described in two files of its demo folder, both mode 0600:

- ``stack.json``: per process its pid, start time (field 22 of ``/proc/<pid>/stat``) and
  command line, so that :func:`stop` signals only processes that are still the ones the demo
  started, never a recycled pid or one a hand-edited file points at; and the variables that
  reach the stack, limited to what the demo made itself (its own Redis, S3 endpoint and keys,
  SQLite ledger), never a configured URL or key;
- ``skufleet.env``: the same variables as ``export`` lines (with the AWS ones that S3
  clients read, and Flower's login), for a shell to ``source`` and then use the stack with
  ``skufleet`` and any S3 client. It is written while any demo runs and removed when the
  stack stops.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from skufleet.schemas.errors import ConfigError

STACK_FILE = "stack.json"
ENV_FILE = "skufleet.env"
STOP_GRACE = 30.0
"""Seconds a stopped process gets to finish (a worker, its batch) before SIGKILL."""
GONE = "gone"
"""Why a kept process was not signalled when it had exited already."""


@dataclass(frozen=True)
class Identity:
    """What tells one process from a later one with the same pid."""

    start: int
    """Field 22 of ``/proc/<pid>/stat``: clock ticks after boot when it started."""
    cmdline: list[str]


def identity(pid: int) -> Identity | None:
    """The running (not zombie) process ``pid``'s identity, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no such process, or not one this user may look at
        return None
    # the command name, field 2, is in parentheses and may hold spaces and parentheses
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped
        return None
    args = [arg.decode(errors="surrogateescape") for arg in cmdline.rstrip(b"\0").split(b"\0")]
    return Identity(start=int(fields[19]), cmdline=args)


@dataclass
class StopReport:
    stopped: list[int] = field(default_factory=list)
    """Processes of the demo that were signalled."""
    gone: list[int] = field(default_factory=list)
    """Processes of the demo that had already exited."""
    refused: list[tuple[int, str]] = field(default_factory=list)
    """Pids left alone, and why: not (or no longer) the process the demo started."""


def _own(pid: int, recorded: Identity) -> str | None:
    """Why ``pid`` is not the demo's process ``recorded`` (None if it is, and leads its
    process group as the demo started it)."""
    found = identity(pid)
    if found is None:
        return GONE
    if found.start != recorded.start:
        return f"it started at tick {found.start}, the demo's at {recorded.start}"
    if found.cmdline != recorded.cmdline:
        return f"its command line is {shlex.join(found.cmdline)[:200]!r}"
    try:
        if os.getpgid(pid) != pid:
            return "it does not lead its own process group"
    except ProcessLookupError:
        return GONE
    return None


def _signal(pid: int, recorded: Identity, signum: signal.Signals) -> str | None:
    """Signal the process group of ``pid`` if it is still the demo's; None if signalled."""
    why = _own(pid, recorded)
    if why is None:
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return GONE
    return why


def stop(directory: Path) -> StopReport:
    """Stop what ``skufleet demo --keep`` left running in ``directory``.

    A process is signalled only while its start time and command line are still those
    recorded when it was kept: a pid that now belongs to another process is left alone and
    reported.
    """
    path = directory / STACK_FILE
    if not path.exists():
        raise ConfigError(f"nothing to stop: {path} does not exist")
    if not Path("/proc/self/stat").exists():
        raise ConfigError(
            f"cannot tell the demo's processes from others here (no /proc): stop them by "
            f"hand, see {path}"
        )
    try:
        kept = json.loads(path.read_text())
        processes = [
            (
                int(entry["pid"]),
                Identity(int(entry["start"]), [str(arg) for arg in entry["cmdline"]]),
                float(entry.get("grace", STOP_GRACE)),
            )
            for entry in kept["processes"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a stack file skufleet wrote: {exc!r}") from exc
    report = StopReport()
    for pid, recorded, _grace in processes:
        why = _signal(pid, recorded, signal.SIGTERM)
        if why is None:
            report.stopped.append(pid)
        elif why == GONE:
            report.gone.append(pid)
        else:
            report.refused.append((pid, why))
    signalled = time.monotonic()
    for pid, recorded, grace in processes:
        if pid not in report.stopped:
            continue
        deadline = signalled + grace
        while time.monotonic() < deadline and _own(pid, recorded) is None:
            time.sleep(0.2)
        _signal(pid, recorded, signal.SIGKILL)
    path.unlink()
    (directory / ENV_FILE).unlink(missing_ok=True)
    return report


def _write_private(path: Path, text: str) -> None:
    """``text`` into ``path``, mode 0600 (also when the file was there already)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as sink:
        sink.write(text)


def write_stack(
    directory: Path,
    pids: Iterable[int],
    grace: Mapping[int, float],
    generated: Mapping[str, str],
    flower: str,
) -> None:
    """stack.json: what --stop needs to find and prove the kept processes, and the variables
    (the demo's own services only) that reach the stack."""
    processes = []
    for pid in pids:
        found = identity(pid)
        if found is None:
            continue  # exited already: nothing to stop
        processes.append(
            {
                "pid": pid,
                "start": found.start,
                "cmdline": found.cmdline,
                "grace": grace.get(pid, STOP_GRACE),
            }
        )
    stack = {"processes": processes, "env": dict(generated), "flower": flower}
    _write_private(directory / STACK_FILE, json.dumps(stack, indent=2))


def write_env(
    directory: Path, variables: Mapping[str, str], unset: Iterable[str], configured: Iterable[str]
) -> Path:
    """skufleet.env: ``export`` lines of ``variables``, ``unset`` lines of variables that
    would otherwise lead the shell's skufleet elsewhere, and a comment per ``configured``
    variable the stack uses but the file does not copy (a configured URL or key)."""
    lines = [
        f"# the skufleet demo stack in {directory}: `source` this file, then skufleet and any",
        "# S3 client (aws, boto3) use its services; `skufleet demo --stop` removes it",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(variables.items())),
    ]
    names = sorted(set(unset) - set(variables))
    if names:
        lines.append("unset " + " ".join(names))
    lines += [f"# {name}: the configured value (not copied here)" for name in sorted(configured)]
    path = directory / ENV_FILE
    _write_private(path, "\n".join(lines) + "\n")
    return path

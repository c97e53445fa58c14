"""The one error tree of skufleet.

Every error a skufleet process raises on purpose derives from :class:`SkufleetError`, and its
type says what the caller should do::

    SkufleetError
    ├── ConfigError            bad settings or arguments: fix them and run again
    │   └── SchemaMissingError the ledger's tables are missing or outdated: `skufleet db upgrade`
    ├── CatalogueError         the catalogue cannot be read at all (file, header, encoding)
    ├── RetryableError         a dependency is unreachable: retry with backoff, up to the cap
    │   ├── StorageUnavailable     the S3 endpoint is down: refused, reset, timed out, 5xx
    │   ├── StorageRefused         the S3 endpoint refused one request (4xx): the item's error
    │   ├── LedgerUnavailable      the SQL database failed or timed out
    │   └── BrokerUnavailable      Redis refused or timed out
    ├── Stopping               the process stops while waiting out an outage: hand work back
    ├── BatchFailed            a render message's items were not all stored: its task fails
    ├── ItemError              permanent for one item (bad prompt, unsafe key): fail it now
    └── FatalError             the process cannot go on (model will not load, device lost):
        ├── ModelLoadError         stop, and let the supervisor decide
        └── DeviceError

Third-party errors (botocore, SQLAlchemy, torch) are translated into these at the edge of the
module that calls the library.

Each class also carries the exit code of a process that stops on it (``exit_code``): one
policy for every command, applied by :func:`exit_code` in every entry point (``skufleet``,
``skufleet-worker`` and each worker process)::

    0  all done
    1  finished with failures: SkufleetError, ItemError, FatalError, StorageRefused, Stopping,
       and anything that is not a SkufleetError
    2  usage or configuration: a bad flag, setting or input file, the ledger's schema missing,
       a model that will not load (ConfigError, CatalogueError, ModelLoadError); Typer's and
       argparse's own usage errors exit 2 as well
    3  a service unreachable: Redis, the database, S3 (RetryableError)
    4  a worker whose device left the rotation (DeviceError): its items are back on the
       queue; the device needs a look before the worker is started again

A failed webhook call is logged and never fails a command.
"""

from __future__ import annotations

from typing import ClassVar

from skufleet.schemas.redact import redact_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_DEVICE_FAILED = 4


class SkufleetError(Exception):
    """Base class of every error skufleet raises on purpose."""

    exit_code: ClassVar[int] = EXIT_FAILED


class NothingAccepted(SkufleetError):
    """No record of a catalogue was accepted: no run is created or changed (exit 1, the
    rejects say why)."""


class ConfigError(SkufleetError):
    """A setting or argument is invalid; the message names it and the bad value."""

    exit_code = EXIT_USAGE


class SchemaMissingError(ConfigError):
    """The ledger's tables are missing or at another revision than this code expects."""


class CatalogueError(SkufleetError):
    """The catalogue cannot be processed at all (as opposed to one bad record)."""

    exit_code = EXIT_USAGE


class RetryableError(SkufleetError):
    """A dependency failed in a way that may pass: retry with backoff, up to the cap."""

    exit_code = EXIT_UNAVAILABLE


class StorageUnavailable(RetryableError):
    """The object store is down: connection refused or reset, timed out, or a 5xx answer.
    Workers pause until it answers again (``worker.breaker``)."""


class StorageRefused(RetryableError):
    """The object store answered and refused one request (a 4xx other than throttling or
    access denied): retried as the item's own error, counting its attempts."""

    exit_code = EXIT_FAILED  # the service answered: it is not unreachable


class LedgerUnavailable(RetryableError):
    """The SQL ledger refused, failed or timed out."""


class BrokerUnavailable(RetryableError):
    """The message broker refused, failed or timed out."""


class Stopping(SkufleetError):
    """The process is shutting down while work waits for a service to come back: the work
    is handed back (the message to its queue, the items to the ledger)."""


class BatchFailed(SkufleetError):
    """A render message's task ends FAILURE with this: not every item it claimed was stored
    (failed, retried, taken over or handed back), or the message was refused. Each item's
    own state is in the ledger, and its retry is already a message of its own; the message
    itself is acknowledged, never retried or requeued."""


class ItemError(SkufleetError):
    """Permanent for one item: retrying cannot help, so the item fails at once."""


class FatalError(SkufleetError):
    """The process cannot continue; it stops and its supervisor decides what next."""


class ModelLoadError(FatalError):
    """The diffusion pipeline could not be loaded."""

    exit_code = EXIT_USAGE  # a model id, path or option that does not load: fix --model


class DeviceError(FatalError):
    """The accelerator is missing or keeps failing."""

    exit_code = EXIT_DEVICE_FAILED


EXIT_CODES_HELP = (
    "Exit codes: 0 all done; 1 finished with failures; 2 usage or configuration (a bad flag, "
    "setting or input file); 3 a service unreachable (Redis, the database, S3), or for a "
    "worker its device out of rotation."
)
"""The table above in one paragraph, for ``--help``."""


def exit_code(exc: BaseException) -> int:
    """The exit code of a process that stops on ``exc``, for every entry point."""
    return exc.exit_code if isinstance(exc, SkufleetError) else EXIT_FAILED


def one_line(exc: BaseException) -> str:
    """``exc``'s message as one line for stderr or a log, any URL in it without its secrets
    (libraries quote endpoint URLs, with their userinfo, in their messages)."""
    return redact_text(" ".join(str(exc).split())) or type(exc).__name__
